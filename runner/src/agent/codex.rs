//! OpenAI Codex CLI: `codex exec --json --sandbox workspace-write -`, the prompt on stdin.
//!
//! Its JSONL events are read as they come ([`CodexStream`], pure): `item.completed` items
//! (agent messages, commands with their exit codes, file changes) become readable log lines;
//! `turn.completed.usage` gives the thread's tokens so far (cumulative: the last one is the
//! total; cached input is part of input, reasoning part of output); `turn.failed` and `error`
//! say what went wrong. Codex reports tokens, not money: the cost is estimated from the price
//! table, and since Codex has no spending cap of its own, the runner stops it once the estimate
//! passes the task's remaining budget. Without its API (no network) Codex prints
//! `Reconnecting…` errors and waits for ever: after a bounded number of them without progress
//! the run is stopped as the machine's failure, not the task's.

use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{AgentJob, AgentResult, one_line};
use crate::config::AgentArgs;
use crate::domain::Channel;
use crate::usage::{CostSource, Usage};
use pipeline_core::process::{self, Spec, Stream, with_tail};

/// `error` events in a row, with no progress between them, after which Codex is given up on.
pub const MAX_RECONNECTS: u32 = 5;

pub async fn run(
    args: &AgentArgs,
    job: &AgentJob,
    cancel: &CancellationToken,
    mut on_line: impl FnMut(Channel, &str),
) -> AgentResult {
    let mut argv: Vec<String> = ["exec", "--json", "--sandbox", "workspace-write"]
        .map(str::to_owned)
        .to_vec();
    if let Some(model) = &args.model {
        argv.extend(["--model".to_owned(), model.clone()]);
    }
    // A retry continues the thread of the previous attempt (the feedback is its new message).
    if let Some(thread) = &job.resume_session {
        argv.extend(["resume".to_owned(), thread.clone()]);
    }
    argv.push("-".to_owned());
    let finish = CancellationToken::new();
    let spec = Spec {
        env: job.env.clone(),
        clear_env: true,
        timeout: Some(Duration::from_secs(args.timeout)),
        kill_grace: args.kill_grace(),
        stdin: Some(job.prompt.clone().into_bytes()),
        finish: Some(finish.clone()),
        finish_grace: Duration::ZERO,
        sandbox: job.sandbox.clone(),
        ..Spec::program("codex", argv, job.worktree.clone())
    };
    let mut stream = CodexStream::new(args.model.clone(), job.budget_cents);
    let finished = process::run(&spec, cancel, |s, line| match s {
        Stream::Stdout => {
            on_line(Channel::Raw, line);
            for shown in stream.line(line, |u| job.prices.cents(u)) {
                on_line(Channel::Stdout, &shown);
            }
            if stream.stop.is_some() {
                finish.cancel();
            }
        }
        Stream::Stderr => on_line(Channel::Stderr, line),
    })
    .await;
    let finished = match super::ran(finished, "codex") {
        Ok(f) => f,
        Err(end) => return *end,
    };
    let usage = stream.usage(|u| job.prices.cents(u));
    match &stream.stop {
        Some(Stop::Budget) => {
            return AgentResult::Failed {
                reason: format!(
                    "codex was stopped: its estimated cost ({:.2} cents) passed the task's \
                     remaining budget ({:.2} cents)",
                    usage.cost_cents,
                    job.budget_cents.unwrap_or(0.0)
                ),
                usage,
            };
        }
        Some(Stop::Unreachable(words)) => {
            return AgentResult::Infra {
                reason: format!(
                    "codex cannot reach its API on this runner ({MAX_RECONNECTS} reconnects \
                     without progress): {words}"
                ),
                unhealthy: true,
            };
        }
        None => {}
    }
    if let Some(why) = &stream.failed {
        return AgentResult::Failed {
            reason: format!("codex failed: {why}"),
            usage,
        };
    }
    if finished.success() {
        return AgentResult::Completed { usage };
    }
    if process::could_not_run(finished.code()) {
        return AgentResult::Infra {
            reason: with_tail(
                format!("codex could not be run ({})", finished.describe()),
                &finished.tail,
            ),
            unhealthy: false,
        };
    }
    let reason = if finished.timed_out {
        format!("codex timed out after {} s", args.timeout)
    } else {
        format!("codex failed ({})", finished.describe())
    };
    AgentResult::Failed {
        reason: with_tail(reason, &finished.tail),
        usage,
    }
}

/// Why the runner stopped Codex.
#[derive(Clone, Debug, PartialEq)]
pub enum Stop {
    /// Its estimated cost passed the task's remaining budget.
    Budget,
    /// It kept reconnecting without progress; its last words.
    Unreachable(String),
}

/// Codex's events as read so far. Pure.
#[derive(Debug)]
pub struct CodexStream {
    model: Option<String>,
    budget_cents: Option<f64>,
    thread: Option<String>,
    /// The thread's latest cumulative usage: (input, cached input, output, reasoning).
    tokens: Option<(u64, u64, u64, u64)>,
    turns_completed: u32,
    reconnects: u32,
    pub failed: Option<String>,
    pub stop: Option<Stop>,
}

impl CodexStream {
    pub fn new(model: Option<String>, budget_cents: Option<f64>) -> Self {
        Self {
            model,
            budget_cents,
            thread: None,
            tokens: None,
            turns_completed: 0,
            reconnects: 0,
            failed: None,
            stop: None,
        }
    }

    /// Reads one line; returns what to log. `price` estimates a usage's cost in cents.
    pub fn line(&mut self, line: &str, price: impl Fn(&Usage) -> f64) -> Vec<String> {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return vec![line.to_owned()];
        };
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind != "error" {
            self.reconnects = 0;
        }
        match kind {
            "thread.started" => {
                self.thread = text(&v, "thread_id");
                vec![format!(
                    "codex started: thread {}",
                    self.thread.as_deref().unwrap_or("?")
                )]
            }
            "turn.completed" => {
                self.turns_completed += 1;
                let usage = v.get("usage").cloned().unwrap_or(Value::Null);
                let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
                self.tokens = Some((
                    n("input_tokens"),
                    n("cached_input_tokens"),
                    n("output_tokens"),
                    n("reasoning_output_tokens"),
                ));
                let u = self.usage(&price);
                if self.budget_cents.is_some_and(|b| u.cost_cents > b) {
                    self.stop = Some(Stop::Budget);
                }
                vec![format!(
                    "turn {} done: {} input ({} cached) / {} output tokens so far, ~{:.2} cents",
                    self.turns_completed,
                    u.input_tokens,
                    u.cached_input_tokens,
                    u.output_tokens,
                    u.cost_cents
                )]
            }
            "turn.failed" => {
                let why = v
                    .get("error")
                    .and_then(|e| text(e, "message"))
                    .unwrap_or_else(|| "no reason given".to_owned());
                self.failed = Some(why.clone());
                vec![format!("turn failed: {why}")]
            }
            "error" => {
                let words = text(&v, "message").unwrap_or_default();
                self.reconnects += 1;
                if self.reconnects >= MAX_RECONNECTS {
                    self.stop = Some(Stop::Unreachable(words.clone()));
                }
                vec![format!("codex error: {}", one_line(&words))]
            }
            "item.completed" | "item.started" => {
                let item = v.get("item").cloned().unwrap_or(Value::Null);
                if kind == "item.started" {
                    return vec![];
                }
                match item.get("type").and_then(Value::as_str).unwrap_or_default() {
                    "agent_message" => vec![format!(
                        "codex: {}",
                        one_line(&text(&item, "text").unwrap_or_default())
                    )],
                    "reasoning" => vec![],
                    "command_execution" => vec![format!(
                        "command (exit {}): {}",
                        item.get("exit_code")
                            .and_then(Value::as_i64)
                            .map_or_else(|| "?".to_owned(), |c| c.to_string()),
                        one_line(&text(&item, "command").unwrap_or_default())
                    )],
                    "file_change" => {
                        let changes: Vec<String> = item
                            .get("changes")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .map(|c| {
                                format!(
                                    "{} {}",
                                    text(c, "kind").unwrap_or_default(),
                                    text(c, "path").unwrap_or_default()
                                )
                            })
                            .collect();
                        vec![format!("files changed: {}", changes.join(", "))]
                    }
                    other => vec![format!("codex {other}")],
                }
            }
            _ => vec![],
        }
    }

    /// The usage so far (its cost estimated by `price`); complete once a turn completed and
    /// nothing failed or was stopped.
    pub fn usage(&self, price: impl Fn(&Usage) -> f64) -> Usage {
        let mut u = Usage::new("codex");
        u.model = self.model.clone();
        u.session_id = self.thread.clone();
        if let Some((input, cached, output, reasoning)) = self.tokens {
            u.input_tokens = input;
            u.cached_input_tokens = cached.min(input);
            u.output_tokens = output;
            u.reasoning_tokens = reasoning.min(output);
            u.cost_cents = price(&u);
            u.cost_source = CostSource::Estimated;
        }
        u.complete = self.turns_completed > 0 && self.stop.is_none();
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cent per thousand tokens, whatever their kind.
    fn price(u: &Usage) -> f64 {
        (u.input_tokens + u.output_tokens) as f64 / 1000.0
    }

    #[test]
    fn usage_is_the_threads_latest_cumulative_total() {
        let mut s = CodexStream::new(Some("gpt-5-codex".into()), None);
        s.line(r#"{"type":"thread.started","thread_id":"th-1"}"#, price);
        s.line(r#"{"type":"turn.completed","usage":{"input_tokens":1000,"cached_input_tokens":200,"output_tokens":100,"reasoning_output_tokens":40}}"#, price);
        let shown = s.line(r#"{"type":"item.completed","item":{"type":"command_execution","command":"cargo test","exit_code":101}}"#, price);
        assert_eq!(shown, ["command (exit 101): cargo test"]);
        s.line(r#"{"type":"turn.completed","usage":{"input_tokens":3000,"cached_input_tokens":1200,"output_tokens":300,"reasoning_output_tokens":90}}"#, price);
        let u = s.usage(price);
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.output_tokens,
                u.reasoning_tokens
            ),
            (3000, 1200, 300, 90)
        );
        assert_eq!(u.cost_cents, 3.3);
        assert_eq!(u.cost_source, CostSource::Estimated);
        assert!(u.complete);
        assert_eq!(u.session_id.as_deref(), Some("th-1"));
    }

    #[test]
    fn the_budget_stops_it() {
        let mut s = CodexStream::new(None, Some(2.0));
        s.line(
            r#"{"type":"turn.completed","usage":{"input_tokens":1000,"output_tokens":100}}"#,
            price,
        );
        assert_eq!(s.stop, None, "1.1 cents is within 2");
        s.line(
            r#"{"type":"turn.completed","usage":{"input_tokens":2000,"output_tokens":200}}"#,
            price,
        );
        assert_eq!(s.stop, Some(Stop::Budget));
    }

    #[test]
    fn reconnecting_for_ever_is_given_up_on() {
        let mut s = CodexStream::new(None, None);
        for i in 1..MAX_RECONNECTS {
            s.line(
                &format!(
                    r#"{{"type":"error","message":"Reconnecting... {i}/5 (stream disconnected)"}}"#
                ),
                price,
            );
        }
        assert_eq!(s.stop, None);
        s.line(r#"{"type":"turn.started"}"#, price);
        for i in 1..=MAX_RECONNECTS {
            s.line(
                &format!(
                    r#"{{"type":"error","message":"Reconnecting... {i}/5 (stream disconnected)"}}"#
                ),
                price,
            );
        }
        assert!(matches!(&s.stop, Some(Stop::Unreachable(w)) if w.contains("Reconnecting... 5/5")));
    }

    #[test]
    fn a_failed_turn_is_the_tasks() {
        let mut s = CodexStream::new(None, None);
        s.line(
            r#"{"type":"turn.failed","error":{"message":"the model refused"}}"#,
            price,
        );
        assert_eq!(s.failed.as_deref(), Some("the model refused"));
    }
}
