//! The control service: what `pipelinectl` calls. Each method decodes and validates, calls one
//! coordinator method, encodes the answer, and maps the error.

use std::sync::Arc;

use pipeline_proto::v1 as pb;
use pipeline_proto::v1::control_service_server::ControlService;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::convert::{
    dependency_ids, listed_to_pb, log_item_to_pb, queue_response, status_from_pb, status_response,
    task_id, task_response, task_to_pb, transition_to_pb,
};
use super::{status_from_error, stream_from, until_cancelled};
use crate::coordinator::queue::Hold;
use crate::coordinator::{Coordinator, Page};
use crate::domain::{NewTask, TaskId};
use crate::repo::Repo;
use crate::store::Store;

/// The control service over a shared coordinator.
pub struct ControlApi<S> {
    coordinator: Arc<Coordinator<S, Repo>>,
    /// Cancelled when the server is asked to stop: streams that only read (logs, watch) end
    /// at once, so they do not hold the shutdown up, and new ones are refused as unavailable
    /// (a client waits for the server to come back, instead of asking again at once).
    shutdown: CancellationToken,
    /// Where the streams' producers run, for the app to wait for.
    streams: super::StreamTasks,
}

impl<S> ControlApi<S> {
    pub fn new(
        coordinator: Arc<Coordinator<S, Repo>>,
        shutdown: CancellationToken,
        streams: super::StreamTasks,
    ) -> Self {
        Self {
            coordinator,
            shutdown,
            streams,
        }
    }

    /// Refuses a new stream once the server is stopping.
    fn not_stopping(&self) -> Result<(), Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("the server is stopping"));
        }
        Ok(())
    }
}

impl<S: Store> ControlApi<S> {
    /// A task on the wire, with what depends on the server's policy (its approval).
    fn task_pb(&self, task: &crate::domain::Task) -> pb::Task {
        task_to_pb(self.coordinator.policy(), task)
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
            task: Some(self.task_pb(&task)),
        }))
    }

    async fn create_tasks(
        &self,
        request: Request<pb::CreateTasksRequest>,
    ) -> Result<Response<pb::CreateTasksResponse>, Status> {
        let asked = request.into_inner().tasks;
        if asked.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} tasks in one call; send at most {MAX_BATCH} at a time",
                asked.len()
            )));
        }
        let new = asked
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                NewTask::try_from(t).map_err(|s| {
                    Status::new(
                        s.code(),
                        format!("task {} of the batch: {}", i + 1, s.message()),
                    )
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let tasks = self
            .coordinator
            .create_tasks(new)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::CreateTasksResponse {
            tasks: tasks
                .iter()
                .map(|t| {
                    let mut task = self.task_pb(t);
                    task.description.clear();
                    task
                })
                .collect(),
        }))
    }

    async fn edit_task(
        &self,
        request: Request<pb::EditTaskRequest>,
    ) -> Result<Response<pb::EditTaskResponse>, Status> {
        let r = request.into_inner();
        let id = task_id(&r.id)?;
        let edit = crate::domain::TaskEdit::new(r.title, r.description, r.namespace, r.priority)
            .and_then(|e| e.with_requires(r.set_requires.then_some(r.requires)))
            .and_then(|e| e.with_max_cost(r.max_cost_cents))
            .and_then(crate::domain::TaskEdit::check_not_empty)
            .map(|e| crate::domain::TaskEdit {
                next_attempt: r.next_attempt,
                ..e
            })
            .map_err(status_from_error)?;
        let task = self
            .coordinator
            .edit_task(&id, edit)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::EditTaskResponse {
            task: Some(self.task_pb(&task)),
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let r = request.into_inner();
        let status = r.status.map(status_from_pb).transpose()?;
        let parent = r
            .parent
            .as_deref()
            .map(|p| TaskId::parse(p).map_err(|e| Status::invalid_argument(format!("parent: {e}"))))
            .transpose()?;
        let filter = crate::store::TaskFilter { status, parent };
        let page = Page {
            after: task_page_key(&r.page_token)?,
            size: page_size(r.page_size),
        };
        let (tasks, next) = self
            .coordinator
            .list_tasks(&filter, page)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks
                .iter()
                .map(|l| listed_to_pb(self.coordinator.policy(), l))
                .collect(),
            next_page_token: next.map_or_else(String::new, task_page_token),
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
        Ok(Response::new(task_response(
            self.coordinator.policy(),
            &detail,
        )))
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
            task: Some(self.task_pb(&task)),
        }))
    }

    async fn retry_task(
        &self,
        request: Request<pb::RetryTaskRequest>,
    ) -> Result<Response<pb::RetryTaskResponse>, Status> {
        let r = request.into_inner();
        let id = task_id(&r.id)?;
        let note = r
            .note
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty());
        if let Some(note) = &note
            && (note.len() > 64 * 1024 || note.contains('\0'))
        {
            return Err(Status::invalid_argument(
                "--note must be text of at most 64 KiB (no NUL bytes)",
            ));
        }
        let task = self
            .coordinator
            .retry(&id, note, r.fresh)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::RetryTaskResponse {
            task: Some(self.task_pb(&task)),
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
            task: Some(self.task_pb(&task)),
        }))
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let s = self.coordinator.status().await.map_err(status_from_error)?;
        Ok(Response::new(status_response(s)))
    }

    async fn get_queue(
        &self,
        _request: Request<pb::GetQueueRequest>,
    ) -> Result<Response<pb::GetQueueResponse>, Status> {
        let q = self.coordinator.queue().await.map_err(status_from_error)?;
        Ok(Response::new(queue_response(q)))
    }

    async fn pause_task(
        &self,
        request: Request<pb::PauseTaskRequest>,
    ) -> Result<Response<pb::PauseTaskResponse>, Status> {
        let r = request.into_inner();
        let id = task_id(&r.id)?;
        let reason = pause_reason(r.reason)?;
        let tasks = self
            .coordinator
            .set_paused(
                &id,
                Some(reason.unwrap_or_else(|| "no reason given".to_owned())),
            )
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::PauseTaskResponse { tasks }))
    }

    async fn resume_task(
        &self,
        request: Request<pb::ResumeTaskRequest>,
    ) -> Result<Response<pb::ResumeTaskResponse>, Status> {
        let id = task_id(&request.into_inner().id)?;
        let tasks = self
            .coordinator
            .set_paused(&id, None)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::ResumeTaskResponse { tasks }))
    }

    async fn approve_task(
        &self,
        request: Request<pb::ApproveTaskRequest>,
    ) -> Result<Response<pb::ApproveTaskResponse>, Status> {
        let r = request.into_inner();
        let id = task_id(&r.id)?;
        let note = review_note(r.note)?;
        let task = self
            .coordinator
            .approve(&id, approver(r.by)?, note)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::ApproveTaskResponse {
            task: Some(self.task_pb(&task)),
        }))
    }

    async fn reject_task(
        &self,
        request: Request<pb::RejectTaskRequest>,
    ) -> Result<Response<pb::RejectTaskResponse>, Status> {
        let r = request.into_inner();
        let id = task_id(&r.id)?;
        let Some(note) = review_note(Some(r.note))? else {
            return Err(Status::invalid_argument(
                "a rejection needs --note: what the agent should change",
            ));
        };
        let task = self
            .coordinator
            .reject(&id, approver(r.by)?, note)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::RejectTaskResponse {
            task: Some(self.task_pb(&task)),
        }))
    }

    async fn pause_queue(
        &self,
        request: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::PauseQueueResponse>, Status> {
        let r = request.into_inner();
        let reason = pause_reason(r.reason)?;
        let hold = match (r.landing, r.landing_only) {
            (false, false) => Hold::Leases,
            (true, false) => Hold::LeasesAndLanding,
            (false, true) => Hold::LandingOnly,
            (true, true) => {
                return Err(Status::invalid_argument(
                    "pass --landing (leases and landing) or --landing-only, not both",
                ));
            }
        };
        self.coordinator
            .pause_queue(reason, hold)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::PauseQueueResponse {}))
    }

    async fn resume_queue(
        &self,
        _request: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::ResumeQueueResponse>, Status> {
        let was_paused = self
            .coordinator
            .resume_queue()
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::ResumeQueueResponse { was_paused }))
    }

    async fn list_runners(
        &self,
        request: Request<pb::ListRunnersRequest>,
    ) -> Result<Response<pb::ListRunnersResponse>, Status> {
        let r = request.into_inner();
        let after = match r.page_token.as_str() {
            "" => None,
            token => Some(
                token
                    .strip_prefix('r')
                    .filter(|name| !name.is_empty())
                    .ok_or_else(bad_page_token)?,
            ),
        };
        let (runners, more) = self.coordinator.runners_page(after, page_size(r.page_size));
        let next_page_token = match runners.last() {
            Some(last) if more => format!("r{}", last.name),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListRunnersResponse {
            runners: runners.iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    type TaskLogsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::TaskLogsResponse, Status>> + Send>,
    >;

    async fn task_logs(
        &self,
        request: Request<pb::TaskLogsRequest>,
    ) -> Result<Response<Self::TaskLogsStream>, Status> {
        self.not_stopping()?;
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
            // Each item is a batch of lines (up to a runner's message): two at a time on the
            // way, so what a client that stops reading holds stays within a few of them.
            stream_from(
                &self.streams,
                2,
                move |tx| {
                    crate::logs::stream_logs(
                        Arc::clone(coordinator.logs()),
                        coordinator.store().clone(),
                        id,
                        follow,
                        tx,
                    )
                },
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

    async fn drain_runner(
        &self,
        request: Request<pb::DrainRunnerRequest>,
    ) -> Result<Response<pb::DrainRunnerResponse>, Status> {
        let r = request.into_inner();
        self.coordinator
            .hold_runner(&r.name, r.drain)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::DrainRunnerResponse {}))
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

    async fn rotate_viewer_token(
        &self,
        _request: Request<pb::RotateViewerTokenRequest>,
    ) -> Result<Response<pb::RotateViewerTokenResponse>, Status> {
        let (token, path, ended) = self
            .coordinator
            .rotate_viewer_token()
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::RotateViewerTokenResponse {
            token,
            path: path.display().to_string(),
            sessions_ended: u32::try_from(ended).unwrap_or(u32::MAX),
        }))
    }

    type FeedStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::FeedEntry, Status>> + Send>>;

    async fn feed(
        &self,
        request: Request<pb::FeedRequest>,
    ) -> Result<Response<Self::FeedStream>, Status> {
        self.not_stopping()?;
        let req = request.into_inner();
        if req.after.is_some_and(|a| a < 0) {
            return Err(Status::invalid_argument(
                "after is the position of an entry this server sent (0 or more)",
            ));
        }
        let mut topics = Vec::with_capacity(req.topics.len());
        for word in &req.topics {
            topics.push(crate::feed::Topic::parse(word).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "{word:?} is not a topic of the feed (task, runner, landing, queue, train)"
                ))
            })?);
        }
        let after = req
            .after
            .map(|after| crate::logs::Resume { after, at: None });
        let coordinator = Arc::clone(&self.coordinator);
        Ok(Response::new(Box::pin(until_cancelled(
            stream_from(
                &self.streams,
                64,
                move |tx| {
                    crate::logs::stream_feed(
                        Arc::clone(coordinator.logs()),
                        coordinator.store().clone(),
                        after,
                        move |e| topics.is_empty() || topics.contains(&e.topic),
                        tx,
                    )
                },
                |w: &crate::logs::Watched| match w {
                    crate::logs::Watched::From(position) => pb::FeedEntry {
                        position: *position,
                        ..Default::default()
                    },
                    crate::logs::Watched::Event(e) => feed_entry_to_pb(e),
                },
            ),
            self.shutdown.clone(),
        ))))
    }

    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::TaskTransition, Status>> + Send>,
    >;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.not_stopping()?;
        let req = request.into_inner();
        if req.after_event.is_some_and(|a| a < 0) {
            return Err(Status::invalid_argument(
                "after_event is the event_id of a transition this server sent (0 or more)",
            ));
        }
        let after = req.after_event.map(|after| crate::logs::Resume {
            after,
            at: req.after_at_ms,
        });
        let coordinator = Arc::clone(&self.coordinator);
        Ok(Response::new(Box::pin(until_cancelled(
            stream_from(
                &self.streams,
                64,
                move |tx| {
                    crate::logs::stream_transitions(
                        Arc::clone(coordinator.logs()),
                        coordinator.store().clone(),
                        after,
                        tx,
                    )
                },
                |w: &crate::logs::Watched| match w {
                    crate::logs::Watched::From(id) => pb::TaskTransition {
                        event_id: *id,
                        ..Default::default()
                    },
                    crate::logs::Watched::Event(e) => match e.task_event() {
                        Some(e) => transition_to_pb(&e),
                        // Only task entries pass the watch's filter.
                        None => pb::TaskTransition {
                            event_id: e.position,
                            ..Default::default()
                        },
                    },
                },
            ),
            self.shutdown.clone(),
        ))))
    }
}

/// A feed entry on the wire (its details as JSON, a task's with its ID and statuses).
fn feed_entry_to_pb(e: &crate::feed::FeedEntry) -> pb::FeedEntry {
    pb::FeedEntry {
        position: e.position,
        topic: e.topic.as_str().to_owned(),
        subject: e.subject.clone(),
        kind: e.kind.clone(),
        at_ms: e.at,
        message: e.message.clone(),
        data_json: e.data_json().to_string(),
    }
}

/// The most tasks one `CreateTasks` call may create.
const MAX_BATCH: usize = 10_000;

/// The page size asked for: the default when none, at most the maximum.
fn page_size(asked: u32) -> u32 {
    match asked {
        0 => Page::DEFAULT_SIZE,
        n => n.min(Page::MAX_SIZE),
    }
}

pub(crate) fn bad_page_token() -> Status {
    Status::invalid_argument(
        "the page token is not one this server gave out; list again from the first page",
    )
}

/// The token of the page after the task with this key: `t<priority>.<seq>`.
pub(crate) fn task_page_token((priority, seq): (u8, i64)) -> String {
    format!("t{priority}.{seq}")
}

/// The key a task page token stands for: `t<priority>.<seq>` (empty: the first page).
pub(crate) fn task_page_key(token: &str) -> Result<Option<(u8, i64)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let (priority, seq) = token
        .strip_prefix('t')
        .and_then(|t| t.split_once('.'))
        .ok_or_else(bad_page_token)?;
    match (priority.parse::<u8>(), seq.parse::<i64>()) {
        (Ok(p), Ok(s)) if p <= 4 && s >= 0 => Ok(Some((p, s))),
        _ => Err(bad_page_token()),
    }
}

/// A pause's `--reason`: trimmed, empty as none, one line of at most 1000 bytes.
/// A person's note on an approval or a rejection: text of at most 64 KiB, trimmed; `None`
/// when empty.
fn review_note(note: Option<String>) -> Result<Option<String>, Status> {
    let note = note.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    if let Some(note) = &note
        && (note.len() > 64 * 1024 || note.contains('\0'))
    {
        return Err(Status::invalid_argument(
            "--note must be text of at most 64 KiB (no NUL bytes)",
        ));
    }
    Ok(note)
}

/// Who approves or rejects, for the task's history: the credential's role (the control API
/// takes only the admin token), and the person as the client named them (`--by`, or the OS
/// user), which no credential proves.
fn approver(by: Option<String>) -> Result<String, Status> {
    let by = by.map(|b| b.trim().to_owned()).filter(|b| !b.is_empty());
    match by {
        None => Ok("admin".to_owned()),
        Some(b) if b.len() <= 64 && !b.chars().any(char::is_control) => Ok(format!("{b} (admin)")),
        Some(_) => Err(Status::invalid_argument(
            "--by must be one line of at most 64 bytes",
        )),
    }
}

fn pause_reason(reason: Option<String>) -> Result<Option<String>, Status> {
    let reason = reason
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    if let Some(reason) = &reason
        && (reason.len() > 1000 || reason.chars().any(|c| c.is_control()))
    {
        return Err(Status::invalid_argument(
            "--reason must be one line of at most 1000 bytes",
        ));
    }
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_are_read_back_or_refused() {
        assert_eq!(task_page_key("").expect("first"), None);
        assert_eq!(task_page_key("t2.41").expect("key"), Some((2, 41)));
        for bad in ["x", "t", "t2", "t9.1", "t2.-1", "t2.x", "r2.1", "t2.1.1"] {
            let err = task_page_key(bad).expect_err(bad);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        }
        assert_eq!(page_size(0), 100);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(5000), 1000);
    }
}
