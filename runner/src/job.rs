//! One lease, start to finish: check that the verifier it will run is here (else the lease
//! goes back, uncharged, before anything is spent), fetch the base (only the objects the mirror
//! lacks), reset the slot's worktree, write the prompt outside it, run the agent, check for
//! exactly one commit, bundle it, verify, and send the result with the commit's bundle. Stops
//! at once when cancelled.
//!
//! With a server that takes early offers (`--early-builds`), the commit's bundle is also
//! offered ([`offer`]) as soon as it is made, in a task of its own that never holds the
//! verification up: the server may build the commit's train meanwhile. The offer changes
//! nothing else; its failure is logged at debug and forgotten (the result carries the bundle
//! as ever).
//!
//! A lease's words ([`Assignment`], already validated by the edge, so nothing is checked again
//! here; the [`LeaseResult`] sent; the [`JobEnd`] the session gets) are the runner's
//! vocabulary, in `domain`. A fetch or a delivery that fails ([`CallError`], as `wire` read it)
//! is retried with the runner's [`Backoff`] while the server is away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pipeline_core::clock::now_ms;
use pipeline_core::git::Worktree;
use pipeline_core::ids::CommitId;
use pipeline_core::sandbox::{Rules, Sandbox};
use pipeline_core::verify::{self, Verdict, Verifier};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::agent::{self, AgentJob, AgentResult};
use crate::backoff::Backoff;
use crate::config::{AgentMode, Config};
use crate::domain::{
    Assignment, CallError, Channel, CurrentRunner, Fatal, JobEnd, LeaseResult, Outcome, Phase,
};
use crate::git::{Found, Mirror, private_dir};
use crate::logship::RunLog;
use crate::usage::Usage;
use crate::wire::{BaseChunks, Client};

/// What every job shares.
pub struct JobContext {
    pub config: Config,
    pub mirror: Mirror,
    pub work_dir: PathBuf,
    pub client: Client,
    /// The runner's current ID (it changes when the runner registers again).
    pub runner: CurrentRunner,
    /// Prices per million tokens, for agents that report only tokens.
    pub prices: Arc<agent::Prices>,
    /// The sandbox agents and builds run in.
    pub sandbox: Sandbox,
    /// The server takes early offers (`--early-builds`): set at each registration from its
    /// answer, cleared when it says it takes none.
    pub early_offers: AtomicBool,
}

impl JobContext {
    /// A file in the work dir's `tmp` (the bundles fetched and sent), the directory made if
    /// it is missing.
    fn tmp_file(&self, name: &str) -> Result<PathBuf, String> {
        let tmp = self.work_dir.join("tmp");
        std::fs::create_dir_all(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        Ok(tmp.join(name))
    }

    /// The environment a job's agent and build run in: the agent's, with the job's own temp
    /// dir `tmp` for the runner's.
    pub(crate) fn child_env(&self, tmp: &Path) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .config
            .agent
            .child_env()
            .into_iter()
            .filter(|(k, _)| k != "TMPDIR")
            .collect();
        env.push(("TMPDIR".to_owned(), tmp.display().to_string()));
        env
    }

    /// What a job's sandbox lets it at: it writes its worktree, the worktree's git state (its
    /// git directory and its repository's objects) and its private directory `private`, and
    /// reads its repository and the mirror's objects; nothing else of the work dir (the
    /// credential, the other slots and build worktrees).
    pub(crate) fn own_rules(&self, tree: &Worktree, private: &Path) -> Rules {
        let mut own = Rules::default();
        own.own(&tree.path)
            .own(&tree.admin)
            .own(tree.objects())
            .own(private)
            .read(&tree.common)
            .read(self.mirror.dir().join("objects"));
        own
    }

    /// Fetches a bundle of what the mirror lacks of `what` into the file `name` in the work
    /// dir's `tmp`, calling the server with `call`; retries while the server is away or does
    /// not know the runner yet. Returns the file, and how many chunks and bytes came (no
    /// chunks: the mirror had it all).
    pub(crate) async fn fetch_bundle<F>(
        &self,
        what: &str,
        name: &str,
        cancel: &CancellationToken,
        call: impl Fn() -> F,
    ) -> Result<Fetched, FetchEnd>
    where
        F: Future<Output = Result<BaseChunks, CallError>>,
    {
        let file = self.tmp_file(name).map_err(FetchEnd::Infra)?;
        let (mut attempt, mut backoff) = (0, Backoff::new());
        loop {
            if cancel.is_cancelled() {
                return Err(FetchEnd::Cancelled);
            }
            match fetch_once(&call, &file, what).await {
                Ok((chunks, bytes)) => {
                    return Ok(Fetched {
                        file,
                        chunks,
                        bytes,
                    });
                }
                Err(FetchError::Local(why)) => return Err(FetchEnd::Infra(why)),
                // The lease or build job is no longer this runner's: nothing more to do.
                Err(FetchError::Call(CallError::Refused { why, .. })) => {
                    return Err(FetchEnd::Refused(why));
                }
                // The server is away or failed inside, or does not know the runner until it
                // registers again.
                Err(FetchError::Call(e @ (CallError::Retry(_) | CallError::Unregistered(_))))
                    if attempt < 20 =>
                {
                    tracing::warn!(error = %e, "fetching {what} failed; retrying");
                    attempt += 1;
                    if !pause(&mut backoff, cancel).await {
                        return Err(FetchEnd::Cancelled);
                    }
                }
                // The runner's failure (a fetch that cannot succeed as it is).
                Err(FetchError::Call(e)) => {
                    return Err(FetchEnd::Infra(format!("cannot fetch {what}: {e}")));
                }
            }
        }
    }
}

/// A bundle fetched into `file` (empty when no chunks came).
pub(crate) struct Fetched {
    pub file: PathBuf,
    pub chunks: usize,
    pub bytes: usize,
}

/// Why a fetch ended without a bundle.
pub(crate) enum FetchEnd {
    Cancelled,
    /// The server refused: the work is no longer this runner's.
    Refused(String),
    /// This runner's trouble (its disk, a call that cannot succeed): not the work's fault.
    Infra(String),
}

/// Makes `dir` anew, empty: a job's temp dir holds nothing of the job before it.
pub(crate) fn fresh_dir(dir: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// The result of the dev and verify steps, ready to send.
struct Report {
    result: LeaseResult,
    /// The commit's bundle, for a result with a commit.
    bundle: Option<PathBuf>,
}

/// Runs one assignment in worktree `slot`.
pub async fn run(
    ctx: Arc<JobContext>,
    a: Assignment,
    slot: usize,
    cancel: CancellationToken,
) -> JobEnd {
    let started = Instant::now();
    let task = a.task.as_str();
    let log = RunLog::start(ctx.client.clone(), ctx.runner.clone(), a.lease.clone());
    let end = match develop(&ctx, &a, slot, &cancel, &log).await {
        Ok(report) => {
            // The run's last line says how it ended.
            let last = match (&report.result.outcome, &report.result.error) {
                (Outcome::Verified, _) => "sending the result".to_owned(),
                (_, Some(why)) => format!(
                    "sending the result: {}",
                    why.lines().next().unwrap_or_default()
                ),
                (_, None) => "sending the result".to_owned(),
            };
            let phase = if report.result.outcome == Outcome::DevFailed {
                Phase::Dev
            } else {
                Phase::Verify
            };
            log.note(phase, &last);
            // Every line reaches the server before the result ends the lease.
            tokio::select! {
                () = log.flush() => {}
                () = cancel.cancelled() => {}
            }
            let end = deliver(&ctx, &a, &report, &cancel).await;
            if let Some(bundle) = &report.bundle {
                let _ = std::fs::remove_file(bundle);
            }
            end
        }
        Err(JobEnd::Infra(reason)) => {
            // The reason reaches the run's log before the lease is given back.
            tokio::select! {
                () = log.flush() => {}
                () = cancel.cancelled() => {}
            }
            if pipeline_core::git::is_disk_full(&reason) {
                JobEnd::DiskFull {
                    reason,
                    at_ms: now_ms(),
                }
            } else {
                JobEnd::Infra(reason)
            }
        }
        Err(end) => end,
    };
    if matches!(end, JobEnd::Cancelled | JobEnd::Refused(_)) {
        // Leave nothing of the abandoned work behind.
        let worktree = ctx.mirror.slot(&ctx.work_dir, slot);
        if worktree.path.exists() {
            match ctx.mirror.prepare_worktree(&worktree, &a.base).await {
                Ok(()) => tracing::info!(task, "worktree cleaned"),
                Err(e) => tracing::warn!(task, error = %e, "cannot clean the worktree"),
            }
        }
    }
    tracing::info!(task, run = %a.run_id, ?end, secs = started.elapsed().as_secs_f64(), "job over");
    end
}

async fn develop(
    ctx: &Arc<JobContext>,
    a: &Assignment,
    slot: usize,
    cancel: &CancellationToken,
    log: &RunLog,
) -> Result<Report, JobEnd> {
    let dev = Phase::Dev;
    let task = a.task.as_str();
    let (base, previous) = (&a.base, a.previous.as_ref());
    tracing::info!(task, run = %a.run_id, patchset = a.patchset, "leased");
    log.note(
        dev,
        &format!("leased {task} (run {}, patchset {})", a.run_id, a.patchset),
    );
    pipeline_core::failpoint::panic_at("panic-job");

    // The server's verification is the gate: the job runs exactly that, so that its pass can
    // stand for a build of the tree. The runner's own flags serve an older server only. Its
    // programs are checked now, before anything is spent on the lease: a runner that lacks
    // them gives the lease back (uncharged) instead of running an agent whose work it cannot
    // verify.
    let (verifier, whose) = match &a.verification {
        Some(v) => (v.clone(), "the server's"),
        None => (ctx.config.verify.verifier(), "this runner's"),
    };
    if verifier.applies_to(a.namespace.as_deref()) {
        let path = std::env::var("PATH").unwrap_or_default();
        if let Err(missing) = crate::preflight::check_verifier(&verifier, &path) {
            let reason = if a.verification.is_some() {
                format!(
                    "the server's verification cannot run on this runner: {missing}; install \
                     it here, or have the server verify another way (--build-cmd/--test-cmd, \
                     --no-verify)"
                )
            } else {
                format!(
                    "this runner's verification cannot run: {missing}; install it, or pass \
                     --build-cmd/--test-cmd or --no-verify"
                )
            };
            log.note(
                dev,
                &format!("infrastructure failure (not the task's): {reason}"),
            );
            return Err(JobEnd::Infra(reason));
        }
        // A file the server's command names by absolute path is readable by builds only if
        // this runner's sandbox grants it (never on the server's word alone, below): one it
        // cannot read would fail every verification after the agent has run. Given back
        // now, uncharged, saying what to grant.
        if verifier != ctx.config.verify.verifier()
            && let Some(policy) = ctx.sandbox.policy(&Rules::default())
            && let Some(file) = policy.unreadable_in(verifier.commands()).first()
        {
            let dir = file.parent().unwrap_or(file);
            let reason = format!(
                "the server's verification runs {}, which this runner's sandbox does not let \
                 builds read; pass --sandbox-read {} to this runner, or keep the script in the \
                 repository",
                file.display(),
                dir.display()
            );
            log.note(
                dev,
                &format!("infrastructure failure (not the task's): {reason}"),
            );
            return Err(JobEnd::Infra(reason));
        }
    }

    fetch_base(ctx, a, cancel).await?;
    let slot_tree = ctx.mirror.slot(&ctx.work_dir, slot);
    let worktree = slot_tree.path.clone();
    let start = previous.unwrap_or(base);
    ctx.mirror
        .prepare_worktree(&slot_tree, start)
        .await
        .map_err(|e| JobEnd::Infra(format!("cannot prepare the worktree: {e}")))?;
    tracing::info!(task, worktree = %worktree.display(), "worktree ready");
    log.note(dev, &format!("worktree ready at {start}"));

    // The slot's private directory: the prompt (outside the worktree), the cost file and a
    // temp dir, written by this lease's agent and build only.
    let private = private_dir(&ctx.work_dir, slot);
    let tmp = private.join("tmp");
    fresh_dir(&tmp).map_err(JobEnd::Infra)?;
    let prompt_file = private.join(format!("{}.md", a.run_id));
    let cost_file = private.join(format!("{}.cost", a.run_id));
    let _ = std::fs::remove_file(&cost_file);
    std::fs::write(&prompt_file, &a.prompt)
        .map_err(|e| JobEnd::Infra(format!("cannot write the prompt: {e}")))?;
    let mut env = ctx.child_env(&tmp);
    env.extend([
        ("PIPELINE_TASK_ID".to_owned(), a.task.to_string()),
        ("PIPELINE_RUN_ID".to_owned(), a.run_id.to_string()),
        (
            "PIPELINE_PROMPT_FILE".to_owned(),
            prompt_file.display().to_string(),
        ),
        ("PIPELINE_BASE".to_owned(), a.base_branch.clone()),
        ("PIPELINE_BASE_COMMIT".to_owned(), base.to_string()),
        ("PIPELINE_PATCHSET".to_owned(), a.patchset.to_string()),
        (
            "PIPELINE_NAMESPACE".to_owned(),
            a.namespace.clone().unwrap_or_default(),
        ),
        (
            "PIPELINE_COST_FILE".to_owned(),
            cost_file.display().to_string(),
        ),
    ]);
    // The agent may also write its own files in the home directory.
    let own = ctx.own_rules(&slot_tree, &private);
    let path = std::env::var("PATH").unwrap_or_default();
    let agent_sandbox = ctx
        .sandbox
        .policy(&own.merged(&ctx.config.agent.sandbox_rules(&path)));
    let job = AgentJob {
        run_id: a.run_id.to_string(),
        worktree: worktree.clone(),
        prompt_file: prompt_file.clone(),
        prompt: a.prompt.clone(),
        cost_file: cost_file.clone(),
        env: env.clone(),
        budget_cents: a.budget_cents,
        // The agent's session goes on only where it left off: when this attempt amends the
        // previous patchset (the worktree is that commit), not on a fresh start from the base;
        // and never with --no-resume.
        resume_session: a
            .resume_session
            .clone()
            .filter(|_| previous.is_some() && !ctx.config.agent.no_resume),
        prices: ctx.prices.clone(),
        sandbox: agent_sandbox,
    };
    if let Some(budget) = a.budget_cents {
        log.note(dev, &format!("the task may spend {budget:.2} more cents"));
    }
    let agent_started = Instant::now();
    log.note(dev, "starting the agent");
    let on_line = |channel: Channel, line: &str| log.line(channel, dev, line);
    let result = agent::run(&ctx.config.agent, &job, cancel, on_line).await;
    let _ = std::fs::remove_file(&prompt_file);
    let _ = std::fs::remove_file(&cost_file);
    let dev_finished_at_ms = now_ms();
    let usage = match result {
        AgentResult::Cancelled => return Err(JobEnd::Cancelled),
        AgentResult::Infra { reason, unhealthy } => {
            log.note(
                dev,
                &format!("infrastructure failure (not the task's): {reason}"),
            );
            return Err(if unhealthy {
                JobEnd::Unusable(reason)
            } else {
                JobEnd::Infra(reason)
            });
        }
        AgentResult::RateLimited {
            reason,
            until_ms,
            usage,
        } => {
            // A limit that does not say when it resets is tried again in a minute.
            let until_ms = until_ms.unwrap_or_else(|| now_ms() + RATE_LIMIT_PAUSE_MS);
            let reason = format!("{reason}; no new work until {}", rfc3339(until_ms));
            log.note(dev, &format!("{reason}; {}", usage_note(&usage)));
            return Err(JobEnd::RateLimited { reason, until_ms });
        }
        AgentResult::Failed { reason, usage } => {
            let secs = agent_started.elapsed().as_secs_f64();
            tracing::info!(task, "agent failed after {secs:.1} s");
            log.note(
                dev,
                &format!("agent failed after {secs:.1} s; {}", usage_note(&usage)),
            );
            return Ok(Report::dev_failed(reason, usage, dev_finished_at_ms));
        }
        AgentResult::Completed { usage } => usage,
    };
    let cost_cents = usage.cost_cents;
    if ctx.config.agent.commit_for_agent || ctx.config.agent.mode() == AgentMode::Aider {
        let message = format!("{}\n\nTask-Id: {}\n", a.title, a.task);
        match ctx
            .mirror
            .commit_for_agent(&slot_tree, &message, previous.is_some())
            .await
        {
            Ok(true) => log.note(dev, "committed the agent's change for it"),
            Ok(false) => log.note(dev, "the agent changed nothing; no commit made for it"),
            Err(e) => {
                let reason = format!("cannot commit the agent's change: {e}");
                log.note(
                    dev,
                    &format!("infrastructure failure (not the task's): {reason}"),
                );
                return Err(JobEnd::Infra(reason));
            }
        }
    }
    log.note(dev, &usage_note(&usage));
    let secs = agent_started.elapsed().as_secs_f64();
    tracing::info!(task, "agent exited 0 after {secs:.1} s");
    log.note(dev, &format!("agent exited 0 after {secs:.1} s"));
    let commit = match ctx.mirror.one_commit(&slot_tree, base, previous).await {
        Ok(c) => c,
        Err(Found::Wrong(reason)) => {
            log.note(dev, &reason);
            return Ok(Report::dev_failed(reason, usage, dev_finished_at_ms));
        }
        Err(Found::GitFailed(reason)) => {
            log.note(
                dev,
                &format!("infrastructure failure (not the task's): {reason}"),
            );
            return Err(JobEnd::Infra(reason));
        }
    };
    // The bundle is made once, before the verification: offered at once to a server that
    // builds early, and sent with the result (the commit as it was verified).
    let bundle = ctx
        .tmp_file(&format!("{}.out.bundle", a.run_id))
        .map_err(JobEnd::Infra)?;
    ctx.mirror
        .bundle_head(&slot_tree, base, &bundle)
        .await
        .map_err(|e| JobEnd::Infra(format!("cannot bundle the commit: {e}")))?;
    if ctx.early_offers.load(Ordering::Relaxed) {
        offer(ctx, a, &commit, &bundle, cancel).await;
    }
    let check = Phase::Verify;
    // The files a build command names are readable when this runner's operator gave that
    // command (its own flags, as local runners share the server's), never on the server's
    // word alone.
    let mut build_rules = own.clone();
    if verifier == ctx.config.verify.verifier() {
        build_rules.named_in_all(verifier.commands());
    }
    let build_sandbox = ctx.sandbox.policy(&build_rules);
    log.note(
        check,
        &format!(
            "verifying {commit} ({whose} verification: {})",
            describe(&verifier)
        ),
    );
    let verdict = verify::verify(
        &verifier,
        &verify::Build {
            dir: &worktree,
            namespace: a.namespace.as_deref(),
            env: &env,
            kill_grace: ctx.config.agent.kill_grace(),
            sandbox: build_sandbox.as_ref(),
        },
        cancel,
        |stream, line| log.line(Channel::from(stream), check, line),
    )
    .await;
    let ran = matches!(verdict, Verdict::Pass | Verdict::Fail(_));
    let verify_digest = ran.then(|| verifier.digest());
    let (outcome, error, verify_skipped) = match verdict {
        Verdict::Cancelled => return Err(JobEnd::Cancelled),
        Verdict::Infra(reason) => {
            log.note(
                check,
                &format!("infrastructure failure (not the task's): {reason}"),
            );
            return Err(JobEnd::Infra(reason));
        }
        Verdict::Pass => (Outcome::Verified, None, None),
        Verdict::Skipped(why) => (Outcome::Verified, None, Some(why)),
        Verdict::Fail(why) => (Outcome::VerifyFailed, Some(why), None),
    };
    tracing::info!(task, ?outcome, "verification over; sending commit");
    let verdict = match (&error, &verify_skipped) {
        (Some(why), _) => format!(
            "verification failed: {}",
            why.lines().next().unwrap_or_default()
        ),
        (None, Some(why)) => format!("verification skipped: {why}"),
        (None, None) => "verification passed".to_owned(),
    };
    log.note(check, &verdict);
    Ok(Report {
        result: LeaseResult {
            outcome,
            error,
            cost_cents,
            commit: Some(commit),
            verify_skipped,
            verify_digest,
            dev_finished_at_ms,
            usage: Some(usage),
        },
        bundle: Some(bundle),
    })
}

/// Offers the lease's `commit` with its `bundle` (`--early-builds`), once, in a task of its
/// own: returns as soon as the bundle is read. The task ends with the offer's answer or the
/// job's cancellation; a server that takes no offers is not offered to again (until it says
/// otherwise at a registration); any other failure (the server away, the lease over, the
/// commit refused) is the result's to meet, and only logged.
async fn offer(
    ctx: &Arc<JobContext>,
    a: &Assignment,
    commit: &CommitId,
    bundle: &Path,
    cancel: &CancellationToken,
) {
    let task = a.task.to_string();
    let bytes = match tokio::fs::read(bundle).await {
        Ok(bytes) => bytes::Bytes::from(bytes),
        Err(e) => {
            tracing::debug!(%task, error = %e, "cannot read the commit's bundle to offer it");
            return;
        }
    };
    let (ctx, lease, commit, cancel) = (
        Arc::clone(ctx),
        a.lease.clone(),
        commit.clone(),
        cancel.clone(),
    );
    let span = tracing::debug_span!("offer", %task, %commit);
    tokio::spawn(
        async move {
            let send = async {
                let runner = ctx.runner.get()?;
                ctx.client
                    .offer_commit(&runner, &lease, &commit, &bytes)
                    .await
            };
            let offered = tokio::select! {
                offered = send => offered,
                () = cancel.cancelled() => return,
            };
            match offered {
                Ok(()) => tracing::debug!("commit offered before its verification"),
                Err(CallError::Fatal {
                    why,
                    cause: Fatal::Unsupported,
                }) => {
                    ctx.early_offers.store(false, Ordering::Relaxed);
                    tracing::debug!(error = %why, "the server takes no early offers; none sent again");
                }
                Err(e) => tracing::debug!(error = %e, "the offer failed (the result follows as ever)"),
            }
        }
        .instrument(span),
    );
}

/// How long a rate limit that does not say when it resets pauses the runner.
const RATE_LIMIT_PAUSE_MS: i64 = 60_000;

/// Milliseconds since the epoch as an RFC 3339 time (UTC, seconds).
fn rfc3339(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// A usage in a few words, for the log.
fn usage_note(u: &Usage) -> String {
    let source = match u.cost_source {
        crate::usage::CostSource::Reported => "reported",
        crate::usage::CostSource::Estimated => "estimated",
        crate::usage::CostSource::None => "unknown",
    };
    format!(
        "usage: {} input ({} cached) / {} output tokens, {:.2} cents ({source}){}",
        u.input_tokens,
        u.cached_input_tokens,
        u.output_tokens,
        u.cost_cents,
        if u.complete { "" } else { ", incomplete" }
    )
}

/// A verification in a few words, for the log.
fn describe(v: &Verifier) -> String {
    match v {
        Verifier::Off => "off".to_owned(),
        Verifier::Bild => "bild".to_owned(),
        Verifier::Commands { build, test } => {
            let parts: Vec<String> = [("build", build), ("test", test)]
                .into_iter()
                .filter_map(|(what, c)| c.as_ref().map(|c| format!("{what}: {c}")))
                .collect();
            if parts.is_empty() {
                "no commands".to_owned()
            } else {
                parts.join("; ")
            }
        }
    }
}

impl Report {
    fn dev_failed(reason: String, usage: Usage, at: i64) -> Self {
        Self {
            result: LeaseResult {
                outcome: Outcome::DevFailed,
                error: Some(reason),
                cost_cents: usage.cost_cents,
                commit: None,
                verify_skipped: None,
                verify_digest: None,
                dev_finished_at_ms: at,
                usage: Some(usage),
            },
            bundle: None,
        }
    }
}

/// Waits before retrying a call to a server that is away, unless cancelled first.
async fn pause(backoff: &mut Backoff, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(backoff.next()) => true,
        () = cancel.cancelled() => false,
    }
}

/// Fetches what the mirror lacks of the base (and the previous patchset).
async fn fetch_base(
    ctx: &JobContext,
    a: &Assignment,
    cancel: &CancellationToken,
) -> Result<(), JobEnd> {
    let wanted: Vec<CommitId> = std::iter::once(&a.base)
        .chain(a.previous.as_ref())
        .cloned()
        .collect();
    if wanted.iter().all(|c| ctx.mirror.keeps(c)) {
        tracing::info!(task = %a.task, "base already in the mirror; nothing fetched");
        return Ok(());
    }
    let call = || async {
        let runner = ctx.runner.get()?;
        ctx.client
            .fetch_base(&runner, &a.lease, &ctx.mirror.haves())
            .await
    };
    let fetched = ctx
        .fetch_bundle(
            "the base",
            &format!("{}.base.bundle", a.run_id),
            cancel,
            call,
        )
        .await
        .map_err(|end| match end {
            FetchEnd::Cancelled => JobEnd::Cancelled,
            FetchEnd::Refused(why) => JobEnd::Refused(why),
            FetchEnd::Infra(why) => JobEnd::Infra(why),
        })?;
    tracing::info!(task = %a.task, bytes = fetched.bytes, "fetched the base's missing objects");
    let mut heads = Vec::new();
    if fetched.chunks > 0 {
        let stored = ctx.mirror.unbundle(&fetched.file).await;
        let _ = std::fs::remove_file(&fetched.file);
        heads = stored.map_err(|e| JobEnd::Infra(format!("cannot store the base: {e}")))?;
    }
    // What the bundle did not bring the mirror must have had (the server left it out): check
    // that with git.
    for c in &wanted {
        if !heads.contains(c) && !ctx.mirror.keeps(c) && !ctx.mirror.has_commit(c).await {
            return Err(JobEnd::Infra(format!("the server's bundle lacks {c}")));
        }
    }
    ctx.mirror.remember(&wanted).await;
    Ok(())
}

/// Why one fetch failed: the call (the server or the connection, which may come back), or
/// this machine's own disk (no retry: the work goes back, uncharged).
enum FetchError {
    Call(CallError),
    Local(String),
}

impl From<CallError> for FetchError {
    fn from(e: CallError) -> Self {
        FetchError::Call(e)
    }
}

/// Fetches the bundle of `what` into `file`; returns (chunks, bytes).
async fn fetch_once<F>(
    call: impl Fn() -> F,
    file: &Path,
    what: &str,
) -> Result<(usize, usize), FetchError>
where
    F: Future<Output = Result<BaseChunks, CallError>>,
{
    let mut chunks_in = call().await?;
    let local = |e: std::io::Error| {
        let _ = std::fs::remove_file(file);
        FetchError::Local(format!(
            "cannot write the bundle of {what} {}: {e}",
            file.display()
        ))
    };
    let mut out = tokio::fs::File::create(file).await.map_err(local)?;
    let (mut chunks, mut bytes) = (0, 0);
    while let Some(chunk) = chunks_in.next().await? {
        bytes += chunk.len();
        out.write_all(&chunk).await.map_err(local)?;
        chunks += 1;
    }
    out.flush().await.map_err(local)?;
    Ok((chunks, bytes))
}

/// Sends the report, retrying while the server is away; the lease's fence makes a repeat
/// harmless (a second delivery is refused as a dead lease).
async fn deliver(
    ctx: &JobContext,
    a: &Assignment,
    r: &Report,
    cancel: &CancellationToken,
) -> JobEnd {
    let bundle = match &r.bundle {
        Some(path) => match tokio::fs::read(path).await {
            Ok(bytes) => Some(bytes::Bytes::from(bytes)),
            Err(e) => return JobEnd::Infra(format!("cannot read the commit's bundle: {e}")),
        },
        None => None,
    };
    let (mut attempt, mut backoff) = (0, Backoff::new());
    loop {
        let send = async {
            let runner = ctx.runner.get()?;
            ctx.client
                .complete_lease(&runner, &a.lease, &r.result, bundle.as_ref())
                .await
        };
        let sent = tokio::select! {
            sent = send => sent,
            () = cancel.cancelled() => return JobEnd::Cancelled,
        };
        match sent {
            Ok(status) => {
                tracing::info!(task = %a.task, status, "result delivered");
                return JobEnd::Delivered(r.result.outcome);
            }
            // Refused for good (the lease is over, the commit refused, the bundle too large):
            // sending it again cannot help.
            Err(CallError::Refused { why, .. }) => {
                tracing::warn!(task = %a.task, error = %why, "the server refused the result");
                return JobEnd::Refused(why);
            }
            // Anything else is sent again: the lease's fence makes a repeat harmless.
            Err(e) => {
                attempt += 1;
                tracing::warn!(task = %a.task, error = %e, attempt, "delivering the result failed; retrying");
                if !pause(&mut backoff, cancel).await {
                    return JobEnd::Cancelled;
                }
            }
        }
    }
}
