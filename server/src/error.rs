//! The one error type of the coordinator's domain. Each variant maps to one gRPC status code (in
//! `grpc::status_from_error`); the message is one lowercase line a person can act on.
//!
//! Architecture invariant: the domain's error knows no backend. A store backend maps its own
//! errors (a lock held past its busy timeout, a constraint, I/O) to these variants at its edge
//! (`store::sqlite::errors` for SQLite).

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

/// What a caller is told when the database's lock was still taken at the end of its busy
/// timeout.
pub const DATABASE_BUSY: &str = "the database is busy, try again";

pub type Result<T, E = Error> = std::result::Result<T, E>;
