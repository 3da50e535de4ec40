//! The runner's edge: the only module of the runner that names `pipeline_proto::v1` types.
//!
//! What the server pushes is converted here, once and with validation, into the runner's own
//! types: an [`Assignment`] has a lease, a valid task ID, run ID and commit IDs, or it is
//! [`Pushed::Refused`] here and never reaches a job. What the runner sends is built here from its
//! own types. [`Client`] wraps the generated client: every call takes and returns domain types
//! and fails with the runner's own [`CallError`], read here once from the call's status the way
//! that call means it ([`read`]): no other module of the runner sees a `tonic::Status`.
//! [`Bearer`] is the credential every call presents.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use pipeline_core::ids::{CommitId, InvalidId, LeaseRef, RunnerId, TaskId};
use pipeline_core::verify::Verifier;
use pipeline_proto::servers::Servers;
use pipeline_proto::v1 as pb;
use pipeline_proto::{Disposition, classify};

use crate::usage::{CostSource, Usage};
use pipeline_proto::v1::runner_service_client::RunnerServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use crate::domain::{
    Assignment, BuildJob, BuildOutcome, CallError, Channel as LogChannel, Fatal, LeaseResult,
    LogLine, Outcome, Phase, Refusal, RunId,
};

/// How often the runner pings its server on an HTTP/2 connection, and how long it waits for the
/// answer before it takes the connection for lost.
pub const KEEPALIVE: Duration = Duration::from_secs(10);

/// How long the runner takes, at most, to give up a server that stopped answering (frozen, cut
/// off) and go to the next one: a keepalive's wait, then its answer's.
pub const GIVES_UP_AFTER: Duration = Duration::from_secs(2 * KEEPALIVE.as_secs());

/// Bundle chunks sent to the server (well under tonic's 4 MiB message limit).
const CHUNK_BYTES: usize = 256 * 1024;
/// The largest message either way (bundle chunks and log batches are far smaller).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The calls of the runner API, each of whose failures means something of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Register,
    OpenWork,
    /// The heartbeat stream (opening it, and its replies) and the single heartbeat call.
    Heartbeat,
    /// The work stream's messages.
    WorkStream,
    FetchBase,
    CompleteLease,
    AppendLogs,
    ReleaseLease,
    OfferCommit,
}

/// How the runner takes a failed `call`: `pipeline_proto::classify`'s reading, narrowed for
/// each call to what the runner has always done with it.
///
/// - A base fetch is refused only when the lease is no longer the runner's
///   (`FAILED_PRECONDITION`); a malformed, conflicting or oversized fetch, or one the runner may
///   not make, cannot succeed by trying again: fatal (the lease goes back, uncharged).
/// - A result is refused too when its bundle is over the server's size limit
///   (`RESOURCE_EXHAUSTED`: sending it again cannot help).
/// - A registration whose name is held by a connected runner is refused as such (it may be this
///   runner's own earlier connection, which goes away).
/// - An offer (`--early-builds`) to a server that takes none (`Unimplemented`: an older one;
///   or its own word, [`pipeline_proto::is_offers_off`]) cannot succeed there: fatal
///   ([`Fatal::Unsupported`]); any other refusal is the lease's (it is over), or the commit's.
/// - A heartbeat's failure is fatal only for a refused credential; a registration's,
///   a work stream's and a heartbeat's `DATA_LOSS` or `OUT_OF_RANGE` are retried, as are
///   `ALREADY_EXISTS` and `OUT_OF_RANGE` for calls the server never sends them for.
fn read(call: Call, status: &Status) -> CallError {
    let why = status.message().to_owned();
    let code = status.code();
    let refused = |refusal| CallError::Refused {
        why: why.clone(),
        refusal,
    };
    let fatal = |cause| CallError::Fatal {
        why: why.clone(),
        cause,
    };
    let retry = || CallError::Retry(why.clone());
    match (call, code) {
        (_, Code::NotFound) => CallError::Unregistered(why),
        (Call::FetchBase, Code::FailedPrecondition) => refused(Refusal::Other),
        (
            Call::FetchBase,
            Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::Cancelled,
        ) => retry(),
        (Call::FetchBase, Code::Unauthenticated) => fatal(Fatal::Credential),
        (Call::FetchBase, _) => fatal(Fatal::Other),
        (Call::Heartbeat, Code::Unauthenticated) => fatal(Fatal::Credential),
        (Call::Heartbeat, _) => retry(),
        (Call::CompleteLease, Code::ResourceExhausted) => refused(Refusal::Other),
        (Call::OfferCommit, Code::Unimplemented) => fatal(Fatal::Unsupported),
        (Call::OfferCommit, _) if pipeline_proto::is_offers_off(status) => {
            fatal(Fatal::Unsupported)
        }
        (Call::Register, Code::AlreadyExists) => refused(Refusal::NameTaken),
        (Call::Register, Code::Unimplemented) => fatal(Fatal::Unsupported),
        (
            Call::Register | Call::OpenWork,
            Code::AlreadyExists | Code::OutOfRange | Code::Unimplemented | Code::DataLoss,
        ) => retry(),
        (
            Call::CompleteLease | Call::AppendLogs | Call::ReleaseLease | Call::WorkStream,
            Code::AlreadyExists | Code::OutOfRange,
        ) => retry(),
        (_, _) => match classify(status) {
            Disposition::Retry => retry(),
            Disposition::Unregistered => CallError::Unregistered(why),
            Disposition::Refused => refused(Refusal::Other),
            Disposition::Fatal => match code {
                Code::Unauthenticated => fatal(Fatal::Credential),
                Code::Unimplemented => fatal(Fatal::Unsupported),
                _ => fatal(Fatal::Other),
            },
        },
    }
}

/// Reads a failed `call`'s status ([`read`]).
fn failed(call: Call) -> impl Fn(Status) -> CallError {
    move |status| read(call, &status)
}

/// The credential every call presents (`authorization: Bearer <token>`): the registration token
/// until the server issues the runner its own. Shared by the session and its jobs.
#[derive(Clone, Default)]
pub struct Bearer(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl Bearer {
    /// Presents `token` from now on (a token that is not valid header text is dropped).
    pub fn set(&self, token: &str) {
        let value = format!("Bearer {}", token.trim()).parse().ok();
        if let Ok(mut current) = self.0.write() {
            *current = value;
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = self.0.read().ok().and_then(|v| v.clone()) {
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

/// What a runner says about itself when it registers.
#[derive(Clone, Debug)]
pub struct Hello {
    pub name: String,
    pub labels: Vec<String>,
    pub slots: u32,
    /// Only the children of these tasks (`--only-parent`).
    pub only_parents: Vec<String>,
    /// Only this task (`--only-task`).
    pub only_task: Option<String>,
    /// The sandbox agents and builds run in.
    pub sandbox: pipeline_core::sandbox::Kind,
}

/// The server's answer to a registration.
#[derive(Clone, Debug)]
pub struct Registered {
    pub runner_id: RunnerId,
    /// How often to heartbeat, as the server set it (unclamped).
    pub heartbeat: Duration,
    /// How long a lease lives without a heartbeat.
    pub ttl: Duration,
    /// The runner's own credential, when it registered with the registration token.
    pub credential: Option<String>,
    /// The server takes early offers (`--early-builds`): each lease's commit is offered
    /// before it is verified.
    pub early_builds: bool,
}

/// Where the runner stands, as every work-stream opening and heartbeat tells the server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    /// The leases it works on or has queued.
    pub held: Vec<LeaseRef>,
    pub draining: bool,
    /// Why it takes no work, once it has had too many infrastructure failures.
    pub unhealthy: Option<String>,
}

/// What the server pushed on the work stream, validated.
#[derive(Clone, Debug, PartialEq)]
pub enum Pushed {
    Assignment(Box<Assignment>),
    /// A train build to run (`--remote-builds`).
    Build(Box<BuildJob>),
    /// Stop the job holding this lease and forget it (cancelled, lapsed or re-issued).
    Cancel(LeaseRef),
    /// An assignment the runner cannot work on, refused here: its lease (when it names a valid
    /// one) goes back, saying why.
    Refused {
        lease: Option<LeaseRef>,
        why: String,
    },
    /// Nothing for the runner (a repeated `attached`, an empty or unknown message, a
    /// cancellation naming no valid lease).
    Ignored,
}

/// An assignment that does not hold what a job needs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct InvalidAssignment {
    /// Its lease, when it names a valid one.
    pub lease: Option<LeaseRef>,
    pub why: String,
}

impl TryFrom<pb::Assignment> for Assignment {
    type Error = InvalidAssignment;

    fn try_from(a: pb::Assignment) -> Result<Self, Self::Error> {
        let lease = match a.lease {
            None => None,
            Some(l) => Some(lease_from_pb(l).map_err(|e| InvalidAssignment {
                lease: None,
                why: format!("the assignment's lease is invalid: {e}"),
            })?),
        };
        let Some(lease) = lease else {
            return Err(InvalidAssignment {
                lease: None,
                why: "the assignment names no lease".to_owned(),
            });
        };
        let invalid = |what: &str, e: InvalidId| InvalidAssignment {
            lease: Some(lease.clone()),
            why: format!("the assignment's {what} is invalid: {e}"),
        };
        let task = TaskId::parse(&a.task_id).map_err(|e| invalid("task", e))?;
        let run_id = RunId::parse(&a.run_id).map_err(|e| invalid("run id", e))?;
        let base = CommitId::parse(&a.base_commit).map_err(|e| invalid("base", e))?;
        let previous = match &a.previous_commit {
            Some(p) => Some(CommitId::parse(p).map_err(|e| invalid("patchset", e))?),
            None => None,
        };
        Ok(Assignment {
            lease,
            task,
            run_id,
            namespace: a.namespace,
            base_branch: a.base,
            base,
            previous,
            patchset: a.patchset,
            title: a.title,
            prompt: a.prompt,
            verification: a.verification.and_then(verification_from_pb),
            budget_cents: a.budget_cents.filter(|b| b.is_finite() && *b >= 0.0),
            resume_session: a.resume_session.filter(|s| {
                !s.is_empty()
                    && s.len() <= 200
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            }),
        })
    }
}

/// The server's verification; `None` when it sent none (an older server) or a mode this
/// runner does not know.
fn verification_from_pb(v: pb::Verification) -> Option<Verifier> {
    match v.mode() {
        pb::VerifyMode::Off => Some(Verifier::Off),
        pb::VerifyMode::Bild => Some(Verifier::Bild),
        pb::VerifyMode::Commands => Some(Verifier::Commands {
            build: v.build_cmd,
            test: v.test_cmd,
        }),
        pb::VerifyMode::Unspecified => None,
    }
}

impl From<pb::WorkMessage> for Pushed {
    fn from(msg: pb::WorkMessage) -> Self {
        match msg.kind {
            Some(pb::work_message::Kind::Assignment(a)) => match Assignment::try_from(a) {
                Ok(a) => Pushed::Assignment(Box::new(a)),
                Err(InvalidAssignment { lease, why }) => Pushed::Refused { lease, why },
            },
            Some(pb::work_message::Kind::Cancel(lease)) => match lease_from_pb(lease) {
                Ok(lease) => Pushed::Cancel(lease),
                Err(_) => Pushed::Ignored,
            },
            Some(pb::work_message::Kind::Build(b)) => match build_from_pb(b) {
                Some(job) => Pushed::Build(Box::new(job)),
                None => Pushed::Ignored,
            },
            Some(pb::work_message::Kind::Attached(_)) | None => Pushed::Ignored,
        }
    }
}

/// A build job, validated; `None` when it does not hold what a build needs (the server then
/// loses it to the runner's heartbeat, which does not report it).
fn build_from_pb(b: pb::BuildAssignment) -> Option<BuildJob> {
    let build = lease_from_pb(b.build?).ok()?;
    let runs = b
        .runs
        .into_iter()
        .map(|r| {
            let task = r.task_id.map(|t| TaskId::parse(&t)).transpose().ok()?;
            Some((r.namespace, task))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(BuildJob {
        build,
        commit: CommitId::parse(&b.commit).ok()?,
        base_branch: b.base,
        base: CommitId::parse(&b.base_commit).ok()?,
        verification: b.verification.and_then(verification_from_pb),
        runs,
    })
}

fn lease_from_pb(l: pb::LeaseRef) -> Result<LeaseRef, InvalidId> {
    LeaseRef::parse(l.lease_id, l.epoch)
}

fn lease_to_pb(l: &LeaseRef) -> pb::LeaseRef {
    pb::LeaseRef {
        lease_id: l.id.clone(),
        epoch: l.epoch,
    }
}

/// Leases the server names: one that is not valid cannot be one the runner holds.
fn leases_from_pb(leases: Vec<pb::LeaseRef>) -> Vec<LeaseRef> {
    leases
        .into_iter()
        .filter_map(|l| lease_from_pb(l).ok())
        .collect()
}

fn log_line_to_pb(l: &LogLine) -> pb::LogLine {
    let stream = match l.channel {
        LogChannel::Stdout => pb::LogStream::Stdout,
        LogChannel::Stderr => pb::LogStream::Stderr,
        LogChannel::Runner => pb::LogStream::Runner,
        LogChannel::Raw => pb::LogStream::Raw,
    };
    let phase = match l.phase {
        Phase::Dev => pb::RunPhase::Dev,
        Phase::Verify => pb::RunPhase::Verify,
    };
    pb::LogLine {
        seq: l.seq,
        at_ms: l.at_ms,
        stream: stream.into(),
        phase: phase.into(),
        text: l.text.clone(),
    }
}

fn outcome_to_pb(o: Outcome) -> pb::LeaseOutcome {
    match o {
        Outcome::DevFailed => pb::LeaseOutcome::DevFailed,
        Outcome::VerifyFailed => pb::LeaseOutcome::VerifyFailed,
        Outcome::Verified => pb::LeaseOutcome::Verified,
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

/// The messages of one `CompleteLease` call: the header, then the bundle in chunks.
fn complete_lease_messages(
    runner: &RunnerId,
    lease: &LeaseRef,
    result: &LeaseResult,
    bundle: Option<&Bytes>,
) -> Vec<pb::CompleteLeaseRequest> {
    let header = pb::CompleteLeaseHeader {
        runner_id: runner.to_string(),
        lease: Some(lease_to_pb(lease)),
        outcome: outcome_to_pb(result.outcome).into(),
        error: result.error.clone(),
        cost_cents: result.cost_cents,
        commit: result.commit.as_ref().map(CommitId::to_string),
        verify_skipped: result.verify_skipped.clone(),
        dev_finished_at_ms: result.dev_finished_at_ms,
        verify_digest: result.verify_digest.clone(),
        usage: result.usage.as_ref().map(usage_to_pb),
    };
    let mut messages = vec![pb::CompleteLeaseRequest {
        kind: Some(pb::complete_lease_request::Kind::Header(header)),
    }];
    if let Some(bytes) = bundle {
        messages.extend(chunks(bytes).map(|c| pb::CompleteLeaseRequest {
            kind: Some(pb::complete_lease_request::Kind::Chunk(c)),
        }));
    }
    messages
}

/// An offer's messages: its header, then the commit's bundle in chunks.
fn offer_commit_messages(
    runner: &RunnerId,
    lease: &LeaseRef,
    commit: &CommitId,
    bundle: &Bytes,
) -> Vec<pb::OfferCommitRequest> {
    let header = pb::OfferCommitHeader {
        runner_id: runner.to_string(),
        lease: Some(lease_to_pb(lease)),
        commit: commit.to_string(),
    };
    std::iter::once(pb::offer_commit_request::Kind::Header(header))
        .chain(chunks(bundle).map(pb::offer_commit_request::Kind::Chunk))
        .map(|kind| pb::OfferCommitRequest { kind: Some(kind) })
        .collect()
}

/// A bundle in chunks of [`CHUNK_BYTES`] (shared, not copied).
fn chunks(bytes: &Bytes) -> impl Iterator<Item = pb::BundleChunk> + '_ {
    (0..bytes.len())
        .step_by(CHUNK_BYTES)
        .map(|at| pb::BundleChunk {
            data: bytes.slice(at..(at + CHUNK_BYTES).min(bytes.len())),
        })
}

fn heartbeat_request(runner: &RunnerId, standing: &Standing) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        runner_id: runner.to_string(),
        held: standing.held.iter().map(lease_to_pb).collect(),
        draining: standing.draining,
        unhealthy: standing.unhealthy.clone(),
    }
}

/// The runner's client of the runner API, in the runner's types. Given several servers
/// (`--server URL1,URL2`), it talks to one at a time and moves on after an `UNAVAILABLE` (nothing
/// listening, a standby: to the leader it names first); the session's next attempt goes there.
#[derive(Clone)]
pub struct Client {
    inner: Arc<[RunnerServiceClient<InterceptedService<Channel, Bearer>>]>,
    servers: Arc<Servers>,
}

type Inner = RunnerServiceClient<InterceptedService<Channel, Bearer>>;

impl Client {
    /// A client of the servers at `urls` (commas between them; `host:port` means
    /// `http://host:port`) presenting `bearer`; it connects on first use, and again after the
    /// connection breaks.
    pub fn connect_lazy(urls: &str, tls_ca: Option<&Path>, bearer: Bearer) -> anyhow::Result<Self> {
        let list = pipeline_proto::servers::split(urls);
        let inner = list
            .iter()
            .map(|url| Self::channel(url, tls_ca, bearer.clone()))
            .collect::<anyhow::Result<Arc<[Inner]>>>()?;
        let servers = Servers::new(list).ok_or_else(|| {
            anyhow::anyhow!("no server URL given; use http://HOST:PORT (--server)")
        })?;
        Ok(Self {
            inner,
            servers: Arc::new(servers),
        })
    }

    fn channel(url: &str, tls_ca: Option<&Path>, bearer: Bearer) -> anyhow::Result<Inner> {
        let mut endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| {
            let cause =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .last()
                .map_or_else(String::new, ToString::to_string);
            anyhow::anyhow!(
                "invalid server URL {url:?} ({cause}); use http://HOST:PORT or \
                 https://HOST:PORT (--server)"
            )
        })?;
        if let Some(tls) = pipeline_proto::client_tls(url, tls_ca).map_err(anyhow::Error::msg)? {
            endpoint = endpoint
                .tls_config(tls)
                .with_context(|| "invalid TLS settings".to_owned())?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            // A server that accepts connections but answers nothing (frozen: SIGSTOP, or cut
            // off past its kernel) fails the calls open on it, so the runner tries again, or
            // tries the next server, instead of waiting for ever.
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            // Large log batches and bundle chunks are not held up by HTTP/2 flow control.
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(16 * 1024 * 1024))
            .connect_lazy();
        Ok(RunnerServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// The URL of the server the runner talks to now.
    pub fn url(&self) -> &str {
        self.servers.current_url()
    }

    /// The server to talk to now: its index and a client of it.
    fn pick(&self) -> (usize, Inner) {
        let i = self.servers.current();
        (i, self.inner[i].clone())
    }

    /// Reads `call`'s failure on server `tried`, moving on to another server when it says so.
    fn failed(&self, tried: usize, call: Call) -> impl Fn(Status) -> CallError + '_ {
        move |status| {
            if self.servers.failed(tried, &status) {
                tracing::warn!(
                    from = %self.servers.urls()[tried],
                    to = %self.servers.current_url(),
                    error = %status.message(),
                    "the server is unavailable; trying the next"
                );
            }
            read(call, &status)
        }
    }

    /// Registers (again); the server answers with the runner's ID for this registration.
    /// With `diagnose` (before the runner first registered), a server that cannot be reached is
    /// read with `pipeline_proto::reach`: a mistake waiting cannot heal (a URL, a certificate,
    /// TLS on one side only) is [`Fatal::Unreachable`], saying what to do.
    pub async fn register(&self, hello: &Hello, diagnose: bool) -> Result<Registered, CallError> {
        let request = pb::RegisterRequest {
            name: hello.name.clone(),
            labels: hello.labels.clone(),
            slots: hello.slots,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: pipeline_proto::PROTOCOL_VERSION,
            only_parents: hello.only_parents.clone(),
            only_task: hello.only_task.clone(),
            sandbox: Some(hello.sandbox.as_str().to_owned()),
        };
        let (tried, mut inner) = self.pick();
        let resp = match inner.register(request).await {
            Ok(resp) => resp.into_inner(),
            Err(status) => {
                let url = self.servers.urls()[tried].clone();
                let err = self.failed(tried, Call::Register)(status.clone());
                if diagnose
                    && matches!(err, CallError::Retry(_) | CallError::Unregistered(_))
                    && let Some(unreachable) = pipeline_proto::reach::diagnose(&url, &status).await
                {
                    let why = format!("cannot reach the pipeline server at {url}: {unreachable}");
                    // With other servers to try, one that cannot be used is passed over.
                    return Err(if unreachable.permanent && self.servers.urls().len() == 1 {
                        CallError::Fatal {
                            why,
                            cause: Fatal::Unreachable,
                        }
                    } else {
                        CallError::Retry(why)
                    });
                }
                return Err(err);
            }
        };
        let runner_id = RunnerId::parse(&resp.runner_id)
            .map_err(|e| CallError::Retry(format!("the server's registration answer: {e}")))?;
        Ok(Registered {
            runner_id,
            heartbeat: Duration::from_millis(resp.heartbeat_interval_ms),
            ttl: Duration::from_millis(resp.lease_ttl_ms),
            credential: resp.credential,
            early_builds: resp.early_builds,
        })
    }

    /// Opens the work stream, reporting the leases the runner holds; returns the stream and the
    /// held leases the server no longer has for this runner (its first message, `attached`).
    pub async fn open_work(
        &self,
        runner: &RunnerId,
        standing: &Standing,
    ) -> Result<(WorkStream, Vec<LeaseRef>), CallError> {
        let request = pb::OpenWorkRequest {
            runner_id: runner.to_string(),
            held: standing.held.iter().map(lease_to_pb).collect(),
            draining: standing.draining,
            unhealthy: standing.unhealthy.clone(),
        };
        let (tried, mut inner) = self.pick();
        let mut stream = inner
            .open_work(request)
            .await
            .map_err(self.failed(tried, Call::OpenWork))?
            .into_inner();
        match stream
            .message()
            .await
            .map_err(self.failed(tried, Call::OpenWork))?
        {
            Some(pb::WorkMessage {
                kind: Some(pb::work_message::Kind::Attached(attached)),
            }) => Ok((WorkStream(stream), leases_from_pb(attached.dropped))),
            _ => Err(CallError::Retry(
                "the work stream did not start with 'attached'".to_owned(),
            )),
        }
    }

    /// Opens the heartbeat stream; `None` from a server older than it (it answers
    /// `UNIMPLEMENTED`: a capability, not a refusal), which takes heartbeats one call at a time.
    pub async fn open_heartbeats(&self) -> Result<Option<Heartbeats>, CallError> {
        let (tx, rx) = mpsc::channel(4);
        let (tried, mut inner) = self.pick();
        match inner.heartbeats(ReceiverStream::new(rx)).await {
            Ok(replies) => Ok(Some(Heartbeats {
                tx,
                replies: replies.into_inner(),
            })),
            Err(status) if status.code() == Code::Unimplemented => Ok(None),
            Err(status) => Err(self.failed(tried, Call::Heartbeat)(status)),
        }
    }

    /// One heartbeat as a call of its own; returns the leases the runner must drop.
    pub async fn heartbeat(
        &self,
        runner: &RunnerId,
        standing: &Standing,
    ) -> Result<Vec<LeaseRef>, CallError> {
        let (tried, mut inner) = self.pick();
        let reply = inner
            .heartbeat(heartbeat_request(runner, standing))
            .await
            .map_err(self.failed(tried, Call::Heartbeat))?
            .into_inner();
        Ok(leases_from_pb(reply.dropped))
    }

    /// Asks for the objects of `lease`'s base (and previous patchset) the runner lacks, as a
    /// bundle in chunks; `have` are the commits it has.
    pub async fn fetch_base(
        &self,
        runner: &RunnerId,
        lease: &LeaseRef,
        have: &[CommitId],
    ) -> Result<BaseChunks, CallError> {
        let request = pb::FetchBaseRequest {
            runner_id: runner.to_string(),
            lease: Some(lease_to_pb(lease)),
            have: have.iter().map(CommitId::to_string).collect(),
        };
        let (tried, mut inner) = self.pick();
        let stream = inner
            .fetch_base(request)
            .await
            .map_err(self.failed(tried, Call::FetchBase))?
            .into_inner();
        Ok(BaseChunks(stream))
    }

    /// Asks for the objects of build job `build`'s commit the runner lacks, as a bundle in
    /// chunks.
    pub async fn fetch_build(
        &self,
        runner: &RunnerId,
        build: &LeaseRef,
        have: &[CommitId],
    ) -> Result<BaseChunks, CallError> {
        let request = pb::FetchBuildRequest {
            runner_id: runner.to_string(),
            build: Some(lease_to_pb(build)),
            have: have.iter().map(CommitId::to_string).collect(),
        };
        let (tried, mut inner) = self.pick();
        let stream = inner
            .fetch_build(request)
            .await
            .map_err(self.failed(tried, Call::FetchBase))?
            .into_inner();
        Ok(BaseChunks(stream))
    }

    /// Sends a build job's result.
    pub async fn complete_build(
        &self,
        runner: &RunnerId,
        build: &LeaseRef,
        outcome: &BuildOutcome,
    ) -> Result<(), CallError> {
        let (outcome, error, verify_digest) = match outcome {
            BuildOutcome::Green { digest } => (pb::BuildOutcome::Green, None, Some(digest.clone())),
            BuildOutcome::Red { why, digest } => (
                pb::BuildOutcome::Red,
                Some(why.clone()),
                Some(digest.clone()),
            ),
            BuildOutcome::Infra(why) => (pb::BuildOutcome::Infrastructure, Some(why.clone()), None),
        };
        let request = pb::CompleteBuildRequest {
            runner_id: runner.to_string(),
            build: Some(lease_to_pb(build)),
            outcome: outcome.into(),
            error,
            verify_digest,
        };
        let (tried, mut inner) = self.pick();
        inner
            .complete_build(request)
            .await
            .map(drop)
            .map_err(self.failed(tried, Call::CompleteLease))
    }

    /// Sends `lease`'s result, with the commit's bundle; returns the task's status after it
    /// (for the log).
    pub async fn complete_lease(
        &self,
        runner: &RunnerId,
        lease: &LeaseRef,
        result: &LeaseResult,
        bundle: Option<&Bytes>,
    ) -> Result<String, CallError> {
        let messages = complete_lease_messages(runner, lease, result, bundle);
        let (tried, mut inner) = self.pick();
        let resp = inner
            .complete_lease(tokio_stream::iter(messages))
            .await
            .map_err(self.failed(tried, Call::CompleteLease))?
            .into_inner();
        Ok(resp
            .status()
            .as_str_name()
            .trim_start_matches("TASK_STATUS_")
            .to_ascii_lowercase())
    }

    /// Offers `lease`'s `commit`, with its bundle, before the runner verifies it
    /// (`--early-builds`).
    pub async fn offer_commit(
        &self,
        runner: &RunnerId,
        lease: &LeaseRef,
        commit: &CommitId,
        bundle: &Bytes,
    ) -> Result<(), CallError> {
        let messages = offer_commit_messages(runner, lease, commit, bundle);
        let (tried, mut inner) = self.pick();
        inner
            .offer_commit(tokio_stream::iter(messages))
            .await
            .map(drop)
            .map_err(self.failed(tried, Call::OfferCommit))
    }

    /// Gives `lease` back without a result, saying why, whether it was an infrastructure
    /// failure, and the runner's health.
    pub async fn release_lease(
        &self,
        runner: &RunnerId,
        lease: &LeaseRef,
        reason: &str,
        infrastructure: bool,
        unhealthy: Option<String>,
    ) -> Result<(), CallError> {
        let request = pb::ReleaseLeaseRequest {
            runner_id: runner.to_string(),
            lease: Some(lease_to_pb(lease)),
            reason: reason.to_owned(),
            infrastructure,
            unhealthy,
        };
        let (tried, mut inner) = self.pick();
        inner
            .release_lease(request)
            .await
            .map(drop)
            .map_err(self.failed(tried, Call::ReleaseLease))
    }

    /// Appends log lines to `lease`'s run; returns the last line number the server stored.
    pub async fn append_logs(
        &self,
        runner: &RunnerId,
        lease: &LeaseRef,
        lines: impl IntoIterator<Item = &LogLine>,
    ) -> Result<u64, CallError> {
        let request = pb::AppendLogsRequest {
            runner_id: runner.to_string(),
            lease: Some(lease_to_pb(lease)),
            lines: lines.into_iter().map(log_line_to_pb).collect(),
        };
        let (tried, mut inner) = self.pick();
        let resp = inner
            .append_logs(request)
            .await
            .map_err(self.failed(tried, Call::AppendLogs))?;
        Ok(resp.into_inner().acked_seq)
    }
}

/// The work stream: what the server pushes, in order.
pub struct WorkStream(Streaming<pb::WorkMessage>);

impl WorkStream {
    /// The next message; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<Pushed>, CallError> {
        Ok(self
            .0
            .message()
            .await
            .map_err(failed(Call::WorkStream))?
            .map(Pushed::from))
    }
}

/// The heartbeat stream: requests go out on one side, one reply comes back for each.
pub struct Heartbeats {
    tx: mpsc::Sender<pb::HeartbeatRequest>,
    replies: Streaming<pb::HeartbeatResponse>,
}

impl Heartbeats {
    /// Queues a heartbeat; false when the queue is full (the server is not reading).
    pub fn send(&self, runner: &RunnerId, standing: &Standing) -> bool {
        self.tx
            .try_send(heartbeat_request(runner, standing))
            .is_ok()
    }

    /// The next reply: the leases the runner must drop; `None` when the server ended the
    /// stream.
    pub async fn reply(&mut self) -> Result<Option<Vec<LeaseRef>>, CallError> {
        Ok(self
            .replies
            .message()
            .await
            .map_err(failed(Call::Heartbeat))?
            .map(|r| leases_from_pb(r.dropped)))
    }
}

/// A base bundle as it arrives.
pub struct BaseChunks(Streaming<pb::BundleChunk>);

impl BaseChunks {
    /// The next chunk; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, CallError> {
        Ok(self
            .0
            .message()
            .await
            .map_err(failed(Call::FetchBase))?
            .map(|c| c.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(c: char) -> String {
        c.to_string().repeat(40)
    }

    fn assignment() -> pb::Assignment {
        pb::Assignment {
            lease: Some(pb::LeaseRef {
                lease_id: "t-1@2".into(),
                epoch: 2,
            }),
            task_id: "t-1".into(),
            run_id: "dev-t-1-2".into(),
            title: "a title".into(),
            namespace: Some("ns".into()),
            base: "main".into(),
            base_commit: sha('a'),
            previous_commit: Some(sha('b')),
            patchset: 1,
            prompt: "do it".into(),
            verification: Some(pb::Verification {
                mode: pb::VerifyMode::Commands.into(),
                build_cmd: None,
                test_cmd: Some("make test".into()),
                digest: "v1:x".into(),
            }),
            budget_cents: None,
            resume_session: None,
        }
    }

    fn pushed(a: pb::Assignment) -> Pushed {
        Pushed::from(pb::WorkMessage {
            kind: Some(pb::work_message::Kind::Assignment(a)),
        })
    }

    fn refusal(a: pb::Assignment) -> (Option<LeaseRef>, String) {
        match pushed(a) {
            Pushed::Refused { lease, why } => (lease, why),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_valid_assignment_becomes_the_runners_own() {
        let Pushed::Assignment(a) = pushed(assignment()) else {
            panic!("refused")
        };
        assert_eq!(a.lease, LeaseRef::parse("t-1@2".into(), 2).expect("lease"));
        assert_eq!(a.task.as_str(), "t-1");
        assert_eq!(a.run_id.as_str(), "dev-t-1-2");
        assert_eq!(a.base.as_str(), sha('a'));
        assert_eq!(a.previous.as_ref().map(CommitId::as_str), Some(&*sha('b')));
        assert_eq!(
            (a.base_branch.as_str(), a.patchset, a.prompt.as_str()),
            ("main", 1, "do it")
        );
        assert_eq!(a.namespace.as_deref(), Some("ns"));
        assert_eq!(
            a.verification,
            Some(Verifier::Commands {
                build: None,
                test: Some("make test".into())
            }),
            "the server's verification"
        );
        // An older server sends none: the runner's own flags apply.
        let Pushed::Assignment(a) = pushed(pb::Assignment {
            verification: None,
            ..assignment()
        }) else {
            panic!("refused")
        };
        assert_eq!(a.verification, None);
    }

    #[test]
    fn an_assignment_without_a_lease_is_refused_with_nothing_to_give_back() {
        let (lease, why) = refusal(pb::Assignment {
            lease: None,
            ..assignment()
        });
        assert_eq!(
            (lease, why.as_str()),
            (None, "the assignment names no lease")
        );
        let (lease, why) = refusal(pb::Assignment {
            lease: Some(pb::LeaseRef {
                lease_id: String::new(),
                epoch: 1,
            }),
            ..assignment()
        });
        assert_eq!(lease, None);
        assert!(why.contains("lease is invalid"), "{why}");
    }

    #[test]
    fn an_assignment_with_a_bad_field_is_refused_and_its_lease_named() {
        let lease = Some(LeaseRef::parse("t-1@2".into(), 2).expect("lease"));
        for (bad, says) in [
            (
                pb::Assignment {
                    base_commit: "HEAD".into(),
                    ..assignment()
                },
                "the assignment's base is invalid",
            ),
            (
                pb::Assignment {
                    previous_commit: Some("--all".into()),
                    ..assignment()
                },
                "the assignment's patchset is invalid",
            ),
            (
                pb::Assignment {
                    task_id: "../x".into(),
                    ..assignment()
                },
                "the assignment's task is invalid",
            ),
            (
                pb::Assignment {
                    run_id: "-n/../../x".into(),
                    ..assignment()
                },
                "the assignment's run id is invalid",
            ),
        ] {
            let (refused, why) = refusal(bad);
            assert_eq!(refused, lease);
            assert!(why.starts_with(says), "{why}");
        }
    }

    #[test]
    fn cancellations_and_other_messages() {
        let cancel = |id: &str| {
            Pushed::from(pb::WorkMessage {
                kind: Some(pb::work_message::Kind::Cancel(pb::LeaseRef {
                    lease_id: id.into(),
                    epoch: 3,
                })),
            })
        };
        assert_eq!(
            cancel("t-1@3"),
            Pushed::Cancel(LeaseRef::parse("t-1@3".into(), 3).expect("lease"))
        );
        assert_eq!(cancel(""), Pushed::Ignored);
        assert_eq!(
            Pushed::from(pb::WorkMessage { kind: None }),
            Pushed::Ignored
        );
        let attached = pb::WorkMessage {
            kind: Some(pb::work_message::Kind::Attached(pb::Attached::default())),
        };
        assert_eq!(Pushed::from(attached), Pushed::Ignored);
    }

    #[test]
    fn a_result_goes_out_as_a_header_then_its_bundle_in_chunks() {
        let runner = RunnerId::parse("r1-1").expect("id");
        let lease = LeaseRef::parse("t-1@2".into(), 2).expect("lease");
        let result = LeaseResult {
            outcome: Outcome::Verified,
            error: None,
            cost_cents: 1.5,
            commit: Some(CommitId::parse(&sha('c')).expect("id")),
            verify_skipped: None,
            verify_digest: Some("v1:d".into()),
            dev_finished_at_ms: 7,
            usage: None,
        };
        let bundle = Bytes::from(vec![0u8; CHUNK_BYTES * 2 + 1]);
        let messages = complete_lease_messages(&runner, &lease, &result, Some(&bundle));
        assert_eq!(messages.len(), 4);
        let Some(pb::complete_lease_request::Kind::Header(h)) = &messages[0].kind else {
            panic!("no header first")
        };
        assert_eq!(h.runner_id, "r1-1");
        assert_eq!(h.lease, Some(lease_to_pb(&lease)));
        assert_eq!(h.outcome(), pb::LeaseOutcome::Verified);
        assert_eq!(h.commit.as_deref(), Some(&*sha('c')));
        assert_eq!(h.verify_digest.as_deref(), Some("v1:d"));
        let sizes: Vec<usize> = messages[1..]
            .iter()
            .map(|m| match &m.kind {
                Some(pb::complete_lease_request::Kind::Chunk(c)) => c.data.len(),
                _ => panic!("not a chunk"),
            })
            .collect();
        assert_eq!(sizes, [CHUNK_BYTES, CHUNK_BYTES, 1]);
        assert_eq!(
            complete_lease_messages(&runner, &lease, &result, None).len(),
            1
        );
    }

    #[test]
    fn an_offer_goes_out_as_a_header_then_its_bundle_in_chunks() {
        let runner = RunnerId::parse("r1-1").expect("id");
        let lease = LeaseRef::parse("t-1@2".into(), 2).expect("lease");
        let commit = CommitId::parse(&sha('c')).expect("id");
        let bundle = Bytes::from(vec![0u8; CHUNK_BYTES + 1]);
        let messages = offer_commit_messages(&runner, &lease, &commit, &bundle);
        let Some(pb::offer_commit_request::Kind::Header(h)) = &messages[0].kind else {
            panic!("no header first")
        };
        assert_eq!(
            (h.runner_id.as_str(), h.commit.as_str()),
            ("r1-1", &*sha('c'))
        );
        assert_eq!(h.lease, Some(lease_to_pb(&lease)));
        let sizes: Vec<usize> = messages[1..]
            .iter()
            .map(|m| match &m.kind {
                Some(pb::offer_commit_request::Kind::Chunk(c)) => c.data.len(),
                _ => panic!("not a chunk"),
            })
            .collect();
        assert_eq!(sizes, [CHUNK_BYTES, 1]);
    }

    /// An offer stops only at a server that takes none (an older one, or one that says so);
    /// a lease that is over refuses that offer alone.
    #[test]
    fn an_offer_is_given_up_for_good_only_by_a_server_that_takes_none() {
        let no_offers = |e: &CallError| {
            matches!(
                e,
                CallError::Fatal {
                    cause: Fatal::Unsupported,
                    ..
                }
            )
        };
        for code in every_code() {
            let read = read(Call::OfferCommit, &Status::new(code, "x"));
            assert_eq!(no_offers(&read), code == Code::Unimplemented, "{code:?}");
        }
        assert!(no_offers(&read(
            Call::OfferCommit,
            &pipeline_proto::offers_off()
        )));
        assert!(matches!(
            read(
                Call::OfferCommit,
                &Status::failed_precondition("lease over")
            ),
            CallError::Refused { .. }
        ));
    }

    fn every_code() -> impl Iterator<Item = Code> {
        (0..=16).map(Code::from)
    }

    /// The one reading of each failed call keeps what the runner has always done with it.
    #[test]
    fn each_call_is_read_as_the_runner_always_took_it() {
        for code in every_code() {
            let status = Status::new(code, "x");
            // A base fetch: the lease is over, try again, or give the lease back.
            let fetch = match read(Call::FetchBase, &status) {
                CallError::Refused { .. } => "refused",
                CallError::Retry(_) | CallError::Unregistered(_) => "retry",
                CallError::Fatal { .. } => "infra",
            };
            let fetch_before = match code {
                Code::FailedPrecondition => "refused",
                Code::Unavailable
                | Code::Unknown
                | Code::Internal
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::NotFound => "retry",
                _ => "infra",
            };
            assert_eq!(fetch, fetch_before, "fetch {code:?}");
            // A result: refused for good, or sent again.
            let refused = matches!(
                read(Call::CompleteLease, &status),
                CallError::Refused { .. }
            );
            let refused_before = matches!(
                code,
                Code::FailedPrecondition | Code::InvalidArgument | Code::ResourceExhausted
            );
            assert_eq!(refused, refused_before, "result {code:?}");
            // Log lines: refused for good, or sent again.
            let refused = matches!(read(Call::AppendLogs, &status), CallError::Refused { .. });
            let refused_before = matches!(code, Code::FailedPrecondition | Code::InvalidArgument);
            assert_eq!(refused, refused_before, "log lines {code:?}");
            // A registration or work stream: the runner gives up on these codes only (a name
            // taken and a server without the API are said before the first registration, and
            // retried after it).
            for call in [Call::Register, Call::OpenWork] {
                let gives_up = matches!(
                    read(call, &status),
                    CallError::Refused {
                        refusal: Refusal::Other,
                        ..
                    } | CallError::Fatal {
                        cause: Fatal::Credential | Fatal::Other,
                        ..
                    }
                );
                let before = matches!(
                    code,
                    Code::FailedPrecondition
                        | Code::InvalidArgument
                        | Code::PermissionDenied
                        | Code::Unauthenticated
                );
                assert_eq!(gives_up, before, "{call:?} {code:?}");
            }
            // A heartbeat: re-register, cut off, or a link to make again.
            let beat = match read(Call::Heartbeat, &status) {
                CallError::Unregistered(_) => "unregistered",
                CallError::Fatal {
                    cause: Fatal::Credential,
                    ..
                } => "revoked",
                _ => "lost",
            };
            let beat_before = match code {
                Code::NotFound => "unregistered",
                Code::Unauthenticated => "revoked",
                _ => "lost",
            };
            assert_eq!(beat, beat_before, "heartbeat {code:?}");
        }
        assert_eq!(
            read(Call::Register, &Status::already_exists("taken")),
            CallError::Refused {
                why: "taken".into(),
                refusal: Refusal::NameTaken
            }
        );
        assert_eq!(
            read(Call::Register, &Status::unimplemented("no")),
            CallError::Fatal {
                why: "no".into(),
                cause: Fatal::Unsupported
            }
        );
    }

    #[test]
    fn log_lines_and_heartbeats_carry_the_runners_values() {
        let line = LogLine {
            seq: 4,
            at_ms: 9,
            channel: LogChannel::Runner,
            phase: Phase::Verify,
            text: "hello".into(),
        };
        let pb_line = log_line_to_pb(&line);
        assert_eq!(pb_line.stream(), pb::LogStream::Runner);
        assert_eq!(pb_line.phase(), pb::RunPhase::Verify);
        assert_eq!(
            (pb_line.seq, pb_line.at_ms, &*pb_line.text),
            (4, 9, "hello")
        );
        let runner = RunnerId::parse("r1-1").expect("id");
        let standing = Standing {
            held: vec![LeaseRef::parse("t-1@2".into(), 2).expect("lease")],
            draining: true,
            unhealthy: Some("why".into()),
        };
        let beat = heartbeat_request(&runner, &standing);
        assert_eq!(beat.held.len(), 1);
        assert!(beat.draining);
        assert_eq!(beat.unhealthy.as_deref(), Some("why"));
    }
}
