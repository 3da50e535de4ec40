//! Tasks: created (one or a batch), read, listed, edited, paused, given dependencies.

use std::collections::HashMap;

use sqlx::{FromRow, PgConnection, Postgres};

use super::PgStore;
use super::events::insert_event;
use super::graph::refresh_deps_pending;
use super::meta::set_next_number;
use super::reads::PlanReads;
use super::rows::{
    DEPS_COLUMN, LIST_COLUMNS, ListRow, ROWS_PER_STATEMENT, TASK_COLUMNS, TaskRow, candidates,
    join_requires, keyset_page, load_task, stored_id, stored_status, task_exists,
};
use crate::domain::{
    EventKind, Millis, NewTask, StatusCounts, Task, TaskEdit, TaskEvent, TaskId, TaskStatus,
};
use crate::error::{Error, Result};
use crate::store::{NewEvent, TaskFilter, plan};

/// Inserts tasks in state Open, in order, each with its history's first entry, as
/// [`plan::create`] decides them; returns them (built from what was written, without reading
/// the rows back). The statements are per list, not per task: one read of every row the list
/// names, then multi-row inserts of the tasks, their dependencies and their history.
pub(super) async fn insert_tasks(
    tx: &mut PgConnection,
    new: Vec<NewTask>,
    now: Millis,
    batch: bool,
) -> Result<Vec<(Task, TaskEvent)>> {
    let plan = plan::create(&mut PlanReads(&mut *tx), new, batch).await?;
    let mut seqs: HashMap<String, i64> = HashMap::with_capacity(plan.rows.len());
    for chunk in plan.rows.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::QueryBuilder::<Postgres>::new(
            "INSERT INTO tasks (id, title, description, namespace, priority, parent, status, \
             deps_pending, created_at, updated_at, requires, max_cost_cents, paused, \
             approval_required, epic) ",
        );
        q.push_values(chunk, |mut row, r| {
            let t = &r.new;
            row.push_bind(r.id.as_str())
                .push_bind(&t.title)
                .push_bind(&t.description)
                .push_bind(&t.namespace)
                .push_bind(i64::from(t.priority))
                .push_bind(t.parent.as_ref().map(TaskId::as_str))
                .push_bind(TaskStatus::Open.as_str())
                .push_bind(i64::from(r.deps_pending))
                .push_bind(now)
                .push_bind(now)
                .push_bind(join_requires(&t.requires))
                .push_bind(t.max_cost_cents)
                .push_bind(r.paused.as_deref())
                .push_bind(t.approval)
                .push_bind(t.epic);
        });
        q.push(" RETURNING id, seq");
        let written: Vec<(String, i64)> = q.build_query_as().fetch_all(&mut *tx).await?;
        seqs.extend(written);
    }
    let edges: Vec<(&TaskId, &TaskId)> = plan.edges().collect();
    for chunk in edges.chunks(ROWS_PER_STATEMENT) {
        let mut q =
            sqlx::QueryBuilder::<Postgres>::new("INSERT INTO task_deps (task_id, depends_on) ");
        q.push_values(chunk, |mut row, (id, dep)| {
            row.push_bind(id.as_str()).push_bind(dep.as_str());
        });
        q.build().execute(&mut *tx).await?;
    }
    drop(edges);
    // The entries, their positions in the tasks' order from the feed's counter, in the same
    // statement (one round trip fewer: a single task's creation is a handful of them).
    let mut event_ids: HashMap<String, i64> = HashMap::with_capacity(plan.rows.len());
    for chunk in plan.rows.chunks(ROWS_PER_STATEMENT) {
        let n = i64::try_from(chunk.len()).unwrap_or(i64::MAX);
        let mut q =
            sqlx::QueryBuilder::<Postgres>::new("WITH p AS (UPDATE feed_head SET pos = pos + ");
        q.push_bind(n);
        q.push(" RETURNING pos - ");
        q.push_bind(n);
        q.push(
            " AS base) INSERT INTO task_events (id, task_id, at, kind, from_status, to_status, \
             message) SELECT p.base + v.k, v.task_id, v.at, v.kind, v.from_status, v.to_status, \
             v.message FROM p CROSS JOIN (",
        );
        let mut k = 0i64;
        q.push_values(chunk, |mut row, r| {
            k += 1;
            row.push_bind(k)
                .push_bind(r.id.as_str())
                .push_bind(now)
                .push_bind(EventKind::Created.as_str())
                .push_bind(None::<&str>)
                .push_bind(TaskStatus::Open.as_str())
                .push_bind(r.message.as_str());
        });
        q.push(
            ") AS v (k, task_id, at, kind, from_status, to_status, message) \
             RETURNING task_id, id",
        );
        let written: Vec<(String, i64)> = q.build_query_as().fetch_all(&mut *tx).await?;
        event_ids.extend(written);
    }
    if let Some(n) = plan.next_number {
        set_next_number(&mut *tx, n).await?;
    }
    plan.created(now, |id| {
        Some((*seqs.get(id.as_str())?, *event_ids.get(id.as_str())?))
    })
}

/// Adds the dependencies [`plan::add_dependencies`] finds new, with the history entry, the
/// pending count and the version; returns the task as it is then.
pub(super) async fn insert_dependencies(
    tx: &mut PgConnection,
    id: &TaskId,
    deps: &[TaskId],
    event: &NewEvent,
    now: Millis,
) -> Result<Task> {
    let task = load_task(&mut *tx, id.as_str())
        .await?
        .ok_or_else(|| Error::NotFound(format!("task {id} does not exist")))?;
    let new = plan::add_dependencies(&mut PlanReads(&mut *tx), &task, deps).await?;
    if new.is_empty() {
        return Ok(task);
    }
    for dep in &new {
        sqlx::query(
            "INSERT INTO task_deps (task_id, depends_on) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(id.as_str())
        .bind(dep.as_str())
        .execute(&mut *tx)
        .await?;
    }
    refresh_deps_pending(&mut *tx, id).await?;
    insert_event(
        &mut *tx,
        id,
        now,
        event.kind.as_str(),
        Some(event.from),
        event.to,
        &event.message,
    )
    .await?;
    sqlx::query("UPDATE tasks SET version = version + 1, updated_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
    load_task(&mut *tx, id.as_str())
        .await?
        .ok_or_else(|| Error::NotFound(format!("task {id} does not exist")))
}

pub(super) async fn create_task(store: &PgStore, new: NewTask, now: Millis) -> Result<Task> {
    let mut tx = store.write().await?;
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

pub(super) async fn get_task(store: &PgStore, id: &TaskId) -> Result<Option<Task>> {
    let mut conn = store.pool.acquire().await?;
    load_task(&mut conn, id.as_str()).await
}

pub(super) async fn list_tasks(
    store: &PgStore,
    filter: &TaskFilter,
    after: Option<(u8, i64)>,
    limit: u32,
) -> Result<Vec<Task>> {
    // One statement per filter shape, each an index range (tasks_by_status or
    // tasks_by_order) from the last key of the previous page: a page costs the same on the
    // millionth task as on the first. Descriptions stay behind; dependencies come along.
    let (priority, seq) = after.map_or((-1, -1), |(p, s)| (i64::from(p), s));
    let columns = format!("{LIST_COLUMNS}, {DEPS_COLUMN}");
    // The status is written into the statement (one of the fixed words), so the planner
    // sees it; with a parent, the range is tasks_by_parent's (the parent bound as $4).
    let mut shape = vec![match filter.status {
        Some(status) => format!("status = '{}'", status.as_str()),
        None => "TRUE".to_owned(),
    }];
    if filter.parent.is_some() {
        shape.push("parent = $4".to_owned());
    }
    let statement = keyset_page(&columns, &shape.join(" AND "));
    let mut query = sqlx::query(&statement)
        .bind(priority)
        .bind(seq)
        .bind(i64::from(limit));
    if let Some(parent) = &filter.parent {
        query = query.bind(parent.as_str());
    }
    let rows = query.fetch_all(&store.pool).await?;
    rows.iter()
        .map(|row| ListRow::from_row(row)?.into_task())
        .collect()
}

pub(super) async fn create_tasks(
    store: &PgStore,
    new: Vec<NewTask>,
    now: Millis,
) -> Result<Vec<(Task, TaskEvent)>> {
    let mut tx = store.write().await?;
    let result = insert_tasks(&mut tx, new, now, true).await;
    tx.finish(result).await
}

pub(super) async fn set_paused(
    store: &PgStore,
    id: &TaskId,
    paused: Option<&str>,
    message: &str,
    now: Millis,
) -> Result<u32> {
    let mut tx = store.write().await?;
    let result = async {
        let kind = if paused.is_some() {
            EventKind::Paused.as_str()
        } else {
            EventKind::Resumed.as_str()
        };
        // The history first, while the rows still say what changes (those already in the
        // state asked for are left alone).
        // Each entry's position from the feed's counter, in the tasks' order.
        sqlx::query(
            "WITH changing AS (SELECT id, status, row_number() OVER (ORDER BY seq) AS n \
               FROM tasks WHERE (id = $1 OR parent = $1) AND (paused IS NULL) = ($5 IS NOT NULL)), \
             p AS (UPDATE feed_head SET pos = pos + (SELECT count(*) FROM changing) \
               RETURNING pos) \
             INSERT INTO task_events (id, task_id, at, kind, from_status, to_status, message) \
             SELECT p.pos - (SELECT count(*) FROM changing) + c.n, c.id, $2, $3, c.status, \
               c.status, $4 FROM changing c, p",
        )
        .bind(id.as_str())
        .bind(now)
        .bind(kind)
        .bind(message)
        .bind(paused)
        .execute(&mut *tx)
        .await?;
        let changed = sqlx::query(
            "UPDATE tasks SET paused = $2, version = version + 1, updated_at = $3 \
             WHERE (id = $1 OR parent = $1) AND (paused IS NULL) = ($2 IS NOT NULL)",
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

pub(super) async fn edit_task(
    store: &PgStore,
    id: &TaskId,
    version: i64,
    edit: &TaskEdit,
    event: NewEvent,
    now: Millis,
) -> Result<Task> {
    let mut tx = store.write().await?;
    let result = async {
        let changed = sqlx::query(
            "UPDATE tasks SET title = coalesce($1, title), \
               description = coalesce($2, description), \
               namespace = CASE WHEN $3 THEN $4 ELSE namespace END, \
               priority = coalesce($5, priority), \
               version = version + 1, updated_at = $6, \
               requires = coalesce($9, requires), \
               max_cost_cents = CASE WHEN $11 THEN $10 ELSE max_cost_cents END \
             WHERE id = $7 AND version = $8",
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
            event.kind.as_str(),
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

pub(super) async fn add_dependencies(
    store: &PgStore,
    id: &TaskId,
    deps: &[TaskId],
    event: NewEvent,
    now: Millis,
) -> Result<Task> {
    let mut tx = store.write().await?;
    let result = insert_dependencies(&mut tx, id, deps, &event, now).await;
    tx.finish(result).await
}

pub(super) async fn lease_candidates(
    store: &PgStore,
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
         AND NOT epic AND (backoff_until IS NULL OR backoff_until <= $4)",
    ))
    .bind(priority)
    .bind(seq)
    .bind(i64::from(limit))
    .bind(now)
    .fetch_all(&store.pool)
    .await?;
    candidates(rows)
}

pub(super) async fn verified(store: &PgStore) -> Result<Vec<Task>> {
    let rows = sqlx::query(&format!(
        "SELECT {TASK_COLUMNS}, {DEPS_COLUMN} \
         FROM tasks t WHERE status = 'verified' ORDER BY priority, seq"
    ))
    .fetch_all(&store.pool)
    .await?;
    candidates(rows)
}

pub(super) async fn finished_epics(store: &PgStore) -> Result<Vec<TaskId>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM tasks \
         WHERE children > 0 AND status IN ('open', 'needs_help') AND children_done > 0 \
         AND children_done + children_cancelled = children ORDER BY seq",
    )
    .fetch_all(&store.pool)
    .await?;
    ids.iter().map(|id| stored_id(id)).collect()
}

pub(super) async fn unfinished(store: &PgStore) -> Result<Vec<Task>> {
    let mut conn = store.pool.acquire().await?;
    let rows: Vec<TaskRow> = sqlx::query_as(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE status IN \
         ('open', 'in_progress', 'verified', 'needs_help') ORDER BY priority, seq"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let mut tasks = Vec::with_capacity(rows.len());
    for row in rows {
        let deps: Vec<String> = sqlx::query_scalar(
            "SELECT depends_on FROM task_deps WHERE task_id = $1 ORDER BY depends_on",
        )
        .bind(&row.id)
        .fetch_all(&mut *conn)
        .await?;
        let deps = deps.iter().map(|d| stored_id(d)).collect::<Result<_>>()?;
        tasks.push(row.into_task(deps)?);
    }
    Ok(tasks)
}

pub(super) async fn next_backoff_end(store: &PgStore, now: Millis) -> Result<Option<Millis>> {
    // The partial index of open tasks in back-off (tasks_backoff).
    Ok(sqlx::query_scalar(
        "SELECT backoff_until FROM tasks \
         WHERE status = 'open' AND backoff_until > $1 ORDER BY backoff_until LIMIT 1",
    )
    .bind(now)
    .fetch_optional(&store.pool)
    .await?)
}

pub(super) async fn status_counts(store: &PgStore) -> Result<StatusCounts> {
    let mut conn = store.pool.acquire().await?;
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM tasks GROUP BY status")
            .fetch_all(&mut *conn)
            .await?;
    let mut counts = StatusCounts::default();
    for (status, n) in rows {
        counts.add(stored_status(&status)?, n.unsigned_abs());
    }
    let active: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE status = 'running' AND phase = 'dev'")
            .fetch_one(&mut *conn)
            .await?;
    counts.active_dev_runs = active.unsigned_abs();
    Ok(counts)
}

pub(super) async fn statuses(store: &PgStore, ids: &[TaskId]) -> Result<Vec<(TaskId, TaskStatus)>> {
    let mut out = Vec::with_capacity(ids.len());
    // One parameter a task: well under PostgreSQL's limit of 65,535 a statement.
    for chunk in ids.chunks(10_000) {
        let mut q =
            sqlx::QueryBuilder::<Postgres>::new("SELECT id, status FROM tasks WHERE id IN (");
        let mut list = q.separated(", ");
        for id in chunk {
            list.push_bind(id.as_str());
        }
        q.push(")");
        let rows: Vec<(String, String)> = q.build_query_as().fetch_all(&store.pool).await?;
        for (id, status) in rows {
            out.push((stored_id(&id)?, stored_status(&status)?));
        }
    }
    Ok(out)
}
