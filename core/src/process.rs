//! Child processes the way a runner must run them: in their own process group, with null
//! stdin (or given bytes, then closed), output read line by line (each line handed to a
//! callback and the last ones kept for error messages), a time limit, and a stop that reaches
//! grandchildren: SIGTERM to the group, a grace period, then SIGKILL. What is left beneath the
//! program is also killed once it exits, so a stray grandchild cannot hold the pipes open.
//!
//! In the binaries every program runs under a [guard](crate::guard) ([`install_guard`]): it
//! applies the spec's [sandbox](crate::sandbox), reaches descendants that left the group, and
//! kills all of them when this process dies, however it dies. The guards a process starts are
//! recorded on disk ([`record_in`]) and the next start stops what a crash left behind.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::lines::{MAX_LINE_BYTES, cut_line};

/// Lines of output kept for error messages.
const TAIL_LINES: usize = 60;
/// Bytes of output kept for error messages.
const TAIL_BYTES: usize = 16 * 1024;

/// `reason`, then the output's last lines if there are any.
pub fn with_tail(reason: String, tail: &str) -> String {
    if tail.trim().is_empty() {
        reason
    } else {
        format!("{reason}:\n{tail}")
    }
}

/// Exit codes of `sh -c CMD` that mean CMD itself could not be run: 126 (found but not
/// executable) and 127 (not found).
pub fn could_not_run(code: Option<i32>) -> bool {
    matches!(code, Some(126 | 127))
}

/// Which output a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Spec {
    pub program: OsString,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// Variables added to the environment.
    pub env: Vec<(String, String)>,
    /// Start from an empty environment (then `env`), instead of this process's.
    pub clear_env: bool,
    pub timeout: Option<Duration>,
    pub kill_grace: Duration,
    /// Kill what is left of the process group once the process exits. Off only for commands
    /// whose contract is to leave a background process behind (`agentd run`).
    pub reap_group: bool,
    /// Written to the process's stdin, which is then closed; `None`: stdin is null.
    pub stdin: Option<Vec<u8>>,
    /// Fired (by the caller, typically from its line callback) when the process has said all
    /// it will say: it gets `finish_grace` to exit on its own, then it is stopped like a
    /// timed-out one, and [`Finished::finished_early`] says so.
    pub finish: Option<CancellationToken>,
    pub finish_grace: Duration,
    /// What the program may reach (applied by the guard before it starts); `None`: whatever
    /// this process may.
    pub sandbox: Option<crate::sandbox::Policy>,
}

impl Spec {
    /// `sh -c SCRIPT` in `cwd`.
    pub fn shell(script: &str, cwd: PathBuf) -> Self {
        Self {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd,
            env: Vec::new(),
            clear_env: false,
            timeout: None,
            kill_grace: Duration::from_secs(10),
            reap_group: true,
            stdin: None,
            finish: None,
            finish_grace: Duration::from_secs(5),
            sandbox: None,
        }
    }

    /// `program ARGS` in `cwd`.
    pub fn program(program: &str, args: Vec<String>, cwd: PathBuf) -> Self {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            ..Self::shell("", cwd)
        }
    }
}

/// How a process ended.
#[derive(Debug)]
pub struct Finished {
    /// `None` when it was stopped (time limit or cancellation).
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub cancelled: bool,
    /// It was stopped after its `finish` fired and its grace passed (it hung after its end).
    pub finished_early: bool,
    /// The last lines of its output, stdout and stderr interleaved.
    pub tail: String,
    /// What it left running (`reap_group: false` only), alive while this is held.
    pub leftover: Option<Leftover>,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// The exit code, if it exited.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// "exit 3", "killed by signal 9", "timed out", "cancelled".
    pub fn describe(&self) -> String {
        use std::os::unix::process::ExitStatusExt;
        if self.timed_out {
            return "timed out".to_owned();
        }
        if self.cancelled {
            return "cancelled".to_owned();
        }
        if self.finished_early {
            return "stopped after its final report".to_owned();
        }
        match self.status {
            Some(s) => match (s.code(), s.signal()) {
                (Some(code), _) => format!("exit {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => "ended".to_owned(),
            },
            None => "ended".to_owned(),
        }
    }
}

/// Sends `signal` to the process group `pgid`. Errors (the group is gone) are ignored.
fn signal_group(pgid: u32, signal: Signal) {
    let Some(pgid) = i32::try_from(pgid)
        .ok()
        .filter(|p| *p > 1)
        .and_then(Pid::from_raw)
    else {
        return;
    };
    let _ = rustix::process::kill_process_group(pgid, signal);
}

/// The guard this process starts its children through ([`install_guard`]).
static GUARD: OnceLock<PathBuf> = OnceLock::new();
/// Where this process records the guards it starts ([`record_in`]).
static RECORDS: OnceLock<Records> = OnceLock::new();

/// The variable every guarded process gets: this process's tag, by which the next start's
/// sweep knows what it left behind.
pub const TAG_VAR: &str = "PIPELINE_PROCESS_TAG";

/// Makes every later [`run`] start its program through the guard, this very binary
/// re-executed (`/proc/self/exe`, which stays the running binary even if the file is replaced),
/// whose `main` calls [`crate::guard::enter`] first. Called once at start-up by the binaries;
/// without it (unit tests) programs are started directly, and a sandboxed spec is refused.
pub fn install_guard() {
    let _ = GUARD.set(PathBuf::from("/proc/self/exe"));
}

/// The guards started by this process, one file each under `<dir>/<tag>/`, so that the next
/// start can stop what a crash left behind.
struct Records {
    dir: PathBuf,
    tag: String,
}

/// Records this process's guards under `dir` from now on (the first call wins: the local
/// runners of a server record in the server's), after sweeping what earlier processes left
/// there: every recorded guard that still runs (the same PID and start time) is SIGKILLed
/// with its group, and every process that carries an earlier tag in its environment. Returns
/// how many processes were stopped.
pub fn record_in(dir: &Path) -> std::io::Result<usize> {
    if RECORDS.get().is_some() {
        return Ok(0);
    }
    std::fs::create_dir_all(dir)?;
    let swept = sweep(dir);
    let tag = new_tag()?;
    let own = dir.join(&tag);
    std::fs::create_dir_all(&own)?;
    let me = std::process::id() as i32;
    let start = crate::guard::stat_of(me).map_or(0, |s| s.start);
    std::fs::write(own.join("owner"), format!("{me} {start}\n"))?;
    let _ = RECORDS.set(Records {
        dir: dir.to_path_buf(),
        tag,
    });
    Ok(swept)
}

/// 128 random bits in hex.
fn new_tag() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0_u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Stops what the processes that recorded under `dir` before left running (those owners that
/// are gone; a live owner's records are its own business), and forgets their records.
fn sweep(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let alive = |pid: i32, start: u64| crate::guard::stat_of(pid).is_some_and(|s| s.start == start);
    let pid_and_start = |text: &str| {
        let mut parts = text.split_whitespace();
        Some((
            parts.next()?.parse::<i32>().ok()?,
            parts.next()?.parse::<u64>().ok()?,
        ))
    };
    let mut tags = Vec::new();
    let mut stopped = 0;
    for entry in entries.flatten() {
        let tagged = entry.path();
        let Some(tag) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let owner = std::fs::read_to_string(tagged.join("owner")).unwrap_or_default();
        if pid_and_start(&owner).is_some_and(|(pid, start)| alive(pid, start)) {
            continue;
        }
        for guard in std::fs::read_dir(&tagged).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(guard.path()).unwrap_or_default();
            let Ok(pid) = guard.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Some(start) = text.trim().parse::<u64>().ok()
                && alive(pid, start)
            {
                // The guard itself lives on (it lost its parent but not its program?): its
                // group goes, and it with it.
                signal_group(pid as u32, Signal::KILL);
                stopped += 1;
            }
        }
        tags.push(tag);
        let _ = std::fs::remove_dir_all(&tagged);
    }
    if !tags.is_empty() {
        stopped += kill_tagged(&tags);
    }
    stopped
}

/// SIGKILLs every process whose environment carries one of `tags`.
fn kill_tagged(tags: &[String]) -> usize {
    let wanted: Vec<Vec<u8>> = tags
        .iter()
        .map(|t| format!("{TAG_VAR}={t}").into_bytes())
        .collect();
    let me = std::process::id() as i32;
    let mut stopped = 0;
    for (pid, _) in crate::guard::processes() {
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| wanted.iter().any(|w| var == w.as_slice()))
            && let Some(p) = Pid::from_raw(pid)
            && rustix::process::kill_process(p, Signal::KILL).is_ok()
        {
            stopped += 1;
        }
    }
    stopped
}

impl Records {
    fn file(&self, pid: u32) -> PathBuf {
        self.dir.join(&self.tag).join(pid.to_string())
    }

    fn started(&self, pid: u32) {
        let start = crate::guard::stat_of(pid as i32).map_or(0, |s| s.start);
        if let Err(e) = std::fs::write(self.file(pid), format!("{start}\n")) {
            tracing::warn!(error = %e, "cannot record a started process; a crash would leave it to run");
        }
    }

    fn ended(&self, pid: u32) {
        let _ = std::fs::remove_file(self.file(pid));
    }
}

/// What a program left running when it exited (`reap_group: false`): kept alive until this is
/// dropped, then its guard kills all of it. The guard also does so if this process dies.
pub struct Leftover {
    link: Link,
    pid: u32,
    /// Reaped by tokio in the background once the guard exits.
    _guard: tokio::process::Child,
}

impl std::fmt::Debug for Leftover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Leftover(guard {})", self.pid)
    }
}

impl Drop for Leftover {
    fn drop(&mut self) {
        self.link.cut();
        if let Some(records) = RECORDS.get() {
            records.ended(self.pid);
        }
    }
}

/// This end of a guard's link: the task that wrote the orders and the input, and then holds
/// the socket. Cut (or dropped: a run whose future is dropped takes its program down with it),
/// the task ends, the socket closes, and the guard kills everything it holds.
struct Link(tokio::task::JoinHandle<()>);

impl Link {
    fn cut(&self) {
        self.0.abort();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `spec` to completion (or until its time limit or `cancel`), handing each output line
/// to `on_line`. With the guard installed (the binaries), the program runs under a guard
/// (see [`crate::guard`]) that applies `spec.sandbox` and never lets it outlive this process.
pub async fn run(
    spec: &Spec,
    cancel: &CancellationToken,
    on_line: impl FnMut(Stream, &str),
) -> std::io::Result<Finished> {
    match GUARD.get() {
        Some(guard) => run_guarded(guard, spec, cancel, on_line).await,
        None if spec.sandbox.is_some() => Err(std::io::Error::other(
            "cannot start a sandboxed process without the guard (pipeline_core::process::install_guard)",
        )),
        None => run_direct(spec, cancel, on_line).await,
    }
}

/// The pipes and the end state a run's loop shares, whatever started the program.
struct Output {
    rx: mpsc::Receiver<(Stream, String)>,
    /// Whether a reader may still send.
    open: bool,
    readers: [Option<tokio::task::JoinHandle<()>>; 2],
    tail: Tail,
}

impl Output {
    fn new(child: &mut tokio::process::Child) -> Self {
        let (tx, rx) = mpsc::channel::<(Stream, String)>(256);
        let readers = [
            child
                .stdout
                .take()
                .map(|o| spawn_reader(o, Stream::Stdout, tx.clone())),
            child
                .stderr
                .take()
                .map(|e| spawn_reader(e, Stream::Stderr, tx.clone())),
        ];
        Self {
            rx,
            open: true,
            readers,
            tail: Tail::default(),
        }
    }

    /// A line received (or the end of the output).
    fn take(&mut self, line: Option<(Stream, String)>, on_line: &mut impl FnMut(Stream, &str)) {
        match line {
            Some((stream, line)) => {
                on_line(stream, &line);
                self.tail.push(&line);
            }
            None => self.open = false,
        }
    }

    /// Hands on what the readers already have, without waiting on a pipe someone else holds.
    async fn drain(mut self, on_line: &mut impl FnMut(Stream, &str)) -> String {
        let drain = async {
            while let Some((stream, line)) = self.rx.recv().await {
                on_line(stream, &line);
                self.tail.push(&line);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        for reader in self.readers.into_iter().flatten() {
            reader.abort();
        }
        self.tail.text()
    }
}

/// Why the loop of a run ended.
enum Ended {
    /// The program exited with this status.
    Exited(ExitStatus),
    TimedOut,
    Cancelled,
    FinishedEarly,
    /// The guard exited without saying how the program ended.
    GuardGone,
}

async fn run_guarded(
    guard: &Path,
    spec: &Spec,
    cancel: &CancellationToken,
    mut on_line: impl FnMut(Stream, &str),
) -> std::io::Result<Finished> {
    use tokio::io::AsyncWriteExt;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut cmd = Command::new(guard);
    cmd.arg0("pipeline-guard")
        .arg(crate::guard::ARG)
        .arg(&spec.program)
        .args(&spec.args)
        .current_dir(&spec.cwd)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // Dropped, the run drops its end of the link too: the guard then kills everything
        // it holds, which SIGKILLing the guard first would prevent.
        .kill_on_drop(false);
    if spec.clear_env {
        cmd.env_clear();
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let records = RECORDS.get();
    if let Some(records) = records {
        cmd.env(TAG_VAR, &records.tag);
    }
    let mut child = cmd.spawn()?;
    let pgid = child.id().unwrap_or(0);
    if let Some(records) = records {
        records.started(pgid);
    }
    ours.set_nonblocking(true)?;
    let (link_in, mut link_out) = tokio::net::UnixStream::from_std(ours)?.into_split();
    let orders = crate::guard::Orders {
        stdin: spec.stdin.as_ref().map(|b| b.len() as u64),
        reap_group: spec.reap_group,
        sandbox: spec.sandbox.clone(),
    };
    let mut header = serde_json::to_vec(&orders).map_err(std::io::Error::other)?;
    header.push(b'\n');
    // The orders and the input go in from their own task, so a program that does not read its
    // input cannot block the reading of its output. The task then holds this end of the link
    // until it is aborted: that cuts the link.
    let input = spec.stdin.clone().unwrap_or_default();
    let link = Link(tokio::spawn(async move {
        if link_out.write_all(&header).await.is_ok() {
            let _ = link_out.write_all(&input).await;
        }
        let _held = link_out;
        std::future::pending::<()>().await;
    }));
    let mut reports = BufReader::new(link_in).lines();
    let mut reports_open = true;
    let mut output = Output::new(&mut child);
    let mut spawn_error: Option<std::io::Error> = None;

    let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
    let finish = spec.finish.clone().unwrap_or_default();
    let mut finish_deadline: Option<tokio::time::Instant> = None;
    let mut guard_status: Option<ExitStatus> = None;
    let ended = loop {
        tokio::select! {
            () = finish.cancelled(), if spec.finish.is_some() && finish_deadline.is_none() => {
                finish_deadline = Some(tokio::time::Instant::now() + spec.finish_grace);
            }
            () = sleep_until(finish_deadline) => break Ended::FinishedEarly,
            line = output.rx.recv(), if output.open => output.take(line, &mut on_line),
            report = reports.next_line(), if reports_open => match report {
                Ok(Some(line)) => match crate::guard::Report::parse(&line) {
                    Some(crate::guard::Report::Ended(raw)) => {
                        use std::os::unix::process::ExitStatusExt;
                        break Ended::Exited(ExitStatus::from_raw(raw));
                    }
                    Some(crate::guard::Report::Failed(kind, why)) => {
                        spawn_error = Some(std::io::Error::new(kind, why));
                    }
                    Some(crate::guard::Report::Started(_)) | None => {}
                },
                Ok(None) | Err(_) => reports_open = false,
            },
            status = child.wait() => {
                guard_status = Some(status?);
                break Ended::GuardGone;
            }
            () = sleep_until(deadline) => break Ended::TimedOut,
            () = cancel.cancelled() => break Ended::Cancelled,
        }
    };
    // The guard exited: its last words may still be on the link (it reports, then exits).
    let ended = match ended {
        Ended::GuardGone => {
            let last = async {
                while let Ok(Some(line)) = reports.next_line().await {
                    match crate::guard::Report::parse(&line) {
                        Some(crate::guard::Report::Ended(raw)) => return Some(raw),
                        Some(crate::guard::Report::Failed(kind, why)) => {
                            spawn_error = Some(std::io::Error::new(kind, why));
                        }
                        _ => {}
                    }
                }
                None
            };
            match tokio::time::timeout(Duration::from_secs(2), last).await {
                Ok(Some(raw)) => {
                    use std::os::unix::process::ExitStatusExt;
                    Ended::Exited(ExitStatus::from_raw(raw))
                }
                _ => Ended::GuardGone,
            }
        }
        ended => ended,
    };
    let stopped = !matches!(ended, Ended::Exited(_) | Ended::GuardGone);
    let mut leftover = None;
    if stopped {
        // SIGTERM to the group (the guard stays), the grace, then the guard kills the rest
        // once the link is cut; SIGKILL to the group only if the guard itself is stuck.
        signal_group(pgid, Signal::TERM);
        if tokio::time::timeout(spec.kill_grace, child.wait())
            .await
            .is_err()
        {
            link.cut();
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                signal_group(pgid, Signal::KILL);
                let _ = child.wait().await;
            }
        }
        link.cut();
    } else if guard_status.is_some() {
        link.cut();
        if matches!(ended, Ended::GuardGone) {
            // The guard was killed (the OOM killer, a person): what stayed in its group goes
            // now (its id cannot be taken while members live); what left the group waits for
            // the next start's sweep.
            signal_group(pgid, Signal::KILL);
        }
    } else if spec.reap_group {
        // The guard kills what the program left, then exits.
        link.cut();
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            signal_group(pgid, Signal::KILL);
            let _ = child.wait().await;
        }
    } else {
        // What the program left runs on, as long as the link is held.
        leftover = Some(Leftover {
            link,
            pid: pgid,
            _guard: child,
        });
    }
    if leftover.is_none()
        && let Some(records) = records
    {
        records.ended(pgid);
    }
    let mut tail = output.drain(&mut on_line).await;
    if let Some(e) = spawn_error {
        return Err(e);
    }
    let failed = !matches!(ended, Ended::Exited(s) if s.success());
    if failed && spec.sandbox.is_some() && sandbox_may_have_denied(&tail) {
        tail.push_str(SANDBOX_HINT);
    }
    let (status, timed_out, cancelled, finished_early) = match ended {
        Ended::Exited(status) => (Some(status), false, false, false),
        Ended::TimedOut => (None, true, false, false),
        Ended::Cancelled => (None, false, true, false),
        Ended::FinishedEarly => (None, false, false, true),
        Ended::GuardGone => {
            // Not the program's doing: its guard was killed (the OOM killer, a person).
            let how = guard_status.map_or_else(String::new, |s| format!(" ({s})"));
            return Err(std::io::Error::other(format!(
                "the guard of the process died{how}; what it guarded was killed or is stopped at the next start"
            )));
        }
    };
    Ok(Finished {
        status,
        timed_out,
        cancelled,
        finished_early,
        tail,
        leftover,
    })
}

/// Said after the output of a sandboxed process that failed with a permission error: the
/// sandbox may be what refused it (Landlock's refusals look like any other).
const SANDBOX_HINT: &str = "\n(this ran in the sandbox: if it needs a path outside its \
                            worktree, allow it with --sandbox-read or --sandbox-write)";

/// Whether an output's tail tells of a permission refused.
fn sandbox_may_have_denied(tail: &str) -> bool {
    tail.contains("Permission denied") || tail.contains("Operation not permitted")
}

/// Starts the program itself (no guard installed: unit tests), in its own group.
async fn run_direct(
    spec: &Spec,
    cancel: &CancellationToken,
    mut on_line: impl FnMut(Stream, &str),
) -> std::io::Result<Finished> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(&spec.cwd)
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if spec.clear_env {
        cmd.env_clear();
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let pgid = child.id().unwrap_or(0);
    // The input goes in from its own task, so a child that does not read it cannot block the
    // reading of its output; the pipe closes when it is written.
    let writer = match (child.stdin.take(), &spec.stdin) {
        (Some(mut pipe), Some(bytes)) => {
            let bytes = bytes.clone();
            Some(tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = pipe.write_all(&bytes).await;
                let _ = pipe.shutdown().await;
            }))
        }
        _ => None,
    };
    let mut output = Output::new(&mut child);
    let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
    let finish = spec.finish.clone().unwrap_or_default();
    let mut finish_deadline: Option<tokio::time::Instant> = None;
    let ended = loop {
        tokio::select! {
            () = finish.cancelled(), if spec.finish.is_some() && finish_deadline.is_none() => {
                finish_deadline = Some(tokio::time::Instant::now() + spec.finish_grace);
            }
            () = sleep_until(finish_deadline) => break Ended::FinishedEarly,
            line = output.rx.recv(), if output.open => output.take(line, &mut on_line),
            status = child.wait() => break Ended::Exited(status?),
            () = sleep_until(deadline) => break Ended::TimedOut,
            () = cancel.cancelled() => break Ended::Cancelled,
        }
    };
    if !matches!(ended, Ended::Exited(_)) {
        signal_group(pgid, Signal::TERM);
        if tokio::time::timeout(spec.kill_grace, child.wait())
            .await
            .is_err()
        {
            signal_group(pgid, Signal::KILL);
            let _ = child.wait().await;
        }
    }
    // Whatever is left of the group (daemonised grandchildren) goes too.
    if spec.reap_group || !matches!(ended, Ended::Exited(_)) {
        signal_group(pgid, Signal::KILL);
    }
    if let Some(writer) = writer {
        writer.abort();
    }
    let tail = output.drain(&mut on_line).await;
    let (status, timed_out, cancelled, finished_early) = match ended {
        Ended::Exited(status) => (Some(status), false, false, false),
        Ended::TimedOut => (None, true, false, false),
        Ended::Cancelled => (None, false, true, false),
        Ended::FinishedEarly => (None, false, false, true),
        // Only a guarded run has a guard to lose.
        Ended::GuardGone => (None, false, false, false),
    };
    Ok(Finished {
        status,
        timed_out,
        cancelled,
        finished_early,
        tail,
        leftover: None,
    })
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn spawn_reader(
    pipe: impl AsyncRead + Unpin + Send + 'static,
    stream: Stream,
    tx: mpsc::Sender<(Stream, String)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                    }
                    let line = cut_line(&String::from_utf8_lossy(&buf));
                    if tx.send((stream, line)).await.is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// The last lines of output, bounded in lines and bytes.
#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    fn push(&mut self, line: &str) {
        let line: String = line.chars().take(2048).collect();
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
        while self.lines.len() > TAIL_LINES || self.bytes > TAIL_BYTES {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.len() + 1;
            }
        }
    }

    fn text(&self) -> String {
        self.lines
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(script: &str) -> Spec {
        Spec {
            kill_grace: Duration::from_millis(200),
            ..Spec::shell(script, std::env::temp_dir())
        }
    }

    #[tokio::test]
    async fn captures_lines_and_exit_codes() {
        let mut seen = Vec::new();
        let f = run(
            &spec("echo out; echo err >&2; exit 3"),
            &CancellationToken::new(),
            |s, l| seen.push((s, l.to_owned())),
        )
        .await
        .expect("run");
        assert_eq!(f.code(), Some(3));
        assert_eq!(f.describe(), "exit 3");
        seen.sort_by_key(|(s, _)| *s == Stream::Stderr);
        assert_eq!(
            seen,
            vec![
                (Stream::Stdout, "out".to_owned()),
                (Stream::Stderr, "err".to_owned())
            ]
        );
        assert!(f.tail.contains("out") && f.tail.contains("err"));
    }

    #[tokio::test]
    async fn stdin_is_written_then_closed() {
        let s = Spec {
            stdin: Some(b"first\nsecond\n".to_vec()),
            ..spec("cat; echo done")
        };
        let mut seen = Vec::new();
        let f = run(&s, &CancellationToken::new(), |_, l| {
            seen.push(l.to_owned())
        })
        .await
        .expect("run");
        assert!(f.success(), "cat saw the end of its input");
        assert_eq!(seen, ["first", "second", "done"]);
    }

    #[tokio::test]
    async fn a_process_that_hangs_after_its_final_word_is_stopped() {
        let finish = CancellationToken::new();
        let s = Spec {
            finish: Some(finish.clone()),
            finish_grace: Duration::from_millis(100),
            ..spec("echo result; sleep 30")
        };
        let f = run(&s, &CancellationToken::new(), |_, l| {
            if l == "result" {
                finish.cancel();
            }
        })
        .await
        .expect("run");
        assert!(f.finished_early && !f.timed_out && !f.cancelled);
        assert_eq!(f.describe(), "stopped after its final report");
        // One that exits within its grace ends as itself.
        let finish = CancellationToken::new();
        let s = Spec {
            finish: Some(finish.clone()),
            finish_grace: Duration::from_secs(30),
            ..spec("echo result; exit 4")
        };
        let f = run(&s, &CancellationToken::new(), |_, _| finish.cancel())
            .await
            .expect("run");
        assert!(!f.finished_early);
        assert_eq!(f.code(), Some(4));
    }

    /// Whether `pid` is a live (not zombie) process.
    fn alive(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit(')')
                    .next()
                    .map(|rest| rest.trim_start().to_owned())
            })
            .is_some_and(|rest| !rest.starts_with('Z'))
    }

    #[tokio::test]
    async fn a_time_limit_kills_the_whole_group() {
        let dir = tempfile::tempdir().expect("dir");
        let pidfile = dir.path().join("grandchild.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let mut s = spec(&script);
        s.timeout = Some(Duration::from_millis(300));
        let f = run(&s, &CancellationToken::new(), |_, _| {})
            .await
            .expect("run");
        assert!(f.timed_out);
        assert!(!f.success());
        let pid = std::fs::read_to_string(&pidfile).expect("pid file");
        let pid = pid.trim();
        let start = std::time::Instant::now();
        while alive(pid) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "grandchild {pid} outlived the stop"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test]
    async fn cancellation_stops_it() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let handle = tokio::spawn(async move { run(&spec("sleep 30"), &c, |_, _| {}).await });
        cancel.cancel();
        let f = handle.await.expect("join").expect("run");
        assert!(f.cancelled);
        assert_eq!(f.describe(), "cancelled");
    }
}
