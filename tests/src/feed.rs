//! Following a server's change feed from a test: `pipelinectl watch --all --json` as a child
//! process whose JSON lines are kept, and waits for an entry with a deadline. A test waits on
//! what a user could see (an entry of the feed), never on a log line or a sleep.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;

use crate::{DEADLINE, Server};

/// A running `pipelinectl watch --all --json` (or `--kind`); killed when dropped.
pub struct FeedWatch {
    child: Child,
    seen: Arc<Mutex<Vec<Value>>>,
    /// The index in `seen` of each entry as it arrives.
    arrived: Receiver<usize>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Follows the whole change feed from now on.
    pub fn feed(&self) -> FeedWatch {
        self.feed_with(&[])
    }

    /// Follows the change feed after position `after` (the entries since first).
    pub fn feed_after(&self, after: i64) -> FeedWatch {
        self.feed_with(&["--after", &after.to_string()])
    }

    /// Follows the feed with `watch --all --json` plus `extra` arguments (`--kind K` for one
    /// topic: then `--all` is left out).
    pub fn feed_with(&self, extra: &[&str]) -> FeedWatch {
        let mut cmd = self.ctl_command();
        cmd.args(["watch", "--json"]);
        if !extra.contains(&"--kind") {
            cmd.arg("--all");
        }
        cmd.args(extra);
        FeedWatch::spawn(&mut cmd)
    }
}

impl FeedWatch {
    fn spawn(cmd: &mut std::process::Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, arrived) = mpsc::channel();
        let sink = Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("watch --json printed {line:?}: {e}"));
                let index = {
                    let mut seen = sink.lock().unwrap_or_else(|e| e.into_inner());
                    seen.push(value);
                    seen.len() - 1
                };
                let _ = tx.send(index);
            }
        });
        let errors = Arc::new(Mutex::new(Vec::new()));
        let err_sink = Arc::clone(&errors);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                err_sink
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line);
            }
        });
        Self {
            child,
            seen,
            arrived,
            stderr: errors,
        }
    }

    /// Every entry received so far, in order.
    pub fn entries(&self) -> Vec<Value> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What the watch said on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Waits (up to [`DEADLINE`]) for an entry that `cond` accepts, received at any time
    /// since the watch began; returns it.
    pub fn wait(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        if let Some(found) = self.entries().into_iter().find(|e| cond(e)) {
            return found;
        }
        let start = Instant::now();
        loop {
            match self
                .arrived
                .recv_timeout(DEADLINE.saturating_sub(start.elapsed()))
            {
                Ok(index) => {
                    let entry = self.entries()[index].clone();
                    if cond(&entry) {
                        return entry;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no feed entry {what} within {DEADLINE:?}; seen:\n{}\nstderr:\n{}",
                    self.entries()
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "the watch ended before an entry {what}; stderr:\n{}",
                    self.stderr()
                ),
            }
        }
    }

    /// Waits for the entry of `topic` about `subject` of `kind`.
    pub fn wait_kind(&self, topic: &str, subject: &str, kind: &str) -> Value {
        self.wait(&format!("{topic} {subject} {kind}"), |e| {
            e["topic"] == topic && e["subject"] == subject && e["kind"] == kind
        })
    }
}

impl Drop for FeedWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
