//! The coordinator's runner side: registration, work streams, heartbeats, leases with fencing,
//! results and commits, and the dispatch loop that pushes eligible tasks to free slots.
//!
//! The dispatch loop sleeps until something can change the answer: a task became leasable or
//! a slot freed (the `wake` notification), a back-off ends or a lease expires (a timer set to
//! that instant). There is no fixed polling interval.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::coordinator::{Coordinator, now_ms};
use crate::domain::{FailureKind, Lease, Millis, Phase, RunStatus, Task, TaskId};
use crate::error::{Error, Result};
use crate::lifecycle::{self, Event};
use crate::prompt::{self, PromptContext};
use crate::registry::{Assignment, LeaseRef, LiveLease, Push};
use crate::store::{FinishedRun, LeaseChange, NewRun, RunEnd, Store, TransitionWrite};

/// The largest number of slots one runner may announce.
pub const MAX_SLOTS: u32 = 64;
/// How many pushes may wait for a slow runner before its stream counts as broken.
const PUSH_BUFFER: usize = 64;
/// After a failed dispatch round (database or git trouble), try again this much later.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// What a runner says about itself when it registers.
#[derive(Clone, Debug)]
pub struct RunnerHello {
    pub name: String,
    pub labels: Vec<String>,
    pub slots: u32,
    pub version: String,
    pub protocol_version: u32,
}

/// The server's answer to a registration.
#[derive(Clone, Debug)]
pub struct Registered {
    pub runner_id: String,
    pub heartbeat_interval_ms: u64,
    pub lease_ttl_ms: u64,
    /// The runner's own credential, issued when it registered with the registration token.
    pub credential: Option<String>,
}

/// What became of the leases a runner reported when it opened its work stream.
#[derive(Clone, Debug, Default)]
pub struct Attached {
    pub kept: Vec<LeaseRef>,
    pub dropped: Vec<LeaseRef>,
}

/// How a lease ended on the runner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    DevFailed,
    VerifyFailed,
    Verified,
}

/// A runner's result for a lease.
#[derive(Clone, Debug)]
pub struct LeaseResult {
    pub lease: LeaseRef,
    pub outcome: Outcome,
    pub error: Option<String>,
    pub cost_cents: f64,
    pub commit: Option<String>,
    pub verify_skipped: Option<String>,
    pub dev_finished_at: Millis,
}

/// A runner name: like a task ID, safe in logs, paths and messages.
fn check_runner_name(name: &str) -> Result<()> {
    pipeline_core::ids::RunnerName::parse(name)
        .map(drop)
        .map_err(Error::from)
}

/// A runner ID the server does not know (it restarted): the runner registers again and
/// retries, so this is `NotFound`, never a refusal of its leases.
pub fn unregistered(runner_id: &str) -> Error {
    Error::NotFound(format!(
        "runner {runner_id} is not registered (the server may have restarted); register again"
    ))
}

fn refused(lease: &LeaseRef, why: impl std::fmt::Display) -> Error {
    Error::FailedPrecondition(format!(
        "lease {} (epoch {}) is no longer yours: {why}; drop the work",
        lease.id, lease.epoch
    ))
}

impl<S: Store> Coordinator<S> {
    /// Registers a runner and tells it how often to heartbeat. The registration token gets the
    /// runner a credential of its own; a runner's credential may register again only under its
    /// own name (after a restart of either side).
    pub async fn register(&self, hello: RunnerHello, caller: &Caller) -> Result<Registered> {
        let issue = match caller {
            Caller::Registration => {
                // A name belongs to the credential that registered it: the shared token cannot
                // take it over (a runner that lost its saved credential is revoked, then
                // forgotten, to free its name).
                if self.auth.is_revoked(&hello.name) {
                    return Err(Error::PermissionDenied(format!(
                        "runner {} was revoked; an admin can free the name with \
                         `pipelinectl runners forget {}`",
                        hello.name, hello.name
                    )));
                }
                if self.auth.name_taken(&hello.name) {
                    return Err(Error::PermissionDenied(format!(
                        "the runner name {} belongs to a registered runner: register with its \
                         own credential (the runner keeps it in its work dir), use another \
                         --name, or have an admin revoke and forget {}",
                        hello.name, hello.name
                    )));
                }
                self.auth.count_registration("registration token")?;
                true
            }
            Caller::Runner(name) if *name == hello.name => {
                self.auth.count_registration(name)?;
                false
            }
            Caller::Runner(name) => {
                return Err(Error::PermissionDenied(format!(
                    "this credential belongs to runner {name}; it cannot register as {}",
                    hello.name
                )));
            }
            Caller::Admin => {
                return Err(Error::PermissionDenied(
                    "the admin token cannot register a runner; use the runner registration token"
                        .to_owned(),
                ));
            }
        };
        if hello.protocol_version != pipeline_proto::PROTOCOL_VERSION {
            return Err(Error::FailedPrecondition(format!(
                "this runner speaks protocol version {} but the server speaks {}: run the same \
                 pipeline release on both",
                hello.protocol_version,
                pipeline_proto::PROTOCOL_VERSION
            )));
        }
        check_runner_name(&hello.name)?;
        if hello.slots == 0 || hello.slots > MAX_SLOTS {
            return Err(Error::InvalidArgument(format!(
                "a runner needs 1 to {MAX_SLOTS} slots, not {}",
                hello.slots
            )));
        }
        let ttl = self.settings.lease_ttl_ms;
        let runner_id = self
            .registry()
            .register(
                &hello.name,
                hello.labels,
                hello.slots,
                hello.version,
                now_ms(),
            )
            .map_err(Error::AlreadyExists)?;
        let credential = if issue {
            Some(self.auth.issue(&self.store, &hello.name).await?)
        } else {
            None
        };
        tracing::info!(runner = %hello.name, %runner_id, slots = hello.slots, "runner registered");
        Ok(Registered {
            runner_id,
            heartbeat_interval_ms: (ttl / 3).max(1) as u64,
            lease_ttl_ms: ttl as u64,
            credential,
        })
    }

    /// Checks that `caller` is the runner `runner_id` (a runner acts only for itself).
    pub fn authorize_runner(&self, caller: &Caller, runner_id: &str) -> Result<()> {
        let Caller::Runner(name) = caller else {
            return Err(Error::PermissionDenied(
                "only a runner's own credential may use the runner API".to_owned(),
            ));
        };
        match self.registry().runner(runner_id) {
            None => Err(unregistered(runner_id)),
            Some(r) if r.name == *name => Ok(()),
            Some(r) => Err(Error::PermissionDenied(format!(
                "runner {name} may act only for itself, not for runner {}",
                r.name
            ))),
        }
    }

    /// Cuts runner `name` off: its credential stops working, its work stream closes, and its
    /// leases go back to Open (not counted against their tasks). Returns how many.
    pub async fn revoke(&self, name: &str) -> Result<u32> {
        check_runner_name(name)?;
        let had_credential = self.auth.revoke(&self.store, name).await?;
        let leases = self.registry().disconnect(name);
        if !had_credential && leases.is_none() {
            return Err(Error::NotFound(format!("no runner named {name}")));
        }
        let mut released = 0;
        for (lease_id, live) in leases.unwrap_or_default() {
            let lease = LeaseRef {
                id: lease_id,
                epoch: live.epoch,
            };
            let event = Event::Released {
                reason: format!("runner {name} was revoked"),
                infrastructure: false,
            };
            if self
                .transition_with(&live.task, &event, |t| lease_matches(t, &lease), |_, _| {})
                .await
                .is_ok()
            {
                released += 1;
            }
        }
        tracing::warn!(runner = name, released, "runner revoked");
        Ok(released)
    }

    /// Forgets runner `name`, which must not be connected: it leaves the list and its name is
    /// free again (its credential, if any, stops working; a revoked name may be registered
    /// again).
    pub async fn forget(&self, name: &str) -> Result<()> {
        check_runner_name(name)?;
        if self
            .registry()
            .runners()
            .iter()
            .any(|r| r.name == name && r.connected)
        {
            return Err(Error::FailedPrecondition(format!(
                "runner {name} is connected; stop it (or revoke it) first"
            )));
        }
        let known = self.registry().forget(name);
        let freed = self.auth.forget(&self.store, name).await?;
        if !known && !freed {
            return Err(Error::NotFound(format!("no runner named {name}")));
        }
        tracing::warn!(runner = name, "runner forgotten; its name is free");
        Ok(())
    }

    /// Replaces the runner registration token; returns it and where it is kept.
    pub async fn rotate_registration_token(&self) -> Result<(String, std::path::PathBuf)> {
        let token = self.auth.rotate_registration(&self.store).await?;
        tracing::warn!(
            path = %self.auth.registration_file.display(),
            "runner registration token replaced"
        );
        Ok((token, self.auth.registration_file.clone()))
    }

    /// Opens a runner's work stream: re-attaches the leases it still holds (after a reconnect)
    /// and returns the receiving end of its pushes, with the stream's generation.
    pub fn open_work(
        &self,
        runner_id: &str,
        held: &[LeaseRef],
        draining: bool,
        unhealthy: Option<String>,
    ) -> Result<(u64, Attached, mpsc::Receiver<Push>)> {
        let (tx, rx) = mpsc::channel(PUSH_BUFFER);
        let now = now_ms();
        let mut registry = self.registry();
        let generation = registry
            .attach(runner_id, tx, draining, unhealthy)
            .ok_or_else(|| unregistered(runner_id))?;
        let mut attached = Attached::default();
        for lease in held {
            if registry.reattach(runner_id, lease, now, self.settings.lease_ttl_ms) {
                attached.kept.push(lease.clone());
            } else {
                attached.dropped.push(lease.clone());
            }
        }
        drop(registry);
        tracing::info!(
            %runner_id,
            kept = attached.kept.len(),
            dropped = attached.dropped.len(),
            "runner connected"
        );
        self.wake.notify_one();
        Ok((generation, attached, rx))
    }

    /// The work stream of `generation` ended.
    pub fn close_work(&self, runner_id: &str, generation: u64) {
        self.registry().detach(runner_id, generation);
        tracing::info!(%runner_id, "runner disconnected");
    }

    /// The runner says it takes no more work (before it gives a lease back).
    pub fn runner_unhealthy(&self, runner_id: &str, why: String) {
        let mut registry = self.registry();
        if let Some(r) = registry.runner_mut(runner_id)
            && r.unhealthy.is_none()
        {
            tracing::error!(runner = %r.name, "runner unhealthy, taking no work: {why}");
            r.unhealthy = Some(why);
        }
    }

    /// Renews the runner's leases; returns those it must drop. The runner also says whether it
    /// drains and whether it is unhealthy (then it takes no work).
    pub fn heartbeat(
        &self,
        runner_id: &str,
        held: &[LeaseRef],
        draining: bool,
        unhealthy: Option<String>,
    ) -> Result<Vec<LeaseRef>> {
        let mut registry = self.registry();
        let before = registry.runner(runner_id).map(|r| r.free_slots());
        if let Some(why) = &unhealthy
            && let Some(r) = registry.runner(runner_id)
            && r.unhealthy.is_none()
        {
            tracing::error!(runner = %r.name, "runner unhealthy, taking no work: {why}");
        }
        let dropped = registry
            .heartbeat(
                runner_id,
                held,
                draining,
                unhealthy,
                now_ms(),
                self.settings.lease_ttl_ms,
            )
            .ok_or_else(|| unregistered(runner_id))?;
        let after = registry.runner(runner_id).map(|r| r.free_slots());
        drop(registry);
        if after > before {
            self.wake.notify_one();
        }
        Ok(dropped)
    }

    /// Checks that `lease` is live and `runner_id`'s, in memory only (no database round trip);
    /// returns the task it is for.
    pub fn check_live_lease(&self, runner_id: &str, lease: &LeaseRef) -> Result<TaskId> {
        let registry = self.registry();
        if registry.runner(runner_id).is_none() {
            return Err(unregistered(runner_id));
        }
        let live = registry
            .check(runner_id, lease, now_ms())
            .map_err(|why| refused(lease, why))?;
        Ok(live.task.clone())
    }

    /// Checks that `lease` is live and `runner_id`'s, in memory and in the database; returns the
    /// task it is for.
    pub async fn check_lease(&self, runner_id: &str, lease: &LeaseRef) -> Result<Task> {
        let task_id = self.check_live_lease(runner_id, lease)?;
        let task = self.get(&task_id).await?;
        lease_matches(&task, lease)?;
        Ok(task)
    }

    /// Starts `git bundle create` for what a lease's runner lacks: the base commit (and the
    /// previous patchset's) less what it already `have`s. Its stdout is the bundle; an empty
    /// bundle (git refuses to make one) means the runner has everything. The refs it bundles are
    /// written under `refs/pipeline/fetch/<task>/`.
    pub async fn base_bundle(
        &self,
        runner_id: &str,
        lease: &LeaseRef,
        have: &[String],
    ) -> Result<tokio::process::Child> {
        let task = self.check_lease(runner_id, lease).await?;
        let l = task
            .lease
            .as_ref()
            .ok_or_else(|| refused(lease, "the task has no lease"))?;
        let base_ref = format!("refs/pipeline/fetch/{}/base", task.id);
        self.repo.update_ref(&base_ref, &l.base_commit).await?;
        let mut refs = vec![base_ref];
        if let Some(previous) = &l.previous_commit {
            let prev_ref = format!("refs/pipeline/fetch/{}/previous", task.id);
            self.repo.update_ref(&prev_ref, previous).await?;
            refs.push(prev_ref);
        }
        let known = self.repo.existing_commits(have).await?;
        self.repo.bundle_create(&refs, &known)
    }

    /// Records a runner's result: stores its commit (checked) under
    /// `refs/pipeline/tasks/<id>/<epoch>`, records the dev and verify runs, and moves the task.
    pub async fn complete(
        &self,
        runner_id: &str,
        result: LeaseResult,
        bundle: Option<&Path>,
    ) -> Result<Task> {
        let task = self.check_lease(runner_id, &result.lease).await?;
        let lease = task
            .lease
            .clone()
            .ok_or_else(|| refused(&result.lease, "the task has no lease"))?;
        let mut commit = None;
        let mut refusal = None;
        if result.outcome != Outcome::DevFailed {
            let stored = match (&result.commit, bundle) {
                (Some(c), Some(path)) => {
                    self.repo.receive_bundle(path, &lease.base_commit, c).await
                }
                _ => Err(Error::InvalidArgument(
                    "commit refused: a verified or verify-failed result needs the commit and \
                     its bundle"
                        .to_owned(),
                )),
            };
            match stored {
                Ok(c) => {
                    let refname = format!("refs/pipeline/tasks/{}/{}", task.id, lease.epoch);
                    self.repo.update_ref(&refname, &c).await?;
                    commit = Some(c);
                }
                Err(Error::InvalidArgument(why)) => refusal = Some(why),
                Err(other) => {
                    // The server's trouble, not the commit's: the runner sends it again.
                    tracing::warn!(
                        task = %task.id,
                        runner = %lease.runner,
                        "could not store the commit (not the task's fault; the runner will send \
                         it again): {other}"
                    );
                    return Err(other);
                }
            }
        }
        let (event, dev_status, dev_error) = match (&refusal, result.outcome) {
            (Some(why), _) => (
                Event::DevFailed {
                    reason: why.clone(),
                    cost_cents: result.cost_cents,
                },
                RunStatus::Failure,
                Some(why.clone()),
            ),
            (None, Outcome::DevFailed) => {
                let reason = result
                    .error
                    .clone()
                    .unwrap_or_else(|| "the agent failed".to_owned());
                (
                    Event::DevFailed {
                        reason: reason.clone(),
                        cost_cents: result.cost_cents,
                    },
                    RunStatus::Failure,
                    Some(reason),
                )
            }
            (None, Outcome::VerifyFailed) => (
                Event::VerifyFailed {
                    reason: result
                        .error
                        .clone()
                        .unwrap_or_else(|| "verification failed".to_owned()),
                    cost_cents: result.cost_cents,
                },
                RunStatus::Success,
                None,
            ),
            (None, Outcome::Verified) => (
                Event::Verified {
                    cost_cents: result.cost_cents,
                },
                RunStatus::Success,
                None,
            ),
        };
        let verify_run_id = self
            .registry()
            .lease(&result.lease.id)
            .and_then(|l| l.verify_run_id);
        let verify_run = match (&refusal, result.outcome) {
            (None, Outcome::VerifyFailed | Outcome::Verified) => Some(FinishedRun {
                phase: Phase::Verify,
                patchset: task.state.patchset + 1,
                runner: Some(lease.runner.clone()),
                status: if result.outcome == Outcome::Verified {
                    RunStatus::Success
                } else {
                    RunStatus::Failure
                },
                cost_cents: 0.0,
                started_at: result.dev_finished_at,
                error: if result.outcome == Outcome::Verified {
                    result
                        .verify_skipped
                        .clone()
                        .map(|s| format!("skipped: {s}"))
                } else {
                    result.error.clone()
                },
                failure_kind: (result.outcome == Outcome::VerifyFailed)
                    .then_some(FailureKind::Task),
            }),
            _ => None,
        };
        // Remember the tree the runner really verified: a build of the same tree can be skipped.
        let verified_tree = match (&commit, result.outcome, &result.verify_skipped) {
            (Some(c), Outcome::Verified, None) => Some(self.repo.tree_of(c).await?),
            _ => None,
        };
        let lease_ref = result.lease.clone();
        let updated = self
            .transition_from(
                task,
                &event,
                |t| lease_matches(t, &lease_ref),
                |_, w| {
                    w.close_runs = Some(RunEnd {
                        status: dev_status,
                        cost_cents: result.cost_cents,
                        error: dev_error.clone(),
                        failure_kind: (dev_status == RunStatus::Failure)
                            .then_some(FailureKind::Task),
                    });
                    match (verify_run_id, &verify_run) {
                        // The verify run began with its first log line: it ends now.
                        (Some(id), Some(run)) => w.end_runs.push((
                            id,
                            RunEnd {
                                status: run.status,
                                cost_cents: 0.0,
                                error: run.error.clone(),
                                failure_kind: run.failure_kind,
                            },
                        )),
                        _ => w.record_runs.extend(verify_run.clone()),
                    }
                    w.patch_commit = commit.clone();
                    w.verified_tree = Some(verified_tree.clone());
                },
            )
            .await?;
        match refusal {
            Some(why) => Err(Error::InvalidArgument(why)),
            None => Ok(updated),
        }
    }

    /// A runner gives a lease back unfinished; the task is offered again without counting.
    /// With `infrastructure`, the runner could not do the work (a missing program, a git or
    /// disk error): the run records that, and the reason.
    pub async fn release(
        &self,
        runner_id: &str,
        lease: &LeaseRef,
        reason: &str,
        infrastructure: bool,
    ) -> Result<Task> {
        let task = self.check_lease(runner_id, lease).await?;
        let reason = if reason.trim().is_empty() {
            "no reason given".to_owned()
        } else {
            reason.trim().to_owned()
        };
        if infrastructure {
            let runner = task
                .lease
                .as_ref()
                .map(|l| l.runner.clone())
                .unwrap_or_default();
            tracing::warn!(
                task = %task.id,
                runner,
                "infrastructure failure on the runner, lease given back uncharged: {}",
                reason.lines().next().unwrap_or_default()
            );
        }
        let event = Event::Released {
            reason,
            infrastructure,
        };
        self.transition_from(task, &event, |t| lease_matches(t, lease), |_, _| {})
            .await
    }

    /// Pushes eligible tasks to free slots and expires lapsed leases, until `shutdown`.
    pub async fn dispatch_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = match self.dispatch_once().await {
                Ok(next) => next,
                Err(err) => {
                    tracing::error!(error = %err, "dispatch round failed; retrying");
                    Some(now_ms() + RETRY_AFTER_ERROR.as_millis() as i64)
                }
            };
            let sleep = match next {
                Some(at) => Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64),
                None => Duration::from_secs(24 * 3600),
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// One round: expire lapsed leases, then fill free slots. Leases are decided in memory and
    /// committed in groups of up to `--dispatch-batch` per database transaction. Returns when
    /// the next timer (a back-off ending, a lease expiring) is due.
    pub async fn dispatch_once(&self) -> Result<Option<Millis>> {
        let now = now_ms();
        let expired = self.registry().expired(now);
        for (lease_id, live) in expired {
            self.expire(&lease_id, &live).await?;
        }
        let mut free = self.registry().free_slots();
        let mut total: u32 = free.iter().map(|f| f.2).sum();
        // Candidates come in pages (two groups, at least 128), so the first leases go out
        // after a small query however many slots are free; at most twice the free slots are
        // looked at.
        let page = u32::try_from(self.settings.dispatch_batch)
            .unwrap_or(u32::MAX)
            .saturating_mul(2)
            .max(128);
        let mut budget = total.saturating_mul(2);
        let mut after = None;
        let mut tip = None;
        let mut batch = Vec::new();
        while total > 0 && budget > 0 {
            let limit = page.min(budget);
            let candidates = self.store.lease_candidates(now, after, limit).await?;
            budget -= limit;
            let last_page = candidates.len() < limit as usize;
            for task in candidates {
                if total == 0 {
                    break;
                }
                after = Some((task.priority, task.seq));
                if !lifecycle::leasable(&task.state, true, self.policy(), now) {
                    continue;
                }
                // A task with a patchset may have landed already (the database lost that):
                // the server's own record of its landing says so, without a process.
                if task.patch_commit.is_some() {
                    let tip = self.base_tip_cached(&mut tip).await?;
                    if self.record_if_landed(task.clone(), &tip).await? {
                        continue;
                    }
                }
                let pick = free
                    .iter()
                    .position(|f| f.2 > 0 && task.avoid_runner.as_deref() != Some(f.1.as_str()))
                    .or_else(|| free.iter().position(|f| f.2 > 0));
                let Some(i) = pick else { break };
                match self
                    .plan_lease(task, &free[i].0, &free[i].1, &mut tip)
                    .await
                {
                    Ok(planned) => {
                        batch.push(planned);
                        free[i].2 -= 1;
                        total -= 1;
                    }
                    Err(Error::FailedPrecondition(_)) => continue,
                    Err(err) => return Err(err),
                }
                if batch.len() >= self.settings.dispatch_batch.max(1) {
                    self.commit_leases(std::mem::take(&mut batch)).await?;
                }
            }
            if last_page {
                break;
            }
        }
        if !batch.is_empty() {
            self.commit_leases(batch).await?;
        }
        let next_backoff = self.store.next_backoff_end(now).await?;
        let next_expiry = self.registry().next_expiry();
        Ok([next_backoff, next_expiry].into_iter().flatten().min())
    }

    /// Decides to give `task` to a runner: the lease, its dev run, the history entry. `tip` is
    /// the base tip, read once per round.
    async fn plan_lease(
        &self,
        task: Task,
        runner_id: &str,
        runner_name: &str,
        tip: &mut Option<String>,
    ) -> Result<PlannedLease> {
        // Every attempt starts from the current base tip. The previous patchset, when it is to
        // be amended, is first replayed onto the tip (without a worktree, as the integrator
        // does); if it no longer applies, the attempt starts fresh, with the feedback.
        let base_commit = self.base_tip_cached(tip).await?;
        let mut fresh_note = None;
        let previous_commit = match (&task.patch_commit, task.state.amend) {
            (Some(previous), true) => match self.repo.parents(previous).await?.as_slice() {
                [parent] if *parent == base_commit => Some(previous.clone()),
                [parent] => match self.repo.replay(parent, &base_commit, previous).await? {
                    Ok(replayed) => {
                        // Kept under a ref until the runner has fetched it.
                        self.repo
                            .update_ref(
                                &format!("refs/pipeline/fetch/{}/previous", task.id),
                                &replayed,
                            )
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
        let (mut write, effects) = self.decide(&task, &Event::Leased, now_ms())?;
        if let Some(note) = fresh_note {
            write.state.amend = false;
            write.state.feedback = Some(match &write.state.feedback {
                Some(feedback) => format!("{feedback}\n\n{note}"),
                None => note,
            });
        }
        let epoch = task.lease_epoch + 1;
        write.lease = LeaseChange::Set(Lease {
            id: Lease::make_id(&task.id, epoch),
            epoch,
            runner: runner_name.to_owned(),
            runner_id: runner_id.to_owned(),
            base_commit,
            previous_commit,
        });
        write.start_run = Some(NewRun {
            phase: Phase::Dev,
            patchset: task.state.patchset,
            runner: Some(runner_name.to_owned()),
        });
        write.message = format!("leased to {runner_name} (epoch {epoch})");
        Ok(PlannedLease {
            task,
            write,
            effects,
            runner_id: runner_id.to_owned(),
            runner_name: runner_name.to_owned(),
        })
    }

    async fn base_tip_cached(&self, tip: &mut Option<String>) -> Result<String> {
        if let Some(t) = tip {
            return Ok(t.clone());
        }
        let t = self.repo.tip(&self.settings.base).await?;
        *tip = Some(t.clone());
        Ok(t)
    }

    /// Persists planned leases in one transaction, then pushes each to its runner. A lease
    /// that lost a race (the task changed) is dropped and another round is asked for.
    async fn commit_leases(&self, batch: Vec<PlannedLease>) -> Result<()> {
        let writes = batch.iter().map(|p| p.write.clone()).collect();
        let results = self.store.commit_transitions(writes).await?;
        for (planned, result) in batch.into_iter().zip(results) {
            match result {
                Ok(done) => {
                    self.committed(
                        &planned.task,
                        &planned.write,
                        &done.task,
                        done.event_id,
                        &planned.effects,
                    );
                    self.push_lease(
                        &done.task,
                        done.run_id,
                        &planned.runner_id,
                        &planned.runner_name,
                    )
                    .await?;
                }
                Err(err) => {
                    tracing::info!(task = %planned.task.id, error = %err, "lease not taken");
                    self.wake.notify_one();
                }
            }
        }
        Ok(())
    }

    /// Registers a committed lease as live and pushes its work to the runner; if the runner is
    /// gone, the lease is released at once.
    async fn push_lease(
        &self,
        leased: &Task,
        run_id: Option<i64>,
        runner_id: &str,
        runner_name: &str,
    ) -> Result<()> {
        let lease = leased.lease.clone().ok_or_else(|| {
            Error::Internal(format!("task {} was leased without a lease", leased.id))
        })?;
        let lease_ref = LeaseRef {
            id: lease.id.clone(),
            epoch: lease.epoch,
        };
        let prompt = prompt::build(
            leased,
            &PromptContext {
                base: &self.settings.base,
                base_commit: &lease.base_commit,
                amend: lease.previous_commit.is_some(),
            },
        );
        let assignment = Assignment {
            lease: lease_ref.clone(),
            task_id: leased.id.clone(),
            run_id: format!("dev-{}-{}", leased.id, lease.epoch),
            title: leased.title.clone(),
            namespace: leased.namespace.clone(),
            base: self.settings.base.clone(),
            base_commit: lease.base_commit.clone(),
            previous_commit: lease.previous_commit.clone(),
            patchset: leased.state.patchset,
            prompt,
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
                    expires_at: now_ms() + self.settings.lease_ttl_ms,
                    run_id,
                    verify_run_id: None,
                    last_seq: 0,
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
        let result = self
            .transition_with(
                &live.task,
                &Event::LeaseLost {
                    reason: reason.clone(),
                },
                |t| lease_matches(t, &lease),
                |_, w| w.avoid_runner = Some(runner.clone()),
            )
            .await;
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

/// A lease decided but not yet committed.
struct PlannedLease {
    task: Task,
    write: TransitionWrite,
    effects: Vec<crate::lifecycle::Effect>,
    runner_id: String,
    runner_name: String,
}

/// Fails unless `lease` is the task's current lease.
fn lease_matches(task: &Task, lease: &LeaseRef) -> Result<()> {
    match &task.lease {
        Some(l) if l.id == lease.id && l.epoch == lease.epoch => Ok(()),
        Some(l) => Err(refused(
            lease,
            format!("task {} was re-leased (epoch {})", task.id, l.epoch),
        )),
        None => Err(refused(
            lease,
            format!("task {} is {} with no lease", task.id, task.state.status),
        )),
    }
}
