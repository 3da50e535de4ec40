//! The dispatch loop: expire lapsed leases, then fill free slots. It sleeps until something can
//! change the answer: an entry of the change feed that may (a task became leasable or freed a
//! slot, a runner came or recovered, the queue resumed: [`super::wakeups`], once memory has
//! followed it), a back-off ends or a lease expires (a timer set to that instant). There is no
//! fixed polling interval.
//!
//! A round reads lease candidates in pages, has the pure [`planner`] match them to free slots,
//! prepares each lease (the base tip, the previous patchset replayed onto it), and commits the
//! leases through the coordinator's one commit path, up to `--dispatch-batch` in one
//! transaction; each committed lease is then pushed to its runner.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pipeline_core::git::{FetchRef, RefName};
use pipeline_core::ids::CommitId;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::{Lease, LeaseRef, Millis, NewRun, Phase, Task, TaskId, satisfies};
use crate::error::{Error, Result};
use crate::lifecycle::Event;
use crate::ports::Repository;
use crate::prompt::{self, PromptContext};
use crate::scheduler::planner::{self, Pick};
use crate::scheduler::registry::{Assignment, LiveLease, Push, RunSpan};
use crate::store::Store;

use super::runners::lease_matches;
use super::{Coordinator, Decision};

/// The most candidate rows a round reads past its budget for tasks that no free runner has
/// the labels for.
const MAX_SCAN: usize = 4096;

/// The file in the repository whose text goes into every prompt as the project's
/// instructions for agents (read at the lease's base commit). `AGENTS.md` is the name agents
/// share; `CLAUDE.md` is not read, since Claude Code reads it from the worktree itself.
pub const INSTRUCTIONS_FILE: &str = "AGENTS.md";

/// The most of the instructions file a prompt carries; the rest is cut, saying so.
pub const MAX_INSTRUCTIONS_BYTES: usize = 32 * 1024;

/// The instructions file's text as the prompt carries it: UTF-8 (lossy), at most
/// [`MAX_INSTRUCTIONS_BYTES`], with a line saying what was cut.
fn instructions_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= MAX_INSTRUCTIONS_BYTES {
        return text.into_owned();
    }
    let mut end = MAX_INSTRUCTIONS_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n[… {INSTRUCTIONS_FILE} goes on for {} more bytes, cut here]",
        &text[..end],
        text.len() - end
    )
}

/// After a failed dispatch round (database or git trouble), try again this much later.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// A lease decided but not yet committed: who gets it, and the agent session it may resume.
struct Planned {
    decision: Decision,
    runner_id: String,
    runner: String,
    resume_session: Option<String>,
    /// What its epic's children may still spend together (`None`: no epic cap).
    epic_budget: Option<f64>,
}

/// An epic's cap and what its children have spent of it, in cents.
#[derive(Clone, Copy)]
struct EpicCap {
    spent: f64,
    cap: f64,
    /// What is left of it ([`crate::lifecycle::Policy::epic_remaining`]).
    remaining: f64,
}

impl<S: Store, R: Repository> Coordinator<S, R> {
    /// Pushes eligible tasks to free slots and expires lapsed leases, until `shutdown`.
    pub async fn dispatch_loop(self: Arc<Self>, shutdown: CancellationToken) {
        // Subscribed before the first round: nothing published from now on is missed.
        let mut wakeups =
            super::wakeups::Wakeups::new(self.store.feed(), super::wakeups::wakes_dispatcher);
        loop {
            let next = match self.dispatch_once().await {
                Ok(next) => next,
                Err(err) => {
                    tracing::error!(error = %err, "dispatch round failed; retrying");
                    Some(self.now() + RETRY_AFTER_ERROR.as_millis() as i64)
                }
            };
            let sleep = match next {
                Some(at) => Duration::from_millis(at.saturating_sub(self.now()).max(0) as u64),
                None => Duration::from_secs(24 * 3600),
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = wakeups.next(&self.following) => {}
                () = self.build_woken().notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// One round: expire lapsed leases, then fill free slots. Returns when the next timer (a
    /// back-off ending, a lease expiring) is due.
    pub async fn dispatch_once(&self) -> Result<Option<Millis>> {
        crate::failpoint::panic_at("panic-dispatch");
        let now = self.now();
        let expired = self.registry().expired(now);
        for (lease_id, live) in expired {
            self.expire(&lease_id, &live).await?;
        }
        // Build jobs first: a build unblocks many tasks.
        let next_build = self.assign_builds();
        // A paused queue hands out nothing (running work goes on, and lapsed leases still
        // expire above); `queue resume` wakes this loop.
        let mut slots = if self.leases_paused() {
            Default::default()
        } else {
            self.registry().free_slots()
        };
        // Candidates come in pages (two groups, at least 128), so the first leases go out
        // after a small query however many slots are free; at most twice the free slots are
        // looked at.
        let page = u32::try_from(self.settings.dispatch_batch)
            .unwrap_or(u32::MAX)
            .saturating_mul(2)
            .max(128);
        let mut budget = planner::total(&slots).saturating_mul(2);
        let mut after = None;
        let mut scanned = 0;
        let mut tip = None;
        let mut batch = Vec::new();
        // Each epic's cap, read once a round.
        let mut epics: HashMap<TaskId, Option<EpicCap>> = HashMap::new();
        // A lease that lost its race (the task changed meanwhile) asks for another round now.
        let mut again = false;
        while planner::total(&slots) > 0 && budget > 0 {
            let limit = page.min(budget);
            let mut candidates = self.store.lease_candidates(now, after, limit).await?;
            budget -= limit;
            let last_page = candidates.len() < limit as usize;
            if let Some(last) = candidates.last() {
                after = Some((last.priority, last.seq));
            }
            // A task with a patchset may have landed already (the database lost that): the
            // server's own record of its landing says so, and it is recorded Done instead.
            // A child whose epic has spent its cap is not leased: it needs help.
            let mut kept = Vec::with_capacity(candidates.len());
            for task in candidates.drain(..) {
                if task.patch_commit.is_some() {
                    let tip = self.base_tip_cached(&mut tip).await?;
                    if self.record_if_landed(task.clone(), &tip).await? {
                        continue;
                    }
                }
                if let Some(parent) = task.parent.clone()
                    && let Some(cap) = self.epic_cap(&parent, &mut epics).await?
                    && cap.remaining <= 0.0
                {
                    self.stop_at_epic_cap(task, &parent, cap).await?;
                    continue;
                }
                kept.push(task);
            }
            // Tasks no free runner has the labels for are passed over; they do not use up the
            // round's budget (else a crowd of them at the front would starve the rest), up to
            // MAX_SCAN rows a round.
            scanned += kept.len();
            if scanned < MAX_SCAN {
                let unplaceable = kept
                    .iter()
                    .filter(|t| {
                        !t.requires.is_empty()
                            && !slots
                                .iter()
                                .any(|s| s.free > 0 && satisfies(&s.labels, &t.requires))
                    })
                    .count();
                budget = budget.saturating_add(u32::try_from(unplaceable).unwrap_or(u32::MAX));
            }
            let max = planner::total(&slots) as usize;
            for Pick {
                task,
                runner_id,
                runner,
            } in planner::plan(&kept, &mut slots, self.policy(), now, max)
            {
                let epic_budget = kept[task]
                    .parent
                    .as_ref()
                    .and_then(|p| epics.get(p).copied().flatten())
                    .map(|c| c.remaining);
                match self.prepare_lease(&kept[task], &mut tip).await {
                    Ok(decision) => batch.push(Planned {
                        decision,
                        runner_id,
                        runner,
                        resume_session: self.resume_session(&kept[task]).await?,
                        epic_budget,
                    }),
                    Err(Error::FailedPrecondition(_)) => continue,
                    Err(err) => return Err(err),
                }
                if batch.len() >= self.settings.dispatch_batch.max(1) {
                    again |= self.commit_leases(std::mem::take(&mut batch)).await?;
                }
            }
            if last_page {
                break;
            }
        }
        if !batch.is_empty() {
            again |= self.commit_leases(batch).await?;
        }
        if again {
            return Ok(Some(self.now()));
        }
        let next_backoff = self.store.next_backoff_end(now).await?;
        let next_expiry = self.registry().next_expiry();
        Ok([next_backoff, next_expiry, next_build]
            .into_iter()
            .flatten()
            .min())
    }

    /// Decides to lease `task` (the runner is filled in when it is committed): the lease's
    /// base is the current tip, and the previous patchset, when it is to be amended, is first
    /// replayed onto it (worktree-free); if it no longer applies, the attempt starts fresh,
    /// with the feedback saying so. `tip` is the base tip, read once per round.
    async fn prepare_lease(&self, task: &Task, tip: &mut Option<CommitId>) -> Result<Decision> {
        let base_commit = self.base_tip_cached(tip).await?;
        let mut fresh_note = None;
        let previous_commit = match (&task.patch_commit, task.state.amend) {
            (Some(previous), true) => match self.repo.parents(previous).await?.as_slice() {
                [parent] if *parent == base_commit => Some(previous.clone()),
                [parent] => match self.repo.replay(parent, &base_commit, previous).await? {
                    Ok(replayed) => {
                        // Kept under a ref until the runner has fetched it.
                        self.repo
                            .update_ref(&RefName::fetch(&task.id, FetchRef::Previous), &replayed)
                            .await?;
                        tracing::info!(task = %task.id, %previous, %replayed, "previous patchset replayed onto the current base");
                        Some(replayed)
                    }
                    Err(conflict) => {
                        fresh_note = Some(format!(
                            "The previous patchset no longer applies to {} at {base_commit} \
                             (the base moved); this attempt starts fresh from the base:\n{conflict}",
                            self.settings.base
                        ));
                        None
                    }
                },
                _ => None,
            },
            _ => None,
        };
        let mut decision = self.decide(
            task,
            &Event::Leased {
                deps_pending: task.deps_pending,
            },
        )?;
        let next = &mut decision.write.next;
        if let Some(note) = fresh_note {
            next.state.amend = false;
            next.state.feedback = Some(match &next.state.feedback {
                Some(feedback) => format!("{feedback}\n\n{note}"),
                None => note,
            });
        }
        let epoch = task.lease_epoch + 1;
        next.lease_epoch = epoch;
        next.lease = Some(Lease {
            id: LeaseRef::of(&task.id, epoch).id,
            epoch,
            runner: String::new(),
            runner_id: String::new(),
            base_commit,
            previous_commit,
        });
        Ok(decision)
    }

    /// The cap of the epic `id` and what its children have spent, when it has a cap; read
    /// once a round (`known`).
    async fn epic_cap(
        &self,
        id: &TaskId,
        known: &mut HashMap<TaskId, Option<EpicCap>>,
    ) -> Result<Option<EpicCap>> {
        if let Some(cap) = known.get(id) {
            return Ok(*cap);
        }
        let cap = self.store.get_task(id).await?.and_then(|epic| {
            let policy = self.policy();
            Some(EpicCap {
                spent: epic.children.cost_cents,
                cap: policy.epic_cap(&epic.state)?,
                remaining: policy.epic_remaining(&epic.state, &epic.children)?,
            })
        });
        known.insert(id.clone(), cap);
        Ok(cap)
    }

    /// `task`'s epic has spent its cap: the task needs help (a lost race is left to the next
    /// round).
    async fn stop_at_epic_cap(&self, task: Task, epic: &TaskId, cap: EpicCap) -> Result<()> {
        let event = Event::EpicCapReached {
            epic: epic.to_string(),
            spent: cap.spent,
            cap: cap.cap,
        };
        let id = task.id.clone();
        match self
            .transition_from(task, &event, |_| Ok(()), |_, _| {})
            .await
        {
            Ok(_) => {
                tracing::info!(task = %id, %epic, "its epic has spent its cap");
                Ok(())
            }
            Err(Error::FailedPrecondition(_) | Error::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The agent session a new attempt of `task` may resume: that of its latest dev run that
    /// reported one, whatever became of that attempt (the runner resumes it only when its
    /// worktree is at the commit the session left, as after a verify failure). Read before the
    /// lease is committed, so a failed read fails the round, not a lease; a task never leased
    /// has none and costs no read.
    async fn resume_session(&self, task: &Task) -> Result<Option<String>> {
        if task.lease_epoch == 0 {
            return Ok(None);
        }
        self.store.latest_session(&task.id).await
    }

    async fn base_tip_cached(&self, tip: &mut Option<CommitId>) -> Result<CommitId> {
        if let Some(t) = tip {
            return Ok(t.clone());
        }
        let t = self.repo.tip(&self.settings.base).await?;
        *tip = Some(t.clone());
        Ok(t)
    }

    /// Commits planned leases in one transaction (through the one commit path), then pushes
    /// each to its runner. A lease that lost a race (the task changed) is dropped; true if one
    /// did (another round is due).
    async fn commit_leases(&self, batch: Vec<Planned>) -> Result<bool> {
        let mut lost = false;
        let mut runners = Vec::with_capacity(batch.len());
        let decisions = batch
            .into_iter()
            .map(|mut p| {
                let epoch = p.decision.write.next.lease_epoch;
                if let Some(lease) = p.decision.write.next.lease.as_mut() {
                    lease.runner = p.runner.clone();
                    lease.runner_id = p.runner_id.clone();
                }
                p.decision.write.runs.start = Some(NewRun {
                    phase: Phase::Dev,
                    patchset: p.decision.before.state.patchset,
                    runner: Some(p.runner.clone()),
                    train: None,
                });
                p.decision.write.event.message = format!("leased to {} (epoch {epoch})", p.runner);
                // The task was ready to lease from its last change or its back-off's end,
                // whichever came later (`pipeline_dispatch_latency_seconds`).
                let before = &p.decision.before;
                let ready_at = before
                    .state
                    .backoff_until
                    .map_or(before.updated_at, |until| until.max(before.updated_at));
                runners.push((
                    p.runner_id,
                    p.runner,
                    p.decision.before.id.clone(),
                    p.resume_session,
                    p.epic_budget,
                    ready_at,
                ));
                p.decision
            })
            .collect();
        let results = self.commit(decisions).await?;
        for ((runner_id, runner, task, resume_session, epic_budget, ready_at), result) in
            runners.into_iter().zip(results)
        {
            match result {
                Ok(done) => {
                    let m = crate::metrics::metrics();
                    m.leases.inc();
                    m.dispatch_latency
                        .observe((self.now() - ready_at).max(0) as f64 / 1000.0);
                    let budget = match (
                        self.policy().remaining_budget(&done.task.state),
                        epic_budget,
                    ) {
                        (Some(own), Some(epic)) => Some(own.min(epic)),
                        (own, epic) => own.or(epic),
                    };
                    let span = tracing::info_span!(
                        "lease",
                        task = %done.task.id,
                        runner = %runner,
                        epoch = done.task.lease_epoch
                    );
                    self.push_lease(
                        &done.task,
                        done.run_id,
                        &runner_id,
                        &runner,
                        resume_session,
                        budget,
                    )
                    .instrument(span)
                    .await?
                }
                Err(err) => {
                    tracing::info!(%task, error = %err, "lease not taken");
                    lost = true;
                }
            }
        }
        Ok(lost)
    }

    /// Registers a committed lease as live and pushes its work to the runner; if the runner is
    /// gone, the lease is released at once.
    async fn push_lease(
        &self,
        leased: &Task,
        run_id: Option<i64>,
        runner_id: &str,
        runner_name: &str,
        resume_session: Option<String>,
        budget_cents: Option<f64>,
    ) -> Result<()> {
        let lease = leased.lease.clone().ok_or_else(|| {
            Error::Internal(format!("task {} was leased without a lease", leased.id))
        })?;
        let lease_ref = lease.lease_ref();
        let instructions = self.instructions(&lease.base_commit).await;
        let prompt = self.settings.prompt.render(
            leased,
            &PromptContext {
                base: self.settings.base.as_str(),
                base_commit: lease.base_commit.as_str(),
                amend: lease.previous_commit.is_some(),
                // Every lease starts one dev run: the epoch is the dev attempt.
                attempt: lease.epoch,
                verification: prompt::verification_text(
                    &self.settings.verifier,
                    leased.namespace.as_deref(),
                ),
                instructions: instructions.as_deref(),
            },
        );
        let assignment = Assignment {
            lease: lease_ref.clone(),
            task_id: leased.id.clone(),
            run_id: format!("dev-{}-{}", leased.id, lease.epoch),
            title: leased.title.clone(),
            namespace: leased.namespace.clone(),
            base: self.settings.base.to_string(),
            base_commit: lease.base_commit.clone(),
            previous_commit: lease.previous_commit.clone(),
            patchset: leased.state.patchset,
            prompt,
            verification: self.settings.verifier.clone(),
            budget_cents,
            resume_session,
        };
        let pushed = {
            let mut registry = self.registry();
            registry.add_lease(
                lease.id.clone(),
                LiveLease {
                    task: leased.id.clone(),
                    epoch: lease.epoch,
                    runner_id: runner_id.to_owned(),
                    runner: runner_name.to_owned(),
                    expires_at: self.now() + self.settings.lease_ttl_ms,
                    leased_at: self.now(),
                    run_id,
                    verify_run_id: None,
                    last_seq: 0,
                    // Inside the `lease` span: the run it began.
                    span: RunSpan(tracing::info_span!(
                        "run",
                        task = %leased.id,
                        phase = "dev",
                        runner = runner_name,
                        epoch = lease.epoch
                    )),
                    offered: None,
                },
            );
            registry.push(runner_id, Push::Assign(Box::new(assignment)))
        };
        tracing::info!(task = %leased.id, runner = runner_name, epoch = lease.epoch, pushed, "leased");
        if !pushed {
            self.release(
                runner_id,
                &lease_ref,
                "the runner disconnected before the work reached it",
                false,
            )
            .await?;
        }
        Ok(())
    }

    /// The project's instructions for agents at `base` (`AGENTS.md`, at most
    /// [`MAX_INSTRUCTIONS_BYTES`]), read once per base commit through the long-lived `git
    /// cat-file`; none when the file is missing or cannot be read (logged: a prompt goes out
    /// either way).
    async fn instructions(&self, base: &CommitId) -> Option<Arc<str>> {
        let mut cached = self.instructions.lock().await;
        if let Some((commit, text)) = cached.as_ref()
            && commit == base
        {
            return text.clone();
        }
        let text = match self.repo.file_at(base, INSTRUCTIONS_FILE).await {
            Ok(Some(bytes)) => Some(Arc::from(instructions_text(&bytes))),
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(%base, error = %err, "cannot read {INSTRUCTIONS_FILE}; the prompt goes without it");
                None
            }
        };
        *cached = Some((base.clone(), text.clone()));
        text
    }

    /// A lease's time ran out: the task goes back to Open (not charged: its runner died, froze
    /// or was cut off), and the runner is told to stop. The lease leaves memory only once the
    /// database has recorded that; if the write fails (a full disk), the lease stays, still
    /// expired, and the next round tries again.
    async fn expire(&self, lease_id: &str, live: &LiveLease) -> Result<()> {
        let lease = LeaseRef {
            id: lease_id.to_owned(),
            epoch: live.epoch,
        };
        let reason = format!(
            "lease lost: runner {} sent no heartbeat for {} s",
            live.runner,
            self.settings.lease_ttl_ms / 1000
        );
        let runner = live.runner.clone();
        let result = match self.get(&live.task).await {
            Ok(task) => {
                self.transition_from(
                    task,
                    &Event::LeaseLost {
                        reason: reason.clone(),
                    },
                    |t| lease_matches(t, &lease),
                    |_, w| w.next.avoid_runner = Some(runner.clone()),
                )
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => tracing::warn!(task = %live.task, runner = %live.runner, "{reason}"),
            // The lease was over already (the task moved on): only memory lagged.
            Err(err @ (Error::FailedPrecondition(_) | Error::NotFound(_))) => {
                tracing::info!(task = %live.task, error = %err, "expired lease was already over")
            }
            Err(err) => return Err(err),
        }
        let mut registry = self.registry();
        registry.remove_lease(lease_id);
        registry.push(&live.runner_id, Push::Cancel(lease));
        Ok(())
    }
}
