//! The task page: progress bar, counts, every URL with its per-node state, retry and cancel.
//! While the task runs, the live part polls its fragment every second (htmx `every 1s`) and
//! stops when the task is final; another account's task id is "not found".

use super::error_page;
use super::layout::{Page, status, time};
use super::session::SignedIn;
use crate::api::AppState;
use crate::clock::now_ms;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use cachectl_core::{Item, ItemFilter, NodeResult, NodeState, TaskId, TaskState, TaskSummary};
use maud::{Markup, html};
use std::collections::BTreeMap;

/// Items shown on a task page at most (the records page and the API page through the rest).
const MAX_ITEMS: u32 = 1000;

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
    let body = html! {
        h1 { "Task " (task.id) " · " (task.kind.as_str()) }
        p.hint { "Submitted " (time(task.created_at)) " UTC by " (task.operator) " through " (task.dialect) "." }
        (live)
    };
    super::layout::page(&Page { title: &title, signed_in: Some(s), body }).into_response()
}

/// `GET /console/tasks/{id}/live`: the live part alone, for htmx.
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
    let unavailable = |e: cachectl_core::StoreError| {
        tracing::error!(error = %e, "Console could not read a task's items.");
        error_page(StatusCode::SERVICE_UNAVAILABLE, "The service is temporarily unavailable; try again.")
    };
    let filter = ItemFilter { task_id: Some(task.id), ..ItemFilter::default() };
    let mut items = state.service.list_items(&s.credential.account, &filter, MAX_ITEMS).await.map_err(unavailable)?;
    items.reverse();
    let ids: Vec<i64> = items.iter().map(|i| i.id).collect();
    let results = state.service.node_results(&s.credential.account, &ids).await.map_err(unavailable)?;
    let mut by_item: BTreeMap<i64, Vec<NodeResult>> = BTreeMap::new();
    for (item, result) in results {
        by_item.entry(item).or_default().push(result);
    }
    Ok(render_live(state, s, task, &items, &by_item))
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
    let running = task.state() == TaskState::Running;
    let id = task.id.get();
    let directory = state.directory.current();
    let tier = |node: &str| directory.edge(node).map_or("—", |n| n.node.node.tier.as_str());
    html! {
        div #live hx-get=[running.then(|| format!("/console/tasks/{id}/live"))]
            hx-trigger=[running.then_some("every 1s")] hx-swap="outerHTML" aria-live="polite" {
            p { "State: " (status(task.state().as_str())) }
            progress #progress max="100" value=(progress) aria-label="progress" { (progress) " %" }
            p #progress-text { (progress) " % done: " (c.completed) " completed, " (c.failed) " failed, "
                (c.processing) " processing, " (c.waiting) " waiting, of " (total) "." }
            div.actions {
                @if c.failed > 0 {
                    form method="post" action={ "/console/tasks/" (id) "/retry" } {
                        input type="hidden" name="csrf" value=(s.session.csrf);
                        button type="submit" { "Retry failed items" }
                    }
                }
                @if c.waiting > 0 {
                    form method="post" action={ "/console/tasks/" (id) "/cancel" } {
                        input type="hidden" name="csrf" value=(s.session.csrf);
                        button.secondary type="submit" { "Cancel waiting items" }
                    }
                }
            }
            h2 { "URLs and nodes" }
            div.table-wrap { table #nodes {
                thead { tr { th { "URL / node" } th { "Tier" } th { "State" } th { "Attempts" } th { "HTTP" } th { "Time taken" } th { "Reason" } } }
                tbody {
                    @for item in items {
                        tr.item { td.url { b { (item.url) } } td { "" } td { (status(item.status.as_str())) } td {} td {}
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
