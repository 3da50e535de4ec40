//! A runner spoken by hand over the real gRPC protocol, for the tests that need to misbehave:
//! stop heartbeating, send a late result for a dead lease, announce the wrong protocol version.
//!
//! Its connection runs on a runtime thread of its own, so that what the test drops (a work
//! stream, a call under way) reaches the server while the test waits on something else; what
//! a step stands for is waited on where the server shows it (`runners --json`, a spool file),
//! never for a fixed time. [`FakeRunner::register_frozen`] makes one whose connection runs
//! only during the test's calls (between them nothing answers the server's pings).

use std::time::Duration;

use pipeline_proto::v1 as pb;
use pipeline_proto::v1::runner_service_client::RunnerServiceClient;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::DEADLINE;

/// A hand-driven runner (blocking API over its own Tokio runtime).
pub struct FakeRunner {
    rt: tokio::runtime::Runtime,
    /// The server's URL (to ask it, as an admin, what it sees of this runner).
    url: String,
    client: RunnerServiceClient<Channel>,
    pub id: String,
    /// The credential the server issued at registration.
    pub credential: String,
    /// The lease TTL the server announced at registration.
    pub lease_ttl_ms: u64,
    /// Whether the server said it takes early offers (`--early-builds`).
    pub early_builds: bool,
    stream: Option<Streaming<pb::WorkMessage>>,
}

/// `message` with `authorization: Bearer <token>`.
pub fn authorized<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        req.metadata_mut().insert("authorization", value);
    }
    req
}

/// The messages of a `CompleteLease` call: the header, then the bundle in one chunk (if any).
pub fn complete_messages(
    runner_id: &str,
    lease: pb::LeaseRef,
    outcome: pb::LeaseOutcome,
    error: Option<String>,
    cost_cents: f64,
    commit: Option<String>,
    bundle: Vec<u8>,
) -> Vec<pb::CompleteLeaseRequest> {
    let mut messages = vec![pb::CompleteLeaseRequest {
        kind: Some(pb::complete_lease_request::Kind::Header(
            pb::CompleteLeaseHeader {
                runner_id: runner_id.to_owned(),
                lease: Some(lease),
                outcome: outcome.into(),
                error,
                cost_cents,
                commit,
                verify_skipped: None,
                dev_finished_at_ms: 0,
                verify_digest: None,
                usage: None,
            },
        )),
    }];
    if !bundle.is_empty() {
        messages.push(pb::CompleteLeaseRequest {
            kind: Some(pb::complete_lease_request::Kind::Chunk(pb::BundleChunk {
                data: bundle.into(),
            })),
        });
    }
    messages
}

impl FakeRunner {
    /// Registers `name` with the registration `token`, announcing `protocol_version`.
    pub fn register(
        url: &str,
        token: &str,
        name: &str,
        protocol_version: u32,
    ) -> Result<Self, Status> {
        Self::register_with(url, token, Self::request(name, protocol_version))
    }

    /// [`FakeRunner::register`], with a connection that runs only while the test calls the
    /// runner: between calls it is frozen, and answers not even the server's pings.
    pub fn register_frozen(
        url: &str,
        token: &str,
        name: &str,
        protocol_version: u32,
    ) -> Result<Self, Status> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Self::connect(rt, url, token, Self::request(name, protocol_version))
    }

    fn request(name: &str, protocol_version: u32) -> pb::RegisterRequest {
        pb::RegisterRequest {
            name: name.to_owned(),
            labels: vec!["fake".into()],
            slots: 1,
            version: "test".into(),
            protocol_version,
            ..Default::default()
        }
    }

    /// Registers with the registration `token` and a request made by the test.
    pub fn register_with(
        url: &str,
        token: &str,
        request: pb::RegisterRequest,
    ) -> Result<Self, Status> {
        // A worker thread drives the connection between the test's calls (a dropped stream is
        // reset at once, not at the next call).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        Self::connect(rt, url, token, request)
    }

    fn connect(
        rt: tokio::runtime::Runtime,
        url: &str,
        token: &str,
        request: pb::RegisterRequest,
    ) -> Result<Self, Status> {
        let mut client = rt
            .block_on(RunnerServiceClient::connect(url.to_owned()))
            .map_err(|e| Status::unavailable(e.to_string()))?
            .max_encoding_message_size(64 * 1024 * 1024);
        let resp = rt
            .block_on(client.register(authorized(token, request)))?
            .into_inner();
        Ok(Self {
            rt,
            url: url.to_owned(),
            client,
            id: resp.runner_id,
            // Registering with its own credential, a runner gets none new: it keeps that one.
            credential: resp.credential.unwrap_or_else(|| token.to_owned()),
            lease_ttl_ms: resp.lease_ttl_ms,
            early_builds: resp.early_builds,
            stream: None,
        })
    }

    /// Opens the work stream, reporting `held` leases; returns the `attached` answer.
    pub fn open(&mut self, held: Vec<pb::LeaseRef>) -> Result<pb::Attached, Status> {
        let mut stream = self
            .rt
            .block_on(self.client.open_work(authorized(
                &self.credential,
                pb::OpenWorkRequest {
                    runner_id: self.id.clone(),
                    held,
                    draining: false,
                    unhealthy: None,
                },
            )))?
            .into_inner();
        let first = self.rt.block_on(stream.message())?;
        self.stream = Some(stream);
        match first.and_then(|m| m.kind) {
            Some(pb::work_message::Kind::Attached(a)) => Ok(a),
            other => panic!("the work stream began with {other:?}"),
        }
    }

    /// Drops the work stream (the runner loses its connection) and waits until the server
    /// lists this runner offline (`runners --json`, with the admin token of the server this
    /// process started on the URL's port).
    pub fn close(&mut self) {
        self.stream = None;
        crate::wait_for("the server to see the fake runner's stream closed", || {
            let runners = crate::listed(crate::ctl(&self.url, &["runners", "--json"]).json());
            (!runners
                .iter()
                .any(|r| r["id"] == self.id.as_str() && crate::connected(r)))
            .then_some(())
        });
    }

    /// The next message pushed on the work stream.
    pub fn next_push(&mut self) -> pb::work_message::Kind {
        let stream = self.stream.as_mut().expect("open the stream first");
        let msg = self
            .rt
            .block_on(async { tokio::time::timeout(DEADLINE, stream.message()).await })
            .expect("a push within the deadline")
            .expect("stream ok")
            .expect("stream open");
        msg.kind.expect("a message kind")
    }

    /// The next assignment pushed on the work stream.
    pub fn next_assignment(&mut self) -> pb::Assignment {
        match self.next_push() {
            pb::work_message::Kind::Assignment(a) => a,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    pub fn heartbeat(&mut self, held: Vec<pb::LeaseRef>) -> Result<pb::HeartbeatResponse, Status> {
        self.heartbeat_saying(held, None)
    }

    /// A heartbeat that says the runner is unhealthy (takes no work) and why, or healthy.
    pub fn heartbeat_saying(
        &mut self,
        held: Vec<pb::LeaseRef>,
        unhealthy: Option<&str>,
    ) -> Result<pb::HeartbeatResponse, Status> {
        let req = pb::HeartbeatRequest {
            runner_id: self.id.clone(),
            held,
            draining: false,
            unhealthy: unhealthy.map(str::to_owned),
        };
        let req = authorized(&self.credential, req);
        Ok(self.rt.block_on(self.client.heartbeat(req))?.into_inner())
    }

    /// Sends log lines for `lease`.
    pub fn append_logs(
        &mut self,
        lease: pb::LeaseRef,
        lines: Vec<pb::LogLine>,
    ) -> Result<pb::AppendLogsResponse, Status> {
        let req = pb::AppendLogsRequest {
            runner_id: self.id.clone(),
            lease: Some(lease),
            lines,
        };
        let req = authorized(&self.credential, req);
        Ok(self.rt.block_on(self.client.append_logs(req))?.into_inner())
    }

    /// Sends a build job's result (`--remote-builds`).
    pub fn complete_build(
        &mut self,
        build: pb::LeaseRef,
        outcome: pb::BuildOutcome,
        verify_digest: Option<String>,
    ) -> Result<pb::CompleteBuildResponse, Status> {
        let req = pb::CompleteBuildRequest {
            runner_id: self.id.clone(),
            build: Some(build),
            outcome: outcome.into(),
            error: None,
            verify_digest,
        };
        let req = authorized(&self.credential, req);
        Ok(self
            .rt
            .block_on(self.client.complete_build(req))?
            .into_inner())
    }

    /// Fetches a lease's base bundle; returns its bytes.
    pub fn fetch(&mut self, lease: pb::LeaseRef) -> Result<Vec<u8>, Status> {
        let req = pb::FetchBaseRequest {
            runner_id: self.id.clone(),
            lease: Some(lease),
            have: vec![],
        };
        self.rt.block_on(async {
            let req = authorized(&self.credential, req);
            let mut stream = self.client.fetch_base(req).await?.into_inner();
            let mut out = Vec::new();
            while let Some(chunk) = stream.message().await? {
                out.extend_from_slice(&chunk.data);
            }
            Ok(out)
        })
    }

    /// Sends a result for `lease`, with `bundle` as its commit's bundle when not empty.
    pub fn complete(
        &mut self,
        lease: pb::LeaseRef,
        outcome: pb::LeaseOutcome,
        commit: Option<String>,
        bundle: Vec<u8>,
    ) -> Result<pb::CompleteLeaseResponse, Status> {
        self.complete_with_cost(lease, outcome, 1.0, commit, bundle)
    }

    /// [`FakeRunner::complete`], reporting `cost_cents`.
    pub fn complete_with_cost(
        &mut self,
        lease: pb::LeaseRef,
        outcome: pb::LeaseOutcome,
        cost_cents: f64,
        commit: Option<String>,
        bundle: Vec<u8>,
    ) -> Result<pb::CompleteLeaseResponse, Status> {
        let messages = complete_messages(
            &self.id,
            lease,
            outcome,
            Some("from the fake runner".into()),
            cost_cents,
            commit,
            bundle,
        );
        let call = self
            .client
            .complete_lease(authorized(&self.credential, tokio_stream_iter(messages)));
        Ok(self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), call).await })
            .map_err(|_| Status::deadline_exceeded("complete_lease"))??
            .into_inner())
    }
}

impl FakeRunner {
    /// Offers `commit` on `lease` before any result (`OfferCommit`), with `bundle` in one
    /// chunk.
    pub fn offer(
        &mut self,
        lease: pb::LeaseRef,
        commit: &str,
        bundle: Vec<u8>,
    ) -> Result<pb::OfferCommitResponse, Status> {
        let header = pb::OfferCommitHeader {
            runner_id: self.id.clone(),
            lease: Some(lease),
            commit: commit.to_owned(),
        };
        let messages = vec![
            pb::OfferCommitRequest {
                kind: Some(pb::offer_commit_request::Kind::Header(header)),
            },
            pb::OfferCommitRequest {
                kind: Some(pb::offer_commit_request::Kind::Chunk(pb::BundleChunk {
                    data: bundle.into(),
                })),
            },
        ];
        let call = self
            .client
            .offer_commit(authorized(&self.credential, tokio_stream_iter(messages)));
        Ok(self
            .rt
            .block_on(async { tokio::time::timeout(DEADLINE, call).await })
            .map_err(|_| Status::deadline_exceeded("offer_commit"))??
            .into_inner())
    }

    /// Sends `messages` as one `CompleteLease` call and waits for the answer.
    pub fn complete_raw(
        &mut self,
        messages: Vec<pb::CompleteLeaseRequest>,
    ) -> Result<pb::CompleteLeaseResponse, Status> {
        let call = self
            .client
            .complete_lease(authorized(&self.credential, tokio_stream_iter(messages)));
        Ok(self
            .rt
            .block_on(async { tokio::time::timeout(DEADLINE, call).await })
            .map_err(|_| Status::deadline_exceeded("complete_lease"))??
            .into_inner())
    }

    /// Sends `messages` as the start of a `CompleteLease` call that never ends, until `sent`
    /// says the server has them; then hangs up (a cancelled upload: the connection's thread
    /// resets the call; the test waits for what the server does about it).
    pub fn complete_then_hang_up(
        &mut self,
        messages: Vec<pb::CompleteLeaseRequest>,
        sent: impl Fn() -> bool,
    ) {
        use tonic::codegen::tokio_stream::StreamExt;
        let endless = tokio_stream_iter(messages).chain(tonic::codegen::tokio_stream::pending());
        let mut client = self.client.clone();
        let req = authorized(&self.credential, endless);
        let call = self
            .rt
            .spawn(async move { client.complete_lease(req).await });
        crate::wait_for("the server to receive the upload", || {
            assert!(
                !call.is_finished(),
                "the server answered a call that never ended"
            );
            sent().then_some(())
        });
        call.abort();
    }
}

/// A `CompleteLease` call kept open: the server waits for the rest of its upload until this is
/// dropped (then the call is cancelled).
pub struct HeldCall {
    _call: tokio::task::JoinHandle<()>,
}

impl Drop for HeldCall {
    fn drop(&mut self) {
        self._call.abort();
    }
}

impl FakeRunner {
    /// Sends `messages` as the start of a `CompleteLease` call that never ends, until `sent`
    /// says the server has them; the call stays open (a request under way, for a server that
    /// stops to wait for) until the returned [`HeldCall`] is dropped.
    pub fn complete_and_hold(
        &mut self,
        messages: Vec<pb::CompleteLeaseRequest>,
        sent: impl Fn() -> bool,
    ) -> HeldCall {
        use tonic::codegen::tokio_stream::StreamExt;
        let endless = tokio_stream_iter(messages).chain(tonic::codegen::tokio_stream::pending());
        let mut client = self.client.clone();
        let req = authorized(&self.credential, endless);
        let call = self.rt.spawn(async move {
            let _ = client.complete_lease(req).await;
        });
        crate::wait_for("the server to receive the upload", || sent().then_some(()));
        HeldCall { _call: call }
    }
}

fn tokio_stream_iter<T: Send + 'static>(
    items: Vec<T>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send {
    tonic::codegen::tokio_stream::iter(items)
}
