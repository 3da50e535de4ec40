//! The connection to the server and the one mapping from gRPC failures to a [`Failure`]: a line
//! a person can act on and a stable exit code. Every answer comes back as the view types of `model.rs`
//! (converted by `wire.rs`); streams as a [`Feed`] of them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pipeline_proto::servers::Servers;
use pipeline_proto::v1 as pb;
use pipeline_proto::v1::control_service_client::ControlServiceClient;
use tonic::codegen::http::Uri;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::failure::{Failure, exit};
use crate::model::{self, LogItem, NewTask, Runner, Task, TaskDetail, TaskStatus, Transition};
use crate::wire;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often pipelinectl pings its server on the connection, and how long it waits for the
/// answer before it takes the connection for lost.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Unary requests give up after this long (streams live as long as they are read).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

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

/// The admin token of a server on this host, and the address to reach it at.
#[derive(Debug, PartialEq)]
struct LocalToken {
    token: String,
    /// For a URL naming a host (`localhost`), the address whose note was used: the client
    /// connects there, so the token goes to the server it was noted for and no other.
    pin: Option<SocketAddr>,
}

/// Where servers on this host note their admin token's path, one file per listening address.
fn notes_dir() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".local/state/pipeline/servers"))
}

/// The file name of the note for a server listening on `addr` (the server writes the same
/// name): `127.0.0.1-50051`, `__1-50051` for `[::1]:50051`.
fn note_name(addr: SocketAddr) -> String {
    format!(
        "{}-{}",
        addr.ip().to_string().replace(':', "_"),
        addr.port()
    )
}

/// The token file noted for the server that answers at `addr`: one listening on exactly that
/// address, else one listening on every address of the family (`0.0.0.0`, `::`), which is the
/// one the kernel hands the connection to when nobody listens on the address itself.
fn noted_token_file(dir: &Path, addr: SocketAddr) -> Option<String> {
    let unspecified: &[IpAddr] = match addr.ip() {
        IpAddr::V4(_) => &[
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ],
        IpAddr::V6(_) => &[IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
    };
    std::iter::once(addr.ip())
        .chain(unspecified.iter().copied())
        .find_map(|ip| {
            let note = dir.join(note_name(SocketAddr::new(ip, addr.port())));
            let path = std::fs::read_to_string(note).ok()?.trim().to_owned();
            // A note whose token file is gone (its state dir deleted) is stale: look further.
            (Path::new(&path).is_file() && server_alive(Path::new(&path))).then_some(path)
        })
}

/// Whether the server whose admin token is at `token_file` still runs: it holds the lock on
/// its state dir (`server.lock` beside the token) for as long as it lives, so a note left by a
/// server that was killed (and could not remove it) is not taken for a live one on the same
/// address.
fn server_alive(token_file: &Path) -> bool {
    let Some(lock) = token_file.parent().map(|d| d.join("server.lock")) else {
        return false;
    };
    match std::fs::File::open(&lock) {
        // Free to take: nobody holds it.
        Ok(file) => match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                false
            }
            Err(std::fs::TryLockError::WouldBlock) => true,
            Err(std::fs::TryLockError::Error(_)) => true,
        },
        // A server from before the lock, or one that cannot be told: trust the note.
        Err(_) => true,
    }
}

/// The admin token of a server on this host, found through the note the server leaves at
/// `~/.local/state/pipeline/servers/<ip>-<port>` (the path of its token file). Offered only to
/// a loopback address: a URL with a loopback IP (or `0.0.0.0`/`::`, which connect to loopback)
/// gets the note of exactly that address; a host name (`localhost`) gets one only if every
/// address it resolves to is loopback, and then the client is pinned to the address whose note
/// it uses. Anything else gets nothing.
fn local_admin_token(url: &str) -> Option<LocalToken> {
    let uri: Uri = url.parse().ok()?;
    let host = uri.host()?;
    let port = uri.port_u16()?;
    let dir = notes_dir()?;
    local_admin_token_in(&dir, host, port)
}

fn local_admin_token_in(dir: &Path, host: &str, port: u16) -> Option<LocalToken> {
    // Connecting to 0.0.0.0 (or ::) reaches this host's loopback address.
    let literal = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
        .map(|ip| match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        });
    let addrs: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => (host, port).to_socket_addrs().ok()?.collect(),
    };
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        return None;
    }
    addrs.into_iter().find_map(|addr| {
        let path = noted_token_file(dir, addr)?;
        let token = std::fs::read_to_string(path).ok()?.trim().to_owned();
        Some(LocalToken {
            token,
            pin: literal.is_none().then_some(addr),
        })
    })
}

/// The one mapping from a failed call's status to a line a person can act on and an exit code;
/// `url` is the server's.
fn failure(url: &str, status: Status) -> Failure {
    let message = one_line(status.message());
    let (exit_code, message) = match status.code() {
        // The server refused a request message over its size limit: the request is wrong.
        Code::ResourceExhausted if message.starts_with("the request message is too large") => (
            exit::USAGE,
            format!(
                "the request is too large for the server ({}); a description may be at \
                 most 1 MiB",
                message
                    .trim_start_matches("the request message is too large: ")
                    .trim_end_matches("; send less in one request")
            ),
        ),
        // pipelinectl's own decoder refused an answer over its size limit.
        Code::OutOfRange if message.contains("message length too large") => (
            exit::FAILURE,
            format!(
                "the server's answer is too large for pipelinectl ({})",
                message.trim_start_matches("Error, ")
            ),
        ),
        Code::InvalidArgument | Code::OutOfRange => (exit::USAGE, message),
        Code::NotFound => (exit::NOT_FOUND, message),
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => (exit::REFUSED, message),
        // Reached, but its database stayed locked for its busy timeout: nothing was done.
        Code::Unavailable if message.starts_with("the database is busy") => (
            exit::UNAVAILABLE,
            format!("the pipeline server at {url} did nothing: {message}"),
        ),
        Code::Unavailable => (
            exit::UNAVAILABLE,
            format!("cannot reach the pipeline server at {url}: {message}"),
        ),
        Code::Unknown | Code::Internal
            if message.contains("transport error") || message.contains("h2 protocol error") =>
        {
            let cause = one_line(&root_cause(&status));
            // Plain HTTP to a TLS port fails this way too ("broken pipe"): the hint is for
            // that; an https:// URL has it right already.
            let message = if url.starts_with("https://") {
                format!("cannot reach the pipeline server at {url}: {cause}")
            } else {
                format!(
                    "cannot reach the pipeline server at {url}: {cause}; if it serves TLS, use \
                     an https:// URL (and --tls-ca for a private CA)"
                )
            };
            (exit::UNAVAILABLE, message)
        }
        // pipelinectl cancels nothing itself: the server dropped the connection.
        Code::Cancelled => (
            exit::UNAVAILABLE,
            format!(
                "the pipeline server at {url} closed the connection before answering \
                 ({message}); it may be shutting down or at its connection limit: try again"
            ),
        ),
        Code::DeadlineExceeded => (
            exit::UNAVAILABLE,
            format!("the pipeline server at {url} did not answer in time"),
        ),
        Code::Unauthenticated | Code::PermissionDenied => (exit::AUTH, message),
        Code::ResourceExhausted => (exit::REFUSED, message),
        _ => (exit::FAILURE, format!("server error: {message}")),
    };
    Failure { message, exit_code }
}

/// A client of the control API.
pub struct Client {
    url: String,
    inner: ControlServiceClient<InterceptedService<Channel, Bearer>>,
    /// The servers given (`--server URL1,URL2`), this one among them.
    servers: Servers,
    /// The leader a standby named when it refused the last call, if it did.
    refused_by_standby: std::sync::Mutex<Option<String>>,
    /// What it connected with, to connect to another server.
    token: Option<String>,
    tls_ca: Option<std::path::PathBuf>,
}

impl Client {
    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connects to the first of `urls` (commas between them; `http://host:port`, or just
    /// `host:port`) that can be reached, with `token` (or the local server's admin token).
    pub async fn connect(
        urls: &str,
        token: Option<&str>,
        tls_ca: Option<&std::path::Path>,
    ) -> Result<Self, Failure> {
        let Some(servers) = Servers::new(pipeline_proto::servers::split(urls)) else {
            return Err(Failure::usage(
                "no server URL given; use http://HOST:PORT (--server)".to_owned(),
            ));
        };
        Self::connect_from(servers, 0, token, tls_ca).await
    }

    /// Connects to the first server that can be reached, starting at `start` and going round.
    async fn connect_from(
        servers: Servers,
        start: usize,
        token: Option<&str>,
        tls_ca: Option<&std::path::Path>,
    ) -> Result<Self, Failure> {
        let n = servers.urls().len();
        let mut first_failure = None;
        for i in (0..n).map(|k| (start + k) % n) {
            let url = servers.urls()[i].clone();
            match Self::connect_one(&url, token, tls_ca).await {
                Ok((url, inner)) => {
                    return Ok(Self {
                        url,
                        inner,
                        servers,
                        refused_by_standby: std::sync::Mutex::new(None),
                        token: token.map(str::to_owned),
                        tls_ca: tls_ca.map(std::path::Path::to_path_buf),
                    });
                }
                // Another server may be up: a malformed URL is said at once, though.
                Err(f) if f.exit_code == exit::UNAVAILABLE => {
                    first_failure.get_or_insert(f);
                }
                Err(f) => return Err(f),
            }
        }
        Err(first_failure.unwrap_or_else(|| Failure::internal("no server to connect to".into())))
    }

    /// After a call a standby refused naming the leader (so it did nothing): a client of the
    /// leader when it is one of the servers given, else of the next one that can be reached;
    /// `None` when the last call was not such a refusal or there is no other server.
    pub async fn follow_leader(&self) -> Option<Result<Self, Failure>> {
        let leader = self
            .refused_by_standby
            .lock()
            .map(|mut r| r.take())
            .unwrap_or_default()?;
        let urls = self.servers.urls();
        let here = self.here();
        let start = urls
            .iter()
            .position(|u| *u == leader)
            .filter(|&i| i != here)
            .unwrap_or((here + 1) % urls.len());
        self.connect_at(start).await
    }

    /// After the server was lost (a call answered `UNAVAILABLE`): with other servers given, a
    /// client of the next one that can be reached (this one again if no other can); `None`
    /// with one server.
    pub async fn fail_over(&self) -> Option<Result<Self, Failure>> {
        let next = (self.here() + 1) % self.servers.urls().len();
        self.connect_at(next).await
    }

    /// The index of this client's server among those given.
    fn here(&self) -> usize {
        self.servers
            .urls()
            .iter()
            .position(|u| *u == self.url)
            .unwrap_or(0)
    }

    async fn connect_at(&self, start: usize) -> Option<Result<Self, Failure>> {
        let urls = self.servers.urls();
        if urls.len() < 2 {
            return None;
        }
        let servers = Servers::new(urls.to_vec())?;
        Some(
            Self::connect_from(
                servers,
                start,
                self.token.as_deref(),
                self.tls_ca.as_deref(),
            )
            .await,
        )
    }

    /// Connects to `url` (`http://host:port`, or just `host:port`) with `token` (or the local
    /// server's admin token).
    async fn connect_one(
        url: &str,
        token: Option<&str>,
        tls_ca: Option<&std::path::Path>,
    ) -> Result<
        (
            String,
            ControlServiceClient<InterceptedService<Channel, Bearer>>,
        ),
        Failure,
    > {
        let url = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        // Checked before anything else: a malformed URL is reported as such.
        let uri: Uri = url.parse().map_err(|e| {
            Failure::usage(format!(
                "invalid server URL {url:?}: {}; use http://HOST:PORT",
                root_cause(&e)
            ))
        })?;
        let local = match token {
            Some(_) => None,
            None => local_admin_token(&url),
        };
        // A host name whose address has a note is reached at that very address.
        let target = match local.as_ref().and_then(|l| l.pin) {
            Some(addr) => format!("{}://{addr}", uri.scheme_str().unwrap_or("http")),
            None => url.clone(),
        };
        let endpoint = Endpoint::from_shared(target)
            .map_err(|e| {
                Failure::usage(format!(
                    "invalid server URL {url:?}: {}; use http://HOST:PORT",
                    root_cause(&e)
                ))
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            // A server that accepts connections but answers nothing (frozen) ends a command, or
            // a watch moves on, instead of waiting for ever.
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        let endpoint = match pipeline_proto::client_tls(&url, tls_ca).map_err(Failure::usage)? {
            Some(tls) => {
                // Pinned to an address, the certificate is still checked for the URL's host.
                let tls = match (uri.host(), local.as_ref().and_then(|l| l.pin)) {
                    (Some(host), Some(_)) => tls.domain_name(host),
                    _ => tls,
                };
                endpoint.tls_config(tls).map_err(|e| {
                    Failure::usage(format!("invalid TLS settings: {}", root_cause(&e)))
                })?
            }
            None => endpoint,
        };
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => {
                // What failed and what to do: the CA (`--tls-ca`), the scheme, the URL, or
                // whether the server is up.
                let why = match pipeline_proto::reach::diagnose(&url, &e).await {
                    Some(unreachable) => one_line(&unreachable.to_string()),
                    None => format!(
                        "{}; is pipeline-server running? (set --server or PIPELINE_SERVER)",
                        one_line(&root_cause(&e))
                    ),
                };
                return Err(Failure {
                    message: format!("cannot reach the pipeline server at {url}: {why}"),
                    exit_code: exit::UNAVAILABLE,
                });
            }
        };
        let token = token.map(str::to_owned).or(local.map(|l| l.token));
        let bearer = Bearer(token.and_then(|t| format!("Bearer {}", t.trim()).parse().ok()));
        let inner = ControlServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok((url, inner))
    }

    fn failure(&self, status: Status) -> Failure {
        if let Some(leader) = pipeline_proto::servers::leader_named(&status)
            && let Ok(mut refused) = self.refused_by_standby.lock()
        {
            *refused = Some(leader);
        }
        failure(&self.url, status)
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

    /// Forgets runner `name` (not connected), freeing its name.
    pub async fn forget_runner(&mut self, name: String) -> Result<(), Failure> {
        let r = self
            .inner
            .forget_runner(unary(pb::ForgetRunnerRequest { name }))
            .await;
        r.map(drop).map_err(|s| self.failure(s))
    }

    /// Drains runner `name` from the control plane, or (`drain` false) undrains it.
    pub async fn drain_runner(&mut self, name: String, drain: bool) -> Result<(), Failure> {
        let r = self
            .inner
            .drain_runner(unary(pb::DrainRunnerRequest { name, drain }))
            .await;
        r.map(drop).map_err(|s| self.failure(s))
    }

    /// The merge train now and the tasks waiting behind it.
    pub async fn queue(&mut self) -> Result<model::Queue, Failure> {
        let r = self.inner.get_queue(unary(pb::GetQueueRequest {})).await;
        r.map(|r| r.into_inner().into())
            .map_err(|s| self.failure(s))
    }

    /// Stops new leases (and landing, with `landing`), or landing alone (`landing_only`).
    pub async fn pause_queue(
        &mut self,
        reason: Option<String>,
        landing: bool,
        landing_only: bool,
    ) -> Result<(), Failure> {
        let r = self
            .inner
            .pause_queue(unary(pb::PauseQueueRequest {
                reason,
                landing,
                landing_only,
            }))
            .await;
        r.map(drop).map_err(|s| self.failure(s))
    }

    /// Lets leases (and landing) go on.
    /// Lifts every pause; whether anything was paused.
    pub async fn resume_queue(&mut self) -> Result<bool, Failure> {
        let r = self
            .inner
            .resume_queue(unary(pb::ResumeQueueRequest {}))
            .await;
        r.map(|r| r.into_inner().was_paused)
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

    /// Replaces the viewer token: the new one, where the server keeps it, and how many of the
    /// page's sessions ended with the old one.
    pub async fn rotate_viewer_token(&mut self) -> Result<(String, String, u32), Failure> {
        let r = self
            .inner
            .rotate_viewer_token(unary(pb::RotateViewerTokenRequest {}))
            .await;
        r.map(|r| {
            let r = r.into_inner();
            (r.token, r.path, r.sessions_ended)
        })
        .map_err(|s| self.failure(s))
    }

    /// A task's logs as a stream (with `follow`, live until the caller stops reading).
    pub async fn task_logs(
        &mut self,
        id: String,
        follow: bool,
    ) -> Result<Feed<pb::TaskLogsResponse>, Failure> {
        let r = self
            .inner
            .task_logs(pb::TaskLogsRequest { id, follow })
            .await;
        r.map(|r| self.feed(r)).map_err(|s| self.failure(s))
    }

    /// Every task transition after the history entry `after_event` (whose time, when known,
    /// is `after_at_ms`), or from now on (then the first item is only where the stream starts:
    /// an empty task ID and its `event_id`; so is it when the server's history does not hold
    /// the entry named).
    pub async fn watch(
        &mut self,
        after_event: Option<i64>,
        after_at_ms: Option<i64>,
    ) -> Result<Feed<pb::TaskTransition>, Failure> {
        let r = self
            .inner
            .watch(pb::WatchRequest {
                after_event,
                after_at_ms,
            })
            .await;
        r.map(|r| self.feed(r)).map_err(|s| self.failure(s))
    }

    /// The change feed's entries after `after` (or from now on: the first item is then a
    /// marker, an empty topic and its position; so is it when the server's feed does not hold
    /// the position named), of `topics` (empty: every topic).
    pub async fn change_feed(
        &mut self,
        after: Option<i64>,
        topics: Vec<String>,
    ) -> Result<Feed<pb::FeedEntry>, Failure> {
        let r = self.inner.feed(pb::FeedRequest { after, topics }).await;
        r.map(|r| self.feed(r)).map_err(|s| self.failure(s))
    }

    fn feed<W>(&self, response: tonic::Response<tonic::Streaming<W>>) -> Feed<W> {
        Feed {
            messages: response.into_inner(),
            url: self.url.clone(),
        }
    }

    pub async fn status(&mut self) -> Result<model::Status, Failure> {
        let r = self.inner.get_status(unary(pb::GetStatusRequest {})).await;
        r.map(|r| r.into_inner().into())
            .map_err(|s| self.failure(s))
    }

    /// Every runner, by name (walking the server's pages).
    pub async fn runners(&mut self) -> Result<Vec<Runner>, Failure> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let r = self
                .inner
                .list_runners(unary(pb::ListRunnersRequest {
                    page_size: 1000,
                    page_token,
                }))
                .await;
            let page = r.map_err(|s| self.failure(s))?.into_inner();
            all.extend(page.runners.into_iter().map(Runner::from));
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }

    pub async fn create_task(&mut self, task: NewTask) -> Result<Task, Failure> {
        let r = self
            .inner
            .create_task(unary(pb::CreateTaskRequest::from(task)))
            .await;
        Ok(wire::task_of(
            r.map_err(|s| self.failure(s))?.into_inner().task,
        )?)
    }

    /// One page of tasks (or of those with `status`), and the token of the next page (`None`
    /// after the last).
    pub async fn list_tasks(
        &mut self,
        status: Option<TaskStatus>,
        parent: Option<String>,
        page_token: String,
        page_size: u32,
    ) -> Result<(Vec<Task>, Option<String>), Failure> {
        let status = status.map(wire::task_status);
        let r = self
            .inner
            .list_tasks(unary(pb::ListTasksRequest {
                status,
                page_size,
                page_token,
                parent,
            }))
            .await;
        let page = r.map_err(|s| self.failure(s))?.into_inner();
        let next = Some(page.next_page_token).filter(|t| !t.is_empty());
        Ok((page.tasks.into_iter().map(Task::from).collect(), next))
    }

    /// Changes the fields given of a task.
    pub async fn edit_task(&mut self, change: model::TaskChange) -> Result<Task, Failure> {
        let r = self
            .inner
            .edit_task(unary(pb::EditTaskRequest::from(change)))
            .await;
        Ok(wire::task_of(
            r.map_err(|s| self.failure(s))?.into_inner().task,
        )?)
    }

    /// Creates the tasks in one call, in order, all or none.
    pub async fn create_tasks(&mut self, tasks: Vec<NewTask>) -> Result<Vec<Task>, Failure> {
        let tasks = tasks.into_iter().map(pb::CreateTaskRequest::from).collect();
        let r = self
            .inner
            .create_tasks(unary(pb::CreateTasksRequest { tasks }))
            .await;
        let created = r.map_err(|s| self.failure(s))?.into_inner().tasks;
        Ok(created.into_iter().map(Task::from).collect())
    }

    /// A task with its runs and history.
    pub async fn get_task(&mut self, id: String) -> Result<TaskDetail, Failure> {
        let r = self.inner.get_task(unary(pb::GetTaskRequest { id })).await;
        Ok(TaskDetail::try_from(
            r.map_err(|s| self.failure(s))?.into_inner(),
        )?)
    }

    /// What holds a task, in sentences (nothing when the answer lacks the task).
    pub async fn waiting_for(&mut self, id: String) -> Result<Vec<String>, Failure> {
        let r = self.inner.get_task(unary(pb::GetTaskRequest { id })).await;
        Ok(wire::waiting_for(
            r.map_err(|s| self.failure(s))?.into_inner(),
        ))
    }

    /// Back to Open; `note` for the next prompt, `fresh` to start from the base.
    pub async fn retry_task(
        &mut self,
        id: String,
        note: Option<String>,
        fresh: bool,
    ) -> Result<Task, Failure> {
        let r = self
            .inner
            .retry_task(unary(pb::RetryTaskRequest { id, note, fresh }))
            .await;
        Ok(wire::task_of(
            r.map_err(|s| self.failure(s))?.into_inner().task,
        )?)
    }

    /// Approves a verified task (`by`: who, for its history).
    pub async fn approve_task(
        &mut self,
        id: String,
        note: Option<String>,
        by: Option<String>,
    ) -> Result<Task, Failure> {
        let r = self
            .inner
            .approve_task(unary(pb::ApproveTaskRequest { id, note, by }))
            .await;
        Ok(wire::task_of(
            r.map_err(|s| self.failure(s))?.into_inner().task,
        )?)
    }

    /// Rejects a verified task with `note` for its agent (`by`: who, for its history).
    pub async fn reject_task(
        &mut self,
        id: String,
        note: String,
        by: Option<String>,
    ) -> Result<Task, Failure> {
        let r = self
            .inner
            .reject_task(unary(pb::RejectTaskRequest { id, note, by }))
            .await;
        Ok(wire::task_of(
            r.map_err(|s| self.failure(s))?.into_inner().task,
        )?)
    }

    /// Pauses a task and its children; how many tasks it paused.
    pub async fn pause_task(&mut self, id: String, reason: Option<String>) -> Result<u32, Failure> {
        let r = self
            .inner
            .pause_task(unary(pb::PauseTaskRequest { id, reason }))
            .await;
        Ok(r.map_err(|s| self.failure(s))?.into_inner().tasks)
    }

    /// Resumes a paused task and its children; how many tasks it resumed.
    pub async fn resume_task(&mut self, id: String) -> Result<u32, Failure> {
        let r = self
            .inner
            .resume_task(unary(pb::ResumeTaskRequest { id }))
            .await;
        Ok(r.map_err(|s| self.failure(s))?.into_inner().tasks)
    }

    pub async fn cancel_task(&mut self, id: String) -> Result<Task, Failure> {
        let r = self
            .inner
            .cancel_task(unary(pb::CancelTaskRequest { id }))
            .await;
        Ok(wire::task_of(
            r.map_err(|s| self.failure(s))?.into_inner().task,
        )?)
    }

    pub async fn add_dependencies(
        &mut self,
        id: String,
        depends_on: Vec<String>,
    ) -> Result<Task, Failure> {
        let r = self
            .inner
            .add_dependencies(unary(pb::AddDependenciesRequest { id, depends_on }))
            .await;
        Ok(wire::task_of(
            r.map_err(|s| self.failure(s))?.into_inner().task,
        )?)
    }
}

/// A stream from the server, read one view value at a time.
pub struct Feed<W> {
    messages: tonic::Streaming<W>,
    url: String,
}

impl<W> Feed<W> {
    /// The next message; `None` at the stream's end.
    async fn message(&mut self) -> Result<Option<W>, Failure> {
        self.messages
            .message()
            .await
            .map_err(|s| failure(&self.url, s))
    }
}

impl Feed<pb::TaskLogsResponse> {
    /// The next item of a `logs` stream; `None` at its end.
    pub async fn next(&mut self) -> Result<Option<LogItem>, Failure> {
        loop {
            let Some(msg) = self.message().await? else {
                return Ok(None);
            };
            // A message without a kind (from a newer server) says nothing to this client.
            if let Some(item) = wire::log_item(msg) {
                return Ok(Some(item));
            }
        }
    }
}

impl Feed<pb::FeedEntry> {
    /// The next entry of the change feed; `None` at the stream's end.
    pub async fn next(&mut self) -> Result<Option<model::FeedEntry>, Failure> {
        Ok(self.message().await?.map(model::FeedEntry::from))
    }
}

impl Feed<pb::TaskTransition> {
    /// The next transition; `None` at the stream's end.
    pub async fn next(&mut self) -> Result<Option<Transition>, Failure> {
        Ok(self.message().await?.map(Transition::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notes dir holding a note for each `(address, token)`, with the token files beside it.
    fn notes(entries: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("dir");
        for (i, (addr, token)) in entries.iter().enumerate() {
            let addr: SocketAddr = addr.parse().expect("addr");
            let file = dir.path().join(format!("token-{i}"));
            std::fs::write(&file, format!("{token}\n")).expect("token");
            std::fs::write(dir.path().join(note_name(addr)), file.display().to_string())
                .expect("note");
        }
        dir
    }

    fn token(dir: &tempfile::TempDir, host: &str, port: u16) -> Option<String> {
        local_admin_token_in(dir.path(), host, port).map(|l| l.token)
    }

    #[test]
    fn a_failed_call_is_one_line_and_an_exit_code() {
        let url = "http://127.0.0.1:7";
        let cases = [
            (
                Status::not_found("task nope\ndoes not exist"),
                exit::NOT_FOUND,
                "task nope does not exist",
            ),
            (
                Status::failed_precondition("cancelled already"),
                exit::REFUSED,
                "cancelled already",
            ),
            (
                Status::unavailable("connection refused"),
                exit::UNAVAILABLE,
                "cannot reach the pipeline server at http://127.0.0.1:7: connection refused",
            ),
            (
                Status::unavailable("the database is busy, try again"),
                exit::UNAVAILABLE,
                "the pipeline server at http://127.0.0.1:7 did nothing: the database is busy, \
                 try again",
            ),
            (
                Status::cancelled("gone"),
                exit::UNAVAILABLE,
                "the pipeline server at http://127.0.0.1:7 closed the connection before \
                 answering (gone); it may be shutting down or at its connection limit: try again",
            ),
            (
                Status::deadline_exceeded("slow"),
                exit::UNAVAILABLE,
                "the pipeline server at http://127.0.0.1:7 did not answer in time",
            ),
            (
                Status::unauthenticated("no credential"),
                exit::AUTH,
                "no credential",
            ),
            (Status::data_loss("x"), exit::FAILURE, "server error: x"),
        ];
        for (status, code, message) in cases {
            let f = failure(url, status);
            assert_eq!((f.exit_code, f.message.as_str()), (code, message));
        }
    }

    #[test]
    fn note_names_are_the_exact_address_and_safe_in_a_path() {
        let name = |a: &str| note_name(a.parse().expect("addr"));
        assert_eq!(name("127.0.0.1:50051"), "127.0.0.1-50051");
        assert_eq!(name("127.0.0.2:50051"), "127.0.0.2-50051");
        assert_eq!(name("[::1]:7"), "__1-7");
        assert_eq!(name("0.0.0.0:7"), "0.0.0.0-7");
    }

    #[test]
    fn a_stale_note_whose_token_file_is_gone_does_not_hide_the_catch_all_one() {
        let dir = notes(&[("0.0.0.0:5000", "pla_all")]);
        std::fs::write(
            dir.path()
                .join(note_name("127.0.0.1:5000".parse().expect("addr"))),
            "/nonexistent/admin.token",
        )
        .expect("stale note");
        assert_eq!(token(&dir, "127.0.0.1", 5000).as_deref(), Some("pla_all"));
    }

    #[test]
    fn a_token_goes_only_to_the_loopback_address_it_was_noted_for() {
        let dir = notes(&[("127.0.0.1:5000", "pla_a"), ("127.0.0.2:5000", "pla_b")]);
        assert_eq!(token(&dir, "127.0.0.1", 5000).as_deref(), Some("pla_a"));
        assert_eq!(token(&dir, "127.0.0.2", 5000).as_deref(), Some("pla_b"));
        assert_eq!(token(&dir, "127.0.0.3", 5000), None, "no note for it");
        assert_eq!(token(&dir, "127.0.0.1", 5001), None, "another port");
        assert_eq!(token(&dir, "192.0.2.7", 5000), None, "not loopback");
        assert_eq!(token(&dir, "[::1]", 5000), None, "another address");
    }

    #[test]
    fn a_server_on_every_address_is_found_through_loopback_only() {
        let dir = notes(&[("0.0.0.0:5000", "pla_all"), ("[::]:6000", "pla_v6")]);
        assert_eq!(token(&dir, "127.0.0.1", 5000).as_deref(), Some("pla_all"));
        assert_eq!(token(&dir, "192.0.2.7", 5000), None);
        assert_eq!(
            token(&dir, "0.0.0.0", 5000).as_deref(),
            Some("pla_all"),
            "connecting to 0.0.0.0 reaches 127.0.0.1"
        );
        assert_eq!(token(&dir, "[::1]", 6000).as_deref(), Some("pla_v6"));
        assert_eq!(
            token(&dir, "127.0.0.1", 6000).as_deref(),
            Some("pla_v6"),
            "a dual-stack listener takes IPv4 too"
        );
        // An exact note wins over the catch-all one.
        let dir = notes(&[("0.0.0.0:5000", "pla_all"), ("127.0.0.1:5000", "pla_one")]);
        assert_eq!(token(&dir, "127.0.0.1", 5000).as_deref(), Some("pla_one"));
    }

    #[test]
    fn a_host_name_is_pinned_to_the_noted_address() {
        let dir = notes(&[("127.0.0.1:5000", "pla_a")]);
        // `localhost` resolves to loopback addresses only (whichever this host lists).
        match local_admin_token_in(dir.path(), "localhost", 5000) {
            Some(l) => {
                assert_eq!(l.token, "pla_a");
                assert_eq!(l.pin, Some("127.0.0.1:5000".parse().expect("addr")));
            }
            None => {
                let addrs: Vec<SocketAddr> = ("localhost", 5000)
                    .to_socket_addrs()
                    .map(Iterator::collect)
                    .unwrap_or_default();
                assert!(
                    !addrs.iter().any(|a| a.ip() == Ipv4Addr::LOCALHOST),
                    "localhost resolves to {addrs:?}"
                );
            }
        }
        assert_eq!(
            local_admin_token_in(dir.path(), "127.0.0.1", 5000).map(|l| l.pin),
            Some(None),
            "an address needs no pin"
        );
    }
}
