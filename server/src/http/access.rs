//! Who is asking, and what they may do.
//!
//! A request carries the admin or the viewer token as `Authorization: Bearer TOKEN`
//! (scripts), or a session cookie that `POST /login` set (browsers): `pipeline_session`, or
//! `__Host-pipeline_session` under TLS, HttpOnly, SameSite=Strict, Secure under TLS. The session
//! is the server's (see `auth.rs`): revoked by `POST /logout` or by rotating its token.
//!
//! A state change is a `POST` by the admin, and is refused (403) when it comes from another
//! site: a browser says where a request comes from in `Sec-Fetch-Site`; one that does not say
//! it sends `Origin`, which must be this server. A request with neither is a script's: it is
//! taken only with a bearer token (a browser never adds one by itself), never with the cookie.

use axum::Form;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{App, Kind, Refusal};
use crate::auth::{Caller, SESSION_TTL};
use crate::store::Store;

/// The session cookie's name without TLS.
pub const COOKIE: &str = "pipeline_session";
/// The session cookie's name under TLS: the `__Host-` prefix binds it to this host, path `/`,
/// and `Secure`.
pub const HOST_COOKIE: &str = "__Host-pipeline_session";

/// The cookie name the server uses.
pub fn cookie_name(tls: bool) -> &'static str {
    if tls { HOST_COOKIE } else { COOKIE }
}

/// The bearer token of a request, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim_start();
    let (scheme, token) = value.split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The value of the cookie `name`, if the request has it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The caller of a request that may read: the admin or the viewer, by token or session.
#[derive(Clone, Debug)]
pub struct Who {
    pub caller: Caller,
    /// Came with a bearer token (a script), not a cookie (a browser).
    pub bearer: bool,
}

impl Who {
    pub fn is_admin(&self) -> bool {
        self.caller == Caller::Admin
    }

    /// `admin` or `viewer`, as the page shows it.
    pub fn role(&self) -> &'static str {
        if self.is_admin() { "admin" } else { "viewer" }
    }
}

/// The kind of answer a request wants, for its refusals.
pub fn kind_of(parts: &Parts) -> Kind {
    let wants_stream = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let wants_json = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.starts_with("application/json"));
    match Kind::of_path(parts.uri.path()) {
        Kind::Page if wants_stream => Kind::Text,
        Kind::Page if wants_json => Kind::Json,
        kind => kind,
    }
}

impl<S: Store> FromRequestParts<App<S>> for Who {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, app: &App<S>) -> Result<Self, Refusal> {
        let kind = kind_of(parts);
        let auth = app.coordinator.auth();
        if let Some(token) = bearer(&parts.headers) {
            return match auth.identify(token) {
                Some(caller @ (Caller::Admin | Caller::Viewer)) => Ok(Who {
                    caller,
                    bearer: true,
                }),
                _ => Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    "the credential is not the admin or the viewer token (unknown or rotated)",
                    kind,
                )),
            };
        }
        let now = app.coordinator.now();
        let session =
            cookie(&parts.headers, cookie_name(app.tls)).and_then(|id| auth.session(id, now));
        match session {
            Some(caller) => Ok(Who {
                caller,
                bearer: false,
            }),
            None if kind == Kind::Page && parts.method == axum::http::Method::GET => {
                let mut refusal = Refusal::new(StatusCode::SEE_OTHER, "sign in first", kind);
                refusal.login = Some(
                    parts
                        .uri
                        .path_and_query()
                        .map_or("/".to_owned(), |p| p.as_str().to_owned()),
                );
                Err(refusal)
            }
            None => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "no credential: sign in at /login, or send Authorization: Bearer TOKEN (the \
                 viewer or the admin token)",
                kind,
            )),
        }
    }
}

/// The caller of a state change: the admin, from this site.
#[derive(Clone, Debug)]
pub struct Admin(pub Who);

impl<S: Store> FromRequestParts<App<S>> for Admin {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, app: &App<S>) -> Result<Self, Refusal> {
        let kind = kind_of(parts);
        let who = Who::from_request_parts(parts, app).await?;
        same_site(&parts.headers, who.bearer, kind)?;
        if !who.is_admin() {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "refused: the viewer token may only look; actions need the admin token",
                kind,
            ));
        }
        Ok(Admin(who))
    }
}

/// Refuses a state change from another site: `Sec-Fetch-Site` must be `same-origin` (or
/// `none`, a person's own navigation); without it, `Origin` must be this host; with neither, only
/// a bearer token is taken.
pub fn same_site(headers: &HeaderMap, bearer: bool, kind: Kind) -> Result<(), Refusal> {
    let refuse = |why: &str| {
        Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("cross-site request refused: {why}"),
            kind,
        ))
    };
    if let Some(site) = headers.get("sec-fetch-site") {
        return match site.to_str().unwrap_or_default() {
            "same-origin" | "none" => Ok(()),
            other => refuse(&format!(
                "it came from another site (Sec-Fetch-Site: {other})"
            )),
        };
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let origin_host = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        return match origin_host {
            Some(h) if !host.is_empty() && h == host => Ok(()),
            _ => refuse(&format!("its Origin {origin} is not this server")),
        };
    }
    if bearer {
        return Ok(());
    }
    refuse("the browser said neither where it came from (Sec-Fetch-Site) nor its Origin")
}

/// A path to go back to after signing in: one of this site's, never another's.
pub fn local_path(next: Option<&str>) -> String {
    match next {
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.starts_with("/\\")
                && !p.chars().any(|c| c.is_control()) =>
        {
            p.to_owned()
        }
        _ => "/".to_owned(),
    }
}

/// `text` as a URL query component (letters, digits and `-._~/` as they are).
pub fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    next: Option<String>,
}

#[derive(Deserialize)]
pub struct Next {
    pub next: Option<String>,
}

/// `POST /login`: the admin or the viewer token in the form field `token`; sets the session
/// cookie and goes on to `next`.
pub async fn login<S: Store>(
    State(app): State<App<S>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, Refusal> {
    same_site(&headers, false, Kind::Page)?;
    let now = app.coordinator.now();
    let opened = app
        .coordinator
        .auth()
        .open_session(app.coordinator.store(), form.token.trim(), now)
        .await;
    let (id, _, _) = match opened {
        Ok(opened) => opened,
        Err(crate::error::Error::Unauthenticated(why)) => {
            return Ok(super::html::login_page(
                StatusCode::UNAUTHORIZED,
                Some(&why),
                &local_path(form.next.as_deref()),
            ));
        }
        Err(other) => return Err(Refusal::from_error(other, Kind::Page)),
    };
    let cookie = format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        cookie_name(app.tls),
        SESSION_TTL.as_secs(),
        if app.tls { "; Secure" } else { "" }
    );
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, local_path(form.next.as_deref())),
        ],
    )
        .into_response())
}

/// `POST /logout`: ends the session (in the database too) and clears the cookie.
pub async fn logout<S: Store>(
    State(app): State<App<S>>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    same_site(&headers, false, Kind::Page)?;
    if let Some(id) = cookie(&headers, cookie_name(app.tls)) {
        app.coordinator
            .auth()
            .end_session(app.coordinator.store(), id)
            .await
            .map_err(|e| Refusal::from_error(e, Kind::Page))?;
    }
    let cookie = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        cookie_name(app.tls),
        if app.tls { "; Secure" } else { "" }
    );
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/login".to_owned()),
        ],
    )
        .into_response())
}

/// `GET /login`'s `next`.
pub type NextQuery = Query<Next>;

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn state_changes_from_another_site_are_refused() {
        let ok = |h: &[(&'static str, &str)], bearer| same_site(&headers(h), bearer, Kind::Page);
        assert!(ok(&[("sec-fetch-site", "same-origin")], false).is_ok());
        assert!(ok(&[("sec-fetch-site", "cross-site")], false).is_err());
        assert!(ok(&[("sec-fetch-site", "same-site")], true).is_err());
        assert!(ok(&[("origin", "http://h:1"), ("host", "h:1")], false).is_ok());
        assert!(ok(&[("origin", "http://evil:1"), ("host", "h:1")], false).is_err());
        assert!(ok(&[("origin", "null"), ("host", "h:1")], false).is_err());
        assert!(ok(&[], true).is_ok(), "a script with its token");
        assert!(ok(&[], false).is_err(), "a cookie without either header");
    }

    #[test]
    fn cookies_and_paths_are_read_strictly() {
        let h = headers(&[("cookie", "a=1; pipeline_session=pls_x; b=2")]);
        assert_eq!(cookie(&h, COOKIE), Some("pls_x"));
        assert_eq!(cookie(&h, HOST_COOKIE), None);
        assert_eq!(local_path(Some("/tasks?status=open")), "/tasks?status=open");
        for bad in ["//evil.example", "https://evil", "/\\evil", "x", ""] {
            assert_eq!(local_path(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(encode_component("/tasks?a=b c"), "/tasks%3Fa%3Db%20c");
    }
}
