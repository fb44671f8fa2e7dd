//! The native API's handlers: parse the request, call `Service`, render the view.

use super::{
    ApiError, Bearer, Changed, DeliveryLog, DeliveryView, ErrorBody, ItemPage, ItemQuery, NodeProgress, NodeView,
    OwnedTask, Rejected, SubmitBody, Submitted, TaskDetail, TaskPage, TaskQuery, TaskView, check_domain, cursor,
    item_view, limit, parse_time, query,
};
use crate::api::{AppState, read_body};
use crate::auth::Credential;
use crate::clock::now_ms;
use axum::Json;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use cachectl_core::service::{Submission, SubmitError, SubmittedTargets, SubmittedUrl, Validated};
use cachectl_core::{
    Idempotency, ItemFilter, ItemStatus, ItemType, Kind, StatusCounts, TaskFilter, TaskId, TaskKind, TaskState,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

/// Submit a refresh, prefetch or refresh-then-prefetch task: URLs, directories, cache tags or
/// regexes of one host, optionally as a soft purge.
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
pub async fn submit(
    State(state): State<AppState>,
    Bearer(credential): Bearer,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body).await.map_err(ApiError::invalid)?;
    let request: SubmitBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the request body is not a valid submission: {e}")))?;
    let kind = match request.kind.as_deref() {
        None => TaskKind::Refresh,
        Some(k) => {
            k.parse().map_err(|_| ApiError::invalid("kind must be refresh, prefetch or refresh_then_prefetch"))?
        }
    };
    let idempotency = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(key)) if !key.trim().is_empty() && key.len() <= 255 => {
            Some(Idempotency { key: key.trim().to_owned(), request_hash: hex::encode(Sha256::digest(&body)) })
        }
        Some(_) => return Err(ApiError::invalid("Idempotency-Key must be 1 to 255 visible characters")),
    };
    let now = now_ms();
    let submission = Submission {
        urls: validated(&state, &credential, kind, request, now)?,
        operator: credential.operator.clone(),
        dialect: "native",
        address: credential.address.clone(),
        idempotency,
    };
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

/// Tags purged by one request at most (Fastly's batch purge takes 256 surrogate keys).
const MAX_TAGS: usize = 256;
/// Regexes purged by one request at most: each is a ban that every cached object of the
/// host is tested against until the ban lurker has passed.
const MAX_REGEXES: usize = 10;

/// The submission's items, validated for the account. A tag or regex submission is refused as
/// a whole (400, nothing queued) if one of its tags or regexes is.
fn validated(
    state: &AppState,
    credential: &Credential,
    kind: TaskKind,
    request: SubmitBody,
    now: cachectl_core::Timestamp,
) -> Result<Validated, ApiError> {
    let refresh = kind == TaskKind::Refresh;
    let item_type = match request.item_type.as_deref() {
        None | Some("url") => ItemType::Url,
        Some("dir") if refresh => ItemType::Dir,
        Some("tag") if refresh => ItemType::Tag,
        Some("regex") if refresh => ItemType::Regex,
        Some(t @ ("dir" | "tag" | "regex")) => {
            return Err(ApiError::invalid(format!("type {t} is only for refresh tasks")));
        }
        Some(_) => return Err(ApiError::invalid("type must be url, dir, tag or regex")),
    };
    if request.soft && !(refresh && matches!(item_type, ItemType::Url | ItemType::Tag)) {
        return Err(ApiError::invalid(
            "soft is for refresh tasks of type url or tag: a directory or regex purge is a ban, which cannot keep objects stale",
        ));
    }
    let misplaced = match item_type {
        ItemType::Url | ItemType::Dir => {
            request.host.is_some() || !request.tags.is_empty() || !request.regexes.is_empty() || request.confirm_all
        }
        ItemType::Tag => !request.urls.is_empty() || !request.regexes.is_empty() || request.confirm_all,
        ItemType::Regex => !request.urls.is_empty() || !request.tags.is_empty(),
    };
    if misplaced {
        return Err(ApiError::invalid(
            "urls are for type url and dir; host with tags for type tag; host with regexes (and confirm_all) for type regex",
        ));
    }
    let targets = match item_type {
        ItemType::Tag => Some((request.tags, MAX_TAGS, "tags")),
        ItemType::Regex => Some((request.regexes, MAX_REGEXES, "regexes")),
        ItemType::Url | ItemType::Dir => None,
    };
    let Some((values, max, field)) = targets else {
        let max = if item_type == ItemType::Dir { 100 } else { 1000 };
        if request.urls.is_empty() || request.urls.len() > max {
            return Err(ApiError::invalid(format!("urls must hold from 1 to {max} URLs")));
        }
        let urls = request.urls.into_iter().map(|u| SubmittedUrl::now(u, item_type)).collect();
        let valid = state.service.validate(&credential.account, kind, urls, now);
        return Ok(if request.soft { valid.soft() } else { valid });
    };
    if values.is_empty() || values.len() > max {
        return Err(ApiError::invalid(format!("{field} must hold from 1 to {max} values for type {item_type}")));
    }
    let host = request.host.ok_or_else(|| ApiError::invalid(format!("type {item_type} needs a host")))?;
    let targets = SubmittedTargets { host, item_type, values, confirm_all: request.confirm_all };
    let valid = state.service.validate_targets(&credential.account, targets);
    if let Some((value, e)) = valid.rejected.first() {
        return Err(ApiError::invalid(format!("{value:?}: {e}; nothing was queued")));
    }
    Ok(if request.soft { valid.soft() } else { valid })
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
    Bearer(credential): Bearer,
    RawQuery(raw): RawQuery,
) -> Result<Json<TaskPage>, ApiError> {
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
    Bearer(credential): Bearer,
    RawQuery(raw): RawQuery,
) -> Result<Json<ItemPage>, ApiError> {
    let q: ItemQuery = query(raw.as_deref())?;
    let domain = check_domain(q.domain.as_deref())?;
    let filter = ItemFilter {
        task_id: q.task_id.map(TaskId::new),
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
        url_contains: None,
        since: q.since.as_deref().map(|t| parse_time("since", t)).transpose()?,
        until: q.until.as_deref().map(|t| parse_time("until", t)).transpose()?,
        before_id: cursor(q.cursor.as_deref())?,
    };
    let limit = limit(q.limit)?;
    let items = state.service.list_items(&credential.account, &filter, limit).await?;
    let next_cursor = (items.len() == limit as usize).then(|| items.last().map(|i| format!("c{}", i.id))).flatten();
    Ok(Json(ItemPage { items: items.iter().map(|i| item_view(i, Vec::new())).collect(), next_cursor }))
}

async fn detail(
    state: &AppState,
    credential: &Credential,
    task: cachectl_core::TaskSummary,
) -> Result<TaskDetail, ApiError> {
    let task_id = task.id;
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
    OwnedTask { credential, task }: OwnedTask,
) -> Result<Json<TaskDetail>, ApiError> {
    Ok(Json(detail(&state, &credential, task).await?))
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
    OwnedTask { credential, task }: OwnedTask,
) -> Result<Json<Changed>, ApiError> {
    let id = task.id;
    let changed = state.service.cancel(&credential.account, id, now_ms()).await?;
    changed_view(&state, &credential, id, changed).await
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
    OwnedTask { credential, task }: OwnedTask,
) -> Result<Json<Changed>, ApiError> {
    let id = task.id;
    let changed = state.service.retry(&credential.account, id).await?;
    changed_view(&state, &credential, id, changed).await
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
    OwnedTask { credential, task }: OwnedTask,
) -> Result<Json<DeliveryLog>, ApiError> {
    let log = state.service.deliveries(&credential.account, task.id).await?;
    Ok(Json(DeliveryLog { deliveries: log.iter().map(DeliveryView::from).collect() }))
}

/// A live progress stream (Server-Sent Events): a `progress` event with the task whenever its
/// counts change, then one `done` event with the final state, then the stream ends. An account
/// holds at most `[server] max_streams_per_account` streams open at once (429 `too_many_streams`).
#[utoipa::path(
    get,
    path = "/api/v1/tasks/{id}/events",
    params(("id" = i64, Path, description = "Task id")),
    responses(
        (status = 429, description = "Rate limited, or the account already holds `[server] max_streams_per_account` streams open (`too_many_streams`); see Retry-After", body = ErrorBody),
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
    OwnedTask { credential, task: first }: OwnedTask,
) -> Result<Response, ApiError> {
    let Some(slot) = state.streams.try_open(credential.account.name.as_str()) else {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            format!(
                "this account already has {} progress streams open; close one or poll the task",
                state.streams.limit()
            ),
        );
        e.retry_after = Some(1);
        return Err(e);
    };
    let id = first.id;
    let stream = futures::stream::unfold((Some(first), None::<StatusCounts>, false), move |(next, last, ended)| {
        // Held as long as the stream is (given back when it ends or its client goes away).
        let _slot = &slot;
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

/// The task after a cancel or a retry changed `changed` of its items.
async fn changed_view(
    state: &AppState,
    credential: &Credential,
    id: TaskId,
    changed: u64,
) -> Result<Json<Changed>, ApiError> {
    let task = state.service.task(&credential.account, id).await?.ok_or_else(|| ApiError::not_found("task"))?;
    Ok(Json(Changed { changed, task: TaskView::from(&task) }))
}
