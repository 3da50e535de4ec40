//! Server facts in `meta`, and the counter of generated task IDs kept there.

use sqlx::SqliteConnection;

use super::SqliteStore;
use super::rows::corrupt;
use crate::error::Result;

pub(super) const NEXT_TASK_NUMBER: &str = "next_task_number";

/// The number the next generated ID tries first.
pub(super) async fn next_number(conn: &mut SqliteConnection) -> Result<u64> {
    let stored: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
        .bind(NEXT_TASK_NUMBER)
        .fetch_optional(&mut *conn)
        .await?;
    match stored {
        Some(v) => v.parse().map_err(|_| corrupt("task counter", &v)),
        None => Ok(1),
    }
}

/// Writes the counter of generated IDs (in the caller's transaction).
pub(super) async fn set_next_number(conn: &mut SqliteConnection, n: u64) -> Result<()> {
    sqlx::query("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)")
        .bind(NEXT_TASK_NUMBER)
        .bind(n.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn raise_next_task_number(store: &SqliteStore, at_least: u64) -> Result<()> {
    let mut tx = store.write().await?;
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

pub(super) async fn is_fresh(store: &SqliteStore) -> Result<bool> {
    let any_task: Option<i64> = sqlx::query_scalar("SELECT 1 FROM tasks LIMIT 1")
        .fetch_optional(&store.pool)
        .await?;
    let counter: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
        .bind(NEXT_TASK_NUMBER)
        .fetch_optional(&store.pool)
        .await?;
    Ok(any_task.is_none() && counter.is_none())
}

pub(super) async fn get_meta(store: &SqliteStore, key: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
        .bind(key)
        .fetch_optional(&store.pool)
        .await?)
}

pub(super) async fn list_meta(store: &SqliteStore, prefix: &str) -> Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT key, value FROM meta WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
    )
    .bind(prefix)
    .fetch_all(&store.pool)
    .await?)
}

pub(super) async fn delete_meta(store: &SqliteStore, key: &str) -> Result<()> {
    let mut tx = store.write().await?;
    sqlx::query("DELETE FROM meta WHERE key = ?")
        .bind(key)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn put_meta(store: &SqliteStore, key: &str, value: &str) -> Result<()> {
    let mut tx = store.write().await?;
    sqlx::query("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)")
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}
