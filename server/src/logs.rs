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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::coordinator::Coordinator;
use crate::domain::{LogLine, Phase, Run, TaskEvent, TaskId, TaskStatus};
use crate::error::{Error, Result};
use crate::registry::LeaseRef;
use crate::runners::unregistered;
use crate::store::{NewRun, Store};

/// How many appends may wait for the writer before senders wait.
const WRITER_QUEUE: usize = 1024;
/// The most lines the writer puts in one transaction.
const MAX_BATCH_LINES: usize = 20_000;
/// Events a follower may fall behind by before it catches up from storage.
const FOLLOW_BUFFER: usize = 1024;
/// Lines read from storage at a time when catching up.
const PAGE: u32 = 2_000;

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
    /// The run the lines that follow belong to.
    Run(Run),
    Lines {
        run_id: i64,
        lines: Arc<[LogLine]>,
        encoded: SharedEncoding,
    },
    Status(TaskStatus),
}

/// Lines for the writer (or, with `status`, a transition to tell the task's followers once
/// the lines before it are stored).
pub struct Append {
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
            cap_bytes,
        }
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

/// Per run, how much of the log is kept, for the cap.
#[derive(Default)]
struct RunSize {
    bytes: u64,
    /// The last line of the head, once the head is full.
    head_last: Option<u64>,
    tail_bytes: u64,
}

impl<S: Store> Coordinator<S> {
    /// Appends a runner's lines for a lease; returns the highest seq stored. The lines of the
    /// dev phase go to the lease's dev run, those of the verify phase to its verify run (started
    /// by the first of them), so each run's log is what its header says.
    pub async fn append_logs(
        &self,
        runner_id: &str,
        lease: &LeaseRef,
        lines: Vec<LogLine>,
    ) -> Result<u64> {
        let (task, run_id, verify_run_id, runner) = {
            let mut registry = self.registry();
            // An ID the server does not know (it restarted, the runner is registering again)
            // is worth a retry; a lease that is someone else's is not.
            if registry.runner(runner_id).is_none() {
                return Err(unregistered(runner_id));
            }
            let live = registry
                .check(runner_id, lease, crate::coordinator::now_ms())
                .map_err(|why| {
                    Error::FailedPrecondition(format!(
                        "lease {} (epoch {}) is no longer yours: {why}; drop the work",
                        lease.id, lease.epoch
                    ))
                })?;
            let found = (
                live.task.clone(),
                live.run_id,
                live.verify_run_id,
                live.runner.clone(),
            );
            if let Some(top) = lines.iter().map(|l| l.seq).max() {
                registry.note_seq(&lease.id, top);
            }
            found
        };
        let run_id = match run_id {
            Some(id) => id,
            None => self
                .store
                .running_runs(&task)
                .await?
                .into_iter()
                .find(|r| r.phase == Phase::Dev)
                .map(|r| r.id)
                .ok_or_else(|| {
                    Error::FailedPrecondition(format!("task {task} has no running run"))
                })?,
        };
        let (dev, verify): (Vec<LogLine>, Vec<LogLine>) = lines
            .into_iter()
            .map(|mut l| {
                l.text = cut_line(l.text);
                l
            })
            .partition(|l| l.phase != Phase::Verify);
        let mut acked = 0;
        if !dev.is_empty() {
            acked = self.logs.append(task.clone(), run_id, dev).await?;
        }
        if !verify.is_empty() {
            let verify_run = match verify_run_id {
                Some(id) => id,
                None => {
                    // The verify run belongs to the patchset the runner is about to send.
                    let patchset = self.get(&task).await?.state.patchset + 1;
                    let id = self
                        .store
                        .start_run(
                            &task,
                            &NewRun {
                                phase: Phase::Verify,
                                patchset,
                                runner: Some(runner),
                            },
                            crate::coordinator::now_ms(),
                        )
                        .await?;
                    self.registry().set_verify_run(&lease.id, id);
                    id
                }
            };
            acked = acked.max(self.logs.append(task, verify_run, verify).await?);
        }
        Ok(acked)
    }

    /// Adds a line of the server's to the log of a lease's current run (why it ended: a
    /// cancel, a lapsed lease), numbered after every line the runner sent.
    pub(crate) fn note_on_run(&self, live: &crate::registry::LiveLease, text: &str) {
        let Some(run) = live.verify_run_id.or(live.run_id) else {
            return;
        };
        let line = LogLine {
            seq: live.last_seq + 1,
            at: crate::coordinator::now_ms(),
            stream: crate::domain::LogStream::Server,
            phase: if live.verify_run_id.is_some() {
                Phase::Verify
            } else {
                Phase::Dev
            },
            text: cut_line(text.to_owned()),
        };
        self.logs.append_nowait(live.task.clone(), run, vec![line]);
    }

    /// Writes queued log lines in batches until `shutdown` (then drains the queue).
    pub async fn log_writer(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut queue) = self.logs.queue.lock().ok().and_then(|mut q| q.take()) else {
            return;
        };
        let mut sizes: HashMap<i64, RunSize> = HashMap::new();
        loop {
            let first = tokio::select! {
                first = queue.recv() => first,
                () = shutdown.cancelled() => queue.try_recv().ok(),
            };
            let Some(first) = first else { return };
            let mut batch = vec![first];
            let mut count = batch[0].lines.len();
            while count < MAX_BATCH_LINES {
                match queue.try_recv() {
                    Ok(more) => {
                        count += more.lines.len();
                        batch.push(more);
                    }
                    Err(_) => break,
                }
            }
            let mut rows = Vec::with_capacity(count);
            let mut to_trim = BTreeMap::new();
            for a in &batch {
                let size = sizes.entry(a.run_id).or_default();
                for line in &a.lines {
                    let n = line.text.len() as u64 + 1;
                    match size.head_last {
                        None => {
                            size.bytes += n;
                            if size.bytes > self.logs.cap_bytes / 2 {
                                size.head_last = Some(line.seq);
                            }
                        }
                        Some(head_last) => {
                            size.tail_bytes += n;
                            if size.tail_bytes > self.logs.cap_bytes / 2 + self.logs.cap_bytes / 16
                            {
                                to_trim.insert(a.run_id, head_last);
                            }
                        }
                    }
                    rows.push((a.run_id, line.clone()));
                }
            }
            let stored = self.store.append_logs(&rows).await;
            for a in batch {
                let status = a.status;
                let task = a.task.clone();
                let result = match &stored {
                    Ok(()) => {
                        let top = a.lines.iter().map(|l| l.seq).max().unwrap_or(0);
                        if !a.lines.is_empty() {
                            self.logs.publish(
                                &a.task,
                                LogEvent::Lines {
                                    run_id: a.run_id,
                                    lines: a.lines.into(),
                                    encoded: SharedEncoding::default(),
                                },
                            );
                        }
                        Ok(top)
                    }
                    Err(e) => Err(e.to_string()),
                };
                if let Some(done) = a.done {
                    let _ = done.send(result);
                }
                if let Some(status) = status {
                    self.logs.publish(&task, LogEvent::Status(status));
                }
            }
            if let Err(e) = &stored {
                tracing::error!(error = %e, "storing log lines failed");
            }
            for (run, head_last) in to_trim {
                match self
                    .store
                    .trim_log(run, head_last, self.logs.cap_bytes / 2)
                    .await
                {
                    Ok(kept) => {
                        if let Some(size) = sizes.get_mut(&run) {
                            size.tail_bytes = kept;
                        }
                    }
                    Err(e) => tracing::error!(run, error = %e, "cutting a log to its cap failed"),
                }
            }
        }
    }

    /// Streams a task's logs: every run's stored lines, oldest run first; with `follow`, then
    /// the task's status and new lines as they come. Ends when the receiver hangs up.
    pub async fn stream_logs(
        self: Arc<Self>,
        task: TaskId,
        follow: bool,
        out: mpsc::Sender<LogItem>,
    ) -> Result<()> {
        let mut live = follow.then(|| self.logs.subscribe(&task));
        let current = self.get(&task).await?;
        let mut sent: BTreeMap<i64, u64> = BTreeMap::new();
        self.catch_up(&task, &mut sent, &out).await?;
        let Some(live) = live.as_mut() else {
            return Ok(());
        };
        if out
            .send(LogItem::Status(current.state.status))
            .await
            .is_err()
        {
            return Ok(());
        }
        loop {
            match live.recv().await {
                Ok(LogEvent::Lines {
                    run_id,
                    lines,
                    encoded,
                }) => {
                    if !sent.contains_key(&run_id) {
                        // A new run: its header, then what is stored of it so far.
                        self.catch_up(&task, &mut sent, &out).await?;
                    }
                    let last = sent.get(&run_id).copied().unwrap_or(0);
                    let item = if lines.first().is_some_and(|l| l.seq > last) {
                        // The usual case: all new, sent as is (and encoded once for all).
                        LogItem::Lines {
                            run_id,
                            lines: Arc::clone(&lines),
                            encoded,
                        }
                    } else {
                        let fresh: Vec<LogLine> =
                            lines.iter().filter(|l| l.seq > last).cloned().collect();
                        if fresh.is_empty() {
                            continue;
                        }
                        LogItem::Lines {
                            run_id,
                            lines: fresh.into(),
                            encoded: SharedEncoding::default(),
                        }
                    };
                    if let Some(top) = lines.iter().map(|l| l.seq).max() {
                        sent.insert(run_id, top.max(last));
                    }
                    if out.send(item).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(LogEvent::Status(status)) => {
                    if out.send(LogItem::Status(status)).await.is_err() {
                        return Ok(());
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(%task, missed, "a log follower fell behind; catching up from storage");
                    self.catch_up(&task, &mut sent, &out).await?;
                    let status = self.get(&task).await?.state.status;
                    if out.send(LogItem::Status(status)).await.is_err() {
                        return Ok(());
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }

    /// Sends what storage holds beyond what was `sent`, run by run.
    async fn catch_up(
        &self,
        task: &TaskId,
        sent: &mut BTreeMap<i64, u64>,
        out: &mpsc::Sender<LogItem>,
    ) -> Result<()> {
        for run in self.store.runs(task).await? {
            let id = run.id;
            if let std::collections::btree_map::Entry::Vacant(e) = sent.entry(id) {
                e.insert(0);
                if out.send(LogItem::Run(run)).await.is_err() {
                    return Ok(());
                }
            }
            loop {
                let after = sent.get(&id).copied().unwrap_or(0);
                let page = self.store.read_logs(id, after, PAGE).await?;
                let Some(top) = page.last().map(|l| l.seq) else {
                    break;
                };
                let full = page.len() == PAGE as usize;
                sent.insert(id, top);
                if out
                    .send(LogItem::Lines {
                        run_id: id,
                        lines: page.into(),
                        encoded: SharedEncoding::default(),
                    })
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                if !full {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Streams every task transition from now on; a watcher that falls behind catches up from
    /// the stored history. Ends when the receiver hangs up.
    pub async fn stream_transitions(
        self: Arc<Self>,
        out: mpsc::Sender<Arc<TaskEvent>>,
    ) -> Result<()> {
        let mut live = self.logs.watch();
        let mut last_id = 0;
        loop {
            match live.recv().await {
                Ok(event) => {
                    last_id = event.id;
                    if out.send(event).await.is_err() {
                        return Ok(());
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => loop {
                    let missed = self.store.events_after(last_id, PAGE).await?;
                    let Some(last) = missed.last() else { break };
                    last_id = last.id;
                    let full = missed.len() == PAGE as usize;
                    for event in missed {
                        if out.send(Arc::new(event)).await.is_err() {
                            return Ok(());
                        }
                    }
                    if !full {
                        break;
                    }
                },
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}
