//! The runner's life: register, hold the work stream open (the server pushes assignments and
//! cancellations on it), heartbeat every interval the server set (as messages on one
//! heartbeat stream, or single calls to a server without it), run each assignment as a job in
//! a free slot, and survive the server going away.
//!
//! - Reconnect: when the stream breaks the runner keeps its jobs, retries with jittered
//!   exponential back-off, and on reconnect reports the leases it holds; the server keeps the
//!   valid ones and names the rest, which are stopped.
//! - Watchdog: a runner that could not renew its leases for a whole TTL stops its jobs itself
//!   (the server has given them away by then).
//! - Drain (first SIGTERM/SIGINT): take no more work, let jobs finish for up to
//!   `--drain-timeout`, give back what is left, exit. Stop (second signal): stop jobs now, give
//!   their leases back, exit.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pipeline_core::ids::{LeaseRef, RunnerId, TaskId};
use pipeline_proto::{Disposition, classify};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::git::Mirror;
use crate::job::{self, Assignment, CurrentRunner, JobContext, JobEnd};
use crate::wire::{Bearer, Client, Heartbeats, Hello, Pushed, Standing, WorkStream};

/// A job in a slot.
struct Running {
    lease: LeaseRef,
    task: TaskId,
    slot: usize,
    cancel: CancellationToken,
    /// Set when the session stops the job and must give its lease back.
    release: bool,
    /// Whether its end was counted towards the runner's health.
    accounted: bool,
}

/// Why the connected phase ended.
enum Disconnect {
    /// The stream broke or the server went away: reconnect.
    Lost,
    /// The server forgot this runner (it restarted): register again.
    Unregistered,
    /// The runner is done.
    Exit,
    /// The server refuses this runner's credential (it was revoked): stop everything.
    Revoked,
}

/// The next heartbeat reply (the leases to drop); never, without a stream.
async fn next_reply(
    beats: &mut Option<Heartbeats>,
) -> Result<Option<Vec<LeaseRef>>, tonic::Status> {
    match beats {
        Some(b) => b.reply().await,
        None => std::future::pending().await,
    }
}

/// Runs the runner until it has drained or been stopped.
pub async fn run(
    config: Config,
    drain: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    config.agent.validate().map_err(anyhow::Error::msg)?;
    let name = config.name();
    let work_dir = config.work_dir();
    let path = std::env::var("PATH").unwrap_or_default();
    crate::preflight::check_programs(&config.agent, &config.verify, &path)?;
    crate::preflight::check_work_dir(&work_dir)?;
    let mirror = Mirror::open(&work_dir)
        .await
        .with_context(|| format!("cannot open the mirror in {}", work_dir.display()))?;
    let url = if config.server.contains("://") {
        config.server.clone()
    } else {
        format!("http://{}", config.server)
    };
    // The runner's own credential, saved when the server issued it, is what it presents; the
    // registration token is needed only the first time (or once the server forgot the runner).
    let saved = SavedCredential(work_dir.join("credential"));
    let bearer = Bearer::default();
    match saved.load().or_else(|| config.token.clone()) {
        Some(token) => bearer.set(&token),
        None => anyhow::bail!(
            "no credential: pass the runner registration token with --token or PIPELINE_TOKEN \
             (the server's log says where it is)"
        ),
    }
    let client = Client::connect_lazy(&url, config.tls_ca.as_deref(), bearer.clone())?;
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(JobContext {
        config: config.clone(),
        mirror,
        work_dir,
        client: client.clone(),
        runner: CurrentRunner::default(),
    });
    let mut session = Session {
        bearer,
        saved,
        registration_token: config.token.clone(),
        hello: Hello {
            name,
            labels: config.labels.clone(),
            slots: config.slots,
        },
        url,
        slots: config.slots,
        drain_timeout: Duration::from_secs(config.drain_timeout),
        client,
        ctx,
        runner_id: None,
        heartbeat: Duration::from_secs(10),
        ttl: Duration::from_secs(30),
        last_renewed: Instant::now(),
        jobs: HashMap::new(),
        queued: std::collections::VecDeque::new(),
        free: (0..config.slots as usize).collect(),
        done_tx,
        done_rx,
        draining: false,
        drain_deadline: None,
        drain,
        stop,
        infra_failures: 0,
        unhealthy: None,
        said_out_of_touch: false,
    };
    session.main().await
}

struct Session {
    /// The credential calls present; replaced by the runner's own once it is issued.
    bearer: Bearer,
    /// Where the runner's own credential is kept between runs.
    saved: SavedCredential,
    /// The registration token (or a credential) given on the command line.
    registration_token: Option<String>,
    hello: Hello,
    url: String,
    slots: u32,
    drain_timeout: Duration,
    client: Client,
    ctx: Arc<JobContext>,
    runner_id: Option<RunnerId>,
    heartbeat: Duration,
    ttl: Duration,
    /// The last time the server renewed this runner's leases.
    last_renewed: Instant,
    jobs: HashMap<String, Running>,
    /// Assignments that arrived before the job whose slot they take had reported its end (the
    /// server frees a slot as soon as it accepts a result).
    queued: std::collections::VecDeque<Assignment>,
    free: BTreeSet<usize>,
    done_tx: mpsc::UnboundedSender<(String, JobEnd)>,
    done_rx: mpsc::UnboundedReceiver<(String, JobEnd)>,
    draining: bool,
    drain_deadline: Option<Instant>,
    drain: CancellationToken,
    stop: CancellationToken,
    /// Infrastructure failures in a row (reset by a delivered result).
    infra_failures: u32,
    /// Why the runner takes no work, once it has had too many infrastructure failures.
    unhealthy: Option<String>,
    /// Whether "no contact with the server" was said since the last contact.
    said_out_of_touch: bool,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Session {
    async fn main(&mut self) -> anyhow::Result<()> {
        let mut backoff = Backoff::new();
        loop {
            if self.finished() {
                return Ok(());
            }
            if self.runner_id.is_none() {
                match self.register().await {
                    Ok(()) => {}
                    Err(status) if gives_up(&status) => return Err(self.refused(&status).await),
                    Err(status) => {
                        tracing::warn!(server = %self.url, error = %status.message(), "cannot register; retrying");
                        let pause = self.reconnect_pause(&mut backoff);
                        if self.wait(pause).await {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
            let stream = match self.open_work().await {
                Ok(stream) => stream,
                Err(status) if classify(&status) == Disposition::Unregistered => {
                    self.runner_id = None;
                    continue;
                }
                Err(status) if gives_up(&status) => return Err(self.refused(&status).await),
                Err(status) => {
                    tracing::warn!(error = %status.message(), "cannot open the work stream; retrying");
                    let pause = self.reconnect_pause(&mut backoff);
                    if self.wait(pause).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            backoff.reset();
            match self.connected(stream).await {
                Disconnect::Exit => return Ok(()),
                Disconnect::Revoked => {
                    self.abandon_all().await;
                    anyhow::bail!(
                        "the server at {} no longer accepts this runner's credential (revoked?)",
                        self.url
                    );
                }
                Disconnect::Unregistered => self.runner_id = None,
                Disconnect::Lost => {
                    tracing::warn!(server = %self.url, "lost the server; reconnecting");
                    let pause = self.reconnect_pause(&mut backoff);
                    if self.wait(pause).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Draining with nothing left to do.
    fn finished(&self) -> bool {
        self.draining && self.jobs.is_empty() && self.queued.is_empty()
    }

    async fn register(&mut self) -> Result<(), tonic::Status> {
        let resp = match self.client.register(&self.hello).await {
            Ok(resp) => resp,
            // The saved credential is unknown to the server (it lost its database, or the
            // runner was forgotten): the registration token, if given, registers it afresh.
            // (A reading of this one call, narrower than `classify`'s Fatal.)
            Err(status)
                if status.code() == Code::Unauthenticated
                    && self.saved.load().is_some()
                    && let Some(token) = self.registration_token.clone()
                    && self.saved.load().as_deref() != Some(token.trim()) =>
            {
                tracing::warn!(
                    error = %status.message(),
                    "the server does not know this runner's saved credential; registering \
                     with the registration token"
                );
                self.saved.forget();
                self.bearer.set(&token);
                self.client.register(&self.hello).await?
            }
            Err(status) => return Err(status),
        };
        if let Some(credential) = &resp.credential {
            // From now on the runner is itself: its own credential, never the shared token,
            // kept for its next start.
            self.bearer.set(credential);
            if let Err(e) = self.saved.store(credential) {
                tracing::warn!(error = %e, "cannot save the runner's credential; the next start needs the registration token again");
            }
        }
        self.heartbeat = resp.heartbeat.max(Duration::from_millis(10));
        self.ttl = resp.ttl.max(Duration::from_millis(30));
        tracing::info!(runner = %self.hello.name, id = %resp.runner_id, server = %self.url, "registered");
        self.runner_id = Some(resp.runner_id);
        Ok(())
    }

    fn held(&self) -> Vec<LeaseRef> {
        self.jobs
            .values()
            .map(|j| j.lease.clone())
            .chain(self.queued.iter().map(|a| a.lease.clone()))
            .collect()
    }

    /// Where the runner stands, for the server.
    fn standing(&self) -> Standing {
        Standing {
            held: self.held(),
            draining: self.draining,
            unhealthy: self.unhealthy.clone(),
        }
    }

    async fn open_work(&mut self) -> Result<WorkStream, tonic::Status> {
        let Some(id) = self.runner_id.clone() else {
            return Err(tonic::Status::not_found("the runner is not registered"));
        };
        let (stream, dropped) = self.client.open_work(&id, &self.standing()).await?;
        // The first message said which held leases survived.
        for lease in &dropped {
            self.drop_lease(lease, "the server no longer holds it for this runner");
        }
        // Jobs use the new ID only now that their leases are re-attached to it.
        self.ctx.runner.set(id);
        self.renewed_now();
        Ok(stream)
    }

    /// Stops the job holding `lease` without giving it back (the server already took it).
    fn drop_lease(&mut self, lease: &LeaseRef, why: &str) {
        self.queued.retain(|a| a.lease != *lease);
        if let Some(job) = self.jobs.get(&lease.id)
            && job.lease.epoch == lease.epoch
        {
            tracing::warn!(task = %job.task, lease = %lease.id, "stopping: {why}");
            job.cancel.cancel();
        }
    }

    fn start(&mut self, a: Assignment) {
        let lease = a.lease.clone();
        if let Some(why) = &self.unhealthy {
            tracing::warn!(task = %a.task, "unhealthy: giving the assignment back");
            self.spawn_release(lease, format!("the runner is unhealthy: {why}"), false);
            return;
        }
        // A job that just delivered its result may not have reported its end yet.
        while self.free.is_empty() {
            match self.done_rx.try_recv() {
                Ok((lease, end)) => {
                    self.account(&lease, &end);
                    if let Some((lease, reason, infra)) = self.free_slot(&lease, end) {
                        self.spawn_release(lease, reason, infra);
                    }
                }
                Err(_) => break,
            }
        }
        let Some(slot) = self.free.pop_first() else {
            if self.queued.len() < self.slots as usize {
                tracing::info!(task = %a.task, "assignment queued until a job reports its end");
                self.queued.push_back(a);
            } else {
                tracing::error!(task = %a.task, "assignment with no free slot; giving it back");
                self.spawn_release(lease, "the runner had no free slot".to_owned(), false);
            }
            return;
        };
        let cancel = CancellationToken::new();
        self.jobs.insert(
            lease.id.clone(),
            Running {
                lease: lease.clone(),
                task: a.task.clone(),
                slot,
                cancel: cancel.clone(),
                release: false,
                accounted: false,
            },
        );
        let ctx = Arc::clone(&self.ctx);
        let done = self.done_tx.clone();
        let lease_id = lease.id;
        tokio::spawn(async move {
            let end = job::run(ctx, a, slot, cancel).await;
            let _ = done.send((lease_id, end));
        });
    }

    fn spawn_release(&self, lease: LeaseRef, reason: String, infrastructure: bool) {
        let client = self.client.clone();
        // Not registered, the runner has nothing the server would take back.
        let Some(runner_id) = self.runner_id.clone() else {
            return;
        };
        let unhealthy = self.unhealthy.clone();
        tokio::spawn(async move {
            let release =
                client.release_lease(&runner_id, &lease, &reason, infrastructure, unhealthy);
            let _ = tokio::time::timeout(Duration::from_secs(5), release).await;
        });
    }

    /// A job ended: free its slot, start a queued assignment in it, and give the lease back if
    /// the session or the job asked.
    async fn finish(&mut self, lease_id: &str, end: JobEnd) {
        self.account(lease_id, &end);
        if let Some((lease, reason, infrastructure)) = self.free_slot(lease_id, end) {
            // The runner's health goes with it, so that the server does not hand the freed slot
            // to a runner that has just turned unhealthy.
            if let Some(runner_id) = &self.runner_id {
                let release = self.client.release_lease(
                    runner_id,
                    &lease,
                    &reason,
                    infrastructure,
                    self.unhealthy.clone(),
                );
                let _ = tokio::time::timeout(Duration::from_secs(5), release).await;
            }
        }
        if !self.free.is_empty()
            && let Some(next) = self.queued.pop_front()
        {
            self.start(next);
        }
    }

    /// Counts a job's end towards the runner's health: a delivered result starts the count of
    /// infrastructure failures again. Idempotent per job (it runs before the job is removed).
    fn account(&mut self, lease_id: &str, end: &JobEnd) {
        let Some(job) = self.jobs.get_mut(lease_id) else {
            return;
        };
        if std::mem::replace(&mut job.accounted, true) {
            return;
        }
        let task = job.task.clone();
        match end {
            JobEnd::Delivered => self.infra_failures = 0,
            JobEnd::Infra(why) => self.infra_failure(task.as_str(), why),
            _ => {}
        }
    }

    /// Counts an infrastructure failure; past `--max-infra-failures` in a row the runner takes
    /// no more work and says so.
    fn infra_failure(&mut self, task: &str, why: &str) {
        self.infra_failures += 1;
        let first = why.lines().next().unwrap_or_default();
        tracing::error!(
            task,
            in_a_row = self.infra_failures,
            "infrastructure failure, lease given back uncharged: {first}"
        );
        let max = self.ctx.config.agent.max_infra_failures;
        if self.infra_failures >= max && self.unhealthy.is_none() {
            tracing::error!(
                "unhealthy after {} infrastructure failures in a row: taking no more work until \
                 restarted (last: {first})",
                self.infra_failures
            );
            self.unhealthy = Some(format!(
                "{} infrastructure failures in a row; last: {first}",
                self.infra_failures
            ));
        }
    }

    /// Frees a finished job's slot; returns its lease, why, and whether it was an
    /// infrastructure failure, when it must be given back.
    fn free_slot(&mut self, lease_id: &str, end: JobEnd) -> Option<(LeaseRef, String, bool)> {
        let job = self.jobs.remove(lease_id)?;
        self.free.insert(job.slot);
        let reason = match (&end, job.release) {
            (JobEnd::Infra(why), _) => Some((why.clone(), true)),
            (JobEnd::Cancelled, true) => Some((
                if self.stop.is_cancelled() {
                    "the runner was stopped".to_owned()
                } else {
                    "the runner drained and its grace period ran out".to_owned()
                },
                false,
            )),
            _ => None,
        };
        reason.map(|(r, infra)| (job.lease, r, infra))
    }

    /// The server refused this runner for good: stop all work, and say why.
    async fn refused(&mut self, status: &tonic::Status) -> anyhow::Error {
        self.abandon_all().await;
        anyhow::anyhow!(
            "the server at {} refused this runner: {}",
            self.url,
            status.message()
        )
    }

    /// Stops every job and waits (a bounded time) for them to end, without giving anything
    /// back: the server no longer takes this runner's word. Agents' process groups are stopped.
    async fn abandon_all(&mut self) {
        self.stop_jobs(false);
        let deadline = Instant::now() + self.ctx.config.agent.kill_grace() + Duration::from_secs(5);
        while !self.jobs.is_empty() {
            match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                Ok(Some((lease, end))) => {
                    self.free_slot(&lease, end);
                }
                _ => break,
            }
        }
    }

    /// Stops every job; with `release`, their leases (and queued ones) are given back.
    fn stop_jobs(&mut self, release: bool) {
        for job in self.jobs.values_mut() {
            job.release |= release;
            job.cancel.cancel();
        }
        for a in std::mem::take(&mut self.queued) {
            if release {
                self.spawn_release(
                    a.lease,
                    "the runner stopped before starting it".to_owned(),
                    false,
                );
            }
        }
    }

    /// Handles what can happen whether or not the runner is connected. Returns true when the
    /// runner must exit now.
    async fn on_stop_or_drain(&mut self) -> bool {
        if self.stop.is_cancelled() {
            tracing::warn!(jobs = self.jobs.len(), "stopping now; giving leases back");
            self.stop_jobs(true);
            let deadline =
                Instant::now() + self.ctx.config.agent.kill_grace() + Duration::from_secs(5);
            while !self.jobs.is_empty() {
                match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                    Ok(Some((lease, end))) => self.finish(&lease, end).await,
                    _ => break,
                }
            }
            return true;
        }
        if self.drain.is_cancelled() && !self.draining {
            self.draining = true;
            self.drain_deadline = Some(Instant::now() + self.drain_timeout);
            tracing::info!(jobs = self.jobs.len(), "draining: taking no more work");
        }
        false
    }

    /// Waits `pause` while jobs keep running; true if the runner must exit. The jobs keep
    /// their leases while the server cannot be reached: a server that restarts keeps every
    /// lease for one TTL from its start, and one that is up but unreachable names the leases it
    /// gave away when the runner reconnects.
    async fn wait(&mut self, pause: Duration) -> bool {
        let until = Instant::now() + pause;
        loop {
            let out_of_touch = (!self.jobs.is_empty() && !self.said_out_of_touch)
                .then_some(self.last_renewed + self.ttl);
            tokio::select! {
                () = tokio::time::sleep_until(until) => return self.finished(),
                Some((lease, end)) = self.done_rx.recv() => {
                    self.finish(&lease, end).await;
                    if self.finished() { return true; }
                }
                () = self.stop.cancelled() => return self.on_stop_or_drain().await,
                () = self.drain.cancelled(), if !self.draining => {
                    self.on_stop_or_drain().await;
                    if self.finished() { return true; }
                }
                () = sleep_until(self.drain_deadline), if self.draining => {
                    self.drain_deadline = None;
                    self.stop_jobs(true);
                }
                () = sleep_until(out_of_touch) => {
                    self.said_out_of_touch = true;
                    tracing::warn!(
                        jobs = self.jobs.len(),
                        "no contact with the server for {} s (the lease TTL); keeping the work \
                         until it answers",
                        self.ttl.as_secs()
                    );
                }
            }
        }
    }

    fn renewed_now(&mut self) {
        self.last_renewed = Instant::now();
        self.said_out_of_touch = false;
    }

    /// How long to wait before reconnecting: the back-off, but never so long that the leases
    /// held would lapse meanwhile (a restarted server keeps them for one TTL from its start, so
    /// a runner that is quick to come back keeps its work).
    fn reconnect_pause(&self, backoff: &mut Backoff) -> Duration {
        let pause = backoff.next();
        if self.jobs.is_empty() {
            return pause;
        }
        let left = (self.last_renewed + self.ttl).saturating_duration_since(Instant::now());
        pause.min((left / 4).max(Duration::from_millis(250)))
    }

    /// An assignment the edge refused: its lease goes back as the runner's failure (not the
    /// task's), counted towards the runner's health like any job's.
    fn refuse(&mut self, lease: Option<LeaseRef>, why: &str) {
        let Some(lease) = lease else {
            tracing::warn!("ignoring an assignment naming no valid lease: {why}");
            return;
        };
        self.infra_failure(&lease.id, why);
        self.spawn_release(lease, why.to_owned(), true);
    }

    /// No renewal for a whole TTL: the server has given the work away, so stop it.
    fn watchdog(&mut self) {
        tracing::warn!(
            jobs = self.jobs.len(),
            "could not renew leases for a whole TTL; dropping the work"
        );
        self.stop_jobs(false);
        self.last_renewed = Instant::now();
    }

    /// Opens the heartbeat stream; `Ok(None)` when the server only takes single calls.
    async fn open_heartbeats(&mut self) -> Result<Option<Heartbeats>, Disconnect> {
        match self.client.open_heartbeats().await {
            Ok(beats) => Ok(Some(beats)),
            // A server older than the heartbeat stream: a capability, not a refusal.
            Err(status) if status.code() == Code::Unimplemented => {
                tracing::info!("the server takes heartbeats one call at a time");
                Ok(None)
            }
            Err(status) => Err(self.heartbeat_refused(&status)),
        }
    }

    /// Sends a heartbeat: a message on the stream (its reply comes to [`Session::renewed`]), or
    /// a call when the server has no stream.
    async fn beat(&mut self, beats: &Option<Heartbeats>) -> Option<Disconnect> {
        match (beats, &self.runner_id) {
            // A full queue means the server is not reading: the watchdog deals with that.
            (Some(b), Some(id)) => {
                b.send(id, &self.standing());
                None
            }
            (Some(_), None) => None,
            (None, _) => self.send_heartbeat().await,
        }
    }

    /// The server answered a heartbeat, naming the leases to drop.
    fn renewed(&mut self, dropped: Vec<LeaseRef>) {
        self.renewed_now();
        for lease in &dropped {
            self.drop_lease(lease, "the server dropped the lease");
        }
    }

    /// What a refused heartbeat means for the connection.
    fn heartbeat_refused(&self, status: &tonic::Status) -> Disconnect {
        let d = heartbeat_disconnect(status);
        match d {
            Disconnect::Revoked => {
                tracing::error!(error = %status.message(), "the server no longer accepts this runner's credential");
            }
            Disconnect::Lost => {
                tracing::warn!(error = %status.message(), "the heartbeat stream broke");
            }
            Disconnect::Unregistered | Disconnect::Exit => {}
        }
        d
    }

    /// One heartbeat as a call of its own (servers without the heartbeat stream).
    async fn send_heartbeat(&mut self) -> Option<Disconnect> {
        let id = self.runner_id.clone()?;
        let sent = tokio::time::timeout(
            self.heartbeat.max(Duration::from_secs(1)),
            self.client.heartbeat(&id, &self.standing()),
        )
        .await;
        match sent {
            Ok(Ok(dropped)) => {
                self.renewed(dropped);
                None
            }
            // One lost heartbeat is no lost connection: the watchdog deals with a server that
            // keeps not answering.
            Ok(Err(status)) if matches!(heartbeat_disconnect(&status), Disconnect::Lost) => {
                tracing::warn!(error = %status.message(), "heartbeat failed");
                None
            }
            Ok(Err(status)) => Some(self.heartbeat_refused(&status)),
            Err(_) => {
                tracing::warn!("heartbeat timed out");
                None
            }
        }
    }

    async fn connected(&mut self, mut stream: WorkStream) -> Disconnect {
        let mut beats = match self.open_heartbeats().await {
            Ok(beats) => beats,
            Err(d) => return d,
        };
        let mut ticker = tokio::time::interval(self.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            if self.finished() {
                return Disconnect::Exit;
            }
            let watchdog = (!self.jobs.is_empty()).then_some(self.last_renewed + self.ttl);
            tokio::select! {
                msg = stream.next() => match msg {
                    Ok(Some(Pushed::Assignment(a))) => {
                        if self.draining {
                            self.spawn_release(a.lease, "the runner is draining".to_owned(), false);
                        } else {
                            self.start(*a);
                        }
                    }
                    Ok(Some(Pushed::Cancel(lease))) => {
                        self.drop_lease(&lease, "the task was cancelled or its lease ended");
                    }
                    Ok(Some(Pushed::Refused { lease, why })) => self.refuse(lease, &why),
                    Ok(Some(Pushed::Ignored)) => {}
                    Ok(None) | Err(_) => return Disconnect::Lost,
                },
                _ = ticker.tick() => {
                    if let Some(d) = self.beat(&beats).await {
                        return d;
                    }
                }
                reply = next_reply(&mut beats) => match reply {
                    Ok(Some(reply)) => self.renewed(reply),
                    Ok(None) => return Disconnect::Lost,
                    Err(status) => return self.heartbeat_refused(&status),
                },
                Some((lease, end)) = self.done_rx.recv() => {
                    let was_healthy = self.unhealthy.is_none();
                    self.account(&lease, &end);
                    // Tell the server before the lease goes back, so it assigns nothing more.
                    if was_healthy
                        && self.unhealthy.is_some()
                        && let Some(d) = self.beat(&beats).await
                    {
                        self.finish(&lease, end).await;
                        return d;
                    }
                    self.finish(&lease, end).await;
                }
                () = self.stop.cancelled() => {
                    self.on_stop_or_drain().await;
                    return Disconnect::Exit;
                }
                () = self.drain.cancelled(), if !self.draining => {
                    self.on_stop_or_drain().await;
                    // Tell the server at once, so it assigns nothing more.
                    if let Some(d) = self.beat(&beats).await {
                        return d;
                    }
                }
                () = sleep_until(self.drain_deadline), if self.draining => {
                    self.drain_deadline = None;
                    self.stop_jobs(true);
                }
                () = sleep_until(watchdog) => self.watchdog(),
            }
        }
    }
}

/// The runner's own credential in its work dir (mode 0600).
struct SavedCredential(std::path::PathBuf);

impl SavedCredential {
    fn load(&self) -> Option<String> {
        std::fs::read_to_string(&self.0)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    }

    fn store(&self, credential: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.0.with_extension("new");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{credential}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.0)
    }

    fn forget(&self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether a refused registration or work stream is final (the runner stops): `classify`'s
/// Refused and Fatal, but for what the runner has always retried: `AlreadyExists` (its name is
/// held by a runner still connected, such as its own earlier connection, which goes away) and
/// codes the server does not send for these calls (`OutOfRange`, `Unimplemented`, `DataLoss`).
fn gives_up(status: &Status) -> bool {
    match classify(status) {
        Disposition::Refused | Disposition::Fatal => !matches!(
            status.code(),
            Code::AlreadyExists | Code::OutOfRange | Code::Unimplemented | Code::DataLoss
        ),
        Disposition::Retry | Disposition::Unregistered => false,
    }
}

/// What a refused heartbeat means for the connection. Of `classify`'s Fatal readings only a
/// refused credential cuts the runner off; the others (such as a credential acting for another
/// runner) are taken as a broken connection, and reconnecting says whether the server still
/// takes the runner.
fn heartbeat_disconnect(status: &Status) -> Disconnect {
    match classify(status) {
        Disposition::Unregistered => Disconnect::Unregistered,
        Disposition::Fatal if status.code() == Code::Unauthenticated => Disconnect::Revoked,
        Disposition::Fatal | Disposition::Refused | Disposition::Retry => Disconnect::Lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_status() -> impl Iterator<Item = Status> {
        (0..=16).map(|c| Status::new(Code::from(c), "x"))
    }

    #[test]
    fn registration_gives_up_on_the_codes_it_always_did() {
        for status in every_status() {
            let before = matches!(
                status.code(),
                Code::FailedPrecondition
                    | Code::InvalidArgument
                    | Code::PermissionDenied
                    | Code::Unauthenticated
            );
            assert_eq!(gives_up(&status), before, "{:?}", status.code());
        }
    }

    #[test]
    fn a_heartbeat_disconnects_as_it_always_did() {
        for status in every_status() {
            let got = match heartbeat_disconnect(&status) {
                Disconnect::Unregistered => "unregistered",
                Disconnect::Revoked => "revoked",
                Disconnect::Lost => "lost",
                Disconnect::Exit => "exit",
            };
            let before = match status.code() {
                Code::NotFound => "unregistered",
                Code::Unauthenticated => "revoked",
                _ => "lost",
            };
            assert_eq!(got, before, "{:?}", status.code());
        }
    }
}
