//! Running the agent, in one of the modes of `CONTRACT.md`:
//!
//! - `command`: `sh -c CMD` in the worktree with the `PIPELINE_*` variables; exit 0 means
//!   completed; the cost, if any, is read from `PIPELINE_COST_FILE`.
//! - `agentd`: `agentd run PROMPT -n RUN_ID --timeout … --max-iter … --max-cost … [-p P]`
//!   starts a background run; `agentd status RUN_ID --json` is asked until it says `completed`,
//!   `failed` or `timeout`. agentd offers nothing to wait on, so this is the one place the
//!   runner polls: from 200 ms, doubling to 5 s.
//! - The presets for the agents teams run: [`claude`] (Claude Code), [`codex`] (Codex CLI) and
//!   [`aider`], each with its non-interactive invocation, its output read for a readable log,
//!   its ending classified and its usage (tokens, cents) recorded; [`prices`] estimates the
//!   cost of agents that report only tokens.
//!
//! Either way the time limit is enforced here too, and the usage is recorded.

pub mod aider;
pub mod claude;
pub mod codex;
pub mod prices;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentArgs, AgentMode};
use crate::domain::Channel;
use crate::usage::{CostSource, Usage};
use pipeline_core::process::{self, Finished, Spec, Stream, could_not_run, with_tail};

pub use prices::Prices;

/// What the agent needs to know about its run.
#[derive(Clone, Debug)]
pub struct AgentJob {
    pub run_id: String,
    pub worktree: PathBuf,
    pub prompt_file: PathBuf,
    /// The prompt itself (the presets give it on stdin).
    pub prompt: String,
    pub cost_file: PathBuf,
    /// The whole environment: the allowed variables and the `PIPELINE_*` ones.
    pub env: Vec<(String, String)>,
    /// What the task may still spend, in cents; `None`: no cap.
    pub budget_cents: Option<f64>,
    /// The agent's session of the previous attempt, to resume.
    pub resume_session: Option<String>,
    pub prices: Arc<Prices>,
    /// What the agent may reach; `None`: no sandbox.
    pub sandbox: Option<pipeline_core::sandbox::Policy>,
}

#[cfg(test)]
impl AgentJob {
    pub fn for_tests() -> Self {
        Self {
            run_id: "dev-t-1-1".into(),
            worktree: std::env::temp_dir(),
            prompt_file: std::env::temp_dir().join("prompt.md"),
            prompt: "do it".into(),
            cost_file: std::env::temp_dir().join("cost"),
            env: vec![],
            budget_cents: None,
            resume_session: None,
            prices: Arc::new(Prices::default()),
            sandbox: None,
        }
    }
}

/// How the agent's run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentResult {
    Completed {
        usage: Usage,
    },
    /// The agent ran and failed: the task's attempt.
    Failed {
        reason: String,
        usage: Usage,
    },
    /// The agent could not do its work for the machine's reasons (a missing program, an exec
    /// failure, no credentials, no network): the runner's fault, not the task's. `unhealthy`:
    /// the next task would fail the same way, so the runner takes no more work at once.
    Infra {
        reason: String,
        unhealthy: bool,
    },
    /// The agent's provider refused more work for now: not the task's fault; the runner takes
    /// no new work until `until_ms` (when known).
    RateLimited {
        reason: String,
        until_ms: Option<i64>,
        usage: Usage,
    },
    Cancelled,
}

/// `text` on one line, at most 300 characters: newlines shown as ⏎.
pub fn one_line(text: &str) -> String {
    let flat = text.trim().replace('\n', " ⏎ ");
    if flat.chars().count() > 300 {
        let cut: String = flat.chars().take(300).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

/// The usage of an agent that reports only a cost (agentd, command).
fn cost_only(mode: AgentMode, cost_cents: f64) -> Usage {
    let mut u = Usage::new(mode.word());
    u.cost_cents = cost_cents;
    u.cost_source = if cost_cents > 0.0 {
        CostSource::Reported
    } else {
        CostSource::None
    };
    u.complete = true;
    u
}

/// Runs the agent for `job`.
pub async fn run(
    args: &AgentArgs,
    job: &AgentJob,
    cancel: &CancellationToken,
    mut on_line: impl FnMut(Channel, &str),
) -> AgentResult {
    let as_is = |s: Stream, line: &str| on_line(Channel::from(s), line);
    match args.mode() {
        AgentMode::Command => run_command(args, job, cancel, as_is).await,
        AgentMode::Agentd => run_agentd(args, job, cancel, as_is).await,
        AgentMode::Aider => aider::run(args, job, cancel, as_is).await,
        AgentMode::Claude => claude::run(args, job, cancel, on_line).await,
        AgentMode::Codex => codex::run(args, job, cancel, on_line).await,
    }
}

/// The cost the agent wrote in its cost file: a number alone, in a small regular file (the
/// agent made the file: a link or a pipe in its place is not followed).
fn read_cost(file: &std::path::Path) -> f64 {
    std::fs::symlink_metadata(file)
        .ok()
        .filter(|m| m.is_file() && m.len() < 1024)
        .and_then(|_| std::fs::read_to_string(file).ok())
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
            unhealthy: true,
        };
    };
    let spec = Spec {
        env: job.env.clone(),
        clear_env: true,
        timeout: Some(Duration::from_secs(args.timeout)),
        kill_grace: args.kill_grace(),
        sandbox: job.sandbox.clone(),
        ..Spec::shell(cmd, job.worktree.clone())
    };
    let what = format!("the agent command (sh -c {cmd})");
    let finished = match ran(process::run(&spec, cancel, on_line).await, &what) {
        Ok(f) => f,
        Err(end) => return *end,
    };
    let usage = cost_only(AgentMode::Command, read_cost(&job.cost_file));
    if finished.success() {
        return AgentResult::Completed { usage };
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
            unhealthy: false,
        };
    }
    let reason = if finished.timed_out {
        format!("the agent timed out after {} s", args.timeout)
    } else {
        format!("the agent failed ({})", finished.describe())
    };
    AgentResult::Failed {
        reason: with_tail(reason, &finished.tail),
        usage,
    }
}

/// An agent's process as it ended, or how its job ends without one: the runner's failure
/// when `what` could not be started, cancelled when the job was.
fn ran(finished: std::io::Result<Finished>, what: &str) -> Result<Finished, Box<AgentResult>> {
    let finished = finished.map_err(|e| AgentResult::Infra {
        reason: format!("cannot start {what}: {e}"),
        unhealthy: false,
    })?;
    if finished.cancelled {
        return Err(Box::new(AgentResult::Cancelled));
    }
    Ok(finished)
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
        env: job.env.clone(),
        clear_env: true,
        timeout: Some(Duration::from_secs(60)),
        kill_grace: args.kill_grace(),
        sandbox: job.sandbox.clone(),
        ..Spec::program("agentd", args_, job.worktree.clone())
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
                unhealthy: false,
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
            unhealthy: false,
        };
    }
    if !started.success() {
        return AgentResult::Failed {
            reason: with_tail(
                format!("agentd run failed to start ({})", started.describe()),
                &started.tail,
            ),
            usage: cost_only(AgentMode::Agentd, 0.0),
        };
    }
    // What `agentd run` left in the background (a run of its own) lives while this waits for
    // it, and no longer: its guard kills it when this returns, or when the runner dies.
    let _background = started.leftover;
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
                    let usage = cost_only(
                        AgentMode::Agentd,
                        s.cost_cents
                            .filter(|c| c.is_finite() && *c >= 0.0)
                            .unwrap_or(0.0),
                    );
                    match s.status.as_str() {
                        "running" => {}
                        "completed" => return AgentResult::Completed { usage },
                        "failed" => {
                            return AgentResult::Failed {
                                reason: format!(
                                    "the agent failed: {}",
                                    s.error
                                        .unwrap_or_else(|| "agentd gave no reason".to_owned())
                                ),
                                usage,
                            };
                        }
                        "timeout" => {
                            return AgentResult::Failed {
                                reason: format!("the agent timed out after {} s", args.timeout),
                                usage,
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
                usage: cost_only(AgentMode::Agentd, 0.0),
            };
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = cancel.cancelled() => return AgentResult::Cancelled,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
