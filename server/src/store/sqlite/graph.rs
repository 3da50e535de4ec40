//! The graph of tasks as stored: whether one waits for another (dependencies, and an epic
//! for its children), and the pending-dependency count it keeps.

use std::collections::{HashMap, HashSet};

use sqlx::SqliteConnection;

use super::rows::{corrupt, edges_of, stored_id};
use crate::domain::TaskId;
use crate::error::Result;

/// Edges of tasks a batch creates before they are written (the earlier lines of the batch):
/// each one's dependencies, and the children each parent gains.
#[derive(Default)]
pub(super) struct Unwritten {
    pub(super) deps: HashMap<TaskId, Vec<TaskId>>,
    pub(super) children: HashMap<TaskId, Vec<TaskId>>,
}

/// Whether `from` waits for `to`, directly or not: a task waits for its dependencies, and an
/// epic for its children. Walks the graph a level at a time (one statement per level for the
/// stored tasks; `unwritten` for the batch's own).
pub(super) async fn waits_for(
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
pub(super) async fn is_ancestor_task(
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

/// Recounts how many of `id`'s dependencies are not Done.
/// Recounts how many of the task's dependencies are not Done; returns the count.
pub(super) async fn refresh_deps_pending(tx: &mut SqliteConnection, id: &TaskId) -> Result<u32> {
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
