//! Running the agent, in one of the two modes of `CONTRACT.md`:
//!
//! - `command`: `sh -c CMD` in the worktree with the `PIPELINE_*` variables; exit 0 means
//!   completed; the cost, if any, is read from `PIPELINE_COST_FILE`.
//! - `agentd`: `agentd run PROMPT -n RUN_ID --timeout … --max-iter … --max-cost … [-p P]`
//!   starts a background run; `agentd status RUN_ID --json` is asked until it says `completed`,
//!   `failed` or `timeout`. agentd offers nothing to wait on, so this is the one place the
//!   runner polls: from 200 ms, doubling to 5 s.
//!
//! Either way the time limit is enforced here too, and the cost is recorded.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentArgs, AgentMode};
use pipeline_core::process::{self, Spec, Stream, could_not_run, with_tail};

/// What the agent needs to know about its run.
#[derive(Clone, Debug)]
pub struct AgentJob {
    pub run_id: String,
    pub worktree: PathBuf,
    pub prompt_file: PathBuf,
    pub cost_file: PathBuf,
    /// The whole environment: the allowed variables and the `PIPELINE_*` ones.
    pub env: Vec<(String, String)>,
}

/// How the agent's run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentResult {
    Completed {
        cost_cents: f64,
    },
    /// The agent ran and failed: the task's attempt.
    Failed {
        reason: String,
        cost_cents: f64,
    },
    /// The agent could not be run at all (a missing program, an exec failure): the runner's
    /// fault, not the task's.
    Infra {
        reason: String,
    },
    Cancelled,
}

/// Runs the agent for `job`.
pub async fn run(
    args: &AgentArgs,
    job: &AgentJob,
    cancel: &CancellationToken,
    on_line: impl FnMut(Stream, &str),
) -> AgentResult {
    match args.mode() {
        AgentMode::Command => run_command(args, job, cancel, on_line).await,
        AgentMode::Agentd => run_agentd(args, job, cancel, on_line).await,
    }
}

fn read_cost(file: &std::path::Path) -> f64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|c| c.is_finite() && *c >= 0.0)
        .unwrap_or(0.0)
}

async fn run_command(
    args: &AgentArgs,
    job: &AgentJob,
    cancel: &CancellationToken,
    on_line: impl FnMut(Stream, &str),
) -> AgentResult {
    let Some(cmd) = &args.agent_cmd else {
        return AgentResult::Infra {
            reason: "--agent command needs --agent-cmd".to_owned(),
        };
    };
    let spec = Spec {
        env: job.env.clone(),
        clear_env: true,
        timeout: Some(Duration::from_secs(args.timeout)),
        kill_grace: args.kill_grace(),
        ..Spec::shell(cmd, job.worktree.clone())
    };
    let finished = match process::run(&spec, cancel, on_line).await {
        Ok(f) => f,
        Err(e) => {
            return AgentResult::Infra {
                reason: format!("cannot start the agent command (sh -c {cmd}): {e}"),
            };
        }
    };
    let cost_cents = read_cost(&job.cost_file);
    if finished.cancelled {
        return AgentResult::Cancelled;
    }
    if finished.success() {
        return AgentResult::Completed { cost_cents };
    }
    if could_not_run(finished.code()) {
        return AgentResult::Infra {
            reason: with_tail(
                format!(
                    "the agent command could not be run ({}): {cmd}",
                    finished.describe()
                ),
                &finished.tail,
            ),
        };
    }
    let reason = if finished.timed_out {
        format!("the agent timed out after {} s", args.timeout)
    } else {
        format!("the agent failed ({})", finished.describe())
    };
    AgentResult::Failed {
        reason: with_tail(reason, &finished.tail),
        cost_cents,
    }
}

/// `agentd status --json`.
#[derive(Debug, Deserialize)]
struct AgentdStatus {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    cost_cents: Option<f64>,
}

async fn run_agentd(
    args: &AgentArgs,
    job: &AgentJob,
    cancel: &CancellationToken,
    mut on_line: impl FnMut(Stream, &str),
) -> AgentResult {
    let mut start_args: Vec<String> = vec![
        "run".into(),
        job.prompt_file.display().to_string(),
        "-n".into(),
        job.run_id.clone(),
        "--timeout".into(),
        args.timeout.to_string(),
        "--max-iter".into(),
        args.max_iter.to_string(),
        "--max-cost".into(),
        args.max_cost.to_string(),
    ];
    if let Some(p) = &args.provider {
        start_args.extend(["-p".to_owned(), p.clone()]);
    }
    let spec = |args_: Vec<String>| Spec {
        program: "agentd".into(),
        args: args_.into_iter().map(Into::into).collect(),
        cwd: job.worktree.clone(),
        env: job.env.clone(),
        clear_env: true,
        timeout: Some(Duration::from_secs(60)),
        kill_grace: args.kill_grace(),
        reap_group: true,
    };
    // `agentd run` starts the run in the background: what it leaves behind must live on.
    let start = Spec {
        reap_group: false,
        ..spec(start_args)
    };
    let started = match process::run(&start, cancel, &mut on_line).await {
        Ok(f) => f,
        Err(e) => {
            return AgentResult::Infra {
                reason: format!("cannot run agentd: {e}"),
            };
        }
    };
    if started.cancelled {
        return AgentResult::Cancelled;
    }
    if could_not_run(started.code()) {
        return AgentResult::Infra {
            reason: with_tail(
                format!("agentd could not be run ({})", started.describe()),
                &started.tail,
            ),
        };
    }
    if !started.success() {
        return AgentResult::Failed {
            reason: with_tail(
                format!("agentd run failed to start ({})", started.describe()),
                &started.tail,
            ),
            cost_cents: 0.0,
        };
    }
    let limit = Duration::from_secs(args.timeout) + Duration::from_secs(30);
    let begun = Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        let status_args = vec!["status".to_owned(), job.run_id.clone(), "--json".to_owned()];
        let mut out = String::new();
        let polled = process::run(&spec(status_args), cancel, |s, l| {
            if s == Stream::Stdout {
                out.push_str(l);
                out.push('\n');
            }
        })
        .await;
        if cancel.is_cancelled() {
            return AgentResult::Cancelled;
        }
        if let Ok(f) = &polled
            && f.success()
        {
            match serde_json::from_str::<AgentdStatus>(out.trim()) {
                Ok(s) => {
                    let cost_cents = s
                        .cost_cents
                        .filter(|c| c.is_finite() && *c >= 0.0)
                        .unwrap_or(0.0);
                    match s.status.as_str() {
                        "running" => {}
                        "completed" => return AgentResult::Completed { cost_cents },
                        "failed" => {
                            return AgentResult::Failed {
                                reason: format!(
                                    "the agent failed: {}",
                                    s.error
                                        .unwrap_or_else(|| "agentd gave no reason".to_owned())
                                ),
                                cost_cents,
                            };
                        }
                        "timeout" => {
                            return AgentResult::Failed {
                                reason: format!("the agent timed out after {} s", args.timeout),
                                cost_cents,
                            };
                        }
                        other => {
                            tracing::warn!(run = %job.run_id, status = other, "agentd reported an unknown status")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(run = %job.run_id, error = %e, "agentd status printed invalid JSON")
                }
            }
        }
        if begun.elapsed() > limit {
            return AgentResult::Failed {
                reason: format!(
                    "agentd run {} did not finish within {} s",
                    job.run_id,
                    limit.as_secs()
                ),
                cost_cents: 0.0,
            };
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = cancel.cancelled() => return AgentResult::Cancelled,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
