//! What `pipelinectl` prints: aligned tables for people, and for `--json` the shapes of
//! `CONTRACT.md` (statuses as lowercase words, times as RFC 3339 strings, absent values as null).
//!
//! Text that comes from agents and builds (log lines, run errors, rejection feedback, event
//! messages) is shown escaped when stdout is a terminal ([`terminal_safe`]): an escape sequence
//! in an agent's output must not reach a person's terminal, where it could retitle the window,
//! move the cursor, rewrite what was printed or worse. Piped or redirected, the text is
//! printed as it was written (scripts and files get the bytes); `--json` is JSON-escaped anyway.

use std::borrow::Cow;
use std::io::IsTerminal;

use pipeline_proto::v1 as pb;
use serde_json::{Value, json};

use crate::client::Failure;
use crate::time::rfc3339;

/// Whether a character is shown escaped on a terminal: the C0 controls but tab (ESC starts
/// every escape sequence; CR and BS overwrite what was printed), DEL, the C1 controls (U+009B
/// is a one-character CSI on some terminals), and the bidirectional overrides and isolates
/// (which make a line read differently from what it is).
fn dangerous(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{a}'..='\u{1f}' | '\u{7f}'..='\u{9f}')
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` safe to show on a terminal: every [`dangerous`] character written as an escape, `\xNN`
/// for those below U+0080 and `\u{NNNN}` for the others; everything else as it is (a
/// backslash too, so `\x1b` typed by the agent looks the same as an escaped ESC: it is text
/// either way).
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(dangerous) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !dangerous(c) {
            out.push(c);
        } else if u32::from(c) < 0x80 {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        }
    }
    Cow::Owned(out)
}

/// `text` as shown: [`terminal_safe`] if `terminal`, as it is otherwise.
pub fn shown(text: &str, terminal: bool) -> Cow<'_, str> {
    if terminal {
        terminal_safe(text)
    } else {
        Cow::Borrowed(text)
    }
}

/// Whether stdout is a terminal (asked once).
pub fn stdout_is_terminal() -> bool {
    static TERMINAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TERMINAL.get_or_init(|| std::io::stdout().is_terminal())
}

/// Text from agents and builds, as shown on this process's stdout.
fn agent_text(text: &str) -> Cow<'_, str> {
    shown(text, stdout_is_terminal())
}

/// The lowercase word for a task status, as in the contract.
pub fn status_word(raw: i32) -> &'static str {
    match pb::TaskStatus::try_from(raw) {
        Ok(pb::TaskStatus::Open) => "open",
        Ok(pb::TaskStatus::InProgress) => "in_progress",
        Ok(pb::TaskStatus::Verified) => "verified",
        Ok(pb::TaskStatus::Done) => "done",
        Ok(pb::TaskStatus::NeedsHelp) => "needs_help",
        Ok(pb::TaskStatus::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn phase_word(raw: i32) -> &'static str {
    match pb::RunPhase::try_from(raw) {
        Ok(pb::RunPhase::Dev) => "dev",
        Ok(pb::RunPhase::Verify) => "verify",
        Ok(pb::RunPhase::Integrate) => "integrate",
        _ => "unknown",
    }
}

fn run_status_word(raw: i32) -> &'static str {
    match pb::RunStatus::try_from(raw) {
        Ok(pb::RunStatus::Running) => "running",
        Ok(pb::RunStatus::Success) => "success",
        Ok(pb::RunStatus::Failure) => "failure",
        _ => "unknown",
    }
}

fn runner_state_word(raw: i32) -> &'static str {
    match pb::RunnerState::try_from(raw) {
        Ok(pb::RunnerState::Idle) => "idle",
        Ok(pb::RunnerState::Busy) => "busy",
        Ok(pb::RunnerState::Draining) => "draining",
        Ok(pb::RunnerState::Offline) => "offline",
        _ => "unknown",
    }
}

fn time_or_null(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |ms| Value::String(rfc3339(ms)))
}

fn print_json(value: &Value) {
    // Serializing a `Value` cannot fail.
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// Prints rows under a header, each column as wide as its widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub fn task_json(t: &pb::Task) -> Value {
    json!({
        "id": t.id,
        "title": t.title,
        "description": t.description,
        "status": status_word(t.status),
        "priority": t.priority,
        "patchset": t.patchset,
        "namespace": t.namespace,
        "depends_on": t.depends_on,
        "parent": t.parent,
        "failures": t.failures,
        "lost_leases": t.lost_leases,
        "cost_cents": t.cost_cents,
        "backoff_until": time_or_null(t.backoff_until_ms),
        "feedback": t.feedback,
        "created_at": rfc3339(t.created_at_ms),
        "updated_at": rfc3339(t.updated_at_ms),
        "waiting_for": t.waiting_for,
    })
}

fn run_json(r: &pb::Run) -> Value {
    json!({
        "id": r.id,
        "phase": phase_word(r.phase),
        "patchset": r.patchset,
        "attempt": r.attempt,
        "status": run_status_word(r.status),
        "runner": r.runner,
        "cost_cents": r.cost_cents,
        "started_at": rfc3339(r.started_at_ms),
        "finished_at": time_or_null(r.finished_at_ms),
        "error": r.error,
        "failure_kind": failure_kind_word(r.failure_kind),
    })
}

fn failure_kind_word(raw: i32) -> Value {
    match pb::FailureKind::try_from(raw) {
        Ok(pb::FailureKind::Task) => json!("task"),
        Ok(pb::FailureKind::Infrastructure) => json!("infrastructure"),
        _ => Value::Null,
    }
}

fn event_json(e: &pb::TaskEvent) -> Value {
    let from = match pb::TaskStatus::try_from(e.from_status) {
        Ok(pb::TaskStatus::Unspecified) | Err(_) => Value::Null,
        Ok(_) => Value::String(status_word(e.from_status).to_owned()),
    };
    json!({
        "at": rfc3339(e.at_ms),
        "kind": e.kind,
        "from": from,
        "to": status_word(e.to_status),
        "message": e.message,
    })
}

pub fn status(s: &pb::GetStatusResponse, as_json: bool) {
    if as_json {
        print_json(&json!({
            "open": s.open,
            "in_progress": s.in_progress,
            "verified": s.verified,
            "done": s.done,
            "needs_help": s.needs_help,
            "cancelled": s.cancelled,
            "active_dev_runs": s.active_dev_runs,
            "runners": s.runners,
            "base": s.base,
            "health": if s.unhealthy.is_some() { "unhealthy" } else { "healthy" },
            "health_reason": s.unhealthy,
        }));
        return;
    }
    if let Some(why) = &s.unhealthy {
        println!("health:          UNHEALTHY: {why}");
    }
    println!("base branch:     {}", s.base);
    println!("open:            {}", s.open);
    println!("in progress:     {}", s.in_progress);
    println!("verified:        {}", s.verified);
    println!("done:            {}", s.done);
    println!("needs help:      {}", s.needs_help);
    println!("cancelled:       {}", s.cancelled);
    println!("active dev runs: {}", s.active_dev_runs);
    println!("runners:         {}", s.runners);
}

pub fn task_list(tasks: &[pb::Task], as_json: bool) {
    if as_json {
        print_json(&Value::Array(tasks.iter().map(task_json).collect()));
        return;
    }
    if tasks.is_empty() {
        println!("no tasks");
        return;
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                status_word(t.status).to_owned(),
                format!("P{}", t.priority),
                t.patchset.to_string(),
                t.failures.to_string(),
                if t.depends_on.is_empty() {
                    "-".to_owned()
                } else {
                    t.depends_on.join(",")
                },
                t.title.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "STATUS",
            "PRI",
            "PATCHSET",
            "FAILURES",
            "DEPENDS ON",
            "TITLE",
        ],
        &rows,
    );
}

pub fn task_detail(d: &pb::GetTaskResponse, as_json: bool) -> Result<(), Failure> {
    let t = d
        .task
        .as_ref()
        .ok_or_else(|| Failure::internal("the server answered without the task".into()))?;
    if as_json {
        let mut value = task_json(t);
        value["runs"] = Value::Array(d.runs.iter().map(run_json).collect());
        value["events"] = Value::Array(d.events.iter().map(event_json).collect());
        print_json(&value);
        return Ok(());
    }
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    println!("{}  {}", t.id, agent_text(&t.title));
    println!("status:      {}", status_word(t.status));
    for why in &t.waiting_for {
        println!("waiting:     {why}");
    }
    println!("priority:    P{}", t.priority);
    println!("namespace:   {}", or_dash(&t.namespace));
    println!("parent:      {}", or_dash(&t.parent));
    let deps = if t.depends_on.is_empty() {
        "-".to_owned()
    } else {
        t.depends_on.join(", ")
    };
    println!("depends on:  {deps}");
    println!("patchset:    {}", t.patchset);
    println!("failures:    {}", t.failures);
    println!("cost:        {} cents", t.cost_cents);
    if let Some(until) = t.backoff_until_ms {
        println!("back-off:    until {}", rfc3339(until));
    }
    println!("created:     {}", rfc3339(t.created_at_ms));
    println!("updated:     {}", rfc3339(t.updated_at_ms));
    if !t.description.is_empty() {
        println!("\ndescription:");
        for line in t.description.lines() {
            println!("  {}", agent_text(line));
        }
    }
    if let Some(feedback) = &t.feedback {
        println!("\nlast rejection:");
        for line in feedback.lines() {
            println!("  {}", agent_text(line));
        }
    }
    println!("\nruns:");
    if d.runs.is_empty() {
        println!("  none yet");
    } else {
        let rows: Vec<Vec<String>> = d
            .runs
            .iter()
            .map(|r| {
                vec![
                    format!("  {}", phase_word(r.phase)),
                    r.attempt.to_string(),
                    r.patchset.to_string(),
                    r.runner.clone().unwrap_or_else(|| "(server)".into()),
                    run_status_word(r.status).to_owned(),
                    r.cost_cents.to_string(),
                    rfc3339(r.started_at_ms),
                    r.finished_at_ms.map_or_else(|| "-".into(), rfc3339),
                    agent_text(
                        r.error
                            .as_deref()
                            .map(one_line_summary)
                            .as_deref()
                            .unwrap_or("-"),
                    )
                    .into_owned(),
                ]
            })
            .collect();
        print_table(
            &[
                "  PHASE", "ATTEMPT", "PATCHSET", "RUNNER", "STATUS", "COST", "STARTED",
                "FINISHED", "ERROR",
            ],
            &rows,
        );
    }
    println!("\nhistory:");
    for e in &d.events {
        println!(
            "  {}  {:<18}  {:<11}  {}",
            rfc3339(e.at_ms),
            e.kind,
            status_word(e.to_status),
            agent_text(&e.message)
        );
    }
    Ok(())
}

pub fn runners(runners: &[pb::Runner], as_json: bool) {
    if as_json {
        let values = runners
            .iter()
            .map(|r| {
                json!({
                    "id": r.id,
                    "name": r.name,
                    "state": runner_state_word(r.state),
                    "slots_used": r.slots_used,
                    "slots_total": r.slots_total,
                    "last_heartbeat": time_or_null(r.last_heartbeat_ms),
                    "labels": r.labels,
                    "version": r.version,
                    "health": if r.unhealthy_reason.is_some() { "unhealthy" } else { "healthy" },
                    "health_reason": r.unhealthy_reason,
                })
            })
            .collect();
        print_json(&Value::Array(values));
        return;
    }
    if runners.is_empty() {
        println!("no runners");
        return;
    }
    let rows: Vec<Vec<String>> = runners
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                runner_state_word(r.state).to_owned(),
                format!("{}/{}", r.slots_used, r.slots_total),
                r.last_heartbeat_ms.map_or_else(|| "-".into(), rfc3339),
                match &r.unhealthy_reason {
                    Some(why) => format!("unhealthy: {why}"),
                    None => "healthy".to_owned(),
                },
            ]
        })
        .collect();
    print_table(
        &["NAME", "STATE", "SLOTS", "LAST HEARTBEAT", "HEALTH"],
        &rows,
    );
}

fn stream_word(raw: i32) -> &'static str {
    match pb::LogStream::try_from(raw) {
        Ok(pb::LogStream::Stdout) => "stdout",
        Ok(pb::LogStream::Stderr) => "stderr",
        Ok(pb::LogStream::Runner) => "runner",
        Ok(pb::LogStream::Server) => "server",
        _ => "?",
    }
}

/// Prints a `logs` stream: a header per run (and per phase within it), each line with its
/// time and stream, and a marker where lines were cut.
/// Lines are shown escaped when printing to a terminal ([`terminal_safe`]).
#[derive(Default)]
pub struct LogPrinter {
    runs: std::collections::HashMap<i64, pb::LogRunHeader>,
    current: Option<(i64, i32)>,
    last_seq: std::collections::HashMap<i64, u64>,
    terminal: bool,
}

impl LogPrinter {
    /// A printer for stdout; `terminal` when it is one.
    pub fn new(terminal: bool) -> Self {
        Self {
            terminal,
            ..Self::default()
        }
    }

    /// Prints one message; returns the task's status when the message is one.
    pub fn print(&mut self, msg: pb::TaskLogsResponse) -> Option<&'static str> {
        use pb::task_logs_response::Kind;
        match msg.kind? {
            Kind::Run(header) => {
                self.runs.insert(header.run_id, header);
                None
            }
            Kind::EncodedLines(bytes) => {
                match <pb::LogBatch as prost::Message>::decode(bytes.as_ref()) {
                    Ok(batch) => self.print(pb::TaskLogsResponse {
                        kind: Some(Kind::Lines(batch)),
                    }),
                    Err(e) => {
                        eprintln!("pipelinectl: a log batch could not be decoded: {e}");
                        None
                    }
                }
            }
            Kind::Lines(batch) => {
                for line in &batch.lines {
                    if self.current != Some((batch.run_id, line.phase)) {
                        self.current = Some((batch.run_id, line.phase));
                        let header = self.runs.get(&batch.run_id);
                        let attempt = header.map_or(0, |h| h.attempt);
                        let runner = header
                            .and_then(|h| h.runner.clone())
                            .unwrap_or_else(|| "server".to_owned());
                        println!(
                            "=== {} · attempt {attempt} · {runner} ===",
                            phase_word(line.phase)
                        );
                    }
                    // A gap between two lines of a run means lines were cut (a run's first
                    // line may come after lines of another run of the same lease).
                    let last = self.last_seq.get(&batch.run_id).copied();
                    if let Some(last) = last
                        && line.seq > last.saturating_add(1)
                    {
                        println!(
                            "[… lines {}–{} cut: the run's log passed its size cap …]",
                            last + 1,
                            line.seq - 1
                        );
                    }
                    self.last_seq.insert(batch.run_id, line.seq);
                    println!(
                        "{} {:<6} {}",
                        rfc3339(line.at_ms),
                        stream_word(line.stream),
                        shown(&line.text, self.terminal)
                    );
                }
                None
            }
            Kind::Status(raw) => Some(status_word(raw)),
        }
    }
}

/// A reason of several lines as one: its first line, and when that ends with a colon (a
/// command's output follows), the last line of what follows, which is usually the error.
pub fn one_line_summary(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    match first.strip_suffix(':') {
        Some(head) => match lines.next_back() {
            Some(last) => format!("{head}: … {last}"),
            None => head.to_owned(),
        },
        None => first.to_owned(),
    }
}

/// Prints one task transition, as a line or as JSON.
pub fn transition(t: &pb::TaskTransition, as_json: bool) {
    let from = match pb::TaskStatus::try_from(t.from_status) {
        Ok(pb::TaskStatus::Unspecified) | Err(_) => None,
        Ok(_) => Some(status_word(t.from_status)),
    };
    if as_json {
        println!(
            "{}",
            json!({
                "at": rfc3339(t.at_ms),
                "task": t.task_id,
                "kind": t.kind,
                "from": from,
                "to": status_word(t.to_status),
                "message": t.message,
            })
        );
    } else {
        println!(
            "{} {} {} -> {} ({}) {}",
            rfc3339(t.at_ms),
            t.task_id,
            from.unwrap_or("-"),
            status_word(t.to_status),
            t.kind,
            agent_text(&one_line_summary(&t.message))
        );
    }
    // A pipe reader (`| grep`) sees each transition at once.
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod summary_tests {
    use super::one_line_summary;

    #[test]
    fn a_reason_ending_in_a_colon_shows_what_followed() {
        assert_eq!(
            one_line_summary("agent failed (exit 1)"),
            "agent failed (exit 1)"
        );
        assert_eq!(
            one_line_summary("build failed (exit 1): make test:\ncc x.c\nerror: x.c:3: bad\n"),
            "build failed (exit 1): make test: … error: x.c:3: bad"
        );
        assert_eq!(one_line_summary("tests failed:"), "tests failed");
        assert_eq!(one_line_summary("\n\n  first\nsecond"), "first");
        assert_eq!(one_line_summary(""), "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_controls_are_shown_escaped_for_a_terminal() {
        let cases = [
            ("plain text, with a\ttab", "plain text, with a\ttab"),
            ("\u{1b}[31mred\u{1b}[0m", "\\x1b[31mred\\x1b[0m"),
            ("\u{1b}]0;title\u{7}", "\\x1b]0;title\\x07"),
            ("over\rwrite", "over\\x0dwrite"),
            ("nul\0", "nul\\x00"),
            ("del\u{7f}", "del\\x7f"),
            ("csi\u{9b}2J", "csi\\u{9b}2J"),
            ("bidi \u{202e}txt.exe", "bidi \\u{202e}txt.exe"),
            ("isolate \u{2066}x\u{2069}", "isolate \\u{2066}x\\u{2069}"),
            ("unicode é ✓ stays", "unicode é ✓ stays"),
            ("a\\x1b stays as typed", "a\\x1b stays as typed"),
        ];
        for (raw, shown) in cases {
            assert_eq!(terminal_safe(raw), shown, "{raw:?}");
        }
        assert!(
            matches!(
                terminal_safe("nothing to do"),
                std::borrow::Cow::Borrowed(_)
            ),
            "no copy when nothing changes"
        );
    }

    #[test]
    fn only_a_terminal_gets_the_escaped_form() {
        let line = "\u{1b}[2Jgone";
        assert_eq!(shown(line, true), "\\x1b[2Jgone");
        assert_eq!(
            shown(line, false),
            line,
            "a pipe gets the bytes as they are"
        );
    }
}
