//! aider: `aider --message-file PROMPT --yes-always --no-auto-commits --no-analytics
//! --analytics-log FILE` (plus `--model`), in the worktree. It leaves its change uncommitted:
//! the runner makes the one commit (see `job.rs`). Its cost comes from the analytics log's
//! `message_send` events (`prompt_tokens`, `completion_tokens`, `cost`, `total_cost`), reported
//! by aider itself.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{AgentJob, AgentResult};
use crate::config::AgentArgs;
use crate::usage::{CostSource, Usage};
use pipeline_core::process::{self, Spec, Stream, with_tail};

pub async fn run(
    args: &AgentArgs,
    job: &AgentJob,
    cancel: &CancellationToken,
    on_line: impl FnMut(Stream, &str),
) -> AgentResult {
    let analytics = job.prompt_file.with_extension("analytics.jsonl");
    let _ = std::fs::remove_file(&analytics);
    let mut argv: Vec<String> = vec![
        "--message-file".into(),
        job.prompt_file.display().to_string(),
        "--yes-always".into(),
        "--no-auto-commits".into(),
        "--no-analytics".into(),
        "--analytics-log".into(),
        analytics.display().to_string(),
    ];
    if let Some(model) = &args.model {
        argv.extend(["--model".to_owned(), model.clone()]);
    }
    let spec = Spec {
        env: job.env.clone(),
        clear_env: true,
        timeout: Some(Duration::from_secs(args.timeout)),
        kill_grace: args.kill_grace(),
        sandbox: job.sandbox.clone(),
        ..Spec::program("aider", argv, job.worktree.clone())
    };
    let finished = process::run(&spec, cancel, on_line).await;
    let mut usage = read_analytics(&analytics);
    let _ = std::fs::remove_file(&analytics);
    if usage.model.is_none() {
        usage.model = args.model.clone();
    }
    let finished = match super::ran(finished, "aider") {
        Ok(f) => f,
        Err(end) => return *end,
    };
    if finished.success() {
        usage.complete = true;
        return AgentResult::Completed { usage };
    }
    if process::could_not_run(finished.code()) {
        return AgentResult::Infra {
            reason: with_tail(
                format!("aider could not be run ({})", finished.describe()),
                &finished.tail,
            ),
            unhealthy: false,
        };
    }
    let reason = if finished.timed_out {
        format!("aider timed out after {} s", args.timeout)
    } else {
        format!("aider failed ({})", finished.describe())
    };
    AgentResult::Failed {
        reason: with_tail(reason, &finished.tail),
        usage,
    }
}

/// The usage in aider's analytics log: tokens summed over its `message_send` events, the
/// cost its last `total_cost` (or the sum of `cost`).
pub fn read_analytics(file: &Path) -> Usage {
    let mut u = Usage::new("aider");
    let Ok(text) = std::fs::read_to_string(file) else {
        return u;
    };
    let (mut sum_cost, mut total_cost) = (0.0f64, None::<f64>);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v.get("event").and_then(Value::as_str) != Some("message_send") {
            continue;
        }
        let p = v.get("properties").unwrap_or(&Value::Null);
        let n = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
        u.input_tokens += n("prompt_tokens");
        u.output_tokens += n("completion_tokens");
        let usd = |k: &str| {
            p.get(k)
                .and_then(Value::as_f64)
                .filter(|c| c.is_finite() && *c >= 0.0)
        };
        sum_cost += usd("cost").unwrap_or(0.0);
        if let Some(t) = usd("total_cost") {
            total_cost = Some(total_cost.map_or(t, |m: f64| m.max(t)));
        }
        if let Some(m) = p.get("main_model").and_then(Value::as_str) {
            u.model = Some(m.to_owned());
        }
    }
    let usd = total_cost.unwrap_or(sum_cost);
    if usd > 0.0 || u.input_tokens + u.output_tokens > 0 {
        u.cost_cents = usd * 100.0;
        u.cost_source = CostSource::Reported;
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_analytics_log_gives_tokens_and_cost() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("a.jsonl");
        std::fs::write(
            &file,
            [
                r#"{"event": "launched", "properties": {}}"#,
                r#"{"event": "message_send", "properties": {"main_model": "gpt-4o", "prompt_tokens": 1000, "completion_tokens": 200, "cost": 0.01, "total_cost": 0.01}}"#,
                "not json",
                r#"{"event": "message_send", "properties": {"prompt_tokens": 1500, "completion_tokens": 300, "cost": 0.02, "total_cost": 0.03}}"#,
            ]
            .join("\n"),
        )
        .expect("write");
        let u = read_analytics(&file);
        assert_eq!((u.input_tokens, u.output_tokens), (2500, 500));
        assert!((u.cost_cents - 3.0).abs() < 1e-9, "{}", u.cost_cents);
        assert_eq!(u.cost_source, CostSource::Reported);
        assert_eq!(u.model.as_deref(), Some("gpt-4o"));
        let none = read_analytics(&dir.path().join("missing"));
        assert_eq!(none.cost_source, CostSource::None);
    }
}
