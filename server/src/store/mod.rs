//! Durable task state behind the [`Store`] trait; every backend runs the same test suite
//! ([`suite`]). [`sqlite::SqliteStore`] is the default, [`postgres::PgStore`] the other;
//! [`memory::MemoryStore`] is the in-memory fake the unit tests of the layers above use.
//!
//! Architecture invariant: the store applies no lifecycle rule. It persists what it is given
//! and checks references (a dependency must exist, no cycles, where an epic waits for its
//! children as a task waits for its dependencies); the rules are in
//! [`crate::lifecycle`], applied by the coordinator. A state change is one [`TaskWrite`]: the
//! task's whole mutable record, written by compare-and-swap on its `version`, with its history
//! entry and its runs, in one transaction. The store keeps one derived count, `deps_pending`
//! (how many of a task's dependencies are not Done), up to date in the same transaction as the
//! write that changes it, so that eligibility never needs a scan.
//!
//! Architecture invariant: a backend is SQL (or maps) and row mapping. What creating tasks and
//! adding dependencies decide (IDs, reference checks and their hints, history texts, inherited
//! pauses, pending counts, cycle refusals, an epic's figures) is in [`plan`], which reads
//! through [`plan::Reads`]; a backend answers those reads and writes what the plan says.
//!
//! The store also keeps the change feed ([`crate::feed`]): each write records its entries in
//! its own transaction (a task's history entries are its `task` entries) and publishes them on
//! the store's broadcast once it commits, in position order.

use std::future::Future;

pub use crate::domain::{FinishedRun, NewRun, RunEnd};

/// Which tasks a list holds: every one, or only those with a status, or only the children of
/// a task (an epic), or both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub parent: Option<TaskId>,
}

impl TaskFilter {
    /// Only the tasks with `status`.
    pub fn status(status: TaskStatus) -> Self {
        Self {
            status: Some(status),
            parent: None,
        }
    }
}
use crate::domain::{
    EventKind, Lease, LogLine, Millis, NewTask, Phase, Run, StatusCounts, Task, TaskEdit,
    TaskEvent, TaskId, TaskState, TaskStatus,
};
use crate::error::Result;
use crate::feed::{FeedEntry, NewEntry};
use pipeline_core::ids::{CommitId, TreeId};

pub mod any;
#[cfg(test)]
pub mod memory;
pub mod plan;
pub mod postgres;
mod rows;
mod sql;
pub mod sqlite;
#[cfg(test)]
pub mod suite;

/// The refusal of a task without an ID of its own once every generated number is used (or
/// known to the repository, which raises the counter past it).
pub(crate) fn ids_exhausted() -> crate::error::Error {
    crate::error::Error::FailedPrecondition(format!(
        "no generated task ID is left (t-{} is the last); give the task an ID of its own (--id)",
        pipeline_core::ids::MAX_GENERATED
    ))
}

/// The refusal of `id` depending on `dep` when `dep` already waits for `id`. A task waits for
/// its dependencies and an epic for its children (it is done only once they are), so a child
/// depending on its epic (or on anything that waits for the epic) would never be leased.
pub(crate) fn cycle_refusal(id: &TaskId, dep: &TaskId) -> crate::error::Error {
    crate::error::Error::FailedPrecondition(format!(
        "task {id} cannot depend on {dep}: {dep} waits for {id} (through its dependencies, or \
         as an epic waits for its children), which would make a cycle"
    ))
}

/// The refusal of an epic `id` depending on `dep`, one of its own descendants: it waits for
/// its children already, and the edge would make the two wait for each other.
pub(crate) fn descendant_refusal(id: &TaskId, dep: &TaskId) -> crate::error::Error {
    crate::error::Error::FailedPrecondition(format!(
        "task {id} cannot depend on {dep}: {dep} is one of its own children (or theirs), which \
         it waits for as an epic already, so the two would wait for each other: that would \
         make a cycle"
    ))
}

/// Everything about a task that changes as it lives; a [`TaskWrite`] writes all of it.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskRecord {
    pub state: TaskState,
    pub lease: Option<Lease>,
    pub lease_epoch: u64,
    pub patch_commit: Option<CommitId>,
    pub avoid_runner: Option<String>,
    pub verified_tree: Option<TreeId>,
}

impl TaskRecord {
    /// The record of `task` as it is.
    pub fn of(task: &Task) -> Self {
        Self {
            state: task.state.clone(),
            lease: task.lease.clone(),
            lease_epoch: task.lease_epoch,
            patch_commit: task.patch_commit.clone(),
            avoid_runner: task.avoid_runner.clone(),
            verified_tree: task.verified_tree.clone(),
        }
    }
}

/// The history entry a write records.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub kind: EventKind,
    pub message: String,
    pub from: TaskStatus,
    pub to: TaskStatus,
}

/// What a write does to the task's runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunChanges {
    /// Ends these runs, each its own way (before `close_rest`).
    pub end: Vec<(i64, RunEnd)>,
    /// Ends every run of the task still running.
    pub close_rest: Option<RunEnd>,
    /// Starts a run.
    pub start: Option<NewRun>,
    /// Records runs that are already over (a runner's verification without log lines).
    pub record: Vec<FinishedRun>,
}

/// A state change to persist atomically.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskWrite {
    pub task_id: TaskId,
    /// The version the decision was made on; the write fails with `Error::Conflict` otherwise.
    pub expected_version: i64,
    /// The task's dependencies as of that version (they change only with the version), so the
    /// written task is returned without reading them again.
    pub depends_on: Vec<TaskId>,
    pub at: Millis,
    /// The whole mutable record after the change.
    pub next: TaskRecord,
    pub event: NewEvent,
    pub runs: RunChanges,
    /// Ends the task's integration journal entry (the base move is recorded or abandoned).
    pub end_integration: bool,
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
    /// The train whose base move this is.
    pub train: Option<i64>,
    pub old_tip: CommitId,
    /// Where the base moves: the commit at the end of the landing prefix (the task's own is
    /// at or before it).
    pub new_commit: CommitId,
    pub started_at: Millis,
}

/// How a merge train ended, as recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainEnd {
    pub outcome: TrainOutcome,
    pub builds: u32,
    pub landed: u32,
    /// The first red commit of its chain, when one was found.
    pub red_commit: Option<CommitId>,
}

/// How a merge train ended: one word in the database ([`TrainOutcome::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainOutcome {
    /// A prefix landed.
    Landed,
    /// A member built red (the first red commit is named); the green prefix, if any, landed.
    Red,
    /// The base itself built red: landing holds until it changes.
    RedBase,
    /// It stopped trying (the base kept moving under it).
    GaveUp,
    /// It ended without landing anything.
    NothingLanded,
    /// It could not go on (nobody's fault): formed again.
    Error,
}

impl TrainOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Landed => "landed",
            Self::Red => "red",
            Self::RedBase => "red_base",
            Self::GaveUp => "gave_up",
            Self::NothingLanded => "nothing_landed",
            Self::Error => "error",
        }
    }
}

/// A finished train, for the recent-throughput figures.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainStat {
    pub started_at: Millis,
    pub ended_at: Millis,
    pub builds: u32,
    pub landed: u32,
}

/// What the runs that finished in one span of time cost: the sum of their cents and of their
/// input and output tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageBucket {
    /// The start of the span (a multiple of its length).
    pub start: Millis,
    pub cost_cents: f64,
    pub tokens: u64,
}

/// A session of the web page, as stored: never its ID, only the ID's SHA-256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub id_sha256: String,
    /// `admin` or `viewer`.
    pub role: String,
    /// The SHA-256 of the token that opened it: a session ends with its token.
    pub token_sha256: String,
    pub created_at: Millis,
    pub expires_at: Millis,
}

/// Which sessions to end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndSessions<'a> {
    /// One, by the SHA-256 of its ID (`POST /logout`).
    One(&'a str),
    /// Those opened with the token of this SHA-256 (it was rotated).
    OfToken(&'a str),
    /// Those that ended before this time.
    ExpiredBefore(Millis),
}

/// A webhook endpoint's place in the change feed, as stored (see `crate::webhooks`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookCursor {
    /// The endpoint, as given to `--webhook`.
    pub url: String,
    /// The last entry handled: every entry up to it was delivered, refused for good, given up
    /// on, or not one the endpoint takes.
    pub position: i64,
    /// Failed attempts at the first entry after `position` (0 when none failed).
    pub attempts: u32,
    /// When that entry is tried again, while it fails.
    pub next_attempt_at: Option<Millis>,
    /// When that entry first failed (it is given up on a day later).
    pub failing_since: Option<Millis>,
    /// The last failure (of that entry, or the last entry refused or given up on), and when.
    pub last_error: Option<String>,
    pub last_error_at: Option<Millis>,
    /// When an entry was last delivered (answered 2xx).
    pub last_delivered_at: Option<Millis>,
}

impl WebhookCursor {
    /// A cursor at `position` with nothing failing and nothing delivered yet.
    pub fn at(url: &str, position: i64) -> Self {
        Self {
            url: url.to_owned(),
            position,
            attempts: 0,
            next_attempt_at: None,
            failing_since: None,
            last_error: None,
            last_error_at: None,
            last_delivered_at: None,
        }
    }
}

/// Persistence of tasks, runs and history. Every write is one short transaction.
pub trait Store: Clone + Send + Sync + 'static {
    /// Creates a task in state Open, generating `t-<n>` when no ID is given. Fails with
    /// `AlreadyExists` for a taken ID and `NotFound` for an unknown parent or dependency.
    fn create_task(&self, new: NewTask, now: Millis) -> impl Future<Output = Result<Task>> + Send;

    fn get_task(&self, id: &TaskId) -> impl Future<Output = Result<Option<Task>>> + Send;

    /// Creates the tasks in order, all or none, in one transaction: a task may depend on one
    /// created before it in the same batch. A failure names the task of the batch it is about.
    /// Returns each task with its history's first entry.
    fn create_tasks(
        &self,
        new: Vec<NewTask>,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<(Task, TaskEvent)>>> + Send;

    /// One page of tasks in lease order (priority, then age): at most `limit`, after the key
    /// `(priority, seq)` of the last task of the previous page, those `filter` lets through.
    /// Descriptions are left empty and each feedback is its last `LIST_FEEDBACK_BYTES`
    /// (`keep_end`), read as such: a list never carries more, and its rows are for showing,
    /// never for writing back.
    fn list_tasks(
        &self,
        filter: &TaskFilter,
        after: Option<(u8, i64)>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Task>>> + Send;

    /// Pauses (`Some(why)`) or resumes (`None`) the task `id` and its children, each with a
    /// `paused` or `resumed` entry in its history saying `message`; returns how many tasks it
    /// changed (0 when `id` does not exist).
    fn set_paused(
        &self,
        id: &TaskId,
        paused: Option<&str>,
        message: &str,
        now: Millis,
    ) -> impl Future<Output = Result<u32>> + Send;

    /// Changes the fields `edit` names, by compare-and-swap on `version` (`Conflict` when the
    /// task moved since it was read), recording `event` in its history.
    fn edit_task(
        &self,
        id: &TaskId,
        version: i64,
        edit: &TaskEdit,
        event: NewEvent,
        now: Millis,
    ) -> impl Future<Output = Result<Task>> + Send;

    /// Adds dependencies to an existing task, recording `event` in its history. Fails with
    /// `NotFound` for an unknown task or dependency and `FailedPrecondition` when a dependency
    /// would close a cycle. Edges that exist already are left as they are; when nothing is new
    /// nothing is written.
    fn add_dependencies(
        &self,
        id: &TaskId,
        deps: &[TaskId],
        event: NewEvent,
        now: Millis,
    ) -> impl Future<Output = Result<Task>> + Send;

    /// Persists a write if the task is still at `expected_version`.
    fn commit(&self, write: TaskWrite) -> impl Future<Output = Result<Committed>> + Send;

    /// Persists several writes in one transaction (a group commit), each a compare-and-swap
    /// like [`Store::commit`]: one that lost its race is `Err(Conflict)` in its place and the
    /// others are still written. The outer error means nothing was written.
    fn commit_all(
        &self,
        writes: Vec<TaskWrite>,
    ) -> impl Future<Output = Result<Vec<Result<Committed>>>> + Send;

    /// The task's runs, oldest first.
    fn runs(&self, id: &TaskId) -> impl Future<Output = Result<Vec<Run>>> + Send;

    /// The task's history, oldest first.
    fn events(&self, id: &TaskId) -> impl Future<Output = Result<Vec<TaskEvent>>> + Send;

    /// Counts of tasks per status and of dev runs still running.
    fn status_counts(&self) -> impl Future<Output = Result<StatusCounts>> + Send;

    /// Open tasks with no dependency pending, out of back-off at `now`, in lease order
    /// (priority, then `seq`), after `after` if given (a page after the last one seen), at most
    /// `limit`. The lifecycle decides which of them may be leased.
    fn lease_candidates(
        &self,
        now: Millis,
        after: Option<(u8, i64)>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Task>>> + Send;

    /// Verified tasks, in landing order (priority, then `seq`).
    fn verified(&self) -> impl Future<Output = Result<Vec<Task>>> + Send;

    /// Tasks not yet done (open, in progress, verified, needing help): those a lost landing
    /// could concern.
    fn unfinished(&self) -> impl Future<Output = Result<Vec<Task>>> + Send;

    /// Epics (tasks with children) that are Open or NeedsHelp although every child is done or
    /// cancelled, one at least done: those a crash kept from being marked Done.
    fn finished_epics(&self) -> impl Future<Output = Result<Vec<TaskId>>> + Send;

    /// What the runs of each of `ids` have used, input plus output tokens as their usage
    /// reports say; tasks without a report are left out.
    fn tokens_of(&self, ids: &[TaskId]) -> impl Future<Output = Result<Vec<(TaskId, u64)>>> + Send;

    /// The statuses of the tasks among `ids` that exist.
    fn statuses(
        &self,
        ids: &[TaskId],
    ) -> impl Future<Output = Result<Vec<(TaskId, TaskStatus)>>> + Send;

    /// Makes sure no task ID `t-<n>` with `n` below `at_least` is generated from now on.
    fn raise_next_task_number(&self, at_least: u64) -> impl Future<Output = Result<()>> + Send;

    /// Whether the store has never held a task (no task, no generated ID).
    fn is_fresh(&self) -> impl Future<Output = Result<bool>> + Send;

    /// The earliest end of a back-off still running at `now`.
    fn next_backoff_end(&self, now: Millis) -> impl Future<Output = Result<Option<Millis>>> + Send;

    /// Records a base move about to happen for every task of a train, each still Verified with
    /// its commit as its patch; if one changed meanwhile (cancelled, a newer patchset), records
    /// nothing and returns it.
    fn begin_integration(
        &self,
        entries: &[(Journal, CommitId)],
    ) -> impl Future<Output = Result<Option<TaskId>>> + Send;

    /// Starts a merge train of `tasks` on `base_tip`, with its `formed` entry in the feed;
    /// returns its ID.
    fn start_train(
        &self,
        base_tip: &CommitId,
        tasks: &[TaskId],
        at: Millis,
    ) -> impl Future<Output = Result<i64>> + Send;

    /// Records how a train ended, with its `ended` entry in the feed.
    fn end_train(
        &self,
        id: i64,
        end: &TrainEnd,
        at: Millis,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Trains that ended at or after `since`, oldest first.
    fn trains_since(&self, since: Millis) -> impl Future<Output = Result<Vec<TrainStat>>> + Send;

    /// The trains whose members' integrate runs are still running, by train ID, each with
    /// those members in the order their runs started (a standby's `queue`; served by the
    /// index of running runs).
    fn trains_in_flight(&self) -> impl Future<Output = Result<Vec<(i64, Vec<TaskId>)>>> + Send;

    /// Forgets a base move that did not happen.
    fn abort_integration(&self, task: &TaskId) -> impl Future<Output = Result<()>> + Send;

    /// Base moves a crash may have interrupted.
    fn pending_integrations(&self) -> impl Future<Output = Result<Vec<Journal>>> + Send;

    /// The task's runs that are still running (a lease's dev run, and its verify run once it
    /// started), oldest first.
    fn running_runs(&self, task: &TaskId) -> impl Future<Output = Result<Vec<Run>>> + Send;

    /// What the runs that finished at or after `since` cost, summed per span of `bucket_ms`
    /// of their finish (spans that start at multiples of it), oldest first; spans without a
    /// cost or a usage report are left out.
    fn usage_since(
        &self,
        since: Millis,
        bucket_ms: Millis,
    ) -> impl Future<Output = Result<Vec<UsageBucket>>> + Send;

    /// The agent's session of the task's latest dev run that reported one.
    fn latest_session(&self, task: &TaskId) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Starts a run outside a transition (the server's integration run, a verify run begun by
    /// its first log line); returns its ID.
    fn start_run(
        &self,
        task: &TaskId,
        run: &NewRun,
        at: Millis,
    ) -> impl Future<Output = Result<i64>> + Send;

    /// Ends one run outside a transition, if it is still running.
    fn end_run(
        &self,
        run: i64,
        end: &RunEnd,
        at: Millis,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Ends every run of `phase` the server ran itself (no runner) still running: at
    /// start-up, the runs a crash interrupted (a runner's may yet be re-attached).
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

    /// The newest position of the feed, a task's history entry or another (0 when there is
    /// none).
    fn last_event_id(&self) -> impl Future<Output = Result<i64>> + Send;

    /// The change feed's broadcast: the entries of each write, published once it commits,
    /// in position order (see [`crate::feed`]).
    fn feed(&self) -> &crate::feed::Feed;

    /// Records an entry of the feed that is not a task's (a task's are written with its
    /// change) in a transaction of its own, for a change that lives in memory only; returns
    /// its position.
    fn record(&self, entry: &NewEntry) -> impl Future<Output = Result<i64>> + Send;

    /// The feed's entries after position `after`, oldest first, at most `limit`.
    fn entries_after(
        &self,
        after: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<FeedEntry>>> + Send;

    /// Writes (`Some`) or forgets (`None`) a server fact and records `entry` in the feed, in
    /// one transaction (a pause of the queue or of landing); returns the entry's position.
    fn set_meta_recording(
        &self,
        key: &str,
        value: Option<&str>,
        entry: &NewEntry,
    ) -> impl Future<Output = Result<i64>> + Send;

    /// Task history entries (the feed's `task` entries) after `after_id`, oldest first, at most `limit` (for `watch`).
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

    /// Whether the database takes a write now: a write transaction begun and rolled back
    /// (nothing written), for the server's readiness.
    fn check_writable(&self) -> impl Future<Output = Result<()>> + Send;

    /// Forgets a fact.
    fn delete_meta(&self, key: &str) -> impl Future<Output = Result<()>> + Send;

    /// Every session of the web page (read at start-up; memory keeps them after).
    fn sessions(&self) -> impl Future<Output = Result<Vec<SessionRecord>>> + Send;

    /// Stores a new session (`AlreadyExists` for an ID hash that is taken).
    fn put_session(&self, session: &SessionRecord) -> impl Future<Output = Result<()>> + Send;

    /// Ends sessions; returns how many ended.
    fn end_sessions(&self, which: EndSessions<'_>) -> impl Future<Output = Result<u64>> + Send;

    /// Every webhook endpoint's cursor, by URL.
    fn webhooks(&self) -> impl Future<Output = Result<Vec<WebhookCursor>>> + Send;

    /// The cursor of `url`, made at `head` (the feed's newest entry) if it has none: a new
    /// endpoint is not sent what happened before it.
    fn open_webhook(
        &self,
        url: &str,
        head: i64,
        now: Millis,
    ) -> impl Future<Output = Result<WebhookCursor>> + Send;

    /// Writes an endpoint's cursor, which never goes back: returns false (and writes nothing)
    /// for an unknown URL or a position before the stored one.
    fn put_webhook(&self, cursor: &WebhookCursor) -> impl Future<Output = Result<bool>> + Send;

    /// Forgets an endpoint's cursor (it is no longer configured): returns whether it had one.
    /// Opened again later, it starts at the head it is then given.
    fn forget_webhook(&self, url: &str) -> impl Future<Output = Result<bool>> + Send;
}
