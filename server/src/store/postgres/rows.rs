//! Row mapping: the task, run and history rows as PostgreSQL returns them, the columns they read,
//! their decoding into domain records, and the few reads of tasks by ID every part shares.

use std::collections::HashMap;

use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, Postgres};

use crate::domain::{
    Children, CostSource, FailureKind, Lease, Phase, Run, RunStatus, Task, TaskEvent, TaskId,
    TaskState, TaskStatus, Usage,
};
use crate::error::{Error, Result};
use pipeline_core::ids::{CommitId, TreeId};
use pipeline_core::lines::keep_end_of;

#[derive(FromRow)]
pub(super) struct TaskRow {
    pub(super) seq: i64,
    pub(super) id: String,
    pub(super) title: String,
    pub(super) description: String,
    pub(super) namespace: Option<String>,
    pub(super) priority: i64,
    pub(super) parent: Option<String>,
    pub(super) status: String,
    pub(super) patchset: i64,
    pub(super) failures: i64,
    pub(super) lost_leases: i64,
    pub(super) cost_cents: f64,
    pub(super) cost_at_retry: f64,
    pub(super) backoff_until: Option<i64>,
    pub(super) feedback: Option<String>,
    pub(super) amend: bool,
    pub(super) lease_id: Option<String>,
    pub(super) lease_epoch: i64,
    pub(super) lease_runner: Option<String>,
    pub(super) lease_runner_id: Option<String>,
    pub(super) lease_base: Option<String>,
    pub(super) lease_previous: Option<String>,
    pub(super) patch_commit: Option<String>,
    pub(super) avoid_runner: Option<String>,
    pub(super) verified_tree: Option<String>,
    pub(super) deps_pending: i64,
    pub(super) version: i64,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) requires: String,
    pub(super) max_cost_cents: Option<f64>,
    pub(super) paused: Option<String>,
    pub(super) children: i64,
    pub(super) children_done: i64,
    pub(super) children_cancelled: i64,
    pub(super) children_cost_cents: f64,
    pub(super) base_check: bool,
    pub(super) approval_required: bool,
    pub(super) approved: bool,
    pub(super) epic: bool,
}

/// A list row: a task row whose feedback is its length and last bytes ([`LIST_COLUMNS`]).
#[derive(FromRow)]
pub(super) struct ListRow {
    #[sqlx(flatten)]
    pub(super) row: CandidateRow,
    pub(super) feedback_bytes: Option<i64>,
    pub(super) feedback_tail: Option<Vec<u8>>,
}

impl ListRow {
    pub(super) fn into_task(self) -> Result<Task> {
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
pub(super) struct CandidateRow {
    #[sqlx(flatten)]
    pub(super) task: TaskRow,
    pub(super) deps: Option<String>,
}

/// Tasks from rows read in full (`sqlx::query(…).fetch_all`).
pub(super) fn candidates(rows: Vec<PgRow>) -> Result<Vec<Task>> {
    rows.iter()
        .map(|row| CandidateRow::from_row(row)?.into_task())
        .collect()
}

impl CandidateRow {
    pub(super) fn into_task(self) -> Result<Task> {
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
pub(super) const LIST_COLUMNS: &str = "seq, id, title, '' AS description, namespace, priority, parent, \
     status, patchset, failures, lost_leases, cost_cents, cost_at_retry, backoff_until, \
     NULL::text AS feedback, octet_length(feedback)::bigint AS feedback_bytes, \
     substring(convert_to(feedback, 'UTF8') FROM greatest(octet_length(feedback) - 1023, 1)) \
     AS feedback_tail, amend, lease_id, lease_epoch, lease_runner, lease_runner_id, lease_base, \
     lease_previous, patch_commit, avoid_runner, verified_tree, deps_pending, version, \
     created_at, updated_at, requires, max_cost_cents, paused, children, children_done, \
     children_cancelled, children_cost_cents, base_check, approval_required, approved, epic";

/// One page of `columns` of the tasks matching `filter` in lease order, after the key
/// (`$1` priority, `$2` seq), at most `$3` rows; `filter` binds from `$4`. Two index ranges,
/// the rest of the key's priority and then the priorities after it, as in SQLite.
pub(super) fn keyset_page(columns: &str, filter: &str) -> String {
    format!(
        "(SELECT {columns} FROM tasks t WHERE {filter} \
           AND priority = $1 AND seq > $2 ORDER BY seq LIMIT $3) \
         UNION ALL \
         (SELECT {columns} FROM tasks t WHERE {filter} \
           AND priority > $1 ORDER BY priority, seq LIMIT $3) \
         LIMIT $3"
    )
}

/// A task's dependencies in one column, joined by a separator no ID holds.
pub(super) const DEPS_COLUMN: &str = "(SELECT string_agg(depends_on, chr(31) ORDER BY depends_on) \
     FROM task_deps WHERE task_id = t.id) AS deps";

pub(super) const TASK_COLUMNS: &str = "seq, id, title, description, namespace, priority, parent, status, \
     patchset, failures, lost_leases, cost_cents, cost_at_retry, backoff_until, feedback, amend, lease_id, \
     lease_epoch, lease_runner, lease_runner_id, lease_base, lease_previous, patch_commit, \
     avoid_runner, verified_tree, deps_pending, version, created_at, updated_at, requires, \
     max_cost_cents, paused, children, children_done, children_cancelled, children_cost_cents, \
     base_check, approval_required, approved, epic";

/// What a task requires of its runner, as stored: its labels joined by U+001F, which no label
/// holds ([`crate::domain::validate_requires`]); empty for none.
pub(super) fn join_requires(requires: &[String]) -> String {
    requires.join("\u{1f}")
}

pub(super) fn split_requires(stored: &str) -> Vec<String> {
    if stored.is_empty() {
        return Vec::new();
    }
    stored.split('\u{1f}').map(str::to_owned).collect()
}

pub(super) fn corrupt(what: &str, value: &str) -> Error {
    Error::Internal(format!("database holds an invalid {what}: {value:?}"))
}

pub(super) fn stored_id(raw: &str) -> Result<TaskId> {
    TaskId::parse(raw).map_err(|_| corrupt("task id", raw))
}

pub(super) fn stored_status(raw: &str) -> Result<TaskStatus> {
    TaskStatus::parse(raw).ok_or_else(|| corrupt("task status", raw))
}

pub(super) fn to_u32(what: &str, n: i64) -> Result<u32> {
    u32::try_from(n).map_err(|_| corrupt(what, &n.to_string()))
}

pub(super) fn stored_commit(raw: &str) -> Result<CommitId> {
    CommitId::parse(raw).map_err(|_| corrupt("commit id", raw))
}

pub(super) fn stored_tree(raw: &str) -> Result<TreeId> {
    TreeId::parse(raw).map_err(|_| corrupt("tree id", raw))
}

impl TaskRow {
    pub(super) fn into_task(self, depends_on: Vec<TaskId>) -> Result<Task> {
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
                declared: self.epic,
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
                amend: self.amend,
                max_cost_cents: self.max_cost_cents,
                base_check: self.base_check,
                approval_required: self.approval_required,
                approved: self.approved,
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
pub(super) struct RunRow {
    pub(super) id: i64,
    pub(super) task_id: String,
    pub(super) phase: String,
    pub(super) patchset: i64,
    pub(super) attempt: i64,
    pub(super) runner: Option<String>,
    pub(super) status: String,
    pub(super) cost_cents: f64,
    pub(super) started_at: i64,
    pub(super) finished_at: Option<i64>,
    pub(super) error: Option<String>,
    pub(super) failure_kind: Option<String>,
    pub(super) train: Option<i64>,
    pub(super) builds: Option<i64>,
    pub(super) agent: Option<String>,
    pub(super) model: Option<String>,
    pub(super) input_tokens: Option<i64>,
    pub(super) cached_input_tokens: Option<i64>,
    pub(super) cache_write_tokens: Option<i64>,
    pub(super) output_tokens: Option<i64>,
    pub(super) reasoning_tokens: Option<i64>,
    pub(super) cost_source: Option<String>,
    pub(super) usage_complete: Option<bool>,
    pub(super) session_id: Option<String>,
}

/// The columns a [`RunRow`] reads.
pub(super) const RUN_COLUMNS: &str = "id, task_id, phase, patchset, attempt, runner, status, cost_cents, \
     started_at, finished_at, error, failure_kind, train, builds, agent, model, input_tokens, \
     cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_source, \
     usage_complete, session_id";

/// A stored token count (never negative: the table checks).
pub(super) fn to_tokens(what: &str, n: Option<i64>) -> Result<u64> {
    u64::try_from(n.unwrap_or(0)).map_err(|_| corrupt(what, &format!("{n:?}")))
}

/// A token count to store: the edge bounds them far below `i64::MAX`.
pub(super) fn tokens_to_sql(n: u64) -> i64 {
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
            complete: self.usage_complete == Some(true),
            session_id: self.session_id.take(),
        }))
    }

    pub(super) fn into_run(mut self) -> Result<Run> {
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
pub(super) struct EventRow {
    pub(super) id: i64,
    pub(super) task_id: String,
    pub(super) at: i64,
    pub(super) kind: String,
    pub(super) from_status: Option<String>,
    pub(super) to_status: String,
    pub(super) message: String,
}

impl EventRow {
    pub(super) fn into_event(self) -> Result<TaskEvent> {
        Ok(TaskEvent {
            id: self.id,
            task_id: stored_id(&self.task_id)?,
            at: self.at,
            kind: crate::domain::EventKind::parse(&self.kind)
                .ok_or_else(|| corrupt("history entry's kind", &self.kind))?,
            from: self.from_status.as_deref().map(stored_status).transpose()?,
            to: stored_status(&self.to_status)?,
            message: self.message,
        })
    }
}

pub(super) async fn task_exists(conn: &mut PgConnection, id: &str) -> Result<bool> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    Ok(found.is_some())
}

pub(super) async fn load_task(conn: &mut PgConnection, id: &str) -> Result<Option<Task>> {
    let row: Option<TaskRow> =
        sqlx::query_as(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(row) = row else { return Ok(None) };
    let deps: Vec<String> = sqlx::query_scalar(
        "SELECT depends_on FROM task_deps WHERE task_id = $1 ORDER BY depends_on",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let deps = deps.iter().map(|d| stored_id(d)).collect::<Result<_>>()?;
    row.into_task(deps).map(Some)
}

/// The (id, other) rows of `select` (a statement ending in `IN (`) for `ids`, a chunk of them
/// per statement; unlike [`pairs_of`], an id may have many.
pub(super) async fn edges_of(
    conn: &mut PgConnection,
    select: &str,
    ids: &[&str],
) -> Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<Postgres>::new(select);
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

/// Rows a multi-row statement writes at once: well under PostgreSQL's 65,535 parameters.
pub(super) const ROWS_PER_STATEMENT: usize = 1000;

/// The (id, value) rows of `select` (a statement ending in `id IN (`) for `ids`, a chunk of
/// them per statement.
pub(super) async fn pairs_of(
    conn: &mut PgConnection,
    select: &str,
    ids: &[&str],
) -> Result<HashMap<String, String>> {
    let mut found = HashMap::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<Postgres>::new(select);
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

/// The columns of a feed entry, in [`FeedRow`]'s order (a task's subject is its ID).
pub(super) const FEED_COLUMNS: &str = "id, topic, COALESCE(subject, task_id) AS subject, at, \
     kind, from_status, to_status, message, data";

#[derive(FromRow)]
pub(super) struct FeedRow {
    pub(super) id: i64,
    pub(super) topic: String,
    pub(super) subject: String,
    pub(super) at: i64,
    pub(super) kind: String,
    pub(super) from_status: Option<String>,
    pub(super) to_status: Option<String>,
    pub(super) message: String,
    pub(super) data: String,
}

impl FeedRow {
    pub(super) fn into_entry(self) -> Result<crate::feed::FeedEntry> {
        Ok(crate::feed::FeedEntry {
            position: self.id,
            topic: crate::feed::Topic::parse(&self.topic)
                .ok_or_else(|| corrupt("feed topic", &self.topic))?,
            subject: self.subject,
            at: self.at,
            kind: self.kind,
            from: self.from_status.as_deref().map(stored_status).transpose()?,
            to: self.to_status.as_deref().map(stored_status).transpose()?,
            message: self.message,
            data: self.data,
        })
    }
}
