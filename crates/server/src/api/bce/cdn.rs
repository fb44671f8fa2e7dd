//! The classic Baidu AI Cloud CDN dialect (CONTRACT §5): `/v2/cache/purge`, `/v2/cache/prefetch`
//! (shared with the Baishan dialect; the auth scheme decides), `/v2/cache/quota` and
//! `/v2/cache/records`. Like GEO without `site`: the URL's host picks the account's domain.

use super::{BceError, Params, call, list_records, method_not_allowed, parse_tasks, submit};
use crate::api::{AppState, now_ms};
use crate::config::Credential;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use cachectl_core::{Kind, QuotaBucket, RecordQuery};
use serde_json::json;

/// `POST|GET /v2/cache/purge`
pub async fn purge(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    endpoint(state, Kind::Refresh, method, uri, headers, body).await
}

/// `POST|GET /v2/cache/prefetch` with a BCE signature.
pub async fn prefetch(state: AppState, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    endpoint(state, Kind::Prefetch, method, uri, headers, body).await
}

async fn endpoint(state: AppState, kind: Kind, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    match method {
        Method::POST => {
            let state = &state;
            call(state, method, uri, headers, body, StatusCode::CREATED, |credential, _, body| async move {
                let (_, specs) = parse_tasks(&body, kind)?;
                submit(state, &credential, kind, specs, "cdn").await
            })
            .await
        }
        Method::GET | Method::HEAD => {
            call(&state, method, uri, headers, body, StatusCode::OK, |credential, params, _| {
                list(&state, credential, kind, params, false)
            })
            .await
        }
        _ => method_not_allowed(&state),
    }
}

/// `GET /v2/cache/quota`
pub async fn quota(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !matches!(method, Method::GET | Method::HEAD) {
        return method_not_allowed(&state);
    }
    let state = &state;
    call(state, method, uri, headers, body, StatusCode::OK, |credential, _, _| async move {
        let now = now_ms();
        let account = &credential.account;
        let url = state.service.quota(account, QuotaBucket::RefreshUrl, now).await?;
        let dir = state.service.quota(account, QuotaBucket::RefreshDir, now).await?;
        let prefetch = state.service.quota(account, QuotaBucket::PrefetchUrl, now).await?;
        Ok(json!({
            "urlQuota": url.limit, "urlRemain": url.remaining,
            "dirQuota": dir.limit, "dirRemain": dir.remaining,
            "prefetchQuota": prefetch.limit, "prefetchRemain": prefetch.remaining,
        }))
    })
    .await
}

/// `GET /v2/cache/records?type=purge|prefetch&startTime&endTime&url&marker`
pub async fn records(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !matches!(method, Method::GET | Method::HEAD) {
        return method_not_allowed(&state);
    }
    let state = &state;
    call(state, method, uri, headers, body, StatusCode::OK, |credential, params, _| async move {
        let kind = match params.get("type") {
            None | Some("purge") => Kind::Refresh,
            Some("prefetch") => Kind::Prefetch,
            Some(other) => {
                return Err(BceError::invalid(format!("type must be \"purge\" or \"prefetch\", not {other:?}")));
            }
        };
        list(state, credential, kind, params, true).await
    })
    .await
}

async fn list(
    state: &AppState,
    credential: Credential,
    kind: Kind,
    params: Params,
    with_reason: bool,
) -> Result<super::RecordPage, BceError> {
    let url = params.get("url").map(|u| {
        url::Url::parse(u.trim()).map_or_else(
            |_| u.to_owned(),
            |mut parsed| {
                parsed.set_fragment(None);
                parsed.to_string()
            },
        )
    });
    let filters = RecordQuery {
        account: "",
        kind,
        task_id: None,
        from: 0,
        to: 0,
        site: None,
        url: url.as_deref(),
        item_type: None,
        after: None,
        limit: 0,
    };
    list_records(state, &credential, filters, &params, with_reason).await
}
