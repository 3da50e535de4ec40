//! The one way the server runs git: a small typed wrapper of the `git` CLI with a timeout, a
//! fixed environment (no prompts, C locale, no user config), and arguments built only from
//! validated values. Later issues (bundles, integration) add their operations here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

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

/// What a bundle's header says: the commits it needs and the commits of its refs.
#[derive(Debug, Default)]
struct BundleHeader {
    prerequisites: Vec<String>,
    refs: Vec<String>,
}

/// Reads a bundle's header (v2 or v3) without git: the signature line, capabilities,
/// prerequisites (`-<id> …`) and refs (`<id> <name>`), up to the blank line before the pack.
async fn read_bundle_header(path: &Path) -> std::result::Result<BundleHeader, String> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| e.to_string())?;
    // The header is text; a real one is far smaller than this.
    let mut reader = BufReader::new(file).take(1 << 20);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    if !matches!(line.as_str(), "# v2 git bundle\n" | "# v3 git bundle\n") {
        return Err("it does not start with a git bundle signature".to_owned());
    }
    let mut header = BundleHeader::default();
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("its header does not end".to_owned());
        }
        let l = line.trim_end_matches('\n');
        if l.is_empty() {
            return Ok(header);
        }
        if l.starts_with('@') {
            continue;
        }
        if let Some(rest) = l.strip_prefix('-') {
            let id = rest.split(' ').next().unwrap_or_default();
            check_sha(id).map_err(|_| format!("bad prerequisite line {l:?}"))?;
            header.prerequisites.push(id.to_owned());
        } else {
            let id = l.split(' ').next().unwrap_or_default();
            check_sha(id).map_err(|_| format!("bad ref line {l:?}"))?;
            header.refs.push(id.to_owned());
        }
    }
}

/// A commit as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitInfo {
    pub tree: String,
    pub parents: Vec<String>,
    pub author_name: String,
    pub author_email: String,
    /// `<unix seconds> <zone>`, as git stores it.
    pub author_date: String,
    pub message: String,
}

impl CommitInfo {
    /// Parses a raw commit object.
    fn parse(raw: &str) -> Option<Self> {
        let (headers, message) = raw.split_once("\n\n").unwrap_or((raw, ""));
        let mut info = Self {
            tree: String::new(),
            parents: Vec::new(),
            author_name: String::new(),
            author_email: String::new(),
            author_date: String::new(),
            message: message.to_owned(),
        };
        for line in headers.lines() {
            if let Some(tree) = line.strip_prefix("tree ") {
                info.tree = tree.to_owned();
            } else if let Some(parent) = line.strip_prefix("parent ") {
                info.parents.push(parent.to_owned());
            } else if let Some(author) = line.strip_prefix("author ") {
                let (name, rest) = author.split_once(" <")?;
                let (email, date) = rest.rsplit_once("> ")?;
                info.author_name = name.to_owned();
                info.author_email = email.to_owned();
                info.author_date = date.to_owned();
            }
        }
        (!info.tree.is_empty()).then_some(info)
    }

    /// The values of the `Task-Id` trailers in the message's last paragraph.
    pub fn task_ids(&self) -> Vec<String> {
        let last = self
            .message
            .trim_end()
            .rsplit("\n\n")
            .next()
            .unwrap_or_default();
        last.lines()
            .filter_map(|l| {
                let (key, value) = l.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case("Task-Id")
                    .then(|| value.trim().to_owned())
            })
            .collect()
    }
}

/// A running `git cat-file --batch`: write an object ID, read its header and content.
#[derive(Debug)]
struct CatFile {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// A commit of the base's history: its first parent and the task IDs its message names.
type HistoryEntry = (Option<String>, Vec<String>);

/// How many commits of the base's history are remembered before the memory starts over.
const HISTORY_CAP: usize = 100_000;
/// How many commits a search for a landed task reads before it asks `git log` instead.
const HISTORY_WALK: usize = 256;

/// Every received bundle adds a pack, and every git command slows down with the number of
/// packs; after this many, `git gc --auto` runs in the background (it repacks once git's own
/// thresholds are passed and does nothing otherwise).
const PACKS_BEFORE_GC: u32 = 20;

/// How long one git command may run before it is killed.
const GIT_TIMEOUT: Duration = Duration::from_secs(120);

/// A git repository the server works on.
#[derive(Clone, Debug)]
pub struct Repo {
    path: PathBuf,
    /// One long-lived `git cat-file --batch` that reads commits for every caller.
    objects: std::sync::Arc<tokio::sync::Mutex<Option<CatFile>>>,
    /// What is known of the base's history: commit → (first parent, its `Task-Id`s), so that
    /// "is this task on the base already" rarely reads anything.
    history: std::sync::Arc<std::sync::Mutex<HashMap<String, HistoryEntry>>>,
    /// Bounds how many bundles are unbundled at once (one per core): a burst of results then
    /// queues instead of thrashing the machine with git processes.
    unbundles: std::sync::Arc<tokio::sync::Semaphore>,
    /// Packs added by unbundling since git last tidied the repository.
    new_packs: std::sync::Arc<std::sync::atomic::AtomicU32>,
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
            objects: Default::default(),
            history: Default::default(),
            new_packs: Default::default(),
            unbundles: std::sync::Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
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

    /// Reads a commit through the long-lived `git cat-file --batch` (started on first use,
    /// restarted if it died): no process is spawned per read.
    pub async fn commit_info(&self, commit: &str) -> Result<CommitInfo> {
        check_sha(commit)?;
        let mut slot = self.objects.lock().await;
        let raw = match self.cat(&mut slot, commit).await {
            Ok(raw) => raw,
            Err(first) => {
                // The process may have died: start a fresh one once.
                *slot = None;
                self.cat(&mut slot, commit).await.map_err(|_| first)?
            }
        };
        drop(slot);
        let raw = raw
            .ok_or_else(|| Error::NotFound(format!("commit {commit} is not in the repository")))?;
        CommitInfo::parse(&raw).ok_or_else(|| {
            Error::Internal(format!("git cat-file: {commit} is not a readable commit"))
        })
    }

    async fn cat(&self, slot: &mut Option<CatFile>, commit: &str) -> Result<Option<String>> {
        let io = |e: std::io::Error| Error::Internal(format!("git cat-file --batch: {e}"));
        if slot.is_none() {
            let mut cmd = self.command();
            cmd.args(["cat-file", "--batch"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let mut child = cmd.spawn().map_err(io)?;
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| Error::Internal("git cat-file: no stdin".into()))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| Error::Internal("git cat-file: no stdout".into()))?;
            *slot = Some(CatFile {
                _child: child,
                stdin,
                stdout: BufReader::new(stdout),
            });
        }
        let proc = slot
            .as_mut()
            .ok_or_else(|| Error::Internal("git cat-file is not running".into()))?;
        let exchange = async {
            proc.stdin
                .write_all(format!("{commit}\n").as_bytes())
                .await
                .map_err(io)?;
            proc.stdin.flush().await.map_err(io)?;
            let mut header = String::new();
            if proc.stdout.read_line(&mut header).await.map_err(io)? == 0 {
                return Err(Error::Internal("git cat-file --batch exited".into()));
            }
            let fields: Vec<&str> = header.split_whitespace().collect();
            match fields.as_slice() {
                [_, "missing"] => Ok(None),
                [_, kind, size] => {
                    let size: usize = size.parse().map_err(|_| {
                        Error::Internal(format!("git cat-file: bad header {header:?}"))
                    })?;
                    let mut content = vec![0; size + 1];
                    proc.stdout.read_exact(&mut content).await.map_err(io)?;
                    content.pop();
                    if *kind != "commit" {
                        return Ok(None);
                    }
                    Ok(Some(String::from_utf8_lossy(&content).into_owned()))
                }
                _ => Err(Error::Internal(format!(
                    "git cat-file: bad header {header:?}"
                ))),
            }
        };
        tokio::time::timeout(GIT_TIMEOUT, exchange)
            .await
            .map_err(|_| Error::Internal("git cat-file --batch: timed out".into()))?
    }

    /// The parents of a commit.
    pub async fn parents(&self, commit: &str) -> Result<Vec<String>> {
        Ok(self.commit_info(commit).await?.parents)
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

    /// Counts a pack added; every [`PACKS_BEFORE_GC`] packs, lets `git gc --auto` tidy the
    /// repository in the background, off every request's path.
    fn pack_added(&self) {
        use std::sync::atomic::Ordering;
        if self.new_packs.fetch_add(1, Ordering::Relaxed) + 1 < PACKS_BEFORE_GC {
            return;
        }
        self.new_packs.store(0, Ordering::Relaxed);
        let repo = self.clone();
        tokio::spawn(async move {
            let gc = [
                "-c",
                "gc.autoPackLimit=10",
                "-c",
                "gc.autoDetach=false",
                "gc",
                "--auto",
                "--quiet",
            ];
            if let Err(e) = repo.run(&gc).await {
                tracing::warn!(error = %e, "git gc --auto failed");
            }
        });
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
        let header = match read_bundle_header(path).await {
            Ok(header) => header,
            Err(why) => return refuse(format!("not a valid bundle: {why}")),
        };
        if header.refs.len() != 1 {
            return refuse(format!(
                "the bundle holds {} refs; send exactly one",
                header.refs.len()
            ));
        }
        let head = header.refs[0].as_str();
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
        // Unbundling checks the prerequisites are present and indexes the pack.
        let permit = self.unbundles.acquire().await;
        let unbundled = self.run(&["bundle", "unbundle", file]).await;
        drop(permit);
        if let Err(e) = unbundled {
            return refuse(format!("not a valid bundle on top of the base: {e}"));
        }
        self.pack_added();
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
        Ok(self.commit_info(commit).await?.tree)
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
    /// is recognised. The base's first-parent history is walked from memory, reading only the
    /// commits not seen before; a merge, a walk that does not reach `since`, or a long unread
    /// stretch is answered by `git log` instead.
    pub async fn find_task_commit(
        &self,
        task: &str,
        since: &str,
        tip: &str,
    ) -> Result<Option<String>> {
        check_sha(since)?;
        check_sha(tip)?;
        let mut at = tip.to_owned();
        let mut read = 0;
        while at != since {
            let known = self.remembered(&at);
            let (parent, ids) = match known {
                Some(entry) => entry,
                None if read < HISTORY_WALK => {
                    read += 1;
                    let info = self.commit_info(&at).await?;
                    if info.parents.len() != 1 {
                        return self.find_task_commit_by_log(task, since, tip).await;
                    }
                    let entry = (info.parents.first().cloned(), info.task_ids());
                    self.remember(&at, entry.clone());
                    entry
                }
                None => return self.find_task_commit_by_log(task, since, tip).await,
            };
            if ids.iter().any(|id| id == task) {
                return Ok(Some(at));
            }
            match parent {
                Some(p) => at = p,
                None => return self.find_task_commit_by_log(task, since, tip).await,
            }
        }
        Ok(None)
    }

    fn remembered(&self, commit: &str) -> Option<HistoryEntry> {
        let history = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        history.get(commit).cloned()
    }

    /// Remembers a commit of the base's history (its first parent and task IDs).
    pub fn remember(&self, commit: &str, entry: HistoryEntry) {
        let mut history = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if history.len() >= HISTORY_CAP {
            history.clear();
        }
        history.insert(commit.to_owned(), entry);
    }

    async fn find_task_commit_by_log(
        &self,
        task: &str,
        since: &str,
        tip: &str,
    ) -> Result<Option<String>> {
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
        let info = self.commit_info(original).await?;
        let (name, email) = (info.author_name.clone(), info.author_email.clone());
        let date = format!("@{}", info.author_date);
        let trailer = format!("Task-Id: {task}");
        // The agent usually wrote the trailer itself; git rewrites the message only otherwise.
        let message = if info.task_ids() == [task] {
            info.message.clone()
        } else {
            self.run_with_input(
                &[
                    "interpret-trailers",
                    "--if-exists",
                    "replace",
                    "--trailer",
                    &trailer,
                ],
                &info.message,
            )
            .await?
        };
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
        self.remember(&sha, (Some(parent.to_owned()), vec![task.to_owned()]));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=T", "-c", "user.email=t@example.invalid"])
            .args(args)
            .output()
            .expect("git");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn commit(dir: &Path, file: &str, message: &str) -> String {
        std::fs::write(dir.join(file), file).expect("write");
        git(dir, &["add", file]);
        git(dir, &["commit", "-q", "-m", message]);
        git(dir, &["rev-parse", "HEAD"])
    }

    #[tokio::test]
    async fn commits_are_read_through_one_cat_file_and_tasks_found_like_git_log() {
        let dir = tempfile::tempdir().expect("temp");
        let d = dir.path();
        git(d, &["init", "-q", "-b", "main"]);
        let root = commit(d, "a", "root");
        let one = commit(d, "b", "one\n\nTask-Id: t-1");
        let two = commit(d, "c", "two\n\nSigned-off-by: x\ntask-id: t-2");
        let repo = Repo::open(d).await.expect("open");
        let info = repo.commit_info(&two).await.expect("read");
        assert_eq!(info.parents, std::slice::from_ref(&one));
        assert_eq!(info.author_name, "T");
        assert_eq!(info.author_email, "t@example.invalid");
        assert_eq!(info.tree, git(d, &["rev-parse", "HEAD^{tree}"]));
        assert_eq!(info.task_ids(), ["t-2"]);
        assert_eq!(repo.tip("main").await.expect("tip"), two);
        for (task, want) in [("t-1", Some(&one)), ("t-2", Some(&two)), ("t-3", None)] {
            let walked = repo
                .find_task_commit(task, &root, &two)
                .await
                .expect("walk");
            let logged = repo
                .find_task_commit_by_log(task, &root, &two)
                .await
                .expect("log");
            assert_eq!(walked.as_ref(), want);
            assert_eq!(walked, logged);
        }
        // Not past `since`.
        assert_eq!(
            repo.find_task_commit("t-1", &one, &two)
                .await
                .expect("walk"),
            None
        );
        let missing = "0".repeat(40);
        assert!(matches!(
            repo.commit_info(&missing).await,
            Err(Error::NotFound(_))
        ));
        // The reader survives a miss and still answers.
        assert_eq!(repo.parents(&one).await.expect("parents"), [root]);
    }

    #[tokio::test]
    async fn bundle_headers_are_read_without_git() {
        let dir = tempfile::tempdir().expect("temp");
        let d = dir.path();
        git(d, &["init", "-q", "-b", "main"]);
        let root = commit(d, "a", "root");
        let one = commit(d, "b", "one");
        let file = d.join("b.bundle");
        git(
            d,
            &[
                "bundle",
                "create",
                "-q",
                file.to_str().expect("utf-8"),
                "main",
                &format!("^{root}"),
            ],
        );
        let header = read_bundle_header(&file).await.expect("header");
        assert_eq!(header.prerequisites, [root]);
        assert_eq!(header.refs, [one]);
        std::fs::write(&file, "not a bundle\n").expect("write");
        assert!(read_bundle_header(&file).await.is_err());
        std::fs::write(&file, "# v2 git bundle\n").expect("write");
        assert!(read_bundle_header(&file).await.is_err());
    }
}
