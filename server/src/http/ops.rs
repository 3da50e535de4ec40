//! The operators' endpoints: `GET /metrics` (Prometheus text, the viewer's or admin's unless
//! `--metrics-public`), `GET /healthz` (200 while the process serves) and `GET /readyz` (200
//! while the database takes writes and every background loop is alive; 503 with the reason
//! otherwise). Health needs no credential: a load balancer or an orchestrator asks it.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::access::Who;
use super::{App, Kind, Refusal};
use crate::coordinator::RunnerState;
use crate::domain::TaskStatus;
use crate::metrics::{CONTENT_TYPE, Scrape, metrics};
use crate::store::Store;

/// `GET /metrics` for the viewer or the admin.
pub async fn metrics_guarded<S: Store>(
    State(app): State<App<S>>,
    _who: Who,
) -> Result<Response, Refusal> {
    scrape(&app).await
}

/// `GET /metrics` with `--metrics-public`.
pub async fn metrics_public<S: Store>(State(app): State<App<S>>) -> Result<Response, Refusal> {
    scrape(&app).await
}

/// The gauges read from memory (task counts, runners, pauses), then the text of every family.
async fn scrape<S: Store>(app: &App<S>) -> Result<Response, Refusal> {
    let status = app
        .coordinator
        .status()
        .await
        .map_err(|e| Refusal::from_error(e, Kind::Text))?;
    let counts = &status.counts;
    let tasks = TaskStatus::ALL
        .iter()
        .map(|s| {
            let n = match s {
                TaskStatus::Open => counts.open,
                TaskStatus::InProgress => counts.in_progress,
                TaskStatus::Verified => counts.verified,
                TaskStatus::Done => counts.done,
                TaskStatus::NeedsHelp => counts.needs_help,
                TaskStatus::Cancelled => counts.cancelled,
            };
            (s.as_str(), n)
        })
        .collect();
    let mut runners = [
        ("idle", 0u64),
        ("busy", 0),
        ("draining", 0),
        ("offline", 0),
        ("revoked", 0),
    ];
    for r in app.coordinator.runners() {
        let i = match r.state {
            RunnerState::Idle => 0,
            RunnerState::Busy => 1,
            RunnerState::Draining => 2,
            RunnerState::Offline => 3,
            RunnerState::Revoked => 4,
        };
        runners[i].1 += 1;
    }
    let text = metrics().render(&Scrape {
        tasks,
        runners: runners.to_vec(),
        queue_paused: status.queue_paused,
        landing_paused: status.landing.0 == "paused",
        // 0 on a standby (issue 28).
        leader: status.server.role == "leader",
    });
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}

/// `GET /healthz`: the process serves.
pub async fn healthz() -> Response {
    text(StatusCode::OK, "ok")
}

/// `GET /readyz`: ready for work, or 503 and why not.
pub async fn readyz<S: Store>(State(app): State<App<S>>) -> Response {
    match app.coordinator.readiness(&app.loops).await {
        Ok(()) => text(StatusCode::OK, "ready"),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, &why),
    }
}

fn text(status: StatusCode, line: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{line}\n"),
    )
        .into_response()
}
