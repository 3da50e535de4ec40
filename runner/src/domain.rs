//! The runner's vocabulary: the words every other module of the runner speaks, and imports from
//! here only. A lease as the edge validated it ([`Assignment`], its [`RunId`]), how its work came
//! out ([`Outcome`], the [`LeaseResult`] sent, the [`JobEnd`] the session gets), its log
//! ([`LogLine`], with its [`Channel`] and [`Phase`]), the runner ID calls carry
//! ([`CurrentRunner`]), and how a call to the server failed ([`CallError`], read once by `wire`
//! for the call that failed, so that no other module sees the protocol's status).
//!
//! Architecture invariant: this module depends on no other module of the runner; `wire`, `job`,
//! `logship`, the agents and the session depend on it, never on each other for these words.

use std::sync::{Arc, RwLock};

use pipeline_core::ids::{CommitId, InvalidId, LeaseRef, RunnerId, TaskId};
use pipeline_core::process::Stream;
use pipeline_core::verify::Verifier;

use crate::usage::Usage;

/// A lease the server gave this runner, as the edge checked it: everything a job needs, valid.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub lease: LeaseRef,
    pub task: TaskId,
    pub run_id: RunId,
    /// The task's title (the message of a commit the runner makes for its agent).
    pub title: String,
    pub namespace: Option<String>,
    /// The base branch's name.
    pub base_branch: String,
    /// The commit the work starts from.
    pub base: CommitId,
    /// The previous patchset, when the agent amends it (its parent is `base`).
    pub previous: Option<CommitId>,
    pub patchset: u32,
    /// The whole prompt, built by the server.
    pub prompt: String,
    /// How the server verifies: the job verifies the same way. `None` from an older server,
    /// which leaves it to the runner's own verification flags.
    pub verification: Option<Verifier>,
    /// What the task may still spend, in cents (finite, ≥ 0); `None`: no cap.
    pub budget_cents: Option<f64>,
    /// The agent's session of the previous attempt (letters, digits, `.`, `_`, `-`).
    pub resume_session: Option<String>,
}

/// A run's ID as the server names it (`dev-<task>-<epoch>`): safe in a file name and as an
/// argument (letters, digits, `.`, `_` and `-`, starting with a letter or a digit, at most 200
/// bytes).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RunId(String);

impl RunId {
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        let ok = !raw.is_empty()
            && raw.len() <= 200
            && raw.as_bytes()[0].is_ascii_alphanumeric()
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(InvalidId(format!(
                "invalid run id {}",
                pipeline_core::ids::quote_for_message(raw)
            )));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The runner ID calls about leases carry: the current registration's, published by the
/// session once the server has re-attached the runner's leases to it.
#[derive(Clone, Debug, Default)]
pub struct CurrentRunner(Arc<RwLock<Option<RunnerId>>>);

impl CurrentRunner {
    pub fn set(&self, id: RunnerId) {
        if let Ok(mut current) = self.0.write() {
            *current = Some(id);
        }
    }

    /// The ID, for a call. Before the first attachment a call fails as if the server were away
    /// (no job starts before it, so none is made).
    pub fn get(&self) -> Result<RunnerId, CallError> {
        self.0
            .read()
            .ok()
            .and_then(|id| id.clone())
            .ok_or_else(|| CallError::Retry("the runner is not registered yet".to_owned()))
    }
}

/// A train build the server hands the runner (`--remote-builds`): build `commit` under the
/// server's verification in a clean worktree and say green or red.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildJob {
    /// Its fence: reported in heartbeats as a lease is.
    pub build: LeaseRef,
    pub commit: CommitId,
    pub base_branch: String,
    pub base: CommitId,
    /// The server's verification; `None` for a mode this runner does not know.
    pub verification: Option<Verifier>,
    /// (namespace, task) of each run, in order.
    pub runs: Vec<(Option<String>, Option<TaskId>)>,
}

/// How a build job came out, as sent to the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildOutcome {
    Green {
        digest: String,
    },
    Red {
        why: String,
        digest: String,
    },
    /// The runner could not build it (not the commit's fault): built elsewhere.
    Infra(String),
}

/// How a job ended, for the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEnd {
    /// The server took the result, which said this.
    Delivered(Outcome),
    /// The server no longer wants it (lease gone, commit refused): nothing more to do.
    Refused(String),
    /// Stopped before a result.
    Cancelled,
    /// The runner could not do the work (a missing program, a git or disk error, a panic: not
    /// the task's fault): give the lease back, uncharged, saying why.
    Infra(String),
    /// As `Infra`, and the next task would fail the same way (the agent has no credentials,
    /// no network): the runner turns unhealthy at once, in the agent's words.
    Unusable(String),
    /// The agent's provider refused work for now (a rate limit): the lease goes back
    /// uncharged and the runner takes no new work until `until_ms` (ms since the epoch).
    RateLimited { reason: String, until_ms: i64 },
    /// As `Infra`, for want of room on the work dir's disk (at `at_ms`, ms since the epoch):
    /// the runner takes no work until its disk has room again, which heals without a restart.
    DiskFull { reason: String, at_ms: i64 },
}

/// How a lease's work came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The agent failed or left something other than one commit; no bundle follows.
    DevFailed,
    /// The commit was made but verification failed; its bundle follows.
    VerifyFailed,
    /// The commit passed (or skipped) verification; its bundle follows.
    Verified,
}

/// A lease's result, as sent to the server.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseResult {
    pub outcome: Outcome,
    /// The reason, with the tail of the failing command's output.
    pub error: Option<String>,
    pub cost_cents: f64,
    /// The commit the bundle holds (for `VerifyFailed` and `Verified`).
    pub commit: Option<CommitId>,
    /// Why verification was skipped, when it was.
    pub verify_skipped: Option<String>,
    /// The digest of the verification run, when one ran.
    pub verify_digest: Option<String>,
    pub dev_finished_at_ms: i64,
    /// What the agent used, when known.
    pub usage: Option<Usage>,
}

/// Where a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    Stdout,
    Stderr,
    /// The runner's own lifecycle lines ("leased", "worktree ready", ...).
    Runner,
    /// The agent's output as received, where the runner shows it rendered on `Stdout` (the
    /// JSON events of claude and codex): `pipelinectl logs --raw` shows these instead.
    Raw,
}

impl From<Stream> for Channel {
    fn from(stream: Stream) -> Self {
        match stream {
            Stream::Stdout => Channel::Stdout,
            Stream::Stderr => Channel::Stderr,
        }
    }
}

/// The phase of the run a line belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Dev,
    Verify,
}

/// One line of a lease's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Per run, from 1; a gap means lines were dropped.
    pub seq: u64,
    pub at_ms: i64,
    pub channel: Channel,
    pub phase: Phase,
    pub text: String,
}

/// How a call to the server failed, as the runner acts on it. `wire` reads each failed call's
/// status once, the way that call means it (a refusal of a log batch is not a refusal of a
/// registration), so the rest of the runner matches on these four and never on a status code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The server is away, busy or failed inside, or the link broke: try again later.
    #[error("{0}")]
    Retry(String),
    /// The server does not know this runner (it restarted, or forgot it): register again.
    #[error("{0}")]
    Unregistered(String),
    /// The server refused this request for good, saying why (a lease that is over, a request
    /// it will never take): drop it.
    #[error("{why}")]
    Refused { why: String, refusal: Refusal },
    /// This runner cannot make this call at all, saying why: stop trying it.
    #[error("{why}")]
    Fatal { why: String, cause: Fatal },
}

/// What a refusal was about, where the runner acts on the difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A registration's name is held by a runner still connected (perhaps this runner's own
    /// earlier connection, which goes away).
    NameTaken,
    /// Any other refusal.
    Other,
}

/// Why a call cannot be made at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fatal {
    /// The server does not accept this runner's credential.
    Credential,
    /// The server, or what answers at its address, does not serve this call: not a pipeline
    /// server, or one too old.
    Unsupported,
    /// Before the first registration: the server cannot be reached for a reason waiting will
    /// not heal (a URL, a certificate, TLS on one side only).
    Unreachable,
    /// Anything else that a repeat cannot change.
    Other,
}

impl CallError {
    /// The server's (or the connection's) words.
    pub fn message(&self) -> &str {
        match self {
            CallError::Retry(why) | CallError::Unregistered(why) => why,
            CallError::Refused { why, .. } | CallError::Fatal { why, .. } => why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_safe_in_file_names_and_arguments() {
        assert!(RunId::parse("dev-t-1-2").is_ok());
        assert!(RunId::parse(&format!("dev-{}-18446744073709551615", "x".repeat(64))).is_ok());
        for bad in ["", "-n", ".hidden", "a/b", "../x", "a b", &"x".repeat(201)] {
            assert!(RunId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
