//! The middle layer's ports: what the coordinator and the integrator need of the world outside
//! them, as traits they own. [`Repository`] is what they need of git (branch tips, commits,
//! the bundles runners send and fetch, cherry-picks, the landed records, the compare-and-swap
//! of the base, the push); [`Builder`] is the integration build (build this commit under this
//! verification, with its log, and say green, red or cancelled, an infrastructure failure
//! being an error apart from red). `repo::Repo` and `build::LocalBuilder` implement them for
//! the server; `fake` implements them in memory, so dispatch rounds, result handling, recovery,
//! landing and the train driver are unit-tested without `git init` or a build.
//!
//! Architecture invariant: `coordinator/` and `integrate/` name no adapter (`repo`, `build`):
//! they reach git and the integration build only through these traits; `app.rs` (and the gRPC
//! edge, which streams the bundle git writes) chooses the adapters.

#[cfg(test)]
pub mod fake;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;

use pipeline_core::git::{BranchName, GitError, Merged, RefName, RemoteName};
use pipeline_core::ids::{CommitId, TaskId, TreeId};
use pipeline_core::verify::Verifier;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// What the coordinator and the integrator need of the canonical repository. Every method is
/// one question or one change; a git or disk failure is `Error::Internal` (the server's
/// trouble, never a task's), a refused bundle `Error::InvalidArgument`.
pub trait Repository: Send + Sync + 'static {
    /// What [`Repository::base_bundle`] hands the gRPC edge to stream to a runner.
    type BaseBundle: Send;

    /// The commit `branch` points at; `NotFound` if it does not exist.
    fn tip(&self, branch: &BranchName) -> impl Future<Output = Result<CommitId>> + Send;

    /// The parents of `commit`.
    fn parents(&self, commit: &CommitId) -> impl Future<Output = Result<Vec<CommitId>>> + Send;

    /// The tree of `commit`.
    fn tree_of(&self, commit: &CommitId) -> impl Future<Output = Result<TreeId>> + Send;

    /// The file at `path` (a constant of the program) in `commit`'s tree, if there is one.
    fn file_at(
        &self,
        commit: &CommitId,
        path: &'static str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;

    /// Whether `ancestor` is in the history of `descendant` (or is it).
    fn is_ancestor(
        &self,
        ancestor: &CommitId,
        descendant: &CommitId,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Points `name` at `commit`.
    fn update_ref(
        &self,
        name: &RefName,
        commit: &CommitId,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Points `remote`'s ref `name` at `commit`, pushing its objects: the server's own refs
    /// (a task's patch kept where another server can read it), never a branch.
    fn push_ref(
        &self,
        remote: &RemoteName,
        name: &RefName,
        commit: &CommitId,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Moves `name` from `old` to `new` only if it is still at `old`; false if it moved.
    fn compare_and_swap(
        &self,
        name: &RefName,
        new: &CommitId,
        old: &CommitId,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// What a lease's runner lacks of `base` (and `previous`, when it amends it), less the
    /// commits of `have`; kept under the task's fetch refs meanwhile.
    fn base_bundle(
        &self,
        task: &TaskId,
        base: &CommitId,
        previous: Option<&CommitId>,
        have: &[CommitId],
    ) -> impl Future<Output = Result<Self::BaseBundle>> + Send;

    /// Takes a runner's bundle at `path`: it must hold exactly `expected`, need nothing but
    /// `base`, and `expected` must be one commit on `base`. A bundle that is not that is
    /// refused (`InvalidArgument`, saying why).
    fn receive_bundle(
        &self,
        path: &Path,
        base: &CommitId,
        expected: &CommitId,
    ) -> impl Future<Output = Result<CommitId>> + Send;

    /// The task's own landed commit (`refs/pipeline/landed/<id>`), if it is in the history of
    /// `tip`.
    fn landed_on(
        &self,
        task: &TaskId,
        tip: &CommitId,
    ) -> impl Future<Output = Result<Option<CommitId>>> + Send;

    /// Every task's landed commit, by task ID.
    fn landed_commits(&self) -> impl Future<Output = Result<HashMap<String, CommitId>>> + Send;

    /// Records `commit` as the task's own landed commit (before the base moves to it).
    fn record_landing(
        &self,
        task: &TaskId,
        commit: &CommitId,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Signs of an earlier pipeline in the repository (its refs, a `Task-Id:` trailer on
    /// `branch`), said.
    fn pipeline_history(
        &self,
        branch: &BranchName,
    ) -> impl Future<Output = Result<Option<String>>> + Send;

    /// The highest `n` of the generated task IDs (`t-<n>`) the repository knows, in its refs
    /// and in the trailers of `since..tip`.
    fn highest_task_number(
        &self,
        since: Option<&CommitId>,
        tip: &CommitId,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// `commit` (whose parent is `parent`) cherry-picked onto `onto` without touching files:
    /// the merged tree, or the conflict. A failure keeps git's error, so that the caller can
    /// tell the machine's trouble from the input's.
    fn cherry_pick(
        &self,
        parent: &CommitId,
        onto: &CommitId,
        commit: &CommitId,
    ) -> impl Future<Output = std::result::Result<Merged, GitError>> + Send;

    /// The integrated commit: `tree` on `parent`, with `original`'s author and message and
    /// exactly one `Task-Id:` trailer, the task's own.
    fn commit_for_task(
        &self,
        tree: &TreeId,
        parent: &CommitId,
        original: &CommitId,
        task: &TaskId,
    ) -> impl Future<Output = Result<CommitId>> + Send;

    /// `commit` (whose parent is `parent`) replayed onto `onto`: the same change, author and
    /// message on a new parent, or (`Ok(Err)`) the conflict.
    fn replay(
        &self,
        parent: &CommitId,
        onto: &CommitId,
        commit: &CommitId,
    ) -> impl Future<Output = Result<std::result::Result<CommitId, String>>> + Send;

    /// Fetches `branch` from `remote`; its commit there.
    fn fetch_branch(
        &self,
        remote: &RemoteName,
        branch: &BranchName,
    ) -> impl Future<Output = Result<CommitId>> + Send;

    /// Pushes `new` to `remote`'s `branch` only if it is still at `expected`; false when the
    /// remote moved.
    fn push_with_lease(
        &self,
        remote: &RemoteName,
        branch: &BranchName,
        new: &CommitId,
        expected: &CommitId,
    ) -> impl Future<Output = Result<bool>> + Send;
}

/// One integration build: a commit, under a verification, in one or more runs.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildJob {
    /// The commit whose tree is built.
    pub commit: CommitId,
    /// The verification it is built under (the server's).
    pub verifier: Verifier,
    /// The base tip the built chain sits on (`PIPELINE_BASE_COMMIT`; the commit itself when
    /// the base is built alone).
    pub base_commit: CommitId,
    /// The verification's runs, in order, each for a namespace (under `bild`, one per
    /// namespace the built tasks name; else one). None: nothing to build, green.
    pub runs: Vec<BuildRun>,
}

/// One run of a [`BuildJob`]'s verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildRun {
    /// The namespace it builds.
    pub namespace: Option<String>,
    /// The task it is built for (`PIPELINE_TASK_ID`); none for the base alone.
    pub task: Option<TaskId>,
}

/// What a build concluded. A build that could not run at all (a missing program, a
/// worktree git cannot prepare) is not one of these but an error: no commit is to blame.
#[derive(Debug)]
pub enum Built {
    /// Every run passed (or had nothing to run).
    Green,
    /// The first run that failed, with why (the failing command and the tail of its output).
    Red(String),
    /// The server is stopping: the build was stopped.
    Cancelled,
    /// Git could not put the commit's tree in place for a reason that is not the machine's
    /// (as far as git says): nothing was built. The tree itself may be the cause; the caller
    /// judges (the integrator blames it after the same failure a few times in a row).
    NoCheckout(GitError),
}

/// Where the integrator's builds run.
pub trait Builder: Send + Sync + 'static {
    /// Builds `job`, each line of its output to `log`, until it ends or `shutdown`.
    fn build(
        &self,
        job: &BuildJob,
        shutdown: &CancellationToken,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> impl Future<Output = Result<Built>> + Send;

    /// Where builds run, for the runs' logs ("in /state/integration").
    fn site(&self) -> String;

    /// How many builds it runs at once (its slots): the integrator builds up to that many
    /// prefixes of a red train at once. A build asked beyond them waits for a free slot.
    fn slots(&self) -> usize {
        1
    }
}
