//! The runner's git: one local bare mirror under the work dir, holding only what the server sent
//! and what agents committed, and one worktree per slot, reset (not recreated) for each task.
//! Every commit ID that reaches a command line has been checked to be a full hex object ID.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

const GIT_TIMEOUT: Duration = Duration::from_secs(300);

/// A git failure, with git's own message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GitError(pub String);

type Result<T> = std::result::Result<T, GitError>;

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
}

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
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Commits the server sent earlier: the bundle for the next lease leaves them out.
    pub async fn haves(&self) -> Result<Vec<String>> {
        let out = git(
            &self.dir,
            &["for-each-ref", "--format=%(objectname)", "refs/pipeline/"],
        )
        .await?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// Stores a bundle's objects and remembers `commits` as things the server knows we have.
    pub async fn unbundle(&self, bundle: &Path, commits: &[&str]) -> Result<()> {
        let file = bundle
            .to_str()
            .ok_or_else(|| GitError("bundle path is not UTF-8".into()))?;
        git(&self.dir, &["bundle", "unbundle", file]).await?;
        self.remember(commits).await;
        Ok(())
    }

    /// Keeps `commits` reachable from `refs/pipeline/have/*` (best effort: it only saves
    /// transfer next time).
    pub async fn remember(&self, commits: &[&str]) {
        for (i, c) in commits.iter().enumerate() {
            if check_sha(c).is_ok() {
                let name = if i == 0 { "base" } else { "previous" };
                let _ = git(
                    &self.dir,
                    &["update-ref", &format!("refs/pipeline/{name}"), c],
                )
                .await;
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
    /// not the unchanged `previous`); returns it, or says what was found instead.
    pub async fn one_commit(
        &self,
        worktree: &Path,
        base: &str,
        previous: Option<&str>,
    ) -> std::result::Result<String, String> {
        let head = git(worktree, &["rev-parse", "--verify", "HEAD^{commit}"])
            .await
            .map_err(|e| format!("cannot read HEAD after the agent: {e}"))?;
        if head == base {
            return Err("the agent made no commit on top of the base".to_owned());
        }
        if previous == Some(head.as_str()) {
            return Err(
                "the agent left the previous patchset unchanged; amend it with the fix".to_owned(),
            );
        }
        let descends = git(worktree, &["merge-base", "--is-ancestor", base, &head])
            .await
            .is_ok();
        if !descends {
            return Err(format!(
                "HEAD {head} does not descend from the base {base}; commit on top of the base"
            ));
        }
        let count = git(
            worktree,
            &["rev-list", "--count", &format!("{base}..{head}")],
        )
        .await
        .map_err(|e| e.to_string())?;
        let parents = git(worktree, &["rev-list", "--parents", "-n", "1", &head])
            .await
            .map_err(|e| e.to_string())?;
        let parents: Vec<&str> = parents.split_whitespace().skip(1).collect();
        if count != "1" {
            return Err(format!(
                "the agent made {count} commits on top of the base; there must be exactly one \
                 (squash them)"
            ));
        }
        if parents != [base] {
            return Err(format!(
                "the commit {head} has {} parents; make one ordinary commit on top of the base",
                parents.len()
            ));
        }
        Ok(head)
    }

    /// Writes a bundle of `commit` (one commit on top of `base`) to `out`.
    pub async fn bundle_commit(
        &self,
        slot: usize,
        commit: &str,
        base: &str,
        out: &Path,
    ) -> Result<()> {
        let commit = check_sha(commit)?;
        let base = check_sha(base)?;
        let refname = format!("refs/runner/out/slot-{slot}");
        git(&self.dir, &["update-ref", &refname, commit]).await?;
        let file = out
            .to_str()
            .ok_or_else(|| GitError("bundle path is not UTF-8".into()))?;
        git(
            &self.dir,
            &[
                "bundle",
                "create",
                "--quiet",
                file,
                &refname,
                &format!("^{base}"),
            ],
        )
        .await?;
        Ok(())
    }
}
