//! What wakes the dispatcher and the integrator: entries of the change feed, each acted on
//! only once the coordinator's memory has followed every write published by then.
//!
//! The store publishes a write's entries as it commits, a moment before the coordinator's
//! commit path changes memory (the registry's leases, landing's pauses and red base, a
//! runner's drain). A loop that read memory on an entry at once could see memory from before
//! the write, find nothing to do, and sleep with nothing left to wake it. So every write whose
//! memory follows holds a [`Ticket`] from before it calls the store until memory has followed
//! ([`Following::begin`]), and a loop that takes entries waits, before it reads memory, until
//! every ticket handed out before it took them is let go ([`Following::settled`]). A write
//! whose entries were published by then began before, so memory is at least as new as them.
//!
//! Architecture invariant: the dispatcher and the integrator are woken only by the feed (and by
//! their own timers: a back-off's end, a lease's expiry, a red base's re-check); a write that
//! changes what they read in memory is ticketed.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use crate::domain::TaskStatus;
use crate::feed::{FeedEntry, Topic};

/// The writes whose memory has not followed yet.
pub(crate) struct Following {
    open: Mutex<Open>,
    /// Every ticket below this has been let go.
    low: watch::Sender<u64>,
}

struct Open {
    /// The next ticket to hand out.
    next: u64,
    /// Tickets handed out and not yet let go.
    held: BTreeSet<u64>,
}

/// A write under way whose memory has not followed yet; let go on drop (also when the write
/// fails or its future is dropped).
pub(crate) struct Ticket<'a> {
    following: &'a Following,
    number: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.following.end(self.number);
    }
}

impl Default for Following {
    fn default() -> Self {
        Self {
            open: Mutex::new(Open {
                next: 0,
                held: BTreeSet::new(),
            }),
            low: watch::Sender::new(0),
        }
    }
}

impl Following {
    fn open(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A ticket for a write about to be made, held until memory has followed it.
    pub(crate) fn begin(&self) -> Ticket<'_> {
        let mut open = self.open();
        let number = open.next;
        open.next += 1;
        open.held.insert(number);
        Ticket {
            following: self,
            number,
        }
    }

    fn end(&self, number: u64) {
        let mut open = self.open();
        open.held.remove(&number);
        let low = open.held.first().copied().unwrap_or(open.next);
        // Sent under the lock, so the mark only grows.
        self.low.send_if_modified(|l| {
            let moved = *l != low;
            *l = low;
            moved
        });
    }

    /// Now: every write begun before has a ticket below this.
    pub(crate) fn mark(&self) -> u64 {
        self.open().next
    }

    /// Waits until every ticket below `mark` is let go.
    pub(crate) async fn settled(&self, mark: u64) {
        let mut low = self.low.subscribe();
        // The sender lives as long as `self`: an error cannot happen while it is borrowed.
        let _ = low.wait_for(|low| *low >= mark).await;
    }
}

/// A loop's subscription to the feed: which entries wake it, and the wake-up it has taken but
/// not yet seen memory follow.
pub(crate) struct Wakeups {
    feed: broadcast::Receiver<Arc<FeedEntry>>,
    wants: fn(&FeedEntry) -> bool,
    /// Entries taken: memory must have followed every ticket below this.
    pending: Option<u64>,
}

impl Wakeups {
    /// Subscribes now: every entry published from here on is seen.
    pub(crate) fn new(feed: &crate::feed::Feed, wants: fn(&FeedEntry) -> bool) -> Self {
        Self {
            feed: feed.subscribe(),
            wants,
            pending: None,
        }
    }

    /// Waits for an entry the loop wants (or news that some were missed), takes every other
    /// entry already there (one round answers them all), then waits until memory has followed
    /// them. Cancel-safe: dropped while memory is still following, the next call waits for it
    /// and returns, so a round that ran in between is followed by another.
    pub(crate) async fn next(&mut self, following: &Following) {
        if self.pending.is_none() {
            loop {
                match self.feed.recv().await {
                    Ok(entry) if (self.wants)(&entry) => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    // The store (and the feed with it) outlives the loops.
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
            while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = self.feed.try_recv()
            {
            }
            self.pending = Some(following.mark());
        }
        if let Some(mark) = self.pending {
            following.settled(mark).await;
        }
        self.pending = None;
    }
}

/// Whether `entry` may change what a dispatch round does: a task that may have become
/// leasable or freed a slot (any task entry but a lease's own and a leased task's), a runner
/// (connected, healthy, drained, gone), a pause of the queue, landing (a red base holds
/// leases). A train's steps do not.
pub(crate) fn wakes_dispatcher(entry: &FeedEntry) -> bool {
    match entry.topic {
        Topic::Task => entry.to != Some(TaskStatus::InProgress),
        Topic::Runner | Topic::Queue | Topic::Landing => true,
        Topic::Train => false,
    }
}

/// Whether `entry` may change what the integrator does: a task that became (or stays, now
/// approved) Verified, or Done (its dependents may land now), a pause of the queue or landing,
/// a red base. Its own trains' entries do not.
pub(crate) fn wakes_integrator(entry: &FeedEntry) -> bool {
    match entry.topic {
        Topic::Task => matches!(entry.to, Some(TaskStatus::Verified | TaskStatus::Done)),
        Topic::Queue | Topic::Landing => true,
        Topic::Runner | Topic::Train => false,
    }
}

/// [`wakes_integrator`], and with `--early-builds` a lease's end too (the task leaves
/// In progress): an early group waiting for the task is dropped if it did not come Verified.
pub(crate) fn wakes_integrator_early(entry: &FeedEntry) -> bool {
    wakes_integrator(entry)
        || (entry.topic == Topic::Task && entry.from == Some(TaskStatus::InProgress))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(topic: Topic, to: Option<TaskStatus>) -> FeedEntry {
        FeedEntry {
            position: 1,
            topic,
            subject: "x".into(),
            kind: "k".into(),
            at: 0,
            from: None,
            to,
            message: String::new(),
            data: "{}".into(),
        }
    }

    #[tokio::test]
    async fn a_wake_up_waits_for_the_writes_begun_before_it_to_follow_in_memory() {
        let following = Following::default();
        let feed = crate::feed::Feed::new();
        let mut wakeups = Wakeups::new(&feed, wakes_dispatcher);
        let early = following.begin();
        feed.publish(entry(Topic::Task, Some(TaskStatus::Open)));
        let mut woken = std::pin::pin!(wakeups.next(&following));
        // The write whose entry it is has not followed in memory: not woken yet.
        assert!(!polled_ready(&mut woken));
        // A write begun after the entry was taken is not waited for.
        let late = following.begin();
        drop(early);
        assert!(polled_ready(&mut woken));
        drop(late);
    }

    #[tokio::test]
    async fn a_wake_up_dropped_while_memory_follows_is_kept_for_the_next_call() {
        let following = Following::default();
        let feed = crate::feed::Feed::new();
        let mut wakeups = Wakeups::new(&feed, wakes_integrator);
        let ticket = following.begin();
        feed.publish(entry(Topic::Landing, None));
        assert!(!polled_ready(&mut std::pin::pin!(wakeups.next(&following))));
        // Nothing new is published: the next call still wakes, once memory has followed.
        {
            let mut woken = std::pin::pin!(wakeups.next(&following));
            assert!(!polled_ready(&mut woken));
            drop(ticket);
            assert!(polled_ready(&mut woken));
        }
        // Taken: nothing wakes it again until another entry.
        assert!(!polled_ready(&mut std::pin::pin!(wakeups.next(&following))));
    }

    #[tokio::test]
    async fn entries_a_loop_does_not_want_do_not_wake_it_and_a_burst_is_one_wake_up() {
        let following = Following::default();
        let feed = crate::feed::Feed::new();
        let mut wakeups = Wakeups::new(&feed, wakes_integrator);
        feed.publish(entry(Topic::Train, None));
        feed.publish(entry(Topic::Runner, None));
        feed.publish(entry(Topic::Task, Some(TaskStatus::InProgress)));
        assert!(!polled_ready(&mut std::pin::pin!(wakeups.next(&following))));
        for _ in 0..3 {
            feed.publish(entry(Topic::Task, Some(TaskStatus::Verified)));
        }
        assert!(polled_ready(&mut std::pin::pin!(wakeups.next(&following))));
        assert!(!polled_ready(&mut std::pin::pin!(wakeups.next(&following))));
    }

    #[test]
    fn the_dispatcher_is_not_woken_by_leases_nor_the_integrator_by_runners() {
        assert!(!wakes_dispatcher(&entry(
            Topic::Task,
            Some(TaskStatus::InProgress)
        )));
        assert!(wakes_dispatcher(&entry(
            Topic::Task,
            Some(TaskStatus::Open)
        )));
        assert!(wakes_dispatcher(&entry(
            Topic::Task,
            Some(TaskStatus::Verified)
        )));
        assert!(wakes_dispatcher(&entry(Topic::Runner, None)));
        assert!(!wakes_dispatcher(&entry(Topic::Train, None)));
        assert!(wakes_integrator(&entry(
            Topic::Task,
            Some(TaskStatus::Done)
        )));
        assert!(!wakes_integrator(&entry(
            Topic::Task,
            Some(TaskStatus::Open)
        )));
        assert!(!wakes_integrator(&entry(Topic::Runner, None)));
        assert!(wakes_integrator(&entry(Topic::Queue, None)));
    }

    /// Polls `fut` once: whether it is ready.
    fn polled_ready<F: std::future::Future + Unpin>(fut: &mut F) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(fut).poll(&mut cx).is_ready()
    }
}
