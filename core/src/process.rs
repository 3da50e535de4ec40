//! Child processes the way a runner must run them: in their own process group, with null
//! stdin (or given bytes, then closed), output read line by line (each line handed to a callback and the last ones kept for
//! error messages), a time limit, and a stop that reaches grandchildren: SIGTERM to the group, a
//! grace period, then SIGKILL. The group is also killed once the child exits, so a stray
//! grandchild cannot hold the pipes open.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

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
#[allow(unsafe_code)]
fn signal_group(pgid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid names a process
    // group, and we only ever name the group of a child we spawned as its leader.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Runs `spec` to completion (or until its time limit or `cancel`), handing each output line
/// to `on_line`.
pub async fn run(
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
    let (tx, mut rx) = mpsc::channel::<(Stream, String)>(256);
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
    drop(tx);

    let mut tail = Tail::default();
    let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut timed_out = false;
    let mut cancelled = false;
    let mut finished_early = false;
    let mut lines_open = true;
    let finish = spec.finish.clone().unwrap_or_default();
    let mut finish_deadline: Option<tokio::time::Instant> = None;
    let status = loop {
        tokio::select! {
            () = finish.cancelled(), if spec.finish.is_some() && finish_deadline.is_none() => {
                finish_deadline = Some(tokio::time::Instant::now() + spec.finish_grace);
            }
            () = sleep_until(finish_deadline) => {
                finished_early = true;
                break None;
            }
            line = rx.recv(), if lines_open => match line {
                Some((stream, line)) => {
                    on_line(stream, &line);
                    tail.push(&line);
                }
                None => lines_open = false,
            },
            status = child.wait() => break Some(status?),
            () = sleep_until(deadline) => {
                timed_out = true;
                break None;
            }
            () = cancel.cancelled() => {
                cancelled = true;
                break None;
            }
        }
    };
    let status = match status {
        Some(status) => Some(status),
        None => {
            signal_group(pgid, libc::SIGTERM);
            match tokio::time::timeout(spec.kill_grace, child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    signal_group(pgid, libc::SIGKILL);
                    let _ = child.wait().await;
                }
            }
            None
        }
    };
    // Whatever is left of the group (daemonised grandchildren) goes too.
    if spec.reap_group || status.is_none() {
        signal_group(pgid, libc::SIGKILL);
    }
    // Drain what the readers already have, without waiting on a pipe someone else holds.
    let drain = async {
        while let Some((stream, line)) = rx.recv().await {
            on_line(stream, &line);
            tail.push(&line);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    for reader in readers.into_iter().flatten() {
        reader.abort();
    }
    if let Some(writer) = writer {
        writer.abort();
    }
    Ok(Finished {
        status,
        timed_out,
        cancelled,
        finished_early,
        tail: tail.text(),
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
