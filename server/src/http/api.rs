//! `/api/…`: the JSON of `pipelinectl … --json`, the same bytes (domain → prost with
//! `grpc::convert`, prost → view → JSON with `pipeline-api`).
//!
//! `/api/tasks` answers one page as `task list --json` prints a list, an array; the next page,
//! when there is one, is named by a `Link: <…>; rel="next"` header (as GitHub's API does).

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use pipeline_api::model;
use pipeline_proto::v1 as pb;
use serde::Deserialize;

use super::access::Who;
use super::{App, Kind, Refusal};
use crate::coordinator::Page;
use crate::domain::{TaskId, TaskStatus};
use crate::grpc::control::{task_page_key, task_page_token};
use crate::grpc::convert::{listed_to_pb, queue_response, status_response, task_response};
use crate::store::{Store, TaskFilter};

/// A JSON answer, printed as `pipelinectl --json` prints it.
pub fn json_response(value: &serde_json::Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        pipeline_api::json::pretty(value) + "\n",
    )
        .into_response()
}

fn refused(err: crate::error::Error) -> Refusal {
    Refusal::from_error(err, Kind::Json)
}

/// The server's status, as a view.
pub async fn status_view<S: Store>(app: &App<S>) -> Result<model::Status, crate::error::Error> {
    Ok(model::Status::from(status_response(
        app.coordinator.status().await?,
    )))
}

/// The queue, as a view.
pub async fn queue_view<S: Store>(app: &App<S>) -> Result<model::Queue, crate::error::Error> {
    Ok(model::Queue::from(queue_response(
        app.coordinator.queue().await?,
    )))
}

/// A task with its runs and history, as a view.
pub async fn task_view<S: Store>(
    app: &App<S>,
    id: &TaskId,
) -> Result<model::TaskDetail, crate::error::Error> {
    let detail = app.coordinator.show_task(id).await?;
    model::TaskDetail::try_from(task_response(app.coordinator.policy(), &detail))
        .map_err(|e| crate::error::Error::Internal(e.to_string()))
}

/// A runner, as a view: the one shape of a runner in the JSON API, the page and webhooks.
pub fn runner_view(r: &crate::coordinator::RunnerInfo) -> model::Runner {
    model::Runner::from(pb::Runner::from(r))
}

/// Every runner, as views (a page at a time from the registry, in memory).
pub fn runner_views<S: Store>(app: &App<S>) -> Vec<model::Runner> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (runners, more) = app
            .coordinator
            .runners_page(after.as_deref(), Page::MAX_SIZE);
        after = runners.last().map(|r| r.name.clone());
        all.extend(runners.iter().map(runner_view));
        if !more {
            return all;
        }
    }
}

/// A task ID from a path, or a refusal of it (400).
pub fn path_id(raw: &str, kind: Kind) -> Result<TaskId, Refusal> {
    TaskId::parse(raw).map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.to_string(), kind))
}

pub async fn status<S: Store>(_: Who, State(app): State<App<S>>) -> Result<Response, Refusal> {
    let s = status_view(&app).await.map_err(refused)?;
    Ok(json_response(&pipeline_api::json::status(&s)))
}

pub async fn queue<S: Store>(_: Who, State(app): State<App<S>>) -> Result<Response, Refusal> {
    let q = queue_view(&app).await.map_err(refused)?;
    Ok(json_response(&pipeline_api::json::queue(&q)))
}

pub async fn runners<S: Store>(_: Who, State(app): State<App<S>>) -> Response {
    json_response(&pipeline_api::json::runners(&runner_views(&app)))
}

pub async fn task<S: Store>(
    _: Who,
    State(app): State<App<S>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let id = path_id(&id, Kind::Json)?;
    let d = task_view(&app, &id).await.map_err(refused)?;
    Ok(json_response(&pipeline_api::json::task_detail(&d)))
}

/// The filters of a task list (`/tasks` and `/api/tasks`), as given.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ListQuery {
    pub status: Option<String>,
    /// Only the children of this epic.
    pub epic: Option<String>,
    /// Only tasks that require this label (`KEY` or `KEY=VALUE`, as given at `task add`).
    pub label: Option<String>,
    /// Only tasks whose title holds this text (any case).
    pub q: Option<String>,
    /// The page after this token.
    pub after: Option<String>,
    pub limit: Option<u32>,
}

/// A page of tasks that a list query chose, and where the next page starts.
pub struct Listed {
    pub tasks: Vec<model::Task>,
    pub next: Option<String>,
    /// How many tasks were looked at for it (the label and text filters read at most
    /// [`SCAN_BUDGET`] a page).
    pub scanned: usize,
}

/// The most tasks one page of a list looks at when it filters by label or text: a search over a
/// million tasks goes a page at a time, never all at once.
pub const SCAN_BUDGET: usize = 5_000;

/// Tasks shown on one page by default, and at most.
pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 500;

fn blank(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// One page of tasks: the store's keyset pages (by status and epic, an index range each),
/// then the label and text filters in memory, reading at most [`SCAN_BUDGET`] tasks.
pub async fn list<S: Store>(app: &App<S>, q: &ListQuery, kind: Kind) -> Result<Listed, Refusal> {
    let bad = |m: String| Refusal::new(StatusCode::BAD_REQUEST, m, kind);
    let status = match blank(&q.status) {
        None | Some("all") => None,
        Some(word) => Some(TaskStatus::parse(word).ok_or_else(|| {
            bad(format!(
                "unknown status {word:?}; use open, in_progress, verified, done, needs_help or \
                 cancelled"
            ))
        })?),
    };
    let parent = blank(&q.epic)
        .map(|e| TaskId::parse(e).map_err(|err| bad(format!("epic: {err}"))))
        .transpose()?;
    let mut after = task_page_key(blank(&q.after).unwrap_or_default())
        .map_err(|s| bad(s.message().to_owned()))?;
    let size = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE) as usize;
    let label = blank(&q.label).map(str::to_owned);
    let text = blank(&q.q).map(str::to_lowercase);
    if label.as_ref().is_some_and(|l| l.len() > 200) || text.as_ref().is_some_and(|t| t.len() > 200)
    {
        return Err(bad("a label or text filter is at most 200 bytes".into()));
    }
    let filter = TaskFilter { status, parent };
    let filtering = label.is_some() || text.is_some();
    let keep = |t: &pb::Task| {
        label
            .as_ref()
            .is_none_or(|l| t.requires.iter().any(|r| r == l))
            && text
                .as_ref()
                .is_none_or(|x| t.title.to_lowercase().contains(x.as_str()))
    };
    let mut tasks = Vec::new();
    let mut scanned = 0;
    let next = loop {
        let want = if filtering { MAX_PAGE } else { size as u32 };
        let (page, next) = app
            .coordinator
            .list_tasks(&filter, Page { after, size: want })
            .await
            .map_err(|e| Refusal::from_error(e, kind))?;
        let mut last = None;
        let mut full = false;
        for l in &page {
            scanned += 1;
            last = Some((l.task.priority, l.task.seq));
            let row = listed_to_pb(app.coordinator.policy(), l);
            if keep(&row) {
                tasks.push(model::Task::from(row));
                if tasks.len() == size {
                    full = true;
                    break;
                }
            }
        }
        if full {
            // More may follow the last one shown.
            let more = next.is_some() || last != page.last().map(|l| (l.task.priority, l.task.seq));
            break if more { last } else { None };
        }
        match next {
            None => break None,
            Some(key) if scanned >= SCAN_BUDGET => break Some(key),
            Some(key) => after = Some(key),
        }
    };
    Ok(Listed {
        tasks,
        next: next.map(task_page_token),
        scanned,
    })
}

pub async fn tasks<S: Store>(
    _: Who,
    State(app): State<App<S>>,
    Query(q): Query<ListQuery>,
) -> Result<Response, Refusal> {
    let listed = list(&app, &q, Kind::Json).await?;
    let body =
        serde_json::Value::Array(listed.tasks.iter().map(pipeline_api::json::task).collect());
    let mut resp = json_response(&body);
    if let Some(next) = listed.next {
        let mut link = format!("/api/tasks?after={next}");
        for (key, value) in [
            ("status", &q.status),
            ("epic", &q.epic),
            ("label", &q.label),
            ("q", &q.q),
        ] {
            if let Some(v) = blank(value) {
                link.push_str(&format!("&{key}={}", super::access::encode_component(v)));
            }
        }
        if let Some(limit) = q.limit {
            link.push_str(&format!("&limit={limit}"));
        }
        if let Ok(value) = format!("<{link}>; rel=\"next\"").parse() {
            resp.headers_mut().insert(header::LINK, value);
        }
    }
    Ok(resp)
}
