//! The refresh / prefetch form: one URL or directory a line, checked with `Service::validate`
//! (the native API's path); invalid lines are shown with the reason and nothing is submitted
//! until they are fixed or dropped.

use super::error_page;
use super::layout::{Page, page};
use super::session::SignedIn;
use crate::api::AppState;
use crate::clock::now_ms;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use cachectl_core::service::{Submission, SubmitError, SubmittedUrl};
use cachectl_core::{ItemType, Kind, QuotaBucket, TaskKind};
use maud::html;
use serde::Deserialize;

/// URLs in one request at most, as the native API.
const MAX_URLS: usize = 1000;
/// Directories in one request at most, as the native API.
const MAX_DIRS: usize = 100;

/// The form's fields.
#[derive(Deserialize, Default)]
pub struct SubmitForm {
    #[serde(default)]
    kind: String,
    #[serde(default, rename = "type")]
    item_type: String,
    #[serde(default)]
    urls: String,
}

/// What the form shows besides its fields.
#[derive(Default)]
struct Outcome {
    error: Option<String>,
    invalid: Vec<(usize, String, String)>,
}

/// The empty form.
pub async fn form(State(state): State<AppState>, signed_in: SignedIn) -> Response {
    render(&state, &signed_in, &SubmitForm::default(), &Outcome::default(), StatusCode::OK).await
}

async fn render(state: &AppState, s: &SignedIn, f: &SubmitForm, outcome: &Outcome, status: StatusCode) -> Response {
    let now = now_ms();
    let mut quotas = Vec::new();
    for (bucket, name) in [
        (QuotaBucket::RefreshUrl, "refresh URLs"),
        (QuotaBucket::RefreshDir, "refresh directories"),
        (QuotaBucket::PrefetchUrl, "prefetch URLs"),
    ] {
        match state.service.quota(&s.credential.account, bucket, now).await {
            Ok(q) => quotas.push((name, q.remaining, q.limit)),
            Err(e) => tracing::warn!(error = %e, "Console could not read a quota."),
        }
    }
    let option =
        |value: &str, label: &str, current: &str| html! { option value=(value) selected[value == current] { (label) } };
    let body = html! {
        h1 { "Refresh / prefetch" }
        p.hint { "Per request: at most " (MAX_URLS) " URLs or " (MAX_DIRS) " directories. Left today: "
            @for (i, (name, remaining, limit)) in quotas.iter().enumerate() {
                @if i > 0 { ", " }
                span.quota { (name) " " (remaining) " of " (limit) }
            }
            "." }
        @if let Some(e) = &outcome.error { p.error role="alert" { (e) } }
        @if !outcome.invalid.is_empty() {
            div #invalid role="alert" {
                p.error { (outcome.invalid.len()) " invalid line(s); nothing was submitted. Fix or remove them:" }
                ol.invalid {
                    @for (line, text, reason) in &outcome.invalid {
                        li { "line " (line) ": " code { (text) } " — " (reason) }
                    }
                }
            }
        }
        form method="post" action="/console/submit" {
            input type="hidden" name="csrf" value=(s.session.csrf);
            label for="kind" { "Kind" }
            select #kind name="kind" {
                (option("refresh", "Refresh (purge)", &f.kind))
                (option("prefetch", "Prefetch (warm up)", &f.kind))
                (option("refresh_then_prefetch", "Refresh, then prefetch", &f.kind))
            }
            label for="type" { "Type" }
            select #type name="type" {
                (option("url", "URLs", &f.item_type))
                (option("dir", "Directories (refresh only, ending in /)", &f.item_type))
            }
            label for="urls" { "One URL a line" }
            textarea #urls name="urls" required spellcheck="false" { (f.urls) }
            button type="submit" { "Submit" }
        }
    };
    (status, page(&Page { title: "Refresh / prefetch", signed_in: Some(s), body })).into_response()
}

/// Validates every line; submits only when all are valid, then shows the task.
pub async fn submit(State(state): State<AppState>, s: SignedIn, Form(f): Form<SubmitForm>) -> Response {
    let kind = match f.kind.as_str() {
        "" | "refresh" => TaskKind::Refresh,
        "prefetch" => TaskKind::Prefetch,
        "refresh_then_prefetch" => TaskKind::RefreshThenPrefetch,
        _ => return error_page(StatusCode::BAD_REQUEST, "Unknown kind."),
    };
    let item_type = match f.item_type.as_str() {
        "" | "url" => ItemType::Url,
        "dir" => ItemType::Dir,
        _ => return error_page(StatusCode::BAD_REQUEST, "Unknown type."),
    };
    let lines: Vec<(usize, &str)> =
        f.urls.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty()).collect();
    let max = if item_type == ItemType::Dir { MAX_DIRS } else { MAX_URLS };
    let fail = |error: String| Outcome { error: Some(error), invalid: Vec::new() };
    if lines.is_empty() || lines.len() > max {
        let outcome = fail(format!("Enter from 1 to {max} lines."));
        return render(&state, &s, &f, &outcome, StatusCode::BAD_REQUEST).await;
    }
    if item_type == ItemType::Dir && kind != TaskKind::Refresh {
        let outcome = fail("Directories can only be refreshed.".to_owned());
        return render(&state, &s, &f, &outcome, StatusCode::BAD_REQUEST).await;
    }
    let now = now_ms();
    let urls = lines.iter().map(|(_, l)| SubmittedUrl::now(*l, item_type)).collect();
    let validated = state.service.validate(&s.credential.account, kind, urls, now);
    if !validated.rejected.is_empty() {
        let mut invalid = Vec::new();
        for (text, e) in &validated.rejected {
            let line = lines.iter().find(|(_, l)| l == text).map_or(0, |(n, _)| *n);
            invalid.push((line, text.clone(), e.to_string()));
        }
        let outcome = Outcome { error: None, invalid };
        return render(&state, &s, &f, &outcome, StatusCode::BAD_REQUEST).await;
    }
    let accepted = validated.accepted();
    let submission = Submission {
        urls: validated,
        operator: s.credential.operator.clone(),
        dialect: "console",
        idempotency: None,
        address: s.credential.address.clone(),
    };
    match state.service.submit(&s.credential.account, submission, now).await {
        Ok(done) => {
            let first = if kind == TaskKind::Prefetch { Kind::Prefetch } else { Kind::Refresh };
            state.metrics.submitted("console", first, accepted);
            Redirect::to(&format!("/console/tasks/{}", done.task_id.get())).into_response()
        }
        Err(SubmitError::Quota { bucket, limit, remaining }) => {
            let outcome = fail(crate::api::quota_exceeded(bucket, "refresh", limit, remaining));
            render(&state, &s, &f, &outcome, StatusCode::BAD_REQUEST).await
        }
        Err(SubmitError::NothingAccepted { .. }) => {
            render(&state, &s, &f, &fail("No URL was accepted.".to_owned()), StatusCode::BAD_REQUEST).await
        }
        Err(SubmitError::IdempotencyConflict | SubmitError::Store(_)) => {
            error_page(StatusCode::SERVICE_UNAVAILABLE, "The service is temporarily unavailable; try again.")
        }
    }
}
