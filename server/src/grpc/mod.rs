//! The gRPC edge: decode and validate, call one coordinator method, encode, map the error.
//! Nothing else happens here.
//!
//! - [`control`]: the control API (`pipelinectl`); [`runner`]: the runner API.
//! - [`convert`]: domain types to and from prost types, validating at the edge.
//! - [`edge`]: the service wrapper that tells connections apart and fixes status codes;
//!   [`listener`]: the bounds on accepted connections.
//! - [`services`]: both services, wrapped, for the app to serve.
//! - This module: authentication (the interceptor), the one mapping from domain errors to
//!   statuses (`From<Error> for Status`), and the stream helpers.
//!
//! Architecture invariant: only this module (and the `pipeline-proto` crate) knows prost types.

pub mod control;
pub mod convert;
pub mod edge;
pub mod listener;
pub mod runner;

pub use control::ControlApi;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use pipeline_proto::v1::control_service_server::ControlServiceServer;
use pipeline_proto::v1::runner_service_server::RunnerServiceServer;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::auth::Caller;
use crate::error::Error;
use crate::repo::Repo;

/// The largest gRPC message the server accepts (descriptions are at most 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// A service as served: authenticated, then wrapped by the edge.
pub type Served<T> = edge::Edge<tonic::service::interceptor::InterceptedService<T, Authenticate>>;

/// Both services, ready to add to a tonic server, and the end of their detached work.
pub struct Services<S: crate::store::Store> {
    pub control: Served<ControlServiceServer<ControlApi<S>>>,
    pub runner: Served<RunnerServiceServer<runner::RunnerApi<S>>>,
    /// Done once the services are dropped (served no more) and every stream's producer has
    /// ended: only then may the database close.
    pub streams_ended: StreamsEnded,
}

/// Held by each task a stream's producer runs in (and by the services): the app waits for all
/// of them to be gone ([`StreamsEnded`]) before it closes the database, since a producer reads
/// it until its stream is dropped.
#[derive(Clone, Debug)]
pub struct StreamTasks {
    _alive: tokio::sync::mpsc::Sender<()>,
}

/// Resolves once every [`StreamTasks`] is dropped.
#[derive(Debug)]
pub struct StreamsEnded(tokio::sync::mpsc::Receiver<()>);

impl StreamTasks {
    pub fn new() -> (Self, StreamsEnded) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (Self { _alive: tx }, StreamsEnded(rx))
    }
}

impl StreamsEnded {
    /// Waits until no stream producer is left (nothing is ever sent: the channel closes).
    pub async fn wait(mut self) {
        let _ = self.0.recv().await;
    }
}

/// The control service (admin token only) and the runner service, each behind the
/// authentication interceptor and the [`edge::Edge`] wrapper, ready to add to a tonic server.
/// `shutdown` stops the work (watch streams end); `serving` ends the runner streams, later.
pub fn services<S: crate::store::Store>(
    coordinator: Arc<crate::coordinator::Coordinator<S, Repo>>,
    shutdown: CancellationToken,
    serving: CancellationToken,
    fetch_base_timeout: std::time::Duration,
) -> Services<S> {
    let identify: Identify = {
        let coordinator = Arc::clone(&coordinator);
        Arc::new(move |token: &str| coordinator.auth().identify(token))
    };
    let (streams, streams_ended) = StreamTasks::new();
    let leadership = coordinator.leadership();
    let control = edge::Edge::new(tonic::service::interceptor::InterceptedService::new(
        ControlServiceServer::new(ControlApi::new(Arc::clone(&coordinator), shutdown, streams))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        Authenticate {
            auth: identify.clone(),
            admin_only: true,
            leadership: leadership.clone(),
        },
    ));
    let runner = edge::Edge::new(tonic::service::interceptor::InterceptedService::new(
        RunnerServiceServer::new(
            runner::RunnerApi::new(coordinator, serving)
                .with_fetch_base_timeout(fetch_base_timeout),
        )
        .max_decoding_message_size(MAX_MESSAGE_BYTES),
        Authenticate {
            auth: identify,
            admin_only: false,
            leadership,
        },
    ));
    Services {
        control,
        runner,
        streams_ended,
    }
}

/// Who holds a token (the server's `Auth::identify`).
pub type Identify = Arc<dyn Fn(&str) -> Option<Caller> + Send + Sync>;

/// Identifies the caller from `authorization: Bearer <token>` and puts a [`Caller`] in the
/// request's extensions; a missing or unknown credential is `Unauthenticated`. With
/// `admin_only` (the control API), anything but the admin token is `PermissionDenied`, except
/// the viewer token on the read calls of [`VIEWER_CALLS`]. The runner API refuses the viewer
/// token.
///
/// Architecture invariant: what the viewer token may call is an allow-list of read calls,
/// checked here before any handler runs; a new control call is the admin's until it is added.
///
/// On a standby (issue 28), every call but those reads is refused before the credential is
/// looked at (a standby's credentials may lag the leader's) with `UNAVAILABLE` naming the
/// leader's URL in the `pipeline-leader` metadata, for the client to go there.
#[derive(Clone)]
pub struct Authenticate {
    pub auth: Identify,
    pub admin_only: bool,
    pub leadership: crate::leader::Leadership,
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
        if let crate::leader::Role::Standby { leader_url } = self.leadership.role() {
            let path = req.extensions().get::<edge::CallPath>();
            let read =
                self.admin_only && path.is_some_and(|p| VIEWER_CALLS.contains(&p.0.as_str()));
            if !read {
                return Err(pipeline_proto::servers::not_the_leader(
                    leader_url.as_deref(),
                ));
            }
        }
        let Some(token) = bearer(req.metadata()) else {
            return Err(Status::unauthenticated(
                "no credential: pass --token, or set PIPELINE_ADMIN_TOKEN (pipelinectl) or \
                 PIPELINE_RUNNER_TOKEN (a runner)",
            ));
        };
        let caller =
            (self.auth)(token).ok_or_else(|| Status::unauthenticated(INVALID_CREDENTIAL))?;
        if let Some(refusal) = self.refusal(&caller, req.extensions().get::<edge::CallPath>()) {
            return Err(refusal);
        }
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The control calls the viewer token may make: they read and change nothing (`explain` is
/// `GetTask`).
pub const VIEWER_CALLS: [&str; 8] = [
    "/pipeline.v1.ControlService/GetStatus",
    "/pipeline.v1.ControlService/ListTasks",
    "/pipeline.v1.ControlService/GetTask",
    "/pipeline.v1.ControlService/GetQueue",
    "/pipeline.v1.ControlService/ListRunners",
    "/pipeline.v1.ControlService/TaskLogs",
    "/pipeline.v1.ControlService/Watch",
    "/pipeline.v1.ControlService/Feed",
];

impl Authenticate {
    /// Why `caller` may not make the call at `path` (the edge names it), if it may not.
    fn refusal(&self, caller: &Caller, path: Option<&edge::CallPath>) -> Option<Status> {
        match caller {
            Caller::Admin if self.admin_only => None,
            Caller::Viewer if self.admin_only => {
                let read = path.is_some_and(|p| VIEWER_CALLS.contains(&p.0.as_str()));
                (!read).then(|| {
                    Status::permission_denied(
                        "the viewer token may only read (status, tasks, queue, runners, logs, \
                         watch, explain); use the admin token to change anything",
                    )
                })
            }
            Caller::Viewer => Some(Status::permission_denied(
                "the viewer token may not use the runner API",
            )),
            _ if self.admin_only => Some(Status::permission_denied(
                "this credential may not use the control API; use the admin token",
            )),
            _ => None,
        }
    }
}

/// The caller the interceptor found.
pub(crate) fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credential"))
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        status_from_error(err)
    }
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
        Error::Busy(m) => Status::unavailable(m),
        err @ Error::Internal(_) => {
            tracing::error!(error = %err, "internal error");
            Status::internal(err.to_string())
        }
    }
}

/// Runs `produce` into a channel, in a task held in `tasks`, and streams what it sends, mapped
/// by `map`; a failure of `produce` ends the stream with its status. Once the stream is dropped
/// (the client went away, or the server stopped serving) `produce` is dropped too, wherever it
/// waits. At most `depth` items wait in each of the two channels on the way to the client (for
/// a client that stops reading, that and the connection's flow-control window is all that is
/// held for it).
pub(crate) fn stream_from<T, U, F>(
    tasks: &StreamTasks,
    depth: usize,
    produce: impl FnOnce(tokio::sync::mpsc::Sender<T>) -> F,
    map: fn(&T) -> U,
) -> std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<U, Status>> + Send>>
where
    T: Send + 'static,
    U: Send + 'static,
    F: std::future::Future<Output = crate::error::Result<()>> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<T>(depth);
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Result<U, Status>>(depth);
    let work = produce(tx);
    let held = tasks.clone();
    tokio::spawn(async move {
        let _held = held;
        let fail = out_tx.clone();
        let gone = out_tx.clone();
        let forward = async move {
            while let Some(item) = rx.recv().await {
                if out_tx.send(Ok(map(&item))).await.is_err() {
                    break;
                }
            }
        };
        let run = async move {
            let (result, ()) = tokio::join!(work, forward);
            if let Err(err) = result {
                let _ = fail.send(Err(status_from_error(err))).await;
            }
        };
        tokio::select! {
            () = run => {}
            () = gone.closed() => {}
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx))
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
    use crate::leader::{Leadership, Role};
    use tonic::service::Interceptor as _;

    fn call(path: &str, token: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(edge::CallPath(format!("/pipeline.v1.{path}")));
        if let Some(token) = token {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("header"),
            );
        }
        req
    }

    #[test]
    fn a_standby_refuses_runner_calls_and_writes_naming_the_leader_and_serves_reads() {
        let standby = Leadership::fixed(Role::Standby {
            leader_url: Some("http://10.0.0.1:50051".to_owned()),
        });
        let auth: Identify = Arc::new(|t: &str| (t == "admin").then_some(Caller::Admin));
        let mut control = Authenticate {
            auth: auth.clone(),
            admin_only: true,
            leadership: standby.clone(),
        };
        let mut runner = Authenticate {
            auth,
            admin_only: false,
            leadership: standby,
        };
        let leader_named = |status: Status| {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert_eq!(
                pipeline_proto::servers::leader_named(&status).as_deref(),
                Some("http://10.0.0.1:50051")
            );
        };
        // Writes and runner calls: refused before the credential is looked at (a standby's
        // may lag the leader's).
        for path in ["ControlService/CreateTask", "ControlService/PauseQueue"] {
            leader_named(control.call(call(path, Some("admin"))).expect_err(path));
        }
        for path in ["RunnerService/Register", "RunnerService/CompleteLease"] {
            leader_named(runner.call(call(path, None)).expect_err(path));
        }
        // Reads: served, with the credential checked as always.
        for path in VIEWER_CALLS {
            let path = path.trim_start_matches("/pipeline.v1.");
            assert!(control.call(call(path, Some("admin"))).is_ok(), "{path}");
            let refused = control.call(call(path, None)).expect_err(path);
            assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        }
        // The leader serves everything.
        let mut leading = Authenticate {
            leadership: Leadership::sole(),
            ..runner.clone()
        };
        let refused = leading
            .call(call("RunnerService/Register", None))
            .expect_err("no credential");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
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
