//! Task history: its rows written and read.

use sqlx::SqliteConnection;

use super::SqliteStore;
use super::rows::EventRow;
use crate::domain::{Millis, TaskEvent, TaskId, TaskStatus};
use crate::error::Result;

pub(super) async fn insert_event(
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

pub(super) async fn events(store: &SqliteStore, id: &TaskId) -> Result<Vec<TaskEvent>> {
    let rows: Vec<EventRow> = sqlx::query_as(
        "SELECT id, task_id, at, kind, from_status, to_status, message \
         FROM task_events WHERE task_id = ? ORDER BY id",
    )
    .bind(id.as_str())
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(EventRow::into_event).collect()
}

pub(super) async fn last_event_id(store: &SqliteStore) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM task_events")
            .fetch_one(&store.pool)
            .await?,
    )
}

pub(super) async fn events_after(
    store: &SqliteStore,
    after_id: i64,
    limit: u32,
) -> Result<Vec<TaskEvent>> {
    let rows: Vec<EventRow> = sqlx::query_as(
        "SELECT id, task_id, at, kind, from_status, to_status, message \
         FROM task_events WHERE id > ? ORDER BY id LIMIT ?",
    )
    .bind(after_id)
    .bind(i64::from(limit))
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(EventRow::into_event).collect()
}
