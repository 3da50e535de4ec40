//! The connection to the server and the one mapping from gRPC failures to a line a person can
//! act on and a stable exit code.

use std::time::Duration;

use pipeline_proto::v1 as pb;
use pipeline_proto::v1::control_service_client::ControlServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Exit codes, stable for scripts (also listed in the README).
pub mod exit {
    /// Anything unexpected, including an internal error of the server.
    pub const FAILURE: u8 = 1;
    /// The request was refused as malformed (also clap's code for bad flags).
    pub const USAGE: u8 = 2;
    /// The named task (or other thing) does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// The request is valid but the current state does not allow it.
    pub const REFUSED: u8 = 4;
    /// The server cannot be reached.
    pub const UNAVAILABLE: u8 = 5;
    /// A missing or wrong credential.
    pub const AUTH: u8 = 6;
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Unary requests give up after this long (streams live as long as they are read).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A failed command: one line for stderr and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub exit_code: u8,
}

impl Failure {
    pub fn usage(message: String) -> Self {
        Self {
            message,
            exit_code: exit::USAGE,
        }
    }

    pub fn internal(message: String) -> Self {
        Self {
            message,
            exit_code: exit::FAILURE,
        }
    }
}

/// Makes any text one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The innermost cause of an error, which is the useful part of a transport error
/// ("Connection refused (os error 111)" rather than "transport error").
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// A request with the unary time limit.
fn unary<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(REQUEST_TIMEOUT);
    req
}

/// Puts `authorization: Bearer <token>` on every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The admin token of a server on this host, found through the note the server leaves at
/// `~/.local/state/pipeline/servers/<port>` (the path of its token file).
fn local_admin_token(url: &str) -> Option<String> {
    let port = url.rsplit(':').next()?.trim_end_matches('/');
    let home = std::env::var_os("HOME")?;
    let note = std::path::Path::new(&home)
        .join(".local/state/pipeline/servers")
        .join(port);
    let path = std::fs::read_to_string(note).ok()?;
    let token = std::fs::read_to_string(path.trim()).ok()?;
    Some(token.trim().to_owned())
}

/// A client of the control API.
pub struct Client {
    url: String,
    inner: ControlServiceClient<InterceptedService<Channel, Bearer>>,
}

impl Client {
    /// Connects to `url` (`http://host:port`, or just `host:port`) with `token` (or the local
    /// server's admin token).
    pub async fn connect(
        url: &str,
        token: Option<&str>,
        tls_ca: Option<&std::path::Path>,
    ) -> Result<Self, Failure> {
        let url = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| {
                Failure::usage(format!(
                    "invalid server URL {url:?}: {}; use http://HOST:PORT",
                    root_cause(&e)
                ))
            })?
            .connect_timeout(CONNECT_TIMEOUT);
        let endpoint = match pipeline_proto::client_tls(&url, tls_ca).map_err(Failure::usage)? {
            Some(tls) => endpoint
                .tls_config(tls)
                .map_err(|e| Failure::usage(format!("invalid TLS settings: {}", root_cause(&e))))?,
            None => endpoint,
        };
        let channel = endpoint.connect().await.map_err(|e| Failure {
            message: format!(
                "cannot reach the pipeline server at {url}: {}; is pipeline-server running? \
                 (set --server or PIPELINE_SERVER)",
                one_line(&root_cause(&e))
            ),
            exit_code: exit::UNAVAILABLE,
        })?;
        let token = token.map(str::to_owned).or_else(|| local_admin_token(&url));
        let bearer = Bearer(token.and_then(|t| format!("Bearer {}", t.trim()).parse().ok()));
        let inner = ControlServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { url, inner })
    }

    fn failure(&self, status: Status) -> Failure {
        let mut message = one_line(status.message());
        if message.contains("message length too large") {
            message = format!(
                "the request is too large for the server ({}); a description may be at most 1 MiB",
                message.trim_start_matches("Error, ")
            );
        }
        let (exit_code, message) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => (exit::USAGE, message),
            Code::NotFound => (exit::NOT_FOUND, message),
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => {
                (exit::REFUSED, message)
            }
            Code::Unavailable => (
                exit::UNAVAILABLE,
                format!(
                    "cannot reach the pipeline server at {}: {message}",
                    self.url
                ),
            ),
            Code::Unknown | Code::Internal
                if message.contains("transport error") || message.contains("h2 protocol error") =>
            {
                (
                    exit::UNAVAILABLE,
                    format!(
                        "cannot reach the pipeline server at {}: {}; if it serves TLS, use an \
                     https:// URL (and --tls-ca for a private CA)",
                        self.url,
                        one_line(&root_cause(&status))
                    ),
                )
            }
            Code::DeadlineExceeded => (
                exit::UNAVAILABLE,
                format!("the pipeline server at {} did not answer in time", self.url),
            ),
            Code::Unauthenticated | Code::PermissionDenied => (exit::AUTH, message),
            Code::ResourceExhausted => (exit::REFUSED, message),
            _ => (exit::FAILURE, format!("server error: {message}")),
        };
        Failure { message, exit_code }
    }

    /// Revokes runner `name`; returns how many leases went back to Open.
    pub async fn revoke_runner(&mut self, name: String) -> Result<u32, Failure> {
        let r = self
            .inner
            .revoke_runner(unary(pb::RevokeRunnerRequest { name }))
            .await;
        r.map(|r| r.into_inner().leases_released)
            .map_err(|s| self.failure(s))
    }

    /// Replaces the registration token; returns it and where the server keeps it.
    pub async fn rotate_registration_token(&mut self) -> Result<(String, String), Failure> {
        let r = self
            .inner
            .rotate_registration_token(unary(pb::RotateRegistrationTokenRequest {}))
            .await;
        r.map(|r| {
            let r = r.into_inner();
            (r.token, r.path)
        })
        .map_err(|s| self.failure(s))
    }

    /// A task's logs as a stream (with `follow`, live until the caller stops reading).
    pub async fn task_logs(
        &mut self,
        id: String,
        follow: bool,
    ) -> Result<tonic::Streaming<pb::TaskLogsResponse>, Failure> {
        let r = self
            .inner
            .task_logs(pb::TaskLogsRequest { id, follow })
            .await;
        r.map(tonic::Response::into_inner)
            .map_err(|s| self.failure(s))
    }

    /// Every task transition, live.
    pub async fn watch(&mut self) -> Result<tonic::Streaming<pb::TaskTransition>, Failure> {
        let r = self.inner.watch(pb::WatchRequest {}).await;
        r.map(tonic::Response::into_inner)
            .map_err(|s| self.failure(s))
    }

    /// The next message of a stream; `None` at its end.
    pub async fn next<T>(&self, stream: &mut tonic::Streaming<T>) -> Result<Option<T>, Failure> {
        stream.message().await.map_err(|s| self.failure(s))
    }

    pub async fn status(&mut self) -> Result<pb::GetStatusResponse, Failure> {
        let r = self.inner.get_status(unary(pb::GetStatusRequest {})).await;
        r.map(tonic::Response::into_inner)
            .map_err(|s| self.failure(s))
    }

    pub async fn runners(&mut self) -> Result<Vec<pb::Runner>, Failure> {
        let r = self
            .inner
            .list_runners(unary(pb::ListRunnersRequest {}))
            .await;
        r.map(|r| r.into_inner().runners)
            .map_err(|s| self.failure(s))
    }

    pub async fn create_task(&mut self, req: pb::CreateTaskRequest) -> Result<pb::Task, Failure> {
        let r = self.inner.create_task(unary(req)).await;
        let task = r.map_err(|s| self.failure(s))?.into_inner().task;
        task.ok_or_else(|| Failure::internal("the server answered without the task".into()))
    }

    pub async fn list_tasks(&mut self, status: Option<&str>) -> Result<Vec<pb::Task>, Failure> {
        let status = status
            .map(|s| {
                pb::TaskStatus::from_str_name(&format!("TASK_STATUS_{}", s.to_uppercase()))
                    .map(i32::from)
                    .ok_or_else(|| Failure::usage(format!("unknown status {s}")))
            })
            .transpose()?;
        let r = self
            .inner
            .list_tasks(unary(pb::ListTasksRequest { status }))
            .await;
        r.map(|r| r.into_inner().tasks).map_err(|s| self.failure(s))
    }

    pub async fn get_task(&mut self, id: String) -> Result<pb::GetTaskResponse, Failure> {
        let r = self.inner.get_task(unary(pb::GetTaskRequest { id })).await;
        r.map(tonic::Response::into_inner)
            .map_err(|s| self.failure(s))
    }

    pub async fn retry_task(&mut self, id: String) -> Result<pb::Task, Failure> {
        let r = self
            .inner
            .retry_task(unary(pb::RetryTaskRequest { id }))
            .await;
        let task = r.map_err(|s| self.failure(s))?.into_inner().task;
        task.ok_or_else(|| Failure::internal("the server answered without the task".into()))
    }

    pub async fn cancel_task(&mut self, id: String) -> Result<pb::Task, Failure> {
        let r = self
            .inner
            .cancel_task(unary(pb::CancelTaskRequest { id }))
            .await;
        let task = r.map_err(|s| self.failure(s))?.into_inner().task;
        task.ok_or_else(|| Failure::internal("the server answered without the task".into()))
    }

    pub async fn add_dependencies(
        &mut self,
        id: String,
        depends_on: Vec<String>,
    ) -> Result<pb::Task, Failure> {
        let r = self
            .inner
            .add_dependencies(unary(pb::AddDependenciesRequest { id, depends_on }))
            .await;
        let task = r.map_err(|s| self.failure(s))?.into_inner().task;
        task.ok_or_else(|| Failure::internal("the server answered without the task".into()))
    }
}
