//! What `pipelinectl` prints: aligned tables for people, and for `--json` the shapes of
//! `CONTRACT.md` (statuses as lowercase words, times as RFC 3339 strings, absent values as null).
//! Every function prints view values (`model.rs`, never a protocol type) to the writer it is
//! given; `main` hands it stdout, the snapshot tests a buffer.
//!
//! Text that comes from agents and builds (log lines, run errors, rejection feedback, event
//! messages) is shown escaped when stdout is a terminal ([`terminal_safe`]): an escape sequence
//! in an agent's output must not reach a person's terminal, where it could retitle the window,
//! move the cursor, rewrite what was printed or worse. Piped or redirected, the text is
//! printed as it was written (scripts and files get the bytes); `--json` is JSON-escaped anyway.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, IsTerminal, Write};

use pipeline_api::json;
use serde_json::Value;

use crate::model::{
    CostSource, Health, LogItem, LogLine, LogRun, Phase, Queue, Run, Runner, Status, Task,
    TaskDetail, TaskStatus, Train, Transition, Usage,
};
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

/// How a command prints: JSON for scripts, or text for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    /// Aligned text; `terminal` when it goes to one, so that text from agents and builds is
    /// shown escaped ([`terminal_safe`]).
    Text {
        terminal: bool,
    },
}

impl Format {
    /// JSON with `--json`, else text for this process's stdout.
    pub fn for_stdout(json: bool) -> Self {
        if json {
            Format::Json
        } else {
            Format::Text {
                terminal: stdout_is_terminal(),
            }
        }
    }
}

fn print_json(out: &mut impl Write, value: &Value) -> io::Result<()> {
    writeln!(out, "{}", json::pretty(value))
}

/// Prints rows under a header, each column as wide as its widest cell.
fn print_table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let widths = column_widths(header, rows);
    print_row(out, &widths, header)?;
    for row in rows {
        print_row(out, &widths, row)?;
    }
    Ok(())
}

/// Each column as wide as its widest cell (the header's included).
fn column_widths(header: &[&str], rows: &[Vec<String>]) -> Vec<usize> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    widths
}

/// One row, each cell but the last padded to its column's width.
fn print_row(out: &mut impl Write, widths: &[usize], cells: &[impl AsRef<str>]) -> io::Result<()> {
    let last = cells.len().saturating_sub(1);
    let mut text = String::new();
    for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
        if i == last {
            text.push_str(cell.as_ref());
        } else {
            text.push_str(&format!("{:<w$}  ", cell.as_ref()));
        }
    }
    writeln!(out, "{}", text.trim_end())
}

/// A count with thousands separators: `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// Cents to at most two decimals, without trailing zeros: `42.5`, `30`, `0.03`.
fn cents(c: f64) -> String {
    let text = format!("{c:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// A run's tokens, briefly: `12,345/2,345` (in/out), marked when the figure is a lower bound.
fn tokens_brief(u: &Usage) -> String {
    let mut text = format!(
        "{}/{}",
        thousands(u.input_tokens),
        thousands(u.output_tokens)
    );
    if !u.complete {
        text.push_str(" (incomplete)");
    }
    text
}

/// The usage of a task's dev runs together, for `task show`: `12,345 in / 2,345 out tokens,
/// 42.5 cents (1 figure incomplete)`; `None` when no run reported any.
fn usage_total(runs: &[Run]) -> Option<String> {
    let reports: Vec<&Usage> = runs.iter().filter_map(|r| r.usage.as_ref()).collect();
    if reports.is_empty() {
        return None;
    }
    let sum = |f: fn(&Usage) -> u64| reports.iter().fold(0u64, |n, u| n.saturating_add(f(u)));
    let cost: f64 = reports.iter().map(|u| u.cost_cents).sum();
    let mut text = format!(
        "{} in / {} out tokens, {} cents",
        thousands(sum(|u| u.input_tokens)),
        thousands(sum(|u| u.output_tokens)),
        cents(cost)
    );
    match reports.iter().filter(|u| !u.complete).count() {
        0 => {}
        1 => text.push_str(" (1 figure incomplete)"),
        n => text.push_str(&format!(" ({n} figures incomplete)")),
    }
    Some(text)
}

pub fn status(out: &mut impl Write, s: &Status, format: Format) -> io::Result<()> {
    if format == Format::Json {
        return print_json(out, &json::status(s));
    }
    if let Some(why) = s.health.reason() {
        writeln!(out, "health:          UNHEALTHY: {why}")?;
    }
    if let Some(role) = s.server.as_ref().filter(|r| r.role == "standby") {
        let leader = role.leader.as_deref().map_or_else(
            || "no leader known yet".to_owned(),
            |url| format!("the leader is at {}", terminal_safe(url)),
        );
        writeln!(out, "server:          STANDBY: {leader}")?;
    }
    if let Some(red) = &s.red_base {
        writeln!(
            out,
            "leases:          PAUSED while the base is red at {red}; they go on once it is green \
             again (pipelinectl queue resume goes on now)"
        )?;
    } else if s.queue_paused {
        let since = s
            .queue_paused_at_ms
            .map(|at| format!(" since {}", rfc3339(at)))
            .unwrap_or_default();
        let why = s
            .queue_pause_reason
            .as_deref()
            .map(|r| format!(": {}", terminal_safe(r)))
            .unwrap_or_default();
        writeln!(
            out,
            "leases:          PAUSED by pipelinectl queue pause{since}{why} (pipelinectl queue resume)"
        )?;
    }
    if let Some(why) = s.landing.reason() {
        writeln!(out, "landing:         PAUSED: {}", terminal_safe(why))?;
    }
    match s.sandbox.as_deref() {
        Some("off") => writeln!(
            out,
            "sandbox:         OFF: builds and local agents can read the server's tokens and database (--no-sandbox)"
        )?,
        Some(kind) => writeln!(out, "sandbox:         {kind}")?,
        None => {}
    }
    writeln!(out, "base branch:     {}", s.base)?;
    writeln!(out, "open:            {}", s.open)?;
    writeln!(out, "in progress:     {}", s.in_progress)?;
    writeln!(out, "verified:        {}", s.verified)?;
    writeln!(out, "done:            {}", s.done)?;
    writeln!(out, "needs help:      {}", s.needs_help)?;
    writeln!(out, "cancelled:       {}", s.cancelled)?;
    writeln!(out, "active dev runs: {}", s.active_dev_runs)?;
    writeln!(out, "runners:         {}", s.runners)?;
    if let Some(b) = s.builds_per_landed {
        writeln!(out, "builds/landed:   {b:.2} (last hour)")?;
    }
    if let (Some(depth), Some(slots)) = (s.integration_depth, s.integration_slots)
        && slots > 1
    {
        writeln!(out, "trains at once:  {depth} of at most {slots}")?;
    }
    if s.cost_cents_last_day > 0.0 || s.tokens_last_day > 0 {
        writeln!(
            out,
            "last day:        {} cents, {} tokens",
            cents(s.cost_cents_last_day),
            thousands(s.tokens_last_day)
        )?;
    }
    for w in &s.webhooks {
        let last = w
            .last_delivered_at_ms
            .map_or("nothing delivered yet".to_owned(), |at| {
                format!("last delivered {}", rfc3339(at))
            });
        let pending = match &w.pending {
            Some(p) => format!(
                "; RETRYING {} ({}) after {} failed attempt{}{}",
                p.id,
                p.kind,
                p.attempts,
                if p.attempts == 1 { "" } else { "s" },
                p.next_attempt_at_ms
                    .map(|at| format!(", next at {}", rfc3339(at)))
                    .unwrap_or_default()
            ),
            None => String::new(),
        };
        let error = match (&w.last_error, w.last_error_at_ms) {
            (Some(e), Some(at)) => format!("; last error at {}: {}", rfc3339(at), terminal_safe(e)),
            (Some(e), None) => format!("; last error: {}", terminal_safe(e)),
            _ => String::new(),
        };
        writeln!(
            out,
            "webhook:         {} {last}{pending}{error}",
            terminal_safe(&w.url)
        )?;
    }
    Ok(())
}

/// The merge train now and the tasks behind it.
pub fn queue(out: &mut impl Write, q: &Queue, format: Format) -> io::Result<()> {
    if format == Format::Json {
        return print_json(out, &json::queue(q));
    }
    if let Some(red) = &q.red_base {
        writeln!(
            out,
            "leases:  PAUSED while the base is red at {red} (pipelinectl queue resume goes on now)"
        )?;
    } else if q.queue_paused {
        let why = q
            .queue_pause_reason
            .as_deref()
            .map(|r| format!(": {}", terminal_safe(r)))
            .unwrap_or_default();
        writeln!(out, "leases:  PAUSED{why} (pipelinectl queue resume)")?;
    }
    if let Some(why) = q.landing.reason() {
        writeln!(out, "landing: PAUSED: {}", terminal_safe(why))?;
    }
    // Every train in flight, the one that lands next first (an older server: its one train).
    let trains: Vec<&Train> = if q.trains.is_empty() {
        q.train.iter().collect()
    } else {
        q.trains.iter().collect()
    };
    if trains.is_empty() {
        writeln!(out, "train:   none")?;
    }
    for t in trains {
        write!(
            out,
            "train {}: {} ({})",
            t.id,
            terminal_safe(&t.step),
            t.tasks.join(", ")
        )?;
        match t.ahead {
            Some(ahead) => writeln!(out, ", speculative on train {ahead}'s tip")?,
            None => writeln!(out)?,
        }
    }
    if !q.running.is_empty() {
        writeln!(out, "in progress ({}):", q.running.len())?;
        let rows: Vec<Vec<String>> = q
            .running
            .iter()
            .map(|r| vec![r.id.clone(), r.runner.clone(), rfc3339(r.since_ms)])
            .collect();
        print_table(out, &["ID", "RUNNER", "LEASED"], &rows)?;
    }
    match (q.waiting.is_empty(), q.running.is_empty()) {
        (true, true) => return writeln!(out, "nothing in progress or waiting"),
        (true, false) => return writeln!(out, "waiting: nothing"),
        (false, true) => {}
        (false, false) => writeln!(out, "waiting ({}):", q.waiting.len())?,
    }
    let rows: Vec<Vec<String>> = q
        .waiting
        .iter()
        .map(|w| {
            vec![
                w.position.to_string(),
                w.id.clone(),
                w.status.word().to_owned(),
                w.eta_seconds.map_or_else(
                    || "-".to_owned(),
                    |s| match w.status {
                        TaskStatus::Verified => format!("lands ~{}s", s.round()),
                        _ => format!("starts ~{}s", s.round()),
                    },
                ),
                if w.waiting_for.is_empty() {
                    "-".to_owned()
                } else {
                    terminal_safe(&w.waiting_for.join("; ")).into_owned()
                },
            ]
        })
        .collect();
    print_table(out, &["#", "ID", "STATUS", "ETA", "WAITING FOR"], &rows)
}

const TASK_LIST_HEADER: [&str; 7] = [
    "ID",
    "STATUS",
    "PRI",
    "PATCHSET",
    "FAILURES",
    "DEPENDS ON",
    "TITLE",
];

/// `task list` printed page by page as the pages arrive, in bounded memory: the table's
/// columns take their widths from the first page; the JSON is one array, written as it goes.
pub struct TaskListPrinter {
    format: Format,
    widths: Option<Vec<usize>>,
    printed: usize,
}

impl TaskListPrinter {
    pub fn new(format: Format) -> Self {
        Self {
            format,
            widths: None,
            printed: 0,
        }
    }

    /// Prints one page.
    pub fn page(&mut self, out: &mut impl Write, tasks: &[Task]) -> io::Result<()> {
        if self.format == Format::Json {
            for t in tasks {
                let one = json::pretty(&json::task(t));
                out.write_all(if self.printed == 0 { b"[\n" } else { b",\n" })?;
                for (i, line) in one.lines().enumerate() {
                    if i > 0 {
                        out.write_all(b"\n")?;
                    }
                    write!(out, "  {line}")?;
                }
                self.printed += 1;
            }
            return Ok(());
        }
        let rows: Vec<Vec<String>> = tasks
            .iter()
            .map(|t| {
                vec![
                    t.id.clone(),
                    t.status.word().to_owned(),
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
        if rows.is_empty() {
            return Ok(());
        }
        let widths = match &self.widths {
            Some(w) => w,
            None => {
                let w = column_widths(&TASK_LIST_HEADER, &rows);
                print_row(out, &w, &TASK_LIST_HEADER)?;
                self.widths.insert(w)
            }
        };
        for row in &rows {
            print_row(out, widths, row)?;
        }
        self.printed += rows.len();
        Ok(())
    }

    /// Ends the list.
    pub fn finish(&mut self, out: &mut impl Write) -> io::Result<()> {
        match (self.format, self.printed) {
            (Format::Json, 0) => writeln!(out, "[]"),
            (Format::Json, _) => writeln!(out, "\n]"),
            (_, 0) => writeln!(out, "no tasks"),
            _ => Ok(()),
        }
    }
}

/// Why a task is where it is, in sentences (`pipelinectl explain`).
pub fn explain(out: &mut impl Write, d: &TaskDetail) -> io::Result<()> {
    let t = &d.task;
    let title = terminal_safe(&t.title);
    let done_children = d
        .children
        .iter()
        .filter(|(_, s)| *s == TaskStatus::Done)
        .count();
    let last_kind = d.events.last().map(|e| e.kind.as_str());
    let state = match t.status {
        // An epic: its children do the work.
        TaskStatus::Open | TaskStatus::NeedsHelp if t.epic && d.children.is_empty() => {
            "is an epic with no children yet: it is never leased itself, and is done once the \
             children added to it are"
                .to_owned()
        }
        TaskStatus::Open | TaskStatus::NeedsHelp if !d.children.is_empty() => format!(
            "is an epic: it is done when its children are ({done_children} of {} done, {} \
             cents so far)",
            d.children.len(),
            d.children_cost_cents
        ),
        TaskStatus::Done if !d.children.is_empty() => format!(
            "is an epic, done with its children ({done_children} of {} done, {} cents)",
            d.children.len(),
            d.children_cost_cents
        ),
        TaskStatus::NeedsHelp if last_kind == Some("epic_cap") => {
            "needs help: its epic's cap is spent, so it is not leased again".to_owned()
        }
        TaskStatus::Open if t.patchset == 0 && t.failures == 0 => {
            "is open and has not been worked on yet".to_owned()
        }
        TaskStatus::Open => format!(
            "is open: it goes back to an agent for patchset {} after {} failed attempt{}",
            t.patchset + 1,
            t.failures,
            if t.failures == 1 { "" } else { "s" }
        ),
        TaskStatus::InProgress => match d
            .runs
            .iter()
            .rev()
            .find(|r| r.status == crate::model::RunStatus::Running)
        {
            Some(r) => format!(
                "is in progress: its {} run (attempt {}) is running on {} since {}",
                r.phase.word(),
                r.attempt,
                r.runner.as_deref().unwrap_or("the server"),
                rfc3339(r.started_at_ms)
            ),
            None => "is in progress".to_owned(),
        },
        TaskStatus::Verified if last_kind == Some("checking_base") => {
            "is verified, not charged yet: its runner's verification failed, and the server \
             builds the base alone to learn whether the base itself is red"
                .to_owned()
        }
        TaskStatus::Verified if last_kind == Some("base_red") => {
            "is verified without a pass: its runner's verification failed on a base that is red \
             itself, so nobody was charged; its commit is built on the base once the base is \
             green again, and lands if it builds green there"
                .to_owned()
        }
        TaskStatus::Verified => {
            "is verified: its commit passed on its runner and waits to land on the base".to_owned()
        }
        TaskStatus::Done => "is done: its commit is on the base".to_owned(),
        TaskStatus::NeedsHelp => format!(
            "needs help: it stopped after {} failed attempt{} (pipelinectl task retry {} to go on)",
            t.failures,
            if t.failures == 1 { "" } else { "s" },
            t.id
        ),
        TaskStatus::Cancelled => {
            format!(
                "is cancelled (pipelinectl task retry {} to reopen it)",
                t.id
            )
        }
        TaskStatus::Unknown => "is in a state this pipelinectl does not know".to_owned(),
    };
    writeln!(out, "{} ({title}) {state}.", t.id)?;
    if t.waiting_for.is_empty()
        && matches!(t.status, TaskStatus::Open | TaskStatus::Verified)
        && !t.epic
    {
        writeln!(
            out,
            "Nothing holds it: it goes next when a slot (or the merge train) is free."
        )?;
    }
    for why in &t.waiting_for {
        writeln!(
            out,
            "It waits: {}.",
            terminal_safe(why.trim_end_matches('.'))
        )?;
    }
    if let Some(feedback) = &t.feedback
        && !t.status.is_final()
    {
        writeln!(
            out,
            "Its last attempt was rejected: {}",
            terminal_safe(&one_line_summary(feedback))
        )?;
    }
    if t.cost_cents > 0.0 {
        writeln!(out, "It has cost {} cents so far.", t.cost_cents)?;
    }
    Ok(())
}

pub fn task_detail(out: &mut impl Write, d: &TaskDetail, format: Format) -> io::Result<()> {
    let t = &d.task;
    let terminal = match format {
        Format::Json => return print_json(out, &json::task_detail(d)),
        Format::Text { terminal } => terminal,
    };
    let agent_text = |text: &str| shown(text, terminal).into_owned();
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    writeln!(out, "{}  {}", t.id, agent_text(&t.title))?;
    writeln!(out, "status:      {}", t.status.word())?;
    for why in &t.waiting_for {
        writeln!(out, "waiting:     {why}")?;
    }
    writeln!(out, "priority:    P{}", t.priority)?;
    writeln!(out, "namespace:   {}", or_dash(&t.namespace))?;
    writeln!(out, "parent:      {}", or_dash(&t.parent))?;
    let deps = if t.depends_on.is_empty() {
        "-".to_owned()
    } else {
        t.depends_on.join(", ")
    };
    writeln!(out, "depends on:  {deps}")?;
    if t.epic && d.children.is_empty() {
        writeln!(
            out,
            "children:    none yet (an epic: add them with --parent {})",
            t.id
        )?;
    }
    if !d.children.is_empty() {
        let done = d
            .children
            .iter()
            .filter(|(_, s)| *s == TaskStatus::Done)
            .count();
        let listed: Vec<String> = d
            .children
            .iter()
            .map(|(id, s)| format!("{id} ({})", s.word()))
            .collect();
        writeln!(
            out,
            "children:    {done} of {} done, {} cents together: {}",
            d.children.len(),
            d.children_cost_cents,
            listed.join(", ")
        )?;
    }
    if !t.requires.is_empty() {
        writeln!(out, "requires:    {}", t.requires.join(", "))?;
    }
    writeln!(out, "patchset:    {}", t.patchset)?;
    if let Some(commit) = &d.offered_commit {
        writeln!(
            out,
            "offered:     {commit} (before its runner's verification ends; its train may be \
             building)"
        )?;
    }
    if let Some(approval) = &t.approval {
        writeln!(out, "approval:    {approval}")?;
    }
    writeln!(out, "failures:    {}", t.failures)?;
    match t.max_cost_cents {
        Some(cap) => writeln!(
            out,
            "cost:        {} cents (its cap: {cap} cents)",
            t.cost_cents
        )?,
        None => writeln!(out, "cost:        {} cents", t.cost_cents)?,
    }
    if let Some(total) = usage_total(&d.runs) {
        writeln!(out, "usage:       {total}")?;
    }
    if let Some(until) = t.backoff_until_ms {
        writeln!(out, "back-off:    until {}", rfc3339(until))?;
    }
    writeln!(out, "created:     {}", rfc3339(t.created_at_ms))?;
    writeln!(out, "updated:     {}", rfc3339(t.updated_at_ms))?;
    if !t.description.is_empty() {
        writeln!(out, "\ndescription:")?;
        for line in t.description.lines() {
            writeln!(out, "  {}", agent_text(line))?;
        }
    }
    if let Some(feedback) = &t.feedback {
        writeln!(out, "\nlast rejection:")?;
        for line in feedback.lines() {
            writeln!(out, "  {}", agent_text(line))?;
        }
    }
    writeln!(out, "\nruns:")?;
    if d.runs.is_empty() {
        writeln!(out, "  none yet")?;
    } else {
        let rows: Vec<Vec<String>> = d
            .runs
            .iter()
            .map(|r| {
                vec![
                    format!("  {}", r.phase.word()),
                    r.attempt.to_string(),
                    r.patchset.to_string(),
                    r.runner.clone().unwrap_or_else(|| "(server)".into()),
                    r.status.word().to_owned(),
                    match &r.usage {
                        Some(u) if u.cost_source == CostSource::Estimated => {
                            format!("{} (est.)", cents(r.cost_cents))
                        }
                        _ => cents(r.cost_cents),
                    },
                    r.usage
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), tokens_brief),
                    rfc3339(r.started_at_ms),
                    r.finished_at_ms.map_or_else(|| "-".into(), rfc3339),
                    agent_text(
                        r.error
                            .as_deref()
                            .map(one_line_summary)
                            .as_deref()
                            .unwrap_or("-"),
                    ),
                ]
            })
            .collect();
        print_table(
            out,
            &[
                "  PHASE",
                "ATTEMPT",
                "PATCHSET",
                "RUNNER",
                "STATUS",
                "COST",
                "TOKENS IN/OUT",
                "STARTED",
                "FINISHED",
                "ERROR",
            ],
            &rows,
        )?;
    }
    writeln!(out, "\nhistory:")?;
    for e in &d.events {
        writeln!(
            out,
            "  {}  {:<18}  {:<11}  {}",
            rfc3339(e.at_ms),
            e.kind,
            e.to.word(),
            agent_text(&e.message)
        )?;
    }
    Ok(())
}

pub fn runners(out: &mut impl Write, runners: &[Runner], format: Format) -> io::Result<()> {
    if format == Format::Json {
        return print_json(out, &json::runners(runners));
    }
    if runners.is_empty() {
        return writeln!(out, "no runners");
    }
    let rows: Vec<Vec<String>> = runners
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.state.word().to_owned(),
                format!("{}/{}", r.slots_used, r.slots_total),
                r.last_heartbeat_ms.map_or_else(|| "-".into(), rfc3339),
                if r.labels.is_empty() {
                    "-".to_owned()
                } else {
                    r.labels.join(",")
                },
                match &r.health {
                    Health::Unhealthy(why) => format!("unhealthy: {}", terminal_safe(why)),
                    Health::Healthy => "healthy".to_owned(),
                },
            ]
        })
        .collect();
    print_table(
        out,
        &[
            "NAME",
            "STATE",
            "SLOTS",
            "LAST HEARTBEAT",
            "LABELS",
            "HEALTH",
        ],
        &rows,
    )
}

/// Prints a `logs` stream: a header per run (and per phase within it), each line with its
/// time and stream, and a marker where lines were cut.
/// Lines are shown escaped when printing to a terminal ([`terminal_safe`]).
#[derive(Default)]
pub struct LogPrinter {
    runs: HashMap<i64, LogRun>,
    current: Option<(i64, Phase)>,
    last_seq: HashMap<i64, u64>,
    terminal: bool,
    /// Only the runs of this attempt (`logs --run N`).
    pub attempt: Option<u32>,
    /// Only lines from this time on (`logs --since`), ms since the epoch.
    pub since_ms: Option<i64>,
    /// Keep only the last this many lines until [`LogPrinter::flush_tail`] (`logs --tail`).
    pub tail: Option<usize>,
    /// The agent's output as received instead of its readable rendering (`logs --raw`).
    pub raw: bool,
    /// Runs that have raw lines: their stdout lines are the rendering of those.
    raw_runs: std::collections::HashSet<i64>,
    /// Lines `--tail` holds back, each with whether it is left out (it still moves the run's
    /// line numbering on), and how many are not.
    held: std::collections::VecDeque<(i64, LogLine, bool)>,
    held_shown: usize,
}

impl LogPrinter {
    /// A printer for `out` in [`LogPrinter::print`]; `terminal` when it is one.
    pub fn new(terminal: bool) -> Self {
        Self {
            terminal,
            ..Self::default()
        }
    }

    /// Prints one item; returns the task's status when the item is one.
    pub fn print(&mut self, out: &mut impl Write, item: LogItem) -> io::Result<Option<TaskStatus>> {
        match item {
            LogItem::Run(run) => {
                self.runs.insert(run.run_id, run);
            }
            LogItem::Undecodable(why) => {
                eprintln!("pipelinectl: a log batch could not be decoded: {why}");
            }
            LogItem::Lines { run_id, lines } => {
                for line in &lines {
                    self.line(out, run_id, line)?;
                }
            }
            LogItem::Status(status) => return Ok(Some(status)),
        }
        Ok(None)
    }

    /// The attempts of the runs seen so far (for `--run N` of one there is not), highest last.
    pub fn attempts(&self) -> Vec<u32> {
        let mut seen: Vec<u32> = self.runs.values().map(|r| r.attempt).collect();
        seen.sort_unstable();
        seen.dedup();
        seen
    }

    /// Prints the lines `--tail` held back, and prints lines as they come from then on.
    pub fn flush_tail(&mut self, out: &mut impl Write) -> io::Result<()> {
        self.tail = None;
        self.held_shown = 0;
        for (run_id, line, _) in std::mem::take(&mut self.held) {
            self.line(out, run_id, &line)?;
        }
        Ok(())
    }

    /// Whether `line` is left out: the agent's output as received unless `--raw`; with it, the
    /// readable rendering of that output (stdout of a run that has raw lines, which come
    /// before what is made of them).
    fn hides(&mut self, run_id: i64, line: &LogLine) -> bool {
        if line.stream == crate::model::LogStream::Raw {
            self.raw_runs.insert(run_id);
            return !self.raw;
        }
        self.raw
            && line.stream == crate::model::LogStream::Stdout
            && self.raw_runs.contains(&run_id)
    }

    fn line(&mut self, out: &mut impl Write, run_id: i64, line: &LogLine) -> io::Result<()> {
        if self
            .attempt
            .is_some_and(|a| self.runs.get(&run_id).is_some_and(|r| r.attempt != a))
        {
            return Ok(());
        }
        if self.since_ms.is_some_and(|since| line.at_ms < since) {
            // Left out on purpose: not a gap to report.
            self.last_seq.insert(run_id, line.seq);
            return Ok(());
        }
        // A line already printed (a stream read again after a reconnect) is not printed twice.
        if self
            .last_seq
            .get(&run_id)
            .is_some_and(|last| line.seq <= *last)
            || self
                .held
                .iter()
                .any(|(r, l, _)| *r == run_id && l.seq >= line.seq)
        {
            return Ok(());
        }
        let hidden = self.hides(run_id, line);
        if let Some(n) = self.tail {
            self.held.push_back((run_id, line.clone(), hidden));
            self.held_shown += usize::from(!hidden);
            while self.held_shown > n || self.held.front().is_some_and(|(_, _, hidden)| *hidden) {
                let Some((_, _, hidden)) = self.held.pop_front() else {
                    break;
                };
                self.held_shown -= usize::from(!hidden);
            }
            return Ok(());
        }
        if hidden {
            // Left out on purpose: not a gap to report.
            self.last_seq.insert(run_id, line.seq);
            return Ok(());
        }
        if self.current != Some((run_id, line.phase)) {
            self.current = Some((run_id, line.phase));
            let run = self.runs.get(&run_id);
            let attempt = run.map_or(0, |r| r.attempt);
            let runner = run
                .and_then(|r| r.runner.clone())
                .unwrap_or_else(|| "server".to_owned());
            writeln!(
                out,
                "=== {} · attempt {attempt} · {runner} ===",
                line.phase.word()
            )?;
        }
        // A gap between two lines of a run means lines were cut (a run's first line may come
        // after lines of another run of the same lease).
        let last = self.last_seq.get(&run_id).copied();
        if let Some(last) = last
            && line.seq > last.saturating_add(1)
        {
            writeln!(
                out,
                "[… lines {}–{} cut: the run's log passed its size cap …]",
                last + 1,
                line.seq - 1
            )?;
        }
        self.last_seq.insert(run_id, line.seq);
        writeln!(
            out,
            "{} {:<6} {}",
            rfc3339(line.at_ms),
            line.stream.word(),
            shown(&line.text, self.terminal)
        )
    }
}

/// A reason of several lines as one: its first line, and when that ends with a colon (a
/// command's output follows), the last line of what follows, which is usually the error (or,
/// when the last is a hint in parentheses, such as the sandbox's, the error and its hint).
pub fn one_line_summary(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    match first.strip_suffix(':') {
        Some(head) => match lines.next_back() {
            Some(hint) if hint.starts_with('(') => match lines.next_back() {
                Some(error) => format!("{head}: … {error} {hint}"),
                None => format!("{head}: … {hint}"),
            },
            Some(last) => format!("{head}: … {last}"),
            None => head.to_owned(),
        },
        None => first.to_owned(),
    }
}

/// Prints one task transition, as a line or as JSON, and flushes it (a pipe reader, `| grep`,
/// sees each transition at once).
/// One entry of the change feed: `<at> <topic> <subject> <kind>: <message>`, or its JSON.
pub fn feed_entry(
    out: &mut impl Write,
    e: &pipeline_api::model::FeedEntry,
    format: Format,
) -> io::Result<()> {
    match format {
        Format::Json => writeln!(out, "{}", json::feed_entry(e))?,
        Format::Text { terminal } => writeln!(
            out,
            "{} {} {} {}: {}",
            rfc3339(e.at_ms),
            e.topic,
            shown(&e.subject, terminal),
            e.kind,
            shown(&one_line_summary(&e.message), terminal)
        )?,
    }
    out.flush()
}

pub fn transition(out: &mut impl Write, t: &Transition, format: Format) -> io::Result<()> {
    let from = t.from.map(TaskStatus::word);
    match format {
        Format::Json => writeln!(out, "{}", json::transition(t))?,
        Format::Text { terminal } => writeln!(
            out,
            "{} {} {} -> {} ({}) {}",
            rfc3339(t.at_ms),
            t.task_id,
            from.unwrap_or("-"),
            t.to.word(),
            t.kind,
            shown(&one_line_summary(&t.message), terminal)
        )?,
    }
    out.flush()
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
        assert_eq!(
            one_line_summary("could not be run: a.sh:\nb.sh: Permission denied\n(in the sandbox)"),
            "could not be run: a.sh: … b.sh: Permission denied (in the sandbox)"
        );
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

/// Snapshots of what people read (`cargo insta review` after a deliberate change): built from
/// view values made by hand, at fixed times.
#[cfg(test)]
mod snapshots {
    use super::*;
    use crate::model::{
        FailureKind, Landing, LogStream, RunStatus, RunnerState, Running, TaskEvent, Waiting,
    };

    /// 2026-11-24T01:01:02.123Z, and `s` seconds later.
    fn at(s: i64) -> i64 {
        1_795_482_062_123 + s * 1000
    }

    const TEXT: Format = Format::Text { terminal: false };

    /// A whole list, as one page.
    fn whole_list(out: &mut impl Write, tasks: &[Task], format: Format) -> io::Result<()> {
        let mut printer = TaskListPrinter::new(format);
        printer.page(out, tasks)?;
        printer.finish(out)
    }

    /// What `print` wrote.
    fn printed(print: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> String {
        let mut out = Vec::new();
        print(&mut out).expect("print");
        String::from_utf8(out).expect("utf-8")
    }

    fn task(id: &str, title: &str, status: TaskStatus) -> Task {
        Task {
            id: id.to_owned(),
            title: title.to_owned(),
            description: String::new(),
            status,
            priority: 2,
            patchset: 0,
            namespace: None,
            depends_on: vec![],
            parent: None,
            failures: 0,
            lost_leases: 0,
            cost_cents: 0.0,
            tokens: 0,
            backoff_until_ms: None,
            feedback: None,
            created_at_ms: at(0),
            updated_at_ms: at(0),
            waiting_for: vec![],
            requires: vec![],
            max_cost_cents: None,
            paused: None,
            approval: None,
            epic: false,
        }
    }

    fn status_of(health: Health) -> Status {
        Status {
            open: 3,
            in_progress: 2,
            verified: 1,
            done: 12,
            needs_help: 1,
            cancelled: 0,
            active_dev_runs: 2,
            runners: 3,
            base: "main".into(),
            health,
            landing: Landing::Running,
            red_base: None,
            queue_paused: false,
            queue_pause_reason: None,
            queue_paused_at_ms: None,
            builds_per_landed: None,
            integration_depth: None,
            integration_slots: None,
            cost_cents_last_day: 0.0,
            tokens_last_day: 0,
            sandbox: Some("landlock".into()),
            webhooks: vec![],
            server: None,
        }
    }

    #[test]
    fn status() {
        let s = status_of(Health::Healthy);
        insta::assert_snapshot!(printed(|out| super::status(out, &s, TEXT)));
    }

    #[test]
    fn status_with_webhooks() {
        let s = Status {
            webhooks: vec![
                crate::model::Webhook {
                    url: "https://hooks.example.com/…".into(),
                    position: 41,
                    last_delivered_at_ms: Some(1_700_000_000_000),
                    pending: None,
                    last_error: None,
                    last_error_at_ms: None,
                },
                crate::model::Webhook {
                    url: "http://127.0.0.1:8080/".into(),
                    position: 40,
                    last_delivered_at_ms: None,
                    pending: Some(crate::model::PendingWebhook {
                        id: "msg_41".into(),
                        kind: "task.done".into(),
                        attempts: 3,
                        next_attempt_at_ms: Some(1_700_000_060_000),
                    }),
                    last_error: Some(
                        "msg_41 (task.done): cannot connect: connection refused".into(),
                    ),
                    last_error_at_ms: Some(1_700_000_020_000),
                },
            ],
            ..status_of(Health::Healthy)
        };
        insta::assert_snapshot!(printed(|out| super::status(out, &s, TEXT)));
        let json = printed(|out| super::status(out, &s, Format::Json));
        assert!(json.contains("\"webhooks\""), "{json}");
        assert!(json.contains("\"id\": \"msg_41\""), "{json}");
    }

    #[test]
    fn status_unhealthy() {
        let s = status_of(Health::Unhealthy(
            "the database refuses writes: disk full".into(),
        ));
        insta::assert_snapshot!(printed(|out| super::status(out, &s, TEXT)));
    }

    #[test]
    fn status_with_the_last_days_cost() {
        let s = Status {
            cost_cents_last_day: 1234.5,
            tokens_last_day: 2_345_678,
            ..status_of(Health::Healthy)
        };
        insta::assert_snapshot!(printed(|out| super::status(out, &s, TEXT)));
    }

    #[test]
    fn counts_and_cents_read_easily() {
        for (n, text) in [
            (0, "0"),
            (999, "999"),
            (1_000, "1,000"),
            (12_345, "12,345"),
            (1_234_567, "1,234,567"),
        ] {
            assert_eq!(thousands(n), text);
        }
        for (c, text) in [(0.0, "0"), (42.5, "42.5"), (30.0, "30"), (0.1 + 0.2, "0.3")] {
            assert_eq!(cents(c), text);
        }
    }

    #[test]
    fn status_with_landing_paused() {
        let s = Status {
            landing: Landing::Paused("the base is red: main at 1a2b3c4d fails its build".into()),
            red_base: None,
            queue_paused: true,
            queue_pause_reason: Some("a release".into()),
            queue_paused_at_ms: Some(at(5)),
            builds_per_landed: Some(0.25),
            integration_depth: None,
            integration_slots: None,
            ..status_of(Health::Healthy)
        };
        insta::assert_snapshot!(printed(|out| super::status(out, &s, TEXT)));
        insta::assert_snapshot!(printed(|out| super::status(out, &s, Format::Json)));
    }

    #[test]
    fn status_with_a_red_base() {
        let s = Status {
            landing: Landing::Paused(
                "the base main at 1a2b3c4d fails its own build: tests failed (exit 1): make \
                 test (its output ends: FAILED (failures=124))"
                    .into(),
            ),
            red_base: Some("1a2b3c4d".into()),
            queue_paused: true,
            queue_pause_reason: Some("the base main at 1a2b3c4d fails its own build".into()),
            ..status_of(Health::Healthy)
        };
        insta::assert_snapshot!(printed(|out| super::status(out, &s, TEXT)));
        insta::assert_snapshot!(printed(|out| super::status(out, &s, Format::Json)));
    }

    #[test]
    fn status_says_a_standby_and_where_the_leader_is() {
        let standby = Status {
            server: Some(crate::model::ServerRole {
                role: "standby".into(),
                term: 0,
                leader: Some("http://10.0.0.2:50051".into()),
            }),
            ..status_of(Health::Healthy)
        };
        let text = printed(|out| super::status(out, &standby, TEXT));
        assert!(
            text.starts_with("server:          STANDBY: the leader is at http://10.0.0.2:50051\n"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&printed(|out| super::status(out, &standby, Format::Json)))
                .expect("json");
        assert_eq!(
            json["server"],
            serde_json::json!({"role": "standby", "term": 0, "leader": "http://10.0.0.2:50051"})
        );
        // The leader says nothing more than before in text.
        let leader = Status {
            server: Some(crate::model::ServerRole {
                role: "leader".into(),
                term: 3,
                leader: Some("http://10.0.0.1:50051".into()),
            }),
            ..status_of(Health::Healthy)
        };
        let text = printed(|out| super::status(out, &leader, TEXT));
        assert!(!text.contains("server:"), "{text}");
    }

    fn queue_now() -> Queue {
        let waiting = |id: &str, status, position, eta, why: &[&str]| Waiting {
            id: id.to_owned(),
            status,
            position,
            waiting_for: why.iter().map(|w| (*w).to_owned()).collect(),
            eta_seconds: eta,
        };
        let trains = vec![
            Train {
                id: 7,
                tasks: vec!["t-1".into(), "t-2".into(), "t-3".into()],
                step: "building prefix 2 of 3 (on runner build-1)".into(),
                ahead: None,
                runners: vec!["build-1".into()],
            },
            Train {
                id: 8,
                tasks: vec!["t-8".into(), "t-9".into()],
                step: "building the train's tip (2 commits) (on runner build-2)".into(),
                ahead: Some(7),
                runners: vec!["build-2".into()],
            },
        ];
        Queue {
            train: Some(trains[0].clone()),
            trains,
            running: vec![
                Running {
                    id: "t-7".into(),
                    runner: "runner-a".into(),
                    since_ms: at(5),
                },
                Running {
                    id: "t-10".into(),
                    runner: "build-box-long-name".into(),
                    since_ms: at(9),
                },
            ],
            waiting: vec![
                waiting("t-4", TaskStatus::Verified, 1, Some(12.4), &[]),
                waiting("t-5", TaskStatus::Open, 2, None, &["t-4 to be done"]),
                waiting(
                    "t-6",
                    TaskStatus::Open,
                    3,
                    Some(95.0),
                    &["every slot is busy"],
                ),
            ],
            landing: Landing::Running,
            red_base: None,
            queue_paused: false,
            queue_pause_reason: None,
        }
    }

    #[test]
    fn queue() {
        insta::assert_snapshot!(printed(|out| super::queue(out, &queue_now(), TEXT)));
    }

    #[test]
    fn queue_json() {
        insta::assert_snapshot!(printed(|out| super::queue(out, &queue_now(), Format::Json)));
    }

    #[test]
    fn queue_empty_and_paused() {
        let q = Queue {
            train: None,
            trains: vec![],
            running: vec![],
            waiting: vec![],
            landing: Landing::Paused("paused by pipelinectl queue pause".into()),
            red_base: None,
            queue_paused: true,
            queue_pause_reason: Some("a release".into()),
        };
        insta::assert_snapshot!(printed(|out| super::queue(out, &q, TEXT)));
    }

    #[test]
    fn task_list() {
        let tasks = vec![
            Task {
                priority: 0,
                ..task("fix-42", "Urgent: the build is red", TaskStatus::InProgress)
            },
            Task {
                priority: 1,
                patchset: 2,
                failures: 1,
                ..task("t-1", "Write the parser", TaskStatus::Open)
            },
            Task {
                depends_on: vec!["t-1".into(), "fix-42".into()],
                ..task("t-2", "Use the parser — everywhere", TaskStatus::Open)
            },
            Task {
                priority: 4,
                patchset: 1,
                ..task("t-3", "Done already", TaskStatus::Done)
            },
            task("t-10", "Too hard", TaskStatus::NeedsHelp),
        ];
        insta::assert_snapshot!(printed(|out| whole_list(out, &tasks, TEXT)));
    }

    #[test]
    fn a_list_printed_page_by_page_is_one_json_array() {
        let tasks = [
            task("t-1", "one", TaskStatus::Open),
            task("t-2", "two", TaskStatus::Done),
            task("t-3", "three", TaskStatus::Open),
        ];
        let streamed = printed(|out| {
            let mut p = TaskListPrinter::new(Format::Json);
            p.page(out, &tasks[..2])?;
            p.page(out, &[])?;
            p.page(out, &tasks[2..])?;
            p.finish(out)
        });
        let whole =
            serde_json::to_string_pretty(&Value::Array(tasks.iter().map(json::task).collect()))
                .expect("json");
        assert_eq!(streamed, format!("{whole}\n"));
        assert_eq!(printed(|out| whole_list(out, &[], Format::Json)), "[]\n");
    }

    #[test]
    fn task_list_empty() {
        insta::assert_snapshot!(printed(|out| whole_list(out, &[], TEXT)));
    }

    /// A task that was rejected once, landed on its second attempt's base and now waits.
    fn detail() -> TaskDetail {
        let run = |id, phase, attempt, runner: Option<&str>, status, started: i64| Run {
            id,
            phase,
            patchset: attempt,
            attempt,
            runner: runner.map(str::to_owned),
            status,
            cost_cents: 0.0,
            started_at_ms: at(started),
            finished_at_ms: Some(at(started + 30)),
            error: None,
            failure_kind: None,
            train: None,
            builds: None,
            usage: None,
        };
        let usage = |input, output, cost_cents, cost_source, complete| Usage {
            agent: "claude".into(),
            model: Some("claude-sonnet-4-5".into()),
            input_tokens: input,
            cached_input_tokens: input / 2,
            cache_write_tokens: 120,
            output_tokens: output,
            reasoning_tokens: 0,
            cost_cents,
            cost_source,
            complete,
        };
        TaskDetail {
            task: Task {
                description: "Parse the input.\n\nSecond paragraph.".into(),
                priority: 1,
                patchset: 2,
                namespace: Some("Omni/Parser.hs".into()),
                parent: Some("epic-1".into()),
                depends_on: vec!["t-1".into(), "t-2".into()],
                failures: 1,
                lost_leases: 1,
                cost_cents: 42.5,
                backoff_until_ms: Some(at(600)),
                feedback: Some(
                    "build failed (exit 1): make test:\ncc x.c\nerror: x.c:3: bad".into(),
                ),
                updated_at_ms: at(300),
                waiting_for: vec![
                    "depends on t-2, which is open".into(),
                    "in back-off for 300 s more after 1 failed attempt".into(),
                ],
                ..task("t-3", "Write the parser", TaskStatus::Open)
            },
            runs: vec![
                Run {
                    cost_cents: 12.5,
                    usage: Some(usage(10_345, 1_345, 12.5, CostSource::Estimated, false)),
                    ..run(1, Phase::Dev, 1, Some("runner-a"), RunStatus::Success, 10)
                },
                Run {
                    error: Some(
                        "tests failed (exit 1): make test:\ncc x.c\nerror: x.c:3: bad\n".into(),
                    ),
                    failure_kind: Some(FailureKind::Task),
                    ..run(
                        2,
                        Phase::Verify,
                        1,
                        Some("runner-a"),
                        RunStatus::Failure,
                        40,
                    )
                },
                Run {
                    cost_cents: 30.0,
                    usage: Some(usage(2_000, 1_000, 30.0, CostSource::Reported, true)),
                    ..run(3, Phase::Dev, 2, Some("runner-b"), RunStatus::Success, 100)
                },
                run(
                    4,
                    Phase::Verify,
                    2,
                    Some("runner-b"),
                    RunStatus::Success,
                    130,
                ),
                Run {
                    error: Some("conflict with main in src/parser.rs".into()),
                    failure_kind: Some(FailureKind::Task),
                    ..run(5, Phase::Integrate, 2, None, RunStatus::Failure, 200)
                },
                Run {
                    finished_at_ms: None,
                    ..run(6, Phase::Dev, 3, Some("runner-a"), RunStatus::Running, 290)
                },
            ],
            events: vec![
                TaskEvent {
                    at_ms: at(0),
                    kind: "created".into(),
                    from: None,
                    to: TaskStatus::Open,
                    message: String::new(),
                },
                TaskEvent {
                    at_ms: at(10),
                    kind: "leased".into(),
                    from: Some(TaskStatus::Open),
                    to: TaskStatus::InProgress,
                    message: "runner-a".into(),
                },
                TaskEvent {
                    at_ms: at(70),
                    kind: "verify_failed".into(),
                    from: Some(TaskStatus::InProgress),
                    to: TaskStatus::Open,
                    message: "tests failed (exit 1)".into(),
                },
                TaskEvent {
                    at_ms: at(230),
                    kind: "integration_failed".into(),
                    from: Some(TaskStatus::Verified),
                    to: TaskStatus::Open,
                    message: "conflict with main in src/parser.rs".into(),
                },
            ],
            children: vec![
                ("t-7".into(), TaskStatus::Done),
                ("t-8".into(), TaskStatus::Open),
            ],
            children_cost_cents: 42.5,
            offered_commit: None,
        }
    }

    #[test]
    fn task_show() {
        let d = detail();
        insta::assert_snapshot!(printed(|out| super::task_detail(out, &d, TEXT)));
    }

    #[test]
    fn task_show_new() {
        let d = TaskDetail {
            task: task("t-1", "Nothing yet", TaskStatus::Open),
            runs: vec![],
            events: vec![TaskEvent {
                at_ms: at(0),
                kind: "created".into(),
                from: None,
                to: TaskStatus::Open,
                message: String::new(),
            }],
            children: vec![],
            children_cost_cents: 0.0,
            offered_commit: None,
        };
        insta::assert_snapshot!(printed(|out| super::task_detail(out, &d, TEXT)));
    }

    #[test]
    fn task_show_on_a_terminal() {
        let mut d = detail();
        d.task.title = "\u{1b}]0;owned\u{7}title".into();
        d.task.feedback = Some("red \u{1b}[31mline\u{1b}[0m".into());
        d.runs.truncate(2);
        d.runs[1].error = Some("over\rwritten".into());
        d.events.truncate(1);
        d.events[0].message = "bidi \u{202e}txt.exe".into();
        let terminal = Format::Text { terminal: true };
        insta::assert_snapshot!(printed(|out| super::task_detail(out, &d, terminal)));
    }

    #[test]
    fn task_show_json() {
        let d = detail();
        insta::assert_snapshot!(printed(|out| super::task_detail(out, &d, Format::Json)));
    }

    #[test]
    fn runners() {
        let runner = |name: &str, state, used, heartbeat: Option<i64>, health| Runner {
            id: format!("r-{name}"),
            name: name.to_owned(),
            state,
            slots_used: used,
            slots_total: 2,
            last_heartbeat_ms: heartbeat.map(at),
            labels: vec![],
            version: "0.1.0".into(),
            health,
            sandbox: Some("landlock".into()),
            builds: vec![],
        };
        let runners = vec![
            runner("runner-a", RunnerState::Busy, 2, Some(5), Health::Healthy),
            runner(
                "build-box-long-name",
                RunnerState::Idle,
                0,
                Some(7),
                Health::Healthy,
            ),
            runner(
                "runner-c",
                RunnerState::Idle,
                0,
                Some(6),
                Health::Unhealthy("3 infrastructure failures in a row: git: disk full".into()),
            ),
            runner("gone", RunnerState::Offline, 0, None, Health::Healthy),
            runner(
                "cut-off",
                RunnerState::Revoked,
                0,
                None,
                Health::Unhealthy(
                    "revoked: its name stays reserved until `pipelinectl runners forget cut-off`"
                        .into(),
                ),
            ),
        ];
        insta::assert_snapshot!(printed(|out| super::runners(out, &runners, TEXT)));
    }

    #[test]
    fn a_runners_health_reason_reaches_the_terminal_escaped() {
        let runner = Runner {
            id: "r-x".into(),
            name: "x".into(),
            state: RunnerState::Idle,
            slots_used: 0,
            slots_total: 1,
            last_heartbeat_ms: None,
            labels: vec![],
            version: "0.1.0".into(),
            health: Health::Unhealthy("disk \u{1b}]0;owned\u{7} full".into()),
            sandbox: None,
            builds: vec![],
        };
        let text = printed(|out| super::runners(out, &[runner], TEXT));
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert!(text.contains("disk \\x1b]0;owned\\x07 full"), "{text:?}");
    }

    #[test]
    fn runners_none() {
        insta::assert_snapshot!(printed(|out| super::runners(out, &[], TEXT)));
    }

    fn line(seq: u64, s: i64, stream: LogStream, phase: Phase, text: &str) -> LogLine {
        LogLine {
            seq,
            at_ms: at(s),
            stream,
            phase,
            text: text.to_owned(),
        }
    }

    #[test]
    fn logs_of_two_runs_with_a_cut() {
        let items = vec![
            LogItem::Status(TaskStatus::InProgress),
            LogItem::Run(LogRun {
                run_id: 7,
                phase: Phase::Dev,
                attempt: 1,
                runner: Some("runner-a".into()),
            }),
            LogItem::Lines {
                run_id: 7,
                lines: vec![
                    line(1, 0, LogStream::Runner, Phase::Dev, "leased"),
                    line(2, 1, LogStream::Stdout, Phase::Dev, "line 1 of 3"),
                    line(3, 1, LogStream::Stderr, Phase::Dev, "warning: unused"),
                ],
            },
            LogItem::Lines {
                run_id: 7,
                lines: vec![
                    line(9, 2, LogStream::Stdout, Phase::Dev, "line 3 of 3"),
                    line(10, 3, LogStream::Runner, Phase::Verify, "verify: make test"),
                ],
            },
            LogItem::Run(LogRun {
                run_id: 8,
                phase: Phase::Integrate,
                attempt: 1,
                runner: None,
            }),
            LogItem::Lines {
                run_id: 8,
                lines: vec![line(
                    1,
                    9,
                    LogStream::Server,
                    Phase::Integrate,
                    "landed on main",
                )],
            },
            LogItem::Status(TaskStatus::Done),
        ];
        let mut printer = LogPrinter::new(false);
        let mut statuses = Vec::new();
        let text = printed(|out| {
            for item in items {
                statuses.extend(printer.print(out, item)?);
            }
            Ok(())
        });
        assert_eq!(statuses, [TaskStatus::InProgress, TaskStatus::Done]);
        insta::assert_snapshot!(text);
    }

    #[test]
    fn raw_lines_are_shown_instead_of_their_rendering_only_when_asked_and_leave_no_gap() {
        let run = LogRun {
            run_id: 7,
            phase: Phase::Dev,
            attempt: 1,
            runner: Some("r".into()),
        };
        let lines = vec![
            line(1, 0, LogStream::Runner, Phase::Dev, "starting the agent"),
            line(2, 1, LogStream::Raw, Phase::Dev, r#"{"type":"assistant"}"#),
            line(3, 1, LogStream::Stdout, Phase::Dev, "claude: hello"),
            line(4, 2, LogStream::Stderr, Phase::Dev, "a warning"),
            line(5, 3, LogStream::Raw, Phase::Dev, r#"{"type":"result"}"#),
            line(6, 3, LogStream::Stdout, Phase::Dev, "claude finished"),
        ];
        let show = |raw: bool, tail: Option<usize>| {
            let mut printer = LogPrinter::new(false);
            printer.raw = raw;
            printer.tail = tail;
            let text = printed(|out| {
                printer.print(out, LogItem::Run(run.clone()))?;
                printer.print(
                    out,
                    LogItem::Lines {
                        run_id: 7,
                        lines: lines.clone(),
                    },
                )?;
                printer.flush_tail(out)
            });
            text.lines()
                .skip(1)
                .map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest).to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            show(false, None),
            [
                "runner starting the agent",
                "stdout claude: hello",
                "stderr a warning",
                "stdout claude finished"
            ]
        );
        assert_eq!(
            show(true, None),
            [
                "runner starting the agent",
                r#"raw    {"type":"assistant"}"#,
                "stderr a warning",
                r#"raw    {"type":"result"}"#
            ]
        );
        assert_eq!(
            show(false, Some(2)),
            ["stderr a warning", "stdout claude finished"]
        );
        assert_eq!(
            show(true, Some(2)),
            ["stderr a warning", r#"raw    {"type":"result"}"#]
        );
    }

    fn transitions() -> Vec<Transition> {
        vec![
            Transition {
                event_id: 1,
                task_id: "t-1".into(),
                at_ms: at(0),
                kind: "created".into(),
                from: None,
                to: TaskStatus::Open,
                message: String::new(),
            },
            Transition {
                event_id: 1,
                task_id: "t-1".into(),
                at_ms: at(42),
                kind: "dev_failed".into(),
                from: Some(TaskStatus::InProgress),
                to: TaskStatus::Open,
                message: "build failed (exit 2): make:\ncc x.c\nerror: x.c:3: bad".into(),
            },
        ]
    }

    #[test]
    fn watch() {
        let text = printed(|out| {
            for t in transitions() {
                super::transition(out, &t, TEXT)?;
            }
            Ok(())
        });
        insta::assert_snapshot!(text);
    }

    #[test]
    fn watch_json() {
        let text = printed(|out| {
            for t in transitions() {
                super::transition(out, &t, Format::Json)?;
            }
            Ok(())
        });
        insta::assert_snapshot!(text);
    }
}
