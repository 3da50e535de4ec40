//! The control API of the coordinator: what people and scripts ask of the queue (create, list,
//! show, cancel, retry, dependencies, status, runners). Each method decides with the lifecycle
//! and commits through the one path of [`super`].

use std::collections::{HashMap, HashSet};

use crate::domain::{
    EventKind, Millis, NewTask, Run, StatusCounts, Task, TaskEdit, TaskEvent, TaskId, TaskStatus,
};
use crate::error::{Error, Result};
use crate::lifecycle::{self, Event};
use crate::ports::Repository;
use crate::store::{NewEvent, Store, TaskFilter};
use pipeline_core::ids::CommitId;

use super::Coordinator;

/// A task with its runs and history, for `task show`.
#[derive(Clone, Debug)]
pub struct TaskDetail {
    pub task: Task,
    pub runs: Vec<Run>,
    pub events: Vec<TaskEvent>,
    /// Why it is not moving (see [`lifecycle::waiting_for`]).
    pub waiting_for: Vec<String>,
    /// The tasks whose parent it is, in lease order.
    pub children: Vec<(TaskId, TaskStatus)>,
    /// What they have cost together, in cents (kept by the store).
    pub children_cost_cents: f64,
    /// The commit its runner offered before verifying it (`--early-builds`), while its lease
    /// holds the offer.
    pub offered_commit: Option<CommitId>,
}

/// A task of a list page: with what it waits for and the tokens its agents have used.
#[derive(Clone, Debug)]
pub struct Listed {
    pub task: Task,
    pub waiting_for: Vec<String>,
    pub tokens: u64,
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
    /// The sandbox its agents and builds run in; `None` when it did not say.
    pub sandbox: Option<pipeline_core::sandbox::Kind>,
    /// The build jobs it runs now (`--remote-builds`): (ID, commit).
    pub builds: Vec<(String, pipeline_core::ids::CommitId)>,
}

/// What a runner is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunnerState {
    Idle,
    Busy,
    Draining,
    Offline,
    /// Cut off (`runners revoke`): its name stays reserved until `runners forget`.
    Revoked,
}

/// How long readiness waits for the database to begin a write.
pub const READY_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Task counts plus the number of connected runners.
#[derive(Clone, Debug)]
pub struct Status {
    pub counts: StatusCounts,
    pub runners: u64,
    pub base: String,
    /// Why the server is not healthy (its database refuses writes), if it is not.
    pub unhealthy: Option<String>,
    /// Landing: "running" or "paused", and why it is paused.
    pub landing: (&'static str, Option<String>),
    /// The base commit found red, while it is.
    pub red_base: Option<String>,
    /// Whether new leases are paused (by a person or a red base), and if so why and since
    /// when (a person's pause).
    pub queue_paused: bool,
    pub queue_pause_reason: Option<String>,
    pub queue_paused_at: Option<Millis>,
    /// Integration builds per landed task over the last hour.
    pub builds_per_landed: Option<f64>,
    /// Trains built at once now, and at most (`--integration-slots`).
    pub integration_depth: Option<(u32, u32)>,
    /// What the runs that ended over the last day cost, in cents, and their input and output
    /// tokens.
    pub cost_cents_last_day: f64,
    pub tokens_last_day: u64,
    /// The sandbox the server's own builds run in.
    pub sandbox: pipeline_core::sandbox::Kind,
    /// Each `--webhook` endpoint: what it was last sent, what it is trying again, its last
    /// error.
    pub webhooks: Vec<crate::webhooks::EndpointStatus>,
    /// Whether this server leads (issue 28).
    pub server: ServerRole,
}

/// A server's role among the servers of one database, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerRole {
    /// `leader` or `standby`.
    pub role: &'static str,
    /// The term it leads in (0 on a standby).
    pub term: i64,
    /// The leader's `--advertise` URL (its own when it leads), when known.
    pub leader: Option<String>,
}

/// Which page of a list: after the key of the last item of the previous one, at most `size`.
#[derive(Clone, Copy, Debug)]
pub struct Page {
    pub after: Option<(u8, i64)>,
    pub size: u32,
}

impl Page {
    /// The page size when the caller names none, and the most a caller may ask for.
    pub const DEFAULT_SIZE: u32 = 100;
    pub const MAX_SIZE: u32 = 1000;
}

impl<S: Store, R: Repository> Coordinator<S, R> {
    pub async fn create_task(&self, new: NewTask) -> Result<Task> {
        self.refuse_cancelled(None, &new.depends_on).await?;
        let parents: Vec<TaskId> = new.parent.iter().cloned().collect();
        self.check_parents(&parents).await?;
        if !parents.is_empty() {
            // Where a lease of the parent may commit: see `became_epics`.
            crate::failpoint::pause_at("child-after-parent-check").await;
        }
        let task = self.store.create_task(new, self.now()).await?;
        if let Some(counts) = self.counts_mut().as_mut() {
            counts.add(TaskStatus::Open, 1);
        }
        tracing::info!(task = %task.id, priority = task.priority, "task created");
        // Its creation is in the feed (published by the store as it committed): that entry
        // wakes the dispatcher.
        self.became_epics(&parents).await?;
        Ok(task)
    }

    /// Creates the tasks in order, all or none; a task may depend on one before it in the
    /// batch. What the batch names outside itself (its dependencies, its parents) is read in
    /// one statement each, not one per task: a dependency costs about what a row costs.
    pub async fn create_tasks(&self, new: Vec<NewTask>) -> Result<Vec<Task>> {
        let mut deps: Vec<TaskId> = new.iter().flat_map(|t| t.depends_on.clone()).collect();
        deps.sort();
        deps.dedup();
        let cancelled: HashSet<TaskId> = self
            .store
            .statuses(&deps)
            .await?
            .into_iter()
            .filter(|(_, status)| *status == TaskStatus::Cancelled)
            .map(|(dep, _)| dep)
            .collect();
        drop(deps);
        let mut parents = Vec::<TaskId>::new();
        for task in &new {
            if let Some(parent) = &task.parent
                && !parents.contains(parent)
            {
                parents.push(parent.clone());
            }
        }
        let parent_statuses: HashMap<TaskId, TaskStatus> =
            self.store.statuses(&parents).await?.into_iter().collect();
        // The first task that cannot be created, in order, as one at a time would find it.
        let mut checked = HashSet::new();
        for (i, task) in new.iter().enumerate() {
            if let Some(dep) = task.depends_on.iter().find(|d| cancelled.contains(*d)) {
                return Err(cancelled_dependency(dep, None).in_batch(i));
            }
            if let Some(parent) = &task.parent
                && checked.insert(parent)
                && let Some(refused) = parent_statuses
                    .get(parent)
                    .and_then(|status| refused_parent(parent, *status))
            {
                return Err(refused.in_batch(i));
            }
        }
        drop(checked);
        let created = self.store.create_tasks(new, self.now()).await?;
        if let Some(counts) = self.counts_mut().as_mut() {
            counts.add(TaskStatus::Open, created.len() as u64);
        }
        tracing::info!(tasks = created.len(), "tasks created");
        let mut tasks = Vec::with_capacity(created.len());
        for (task, _) in created {
            tasks.push(task);
        }
        self.became_epics(&parents).await?;
        Ok(tasks)
    }

    /// Every task with `status`, walked page by page (for start-up, not for requests).
    pub(crate) async fn all_tasks(&self, status: TaskStatus) -> Result<Vec<Task>> {
        let mut all: Vec<Task> = Vec::new();
        loop {
            let after = all.last().map(|t| (t.priority, t.seq));
            let page = self
                .store
                .list_tasks(&TaskFilter::status(status), after, 1000)
                .await?;
            let last = page.len() < 1000;
            all.extend(page);
            if last {
                return Ok(all);
            }
        }
    }

    /// One page of tasks in lease order, each with what it waits for, and the key to ask for
    /// the next page with (`None` after the last).
    pub async fn list_tasks(
        &self,
        filter: &TaskFilter,
        page: Page,
    ) -> Result<(Vec<Listed>, Option<(u8, i64)>)> {
        // An epic that does not exist is said so, not listed as empty.
        if let Some(parent) = &filter.parent
            && page.after.is_none()
        {
            self.get(parent).await?;
        }
        let mut tasks = self
            .store
            .list_tasks(filter, page.after, page.size.saturating_add(1))
            .await?;
        let next = if tasks.len() > page.size as usize {
            tasks.truncate(page.size as usize);
            tasks.last().map(|t| (t.priority, t.seq))
        } else {
            None
        };
        let ids: Vec<TaskId> = tasks.iter().map(|t| t.id.clone()).collect();
        let tokens: std::collections::HashMap<TaskId, u64> =
            self.store.tokens_of(&ids).await?.into_iter().collect();
        let listed = self
            .with_reasons(tasks)
            .await?
            .into_iter()
            .map(|(task, waiting_for)| Listed {
                tokens: tokens.get(&task.id).copied().unwrap_or(0),
                task,
                waiting_for,
            })
            .collect();
        Ok((listed, next))
    }

    /// Each task with what it waits for (its dependencies' statuses read in one query).
    async fn with_reasons(&self, tasks: Vec<Task>) -> Result<Vec<(Task, Vec<String>)>> {
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
        let caps = self.capped_epics(&tasks).await?;
        let view = self.view();
        Ok(tasks
            .into_iter()
            .map(|task| {
                let deps: Vec<(String, TaskStatus)> = task
                    .depends_on
                    .iter()
                    .filter_map(|d| known.get(d.as_str()).map(|s| (d.to_string(), *s)))
                    .collect();
                let why = self.reasons(&task, &deps, &view, &caps);
                (task, why)
            })
            .collect())
    }

    /// The epics among the parents of `tasks` that need help whose children have spent their
    /// cap: (spent, cap) cents, each epic read once.
    async fn capped_epics(
        &self,
        tasks: &[Task],
    ) -> Result<std::collections::HashMap<TaskId, (f64, f64)>> {
        self.capped(
            tasks
                .iter()
                .filter(|t| t.state.status == TaskStatus::NeedsHelp)
                .filter_map(|t| t.parent.as_ref()),
        )
        .await
    }

    /// Those of the epics `parents` whose children have spent their cap: (spent, cap) cents.
    async fn capped(
        &self,
        parents: impl Iterator<Item = &TaskId>,
    ) -> Result<std::collections::HashMap<TaskId, (f64, f64)>> {
        let mut caps = std::collections::HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for parent in parents {
            if !seen.insert(parent.clone()) {
                continue;
            }
            if let Some(epic) = self.store.get_task(parent).await?
                && let Some(cap) = self.policy().epic_cap(&epic.state)
                && epic.children.cost_cents >= cap
            {
                caps.insert(parent.clone(), (epic.children.cost_cents, cap));
            }
        }
        Ok(caps)
    }

    /// What the reasons a task waits depend on besides the task: the pauses, the runners, now.
    fn view(&self) -> View {
        let (capacity, taking) = self.capacity();
        View {
            pauses: self.pauses(),
            capacity,
            taking,
            now: self.now(),
        }
    }

    /// Why `task` is not moving: the queue's pauses, its own pause, then for an epic its
    /// children, for another task what the lifecycle says (its dependencies with their
    /// statuses `deps`, its back-off and limits, the runners) and its epic's cap (`caps`).
    fn reasons(
        &self,
        task: &Task,
        deps: &[(String, TaskStatus)],
        view: &View,
        caps: &std::collections::HashMap<TaskId, (f64, f64)>,
    ) -> Vec<String> {
        let pauses = lifecycle::Pauses {
            leases: view.pauses.leases.as_deref(),
            landing: view.pauses.landing.as_deref(),
            red_base: view.pauses.red_base.as_deref(),
        };
        let mut why: Vec<String> = lifecycle::held_by_pauses(task.state.status, pauses);
        why.extend(paused_reason(task));
        if task.children.any() {
            why.extend(lifecycle::epic_waiting_for(
                task.state.status,
                &task.children,
            ));
            return why;
        }
        if let Some((epic, (spent, cap))) = task
            .parent
            .as_ref()
            .and_then(|p| caps.get_key_value(p))
            .filter(|_| task.state.status == TaskStatus::NeedsHelp)
        {
            why.push(lifecycle::epic_cap_reached(
                task.id.as_str(),
                epic.as_str(),
                *spent,
                *cap,
            ));
            return why;
        }
        why.extend(lifecycle::waiting_for(
            task.id.as_str(),
            &task.state,
            deps,
            self.policy(),
            view.now,
            view.capacity,
            routing(task, &view.taking),
        ));
        why
    }

    pub async fn show_task(&self, id: &TaskId) -> Result<TaskDetail> {
        let task = self.get(id).await?;
        let runs = self.store.runs(id).await?;
        let events = self.store.events(id).await?;
        let waiting_for = self.waiting_for(&task).await?;
        let children = if task.children.any() {
            self.children(id).await?
        } else {
            Vec::new()
        };
        let children_cost_cents = task.children.cost_cents;
        let offered_commit = self.offer_of(id).map(|o| o.commit);
        Ok(TaskDetail {
            task,
            runs,
            events,
            waiting_for,
            children,
            children_cost_cents,
            offered_commit,
        })
    }

    /// The tasks whose parent is `id`, in lease order, a page at a time from the index.
    async fn children(&self, id: &TaskId) -> Result<Vec<(TaskId, TaskStatus)>> {
        let filter = TaskFilter {
            status: None,
            parent: Some(id.clone()),
        };
        let mut children = Vec::new();
        let mut after = None;
        loop {
            let page = self.store.list_tasks(&filter, after, 1000).await?;
            after = page.last().map(|t| (t.priority, t.seq));
            let last = page.len() < 1000;
            children.extend(page.into_iter().map(|t| (t.id, t.state.status)));
            if last {
                return Ok(children);
            }
        }
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
        let caps = self.capped_epics(std::slice::from_ref(task)).await?;
        Ok(self.reasons(task, &deps, &self.view(), &caps))
    }

    /// The reasons of the pauses in force.
    fn pauses(&self) -> PauseReasons {
        let landing = self.landing();
        PauseReasons {
            leases: landing
                .queue_paused
                .as_ref()
                .map(|p| p.reason.clone().unwrap_or_default()),
            landing: landing.paused.as_ref().map(|p| p.reason.clone()),
            red_base: landing.red_base.as_ref().map(|r| r.reason.clone()),
        }
    }

    /// What the runners can take now, and the labels and scope of each runner that takes work.
    pub(super) fn capacity(&self) -> (lifecycle::Capacity, Taking) {
        let registry = self.registry();
        let mut capacity = lifecycle::Capacity {
            connected: 0,
            taking: 0,
            free_slots: 0,
            slots: 0,
        };
        let mut labels = Vec::new();
        let mut resting = Vec::new();
        for r in registry.runners() {
            if !r.connected {
                continue;
            }
            capacity.connected += 1;
            if !r.draining && r.unhealthy.is_none() {
                capacity.taking += 1;
                capacity.free_slots += r.slots.saturating_sub(r.used);
                capacity.slots += r.slots;
                labels.push((r.labels, r.scope));
            } else {
                resting.push(lifecycle::Resting {
                    name: r.name,
                    labels: r.labels,
                    unhealthy: r.unhealthy,
                });
            }
        }
        let scoped = labels.iter().any(|(_, s)| s.describe().is_some());
        (
            capacity,
            Taking {
                runners: labels,
                scoped,
                resting,
            },
        )
    }

    /// Refuses children for a task whose own work is over or waits to land (Verified, Done,
    /// Cancelled): it cannot become an epic now.
    async fn check_parents(&self, parents: &[TaskId]) -> Result<()> {
        for (parent, status) in self.store.statuses(parents).await? {
            if let Some(refused) = refused_parent(&parent, status) {
                return Err(refused);
            }
        }
        Ok(())
    }

    /// Parents an agent works on now that they have children: their agents stop (not
    /// counted) and they wait as epics for their children. Read after the children were
    /// written: a lease decided on a parent before that loses its compare-and-swap (a child
    /// moves its parent's version), and one that committed before is seen here, so no
    /// parent's run goes on beside its children.
    async fn became_epics(&self, parents: &[TaskId]) -> Result<()> {
        let working: Vec<TaskId> = self
            .store
            .statuses(parents)
            .await?
            .into_iter()
            .filter(|(_, status)| *status == TaskStatus::InProgress)
            .map(|(parent, _)| parent)
            .collect();
        for parent in working {
            match self.transition(&parent, Event::BecameEpic).await {
                Ok(_) => tracing::info!(task = %parent, "became an epic; its run was stopped"),
                // It moved on meanwhile (its result came in): nothing to stop.
                Err(Error::FailedPrecondition(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Refuses a dependency on a cancelled task: the dependent would wait for ever.
    async fn refuse_cancelled(&self, id: Option<&TaskId>, deps: &[TaskId]) -> Result<()> {
        for (dep, status) in self.store.statuses(deps).await? {
            if status == TaskStatus::Cancelled {
                return Err(cancelled_dependency(&dep, id));
            }
        }
        Ok(())
    }

    /// Makes `id` wait for `deps` too. A Done task can no longer be held back, and a
    /// dependency on a cancelled task would hold it for ever: both are refused.
    pub async fn add_dependencies(&self, id: &TaskId, deps: &[TaskId]) -> Result<Task> {
        if deps.contains(id) {
            // As `task add --id X --depends-on X` says (not "X already depends on X").
            return Err(Error::InvalidArgument(format!(
                "task {id} cannot depend on itself"
            )));
        }
        let task = self.get(id).await?;
        if task.state.status == TaskStatus::Done {
            return Err(Error::FailedPrecondition(format!(
                "task {id} is done; dependencies can no longer hold it back"
            )));
        }
        self.refuse_cancelled(Some(id), deps).await?;
        let mut new: Vec<&str> = deps
            .iter()
            .filter(|d| !task.depends_on.contains(d))
            .map(TaskId::as_str)
            .collect();
        new.dedup();
        let event = NewEvent {
            kind: EventKind::DependenciesAdded,
            message: format!("now also depends on {}", new.join(", ")),
            from: task.state.status,
            to: task.state.status,
        };
        let task = self
            .store
            .add_dependencies(id, deps, event, self.now())
            .await?;
        Ok(task)
    }

    /// Changes a task's title, description, namespace or priority, when the lifecycle allows
    /// it ([`lifecycle::editable`]); the history says what changed and who changed it.
    pub async fn edit_task(&self, id: &TaskId, edit: TaskEdit) -> Result<Task> {
        // A write that lost its race to a transition is decided again on a fresh read.
        for _ in 0..3 {
            let task = self.get(id).await?;
            lifecycle::editable(task.state.status, edit.next_attempt).map_err(|why| {
                Error::FailedPrecondition(format!("task {id} cannot be edited: {why}"))
            })?;
            let running = matches!(
                task.state.status,
                TaskStatus::InProgress | TaskStatus::Verified
            );
            let event = NewEvent {
                kind: EventKind::Edited,
                message: format!(
                    "{} changed by pipelinectl{}",
                    edit.fields().join(", "),
                    if running {
                        " (for its next attempt; the one under way keeps its prompt)"
                    } else {
                        ""
                    }
                ),
                from: task.state.status,
                to: task.state.status,
            };
            match self
                .store
                .edit_task(id, task.version, &edit, event, self.now())
                .await
            {
                Err(Error::Conflict(_)) => continue,
                // A new priority changes the lease order: its entry wakes the dispatcher.
                Ok(edited) => return Ok(edited),
                Err(other) => return Err(other),
            }
        }
        Err(Error::Conflict(format!(
            "task {id} kept changing while it was being edited; try again"
        )))
    }

    /// Pauses (`Some(why)`) or resumes (`None`) a task and its children: a paused task is not
    /// leased (what runs goes on). Returns how many tasks changed.
    pub async fn set_paused(&self, id: &TaskId, why: Option<String>) -> Result<u32> {
        let task = self.get(id).await?;
        if why.is_some() && matches!(task.state.status, TaskStatus::Done | TaskStatus::Cancelled) {
            return Err(Error::FailedPrecondition(format!(
                "task {id} is {}: there is nothing of it to hold back",
                task.state.status
            )));
        }
        let message = match &why {
            Some(why) => format!("paused by pipelinectl: {why}"),
            None => "resumed by pipelinectl".to_owned(),
        };
        let changed = self
            .store
            .set_paused(id, why.as_deref(), &message, self.now())
            .await?;
        Ok(changed)
    }

    /// Cancels a task; a running agent is told to stop at once. An epic's unfinished children
    /// (and theirs) are cancelled with it: it is the whole piece of work that is called off.
    pub async fn cancel(&self, id: &TaskId) -> Result<Task> {
        let cancelled = self.transition(id, Event::Cancel).await?;
        let mut epics: Vec<Task> = Some(cancelled.clone())
            .filter(|t| t.children.any())
            .into_iter()
            .collect();
        while let Some(epic) = epics.pop() {
            for (child, status) in self.children(&epic.id).await? {
                if matches!(status, TaskStatus::Done | TaskStatus::Cancelled) {
                    continue;
                }
                match self.transition(&child, Event::Cancel).await {
                    Ok(task) if task.children.any() => epics.push(task),
                    Ok(_) => {}
                    // It finished meanwhile (landed, or another cancel).
                    Err(Error::FailedPrecondition(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(cancelled)
    }

    /// Sends a NeedsHelp, Cancelled or Open task back to Open with its failure count cleared
    /// (an epic: its cancelled children too), unless its epic's cap is spent;
    /// `note` goes to the next prompt as a person's guidance, and `fresh` drops the previous
    /// patchset so the next attempt starts from the current base.
    pub async fn retry(&self, id: &TaskId, note: Option<String>, fresh: bool) -> Result<Task> {
        // A child whose epic has spent its cap would need help again at once.
        let task = self.get(id).await?;
        if let Some((epic, (spent, cap))) =
            self.capped(task.parent.iter()).await?.into_iter().next()
        {
            return Err(Error::FailedPrecondition(format!(
                "task {id} would stop again at once: its epic {epic} has spent {spent:.0} of its \
                 {cap:.0}-cent cap; raise it first (pipelinectl task edit {epic} --max-cost CENTS)"
            )));
        }
        // An epic called off and taken up again takes up its cancelled children with it
        // (first, so that it is not found done meanwhile).
        if task.children.any() && task.state.status == TaskStatus::Cancelled {
            for (child, status) in self.children(id).await? {
                if status != TaskStatus::Cancelled {
                    continue;
                }
                let event = Event::Retry {
                    note: None,
                    fresh: false,
                };
                match self.transition(&child, event).await {
                    Ok(_) | Err(Error::FailedPrecondition(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let retried = self.transition(id, Event::Retry { note, fresh }).await?;
        Ok(retried)
    }

    /// A person approves the verified patchset of task `id`: it may land now. `by` names who
    /// (recorded in its history with `note`).
    pub async fn approve(&self, id: &TaskId, by: String, note: Option<String>) -> Result<Task> {
        let approved = self.transition(id, Event::Approve { by, note }).await?;
        tracing::info!(task = %id, "approved");
        Ok(approved)
    }

    /// A person rejects the verified patchset of task `id`: it goes back to an agent, which
    /// amends the commit with `note` as feedback (a failed attempt: the task's own work was
    /// judged).
    pub async fn reject(&self, id: &TaskId, by: String, note: String) -> Result<Task> {
        let task = self.get(id).await?;
        let rejected = self
            .transition_from(
                task,
                &Event::Reject { by, note },
                |_| Ok(()),
                |_, w| {
                    w.next.verified_tree = None;
                },
            )
            .await?;
        tracing::info!(task = %id, "rejected");
        Ok(rejected)
    }

    pub async fn status(&self) -> Result<Status> {
        let counts = self.counts_mut().clone();
        let counts = match counts {
            Some(counts) => counts,
            None => self.store.status_counts().await?,
        };
        let now = self.now();
        let (cost_cents_last_day, tokens_last_day) = self.last_day().totals(now);
        let landing = self.landing();
        Ok(Status {
            cost_cents_last_day,
            tokens_last_day,
            landing: landing.state(),
            red_base: landing.red_base.as_ref().map(|r| r.commit.to_string()),
            queue_paused: landing.leases_held().is_some(),
            queue_pause_reason: queue_pause_reason(&landing),
            queue_paused_at: landing.queue_paused.as_ref().and_then(|p| p.at),
            builds_per_landed: landing.builds_per_landed(now),
            integration_depth: landing.integration_depth,
            counts,
            runners: self.registry().connected_count() as u64,
            base: self.settings.base.to_string(),
            sandbox: self.settings.sandbox.kind(),
            webhooks: self.webhooks(),
            server: self.server_role(),
            unhealthy: self
                .store
                .write_failure()
                .map(|why| format!("database writes are failing: {why}")),
        })
    }

    /// Whether the server is ready for work, as `/readyz` and the gRPC health service say: it
    /// leads (a standby is not ready), every background loop in `loops` is alive and the database takes a write (a write
    /// transaction begun and rolled back, within [`READY_WRITE_TIMEOUT`]); else why not, in
    /// one line.
    pub async fn readiness(&self, loops: &crate::health::Loops) -> std::result::Result<(), String> {
        // Only the leader is ready: a standby takes no runner calls and no writes.
        if let ServerRole {
            role: "standby",
            leader,
            ..
        } = self.server_role()
        {
            return Err(match leader {
                Some(url) => format!("not ready: this server is a standby; the leader is at {url}"),
                None => "not ready: this server is a standby; no leader is known yet".to_owned(),
            });
        }
        let stopped = loops.stopped();
        if !stopped.is_empty() {
            return Err(format!(
                "not ready: the {} loop stopped (the server is stopping; a restart recovers)",
                stopped.join(", ")
            ));
        }
        match tokio::time::timeout(READY_WRITE_TIMEOUT, self.store.check_writable()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "not ready: the database does not take writes: {}",
                e.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            Err(_) => Err(format!(
                "not ready: the database took no write within {}s (another process may hold \
                 its write lock, or the disk is stalled)",
                READY_WRITE_TIMEOUT.as_secs()
            )),
        }
    }

    /// The runners known to the server, by name.
    /// Whether no task can make progress: none in progress or verified, and no open one
    /// whose dependencies are all done (in back-off or not). An open task that waits on a
    /// dependency waits, down its chain, on a task that needs help or was cancelled.
    ///
    /// The counts in memory answer "busy" at once; "idle" is checked against the store (an
    /// indexed row or none per question), for the change feed that wakes the caller is
    /// published as the store commits, a moment before memory follows: a task just leased
    /// is no longer a candidate in the store while memory may not count it in progress yet.
    pub async fn is_idle(&self) -> Result<bool> {
        let busy = self
            .counts_mut()
            .as_ref()
            .is_none_or(|c| c.in_progress > 0 || c.verified > 0);
        if busy {
            return Ok(false);
        }
        // The questions are one snapshot only if nothing was written between them: every
        // change of a task's status is an entry of the feed, so its newest position must not
        // move (if it does, the caller is woken by that entry and asks again).
        let before = self.store.last_event_id().await?;
        if !self
            .store
            .lease_candidates(i64::MAX, None, 1)
            .await?
            .is_empty()
        {
            return Ok(false);
        }
        for status in [TaskStatus::InProgress, TaskStatus::Verified] {
            let any = self
                .store
                .list_tasks(&crate::store::TaskFilter::status(status), None, 1)
                .await?;
            if !any.is_empty() {
                return Ok(false);
            }
        }
        Ok(self.store.last_event_id().await? == before)
    }

    /// How many tasks need help (from the counts in memory).
    pub fn needing_help(&self) -> u64 {
        self.counts_mut().as_ref().map_or(0, |c| c.needs_help)
    }

    /// The tasks being worked on now, each with its runner's name and when it was leased, from
    /// the live leases in memory (no database read), oldest lease first.
    pub fn working(&self) -> Vec<(TaskId, String, Millis)> {
        let mut working: Vec<(TaskId, String, Millis)> = self
            .registry()
            .leases()
            .map(|l| (l.task.clone(), l.runner.clone(), l.leased_at))
            .collect();
        working.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.cmp(&b.0)));
        working
    }

    /// One page of runners by name, after `after`, and whether there are more.
    pub fn runners_page(&self, after: Option<&str>, size: u32) -> (Vec<RunnerInfo>, bool) {
        let mut all = self.runners();
        all.retain(|r| after.is_none_or(|a| r.name.as_str() > a));
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let more = all.len() > size as usize;
        all.truncate(size as usize);
        (all, more)
    }

    /// Every runner: the registered ones, and those revoked, whose names stay reserved until
    /// forgotten (shown so, so that a name nobody can take is not a mystery).
    pub fn runners(&self) -> Vec<RunnerInfo> {
        let mut revoked = self.auth.revoked();
        let mut all: Vec<RunnerInfo> = self
            .registry()
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
                sandbox: r.sandbox,
                builds: r.builds,
            })
            .collect();
        for r in &mut all {
            if let Some(i) = revoked.iter().position(|name| *name == r.name) {
                revoked.swap_remove(i);
                r.state = RunnerState::Revoked;
                r.unhealthy = Some(revoked_reason(&r.name));
            }
        }
        all.extend(revoked.into_iter().map(|name| RunnerInfo {
            id: String::new(),
            unhealthy: Some(revoked_reason(&name)),
            name,
            state: RunnerState::Revoked,
            slots_used: 0,
            slots_total: 0,
            last_heartbeat: None,
            labels: Vec::new(),
            version: String::new(),
            sandbox: None,
            builds: Vec::new(),
        }));
        all
    }
}

/// Why a revoked runner takes no work, and what frees its name.
fn revoked_reason(name: &str) -> String {
    format!("revoked: its name stays reserved until `pipelinectl runners forget {name}`")
}

/// The labels and scope of each runner that takes work, whether any of them is limited by
/// `--only-parent`/`--only-task`, and the connected runners that take no work (read once per
/// list, not per task).
pub(super) struct Taking {
    runners: Vec<(Vec<String>, crate::domain::Scope)>,
    scoped: bool,
    /// The connected runners that take no work (draining or unhealthy).
    resting: Vec<lifecycle::Resting>,
}

/// What `task` asks of the runners, against the labels and scopes of those that take work.
fn routing<'a>(task: &'a Task, taking: &'a Taking) -> lifecycle::Routing<'a> {
    let scoped = taking.scoped;
    if task.requires.is_empty() && !scoped {
        return lifecycle::Routing {
            resting: &taking.resting,
            ..lifecycle::Routing::default()
        };
    }
    let with_labels: Vec<_> = taking
        .runners
        .iter()
        .filter(|(l, _)| crate::domain::satisfies(l, &task.requires))
        .collect();
    lifecycle::Routing {
        resting: &taking.resting,
        requires: &task.requires,
        with_labels: with_labels.len(),
        fitting: with_labels.iter().filter(|(_, s)| s.admits(task)).count(),
        scoped,
    }
}

/// What the reasons a task waits depend on besides the task itself.
struct View {
    /// The reasons of the pauses in force.
    pauses: PauseReasons,
    capacity: lifecycle::Capacity,
    taking: Taking,
    now: Millis,
}

/// Why new leases are paused, as `status` and `queue` say it: a red base's reason, then a
/// person's.
pub(super) fn queue_pause_reason(landing: &crate::landing::Landing) -> Option<String> {
    let person = landing.queue_paused.as_ref().and_then(|p| p.reason.clone());
    match (&landing.red_base, person) {
        (Some(red), Some(person)) => Some(format!("{}; also paused: {person}", red.reason)),
        (Some(red), None) => Some(red.reason.clone()),
        (None, person) => person,
    }
}

/// The reasons of the queue's pauses in force (see [`lifecycle::Pauses`]).
struct PauseReasons {
    leases: Option<String>,
    landing: Option<String>,
    red_base: Option<String>,
}

/// What a person's pause of the task says, while it waits for a lease.
fn paused_reason(task: &Task) -> Option<String> {
    let why = task.paused.as_deref()?;
    (task.state.status == TaskStatus::Open)
        .then(|| format!("paused: {why} (pipelinectl task resume {})", task.id))
}

/// Why a task (`id`, or the one being created) cannot depend on the cancelled `dep`.
fn cancelled_dependency(dep: &TaskId, id: Option<&TaskId>) -> Error {
    let who = id.map_or_else(|| "the task".to_owned(), |i| format!("task {i}"));
    Error::FailedPrecondition(format!(
        "{dep} is cancelled, so {who} would wait for it for ever; retry {dep} first \
         (pipelinectl task retry {dep}) or leave it out"
    ))
}

/// Why `parent`, with `status`, cannot take children now (its own work is over or waits to
/// land), if it cannot.
fn refused_parent(parent: &TaskId, status: TaskStatus) -> Option<Error> {
    let why = match status {
        TaskStatus::Open | TaskStatus::NeedsHelp | TaskStatus::InProgress => return None,
        TaskStatus::Verified => "its own commit is verified and waits to land",
        TaskStatus::Done => "it is done",
        TaskStatus::Cancelled => "it is cancelled (pipelinectl task retry it first)",
    };
    Some(Error::FailedPrecondition(format!(
        "task {parent} cannot take children: {why}; add the task without --parent"
    )))
}
