//! How a command fails: one line a person can act on, for stderr, and an exit code that scripts
//! can rely on ([`exit`], listed in the README). Every module returns a [`Failure`]; `client.rs`
//! holds the one mapping from a failed call's gRPC status to one.

/// Exit codes, stable for scripts (also listed in the README).
pub mod exit {
    /// Anything unexpected, including an internal error of the server.
    pub const FAILURE: u8 = 1;
    /// The request was refused as malformed (also clap's code for bad flags).
    pub const USAGE: u8 = 2;
    /// The named task (or other thing) does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// The request is valid but the current state does not allow it.
    pub const REFUSED: u8 = 4;
    /// The server cannot be reached.
    pub const UNAVAILABLE: u8 = 5;
    /// A missing or wrong credential.
    pub const AUTH: u8 = 6;
}

/// A failed command: one line for stderr and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub exit_code: u8,
}

/// A reply without the task it should carry is the server's fault.
impl From<pipeline_api::wire::WithoutTask> for Failure {
    fn from(without: pipeline_api::wire::WithoutTask) -> Self {
        Failure::internal(without.to_string())
    }
}

impl Failure {
    pub fn usage(message: String) -> Self {
        Self {
            message,
            exit_code: exit::USAGE,
        }
    }

    pub fn internal(message: String) -> Self {
        Self {
            message,
            exit_code: exit::FAILURE,
        }
    }
}
