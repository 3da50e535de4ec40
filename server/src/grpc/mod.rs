//! The gRPC edge of the control API. Each method decodes and validates its request into domain
//! types, calls one [`Coordinator`] method, encodes the answer, and maps the error with
//! [`status_from_error`]. Nothing else happens here.
//!
//! Architecture invariant: only this module (and the `pipeline-proto` crate) knows prost types.
//! The runner service is in [`runner`].

pub mod edge;
pub mod runner;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use pipeline_proto::v1 as pb;
use pipeline_proto::v1::control_service_server::ControlService;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::coordinator::{Coordinator, RunnerInfo, RunnerState, TaskDetail};
use crate::domain::{
    FailureKind, LogLine, LogStream, NewTask, Phase, Run, RunStatus, Task, TaskEvent, TaskId,
    TaskStatus,
};
use crate::error::Error;
use crate::logs::LogItem;
use crate::store::Store;

/// Who holds a token (the server's `Auth::identify`).
pub type Identify = Arc<dyn Fn(&str) -> Option<Caller> + Send + Sync>;

/// Identifies the caller from `authorization: Bearer <token>` and puts a [`Caller`] in the
/// request's extensions; a missing or unknown credential is `Unauthenticated`. With
/// `admin_only` (the control API), anything but the admin token is `PermissionDenied`.
#[derive(Clone)]
pub struct Authenticate {
    pub auth: Identify,
    pub admin_only: bool,
}

/// The bearer token a call presents: `authorization: Bearer <token>`, the scheme matched
/// without regard to case (RFC 6750 §2.1, RFC 9110 §11.1).
pub(crate) fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?.trim_start();
    let (scheme, token) = value.split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Said when a credential is not (or no longer) valid.
pub(crate) const INVALID_CREDENTIAL: &str =
    "the credential is not valid (unknown, rotated or revoked)";

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = bearer(req.metadata()) else {
            return Err(Status::unauthenticated(
                "no credential: pass --token or set PIPELINE_TOKEN",
            ));
        };
        let caller =
            (self.auth)(token).ok_or_else(|| Status::unauthenticated(INVALID_CREDENTIAL))?;
        if self.admin_only && caller != Caller::Admin {
            return Err(Status::permission_denied(
                "this credential may not use the control API; use the admin token",
            ));
        }
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The caller the interceptor found.
pub(crate) fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credential"))
}

/// The one mapping from domain errors to gRPC statuses.
pub fn status_from_error(err: Error) -> Status {
    match err {
        Error::InvalidArgument(m) => Status::invalid_argument(m),
        Error::NotFound(m) => Status::not_found(m),
        Error::AlreadyExists(m) => Status::already_exists(m),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::Conflict(m) => Status::aborted(m),
        Error::Unauthenticated(m) => Status::unauthenticated(m),
        Error::PermissionDenied(m) => Status::permission_denied(m),
        Error::ResourceExhausted(m) => Status::resource_exhausted(m),
        err @ Error::Internal(_) => {
            tracing::error!(error = %err, "internal error");
            Status::internal(err.to_string())
        }
    }
}

fn task_id(raw: &str) -> Result<TaskId, Status> {
    TaskId::parse(raw).map_err(|e| status_from_error(e.into()))
}

fn dependency_ids(raw: &[String]) -> Result<Vec<TaskId>, Status> {
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

fn status_from_pb(raw: i32) -> Result<TaskStatus, Status> {
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
        _ => {
            return Err(Status::invalid_argument(
                "a log line needs a stream: stdout, stderr or runner",
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
        }
    }
}

impl From<&TaskEvent> for pb::TaskEvent {
    fn from(e: &TaskEvent) -> Self {
        pb::TaskEvent {
            id: e.id,
            at_ms: e.at,
            kind: e.kind.clone(),
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
        }
    }
}

impl TryFrom<pb::CreateTaskRequest> for NewTask {
    type Error = Status;

    fn try_from(req: pb::CreateTaskRequest) -> Result<Self, Status> {
        let id = req.id.as_deref().map(task_id).transpose()?;
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
        .map_err(status_from_error)
    }
}

/// The control service over a shared coordinator.
pub struct ControlApi<S> {
    coordinator: Arc<Coordinator<S>>,
    /// Cancelled when the server is asked to stop: streams that only read (logs, watch) end
    /// at once, so they do not hold the shutdown up.
    shutdown: CancellationToken,
}

impl<S> ControlApi<S> {
    pub fn new(coordinator: Arc<Coordinator<S>>, shutdown: CancellationToken) -> Self {
        Self {
            coordinator,
            shutdown,
        }
    }
}

fn log_item_to_pb(item: &LogItem) -> pb::TaskLogsResponse {
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

fn transition_to_pb(e: &TaskEvent) -> pb::TaskTransition {
    pb::TaskTransition {
        task_id: e.task_id.to_string(),
        at_ms: e.at,
        kind: e.kind.clone(),
        from_status: e
            .from
            .map_or(pb::TaskStatus::Unspecified, status_to_pb)
            .into(),
        to_status: status_to_pb(e.to).into(),
        message: e.message.clone(),
    }
}

/// Runs `produce` into a channel and streams what it sends, mapped by `map`; a failure of
/// `produce` ends the stream with its status.
fn stream_from<T, U, F>(
    produce: impl FnOnce(tokio::sync::mpsc::Sender<T>) -> F,
    map: fn(&T) -> U,
) -> std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<U, Status>> + Send>>
where
    T: Send + 'static,
    U: Send + 'static,
    F: std::future::Future<Output = crate::error::Result<()>> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<T>(64);
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Result<U, Status>>(64);
    let work = produce(tx);
    tokio::spawn(async move {
        let fail = out_tx.clone();
        let forward = async move {
            while let Some(item) = rx.recv().await {
                if out_tx.send(Ok(map(&item))).await.is_err() {
                    break;
                }
            }
        };
        let (result, ()) = tokio::join!(work, forward);
        if let Err(err) = result {
            let _ = fail.send(Err(status_from_error(err))).await;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx))
}

fn detail_to_pb(d: &TaskDetail) -> pb::GetTaskResponse {
    let mut task = pb::Task::from(&d.task);
    task.waiting_for = d.waiting_for.clone();
    pb::GetTaskResponse {
        task: Some(task),
        runs: d.runs.iter().map(Into::into).collect(),
        events: d.events.iter().map(Into::into).collect(),
    }
}

#[tonic::async_trait]
impl<S: Store> ControlService for ControlApi<S> {
    async fn create_task(
        &self,
        request: Request<pb::CreateTaskRequest>,
    ) -> Result<Response<pb::CreateTaskResponse>, Status> {
        let new = NewTask::try_from(request.into_inner())?;
        let task = self
            .coordinator
            .create_task(new)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::CreateTaskResponse {
            task: Some((&task).into()),
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let status = request
            .into_inner()
            .status
            .map(status_from_pb)
            .transpose()?;
        let tasks = self
            .coordinator
            .list_tasks(status)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks
                .iter()
                .map(|(t, why)| {
                    let mut task = pb::Task::from(t);
                    task.waiting_for = why.clone();
                    task
                })
                .collect(),
        }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let id = task_id(&request.into_inner().id)?;
        let detail = self
            .coordinator
            .show_task(&id)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(detail_to_pb(&detail)))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let id = task_id(&request.into_inner().id)?;
        let task = self
            .coordinator
            .cancel(&id)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::CancelTaskResponse {
            task: Some((&task).into()),
        }))
    }

    async fn retry_task(
        &self,
        request: Request<pb::RetryTaskRequest>,
    ) -> Result<Response<pb::RetryTaskResponse>, Status> {
        let id = task_id(&request.into_inner().id)?;
        let task = self
            .coordinator
            .retry(&id)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::RetryTaskResponse {
            task: Some((&task).into()),
        }))
    }

    async fn add_dependencies(
        &self,
        request: Request<pb::AddDependenciesRequest>,
    ) -> Result<Response<pb::AddDependenciesResponse>, Status> {
        let req = request.into_inner();
        let id = task_id(&req.id)?;
        let deps = dependency_ids(&req.depends_on)?;
        if deps.is_empty() {
            return Err(Status::invalid_argument(
                "name at least one dependency with --on",
            ));
        }
        let task = self
            .coordinator
            .add_dependencies(&id, &deps)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::AddDependenciesResponse {
            task: Some((&task).into()),
        }))
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let s = self.coordinator.status().await.map_err(status_from_error)?;
        Ok(Response::new(pb::GetStatusResponse {
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
        }))
    }

    async fn list_runners(
        &self,
        _request: Request<pb::ListRunnersRequest>,
    ) -> Result<Response<pb::ListRunnersResponse>, Status> {
        Ok(Response::new(pb::ListRunnersResponse {
            runners: self.coordinator.runners().iter().map(Into::into).collect(),
        }))
    }

    type TaskLogsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::TaskLogsResponse, Status>> + Send>,
    >;

    async fn task_logs(
        &self,
        request: Request<pb::TaskLogsRequest>,
    ) -> Result<Response<Self::TaskLogsStream>, Status> {
        let req = request.into_inner();
        let id = task_id(&req.id)?;
        // Refuse an unknown task before the stream starts.
        self.coordinator
            .show_task(&id)
            .await
            .map_err(status_from_error)?;
        let coordinator = Arc::clone(&self.coordinator);
        let follow = req.follow;
        Ok(Response::new(Box::pin(until_cancelled(
            stream_from(
                move |tx| coordinator.stream_logs(id, follow, tx),
                log_item_to_pb,
            ),
            self.shutdown.clone(),
        ))))
    }

    async fn revoke_runner(
        &self,
        request: Request<pb::RevokeRunnerRequest>,
    ) -> Result<Response<pb::RevokeRunnerResponse>, Status> {
        let name = request.into_inner().name;
        let leases_released = self
            .coordinator
            .revoke(&name)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::RevokeRunnerResponse { leases_released }))
    }

    async fn forget_runner(
        &self,
        request: Request<pb::ForgetRunnerRequest>,
    ) -> Result<Response<pb::ForgetRunnerResponse>, Status> {
        let name = request.into_inner().name;
        self.coordinator
            .forget(&name)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::ForgetRunnerResponse {}))
    }

    async fn rotate_registration_token(
        &self,
        _request: Request<pb::RotateRegistrationTokenRequest>,
    ) -> Result<Response<pb::RotateRegistrationTokenResponse>, Status> {
        let (token, path) = self
            .coordinator
            .rotate_registration_token()
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::RotateRegistrationTokenResponse {
            token,
            path: path.display().to_string(),
        }))
    }

    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::TaskTransition, Status>> + Send>,
    >;

    async fn watch(
        &self,
        _request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let coordinator = Arc::clone(&self.coordinator);
        Ok(Response::new(Box::pin(until_cancelled(
            stream_from(
                move |tx| coordinator.stream_transitions(tx),
                |e: &Arc<TaskEvent>| transition_to_pb(e),
            ),
            self.shutdown.clone(),
        ))))
    }
}

/// `stream` until `token` is cancelled: a long-lived response stream that would otherwise hold
/// a graceful shutdown up ends with OK instead.
pub(crate) fn until_cancelled<St: Stream>(
    stream: St,
    token: CancellationToken,
) -> UntilCancelled<St> {
    UntilCancelled {
        stream: Box::pin(stream),
        cancelled: Box::pin(token.cancelled_owned()),
    }
}

pub(crate) struct UntilCancelled<St> {
    stream: Pin<Box<St>>,
    cancelled: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<St: Stream> Stream for UntilCancelled<St> {
    type Item = St::Item;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<St::Item>> {
        if self.cancelled.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        self.stream.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn errors_map_to_a_small_code_set() {
        let cases = [
            (
                Error::InvalidArgument("a".into()),
                tonic::Code::InvalidArgument,
            ),
            (Error::NotFound("a".into()), tonic::Code::NotFound),
            (Error::AlreadyExists("a".into()), tonic::Code::AlreadyExists),
            (
                Error::FailedPrecondition("a".into()),
                tonic::Code::FailedPrecondition,
            ),
            (Error::Conflict("a".into()), tonic::Code::Aborted),
            (Error::Internal("a".into()), tonic::Code::Internal),
        ];
        for (err, code) in cases {
            assert_eq!(status_from_error(err).code(), code);
        }
    }
}
