//! The Baidu AI Cloud dialects (docs/baidu.md): GEO (`/v2/geo/...`) and classic CDN
//! (`/v2/cache/purge`, ...). What both share lives here: [`BceCaller`] (BCE v1 authentication),
//! the error table and body, request ids, the record shape, time parsing and the opaque keyset
//! marker. Thin adapters over `Service`, like every dialect.

pub mod auth;
pub mod cdn;
pub mod geo;

use super::{AppState, read_body};
use crate::auth::Credential;
use crate::clock::now_ms;
use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cachectl_core::service::{Submission, SubmitError, SubmittedUrl};
use cachectl_core::{ItemRecord, ItemStatus, ItemType, Kind, StoreError, TaskId, Timestamp};
use serde_json::{Value, json};

/// The error codes of the Baidu dialects, one table: code, HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 400: a parameter or the body is wrong.
    InvalidArgument,
    /// 400: the body is not JSON.
    MalformedJson,
    /// 400: a daily quota would be exceeded.
    QuotaExceeded,
    /// 401 without credentials, 403 with an unknown access key.
    AccessDenied,
    /// 403: the signature is wrong.
    SignatureDoesNotMatch,
    /// 403: the signature's time window is over (or not begun).
    RequestExpired,
    /// 404: no such endpoint.
    NotFound,
    /// 405: the endpoint does not take this method.
    MethodNotAllowed,
    /// 503: the store is unreachable.
    ServiceUnavailable,
}

impl Code {
    fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "InvalidArgument",
            Self::MalformedJson => "MalformedJSON",
            Self::QuotaExceeded => "QuotaExceeded",
            Self::AccessDenied => "AccessDenied",
            Self::SignatureDoesNotMatch => "SignatureDoesNotMatch",
            Self::RequestExpired => "RequestExpired",
            Self::NotFound => "NotFound",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::ServiceUnavailable => "ServiceUnavailable",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::InvalidArgument | Self::MalformedJson | Self::QuotaExceeded => StatusCode::BAD_REQUEST,
            Self::AccessDenied | Self::SignatureDoesNotMatch | Self::RequestExpired => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An error of the Baidu dialects.
#[derive(Debug)]
pub struct BceError {
    code: Code,
    status: StatusCode,
    message: String,
}

impl BceError {
    /// An error with the code's own status.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, status: code.status(), message: message.into() }
    }

    /// A 400 `InvalidArgument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }
}

impl From<StoreError> for BceError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "Store failed while answering a Baidu-dialect request.");
        Self::new(Code::ServiceUnavailable, "the service is temporarily unavailable, retry later")
    }
}

/// A request id: 32 random hex digits in the 8-4-4-4-12 form Baidu uses.
fn request_id() -> String {
    let hex = format!("{:032x}", rand::random::<u128>());
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

impl IntoResponse for BceError {
    fn into_response(self) -> Response {
        let id = request_id();
        let body = json!({"code": self.code.as_str(), "message": self.message, "requestId": id});
        with_request_id(crate::wire::json_response(self.status, &body), &id)
    }
}

/// A successful answer of the Baidu dialects: its status and JSON body, with a request id.
pub struct BceOk<T>(pub StatusCode, pub T);

impl<T: serde::Serialize> IntoResponse for BceOk<T> {
    fn into_response(self) -> Response {
        with_request_id(crate::wire::json_response(self.0, &self.1), &request_id())
    }
}

fn with_request_id(mut response: Response, id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-bce-request-id", value);
    }
    response
}

/// The routes of both Baidu dialects but `/v2/cache/prefetch`, which is shared with the
/// Baishan dialect ([`cdn::prefetch_routes`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2/cache/purge", get(cdn::list_purges).post(cdn::submit_purge).fallback(method_not_allowed))
        .route("/v2/cache/quota", get(cdn::quota).fallback(method_not_allowed))
        .route("/v2/cache/records", get(cdn::records).fallback(method_not_allowed))
        .route("/v2/geo/cache/purge", get(geo::list_purges).post(geo::submit_purge).fallback(method_not_allowed))
        .route(
            "/v2/geo/cache/prefetch",
            get(geo::list_prefetches).post(geo::submit_prefetch).fallback(method_not_allowed),
        )
}

/// Whether a request carries a BCE v1 signature (the `/v2/cache/prefetch` path is shared with
/// the Baishan dialect; the auth scheme decides).
#[must_use]
pub fn is_bce(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("bce-auth-v1/"))
}

/// Percent-decodes without treating `+` as a space (BCE clients encode spaces as `%20`).
fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// The query string's pairs, decoded, in order; empty values kept (they are signed).
fn raw_query_pairs(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A caller whose request carries a valid BCE v1 signature of a configured access key. A
/// refused request is answered with the Baidu error body (`AccessDenied`,
/// `SignatureDoesNotMatch`, `RequestExpired`). The body is not signed, so it is read after.
pub struct BceCaller(pub Credential);

impl FromRequestParts<AppState> for BceCaller {
    type Rejection = BceError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, BceError> {
        authenticate(state, parts).map(Self)
    }
}

/// Checks the BCE v1 signature and returns the access key's credential.
fn authenticate(state: &AppState, parts: &Parts) -> Result<Credential, BceError> {
    let (method, uri, headers) = (&parts.method, &parts.uri, &parts.headers);
    let header = headers.get("authorization").and_then(|v| v.to_str().ok()).ok_or_else(|| BceError {
        code: Code::AccessDenied,
        status: StatusCode::UNAUTHORIZED,
        message: "the Authorization header is missing".into(),
    })?;
    let parsed = auth::parse(header).map_err(|e| BceError {
        code: Code::AccessDenied,
        status: StatusCode::UNAUTHORIZED,
        message: e.to_string(),
    })?;
    let directory = state.directory.current();
    let Some((entry, sk)) = directory.access_key(&parsed.ak, now_ms()) else {
        return Err(BceError::new(Code::AccessDenied, format!("the access key id {:?} does not exist", parsed.ak)));
    };
    let query = raw_query_pairs(uri);
    let header_pairs: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(name, value)| value.to_str().ok().map(|v| (name.as_str().to_owned(), v.to_owned())))
        .collect();
    let path = decode(uri.path());
    let request = auth::SignedRequest { method: method.as_str(), path: &path, query: &query, headers: &header_pairs };
    auth::verify(&parsed, sk.expose(), &request, now_ms().millis() / 1000).map_err(|e| match e {
        auth::AuthError::Expired(m) => BceError::new(Code::RequestExpired, m),
        auth::AuthError::Mismatch => BceError::new(Code::SignatureDoesNotMatch, e.to_string()),
        auth::AuthError::Missing(m) | auth::AuthError::Malformed(m) => {
            BceError { code: Code::AccessDenied, status: StatusCode::UNAUTHORIZED, message: m }
        }
    })?;
    Ok(entry.credential.clone().presented(parts))
}

/// Query parameters where an empty value means absent (the SDK sends `id=&marker=&type=`).
pub struct Params(Vec<(String, String)>);

impl Params {
    /// The request's query parameters.
    pub fn new(uri: &Uri) -> Self {
        Self(raw_query_pairs(uri).into_iter().filter(|(_, v)| !v.is_empty()).collect())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// RFC 3339 UTC, as the Baidu dialects print times.
fn format_time(ms: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(ms.millis()).map_or_else(String::new, |t| {
        let mut text = String::with_capacity(20);
        let _ = crate::wire::write_datetime(&mut text, &t, b'T');
        text.push('Z');
        text
    })
}

/// Parses an RFC 3339 time parameter.
fn parse_time(name: &str, text: &str) -> Result<Timestamp, BceError> {
    chrono::DateTime::parse_from_rfc3339(text.trim()).map(|t| Timestamp::from_millis(t.timestamp_millis())).map_err(
        |_| BceError::invalid(format!("{name} must be an RFC 3339 time such as 2025-11-10T02:00:00Z, not {text:?}")),
    )
}

/// The longest window a query may span.
const MAX_SPAN_MS: i64 = 30 * 86_400_000;
/// Records per page at most.
const PAGE: u32 = 100;
/// Every record of one task is returned at once; a task holds at most this many.
const TASK_RECORDS: u32 = 10_000;

/// `startTime`/`endTime` with their defaults (end now, start 24 h before end) and limits.
fn window(params: &Params, now: Timestamp) -> Result<(Timestamp, Timestamp), BceError> {
    let end = params.get("endTime").map(|t| parse_time("endTime", t)).transpose()?.unwrap_or(now);
    let start = params
        .get("startTime")
        .map(|t| parse_time("startTime", t))
        .transpose()?
        .unwrap_or(end.plus_millis(-86_400_000));
    if start > end {
        return Err(BceError::invalid("startTime is after endTime"));
    }
    if end.millis_since(start) > MAX_SPAN_MS {
        return Err(BceError::invalid("the time range between startTime and endTime spans more than 30 days"));
    }
    // endTime is inclusive to the second.
    Ok((start, end.plus_millis(1000)))
}

/// The opaque marker: the last record's `(created_at, id)`, hex-encoded.
fn encode_marker(item: &ItemRecord) -> String {
    hex::encode(format!("v1:{}:{}", item.created_at.millis(), item.id))
}

fn decode_marker(marker: &str) -> Result<(Timestamp, i64), BceError> {
    let bad = || BceError::invalid("marker is malformed: pass the nextMarker of the previous page as it is");
    let text = String::from_utf8(hex::decode(marker.trim()).map_err(|_| bad())?).map_err(|_| bad())?;
    let mut parts = text.split(':');
    match (parts.next(), parts.next().map(str::parse), parts.next().map(str::parse), parts.next()) {
        (Some("v1"), Some(Ok(created)), Some(Ok(id)), None) => Ok((Timestamp::from_millis(created), id)),
        _ => Err(bad()),
    }
}

/// The status word of a record: `waiting` only for a prefetch scheduled in the future.
fn status_word(item: &ItemRecord, now: Timestamp) -> &'static str {
    match item.status {
        ItemStatus::Waiting if item.not_before > now => "waiting",
        ItemStatus::Waiting | ItemStatus::Processing => "in-progress",
        ItemStatus::Completed => "completed",
        ItemStatus::Failed => "failed",
    }
}

/// One record: `{task: {url, type}, createdAt, progress, status, operator, finishedAt?}` (+ `reason`),
/// serialized straight from the item: a page is written without building a JSON tree first.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    task: RecordTask,
    created_at: Time,
    progress: u8,
    status: &'static str,
    operator: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(serde::Serialize)]
struct RecordTask {
    url: String,
    /// Refresh records only.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    item_type: Option<&'static str>,
}

/// A time written as `format_time` writes it.
struct Time(Timestamp);

impl serde::Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = crate::wire::instant_text(self.0, chrono::Offset::fix(&chrono::Utc), b'T');
        match text {
            Some(text) => {
                let mut zulu = [b'Z'; 20];
                zulu[..19].copy_from_slice(&text);
                serializer.serialize_str(std::str::from_utf8(&zulu).unwrap_or_default())
            }
            None => serializer.serialize_str(&format_time(self.0)),
        }
    }
}

fn record(item: ItemRecord, now: Timestamp, with_reason: bool) -> Record {
    let status = status_word(&item, now);
    Record {
        task: RecordTask {
            item_type: (item.kind == Kind::Refresh).then_some(if item.item_type == ItemType::Dir {
                "directory"
            } else {
                "file"
            }),
            url: item.url,
        },
        created_at: Time(item.created_at),
        progress: item.progress,
        status,
        operator: item.operator,
        finished_at: item.finished_at.map(Time),
        reason: if with_reason { item.reason } else { None },
    }
}

/// A page of records: `{details, isTruncated, nextMarker?}`.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordPage {
    details: Vec<Record>,
    is_truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_marker: Option<String>,
}

/// A page of records; `items` holds up to one record more than a page, which only says that
/// there is a next page.
fn page(mut items: Vec<ItemRecord>, limit: u32, now: Timestamp, with_reason: bool) -> RecordPage {
    let truncated = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next_marker = if truncated { items.last().map(encode_marker) } else { None };
    let details = items.into_iter().map(|i| record(i, now, with_reason)).collect();
    RecordPage { details, is_truncated: truncated, next_marker }
}

/// Lists records for both Baidu dialects: with `id`, every record of that task at once;
/// otherwise one page of the time window after `marker`. `filters` carries the dialect's own
/// filters (site, url, type); its account, window, cursor and limit are set here.
async fn list_records(
    state: &AppState,
    credential: &Credential,
    kind: Kind,
    filters: Filters<'_>,
    params: &Params,
    with_reason: bool,
) -> Result<RecordPage, BceError> {
    let now = now_ms();
    let base = cachectl_core::RecordQuery {
        account: &credential.account.name,
        kind,
        task_id: None,
        from: Timestamp::EPOCH,
        to: Timestamp::EPOCH,
        site: filters.site,
        url: filters.url,
        item_type: filters.item_type,
        after: None,
        limit: PAGE + 1,
    };
    if let Some(id) = params.get("id") {
        let task_id = parse_id(id)?;
        let query = cachectl_core::RecordQuery { task_id: Some(task_id), limit: TASK_RECORDS, ..base };
        let items = state.service.records(&credential.account, query).await?;
        return Ok(page(items, TASK_RECORDS, now, with_reason));
    }
    let (from, to) = window(params, now)?;
    let after = params.get("marker").map(decode_marker).transpose()?;
    let items =
        state.service.records(&credential.account, cachectl_core::RecordQuery { from, to, after, ..base }).await?;
    Ok(page(items, PAGE, now, with_reason))
}

/// The filters only one of the two dialects has: GEO's `site` and `type`, CDN's `url`.
#[derive(Default)]
struct Filters<'a> {
    site: Option<&'a str>,
    url: Option<&'a str>,
    item_type: Option<ItemType>,
}

/// A task id parameter: a positive integer.
fn parse_id(id: &str) -> Result<TaskId, BceError> {
    TaskId::parse(id.trim()).ok_or_else(|| BceError::invalid(format!("id must be a task id, not {id:?}")))
}

/// One task of a submit body: `{url, type?, startTime?, speed?}`.
struct TaskSpec {
    url: String,
    item_type: ItemType,
    start_time: Option<Timestamp>,
}

/// Parses `{"tasks": [...]}` (and returns the object for other fields such as `site`).
fn parse_tasks(body: &[u8], kind: Kind) -> Result<(serde_json::Map<String, Value>, Vec<TaskSpec>), BceError> {
    if body.trim_ascii().is_empty() {
        return Err(BceError::new(Code::MalformedJson, "the request body is empty; send {\"tasks\": [...]}"));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| BceError::new(Code::MalformedJson, format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(BceError::new(Code::MalformedJson, "the request body must be a JSON object"));
    };
    let Some(Value::Array(tasks)) = map.get("tasks") else {
        return Err(BceError::invalid("tasks is required: a list of {\"url\": ...} objects"));
    };
    if tasks.is_empty() {
        return Err(BceError::invalid("tasks must not be empty"));
    }
    let mut specs = Vec::with_capacity(tasks.len());
    for (i, task) in tasks.iter().enumerate() {
        let Some(url) = task.get("url").and_then(Value::as_str) else {
            return Err(BceError::invalid(format!("tasks[{i}].url is required and must be a string")));
        };
        let item_type = match (kind, task.get("type")) {
            (_, None | Some(Value::Null)) => ItemType::Url,
            (Kind::Refresh, Some(Value::String(t))) if t == "file" || t == "url" => ItemType::Url,
            (Kind::Refresh, Some(Value::String(t))) if t == "directory" => ItemType::Dir,
            (Kind::Refresh, Some(other)) => {
                return Err(BceError::invalid(format!(
                    "tasks[{i}].type must be \"file\" or \"directory\", not {other}"
                )));
            }
            (Kind::Prefetch, Some(_)) => ItemType::Url,
        };
        let start_time = match task.get("startTime") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) if kind == Kind::Prefetch => Some(parse_time(&format!("tasks[{i}].startTime"), t)?),
            Some(other) => return Err(BceError::invalid(format!("tasks[{i}].startTime is not valid here: {other}"))),
        };
        specs.push(TaskSpec { url: url.to_owned(), item_type, start_time });
    }
    let dirs = specs.iter().filter(|s| s.item_type == ItemType::Dir).count();
    if specs.len() - dirs > 1000 {
        return Err(BceError::invalid(format!("too many URLs: {} in one request, at most 1000", specs.len() - dirs)));
    }
    if dirs > 100 {
        return Err(BceError::invalid(format!("too many directories: {dirs} in one request, at most 100")));
    }
    Ok((map, specs))
}

/// Validates every URL (all or nothing: these APIs have no list of rejected URLs), stores the
/// task, and answers 201 `{"id": "..."}`.
async fn submit(
    state: &AppState,
    credential: &Credential,
    kind: Kind,
    specs: Vec<TaskSpec>,
    dialect: &'static str,
) -> Result<BceOk<Value>, BceError> {
    let now = now_ms();
    let account = &credential.account;
    for spec in &specs {
        if let Some(start) = spec.start_time
            && start > now.plus_millis(86_400_000)
        {
            return Err(BceError::invalid(format!("{}: startTime may be at most 24 hours ahead", spec.url)));
        }
    }
    let urls = specs
        .into_iter()
        .map(|s| SubmittedUrl { url: s.url, item_type: s.item_type, not_before: s.start_time })
        .collect();
    let urls = state.service.validate(account, kind.into(), urls, now);
    if let Some((url, e)) = urls.rejected.first() {
        return Err(BceError::invalid(format!("{url}: {e}")));
    }
    let submission = Submission {
        idempotency: None,
        urls,
        operator: credential.operator.clone(),
        dialect,
        address: credential.address.clone(),
    };
    match state.service.submit(account, submission, now).await {
        Ok(done) => {
            state.metrics.submitted(dialect, kind, done.accepted);
            Ok(BceOk(StatusCode::CREATED, json!({"id": done.task_id.to_string()})))
        }
        Err(SubmitError::NothingAccepted { rejected }) => {
            let first = rejected.first().map(|(u, e)| format!("{u}: {e}")).unwrap_or_default();
            Err(BceError::invalid(first))
        }
        Err(SubmitError::Quota { bucket, limit, remaining }) => {
            Err(BceError::new(Code::QuotaExceeded, super::quota_exceeded(bucket, "purge", limit, remaining)))
        }
        Err(SubmitError::Store(e)) => Err(e.into()),
        Err(SubmitError::IdempotencyConflict) => Err(BceError::invalid("idempotency conflict")),
    }
}

/// The body of a submission, or the dialect's 400.
async fn body(body: axum::body::Body) -> Result<bytes::Bytes, BceError> {
    read_body(body).await.map_err(BceError::invalid)
}

/// 404 in the Baidu error format.
pub fn not_found() -> Response {
    BceError::new(Code::NotFound, "no such API endpoint").into_response()
}

/// 405 in the Baidu error format.
async fn method_not_allowed() -> BceError {
    BceError::new(Code::MethodNotAllowed, "this endpoint does not take this method")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_reject_garbage() {
        let item = ItemRecord {
            id: 42,
            kind: Kind::Refresh,
            url: "http://x/".into(),
            item_type: ItemType::Url,
            status: ItemStatus::Waiting,
            progress: 0,
            operator: "o".into(),
            created_at: Timestamp::from_millis(1_700_000_000_123),
            not_before: Timestamp::EPOCH,
            finished_at: None,
            reason: None,
        };
        assert_eq!(decode_marker(&encode_marker(&item)).unwrap(), (Timestamp::from_millis(1_700_000_000_123), 42));
        for bad in ["", "zz", "00", &hex::encode("v2:1:2"), &hex::encode("v1:x:2"), &hex::encode("v1:1:2:3")] {
            assert!(decode_marker(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_default_and_limit() {
        let now = Timestamp::from_millis(1_700_000_000_000);
        let empty = Params(vec![]);
        assert_eq!(window(&empty, now).unwrap(), (now.plus_millis(-86_400_000), now.plus_millis(1000)));
        let p = Params(vec![
            ("startTime".into(), "2025-11-10T02:00:00Z".into()),
            ("endTime".into(), "2025-11-09T02:00:00Z".into()),
        ]);
        assert!(window(&p, now).is_err());
        let p = Params(vec![
            ("startTime".into(), "2025-10-01T00:00:00Z".into()),
            ("endTime".into(), "2025-11-09T02:00:00Z".into()),
        ]);
        assert!(window(&p, now).is_err());
        let p = Params(vec![("startTime".into(), "yesterday".into())]);
        assert!(window(&p, now).is_err());
    }
}
