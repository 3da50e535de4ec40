//! Durable task state behind the [`Store`] trait, so that a second backend (Postgres) can be
//! added and run the same test suite ([`suite`]). [`sqlite::SqliteStore`] is the default.
//!
//! The store is deliberately dumb: it validates references (a dependency must exist, no cycles)
//! and persists, but the lifecycle rules live in [`crate::lifecycle`]. A state change is written
//! with [`Store::commit_transition`], a compare-and-swap on the task's `version`, so a decision
//! made on a stale read is refused instead of overwriting a newer state.

use std::future::Future;

use crate::domain::{
    FailureKind, Lease, LogLine, Millis, NewTask, Phase, Run, RunStatus, StatusCounts, Task,
    TaskEvent, TaskId, TaskState, TaskStatus,
};
use crate::error::Result;
use crate::lifecycle::Transition;

pub mod sqlite;
#[cfg(test)]
pub mod suite;

/// A state change to persist atomically: the task's new state, its history entry, and the runs
/// it starts or ends.
#[derive(Clone, Debug)]
pub struct TransitionWrite {
    pub task_id: TaskId,
    /// The version the decision was made on; the write fails with `Error::Conflict` otherwise.
    pub expected_version: i64,
    /// The task's dependencies as of that version (they change only with the version, so the
    /// written task is returned without reading them again).
    pub depends_on: Vec<TaskId>,
    pub from: TaskStatus,
    pub state: TaskState,
    pub kind: String,
    pub message: String,
    pub at: Millis,
    /// Ends these runs, each its own way (before `close_runs`).
    pub end_runs: Vec<(i64, RunEnd)>,
    /// Ends every run of the task that is still running.
    pub close_runs: Option<RunEnd>,
    /// Starts a run.
    pub start_run: Option<NewRun>,
    /// Records runs that are already over (a runner's verification).
    pub record_runs: Vec<FinishedRun>,
    pub lease: LeaseChange,
    /// A newly accepted patchset's commit.
    pub patch_commit: Option<String>,
    /// The runner the next lease should avoid (its lease lapsed).
    pub avoid_runner: Option<String>,
    /// The tree the runner verified (not merely skipped), or `Some(None)` to forget it.
    pub verified_tree: Option<Option<String>>,
    /// Ends the task's integration journal entry (the base move is recorded or abandoned).
    pub end_integration: bool,
}

impl TransitionWrite {
    /// The write of a decided transition of `task`, changing nothing else.
    pub fn new(task: &Task, decided: Transition, at: Millis) -> Self {
        Self {
            task_id: task.id.clone(),
            expected_version: task.version,
            depends_on: task.depends_on.clone(),
            from: task.state.status,
            state: decided.state,
            kind: decided.kind.to_owned(),
            message: decided.message,
            at,
            end_runs: Vec::new(),
            close_runs: None,
            start_run: None,
            record_runs: Vec::new(),
            lease: LeaseChange::Keep,
            patch_commit: None,
            avoid_runner: None,
            verified_tree: None,
            end_integration: false,
        }
    }
}

/// A persisted transition: the task as written, its history entry, and the run it started.
#[derive(Clone, Debug)]
pub struct Committed {
    pub task: Task,
    pub event_id: i64,
    pub run_id: Option<i64>,
}

/// A base move in flight: written before `update-ref`, removed with the Done transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal {
    pub task_id: TaskId,
    pub old_tip: String,
    pub new_commit: String,
    pub started_at: Millis,
}

/// What happens to the task's lease.
#[derive(Clone, Debug)]
pub enum LeaseChange {
    Keep,
    Set(Lease),
    Clear,
}

/// A run that is already over when it is recorded.
#[derive(Clone, Debug)]
pub struct FinishedRun {
    pub phase: Phase,
    pub patchset: u32,
    pub runner: Option<String>,
    pub status: RunStatus,
    pub cost_cents: f64,
    pub started_at: Millis,
    pub error: Option<String>,
    pub failure_kind: Option<FailureKind>,
}

/// How the runs still running end.
#[derive(Clone, Debug)]
pub struct RunEnd {
    pub status: RunStatus,
    pub cost_cents: f64,
    pub error: Option<String>,
    pub failure_kind: Option<FailureKind>,
}

/// A run to start.
#[derive(Clone, Debug)]
pub struct NewRun {
    pub phase: Phase,
    pub patchset: u32,
    pub runner: Option<String>,
}

/// Persistence of tasks, runs and history. Every write is one short transaction.
pub trait Store: Clone + Send + Sync + 'static {
    /// Creates a task in state Open, generating `t-<n>` when no ID is given. Fails with
    /// `AlreadyExists` for a taken ID and `NotFound` for an unknown parent or dependency.
    fn create_task(&self, new: NewTask, now: Millis) -> impl Future<Output = Result<Task>> + Send;

    fn get_task(&self, id: &TaskId) -> impl Future<Output = Result<Option<Task>>> + Send;

    /// Tasks in lease order (priority, then age), optionally only those with one status.
    fn list_tasks(
        &self,
        status: Option<TaskStatus>,
    ) -> impl Future<Output = Result<Vec<Task>>> + Send;

    /// Adds dependencies to an existing task. Fails with `NotFound` for an unknown task and
    /// `FailedPrecondition` when a dependency would close a cycle.
    fn add_dependencies(
        &self,
        id: &TaskId,
        deps: &[TaskId],
        now: Millis,
    ) -> impl Future<Output = Result<Task>> + Send;

    /// Persists a transition if the task is still at `expected_version`; returns the task and
    /// the ID of the history entry recorded.
    fn commit_transition(
        &self,
        write: TransitionWrite,
    ) -> impl Future<Output = Result<(Task, i64)>> + Send;

    /// Persists several transitions in one transaction (a group commit), each a compare-and-swap
    /// like [`Store::commit_transition`]: one that lost its race is `Err(Conflict)` in its place
    /// and the others are still written. The outer error means nothing was written.
    fn commit_transitions(
        &self,
        writes: Vec<TransitionWrite>,
    ) -> impl Future<Output = Result<Vec<Result<Committed>>>> + Send;

    /// The task's runs, oldest first.
    fn runs(&self, id: &TaskId) -> impl Future<Output = Result<Vec<Run>>> + Send;

    /// The task's history, oldest first.
    fn events(&self, id: &TaskId) -> impl Future<Output = Result<Vec<TaskEvent>>> + Send;

    /// Counts of tasks per status and of dev runs still running.
    fn status_counts(&self) -> impl Future<Output = Result<StatusCounts>> + Send;

    /// Open tasks out of back-off at `now` whose dependencies are all Done, in lease order
    /// (priority, then `seq`), after `after` if given (a page after the last one seen), at most
    /// `limit`; the caller applies the rest of the eligibility rules (`lifecycle::leasable`).
    fn lease_candidates(
        &self,
        now: Millis,
        after: Option<(u8, i64)>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Task>>> + Send;

    /// Tasks not yet done (open, in progress, verified, needing help): those a lost landing
    /// could concern.
    fn unfinished(&self) -> impl Future<Output = Result<Vec<Task>>> + Send;

    /// Makes sure no task ID `t-<n>` with `n` below `at_least` is generated from now on.
    fn raise_next_task_number(&self, at_least: u64) -> impl Future<Output = Result<()>> + Send;

    /// Whether the store has never held a task (no task, no generated ID).
    fn is_fresh(&self) -> impl Future<Output = Result<bool>> + Send;

    /// The earliest end of a back-off still running at `now`.
    fn next_backoff_end(&self, now: Millis) -> impl Future<Output = Result<Option<Millis>>> + Send;

    /// The statuses of the tasks among `ids` that exist.
    fn statuses(
        &self,
        ids: &[TaskId],
    ) -> impl Future<Output = Result<Vec<(TaskId, TaskStatus)>>> + Send;

    /// Whether every task `id` depends on is Done.
    fn dependencies_done(&self, id: &TaskId) -> impl Future<Output = Result<bool>> + Send;

    /// Records a base move about to happen, if the task is still Verified with `commit` as its
    /// patch; false, recording nothing, if it changed meanwhile (cancelled, a newer patchset).
    fn begin_integration(
        &self,
        entry: &Journal,
        commit: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Forgets a base move that did not happen.
    fn abort_integration(&self, task: &TaskId) -> impl Future<Output = Result<()>> + Send;

    /// Base moves a crash may have interrupted.
    fn pending_integrations(&self) -> impl Future<Output = Result<Vec<Journal>>> + Send;

    /// The task's runs that are still running (a lease's dev run, and its verify run once it
    /// started), oldest first.
    fn running_runs(&self, task: &TaskId) -> impl Future<Output = Result<Vec<Run>>> + Send;

    /// Starts a run outside a transition (the server's integration run); returns its ID.
    fn start_run(
        &self,
        task: &TaskId,
        run: &NewRun,
        at: Millis,
    ) -> impl Future<Output = Result<i64>> + Send;

    /// Ends every run of `phase` still running (at start-up, runs a crash interrupted).
    fn abandon_runs(
        &self,
        phase: Phase,
        error: &str,
        at: Millis,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// One run.
    fn run(&self, id: i64) -> impl Future<Output = Result<Option<Run>>> + Send;

    /// Appends log lines to runs in one transaction; a line whose (run, seq) is stored already
    /// is ignored.
    fn append_logs(&self, lines: &[(i64, LogLine)]) -> impl Future<Output = Result<()>> + Send;

    /// The highest line number stored for a run (0 when it has none).
    fn last_log_seq(&self, run: i64) -> impl Future<Output = Result<u64>> + Send;

    /// A run's lines after `after_seq`, in order, at most `limit`.
    fn read_logs(
        &self,
        run: i64,
        after_seq: u64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<LogLine>>> + Send;

    /// Cuts a run's log to its head (lines up to `head_last_seq`) and its newest lines worth
    /// at most `keep_tail_bytes`; returns the bytes the tail keeps.
    fn trim_log(
        &self,
        run: i64,
        head_last_seq: u64,
        keep_tail_bytes: u64,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes the logs of runs that finished before `before`; returns the lines deleted.
    fn prune_logs(&self, before: Millis) -> impl Future<Output = Result<u64>> + Send;

    /// Task history entries after `after_id`, oldest first, at most `limit` (for `watch`).
    fn events_after(
        &self,
        after_id: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<TaskEvent>>> + Send;

    /// Reads a server fact (see `meta`).
    fn get_meta(&self, key: &str) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Writes a server fact.
    fn put_meta(&self, key: &str, value: &str) -> impl Future<Output = Result<()>> + Send;

    /// Every fact whose key starts with `prefix`.
    fn list_meta(&self, prefix: &str)
    -> impl Future<Output = Result<Vec<(String, String)>>> + Send;

    /// Why writes are failing, when the last one failed (cleared by one that succeeds).
    fn write_failure(&self) -> Option<String>;

    /// Forgets a fact.
    fn delete_meta(&self, key: &str) -> impl Future<Output = Result<()>> + Send;
}
