//! The HTTP surface: one sub-router per dialect (`baishan`, `bce`, `native`) plus health and
//! metrics, assembled here under one layer ([`observe`]) that gives every request its tracing
//! span and counts it. Each dialect authenticates through its own extractor and renders its own
//! errors; dialect rules live in the dialect modules, which call `Service` only.

pub mod admin;
pub mod baishan;
pub mod bce;
pub mod native;
mod observe;

use crate::config::Settings;
use crate::metrics::Metrics;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use cachectl_core::QuotaBucket;
use cachectl_core::service::Service;
use std::sync::Arc;
use tower::ServiceExt as _;

pub use crate::clock::now_ms;
pub use observe::Dialect;

/// The largest request body accepted (1,000 URLs of the longest accepted length fit).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The domain service.
    pub service: Service,
    /// The validated configuration.
    pub settings: Arc<Settings>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The bus to cache-host agents, when configured.
    pub bus: Option<Arc<crate::bus::Bus>>,
    /// Accounts, credentials and edges as they are now (the file merged with the admin API's).
    pub directory: Arc<crate::directory::DirectoryHandle>,
    /// The store's admin part (the admin API writes it; the service reads tasks through `service`).
    pub admin_store: Arc<dyn cachectl_core::admin::DirectoryStore>,
    /// The progress streams each account holds open (`[server] max_streams_per_account`).
    pub streams: Arc<crate::streams::StreamSlots>,
}

impl AppState {
    /// The store's admin part.
    #[must_use]
    pub fn directory_store(&self) -> &dyn cachectl_core::admin::DirectoryStore {
        self.admin_store.as_ref()
    }
}

/// The whole router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v2/cache/prefetch", any(shared_prefetch))
        .merge(baishan::routes())
        .merge(bce::routes())
        .merge(native::routes())
        .merge(admin::routes())
        .merge(crate::console::routes(Arc::new(crate::console::session::Sessions::default())))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.metrics.clone(), observe::observe))
        .with_state(state)
}

/// Reads a request body up to `MAX_BODY_BYTES` (the listener bounds how long it may take).
///
/// # Errors
/// A sentence for the dialect's 400: too large, too slow, or cut short.
pub async fn read_body(body: Body) -> Result<bytes::Bytes, String> {
    axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|e| {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(error) = cause {
            if error.is::<crate::http::BodyTimeout>() {
                return error.to_string();
            }
            if error.is::<http_body_util::LengthLimitError>() {
                return format!("the request body is larger than {} MiB", MAX_BODY_BYTES / 1024 / 1024);
            }
            cause = error.source();
        }
        format!("the request body was cut short ({e})")
    })
}

/// The sentence of a refused submission over a daily quota; `refresh` is the dialect's word for
/// a refresh ("refresh", "purge").
pub(crate) fn quota_exceeded(bucket: QuotaBucket, refresh: &str, limit: u64, remaining: u64) -> String {
    let what = match bucket {
        QuotaBucket::RefreshUrl => format!("{refresh} URL"),
        QuotaBucket::RefreshDir => format!("{refresh} directory"),
        QuotaBucket::PrefetchUrl => "prefetch URL".to_owned(),
        QuotaBucket::RefreshTag => format!("{refresh} tag"),
        QuotaBucket::RefreshRegex => format!("{refresh} regex"),
    };
    format!("daily {what} quota exceeded: {remaining} of {limit} left today")
}

/// `/v2/cache/prefetch` belongs to two dialects: a BCE signature makes it the Baidu CDN one,
/// anything else the Baishan one.
async fn shared_prefetch(State(state): State<AppState>, request: Request) -> Response {
    let routes = if bce::is_bce(request.headers()) { bce::cdn::prefetch_routes() } else { baishan::prefetch_routes() };
    routes.with_state(state).oneshot(request).await.unwrap_or_else(|never| match never {})
}

/// Unknown paths answer in the format of the dialect the request looks like.
async fn not_found(uri: Uri, headers: HeaderMap) -> Response {
    match Dialect::of(&uri, &headers) {
        Dialect::Native | Dialect::Admin => native::not_found().await,
        Dialect::Console => crate::console::not_found().await,
        Dialect::Bce => bce::not_found(),
        Dialect::Baishan | Dialect::Operations => baishan::not_found().await,
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.service.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "Readiness check failed.");
            (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.refresh(&state).await;
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
