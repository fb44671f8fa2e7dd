//! The BaishanCloud CDN API v2 dialect (docs/baishan.md): token auth, the `{code, message, data}`
//! envelope, rate-limit headers, submit and status queries. A thin adapter: [`BaishanCaller`]
//! authenticates and charges the rate limit, a handler parses the wire format into one `Service`
//! call, and the caller renders the answer; it knows no SQL and no edge driver.

use super::{AppState, read_body};
use crate::auth::Credential;
use crate::clock::now_ms;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use cachectl_core::ratelimit::{Decision, RateLimiter};
use cachectl_core::service::{Submission, SubmitError, SubmittedUrl};
use cachectl_core::{ItemType, Kind, QuotaBucket, StoreError, Timestamp};
use serde_json::{Value, json};

mod query;

use query::query;
pub use query::{normalize_url, parse_time, parse_u32};

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
    /// The endpoint a routed request is for.
    fn of(method: &Method, path: &str) -> Self {
        let query = matches!(*method, Method::GET | Method::HEAD);
        match (path, query) {
            ("/v2/cache/prefetchQuota", _) => Self::PrefetchQuota,
            ("/v2/cache/prefetch", true) => Self::QueryPrefetch,
            ("/v2/cache/prefetch", false) => Self::SubmitPrefetch,
            (_, true) => Self::QueryRefresh,
            (_, false) => Self::SubmitRefresh,
        }
    }

    /// The `Api-Id` header value. The two query ids are the vendor's own; the others are cachectl's.
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

/// Per-request limits on the number of URLs (docs/baishan.md).
const MAX_REFRESH_URLS: usize = 1000;
const MAX_REFRESH_DIRS: usize = 100;
const MAX_PREFETCH_URLS: usize = 500;

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

impl IntoResponse for BaishanError {
    fn into_response(self) -> Response {
        envelope(self.status, &self.message, self.data)
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
    crate::wire::json_response(status, &Envelope { code, message, data })
}

/// The routes of the dialect. `/v2/cache/prefetch` is shared with the Baidu CDN dialect, which
/// the router picks by the request's auth scheme ([`prefetch_routes`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2/cache/refresh", get(query_refresh).post(submit_refresh).fallback(method_not_allowed))
        .route("/v2/cache/prefetchQuota", get(prefetch_quota).fallback(method_not_allowed))
}

/// `/v2/cache/prefetch` as this dialect answers it.
pub fn prefetch_routes() -> MethodRouter<AppState> {
    get(query_prefetch).post(submit_prefetch).fallback(method_not_allowed)
}

/// Any path the dialect does not know: 404 in the envelope.
pub async fn not_found() -> Response {
    envelope(StatusCode::NOT_FOUND, "no such API endpoint; see /v2/cache/refresh and /v2/cache/prefetch", json!({}))
}

async fn method_not_allowed() -> Response {
    let mut response =
        envelope(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint; use GET or POST", json!({}));
    response.headers_mut().insert("allow", HeaderValue::from_static("GET, POST"));
    response
}

/// A caller that presented a known token (the `token` query parameter or the `Token` header)
/// and whose request was counted against the token's per-endpoint minute window. A refused
/// request (no token, an unknown one, over the limit) is answered in the envelope, with the
/// rate-limit headers.
pub struct BaishanCaller {
    credential: Credential,
    endpoint: Endpoint,
    decision: Decision,
}

impl FromRequestParts<AppState> for BaishanCaller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let endpoint = Endpoint::of(&parts.method, parts.uri.path());
        let now = now_ms();
        let pairs = query_pairs(parts.uri.query());
        let token = param(&pairs, &["token"])
            .or_else(|| parts.headers.get("token").and_then(|v| v.to_str().ok()))
            .map(str::to_owned);
        let refuse = |message: &str| {
            let default_limit = state.settings.default_rate_limit;
            let mut r = envelope(StatusCode::UNAUTHORIZED, message, json!({}));
            add_limit_headers(&mut r, endpoint, default_limit, default_limit, RateLimiter::reset_secs(now));
            r
        };
        let Some(token) = token else {
            return Err(refuse("missing token: pass it as the token query parameter or the Token header"));
        };
        let Some(credential) =
            state.directory.current().token(&token, now).map(|e| e.credential.clone().presented(parts))
        else {
            return Err(refuse("unknown token"));
        };
        let limit = credential.account.rate_limit_per_minute;
        let decision = state.service.admit(&token, endpoint.api_id(), limit, now).await;
        let caller = Self { credential, endpoint, decision };
        if !decision.allowed {
            let message = format!(
                "rate limit of {limit} requests per minute on this endpoint exceeded; retry in {} seconds",
                decision.reset_secs
            );
            return Err(caller.finish(state, envelope(StatusCode::TOO_MANY_REQUESTS, &message, json!({}))).await);
        }
        Ok(caller)
    }
}

impl BaishanCaller {
    /// Renders `result` in the envelope, with the rate-limit headers and, on prefetch endpoints,
    /// `X-Push-Remaining`.
    pub async fn render<T: serde::Serialize>(self, state: &AppState, result: Result<T, BaishanError>) -> Response {
        let response = match result {
            Ok(data) => envelope(StatusCode::OK, "", data),
            Err(e) => e.into_response(),
        };
        self.finish(state, response).await
    }

    async fn finish(&self, state: &AppState, mut response: Response) -> Response {
        let d = self.decision;
        add_limit_headers(&mut response, self.endpoint, d.limit, d.remaining, d.reset_secs);
        if self.endpoint.is_prefetch()
            && let Ok(q) = state.service.quota(&self.credential.account, QuotaBucket::PrefetchUrl, now_ms()).await
        {
            response.headers_mut().insert("x-push-remaining", HeaderValue::from(q.remaining));
        }
        response
    }
}

async fn submit_refresh(State(state): State<AppState>, caller: BaishanCaller, body: Body) -> Response {
    let result = submit(&state, &caller.credential, Kind::Refresh, body, now_ms()).await;
    caller.render(&state, result).await
}

async fn submit_prefetch(State(state): State<AppState>, caller: BaishanCaller, body: Body) -> Response {
    let result = submit(&state, &caller.credential, Kind::Prefetch, body, now_ms()).await;
    caller.render(&state, result).await
}

async fn query_refresh(State(state): State<AppState>, caller: BaishanCaller, RawQuery(raw): RawQuery) -> Response {
    let result = query(&state, &caller.credential, Kind::Refresh, &query_pairs(raw.as_deref()), now_ms()).await;
    caller.render(&state, result).await
}

async fn query_prefetch(State(state): State<AppState>, caller: BaishanCaller, RawQuery(raw): RawQuery) -> Response {
    let result = query(&state, &caller.credential, Kind::Prefetch, &query_pairs(raw.as_deref()), now_ms()).await;
    caller.render(&state, result).await
}

async fn prefetch_quota(State(state): State<AppState>, caller: BaishanCaller) -> Response {
    let result = quota(&state, &caller.credential, now_ms()).await;
    caller.render(&state, result).await
}

/// The query string as decoded pairs; an empty value counts as absent.
#[doc(hidden)]
pub fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The value of the first pair named one of `names`.
#[doc(hidden)]
pub fn param<'a>(pairs: &'a [(String, String)], names: &[&str]) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| names.contains(&k.as_str())).map(|(_, v)| v.as_str())
}

fn add_limit_headers(response: &mut Response, endpoint: Endpoint, limit: u32, remaining: u32, reset_secs: u64) {
    let h = response.headers_mut();
    h.insert("api-id", HeaderValue::from(endpoint.api_id()));
    h.insert("x-ratelimit-grad", HeaderValue::from_static("minute"));
    h.insert("x-ratelimit-limit", HeaderValue::from(limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    h.insert("x-retry-after", HeaderValue::from(reset_secs));
}

/// The submit body: JSON whatever the Content-Type says (curl's `-d` labels JSON as a form),
/// or a urlencoded form when the body is not a JSON object or array.
#[doc(hidden)]
pub fn parse_submit_body(body: &[u8]) -> Result<(Vec<String>, Option<String>), BaishanError> {
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
    kind: Kind,
    body: Body,
    now: Timestamp,
) -> Result<Value, BaishanError> {
    let body = read_body(body).await.map_err(BaishanError::bad)?;
    let (urls, kind_text) = parse_submit_body(&body)?;
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
        (Kind::Refresh, ItemType::Url | ItemType::Tag | ItemType::Regex) => MAX_REFRESH_URLS,
    };
    if urls.len() > max {
        return Err(BaishanError::bad(format!(
            "too many urls: {} in one request, at most {max} for this type",
            urls.len()
        )));
    }
    let urls = urls.into_iter().map(|u| SubmittedUrl::now(u, item_type)).collect();
    let submission = Submission {
        urls: state.service.validate(&credential.account, kind.into(), urls, now),
        operator: credential.operator.clone(),
        dialect: "baishan",
        address: credential.address.clone(),
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
        Err(SubmitError::Quota { bucket, limit, remaining }) => {
            Err(BaishanError::bad(super::quota_exceeded(bucket, "refresh", limit, remaining)))
        }
        Err(SubmitError::Store(e)) => Err(e.into()),
        Err(SubmitError::IdempotencyConflict) => Err(BaishanError::bad("idempotency conflict")),
    }
}

async fn quota(state: &AppState, credential: &Credential, now: Timestamp) -> Result<Value, BaishanError> {
    let q = state.service.quota(&credential.account, QuotaBucket::PrefetchUrl, now).await?;
    Ok(json!({"url_quota": q.limit, "url_remain": q.remaining}))
}

#[cfg(test)]
mod tests {
    use super::*;

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
