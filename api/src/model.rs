//! The server's answers as people and scripts see them, in their own types: the view that
//! `pipelinectl` prints and the HTTP API serves (as the JSON of [`crate::json`]). Statuses are
//! enums that print as the contract's lowercase words, times
//! are milliseconds since the Unix epoch, absent values are `None`. Nothing here names a
//! protocol type: `wire.rs` converts the server's messages into these.

/// A task's status. `Unknown` stands for a value this client does not know (or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Open,
    InProgress,
    Verified,
    Done,
    NeedsHelp,
    Cancelled,
    Unknown,
}

impl TaskStatus {
    /// Every status a task can be in, as `task list --status` takes them.
    pub const KNOWN: [TaskStatus; 6] = [
        TaskStatus::Open,
        TaskStatus::InProgress,
        TaskStatus::Verified,
        TaskStatus::Done,
        TaskStatus::NeedsHelp,
        TaskStatus::Cancelled,
    ];

    /// The lowercase word of the contract (`unknown` for `Unknown`).
    pub fn word(self) -> &'static str {
        match self {
            TaskStatus::Open => "open",
            TaskStatus::InProgress => "in_progress",
            TaskStatus::Verified => "verified",
            TaskStatus::Done => "done",
            TaskStatus::NeedsHelp => "needs_help",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::Unknown => "unknown",
        }
    }

    /// The status a contract word names.
    pub fn from_word(word: &str) -> Option<Self> {
        Self::KNOWN.into_iter().find(|s| s.word() == word)
    }

    /// Whether the task has stopped moving on its own: done, needs help or cancelled.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Done | TaskStatus::NeedsHelp | TaskStatus::Cancelled
        )
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Dev,
    Verify,
    Integrate,
    Unknown,
}

impl Phase {
    pub fn word(self) -> &'static str {
        match self {
            Phase::Dev => "dev",
            Phase::Verify => "verify",
            Phase::Integrate => "integrate",
            Phase::Unknown => "unknown",
        }
    }
}

/// How a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Success,
    Failure,
    Unknown,
}

impl RunStatus {
    pub fn word(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Success => "success",
            RunStatus::Failure => "failure",
            RunStatus::Unknown => "unknown",
        }
    }
}

/// Whose fault a failed run was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The task's own (its agent's work or its build): counts towards the retry limit.
    Task,
    /// Not the task's (a missing program, a git or disk error, a lost runner): uncharged.
    Infrastructure,
}

impl FailureKind {
    pub fn word(self) -> &'static str {
        match self {
            FailureKind::Task => "task",
            FailureKind::Infrastructure => "infrastructure",
        }
    }
}

/// Where a run's cost came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostSource {
    /// The agent reported it.
    Reported,
    /// The runner estimated it from the tokens and its price table.
    Estimated,
    /// Unknown (also a source this client does not know).
    None,
}

impl CostSource {
    /// `reported`, `estimated` or `none`.
    pub fn word(self) -> &'static str {
        match self {
            CostSource::Reported => "reported",
            CostSource::Estimated => "estimated",
            CostSource::None => "none",
        }
    }
}

/// What a dev run's agent used. Cached input is part of input; reasoning is part of output.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// claude, codex, aider, agentd or command.
    pub agent: String,
    pub model: Option<String>,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_cents: f64,
    pub cost_source: CostSource,
    /// False when the run ended before the agent's final report (a lower bound).
    pub complete: bool,
}

/// Whether the server (or a runner) can do its work, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy(String),
}

impl Health {
    /// `healthy` or `unhealthy`.
    pub fn word(&self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy(_) => "unhealthy",
        }
    }

    /// Why it is unhealthy; `None` when healthy.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Health::Healthy => None,
            Health::Unhealthy(why) => Some(why),
        }
    }
}

/// What a runner is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerState {
    Idle,
    Busy,
    Draining,
    Offline,
    /// Cut off; its name stays reserved until forgotten.
    Revoked,
    Unknown,
}

impl RunnerState {
    pub fn word(self) -> &'static str {
        match self {
            RunnerState::Idle => "idle",
            RunnerState::Busy => "busy",
            RunnerState::Draining => "draining",
            RunnerState::Offline => "offline",
            RunnerState::Revoked => "revoked",
            RunnerState::Unknown => "unknown",
        }
    }
}

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// The runner's own lifecycle lines.
    Runner,
    /// The server's lines (integration, cancels, lapsed leases).
    Server,
    /// The agent's output as received, where the runner shows it rendered on stdout (the
    /// JSON events of claude and codex): shown by `logs --raw` only.
    Raw,
    Unknown,
}

impl LogStream {
    /// `stdout`, `stderr`, `runner`, `server`, `raw`, or `?`.
    pub fn word(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Runner => "runner",
            LogStream::Server => "server",
            LogStream::Raw => "raw",
            LogStream::Unknown => "?",
        }
    }
}

/// A new task, as `task add` asks for it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// `None` lets the server choose `t-<n>`.
    pub id: Option<String>,
    pub title: String,
    pub description: String,
    pub namespace: Option<String>,
    pub priority: u32,
    pub parent: Option<String>,
    pub depends_on: Vec<String>,
    /// Labels a runner must have to lease it.
    pub requires: Vec<String>,
    /// Its own cost cap in cents.
    pub max_cost_cents: Option<f64>,
    /// Once verified, it waits for a person's approval before it lands.
    pub approval: bool,
    /// An epic from the start: never leased, done once its children are.
    pub epic: bool,
}

/// A change to a task, as `task edit` asks for it: `None` leaves a field as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskChange {
    pub id: String,
    pub title: Option<String>,
    pub description: Option<String>,
    /// An empty one clears it.
    pub namespace: Option<String>,
    pub priority: Option<u32>,
    /// What it requires of its runner from now on (`Some(vec![])`: nothing).
    pub requires: Option<Vec<String>>,
    /// Its own cost cap from now on, in cents (an epic's: its children's together).
    pub max_cost_cents: Option<f64>,
    /// Apply it to a task in progress or verified too (its next attempt).
    pub next_attempt: bool,
}

/// A task.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: String,
    pub title: String,
    pub description: String,
    pub status: TaskStatus,
    pub priority: u32,
    /// Commits the server has accepted from runners for this task.
    pub patchset: u32,
    pub namespace: Option<String>,
    pub depends_on: Vec<String>,
    pub parent: Option<String>,
    /// Failed attempts since creation or the last explicit retry.
    pub failures: u32,
    /// Leases it lost in a row (not counted as failures).
    pub lost_leases: u32,
    pub cost_cents: f64,
    /// What its agents have used, input plus output tokens.
    pub tokens: u64,
    pub backoff_until_ms: Option<i64>,
    /// Why the last attempt was rejected.
    pub feedback: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Why it is not moving, in sentences; empty when nothing holds it.
    pub waiting_for: Vec<String>,
    /// Labels a runner must have to lease it.
    pub requires: Vec<String>,
    /// Its own cost cap in cents, when it has one.
    pub max_cost_cents: Option<f64>,
    /// Why it is paused, when it is.
    pub paused: Option<String>,
    /// `None` when it needs no approval, else `required` or `approved`.
    pub approval: Option<String>,
    /// An epic: it has children, or was created one; never leased itself.
    pub epic: bool,
}

/// One run of a task: a dev run on a runner, its verification, or the server's integration.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: i64,
    pub phase: Phase,
    pub patchset: u32,
    pub attempt: u32,
    /// The runner's name; `None` for the server's own runs.
    pub runner: Option<String>,
    pub status: RunStatus,
    pub cost_cents: f64,
    pub started_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub error: Option<String>,
    /// `None` for runs that did not fail (or were given back).
    pub failure_kind: Option<FailureKind>,
    /// For an integrate run: the merge train it was in.
    pub train: Option<i64>,
    /// For an integrate run: how many builds covered the task.
    pub builds: Option<u32>,
    /// For a dev run: what its agent used, when the runner said.
    pub usage: Option<Usage>,
}

/// One entry of a task's history.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    pub at_ms: i64,
    /// What happened, one word: created, leased, dev_failed, verified, …
    pub kind: String,
    /// `None` for the first event (or a status this client does not know).
    pub from: Option<TaskStatus>,
    pub to: TaskStatus,
    pub message: String,
}

/// A task with its runs and history, as `task show` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskDetail {
    pub task: Task,
    pub runs: Vec<Run>,
    pub events: Vec<TaskEvent>,
    /// The tasks whose parent it is (an epic's), with their statuses.
    pub children: Vec<(String, TaskStatus)>,
    /// What they have cost together, in cents.
    pub children_cost_cents: f64,
    /// The commit its runner offered before its verification ended (`--early-builds`), while
    /// the lease holds the offer.
    pub offered_commit: Option<String>,
}

/// The server's counts and health, as `status` prints them.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub open: u64,
    pub in_progress: u64,
    pub verified: u64,
    pub done: u64,
    pub needs_help: u64,
    pub cancelled: u64,
    pub active_dev_runs: u64,
    pub runners: u64,
    /// The base branch's name.
    pub base: String,
    pub health: Health,
    pub landing: Landing,
    /// The base commit that fails the server's build, while it does (it holds leases too).
    pub red_base: Option<String>,
    /// New leases are paused (`queue pause`, or a red base), with the reason and since when
    /// (a person's pause).
    pub queue_paused: bool,
    pub queue_pause_reason: Option<String>,
    pub queue_paused_at_ms: Option<i64>,
    /// Integration builds per landed task over the last hour; `None` when none landed.
    pub builds_per_landed: Option<f64>,
    /// Trains built at once now (the depth of speculation in use) and at most
    /// (`--integration-slots`); `None` from a server whose integrator does not run.
    pub integration_depth: Option<u32>,
    pub integration_slots: Option<u32>,
    /// What agents cost over the last 24 hours, in cents, and their input and output tokens.
    pub cost_cents_last_day: f64,
    pub tokens_last_day: u64,
    /// The sandbox the server's own builds run in (`landlock`, `user`, `off`); `None` from a
    /// server that does not say (an older one).
    pub sandbox: Option<String>,
    /// Each `--webhook` endpoint's deliveries.
    pub webhooks: Vec<Webhook>,
    /// The server's role among the servers of one database; `None` from a server that does
    /// not say (an older one).
    pub server: Option<ServerRole>,
}

/// A server's role: one leads, the others stand by (issue 28).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRole {
    /// `leader` or `standby`.
    pub role: String,
    /// The term the server leads in; 0 on a standby.
    pub term: i64,
    /// The leader's URL (the server's own when it leads), when known.
    pub leader: Option<String>,
}

/// A webhook endpoint's deliveries, as `status` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// Its origin (the rest of the URL shown as `…`).
    pub url: String,
    /// The last entry of the feed it has handled.
    pub position: i64,
    pub last_delivered_at_ms: Option<i64>,
    /// The message it is trying again, while one fails.
    pub pending: Option<PendingWebhook>,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<i64>,
}

/// A message a webhook endpoint is trying again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWebhook {
    /// Its `webhook-id`.
    pub id: String,
    /// Its `type`.
    pub kind: String,
    pub attempts: u32,
    pub next_attempt_at_ms: Option<i64>,
}

/// Whether verified tasks land, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Landing {
    Running,
    Paused(String),
}

impl Landing {
    /// `running` or `paused`.
    pub fn word(&self) -> &'static str {
        match self {
            Landing::Running => "running",
            Landing::Paused(_) => "paused",
        }
    }

    /// Why landing is paused; `None` while it runs.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Landing::Running => None,
            Landing::Paused(why) => Some(why),
        }
    }
}

/// A merge train being integrated now.
#[derive(Debug, Clone, PartialEq)]
pub struct Train {
    pub id: i64,
    /// Its tasks, in the order of the chain.
    pub tasks: Vec<String>,
    /// What it is doing: cherry-picking, building prefix i of k, landing.
    pub step: String,
    /// The train in flight whose tip it is built on as if that had landed (speculative);
    /// `None`: built on the base.
    pub ahead: Option<i64>,
    /// The runners building it now (`--remote-builds`).
    pub runners: Vec<String>,
}

/// A task an agent works on now.
#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    pub id: String,
    /// The runner's name.
    pub runner: String,
    /// When it was leased.
    pub since_ms: i64,
}

/// A task waiting behind the train.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub id: String,
    pub status: TaskStatus,
    /// From 1: verified tasks in landing order, then open ones in lease order.
    pub position: u32,
    pub waiting_for: Vec<String>,
    /// When it should land, from recent build times; `None` when there is no estimate.
    pub eta_seconds: Option<f64>,
}

/// The merge train and the tasks behind it, as `queue` prints them.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    /// The train that lands next (the first of `trains`).
    pub train: Option<Train>,
    /// Every train in flight, the one that lands next first.
    pub trains: Vec<Train>,
    /// The tasks in progress, oldest lease first.
    pub running: Vec<Running>,
    pub waiting: Vec<Waiting>,
    pub landing: Landing,
    /// The base commit that fails the server's build, while it does.
    pub red_base: Option<String>,
    pub queue_paused: bool,
    /// Why new leases are paused, when a reason was given.
    pub queue_pause_reason: Option<String>,
}

/// A runner known to the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Runner {
    pub id: String,
    pub name: String,
    pub state: RunnerState,
    pub slots_used: u32,
    pub slots_total: u32,
    pub last_heartbeat_ms: Option<i64>,
    pub labels: Vec<String>,
    pub version: String,
    pub health: Health,
    /// The sandbox its agents and builds run in; `None` when it did not say.
    pub sandbox: Option<String>,
    /// The train builds it runs now (`--remote-builds`).
    pub builds: Vec<RunnerBuild>,
}

/// A train build a runner runs now.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerBuild {
    /// The build job's ID.
    pub id: String,
    /// The commit it builds.
    pub commit: String,
}

/// The run that the log lines after it belong to.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRun {
    pub run_id: i64,
    /// The run's phase; each line carries its own, which is what headers show.
    pub phase: Phase,
    pub attempt: u32,
    /// `None` for the server's own runs.
    pub runner: Option<String>,
}

/// One line of a run's log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    /// Per run, from 1; a gap means lines were cut.
    pub seq: u64,
    pub at_ms: i64,
    pub stream: LogStream,
    pub phase: Phase,
    pub text: String,
}

/// One message of a `logs` stream.
#[derive(Debug, Clone, PartialEq)]
pub enum LogItem {
    /// The run the lines that follow belong to.
    Run(LogRun),
    /// Lines of one run.
    Lines { run_id: i64, lines: Vec<LogLine> },
    /// The task's status (first with `--follow`, then on every change).
    Status(TaskStatus),
    /// A batch of lines that could not be decoded, and why.
    Undecodable(String),
}

/// An entry of the change feed, as `watch --all` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEntry {
    /// Its place in the feed (a watch that reconnects goes on after it).
    pub position: i64,
    /// `task`, `runner`, `landing`, `queue` or `train`; empty on the marker a stream begins
    /// with (where it starts).
    pub topic: String,
    pub subject: String,
    pub kind: String,
    pub at_ms: i64,
    pub message: String,
    /// Its details, a JSON object (`{}` when none or unreadable).
    pub data: serde_json::Value,
}

/// A task's transition, as `watch` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// Its place in the server's history (a watch that reconnects goes on after it).
    pub event_id: i64,
    pub task_id: String,
    pub at_ms: i64,
    pub kind: String,
    /// `None` for a task's creation (or a status this client does not know).
    pub from: Option<TaskStatus>,
    pub to: TaskStatus,
    pub message: String,
}
