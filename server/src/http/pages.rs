//! The pages: the queue, tasks, a task, runners, an epic, the login form and errors. Each is an
//! askama template (`server/templates/`, checked when the server is compiled; every value is
//! HTML-escaped unless a template says `|safe`, which only the charts' SVG, drawn from numbers
//! here, does) filled from the same views as the JSON API. A page's live regions
//! (`data-live`) are fetched again by `app.js` when an event says something changed.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use pipeline_api::model::{self, TaskStatus};
use pipeline_api::time::rfc3339;

use super::access::{NextQuery, Who, local_path};
use super::api::{ListQuery, list, path_id, queue_view, runner_views, status_view, task_view};
use super::charts::Chart;
use super::html::{login_page, render};
use super::{App, Kind, Refusal};
use crate::domain::TaskId;
use crate::store::Store;

/// The most of a commit's diff a task's page shows.
pub const MAX_DIFF_BYTES: usize = 256 * 1024;

/// A time as the page shows it: `2026-12-07 04:23:52 UTC`.
pub fn when(ms: i64) -> String {
    let t = rfc3339(ms);
    format!("{} {} UTC", &t[..10], &t[11..19])
}

fn cents(c: f64) -> String {
    let text = format!("{c:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn refused(err: crate::error::Error) -> Refusal {
    Refusal::from_error(err, Kind::Page)
}

pub async fn login<S: Store>(State(_): State<App<S>>, Query(q): NextQuery) -> Response {
    login_page(StatusCode::OK, None, &local_path(q.next.as_deref()))
}

/// A task's row in a table.
struct TaskRow {
    id: String,
    title: String,
    status: &'static str,
    priority: u32,
    patchset: u32,
    failures: u32,
    runner: String,
    cost: String,
    waiting: String,
}

fn task_row(t: &model::Task, working: &HashMap<String, String>) -> TaskRow {
    TaskRow {
        id: t.id.clone(),
        title: t.title.clone(),
        status: t.status.word(),
        priority: t.priority,
        patchset: t.patchset,
        failures: t.failures,
        runner: working.get(&t.id).cloned().unwrap_or_default(),
        cost: cents(t.cost_cents),
        waiting: t.waiting_for.join("; "),
    }
}

/// Each task being worked on now, and its runner (from the live leases, in memory).
fn working<S: Store>(app: &App<S>) -> HashMap<String, String> {
    app.coordinator
        .working()
        .into_iter()
        .map(|(task, runner, _)| (task.to_string(), runner))
        .collect()
}

struct Card {
    label: &'static str,
    count: u64,
    class: &'static str,
}

struct WaitRow {
    position: u32,
    id: String,
    status: &'static str,
    eta: String,
    waiting: String,
}

struct Working {
    id: String,
    runner: String,
    since: String,
}

struct Landed {
    id: String,
    commit: String,
    at: String,
}

#[derive(Template)]
#[template(path = "queue.html")]
struct QueuePage<'a> {
    role: &'a str,
    nav: &'a str,
    admin: bool,
    base: String,
    cards: Vec<Card>,
    leases_paused: Option<String>,
    landing_paused: Option<String>,
    /// Every train in flight, the one that lands next first.
    trains: Vec<model::Train>,
    verified: Vec<WaitRow>,
    open: Vec<WaitRow>,
    working: Vec<Working>,
    landed: Vec<Landed>,
    charts: Vec<Chart>,
    last_day: String,
}

/// `GET /`: the queue.
pub async fn queue<S: Store>(who: Who, State(app): State<App<S>>) -> Result<Response, Refusal> {
    let s = status_view(&app).await.map_err(refused)?;
    let q = queue_view(&app).await.map_err(refused)?;
    let cards = vec![
        Card {
            label: "open",
            count: s.open,
            class: "open",
        },
        Card {
            label: "in progress",
            count: s.in_progress,
            class: "in_progress",
        },
        Card {
            label: "verified",
            count: s.verified,
            class: "verified",
        },
        Card {
            label: "done",
            count: s.done,
            class: "done",
        },
        Card {
            label: "needs help",
            count: s.needs_help,
            class: "needs_help",
        },
        Card {
            label: "cancelled",
            count: s.cancelled,
            class: "cancelled",
        },
        Card {
            label: "runners",
            count: s.runners,
            class: "runners",
        },
    ];
    let leases_paused = match (&s.red_base, s.queue_paused) {
        (Some(red), _) => Some(format!(
            "leases are held while the base is red at {red}; they go on once it builds green"
        )),
        (None, true) => Some(format!(
            "leases are paused{}",
            s.queue_pause_reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
        (None, false) => None,
    };
    let landing_paused = s
        .landing
        .reason()
        .map(|r| format!("landing is paused: {r}"));
    let row = |w: &model::Waiting| WaitRow {
        position: w.position,
        id: w.id.clone(),
        status: w.status.word(),
        eta: w.eta_seconds.map_or_else(String::new, |e| match w.status {
            TaskStatus::Verified => format!("lands in ~{}", human_secs(e)),
            _ => format!("starts in ~{}", human_secs(e)),
        }),
        waiting: w.waiting_for.join("; "),
    };
    let verified = q
        .waiting
        .iter()
        .filter(|w| w.status == TaskStatus::Verified)
        .map(row)
        .collect();
    let open = q
        .waiting
        .iter()
        .filter(|w| w.status != TaskStatus::Verified)
        .map(row)
        .collect();
    let working = app
        .coordinator
        .working()
        .into_iter()
        .map(|(id, runner, since)| Working {
            id: id.to_string(),
            runner,
            since: when(since),
        })
        .collect();
    let mut landed = Vec::new();
    for (id, at) in app.rolling.landed() {
        let commit = app
            .coordinator
            .repo()
            .landed_commit(&id)
            .await
            .ok()
            .flatten()
            .map(|c| c.as_str()[..12].to_owned())
            .unwrap_or_default();
        landed.push(Landed {
            id: id.to_string(),
            commit,
            at: when(at),
        });
    }
    let page = QueuePage {
        role: who.role(),
        nav: "queue",
        admin: who.is_admin(),
        base: s.base.clone(),
        cards,
        leases_paused,
        landing_paused,
        trains: q.trains.clone(),
        verified,
        open,
        working,
        landed,
        charts: super::charts::charts(&app).await,
        last_day: format!(
            "{} cents, {} tokens over the last day",
            cents(s.cost_cents_last_day),
            s.tokens_last_day
        ),
    };
    Ok(render(StatusCode::OK, &page))
}

fn human_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

#[derive(Template)]
#[template(path = "tasks.html")]
struct TasksPage<'a> {
    role: &'a str,
    nav: &'a str,
    status: String,
    epic: String,
    label: String,
    q: String,
    statuses: [&'static str; 6],
    rows: Vec<TaskRow>,
    next: Option<String>,
    scanned: usize,
}

/// `GET /tasks`: a page of tasks, filtered.
pub async fn tasks<S: Store>(
    who: Who,
    State(app): State<App<S>>,
    Query(q): Query<ListQuery>,
) -> Result<Response, Refusal> {
    let listed = list(&app, &q, Kind::Page).await?;
    let working = working(&app);
    let rows = listed.tasks.iter().map(|t| task_row(t, &working)).collect();
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    let next = listed.next.map(|after| {
        let mut link = format!("/tasks?after={after}");
        for (key, v) in [
            ("status", &q.status),
            ("epic", &q.epic),
            ("label", &q.label),
            ("q", &q.q),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                link.push_str(&format!("&{key}={}", super::access::encode_component(v)));
            }
        }
        link
    });
    let page = TasksPage {
        role: who.role(),
        nav: "tasks",
        status: value(&q.status),
        epic: value(&q.epic),
        label: value(&q.label),
        q: value(&q.q),
        statuses: [
            "open",
            "in_progress",
            "verified",
            "done",
            "needs_help",
            "cancelled",
        ],
        rows,
        next,
        scanned: listed.scanned,
    };
    Ok(render(StatusCode::OK, &page))
}

struct RunRow {
    phase: &'static str,
    attempt: u32,
    runner: String,
    status: &'static str,
    started: String,
    finished: String,
    tokens: String,
    cost: String,
    failure_kind: &'static str,
    error: String,
}

struct EventRow {
    at: String,
    kind: String,
    to: &'static str,
    message: String,
}

#[derive(Template)]
#[template(path = "task.html")]
struct TaskPage<'a> {
    role: &'a str,
    nav: &'a str,
    admin: bool,
    t: model::Task,
    status: &'static str,
    runner: String,
    cost: String,
    cap: String,
    depends_on: String,
    requires: String,
    runs: Vec<RunRow>,
    events: Vec<EventRow>,
    children: Vec<(String, &'static str)>,
    commit: String,
    diff: String,
    diff_cut: bool,
    final_status: bool,
    awaiting_approval: bool,
}

/// `GET /tasks/{id}`: a task, its runs, history, diff and live log.
pub async fn task<S: Store>(
    who: Who,
    State(app): State<App<S>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let id = path_id(&id, Kind::Page)?;
    let domain = app.coordinator.show_task(&id).await.map_err(refused)?;
    let d = task_view(&app, &id).await.map_err(refused)?;
    let t = d.task.clone();
    let commit = match t.status {
        TaskStatus::Done => app
            .coordinator
            .repo()
            .landed_commit(&id)
            .await
            .ok()
            .flatten(),
        _ => domain.task.patch_commit.clone(),
    };
    let (diff, diff_cut) = match &commit {
        Some(c) => app
            .coordinator
            .repo()
            .show_commit(c, MAX_DIFF_BYTES)
            .await
            .unwrap_or_else(|e| (format!("the diff cannot be read: {e}"), false)),
        None => (String::new(), false),
    };
    let runs = d
        .runs
        .iter()
        .map(|r| RunRow {
            phase: r.phase.word(),
            attempt: r.attempt,
            runner: r.runner.clone().unwrap_or_else(|| "server".to_owned()),
            status: r.status.word(),
            started: when(r.started_at_ms),
            finished: r.finished_at_ms.map(when).unwrap_or_default(),
            tokens: r
                .usage
                .as_ref()
                .map(|u| format!("{} in / {} out", u.input_tokens, u.output_tokens))
                .unwrap_or_default(),
            cost: cents(r.cost_cents),
            failure_kind: r.failure_kind.map_or("", model::FailureKind::word),
            error: r.error.clone().unwrap_or_default(),
        })
        .collect();
    let events = d
        .events
        .iter()
        .map(|e| EventRow {
            at: when(e.at_ms),
            kind: e.kind.clone(),
            to: e.to.word(),
            message: e.message.clone(),
        })
        .collect();
    let page = TaskPage {
        role: who.role(),
        nav: "tasks",
        admin: who.is_admin(),
        status: t.status.word(),
        runner: working(&app).get(&t.id).cloned().unwrap_or_default(),
        cost: cents(t.cost_cents),
        cap: t.max_cost_cents.map(cents).unwrap_or_default(),
        depends_on: t.depends_on.join(", "),
        requires: t.requires.join(", "),
        runs,
        events,
        children: d
            .children
            .iter()
            .map(|(id, s)| (id.clone(), s.word()))
            .collect(),
        commit: commit.map(|c| c.to_string()).unwrap_or_default(),
        diff,
        diff_cut,
        final_status: t.status.is_final(),
        awaiting_approval: t.status == TaskStatus::Verified
            && t.approval.as_deref() == Some("required"),
        t,
    };
    Ok(render(StatusCode::OK, &page))
}

struct RunnerRow {
    name: String,
    state: &'static str,
    labels: String,
    slots: String,
    health: &'static str,
    reason: String,
    heartbeat: String,
    tasks: Vec<String>,
    drained: bool,
}

#[derive(Template)]
#[template(path = "runners.html")]
struct RunnersPage<'a> {
    role: &'a str,
    nav: &'a str,
    admin: bool,
    rows: Vec<RunnerRow>,
}

/// `GET /runners`.
pub async fn runners<S: Store>(who: Who, State(app): State<App<S>>) -> Response {
    let mut tasks: HashMap<String, Vec<String>> = HashMap::new();
    for (task, runner, _) in app.coordinator.working() {
        tasks.entry(runner).or_default().push(task.to_string());
    }
    let rows = runner_views(&app)
        .into_iter()
        .map(|r| RunnerRow {
            state: r.state.word(),
            labels: r.labels.join(", "),
            slots: format!("{}/{}", r.slots_used, r.slots_total),
            health: r.health.word(),
            reason: r.health.reason().unwrap_or_default().to_owned(),
            heartbeat: r.last_heartbeat_ms.map(when).unwrap_or_default(),
            tasks: tasks.remove(&r.name).unwrap_or_default(),
            drained: r.state == model::RunnerState::Draining,
            name: r.name,
        })
        .collect();
    render(
        StatusCode::OK,
        &RunnersPage {
            role: who.role(),
            nav: "runners",
            admin: who.is_admin(),
            rows,
        },
    )
}

#[derive(Template)]
#[template(path = "epic.html")]
struct EpicPage<'a> {
    role: &'a str,
    nav: &'a str,
    t: model::Task,
    status: &'static str,
    done: usize,
    total: usize,
    percent: usize,
    cost: String,
    cap: String,
    over: bool,
    rows: Vec<TaskRow>,
    more: bool,
}

/// `GET /epics/{id}`: an epic's children, its progress and its cost against its cap.
pub async fn epic<S: Store>(
    who: Who,
    State(app): State<App<S>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let id: TaskId = path_id(&id, Kind::Page)?;
    let d = task_view(&app, &id).await.map_err(refused)?;
    let query = ListQuery {
        epic: Some(id.to_string()),
        limit: Some(super::api::MAX_PAGE),
        ..ListQuery::default()
    };
    let listed = list(&app, &query, Kind::Page).await?;
    let working = working(&app);
    let total = d.children.len();
    let done = d
        .children
        .iter()
        .filter(|(_, s)| *s == TaskStatus::Done)
        .count();
    let cap = d.task.max_cost_cents;
    let page = EpicPage {
        role: who.role(),
        nav: "tasks",
        status: d.task.status.word(),
        done,
        total,
        percent: (done * 100).checked_div(total).unwrap_or(0),
        cost: cents(d.children_cost_cents),
        cap: cap.map(cents).unwrap_or_default(),
        over: cap.is_some_and(|c| d.children_cost_cents >= c),
        rows: listed.tasks.iter().map(|t| task_row(t, &working)).collect(),
        more: listed.next.is_some(),
        t: d.task,
    };
    Ok(render(StatusCode::OK, &page))
}
