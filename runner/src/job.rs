//! One lease, start to finish: fetch the base (only the objects the mirror lacks), reset the
//! slot's worktree, write the prompt outside it, run the agent, check for exactly one commit,
//! verify, and send the result with the commit's bundle. Stops at once when cancelled.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use pipeline_proto::v1 as pb;
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::agent::{self, AgentJob, AgentResult};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::git::{Found, Mirror};
use crate::logship::RunLog;
use pipeline_core::ids::CommitId;
use pipeline_core::process::Stream;
use pipeline_core::verify::{self, Verdict};

/// Bundle chunks sent to the server.
const CHUNK_BYTES: usize = 256 * 1024;

/// What every job shares.
pub struct JobContext {
    pub config: Config,
    pub mirror: Mirror,
    pub work_dir: PathBuf,
    pub client: crate::client::Client,
    /// The runner's current ID (it changes when the runner registers again).
    pub runner_id: Arc<RwLock<String>>,
}

impl JobContext {
    pub fn runner_id(&self) -> String {
        self.runner_id
            .read()
            .map(|id| id.clone())
            .unwrap_or_default()
    }
}

/// How a job ended, for the session.
#[derive(Debug, PartialEq, Eq)]
pub enum JobEnd {
    /// The server took the result.
    Delivered,
    /// The server no longer wants it (lease gone, commit refused): nothing more to do.
    Refused(String),
    /// Stopped before a result.
    Cancelled,
    /// The runner could not do the work (a missing program, a git or disk error: not the
    /// task's fault): give the lease back, uncharged, saying why.
    Infra(String),
}

/// The result of the dev and verify steps, ready to send.
struct Report {
    outcome: pb::LeaseOutcome,
    error: Option<String>,
    cost_cents: f64,
    commit: Option<String>,
    verify_skipped: Option<String>,
    dev_finished_at_ms: i64,
    bundle: Option<PathBuf>,
}

fn pb_stream(stream: Stream) -> pb::LogStream {
    match stream {
        Stream::Stdout => pb::LogStream::Stdout,
        Stream::Stderr => pb::LogStream::Stderr,
    }
}

fn lease_pb(a: &pb::Assignment) -> Option<pb::LeaseRef> {
    a.lease.clone()
}

/// Runs one assignment in worktree `slot`.
pub async fn run(
    ctx: Arc<JobContext>,
    a: pb::Assignment,
    slot: usize,
    cancel: CancellationToken,
) -> JobEnd {
    let started = Instant::now();
    let task = a.task_id.clone();
    let log = match &a.lease {
        Some(lease) => RunLog::start(
            ctx.client.clone(),
            Arc::clone(&ctx.runner_id),
            lease.clone(),
        ),
        None => return JobEnd::Refused("the assignment names no lease".to_owned()),
    };
    let end = match develop(&ctx, &a, slot, &cancel, &log).await {
        Ok(report) => {
            // The run's last line says how it ended.
            let last = match (&report.outcome, &report.error) {
                (pb::LeaseOutcome::Verified, _) => "sending the result".to_owned(),
                (_, Some(why)) => format!(
                    "sending the result: {}",
                    why.lines().next().unwrap_or_default()
                ),
                (_, None) => "sending the result".to_owned(),
            };
            let phase = if report.outcome == pb::LeaseOutcome::DevFailed {
                pb::RunPhase::Dev
            } else {
                pb::RunPhase::Verify
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
        Err(end @ JobEnd::Infra(_)) => {
            // The reason reaches the run's log before the lease is given back.
            tokio::select! {
                () = log.flush() => {}
                () = cancel.cancelled() => {}
            }
            end
        }
        Err(end) => end,
    };
    if matches!(end, JobEnd::Cancelled | JobEnd::Refused(_)) {
        // Leave nothing of the abandoned work behind.
        let worktree = Mirror::worktree(&ctx.work_dir, slot);
        if worktree.exists()
            && let Ok(base) = CommitId::parse(&a.base_commit)
        {
            match ctx.mirror.prepare_worktree(&worktree, &base).await {
                Ok(()) => tracing::info!(task, "worktree cleaned"),
                Err(e) => tracing::warn!(task, error = %e, "cannot clean the worktree"),
            }
        }
    }
    tracing::info!(task, run = %a.run_id, ?end, secs = started.elapsed().as_secs_f64(), "job over");
    end
}

async fn develop(
    ctx: &JobContext,
    a: &pb::Assignment,
    slot: usize,
    cancel: &CancellationToken,
    log: &RunLog,
) -> Result<Report, JobEnd> {
    let dev = pb::RunPhase::Dev;
    let task = a.task_id.as_str();
    let base = CommitId::parse(&a.base_commit)
        .map_err(|e| JobEnd::Infra(format!("the assignment's base is invalid: {e}")))?;
    let previous = match &a.previous_commit {
        Some(p) => Some(
            CommitId::parse(p)
                .map_err(|e| JobEnd::Infra(format!("the assignment's patchset is invalid: {e}")))?,
        ),
        None => None,
    };
    tracing::info!(task, run = %a.run_id, patchset = a.patchset, "leased");
    log.note(
        dev,
        &format!("leased {task} (run {}, patchset {})", a.run_id, a.patchset),
    );

    fetch_base(ctx, a, &base, previous.as_ref(), cancel).await?;
    let worktree = Mirror::worktree(&ctx.work_dir, slot);
    let start = previous.as_ref().unwrap_or(&base);
    ctx.mirror
        .prepare_worktree(&worktree, start)
        .await
        .map_err(|e| JobEnd::Infra(format!("cannot prepare the worktree: {e}")))?;
    tracing::info!(task, worktree = %worktree.display(), "worktree ready");
    log.note(dev, &format!("worktree ready at {start}"));

    let prompts = ctx.work_dir.join("prompts");
    std::fs::create_dir_all(&prompts)
        .map_err(|e| JobEnd::Infra(format!("cannot create {}: {e}", prompts.display())))?;
    let prompt_file = prompts.join(format!("{}.md", a.run_id));
    let cost_file = prompts.join(format!("{}.cost", a.run_id));
    let _ = std::fs::remove_file(&cost_file);
    std::fs::write(&prompt_file, &a.prompt)
        .map_err(|e| JobEnd::Infra(format!("cannot write the prompt: {e}")))?;
    let mut env = ctx.config.agent.child_env();
    env.extend([
        ("PIPELINE_TASK_ID".to_owned(), a.task_id.clone()),
        ("PIPELINE_RUN_ID".to_owned(), a.run_id.clone()),
        (
            "PIPELINE_PROMPT_FILE".to_owned(),
            prompt_file.display().to_string(),
        ),
        ("PIPELINE_BASE".to_owned(), a.base.clone()),
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
    let job = AgentJob {
        run_id: a.run_id.clone(),
        worktree: worktree.clone(),
        prompt_file: prompt_file.clone(),
        cost_file: cost_file.clone(),
        env: env.clone(),
    };
    let agent_started = Instant::now();
    log.note(dev, "starting the agent");
    let on_line = |stream: Stream, line: &str| log.line(pb_stream(stream), dev, line);
    let result = agent::run(&ctx.config.agent, &job, cancel, on_line).await;
    let _ = std::fs::remove_file(&prompt_file);
    let _ = std::fs::remove_file(&cost_file);
    let dev_finished_at_ms = crate::now_ms();
    let cost_cents = match result {
        AgentResult::Cancelled => return Err(JobEnd::Cancelled),
        AgentResult::Infra { reason } => {
            log.note(
                dev,
                &format!("infrastructure failure (not the task's): {reason}"),
            );
            return Err(JobEnd::Infra(reason));
        }
        AgentResult::Failed { reason, cost_cents } => {
            let secs = agent_started.elapsed().as_secs_f64();
            tracing::info!(task, "agent failed after {secs:.1} s");
            log.note(dev, &format!("agent failed after {secs:.1} s"));
            return Ok(Report::dev_failed(reason, cost_cents, dev_finished_at_ms));
        }
        AgentResult::Completed { cost_cents } => cost_cents,
    };
    let secs = agent_started.elapsed().as_secs_f64();
    tracing::info!(task, "agent exited 0 after {secs:.1} s");
    log.note(dev, &format!("agent exited 0 after {secs:.1} s"));
    let commit = match ctx
        .mirror
        .one_commit(&worktree, &base, previous.as_ref())
        .await
    {
        Ok(c) => c,
        Err(Found::Wrong(reason)) => {
            log.note(dev, &reason);
            return Ok(Report::dev_failed(reason, cost_cents, dev_finished_at_ms));
        }
        Err(Found::GitFailed(reason)) => {
            log.note(
                dev,
                &format!("infrastructure failure (not the task's): {reason}"),
            );
            return Err(JobEnd::Infra(reason));
        }
    };
    let check = pb::RunPhase::Verify;
    log.note(check, &format!("verifying {commit}"));
    let verdict = verify::verify(
        &ctx.config.verify.verifier(),
        &worktree,
        a.namespace.as_deref(),
        &env,
        ctx.config.agent.kill_grace(),
        cancel,
        |stream, line| log.line(pb_stream(stream), check, line),
    )
    .await;
    let (outcome, error, verify_skipped) = match verdict {
        Verdict::Cancelled => return Err(JobEnd::Cancelled),
        Verdict::Infra(reason) => {
            log.note(
                check,
                &format!("infrastructure failure (not the task's): {reason}"),
            );
            return Err(JobEnd::Infra(reason));
        }
        Verdict::Pass => (pb::LeaseOutcome::Verified, None, None),
        Verdict::Skipped(why) => (pb::LeaseOutcome::Verified, None, Some(why)),
        Verdict::Fail(why) => (pb::LeaseOutcome::VerifyFailed, Some(why), None),
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
    let tmp = ctx.work_dir.join("tmp");
    std::fs::create_dir_all(&tmp)
        .map_err(|e| JobEnd::Infra(format!("cannot create {}: {e}", tmp.display())))?;
    let bundle = tmp.join(format!("{}.out.bundle", a.run_id));
    ctx.mirror
        .bundle_head(&worktree, &base, &bundle)
        .await
        .map_err(|e| JobEnd::Infra(format!("cannot bundle the commit: {e}")))?;
    Ok(Report {
        outcome,
        error,
        cost_cents,
        commit: Some(commit.to_string()),
        verify_skipped,
        dev_finished_at_ms,
        bundle: Some(bundle),
    })
}

impl Report {
    fn dev_failed(reason: String, cost_cents: f64, at: i64) -> Self {
        Self {
            outcome: pb::LeaseOutcome::DevFailed,
            error: Some(reason),
            cost_cents,
            commit: None,
            verify_skipped: None,
            dev_finished_at_ms: at,
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

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::NotFound
    )
}

/// Fetches what the mirror lacks of the base (and the previous patchset).
async fn fetch_base(
    ctx: &JobContext,
    a: &pb::Assignment,
    base: &CommitId,
    previous: Option<&CommitId>,
    cancel: &CancellationToken,
) -> Result<(), JobEnd> {
    let wanted: Vec<CommitId> = std::iter::once(base).chain(previous).cloned().collect();
    if wanted.iter().all(|c| ctx.mirror.keeps(c)) {
        tracing::info!(task = %a.task_id, "base already in the mirror; nothing fetched");
        return Ok(());
    }
    let tmp = ctx.work_dir.join("tmp");
    std::fs::create_dir_all(&tmp)
        .map_err(|e| JobEnd::Infra(format!("cannot create {}: {e}", tmp.display())))?;
    let file = tmp.join(format!("{}.base.bundle", a.run_id));
    let (mut attempt, mut backoff) = (0, Backoff::new());
    loop {
        if cancel.is_cancelled() {
            return Err(JobEnd::Cancelled);
        }
        match fetch_once(ctx, a, &file).await {
            Ok((chunks, bytes)) => {
                tracing::info!(task = %a.task_id, bytes, "fetched the base's missing objects");
                let mut heads = Vec::new();
                if chunks > 0 {
                    let stored = ctx.mirror.unbundle(&file).await;
                    let _ = std::fs::remove_file(&file);
                    heads =
                        stored.map_err(|e| JobEnd::Infra(format!("cannot store the base: {e}")))?;
                }
                // What the bundle did not bring the mirror must have had (the server left it
                // out): check that with git.
                for c in &wanted {
                    if !heads.iter().any(|h| h == c)
                        && !ctx.mirror.keeps(c)
                        && !ctx.mirror.has_commit(c).await
                    {
                        return Err(JobEnd::Infra(format!("the server's bundle lacks {c}")));
                    }
                }
                ctx.mirror.remember(&wanted).await;
                return Ok(());
            }
            Err(status) if status.code() == Code::FailedPrecondition => {
                return Err(JobEnd::Refused(status.message().to_owned()));
            }
            Err(status) if retryable(status.code()) && attempt < 20 => {
                tracing::warn!(task = %a.task_id, error = %status.message(), "fetching the base failed; retrying");
                attempt += 1;
                if !pause(&mut backoff, cancel).await {
                    return Err(JobEnd::Cancelled);
                }
            }
            Err(status) => {
                return Err(JobEnd::Infra(format!(
                    "cannot fetch the base: {}",
                    status.message()
                )));
            }
        }
    }
}

/// Fetches the bundle into `file`; returns (chunks, bytes).
async fn fetch_once(
    ctx: &JobContext,
    a: &pb::Assignment,
    file: &Path,
) -> Result<(usize, usize), tonic::Status> {
    let have = ctx.mirror.haves().iter().map(CommitId::to_string).collect();
    let mut client = ctx.client.clone();
    let mut stream = client
        .fetch_base(pb::FetchBaseRequest {
            runner_id: ctx.runner_id(),
            lease: lease_pb(a),
            have,
        })
        .await?
        .into_inner();
    let mut out = tokio::fs::File::create(file)
        .await
        .map_err(|e| tonic::Status::internal(format!("cannot write {}: {e}", file.display())))?;
    let (mut chunks, mut bytes) = (0, 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        bytes += chunk.data.len();
        out.write_all(&chunk.data)
            .await
            .map_err(|e| tonic::Status::internal(format!("cannot write the bundle: {e}")))?;
        chunks += 1;
    }
    out.flush()
        .await
        .map_err(|e| tonic::Status::internal(format!("cannot write the bundle: {e}")))?;
    Ok((chunks, bytes))
}

/// Sends the report, retrying while the server is away; the lease's fence makes a repeat
/// harmless (a second delivery is refused as a dead lease).
async fn deliver(
    ctx: &JobContext,
    a: &pb::Assignment,
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
        let header = pb::CompleteLeaseHeader {
            runner_id: ctx.runner_id(),
            lease: lease_pb(a),
            outcome: r.outcome.into(),
            error: r.error.clone(),
            cost_cents: r.cost_cents,
            commit: r.commit.clone(),
            verify_skipped: r.verify_skipped.clone(),
            dev_finished_at_ms: r.dev_finished_at_ms,
        };
        let mut messages = vec![pb::CompleteLeaseRequest {
            kind: Some(pb::complete_lease_request::Kind::Header(header)),
        }];
        if let Some(bytes) = &bundle {
            let mut at = 0;
            while at < bytes.len() {
                let end = (at + CHUNK_BYTES).min(bytes.len());
                messages.push(pb::CompleteLeaseRequest {
                    kind: Some(pb::complete_lease_request::Kind::Chunk(pb::BundleChunk {
                        data: bytes.slice(at..end),
                    })),
                });
                at = end;
            }
        }
        let mut client = ctx.client.clone();
        let sent = tokio::select! {
            sent = client.complete_lease(tokio_stream::iter(messages)) => sent,
            () = cancel.cancelled() => return JobEnd::Cancelled,
        };
        match sent {
            Ok(resp) => {
                let status = resp.into_inner().status;
                tracing::info!(task = %a.task_id, status, "result delivered");
                return JobEnd::Delivered;
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::FailedPrecondition | Code::InvalidArgument | Code::ResourceExhausted
                ) =>
            {
                tracing::warn!(task = %a.task_id, error = %s.message(), "the server refused the result");
                return JobEnd::Refused(s.message().to_owned());
            }
            Err(s) => {
                attempt += 1;
                tracing::warn!(task = %a.task_id, error = %s.message(), attempt, "delivering the result failed; retrying");
                if !pause(&mut backoff, cancel).await {
                    return JobEnd::Cancelled;
                }
            }
        }
    }
}
