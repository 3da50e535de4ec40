//! The coordinator: the one owner of task state, and the one place that commits a change to it
//! and carries out what follows.
//!
//! Every change goes through one path: read the task, [`Coordinator::decide`] with the pure
//! [`lifecycle::apply`] (a [`Decision`]: the write and its effects), shape the write (a lease,
//! runs, a commit), [`Coordinator::commit`] it by compare-and-swap on the task's version (a lost
//! race is re-decided on a fresh read), and only then, in [`Coordinator::committed`], change
//! memory (the registry, the counts), publish the transition and carry out the effects. Leases
//! go through it too, many in one transaction.
//!
//! - [`tasks`]: the control API (create, list, show, cancel, retry, dependencies, status).
//! - [`runners`]: the runner API (register, work stream, heartbeats, results, logs).
//! - [`dispatch`]: the dispatch loop, which expires lapsed leases and hands out new ones.
//! - [`queue`]: the queue as a whole (the merge train and what waits behind it, pauses).
//! - [`integration`]: what the integrator asks of the coordinator (its runs, a train's life,
//!   the journal of base moves, what landing knows).
//! - [`offers`]: commits runners offer before their verification ends (`--early-builds`).
//! - [`recovery`]: what start-up finds (leases to restore, lost landings, task IDs in use).

pub mod builds;
pub mod dispatch;
pub mod integration;
mod noted;
pub mod offers;
pub mod queue;
pub mod recovery;
pub mod runners;
pub mod tasks;
mod wakeups;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use pipeline_core::clock::Clock;
use pipeline_core::git::{BranchName, RemoteName};
use pipeline_core::verify::Verifier;

use crate::domain::{
    EventKind, FailureKind, Millis, Phase, RunEnd, RunStatus, StatusCounts, Task, TaskStatus,
};
use crate::error::{Error, Result};
use crate::landing::Landing;
use crate::lifecycle::{self, Effect, Event, Policy};
use crate::logs::LogHub;
use crate::ports::Repository;
use crate::scheduler::registry::{LeaseRef, Push, Registry};
use crate::store::{Committed, NewEvent, RunChanges, Store, TaskRecord, TaskWrite};
use crate::usage::LastDay;

pub use runners::{Attached, LeaseResult, Registered, RunnerHello, unregistered};
pub use tasks::{Listed, Page, RunnerInfo, RunnerState, ServerRole, Status, TaskDetail};

/// How many times a transition is re-decided after losing a race to another writer.
const MAX_CAS_ATTEMPTS: usize = 8;

/// What the coordinator needs besides its store.
#[derive(Clone, Debug)]
pub struct Settings {
    pub policy: Policy,
    /// The base branch.
    pub base: BranchName,
    /// Where incoming bundles are spooled.
    pub spool_dir: PathBuf,
    /// A lease's lifetime without a heartbeat.
    pub lease_ttl_ms: Millis,
    /// The largest bundle a runner may send.
    pub max_bundle_bytes: u64,
    /// How the server verifies an integrated commit.
    pub verifier: Verifier,
    /// SIGTERM → SIGKILL delay when a build is stopped.
    pub kill_grace: std::time::Duration,
    /// The worktree where integrated commits are built.
    pub integration_dir: PathBuf,
    /// The remote the base is pushed to after each integration.
    pub push_remote: Option<RemoteName>,
    /// A run's log beyond this many bytes keeps its head and tail only.
    pub log_cap_bytes: u64,
    /// The environment integration builds start from (the allow-listed variables).
    pub build_env: Vec<(String, String)>,
    /// The sandbox integration builds run in.
    pub sandbox: pipeline_core::sandbox::Sandbox,
    /// The integration build's temp dir (its `TMPDIR`, emptied before each build).
    pub build_tmp: PathBuf,
    /// Leases committed per database transaction (1 = one transaction per lease).
    pub dispatch_batch: usize,
    /// The most tasks one merge train takes.
    pub batch_max: usize,
    /// The dev prompt's template (`--prompt-template`, else the built-in one).
    pub prompt: Arc<crate::prompt::PromptTemplate>,
    /// Whether a runner's verified tree may stand in for the server's build (`when-needed`)
    /// or never (`always`).
    pub verify_on_server: crate::config::VerifyOnServer,
    /// Whether runners' commits are taken before their verification ends (`--early-builds`,
    /// [`offers`]).
    pub early_builds: bool,
}

/// A run's outcome as `pipeline_runs_total` counts it: a failure nobody is charged for is
/// `infrastructure`, but a person's cancel (`cancelled`), `cancelled`.
pub(crate) fn run_outcome(
    status: RunStatus,
    kind: Option<FailureKind>,
    cancelled: bool,
) -> &'static str {
    match (status, kind) {
        (RunStatus::Success | RunStatus::Running, _) => "success",
        (RunStatus::Failure, Some(FailureKind::Task)) => "task_failure",
        (RunStatus::Failure, Some(FailureKind::Infrastructure)) => "infrastructure",
        (RunStatus::Failure, None) if cancelled => "cancelled",
        (RunStatus::Failure, None) => "infrastructure",
    }
}

/// When each verify and integrate run in flight began, by run ID: as many entries as runs in
/// flight (the slots' verifications, a train's members), each gone when its run ends.
#[derive(Debug, Default)]
pub(crate) struct RunClocks {
    running: std::collections::HashMap<i64, (crate::domain::TaskId, Phase, Millis)>,
}

impl RunClocks {
    pub(crate) fn start(
        &mut self,
        id: i64,
        task: &crate::domain::TaskId,
        phase: Phase,
        at: Millis,
    ) {
        self.running.insert(id, (task.clone(), phase, at));
    }

    /// The run `id` ended: its task, phase and start, if it was in flight.
    pub(crate) fn end(&mut self, id: i64) -> Option<(crate::domain::TaskId, Phase, Millis)> {
        self.running.remove(&id)
    }

    /// Every run of `task` in flight ended: their phases and starts.
    pub(crate) fn end_all(&mut self, task: &crate::domain::TaskId) -> Vec<(Phase, Millis)> {
        let ids: Vec<i64> = self
            .running
            .iter()
            .filter(|(_, (t, ..))| t == task)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.running.remove(&id))
            .map(|(_, phase, at)| (phase, at))
            .collect()
    }
}

/// A change decided on a task as it was read: the write to commit and what to do once it is.
#[derive(Clone, Debug)]
pub struct Decision {
    /// The task the decision was made on.
    pub before: Task,
    pub write: TaskWrite,
    pub effects: Vec<Effect>,
}

/// The coordinator's domain API over a [`Store`] and a [`Repository`]: tasks, runners, leases.
pub struct Coordinator<S, R> {
    store: S,
    settings: Settings,
    /// The canonical repository, through the middle layer's port.
    repo: R,
    clock: Arc<dyn Clock>,
    registry: Mutex<Registry>,
    /// The writes whose memory has not followed yet: the dispatcher and the integrator, woken
    /// by the feed, wait for them before they read memory ([`wakeups`]).
    following: wakeups::Following,
    /// Run logs and live transitions.
    logs: Arc<LogHub>,
    /// Credentials and roles.
    auth: crate::auth::Auth,
    /// Task counts kept in step with every committed change, so `status` reads no database;
    /// `None` until [`Coordinator::load_counts`].
    counts: Mutex<Option<StatusCounts>>,
    /// Moves on each time the counts were held to change: the change feed is published as
    /// the store commits, before memory follows, so a follower that reads the counts on an
    /// entry (`--exit-when-idle`) also waits for this.
    counts_moved: tokio::sync::watch::Sender<u64>,
    /// The landing side: pauses, the train now, recent trains.
    landing: Mutex<Landing>,
    /// What the runs that ended over the last day cost, kept in step with every committed
    /// change (loaded with the counts), so `status` reads no database.
    last_day: Mutex<LastDay>,
    /// The digest of the server's verification ([`Verifier::digest`]).
    verify_digest: String,
    /// When each verify and integrate run in flight began (they end by ID, or with their
    /// task's other runs), for `pipeline_run_duration_seconds`.
    run_clocks: Mutex<RunClocks>,
    /// The project's instructions for agents (`AGENTS.md`) at the last base commit a prompt
    /// was built on: read once per base commit, not once per lease.
    instructions: tokio::sync::Mutex<Option<(pipeline_core::ids::CommitId, Option<Arc<str>>)>>,
    /// The queue of the feed entries of changes that live in memory only and happen where
    /// nothing may wait on the database (a runner's work stream ending, its health told in a
    /// heartbeat): one task records them, each in a transaction of its own, in the order
    /// they happened (started on first use; bounded, [`noted`]).
    noted: std::sync::OnceLock<noted::NoteQueue>,
    /// What the `--webhook` endpoints are doing, for `status` (set once at start-up).
    webhooks: std::sync::OnceLock<Arc<crate::webhooks::Board>>,
    /// This server's leadership and the URL clients reach it at (set once at start-up; unset,
    /// the server leads alone, in term 1).
    leadership: std::sync::OnceLock<(crate::leader::Leadership, String)>,
    /// The build jobs for runners (`--remote-builds`), submitted and not ended.
    builds: Mutex<builds::BuildBoard>,
    /// Wakes the dispatch loop when a build job waits or ends.
    build_wake: tokio::sync::Notify,
    /// The epoch of every build job of this run of the server (its start, in milliseconds):
    /// a runner's answer for a job of an earlier run is refused.
    build_epoch: u64,
    /// Moves on each time a runner offers a commit before verifying it ([`offers`]).
    offers_moved: tokio::sync::watch::Sender<u64>,
    /// Moves on each time landing's state changes (paused, running again).
    landing_moved: tokio::sync::watch::Sender<u64>,
}

/// The task counts, held; when let go after a change (a mutable borrow), whoever waits on
/// [`Coordinator::counts_moved`] is told.
struct CountsGuard<'a> {
    counts: MutexGuard<'a, Option<StatusCounts>>,
    moved: &'a tokio::sync::watch::Sender<u64>,
    changed: bool,
}

impl std::ops::Deref for CountsGuard<'_> {
    type Target = Option<StatusCounts>;
    fn deref(&self) -> &Option<StatusCounts> {
        &self.counts
    }
}

impl std::ops::DerefMut for CountsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Option<StatusCounts> {
        self.changed = true;
        &mut self.counts
    }
}

impl Drop for CountsGuard<'_> {
    fn drop(&mut self) {
        if self.changed {
            self.moved.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

impl<S: Store, R: Repository> Coordinator<S, R> {
    /// Records `entry`, a change that lives in memory only, in the feed without waiting:
    /// queued to one task that writes each in a transaction of its own, in order. One that
    /// cannot be written is only logged (the change itself has happened); one that finds the
    /// queue full is dropped and counted ([`noted`]).
    pub(crate) fn note(&self, entry: crate::feed::NewEntry) {
        self.noted
            .get_or_init(|| noted::NoteQueue::start(self.store.clone()))
            .push(entry);
    }

    pub fn new(
        store: S,
        settings: Settings,
        repo: R,
        auth: crate::auth::Auth,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            verify_digest: settings.verifier.digest(),
            auth,
            logs: Arc::new(LogHub::new(settings.log_cap_bytes)),
            store,
            settings,
            repo,
            registry: Mutex::new(Registry::default()),
            following: wakeups::Following::default(),
            noted: std::sync::OnceLock::new(),
            counts: Mutex::new(None),
            counts_moved: tokio::sync::watch::Sender::new(0),
            landing: Mutex::new(Landing::default()),
            last_day: Mutex::new(LastDay::default()),
            instructions: tokio::sync::Mutex::new(None),
            webhooks: std::sync::OnceLock::new(),
            leadership: std::sync::OnceLock::new(),
            run_clocks: Mutex::new(RunClocks::default()),
            builds: Mutex::new(builds::BuildBoard::default()),
            build_wake: tokio::sync::Notify::new(),
            build_epoch: u64::try_from(clock.now_ms()).unwrap_or(0),
            offers_moved: tokio::sync::watch::Sender::new(0),
            landing_moved: tokio::sync::watch::Sender::new(0),
            clock,
        }
    }

    /// Shows the webhooks' board in `status` (once, at start-up).
    pub fn set_webhooks(&self, board: Arc<crate::webhooks::Board>) {
        let _ = self.webhooks.set(board);
    }

    /// Sets this server's leadership, and `advertise`, the URL clients reach it at (once, at
    /// start-up).
    pub fn set_leadership(&self, leadership: crate::leader::Leadership, advertise: String) {
        let _ = self.leadership.set((leadership, advertise));
    }

    /// This server's leadership: alone with its database, the leader for good.
    pub fn leadership(&self) -> crate::leader::Leadership {
        self.leadership
            .get()
            .map_or_else(crate::leader::Leadership::sole, |(l, _)| l.clone())
    }

    /// Where a task's commit is kept before its result is acknowledged, besides this server's
    /// repository: the push remote, when several servers may share the database (issue 28),
    /// so that a new leader can integrate what the old one accepted.
    pub(crate) fn patches_remote(&self) -> Option<&RemoteName> {
        let elected = self.leadership.get().is_some_and(|(l, _)| l.is_elected());
        self.settings.push_remote.as_ref().filter(|_| elected)
    }

    /// The server's role as `status` shows it: leader or standby, the term, and the leader's
    /// URL (its own when it leads).
    pub fn server_role(&self) -> ServerRole {
        let (role, advertise) = match self.leadership.get() {
            Some((l, advertise)) => (l.role(), Some(advertise.clone())),
            None => (crate::leader::Role::Leader { term: 1 }, None),
        };
        match role {
            crate::leader::Role::Leader { term } => ServerRole {
                role: "leader",
                term,
                leader: advertise,
            },
            crate::leader::Role::Standby { leader_url } => ServerRole {
                role: "standby",
                term: 0,
                leader: leader_url,
            },
        }
    }

    /// Every webhook endpoint, as `status` shows it.
    pub fn webhooks(&self) -> Vec<crate::webhooks::EndpointStatus> {
        self.webhooks
            .get()
            .map(|b| b.snapshot())
            .unwrap_or_default()
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn policy(&self) -> &Policy {
        &self.settings.policy
    }

    pub fn repo(&self) -> &R {
        &self.repo
    }

    pub fn logs(&self) -> &Arc<LogHub> {
        &self.logs
    }

    pub fn auth(&self) -> &crate::auth::Auth {
        &self.auth
    }

    /// Now, by the coordinator's clock.
    pub fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    /// A ticket for a write whose memory follows (see [`wakeups`]): held from before the
    /// store is called until memory has followed.
    pub(crate) fn following(&self) -> wakeups::Ticket<'_> {
        self.following.begin()
    }

    /// What wakes the integrator: the feed's entries that may change what it does, each once
    /// memory has followed. Subscribed now: take it before the first round.
    /// With `early` (`--early-builds`), a lease's end wakes it too (a task whose commit was
    /// offered may have failed its verification: the early group it was in is dropped).
    pub fn integrator_wakeups(&self, early: bool) -> IntegratorWakeups<'_, S, R> {
        let wakes = if early {
            wakeups::wakes_integrator_early
        } else {
            wakeups::wakes_integrator
        };
        IntegratorWakeups {
            coordinator: self,
            wakeups: wakeups::Wakeups::new(self.store.feed(), wakes),
        }
    }

    /// The landing side's state.
    pub fn landing(&self) -> MutexGuard<'_, Landing> {
        self.landing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn last_day(&self) -> MutexGuard<'_, LastDay> {
        self.last_day
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn counts_mut(&self) -> CountsGuard<'_> {
        CountsGuard {
            counts: self
                .counts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            moved: &self.counts_moved,
            changed: false,
        }
    }

    /// A receiver told each time landing's state changes (a person's hold, a red base).
    pub fn landing_moved(&self) -> tokio::sync::watch::Receiver<u64> {
        self.landing_moved.subscribe()
    }

    /// A receiver told each time the task counts in memory may have changed.
    pub fn counts_moved(&self) -> tokio::sync::watch::Receiver<u64> {
        self.counts_moved.subscribe()
    }

    /// The registry, even if a thread panicked while holding it (its data stays consistent:
    /// every method leaves it whole).
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn run_clocks(&self) -> MutexGuard<'_, RunClocks> {
        self.run_clocks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) async fn get(&self, id: &crate::domain::TaskId) -> Result<Task> {
        self.store
            .get_task(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("task {id} does not exist")))
    }

    /// Reads the task, decides with the lifecycle, persists by compare-and-swap, then carries
    /// out the effects. A lost race is re-decided on a fresh read.
    pub async fn transition(&self, id: &crate::domain::TaskId, event: Event) -> Result<Task> {
        let task = self.get(id).await?;
        self.transition_from(task, &event, |_| Ok(()), |_, _| {})
            .await
    }

    /// [`Coordinator::transition`] deciding first on `task` as the caller just read it, with a
    /// precondition `check` on the task as read (e.g. "this lease is still the task's") and a
    /// `shape` that adds to the write (runs, a lease, a commit). A lost race is re-decided on a
    /// fresh read.
    pub(crate) async fn transition_from(
        &self,
        mut task: Task,
        event: &Event,
        check: impl Fn(&Task) -> Result<()>,
        shape: impl Fn(&Task, &mut TaskWrite),
    ) -> Result<Task> {
        for attempt in 0..MAX_CAS_ATTEMPTS {
            if attempt > 0 {
                task = self.get(&task.id).await?;
            }
            check(&task)?;
            let mut decision = self.decide(&task, event)?;
            shape(&task, &mut decision.write);
            match self.commit(vec![decision]).await?.pop() {
                Some(Ok(committed)) => return Ok(committed.task),
                Some(Err(Error::Conflict(_))) => continue,
                Some(Err(err)) => return Err(err),
                None => return Err(Error::Internal("a commit returned nothing".into())),
            }
        }
        Err(Error::Conflict(format!(
            "task {} kept changing while this request was being decided; try again",
            task.id
        )))
    }

    /// Decides what `event` does to `task` now: the write (the whole next record, its history
    /// entry, how its running runs end) and the effects to carry out once it is committed.
    /// Leaving InProgress always clears the lease.
    pub fn decide(&self, task: &Task, event: &Event) -> Result<Decision> {
        let now = self.now();
        let decided = lifecycle::apply(&task.state, event, self.policy(), now)
            .map_err(|refusal| Error::FailedPrecondition(format!("task {}: {refusal}", task.id)))?;
        let mut next = TaskRecord::of(task);
        next.state = decided.state;
        if task.state.status == TaskStatus::InProgress
            && next.state.status != TaskStatus::InProgress
        {
            next.lease = None;
        }
        let to = next.state.status;
        Ok(Decision {
            before: task.clone(),
            write: TaskWrite {
                task_id: task.id.clone(),
                expected_version: task.version,
                depends_on: task.depends_on.clone(),
                at: now,
                next,
                event: NewEvent {
                    kind: decided.kind,
                    message: decided.message.clone(),
                    from: task.state.status,
                    to,
                },
                runs: RunChanges {
                    close_rest: run_end_for(event, &decided.message),
                    ..RunChanges::default()
                },
                end_integration: false,
            },
            effects: decided.effects,
        })
    }

    /// Commits decisions, one transaction for all of them (each its own compare-and-swap: one
    /// that lost its race is `Err(Conflict)` in its place), then acts on each that committed.
    /// The outer error means nothing was written.
    pub async fn commit(&self, decisions: Vec<Decision>) -> Result<Vec<Result<Committed>>> {
        let ticket = self.following();
        let writes: Vec<TaskWrite> = decisions.iter().map(|d| d.write.clone()).collect();
        let results = if writes.len() == 1 {
            let mut writes = writes;
            vec![crate::store::plan::answer_in_group(
                self.store.commit(writes.remove(0)).await,
            )?]
        } else {
            self.store.commit_all(writes).await?
        };
        let mut epics = Vec::new();
        for (decision, result) in decisions.iter().zip(&results) {
            if let Ok(committed) = result {
                self.committed(decision, committed);
                epics.extend(epics_to_settle(decision, committed));
            }
        }
        drop(ticket);
        if !epics.is_empty() {
            crate::failpoint::abort_at("before-epic-done");
            self.settle_epics(epics).await?;
        }
        Ok(results)
    }

    /// Marks Done each of `epics` whose children are all done or cancelled (at least one
    /// done), then the epics above them the same way. The store keeps the children's figures
    /// in the child's own transaction, so what is read here is exact; a crash before this
    /// runs is made good at start-up ([`Coordinator::recover`]).
    pub(crate) async fn settle_epics(&self, mut epics: Vec<crate::domain::TaskId>) -> Result<()> {
        while let Some(id) = epics.pop() {
            for _ in 0..MAX_CAS_ATTEMPTS {
                let Some(epic) = self.store.get_task(&id).await? else {
                    break;
                };
                let c = epic.children;
                if !c.any()
                    || c.unfinished() > 0
                    || c.done == 0
                    || !matches!(epic.state.status, TaskStatus::Open | TaskStatus::NeedsHelp)
                {
                    break;
                }
                let event = Event::ChildrenDone {
                    done: c.done,
                    cancelled: c.cancelled,
                };
                let decision = self.decide(&epic, &event)?;
                let _ticket = self.following();
                match self.store.commit(decision.write.clone()).await {
                    Ok(committed) => {
                        self.committed(&decision, &committed);
                        epics.extend(epic.parent.clone());
                        break;
                    }
                    Err(Error::Conflict(_)) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// What a committed write did, counted in the metrics: the runs it ended
    /// (`pipeline_runs_total`, `pipeline_run_duration_seconds`), the agents' cost and tokens,
    /// a landing. A run's phase and start: the runs it records say theirs; the runs it ends by
    /// ID and the verify and integrate runs it ends all at once are in the run clocks (a run
    /// begun before a restart is not there: one ended by ID is then counted as a verify run,
    /// untimed); the dev run of a task that leaves InProgress is timed from its lease. A
    /// failure nobody is charged for is `infrastructure`, but a person's cancel, `cancelled`.
    fn count(&self, decision: &Decision, after: &Task) {
        let (before, write) = (&decision.before, &decision.write);
        let m = crate::metrics::metrics();
        let cancelled = write.event.kind == EventKind::Cancelled;
        let outcome = |status, kind| run_outcome(status, kind, cancelled);
        let since = |from: Millis| Some((write.at - from).max(0) as f64 / 1000.0);
        for r in &write.runs.record {
            m.run_ended(
                r.phase.as_str(),
                outcome(r.status, r.failure_kind),
                since(r.started_at),
            );
        }
        for (id, e) in &write.runs.end {
            // A run begun before a restart of the server is not timed.
            let (phase, started) = match self.run_clocks().end(*id) {
                Some((_, phase, at)) => (phase, Some(at)),
                None => (Phase::Verify, None),
            };
            m.run_ended(
                phase.as_str(),
                outcome(e.status, e.failure_kind),
                started.and_then(since),
            );
        }
        if let Some(e) = &write.runs.close_rest {
            if before.state.status == TaskStatus::InProgress {
                let leased_at = before
                    .lease
                    .as_ref()
                    .and_then(|l| self.registry().lease(&l.id).map(|live| live.leased_at));
                m.run_ended(
                    Phase::Dev.as_str(),
                    outcome(e.status, e.failure_kind),
                    leased_at.and_then(since),
                );
            }
            // The task's verify and integrate runs in flight end with it.
            for (phase, at) in self.run_clocks().end_all(&write.task_id) {
                m.run_ended(phase.as_str(), outcome(e.status, e.failure_kind), since(at));
            }
        }
        for e in write
            .runs
            .end
            .iter()
            .map(|(_, e)| e)
            .chain(&write.runs.close_rest)
        {
            match &e.usage {
                Some(u) => m.agent_used(
                    &u.agent,
                    u.model.as_deref().unwrap_or("unknown"),
                    e.cost_cents,
                    &[
                        ("input", u.input_tokens),
                        ("cached_input", u.cached_input_tokens),
                        ("cache_write", u.cache_write_tokens),
                        ("output", u.output_tokens),
                        ("reasoning", u.reasoning_tokens),
                    ],
                ),
                None if e.cost_cents > 0.0 => m.agent_used("unknown", "unknown", e.cost_cents, &[]),
                None => {}
            }
        }
        if write.event.kind == EventKind::Integrated
            && after.state.status == TaskStatus::Done
            && before.state.status != TaskStatus::Done
        {
            m.tasks_landed.inc();
        }
    }

    /// After `decision` is persisted as `committed`: memory follows (the counts, the lease in
    /// the registry, the runner told to stop), the run's log says why a lease ended, the
    /// transition is published, the effects are carried out.
    fn committed(&self, decision: &Decision, committed: &Committed) {
        let (before, write, after) = (&decision.before, &decision.write, &committed.task);
        self.count(decision, after);
        if let Some(counts) = self.counts_mut().as_mut() {
            counts.moved(before.state.status, after.state.status);
            // A dev run runs exactly while its task is leased: it starts with the lease and
            // the change that takes the task out of InProgress ends it.
            if write
                .runs
                .start
                .as_ref()
                .is_some_and(|r| r.phase == Phase::Dev)
            {
                counts.active_dev_runs += 1;
            }
            if write.runs.close_rest.is_some() && before.state.status == TaskStatus::InProgress {
                counts.active_dev_runs = counts.active_dev_runs.saturating_sub(1);
            }
        }
        // What the runs this write ended cost (a dev run's agent; nothing else costs).
        let ended = write
            .runs
            .end
            .iter()
            .map(|(_, e)| e)
            .chain(&write.runs.close_rest);
        let (cents, tokens) = ended.fold((0.0, 0u64), |(c, t), e| {
            let used = e.usage.as_ref().map_or(0, crate::domain::Usage::tokens);
            (c + e.cost_cents, t.saturating_add(used))
        });
        let recorded: f64 = write.runs.record.iter().map(|r| r.cost_cents).sum();
        if cents + recorded > 0.0 || tokens > 0 {
            self.last_day().record(write.at, cents + recorded, tokens);
        }
        // A lease that ended: its run's log says why (a line of the server's, before the
        // status change reaches the run's followers), and its runner is told to stop.
        if let Some(old) = &before.lease
            && after.lease.as_ref().is_none_or(|l| l.id != old.id)
        {
            let live = self.registry().remove_lease(&old.id);
            if let Some(live) = live {
                if write.event.kind.is_result() {
                    // How long a dev run takes, for when the open tasks will start.
                    self.landing().record_dev(write.at - live.leased_at);
                } else {
                    self.note_on_run(
                        &live,
                        &format!("{}: {}", write.event.kind, write.event.message),
                    );
                }
                if decision.effects.contains(&Effect::StopRun) {
                    self.registry().push(
                        &live.runner_id,
                        Push::Cancel(LeaseRef {
                            id: old.id.clone(),
                            epoch: old.epoch,
                        }),
                    );
                }
            }
        }
        self.logs
            .publish_transition(&before.id, write.next.state.status);
        tracing::info!(
            task = %before.id,
            from = %before.state.status,
            to = %after.state.status,
            kind = %write.event.kind,
            "task transition"
        );
        // The dispatcher and the integrator are woken by the change's entry in the feed
        // (`wakeups`), once memory has followed: the lifecycle's wake-up effects are what
        // their filters (`wakes_dispatcher`, `wakes_integrator`) let through.
    }
}

/// What wakes the integrator ([`Coordinator::integrator_wakeups`]).
pub struct IntegratorWakeups<'a, S, R> {
    coordinator: &'a Coordinator<S, R>,
    wakeups: wakeups::Wakeups,
}

impl<S, R> IntegratorWakeups<'_, S, R> {
    /// Waits for an entry of the feed that may change what the integrator does, and for memory
    /// to follow it. Cancel-safe.
    pub async fn next(&mut self) {
        self.wakeups.next(&self.coordinator.following).await;
    }
}

/// The epics a committed change may have finished: the epic of a task that has just become
/// done or cancelled, and an epic itself sent back to Open (a retry) whose children are done.
fn epics_to_settle(decision: &Decision, committed: &Committed) -> Vec<crate::domain::TaskId> {
    let finished = |s: TaskStatus| matches!(s, TaskStatus::Done | TaskStatus::Cancelled);
    let (before, after) = (&decision.before, &committed.task);
    let mut epics = Vec::new();
    if finished(after.state.status) && !finished(before.state.status) {
        epics.extend(after.parent.clone());
    }
    if after.children.any() && after.state.status != before.state.status {
        epics.push(after.id.clone());
    }
    epics
}

/// How the runs still running end when `event` happens to their task.
fn run_end_for(event: &Event, message: &str) -> Option<RunEnd> {
    let infra = Some(FailureKind::Infrastructure);
    match event {
        Event::Cancel => Some(RunEnd::failure("cancelled".to_owned(), None)),
        Event::Recover => Some(RunEnd::failure(message.to_owned(), infra)),
        Event::LeaseLost { reason } => Some(RunEnd::failure(reason.clone(), infra)),
        Event::Released {
            reason,
            infrastructure: true,
        } => Some(RunEnd::failure(reason.clone(), infra)),
        Event::Released { reason, .. } => {
            Some(RunEnd::failure(format!("released: {reason}"), None))
        }
        Event::FoundLanded { commit } => Some(RunEnd::failure(
            format!("abandoned: the task's commit {commit} was found on the base"),
            None,
        )),
        Event::BecameEpic => Some(RunEnd::failure(
            "stopped: the task became an epic (its children do the work)".to_owned(),
            None,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
