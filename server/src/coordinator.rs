//! The coordinator: the one owner of task state. Every change to a task goes through
//! [`Coordinator::transition`]: read the task, decide with the pure [`lifecycle::apply`], persist
//! with a compare-and-swap on the task's version (a lost race is retried on a fresh read), and
//! only then act on the effects. The gRPC layer calls these methods and nothing else.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::domain::{
    FailureKind, Millis, NewTask, Phase, Run, RunStatus, StatusCounts, Task, TaskEvent, TaskId,
    TaskStatus,
};
use crate::error::{Error, Result};
use crate::git::Repo;
use crate::lifecycle::{self, Effect, Event, Policy};
use crate::registry::{LeaseRef, Push, Registry};
use crate::store::{LeaseChange, RunEnd, Store, TransitionWrite};

/// The base tip up to which the trailers on the base were scanned for task IDs (`meta`).
const HISTORY_SCANNED: &str = "history_scanned_tip";

/// How many times a transition is re-decided after losing a race to another writer.
const MAX_CAS_ATTEMPTS: usize = 8;

/// The current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A task with its runs and history, for `task show`.
#[derive(Clone, Debug)]
pub struct TaskDetail {
    pub task: Task,
    pub runs: Vec<Run>,
    pub events: Vec<TaskEvent>,
    /// Why it is not moving (see [`lifecycle::waiting_for`]).
    pub waiting_for: Vec<String>,
}

/// A registered runner as `pipelinectl runners` shows it.
#[derive(Clone, Debug)]
pub struct RunnerInfo {
    pub id: String,
    pub name: String,
    pub state: RunnerState,
    pub slots_used: u32,
    pub slots_total: u32,
    pub last_heartbeat: Option<Millis>,
    pub labels: Vec<String>,
    pub version: String,
    /// Why the runner takes no work (it said so after repeated infrastructure failures).
    pub unhealthy: Option<String>,
}

/// What a runner is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunnerState {
    Idle,
    Busy,
    Draining,
    Offline,
}

/// Task counts plus the number of connected runners.
#[derive(Clone, Debug)]
pub struct Status {
    pub counts: StatusCounts,
    pub runners: u64,
    pub base: String,
    /// Why the server is not healthy (its database refuses writes), if it is not.
    pub unhealthy: Option<String>,
}

/// What the coordinator needs besides its store.
#[derive(Clone, Debug)]
pub struct Settings {
    pub policy: Policy,
    /// The base branch's name.
    pub base: String,
    /// Where incoming bundles are spooled.
    pub spool_dir: PathBuf,
    /// A lease's lifetime without a heartbeat.
    pub lease_ttl_ms: Millis,
    /// The largest bundle a runner may send.
    pub max_bundle_bytes: u64,
    /// How the server verifies an integrated commit.
    pub verify: pipeline_runner::config::VerifyArgs,
    /// SIGTERM → SIGKILL delay when a build is stopped.
    pub kill_grace: std::time::Duration,
    /// The worktree where integrated commits are built.
    pub integration_dir: PathBuf,
    /// The remote the base is pushed to after each integration.
    pub push_remote: Option<String>,
    /// A run's log beyond this many bytes keeps its head and tail only.
    pub log_cap_bytes: u64,
    /// The environment integration builds start from (the allow-listed variables).
    pub build_env: Vec<(String, String)>,
    /// Leases committed per database transaction (1 = one transaction per lease).
    pub dispatch_batch: usize,
}

/// The coordinator's domain API over a [`Store`]: tasks, runners, leases.
pub struct Coordinator<S> {
    pub(crate) store: S,
    pub(crate) settings: Settings,
    pub(crate) repo: Repo,
    pub(crate) registry: Mutex<Registry>,
    /// Wakes the dispatch loop: a task may have become leasable or a slot may have freed.
    pub(crate) wake: Notify,
    /// Wakes the integrator: a task became Verified or a dependency Done.
    pub(crate) integrate_wake: Notify,
    /// Run logs and live transitions.
    pub(crate) logs: crate::logs::LogHub,
    /// Credentials and roles.
    pub auth: crate::auth::Auth,
    /// Task counts kept in step with every committed change, so `status` reads no database;
    /// `None` until [`Coordinator::load_counts`].
    counts: Mutex<Option<StatusCounts>>,
}

impl<S: Store> Coordinator<S> {
    pub fn new(store: S, settings: Settings, repo: Repo, auth: crate::auth::Auth) -> Self {
        Self {
            auth,
            logs: crate::logs::LogHub::new(settings.log_cap_bytes),
            store,
            settings,
            repo,
            registry: Mutex::new(Registry::default()),
            wake: Notify::new(),
            integrate_wake: Notify::new(),
            counts: Mutex::new(None),
        }
    }

    /// Reads the task counts from the store once; from then on every committed change keeps
    /// them current (call it before any change can happen: at start-up, before serving).
    pub async fn load_counts(&self) -> Result<()> {
        let counts = self.store.status_counts().await?;
        *self.counts_mut() = Some(counts);
        Ok(())
    }

    fn counts_mut(&self) -> MutexGuard<'_, Option<StatusCounts>> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn policy(&self) -> &Policy {
        &self.settings.policy
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The registry, even if a thread panicked while holding it (its data stays consistent:
    /// every method leaves it whole).
    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub async fn create_task(&self, new: NewTask) -> Result<Task> {
        self.refuse_cancelled(None, &new.depends_on).await?;
        let task = self.store.create_task(new, now_ms()).await?;
        if let Some(counts) = self.counts_mut().as_mut() {
            counts.add(TaskStatus::Open, 1);
        }
        tracing::info!(task = %task.id, priority = task.priority, "task created");
        self.wake.notify_one();
        if let Some(created) = self.store.events(&task.id).await?.pop() {
            self.logs.publish_transition(created);
        }
        Ok(task)
    }

    /// Tasks in lease order, each with what it waits for.
    pub async fn list_tasks(&self, status: Option<TaskStatus>) -> Result<Vec<(Task, Vec<String>)>> {
        let tasks = self.store.list_tasks(status).await?;
        let mut known: std::collections::HashMap<String, TaskStatus> = tasks
            .iter()
            .map(|t| (t.id.to_string(), t.state.status))
            .collect();
        let missing: Vec<TaskId> = tasks
            .iter()
            .flat_map(|t| t.depends_on.iter())
            .filter(|d| !known.contains_key(d.as_str()))
            .cloned()
            .collect();
        if !missing.is_empty() {
            for (id, status) in self.store.statuses(&missing).await? {
                known.insert(id.to_string(), status);
            }
        }
        let (capacity, now) = (self.capacity(), now_ms());
        Ok(tasks
            .into_iter()
            .map(|task| {
                let deps: Vec<(String, TaskStatus)> = task
                    .depends_on
                    .iter()
                    .filter_map(|d| known.get(d.as_str()).map(|s| (d.to_string(), *s)))
                    .collect();
                let why = lifecycle::waiting_for(
                    task.id.as_str(),
                    &task.state,
                    &deps,
                    self.policy(),
                    now,
                    capacity,
                );
                (task, why)
            })
            .collect())
    }

    pub async fn show_task(&self, id: &TaskId) -> Result<TaskDetail> {
        let task = self.get(id).await?;
        let runs = self.store.runs(id).await?;
        let events = self.store.events(id).await?;
        let waiting_for = self.waiting_for(&task).await?;
        Ok(TaskDetail {
            task,
            runs,
            events,
            waiting_for,
        })
    }

    /// Why `task` is not moving, in sentences.
    pub async fn waiting_for(&self, task: &Task) -> Result<Vec<String>> {
        let deps: Vec<(String, TaskStatus)> = self
            .store
            .statuses(&task.depends_on)
            .await?
            .into_iter()
            .map(|(id, s)| (id.to_string(), s))
            .collect();
        Ok(lifecycle::waiting_for(
            task.id.as_str(),
            &task.state,
            &deps,
            self.policy(),
            now_ms(),
            self.capacity(),
        ))
    }

    /// What the runners can take now.
    fn capacity(&self) -> lifecycle::Capacity {
        let registry = self.registry();
        let mut capacity = lifecycle::Capacity {
            connected: 0,
            taking: 0,
            free_slots: 0,
        };
        for r in registry.runners() {
            if !r.connected {
                continue;
            }
            capacity.connected += 1;
            if !r.draining && r.unhealthy.is_none() {
                capacity.taking += 1;
                capacity.free_slots += r.slots.saturating_sub(r.used);
            }
        }
        capacity
    }

    /// Refuses a dependency on a cancelled task: the dependent would wait for ever.
    async fn refuse_cancelled(&self, id: Option<&TaskId>, deps: &[TaskId]) -> Result<()> {
        for (dep, status) in self.store.statuses(deps).await? {
            if status == TaskStatus::Cancelled {
                let who = id.map_or_else(|| "the task".to_owned(), |i| format!("task {i}"));
                return Err(Error::FailedPrecondition(format!(
                    "{dep} is cancelled, so {who} would wait for it for ever; retry {dep} first \
                     (pipelinectl task retry {dep}) or leave it out"
                )));
            }
        }
        Ok(())
    }

    pub async fn add_dependencies(&self, id: &TaskId, deps: &[TaskId]) -> Result<Task> {
        self.refuse_cancelled(Some(id), deps).await?;
        self.store.add_dependencies(id, deps, now_ms()).await
    }

    /// Cancels a task; a running agent is told to stop at once.
    pub async fn cancel(&self, id: &TaskId) -> Result<Task> {
        self.transition(id, Event::Cancel).await
    }

    /// Sends a NeedsHelp, Cancelled or Open task back to Open with its failure count cleared.
    pub async fn retry(&self, id: &TaskId) -> Result<Task> {
        self.transition(id, Event::Retry).await
    }

    pub async fn status(&self) -> Result<Status> {
        let counts = self.counts_mut().clone();
        let counts = match counts {
            Some(counts) => counts,
            None => self.store.status_counts().await?,
        };
        Ok(Status {
            counts,
            runners: self.registry().connected_count() as u64,
            base: self.settings.base.clone(),
            unhealthy: self
                .store
                .write_failure()
                .map(|why| format!("database writes are failing: {why}")),
        })
    }

    /// The runners known to the server, by name.
    pub fn runners(&self) -> Vec<RunnerInfo> {
        self.registry()
            .runners()
            .into_iter()
            .map(|r| RunnerInfo {
                state: if !r.connected {
                    RunnerState::Offline
                } else if r.draining {
                    RunnerState::Draining
                } else if r.used > 0 {
                    RunnerState::Busy
                } else {
                    RunnerState::Idle
                },
                id: r.id,
                name: r.name,
                slots_used: r.used,
                slots_total: r.slots,
                last_heartbeat: r.last_heartbeat,
                labels: r.labels,
                version: r.version,
                unhealthy: r.unhealthy,
            })
            .collect()
    }

    /// At start-up: a task in progress with a lease keeps it for one more TTL, so that its
    /// runner can reconnect and re-attach it; one without a lease goes back to Open. Returns
    /// (leases restored, tasks reopened).
    pub async fn recover(&self) -> Result<(usize, usize)> {
        let stale = self.store.list_tasks(Some(TaskStatus::InProgress)).await?;
        let (mut restored, mut reopened) = (0, 0);
        let expires_at = now_ms() + self.settings.lease_ttl_ms;
        for task in &stale {
            if let Some(lease) = &task.lease {
                let running = self.store.running_runs(&task.id).await?;
                let of = |phase| running.iter().find(|r| r.phase == phase).map(|r| r.id);
                let (run_id, verify_run_id) = (of(Phase::Dev), of(Phase::Verify));
                let mut last_seq = 0;
                for run in &running {
                    last_seq = last_seq.max(self.store.last_log_seq(run.id).await?);
                }
                self.registry().restore_lease(
                    lease.id.clone(),
                    crate::registry::LiveLease {
                        task: task.id.clone(),
                        epoch: lease.epoch,
                        runner_id: lease.runner_id.clone(),
                        runner: lease.runner.clone(),
                        expires_at,
                        run_id,
                        verify_run_id,
                        last_seq,
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
        let range = match self.store.get_meta(HISTORY_SCANNED).await? {
            Some(scanned)
                if crate::git::check_sha(&scanned).is_ok()
                    && self.repo.is_ancestor(&scanned, &tip).await.unwrap_or(false) =>
            {
                format!("{scanned}..{tip}")
            }
            _ => tip.clone(),
        };
        let highest = self.repo.highest_task_number(&range).await?;
        if highest > 0 {
            self.store.raise_next_task_number(highest + 1).await?;
        }
        self.store.put_meta(HISTORY_SCANNED, &tip).await?;
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

    /// Records `task` Done if its own landed commit is on `tip`; true if it was.
    pub(crate) async fn record_if_landed(&self, task: Task, tip: &str) -> Result<bool> {
        let Some(commit) = self.repo.landed_on(task.id.as_str(), tip).await? else {
            return Ok(false);
        };
        tracing::warn!(task = %task.id, %commit, "found the task's commit on the base; recording it done");
        self.transition_from(
            task,
            &Event::FoundLanded { commit },
            |_| Ok(()),
            |_, w| w.end_integration = true,
        )
        .await?;
        Ok(true)
    }

    pub(crate) async fn get(&self, id: &TaskId) -> Result<Task> {
        self.store
            .get_task(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("task {id} does not exist")))
    }

    /// Reads the task, decides with the lifecycle, persists by compare-and-swap, then carries
    /// out the effects. A lost race is re-decided on a fresh read.
    pub async fn transition(&self, id: &TaskId, event: Event) -> Result<Task> {
        self.transition_with(id, &event, |_| Ok(()), |_, _| {})
            .await
    }

    /// [`Coordinator::transition`] with a precondition `check` on the freshly read task (e.g.
    /// "this lease is still the task's") and a `shape` that adds to the write (runs, a lease,
    /// a commit). Leaving InProgress always clears the lease.
    pub(crate) async fn transition_with(
        &self,
        id: &TaskId,
        event: &Event,
        check: impl Fn(&Task) -> Result<()>,
        shape: impl Fn(&Task, &mut TransitionWrite),
    ) -> Result<Task> {
        let task = self.get(id).await?;
        self.transition_from(task, event, check, shape).await
    }

    /// [`Coordinator::transition_with`] deciding first on `task` as the caller just read it
    /// (saving a read); a lost race is re-decided on a fresh read.
    pub(crate) async fn transition_from(
        &self,
        mut task: Task,
        event: &Event,
        check: impl Fn(&Task) -> Result<()>,
        shape: impl Fn(&Task, &mut TransitionWrite),
    ) -> Result<Task> {
        for attempt in 0..MAX_CAS_ATTEMPTS {
            if attempt > 0 {
                task = self.get(&task.id).await?;
            }
            check(&task)?;
            let (mut write, effects) = self.decide(&task, event, now_ms())?;
            shape(&task, &mut write);
            match self.store.commit_transition(write.clone()).await {
                Ok((updated, event_id)) => {
                    self.committed(&task, &write, &updated, event_id, &effects);
                    return Ok(updated);
                }
                Err(Error::Conflict(_)) => continue,
                Err(err) => return Err(err),
            }
        }
        Err(Error::Conflict(format!(
            "task {} kept changing while this request was being decided; try again",
            task.id
        )))
    }

    /// Decides what `event` does to `task` at `now`: the write to persist and the effects to
    /// carry out once it is. Leaving InProgress always clears the lease.
    pub(crate) fn decide(
        &self,
        task: &Task,
        event: &Event,
        now: Millis,
    ) -> Result<(TransitionWrite, Vec<Effect>)> {
        let decided = lifecycle::apply(&task.state, event, self.policy(), now)
            .map_err(|refusal| Error::FailedPrecondition(format!("task {}: {refusal}", task.id)))?;
        let effects = decided.effects.clone();
        let mut write = TransitionWrite::new(task, decided, now);
        write.close_runs = run_end_for(event, &write.message);
        if task.state.status == TaskStatus::InProgress
            && write.state.status != TaskStatus::InProgress
        {
            write.lease = LeaseChange::Clear;
        }
        Ok((write, effects))
    }

    /// After a transition of `before` is persisted as `after`: publish it, log it, carry out
    /// its effects.
    pub(crate) fn committed(
        &self,
        before: &Task,
        write: &TransitionWrite,
        after: &Task,
        event_id: i64,
        effects: &[Effect],
    ) {
        if let Some(counts) = self.counts_mut().as_mut() {
            counts.moved(before.state.status, after.state.status);
            // A dev run runs exactly while its task is leased: it starts with the lease and
            // the change that takes the task out of InProgress ends it.
            if write
                .start_run
                .as_ref()
                .is_some_and(|r| r.phase == Phase::Dev)
            {
                counts.active_dev_runs += 1;
            }
            if write.close_runs.is_some() && before.state.status == TaskStatus::InProgress {
                counts.active_dev_runs = counts.active_dev_runs.saturating_sub(1);
            }
        }
        // A lease that ended: its run's log says why (a line of the server's, before the
        // status change reaches the run's followers), and its runner is told to stop.
        if let Some(old) = &before.lease
            && after.lease.as_ref().is_none_or(|l| l.id != old.id)
        {
            let live = self.registry().remove_lease(&old.id);
            if let Some(live) = live {
                if !matches!(
                    write.kind.as_str(),
                    "verified" | "dev_failed" | "verify_failed"
                ) {
                    self.note_on_run(&live, &format!("{}: {}", write.kind, write.message));
                }
                if effects.contains(&Effect::StopRun) {
                    self.registry().push(
                        &live.runner_id,
                        Push::Cancel(LeaseRef {
                            id: old.id.clone(),
                            epoch: old.epoch,
                        }),
                    );
                }
            }
            self.wake.notify_one();
        }
        self.logs.publish_transition(crate::domain::TaskEvent {
            id: event_id,
            task_id: before.id.clone(),
            at: write.at,
            kind: write.kind.clone(),
            from: Some(before.state.status),
            to: write.state.status,
            message: write.message.clone(),
        });
        tracing::info!(
            task = %before.id,
            from = %before.state.status,
            to = %after.state.status,
            kind = %write.kind,
            "task transition"
        );
        self.carry_out(effects);
    }

    /// Acts on a persisted transition's effects: wake the dispatcher or the integrator.
    fn carry_out(&self, effects: &[Effect]) {
        for effect in effects {
            match effect {
                Effect::WakeScheduler => self.wake.notify_one(),
                Effect::DependentsUnblocked => {
                    self.wake.notify_one();
                    self.integrate_wake.notify_one();
                }
                Effect::WakeIntegrator => self.integrate_wake.notify_one(),
                // The runner was told above.
                Effect::StopRun => {}
            }
        }
    }
}

/// How the runs still running end when `event` happens to their task.
fn run_end_for(event: &Event, message: &str) -> Option<RunEnd> {
    let failure = |error: String, failure_kind| {
        Some(RunEnd {
            status: RunStatus::Failure,
            cost_cents: 0.0,
            error: Some(error),
            failure_kind,
        })
    };
    let infra = Some(FailureKind::Infrastructure);
    match event {
        Event::Cancel => failure("cancelled".to_owned(), None),
        Event::Recover => failure(message.to_owned(), infra),
        Event::LeaseLost { reason } => failure(reason.clone(), infra),
        Event::Released {
            reason,
            infrastructure: true,
        } => failure(reason.clone(), infra),
        Event::Released { reason, .. } => failure(format!("released: {reason}"), None),
        Event::FoundLanded { commit } => failure(
            format!("abandoned: the task's commit {commit} was found on the base"),
            None,
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    async fn coordinator() -> (tempfile::TempDir, Coordinator<SqliteStore>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("p.db");
        let store = SqliteStore::open(path.to_str().expect("utf-8"))
            .await
            .expect("open");
        let settings = Settings {
            policy: Policy::default(),
            base: "main".into(),
            spool_dir: dir.path().join("spool"),
            lease_ttl_ms: 30_000,
            max_bundle_bytes: 1 << 20,
            verify: pipeline_runner::config::VerifyArgs {
                verify: pipeline_runner::config::VerifyMode::Bild,
                build_cmd: None,
                test_cmd: None,
                no_verify: true,
            },
            kill_grace: std::time::Duration::from_secs(1),
            integration_dir: dir.path().join("integration"),
            push_remote: None,
            log_cap_bytes: 1 << 20,
            build_env: Vec::new(),
            dispatch_batch: 64,
        };
        let repo = Repo::at(dir.path());
        let auth = crate::auth::Auth::open(&store, dir.path(), 10)
            .await
            .expect("auth");
        (dir, Coordinator::new(store, settings, repo, auth))
    }

    fn new_task(title: &str) -> NewTask {
        NewTask::new(None, title.into(), String::new(), None, None, None, vec![]).expect("valid")
    }

    #[tokio::test]
    async fn cancel_and_retry_go_through_the_lifecycle() {
        let (_dir, c) = coordinator().await;
        let t = c.create_task(new_task("x")).await.expect("create");
        let t = c.cancel(&t.id).await.expect("cancel");
        assert_eq!(t.state.status, TaskStatus::Cancelled);
        let err = c.cancel(&t.id).await.expect_err("twice");
        assert_eq!(
            err.to_string(),
            "task t-1: cannot cancel a task that is cancelled already"
        );
        let t = c.retry(&t.id).await.expect("retry");
        assert_eq!(t.state.status, TaskStatus::Open);
        let detail = c.show_task(&t.id).await.expect("show");
        let kinds: Vec<&str> = detail.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["created", "cancelled", "retried"]);
        let unknown = TaskId::parse("nope").expect("id");
        let err = c.cancel(&unknown).await.expect_err("unknown");
        assert!(matches!(err, Error::NotFound(_)));
    }

    #[tokio::test]
    async fn recovery_reopens_in_progress_tasks_without_a_lease() {
        let (_dir, c) = coordinator().await;
        let t = c.create_task(new_task("x")).await.expect("create");
        // Simulate a lease taken before a crash.
        let decided =
            lifecycle::apply(&t.state, &Event::Leased, c.policy(), now_ms()).expect("lease");
        let mut write = TransitionWrite::new(&t, decided, now_ms());
        write.start_run = Some(crate::store::NewRun {
            phase: crate::domain::Phase::Dev,
            patchset: 0,
            runner: Some("r1".into()),
        });
        c.store().commit_transition(write).await.expect("lease");
        assert_eq!(c.recover().await.expect("recover"), (0, 1));
        let detail = c.show_task(&t.id).await.expect("show");
        assert_eq!(detail.task.state.status, TaskStatus::Open);
        assert_eq!(detail.task.state.failures, 0);
        assert_eq!(detail.runs.len(), 1);
        assert_eq!(detail.runs[0].status, RunStatus::Failure);
        assert!(
            detail.runs[0]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("restarted"))
        );
        assert_eq!(c.recover().await.expect("again"), (0, 0));
    }

    #[tokio::test]
    async fn status_counts_kept_in_memory_match_the_database() {
        let (_dir, c) = coordinator().await;
        let a = c.create_task(new_task("a")).await.expect("create");
        let decided =
            lifecycle::apply(&a.state, &Event::Leased, c.policy(), now_ms()).expect("lease");
        let mut write = TransitionWrite::new(&a, decided, now_ms());
        write.start_run = Some(crate::store::NewRun {
            phase: crate::domain::Phase::Dev,
            patchset: 0,
            runner: Some("r1".into()),
        });
        c.store().commit_transition(write).await.expect("lease");
        c.load_counts().await.expect("load");
        let check = || async {
            let memory = c.status().await.expect("status").counts;
            let stored = c.store().status_counts().await.expect("counts");
            assert_eq!(memory, stored);
            memory
        };
        assert_eq!(check().await.active_dev_runs, 1);
        let b = c.create_task(new_task("b")).await.expect("create");
        c.create_task(new_task("c")).await.expect("create");
        c.cancel(&b.id).await.expect("cancel");
        check().await;
        c.recover().await.expect("recover");
        let after = check().await;
        assert_eq!(
            (after.open, after.cancelled, after.active_dev_runs),
            (2, 1, 0)
        );
        c.retry(&b.id).await.expect("retry");
        assert_eq!(check().await.open, 3);
    }
}
