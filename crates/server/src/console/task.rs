//! The task page: progress bar, counts, every URL with its per-node state, retry and cancel.
//! While the task runs, the page's script (assets/console.js) follows the task's SSE stream
//! (`/console/tasks/{id}/events`), which sends the live part again whenever it changes and ends
//! once the task is final; the fragment alone (`/console/tasks/{id}/live`) is the script's
//! fallback while the stream is down. Another account's task id is "not found".

use super::error_page;
use super::layout::{Page, status, time};
use super::session::Sessions;
use super::session::SignedIn;
use crate::api::AppState;
use crate::clock::now_ms;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use cachectl_core::{Item, ItemFilter, NodeResult, NodeState, StatusCounts, TaskId, TaskState, TaskSummary};
use maud::{Markup, html};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Items shown on a task page at most (the records page and the API page through the rest).
const MAX_ITEMS: u32 = 1000;

/// How often the stream reads the task's counts.
const TICK: Duration = Duration::from_millis(250);
/// How often the stream reads the items and node results while the counts stay the same (a
/// node's attempts and state change without them).
const FULL_READ: Duration = Duration::from_secs(1);
/// How long a browser waits before it opens a dropped stream again (the SSE `retry` field).
const RECONNECT: Duration = Duration::from_secs(1);

/// The signed-in account's task named by the path, or the response to send instead.
async fn owned(state: &AppState, s: &SignedIn, id: &str) -> Result<TaskSummary, Response> {
    let not_found = || error_page(StatusCode::NOT_FOUND, "Task not found.");
    let id = TaskId::parse(id).ok_or_else(not_found)?;
    match state.service.task(&s.credential.account, id).await {
        Ok(Some(task)) => Ok(task),
        Ok(None) => Err(not_found()),
        Err(e) => {
            tracing::error!(error = %e, "Console could not read a task.");
            Err(error_page(StatusCode::SERVICE_UNAVAILABLE, "The service is temporarily unavailable; try again."))
        }
    }
}

/// `GET /console/tasks/{id}`: the whole task page.
pub async fn page(State(state): State<AppState>, s: SignedIn, Path(id): Path<String>) -> Response {
    let (state, s) = (&state, &s);
    let task = match owned(state, s, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let live = match live_part(state, s, &task).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let title = format!("Task {}", task.id);
    let id = task.id.get();
    let body = html! {
        h1 { "Task " (task.id) " · " (task.kind.as_str()) }
        p.hint { "Submitted " (time(task.created_at)) " UTC by " (task.operator) " through " (task.dialect) "." }
        div #task data-events-url={ "/console/tasks/" (id) "/events" } data-live-url={ "/console/tasks/" (id) "/live" }
            data-events="0" data-stream="idle" {
            // Read out by screen readers when the script changes it (the progress sentence).
            p #announce .visually-hidden role="status" {}
            (live)
        }
    };
    super::layout::page(&Page { title: &title, signed_in: Some(s), body }).into_response()
}

/// `GET /console/tasks/{id}/live`: the live part alone, the script's fallback while the stream is down.
pub async fn live(State(state): State<AppState>, s: SignedIn, Path(id): Path<String>) -> Response {
    let task = match owned(&state, &s, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    match live_part(&state, &s, &task).await {
        Ok(m) => axum::response::Html(m.into_string()).into_response(),
        Err(r) => r,
    }
}

async fn live_part(state: &AppState, s: &SignedIn, task: &TaskSummary) -> Result<Markup, Response> {
    read_live(state, s, task).await.map_err(|e| {
        tracing::error!(error = %e, "Console could not read a task's items.");
        error_page(StatusCode::SERVICE_UNAVAILABLE, "The service is temporarily unavailable; try again.")
    })
}

/// The live part of `task`: its items and their node results, read now.
async fn read_live(state: &AppState, s: &SignedIn, task: &TaskSummary) -> Result<Markup, cachectl_core::StoreError> {
    let filter = ItemFilter { task_id: Some(task.id), ..ItemFilter::default() };
    let mut items = state.service.list_items(&s.credential.account, &filter, MAX_ITEMS).await?;
    items.reverse();
    let ids: Vec<i64> = items.iter().map(|i| i.id).collect();
    let results = state.service.node_results(&s.credential.account, &ids).await?;
    let mut by_item: BTreeMap<i64, Vec<NodeResult>> = BTreeMap::new();
    for (item, result) in results {
        by_item.entry(item).or_default().push(result);
    }
    Ok(render_live(state, s, task, &items, &by_item))
}

/// What the stream last sent, and when it last read the items.
struct Sent {
    counts: Option<StatusCounts>,
    html: String,
    read_at: Option<Instant>,
    /// The `done` or `restart` event was sent: the stream ends.
    done: bool,
}

/// `GET /console/tasks/{id}/events`: the task page's live part as Server-Sent Events, for the
/// signed-in account's task only (another's is "not found", as for the page). On connecting,
/// and then whenever the live part changes, a `live` event; once the task is final, one `done`
/// event and the stream ends. Each event's data is JSON: `{"state", "progress", "html"}`, the
/// HTML being the `#live` element as `/console/tasks/{id}/live` returns it. The task's counts are
/// read every 250 ms and the items with their node results when the counts change or at least
/// every second. The stream also ends when the session does (sign-out, expiry), and after
/// `[server] shutdown_grace` (10 s by default) with a `restart` event (data `{}`): the browser
/// opens it again a second later, and a server told to stop is never held up by open task pages
/// for longer than it grants requests in flight.
pub async fn events(
    State(state): State<AppState>,
    axum::Extension(sessions): axum::Extension<Arc<Sessions>>,
    s: SignedIn,
    Path(id): Path<String>,
) -> Response {
    let task = match owned(&state, &s, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let Some(slot) = state.streams.try_open(s.credential.account.name.as_str()) else {
        // The page's script then fetches the live part every 2 seconds instead.
        let message = format!(
            "this account already follows {} tasks live; this page is updated every 2 seconds instead",
            state.streams.limit()
        );
        return error_page(StatusCode::TOO_MANY_REQUESTS, &message);
    };
    let task_id = task.id;
    let ends_at = Instant::now() + state.settings.shutdown_grace.max(Duration::from_secs(1));
    let start = (Some(task), Sent { counts: None, html: String::new(), read_at: None, done: false });
    let stream = futures::stream::unfold(start, move |(mut current, mut sent)| {
        // Held as long as the stream is (given back when it ends or its client goes away).
        let _slot = &slot;
        let (state, s, sessions) = (state.clone(), s.clone(), sessions.clone());
        async move {
            if sent.done {
                return None;
            }
            loop {
                if let Some(task) = current.take() {
                    let finished = task.state() != TaskState::Running;
                    let due = sent.read_at.is_none_or(|at| at.elapsed() >= FULL_READ);
                    if finished || due || sent.counts != Some(task.counts) {
                        match read_live(&state, &s, &task).await {
                            Ok(markup) => {
                                sent.read_at = Some(Instant::now());
                                sent.counts = Some(task.counts);
                                let html = markup.into_string();
                                if finished || html != sent.html {
                                    let event = live_event(&task, &html, finished, sent.html.is_empty());
                                    sent.html = html;
                                    sent.done = finished;
                                    return Some((Ok::<_, std::convert::Infallible>(event), (None, sent)));
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "Console stream could not read a task; retrying."),
                        }
                    }
                }
                tokio::time::sleep(TICK).await;
                if !sessions.is_live(&s.session.id) {
                    return None;
                }
                if Instant::now() >= ends_at {
                    sent.done = true;
                    return Some((Ok(Event::default().event("restart").data("{}")), (None, sent)));
                }
                current = match state.service.task(&s.credential.account, task_id).await {
                    Ok(Some(task)) => Some(task),
                    Ok(None) => return None,
                    Err(e) => {
                        tracing::warn!(error = %e, "Console stream could not read a task; retrying.");
                        None
                    }
                };
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// One event of the stream: `live` while the task runs, `done` once it is final; the first also
/// tells the browser how soon to reconnect if the stream drops.
fn live_event(task: &TaskSummary, html: &str, finished: bool, first: bool) -> Event {
    let c = task.counts;
    let progress = ((c.completed + c.failed) * 100).checked_div(c.total()).unwrap_or(100);
    let data = serde_json::json!({ "state": task.state().as_str(), "progress": progress, "html": html });
    let event = Event::default().event(if finished { "done" } else { "live" }).data(data.to_string());
    if first { event.retry(RECONNECT) } else { event }
}

fn render_live(
    state: &AppState,
    s: &SignedIn,
    task: &TaskSummary,
    items: &[Item],
    by_item: &BTreeMap<i64, Vec<NodeResult>>,
) -> Markup {
    let c = task.counts;
    let total = c.total();
    let progress = ((c.completed + c.failed) * 100).checked_div(total).unwrap_or(100);
    let id = task.id.get();
    let directory = state.directory.current();
    let tier = |node: &str| directory.edge(node).map_or("—", |n| n.node.node.tier.as_str());
    html! {
        div #live data-state=(task.state().as_str()) {
            p { "State: " (status(task.state().as_str())) }
            progress #progress max="100" value=(progress) aria-label="progress" { (progress) " %" }
            p #progress-text { (progress) " % done: " (c.completed) " completed, " (c.failed) " failed, "
                (c.processing) " processing, " (c.waiting) " waiting, of " (total) "." }
            div.actions {
                @if c.failed > 0 {
                    form method="post" action={ "/console/tasks/" (id) "/retry" } {
                        input type="hidden" name="csrf" value=(s.session.csrf);
                        button #retry type="submit" { "Retry failed items" }
                    }
                }
                @if c.waiting > 0 {
                    form method="post" action={ "/console/tasks/" (id) "/cancel" } {
                        input type="hidden" name="csrf" value=(s.session.csrf);
                        button #cancel .secondary type="submit" { "Cancel waiting items" }
                    }
                }
            }
            h2 { "URLs and nodes" }
            div.table-wrap { table #nodes {
                thead { tr { th { "URL / node" } th { "Tier" } th { "State" } th { "Attempts" } th { "HTTP" } th { "Time taken" } th { "Reason" } } }
                tbody {
                    @for item in items {
                        tr.item { td.url { b { (item.url) } @if item.soft { " (soft)" } } td { "" } td { (status(item.status.as_str())) } td {} td {}
                            td { (item.finished_at.map(|f| seconds(f.millis() - item.created_at.millis())).unwrap_or_default()) }
                            td { (item.reason.as_deref().unwrap_or("")) } }
                        @for r in by_item.get(&item.id).map(Vec::as_slice).unwrap_or_default() {
                            tr.node { td { "↳ " (r.node) } td { (tier(&r.node)) } td { (status(node_word(r.state))) }
                                td { (r.attempts) } td { (r.status_code.map(|c| c.to_string()).unwrap_or_default()) }
                                td { (seconds(r.updated_at.millis() - item.created_at.millis())) }
                                td { (r.error.as_deref().unwrap_or("")) } }
                        }
                    }
                }
            } }
        }
    }
}

fn node_word(state: NodeState) -> &'static str {
    match state {
        NodeState::Pending => "processing",
        NodeState::Succeeded => "ok",
        NodeState::Failed => "failed",
    }
}

fn seconds(ms: i64) -> String {
    format!("{:.2} s", ms.max(0) as f64 / 1000.0)
}

/// `POST /console/tasks/{id}/cancel`.
pub async fn cancel(State(state): State<AppState>, s: SignedIn, Path(id): Path<String>) -> Response {
    let task = match owned(&state, &s, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    if let Err(e) = state.service.cancel(&s.credential.account, task.id, now_ms()).await {
        tracing::error!(error = %e, "Console could not cancel a task.");
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "The service is temporarily unavailable; try again.");
    }
    Redirect::to(&format!("/console/tasks/{}", task.id)).into_response()
}

/// `POST /console/tasks/{id}/retry`.
pub async fn retry(State(state): State<AppState>, s: SignedIn, Path(id): Path<String>) -> Response {
    let task = match owned(&state, &s, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    if let Err(e) = state.service.retry(&s.credential.account, task.id).await {
        tracing::error!(error = %e, "Console could not retry a task.");
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "The service is temporarily unavailable; try again.");
    }
    Redirect::to(&format!("/console/tasks/{}", task.id)).into_response()
}
