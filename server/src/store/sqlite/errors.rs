//! SQLite's errors as the domain's ([`Error`]), mapped here at the backend's edge (the one
//! `From<sqlx::Error>` is here; it hands PostgreSQL's to `store/postgres/errors.rs`): a lock
//! still held at the end of the busy timeout (`SQLITE_BUSY`, `SQLITE_LOCKED`) is
//! [`Error::Busy`] with [`DATABASE_BUSY`] (gRPC `UNAVAILABLE`, HTTP 503: try again); any other
//! database or migration error is [`Error::Internal`].

use crate::error::{DATABASE_BUSY, Error};

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        // PostgreSQL's errors are mapped by its backend's edge.
        if let Some(mapped) = crate::store::postgres::errors::domain(&err) {
            return mapped;
        }
        if is_busy(&err) {
            tracing::warn!(error = %err, "the database stayed locked for its busy timeout");
            return Error::Busy(DATABASE_BUSY.to_owned());
        }
        Error::Internal(format!("database: {err}"))
    }
}

/// Whether `err` is SQLite's `SQLITE_BUSY` or `SQLITE_LOCKED` (any extended code of them): a
/// lock another connection held, not a fault of the request or of the database.
fn is_busy(err: &sqlx::Error) -> bool {
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_LOCKED: i32 = 6;
    err.as_database_error()
        .and_then(|db| db.try_downcast_ref::<sqlx::sqlite::SqliteError>())
        .and_then(sqlx::error::DatabaseError::code)
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| matches!(code & 0xff, SQLITE_BUSY | SQLITE_LOCKED))
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        Error::Internal(format!("database migration: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use crate::error::{DATABASE_BUSY, Error};

    /// SQLite's BUSY and LOCKED (and their extended codes) reach a caller as a refusal to try
    /// again, never as an internal error; other database errors stay internal.
    #[tokio::test]
    async fn a_locked_database_is_busy_not_an_internal_error() {
        use sqlx::Connection;
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let options: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("url");
        let options = options
            .create_if_missing(true)
            .busy_timeout(std::time::Duration::ZERO);
        let mut holder = sqlx::SqliteConnection::connect_with(&options)
            .await
            .expect("connect");
        let mut other = sqlx::SqliteConnection::connect_with(&options)
            .await
            .expect("connect");
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut holder)
            .await
            .expect("lock");
        let locked = sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut other)
            .await
            .expect_err("locked");
        match Error::from(locked) {
            Error::Busy(m) => assert_eq!(m, DATABASE_BUSY),
            other => panic!("not busy: {other:?}"),
        }
        let wrong = sqlx::query("SELECT * FROM no_such_table")
            .execute(&mut holder)
            .await
            .expect_err("no table");
        assert!(matches!(Error::from(wrong), Error::Internal(_)));
    }
}
