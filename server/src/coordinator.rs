//! The coordinator: the one owner of task state. Every change to a task goes through
//! [`Coordinator::transition`]: read the task, decide with the pure [`lifecycle::apply`], persist
//! with a compare-and-swap on the task's version (a lost race is retried on a fresh read), and
//! only then act on the effects. The gRPC layer calls these methods and nothing else.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::domain::{Millis, NewTask, Run, RunStatus, StatusCounts, Task, TaskEvent, TaskId};
use crate::error::{Error, Result};
use crate::lifecycle::{self, Effect, Event, Policy};
use crate::store::{RunEnd, Store, TransitionWrite};

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
}

/// The coordinator's domain API over a [`Store`].
pub struct Coordinator<S> {
    store: S,
    policy: Policy,
    base: String,
}

impl<S: Store> Coordinator<S> {
    pub fn new(store: S, policy: Policy, base: String) -> Self {
        Self {
            store,
            policy,
            base,
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub async fn create_task(&self, new: NewTask) -> Result<Task> {
        let task = self.store.create_task(new, now_ms()).await?;
        tracing::info!(task = %task.id, priority = task.priority, "task created");
        Ok(task)
    }

    pub async fn list_tasks(&self, status: Option<crate::domain::TaskStatus>) -> Result<Vec<Task>> {
        self.store.list_tasks(status).await
    }

    pub async fn show_task(&self, id: &TaskId) -> Result<TaskDetail> {
        let task = self.get(id).await?;
        let runs = self.store.runs(id).await?;
        let events = self.store.events(id).await?;
        Ok(TaskDetail { task, runs, events })
    }

    pub async fn add_dependencies(&self, id: &TaskId, deps: &[TaskId]) -> Result<Task> {
        self.store.add_dependencies(id, deps, now_ms()).await
    }

    /// Cancels a task; a running agent is stopped (once runners exist).
    pub async fn cancel(&self, id: &TaskId) -> Result<Task> {
        self.transition(id, Event::Cancel).await
    }

    /// Sends a NeedsHelp, Cancelled or Open task back to Open with its failure count cleared.
    pub async fn retry(&self, id: &TaskId) -> Result<Task> {
        self.transition(id, Event::Retry).await
    }

    pub async fn status(&self) -> Result<Status> {
        Ok(Status {
            counts: self.store.status_counts().await?,
            runners: self.runners().len() as u64,
            base: self.base.clone(),
        })
    }

    /// The runners known to the server; none until the runner protocol exists.
    pub fn runners(&self) -> Vec<RunnerInfo> {
        Vec::new()
    }

    /// At start-up, sends every task a crash left InProgress back to Open; returns how many.
    pub async fn recover(&self) -> Result<usize> {
        let stale = self
            .store
            .list_tasks(Some(crate::domain::TaskStatus::InProgress))
            .await?;
        for task in &stale {
            self.transition(&task.id, Event::Recover).await?;
            tracing::warn!(task = %task.id, "recovered a task left in progress by a restart");
        }
        Ok(stale.len())
    }

    async fn get(&self, id: &TaskId) -> Result<Task> {
        self.store
            .get_task(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("task {id} does not exist")))
    }

    /// Reads the task, decides with the lifecycle, persists by compare-and-swap, then carries
    /// out the effects. A lost race is re-decided on a fresh read.
    pub async fn transition(&self, id: &TaskId, event: Event) -> Result<Task> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let task = self.get(id).await?;
            let now = now_ms();
            let decided = lifecycle::apply(&task.state, &event, &self.policy, now)
                .map_err(|refusal| Error::FailedPrecondition(format!("task {id}: {refusal}")))?;
            let close_runs = run_end_for(&event, &decided.message);
            let write = TransitionWrite {
                task_id: id.clone(),
                expected_version: task.version,
                from: task.state.status,
                state: decided.state,
                kind: decided.kind.to_owned(),
                message: decided.message,
                at: now,
                close_runs,
                start_run: None,
            };
            match self.store.commit_transition(write).await {
                Ok(updated) => {
                    tracing::info!(
                        task = %id,
                        from = %task.state.status,
                        to = %updated.state.status,
                        kind = decided.kind,
                        "task transition"
                    );
                    self.carry_out(id, &decided.effects);
                    return Ok(updated);
                }
                Err(Error::Conflict(_)) => continue,
                Err(err) => return Err(err),
            }
        }
        Err(Error::Conflict(format!(
            "task {id} kept changing while this request was being decided; try again"
        )))
    }

    fn carry_out(&self, id: &TaskId, effects: &[Effect]) {
        for effect in effects {
            // Runners, the scheduler and the integrator subscribe here as they arrive.
            tracing::debug!(task = %id, ?effect, "effect");
        }
    }
}

/// How the runs still running end when `event` happens to their task.
fn run_end_for(event: &Event, message: &str) -> Option<RunEnd> {
    let failure = |error: String| {
        Some(RunEnd {
            status: RunStatus::Failure,
            cost_cents: 0.0,
            error: Some(error),
        })
    };
    match event {
        Event::Cancel => failure("cancelled".to_owned()),
        Event::Recover => failure(message.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TaskStatus;
    use crate::store::sqlite::SqliteStore;

    async fn coordinator() -> (tempfile::TempDir, Coordinator<SqliteStore>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("p.db");
        let store = SqliteStore::open(path.to_str().expect("utf-8"))
            .await
            .expect("open");
        (
            dir,
            Coordinator::new(store, Policy::default(), "main".into()),
        )
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
    async fn recovery_reopens_in_progress_tasks_and_closes_their_runs() {
        let (_dir, c) = coordinator().await;
        let t = c.create_task(new_task("x")).await.expect("create");
        // Simulate a lease taken before a crash.
        let decided =
            lifecycle::apply(&t.state, &Event::Leased, c.policy(), now_ms()).expect("lease");
        c.store()
            .commit_transition(TransitionWrite {
                task_id: t.id.clone(),
                expected_version: t.version,
                from: t.state.status,
                state: decided.state,
                kind: "leased".into(),
                message: "leased".into(),
                at: now_ms(),
                close_runs: None,
                start_run: Some(crate::store::NewRun {
                    phase: crate::domain::Phase::Dev,
                    patchset: 0,
                    runner: Some("r1".into()),
                }),
            })
            .await
            .expect("lease");
        assert_eq!(c.recover().await.expect("recover"), 1);
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
        assert_eq!(c.recover().await.expect("again"), 0);
    }
}
