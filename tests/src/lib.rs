//! The end-to-end test harness: real binaries, real git repositories in temp dirs, real SQLite
//! files, real gRPC over loopback.
//!
//! - [`ensure_built`] builds the workspace's binaries once per test process (a no-op when they
//!   are fresh), so `cargo test` alone is enough.
//! - [`TestRepo`] is a git repository with a `main` branch and one commit.
//! - [`Server`] runs `pipeline-server` on `127.0.0.1:0`, learns its port from its log, and kills
//!   it when dropped; [`Server::ctl`] runs `pipelinectl` against it.
//! - [`Runner`] runs `pipeline-runner`; [`runner`] starts one with the scripted agent
//!   ([`scripted_agent`], [`agent_args`]) and `--no-verify`, [`fake_runner`] registers one that
//!   the test drives by hand ([`fake_runner::FakeRunner`]).
//! - Every process the harness starts gets a home of its own ([`isolate`]: `HOME` and the XDG
//!   base directories, by default the [`TestRepo`]'s `home/`), so a test never reads or writes
//!   the user's files (the servers' notes for `pipelinectl` live there too); [`command`],
//!   [`TestRepo::command`] and [`Server::ctl_command`] make such commands.
//! - [`wait_for`] waits for a condition with a deadline: no test sleeps to synchronise, and no
//!   test waits for log wording to learn that something happened. They wait for what a user
//!   could see: a task's JSON ([`Server::wait_task`], [`Server::wait_status`]), a runner's in
//!   `runners --json` ([`Server::wait_runner`], [`Server::wait_connected`] and
//!   [`wait_connected`]: registered with its work stream open; [`Server::wait_runner_gone`]),
//!   the queue's ([`Server::wait_queue`], [`Server::wait_train_building`]), a file a script
//!   touches ([`TestRepo::wait_agent`], [`TestRepo::agent_file`]), a process that exited.
//!   Log lines are read only where the line is itself the feature (an operator-facing message,
//!   a refusal's one line); each test file lists those it checks in its module doc. The harness
//!   reads one: the server's start-up line with its address (`listening on`, how a user learns
//!   the port of `--listen 127.0.0.1:0`; its HTTP side's likewise in [`web`]).
//! - The servers' database: SQLite in the state dir, or with `PIPELINE_TEST_DB=postgres` a
//!   database of each [`TestRepo`]'s own on the test process's PostgreSQL ([`test_database`]);
//!   [`database`] does to either what a test does behind the server's back (a backup restored,
//!   the database lost, its write lock held, rows made in bulk, a dump compared), and
//!   [`runs_the_same_on_both_passes`] skips on the PostgreSQL pass a test that picks its
//!   databases itself.
//! - [`web`]: the server's HTTP side (its address, an HTTP client, server-sent events off a
//!   socket) and a headless Chromium driven through WebDriver ([`web::Browser`]).
//! - Small readers shared by the test files: a task's [`runs`] and [`event_kinds`] from its
//!   JSON, [`main_tip`], whether a process is [`alive`], [`as_strs`] for flags; and
//!   [`make_certs`], a CA and a server certificate made with `openssl` for TLS tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod database;
pub mod fake_runner;
pub mod feed;
pub mod web;

/// How long a test waits for anything before it fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The directory holding the workspace's binaries (`target/debug`), or `PIPELINE_TEST_BIN_DIR`
/// when set (to run these tests against other binaries, e.g. an older build, to see a test
/// fail there).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PIPELINE_TEST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Builds the binaries once per process; `cargo test` builds only this crate's targets.
pub fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if std::env::var_os("PIPELINE_TEST_BIN_DIR").is_some() {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--bins", "--manifest-path"])
            .arg(manifest);
        // Cargo sets these for the test's crate; a build script that reads them (ring's)
        // would see them change between `cargo test` and this build, and everything above it
        // (rustls, tonic, the workspace) would be built again on every run.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || key == "CARGO_TARGET_TMPDIR"
            {
                cmd.env_remove(key.as_ref());
            }
        }
        // The benchmark (built with --release) drives release binaries.
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd
            .args([
                "-p",
                "pipeline-server",
                "-p",
                "pipelinectl",
                "-p",
                "pipeline-runner",
            ])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
    });
}

/// The path of one of the workspace's binaries, built if needed.
pub fn bin(name: &str) -> PathBuf {
    ensure_built();
    bin_dir().join(name)
}

/// Makes `cmd` run with `home` as its home: `HOME`, and the XDG base directories under it, so
/// nothing it runs reads or writes the user's own files (the server's note for `pipelinectl`,
/// a runner's default work dir). `home` need not exist: a process that writes there creates it.
pub fn isolate<'a>(cmd: &'a mut Command, home: &Path) -> &'a mut Command {
    cmd.env("HOME", home)
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env_remove("XDG_RUNTIME_DIR")
}

/// One of the workspace's binaries as a command running with `home` as its home
/// ([`isolate`]).
pub fn command(name: &str, home: &Path) -> Command {
    let mut cmd = Command::new(bin(name));
    isolate(&mut cmd, home);
    cmd
}

/// A home with nothing in it (never created), for `pipelinectl` runs that belong to no server.
pub fn empty_home() -> PathBuf {
    bin_dir().join("pipeline-tests-empty-home")
}

/// Polls `cond` until it returns `Some`, failing the test after [`DEADLINE`].
pub fn wait_for<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Whether a runner's JSON (from `runners --json`) says its work stream is open.
pub fn connected(runner: &Value) -> bool {
    ["idle", "busy", "draining"].contains(&runner["state"].as_str().unwrap_or_default())
}

/// The array `runners --json` (or any JSON array) printed, as a `Vec`.
pub fn listed(json: Value) -> Vec<Value> {
    match json {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

/// Waits until `runner`, a runner process named `name`, has registered and opened its work
/// stream: `runners` (the server's `runners --json`, however the test reaches it) lists it
/// [`connected`]. Fails at once, with its log, if the process exits first. Another runner of
/// that name must not be connected at the same time (wait for it to be offline first).
pub fn wait_connected(runner: &Proc, name: &str, runners: impl Fn() -> Vec<Value>) -> Value {
    wait_for(&format!("runner {name} to connect"), || {
        if !alive(runner.pid()) {
            panic!(
                "runner {name} exited before it connected:\n{}",
                runner.log()
            );
        }
        runners()
            .into_iter()
            .find(|r| r["name"] == name && connected(r))
    })
}

/// Runs `git` in `dir` (with no user configuration: an empty home), panicking with its stderr
/// on failure; returns stdout, trimmed.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = isolate(&mut Command::new("git"), &empty_home())
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A temp dir holding a git repository (`repo/`, branch `main`, one commit), room for the
/// server's state (`state/`), and the home (`home/`) of the processes started for it.
pub struct TestRepo {
    pub dir: tempfile::TempDir,
}

impl TestRepo {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).expect("mkdir repo");
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("README"), "hello\n").expect("write");
        git(&repo, &["add", "README"]);
        git(&repo, &["commit", "-q", "-m", "initial"]);
        // A non-bare repo with `main` checked out is refused by later issues; keep it off.
        git(&repo, &["checkout", "-q", "--detach"]);
        // The scripted agent and the fakes write here, from inside the sandbox.
        std::fs::create_dir_all(dir.path().join("agent-log")).expect("mkdir agent-log");
        Self { dir }
    }

    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// For a test about the SQLite file itself (where `pipeline.db` is made, a `sqlite://`
    /// URL): the servers of this repository stay on SQLite whatever `PIPELINE_TEST_DB` says
    /// ([`test_database`]). A test that only copies, removes, locks or fills the database uses
    /// [`database`]'s helpers instead, which do that on either backend.
    pub fn sqlite_only(&self) {
        SQLITE_ONLY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.state_dir());
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The home of the processes started for this repository (see [`isolate`]).
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// One of the workspace's binaries as a command with this repository's home.
    pub fn command(&self, name: &str) -> Command {
        command(name, &self.home())
    }

    /// Where the scripted agent and the fakes log what they saw.
    pub fn agent_log(&self) -> PathBuf {
        self.dir.path().join("agent-log")
    }

    /// The server's runner registration token (from its state dir).
    pub fn registration_token(&self) -> String {
        read_token(&self.state_dir().join("runner-registration.token"))
    }

    /// The server's admin token (from its state dir).
    pub fn admin_token(&self) -> String {
        read_token(&self.state_dir().join("admin.token"))
    }

    /// Lets every agent waiting in `wait` mode go on.
    pub fn release_agents(&self) {
        std::fs::create_dir_all(self.agent_log()).expect("mkdir");
        std::fs::write(self.agent_log().join("release"), "").expect("release");
    }

    /// Lets the agent of one task waiting in `wait` mode go on.
    pub fn release_task(&self, id: &str) {
        std::fs::create_dir_all(self.agent_log()).expect("mkdir");
        std::fs::write(self.agent_log().join(format!("release-{id}")), "").expect("release");
    }

    /// Creates a file in the agent log dir (the tests' slow builds wait for one).
    pub fn touch(&self, name: &str) {
        std::fs::create_dir_all(self.agent_log()).expect("mkdir");
        std::fs::write(self.agent_log().join(name), "").expect("touch");
    }

    /// Commits a file straight onto `main` of the repository, as a person pushing would;
    /// returns the new commit.
    pub fn push_to_main(&self, file: &str, content: &str) -> String {
        push_commit(
            &self.repo(),
            &self
                .dir
                .path()
                .join(format!("person-{}", file.replace('/', "-"))),
            file,
            content,
        )
    }

    /// The `Task-Id` trailers of `main`'s history, newest first.
    pub fn landed(&self) -> Vec<String> {
        git(
            &self.repo(),
            &["log", "--format=%(trailers:key=Task-Id,valueonly)", "main"],
        )
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
    }

    /// A file the scripted agent or a fake wrote, if it exists.
    pub fn agent_file(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.agent_log().join(name)).ok()
    }

    /// The lines of a file the scripted agent or a fake wrote (none if it does not exist).
    pub fn agent_lines(&self, name: &str) -> Vec<String> {
        self.agent_file(name)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the scripted agent working on `task` has started; returns its pid.
    pub fn wait_agent(&self, task: &str) -> String {
        // The shell creates the file before it writes the pid into it: wait for the number.
        wait_for(&format!("the agent of {task} to start"), || {
            self.agent_file(&format!("{task}.pid"))
                .map(|pid| pid.trim().to_owned())
                .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        })
    }
}

impl Default for TestRepo {
    fn default() -> Self {
        Self::new()
    }
}

/// What a finished command printed and how it exited.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Asserts success and returns stdout.
    pub fn ok(self) -> String {
        assert!(
            self.status.success(),
            "command failed ({:?}): {}",
            self.status,
            self.stderr
        );
        self.stdout
    }

    /// Asserts success and parses stdout as JSON.
    pub fn json(self) -> Value {
        let out = self.ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    /// Asserts a failure with exit code `code` and exactly one line on stderr containing
    /// `says`; returns that line.
    pub fn refused(self, code: i32, says: &str) -> String {
        assert_eq!(
            self.code(),
            Some(code),
            "exit code (stdout {:?}, stderr {:?})",
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr, got {:?}", self.stderr);
        assert!(
            lines[0].contains(says),
            "stderr {:?} should say {says:?}",
            lines[0]
        );
        assert!(
            self.stdout.is_empty(),
            "nothing on stdout: {:?}",
            self.stdout
        );
        lines[0].to_owned()
    }
}

/// Runs `pipelinectl ARGS` against `url`, from the home of the server this process started
/// last on the URL's port (so it finds that server's admin token, as a `pipelinectl` on the
/// server's host would), or else from a home with nothing in it.
pub fn ctl(url: &str, args: &[&str]) -> Output {
    ctl_in(&home_for(url), url, args)
}

/// The homes of the servers this process started, by port.
static SERVER_HOMES: Mutex<Vec<(u16, PathBuf)>> = Mutex::new(Vec::new());

/// The home of the server this process started last on `url`'s port, or [`empty_home`].
pub fn home_for(url: &str) -> PathBuf {
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse::<u16>().ok());
    let homes = SERVER_HOMES.lock().unwrap_or_else(|e| e.into_inner());
    port.and_then(|port| homes.iter().rev().find(|(p, _)| *p == port))
        .map(|(_, home)| home.clone())
        .unwrap_or_else(empty_home)
}

/// Runs `pipelinectl ARGS` against `url` with `home` as its home.
pub fn ctl_in(home: &Path, url: &str, args: &[&str]) -> Output {
    run(ctl_command(home, url).args(args))
}

/// `pipelinectl --server URL` with `home` as its home and no server or token from the
/// environment; add the arguments.
pub fn ctl_command(home: &Path, url: &str) -> Command {
    let mut cmd = command("pipelinectl", home);
    cmd.arg("--server")
        .arg(url)
        .env_remove("PIPELINE_SERVER")
        .env_remove("PIPELINE_TOKEN")
        .env_remove("PIPELINE_ADMIN_TOKEN");
    cmd
}

/// Runs a prepared command to completion with null stdin.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A child process whose stderr (its log) is captured line by line; SIGKILLed when dropped.
pub struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    lines: Receiver<String>,
}

impl Proc {
    /// Spawns `cmd` with its stderr captured.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut log) = sink.lock() {
                    log.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        Self { child, log, lines }
    }

    /// Waits for a log line containing `needle` and returns it; `Err` with the whole log if the
    /// process closed its log first. Only for a line that is itself what the test checks (an
    /// operator-facing message, a command's output), never to learn that something happened.
    pub fn wait_for_line(&self, needle: &str) -> Result<String, String> {
        if let Some(line) = self.log_lines().into_iter().find(|l| l.contains(needle)) {
            return Ok(line);
        }
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(self.log()),
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no log line with {needle:?} within {DEADLINE:?}:\n{}",
                        self.log()
                    )
                }
            }
        }
    }

    fn log_lines(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log_lines().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM", "STOP") to the process.
    pub fn signal(&self, signal: &str) {
        run(Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()])).ok();
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_for("the process to exit", || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// Waits for the process to exit and for its log to close; returns its status and its
    /// whole log.
    pub fn wait_exit_log(&mut self) -> (ExitStatus, String) {
        let status = self.wait_exit();
        let start = Instant::now();
        loop {
            match self
                .lines
                .recv_timeout(DEADLINE.saturating_sub(start.elapsed()))
            {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return (status, self.log()),
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "the log stayed open after the process exited:\n{}",
                        self.log()
                    )
                }
            }
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Which database the servers of the end-to-end tests run on: `PIPELINE_TEST_DB=postgres`
/// (or `postgresql`) picks PostgreSQL, anything else (or nothing) SQLite in the state dir.
pub fn test_on_postgres() -> bool {
    matches!(
        std::env::var("PIPELINE_TEST_DB").as_deref(),
        Ok("postgres" | "postgresql")
    )
}

/// For a test that the PostgreSQL pass (`PIPELINE_TEST_DB=postgres`) would only repeat: its
/// servers' database is its own choice (it is on PostgreSQL on either pass, or the benchmark
/// picks its own). On that pass it prints why on the terminal (past the test harness's capture)
/// and returns true, and the test returns at once, skipped; on the SQLite pass it returns false.
pub fn runs_the_same_on_both_passes(why: &str) -> bool {
    if !test_on_postgres() {
        return false;
    }
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = writeln!(
        std::io::stderr(),
        "skipped {test} with PIPELINE_TEST_DB=postgres: {why}"
    );
    true
}

/// The `--db` URL of `repo`'s servers when the tests run on PostgreSQL: a database of its own
/// on the test process's PostgreSQL ([`pipeline_core::pgtest::PgServer::shared`]), the same
/// one for every server started on `repo` (a restart finds its state), kept until the process
/// ends. `None` on SQLite.
pub fn test_database(repo: &TestRepo) -> Option<String> {
    pg_database(repo).map(|(_, url)| url)
}

/// The name and URL of `repo`'s PostgreSQL database (see [`test_database`]), made on first use;
/// `None` on SQLite.
fn pg_database(repo: &TestRepo) -> Option<(String, String)> {
    use pipeline_core::pgtest::{PgDatabase, PgServer};
    use std::collections::HashMap;
    static DATABASES: Mutex<Option<HashMap<PathBuf, PgDatabase<'static>>>> = Mutex::new(None);
    if !test_on_postgres() {
        return None;
    }
    if SQLITE_ONLY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&repo.state_dir())
    {
        return None;
    }
    let mut databases = DATABASES.lock().unwrap_or_else(|e| e.into_inner());
    let db = databases
        .get_or_insert_with(HashMap::new)
        .entry(repo.state_dir())
        .or_insert_with(|| PgServer::shared().database());
    Some((db.name().to_owned(), db.url().to_owned()))
}

/// The state dirs of the test repositories whose servers stay on SQLite
/// ([`TestRepo::sqlite_only`]).
static SQLITE_ONLY: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A running `pipeline-server`.
pub struct Server {
    pub proc: Proc,
    pub addr: String,
    pub url: String,
    /// Its home (where it leaves its note for `pipelinectl`), from its command.
    home: PathBuf,
    /// The home made for a server whose command set none, removed with it.
    _own_home: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts the server on `repo` with its state in `repo.state_dir()`, plus `extra` flags, and
    /// waits until it listens.
    pub fn start(repo: &TestRepo, extra: &[&str]) -> Self {
        let mut cmd = Self::command(repo, extra);
        Self::spawn(&mut cmd).unwrap_or_else(|log| panic!("server did not start:\n{log}"))
    }

    /// The command [`Server::start`] runs, for tests that expect it to fail.
    pub fn command(repo: &TestRepo, extra: &[&str]) -> Command {
        let mut cmd = repo.command("pipeline-server");
        cmd.arg("--repo")
            .arg(repo.repo())
            .arg("--state-dir")
            .arg(repo.state_dir())
            .args(["--env-allow", "AGENT_LOG_DIR"]);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--db")
            && let Some(url) = test_database(repo)
        {
            cmd.args(["--db", &url]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .env("PATH", scripts_path())
            .env("AGENT_LOG_DIR", repo.agent_log())
            .envs(sandbox_env(repo))
            .env_remove("PIPELINE_DB");
        cmd
    }

    /// Spawns the command and waits for its "listening on" line; on exit before it, returns
    /// the log. A command without a `HOME` of its own gets a fresh one (see [`isolate`]).
    pub fn spawn(cmd: &mut Command) -> Result<Self, String> {
        let set = cmd
            .get_envs()
            .find(|(k, _)| *k == "HOME")
            .and_then(|(_, v)| v.map(PathBuf::from));
        let (home, own_home) = match set {
            Some(home) => (home, None),
            None => {
                let dir = tempfile::tempdir().expect("temp dir");
                isolate(cmd, dir.path());
                (dir.path().to_path_buf(), Some(dir))
            }
        };
        let proc = Proc::spawn(cmd);
        let line = proc.wait_for_line("listening on ")?;
        let addr = line
            .split("listening on ")
            .nth(1)
            .expect("address")
            .trim()
            .to_owned();
        if let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse().ok()) {
            let mut homes = SERVER_HOMES.lock().unwrap_or_else(|e| e.into_inner());
            homes.retain(|(p, _)| *p != port);
            homes.push((port, home.clone()));
        }
        Ok(Self {
            proc,
            url: format!("http://{addr}"),
            addr,
            home,
            _own_home: own_home,
        })
    }

    /// The server's home: `pipelinectl` run from it finds the server's admin token.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// `pipelinectl --server URL` from the server's home (see [`ctl_command`]); add the
    /// arguments.
    pub fn ctl_command(&self) -> Command {
        ctl_command(&self.home, &self.url)
    }

    /// Runs `pipelinectl ARGS` against this server.
    pub fn ctl(&self, args: &[&str]) -> Output {
        run(self.ctl_command().args(args))
    }

    /// Creates a task with `args` (after `task add`) and returns its ID.
    pub fn add(&self, args: &[&str]) -> String {
        let mut full = vec!["task", "add"];
        full.extend_from_slice(args);
        self.ctl(&full).ok().trim().to_owned()
    }

    /// `task show ID --json`.
    pub fn show(&self, id: &str) -> Value {
        self.ctl(&["task", "show", id, "--json"]).json()
    }

    /// Waits until the task's JSON satisfies `cond`; returns it.
    pub fn wait_task(&self, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let task = self.show(id);
            if cond(&task) {
                return task;
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "task {id} never became {what}; last: {}\nserver log:\n{}",
                    serde_json::to_string_pretty(&task).unwrap_or_default(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the task has `status`.
    pub fn wait_status(&self, id: &str, status: &str) -> Value {
        self.wait_task(id, status, |t| t["status"] == status)
    }

    /// `runners --json`: every runner the server knows.
    pub fn runners(&self) -> Vec<Value> {
        listed(self.ctl(&["runners", "--json"]).json())
    }

    /// Waits until the runner named `name` is listed by `runners --json` and satisfies `cond`;
    /// returns its JSON.
    pub fn wait_runner(&self, name: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        wait_for(&format!("runner {name} to be {what}"), || {
            self.runners()
                .into_iter()
                .find(|r| r["name"] == name && cond(r))
        })
    }

    /// Waits until `runner`, a runner process named `name`, has its work stream open to this
    /// server (see [`wait_connected`]); returns its JSON.
    pub fn wait_connected(&self, runner: &Proc, name: &str) -> Value {
        wait_connected(runner, name, || self.runners())
    }

    /// Waits until no runner named `name` is connected (one that was stopped is offline).
    pub fn wait_runner_gone(&self, name: &str) {
        wait_for(&format!("runner {name} to be offline"), || {
            (!self
                .runners()
                .iter()
                .any(|r| r["name"] == name && connected(r)))
            .then_some(())
        });
    }

    /// `queue --json`.
    pub fn queue(&self) -> Value {
        self.ctl(&["queue", "--json"]).json()
    }

    /// Waits until `queue --json` satisfies `cond`; returns it.
    pub fn wait_queue(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, || Some(self.queue()).filter(|q| cond(q)))
    }

    /// Waits until the merge train is at its build (`queue --json`'s `train.step` says
    /// `building…`); returns the queue.
    pub fn wait_train_building(&self) -> Value {
        self.wait_queue("the train's build", |q| {
            q["train"]["step"]
                .as_str()
                .is_some_and(|s| s.starts_with("building"))
        })
    }

    /// Waits for a log line containing `needle`: only for a line that is itself what the test
    /// checks (an operator-facing message), never to learn that something happened.
    pub fn wait_for_log(&self, needle: &str) {
        if let Err(log) = self.proc.wait_for_line(needle) {
            panic!("the server exited before logging {needle:?}:\n{log}");
        }
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Sends SIGTERM and waits for the process to exit; returns its status.
    pub fn terminate(mut self) -> ExitStatus {
        self.proc.signal("TERM");
        self.proc.wait_exit()
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(mut self) {
        self.proc.kill();
    }
}

/// The directory of the test scripts (the scripted agent, fake `bild` and `agentd`).
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// What the sandboxed agents and builds of the tests need besides their worktrees: the
/// scripts (read) and the agent log dir (written), as variables, so that the same commands
/// also start binaries older than the sandbox (`PIPELINE_TEST_BIN_DIR`).
pub fn sandbox_env(repo: &TestRepo) -> [(&'static str, PathBuf); 2] {
    [
        ("PIPELINE_SANDBOX_READ", scripts_dir()),
        ("PIPELINE_SANDBOX_WRITE", repo.agent_log()),
    ]
}

/// `PATH` with the fake `bild` and `agentd` first.
pub fn scripts_path() -> String {
    format!(
        "{}:{}",
        scripts_dir().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The scripted agent, as `--agent command` flags.
pub fn scripted_agent() -> Vec<String> {
    vec![
        "--agent".into(),
        "command".into(),
        "--agent-cmd".into(),
        format!("sh {}", scripts_dir().join("agent.sh").display()),
    ]
}

/// The scripted agent's flags plus `extra`.
pub fn agent_args(extra: &[&str]) -> Vec<String> {
    let mut args = scripted_agent();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// The strings of `v` as `&str`s (flags built as `String`s, passed as `&[&str]`).
pub fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A runner named `name` for `server` with the scripted agent and `--no-verify`, registered.
pub fn runner(repo: &TestRepo, server: &Server, name: &str) -> Runner {
    let args = agent_args(&["--no-verify"]);
    Runner::start(repo, server, name, &as_strs(&args))
}

/// A fake runner, registered as "fake" with its work stream open.
pub fn fake_runner(repo: &TestRepo, server: &Server) -> fake_runner::FakeRunner {
    let mut fake = fake_runner::FakeRunner::register(
        &server.url,
        &repo.registration_token(),
        "fake",
        pipeline_proto::PROTOCOL_VERSION,
    )
    .expect("register");
    fake.open(vec![]).expect("open");
    fake
}

/// A running `pipeline-runner`.
pub struct Runner {
    pub proc: Proc,
    pub name: String,
}

impl Runner {
    /// Starts a runner named `name` for `server`, working in the repo's temp dir, with `args`
    /// (agent and verification flags), and waits until it is connected (`runners --json`).
    /// A runner of that name that was just stopped is first seen offline, so that the new one
    /// is not refused and the old one not taken for it.
    pub fn start(repo: &TestRepo, server: &Server, name: &str, args: &[&str]) -> Self {
        server.wait_runner_gone(name);
        let runner = Self::spawn(repo, &server.url, name, args);
        server.wait_connected(&runner.proc, name);
        runner
    }

    /// Spawns a runner named `name` given `urls` (servers it tries in order, comma-separated),
    /// and waits until it is connected to `server`.
    pub fn start_with_urls(
        repo: &TestRepo,
        urls: &str,
        server: &Server,
        name: &str,
        args: &[&str],
    ) -> Self {
        let runner = Self::spawn(repo, urls, name, args);
        server.wait_connected(&runner.proc, name);
        runner
    }

    /// Spawns a runner without waiting for it.
    pub fn spawn(repo: &TestRepo, url: &str, name: &str, args: &[&str]) -> Self {
        Self::spawn_with_env(repo, url, name, args, &[])
    }

    /// Spawns a runner with extra environment variables, without waiting for it.
    pub fn spawn_with_env(
        repo: &TestRepo,
        url: &str,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Self::command(repo, url, name, args);
        cmd.envs(env.iter().copied());
        Self {
            proc: Proc::spawn(&mut cmd),
            name: name.to_owned(),
        }
    }

    /// The command [`Runner::spawn`] runs, for tests that change it first (its directory,
    /// its environment) or expect it to fail.
    pub fn command(repo: &TestRepo, url: &str, name: &str, args: &[&str]) -> Command {
        let mut cmd = repo.command("pipeline-runner");
        cmd.args(["--server", url, "--name", name]);
        if !args.contains(&"--slots") {
            cmd.args(["--slots", "1"]);
        }
        cmd.args(["--token", &repo.registration_token()])
            .arg("--work-dir")
            .arg(repo.dir.path().join("runners").join(name))
            .args(["--kill-grace", "2", "--env-allow", "AGENT_LOG_DIR"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("PATH", scripts_path())
            .env("AGENT_LOG_DIR", repo.agent_log())
            .envs(sandbox_env(repo))
            .env_remove("PIPELINE_SERVER")
            .env_remove("PIPELINE_TOKEN")
            .env_remove("PIPELINE_RUNNER_TOKEN");
        cmd
    }

    /// Everything the runner logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

pub fn read_token(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// A task's runs, from its `task show --json`; none when it has none.
pub fn runs(task: &Value) -> Vec<Value> {
    task["runs"].as_array().cloned().unwrap_or_default()
}

/// Asserts that `task` (its `task show --json`) kept its first lease to the end, through
/// whatever happened to its server or runner meanwhile: its dev run succeeded, nobody was
/// charged, and no lease was lost.
pub fn assert_kept_its_lease(task: &Value) {
    let runs = runs(task);
    assert_eq!(runs[0]["status"], "success", "{runs:?}");
    assert_eq!(task["failures"], 0, "{task}");
    let events = event_kinds(task);
    assert!(!events.contains(&"lease_lost".to_owned()), "{events:?}");
}

/// The kinds of a task's events (`created`, `leased`, …) in order, from its `task show --json`.
pub fn event_kinds(task: &Value) -> Vec<String> {
    task["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|e| e["kind"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Makes a CA and a server certificate for localhost / 127.0.0.1 in `dir` with `openssl`;
/// returns (ca.pem, server.pem, server.key).
pub fn make_certs(dir: &std::path::Path) -> (String, String, String) {
    let sh = |script: &str| {
        let out = run(isolate(&mut Command::new("sh"), &dir.join("home"))
            .arg("-c")
            .arg(script)
            .current_dir(dir));
        assert!(out.status.success(), "{script}: {}", out.stderr);
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
        -subj '/CN=pipeline test CA' 2>/dev/null",
    );
    sh(
        "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
        -subj '/CN=localhost' 2>/dev/null",
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    sh(
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out server.pem -days 2 -extfile ext.cnf 2>/dev/null",
    );
    let p = |f: &str| dir.join(f).to_str().expect("utf-8").to_owned();
    (p("ca.pem"), p("server.pem"), p("server.key"))
}

/// The commit `main` of the test repository is at.
pub fn main_tip(repo: &TestRepo) -> String {
    git(&repo.repo(), &["rev-parse", "refs/heads/main"])
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: impl std::fmt::Display) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", pid.to_string().trim()))
        .ok()
        .and_then(|stat| stat.rsplit(')').next().map(|r| r.trim_start().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// Clones `repo` into `work`, commits `file` with `content` on top of `main` there, and pushes
/// it to `main`; returns the commit.
pub fn push_commit(repo: &Path, work: &Path, file: &str, content: &str) -> String {
    if !work.exists() {
        let parent = work.parent().expect("parent");
        let name = work.file_name().and_then(|n| n.to_str()).expect("name");
        git(
            parent,
            &["clone", "-q", repo.to_str().expect("utf-8"), name],
        );
    }
    git(work, &["fetch", "-q", "origin", "main"]);
    git(work, &["checkout", "-q", "--detach", "FETCH_HEAD"]);
    if let Some(dir) = work.join(file).parent() {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    std::fs::write(work.join(file), content).expect("write");
    git(work, &["add", file]);
    git(
        work,
        &[
            "commit",
            "-q",
            "-m",
            &format!("a person's change to {file}"),
        ],
    );
    git(work, &["push", "-q", "origin", "HEAD:main"]);
    git(work, &["rev-parse", "HEAD"])
}

/// The commit message of `commit` in `repo`.
pub fn commit_message(repo: &Path, commit: &str) -> String {
    git(repo, &["log", "-1", "--format=%B", commit])
}

/// The one commit ID stored for a task's lease `epoch`.
pub fn task_ref(repo: &Path, task: &str, epoch: u64) -> String {
    git(
        repo,
        &["rev-parse", &format!("refs/pipeline/tasks/{task}/{epoch}")],
    )
}

/// A small file system of its own (a tmpfs), for the tests that fill a disk. Mounting needs the
/// right to (root, as in CI): [`SmallDisk::try_new`] says so and lets the test skip without it.
pub struct SmallDisk {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// A fresh tmpfs of `mib` MiB; fails the test if it cannot be mounted.
    pub fn new(mib: u32) -> Self {
        Self::mount(mib).unwrap_or_else(|why| panic!("{why}"))
    }

    /// A fresh tmpfs of `mib` MiB, or `None` when this machine does not let the tests mount
    /// one (not root): then it prints why on the terminal (past the test harness's capture),
    /// and the test returns early, skipped.
    pub fn try_new(mib: u32) -> Option<Self> {
        match Self::mount(mib) {
            Ok(disk) => Some(disk),
            Err(why) => {
                use std::io::Write;
                let test = std::thread::current().name().unwrap_or("a test").to_owned();
                let _ = writeln!(std::io::stderr(), "skipped {test}: {why}");
                None
            }
        }
    }

    fn mount(mib: u32) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&path)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => Ok(Self { path, _dir: dir }),
            Ok(out) => Err(format!(
                "it mounts a small tmpfs to fill it, which needs root: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
            )),
            Err(e) => Err(format!(
                "it mounts a small tmpfs to fill it, which needs root and mount(8): {e}"
            )),
        }
    }

    /// Fills the disk to the last byte with a file; returns it. Called again, it takes what
    /// was freed since (a file the server removed) without giving back what it holds.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&filler)
            .expect("create filler");
        let block = vec![0u8; 64 * 1024];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        // The last partial block.
        for _ in 0..64 {
            if f.write(&block[..1024]).is_err() {
                break;
            }
        }
        let _ = f.flush();
        filler
    }

    /// Fills the disk but for about `bytes` (small writes still fit, a large one does not).
    pub fn fill_leaving(&self, bytes: u64) {
        let filler = self.fill();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .expect("open filler");
        let len = f.metadata().expect("filler size").len();
        f.set_len(len.saturating_sub(bytes))
            .expect("truncate filler");
    }

    /// Frees what [`SmallDisk::fill`] took.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.path.join("filler"));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").args(["-l", self.path.to_str().unwrap_or_default()]));
    }
}

/// A bundle made by hand in a clone of the repo: `commits` commits on top of `base`, the head
/// under each of `refs`. Returns the head and the bundle's bytes.
pub fn hand_made_bundle(
    repo: &TestRepo,
    base: &str,
    commits: usize,
    refs: &[&str],
) -> (String, Vec<u8>) {
    let work = repo.dir.path().join("hand-made");
    git(
        repo.dir.path(),
        &[
            "clone",
            "-q",
            repo.repo().to_str().expect("utf-8"),
            "hand-made",
        ],
    );
    git(&work, &["checkout", "-q", "--detach", base]);
    for n in 1..=commits {
        std::fs::write(work.join(format!("f{n}")), "x").expect("write");
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", &format!("commit {n}")]);
    }
    let head = git(&work, &["rev-parse", "HEAD"]);
    let mut args = vec!["bundle", "create", "-q", "../hand-made.bundle"];
    for r in refs {
        git(&work, &["update-ref", r, &head]);
        args.push(r);
    }
    let not_base = format!("^{base}");
    args.push(&not_base);
    git(&work, &args);
    let bundle = std::fs::read(repo.dir.path().join("hand-made.bundle")).expect("bundle");
    (head, bundle)
}
