//! Row mapping: what of the task rows differs as PostgreSQL returns them (the list columns,
//! the dependencies' aggregate, the keyset page) and the few reads of tasks by ID every part
//! shares; the rows and their decoding are [`crate::store::rows`], re-exported here.

use std::collections::HashMap;

use sqlx::{PgConnection, Postgres};

use crate::domain::Task;
use crate::error::Result;

pub(super) use crate::store::rows::{
    EventRow, FEED_COLUMNS, FeedRow, ListRow, RUN_COLUMNS, RunRow, TASK_COLUMNS, TaskRow,
    candidates, corrupt, join_requires, stored_commit, stored_id, stored_status, to_u32,
    tokens_to_sql,
};

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
/// (`$1` priority, `$2` seq), at most `$3` rows; `filter` binds from `$4`. One index range
/// from the key on: the row comparison `(priority, seq) > ($1, $2)` is the start of a scan of
/// `tasks_by_order` (or of `tasks_by_status`, `tasks_by_parent`, `tasks_ready` after the
/// filter's equalities) in its own order. (SQLite's two ranges, the rest of the key's priority
/// then the priorities after it, made PostgreSQL's generic plan of a prepared statement scan
/// the primary key and filter on the priority: the first page of a million tasks read them
/// all, about a second.)
pub(super) fn keyset_page(columns: &str, filter: &str) -> String {
    format!(
        "SELECT {columns} FROM tasks t WHERE {filter} AND (priority, seq) > ($1, $2) \
         ORDER BY priority, seq LIMIT $3"
    )
}

/// A task's dependencies in one column, joined by a separator no ID holds.
pub(super) const DEPS_COLUMN: &str = "(SELECT string_agg(depends_on, chr(31) ORDER BY depends_on) \
     FROM task_deps WHERE task_id = t.id) AS deps";

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
