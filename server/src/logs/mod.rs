//! Run logs and live task transitions.
//!
//! - Ingest: runners (and the integrator) hand lines to one writer task, which batches whatever
//!   is waiting into one transaction (a 1,000-row statement costs about what a 1-row one does),
//!   then acknowledges each batch to its sender. Lines carry a per-run `seq`; a resent line is
//!   ignored by the store, so a runner resends freely after a reconnect.
//! - Fan-out: after each commit the writer publishes the lines to each of the task's followers
//!   (shared `Arc`s, built once). Followers are fed from memory; one that falls behind by more
//!   than its byte budget ([`FOLLOW_BUDGET_BYTES`]) has what it was holding dropped and catches
//!   up from storage, so a slow or stalled follower never slows the writer, the runner or other
//!   followers, and never holds more than its budget.
//! - Limits: a line over 64 KiB is cut with a marker; a run's log past `--log-cap-bytes` keeps
//!   its first half-cap of lines and its newest half-cap, and readers show the gap.

mod follow;
mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

pub use follow::{Resume, Watched, stream_feed, stream_logs, stream_transitions};
pub use writer::run as writer;

use crate::domain::{LogLine, Run, TaskId, TaskStatus};
use crate::error::{Error, Result};

/// How many appends may wait for the writer before senders wait.
const WRITER_QUEUE: usize = 1024;

/// The bytes of log lines a follower of a task may hold, published but not yet taken: past
/// it, what it holds is dropped and it catches up from storage (the lines are stored before
/// they are published). With the few batches on their way to its client (each at most one
/// runner's message), this bounds what one follower, stalled or not, costs the server.
pub const FOLLOW_BUDGET_BYTES: usize = 8 << 20;

/// What one published event costs a follower that holds it: its lines' text and a little
/// for each line's fields.
fn event_bytes(event: &LogEvent) -> usize {
    match event {
        LogEvent::Lines { lines, .. } => lines.iter().map(|l| l.text.len() + 64).sum(),
        LogEvent::Status(_) => 16,
    }
}

/// One follower's events, waiting to be taken.
#[derive(Default)]
struct Held {
    events: std::collections::VecDeque<(LogEvent, usize)>,
    bytes: usize,
    /// Events were dropped: it must catch up from storage.
    lagged: bool,
}

/// A follower of a task's logs, as the hub sees it.
#[derive(Default)]
struct Follower {
    held: Mutex<Held>,
    ready: tokio::sync::Notify,
}

impl Follower {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands it `event`, unless that would take it past its budget: then it drops what it
    /// holds and is told to catch up.
    fn push(&self, event: LogEvent) {
        let size = event_bytes(&event);
        let mut held = self.held();
        if held.lagged {
            return;
        }
        if held.bytes > 0 && held.bytes + size > FOLLOW_BUDGET_BYTES {
            held.events.clear();
            held.bytes = 0;
            held.lagged = true;
        } else {
            held.events.push_back((event, size));
            held.bytes += size;
        }
        drop(held);
        self.ready.notify_one();
    }
}

/// Fell behind by more than its budget: what it held was dropped, so it must catch up from
/// storage.
#[derive(Debug, PartialEq, Eq)]
pub struct Lagged;

/// A receiver of one task's log events ([`LogHub::subscribe`]); it stops receiving when
/// dropped.
pub struct Subscription {
    follower: Arc<Follower>,
}

impl Subscription {
    /// The next event, or [`Lagged`] once, after events were dropped for it.
    pub async fn recv(&mut self) -> std::result::Result<LogEvent, Lagged> {
        loop {
            // Made before looking, so that a push in between leaves its permit for it.
            let ready = self.follower.ready.notified();
            {
                let mut held = self.follower.held();
                if std::mem::take(&mut held.lagged) {
                    return Err(Lagged);
                }
                if let Some((event, size)) = held.events.pop_front() {
                    held.bytes -= size;
                    return Ok(event);
                }
            }
            ready.await;
        }
    }

    /// The bytes it holds now.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.follower.held().bytes
    }
}

/// A batch's wire encoding, made by the first follower that sends it and shared by the rest
/// (opaque bytes here: only the gRPC edge knows the encoding).
pub type SharedEncoding = Arc<std::sync::OnceLock<bytes::Bytes>>;

/// What followers of a task receive.
#[derive(Clone, Debug)]
pub enum LogEvent {
    Lines {
        run_id: i64,
        lines: Arc<[LogLine]>,
        encoded: SharedEncoding,
    },
    Status(TaskStatus),
}

/// What a `logs` stream sends, in order.
#[derive(Clone, Debug)]
pub enum LogItem {
    /// The run the lines that follow belong to (boxed: a run is large beside lines).
    Run(Box<Run>),
    Lines {
        run_id: i64,
        lines: Arc<[LogLine]>,
        encoded: SharedEncoding,
    },
    Status(TaskStatus),
}

/// Lines for the writer (or, with `status`, a transition to tell the task's followers once
/// the lines before it are stored).
struct Append {
    task: TaskId,
    run_id: i64,
    lines: Vec<LogLine>,
    status: Option<TaskStatus>,
    done: Option<oneshot::Sender<std::result::Result<u64, String>>>,
}

/// The in-memory side of logs: the writer's queue and the broadcast channels.
pub struct LogHub {
    writer: mpsc::Sender<Append>,
    queue: Mutex<Option<mpsc::Receiver<Append>>>,
    followers: Mutex<HashMap<TaskId, Vec<std::sync::Weak<Follower>>>>,
    /// The newest history entry when the server started: where a watch whose position the
    /// history does not hold goes on from.
    history_start: std::sync::atomic::AtomicI64,
    /// A run's log beyond this many bytes keeps its head and tail only.
    pub cap_bytes: u64,
}

pub use pipeline_core::lines::MAX_LINE_BYTES;

/// Cuts a line over [`MAX_LINE_BYTES`], saying how much went.
pub fn cut_line(text: String) -> String {
    if text.len() <= MAX_LINE_BYTES {
        text
    } else {
        pipeline_core::lines::cut_line(&text)
    }
}

impl LogHub {
    pub fn new(cap_bytes: u64) -> Self {
        let (writer, queue) = mpsc::channel(WRITER_QUEUE);
        Self {
            writer,
            queue: Mutex::new(Some(queue)),
            followers: Mutex::new(HashMap::new()),
            history_start: std::sync::atomic::AtomicI64::new(0),
            cap_bytes,
        }
    }

    /// Records the newest history entry as the server starts (before it writes any).
    pub fn set_history_start(&self, newest: i64) {
        self.history_start
            .store(newest, std::sync::atomic::Ordering::Relaxed);
    }

    /// The newest history entry when the server started.
    pub fn history_start(&self) -> i64 {
        self.history_start
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn followers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<TaskId, Vec<std::sync::Weak<Follower>>>> {
        self.followers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receiver of the task's log events from now on.
    pub fn subscribe(&self, task: &TaskId) -> Subscription {
        let follower = Arc::new(Follower::default());
        self.followers()
            .entry(task.clone())
            .or_default()
            .push(Arc::downgrade(&follower));
        Subscription { follower }
    }

    fn publish(&self, task: &TaskId, event: LogEvent) {
        let live: Vec<Arc<Follower>> = {
            let mut followers = self.followers();
            let Some(list) = followers.get_mut(task) else {
                return;
            };
            list.retain(|f| f.strong_count() > 0);
            if list.is_empty() {
                followers.remove(task);
                return;
            }
            list.iter().filter_map(std::sync::Weak::upgrade).collect()
        };
        for follower in live {
            follower.push(event.clone());
        }
    }

    /// Tells the task's log followers about a transition through the writer, after the lines
    /// queued before it (so a follower that stops at the end of a task has seen its last
    /// lines). Watchers follow the change feed, which the store publishes.
    pub fn publish_transition(&self, task: &TaskId, to: TaskStatus) {
        let status = Append {
            task: task.clone(),
            run_id: 0,
            lines: Vec::new(),
            status: Some(to),
            done: None,
        };
        if let Err(err) = self.writer.try_send(status) {
            // The writer is swamped (or gone): tell the followers now rather than late.
            let a = err.into_inner();
            if let Some(to) = a.status {
                self.publish(&a.task, LogEvent::Status(to));
            }
        }
    }

    /// Queues lines and waits until they are durable; returns the highest seq stored.
    pub async fn append(&self, task: TaskId, run_id: i64, lines: Vec<LogLine>) -> Result<u64> {
        let (done, wait) = oneshot::channel();
        self.writer
            .send(Append {
                task,
                run_id,
                lines,
                status: None,
                done: Some(done),
            })
            .await
            .map_err(|_| Error::Internal("the log writer has stopped".into()))?;
        wait.await
            .map_err(|_| Error::Internal("the log writer has stopped".into()))?
            .map_err(Error::Internal)
    }

    /// Queues the server's own lines without waiting.
    pub fn append_nowait(&self, task: TaskId, run_id: i64, lines: Vec<LogLine>) {
        let _ = self.writer.try_send(Append {
            task,
            run_id,
            lines,
            status: None,
            done: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize, bytes: usize) -> LogEvent {
        let lines: Vec<LogLine> = (0..n)
            .map(|i| LogLine {
                seq: i as u64 + 1,
                at: 0,
                stream: crate::domain::LogStream::Stdout,
                phase: crate::domain::Phase::Dev,
                text: "x".repeat(bytes),
            })
            .collect();
        LogEvent::Lines {
            run_id: 1,
            lines: lines.into(),
            encoded: SharedEncoding::default(),
        }
    }

    /// A follower that does not take what is published holds at most its budget: past it,
    /// what it held is dropped and it is told once to catch up; then it is fed again.
    #[tokio::test]
    async fn a_follower_holds_at_most_its_budget_then_catches_up() {
        let hub = LogHub::new(1 << 30);
        let task = TaskId::parse("t-1").expect("id");
        let mut stalled = hub.subscribe(&task);
        let mut reading = hub.subscribe(&task);
        // 1 MiB a batch: the ninth passes the 8 MiB budget.
        for _ in 0..20 {
            hub.publish(&task, lines(16, 64 * 1024 - 64));
            assert!(stalled.held_bytes() <= FOLLOW_BUDGET_BYTES);
            assert!(reading.recv().await.is_ok(), "a reader is fed every batch");
        }
        assert_eq!(stalled.held_bytes(), 0, "what it held was dropped");
        assert_eq!(
            stalled.recv().await.err(),
            Some(Lagged),
            "told to catch up, once"
        );
        hub.publish(&task, LogEvent::Status(TaskStatus::Done));
        assert!(matches!(
            stalled.recv().await,
            Ok(LogEvent::Status(TaskStatus::Done))
        ));
        // A follower that is gone is forgotten at the next publication.
        drop(stalled);
        drop(reading);
        hub.publish(&task, LogEvent::Status(TaskStatus::Done));
        assert!(hub.followers().get(&task).is_none());
    }
}
