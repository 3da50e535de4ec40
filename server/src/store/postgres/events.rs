//! The change feed's rows (`task_events`): a task's history written and read, the entries
//! of other topics recorded in a write's transaction (`record`), and the feed read by
//! position. Every entry's position comes from the one-row counter `feed_head`, in the
//! writing transaction (which holds its row lock from its start: the write turn).

use sqlx::PgConnection;

use super::PgStore;
use super::rows::{EventRow, FEED_COLUMNS, FeedRow};
use crate::domain::{Millis, TaskEvent, TaskId, TaskStatus};
use crate::error::Error;
use crate::error::Result;
use crate::feed::{FeedEntry, NewEntry, Topic};

pub(super) async fn insert_event(
    conn: &mut PgConnection,
    id: &TaskId,
    at: Millis,
    kind: &str,
    from: Option<TaskStatus>,
    to: TaskStatus,
    message: &str,
) -> Result<i64> {
    let id: i64 = sqlx::query_scalar(
        "WITH p AS (UPDATE feed_head SET pos = pos + 1 RETURNING pos) \
         INSERT INTO task_events (id, task_id, at, kind, from_status, to_status, message) \
         SELECT p.pos, $1, $2, $3, $4, $5, $6 FROM p RETURNING id",
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

pub(super) async fn events(store: &PgStore, id: &TaskId) -> Result<Vec<TaskEvent>> {
    let rows: Vec<EventRow> = sqlx::query_as(
        "SELECT id, task_id, at, kind, from_status, to_status, message \
         FROM task_events WHERE task_id = $1 ORDER BY id",
    )
    .bind(id.as_str())
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(EventRow::into_event).collect()
}

pub(super) async fn last_event_id(store: &PgStore) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM task_events")
            .fetch_one(&store.pool)
            .await?,
    )
}

pub(super) async fn events_after(
    store: &PgStore,
    after_id: i64,
    limit: u32,
) -> Result<Vec<TaskEvent>> {
    let rows: Vec<EventRow> = sqlx::query_as(
        "SELECT id, task_id, at, kind, from_status, to_status, message \
         FROM task_events WHERE id > $1 AND topic = 'task' ORDER BY id LIMIT $2",
    )
    .bind(after_id)
    .bind(i64::from(limit))
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(EventRow::into_event).collect()
}

/// Records a feed entry that is not a task's (those are its history, written with the task)
/// in the transaction `tx`; returns its position. It is published once `tx` commits.
pub(super) async fn record(tx: &mut PgConnection, entry: &NewEntry) -> Result<i64> {
    if entry.topic == Topic::Task {
        return Err(Error::Internal(
            "a task's feed entry is written with its task's change".into(),
        ));
    }
    Ok(sqlx::query_scalar(
        "WITH p AS (UPDATE feed_head SET pos = pos + 1 RETURNING pos) \
         INSERT INTO task_events (id, topic, subject, at, kind, message, data) \
         SELECT p.pos, $1, $2, $3, $4, $5, $6 FROM p RETURNING id",
    )
    .bind(entry.topic.as_str())
    .bind(&entry.subject)
    .bind(entry.at)
    .bind(&entry.kind)
    .bind(&entry.message)
    .bind(&entry.data)
    .fetch_one(tx)
    .await?)
}

/// Records `entry` in a transaction of its own.
pub(super) async fn record_alone(store: &PgStore, entry: &NewEntry) -> Result<i64> {
    let mut tx = store.write().await?;
    let position = record(&mut tx, entry).await;
    tx.finish(position).await
}

/// Writes or forgets a server fact and records `entry`, in one transaction.
pub(super) async fn set_meta_recording(
    store: &PgStore,
    key: &str,
    value: Option<&str>,
    entry: &NewEntry,
) -> Result<i64> {
    let mut tx = store.write().await?;
    let written = async {
        match value {
            Some(value) => {
                sqlx::query(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                )
                .bind(key)
                .bind(value)
                .execute(&mut *tx)
                .await?
            }
            None => {
                sqlx::query("DELETE FROM meta WHERE key = $1")
                    .bind(key)
                    .execute(&mut *tx)
                    .await?
            }
        };
        record(&mut tx, entry).await
    }
    .await;
    tx.finish(written).await
}

/// The feed's entries after `after`, oldest first, at most `limit`.
pub(super) async fn entries_after(
    store: &PgStore,
    after: i64,
    limit: u32,
) -> Result<Vec<FeedEntry>> {
    let rows: Vec<FeedRow> = sqlx::query_as(&format!(
        "SELECT {FEED_COLUMNS} FROM task_events WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(FeedRow::into_entry).collect()
}

/// The entries after `after`, once a write committed (for their publication).
pub(super) async fn unpublished(pool: &sqlx::PgPool, after: i64) -> Result<Vec<FeedRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {FEED_COLUMNS} FROM task_events WHERE id > $1 ORDER BY id"
    ))
    .bind(after)
    .fetch_all(pool)
    .await?)
}
