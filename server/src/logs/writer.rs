//! The log writer: the one task that stores log lines. It batches whatever is waiting into one
//! transaction (a 1,000-row statement costs about what a 1-row one does), then acknowledges each
//! batch to its sender and publishes its lines (and the transitions queued behind them) to the
//! task's followers. A run's log past the cap keeps its head and its tail.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{LogEvent, LogHub, SharedEncoding};
use crate::store::Store;

/// The most lines the writer puts in one transaction.
const MAX_BATCH_LINES: usize = 20_000;

/// Per run, how much of the log is kept, for the cap.
#[derive(Default)]
struct RunSize {
    bytes: u64,
    /// The last line of the head, once the head is full.
    head_last: Option<u64>,
    tail_bytes: u64,
}

/// Writes queued log lines in batches until `shutdown` (then drains the queue).
pub async fn run<S: Store>(hub: Arc<LogHub>, store: S, shutdown: CancellationToken) {
    let Some(mut queue) = hub.queue.lock().ok().and_then(|mut q| q.take()) else {
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
                        if size.bytes > hub.cap_bytes / 2 {
                            size.head_last = Some(line.seq);
                        }
                    }
                    Some(head_last) => {
                        size.tail_bytes += n;
                        if size.tail_bytes > hub.cap_bytes / 2 + hub.cap_bytes / 16 {
                            to_trim.insert(a.run_id, head_last);
                        }
                    }
                }
                rows.push((a.run_id, line.clone()));
            }
        }
        let stored = store.append_logs(&rows).await;
        if stored.is_ok() {
            crate::metrics::metrics()
                .log_lines
                .inc_by(rows.len() as u64);
        }
        for a in batch {
            let status = a.status;
            let task = a.task.clone();
            let result = match &stored {
                Ok(()) => {
                    let top = a.lines.iter().map(|l| l.seq).max().unwrap_or(0);
                    if !a.lines.is_empty() {
                        hub.publish(
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
                hub.publish(&task, LogEvent::Status(status));
            }
        }
        if let Err(e) = &stored {
            tracing::error!(error = %e, "storing log lines failed");
        }
        for (run, head_last) in to_trim {
            match store.trim_log(run, head_last, hub.cap_bytes / 2).await {
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
