//! Notifications: `--webhook URL` endpoints are sent the events they take (`--webhook-events`)
//! as signed POSTs (Standard Webhooks 1.0, [`sign`]), delivered at least once, in order, from
//! a durable cursor.
//!
//! - The events are entries of the server's feed ([`source`]: the change feed, in commit order;
//!   the worker wakes on its broadcast). Each endpoint keeps its place in it in the store (`webhooks`, migration
//!   0019): the last entry handled, and the attempts, next attempt and last error of the entry
//!   after it. A new endpoint starts at the feed's head (no history is replayed to it); the
//!   cursor of an endpoint no longer configured is forgotten at start-up, so one given again
//!   later is new too.
//! - One worker per endpoint ([`run`]), so a slow or dead receiver holds up only itself. It
//!   delivers the entries after its cursor in order, moving the cursor (in the store first,
//!   then in memory) only once an entry is answered 2xx, or refused for good (a 4xx other than
//!   408 and 429: recorded with the reason, not retried), or given up on: other failures (no
//!   connection, no answer within the time limit, 408, 429, 5xx) are retried with a back-off
//!   doubling up to an hour, for a day from the first failure, then the entry is given up on,
//!   recorded with the reason, and the next one goes. A crash or restart resumes at the
//!   stored cursor: an entry may be sent again, never skipped.
//! - A message's `webhook-id` is `msg_<position>`, the same on every attempt and after a
//!   restart (receivers de-duplicate on it); its `webhook-timestamp` and signature are made
//!   afresh for each attempt. The body is `{"type", "timestamp", "data"}`, `data` the task, or
//!   the runner, as the JSON API shows it when the message is sent (a runner with the health
//!   and reason its entry reported); landing's entries carry their own details.
//! - No polling: a worker waits for the next entry (the in-process broadcast of transitions,
//!   [`LogHub::watch`], subscribed before it reads so nothing falls between), or for its next
//!   attempt's time, or for the shutdown.
//! - What each endpoint is doing is kept in a [`Board`] that `status` shows.

mod deliver;
mod sign;
mod source;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pipeline_core::clock::now_ms;
use serde_json::json;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::CancellationToken;

use crate::domain::{Millis, Task};
use crate::store::{Store, WebhookCursor};
use deliver::{Client, Message, Outcome};
pub use sign::Secret;
use source::{Entry, Subject};
pub use source::{Kind, Kinds};

/// How long a message is retried from its first failure before it is given up on.
pub const RETRY_FOR: Duration = Duration::from_secs(24 * 3600);

/// Entries read at a time.
const PAGE: u32 = 256;

/// The wait before reading the store again after a read failed.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// How a task is shown in a message's `data`: as the JSON API shows it (given by the caller,
/// which knows that shape).
pub type Render = Arc<dyn Fn(&Task) -> serde_json::Value + Send + Sync>;

/// How a runner, by name, is shown in a message's `data`: as the JSON API's runners view shows
/// it now, or `None` for a runner the server no longer knows (given by the caller, which knows
/// that shape and the runners).
pub type RenderRunner = Arc<dyn Fn(&str) -> Option<serde_json::Value> + Send + Sync>;

/// What every endpoint's worker is given.
pub struct Settings {
    pub secret: Secret,
    pub kinds: Kinds,
    /// The first wait after a failed attempt (doubled after each, up to an hour).
    pub backoff_base: Duration,
    /// The time limit on connecting and on a whole request.
    pub timeout: Duration,
    pub render: Render,
    pub render_runner: RenderRunner,
}

/// An endpoint's URL, checked: `http` or `https`, with a host.
pub fn parse_url(raw: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(raw).map_err(|e| format!("--webhook {raw:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "--webhook {}: give an http:// or https:// URL with a host",
            shown(&url)
        ));
    }
    Ok(url)
}

/// An endpoint's URL as it may be shown and logged: its origin, with the rest (a path or a
/// query may hold a secret) as `…`.
pub fn shown(url: &reqwest::Url) -> String {
    let origin = url.origin().ascii_serialization();
    if url.path() == "/" && url.query().is_none() {
        format!("{origin}/")
    } else {
        format!("{origin}/…")
    }
}

/// The message a failing endpoint is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// Its `webhook-id`.
    pub id: String,
    /// Its `type`.
    pub kind: &'static str,
    pub attempts: u32,
    pub next_attempt_at: Option<Millis>,
}

/// An endpoint as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointStatus {
    /// [`shown`].
    pub url: String,
    /// The last entry handled.
    pub position: i64,
    pub last_delivered_at: Option<Millis>,
    /// The message it is trying again, while one fails.
    pub pending: Option<Pending>,
    /// The last failure (of the pending message, or the last one refused or given up on).
    pub last_error: Option<String>,
    pub last_error_at: Option<Millis>,
}

/// What each endpoint is doing, in memory, for `status`.
#[derive(Debug, Default)]
pub struct Board {
    endpoints: Mutex<Vec<EndpointStatus>>,
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<EndpointStatus>> {
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, index: usize, status: EndpointStatus) {
        if let Some(slot) = self.lock().get_mut(index) {
            *slot = status;
        }
    }

    /// Every endpoint, in the order given on the command line.
    pub fn snapshot(&self) -> Vec<EndpointStatus> {
        self.lock().clone()
    }
}

/// An endpoint, opened: its URL and its cursor as stored.
pub struct Opened {
    pub url: reqwest::Url,
    pub cursor: WebhookCursor,
}

/// Forgets the cursors of endpoints no longer given to `--webhook` (`urls`, maybe none), each
/// logged: they are sent nothing more, and one given again later is a new endpoint, sent what
/// happens from then on (not everything it missed meanwhile).
pub async fn forget_unconfigured<S: Store>(
    store: &S,
    urls: &[reqwest::Url],
) -> crate::error::Result<()> {
    for cursor in store.webhooks().await? {
        if urls.iter().any(|u| u.as_str() == cursor.url) {
            continue;
        }
        if store.forget_webhook(&cursor.url).await? {
            let endpoint = reqwest::Url::parse(&cursor.url)
                .map_or_else(|_| "an endpoint".to_owned(), |u| shown(&u));
            tracing::info!(
                %endpoint,
                position = cursor.position,
                "forgot a webhook endpoint no longer configured"
            );
        }
    }
    Ok(())
}

/// Opens every endpoint's cursor, a new one at the feed's head, before anything else is
/// written (so a new endpoint is sent everything from the server's start on), and forgets
/// those of endpoints no longer configured ([`forget_unconfigured`]); returns them and the
/// board that shows them.
pub async fn open<S: Store>(
    store: &S,
    urls: &[reqwest::Url],
    now: Millis,
) -> crate::error::Result<(Vec<Opened>, Arc<Board>)> {
    forget_unconfigured(store, urls).await?;
    let head = source::head(store).await?;
    let mut opened = Vec::new();
    for url in urls {
        let cursor = store.open_webhook(url.as_str(), head, now).await?;
        opened.push(Opened {
            url: url.clone(),
            cursor,
        });
    }
    let board = Board {
        endpoints: Mutex::new(
            opened
                .iter()
                .map(|o| status_of(&o.url, &o.cursor, None))
                .collect(),
        ),
    };
    Ok((opened, Arc::new(board)))
}

fn status_of(url: &reqwest::Url, c: &WebhookCursor, pending: Option<Pending>) -> EndpointStatus {
    EndpointStatus {
        url: shown(url),
        position: c.position,
        last_delivered_at: c.last_delivered_at,
        pending,
        last_error: c.last_error.clone(),
        last_error_at: c.last_error_at,
    }
}

/// A `runner.unhealthy` message's `data`: the runner as the JSON API shows it when the message
/// is sent (`now`), with the health and reason its entry `reported` (so a message sent late,
/// after the runner recovered, still says why it was unhealthy). A runner the server no
/// longer knows (forgotten) is its name and what the entry reported.
fn runner_data(
    now: Option<serde_json::Value>,
    name: &str,
    reported: &serde_json::Value,
) -> serde_json::Value {
    let mut data = match now {
        Some(serde_json::Value::Object(map)) => map,
        _ => {
            let mut map = serde_json::Map::new();
            map.insert("name".into(), name.into());
            map
        }
    };
    if let serde_json::Value::Object(reported) = reported {
        for key in ["health", "health_reason"] {
            if let Some(value) = reported.get(key) {
                data.insert(key.into(), value.clone());
            }
        }
    }
    serde_json::Value::Object(data)
}

/// Whether the worker goes on or stops (shutdown).
#[derive(PartialEq, Eq)]
enum Go {
    On,
    Stop,
}

/// Waits `wait`, or until `shutdown`.
async fn pause(wait: Duration, shutdown: &CancellationToken) -> Go {
    tokio::select! {
        () = shutdown.cancelled() => Go::Stop,
        () = tokio::time::sleep(wait) => Go::On,
    }
}

/// Moves `cursor` past `position`, which is settled: nothing is pending.
fn pass(cursor: &mut WebhookCursor, position: i64) {
    cursor.position = position;
    cursor.attempts = 0;
    cursor.next_attempt_at = None;
    cursor.failing_since = None;
}

/// What an attempt at the entry at `position` did to the cursor.
#[derive(Debug, PartialEq, Eq)]
enum Settled {
    /// Delivered: the cursor moved past it.
    Delivered,
    /// Refused for good or given up on: the cursor moved past it, the reason in `last_error`.
    Passed,
    /// To be tried again at `next_attempt_at`.
    Retry,
}

/// The cursor after an attempt at the entry at `position` (`label` names it in errors) came
/// out as `outcome` at `now`: the worker's one decision, without IO.
fn settle(
    cursor: &mut WebhookCursor,
    position: i64,
    label: &str,
    outcome: Outcome,
    now: Millis,
    backoff_base: Duration,
) -> Settled {
    match outcome {
        Outcome::Delivered => {
            pass(cursor, position);
            cursor.last_delivered_at = Some(now);
            Settled::Delivered
        }
        Outcome::Refused(why) => {
            pass(cursor, position);
            cursor.last_error = Some(format!("{label}: {why}"));
            cursor.last_error_at = Some(now);
            Settled::Passed
        }
        Outcome::Failed(why) => {
            cursor.attempts = cursor.attempts.saturating_add(1);
            let since = *cursor.failing_since.get_or_insert(now);
            cursor.last_error_at = Some(now);
            if now.saturating_sub(since) >= RETRY_FOR.as_millis() as i64 {
                let attempts = cursor.attempts;
                pass(cursor, position);
                cursor.last_error = Some(format!(
                    "{label}: gave up after {attempts} attempts over {} h: {why}",
                    RETRY_FOR.as_secs() / 3600
                ));
                Settled::Passed
            } else {
                let wait = deliver::backoff(backoff_base, cursor.attempts);
                cursor.next_attempt_at = Some(now.saturating_add(wait.as_millis() as i64));
                cursor.last_error = Some(format!("{label}: {why}"));
                Settled::Retry
            }
        }
    }
}

/// One endpoint's worker.
struct Worker<S> {
    store: S,
    board: Arc<Board>,
    index: usize,
    url: reqwest::Url,
    client: Client,
    settings: Arc<Settings>,
    cursor: WebhookCursor,
    /// The position the store has.
    stored: i64,
}

impl<S: Store> Worker<S> {
    /// Writes the cursor (memory follows the store: a write that fails is logged, and the
    /// store's cursor, behind, only means an entry may be sent again).
    async fn persist(&mut self, pending: Option<Pending>) {
        match self.store.put_webhook(&self.cursor).await {
            Ok(_) => self.stored = self.cursor.position,
            Err(e) => tracing::warn!(
                endpoint = %shown(&self.url),
                "cannot record the webhook's progress: {e}"
            ),
        }
        self.publish(pending);
    }

    fn publish(&self, pending: Option<Pending>) {
        self.board
            .set(self.index, status_of(&self.url, &self.cursor, pending));
    }

    /// A message's body: its type, the entry's time, and what it is about as it is now.
    async fn body(&self, entry: &Entry, kind: Kind) -> crate::error::Result<Vec<u8>> {
        let data = match &entry.subject {
            Subject::Task(id) => self
                .store
                .get_task(id)
                .await?
                .map_or(serde_json::Value::Null, |t| (self.settings.render)(&t)),
            Subject::Runner { name, reported } => {
                runner_data((self.settings.render_runner)(name), name, reported)
            }
            Subject::Other(data) => data.clone(),
        };
        let body = json!({
            "type": kind.word(),
            "timestamp": pipeline_api::time::rfc3339(entry.at),
            "data": data,
        });
        Ok(body.to_string().into_bytes())
    }

    /// Delivers `entry` (retrying as long as it may), then moves the cursor past it.
    async fn deliver(&mut self, entry: &Entry, kind: Kind, shutdown: &CancellationToken) -> Go {
        let id = format!("msg_{}", entry.position);
        let pending = |c: &WebhookCursor| {
            (c.attempts > 0).then(|| Pending {
                id: id.clone(),
                kind: kind.word(),
                attempts: c.attempts,
                next_attempt_at: c.next_attempt_at,
            })
        };
        loop {
            self.publish(pending(&self.cursor));
            if let Some(next) = self.cursor.next_attempt_at {
                let wait = next.saturating_sub(now_ms());
                if wait > 0 && pause(Duration::from_millis(wait as u64), shutdown).await == Go::Stop
                {
                    return Go::Stop;
                }
            }
            let body = match self.body(entry, kind).await {
                Ok(body) => body,
                Err(e) => {
                    tracing::warn!(endpoint = %shown(&self.url), "cannot read {id}'s task: {e}");
                    if pause(STORE_RETRY, shutdown).await == Go::Stop {
                        return Go::Stop;
                    }
                    continue;
                }
            };
            let message = Message {
                id: &id,
                body: &body,
            };
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return Go::Stop,
                outcome = self.client.send(&self.settings.secret, &message, now_ms() / 1000) => outcome,
            };
            let label = format!("{id} ({})", kind.word());
            match settle(
                &mut self.cursor,
                entry.position,
                &label,
                outcome,
                now_ms(),
                self.settings.backoff_base,
            ) {
                Settled::Delivered => {}
                Settled::Passed => {
                    if let Some(why) = &self.cursor.last_error {
                        tracing::warn!(endpoint = %shown(&self.url), "{why}");
                    }
                }
                Settled::Retry => {
                    tracing::info!(
                        endpoint = %shown(&self.url),
                        attempts = self.cursor.attempts,
                        "{}; trying again",
                        self.cursor.last_error.as_deref().unwrap_or(&label),
                    );
                    self.persist(pending(&self.cursor)).await;
                    continue;
                }
            }
            self.persist(None).await;
            return Go::On;
        }
    }
}

/// The worker of the `index`-th endpoint, until `shutdown`: delivers the entries after its
/// cursor, then waits for the next one.
pub async fn run<S: Store>(
    store: S,
    board: Arc<Board>,
    index: usize,
    opened: Opened,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) {
    // Subscribed before the first read: an entry committed after it wakes the worker.
    let mut watch = store.feed().subscribe();
    let client = match Client::new(opened.url.clone(), settings.timeout) {
        Ok(client) => client,
        Err(e) => {
            // Checked at start-up (`check`), so not expected here; the supervisor says so.
            tracing::error!("{e}");
            return;
        }
    };
    let mut worker = Worker {
        stored: opened.cursor.position,
        cursor: opened.cursor,
        url: opened.url,
        store,
        board,
        index,
        client,
        settings,
    };
    loop {
        // What the wake-ups so far announced is read now.
        while !matches!(
            watch.try_recv(),
            Err(TryRecvError::Empty | TryRecvError::Closed)
        ) {}
        let entries = match source::entries_after(&worker.store, worker.cursor.position, PAGE).await
        {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(endpoint = %shown(&worker.url), "cannot read the feed: {e}");
                if pause(STORE_RETRY, &shutdown).await == Go::Stop {
                    return;
                }
                continue;
            }
        };
        let full = entries.len() == PAGE as usize;
        for entry in &entries {
            match entry.kind.filter(|k| worker.settings.kinds.contains(*k)) {
                Some(kind) => {
                    if worker.deliver(entry, kind, &shutdown).await == Go::Stop {
                        return;
                    }
                }
                None => pass(&mut worker.cursor, entry.position),
            }
        }
        if full {
            continue;
        }
        // Caught up: entries passed over (not this endpoint's events) are recorded once.
        if worker.cursor.position > worker.stored {
            worker.persist(None).await;
        } else {
            worker.publish(None);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            got = watch.recv() => {
                if let Err(RecvError::Closed) = got {
                    // No more wake-ups: the server is stopping.
                    shutdown.cancelled().await;
                    return;
                }
            }
        }
    }
}

/// Checks what `--webhook` endpoints need before the server starts: each URL, the client.
pub fn check(urls: &[reqwest::Url], timeout: Duration) -> Result<(), String> {
    for url in urls {
        Client::new(url.clone(), timeout)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(5);
    const HOUR: Millis = 3_600_000;

    #[test]
    fn a_failure_is_retried_with_back_off_for_a_day_then_given_up_on() {
        let mut c = WebhookCursor::at("http://h/", 10);
        let failed = || Outcome::Failed("cannot connect".into());
        assert_eq!(
            settle(&mut c, 11, "msg_11", failed(), 1_000, BASE),
            Settled::Retry
        );
        assert_eq!((c.position, c.attempts), (10, 1));
        assert_eq!(c.next_attempt_at, Some(6_000));
        assert_eq!(c.failing_since, Some(1_000));
        assert_eq!(c.last_error.as_deref(), Some("msg_11: cannot connect"));
        assert_eq!(
            settle(&mut c, 11, "msg_11", failed(), 6_000, BASE),
            Settled::Retry
        );
        assert_eq!(c.next_attempt_at, Some(16_000), "doubled");
        assert_eq!(c.failing_since, Some(1_000), "since the first failure");
        // A day after the first failure, the last attempt fails: given up, the next one goes.
        let later = 1_000 + 24 * HOUR;
        assert_eq!(
            settle(&mut c, 11, "msg_11", failed(), later, BASE),
            Settled::Passed
        );
        assert_eq!((c.position, c.attempts, c.next_attempt_at), (11, 0, None));
        assert_eq!(c.failing_since, None);
        assert!(
            c.last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("msg_11: gave up after 3 attempts over 24 h")),
            "{c:?}"
        );
    }

    #[test]
    fn a_runner_is_sent_whole_as_now_with_the_health_its_entry_reported() {
        let reported = json!({"health": "unhealthy", "health_reason": "disk full"});
        let now = json!({"name": "r1", "state": "idle", "labels": ["os=linux"],
                         "health": "healthy", "health_reason": null});
        let data = runner_data(Some(now), "r1", &reported);
        assert_eq!(
            data,
            json!({"name": "r1", "state": "idle", "labels": ["os=linux"],
                   "health": "unhealthy", "health_reason": "disk full"})
        );
        // A runner forgotten since: its name and what was reported.
        assert_eq!(
            runner_data(None, "r1", &reported),
            json!({"name": "r1", "health": "unhealthy", "health_reason": "disk full"})
        );
    }

    #[test]
    fn a_refusal_moves_on_with_its_reason_and_a_delivery_clears_the_failures() {
        let mut c = WebhookCursor::at("http://h/", 10);
        let failed = Outcome::Failed("the receiver answered 503".into());
        assert_eq!(
            settle(&mut c, 11, "msg_11", failed, 1_000, BASE),
            Settled::Retry
        );
        assert_eq!(
            settle(&mut c, 11, "msg_11", Outcome::Delivered, 7_000, BASE),
            Settled::Delivered
        );
        assert_eq!((c.position, c.attempts, c.next_attempt_at), (11, 0, None));
        assert_eq!(c.last_delivered_at, Some(7_000));
        let refused = Outcome::Refused("the receiver answered 400".into());
        assert_eq!(
            settle(&mut c, 12, "msg_12", refused, 8_000, BASE),
            Settled::Passed
        );
        assert_eq!((c.position, c.attempts), (12, 0));
        assert_eq!(
            c.last_error.as_deref(),
            Some("msg_12: the receiver answered 400")
        );
        assert_eq!(c.last_error_at, Some(8_000));
    }
}
