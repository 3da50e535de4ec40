//! `pipeline-core`: what the pipeline's server and runner share, and nothing of the wire (no
//! tonic, no prost).
//!
//! - [`ids`]: validated identifiers (`TaskId`, `RunnerName`, `RunnerId`, `LeaseRef`,
//!   `CommitId`, `TreeId`); a value that exists is safe on a command line and in a path.
//! - [`clock`]: the clock behind a trait, and a fake one for tests.
//! - [`lines`]: the one cap on a log line's length.
//! - [`process`]: child processes in their own group, with time limits and a stop that
//!   reaches grandchildren, started through the [`guard`] (this binary re-executed), which
//!   applies the [`sandbox`] and never lets them outlive the process that started them.
//! - [`verify`]: the verifier (`bild`, build and test commands, or off), the same on runner and
//!   server.
//! - [`failpoint`]: named fault points (`PIPELINE_FAILPOINT`) for the crash and supervision
//!   tests of both binaries.
//! - [`git`]: the one typed layer over the `git` command line.
//! - [`lock`]: an exclusive lock on a file for a process's life, naming its holder (the
//!   server's state dir, a runner's work dir).
//! - [`manual`]: shell completions and man pages generated from a binary's clap definition.
//! - [`units`]: durations and sizes as people write them on a command line (`30s`, `256MiB`),
//!   bare numbers keeping their old meaning.
//! - `pgtest` (feature `test-support`, for tests only): a real PostgreSQL the tests start
//!   themselves, a database per test.
//! - `testgit` (feature `test-support`, for tests only): git for unit tests that build a
//!   repository by hand.

pub mod clock;
pub mod failpoint;
pub mod git;
pub mod guard;
pub mod ids;
pub mod lines;
pub mod lock;
pub mod manual;
#[cfg(any(test, feature = "test-support"))]
pub mod pgtest;
pub mod process;
pub mod sandbox;
#[cfg(any(test, feature = "test-support"))]
pub mod testgit;
pub mod units;
pub mod verify;
