//! Run logs and live task transitions.
//!
//! - Ingest: runners (and the integrator) hand lines to one writer task, which batches whatever
//!   is waiting into one transaction (a 1,000-row statement costs about what a 1-row one does),
//!   then acknowledges each batch to its sender. Lines carry a per-run `seq`; a resent line is
//!   ignored by the store, so a runner resends freely after a reconnect.
//! - Fan-out: after each commit the writer publishes the lines on the task's broadcast channel
//!   (shared `Arc`s, built once). Followers are fed from memory; one that falls behind (the
//!   channel overflows for it) catches up from storage, so a slow follower never slows the
//!   writer, the runner or other followers.
//! - Limits: a line over 64 KiB is cut with a marker; a run's log past `--log-cap-bytes` keeps
//!   its first half-cap of lines and its newest half-cap, and readers show the gap.

mod follow;
mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, oneshot};

pub use follow::{Resume, Watched, stream_logs, stream_transitions};
pub use writer::run as writer;

use crate::domain::{LogLine, Run, TaskEvent, TaskId, TaskStatus};
use crate::error::{Error, Result};

/// How many appends may wait for the writer before senders wait.
const WRITER_QUEUE: usize = 1024;
/// Events a follower may fall behind by before it catches up from storage.
const FOLLOW_BUFFER: usize = 1024;

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
    followers: Mutex<HashMap<TaskId, broadcast::Sender<LogEvent>>>,
    transitions: broadcast::Sender<Arc<TaskEvent>>,
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
        let (transitions, _) = broadcast::channel(FOLLOW_BUFFER);
        Self {
            writer,
            queue: Mutex::new(Some(queue)),
            followers: Mutex::new(HashMap::new()),
            transitions,
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

    fn followers(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, broadcast::Sender<LogEvent>>> {
        self.followers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receiver of the task's log events from now on.
    pub fn subscribe(&self, task: &TaskId) -> broadcast::Receiver<LogEvent> {
        self.followers()
            .entry(task.clone())
            .or_insert_with(|| broadcast::channel(FOLLOW_BUFFER).0)
            .subscribe()
    }

    fn publish(&self, task: &TaskId, event: LogEvent) {
        let mut followers = self.followers();
        if let Some(tx) = followers.get(task) {
            if tx.receiver_count() == 0 {
                followers.remove(task);
            } else {
                let _ = tx.send(event);
            }
        }
    }

    /// Tells every watcher about a transition, and the task's followers through the writer,
    /// after the lines queued before it (so a follower that stops at the end of a task has
    /// seen its last lines).
    pub fn publish_transition(&self, event: TaskEvent) {
        let status = Append {
            task: event.task_id.clone(),
            run_id: 0,
            lines: Vec::new(),
            status: Some(event.to),
            done: None,
        };
        if let Err(err) = self.writer.try_send(status) {
            // The writer is swamped (or gone): tell the followers now rather than late.
            let a = err.into_inner();
            if let Some(to) = a.status {
                self.publish(&a.task, LogEvent::Status(to));
            }
        }
        let _ = self.transitions.send(Arc::new(event));
    }

    /// A receiver of every task transition from now on.
    pub fn watch(&self) -> broadcast::Receiver<Arc<TaskEvent>> {
        self.transitions.subscribe()
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
