//! What the store decides, backend-neutral: a backend is SQL (or maps) and row mapping, and
//! asks this module what to write. Creating tasks ([`create`]: the ID each gets, the checks of
//! what it names with their hints, its pending dependencies, the pause it inherits from its
//! epic, its history's first entry) and adding dependencies ([`add_dependencies`]: which edges
//! are new, the cycle refusals), and a task's write ([`swapped`]: the compare-and-swap of its
//! record, [`lost_race`]: the error when it fails, [`write_steps`]: what follows it, in
//! order). The plan reads through [`Reads`], which a backend answers from
//! its tables in as few round trips as it likes; then the backend writes what the plan says.
//!
//! An epic's figures (`children`, `children_done`, `children_cancelled`,
//! `children_cost_cents`, and its version moving with a child) follow its children's rows:
//! [`child_moved`] is the rule. SQLite keeps them with triggers (migrations 0011 and after),
//! its way of keeping a derived column in the same statement as the change; the trigger
//! stays, as SQL's statement of the same rule, and the suite holds both to it
//! (`keeps_an_epics_children_figures`).

use std::collections::{HashMap, HashSet};

use super::{Committed, TaskWrite};
use crate::domain::{
    Children, EventKind, FinishedRun, Millis, NewRun, NewTask, RunEnd, Task, TaskEvent, TaskId,
    TaskState, TaskStatus,
};
use crate::error::{Error, Result};
use pipeline_core::ids::MAX_GENERATED;

/// How many IDs a read of taken generated IDs asks about at most.
const READ_AHEAD_MAX: u64 = 1000;

/// What a plan reads of the stored tasks (never those it is planning).
#[allow(async_fn_in_trait)]
pub trait Reads {
    /// The statuses of those of `ids` that exist.
    async fn statuses(&mut self, ids: &[&TaskId]) -> Result<HashMap<TaskId, TaskStatus>>;

    /// Why each of `ids` that is paused is.
    async fn paused(&mut self, ids: &[&TaskId]) -> Result<HashMap<TaskId, String>>;

    /// The number the next generated ID tries first.
    async fn next_number(&mut self) -> Result<u64>;

    /// What `ids` wait for directly: their dependencies, and (epics) their children.
    async fn waited_on(&mut self, ids: &[&TaskId]) -> Result<Vec<TaskId>>;

    /// Whether `ancestor` is `task`'s parent, or its parent's, and so on.
    async fn is_ancestor(&mut self, ancestor: &TaskId, task: &TaskId) -> Result<bool>;
}

/// A task to insert, as the plan decided it.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRow {
    pub id: TaskId,
    pub new: NewTask,
    /// How many of its dependencies are not Done.
    pub deps_pending: u32,
    /// The pause it inherits from its epic.
    pub paused: Option<String>,
    /// Its history's first entry ([`EventKind::Created`], from none to Open).
    pub message: String,
}

/// What creating a list of tasks writes: the rows in order (then their dependencies and
/// history), and the counter of generated IDs when it moved.
#[derive(Clone, Debug, PartialEq)]
pub struct Creation {
    pub rows: Vec<NewRow>,
    pub next_number: Option<u64>,
}

impl Creation {
    /// Every (task, dependency) edge to insert.
    pub fn edges(&self) -> impl Iterator<Item = (&TaskId, &TaskId)> {
        self.rows
            .iter()
            .flat_map(|r| r.new.depends_on.iter().map(move |d| (&r.id, d)))
    }

    /// The tasks and history entries as written, from the `(seq, event ID)` each row was given
    /// (`written`), without reading the rows back.
    pub fn created(
        self,
        now: Millis,
        written: impl Fn(&TaskId) -> Option<(i64, i64)>,
    ) -> Result<Vec<(Task, TaskEvent)>> {
        // A task of the list with children later in it is an epic from the start.
        let mut children: HashMap<TaskId, u32> = HashMap::new();
        for row in &self.rows {
            if let Some(parent) = &row.new.parent {
                *children.entry(parent.clone()).or_default() += 1;
            }
        }
        let mut created = Vec::with_capacity(self.rows.len());
        for row in self.rows {
            let NewRow {
                id,
                mut new,
                deps_pending,
                paused,
                message,
            } = row;
            let Some((seq, event_id)) = written(&id) else {
                return Err(Error::Internal(format!(
                    "task {id} was inserted without its row or its history"
                )));
            };
            new.depends_on.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            let task = Task {
                id: id.clone(),
                seq,
                title: new.title,
                description: new.description,
                namespace: new.namespace,
                priority: new.priority,
                paused,
                parent: new.parent,
                depends_on: new.depends_on,
                requires: new.requires,
                deps_pending,
                children: Children {
                    total: children.get(&id).copied().unwrap_or(0),
                    declared: new.epic,
                    ..Children::default()
                },
                state: TaskState {
                    max_cost_cents: new.max_cost_cents,
                    approval_required: new.approval,
                    ..TaskState::new()
                },
                lease: None,
                lease_epoch: 0,
                patch_commit: None,
                avoid_runner: None,
                verified_tree: None,
                version: 1,
                created_at: now,
                updated_at: now,
            };
            let event = TaskEvent {
                id: event_id,
                task_id: id,
                at: now,
                kind: EventKind::Created,
                from: None,
                to: TaskStatus::Open,
                message,
            };
            created.push((task, event));
        }
        Ok(created)
    }
}

/// Edges of tasks a list creates before they are written (the earlier lines of the list):
/// each one's dependencies, and the children each parent gains.
#[derive(Default)]
struct Unwritten {
    deps: HashMap<TaskId, Vec<TaskId>>,
    children: HashMap<TaskId, Vec<TaskId>>,
}

/// Whether `from` waits for `to`, directly or not: a task waits for its dependencies, and an
/// epic for its children. Walks the graph a level at a time (one read per level for the
/// stored tasks; `unwritten` for the list's own).
async fn waits_for(
    reads: &mut impl Reads,
    from: &TaskId,
    to: &TaskId,
    unwritten: &Unwritten,
) -> Result<bool> {
    let mut seen: HashSet<TaskId> = HashSet::new();
    let mut frontier = vec![from.clone()];
    while !frontier.is_empty() {
        if frontier.contains(to) {
            return Ok(true);
        }
        frontier.retain(|t| seen.insert(t.clone()));
        let mut next = Vec::new();
        let mut stored: Vec<&TaskId> = Vec::new();
        for t in &frontier {
            next.extend(unwritten.children.get(t).into_iter().flatten().cloned());
            match unwritten.deps.get(t) {
                // A task of the list: nothing stored depends on it or is its child yet.
                Some(deps) => next.extend(deps.iter().cloned()),
                None => stored.push(t),
            }
        }
        if !stored.is_empty() {
            next.extend(reads.waited_on(&stored).await?);
        }
        frontier = next;
    }
    Ok(false)
}

/// Plans creating `new` in state Open, in order: the outcome is that of creating them one at
/// a time (a task may name one earlier in the list; the first that cannot be created fails the
/// whole call, its error `in_batch` when `batch`).
pub async fn create(reads: &mut impl Reads, new: Vec<NewTask>, batch: bool) -> Result<Creation> {
    let fail = |i: usize, e: Error| if batch { e.in_batch(i) } else { e };
    // Every task the list names (chosen IDs, parents, dependencies), as the store has them.
    let mut named: Vec<&TaskId> = Vec::new();
    for t in &new {
        named.extend(t.id.iter().chain(&t.parent).chain(&t.depends_on));
    }
    named.sort_unstable();
    named.dedup();
    let stored = reads.statuses(&named).await?;
    drop(named);
    // A child of a paused task (an epic) is created paused with it.
    let mut parents: Vec<&TaskId> = new.iter().filter_map(|t| t.parent.as_ref()).collect();
    parents.sort_unstable();
    parents.dedup();
    let paused_parents = reads.paused(&parents).await?;
    drop(parents);
    // Which generated IDs the store holds, read ahead a range at a time.
    let generated = new.iter().filter(|t| t.id.is_none()).count();
    let mut next_number = None;
    let mut next = if generated > 0 {
        reads.next_number().await?
    } else {
        0
    };
    let mut read_until = 0;
    let mut taken_numbers: HashSet<TaskId> = HashSet::new();
    // The IDs of the list so far: what a later task may name, and may not take.
    let mut listed: HashSet<TaskId> = HashSet::with_capacity(new.len());
    // Their edges, for the cycle check of the later ones.
    let mut unwritten = Unwritten::default();
    let mut left = generated;
    let mut rows = Vec::with_capacity(new.len());
    for (i, task) in new.into_iter().enumerate() {
        let id = match task.id.clone() {
            Some(id) => {
                if stored.contains_key(&id) || listed.contains(&id) {
                    return Err(fail(
                        i,
                        Error::AlreadyExists(format!(
                            "task {id} already exists; pick another --id or leave it out"
                        )),
                    ));
                }
                id
            }
            None => loop {
                if next > MAX_GENERATED {
                    return Err(fail(i, super::ids_exhausted()));
                }
                if next >= read_until {
                    let ahead = (left as u64 + 16)
                        .min(READ_AHEAD_MAX)
                        .min(MAX_GENERATED - next + 1);
                    let candidates: Vec<TaskId> =
                        (next..next + ahead).map(TaskId::generated).collect();
                    let candidates: Vec<&TaskId> = candidates.iter().collect();
                    taken_numbers.extend(reads.statuses(&candidates).await?.into_keys());
                    read_until = next + ahead;
                }
                let id = TaskId::generated(next);
                next += 1;
                if !taken_numbers.contains(&id) && !listed.contains(&id) {
                    left -= 1;
                    next_number = Some(next);
                    break id;
                }
            },
        };
        let exists = |t: &TaskId| stored.contains_key(t) || listed.contains(t);
        if let Some(parent) = task.parent.as_ref().filter(|p| !exists(p)) {
            return Err(fail(
                i,
                Error::NotFound(format!(
                    "parent task {parent} does not exist; create it first"
                )),
            ));
        }
        if let Some(dep) = task.depends_on.iter().find(|d| !exists(d)) {
            return Err(fail(
                i,
                Error::NotFound(format!("dependency {dep} does not exist; create it first")),
            ));
        }
        // The new task's only waiter is its epic: a dependency that waits for the epic would
        // wait for the task itself.
        if let Some(parent) = &task.parent {
            for dep in &task.depends_on {
                if waits_for(reads, dep, parent, &unwritten).await? {
                    return Err(fail(i, super::cycle_refusal(&id, dep)));
                }
            }
            unwritten
                .children
                .entry(parent.clone())
                .or_default()
                .push(id.clone());
        }
        unwritten.deps.insert(id.clone(), task.depends_on.clone());
        // A dependency earlier in the list is Open: not done.
        let deps_pending = task
            .depends_on
            .iter()
            .filter(|d| stored.get(*d).is_none_or(|s| *s != TaskStatus::Done))
            .count();
        listed.insert(id.clone());
        rows.push(NewRow {
            paused: task
                .parent
                .as_ref()
                .and_then(|p| paused_parents.get(p))
                .cloned(),
            message: format!("created with priority {}", task.priority),
            id,
            new: task,
            deps_pending: u32::try_from(deps_pending).unwrap_or(u32::MAX),
        });
    }
    Ok(Creation { rows, next_number })
}

/// Plans adding `deps` to `task`: the dependencies it does not have yet (none when nothing is
/// new: nothing is written then). Fails with `NotFound` for an unknown dependency and
/// `FailedPrecondition` when one would close a cycle (it waits for `task`, or is `task`), or
/// is one of an epic's own descendants (it waits for them as their epic already).
pub async fn add_dependencies(
    reads: &mut impl Reads,
    task: &Task,
    deps: &[TaskId],
) -> Result<Vec<TaskId>> {
    let named: Vec<&TaskId> = deps.iter().collect();
    let stored = reads.statuses(&named).await?;
    if let Some(dep) = deps.iter().find(|d| !stored.contains_key(*d)) {
        return Err(Error::NotFound(format!(
            "dependency {dep} does not exist; create it first"
        )));
    }
    let mut new: Vec<TaskId> = Vec::new();
    for dep in deps {
        if task.depends_on.contains(dep) || new.contains(dep) {
            continue;
        }
        if waits_for(reads, dep, &task.id, &Unwritten::default()).await? {
            return Err(super::cycle_refusal(&task.id, dep));
        }
        if reads.is_ancestor(&task.id, dep).await? {
            return Err(super::descendant_refusal(&task.id, dep));
        }
        new.push(dep.clone());
    }
    Ok(new)
}

/// How many of `deps` are not Done, given the statuses of those that exist.
pub fn pending(deps: &[TaskId], statuses: &HashMap<TaskId, TaskStatus>) -> u32 {
    let n = deps
        .iter()
        .filter(|d| statuses.get(*d).is_some_and(|s| *s != TaskStatus::Done))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The rule an epic's figures follow: a child created (`before` none) or changed (`before` its
/// row as it was) moves them; returns whether they moved (the epic's version moves with them).
pub fn child_moved(figures: &mut Children, before: Option<&Task>, after: &Task) -> bool {
    let is = |t: Option<&Task>, s: TaskStatus| u32::from(t.is_some_and(|t| t.state.status == s));
    let cost = |t: Option<&Task>| t.map_or(0.0, |t| t.state.cost_cents);
    if before.is_some()
        && before.map(|b| (b.state.status, b.state.cost_cents))
            == Some((after.state.status, after.state.cost_cents))
    {
        return false;
    }
    figures.total += u32::from(before.is_none());
    figures.done = (figures.done + is(Some(after), TaskStatus::Done))
        .saturating_sub(is(before, TaskStatus::Done));
    figures.cancelled = (figures.cancelled + is(Some(after), TaskStatus::Cancelled))
        .saturating_sub(is(before, TaskStatus::Cancelled));
    figures.cost_cents += cost(Some(after)) - cost(before);
    true
}

/// One step of a task's write after its compare-and-swap, as every backend carries it out
/// ([`write_steps`]), in order, in the write's transaction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Step<'a> {
    /// The task became Done: each task that depends on it waits on one fewer (never below
    /// none).
    ReleaseDependents,
    /// The task's entry in the integration journal is removed.
    EndIntegration,
    /// The change's history entry (its entry in the feed).
    Event {
        kind: EventKind,
        from: TaskStatus,
        to: TaskStatus,
        message: &'a str,
    },
    /// Ends one run of the task, or (`run` none) every run of it still running.
    EndRuns { run: Option<i64>, end: &'a RunEnd },
    /// Starts a run: its ID is the write's `run_id`.
    StartRun(&'a NewRun),
    /// Records a run that is already over (started at its own time, ended at the write's).
    RecordRun(&'a FinishedRun),
}

/// What a task's write does once its compare-and-swap holds: the dependents it releases, the
/// journal entry it ends, its history entry, the runs it ends, starts and records, in that
/// order.
pub fn write_steps(w: &TaskWrite) -> Vec<Step<'_>> {
    let mut steps = Vec::new();
    if w.next.state.status == TaskStatus::Done && w.event.from != TaskStatus::Done {
        steps.push(Step::ReleaseDependents);
    }
    if w.end_integration {
        steps.push(Step::EndIntegration);
    }
    steps.push(Step::Event {
        kind: w.event.kind,
        from: w.event.from,
        to: w.event.to,
        message: &w.event.message,
    });
    for (run, end) in &w.runs.end {
        steps.push(Step::EndRuns {
            run: Some(*run),
            end,
        });
    }
    if let Some(end) = &w.runs.close_rest {
        steps.push(Step::EndRuns { run: None, end });
    }
    if let Some(run) = &w.runs.start {
        steps.push(Step::StartRun(run));
    }
    steps.extend(w.runs.record.iter().map(Step::RecordRun));
    steps
}

/// The error of a write whose compare-and-swap failed: the task changed since the decision
/// was read (`exists`), or it is gone.
pub fn lost_race(w: &TaskWrite, exists: bool) -> Error {
    if exists {
        Error::Conflict(format!(
            "task {} changed while this request was being decided; try again",
            w.task_id
        ))
    } else {
        Error::NotFound(format!("task {} does not exist", w.task_id))
    }
}

/// A write's answer in a group written in one transaction ([`Store::commit_all`]): a write
/// that lost its race wrote nothing (the compare-and-swap is its first statement), so its
/// error is its answer and the group goes on; any other error ends the group (the outer
/// `Err`: nothing is written).
///
/// [`Store::commit_all`]: super::Store::commit_all
pub fn answer_in_group(written: Result<Committed>) -> Result<Result<Committed>> {
    match written {
        Err(e @ (Error::Conflict(_) | Error::NotFound(_))) => Ok(Err(e)),
        Err(other) => Err(other),
        Ok(done) => Ok(Ok(done)),
    }
}

/// The compare-and-swap for a backend that holds the row (`current`, none if there is no such
/// task): the task as `w` leaves it (every mutable field from the write, its version moved
/// on), or [`lost_race`]'s error.
pub fn swapped(current: Option<&Task>, w: &TaskWrite) -> Result<Task> {
    let current = match current {
        Some(t) if t.version == w.expected_version => t,
        other => return Err(lost_race(w, other.is_some())),
    };
    let mut task = current.clone();
    task.state = w.next.state.clone();
    task.lease = w.next.lease.clone();
    task.lease_epoch = w.next.lease_epoch;
    task.patch_commit = w.next.patch_commit.clone();
    task.avoid_runner = w.next.avoid_runner.clone();
    task.verified_tree = w.next.verified_tree.clone();
    task.version += 1;
    task.updated_at = w.at;
    task.depends_on = w.depends_on.clone();
    Ok(task)
}

/// A run already over as a backend without a one-statement insert records it: the run it
/// starts and how it ends.
pub fn finished_run(run: &FinishedRun) -> (NewRun, RunEnd) {
    (
        NewRun {
            phase: run.phase,
            patchset: run.patchset,
            runner: run.runner.clone(),
            train: run.train,
        },
        RunEnd {
            status: run.status,
            cost_cents: run.cost_cents,
            error: run.error.clone(),
            failure_kind: run.failure_kind,
            builds: run.builds,
            usage: None,
        },
    )
}

#[cfg(test)]
mod tests {
    //! The plan against a few maps: no backend.

    use super::*;

    /// A stored task: its status, parent, dependencies and pause.
    type Row = (TaskStatus, Option<TaskId>, Vec<TaskId>, Option<String>);

    /// Stored tasks, and the counter.
    #[derive(Default)]
    struct Tables {
        tasks: HashMap<TaskId, Row>,
        next: Option<u64>,
    }

    impl Reads for Tables {
        async fn statuses(&mut self, ids: &[&TaskId]) -> Result<HashMap<TaskId, TaskStatus>> {
            Ok(ids
                .iter()
                .filter_map(|i| self.tasks.get(*i).map(|t| ((*i).clone(), t.0)))
                .collect())
        }
        async fn paused(&mut self, ids: &[&TaskId]) -> Result<HashMap<TaskId, String>> {
            Ok(ids
                .iter()
                .filter_map(|i| {
                    let why = self.tasks.get(*i)?.3.clone()?;
                    Some(((*i).clone(), why))
                })
                .collect())
        }
        async fn next_number(&mut self) -> Result<u64> {
            Ok(self.next.unwrap_or(1))
        }
        async fn waited_on(&mut self, ids: &[&TaskId]) -> Result<Vec<TaskId>> {
            let mut out = Vec::new();
            for (id, (_, parent, deps, _)) in &self.tasks {
                if ids.contains(&id) {
                    out.extend(deps.iter().cloned());
                }
                if parent.as_ref().is_some_and(|p| ids.contains(&p)) {
                    out.push(id.clone());
                }
            }
            Ok(out)
        }
        async fn is_ancestor(&mut self, ancestor: &TaskId, task: &TaskId) -> Result<bool> {
            let mut at = self.tasks.get(task).and_then(|t| t.1.clone());
            while let Some(p) = at {
                if p == *ancestor {
                    return Ok(true);
                }
                at = self.tasks.get(&p).and_then(|t| t.1.clone());
            }
            Ok(false)
        }
    }

    fn id(s: &str) -> TaskId {
        TaskId::parse(s).expect("id")
    }

    fn stored(t: &mut Tables, name: &str, status: TaskStatus, parent: Option<&str>, deps: &[&str]) {
        t.tasks.insert(
            id(name),
            (
                status,
                parent.map(id),
                deps.iter().map(|d| id(d)).collect(),
                None,
            ),
        );
    }

    fn new(name: Option<&str>, parent: Option<&str>, deps: &[&str]) -> NewTask {
        NewTask {
            id: name.map(id),
            title: "a task".into(),
            description: String::new(),
            namespace: None,
            priority: 3,
            parent: parent.map(id),
            depends_on: deps.iter().map(|d| id(d)).collect(),
            requires: vec![],
            max_cost_cents: None,
            approval: false,
            epic: false,
        }
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn generated_ids_skip_taken_ones_and_the_counter_moves() {
        let mut t = Tables {
            next: Some(2),
            ..Tables::default()
        };
        stored(&mut t, "t-3", TaskStatus::Open, None, &[]);
        let plan = run(create(
            &mut t,
            vec![new(None, None, &[]), new(None, None, &[])],
            true,
        ))
        .expect("plan");
        let ids: Vec<&str> = plan.rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["t-2", "t-4"]);
        assert_eq!(plan.next_number, Some(5));
        assert_eq!(plan.rows[0].message, "created with priority 3");
        // Named IDs only: the counter is not read and does not move.
        let plan = run(create(&mut t, vec![new(Some("x"), None, &[])], false)).expect("plan");
        assert_eq!(plan.next_number, None);
    }

    #[test]
    fn the_last_generated_id_is_the_bound() {
        let mut t = Tables {
            next: Some(MAX_GENERATED),
            ..Tables::default()
        };
        let err = run(create(
            &mut t,
            vec![new(None, None, &[]), new(None, None, &[])],
            true,
        ))
        .expect_err("exhausted");
        assert!(err.to_string().contains("--id"), "{err}");
        assert!(
            err.to_string().contains("task 2 of the batch"),
            "in the batch: {err}"
        );
    }

    #[test]
    fn references_are_checked_with_their_hints() {
        let mut t = Tables::default();
        stored(&mut t, "a", TaskStatus::Done, None, &[]);
        let taken = run(create(&mut t, vec![new(Some("a"), None, &[])], false)).expect_err("taken");
        assert!(matches!(&taken, Error::AlreadyExists(m) if m.contains("pick another --id")));
        let parent = run(create(&mut t, vec![new(None, Some("p"), &[])], false)).expect_err("p");
        assert!(matches!(&parent, Error::NotFound(m) if m.contains("parent task p")));
        let dep = run(create(&mut t, vec![new(None, None, &["zz"])], false)).expect_err("dep");
        assert!(matches!(&dep, Error::NotFound(m) if m.contains("dependency zz")));
        // One earlier in the list may be named; twice the same ID may not.
        run(create(
            &mut t,
            vec![
                new(Some("b"), None, &[]),
                new(None, None, &["b", "a"]),
                new(None, Some("b"), &["a"]),
            ],
            true,
        ))
        .expect("earlier in the list");
        let twice = run(create(
            &mut t,
            vec![new(Some("b"), None, &[]), new(Some("b"), None, &[])],
            true,
        ))
        .expect_err("twice");
        assert!(twice.to_string().contains("task 2 of the batch"), "{twice}");
    }

    #[test]
    fn pending_dependencies_and_the_inherited_pause() {
        let mut t = Tables::default();
        stored(&mut t, "done", TaskStatus::Done, None, &[]);
        stored(&mut t, "open", TaskStatus::Open, None, &[]);
        stored(&mut t, "epic", TaskStatus::Open, None, &[]);
        if let Some(e) = t.tasks.get_mut(&id("epic")) {
            e.3 = Some("held".into());
        }
        let plan = run(create(
            &mut t,
            vec![
                new(Some("x"), None, &[]),
                new(Some("y"), Some("epic"), &["done", "open", "x"]),
                new(Some("z"), Some("x"), &[]),
            ],
            true,
        ))
        .expect("plan");
        assert_eq!(plan.rows[1].deps_pending, 2, "open, and x of the list");
        assert_eq!(plan.rows[1].paused.as_deref(), Some("held"));
        assert_eq!(plan.rows[0].paused, None);
        let edges: Vec<(&str, &str)> = plan
            .edges()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(edges, [("y", "done"), ("y", "open"), ("y", "x")]);
        let created = plan
            .created(7, |i| Some((if i.as_str() == "x" { 1 } else { 2 }, 10)))
            .expect("created");
        assert_eq!(
            created[0].0.children.total, 1,
            "x has a child later in the list"
        );
        assert_eq!(created[1].0.depends_on, [id("done"), id("open"), id("x")]);
        assert_eq!(created[1].1.kind, EventKind::Created);
    }

    #[test]
    fn a_child_may_not_depend_on_what_waits_for_its_epic() {
        let mut t = Tables::default();
        stored(&mut t, "epic", TaskStatus::Open, None, &[]);
        stored(&mut t, "w", TaskStatus::Open, None, &["epic"]);
        let err = run(create(
            &mut t,
            vec![new(Some("c"), Some("epic"), &["w"])],
            false,
        ))
        .expect_err("cycle");
        assert!(
            matches!(&err, Error::FailedPrecondition(m) if m.contains("cycle")),
            "{err}"
        );
        // Through the list's own edges too.
        let err = run(create(
            &mut t,
            vec![
                new(Some("e2"), None, &[]),
                new(Some("d"), None, &["e2"]),
                new(Some("c2"), Some("e2"), &["d"]),
            ],
            true,
        ))
        .expect_err("cycle in the list");
        assert!(err.to_string().contains("task 3 of the batch"), "{err}");
    }

    #[test]
    fn adding_dependencies_refuses_cycles_and_descendants() {
        let mut t = Tables::default();
        stored(&mut t, "a", TaskStatus::Open, None, &[]);
        stored(&mut t, "b", TaskStatus::Open, None, &["a"]);
        stored(&mut t, "epic", TaskStatus::Open, None, &[]);
        stored(&mut t, "kid", TaskStatus::Open, Some("epic"), &[]);
        let task = |name: &str, deps: &[&str]| Task {
            id: id(name),
            depends_on: deps.iter().map(|d| id(d)).collect(),
            ..crate::store::suite::ghost(name)
        };
        let err = run(add_dependencies(&mut t, &task("a", &[]), &[id("b")])).expect_err("cycle");
        assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("cycle")));
        let err = run(add_dependencies(&mut t, &task("a", &[]), &[id("a")])).expect_err("self");
        assert!(matches!(err, Error::FailedPrecondition(_)));
        let err = run(add_dependencies(&mut t, &task("epic", &[]), &[id("kid")])).expect_err("kid");
        assert!(matches!(&err, Error::FailedPrecondition(m) if m.contains("own children")));
        let err = run(add_dependencies(&mut t, &task("a", &[]), &[id("nope")])).expect_err("?");
        assert!(matches!(err, Error::NotFound(_)));
        let new = run(add_dependencies(
            &mut t,
            &task("b", &["a"]),
            &[id("a"), id("kid"), id("kid")],
        ))
        .expect("new");
        assert_eq!(
            new,
            [id("kid")],
            "what it has already, and twice the same, once"
        );
    }

    #[test]
    fn an_epics_figures_follow_its_children() {
        let child = |status: TaskStatus, cost: f64| {
            let mut t = crate::store::suite::ghost("c");
            t.state.status = status;
            t.state.cost_cents = cost;
            t
        };
        let mut f = Children::default();
        assert!(child_moved(&mut f, None, &child(TaskStatus::Open, 0.0)));
        let (open, done) = (child(TaskStatus::Open, 0.0), child(TaskStatus::Done, 5.0));
        assert!(child_moved(&mut f, Some(&open), &done));
        assert!(!child_moved(&mut f, Some(&done), &done), "nothing moved");
        assert_eq!((f.total, f.done, f.cancelled, f.cost_cents), (1, 1, 0, 5.0));
        assert_eq!(
            pending(
                &[id("a"), id("b"), id("c")],
                &HashMap::from([(id("a"), TaskStatus::Done), (id("b"), TaskStatus::Open),])
            ),
            1,
            "an unknown one is not counted"
        );
    }
}
