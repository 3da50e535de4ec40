//! The queue as a whole: the merge train now, what agents work on, and what waits behind them
//! (`pipelinectl queue`), and its pauses. `queue pause` stops new leases (and landing, with `--landing`; landing
//! alone with `--landing-only`); a base that fails its own build holds both by itself, until
//! the base is green again or `queue resume`. A pause is written to `meta` before memory
//! follows, and every change of landing's state is announced in one place
//! ([`Coordinator::announce_landing`]).

use crate::domain::{TaskId, TaskStatus};
use crate::error::{Error, Result};
use crate::feed::{NewEntry, Topic};
use crate::landing::{self, Pause, QueuePause, RedBase, TrainView};
use crate::lifecycle;
use crate::ports::Repository;
use crate::store::{Store, TaskFilter};

use super::Coordinator;

/// The most waiting tasks `queue` lists.
pub const QUEUE_LIMIT: usize = 200;

/// A task waiting to land or to be leased, for `queue`.
#[derive(Clone, Debug)]
pub struct Waiting {
    pub id: TaskId,
    pub status: TaskStatus,
    /// 1-based, in the order they will land (Verified) or be leased (Open, after them).
    pub position: u32,
    pub waiting_for: Vec<String>,
    /// When a Verified task is expected to land, from the recent trains; when an Open one
    /// that waits only for a slot is expected to start, from the free slots and the recent
    /// dev runs.
    pub eta_seconds: Option<f64>,
}

/// What `queue pause` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// New leases; running work and landing go on.
    Leases,
    /// New leases and landing (`--landing`).
    LeasesAndLanding,
    /// Landing only (`--landing-only`): agents keep working and tasks keep reaching
    /// Verified, but nothing lands (a closed tree).
    LandingOnly,
}

/// A task an agent works on now, for `queue`.
#[derive(Clone, Debug)]
pub struct Running {
    pub id: TaskId,
    /// The runner's name.
    pub runner: String,
    /// When it was leased (after a restart: when the lease was restored).
    pub since: crate::domain::Millis,
}

/// What `queue` shows.
#[derive(Clone, Debug)]
pub struct QueueView {
    /// The trains in flight, the one that lands next first (several with
    /// `--integration-slots`); `queue`'s `train` is the first.
    pub trains: Vec<TrainView>,
    /// The tasks in progress, oldest lease first (from memory: the live leases).
    pub running: Vec<Running>,
    pub waiting: Vec<Waiting>,
    pub landing: (&'static str, Option<String>),
    /// The base commit found red, while it is.
    pub red_base: Option<String>,
    pub queue_paused: bool,
    pub queue_pause_reason: Option<String>,
}

impl<S: Store, R: Repository> Coordinator<S, R> {
    /// Loads the pauses and the last hour's trains (at start-up, before serving).
    pub async fn load_landing(&self) -> Result<()> {
        let mut paused: Option<Pause> = self.load_meta(landing::LANDING_PAUSED).await?;
        let mut red_base: Option<RedBase> = self.load_meta(landing::RED_BASE).await?;
        // An older server kept a red base as a landing pause that named it.
        if let Some(old) = paused.take_if(|p| p.red_base.is_some()) {
            red_base = red_base.or(old.red_base.map(|commit| RedBase {
                commit,
                reason: old.reason,
                namespace: None,
                digest: None,
            }));
        }
        // A base found red under another verification is not known red under this one.
        if let Some(red) =
            red_base.take_if(|r| r.digest.as_deref().is_some_and(|d| d != self.verify_digest))
        {
            self.store.delete_meta(landing::RED_BASE).await?;
            tracing::info!(commit = %red.commit, "the base was found red under another verification; not held for it now");
        }
        let queue_paused: Option<QueuePause> = self.load_meta(landing::QUEUE_PAUSED).await?;
        let now = self.now();
        let recent = self.store.trains_since(now - landing::WINDOW_MS).await?;
        let mut state = self.landing();
        state.paused = paused;
        state.red_base = red_base;
        state.queue_paused = queue_paused;
        state.load(recent, now);
        Ok(())
    }

    /// A stored pause, if there is one.
    async fn load_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.store.get_meta(key).await? {
            Some(json) => serde_json::from_str(&json)
                .map(Some)
                .map_err(|e| Error::Internal(format!("the stored {key} is unreadable: {e}"))),
            None => Ok(None),
        }
    }

    /// Holds new leases, landing, or both (`hold`); running work goes on.
    pub async fn pause_queue(&self, reason: Option<String>, hold: Hold) -> Result<()> {
        // Landing's memory follows the write: the dispatcher and the integrator, woken by
        // its entry, wait for it (`wakeups`).
        let _ticket = self.following();
        if hold != Hold::LandingOnly {
            // Pausing what is paused keeps when it began, and its reason unless a new one is
            // given.
            let pause = match self.landing().queue_paused.clone() {
                Some(before) => QueuePause {
                    reason: reason.clone().or(before.reason),
                    at: before.at,
                },
                None => QueuePause {
                    reason: reason.clone(),
                    at: Some(self.now()),
                },
            };
            let entry = NewEntry::new(
                Topic::Queue,
                "queue",
                "paused",
                self.now(),
                match &pause.reason {
                    Some(reason) => format!("new leases paused: {reason}"),
                    None => "new leases paused".to_owned(),
                },
                serde_json::json!({ "reason": pause.reason }),
            );
            self.store
                .set_meta_recording(landing::QUEUE_PAUSED, Some(&to_json(&pause)?), &entry)
                .await?;
            self.landing().queue_paused = Some(pause);
        }
        if hold != Hold::Leases {
            let default = match hold {
                Hold::LandingOnly => "held by pipelinectl queue pause --landing-only",
                _ => "paused by pipelinectl queue pause",
            };
            self.pause_landing(Pause {
                reason: reason.unwrap_or_else(|| default.to_owned()),
                red_base: None,
            })
            .await?;
        }
        tracing::info!(?hold, "queue paused");
        Ok(())
    }

    /// Lifts every pause (leases, landing, a red base's); its entries wake the dispatcher and
    /// the integrator. Returns whether anything was paused.
    pub async fn resume_queue(&self) -> Result<bool> {
        // Landing's memory follows the write: the dispatcher and the integrator, woken by
        // its entry, wait for it (`wakeups`).
        let _ticket = self.following();
        let was_paused = {
            let l = self.landing();
            l.queue_paused.is_some() || l.landing_held()
        };
        let resumed = NewEntry::new(
            Topic::Queue,
            "queue",
            "resumed",
            self.now(),
            "new leases resumed",
            serde_json::json!({}),
        );
        self.store
            .set_meta_recording(landing::QUEUE_PAUSED, None, &resumed)
            .await?;
        self.landing().queue_paused = None;
        if self.landing().paused.is_some() {
            let red_base = self.landing().red_base.is_some();
            let entry = landing_entry(
                self.now(),
                red_base,
                "landing resumed by pipelinectl queue resume",
            );
            self.store
                .set_meta_recording(landing::LANDING_PAUSED, None, &entry)
                .await?;
            self.landing().paused = None;
            self.announce_landing("pipelinectl queue resume");
        }
        self.clear_red_base("pipelinectl queue resume").await?;
        tracing::info!("queue resumed");
        Ok(was_paused)
    }

    /// Whether new leases are held (a person's pause or a red base).
    pub fn leases_paused(&self) -> bool {
        self.landing().leases_held().is_some()
    }

    /// Holds landing, as a person asked.
    pub(crate) async fn pause_landing(&self, pause: Pause) -> Result<()> {
        // Landing's memory follows the write: the dispatcher and the integrator, woken by
        // its entry, wait for it (`wakeups`).
        let _ticket = self.following();
        let entry = landing_entry(self.now(), true, &pause.reason);
        self.store
            .set_meta_recording(landing::LANDING_PAUSED, Some(&to_json(&pause)?), &entry)
            .await?;
        let reason = pause.reason.clone();
        self.landing().paused = Some(pause);
        self.announce_landing(&reason);
        Ok(())
    }

    /// Records the base red: leases and landing wait until it is green again (a person's
    /// hold, if any, stays as it is). A base already known red is recorded again only if it
    /// is another commit.
    pub(crate) async fn mark_red_base(&self, mut red: RedBase) -> Result<()> {
        // Landing's memory follows the write: the dispatcher and the integrator, woken by
        // its entry, wait for it (`wakeups`).
        let _ticket = self.following();
        red.digest = Some(self.verify_digest.clone());
        if self
            .landing()
            .red_base
            .as_ref()
            .is_some_and(|r| r.commit == red.commit)
        {
            return Ok(());
        }
        let entry = landing_entry(self.now(), true, &red.reason);
        self.store
            .set_meta_recording(landing::RED_BASE, Some(&to_json(&red)?), &entry)
            .await?;
        let reason = red.reason.clone();
        self.landing().red_base = Some(red);
        self.announce_landing(&reason);
        Ok(())
    }

    /// The base is no longer red (it moved and builds green, or a person resumed): leases and
    /// landing go on, unless a person holds them.
    pub(crate) async fn clear_red_base(&self, why: &str) -> Result<()> {
        // Landing's memory follows the write: the dispatcher and the integrator, woken by
        // its entry, wait for it (`wakeups`).
        let _ticket = self.following();
        if self.landing().red_base.is_none() {
            return Ok(());
        }
        let held = self.landing().paused.is_some();
        let entry = landing_entry(self.now(), held, why);
        self.store
            .set_meta_recording(landing::RED_BASE, None, &entry)
            .await?;
        self.landing().red_base = None;
        self.announce_landing(why);
        Ok(())
    }

    /// Says that landing's state changed (paused, or running again), and why. The one place
    /// it is announced: the `landing.paused` and `landing.resumed` webhooks hook in here.
    pub(crate) fn announce_landing(&self, why: &str) {
        self.landing_moved.send_modify(|n| *n = n.wrapping_add(1));
        let (state, reason) = self.landing().state();
        match reason {
            Some(reason) => tracing::warn!(%reason, "landing paused"),
            None => tracing::info!("landing {state}: {why}"),
        }
    }

    /// The train now, then the Verified tasks in landing order, then the Open ones in lease
    /// order (at most [`QUEUE_LIMIT`] in all).
    pub async fn queue(&self) -> Result<QueueView> {
        let (mut trains, landing_state, red_base, queue_paused, queue_pause_reason) = {
            let l = self.landing();
            (
                l.trains.clone(),
                l.state(),
                l.red_base.as_ref().map(|r| r.commit.to_string()),
                l.leases_held().is_some(),
                super::tasks::queue_pause_reason(&l),
            )
        };
        // A standby keeps no train in memory: the trains in flight are those whose members'
        // integrate runs are running in the database; what each is doing, and whose tip it is
        // built on, are the leader's to tell.
        if self.server_role().role == "standby" {
            trains = self
                .store
                .trains_in_flight()
                .await?
                .into_iter()
                .map(|(id, tasks)| TrainView {
                    id,
                    tasks,
                    step: "in flight on the leader".to_owned(),
                    ahead: None,
                    runners: Vec::new(),
                })
                .collect();
        }
        // Which runners build each train, with --remote-builds: those of the live build jobs

        // built for its tasks (the step names them too).
        let building = self.live_build_runners();
        let unassigned = self.waiting_builds();
        for t in &mut trains {
            let mut on: Vec<String> = building
                .iter()
                .filter(|(_, tasks)| tasks.iter().any(|id| t.tasks.contains(id)))
                .map(|(runner, _)| runner.clone())
                .collect();
            on.sort();
            on.dedup();
            if !on.is_empty() && t.step.starts_with("building") {
                t.step = format!("{} (on runner {})", t.step, on.join(", "));
            } else if t.step.starts_with("building")
                && let Some(w) = unassigned
                    .iter()
                    .find(|w| w.tasks.iter().any(|id| t.tasks.contains(id)))
            {
                t.step = format!("{} ({})", t.step, waiting_for_a_builder(w));
            }
            t.runners = on;
        }
        let in_train = |id: &TaskId| trains.iter().any(|t| t.tasks.contains(id));
        let mut waiting = Vec::new();
        let verified = self.store.verified().await?;
        let room = QUEUE_LIMIT.saturating_sub(verified.len());
        let open = self
            .store
            .list_tasks(&TaskFilter::status(TaskStatus::Open), None, room as u32)
            .await?;
        let batch_max = self.settings.batch_max;
        let (capacity, _) = self.capacity();
        // Open tasks that wait for nothing but a slot, so far: the next one's place in line.
        let mut startable = 0;
        for task in verified
            .into_iter()
            .filter(|t| !in_train(&t.id))
            // An epic is never leased: its children are in the line, not it.
            .chain(open.into_iter().filter(|t| !t.children.any()))
            .take(QUEUE_LIMIT)
        {
            let position = waiting.len();
            let waiting_for = self.waiting_for(&task).await?;
            let policy = self.policy();
            let eta_seconds = match task.state.status {
                // Held until a base is built or a person approves it: no estimate.
                TaskStatus::Verified
                    if task.state.base_check || policy.awaits_approval(&task.state) =>
                {
                    None
                }
                // Nothing lands while landing is held: no estimate either.
                TaskStatus::Verified if self.landing().landing_held() => None,
                TaskStatus::Verified => self.landing().eta_secs(position, batch_max),
                TaskStatus::Open
                    if waiting_for
                        .iter()
                        .all(|w| w.starts_with(lifecycle::ALL_SLOTS_BUSY)) =>
                {
                    startable += 1;
                    self.landing().start_eta_secs(
                        startable - 1,
                        capacity.free_slots,
                        capacity.slots,
                    )
                }
                _ => None,
            };
            waiting.push(Waiting {
                id: task.id,
                status: task.state.status,
                position: u32::try_from(position + 1).unwrap_or(u32::MAX),
                waiting_for,
                eta_seconds,
            });
        }
        let running = self
            .registry()
            .running()
            .into_iter()
            .map(|(id, runner, since)| Running { id, runner, since })
            .collect();
        Ok(QueueView {
            trains,
            running,
            waiting,
            landing: landing_state,
            red_base,
            queue_paused,
            queue_pause_reason,
        })
    }
}

/// Why a train's build, a job on the board, has not started: the runners it needs are busy, or
/// none connected can take it (none has the labels, or each is drained, unhealthy or already
/// failed it: then the last failure is said, or an idle runner with the labels would seem to
/// be ignored), and then the server builds it itself after the wait.
fn waiting_for_a_builder(w: &super::builds::WaitingBuild) -> String {
    if w.able {
        return "waiting for a free slot on a runner that can build it".to_owned();
    }
    let who = if w.requires.is_empty() {
        "waiting for a runner: none connected can build".to_owned()
    } else {
        format!(
            "waiting for a runner with {} (--build-requires): none connected can take it",
            w.requires.join(", ")
        )
    };
    let failed = w
        .failed
        .as_deref()
        .map_or_else(String::new, |f| format!(" ({})", one_line(f)));
    format!(
        "{who}{failed}; the server builds it itself after {} s",
        w.wait.as_secs()
    )
}

/// `text` on one line: its lines joined with " … ".
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" … ")
}

/// Landing's feed entry: `paused` (with why) or `resumed` (and why), as it is after the
/// change.
fn landing_entry(at: crate::domain::Millis, paused: bool, why: &str) -> NewEntry {
    let (kind, state) = if paused {
        ("paused", "paused")
    } else {
        ("resumed", "running")
    };
    NewEntry::new(
        Topic::Landing,
        "landing",
        kind,
        at,
        format!("landing {state}: {why}"),
        serde_json::json!({ "state": state, "reason": why }),
    )
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Internal(format!("cannot encode: {e}")))
}
