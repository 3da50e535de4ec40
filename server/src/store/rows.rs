//! Row mapping shared by the SQL backends: the task, run, history, feed and webhook rows as
//! SQLite and PostgreSQL both return them (sqlx decodes a stored 0/1 `INTEGER` into `bool` on
//! SQLite as a `boolean` on PostgreSQL), the columns both read, and their decoding into domain
//! records.
//! What differs between the engines (the list columns, the dependencies' aggregate, the
//! keyset query, the reads on a connection) stays in each backend's `rows.rs`.

use sqlx::{FromRow, Row};

use crate::domain::{
    Children, CostSource, FailureKind, Lease, Phase, Run, RunStatus, Task, TaskEvent, TaskId,
    TaskState, TaskStatus, Usage,
};
use crate::error::{Error, Result};
use pipeline_core::ids::{CommitId, TreeId};
use pipeline_core::lines::keep_end_of;

#[derive(FromRow)]
pub(crate) struct TaskRow {
    pub(crate) seq: i64,
    pub(crate) id: String,
    pub(crate) title: String,
    pub(crate) description: String,
    pub(crate) namespace: Option<String>,
    pub(crate) priority: i64,
    pub(crate) parent: Option<String>,
    pub(crate) status: String,
    pub(crate) patchset: i64,
    pub(crate) failures: i64,
    pub(crate) lost_leases: i64,
    pub(crate) cost_cents: f64,
    pub(crate) cost_at_retry: f64,
    pub(crate) backoff_until: Option<i64>,
    pub(crate) feedback: Option<String>,
    pub(crate) amend: bool,
    pub(crate) lease_id: Option<String>,
    pub(crate) lease_epoch: i64,
    pub(crate) lease_runner: Option<String>,
    pub(crate) lease_runner_id: Option<String>,
    pub(crate) lease_base: Option<String>,
    pub(crate) lease_previous: Option<String>,
    pub(crate) patch_commit: Option<String>,
    pub(crate) avoid_runner: Option<String>,
    pub(crate) verified_tree: Option<String>,
    pub(crate) deps_pending: i64,
    pub(crate) version: i64,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
    pub(crate) requires: String,
    pub(crate) max_cost_cents: Option<f64>,
    pub(crate) paused: Option<String>,
    pub(crate) children: i64,
    pub(crate) children_done: i64,
    pub(crate) children_cancelled: i64,
    pub(crate) children_cost_cents: f64,
    pub(crate) base_check: bool,
    pub(crate) approval_required: bool,
    pub(crate) approved: bool,
    pub(crate) epic: bool,
}

/// A list row: a task row whose feedback is its length and last bytes (each backend's
/// `LIST_COLUMNS`).
#[derive(FromRow)]
pub(crate) struct ListRow {
    #[sqlx(flatten)]
    pub(crate) row: CandidateRow,
    pub(crate) feedback_bytes: Option<i64>,
    pub(crate) feedback_tail: Option<Vec<u8>>,
}

impl ListRow {
    pub(crate) fn into_task(self) -> Result<Task> {
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
pub(crate) struct CandidateRow {
    #[sqlx(flatten)]
    pub(crate) task: TaskRow,
    pub(crate) deps: Option<String>,
}

/// Tasks from rows read in full (`sqlx::query(…).fetch_all`) before any is decoded. On
/// SQLite, decoding a row and freeing it on this thread while the connection's worker thread
/// still reads the next ones made both wait on SQLite's allocator, which takes one
/// process-wide lock for every value of every row (30 a task): a page of 100 tasks cost ~3 ms,
/// mostly in that lock.
pub(crate) fn candidates<R: Row>(rows: Vec<R>) -> Result<Vec<Task>>
where
    CandidateRow: for<'r> FromRow<'r, R>,
{
    rows.iter()
        .map(|row| CandidateRow::from_row(row)?.into_task())
        .collect()
}

impl CandidateRow {
    pub(crate) fn into_task(self) -> Result<Task> {
        let deps = self
            .deps
            .as_deref()
            .map(|d| d.split('\u{1f}').map(stored_id).collect::<Result<Vec<_>>>())
            .transpose()?
            .unwrap_or_default();
        self.task.into_task(deps)
    }
}

/// The columns a [`TaskRow`] reads.
pub(crate) const TASK_COLUMNS: &str = "seq, id, title, description, namespace, priority, parent, status, \
     patchset, failures, lost_leases, cost_cents, cost_at_retry, backoff_until, feedback, amend, lease_id, \
     lease_epoch, lease_runner, lease_runner_id, lease_base, lease_previous, patch_commit, \
     avoid_runner, verified_tree, deps_pending, version, created_at, updated_at, requires, \
     max_cost_cents, paused, children, children_done, children_cancelled, children_cost_cents, \
     base_check, approval_required, approved, epic";

/// What a task requires of its runner, as stored: its labels joined by U+001F, which no label
/// holds ([`crate::domain::validate_requires`]); empty for none.
pub(crate) fn join_requires(requires: &[String]) -> String {
    requires.join("\u{1f}")
}

pub(crate) fn split_requires(stored: &str) -> Vec<String> {
    if stored.is_empty() {
        return Vec::new();
    }
    stored.split('\u{1f}').map(str::to_owned).collect()
}

pub(crate) fn corrupt(what: &str, value: &str) -> Error {
    Error::Internal(format!("database holds an invalid {what}: {value:?}"))
}

/// The integrate runs still running, as both backends read them (the partial index
/// `runs_running` serves it, whatever the history's size): a train's ID and a member task.
pub(crate) const TRAINS_IN_FLIGHT: &str = "SELECT train, task_id FROM runs \
     WHERE status = 'running' AND phase = 'integrate' AND train IS NOT NULL ORDER BY train, id";

/// [`TRAINS_IN_FLIGHT`]'s rows as trains: each train's ID and its members, in order.
pub(crate) fn trains_in_flight(rows: Vec<(i64, String)>) -> Result<Vec<(i64, Vec<TaskId>)>> {
    let mut trains: Vec<(i64, Vec<TaskId>)> = Vec::new();
    for (train, task) in rows {
        let task = stored_id(&task)?;
        match trains.last_mut() {
            Some((id, tasks)) if *id == train => tasks.push(task),
            _ => trains.push((train, vec![task])),
        }
    }
    Ok(trains)
}

pub(crate) fn stored_id(raw: &str) -> Result<TaskId> {
    TaskId::parse(raw).map_err(|_| corrupt("task id", raw))
}

pub(crate) fn stored_status(raw: &str) -> Result<TaskStatus> {
    TaskStatus::parse(raw).ok_or_else(|| corrupt("task status", raw))
}

pub(crate) fn to_u32(what: &str, n: i64) -> Result<u32> {
    u32::try_from(n).map_err(|_| corrupt(what, &n.to_string()))
}

pub(crate) fn stored_commit(raw: &str) -> Result<CommitId> {
    CommitId::parse(raw).map_err(|_| corrupt("commit id", raw))
}

pub(crate) fn stored_tree(raw: &str) -> Result<TreeId> {
    TreeId::parse(raw).map_err(|_| corrupt("tree id", raw))
}

impl TaskRow {
    pub(crate) fn into_task(self, depends_on: Vec<TaskId>) -> Result<Task> {
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
pub(crate) struct RunRow {
    pub(crate) id: i64,
    pub(crate) task_id: String,
    pub(crate) phase: String,
    pub(crate) patchset: i64,
    pub(crate) attempt: i64,
    pub(crate) runner: Option<String>,
    pub(crate) status: String,
    pub(crate) cost_cents: f64,
    pub(crate) started_at: i64,
    pub(crate) finished_at: Option<i64>,
    pub(crate) error: Option<String>,
    pub(crate) failure_kind: Option<String>,
    pub(crate) train: Option<i64>,
    pub(crate) builds: Option<i64>,
    pub(crate) agent: Option<String>,
    pub(crate) model: Option<String>,
    pub(crate) input_tokens: Option<i64>,
    pub(crate) cached_input_tokens: Option<i64>,
    pub(crate) cache_write_tokens: Option<i64>,
    pub(crate) output_tokens: Option<i64>,
    pub(crate) reasoning_tokens: Option<i64>,
    pub(crate) cost_source: Option<String>,
    pub(crate) usage_complete: Option<bool>,
    pub(crate) session_id: Option<String>,
}

/// The columns a [`RunRow`] reads.
pub(crate) const RUN_COLUMNS: &str = "id, task_id, phase, patchset, attempt, runner, status, cost_cents, \
     started_at, finished_at, error, failure_kind, train, builds, agent, model, input_tokens, \
     cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost_source, \
     usage_complete, session_id";

/// A stored token count (never negative: the table checks).
pub(crate) fn to_tokens(what: &str, n: Option<i64>) -> Result<u64> {
    u64::try_from(n.unwrap_or(0)).map_err(|_| corrupt(what, &format!("{n:?}")))
}

/// A token count to store: the edge bounds them far below `i64::MAX`.
pub(crate) fn tokens_to_sql(n: u64) -> i64 {
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

    pub(crate) fn into_run(mut self) -> Result<Run> {
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
pub(crate) struct EventRow {
    pub(crate) id: i64,
    pub(crate) task_id: String,
    pub(crate) at: i64,
    pub(crate) kind: String,
    pub(crate) from_status: Option<String>,
    pub(crate) to_status: String,
    pub(crate) message: String,
}

impl EventRow {
    pub(crate) fn into_event(self) -> Result<TaskEvent> {
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

/// The columns of a feed entry, in [`FeedRow`]'s order (a task's subject is its ID).
pub(crate) const FEED_COLUMNS: &str = "id, topic, COALESCE(subject, task_id) AS subject, at, \
     kind, from_status, to_status, message, data";

#[derive(FromRow)]
pub(crate) struct FeedRow {
    pub(crate) id: i64,
    pub(crate) topic: String,
    pub(crate) subject: String,
    pub(crate) at: i64,
    pub(crate) kind: String,
    pub(crate) from_status: Option<String>,
    pub(crate) to_status: Option<String>,
    pub(crate) message: String,
    pub(crate) data: String,
}

impl FeedRow {
    pub(crate) fn into_entry(self) -> Result<crate::feed::FeedEntry> {
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

/// A webhook cursor's row, in [`WEBHOOK_COLUMNS`]' order.
pub(crate) type WebhookRow = (
    String,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

pub(crate) const WEBHOOK_COLUMNS: &str = "url, position, attempts, next_attempt_at, failing_since, last_error, \
                       last_error_at, last_delivered_at";

pub(crate) fn webhook_cursor(
    (
        url,
        position,
        attempts,
        next_attempt_at,
        failing_since,
        last_error,
        last_error_at,
        last_delivered_at,
    ): WebhookRow,
) -> crate::store::WebhookCursor {
    crate::store::WebhookCursor {
        url,
        position,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        next_attempt_at,
        failing_since,
        last_error,
        last_error_at,
        last_delivered_at,
    }
}
