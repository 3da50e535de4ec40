//! The one way the server runs git: a small typed wrapper of the `git` CLI with a timeout, a
//! fixed environment (no prompts, C locale, no user config), and arguments built only from
//! validated values. Later issues (bundles, integration) add their operations here.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::error::{Error, Result};

/// How long one git command may run before it is killed.
const GIT_TIMEOUT: Duration = Duration::from_secs(120);

/// A git repository the server works on.
#[derive(Clone, Debug)]
pub struct Repo {
    path: PathBuf,
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
        let repo = Self {
            path: path.to_path_buf(),
        };
        repo.run(&["rev-parse", "--git-dir"]).await.map_err(|_| {
            Error::InvalidArgument(format!(
                "--repo {}: not a git repository (create one with `git init`)",
                path.display()
            ))
        })?;
        Ok(repo)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory holding the repository's objects and refs (`.git`, or the bare repo).
    pub async fn common_dir(&self) -> Result<PathBuf> {
        let out = self
            .run(&["rev-parse", "--path-format=absolute", "--git-common-dir"])
            .await?;
        Ok(PathBuf::from(out.trim()))
    }

    /// Checks that `branch` is a valid branch name and exists, returning its commit.
    pub async fn branch_commit(&self, branch: &str) -> Result<String> {
        if branch.starts_with('-')
            || self
                .run(&["check-ref-format", "--branch", branch])
                .await
                .is_err()
        {
            return Err(Error::InvalidArgument(format!(
                "--base {branch:?} is not a valid branch name"
            )));
        }
        let refname = format!("refs/heads/{branch}");
        let out = self
            .run(&[
                "rev-parse",
                "--verify",
                "--quiet",
                "--end-of-options",
                &format!("{refname}^{{commit}}"),
            ])
            .await
            .map_err(|_| {
                Error::FailedPrecondition(format!(
                    "the base branch {branch} does not exist in {}; create it (e.g. commit \
                     something on it) or pass --base with an existing branch",
                    self.path.display()
                ))
            })?;
        Ok(out.trim().to_owned())
    }

    /// Runs `git ARGS` in the repository and returns its stdout.
    pub async fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("git");
        cmd.arg("-C")
            .arg(&self.path)
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let what = format!("git {}", args.join(" "));
        let output = tokio::time::timeout(GIT_TIMEOUT, cmd.output())
            .await
            .map_err(|_| Error::Internal(format!("{what}: timed out after {GIT_TIMEOUT:?}")))?
            .map_err(|e| Error::Internal(format!("{what}: cannot run git: {e}")))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(Error::Internal(format!(
                "{what}: {}: {}",
                output.status,
                stderr.trim()
            )));
        }
        String::from_utf8(output.stdout)
            .map_err(|_| Error::Internal(format!("{what}: output is not UTF-8")))
    }
}
