//! The BaishanCloud CDN API v2 dialect (CONTRACT §3): token auth, the `{code, message, data}`
//! envelope, rate-limit headers, submit and status queries. A thin adapter: it parses the wire
//! format into `Service` calls and renders the answers; it knows no SQL and no edge driver.

use super::{AppState, now_ms, read_body};
use crate::config::Credential;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use cachectl_core::service::{Submission, SubmitError, SubmittedUrl};
use cachectl_core::{ItemRecord, ItemType, Kind, Millis, Page, PageRequest, QuotaBucket, StoreError};
use chrono::{FixedOffset, NaiveDate, NaiveDateTime, TimeZone};
use serde_json::{Value, json};

/// The endpoints of the dialect; each has a fixed `Api-Id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v2/cache/refresh`
    SubmitRefresh,
    /// `GET /v2/cache/refresh`
    QueryRefresh,
    /// `POST /v2/cache/prefetch`
    SubmitPrefetch,
    /// `GET /v2/cache/prefetch`
    QueryPrefetch,
    /// `GET /v2/cache/prefetchQuota`
    PrefetchQuota,
}

impl Endpoint {
    /// The `Api-Id` header value. The two query ids are the seeds' own; the others are cachectl's.
    #[must_use]
    pub fn api_id(self) -> u32 {
        match self {
            Self::QueryRefresh => 70_946_227,
            Self::QueryPrefetch => 70_945_467,
            Self::SubmitRefresh => 70_946_226,
            Self::SubmitPrefetch => 70_945_466,
            Self::PrefetchQuota => 70_945_468,
        }
    }

    fn is_prefetch(self) -> bool {
        matches!(self, Self::SubmitPrefetch | Self::QueryPrefetch | Self::PrefetchQuota)
    }
}

/// Per-request limits on the number of URLs (CONTRACT §3).
const MAX_REFRESH_URLS: usize = 1000;
const MAX_REFRESH_DIRS: usize = 100;
const MAX_PREFETCH_URLS: usize = 500;
/// The longest time window of a query.
const MAX_SPAN_MS: Millis = 7 * 86_400_000;

/// A dialect error: HTTP status (also the envelope's `code`), a one-sentence message, and `data`.
#[derive(Debug)]
pub struct BaishanError {
    status: StatusCode,
    message: String,
    data: Value,
}

impl BaishanError {
    fn bad(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), data: json!({}) }
    }

    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), data: json!({}) }
    }
}

impl From<StoreError> for BaishanError {
    fn from(e: StoreError) -> Self {
        // The cause goes to the log, never into the body.
        tracing::error!(error = %e, "Store failed while answering a Baishan request.");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "the service is temporarily unavailable, retry later")
    }
}

/// Renders the envelope.
fn envelope<T: serde::Serialize>(status: StatusCode, message: &str, data: T) -> Response {
    #[derive(serde::Serialize)]
    struct Envelope<'a, T> {
        code: u16,
        message: &'a str,
        data: T,
    }
    let code = if status.is_success() { 0 } else { status.as_u16() };
    crate::api::json_response(status, &Envelope { code, message, data })
}

/// Any path the dialect does not know: 404 in the envelope.
pub async fn not_found() -> Response {
    envelope(StatusCode::NOT_FOUND, "no such API endpoint; see /v2/cache/refresh and /v2/cache/prefetch", json!({}))
}

/// `GET|POST /v2/cache/refresh`
pub async fn refresh(
    state: State<AppState>,
    method: Method,
    headers: HeaderMap,
    query: RawQuery,
    body: Body,
) -> Response {
    let endpoint = match method {
        Method::GET | Method::HEAD => Endpoint::QueryRefresh,
        Method::POST => Endpoint::SubmitRefresh,
        _ => return method_not_allowed(),
    };
    handle(state, endpoint, headers, query, body).await
}

/// `GET|POST /v2/cache/prefetch`
pub async fn prefetch(
    state: State<AppState>,
    method: Method,
    headers: HeaderMap,
    query: RawQuery,
    body: Body,
) -> Response {
    let endpoint = match method {
        Method::GET | Method::HEAD => Endpoint::QueryPrefetch,
        Method::POST => Endpoint::SubmitPrefetch,
        _ => return method_not_allowed(),
    };
    handle(state, endpoint, headers, query, body).await
}

/// `GET /v2/cache/prefetchQuota`
pub async fn prefetch_quota(state: State<AppState>, method: Method, headers: HeaderMap, query: RawQuery) -> Response {
    if !matches!(method, Method::GET | Method::HEAD) {
        return method_not_allowed();
    }
    handle(state, Endpoint::PrefetchQuota, headers, query, Body::empty()).await
}

fn method_not_allowed() -> Response {
    let mut response =
        envelope(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint; use GET or POST", json!({}));
    response.headers_mut().insert("allow", HeaderValue::from_static("GET, POST"));
    response
}

/// The query string as decoded pairs; an empty value counts as absent.
fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(pairs: &'a [(String, String)], names: &[&str]) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| names.contains(&k.as_str())).map(|(_, v)| v.as_str())
}

async fn handle(
    State(state): State<AppState>,
    endpoint: Endpoint,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    let now = now_ms();
    let pairs = query_pairs(raw.as_deref());
    let token = param(&pairs, &["token"])
        .map(str::to_owned)
        .or_else(|| headers.get("token").and_then(|v| v.to_str().ok()).map(str::to_owned));
    let default_limit = state.settings.default_rate_limit;
    let Some(token) = token else {
        let mut r = envelope(
            StatusCode::UNAUTHORIZED,
            "missing token: pass it as the token query parameter or the Token header",
            json!({}),
        );
        add_limit_headers(&mut r, endpoint, default_limit, default_limit, RateLimitReset::at(now));
        return r;
    };
    let Some(credential) = state.settings.tokens.get(&token).cloned() else {
        let mut r = envelope(StatusCode::UNAUTHORIZED, "unknown token", json!({}));
        add_limit_headers(&mut r, endpoint, default_limit, default_limit, RateLimitReset::at(now));
        return r;
    };
    let limit = credential.account.rate_limit_per_minute;
    let decision =
        state.limiter.check_shared(state.service.store().as_ref(), &token, endpoint.api_id(), limit, now).await;
    let reset = RateLimitReset(decision.reset_secs);
    let mut response = if decision.allowed {
        fn ok<T: serde::Serialize>(data: T) -> Response {
            envelope(StatusCode::OK, "", data)
        }
        let result = match endpoint {
            Endpoint::SubmitRefresh | Endpoint::SubmitPrefetch => {
                submit(&state, &credential, endpoint, body, now).await.map(ok)
            }
            Endpoint::QueryRefresh => query(&state, &credential, Kind::Refresh, &pairs, now).await.map(ok),
            Endpoint::QueryPrefetch => query(&state, &credential, Kind::Prefetch, &pairs, now).await.map(ok),
            Endpoint::PrefetchQuota => quota(&state, &credential, now).await.map(ok),
        };
        result.unwrap_or_else(|e| envelope(e.status, &e.message, e.data))
    } else {
        envelope(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "rate limit of {limit} requests per minute on this endpoint exceeded; retry in {} seconds",
                decision.reset_secs
            ),
            json!({}),
        )
    };
    add_limit_headers(&mut response, endpoint, decision.limit, decision.remaining, reset);
    if endpoint.is_prefetch()
        && let Ok(q) = state.service.quota(&credential.account, QuotaBucket::PrefetchUrl, now).await
    {
        response.headers_mut().insert("x-push-remaining", HeaderValue::from(q.remaining));
    }
    state.metrics.request("baishan", response.status().as_u16());
    response
}

struct RateLimitReset(u64);

impl RateLimitReset {
    fn at(now: Millis) -> Self {
        Self(super::ratelimit::RateLimiter::reset_secs(now))
    }
}

fn add_limit_headers(response: &mut Response, endpoint: Endpoint, limit: u32, remaining: u32, reset: RateLimitReset) {
    let h = response.headers_mut();
    h.insert("api-id", HeaderValue::from(endpoint.api_id()));
    h.insert("x-ratelimit-grad", HeaderValue::from_static("minute"));
    h.insert("x-ratelimit-limit", HeaderValue::from(limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    h.insert("x-retry-after", HeaderValue::from(reset.0));
}

/// The submit body: JSON whatever the Content-Type says (curl's `-d` labels JSON as a form),
/// or a urlencoded form when the body is not a JSON object or array.
fn parse_submit_body(body: &[u8]) -> Result<(Vec<String>, Option<String>), BaishanError> {
    let trimmed = body.trim_ascii_start();
    if !trimmed.is_empty() && !trimmed.starts_with(b"{") && !trimmed.starts_with(b"[") && body.contains(&b'=') {
        let mut urls = Vec::new();
        let mut kind = None;
        for (k, v) in url::form_urlencoded::parse(body) {
            match k.as_ref() {
                "urls" | "urls[]" | "url" => urls.push(v.into_owned()),
                "type" => kind = Some(v.into_owned()),
                _ => {}
            }
        }
        return Ok((urls, kind));
    }
    if trimmed.is_empty() {
        return Err(BaishanError::bad("the request body is empty; send {\"urls\": [...]}"));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| BaishanError::bad(format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(BaishanError::bad("the request body must be a JSON object like {\"urls\": [...]}"));
    };
    let urls = match map.get("urls") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| BaishanError::bad("urls must be a list of strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(BaishanError::bad("urls must be a list of strings")),
    };
    let kind = match map.get("type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(BaishanError::bad("type must be \"url\" or \"dir\"")),
    };
    Ok((urls, kind))
}

async fn submit(
    state: &AppState,
    credential: &Credential,
    endpoint: Endpoint,
    body: Body,
    now: Millis,
) -> Result<Value, BaishanError> {
    let body = read_body(body).await.map_err(BaishanError::bad)?;
    let (urls, kind_text) = parse_submit_body(&body)?;
    let kind = if endpoint == Endpoint::SubmitPrefetch { Kind::Prefetch } else { Kind::Refresh };
    let item_type = match (kind, kind_text.as_deref().map(str::trim)) {
        (_, None | Some("" | "url")) => ItemType::Url,
        (Kind::Refresh, Some("dir")) => ItemType::Dir,
        (Kind::Prefetch, Some(other)) => {
            return Err(BaishanError::bad(format!("type {other:?} is not valid for prefetch, which takes URLs only")));
        }
        (Kind::Refresh, Some(other)) => {
            return Err(BaishanError::bad(format!("type must be \"url\" or \"dir\", not {other:?}")));
        }
    };
    if urls.is_empty() {
        return Err(BaishanError::bad("urls is required: a non-empty list of URLs"));
    }
    let max = match (kind, item_type) {
        (Kind::Prefetch, _) => MAX_PREFETCH_URLS,
        (Kind::Refresh, ItemType::Dir) => MAX_REFRESH_DIRS,
        (Kind::Refresh, ItemType::Url) => MAX_REFRESH_URLS,
    };
    if urls.len() > max {
        return Err(BaishanError::bad(format!(
            "too many urls: {} in one request, at most {max} for this type",
            urls.len()
        )));
    }
    let submission = Submission {
        kind: kind.into(),
        urls: urls.into_iter().map(|u| SubmittedUrl::now(u, item_type)).collect(),
        operator: credential.operator.clone(),
        dialect: "baishan",
        idempotency: None,
    };
    match state.service.submit(&credential.account, submission, now).await {
        Ok(done) => {
            state.metrics.submitted("baishan", kind, done.accepted);
            let err_urls: Vec<&str> = done.rejected.iter().map(|(u, _)| u.as_str()).collect();
            Ok(json!({"task_id": done.task_id, "count": done.accepted, "err_urls": err_urls}))
        }
        Err(SubmitError::NothingAccepted { rejected }) => {
            let first = rejected.first().map(|(u, e)| format!(" ({u}: {e})")).unwrap_or_default();
            let err_urls: Vec<&str> = rejected.iter().map(|(u, _)| u.as_str()).collect();
            Err(BaishanError {
                status: StatusCode::BAD_REQUEST,
                message: format!("no URL was accepted{first}"),
                data: json!({"err_urls": err_urls}),
            })
        }
        Err(SubmitError::Quota { bucket, limit, remaining }) => Err(BaishanError::bad(format!(
            "daily {} quota exceeded: {remaining} of {limit} left today",
            quota_name(bucket)
        ))),
        Err(SubmitError::Store(e)) => Err(e.into()),
        Err(SubmitError::IdempotencyConflict) => Err(BaishanError::bad("idempotency conflict")),
    }
}

fn quota_name(bucket: QuotaBucket) -> &'static str {
    match bucket {
        QuotaBucket::RefreshUrl => "refresh URL",
        QuotaBucket::RefreshDir => "refresh directory",
        QuotaBucket::PrefetchUrl => "prefetch URL",
    }
}

async fn quota(state: &AppState, credential: &Credential, now: Millis) -> Result<Value, BaishanError> {
    let q = state.service.quota(&credential.account, QuotaBucket::PrefetchUrl, now).await?;
    Ok(json!({"url_quota": q.limit, "url_remain": q.remaining}))
}

fn parse_u32(
    pairs: &[(String, String)],
    name: &str,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, BaishanError> {
    match param(pairs, &[name]) {
        None => Ok(default),
        Some(v) => v.trim().parse::<u32>().ok().filter(|n| range.contains(n)).ok_or_else(|| {
            BaishanError::bad(format!("{name} must be an integer from {} to {}, not {v:?}", range.start(), range.end()))
        }),
    }
}

/// A `start_time`/`end_time` value: a whole day, or a second. Returns `[from, to)` in epoch ms.
fn parse_time(text: &str, zone: FixedOffset, name: &str) -> Result<(Millis, Millis), BaishanError> {
    let t = text.trim();
    let local = if let Ok(day) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        let start = day.and_hms_opt(0, 0, 0).unwrap_or_default();
        (start, start + chrono::Duration::days(1))
    } else if let Ok(at) = NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S") {
        (at, at + chrono::Duration::seconds(1))
    } else {
        return Err(BaishanError::bad(format!("{name} must be YYYY-MM-DD or YYYY-MM-DD HH:MM:SS, not {text:?}")));
    };
    let to_ms = |naive: NaiveDateTime| zone.from_local_datetime(&naive).single().map(|d| d.timestamp_millis());
    match (to_ms(local.0), to_ms(local.1)) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(BaishanError::bad(format!("{name} is out of range"))),
    }
}

async fn query(
    state: &AppState,
    credential: &Credential,
    kind: Kind,
    pairs: &[(String, String)],
    now: Millis,
) -> Result<QueryPage, BaishanError> {
    let page_number = parse_u32(pairs, "page_number", 1, 1..=u32::MAX)?;
    let page_size = parse_u32(pairs, "page_size", 50, 1..=500)?;
    let page = PageRequest { number: page_number, size: page_size };
    let task_id = param(pairs, &["task_id"]);
    let start = param(pairs, &["start_time"]);
    let end = param(pairs, &["end_time"]);
    let result: Page<ItemRecord> = match (task_id, start, end) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(BaishanError::bad(
                "task_id and start_time/end_time are two exclusive ways to query; give one of them",
            ));
        }
        (None, None, None) => {
            return Err(BaishanError::bad("give either task_id, or start_time and end_time"));
        }
        (None, Some(_), None) | (None, None, Some(_)) => {
            return Err(BaishanError::bad("start_time and end_time must be given together"));
        }
        (Some(id), None, None) => {
            let id: i64 = id
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| BaishanError::bad(format!("task_id must be a positive integer, not {id:?}")))?;
            state.service.task_items(&credential.account, kind, id, page).await?
        }
        (None, Some(start), Some(end)) => {
            let zone = state.settings.timezone;
            let (from, _) = parse_time(start, zone, "start_time")?;
            let (_, to) = parse_time(end, zone, "end_time")?;
            if to <= from {
                return Err(BaishanError::bad("end_time is before start_time"));
            }
            if to - from > MAX_SPAN_MS {
                return Err(BaishanError::bad("the time range spans more than 7 days"));
            }
            // Records past the retention are gone, even before the sweep has deleted them.
            let oldest = now - i64::from(state.settings.retention.days) * 86_400_000;
            let url = param(pairs, &["url", "urls"]).map(normalize_url);
            if to <= oldest {
                Page { total: 0, records: Vec::new() }
            } else {
                state
                    .service
                    .window_items(&credential.account, kind, (from.max(oldest), to), url.as_deref(), page)
                    .await?
            }
        }
    };
    let zone = state.settings.timezone;
    let list = result
        .records
        .into_iter()
        .map(|item| QueryRecord {
            id: item.id,
            item_type: item.item_type.as_str(),
            status: item.status.as_str(),
            create_time: Time(item.created_at, zone),
            complete_time: item.finished_at.map(|t| Time(t, zone)),
            url: item.url,
        })
        .collect();
    // The refresh seed prints page_number as a string, the prefetch seed as a number.
    let page_number =
        if kind == Kind::Refresh { PageNumber::Text(page_number) } else { PageNumber::Number(page_number) };
    Ok(QueryPage { total: result.total, page_number, list })
}

/// A page of query results, serialized straight from the items.
#[derive(serde::Serialize)]
struct QueryPage {
    total: u64,
    page_number: PageNumber,
    list: Vec<QueryRecord>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum PageNumber {
    #[serde(serialize_with = "serialize_display")]
    Text(u32),
    Number(u32),
}

#[derive(serde::Serialize)]
struct QueryRecord {
    /// The item id, as a string.
    #[serde(serialize_with = "serialize_display")]
    id: i64,
    #[serde(rename = "type")]
    item_type: &'static str,
    status: &'static str,
    create_time: Time,
    /// `""` until the item is final.
    #[serde(serialize_with = "serialize_optional_time")]
    complete_time: Option<Time>,
    url: String,
}

fn serialize_display<S: serde::Serializer>(value: &impl std::fmt::Display, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn serialize_optional_time<S: serde::Serializer>(time: &Option<Time>, serializer: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(t) => serializer.collect_str(t),
        None => serializer.serialize_str(""),
    }
}

/// A time written `YYYY-MM-DD HH:MM:SS` in the dialect's zone.
struct Time(Millis, FixedOffset);

impl std::fmt::Display for Time {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1.timestamp_millis_opt(self.0).single() {
            Some(t) => super::write_datetime(f, &t, b' '),
            None => Ok(()),
        }
    }
}

impl serde::Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = super::instant_text(self.0, self.1, b' ');
        match text.as_ref().and_then(|t| std::str::from_utf8(t).ok()) {
            Some(text) => serializer.serialize_str(text),
            None => serializer.collect_str(self),
        }
    }
}

/// A queried URL normalized as submitted URLs are (lowercase host, no fragment), so that it
/// finds its records; an unparsable one is looked up as it is (and finds nothing).
fn normalize_url(raw: &str) -> String {
    url::Url::parse(raw.trim()).map_or_else(
        |_| raw.to_owned(),
        |mut u| {
            u.set_fragment(None);
            u.to_string()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_days_or_seconds_of_the_zone() {
        let zone = FixedOffset::east_opt(8 * 3600).unwrap();
        let (a, b) = parse_time("2018-02-23", zone, "start_time").unwrap();
        assert_eq!(b - a, 86_400_000);
        assert_eq!(Time(a, zone).to_string(), "2018-02-23 00:00:00");
        let (a, b) = parse_time("2018-02-23 10:11:12", zone, "start_time").unwrap();
        assert_eq!(b - a, 1000);
        assert_eq!(Time(a, zone).to_string(), "2018-02-23 10:11:12");
        assert!(parse_time("2018-02-30", zone, "start_time").is_err());
        assert!(parse_time("yesterday", zone, "start_time").is_err());
    }

    #[test]
    fn form_and_json_bodies() {
        let (urls, kind) = parse_submit_body(br#"{"urls": ["http://a/"], "type": "dir"}"#).unwrap();
        assert_eq!((urls, kind.as_deref()), (vec!["http://a/".to_owned()], Some("dir")));
        let (urls, kind) = parse_submit_body(b"urls=http%3A%2F%2Fa%2F&urls[]=http://b/&type=dir").unwrap();
        assert_eq!((urls.len(), kind.as_deref()), (2, Some("dir")));
        let (urls, _) = parse_submit_body(b"urls=http://a/x").unwrap();
        assert_eq!(urls, vec!["http://a/x".to_owned()]);
        // JSON with a URL holding '=' is still JSON.
        let (urls, _) = parse_submit_body(br#" {"urls": ["http://a/?x=1"]}"#).unwrap();
        assert_eq!(urls, vec!["http://a/?x=1".to_owned()]);
        assert!(parse_submit_body(b"{not json").is_err());
        assert!(parse_submit_body(br#"{"urls": [1]}"#).is_err());
        assert!(parse_submit_body(b"").is_err());
        assert!(parse_submit_body(b"plain words").is_err());
    }
}
