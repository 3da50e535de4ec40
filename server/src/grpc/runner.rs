//! The gRPC edge of the runner API: decode and validate, call the coordinator, encode. Streams
//! (the work stream, bundles in and out) are plumbing here; every decision is the
//! coordinator's.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pipeline_proto::v1 as pb;
use pipeline_proto::v1::runner_service_server::RunnerService;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use pipeline_core::ids::CommitId;
use pipeline_core::lines::{MAX_FEEDBACK_BYTES, keep_end};

use super::status_from_error;
use crate::auth::Caller;
use crate::coordinator::builds::BuildResult;
use crate::coordinator::{Coordinator, LeaseResult, RunnerHello};
use crate::domain::{CostSource, TaskId, Usage};
use crate::lifecycle::judge::{Outcome, RunnerResult};
use crate::repo::{BundleStream, Repo};
use crate::scheduler::registry::{Assignment, LeaseRef, Push};
use crate::store::Store;

/// Bundles travel in chunks of this size, well under gRPC's 4 MiB message limit.
pub const CHUNK_BYTES: usize = 256 * 1024;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// How long a base fetch may take unless the server says otherwise (`--fetch-base-timeout`).
pub const FETCH_BASE_TIMEOUT: Duration = Duration::from_secs(600);

/// The runner service over a shared coordinator.
pub struct RunnerApi<S> {
    coordinator: Arc<Coordinator<S, Repo>>,
    shutdown: CancellationToken,
    spool_seq: AtomicU64,
    /// A base fetch whose bundle is not all read by then is cut off and its git stopped.
    fetch_base_timeout: Duration,
}

impl<S> RunnerApi<S> {
    pub fn new(coordinator: Arc<Coordinator<S, Repo>>, shutdown: CancellationToken) -> Self {
        Self {
            coordinator,
            shutdown,
            spool_seq: AtomicU64::new(0),
            fetch_base_timeout: FETCH_BASE_TIMEOUT,
        }
    }

    /// Bounds each base fetch by `timeout`.
    pub fn with_fetch_base_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_base_timeout = timeout;
        self
    }
}

/// The commits a runner's mirror has (a fetch sends only what it lacks): at most 64; those
/// that are not full IDs are not the server's to know, and are left out.
fn have_commits(have: &[String]) -> Result<Vec<CommitId>, Status> {
    if have.len() > 64 {
        return Err(Status::invalid_argument("at most 64 'have' commits"));
    }
    Ok(have
        .iter()
        .filter_map(|c| CommitId::parse(c).ok())
        .collect())
}

fn lease_ref(raw: Option<pb::LeaseRef>) -> Result<LeaseRef, Status> {
    let raw = raw.ok_or_else(|| Status::invalid_argument("the request names no lease"))?;
    LeaseRef::parse(raw.lease_id, raw.epoch).map_err(|e| Status::invalid_argument(e.0))
}

fn lease_refs(raw: Vec<pb::LeaseRef>) -> Result<Vec<LeaseRef>, Status> {
    raw.into_iter().map(|l| lease_ref(Some(l))).collect()
}

fn lease_to_pb(l: &LeaseRef) -> pb::LeaseRef {
    pb::LeaseRef {
        lease_id: l.id.clone(),
        epoch: l.epoch,
    }
}

fn assignment_to_pb(a: &Assignment) -> pb::Assignment {
    pb::Assignment {
        lease: Some(lease_to_pb(&a.lease)),
        task_id: a.task_id.to_string(),
        run_id: a.run_id.clone(),
        title: a.title.clone(),
        namespace: a.namespace.clone(),
        base: a.base.clone(),
        base_commit: a.base_commit.to_string(),
        previous_commit: a.previous_commit.as_ref().map(ToString::to_string),
        patchset: a.patchset,
        prompt: a.prompt.clone(),
        verification: Some(verification_to_pb(&a.verification)),
        budget_cents: a.budget_cents,
        resume_session: a.resume_session.clone(),
    }
}

fn verification_to_pb(v: &pipeline_core::verify::Verifier) -> pb::Verification {
    use pipeline_core::verify::Verifier;
    let (mode, build_cmd, test_cmd) = match v {
        Verifier::Off => (pb::VerifyMode::Off, None, None),
        Verifier::Bild => (pb::VerifyMode::Bild, None, None),
        Verifier::Commands { build, test } => {
            (pb::VerifyMode::Commands, build.clone(), test.clone())
        }
    };
    pb::Verification {
        mode: mode.into(),
        build_cmd,
        test_cmd,
        digest: v.digest(),
    }
}

fn push_to_pb(push: &Push) -> pb::WorkMessage {
    let kind = match push {
        Push::Assign(a) => pb::work_message::Kind::Assignment(assignment_to_pb(a)),
        Push::Cancel(l) => pb::work_message::Kind::Cancel(lease_to_pb(l)),
        Push::Build(b) => pb::work_message::Kind::Build(pb::BuildAssignment {
            build: Some(lease_to_pb(&b.build)),
            commit: b.commit.to_string(),
            base: b.base.clone(),
            base_commit: b.base_commit.to_string(),
            verification: Some(verification_to_pb(&b.verification)),
            runs: b
                .runs
                .iter()
                .map(|(namespace, task)| pb::BuildRunSpec {
                    namespace: namespace.clone(),
                    task_id: task.as_ref().map(ToString::to_string),
                })
                .collect(),
        }),
    };
    pb::WorkMessage { kind: Some(kind) }
}

/// A runner's word that it is unhealthy (why), cut to one short line.
fn health(unhealthy: Option<String>) -> Option<String> {
    unhealthy.map(|why| {
        let line = why.lines().next().unwrap_or_default().trim();
        let mut end = line.len().min(500);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        if line.is_empty() {
            "unhealthy (no reason given)".to_owned()
        } else {
            line[..end].to_owned()
        }
    })
}

/// The most labels a runner may announce.
pub const MAX_LABELS: usize = 32;
/// The longest label, in bytes.
pub const MAX_LABEL_BYTES: usize = 128;
/// The longest version string, in bytes.
pub const MAX_VERSION_BYTES: usize = 64;

/// The largest cost one attempt may report, in cents (ten million dollars). Bounding each
/// report keeps every sum of them finite: a task's total would need 10^299 attempts to reach
/// infinity (which JSON cannot even say: `task show --json` printed `null`).
pub const MAX_REPORTED_COST_CENTS: f64 = 1e9;

/// A reported cost is a finite number of cents from 0 to [`MAX_REPORTED_COST_CENTS`].
fn check_cost(cents: f64) -> Result<(), Status> {
    if cents.is_finite() && (0.0..=MAX_REPORTED_COST_CENTS).contains(&cents) {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "cost_cents {cents:e} is not a cost: one attempt reports 0 to {MAX_REPORTED_COST_CENTS:e} \
         cents"
    )))
}

/// The most tokens of one kind one attempt may report (a trillion): bounded so that stored
/// counts and their sums stay exact integers.
pub const MAX_REPORTED_TOKENS: u64 = 1_000_000_000_000;
/// The longest agent name in a usage report, in bytes.
pub const MAX_AGENT_BYTES: usize = 32;
/// The longest model name in a usage report, in bytes.
pub const MAX_MODEL_BYTES: usize = 200;
/// The longest agent session ID in a usage report, in bytes.
pub const MAX_SESSION_BYTES: usize = 200;

/// A text field of a usage report: at most `max` bytes, no control characters. The refusal is
/// short whatever the field holds.
fn check_usage_text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "usage.{field} is {} bytes; at most {max}",
            value.len()
        )));
    }
    if let Some(bad) = value.chars().find(|c| c.is_control()) {
        return Err(Status::invalid_argument(format!(
            "usage.{field} contains {}",
            describe_char(bad)
        )));
    }
    Ok(())
}

/// An optional text field: an empty one is none.
fn usage_text(field: &str, value: Option<String>, max: usize) -> Result<Option<String>, Status> {
    match value.filter(|v| !v.is_empty()) {
        Some(v) => check_usage_text(field, &v, max).map(|()| Some(v)),
        None => Ok(None),
    }
}

/// A runner's usage report, bounded: a named agent, a model and session of sane length without
/// control characters, token counts up to [`MAX_REPORTED_TOKENS`], a cost as [`check_cost`]
/// allows, a known cost source.
fn usage_from_pb(u: pb::Usage) -> Result<Usage, Status> {
    if u.agent.is_empty() {
        return Err(Status::invalid_argument(
            "usage.agent is empty; name the agent",
        ));
    }
    check_usage_text("agent", &u.agent, MAX_AGENT_BYTES)?;
    let model = usage_text("model", u.model, MAX_MODEL_BYTES)?;
    let session_id = usage_text("session_id", u.session_id, MAX_SESSION_BYTES)?;
    for (field, n) in [
        ("input_tokens", u.input_tokens),
        ("cached_input_tokens", u.cached_input_tokens),
        ("cache_write_tokens", u.cache_write_tokens),
        ("output_tokens", u.output_tokens),
        ("reasoning_tokens", u.reasoning_tokens),
    ] {
        if n > MAX_REPORTED_TOKENS {
            return Err(Status::invalid_argument(format!(
                "usage.{field} {n} is not a token count: one attempt reports at most \
                 {MAX_REPORTED_TOKENS}"
            )));
        }
    }
    check_cost(u.cost_cents)
        .map_err(|e| Status::invalid_argument(format!("usage.{}", e.message())))?;
    let cost_source = match pb::CostSource::try_from(u.cost_source) {
        Ok(pb::CostSource::Reported) => CostSource::Reported,
        Ok(pb::CostSource::Estimated) => CostSource::Estimated,
        Ok(pb::CostSource::None) => CostSource::None,
        _ => {
            return Err(Status::invalid_argument(format!(
                "usage.cost_source {} is not reported, estimated or none",
                u.cost_source
            )));
        }
    };
    Ok(Usage {
        agent: u.agent,
        model,
        input_tokens: u.input_tokens,
        cached_input_tokens: u.cached_input_tokens,
        cache_write_tokens: u.cache_write_tokens,
        output_tokens: u.output_tokens,
        reasoning_tokens: u.reasoning_tokens,
        cost_cents: u.cost_cents,
        cost_source,
        complete: u.complete,
        session_id,
    })
}

/// How a character is named in a refusal.
fn describe_char(c: char) -> String {
    match c {
        ' ' => "a space".to_owned(),
        c if c.is_control() => format!("the control character {c:?}"),
        c => format!("{c:?}, which is not printable ASCII"),
    }
}

/// Labels are `KEY` or `KEY=VALUE`: printable ASCII without spaces, each at most
/// [`MAX_LABEL_BYTES`], at most [`MAX_LABELS`] of them. The refusal names the label (by position,
/// from 1) and what is wrong with it.
fn check_labels(labels: &[String]) -> Result<(), Status> {
    const RULE: &str = "a label is KEY or KEY=VALUE of printable ASCII without spaces";
    if labels.len() > MAX_LABELS {
        return Err(Status::invalid_argument(format!(
            "{} labels; a runner may have at most {MAX_LABELS}",
            labels.len()
        )));
    }
    for (i, label) in labels.iter().enumerate() {
        let n = i + 1;
        if label.len() > MAX_LABEL_BYTES {
            return Err(Status::invalid_argument(format!(
                "label {n} is {} bytes; a label is at most {MAX_LABEL_BYTES} bytes",
                label.len()
            )));
        }
        if label.is_empty() {
            return Err(Status::invalid_argument(format!(
                "label {n} is empty; {RULE}"
            )));
        }
        if let Some(bad) = label.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(Status::invalid_argument(format!(
                "label {n} ({}) contains {}; {RULE}",
                crate::domain::quote_for_message(label),
                describe_char(bad)
            )));
        }
        if label.starts_with('=') {
            return Err(Status::invalid_argument(format!(
                "label {n} ({}): its key is empty; {RULE}",
                crate::domain::quote_for_message(label)
            )));
        }
    }
    Ok(())
}

/// A version string is at most [`MAX_VERSION_BYTES`] of printable ASCII (spaces allowed).
fn check_version(version: &str) -> Result<(), Status> {
    if version.len() > MAX_VERSION_BYTES {
        return Err(Status::invalid_argument(format!(
            "the version is {} bytes; at most {MAX_VERSION_BYTES}",
            version.len()
        )));
    }
    if let Some(bad) = version
        .chars()
        .find(|c| !(c.is_ascii_graphic() || *c == ' '))
    {
        return Err(Status::invalid_argument(format!(
            "the version contains {}; use printable ASCII",
            describe_char(bad)
        )));
    }
    Ok(())
}

/// A runner name: like a task ID, safe in logs, paths, messages and as a map key.
fn check_runner_name(name: &str) -> Result<(), Status> {
    pipeline_core::ids::RunnerName::parse(name)
        .map(drop)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

impl TryFrom<pb::RegisterRequest> for RunnerHello {
    type Error = Status;

    /// Everything a runner says about itself is bounded here, before it is kept in memory or
    /// shown by `pipelinectl runners`.
    fn try_from(r: pb::RegisterRequest) -> Result<Self, Status> {
        check_runner_name(&r.name)?;
        check_labels(&r.labels)?;
        check_version(&r.version)?;
        let parents = r
            .only_parents
            .iter()
            .map(|p| {
                TaskId::parse(p)
                    .map_err(|e| Status::invalid_argument(format!("--only-parent: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if parents.len() > 64 {
            return Err(Status::invalid_argument("at most 64 --only-parent"));
        }
        let task = r
            .only_task
            .as_deref()
            .map(|t| {
                TaskId::parse(t).map_err(|e| Status::invalid_argument(format!("--only-task: {e}")))
            })
            .transpose()?;
        Ok(RunnerHello {
            name: r.name,
            labels: r.labels,
            scope: crate::domain::Scope { parents, task },
            slots: r.slots,
            version: r.version,
            protocol_version: r.protocol_version,
            // A word this server does not know is not shown as a sandbox.
            sandbox: r
                .sandbox
                .as_deref()
                .and_then(pipeline_core::sandbox::Kind::parse),
        })
    }
}

fn runner_id(raw: &str) -> Result<&str, Status> {
    if raw.is_empty() || raw.len() > 100 {
        return Err(Status::invalid_argument("invalid runner id"));
    }
    Ok(raw)
}

/// One heartbeat from `who`: renews its leases; answers those it must drop.
fn beat<S: Store>(
    coordinator: &Coordinator<S, Repo>,
    who: &crate::auth::Caller,
    r: pb::HeartbeatRequest,
) -> Result<pb::HeartbeatResponse, Status> {
    let id = runner_id(&r.runner_id)?;
    coordinator
        .authorize_runner(who, id)
        .map_err(status_from_error)?;
    let held = lease_refs(r.held)?;
    let dropped = coordinator
        .heartbeat(id, &held, r.draining, health(r.unhealthy))
        .map_err(status_from_error)?;
    Ok(pb::HeartbeatResponse {
        dropped: dropped.iter().map(lease_to_pb).collect(),
    })
}

#[tonic::async_trait]
impl<S: Store> RunnerService for RunnerApi<S> {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let who = super::caller(&request)?;
        let peer = request.remote_addr().map(|a| a.ip());
        let hello = RunnerHello::try_from(request.into_inner())?;
        // Per host and per name before the credential's own count (in `register`), so that
        // one host or one name over its limit does not use up the shared token's allowance.
        if matches!(who, Caller::Registration | Caller::Runner(_)) {
            let own = matches!(&who, Caller::Runner(name) if *name == hello.name);
            self.coordinator
                .auth()
                .count_registration_source(peer, &hello.name, own)
                .map_err(status_from_error)?;
        }
        let registered = self
            .coordinator
            .register(hello, &who)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::RegisterResponse {
            runner_id: registered.runner_id,
            heartbeat_interval_ms: registered.heartbeat_interval_ms,
            lease_ttl_ms: registered.lease_ttl_ms,
            credential: registered.credential,
            early_builds: self.coordinator.settings().early_builds,
        }))
    }

    type OpenWorkStream = BoxStream<pb::WorkMessage>;

    async fn open_work(
        &self,
        request: Request<pb::OpenWorkRequest>,
    ) -> Result<Response<Self::OpenWorkStream>, Status> {
        let who = super::caller(&request)?;
        let r = request.into_inner();
        let id = runner_id(&r.runner_id)?.to_owned();
        self.authorize(&who, &id)?;
        let held = lease_refs(r.held)?;
        let (generation, attached, pushes) = self
            .coordinator
            .open_work(&id, &held, r.draining, health(r.unhealthy))
            .await
            .map_err(status_from_error)?;
        let first = pb::WorkMessage {
            kind: Some(pb::work_message::Kind::Attached(pb::Attached {
                kept: attached.kept.iter().map(lease_to_pb).collect(),
                dropped: attached.dropped.iter().map(lease_to_pb).collect(),
            })),
        };
        // The pushes are encoded as tonic reads them: no task and no second channel per
        // runner (a channel of encoded messages cost ~18 KiB a runner, its first block of
        // slots). The stream ends when the registry drops its sender (a newer stream of the
        // runner's replaced it) or at shutdown; when it is dropped (the runner went away, or
        // it ended), the guard tells the registry, for this stream's generation only.
        let closed = CloseWork {
            coordinator: Arc::clone(&self.coordinator),
            id,
            generation,
        };
        let pushes = ReceiverStream::new(pushes).map(move |push| {
            let _owned_by_the_stream = &closed;
            Ok(push_to_pb(&push))
        });
        let stream = tokio_stream::once(Ok(first)).chain(pushes);
        Ok(Response::new(Box::pin(super::until_cancelled(
            stream,
            self.shutdown.clone(),
        ))))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let who = super::caller(&request)?;
        beat(&self.coordinator, &who, request.into_inner()).map(Response::new)
    }

    type HeartbeatsStream = BoxStream<pb::HeartbeatResponse>;

    /// Heartbeats on one stream: each message is handled where it is read (no task, no
    /// channel). The credential is checked again on every message, so a revoked runner hears
    /// of it at its next heartbeat, as with single calls.
    async fn heartbeats(
        &self,
        request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatsStream>, Status> {
        let who = super::caller(&request)?;
        let token = crate::auth::hash(super::bearer(request.metadata()).unwrap_or_default());
        let coordinator = Arc::clone(&self.coordinator);
        let beats = request.into_inner().map(move |r| {
            if coordinator.auth().identify_hash(&token).as_ref() != Some(&who) {
                return Err(Status::unauthenticated(super::INVALID_CREDENTIAL));
            }
            // An oversized message fails the stream itself, after the edge's rewriting.
            beat(&coordinator, &who, r.map_err(super::edge::oversized)?)
        });
        // Ends at shutdown, so an open stream does not hold the server up.
        Ok(Response::new(Box::pin(super::until_cancelled(
            beats,
            self.shutdown.clone(),
        ))))
    }

    type FetchBaseStream = BoxStream<pb::BundleChunk>;

    async fn fetch_base(
        &self,
        request: Request<pb::FetchBaseRequest>,
    ) -> Result<Response<Self::FetchBaseStream>, Status> {
        let who = super::caller(&request)?;
        let r = request.into_inner();
        let id = runner_id(&r.runner_id)?;
        self.authorize(&who, id)?;
        let lease = lease_ref(r.lease)?;
        let have = have_commits(&r.have)?;
        let child = self
            .coordinator
            .base_bundle(id, &lease, &have)
            .await
            .map_err(status_from_error)?;
        let deadline = self.fetch_base_timeout;
        let (runner, lease_id) = (id.to_owned(), lease.id);
        // A runner too slow to read is told, and so is one whose server stops mid-stream (a
        // stream that just ended would pass for a whole bundle, and the runner would give its
        // lease back for a base it cannot store).
        let late = move |unsent| match unsent {
            Unsent::Shutdown => Some(shutting_down()),
            Unsent::Stopped => None,
            Unsent::Late => Some({
                tracing::warn!(
                    %runner,
                    lease = %lease_id,
                    deadline_secs = deadline.as_secs(),
                    "a base fetch was not read within its deadline; stopped its git bundle create"
                );
                Status::deadline_exceeded(format!(
                    "the base bundle was not read within {} s (--fetch-base-timeout); \
                     fetch it again",
                    deadline.as_secs()
                ))
            }),
        };
        Ok(Response::new(
            self.send_bundle_within(BundleStream::new(child), late),
        ))
    }

    async fn complete_lease(
        &self,
        request: Request<Streaming<pb::CompleteLeaseRequest>>,
    ) -> Result<Response<pb::CompleteLeaseResponse>, Status> {
        let who = super::caller(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::CompleteLeaseRequest {
                kind: Some(pb::complete_lease_request::Kind::Header(h)),
            })) => h,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of CompleteLease must be its header",
                ));
            }
        };
        let id = runner_id(&header.runner_id)?.to_owned();
        self.authorize(&who, &id)?;
        let lease = lease_ref(header.lease)?;
        let outcome = match pb::LeaseOutcome::try_from(header.outcome) {
            Ok(pb::LeaseOutcome::DevFailed) => Outcome::DevFailed,
            Ok(pb::LeaseOutcome::VerifyFailed) => Outcome::VerifyFailed,
            Ok(pb::LeaseOutcome::Verified) => Outcome::Verified,
            _ => return Err(Status::invalid_argument("unknown lease outcome")),
        };
        check_cost(header.cost_cents)?;
        let usage = header.usage.map(usage_from_pb).transpose()?;
        // Refuse a dead lease before reading a possibly large bundle (the full check, against
        // the database too, comes with the result).
        self.coordinator
            .check_live_lease(&id, &lease)
            .map_err(status_from_error)?;
        let spool = self
            .spool(&mut stream, outcome != Outcome::DevFailed)
            .await?;
        let commit = header
            .commit
            .as_deref()
            .map(CommitId::parse)
            .transpose()
            .map_err(|e| Status::invalid_argument(format!("commit refused: {e}")))?;
        let result = LeaseResult {
            lease,
            result: RunnerResult {
                outcome,
                error: header.error.map(|e| keep_end(&e, MAX_FEEDBACK_BYTES)),
                cost_cents: header.cost_cents,
                usage,
                verify_skipped: header.verify_skipped,
                verify_digest: header.verify_digest,
                dev_finished_at: if header.dev_finished_at_ms > 0 {
                    header.dev_finished_at_ms
                } else {
                    self.coordinator.now()
                },
            },
            commit,
        };
        let done = self
            .coordinator
            .complete(&id, result, spool.as_ref().map(|s| s.0.as_path()))
            .await;
        drop(spool);
        let task = done.map_err(status_from_error)?;
        Ok(Response::new(pb::CompleteLeaseResponse {
            status: super::convert::status_to_pb(task.state.status).into(),
            patchset: task.state.patchset,
        }))
    }

    /// A commit offered before its runner's verification ends (`--early-builds`): the header
    /// is checked and the lease found live before the bundle is read, then the coordinator
    /// receives the commit as it would a result's and records the offer.
    async fn offer_commit(
        &self,
        request: Request<Streaming<pb::OfferCommitRequest>>,
    ) -> Result<Response<pb::OfferCommitResponse>, Status> {
        let who = super::caller(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::OfferCommitRequest {
                kind: Some(pb::offer_commit_request::Kind::Header(h)),
            })) => h,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of OfferCommit must be its header",
                ));
            }
        };
        let id = runner_id(&header.runner_id)?.to_owned();
        self.authorize(&who, &id)?;
        if !self.coordinator.settings().early_builds {
            return Err(pipeline_proto::offers_off());
        }
        let lease = lease_ref(header.lease)?;
        let commit = CommitId::parse(&header.commit)
            .map_err(|e| Status::invalid_argument(format!("commit refused: {e}")))?;
        // Refuse a dead lease before reading a possibly large bundle.
        self.coordinator
            .check_live_lease(&id, &lease)
            .map_err(status_from_error)?;
        let Some(spool) = self.spool(&mut stream, true).await? else {
            return Err(Status::invalid_argument(pb::OfferCommitRequest::MISSING));
        };
        let offered = self
            .coordinator
            .receive_offer(&id, &lease, &commit, &spool.0)
            .await;
        drop(spool);
        offered.map_err(status_from_error)?;
        Ok(Response::new(pb::OfferCommitResponse {}))
    }

    async fn append_logs(
        &self,
        request: Request<pb::AppendLogsRequest>,
    ) -> Result<Response<pb::AppendLogsResponse>, Status> {
        let who = super::caller(&request)?;
        let r = request.into_inner();
        let id = runner_id(&r.runner_id)?;
        self.authorize(&who, id)?;
        let lease = lease_ref(r.lease)?;
        let lines = r
            .lines
            .into_iter()
            .map(super::convert::log_line_from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        let acked_seq = self
            .coordinator
            .append_logs(id, &lease, lines)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::AppendLogsResponse { acked_seq }))
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        let who = super::caller(&request)?;
        let r = request.into_inner();
        let id = runner_id(&r.runner_id)?;
        self.authorize(&who, id)?;
        let lease = lease_ref(r.lease)?;
        if let Some(why) = health(r.unhealthy) {
            self.coordinator.runner_unhealthy(id, why);
        }
        self.coordinator
            .release(
                id,
                &lease,
                &keep_end(&r.reason, MAX_FEEDBACK_BYTES),
                r.infrastructure,
            )
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::ReleaseLeaseResponse {}))
    }

    type FetchBuildStream = BoxStream<pb::BundleChunk>;

    async fn fetch_build(
        &self,
        request: Request<pb::FetchBuildRequest>,
    ) -> Result<Response<Self::FetchBuildStream>, Status> {
        let who = super::caller(&request)?;
        let r = request.into_inner();
        let id = runner_id(&r.runner_id)?;
        self.authorize(&who, id)?;
        let build = lease_ref(r.build)?;
        let have = have_commits(&r.have)?;
        let (n, commit) = self
            .coordinator
            .check_build(id, &build)
            .map_err(status_from_error)?;
        let child = self
            .coordinator
            .repo()
            .build_bundle(n, &commit, &have)
            .await
            .map_err(status_from_error)?;
        // Whatever cut it short, the runner is told to fetch it again.
        let unsent = |unsent| {
            Some(if unsent == Unsent::Shutdown {
                shutting_down()
            } else {
                Status::deadline_exceeded("the build's bundle was not read in time; fetch it again")
            })
        };
        Ok(Response::new(
            self.send_bundle_within(BundleStream::new(child), unsent),
        ))
    }

    async fn complete_build(
        &self,
        request: Request<pb::CompleteBuildRequest>,
    ) -> Result<Response<pb::CompleteBuildResponse>, Status> {
        let who = super::caller(&request)?;
        let r = request.into_inner();
        let id = runner_id(&r.runner_id)?;
        self.authorize(&who, id)?;
        let build = lease_ref(r.build)?;
        let error = r.error.map(|e| keep_end(&e, MAX_FEEDBACK_BYTES));
        let result = match pb::BuildOutcome::try_from(r.outcome) {
            Ok(pb::BuildOutcome::Green) => BuildResult::Green {
                digest: r.verify_digest,
            },
            Ok(pb::BuildOutcome::Red) => BuildResult::Red {
                why: error.unwrap_or_else(|| "the build failed".to_owned()),
                digest: r.verify_digest,
            },
            Ok(pb::BuildOutcome::Infrastructure) => BuildResult::Infra {
                why: error.unwrap_or_else(|| "the runner could not build".to_owned()),
            },
            _ => return Err(Status::invalid_argument("unknown build outcome")),
        };
        self.coordinator
            .complete_build(id, &build, result)
            .map_err(status_from_error)?;
        Ok(Response::new(pb::CompleteBuildResponse {}))
    }
}

impl<S: Store> RunnerApi<S> {
    fn authorize(&self, who: &crate::auth::Caller, runner_id: &str) -> Result<(), Status> {
        self.coordinator
            .authorize_runner(who, runner_id)
            .map_err(status_from_error)
    }

    /// A response stream of the chunks of `bundle` (a `git bundle create` running), sent in
    /// the background. A bundle not sent whole (not read within `--fetch-base-timeout`, the
    /// server shutting down, the runner gone or git failed) stops git, and the runner is
    /// told what `tell` says of it, if anything.
    fn send_bundle_within(
        &self,
        mut bundle: BundleStream,
        tell: impl FnOnce(Unsent) -> Option<Status> + Send + 'static,
    ) -> BoxStream<pb::BundleChunk> {
        let (tx, rx) = mpsc::channel(4);
        let deadline = self.fetch_base_timeout;
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let unsent = tokio::select! {
                sent = tokio::time::timeout(deadline, send_bundle(&mut bundle, &tx)) => match sent {
                    Ok(Sent::All) => return,
                    Ok(Sent::Stopped) => Unsent::Stopped,
                    Err(_) => Unsent::Late,
                },
                () = shutdown.cancelled() => Unsent::Shutdown,
            };
            if let Some(status) = tell(unsent) {
                // Room for it even when the runner has not read the chunks before it: the
                // status must follow them, or the stream would end as if it were whole.
                let _ = tokio::time::timeout(STATUS_SEND, tx.send(Err(status))).await;
            }
            // SIGKILL and reap; whatever git started dies on the closed pipe.
            bundle.stop().await;
        });
        Box::pin(ReceiverStream::new(rx))
    }

    /// Writes the bundle chunks that follow a header to a spool file, up to the size cap. The
    /// file is removed when the returned guard is dropped, whatever happens: a cancelled
    /// upload, a refused one, a full disk.
    async fn spool<M: Upload>(
        &self,
        stream: &mut Streaming<M>,
        expect_bundle: bool,
    ) -> Result<Option<Spooled>, Status> {
        let dir = &self.coordinator.settings().spool_dir;
        let cap = self.coordinator.settings().max_bundle_bytes;
        let mut file = None;
        let mut size: u64 = 0;
        let spooled = Spooled(dir.join(format!(
            "{}-{}.bundle",
            std::process::id(),
            self.spool_seq.fetch_add(1, Ordering::Relaxed)
        )));
        while let Some(msg) = stream.next().await {
            let Some(chunk) = msg?.chunk() else {
                return Err(Status::invalid_argument(format!(
                    "only one header per {}",
                    M::CALL
                )));
            };
            size += chunk.data.len() as u64;
            if size > cap {
                return Err(Status::resource_exhausted(format!(
                    "the bundle is over the {cap}-byte limit"
                )));
            }
            if file.is_none() {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|e| spool_failed("spool dir", &e))?;
                file = Some(
                    tokio::fs::File::create(&spooled.0)
                        .await
                        .map_err(|e| spool_failed("spool file", &e))?,
                );
            }
            if let Some(f) = file.as_mut() {
                f.write_all(&chunk.data)
                    .await
                    .map_err(|e| spool_failed("spool write", &e))?;
            }
        }
        match file {
            Some(mut f) => {
                f.flush()
                    .await
                    .map_err(|e| spool_failed("spool flush", &e))?;
                Ok(Some(spooled))
            }
            None if expect_bundle => Err(Status::invalid_argument(M::MISSING)),
            None => Ok(None),
        }
    }
}

/// A call that uploads a commit's bundle after its header (CompleteLease, OfferCommit): what
/// [`RunnerApi::spool`] reads of its messages.
trait Upload: Send + 'static {
    /// The call's name, for refusals.
    const CALL: &'static str;
    /// The refusal of an upload that needs a bundle and sent none.
    const MISSING: &'static str;
    /// The message's bundle chunk; `None` for anything else (a second header).
    fn chunk(self) -> Option<pb::BundleChunk>;
}

impl Upload for pb::CompleteLeaseRequest {
    const CALL: &'static str = "CompleteLease";
    const MISSING: &'static str = "a verified or verify-failed result needs its commit's bundle";
    fn chunk(self) -> Option<pb::BundleChunk> {
        match self.kind {
            Some(pb::complete_lease_request::Kind::Chunk(c)) => Some(c),
            _ => None,
        }
    }
}

impl Upload for pb::OfferCommitRequest {
    const CALL: &'static str = "OfferCommit";
    const MISSING: &'static str = "an offer needs its commit's bundle";
    fn chunk(self) -> Option<pb::BundleChunk> {
        match self.kind {
            Some(pb::offer_commit_request::Kind::Chunk(c)) => Some(c),
            _ => None,
        }
    }
}

/// A bundle that cannot be spooled (a full disk): the server's trouble, not the commit's; the
/// runner sends a result again (an offer it drops: the result still comes). Said in the
/// server's log, once a failure.
fn spool_failed(what: &str, e: &std::io::Error) -> Status {
    tracing::warn!(
        error = %e,
        "cannot spool a commit's bundle ({what}); a result is sent again, an offer is dropped"
    );
    Status::internal(format!("the server cannot store the bundle ({what}): {e}"))
}

/// A spooled bundle, removed when dropped.
struct Spooled(PathBuf);

impl Drop for Spooled {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %self.0.display(), error = %e, "cannot remove a spooled bundle")
            }
        }
    }
}

/// Empties the spool dir (at start-up: what a crash left there).
pub fn clean_spool(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// How a bundle's sending ended.
enum Sent {
    /// Everything git wrote was sent (or its failure reported).
    All,
    /// The receiver went away, or reading git failed: git is to be stopped.
    Stopped,
}

/// Why a bundle was not sent whole.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unsent {
    /// Not read within `--fetch-base-timeout`.
    Late,
    /// The server is shutting down.
    Shutdown,
    /// The runner went away, or reading git failed (its failure already sent).
    Stopped,
}

/// How long a bundle stream that stops waits for room to say why.
const STATUS_SEND: Duration = Duration::from_secs(2);

/// Why a bundle stream stopped at shutdown: the runner fetches it again from the server that
/// comes back (or the next one), as it does when the server is away.
fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down; fetch the bundle again")
}

/// Sends the bundle's chunks, then reports git's failure if it failed.
async fn send_bundle(
    bundle: &mut BundleStream,
    tx: &mpsc::Sender<Result<pb::BundleChunk, Status>>,
) -> Sent {
    let mut first = true;
    loop {
        match bundle.next_chunk(CHUNK_BYTES).await {
            Ok(Some(data)) => {
                if tx.send(Ok(pb::BundleChunk { data })).await.is_err() {
                    return Sent::Stopped;
                }
                if std::mem::take(&mut first) {
                    crate::failpoint::pause_at("base-fetch-mid-stream").await;
                }
            }
            Ok(None) => return Sent::All,
            Err(e) => {
                let _ = tx.send(Err(status_from_error(e))).await;
                return Sent::Stopped;
            }
        }
    }
}

/// Tells the registry that a runner's work stream is gone when the stream is dropped.
struct CloseWork<S: Store> {
    coordinator: Arc<Coordinator<S, Repo>>,
    id: String,
    generation: u64,
}

impl<S: Store> Drop for CloseWork<S> {
    fn drop(&mut self) {
        self.coordinator.close_work(&self.id, self.generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(raw: &[&str]) -> Vec<String> {
        raw.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn labels_are_bounded_printable_keys_or_pairs() {
        assert!(check_labels(&labels(&["gpu", "os=linux", "zone=eu-1", "k=v=w"])).is_ok());
        assert!(
            check_labels(&labels(&["k="])).is_ok(),
            "an empty value is a value"
        );
        assert!(check_labels(&vec!["x".repeat(MAX_LABEL_BYTES); MAX_LABELS]).is_ok());
        for (raw, says) in [
            (
                vec!["x".repeat(MAX_LABEL_BYTES + 1)],
                "label 1 is 129 bytes",
            ),
            (vec!["l".to_owned(); MAX_LABELS + 1], "33 labels"),
            (labels(&["ok", ""]), "label 2 is empty"),
            (labels(&["a\tb"]), "the control character '\\t'"),
            (labels(&["caf\u{e9}"]), "'é', which is not printable ASCII"),
            (labels(&["=v"]), "its key is empty"),
        ] {
            let err = check_labels(&raw).expect_err(says);
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains(says), "{}", err.message());
        }
    }

    #[test]
    fn costs_are_finite_and_bounded() {
        for ok in [0.0, 0.5, 1e9] {
            assert!(check_cost(ok).is_ok(), "{ok}");
        }
        for bad in [-0.1, 1e9 + 1.0, 1.7e308, f64::INFINITY, f64::NAN] {
            let err = check_cost(bad).expect_err("refused");
            assert!(err.message().len() < 120, "{}", err.message());
        }
        assert_eq!(
            check_cost(1.7e308).expect_err("refused").message(),
            "cost_cents 1.7e308 is not a cost: one attempt reports 0 to 1e9 cents"
        );
    }

    fn usage() -> pb::Usage {
        pb::Usage {
            agent: "claude".into(),
            model: Some("claude-sonnet-4-5".into()),
            input_tokens: 1200,
            cached_input_tokens: 1000,
            cache_write_tokens: 100,
            output_tokens: 300,
            reasoning_tokens: 0,
            cost_cents: 4.25,
            cost_source: pb::CostSource::Reported.into(),
            complete: true,
            session_id: Some("0b5e-41".into()),
        }
    }

    #[test]
    fn usage_reports_are_bounded() {
        let ok = usage_from_pb(usage()).expect("valid");
        assert_eq!(
            (ok.agent.as_str(), ok.model.as_deref(), ok.cost_source),
            ("claude", Some("claude-sonnet-4-5"), CostSource::Reported)
        );
        assert_eq!(
            (ok.input_tokens, ok.output_tokens, ok.cost_cents),
            (1200, 300, 4.25)
        );
        let empty = usage_from_pb(pb::Usage {
            model: Some(String::new()),
            session_id: Some(String::new()),
            ..usage()
        })
        .expect("empty texts are none");
        assert_eq!((empty.model, empty.session_id), (None, None));
        let refused: Vec<(pb::Usage, &str)> = vec![
            (
                pb::Usage {
                    cost_cents: f64::NAN,
                    ..usage()
                },
                "usage.cost_cents NaN is not a cost",
            ),
            (
                pb::Usage {
                    cost_cents: -1.0,
                    ..usage()
                },
                "usage.cost_cents -1e0 is not a cost",
            ),
            (
                pb::Usage {
                    model: Some("m".repeat(1 << 20)),
                    ..usage()
                },
                "usage.model is 1048576 bytes; at most 200",
            ),
            (
                pb::Usage {
                    agent: "a".repeat(MAX_AGENT_BYTES + 1),
                    ..usage()
                },
                "usage.agent is 33 bytes; at most 32",
            ),
            (
                pb::Usage {
                    agent: String::new(),
                    ..usage()
                },
                "usage.agent is empty",
            ),
            (
                pb::Usage {
                    session_id: Some("s\n".into()),
                    ..usage()
                },
                "usage.session_id contains the control character '\\n'",
            ),
            (
                pb::Usage {
                    model: Some("m\u{1b}[2J".into()),
                    ..usage()
                },
                "usage.model contains the control character '\\u{1b}'",
            ),
            (
                pb::Usage {
                    output_tokens: u64::MAX,
                    ..usage()
                },
                "usage.output_tokens 18446744073709551615 is not a token count",
            ),
            (
                pb::Usage {
                    cost_source: pb::CostSource::Unspecified.into(),
                    ..usage()
                },
                "usage.cost_source 0 is not reported, estimated or none",
            ),
            (
                pb::Usage {
                    cost_source: 9,
                    ..usage()
                },
                "usage.cost_source 9",
            ),
        ];
        for (raw, says) in refused {
            let err = usage_from_pb(raw).expect_err(says);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{says}");
            assert!(err.message().starts_with(says), "{}", err.message());
            assert!(err.message().len() < 120, "{}", err.message());
        }
        assert!(
            usage_from_pb(pb::Usage {
                input_tokens: MAX_REPORTED_TOKENS,
                model: Some("m".repeat(MAX_MODEL_BYTES)),
                session_id: Some("s".repeat(MAX_SESSION_BYTES)),
                ..usage()
            })
            .is_ok()
        );
    }

    #[test]
    fn versions_and_names_are_bounded() {
        assert!(check_version("0.1.0 (abc123)").is_ok());
        assert!(check_version("").is_ok());
        assert!(check_version(&"1".repeat(MAX_VERSION_BYTES + 1)).is_err());
        assert!(check_version("1\n").is_err());
        assert!(check_runner_name("build-7").is_ok());
        let err = check_runner_name(&"r".repeat(1 << 20)).expect_err("long");
        assert!(
            err.message().len() < 200,
            "the message is short: {}",
            err.message()
        );
        assert!(err.message().starts_with("invalid runner name"));
    }
}
