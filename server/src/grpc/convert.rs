//! Domain types to and from the wire's prost types, validating what comes in (so an
//! `*_UNSPECIFIED` or unknown enum value, a malformed ID, never gets past the edge).

use pipeline_proto::v1 as pb;
use tonic::Status;

use super::status_from_error;
use crate::coordinator::queue::QueueView;
use crate::coordinator::{Listed, RunnerInfo, RunnerState, Status as StatusView, TaskDetail};
use crate::domain::{
    CostSource, FailureKind, LogLine, LogStream, NewTask, Phase, Run, RunStatus, Task, TaskEvent,
    TaskId, TaskStatus, Usage,
};
use crate::lifecycle::Policy;
use crate::logs::LogItem;

pub(crate) fn task_id(raw: &str) -> Result<TaskId, Status> {
    TaskId::parse(raw).map_err(|e| status_from_error(e.into()))
}

pub(crate) fn dependency_ids(raw: &[String]) -> Result<Vec<TaskId>, Status> {
    raw.iter()
        .map(|d| TaskId::parse(d).map_err(|e| Status::invalid_argument(format!("dependency: {e}"))))
        .collect()
}

pub(crate) fn status_to_pb(s: TaskStatus) -> pb::TaskStatus {
    match s {
        TaskStatus::Open => pb::TaskStatus::Open,
        TaskStatus::InProgress => pb::TaskStatus::InProgress,
        TaskStatus::Verified => pb::TaskStatus::Verified,
        TaskStatus::Done => pb::TaskStatus::Done,
        TaskStatus::NeedsHelp => pb::TaskStatus::NeedsHelp,
        TaskStatus::Cancelled => pb::TaskStatus::Cancelled,
    }
}

pub(crate) fn status_from_pb(raw: i32) -> Result<TaskStatus, Status> {
    match pb::TaskStatus::try_from(raw) {
        Ok(pb::TaskStatus::Open) => Ok(TaskStatus::Open),
        Ok(pb::TaskStatus::InProgress) => Ok(TaskStatus::InProgress),
        Ok(pb::TaskStatus::Verified) => Ok(TaskStatus::Verified),
        Ok(pb::TaskStatus::Done) => Ok(TaskStatus::Done),
        Ok(pb::TaskStatus::NeedsHelp) => Ok(TaskStatus::NeedsHelp),
        Ok(pb::TaskStatus::Cancelled) => Ok(TaskStatus::Cancelled),
        Ok(pb::TaskStatus::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "unknown task status {raw}; use open, in_progress, verified, done, needs_help or cancelled"
        ))),
    }
}

impl From<&Task> for pb::Task {
    fn from(t: &Task) -> Self {
        pb::Task {
            id: t.id.to_string(),
            title: t.title.clone(),
            description: t.description.clone(),
            namespace: t.namespace.clone(),
            priority: u32::from(t.priority),
            parent: t.parent.as_ref().map(ToString::to_string),
            depends_on: t.depends_on.iter().map(ToString::to_string).collect(),
            status: status_to_pb(t.state.status).into(),
            patchset: t.state.patchset,
            failures: t.state.failures,
            cost_cents: t.state.cost_cents,
            backoff_until_ms: t.state.backoff_until,
            feedback: t.state.feedback.clone(),
            created_at_ms: t.created_at,
            updated_at_ms: t.updated_at,
            waiting_for: Vec::new(),
            lost_leases: t.state.lost_leases,
            requires: t.requires.clone(),
            max_cost_cents: t.state.max_cost_cents,
            paused: t.paused.clone(),
            // Filled in where the runs are at hand (a list page, task show).
            tokens: 0,
            // Filled in by the control API, which knows the server's policy.
            approval: None,
            epic: t.children.any(),
        }
    }
}

pub(crate) fn phase_to_pb(p: Phase) -> pb::RunPhase {
    match p {
        Phase::Dev => pb::RunPhase::Dev,
        Phase::Verify => pb::RunPhase::Verify,
        Phase::Integrate => pb::RunPhase::Integrate,
    }
}

impl From<&LogLine> for pb::LogLine {
    fn from(l: &LogLine) -> Self {
        let stream = match l.stream {
            LogStream::Stdout => pb::LogStream::Stdout,
            LogStream::Stderr => pb::LogStream::Stderr,
            LogStream::Runner => pb::LogStream::Runner,
            LogStream::Server => pb::LogStream::Server,
            LogStream::Raw => pb::LogStream::Raw,
        };
        pb::LogLine {
            seq: l.seq,
            at_ms: l.at,
            stream: stream.into(),
            phase: phase_to_pb(l.phase).into(),
            text: l.text.clone(),
        }
    }
}

/// A runner's log line, validated: a seq from 1, a known stream, a dev or verify phase.
/// The largest log line number: lines are stored under SQLite's signed 64-bit integers, so a
/// larger number would not be the number stored (nor the one acknowledged).
pub const MAX_LOG_SEQ: u64 = i64::MAX.unsigned_abs();

pub(crate) fn log_line_from_pb(l: pb::LogLine) -> Result<LogLine, Status> {
    let stream = match pb::LogStream::try_from(l.stream) {
        Ok(pb::LogStream::Stdout) => LogStream::Stdout,
        Ok(pb::LogStream::Stderr) => LogStream::Stderr,
        Ok(pb::LogStream::Runner) => LogStream::Runner,
        Ok(pb::LogStream::Raw) => LogStream::Raw,
        _ => {
            return Err(Status::invalid_argument(
                "a log line needs a stream: stdout, stderr, runner or raw",
            ));
        }
    };
    let phase = match pb::RunPhase::try_from(l.phase) {
        Ok(pb::RunPhase::Dev) => Phase::Dev,
        Ok(pb::RunPhase::Verify) => Phase::Verify,
        _ => {
            return Err(Status::invalid_argument(
                "a runner's log line is of the dev or verify phase",
            ));
        }
    };
    if l.seq == 0 {
        return Err(Status::invalid_argument("log lines are numbered from 1"));
    }
    if l.seq > MAX_LOG_SEQ {
        return Err(Status::invalid_argument(format!(
            "log line {} is past the largest line number, {MAX_LOG_SEQ}; number lines from 1",
            l.seq
        )));
    }
    Ok(LogLine {
        seq: l.seq,
        at: l.at_ms,
        stream,
        phase,
        text: l.text,
    })
}

impl From<&Run> for pb::Run {
    fn from(r: &Run) -> Self {
        let phase = phase_to_pb(r.phase);
        let status = match r.status {
            RunStatus::Running => pb::RunStatus::Running,
            RunStatus::Success => pb::RunStatus::Success,
            RunStatus::Failure => pb::RunStatus::Failure,
        };
        pb::Run {
            id: r.id,
            phase: phase.into(),
            patchset: r.patchset,
            attempt: r.attempt,
            runner: r.runner.clone(),
            status: status.into(),
            cost_cents: r.cost_cents,
            started_at_ms: r.started_at,
            finished_at_ms: r.finished_at,
            error: r.error.clone(),
            failure_kind: match r.failure_kind {
                None => pb::FailureKind::Unspecified,
                Some(FailureKind::Task) => pb::FailureKind::Task,
                Some(FailureKind::Infrastructure) => pb::FailureKind::Infrastructure,
            }
            .into(),
            train: r.train,
            builds: r.builds,
            usage: r.usage.as_ref().map(usage_to_pb),
        }
    }
}

fn usage_to_pb(u: &Usage) -> pb::Usage {
    pb::Usage {
        agent: u.agent.clone(),
        model: u.model.clone(),
        input_tokens: u.input_tokens,
        cached_input_tokens: u.cached_input_tokens,
        cache_write_tokens: u.cache_write_tokens,
        output_tokens: u.output_tokens,
        reasoning_tokens: u.reasoning_tokens,
        cost_cents: u.cost_cents,
        cost_source: match u.cost_source {
            CostSource::Reported => pb::CostSource::Reported,
            CostSource::Estimated => pb::CostSource::Estimated,
            CostSource::None => pb::CostSource::None,
        }
        .into(),
        complete: u.complete,
        session_id: u.session_id.clone(),
    }
}

impl From<&TaskEvent> for pb::TaskEvent {
    fn from(e: &TaskEvent) -> Self {
        pb::TaskEvent {
            id: e.id,
            at_ms: e.at,
            kind: e.kind.as_str().to_owned(),
            from_status: e
                .from
                .map_or(pb::TaskStatus::Unspecified, status_to_pb)
                .into(),
            to_status: status_to_pb(e.to).into(),
            message: e.message.clone(),
        }
    }
}

impl From<&RunnerInfo> for pb::Runner {
    fn from(r: &RunnerInfo) -> Self {
        let state = match r.state {
            RunnerState::Idle => pb::RunnerState::Idle,
            RunnerState::Busy => pb::RunnerState::Busy,
            RunnerState::Draining => pb::RunnerState::Draining,
            RunnerState::Offline => pb::RunnerState::Offline,
            RunnerState::Revoked => pb::RunnerState::Revoked,
        };
        pb::Runner {
            id: r.id.clone(),
            name: r.name.clone(),
            state: state.into(),
            slots_used: r.slots_used,
            slots_total: r.slots_total,
            last_heartbeat_ms: r.last_heartbeat,
            labels: r.labels.clone(),
            version: r.version.clone(),
            unhealthy_reason: r.unhealthy.clone(),
            sandbox: r.sandbox.map(|k| k.as_str().to_owned()),
            builds: r
                .builds
                .iter()
                .map(|(id, commit)| pb::RunnerBuild {
                    id: id.clone(),
                    commit: commit.to_string(),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::CreateTaskRequest> for NewTask {
    type Error = Status;

    fn try_from(req: pb::CreateTaskRequest) -> Result<Self, Status> {
        let id = req
            .id
            .as_deref()
            .map(|raw| TaskId::parse_chosen(raw).map_err(|e| status_from_error(e.into())))
            .transpose()?;
        let parent = req
            .parent
            .as_deref()
            .map(|p| TaskId::parse(p).map_err(|e| Status::invalid_argument(format!("parent: {e}"))))
            .transpose()?;
        let depends_on = dependency_ids(&req.depends_on)?;
        NewTask::new(
            id,
            req.title,
            req.description,
            req.namespace,
            req.priority,
            parent,
            depends_on,
        )
        .and_then(|t| t.with_requires(req.requires))
        .and_then(|t| t.with_max_cost(req.max_cost_cents))
        .map(|t| NewTask {
            approval: req.approval,
            ..t
        })
        .map(|t| t.as_epic(req.epic))
        .map_err(status_from_error)
    }
}

pub(crate) fn log_item_to_pb(item: &LogItem) -> pb::TaskLogsResponse {
    use pb::task_logs_response::Kind;
    let kind = match item {
        LogItem::Run(run) => Kind::Run(pb::LogRunHeader {
            run_id: run.id,
            phase: phase_to_pb(run.phase).into(),
            attempt: run.attempt,
            runner: run.runner.clone(),
        }),
        LogItem::Lines {
            run_id,
            lines,
            encoded,
        } => Kind::EncodedLines(
            encoded
                .get_or_init(|| {
                    prost::Message::encode_to_vec(&pb::LogBatch {
                        run_id: *run_id,
                        lines: lines.iter().map(Into::into).collect(),
                    })
                    .into()
                })
                .clone(),
        ),
        LogItem::Status(s) => Kind::Status(status_to_pb(*s).into()),
    };
    pb::TaskLogsResponse { kind: Some(kind) }
}

pub(crate) fn transition_to_pb(e: &TaskEvent) -> pb::TaskTransition {
    pb::TaskTransition {
        task_id: e.task_id.to_string(),
        at_ms: e.at,
        kind: e.kind.as_str().to_owned(),
        from_status: e
            .from
            .map_or(pb::TaskStatus::Unspecified, status_to_pb)
            .into(),
        to_status: status_to_pb(e.to).into(),
        message: e.message.clone(),
        event_id: e.id,
    }
}

/// A task on the wire, with what depends on the server's policy (its approval).
pub(crate) fn task_to_pb(policy: &Policy, task: &Task) -> pb::Task {
    let mut t = pb::Task::from(task);
    t.approval = policy.approval(&task.state).map(str::to_owned);
    t
}

/// A row of a task list: the task with what holds it and its tokens, and only the end of its
/// feedback, so that a page stays small whatever the failures said (`task show` has it all).
pub(crate) fn listed_to_pb(policy: &Policy, l: &Listed) -> pb::Task {
    // A row carries the end of the feedback only (the store reads no more): a page stays
    // small whatever the failures said (`task show` has it all).
    let mut task = task_to_pb(policy, &l.task);
    task.waiting_for = l.waiting_for.clone();
    task.tokens = l.tokens;
    task
}

/// `task show`'s answer: the task (with its approval), its runs, history and children.
pub(crate) fn task_response(policy: &Policy, d: &TaskDetail) -> pb::GetTaskResponse {
    let mut response = detail_to_pb(d);
    if let Some(task) = response.task.as_mut() {
        task.approval = policy.approval(&d.task.state).map(str::to_owned);
    }
    response
}

fn landing_to_pb(
    (state, reason): (&'static str, Option<String>),
    red_base: Option<String>,
) -> pb::Landing {
    pb::Landing {
        state: state.to_owned(),
        reason,
        red_base,
    }
}

/// `status`'s answer.
pub(crate) fn status_response(s: StatusView) -> pb::GetStatusResponse {
    pb::GetStatusResponse {
        open: s.counts.open,
        in_progress: s.counts.in_progress,
        verified: s.counts.verified,
        done: s.counts.done,
        needs_help: s.counts.needs_help,
        cancelled: s.counts.cancelled,
        active_dev_runs: s.counts.active_dev_runs,
        runners: s.runners,
        base: s.base,
        unhealthy: s.unhealthy,
        landing: Some(landing_to_pb(s.landing, s.red_base)),
        queue_paused: s.queue_paused,
        queue_pause_reason: s.queue_pause_reason,
        queue_paused_at_ms: s.queue_paused_at,
        builds_per_landed: s.builds_per_landed,
        integration_depth: s.integration_depth.map(|d| d.0),
        integration_slots: s.integration_depth.map(|d| d.1),
        cost_cents_last_day: s.cost_cents_last_day,
        tokens_last_day: s.tokens_last_day,
        sandbox: s.sandbox.as_str().to_owned(),
        webhooks: s.webhooks.into_iter().map(webhook_to_pb).collect(),
        server: Some(pb::ServerRole {
            role: s.server.role.to_owned(),
            term: s.server.term,
            leader: s.server.leader,
        }),
    }
}

fn webhook_to_pb(w: crate::webhooks::EndpointStatus) -> pb::WebhookEndpoint {
    let pending = w.pending.as_ref();
    pb::WebhookEndpoint {
        url: w.url,
        position: w.position,
        last_delivered_at_ms: w.last_delivered_at,
        pending_id: pending.map(|p| p.id.clone()),
        pending_type: pending.map(|p| p.kind.to_owned()),
        attempts: pending.map_or(0, |p| p.attempts),
        next_attempt_at_ms: pending.and_then(|p| p.next_attempt_at),
        last_error: w.last_error,
        last_error_at_ms: w.last_error_at,
    }
}

/// `queue`'s answer.
pub(crate) fn queue_response(q: QueueView) -> pb::GetQueueResponse {
    let trains: Vec<pb::QueueTrain> = q
        .trains
        .into_iter()
        .map(|t| pb::QueueTrain {
            id: t.id,
            tasks: t.tasks.iter().map(ToString::to_string).collect(),
            step: t.step,
            ahead: t.ahead,
            runners: t.runners,
        })
        .collect();
    pb::GetQueueResponse {
        train: trains.first().cloned(),
        trains,
        waiting: q
            .waiting
            .into_iter()
            .map(|w| pb::QueueEntry {
                id: w.id.to_string(),
                status: status_to_pb(w.status).into(),
                position: w.position,
                waiting_for: w.waiting_for,
                eta_seconds: w.eta_seconds,
            })
            .collect(),
        landing: Some(landing_to_pb(q.landing, q.red_base)),
        queue_paused: q.queue_paused,
        queue_pause_reason: q.queue_pause_reason,
        running: q
            .running
            .into_iter()
            .map(|r| pb::QueueRunning {
                id: r.id.to_string(),
                runner: r.runner,
                since_ms: r.since,
            })
            .collect(),
    }
}

pub(crate) fn detail_to_pb(d: &TaskDetail) -> pb::GetTaskResponse {
    let mut task = pb::Task::from(&d.task);
    task.waiting_for = d.waiting_for.clone();
    task.tokens = d
        .runs
        .iter()
        .filter_map(|r| r.usage.as_ref())
        .map(crate::domain::Usage::tokens)
        .sum();
    pb::GetTaskResponse {
        task: Some(task),
        runs: d.runs.iter().map(Into::into).collect(),
        events: d.events.iter().map(Into::into).collect(),
        children: d
            .children
            .iter()
            .map(|(id, status)| pb::TaskChild {
                id: id.to_string(),
                status: status_to_pb(*status).into(),
            })
            .collect(),
        children_cost_cents: d.children_cost_cents,
        offered_commit: d.offered_commit.as_ref().map(ToString::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::bearer;

    #[test]
    fn create_requests_are_validated_at_the_edge() {
        let ok = pb::CreateTaskRequest {
            id: Some("fix-1".into()),
            title: "Fix it".into(),
            priority: Some(1),
            depends_on: vec!["t-1".into(), "t-1".into()],
            ..Default::default()
        };
        let new = NewTask::try_from(ok).expect("valid");
        assert_eq!(new.depends_on.len(), 1, "duplicates folded");
        for (req, code, says) in [
            (
                pb::CreateTaskRequest {
                    id: Some("../x".into()),
                    title: "t".into(),
                    ..Default::default()
                },
                tonic::Code::InvalidArgument,
                "invalid task id",
            ),
            (
                pb::CreateTaskRequest {
                    title: "t".into(),
                    priority: Some(9),
                    ..Default::default()
                },
                tonic::Code::InvalidArgument,
                "invalid priority 9",
            ),
            (
                pb::CreateTaskRequest {
                    title: "t".into(),
                    depends_on: vec!["-rf".into()],
                    ..Default::default()
                },
                tonic::Code::InvalidArgument,
                "dependency: invalid task id",
            ),
            (
                pb::CreateTaskRequest::default(),
                tonic::Code::InvalidArgument,
                "needs a title",
            ),
        ] {
            let status = NewTask::try_from(req).expect_err(says);
            assert_eq!(status.code(), code);
            assert!(status.message().contains(says), "{}", status.message());
        }
    }

    #[test]
    fn the_bearer_scheme_is_matched_without_regard_to_case() {
        let token = |value: &str| {
            let mut md = tonic::metadata::MetadataMap::new();
            md.insert("authorization", value.parse().expect("value"));
            bearer(&md).map(str::to_owned)
        };
        for value in [
            "Bearer pla_x",
            "bearer pla_x",
            "BEARER pla_x",
            "Bearer  pla_x ",
        ] {
            assert_eq!(token(value).as_deref(), Some("pla_x"), "{value:?}");
        }
        for value in ["Basic pla_x", "Bearerpla_x", "Bearer ", "pla_x", "Bearer"] {
            assert_eq!(token(value), None, "{value:?}");
        }
        assert_eq!(bearer(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn log_line_numbers_fit_the_database() {
        let line = |seq| pb::LogLine {
            seq,
            stream: pb::LogStream::Stdout.into(),
            phase: pb::RunPhase::Dev.into(),
            ..Default::default()
        };
        assert!(log_line_from_pb(line(1)).is_ok());
        assert_eq!(
            log_line_from_pb(line(MAX_LOG_SEQ)).map(|l| l.seq).ok(),
            Some(MAX_LOG_SEQ)
        );
        assert_eq!(i64::try_from(MAX_LOG_SEQ).ok(), Some(i64::MAX));
        for seq in [0, MAX_LOG_SEQ + 1, u64::MAX] {
            let err = log_line_from_pb(line(seq)).expect_err("refused");
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{seq}");
        }
    }

    #[test]
    fn unspecified_or_unknown_statuses_are_refused() {
        assert!(status_from_pb(0).is_err());
        assert!(status_from_pb(99).is_err());
        assert_eq!(status_from_pb(4).ok(), Some(TaskStatus::Done));
    }
}
