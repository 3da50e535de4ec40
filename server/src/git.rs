//! The one way the server runs git: a small typed wrapper of the `git` CLI with a timeout, a
//! fixed environment (no prompts, C locale, no user config), and arguments built only from
//! validated values. Later issues (bundles, integration) add their operations here.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::error::{Error, Result};

/// A ref's object ID from the files backend: the loose ref file if there is one, else its line
/// in `packed-refs`; `None` when neither holds a plain object ID for it.
fn read_ref_files(dir: &Path, refname: &str) -> Option<String> {
    let is_sha = |s: &str| check_sha(s).is_ok();
    match std::fs::read_to_string(dir.join(refname)) {
        Ok(content) => {
            let sha = content.trim();
            return is_sha(sha).then(|| sha.to_owned());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return None,
    }
    let packed = std::fs::read_to_string(dir.join("packed-refs")).ok()?;
    packed.lines().find_map(|line| {
        let (sha, name) = line.split_once(' ')?;
        (name == refname && is_sha(sha)).then(|| sha.to_owned())
    })
}

/// How long one git command may run before it is killed.
const GIT_TIMEOUT: Duration = Duration::from_secs(120);

/// A git repository the server works on.
#[derive(Clone, Debug)]
pub struct Repo {
    path: PathBuf,
    /// The common git directory, where branch refs are files (`refs/heads/…`, `packed-refs`):
    /// a branch tip is read from there without spawning git.
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
        repo.run(&["rev-parse", "--git-dir"]).await.map_err(|_| {
            Error::InvalidArgument(format!(
                "--repo {}: not a git repository (create one with `git init`)",
                path.display()
            ))
        })?;
        repo.refs_dir = Some(repo.common_dir().await?);
        Ok(repo)
    }

    /// A repository at `path`, unchecked (tests).
    pub fn at(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            refs_dir: None,
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

    /// The commit a branch points at. Read from the ref files when they hold it (a loose ref,
    /// else `packed-refs`, as git itself resolves it; both are replaced atomically by git), so
    /// the hot path spawns nothing; otherwise (another ref backend, a symbolic ref) git says.
    pub async fn tip(&self, branch: &str) -> Result<String> {
        if let Some(dir) = &self.refs_dir
            && let Some(sha) = read_ref_files(dir, &format!("refs/heads/{branch}"))
        {
            return Ok(sha);
        }
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

    /// The tree of a commit.
    pub async fn tree_of(&self, commit: &str) -> Result<String> {
        check_sha(commit)?;
        Ok(self
            .run(&[
                "rev-parse",
                "--verify",
                "--end-of-options",
                &format!("{commit}^{{tree}}"),
            ])
            .await?
            .trim()
            .to_owned())
    }

    /// Whether `ancestor` is `descendant` or one of its ancestors.
    pub async fn is_ancestor(&self, ancestor: &str, descendant: &str) -> Result<bool> {
        check_sha(ancestor)?;
        check_sha(descendant)?;
        let out = self
            .output(
                &["merge-base", "--is-ancestor", ancestor, descendant],
                &[],
                None,
            )
            .await?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(Error::Internal(format!(
                "git merge-base --is-ancestor: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }

    /// The commit in `since..tip` whose `Task-Id` trailer is `task`, if any: how a landed task
    /// is recognised.
    pub async fn find_task_commit(
        &self,
        task: &str,
        since: &str,
        tip: &str,
    ) -> Result<Option<String>> {
        check_sha(since)?;
        check_sha(tip)?;
        let out = self
            .run(&[
                "log",
                "--format=%H %(trailers:key=Task-Id,valueonly,separator=%x2C)",
                &format!("{since}..{tip}"),
            ])
            .await?;
        Ok(out.lines().find_map(|line| {
            let (sha, ids) = line.split_once(' ')?;
            ids.split(',')
                .any(|id| id.trim() == task)
                .then(|| sha.to_owned())
        }))
    }

    /// Cherry-picks `commit` (whose parent is `parent`) onto `onto` without touching any files:
    /// the merged tree, or git's conflict messages.
    pub async fn cherry_pick_tree(
        &self,
        parent: &str,
        onto: &str,
        commit: &str,
    ) -> Result<std::result::Result<String, String>> {
        for c in [parent, onto, commit] {
            check_sha(c)?;
        }
        let merge_base = format!("--merge-base={parent}");
        let out = self
            .output(
                &[
                    "merge-tree",
                    "--write-tree",
                    "--name-only",
                    &merge_base,
                    onto,
                    commit,
                ],
                &[],
                None,
            )
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match out.status.code() {
            Some(0) => Ok(Ok(stdout
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned())),
            Some(1) => {
                // Tree, conflicted files, a blank line, then git's messages.
                let messages: Vec<&str> = stdout
                    .split("\n\n")
                    .nth(1)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .collect();
                Ok(Err(messages.join("\n")))
            }
            _ => Err(Error::Internal(format!(
                "git merge-tree: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }

    /// Makes the integrated commit: `tree` on top of `parent`, with `original`'s author and
    /// message, and a `Task-Id: <task>` trailer (added if missing, corrected if wrong).
    pub async fn commit_for_task(
        &self,
        tree: &str,
        parent: &str,
        original: &str,
        task: &str,
    ) -> Result<String> {
        check_sha(tree)?;
        check_sha(parent)?;
        check_sha(original)?;
        let meta = self
            .run(&["show", "-s", "--format=%an%x00%ae%x00%aI%x00%B", original])
            .await?;
        let mut parts = meta.splitn(4, '\0');
        let (name, email, date, message) = (
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
        );
        let trailer = format!("Task-Id: {task}");
        let message = self
            .run_with_input(
                &[
                    "interpret-trailers",
                    "--if-exists",
                    "replace",
                    "--trailer",
                    &trailer,
                ],
                &message,
            )
            .await?;
        let env = [
            ("GIT_AUTHOR_NAME", name.as_str()),
            ("GIT_AUTHOR_EMAIL", email.as_str()),
            ("GIT_AUTHOR_DATE", date.as_str()),
            ("GIT_COMMITTER_NAME", "pipeline"),
            ("GIT_COMMITTER_EMAIL", "pipeline@localhost"),
        ];
        let out = self
            .output(
                &["commit-tree", tree, "-p", parent, "-F", "-"],
                &env,
                Some(&message),
            )
            .await?;
        if !out.status.success() {
            return Err(Error::Internal(format!(
                "git commit-tree: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let sha = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        check_sha(&sha)?;
        Ok(sha)
    }

    /// Moves `refname` from `old` to `new` only if it is still at `old`; false if it moved.
    pub async fn compare_and_swap_ref(&self, refname: &str, new: &str, old: &str) -> Result<bool> {
        check_sha(new)?;
        check_sha(old)?;
        let out = self
            .output(
                &["update-ref", "--end-of-options", refname, new, old],
                &[],
                None,
            )
            .await?;
        if out.status.success() {
            return Ok(true);
        }
        let now = self
            .run(&["rev-parse", "--verify", "--end-of-options", refname])
            .await?;
        if now.trim() != old {
            return Ok(false);
        }
        Err(Error::Internal(format!(
            "git update-ref {refname}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }

    /// Whether the repository is bare.
    pub async fn is_bare(&self) -> Result<bool> {
        Ok(self
            .run(&["rev-parse", "--is-bare-repository"])
            .await?
            .trim()
            == "true")
    }

    /// The worktrees (including the main one) that have `refs/heads/<branch>` checked out.
    pub async fn worktrees_on(&self, branch: &str) -> Result<Vec<PathBuf>> {
        let out = self.run(&["worktree", "list", "--porcelain"]).await?;
        let wanted = format!("branch refs/heads/{branch}");
        let mut found = Vec::new();
        let mut current: Option<PathBuf> = None;
        for line in out.lines() {
            if let Some(path) = line.strip_prefix("worktree ") {
                current = Some(PathBuf::from(path));
            } else if line == wanted
                && let Some(path) = current.take()
            {
                found.push(path);
            }
        }
        Ok(found)
    }

    /// Puts the detached worktree at `path` on `commit`, clean: created if missing, recreated
    /// if damaged.
    pub async fn checkout_worktree(&self, path: &Path, commit: &str) -> Result<()> {
        check_sha(commit)?;
        let p = path
            .to_str()
            .ok_or_else(|| Error::Internal("worktree path is not UTF-8".into()))?;
        if path.join(".git").exists() {
            let wt = Repo::at(path);
            let reset = async {
                wt.run(&["checkout", "--quiet", "--force", "--detach", commit])
                    .await?;
                wt.run(&["clean", "-ffdxq"]).await?;
                Ok::<(), Error>(())
            };
            match reset.await {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!(error = %e, "repairing the integration worktree"),
            }
        }
        if path.exists() {
            std::fs::remove_dir_all(path)
                .map_err(|e| Error::Internal(format!("cannot remove {}: {e}", path.display())))?;
        }
        self.run(&["worktree", "prune"]).await?;
        self.run(&[
            "worktree", "add", "--quiet", "--force", "--detach", p, commit,
        ])
        .await
        .map(drop)
    }

    /// Fetches `branch` from `remote` into `refs/pipeline/remote/<branch>`; returns its commit.
    pub async fn fetch_branch(&self, remote: &str, branch: &str) -> Result<String> {
        let spec = format!("+refs/heads/{branch}:refs/pipeline/remote/{branch}");
        self.run(&[
            "fetch",
            "--quiet",
            "--no-tags",
            "--end-of-options",
            remote,
            &spec,
        ])
        .await?;
        Ok(self
            .run(&[
                "rev-parse",
                "--verify",
                &format!("refs/pipeline/remote/{branch}"),
            ])
            .await?
            .trim()
            .to_owned())
    }

    /// Pushes `new` to `remote`'s `branch` only if it is still at `expected`; false when the
    /// remote refused (it moved). Never forces.
    pub async fn push_with_lease(
        &self,
        remote: &str,
        branch: &str,
        new: &str,
        expected: &str,
    ) -> Result<bool> {
        check_sha(new)?;
        check_sha(expected)?;
        let lease = format!("--force-with-lease=refs/heads/{branch}:{expected}");
        let spec = format!("{new}:refs/heads/{branch}");
        let out = self
            .output(
                &[
                    "push",
                    "--quiet",
                    "--porcelain",
                    &lease,
                    "--end-of-options",
                    remote,
                    &spec,
                ],
                &[],
                None,
            )
            .await?;
        if out.status.success() {
            return Ok(true);
        }
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if text.contains("stale info") || text.contains("rejected") || text.contains("fetch first")
        {
            return Ok(false);
        }
        Err(Error::Internal(format!(
            "git push {remote}: {}",
            text.trim()
        )))
    }

    /// Runs git and returns its whole output, whatever the exit status.
    async fn output(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        input: Option<&str>,
    ) -> Result<std::process::Output> {
        let mut cmd = self.command();
        cmd.args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if input.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let what = format!("git {}", args.join(" "));
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Internal(format!("{what}: cannot run git: {e}")))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .await
                .map_err(|e| Error::Internal(format!("{what}: writing stdin: {e}")))?;
        }
        tokio::time::timeout(GIT_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| Error::Internal(format!("{what}: timed out after {GIT_TIMEOUT:?}")))?
            .map_err(|e| Error::Internal(format!("{what}: {e}")))
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
