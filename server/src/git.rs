//! The one way the server runs git: a small typed wrapper of the `git` CLI with a timeout, a
//! fixed environment (no prompts, C locale, no user config), and arguments built only from
//! validated values. Later issues (bundles, integration) add their operations here.

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
}

/// A running `git cat-file --batch`: write an object ID, read its header and content.
#[derive(Debug)]
struct CatFile {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

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
        let unbundled = self.output(&["bundle", "unbundle", file], &[], None).await;
        drop(permit);
        // A git that cannot run, or fails for want of a resource, says nothing of the bundle:
        // that is the server's trouble (Internal: the runner sends it again), never a refusal.
        let out = unbundled?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr.trim();
            if is_resource_failure(why) {
                return Err(Error::Internal(format!(
                    "git bundle unbundle failed on the server: {why}"
                )));
            }
            return refuse(format!("not a valid bundle on top of the base: {why}"));
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

    /// The commit `refs/pipeline/landed/<task>` names: the commit the integrator made for the
    /// task and moved (or tried to move) the base to. Read from the ref files (no process) when
    /// they hold it. This, not a trailer any commit could carry, is how the server knows a
    /// task's own commit.
    pub async fn landed_commit(&self, task: &str) -> Result<Option<String>> {
        let refname = format!("refs/pipeline/landed/{task}");
        if let Some(dir) = &self.refs_dir {
            if let Some(sha) = read_ref_files(dir, &refname) {
                return Ok(Some(sha));
            }
            // Neither a loose ref nor in packed-refs: there is none (for the files backend).
            if dir.join("packed-refs").exists() || dir.join("refs").is_dir() {
                return Ok(None);
            }
        }
        let out = self
            .output(
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    "--end-of-options",
                    &refname,
                ],
                &[],
                None,
            )
            .await?;
        let sha = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok((out.status.success() && check_sha(&sha).is_ok()).then_some(sha))
    }

    /// Whether the task's own landed commit is in the history of `tip`; the commit if so.
    pub async fn landed_on(&self, task: &str, tip: &str) -> Result<Option<String>> {
        match self.landed_commit(task).await? {
            Some(commit) if self.is_ancestor(&commit, tip).await? => Ok(Some(commit)),
            _ => Ok(None),
        }
    }

    /// Every task's landed commit, by task ID (one `for-each-ref`; for start-up checks).
    pub async fn landed_commits(&self) -> Result<std::collections::HashMap<String, String>> {
        let out = self
            .run(&[
                "for-each-ref",
                "--format=%(objectname) %(refname)",
                "refs/pipeline/landed/",
            ])
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let (sha, name) = l.split_once(' ')?;
                let task = name.strip_prefix("refs/pipeline/landed/")?;
                Some((task.to_owned(), sha.to_owned()))
            })
            .collect())
    }

    /// Records `commit` as the task's own landed commit (before the base is moved to it).
    pub async fn record_landing(&self, task: &str, commit: &str) -> Result<()> {
        self.update_ref(&format!("refs/pipeline/landed/{task}"), commit)
            .await
    }

    /// Signs of an earlier pipeline in the repository, for a server starting on an empty
    /// database: refs under `refs/pipeline/`, or a `Task-Id:` trailer on `branch`. Says which.
    pub async fn pipeline_history(&self, branch: &str) -> Result<Option<String>> {
        let refs = self
            .run(&[
                "for-each-ref",
                "--count=1",
                "--format=%(refname)",
                "refs/pipeline/",
            ])
            .await?;
        if let Some(r) = refs.lines().next().filter(|l| !l.trim().is_empty()) {
            return Ok(Some(format!("it has pipeline refs ({})", r.trim())));
        }
        let found = self
            .run(&[
                "log",
                "-n",
                "1",
                "--format=%h",
                "-i",
                "--grep=^Task-Id:",
                &format!("refs/heads/{branch}"),
                "--",
            ])
            .await?;
        Ok(found
            .lines()
            .next()
            .filter(|l| !l.trim().is_empty())
            .map(|c| format!("{branch} has commits with Task-Id trailers ({})", c.trim())))
    }

    /// The highest `n` of the generated task IDs (`t-<n>`) the repository knows: in the
    /// pipeline's refs, and in the `Task-Id:` trailers of `range` (e.g. `main`, or `A..main`).
    pub async fn highest_task_number(&self, range: &str) -> Result<u64> {
        let number = |id: &str| {
            id.trim()
                .strip_prefix("t-")
                .and_then(|n| n.parse::<u64>().ok())
        };
        let mut max = 0;
        let refs = self
            .run(&[
                "for-each-ref",
                "--format=%(refname)",
                "refs/pipeline/tasks/",
                "refs/pipeline/landed/",
            ])
            .await?;
        for r in refs.lines() {
            let id = r
                .strip_prefix("refs/pipeline/tasks/")
                .and_then(|rest| rest.split('/').next())
                .or_else(|| r.strip_prefix("refs/pipeline/landed/"));
            if let Some(n) = id.and_then(number) {
                max = max.max(n);
            }
        }
        let trailers = self
            .run(&[
                "log",
                "--format=%(trailers:key=Task-Id,valueonly,separator=%x2C)",
                range,
                "--",
            ])
            .await?;
        for id in trailers.lines().flat_map(|l| l.split(',')) {
            if let Some(n) = number(id) {
                max = max.max(n);
            }
        }
        Ok(max)
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
    /// message, and exactly one `Task-Id:` trailer, the task's own (any other the message
    /// carried is removed: a commit may not speak for another task).
    pub async fn commit_for_task(
        &self,
        tree: &str,
        parent: &str,
        original: &str,
        task: &str,
    ) -> Result<String> {
        let info = self.commit_info(original).await?;
        let message = with_own_trailer(&info.message, task);
        self.commit_tree(tree, parent, &info, &message).await
    }

    /// Replays `commit` (whose parent is `parent`) onto `onto` without touching files: the same
    /// change, author and message on a new parent. A conflict is `Ok(Err(git's message))`.
    pub async fn replay(
        &self,
        parent: &str,
        onto: &str,
        commit: &str,
    ) -> Result<std::result::Result<String, String>> {
        let tree = match self.cherry_pick_tree(parent, onto, commit).await? {
            Ok(tree) => tree,
            Err(conflict) => return Ok(Err(conflict)),
        };
        let info = self.commit_info(commit).await?;
        let message = info.message.clone();
        Ok(Ok(self.commit_tree(&tree, onto, &info, &message).await?))
    }

    /// `git commit-tree TREE -p PARENT` with `author`'s author and `message`.
    async fn commit_tree(
        &self,
        tree: &str,
        parent: &str,
        author: &CommitInfo,
        message: &str,
    ) -> Result<String> {
        check_sha(tree)?;
        check_sha(parent)?;
        let date = format!("@{}", author.author_date);
        let env = [
            ("GIT_AUTHOR_NAME", author.author_name.as_str()),
            ("GIT_AUTHOR_EMAIL", author.author_email.as_str()),
            ("GIT_AUTHOR_DATE", date.as_str()),
            ("GIT_COMMITTER_NAME", "pipeline"),
            ("GIT_COMMITTER_EMAIL", "pipeline@localhost"),
        ];
        let out = self
            .output(
                &["commit-tree", tree, "-p", parent, "-F", "-"],
                &env,
                Some(message),
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
        assert_eq!(info.author_name, "T");
        assert_eq!(info.author_email, "t@example.invalid");
        assert_eq!(info.tree, git(d, &["rev-parse", "HEAD^{tree}"]));
        assert_eq!(repo.tip("main").await.expect("tip"), two);
        // A trailer says nothing of a landing: only the landed ref does.
        assert_eq!(repo.landed_on("t-1", &two).await.expect("read"), None);
        repo.record_landing("t-1", &one).await.expect("record");
        assert_eq!(
            repo.landed_commit("t-1").await.expect("read"),
            Some(one.clone())
        );
        assert_eq!(
            repo.landed_on("t-1", &two).await.expect("read"),
            Some(one.clone())
        );
        assert_eq!(
            repo.landed_on("t-1", &root).await.expect("read"),
            None,
            "not on that tip"
        );
        // Packed refs are read too.
        git(d, &["pack-refs", "--all"]);
        assert_eq!(
            repo.landed_commit("t-1").await.expect("read"),
            Some(one.clone())
        );
        assert_eq!(repo.highest_task_number("main").await.expect("scan"), 2);
        let missing = "0".repeat(40);
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
