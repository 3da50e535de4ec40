//! Server facts in `meta`, and the counter of generated task IDs kept there.

use sqlx::PgConnection;

use super::PgStore;
use super::rows::corrupt;
use crate::error::Result;

pub(super) const NEXT_TASK_NUMBER: &str = "next_task_number";

/// Writes a fact, over the one with its key.
const UPSERT_META: &str = "INSERT INTO meta (key, value) VALUES ($1, $2) \
     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value";

/// The number the next generated ID tries first.
pub(super) async fn next_number(conn: &mut PgConnection) -> Result<u64> {
    let stored: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
        .bind(NEXT_TASK_NUMBER)
        .fetch_optional(&mut *conn)
        .await?;
    match stored {
        Some(v) => v.parse().map_err(|_| corrupt("task counter", &v)),
        None => Ok(1),
    }
}

/// Writes the counter of generated IDs (in the caller's transaction).
pub(super) async fn set_next_number(conn: &mut PgConnection, n: u64) -> Result<()> {
    sqlx::query(UPSERT_META)
        .bind(NEXT_TASK_NUMBER)
        .bind(n.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn raise_next_task_number(store: &PgStore, at_least: u64) -> Result<()> {
    let mut tx = store.write().await?;
    let next: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
        .bind(NEXT_TASK_NUMBER)
        .fetch_optional(&mut *tx)
        .await?;
    let next: u64 = match next {
        Some(v) => v.parse().map_err(|_| corrupt("task counter", &v))?,
        None => 1,
    };
    if at_least > next {
        sqlx::query(UPSERT_META)
            .bind(NEXT_TASK_NUMBER)
            .bind(at_least.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

pub(super) async fn is_fresh(store: &PgStore) -> Result<bool> {
    let any_task: Option<i32> = sqlx::query_scalar("SELECT 1 FROM tasks LIMIT 1")
        .fetch_optional(&store.pool)
        .await?;
    let counter: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
        .bind(NEXT_TASK_NUMBER)
        .fetch_optional(&store.pool)
        .await?;
    Ok(any_task.is_none() && counter.is_none())
}

pub(super) async fn get_meta(store: &PgStore, key: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
        .bind(key)
        .fetch_optional(&store.pool)
        .await?)
}

pub(super) async fn list_meta(store: &PgStore, prefix: &str) -> Result<Vec<(String, String)>> {
    Ok(
        sqlx::query_as("SELECT key, value FROM meta WHERE starts_with(key, $1) ORDER BY key")
            .bind(prefix)
            .fetch_all(&store.pool)
            .await?,
    )
}

pub(super) async fn delete_meta(store: &PgStore, key: &str) -> Result<()> {
    let mut tx = store.write().await?;
    sqlx::query("DELETE FROM meta WHERE key = $1")
        .bind(key)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn put_meta(store: &PgStore, key: &str, value: &str) -> Result<()> {
    let mut tx = store.write().await?;
    sqlx::query(UPSERT_META)
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}
