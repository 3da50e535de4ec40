//! The one way the server runs git: a small typed wrapper of the `git` CLI with a timeout, a
//! fixed environment (no prompts, C locale, no user config), and arguments built only from
//! validated values. Later issues (bundles, integration) add their operations here.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

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

    /// A repository at `path`, unchecked (tests).
    pub fn at(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
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

    /// The commit a branch points at.
    pub async fn tip(&self, branch: &str) -> Result<String> {
        let refname = format!("refs/heads/{branch}^{{commit}}");
        Ok(self
            .run(&["rev-parse", "--verify", "--end-of-options", &refname])
            .await?
            .trim()
            .to_owned())
    }

    /// The parents of a commit.
    pub async fn parents(&self, commit: &str) -> Result<Vec<String>> {
        check_sha(commit)?;
        let out = self
            .run(&[
                "rev-list",
                "--parents",
                "-n",
                "1",
                "--end-of-options",
                commit,
            ])
            .await?;
        Ok(out.split_whitespace().skip(1).map(str::to_owned).collect())
    }

    /// Those of `shas` that name commits present in the repository.
    pub async fn existing_commits(&self, shas: &[String]) -> Result<Vec<String>> {
        let shas: Vec<&String> = shas.iter().filter(|s| check_sha(s).is_ok()).collect();
        if shas.is_empty() {
            return Ok(Vec::new());
        }
        let input: String = shas.iter().map(|s| format!("{s}\n")).collect();
        let out = self
            .run_with_input(
                &["cat-file", "--batch-check=%(objectname) %(objecttype)"],
                &input,
            )
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.strip_suffix(" commit"))
            .map(str::to_owned)
            .collect())
    }

    /// Points `refname` at `commit`.
    pub async fn update_ref(&self, refname: &str, commit: &str) -> Result<()> {
        check_sha(commit)?;
        self.run(&["update-ref", "--end-of-options", refname, commit])
            .await
            .map(drop)
    }

    /// Starts `git bundle create - REFS --not NOT...`; its stdout is the bundle. An empty result
    /// (the receiver has everything) makes git fail with "Refusing to create empty bundle".
    pub fn bundle_create(&self, refs: &[String], not: &[String]) -> Result<Child> {
        let mut cmd = self.command();
        cmd.args(["bundle", "create", "--quiet", "-"])
            .args(refs)
            .arg("--not")
            .args(not)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn()
            .map_err(|e| Error::Internal(format!("git bundle create: cannot run git: {e}")))
    }

    /// Takes a runner's bundle: it must be a bundle, need nothing but `base`, hold exactly one
    /// ref whose commit is `expected`, and that commit must have `base` as its only parent.
    /// Stores the objects and returns the commit. The error says what was wrong.
    pub async fn receive_bundle(&self, path: &Path, base: &str, expected: &str) -> Result<String> {
        fn refuse<T>(why: String) -> Result<T> {
            Err(Error::InvalidArgument(format!("commit refused: {why}")))
        }
        if check_sha(expected).is_err() {
            return refuse(format!("{expected:?} is not a commit id"));
        }
        let file = path
            .to_str()
            .ok_or_else(|| Error::Internal("bundle path is not UTF-8".into()))?;
        if let Err(e) = self.run(&["bundle", "verify", "--quiet", file]).await {
            return refuse(format!("not a valid bundle on top of the base: {e}"));
        }
        let heads = self.run(&["bundle", "list-heads", file]).await?;
        let heads: Vec<&str> = heads.lines().filter(|l| !l.trim().is_empty()).collect();
        if heads.len() != 1 {
            return refuse(format!(
                "the bundle holds {} refs; send exactly one",
                heads.len()
            ));
        }
        let head = heads[0].split_whitespace().next().unwrap_or_default();
        if head != expected {
            return refuse(format!(
                "the bundle holds {head}, not the announced {expected}"
            ));
        }
        self.run(&["bundle", "unbundle", file]).await?;
        let parents = self.parents(expected).await?;
        match parents.as_slice() {
            [p] if p == base => Ok(expected.to_owned()),
            [p] => refuse(format!(
                "{expected} is not one commit on top of the leased base {base} (its parent is {p})"
            )),
            _ => refuse(format!(
                "{expected} has {} parents; send one commit on top of the base {base}",
                parents.len()
            )),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("git");
        cmd.arg("-C")
            .arg(&self.path)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `git ARGS` with `input` on stdin and returns its stdout.
    pub async fn run_with_input(&self, args: &[&str], input: &str) -> Result<String> {
        let mut cmd = self.command();
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("git {}", args.join(" "));
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Internal(format!("{what}: cannot run git: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .await
                .map_err(|e| Error::Internal(format!("{what}: writing stdin: {e}")))?;
        }
        let output = tokio::time::timeout(GIT_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| Error::Internal(format!("{what}: timed out after {GIT_TIMEOUT:?}")))?
            .map_err(|e| Error::Internal(format!("{what}: {e}")))?;
        finish(&what, output)
    }

    /// Runs `git ARGS` in the repository and returns its stdout.
    pub async fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.command();
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let what = format!("git {}", args.join(" "));
        let output = tokio::time::timeout(GIT_TIMEOUT, cmd.output())
            .await
            .map_err(|_| Error::Internal(format!("{what}: timed out after {GIT_TIMEOUT:?}")))?
            .map_err(|e| Error::Internal(format!("{what}: cannot run git: {e}")))?;
        finish(&what, output)
    }
}

/// Checks that `s` is a full hexadecimal object ID (SHA-1 or SHA-256), so that it can never be
/// read by git as an option or a revision expression.
pub fn check_sha(s: &str) -> Result<()> {
    if (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{} is not a full commit id",
            crate::domain::quote_for_message(s)
        )))
    }
}

fn finish(what: &str, output: std::process::Output) -> Result<String> {
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
