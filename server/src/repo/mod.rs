//! The canonical repository, as the server uses it: branch tips, commits, the bundles that
//! travel to and from runners, cherry-picks without a worktree, the integration worktree, and
//! the server's own records of landings. Every git process goes through `pipeline_core::git`;
//! what can be done without one is: branch tips and landed records are read from the ref files,
//! commits through one long-lived `git cat-file --batch`, bundle headers in Rust
//! ([`bundle`]). [`Repo`] is the server's adapter of the middle layer's
//! [`crate::ports::Repository`] port.

pub mod bundle;
pub mod owner;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use pipeline_core::git::{
    BranchName, CommitInfo, FetchRef, Git, GitError, Merged, ObjectReader, RefName, RefPrefix,
    RemoteName, Worktree, has_ref_files, read_ref_file,
};
use pipeline_core::ids::{CommitId, TaskId, TreeId};
use tokio::process::Child;

use crate::error::{Error, Result};

/// Every received bundle adds a pack, and every git command slows down with the number of
/// packs; after this many, `git gc --auto` runs in the background (it repacks once git's own
/// thresholds are passed and does nothing otherwise).
const PACKS_BEFORE_GC: u32 = 20;

/// How long one git command of the server may run.
const GIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

impl From<GitError> for Error {
    fn from(e: GitError) -> Self {
        Error::Internal(e.to_string())
    }
}

/// The repository the server works on.
#[derive(Clone, Debug)]
pub struct Repo {
    git: Git,
    /// One long-lived `git cat-file --batch` that reads commits for every caller.
    objects: Arc<tokio::sync::Mutex<Option<ObjectReader>>>,
    /// Bounds how many bundles are unbundled at once (one per core): a burst of results then
    /// queues instead of thrashing the machine with git processes.
    unbundles: Arc<tokio::sync::Semaphore>,
    /// Packs added by unbundling since git last tidied the repository.
    new_packs: Arc<AtomicU32>,
    /// The common git directory, where refs are files: tips and landed records are read from
    /// there without spawning git.
    refs_dir: Option<PathBuf>,
}

impl Repo {
    /// Opens the repository at `path`, failing with a clear reason if it is not one.
    pub async fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "--repo {}: no such directory",
                path.display()
            )));
        }
        let mut repo = Self::at(path);
        if !repo.git.is_repository().await {
            return Err(Error::InvalidArgument(format!(
                "--repo {}: not a git repository (create one with `git init`)",
                path.display()
            )));
        }
        repo.refs_dir = Some(repo.git.common_dir().await?);
        Ok(repo)
    }

    /// A repository at `path`, unchecked (tests).
    pub fn at(path: &Path) -> Self {
        Self {
            git: Git::at(path).with_timeout(GIT_TIMEOUT),
            refs_dir: None,
            objects: Default::default(),
            new_packs: Default::default(),
            unbundles: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
        }
    }

    pub fn path(&self) -> &Path {
        self.git.dir()
    }

    /// The directory holding the repository's objects and refs (`.git`, or the bare repo).
    pub async fn common_dir(&self) -> Result<PathBuf> {
        Ok(self.git.common_dir().await?)
    }

    pub async fn is_bare(&self) -> Result<bool> {
        Ok(self.git.is_bare().await?)
    }

    /// The worktrees (including the main one) that have `branch` checked out.
    pub async fn worktrees_on(&self, branch: &BranchName) -> Result<Vec<PathBuf>> {
        Ok(self.git.worktrees_on(branch).await?)
    }

    pub async fn has_remote(&self, remote: &RemoteName) -> bool {
        self.git.has_remote(remote).await
    }

    /// The commit a branch points at, read from the ref files when they hold it (so the hot
    /// path spawns nothing), else from git. `NotFound` if it does not exist.
    pub async fn tip(&self, branch: &BranchName) -> Result<CommitId> {
        let name = RefName::branch(branch);
        if let Some(dir) = &self.refs_dir
            && let Some(sha) = read_ref_file(dir, &name)
        {
            return Ok(sha);
        }
        self.git.resolve(&name).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "the base branch {branch} does not exist in {}; create it (e.g. commit \
                 something on it) or pass --base with an existing branch",
                self.path().display()
            ))
        })
    }

    /// A commit as `git show --stat --patch` prints it, at most `max_bytes` of it, and whether
    /// it was cut (for the web page's diff of a task's commit).
    pub async fn show_commit(&self, commit: &CommitId, max_bytes: usize) -> Result<(String, bool)> {
        Ok(self.git.show_commit(commit, max_bytes).await?)
    }

    /// Reads a commit through the long-lived `git cat-file --batch` (started on first use,
    /// restarted if it died): no process is spawned per read.
    pub async fn commit_info(&self, commit: &CommitId) -> Result<CommitInfo> {
        let mut slot = self.objects.lock().await;
        let read = async |slot: &mut Option<ObjectReader>| {
            if slot.is_none() {
                *slot = Some(self.git.object_reader()?);
            }
            match slot.as_mut() {
                Some(reader) => reader.commit(commit).await,
                None => Err(GitError::Unexpected("git cat-file is not running".into())),
            }
        };
        let info = match read(&mut slot).await {
            Ok(info) => info,
            Err(first) => {
                // The process may have died: start a fresh one once.
                *slot = None;
                read(&mut slot).await.map_err(|_| first)?
            }
        };
        info.ok_or_else(|| Error::NotFound(format!("commit {commit} is not in the repository")))
    }

    /// The file at `path` (a constant of the program) in `commit`'s tree, read through the
    /// long-lived `git cat-file --batch`; `None` if there is none.
    pub async fn file_at(&self, commit: &CommitId, path: &'static str) -> Result<Option<Vec<u8>>> {
        let mut slot = self.objects.lock().await;
        if slot.is_none() {
            *slot = Some(self.git.object_reader()?);
        }
        let read = match slot.as_mut() {
            Some(reader) => reader.file(commit, path).await,
            None => Err(GitError::Unexpected("git cat-file is not running".into())),
        };
        if read.is_err() {
            // The process may have died: the next read starts a fresh one.
            *slot = None;
        }
        Ok(read?)
    }

    pub async fn parents(&self, commit: &CommitId) -> Result<Vec<CommitId>> {
        Ok(self.commit_info(commit).await?.parents)
    }

    pub async fn tree_of(&self, commit: &CommitId) -> Result<TreeId> {
        Ok(self.commit_info(commit).await?.tree)
    }

    /// Those of `ids` that name commits present in the repository.
    pub async fn existing_commits(&self, ids: &[CommitId]) -> Result<Vec<CommitId>> {
        Ok(self.git.existing(ids).await?)
    }

    pub async fn update_ref(&self, name: &RefName, commit: &CommitId) -> Result<()> {
        Ok(self.git.update_ref(name, commit).await?)
    }

    /// Moves `name` from `old` to `new` only if it is still at `old`; false if it moved.
    pub async fn compare_and_swap(
        &self,
        name: &RefName,
        new: &CommitId,
        old: &CommitId,
    ) -> Result<bool> {
        Ok(self.git.compare_and_swap(name, new, old).await?)
    }

    pub async fn is_ancestor(&self, ancestor: &CommitId, descendant: &CommitId) -> Result<bool> {
        Ok(self.git.is_ancestor(ancestor, descendant).await?)
    }

    /// Starts `git bundle create` of what a lease's runner lacks: `base` (and `previous`,
    /// when it amends it) less the commits of `have` the repository holds. The commits are
    /// kept under the task's fetch refs meanwhile. Its stdout is the bundle; an empty bundle
    /// (git refuses to make one) means the runner has everything.
    pub async fn base_bundle(
        &self,
        task: &TaskId,
        base: &CommitId,
        previous: Option<&CommitId>,
        have: &[CommitId],
    ) -> Result<Child> {
        let base_ref = RefName::fetch(task, FetchRef::Base);
        self.git.update_ref(&base_ref, base).await?;
        let mut refs = vec![base_ref];
        if let Some(previous) = previous {
            let prev_ref = RefName::fetch(task, FetchRef::Previous);
            self.git.update_ref(&prev_ref, previous).await?;
            refs.push(prev_ref);
        }
        let known = self.git.existing(have).await?;
        Ok(self.git.bundle_to_stdout(&refs, &known)?)
    }

    /// What a runner lacks of build job `n`'s commit, less what it `have`s (`--remote-builds`):
    /// the commit is kept under `refs/pipeline/builds/<n>` while it is fetched.
    pub async fn build_bundle(
        &self,
        n: u64,
        commit: &CommitId,
        have: &[CommitId],
    ) -> Result<Child> {
        let build_ref = RefName::build(n);
        self.git.update_ref(&build_ref, commit).await?;
        let known = self.git.existing(have).await?;
        Ok(self.git.bundle_to_stdout(&[build_ref], &known)?)
    }

    /// Takes a runner's bundle: it must be a bundle, need nothing but `base`, hold exactly one
    /// ref whose commit is `expected`, its objects must pass git's strict reception (as
    /// `receive.fsckObjects` checks them: no `.git` entry in any spelling, no duplicate
    /// entries, no `.gitmodules` that would run commands, nothing missing), that commit must
    /// have `base` as its only parent, and the paths it adds must be ones any runner can check
    /// out ([`bundle::check_paths`]). Stores the objects and returns the commit. A bundle that
    /// is not that is refused with `InvalidArgument` saying what was wrong (the task's fault:
    /// it is its agent's work); a git that cannot run or runs out of a resource is `Internal`
    /// (the server's trouble, never the commit's).
    pub async fn receive_bundle(
        &self,
        path: &Path,
        base: &CommitId,
        expected: &CommitId,
    ) -> Result<CommitId> {
        fn refuse<T>(why: String) -> Result<T> {
            Err(Error::InvalidArgument(format!("commit refused: {why}")))
        }
        let header = match bundle::read_header(path).await {
            Ok(header) => header,
            Err(why) => return refuse(format!("not a valid bundle: {why}")),
        };
        if header.refs.len() != 1 {
            return refuse(format!(
                "the bundle holds {} refs; send exactly one",
                header.refs.len()
            ));
        }
        let head = &header.refs[0];
        if head != expected {
            return refuse(format!(
                "the bundle holds {head}, not the announced {expected}"
            ));
        }
        if let Some(other) = header.prerequisites.iter().find(|p| *p != base) {
            return refuse(format!(
                "the bundle needs {other}, which is not the leased base {base}"
            ));
        }
        if self.commit_info(base).await.is_err() {
            return Err(Error::Internal(format!(
                "the leased base {base} is not in the repository"
            )));
        }
        // Indexing the pack strictly checks every object and that everything they name is
        // here (the base and what the pack holds).
        let permit = self.unbundles.acquire().await;
        let indexed = self.git.index_pack_strict(path, header.pack_offset).await;
        drop(permit);
        match indexed {
            Ok(()) => {}
            Err(e) if e.is_infrastructure() => {
                return Err(Error::Internal(format!(
                    "git index-pack failed on the server: {e}"
                )));
            }
            Err(e) => {
                return refuse(format!(
                    "its objects fail git's checks of what it receives (receive.fsckObjects): \
                     {}",
                    fsck_reason(&e)
                ));
            }
        }
        self.pack_added();
        let parents = self.parents(expected).await?;
        match parents.as_slice() {
            [p] if p == base => {}
            [p] => {
                return refuse(format!(
                    "{expected} is not one commit on top of the leased base {base} (its parent \
                     is {p})"
                ));
            }
            _ => {
                return refuse(format!(
                    "{expected} has {} parents; send one commit on top of the base {base}",
                    parents.len()
                ));
            }
        }
        let paths = match self.git.new_paths(base, expected).await {
            Ok(paths) => paths,
            Err(e) if e.is_infrastructure() => return Err(e.into()),
            Err(GitError::Failed { stderr, .. }) if pipeline_core::git::is_too_deep(&stderr) => {
                return refuse(format!(
                    "its tree is deeper than git checks out ({} levels, core.maxTreeDepth)",
                    pipeline_core::git::MAX_TREE_DEPTH
                ));
            }
            Err(e) => return refuse(format!("git cannot read its tree: {e}")),
        };
        bundle::check_paths(&paths).map_err(|why| {
            Error::InvalidArgument(format!(
                "commit refused: {why}; no runner could check the base out with it"
            ))
        })?;
        Ok(expected.clone())
    }

    /// Counts a pack added; every [`PACKS_BEFORE_GC`] packs, lets `git gc --auto` tidy the
    /// repository in the background, off every request's path.
    fn pack_added(&self) {
        if self.new_packs.fetch_add(1, Ordering::Relaxed) + 1 < PACKS_BEFORE_GC {
            return;
        }
        self.new_packs.store(0, Ordering::Relaxed);
        let git = self.git.clone();
        tokio::spawn(async move {
            if let Err(e) = git.gc_auto().await {
                tracing::warn!(error = %e, "git gc --auto failed");
            }
        });
    }

    /// The commit `refs/pipeline/landed/<task>` names: the commit the integrator made for the
    /// task and moved (or tried to move) the base to. Read from the ref files (no process) when
    /// they hold it. This, not a trailer any commit could carry, is how the server knows a
    /// task's own commit.
    pub async fn landed_commit(&self, task: &TaskId) -> Result<Option<CommitId>> {
        let name = RefName::landed(task);
        if let Some(dir) = &self.refs_dir {
            if let Some(sha) = read_ref_file(dir, &name) {
                return Ok(Some(sha));
            }
            if has_ref_files(dir) {
                return Ok(None);
            }
        }
        Ok(self.git.resolve(&name).await?)
    }

    /// The task's own landed commit, if it is in the history of `tip`.
    pub async fn landed_on(&self, task: &TaskId, tip: &CommitId) -> Result<Option<CommitId>> {
        match self.landed_commit(task).await? {
            Some(commit) if self.is_ancestor(&commit, tip).await? => Ok(Some(commit)),
            _ => Ok(None),
        }
    }

    /// Every task's landed commit, by task ID (one `for-each-ref`; for start-up checks).
    pub async fn landed_commits(&self) -> Result<std::collections::HashMap<String, CommitId>> {
        Ok(self
            .git
            .refs_under(RefPrefix::Landed)
            .await?
            .into_iter()
            .filter_map(|(name, sha)| {
                name.strip_prefix("refs/pipeline/landed/")
                    .map(|task| (task.to_owned(), sha))
            })
            .collect())
    }

    /// Records `commit` as the task's own landed commit (before the base is moved to it).
    pub async fn record_landing(&self, task: &TaskId, commit: &CommitId) -> Result<()> {
        self.update_ref(&RefName::landed(task), commit).await
    }

    /// Signs of an earlier pipeline in the repository, for a server starting on an empty
    /// database: refs under `refs/pipeline/`, or a `Task-Id:` trailer on `branch`. Says which.
    pub async fn pipeline_history(&self, branch: &BranchName) -> Result<Option<String>> {
        if let Some(r) = self.git.first_ref_under(RefPrefix::Pipeline).await? {
            return Ok(Some(format!("it has pipeline refs ({r})")));
        }
        let tip = self.tip(branch).await?;
        Ok(self
            .git
            .any_task_trailer(&tip)
            .await?
            .map(|c| format!("{branch} has commits with Task-Id trailers ({c})")))
    }

    /// The highest `n` of the generated task IDs (`t-<n>`) the repository knows: in the
    /// pipeline's refs, and in the `Task-Id:` trailers of `since..tip` (all of `tip`'s history
    /// without `since`).
    pub async fn highest_task_number(
        &self,
        since: Option<&CommitId>,
        tip: &CommitId,
    ) -> Result<u64> {
        // A generated-looking ID past the bound (or spelled with a leading zero) was never
        // generated: it is not counted, so the counter cannot be pushed past its range.
        let number = |id: &str| {
            let id = id.trim();
            let n = TaskId::parse(id).ok().and_then(|t| t.number());
            if n.is_none()
                && id
                    .strip_prefix("t-")
                    .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            {
                tracing::warn!(
                    id,
                    "ignoring a task ID that no server generates (out of range or a leading zero)"
                );
            }
            n
        };
        let mut max = 0;
        for prefix in [RefPrefix::TaskPatches, RefPrefix::Landed] {
            for (name, _) in self.git.refs_under(prefix).await? {
                let id = name
                    .strip_prefix("refs/pipeline/tasks/")
                    .and_then(|rest| rest.split('/').next())
                    .or_else(|| name.strip_prefix("refs/pipeline/landed/"));
                if let Some(n) = id.and_then(number) {
                    max = max.max(n);
                }
            }
        }
        for id in self.git.task_trailers(since, tip).await? {
            if let Some(n) = number(&id) {
                max = max.max(n);
            }
        }
        Ok(max)
    }

    /// Cherry-picks `commit` (whose parent is `parent`) onto `onto` without touching any files:
    /// the merged tree, or git's conflict messages. A failure keeps git's error, so that the
    /// caller can tell the machine's trouble from the input's.
    pub async fn cherry_pick(
        &self,
        parent: &CommitId,
        onto: &CommitId,
        commit: &CommitId,
    ) -> std::result::Result<Merged, GitError> {
        self.git.merge_trees(parent, onto, commit).await
    }

    /// Makes the integrated commit: `tree` on top of `parent`, with `original`'s author and
    /// message, and exactly one `Task-Id:` trailer, the task's own (any other the message
    /// carried is removed: a commit may not speak for another task).
    pub async fn commit_for_task(
        &self,
        tree: &TreeId,
        parent: &CommitId,
        original: &CommitId,
        task: &TaskId,
    ) -> Result<CommitId> {
        let info = self.commit_info(original).await?;
        let message = with_own_trailer(&info.message, task.as_str());
        Ok(self
            .git
            .commit_tree(tree, parent, &info.author, &message)
            .await?)
    }

    /// Replays `commit` (whose parent is `parent`) onto `onto` without touching files: the same
    /// change, author and message on a new parent. A conflict is `Ok(Err(git's message))`.
    pub async fn replay(
        &self,
        parent: &CommitId,
        onto: &CommitId,
        commit: &CommitId,
    ) -> Result<std::result::Result<CommitId, String>> {
        let tree = match self.cherry_pick(parent, onto, commit).await? {
            Merged::Clean(tree) => tree,
            Merged::Conflict(conflict) => return Ok(Err(conflict)),
        };
        let info = self.commit_info(commit).await?;
        Ok(Ok(self
            .git
            .commit_tree(&tree, onto, &info.author, &info.message)
            .await?))
    }

    /// The linked worktree at `path` (the integration worktree), whose git runs with its
    /// directories named: a build may rewrite the worktree's `.git`.
    pub async fn worktree(&self, path: &Path) -> Result<Worktree> {
        let common = match &self.refs_dir {
            Some(dir) => dir.clone(),
            None => self.common_dir().await?,
        };
        Ok(Worktree::new(&common, path).with_timeout(GIT_TIMEOUT))
    }

    /// Puts the detached worktree on `commit`, clean. A failure keeps git's error (as
    /// [`Repo::cherry_pick`]).
    pub async fn prepare_worktree(
        &self,
        worktree: &Worktree,
        commit: &CommitId,
    ) -> std::result::Result<(), GitError> {
        worktree.prepare(&self.git, commit).await
    }

    /// Fetches `branch` from `remote`; returns its commit there.
    pub async fn fetch_branch(&self, remote: &RemoteName, branch: &BranchName) -> Result<CommitId> {
        Ok(self.git.fetch_branch(remote, branch).await?)
    }

    /// Points `remote`'s ref `name` at `commit` (the server's own refs only).
    pub async fn push_ref(
        &self,
        remote: &RemoteName,
        name: &RefName,
        commit: &CommitId,
    ) -> Result<()> {
        Ok(self.git.push_ref(remote, name, commit).await?)
    }

    /// Fetches the task patches `remote` keeps (`refs/pipeline/tasks/…`): what another
    /// server accepted and this one integrates after a takeover (issue 28).
    pub async fn fetch_task_patches(&self, remote: &RemoteName) -> Result<()> {
        Ok(self.git.fetch_prefix(remote, RefName::TASK_PATCHES).await?)
    }

    /// The task patches `remote` keeps (`refs/pipeline/tasks/…`), by name.
    pub async fn remote_task_patches(&self, remote: &RemoteName) -> Result<Vec<String>> {
        Ok(self
            .git
            .remote_refs_under(remote, RefName::TASK_PATCHES)
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// Deletes the server's refs `names` from `remote` (batched pushes).
    pub async fn delete_remote_refs(&self, remote: &RemoteName, names: &[String]) -> Result<()> {
        Ok(self.git.delete_remote_refs(remote, names).await?)
    }

    /// Pushes `new` to `remote`'s `branch` only if it is still at `expected`; false when the
    /// remote refused (it moved).
    pub async fn push_with_lease(
        &self,
        remote: &RemoteName,
        branch: &BranchName,
        new: &CommitId,
        expected: &CommitId,
    ) -> Result<bool> {
        Ok(self
            .git
            .push_with_lease(remote, branch, new, expected)
            .await?)
    }
}

/// The repository the coordinator and the integrator work on: each port method is the
/// method of the same name above.
impl crate::ports::Repository for Repo {
    type BaseBundle = Child;

    async fn tip(&self, branch: &BranchName) -> Result<CommitId> {
        Repo::tip(self, branch).await
    }

    async fn parents(&self, commit: &CommitId) -> Result<Vec<CommitId>> {
        Repo::parents(self, commit).await
    }

    async fn tree_of(&self, commit: &CommitId) -> Result<TreeId> {
        Repo::tree_of(self, commit).await
    }

    async fn file_at(&self, commit: &CommitId, path: &'static str) -> Result<Option<Vec<u8>>> {
        Repo::file_at(self, commit, path).await
    }

    async fn is_ancestor(&self, ancestor: &CommitId, descendant: &CommitId) -> Result<bool> {
        Repo::is_ancestor(self, ancestor, descendant).await
    }

    async fn update_ref(&self, name: &RefName, commit: &CommitId) -> Result<()> {
        Repo::update_ref(self, name, commit).await
    }

    async fn push_ref(&self, remote: &RemoteName, name: &RefName, commit: &CommitId) -> Result<()> {
        Repo::push_ref(self, remote, name, commit).await
    }

    async fn compare_and_swap(
        &self,
        name: &RefName,
        new: &CommitId,
        old: &CommitId,
    ) -> Result<bool> {
        Repo::compare_and_swap(self, name, new, old).await
    }

    async fn base_bundle(
        &self,
        task: &TaskId,
        base: &CommitId,
        previous: Option<&CommitId>,
        have: &[CommitId],
    ) -> Result<Child> {
        Repo::base_bundle(self, task, base, previous, have).await
    }

    async fn receive_bundle(
        &self,
        path: &Path,
        base: &CommitId,
        expected: &CommitId,
    ) -> Result<CommitId> {
        Repo::receive_bundle(self, path, base, expected).await
    }

    async fn landed_on(&self, task: &TaskId, tip: &CommitId) -> Result<Option<CommitId>> {
        Repo::landed_on(self, task, tip).await
    }

    async fn landed_commits(&self) -> Result<std::collections::HashMap<String, CommitId>> {
        Repo::landed_commits(self).await
    }

    async fn record_landing(&self, task: &TaskId, commit: &CommitId) -> Result<()> {
        Repo::record_landing(self, task, commit).await
    }

    async fn pipeline_history(&self, branch: &BranchName) -> Result<Option<String>> {
        Repo::pipeline_history(self, branch).await
    }

    async fn highest_task_number(&self, since: Option<&CommitId>, tip: &CommitId) -> Result<u64> {
        Repo::highest_task_number(self, since, tip).await
    }

    async fn cherry_pick(
        &self,
        parent: &CommitId,
        onto: &CommitId,
        commit: &CommitId,
    ) -> std::result::Result<Merged, GitError> {
        Repo::cherry_pick(self, parent, onto, commit).await
    }

    async fn commit_for_task(
        &self,
        tree: &TreeId,
        parent: &CommitId,
        original: &CommitId,
        task: &TaskId,
    ) -> Result<CommitId> {
        Repo::commit_for_task(self, tree, parent, original, task).await
    }

    async fn replay(
        &self,
        parent: &CommitId,
        onto: &CommitId,
        commit: &CommitId,
    ) -> Result<std::result::Result<CommitId, String>> {
        Repo::replay(self, parent, onto, commit).await
    }

    async fn fetch_branch(&self, remote: &RemoteName, branch: &BranchName) -> Result<CommitId> {
        Repo::fetch_branch(self, remote, branch).await
    }

    async fn push_with_lease(
        &self,
        remote: &RemoteName,
        branch: &BranchName,
        new: &CommitId,
        expected: &CommitId,
    ) -> Result<bool> {
        Repo::push_with_lease(self, remote, branch, new, expected).await
    }
}

/// The bundle a `git bundle create -` writes, read in chunks; at its end, git's failure, if it
/// failed (an empty bundle is not one: the reader has everything).
pub struct BundleStream {
    child: Child,
    stdout: Option<tokio::process::ChildStdout>,
    sent: bool,
}

impl BundleStream {
    pub fn new(mut child: Child) -> Self {
        let stdout = child.stdout.take();
        Self {
            child,
            stdout,
            sent: false,
        }
    }

    /// The next chunk of at most `max` bytes; `None` at the end.
    pub async fn next_chunk(&mut self, max: usize) -> Result<Option<bytes::Bytes>> {
        use tokio::io::AsyncReadExt;
        let Some(stdout) = self.stdout.as_mut() else {
            return Ok(None);
        };
        let mut buf = vec![0u8; max];
        let mut filled = 0;
        while filled < max {
            let n = stdout
                .read(&mut buf[filled..])
                .await
                .map_err(|e| Error::Internal(format!("reading the bundle: {e}")))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled > 0 {
            self.sent = true;
            buf.truncate(filled);
            return Ok(Some(buf.into()));
        }
        self.stdout = None;
        let mut err = String::new();
        if let Some(stderr) = self.child.stderr.as_mut() {
            let _ = stderr.read_to_string(&mut err).await;
        }
        let ok = self.child.wait().await.is_ok_and(|s| s.success());
        if !ok && (!err.contains("empty bundle") || self.sent) {
            return Err(Error::Internal(format!(
                "git bundle create failed: {}",
                err.trim()
            )));
        }
        Ok(None)
    }

    /// Kills git and reaps it.
    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// What git said was wrong with the objects it refused: its `error:` lines (one per object
/// and check, e.g. "object 9bee…: hasDotgit: contains '.git'"), joined, else its message.
fn fsck_reason(e: &GitError) -> String {
    let GitError::Failed { stderr, .. } = e else {
        return e.to_string();
    };
    let errors: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("error: "))
        .take(5)
        .collect();
    if errors.is_empty() {
        stderr.trim().replace('\n', "; ")
    } else {
        errors.join("; ")
    }
}

/// `message` with every `Task-Id:` line removed and one `Task-Id: <task>` trailer added (in
/// the last paragraph if that is a trailer block, else as a paragraph of its own).
pub fn with_own_trailer(message: &str, task: &str) -> String {
    let is_task_id = |line: &str| {
        line.split_once(':')
            .is_some_and(|(key, _)| key.trim().eq_ignore_ascii_case("task-id"))
    };
    let kept: Vec<&str> = message.lines().filter(|l| !is_task_id(l)).collect();
    let mut text = kept.join("\n").trim_end().to_owned();
    let last = text.rsplit("\n\n").next().unwrap_or_default();
    let is_trailer = |l: &str| {
        l.split_once(':').is_some_and(|(key, _)| {
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
    };
    let last_is_trailers =
        text.contains("\n\n") && !last.is_empty() && last.lines().all(is_trailer);
    if text.is_empty() {
        text = format!("Task {task}");
    }
    if last_is_trailers {
        text.push('\n');
    } else {
        text.push_str("\n\n");
    }
    text.push_str(&format!("Task-Id: {task}\n"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_core::testgit::{commit, git};

    #[tokio::test]
    async fn commits_are_read_through_one_cat_file_and_landings_from_refs() {
        let dir = tempfile::tempdir().expect("temp");
        let d = dir.path();
        git(d, &["init", "-q", "-b", "main"]);
        let root = commit(d, "a", "root");
        let one = commit(d, "b", "one\n\nTask-Id: t-1");
        let two = commit(d, "c", "two\n\nSigned-off-by: x\ntask-id: t-2");
        let repo = Repo::open(d).await.expect("open");
        let info = repo.commit_info(&two).await.expect("read");
        assert_eq!(info.parents, std::slice::from_ref(&one));
        assert_eq!(info.author.name, "T");
        assert_eq!(info.author.email, "t@example.invalid");
        let main = BranchName::parse("main").expect("branch");
        assert_eq!(repo.tip(&main).await.expect("tip"), two);
        // A trailer says nothing of a landing: only the landed ref does.
        let t1 = TaskId::parse("t-1").expect("id");
        assert_eq!(repo.landed_on(&t1, &two).await.expect("read"), None);
        repo.record_landing(&t1, &one).await.expect("record");
        assert_eq!(
            repo.landed_commit(&t1).await.expect("read"),
            Some(one.clone())
        );
        assert_eq!(
            repo.landed_on(&t1, &two).await.expect("read"),
            Some(one.clone())
        );
        assert_eq!(
            repo.landed_on(&t1, &root).await.expect("read"),
            None,
            "not on that tip"
        );
        // Packed refs are read too.
        git(d, &["pack-refs", "--all"]);
        assert_eq!(
            repo.landed_commit(&t1).await.expect("read"),
            Some(one.clone())
        );
        assert_eq!(repo.highest_task_number(None, &two).await.expect("scan"), 2);
        assert_eq!(
            repo.highest_task_number(Some(&one), &two)
                .await
                .expect("scan"),
            2,
            "t-2 is after t-1; the refs count too"
        );
        let missing = CommitId::parse(&"0".repeat(40)).expect("id");
        assert!(matches!(
            repo.commit_info(&missing).await,
            Err(Error::NotFound(_))
        ));
        // The reader survives a miss and still answers.
        assert_eq!(repo.parents(&one).await.expect("parents"), [root]);
    }

    #[test]
    fn an_integrated_commit_carries_its_own_trailer_only() {
        for (message, want) in [
            ("fix it", "fix it\n\nTask-Id: t-1\n"),
            ("fix it\n\nTask-Id: t-1\n", "fix it\n\nTask-Id: t-1\n"),
            (
                "fix it\n\nTask-Id: t-9\nTask-Id: t-1\n",
                "fix it\n\nTask-Id: t-1\n",
            ),
            (
                "fix\n\nbody says\ntask-id: t-9 in it\n\nSigned-off-by: a <a@b>\nTASK-ID: t-8",
                "fix\n\nbody says\n\nSigned-off-by: a <a@b>\nTask-Id: t-1\n",
            ),
            ("", "Task t-1\n\nTask-Id: t-1\n"),
        ] {
            assert_eq!(with_own_trailer(message, "t-1"), want, "{message:?}");
        }
    }
}
