//! cachectl's own API under `/api/v1` (docs/native-api.md): what the vendor dialects cannot
//! express — per-node results, failure reasons, filters and cursors, cancel and retry,
//! refresh-then-prefetch, idempotent submits, a live progress stream and the webhook delivery
//! log. Described by an OpenAPI 3.1 document generated from the handlers' types. This module
//! holds the error type, the [`Bearer`] and [`OwnedTask`] extractors, the request types and the
//! routes; the handlers are in [`tasks`]. A thin adapter over `Service`.

pub mod nodes;
pub mod tasks;

use super::AppState;
use super::admin;
use crate::auth::Credential;
use crate::clock::now_ms;
use axum::Json;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cachectl_core::{TaskId, TaskSummary, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

pub use crate::wire::views::*;
pub use tasks::{cancel, deliveries, events, get_task, list_items, list_tasks, retry, submit};

/// The error body of every failed native request.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A stable code and a sentence.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// One of `unauthorized`, `invalid_argument`, `not_found`, `conflict`, `quota_exceeded`,
    /// `rate_limited`, `method_not_allowed`, `unavailable`.
    pub code: &'static str,
    /// What is wrong, in one sentence.
    pub message: String,
}

/// A native API error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    pub(crate) fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("no such {what}"))
    }
}

impl From<cachectl_core::StoreError> for ApiError {
    fn from(e: cachectl_core::StoreError) -> Self {
        tracing::error!(error = %e, "Store failed while answering a native request.");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the service is temporarily unavailable, retry later")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, Json(ErrorBody { error: ErrorDetail { code: self.code, message: self.message } }))
                .into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert("retry-after", HeaderValue::from(secs));
        }
        response
    }
}

/// 404 for unknown paths under `/api/v1`.
pub async fn not_found() -> Response {
    ApiError::not_found("API endpoint").into_response()
}

/// 405 for a method an endpoint does not take.
pub async fn method_not_allowed() -> Response {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this endpoint does not take this method")
        .into_response()
}

/// The `Api-Id` the native endpoints count requests under (per token, per minute).
const NATIVE_API_ID: u32 = 1;

/// A caller that presented `Authorization: Bearer <token>` with a known token, counted against
/// the account's per-minute limit (429 with `Retry-After` beyond it).
pub struct Bearer(pub Credential);

impl FromRequestParts<AppState> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing Authorization: Bearer <token>")
            })?;
        let credential = state
            .directory
            .current()
            .token(token, now_ms())
            .map(|e| e.credential.clone().presented(parts))
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token"))?;
        let limit = credential.account.rate_limit_per_minute;
        let decision = state.service.admit(token, NATIVE_API_ID, limit, now_ms()).await;
        if !decision.allowed {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("rate limit of {limit} requests per minute exceeded; retry in {} seconds", decision.reset_secs),
            );
            e.retry_after = Some(decision.reset_secs);
            return Err(e);
        }
        Ok(Self(credential))
    }
}

/// A task of the caller's account, named by the `{id}` of the path: 404 for an id that is not a
/// positive number or not a task of this account (another account's tasks do not exist here).
pub struct OwnedTask {
    /// The caller.
    pub credential: Credential,
    /// The task as it was when the request arrived.
    pub task: TaskSummary,
}

impl FromRequestParts<AppState> for OwnedTask {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Bearer(credential) = Bearer::from_request_parts(parts, state).await?;
        let Path(id) =
            Path::<String>::from_request_parts(parts, state).await.map_err(|_| ApiError::not_found("task"))?;
        let id = TaskId::parse(&id).ok_or_else(|| ApiError::not_found("task"))?;
        let task = state.service.task(&credential.account, id).await?.ok_or_else(|| ApiError::not_found("task"))?;
        Ok(Self { credential, task })
    }
}

fn parse_time(name: &str, text: &str) -> Result<Timestamp, ApiError> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|t| Timestamp::from_millis(t.timestamp_millis()))
        .map_err(|_| ApiError::invalid(format!("{name} must be an RFC 3339 time such as 2025-11-10T02:00:00Z")))
}

/// A submission.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// `refresh` (default), `prefetch` or `refresh_then_prefetch`.
    #[serde(default)]
    pub kind: Option<String>,
    /// The URLs (at most 1,000; 100 directories). Not with `type` `tag` or `regex`.
    #[serde(default)]
    pub urls: Vec<String>,
    /// `url` (default), `dir`, `tag` or `regex` (the last three for refresh only).
    #[serde(default, rename = "type")]
    pub item_type: Option<String>,
    /// `tag` and `regex`: the host whose objects are purged, one of the account's domains
    /// (lowercase, no port).
    #[serde(default)]
    pub host: Option<String>,
    /// `tag`: the cache tags (1 to 256), each visible ASCII without blanks or commas, at most
    /// 1,024 bytes; every object of `host` the origin tagged with one of them is purged.
    #[serde(default)]
    pub tags: Vec<String>,
    /// `regex`: the regexes (1 to 10) over the path and query of `host`'s objects, at most
    /// 1,024 bytes each, in the dialect of docs/native-api.md.
    #[serde(default)]
    pub regexes: Vec<String>,
    /// `regex`: required for a regex that matches every path of the host.
    #[serde(default)]
    pub confirm_all: bool,
    /// A soft purge (refresh of `url` or `tag` only): the objects are marked stale and served
    /// stale while one request refetches them, instead of being removed.
    #[serde(default)]
    pub soft: bool,
}

/// Filters of `GET /api/v1/tasks`.
#[derive(Debug, Deserialize, IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct TaskQuery {
    /// `refresh`, `prefetch` or `refresh_then_prefetch`.
    pub kind: Option<String>,
    /// `running`, `completed` or `failed`.
    pub status: Option<String>,
    /// Tasks with an item of this host (or a name under it), in any case.
    pub domain: Option<String>,
    /// Tasks with an item of this exact URL.
    pub url: Option<String>,
    /// Created at or after (RFC 3339).
    pub since: Option<String>,
    /// Created before (RFC 3339).
    pub until: Option<String>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1–500 (default 50).
    pub limit: Option<u32>,
}

/// Filters of `GET /api/v1/items`.
#[derive(Debug, Deserialize, IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct ItemQuery {
    /// Items of this task.
    pub task_id: Option<i64>,
    /// `refresh` or `prefetch`.
    pub kind: Option<String>,
    /// `waiting`, `processing`, `completed` or `failed`.
    pub status: Option<String>,
    /// This host or names under it, in any case.
    pub domain: Option<String>,
    /// This exact URL.
    pub url: Option<String>,
    /// Created at or after (RFC 3339).
    pub since: Option<String>,
    /// Created before (RFC 3339).
    pub until: Option<String>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1–500 (default 50).
    pub limit: Option<u32>,
}

/// Parses a query string into `T`; an empty value means absent.
#[doc(hidden)]
pub fn query<T: for<'de> Deserialize<'de> + Default>(raw: Option<&str>) -> Result<T, ApiError> {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let encoded = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
    serde_urlencoded::from_str(&encoded).map_err(|e| ApiError::invalid(format!("invalid query parameter: {e}")))
}

fn limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(50),
        Some(n) if (1..=500).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(format!("limit must be from 1 to 500, not {n}"))),
    }
}

fn cursor(cursor: Option<&str>) -> Result<Option<i64>, ApiError> {
    cursor
        .map(|c| {
            c.strip_prefix('c')
                .and_then(|n| n.parse::<i64>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| ApiError::invalid("cursor is malformed: pass next_cursor back as it is"))
        })
        .transpose()
}

/// The `domain` filter as the store matches it: a host name, in lower case like stored hosts.
fn check_domain(domain: Option<&str>) -> Result<Option<String>, ApiError> {
    match domain.map(cachectl_core::policy::DomainPattern::parse) {
        None => Ok(None),
        Some(Ok(cachectl_core::policy::DomainPattern::Exact(name))) => Ok(Some(name)),
        Some(_) => Err(ApiError::invalid("domain must be a host name such as www.example.com")),
    }
}

/// The OpenAPI document of the native API.
#[derive(OpenApi)]
#[openapi(
    info(title = "cachectl native API", description = "cachectl's own API: tasks, items, per-node results, progress, webhooks."),
    paths(tasks::submit, tasks::list_tasks, tasks::get_task, tasks::list_items, tasks::cancel, tasks::retry, tasks::deliveries, tasks::events, nodes::list_nodes,
        admin::list_accounts, admin::create_account, admin::get_account, admin::change_account, admin::list_credentials, admin::issue_token, admin::issue_access_key, admin::rotate, admin::revoke,
        admin::list_edges, admin::add_edge, admin::drain_edge, admin::activate_edge, admin::remove_edge, admin::audit_log),
    components(schemas(ErrorBody, ErrorDetail, TaskView, CountsView, NodeView, ItemView, NodeProgress, TaskDetail, SubmitBody, Submitted, Rejected, TaskPage, ItemPage, Changed, DeliveryLog, DeliveryView, nodes::NodeInfo, nodes::NodeList,
        admin::QuotaBody, admin::NewAccount, admin::AccountChange, admin::AccountView, admin::QuotaView, admin::AccountList, admin::CredentialView, admin::CredentialList, admin::IssueBody, admin::RotateBody, admin::Issued,
        admin::NewEdge, admin::EdgeView, admin::EdgeList, admin::AuditView, admin::AuditPage, crate::directory::Source)),
    modifiers(&BearerAuth),
    tags((name = "tasks", description = "Submit and follow refresh and prefetch tasks"), (name = "nodes", description = "The cache nodes that serve the caller's domains, and their agents' health"),
        (name = "admin", description = "Accounts, credentials, edges and the audit log, for admin tokens only (docs/administration.md)"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes of the native API, its OpenAPI document at `/api/v1/openapi.json` and a
/// browsable page at `/api/v1/docs`.
pub fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/api/v1/tasks", get(list_tasks).post(submit))
        .route("/api/v1/tasks/{id}", get(get_task))
        .route("/api/v1/tasks/{id}/cancel", post(cancel))
        .route("/api/v1/tasks/{id}/retry", post(retry))
        .route("/api/v1/tasks/{id}/events", get(events))
        .route("/api/v1/tasks/{id}/webhooks", get(deliveries))
        .route("/api/v1/items", get(list_items))
        .route("/api/v1/nodes", get(nodes::list_nodes))
        .method_not_allowed_fallback(method_not_allowed)
        .merge(utoipa_swagger_ui::SwaggerUi::new("/api/v1/docs").url("/api/v1/openapi.json", ApiDoc::openapi()))
}
