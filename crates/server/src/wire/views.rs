//! The native API's views of tasks, items, node results and webhook deliveries, as JSON. The
//! webhook sender posts the same [`TaskView`] the API answers with, so both read it from here.

use cachectl_core::{Delivery, Item, NodeResult, StatusCounts, TaskSummary, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// RFC 3339 with milliseconds, UTC.
pub fn time(ms: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(ms.millis())
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
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
            id: t.id.get(),
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
    /// The URL; for a tag or regex item `tag:<host>:<tag>` or `regex:<host>:<regex>`.
    pub url: String,
    /// `url`, `dir`, `tag` or `regex`.
    #[serde(rename = "type")]
    pub item_type: String,
    /// A soft purge: the objects were marked stale (Varnish `purge.soft`, xkey `softpurge`)
    /// instead of removed.
    #[serde(default)]
    pub soft: bool,
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

pub fn item_view(item: &Item, nodes: Vec<NodeView>) -> ItemView {
    ItemView {
        id: item.id,
        task_id: item.task_id.get(),
        kind: item.kind.as_str().to_owned(),
        url: item.url.clone(),
        item_type: item.item_type.as_str().to_owned(),
        soft: item.soft,
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
