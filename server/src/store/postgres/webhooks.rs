//! Webhook endpoints' cursors in PostgreSQL (`webhooks`): SQL and row mapping only.

use sqlx::PgConnection;

use crate::domain::Millis;
use crate::error::Result;
use crate::store::WebhookCursor;
use crate::store::rows::{WEBHOOK_COLUMNS, WebhookRow, webhook_cursor};

pub(super) async fn all(pool: &sqlx::PgPool) -> Result<Vec<WebhookCursor>> {
    let rows: Vec<WebhookRow> = sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY url"
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(webhook_cursor).collect())
}

pub(super) async fn open(
    conn: &mut PgConnection,
    url: &str,
    head: i64,
    now: Millis,
) -> Result<WebhookCursor> {
    sqlx::query(
        "INSERT INTO webhooks (url, position, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (url) DO NOTHING",
    )
    .bind(url)
    .bind(head)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let row: WebhookRow = sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE url = $1"
    ))
    .bind(url)
    .fetch_one(&mut *conn)
    .await?;
    Ok(webhook_cursor(row))
}

pub(super) async fn put(conn: &mut PgConnection, c: &WebhookCursor) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE webhooks SET position = $1, attempts = $2, next_attempt_at = $3, \
         failing_since = $4, last_error = $5, last_error_at = $6, last_delivered_at = $7 \
         WHERE url = $8 AND position <= $9",
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

/// Forgets an endpoint's cursor; false if it had none.
pub(super) async fn forget(conn: &mut PgConnection, url: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM webhooks WHERE url = $1")
        .bind(url)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
