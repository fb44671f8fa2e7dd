//! cachectl's own API under `/api/v1` (CONTRACT §7): what the vendor dialects cannot express —
//! per-node results, failure reasons, filters and cursors, cancel and retry, refresh-then-
//! prefetch, idempotent submits, a live progress stream and the webhook delivery log. Described
//! by an OpenAPI 3.1 document generated from these handlers' types. A thin adapter over `Service`.

use super::{AppState, now_ms, read_body};
use crate::config::Credential;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use cachectl_core::service::{Submission, SubmitError, SubmittedUrl};
use cachectl_core::{
    Delivery, Idempotency, Item, ItemFilter, ItemStatus, ItemType, Kind, Millis, NodeResult, StatusCounts, TaskFilter,
    TaskKind, TaskState, TaskSummary,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;
use utoipa::{IntoParams, OpenApi, ToSchema};

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
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    fn not_found(what: &str) -> Self {
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

/// The `Api-Id`s the native endpoints count requests under (per token, per minute).
const NATIVE_API_ID: u32 = 1;

/// Authenticates `Authorization: Bearer <token>` and counts the request against the account's
/// per-minute limit.
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Credential, ApiError> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing Authorization: Bearer <token>")
        })?;
    let credential = state
        .settings
        .tokens
        .get(token)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token"))?;
    let limit = credential.account.rate_limit_per_minute;
    let decision =
        state.limiter.check_shared(state.service.store().as_ref(), token, NATIVE_API_ID, limit, now_ms()).await;
    if !decision.allowed {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("rate limit of {limit} requests per minute exceeded; retry in {} seconds", decision.reset_secs),
        );
        e.retry_after = Some(decision.reset_secs);
        return Err(e);
    }
    Ok(credential)
}

/// RFC 3339 with milliseconds, UTC.
fn time(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

fn parse_time(name: &str, text: &str) -> Result<Millis, ApiError> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|_| ApiError::invalid(format!("{name} must be an RFC 3339 time such as 2025-11-10T02:00:00Z")))
}

/// A task as the native API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    /// Task id.
    pub id: i64,
    /// `refresh`, `prefetch` or `refresh_then_prefetch`.
    pub kind: String,
    /// `running`, `completed` or `failed`.
    pub state: String,
    /// Who submitted it (token name or access key id).
    pub operator: String,
    /// The API it came through.
    pub dialect: String,
    /// Submission time.
    pub created_at: String,
    /// When its last item became final.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Items by status.
    pub counts: CountsView,
    /// Final items ÷ items × 100, rounded down.
    pub progress: u64,
}

/// Items by status.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq, Clone, Copy)]
pub struct CountsView {
    /// Not yet sent.
    pub waiting: u64,
    /// Being executed.
    pub processing: u64,
    /// Done on every node.
    pub completed: u64,
    /// Failed (or cancelled).
    pub failed: u64,
    /// All items.
    pub total: u64,
}

impl From<StatusCounts> for CountsView {
    fn from(c: StatusCounts) -> Self {
        Self {
            waiting: c.waiting,
            processing: c.processing,
            completed: c.completed,
            failed: c.failed,
            total: c.total(),
        }
    }
}

impl From<&TaskSummary> for TaskView {
    fn from(t: &TaskSummary) -> Self {
        let counts = CountsView::from(t.counts);
        let done = counts.completed + counts.failed;
        Self {
            id: t.id,
            kind: t.kind.as_str().to_owned(),
            state: t.state().as_str().to_owned(),
            operator: t.operator.clone(),
            dialect: t.dialect.clone(),
            created_at: time(t.created_at),
            finished_at: t.finished_at.map(time),
            progress: (done * 100).checked_div(counts.total).unwrap_or(100),
            counts,
        }
    }
}

/// What one node did with one item.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    /// The node's configured name.
    pub node: String,
    /// `pending`, `succeeded` or `failed`.
    pub state: String,
    /// Requests sent.
    pub attempts: u32,
    /// The node's last HTTP status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// The last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When this result last changed.
    pub updated_at: String,
    /// The cachectl instance that produced it.
    pub instance: String,
}

impl From<&NodeResult> for NodeView {
    fn from(n: &NodeResult) -> Self {
        Self {
            node: n.node.clone(),
            state: n.state.as_str().to_owned(),
            attempts: n.attempts,
            status_code: n.status_code,
            error: n.error.clone(),
            updated_at: time(n.updated_at),
            instance: n.instance.clone(),
        }
    }
}

/// One item with its per-node results.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ItemView {
    /// Item id.
    pub id: i64,
    /// Its task.
    pub task_id: i64,
    /// `refresh` or `prefetch`.
    pub kind: String,
    /// The URL.
    pub url: String,
    /// `url` or `dir`.
    #[serde(rename = "type")]
    pub item_type: String,
    /// `waiting`, `processing`, `completed` or `failed`.
    pub status: String,
    /// Nodes done ÷ nodes × 100.
    pub progress: u8,
    /// Submission time.
    pub created_at: String,
    /// When it became final.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Why it failed: the node and its last error, or `cancelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The earlier identical waiting item it was coalesced with (it mirrors that item).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follows: Option<i64>,
    /// The refresh item this prefetch waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<i64>,
    /// Per-node results (in task views).
    #[serde(default)]
    pub nodes: Vec<NodeView>,
}

fn item_view(item: &Item, nodes: Vec<NodeView>) -> ItemView {
    ItemView {
        id: item.id,
        task_id: item.task_id,
        kind: item.kind.as_str().to_owned(),
        url: item.url.clone(),
        item_type: item.item_type.as_str().to_owned(),
        status: item.status.as_str().to_owned(),
        progress: item.progress,
        created_at: time(item.created_at),
        finished_at: item.finished_at.map(time),
        reason: item.reason.clone(),
        follows: item.follows,
        depends_on: item.depends_on,
        nodes,
    }
}

/// Progress of a task on one node.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeProgress {
    /// The node.
    pub node: String,
    /// Items done on it (succeeded or failed).
    pub done: u64,
    /// Items that failed on it.
    pub failed: u64,
    /// Items with a result on it so far.
    pub seen: u64,
}

/// A task with its items and their per-node results.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskDetail {
    /// The task.
    pub task: TaskView,
    /// Progress per node.
    pub nodes: Vec<NodeProgress>,
    /// Its items, oldest first.
    pub items: Vec<ItemView>,
}

/// A submission.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// `refresh` (default), `prefetch` or `refresh_then_prefetch`.
    #[serde(default)]
    pub kind: Option<String>,
    /// The URLs (at most 1,000; 100 directories).
    pub urls: Vec<String>,
    /// `url` (default) or `dir` (refresh only).
    #[serde(default, rename = "type")]
    pub item_type: Option<String>,
}

/// The answer to a submission.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Submitted {
    /// The task.
    pub task: TaskView,
    /// URLs refused, with why.
    pub rejected: Vec<Rejected>,
}

/// A refused URL.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Rejected {
    /// The URL as sent.
    pub url: String,
    /// Why.
    pub reason: String,
}

/// A page of tasks.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskPage {
    /// Newest first.
    pub tasks: Vec<TaskView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A page of items.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ItemPage {
    /// Newest first.
    pub items: Vec<ItemView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The answer to cancel and retry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Changed {
    /// How many items were cancelled or requeued.
    pub changed: u64,
    /// The task afterwards.
    pub task: TaskView,
}

/// The webhook deliveries of a task.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryLog {
    /// Every attempt, oldest first.
    pub deliveries: Vec<DeliveryView>,
}

/// One delivery attempt.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryView {
    /// The receiver.
    pub url: String,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Its HTTP status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When.
    pub at: String,
}

impl From<&Delivery> for DeliveryView {
    fn from(d: &Delivery) -> Self {
        Self {
            url: d.url.clone(),
            attempt: d.attempt,
            status_code: d.status_code,
            error: d.error.clone(),
            at: time(d.at),
        }
    }
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
fn query<T: for<'de> Deserialize<'de> + Default>(raw: Option<&str>) -> Result<T, ApiError> {
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

/// Submit a refresh, prefetch or refresh-then-prefetch task.
#[utoipa::path(
    post,
    path = "/api/v1/tasks",
    request_body = SubmitBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Same key and body return the original task; same key, another body: 409")),
    responses(
        (status = 429, description = "Rate limited; see Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
        (status = 201, description = "Stored; the items will be executed", body = Submitted),
        (status = 400, description = "Invalid request, no URL accepted, or a quota exceeded", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 409, description = "Idempotency-Key reused with another body", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn submit(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let credential = authenticate(&state, &headers).await?;
    let body = read_body(body).await.map_err(ApiError::invalid)?;
    let request: SubmitBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the request body is not a valid submission: {e}")))?;
    let kind = match request.kind.as_deref() {
        None => TaskKind::Refresh,
        Some(k) => {
            k.parse().map_err(|_| ApiError::invalid("kind must be refresh, prefetch or refresh_then_prefetch"))?
        }
    };
    let item_type = match request.item_type.as_deref() {
        None | Some("url") => ItemType::Url,
        Some("dir") if kind == TaskKind::Refresh => ItemType::Dir,
        Some("dir") => return Err(ApiError::invalid("type dir is only for refresh tasks")),
        Some(_) => return Err(ApiError::invalid("type must be url or dir")),
    };
    let max = if item_type == ItemType::Dir { 100 } else { 1000 };
    if request.urls.is_empty() || request.urls.len() > max {
        return Err(ApiError::invalid(format!("urls must hold from 1 to {max} URLs")));
    }
    let idempotency = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(key)) if !key.trim().is_empty() && key.len() <= 255 => {
            Some(Idempotency { key: key.trim().to_owned(), request_hash: hex::encode(Sha256::digest(&body)) })
        }
        Some(_) => return Err(ApiError::invalid("Idempotency-Key must be 1 to 255 visible characters")),
    };
    let submission = Submission {
        kind,
        urls: request.urls.into_iter().map(|u| SubmittedUrl::now(u, item_type)).collect(),
        operator: credential.operator.clone(),
        dialect: "native",
        idempotency,
    };
    let now = now_ms();
    let done = match state.service.submit(&credential.account, submission, now).await {
        Ok(done) => done,
        Err(SubmitError::NothingAccepted { rejected }) => {
            let first = rejected.first().map(|(u, e)| format!(" ({u}: {e})")).unwrap_or_default();
            return Err(ApiError::invalid(format!("no URL was accepted{first}")));
        }
        Err(SubmitError::Quota { bucket, limit, remaining }) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "quota_exceeded",
                format!("daily {bucket} quota exceeded: {remaining} of {limit} left today"),
            ));
        }
        Err(SubmitError::IdempotencyConflict) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "this Idempotency-Key was used with a different request",
            ));
        }
        Err(SubmitError::Store(e)) => return Err(e.into()),
    };
    state.metrics.submitted(
        "native",
        if kind == TaskKind::Prefetch { Kind::Prefetch } else { Kind::Refresh },
        done.accepted,
    );
    let task =
        state.service.task(&credential.account, done.task_id).await?.ok_or_else(|| ApiError::not_found("task"))?;
    let rejected = done.rejected.into_iter().map(|(url, e)| Rejected { url, reason: e.to_string() }).collect();
    Ok((StatusCode::CREATED, Json(Submitted { task: TaskView::from(&task), rejected })).into_response())
}

/// List tasks, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/tasks",
    params(TaskQuery),
    responses(
        (status = 429, description = "Rate limited; see Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),(status = 200, body = TaskPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn list_tasks(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<TaskPage>, ApiError> {
    let credential = authenticate(&state, &headers).await?;
    let q: TaskQuery = query(raw.as_deref())?;
    let domain = check_domain(q.domain.as_deref())?;
    let filter = TaskFilter {
        kind: q
            .kind
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|_| ApiError::invalid("kind must be refresh, prefetch or refresh_then_prefetch"))?,
        state: q
            .status
            .as_deref()
            .map(str::parse::<TaskState>)
            .transpose()
            .map_err(|_| ApiError::invalid("status must be running, completed or failed"))?,
        domain: domain.as_deref(),
        url: q.url.as_deref(),
        since: q.since.as_deref().map(|t| parse_time("since", t)).transpose()?,
        until: q.until.as_deref().map(|t| parse_time("until", t)).transpose()?,
        before_id: cursor(q.cursor.as_deref())?,
    };
    let limit = limit(q.limit)?;
    let tasks = state.service.list_tasks(&credential.account, &filter, limit).await?;
    let next_cursor = (tasks.len() == limit as usize).then(|| tasks.last().map(|t| format!("c{}", t.id))).flatten();
    Ok(Json(TaskPage { tasks: tasks.iter().map(TaskView::from).collect(), next_cursor }))
}

/// List items, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/items",
    params(ItemQuery),
    responses(
        (status = 429, description = "Rate limited; see Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),(status = 200, body = ItemPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn list_items(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<ItemPage>, ApiError> {
    let credential = authenticate(&state, &headers).await?;
    let q: ItemQuery = query(raw.as_deref())?;
    let domain = check_domain(q.domain.as_deref())?;
    let filter = ItemFilter {
        task_id: q.task_id,
        kind: q
            .kind
            .as_deref()
            .map(str::parse::<Kind>)
            .transpose()
            .map_err(|_| ApiError::invalid("kind must be refresh or prefetch"))?,
        status: q
            .status
            .as_deref()
            .map(str::parse::<ItemStatus>)
            .transpose()
            .map_err(|_| ApiError::invalid("status must be waiting, processing, completed or failed"))?,
        domain: domain.as_deref(),
        url: q.url.as_deref(),
        since: q.since.as_deref().map(|t| parse_time("since", t)).transpose()?,
        until: q.until.as_deref().map(|t| parse_time("until", t)).transpose()?,
        before_id: cursor(q.cursor.as_deref())?,
    };
    let limit = limit(q.limit)?;
    let items = state.service.list_items(&credential.account, &filter, limit).await?;
    let next_cursor = (items.len() == limit as usize).then(|| items.last().map(|i| format!("c{}", i.id))).flatten();
    Ok(Json(ItemPage { items: items.iter().map(|i| item_view(i, Vec::new())).collect(), next_cursor }))
}

async fn detail(state: &AppState, credential: &Credential, task_id: i64) -> Result<TaskDetail, ApiError> {
    let task = state.service.task(&credential.account, task_id).await?.ok_or_else(|| ApiError::not_found("task"))?;
    let filter = ItemFilter { task_id: Some(task_id), ..ItemFilter::default() };
    let mut items = state.service.list_items(&credential.account, &filter, 10_000).await?;
    items.reverse();
    let ids: Vec<i64> = items.iter().map(|i| i.id).collect();
    let results = state.service.node_results(&credential.account, &ids).await?;
    let mut by_item: BTreeMap<i64, Vec<NodeView>> = BTreeMap::new();
    let mut by_node: BTreeMap<String, NodeProgress> = BTreeMap::new();
    for (item_id, result) in &results {
        by_item.entry(*item_id).or_default().push(NodeView::from(result));
        let p = by_node.entry(result.node.clone()).or_insert_with(|| NodeProgress {
            node: result.node.clone(),
            done: 0,
            failed: 0,
            seen: 0,
        });
        p.seen += 1;
        match result.state {
            cachectl_core::NodeState::Succeeded => p.done += 1,
            cachectl_core::NodeState::Failed => {
                p.done += 1;
                p.failed += 1;
            }
            cachectl_core::NodeState::Pending => {}
        }
    }
    Ok(TaskDetail {
        task: TaskView::from(&task),
        nodes: by_node.into_values().collect(),
        items: items.iter().map(|i| item_view(i, by_item.remove(&i.id).unwrap_or_default())).collect(),
    })
}

/// A task with its items and every item's per-node results.
#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}",
    params(("id" = i64, Path, description = "Task id")),
    responses(
        (status = 429, description = "Rate limited; see Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
        (status = 400, description = "Invalid parameter", body = ErrorBody),(status = 200, body = TaskDetail), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn get_task(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<TaskDetail>, ApiError> {
    let credential = authenticate(&state, &headers).await?;
    let id = task_id(&id)?;
    Ok(Json(detail(&state, &credential, id).await?))
}

fn task_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| ApiError::not_found("task"))
}

/// Cancel the task's items that were not sent anywhere yet.
#[utoipa::path(
    post,
    path = "/api/v1/tasks/{id}/cancel",
    params(("id" = i64, Path, description = "Task id")),
    responses(
        (status = 429, description = "Rate limited; see Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
        (status = 400, description = "Invalid parameter", body = ErrorBody),(status = 200, body = Changed), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    let credential = authenticate(&state, &headers).await?;
    let id = task_id(&id)?;
    state.service.task(&credential.account, id).await?.ok_or_else(|| ApiError::not_found("task"))?;
    let changed = state.service.cancel(&credential.account, id, now_ms()).await?;
    let task = state.service.task(&credential.account, id).await?.ok_or_else(|| ApiError::not_found("task"))?;
    Ok(Json(Changed { changed, task: TaskView::from(&task) }))
}

/// Queue the task's failed items again, on every node.
#[utoipa::path(
    post,
    path = "/api/v1/tasks/{id}/retry",
    params(("id" = i64, Path, description = "Task id")),
    responses(
        (status = 429, description = "Rate limited; see Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
        (status = 400, description = "Invalid parameter", body = ErrorBody),(status = 200, body = Changed), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn retry(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    let credential = authenticate(&state, &headers).await?;
    let id = task_id(&id)?;
    state.service.task(&credential.account, id).await?.ok_or_else(|| ApiError::not_found("task"))?;
    let changed = state.service.retry(&credential.account, id).await?;
    let task = state.service.task(&credential.account, id).await?.ok_or_else(|| ApiError::not_found("task"))?;
    Ok(Json(Changed { changed, task: TaskView::from(&task) }))
}

/// The webhook deliveries of a task.
#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}/webhooks",
    params(("id" = i64, Path, description = "Task id")),
    responses(
        (status = 429, description = "Rate limited; see Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
        (status = 400, description = "Invalid parameter", body = ErrorBody),(status = 200, body = DeliveryLog), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn deliveries(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<DeliveryLog>, ApiError> {
    let credential = authenticate(&state, &headers).await?;
    let id = task_id(&id)?;
    state.service.task(&credential.account, id).await?.ok_or_else(|| ApiError::not_found("task"))?;
    let log = state.service.deliveries(&credential.account, id).await?;
    Ok(Json(DeliveryLog { deliveries: log.iter().map(DeliveryView::from).collect() }))
}

/// A live progress stream (Server-Sent Events): a `progress` event with the task whenever its
/// counts change, then one `done` event with the final state, then the stream ends.
#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}/events",
    params(("id" = i64, Path, description = "Task id")),
    responses(
        (status = 429, description = "Rate limited; see Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
        (status = 400, description = "Invalid parameter", body = ErrorBody),
        (status = 200, description = "text/event-stream of `progress` events and a last `done` event, each carrying a TaskView", content_type = "text/event-stream", body = TaskView),
        (status = 404, body = ErrorBody),
        (status = 401, body = ErrorBody)
    ),
    security(("bearer" = []))
)]
pub async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let credential = authenticate(&state, &headers).await?;
    let id = task_id(&id)?;
    let first = state.service.task(&credential.account, id).await?.ok_or_else(|| ApiError::not_found("task"))?;
    let stream = futures::stream::unfold((Some(first), None::<StatusCounts>, false), move |(next, last, ended)| {
        let state = state.clone();
        let credential = credential.clone();
        async move {
            if ended {
                return None;
            }
            let mut current = next;
            loop {
                if let Some(task) = current.take() {
                    let finished = task.state() != TaskState::Running;
                    if finished || last != Some(task.counts) {
                        let view = TaskView::from(&task);
                        let event = Event::default()
                            .event(if finished { "done" } else { "progress" })
                            .json_data(&view)
                            .unwrap_or_default();
                        return Some((Ok::<_, std::convert::Infallible>(event), (None, Some(task.counts), finished)));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                current = match state.service.task(&credential.account, id).await {
                    Ok(Some(task)) => Some(task),
                    Ok(None) => return None,
                    Err(e) => {
                        tracing::warn!(error = %e, "Progress stream could not read the task; retrying.");
                        None
                    }
                };
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// The OpenAPI document of the native API.
#[derive(OpenApi)]
#[openapi(
    info(title = "cachectl native API", description = "cachectl's own API: tasks, items, per-node results, progress, webhooks."),
    paths(submit, list_tasks, get_task, list_items, cancel, retry, deliveries, events),
    components(schemas(ErrorBody, ErrorDetail, TaskView, CountsView, NodeView, ItemView, NodeProgress, TaskDetail, SubmitBody, Submitted, Rejected, TaskPage, ItemPage, Changed, DeliveryLog, DeliveryView)),
    modifiers(&BearerAuth),
    tags((name = "tasks", description = "Submit and follow refresh and prefetch tasks"))
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
        .method_not_allowed_fallback(method_not_allowed)
        .merge(utoipa_swagger_ui::SwaggerUi::new("/api/v1/docs").url("/api/v1/openapi.json", ApiDoc::openapi()))
}
