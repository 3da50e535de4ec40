//! The runner's git: one local bare mirror under the work dir, holding only what the server sent
//! and what agents committed, and one worktree per slot, reset (not recreated) for each task.
//! Every commit ID that reaches a command line has been checked to be a full hex object ID.
//!
//! Git is spawned only for work: the commits the mirror keeps for the server
//! (`refs/pipeline/base` and `refs/pipeline/previous`) are read once at start and then known
//! in memory, a result is checked with one `rev-list`, and its bundle is made straight from
//! the worktree's `HEAD`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Command;

const GIT_TIMEOUT: Duration = Duration::from_secs(300);

/// A git failure, with git's own message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GitError(pub String);

type Result<T> = std::result::Result<T, GitError>;

/// What the agent left, when it is not one commit on the base.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Not what the contract asks (no commit, two, a merge): the task's failure.
    Wrong(String),
    /// Git could not tell: the runner's failure.
    GitFailed(String),
}

/// Checks that `s` is a full hexadecimal object ID.
pub fn check_sha(s: &str) -> Result<&str> {
    if (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err(GitError(format!("{s:?} is not a full commit id")))
    }
}

async fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let what = format!("git {}", args.join(" "));
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(GIT_TIMEOUT, out)
        .await
        .map_err(|_| GitError(format!("{what}: timed out")))?
        .map_err(|e| GitError(format!("{what}: cannot run git: {e}")))?;
    if !out.status.success() {
        return Err(GitError(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The mirror and its worktrees.
#[derive(Clone, Debug)]
pub struct Mirror {
    dir: PathBuf,
    /// What the [`KEPT_REFS`] hold (the runner is their only writer).
    kept: Arc<Mutex<[Option<String>; 2]>>,
}

/// Where the mirror keeps the commits the server knows it has: the last base, and the last
/// previous patchset.
const KEPT_REFS: [&str; 2] = ["refs/pipeline/base", "refs/pipeline/previous"];

impl Mirror {
    /// Opens the mirror under `work_dir`, creating it on first use.
    pub async fn open(work_dir: &Path) -> Result<Self> {
        let dir = work_dir.join("mirror.git");
        if !dir.join("HEAD").is_file() {
            std::fs::create_dir_all(&dir)
                .map_err(|e| GitError(format!("cannot create {}: {e}", dir.display())))?;
            git(&dir, &["init", "--quiet", "--bare"]).await?;
        }
        // Worktrees of a crashed run may be registered but gone.
        git(&dir, &["worktree", "prune"]).await?;
        let mut kept: [Option<String>; 2] = Default::default();
        let refs = git(
            &dir,
            &[
                "for-each-ref",
                "--format=%(refname) %(objectname)",
                "refs/pipeline/",
            ],
        )
        .await?;
        for (refname, commit) in refs.lines().filter_map(|l| l.split_once(' ')) {
            if let Some(i) = KEPT_REFS.iter().position(|k| *k == refname) {
                kept[i] = Some(commit.to_owned());
            }
        }
        Ok(Self {
            dir,
            kept: Arc::new(Mutex::new(kept)),
        })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, [Option<String>; 2]> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Commits the server sent earlier: the bundle for the next lease leaves them out.
    pub fn haves(&self) -> Vec<String> {
        self.kept().iter().flatten().cloned().collect()
    }

    /// Whether `commit` is one the mirror keeps (so it is surely there).
    pub fn keeps(&self, commit: &str) -> bool {
        self.kept().iter().any(|k| k.as_deref() == Some(commit))
    }

    /// Stores a bundle's objects; returns the commits its refs point at.
    pub async fn unbundle(&self, bundle: &Path) -> Result<Vec<String>> {
        let file = bundle
            .to_str()
            .ok_or_else(|| GitError("bundle path is not UTF-8".into()))?;
        let heads = git(&self.dir, &["bundle", "unbundle", file]).await?;
        Ok(heads
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect())
    }

    /// Keeps `commits` (the base, then the previous patchset) under the [`KEPT_REFS`], so they
    /// stay and the next bundle leaves them out (best effort: it only saves transfer next
    /// time). A ref already there is not rewritten.
    pub async fn remember(&self, commits: &[&str]) {
        for (i, (c, refname)) in commits.iter().zip(KEPT_REFS).enumerate() {
            if check_sha(c).is_err() || self.kept()[i].as_deref() == Some(*c) {
                continue;
            }
            if git(&self.dir, &["update-ref", refname, c]).await.is_ok() {
                self.kept()[i] = Some((*c).to_owned());
            }
        }
    }

    pub async fn has_commit(&self, sha: &str) -> bool {
        match check_sha(sha) {
            Ok(sha) => git(&self.dir, &["cat-file", "-e", &format!("{sha}^{{commit}}")])
                .await
                .is_ok(),
            Err(_) => false,
        }
    }

    /// Puts the worktree at `path` on `commit` (detached), clean: reset if it exists, created
    /// if not, recreated if it is damaged.
    pub async fn prepare_worktree(&self, path: &Path, commit: &str) -> Result<()> {
        let commit = check_sha(commit)?;
        if path.join(".git").exists() {
            let reset = async {
                git(
                    path,
                    &["checkout", "--quiet", "--force", "--detach", commit],
                )
                .await?;
                git(path, &["clean", "-ffdxq"]).await?;
                Ok::<(), GitError>(())
            };
            match reset.await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(worktree = %path.display(), error = %e, "recreating a damaged worktree")
                }
            }
            let _ = std::fs::remove_dir_all(path);
            git(&self.dir, &["worktree", "prune"]).await?;
        } else if path.exists() {
            let _ = std::fs::remove_dir_all(path);
            git(&self.dir, &["worktree", "prune"]).await?;
        }
        let p = path
            .to_str()
            .ok_or_else(|| GitError("worktree path is not UTF-8".into()))?;
        git(
            &self.dir,
            &[
                "worktree", "add", "--quiet", "--force", "--detach", p, commit,
            ],
        )
        .await?;
        Ok(())
    }

    /// Checks that the worktree holds exactly one commit on top of `base` (and, when amending,
    /// not the unchanged `previous`); returns it, or says what was found instead (the task's
    /// failure) or that git itself failed (the runner's).
    pub async fn one_commit(
        &self,
        worktree: &Path,
        base: &str,
        previous: Option<&str>,
    ) -> std::result::Result<String, Found> {
        let infra = |e: GitError| Found::GitFailed(format!("cannot read the agent's commit: {e}"));
        // HEAD and its parents, in one spawn.
        let line = git(worktree, &["rev-list", "--parents", "-n", "1", "HEAD"])
            .await
            .map_err(infra)?;
        let mut ids = line.split_whitespace();
        let head = ids
            .next()
            .ok_or_else(|| {
                Found::GitFailed("cannot read HEAD after the agent: git printed nothing".into())
            })?
            .to_owned();
        let parents: Vec<&str> = ids.collect();
        if head == base {
            return Err(Found::Wrong(
                "the agent made no commit on top of the base".to_owned(),
            ));
        }
        if previous == Some(head.as_str()) {
            return Err(Found::Wrong(
                "the agent left the previous patchset unchanged; amend it with the fix".to_owned(),
            ));
        }
        if parents == [base] {
            return Ok(head);
        }
        // Not one commit on the base: find out what it is, to say so.
        let descends = git(worktree, &["merge-base", "--is-ancestor", base, &head])
            .await
            .is_ok();
        if !descends {
            return Err(Found::Wrong(format!(
                "HEAD {head} does not descend from the base {base}; commit on top of the base"
            )));
        }
        let count = git(
            worktree,
            &["rev-list", "--count", &format!("{base}..{head}")],
        )
        .await
        .map_err(infra)?;
        if count != "1" {
            return Err(Found::Wrong(format!(
                "the agent made {count} commits on top of the base; there must be exactly one \
                 (squash them)"
            )));
        }
        if parents != [base] {
            return Err(Found::Wrong(format!(
                "the commit {head} has {} parents; make one ordinary commit on top of the base",
                parents.len()
            )));
        }
        Ok(head)
    }

    /// Writes a bundle of the worktree's `HEAD` (one commit on top of `base`) to `out`. The
    /// server checks it holds the announced commit.
    pub async fn bundle_head(&self, worktree: &Path, base: &str, out: &Path) -> Result<()> {
        let base = check_sha(base)?;
        let file = out
            .to_str()
            .ok_or_else(|| GitError("bundle path is not UTF-8".into()))?;
        git(
            worktree,
            &[
                "bundle",
                "create",
                "--quiet",
                file,
                "HEAD",
                &format!("^{base}"),
            ],
        )
        .await?;
        Ok(())
    }
}
