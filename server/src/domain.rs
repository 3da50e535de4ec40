//! Domain types shared by the coordinator, the store and the gRPC edge: validated identifiers,
//! task and run records, and the small enums of the lifecycle.
//!
//! Every constructor here validates. A [`TaskId`] that exists is safe to hand to git (as a ref
//! component) and to a path; nothing else in the server re-checks it.

use std::fmt;

pub use pipeline_core::ids::{CommitId, LeaseRef, Millis, TaskId, TreeId, quote_for_message};

use crate::error::Error;

/// Priorities run from 0 (highest) to this value (lowest).
pub const LOWEST_PRIORITY: u8 = 4;
/// The priority of a task created without one (as in the seed, P2).
pub const DEFAULT_PRIORITY: u8 = 2;
/// Titles longer than this are refused.
pub const MAX_TITLE_BYTES: usize = 1024;
/// Descriptions longer than this are refused.
pub const MAX_DESCRIPTION_BYTES: usize = 1024 * 1024;

/// Where a task is in its life; see the lifecycle in `CONTRACT.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskStatus {
    Open,
    InProgress,
    Verified,
    Done,
    NeedsHelp,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Open,
        TaskStatus::InProgress,
        TaskStatus::Verified,
        TaskStatus::Done,
        TaskStatus::NeedsHelp,
        TaskStatus::Cancelled,
    ];

    /// The lowercase word used in the database, in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Open => "open",
            TaskStatus::InProgress => "in_progress",
            TaskStatus::Verified => "verified",
            TaskStatus::Done => "done",
            TaskStatus::NeedsHelp => "needs_help",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The phase a run belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Dev,
    Verify,
    Integrate,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Dev => "dev",
            Phase::Verify => "verify",
            Phase::Integrate => "integrate",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [Phase::Dev, Phase::Verify, Phase::Integrate]
            .into_iter()
            .find(|p| p.as_str() == raw)
    }
}

/// Where a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// The runner's own lifecycle lines.
    Runner,
    /// The server's lines (integration).
    Server,
    /// The agent's output as received, where the runner shows it rendered on stdout (the
    /// JSON events of claude and codex).
    Raw,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Runner => "runner",
            LogStream::Server => "server",
            LogStream::Raw => "raw",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [
            Self::Stdout,
            Self::Stderr,
            Self::Runner,
            Self::Server,
            Self::Raw,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }
}

/// One line of a run's log.
#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    /// Per run, from 1; a gap means lines were cut.
    pub seq: u64,
    pub at: Millis,
    pub stream: LogStream,
    pub phase: Phase,
    pub text: String,
}

/// The outcome of a run so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Success,
    Failure,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Success => "success",
            RunStatus::Failure => "failure",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [RunStatus::Running, RunStatus::Success, RunStatus::Failure]
            .into_iter()
            .find(|s| s.as_str() == raw)
    }
}

/// Whose fault a failed run was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The task's own (its agent's work, its build): counted towards its retry limit.
    Task,
    /// Not the task's (a missing program, a git or disk error, a lost runner or connection):
    /// the lease went back uncharged.
    Infrastructure,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Task => "task",
            FailureKind::Infrastructure => "infrastructure",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Task, Self::Infrastructure]
            .into_iter()
            .find(|k| k.as_str() == raw)
    }
}

/// What a task history entry records, as the commit path decides it: one word in the
/// database and on the wire ([`EventKind::as_str`]), typed everywhere between.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Created,
    Leased,
    DevFailed,
    VerifyFailed,
    /// A runner's verification failed on a base not yet checked: the server builds the base.
    CheckingBase,
    BaseRed,
    Verified,
    LeaseLost,
    Released,
    IntegrationFailed,
    Integrated,
    Cancelled,
    Retried,
    Recovered,
    FoundLanded,
    ChildrenDone,
    EpicCap,
    BecameEpic,
    Approved,
    Rejected,
    DependenciesAdded,
    Edited,
    Paused,
    Resumed,
}

impl EventKind {
    /// Every kind, for [`EventKind::parse`].
    const ALL: [EventKind; 24] = [
        Self::Created,
        Self::Leased,
        Self::DevFailed,
        Self::VerifyFailed,
        Self::CheckingBase,
        Self::BaseRed,
        Self::Verified,
        Self::LeaseLost,
        Self::Released,
        Self::IntegrationFailed,
        Self::Integrated,
        Self::Cancelled,
        Self::Retried,
        Self::Recovered,
        Self::FoundLanded,
        Self::ChildrenDone,
        Self::EpicCap,
        Self::BecameEpic,
        Self::Approved,
        Self::Rejected,
        Self::DependenciesAdded,
        Self::Edited,
        Self::Paused,
        Self::Resumed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Leased => "leased",
            Self::DevFailed => "dev_failed",
            Self::VerifyFailed => "verify_failed",
            Self::CheckingBase => "checking_base",
            Self::BaseRed => "base_red",
            Self::Verified => "verified",
            Self::LeaseLost => "lease_lost",
            Self::Released => "released",
            Self::IntegrationFailed => "integration_failed",
            Self::Integrated => "integrated",
            Self::Cancelled => "cancelled",
            Self::Retried => "retried",
            Self::Recovered => "recovered",
            Self::FoundLanded => "found_landed",
            Self::ChildrenDone => "children_done",
            Self::EpicCap => "epic_cap",
            Self::BecameEpic => "became_epic",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::DependenciesAdded => "dependencies_added",
            Self::Edited => "edited",
            Self::Paused => "paused",
            Self::Resumed => "resumed",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == raw)
    }

    /// Whether the entry records a runner's result for its lease (the lease ended with a
    /// result, not taken back).
    pub fn is_result(self) -> bool {
        matches!(
            self,
            Self::Verified
                | Self::DevFailed
                | Self::VerifyFailed
                | Self::CheckingBase
                | Self::BaseRed
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a run's cost came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CostSource {
    /// The agent reported its cost.
    Reported,
    /// Estimated by the runner from the tokens and its price table.
    Estimated,
    /// Neither: the cost is unknown.
    None,
}

impl CostSource {
    /// The lowercase word used in the database and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::Reported => "reported",
            CostSource::Estimated => "estimated",
            CostSource::None => "none",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Reported, Self::Estimated, Self::None]
            .into_iter()
            .find(|s| s.as_str() == raw)
    }
}

/// What one agent run used, as its runner reported it (bounded at the edge). Cached input is
/// part of input; reasoning is part of output.
#[derive(Clone, Debug, PartialEq)]
pub struct Usage {
    /// claude, codex, aider, agentd or command.
    pub agent: String,
    pub model: Option<String>,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    /// The agent's cost in cents (stored as its run's `cost_cents`).
    pub cost_cents: f64,
    pub cost_source: CostSource,
    /// False when the run ended before the agent's final report (a lower bound).
    pub complete: bool,
    /// The agent's session, for resuming it on the next attempt.
    pub session_id: Option<String>,
}

impl Usage {
    /// The tokens the last-day figures count: input and output (cached input and reasoning
    /// are parts of those).
    pub fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// The mutable part of a task: everything the lifecycle reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskState {
    pub status: TaskStatus,
    /// Commits accepted from runners for this task.
    pub patchset: u32,
    /// Failed attempts since creation or the last explicit retry.
    pub failures: u32,
    /// Leases lost in a row (their runner died or was cut off): not the task's failures, but a
    /// task that keeps losing its runners is stopped.
    pub lost_leases: u32,
    /// Total cost of every run of the task, in cents.
    pub cost_cents: f64,
    /// `cost_cents` at the last explicit retry: the cost cap counts from here.
    pub cost_at_retry: f64,
    /// Not eligible for a lease before this instant.
    pub backoff_until: Option<Millis>,
    /// Why the last attempt was rejected, for the next prompt.
    pub feedback: Option<String>,
    /// Whether the next attempt amends the previous patchset (after a verify failure) or starts
    /// fresh from the current base (first attempt, dev failure, conflict, red integration build).
    pub amend: bool,
    /// This task's own cost cap in cents (`task add --max-cost`), over the server's
    /// `--max-task-cost`; set at creation, no transition changes it.
    pub max_cost_cents: Option<f64>,
    /// The runner's verification of the last patchset failed on a base the server did not
    /// know green: the task waits Verified and uncharged, the failure in `feedback`, neither
    /// leased nor put in a train, until the integrator has built that base (the patchset's
    /// parent) and so learned whose failure it was.
    pub base_check: bool,
    /// This task waits for a person's approval once verified (`task add --approval`), as
    /// every task does under the server's `--require-approval`; set at creation, no
    /// transition changes it.
    pub approval_required: bool,
    /// A person approved the current patchset (`task approve`); cleared when the task leaves
    /// Verified for anything but Done.
    pub approved: bool,
}

impl TaskState {
    /// The state of a task that was just created.
    pub fn new() -> Self {
        Self {
            status: TaskStatus::Open,
            patchset: 0,
            failures: 0,
            lost_leases: 0,
            cost_cents: 0.0,
            cost_at_retry: 0.0,
            backoff_until: None,
            feedback: None,
            amend: false,
            max_cost_cents: None,
            base_check: false,
            approval_required: false,
            approved: false,
        }
    }
}

impl TaskState {
    /// Cost counted against the task's cost cap: everything since the last retry.
    pub fn budget_spent(&self) -> f64 {
        self.cost_cents - self.cost_at_retry
    }
}

impl Default for TaskState {
    fn default() -> Self {
        Self::new()
    }
}

/// What a task's children amount to, as the store keeps them: how many there are, how many
/// are done and cancelled, and what they have cost together.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Children {
    pub total: u32,
    pub done: u32,
    pub cancelled: u32,
    pub cost_cents: f64,
    /// Created an epic (`task add --epic`): one before it has any child.
    pub declared: bool,
}

impl Children {
    /// Whether the task is an epic: it has children, or was created one.
    pub fn any(&self) -> bool {
        self.total > 0 || self.declared
    }

    /// Children neither done nor cancelled.
    pub fn unfinished(&self) -> u32 {
        self.total.saturating_sub(self.done + self.cancelled)
    }
}

/// A task as stored: its fixed attributes, its dependencies and its current state.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub id: TaskId,
    /// Order of creation; breaks priority ties (oldest first).
    pub seq: i64,
    pub title: String,
    pub description: String,
    pub namespace: Option<String>,
    pub priority: u8,
    pub parent: Option<TaskId>,
    pub depends_on: Vec<TaskId>,
    /// Labels a runner must have to lease it (`KEY` or `KEY=VALUE`, see [`satisfies`]).
    pub requires: Vec<String>,
    /// Why a person paused it (`task pause`, itself or its epic), when they did: it is not
    /// leased until resumed.
    pub paused: Option<String>,
    /// How many of `depends_on` are not Done (kept by the store as the dependencies move).
    pub deps_pending: u32,
    /// Its children (kept by the store as they are created and move): a task with any is an
    /// epic, never leased itself and Done once they are.
    pub children: Children,
    pub state: TaskState,
    /// The lease a runner holds while the task is in progress.
    pub lease: Option<Lease>,
    /// The highest lease epoch ever issued for the task.
    pub lease_epoch: u64,
    /// The commit of the last accepted patchset.
    pub patch_commit: Option<CommitId>,
    /// The runner whose lease lapsed last: the next lease prefers another.
    pub avoid_runner: Option<String>,
    /// The tree of the last patchset, if the runner's verification passed (not skipped).
    pub verified_tree: Option<TreeId>,
    /// Incremented by every write; the store refuses a write made from a stale read.
    pub version: i64,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// A runner's claim on a task. The pair (`id`, `epoch`) fences: a message naming any other
/// lease of the task is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub epoch: u64,
    /// The runner's name (for people) and ID (for ownership checks).
    pub runner: String,
    pub runner_id: String,
    /// The commit the work starts from.
    pub base_commit: CommitId,
    /// The previous patchset's commit, which the agent amends (its parent is `base_commit`).
    pub previous_commit: Option<CommitId>,
}

impl Lease {
    /// The (ID, epoch) pair that names the lease on the wire.
    pub fn lease_ref(&self) -> LeaseRef {
        LeaseRef {
            id: self.id.clone(),
            epoch: self.epoch,
        }
    }
}

/// What a user asks for when creating a task, already validated.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTask {
    /// `None` to generate `t-<n>`.
    pub id: Option<TaskId>,
    pub title: String,
    pub description: String,
    pub namespace: Option<String>,
    pub priority: u8,
    pub parent: Option<TaskId>,
    pub depends_on: Vec<TaskId>,
    /// Labels a runner must have to lease it.
    pub requires: Vec<String>,
    /// Its own cost cap in cents, over the server's `--max-task-cost`.
    pub max_cost_cents: Option<f64>,
    /// Once verified, it waits for a person's approval before it lands (`--approval`).
    pub approval: bool,
    /// An epic from the start (`task add --epic`): never leased, done once its children are.
    pub epic: bool,
}

/// The most labels a task may require.
pub const MAX_REQUIRES: usize = 16;

/// Validates what a task requires of its runner: at most [`MAX_REQUIRES`] of `KEY` or
/// `KEY=VALUE`, the key of letters, digits and `._/-` (at most 64 bytes), the value of those
/// and `:` (at most 128), each starting with a letter or digit; sorted, each once.
pub fn validate_requires(requires: Vec<String>) -> Result<Vec<String>, Error> {
    if requires.len() > MAX_REQUIRES {
        return Err(Error::InvalidArgument(format!(
            "{} --requires; a task may require at most {MAX_REQUIRES} labels",
            requires.len()
        )));
    }
    let word = |w: &str, max: usize, extra: &[char]| {
        w.starts_with(|c: char| c.is_ascii_alphanumeric())
            && w.len() <= max
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c) || extra.contains(&c))
    };
    let mut out = Vec::with_capacity(requires.len());
    for r in requires {
        let r = r.trim().to_owned();
        let ok = match r.split_once('=') {
            Some((k, v)) => word(k, 64, &[]) && word(v, 128, &[':']),
            None => word(&r, 64, &[]),
        };
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "invalid --requires {}: write KEY or KEY=VALUE (letters, digits, . _ / -, \
                 starting with a letter or digit)",
                quote_for_message(&r)
            )));
        }
        out.push(r);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The work a runner takes (`pipeline-runner --only-parent ID…` or `--only-task ID`, as the
/// seed's `run --parent` and `--task-id`): everything when both are unset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// Only the children of these tasks (epics).
    pub parents: Vec<TaskId>,
    /// Only this task.
    pub task: Option<TaskId>,
}

impl Scope {
    /// Whether a runner with this scope may take `task`.
    pub fn admits(&self, task: &Task) -> bool {
        if let Some(only) = &self.task {
            return task.id == *only;
        }
        self.parents.is_empty()
            || task
                .parent
                .as_ref()
                .is_some_and(|p| self.parents.contains(p))
    }

    /// What it limits the runner to, for people: `None` when it takes everything.
    pub fn describe(&self) -> Option<String> {
        match (&self.task, self.parents.as_slice()) {
            (Some(task), _) => Some(format!("only task {task}")),
            (None, []) => None,
            (None, parents) => Some(format!(
                "only children of {}",
                parents
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// Whether a runner with `labels` may take a task that `requires` these: each `KEY=VALUE` is
/// one of its labels, each bare `KEY` is a label or the key of one (as Buildkite agent tags
/// and GitHub `runs-on` labels match).
pub fn satisfies(labels: &[String], requires: &[String]) -> bool {
    requires.iter().all(|r| {
        labels
            .iter()
            .any(|l| l == r || (!r.contains('=') && l.split_once('=').is_some_and(|(k, _)| k == r)))
    })
}

impl NewTask {
    /// The same task, requiring `requires` of its runner (validated).
    pub fn with_requires(mut self, requires: Vec<String>) -> Result<Self, Error> {
        self.requires = validate_requires(requires)?;
        Ok(self)
    }

    /// The same task with its own cost cap: a finite number of cents above 0, at most 1e9.
    pub fn with_max_cost(mut self, cents: Option<f64>) -> Result<Self, Error> {
        self.max_cost_cents = cents.map(validate_max_cost).transpose()?;
        Ok(self)
    }

    /// The same task, an epic from the start when `epic` (`task add --epic`).
    pub fn as_epic(mut self, epic: bool) -> Self {
        self.epic = epic;
        self
    }

    /// Validates the free-text fields of a new task.
    pub fn new(
        id: Option<TaskId>,
        title: String,
        description: String,
        namespace: Option<String>,
        priority: Option<u32>,
        parent: Option<TaskId>,
        depends_on: Vec<TaskId>,
    ) -> Result<Self, Error> {
        let title = title.trim().to_owned();
        if title.is_empty() {
            return Err(Error::InvalidArgument(
                "a task needs a title: pass --title".to_owned(),
            ));
        }
        if title.len() > MAX_TITLE_BYTES || title.contains(['\n', '\r', '\0']) {
            return Err(Error::InvalidArgument(format!(
                "invalid title: it must be one line of at most {MAX_TITLE_BYTES} bytes"
            )));
        }
        if description.len() > MAX_DESCRIPTION_BYTES {
            return Err(Error::InvalidArgument(format!(
                "the description is {} bytes, the limit is {MAX_DESCRIPTION_BYTES} (1 MiB)",
                description.len()
            )));
        }
        if description.contains('\0') {
            return Err(Error::InvalidArgument(
                "the description contains a NUL byte".to_owned(),
            ));
        }
        let namespace = match namespace.map(|ns| ns.trim().to_owned()) {
            None => None,
            Some(ns) if ns.is_empty() => None,
            Some(ns) => Some(validate_namespace(ns)?),
        };
        let priority = match priority {
            None => DEFAULT_PRIORITY,
            Some(p) if p <= u32::from(LOWEST_PRIORITY) => p as u8,
            Some(p) => {
                return Err(Error::InvalidArgument(format!(
                    "invalid priority {p}: use 0 (highest) to {LOWEST_PRIORITY} (lowest)"
                )));
            }
        };
        let mut deps = depends_on;
        deps.sort();
        deps.dedup();
        if let Some(id) = &id {
            if deps.contains(id) {
                return Err(Error::InvalidArgument(format!(
                    "task {id} cannot depend on itself"
                )));
            }
            if parent.as_ref() == Some(id) {
                return Err(Error::InvalidArgument(format!(
                    "task {id} cannot be its own parent"
                )));
            }
        }
        Ok(Self {
            id,
            title,
            description,
            namespace,
            priority,
            parent,
            depends_on: deps,
            requires: Vec::new(),
            max_cost_cents: None,
            approval: false,
            epic: false,
        })
    }
}

/// A person's edit of a task's fields (`pipelinectl task edit`), each validated as `task add`
/// would; `None` leaves a field as it is. `namespace: Some(None)` clears it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskEdit {
    pub title: Option<String>,
    pub description: Option<String>,
    pub namespace: Option<Option<String>>,
    pub priority: Option<u8>,
    /// What the task requires of its runner from now on (validated); empty: nothing.
    pub requires: Option<Vec<String>>,
    /// Its own cost cap from now on (on an epic, its children's together); `Some(None)`
    /// removes it (the server's default applies again).
    pub max_cost_cents: Option<Option<f64>>,
    /// Whether the edit may apply to a task an agent works on or whose commit waits to land:
    /// its next attempt gets it (the one running keeps the prompt it has).
    pub next_attempt: bool,
}

impl TaskEdit {
    /// Validates the fields given (an empty namespace clears it).
    pub fn new(
        title: Option<String>,
        description: Option<String>,
        namespace: Option<String>,
        priority: Option<u32>,
    ) -> Result<Self, Error> {
        // The rules of a new task, field by field.
        let checked = NewTask::new(
            None,
            title.clone().unwrap_or_else(|| "unchanged".to_owned()),
            description.clone().unwrap_or_default(),
            namespace.clone(),
            priority,
            None,
            vec![],
        )?;
        let edit = Self {
            title: title.map(|_| checked.title),
            description: description.map(|_| checked.description),
            namespace: namespace.map(|_| checked.namespace),
            priority: priority.map(|_| checked.priority),
            ..Self::default()
        };
        Ok(edit)
    }

    /// The same edit, also setting the task's own cost cap (validated), or removing it with 0.
    pub fn with_max_cost(mut self, cents: Option<f64>) -> Result<Self, Error> {
        self.max_cost_cents = match cents {
            None => None,
            Some(0.0) => Some(None),
            Some(c) => Some(Some(validate_max_cost(c)?)),
        };
        Ok(self)
    }

    /// The same edit, also setting what the task requires of its runner (validated).
    pub fn with_requires(mut self, requires: Option<Vec<String>>) -> Result<Self, Error> {
        self.requires = requires.map(validate_requires).transpose()?;
        Ok(self)
    }

    /// Refuses an edit that changes nothing.
    pub fn check_not_empty(self) -> Result<Self, Error> {
        if self.fields().is_empty() {
            return Err(Error::InvalidArgument(
                "nothing to change: pass --title, --description, --namespace, --priority, \
                 --requires or --max-cost"
                    .to_owned(),
            ));
        }
        Ok(self)
    }

    /// The fields it changes, for the task's history.
    pub fn fields(&self) -> Vec<&'static str> {
        [
            ("title", self.title.is_some()),
            ("description", self.description.is_some()),
            ("namespace", self.namespace.is_some()),
            ("priority", self.priority.is_some()),
            ("requires", self.requires.is_some()),
            ("max_cost", self.max_cost_cents.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }
}

/// A task's own cost cap (`--max-cost`): a finite number of cents above 0, at most 1e9.
fn validate_max_cost(cents: f64) -> Result<f64, Error> {
    if cents.is_finite() && cents > 0.0 && cents <= 1e9 {
        return Ok(cents);
    }
    Err(Error::InvalidArgument(format!(
        "invalid --max-cost {cents}: a number of cents above 0 and at most 1000000000"
    )))
}

/// A namespace names what `bild` builds (e.g. `Omni/Pipeline.hs`): a relative path inside the
/// repository. It reaches a command line, so it must not look like an option or leave the tree.
fn validate_namespace(ns: String) -> Result<String, Error> {
    let refuse = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "invalid namespace {}: {why}",
            quote_for_message(&ns)
        )))
    };
    if ns.len() > 256 {
        return refuse("it is longer than 256 bytes");
    }
    if ns.starts_with('-') {
        return refuse("it must not start with '-'");
    }
    if ns.starts_with('/') {
        return refuse("it must be a path relative to the repository");
    }
    if ns.split('/').any(|part| part == "..") {
        return refuse("it must not contain '..'");
    }
    if ns.chars().any(|c| c.is_control()) {
        return refuse("it must not contain control characters");
    }
    Ok(ns)
}

/// One run of a task: a dev attempt on a runner, a verification, or an integration.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub id: i64,
    pub task_id: TaskId,
    pub phase: Phase,
    pub patchset: u32,
    pub attempt: u32,
    /// The runner's name; `None` for the server's own runs.
    pub runner: Option<String>,
    pub status: RunStatus,
    pub cost_cents: f64,
    pub started_at: Millis,
    pub finished_at: Option<Millis>,
    pub error: Option<String>,
    /// Whose fault it was, for a failed run (none for one given back or cancelled).
    pub failure_kind: Option<FailureKind>,
    /// For an integrate run: the merge train it was in, and how many builds covered the task.
    pub train: Option<i64>,
    pub builds: Option<u32>,
    /// For a dev run: what its agent used, when the runner said.
    pub usage: Option<Usage>,
}

/// A run that is already over when it is recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedRun {
    pub phase: Phase,
    pub patchset: u32,
    pub runner: Option<String>,
    pub status: RunStatus,
    pub cost_cents: f64,
    pub started_at: Millis,
    pub error: Option<String>,
    pub failure_kind: Option<FailureKind>,
    pub train: Option<i64>,
    pub builds: Option<u32>,
}

/// How a run ends.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEnd {
    pub status: RunStatus,
    pub cost_cents: f64,
    pub error: Option<String>,
    pub failure_kind: Option<FailureKind>,
    /// For an integrate run: how many builds covered the task.
    pub builds: Option<u32>,
    /// For a dev run: what its agent used (its `cost_cents` is the end's).
    pub usage: Option<Usage>,
}

impl RunEnd {
    /// A successful end.
    pub fn success(cost_cents: f64, note: Option<String>) -> Self {
        Self {
            status: RunStatus::Success,
            cost_cents,
            error: note,
            failure_kind: None,
            builds: None,
            usage: None,
        }
    }

    /// A failed end, whose fault `kind` says.
    pub fn failure(error: String, kind: Option<FailureKind>) -> Self {
        Self {
            status: RunStatus::Failure,
            cost_cents: 0.0,
            error: Some(error),
            failure_kind: kind,
            builds: None,
            usage: None,
        }
    }

    /// The same end, saying how many builds covered the task.
    pub fn with_builds(mut self, builds: u32) -> Self {
        self.builds = Some(builds);
        self
    }
}

/// A run to start.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRun {
    pub phase: Phase,
    pub patchset: u32,
    pub runner: Option<String>,
    /// For an integrate run: its merge train.
    pub train: Option<i64>,
}

/// One entry of a task's history.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskEvent {
    pub id: i64,
    pub task_id: TaskId,
    pub at: Millis,
    /// What the entry records (a word only in the database and on the wire).
    pub kind: EventKind,
    pub from: Option<TaskStatus>,
    pub to: TaskStatus,
    pub message: String,
}

/// Counts of tasks by status, for `pipelinectl status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusCounts {
    pub open: u64,
    pub in_progress: u64,
    pub verified: u64,
    pub done: u64,
    pub needs_help: u64,
    pub cancelled: u64,
    pub active_dev_runs: u64,
}

impl StatusCounts {
    pub fn add(&mut self, status: TaskStatus, n: u64) {
        *self.slot(status) += n;
    }

    /// A task went from `from` to `to`.
    pub fn moved(&mut self, from: TaskStatus, to: TaskStatus) {
        let from = self.slot(from);
        *from = from.saturating_sub(1);
        *self.slot(to) += 1;
    }

    fn slot(&mut self, status: TaskStatus) -> &mut u64 {
        match status {
            TaskStatus::Open => &mut self.open,
            TaskStatus::InProgress => &mut self.in_progress,
            TaskStatus::Verified => &mut self.verified,
            TaskStatus::Done => &mut self.done,
            TaskStatus::NeedsHelp => &mut self.needs_help,
            TaskStatus::Cancelled => &mut self.cancelled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requires_are_checked_sorted_and_matched_like_runner_labels() {
        let r = validate_requires(vec!["os=linux".into(), " gpu ".into(), "gpu".into()])
            .expect("valid");
        assert_eq!(r, ["gpu", "os=linux"]);
        for bad in ["", "-rf", "a b", "k=", "=v", "k=v=w"] {
            let err = validate_requires(vec![bad.into()]).expect_err(bad);
            assert!(err.to_string().contains("KEY or KEY=VALUE"), "{bad}: {err}");
        }
        assert!(validate_requires((0..17).map(|i| format!("k{i}")).collect()).is_err());
        let labels = ["gpu=a100".to_owned(), "os=linux".to_owned()];
        assert!(satisfies(&labels, &[]));
        assert!(
            satisfies(&labels, &r),
            "a bare key matches a KEY=VALUE label"
        );
        assert!(satisfies(&labels, &["gpu=a100".into()]));
        assert!(!satisfies(&labels, &["gpu=h100".into()]));
        assert!(!satisfies(&labels, &["os".into(), "arch".into()]));
        assert!(!satisfies(&["gpu".to_owned()], &["gpu=a100".into()]));
    }

    #[test]
    fn new_task_validates_its_fields() {
        let mk = |title: &str, desc: &str, ns: Option<&str>, prio: Option<u32>| {
            NewTask::new(
                None,
                title.to_owned(),
                desc.to_owned(),
                ns.map(str::to_owned),
                prio,
                None,
                vec![],
            )
        };
        assert_eq!(
            mk("fix it", "", None, None).map(|t| t.priority).ok(),
            Some(2)
        );
        assert!(mk("  ", "", None, None).is_err());
        assert!(mk("two\nlines", "", None, None).is_err());
        assert!(mk("t", "nul\0", None, None).is_err());
        assert!(mk("t", &"x".repeat(MAX_DESCRIPTION_BYTES + 1), None, None).is_err());
        assert!(mk("t", "", Some("--help"), None).is_err());
        assert!(mk("t", "", Some("../etc"), None).is_err());
        assert!(mk("t", "", Some("/abs"), None).is_err());
        assert_eq!(
            mk("t", "", Some("Omni/Pipeline.hs"), Some(0))
                .map(|t| (t.namespace, t.priority))
                .ok(),
            Some((Some("Omni/Pipeline.hs".to_owned()), 0))
        );
        assert_eq!(
            mk("t", "", Some(""), None).map(|t| t.namespace).ok(),
            Some(None)
        );
        let err = mk("t", "", None, Some(9))
            .expect_err("priority 9")
            .to_string();
        assert!(err.contains("invalid priority 9"), "{err}");
    }

    #[test]
    fn a_task_cannot_depend_on_itself() {
        let id = TaskId::parse("a").ok();
        let err = NewTask::new(
            id.clone(),
            "t".into(),
            String::new(),
            None,
            None,
            None,
            id.into_iter().collect(),
        )
        .expect_err("self dependency");
        assert!(err.to_string().contains("cannot depend on itself"));
    }
}
