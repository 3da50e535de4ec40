//! The runner's life: register, hold the work stream open (the server pushes assignments and
//! cancellations on it), heartbeat every interval the server set (as messages on one
//! heartbeat stream, or single calls to a server without it), run each assignment as a job in
//! a free slot, and survive the server going away.
//!
//! One event loop runs it, connected or not; what differs between the two is which of its arms
//! are live:
//!
//! - Connected: the work stream, the heartbeat ticker and replies, and the watchdog: a runner
//!   that could not renew its leases for a whole TTL stops its jobs itself (the server has
//!   given them away by then).
//! - Disconnected: the time of the next attempt and, once a TTL has passed, a note that the
//!   server is out of touch. The jobs keep their leases meanwhile: a server that restarts keeps
//!   every lease for one TTL from its start, and one that is up but unreachable names, when the
//!   runner reconnects, the leases it gave away, which are stopped. Attempts back off
//!   ([`Backoff`]), but never so long that the held leases would lapse.
//! - Either: jobs ending, drain (first SIGTERM/SIGINT: take no more work, let jobs finish for up
//!   to `--drain-timeout`, give back what is left, exit) and stop (second signal: stop jobs
//!   now, give their leases back, exit).
//! - `--once`: the first assignment drains the runner (the server is told at once, so it sends
//!   nothing more, and without a deadline: the job has its own limits); the runner exits when
//!   that lease is over, and [`Finished::exit_code`] says how it went.
//!
//! Before the loop: the start-up checks (`preflight`) and the work dir's lock (one runner per
//! work dir). Until the runner has registered once, a registration that fails for a reason
//! waiting cannot heal (a URL, a certificate or TLS it cannot use, read by
//! `pipeline_proto::reach`; a refused credential; a name that stays taken) stops it with one
//! line; after, any failure but a refused credential is taken for a server restarting.
//!
//! `slots` keeps the books (slots, leases, the queue, health), without IO; `credential` is
//! what the runner presents. Leases go back through one path, `Session::release`, in the
//! background, with the runner's health; the releases still under way are waited for (a
//! bounded time) when the runner exits.

mod credential;
mod slots;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pipeline_core::clock::now_ms;
use pipeline_core::ids::{LeaseRef, RunnerId};
use pipeline_core::lock::{FileLock, LockError};
use pipeline_core::sandbox::Kind;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::credential::Credential;
use self::slots::{Busy, InfraFailure, Offer, PauseCause, Release, Slots};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::domain::{Assignment, CallError, CurrentRunner, Fatal, JobEnd, Outcome, Refusal};
use crate::git::Mirror;
use crate::job::{self, JobContext};
use crate::wire::{Client, Heartbeats, Hello, Pushed, Standing, WorkStream};

/// How long one release call may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a runner's life ended, when it ended well.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finished {
    /// Drained or stopped by signals.
    Stopped,
    /// `--once`: what came of the one lease.
    Once(OnceOutcome),
}

/// What came of a `--once` runner's one lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnceOutcome {
    /// No lease came before the runner was stopped.
    NoTask,
    /// The work passed verification and the server took it.
    Verified,
    /// The task's own failure (its agent, its verification), taken by the server and charged.
    TaskFailed,
    /// The server took no result: the lease went back uncharged (an infrastructure failure, a
    /// rate limit, a stop) or the server no longer wanted it (cancelled, lost), saying why.
    NoResult(String),
}

impl OnceOutcome {
    /// What a job's end means for a `--once` runner.
    pub fn of(end: &JobEnd) -> Self {
        match end {
            JobEnd::Delivered(Outcome::Verified) => Self::Verified,
            JobEnd::Delivered(Outcome::DevFailed | Outcome::VerifyFailed) => Self::TaskFailed,
            JobEnd::Refused(why) | JobEnd::Infra(why) | JobEnd::Unusable(why) => {
                Self::NoResult(why.clone())
            }
            JobEnd::RateLimited { reason, .. } | JobEnd::DiskFull { reason, .. } => {
                Self::NoResult(reason.clone())
            }
            JobEnd::Cancelled => Self::NoResult("stopped before it finished".to_owned()),
        }
    }
}

impl Finished {
    /// The process's exit status (README: `--once`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Stopped | Self::Once(OnceOutcome::NoTask | OnceOutcome::Verified) => 0,
            Self::Once(OnceOutcome::TaskFailed) => 3,
            Self::Once(OnceOutcome::NoResult(_)) => 4,
        }
    }
}

/// Runs the runner until it has drained or been stopped, or (`--once`) has finished its one
/// task.
pub async fn run(
    config: Config,
    drain: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<Finished> {
    let mut config = config;
    if config.once {
        config.slots = 1;
    }
    config.agent.validate().map_err(anyhow::Error::msg)?;
    // First, before any process is started: a token handed over in a pipe
    // (`Config::shed_token_env`) is emptied out of it here.
    let token = config.token().map_err(anyhow::Error::msg)?;
    let name = config.name();
    let work_dir = config.work_dir();
    let path = std::env::var("PATH").unwrap_or_default();
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    if let Some(written) = crate::preflight::resolve_agent_cmd(&mut config.agent, &cwd)? {
        tracing::info!(
            "--agent-cmd {written:?} runs as {:?} (its program resolved in {})",
            config.agent.agent_cmd.as_deref().unwrap_or_default(),
            cwd.display()
        );
    }
    crate::preflight::check_agent(&config.agent, &path)?;
    crate::preflight::check_work_dir(&work_dir)?;
    // Held until the runner exits: one runner per work dir.
    let _work_dir_lock = lock_work_dir(&work_dir)?;
    let prices = crate::agent::Prices::load(config.agent.price_table.as_deref())
        .map_err(anyhow::Error::msg)?;
    // Agents and builds reach nothing of the work dir but their own slot, nor the token.
    let mut deny = vec![work_dir.clone()];
    deny.extend(config.credential_files());
    let sandbox = config.sandbox.sandbox(&deny).map_err(anyhow::Error::msg)?;
    match sandbox.kind() {
        Kind::Landlock | Kind::User => {
            tracing::info!(sandbox = %sandbox.kind(), "agents and builds are {}", sandbox.describe())
        }
        Kind::Off => {
            tracing::warn!(sandbox = %sandbox.kind(), "agents and builds run unconfined (--no-sandbox): they can read this runner's credential and the other worktrees")
        }
    }
    if let Some(user) = sandbox.user() {
        use std::os::unix::fs::PermissionsExt;
        // The sandbox user passes through the work dir to its slots (each run's own trees are
        // handed to it), and lists and reads nothing else of it: the credential is 0600.
        std::fs::set_permissions(&work_dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("cannot set the mode of {}", work_dir.display()))?;
        user.can_reach(&work_dir).map_err(anyhow::Error::msg)?;
        for file in config.credential_files() {
            let mode = std::fs::metadata(&file)
                .with_context(|| format!("cannot read the token file {}", file.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                anyhow::bail!(
                    "the token file {} is readable by other users (mode {:o}): chmod 600 it, \
                     or the sandbox user {} can read it",
                    file.display(),
                    mode & 0o777,
                    user.name
                );
            }
        }
    }
    // What a crash of this runner left running (agents, builds) is stopped before new work.
    match pipeline_core::process::record_in(&work_dir.join("processes")) {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            processes = n,
            "stopped what an earlier run of this runner left running"
        ),
        Err(e) => anyhow::bail!(
            "cannot record processes in {}: {e}",
            work_dir.join("processes").display()
        ),
    }
    if let Some(version) = crate::preflight::agent_version(&config.agent, &path).await {
        tracing::info!("agent: {version}");
    }
    let mirror = Mirror::open(&work_dir)
        .await
        .with_context(|| format!("cannot open the mirror in {}", work_dir.display()))?;
    let credential = Credential::load(&work_dir, token)?;
    let client = Client::connect_lazy(
        &config.server,
        config.tls_ca.as_deref(),
        credential.bearer(),
    )?;
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let mut session = Session {
        credential,
        hello: Hello {
            name,
            labels: config.labels.clone(),
            slots: config.slots,
            only_parents: config.only_parent.clone(),
            only_task: config.only_task.clone(),
            sandbox: sandbox.kind(),
        },
        runner_id: None,
        registered_once: false,
        name_taken: 0,
        contact: Contact {
            heartbeat: Duration::from_secs(10),
            ttl: Duration::from_secs(30),
            last_renewed: Instant::now(),
            said_out_of_touch: false,
        },
        slots: Slots::new(config.slots, config.agent.max_infra_failures),
        done_tx,
        done_rx,
        drain,
        stop,
        drain_timeout: Duration::from_secs(config.drain_timeout),
        drain_deadline: None,
        once: config.once.then(OnceState::default),
        builds: Builds::default(),
        releases: JoinSet::new(),
        ctx: Arc::new(JobContext {
            config,
            mirror,
            work_dir,
            client: client.clone(),
            runner: CurrentRunner::default(),
            prices: Arc::new(prices),
            sandbox,
            early_offers: std::sync::atomic::AtomicBool::new(false),
        }),
        client,
    };
    let lived = session.life().await;
    session.finish_releases().await;
    lived?;
    Ok(match session.once {
        None => Finished::Stopped,
        Some(once) => Finished::Once(once.outcome()),
    })
}

/// One runner per work dir (two would share a mirror, worktrees and a credential): an
/// exclusive lock on `runner.lock` in it, held for the process's life, naming its PID.
fn lock_work_dir(dir: &std::path::Path) -> anyhow::Result<FileLock> {
    match FileLock::take(&dir.join("runner.lock")) {
        Ok(lock) => Ok(lock),
        Err(LockError::Held(holder)) => anyhow::bail!(
            "another pipeline-runner ({holder}) is using the work dir {}; stop it first, or give \
             this runner its own --work-dir (and --name)",
            dir.display()
        ),
        Err(e) => Err(e.into()),
    }
}

/// How many times in a row a runner that never registered tries a name the server says is
/// already connected before it gives up: enough for the server to see this runner's own
/// earlier connection close (it was just killed and restarted), too few to wait on another
/// live runner.
const NAME_TAKEN_TRIES: u32 = 5;

struct Session {
    client: Client,
    credential: Credential,
    hello: Hello,
    /// What every job shares (the runner ID it presents is published there).
    ctx: Arc<JobContext>,
    /// This registration's ID: `None` until registered, and again once the server forgot the
    /// runner.
    runner_id: Option<RunnerId>,
    /// Whether the runner has registered since it started. Until it has, a mistake (a URL, a
    /// certificate, a name it cannot use) stops it at once; after, any failure but a refused
    /// credential is taken for a server that restarts.
    registered_once: bool,
    /// Registrations in a row the server refused because a runner of this name is connected.
    name_taken: u32,
    contact: Contact,
    slots: Slots<CancellationToken>,
    /// Jobs report their ends here: (lease ID, how it ended).
    done_tx: mpsc::UnboundedSender<(String, JobEnd)>,
    done_rx: mpsc::UnboundedReceiver<(String, JobEnd)>,
    drain: CancellationToken,
    stop: CancellationToken,
    drain_timeout: Duration,
    /// While draining: when the jobs still running are stopped and given back.
    drain_deadline: Option<Instant>,
    /// Releases under way.
    releases: JoinSet<()>,
    /// With `--once`: the one lease taken, and what came of it.
    once: Option<OnceState>,
    /// The build jobs running (`--remote-builds` on the server), by ID: each one's fence,
    /// build worktree and stop. A job removes itself when it ends.
    builds: Builds,
}

/// The build jobs running, shared with the jobs themselves.
type Builds =
    Arc<std::sync::Mutex<std::collections::HashMap<String, (LeaseRef, usize, CancellationToken)>>>;

/// A `--once` runner's one lease: whether it came, and what came of it once known.
#[derive(Debug, Default)]
struct OnceState {
    took: bool,
    outcome: Option<OnceOutcome>,
}

impl OnceState {
    /// Records what came of the lease, the first time.
    fn ended(&mut self, outcome: OnceOutcome) {
        self.outcome.get_or_insert(outcome);
    }

    fn outcome(self) -> OnceOutcome {
        match (self.took, self.outcome) {
            (_, Some(outcome)) => outcome,
            (true, None) => OnceOutcome::NoResult("stopped before it finished".to_owned()),
            (false, None) => OnceOutcome::NoTask,
        }
    }
}

/// How the runner keeps in touch with the server: the intervals the server set, and when it
/// last renewed the leases.
struct Contact {
    heartbeat: Duration,
    ttl: Duration,
    last_renewed: Instant,
    /// Whether "no contact with the server" was said since the last contact.
    said_out_of_touch: bool,
}

impl Contact {
    fn renewed(&mut self) {
        self.last_renewed = Instant::now();
        self.said_out_of_touch = false;
    }

    /// When a whole TTL without renewal will have passed.
    fn lapses_at(&self) -> Instant {
        self.last_renewed + self.ttl
    }
}

/// The connection to the server, while there is one.
struct Link {
    work: WorkStream,
    /// `None` for a server that takes heartbeats only as single calls.
    beats: Option<Heartbeats>,
    ticker: Interval,
}

/// Why there is no link to the server, or no longer one.
enum Cut {
    /// The server could not be reached or refused for now (already said): try again later.
    Unreachable,
    /// The link broke: reconnect after a pause.
    Lost,
    /// The server does not know this runner (it restarted): register again, at once.
    Unregistered,
    /// The server no longer accepts this runner's credential (it was revoked): stop everything.
    Revoked,
    /// The server refused this runner for good.
    Refused(CallError),
    /// Before the first registration: a mistake waiting cannot heal (a URL, a certificate, a
    /// name the runner cannot use), said in one line with what to do.
    Mistake(String),
}

/// What woke the loop.
enum Event {
    /// Time to try connecting again.
    Retry,
    Pushed(Result<Option<Pushed>, CallError>),
    Tick,
    Reply(Result<Option<Vec<LeaseRef>>, CallError>),
    Ended(String, JobEnd),
    Stop,
    Drain,
    DrainDeadline,
    /// A whole TTL without renewal.
    Lapsed,
    /// A rate limit's pause is over.
    Resume,
}

/// What the loop does next.
enum Next {
    Go,
    Cut(Cut),
    Exit,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next message pushed; never, without a link.
async fn next_push(work: Option<&mut WorkStream>) -> Result<Option<Pushed>, CallError> {
    match work {
        Some(work) => work.next().await,
        None => std::future::pending().await,
    }
}

/// The next heartbeat tick; never, without a link.
async fn next_tick(ticker: Option<&mut Interval>) {
    match ticker {
        Some(ticker) => drop(ticker.tick().await),
        None => std::future::pending().await,
    }
}

/// The next heartbeat reply (the leases to drop); never, without a heartbeat stream.
async fn next_reply(beats: Option<&mut Heartbeats>) -> Result<Option<Vec<LeaseRef>>, CallError> {
    match beats {
        Some(beats) => beats.reply().await,
        None => std::future::pending().await,
    }
}

impl Session {
    /// The loop: connects when there is no link and it is time, waits for the next event,
    /// handles it. Returns once drained or stopped, or with why the runner must stop.
    async fn life(&mut self) -> anyhow::Result<()> {
        let mut backoff = Backoff::new();
        let mut link: Option<Link> = None;
        // While there is no link: when to try again.
        let mut retry_at = Instant::now();
        loop {
            if self.slots.finished() {
                return Ok(());
            }
            if link.is_none() && Instant::now() >= retry_at {
                match self.connect(&mut backoff).await {
                    Ok(l) => link = Some(l),
                    Err(cut) => retry_at = self.after_cut(cut, &mut backoff).await?,
                }
                continue;
            }
            let event = self.next_event(link.as_mut(), retry_at).await;
            match self.on_event(event, link.as_ref()).await {
                Next::Go => {}
                Next::Exit => return Ok(()),
                Next::Cut(cut) => {
                    link = None;
                    retry_at = self.after_cut(cut, &mut backoff).await?;
                }
            }
        }
    }

    /// Waits for what happens next; the link's arms are live only with a link, the retry only
    /// without one.
    async fn next_event(&mut self, link: Option<&mut Link>, retry_at: Instant) -> Event {
        let connected = link.is_some();
        let (work, ticker, beats) = match link {
            Some(Link {
                work,
                beats,
                ticker,
            }) => (Some(work), Some(ticker), beats.as_mut()),
            None => (None, None, None),
        };
        // Connected, a lapsed TTL sets off the watchdog; disconnected, it is said once.
        let lapses = (self.slots.jobs() > 0 && (connected || !self.contact.said_out_of_touch))
            .then(|| self.contact.lapses_at());
        let draining = self.slots.is_draining();
        // A pause's end (a rate limit's, a full disk's check), as an instant of this process's
        // clock.
        let paused_until = self.slots.paused_until().map(|(until, _)| {
            let wait = until.saturating_sub(now_ms()).max(0);
            Instant::now() + Duration::from_millis(u64::try_from(wait).unwrap_or(0))
        });
        tokio::select! {
            () = tokio::time::sleep_until(retry_at), if !connected => Event::Retry,
            msg = next_push(work) => Event::Pushed(msg),
            () = next_tick(ticker) => Event::Tick,
            reply = next_reply(beats) => Event::Reply(reply),
            Some((lease, end)) = self.done_rx.recv() => Event::Ended(lease, end),
            () = self.stop.cancelled() => Event::Stop,
            () = self.drain.cancelled(), if !draining => Event::Drain,
            () = sleep_until(self.drain_deadline), if draining => Event::DrainDeadline,
            () = sleep_until(lapses) => Event::Lapsed,
            () = sleep_until(paused_until), if paused_until.is_some() => Event::Resume,
        }
    }

    async fn on_event(&mut self, event: Event, link: Option<&Link>) -> Next {
        match event {
            Event::Retry => Next::Go,
            Event::Pushed(Ok(Some(pushed))) => {
                match pushed {
                    Pushed::Assignment(a) => {
                        self.assign(*a);
                        return self.took_one(link).await;
                    }
                    Pushed::Cancel(lease) => {
                        self.drop_lease(&lease, "the task was cancelled or its lease ended");
                    }
                    Pushed::Build(job) => self.start_build(*job),
                    Pushed::Refused { lease, why } => {
                        let once = lease.is_some() && self.once.is_some();
                        if once && let Some(state) = &mut self.once {
                            state.ended(OnceOutcome::NoResult(why.clone()));
                        }
                        let next = self.refuse(lease, &why, link).await;
                        if !once || !matches!(next, Next::Go) {
                            return next;
                        }
                        return self.took_one(link).await;
                    }
                    Pushed::Ignored => {}
                }
                Next::Go
            }
            Event::Pushed(Ok(None) | Err(_)) => Next::Cut(Cut::Lost),
            Event::Tick => match link {
                Some(link) => self.beat(link).await,
                None => Next::Go,
            },
            Event::Reply(Ok(Some(dropped))) => {
                self.renewed(dropped);
                Next::Go
            }
            Event::Reply(Ok(None)) => Next::Cut(Cut::Lost),
            Event::Reply(Err(e)) => Next::Cut(self.heartbeat_refused(e)),
            Event::Ended(lease, end) => self.job_ended(&lease, end, link).await,
            Event::Stop => {
                self.stop_now().await;
                Next::Exit
            }
            Event::Drain if self.stop.is_cancelled() => {
                self.stop_now().await;
                Next::Exit
            }
            Event::Drain => {
                if self.slots.drain() {
                    self.drain_deadline = Some(Instant::now() + self.drain_timeout);
                    tracing::info!(jobs = self.slots.jobs(), "draining: taking no more work");
                }
                // Tell the server at once, so it assigns nothing more.
                match link {
                    Some(link) => self.beat(link).await,
                    None => Next::Go,
                }
            }
            Event::DrainDeadline => {
                self.drain_deadline = None;
                self.stop_jobs(true);
                Next::Go
            }
            Event::Lapsed if link.is_some() => {
                // No renewal for a whole TTL: the server has given the work away, so stop it.
                tracing::warn!(
                    jobs = self.slots.jobs(),
                    "could not renew leases for a whole TTL; dropping the work"
                );
                self.stop_jobs(false);
                self.contact.last_renewed = Instant::now();
                Next::Go
            }
            Event::Lapsed => {
                self.contact.said_out_of_touch = true;
                tracing::warn!(
                    jobs = self.slots.jobs(),
                    "no contact with the server for {} s (the lease TTL); keeping the work \
                     until it answers",
                    self.contact.ttl.as_secs()
                );
                Next::Go
            }
            Event::Resume => {
                if let Some((_, PauseCause::DiskFull)) = self.slots.paused_until() {
                    let dir = self.ctx.work_dir.clone();
                    let room =
                        tokio::task::spawn_blocking(move || crate::preflight::has_room(&dir))
                            .await
                            .unwrap_or_else(|e| Err(e.to_string()));
                    if let Err(why) = room {
                        let pause = self.slots.still_full(&why, now_ms());
                        tracing::warn!(
                            "the work dir's disk is still full ({why}); checking again in {} s",
                            pause / 1000
                        );
                        return Next::Go;
                    }
                    tracing::info!("the work dir's disk has room again: taking work again");
                } else {
                    tracing::info!("the rate limit has reset: taking work again");
                }
                self.slots.resume();
                // Tell the server now, so that it hands out work without waiting a beat.
                match link {
                    Some(link) => self.beat(link).await,
                    None => Next::Go,
                }
            }
        }
    }

    /// Registers if the server does not know the runner, opens the work stream (reporting the
    /// leases held) and the heartbeat stream.
    async fn connect(&mut self, backoff: &mut Backoff) -> Result<Link, Cut> {
        if self.runner_id.is_none() {
            if let Err(e) = self.register().await {
                return Err(self.registration_failed(e));
            }
            self.registered_once = true;
            self.name_taken = 0;
        }
        let work = match self.open_work().await {
            Ok(work) => work,
            Err(CallError::Unregistered(_)) => return Err(Cut::Unregistered),
            Err(e @ (CallError::Refused { .. } | CallError::Fatal { .. })) => {
                return Err(Cut::Refused(e));
            }
            Err(e @ CallError::Retry(_)) => {
                tracing::warn!(error = %e, "cannot open the work stream; retrying");
                return Err(Cut::Unreachable);
            }
        };
        backoff.reset();
        let beats = match self.client.open_heartbeats().await {
            Ok(Some(beats)) => Some(beats),
            // A server older than the heartbeat stream: a capability, not a refusal.
            Ok(None) => {
                tracing::info!("the server takes heartbeats one call at a time");
                None
            }
            Err(e) => return Err(self.heartbeat_refused(e)),
        };
        let mut ticker = tokio::time::interval(self.contact.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        Ok(Link {
            work,
            beats,
            ticker,
        })
    }

    /// What a failed registration means. A refusal for good stops the runner, as always.
    /// Before the runner first registered, so does a mistake: a server it cannot use (a host
    /// that does not resolve, an address that is not a pipeline server, a certificate it does
    /// not trust, TLS on one side only: read by `wire` with `pipeline_proto::reach`), or a
    /// name that stays taken. Anything else is retried: nothing listening yet, a server
    /// restarting or unavailable.
    fn registration_failed(&mut self, e: CallError) -> Cut {
        let first = !self.registered_once;
        let url = self.client.url().to_owned();
        match e {
            CallError::Refused {
                refusal: Refusal::NameTaken,
                why,
            } if first => {
                self.name_taken += 1;
                let said = format!("the server at {url} refused this runner: {why}");
                if self.name_taken >= NAME_TAKEN_TRIES {
                    return Cut::Mistake(said);
                }
                tracing::warn!(
                    "{said}; retrying, in case it is this runner's own earlier connection"
                );
                Cut::Unreachable
            }
            CallError::Fatal {
                cause: Fatal::Unsupported,
                why,
            } if first => Cut::Mistake(format!(
                "the server at {url} does not serve the pipeline runner API ({why}); check \
                 that the URL (--server) is the pipeline server's gRPC address"
            )),
            CallError::Fatal {
                cause: Fatal::Unreachable,
                why,
            } => Cut::Mistake(why),
            // Retried after the first registration: a name held by this runner's own earlier
            // connection, a server being replaced.
            CallError::Refused {
                refusal: Refusal::NameTaken,
                ..
            }
            | CallError::Fatal {
                cause: Fatal::Unsupported,
                ..
            }
            | CallError::Retry(_)
            | CallError::Unregistered(_) => {
                tracing::warn!(server = %self.client.url(), error = %e, "cannot register; retrying");
                Cut::Unreachable
            }
            CallError::Refused { .. } | CallError::Fatal { .. } => Cut::Refused(e),
        }
    }

    /// After a cut: when to try connecting again, or why the runner must stop.
    async fn after_cut(&mut self, cut: Cut, backoff: &mut Backoff) -> anyhow::Result<Instant> {
        // The server gives a build job to another runner as soon as this one's link ends.
        self.stop_builds("the link to the server ended");
        match cut {
            Cut::Unreachable => Ok(Instant::now() + self.reconnect_pause(backoff)),
            Cut::Lost => {
                tracing::warn!(server = %self.client.url(), "lost the server; reconnecting");
                Ok(Instant::now() + self.reconnect_pause(backoff))
            }
            Cut::Unregistered => {
                self.runner_id = None;
                Ok(Instant::now())
            }
            Cut::Revoked => {
                self.abandon_all().await;
                anyhow::bail!(
                    "the server at {} no longer accepts this runner's credential (revoked?)",
                    self.client.url()
                );
            }
            Cut::Refused(CallError::Fatal {
                cause: Fatal::Credential,
                why,
            }) => {
                self.abandon_all().await;
                anyhow::bail!(
                    "the server at {} refused this runner's credential: {why}; pass the runner \
                     registration token with --token or PIPELINE_RUNNER_TOKEN (the server's log \
                     says where its file is)",
                    self.client.url(),
                );
            }
            Cut::Refused(e) => {
                self.abandon_all().await;
                anyhow::bail!(
                    "the server at {} refused this runner: {e}",
                    self.client.url()
                );
            }
            Cut::Mistake(said) => {
                self.abandon_all().await;
                anyhow::bail!("{said}");
            }
        }
    }

    /// How long to wait before reconnecting: the back-off, but never so long that the leases
    /// held would lapse meanwhile (a restarted server keeps them for one TTL from its start, so
    /// a runner that is quick to come back keeps its work).
    fn reconnect_pause(&self, backoff: &mut Backoff) -> Duration {
        let pause = backoff.next();
        if self.slots.jobs() == 0 {
            return pause;
        }
        let left = self
            .contact
            .lapses_at()
            .saturating_duration_since(Instant::now());
        pause.min((left / 4).max(Duration::from_millis(250)))
    }

    async fn register(&mut self) -> Result<(), CallError> {
        let diagnose = !self.registered_once;
        let registered = match self.client.register(&self.hello, diagnose).await {
            Ok(registered) => registered,
            // The saved credential is unknown to the server (it lost its database, or the
            // runner was forgotten): the registration token, if given, registers it afresh.
            Err(CallError::Fatal {
                cause: Fatal::Credential,
                why,
            }) if self.credential.can_fall_back() => {
                tracing::warn!(
                    error = %why,
                    "the server does not know this runner's saved credential; registering \
                     with the registration token"
                );
                self.credential.fall_back();
                self.client.register(&self.hello, diagnose).await?
            }
            Err(e) => return Err(e),
        };
        if let Some(credential) = &registered.credential {
            self.credential.issued(credential);
        }
        self.contact.heartbeat = registered.heartbeat.max(Duration::from_millis(10));
        self.contact.ttl = registered.ttl.max(Duration::from_millis(30));
        tracing::info!(runner = %self.hello.name, id = %registered.runner_id, server = %self.client.url(), "registered");
        self.runner_id = Some(registered.runner_id);
        // Each registration says afresh whether this server takes early offers.
        self.ctx.early_offers.store(
            registered.early_builds,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    /// Where the runner stands, for the server.
    fn standing(&self) -> Standing {
        let mut held = self.slots.held();
        held.extend(self.builds().values().map(|(build, _, _)| build.clone()));
        Standing {
            held,
            draining: self.slots.is_draining(),
            unhealthy: self.slots.unhealthy().map(str::to_owned),
        }
    }

    async fn open_work(&mut self) -> Result<WorkStream, CallError> {
        let Some(id) = self.runner_id.clone() else {
            return Err(CallError::Unregistered(
                "the runner is not registered".to_owned(),
            ));
        };
        let (work, dropped) = self.client.open_work(&id, &self.standing()).await?;
        // The server's first message said which held leases survived.
        for lease in &dropped {
            self.drop_lease(lease, "the server no longer holds it for this runner");
        }
        // Jobs use the new ID only now that their leases are re-attached to it.
        self.ctx.runner.set(id);
        self.contact.renewed();
        Ok(work)
    }

    /// Sends a heartbeat: a message on the stream (its reply comes as an event), or a call
    /// when the server has no stream.
    async fn beat(&mut self, link: &Link) -> Next {
        let Some(id) = self.runner_id.clone() else {
            return Next::Go;
        };
        match &link.beats {
            // A full queue means the server is not reading: the watchdog deals with that.
            Some(beats) => {
                beats.send(&id, &self.standing());
                Next::Go
            }
            None => self.send_heartbeat(&id).await,
        }
    }

    /// One heartbeat as a call of its own (servers without the heartbeat stream).
    async fn send_heartbeat(&mut self, id: &RunnerId) -> Next {
        let sent = tokio::time::timeout(
            self.contact.heartbeat.max(Duration::from_secs(1)),
            self.client.heartbeat(id, &self.standing()),
        )
        .await;
        match sent {
            Ok(Ok(dropped)) => {
                self.renewed(dropped);
                Next::Go
            }
            // One lost heartbeat is no lost connection: the watchdog deals with a server that
            // keeps not answering.
            Ok(Err(e)) if matches!(heartbeat_cut(&e), Cut::Lost) => {
                tracing::warn!(error = %e, "heartbeat failed");
                Next::Go
            }
            Ok(Err(e)) => Next::Cut(self.heartbeat_refused(e)),
            Err(_) => {
                tracing::warn!("heartbeat timed out");
                Next::Go
            }
        }
    }

    /// The server answered a heartbeat, naming the leases to drop.
    fn renewed(&mut self, dropped: Vec<LeaseRef>) {
        self.contact.renewed();
        for lease in &dropped {
            self.drop_lease(lease, "the server dropped the lease");
        }
    }

    /// What a refused heartbeat (or heartbeat stream) means, said.
    fn heartbeat_refused(&self, e: CallError) -> Cut {
        let cut = heartbeat_cut(&e);
        match cut {
            Cut::Revoked => {
                tracing::error!(error = %e, "the server no longer accepts this runner's credential");
            }
            Cut::Lost => {
                tracing::warn!(error = %e, "the heartbeat stream broke");
            }
            Cut::Unregistered | Cut::Unreachable | Cut::Refused(_) | Cut::Mistake(_) => {}
        }
        cut
    }

    /// With `--once`, after the first assignment: takes no more work (telling the server at
    /// once), so the runner exits when that lease is over. Without, nothing.
    async fn took_one(&mut self, link: Option<&Link>) -> Next {
        let Some(once) = &mut self.once else {
            return Next::Go;
        };
        once.took = true;
        if !self.slots.drain() {
            return Next::Go;
        }
        tracing::info!("--once: one task taken; taking no more, exiting when it is over");
        match link {
            Some(link) => self.beat(link).await,
            None => Next::Go,
        }
    }

    /// An assignment from the server: started in a free slot, queued, or given back.
    fn assign(&mut self, a: Assignment) {
        // A job that just delivered its result may not have reported its end yet.
        while self.slots.needs_a_slot() {
            let Ok((lease, end)) = self.done_rx.try_recv() else {
                break;
            };
            if let Some(ended) = self.slots.ended(&lease, &end, self.stop.is_cancelled()) {
                if let Some(infra) = &ended.infra {
                    say_infra_failure(ended.task.as_str(), infra);
                }
                if let Some(release) = ended.release {
                    self.release(release);
                }
            }
        }
        let cancel = CancellationToken::new();
        let offer = self.slots.offer(a, cancel.clone());
        self.take(offer, cancel);
    }

    /// Acts on what the slots made of an assignment.
    fn take(&mut self, offer: Offer, cancel: CancellationToken) {
        match offer {
            Offer::Start(a, slot) => self.spawn_job(*a, slot, cancel),
            Offer::Queued(task) => {
                tracing::info!(%task, "assignment queued until a job reports its end");
            }
            Offer::Refuse {
                task,
                busy,
                release,
            } => {
                if let Some(once) = &mut self.once
                    && !once.took
                {
                    once.ended(OnceOutcome::NoResult(release.reason.clone()));
                }
                match busy {
                    Busy::Draining => {}
                    Busy::Unhealthy => {
                        tracing::warn!(%task, "unhealthy: giving the assignment back");
                    }
                    Busy::NoSlot => {
                        tracing::error!(%task, "assignment with no free slot; giving it back");
                    }
                }
                self.release(release);
            }
        }
    }

    /// Starts a job, supervised: however it ends, panic included, its end is reported, so its
    /// slot is freed and its lease given back (a panic is the runner's failure, never the
    /// task's).
    fn spawn_job(&self, a: Assignment, slot: usize, cancel: CancellationToken) {
        let ctx = Arc::clone(&self.ctx);
        let done = self.done_tx.clone();
        let lease_id = a.lease.id.clone();
        let span = tracing::info_span!("job", task = %a.task, slot);
        let job = tokio::spawn(job::run(ctx, a, slot, cancel).instrument(span.clone()));
        tokio::spawn(
            async move {
                let end = match job.await {
                    Ok(end) => end,
                    Err(e) => {
                        let end = JobEnd::Infra(job_failure(e));
                        tracing::error!(?end, "the job did not end normally");
                        end
                    }
                };
                let _ = done.send((lease_id, end));
            }
            .instrument(span),
        );
    }

    /// A job ended: its slot is free, its end counted, its lease given back if it must be,
    /// and a queued assignment started in its slot.
    async fn job_ended(&mut self, lease_id: &str, end: JobEnd, link: Option<&Link>) -> Next {
        let mut next = Next::Go;
        if let Some(once) = &mut self.once {
            once.ended(OnceOutcome::of(&end));
        }
        if let Some(ended) = self.slots.ended(lease_id, &end, self.stop.is_cancelled()) {
            if let Some(infra) = &ended.infra {
                next = self.infra_failed(ended.task.as_str(), infra, link).await;
            }
            if let Some(release) = ended.release {
                self.release(release);
            }
        }
        let cancel = CancellationToken::new();
        if let Some(offer) = self.slots.start_queued(cancel.clone()) {
            self.take(offer, cancel);
        }
        next
    }

    /// An assignment the edge refused: its lease (if it names a valid one) goes back as the
    /// runner's failure, not the task's, counted towards the runner's health like a job's.
    async fn refuse(&mut self, lease: Option<LeaseRef>, why: &str, link: Option<&Link>) -> Next {
        let Some(lease) = lease else {
            tracing::warn!("ignoring an assignment naming no valid lease: {why}");
            return Next::Go;
        };
        let what = lease.id.clone();
        let (release, infra) = self.slots.refused(lease, why);
        let next = self.infra_failed(&what, &infra, link).await;
        self.release(release);
        next
    }

    /// Says an infrastructure failure; when it made the runner unhealthy, tells the server at
    /// once (before the lease goes back), so that it assigns nothing more.
    async fn infra_failed(
        &mut self,
        task: &str,
        infra: &InfraFailure,
        link: Option<&Link>,
    ) -> Next {
        say_infra_failure(task, infra);
        match link {
            Some(link) if infra.turned_unhealthy => self.beat(link).await,
            _ => Next::Go,
        }
    }

    /// The one way a lease goes back: in the background, with the runner's health as it is
    /// now, so that the server does not hand the freed slot to a runner that has just turned
    /// unhealthy. Not registered, the runner has nothing the server would take back.
    fn release(&mut self, release: Release) {
        while self.releases.try_join_next().is_some() {}
        let Some(runner) = self.runner_id.clone() else {
            tracing::debug!(lease = %release.lease.id, "not registered: nothing to give back");
            return;
        };
        let client = self.client.clone();
        let unhealthy = self.slots.unhealthy().map(str::to_owned);
        let span = tracing::info_span!("release", lease = %release.lease.id);
        self.releases.spawn(
            async move {
                let call = client.release_lease(
                    &runner,
                    &release.lease,
                    &release.reason,
                    release.infrastructure,
                    unhealthy,
                );
                match tokio::time::timeout(RELEASE_TIMEOUT, call).await {
                    Ok(Ok(())) => {}
                    Ok(Err(status)) => {
                        tracing::debug!(error = %status.message(), "the release was refused");
                    }
                    Err(_) => tracing::debug!("the release timed out"),
                }
            }
            .instrument(span),
        );
    }

    /// Waits (a bounded time) for the releases still under way; the rest go on detached.
    async fn finish_releases(&mut self) {
        let all = async { while self.releases.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(RELEASE_TIMEOUT, all).await;
        self.releases.detach_all();
    }

    fn builds(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<String, (LeaseRef, usize, CancellationToken)>,
    > {
        self.builds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a build job in a build worktree of its own (the server counted it against a
    /// free slot). Not while draining or stopping: the server, told of the drain, builds it
    /// elsewhere.
    fn start_build(&mut self, job: crate::domain::BuildJob) {
        if self.slots.is_draining() || self.stop.is_cancelled() {
            tracing::info!(build = %job.build.id, "draining: not taking the build job");
            return;
        }
        let cancel = CancellationToken::new();
        let n = {
            let mut builds = self.builds();
            let n = (0..)
                .find(|n| builds.values().all(|(_, used, _)| used != n))
                .unwrap_or(0);
            builds.insert(job.build.id.clone(), (job.build.clone(), n, cancel.clone()));
            n
        };
        let ctx = Arc::clone(&self.ctx);
        let builds = Arc::clone(&self.builds);
        let id = job.build.id.clone();
        let span = tracing::info_span!("build", build = %id, commit = %job.commit);
        tracing::info!(parent: &span, "build job taken");
        tokio::spawn(
            async move {
                let _ = crate::build::run(ctx, job, n, cancel).await;
                builds
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
            }
            .instrument(span),
        );
    }

    /// Stops every build job (the link to the server broke: it builds them elsewhere).
    fn stop_builds(&mut self, why: &str) {
        for (id, (_, _, cancel)) in self.builds().drain() {
            tracing::warn!(build = %id, "stopping the build job: {why}");
            cancel.cancel();
        }
    }

    /// Stops the job holding `lease` without giving it back (the server already took it).
    fn drop_lease(&mut self, lease: &LeaseRef, why: &str) {
        let build = self.builds().remove(&lease.id);
        if let Some((_, _, cancel)) = build {
            tracing::warn!(build = %lease.id, "stopping the build job: {why}");
            cancel.cancel();
            return;
        }
        if let Some((task, cancel)) = self.slots.drop_lease(lease) {
            tracing::warn!(%task, lease = %lease.id, "stopping: {why}");
            cancel.cancel();
        }
    }

    /// Stops every job; with `release`, their leases (and queued ones) are given back.
    fn stop_jobs(&mut self, release: bool) {
        let (running, queued) = self.slots.stop_all(release);
        for cancel in running {
            cancel.cancel();
        }
        for release in queued {
            self.release(release);
        }
    }

    /// Waits, a bounded time, for the stopped jobs to end.
    async fn wait_for_jobs(&mut self, mut on_end: impl FnMut(&mut Self, String, JobEnd)) {
        let deadline = Instant::now() + self.ctx.config.agent.kill_grace() + Duration::from_secs(5);
        while self.slots.jobs() > 0 {
            match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                Ok(Some((lease, end))) => on_end(self, lease, end),
                _ => break,
            }
        }
    }

    /// Stop (the second signal): stops every job and gives its lease back.
    async fn stop_now(&mut self) {
        self.stop_builds("stopping");
        tracing::warn!(jobs = self.slots.jobs(), "stopping now; giving leases back");
        self.stop_jobs(true);
        self.wait_for_jobs(|s, lease, end| {
            if let Some(ended) = s.slots.ended(&lease, &end, true) {
                if let Some(infra) = &ended.infra {
                    say_infra_failure(ended.task.as_str(), infra);
                }
                if let Some(release) = ended.release {
                    s.release(release);
                }
            }
        })
        .await;
    }

    /// Stops every job and waits (a bounded time) for them to end, without giving anything
    /// back: the server no longer takes this runner's word. Agents' process groups are stopped.
    async fn abandon_all(&mut self) {
        self.stop_builds("stopping");
        self.stop_jobs(false);
        self.wait_for_jobs(|s, lease, end| {
            s.slots.ended(&lease, &end, s.stop.is_cancelled());
        })
        .await;
    }
}

/// Why a job's task ended without a [`JobEnd`]: a panic (a bug in the runner, said with its
/// message), or a cancellation of the task itself.
fn job_failure(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return "the runner's job was stopped before it ended".to_owned();
    }
    let payload = e.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned());
    format!("the runner's job panicked (a bug in the runner, not the task's failure): {message}")
}

/// Says an infrastructure failure, and the runner turning unhealthy.
fn say_infra_failure(task: &str, infra: &InfraFailure) {
    let first = &infra.why;
    tracing::error!(
        task,
        in_a_row = infra.in_a_row,
        "infrastructure failure, lease given back uncharged: {first}"
    );
    if infra.turned_unhealthy {
        tracing::error!(
            "unhealthy after {} infrastructure failures in a row: taking no more work until \
             restarted (last: {first})",
            infra.in_a_row
        );
    }
    if let Some(pause) = infra.disk_full_pause_ms {
        tracing::error!(
            "the work dir's disk is full: taking no work until it has room (checked in {} s)",
            (pause / 1000).max(1)
        );
    }
}

/// What a failed heartbeat means for the link. Of the fatal failures only a refused credential
/// cuts the runner off; the others are taken as a broken link, and reconnecting says whether
/// the server still takes the runner (`wire` reads a heartbeat's failure that way).
fn heartbeat_cut(e: &CallError) -> Cut {
    match e {
        CallError::Unregistered(_) => Cut::Unregistered,
        CallError::Fatal {
            cause: Fatal::Credential,
            ..
        } => Cut::Revoked,
        CallError::Fatal { .. } | CallError::Refused { .. } | CallError::Retry(_) => Cut::Lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_once_runner_exits_by_what_came_of_its_lease() {
        let code = |end: JobEnd| Finished::Once(OnceOutcome::of(&end)).exit_code();
        assert_eq!(code(JobEnd::Delivered(Outcome::Verified)), 0);
        assert_eq!(code(JobEnd::Delivered(Outcome::DevFailed)), 3);
        assert_eq!(code(JobEnd::Delivered(Outcome::VerifyFailed)), 3);
        for end in [
            JobEnd::Refused("lease gone".into()),
            JobEnd::Cancelled,
            JobEnd::Infra("no git".into()),
            JobEnd::Unusable("not logged in".into()),
            JobEnd::RateLimited {
                reason: "rate limited".into(),
                until_ms: 0,
            },
            JobEnd::DiskFull {
                reason: "the work dir's disk is full".into(),
                at_ms: 0,
            },
        ] {
            assert_eq!(code(end.clone()), 4, "{end:?}");
        }
        assert_eq!(Finished::Once(OnceOutcome::NoTask).exit_code(), 0);
        assert_eq!(Finished::Stopped.exit_code(), 0);
        let took = OnceState {
            took: true,
            outcome: None,
        };
        assert_eq!(
            took.outcome(),
            OnceOutcome::NoResult("stopped before it finished".into())
        );
        let mut first = OnceState::default();
        first.ended(OnceOutcome::TaskFailed);
        first.ended(OnceOutcome::Verified);
        assert_eq!(
            first.outcome(),
            OnceOutcome::TaskFailed,
            "the first end counts"
        );
    }

    #[test]
    fn a_failed_heartbeat_cuts_the_link_only_for_a_refused_credential() {
        let why = || "x".to_owned();
        for (e, want) in [
            (CallError::Unregistered(why()), "unregistered"),
            (
                CallError::Fatal {
                    why: why(),
                    cause: Fatal::Credential,
                },
                "revoked",
            ),
            (
                CallError::Fatal {
                    why: why(),
                    cause: Fatal::Other,
                },
                "lost",
            ),
            (
                CallError::Refused {
                    why: why(),
                    refusal: Refusal::Other,
                },
                "lost",
            ),
            (CallError::Retry(why()), "lost"),
        ] {
            let got = match heartbeat_cut(&e) {
                Cut::Unregistered => "unregistered",
                Cut::Revoked => "revoked",
                Cut::Lost => "lost",
                Cut::Unreachable | Cut::Refused(_) | Cut::Mistake(_) => "other",
            };
            assert_eq!(got, want, "{e:?}");
        }
    }
}
