//! The one interface every storage backend implements. Backends live in `cachectl-store`;
//! nothing here knows SQL, and nothing in a backend knows a dialect.

use crate::model::{
    ClaimedItem, Delivery, DeliveryOutcome, Item, ItemFilter, ItemRecord, ItemType, ItemUpdate, Kind, NewTask,
    NodeResult, Page, PageRequest, QuotaBucket, QuotaCharge, TaskFilter, TaskSummary, Timestamp, WebhookJob,
};
use crate::types::{AccountName, QuotaDay, TaskId};
use async_trait::async_trait;

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A daily quota would be exceeded; nothing was stored.
    #[error("daily quota {bucket} exceeded: {used} of {limit} used")]
    QuotaExceeded {
        /// The quota.
        bucket: QuotaBucket,
        /// How much of it is already spent today.
        used: u64,
        /// The daily limit.
        limit: u64,
    },
    /// The database cannot be reached or answered with an error (kept as the source).
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An `Idempotency-Key` was reused with another request; nothing was stored.
    #[error("idempotency key reused with a different request")]
    IdempotencyConflict,
    /// The stored schema is newer than this binary knows.
    #[error("store schema: {0}")]
    Schema(String),
}

impl StoreError {
    /// The store is unavailable because of `error`.
    pub fn unavailable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable(error.into())
    }
}

/// The result type of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// A time-window query of one account's items of one kind.
#[derive(Debug, Clone)]
pub struct WindowQuery<'a> {
    /// The account.
    pub account: &'a AccountName,
    /// Refresh or prefetch.
    pub kind: Kind,
    /// Items created at or after this time.
    pub from: Timestamp,
    /// Items created before this time.
    pub to: Timestamp,
    /// Only the records of this exact URL.
    pub url: Option<&'a str>,
    /// Which page, newest first.
    pub page: PageRequest,
}

/// A keyset-paged query of one account's items, ascending by creation (the Baidu dialects).
#[derive(Debug, Clone)]
pub struct RecordQuery<'a> {
    /// The account.
    pub account: &'a AccountName,
    /// Refresh or prefetch.
    pub kind: Kind,
    /// Only this task's items; the time window is then ignored.
    pub task_id: Option<TaskId>,
    /// Items created at or after this time.
    pub from: Timestamp,
    /// Items created before this time.
    pub to: Timestamp,
    /// Only items whose host is this site or a name under it.
    pub site: Option<&'a str>,
    /// Only this exact URL.
    pub url: Option<&'a str>,
    /// Only URLs or only directories.
    pub item_type: Option<ItemType>,
    /// Only items after this `(created_at, id)` position: the previous page's last record.
    pub after: Option<(Timestamp, i64)>,
    /// At most this many records.
    pub limit: u32,
}

/// Tasks, their items and node results, the records the dialects read, and the daily quotas a
/// submission charges: what `Service` reads and writes for the dialects.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// Stores a task and its items, and charges the quotas, atomically: either all of it is
    /// durable when this returns, or none of it. Returns the new task id.
    async fn create_task(&self, task: &NewTask, charges: &[QuotaCharge]) -> StoreResult<TaskId>;

    /// How much of a daily quota is spent.
    async fn quota_used(&self, account: &AccountName, bucket: QuotaBucket, day: &QuotaDay) -> StoreResult<u64>;

    /// The items of one task of one account and kind, newest first. Another account's task is empty.
    async fn task_items(
        &self,
        account: &AccountName,
        kind: Kind,
        task_id: TaskId,
        page: PageRequest,
    ) -> StoreResult<Page<ItemRecord>>;

    /// The items of one account and kind created in a time window, newest first, with the exact total.
    async fn window_items(&self, query: &WindowQuery<'_>) -> StoreResult<Page<ItemRecord>>;

    /// The items matching `query`, ascending by `(created_at, id)`, at most `query.limit`.
    async fn records(&self, query: &RecordQuery<'_>) -> StoreResult<Vec<ItemRecord>>;

    /// One task of the account with its status counts.
    async fn task(&self, account: &AccountName, task_id: TaskId) -> StoreResult<Option<TaskSummary>>;

    /// The account's tasks matching `filter`, newest first, at most `limit`.
    async fn list_tasks(
        &self,
        account: &AccountName,
        filter: &TaskFilter<'_>,
        limit: u32,
    ) -> StoreResult<Vec<TaskSummary>>;

    /// The account's items matching `filter`, newest first, at most `limit`.
    async fn list_items(&self, account: &AccountName, filter: &ItemFilter<'_>, limit: u32) -> StoreResult<Vec<Item>>;

    /// How many of the account's items match `filter` (its `before_id` included): the exact
    /// total of what `list_items` pages through.
    async fn count_items(&self, account: &AccountName, filter: &ItemFilter<'_>) -> StoreResult<u64>;

    /// The node results of these items, if they are the account's.
    async fn node_results(&self, account: &AccountName, item_ids: &[i64]) -> StoreResult<Vec<(i64, NodeResult)>>;

    /// Fails the task's items that are waiting and unclaimed, with the reason "cancelled";
    /// items that followed them run on their own. Returns how many were cancelled.
    async fn cancel_waiting(&self, account: &AccountName, task_id: TaskId, now: Timestamp) -> StoreResult<u64>;

    /// Puts the task's failed items back in the queue with their node results cleared.
    /// Returns how many.
    async fn retry_failed(&self, account: &AccountName, task_id: TaskId) -> StoreResult<u64>;

    /// The webhook delivery log of one of the account's tasks, oldest first.
    async fn deliveries(&self, account: &AccountName, task_id: TaskId) -> StoreResult<Vec<Delivery>>;
}

/// The work queue: runnable items leased to workers, and the results they report (the worker).
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Leases up to `limit` runnable items (waiting or processing, due, lease free or expired)
    /// to `owner` until `lease_until`, with the node results stored so far.
    async fn claim_items(
        &self,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedItem>>;

    /// Extends every lease `owner` holds on an unfinished item. Returns how many.
    async fn renew_leases(&self, owner: &str, lease_until: Timestamp) -> StoreResult<u64>;

    /// Gives up every lease `owner` holds, so that another worker may claim the items at once.
    async fn release_leases(&self, owner: &str) -> StoreResult<()>;

    /// Applies the updates of worker `owner` in one transaction, in order, to the items it still
    /// leases; the updates of items whose lease another worker took are dropped. Returns how many
    /// items' updates were dropped.
    async fn apply_updates(&self, owner: &str, updates: &[ItemUpdate]) -> StoreResult<u64>;

    /// What the queue holds at `now`, for the metrics (`/metrics`): every instance sees the same.
    /// Items first sent before `half_deadline` are counted as past half their deadline.
    async fn backlog(&self, now: Timestamp, half_deadline: Timestamp) -> StoreResult<Backlog>;
}

/// The unfinished items of the queue (`Queue::backlog`), coalesced followers left out (their
/// leader does the work).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Waiting and due: to be claimed.
    pub waiting: u64,
    /// Waiting for a later time (a scheduled prefetch).
    pub scheduled: u64,
    /// Sent to at least one node, not final yet.
    pub processing: u64,
    /// Unfinished items first sent before the half-deadline mark.
    pub past_half_deadline: u64,
    /// When the longest-waiting due item became due.
    pub oldest_due: Option<Timestamp>,
}

/// The webhook outbox of finished tasks (the webhook sender).
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Queues a webhook job per URL for every finished task not yet dispatched (`urls` maps an
    /// account to its webhook URLs), and marks those tasks dispatched. Returns how many tasks.
    async fn dispatch_finished(
        &self,
        urls: &std::collections::HashMap<String, Vec<String>>,
        now: Timestamp,
        limit: u32,
    ) -> StoreResult<u64>;

    /// Leases due webhook jobs.
    async fn claim_webhook_jobs(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<WebhookJob>>;

    /// Logs a delivery attempt and moves the job on.
    async fn record_delivery(&self, job: &WebhookJob, attempt: &Delivery, outcome: DeliveryOutcome) -> StoreResult<()>;
}

/// Request counters of rate-limited credentials (the rate limiter).
#[async_trait]
pub trait Counters: Send + Sync + 'static {
    /// Adds `n` requests of a rate-limited credential on an endpoint in an epoch minute to the
    /// shared count, for backends shared by several instances; returns the count including them.
    /// `None` (the default) means the backend serves one process, which counts in memory instead.
    async fn count_requests(&self, credential: &str, api_id: u32, minute: i64, n: u32) -> StoreResult<Option<u64>> {
        let _ = (credential, api_id, minute, n);
        Ok(None)
    }
}

/// Deleting what is older than the retention (the retention sweep).
#[async_trait]
pub trait Retention: Send + Sync + 'static {
    /// Deletes up to `batch` items created before `before` (with their node results and emptied
    /// tasks). Returns how many items went; the caller repeats while it is `batch`.
    async fn sweep(&self, before: Timestamp, batch: u32) -> StoreResult<u64>;
}

/// Whether the store answers (readiness).
#[async_trait]
pub trait Health: Send + Sync + 'static {
    /// Checks that the store answers (for `/readyz`).
    async fn ping(&self) -> StoreResult<()>;
}

/// Persistent storage of tasks, items, node results and quota counters: every role at once, for
/// what opens a store and hands each part of the server the role it uses.
pub trait Store: TaskStore + Queue + Outbox + Counters + Retention + Health + crate::admin::DirectoryStore {}

impl<T: TaskStore + Queue + Outbox + Counters + Retention + Health + crate::admin::DirectoryStore> Store for T {}
