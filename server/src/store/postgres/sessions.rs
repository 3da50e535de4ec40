//! The web page's sessions in PostgreSQL (`sessions`): SQL and row mapping only.

use sqlx::PgConnection;

use crate::error::{Error, Result};
use crate::store::{EndSessions, SessionRecord};

type Row = (String, String, String, i64, i64);

fn record((id_sha256, role, token_sha256, created_at, expires_at): Row) -> SessionRecord {
    SessionRecord {
        id_sha256,
        role,
        token_sha256,
        created_at,
        expires_at,
    }
}

pub(super) async fn all(pool: &sqlx::PgPool) -> Result<Vec<SessionRecord>> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id_sha256, role, token_sha256, created_at, expires_at FROM sessions",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(record).collect())
}

pub(super) async fn put(conn: &mut PgConnection, s: &SessionRecord) -> Result<()> {
    let done = sqlx::query(
        "INSERT INTO sessions (id_sha256, role, token_sha256, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id_sha256) DO NOTHING",
    )
    .bind(&s.id_sha256)
    .bind(&s.role)
    .bind(&s.token_sha256)
    .bind(s.created_at)
    .bind(s.expires_at)
    .execute(conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(Error::AlreadyExists("a session with that ID exists".into()));
    }
    Ok(())
}

pub(super) async fn end(conn: &mut PgConnection, which: EndSessions<'_>) -> Result<u64> {
    let query = match which {
        EndSessions::One(id) => sqlx::query("DELETE FROM sessions WHERE id_sha256 = $1").bind(id),
        EndSessions::OfToken(token) => {
            sqlx::query("DELETE FROM sessions WHERE token_sha256 = $1").bind(token)
        }
        EndSessions::ExpiredBefore(at) => {
            sqlx::query("DELETE FROM sessions WHERE expires_at < $1").bind(at)
        }
    };
    Ok(query.execute(conn).await?.rows_affected())
}
