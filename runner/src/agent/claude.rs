//! Claude Code: `claude -p --output-format stream-json --verbose`, the prompt on stdin, with
//! permissions that never block and no way to ask a question, the turn limit, the task's
//! remaining budget and the model passed through.
//!
//! The NDJSON stream is read as it comes ([`ClaudeStream`], pure): each assistant message,
//! tool call and tool result becomes one readable log line; the final `result` object gives the
//! ending (`subtype`, `is_error`), the turns, the session, the cost (`total_cost_usd`) and the
//! tokens. The ending is classified on the result, not the exit code (`error_max_turns` exits
//! 1; an `is_error` result can come with exit 0). `result` is the end: the process then gets a
//! short grace to exit and is stopped (it can hang after it). A stream without a `result` (a
//! budget cut can do that) is summed from the assistant messages, once per message ID, and
//! marked incomplete. An authentication failure is the machine's, not the task's (the runner
//! turns unhealthy with Claude's own words); a rejected rate limit gives the lease back
//! uncharged until it resets.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{AgentJob, AgentResult, one_line};
use crate::config::AgentArgs;
use crate::domain::Channel;
use crate::usage::{CostSource, Usage};
use pipeline_core::process::{self, Spec, Stream, with_tail};

/// What the runner tells Claude besides the prompt.
const RULES: &str = "You are running unattended inside a pipeline: nobody will answer a \
    question, so never ask one; decide and carry on. Work only in the current directory. Make \
    the one commit the task asks for, with its Task-Id trailer, and never push.";

/// How long Claude has to exit after its result.
const AFTER_RESULT: Duration = Duration::from_secs(5);

pub async fn run(
    args: &AgentArgs,
    job: &AgentJob,
    cancel: &CancellationToken,
    mut on_line: impl FnMut(Channel, &str),
) -> AgentResult {
    let mut argv: Vec<String> = [
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--permission-mode",
        "bypassPermissions",
        "--disallowedTools",
        "AskUserQuestion",
        "--append-system-prompt",
        RULES,
    ]
    .map(str::to_owned)
    .to_vec();
    argv.extend(["--max-turns".to_owned(), args.max_turns.to_string()]);
    if let Some(model) = &args.model {
        argv.extend(["--model".to_owned(), model.clone()]);
    }
    if let Some(budget) = job.budget_cents {
        argv.extend([
            "--max-budget-usd".to_owned(),
            format!("{:.2}", budget / 100.0),
        ]);
    }
    if let Some(session) = &job.resume_session {
        argv.extend(["--resume".to_owned(), session.clone()]);
    }
    let finish = CancellationToken::new();
    let spec = Spec {
        env: job.env.clone(),
        clear_env: true,
        timeout: Some(Duration::from_secs(args.timeout)),
        kill_grace: args.kill_grace(),
        stdin: Some(job.prompt.clone().into_bytes()),
        finish: Some(finish.clone()),
        finish_grace: AFTER_RESULT,
        sandbox: job.sandbox.clone(),
        ..Spec::program("claude", argv, job.worktree.clone())
    };
    let mut stream = ClaudeStream::new(args.model.clone());
    let finished = process::run(&spec, cancel, |s, line| match s {
        Stream::Stdout => {
            on_line(Channel::Raw, line);
            let seen = stream.line(line);
            for shown in &seen.shown {
                on_line(Channel::Stdout, shown);
            }
            if seen.ended {
                finish.cancel();
            }
        }
        Stream::Stderr => on_line(Channel::Stderr, line),
    })
    .await;
    let finished = match super::ran(finished, "claude") {
        Ok(f) => f,
        Err(end) => return *end,
    };
    let ended = Ended {
        code: finished.code(),
        timed_out: finished.timed_out,
        describe: finished.describe(),
        tail: finished.tail.clone(),
    };
    stream.outcome(&ended, args.max_turns, args.timeout, job)
}

/// How the process ended, as [`ClaudeStream::outcome`] needs it.
pub struct Ended {
    pub code: Option<i32>,
    pub timed_out: bool,
    pub describe: String,
    pub tail: String,
}

/// What one line of the stream showed.
#[derive(Debug, Default, PartialEq)]
pub struct Seen {
    /// Readable log lines.
    pub shown: Vec<String>,
    /// It was the `result`: the run is over.
    pub ended: bool,
}

/// Tokens as Claude reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Tokens {
    input: u64,
    output: u64,
    cache_creation: u64,
    cache_read: u64,
}

impl Tokens {
    fn of(v: &Value) -> Self {
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        Self {
            input: n("input_tokens"),
            output: n("output_tokens"),
            cache_creation: n("cache_creation_input_tokens"),
            cache_read: n("cache_read_input_tokens"),
        }
    }

    fn add(&mut self, o: Tokens) {
        self.input += o.input;
        self.output += o.output;
        self.cache_creation += o.cache_creation;
        self.cache_read += o.cache_read;
    }
}

/// The final `result` object.
#[derive(Clone, Debug, PartialEq)]
struct Outcome {
    subtype: String,
    is_error: bool,
    num_turns: u64,
    cost_usd: Option<f64>,
    tokens: Tokens,
    text: String,
    terminal_reason: Option<String>,
}

/// Claude's stream as read so far. Pure: fed line by line, asked for the ending at the end.
#[derive(Debug)]
pub struct ClaudeStream {
    model: Option<String>,
    session: Option<String>,
    /// Each assistant message's usage, once per message ID.
    messages: HashMap<String, Tokens>,
    result: Option<Outcome>,
    /// Claude's own words when it could not authenticate.
    auth_failed: Option<String>,
    /// A rejected rate limit, and when it resets (ms since the epoch), if it says.
    rate_limited: Option<Option<i64>>,
}

impl ClaudeStream {
    pub fn new(model: Option<String>) -> Self {
        Self {
            model,
            session: None,
            messages: HashMap::new(),
            result: None,
            auth_failed: None,
            rate_limited: None,
        }
    }

    /// Reads one line of stdout.
    pub fn line(&mut self, line: &str) -> Seen {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return Seen {
                shown: vec![line.to_owned()],
                ended: false,
            };
        };
        let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let mut shown = Vec::new();
        match v.get("type").and_then(Value::as_str).unwrap_or_default() {
            "system" => {
                if let Some(s) = str_of(&v, "session_id") {
                    self.session = Some(s);
                }
                if let Some(m) = str_of(&v, "model") {
                    self.model = Some(m);
                }
                if str_of(&v, "subtype").as_deref() == Some("init") {
                    shown.push(format!(
                        "claude started: model {}, session {}",
                        self.model.as_deref().unwrap_or("?"),
                        self.session.as_deref().unwrap_or("?")
                    ));
                }
            }
            "assistant" => {
                let message = v.get("message").cloned().unwrap_or(Value::Null);
                if let Some(m) = str_of(&message, "model") {
                    self.model.get_or_insert(m);
                }
                let texts: Vec<String> = content(&message)
                    .filter_map(|c| match c.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            str_of(c, "text").map(|t| format!("claude: {}", one_line(&t)))
                        }
                        Some("tool_use") => Some(format!(
                            "tool {}: {}",
                            str_of(c, "name").unwrap_or_default(),
                            tool_input(c.get("input"))
                        )),
                        _ => None,
                    })
                    .collect();
                if let Some(error) = str_of(&v, "error") {
                    let words = texts
                        .iter()
                        .map(|t| t.trim_start_matches("claude: ").to_owned())
                        .collect::<Vec<_>>()
                        .join(" ");
                    if error == "authentication_failed" {
                        self.auth_failed = Some(if words.is_empty() {
                            error.clone()
                        } else {
                            words
                        });
                    }
                    shown.push(format!("claude error: {error}"));
                }
                if let (Some(id), Some(usage)) = (str_of(&message, "id"), message.get("usage")) {
                    self.messages.insert(id, Tokens::of(usage));
                }
                shown.extend(texts);
            }
            "user" => {
                let message = v.get("message").cloned().unwrap_or(Value::Null);
                for c in content(&message) {
                    if c.get("type").and_then(Value::as_str) == Some("tool_result") {
                        let error = c.get("is_error").and_then(Value::as_bool).unwrap_or(false);
                        let text = match c.get("content") {
                            Some(Value::String(s)) => s.clone(),
                            Some(Value::Array(parts)) => parts
                                .iter()
                                .filter_map(|p| p.get("text").and_then(Value::as_str))
                                .collect::<Vec<_>>()
                                .join(" "),
                            _ => String::new(),
                        };
                        shown.push(format!(
                            "tool result{}: {}",
                            if error { " (error)" } else { "" },
                            one_line(&text)
                        ));
                    }
                }
            }
            "rate_limit_event" => {
                let info = v.get("rate_limit_info").unwrap_or(&v);
                let status = str_of(info, "status").or_else(|| str_of(&v, "status"));
                if status.as_deref() == Some("rejected") {
                    let resets = ["resets_at", "resetsAt"]
                        .iter()
                        .find_map(|k| info.get(*k).or_else(|| v.get(*k)).and_then(Value::as_i64))
                        .map(|t| if t < 100_000_000_000 { t * 1000 } else { t });
                    self.rate_limited = Some(resets);
                    shown.push("claude's rate limit was reached".to_owned());
                }
            }
            "result" => {
                if let Some(s) = str_of(&v, "session_id") {
                    self.session = Some(s);
                }
                let outcome = Outcome {
                    subtype: str_of(&v, "subtype").unwrap_or_default(),
                    is_error: v.get("is_error").and_then(Value::as_bool).unwrap_or(false),
                    num_turns: v.get("num_turns").and_then(Value::as_u64).unwrap_or(0),
                    cost_usd: v
                        .get("total_cost_usd")
                        .and_then(Value::as_f64)
                        .filter(|c| c.is_finite() && *c >= 0.0),
                    tokens: v.get("usage").map(Tokens::of).unwrap_or_default(),
                    text: str_of(&v, "result").unwrap_or_default(),
                    terminal_reason: str_of(&v, "terminal_reason"),
                };
                shown.push(format!(
                    "claude finished: {}{} after {} turns, ${:.4}",
                    outcome.subtype,
                    if outcome.is_error { " (an error)" } else { "" },
                    outcome.num_turns,
                    outcome.cost_usd.unwrap_or(0.0)
                ));
                self.result = Some(outcome);
                return Seen { shown, ended: true };
            }
            _ => {}
        }
        Seen {
            shown,
            ended: false,
        }
    }

    /// The usage: the result's when it came, else the messages' summed (incomplete, its cost
    /// estimated by `estimate`).
    pub fn usage(&self, estimate: impl Fn(&Usage) -> f64) -> Usage {
        let mut u = Usage::new("claude");
        u.model = self.model.clone();
        u.session_id = self.session.clone();
        let tokens = match &self.result {
            Some(r) => r.tokens,
            None => {
                let mut sum = Tokens::default();
                for t in self.messages.values() {
                    sum.add(*t);
                }
                sum
            }
        };
        u.input_tokens = tokens.input + tokens.cache_creation + tokens.cache_read;
        u.cached_input_tokens = tokens.cache_read;
        u.cache_write_tokens = tokens.cache_creation;
        u.output_tokens = tokens.output;
        match self.result.as_ref().and_then(|r| r.cost_usd) {
            Some(usd) => {
                u.cost_cents = usd * 100.0;
                u.cost_source = CostSource::Reported;
            }
            None if u.input_tokens + u.output_tokens > 0 => {
                u.cost_cents = estimate(&u);
                u.cost_source = CostSource::Estimated;
            }
            None => {}
        }
        u.complete = self.result.is_some();
        u
    }

    /// What the run came to, once the process ended.
    pub fn outcome(
        &self,
        ended: &Ended,
        max_turns: u32,
        timeout: u64,
        job: &AgentJob,
    ) -> AgentResult {
        let usage = self.usage(|u| job.prices.cents(u));
        if let Some(until_ms) = self.rate_limited {
            return AgentResult::RateLimited {
                reason: "claude's rate limit was reached (not the task's fault)".to_owned(),
                until_ms,
                usage,
            };
        }
        if let Some(words) = &self.auth_failed {
            return AgentResult::Infra {
                reason: format!("claude cannot authenticate on this runner: {words}"),
                unhealthy: true,
            };
        }
        let Some(r) = &self.result else {
            if process::could_not_run(ended.code) {
                return AgentResult::Infra {
                    reason: with_tail(
                        format!("claude could not be run ({})", ended.describe),
                        &ended.tail,
                    ),
                    unhealthy: false,
                };
            }
            let reason = if ended.timed_out {
                format!("claude timed out after {timeout} s")
            } else {
                format!(
                    "claude ended ({}) without its final result; its usage is summed from its \
                     messages and may be short",
                    ended.describe
                )
            };
            return AgentResult::Failed {
                reason: with_tail(reason, &ended.tail),
                usage,
            };
        };
        if !r.is_error && r.subtype == "success" {
            return AgentResult::Completed { usage };
        }
        if r.terminal_reason.as_deref() == Some("api_error") {
            return AgentResult::Infra {
                reason: format!(
                    "claude's API failed (not the task's fault): {}",
                    one_line(&r.text)
                ),
                unhealthy: false,
            };
        }
        let reason = match r.subtype.as_str() {
            "error_max_turns" => format!(
                "claude stopped at its turn limit (--max-turns {max_turns}) after {} turns",
                r.num_turns
            ),
            "error_max_budget_usd" => {
                let budget = job
                    .budget_cents
                    .map_or_else(String::new, |b| format!(" (${:.2})", b / 100.0));
                format!("claude stopped: the task's remaining budget{budget} ran out")
            }
            "error_during_execution" => {
                format!("claude failed during execution: {}", one_line(&r.text))
            }
            other => format!("claude reported an error ({other}): {}", one_line(&r.text)),
        };
        AgentResult::Failed { reason, usage }
    }
}

/// The content blocks of a message.
fn content(message: &Value) -> impl Iterator<Item = &Value> {
    message
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// A tool call's input in a few words: its command, file or pattern when it has one.
fn tool_input(input: Option<&Value>) -> String {
    let Some(input) = input else {
        return String::new();
    };
    for key in [
        "command",
        "file_path",
        "path",
        "pattern",
        "url",
        "description",
    ] {
        if let Some(v) = input.get(key).and_then(Value::as_str) {
            return one_line(v);
        }
    }
    one_line(&input.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &[&str]) -> ClaudeStream {
        let mut s = ClaudeStream::new(None);
        for l in lines {
            s.line(l);
        }
        s
    }

    fn ended(code: i32) -> Ended {
        Ended {
            code: Some(code),
            timed_out: false,
            describe: format!("exit {code}"),
            tail: String::new(),
        }
    }

    const INIT: &str =
        r#"{"type":"system","subtype":"init","session_id":"s-1","model":"claude-sonnet-4-5"}"#;

    #[test]
    fn a_success_reports_its_cost_and_tokens() {
        let mut s = ClaudeStream::new(None);
        assert_eq!(
            s.line(INIT).shown,
            ["claude started: model claude-sonnet-4-5, session s-1"]
        );
        let seen = s.line(r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"Looking\nat it"},{"type":"tool_use","name":"Bash","input":{"command":"cargo test"}}],"usage":{"input_tokens":10,"output_tokens":5}}}"#);
        assert_eq!(
            seen.shown,
            ["claude: Looking ⏎ at it", "tool Bash: cargo test"]
        );
        let seen = s.line(r#"{"type":"result","subtype":"success","is_error":false,"num_turns":3,"session_id":"s-1","total_cost_usd":0.1234,"usage":{"input_tokens":100,"output_tokens":50,"cache_creation_input_tokens":20,"cache_read_input_tokens":300},"result":"done"}"#);
        assert!(seen.ended);
        let u = s.usage(|_| 0.0);
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.cache_write_tokens,
                u.output_tokens
            ),
            (420, 300, 20, 50)
        );
        assert!((u.cost_cents - 12.34).abs() < 1e-9);
        assert_eq!(u.cost_source, CostSource::Reported);
        assert!(u.complete);
        assert_eq!(u.session_id.as_deref(), Some("s-1"));
        assert_eq!(u.model.as_deref(), Some("claude-sonnet-4-5"));
    }

    #[test]
    fn a_stream_without_its_result_sums_each_message_once() {
        let s = feed(&[
            INIT,
            r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"a"}],"usage":{"input_tokens":10,"output_tokens":5}}}"#,
            r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"tool_use","name":"Read","input":{"file_path":"x"}}],"usage":{"input_tokens":10,"output_tokens":5}}}"#,
            r#"{"type":"assistant","message":{"id":"m2","content":[],"usage":{"input_tokens":7,"output_tokens":1,"cache_read_input_tokens":3}}}"#,
        ]);
        let u = s.usage(|u| u.output_tokens as f64);
        assert_eq!((u.input_tokens, u.output_tokens), (20, 6));
        assert!(!u.complete);
        assert_eq!(u.cost_source, CostSource::Estimated);
        assert_eq!(u.cost_cents, 6.0);
    }

    #[test]
    fn endings_are_read_from_the_result_not_the_exit_code() {
        let job = AgentJob::for_tests();
        let max_turns = feed(&[
            r#"{"type":"result","subtype":"error_max_turns","is_error":true,"num_turns":80}"#,
        ]);
        match max_turns.outcome(&ended(1), 80, 60, &job) {
            AgentResult::Failed { reason, .. } => {
                assert!(reason.contains("turn limit (--max-turns 80)"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let error_exit_0 = feed(&[
            r#"{"type":"result","subtype":"error_during_execution","is_error":true,"result":"boom"}"#,
        ]);
        assert!(matches!(
            error_exit_0.outcome(&ended(0), 80, 60, &job),
            AgentResult::Failed { .. }
        ));
        let fine_exit_1 = feed(&[r#"{"type":"result","subtype":"success","is_error":false}"#]);
        assert!(matches!(
            fine_exit_1.outcome(&ended(1), 80, 60, &job),
            AgentResult::Completed { .. }
        ));
    }

    #[test]
    fn not_logged_in_is_the_machines_fault_in_claudes_words() {
        let s = feed(&[
            INIT,
            r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"Not logged in · Please run /login"}]},"error":"authentication_failed"}"#,
            r#"{"type":"result","subtype":"success","is_error":true,"terminal_reason":"api_error","result":"Not logged in · Please run /login"}"#,
        ]);
        match s.outcome(&ended(0), 80, 60, &AgentJob::for_tests()) {
            AgentResult::Infra {
                reason,
                unhealthy: true,
            } => {
                assert!(
                    reason.contains("Not logged in · Please run /login"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_rejected_rate_limit_gives_the_lease_back_until_it_resets() {
        let s = feed(&[
            r#"{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1900000000}}"#,
        ]);
        match s.outcome(&ended(1), 80, 60, &AgentJob::for_tests()) {
            AgentResult::RateLimited { until_ms, .. } => {
                assert_eq!(until_ms, Some(1_900_000_000_000))
            }
            other => panic!("{other:?}"),
        }
        let allowed =
            feed(&[r#"{"type":"rate_limit_event","rate_limit_info":{"status":"allowed"}}"#]);
        assert!(allowed.rate_limited.is_none());
    }
}
