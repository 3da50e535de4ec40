//! Eligibility: which task may be leased, in which order, and why one is not moving. Pure.

use std::cmp::Ordering;

use super::Policy;
use crate::domain::{Children, Millis, TaskState, TaskStatus};

/// Whether a runner may lease the task now: it is Open, none of the tasks it depends on is
/// still not Done (`deps_pending`, counted by the store), it is not in back-off, and it is
/// under its limits.
pub fn leasable(state: &TaskState, deps_pending: u32, policy: &Policy, now: Millis) -> bool {
    state.status == TaskStatus::Open
        && deps_pending == 0
        && state.backoff_until.is_none_or(|until| until <= now)
        && !policy.over_retry_limit(state)
        && !policy.over_cost_limit(state)
}

/// What the runners can take now, for [`waiting_for`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Runners with an open work stream.
    pub connected: usize,
    /// Of those, runners that take work (not draining, not unhealthy).
    pub taking: usize,
    /// Free slots on the runners that take work.
    pub free_slots: u32,
    /// All the slots of the runners that take work.
    pub slots: u32,
}

/// How [`waiting_for`] says that a task waits only for a slot to free.
pub const ALL_SLOTS_BUSY: &str = "every slot of the";

/// A connected runner that takes no work, for [`waiting_for`]: a task it could take waits
/// for it to be fixed or undrained, and says so, by its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resting {
    pub name: String,
    pub labels: Vec<String>,
    /// Why it takes no work when it said it is unhealthy; `None`: it is draining.
    pub unhealthy: Option<String>,
}

/// What the runners of `resting` are doing instead of taking work, in one sentence's tail:
/// those in the same state (draining, or unhealthy for the same reason) named together, so a
/// reason shared by the fleet is said once.
fn describe_resting(resting: &[&Resting]) -> String {
    let mut groups: Vec<(&Option<String>, Vec<&str>)> = Vec::new();
    for r in resting {
        match groups.iter_mut().find(|(why, _)| **why == r.unhealthy) {
            Some((_, names)) => names.push(&r.name),
            None => groups.push((&r.unhealthy, vec![&r.name])),
        }
    }
    groups
        .into_iter()
        .map(|(why, names)| {
            let one = names.len() == 1;
            let names = match names.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
                _ => names.concat(),
            };
            let (is, runner) = if one {
                ("is", "runner")
            } else {
                ("are", "runners")
            };
            match why {
                Some(reason) => format!(
                    "{names} {is} unhealthy: {reason} (fix that, then restart the {runner})"
                ),
                None => format!("{names} {is} draining"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a task requires of its runner, and how many connected runners that take work have
/// those labels, for [`waiting_for`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Routing<'a> {
    /// The connected runners that take no work (draining or unhealthy), whatever the task
    /// requires.
    pub resting: &'a [Resting],
    pub requires: &'a [String],
    /// Runners that take work and have the labels of `requires`.
    pub with_labels: usize,
    /// Of those, runners whose `--only-parent`/`--only-task` let them take this task.
    pub fitting: usize,
    /// Whether any runner that takes work is limited by `--only-parent`/`--only-task`;
    /// when none is, `with_labels` and `fitting` are not looked at for a task that requires
    /// nothing.
    pub scoped: bool,
}

/// Why a task is not moving, in short sentences (empty when nothing holds it): its
/// dependencies that are not done (`deps`, with their statuses), its back-off, its limits, the
/// runners. Pure, like the rest of the lifecycle.
pub fn waiting_for(
    id: &str,
    state: &TaskState,
    deps: &[(String, TaskStatus)],
    policy: &Policy,
    now: Millis,
    capacity: Capacity,
    routing: Routing<'_>,
) -> Vec<String> {
    let mut why = Vec::new();
    let blocking = || {
        deps.iter()
            .filter(|(_, status)| *status != TaskStatus::Done)
            .map(|(dep, status)| match status {
                TaskStatus::Cancelled => format!(
                    "depends on {dep}, which is cancelled: it waits for ever unless {dep} is \
                     retried"
                ),
                TaskStatus::NeedsHelp => {
                    format!("depends on {dep}, which needs help (pipelinectl task retry {dep})")
                }
                other => format!("depends on {dep}, which is {other}"),
            })
    };
    match state.status {
        TaskStatus::Open => {
            why.extend(blocking());
            if let Some(until) = state.backoff_until.filter(|u| *u > now) {
                let secs = (until - now + 999) / 1000;
                why.push(format!(
                    "in back-off for {secs} s more after {} failed attempt{}",
                    state.failures,
                    if state.failures == 1 { "" } else { "s" }
                ));
            }
            if why.is_empty() {
                if capacity.connected == 0 {
                    why.push("no runner is connected".to_owned());
                } else if !routing.requires.is_empty() && routing.with_labels == 0 {
                    let requires = routing.requires.join(", ");
                    let idle: Vec<&Resting> = routing
                        .resting
                        .iter()
                        .filter(|r| crate::domain::satisfies(&r.labels, routing.requires))
                        .collect();
                    why.push(match idle.len() {
                        0 => format!(
                            "no connected runner has the labels it requires ({requires}); start \
                             one with --label for each"
                        ),
                        1 => format!(
                            "the one connected runner with the labels it requires ({requires}) \
                             takes no work: {}",
                            describe_resting(&idle)
                        ),
                        n => format!(
                            "the {n} connected runners with the labels it requires ({requires}) \
                             take no work: {}",
                            describe_resting(&idle)
                        ),
                    });
                } else if (routing.scoped || !routing.requires.is_empty())
                    && routing.with_labels > 0
                    && routing.fitting == 0
                {
                    why.push(
                        "every connected runner that could take it is limited to other work \
                         (--only-parent, --only-task)"
                            .to_owned(),
                    );
                } else if capacity.taking == 0 {
                    let resting: Vec<&Resting> = routing.resting.iter().collect();
                    why.push(if resting.is_empty() {
                        format!(
                            "no connected runner takes work ({} draining or unhealthy)",
                            capacity.connected
                        )
                    } else {
                        format!(
                            "no connected runner takes work: {}",
                            describe_resting(&resting)
                        )
                    });
                } else if capacity.free_slots == 0 {
                    why.push(format!(
                        "{ALL_SLOTS_BUSY} {} runner{} is busy",
                        capacity.taking,
                        if capacity.taking == 1 { "" } else { "s" }
                    ));
                }
            }
        }
        TaskStatus::Verified => {
            if state.base_check {
                why.push(
                    "its runner's verification failed: the server builds its base alone to learn \
                     whether the base itself is red before anyone is charged"
                        .to_owned(),
                );
            }
            if policy.awaits_approval(state) {
                why.push(format!(
                    "waiting for a person's approval (pipelinectl task approve {id}, or task \
                     reject {id} --note TEXT)"
                ));
            }
            why.extend(blocking().map(|d| format!("lands once done: it {d}")));
        }
        TaskStatus::NeedsHelp => {
            if policy.over_retry_limit(state) {
                why.push(format!(
                    "retry limit reached: {} failed attempts (pipelinectl task retry {id})",
                    state.failures
                ));
            } else if policy.over_cost_limit(state) {
                why.push(format!(
                    "cost limit reached: {:.0} of {:.0} cents (pipelinectl task retry {id})",
                    state.budget_spent(),
                    policy.cost_cap(state).unwrap_or_default()
                ));
            } else {
                why.push(format!(
                    "needs a person: see its history (pipelinectl task retry {id})"
                ));
            }
        }
        TaskStatus::InProgress | TaskStatus::Done | TaskStatus::Cancelled => {}
    }
    why
}

/// What holds an epic (a task with children), instead of what [`waiting_for`] says of a task
/// a runner would take: its children.
pub fn epic_waiting_for(status: TaskStatus, children: &Children) -> Vec<String> {
    if !matches!(status, TaskStatus::Open | TaskStatus::NeedsHelp) {
        return Vec::new();
    }
    if children.unfinished() == 0 && children.done == 0 {
        return vec![match children.total {
            0 => "an epic with no children yet: add them with pipelinectl task add --parent ID"
                .to_owned(),
            1 => "an epic whose one child is cancelled: retry it, add one, or cancel the epic"
                .to_owned(),
            n => format!(
                "an epic whose {n} children are all cancelled: retry one, add one, or cancel \
                 the epic"
            ),
        }];
    }
    vec![format!(
        "an epic: it is done when its children are ({} of {} done{})",
        children.done,
        children.total,
        match children.cancelled {
            0 => String::new(),
            n => format!(", {n} cancelled"),
        }
    )]
}

/// What holds a child whose epic has spent its cap (`spent` of `cap` cents).
pub fn epic_cap_reached(id: &str, epic: &str, spent: f64, cap: f64) -> String {
    format!(
        "its epic {epic} has spent {spent:.0} of its {cap:.0}-cent cap (pipelinectl task edit \
         {epic} --max-cost CENTS, then pipelinectl task retry {id})"
    )
}

/// The queue's pauses in force, each with its reason (empty when a person gave none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pauses<'a> {
    /// A person paused new leases (`queue pause`).
    pub leases: Option<&'a str>,
    /// A person holds landing (`queue pause --landing` or `--landing-only`).
    pub landing: Option<&'a str>,
    /// The base is red: it holds both.
    pub red_base: Option<&'a str>,
}

/// What the queue's pauses hold back of a task with `status` (before what [`waiting_for`]
/// says): new leases paused or a red base hold Open tasks; landing paused or a red base hold
/// Verified ones.
pub fn held_by_pauses(status: TaskStatus, pauses: Pauses<'_>) -> Vec<String> {
    let why = |r: &str| {
        if r.is_empty() {
            String::new()
        } else {
            format!(": {r}")
        }
    };
    let mut held = Vec::new();
    match status {
        TaskStatus::Open => {
            if let Some(r) = pauses.red_base {
                held.push(format!("no new leases while the base is red{}", why(r)));
            }
            if let Some(r) = pauses.leases {
                held.push(format!(
                    "the queue is paused, so no new leases{} (pipelinectl queue resume)",
                    why(r)
                ));
            }
        }
        TaskStatus::Verified => {
            if let Some(r) = pauses.red_base {
                held.push(format!("landing is paused{}", why(r)));
            }
            if let Some(r) = pauses.landing {
                held.push(format!(
                    "landing is paused{} (pipelinectl queue resume)",
                    why(r)
                ));
            }
        }
        _ => {}
    }
    held
}

/// The order in which leasable tasks are handed out: higher priority (lower number) first,
/// then the oldest (lowest creation sequence).
pub fn lease_order(a: (u8, i64), b: (u8, i64)) -> Ordering {
    a.0.cmp(&b.0).then(a.1.cmp(&b.1))
}

/// Whether a person may edit a task in `status` (`task edit`): not while an agent works on it
/// or its commit waits to land (the edit would not be what was built) unless the edit is for
/// the next attempt (`next_attempt`), and never once done.
pub fn editable(status: TaskStatus, next_attempt: bool) -> Result<(), String> {
    match status {
        TaskStatus::Open | TaskStatus::NeedsHelp | TaskStatus::Cancelled => Ok(()),
        TaskStatus::InProgress | TaskStatus::Verified if next_attempt => Ok(()),
        TaskStatus::InProgress => Err("an agent is working on it; pass --next-attempt to \
             apply the edit to its next attempt, or cancel it first"
            .into()),
        TaskStatus::Verified => Err("its commit is verified and waits to land; pass \
             --next-attempt to apply the edit if it is sent back"
            .into()),
        TaskStatus::Done => Err("it is done; create a new task for more work".into()),
    }
}
