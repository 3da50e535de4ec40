//! The queue of feed entries for changes that live in memory only and happen where nothing may
//! wait on the database (a runner's work stream ending, its health told in a heartbeat): one
//! task records them, each in a transaction of its own, in the order they happened.
//!
//! The queue is bounded ([`CAPACITY`] entries). It fills only when the database takes writes
//! more slowly than runners change for a long while (a full disk, a lock held elsewhere);
//! then an entry that finds it full is not recorded: the change itself has happened and is in
//! memory (`runners` shows it), only its line in the feed is missing. The entries dropped are
//! counted, the first of a spell is logged at once, and the recorder says how many were
//! dropped when it next records one, so memory never grows with a database that stalls. An
//! entry the database refuses is tried again until it is written (see [`record`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use crate::feed::NewEntry;
use crate::store::Store;

/// The most entries waiting to be recorded.
pub(crate) const CAPACITY: usize = 4096;

/// The sending side of the queue.
pub(crate) struct NoteQueue {
    tx: mpsc::Sender<NewEntry>,
    /// Entries dropped since the recorder last said so.
    dropped: Arc<AtomicU64>,
}

impl NoteQueue {
    /// A queue whose entries `store` records, by a task started now.
    pub(crate) fn start<S: Store>(store: S) -> Self {
        let (queue, rx) = Self::new(CAPACITY);
        tokio::spawn(record(store, rx, Arc::clone(&queue.dropped)));
        queue
    }

    fn new(capacity: usize) -> (Self, mpsc::Receiver<NewEntry>) {
        let (tx, rx) = mpsc::channel(capacity);
        let queue = Self {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        (queue, rx)
    }

    /// Queues `entry` without waiting; false if the queue is full and it was dropped.
    pub(crate) fn push(&self, entry: NewEntry) -> bool {
        match self.tx.try_send(entry) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(entry)) => {
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        topic = %entry.topic,
                        subject = %entry.subject,
                        kind = %entry.kind,
                        "the feed's queue of runners' changes is full ({CAPACITY} entries: the \
                         database is not keeping up); this change is not recorded in the feed"
                    );
                }
                false
            }
            // The recorder is gone only when the runtime is shutting down.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Entries dropped since the recorder last said so.
    #[cfg(test)]
    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The first wait before an entry that could not be written is tried again; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Records the queue's entries in order, each in a transaction of its own. One that cannot be
/// written (the database failing) is tried again, waiting longer each time, until it is: the
/// feed then still tells of the change, and the loops it wakes (a runner connected is what
/// tells the dispatcher of its slots) still hear of it once the database is back. Meanwhile
/// the queue fills and drops what finds it full, as it says.
async fn record<S: Store>(store: S, mut rx: mpsc::Receiver<NewEntry>, dropped: Arc<AtomicU64>) {
    while let Some(entry) = rx.recv().await {
        let missed = dropped.swap(0, Ordering::Relaxed);
        if missed > 0 {
            tracing::warn!(
                missed,
                "changes of runners were not recorded in the feed while its queue was full"
            );
        }
        let mut wait = RETRY_FIRST;
        let mut failed = false;
        while let Err(e) = store.record(&entry).await {
            if !failed {
                tracing::warn!(
                    topic = %entry.topic,
                    subject = %entry.subject,
                    kind = %entry.kind,
                    "cannot record a change in the feed (trying again): {e}"
                );
                failed = true;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::Topic;
    use crate::store::memory::MemoryStore;

    fn entry(kind: &str) -> NewEntry {
        NewEntry::new(Topic::Runner, "r1", kind, 0, kind, serde_json::json!({}))
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_entry_counts_it_and_takes_the_next_once_there_is_room() {
        let (queue, mut rx) = NoteQueue::new(2);
        assert!(queue.push(entry("connected")));
        assert!(queue.push(entry("unhealthy")));
        assert!(!queue.push(entry("healthy")));
        assert!(!queue.push(entry("disconnected")));
        assert_eq!(queue.dropped(), 2);
        // What was queued stays, in order.
        assert_eq!(rx.recv().await.map(|e| e.kind), Some("connected".into()));
        assert!(queue.push(entry("connected")));
        assert_eq!(rx.recv().await.map(|e| e.kind), Some("unhealthy".into()));
        assert_eq!(rx.recv().await.map(|e| e.kind), Some("connected".into()));
    }

    #[tokio::test]
    async fn the_recorder_writes_the_entries_in_order_and_resets_the_count_of_dropped_ones() {
        let store = MemoryStore::new();
        let (queue, rx) = NoteQueue::new(1);
        assert!(queue.push(entry("connected")));
        assert!(!queue.push(entry("unhealthy")));
        assert_eq!(queue.dropped(), 1);
        let dropped = Arc::clone(&queue.dropped);
        let recorder = tokio::spawn(record(store.clone(), rx, Arc::clone(&dropped)));
        drop(queue);
        recorder.await.expect("the recorder ends with the queue");
        let kinds: Vec<String> = store
            .entries_after(0, 10)
            .await
            .expect("entries")
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["connected"]);
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
    }
}
