//! PostgreSQL's errors as the domain's ([`Error`]), mapped here at the backend's edge. What a
//! caller should simply try again is [`Error::Busy`] (gRPC `UNAVAILABLE`, HTTP 503): a lost
//! serialization or deadlock race, a lock or statement timeout, a server shutting down or
//! starting, too many connections, a broken connection (SQLSTATE classes 08, 40, 53, 57 and
//! `55P03`), and a pool with no connection to give (the database unreachable). Anything else
//! is [`Error::Internal`] (`sqlite/errors.rs` holds the one `From<sqlx::Error>`, which asks
//! [`domain`] first).

use crate::error::{DATABASE_BUSY, Error};

/// The domain's error for a PostgreSQL failure, or `None` when `err` is none of PostgreSQL's.
pub(crate) fn domain(err: &sqlx::Error) -> Option<Error> {
    let code = match err {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?
            .code()
            .to_owned(),
        // A connection that broke, or none to be had in time: the database is away (a
        // restart, the network), which passes; SQLite's never end so.
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => {
            tracing::warn!(error = %err, "the database cannot be reached");
            return Some(Error::Busy(DATABASE_BUSY.to_owned()));
        }
        _ => return None,
    };
    if is_transient(&code) {
        tracing::warn!(error = %err, sqlstate = %code, "the database asked to try again");
        return Some(Error::Busy(DATABASE_BUSY.to_owned()));
    }
    Some(Error::Internal(format!("database: {err}")))
}

/// Whether SQLSTATE `code` is a failure that passes by itself.
fn is_transient(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "40" | "53" | "57")) || code == "55P03"
}

/// The refusal of a database that cannot be opened at start-up, in one line saying what to
/// fix (`shown` is the URL without its password).
pub(crate) fn cannot_open(shown: &str, err: &sqlx::Error) -> Error {
    let why = match err {
        sqlx::Error::Io(e) => {
            format!("cannot reach the server ({e}); is PostgreSQL running there?")
        }
        sqlx::Error::PoolTimedOut => {
            "no connection within 10 s; is PostgreSQL running and reachable there?".to_owned()
        }
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01" | "28000") => {
                format!("{}; check the user and password in the URL", db.message())
            }
            Some("3D000") => format!("{}; create it first (createdb)", db.message()),
            _ => db.message().to_owned(),
        },
        other => other.to_string(),
    };
    Error::FailedPrecondition(format!("--db {shown}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn races_timeouts_and_shutdowns_are_transient_and_the_rest_is_not() {
        for code in [
            "40001", "40P01", "55P03", "57014", "57P01", "53300", "08006",
        ] {
            assert!(is_transient(code), "{code}");
        }
        for code in ["23505", "42P01", "22003", "XX000"] {
            assert!(!is_transient(code), "{code}");
        }
    }

    #[test]
    fn a_shown_url_has_no_password() {
        use super::super::shown_url;
        assert_eq!(
            shown_url("postgres://ann:secret@db.example:5432/pipeline?sslmode=require"),
            "postgres://ann:***@db.example:5432/pipeline?sslmode=require"
        );
        assert_eq!(
            shown_url("postgres://ann@db/pipeline"),
            "postgres://ann@db/pipeline"
        );
        assert_eq!(
            shown_url("postgresql:///pipeline?host=/run/pg"),
            "postgresql:///pipeline?host=/run/pg"
        );
    }
}
