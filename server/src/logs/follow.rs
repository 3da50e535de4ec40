//! Reading logs and transitions as streams: a task's logs, stored then live (`logs
//! --follow`), and every transition live (`watch`). Followers are fed from memory; one that
//! falls behind catches up from storage, so a slow follower never slows the writer, the runner
//! or other followers.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use super::{LogEvent, LogHub, LogItem, SharedEncoding};
use crate::domain::{LogLine, TaskEvent, TaskId};
use crate::error::{Error, Result};
use crate::store::Store;

/// Lines read from storage at a time when catching up.
const PAGE: u32 = 2_000;

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
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(%task, missed, "a log follower fell behind; catching up from storage");
                catch_up(&store, &task, &mut sent, &out).await?;
                let status = get(&store, &task).await?.state.status;
                if out.send(LogItem::Status(status)).await.is_err() {
                    return Ok(());
                }
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
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
        loop {
            let after = sent.get(&id).copied().unwrap_or(0);
            let page = store.read_logs(id, after, PAGE).await?;
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
pub async fn stream_transitions<S: Store>(
    hub: Arc<LogHub>,
    store: S,
    out: mpsc::Sender<Arc<TaskEvent>>,
) -> Result<()> {
    let mut live = hub.watch();
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
                let missed = store.events_after(last_id, PAGE).await?;
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

async fn get<S: Store>(store: &S, task: &TaskId) -> Result<crate::domain::Task> {
    store
        .get_task(task)
        .await?
        .ok_or_else(|| Error::NotFound(format!("task {task} does not exist")))
}
