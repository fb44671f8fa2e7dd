//! The refresh / prefetch form: one URL, directory, cache tag or regex a line, checked with
//! `Service::validate` or `Service::validate_targets` (the native API's paths); invalid lines are
//! shown with the reason and nothing is submitted until they are fixed or dropped.

use super::error_page;
use super::layout::{Page, page};
use super::session::SignedIn;
use crate::api::AppState;
use crate::clock::now_ms;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use cachectl_core::service::{Submission, SubmitError, SubmittedTargets, SubmittedUrl};
use cachectl_core::{ItemType, Kind, QuotaBucket, TaskKind};
use maud::html;
use serde::Deserialize;

/// URLs in one request at most, as the native API.
const MAX_URLS: usize = 1000;
/// Directories in one request at most, as the native API.
const MAX_DIRS: usize = 100;
/// Cache tags in one request at most, as the native API.
const MAX_TAGS: usize = 256;
/// Regexes in one request at most, as the native API.
const MAX_REGEXES: usize = 10;

/// The form's fields.
#[derive(Deserialize, Default)]
pub struct SubmitForm {
    #[serde(default)]
    kind: String,
    #[serde(default, rename = "type")]
    item_type: String,
    #[serde(default)]
    urls: String,
    /// The host of a tag or regex purge.
    #[serde(default)]
    host: String,
    /// A regex that matches every path of the host may purge it all.
    #[serde(default)]
    confirm_all: Option<String>,
    /// A soft purge: marked stale instead of removed (refreshes of URLs and tags).
    #[serde(default)]
    soft: Option<String>,
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
        (QuotaBucket::RefreshTag, "cache tags"),
        (QuotaBucket::RefreshRegex, "regexes"),
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
        p.hint { "Per request: at most " (MAX_URLS) " URLs, " (MAX_DIRS) " directories, " (MAX_TAGS) " cache tags or "
            (MAX_REGEXES) " regexes. Left today: "
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
                (option("tag", "Cache tags of one host (refresh only)", &f.item_type))
                (option("regex", "Regexes of one host's paths (refresh only)", &f.item_type))
            }
            label for="urls" { "One URL, directory, tag or regex a line" }
            textarea #urls name="urls" required spellcheck="false" { (f.urls) }
            label.check for="soft" {
                input #soft type="checkbox" name="soft" value="1" checked[f.soft.is_some()] aria-describedby="soft-hint";
                " Soft purge"
            }
            p.hint #soft-hint { "Refreshes of URLs and cache tags only: the objects are marked stale instead of removed, and served stale while one request fetches them again from the origin (for as long as their grace lasts)." }
            fieldset.targets {
                legend { "Cache tags and regexes only" }
                label for="host" { "Host" }
                input #host type="text" name="host" value=(f.host) placeholder="www.example.com" spellcheck="false"
                    aria-describedby="host-hint";
                p.hint #host-hint { "The one host whose objects the tags or regexes purge. A regex matches the path and query (" code { "/img/a.png?v=2" } "), unanchored unless it says " code { "^" } " or " code { "$" } "." }
                label.check for="confirm_all" {
                    input #confirm_all type="checkbox" name="confirm_all" value="1" checked[f.confirm_all.is_some()];
                    " A regex that matches every path may purge the whole host"
                }
            }
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
        "tag" => ItemType::Tag,
        "regex" => ItemType::Regex,
        _ => return error_page(StatusCode::BAD_REQUEST, "Unknown type."),
    };
    let lines: Vec<(usize, &str)> =
        f.urls.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty()).collect();
    let (max, what) = match item_type {
        ItemType::Url => (MAX_URLS, "URLs"),
        ItemType::Dir => (MAX_DIRS, "directories"),
        ItemType::Tag => (MAX_TAGS, "cache tags"),
        ItemType::Regex => (MAX_REGEXES, "regexes"),
    };
    let host = f.host.trim();
    let fail = |error: String| Outcome { error: Some(error), invalid: Vec::new() };
    let refused = if lines.is_empty() || lines.len() > max {
        Some(format!("Enter from 1 to {max} {what}, one a line."))
    } else if item_type != ItemType::Url && kind != TaskKind::Refresh {
        Some(format!("{} can only be refreshed.", capitalized(what)))
    } else if matches!(item_type, ItemType::Tag | ItemType::Regex) && host.is_empty() {
        Some(format!("Enter the host whose objects the {what} purge."))
    } else if !matches!(item_type, ItemType::Tag | ItemType::Regex) && !host.is_empty() {
        Some("The host is for cache tags and regexes only; URLs and directories name their own.".to_owned())
    } else if item_type != ItemType::Regex && f.confirm_all.is_some() {
        Some("Purging the whole host is for regexes only.".to_owned())
    } else if f.soft.is_some() && !(kind == TaskKind::Refresh && matches!(item_type, ItemType::Url | ItemType::Tag)) {
        Some("A soft purge is for refreshes of URLs or cache tags: a directory or regex purge is a ban, which cannot keep objects stale.".to_owned())
    } else {
        None
    };
    if let Some(error) = refused {
        return render(&state, &s, &f, &fail(error), StatusCode::BAD_REQUEST).await;
    }
    let now = now_ms();
    let validated = if matches!(item_type, ItemType::Tag | ItemType::Regex) {
        let values = lines.iter().map(|(_, l)| (*l).to_owned()).collect();
        let targets =
            SubmittedTargets { host: host.to_owned(), item_type, values, confirm_all: f.confirm_all.is_some() };
        state.service.validate_targets(&s.credential.account, targets)
    } else {
        let urls = lines.iter().map(|(_, l)| SubmittedUrl::now(*l, item_type)).collect();
        state.service.validate(&s.credential.account, kind, urls, now)
    };
    let validated = if f.soft.is_some() { validated.soft() } else { validated };
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

/// `what` with a capital first letter.
fn capitalized(what: &str) -> String {
    let mut chars = what.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}
