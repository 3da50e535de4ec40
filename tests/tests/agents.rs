//! The agent presets end to end: the real runner driving fake `claude`, `codex` and `aider`
//! programs (tests/scripts/bin) that print the documented formats. What is checked: how each
//! is invoked, how each ending is classified (the task's failure, or the machine's), what is
//! recorded (cents, and where they came from), the budget stopping Codex, the runner-made
//! commit, and a rate limit pausing the runner until it resets.
//!
//! Log lines checked on purpose (operator-facing): the runner's start-up line naming its
//! agent's version, and the one line of a runner refused at start.

use pipeline_tests::{Runner, Server, TestRepo, alive, git, runs, wait_for};
use serde_json::Value;

fn dev_runs(task: &Value) -> Vec<Value> {
    runs(task)
        .into_iter()
        .filter(|r| r["phase"] == "dev")
        .collect()
}

fn args_of(repo: &TestRepo, agent: &str, task: &str) -> Vec<String> {
    repo.agent_lines(&format!("{agent}-{task}.args"))
}

/// `flag` followed by `value` in `args`.
fn has_pair(args: &[String], flag: &str, value: &str) -> bool {
    args.windows(2).any(|w| w[0] == flag && w[1] == value)
}

fn runner_health(server: &Server, name: &str) -> Value {
    let runners = server.ctl(&["runners", "--json"]).json();
    runners
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

#[test]
fn claude_runs_unattended_with_its_limits_and_its_reported_cost() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-task-cost", "500"]);
    let r = Runner::start(
        &repo,
        &server,
        "c",
        &[
            "--agent",
            "claude",
            "--max-turns",
            "7",
            "--model",
            "claude-sonnet-4-5",
        ],
    );
    r.proc
        .wait_for_line("agent: claude 2.1.332 (Claude Code)")
        .expect("the runner names its agent's version");
    let id = server.add(&["--title", "notes", "--description", "CLAUDE: success"]);
    let task = server.wait_status(&id, "done");
    let args = args_of(&repo, "claude", &id);
    for flag in ["-p", "--verbose"] {
        assert!(args.iter().any(|a| a == flag), "{flag}: {args:?}");
    }
    assert!(
        has_pair(&args, "--output-format", "stream-json"),
        "{args:?}"
    );
    assert!(has_pair(&args, "--max-turns", "7"));
    assert!(has_pair(&args, "--model", "claude-sonnet-4-5"));
    assert!(
        has_pair(&args, "--max-budget-usd", "5.00"),
        "the task's budget: {args:?}"
    );
    assert!(has_pair(&args, "--permission-mode", "bypassPermissions"));
    assert!(has_pair(&args, "--disallowedTools", "AskUserQuestion"));
    assert!(args.iter().any(|a| a == "--append-system-prompt"));
    let stdin = repo
        .agent_file(&format!("claude-{id}.stdin"))
        .expect("stdin");
    assert!(
        stdin.contains(&format!("- ID: {id}")),
        "the prompt on stdin: {stdin}"
    );
    let dev = &dev_runs(&task)[0];
    assert!(
        (dev["cost_cents"].as_f64().expect("cost") - 12.34).abs() < 1e-6,
        "{dev}"
    );
    assert!((task["cost_cents"].as_f64().expect("cost") - 12.34).abs() < 1e-6);
    let usage = &dev["usage"];
    assert_eq!(usage["agent"], "claude", "{dev}");
    assert_eq!(usage["model"], "claude-sonnet-4-5");
    assert_eq!(usage["input_tokens"], 4050);
    assert_eq!(usage["cached_input_tokens"], 3000);
    assert_eq!(usage["cache_write_tokens"], 50);
    assert_eq!(usage["output_tokens"], 200);
    assert_eq!(usage["cost_source"], "reported");
    assert_eq!(usage["complete"], true);
    let logs = server.ctl(&["logs", &id]).ok();
    assert!(logs.contains("claude: I will write the notes."), "{logs}");
    assert!(logs.contains("tool Bash: git commit -m notes"), "{logs}");
    assert!(
        logs.contains("claude finished: success after 3 turns"),
        "{logs}"
    );
    assert!(
        !logs.contains("\"type\":\"assistant\""),
        "readable, not raw JSON: {logs}"
    );
    assert!(
        logs.contains(
            "usage: 4050 input (3000 cached) / 200 output tokens, 12.34 cents (reported)"
        ),
        "{logs}"
    );
    // --raw: the stream as claude printed it, each event once, instead of what was made of it.
    let raw = server.ctl(&["logs", &id, "--raw"]).ok();
    let events: Vec<&str> = raw.lines().filter(|l| l.contains(" raw ")).collect();
    assert!(
        events.iter().any(|l| l.contains("\"type\":\"assistant\"")),
        "{raw}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|l| l.contains("\"type\":\"result\""))
            .count(),
        1,
        "{raw}"
    );
    assert!(!raw.contains("claude: I will write the notes."), "{raw}");
    assert!(raw.contains("runner"), "the runner's own lines stay: {raw}");
    // With --tail, the last lines of the view asked for.
    let tail = server.ctl(&["logs", &id, "--raw", "--tail", "3"]).ok();
    assert_eq!(
        tail.lines().filter(|l| !l.starts_with("===")).count(),
        3,
        "{tail}"
    );
    let tail = server.ctl(&["logs", &id, "--tail", "50"]).ok();
    assert!(!tail.contains(" raw "), "{tail}");
    assert!(
        !tail.contains("passed its size cap"),
        "what is left out is no gap: {tail}"
    );
}

#[test]
fn claude_endings_are_read_from_its_result_not_its_exit_code() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-retries", "1"]);
    let _r = Runner::start(&repo, &server, "c", &["--agent", "claude"]);
    for (case, says) in [
        (
            "max-turns",
            "claude stopped at its turn limit (--max-turns 80)",
        ),
        (
            "error-exit-0",
            "claude failed during execution: the tool crashed",
        ),
        ("cut", "without its final result"),
    ] {
        let id = server.add(&["--title", case, "--description", &format!("CLAUDE: {case}")]);
        let task = server.wait_status(&id, "needs_help");
        let dev = &dev_runs(&task)[0];
        assert_eq!(dev["failure_kind"], "task", "{case}: {dev}");
        let error = dev["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{case}: {error}");
        assert_eq!(task["failures"], 1, "{case}: charged");
        assert_eq!(dev["usage"]["complete"], case != "cut", "{case}: {dev}");
    }
    // A stream cut off is summed from its messages (once per message): 400 + 600 in, estimated.
    assert!(
        server
            .ctl(&["logs", "t-3"])
            .ok()
            .contains("usage: 1200 input (200 cached) / 120 output tokens"),
        "{}",
        server.ctl(&["logs", "t-3"]).ok()
    );
}

#[test]
fn claude_hanging_after_its_result_is_stopped_and_its_work_kept() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = Runner::start(&repo, &server, "c", &["--agent", "claude"]);
    let id = server.add(&["--title", "hang", "--description", "CLAUDE: hang"]);
    server.wait_status(&id, "done");
    let pid = repo.agent_file(&format!("claude-{id}.pid")).expect("pid");
    wait_for("the hanging claude to be stopped", || {
        (!alive(pid.trim())).then_some(())
    });
}

#[test]
fn claude_not_logged_in_is_the_runners_fault_and_makes_it_unhealthy() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = Runner::start(&repo, &server, "c", &["--agent", "claude"]);
    let id = server.add(&["--title", "t", "--description", "CLAUDE: not-logged-in"]);
    let task = server.wait_task(&id, "given back", |t| {
        dev_runs(t)
            .iter()
            .any(|r| r["failure_kind"] == "infrastructure")
    });
    assert_eq!(task["failures"], 0, "not charged: {task}");
    let runner = wait_for("the runner to be unhealthy", || {
        let r = runner_health(&server, "c");
        (r["health"] == "unhealthy").then_some(r)
    });
    let why = runner["health_reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("Not logged in · Please run /login"),
        "in claude's words: {why}"
    );
}

#[test]
fn a_rate_limit_gives_the_lease_back_and_pauses_the_runner_until_it_resets() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = Runner::start(&repo, &server, "c", &["--agent", "claude"]);
    let id = server.add(&["--title", "t", "--description", "CLAUDE: rate-limit-once"]);
    let paused = wait_for("the runner to pause", || {
        let r = runner_health(&server, "c");
        (r["health"] == "unhealthy").then_some(r)
    });
    assert!(
        paused["health_reason"]
            .as_str()
            .is_some_and(|w| w.contains("rate limit")),
        "{paused}"
    );
    // It resets in 2 s: the runner takes the task again and it lands, charged nothing.
    let task = server.wait_status(&id, "done");
    assert_eq!(task["failures"], 0);
    let dev = dev_runs(&task);
    assert_eq!(dev[0]["failure_kind"], "infrastructure", "{dev:?}");
    assert_eq!(dev.len(), 2);
    assert_eq!(runner_health(&server, "c")["health"], "healthy");
}

#[test]
fn codex_usage_is_cumulative_and_priced_from_the_table() {
    let repo = TestRepo::new();
    let table = repo.dir.path().join("prices.json");
    std::fs::write(
        &table,
        r#"{"gpt-5-codex": {"input": 2.0, "cached_input": 0.5, "output": 10.0}}"#,
    )
    .expect("write");
    let server = Server::start(&repo, &[]);
    let _r = Runner::start(
        &repo,
        &server,
        "x",
        &[
            "--agent",
            "codex",
            "--model",
            "gpt-5-codex",
            "--price-table",
            table.to_str().expect("utf-8"),
        ],
    );
    let id = server.add(&["--title", "t", "--description", "CODEX: success"]);
    let task = server.wait_status(&id, "done");
    let args = args_of(&repo, "codex", &id);
    assert_eq!(
        &args[..4],
        ["exec", "--json", "--sandbox", "workspace-write"],
        "{args:?}"
    );
    assert_eq!(
        args.last().map(String::as_str),
        Some("-"),
        "the prompt on stdin"
    );
    // The last turn's totals: 18,000 fresh × $2 + 12,000 cached × $0.5 + 3,000 out × $10 per
    // million = $0.036 + $0.006 + $0.03 = 7.2 cents (not the two turns summed).
    let dev = &dev_runs(&task)[0];
    let cost = dev["cost_cents"].as_f64().expect("cost");
    assert!((cost - 7.2).abs() < 1e-9, "{cost}");
    let usage = &dev["usage"];
    assert_eq!(usage["cost_source"], "estimated", "{dev}");
    assert_eq!(
        usage["input_tokens"], 30000,
        "the last turn's cumulative total"
    );
    assert_eq!(usage["reasoning_tokens"], 900);
    let logs = server.ctl(&["logs", &id]).ok();
    assert!(logs.contains("command (exit 2): ls notes"), "{logs}");
    assert!(
        logs.contains(&format!("files changed: add notes/{id}.md")),
        "{logs}"
    );
    assert!(logs.contains("(estimated)"), "{logs}");
}

#[test]
fn codex_is_stopped_when_its_estimate_passes_the_tasks_budget() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--max-task-cost", "50", "--max-retries", "1"]);
    let _r = Runner::start(&repo, &server, "x", &["--agent", "codex"]);
    let id = server.add(&["--title", "t", "--description", "CODEX: budget"]);
    let task = server.wait_status(&id, "needs_help");
    let dev = &dev_runs(&task)[0];
    let error = dev["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("passed the task's remaining budget (50.00 cents)"),
        "{error}"
    );
    assert_eq!(dev["failure_kind"], "task");
    let cost = dev["cost_cents"].as_f64().expect("cost");
    assert!(
        cost > 50.0 && cost < 150.0,
        "stopped soon after the budget: {cost}"
    );
}

#[test]
fn codex_without_network_is_stopped_as_the_runners_failure() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = Runner::start(&repo, &server, "x", &["--agent", "codex"]);
    let id = server.add(&["--title", "t", "--description", "CODEX: offline"]);
    let runner = wait_for("the runner to be unhealthy", || {
        let r = runner_health(&server, "x");
        (r["health"] == "unhealthy").then_some(r)
    });
    let why = runner["health_reason"].as_str().unwrap_or_default();
    assert!(why.contains("codex cannot reach its API"), "{why}");
    assert!(why.contains("Reconnecting..."), "in codex's words: {why}");
    let task = server.show(&id);
    assert_eq!(task["failures"], 0, "{task}");
}

#[test]
fn aiders_change_is_committed_by_the_runner_with_the_trailer() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let _r = Runner::start(
        &repo,
        &server,
        "a",
        &["--agent", "aider", "--model", "gpt-4o"],
    );
    let id = server.add(&["--title", "Write the notes"]);
    let task = server.wait_status(&id, "done");
    let args = args_of(&repo, "aider", &id);
    for flag in ["--yes-always", "--no-auto-commits", "--no-analytics"] {
        assert!(args.iter().any(|a| a == flag), "{flag}: {args:?}");
    }
    assert!(has_pair(&args, "--model", "gpt-4o"));
    let message = git(&repo.repo(), &["log", "-1", "--format=%B", "main"]);
    assert!(message.starts_with("Write the notes"), "{message}");
    assert!(message.contains(&format!("Task-Id: {id}")), "{message}");
    let dev = &dev_runs(&task)[0];
    let cost = dev["cost_cents"].as_f64().expect("cost");
    assert!((cost - 1.25).abs() < 1e-9, "aider's total_cost: {cost}");
    assert_eq!(dev["usage"]["cost_source"], "reported", "{dev}");
    assert_eq!(dev["usage"]["input_tokens"], 3000);
}

#[test]
fn commit_for_agent_commits_what_a_command_agent_left() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let agent = "mkdir -p notes && echo hi > notes/$PIPELINE_TASK_ID.md";
    let _r = Runner::start(
        &repo,
        &server,
        "k",
        &[
            "--agent",
            "command",
            "--agent-cmd",
            agent,
            "--commit-for-agent",
        ],
    );
    let id = server.add(&["--title", "Left uncommitted"]);
    server.wait_status(&id, "done");
    let message = git(&repo.repo(), &["log", "-1", "--format=%B", "main"]);
    assert!(message.starts_with("Left uncommitted"), "{message}");
    assert_eq!(repo.landed(), [id]);
}

#[test]
fn a_preset_whose_program_is_missing_is_refused_at_start() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let mut r = Runner::spawn_with_env(
        &repo,
        &server.url,
        "m",
        &["--agent", "claude"],
        &[("PATH", "/usr/bin:/bin")],
    );
    let (status, log) = r.proc.wait_exit_log();
    assert!(!status.success(), "{status:?}:\n{log}");
    assert!(
        log.contains("the agent program claude is not on PATH"),
        "{log}"
    );
}

/// A server whose verification fails an agent's first attempt (its note says "attempt 1")
/// and passes the second, which amends it, with no back-off between (the base, without
/// notes, is green).
fn failing_the_first_verification() -> (TestRepo, Server) {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--test-cmd",
            "! ls notes/*.md >/dev/null 2>&1 || grep -q 'attempt 2' notes/*.md",
            "--backoff-base",
            "0",
        ],
    );
    (repo, server)
}

#[test]
fn a_retry_after_a_verify_failure_resumes_claudes_session() {
    let (repo, server) = failing_the_first_verification();
    let _r = Runner::start(&repo, &server, "c", &["--agent", "claude"]);
    let id = server.add(&["--title", "t", "--description", "CLAUDE: success"]);
    let task = server.wait_status(&id, "done");
    assert_eq!(dev_runs(&task).len(), 2, "{task}");
    let args = args_of(&repo, "claude", &id);
    assert!(
        has_pair(&args, "--resume", &format!("sess-{id}-1")),
        "the second attempt resumes the first's session: {args:?}"
    );
}

#[test]
fn a_retry_after_a_verify_failure_resumes_codexs_thread_unless_told_not_to() {
    for no_resume in [false, true] {
        let (repo, server) = failing_the_first_verification();
        let mut flags = vec!["--agent", "codex"];
        if no_resume {
            flags.push("--no-resume");
        }
        let _r = Runner::start(&repo, &server, "x", &flags);
        let id = server.add(&["--title", "t", "--description", "CODEX: success"]);
        let task = server.wait_status(&id, "done");
        assert_eq!(dev_runs(&task).len(), 2, "{task}");
        assert_eq!(
            dev_runs(&task)[0]["usage"]["agent"],
            "codex",
            "the first attempt's usage names its agent: {task}"
        );
        let args = args_of(&repo, "codex", &id);
        let resumed = has_pair(&args, "resume", &format!("thread-{id}-1"));
        assert_eq!(
            resumed, !no_resume,
            "the second attempt continues the first's thread unless --no-resume: {args:?}"
        );
        assert_eq!(
            args.last().map(String::as_str),
            Some("-"),
            "prompt on stdin"
        );
    }
}
