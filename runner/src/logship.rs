//! Ships one lease's log to the server as it happens: each line is numbered (per run, from 1)
//! and timestamped, kept until the server acknowledges it, and sent in whatever batch has
//! accumulated while the previous call was in flight (so a chatty agent costs one call per
//! batch, a quiet one a call per line). While the server is away the lines wait here and go
//! out on reconnect; a line the server already has is ignored there, so nothing is doubled.
//! Failed calls are retried with the runner's [`Backoff`] until the server refuses the lines
//! for good (the lease is over: [`CallError::Refused`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pipeline_core::clock::now_ms;
use pipeline_core::ids::LeaseRef;
use pipeline_core::lines::cut_line;
use tokio::sync::{mpsc, oneshot};

use crate::backoff::Backoff;
use crate::domain::{CallError, Channel, CurrentRunner, LogLine, Phase};
use crate::wire::Client;

/// Lines waiting for the server beyond this many bytes are dropped oldest first (the reader
/// sees the gap in the numbering).
const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;
/// The most lines one call carries.
const MAX_BATCH_LINES: usize = 5_000;
/// The most bytes one call carries (well under the 4 MiB message limit).
const MAX_BATCH_BYTES: usize = 2 * 1024 * 1024;

enum Msg {
    Line(LogLine),
    Flush(oneshot::Sender<()>),
}

/// The writing end of a lease's log.
#[derive(Clone)]
pub struct RunLog {
    tx: mpsc::UnboundedSender<Msg>,
    seq: Arc<AtomicU64>,
}

impl RunLog {
    /// Starts shipping the log of `lease`.
    pub fn start(client: Client, runner: CurrentRunner, lease: LeaseRef) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(ship(client, runner, lease, rx));
        Self {
            tx,
            seq: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Adds a line.
    pub fn line(&self, channel: Channel, phase: Phase, text: &str) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.tx.send(Msg::Line(LogLine {
            seq,
            at_ms: now_ms(),
            channel,
            phase,
            text: cut_line(text),
        }));
    }

    /// A lifecycle line of the runner's own.
    pub fn note(&self, phase: Phase, text: &str) {
        self.line(Channel::Runner, phase, text);
    }

    /// Waits until every line so far is stored by the server (or the lease is gone).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn ship(
    client: Client,
    runner: CurrentRunner,
    lease: LeaseRef,
    mut rx: mpsc::UnboundedReceiver<Msg>,
) {
    let mut pending: VecDeque<LogLine> = VecDeque::new();
    let mut pending_bytes = 0usize;
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut open = true;
    let mut backoff = Backoff::new();
    let take = |msg: Msg,
                pending: &mut VecDeque<LogLine>,
                bytes: &mut usize,
                waiters: &mut Vec<oneshot::Sender<()>>| match msg {
        Msg::Line(line) => {
            *bytes += line.text.len();
            pending.push_back(line);
            while *bytes > MAX_PENDING_BYTES {
                match pending.pop_front() {
                    Some(old) => *bytes -= old.text.len(),
                    None => break,
                }
            }
        }
        Msg::Flush(done) => waiters.push(done),
    };
    loop {
        if pending.is_empty() {
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
            if !open {
                return;
            }
            match rx.recv().await {
                Some(msg) => take(msg, &mut pending, &mut pending_bytes, &mut waiters),
                None => open = false,
            }
            continue;
        }
        // Everything that arrived meanwhile joins this batch.
        while let Ok(msg) = rx.try_recv() {
            take(msg, &mut pending, &mut pending_bytes, &mut waiters);
        }
        let (mut batch, mut size) = (0, 0);
        for line in pending.iter() {
            if batch >= MAX_BATCH_LINES || size + line.text.len() > MAX_BATCH_BYTES && batch > 0 {
                break;
            }
            size += line.text.len();
            batch += 1;
        }
        let sent = match runner.get() {
            Ok(id) => {
                let lines = pending.iter().take(batch);
                client.append_logs(&id, &lease, lines).await
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(acked) => {
                backoff.reset();
                while pending.front().is_some_and(|l| l.seq <= acked) {
                    if let Some(line) = pending.pop_front() {
                        pending_bytes -= line.text.len();
                    }
                }
            }
            Err(CallError::Refused { why, .. }) => {
                // The lease is over (or the lines are refused): nothing more will be taken.
                tracing::warn!(lease = %lease.id, error = %why, "log shipping stopped");
                pending.clear();
                pending_bytes = 0;
            }
            Err(_) => {
                // The server is away: keep the lines, wait, try again, still taking new ones.
                let sleep = tokio::time::sleep(backoff.next());
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        () = &mut sleep => break,
                        msg = rx.recv(), if open => match msg {
                            Some(msg) => take(msg, &mut pending, &mut pending_bytes, &mut waiters),
                            None => open = false,
                        },
                    }
                }
            }
        }
    }
}
