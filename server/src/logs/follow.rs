//! Reading logs and the change feed as streams: a task's logs, stored then live (`logs
//! --follow`), and the feed's entries live (`watch`: its task entries; `watch --all`, the
//! `Feed` RPC and `/events`: every topic, or those asked for), from the feed's broadcast
//! ([`crate::feed::Feed`]). Followers are fed from memory; one that falls behind catches up
//! from storage, so a slow follower never slows the writer, the runner or other followers.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use super::{LogEvent, LogHub, LogItem, SharedEncoding};
use crate::domain::{LogLine, TaskId};
use crate::error::{Error, Result};
use crate::feed::{FeedEntry, Topic};
use crate::store::Store;

/// Lines read from storage at a time when catching up, at most.
const PAGE: u32 = 2_000;

/// About the bytes one page read from storage should hold: the lines per page follow the
/// size of the lines read so far (a log of 64 KiB lines is read 32 at a time, not 2,000).
const PAGE_BYTES: usize = 2 << 20;

/// The lines of the next page, after a page of `lines` lines holding `bytes` bytes.
fn next_page(lines: usize, bytes: usize) -> u32 {
    let per_line = (bytes / lines.max(1)).max(1);
    u32::try_from(PAGE_BYTES / per_line)
        .unwrap_or(PAGE)
        .clamp(16, PAGE)
}

/// Streams a task's logs: every run's stored lines, oldest run first; with `follow`, then
/// the task's status and new lines as they come. Ends when the receiver hangs up.
pub async fn stream_logs<S: Store>(
    hub: Arc<LogHub>,
    store: S,
    task: TaskId,
    follow: bool,
    out: mpsc::Sender<LogItem>,
) -> Result<()> {
    let mut live = follow.then(|| hub.subscribe(&task));
    let current = get(&store, &task).await?;
    let mut sent: BTreeMap<i64, u64> = BTreeMap::new();
    catch_up(&store, &task, &mut sent, &out).await?;
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
                    catch_up(&store, &task, &mut sent, &out).await?;
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
            Err(super::Lagged) => {
                tracing::debug!(%task, "a log follower fell behind; catching up from storage");
                catch_up(&store, &task, &mut sent, &out).await?;
                let status = get(&store, &task).await?.state.status;
                if out.send(LogItem::Status(status)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Sends what storage holds beyond what was `sent`, run by run.
async fn catch_up<S: Store>(
    store: &S,
    task: &TaskId,
    sent: &mut BTreeMap<i64, u64>,
    out: &mpsc::Sender<LogItem>,
) -> Result<()> {
    for run in store.runs(task).await? {
        let id = run.id;
        if let std::collections::btree_map::Entry::Vacant(e) = sent.entry(id) {
            e.insert(0);
            if out.send(LogItem::Run(Box::new(run))).await.is_err() {
                return Ok(());
            }
        }
        // The first page small: lines may be up to 64 KiB each.
        let mut limit = 32;
        loop {
            let after = sent.get(&id).copied().unwrap_or(0);
            let page = store.read_logs(id, after, limit).await?;
            let Some(top) = page.last().map(|l| l.seq) else {
                break;
            };
            let full = page.len() == limit as usize;
            limit = next_page(page.len(), page.iter().map(|l| l.text.len()).sum());
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

/// What a watch streams.
#[derive(Debug)]
pub enum Watched {
    /// Where the stream starts: the newest position of the feed.
    From(i64),
    Event(Arc<FeedEntry>),
}

/// Where a watch goes on from: the feed position it saw last, and that entry's time when the
/// watcher knows it (so that an entry of the same position in another feed is not taken for
/// it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub after: i64,
    pub at: Option<i64>,
}

/// Streams every task transition (the feed's `task` entries) after the position `after`;
/// see [`stream_feed`].
pub async fn stream_transitions<S: Store>(
    hub: Arc<LogHub>,
    store: S,
    after: Option<Resume>,
    out: mpsc::Sender<Watched>,
) -> Result<()> {
    stream_feed(hub, store, after, |e| e.topic == Topic::Task, out).await
}

/// Streams the feed's entries that `keep` lets through after the position `after` (those
/// stored first, then the live ones, each once), or from now on; a watcher that falls behind
/// (the broadcast lagged) catches up from storage. Without `after`, the first item is a
/// marker with only the newest position: where a watcher that reconnects goes on from. A
/// position the stored feed does not hold (past its newest entry, or naming another: the
/// database went back, restored from a backup) is not taken as is, for nothing would come
/// after it: the stream begins with a marker too, and goes on after the newest entry from
/// before this server started, so what happened since comes first. Ends when the receiver
/// hangs up.
pub async fn stream_feed<S: Store>(
    hub: Arc<LogHub>,
    store: S,
    after: Option<Resume>,
    keep: impl Fn(&FeedEntry) -> bool + Send + Sync,
    out: mpsc::Sender<Watched>,
) -> Result<()> {
    // Subscribed before the feed is read, so nothing falls between the two.
    let mut live = store.feed().subscribe();
    let newest = store.last_event_id().await?;
    let from = match after {
        Some(resume) if holds(&store, resume, newest).await? => None,
        Some(resume) => {
            let from = hub.history_start().min(newest);
            tracing::warn!(
                after = resume.after,
                newest,
                from,
                "a watch resumed from a position this server's feed does not hold (its \
                 database went back?); it goes on from where this server started"
            );
            Some(from)
        }
        None => Some(newest),
    };
    let mut last = match (from, after) {
        (Some(from), _) => {
            if out.send(Watched::From(from)).await.is_err() {
                return Ok(());
            }
            from
        }
        (None, Some(resume)) => resume.after,
        (None, None) => newest,
    };
    if !catch_up_feed(&store, &mut last, &keep, &out).await? {
        return Ok(());
    }
    loop {
        match live.recv().await {
            // Published in position order: what storage already gave is not sent again.
            Ok(entry) if entry.position <= last => {}
            Ok(entry) if entry.position > last + 1 => {
                // An entry this subscriber never received (published before it subscribed
                // but after the read, or a publication that failed): read it from storage.
                if !catch_up_feed(&store, &mut last, &keep, &out).await? {
                    return Ok(());
                }
                if entry.position > last {
                    last = entry.position;
                    if keep(&entry) && out.send(Watched::Event(entry)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(entry) => {
                last = entry.position;
                if keep(&entry) && out.send(Watched::Event(entry)).await.is_err() {
                    return Ok(());
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                if !catch_up_feed(&store, &mut last, &keep, &out).await? {
                    return Ok(());
                }
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// Whether the stored feed holds the entry a watch resumes after (0: before the first).
async fn holds<S: Store>(store: &S, resume: Resume, newest: i64) -> Result<bool> {
    if resume.after > newest {
        return Ok(false);
    }
    let (Some(at), true) = (resume.at, resume.after > 0) else {
        return Ok(true);
    };
    let entry = store.entries_after(resume.after - 1, 1).await?;
    Ok(entry
        .first()
        .is_some_and(|e| e.position == resume.after && e.at == at))
}

/// Sends the stored entries after `last` that `keep` lets through, page by page, moving it
/// on; false when the receiver hung up.
async fn catch_up_feed<S: Store>(
    store: &S,
    last: &mut i64,
    keep: &impl Fn(&FeedEntry) -> bool,
    out: &mpsc::Sender<Watched>,
) -> Result<bool> {
    loop {
        let missed = store.entries_after(*last, PAGE).await?;
        let Some(newest) = missed.last() else {
            return Ok(true);
        };
        *last = newest.position;
        let full = missed.len() == PAGE as usize;
        for entry in missed.into_iter().filter(|e| keep(e)) {
            if out.send(Watched::Event(Arc::new(entry))).await.is_err() {
                return Ok(false);
            }
        }
        if !full {
            return Ok(true);
        }
    }
}

async fn get<S: Store>(store: &S, task: &TaskId) -> Result<crate::domain::Task> {
    store
        .get_task(task)
        .await?
        .ok_or_else(|| Error::NotFound(format!("task {task} does not exist")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    async fn next_id(rx: &mut mpsc::Receiver<Watched>) -> (bool, i64) {
        match rx.recv().await.expect("an item") {
            Watched::From(id) => (true, id),
            Watched::Event(e) => (false, e.position),
        }
    }

    #[tokio::test]
    async fn a_watch_goes_on_after_the_entry_it_names_each_once_then_live() {
        let store = MemoryStore::new();
        let hub = Arc::new(LogHub::new(1 << 20));
        for i in 0..3 {
            crate::store::suite::create(&store, &format!("t{i}")).await;
        }
        let events = store.events_after(0, 100).await.expect("events");
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), 3);
        // From now on: the marker says where it starts, then only what is new.
        let (tx, mut fresh) = mpsc::channel(16);
        tokio::spawn(stream_transitions(hub.clone(), store.clone(), None, tx));
        assert_eq!(next_id(&mut fresh).await, (true, ids[2]));
        // After the first: the two stored after it, then live ones, an entry published again
        // (it was already replayed) not twice.
        let (tx, mut resumed) = mpsc::channel(16);
        tokio::spawn(stream_transitions(
            hub.clone(),
            store.clone(),
            Some(Resume {
                after: ids[0],
                at: Some(events[0].at),
            }),
            tx,
        ));
        assert_eq!(next_id(&mut resumed).await, (false, ids[1]));
        assert_eq!(next_id(&mut resumed).await, (false, ids[2]));
        store
            .feed()
            .publish(crate::feed::FeedEntry::of_task_event(&events[2]));
        // The store publishes what it commits.
        let t = crate::store::suite::create(&store, "t3").await;
        let newest = store.events(&t.id).await.expect("events").remove(0);
        assert_eq!(next_id(&mut resumed).await, (false, newest.id));
        assert_eq!(
            next_id(&mut fresh).await,
            (false, newest.id),
            "nothing from before its start"
        );
    }

    /// A position the history does not hold (past its newest entry, or naming another one)
    /// would deliver nothing ever after: the watch goes on from where the server started.
    #[tokio::test]
    async fn a_watch_from_a_position_the_history_lacks_goes_on_from_the_start() {
        let store = MemoryStore::new();
        let hub = Arc::new(LogHub::new(1 << 20));
        crate::store::suite::create(&store, "before").await;
        let started = store.last_event_id().await.expect("newest");
        hub.set_history_start(started);
        crate::store::suite::create(&store, "since").await;
        let since = store.events_after(started, 10).await.expect("events");
        for resume in [
            Resume {
                after: started + 50,
                at: None,
            },
            Resume {
                after: since[0].id,
                at: Some(since[0].at + 1),
            },
        ] {
            let (tx, mut rx) = mpsc::channel(16);
            tokio::spawn(stream_transitions(
                hub.clone(),
                store.clone(),
                Some(resume),
                tx,
            ));
            assert_eq!(next_id(&mut rx).await, (true, started), "{resume:?}");
            assert_eq!(next_id(&mut rx).await, (false, since[0].id), "{resume:?}");
        }
        // A position it holds is taken as is.
        let (tx, mut rx) = mpsc::channel(16);
        let held = Resume {
            after: started,
            at: None,
        };
        tokio::spawn(stream_transitions(
            hub.clone(),
            store.clone(),
            Some(held),
            tx,
        ));
        assert_eq!(next_id(&mut rx).await, (false, since[0].id));
    }
}
