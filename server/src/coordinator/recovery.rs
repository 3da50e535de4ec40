//! What the coordinator finds at start-up and puts right before it serves: the counts (and the
//! last day's cost) `status` answers from memory, the leases in the database (each restored for one TTL, for
//! its runner to come back), task IDs the repository already knows (never generated again),
//! and tasks whose landing the database lost (recorded Done, never landed twice).

use pipeline_core::ids::CommitId;

use crate::domain::{Phase, Task, TaskStatus};
use crate::error::{Error, Result};
use crate::lifecycle::Event;
use crate::ports::Repository;
use crate::scheduler::registry::{LiveLease, RunSpan};
use crate::store::Store;
use crate::usage::{self, LastDay};

use super::Coordinator;

/// The base tip up to which the trailers on the base were scanned for task IDs (`meta`).
const HISTORY_SCANNED: &str = "history_scanned_tip";

impl<S: Store, R: Repository> Coordinator<S, R> {
    /// Reads the task counts and the last day's cost from the store once; from then on every
    /// committed change keeps them current (call it before any change can happen: at
    /// start-up, before serving).
    pub async fn load_counts(&self) -> Result<()> {
        let counts = self.store.status_counts().await?;
        let now = self.now();
        let spent = self
            .store
            .usage_since(LastDay::since(now), usage::BUCKET_MS)
            .await?;
        *self.counts_mut() = Some(counts);
        self.last_day().load(spent, now);
        Ok(())
    }

    /// At start-up: a task in progress with a lease keeps it for one more TTL, so that its
    /// runner can reconnect and re-attach it; one without a lease goes back to Open. Returns
    /// (leases restored, tasks reopened).
    pub async fn recover(&self) -> Result<(usize, usize)> {
        let stale = self.all_tasks(TaskStatus::InProgress).await?;
        let (mut restored, mut reopened) = (0, 0);
        let expires_at = self.now() + self.settings.lease_ttl_ms;
        for task in &stale {
            if let Some(lease) = &task.lease {
                let running = self.store.running_runs(&task.id).await?;
                let of = |phase| running.iter().find(|r| r.phase == phase).map(|r| r.id);
                let (run_id, verify_run_id) = (of(Phase::Dev), of(Phase::Verify));
                // The runner's verification, under way, is timed from its start as stored.
                for run in running.iter().filter(|r| r.phase == Phase::Verify) {
                    self.run_clocks()
                        .start(run.id, &task.id, Phase::Verify, run.started_at);
                }
                let mut last_seq = 0;
                for run in &running {
                    last_seq = last_seq.max(self.store.last_log_seq(run.id).await?);
                }
                self.registry().restore_lease(
                    lease.id.clone(),
                    LiveLease {
                        task: task.id.clone(),
                        epoch: lease.epoch,
                        runner_id: lease.runner_id.clone(),
                        runner: lease.runner.clone(),
                        expires_at,
                        leased_at: self.now(),
                        run_id,
                        verify_run_id,
                        last_seq,
                        span: RunSpan(tracing::info_span!(
                            "run",
                            task = %task.id,
                            phase = "dev",
                            runner = %lease.runner,
                            epoch = lease.epoch,
                            restored = true
                        )),
                        offered: None,
                    },
                );
                restored += 1;
            } else {
                self.transition(&task.id, Event::Recover).await?;
                tracing::warn!(task = %task.id, "reopened a task left in progress without a lease");
                reopened += 1;
            }
        }
        Ok((restored, reopened))
    }

    /// At start-up, before any task is created: no generated task ID may repeat one the
    /// repository already knows (in the pipeline's refs or in a `Task-Id:` trailer on the
    /// base), and an empty database beside a repository with an earlier pipeline's history is
    /// refused (the database was probably lost) unless `accept_history`. The base is scanned
    /// once in full, then only for what is new since the last start.
    pub async fn guard_task_ids(&self, accept_history: bool) -> Result<()> {
        let base = &self.settings.base;
        if self.store.is_fresh().await?
            && let Some(found) = self.repo.pipeline_history(base).await?
        {
            if !accept_history {
                return Err(Error::FailedPrecondition(format!(
                    "the database is empty but the repository shows an earlier pipeline: {found}; \
                     if its database was lost, restore it (or point --db at it), or pass \
                     --accept-existing-history to start afresh beside that history (new task \
                     IDs then continue after the highest one found)"
                )));
            }
            tracing::warn!(
                "starting an empty database beside an earlier pipeline's history: {found}"
            );
        }
        let tip = self.repo.tip(base).await?;
        let scanned = match self.store.get_meta(HISTORY_SCANNED).await? {
            Some(scanned) => match CommitId::parse(&scanned) {
                Ok(c) if self.repo.is_ancestor(&c, &tip).await.unwrap_or(false) => Some(c),
                _ => None,
            },
            None => None,
        };
        let highest = self
            .repo
            .highest_task_number(scanned.as_ref(), &tip)
            .await?;
        // `highest` is at most `MAX_GENERATED`: the sum cannot wrap (and is checked anyway).
        if let Some(next) = highest.checked_add(1).filter(|_| highest > 0) {
            self.store.raise_next_task_number(next).await?;
        }
        self.store.put_meta(HISTORY_SCANNED, tip.as_str()).await?;
        Ok(())
    }

    /// At start-up: a task that is not Done although the server's own record of its landing
    /// (`refs/pipeline/landed/<id>`) is on the base is recorded Done (the database lost it, e.g.
    /// rolled back after a power loss). Returns how many.
    pub async fn reconcile_landed(&self) -> Result<usize> {
        let tip = self.repo.tip(&self.settings.base).await?;
        let landed = self.repo.landed_commits().await?;
        if landed.is_empty() {
            return Ok(0);
        }
        let mut found = 0;
        for task in self.store.unfinished().await? {
            if landed.contains_key(task.id.as_str()) && self.record_if_landed(task, &tip).await? {
                found += 1;
            }
        }
        Ok(found)
    }

    /// At start-up: epics whose children all finished just before a crash are marked Done
    /// now. Returns how many were.
    pub async fn settle_finished_epics(&self) -> Result<usize> {
        let epics = self.store.finished_epics().await?;
        let n = epics.len();
        self.settle_epics(epics).await?;
        Ok(n)
    }

    /// Records `task` Done if its own landed commit is on `tip`; true if it was.
    pub(crate) async fn record_if_landed(&self, task: Task, tip: &CommitId) -> Result<bool> {
        let Some(commit) = self.repo.landed_on(&task.id, tip).await? else {
            return Ok(false);
        };
        tracing::warn!(task = %task.id, %commit, "found the task's commit on the base; recording it done");
        self.transition_from(
            task,
            &Event::FoundLanded {
                commit: commit.to_string(),
            },
            |_| Ok(()),
            |_, w| w.end_integration = true,
        )
        .await?;
        Ok(true)
    }
}
