//! Records: the account's items, newest first, filtered by status, kind, URL substring and time
//! window, keyset-paged like the native API (`before_id`), with the exact total of the filtered
//! set, and the same filter as CSV.

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
const PAGE: u32 = 50;
/// Rows read from the store per chunk of a CSV export.
const CSV_BATCH: u32 = 1_000;

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

/// A page of matches, where the next one starts, and the exact totals.
struct Found {
    items: Vec<Item>,
    next: Option<i64>,
    /// Items matching the filters.
    total: u64,
    /// Of them, those newer than the page (the ones before the cursor).
    skipped: u64,
}

/// The filters as the store reads them, or why the first invalid one is (for a 400 page).
fn store_filter(f: &Filters, now: Timestamp) -> Result<ItemFilter<'_>, String> {
    let bad = |m: &str| m.to_owned();
    let kind = match f.kind.as_str() {
        "" => None,
        k => Some(k.parse::<Kind>().map_err(|_| bad("kind must be refresh or prefetch"))?),
    };
    let status = match f.status.as_str() {
        "" => None,
        k => Some(k.parse::<ItemStatus>().map_err(|_| bad("status is not an item status"))?),
    };
    if f.url.contains('\0') {
        return Err(bad("the URL text cannot hold a NUL character"));
    }
    let since = f.since(now)?;
    let url_contains = Some(f.url.as_str()).filter(|u| !u.is_empty());
    Ok(ItemFilter { kind, status, since, url_contains, ..ItemFilter::default() })
}

/// Up to `want` items matching the filters from `f.cursor`, newest first, with the exact totals:
/// the store filters every field (the URL substring too) and counts the same set.
async fn find(state: &AppState, s: &SignedIn, f: &Filters, want: u32) -> Result<Found, Response> {
    let filter = store_filter(f, now_ms()).map_err(|m| error_page(StatusCode::BAD_REQUEST, &m))?;
    let unavailable = |e: cachectl_core::StoreError| {
        tracing::error!(error = %e, "Console could not read records.");
        error_page(StatusCode::SERVICE_UNAVAILABLE, "The service is temporarily unavailable; try again.")
    };
    let account = &s.credential.account;
    let cursor = f.cursor.filter(|c| *c > 0);
    let page_filter = ItemFilter { before_id: cursor, ..filter.clone() };
    let items = state.service.list_items(account, &page_filter, want).await.map_err(unavailable)?;
    let total = state.service.count_items(account, &filter).await.map_err(unavailable)?;
    let skipped = match cursor {
        None => 0,
        Some(_) => total.saturating_sub(state.service.count_items(account, &page_filter).await.map_err(unavailable)?),
    };
    let next = (items.len() == want as usize).then(|| items.last().map(|i| i.id)).flatten();
    Ok(Found { items, next, total, skipped })
}

/// `GET /console/records`.
pub async fn page(State(state): State<AppState>, s: SignedIn, Query(f): Query<Filters>) -> Response {
    let found = match find(&state, &s, &f, PAGE).await {
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
        p #total { (total_sentence(&found)) }
        p { a #csv href={ "/console/records.csv?" (f.query(f.cursor.filter(|c| *c > 0))) } download {
            @if found.skipped > 0 { "Download these records and the older ones as CSV" } @else { "Download these records as CSV" } } }
        div.table-wrap { table #records {
            thead { tr { th { "Created (UTC)" } th { "Task" } th { "Kind" } th { "URL" } th { "Status" } th { "Reason" } } }
            tbody {
                @for i in &found.items {
                    tr { td { (time(i.created_at)) } td { a href={ "/console/tasks/" (i.task_id) } { (i.task_id) } }
                        td { (i.kind.as_str()) " " (i.item_type.as_str()) @if i.soft { " (soft)" } } td.url { (i.url) }
                        td { (status(i.status.as_str())) } td { (i.reason.as_deref().unwrap_or("")) } }
                }
            }
        } }
        @if let Some(next) = found.next { p { a #next href={ "/console/records?" (f.query(Some(next))) } { "Older records →" } } }
    };
    super::layout::page(&Page { title: "Records", signed_in: Some(&s), body }).into_response()
}

/// `GET /console/records.csv`: every record matching the filters from the cursor (from the
/// newest without one), streamed in keyset pages of `CSV_BATCH` rows: exact at any size, and
/// never held in memory whole. A store failure midway aborts the download (the browser reports
/// it failed) rather than ending it short.
pub async fn csv(State(state): State<AppState>, s: SignedIn, Query(f): Query<Filters>) -> Response {
    let now = now_ms();
    if let Err(m) = store_filter(&f, now) {
        return error_page(StatusCode::BAD_REQUEST, &m);
    }
    let account = s.credential.account.clone();
    // (the cursor to read from, the header while it is not sent); both `None`: the end.
    let start = (f.cursor.filter(|c| *c > 0), Some(String::from(CSV_HEADER)));
    let f = std::sync::Arc::new(f);
    let stream = futures::stream::try_unfold(start, move |(before, header)| {
        let (state, account, f) = (state.clone(), account.clone(), f.clone());
        async move {
            if before.is_none() && header.is_none() {
                return Ok(None);
            }
            let Ok(filter) = store_filter(&f, now) else { return Ok(None) };
            let filter = ItemFilter { before_id: before, ..filter };
            let items = state.service.list_items(&account, &filter, CSV_BATCH).await.map_err(|e| {
                tracing::error!(error = %e, "Console could not read records for a CSV export; the download is cut.");
                std::io::Error::other("store unavailable")
            })?;
            let mut out = header.unwrap_or_default();
            for i in &items {
                out.push_str(&csv_row(i));
            }
            let next = if items.len() == CSV_BATCH as usize { items.last().map(|i| i.id) } else { None };
            Ok::<_, std::io::Error>(Some((bytes::Bytes::from(out), (next, None))))
        }
    });
    let mut r = axum::body::Body::from_stream(stream).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    r.headers_mut()
        .insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"cachectl-records.csv\""));
    r
}

const CSV_HEADER: &str = "id,task_id,created_at,kind,type,url,status,finished_at,reason\r\n";

/// One record as a CSV line.
fn csv_row(i: &Item) -> String {
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
    let mut line = row.iter().map(|f| field(f)).collect::<Vec<_>>().join(",");
    line.push_str("\r\n");
    line
}

/// "Records 51–100 of 1,234 matching." (or that none match).
fn total_sentence(found: &Found) -> String {
    let first = found.skipped + 1;
    let last = found.skipped + found.items.len() as u64;
    match (found.total, found.items.len()) {
        (0, _) => "No records match: 0 in total.".to_owned(),
        (total, 0) => format!("No records on this page; {} match in total.", thousands(total)),
        (total, _) => format!("Records {}–{} of {} matching.", thousands(first), thousands(last), thousands(total)),
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One CSV field (RFC 4180 quoting); a field a spreadsheet would read as a formula gets a
/// leading `'` so that opening the export never runs one.
pub(crate) fn field(value: &str) -> String {
    let value =
        if value.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{value}") } else { value.to_owned() };
    if value.contains([',', '"', '\r', '\n']) { format!("\"{}\"", value.replace('"', "\"\"")) } else { value }
}
