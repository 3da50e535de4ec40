//! The landing side as people see it: whether landing runs or is paused and why, whether new
//! leases are paused, the merge train now, and the trains of the last hour (builds per landed
//! task, how long a train takes, so how long a waiting task will wait).
//!
//! Three things can hold work back, each on its own: a person's pause of new leases
//! (`queue pause`), a person's hold on landing (`queue pause --landing` or `--landing-only`),
//! and a red base (the base fails the server's own build: neither leases nor landings go on
//! until it is green again). A person's hold outlives a red base's end; `queue resume` lifts all
//! three.
//!
//! The integrator and the queue commands write it; `status` and `queue` read it, without a
//! database round trip. The pauses are persisted (`meta`: `landing_paused`, `queue_paused`,
//! `red_base`) before they change here, and loaded at start-up with the last hour's trains:
//! memory follows the database. The trees built green under the server's verification are
//! kept here too (memory only), so that a runner's failed verification on a base known green
//! is charged at once, without another build of that base.

use std::collections::VecDeque;

use pipeline_core::ids::{CommitId, TreeId};
use pipeline_core::verify::Verifier;
use serde::{Deserialize, Serialize};

use crate::domain::{Millis, TaskId};
use crate::store::TrainStat;

/// A tree built green, with the scope it was built for (its namespace when each namespace is
/// a build of its own: [`scope`]).
pub type Green = (TreeId, Option<String>);

/// The `meta` key of a landing pause.
pub const LANDING_PAUSED: &str = "landing_paused";
/// The `meta` key of a pause of new leases.
pub const QUEUE_PAUSED: &str = "queue_paused";
/// The `meta` key of a red base.
pub const RED_BASE: &str = "red_base";

/// How far back the recent figures look.
pub const WINDOW_MS: Millis = 3_600_000;

/// Whether the verifier's commands name the namespace (so each namespace is its own build).
pub fn names_namespace(verifier: &Verifier) -> bool {
    match verifier {
        Verifier::Bild => true,
        Verifier::Commands { build, test } => [build, test]
            .iter()
            .any(|c| c.as_deref().is_some_and(|c| c.contains("{namespace}"))),
        Verifier::Off => false,
    }
}

/// What a build for a task with `namespace` builds: its namespace when each namespace is a
/// build of its own, else nothing in particular (one build covers every task). A tree green
/// for one scope says nothing of another.
pub fn scope(verifier: &Verifier, namespace: Option<&str>) -> Option<String> {
    names_namespace(verifier)
        .then(|| namespace.map(str::to_owned))
        .flatten()
}

/// A person's hold on landing, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pause {
    pub reason: String,
    /// Set only in a pause stored by an older server, where a red base was a landing pause:
    /// it is loaded as a [`RedBase`].
    #[serde(with = "commit_text", default, skip_serializing_if = "Option::is_none")]
    pub red_base: Option<CommitId>,
}

/// The base found red: it fails the server's own build under the server's verification.
/// Nothing is leased or landed while it is (no one would be charged for it), and both go on
/// by themselves once the base is somewhere else and builds green.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RedBase {
    /// The base commit that fails its build.
    #[serde(with = "commit_id_text")]
    pub commit: CommitId,
    /// What people are told: the commit, the failing command and the end of its output.
    pub reason: String,
    /// The namespace it was built for (under `bild`, a base is red for a namespace).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The digest of the verification it failed (set when it is recorded): a server started
    /// with another verification does not take the base as red under its own.
    #[serde(default)]
    pub digest: Option<String>,
}

/// A commit ID as its text in the stored red base.
mod commit_id_text {
    use pipeline_core::ids::CommitId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &CommitId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CommitId, D::Error> {
        CommitId::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A commit ID as its text in the stored pause.
mod commit_text {
    use pipeline_core::ids::CommitId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &Option<CommitId>, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Some(c) => s.serialize_some(c.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<CommitId>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| CommitId::parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Why new leases are paused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueuePause {
    pub reason: Option<String>,
    /// When it was paused (unset in a pause stored before this was kept).
    #[serde(default)]
    pub at: Option<Millis>,
}

/// A train being integrated now.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainView {
    pub id: i64,
    pub tasks: Vec<TaskId>,
    /// What it is doing, in a few words: "cherry-picking", "building prefix 2 of 4", …
    pub step: String,
    /// The train ahead whose tip it is built on as if that had landed (`--integration-slots`),
    /// while that train is in flight: set, this train is speculative.
    pub ahead: Option<i64>,
    /// The runners building it now (`--remote-builds`), by name: filled when the queue is read.
    pub runners: Vec<String>,
}

/// The landing side's state.
#[derive(Clone, Debug, Default)]
pub struct Landing {
    /// A person's hold on landing.
    pub paused: Option<Pause>,
    /// The base, while it is red.
    pub red_base: Option<RedBase>,
    /// A person's pause of new leases.
    pub queue_paused: Option<QueuePause>,
    /// The trains in flight, the first (the one that lands next) first: several with
    /// `--integration-slots`, each behind the first built on the tip of the one ahead.
    pub trains: Vec<TrainView>,
    /// The depth of speculation in use (trains built at once) and its ceiling
    /// (`--integration-slots`), once the integrator runs.
    pub integration_depth: Option<(u32, u32)>,
    /// Trains that ended within the window (and the last few, whatever their age, for the
    /// estimates), oldest first.
    recent: VecDeque<TrainStat>,
    /// How long the last dev runs took (lease to result), oldest first, for when an open task
    /// will start; only those since the server started.
    dev_ms: VecDeque<Millis>,
    /// Trees built green, oldest first (at most [`GREEN_TREES`]).
    green: VecDeque<Green>,
}

/// How many trees built green are remembered (so a base that is a landed tip is not built
/// again, to clear a red first commit or to tell a runner's failure from a red base's).
pub const GREEN_TREES: usize = 64;

/// How many finished trains the estimates use at least, however old.
const KEEP_FOR_ESTIMATES: usize = 16;

impl Landing {
    /// Records how long a dev run took, from its lease to its result.
    pub fn record_dev(&mut self, ms: Millis) {
        self.dev_ms.push_back(ms.max(0));
        while self.dev_ms.len() > KEEP_FOR_ESTIMATES {
            self.dev_ms.pop_front();
        }
    }

    /// An estimate of when the open task that is `position`th (0: next) in lease order among
    /// those only waiting for a slot starts, with `free` slots free of `slots` in all: at once
    /// while slots are free, then one recent dev run's time per round of the slots; `None`
    /// without slots or a finished dev run to go by.
    pub fn start_eta_secs(&self, position: usize, free: u32, slots: u32) -> Option<f64> {
        if position < free as usize {
            return Some(0.0);
        }
        if slots == 0 || self.dev_ms.is_empty() {
            return None;
        }
        let per_run = self.dev_ms.iter().sum::<Millis>() as f64 / 1000.0 / self.dev_ms.len() as f64;
        let rounds = (position - free as usize) / slots as usize + 1;
        Some(per_run * rounds as f64)
    }

    /// Records a finished train.
    pub fn record(&mut self, stat: TrainStat, now: Millis) {
        self.recent.push_back(stat);
        self.prune(now);
    }

    /// Loads the trains of the window (at start-up).
    pub fn load(&mut self, recent: Vec<TrainStat>, now: Millis) {
        self.recent = recent.into();
        self.prune(now);
    }

    fn prune(&mut self, now: Millis) {
        while self.recent.len() > KEEP_FOR_ESTIMATES
            && self
                .recent
                .front()
                .is_some_and(|t| t.ended_at < now - WINDOW_MS)
        {
            self.recent.pop_front();
        }
    }

    /// Integration builds per landed task over the last hour; `None` when none landed.
    pub fn builds_per_landed(&self, now: Millis) -> Option<f64> {
        let (builds, landed) = self
            .recent
            .iter()
            .filter(|t| t.ended_at >= now - WINDOW_MS)
            .fold((0u64, 0u64), |(b, l), t| {
                (b + u64::from(t.builds), l + u64::from(t.landed))
            });
        (landed > 0).then(|| builds as f64 / landed as f64)
    }

    /// How long a train that builds takes, on average over the recent ones; `None` without
    /// one.
    pub fn train_secs(&self) -> Option<f64> {
        let built: Vec<&TrainStat> = self.recent.iter().filter(|t| t.builds > 0).collect();
        if built.is_empty() {
            return None;
        }
        let total: i64 = built.iter().map(|t| t.ended_at - t.started_at).sum();
        Some(total.max(0) as f64 / 1000.0 / built.len() as f64)
    }

    /// An estimate of when the task waiting at `position` (0: next) behind the current train
    /// lands, with trains of up to `batch_max`.
    pub fn eta_secs(&self, position: usize, batch_max: usize) -> Option<f64> {
        let per_train = self.train_secs()?;
        let ahead = usize::from(!self.trains.is_empty()) + position / batch_max.max(1);
        Some(per_train * (ahead + 1) as f64)
    }

    /// Landing's state and reason, as `status` shows it: a red base's reason first (it also
    /// holds leases), then a person's hold.
    pub fn state(&self) -> (&'static str, Option<String>) {
        match (&self.red_base, &self.paused) {
            (Some(red), Some(hold)) => (
                "paused",
                Some(format!(
                    "{}; landing is also held: {}",
                    red.reason, hold.reason
                )),
            ),
            (Some(red), None) => ("paused", Some(red.reason.clone())),
            (None, Some(hold)) => ("paused", Some(hold.reason.clone())),
            (None, None) => ("running", None),
        }
    }

    /// A train formed: shown behind those in flight.
    pub fn train_formed(&mut self, view: TrainView) {
        self.trains.retain(|t| t.id != view.id);
        self.trains.push(view);
    }

    /// A train is over: no longer shown, and the trains built on its tip are no longer
    /// speculative on it (it landed that tip, or they are formed again on the base).
    pub fn train_over(&mut self, id: i64) {
        self.trains.retain(|t| t.id != id);
        for t in &mut self.trains {
            t.ahead.take_if(|a| *a == id);
        }
    }

    /// Whether nothing lands now (a person's hold or a red base).
    pub fn landing_held(&self) -> bool {
        self.paused.is_some() || self.red_base.is_some()
    }

    /// Why no new leases are handed out, if none are: a red base, or a person's pause (its
    /// reason, empty when none was given).
    pub fn leases_held(&self) -> Option<String> {
        match (&self.red_base, &self.queue_paused) {
            (Some(red), _) => Some(red.reason.clone()),
            (None, Some(p)) => Some(p.reason.clone().unwrap_or_default()),
            (None, None) => None,
        }
    }

    /// Whether `tree` was built green for `scope` under the server's verification.
    pub fn is_green(&self, tree: &TreeId, scope: &Option<String>) -> bool {
        self.green.iter().any(|(t, s)| t == tree && s == scope)
    }

    /// The trees known green, for a train's plan.
    pub fn green_trees(&self) -> impl Iterator<Item = &Green> {
        self.green.iter()
    }

    /// Remembers a tree built green for a scope (the newest [`GREEN_TREES`]).
    pub fn remember_green(&mut self, green: Green) {
        self.green.retain(|t| *t != green);
        self.green.push_back(green);
        while self.green.len() > GREEN_TREES {
            self.green.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(started_at: Millis, ended_at: Millis, builds: u32, landed: u32) -> TrainStat {
        TrainStat {
            started_at,
            ended_at,
            builds,
            landed,
        }
    }

    #[test]
    fn builds_per_landed_counts_the_last_hour() {
        let mut l = Landing::default();
        assert_eq!(l.builds_per_landed(0), None);
        l.record(stat(0, 2_000, 1, 8), 2_000);
        l.record(stat(2_000, 10_000, 4, 3), 10_000);
        assert_eq!(l.builds_per_landed(10_000), Some(5.0 / 11.0));
        // An hour later only the second counts.
        assert_eq!(l.builds_per_landed(2_001 + WINDOW_MS), Some(4.0 / 3.0));
        assert_eq!(l.builds_per_landed(10_001 + WINDOW_MS), None);
    }

    #[test]
    fn a_train_over_is_no_longer_shown_nor_the_one_behind_speculative_on_it() {
        let view = |id, ahead| TrainView {
            id,
            tasks: vec![],
            step: "cherry-picking".into(),
            ahead,
            runners: vec![],
        };
        let mut l = Landing::default();
        l.train_formed(view(1, None));
        l.train_formed(view(2, Some(1)));
        l.train_formed(view(3, Some(2)));
        let shown = |l: &Landing| l.trains.iter().map(|t| (t.id, t.ahead)).collect::<Vec<_>>();
        assert_eq!(shown(&l), [(1, None), (2, Some(1)), (3, Some(2))]);
        l.train_over(1);
        assert_eq!(shown(&l), [(2, None), (3, Some(2))]);
        l.train_over(3);
        assert_eq!(shown(&l), [(2, None)]);
    }

    #[test]
    fn estimates_come_from_recent_trains_that_built() {
        let mut l = Landing::default();
        assert_eq!(l.eta_secs(0, 8), None);
        l.record(stat(0, 2_000, 1, 8), 2_000);
        l.record(stat(2_000, 6_000, 2, 8), 6_000);
        l.record(stat(6_000, 6_000, 0, 1), 6_000);
        assert_eq!(l.train_secs(), Some(3.0));
        assert_eq!(l.eta_secs(0, 8), Some(3.0));
        assert_eq!(l.eta_secs(8, 8), Some(6.0));
        l.trains.push(TrainView {
            id: 1,
            tasks: vec![],
            step: "building".into(),
            ahead: None,
            runners: vec![],
        });
        assert_eq!(l.eta_secs(0, 8), Some(6.0));
    }

    #[test]
    fn an_open_task_starts_at_once_on_a_free_slot_then_a_run_later_per_round() {
        let mut l = Landing::default();
        assert_eq!(l.start_eta_secs(0, 1, 2), Some(0.0), "a free slot");
        assert_eq!(l.start_eta_secs(1, 1, 2), None, "no run to go by yet");
        l.record_dev(2_000);
        l.record_dev(4_000);
        assert_eq!(l.start_eta_secs(1, 1, 2), Some(3.0));
        assert_eq!(l.start_eta_secs(2, 1, 2), Some(3.0));
        assert_eq!(l.start_eta_secs(3, 1, 2), Some(6.0));
        assert_eq!(l.start_eta_secs(0, 0, 0), None, "no slot at all");
        for _ in 0..40 {
            l.record_dev(10_000);
        }
        assert_eq!(
            l.start_eta_secs(0, 0, 1),
            Some(10.0),
            "the recent runs only"
        );
    }
}
