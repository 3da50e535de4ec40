//! The in-memory side of runners and leases: who is connected, how many free slots each has,
//! which live leases exist and when they expire. Heartbeats touch only this (no database write);
//! the database holds the lease itself (ID and epoch, the fence) and is the source of truth
//! across restarts, when [`Registry::restore_lease`] rebuilds the live set with a fresh TTL.
//!
//! Pure data: no IO and no clock (times are passed in), so it is unit-tested directly.

use pipeline_core::sandbox::Kind;
use std::collections::{BTreeSet, HashMap};

use tokio::sync::mpsc;

use crate::domain::{Millis, Scope, TaskId};

pub use pipeline_core::ids::LeaseRef;

/// Work handed to a runner.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub lease: LeaseRef,
    pub task_id: TaskId,
    pub run_id: String,
    pub title: String,
    pub namespace: Option<String>,
    pub base: String,
    pub base_commit: pipeline_core::ids::CommitId,
    pub previous_commit: Option<pipeline_core::ids::CommitId>,
    pub patchset: u32,
    pub prompt: String,
    /// How the server verifies; the runner verifies the same way.
    pub verification: pipeline_core::verify::Verifier,
    /// What the task may still spend, in cents, when it has a cap.
    pub budget_cents: Option<f64>,
    /// The agent's session of the task's latest dev run that reported one, to resume.
    pub resume_session: Option<String>,
}

/// A train build handed to a runner (`--remote-builds`).
#[derive(Clone, Debug, PartialEq)]
pub struct BuildAssignment {
    /// The build job's fence: its ID and epoch.
    pub build: LeaseRef,
    pub commit: pipeline_core::ids::CommitId,
    pub base: String,
    pub base_commit: pipeline_core::ids::CommitId,
    pub verification: pipeline_core::verify::Verifier,
    /// (namespace, task) of each run, in order.
    pub runs: Vec<(Option<String>, Option<TaskId>)>,
}

/// What the server pushes on a runner's work stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Push {
    Assign(Box<Assignment>),
    /// Stop a lease's job, or a build job's.
    Cancel(LeaseRef),
    Build(Box<BuildAssignment>),
}

/// A build job live on a runner: fenced as a lease is (its epoch, its owner, its expiry,
/// renewed by the runner's heartbeats).
#[derive(Clone, Debug, PartialEq)]
pub struct LiveBuild {
    pub epoch: u64,
    pub runner_id: String,
    pub runner: String,
    pub commit: pipeline_core::ids::CommitId,
    pub expires_at: Millis,
}

/// A connected (or recently connected) runner.
#[derive(Debug)]
pub struct RunnerEntry {
    pub id: String,
    pub name: String,
    pub labels: Vec<String>,
    /// The work it takes (`--only-parent`, `--only-task`).
    pub scope: Scope,
    pub slots: u32,
    pub version: String,
    pub last_heartbeat: Option<Millis>,
    pub draining: bool,
    /// Drained from the control plane (`pipelinectl runners drain`): it finishes what it holds
    /// and gets nothing new until undrained, whatever it says itself.
    pub held: bool,
    /// Why the runner takes no work, when it said it is unhealthy.
    pub unhealthy: Option<String>,
    /// The sandbox its agents and builds run in, as it said at registration.
    pub sandbox: Option<Kind>,
    /// When it registered.
    pub registered_at: Millis,
    /// Whether it ever opened a work stream (one that never does is forgotten, see
    /// [`Registry::set_forget_unopened_after`]).
    opened: bool,
    /// The open work stream, with a generation so that an old stream's end does not detach
    /// a newer one.
    push: Option<(u64, mpsc::Sender<Push>)>,
    pub leases: BTreeSet<String>,
    /// The build jobs it runs (each takes a slot).
    pub builds: BTreeSet<String>,
}

impl RunnerEntry {
    pub fn connected(&self) -> bool {
        self.push.as_ref().is_some_and(|(_, tx)| !tx.is_closed())
    }

    /// Slots that may take a new lease now.
    pub fn free_slots(&self) -> u32 {
        if !self.connected() || self.draining || self.held || self.unhealthy.is_some() {
            return 0;
        }
        self.slots
            .saturating_sub((self.leases.len() + self.builds.len()) as u32)
    }

    /// Whether it may be handed a build job needing `requires` when a slot is free:
    /// connected, healthy, not drained, with the labels.
    pub fn may_build(&self, requires: &[String]) -> bool {
        self.connected()
            && !self.draining
            && !self.held
            && self.unhealthy.is_none()
            && self.slots > 0
            && crate::domain::satisfies(&self.labels, requires)
    }
}

/// A lease that is live in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveLease {
    pub task: TaskId,
    pub epoch: u64,
    pub runner_id: String,
    pub runner: String,
    pub expires_at: Millis,
    /// When it was leased (at a restart: when it was restored).
    pub leased_at: Millis,
    /// The lease's dev run, whose log the runner's dev lines go to.
    pub run_id: Option<i64>,
    /// The lease's verify run, started by the first line of the verify phase.
    pub verify_run_id: Option<i64>,
    /// The highest log line number taken for the lease (its runner numbers the lines of both
    /// its runs in one sequence); a line the server adds (a cancel) comes after it.
    pub last_seq: u64,
    /// The dev run's `run` span, from the lease to its end.
    pub span: RunSpan,
    /// The commit its runner offered before verifying it (`--early-builds`): the server may
    /// build a train with it while the runner verifies. Gone with the lease.
    pub offered: Option<Offered>,
}

/// A commit offered on a lease before its runner's verification ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offered {
    pub commit: pipeline_core::ids::CommitId,
    /// Its one parent (the base the runner worked on).
    pub parent: pipeline_core::ids::CommitId,
    pub at: Millis,
}

/// The tracing span of a lease's dev run (`run`, carrying the task's ID): open from the lease
/// until the lease ends (the runner's result, a cancel, a lapse), when the registry drops it.
#[derive(Clone, Debug)]
pub struct RunSpan(pub tracing::Span);

/// No span (a lease made in a test).
impl Default for RunSpan {
    fn default() -> Self {
        Self(tracing::Span::none())
    }
}

/// A span is not part of a lease's value.
impl PartialEq for RunSpan {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Why a runner's message about a lease is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseRefusal {
    #[error("lease {0} is not live: it lapsed, was cancelled or was never issued")]
    Unknown(String),
    #[error("lease {id} is at epoch {live}, not {given}: it was re-issued")]
    Reissued { id: String, live: u64, given: u64 },
    #[error("lease {0} belongs to another runner")]
    NotYours(String),
    #[error("lease {0} expired")]
    Expired(String),
}

/// How long a runner that registered but never opened its work stream is kept, unless the
/// server says otherwise ([`Registry::set_forget_unopened_after`]): twice the default lease TTL.
pub const FORGET_UNOPENED_AFTER: Millis = 60_000;

/// Runners and live leases.
#[derive(Debug)]
pub struct Registry {
    /// Runners that registered longer ago than this and never opened a work stream are
    /// forgotten at the next registration.
    forget_unopened_after: Millis,
    runners: HashMap<String, RunnerEntry>,
    leases: HashMap<String, LiveLease>,
    /// Build jobs live on runners, by ID.
    builds: HashMap<String, LiveBuild>,
    next_runner: u64,
    next_stream: u64,
    /// Names drained from the control plane (persisted by the coordinator).
    held: BTreeSet<String>,
}

/// What `pipelinectl runners` shows of a runner.
#[derive(Clone, Debug, PartialEq)]
pub struct RunnerView {
    pub id: String,
    pub name: String,
    pub labels: Vec<String>,
    pub scope: Scope,
    pub slots: u32,
    pub used: u32,
    pub version: String,
    pub last_heartbeat: Option<Millis>,
    pub connected: bool,
    pub draining: bool,
    pub unhealthy: Option<String>,
    pub sandbox: Option<Kind>,
    /// The build jobs it runs: (ID, commit).
    pub builds: Vec<(String, pipeline_core::ids::CommitId)>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            forget_unopened_after: FORGET_UNOPENED_AFTER,
            runners: HashMap::new(),
            leases: HashMap::new(),
            builds: HashMap::new(),
            next_runner: 0,
            next_stream: 0,
            held: BTreeSet::new(),
        }
    }
}

impl Registry {
    /// Runners that register and never open their work stream (junk, or a runner that died at
    /// once) are forgotten this long after registering, so they do not pile up.
    pub fn set_forget_unopened_after(&mut self, after: Millis) {
        self.forget_unopened_after = after.max(1);
    }

    /// Forgets the runners that registered at least `forget_unopened_after` before `now` and
    /// never opened a work stream (they hold no leases: leases go only to connected runners).
    /// Returns how many. Called at each registration: the sweep costs one pass over the
    /// runners, where registrations happen anyway, and needs no timer.
    fn forget_unopened(&mut self, now: Millis) -> usize {
        let before = self.runners.len();
        let after = self.forget_unopened_after;
        self.runners.retain(|_, r| {
            r.opened || !r.leases.is_empty() || now.saturating_sub(r.registered_at) < after
        });
        before - self.runners.len()
    }

    /// Registers a runner. A runner that registers again under a name whose previous runner is
    /// disconnected takes its place (its live leases can be re-attached by the new one).
    pub fn register(
        &mut self,
        name: &str,
        labels: Vec<String>,
        slots: u32,
        version: String,
        now: Millis,
    ) -> Result<String, String> {
        self.forget_unopened(now);
        if let Some(existing) = self.runners.values().find(|r| r.name == name) {
            if existing.connected() {
                return Err(format!(
                    "a runner named {name} is already connected; give this one another --name"
                ));
            }
            let old = existing.id.clone();
            self.runners.remove(&old);
        }
        self.next_runner += 1;
        let id = format!("r{}-{}", self.next_runner, now);
        self.runners.insert(
            id.clone(),
            RunnerEntry {
                id: id.clone(),
                name: name.to_owned(),
                labels,
                scope: Scope::default(),
                slots,
                version,
                last_heartbeat: Some(now),
                draining: false,
                held: self.held.contains(name),
                unhealthy: None,
                sandbox: None,
                registered_at: now,
                opened: false,
                push: None,
                leases: BTreeSet::new(),
                builds: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    /// Limits the runner `id` to some work (what it said at registration).
    pub fn set_scope(&mut self, id: &str, scope: Scope) {
        if let Some(r) = self.runners.get_mut(id) {
            r.scope = scope;
        }
    }

    pub fn set_sandbox(&mut self, id: &str, sandbox: Option<Kind>) {
        if let Some(r) = self.runners.get_mut(id) {
            r.sandbox = sandbox;
        }
    }

    pub fn runner(&self, id: &str) -> Option<&RunnerEntry> {
        self.runners.get(id)
    }

    pub fn runner_mut(&mut self, id: &str) -> Option<&mut RunnerEntry> {
        self.runners.get_mut(id)
    }

    /// Attaches a work stream; returns its generation.
    pub fn attach(
        &mut self,
        runner_id: &str,
        tx: mpsc::Sender<Push>,
        draining: bool,
        unhealthy: Option<String>,
    ) -> Option<u64> {
        self.next_stream += 1;
        let generation = self.next_stream;
        let runner = self.runners.get_mut(runner_id)?;
        runner.opened = true;
        runner.push = Some((generation, tx));
        runner.draining = draining;
        runner.unhealthy = unhealthy;
        Some(generation)
    }

    /// Detaches the work stream of `generation`, if it is still the current one.
    /// Returns whether it did (a newer stream of the runner is left alone).
    pub fn detach(&mut self, runner_id: &str, generation: u64) -> bool {
        if let Some(runner) = self.runners.get_mut(runner_id)
            && runner.push.as_ref().is_some_and(|(g, _)| *g == generation)
        {
            runner.push = None;
            return true;
        }
        false
    }

    /// Sends `push` to a runner; false if it has no open stream (or the stream is full).
    pub fn push(&self, runner_id: &str, push: Push) -> bool {
        self.runners
            .get(runner_id)
            .and_then(|r| r.push.as_ref())
            .is_some_and(|(_, tx)| tx.try_send(push).is_ok())
    }

    /// Re-attaches a lease a runner reports holding after a reconnect: kept if it is live at the
    /// same epoch and its owner is this runner or a runner of the same name that is gone.
    pub fn reattach(
        &mut self,
        runner_id: &str,
        lease: &LeaseRef,
        now: Millis,
        ttl: Millis,
    ) -> bool {
        let Some(name) = self.runners.get(runner_id).map(|r| r.name.clone()) else {
            return false;
        };
        let Some(live) = self.leases.get(&lease.id) else {
            return false;
        };
        if live.epoch != lease.epoch || live.expires_at <= now {
            return false;
        }
        let owner_ok = live.runner_id == runner_id
            || (live.runner == name
                && self
                    .runners
                    .get(&live.runner_id)
                    .is_none_or(|r| !r.connected()));
        if !owner_ok {
            return false;
        }
        let old_owner = live.runner_id.clone();
        if let Some(old) = self.runners.get_mut(&old_owner) {
            old.leases.remove(&lease.id);
        }
        if let Some(live) = self.leases.get_mut(&lease.id) {
            live.runner_id = runner_id.to_owned();
            live.expires_at = now + ttl;
        }
        if let Some(runner) = self.runners.get_mut(runner_id) {
            runner.leases.insert(lease.id.clone());
        }
        true
    }

    /// Records a heartbeat: renews the runner's leases it reports and returns those it reports
    /// but must drop. `None` if the runner is unknown.
    pub fn heartbeat(
        &mut self,
        runner_id: &str,
        held: &[LeaseRef],
        draining: bool,
        unhealthy: Option<String>,
        now: Millis,
        ttl: Millis,
    ) -> Option<Vec<LeaseRef>> {
        let runner = self.runners.get_mut(runner_id)?;
        runner.last_heartbeat = Some(now);
        runner.draining = draining;
        runner.unhealthy = unhealthy;
        let mut dropped = Vec::new();
        for lease in held {
            match self.leases.get_mut(&lease.id) {
                Some(live)
                    if live.epoch == lease.epoch
                        && live.runner_id == runner_id
                        && live.expires_at > now =>
                {
                    live.expires_at = now + ttl;
                }
                None if self.builds.get(&lease.id).is_some_and(|b| {
                    b.epoch == lease.epoch && b.runner_id == runner_id && b.expires_at > now
                }) =>
                {
                    if let Some(b) = self.builds.get_mut(&lease.id) {
                        b.expires_at = now + ttl;
                    }
                }
                _ => dropped.push(lease.clone()),
            }
        }
        Some(dropped)
    }

    /// Checks that `lease` is live, at this epoch, and `runner_id`'s.
    pub fn check(
        &self,
        runner_id: &str,
        lease: &LeaseRef,
        now: Millis,
    ) -> Result<&LiveLease, LeaseRefusal> {
        let live = self
            .leases
            .get(&lease.id)
            .ok_or_else(|| LeaseRefusal::Unknown(lease.id.clone()))?;
        if live.epoch != lease.epoch {
            return Err(LeaseRefusal::Reissued {
                id: lease.id.clone(),
                live: live.epoch,
                given: lease.epoch,
            });
        }
        if live.runner_id != runner_id {
            return Err(LeaseRefusal::NotYours(lease.id.clone()));
        }
        if live.expires_at <= now {
            return Err(LeaseRefusal::Expired(lease.id.clone()));
        }
        Ok(live)
    }

    /// A live lease.
    /// Every live lease.
    pub fn leases(&self) -> impl Iterator<Item = &LiveLease> {
        self.leases.values()
    }

    pub fn lease(&self, id: &str) -> Option<&LiveLease> {
        self.leases.get(id)
    }

    /// A live lease, to change.
    pub fn lease_mut(&mut self, id: &str) -> Option<&mut LiveLease> {
        self.leases.get_mut(id)
    }

    /// Takes the log line numbers up to `seq` for a live lease.
    pub fn note_seq(&mut self, lease_id: &str, seq: u64) {
        if let Some(live) = self.leases.get_mut(lease_id) {
            live.last_seq = live.last_seq.max(seq);
        }
    }

    /// Notes the verify run of a live lease; false if the lease is gone.
    pub fn set_verify_run(&mut self, lease_id: &str, run_id: i64) -> bool {
        match self.leases.get_mut(lease_id) {
            Some(live) => {
                live.verify_run_id = Some(run_id);
                true
            }
            None => false,
        }
    }

    /// Adds a live lease owned by `runner_id`.
    pub fn add_lease(&mut self, id: String, live: LiveLease) {
        if let Some(runner) = self.runners.get_mut(&live.runner_id) {
            runner.leases.insert(id.clone());
        }
        self.leases.insert(id, live);
    }

    /// Rebuilds a lease from the database at start-up; it lives for one TTL unless a runner
    /// re-attaches it.
    pub fn restore_lease(&mut self, id: String, live: LiveLease) {
        self.leases.insert(id, live);
    }

    /// Forgets a lease; returns it if it was live.
    pub fn remove_lease(&mut self, id: &str) -> Option<LiveLease> {
        let live = self.leases.remove(id)?;
        if let Some(runner) = self.runners.get_mut(&live.runner_id) {
            runner.leases.remove(id);
        }
        Some(live)
    }

    /// Every live lease: (task, runner name, when it was leased), oldest first.
    pub fn running(&self) -> Vec<(TaskId, String, Millis)> {
        let mut running: Vec<(TaskId, String, Millis)> = self
            .leases
            .values()
            .map(|l| (l.task.clone(), l.runner.clone(), l.leased_at))
            .collect();
        running.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.cmp(&b.0)));
        running
    }

    /// The leases whose time is up.
    pub fn expired(&self, now: Millis) -> Vec<(String, LiveLease)> {
        self.leases
            .iter()
            .filter(|(_, l)| l.expires_at <= now)
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect()
    }

    /// When the next lease expires.
    pub fn next_expiry(&self) -> Option<Millis> {
        self.leases.values().map(|l| l.expires_at).min()
    }

    /// Runners with free slots, most free first.
    pub fn free_slots(&self) -> Vec<super::planner::Slot> {
        let mut free: Vec<super::planner::Slot> = self
            .runners
            .values()
            .filter(|r| r.free_slots() > 0)
            .map(|r| super::planner::Slot {
                runner_id: r.id.clone(),
                runner: r.name.clone(),
                free: r.free_slots(),
                labels: r.labels.clone(),
                scope: r.scope.clone(),
            })
            .collect();
        free.sort_by(|a, b| b.free.cmp(&a.free).then(a.runner.cmp(&b.runner)));
        free
    }

    /// Every runner, by name.
    /// Holds (or lets go of) the runner named `name`: held, it keeps what it has and gets
    /// nothing new, now and whenever it registers again. Returns whether a runner of that
    /// name is known now.
    pub fn hold(&mut self, name: &str, held: bool) -> bool {
        if held {
            self.held.insert(name.to_owned());
        } else {
            self.held.remove(name);
        }
        let mut known = false;
        for r in self.runners.values_mut().filter(|r| r.name == name) {
            r.held = held;
            known = true;
        }
        known
    }

    pub fn runners(&self) -> Vec<RunnerView> {
        let mut all: Vec<RunnerView> = self
            .runners
            .values()
            .map(|r| RunnerView {
                id: r.id.clone(),
                name: r.name.clone(),
                labels: r.labels.clone(),
                scope: r.scope.clone(),
                slots: r.slots,
                used: (r.leases.len() + r.builds.len()) as u32,
                version: r.version.clone(),
                last_heartbeat: r.last_heartbeat,
                connected: r.connected(),
                draining: r.draining || r.held,
                unhealthy: r.unhealthy.clone(),
                sandbox: r.sandbox,
                builds: r
                    .builds
                    .iter()
                    .filter_map(|id| self.builds.get(id).map(|b| (id.clone(), b.commit.clone())))
                    .collect(),
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Disconnects every runner called `name` and forgets them; returns their live leases, or
    /// `None` if there was no such runner.
    pub fn disconnect(&mut self, name: &str) -> Option<Vec<(String, LiveLease)>> {
        let ids: Vec<String> = self
            .runners
            .values()
            .filter(|r| r.name == name)
            .map(|r| r.id.clone())
            .collect();
        if ids.is_empty() {
            return None;
        }
        let mut leases = Vec::new();
        for id in ids {
            if let Some(runner) = self.runners.remove(&id) {
                for lease in runner.leases {
                    if let Some(live) = self.leases.get(&lease) {
                        leases.push((lease.clone(), live.clone()));
                    }
                }
            }
        }
        Some(leases)
    }

    /// Forgets every runner called `name` that is not connected; true if there was one. Their
    /// live leases stay until they lapse.
    pub fn forget(&mut self, name: &str) -> bool {
        let before = self.runners.len();
        self.runners.retain(|_, r| r.name != name || r.connected());
        self.runners.len() < before
    }

    /// Adds a build job live on `live.runner_id`.
    pub fn add_build(&mut self, id: String, live: LiveBuild) {
        if let Some(runner) = self.runners.get_mut(&live.runner_id) {
            runner.builds.insert(id.clone());
        }
        self.builds.insert(id, live);
    }

    /// Forgets a build job; returns it if it was live.
    pub fn remove_build(&mut self, id: &str) -> Option<LiveBuild> {
        let live = self.builds.remove(id)?;
        if let Some(runner) = self.runners.get_mut(&live.runner_id) {
            runner.builds.remove(id);
        }
        Some(live)
    }

    /// Checks that build job `build` is live, at this epoch, and `runner_id`'s.
    pub fn check_build(
        &self,
        runner_id: &str,
        build: &LeaseRef,
        now: Millis,
    ) -> Result<&LiveBuild, LeaseRefusal> {
        let live = self
            .builds
            .get(&build.id)
            .ok_or_else(|| LeaseRefusal::Unknown(build.id.clone()))?;
        if live.epoch != build.epoch {
            return Err(LeaseRefusal::Reissued {
                id: build.id.clone(),
                live: live.epoch,
                given: build.epoch,
            });
        }
        if live.runner_id != runner_id {
            return Err(LeaseRefusal::NotYours(build.id.clone()));
        }
        if live.expires_at <= now {
            return Err(LeaseRefusal::Expired(build.id.clone()));
        }
        Ok(live)
    }

    /// Whether `id` names a build job live now.
    pub fn is_build(&self, id: &str) -> bool {
        self.builds.contains_key(id)
    }

    /// The build jobs of runner `runner_id` (its stream ended, it was drained or cut off).
    pub fn builds_of(&self, runner_id: &str) -> Vec<String> {
        self.runners
            .get(runner_id)
            .map(|r| r.builds.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The build jobs whose time is up.
    pub fn expired_builds(&self, now: Millis) -> Vec<String> {
        self.builds
            .iter()
            .filter(|(_, b)| b.expires_at <= now)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// When the next build job expires.
    pub fn next_build_expiry(&self) -> Option<Millis> {
        self.builds.values().map(|b| b.expires_at).min()
    }

    /// Runners that may take a build job needing `requires` now (a free slot), most free
    /// first, less those in `avoid`.
    pub fn build_slots(&self, requires: &[String], avoid: &[String]) -> Vec<String> {
        let mut free: Vec<(&RunnerEntry, u32)> = self
            .runners
            .values()
            .filter(|r| r.may_build(requires) && !avoid.contains(&r.name))
            .map(|r| (r, r.free_slots()))
            .filter(|(_, f)| *f > 0)
            .collect();
        free.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.name.cmp(&b.0.name)));
        free.into_iter().map(|(r, _)| r.id.clone()).collect()
    }

    /// Slots of the runners that may build for `requires` (busy or not), less those in
    /// `avoid`.
    pub fn build_capacity(&self, requires: &[String], avoid: &[String]) -> u32 {
        self.runners
            .values()
            .filter(|r| r.may_build(requires) && !avoid.contains(&r.name))
            .map(|r| r.slots)
            .sum()
    }

    /// Number of runners with an open work stream.
    pub fn connected_count(&self) -> usize {
        self.runners.values().filter(|r| r.connected()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Millis = 30_000;

    fn lease(id: &str, epoch: u64) -> LeaseRef {
        LeaseRef {
            id: id.into(),
            epoch,
        }
    }

    fn live(runner_id: &str, name: &str, epoch: u64, expires_at: Millis) -> LiveLease {
        LiveLease {
            task: TaskId::parse("t-1").expect("id"),
            epoch,
            runner_id: runner_id.into(),
            runner: name.into(),
            expires_at,
            leased_at: 0,
            run_id: None,
            verify_run_id: None,
            last_seq: 0,
            span: RunSpan::default(),
            offered: None,
        }
    }

    fn connected(reg: &mut Registry, name: &str, slots: u32) -> (String, mpsc::Receiver<Push>) {
        let id = reg
            .register(name, vec![], slots, "1".into(), 0)
            .expect("register");
        let (tx, rx) = mpsc::channel(8);
        reg.attach(&id, tx, false, None).expect("attach");
        (id, rx)
    }

    fn live_build(runner_id: &str, name: &str, epoch: u64, expires_at: Millis) -> LiveBuild {
        LiveBuild {
            epoch,
            runner_id: runner_id.into(),
            runner: name.into(),
            commit: pipeline_core::ids::CommitId::parse(&"a".repeat(40)).expect("commit"),
            expires_at,
        }
    }

    #[test]
    fn a_build_job_takes_a_slot_and_is_fenced_like_a_lease() {
        let mut reg = Registry::default();
        let (a, _rx_a) = connected(&mut reg, "a", 1);
        let labelled = reg
            .register("b", vec!["builder".into()], 2, "1".into(), 0)
            .expect("b");
        let (tx, _rx_b) = mpsc::channel(8);
        reg.attach(&labelled, tx, false, None).expect("attach");
        let builder = vec!["builder".to_owned()];
        // Routed by label; a runner that failed the build is passed over.
        assert_eq!(reg.build_slots(&builder, &[]), vec![labelled.clone()]);
        assert_eq!(reg.build_capacity(&builder, &[]), 2);
        assert_eq!(reg.build_capacity(&builder, &["b".to_owned()]), 0);
        assert_eq!(reg.build_slots(&[], &[]).len(), 2);

        reg.add_build("build-1".into(), live_build(&a, "a", 7, 100));
        assert_eq!(reg.runner(&a).map(RunnerEntry::free_slots), Some(0));
        assert!(reg.build_slots(&[], &[]).iter().all(|id| *id != a), "full");
        assert_eq!(
            reg.runners().iter().find(|r| r.id == a).map(|r| r.used),
            Some(1)
        );
        // Renewed by its own runner's heartbeat at its epoch; anything else is dropped.
        let dropped = reg
            .heartbeat(
                &a,
                &[lease("build-1", 7), lease("build-1", 6)],
                false,
                None,
                50,
                TTL,
            )
            .expect("known");
        assert_eq!(dropped, vec![lease("build-1", 6)]);
        assert!(
            reg.check_build(&a, &lease("build-1", 7), 50 + TTL - 1)
                .is_ok()
        );
        assert_eq!(
            reg.check_build(&a, &lease("build-1", 6), 60),
            Err(LeaseRefusal::Reissued {
                id: "build-1".into(),
                live: 7,
                given: 6
            })
        );
        assert_eq!(
            reg.check_build(&labelled, &lease("build-1", 7), 60),
            Err(LeaseRefusal::NotYours("build-1".into()))
        );
        assert_eq!(
            reg.check_build(&a, &lease("build-1", 7), 50 + TTL),
            Err(LeaseRefusal::Expired("build-1".into()))
        );
        assert_eq!(reg.expired_builds(50 + TTL), vec!["build-1".to_owned()]);
        assert_eq!(reg.builds_of(&a), vec!["build-1".to_owned()]);
        assert!(reg.remove_build("build-1").is_some());
        assert_eq!(
            reg.check_build(&a, &lease("build-1", 7), 60),
            Err(LeaseRefusal::Unknown("build-1".into()))
        );
        assert_eq!(reg.runner(&a).map(RunnerEntry::free_slots), Some(1));
        // A drained runner takes no build jobs.
        reg.hold("b", true);
        assert_eq!(reg.build_capacity(&builder, &[]), 0);
    }

    #[test]
    fn slots_count_only_connected_undrained_runners() {
        let mut reg = Registry::default();
        let (a, _rx_a) = connected(&mut reg, "a", 2);
        let b = reg.register("b", vec![], 4, "1".into(), 0).expect("b");
        assert_eq!(
            reg.free_slots(),
            vec![super::super::planner::Slot {
                runner_id: a.clone(),
                runner: "a".into(),
                free: 2,
                labels: vec![],
                scope: Scope::default(),
            }]
        );
        reg.add_lease("L1".into(), live(&a, "a", 1, 100));
        assert_eq!(reg.free_slots()[0].free, 1);
        assert!(
            reg.heartbeat(&a, &[lease("L1", 1)], true, None, 10, TTL)
                .is_some()
        );
        assert!(reg.free_slots().is_empty(), "draining takes no work");
        assert!(
            reg.runner(&b).is_some_and(|r| r.free_slots() == 0),
            "not connected"
        );
    }

    #[test]
    fn a_connected_name_cannot_be_taken_but_a_gone_one_can() {
        let mut reg = Registry::default();
        let (a, rx) = connected(&mut reg, "a", 1);
        let err = reg
            .register("a", vec![], 1, "1".into(), 5)
            .expect_err("taken");
        assert!(err.contains("already connected"));
        drop(rx);
        let again = reg.register("a", vec![], 1, "1".into(), 6).expect("gone");
        assert_ne!(again, a);
        assert_eq!(reg.runners().len(), 1);
    }

    #[test]
    fn heartbeats_renew_own_live_leases_and_drop_the_rest() {
        let mut reg = Registry::default();
        let (a, _rx) = connected(&mut reg, "a", 2);
        let (b, _rx_b) = connected(&mut reg, "b", 2);
        reg.add_lease("L1".into(), live(&a, "a", 3, 1_000));
        reg.add_lease("L2".into(), live(&b, "b", 1, 1_000));
        let dropped = reg
            .heartbeat(
                &a,
                &[
                    lease("L1", 3),
                    lease("L2", 1),
                    lease("L1", 2),
                    lease("L9", 1),
                ],
                false,
                None,
                500,
                TTL,
            )
            .expect("known");
        assert_eq!(
            dropped,
            vec![lease("L2", 1), lease("L1", 2), lease("L9", 1)]
        );
        assert_eq!(
            reg.check(&a, &lease("L1", 3), 600).map(|l| l.expires_at),
            Ok(500 + TTL)
        );
        assert!(reg.heartbeat("nobody", &[], false, None, 1, TTL).is_none());
    }

    #[test]
    fn checks_fence_by_epoch_owner_and_expiry() {
        let mut reg = Registry::default();
        let (a, _rx) = connected(&mut reg, "a", 2);
        reg.add_lease("L1".into(), live(&a, "a", 2, 1_000));
        assert!(reg.check(&a, &lease("L1", 2), 999).is_ok());
        assert!(matches!(
            reg.check(&a, &lease("L1", 1), 0),
            Err(LeaseRefusal::Reissued { .. })
        ));
        assert!(matches!(
            reg.check("x", &lease("L1", 2), 0),
            Err(LeaseRefusal::NotYours(_))
        ));
        assert!(matches!(
            reg.check(&a, &lease("L1", 2), 1_000),
            Err(LeaseRefusal::Expired(_))
        ));
        assert!(matches!(
            reg.check(&a, &lease("L0", 2), 0),
            Err(LeaseRefusal::Unknown(_))
        ));
        assert_eq!(reg.expired(1_000).len(), 1);
        assert_eq!(reg.next_expiry(), Some(1_000));
        assert!(reg.remove_lease("L1").is_some());
        assert!(reg.runner(&a).is_some_and(|r| r.leases.is_empty()));
        assert_eq!(reg.next_expiry(), None);
    }

    #[test]
    fn a_re_registered_runner_re_attaches_its_leases() {
        let mut reg = Registry::default();
        // After a server restart the lease is restored with an owner nobody knows.
        reg.restore_lease("L1".into(), live("old-id", "a", 4, 1_000));
        let (a, _rx) = connected(&mut reg, "a", 1);
        assert!(!reg.reattach(&a, &lease("L1", 3), 10, TTL), "wrong epoch");
        assert!(reg.reattach(&a, &lease("L1", 4), 10, TTL));
        assert!(reg.check(&a, &lease("L1", 4), 20).is_ok());
        assert_eq!(reg.runner(&a).map(|r| r.leases.len()), Some(1));
        // Another runner cannot take it while its owner is connected.
        let (b, _rx_b) = connected(&mut reg, "b", 1);
        assert!(!reg.reattach(&b, &lease("L1", 4), 10, TTL));
    }

    #[test]
    fn registrations_forget_runners_that_never_opened_their_stream() {
        let mut reg = Registry::default();
        reg.set_forget_unopened_after(1_000);
        let junk = reg
            .register("junk", vec![], 1, "1".into(), 0)
            .expect("junk");
        let (worker, rx) = connected(&mut reg, "worker", 1);
        // A runner that opened its stream and lost it stays (it may come back for its leases).
        drop(rx);
        reg.register("young", vec![], 1, "1".into(), 500)
            .expect("young");
        assert!(reg.runner(&junk).is_some(), "not yet");
        reg.register("later", vec![], 1, "1".into(), 1_000)
            .expect("later");
        assert!(reg.runner(&junk).is_none(), "forgotten");
        assert!(reg.runner(&worker).is_some(), "it opened its stream once");
        let names: Vec<String> = reg.runners().into_iter().map(|r| r.name).collect();
        assert_eq!(names, vec!["later", "worker", "young"]);
    }

    #[test]
    fn an_old_stream_ending_does_not_detach_a_newer_one() {
        let mut reg = Registry::default();
        let id = reg.register("a", vec![], 1, "1".into(), 0).expect("a");
        let (tx1, _rx1) = mpsc::channel(1);
        let g1 = reg.attach(&id, tx1, false, None).expect("attach");
        let (tx2, mut rx2) = mpsc::channel(1);
        reg.attach(&id, tx2, false, None).expect("attach");
        reg.detach(&id, g1);
        assert!(reg.push(&id, Push::Cancel(lease("L", 1))));
        assert_eq!(rx2.try_recv().ok(), Some(Push::Cancel(lease("L", 1))));
    }
}
