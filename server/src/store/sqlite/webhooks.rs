//! Webhook endpoints' cursors in SQLite (`webhooks`, migration 0019): SQL and row mapping only.

use sqlx::SqliteConnection;

use crate::domain::Millis;
use crate::error::Result;
use crate::store::WebhookCursor;
use crate::store::rows::{WEBHOOK_COLUMNS, WebhookRow, webhook_cursor};

pub(super) async fn all(pool: &sqlx::SqlitePool) -> Result<Vec<WebhookCursor>> {
    let rows: Vec<WebhookRow> = sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY url"
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(webhook_cursor).collect())
}

pub(super) async fn open(
    conn: &mut SqliteConnection,
    url: &str,
    head: i64,
    now: Millis,
) -> Result<WebhookCursor> {
    sqlx::query(
        "INSERT INTO webhooks (url, position, created_at) VALUES (?, ?, ?) \
         ON CONFLICT (url) DO NOTHING",
    )
    .bind(url)
    .bind(head)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let row: WebhookRow = sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE url = ?"
    ))
    .bind(url)
    .fetch_one(&mut *conn)
    .await?;
    Ok(webhook_cursor(row))
}

pub(super) async fn put(conn: &mut SqliteConnection, c: &WebhookCursor) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE webhooks SET position = ?, attempts = ?, next_attempt_at = ?, \
         failing_since = ?, last_error = ?, last_error_at = ?, last_delivered_at = ? \
         WHERE url = ? AND position <= ?",
    )
    .bind(c.position)
    .bind(i64::from(c.attempts))
    .bind(c.next_attempt_at)
    .bind(c.failing_since)
    .bind(&c.last_error)
    .bind(c.last_error_at)
    .bind(c.last_delivered_at)
    .bind(&c.url)
    .bind(c.position)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn forget(conn: &mut SqliteConnection, url: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM webhooks WHERE url = ?")
        .bind(url)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
