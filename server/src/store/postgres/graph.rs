//! The graph of tasks as stored: what a task waits for (its dependencies, and an epic its
//! children), its ancestors, and the pending-dependency count the store keeps.

use sqlx::PgConnection;

use super::rows::{corrupt, edges_of, stored_id};
use crate::domain::TaskId;
use crate::error::Result;

/// What `ids` wait for directly: their dependencies, and (epics) their children.
pub(super) async fn waited_on(conn: &mut PgConnection, ids: &[&str]) -> Result<Vec<TaskId>> {
    let mut next = Vec::new();
    for select in [
        "SELECT task_id, depends_on FROM task_deps WHERE task_id IN (",
        "SELECT parent, id FROM tasks WHERE parent IN (",
    ] {
        for (_, to) in edges_of(&mut *conn, select, ids).await? {
            next.push(stored_id(&to)?);
        }
    }
    Ok(next)
}

/// Whether `ancestor` is `task`'s parent, or its parent's, and so on.
pub(super) async fn is_ancestor_task(
    conn: &mut PgConnection,
    ancestor: &TaskId,
    task: &TaskId,
) -> Result<bool> {
    let found: Option<i32> = sqlx::query_scalar(
        "WITH RECURSIVE up(id) AS ( \
             SELECT parent FROM tasks WHERE id = $1 \
             UNION SELECT t.parent FROM tasks t JOIN up ON t.id = up.id) \
         SELECT 1 FROM up WHERE id = $2 LIMIT 1",
    )
    .bind(task.as_str())
    .bind(ancestor.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(found.is_some())
}

/// Recounts how many of the task's dependencies are not Done; returns the count.
pub(super) async fn refresh_deps_pending(tx: &mut PgConnection, id: &TaskId) -> Result<u32> {
    let pending: i64 = sqlx::query_scalar(
        "UPDATE tasks SET deps_pending = (SELECT COUNT(*) FROM task_deps d \
           JOIN tasks u ON u.id = d.depends_on WHERE d.task_id = $1 AND u.status <> 'done') \
         WHERE id = $1 RETURNING deps_pending",
    )
    .bind(id.as_str())
    .fetch_one(&mut *tx)
    .await?;
    u32::try_from(pending).map_err(|_| corrupt("dependency count", &pending.to_string()))
}
