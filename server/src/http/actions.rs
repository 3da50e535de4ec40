//! The admin's buttons: each a `POST` of a form that calls the one coordinator method the
//! gRPC call would (the same checks of what it is given), then goes back to the page it came
//! from (`303`), or answers `{"ok": true}` to a script that asks for JSON.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::access::{Admin, local_path};
use super::api::path_id;
use super::{App, Kind, Refusal};
use crate::coordinator::queue::Hold;
use crate::domain::{TaskEdit, TaskId};
use crate::store::Store;

/// Who a person on the page is, for a task's history: the admin credential signed in there.
const BY: &str = "admin (web page)";

#[derive(Debug, Default, Deserialize)]
pub struct ActionForm {
    /// The page to go back to (one of this site's).
    back: Option<String>,
    note: Option<String>,
    /// `retry`: start from the current base.
    fresh: Option<String>,
    priority: Option<String>,
    reason: Option<String>,
    /// `pause`: `leases` (the default), `landing` (leases and landing) or `landing_only`.
    hold: Option<String>,
}

/// The form of an action's body (`application/x-www-form-urlencoded`, as a browser sends it);
/// an empty body (a script's bare `POST`) is an empty form.
fn form(body: &[u8], kind: Kind) -> Result<ActionForm, Refusal> {
    serde_urlencoded::from_bytes(body).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not a form this action takes: {e}"),
            kind,
        )
    })
}

/// What the request wants back: JSON for a script, else a page.
fn kind(headers: &HeaderMap) -> Kind {
    let json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.starts_with("application/json"));
    if json { Kind::Json } else { Kind::Page }
}

fn done(kind: Kind, back: String) -> Response {
    match kind {
        Kind::Json => (
            [(header::CONTENT_TYPE, "application/json")],
            "{\"ok\": true}\n",
        )
            .into_response(),
        _ => Redirect::to(&back).into_response(),
    }
}

/// A note as the gRPC edge takes it: trimmed, at most 64 KiB, no NUL; `None` when empty.
fn note(note: Option<String>, kind: Kind) -> Result<Option<String>, Refusal> {
    let note = note.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    if note
        .as_ref()
        .is_some_and(|n| n.len() > 64 * 1024 || n.contains('\0'))
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "a note is text of at most 64 KiB",
            kind,
        ));
    }
    Ok(note)
}

fn task_back(form: &ActionForm, id: &TaskId) -> String {
    match &form.back {
        Some(_) => local_path(form.back.as_deref()),
        None => format!("/tasks/{id}"),
    }
}

macro_rules! refused {
    ($kind:expr) => {
        |e| Refusal::from_error(e, $kind)
    };
}

pub async fn cancel<S: Store>(
    _: Admin,
    State(app): State<App<S>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let kind = kind(&headers);
    let form = form(&body, kind)?;
    let id = path_id(&id, kind)?;
    app.coordinator.cancel(&id).await.map_err(refused!(kind))?;
    Ok(done(kind, task_back(&form, &id)))
}

pub async fn retry<S: Store>(
    _: Admin,
    State(app): State<App<S>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let kind = kind(&headers);
    let form = form(&body, kind)?;
    let id = path_id(&id, kind)?;
    let note = note(form.note.clone(), kind)?;
    app.coordinator
        .retry(&id, note, form.fresh.is_some())
        .await
        .map_err(refused!(kind))?;
    Ok(done(kind, task_back(&form, &id)))
}

pub async fn approve<S: Store>(
    _: Admin,
    State(app): State<App<S>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let kind = kind(&headers);
    let form = form(&body, kind)?;
    let id = path_id(&id, kind)?;
    let note = note(form.note.clone(), kind)?;
    app.coordinator
        .approve(&id, BY.to_owned(), note)
        .await
        .map_err(refused!(kind))?;
    Ok(done(kind, task_back(&form, &id)))
}

pub async fn reject<S: Store>(
    _: Admin,
    State(app): State<App<S>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let kind = kind(&headers);
    let form = form(&body, kind)?;
    let id = path_id(&id, kind)?;
    let Some(note) = note(form.note.clone(), kind)? else {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "a rejection needs a note: what the agent should change",
            kind,
        ));
    };
    app.coordinator
        .reject(&id, BY.to_owned(), note)
        .await
        .map_err(refused!(kind))?;
    Ok(done(kind, task_back(&form, &id)))
}

pub async fn priority<S: Store>(
    _: Admin,
    State(app): State<App<S>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let kind = kind(&headers);
    let form = form(&body, kind)?;
    let id = path_id(&id, kind)?;
    let priority = form
        .priority
        .as_deref()
        .and_then(|p| p.trim().trim_start_matches(['P', 'p']).parse::<u32>().ok())
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "priority is a number from 0 (highest) to 4 (lowest)",
                kind,
            )
        })?;
    // As `task edit --priority N --next-attempt`: the order of what is not leased yet.
    let edit = TaskEdit::new(None, None, None, Some(priority))
        .map(|e| TaskEdit {
            next_attempt: true,
            ..e
        })
        .map_err(refused!(kind))?;
    app.coordinator
        .edit_task(&id, edit)
        .await
        .map_err(refused!(kind))?;
    Ok(done(kind, task_back(&form, &id)))
}

pub async fn pause_queue<S: Store>(
    _: Admin,
    State(app): State<App<S>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let kind = kind(&headers);
    let form = form(&body, kind)?;
    let hold = match form.hold.as_deref().unwrap_or("leases") {
        "leases" => Hold::Leases,
        "landing" => Hold::LeasesAndLanding,
        "landing_only" => Hold::LandingOnly,
        other => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("hold {other:?}: use leases, landing or landing_only"),
                kind,
            ));
        }
    };
    let reason = form
        .reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty());
    if reason
        .as_ref()
        .is_some_and(|r| r.len() > 1000 || r.chars().any(char::is_control))
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "a reason is one line of at most 1000 bytes",
            kind,
        ));
    }
    app.coordinator
        .pause_queue(reason, hold)
        .await
        .map_err(refused!(kind))?;
    Ok(done(kind, local_path(form.back.as_deref())))
}

pub async fn resume_queue<S: Store>(
    _: Admin,
    State(app): State<App<S>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let kind = kind(&headers);
    let form = form(&body, kind)?;
    app.coordinator
        .resume_queue()
        .await
        .map_err(refused!(kind))?;
    Ok(done(kind, local_path(form.back.as_deref())))
}

async fn hold_runner<S: Store>(
    app: &App<S>,
    name: &str,
    drain: bool,
    headers: &HeaderMap,
    form: &ActionForm,
) -> Result<Response, Refusal> {
    let kind = kind(headers);
    app.coordinator
        .hold_runner(name, drain)
        .await
        .map_err(refused!(kind))?;
    Ok(done(
        kind,
        match &form.back {
            Some(_) => local_path(form.back.as_deref()),
            None => "/runners".to_owned(),
        },
    ))
}

pub async fn drain<S: Store>(
    _: Admin,
    State(app): State<App<S>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let form = form(&body, kind(&headers))?;
    hold_runner(&app, &name, true, &headers, &form).await
}

pub async fn undrain<S: Store>(
    _: Admin,
    State(app): State<App<S>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    let form = form(&body, kind(&headers))?;
    hold_runner(&app, &name, false, &headers, &form).await
}
