//! The SQLite [`Store`]: one file, WAL, `synchronous = NORMAL`, foreign keys on, a busy timeout,
//! migrations from `migrations/sqlite` run at open, and `BEGIN IMMEDIATE` for every write
//! transaction (a deferred transaction that reads then writes fails with `SQLITE_BUSY` instead of
//! waiting for the lock). Write transactions take turns at an in-process queue before they
//! begin: two writers never meet at SQLite's lock, whose busy handler waits by sleeping (1 ms
//! and up), and readers (WAL) never wait for writers. A write that is dropped before it ends
//! keeps its turn until its connection is rolled back and closed (`WriteTx`).

mod sessions;

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{FromRow, Sqlite, SqliteConnection};

use super::{
    Committed, EndSessions, Journal, NewEvent, NewRun, RunEnd, SessionRecord, Store, TaskFilter,
    TaskWrite, TrainEnd, TrainStat, UsageBucket,
};
use crate::domain::{
    Children, CostSource, FailureKind, Lease, LogLine, LogStream, Millis, NewTask, Phase, Run,
    RunStatus, StatusCounts, Task, TaskEdit, TaskEvent, TaskId, TaskState, TaskStatus, Usage,
};
use crate::error::{Error, Result};
use pipeline_core::ids::{CommitId, MAX_GENERATED, TreeId};
use pipeline_core::lines::keep_end_of;

const NEXT_TASK_NUMBER: &str = "next_task_number";

/// A task store in one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One write transaction at a time, in arrival order.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Why the last write failed, until one succeeds again (for the server's health).
    write_failure: Arc<std::sync::Mutex<Option<String>>>,
}

/// A write transaction holding the store's write turn until it ends. It is begun, committed
/// and rolled back by hand (`BEGIN IMMEDIATE`, `COMMIT`, `ROLLBACK`), and a connection whose
/// transaction did not end cleanly (a failed statement or commit, a full disk, a cancelled
/// future) is closed instead of going back to the pool: the next write gets a fresh one, so a
/// fault never outlives its cause.
///
/// Architecture invariant: the write turn is released only once its connection holds no
/// transaction (committed, rolled back, or closed). A transaction dropped before it ended (a
/// gRPC handler cancelled when its client went away) hands both to a task that rolls back and
/// closes the connection and only then lets the next writer begin: its statements, even its
/// `BEGIN IMMEDIATE`, may still be running on the connection's worker thread.
struct WriteTx {
    /// The connection and the turn, together until the transaction ends (`None` only once
    /// `Drop` took them).
    held: Option<Held>,
    ended: bool,
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

/// A write transaction's connection and the write turn it holds.
struct Held {
    conn: sqlx::pool::PoolConnection<Sqlite>,
    turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Held {
    /// Ends whatever transaction the connection holds and closes it, then releases the turn.
    /// The `ROLLBACK` queues on the connection's worker behind whatever a cancelled future left
    /// running there (a statement, a `BEGIN IMMEDIATE` that may yet succeed), so once it
    /// answers, the connection holds no lock.
    async fn end(self) {
        let Held { mut conn, turn } = self;
        // Should this task be dropped first (the runtime stopping), the connection is closed,
        // not handed back.
        conn.close_on_drop();
        // An error is expected when no transaction was open (a `BEGIN` that failed).
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        if let Err(e) = conn.close().await {
            tracing::warn!(error = %e, "closing a failed write's database connection");
        }
        drop(turn);
    }
}

impl WriteTx {
    async fn commit(mut self) -> Result<()> {
        match sqlx::query("COMMIT").execute(&mut *self).await {
            Ok(_) => {
                self.ended = true;
                self.set_failure(None);
                Ok(())
            }
            Err(e) => {
                // Dropped unended: its connection is rolled back and closed before the turn
                // goes to the next writer.
                self.set_failure(Some(format!("committing a write failed: {e}")));
                Err(e.into())
            }
        }
    }

    /// Ends the transaction without writing anything (a refused request).
    async fn rollback(mut self) {
        if sqlx::query("ROLLBACK").execute(&mut *self).await.is_ok() {
            self.ended = true;
        }
    }

    /// Commits when `result` is a success, rolls back when it is a refusal (the connection
    /// stays usable), and otherwise drops the transaction (closing its connection).
    async fn finish<T>(self, result: Result<T>) -> Result<T> {
        match result {
            Ok(value) => self.commit().await.map(|()| value),
            Err(
                refusal @ (Error::Conflict(_)
                | Error::NotFound(_)
                | Error::AlreadyExists(_)
                | Error::FailedPrecondition(_)
                | Error::InvalidArgument(_)),
            ) => {
                self.rollback().await;
                Err(refusal)
            }
            Err(other) => Err(other),
        }
    }

    fn set_failure(&self, failure: Option<String>) {
        if let Ok(mut f) = self.failure.lock() {
            *f = failure;
        }
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let Ok(mut f) = self.failure.lock()
            && f.is_none()
        {
            *f = Some("a write transaction failed (see the server log)".to_owned());
        }
        let Some(held) = self.held.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(held.end());
            }
            // No runtime to end it on (the server is gone): closing the connection rolls back
            // whatever it held.
            Err(_) => {
                let Held { mut conn, turn } = held;
                conn.close_on_drop();
                drop(conn);
                drop(turn);
            }
        }
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.held.as_ref().expect("held until dropped").conn
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.held.as_mut().expect("held until dropped").conn
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://PATH` or a plain path) and
    /// brings its schema up to date.
    pub async fn open(url: &str) -> Result<Self> {
        let url = if url.starts_with("sqlite:") {
            url.to_owned()
        } else {
            format!("sqlite://{url}")
        };
        let options = SqliteConnectOptions::from_str(&url)
            .map_err(|e| Error::InvalidArgument(format!("invalid database url {url}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| Error::Internal(format!("cannot open the database {url}: {e}")))?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self {
            pool,
            writer: Arc::new(tokio::sync::Mutex::new(())),
            write_failure: Arc::default(),
        })
    }

    /// Closes every connection, checkpointing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Begins a write transaction: a connection first, then the write turn, so the turn is
    /// held only while the transaction runs. The transaction counts as begun (and is ended by
    /// `Drop` when this future is dropped) from the moment its `BEGIN IMMEDIATE` is sent: a
    /// future dropped while that runs must not hand back a connection the `BEGIN` then took
    /// the write lock on.
    async fn write(&self) -> Result<WriteTx> {
        let conn = self.pool.acquire().await?;
        let turn = Arc::clone(&self.writer).lock_owned().await;
        let mut tx = WriteTx {
            held: Some(Held { conn, turn }),
            ended: false,
            failure: Arc::clone(&self.write_failure),
        };
        if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *tx).await {
            tx.set_failure(Some(format!("beginning a write failed: {e}")));
            return Err(e.into());
        }
        Ok(tx)
    }
}

#[derive(FromRow)]
struct TaskRow {
    seq: i64,
    id: String,
    title: String,
    description: String,
    namespace: Option<String>,
    priority: i64,
    parent: Option<String>,
    status: String,
    patchset: i64,
    failures: i64,
    lost_leases: i64,
    cost_cents: f64,
    cost_at_retry: f64,
    backoff_until: Option<i64>,
    feedback: Option<String>,
    amend: i64,
    lease_id: Option<String>,
    lease_epoch: i64,
    lease_runner: Option<String>,
    lease_runner_id: Option<String>,
    lease_base: Option<String>,
    lease_previous: Option<String>,
    patch_commit: Option<String>,
    avoid_runner: Option<String>,
    verified_tree: Option<String>,
    deps_pending: i64,
    version: i64,
    created_at: i64,
    updated_at: i64,
    requires: String,
    max_cost_cents: Option<f64>,
    paused: Option<String>,
    children: i64,
    children_done: i64,
    children_cancelled: i64,
    children_cost_cents: f64,
    base_check: i64,
    approval_required: i64,
    approved: i64,
    epic: i64,
}

/// A list row: a task row whose feedback is its length and last bytes ([`LIST_COLUMNS`]).
#[derive(FromRow)]
struct ListRow {
    #[sqlx(flatten)]
    row: CandidateRow,
    feedback_bytes: Option<i64>,
    feedback_tail: Option<Vec<u8>>,
}

impl ListRow {
    fn into_task(self) -> Result<Task> {
        let mut task = self.row.into_task()?;
        task.state.feedback = match (self.feedback_bytes, self.feedback_tail) {
            (Some(len), Some(tail)) => Some(keep_end_of(
                usize::try_from(len).map_err(|_| corrupt("feedback length", &len.to_string()))?,
                &tail,
            )),
            _ => None,
        };
        Ok(task)
    }
}

/// A task row with its dependencies joined into one column.
#[derive(FromRow)]
struct CandidateRow {
    #[sqlx(flatten)]
    task: TaskRow,
    deps: Option<String>,
}

/// Tasks from rows read in full (`sqlx::query(…).fetch_all`) before any is decoded. Decoding
/// a row and freeing it on this thread while the connection's worker thread still reads the
/// next ones made both wait on SQLite's allocator, which takes one process-wide lock for every
/// value of every row (30 a task): a page of 100 tasks cost ~3 ms, mostly in that lock.
fn candidates(rows: Vec<SqliteRow>) -> Result<Vec<Task>> {
    rows.iter()
        .map(|row| CandidateRow::from_row(row)?.into_task())
        .collect()
}

impl CandidateRow {
    fn into_task(self) -> Result<Task> {
        let deps = self
            .deps
            .as_deref()
            .map(|d| d.split('\u{1f}').map(stored_id).collect::<Result<Vec<_>>>())
            .transpose()?
            .unwrap_or_default();
        self.task.into_task(deps)
    }
}

/// The task columns of a list: the description stays behind (lists never carry it), and of
/// the feedback (up to 64 KiB) only its length and last `LIST_FEEDBACK_BYTES` bytes come.
const LIST_COLUMNS: &str = "seq, id, title, '' AS description, namespace, priority, parent, \
     status, patchset, failures, lost_leases, cost_cents, cost_at_retry, backoff_until, \
     NULL AS feedback, length(CAST(feedback AS BLOB)) AS feedback_bytes, \
     substr(CAST(feedback AS BLOB), -1024) AS feedback_tail, amend, lease_id, lease_epoch, lease_runner, lease_runner_id, lease_base, \
     lease_previous, patch_commit, avoid_runner, verified_tree, deps_pending, version, \
     created_at, updated_at, requires, max_cost_cents, paused, children, children_done, \
     children_cancelled, children_cost_cents, base_check, approval_required, approved, epic";

/// One page of `columns` of the tasks matching `filter` in lease order, after the key
/// (`?1` priority, `?2` seq), at most `?3` rows; `filter` binds from `?4` (but see
/// `list_tasks` on binding what a partial index compares). Two index ranges, the
/// rest of the key's priority and then the priorities after it: a row value `(priority, seq) >
/// (?, ?)` would seek on the priority alone and scan the seqs before the key.
fn keyset_page(columns: &str, filter: &str) -> String {
    format!(
        "SELECT * FROM (SELECT {columns} FROM tasks t WHERE {filter} \
           AND priority = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3) \
         UNION ALL \
         SELECT * FROM (SELECT {columns} FROM tasks t WHERE {filter} \
           AND priority > ?1 ORDER BY priority, seq LIMIT ?3) \
         LIMIT ?3"
    )
}

/// A task's dependencies in one column, joined by a separator no ID holds.
const DEPS_COLUMN: &str = "(SELECT group_concat(depends_on, char(31)) FROM \
     (SELECT depends_on FROM task_deps WHERE task_id = t.id ORDER BY depends_on)) AS deps";

const TASK_COLUMNS: &str = "seq, id, title, description, namespace, priority, parent, status, \
     patchset, failures, lost_leases, cost_cents, cost_at_retry, backoff_until, feedback, amend, lease_id, \
     lease_epoch, lease_runner, lease_runner_id, lease_base, lease_previous, patch_commit, \
     avoid_runner, verified_tree, deps_pending, version, created_at, updated_at, requires, \
     max_cost_cents, paused, children, children_done, children_cancelled, children_cost_cents, \
     base_check, approval_required, approved, epic";

/// What a task requires of its runner, as stored: its labels joined by U+001F, which no label
/// holds ([`crate::domain::validate_requires`]); empty for none.
fn join_requires(requires: &[String]) -> String {
    requires.join("\u{1f}")
}

fn split_requires(stored: &str) -> Vec<String> {
    if stored.is_empty() {
        return Vec::new();
    }
    stored.split('\u{1f}').map(str::to_owned).collect()
}

fn corrupt(what: &str, value: &str) -> Error {
    Error::Internal(format!("database holds an invalid {what}: {value:?}"))
}

fn stored_id(raw: &str) -> Result<TaskId> {
    TaskId::parse(raw).map_err(|_| corrupt("task id", raw))
}

fn stored_status(raw: &str) -> Result<TaskStatus> {
    TaskStatus::parse(raw).ok_or_else(|| corrupt("task status", raw))
}

fn to_u32(what: &str, n: i64) -> Result<u32> {
    u32::try_from(n).map_err(|_| corrupt(what, &n.to_string()))
}

fn stored_commit(raw: &str) -> Result<CommitId> {
    CommitId::parse(raw).map_err(|_| corrupt("commit id", raw))
}

fn stored_tree(raw: &str) -> Result<TreeId> {
    TreeId::parse(raw).map_err(|_| corrupt("tree id", raw))
}

impl TaskRow {
    fn into_task(self, depends_on: Vec<TaskId>) -> Result<Task> {
        let lease_epoch = u64::try_from(self.lease_epoch)
            .map_err(|_| corrupt("lease epoch", &self.lease_epoch.to_string()))?;
        let lease = match (
            self.lease_id,
            self.lease_runner,
            self.lease_runner_id,
            self.lease_base,
        ) {
            (Some(id), Some(runner), Some(runner_id), Some(base_commit)) => Some(Lease {
                id,
                epoch: lease_epoch,
                runner,
                runner_id,
                base_commit: stored_commit(&base_commit)?,
                previous_commit: self
                    .lease_previous
                    .as_deref()
                    .map(stored_commit)
                    .transpose()?,
            }),
            _ => None,
        };
        Ok(Task {
            id: stored_id(&self.id)?,
            seq: self.seq,
            title: self.title,
            description: self.description,
            namespace: self.namespace,
            priority: u8::try_from(self.priority)
                .map_err(|_| corrupt("priority", &self.priority.to_string()))?,
            parent: self.parent.as_deref().map(stored_id).transpose()?,
            depends_on,
            requires: split_requires(&self.requires),
            paused: self.paused,
            deps_pending: to_u32("pending dependency count", self.deps_pending)?,
            children: Children {
                total: to_u32("child count", self.children)?,
                done: to_u32("done child count", self.children_done)?,
                cancelled: to_u32("cancelled child count", self.children_cancelled)?,
                cost_cents: self.children_cost_cents,
                declared: self.epic != 0,
            },
            state: TaskState {
                status: stored_status(&self.status)?,
                patchset: to_u32("patchset", self.patchset)?,
                failures: to_u32("failure count", self.failures)?,
                lost_leases: to_u32("lost lease count", self.lost_leases)?,
                cost_cents: self.cost_cents,
                cost_at_retry: self.cost_at_retry,
                backoff_until: self.backoff_until,
                feedback: self.feedback,
                amend: self.amend != 0,
                max_cost_cents: self.max_cost_cents,
                base_check: self.base_check != 0,
                approval_required: self.approval_required != 0,
                approved: self.approved != 0,
            },
            lease,
            lease_epoch,
            patch_commit: self
                .patch_commit
                .as_deref()
                .map(stored_commit)
                .transpose()?,
            avoid_runner: self.avoid_runner,
            verified_tree: self.verified_tree.as_deref().map(stored_tree).transpose()?,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

#[derive(FromRow)]
struct RunRow {
    id: i64,
    task_id: String,
    phase: String,
    patchset: i64,
    attempt: i64,
    runner: Option<String>,
    status: String,
    cost_cents: f64,
    started_at: i64,
    finished_at: Option<i64>,
    error: Option<String>,
    failure_kind: Option<String>,
    train: Option<i64>,
    builds: Option<i64>,
    agent: Option<String>,
    model: Option<String>,
    input_tokens: Option<i64>,
    cached_input_tokens: Option<i64>,
    cache_write_tokens: Option<i64>,
    output_tokens: Option<i64>,
    reasoning_tokens: Option<i64>,
    cost_source: Option<String>,
    usage_complete: Option<i64>,
    session_id: Option<String>,
}

/// The columns a [`RunRow`] reads.
const RUN_COLUMNS: &str = "id, task_id, phase, patchset, attempt, runner, status, cost_cents, \
     started_at, finished_at, error, failure_kind, train, builds, agent, model, input_tokens, \
     cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_source, \
     usage_complete, session_id";

/// A stored token count (never negative: the table checks).
fn to_tokens(what: &str, n: Option<i64>) -> Result<u64> {
    u64::try_from(n.unwrap_or(0)).map_err(|_| corrupt(what, &format!("{n:?}")))
}

/// A token count to store: the edge bounds them far below `i64::MAX`.
fn tokens_to_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl RunRow {
    /// The run's usage report, when it has one (`agent` is set); its cost is the run's.
    fn usage(&mut self) -> Result<Option<Usage>> {
        let Some(agent) = self.agent.take() else {
            return Ok(None);
        };
        let source = self.cost_source.as_deref().unwrap_or("none");
        Ok(Some(Usage {
            agent,
            model: self.model.take(),
            input_tokens: to_tokens("input_tokens", self.input_tokens)?,
            cached_input_tokens: to_tokens("cached_input_tokens", self.cached_input_tokens)?,
            cache_write_tokens: to_tokens("cache_write_tokens", self.cache_write_tokens)?,
            output_tokens: to_tokens("output_tokens", self.output_tokens)?,
            reasoning_tokens: to_tokens("reasoning_tokens", self.reasoning_tokens)?,
            cost_cents: self.cost_cents,
            cost_source: CostSource::parse(source).ok_or_else(|| corrupt("cost source", source))?,
            complete: self.usage_complete == Some(1),
            session_id: self.session_id.take(),
        }))
    }

    fn into_run(mut self) -> Result<Run> {
        let usage = self.usage()?;
        Ok(Run {
            id: self.id,
            task_id: stored_id(&self.task_id)?,
            phase: Phase::parse(&self.phase).ok_or_else(|| corrupt("phase", &self.phase))?,
            patchset: to_u32("patchset", self.patchset)?,
            attempt: to_u32("attempt", self.attempt)?,
            runner: self.runner,
            status: RunStatus::parse(&self.status)
                .ok_or_else(|| corrupt("run status", &self.status))?,
            cost_cents: self.cost_cents,
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error,
            failure_kind: self
                .failure_kind
                .as_deref()
                .map(|k| FailureKind::parse(k).ok_or_else(|| corrupt("failure kind", k)))
                .transpose()?,
            train: self.train,
            builds: self.builds.map(|b| to_u32("builds", b)).transpose()?,
            usage,
        })
    }
}

#[derive(FromRow)]
struct EventRow {
    id: i64,
    task_id: String,
    at: i64,
    kind: String,
    from_status: Option<String>,
    to_status: String,
    message: String,
}

impl EventRow {
    fn into_event(self) -> Result<TaskEvent> {
        Ok(TaskEvent {
            id: self.id,
            task_id: stored_id(&self.task_id)?,
            at: self.at,
            kind: self.kind,
            from: self.from_status.as_deref().map(stored_status).transpose()?,
            to: stored_status(&self.to_status)?,
            message: self.message,
        })
    }
}

async fn task_exists(conn: &mut SqliteConnection, id: &str) -> Result<bool> {
    let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM tasks WHERE id = ?")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    Ok(found.is_some())
}

async fn load_task(conn: &mut SqliteConnection, id: &str) -> Result<Option<Task>> {
    let row: Option<TaskRow> =
        sqlx::query_as(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(row) = row else { return Ok(None) };
    let deps: Vec<String> = sqlx::query_scalar(
        "SELECT depends_on FROM task_deps WHERE task_id = ? ORDER BY depends_on",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let deps = deps.iter().map(|d| stored_id(d)).collect::<Result<_>>()?;
    row.into_task(deps).map(Some)
}

async fn require_existing(conn: &mut SqliteConnection, ids: &[TaskId], role: &str) -> Result<()> {
    for dep in ids {
        if !task_exists(conn, dep.as_str()).await? {
            return Err(Error::NotFound(format!(
                "{role} {dep} does not exist; create it first"
            )));
        }
    }
    Ok(())
}

/// Edges of tasks a batch creates before they are written (the earlier lines of the batch):
/// each one's dependencies, and the children each parent gains.
#[derive(Default)]
struct Unwritten {
    deps: HashMap<TaskId, Vec<TaskId>>,
    children: HashMap<TaskId, Vec<TaskId>>,
}

/// Whether `from` waits for `to`, directly or not: a task waits for its dependencies, and an
/// epic for its children. Walks the graph a level at a time (one statement per level for the
/// stored tasks; `unwritten` for the batch's own).
async fn waits_for(
    conn: &mut SqliteConnection,
    from: &TaskId,
    to: &TaskId,
    unwritten: &Unwritten,
) -> Result<bool> {
    let mut seen: HashSet<TaskId> = HashSet::new();
    let mut frontier = vec![from.clone()];
    while !frontier.is_empty() {
        if frontier.contains(to) {
            return Ok(true);
        }
        frontier.retain(|t| seen.insert(t.clone()));
        let mut next = Vec::new();
        let mut stored: Vec<&str> = Vec::new();
        for t in &frontier {
            next.extend(unwritten.children.get(t).into_iter().flatten().cloned());
            match unwritten.deps.get(t) {
                // A task of the batch: nothing stored depends on it or is its child yet.
                Some(deps) => next.extend(deps.iter().cloned()),
                None => stored.push(t.as_str()),
            }
        }
        for select in [
            "SELECT task_id, depends_on FROM task_deps WHERE task_id IN (",
            "SELECT parent, id FROM tasks WHERE parent IN (",
        ] {
            for (_, to) in edges_of(&mut *conn, select, &stored).await? {
                next.push(stored_id(&to)?);
            }
        }
        frontier = next;
    }
    Ok(false)
}

/// Whether `ancestor` is `task`'s parent, or its parent's, and so on.
async fn is_ancestor_task(
    conn: &mut SqliteConnection,
    ancestor: &TaskId,
    task: &TaskId,
) -> Result<bool> {
    let found: Option<i64> = sqlx::query_scalar(
        "WITH RECURSIVE up(id) AS ( \
             SELECT parent FROM tasks WHERE id = ?1 \
             UNION SELECT t.parent FROM tasks t JOIN up ON t.id = up.id) \
         SELECT 1 FROM up WHERE id = ?2 LIMIT 1",
    )
    .bind(task.as_str())
    .bind(ancestor.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(found.is_some())
}

/// The (id, other) rows of `select` (a statement ending in `IN (`) for `ids`, a chunk of them
/// per statement; unlike [`pairs_of`], an id may have many.
async fn edges_of(
    conn: &mut SqliteConnection,
    select: &str,
    ids: &[&str],
) -> Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<Sqlite>::new(select);
        let mut list = q.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        q.push(")");
        found.extend(
            q.build_query_as::<(String, String)>()
                .fetch_all(&mut *conn)
                .await?,
        );
    }
    Ok(found)
}

async fn insert_event(
    conn: &mut SqliteConnection,
    id: &TaskId,
    at: Millis,
    kind: &str,
    from: Option<TaskStatus>,
    to: TaskStatus,
    message: &str,
) -> Result<i64> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO task_events (task_id, at, kind, from_status, to_status, message) \
         VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(id.as_str())
    .bind(at)
    .bind(kind)
    .bind(from.map(TaskStatus::as_str))
    .bind(to.as_str())
    .bind(message)
    .fetch_one(conn)
    .await?;
    Ok(id)
}

/// A new run's attempt (`?1` the task, `?2` the phase, `?4` the runner): its place among the
/// task's runs of its phase by the same party (runners, or the server); a server's verify run
/// (its build of the base a runner's verification failed on) takes the attempt of the
/// runner's verification it settles, so `logs --run N` shows them together.
const ATTEMPT: &str = "CASE WHEN ?2 = 'verify' AND ?4 IS NULL \
     THEN (SELECT MAX(COUNT(*), 1) FROM runs \
           WHERE task_id = ?1 AND phase = 'verify' AND runner IS NOT NULL) \
     ELSE (SELECT COUNT(*) + 1 FROM runs \
           WHERE task_id = ?1 AND phase = ?2 AND (runner IS NULL) = (?4 IS NULL)) END";

/// Inserts a run that starts now; returns its ID.
async fn insert_run(
    tx: &mut SqliteConnection,
    task: &TaskId,
    run: &NewRun,
    at: Millis,
) -> Result<i64> {
    Ok(sqlx::query_scalar(&format!(
        "INSERT INTO runs (task_id, phase, patchset, attempt, runner, status, started_at, \
             train) VALUES (?1, ?2, ?3, {ATTEMPT}, ?4, 'running', ?5, ?6) RETURNING id"
    ))
    .bind(task.as_str())
    .bind(run.phase.as_str())
    .bind(i64::from(run.patchset))
    .bind(&run.runner)
    .bind(at)
    .bind(run.train)
    .fetch_one(&mut *tx)
    .await?)
}

/// Ends runs of `task` still running: the one `run`, or all of them.
async fn end_runs(
    tx: &mut SqliteConnection,
    task: &TaskId,
    run: Option<i64>,
    end: &RunEnd,
    at: Millis,
) -> Result<()> {
    let u = end.usage.as_ref();
    sqlx::query(
        "UPDATE runs SET status = ?1, finished_at = ?2, cost_cents = cost_cents + ?3, \
         error = ?4, failure_kind = ?5, builds = COALESCE(?8, builds), agent = ?9, \
         model = ?10, input_tokens = ?11, cached_input_tokens = ?12, cache_write_tokens = ?13, \
         output_tokens = ?14, reasoning_tokens = ?15, cost_source = ?16, usage_complete = ?17, \
         session_id = ?18 \
         WHERE task_id = ?6 AND status = 'running' AND (?7 IS NULL OR id = ?7)",
    )
    .bind(end.status.as_str())
    .bind(at)
    .bind(end.cost_cents)
    .bind(&end.error)
    .bind(end.failure_kind.map(FailureKind::as_str))
    .bind(task.as_str())
    .bind(run)
    .bind(end.builds.map(i64::from))
    .bind(u.map(|u| u.agent.as_str()))
    .bind(u.and_then(|u| u.model.as_deref()))
    .bind(u.map(|u| tokens_to_sql(u.input_tokens)))
    .bind(u.map(|u| tokens_to_sql(u.cached_input_tokens)))
    .bind(u.map(|u| tokens_to_sql(u.cache_write_tokens)))
    .bind(u.map(|u| tokens_to_sql(u.output_tokens)))
    .bind(u.map(|u| tokens_to_sql(u.reasoning_tokens)))
    .bind(u.map(|u| u.cost_source.as_str()))
    .bind(u.map(|u| i64::from(u.complete)))
    .bind(u.and_then(|u| u.session_id.as_deref()))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// One write inside a write transaction: the compare-and-swap on the version (every mutable
/// column set from the record, the row read back in the same statement), the dependents'
/// pending counts when the task became Done, its history entry and its runs.
async fn write_task(tx: &mut SqliteConnection, w: &TaskWrite) -> Result<Committed> {
    let n = &w.next;
    let s = &n.state;
    let lease = n.lease.as_ref();
    let row: Option<TaskRow> =
        sqlx::query_as(&format!(
            "UPDATE tasks SET status = ?1, patchset = ?2, failures = ?3, lost_leases = ?4, \
         cost_cents = ?5, cost_at_retry = ?6, backoff_until = ?7, feedback = ?8, amend = ?9, \
         lease_id = ?10, lease_epoch = ?11, lease_runner = ?12, lease_runner_id = ?13, \
         lease_base = ?14, lease_previous = ?15, patch_commit = ?16, avoid_runner = ?17, \
         verified_tree = ?18, base_check = ?22, approved = ?23, version = version + 1, \
         updated_at = ?19 \
         WHERE id = ?20 AND version = ?21 RETURNING {TASK_COLUMNS}"
        ))
        .bind(s.status.as_str())
        .bind(i64::from(s.patchset))
        .bind(i64::from(s.failures))
        .bind(i64::from(s.lost_leases))
        .bind(s.cost_cents)
        .bind(s.cost_at_retry)
        .bind(s.backoff_until)
        .bind(&s.feedback)
        .bind(i64::from(s.amend))
        .bind(lease.map(|l| l.id.as_str()))
        .bind(i64::try_from(n.lease_epoch).map_err(|_| {
            Error::Internal(format!("lease epoch {} is out of range", n.lease_epoch))
        })?)
        .bind(lease.map(|l| l.runner.as_str()))
        .bind(lease.map(|l| l.runner_id.as_str()))
        .bind(lease.map(|l| l.base_commit.as_str()))
        .bind(lease.and_then(|l| l.previous_commit.as_ref().map(CommitId::as_str)))
        .bind(n.patch_commit.as_ref().map(CommitId::as_str))
        .bind(n.avoid_runner.as_deref())
        .bind(n.verified_tree.as_ref().map(TreeId::as_str))
        .bind(w.at)
        .bind(w.task_id.as_str())
        .bind(w.expected_version)
        .bind(i64::from(s.base_check))
        .bind(i64::from(s.approved))
        .fetch_optional(&mut *tx)
        .await?;
    let Some(row) = row else {
        return Err(if task_exists(tx, w.task_id.as_str()).await? {
            Error::Conflict(format!(
                "task {} changed while this request was being decided; try again",
                w.task_id
            ))
        } else {
            Error::NotFound(format!("task {} does not exist", w.task_id))
        });
    };
    if s.status == TaskStatus::Done && w.event.from != TaskStatus::Done {
        sqlx::query(
            "UPDATE tasks SET deps_pending = deps_pending - 1 WHERE deps_pending > 0 AND id IN \
             (SELECT task_id FROM task_deps WHERE depends_on = ?)",
        )
        .bind(w.task_id.as_str())
        .execute(&mut *tx)
        .await?;
    }
    if w.end_integration {
        sqlx::query("DELETE FROM integrations WHERE task_id = ?")
            .bind(w.task_id.as_str())
            .execute(&mut *tx)
            .await?;
    }
    let event_id = insert_event(
        tx,
        &w.task_id,
        w.at,
        &w.event.kind,
        Some(w.event.from),
        w.event.to,
        &w.event.message,
    )
    .await?;
    for (run, end) in &w.runs.end {
        end_runs(tx, &w.task_id, Some(*run), end, w.at).await?;
    }
    if let Some(end) = &w.runs.close_rest {
        end_runs(tx, &w.task_id, None, end, w.at).await?;
    }
    let mut run_id = None;
    if let Some(run) = &w.runs.start {
        run_id = Some(insert_run(tx, &w.task_id, run, w.at).await?);
    }
    for run in &w.runs.record {
        sqlx::query(&format!(
            "INSERT INTO runs (task_id, phase, patchset, attempt, runner, status, \
             cost_cents, started_at, finished_at, error, failure_kind, train, builds) \
             VALUES (?1, ?2, ?3, {ATTEMPT}, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
        ))
        .bind(w.task_id.as_str())
        .bind(run.phase.as_str())
        .bind(i64::from(run.patchset))
        .bind(&run.runner)
        .bind(run.status.as_str())
        .bind(run.cost_cents)
        .bind(run.started_at)
        .bind(w.at)
        .bind(&run.error)
        .bind(run.failure_kind.map(FailureKind::as_str))
        .bind(run.train)
        .bind(run.builds.map(i64::from))
        .execute(&mut *tx)
        .await?;
    }
    Ok(Committed {
        task: row.into_task(w.depends_on.clone())?,
        event_id,
        run_id,
    })
}

/// The next generated task number, read from `meta` once per transaction (see
/// [`IdCounter::store`]).
struct IdCounter {
    next: Option<u64>,
    changed: bool,
}

impl IdCounter {
    fn new() -> Self {
        Self {
            next: None,
            changed: false,
        }
    }

    /// The number the next generated ID tries first.
    async fn peek(&mut self, conn: &mut SqliteConnection) -> Result<u64> {
        if let Some(n) = self.next {
            return Ok(n);
        }
        let stored: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(NEXT_TASK_NUMBER)
            .fetch_optional(&mut *conn)
            .await?;
        let n = match stored {
            Some(v) => v.parse().map_err(|_| corrupt("task counter", &v))?,
            None => 1,
        };
        self.next = Some(n);
        Ok(n)
    }

    /// Writes the counter back, if it moved (in the same transaction).
    async fn store(self, conn: &mut SqliteConnection) -> Result<()> {
        if let (true, Some(n)) = (self.changed, self.next) {
            sqlx::query("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)")
                .bind(NEXT_TASK_NUMBER)
                .bind(n.to_string())
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

/// Rows a multi-row statement writes at once: well under SQLite's 32,766 parameters.
const ROWS_PER_STATEMENT: usize = 1000;

/// The statuses of the tasks among `ids` that exist, by ID (one statement a thousand IDs).
async fn existing_statuses(
    conn: &mut SqliteConnection,
    ids: &[&str],
) -> Result<HashMap<String, String>> {
    pairs_of(conn, "SELECT id, status FROM tasks WHERE id IN (", ids).await
}

/// Why each of `ids` that is paused is.
async fn paused_of(conn: &mut SqliteConnection, ids: &[&str]) -> Result<HashMap<String, String>> {
    pairs_of(
        conn,
        "SELECT id, paused FROM tasks WHERE paused IS NOT NULL AND id IN (",
        ids,
    )
    .await
}

/// The (id, value) rows of `select` (a statement ending in `id IN (`) for `ids`, a chunk of
/// them per statement.
async fn pairs_of(
    conn: &mut SqliteConnection,
    select: &str,
    ids: &[&str],
) -> Result<HashMap<String, String>> {
    let mut found = HashMap::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<Sqlite>::new(select);
        let mut list = q.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        q.push(")");
        let rows: Vec<(String, String)> = q.build_query_as().fetch_all(&mut *conn).await?;
        found.extend(rows);
    }
    Ok(found)
}

/// Inserts tasks in state Open, in order, each with its history's first entry; returns them
/// (built from what was written, without reading the rows back). The outcome is that of
/// inserting them one at a time (a task may name one earlier in the list; the first that
/// cannot be created fails the whole call, its error `in_batch` when `batch`), but the
/// statements are per list, not per task: one read of every row the list names, then
/// multi-row inserts of the tasks, their dependencies and their history.
async fn insert_tasks(
    tx: &mut SqliteConnection,
    new: Vec<NewTask>,
    now: Millis,
    batch: bool,
) -> Result<Vec<(Task, TaskEvent)>> {
    let fail = |i: usize, e: Error| if batch { e.in_batch(i) } else { e };
    // Every task the list names (chosen IDs, parents, dependencies), as the database has them.
    let mut named: Vec<&str> = Vec::new();
    for t in &new {
        named.extend(
            t.id.iter()
                .chain(&t.parent)
                .chain(&t.depends_on)
                .map(|i| i.as_str()),
        );
    }
    named.sort_unstable();
    named.dedup();
    let stored = existing_statuses(&mut *tx, &named).await?;
    drop(named);
    // A child of a paused task (an epic) is created paused with it.
    let mut parents: Vec<&str> = new
        .iter()
        .filter_map(|t| t.parent.as_ref().map(TaskId::as_str))
        .collect();
    parents.sort_unstable();
    parents.dedup();
    let paused_parents = paused_of(&mut *tx, &parents).await?;
    drop(parents);
    // Which generated IDs the database holds, read ahead a range at a time.
    let mut ids = IdCounter::new();
    let generated = new.iter().filter(|t| t.id.is_none()).count();
    let (mut next, mut read_until) = (ids.peek(&mut *tx).await?, 0);
    let mut taken_numbers: HashSet<String> = HashSet::new();
    // The IDs of the list so far: what a later task may name, and may not take.
    let mut listed: HashSet<TaskId> = HashSet::with_capacity(new.len());
    // Their edges, for the cycle check of the later ones.
    let mut unwritten = Unwritten::default();
    let mut left = generated;
    let mut rows = Vec::with_capacity(new.len());
    for (i, task) in new.into_iter().enumerate() {
        let id = match task.id.clone() {
            Some(id) => {
                if stored.contains_key(id.as_str()) || listed.contains(&id) {
                    return Err(fail(
                        i,
                        Error::AlreadyExists(format!(
                            "task {id} already exists; pick another --id or leave it out"
                        )),
                    ));
                }
                id
            }
            None => loop {
                if next > MAX_GENERATED {
                    return Err(fail(i, super::ids_exhausted()));
                }
                if next >= read_until {
                    let ahead = (left as u64 + 16)
                        .min(ROWS_PER_STATEMENT as u64)
                        .min(MAX_GENERATED - next + 1);
                    let candidates: Vec<TaskId> =
                        (next..next + ahead).map(TaskId::generated).collect();
                    let candidates: Vec<&str> = candidates.iter().map(|c| c.as_str()).collect();
                    taken_numbers
                        .extend(existing_statuses(&mut *tx, &candidates).await?.into_keys());
                    read_until = next + ahead;
                }
                let id = TaskId::generated(next);
                next += 1;
                if !taken_numbers.contains(id.as_str()) && !listed.contains(&id) {
                    left -= 1;
                    ids.next = Some(next);
                    ids.changed = true;
                    break id;
                }
            },
        };
        let exists = |t: &TaskId| stored.contains_key(t.as_str()) || listed.contains(t);
        if let Some(parent) = task.parent.as_ref().filter(|p| !exists(p)) {
            return Err(fail(
                i,
                Error::NotFound(format!(
                    "parent task {parent} does not exist; create it first"
                )),
            ));
        }
        if let Some(dep) = task.depends_on.iter().find(|d| !exists(d)) {
            return Err(fail(
                i,
                Error::NotFound(format!("dependency {dep} does not exist; create it first")),
            ));
        }
        // The new task's only waiter is its epic: a dependency that waits for the epic would
        // wait for the task itself.
        if let Some(parent) = &task.parent {
            for dep in &task.depends_on {
                if waits_for(&mut *tx, dep, parent, &unwritten).await? {
                    return Err(fail(i, super::cycle_refusal(&id, dep)));
                }
            }
            unwritten
                .children
                .entry(parent.clone())
                .or_default()
                .push(id.clone());
        }
        unwritten.deps.insert(id.clone(), task.depends_on.clone());
        // A dependency earlier in the list is Open: not done.
        let deps_pending = task
            .depends_on
            .iter()
            .filter(|d| {
                stored
                    .get(d.as_str())
                    .is_none_or(|s| s != TaskStatus::Done.as_str())
            })
            .count();
        listed.insert(id.clone());
        rows.push((id, task, u32::try_from(deps_pending).unwrap_or(u32::MAX)));
    }

    let mut seqs: HashMap<String, i64> = HashMap::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<Sqlite>::new(
            "INSERT INTO tasks (id, title, description, namespace, priority, parent, status, \
             deps_pending, created_at, updated_at, requires, max_cost_cents, paused, \
             approval_required, epic) ",
        );
        q.push_values(chunk, |mut row, (id, t, pending)| {
            row.push_bind(id.as_str())
                .push_bind(&t.title)
                .push_bind(&t.description)
                .push_bind(&t.namespace)
                .push_bind(i64::from(t.priority))
                .push_bind(t.parent.as_ref().map(TaskId::as_str))
                .push_bind(TaskStatus::Open.as_str())
                .push_bind(i64::from(*pending))
                .push_bind(now)
                .push_bind(now)
                .push_bind(join_requires(&t.requires))
                .push_bind(t.max_cost_cents)
                .push_bind(
                    t.parent
                        .as_ref()
                        .and_then(|p| paused_parents.get(p.as_str()))
                        .cloned(),
                )
                .push_bind(i64::from(t.approval))
                .push_bind(i64::from(t.epic));
        });
        q.push(" RETURNING id, seq");
        let written: Vec<(String, i64)> = q.build_query_as().fetch_all(&mut *tx).await?;
        seqs.extend(written);
    }
    let edges: Vec<(&TaskId, &TaskId)> = rows
        .iter()
        .flat_map(|(id, t, _)| t.depends_on.iter().map(move |d| (id, d)))
        .collect();
    for chunk in edges.chunks(ROWS_PER_STATEMENT) {
        let mut q =
            sqlx::QueryBuilder::<Sqlite>::new("INSERT INTO task_deps (task_id, depends_on) ");
        q.push_values(chunk, |mut row, (id, dep)| {
            row.push_bind(id.as_str()).push_bind(dep.as_str());
        });
        q.build().execute(&mut *tx).await?;
    }
    let messages: Vec<String> = rows
        .iter()
        .map(|(_, t, _)| format!("created with priority {}", t.priority))
        .collect();
    let mut event_ids: HashMap<String, i64> = HashMap::with_capacity(rows.len());
    for (chunk, texts) in rows
        .chunks(ROWS_PER_STATEMENT)
        .zip(messages.chunks(ROWS_PER_STATEMENT))
    {
        let mut q = sqlx::QueryBuilder::<Sqlite>::new(
            "INSERT INTO task_events (task_id, at, kind, from_status, to_status, message) ",
        );
        q.push_values(chunk.iter().zip(texts), |mut row, ((id, _, _), text)| {
            row.push_bind(id.as_str())
                .push_bind(now)
                .push_bind("created")
                .push_bind(None::<&str>)
                .push_bind(TaskStatus::Open.as_str())
                .push_bind(text.as_str());
        });
        q.push(" RETURNING task_id, id");
        let written: Vec<(String, i64)> = q.build_query_as().fetch_all(&mut *tx).await?;
        event_ids.extend(written);
    }
    ids.store(&mut *tx).await?;

    // A task of the list with children later in it is an epic from the start.
    let mut children: HashMap<TaskId, u32> = HashMap::new();
    for (_, t, _) in &rows {
        if let Some(parent) = &t.parent {
            *children.entry(parent.clone()).or_default() += 1;
        }
    }
    let mut created = Vec::with_capacity(rows.len());
    for ((id, mut new, deps_pending), message) in rows.into_iter().zip(messages) {
        let (Some(&seq), Some(&event_id)) = (seqs.get(id.as_str()), event_ids.get(id.as_str()))
        else {
            return Err(Error::Internal(format!(
                "task {id} was inserted without its row or its history"
            )));
        };
        let task = Task {
            id: id.clone(),
            seq,
            title: new.title,
            description: new.description,
            namespace: new.namespace,
            priority: new.priority,
            paused: new
                .parent
                .as_ref()
                .and_then(|p| paused_parents.get(p.as_str()))
                .cloned(),
            parent: new.parent,
            depends_on: {
                new.depends_on.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                new.depends_on
            },
            requires: new.requires,
            deps_pending,
            children: Children {
                total: children.get(&id).copied().unwrap_or(0),
                declared: new.epic,
                ..Children::default()
            },
            state: TaskState {
                max_cost_cents: new.max_cost_cents,
                approval_required: new.approval,
                ..TaskState::new()
            },
            lease: None,
            lease_epoch: 0,
            patch_commit: None,
            avoid_runner: None,
            verified_tree: None,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        let event = TaskEvent {
            id: event_id,
            task_id: id,
            at: now,
            kind: "created".to_owned(),
            from: None,
            to: TaskStatus::Open,
            message,
        };
        created.push((task, event));
    }
    Ok(created)
}

async fn insert_dependencies(
    tx: &mut SqliteConnection,
    id: &TaskId,
    deps: &[TaskId],
    event: &NewEvent,
    now: Millis,
) -> Result<Task> {
    let task = load_task(&mut *tx, id.as_str())
        .await?
        .ok_or_else(|| Error::NotFound(format!("task {id} does not exist")))?;
    require_existing(&mut *tx, deps, "dependency").await?;
    let mut added = 0;
    for dep in deps {
        if task.depends_on.contains(dep) {
            continue;
        }
        // A cycle closes if `dep` waits for `id` (or is `id`); an epic depending on one of
        // its own descendants is refused too (it waits for them as their epic already).
        if waits_for(&mut *tx, dep, id, &Unwritten::default()).await? {
            return Err(super::cycle_refusal(id, dep));
        }
        if is_ancestor_task(&mut *tx, id, dep).await? {
            return Err(super::descendant_refusal(id, dep));
        }
        let inserted =
            sqlx::query("INSERT OR IGNORE INTO task_deps (task_id, depends_on) VALUES (?, ?)")
                .bind(id.as_str())
                .bind(dep.as_str())
                .execute(&mut *tx)
                .await?;
        added += inserted.rows_affected();
    }
    if added > 0 {
        refresh_deps_pending(&mut *tx, id).await?;
        insert_event(
            &mut *tx,
            id,
            now,
            &event.kind,
            Some(event.from),
            event.to,
            &event.message,
        )
        .await?;
        sqlx::query("UPDATE tasks SET version = version + 1, updated_at = ? WHERE id = ?")
            .bind(now)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
    }
    load_task(&mut *tx, id.as_str())
        .await?
        .ok_or_else(|| Error::NotFound(format!("task {id} does not exist")))
}

/// Recounts how many of `id`'s dependencies are not Done.
/// Recounts how many of the task's dependencies are not Done; returns the count.
async fn refresh_deps_pending(tx: &mut SqliteConnection, id: &TaskId) -> Result<u32> {
    let pending: i64 = sqlx::query_scalar(
        "UPDATE tasks SET deps_pending = (SELECT COUNT(*) FROM task_deps d \
           JOIN tasks u ON u.id = d.depends_on WHERE d.task_id = ?1 AND u.status <> 'done') \
         WHERE id = ?1 RETURNING deps_pending",
    )
    .bind(id.as_str())
    .fetch_one(&mut *tx)
    .await?;
    u32::try_from(pending).map_err(|_| corrupt("dependency count", &pending.to_string()))
}

impl Store for SqliteStore {
    async fn create_task(&self, new: NewTask, now: Millis) -> Result<Task> {
        let mut tx = self.write().await?;
        let result = insert_tasks(&mut tx, vec![new], now, false)
            .await
            .and_then(|mut created| {
                created
                    .pop()
                    .map(|(task, _)| task)
                    .ok_or_else(|| Error::Internal("a task was not created".to_owned()))
            });
        tx.finish(result).await
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>> {
        let mut conn = self.pool.acquire().await?;
        load_task(&mut conn, id.as_str()).await
    }

    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        after: Option<(u8, i64)>,
        limit: u32,
    ) -> Result<Vec<Task>> {
        // One statement per filter shape, each an index range (tasks_by_status or
        // tasks_by_order) from the last key of the previous page: a page costs the same on the
        // millionth task as on the first. Descriptions stay behind; dependencies come along.
        let (priority, seq) = after.map_or((-1, -1), |(p, s)| (i64::from(p), s));
        let columns = format!("{LIST_COLUMNS}, {DEPS_COLUMN}");
        // The status is written into the statement, not bound: SQLite re-prepares a statement
        // whenever a parameter it compared with a partial index's WHERE (tasks_backoff's
        // `status = 'open'`) is bound again, which cost a ~0.3 ms re-parse on every page.
        // With a parent, the range is tasks_by_parent's (the parent bound as ?4).
        let mut shape = vec![match filter.status {
            Some(status) => format!("status = '{}'", status.as_str()),
            None => "1".to_owned(),
        }];
        if filter.parent.is_some() {
            shape.push("parent = ?4".to_owned());
        }
        let statement = keyset_page(&columns, &shape.join(" AND "));
        let mut query = sqlx::query(&statement)
            .bind(priority)
            .bind(seq)
            .bind(i64::from(limit));
        if let Some(parent) = &filter.parent {
            query = query.bind(parent.as_str());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| ListRow::from_row(row)?.into_task())
            .collect()
    }

    async fn create_tasks(&self, new: Vec<NewTask>, now: Millis) -> Result<Vec<(Task, TaskEvent)>> {
        let mut tx = self.write().await?;
        let result = insert_tasks(&mut tx, new, now, true).await;
        tx.finish(result).await
    }

    async fn set_paused(
        &self,
        id: &TaskId,
        paused: Option<&str>,
        message: &str,
        now: Millis,
    ) -> Result<u32> {
        let mut tx = self.write().await?;
        let result = async {
            let kind = if paused.is_some() {
                "paused"
            } else {
                "resumed"
            };
            // The history first, while the rows still say what changes (those already in the
            // state asked for are left alone).
            sqlx::query(
                "INSERT INTO task_events (task_id, at, kind, from_status, to_status, message) \
                 SELECT id, ?2, ?3, status, status, ?4 FROM tasks \
                 WHERE (id = ?1 OR parent = ?1) AND (paused IS NULL) = (?5 IS NOT NULL)",
            )
            .bind(id.as_str())
            .bind(now)
            .bind(kind)
            .bind(message)
            .bind(paused)
            .execute(&mut *tx)
            .await?;
            let changed = sqlx::query(
                "UPDATE tasks SET paused = ?2, version = version + 1, updated_at = ?3 \
                 WHERE (id = ?1 OR parent = ?1) AND (paused IS NULL) = (?2 IS NOT NULL)",
            )
            .bind(id.as_str())
            .bind(paused)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            Ok(u32::try_from(changed.rows_affected()).unwrap_or(u32::MAX))
        }
        .await;
        tx.finish(result).await
    }

    async fn edit_task(
        &self,
        id: &TaskId,
        version: i64,
        edit: &TaskEdit,
        event: NewEvent,
        now: Millis,
    ) -> Result<Task> {
        let mut tx = self.write().await?;
        let result = async {
            let changed = sqlx::query(
                "UPDATE tasks SET title = coalesce(?1, title), \
                   description = coalesce(?2, description), \
                   namespace = CASE WHEN ?3 THEN ?4 ELSE namespace END, \
                   priority = coalesce(?5, priority), \
                   version = version + 1, updated_at = ?6, \
                   requires = coalesce(?9, requires), \
                   max_cost_cents = CASE WHEN ?11 THEN ?10 ELSE max_cost_cents END \
                 WHERE id = ?7 AND version = ?8",
            )
            .bind(edit.title.as_deref())
            .bind(edit.description.as_deref())
            .bind(edit.namespace.is_some())
            .bind(edit.namespace.clone().flatten())
            .bind(edit.priority.map(i64::from))
            .bind(now)
            .bind(id.as_str())
            .bind(version)
            .bind(edit.requires.as_deref().map(join_requires))
            .bind(edit.max_cost_cents.flatten())
            .bind(edit.max_cost_cents.is_some())
            .execute(&mut *tx)
            .await?;
            if changed.rows_affected() == 0 {
                return Err(if task_exists(&mut tx, id.as_str()).await? {
                    Error::Conflict(format!("task {id} changed while it was being edited"))
                } else {
                    Error::NotFound(format!("task {id} does not exist"))
                });
            }
            insert_event(
                &mut tx,
                id,
                now,
                &event.kind,
                Some(event.from),
                event.to,
                &event.message,
            )
            .await?;
            load_task(&mut tx, id.as_str())
                .await?
                .ok_or_else(|| Error::Internal(format!("task {id} vanished while edited")))
        }
        .await;
        tx.finish(result).await
    }

    async fn add_dependencies(
        &self,
        id: &TaskId,
        deps: &[TaskId],
        event: NewEvent,
        now: Millis,
    ) -> Result<Task> {
        let mut tx = self.write().await?;
        let result = insert_dependencies(&mut tx, id, deps, &event, now).await;
        tx.finish(result).await
    }

    async fn commit(&self, w: TaskWrite) -> Result<Committed> {
        let mut tx = self.write().await?;
        let result = write_task(&mut tx, &w).await;
        tx.finish(result).await
    }

    async fn commit_all(&self, writes: Vec<TaskWrite>) -> Result<Vec<Result<Committed>>> {
        let mut tx = self.write().await?;
        let mut out = Vec::with_capacity(writes.len());
        for w in &writes {
            match write_task(&mut tx, w).await {
                // A lost race wrote nothing (the CAS is the first statement): go on.
                Err(e @ (Error::Conflict(_) | Error::NotFound(_))) => out.push(Err(e)),
                Err(other) => return Err(other),
                Ok(done) => out.push(Ok(done)),
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn lease_candidates(
        &self,
        now: Millis,
        after: Option<(u8, i64)>,
        limit: u32,
    ) -> Result<Vec<Task>> {
        // An index range (tasks_ready, which leaves paused tasks and epics out): no blocked,
        // paused or epic task is read. Their dependencies come in the same statement, joined by a separator
        // no ID holds.
        let (priority, seq) = after.map_or((-1, -1), |(p, s)| (i64::from(p), s));
        let rows = sqlx::query(&keyset_page(
            &format!("{TASK_COLUMNS}, {DEPS_COLUMN}"),
            "status = 'open' AND deps_pending = 0 AND paused IS NULL AND children = 0 \
             AND epic = 0 AND (backoff_until IS NULL OR backoff_until <= ?4)",
        ))
        .bind(priority)
        .bind(seq)
        .bind(i64::from(limit))
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        candidates(rows)
    }

    async fn verified(&self) -> Result<Vec<Task>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS}, {DEPS_COLUMN} \
             FROM tasks t WHERE status = 'verified' ORDER BY priority, seq"
        ))
        .fetch_all(&self.pool)
        .await?;
        candidates(rows)
    }

    async fn finished_epics(&self) -> Result<Vec<TaskId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM tasks INDEXED BY tasks_epics \
             WHERE children > 0 AND status IN ('open', 'needs_help') AND children_done > 0 \
             AND children_done + children_cancelled = children ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| stored_id(id)).collect()
    }

    async fn unfinished(&self) -> Result<Vec<Task>> {
        let mut conn = self.pool.acquire().await?;
        let rows: Vec<TaskRow> = sqlx::query_as(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE status IN \
             ('open', 'in_progress', 'verified', 'needs_help') ORDER BY priority, seq"
        ))
        .fetch_all(&mut *conn)
        .await?;
        let mut tasks = Vec::with_capacity(rows.len());
        for row in rows {
            let deps: Vec<String> = sqlx::query_scalar(
                "SELECT depends_on FROM task_deps WHERE task_id = ? ORDER BY depends_on",
            )
            .bind(&row.id)
            .fetch_all(&mut *conn)
            .await?;
            let deps = deps.iter().map(|d| stored_id(d)).collect::<Result<_>>()?;
            tasks.push(row.into_task(deps)?);
        }
        Ok(tasks)
    }

    async fn raise_next_task_number(&self, at_least: u64) -> Result<()> {
        let mut tx = self.write().await?;
        let next: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(NEXT_TASK_NUMBER)
            .fetch_optional(&mut *tx)
            .await?;
        let next: u64 = match next {
            Some(v) => v.parse().map_err(|_| corrupt("task counter", &v))?,
            None => 1,
        };
        if at_least > next {
            sqlx::query("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)")
                .bind(NEXT_TASK_NUMBER)
                .bind(at_least.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    async fn is_fresh(&self) -> Result<bool> {
        let any_task: Option<i64> = sqlx::query_scalar("SELECT 1 FROM tasks LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        let counter: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(NEXT_TASK_NUMBER)
            .fetch_optional(&self.pool)
            .await?;
        Ok(any_task.is_none() && counter.is_none())
    }

    async fn next_backoff_end(&self, now: Millis) -> Result<Option<Millis>> {
        // The partial index of open tasks in back-off, named so that the planner never picks
        // the status index and scans every open task instead.
        Ok(sqlx::query_scalar(
            "SELECT backoff_until FROM tasks INDEXED BY tasks_backoff \
             WHERE status = 'open' AND backoff_until > ? ORDER BY backoff_until LIMIT 1",
        )
        .bind(now)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn runs(&self, id: &TaskId) -> Result<Vec<Run>> {
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE task_id = ? ORDER BY id"
        ))
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(RunRow::into_run).collect()
    }

    async fn events(&self, id: &TaskId) -> Result<Vec<TaskEvent>> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT id, task_id, at, kind, from_status, to_status, message \
             FROM task_events WHERE task_id = ? ORDER BY id",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(EventRow::into_event).collect()
    }

    async fn status_counts(&self) -> Result<StatusCounts> {
        let mut conn = self.pool.acquire().await?;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM tasks GROUP BY status")
                .fetch_all(&mut *conn)
                .await?;
        let mut counts = StatusCounts::default();
        for (status, n) in rows {
            counts.add(stored_status(&status)?, n.unsigned_abs());
        }
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM runs WHERE status = 'running' AND phase = 'dev'",
        )
        .fetch_one(&mut *conn)
        .await?;
        counts.active_dev_runs = active.unsigned_abs();
        Ok(counts)
    }

    async fn tokens_of(&self, ids: &[TaskId]) -> Result<Vec<(TaskId, u64)>> {
        let mut out = Vec::with_capacity(ids.len());
        // By runs_by_task, one parameter a task.
        for chunk in ids.chunks(10_000) {
            let mut q = sqlx::QueryBuilder::<Sqlite>::new(
                "SELECT task_id, SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)) \
                 FROM runs WHERE input_tokens IS NOT NULL AND task_id IN (",
            );
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(id.as_str());
            }
            q.push(") GROUP BY task_id");
            let rows: Vec<(String, i64)> = q.build_query_as().fetch_all(&self.pool).await?;
            for (id, tokens) in rows {
                out.push((stored_id(&id)?, u64::try_from(tokens).unwrap_or(0)));
            }
        }
        Ok(out)
    }

    async fn statuses(&self, ids: &[TaskId]) -> Result<Vec<(TaskId, TaskStatus)>> {
        let mut out = Vec::with_capacity(ids.len());
        // One parameter a task: well under SQLite's limit of 32,766 a statement.
        for chunk in ids.chunks(10_000) {
            let mut q =
                sqlx::QueryBuilder::<Sqlite>::new("SELECT id, status FROM tasks WHERE id IN (");
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(id.as_str());
            }
            q.push(")");
            let rows: Vec<(String, String)> = q.build_query_as().fetch_all(&self.pool).await?;
            for (id, status) in rows {
                out.push((stored_id(&id)?, stored_status(&status)?));
            }
        }
        Ok(out)
    }

    async fn begin_integration(&self, entries: &[(Journal, CommitId)]) -> Result<Option<TaskId>> {
        let mut tx = self.write().await?;
        let result: Result<Option<TaskId>> = async {
            for (entry, commit) in entries {
                let done = sqlx::query(
                    "INSERT OR REPLACE INTO integrations \
                     (task_id, old_tip, new_commit, started_at, train) \
                     SELECT ?1, ?2, ?3, ?4, ?7 WHERE EXISTS (SELECT 1 FROM tasks \
                       WHERE id = ?1 AND status = ?5 AND patch_commit = ?6)",
                )
                .bind(entry.task_id.as_str())
                .bind(entry.old_tip.as_str())
                .bind(entry.new_commit.as_str())
                .bind(entry.started_at)
                .bind(TaskStatus::Verified.as_str())
                .bind(commit.as_str())
                .bind(entry.train)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() != 1 {
                    return Ok(Some(entry.task_id.clone()));
                }
            }
            Ok(None)
        }
        .await;
        match result {
            Ok(None) => {
                tx.commit().await?;
                Ok(None)
            }
            Ok(Some(changed)) => {
                tx.rollback().await;
                Ok(Some(changed))
            }
            Err(e) => tx.finish(Err(e)).await,
        }
    }

    async fn start_train(&self, base_tip: &CommitId, at: Millis) -> Result<i64> {
        let mut tx = self.write().await?;
        let result = sqlx::query_scalar(
            "INSERT INTO trains (base_tip, started_at) VALUES (?, ?) RETURNING id",
        )
        .bind(base_tip.as_str())
        .bind(at)
        .fetch_one(&mut *tx)
        .await
        .map_err(Error::from);
        tx.finish(result).await
    }

    async fn end_train(&self, id: i64, end: &TrainEnd, at: Millis) -> Result<()> {
        let mut tx = self.write().await?;
        let result = sqlx::query(
            "UPDATE trains SET ended_at = ?, outcome = ?, builds = ?, landed = ?, red_commit = ? \
             WHERE id = ?",
        )
        .bind(at)
        .bind(&end.outcome)
        .bind(i64::from(end.builds))
        .bind(i64::from(end.landed))
        .bind(end.red_commit.as_ref().map(CommitId::as_str))
        .bind(id)
        .execute(&mut *tx)
        .await
        .map(drop)
        .map_err(Error::from);
        tx.finish(result).await
    }

    async fn trains_since(&self, since: Millis) -> Result<Vec<TrainStat>> {
        let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT started_at, ended_at, builds, landed FROM trains \
             WHERE ended_at IS NOT NULL AND ended_at >= ? ORDER BY ended_at",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(started_at, ended_at, builds, landed)| {
                Ok(TrainStat {
                    started_at,
                    ended_at,
                    builds: to_u32("builds", builds)?,
                    landed: to_u32("landed", landed)?,
                })
            })
            .collect()
    }

    async fn abort_integration(&self, task: &TaskId) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM integrations WHERE task_id = ?")
            .bind(task.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn pending_integrations(&self) -> Result<Vec<Journal>> {
        let rows: Vec<(String, String, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT task_id, old_tip, new_commit, started_at, train FROM integrations \
             ORDER BY started_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(task, old_tip, new_commit, started_at, train)| {
                Ok(Journal {
                    task_id: stored_id(&task)?,
                    train,
                    old_tip: stored_commit(&old_tip)?,
                    new_commit: stored_commit(&new_commit)?,
                    started_at,
                })
            })
            .collect()
    }

    async fn running_runs(&self, task: &TaskId) -> Result<Vec<Run>> {
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM runs \
             WHERE task_id = ? AND status = 'running' ORDER BY id"
        ))
        .bind(task.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(RunRow::into_run).collect()
    }

    async fn usage_since(&self, since: Millis, bucket_ms: Millis) -> Result<Vec<UsageBucket>> {
        // The terms of runs_charged's WHERE, so the index serves the range.
        let rows: Vec<(i64, f64, f64)> = sqlx::query_as(
            "SELECT finished_at / ?2 AS bucket, TOTAL(cost_cents), \
             TOTAL(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)) FROM runs \
             WHERE (cost_cents > 0 OR agent IS NOT NULL) AND finished_at >= ?1 \
             GROUP BY bucket ORDER BY bucket",
        )
        .bind(since)
        .bind(bucket_ms.max(1))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(bucket, cost_cents, tokens)| UsageBucket {
                start: bucket * bucket_ms.max(1),
                cost_cents,
                // A float sum (TOTAL never overflows), whole and bounded by the edge's caps.
                tokens: tokens as u64,
            })
            .collect())
    }

    async fn latest_session(&self, task: &TaskId) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT session_id FROM runs WHERE task_id = ? AND phase = 'dev' \
             AND session_id IS NOT NULL ORDER BY id DESC LIMIT 1",
        )
        .bind(task.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn start_run(&self, task: &TaskId, run: &NewRun, at: Millis) -> Result<i64> {
        let mut tx = self.write().await?;
        let result = insert_run(&mut tx, task, run, at).await;
        tx.finish(result).await
    }

    async fn end_run(&self, run: i64, end: &RunEnd, at: Millis) -> Result<()> {
        let mut tx = self.write().await?;
        let task: Option<String> = sqlx::query_scalar("SELECT task_id FROM runs WHERE id = ?")
            .bind(run)
            .fetch_optional(&mut *tx)
            .await?;
        let result = match task {
            Some(task) => end_runs(&mut tx, &stored_id(&task)?, Some(run), end, at).await,
            None => Err(Error::NotFound(format!("run {run} does not exist"))),
        };
        tx.finish(result).await
    }

    async fn abandon_runs(&self, phase: Phase, error: &str, at: Millis) -> Result<u64> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "UPDATE runs SET status = 'failure', finished_at = ?, error = ?, \
             failure_kind = 'infrastructure' \
             WHERE status = 'running' AND phase = ? AND runner IS NULL",
        )
        .bind(at)
        .bind(error)
        .bind(phase.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn run(&self, id: i64) -> Result<Option<Run>> {
        let row: Option<RunRow> =
            sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(RunRow::into_run).transpose()
    }

    async fn append_logs(&self, lines: &[(i64, LogLine)]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut tx = self.write().await?;
        // 6 parameters a row: 30,000 a statement, under SQLite's limit of 32,766.
        for chunk in lines.chunks(5000) {
            let mut q = sqlx::QueryBuilder::<Sqlite>::new(
                "INSERT OR IGNORE INTO log_lines (run_id, seq, at, stream, phase, line) ",
            );
            q.push_values(chunk, |mut row, (run, line)| {
                row.push_bind(*run)
                    .push_bind(i64::try_from(line.seq).unwrap_or(i64::MAX))
                    .push_bind(line.at)
                    .push_bind(line.stream.as_str())
                    .push_bind(line.phase.as_str())
                    .push_bind(line.text.as_str());
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn last_log_seq(&self, run: i64) -> Result<u64> {
        let top: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM log_lines WHERE run_id = ?")
                .bind(run)
                .fetch_one(&self.pool)
                .await?;
        Ok(top.unwrap_or(0).unsigned_abs())
    }

    async fn read_logs(&self, run: i64, after_seq: u64, limit: u32) -> Result<Vec<LogLine>> {
        let rows: Vec<(i64, i64, String, String, String)> = sqlx::query_as(
            "SELECT seq, at, stream, phase, line FROM log_lines \
             WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(run)
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(seq, at, stream, phase, text)| {
                Ok(LogLine {
                    seq: seq.unsigned_abs(),
                    at,
                    stream: LogStream::parse(&stream)
                        .ok_or_else(|| corrupt("log stream", &stream))?,
                    phase: Phase::parse(&phase).ok_or_else(|| corrupt("phase", &phase))?,
                    text,
                })
            })
            .collect()
    }

    async fn trim_log(&self, run: i64, head_last_seq: u64, keep_tail_bytes: u64) -> Result<u64> {
        let mut tx = self.write().await?;
        let head = i64::try_from(head_last_seq).unwrap_or(i64::MAX);
        let keep = i64::try_from(keep_tail_bytes).unwrap_or(i64::MAX);
        sqlx::query(
            "DELETE FROM log_lines WHERE run_id = ?1 AND seq IN ( \
                SELECT seq FROM ( \
                    SELECT seq, SUM(length(CAST(line AS BLOB)) + 1) \
                        OVER (ORDER BY seq DESC) AS newer \
                    FROM log_lines WHERE run_id = ?1 AND seq > ?2) \
                WHERE newer > ?3)",
        )
        .bind(run)
        .bind(head)
        .bind(keep)
        .execute(&mut *tx)
        .await?;
        let kept: Option<i64> = sqlx::query_scalar(
            "SELECT SUM(length(CAST(line AS BLOB)) + 1) FROM log_lines WHERE run_id = ? AND seq > ?",
        )
        .bind(run)
        .bind(head)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(kept.unwrap_or(0).unsigned_abs())
    }

    async fn prune_logs(&self, before: Millis) -> Result<u64> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "DELETE FROM log_lines WHERE run_id IN ( \
                SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < ?)",
        )
        .bind(before)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn last_event_id(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM task_events")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn events_after(&self, after_id: i64, limit: u32) -> Result<Vec<TaskEvent>> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT id, task_id, at, kind, from_status, to_status, message \
             FROM task_events WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(EventRow::into_event).collect()
    }

    fn write_failure(&self) -> Option<String> {
        self.write_failure.lock().ok().and_then(|f| f.clone())
    }

    async fn get_meta(&self, key: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT key, value FROM meta WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn delete_meta(&self, key: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM meta WHERE key = ?")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put_meta(&self, key: &str, value: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn sessions(&self) -> Result<Vec<SessionRecord>> {
        sessions::all(&self.pool).await
    }

    async fn put_session(&self, session: &SessionRecord) -> Result<()> {
        let mut tx = self.write().await?;
        let result = sessions::put(&mut tx, session).await;
        tx.finish(result).await
    }

    async fn end_sessions(&self, which: EndSessions<'_>) -> Result<u64> {
        let mut tx = self.write().await?;
        let result = sessions::end(&mut tx, which).await;
        tx.finish(result).await
    }
}

#[cfg(test)]
mod tests {
    use super::SqliteStore;
    use crate::store::suite;
    use std::sync::Arc;

    async fn fresh() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pipeline.db");
        let store = SqliteStore::open(path.to_str().expect("utf-8 path"))
            .await
            .expect("open store");
        (dir, store)
    }

    crate::store_test_suite!(fresh);

    #[test]
    fn a_list_reads_as_much_feedback_as_a_row_shows() {
        let tail = format!(
            "substr(CAST(feedback AS BLOB), -{})",
            pipeline_core::lines::LIST_FEEDBACK_BYTES
        );
        assert!(
            super::LIST_COLUMNS.contains(&tail),
            "{}",
            super::LIST_COLUMNS
        );
    }

    /// A write whose future is dropped while its `BEGIN IMMEDIATE` runs (a gRPC handler whose
    /// client went away: a runner SIGKILLed while it opened its work stream) leaves no
    /// transaction open behind it: the next write begins at once, and the dropped one wrote
    /// nothing. (Its connection went back to the pool holding the write lock, and every
    /// later write failed after the busy timeout with "database is locked".)
    #[tokio::test]
    async fn a_write_dropped_while_it_begins_leaves_no_transaction_behind() {
        use crate::store::Store;
        use sqlx::Connection;
        use std::future::Future;
        use std::task::Poll;

        let (dir, store) = fresh().await;
        // Another connection holds the write lock, so the store's BEGIN IMMEDIATE waits on its
        // connection's worker thread (in SQLite's busy handler) until that one lets go.
        let path = dir.path().join("pipeline.db");
        let mut holder = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("connect");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .expect("hold the write lock");
        let mut dropped = Box::pin(store.put_meta("dropped", "1"));
        // Polled until it holds the write turn: it then waits for its BEGIN IMMEDIATE.
        while store.writer.try_lock().is_ok() {
            let pending =
                std::future::poll_fn(|cx| Poll::Ready(dropped.as_mut().poll(cx).is_pending()))
                    .await;
            assert!(pending, "the write cannot end while the lock is held");
            tokio::task::yield_now().await;
        }
        drop(dropped);
        sqlx::query("ROLLBACK")
            .execute(&mut holder)
            .await
            .expect("let go");
        holder.close().await.expect("close");
        // Whatever became of the dropped write's connection happened: it is back in the pool
        // or closed, and the write turn is free.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while store.pool.num_idle() != store.pool.size() as usize
            || store.writer.try_lock().is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the dropped write's connection never came back"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // A reader has the pool's idle connection, so the next write gets another one: it
        // waits for the write lock, not for the dropped write's connection to be handed out.
        let _reader = store.pool.acquire().await.expect("acquire");

        store
            .put_meta("after", "1")
            .await
            .expect("the next write begins");
        assert_eq!(
            store.get_meta("after").await.expect("read").as_deref(),
            Some("1")
        );
        assert_eq!(store.get_meta("dropped").await.expect("read"), None);
        assert_eq!(store.write_failure(), None, "a later write succeeded");
    }

    /// A write transaction dropped before it ended (its handler cancelled mid-statement)
    /// keeps the write turn until its connection let go of SQLite's lock: when the next
    /// writer gets the turn, the lock is free at once (no wait in the busy handler, which a
    /// close that outlasts it would turn into "database is locked").
    #[tokio::test]
    async fn a_write_dropped_mid_transaction_keeps_the_turn_until_its_lock_is_gone() {
        use crate::store::Store;
        use sqlx::Connection;

        let (dir, store) = fresh().await;
        let path = dir.path().join("pipeline.db");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(std::time::Duration::ZERO);
        let mut other = sqlx::SqliteConnection::connect_with(&options)
            .await
            .expect("connect");
        let mut tx = store.write().await.expect("begin");
        sqlx::query("INSERT INTO meta (key, value) VALUES ('dropped', '1')")
            .execute(&mut *tx)
            .await
            .expect("insert");
        drop(tx);
        assert!(
            store.writer.try_lock().is_err(),
            "the turn stays with the dropped transaction until its connection let go"
        );
        let turn = Arc::clone(&store.writer).lock_owned().await;
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .expect("the write lock is free");
        sqlx::query("ROLLBACK")
            .execute(&mut other)
            .await
            .expect("rollback");
        drop(turn);
        assert_eq!(store.get_meta("dropped").await.expect("read"), None);
        assert!(store.write_failure().is_some(), "a failed write is told");
        store.put_meta("after", "1").await.expect("write");
        assert_eq!(store.write_failure(), None);
    }

    #[tokio::test]
    async fn state_survives_reopening_the_file() {
        let (dir, store) = fresh().await;
        let created = suite::create(&store, "survivor").await;
        store.close().await;
        let path = dir.path().join("pipeline.db");
        let reopened = SqliteStore::open(path.to_str().expect("utf-8 path"))
            .await
            .expect("reopen");
        use crate::store::Store;
        let again = reopened.get_task(&created.id).await.expect("read");
        assert_eq!(again, Some(created));
    }
}
