//! An in-memory [`Store`] for the unit tests of the layers above it (the coordinator, the
//! dispatcher, the integrator): the same behaviour as the SQLite store, checked by the same
//! suite ([`super::suite`]), with nothing on disk. Not for production: it keeps everything in
//! one mutex and forgets it all when dropped.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::plan::{self, Creation};
use super::{
    Committed, EndSessions, Journal, NewEvent, NewRun, RunEnd, SessionRecord, Store, TaskFilter,
    TaskWrite, TrainEnd, TrainStat, UsageBucket, WebhookCursor,
};
use crate::domain::{
    EventKind, LogLine, Millis, NewTask, Phase, Run, RunStatus, StatusCounts, Task, TaskEdit,
    TaskEvent, TaskId, TaskStatus,
};
use crate::error::{Error, Result};
use crate::feed::{Feed, FeedEntry, NewEntry, Topic};
use pipeline_core::ids::CommitId;
use pipeline_core::lines::{LIST_FEEDBACK_BYTES, keep_end};

#[derive(Clone, Default)]
struct Tables {
    tasks: HashMap<TaskId, Task>,
    next_seq: i64,
    deps: Vec<(TaskId, TaskId)>,
    runs: Vec<Run>,
    events: Vec<TaskEvent>,
    /// The feed: every entry, a task's history entries too (`position` = index + 1).
    entries: Vec<FeedEntry>,
    /// How many of `entries` are published.
    published: usize,
    integrations: BTreeMap<TaskId, Journal>,
    trains: Vec<TrainRow>,
    logs: BTreeMap<(i64, u64), LogLine>,
    meta: BTreeMap<String, String>,
    sessions: BTreeMap<String, SessionRecord>,
    webhooks: BTreeMap<String, WebhookCursor>,
}

/// A train: its base tip, when it started, and when and how it ended.
type TrainRow = (CommitId, Millis, Option<(Millis, TrainEnd)>);

/// A store held in memory.
#[derive(Clone, Default)]
pub struct MemoryStore {
    tables: Arc<Mutex<Tables>>,
    feed: Feed,
}

/// The tables, held: when let go, the feed entries written meanwhile are published, in
/// order, before another writer can add any (a write that failed and put the tables back
/// as they were published nothing).
struct Guard<'a> {
    tables: MutexGuard<'a, Tables>,
    feed: &'a Feed,
}

impl std::ops::Deref for Guard<'_> {
    type Target = Tables;
    fn deref(&self) -> &Tables {
        &self.tables
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Tables {
        &mut self.tables
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let t = &mut *self.tables;
        for entry in t.entries.iter().skip(t.published) {
            self.feed.publish(entry.clone());
        }
        t.published = t.entries.len();
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Guard<'_> {
        Guard {
            tables: self
                .tables
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            feed: &self.feed,
        }
    }
}

const NEXT_TASK_NUMBER: &str = "next_task_number";

impl Tables {
    fn sorted(&self, keep: impl Fn(&Task) -> bool) -> Vec<Task> {
        let mut tasks: Vec<Task> = self.tasks.values().filter(|t| keep(t)).cloned().collect();
        tasks.sort_by_key(|t| (t.priority, t.seq));
        tasks
    }

    fn event(
        &mut self,
        task: &TaskId,
        at: Millis,
        kind: EventKind,
        from: Option<TaskStatus>,
        to: TaskStatus,
        message: &str,
    ) -> i64 {
        let id = self.entries.len() as i64 + 1;
        let event = TaskEvent {
            id,
            task_id: task.clone(),
            at,
            kind,
            from,
            to,
            message: message.to_owned(),
        };
        self.entries.push(FeedEntry::of_task_event(&event));
        self.events.push(event);
        id
    }

    /// Records an entry that is not a task's; returns its position.
    fn record(&mut self, entry: &NewEntry) -> Result<i64> {
        if entry.topic == Topic::Task {
            return Err(Error::Internal(
                "a task's feed entry is written with its task's change".into(),
            ));
        }
        let position = self.entries.len() as i64 + 1;
        self.entries.push(FeedEntry {
            position,
            topic: entry.topic,
            subject: entry.subject.clone(),
            kind: entry.kind.clone(),
            at: entry.at,
            from: None,
            to: None,
            message: entry.message.clone(),
            data: entry.data.clone(),
        });
        Ok(position)
    }

    fn start_run(&mut self, task: &TaskId, run: &NewRun, at: Millis) -> i64 {
        // As the SQLite store numbers them: by phase and party; a server's verify run takes
        // the attempt of the runner's verification it settles.
        let count = |server: bool, phase: Phase| {
            self.runs
                .iter()
                .filter(|r| r.task_id == *task && r.phase == phase && r.runner.is_none() == server)
                .count() as u32
        };
        let attempt = if run.phase == Phase::Verify && run.runner.is_none() {
            count(false, Phase::Verify).max(1)
        } else {
            count(run.runner.is_none(), run.phase) + 1
        };
        let id = self.runs.len() as i64 + 1;
        self.runs.push(Run {
            id,
            task_id: task.clone(),
            phase: run.phase,
            patchset: run.patchset,
            attempt,
            runner: run.runner.clone(),
            status: RunStatus::Running,
            cost_cents: 0.0,
            started_at: at,
            finished_at: None,
            error: None,
            failure_kind: None,
            train: run.train,
            builds: None,
            usage: None,
        });
        id
    }

    fn end_runs(&mut self, task: &TaskId, only: Option<i64>, end: &RunEnd, at: Millis) {
        for run in &mut self.runs {
            if run.task_id == *task
                && run.status == RunStatus::Running
                && only.is_none_or(|id| id == run.id)
            {
                run.status = end.status;
                run.finished_at = Some(at);
                run.cost_cents += end.cost_cents;
                run.error = end.error.clone();
                run.failure_kind = end.failure_kind;
                run.builds = end.builds.or(run.builds);
                // As stored: the report's cost is the run's.
                run.usage = end.usage.clone().map(|mut u| {
                    u.cost_cents = run.cost_cents;
                    u
                });
            }
        }
    }

    fn deps_of(&self, task: &TaskId) -> Vec<TaskId> {
        let mut deps: Vec<TaskId> = self
            .deps
            .iter()
            .filter(|(t, _)| t == task)
            .map(|(_, d)| d.clone())
            .collect();
        deps.sort();
        deps
    }

    fn pending_of(&self, task: &TaskId) -> u32 {
        self.deps
            .iter()
            .filter(|(t, d)| {
                t == task
                    && self
                        .tasks
                        .get(d)
                        .is_some_and(|d| d.state.status != TaskStatus::Done)
            })
            .count() as u32
    }

    /// Whether `ancestor` is `task`'s parent, or its parent's, and so on.
    fn is_ancestor(&self, ancestor: &TaskId, task: &TaskId) -> bool {
        let mut at = self.tasks.get(task).and_then(|t| t.parent.clone());
        while let Some(p) = at {
            if p == *ancestor {
                return true;
            }
            at = self.tasks.get(&p).and_then(|t| t.parent.clone());
        }
        false
    }

    fn write(&mut self, w: &TaskWrite) -> Result<Committed> {
        let task = plan::swapped(self.tasks.get(&w.task_id), w)?;
        let before = self.tasks.insert(task.id.clone(), task.clone());
        if let (Some(before), Some(parent)) = (before, task.parent.clone()) {
            self.child_moved(&parent, Some(&before), &task);
        }
        let (mut event_id, mut run_id) = (0, None);
        for step in plan::write_steps(w) {
            match step {
                plan::Step::ReleaseDependents => {
                    let dependents: Vec<TaskId> = self
                        .deps
                        .iter()
                        .filter(|(_, d)| *d == task.id)
                        .map(|(t, _)| t.clone())
                        .collect();
                    for t in dependents {
                        if let Some(dependent) = self.tasks.get_mut(&t) {
                            dependent.deps_pending = dependent.deps_pending.saturating_sub(1);
                        }
                    }
                }
                plan::Step::EndIntegration => {
                    self.integrations.remove(&w.task_id);
                }
                plan::Step::Event {
                    kind,
                    from,
                    to,
                    message,
                } => event_id = self.event(&w.task_id, w.at, kind, Some(from), to, message),
                plan::Step::EndRuns { run, end } => self.end_runs(&w.task_id, run, end, w.at),
                plan::Step::StartRun(run) => run_id = Some(self.start_run(&w.task_id, run, w.at)),
                plan::Step::RecordRun(run) => {
                    let (new, end) = plan::finished_run(run);
                    let id = self.start_run(&w.task_id, &new, run.started_at);
                    self.end_runs(&w.task_id, Some(id), &end, w.at);
                }
            }
        }
        Ok(Committed {
            task,
            event_id,
            run_id,
        })
    }
}

impl Tables {
    /// What the SQLite store's triggers do ([`plan::child_moved`]): the parent's children
    /// figures follow a child that was created (`before` none) or changed, and its version
    /// moves with them.
    fn child_moved(&mut self, parent: &TaskId, before: Option<&Task>, after: &Task) {
        if let Some(p) = self.tasks.get_mut(parent)
            && plan::child_moved(&mut p.children, before, after)
        {
            p.version += 1;
        }
    }

    /// Writes what [`plan::create`] decided, as the SQLite store does: the rows (their
    /// children figures following their children as these come), their dependencies, their
    /// history and the counter.
    fn create(&mut self, plan: Creation, now: Millis) -> Result<Vec<(Task, TaskEvent)>> {
        if let Some(n) = plan.next_number {
            self.meta.insert(NEXT_TASK_NUMBER.to_owned(), n.to_string());
        }
        let mut written = HashMap::with_capacity(plan.rows.len());
        for row in &plan.rows {
            self.next_seq += 1;
            let event = self.event(
                &row.id,
                now,
                EventKind::Created,
                None,
                TaskStatus::Open,
                &row.message,
            );
            written.insert(row.id.clone(), (self.next_seq, event));
        }
        let edges: Vec<(TaskId, TaskId)> =
            plan.edges().map(|(t, d)| (t.clone(), d.clone())).collect();
        self.deps.extend(edges);
        let created = plan.created(now, |id| written.get(id).copied())?;
        for (task, _) in &created {
            let mut row = task.clone();
            row.children.total = 0;
            self.tasks.insert(row.id.clone(), row);
            if let Some(parent) = &task.parent {
                self.child_moved(parent, None, task);
            }
        }
        Ok(created)
    }
}

/// Runs a plan on the tables under their lock: their reads never wait, so it ends at its first
/// poll (and no lock is held across an await).
fn at_once<T>(plan: impl Future<Output = Result<T>>) -> Result<T> {
    let mut plan = std::pin::pin!(plan);
    match plan.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => result,
        Poll::Pending => Err(Error::Internal(
            "a plan waited on the in-memory store".to_owned(),
        )),
    }
}

impl plan::Reads for Tables {
    async fn statuses(&mut self, ids: &[&TaskId]) -> Result<HashMap<TaskId, TaskStatus>> {
        Ok(ids
            .iter()
            .filter_map(|i| Some(((*i).clone(), self.tasks.get(*i)?.state.status)))
            .collect())
    }

    async fn paused(&mut self, ids: &[&TaskId]) -> Result<HashMap<TaskId, String>> {
        Ok(ids
            .iter()
            .filter_map(|i| Some(((*i).clone(), self.tasks.get(*i)?.paused.clone()?)))
            .collect())
    }

    async fn next_number(&mut self) -> Result<u64> {
        Ok(self
            .meta
            .get(NEXT_TASK_NUMBER)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1))
    }

    async fn waited_on(&mut self, ids: &[&TaskId]) -> Result<Vec<TaskId>> {
        let mut out: Vec<TaskId> = self
            .deps
            .iter()
            .filter(|(t, _)| ids.contains(&t))
            .map(|(_, d)| d.clone())
            .collect();
        // An epic waits for its children.
        out.extend(
            self.tasks
                .values()
                .filter(|t| t.parent.as_ref().is_some_and(|p| ids.contains(&p)))
                .map(|t| t.id.clone()),
        );
        Ok(out)
    }

    async fn is_ancestor(&mut self, ancestor: &TaskId, task: &TaskId) -> Result<bool> {
        Ok(Tables::is_ancestor(self, ancestor, task))
    }
}

impl Store for MemoryStore {
    async fn create_task(&self, new: NewTask, now: Millis) -> Result<Task> {
        let mut t = self.lock();
        let plan = at_once(plan::create(&mut *t, vec![new], false))?;
        t.create(plan, now)?
            .pop()
            .map(|(task, _)| task)
            .ok_or_else(|| Error::Internal("a task was not created".to_owned()))
    }

    async fn get_task(&self, id: &TaskId) -> Result<Option<Task>> {
        Ok(self.lock().tasks.get(id).cloned())
    }

    async fn create_tasks(&self, new: Vec<NewTask>, now: Millis) -> Result<Vec<(Task, TaskEvent)>> {
        let mut t = self.lock();
        let plan = at_once(plan::create(&mut *t, new, true))?;
        t.create(plan, now)
    }

    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        after: Option<(u8, i64)>,
        limit: u32,
    ) -> Result<Vec<Task>> {
        let mut page = self.lock().sorted(|t| {
            filter.status.is_none_or(|s| t.state.status == s)
                && filter
                    .parent
                    .as_ref()
                    .is_none_or(|p| t.parent.as_ref() == Some(p))
                && after.is_none_or(|key| (t.priority, t.seq) > key)
        });
        page.truncate(limit as usize);
        for t in &mut page {
            t.description.clear();
            t.state.feedback = t
                .state
                .feedback
                .as_deref()
                .map(|f| keep_end(f, LIST_FEEDBACK_BYTES));
        }
        Ok(page)
    }

    async fn set_paused(
        &self,
        id: &TaskId,
        paused: Option<&str>,
        message: &str,
        now: Millis,
    ) -> Result<u32> {
        let mut t = self.lock();
        let ids: Vec<TaskId> = t
            .tasks
            .values()
            .filter(|task| {
                (task.id == *id || task.parent.as_ref() == Some(id))
                    && task.paused.is_some() != paused.is_some()
            })
            .map(|task| task.id.clone())
            .collect();
        for tid in &ids {
            let Some(task) = t.tasks.get_mut(tid) else {
                continue;
            };
            task.paused = paused.map(str::to_owned);
            task.version += 1;
            task.updated_at = now;
            let status = task.state.status;
            t.event(
                tid,
                now,
                if paused.is_some() {
                    EventKind::Paused
                } else {
                    EventKind::Resumed
                },
                Some(status),
                status,
                message,
            );
        }
        Ok(u32::try_from(ids.len()).unwrap_or(u32::MAX))
    }

    async fn edit_task(
        &self,
        id: &TaskId,
        version: i64,
        edit: &TaskEdit,
        event: NewEvent,
        now: Millis,
    ) -> Result<Task> {
        let mut t = self.lock();
        let task = t
            .tasks
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("task {id} does not exist")))?;
        if task.version != version {
            return Err(Error::Conflict(format!(
                "task {id} changed while it was being edited"
            )));
        }
        if let Some(title) = &edit.title {
            task.title = title.clone();
        }
        if let Some(description) = &edit.description {
            task.description = description.clone();
        }
        if let Some(namespace) = &edit.namespace {
            task.namespace = namespace.clone();
        }
        if let Some(priority) = edit.priority {
            task.priority = priority;
        }
        if let Some(requires) = &edit.requires {
            task.requires = requires.clone();
        }
        if let Some(cap) = edit.max_cost_cents {
            task.state.max_cost_cents = cap;
        }
        task.version += 1;
        task.updated_at = now;
        let edited = task.clone();
        t.event(
            id,
            now,
            event.kind,
            Some(event.from),
            event.to,
            &event.message,
        );
        Ok(edited)
    }

    async fn add_dependencies(
        &self,
        id: &TaskId,
        deps: &[TaskId],
        event: NewEvent,
        now: Millis,
    ) -> Result<Task> {
        let mut t = self.lock();
        let Some(task) = t.tasks.get(id).cloned() else {
            return Err(Error::NotFound(format!("task {id} does not exist")));
        };
        let new = at_once(plan::add_dependencies(&mut *t, &task, deps))?;
        if new.is_empty() {
            return Ok(task);
        }
        for dep in new {
            t.deps.push((id.clone(), dep));
        }
        let pending = t.pending_of(id);
        let depends_on = t.deps_of(id);
        t.event(
            id,
            now,
            event.kind,
            Some(event.from),
            event.to,
            &event.message,
        );
        let task = t.tasks.get_mut(id).ok_or_else(|| {
            Error::Internal(format!(
                "task {id} vanished while its dependencies were added"
            ))
        })?;
        task.deps_pending = pending;
        task.depends_on = depends_on;
        task.version += 1;
        task.updated_at = now;
        Ok(task.clone())
    }

    async fn commit(&self, write: TaskWrite) -> Result<Committed> {
        self.lock().write(&write)
    }

    async fn commit_all(&self, writes: Vec<TaskWrite>) -> Result<Vec<Result<Committed>>> {
        let mut t = self.lock();
        Ok(writes.iter().map(|w| t.write(w)).collect())
    }

    async fn runs(&self, id: &TaskId) -> Result<Vec<Run>> {
        Ok(self
            .lock()
            .runs
            .iter()
            .filter(|r| r.task_id == *id)
            .cloned()
            .collect())
    }

    async fn events(&self, id: &TaskId) -> Result<Vec<TaskEvent>> {
        Ok(self
            .lock()
            .events
            .iter()
            .filter(|e| e.task_id == *id)
            .cloned()
            .collect())
    }

    async fn status_counts(&self) -> Result<StatusCounts> {
        let t = self.lock();
        let mut counts = StatusCounts::default();
        for task in t.tasks.values() {
            counts.add(task.state.status, 1);
        }
        counts.active_dev_runs = t
            .runs
            .iter()
            .filter(|r| r.status == RunStatus::Running && r.phase == Phase::Dev)
            .count() as u64;
        Ok(counts)
    }

    async fn lease_candidates(
        &self,
        now: Millis,
        after: Option<(u8, i64)>,
        limit: u32,
    ) -> Result<Vec<Task>> {
        let t = self.lock();
        let mut out = t.sorted(|task| {
            task.state.status == TaskStatus::Open
                && task.deps_pending == 0
                && task.paused.is_none()
                && !task.children.any()
                && task.state.backoff_until.is_none_or(|u| u <= now)
                && after.is_none_or(|a| (task.priority, task.seq) > a)
        });
        out.truncate(limit as usize);
        Ok(out)
    }

    async fn verified(&self) -> Result<Vec<Task>> {
        Ok(self
            .lock()
            .sorted(|t| t.state.status == TaskStatus::Verified))
    }

    async fn finished_epics(&self) -> Result<Vec<TaskId>> {
        Ok(self
            .lock()
            .sorted(|t| {
                t.children.any()
                    && t.children.unfinished() == 0
                    && t.children.done > 0
                    && matches!(t.state.status, TaskStatus::Open | TaskStatus::NeedsHelp)
            })
            .into_iter()
            .map(|t| t.id)
            .collect())
    }

    async fn unfinished(&self) -> Result<Vec<Task>> {
        Ok(self.lock().sorted(|t| {
            matches!(
                t.state.status,
                TaskStatus::Open
                    | TaskStatus::InProgress
                    | TaskStatus::Verified
                    | TaskStatus::NeedsHelp
            )
        }))
    }

    async fn tokens_of(&self, ids: &[TaskId]) -> Result<Vec<(TaskId, u64)>> {
        let t = self.lock();
        let mut out: Vec<(TaskId, u64)> = Vec::new();
        for id in ids {
            let used: Vec<u64> = t
                .runs
                .iter()
                .filter(|r| r.task_id == *id)
                .filter_map(|r| r.usage.as_ref().map(crate::domain::Usage::tokens))
                .collect();
            if !used.is_empty() {
                out.push((id.clone(), used.iter().sum()));
            }
        }
        Ok(out)
    }

    async fn statuses(&self, ids: &[TaskId]) -> Result<Vec<(TaskId, TaskStatus)>> {
        let t = self.lock();
        Ok(ids
            .iter()
            .filter_map(|id| t.tasks.get(id).map(|task| (id.clone(), task.state.status)))
            .collect())
    }

    async fn raise_next_task_number(&self, at_least: u64) -> Result<()> {
        let mut t = self.lock();
        let next: u64 = t
            .meta
            .get(NEXT_TASK_NUMBER)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        if at_least > next {
            t.meta
                .insert(NEXT_TASK_NUMBER.to_owned(), at_least.to_string());
        }
        Ok(())
    }

    async fn is_fresh(&self) -> Result<bool> {
        let t = self.lock();
        Ok(t.tasks.is_empty() && !t.meta.contains_key(NEXT_TASK_NUMBER))
    }

    async fn next_backoff_end(&self, now: Millis) -> Result<Option<Millis>> {
        Ok(self
            .lock()
            .tasks
            .values()
            .filter(|t| t.state.status == TaskStatus::Open)
            .filter_map(|t| t.state.backoff_until)
            .filter(|u| *u > now)
            .min())
    }

    async fn begin_integration(&self, entries: &[(Journal, CommitId)]) -> Result<Option<TaskId>> {
        let mut t = self.lock();
        for (entry, commit) in entries {
            let ok = t.tasks.get(&entry.task_id).is_some_and(|task| {
                task.state.status == TaskStatus::Verified
                    && task.patch_commit.as_ref() == Some(commit)
            });
            if !ok {
                return Ok(Some(entry.task_id.clone()));
            }
        }
        for (entry, _) in entries {
            t.integrations.insert(entry.task_id.clone(), entry.clone());
        }
        Ok(None)
    }

    async fn start_train(&self, base_tip: &CommitId, tasks: &[TaskId], at: Millis) -> Result<i64> {
        let mut t = self.lock();
        t.trains.push((base_tip.clone(), at, None));
        let id = t.trains.len() as i64;
        t.record(&crate::feed::train_formed(id, base_tip, tasks, at))?;
        Ok(id)
    }

    async fn end_train(&self, id: i64, end: &TrainEnd, at: Millis) -> Result<()> {
        let mut t = self.lock();
        let train = usize::try_from(id - 1)
            .ok()
            .and_then(|i| t.trains.get_mut(i))
            .ok_or_else(|| crate::error::Error::NotFound(format!("train {id} does not exist")))?;
        train.2 = Some((at, end.clone()));
        t.record(&crate::feed::train_ended(
            id,
            end.outcome.as_str(),
            end.landed,
            end.builds,
            end.red_commit.as_ref(),
            at,
        ))?;
        Ok(())
    }

    async fn trains_since(&self, since: Millis) -> Result<Vec<TrainStat>> {
        Ok(self
            .lock()
            .trains
            .iter()
            .filter_map(|(_, started_at, end)| {
                let (ended_at, end) = end.as_ref()?;
                (*ended_at >= since).then_some(TrainStat {
                    started_at: *started_at,
                    ended_at: *ended_at,
                    builds: end.builds,
                    landed: end.landed,
                })
            })
            .collect())
    }

    async fn trains_in_flight(&self) -> Result<Vec<(i64, Vec<TaskId>)>> {
        let mut trains: BTreeMap<i64, Vec<TaskId>> = BTreeMap::new();
        for r in &self.lock().runs {
            if let Some(train) = r.train
                && r.status == RunStatus::Running
                && r.phase == Phase::Integrate
            {
                trains.entry(train).or_default().push(r.task_id.clone());
            }
        }
        Ok(trains.into_iter().collect())
    }

    async fn abort_integration(&self, task: &TaskId) -> Result<()> {
        self.lock().integrations.remove(task);
        Ok(())
    }

    async fn pending_integrations(&self) -> Result<Vec<Journal>> {
        let mut out: Vec<Journal> = self.lock().integrations.values().cloned().collect();
        out.sort_by_key(|j| j.started_at);
        Ok(out)
    }

    async fn running_runs(&self, task: &TaskId) -> Result<Vec<Run>> {
        Ok(self
            .lock()
            .runs
            .iter()
            .filter(|r| r.task_id == *task && r.status == RunStatus::Running)
            .cloned()
            .collect())
    }

    async fn usage_since(&self, since: Millis, bucket_ms: Millis) -> Result<Vec<UsageBucket>> {
        let bucket_ms = bucket_ms.max(1);
        let mut buckets: BTreeMap<i64, UsageBucket> = BTreeMap::new();
        for run in &self.lock().runs {
            let Some(at) = run.finished_at.filter(|at| *at >= since) else {
                continue;
            };
            if run.cost_cents <= 0.0 && run.usage.is_none() {
                continue;
            }
            let b = buckets.entry(at / bucket_ms).or_insert(UsageBucket {
                start: at / bucket_ms * bucket_ms,
                cost_cents: 0.0,
                tokens: 0,
            });
            b.cost_cents += run.cost_cents;
            b.tokens = b
                .tokens
                .saturating_add(run.usage.as_ref().map_or(0, crate::domain::Usage::tokens));
        }
        Ok(buckets.into_values().collect())
    }

    async fn latest_session(&self, task: &TaskId) -> Result<Option<String>> {
        Ok(self
            .lock()
            .runs
            .iter()
            .rev()
            .filter(|r| r.task_id == *task && r.phase == Phase::Dev)
            .find_map(|r| r.usage.as_ref().and_then(|u| u.session_id.clone())))
    }

    async fn start_run(&self, task: &TaskId, run: &NewRun, at: Millis) -> Result<i64> {
        Ok(self.lock().start_run(task, run, at))
    }

    async fn end_run(&self, run: i64, end: &RunEnd, at: Millis) -> Result<()> {
        let mut t = self.lock();
        let task = t
            .runs
            .iter()
            .find(|r| r.id == run)
            .map(|r| r.task_id.clone())
            .ok_or_else(|| Error::NotFound(format!("run {run} does not exist")))?;
        t.end_runs(&task, Some(run), end, at);
        Ok(())
    }

    async fn abandon_runs(&self, phase: Phase, error: &str, at: Millis) -> Result<u64> {
        let mut t = self.lock();
        let mut n = 0;
        for run in &mut t.runs {
            if run.phase == phase && run.status == RunStatus::Running && run.runner.is_none() {
                run.status = RunStatus::Failure;
                run.finished_at = Some(at);
                run.error = Some(error.to_owned());
                run.failure_kind = Some(crate::domain::FailureKind::Infrastructure);
                n += 1;
            }
        }
        Ok(n)
    }

    async fn run(&self, id: i64) -> Result<Option<Run>> {
        Ok(self.lock().runs.iter().find(|r| r.id == id).cloned())
    }

    async fn append_logs(&self, lines: &[(i64, LogLine)]) -> Result<()> {
        let mut t = self.lock();
        for (run, line) in lines {
            t.logs
                .entry((*run, line.seq))
                .or_insert_with(|| line.clone());
        }
        Ok(())
    }

    async fn last_log_seq(&self, run: i64) -> Result<u64> {
        Ok(self
            .lock()
            .logs
            .range((run, 0)..=(run, u64::MAX))
            .next_back()
            .map_or(0, |((_, seq), _)| *seq))
    }

    async fn read_logs(&self, run: i64, after_seq: u64, limit: u32) -> Result<Vec<LogLine>> {
        Ok(self
            .lock()
            .logs
            .range((run, after_seq.saturating_add(1))..=(run, u64::MAX))
            .take(limit as usize)
            .map(|(_, l)| l.clone())
            .collect())
    }

    async fn trim_log(&self, run: i64, head_last_seq: u64, keep_tail_bytes: u64) -> Result<u64> {
        let mut t = self.lock();
        let tail: Vec<(u64, u64)> = t
            .logs
            .range((run, head_last_seq.saturating_add(1))..=(run, u64::MAX))
            .map(|((_, seq), l)| (*seq, l.text.len() as u64 + 1))
            .collect();
        let mut newer = 0;
        let mut kept = 0;
        for (seq, bytes) in tail.into_iter().rev() {
            newer += bytes;
            if newer > keep_tail_bytes {
                t.logs.remove(&(run, seq));
            } else {
                kept += bytes;
            }
        }
        Ok(kept)
    }

    async fn prune_logs(&self, before: Millis) -> Result<u64> {
        let mut t = self.lock();
        let old: Vec<i64> = t
            .runs
            .iter()
            .filter(|r| r.finished_at.is_some_and(|f| f < before))
            .map(|r| r.id)
            .collect();
        let before_len = t.logs.len();
        t.logs.retain(|(run, _), _| !old.contains(run));
        Ok((before_len - t.logs.len()) as u64)
    }

    async fn last_event_id(&self) -> Result<i64> {
        Ok(self.lock().entries.len() as i64)
    }

    fn feed(&self) -> &Feed {
        &self.feed
    }

    async fn record(&self, entry: &NewEntry) -> Result<i64> {
        self.lock().record(entry)
    }

    async fn entries_after(&self, after: i64, limit: u32) -> Result<Vec<FeedEntry>> {
        let t = self.lock();
        let from = usize::try_from(after.max(0)).unwrap_or(usize::MAX);
        Ok(t.entries
            .iter()
            .skip(from)
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn set_meta_recording(
        &self,
        key: &str,
        value: Option<&str>,
        entry: &NewEntry,
    ) -> Result<i64> {
        let mut t = self.lock();
        let position = t.record(entry)?;
        match value {
            Some(value) => t.meta.insert(key.to_owned(), value.to_owned()),
            None => t.meta.remove(key),
        };
        Ok(position)
    }

    async fn events_after(&self, after_id: i64, limit: u32) -> Result<Vec<TaskEvent>> {
        Ok(self
            .lock()
            .events
            .iter()
            .filter(|e| e.id > after_id)
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn get_meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self.lock().meta.get(key).cloned())
    }

    async fn put_meta(&self, key: &str, value: &str) -> Result<()> {
        self.lock().meta.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    async fn list_meta(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        Ok(self
            .lock()
            .meta
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write_failure(&self) -> Option<String> {
        None
    }

    async fn check_writable(&self) -> Result<()> {
        Ok(())
    }

    async fn delete_meta(&self, key: &str) -> Result<()> {
        self.lock().meta.remove(key);
        Ok(())
    }

    async fn sessions(&self) -> Result<Vec<SessionRecord>> {
        Ok(self.lock().sessions.values().cloned().collect())
    }

    async fn put_session(&self, session: &SessionRecord) -> Result<()> {
        let mut t = self.lock();
        if t.sessions.contains_key(&session.id_sha256) {
            return Err(Error::AlreadyExists("a session with that ID exists".into()));
        }
        t.sessions
            .insert(session.id_sha256.clone(), session.clone());
        Ok(())
    }

    async fn end_sessions(&self, which: EndSessions<'_>) -> Result<u64> {
        let mut t = self.lock();
        let before = t.sessions.len();
        t.sessions.retain(|id, s| match which {
            EndSessions::One(one) => id != one,
            EndSessions::OfToken(token) => s.token_sha256 != token,
            EndSessions::ExpiredBefore(at) => s.expires_at >= at,
        });
        Ok((before - t.sessions.len()) as u64)
    }

    async fn webhooks(&self) -> Result<Vec<WebhookCursor>> {
        Ok(self.lock().webhooks.values().cloned().collect())
    }

    async fn open_webhook(&self, url: &str, head: i64, _now: Millis) -> Result<WebhookCursor> {
        Ok(self
            .lock()
            .webhooks
            .entry(url.to_owned())
            .or_insert_with(|| WebhookCursor::at(url, head))
            .clone())
    }

    async fn put_webhook(&self, cursor: &WebhookCursor) -> Result<bool> {
        let mut t = self.lock();
        match t.webhooks.get_mut(&cursor.url) {
            Some(stored) if stored.position <= cursor.position => {
                *stored = cursor.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn forget_webhook(&self, url: &str) -> Result<bool> {
        Ok(self.lock().webhooks.remove(url).is_some())
    }
}

#[cfg(test)]
mod tests {
    async fn fresh() -> ((), super::MemoryStore) {
        ((), super::MemoryStore::new())
    }

    crate::store_test_suite!(fresh);
}
