//! Webhook endpoints' cursors in PostgreSQL (`webhooks`): SQL and row mapping only.

use sqlx::PgConnection;

use crate::domain::Millis;
use crate::error::Result;
use crate::store::WebhookCursor;

type Row = (
    String,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

const COLUMNS: &str = "url, position, attempts, next_attempt_at, failing_since, last_error, \
                       last_error_at, last_delivered_at";

fn cursor(
    (
        url,
        position,
        attempts,
        next_attempt_at,
        failing_since,
        last_error,
        last_error_at,
        last_delivered_at,
    ): Row,
) -> WebhookCursor {
    WebhookCursor {
        url,
        position,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        next_attempt_at,
        failing_since,
        last_error,
        last_error_at,
        last_delivered_at,
    }
}

pub(super) async fn all(pool: &sqlx::PgPool) -> Result<Vec<WebhookCursor>> {
    let rows: Vec<Row> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM webhooks ORDER BY url"))
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(cursor).collect())
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
    let row: Row = sqlx::query_as(&format!("SELECT {COLUMNS} FROM webhooks WHERE url = $1"))
        .bind(url)
        .fetch_one(&mut *conn)
        .await?;
    Ok(cursor(row))
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
