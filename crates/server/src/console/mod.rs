//! The web console under `/console/` (docs/console.md): server-rendered HTML (maud, escaped by
//! default) and one small script of its own for the task page's live part (SSE). A thin adapter over `Service`, like the
//! native API: it signs a browser in with an account token (a session cookie, [`session`]),
//! checks a CSRF token on every POST ([`require_csrf`]) and never reads the store directly.

mod layout;
mod overview;
mod records;
pub mod session;
mod submit;
mod task;

use crate::api::{AppState, MAX_BODY_BYTES};
use crate::clock::now_ms;
use axum::Router;
use axum::body::Body;
use axum::extract::{Form, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use layout::{Page, page};
use maud::html;
use serde::Deserialize;
use session::{Sessions, SignedIn};
use std::sync::Arc;

/// The console's only script: the task page's live part over SSE (docs/console.md).
const JS: &str = include_str!("../../assets/console.js");
/// The console's style sheet.
const CSS: &str = include_str!("../../assets/console.css");

/// The console's routes, with the process's session table.
pub fn routes(sessions: Arc<Sessions>) -> Router<AppState> {
    Router::new()
        .route("/console", get(|| async { Redirect::permanent("/console/") }))
        .route("/console/", get(overview::overview))
        .route("/console/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .route("/console/submit", get(submit::form).post(submit::submit))
        .route("/console/tasks/{id}", get(task::page))
        .route("/console/tasks/{id}/live", get(task::live))
        .route("/console/tasks/{id}/events", get(task::events))
        .route("/console/tasks/{id}/cancel", post(task::cancel))
        .route("/console/tasks/{id}/retry", post(task::retry))
        .route("/console/records", get(records::page))
        .route("/console/records.csv", get(records::csv))
        .route("/console/assets/console.js", get(|| async { asset(JS.as_bytes(), "text/javascript; charset=utf-8") }))
        .route("/console/assets/console.css", get(|| async { asset(CSS.as_bytes(), "text/css; charset=utf-8") }))
        .layer(axum::middleware::from_fn(require_csrf))
        .layer(axum::middleware::from_fn(security_headers))
        .layer(axum::Extension(sessions))
}

fn asset(bytes: &'static [u8], content_type: &'static str) -> Response {
    let mut r = bytes.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    r
}

/// Every console answer: scripts and styles from the console itself only, never in a frame,
/// never cached (pages show one account's data).
async fn security_headers(request: Request, next: Next) -> Response {
    let is_asset = request.uri().path().starts_with("/console/assets/");
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !is_asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Every POST must carry, in its form's `csrf` field, the token of the session its cookie names
/// (the sign-in form's anonymous session included); otherwise 403 and the handler never runs.
async fn require_csrf(request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return error_page(StatusCode::BAD_REQUEST, "The form could not be read (too large or cut short).");
    };
    let given = url::form_urlencoded::parse(&bytes).find(|(k, _)| k == "csrf").map(|(_, v)| v.into_owned());
    let session = parts
        .extensions
        .get::<Arc<Sessions>>()
        .zip(session::cookie_id(&parts.headers))
        .and_then(|(sessions, id)| sessions.get(&id));
    match (session, given) {
        (Some(s), Some(given)) if session::csrf_matches(&s, &given) => {
            next.run(Request::from_parts(parts, Body::from(bytes))).await
        }
        _ => error_page(
            StatusCode::FORBIDDEN,
            "Forbidden: this form's CSRF token is missing or does not belong to your session. Reload the page and try again.",
        ),
    }
}

/// A whole page with one error sentence.
fn error_page(status: StatusCode, message: &str) -> Response {
    let body = html! { p.error role="alert" { (message) } p { a href="/console/" { "Back to the console" } } };
    (status, page(&Page { title: "Error", signed_in: None, body })).into_response()
}

/// 404 for unknown paths under `/console`.
pub async fn not_found() -> Response {
    error_page(StatusCode::NOT_FOUND, "Not found.")
}

/// The sign-in form, in an anonymous session of its own so that the form has a CSRF token.
async fn login_form(headers: HeaderMap, axum::Extension(sessions): axum::Extension<Arc<Sessions>>) -> Response {
    let existing = session::cookie_id(&headers).and_then(|id| sessions.get(&id));
    if existing.as_ref().is_some_and(|s| s.credential.is_some()) {
        return Redirect::to("/console/").into_response();
    }
    let (session, fresh) = match existing {
        Some(s) => (s, false),
        None => match sessions.create(None) {
            Some(s) => (s, true),
            None => return error_page(StatusCode::SERVICE_UNAVAILABLE, "Too many sessions; try again later."),
        },
    };
    let mut response = (StatusCode::OK, login_page(&session.csrf, None)).into_response();
    if fresh {
        response
            .headers_mut()
            .insert(header::SET_COOKIE, session::set_cookie(&session.id, session::over_tls(&headers)));
    }
    response
}

fn login_page(csrf: &str, error: Option<&str>) -> axum::response::Html<String> {
    let body = html! {
        h1 { "Sign in" }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form method="post" action="/console/login" {
            input type="hidden" name="csrf" value=(csrf);
            label for="token" { "Account token" }
            input #token type="password" name="token" autocomplete="current-password" required autofocus;
            button type="submit" { "Sign in" }
        }
        p.hint { "The token is one of your account's API tokens (the Bearer token of the native API)." }
    };
    page(&Page { title: "Sign in", signed_in: None, body })
}

/// The `Api-Id` sign-in attempts are counted under, per remote address.
const SIGN_IN_API_ID: u32 = 3;
/// Sign-in attempts a remote address may make in a minute.
const SIGN_IN_PER_MINUTE: u32 = 20;

/// The sign-in form's fields.
#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// A known token replaces the anonymous session by a new signed-in one (a new id, so that an
/// id seen before sign-in is worth nothing after it).
async fn login(
    State(state): State<AppState>,
    connect: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    axum::Extension(sessions): axum::Extension<Arc<Sessions>>,
    Form(form): Form<LoginForm>,
) -> Response {
    let old = session::cookie_id(&headers).and_then(|id| sessions.get(&id));
    let from = connect.map_or_else(|| "unknown".to_owned(), |c| c.0.0.ip().to_string());
    let decision =
        state.service.admit(&format!("console-sign-in:{from}"), SIGN_IN_API_ID, SIGN_IN_PER_MINUTE, now_ms()).await;
    if !decision.allowed {
        let message =
            format!("Too many sign-in attempts from your address; try again in {} seconds.", decision.reset_secs);
        return error_page(StatusCode::TOO_MANY_REQUESTS, &message);
    }
    let hash = crate::secrets::hash_token(form.token.trim());
    let found = state.directory.current().token_by_hash(&hash, now_ms()).map(|e| e.credential.clone());
    let Some(mut credential) = found else {
        let csrf = old.map(|s| s.csrf).unwrap_or_default();
        return (StatusCode::UNAUTHORIZED, login_page(&csrf, Some("Sign-in failed: unknown token."))).into_response();
    };
    credential.address.clone_from(&from);
    if let Some(old) = old {
        sessions.remove(&old.id);
    }
    let Some(session) = sessions.create(Some((credential, hash))) else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "Too many sessions; try again later.");
    };
    let mut response = Redirect::to("/console/").into_response();
    response.headers_mut().insert(header::SET_COOKIE, session::set_cookie(&session.id, session::over_tls(&headers)));
    response
}

async fn logout(
    headers: HeaderMap,
    axum::Extension(sessions): axum::Extension<Arc<Sessions>>,
    SignedIn { session, .. }: SignedIn,
) -> Response {
    sessions.remove(&session.id);
    let mut response = Redirect::to("/console/login").into_response();
    response.headers_mut().insert(header::SET_COOKIE, session::clear_cookie(session::over_tls(&headers)));
    response
}

#[cfg(test)]
mod tests;
