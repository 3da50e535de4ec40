//! The one typed layer over the `git` command line, used by the server (its canonical
//! repository) and the runner (its mirror and worktrees) alike.
//!
//! Every git process is started here, by one private function: with a time limit, a fixed
//! environment (no prompts, the C locale, no system config), null stdin unless input is given,
//! `kill_on_drop`, and a tracing span naming the command. Arguments are built only from
//! validated values: object IDs are [`CommitId`]/[`TreeId`], refs are [`RefName`]s made by
//! the constructors below from validated IDs, paths are paths. There is no public way to run an
//! arbitrary git command.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tracing::Instrument;

use crate::ids::{CommitId, InvalidId, TaskId, TreeId};

/// How long one git command may run before it is killed, unless a repository says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a git command failed.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// git could not be started (not installed, too many open files, no memory).
    #[error("{what}: cannot run git: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    /// git ran and failed; `stderr` is its message.
    #[error("{what}: {stderr}")]
    Failed { what: String, stderr: String },
    #[error("{what}: timed out after {after:?}")]
    TimedOut { what: String, after: Duration },
    /// git's answer was not what it should be (or a value was refused before running it).
    #[error("{0}")]
    Unexpected(String),
}

impl GitError {
    /// Whether the failure is the machine's (git could not run, ran out of a resource, timed
    /// out) rather than about what git was given: the caller's own fault, never a task's.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            GitError::Spawn { .. } | GitError::TimedOut { .. } => true,
            GitError::Failed { stderr, .. } => is_resource_failure(stderr),
            GitError::Unexpected(_) => false,
        }
    }
}

impl From<InvalidId> for GitError {
    fn from(e: InvalidId) -> Self {
        GitError::Unexpected(e.0)
    }
}

pub type Result<T, E = GitError> = std::result::Result<T, E>;

/// Whether git's message says it failed for want of a resource of this machine (files, disk,
/// memory, permissions) rather than because of what it was given.
pub fn is_resource_failure(message: &str) -> bool {
    const SIGNS: &[&str] = &[
        "Too many open files",
        "No space left on device",
        "Disk quota exceeded",
        "Cannot allocate memory",
        "Out of memory",
        "out of memory",
        "Permission denied",
        "Read-only file system",
        "Resource temporarily unavailable",
        "unable to create temporary file",
        "Input/output error",
        "cannot fork",
        "unable to fork",
    ];
    SIGNS.iter().any(|s| message.contains(s))
}

/// Whether a message says a disk is full (`ENOSPC`, `EDQUOT`): a failure that heals once room
/// is made, unlike the other resource failures.
pub fn is_disk_full(message: &str) -> bool {
    message.contains("No space left on device") || message.contains("Disk quota exceeded")
}

/// Held while worktrees are pruned and added ([`Worktree::prepare`]): git's
/// `worktrees/` administration does not survive concurrent prunes and adds.
static WORKTREE_ADMIN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A branch name, checked like `git check-ref-format --branch` would (letters, digits and
/// `._/-`, no `..`, no component starting with `.` or `-` or ending with `.lock`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BranchName(String);

impl BranchName {
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        let bad = raw.is_empty()
            || raw.len() > 255
            || raw.starts_with('/')
            || raw.ends_with('/')
            || raw.ends_with('.')
            || raw.contains("..")
            || raw.contains("//")
            || raw.contains("@{")
            || !raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'))
            || raw.split('/').any(|part| {
                part.starts_with('.') || part.starts_with('-') || part.ends_with(".lock")
            });
        if bad {
            return Err(InvalidId(format!(
                "{} is not a valid branch name",
                crate::ids::quote_for_message(raw)
            )));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BranchName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A remote's name, as `git remote` knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteName(String);

impl RemoteName {
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        if raw.is_empty()
            || raw.starts_with('-')
            || !raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(InvalidId(format!(
                "{} must name a remote of the repository (e.g. origin)",
                crate::ids::quote_for_message(raw)
            )));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Refs one `git push` deletes at most (its command line stays short).
pub const REFS_PER_PUSH: usize = 200;

/// A full ref name, made only by the constructors below from validated parts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RefName(String);

impl RefName {
    /// `refs/heads/<branch>`.
    pub fn branch(branch: &BranchName) -> Self {
        Self(format!("refs/heads/{branch}"))
    }

    /// Where every task's patches are: `refs/pipeline/tasks/`.
    pub const TASK_PATCHES: &'static str = "refs/pipeline/tasks/";

    /// `refs/pipeline/tasks/<task>/<epoch>`: a runner's commit for a lease, as received.
    pub fn task_patch(task: &TaskId, epoch: u64) -> Self {
        Self(format!("refs/pipeline/tasks/{task}/{epoch}"))
    }

    /// `refs/pipeline/landed/<task>`: the commit the integrator made for the task and moved the
    /// base to (the server's own record of a landing).
    pub fn landed(task: &TaskId) -> Self {
        Self(format!("refs/pipeline/landed/{task}"))
    }

    /// `refs/pipeline/fetch/<task>/base` or `…/previous`: what a lease's runner fetches.
    pub fn fetch(task: &TaskId, what: FetchRef) -> Self {
        let what = match what {
            FetchRef::Base => "base",
            FetchRef::Previous => "previous",
        };
        Self(format!("refs/pipeline/fetch/{task}/{what}"))
    }

    /// `refs/pipeline/remote/<branch>`: a remote's branch as last fetched.
    pub fn remote_copy(branch: &BranchName) -> Self {
        Self(format!("refs/pipeline/remote/{branch}"))
    }

    /// `refs/pipeline/train/<n>`: a train's chain, kept while it is built.
    pub fn train(n: u64) -> Self {
        Self(format!("refs/pipeline/train/{n}"))
    }

    /// `refs/pipeline/builds/<n>`: the commit of build job `n` on a runner
    /// (`--remote-builds`), kept while the runner fetches it.
    pub fn build(n: u64) -> Self {
        Self(format!("refs/pipeline/builds/{n}"))
    }

    /// `refs/pipeline/<name>` for the runner's mirror (`base`, `previous`).
    pub fn kept(name: KeptRef) -> Self {
        Self(format!(
            "refs/pipeline/{}",
            match name {
                KeptRef::Base => "base",
                KeptRef::Previous => "previous",
            }
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RefName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which of a lease's fetch refs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchRef {
    Base,
    Previous,
}

/// The refs a runner's mirror keeps for the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeptRef {
    Base,
    Previous,
}

/// A prefix of ref names to list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefPrefix {
    /// Everything under `refs/pipeline/`.
    Pipeline,
    /// `refs/pipeline/tasks/`.
    TaskPatches,
    /// `refs/pipeline/landed/`.
    Landed,
}

impl RefPrefix {
    fn as_str(self) -> &'static str {
        match self {
            RefPrefix::Pipeline => "refs/pipeline/",
            RefPrefix::TaskPatches => "refs/pipeline/tasks/",
            RefPrefix::Landed => "refs/pipeline/landed/",
        }
    }
}

/// A commit's author, as git stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Author {
    pub name: String,
    pub email: String,
    /// `<unix seconds> <zone>`.
    pub date: String,
}

/// A commit as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitInfo {
    pub tree: TreeId,
    pub parents: Vec<CommitId>,
    pub author: Author,
    pub message: String,
}

impl CommitInfo {
    /// Parses a raw commit object.
    fn parse(raw: &str) -> Option<Self> {
        let (headers, message) = raw.split_once("\n\n").unwrap_or((raw, ""));
        let mut tree = None;
        let mut parents = Vec::new();
        let mut author = None;
        for line in headers.lines() {
            if let Some(t) = line.strip_prefix("tree ") {
                tree = TreeId::parse(t).ok();
            } else if let Some(p) = line.strip_prefix("parent ") {
                parents.push(CommitId::parse(p).ok()?);
            } else if let Some(a) = line.strip_prefix("author ") {
                let (name, rest) = a.split_once(" <")?;
                let (email, date) = rest.rsplit_once("> ")?;
                author = Some(Author {
                    name: name.to_owned(),
                    email: email.to_owned(),
                    date: date.to_owned(),
                });
            }
        }
        Some(Self {
            tree: tree?,
            parents,
            author: author.unwrap_or(Author {
                name: String::new(),
                email: String::new(),
                date: String::new(),
            }),
            message: message.to_owned(),
        })
    }
}

/// What a three-way merge of trees gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Merged {
    Clean(TreeId),
    /// git's messages about the conflicts.
    Conflict(String),
}

/// What a git process reads on stdin.
enum Stdin<'a> {
    Null,
    Bytes(&'a [u8]),
    /// An open file, from where it is positioned.
    File(std::fs::File),
}

/// The depth of trees that git checks out by default (`core.maxTreeDepth`): a commit received
/// with a deeper tree could not be checked out by a runner's git.
pub const MAX_TREE_DEPTH: usize = 2048;

/// Whether git's message says a tree was deeper than it allows.
pub fn is_too_deep(message: &str) -> bool {
    message.contains("exceeded maximum allowed tree depth")
}

/// One git repository (or worktree) directory, and how its commands are run.
#[derive(Clone, Debug)]
pub struct Git {
    dir: PathBuf,
    timeout: Duration,
    /// Variables naming the repository's directories ([`Worktree::git`]).
    env: Vec<(&'static str, PathBuf)>,
}

/// A finished git command.
struct Output {
    status: std::process::ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl Git {
    /// The repository or worktree at `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            timeout: DEFAULT_TIMEOUT,
            env: Vec::new(),
        }
    }

    /// The same repository with another time limit per command.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The one way a git process is made: fixed environment, null stdin, killed when dropped.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("git");
        cmd.arg("-C")
            .arg(&self.dir)
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("LC_ALL", "C")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs git to the end, with `env` added and `input` on stdin; its output whatever its
    /// exit status.
    async fn output(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        input: Option<&[u8]>,
    ) -> Result<Output> {
        let stdin = match input {
            Some(bytes) => Stdin::Bytes(bytes),
            None => Stdin::Null,
        };
        self.output_with(args, env, stdin).await
    }

    /// [`Git::output`] with stdin from `stdin`.
    async fn output_with(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Stdin<'_>,
    ) -> Result<Output> {
        let what = format!("git {}", args.join(" "));
        let span = tracing::debug_span!("git", command = %what, dir = %self.dir.display());
        // The span follows the future, not the thread: entered across an await, it would take
        // in whatever else the thread runs meanwhile.
        self.spawn_and_wait(what, args, env, stdin)
            .instrument(span)
            .await
    }

    /// [`Git::output`]'s work, in its span.
    async fn spawn_and_wait(
        &self,
        what: String,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Stdin<'_>,
    ) -> Result<Output> {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let input = match stdin {
            Stdin::Null => None,
            Stdin::Bytes(bytes) => {
                cmd.stdin(Stdio::piped());
                Some(bytes)
            }
            Stdin::File(file) => {
                cmd.stdin(Stdio::from(file));
                None
            }
        };
        let mut child = cmd.spawn().map_err(|source| GitError::Spawn {
            what: what.clone(),
            source,
        })?;
        if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(bytes)
                .await
                .map_err(|e| GitError::Unexpected(format!("{what}: writing its input: {e}")))?;
        }
        let out = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| GitError::TimedOut {
                what: what.clone(),
                after: self.timeout,
            })?
            .map_err(|source| GitError::Spawn {
                what: what.clone(),
                source,
            })?;
        Ok(Output {
            status: out.status,
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    /// Runs git and returns its stdout (trimmed), failing with its stderr on a non-zero exit.
    async fn run(&self, args: &[&str]) -> Result<String> {
        self.run_with(args, &[], None).await
    }

    async fn run_with(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        input: Option<&[u8]>,
    ) -> Result<String> {
        let out = self.output(args, env, input).await?;
        if !out.status.success() {
            return Err(GitError::Failed {
                what: format!("git {}", args.join(" ")),
                stderr: out.stderr,
            });
        }
        String::from_utf8(out.stdout)
            .map(|s| s.trim().to_owned())
            .map_err(|_| GitError::Unexpected(format!("git {}: output is not UTF-8", args[0])))
    }

    /// Whether the directory is a git repository (or worktree).
    pub async fn is_repository(&self) -> bool {
        self.run(&["rev-parse", "--git-dir"]).await.is_ok()
    }

    /// Makes a new bare repository here.
    pub async fn init_bare(&self) -> Result<()> {
        self.run(&["init", "--quiet", "--bare"]).await.map(drop)
    }

    /// The directory holding the repository's objects and refs (`.git`, or the bare repo).
    pub async fn common_dir(&self) -> Result<PathBuf> {
        Ok(PathBuf::from(
            self.run(&["rev-parse", "--path-format=absolute", "--git-common-dir"])
                .await?,
        ))
    }

    /// Whether the repository is bare.
    pub async fn is_bare(&self) -> Result<bool> {
        Ok(self.run(&["rev-parse", "--is-bare-repository"]).await? == "true")
    }

    /// The commit `name` points at (peeled), if it exists.
    pub async fn resolve(&self, name: &RefName) -> Result<Option<CommitId>> {
        let rev = format!("{name}^{{commit}}");
        let out = self
            .output(
                &["rev-parse", "--verify", "--quiet", "--end-of-options", &rev],
                &[],
                None,
            )
            .await?;
        if !out.status.success() {
            return Ok(None);
        }
        let sha = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(Some(CommitId::parse(&sha)?))
    }

    /// Points `name` at `commit`.
    pub async fn update_ref(&self, name: &RefName, commit: &CommitId) -> Result<()> {
        self.run(&[
            "update-ref",
            "--end-of-options",
            name.as_str(),
            commit.as_str(),
        ])
        .await
        .map(drop)
    }

    /// Moves `name` from `old` to `new` only if it is still at `old`; false if it moved.
    pub async fn compare_and_swap(
        &self,
        name: &RefName,
        new: &CommitId,
        old: &CommitId,
    ) -> Result<bool> {
        let out = self
            .output(
                &[
                    "update-ref",
                    "--end-of-options",
                    name.as_str(),
                    new.as_str(),
                    old.as_str(),
                ],
                &[],
                None,
            )
            .await?;
        if out.status.success() {
            return Ok(true);
        }
        match self.resolve(name).await? {
            Some(now) if now != *old => Ok(false),
            _ => Err(GitError::Failed {
                what: format!("git update-ref {name}"),
                stderr: out.stderr,
            }),
        }
    }

    /// The refs under `prefix` with their commits.
    pub async fn refs_under(&self, prefix: RefPrefix) -> Result<Vec<(String, CommitId)>> {
        let out = self
            .run(&[
                "for-each-ref",
                "--format=%(objectname) %(refname)",
                prefix.as_str(),
            ])
            .await?;
        ref_lines(&out, ' ', "for-each-ref")
    }

    /// Whether any ref exists under `prefix`; the first one if so.
    pub async fn first_ref_under(&self, prefix: RefPrefix) -> Result<Option<String>> {
        let out = self
            .run(&[
                "for-each-ref",
                "--count=1",
                "--format=%(refname)",
                prefix.as_str(),
            ])
            .await?;
        Ok(out
            .lines()
            .next()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned))
    }

    /// Whether `ancestor` is `descendant` or one of its ancestors.
    pub async fn is_ancestor(&self, ancestor: &CommitId, descendant: &CommitId) -> Result<bool> {
        let out = self
            .output(
                &[
                    "merge-base",
                    "--is-ancestor",
                    ancestor.as_str(),
                    descendant.as_str(),
                ],
                &[],
                None,
            )
            .await?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(GitError::Failed {
                what: "git merge-base --is-ancestor".to_owned(),
                stderr: out.stderr,
            }),
        }
    }

    /// How many commits `base..head` holds.
    pub async fn count_between(&self, base: &CommitId, head: &CommitId) -> Result<u64> {
        let out = self
            .run(&["rev-list", "--count", &format!("{base}..{head}")])
            .await?;
        out.parse()
            .map_err(|_| GitError::Unexpected(format!("git rev-list --count printed {out:?}")))
    }

    /// `HEAD` of a worktree, and its parents.
    pub async fn head_and_parents(&self) -> Result<(CommitId, Vec<CommitId>)> {
        let line = self
            .run(&["rev-list", "--parents", "-n", "1", "HEAD"])
            .await?;
        let mut ids = line.split_whitespace();
        let head = ids
            .next()
            .ok_or_else(|| GitError::Unexpected("git rev-list printed nothing".to_owned()))?;
        Ok((
            CommitId::parse(head)?,
            ids.map(CommitId::parse).collect::<Result<_, _>>()?,
        ))
    }

    /// A commit as people read it: its header and message, a stat of its files, then its
    /// patch against its first parent (`git show --stat --patch`), at most `max_bytes` of that
    /// text (git is stopped once that much is read, so a huge commit costs no more); and
    /// whether it was cut there.
    pub async fn show_commit(&self, commit: &CommitId, max_bytes: usize) -> Result<(String, bool)> {
        let args = [
            "show",
            "--no-color",
            "--no-ext-diff",
            "--stat",
            "--patch",
            "--format=commit %H%nAuthor: %an <%ae>%nDate:   %aI%n%n%w(0,4,4)%B",
            commit.as_str(),
            "--",
        ];
        let what = "git show";
        let mut child = self
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| GitError::Spawn {
                what: what.to_owned(),
                source,
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| GitError::Unexpected(format!("{what}: no stdout")))?;
        let limit = u64::try_from(max_bytes)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let mut text = Vec::new();
        let mut stdout = stdout.take(limit);
        let read = stdout.read_to_end(&mut text);
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| GitError::TimedOut {
                what: what.to_owned(),
                after: self.timeout,
            })?
            .map_err(|e| GitError::Unexpected(format!("{what}: reading its output: {e}")))?;
        let cut = text.len() > max_bytes;
        if cut {
            // The rest is not wanted: git is stopped (killed when dropped).
            text.truncate(max_bytes);
        } else {
            let status = tokio::time::timeout(self.timeout, child.wait())
                .await
                .map_err(|_| GitError::TimedOut {
                    what: what.to_owned(),
                    after: self.timeout,
                })?
                .map_err(|source| GitError::Spawn {
                    what: what.to_owned(),
                    source,
                })?;
            if !status.success() {
                return Err(GitError::Failed {
                    what: format!("git show {commit}"),
                    stderr: format!("exit {status}"),
                });
            }
        }
        Ok((String::from_utf8_lossy(&text).into_owned(), cut))
    }

    /// Whether the commit object is here.
    pub async fn has_commit(&self, commit: &CommitId) -> bool {
        self.run(&["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .await
            .is_ok()
    }

    /// Those of `ids` that name commits present in the repository.
    pub async fn existing(&self, ids: &[CommitId]) -> Result<Vec<CommitId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let input: String = ids.iter().map(|c| format!("{c}\n")).collect();
        let out = self
            .run_with(
                &["cat-file", "--batch-check=%(objectname) %(objecttype)"],
                &[],
                Some(input.as_bytes()),
            )
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.strip_suffix(" commit"))
            .filter_map(|sha| CommitId::parse(sha).ok())
            .collect())
    }

    /// A long-lived `git cat-file --batch`, for reading many objects without a process each.
    pub fn object_reader(&self) -> Result<ObjectReader> {
        let mut cmd = self.command(&["cat-file", "--batch"]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(|source| GitError::Spawn {
            what: "git cat-file --batch".to_owned(),
            source,
        })?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| GitError::Unexpected("git cat-file: no stdin".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| GitError::Unexpected("git cat-file: no stdout".into()))?;
        Ok(ObjectReader {
            _child: child,
            stdin,
            stdout: BufReader::new(stdout),
            timeout: self.timeout,
        })
    }

    /// The merge of `theirs` into `ours` with `base` as their merge base, without touching any
    /// files (`git merge-tree --write-tree`): the tree, or git's conflict messages.
    pub async fn merge_trees(
        &self,
        base: &CommitId,
        ours: &CommitId,
        theirs: &CommitId,
    ) -> Result<Merged> {
        let merge_base = format!("--merge-base={base}");
        let out = self
            .output(
                &[
                    "merge-tree",
                    "--write-tree",
                    "--name-only",
                    &merge_base,
                    ours.as_str(),
                    theirs.as_str(),
                ],
                &[],
                None,
            )
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match out.status.code() {
            Some(0) => Ok(Merged::Clean(TreeId::parse(
                stdout.lines().next().unwrap_or_default().trim(),
            )?)),
            Some(1) => {
                // The tree, the conflicted files, a blank line, then git's messages.
                let messages: Vec<&str> = stdout
                    .split("\n\n")
                    .nth(1)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .collect();
                Ok(Merged::Conflict(messages.join("\n")))
            }
            _ => Err(GitError::Failed {
                what: "git merge-tree".to_owned(),
                stderr: out.stderr,
            }),
        }
    }

    /// Writes a commit of `tree` on `parent` with `author` and `message`, committed by the
    /// pipeline.
    pub async fn commit_tree(
        &self,
        tree: &TreeId,
        parent: &CommitId,
        author: &Author,
        message: &str,
    ) -> Result<CommitId> {
        let date = format!("@{}", author.date);
        let mut env = vec![
            ("GIT_COMMITTER_NAME", "pipeline"),
            ("GIT_COMMITTER_EMAIL", "pipeline@localhost"),
        ];
        if !author.name.is_empty() {
            env.extend([
                ("GIT_AUTHOR_NAME", author.name.as_str()),
                ("GIT_AUTHOR_EMAIL", author.email.as_str()),
            ]);
        }
        if !author.date.is_empty() {
            env.push(("GIT_AUTHOR_DATE", date.as_str()));
        }
        let out = self
            .run_with(
                &[
                    "commit-tree",
                    tree.as_str(),
                    "-p",
                    parent.as_str(),
                    "-F",
                    "-",
                ],
                &env,
                Some(message.as_bytes()),
            )
            .await?;
        Ok(CommitId::parse(&out)?)
    }

    /// Starts `git bundle create - REFS --not NOT...`; its stdout is the bundle. An empty result
    /// (the receiver has everything) makes git fail with "Refusing to create empty bundle".
    pub fn bundle_to_stdout(&self, refs: &[RefName], not: &[CommitId]) -> Result<Child> {
        let mut args = vec!["bundle", "create", "--quiet", "-"];
        args.extend(refs.iter().map(RefName::as_str));
        args.push("--not");
        args.extend(not.iter().map(CommitId::as_str));
        let mut cmd = self.command(&args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().map_err(|source| GitError::Spawn {
            what: "git bundle create".to_owned(),
            source,
        })
    }

    /// Writes a bundle of `HEAD` less `base` (one commit on top of it) to `out`.
    pub async fn bundle_head(&self, base: &CommitId, out: &Path) -> Result<()> {
        let file = utf8(out)?;
        let not_base = format!("^{base}");
        self.run(&["bundle", "create", "--quiet", file, "HEAD", &not_base])
            .await
            .map(drop)
    }

    /// Stores a bundle's objects (checking its prerequisites and its pack); returns the
    /// commits its refs point at.
    pub async fn unbundle(&self, bundle: &Path) -> Result<Vec<CommitId>> {
        let out = self.run(&["bundle", "unbundle", utf8(bundle)?]).await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|sha| CommitId::parse(sha).ok())
            .collect())
    }

    /// Stores the pack that starts at `offset` in `file` (a bundle's, after its header) as
    /// git's strict reception does (`receive.fsckObjects`): `index-pack --strict` checks every
    /// object (a `.git` entry in any spelling, duplicate or unsorted entries, bad modes,
    /// `.gitmodules` that would run commands, broken commits) and that everything they name is
    /// here; `--fix-thin` completes a pack made against objects the repository has. Nothing is
    /// kept if it fails; git's message says why.
    pub async fn index_pack_strict(&self, file: &Path, offset: u64) -> Result<()> {
        use std::io::Seek;
        let opened = std::fs::File::open(file).and_then(|mut f| {
            f.seek(std::io::SeekFrom::Start(offset))?;
            Ok(f)
        });
        let f = opened.map_err(|source| GitError::Spawn {
            what: format!("git index-pack: opening {}", file.display()),
            source,
        })?;
        let args = ["index-pack", "--stdin", "--fix-thin", "--strict"];
        let out = self.output_with(&args, &[], Stdin::File(f)).await?;
        if out.status.success() {
            return Ok(());
        }
        Err(GitError::Failed {
            what: "git index-pack --strict".to_owned(),
            stderr: out.stderr,
        })
    }

    /// The paths `commit` adds or changes against `base` (trees included), as stored: what a
    /// checkout of it writes that `base`'s did not. Deeper than [`MAX_TREE_DEPTH`], git stops
    /// with a message [`is_too_deep`] recognises.
    pub async fn new_paths(&self, base: &CommitId, commit: &CommitId) -> Result<Vec<Vec<u8>>> {
        let depth = format!("core.maxTreeDepth={MAX_TREE_DEPTH}");
        let args = [
            "-c",
            depth.as_str(),
            "diff-tree",
            "-r",
            "-t",
            "-z",
            "--no-renames",
            "--name-only",
            "--diff-filter=d",
            base.as_str(),
            commit.as_str(),
        ];
        let out = self.output(&args, &[], None).await?;
        if !out.status.success() {
            return Err(GitError::Failed {
                what: "git diff-tree".to_owned(),
                stderr: out.stderr,
            });
        }
        Ok(out
            .stdout
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(<[u8]>::to_vec)
            .collect())
    }

    /// Lets `git gc --auto` tidy the repository (it does nothing below git's thresholds).
    pub async fn gc_auto(&self) -> Result<()> {
        self.run(&[
            "-c",
            "gc.autoPackLimit=10",
            "-c",
            "gc.autoDetach=false",
            "gc",
            "--auto",
            "--quiet",
        ])
        .await
        .map(drop)
    }

    /// The worktrees (including the main one) that have `branch` checked out.
    pub async fn worktrees_on(&self, branch: &BranchName) -> Result<Vec<PathBuf>> {
        let out = self.run(&["worktree", "list", "--porcelain"]).await?;
        let wanted = format!("branch {}", RefName::branch(branch));
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

    /// Forgets worktrees whose directories are gone (see [`WORKTREE_ADMIN`] when others
    /// may be created at the same time).
    pub async fn prune_worktrees(&self) -> Result<()> {
        self.run(&["worktree", "prune"]).await.map(drop)
    }

    /// Adds a detached worktree at `path` on `commit` (see [`WORKTREE_ADMIN`]).
    async fn worktree_add(&self, path: &Path, commit: &CommitId) -> Result<()> {
        // Prune and add touch the repository's `worktrees/` directory, which concurrent
        // prunes and adds trip over (one removes it as another creates its entry): one at a
        // time in this process. Creating a worktree is rare (a slot's first use), resets are not
        // serialised.
        let _one_at_a_time = WORKTREE_ADMIN.lock().await;
        self.prune_worktrees().await?;
        self.run(&[
            "worktree",
            "add",
            "--quiet",
            "--force",
            "--detach",
            utf8(path)?,
            commit.as_str(),
        ])
        .await
        .map(drop)
    }

    /// Commits everything the worktree at this directory holds (its changes, new files
    /// included) as one commit with `message`, amending `HEAD` when `amend`; for agents that
    /// leave their change uncommitted. Returns `false` when there was nothing to commit.
    pub async fn commit_all(&self, message: &str, amend: bool) -> Result<bool> {
        self.run(&["add", "--all"]).await?;
        let staged = self
            .output(&["diff", "--cached", "--quiet"], &[], None)
            .await?;
        if staged.status.success() && !amend {
            return Ok(false);
        }
        let mut args = vec![
            "-c",
            "user.name=pipeline-runner",
            "-c",
            "user.email=pipeline-runner@localhost",
            "commit",
            "--quiet",
            "--no-verify",
            "--allow-empty",
            "--file=-",
        ];
        if amend {
            args.push("--amend");
        }
        self.run_with(&args, &[], Some(message.as_bytes()))
            .await
            .map(|_| true)
    }

    /// Whether `remote` is a remote of the repository.
    pub async fn has_remote(&self, remote: &RemoteName) -> bool {
        self.run(&["remote", "get-url", "--end-of-options", remote.as_str()])
            .await
            .is_ok()
    }

    /// Fetches `branch` from `remote` into `refs/pipeline/remote/<branch>`; returns its commit.
    pub async fn fetch_branch(&self, remote: &RemoteName, branch: &BranchName) -> Result<CommitId> {
        let copy = RefName::remote_copy(branch);
        let spec = format!("+{}:{copy}", RefName::branch(branch));
        self.run(&[
            "fetch",
            "--quiet",
            "--no-tags",
            "--end-of-options",
            remote.as_str(),
            &spec,
        ])
        .await?;
        self.resolve(&copy).await?.ok_or_else(|| {
            GitError::Unexpected(format!("{copy} is missing after fetching {remote:?}"))
        })
    }

    /// Points `remote`'s ref `name` at `commit` (pushing its objects). For the server's own
    /// refs (`refs/pipeline/…`), never a branch: it forces.
    pub async fn push_ref(
        &self,
        remote: &RemoteName,
        name: &RefName,
        commit: &CommitId,
    ) -> Result<()> {
        let spec = format!("+{commit}:{name}");
        self.run(&[
            "push",
            "--quiet",
            "--no-verify",
            "--end-of-options",
            remote.as_str(),
            &spec,
        ])
        .await?;
        Ok(())
    }

    /// The refs under `prefix` (`refs/pipeline/tasks/`) on `remote`, with their commits
    /// (`git ls-remote`).
    pub async fn remote_refs_under(
        &self,
        remote: &RemoteName,
        prefix: &str,
    ) -> Result<Vec<(String, CommitId)>> {
        let pattern = format!("{prefix}*");
        let out = self
            .run(&[
                "ls-remote",
                "--refs",
                "--end-of-options",
                remote.as_str(),
                &pattern,
            ])
            .await?;
        ref_lines(&out, '\t', "ls-remote")
    }

    /// Deletes `names` (the server's own refs, `refs/pipeline/…`) from `remote`, in pushes of
    /// [`REFS_PER_PUSH`] refs.
    pub async fn delete_remote_refs(&self, remote: &RemoteName, names: &[String]) -> Result<()> {
        for chunk in names.chunks(REFS_PER_PUSH) {
            let specs: Vec<String> = chunk.iter().map(|n| format!(":{n}")).collect();
            let mut args = vec![
                "push",
                "--quiet",
                "--no-verify",
                "--end-of-options",
                remote.as_str(),
            ];
            args.extend(specs.iter().map(String::as_str));
            self.run(&args).await?;
        }
        Ok(())
    }

    /// Fetches every ref under `prefix` (`refs/pipeline/tasks/`) from `remote` into the same
    /// names here (forced: they are the server's own).
    pub async fn fetch_prefix(&self, remote: &RemoteName, prefix: &str) -> Result<()> {
        let spec = format!("+{prefix}*:{prefix}*");
        self.run(&[
            "fetch",
            "--quiet",
            "--no-tags",
            "--end-of-options",
            remote.as_str(),
            &spec,
        ])
        .await?;
        Ok(())
    }

    /// Pushes `new` to `remote`'s `branch` only if it is still at `expected`; false when the
    /// remote refused (it moved). Never forces.
    pub async fn push_with_lease(
        &self,
        remote: &RemoteName,
        branch: &BranchName,
        new: &CommitId,
        expected: &CommitId,
    ) -> Result<bool> {
        let lease = format!("--force-with-lease={}:{expected}", RefName::branch(branch));
        let spec = format!("{new}:{}", RefName::branch(branch));
        let out = self
            .output(
                &[
                    "push",
                    "--quiet",
                    "--porcelain",
                    &lease,
                    "--end-of-options",
                    remote.as_str(),
                    &spec,
                ],
                &[],
                None,
            )
            .await?;
        if out.status.success() {
            return Ok(true);
        }
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), out.stderr);
        if text.contains("stale info") || text.contains("rejected") || text.contains("fetch first")
        {
            return Ok(false);
        }
        Err(GitError::Failed {
            what: format!("git push {}", remote.as_str()),
            stderr: text.trim().to_owned(),
        })
    }

    /// The `Task-Id:` trailer values of the commits in `tip`'s history, or in `since..tip`.
    pub async fn task_trailers(
        &self,
        since: Option<&CommitId>,
        tip: &CommitId,
    ) -> Result<Vec<String>> {
        let range = match since {
            Some(since) => format!("{since}..{tip}"),
            None => tip.to_string(),
        };
        let out = self
            .run(&[
                "log",
                "--format=%(trailers:key=Task-Id,valueonly,separator=%x2C)",
                &range,
                "--",
            ])
            .await?;
        Ok(out
            .lines()
            .flat_map(|l| l.split(','))
            .map(|id| id.trim().to_owned())
            .filter(|id| !id.is_empty())
            .collect())
    }

    /// A commit of `tip`'s history whose message has a `Task-Id:` line, if any.
    pub async fn any_task_trailer(&self, tip: &CommitId) -> Result<Option<CommitId>> {
        let out = self
            .run(&[
                "log",
                "-n",
                "1",
                "--format=%H",
                "-i",
                "--grep=^Task-Id:",
                tip.as_str(),
                "--",
            ])
            .await?;
        Ok(out
            .lines()
            .next()
            .and_then(|l| CommitId::parse(l.trim()).ok()))
    }
}

/// A linked worktree whose files, and for a runner's slot its own git state (its `HEAD`, index
/// and new objects), a sandboxed process may have written. Its git runs with every directory
/// named (`GIT_DIR`, `GIT_COMMON_DIR`, `GIT_WORK_TREE`), never found through the worktree's
/// `.git` file, so nothing written there (a `.git` naming another repository, one with hooks or
/// `core.fsmonitor`) runs as this process: the configuration and hooks in use are the
/// repository's, which the sandbox keeps read-only.
///
/// A runner's slot is the worktree of a small repository of its own ([`Worktree::own`]) that
/// borrows the mirror's objects (alternates): the agent's commits go to that repository's
/// objects, which no other slot reads, and the mirror never sees a slot's `HEAD` on a commit
/// it lacks (which would break its own commands).
#[derive(Clone, Debug)]
pub struct Worktree {
    /// The files.
    pub path: PathBuf,
    /// The worktree's own git directory, `<common>/worktrees/<name of path>`.
    pub admin: PathBuf,
    /// The repository (its objects, refs, configuration and hooks).
    pub common: PathBuf,
    /// For a repository of the worktree's own: the object directory it borrows from. Its own
    /// objects (its agent's) are thrown away by [`Worktree::prepare`].
    pub borrows: Option<PathBuf>,
    timeout: Duration,
}

impl Worktree {
    /// The worktree at `path` of the repository whose common directory is `common`.
    pub fn new(common: &Path, path: &Path) -> Self {
        let name = path.file_name().unwrap_or_default();
        Self {
            path: path.to_path_buf(),
            admin: common.join("worktrees").join(name),
            common: common.to_path_buf(),
            borrows: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The worktree at `path` of a bare repository of its own at `repo` (made by
    /// [`Worktree::prepare`]), which borrows the objects of `objects`.
    pub fn own(repo: &Path, path: &Path, objects: &Path) -> Self {
        Self {
            borrows: Some(objects.to_path_buf()),
            ..Self::new(repo, path)
        }
    }

    /// The same worktree with another time limit per command.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Git in this worktree, with its directories named.
    pub fn git(&self) -> Git {
        Git {
            dir: self.path.clone(),
            timeout: self.timeout,
            env: vec![
                ("GIT_DIR", self.admin.clone()),
                ("GIT_COMMON_DIR", self.common.clone()),
                ("GIT_WORK_TREE", self.path.clone()),
            ],
        }
    }

    /// The repository's object directory.
    pub fn objects(&self) -> PathBuf {
        self.common.join("objects")
    }

    /// Rewrites what the repository's objects borrow (a process in the worktree may have
    /// pointed its alternates anywhere), before this process reads its objects.
    ///
    /// It also removes what a process may have left at the end of the repository's
    /// `packed-refs` link (see [`Worktree::prepare`]): this process's git never reads a
    /// `packed-refs` written in the sandbox.
    pub fn restore_alternates(&self) -> std::io::Result<()> {
        let Some(borrows) = &self.borrows else {
            return Ok(());
        };
        for name in [PACKED_REFS, "packed-refs.lock"] {
            let path = self.admin.join(name);
            if std::fs::symlink_metadata(&path).is_ok() {
                remove_any(&path)?;
            }
        }
        let info = self.objects().join("info");
        std::fs::create_dir_all(&info)?;
        let _ = std::fs::remove_file(info.join("http-alternates"));
        let alternates = info.join("alternates");
        if std::fs::symlink_metadata(&alternates).is_ok_and(|m| !m.is_file()) {
            remove_any(&alternates)?;
        }
        std::fs::write(alternates, format!("{}\n", borrows.display()))
    }

    /// Puts the worktree on `commit` (detached), clean: reset if it exists, created if not
    /// (from `repo`, or for a repository of its own, from that repository, made first),
    /// recreated if it is damaged. What a process left of the worktree's own git state (its
    /// `.git` file, anything but the index in its git directory, its own objects) is thrown
    /// away first.
    pub async fn prepare(&self, repo: &Git, commit: &CommitId) -> Result<()> {
        let io = |what: &str, e: std::io::Error| {
            GitError::Unexpected(format!("cannot {what} for {}: {e}", self.path.display()))
        };
        let own = Git::at(&self.common).with_timeout(self.timeout);
        let repo = if self.borrows.is_some() {
            if !self.common.join("HEAD").is_file() {
                std::fs::create_dir_all(&self.common)
                    .map_err(|e| io("create the repository", e))?;
                own.init_bare().await?;
            }
            self.link_packed_refs()
                .map_err(|e| io("link packed-refs", e))?;
            &own
        } else {
            repo
        };
        if self.admin.join("HEAD").is_file() && self.path.is_dir() {
            let reset = async {
                self.scrub(commit)?;
                let git = self.git();
                git.run(&[
                    "checkout",
                    "--quiet",
                    "--force",
                    "--detach",
                    commit.as_str(),
                ])
                .await?;
                git.run(&["clean", "-ffdxq"]).await?;
                Ok::<(), GitError>(())
            };
            match reset.await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(worktree = %self.path.display(), error = %e, "recreating a damaged worktree")
                }
            }
        }
        for dir in [&self.path, &self.admin] {
            if std::fs::symlink_metadata(dir).is_ok() {
                remove_any(dir).map_err(|e| io("remove the old worktree", e))?;
            }
        }
        self.reset_objects()
            .map_err(|e| io("reset the objects", e))?;
        repo.worktree_add(&self.path, commit).await?;
        // Git names the worktree's directory after the path's last part; another name (one
        // taken) would leave this worktree's git pointed at someone else's.
        let gitdir = std::fs::read_to_string(self.admin.join("gitdir")).unwrap_or_default();
        if Path::new(gitdir.trim()) != self.path.join(".git") {
            return Err(GitError::Unexpected(format!(
                "git did not register the worktree {} as {}",
                self.path.display(),
                self.admin.display()
            )));
        }
        Ok(())
    }

    /// For a repository of the worktree's own: makes its `packed-refs` a link to the same
    /// name in the worktree's git directory (where nothing is). Git locks `packed-refs` to
    /// delete any ref, and `git commit` deletes the worktree's `AUTO_MERGE` every time; the
    /// repository's directory is read-only in the sandbox (its configuration and hooks run as
    /// this process), so every commit logged "Unable to create …/packed-refs.lock: Permission
    /// denied". Git takes the lock beside the link's target, in the worktree's git directory,
    /// which its agent writes anyway; nothing is ever packed there, and what a process leaves
    /// there is removed before this process's git runs ([`Worktree::restore_alternates`]).
    fn link_packed_refs(&self) -> std::io::Result<()> {
        let link = self.common.join(PACKED_REFS);
        if std::fs::symlink_metadata(&link).is_ok() {
            return Ok(());
        }
        let name = self.admin.file_name().unwrap_or_default();
        let target = Path::new("worktrees").join(name).join(PACKED_REFS);
        std::os::unix::fs::symlink(target, link)
    }

    /// Rewrites the worktree's git state from what this process knows: `.git` naming its git
    /// directory; that directory holding `HEAD` (at `commit`), the way back to the repository
    /// and to the worktree, and the index (kept: a cache of file states), nothing else; for a
    /// repository of its own, its objects emptied and its alternates restored.
    fn scrub(&self, commit: &CommitId) -> Result<()> {
        let io = |what: &str, e: std::io::Error| {
            GitError::Unexpected(format!(
                "cannot reset the git state of {} ({what}): {e}",
                self.path.display()
            ))
        };
        let dot_git = self.path.join(".git");
        if std::fs::symlink_metadata(&dot_git).is_ok() {
            remove_any(&dot_git).map_err(|e| io(".git", e))?;
        }
        std::fs::write(&dot_git, format!("gitdir: {}\n", self.admin.display()))
            .map_err(|e| io(".git", e))?;
        for entry in std::fs::read_dir(&self.admin)
            .map_err(|e| io("its git directory", e))?
            .flatten()
        {
            let keep = entry.file_name() == "index" && entry.file_type().is_ok_and(|t| t.is_file());
            if !keep {
                remove_any(&entry.path()).map_err(|e| io("its git directory", e))?;
            }
        }
        for (file, content) in [
            ("HEAD", format!("{commit}\n")),
            ("commondir", "../..\n".to_owned()),
            ("gitdir", format!("{}\n", dot_git.display())),
        ] {
            std::fs::write(self.admin.join(file), content).map_err(|e| io(file, e))?;
        }
        self.reset_objects().map_err(|e| io("objects", e))
    }

    /// For a repository of the worktree's own: empties its object directory (the agent's
    /// commits of an earlier lease went to the server; the borrowed objects stay where they
    /// are) and restores its alternates.
    fn reset_objects(&self) -> std::io::Result<()> {
        if self.borrows.is_none() {
            return Ok(());
        }
        let objects = self.objects();
        if std::fs::symlink_metadata(&objects).is_ok() {
            remove_any(&objects)?;
        }
        std::fs::create_dir_all(objects.join("pack"))?;
        self.restore_alternates()
    }
}

/// The file git keeps packed refs in, in a repository's common directory.
const PACKED_REFS: &str = "packed-refs";

/// Removes a file, a link or a directory tree (a link is removed, not followed).
fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// A path on a git command line must be text.
fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| GitError::Unexpected(format!("{} is not UTF-8", path.display())))
}

/// A running `git cat-file --batch`: write an object ID, read its header and content.
#[derive(Debug)]
pub struct ObjectReader {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    timeout: Duration,
}

impl ObjectReader {
    /// The commit `id`, or `None` if the repository has no such commit.
    pub async fn commit(&mut self, id: &CommitId) -> Result<Option<CommitInfo>> {
        let raw = tokio::time::timeout(self.timeout, self.read(id.as_str()))
            .await
            .map_err(|_| GitError::TimedOut {
                what: "git cat-file --batch".to_owned(),
                after: self.timeout,
            })??;
        match raw {
            None => Ok(None),
            Some(raw) => CommitInfo::parse(&raw).map(Some).ok_or_else(|| {
                GitError::Unexpected(format!("git cat-file: {id} is not a readable commit"))
            }),
        }
    }

    /// The file at `path` in `commit`'s tree, if it is there (as a file). `path` is a constant
    /// of the program (never raw input), so it cannot name anything but a path.
    pub async fn file(&mut self, commit: &CommitId, path: &'static str) -> Result<Option<Vec<u8>>> {
        if path.contains(['\n', '\0']) || path.starts_with('-') {
            return Err(GitError::Unexpected(format!("not a path: {path:?}")));
        }
        let spec = format!("{commit}:{path}");
        let raw = tokio::time::timeout(self.timeout, self.read_object(&spec, "blob"))
            .await
            .map_err(|_| GitError::TimedOut {
                what: "git cat-file --batch".to_owned(),
                after: self.timeout,
            })??;
        Ok(raw)
    }

    async fn read(&mut self, id: &str) -> Result<Option<String>> {
        Ok(self
            .read_object(id, "commit")
            .await?
            .map(|raw| String::from_utf8_lossy(&raw).into_owned()))
    }

    /// Reads the object `spec` names; `None` if it is missing or not of `kind`.
    async fn read_object(&mut self, spec: &str, kind: &str) -> Result<Option<Vec<u8>>> {
        let io = |e: std::io::Error| GitError::Unexpected(format!("git cat-file --batch: {e}"));
        self.stdin
            .write_all(format!("{spec}\n").as_bytes())
            .await
            .map_err(io)?;
        self.stdin.flush().await.map_err(io)?;
        let mut header = String::new();
        if self.stdout.read_line(&mut header).await.map_err(io)? == 0 {
            return Err(GitError::Unexpected("git cat-file --batch exited".into()));
        }
        let fields: Vec<&str> = header.split_whitespace().collect();
        match fields.as_slice() {
            [_, "missing"] | [_, "ambiguous"] => Ok(None),
            [_, found, size] => {
                let size: usize = size.parse().map_err(|_| {
                    GitError::Unexpected(format!("git cat-file: bad header {header:?}"))
                })?;
                let mut content = vec![0; size + 1];
                self.stdout.read_exact(&mut content).await.map_err(io)?;
                content.pop();
                if *found != kind {
                    return Ok(None);
                }
                Ok(Some(content))
            }
            _ => Err(GitError::Unexpected(format!(
                "git cat-file: bad header {header:?}"
            ))),
        }
    }
}

/// Reads a ref's object ID from the files backend, without git: the loose ref file if there is
/// one, else its line in `packed-refs`. `None` when neither holds a plain object ID for it.
pub fn read_ref_file(common_dir: &Path, name: &RefName) -> Option<CommitId> {
    match std::fs::read_to_string(common_dir.join(name.as_str())) {
        Ok(content) => return CommitId::parse(content.trim()).ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return None,
    }
    let packed = std::fs::read_to_string(common_dir.join("packed-refs")).ok()?;
    packed.lines().find_map(|line| {
        let (sha, refname) = line.split_once(' ')?;
        (refname == name.as_str())
            .then(|| CommitId::parse(sha).ok())
            .flatten()
    })
}

/// Whether the files backend holds refs here at all (so that a ref absent from it is absent).
pub fn has_ref_files(common_dir: &Path) -> bool {
    common_dir.join("refs").is_dir()
}

/// The refs a git command listed, a line each (`<sha><sep><refname>`): their names and
/// commits.
fn ref_lines(out: &str, sep: char, command: &str) -> Result<Vec<(String, CommitId)>, GitError> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (sha, name) = l
                .split_once(sep)
                .ok_or_else(|| GitError::Unexpected(format!("git {command}: {l:?}")))?;
            Ok((name.to_owned(), CommitId::parse(sha)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testgit::{commit, git as sh_git};

    /// Slots of one runner (or the server's integration slots) create their worktrees at
    /// once: one's `worktree prune` removed the empty `worktrees/` directory while another's
    /// `worktree add` was creating its entry in it ("could not create directory of
    /// 'worktrees/0'"), an infrastructure failure that cost a lease.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn worktrees_created_at_once_do_not_trip_over_each_other() {
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path().join("repo");
        std::fs::create_dir(&d).expect("repo dir");
        sh_git(&d, &["init", "-q", "-b", "main"]);
        let root = commit(&d, "a", "root");
        let git = Git::at(&d);
        for round in 0..15 {
            let paths: Vec<PathBuf> = (0..6)
                .map(|i| dir.path().join(format!("wt-{round}-{i}")))
                .collect();
            let adds = paths.iter().map(|p| {
                let (git, root) = (git.clone(), root.clone());
                let wt = Worktree::new(&d.join(".git"), p);
                tokio::spawn(async move { wt.prepare(&git, &root).await })
            });
            for add in adds.collect::<Vec<_>>() {
                add.await.expect("join").expect("worktree created");
            }
            // Gone again, so that the next round's prunes empty `worktrees/`.
            for p in &paths {
                std::fs::remove_dir_all(p).expect("remove");
            }
        }
    }

    #[tokio::test]
    async fn typed_operations_on_a_real_repository() {
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path();
        sh_git(d, &["init", "-q", "-b", "main"]);
        let root = commit(d, "a", "root");
        let one = commit(d, "b", "one\n\nTask-Id: t-1");
        let git = Git::at(d);
        assert!(git.is_repository().await);
        let main = RefName::branch(&BranchName::parse("main").expect("branch"));
        assert_eq!(
            git.resolve(&main).await.expect("resolve"),
            Some(one.clone())
        );
        assert!(git.is_ancestor(&root, &one).await.expect("ancestor"));
        assert!(!git.is_ancestor(&one, &root).await.expect("ancestor"));
        assert_eq!(git.count_between(&root, &one).await.expect("count"), 1);
        let mut reader = git.object_reader().expect("reader");
        let info = reader.commit(&one).await.expect("read").expect("present");
        assert_eq!(info.parents, std::slice::from_ref(&root));
        assert_eq!(info.author.name, "T");
        let missing = CommitId::parse(&"0".repeat(40)).expect("id");
        assert_eq!(reader.commit(&missing).await.expect("read"), None);
        // A ref moves only from where it is.
        let task = TaskId::parse("t-1").expect("id");
        let landed = RefName::landed(&task);
        git.update_ref(&landed, &root).await.expect("update");
        assert!(
            !git.compare_and_swap(&landed, &one, &one)
                .await
                .expect("cas")
        );
        assert!(
            git.compare_and_swap(&landed, &one, &root)
                .await
                .expect("cas")
        );
        let common = git.common_dir().await.expect("common dir");
        assert_eq!(read_ref_file(&common, &landed), Some(one.clone()));
        assert_eq!(
            git.refs_under(RefPrefix::Landed).await.expect("refs"),
            [("refs/pipeline/landed/t-1".to_owned(), one.clone())]
        );
        assert_eq!(git.task_trailers(None, &one).await.expect("log"), ["t-1"]);
        assert_eq!(
            git.any_task_trailer(&one).await.expect("log"),
            Some(one.clone())
        );
        // A merge of trees, clean.
        let info = reader.commit(&one).await.expect("read").expect("present");
        let merged = git.merge_trees(&root, &one, &one).await.expect("merge");
        assert_eq!(merged, Merged::Clean(info.tree.clone()));
        let made = git
            .commit_tree(&info.tree, &one, &info.author, "again\n")
            .await
            .expect("commit");
        assert!(git.is_ancestor(&one, &made).await.expect("ancestor"));
    }

    #[tokio::test]
    async fn a_commit_is_shown_whole_or_cut_at_the_bound() {
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path();
        sh_git(d, &["init", "-q", "-b", "main"]);
        commit(d, "a", "root");
        std::fs::write(d.join("big"), "line\n".repeat(50_000)).expect("write");
        sh_git(d, &["add", "big"]);
        sh_git(d, &["commit", "-q", "-m", "Add big\n\nTask-Id: t-1"]);
        let big = CommitId::parse(&sh_git(d, &["rev-parse", "HEAD"])).expect("id");
        let git = Git::at(d);
        let (whole, cut) = git.show_commit(&big, 1 << 20).await.expect("show");
        assert!(!cut);
        assert!(
            whole.starts_with(&format!("commit {big}\nAuthor: T")),
            "{whole:.200}"
        );
        assert!(
            whole.contains("    Add big") && whole.contains(" big | 50000 +"),
            "{whole:.400}"
        );
        assert!(whole.contains("+++ b/big\n@@ -0,0 +1,50000 @@\n+line\n"));
        let (part, cut) = git.show_commit(&big, 1000).await.expect("show");
        assert!(cut);
        assert_eq!(part.len(), 1000);
        assert!(whole.starts_with(&part));
        let missing = CommitId::parse(&"0".repeat(40)).expect("id");
        assert!(git.show_commit(&missing, 1000).await.is_err());
    }

    #[test]
    fn refs_come_only_from_validated_parts() {
        let t = TaskId::parse("t-9").expect("id");
        assert_eq!(
            RefName::task_patch(&t, 2).as_str(),
            "refs/pipeline/tasks/t-9/2"
        );
        assert_eq!(
            RefName::fetch(&t, FetchRef::Previous).as_str(),
            "refs/pipeline/fetch/t-9/previous"
        );
        for bad in [
            "", "-x", "a..b", "a/.b", "a.lock", "a b", "x@{1}", "/a", "a/",
        ] {
            assert!(BranchName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(BranchName::parse("release/1.2").is_ok());
        assert!(RemoteName::parse("--upload-pack=x").is_err());
    }

    #[test]
    fn resource_failures_are_the_machines() {
        let failed = |stderr: &str| GitError::Failed {
            what: "git x".into(),
            stderr: stderr.into(),
        };
        assert!(failed("fatal: unable to create pipe: Too many open files").is_infrastructure());
        assert!(failed("error: No space left on device").is_infrastructure());
        assert!(!failed("fatal: bad object abc").is_infrastructure());
        assert!(
            GitError::Spawn {
                what: "git".into(),
                source: std::io::Error::other("x")
            }
            .is_infrastructure()
        );
    }
}
