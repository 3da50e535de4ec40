//! Task patches on the push remote (issue 28): each accepted result is kept there as
//! `refs/pipeline/tasks/<task>/<epoch>` before it is acknowledged, so that a new leader can
//! fetch and land it. Once the task is Done its commit is on the base, pushed before the Done
//! transition is written (the integrator pushes, then moves the base, then records the
//! landing), and its refs are of no more use: the leader deletes them.
//!
//! Off the hot path: one loop of the leader's, woken by the feed's entries of tasks that
//! became Done (a burst of them is one sweep), and once as it starts leading. A sweep reads the
//! remote's task refs (`git ls-remote`: the refs of tasks not yet Done, and those of the last
//! burst, never the whole queue), asks the store which of their tasks are Done, and deletes
//! theirs in batched pushes. A crash between a landing and its sweep only leaves refs that the
//! next sweep (the next Done task, or the next leader's first) deletes. Only Done refs go: a
//! cancelled task may be retried and amend its last patchset, whose commit a new leader
//! fetches from these refs.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::domain::{TaskId, TaskStatus};
use crate::error::Result;
use crate::feed::{FeedEntry, Topic};
use crate::repo::Repo;
use crate::store::Store;
use pipeline_core::git::{RefName, RemoteName};

/// How long a sweep that failed (the remote unreachable) waits before it is tried again,
/// unless a task becomes Done first.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// Deletes from `remote` the refs of tasks that are Done; returns how many refs it deleted.
pub async fn sweep<S: Store>(store: &S, repo: &Repo, remote: &RemoteName) -> Result<usize> {
    let mut by_task: HashMap<String, Vec<String>> = HashMap::new();
    for name in repo.remote_task_patches(remote).await? {
        let task = name
            .strip_prefix(RefName::TASK_PATCHES)
            .and_then(|rest| rest.split('/').next())
            .map(str::to_owned);
        if let Some(task) = task {
            by_task.entry(task).or_default().push(name);
        }
    }
    // A name that is no task ID is not the server's: it stays.
    let ids: Vec<TaskId> = by_task
        .keys()
        .filter_map(|id| TaskId::parse(id).ok())
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    let mut done: Vec<String> = store
        .statuses(&ids)
        .await?
        .into_iter()
        .filter(|(_, status)| *status == TaskStatus::Done)
        .flat_map(|(id, _)| by_task.remove(id.as_str()).unwrap_or_default())
        .collect();
    if done.is_empty() {
        return Ok(0);
    }
    done.sort();
    crate::failpoint::abort_at("before-task-refs-deleted");
    repo.delete_remote_refs(remote, &done).await?;
    Ok(done.len())
}

/// Whether `entry` says a task became Done.
fn became_done(entry: &FeedEntry) -> bool {
    entry.topic == Topic::Task && entry.to == Some(TaskStatus::Done)
}

/// The leader's sweeper: a sweep now, then one after each burst of tasks that became Done,
/// until `shutdown`.
pub async fn run<S: Store>(store: S, repo: Repo, remote: RemoteName, shutdown: CancellationToken) {
    // Subscribed before the first sweep: a task Done from now on wakes the next.
    let mut feed = store.feed().subscribe();
    loop {
        let retry = match sweep(&store, &repo, &remote).await {
            Ok(0) => None,
            Ok(n) => {
                tracing::info!(
                    refs = n,
                    remote = remote.as_str(),
                    "deleted the refs of landed tasks from the push remote"
                );
                None
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    remote = remote.as_str(),
                    "deleting the refs of landed tasks from the push remote failed; trying again later"
                );
                Some(RETRY_AFTER_FAILURE)
            }
        };
        let retried = async {
            match retry {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(retried);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut retried => break,
                entry = feed.recv() => match entry {
                    Ok(entry) if became_done(&entry) => break,
                    Ok(_) => {}
                    // Entries were missed: one may have been a task's Done.
                    Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return,
                },
            }
        }
        // The rest of a burst (a train's tasks) is the same sweep.
        while feed.try_recv().is_ok() {}
    }
}
