//! The server's wiring: check the repository, lock the state dir, open the store, recover what a
//! crash left behind, start the background loops under supervision, serve gRPC until the
//! shutdown token fires, then drain.
//!
//! Supervision: the dispatch loop, the integrator and the log writer (and the log pruner) run
//! as named tasks, each in its span, in one `JoinSet`. If one ends or panics while the server
//! runs, the server logs which and stops with an error (exit non-zero), so that systemd or the
//! operator restarts it (recovery is crash-safe): it never keeps answering while doing nothing.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use pipeline_core::clock::SystemClock;
use pipeline_core::git::{BranchName, RemoteName};
use pipeline_core::lock::{FileLock, LockError};
use tracing::Instrument;

use crate::build::LocalBuilder;
use crate::config::Config;
use crate::coordinator::{Coordinator, Settings};
use crate::error::{Error, Result};
use crate::grpc::listener::{Incoming, Limits};
use crate::integrate::Integrator;
use crate::lifecycle::Policy;
use crate::ports::Repository;
use crate::repo::Repo;
use crate::store::Store;
use crate::store::any::Database;

/// How long in-flight requests may take to finish after a shutdown signal.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Runs the server until `shutdown` is cancelled.
/// How the server came to stop, when it stopped without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It was asked to (a signal), or `--dry-run` printed its plan.
    Asked,
    /// `--exit-when-idle`: no task could make progress; `needs_help` tasks need a person.
    Idle { needs_help: u64 },
}

/// Runs the server until `shutdown` is cancelled (or, with `--exit-when-idle`, until no task
/// can make progress).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Stopped> {
    config.validate().map_err(Error::InvalidArgument)?;
    let config = config
        .with_absolute_paths()
        .map_err(Error::InvalidArgument)?;
    if config.local_runners > 0 && !config.dry_run {
        check_local_runners(&config).map_err(Error::FailedPrecondition)?;
    }
    let prompt = load_prompt_template(config.prompt_template.as_deref())?;
    // Webhooks: the URLs, the secret and the events, refused with their reason before
    // anything is created (read again by each leader's phase).
    webhook_plan(&config).map_err(Error::InvalidArgument)?;
    let repo = Repo::open(&config.repo).await?;
    let base = BranchName::parse(&config.base)
        .map_err(|e| Error::InvalidArgument(format!("--base: {e}")))?;
    let base_commit = repo.tip(&base).await.map_err(|e| match e {
        Error::NotFound(m) => Error::FailedPrecondition(m),
        other => other,
    })?;
    if !repo.is_bare().await? {
        let checked_out = repo.worktrees_on(&base).await?;
        if let Some(path) = checked_out.first() {
            return Err(Error::FailedPrecondition(format!(
                "the base branch {base} is checked out in {path}, and the server moves it without \
                 touching those files; use a bare clone (git clone --bare {repo} REPO.git) or \
                 check out another branch there (git -C {path} checkout --detach)",
                path = path.display(),
                repo = config.repo.display(),
            )));
        }
    }
    let push_remote = match &config.push_remote {
        Some(remote) => {
            let remote = RemoteName::parse(remote)
                .map_err(|e| Error::InvalidArgument(format!("--push-remote {e}")))?;
            if !repo.has_remote(&remote).await {
                return Err(Error::InvalidArgument(format!(
                    "--push-remote {}: the repository has no such remote (git remote add)",
                    remote.as_str()
                )));
            }
            Some(remote)
        }
        None => None,
    };
    let state_dir = match &config.state_dir {
        Some(dir) => dir.clone(),
        None => repo.common_dir().await?.join("pipeline"),
    };
    let db_url = config
        .db
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", state_dir.join("pipeline.db").display()));
    let database = Database::parse(&db_url)?;
    // Builds (and local runners' agents) reach nothing of the state dir, the database or the
    // TLS key; refused here, before anything is written, when no sandbox can be had.
    let mut deny = vec![state_dir.clone()];
    deny.extend(config.tls_key.clone());
    if let Some(dir) = database.file().and_then(|db| db.parent()) {
        deny.push(dir.to_path_buf());
    }
    let sandbox = if config.dry_run {
        pipeline_core::sandbox::Sandbox::off()
    } else {
        config
            .sandbox
            .sandbox(&deny)
            .map_err(Error::FailedPrecondition)?
    };
    // The listen address is taken before anything is created on disk: a port in use is a
    // refusal that leaves nothing behind (a dry run listens on nothing).
    let listener = if config.dry_run {
        None
    } else {
        Some(listen(config.listen).await?)
    };
    std::fs::create_dir_all(&state_dir).map_err(|e| {
        Error::Internal(format!(
            "cannot create the state directory {}: {e}",
            state_dir.display()
        ))
    })?;
    // Only this process's user enters the state dir; a sandbox user passes through it to the
    // integration worktree and the local runners' slots, and reaches nothing else of it (see
    // `seal_state_dir`).
    let state_mode = if sandbox.user().is_some() {
        0o711
    } else {
        0o700
    };
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(state_mode)).map_err(
        |e| {
            Error::Internal(format!(
                "cannot set the mode of the state directory {}: {e}",
                state_dir.display()
            ))
        },
    )?;
    if config.dry_run {
        let store = database.open().await?;
        let plan = dry_run(&store, &config).await;
        store.close().await;
        plan?;
        return Ok(Stopped::Asked);
    }
    // One server per state dir and per database: a second one would expire the first one's
    // leases and land its tasks twice.
    const OWN_STATE: &str = "stop it first, or give this server its own --state-dir (and --db)";
    let mut locks = vec![StateLock::take(
        &state_dir.join("server.lock"),
        "state dir",
        &state_dir,
        OWN_STATE,
    )?];
    if let Some(db) = database.file() {
        let lock = db.with_file_name(format!(
            "{}.lock",
            db.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("pipeline.db")
        ));
        locks.push(StateLock::take(&lock, "database", db, OWN_STATE)?);
    }
    // And one server per repository, whatever its state dir: two would take each other's
    // landings for their own.
    let git_dir = repo.common_dir().await?;
    locks.push(StateLock::take(
        &git_dir.join(crate::repo::owner::LOCK_FILE),
        "repository",
        &config.repo,
        "stop it first: one server works on a repository",
    )?);
    // What a crash of this server left running (builds, local runners' agents) stops first.
    let processes = state_dir.join("processes");
    match pipeline_core::process::record_in(&processes) {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            processes = n,
            "stopped what an earlier run of this server left running"
        ),
        Err(e) => {
            return Err(Error::Internal(format!(
                "cannot record processes in {}: {e}",
                processes.display()
            )));
        }
    }
    match sandbox.kind() {
        pipeline_core::sandbox::Kind::Landlock | pipeline_core::sandbox::Kind::User => {
            tracing::info!(sandbox = %sandbox.kind(), "builds and agents are {}", sandbox.describe())
        }
        pipeline_core::sandbox::Kind::Off => {
            tracing::warn!(sandbox = %sandbox.kind(), "builds and agents run unconfined (--no-sandbox): they can read the server's tokens and database")
        }
    }
    if let Some(warning) = verification_off_warning(&config) {
        tracing::warn!("{warning}");
    }
    let store = database.open().await?;
    // Several servers on one PostgreSQL database (issue 28): one leads, the others serve the
    // read calls as standbys. Winning the lease, a server goes on exactly as a restarted one
    // (recovery, then the loops), after following the remote the leader pushed to; losing it,
    // it stops every writing loop and serves as a standby again. Alone with its SQLite
    // database, a server leads for good.
    let Some(listener) = listener else {
        return Err(Error::Internal("no listening socket".to_owned()));
    };
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("cannot read the listening address: {e}")))?;
    let advertise = config.advertise.as_deref().map_or_else(
        || format!("http://{addr}"),
        pipeline_proto::servers::normalize,
    );
    let elector_stop = CancellationToken::new();
    let (leadership, elector) = match &store {
        crate::store::any::AnyStore::Postgres(pg) => {
            // This machine and state dir, whose lock this process holds: a lease left live by
            // the process before it here (killed) is its own, not another server's.
            let place = format!("{} {}", machine_id(), state_dir.display());
            match crate::leader::end_own_lease(pg.pool(), &place).await {
                Ok(true) => tracing::info!(
                    "ended the leader lease this server's previous run left (it was killed)"
                ),
                Ok(false) => {}
                Err(e) => {
                    store.close().await;
                    return Err(Error::Internal(e.to_string()));
                }
            }
            if let Err(why) = crate::leader::check_joining(pg.pool(), push_remote.is_some()).await {
                store.close().await;
                return Err(Error::FailedPrecondition(why));
            }
            if let Some(warning) = lease_ttl_warning(config.lease_ttl, config.leader_ttl) {
                tracing::warn!("{warning}");
            }
            // The elector's own two connections: on the store's pool a renewal could wait
            // for a connection behind a burst of writes until the deadline passed.
            let elector_pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect_with((*pg.pool().connect_options()).clone())
                .await
                .map_err(|e| {
                    Error::FailedPrecondition(format!("--db: the leader lease's connection: {e}"))
                })?;
            let (elector, leadership) = crate::leader::Elector::placed(
                elector_pool,
                crate::leader::Settings {
                    ttl: Duration::from_secs(config.leader_ttl),
                    advertise: advertise.clone(),
                },
                &place,
            );
            pg.set_leadership(leadership.clone());
            // One round first: a server alone (the lease free or expired) leads before it
            // serves anything, as a restarted one does; one that finds a live leader serves
            // as a standby.
            elector.step().await;
            let elector = tokio::spawn(elector.run(elector_stop.clone()));
            (leadership, Some(elector))
        }
        crate::store::any::AnyStore::Sqlite(_) => (crate::leader::Leadership::sole(), None),
    };
    // `--http`: bound once, served by every phase.
    let http = match config.http {
        Some(http_addr) => Some(Arc::new(TcpListener::bind(http_addr).await.map_err(
            |e| Error::InvalidArgument(format!("--http: cannot listen on {http_addr}: {e}")),
        )?)),
        None => None,
    };
    for lock in &mut locks {
        lock.note_address(addr);
    }
    let _admin_note = crate::admin_note::publish(addr, &state_dir);
    let ground = Ground {
        prompt: Arc::new(prompt),
        elected: elector.is_some(),
        config,
        state_dir,
        deny,
        repo,
        base,
        base_commit,
        git_dir,
        db_url,
        store,
        leadership,
        sandbox,
        push_remote,
        listener: Arc::new(listener),
        addr,
        http,
        advertise,
        said_listening: std::sync::atomic::AtomicBool::new(false),
    };
    let ended = loop {
        match stand_by(&ground, &shutdown).await {
            Ok(true) => {}
            Ok(false) => break Ok(Stopped::Asked),
            Err(e) => break Err(e),
        }
        match lead(&ground, &shutdown).await {
            Ok(Led::Stopped(stopped)) => break Ok(stopped),
            // Its lease lost (a deadline passed unrenewed, or the fence refused a write):
            // it wrote nothing more and stopped its loops; it serves as a standby again.
            Ok(Led::Lost) => {
                tracing::warn!(
                    "this server lost the leader lease (another server leads now): a standby"
                );
            }
            // Its recovery refused because the lead was lost meanwhile: a standby again.
            Err(e)
                if matches!(
                    ground.leadership.role(),
                    crate::leader::Role::Standby { .. }
                ) && !shutdown.is_cancelled() =>
            {
                tracing::warn!(error = %e, "this server lost the leader lease while taking over");
            }
            Err(e) => {
                shutdown.cancel();
                break Err(e);
            }
        }
    };
    // Nothing writes any more: a leader gives its lease up, for a standby not to wait out
    // the TTL.
    elector_stop.cancel();
    if let Some(elector) = elector {
        let _ = elector.await;
    }
    // Nothing uses the database any more.
    ground.store.close().await;
    drop(locks);
    if ended.is_ok() {
        tracing::info!("stopped");
    }
    ended
}

/// Why `--lease-ttl` is too short for `--leader-ttl`, if it is. A runner's lease must outlive
/// a takeover from a frozen leader: the runner gives the frozen server up only after its
/// keepalive fails ([`pipeline_runner::wire::GIVES_UP_AFTER`], 20 s), and the standby takes
/// over within `--leader-ttl`; a shorter lease ends first and its work runs again. A killed
/// leader is found at once (its port refuses), and recovery gives every lease one more TTL.
pub fn lease_ttl_warning(lease_ttl: u64, leader_ttl: u64) -> Option<String> {
    let least = leader_ttl.saturating_add(pipeline_runner::wire::GIVES_UP_AFTER.as_secs());
    (lease_ttl < least).then(|| {
        format!(
            "--lease-ttl {lease_ttl}s is shorter than --leader-ttl {leader_ttl}s plus the 20s a \
             runner takes to give a frozen leader up: a takeover from a frozen leader would \
             cost the running agents their leases (their work runs again); give --lease-ttl \
             at least {least}s"
        )
    })
}

/// Whether runners are asked for early offers: with `--early-builds`, and only when the
/// server verifies (with `--no-verify` trains never build, so an offer would travel and be
/// checked for nothing).
fn takes_offers(config: &Config) -> bool {
    config.early_builds && config.verify.verifier() != pipeline_core::verify::Verifier::Off
}

/// What `--no-verify` turns off of the flags given with it (`--early-builds`,
/// `--remote-builds`: trains never build), if any: said once at start-up, in one line.
pub fn verification_off_warning(config: &Config) -> Option<String> {
    if config.verify.verifier() != pipeline_core::verify::Verifier::Off {
        return None;
    }
    let idle: Vec<&str> = [
        (config.early_builds, "--early-builds"),
        (config.remote_builds, "--remote-builds"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    (!idle.is_empty()).then(|| {
        format!(
            "{} does nothing with --no-verify: trains land without a build, so nothing is built \
             early or on runners (runners are not asked for offers)",
            idle.join(" and ")
        )
    })
}

/// What every phase of a server's life shares. On PostgreSQL (issue 28) one process may serve
/// as a standby, lead, lose the lead and serve as a standby again, on one listening socket (a
/// connection made between two phases waits in its backlog).
struct Ground {
    config: Config,
    state_dir: std::path::PathBuf,
    deny: Vec<std::path::PathBuf>,
    repo: Repo,
    base: BranchName,
    base_commit: pipeline_core::ids::CommitId,
    git_dir: std::path::PathBuf,
    db_url: String,
    store: crate::store::any::AnyStore,
    leadership: crate::leader::Leadership,
    /// Whether an elector steers the leadership (PostgreSQL), not a sole leader.
    elected: bool,
    sandbox: pipeline_core::sandbox::Sandbox,
    prompt: Arc<crate::prompt::PromptTemplate>,
    push_remote: Option<RemoteName>,
    listener: Arc<TcpListener>,
    addr: std::net::SocketAddr,
    http: Option<Arc<TcpListener>>,
    advertise: String,
    /// Whether the `listening on` line was logged (once: tests and scripts read it).
    said_listening: std::sync::atomic::AtomicBool,
}

impl Ground {
    fn settings(&self) -> Settings {
        let config = &self.config;
        let policy = Policy {
            max_retries: config.max_retries,
            max_task_cost_cents: config.max_task_cost as f64,
            backoff_base_secs: config.backoff_base,
            max_lost_leases: config.max_lost_leases,
            max_epic_cost_cents: config.max_epic_cost as f64,
            require_approval: config.require_approval,
        };
        Settings {
            policy,
            base: self.base.clone(),
            spool_dir: self.state_dir.join("spool"),
            lease_ttl_ms: i64::try_from(config.lease_ttl.saturating_mul(1000)).unwrap_or(i64::MAX),
            max_bundle_bytes: config.max_bundle_bytes,
            verifier: config.verify.verifier(),
            kill_grace: config.agent.kill_grace(),
            integration_dir: self.state_dir.join("integration"),
            push_remote: self.push_remote.clone(),
            log_cap_bytes: config.log_cap_bytes.max(1024),
            build_env: config.agent.child_env(),
            sandbox: self.sandbox.clone(),
            build_tmp: self.state_dir.join("build-tmp"),
            dispatch_batch: config.dispatch_batch as usize,
            batch_max: config.batch_max as usize,
            prompt: Arc::clone(&self.prompt),
            verify_on_server: config.verify_on_server,
            early_builds: takes_offers(config),
        }
    }

    /// Logs the `listening on` line the first time a phase serves (everything a client needs
    /// is in place by then).
    fn say_listening(&self) {
        if !self
            .said_listening
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            // Tests and scripts wait for this line to learn the port.
            tracing::info!("listening on {}", self.addr);
        }
    }
}

/// How a leader's phase ended.
enum Led {
    /// The server stops.
    Stopped(Stopped),
    /// It lost the lead: it serves as a standby next.
    Lost,
}

/// How often a standby publishes what the leader recorded in the change feed since it last
/// looked (`watch`, `feed` on a standby trail the leader by at most this much). A standby's
/// housekeeping, never on the leader's work path.
const STANDBY_FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// While this server is a standby: serves the read calls (from the database: each answer is
/// read when asked, the feed followed every [`STANDBY_FOLLOW_INTERVAL`]) and refuses runner
/// calls and writes naming the leader, until it leads (true) or is asked to stop (false).
/// Writes nothing to the database. Returns at once when it leads already.
async fn stand_by(g: &Ground, shutdown: &CancellationToken) -> Result<bool> {
    let mut role = g.leadership.watch();
    if matches!(
        *role.borrow_and_update(),
        crate::leader::Role::Leader { .. }
    ) {
        return Ok(true);
    }
    let auth = crate::auth::Auth::open_as(
        &g.store,
        &g.state_dir,
        g.config.max_registrations_per_minute,
        false,
        g.elected,
    )
    .await?;
    say_credentials(&auth);
    let coordinator = Arc::new(Coordinator::new(
        g.store.clone(),
        g.settings(),
        g.repo.clone(),
        auth,
        Arc::new(SystemClock),
    ));
    coordinator.set_leadership(g.leadership.clone(), g.advertise.clone());
    coordinator
        .logs()
        .set_history_start(g.store.last_event_id().await?);
    let work = shutdown.child_token();
    let serving = CancellationToken::new();
    let liveness = Arc::new(crate::health::Loops::default());
    let mut loops = Supervisor::new(Arc::clone(&liveness));
    if let crate::store::any::AnyStore::Postgres(pg) = &g.store {
        loops.spawn("feed follower", follow_feed(pg.clone(), work.clone()));
    }
    let (mut served, streams_ended) =
        serve(g, &coordinator, &liveness, &mut loops, &work, &serving)?;
    let mut said = None;
    let mut failed = None;
    let leads = loop {
        if let crate::leader::Role::Standby { leader_url } = role.borrow_and_update().clone() {
            if said.as_ref() != Some(&leader_url) {
                tracing::info!(
                    leader = leader_url.as_deref().unwrap_or("not known yet"),
                    "a standby: another server leads this database; this one serves the read \
                     calls and takes over when its lease ends"
                );
                said = Some(leader_url);
            }
        } else {
            break true;
        }
        tokio::select! {
            // The signal first: the loops end with it, and that is no failure.
            biased;
            () = shutdown.cancelled() => break false,
            changed = role.changed() => if changed.is_err() { break false },
            ended = loops.next_end() => {
                if !shutdown.is_cancelled() {
                    failed = Some(ended);
                }
                break false;
            }
            result = &mut served => {
                failed = Some(served_failure(result).unwrap_or_else(|| "the grpc server stopped".to_owned()));
                break false;
            }
        }
    };
    work.cancel();
    serving.cancel();
    if failed.is_none() {
        drain(&mut served).await;
    }
    if tokio::time::timeout(DRAIN_DEADLINE, streams_ended.wait())
        .await
        .is_err()
    {
        tracing::warn!("watch streams still running after {DRAIN_DEADLINE:?}");
    }
    loops.wait_all().await;
    if let Some(ended) = failed {
        tracing::error!("{ended}; stopping the server");
        return Err(Error::Internal(ended));
    }
    Ok(leads)
}

/// A standby's feed: what the leader records is published here too (read from the database).
async fn follow_feed(store: crate::store::postgres::PgStore, stop: CancellationToken) {
    loop {
        store.follow_feed().await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(STANDBY_FOLLOW_INTERVAL) => {}
        }
    }
}

/// Waits (a bounded time) for the gRPC server to end after `serving` was cancelled.
async fn drain(
    served: &mut tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
) -> Option<String> {
    match tokio::time::timeout(DRAIN_DEADLINE, &mut *served).await {
        Ok(result) => served_failure(result),
        Err(_) => {
            tracing::warn!("requests still running after {DRAIN_DEADLINE:?}; stopping them");
            served.abort();
            let _ = (&mut *served).await;
            None
        }
    }
}

/// Serves the gRPC services (and `--http`'s page and API) for `coordinator` on the ground's
/// sockets until `serving` is cancelled; `work` ends the watch streams and the loops started
/// here (the health, the web figures). Returns the gRPC server's task and the end of its
/// streams.
fn serve(
    g: &Ground,
    coordinator: &Arc<Coordinator<crate::store::any::AnyStore, Repo>>,
    liveness: &Arc<crate::health::Loops>,
    loops: &mut Supervisor,
    work: &CancellationToken,
    serving: &CancellationToken,
) -> Result<(
    tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    crate::grpc::StreamsEnded,
)> {
    let config = &g.config;
    let services = crate::grpc::services(
        Arc::clone(coordinator),
        work.clone(),
        serving.clone(),
        Duration::from_secs(config.fetch_base_timeout),
    );
    let streams_ended = services.streams_ended;
    // Windows large enough that a batch of log lines or a bundle chunk is not held up by
    // HTTP/2 flow control (the 64 KiB default costs round trips on every large message).
    let handshake_timeout = Duration::from_secs(config.handshake_timeout);
    // Quiet connections are pinged; one whose peer does not answer in time is closed.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(config.keepalive_interval)))
        .http2_keepalive_timeout(Some(Duration::from_secs(config.keepalive_timeout)));
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| Error::InvalidArgument(format!("cannot read {}: {e}", p.display())))
        };
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(identity)
            .timeout(handshake_timeout);
        builder = builder
            .tls_config(tls)
            .map_err(|e| Error::InvalidArgument(format!("invalid TLS certificate or key: {e}")))?;
        if !g.said_listening.load(std::sync::atomic::Ordering::Acquire) {
            tracing::info!(cert = %cert.display(), "serving TLS");
        }
    }
    let incoming = Incoming::new(
        Arc::clone(&g.listener),
        Limits {
            max_connections: config.max_connections as usize,
            handshake_timeout,
        },
    );
    // gRPC health and reflection: no token (grpcurl lists the services; an orchestrator
    // asks the health), while the API's calls keep needing theirs.
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pipeline_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error =
        |e: tonic_reflection::server::Error| Error::Internal(format!("grpc reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;
    loops.spawn(
        "health",
        follow_health(
            Arc::clone(coordinator),
            Arc::clone(liveness),
            health,
            work.clone(),
        ),
    );
    let serve = builder
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .add_service(services.control)
        .add_service(services.runner)
        .add_service(crate::grpc::edge::Edge::new(health_service))
        .add_service(crate::grpc::edge::Edge::new(reflection_v1))
        .add_service(crate::grpc::edge::Edge::new(reflection_v1alpha))
        .serve_with_incoming_shutdown(incoming, serving.clone().cancelled_owned());
    let served = tokio::spawn(serve);
    // Before the HTTP lines: a reader of the log takes the first `listening on` for the gRPC
    // address.
    let first = !g.said_listening.load(std::sync::atomic::Ordering::Acquire);
    g.say_listening();
    // The web page and the HTTP API, on their own port, served until `serving` ends.
    if let Some(http) = &g.http {
        let http_addr = http
            .local_addr()
            .map_err(|e| Error::Internal(format!("cannot read the http address: {e}")))?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(crate::http::tls_config(cert, key)?),
            _ => None,
        };
        let web = Arc::new(crate::http::Web {
            coordinator: Arc::clone(coordinator),
            tls: tls.is_some(),
            streams: Arc::new(tokio::sync::Semaphore::new(
                config.http_max_streams as usize,
            )),
            max_streams: config.http_max_streams as usize,
            rolling: crate::http::charts::Rolling::default(),
            shutdown: work.clone(),
            loops: Arc::clone(liveness),
            metrics_public: config.metrics_public,
        });
        if first {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let host = if http_addr.ip().is_unspecified() {
                std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), http_addr.port())
            } else {
                http_addr
            };
            tracing::info!("http listening on {http_addr}");
            tracing::info!(
                viewer_token = %coordinator.auth().viewer_file.display(),
                admin_token = %coordinator.auth().admin_file.display(),
                "the web page: open {scheme}://{host}/ and sign in with the viewer or the admin token"
            );
        }
        loops.spawn(
            "web figures",
            crate::http::charts::follow(Arc::clone(coordinator), Arc::clone(&web), work.clone()),
        );
        let router = crate::http::router(web);
        let limits = crate::http::Limits {
            max_connections: config.max_connections as usize,
            handshake_timeout,
        };
        tokio::spawn(
            crate::http::serve(Arc::clone(http), router, tls, limits, serving.clone())
                .instrument(tracing::info_span!("http")),
        );
    }
    Ok((served, streams_ended))
}

/// While this server leads: recovers as a restarted server does, runs every writing loop and
/// serves, until it is asked to stop, a loop it cannot do without ends (an error), or it loses
/// the lead ([`Led::Lost`]: its loops stopped, it serves as a standby next).
async fn lead(g: &Ground, shutdown: &CancellationToken) -> Result<Led> {
    let config = &g.config;
    let store = &g.store;
    let state_dir = &g.state_dir;
    let base = &g.base;
    // Bundles an earlier phase (or a crash) left in the spool: their runners send them again.
    let cleaned = crate::grpc::runner::clean_spool(&state_dir.join("spool"));
    if cleaned > 0 {
        tracing::info!(files = cleaned, "removed bundles a crash left in the spool");
    }
    claim_repository(store, &g.git_dir, config, &g.db_url).await?;
    let mut auth = crate::auth::Auth::open_as(
        store,
        state_dir,
        config.max_registrations_per_minute,
        true,
        g.elected,
    )
    .await?;
    if let Some(user) = g.sandbox.user() {
        seal_state_dir(state_dir).map_err(Error::Internal)?;
        user.can_reach(&state_dir.join("integration"))
            .map_err(Error::FailedPrecondition)?;
    }
    auth.max_registrations_per_address = config.max_registrations_per_address;
    auth.max_registrations_per_name = config.max_registrations_per_name;
    auth.free_unconnected_after_ms =
        i64::try_from(config.free_unconnected_names_after.saturating_mul(1000)).unwrap_or(i64::MAX);
    say_credentials(&auth);
    let registration_token = std::fs::read_to_string(&auth.registration_file)
        .map_err(|e| Error::Internal(format!("cannot read the registration token: {e}")))?
        .trim()
        .to_owned();
    let recorded = serde_json::to_string(config)
        .map_err(|e| Error::Internal(format!("cannot record the settings: {e}")))?;
    store.put_meta("settings", &recorded).await?;
    let settings = g.settings();
    let lease_ttl_ms = settings.lease_ttl_ms;
    // The middle layer's adapters: the repository, and the integration build on this machine.
    // Trains built at once each need a build slot for their builds to overlap.
    let build_slots = config.build_slots.max(config.integration_slots) as usize;
    let builder = LocalBuilder::new(g.repo.clone(), &settings, build_slots);
    let coordinator = Arc::new(Coordinator::new(
        store.clone(),
        settings,
        g.repo.clone(),
        auth,
        Arc::new(SystemClock),
    ));
    // A registration that never opens its work stream is forgotten after two lease TTLs.
    coordinator.forget_unopened_after(lease_ttl_ms.saturating_mul(2));
    // Before recovery writes any history: a watch whose position the history does not hold
    // goes on from here.
    coordinator
        .logs()
        .set_history_start(store.last_event_id().await?);
    // Webhooks' cursors, before recovery writes anything: a new endpoint is sent what happens
    // from here on. Only the leader sends them, and forgets the cursors of endpoints no longer
    // configured.
    let webhooks = match webhook_plan(config).map_err(Error::InvalidArgument)? {
        Some((urls, settings)) => {
            let (opened, board) =
                crate::webhooks::open(store, &urls, pipeline_core::clock::now_ms()).await?;
            coordinator.set_webhooks(Arc::clone(&board));
            Some((opened, board, settings))
        }
        None => {
            crate::webhooks::forget_unconfigured(store, &[]).await?;
            None
        }
    };
    coordinator.load_counts().await?;
    coordinator.load_landing().await?;
    coordinator.load_held_runners().await?;
    coordinator
        .guard_task_ids(config.accept_existing_history)
        .await?;
    // A new leader's base follows the remote the previous one pushed to, before recovery
    // reads it (after the history guard, which a fetch's refs would confuse).
    if let (true, Some(remote)) = (g.elected, &coordinator.settings().push_remote) {
        follow_remote(coordinator.repo(), remote, base).await?;
    }
    let (leases_restored, tasks_reopened) = coordinator.recover().await?;
    let builder = crate::remote_build::ServerBuilder::new(
        builder,
        config.remote_builds.then(|| crate::remote_build::Remote {
            coordinator: Arc::clone(&coordinator),
            requires: config.build_requires.clone(),
            wait: Duration::from_secs(config.remote_build_wait),
        }),
    );
    let integrator = Integrator::new(Arc::clone(&coordinator), builder)
        .gathering(std::time::Duration::from_millis(config.gather_window))
        .speculating(config.integration_slots as usize)
        .building_early(config.early_builds);
    let integrations_finished = integrator.recover().await?;
    let found_landed = coordinator.reconcile_landed().await?;
    let epics_settled = coordinator.settle_finished_epics().await?;

    coordinator.set_leadership(g.leadership.clone(), g.advertise.clone());
    tracing::info!(
        repo = %config.repo.display(),
        base = %config.base,
        base_commit = %g.base_commit,
        state_dir = %state_dir.display(),
        leases_restored,
        tasks_reopened,
        integrations_finished,
        found_landed,
        epics_settled,
        "pipeline-server ready"
    );

    // The signal (or the lead lost) stops the work (no more leases or landings); serving (the
    // gRPC server, its streams) ends only after the local runners have stopped, so they can
    // still give their leases back and ship their last lines; the log writer stops only once
    // nothing is served (so a line in flight is stored), and the database closes last.
    // Every loop here writes: only the leader runs them.
    let work = shutdown.child_token();
    let serving = CancellationToken::new();
    let writer_stop = CancellationToken::new();
    let liveness = Arc::new(crate::health::Loops::default());
    let mut loops = Supervisor::new(Arc::clone(&liveness));
    loops.spawn(
        "dispatch",
        Arc::clone(&coordinator).dispatch_loop(work.clone()),
    );
    loops.spawn("integrator", integrator.run(work.clone()));
    loops.spawn(
        "log writer",
        crate::logs::writer(
            Arc::clone(coordinator.logs()),
            store.clone(),
            writer_stop.clone(),
        ),
    );
    if let Some((opened, board, settings)) = webhooks {
        let settings = Arc::new(crate::webhooks::Settings {
            render: task_json(coordinator.policy().clone()),
            render_runner: runner_json(Arc::clone(&coordinator)),
            ..settings
        });
        for (index, endpoint) in opened.into_iter().enumerate() {
            loops.spawn(
                "webhook",
                crate::webhooks::run(
                    store.clone(),
                    Arc::clone(&board),
                    index,
                    endpoint,
                    Arc::clone(&settings),
                    work.clone(),
                ),
            );
        }
    }
    // With several servers (issue 28) the leader keeps accepted results on the push remote
    // until they land; this deletes the refs of those that did.
    if let (true, Some(remote)) = (g.elected, &coordinator.settings().push_remote) {
        loops.spawn(
            "task refs sweeper",
            crate::task_refs::run(
                store.clone(),
                coordinator.repo().clone(),
                remote.clone(),
                work.clone(),
            ),
        );
    }
    if config.log_retention_days > 0 {
        loops.spawn(
            "log pruner",
            prune_logs(store.clone(), config.log_retention_days, work.clone()),
        );
    }
    let (mut served, streams_ended) =
        serve(g, &coordinator, &liveness, &mut loops, &work, &serving)?;
    let runners_stop = CancellationToken::new();
    let local_runners = start_local_runners(
        config,
        state_dir,
        &g.deny,
        g.addr,
        &registration_token,
        &runners_stop,
    );
    let mut idle = None;
    let mut served_done = false;
    let mut lost = false;
    let mut failed = tokio::select! {
        // A loop ends on its own once the shutdown token fires: that is no failure.
        biased;
        () = shutdown.cancelled() => None,
        needs_help = until_idle(&coordinator), if config.exit_when_idle => {
            tracing::info!(needs_help, "no task can make progress; stopping (--exit-when-idle)");
            idle = Some(needs_help);
            None
        }
        result = &mut served => {
            // The server stopped serving without being asked to: the rest stops in order.
            served_done = true;
            served_failure(result)
        }
        // Its lease lost (a deadline passed unrenewed, or the fence refused a write): it
        // writes nothing more (the store refuses); its loops stop and it serves as a standby.
        () = lose_lead(&g.leadership) => {
            lost = true;
            None
        }
        ended = loops.next_end() => (!shutdown.is_cancelled()).then_some(ended),
    };
    if let Some(ended) = &failed {
        // A loop the server cannot do without is gone: stop, and say so; a restart recovers.
        tracing::error!("{ended}; stopping the server");
    }
    if lost {
        tracing::warn!("this server no longer leads: stopping its work to serve as a standby");
    } else {
        shutdown.cancel();
        tracing::info!("shutting down");
    }
    work.cancel();
    // The order matters: each step stops what the next one would otherwise leave in use.
    // Local runners stop first, giving their leases back while the server still listens.
    runners_stop.cancel();
    for runner in local_runners {
        let _ = tokio::time::timeout(DRAIN_DEADLINE, runner).await;
    }
    // Then serving: requests under way finish (a bounded time: then they are dropped).
    serving.cancel();
    if !served_done {
        failed = failed.or(drain(&mut served).await);
    }
    // The streams' producers end with their streams, which ended with serving.
    if tokio::time::timeout(DRAIN_DEADLINE, streams_ended.wait())
        .await
        .is_err()
    {
        tracing::warn!("log and watch streams still running after {DRAIN_DEADLINE:?}");
    }
    // Then the loops: the log writer stores what is queued; the others stopped with the signal.
    writer_stop.cancel();
    loops.wait_all().await;
    if let Some(ended) = failed {
        return Err(Error::Internal(ended));
    }
    if lost {
        return Ok(Led::Lost);
    }
    Ok(Led::Stopped(match idle {
        Some(needs_help) => Stopped::Idle { needs_help },
        None => Stopped::Asked,
    }))
}

/// This machine, as the leader lease's holder names it: its systemd machine ID, else its host
/// name.
fn machine_id() -> String {
    ["/etc/machine-id", "/proc/sys/kernel/hostname"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown-machine".to_owned())
}

/// Returns once this server, which led, no longer does (never for a sole leader).
async fn lose_lead(leadership: &crate::leader::Leadership) {
    let mut role = leadership.watch();
    loop {
        if matches!(
            *role.borrow_and_update(),
            crate::leader::Role::Standby { .. }
        ) {
            return;
        }
        if role.changed().await.is_err() {
            // A fixed role: it never changes.
            std::future::pending::<()>().await;
        }
    }
}

/// A new leader's local base follows the remote the previous leader pushed to (fast-forward
/// only; the integrator does the same before each integration).
async fn follow_remote(repo: &Repo, remote: &RemoteName, base: &BranchName) -> Result<()> {
    // The commits of results the previous leader accepted and had not landed: it kept them
    // on the remote before acknowledging them.
    repo.fetch_task_patches(remote).await?;
    let theirs = repo.fetch_branch(remote, base).await?;
    let local = repo.tip(base).await?;
    if theirs != local && repo.is_ancestor(&local, &theirs).await? {
        let name = pipeline_core::git::RefName::branch(base);
        if !repo.compare_and_swap(&name, &theirs, &local).await? {
            return Err(Error::Conflict(format!(
                "{base} moved while following {}",
                remote.as_str()
            )));
        }
        tracing::info!(%theirs, "the base follows {}", remote.as_str());
    }
    Ok(())
}

/// How often the gRPC health service's answer is checked again (a loop that stops says so at
/// once; the database's state is found at the next check).
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps the gRPC health service's answer (the empty service name and each pipeline service)
/// at what `/readyz` says: SERVING while ready, NOT_SERVING otherwise and once stopping.
async fn follow_health<S: Store, R: Repository>(
    coordinator: Arc<Coordinator<S, R>>,
    loops: Arc<crate::health::Loops>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    use tonic_health::ServingStatus;
    let set = |status: ServingStatus| {
        let reporter = reporter.clone();
        async move {
            for name in std::iter::once("").chain(pipeline_proto::v1::SERVICE_NAMES) {
                reporter.set_service_status(name, status).await;
            }
        }
    };
    let mut last = None;
    loop {
        let changed = loops.changed();
        let ready = coordinator.readiness(&loops).await;
        let status = if ready.is_ok() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            match &ready {
                Ok(()) => tracing::info!("ready (gRPC health: SERVING)"),
                Err(why) => tracing::warn!("{why} (gRPC health: NOT_SERVING)"),
            }
            set(status).await;
            last = Some(status);
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = changed => {}
            () = tokio::time::sleep(HEALTH_CHECK_INTERVAL) => {}
        }
    }
    set(ServingStatus::NotServing).await;
}

/// What the end of the gRPC server says about how it went: `None` if it stopped cleanly.
fn served_failure(
    result: std::result::Result<
        std::result::Result<(), tonic::transport::Error>,
        tokio::task::JoinError,
    >,
) -> Option<String> {
    match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("grpc server: {e}")),
        Err(e) => Some(format!("grpc server task: {e}")),
    }
}

/// Binds the listen address, saying what to do when it is taken.
async fn listen(addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (is another pipeline-server, or something else, listening there? stop it or \
             choose another --listen)"
        } else {
            ""
        };
        Error::InvalidArgument(format!("cannot listen on {addr}: {e}{hint}"))
    })
}

/// Waits until no task can make progress (checked at start, after every entry of the change
/// feed, and after the task counts in memory move: the feed is published as the store
/// commits, a moment before memory follows); returns how many need help.
async fn until_idle<S: Store, R: Repository>(coordinator: &Coordinator<S, R>) -> u64 {
    let mut feed = coordinator.store().feed().subscribe();
    let mut counts = coordinator.counts_moved();
    loop {
        counts.borrow_and_update();
        match coordinator.is_idle().await {
            Ok(true) => return coordinator.needing_help(),
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot tell whether the queue is idle: {e}"),
        }
        // Whatever came (an entry, news that some were missed, the counts), look again.
        tokio::select! {
            entry = feed.recv() => {
                if let Err(tokio::sync::broadcast::error::RecvError::Closed) = entry {
                    std::future::pending::<()>().await;
                }
            }
            _ = counts.changed() => {}
        }
    }
}

/// `--dry-run`: what the server would lease and land now, printed on stdout; nothing changes.
async fn dry_run<S: Store>(store: &S, config: &Config) -> Result<()> {
    use std::io::Write;
    let now = pipeline_core::clock::now_ms();
    let leasable = store.lease_candidates(now, None, 50).await?;
    let verified = store.verified().await?;
    let mut out = std::io::stdout().lock();
    let w = |out: &mut std::io::StdoutLock<'_>, line: String| {
        writeln!(out, "{line}").map_err(|e| Error::Internal(format!("stdout: {e}")))
    };
    w(
        &mut out,
        "dry run: nothing is leased, landed or written".to_owned(),
    )?;
    if leasable.is_empty() {
        w(
            &mut out,
            "would lease: nothing (no open task is ready)".to_owned(),
        )?;
    } else {
        w(
            &mut out,
            "would lease, in this order, to runners as their slots free up:".to_owned(),
        )?;
        for (i, t) in leasable.iter().enumerate() {
            w(
                &mut out,
                format!(
                    "  {:>3}. {}  P{}  {}",
                    i + 1,
                    t.id,
                    t.priority,
                    one_line(&t.title)
                ),
            )?;
        }
    }
    // Held ones (a runner's failure the server has not settled, an approval not given) do not
    // land next.
    let policy = Policy {
        require_approval: config.require_approval,
        ..Policy::default()
    };
    let train: Vec<String> = verified
        .iter()
        .filter(|t| !t.state.base_check && !policy.awaits_approval(&t.state))
        .take(config.batch_max as usize)
        .map(|t| t.id.to_string())
        .collect();
    if train.is_empty() {
        w(
            &mut out,
            "would land: nothing (no task is verified)".to_owned(),
        )?;
    } else {
        w(
            &mut out,
            format!(
                "would land next, in one train (dependencies permitting): {}",
                train.join(", ")
            ),
        )?;
    }
    Ok(())
}

/// A title on one line, for the dry run's list.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where the tokens are (never what: they stay in their files), and, in a group of servers
/// whose tokens are another's, that this server's files work against it alone: a runner given
/// this server's registration token would be refused by the leader.
fn say_credentials(auth: &crate::auth::Auth) {
    tracing::info!(
        admin_token = %auth.admin_file.display(),
        runner_registration_token = %auth.registration_file.display(),
        "credentials (files readable by their owner only)"
    );
    if auth.has_tokens_of_its_own() {
        tracing::info!(
            "this server's token files work against this server only: the group's tokens \
             (for runners and pipelinectl against any server of the group) are the first \
             server's of this database, in its state dir"
        );
    }
}

/// The background loops, each a named task in its span, in one `JoinSet`, each holding its
/// liveness in `loops` while it runs (for `/readyz` and gRPC health).
struct Supervisor {
    tasks: tokio::task::JoinSet<()>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
    loops: Arc<crate::health::Loops>,
}

impl Supervisor {
    fn new(loops: Arc<crate::health::Loops>) -> Self {
        Self {
            tasks: tokio::task::JoinSet::new(),
            names: std::collections::HashMap::new(),
            loops,
        }
    }

    fn spawn(
        &mut self,
        name: &'static str,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let span = tracing::info_span!("loop", name);
        let alive = self.loops.enter(name);
        let handle = self.tasks.spawn(
            async move {
                let _alive = alive;
                work.await;
            }
            .instrument(span),
        );
        self.names.insert(handle.id(), name);
    }

    /// Waits for the first loop to end, and says which ended and how.
    async fn next_end(&mut self) -> String {
        match self.tasks.join_next_with_id().await {
            Some(Ok((id, ()))) => format!(
                "the {} loop stopped unexpectedly",
                self.names.get(&id).copied().unwrap_or("unknown")
            ),
            Some(Err(e)) => {
                let name = self.names.get(&e.id()).copied().unwrap_or("unknown");
                if e.is_panic() {
                    format!("the {name} loop panicked")
                } else {
                    format!("the {name} loop was cancelled")
                }
            }
            None => std::future::pending().await,
        }
    }

    /// Waits for every loop to end (after the shutdown token fired).
    async fn wait_all(&mut self) {
        while let Some(ended) = self.tasks.join_next_with_id().await {
            if let Err(e) = ended
                && e.is_panic()
            {
                let name = self.names.get(&e.id()).copied().unwrap_or("unknown");
                tracing::error!("the {name} loop panicked while stopping");
            }
        }
    }
}

/// Makes sure the repository is this database's (see [`crate::repo::owner`]): claims one no
/// database has claimed (or, with `--accept-existing-history`, one another database owns), and
/// refuses one that belongs to another database. The database's ID is written before the
/// repository's record, so a crash in between only leaves a claim to finish.
async fn claim_repository<S: Store>(
    store: &S,
    git_dir: &std::path::Path,
    config: &Config,
    db_url: &str,
) -> Result<()> {
    use crate::repo::owner::{self, DATABASE_ID, Decision, Owner};
    let current = owner::read(git_dir)?;
    let mine = store.get_meta(DATABASE_ID).await?;
    let fresh = crate::auth::new_token("db_")?;
    match owner::decide(
        mine.as_deref(),
        current.as_ref(),
        config.accept_existing_history,
        || fresh,
    ) {
        Decision::Owned => Ok(()),
        Decision::Refuse { owner } => Err(owner::refusal(
            &config.repo,
            &owner,
            store.is_fresh().await?,
        )),
        Decision::Claim { id, new } => {
            if new {
                store.put_meta(DATABASE_ID, &id).await?;
            }
            if let Some(other) = current.filter(|c| c.id != id) {
                tracing::warn!(
                    previous = %other.id,
                    db = %other.db,
                    "this database takes the repository over from another (--accept-existing-history)"
                );
            }
            owner::write(
                git_dir,
                &Owner {
                    id,
                    db: redacted_url(db_url),
                },
            )
        }
    }
}

/// A database URL as it may be written down: without a password.
fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// One server per state dir, per database and per repository: an exclusive lock on a file
/// beside what it guards ([`FileLock`]), held for the server's life, naming its PID and, once
/// it listens, its address.
struct StateLock(FileLock);

impl StateLock {
    fn take(
        path: &std::path::Path,
        what: &str,
        guarded: &std::path::Path,
        advice: &str,
    ) -> Result<Self> {
        match FileLock::take(path) {
            Ok(lock) => Ok(Self(lock)),
            Err(LockError::Held(holder)) => {
                let holder = if holder.is_empty() {
                    "another pipeline-server".to_owned()
                } else {
                    format!("another pipeline-server ({holder})")
                };
                Err(Error::FailedPrecondition(format!(
                    "{holder} is using the {what} {}; {advice}",
                    guarded.display()
                )))
            }
            Err(e @ LockError::Io { .. }) => Err(Error::Internal(e.to_string())),
        }
    }

    /// Adds the listening address to the lock file.
    fn note_address(&mut self, addr: std::net::SocketAddr) {
        self.0.note(&format!("address {addr}"));
    }
}

/// Refuses local runners this machine cannot run: their agent's program, git, and the
/// programs of the server's verification, which the server sends them. Without one of them
/// they would give back every task they took and the server would serve with no runner, so
/// the server does not start (before it creates anything).
/// Under a separate sandbox user: takes every permission of others off the state dir's
/// entries (the database and its journals, the tokens, the spool, the TLS files…) but the
/// directories that user works in (`integration`, `build-tmp`, `runners`, whose own trees
/// are handed to it run by run).
fn seal_state_dir(state_dir: &std::path::Path) -> std::result::Result<(), String> {
    let entries = std::fs::read_dir(state_dir).map_err(|e| {
        format!(
            "cannot read the state directory {}: {e}",
            state_dir.display()
        )
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // The build slots' own (`integration-2`, `build-tmp-2`, …) too.
        let slot = |first: &str| {
            name.strip_prefix(first)
                .and_then(|n| n.strip_prefix('-'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        if ["integration", "build-tmp", "runners"].contains(&name.as_ref())
            || slot("integration")
            || slot("build-tmp")
        {
            continue;
        }
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode & !0o077))
                .map_err(|e| format!("cannot set the mode of {}: {e}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn check_local_runners(config: &Config) -> std::result::Result<(), String> {
    use pipeline_runner::preflight;
    let path = std::env::var("PATH").unwrap_or_default();
    let cwd =
        std::env::current_dir().map_err(|e| format!("cannot read the current directory: {e}"))?;
    let mut agent = config.agent.clone();
    preflight::resolve_agent_cmd(&mut agent, &cwd)
        .and_then(|_| preflight::check_agent(&agent, &path))
        .map_err(|e| format!("--local-runners cannot run their agent: {e}"))?;
    preflight::check_verifier(&config.verify.verifier(), &path).map_err(|missing| {
        format!(
            "--local-runners cannot verify: {missing}; install it, or verify with \
             --build-cmd/--test-cmd, or pass --no-verify"
        )
    })
}

/// Starts `--local-runners` runners in this process, speaking the runner protocol to the server
/// over loopback, each with one slot and its own work dir under the state dir.
fn start_local_runners(
    config: &Config,
    state_dir: &std::path::Path,
    deny: &[std::path::PathBuf],
    addr: std::net::SocketAddr,
    registration_token: &str,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let host = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    (1..=config.local_runners)
        .map(|i| {
            let name = format!("local-{i}");
            let scheme = if config.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            let runner = pipeline_runner::config::Config {
                server: format!("{scheme}://{host}"),
                tls_ca: config.tls_ca.clone(),
                name: Some(name.clone()),
                token: Some(registration_token.to_owned()),
                slots: 1,
                work_dir: Some(state_dir.join("runners").join(&name)),
                labels: vec!["local".to_owned()],
                only_parent: vec![],
                only_task: None,
                once: false,
                drain_timeout: 0,
                token_file: None,
                agent: config.agent.clone(),
                verify: config.verify.clone(),
                sandbox: pipeline_runner::config::SandboxArgs {
                    deny: deny.to_vec(),
                    ..config.sandbox.clone()
                },
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                // A local runner stops with the server: it gives its leases back at once.
                if let Err(err) = pipeline_runner::run(runner, stop.clone(), stop).await {
                    tracing::error!(runner = %name, "local runner failed: {err:#}");
                }
            })
        })
        .collect()
}

/// Deletes the logs of runs older than the retention, now and then once an hour (a
/// housekeeping timer, not a poll of anything on the work path).
async fn prune_logs<S: Store>(store: S, days: u64, shutdown: CancellationToken) {
    let keep_ms = i64::try_from(days.saturating_mul(24 * 3600 * 1000)).unwrap_or(i64::MAX);
    loop {
        let before = pipeline_core::clock::now_ms().saturating_sub(keep_ms);
        match store.prune_logs(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(lines = n, days, "pruned old run logs"),
            Err(e) => tracing::error!(error = %e, "pruning old run logs failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// `--webhook`'s endpoints and what their workers are given (the task's JSON shape is set once
/// the coordinator is made), or why the flags are refused; `None` without `--webhook`.
fn webhook_plan(
    config: &Config,
) -> std::result::Result<Option<(Vec<reqwest::Url>, crate::webhooks::Settings)>, String> {
    if config.webhooks.is_empty() {
        return Ok(None);
    }
    let urls = config
        .webhooks
        .iter()
        .map(|raw| crate::webhooks::parse_url(raw))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let Some(secret_file) = &config.webhook_secret_file else {
        return Err("--webhook needs --webhook-secret-file FILE (whsec_<base64 key>)".to_owned());
    };
    let secret = crate::webhooks::Secret::read(secret_file)?;
    let kinds = crate::webhooks::Kinds::parse(&config.webhook_events)?;
    let timeout = Duration::from_millis(
        config
            .webhook_timeout_ms
            .unwrap_or(config.webhook_timeout.saturating_mul(1000)),
    );
    crate::webhooks::check(&urls, timeout)?;
    let settings = crate::webhooks::Settings {
        secret,
        kinds,
        backoff_base: Duration::from_millis(config.webhook_backoff_ms.max(1)),
        timeout,
        render: Arc::new(|_| serde_json::Value::Null),
        render_runner: Arc::new(|_| None),
    };
    Ok(Some((urls, settings)))
}

/// A task as the JSON API shows it (domain → prost → view → JSON, as `/api/tasks` does).
fn task_json(policy: Policy) -> crate::webhooks::Render {
    Arc::new(move |task| {
        pipeline_api::json::task(&pipeline_api::model::Task::from(
            crate::grpc::convert::task_to_pb(&policy, task),
        ))
    })
}

/// A runner, by name, as the JSON API's runners view shows it (`/api/runners`,
/// `runners --json`: [`crate::http::api::runner_view`]).
fn runner_json<S: Store, R: Repository>(
    coordinator: Arc<Coordinator<S, R>>,
) -> crate::webhooks::RenderRunner {
    Arc::new(move |name| {
        coordinator
            .runners()
            .iter()
            .find(|r| r.name == name)
            .map(|r| pipeline_api::json::runner(&crate::http::api::runner_view(r)))
    })
}

/// The dev prompt's template: the built-in one, or `--prompt-template FILE`, checked now (one
/// that does not parse or names an unknown variable is refused with its line and column).
fn load_prompt_template(path: Option<&std::path::Path>) -> Result<crate::prompt::PromptTemplate> {
    let Some(path) = path else {
        return Ok(crate::prompt::PromptTemplate::default());
    };
    let source = std::fs::read_to_string(path).map_err(|e| {
        Error::InvalidArgument(format!(
            "cannot read --prompt-template {}: {e}",
            path.display()
        ))
    })?;
    crate::prompt::PromptTemplate::parse(source).map_err(|e| {
        Error::InvalidArgument(format!(
            "--prompt-template {}:{}:{}: {}",
            path.display(),
            e.line,
            e.column,
            e.message
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::lease_ttl_warning;

    #[test]
    fn a_lease_ttl_shorter_than_a_takeover_from_a_frozen_leader_is_warned_about() {
        // The defaults (30 s, 10 s) are long enough.
        assert_eq!(lease_ttl_warning(30, 10), None);
        assert_eq!(lease_ttl_warning(60, 2), None);
        let warning = lease_ttl_warning(10, 2).expect("too short");
        assert!(warning.contains("at least 22s"), "{warning}");
        assert!(!warning.contains('\n'), "one line: {warning}");
        assert!(!warning.contains("  "), "words one space apart: {warning}");
        assert!(lease_ttl_warning(29, 10).is_some());
    }
}
