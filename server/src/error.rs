//! The one error type of the coordinator's domain. Each variant maps to one gRPC status code (in
//! `grpc::status_from_error`); the message is one lowercase line a person can act on.

/// What went wrong, classified by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong (a malformed ID, a priority out of range): fix the request.
    #[error("{0}")]
    InvalidArgument(String),
    /// A named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A thing to be created exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well-formed but the state does not allow it (cancel a done task, a cycle).
    #[error("{0}")]
    FailedPrecondition(String),
    /// No credential, or one the server does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid credential that may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// Too much, too fast: a rate or size limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A write raced another and lost; the caller may read again and retry.
    #[error("{0}")]
    Conflict(String),
    /// Something the server depends on is busy for now (the database's write lock stayed
    /// taken for its whole busy timeout): the caller may try again.
    #[error("{0}")]
    Busy(String),
    /// Something the server depends on failed (the database, git).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The same error, saying which task of a batch (`index`, from 0) it is about.
    pub fn in_batch(self, index: usize) -> Self {
        let at = |m: String| format!("task {} of the batch: {m}", index + 1);
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(at(m)),
            Error::NotFound(m) => Error::NotFound(at(m)),
            Error::AlreadyExists(m) => Error::AlreadyExists(at(m)),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(at(m)),
            Error::Unauthenticated(m) => Error::Unauthenticated(m),
            Error::PermissionDenied(m) => Error::PermissionDenied(m),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(at(m)),
            Error::Conflict(m) => Error::Conflict(at(m)),
            Error::Busy(m) => Error::Busy(m),
            Error::Internal(m) => Error::Internal(at(m)),
        }
    }
}

impl From<pipeline_core::ids::InvalidId> for Error {
    fn from(err: pipeline_core::ids::InvalidId) -> Self {
        Error::InvalidArgument(err.0)
    }
}

/// What a caller is told when SQLite's lock was still taken at the end of its busy timeout.
pub const DATABASE_BUSY: &str = "the database is busy, try again";

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
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

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::{DATABASE_BUSY, Error};

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
