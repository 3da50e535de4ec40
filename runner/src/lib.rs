//! `pipeline-runner`: runs coding agents and verification for a pipeline server on a build
//! machine. It reaches the server over gRPC and nothing else: the base commit arrives as a git
//! bundle and the agent's commit goes back as one.
//!
//! - [`session`]: the runner's life (register, work stream, heartbeats, reconnect, drain,
//!   stop) in one event loop; its slots' bookkeeping is pure (`session/slots.rs`).
//! - [`domain`]: the runner's vocabulary (a lease as validated, its result, its log lines, how
//!   a call failed), which every other module imports and which imports none of them.
//! - [`job`]: one lease; [`logship`]: its log on the way to the server; [`agent`]: the agent
//!   (`pipeline_core::verify` runs the verifier, and `pipeline_core::process` both, in process
//!   groups with time limits).
//! - [`git`]: the mirror and the per-slot worktrees, on `pipeline_core::git`.
//! - [`wire`]: the edge, the only module that names the protocol's generated types (and
//!   `tonic::Status`): it converts them, validated, to and from the runner's own, wraps the
//!   generated client, and reads each failed call once into a [`domain::CallError`].
//! - [`usage`]: what an agent run used (tokens, cents, where the cents came from).
//! - [`backoff`]: the one back-off of every retry; [`config`]: the flags; [`preflight`]: what
//!   is checked before registering.

pub mod agent;
pub mod backoff;
pub mod build;
pub mod config;
pub mod domain;
pub mod git;
pub mod job;
pub mod logship;
pub mod preflight;
pub mod session;
pub mod usage;
pub mod wire;

pub use session::{Finished, OnceOutcome, run};
