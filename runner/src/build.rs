//! One build job (`--remote-builds` on the server): check that the server's verification can
//! run here, fetch the commit (only the objects the mirror lacks), put a build worktree of its
//! own on it, clean, run the verification there in the sandbox, its lines to the server as a
//! lease's go, and say green or red under the verification's digest. What is not the commit's
//! fault (a missing program, a git or disk error) is said as an infrastructure failure: the
//! server builds it elsewhere and charges nobody. A cancelled job (the server took it back,
//! the link broke) answers nothing.

use std::sync::Arc;
use std::time::Instant;

use pipeline_core::verify::{self, Verdict};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::domain::{BuildJob, BuildOutcome, CallError, Channel, Phase};
use crate::job::{FetchEnd, JobContext, fresh_dir};
use crate::logship::RunLog;

/// Runs build job `job` in build worktree `n`; returns what it told the server (`None`:
/// cancelled, or refused by the server).
pub async fn run(
    ctx: Arc<JobContext>,
    job: BuildJob,
    n: usize,
    cancel: CancellationToken,
) -> Option<BuildOutcome> {
    let started = Instant::now();
    let log = RunLog::start(ctx.client.clone(), ctx.runner.clone(), job.build.clone());
    let outcome = tokio::select! {
        outcome = build(&ctx, &job, n, &cancel, &log) => outcome,
        () = cancel.cancelled() => None,
    };
    let Some(outcome) = outcome else {
        tracing::info!(build = %job.build.id, "build job stopped");
        return None;
    };
    log.note(
        Phase::Verify,
        &match &outcome {
            BuildOutcome::Green { .. } => "build green".to_owned(),
            BuildOutcome::Red { why, .. } => {
                format!("build red: {}", why.lines().next().unwrap_or_default())
            }
            BuildOutcome::Infra(why) => format!("could not build (not the commit's fault): {why}"),
        },
    );
    tokio::select! {
        () = log.flush() => {}
        () = cancel.cancelled() => return None,
    }
    let delivered = deliver(&ctx, &job, &outcome, &cancel).await;
    tracing::info!(
        build = %job.build.id,
        commit = %job.commit,
        ?outcome,
        delivered,
        secs = started.elapsed().as_secs_f64(),
        "build job over"
    );
    delivered.then_some(outcome)
}

async fn build(
    ctx: &JobContext,
    job: &BuildJob,
    n: usize,
    cancel: &CancellationToken,
    log: &RunLog,
) -> Option<BuildOutcome> {
    let phase = Phase::Verify;
    let infra = |why: String| Some(BuildOutcome::Infra(why));
    log.note(
        phase,
        &format!("building {} (build job {})", job.commit, job.build.id),
    );
    let Some(verifier) = job.verification.clone() else {
        return infra("the server's verification is of a kind this runner does not know".into());
    };
    let path = std::env::var("PATH").unwrap_or_default();
    if job
        .runs
        .iter()
        .any(|(ns, _)| verifier.applies_to(ns.as_deref()))
        && let Err(missing) = crate::preflight::check_verifier(&verifier, &path)
    {
        return infra(format!(
            "the server's verification cannot run on this runner: {missing}"
        ));
    }
    if let Err(why) = fetch(ctx, job, cancel).await? {
        return infra(why);
    }
    let tree = ctx.mirror.build_tree(&ctx.work_dir, n);
    if let Err(e) = ctx.mirror.prepare_worktree(&tree, &job.commit).await {
        return infra(format!("cannot prepare the build worktree: {e}"));
    }
    let private = ctx
        .work_dir
        .join("private")
        .join(format!("build-{n}"))
        .join("tmp");
    if let Err(why) = fresh_dir(&private) {
        return infra(why);
    }
    let mut own = ctx.own_rules(&tree, &private);
    if verifier == ctx.config.verify.verifier() {
        own.named_in_all(verifier.commands());
    }
    let sandbox = ctx.sandbox.policy(&own);
    for (namespace, task) in &job.runs {
        let mut env = ctx.child_env(&private);
        if let Some(task) = task {
            env.push(("PIPELINE_TASK_ID".to_owned(), task.to_string()));
        }
        env.extend([
            ("PIPELINE_BASE".to_owned(), job.base_branch.clone()),
            ("PIPELINE_BASE_COMMIT".to_owned(), job.base.to_string()),
        ]);
        let verdict = verify::verify(
            &verifier,
            &verify::Build {
                dir: &tree.path,
                namespace: namespace.as_deref(),
                env: &env,
                kill_grace: ctx.config.agent.kill_grace(),
                sandbox: sandbox.as_ref(),
            },
            cancel,
            |stream, line| log.line(Channel::from(stream), phase, line),
        )
        .await;
        match verdict {
            Verdict::Pass | Verdict::Skipped(_) => {}
            Verdict::Fail(why) => {
                return Some(BuildOutcome::Red {
                    why,
                    digest: verifier.digest(),
                });
            }
            Verdict::Cancelled => return None,
            Verdict::Infra(why) => return infra(why),
        }
    }
    Some(BuildOutcome::Green {
        digest: verifier.digest(),
    })
}

/// Fetches what the mirror lacks of the job's commit. `None`: cancelled or refused;
/// `Some(Err)`: the runner's trouble.
async fn fetch(
    ctx: &JobContext,
    job: &BuildJob,
    cancel: &CancellationToken,
) -> Option<Result<(), String>> {
    if ctx.mirror.has_commit(&job.commit).await {
        return Some(Ok(()));
    }
    let call = || async {
        let runner = ctx.runner.get()?;
        ctx.client
            .fetch_build(&runner, &job.build, &ctx.mirror.haves())
            .await
    };
    let name = format!("{}.build.bundle", job.build.id);
    let fetched = match ctx
        .fetch_bundle("the build's commit", &name, cancel, call)
        .await
    {
        Ok(fetched) => fetched,
        Err(FetchEnd::Cancelled) => return None,
        Err(FetchEnd::Refused(why)) => {
            tracing::warn!(build = %job.build.id, "the server took the build job back: {why}");
            return None;
        }
        Err(FetchEnd::Infra(why)) => return Some(Err(why)),
    };
    if fetched.chunks > 0 {
        let stored = ctx.mirror.unbundle(&fetched.file).await;
        let _ = std::fs::remove_file(&fetched.file);
        if let Err(e) = stored {
            return Some(Err(format!("cannot store the build's commit: {e}")));
        }
    }
    if !ctx.mirror.has_commit(&job.commit).await {
        return Some(Err(format!("the server's bundle lacks {}", job.commit)));
    }
    Some(Ok(()))
}

/// Sends the outcome, retrying while the server is away; false when it was refused (the job
/// is no longer this runner's) or cancelled.
async fn deliver(
    ctx: &JobContext,
    job: &BuildJob,
    outcome: &BuildOutcome,
    cancel: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::new();
    for attempt in 0..20 {
        let send = async {
            let runner = ctx.runner.get()?;
            ctx.client
                .complete_build(&runner, &job.build, outcome)
                .await
        };
        let sent = tokio::select! {
            sent = send => sent,
            () = cancel.cancelled() => return false,
        };
        match sent {
            Ok(()) => return true,
            Err(CallError::Refused { why, .. }) => {
                tracing::warn!(build = %job.build.id, "the server refused the build's result: {why}");
                return false;
            }
            Err(e) => {
                tracing::warn!(build = %job.build.id, error = %e, attempt, "delivering the build's result failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff.next()) => {}
                    () = cancel.cancelled() => return false,
                }
            }
        }
    }
    false
}
