//! The task lifecycle of `CONTRACT.md` as a pure state machine: no IO, no clock, no database.
//!
//! [`apply`] takes a task's state, an [`Event`], the [`Policy`] and the current time, and
//! returns the next state with the history entry to record and the [`Effect`]s to carry out, or
//! refuses the event with a reason. [`leasable`] and [`lease_order`] decide which task a runner
//! gets next and [`waiting_for`] says why one is not moving ([`eligibility`]); [`judge`] turns
//! a runner's result into the event it is. The coordinator persists what `apply` returns first,
//! and only then acts on it.
//!
//! ```text
//! Open ──lease──▶ InProgress ──dev ok + verify pass/skip──▶ Verified ──integrate──▶ Done
//!   ▲                 │ dev failed / verify failed / lease lost        │ conflict / red build
//!   └─────────────────┴────────────────────────────────────────────────┘
//! Open ──retries or cost cap exceeded──▶ NeedsHelp        any ──cancel──▶ Cancelled
//! ```
//!
//! A runner's failed verification is charged only on a base the server knows green. On a base
//! known red it is no one's: the task goes to Verified with its commit kept (built on the base
//! once the base is green). On any other base the task waits Verified and uncharged
//! (`base_check`) until the server has built that base: [`Event::BaseGreen`] charges it as a
//! verify failure, [`Event::BaseRed`] does not.

use crate::domain::{Children, EventKind, Millis, TaskState, TaskStatus};

mod eligibility;
pub mod judge;

pub use eligibility::{
    ALL_SLOTS_BUSY, Capacity, Pauses, Resting, Routing, editable, epic_cap_reached,
    epic_waiting_for, held_by_pauses, leasable, lease_order, waiting_for,
};

/// Back-off never exceeds this many seconds (as in the seed).
pub const MAX_BACKOFF_SECS: u64 = 600;

/// The limits that apply to every task; from the server's flags.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// A task becomes NeedsHelp after this many failed attempts; 0 means no limit.
    pub max_retries: u32,
    /// A task becomes NeedsHelp once its cost since the last retry reaches this many cents;
    /// 0 means no limit.
    pub max_task_cost_cents: f64,
    /// Back-off after `n` failures is `min(600, backoff_base_secs * 2^n)` seconds.
    pub backoff_base_secs: u64,
    /// A task whose lease is lost this many times in a row (its runners died or were cut off
    /// while on it) needs help; 0 means no limit. Lost leases are not the task's failures.
    pub max_lost_leases: u32,
    /// An epic's children stop being leased once together they have cost this many cents,
    /// unless the epic has its own cap (`--max-cost` on it); 0 means no limit.
    pub max_epic_cost_cents: f64,
    /// Every verified task waits for a person's approval before it lands
    /// (`--require-approval`), not only those created with `--approval`.
    pub require_approval: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_retries: 5,
            max_task_cost_cents: 0.0,
            backoff_base_secs: 10,
            max_lost_leases: 5,
            max_epic_cost_cents: 0.0,
            require_approval: false,
        }
    }
}

impl Policy {
    /// Seconds a task waits after its `failures`th failed attempt.
    pub fn backoff_secs(&self, failures: u32) -> u64 {
        let factor = 1u64.checked_shl(failures).unwrap_or(u64::MAX);
        self.backoff_base_secs
            .saturating_mul(factor)
            .min(MAX_BACKOFF_SECS)
    }

    /// Whether the task has failed as often as it may.
    pub fn over_retry_limit(&self, state: &TaskState) -> bool {
        self.max_retries > 0 && state.failures >= self.max_retries
    }

    /// What the task may still spend, in cents: its cap less what it has cost since the last
    /// retry, never below 0; `None` when there is no cap.
    pub fn remaining_budget(&self, state: &TaskState) -> Option<f64> {
        self.cost_cap(state)
            .map(|cap| (cap - state.budget_spent()).max(0.0))
    }

    /// Whether the task has spent its budget.
    pub fn over_cost_limit(&self, state: &TaskState) -> bool {
        self.cost_cap(state)
            .is_some_and(|cap| state.budget_spent() >= cap)
    }

    /// What an epic's children may still spend together, in cents: the epic's cap (its own
    /// `--max-cost`, else the server's `--max-epic-cost`) less what they have cost, never
    /// below 0; `None` when there is no cap.
    pub fn epic_remaining(&self, epic: &TaskState, children: &Children) -> Option<f64> {
        self.epic_cap(epic)
            .map(|cap| (cap - children.cost_cents).max(0.0))
    }

    /// An epic's cap on its children's cost together, in cents; `None` for no cap.
    pub fn epic_cap(&self, epic: &TaskState) -> Option<f64> {
        epic.max_cost_cents
            .or((self.max_epic_cost_cents > 0.0).then_some(self.max_epic_cost_cents))
    }

    /// Whether the task must be approved by a person before it lands.
    pub fn needs_approval(&self, state: &TaskState) -> bool {
        self.require_approval || state.approval_required
    }

    /// Whether the task is Verified and waits for a person's approval (the integrator leaves
    /// it out of every train until then).
    pub fn awaits_approval(&self, state: &TaskState) -> bool {
        state.status == TaskStatus::Verified && self.needs_approval(state) && !state.approved
    }

    /// The task's approval as `task show --json` says it: `None` when it needs none,
    /// `"required"` until a person approves its current patchset, then `"approved"`.
    pub fn approval(&self, state: &TaskState) -> Option<&'static str> {
        match (self.needs_approval(state), state.approved) {
            (false, _) => None,
            (true, false) => Some("required"),
            (true, true) => Some("approved"),
        }
    }

    /// The task's cost cap in cents: its own (`task add --max-cost`), else the server's
    /// `--max-task-cost`; `None` for no cap.
    pub fn cost_cap(&self, state: &TaskState) -> Option<f64> {
        state
            .max_cost_cents
            .or((self.max_task_cost_cents > 0.0).then_some(self.max_task_cost_cents))
    }
}

/// How a person's note to the agent (`task retry --note`) begins the task's feedback; the
/// prompt shows it as guidance, apart from a rejection's output.
pub const GUIDANCE: &str = "Guidance from a person: ";

/// How a person's rejection of a verified patchset (`task reject --note`) begins the task's
/// feedback; the prompt shows the note as the person's review.
pub const REJECTED: &str = "Rejected by a person: ";

/// Something that happened to a task.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A runner took the task; `deps_pending` is how many of its dependencies were not Done
    /// when it was chosen (a lease needs none).
    Leased { deps_pending: u32 },
    /// The agent failed, timed out, or left something other than one commit on the base.
    DevFailed { reason: String, cost_cents: f64 },
    /// The runner's verification of the agent's commit failed on a base known green; the
    /// commit is kept as the next patchset's starting point and the next agent amends it.
    VerifyFailed { reason: String, cost_cents: f64 },
    /// The runner's verification failed on a base the server does not know green: the commit
    /// is kept and the task waits, Verified and not charged yet, while the server builds that
    /// base alone ([`Event::BaseGreen`] or [`Event::BaseRed`] then settles it).
    VerifyFailedOnUncheckedBase { reason: String, cost_cents: f64 },
    /// The runner's verification failed on `base`, which is known red (it fails the server's
    /// own build): nobody's work is to blame, so nothing is charged, and the commit is kept,
    /// Verified, to be built on the base once it is green again (without a new dev run).
    VerifyFailedOnRedBase {
        base: String,
        reason: String,
        cost_cents: f64,
    },
    /// The base a held failure was verified on builds green: the failure was the task's own,
    /// charged as a verify failure (the next agent amends the commit).
    BaseGreen,
    /// The base a held failure was verified on fails its own build too: not charged; the
    /// commit waits, Verified, to be built on the base once it is green again.
    BaseRed { base: String },
    /// The agent's commit passed (or skipped) verification on the runner and was accepted.
    Verified { cost_cents: f64 },
    /// The lease lapsed before a result arrived (the runner died, froze or was cut off): not
    /// the task's failure, so it is not counted; only a run of them stops the task.
    LeaseLost { reason: String },
    /// The runner gave the lease back unfinished (it is draining or stopping, or it could not
    /// do the work: `infrastructure`): not the task's fault, so it does not count.
    Released {
        reason: String,
        infrastructure: bool,
    },
    /// The cherry-pick conflicted or the post-integration build was red; the next attempt
    /// starts fresh from the current base.
    IntegrationFailed { reason: String },
    /// The commit is on the base branch.
    Integrated,
    /// A person cancelled the task.
    Cancel,
    /// A person asked for another go: the failure count and back-off are cleared. `note` is
    /// guidance for the next prompt; `fresh` drops the previous patchset and its feedback, so
    /// the next attempt starts from the current base.
    Retry { note: Option<String>, fresh: bool },
    /// At start-up the server found the task InProgress with no live lease (it crashed).
    Recover,
    /// The task's own landed commit (the server's record of it) is on the base, although the
    /// task is not Done (the database lost that, e.g. rolled back after a power loss).
    FoundLanded { commit: String },
    /// The task is an epic and every one of its children is done or cancelled, at least one
    /// done.
    ChildrenDone { done: u32, cancelled: u32 },
    /// The task's epic has spent its cap (its children's cost together): it is not leased
    /// again until a person raises the cap or retries it.
    EpicCapReached { epic: String, spent: f64, cap: f64 },
    /// A child was added while the task was in progress: it is an epic now, so its run stops
    /// (not counted: nothing failed) and its children do the work.
    BecameEpic,
    /// A person approved the verified patchset (`task approve`): it may land. `by` names who
    /// (the credential, and the person as the CLI gave it).
    Approve { by: String, note: Option<String> },
    /// A person rejected the verified patchset (`task reject --note`): the task goes back to
    /// an agent, which amends the commit with the note as feedback. The person judged the
    /// task's own work, so it counts as a failed attempt.
    Reject { by: String, note: String },
}

impl Event {
    /// The one-word name recorded in the task's history.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Leased { .. } => EventKind::Leased,
            Event::DevFailed { .. } => EventKind::DevFailed,
            Event::VerifyFailed { .. } | Event::BaseGreen => EventKind::VerifyFailed,
            Event::VerifyFailedOnUncheckedBase { .. } => EventKind::CheckingBase,
            Event::VerifyFailedOnRedBase { .. } | Event::BaseRed { .. } => EventKind::BaseRed,
            Event::Verified { .. } => EventKind::Verified,
            Event::LeaseLost { .. } => EventKind::LeaseLost,
            Event::Released { .. } => EventKind::Released,
            Event::IntegrationFailed { .. } => EventKind::IntegrationFailed,
            Event::Integrated => EventKind::Integrated,
            Event::Cancel => EventKind::Cancelled,
            Event::Retry { .. } => EventKind::Retried,
            Event::Recover => EventKind::Recovered,
            Event::FoundLanded { .. } => EventKind::FoundLanded,
            Event::ChildrenDone { .. } => EventKind::ChildrenDone,
            Event::EpicCapReached { .. } => EventKind::EpicCap,
            Event::BecameEpic => EventKind::BecameEpic,
            Event::Approve { .. } => EventKind::Approved,
            Event::Reject { .. } => EventKind::Rejected,
        }
    }

    fn verb(&self) -> &'static str {
        match self {
            Event::Leased { .. } => "lease",
            Event::DevFailed { .. }
            | Event::VerifyFailed { .. }
            | Event::VerifyFailedOnUncheckedBase { .. }
            | Event::VerifyFailedOnRedBase { .. }
            | Event::Verified { .. } => "record a dev result for",
            Event::BaseGreen | Event::BaseRed { .. } => "settle the base check of",
            Event::LeaseLost { .. } | Event::Released { .. } => "end the lease of",
            Event::IntegrationFailed { .. } | Event::Integrated => "record an integration of",
            Event::Cancel => "cancel",
            Event::Retry { .. } => "retry",
            Event::Recover => "recover",
            Event::FoundLanded { .. } => "record the landing of",
            Event::ChildrenDone { .. } => "complete the children of",
            Event::EpicCapReached { .. } => "stop at its epic's cap",
            Event::BecameEpic => "make an epic of",
            Event::Approve { .. } => "approve",
            Event::Reject { .. } => "reject",
        }
    }
}

/// Work the coordinator must do after persisting a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Stop the agent working on the task and drop its lease.
    StopRun,
    /// A task may have become leasable: offer work to idle runners.
    WakeScheduler,
    /// A task became Verified: wake the integrator.
    WakeIntegrator,
    /// A task became Done: tasks depending on it may have become leasable.
    DependentsUnblocked,
}

/// The outcome of a successful [`apply`].
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub state: TaskState,
    /// The history entry's kind (see [`Event::kind`]).
    pub kind: EventKind,
    /// The history entry's text: what happened and why.
    pub message: String,
    pub effects: Vec<Effect>,
}

/// Why an event does not apply to a task in its current state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {verb} a task that is {status}{hint}")]
pub struct Refusal {
    pub verb: &'static str,
    pub status: TaskStatus,
    pub hint: &'static str,
}

/// Applies `event` to `state`. Pure: the same inputs always give the same output.
pub fn apply(
    state: &TaskState,
    event: &Event,
    policy: &Policy,
    now: Millis,
) -> Result<Transition, Refusal> {
    let mut t = decide(state, event, policy, now)?;
    // What holds a Verified task ends when it leaves Verified; an approval is of the patchset
    // that lands, so it ends unless the task is Done.
    if t.state.status != TaskStatus::Verified {
        t.state.base_check = false;
        if t.state.status != TaskStatus::Done {
            t.state.approved = false;
        }
    }
    Ok(t)
}

/// [`apply`] before what every transition out of Verified clears.
fn decide(
    state: &TaskState,
    event: &Event,
    policy: &Policy,
    now: Millis,
) -> Result<Transition, Refusal> {
    use TaskStatus::*;
    let refuse = |hint: &'static str| Refusal {
        verb: event.verb(),
        status: state.status,
        hint,
    };
    let mut next = state.clone();
    let (message, effects) = match (state.status, event) {
        (Open, Event::Leased { deps_pending }) => {
            if *deps_pending > 0 {
                return Err(refuse(" with dependencies not done"));
            }
            if !leasable(state, 0, policy, now) {
                return Err(refuse(" in back-off or over its limits"));
            }
            next.status = InProgress;
            next.backoff_until = None;
            ("leased".to_owned(), vec![])
        }
        (InProgress, Event::DevFailed { reason, cost_cents }) => {
            return Ok(fail(
                state,
                event,
                reason,
                *cost_cents,
                0,
                false,
                policy,
                now,
            ));
        }
        (InProgress, Event::VerifyFailed { reason, cost_cents }) => {
            return Ok(fail(
                state,
                event,
                reason,
                *cost_cents,
                1,
                true,
                policy,
                now,
            ));
        }
        (InProgress, Event::VerifyFailedOnUncheckedBase { reason, cost_cents }) => {
            next.status = Verified;
            next.lost_leases = 0;
            next.patchset += 1;
            next.cost_cents += cost_cents;
            next.feedback = Some(reason.clone());
            next.amend = true;
            next.base_check = true;
            (
                format!(
                    "the runner's verification of patchset {} failed; not charged yet: the \
                     server builds its base alone to learn whether the base itself is red: {}",
                    next.patchset,
                    first_line(reason)
                ),
                vec![Effect::WakeIntegrator],
            )
        }
        (
            InProgress,
            Event::VerifyFailedOnRedBase {
                base,
                reason,
                cost_cents,
            },
        ) => {
            next.status = Verified;
            next.lost_leases = 0;
            next.patchset += 1;
            next.cost_cents += cost_cents;
            next.amend = true;
            next.feedback = None;
            (
                format!(
                    "not charged: the runner's verification of patchset {} failed on the base \
                     {base}, which fails its own build too ({}); the commit is kept and is \
                     built on the base once the base is green again",
                    next.patchset,
                    first_line(reason)
                ),
                vec![],
            )
        }
        (Verified, Event::BaseGreen) if state.base_check => {
            let reason = state
                .feedback
                .clone()
                .unwrap_or_else(|| "verification failed".to_owned());
            let mut t = fail(state, event, &reason, 0.0, 0, true, policy, now);
            t.state.base_check = false;
            return Ok(t);
        }
        (Verified, Event::BaseRed { base }) if state.base_check => {
            next.base_check = false;
            let held = next.feedback.take().unwrap_or_default();
            (
                format!(
                    "not charged: the base {base} fails its own build too, so the runner's \
                     verification could not pass on it ({}); the commit is kept and is built on \
                     the base once the base is green again",
                    first_line(&held)
                ),
                vec![],
            )
        }
        (Verified, Event::BaseGreen | Event::BaseRed { .. }) => {
            return Err(refuse(": it has no failed verification to settle"));
        }
        (Verified, Event::Approve { by, note }) => {
            if !policy.needs_approval(state) {
                return Err(refuse(
                    ": it needs no approval (neither --require-approval nor task add --approval)",
                ));
            }
            if state.approved {
                return Err(refuse(": it is approved already"));
            }
            next.approved = true;
            let note = note
                .as_deref()
                .map(|n| format!(": {n}"))
                .unwrap_or_default();
            (
                format!("patchset {} approved by {by}{note}", state.patchset),
                vec![Effect::WakeIntegrator],
            )
        }
        (_, Event::Approve { .. }) => {
            return Err(refuse(": only a verified task waits for approval"));
        }
        (Verified, Event::Reject { by, note }) => {
            let said = format!("rejected by {by}: {note}");
            let mut t = fail(state, event, &said, 0.0, 0, true, policy, now);
            t.state.feedback = Some(format!("{REJECTED}{note}"));
            return Ok(t);
        }
        (_, Event::Reject { .. }) => {
            return Err(refuse(": only a verified task can be rejected"));
        }
        (InProgress, Event::LeaseLost { reason }) => {
            let reason = first_line(reason);
            // The work in flight is lost, so the next attempt starts where this one did, at
            // once (no back-off: it was not the task's failure).
            next.lost_leases += 1;
            if policy.max_lost_leases > 0 && next.lost_leases >= policy.max_lost_leases {
                next.status = NeedsHelp;
                (
                    format!(
                        "needs help: its lease was lost {} times in a row (its runners died or \
                         were cut off while working on it): {reason}",
                        next.lost_leases
                    ),
                    vec![],
                )
            } else {
                next.status = Open;
                (
                    format!("lease lost (not counted as a failure): {reason}"),
                    vec![Effect::WakeScheduler],
                )
            }
        }
        (
            InProgress,
            Event::Released {
                reason,
                infrastructure,
            },
        ) => {
            next.status = Open;
            let what = if *infrastructure {
                "the runner could not do the work (infrastructure, not counted)"
            } else {
                "the runner gave the lease back"
            };
            (
                format!("{what}: {}", first_line(reason)),
                vec![Effect::WakeScheduler],
            )
        }
        (InProgress, Event::Verified { cost_cents }) => {
            next.status = Verified;
            next.lost_leases = 0;
            next.patchset += 1;
            next.cost_cents += cost_cents;
            (
                format!("patchset {} verified", next.patchset),
                vec![Effect::WakeIntegrator],
            )
        }
        (Verified, Event::IntegrationFailed { reason }) => {
            return Ok(fail(state, event, reason, 0.0, 0, false, policy, now));
        }
        (Verified, Event::Integrated) => {
            next.status = Done;
            next.feedback = None;
            (
                format!("patchset {} integrated", state.patchset),
                vec![Effect::DependentsUnblocked, Effect::WakeScheduler],
            )
        }
        (Done, Event::Cancel) => {
            return Err(refuse(": its commit is already on the base"));
        }
        (Cancelled, Event::Cancel) => return Err(refuse(" already")),
        (_, Event::Cancel) => {
            next.status = Cancelled;
            next.backoff_until = None;
            let effects = if state.status == InProgress {
                vec![Effect::StopRun]
            } else {
                vec![]
            };
            (format!("cancelled while {}", state.status), effects)
        }
        (Open | NeedsHelp | Cancelled, Event::Retry { note, fresh }) => {
            next.status = Open;
            next.failures = 0;
            next.lost_leases = 0;
            next.backoff_until = None;
            next.cost_at_retry = next.cost_cents;
            if *fresh {
                next.amend = false;
                next.feedback = None;
            }
            if let Some(note) = note {
                next.feedback = Some(match &next.feedback {
                    Some(before) => format!("{GUIDANCE}{note}\n\n{before}"),
                    None => format!("{GUIDANCE}{note}"),
                });
            }
            let mut message = format!("retry requested (was {})", state.status);
            if *fresh {
                message.push_str(", starting fresh from the base");
            }
            if note.is_some() {
                message.push_str(", with a note for the agent");
            }
            (message, vec![Effect::WakeScheduler])
        }
        (Done, Event::Retry { .. }) => {
            return Err(refuse(
                ": its commit is on the base; create a new task to change it further",
            ));
        }
        (InProgress | Verified, Event::Retry { .. }) => {
            return Err(refuse(": it is still being worked on; cancel it first"));
        }
        (Open | InProgress | Verified | NeedsHelp, Event::FoundLanded { commit }) => {
            next.status = Done;
            next.feedback = None;
            next.backoff_until = None;
            let effects = if state.status == InProgress {
                vec![
                    Effect::StopRun,
                    Effect::DependentsUnblocked,
                    Effect::WakeScheduler,
                ]
            } else {
                vec![Effect::DependentsUnblocked, Effect::WakeScheduler]
            };
            (
                format!(
                    "its commit {commit} is on the base already (the server's record of its \
                     landing); recorded done"
                ),
                effects,
            )
        }
        (Open | NeedsHelp, Event::ChildrenDone { done, cancelled }) => {
            next.status = Done;
            next.feedback = None;
            next.backoff_until = None;
            let cancelled = match cancelled {
                0 => String::new(),
                n => format!(", {n} cancelled"),
            };
            (
                format!("its children are done ({done} done{cancelled}), so the epic is done"),
                vec![Effect::DependentsUnblocked, Effect::WakeScheduler],
            )
        }
        (Open, Event::EpicCapReached { epic, spent, cap }) => {
            next.status = NeedsHelp;
            next.backoff_until = None;
            (
                format!(
                    "needs help: its epic {epic} has spent {spent:.0} of its {cap:.0}-cent cap \
                     (raise it with pipelinectl task edit {epic} --max-cost CENTS, then retry)"
                ),
                vec![],
            )
        }
        (InProgress, Event::BecameEpic) => {
            next.status = Open;
            (
                "it has children now, so it is an epic: its run was stopped (not counted) and \
                 its children do the work"
                    .to_owned(),
                vec![Effect::StopRun, Effect::WakeScheduler],
            )
        }
        (InProgress, Event::Recover) => {
            next.status = Open;
            (
                "the server restarted while the task was in progress; its run was abandoned"
                    .to_owned(),
                vec![Effect::WakeScheduler],
            )
        }
        _ => return Err(refuse("")),
    };
    Ok(Transition {
        state: next,
        kind: event.kind(),
        message,
        effects,
    })
}

/// A failure's text in one line, for a history entry (the whole text is in the runs).
fn first_line(s: &str) -> String {
    pipeline_core::lines::one_line_reason(s)
}

/// A failed attempt: count it, then back off, or give up past the retry or cost limit.
#[allow(clippy::too_many_arguments)]
fn fail(
    state: &TaskState,
    event: &Event,
    reason: &str,
    cost_cents: f64,
    accepted_commits: u32,
    amend: bool,
    policy: &Policy,
    now: Millis,
) -> Transition {
    let mut next = state.clone();
    next.failures += 1;
    next.lost_leases = 0;
    next.cost_cents += cost_cents;
    next.patchset += accepted_commits;
    next.feedback = Some(reason.to_owned());
    next.amend = amend;
    let reason = first_line(reason);
    let (message, effects) = if policy.over_retry_limit(&next) {
        next.status = TaskStatus::NeedsHelp;
        next.backoff_until = None;
        (
            format!(
                "needs help after {} failed attempts (limit {}): {reason}",
                next.failures, policy.max_retries
            ),
            vec![],
        )
    } else if policy.over_cost_limit(&next) {
        next.status = TaskStatus::NeedsHelp;
        next.backoff_until = None;
        (
            format!(
                "needs help: cost {:.0} cents reached the limit of {:.0}: {reason}",
                next.budget_spent(),
                policy.cost_cap(&next).unwrap_or_default()
            ),
            vec![],
        )
    } else {
        let secs = policy.backoff_secs(next.failures);
        next.status = TaskStatus::Open;
        next.backoff_until = Some(now.saturating_add(secs as i64 * 1000));
        (
            format!(
                "attempt failed ({}/{}), retrying after {secs} s: {reason}",
                next.failures,
                if policy.max_retries == 0 {
                    "unlimited".to_owned()
                } else {
                    policy.max_retries.to_string()
                }
            ),
            vec![Effect::WakeScheduler],
        )
    };
    Transition {
        state: next,
        kind: event.kind(),
        message,
        effects,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY: Event = Event::Retry {
        note: None,
        fresh: false,
    };

    #[test]
    fn a_failures_history_entry_is_one_line_and_its_feedback_the_whole_output() {
        let s = TaskState {
            status: InProgress,
            ..TaskState::new()
        };
        let output = "tests failed (exit 1): make test:\ncc x.c\nerror: x.c:3: bad\n";
        let t = apply(
            &s,
            &Event::VerifyFailed {
                reason: output.into(),
                cost_cents: 0.0,
            },
            &policy(),
            NOW,
        )
        .expect("applies");
        assert_eq!(
            t.message,
            "attempt failed (1/3), retrying after 20 s: tests failed (exit 1): make test: … \
             error: x.c:3: bad"
        );
        assert_eq!(t.state.feedback.as_deref(), Some(output));
        assert_eq!(
            first_line("conflict with main in a.rs"),
            "conflict with main in a.rs"
        );
        assert_eq!(first_line("\n  agent exited 1  \n"), "agent exited 1");
        // The sandbox's hint comes last; the error it is about is kept beside it.
        assert_eq!(
            first_line(
                "the agent command could not be run (exit 126): a.sh:\nstarting\na.sh: 3: exec: \
                 /opt/b.sh: Permission denied\n(this ran in the sandbox: allow it)"
            ),
            "the agent command could not be run (exit 126): a.sh: … a.sh: 3: exec: /opt/b.sh: \
             Permission denied (this ran in the sandbox: allow it)"
        );
    }

    #[test]
    fn a_retry_with_a_note_and_fresh_starts_over_with_guidance() {
        let s = TaskState {
            status: NeedsHelp,
            patchset: 2,
            failures: 5,
            amend: true,
            feedback: Some("tests failed".into()),
            ..TaskState::new()
        };
        let retry = |note: Option<&str>, fresh| Event::Retry {
            note: note.map(str::to_owned),
            fresh,
        };
        let t = apply(
            &s,
            &retry(Some("use the other parser"), false),
            &policy(),
            NOW,
        )
        .expect("applies");
        assert_eq!(
            t.state.feedback.as_deref(),
            Some("Guidance from a person: use the other parser\n\ntests failed")
        );
        assert!(t.state.amend, "keeps the patchset");
        assert!(
            t.message.ends_with("with a note for the agent"),
            "{}",
            t.message
        );
        let t = apply(&s, &retry(None, true), &policy(), NOW).expect("applies");
        assert_eq!((t.state.feedback, t.state.amend), (None, false));
        assert!(t.message.contains("starting fresh"), "{}", t.message);
    }
    use TaskStatus::*;

    const NOW: Millis = 1_000_000;

    fn policy() -> Policy {
        Policy {
            max_retries: 3,
            max_task_cost_cents: 0.0,
            backoff_base_secs: 10,
            max_lost_leases: 2,
            max_epic_cost_cents: 0.0,
            require_approval: false,
        }
    }

    fn state(status: TaskStatus) -> TaskState {
        TaskState {
            status,
            ..TaskState::new()
        }
    }

    fn leased() -> Event {
        Event::Leased { deps_pending: 0 }
    }

    fn dev_failed() -> Event {
        Event::DevFailed {
            reason: "agent failed".into(),
            cost_cents: 5.0,
        }
    }

    /// Applies `event` and checks the resulting status and effects.
    fn check(from: &TaskState, event: Event, to: TaskStatus, effects: &[Effect]) -> TaskState {
        let t = apply(from, &event, &policy(), NOW)
            .unwrap_or_else(|r| panic!("{event:?} from {:?} refused: {r}", from.status));
        assert_eq!(t.state.status, to, "{event:?} from {:?}", from.status);
        assert_eq!(t.effects, effects, "{event:?} from {:?}", from.status);
        assert_eq!(t.kind, event.kind());
        t.state
    }

    fn check_refused(from: TaskStatus, event: Event, says: &str) {
        let err = apply(&state(from), &event, &policy(), NOW).expect_err("refused");
        assert!(err.to_string().contains(says), "{err}");
    }

    #[test]
    fn the_remaining_budget_counts_from_the_last_retry_and_never_goes_below_zero() {
        let capped = Policy {
            max_task_cost_cents: 100.0,
            ..policy()
        };
        let spent = |cost_cents, cost_at_retry| TaskState {
            cost_cents,
            cost_at_retry,
            ..state(Open)
        };
        assert_eq!(policy().remaining_budget(&spent(30.0, 0.0)), None, "no cap");
        assert_eq!(capped.remaining_budget(&spent(0.0, 0.0)), Some(100.0));
        assert_eq!(capped.remaining_budget(&spent(30.0, 0.0)), Some(70.0));
        assert_eq!(capped.remaining_budget(&spent(130.0, 100.0)), Some(70.0));
        assert_eq!(capped.remaining_budget(&spent(150.0, 0.0)), Some(0.0));
    }

    #[test]
    fn happy_path_open_to_done() {
        let s = check(&state(Open), leased(), InProgress, &[]);
        let s = check(
            &s,
            Event::Verified { cost_cents: 12.5 },
            Verified,
            &[Effect::WakeIntegrator],
        );
        assert_eq!((s.patchset, s.cost_cents, s.failures), (1, 12.5, 0));
        let s = check(
            &s,
            Event::Integrated,
            Done,
            &[Effect::DependentsUnblocked, Effect::WakeScheduler],
        );
        assert_eq!(s.patchset, 1);
    }

    #[test]
    fn dev_failure_backs_off_and_counts() {
        let s = check(
            &state(InProgress),
            dev_failed(),
            Open,
            &[Effect::WakeScheduler],
        );
        assert_eq!(s.failures, 1);
        assert_eq!(s.cost_cents, 5.0);
        assert_eq!(s.backoff_until, Some(NOW + 20_000), "10 * 2^1 seconds");
        assert_eq!(s.patchset, 0, "no commit was accepted");
        assert!(!s.amend, "a dev failure starts fresh");
        assert_eq!(s.feedback.as_deref(), Some("agent failed"));
    }

    #[test]
    fn verify_failure_keeps_the_commit_for_amending() {
        let s = check(
            &state(InProgress),
            Event::VerifyFailed {
                reason: "tests failed".into(),
                cost_cents: 1.0,
            },
            Open,
            &[Effect::WakeScheduler],
        );
        assert_eq!((s.patchset, s.failures), (1, 1));
        assert!(s.amend);
        assert_eq!(s.feedback.as_deref(), Some("tests failed"));
    }

    fn lost() -> Event {
        Event::LeaseLost {
            reason: "lease expired".into(),
        }
    }

    #[test]
    fn a_lost_lease_is_not_charged_but_a_run_of_them_stops_the_task() {
        let s = check(&state(InProgress), lost(), Open, &[Effect::WakeScheduler]);
        assert_eq!((s.failures, s.lost_leases, s.backoff_until), (0, 1, None));
        // A result in between starts the count again.
        let s = check(&s, leased(), InProgress, &[]);
        let s = check(&s, dev_failed(), Open, &[Effect::WakeScheduler]);
        assert_eq!((s.failures, s.lost_leases), (1, 0));
        let mut s = TaskState {
            backoff_until: None,
            ..s
        };
        for _ in 0..2 {
            s = check(&s, leased(), InProgress, &[]);
            s = apply(&s, &lost(), &policy(), NOW).expect("applies").state;
        }
        assert_eq!(s.status, NeedsHelp, "two in a row with max_lost_leases 2");
        assert_eq!(s.failures, 1, "still only the task's own failure counted");
        let s = check(&s, RETRY, Open, &[Effect::WakeScheduler]);
        assert_eq!(s.lost_leases, 0);
        let unlimited = Policy {
            max_lost_leases: 0,
            ..policy()
        };
        let s = TaskState {
            lost_leases: 1_000,
            ..state(InProgress)
        };
        assert_eq!(
            apply(&s, &lost(), &unlimited, NOW)
                .expect("applies")
                .state
                .status,
            Open
        );
    }

    #[test]
    fn a_released_lease_does_not_count() {
        for infrastructure in [false, true] {
            let t = apply(
                &state(InProgress),
                &Event::Released {
                    reason: "agentd: not found".into(),
                    infrastructure,
                },
                &policy(),
                NOW,
            )
            .expect("applies");
            assert_eq!(t.state.status, Open);
            assert_eq!((t.state.failures, t.state.backoff_until), (0, None));
            assert_eq!(t.effects, [Effect::WakeScheduler]);
            assert_eq!(
                t.message.contains("infrastructure"),
                infrastructure,
                "{}",
                t.message
            );
        }
        check_refused(
            Open,
            Event::Released {
                reason: "x".into(),
                infrastructure: false,
            },
            "cannot end the lease",
        );
    }

    #[test]
    fn a_verify_failure_on_an_unchecked_base_waits_uncharged_until_the_base_is_built() {
        let held = check(
            &state(InProgress),
            Event::VerifyFailedOnUncheckedBase {
                reason: "tests failed".into(),
                cost_cents: 3.0,
            },
            Verified,
            &[Effect::WakeIntegrator],
        );
        assert_eq!(
            (held.failures, held.patchset, held.cost_cents),
            (0, 1, 3.0),
            "the commit and its cost are kept, nothing is charged yet"
        );
        assert!(held.base_check && held.amend);
        assert_eq!(held.feedback.as_deref(), Some("tests failed"));
        assert!(
            !leasable(&held, 0, &policy(), NOW),
            "it is not leased while it waits"
        );
        // The base builds green: the failure was the task's own, charged as a verify failure.
        let charged = check(&held, Event::BaseGreen, Open, &[Effect::WakeScheduler]);
        assert_eq!((charged.failures, charged.patchset), (1, 1));
        assert!(!charged.base_check && charged.amend);
        assert_eq!(charged.backoff_until, Some(NOW + 20_000));
        assert_eq!(charged.feedback.as_deref(), Some("tests failed"));
        // The base is red: nobody is charged; the commit waits, verified, for a green base.
        let red = Event::BaseRed {
            base: "c0ffee".into(),
        };
        let t = apply(&held, &red, &policy(), NOW).expect("applies");
        assert_eq!(t.state.status, Verified);
        assert_eq!((t.state.failures, t.state.base_check), (0, false));
        assert_eq!(t.state.feedback, None, "the failure was not the agent's");
        assert!(
            t.message.contains("not charged") && t.message.contains("c0ffee"),
            "{}",
            t.message
        );
        assert_eq!(t.kind, EventKind::BaseRed);
        // Only a held failure is settled, and leaving Verified ends the hold.
        check_refused(
            Verified,
            Event::BaseGreen,
            "no failed verification to settle",
        );
        check_refused(Open, red, "cannot settle the base check");
        let cancelled = check(&held, Event::Cancel, Cancelled, &[]);
        assert!(!cancelled.base_check);
    }

    #[test]
    fn a_verify_failure_on_a_red_base_charges_no_one_and_keeps_the_commit() {
        let t = apply(
            &state(InProgress),
            &Event::VerifyFailedOnRedBase {
                base: "c0ffee".into(),
                reason: "tests failed".into(),
                cost_cents: 2.0,
            },
            &policy(),
            NOW,
        )
        .expect("applies");
        assert_eq!(t.state.status, Verified);
        assert_eq!(
            (t.state.failures, t.state.patchset, t.state.cost_cents),
            (0, 1, 2.0)
        );
        assert!(!t.state.base_check);
        assert_eq!(t.state.backoff_until, None);
        assert!(t.message.starts_with("not charged"), "{}", t.message);
    }

    #[test]
    fn an_approval_gate_holds_a_verified_task_until_a_person_approves_or_rejects_it() {
        let gated = Policy {
            require_approval: true,
            ..policy()
        };
        let verified = TaskState {
            patchset: 1,
            ..state(Verified)
        };
        assert!(gated.awaits_approval(&verified));
        assert_eq!(gated.approval(&verified), Some("required"));
        assert!(!policy().awaits_approval(&verified), "no gate, no wait");
        assert_eq!(policy().approval(&verified), None);
        let own = TaskState {
            approval_required: true,
            ..verified.clone()
        };
        assert!(policy().awaits_approval(&own), "the task's own --approval");
        let approve = |note: Option<&str>| Event::Approve {
            by: "alice (admin)".into(),
            note: note.map(str::to_owned),
        };
        let t = apply(&verified, &approve(Some("looks right")), &gated, NOW).expect("applies");
        assert_eq!(t.state.status, Verified);
        assert!(t.state.approved && !gated.awaits_approval(&t.state));
        assert_eq!(gated.approval(&t.state), Some("approved"));
        assert_eq!(t.effects, [Effect::WakeIntegrator]);
        assert_eq!(
            t.message,
            "patchset 1 approved by alice (admin): looks right"
        );
        let approved = t.state;
        let refused =
            |s: &TaskState, e: Event, p: &Policy| apply(s, &e, p, NOW).expect_err("refused");
        assert!(
            refused(&approved, approve(None), &gated)
                .to_string()
                .contains("approved already")
        );
        assert!(
            refused(&verified, approve(None), &policy())
                .to_string()
                .contains("needs no approval")
        );
        assert!(
            refused(&state(Open), approve(None), &gated)
                .to_string()
                .contains("cannot approve a task that is open: only a verified task waits")
        );
        // Landing keeps the approval; a rejection or any way back to Open drops it.
        let done = apply(&approved, &Event::Integrated, &gated, NOW).expect("lands");
        assert!(done.state.approved);
        let reject = Event::Reject {
            by: "bob (admin)".into(),
            note: "use the other parser".into(),
        };
        let t = apply(&approved, &reject, &gated, NOW).expect("applies");
        assert_eq!(t.state.status, Open);
        assert_eq!(
            (
                t.state.failures,
                t.state.patchset,
                t.state.amend,
                t.state.approved
            ),
            (1, 1, true, false),
            "charged; the agent amends the commit"
        );
        assert_eq!(
            t.state.feedback.as_deref(),
            Some("Rejected by a person: use the other parser")
        );
        assert!(
            t.message
                .contains("rejected by bob (admin): use the other parser"),
            "{}",
            t.message
        );
        assert_eq!(t.kind, EventKind::Rejected);
        assert!(
            refused(&state(Open), reject, &gated)
                .to_string()
                .contains("only a verified task can be rejected")
        );
        let failed = apply(
            &approved,
            &Event::IntegrationFailed {
                reason: "conflict".into(),
            },
            &gated,
            NOW,
        )
        .expect("applies");
        assert!(
            !failed.state.approved,
            "a new patchset needs a new approval"
        );
    }

    #[test]
    fn integration_failure_counts_and_starts_fresh() {
        let verified = TaskState {
            patchset: 2,
            amend: true,
            ..state(Verified)
        };
        let s = check(
            &verified,
            Event::IntegrationFailed {
                reason: "conflict in a.txt".into(),
            },
            Open,
            &[Effect::WakeScheduler],
        );
        assert_eq!((s.failures, s.patchset), (1, 2));
        assert!(!s.amend, "the next attempt starts from the current base");
    }

    #[test]
    fn every_kind_of_failure_counts_towards_needs_help() {
        let failures = [
            dev_failed(),
            Event::VerifyFailed {
                reason: "red".into(),
                cost_cents: 0.0,
            },
            Event::DevFailed {
                reason: "again".into(),
                cost_cents: 0.0,
            },
        ];
        let mut s = state(Open);
        for (i, failure) in failures.into_iter().enumerate() {
            s.backoff_until = None;
            s = check(&s, leased(), InProgress, &[]);
            let expect = if i == 2 { NeedsHelp } else { Open };
            let effects: &[Effect] = if i == 2 {
                &[]
            } else {
                &[Effect::WakeScheduler]
            };
            s = check(&s, failure, expect, effects);
        }
        assert_eq!(s.failures, 3);
        assert_eq!(s.backoff_until, None);
    }

    #[test]
    fn zero_max_retries_means_unlimited() {
        let p = Policy {
            max_retries: 0,
            ..policy()
        };
        let mut s = state(InProgress);
        s.failures = 1_000;
        let t = apply(&s, &dev_failed(), &p, NOW).expect("applies");
        assert_eq!(t.state.status, Open);
        assert!(t.message.contains("/unlimited"), "{}", t.message);
    }

    #[test]
    fn cost_cap_sends_to_needs_help() {
        let p = Policy {
            max_task_cost_cents: 10.0,
            ..policy()
        };
        let s = TaskState {
            cost_cents: 6.0,
            ..state(InProgress)
        };
        let t = apply(&s, &dev_failed(), &p, NOW).expect("applies");
        assert_eq!(t.state.status, NeedsHelp);
        assert!(t.message.contains("cost 11 cents"), "{}", t.message);
        // A success over the cap is still a success.
        let t = apply(&s, &Event::Verified { cost_cents: 50.0 }, &p, NOW).expect("applies");
        assert_eq!(t.state.status, Verified);
        // After a retry the budget starts again.
        let mut over = t.state.clone();
        over.status = NeedsHelp;
        let t = apply(&over, &RETRY, &p, NOW).expect("applies");
        assert!(leasable(&t.state, 0, &p, NOW));
    }

    #[test]
    fn an_epic_is_done_with_its_children_and_caps_them_together() {
        let p = policy();
        let done = Event::ChildrenDone {
            done: 2,
            cancelled: 1,
        };
        for from in [Open, NeedsHelp] {
            let t = apply(&state(from), &done, &p, NOW).expect("applies");
            assert_eq!(t.state.status, Done);
            assert!(t.effects.contains(&Effect::DependentsUnblocked));
            assert!(t.message.contains("2 done, 1 cancelled"), "{}", t.message);
        }
        for from in [InProgress, Verified, Done, Cancelled] {
            assert!(apply(&state(from), &done, &p, NOW).is_err(), "{from}");
        }
        // Its cap: its own, else the server's; what is left never goes below 0.
        let children = Children {
            total: 3,
            cost_cents: 80.0,
            ..Children::default()
        };
        assert_eq!(p.epic_remaining(&state(Open), &children), None);
        let server = Policy {
            max_epic_cost_cents: 100.0,
            ..policy()
        };
        assert_eq!(server.epic_remaining(&state(Open), &children), Some(20.0));
        let own = TaskState {
            max_cost_cents: Some(50.0),
            ..state(Open)
        };
        assert_eq!(server.epic_remaining(&own, &children), Some(0.0));
        let capped = Event::EpicCapReached {
            epic: "e-1".into(),
            spent: 80.0,
            cap: 50.0,
        };
        let t = apply(&state(Open), &capped, &p, NOW).expect("applies");
        assert_eq!(t.state.status, NeedsHelp);
        assert_eq!(t.state.failures, 0, "not a failure of its own");
        assert!(
            t.message.contains("e-1 has spent 80 of its 50-cent cap"),
            "{}",
            t.message
        );
        // A task that gets children while an agent works on it stops, uncounted.
        let t = apply(&state(InProgress), &Event::BecameEpic, &p, NOW).expect("applies");
        assert_eq!((t.state.status, t.state.failures), (Open, 0));
        assert!(t.effects.contains(&Effect::StopRun));
        // An edit for the next attempt may reach a task under way, never a done one.
        assert!(editable(InProgress, false).is_err());
        assert!(editable(InProgress, true).is_ok());
        assert!(editable(Verified, true).is_ok());
        assert!(editable(Done, true).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_ten_minutes() {
        let p = policy();
        assert_eq!(
            (1..=7).map(|n| p.backoff_secs(n)).collect::<Vec<_>>(),
            [20, 40, 80, 160, 320, 600, 600]
        );
        assert_eq!(p.backoff_secs(0), 10);
        assert_eq!(p.backoff_secs(200), 600, "no overflow");
        let none = Policy {
            backoff_base_secs: 0,
            ..p
        };
        assert_eq!(none.backoff_secs(5), 0);
    }

    #[test]
    fn eligibility_rules() {
        let p = policy();
        let open = state(Open);
        assert!(leasable(&open, 0, &p, NOW));
        assert!(!leasable(&open, 1, &p, NOW), "dependencies not done");
        let backing_off = TaskState {
            backoff_until: Some(NOW + 1),
            ..open.clone()
        };
        assert!(!leasable(&backing_off, 0, &p, NOW));
        assert!(leasable(&backing_off, 0, &p, NOW + 1), "back-off over");
        let spent = TaskState {
            failures: 3,
            ..open.clone()
        };
        assert!(!leasable(&spent, 0, &p, NOW));
        for status in [InProgress, Verified, Done, NeedsHelp, Cancelled] {
            assert!(!leasable(&state(status), 0, &p, NOW), "{status}");
        }
        let err = apply(&backing_off, &leased(), &p, NOW).expect_err("in back-off");
        assert!(err.to_string().contains("back-off"));
    }

    #[test]
    fn waiting_for_says_what_holds_a_task() {
        let cap = Capacity {
            connected: 1,
            taking: 1,
            free_slots: 1,
            slots: 1,
        };
        let deps = [
            ("t-1".to_owned(), Done),
            ("t-2".to_owned(), Open),
            ("t-3".to_owned(), Cancelled),
        ];
        let w = waiting_for(
            "t-9",
            &state(Open),
            &deps,
            &policy(),
            NOW,
            cap,
            Routing::default(),
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(w[0], "depends on t-2, which is open");
        assert!(w[1].contains("t-3, which is cancelled"), "{w:?}");
        let backing_off = TaskState {
            backoff_until: Some(NOW + 1500),
            failures: 1,
            ..state(Open)
        };
        assert_eq!(
            waiting_for(
                "t-9",
                &backing_off,
                &[],
                &policy(),
                NOW,
                cap,
                Routing::default()
            ),
            ["in back-off for 2 s more after 1 failed attempt"]
        );
        assert!(
            waiting_for(
                "t-9",
                &state(Open),
                &[],
                &policy(),
                NOW,
                cap,
                Routing::default()
            )
            .is_empty()
        );
        let none = Capacity {
            connected: 0,
            taking: 0,
            free_slots: 0,
            slots: 0,
        };
        assert_eq!(
            waiting_for(
                "t-9",
                &state(Open),
                &[],
                &policy(),
                NOW,
                none,
                Routing::default()
            ),
            ["no runner is connected"]
        );
        let busy = Capacity {
            free_slots: 0,
            ..cap
        };
        assert_eq!(
            waiting_for(
                "t-9",
                &state(Open),
                &[],
                &policy(),
                NOW,
                busy,
                Routing::default()
            ),
            ["every slot of the 1 runner is busy"]
        );
        let gpu = ["gpu".to_owned(), "os=linux".to_owned()];
        let unmet = Routing {
            resting: &[],
            requires: &gpu,
            with_labels: 0,
            fitting: 0,
            scoped: false,
        };
        assert_eq!(
            waiting_for("t-9", &state(Open), &[], &policy(), NOW, cap, unmet),
            [
                "no connected runner has the labels it requires (gpu, os=linux); start one with \
              --label for each"
            ]
        );
        let met = Routing {
            with_labels: 1,
            fitting: 1,
            ..unmet
        };
        assert!(waiting_for("t-9", &state(Open), &[], &policy(), NOW, cap, met).is_empty());
        let elsewhere = Routing {
            resting: &[],
            requires: &[],
            with_labels: 1,
            fitting: 0,
            scoped: true,
        };
        assert_eq!(
            waiting_for("t-9", &state(Open), &[], &policy(), NOW, cap, elsewhere),
            [
                "every connected runner that could take it is limited to other work \
              (--only-parent, --only-task)"
            ]
        );
        // A runner that would take it but takes no work is named, with why.
        let resting = [
            Resting {
                name: "gpu-1".to_owned(),
                labels: vec!["gpu".to_owned(), "os=linux".to_owned()],
                unhealthy: Some("agent not logged in".to_owned()),
            },
            Resting {
                name: "cpu-1".to_owned(),
                labels: vec![],
                unhealthy: None,
            },
        ];
        let sick = Routing {
            resting: &resting,
            ..unmet
        };
        assert_eq!(
            waiting_for("t-9", &state(Open), &[], &policy(), NOW, cap, sick),
            [
                "the one connected runner with the labels it requires (gpu, os=linux) takes no \
                 work: gpu-1 is unhealthy: agent not logged in (fix that, then restart the \
                 runner)"
            ]
        );
        let none_taking = Capacity {
            taking: 0,
            free_slots: 0,
            slots: 0,
            connected: 2,
        };
        let anything = Routing {
            resting: &resting,
            ..Routing::default()
        };
        assert_eq!(
            waiting_for(
                "t-9",
                &state(Open),
                &[],
                &policy(),
                NOW,
                none_taking,
                anything
            ),
            [
                "no connected runner takes work: gpu-1 is unhealthy: agent not logged in (fix \
                 that, then restart the runner); cpu-1 is draining"
            ]
        );
        let spent = TaskState {
            failures: 3,
            ..state(NeedsHelp)
        };
        let w = waiting_for("t-9", &spent, &[], &policy(), NOW, cap, Routing::default());
        assert!(w[0].starts_with("retry limit reached: 3"), "{w:?}");
        assert!(w[0].contains("pipelinectl task retry t-9"), "{w:?}");
        for s in [InProgress, Done, Cancelled] {
            assert!(
                waiting_for(
                    "t-9",
                    &state(s),
                    &deps,
                    &policy(),
                    NOW,
                    none,
                    Routing::default()
                )
                .is_empty()
            );
        }
        let w = waiting_for(
            "t-9",
            &state(Verified),
            &deps,
            &policy(),
            NOW,
            cap,
            Routing::default(),
        );
        assert_eq!(w[0], "lands once done: it depends on t-2, which is open");
    }

    #[test]
    fn pauses_hold_open_and_verified_tasks() {
        let leases = |r| Pauses {
            leases: Some(r),
            ..Pauses::default()
        };
        assert_eq!(
            held_by_pauses(Open, leases("release freeze")),
            ["the queue is paused, so no new leases: release freeze (pipelinectl queue resume)"]
        );
        assert_eq!(
            held_by_pauses(Open, leases("")),
            ["the queue is paused, so no new leases (pipelinectl queue resume)"]
        );
        assert!(held_by_pauses(Verified, leases("x")).is_empty());
        let landing = Pauses {
            landing: Some("release"),
            ..Pauses::default()
        };
        assert_eq!(
            held_by_pauses(Verified, landing),
            ["landing is paused: release (pipelinectl queue resume)"]
        );
        assert!(
            held_by_pauses(Open, landing).is_empty(),
            "a landing-only hold lets leases go on"
        );
        let red = Pauses {
            red_base: Some("the base main at c0ffee fails its own build"),
            ..Pauses::default()
        };
        assert_eq!(
            held_by_pauses(Open, red),
            ["no new leases while the base is red: the base main at c0ffee fails its own build"]
        );
        assert_eq!(
            held_by_pauses(Verified, red),
            ["landing is paused: the base main at c0ffee fails its own build"]
        );
        let all = Pauses {
            leases: Some("x"),
            landing: Some("y"),
            red_base: Some("z"),
        };
        assert_eq!(held_by_pauses(Open, all).len(), 2);
        assert!(held_by_pauses(InProgress, all).is_empty());
    }

    #[test]
    fn lease_order_is_priority_then_age() {
        let mut tasks = vec![(2, 5), (0, 9), (2, 1), (4, 0), (0, 3)];
        tasks.sort_by(|a, b| lease_order(*a, *b));
        assert_eq!(tasks, [(0, 3), (0, 9), (2, 1), (2, 5), (4, 0)]);
    }

    #[test]
    fn cancel_from_every_live_state() {
        for from in [Open, Verified, NeedsHelp] {
            check(&state(from), Event::Cancel, Cancelled, &[]);
        }
        check(
            &state(InProgress),
            Event::Cancel,
            Cancelled,
            &[Effect::StopRun],
        );
        let backing_off = TaskState {
            backoff_until: Some(NOW + 5),
            ..state(Open)
        };
        assert_eq!(
            check(&backing_off, Event::Cancel, Cancelled, &[]).backoff_until,
            None
        );
        check_refused(Done, Event::Cancel, "already on the base");
        check_refused(Cancelled, Event::Cancel, "cancelled already");
    }

    #[test]
    fn retry_clears_the_count() {
        for from in [Open, NeedsHelp, Cancelled] {
            let s = TaskState {
                failures: 3,
                backoff_until: Some(NOW + 100),
                ..state(from)
            };
            let s = check(&s, RETRY, Open, &[Effect::WakeScheduler]);
            assert_eq!((s.failures, s.backoff_until), (0, None));
            assert!(leasable(&s, 0, &policy(), NOW));
        }
        check_refused(Done, RETRY, "create a new task");
        check_refused(InProgress, RETRY, "cancel it first");
        check_refused(Verified, RETRY, "cancel it first");
    }

    #[test]
    fn a_task_found_landed_is_done_from_any_unfinished_state() {
        let landed = || Event::FoundLanded {
            commit: "abc".into(),
        };
        for from in [Open, Verified, NeedsHelp] {
            check(
                &state(from),
                landed(),
                Done,
                &[Effect::DependentsUnblocked, Effect::WakeScheduler],
            );
        }
        check(
            &state(InProgress),
            landed(),
            Done,
            &[
                Effect::StopRun,
                Effect::DependentsUnblocked,
                Effect::WakeScheduler,
            ],
        );
        check_refused(Done, landed(), "record the landing");
        check_refused(Cancelled, landed(), "record the landing");
    }

    #[test]
    fn recovery_reopens_in_progress_without_counting() {
        let s = check(
            &state(InProgress),
            Event::Recover,
            Open,
            &[Effect::WakeScheduler],
        );
        assert_eq!(s.failures, 0);
        for from in [Open, Verified, Done, NeedsHelp, Cancelled] {
            check_refused(from, Event::Recover, "cannot recover");
        }
    }

    #[test]
    fn results_only_apply_to_their_phase() {
        for from in [Open, Verified, Done, NeedsHelp, Cancelled] {
            check_refused(from, dev_failed(), "cannot record a dev result");
            check_refused(from, Event::Verified { cost_cents: 0.0 }, "dev result");
            check_refused(
                from,
                Event::LeaseLost { reason: "x".into() },
                "cannot end the lease",
            );
        }
        for from in [Open, InProgress, Done, NeedsHelp, Cancelled] {
            check_refused(from, Event::Integrated, "cannot record an integration");
            check_refused(
                from,
                Event::IntegrationFailed { reason: "x".into() },
                "integration",
            );
        }
        for from in [InProgress, Verified, Done, NeedsHelp, Cancelled] {
            check_refused(from, leased(), "cannot lease");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn event() -> impl Strategy<Value = Event> {
            prop_oneof![
                Just(leased()),
                (0u8..50).prop_map(|c| Event::DevFailed {
                    reason: "dev".into(),
                    cost_cents: f64::from(c)
                }),
                (0u8..50).prop_map(|c| Event::VerifyFailed {
                    reason: "verify".into(),
                    cost_cents: f64::from(c)
                }),
                (0u8..50).prop_map(|c| Event::Verified {
                    cost_cents: f64::from(c)
                }),
                Just(Event::LeaseLost {
                    reason: "lapsed".into()
                }),
                Just(Event::IntegrationFailed {
                    reason: "conflict".into()
                }),
                Just(Event::Integrated),
                any::<bool>().prop_map(|infrastructure| Event::Released {
                    reason: "draining".into(),
                    infrastructure,
                }),
                Just(Event::Cancel),
                Just(RETRY),
                Just(Event::Recover),
                Just(Event::FoundLanded { commit: "c".into() }),
                (0u8..50).prop_map(|c| Event::VerifyFailedOnUncheckedBase {
                    reason: "verify".into(),
                    cost_cents: f64::from(c)
                }),
                (0u8..50).prop_map(|c| Event::VerifyFailedOnRedBase {
                    base: "c0ffee".into(),
                    reason: "verify".into(),
                    cost_cents: f64::from(c)
                }),
                Just(Event::BaseGreen),
                Just(Event::BaseRed {
                    base: "c0ffee".into()
                }),
                Just(Event::Approve {
                    by: "admin".into(),
                    note: None
                }),
                Just(Event::Reject {
                    by: "admin".into(),
                    note: "no".into()
                }),
            ]
        }

        fn policies() -> impl Strategy<Value = Policy> {
            (
                0u32..6,
                prop_oneof![Just(0.0), 1.0..200.0f64],
                0u64..30,
                0u32..4,
            )
                .prop_map(
                    |(max_retries, max_task_cost_cents, backoff_base_secs, max_lost_leases)| {
                        Policy {
                            max_retries,
                            max_task_cost_cents,
                            backoff_base_secs,
                            max_lost_leases,
                            max_epic_cost_cents: 0.0,
                            require_approval: max_retries % 2 == 1,
                        }
                    },
                )
        }

        proptest! {
            #[test]
            fn invariants_hold_over_any_history(
                policy in policies(),
                steps in prop::collection::vec((event(), 0i64..700_000), 1..60),
            ) {
                let mut s = TaskState::new();
                let mut now = 0;
                for (event, dt) in steps {
                    now += dt;
                    let before = s.clone();
                    if let Ok(t) = apply(&before, &event, &policy, now) {
                            if before.status == Done {
                                prop_assert!(false, "a done task changed: {event:?}");
                            }
                            if t.state.status == NeedsHelp && before.status != NeedsHelp {
                                prop_assert!(
                                    matches!(event, Event::DevFailed{..} | Event::VerifyFailed{..}
                                        | Event::LeaseLost{..} | Event::IntegrationFailed{..}
                                        | Event::BaseGreen | Event::Reject{..}),
                                    "only a failure leads to NeedsHelp"
                                );
                            }
                            if matches!(event, Event::Retry { .. }) {
                                prop_assert_eq!(t.state.failures, 0);
                            }
                            if matches!(event, Event::LeaseLost { .. } | Event::Released { .. }) {
                                prop_assert_eq!(t.state.failures, before.failures,
                                    "a lost or released lease is never charged");
                            }
                            if matches!(event, Event::VerifyFailedOnUncheckedBase { .. }
                                | Event::VerifyFailedOnRedBase { .. } | Event::BaseRed { .. }) {
                                prop_assert_eq!(t.state.failures, before.failures,
                                    "a failure on a red or unchecked base is not charged");
                            }
                            if matches!(event, Event::BaseGreen | Event::BaseRed { .. }) {
                                prop_assert!(before.base_check, "only a held failure is settled");
                            }
                            prop_assert!(t.state.patchset >= before.patchset, "patchset never decreases");
                            prop_assert!(t.state.cost_cents >= before.cost_cents, "cost never decreases");
                            s = t.state;
                    }
                    // Only a Verified task waits on a base check, and only a Verified or Done
                    // one is approved.
                    if s.base_check {
                        prop_assert_eq!(s.status, Verified);
                    }
                    if s.approved {
                        prop_assert!(matches!(s.status, Verified | Done), "{:?}", s.status);
                    }
                    // No task is leasable unless it is Open.
                    if leasable(&s, 0, &policy, now) {
                        prop_assert_eq!(s.status, Open);
                    }
                    // Back-off only ever applies to an Open task.
                    if s.backoff_until.is_some() {
                        prop_assert_eq!(s.status, Open);
                    }
                    // Past the retry limit a task is never Open and leasable.
                    if policy.max_retries > 0 && s.failures >= policy.max_retries {
                        prop_assert!(!leasable(&s, 0, &policy, now));
                    }
                    // A back-off never exceeds ten minutes.
                    if let Some(until) = s.backoff_until {
                        prop_assert!(until - now <= 600_000);
                    }
                }
            }
        }
    }
}
