//! The edge between the protocol and the views: the server's prost messages converted into the
//! view types of `model.rs`, and `pipelinectl`'s requests into messages. prost makes every enum an
//! `i32` and every message field optional; here, once, an enum value this client does not know
//! becomes `Unknown` (an unspecified `from` status becomes `None`), and a reply that lacks its
//! task is refused.
//!
//! Architecture invariant: this is the only module of `pipeline-api` that names
//! `pipeline_proto::v1` types; `pipelinectl` (besides its `client.rs`'s calls of the generated
//! client) and the server's HTTP API see the server's answers only through it.

use pipeline_proto::v1 as pb;
use prost::Message as _;

use crate::model::{
    CostSource, FailureKind, FeedEntry, Health, Landing, LogItem, LogLine, LogRun, LogStream,
    NewTask, PendingWebhook, Phase, Queue, Run, RunStatus, Runner, RunnerBuild, RunnerState,
    Running, ServerRole, Status, Task, TaskChange, TaskDetail, TaskEvent, TaskStatus, Train,
    Transition, Usage, Waiting, Webhook,
};

/// A reply that should carry a task and does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WithoutTask;

impl std::fmt::Display for WithoutTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server answered without the task")
    }
}

impl std::error::Error for WithoutTask {}

/// The task a reply carries.
pub fn task_of(task: Option<pb::Task>) -> Result<Task, WithoutTask> {
    task.ok_or(WithoutTask).map(Task::from)
}

fn health(unhealthy: Option<String>) -> Health {
    unhealthy.map_or(Health::Healthy, Health::Unhealthy)
}

impl From<i32> for TaskStatus {
    fn from(raw: i32) -> Self {
        match pb::TaskStatus::try_from(raw) {
            Ok(pb::TaskStatus::Open) => TaskStatus::Open,
            Ok(pb::TaskStatus::InProgress) => TaskStatus::InProgress,
            Ok(pb::TaskStatus::Verified) => TaskStatus::Verified,
            Ok(pb::TaskStatus::Done) => TaskStatus::Done,
            Ok(pb::TaskStatus::NeedsHelp) => TaskStatus::NeedsHelp,
            Ok(pb::TaskStatus::Cancelled) => TaskStatus::Cancelled,
            Ok(pb::TaskStatus::Unspecified) | Err(_) => TaskStatus::Unknown,
        }
    }
}

/// The status a transition came from: `None` when unspecified (a creation) or unknown.
fn from_status(raw: i32) -> Option<TaskStatus> {
    Some(TaskStatus::from(raw)).filter(|s| *s != TaskStatus::Unknown)
}

/// The protocol's value of a status (`Unknown` is unspecified, which the server refuses).
pub fn task_status(status: TaskStatus) -> i32 {
    let pb = match status {
        TaskStatus::Open => pb::TaskStatus::Open,
        TaskStatus::InProgress => pb::TaskStatus::InProgress,
        TaskStatus::Verified => pb::TaskStatus::Verified,
        TaskStatus::Done => pb::TaskStatus::Done,
        TaskStatus::NeedsHelp => pb::TaskStatus::NeedsHelp,
        TaskStatus::Cancelled => pb::TaskStatus::Cancelled,
        TaskStatus::Unknown => pb::TaskStatus::Unspecified,
    };
    pb.into()
}

impl From<i32> for Phase {
    fn from(raw: i32) -> Self {
        match pb::RunPhase::try_from(raw) {
            Ok(pb::RunPhase::Dev) => Phase::Dev,
            Ok(pb::RunPhase::Verify) => Phase::Verify,
            Ok(pb::RunPhase::Integrate) => Phase::Integrate,
            Ok(pb::RunPhase::Unspecified) | Err(_) => Phase::Unknown,
        }
    }
}

impl From<i32> for RunStatus {
    fn from(raw: i32) -> Self {
        match pb::RunStatus::try_from(raw) {
            Ok(pb::RunStatus::Running) => RunStatus::Running,
            Ok(pb::RunStatus::Success) => RunStatus::Success,
            Ok(pb::RunStatus::Failure) => RunStatus::Failure,
            Ok(pb::RunStatus::Unspecified) | Err(_) => RunStatus::Unknown,
        }
    }
}

/// Where a cost came from: a source this client does not know (or none) is `None`.
fn cost_source(raw: i32) -> CostSource {
    match pb::CostSource::try_from(raw) {
        Ok(pb::CostSource::Reported) => CostSource::Reported,
        Ok(pb::CostSource::Estimated) => CostSource::Estimated,
        Ok(pb::CostSource::None | pb::CostSource::Unspecified) | Err(_) => CostSource::None,
    }
}

impl From<pb::Usage> for Usage {
    fn from(u: pb::Usage) -> Self {
        Usage {
            agent: u.agent,
            model: u.model,
            input_tokens: u.input_tokens,
            cached_input_tokens: u.cached_input_tokens,
            cache_write_tokens: u.cache_write_tokens,
            output_tokens: u.output_tokens,
            reasoning_tokens: u.reasoning_tokens,
            cost_cents: u.cost_cents,
            cost_source: cost_source(u.cost_source),
            complete: u.complete,
        }
    }
}

/// Whose fault a failed run was: `None` when unspecified.
fn failure_kind(raw: i32) -> Option<FailureKind> {
    match pb::FailureKind::try_from(raw) {
        Ok(pb::FailureKind::Task) => Some(FailureKind::Task),
        Ok(pb::FailureKind::Infrastructure) => Some(FailureKind::Infrastructure),
        Ok(pb::FailureKind::Unspecified) | Err(_) => None,
    }
}

impl From<i32> for RunnerState {
    fn from(raw: i32) -> Self {
        match pb::RunnerState::try_from(raw) {
            Ok(pb::RunnerState::Idle) => RunnerState::Idle,
            Ok(pb::RunnerState::Busy) => RunnerState::Busy,
            Ok(pb::RunnerState::Draining) => RunnerState::Draining,
            Ok(pb::RunnerState::Offline) => RunnerState::Offline,
            Ok(pb::RunnerState::Revoked) => RunnerState::Revoked,
            Ok(pb::RunnerState::Unspecified) | Err(_) => RunnerState::Unknown,
        }
    }
}

impl From<i32> for LogStream {
    fn from(raw: i32) -> Self {
        match pb::LogStream::try_from(raw) {
            Ok(pb::LogStream::Stdout) => LogStream::Stdout,
            Ok(pb::LogStream::Stderr) => LogStream::Stderr,
            Ok(pb::LogStream::Runner) => LogStream::Runner,
            Ok(pb::LogStream::Server) => LogStream::Server,
            Ok(pb::LogStream::Raw) => LogStream::Raw,
            Ok(pb::LogStream::Unspecified) | Err(_) => LogStream::Unknown,
        }
    }
}

/// How many bytes `task` takes in a `CreateTasks` request (its message, with its field key
/// and length).
pub fn create_request_len(task: &NewTask) -> usize {
    let len = pb::CreateTaskRequest::from(task.clone()).encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

impl From<NewTask> for pb::CreateTaskRequest {
    fn from(t: NewTask) -> Self {
        pb::CreateTaskRequest {
            id: t.id,
            title: t.title,
            description: t.description,
            namespace: t.namespace,
            priority: Some(t.priority),
            parent: t.parent,
            depends_on: t.depends_on,
            requires: t.requires,
            max_cost_cents: t.max_cost_cents,
            approval: t.approval,
            epic: t.epic,
        }
    }
}

impl From<TaskChange> for pb::EditTaskRequest {
    fn from(c: TaskChange) -> Self {
        pb::EditTaskRequest {
            id: c.id,
            title: c.title,
            description: c.description,
            namespace: c.namespace,
            priority: c.priority,
            set_requires: c.requires.is_some(),
            requires: c.requires.unwrap_or_default(),
            max_cost_cents: c.max_cost_cents,
            next_attempt: c.next_attempt,
        }
    }
}

impl From<pb::Task> for Task {
    fn from(t: pb::Task) -> Self {
        Task {
            id: t.id,
            title: t.title,
            description: t.description,
            status: t.status.into(),
            priority: t.priority,
            patchset: t.patchset,
            namespace: t.namespace,
            depends_on: t.depends_on,
            parent: t.parent,
            failures: t.failures,
            lost_leases: t.lost_leases,
            cost_cents: t.cost_cents,
            tokens: t.tokens,
            backoff_until_ms: t.backoff_until_ms,
            feedback: t.feedback,
            created_at_ms: t.created_at_ms,
            updated_at_ms: t.updated_at_ms,
            waiting_for: t.waiting_for,
            requires: t.requires,
            max_cost_cents: t.max_cost_cents,
            paused: t.paused,
            approval: t.approval,
            epic: t.epic,
        }
    }
}

impl From<pb::Run> for Run {
    fn from(r: pb::Run) -> Self {
        Run {
            id: r.id,
            phase: r.phase.into(),
            patchset: r.patchset,
            attempt: r.attempt,
            runner: r.runner,
            status: r.status.into(),
            cost_cents: r.cost_cents,
            started_at_ms: r.started_at_ms,
            finished_at_ms: r.finished_at_ms,
            error: r.error,
            failure_kind: failure_kind(r.failure_kind),
            train: r.train,
            builds: r.builds,
            usage: r.usage.map(Usage::from),
        }
    }
}

impl From<pb::TaskEvent> for TaskEvent {
    fn from(e: pb::TaskEvent) -> Self {
        TaskEvent {
            at_ms: e.at_ms,
            kind: e.kind,
            from: from_status(e.from_status),
            to: e.to_status.into(),
            message: e.message,
        }
    }
}

impl TryFrom<pb::GetTaskResponse> for TaskDetail {
    type Error = WithoutTask;

    fn try_from(d: pb::GetTaskResponse) -> Result<Self, WithoutTask> {
        Ok(TaskDetail {
            task: task_of(d.task)?,
            runs: d.runs.into_iter().map(Run::from).collect(),
            events: d.events.into_iter().map(TaskEvent::from).collect(),
            children: d
                .children
                .into_iter()
                .map(|c| (c.id, c.status.into()))
                .collect(),
            children_cost_cents: d.children_cost_cents,
            offered_commit: d.offered_commit,
        })
    }
}

/// What holds the task a reply carries; nothing when it carries none.
pub fn waiting_for(d: pb::GetTaskResponse) -> Vec<String> {
    d.task.map(|t| t.waiting_for).unwrap_or_default()
}

impl From<pb::GetStatusResponse> for Status {
    fn from(s: pb::GetStatusResponse) -> Self {
        Status {
            open: s.open,
            in_progress: s.in_progress,
            verified: s.verified,
            done: s.done,
            needs_help: s.needs_help,
            cancelled: s.cancelled,
            active_dev_runs: s.active_dev_runs,
            runners: s.runners,
            base: s.base,
            health: health(s.unhealthy),
            red_base: s.landing.as_ref().and_then(|l| l.red_base.clone()),
            landing: landing(s.landing),
            queue_paused: s.queue_paused,
            queue_pause_reason: s.queue_pause_reason,
            queue_paused_at_ms: s.queue_paused_at_ms,
            builds_per_landed: s.builds_per_landed,
            integration_depth: s.integration_depth,
            integration_slots: s.integration_slots,
            cost_cents_last_day: s.cost_cents_last_day,
            tokens_last_day: s.tokens_last_day,
            sandbox: Some(s.sandbox).filter(|w| !w.is_empty()),
            webhooks: s.webhooks.into_iter().map(Webhook::from).collect(),
            server: s.server.map(|r| ServerRole {
                role: r.role,
                term: r.term,
                leader: r.leader,
            }),
        }
    }
}

impl From<pb::WebhookEndpoint> for Webhook {
    fn from(w: pb::WebhookEndpoint) -> Self {
        let pending = w.pending_id.map(|id| PendingWebhook {
            id,
            kind: w.pending_type.unwrap_or_default(),
            attempts: w.attempts,
            next_attempt_at_ms: w.next_attempt_at_ms,
        });
        Webhook {
            url: w.url,
            position: w.position,
            last_delivered_at_ms: w.last_delivered_at_ms,
            pending,
            last_error: w.last_error,
            last_error_at_ms: w.last_error_at_ms,
        }
    }
}

/// Landing as the server reports it; a server that says nothing (an older one) lands.
fn landing(l: Option<pb::Landing>) -> Landing {
    match l {
        Some(l) if l.state == "paused" => {
            Landing::Paused(l.reason.unwrap_or_else(|| "no reason given".into()))
        }
        _ => Landing::Running,
    }
}

fn train(t: pb::QueueTrain) -> Train {
    Train {
        id: t.id,
        tasks: t.tasks,
        step: t.step,
        ahead: t.ahead,
        runners: t.runners,
    }
}

impl From<pb::GetQueueResponse> for Queue {
    fn from(q: pb::GetQueueResponse) -> Self {
        Queue {
            // A server older than `trains` sends the first train alone.
            trains: if q.trains.is_empty() {
                q.train.clone().into_iter().map(train).collect()
            } else {
                q.trains.into_iter().map(train).collect()
            },
            train: q.train.map(train),
            running: q
                .running
                .into_iter()
                .map(|r| Running {
                    id: r.id,
                    runner: r.runner,
                    since_ms: r.since_ms,
                })
                .collect(),
            waiting: q
                .waiting
                .into_iter()
                .map(|w| Waiting {
                    id: w.id,
                    status: w.status.into(),
                    position: w.position,
                    waiting_for: w.waiting_for,
                    eta_seconds: w.eta_seconds,
                })
                .collect(),
            red_base: q.landing.as_ref().and_then(|l| l.red_base.clone()),
            landing: landing(q.landing),
            queue_paused: q.queue_paused,
            queue_pause_reason: q.queue_pause_reason,
        }
    }
}

impl From<pb::Runner> for Runner {
    fn from(r: pb::Runner) -> Self {
        Runner {
            id: r.id,
            name: r.name,
            state: r.state.into(),
            slots_used: r.slots_used,
            slots_total: r.slots_total,
            last_heartbeat_ms: r.last_heartbeat_ms,
            labels: r.labels,
            version: r.version,
            health: health(r.unhealthy_reason),
            sandbox: r.sandbox,
            builds: r
                .builds
                .into_iter()
                .map(|b| RunnerBuild {
                    id: b.id,
                    commit: b.commit,
                })
                .collect(),
        }
    }
}

impl From<pb::LogLine> for LogLine {
    fn from(l: pb::LogLine) -> Self {
        LogLine {
            seq: l.seq,
            at_ms: l.at_ms,
            stream: l.stream.into(),
            phase: l.phase.into(),
            text: l.text,
        }
    }
}

fn lines(batch: pb::LogBatch) -> LogItem {
    LogItem::Lines {
        run_id: batch.run_id,
        lines: batch.lines.into_iter().map(LogLine::from).collect(),
    }
}

/// One message of a `logs` stream; `None` for a message without a kind.
pub fn log_item(msg: pb::TaskLogsResponse) -> Option<LogItem> {
    use pb::task_logs_response::Kind;
    Some(match msg.kind? {
        Kind::Run(h) => LogItem::Run(LogRun {
            run_id: h.run_id,
            phase: h.phase.into(),
            attempt: h.attempt,
            runner: h.runner,
        }),
        Kind::Lines(batch) => lines(batch),
        Kind::EncodedLines(bytes) => match pb::LogBatch::decode(bytes.as_ref()) {
            Ok(batch) => lines(batch),
            Err(e) => LogItem::Undecodable(e.to_string()),
        },
        Kind::Status(raw) => LogItem::Status(raw.into()),
    })
}

impl From<pb::FeedEntry> for FeedEntry {
    fn from(e: pb::FeedEntry) -> Self {
        let data = match serde_json::from_str::<serde_json::Value>(&e.data_json) {
            Ok(value @ serde_json::Value::Object(_)) => value,
            _ => serde_json::Value::Object(serde_json::Map::new()),
        };
        FeedEntry {
            position: e.position,
            topic: e.topic,
            subject: e.subject,
            kind: e.kind,
            at_ms: e.at_ms,
            message: e.message,
            data,
        }
    }
}

impl From<pb::TaskTransition> for Transition {
    fn from(t: pb::TaskTransition) -> Self {
        Transition {
            event_id: t.event_id,
            task_id: t.task_id,
            at_ms: t.at_ms,
            kind: t.kind,
            from: from_status(t.from_status),
            to: t.to_status.into(),
            message: t.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_values_this_client_does_not_know_are_unknown() {
        assert_eq!(TaskStatus::from(99), TaskStatus::Unknown);
        assert_eq!(TaskStatus::from(0), TaskStatus::Unknown);
        assert_eq!(Phase::from(0), Phase::Unknown);
        assert_eq!(RunStatus::from(-1), RunStatus::Unknown);
        assert_eq!(RunnerState::from(7), RunnerState::Unknown);
        assert_eq!(LogStream::from(9), LogStream::Unknown);
        assert_eq!(failure_kind(0), None);
        assert_eq!(failure_kind(2), Some(FailureKind::Infrastructure));
        assert_eq!(cost_source(0), CostSource::None);
        assert_eq!(cost_source(9), CostSource::None);
        assert_eq!(cost_source(1), CostSource::Reported);
        assert_eq!(cost_source(2), CostSource::Estimated);
    }

    #[test]
    fn every_status_goes_to_the_server_as_itself() {
        for status in TaskStatus::KNOWN {
            assert_eq!(TaskStatus::from(task_status(status)), status);
            assert_eq!(TaskStatus::from_word(status.word()), Some(status));
        }
        assert_eq!(task_status(TaskStatus::Unknown), 0);
        assert_eq!(TaskStatus::from_word("unknown"), None);
    }

    #[test]
    fn a_transition_from_nothing_has_no_from() {
        let t = Transition::from(pb::TaskTransition {
            task_id: "t-1".into(),
            at_ms: 5,
            kind: "created".into(),
            from_status: 0,
            to_status: pb::TaskStatus::Open.into(),
            message: String::new(),
            event_id: 9,
        });
        assert_eq!(t.from, None);
        assert_eq!(t.event_id, 9);
        assert_eq!(t.to, TaskStatus::Open);
        assert_eq!(
            from_status(pb::TaskStatus::Done.into()),
            Some(TaskStatus::Done)
        );
        assert_eq!(from_status(42), None);
    }

    #[test]
    fn health_is_the_reason_or_nothing() {
        let mut status = pb::GetStatusResponse::default();
        assert_eq!(Status::from(status.clone()).health, Health::Healthy);
        status.unhealthy = Some("the disk is full".into());
        assert_eq!(
            Status::from(status).health.reason(),
            Some("the disk is full")
        );
    }

    #[test]
    fn landing_is_paused_only_when_the_server_says_so() {
        assert_eq!(landing(None), Landing::Running);
        let paused = pb::Landing {
            state: "paused".into(),
            reason: Some("the base is red".into()),
            red_base: None,
        };
        assert_eq!(landing(Some(paused)).reason(), Some("the base is red"));
        let running = pb::Landing {
            state: "running".into(),
            reason: None,
            red_base: None,
        };
        assert_eq!(landing(Some(running)), Landing::Running);
    }

    #[test]
    fn a_reply_without_its_task_is_refused() {
        let err = TaskDetail::try_from(pb::GetTaskResponse::default()).expect_err("refused");
        assert_eq!(err.to_string(), "the server answered without the task");
    }

    #[test]
    fn encoded_lines_are_decoded_and_garbage_is_said() {
        use pb::task_logs_response::Kind;
        let batch = pb::LogBatch {
            run_id: 3,
            lines: vec![pb::LogLine {
                seq: 1,
                at_ms: 0,
                stream: pb::LogStream::Stdout.into(),
                phase: pb::RunPhase::Dev.into(),
                text: "hello".into(),
            }],
        };
        let encoded = pb::TaskLogsResponse {
            kind: Some(Kind::EncodedLines(batch.encode_to_vec().into())),
        };
        match log_item(encoded) {
            Some(LogItem::Lines { run_id: 3, lines }) => assert_eq!(lines[0].text, "hello"),
            other => panic!("not the batch: {other:?}"),
        }
        let garbage = pb::TaskLogsResponse {
            kind: Some(Kind::EncodedLines(vec![0xff, 0xff].into())),
        };
        assert!(matches!(log_item(garbage), Some(LogItem::Undecodable(_))));
        assert_eq!(log_item(pb::TaskLogsResponse { kind: None }), None);
    }
}
