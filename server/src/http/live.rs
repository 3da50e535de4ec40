//! Server-sent events: `/events` (the change feed: tasks, runners, landing, the queue and
//! trains; `id:` the entry's position, so a browser that reconnects with `Last-Event-ID` gets
//! what it missed first) and a task's live
//! log (`GET /tasks/{id}/log` with `Accept: text/event-stream`; `id:` `<run>:<seq>`).
//!
//! Each stream holds a permit of `--http-max-streams` (past it: 503) and a queue of at most
//! [`STREAM_QUEUE`] events between what it follows and its reader. A reader that stops
//! reading fills its queue; then the stream is dropped (its queue freed, its HTTP/1 connection
//! closed), not buffered for ever: a browser's `EventSource` reconnects and resumes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::access::Who;
use super::api::path_id;
use super::{App, ConnKill, Kind, Refusal};
use crate::domain::TaskStatus;
use crate::logs::{LogItem, Watched};
use crate::store::Store;

/// Events a stream may hold unread before it is dropped.
pub const STREAM_QUEUE: usize = 256;

/// What a stream's producer is told when it cannot go on.
enum Stop {
    /// The reader went away, or the server stops.
    Gone,
    /// The reader stopped reading: its queue is full.
    Stalled,
}

/// The sending end of a stream's bounded queue.
struct Feeder {
    tx: mpsc::Sender<Event>,
    kill: Option<ConnKill>,
}

impl Feeder {
    /// Queues `event`, never waiting: a full queue drops the stream.
    fn send(&self, event: Event) -> Result<(), Stop> {
        match self.tx.try_send(event) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Stop::Gone),
            Err(mpsc::error::TrySendError::Full(_)) => {
                if let Some(kill) = &self.kill {
                    kill.0.cancel();
                }
                Err(Stop::Stalled)
            }
        }
    }
}

/// A stream whose events `produce` sends through a [`Feeder`]; it ends when the reader goes
/// away, the server stops, or `produce` returns.
fn stream<S, F, Fut>(
    app: &App<S>,
    version: Version,
    kill: Option<ConnKill>,
    produce: F,
) -> Result<Response, Refusal>
where
    S: Store,
    F: FnOnce(Feeder) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Ok(permit) = Arc::clone(&app.streams).try_acquire_owned() else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many live streams open ({}); close a page or try again later",
                app.max_streams
            ),
            Kind::Text,
        ));
    };
    let (tx, rx) = mpsc::channel::<Event>(STREAM_QUEUE);
    // Only an HTTP/1 connection carries nothing but this stream; an HTTP/2 one is left open.
    let kill = kill.filter(|_| version < Version::HTTP_2);
    let closed = tx.clone();
    let work = produce(Feeder { tx, kill });
    let shutdown = app.shutdown.clone();
    tokio::spawn(async move {
        let _permit = permit;
        tokio::select! {
            () = work => {}
            () = closed.closed() => {}
            () = shutdown.cancelled() => {}
        }
    });
    let ok: fn(Event) -> Result<Event, Infallible> = Ok;
    let events = tokio_stream::StreamExt::map(ReceiverStream::new(rx), ok);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn last_event_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// `GET /events`: every entry of the change feed, `event:` its topic (`task`, `runner`,
/// `landing`, `queue`, `train`), `id:` its position, `data:` a task's `{id, status, from,
/// kind, at, message}`, another's `{subject, kind, at, message, …its details}`; first `event:
/// ready` with the position it starts after.
pub async fn events<S: Store>(
    _: Who,
    State(app): State<App<S>>,
    headers: HeaderMap,
    version: Version,
    kill: Option<Extension<ConnKill>>,
) -> Result<Response, Refusal> {
    let after = match last_event_id(&headers) {
        None => None,
        Some(raw) => Some(raw.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "Last-Event-ID is the id: of an event this server sent (a number)",
                Kind::Text,
            )
        })?),
    };
    let coordinator = Arc::clone(&app.coordinator);
    let sse = stream(&app, version, kill.map(|k| k.0), move |feeder| async move {
        let (up_tx, mut up_rx) = mpsc::channel::<Watched>(64);
        let producer = crate::logs::stream_feed(
            Arc::clone(coordinator.logs()),
            coordinator.store().clone(),
            after.map(|after| crate::logs::Resume { after, at: None }),
            |_| true,
            up_tx,
        );
        tokio::pin!(producer);
        let _ = feeder.send(
            Event::default()
                .retry(Duration::from_secs(2))
                .comment("live"),
        );
        loop {
            tokio::select! {
                result = &mut producer => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "an event stream ended");
                    }
                    return;
                }
                item = up_rx.recv() => {
                    let Some(item) = item else { return };
                    let event = match item {
                        Watched::From(id) => Event::default().event("ready").id(id.to_string()).data("{}"),
                        Watched::Event(e) => Event::default()
                            .event(e.topic.as_str())
                            .id(e.position.to_string())
                            .data(event_data(&e).to_string()),
                    };
                    if let Err(stop) = feeder.send(event) {
                        if matches!(stop, Stop::Stalled) {
                            tracing::info!("an event stream whose reader stopped reading was dropped");
                        }
                        return;
                    }
                }
            }
        }
    })?;
    Ok(sse)
}

/// The `data:` of a feed entry: a task's `{id, status, from, kind, at, message}`, another's
/// `{subject, kind, at, message}` and its details.
fn event_data(e: &crate::feed::FeedEntry) -> serde_json::Value {
    let mut data = e.data_json();
    if let serde_json::Value::Object(map) = &mut data {
        if e.topic != crate::feed::Topic::Task {
            map.insert("subject".into(), e.subject.clone().into());
        }
        map.insert("kind".into(), e.kind.clone().into());
        map.insert("at".into(), pipeline_api::time::rfc3339(e.at).into());
    }
    data
}

/// Where a resumed log stream goes on: after line `seq` of run `run`.
fn log_position(raw: &str) -> Option<(i64, u64)> {
    let (run, seq) = raw.split_once(':')?;
    Some((run.parse().ok()?, seq.parse().ok()?))
}

/// `GET /tasks/{id}/log` with `Accept: text/event-stream`: the task's log, its stored lines
/// then the live ones, `event: run` (a run begins: `{run, phase, attempt, runner}`), `event:
/// line` (`{run, seq, at, stream, phase, text}`, the stream `stdout`, `stderr`, `runner` or
/// `server`; `id:` `<run>:<seq>`), `event: status` (`{status}`); it ends once the task is done,
/// needs help or is cancelled. Any other `Accept` goes to the task's page.
pub async fn task_log<S: Store>(
    _: Who,
    State(app): State<App<S>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    version: Version,
    kill: Option<Extension<ConnKill>>,
) -> Result<Response, Refusal> {
    let id = path_id(&id, Kind::Text)?;
    let wants_stream = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if !wants_stream {
        return Ok(Redirect::to(&format!("/tasks/{id}#log")).into_response());
    }
    app.coordinator
        .show_task(&id)
        .await
        .map_err(|e| Refusal::from_error(e, Kind::Text))?;
    let resume = match last_event_id(&headers) {
        None => None,
        Some(raw) => Some(log_position(raw).ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "Last-Event-ID is the id: of a log line this server sent (RUN:SEQ)",
                Kind::Text,
            )
        })?),
    };
    let coordinator = Arc::clone(&app.coordinator);
    let sse = stream(&app, version, kill.map(|k| k.0), move |feeder| async move {
        let (up_tx, mut up_rx) = mpsc::channel::<LogItem>(16);
        let producer = crate::logs::stream_logs(
            Arc::clone(coordinator.logs()),
            coordinator.store().clone(),
            id,
            true,
            up_tx,
        );
        tokio::pin!(producer);
        let _ = feeder.send(
            Event::default()
                .retry(Duration::from_secs(2))
                .comment("live"),
        );
        let seen =
            |run: i64, seq: u64| resume.is_some_and(|(r, s)| run < r || (run == r && seq <= s));
        loop {
            let item = tokio::select! {
                result = &mut producer => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "a log stream ended");
                    }
                    return;
                }
                item = up_rx.recv() => match item { Some(item) => item, None => return },
            };
            let events: Vec<Event> = match &item {
                LogItem::Run(run) => vec![
                    Event::default().event("run").data(
                        serde_json::json!({
                            "run": run.id,
                            "phase": run.phase.as_str(),
                            "attempt": run.attempt,
                            "runner": run.runner,
                        })
                        .to_string(),
                    ),
                ],
                LogItem::Lines { run_id, lines, .. } => lines
                    .iter()
                    .filter(|l| l.stream != crate::domain::LogStream::Raw && !seen(*run_id, l.seq))
                    .map(|l| {
                        Event::default()
                            .event("line")
                            .id(format!("{run_id}:{}", l.seq))
                            .data(
                                serde_json::json!({
                                    "run": run_id,
                                    "seq": l.seq,
                                    "at": pipeline_api::time::rfc3339(l.at),
                                    "stream": l.stream.as_str(),
                                    "phase": l.phase.as_str(),
                                    "text": l.text,
                                })
                                .to_string(),
                            )
                    })
                    .collect(),
                LogItem::Status(s) => vec![
                    Event::default()
                        .event("status")
                        .data(serde_json::json!({ "status": s.as_str() }).to_string()),
                ],
            };
            for event in events {
                if feeder.send(event).is_err() {
                    return;
                }
            }
            if let LogItem::Status(s) = item
                && matches!(
                    s,
                    TaskStatus::Done | TaskStatus::NeedsHelp | TaskStatus::Cancelled
                )
            {
                return;
            }
        }
    })?;
    Ok(sse)
}
