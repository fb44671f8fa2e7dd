//! The classic Baidu AI Cloud CDN dialect (docs/baidu.md): `/v2/cache/purge`, `/v2/cache/prefetch`
//! (shared with the Baishan dialect; the auth scheme decides), `/v2/cache/quota` and
//! `/v2/cache/records`. Like GEO without `site`: the URL's host picks the account's domain.

use super::{
    BceCaller, BceError, BceOk, Filters, Params, RecordPage, body, list_records, method_not_allowed, parse_tasks,
    submit,
};
use crate::api::AppState;
use crate::auth::Credential;
use crate::clock::now_ms;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::routing::{MethodRouter, get};
use cachectl_core::{Kind, QuotaBucket};
use serde_json::{Value, json};

/// `/v2/cache/prefetch` as this dialect answers it (with a BCE signature).
pub fn prefetch_routes() -> MethodRouter<AppState> {
    get(list_prefetches).post(submit_prefetch).fallback(method_not_allowed)
}

/// `POST /v2/cache/purge`
pub async fn submit_purge(
    State(state): State<AppState>,
    BceCaller(credential): BceCaller,
    raw: Body,
) -> Result<BceOk<Value>, BceError> {
    let (_, specs) = parse_tasks(&body(raw).await?, Kind::Refresh)?;
    submit(&state, &credential, Kind::Refresh, specs, "cdn").await
}

/// `POST /v2/cache/prefetch` with a BCE signature.
pub async fn submit_prefetch(
    State(state): State<AppState>,
    BceCaller(credential): BceCaller,
    raw: Body,
) -> Result<BceOk<Value>, BceError> {
    let (_, specs) = parse_tasks(&body(raw).await?, Kind::Prefetch)?;
    submit(&state, &credential, Kind::Prefetch, specs, "cdn").await
}

/// `GET /v2/cache/purge`
pub async fn list_purges(
    State(state): State<AppState>,
    BceCaller(credential): BceCaller,
    uri: Uri,
) -> Result<BceOk<RecordPage>, BceError> {
    list(&state, credential, Kind::Refresh, Params::new(&uri), false).await.map(|p| BceOk(StatusCode::OK, p))
}

/// `GET /v2/cache/prefetch` with a BCE signature.
pub async fn list_prefetches(
    State(state): State<AppState>,
    BceCaller(credential): BceCaller,
    uri: Uri,
) -> Result<BceOk<RecordPage>, BceError> {
    list(&state, credential, Kind::Prefetch, Params::new(&uri), false).await.map(|p| BceOk(StatusCode::OK, p))
}

/// `GET /v2/cache/quota`
pub async fn quota(State(state): State<AppState>, BceCaller(credential): BceCaller) -> Result<BceOk<Value>, BceError> {
    let now = now_ms();
    let account = &credential.account;
    let url = state.service.quota(account, QuotaBucket::RefreshUrl, now).await?;
    let dir = state.service.quota(account, QuotaBucket::RefreshDir, now).await?;
    let prefetch = state.service.quota(account, QuotaBucket::PrefetchUrl, now).await?;
    Ok(BceOk(
        StatusCode::OK,
        json!({
            "urlQuota": url.limit, "urlRemain": url.remaining,
            "dirQuota": dir.limit, "dirRemain": dir.remaining,
            "prefetchQuota": prefetch.limit, "prefetchRemain": prefetch.remaining,
        }),
    ))
}

/// `GET /v2/cache/records?type=purge|prefetch&startTime&endTime&url&marker`
pub async fn records(
    State(state): State<AppState>,
    BceCaller(credential): BceCaller,
    uri: Uri,
) -> Result<BceOk<RecordPage>, BceError> {
    let params = Params::new(&uri);
    let kind = match params.get("type") {
        None | Some("purge") => Kind::Refresh,
        Some("prefetch") => Kind::Prefetch,
        Some(other) => {
            return Err(BceError::invalid(format!("type must be \"purge\" or \"prefetch\", not {other:?}")));
        }
    };
    list(&state, credential, kind, params, true).await.map(|p| BceOk(StatusCode::OK, p))
}

async fn list(
    state: &AppState,
    credential: Credential,
    kind: Kind,
    params: Params,
    with_reason: bool,
) -> Result<RecordPage, BceError> {
    let url = params.get("url").map(|u| {
        url::Url::parse(u.trim()).map_or_else(
            |_| u.to_owned(),
            |mut parsed| {
                parsed.set_fragment(None);
                parsed.to_string()
            },
        )
    });
    let filters = Filters { url: url.as_deref(), ..Filters::default() };
    list_records(state, &credential, kind, filters, &params, with_reason).await
}
