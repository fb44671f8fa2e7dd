//! Records: the account's items, newest first, filtered by status, kind, URL substring and time
//! window, keyset-paged like the native API (`before_id`), and the same filter as CSV.

use super::error_page;
use super::layout::{Page, status, time};
use super::session::SignedIn;
use crate::api::AppState;
use crate::clock::now_ms;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cachectl_core::{Item, ItemFilter, ItemStatus, Kind, Timestamp};
use maud::html;
use serde::Deserialize;

/// Rows of one page.
const PAGE: usize = 50;
/// Rows read from the store per query while filtering by substring.
const BATCH: u32 = 500;
/// Items a page reads at most while looking for substring matches; the page then ends early
/// and its "next" link continues the scan.
const PAGE_SCAN: usize = 5_000;
/// Rows of one CSV export at most, and the items it reads at most to find them.
const CSV_ROWS: usize = 10_000;
const CSV_SCAN: usize = 100_000;

/// The filters, as the form and the links carry them.
#[derive(Deserialize, Default)]
pub struct Filters {
    #[serde(default)]
    status: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    window: String,
    #[serde(default)]
    cursor: Option<i64>,
}

impl Filters {
    fn query(&self, cursor: Option<i64>) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [("status", &self.status), ("kind", &self.kind), ("url", &self.url), ("window", &self.window)] {
            if !v.is_empty() {
                q.append_pair(k, v);
            }
        }
        if let Some(c) = cursor {
            q.append_pair("cursor", &c.to_string());
        }
        q.finish()
    }

    fn since(&self, now: Timestamp) -> Result<Option<Timestamp>, String> {
        let hours = match self.window.as_str() {
            "" | "all" => return Ok(None),
            "1h" => 1,
            "24h" => 24,
            "7d" => 24 * 7,
            "30d" => 24 * 30,
            _ => return Err("window must be 1h, 24h, 7d, 30d or all".to_owned()),
        };
        Ok(Some(Timestamp::from_millis(now.millis() - hours * 3_600_000)))
    }
}

/// A page of matches and where the next one starts.
struct Found {
    items: Vec<Item>,
    next: Option<i64>,
}

/// Reads items newest first from `f.cursor`, keeping those whose URL contains `f.url`, until
/// `want` are found or `scan` were read.
async fn find(state: &AppState, s: &SignedIn, f: &Filters, want: usize, scan: usize) -> Result<Found, Response> {
    let bad = |m: String| error_page(StatusCode::BAD_REQUEST, &m);
    let kind = match f.kind.as_str() {
        "" => None,
        k => Some(k.parse::<Kind>().map_err(|_| bad("kind must be refresh or prefetch".to_owned()))?),
    };
    let item_status = match f.status.as_str() {
        "" => None,
        k => Some(k.parse::<ItemStatus>().map_err(|_| bad("status is not an item status".to_owned()))?),
    };
    let since = f.since(now_ms()).map_err(bad)?;
    let (mut before, mut read, mut items) = (f.cursor.filter(|c| *c > 0), 0usize, Vec::new());
    loop {
        let filter = ItemFilter { kind, status: item_status, since, before_id: before, ..ItemFilter::default() };
        let batch = if f.url.is_empty() { u32::try_from(want - items.len()).unwrap_or(BATCH) } else { BATCH };
        let page = state.service.list_items(&s.credential.account, &filter, batch).await.map_err(|e| {
            tracing::error!(error = %e, "Console could not read records.");
            error_page(StatusCode::SERVICE_UNAVAILABLE, "The service is temporarily unavailable; try again.")
        })?;
        let exhausted = page.len() < batch as usize;
        read += page.len();
        before = page.last().map(|i| i.id);
        for item in page {
            if items.len() < want && item.url.contains(&f.url) {
                items.push(item);
            } else if items.len() >= want {
                break;
            }
        }
        if items.len() >= want {
            return Ok(Found { next: items.last().map(|i| i.id), items });
        }
        if exhausted {
            return Ok(Found { items, next: None });
        }
        if read >= scan {
            return Ok(Found { items, next: before });
        }
    }
}

/// `GET /console/records`.
pub async fn page(State(state): State<AppState>, s: SignedIn, Query(f): Query<Filters>) -> Response {
    let found = match find(&state, &s, &f, PAGE, PAGE_SCAN).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let select = |name: &str, current: &str, options: &[(&str, &str)]| {
        html! { select #(name) name=(name) { @for (v, l) in options { option value=(v) selected[*v == current] { (l) } } } }
    };
    let body = html! {
        h1 { "Records" }
        form.filters method="get" action="/console/records" {
            div { label for="status" { "Status" } (select("status", &f.status, &[("", "any"), ("waiting", "waiting"), ("processing", "processing"), ("completed", "completed"), ("failed", "failed")])) }
            div { label for="kind" { "Kind" } (select("kind", &f.kind, &[("", "any"), ("refresh", "refresh"), ("prefetch", "prefetch")])) }
            div { label for="window" { "Created in" } (select("window", &f.window, &[("", "any time"), ("1h", "the last hour"), ("24h", "the last 24 hours"), ("7d", "the last 7 days"), ("30d", "the last 30 days")])) }
            div { label for="url" { "URL contains" } input #url type="search" name="url" value=(f.url); }
            div { button type="submit" { "Filter" } }
        }
        p { a #csv href={ "/console/records.csv?" (f.query(None)) } download { "Download these records as CSV" } }
        div.table-wrap { table #records {
            thead { tr { th { "Created (UTC)" } th { "Task" } th { "Kind" } th { "URL" } th { "Status" } th { "Reason" } } }
            tbody {
                @for i in &found.items {
                    tr { td { (time(i.created_at)) } td { a href={ "/console/tasks/" (i.task_id) } { (i.task_id) } }
                        td { (i.kind.as_str()) " " (i.item_type.as_str()) } td.url { (i.url) }
                        td { (status(i.status.as_str())) } td { (i.reason.as_deref().unwrap_or("")) } }
                }
            }
        } }
        @if found.items.is_empty() { p #empty { "No records match." } }
        @if let Some(next) = found.next { p { a #next href={ "/console/records?" (f.query(Some(next))) } { "Older records →" } } }
    };
    super::layout::page(&Page { title: "Records", signed_in: Some(&s), body }).into_response()
}

/// `GET /console/records.csv`: the filtered records (from the cursor, at most 10,000 rows).
pub async fn csv(State(state): State<AppState>, s: SignedIn, Query(f): Query<Filters>) -> Response {
    let found = match find(&state, &s, &f, CSV_ROWS, CSV_SCAN).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let mut out = String::from("id,task_id,created_at,kind,type,url,status,finished_at,reason\r\n");
    for i in &found.items {
        let row = [
            i.id.to_string(),
            i.task_id.to_string(),
            crate::wire::views::time(i.created_at),
            i.kind.as_str().to_owned(),
            i.item_type.as_str().to_owned(),
            i.url.clone(),
            i.status.as_str().to_owned(),
            i.finished_at.map(crate::wire::views::time).unwrap_or_default(),
            i.reason.clone().unwrap_or_default(),
        ];
        out.push_str(&row.iter().map(|f| field(f)).collect::<Vec<_>>().join(","));
        out.push_str("\r\n");
    }
    let mut r = out.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    r.headers_mut()
        .insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"cachectl-records.csv\""));
    r
}

/// One CSV field (RFC 4180 quoting); a field a spreadsheet would read as a formula gets a
/// leading `'` so that opening the export never runs one.
pub(crate) fn field(value: &str) -> String {
    let value =
        if value.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{value}") } else { value.to_owned() };
    if value.contains([',', '"', '\r', '\n']) { format!("\"{}\"", value.replace('"', "\"\"")) } else { value }
}
