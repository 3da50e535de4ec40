//! The web page and the HTTP API, on `--http ADDR` (HTTPS with the server's certificate).
//!
//! The same shape as the gRPC edge: each handler checks what it is given, calls the one
//! coordinator method the gRPC call would, converts domain → prost with `grpc::convert` (the
//! same functions the gRPC service uses), then prost → view → JSON with `pipeline-api`, so an
//! `/api/…` route answers the very bytes `pipelinectl … --json` prints.
//!
//! - [`access`]: who is asking (a bearer token or a session cookie), `POST /login` and
//!   `/logout`, and the refusal of cross-site state changes.
//! - `api`: `/api/status`, `/api/queue`, `/api/tasks`, `/api/tasks/{id}`, `/api/runners`.
//! - `pages`: the pages (askama templates in `server/templates/`, checked at compile time);
//!   `html`: the renderer and the two pages any part may answer with (a refusal, sign-in).
//! - `actions`: the admin's buttons (`POST`), each one coordinator call.
//! - `live`: server-sent events (`/events`, a task's live log), each stream with a bounded
//!   queue and counted against `--http-max-streams`.
//! - `ops`: the operators' endpoints, `/metrics` (Prometheus text), `/healthz` and
//!   `/readyz`.
//! - `charts`: the small SVG charts, from figures the server keeps (trains, usage) or rolls in
//!   memory (queue depth, recently landed).
//!
//! Architecture invariant: every route but `/login`, `/logout`, the static files, `/healthz`,
//! `/readyz` (and `/metrics` with `--metrics-public`) needs the viewer or admin credential, and every state change is a `POST` that needs the admin's and is
//! refused when it comes from another site (`Sec-Fetch-Site`, else `Origin`).

pub mod access;
mod actions;
pub(crate) mod api;
pub mod charts;
mod html;
mod live;
mod ops;
mod pages;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::coordinator::Coordinator;
use crate::error::Error;
use crate::store::Store;

/// The largest request body taken (a form with a note of 64 KiB, with room to spare).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// What every handler shares.
pub struct Web<S> {
    pub coordinator: Arc<Coordinator<S, crate::repo::Repo>>,
    /// Served over TLS: cookies are `Secure` and `__Host-`.
    pub tls: bool,
    /// One permit per open server-sent event stream.
    pub streams: Arc<Semaphore>,
    pub max_streams: usize,
    /// Figures rolled in memory for the charts and the queue page.
    pub rolling: charts::Rolling,
    /// Cancelled when the server stops: live streams end.
    pub shutdown: CancellationToken,
    /// The background loops, for `/readyz`.
    pub loops: Arc<crate::health::Loops>,
    /// `--metrics-public`: `/metrics` needs no credential.
    pub metrics_public: bool,
}

pub type App<S> = Arc<Web<S>>;

/// The routes, for any store.
pub fn router<S: Store>(app: App<S>) -> Router {
    let metrics = if app.metrics_public {
        get(ops::metrics_public::<S>)
    } else {
        get(ops::metrics_guarded::<S>)
    };
    Router::new()
        .route("/login", get(pages::login::<S>).post(access::login::<S>))
        .route("/logout", post(access::logout::<S>))
        .route("/", get(pages::queue::<S>))
        .route("/tasks", get(pages::tasks::<S>))
        .route("/tasks/{id}", get(pages::task::<S>))
        .route("/tasks/{id}/log", get(live::task_log::<S>))
        .route("/runners", get(pages::runners::<S>))
        .route("/epics/{id}", get(pages::epic::<S>))
        .route("/events", get(live::events::<S>))
        .route("/api/status", get(api::status::<S>))
        .route("/api/queue", get(api::queue::<S>))
        .route("/api/tasks", get(api::tasks::<S>))
        .route("/api/tasks/{id}", get(api::task::<S>))
        .route("/api/runners", get(api::runners::<S>))
        .route("/tasks/{id}/cancel", post(actions::cancel::<S>))
        .route("/tasks/{id}/retry", post(actions::retry::<S>))
        .route("/tasks/{id}/approve", post(actions::approve::<S>))
        .route("/tasks/{id}/reject", post(actions::reject::<S>))
        .route("/tasks/{id}/priority", post(actions::priority::<S>))
        .route("/queue/pause", post(actions::pause_queue::<S>))
        .route("/queue/resume", post(actions::resume_queue::<S>))
        .route("/runners/{name}/drain", post(actions::drain::<S>))
        .route("/runners/{name}/undrain", post(actions::undrain::<S>))
        .route("/static/app.js", get(app_js))
        .route("/static/style.css", get(style_css))
        // The operators' endpoints, beside the page, with their own access rules.
        .route("/metrics", metrics)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz::<S>))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}

/// The Content-Security-Policy of every answer: scripts and styles only from this origin's own
/// files (no inline script, no `eval`), no framing, forms only to this origin.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn app_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../static/app.js"),
    )
        .into_response()
}

async fn style_css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../static/style.css"),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        format!("no such page: {}", uri.path()),
        Kind::of_path(uri.path()),
    )
}

/// How a refusal is said: a page for a browser, JSON for `/api`, a line of text for a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Page,
    Json,
    Text,
}

impl Kind {
    pub fn of_path(path: &str) -> Kind {
        if path.starts_with("/api/") {
            Kind::Json
        } else if path == "/events"
            || path.ends_with("/log")
            || matches!(path, "/metrics" | "/healthz" | "/readyz")
        {
            Kind::Text
        } else {
            Kind::Page
        }
    }
}

/// A request refused: its status and one lowercase line saying why, in the request's
/// [`Kind`]; or, for a page without a credential, the way to the login page.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
    pub kind: Kind,
    /// Send a browser to `/login?next=…` instead.
    pub login: Option<String>,
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>, kind: Kind) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            login: None,
        }
    }

    /// A domain error as a refusal: its status by kind of error.
    pub fn from_error(err: Error, kind: Kind) -> Self {
        let status = match &err {
            Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::AlreadyExists(_) | Error::FailedPrecondition(_) | Error::Conflict(_) => {
                StatusCode::CONFLICT
            }
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            // The database is busy: try again (gRPC's UNAVAILABLE).
            Error::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => {
                tracing::error!(error = %err, "internal error (http)");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let message = match err {
            Error::InvalidArgument(m)
            | Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::FailedPrecondition(m)
            | Error::Conflict(m)
            | Error::Unauthenticated(m)
            | Error::PermissionDenied(m)
            | Error::ResourceExhausted(m)
            | Error::Busy(m)
            | Error::Internal(m) => m,
        };
        Self::new(status, one_line(&message), kind)
    }
}

/// Any text as one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        if let Some(next) = self.login {
            let location = format!("/login?next={}", access::encode_component(&next));
            return (
                StatusCode::SEE_OTHER,
                [(header::LOCATION, location)],
                "sign in first\n",
            )
                .into_response();
        }
        match self.kind {
            Kind::Json => {
                let body = serde_json::json!({ "error": self.message }).to_string() + "\n";
                (
                    self.status,
                    [(header::CONTENT_TYPE, "application/json")],
                    body,
                )
                    .into_response()
            }
            Kind::Text => (
                self.status,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                self.message + "\n",
            )
                .into_response(),
            Kind::Page => html::error_page(self.status, &self.message),
        }
    }
}

/// The bounds of the HTTP listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// Time a connection has for its TLS handshake, and an HTTP/1 request for its head.
    pub handshake_timeout: Duration,
}

/// A switch that closes the HTTP/1 connection a request came in on (a live stream whose
/// reader stopped reading is dropped with it).
#[derive(Clone, Debug)]
pub struct ConnKill(pub CancellationToken);

/// The TLS settings of the page: the server's certificate and key, HTTP/2 or HTTP/1.1.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &std::path::Path, e: &dyn std::fmt::Display| {
        Error::InvalidArgument(format!("cannot read {}: {e}", what.display()))
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::InvalidArgument(format!("TLS: {e}")))?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)
    .map_err(|e| Error::InvalidArgument(format!("invalid TLS certificate or key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` on `listener` until `stop` is cancelled: each connection (at most
/// `limits.max_connections` at once; more are closed as they arrive) served as HTTP/1.1 or
/// HTTP/2, through TLS when `tls` is given.
pub async fn serve(
    listener: Arc<TcpListener>,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut refused = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "http: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            if refused == 0 {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "http: at the connection limit; closing new connections"
                );
            }
            refused += 1;
            continue;
        };
        refused = 0;
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let acceptor = acceptor.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            connection(tls, peer, router, limits.handshake_timeout, stop).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "http: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "http: TLS handshake timed out"),
                    }
                }
                None => connection(stream, peer, router, limits.handshake_timeout, stop).await,
            }
        });
    }
}

/// Serves one connection; a graceful end when `stop` fires, an abrupt one when a live stream
/// on it asks ([`ConnKill`]). An HTTP/1 request's head must arrive within `head_timeout`, so a
/// peer that trickles bytes cannot hold a connection slot.
async fn connection<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    head_timeout: Duration,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let kill = CancellationToken::new();
    let service = {
        let kill = ConnKill(kill.clone());
        hyper::service::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(kill.clone());
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let mut router = router.clone();
            async move { tower::Service::call(&mut router, req).await }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        }
        () = kill.cancelled() => {
            tracing::debug!(%peer, "http connection dropped: its reader stopped reading");
        }
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
        }
    }
}
