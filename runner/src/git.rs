//! The runner's git: one local bare mirror under the work dir, holding only what the server sent,
//! and one worktree per slot, reset (not recreated) for each task. A slot's worktree belongs to
//! a small repository of its own (`slot-git/<n>`) that borrows the mirror's objects: its
//! agent's commits go there, so a sandboxed agent reads the mirror's objects and writes nothing
//! of the mirror, and no agent sees another's commits. The runner runs git on a slot with every
//! directory named ([`Worktree`]), never through the worktree's `.git`, which the agent could
//! have pointed anywhere, and restores the slot's alternates before reading its objects. Every command goes through
//! `pipeline_core::git::Git` (its time limit, fixed environment and typed arguments); commits
//! are [`CommitId`]s, so nothing unchecked reaches a command line.
//!
//! Git is spawned only for work: the commits the mirror keeps for the server
//! (`refs/pipeline/base` and `refs/pipeline/previous`) are read once at start and then known
//! in memory, a result is checked with one `rev-list`, and its bundle is made straight from
//! the worktree's `HEAD`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pipeline_core::git::{Git, GitError, KeptRef, RefName, RefPrefix, Worktree};
use pipeline_core::ids::CommitId;

type Result<T> = std::result::Result<T, GitError>;

/// What the agent left, when it is not one commit on the base.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Not what the contract asks (no commit, two, a merge): the task's failure.
    Wrong(String),
    /// Git could not tell: the runner's failure.
    GitFailed(String),
}

/// The refs the mirror keeps for the server, in the order of [`Mirror::remember`]'s commits:
/// the last base, and the last previous patchset.
const KEPT: [KeptRef; 2] = [KeptRef::Base, KeptRef::Previous];

/// The mirror and its worktrees.
#[derive(Clone, Debug)]
pub struct Mirror {
    git: Git,
    /// What the kept refs hold (the runner is their only writer).
    kept: Arc<Mutex<[Option<CommitId>; 2]>>,
}

impl Mirror {
    /// Opens the mirror under `work_dir`, creating it on first use.
    pub async fn open(work_dir: &Path) -> Result<Self> {
        let dir = work_dir.join("mirror.git");
        let git = Git::at(&dir);
        if !dir.join("HEAD").is_file() {
            std::fs::create_dir_all(&dir).map_err(|e| {
                GitError::Unexpected(format!("cannot create {}: {e}", dir.display()))
            })?;
            git.init_bare().await?;
        }
        // The slots were worktrees of the mirror until they had repositories of their own: an
        // older runner's registrations would keep its agents' commits reachable, and nothing
        // uses them now (one runner per work dir).
        let old = dir.join("worktrees");
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| {
                GitError::Unexpected(format!("cannot remove {}: {e}", old.display()))
            })?;
        }
        let mut kept: [Option<CommitId>; 2] = Default::default();
        for (refname, commit) in git.refs_under(RefPrefix::Pipeline).await? {
            if let Some(i) = KEPT
                .iter()
                .position(|k| RefName::kept(*k).as_str() == refname)
            {
                kept[i] = Some(commit);
            }
        }
        Ok(Self {
            git,
            kept: Arc::new(Mutex::new(kept)),
        })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, [Option<CommitId>; 2]> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Commits the server sent earlier: the bundle for the next lease leaves them out.
    pub fn haves(&self) -> Vec<CommitId> {
        self.kept().iter().flatten().cloned().collect()
    }

    /// Whether `commit` is one the mirror keeps (so it is surely there).
    pub fn keeps(&self, commit: &CommitId) -> bool {
        self.kept().iter().any(|k| k.as_ref() == Some(commit))
    }

    /// Stores a bundle's objects; returns the commits its refs point at.
    pub async fn unbundle(&self, bundle: &Path) -> Result<Vec<CommitId>> {
        self.git.unbundle(bundle).await
    }

    /// Keeps `commits` (the base, then the previous patchset) under `refs/pipeline/base` and
    /// `refs/pipeline/previous`, so they stay and the next bundle leaves them out (best effort: it only saves transfer next
    /// time). A ref already there is not rewritten.
    pub async fn remember(&self, commits: &[CommitId]) {
        for (i, (commit, which)) in commits.iter().zip(KEPT).enumerate() {
            if self.kept()[i].as_ref() == Some(commit) {
                continue;
            }
            if self
                .git
                .update_ref(&RefName::kept(which), commit)
                .await
                .is_ok()
            {
                self.kept()[i] = Some(commit.clone());
            }
        }
    }

    pub async fn has_commit(&self, commit: &CommitId) -> bool {
        self.git.has_commit(commit).await
    }

    /// The mirror's directory (the repository slots' worktrees belong to).
    pub fn dir(&self) -> &Path {
        self.git.dir()
    }

    /// Puts the slot's worktree on `commit` (detached), clean: reset if it exists, created if
    /// not, recreated if it is damaged; what its last agent left of its git state is gone.
    pub async fn prepare_worktree(&self, slot: &Worktree, commit: &CommitId) -> Result<()> {
        slot.prepare(&self.git, commit).await
    }

    /// Commits everything the agent left in the slot's worktree as one commit with `message`
    /// (amending the previous patchset's when `amend`); `false` when there was nothing to
    /// commit.
    pub async fn commit_for_agent(
        &self,
        slot: &Worktree,
        message: &str,
        amend: bool,
    ) -> Result<bool> {
        slot.restore_alternates().map_err(restore_failed)?;
        slot.git().commit_all(message, amend).await
    }

    /// Checks that the worktree holds exactly one commit on top of `base` (and, when amending,
    /// not the unchanged `previous`); returns it, or says what was found instead (the task's
    /// failure) or that git itself failed (the runner's).
    pub async fn one_commit(
        &self,
        slot: &Worktree,
        base: &CommitId,
        previous: Option<&CommitId>,
    ) -> std::result::Result<CommitId, Found> {
        let infra = |e: GitError| Found::GitFailed(format!("cannot read the agent's commit: {e}"));
        slot.restore_alternates()
            .map_err(|e| infra(restore_failed(e)))?;
        let wt = slot.git();
        // HEAD and its parents, in one spawn.
        let (head, parents) = wt.head_and_parents().await.map_err(infra)?;
        if head == *base {
            return Err(Found::Wrong(
                "the agent made no commit on top of the base".to_owned(),
            ));
        }
        if previous == Some(&head) {
            return Err(Found::Wrong(
                "the agent left the previous patchset unchanged; amend it with the fix".to_owned(),
            ));
        }
        if parents == std::slice::from_ref(base) {
            return Ok(head);
        }
        // Not one commit on the base: find out what it is, to say so. A `merge-base` that
        // fails says no more than one that answers "no".
        let descends = wt.is_ancestor(base, &head).await.unwrap_or(false);
        if !descends {
            return Err(Found::Wrong(format!(
                "HEAD {head} does not descend from the base {base}; commit on top of the base"
            )));
        }
        let count = wt.count_between(base, &head).await.map_err(infra)?;
        if count != 1 {
            return Err(Found::Wrong(format!(
                "the agent made {count} commits on top of the base; there must be exactly one \
                 (squash them)"
            )));
        }
        Err(Found::Wrong(format!(
            "the commit {head} has {} parents; make one ordinary commit on top of the base",
            parents.len()
        )))
    }

    /// Writes a bundle of the slot's `HEAD` (one commit on top of `base`) to `out`. The
    /// server checks it holds the announced commit.
    pub async fn bundle_head(&self, slot: &Worktree, base: &CommitId, out: &Path) -> Result<()> {
        slot.restore_alternates().map_err(restore_failed)?;
        slot.git().bundle_head(base, out).await
    }

    /// Build worktree `n` (`--remote-builds` on the server): its files in `builds/<n>`, its
    /// repository in `build-git/<n>`, borrowing the mirror's objects.
    pub fn build_tree(&self, work_dir: &Path, n: usize) -> Worktree {
        Worktree::own(
            &work_dir.join("build-git").join(n.to_string()),
            &work_dir.join("builds").join(n.to_string()),
            &self.dir().join("objects"),
        )
    }

    /// Slot `n`'s worktree: its files in `slots/<n>`, its repository (which borrows the
    /// mirror's objects and keeps its agent's) in `slot-git/<n>`.
    pub fn slot(&self, work_dir: &Path, n: usize) -> Worktree {
        Worktree::own(
            &work_dir.join("slot-git").join(n.to_string()),
            &work_dir.join("slots").join(n.to_string()),
            &self.dir().join("objects"),
        )
    }
}

fn restore_failed(e: std::io::Error) -> GitError {
    GitError::Unexpected(format!("cannot restore the slot's alternates: {e}"))
}

/// Slot `n`'s private directory: its prompt and cost file, its temp dir, its objects; written
/// by its agent and build, and by nothing else's.
pub fn private_dir(work_dir: &Path, n: usize) -> PathBuf {
    work_dir.join("private").join(n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_core::testgit::git as sh_git;

    fn commit(dir: &Path, file: &str) -> CommitId {
        pipeline_core::testgit::commit(dir, file, file)
    }

    /// Git in a slot's worktree as its agent runs it: found through `.git`.
    fn agent_git(slot: &Worktree, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .current_dir(&slot.path)
            .args(["-c", "user.name=T", "-c", "user.email=t@example.invalid"])
            .args(args)
            .output()
            .expect("git");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn agent_commit(slot: &Worktree, file: &str) -> CommitId {
        std::fs::write(slot.path.join(file), file).expect("write");
        agent_git(slot, &["add", file]);
        agent_git(slot, &["commit", "-q", "-m", file]);
        CommitId::parse(&agent_git(slot, &["rev-parse", "HEAD"])).expect("id")
    }

    /// A server's repository with a base, and a bundle of it.
    fn origin(dir: &Path) -> (PathBuf, CommitId, PathBuf) {
        let repo = dir.join("origin");
        std::fs::create_dir_all(&repo).expect("dir");
        sh_git(&repo, &["init", "-q", "-b", "main"]);
        let base = commit(&repo, "a");
        let bundle = dir.join("base.bundle");
        let file = bundle.to_str().expect("utf-8");
        sh_git(&repo, &["bundle", "create", "-q", file, "main"]);
        (repo, base, bundle)
    }

    #[tokio::test]
    async fn the_mirror_keeps_what_it_was_sent_and_checks_the_agents_commit() {
        let dir = tempfile::tempdir().expect("dir");
        let (_repo, base, bundle) = origin(dir.path());
        let work = dir.path().join("work");
        let mirror = Mirror::open(&work).await.expect("open");
        assert!(mirror.haves().is_empty());
        assert_eq!(
            mirror.unbundle(&bundle).await.expect("unbundle"),
            std::slice::from_ref(&base)
        );
        assert!(mirror.has_commit(&base).await);
        assert!(!mirror.keeps(&base));
        mirror.remember(std::slice::from_ref(&base)).await;
        assert!(mirror.keeps(&base));
        // Known again after a restart, without asking git for each commit.
        let again = Mirror::open(&work).await.expect("reopen");
        assert_eq!(again.haves(), std::slice::from_ref(&base));

        let wt = mirror.slot(&work, 0);
        mirror.prepare_worktree(&wt, &base).await.expect("worktree");
        assert_eq!(
            mirror.one_commit(&wt, &base, None).await,
            Err(Found::Wrong(
                "the agent made no commit on top of the base".to_owned()
            ))
        );
        let one = agent_commit(&wt, "b");
        // The agent's objects are the slot's own, not the mirror's.
        assert!(!mirror.has_commit(&one).await);
        assert_eq!(mirror.one_commit(&wt, &base, None).await, Ok(one.clone()));
        assert!(matches!(
            mirror.one_commit(&wt, &base, Some(&one)).await,
            Err(Found::Wrong(why)) if why.contains("unchanged")
        ));
        let out = dir.path().join("out.bundle");
        mirror.bundle_head(&wt, &base, &out).await.expect("bundle");
        assert!(out.is_file());
        agent_commit(&wt, "c");
        assert!(matches!(
            mirror.one_commit(&wt, &base, None).await,
            Err(Found::Wrong(why)) if why.contains("made 2 commits")
        ));
        // Reset in place for the next task, not recreated: what the agent left is gone.
        std::fs::write(wt.path.join("stray"), "x").expect("write");
        mirror.prepare_worktree(&wt, &base).await.expect("reset");
        assert!(!wt.path.join("stray").exists() && !wt.path.join("b").exists());
        assert_eq!(
            CommitId::parse(&agent_git(&wt, &["rev-parse", "HEAD"])).expect("id"),
            base
        );
    }

    /// An agent may write its worktree, `.git` included, and its slot's git state: nothing it
    /// writes there makes the runner's own git run its code, and the next task's worktree is
    /// as the runner made it.
    #[tokio::test]
    async fn what_an_agent_plants_in_its_slot_never_runs_as_the_runner() {
        let dir = tempfile::tempdir().expect("dir");
        let (_repo, base, bundle) = origin(dir.path());
        let work = dir.path().join("work");
        let mirror = Mirror::open(&work).await.expect("open");
        mirror.unbundle(&bundle).await.expect("unbundle");
        let wt = mirror.slot(&work, 0);
        mirror.prepare_worktree(&wt, &base).await.expect("worktree");
        let one = agent_commit(&wt, "b");
        // A repository of the agent's making, whose configuration runs a command, named by the
        // worktree's `.git`; hooks and configuration in the slot's git directory; alternates.
        let evil = dir.path().join("evil");
        let ran = dir.path().join("ran");
        std::fs::create_dir_all(&evil).expect("mkdir");
        sh_git(&evil, &["init", "-q"]);
        let hook = format!("touch {}; false", ran.display());
        sh_git(&evil, &["config", "core.fsmonitor", &hook]);
        std::fs::write(
            wt.path.join(".git"),
            format!("gitdir: {}/.git\n", evil.display()),
        )
        .expect("write .git");
        std::fs::write(
            wt.admin.join("config.worktree"),
            format!("[core]\n\tfsmonitor = {hook}\n"),
        )
        .expect("write config");
        std::fs::write(
            wt.admin.join("commondir"),
            format!("{}/.git\n", evil.display()),
        )
        .expect("write commondir");
        let own = wt.objects();
        std::fs::write(own.join("info/alternates"), format!("{}\n", evil.display()))
            .expect("write alternates");
        // The plant works on git that finds its repository through `.git`, as the runner's
        // own did.
        sh_git(&wt.path, &["add", "--all"]);
        assert!(
            ran.exists(),
            "the planted command did not run: the test shows nothing"
        );
        std::fs::remove_file(&ran).expect("rm");
        assert_eq!(mirror.one_commit(&wt, &base, None).await, Ok(one));
        mirror
            .bundle_head(&wt, &base, &dir.path().join("out.bundle"))
            .await
            .expect("bundle");
        std::fs::write(wt.path.join("more"), "x").expect("write");
        mirror
            .commit_for_agent(&wt, "all\n\nTask-Id: t-1\n", true)
            .await
            .expect("commit for the agent");
        assert!(!ran.exists(), "the runner's git ran the agent's command");
        mirror.prepare_worktree(&wt, &base).await.expect("reset");
        assert!(!ran.exists(), "the runner's git ran the agent's command");
        assert_eq!(
            std::fs::read_to_string(wt.path.join(".git")).expect(".git"),
            format!("gitdir: {}\n", wt.admin.display())
        );
        assert!(!wt.admin.join("config.worktree").exists());
        assert_eq!(
            std::fs::read_to_string(own.join("info/alternates")).expect("alternates"),
            format!("{}\n", mirror.dir().join("objects").display())
        );
        assert_eq!(
            CommitId::parse(&agent_git(&wt, &["rev-parse", "HEAD"])).expect("id"),
            base
        );
        assert!(
            !ran.exists(),
            "the agent's git runs the agent's own command, not this one"
        );
    }
}
