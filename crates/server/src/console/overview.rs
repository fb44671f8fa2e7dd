//! The overview: the last 24 hours' tasks and items, today's quota use, a server-drawn SVG of
//! tasks and failed tasks per hour, and the nodes that serve the account's domains.

use super::error_page;
use super::layout::{Page, page, status};
use super::session::SignedIn;
use crate::api::AppState;
use crate::clock::now_ms;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cachectl_core::{QuotaBucket, StatusCounts, TaskFilter, TaskState, TaskSummary, Timestamp};
use maud::{Markup, html};

const HOUR_MS: i64 = 3_600_000;
/// Tasks of the last day read at most for the counts and the chart.
const MAX_TASKS: usize = 10_000;

/// The last day's tasks, newest first (at most `MAX_TASKS`), and whether there were more.
async fn last_day(
    state: &AppState,
    s: &SignedIn,
    since: Timestamp,
) -> Result<(Vec<TaskSummary>, bool), cachectl_core::StoreError> {
    let mut tasks: Vec<TaskSummary> = Vec::new();
    let mut before = None;
    loop {
        let filter = TaskFilter { since: Some(since), before_id: before, ..TaskFilter::default() };
        let page = state.service.list_tasks(&s.credential.account, &filter, 500).await?;
        let full = page.len() == 500;
        before = page.last().map(|t| t.id.get());
        tasks.extend(page);
        if !full {
            return Ok((tasks, false));
        }
        if tasks.len() >= MAX_TASKS {
            return Ok((tasks, true));
        }
    }
}

/// `GET /console/`.
pub async fn overview(State(state): State<AppState>, s: SignedIn) -> Response {
    let now = now_ms();
    let since = Timestamp::from_millis(now.millis() - 24 * HOUR_MS);
    let (tasks, truncated) = match last_day(&state, &s, since).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "Console could not read the last day's tasks.");
            return error_page(StatusCode::SERVICE_UNAVAILABLE, "The service is temporarily unavailable; try again.");
        }
    };
    let mut items = StatusCounts::default();
    let (mut running, mut completed, mut failed) = (0u64, 0u64, 0u64);
    for t in &tasks {
        items.waiting += t.counts.waiting;
        items.processing += t.counts.processing;
        items.completed += t.counts.completed;
        items.failed += t.counts.failed;
        match t.state() {
            TaskState::Running => running += 1,
            TaskState::Completed => completed += 1,
            TaskState::Failed => failed += 1,
        }
    }
    let mut quotas = Vec::new();
    for (bucket, name) in [
        (QuotaBucket::RefreshUrl, "refresh URLs"),
        (QuotaBucket::RefreshDir, "refresh directories"),
        (QuotaBucket::PrefetchUrl, "prefetch URLs"),
        (QuotaBucket::RefreshTag, "refresh tags"),
        (QuotaBucket::RefreshRegex, "refresh regexes"),
    ] {
        if let Ok(q) = state.service.quota(&s.credential.account, bucket, now).await {
            quotas.push((name, q.limit - q.remaining, q.limit));
        }
    }
    let nodes = crate::api::native::nodes::inventory(&state, &s.credential);
    let card = |label: &str, n: u64| html! { div.card { b { (n) } (label) } };
    let body = html! {
        h1 { "Overview" }
        h2 { "Last 24 hours" }
        div.cards #counts {
            (card("tasks", tasks.len() as u64)) (card("running", running)) (card("completed", completed)) (card("failed", failed))
            (card("URLs done", items.completed)) (card("URLs failed", items.failed)) (card("URLs in progress", items.waiting + items.processing))
        }
        @if truncated { p.hint { "Counted from the newest " (MAX_TASKS) " tasks only." } }
        (chart(&tasks, now))
        h2 { "Quotas used today" }
        ul #quotas { @for (name, used, limit) in &quotas { li { (name) ": " (used) " of " (limit) } } }
        h2 { "Nodes" }
        div.table-wrap { table #node-list {
            thead { tr { th { "Node" } th { "Tier" } th { "Driver" } th { "Transport" } th { "Agent" } th { "Last heartbeat" } } }
            tbody { @for n in &nodes.nodes {
                tr { td { (n.name) @if !n.configured { " (not configured)" } } td { (n.tier) } td { (n.driver) } td { (n.transport) }
                    td { @if let Some(st) = &n.state { (status(st)) } @else { "direct (no agent)" } }
                    td { (n.last_heartbeat.as_deref().unwrap_or("—")) } }
            } }
        } }
    };
    page(&Page { title: "Overview", signed_in: Some(&s), body }).into_response()
}

/// Tasks (and failed tasks) created in each of the last 24 hours, as bars.
fn chart(tasks: &[TaskSummary], now: Timestamp) -> Markup {
    let mut per_hour = [(0u64, 0u64); 24];
    for t in tasks {
        let age = (now.millis() - t.created_at.millis()) / HOUR_MS;
        if let Ok(age) = usize::try_from(age)
            && age < 24
        {
            per_hour[23 - age].0 += 1;
            if t.state() == TaskState::Failed {
                per_hour[23 - age].1 += 1;
            }
        }
    }
    let max = per_hour.iter().map(|h| h.0).max().unwrap_or(0).max(1);
    let height = |n: u64| (n * 100 / max) as i64;
    let summary: Vec<String> =
        per_hour.iter().enumerate().map(|(i, h)| format!("{}h ago: {} ({} failed)", 23 - i, h.0, h.1)).collect();
    html! {
        figure {
            svg.chart #chart viewBox="0 0 480 130" role="img" aria-labelledby="chart-title" xmlns="http://www.w3.org/2000/svg" {
                title #chart-title { "Tasks per hour, last 24 hours (failed in red): " (summary.join("; ")) }
                @for (i, (all, bad)) in per_hour.iter().enumerate() {
                    @let x = i as i64 * 20;
                    rect.bar x=(x + 2) y=(110 - height(*all)) width="16" height=(height(*all)) {}
                    rect.fail x=(x + 2) y=(110 - height(*bad)) width="16" height=(height(*bad)) {}
                }
                line x1="0" y1="110" x2="480" y2="110" stroke="currentColor" {}
                text x="0" y="124" { "24 h ago" }
                text x="440" y="124" { "now" }
                text x="0" y="10" { "max " (max) " / h" }
            }
            figcaption.hint { "Tasks per hour over the last 24 hours; the red part of a bar is its failed tasks." }
        }
    }
}
