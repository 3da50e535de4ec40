//! `pipeline-runner`: runs coding agents and verification for a pipeline server on a build
//! machine. It reaches the server over gRPC and nothing else: the base commit arrives as a git
//! bundle and the agent's commit goes back as one.
//!
//! [`session`] is the runner's life (register, work stream, heartbeats, reconnect, drain);
//! [`job`] is one lease; [`logship`] its log on the way to the server; [`agent`] runs the agent
//! and `pipeline_core::verify` the verifier, through `pipeline_core::process` (process groups,
//! time limits); [`git`] is the mirror and the per-slot worktrees; [`backoff`] is the one
//! back-off of every retry. [`wire`] is the edge: the only module that knows the protocol's
//! generated types, converting them to and from the runner's own.

pub mod agent;
pub mod backoff;
pub mod config;
pub mod git;
pub mod job;
pub mod logship;
pub mod preflight;
pub mod session;
pub mod wire;

pub use session::run;

/// Milliseconds since the Unix epoch, the protocol's time unit.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
