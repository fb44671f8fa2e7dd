//! The domain vocabulary: tasks, items, node results and their states.
//! Plain data only; what a state means and how it changes lives in `policy`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

pub use crate::types::Timestamp;
use crate::types::{AccountName, ItemUrl, QuotaDay, TaskId};

/// What a task does to its URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Evict the URL (or every URL under a directory) from the caches.
    Refresh,
    /// Fetch the URL through every cache so that each holds it.
    Prefetch,
}

/// What a task as a whole does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Refresh items only.
    Refresh,
    /// Prefetch items only.
    Prefetch,
    /// For each URL a refresh item, and a prefetch item that starts once the refresh completed
    /// on every node.
    RefreshThenPrefetch,
}

/// Whether an item names one URL, a directory prefix, a cache tag or a regex of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemType {
    /// Exactly one URL: method, host, path and query.
    Url,
    /// Everything of the host whose path starts with the URL's path (which ends with `/`).
    Dir,
    /// Every object of one host that its origin tagged with a cache tag (surrogate key); the
    /// item's text is `tag:<host>:<tag>` (see `target`).
    Tag,
    /// Every object of one host whose path and query match a regex; the item's text is
    /// `regex:<host>:<regex>` (see `target`).
    Regex,
}

/// The life of an item, as every dialect reports it (each in its own words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemStatus {
    /// Not yet sent to any node.
    Waiting,
    /// Sent; at least one node is still pending.
    Processing,
    /// Every node succeeded.
    Completed,
    /// At least one node failed definitively.
    Failed,
}

impl ItemStatus {
    /// Completed and failed items never change again.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

/// Where a node sits in the cache hierarchy. Parents are done before edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// A parent (shield) cache that edges refill from.
    Parent,
    /// An edge cache that clients talk to.
    #[default]
    Edge,
}

/// The state of one item on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Not yet done: not tried, or tried and waiting for a retry.
    Pending,
    /// The node did what was asked.
    Succeeded,
    /// The node failed definitively, or the item's deadline passed.
    Failed,
}

macro_rules! string_enum {
    ($ty:ty { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// The lowercase name used in the store and in the native vocabulary.
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(UnknownName(s.to_owned())),
                }
            }
        }
    };
}

/// A name that is not one of an enum's values.
#[derive(Debug, thiserror::Error)]
#[error("unknown value {0:?}")]
pub struct UnknownName(pub String);

string_enum!(Kind { Refresh => "refresh", Prefetch => "prefetch" });
string_enum!(TaskKind { Refresh => "refresh", Prefetch => "prefetch", RefreshThenPrefetch => "refresh_then_prefetch" });

impl From<Kind> for TaskKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Refresh => Self::Refresh,
            Kind::Prefetch => Self::Prefetch,
        }
    }
}
string_enum!(ItemType { Url => "url", Dir => "dir", Tag => "tag", Regex => "regex" });
string_enum!(ItemStatus { Waiting => "waiting", Processing => "processing", Completed => "completed", Failed => "failed" });
string_enum!(Tier { Parent => "parent", Edge => "edge" });
string_enum!(NodeState { Pending => "pending", Succeeded => "succeeded", Failed => "failed" });

/// One URL of a submission, validated and normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewItem {
    /// Refresh or prefetch.
    pub kind: Kind,
    /// The normalized URL and its host.
    pub url: ItemUrl,
    /// URL or directory.
    pub item_type: ItemType,
    /// Not executed before this time (a scheduled prefetch); `None` means at once.
    pub not_before: Option<Timestamp>,
    /// The position, in the same task, of the item that must complete first (refresh-then-prefetch).
    pub depends_on: Option<usize>,
    /// A soft purge: the objects are marked stale (kept for grace) instead of removed.
    pub soft: bool,
}

/// The `Idempotency-Key` of a native submit and a hash of its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// The client's key.
    pub key: String,
    /// A hash of the request body.
    pub request_hash: String,
}

/// A submission about to be stored.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// The owning account's name.
    pub account: AccountName,
    /// What the task does.
    pub kind: TaskKind,
    /// Who submitted it: a token's name or an access key id, never a secret.
    pub operator: String,
    /// The API the task came through (`baishan`, `geo`, `cdn`, `native`).
    pub dialect: String,
    /// The client's address, for the audit log.
    pub address: String,
    /// Creation time.
    pub created_at: Timestamp,
    /// The items, in submission order, without duplicates.
    pub items: Vec<NewItem>,
    /// Set for idempotent native submits.
    pub idempotency: Option<Idempotency>,
}

/// A daily quota that a submission spends from, checked and charged atomically with the insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaCharge {
    /// The quota bucket, such as `refresh_url`.
    pub bucket: QuotaBucket,
    /// The day the charge counts against.
    pub day: QuotaDay,
    /// The account's daily limit for this bucket.
    pub limit: u64,
    /// How much this submission spends.
    pub amount: u64,
}

/// The daily quotas an account has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaBucket {
    /// Refreshed URLs per day.
    RefreshUrl,
    /// Refreshed directories per day.
    RefreshDir,
    /// Prefetched URLs per day.
    PrefetchUrl,
    /// Purged cache tags per day.
    RefreshTag,
    /// Regex purges per day.
    RefreshRegex,
}

string_enum!(QuotaBucket {
    RefreshUrl => "refresh_url",
    RefreshDir => "refresh_dir",
    PrefetchUrl => "prefetch_url",
    RefreshTag => "refresh_tag",
    RefreshRegex => "refresh_regex",
});

impl QuotaBucket {
    /// The bucket a submission of `kind` and `item_type` spends from.
    #[must_use]
    pub fn for_items(kind: Kind, item_type: ItemType) -> Self {
        match (kind, item_type) {
            (Kind::Refresh, ItemType::Dir) => Self::RefreshDir,
            (Kind::Refresh, ItemType::Url) => Self::RefreshUrl,
            (Kind::Refresh, ItemType::Tag) => Self::RefreshTag,
            (Kind::Refresh, ItemType::Regex) => Self::RefreshRegex,
            (Kind::Prefetch, _) => Self::PrefetchUrl,
        }
    }
}

/// A stored item as queries see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// The item's own id.
    pub id: i64,
    /// The task it belongs to.
    pub task_id: TaskId,
    /// The owning account.
    pub account: String,
    /// Refresh or prefetch.
    pub kind: Kind,
    /// The URL as accepted.
    pub url: String,
    /// The URL's host.
    pub host: String,
    /// URL or directory.
    pub item_type: ItemType,
    /// Derived from the node results, see `policy::derive`.
    pub status: ItemStatus,
    /// Nodes done ÷ nodes total × 100, rounded down.
    pub progress: u8,
    /// Who submitted it.
    pub operator: String,
    /// Submission time.
    pub created_at: Timestamp,
    /// Not executed before this time (a scheduled prefetch); usually `created_at`.
    pub not_before: Timestamp,
    /// When the item reached a final status.
    pub finished_at: Option<Timestamp>,
    /// Why it failed, naming the node and the last error.
    pub reason: Option<String>,
    /// The waiting item this one was coalesced with: it mirrors that item's state.
    pub follows: Option<i64>,
    /// The refresh item that must complete before this prefetch starts.
    pub depends_on: Option<i64>,
    /// A soft purge: the objects are marked stale instead of removed.
    pub soft: bool,
}

/// What the query pages of the dialects (Baishan's task and window pages, the Baidu record
/// pages) show of an item: an `Item` without its task, account, host and links. The stores read
/// only these columns for those pages; building the five others from each row (two of them
/// strings) was a quarter of a record page's time on SQLite's reader threads (BENCHMARKS.md,
/// "Query pages read only the columns they show").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRecord {
    /// The item's own id.
    pub id: i64,
    /// Refresh or prefetch.
    pub kind: Kind,
    /// The URL as accepted.
    pub url: String,
    /// URL or directory.
    pub item_type: ItemType,
    /// Derived from the node results, see `policy::derive`.
    pub status: ItemStatus,
    /// Nodes done ÷ nodes total × 100, rounded down.
    pub progress: u8,
    /// Who submitted it.
    pub operator: String,
    /// Submission time.
    pub created_at: Timestamp,
    /// Not executed before this time (a scheduled prefetch); usually `created_at`.
    pub not_before: Timestamp,
    /// When the item reached a final status.
    pub finished_at: Option<Timestamp>,
    /// Why it failed, naming the node and the last error.
    pub reason: Option<String>,
}

/// How many of a task's items are in each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatusCounts {
    /// Not yet sent.
    pub waiting: u64,
    /// Being executed.
    pub processing: u64,
    /// Done on every node.
    pub completed: u64,
    /// Failed on a node, or cancelled.
    pub failed: u64,
}

impl StatusCounts {
    /// Counts one more item of `status`.
    pub fn add(&mut self, status: ItemStatus, n: u64) {
        match status {
            ItemStatus::Waiting => self.waiting += n,
            ItemStatus::Processing => self.processing += n,
            ItemStatus::Completed => self.completed += n,
            ItemStatus::Failed => self.failed += n,
        }
    }

    /// Every item.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.waiting + self.processing + self.completed + self.failed
    }
}

/// A task as the native API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskSummary {
    /// The task id.
    pub id: TaskId,
    /// The owning account.
    pub account: String,
    /// What it does.
    pub kind: TaskKind,
    /// Who submitted it.
    pub operator: String,
    /// The API it came through.
    pub dialect: String,
    /// Submission time.
    pub created_at: Timestamp,
    /// When its last item became final.
    pub finished_at: Option<Timestamp>,
    /// Its items by status.
    pub counts: StatusCounts,
}

/// Filters of the native task list.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter<'a> {
    /// Only this kind.
    pub kind: Option<TaskKind>,
    /// `running`, `completed` or `failed`.
    pub state: Option<TaskState>,
    /// Only tasks with an item of this host (or a name under it).
    pub domain: Option<&'a str>,
    /// Only tasks with an item of this exact URL.
    pub url: Option<&'a str>,
    /// Created at or after.
    pub since: Option<Timestamp>,
    /// Created before.
    pub until: Option<Timestamp>,
    /// Only tasks with an id below this (the cursor: the last id of the previous page).
    pub before_id: Option<i64>,
}

/// The state of a task as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Some item is not final.
    Running,
    /// Every item completed.
    Completed,
    /// Every item is final and at least one failed.
    Failed,
}

string_enum!(TaskState { Running => "running", Completed => "completed", Failed => "failed" });

impl TaskSummary {
    /// The task's state, from its counts.
    #[must_use]
    pub fn state(&self) -> TaskState {
        if self.counts.waiting + self.counts.processing > 0 {
            TaskState::Running
        } else if self.counts.failed > 0 {
            TaskState::Failed
        } else {
            TaskState::Completed
        }
    }
}

/// Filters of the native item list.
#[derive(Debug, Clone, Default)]
pub struct ItemFilter<'a> {
    /// Only items of this task.
    pub task_id: Option<TaskId>,
    /// Only this kind.
    pub kind: Option<Kind>,
    /// Only this status.
    pub status: Option<ItemStatus>,
    /// Only this host or names under it.
    pub domain: Option<&'a str>,
    /// Only this exact URL.
    pub url: Option<&'a str>,
    /// Only URLs that contain this text (case-sensitive; an empty text matches every URL).
    pub url_contains: Option<&'a str>,
    /// Created at or after.
    pub since: Option<Timestamp>,
    /// Created before.
    pub until: Option<Timestamp>,
    /// Only items with an id below this (the cursor).
    pub before_id: Option<i64>,
}

/// A webhook notification to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookJob {
    /// Job id.
    pub id: i64,
    /// The finished task.
    pub task_id: TaskId,
    /// Its account.
    pub account: AccountName,
    /// Where to POST.
    pub url: String,
    /// Attempts made so far.
    pub attempts: u32,
}

/// One attempt to deliver a webhook, for the delivery log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// The task notified.
    pub task_id: TaskId,
    /// The receiver.
    pub url: String,
    /// Which attempt (from 1).
    pub attempt: u32,
    /// The receiver's HTTP status, if it answered.
    pub status_code: Option<u16>,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// When.
    pub at: Timestamp,
}

/// What came of a delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Try again at this time.
    RetryAt(Timestamp),
    /// No more attempts.
    GaveUp,
}

/// What a node did with one item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeResult {
    /// The edge node's configured name.
    pub node: String,
    /// Pending, succeeded or failed.
    pub state: NodeState,
    /// How many requests were sent.
    pub attempts: u32,
    /// The last HTTP status the node answered, if any.
    pub status_code: Option<u16>,
    /// The last error, if the last attempt did not succeed.
    pub error: Option<String>,
    /// When this result last changed.
    pub updated_at: Timestamp,
    /// The instance (worker lease owner) that produced this result.
    pub instance: String,
}

/// An item handed to a worker, with what is already known of its nodes (after a restart).
#[derive(Debug, Clone)]
pub struct ClaimedItem {
    /// The item.
    pub item: Item,
    /// When it was first sent to a node; its deadline counts from here.
    pub started_at: Option<Timestamp>,
    /// The node results stored so far.
    pub nodes: Vec<NodeResult>,
}

/// A change a worker reports for one item; the store applies a batch of them in one transaction.
#[derive(Debug, Clone)]
pub struct ItemUpdate {
    /// The item.
    pub item_id: i64,
    /// Its derived status after the change.
    pub status: ItemStatus,
    /// Its derived progress after the change.
    pub progress: u8,
    /// Set once, when the item is first sent.
    pub started_at: Option<Timestamp>,
    /// Set when the status becomes final.
    pub finished_at: Option<Timestamp>,
    /// Set when the item failed.
    pub reason: Option<String>,
    /// The node results that changed.
    pub nodes: Vec<NodeResult>,
}

/// One page of a query, with the exact number of matching records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// How many records match, over all pages.
    pub total: u64,
    /// The records of the requested page.
    pub records: Vec<T>,
}

/// Offset paging as the Baishan dialect does it: pages counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Page number, from 1.
    pub number: u32,
    /// Records per page.
    pub size: u32,
}

impl PageRequest {
    /// The number of records before this page.
    #[must_use]
    pub fn offset(self) -> u64 {
        u64::from(self.number.saturating_sub(1)) * u64::from(self.size)
    }
}
