//! The lease planner: lease candidates (in lease order) × free slots → which task goes to which
//! runner. Pure: no IO, no clock (the time is passed in), so it is unit-tested on its own.
//!
//! A task goes to the runner with the most free slots whose labels satisfy what the task
//! requires ([`crate::domain::satisfies`]), preferring one other than the runner whose lease of
//! it lapsed last (`avoid_runner`); a task the lifecycle does not allow to be leased
//! ([`crate::lifecycle::leasable`]), or that no free runner can take, is passed over.

use crate::domain::{Millis, Scope, Task, satisfies};
use crate::lifecycle::{self, Policy};

/// Free room on a runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub runner_id: String,
    pub runner: String,
    pub free: u32,
    /// The runner's labels, which a task's `requires` must be satisfied by.
    pub labels: Vec<String>,
    /// The work it takes (`--only-parent`, `--only-task`).
    pub scope: Scope,
}

impl Slot {
    /// Whether the runner has room for `task` and may take it.
    pub fn fits(&self, task: &Task) -> bool {
        self.free > 0 && satisfies(&self.labels, &task.requires) && self.scope.admits(task)
    }
}

/// One decision: the candidate at `task` (its index) goes to `runner`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pick {
    pub task: usize,
    pub runner_id: String,
    pub runner: String,
}

/// Matches `candidates` to `slots` (taking the slots it fills), at most `max` picks.
pub fn plan(
    candidates: &[Task],
    slots: &mut [Slot],
    policy: &Policy,
    now: Millis,
    max: usize,
) -> Vec<Pick> {
    let mut picks = Vec::new();
    for (i, task) in candidates.iter().enumerate() {
        if picks.len() >= max || slots.iter().all(|s| s.free == 0) {
            break;
        }
        if !lifecycle::leasable(&task.state, task.deps_pending, policy, now) {
            continue;
        }
        let avoid = task.avoid_runner.as_deref();
        let Some(slot) = slots
            .iter()
            .position(|s| s.fits(task) && Some(s.runner.as_str()) != avoid)
            .or_else(|| slots.iter().position(|s| s.fits(task)))
        else {
            // No free runner has its labels or takes it: the next task may go.
            continue;
        };
        slots[slot].free -= 1;
        picks.push(Pick {
            task: i,
            runner_id: slots[slot].runner_id.clone(),
            runner: slots[slot].runner.clone(),
        });
    }
    picks
}

/// Free slots in all.
pub fn total(slots: &[Slot]) -> u32 {
    slots.iter().map(|s| s.free).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{TaskId, TaskState, TaskStatus};

    fn task(id: &str, priority: u8) -> Task {
        Task {
            id: TaskId::parse(id).expect("id"),
            seq: 1,
            title: id.into(),
            description: String::new(),
            namespace: None,
            priority,
            parent: None,
            depends_on: vec![],
            requires: vec![],
            paused: None,
            deps_pending: 0,
            children: Default::default(),
            state: TaskState::new(),
            lease: None,
            lease_epoch: 0,
            patch_commit: None,
            avoid_runner: None,
            verified_tree: None,
            version: 1,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn slot(name: &str, free: u32) -> Slot {
        Slot {
            runner_id: format!("id-{name}"),
            runner: name.into(),
            free,
            labels: vec![],
            scope: Scope::default(),
        }
    }

    fn picked(picks: &[Pick], tasks: &[Task]) -> Vec<(String, String)> {
        picks
            .iter()
            .map(|p| (tasks[p.task].id.to_string(), p.runner.clone()))
            .collect()
    }

    #[test]
    fn fills_free_slots_in_candidate_order() {
        let tasks = [task("a", 0), task("b", 1), task("c", 2)];
        let mut slots = [slot("r1", 1), slot("r2", 1)];
        let picks = plan(&tasks, &mut slots, &Policy::default(), 0, 10);
        assert_eq!(
            picked(&picks, &tasks),
            [("a".into(), "r1".into()), ("b".into(), "r2".into())]
        );
        assert_eq!(total(&slots), 0, "the slots it filled are taken");
        // No slots, no picks.
        assert!(plan(&tasks, &mut slots, &Policy::default(), 0, 10).is_empty());
    }

    #[test]
    fn passes_over_what_the_lifecycle_does_not_allow() {
        let mut blocked = task("blocked", 0);
        blocked.deps_pending = 1;
        let mut backing_off = task("later", 0);
        backing_off.state.backoff_until = Some(100);
        let mut busy = task("busy", 0);
        busy.state.status = TaskStatus::InProgress;
        let tasks = [blocked, backing_off, busy, task("ok", 3)];
        let mut slots = [slot("r1", 4)];
        let picks = plan(&tasks, &mut slots, &Policy::default(), 50, 10);
        assert_eq!(picked(&picks, &tasks), [("ok".into(), "r1".into())]);
        assert_eq!(slots[0].free, 3);
    }

    #[test]
    fn prefers_another_runner_than_the_one_that_lost_it_but_takes_it_if_alone() {
        let mut lapsed = task("lapsed", 0);
        lapsed.avoid_runner = Some("r1".into());
        let tasks = [lapsed.clone()];
        let mut slots = [slot("r1", 1), slot("r2", 1)];
        let picks = plan(&tasks, &mut slots, &Policy::default(), 0, 10);
        assert_eq!(picked(&picks, &tasks), [("lapsed".into(), "r2".into())]);
        let mut only = [slot("r1", 1)];
        let picks = plan(&tasks, &mut only, &Policy::default(), 0, 10);
        assert_eq!(picked(&picks, &tasks), [("lapsed".into(), "r1".into())]);
    }

    #[test]
    fn stops_at_max() {
        let tasks = [task("a", 0), task("b", 0), task("c", 0)];
        let mut slots = [slot("r1", 8)];
        assert_eq!(plan(&tasks, &mut slots, &Policy::default(), 0, 2).len(), 2);
        assert_eq!(slots[0].free, 6);
    }

    #[test]
    fn a_task_goes_only_to_a_runner_with_the_labels_it_requires() {
        let mut gpu = task("gpu", 0);
        gpu.requires = vec!["gpu".into(), "os=linux".into()];
        let tasks = [gpu, task("any", 0)];
        // r1 has more room but not the labels; the task that needs none still gets it.
        let mut slots = [slot("r1", 4), slot("r2", 1)];
        slots[1].labels = vec!["gpu=a100".into(), "os=linux".into()];
        let picks = plan(&tasks, &mut slots, &Policy::default(), 0, 8);
        assert_eq!(
            picked(&picks, &tasks),
            [("gpu".into(), "r2".into()), ("any".into(), "r1".into())]
        );
        // With no runner that has them, it is passed over, not blocking the queue.
        let mut slots = [slot("r1", 4)];
        let picks = plan(&tasks, &mut slots, &Policy::default(), 0, 8);
        assert_eq!(picked(&picks, &tasks), [("any".into(), "r1".into())]);
    }

    #[test]
    fn a_runner_limited_to_an_epic_or_a_task_takes_only_those() {
        let mut child = task("child", 0);
        child.parent = Some(TaskId::parse("epic").expect("id"));
        let tasks = [task("other", 0), child, task("one", 0)];
        let mut slots = [slot("epic-only", 4), slot("one-only", 4)];
        slots[0].scope.parents = vec![TaskId::parse("epic").expect("id")];
        slots[1].scope.task = Some(TaskId::parse("one").expect("id"));
        let picks = plan(&tasks, &mut slots, &Policy::default(), 0, 8);
        assert_eq!(
            picked(&picks, &tasks),
            [
                ("child".into(), "epic-only".into()),
                ("one".into(), "one-only".into())
            ]
        );
    }
}
