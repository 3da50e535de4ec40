//! The guard: a small process between the runner (or the server) and every agent or build it
//! starts. The binary re-executes itself with [`ARG`] as its first argument (checked by
//! [`enter`] in `main`, before anything else), so no `pre_exec` code and no `unsafe` is
//! needed. The guard:
//!
//! 1. reads its orders from its stdin, a Unix socket whose other end the parent holds (the
//!    *link*): one JSON line, then the bytes for the program's stdin;
//! 2. makes itself a child subreaper, so descendants that leave the process group or
//!    daemonize (`setsid`, double forks) are re-parented to it rather than to init;
//! 3. starts the program from a thread that first applies the sandbox
//!    ([`crate::sandbox::Policy`]) to itself (Landlock confines a thread and what it starts),
//!    so the program is confined and the guard is not; or, under a separate user
//!    (`--sandbox user`), hands the program's own trees to that user and starts the program as
//!    it (uid, gid, no supplementary groups, its `HOME`); the program shares the guard's process
//!    group (the guard leads it), stdout and stderr;
//! 4. says `started PID`, then `ended STATUS` (the raw wait status) or `failed KIND MESSAGE`
//!    (the program could not be started) on the link;
//! 5. once the program has exited, kills everything left beneath it (unless told to leave it:
//!    `agentd run`), and exits;
//! 6. whenever the link ends (the parent died, however: SIGKILL included, or let go of it),
//!    SIGKILLs its whole subtree at once and exits.
//!
//! Why a link rather than `PR_SET_PDEATHSIG`: the death signal fires when the parent *thread*
//! ends (tokio's blocking threads come and go), it needs a `getppid` check for the parent that
//! died before `prctl`, and it carries nothing; the end of a socket is seen when the last
//! holder of the other end is gone, which is the parent process as a whole (the parent's end is
//! close-on-exec, so no other child inherits it), it is there from the first instant, and the
//! same socket carries the stdin bytes and the reports.
//!
//! SIGTERM, SIGINT and SIGHUP do not stop the guard: a stop signals the whole group, the
//! program gets it, and the guard stays to clean up after it. A parent that gives up on the
//! grace period cuts the link, and the guard SIGKILLs what is left.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use rustix::process::{Pid, Signal, WaitOptions};
use serde::{Deserialize, Serialize};

use crate::sandbox::Policy;

/// The hidden first argument that makes the binary a guard.
pub const ARG: &str = "__pipeline-guard";

/// The exit code of a guard that could not do its work (no orders, a broken link).
const GUARD_FAILED: u8 = 125;

/// What the guard is told on the first line of the link.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Orders {
    /// How many bytes follow the line, for the program's stdin; `None`: its stdin is null.
    pub stdin: Option<u64>,
    /// Kill what is left beneath the program once it exits (off for `agentd run`, whose run
    /// lives on in the background: then it is killed when the link ends).
    pub reap_group: bool,
    /// The sandbox to apply before starting the program; `None`: no sandbox.
    pub sandbox: Option<Policy>,
}

/// What the guard says on the link, one line each.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Report {
    Started(u32),
    /// The program could not be started: `notfound`, `denied` or `other`, and why.
    Failed(std::io::ErrorKind, String),
    /// The program's raw wait status.
    Ended(i32),
}

impl Report {
    pub(crate) fn line(&self) -> String {
        match self {
            Report::Started(pid) => format!("started {pid}\n"),
            Report::Failed(kind, why) => {
                let kind = match kind {
                    std::io::ErrorKind::NotFound => "notfound",
                    std::io::ErrorKind::PermissionDenied => "denied",
                    _ => "other",
                };
                format!("failed {kind} {}\n", why.replace('\n', " "))
            }
            Report::Ended(raw) => format!("ended {raw}\n"),
        }
    }

    pub(crate) fn parse(line: &str) -> Option<Self> {
        let (word, rest) = line.trim_end().split_once(' ')?;
        match word {
            "started" => rest.parse().ok().map(Report::Started),
            "ended" => rest.parse().ok().map(Report::Ended),
            "failed" => {
                let (kind, why) = rest.split_once(' ').unwrap_or((rest, ""));
                let kind = match kind {
                    "notfound" => std::io::ErrorKind::NotFound,
                    "denied" => std::io::ErrorKind::PermissionDenied,
                    _ => std::io::ErrorKind::Other,
                };
                Some(Report::Failed(kind, why.to_owned()))
            }
            _ => None,
        }
    }
}

/// If this process was started as a guard (`BINARY __pipeline-guard PROGRAM ARGS…`), does the
/// guard's work and returns its exit code; otherwise `None`, at once. Called first thing in
/// `main`.
pub fn enter() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(ARG)) {
        return None;
    }
    let Some(program) = args.next() else {
        eprintln!("pipeline guard: no program to run");
        return Some(ExitCode::from(GUARD_FAILED));
    };
    Some(guard(program, args.collect()))
}

fn guard(program: OsString, args: Vec<OsString>) -> ExitCode {
    let failed = |why: String| {
        eprintln!("pipeline guard: {why}");
        ExitCode::from(GUARD_FAILED)
    };
    let link = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => return failed(format!("no link to the parent: {e}")),
    };
    let mut reports = match link.try_clone() {
        Ok(l) => l,
        Err(e) => return failed(format!("no link to the parent: {e}")),
    };
    let mut input = BufReader::new(link);
    let mut line = String::new();
    match input.read_line(&mut line) {
        Ok(0) => return ExitCode::from(GUARD_FAILED), // the parent is already gone
        Ok(_) => {}
        Err(e) => return failed(format!("cannot read the orders: {e}")),
    }
    let orders: Orders = match serde_json::from_str(&line) {
        Ok(o) => o,
        Err(e) => return failed(format!("unreadable orders: {e}")),
    };
    // `ps` names it after the path it was started by (`/proc/self/exe`): call it what it is.
    let _ = rustix::thread::set_name(c"pipeline-guard");
    let me = rustix::process::getpid();
    if let Err(e) = rustix::process::set_child_subreaper(Some(me)) {
        return failed(format!("cannot become a child subreaper: {e}"));
    }
    // The group's stop signal is the program's to act on; the guard outlives it to clean up.
    let stopping = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&stopping)) {
            return failed(format!("cannot handle signal {signal}: {e}"));
        }
    }
    let mut say = |report: Report| {
        let _ = reports.write_all(report.line().as_bytes());
    };
    let mut command = Command::new(&program);
    command
        .args(&args)
        .stdin(if orders.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    // A separate user: the program's own trees are handed to it, and the program starts as
    // it (std drops the supplementary groups, then sets the gid and the uid).
    if let Some((policy, user)) = orders
        .sandbox
        .as_ref()
        .and_then(|p| Some((p, p.user.as_ref()?)))
    {
        if let Err(why) = policy.hand_over() {
            say(Report::Failed(std::io::ErrorKind::Other, why));
            return ExitCode::SUCCESS;
        }
        use std::os::unix::process::CommandExt;
        command
            .uid(user.uid)
            .gid(user.gid)
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
        // Git refuses a worktree whose git directory another user owns (the server's
        // integration worktree: its git directory stays the server's, read-only); the run's
        // own trees are safe for the run's own git (the command scope, which git honours).
        let mut n: usize = std::env::var("GIT_CONFIG_COUNT")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        for dir in &policy.owned {
            command
                .env(format!("GIT_CONFIG_KEY_{n}"), "safe.directory")
                .env(format!("GIT_CONFIG_VALUE_{n}"), dir);
            n += 1;
        }
        command.env("GIT_CONFIG_COUNT", n.to_string());
    }
    // Landlock is applied by a thread of its own, which then starts the program (which
    // inherits it) and ends: the guard itself stays outside the sandbox, free to find and kill
    // what it guards.
    let sandbox = orders.sandbox.clone().filter(|p| p.user.is_none());
    let spawned = std::thread::spawn(move || {
        if let Some(policy) = &sandbox {
            policy
                .apply()
                .map_err(|why| (std::io::ErrorKind::Other, why))?;
        }
        command.spawn().map_err(|e| {
            (
                e.kind(),
                format!("cannot run {}: {e}", program.to_string_lossy()),
            )
        })
    })
    .join();
    let mut child = match spawned {
        Ok(Ok(child)) => child,
        Ok(Err((kind, why))) => {
            say(Report::Failed(kind, why));
            return ExitCode::SUCCESS;
        }
        Err(_) => {
            say(Report::Failed(
                std::io::ErrorKind::Other,
                "the guard could not start the program".to_owned(),
            ));
            return ExitCode::from(GUARD_FAILED);
        }
    };
    let pid = child.id();
    say(Report::Started(pid));
    let stdin = child.stdin.take();
    let bytes = orders.stdin;
    // The link: the stdin bytes first, then nothing until it ends.
    std::thread::spawn(move || {
        if let (Some(n), Some(mut pipe)) = (bytes, stdin) {
            let _ = std::io::copy(&mut (&mut input).take(n), &mut pipe);
        }
        let mut sink = [0_u8; 512];
        loop {
            match input.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // The parent is gone, or let go: nothing it started may stay.
        kill_tree(me);
        std::process::exit(i32::from(GUARD_FAILED));
    });
    let program_pid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    loop {
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((reaped, status))) if Some(reaped) == program_pid => {
                if orders.reap_group {
                    kill_tree(me);
                }
                say(Report::Ended(status.as_raw()));
                if orders.reap_group {
                    return ExitCode::SUCCESS;
                }
                // What the program left runs on until the link ends (the thread above).
                loop {
                    match rustix::process::wait(WaitOptions::empty()) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(_) => std::thread::park(),
                    }
                }
            }
            // An orphan re-parented to the guard, reaped.
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                say(Report::Failed(
                    std::io::ErrorKind::Other,
                    format!("lost the program: {e}"),
                ));
                kill_tree(me);
                return ExitCode::from(GUARD_FAILED);
            }
        }
    }
}

/// A process as `/proc/<pid>/stat` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    /// Clock ticks after boot when it started (with the PID, it names one process).
    pub start: u64,
}

/// Parses `/proc/<pid>/stat` (the command name may hold spaces and parentheses: fields are
/// counted after the last `)`).
pub(crate) fn parse_stat(stat: &str) -> Option<ProcStat> {
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); ppid 4, pgrp 5, starttime 22.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgid: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

pub(crate) fn stat_of(pid: i32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every live process (PID and stat).
pub(crate) fn processes() -> Vec<(i32, ProcStat)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, stat_of(pid)?)))
        .filter(|(_, s)| s.state != 'Z' && s.state != 'X')
        .collect()
}

/// The processes beneath `root` (its descendants, and its group's members), not itself.
pub(crate) fn beneath(root: i32, all: &[(i32, ProcStat)]) -> Vec<i32> {
    let mut found: std::collections::BTreeSet<i32> = all
        .iter()
        .filter(|(pid, s)| s.pgid == root && *pid != root)
        .map(|(pid, _)| *pid)
        .collect();
    let mut frontier: Vec<i32> = std::iter::once(root).chain(found.iter().copied()).collect();
    while let Some(parent) = frontier.pop() {
        for (pid, s) in all {
            if s.ppid == parent && *pid != root && found.insert(*pid) {
                frontier.push(*pid);
            }
        }
    }
    found.into_iter().collect()
}

/// SIGKILLs everything beneath the guard until nothing is left (what dies re-parents its
/// children to the guard, a subreaper, so they are found on the next pass).
fn kill_tree(me: Pid) {
    let root = me.as_raw_nonzero().get();
    for _ in 0..1000 {
        let victims = beneath(root, &processes());
        if victims.is_empty() {
            return;
        }
        for pid in victims {
            if let Some(pid) = Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
        }
        // Reap what died (the main thread may be reaping too).
        while let Ok(Some(_)) = rustix::process::wait(WaitOptions::NOHANG) {}
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_survive_the_line() {
        for r in [
            Report::Started(42),
            Report::Ended(9),
            Report::Failed(
                std::io::ErrorKind::NotFound,
                "cannot run x: no\nsuch".into(),
            ),
        ] {
            let parsed = Report::parse(&r.line()).expect("parse");
            match (&r, &parsed) {
                (Report::Failed(k, _), Report::Failed(k2, why)) => {
                    assert_eq!(k, k2);
                    assert_eq!(why, "cannot run x: no such");
                }
                _ => assert_eq!(r, parsed),
            }
        }
        assert_eq!(Report::parse("nonsense"), None);
    }

    #[test]
    fn stat_lines_are_read_after_the_command_name() {
        let line = "1234 (a (weird) name) S 1 77 77 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 \
                    98765 0 0";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: 'S',
                ppid: 1,
                pgid: 77,
                start: 98765
            })
        );
        let me = std::process::id() as i32;
        let mine = stat_of(me).expect("own stat");
        assert_eq!(mine.pgid, rustix::process::getpgrp().as_raw_nonzero().get());
        assert!(mine.start > 0);
    }

    #[test]
    fn beneath_finds_descendants_and_group_members() {
        let s = |ppid, pgid| ProcStat {
            state: 'S',
            ppid,
            pgid,
            start: 0,
        };
        let all = [
            (10, s(1, 10)),  // the guard
            (11, s(10, 10)), // its program
            (12, s(11, 10)), // a grandchild in the group
            (13, s(12, 13)), // a grandchild's child in a new session
            (14, s(1, 10)),  // a group member re-parented elsewhere
            (15, s(14, 15)), // its child
            (20, s(1, 20)),  // unrelated
        ];
        assert_eq!(beneath(10, &all), [11, 12, 13, 14, 15]);
    }
}
