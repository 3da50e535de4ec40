//! What any part of the HTTP side may answer with as a page: a refusal and the sign-in form,
//! and the one renderer of askama templates (below `access` and `pages`, which both use it).

use askama::Template;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

/// `page` rendered with `status` (a template that fails to render is a logged 500).
pub fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a page did not render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page did not render\n",
            )
                .into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    role: &'a str,
    nav: &'a str,
    code: u16,
    message: &'a str,
}

/// A refusal as a page.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    render(
        status,
        &ErrorPage {
            role: "",
            nav: "",
            code: status.as_u16(),
            message,
        },
    )
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage<'a> {
    role: &'a str,
    nav: &'a str,
    error: Option<&'a str>,
    next: &'a str,
}

/// The sign-in form, saying `error` if the last try was refused, going on to `next`.
pub fn login_page(status: StatusCode, error: Option<&str>, next: &str) -> Response {
    render(
        status,
        &LoginPage {
            role: "",
            nav: "",
            error,
            next,
        },
    )
}
