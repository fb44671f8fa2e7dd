//! The Baidu AI Cloud GEO dialect (docs/baidu.md): `/v2/geo/cache/purge` and `/v2/geo/cache/prefetch`,
//! submit with a `site`, list by site, task id, time window, type and marker.

use super::{
    BceCaller, BceError, BceOk, Filters, Params, RecordPage, TaskSpec, body, list_records, parse_tasks, submit,
};
use crate::api::AppState;
use crate::auth::Credential;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use cachectl_core::{ItemType, Kind};
use serde_json::Value;

/// `POST /v2/geo/cache/purge`
pub async fn submit_purge(
    State(state): State<AppState>,
    BceCaller(credential): BceCaller,
    raw: Body,
) -> Result<BceOk<Value>, BceError> {
    submit_site(&state, credential, Kind::Refresh, body(raw).await?).await
}

/// `POST /v2/geo/cache/prefetch`
pub async fn submit_prefetch(
    State(state): State<AppState>,
    BceCaller(credential): BceCaller,
    raw: Body,
) -> Result<BceOk<Value>, BceError> {
    submit_site(&state, credential, Kind::Prefetch, body(raw).await?).await
}

/// `GET /v2/geo/cache/purge`
pub async fn list_purges(
    State(state): State<AppState>,
    BceCaller(credential): BceCaller,
    uri: Uri,
) -> Result<BceOk<RecordPage>, BceError> {
    list(&state, credential, Kind::Refresh, Params::new(&uri)).await.map(|p| BceOk(StatusCode::OK, p))
}

/// `GET /v2/geo/cache/prefetch`
pub async fn list_prefetches(
    State(state): State<AppState>,
    BceCaller(credential): BceCaller,
    uri: Uri,
) -> Result<BceOk<RecordPage>, BceError> {
    list(&state, credential, Kind::Prefetch, Params::new(&uri)).await.map(|p| BceOk(StatusCode::OK, p))
}

/// Checks that `site` is one of the account's domains (or a name under a wildcard domain).
fn check_site(credential: &Credential, site: &str) -> Result<String, BceError> {
    let site = site.trim().to_ascii_lowercase();
    if site.is_empty() {
        return Err(BceError::invalid("site is required"));
    }
    if !credential.account.domains.iter().any(|d| d.covers_site(&site)) {
        return Err(BceError::invalid(format!("site {site:?} is not one of your domains")));
    }
    Ok(site)
}

fn under_site(host: &str, site: &str) -> bool {
    host == site
        || (host.len() > site.len() && host.ends_with(site) && host.as_bytes()[host.len() - site.len() - 1] == b'.')
}

async fn submit_site(
    state: &AppState,
    credential: Credential,
    kind: Kind,
    body: bytes::Bytes,
) -> Result<BceOk<Value>, BceError> {
    let (map, specs) = parse_tasks(&body, kind)?;
    let site = match map.get("site") {
        Some(Value::String(s)) => check_site(&credential, s)?,
        _ => return Err(BceError::invalid("site is required and must be a string")),
    };
    for TaskSpec { url, .. } in &specs {
        let host = url::Url::parse(url.trim()).ok().and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        if !host.is_some_and(|h| under_site(&h, &site)) {
            return Err(BceError::invalid(format!("{url}: the URL's host must be the site {site} or a name under it")));
        }
    }
    submit(state, &credential, kind, specs, "geo").await
}

async fn list(state: &AppState, credential: Credential, kind: Kind, params: Params) -> Result<RecordPage, BceError> {
    let site = check_site(&credential, params.get("site").unwrap_or(""))?;
    let item_type = match (kind, params.get("type")) {
        (_, None) => None,
        (Kind::Refresh, Some("url")) => Some(ItemType::Url),
        (Kind::Refresh, Some("directory")) => Some(ItemType::Dir),
        (_, Some(other)) => {
            return Err(BceError::invalid(format!("type must be \"url\" or \"directory\", not {other:?}")));
        }
    };
    let filters = Filters { site: Some(&site), item_type, url: None };
    list_records(state, &credential, kind, filters, &params, false).await
}
