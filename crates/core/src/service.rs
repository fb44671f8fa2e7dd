//! The domain service every dialect calls: submit a task, read items, read quotas.
//! Dialects parse their wire format into these calls and render the results; the rules
//! (validation, duplicates, quotas, ownership) live here once.

use crate::model::{
    Delivery, Idempotency, Item, ItemFilter, ItemRecord, ItemType, Kind, NewItem, NewTask, NodeResult, Page,
    PageRequest, QuotaBucket, QuotaCharge, TaskFilter, TaskKind, TaskSummary, Timestamp,
};
use crate::policy::{DomainPattern, UrlError, parse_item_of};
use crate::ratelimit::{Decision, RateLimiter};
use crate::store::{RecordQuery, Store, StoreError, WindowQuery};
use crate::types::{AccountName, QuotaDay, TaskId};
use chrono::FixedOffset;
use std::collections::HashSet;
use std::sync::Arc;

/// A customer, as the domain sees it (secrets stay in the configuration layer).
#[derive(Debug, Clone)]
pub struct Account {
    /// Unique name.
    pub name: AccountName,
    /// The domains whose URLs it may submit.
    pub domains: Vec<DomainPattern>,
    /// Daily quotas.
    pub quotas: Quotas,
    /// Requests per minute per credential per endpoint.
    pub rate_limit_per_minute: u32,
}

/// Daily quotas of an account, reset at midnight of the quota time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Refreshed URLs per day.
    pub refresh_urls: u64,
    /// Refreshed directories per day.
    pub refresh_dirs: u64,
    /// Prefetched URLs per day.
    pub prefetch_urls: u64,
    /// Purged cache tags per day.
    pub refresh_tags: u64,
    /// Regex purges per day.
    pub refresh_regexes: u64,
}

impl Quotas {
    /// The daily limit of a bucket.
    #[must_use]
    pub fn limit(&self, bucket: QuotaBucket) -> u64 {
        match bucket {
            QuotaBucket::RefreshUrl => self.refresh_urls,
            QuotaBucket::RefreshDir => self.refresh_dirs,
            QuotaBucket::PrefetchUrl => self.prefetch_urls,
            QuotaBucket::RefreshTag => self.refresh_tags,
            QuotaBucket::RefreshRegex => self.refresh_regexes,
        }
    }
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            refresh_urls: 10_000,
            refresh_dirs: 100,
            prefetch_urls: 10_000,
            refresh_tags: 10_000,
            refresh_regexes: 100,
        }
    }
}

/// One URL of a submission as a dialect hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmittedUrl {
    /// The URL as sent.
    pub url: String,
    /// URL or directory.
    pub item_type: ItemType,
    /// Do not execute before this time (a scheduled prefetch).
    pub not_before: Option<Timestamp>,
}

impl SubmittedUrl {
    /// A URL or directory to execute at once.
    #[must_use]
    pub fn now(url: impl Into<String>, item_type: ItemType) -> Self {
        Self { url: url.into(), item_type, not_before: None }
    }
}

/// A submission's URLs after [`Service::validate`]: the accepted ones parsed and normalized
/// once (duplicates merged) into items, and the refused ones with why, in submission order.
#[derive(Debug, Clone)]
pub struct Validated {
    kind: TaskKind,
    items: Vec<NewItem>,
    /// The URLs refused, with why, in submission order.
    pub rejected: Vec<(String, UrlError)>,
}

impl Validated {
    /// How many distinct URLs were accepted.
    #[must_use]
    pub fn accepted(&self) -> usize {
        self.items.len()
    }

    /// Makes every accepted item a soft purge; a directory or regex is refused instead
    /// (`UrlError::SoftBan`), since a ban cannot keep objects stale. Only for refresh tasks.
    #[must_use]
    pub fn soft(mut self) -> Self {
        let (bans, mut kept): (Vec<NewItem>, Vec<NewItem>) =
            self.items.into_iter().partition(|i| matches!(i.item_type, ItemType::Dir | ItemType::Regex));
        self.rejected.extend(bans.into_iter().map(|i| (target_text(&i), UrlError::SoftBan)));
        for item in &mut kept {
            item.soft = true;
        }
        self.items = kept;
        self
    }
}

/// What a submitter wrote for an item: the URL, or the tag or regex of a target item.
fn target_text(item: &NewItem) -> String {
    match crate::target::split(item.url.as_str()) {
        Some((_, _, value)) => value.to_owned(),
        None => item.url.as_str().to_owned(),
    }
}

/// A tag or regex submission of one host, as a dialect hands it over.
#[derive(Debug, Clone)]
pub struct SubmittedTargets {
    /// The host whose objects are purged (one of the account's domains).
    pub host: String,
    /// `ItemType::Tag` or `ItemType::Regex`.
    pub item_type: ItemType,
    /// The tags or regexes.
    pub values: Vec<String>,
    /// A regex that matches every path is accepted only with this set.
    pub confirm_all: bool,
}

/// One submission as a dialect hands it over.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The URLs, validated for the account (which also fixes the task's kind).
    pub urls: Validated,
    /// Who submitted: a token's name or an access key id.
    pub operator: String,
    /// The dialect's name.
    pub dialect: &'static str,
    /// The client's address, for the audit log.
    pub address: String,
    /// The native API's `Idempotency-Key`, with a hash of the body.
    pub idempotency: Option<Idempotency>,
}

/// A stored submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The new task's id.
    pub task_id: TaskId,
    /// How many distinct URLs were accepted.
    pub accepted: usize,
    /// The URLs refused, with why, in submission order.
    pub rejected: Vec<(String, UrlError)>,
}

/// Why a submission was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Not one URL was acceptable.
    #[error("no valid URL in the request")]
    NothingAccepted {
        /// Every URL, with why it was refused.
        rejected: Vec<(String, UrlError)>,
    },
    /// A daily quota would be exceeded.
    #[error("daily {bucket} quota exceeded: {remaining} of {limit} left today")]
    Quota {
        /// The quota.
        bucket: QuotaBucket,
        /// Its daily limit.
        limit: u64,
        /// What is left of it today.
        remaining: u64,
    },
    /// The same `Idempotency-Key` was used with another request body.
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyConflict,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A quota's state for today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaState {
    /// The daily limit.
    pub limit: u64,
    /// What is left today.
    pub remaining: u64,
}

/// The domain service. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    store: Arc<dyn Store>,
    quota_zone: FixedOffset,
    on_submit: Arc<dyn Fn() + Send + Sync>,
    limiter: Arc<RateLimiter>,
}

impl Service {
    /// A service over `store`; quotas reset at midnight in `quota_zone`; `on_submit` is called
    /// after each stored submission (the worker's wake-up).
    pub fn new(store: Arc<dyn Store>, quota_zone: FixedOffset, on_submit: Arc<dyn Fn() + Send + Sync>) -> Self {
        Self { store, quota_zone, on_submit, limiter: Arc::default() }
    }

    /// Counts one request of `credential` (a token or an access key, never stored as it is) on
    /// the endpoint `api_id` against `limit` requests per minute; see [`RateLimiter`].
    pub async fn admit(&self, credential: &str, api_id: u32, limit: u32, now: Timestamp) -> Decision {
        self.limiter.check_shared(self.store.as_ref(), credential, api_id, limit, now).await
    }

    /// Whether the store answers (the readiness check).
    ///
    /// # Errors
    /// The store is unreachable.
    pub async fn ready(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    /// The quota day containing `now`, `YYYY-MM-DD` in the quota time zone.
    #[must_use]
    pub fn quota_day(&self, now: Timestamp) -> QuotaDay {
        QuotaDay::of(now, &self.quota_zone)
    }

    /// Validates, deduplicates, charges the quotas and durably stores a submission.
    ///
    /// # Errors
    /// No acceptable URL, a quota exceeded, or the store failing.
    pub async fn submit(
        &self,
        account: &Account,
        submission: Submission,
        now: Timestamp,
    ) -> Result<Submitted, SubmitError> {
        let Validated { kind, mut items, rejected } = submission.urls;
        if items.is_empty() {
            return Err(SubmitError::NothingAccepted { rejected });
        }
        let accepted = items.len();
        if kind == TaskKind::RefreshThenPrefetch {
            // Each URL's prefetch waits for its refresh, which sits at the same position.
            let prefetches: Vec<NewItem> = items
                .iter()
                .enumerate()
                .map(|(i, refresh)| NewItem { kind: Kind::Prefetch, depends_on: Some(i), ..refresh.clone() })
                .collect();
            items.extend(prefetches);
        }
        let day = self.quota_day(now);
        let mut charges: Vec<QuotaCharge> = Vec::new();
        for item in &items {
            let bucket = QuotaBucket::for_items(item.kind, item.item_type);
            match charges.iter_mut().find(|c| c.bucket == bucket) {
                Some(c) => c.amount += 1,
                None => charges.push(QuotaCharge {
                    bucket,
                    day: day.clone(),
                    limit: account.quotas.limit(bucket),
                    amount: 1,
                }),
            }
        }
        let task = NewTask {
            account: account.name.clone(),
            kind,
            operator: submission.operator,
            dialect: submission.dialect.to_owned(),
            address: submission.address,
            created_at: now,
            items,
            idempotency: submission.idempotency,
        };
        let task_id = self.store.create_task(&task, &charges).await.map_err(|e| match e {
            StoreError::QuotaExceeded { bucket, used, limit } => {
                SubmitError::Quota { bucket, limit, remaining: limit.saturating_sub(used) }
            }
            StoreError::IdempotencyConflict => SubmitError::IdempotencyConflict,
            other => SubmitError::Store(other),
        })?;
        (self.on_submit)();
        Ok(Submitted { task_id, accepted, rejected })
    }

    /// Checks each URL of a `kind` submission against the account's domains and the URL rules
    /// (`policy::parse_item_of`), once for every dialect: the accepted URLs become items
    /// (duplicates after normalization merged, a `not_before` in the past dropped), the others
    /// are returned with why.
    #[must_use]
    pub fn validate(&self, account: &Account, kind: TaskKind, urls: Vec<SubmittedUrl>, now: Timestamp) -> Validated {
        let mut seen = HashSet::new();
        let mut items: Vec<NewItem> = Vec::new();
        let mut rejected = Vec::new();
        let first_kind = if kind == TaskKind::Prefetch { Kind::Prefetch } else { Kind::Refresh };
        for SubmittedUrl { url: raw, item_type, not_before } in urls {
            if kind == TaskKind::RefreshThenPrefetch && item_type == ItemType::Dir {
                rejected.push((raw, UrlError::DirNotPrefetchable));
                continue;
            }
            match parse_item_of(first_kind, &raw, item_type, &account.domains) {
                Ok(mut item) => {
                    item.not_before = not_before.filter(|t| *t > now);
                    if seen.insert((item.url.clone(), item.item_type)) {
                        items.push(item);
                    }
                }
                Err(e) => rejected.push((raw, e)),
            }
        }
        Validated { kind, items, rejected }
    }

    /// Checks the tags or regexes of a refresh submission (`target::parse_tag`,
    /// `target::parse_regex`) for the account: the accepted ones become items (duplicates
    /// merged), the others are returned with why.
    #[must_use]
    pub fn validate_targets(&self, account: &Account, targets: SubmittedTargets) -> Validated {
        let mut seen = HashSet::new();
        let mut items: Vec<NewItem> = Vec::new();
        let mut rejected = Vec::new();
        for value in targets.values {
            let parsed = match targets.item_type {
                ItemType::Tag => crate::target::parse_tag(&targets.host, &value, &account.domains),
                ItemType::Regex => {
                    crate::target::parse_regex(&targets.host, &value, targets.confirm_all, &account.domains)
                }
                ItemType::Url | ItemType::Dir => Err(UrlError::Malformed),
            };
            match parsed {
                Ok(item) => {
                    if seen.insert(item.url.clone()) {
                        items.push(item);
                    }
                }
                Err(e) => rejected.push((value, e)),
            }
        }
        Validated { kind: TaskKind::Refresh, items, rejected }
    }

    /// Today's state of one of an account's quotas.
    ///
    /// # Errors
    /// The store failing.
    pub async fn quota(
        &self,
        account: &Account,
        bucket: QuotaBucket,
        now: Timestamp,
    ) -> Result<QuotaState, StoreError> {
        let used = self.store.quota_used(&account.name, bucket, &self.quota_day(now)).await?;
        let limit = account.quotas.limit(bucket);
        Ok(QuotaState { limit, remaining: limit.saturating_sub(used) })
    }

    /// What the queue holds at `now` (for the metrics); items first sent before `half_deadline`
    /// count as past half their deadline.
    ///
    /// # Errors
    /// The store failing.
    pub async fn backlog(&self, now: Timestamp, half_deadline: Timestamp) -> Result<crate::store::Backlog, StoreError> {
        self.store.backlog(now, half_deadline).await
    }

    /// The items of one of the account's tasks; a task of another account reads as empty.
    ///
    /// # Errors
    /// The store failing.
    pub async fn task_items(
        &self,
        account: &Account,
        kind: Kind,
        task_id: TaskId,
        page: PageRequest,
    ) -> Result<Page<ItemRecord>, StoreError> {
        self.store.task_items(&account.name, kind, task_id, page).await
    }

    /// One of the account's tasks, with its counts; `None` for another account's or an unknown one.
    ///
    /// # Errors
    /// The store failing.
    pub async fn task(&self, account: &Account, task_id: TaskId) -> Result<Option<TaskSummary>, StoreError> {
        self.store.task(&account.name, task_id).await
    }

    /// The account's tasks, newest first, at most `limit`.
    ///
    /// # Errors
    /// The store failing.
    pub async fn list_tasks(
        &self,
        account: &Account,
        filter: &TaskFilter<'_>,
        limit: u32,
    ) -> Result<Vec<TaskSummary>, StoreError> {
        self.store.list_tasks(&account.name, filter, limit).await
    }

    /// The account's items, newest first, at most `limit`.
    ///
    /// # Errors
    /// The store failing.
    pub async fn list_items(
        &self,
        account: &Account,
        filter: &ItemFilter<'_>,
        limit: u32,
    ) -> Result<Vec<Item>, StoreError> {
        self.store.list_items(&account.name, filter, limit).await
    }

    /// How many of the account's items match `filter`: the exact total of `list_items`.
    ///
    /// # Errors
    /// The store failing.
    pub async fn count_items(&self, account: &Account, filter: &ItemFilter<'_>) -> Result<u64, StoreError> {
        self.store.count_items(&account.name, filter).await
    }

    /// The node results of the given items of the account.
    ///
    /// # Errors
    /// The store failing.
    pub async fn node_results(
        &self,
        account: &Account,
        item_ids: &[i64],
    ) -> Result<Vec<(i64, NodeResult)>, StoreError> {
        self.store.node_results(&account.name, item_ids).await
    }

    /// Cancels the task's items that were not sent anywhere yet. Returns how many.
    ///
    /// # Errors
    /// The store failing.
    pub async fn cancel(&self, account: &Account, task_id: TaskId, now: Timestamp) -> Result<u64, StoreError> {
        self.store.cancel_waiting(&account.name, task_id, now).await
    }

    /// Queues the task's failed items again (on every node). Returns how many.
    ///
    /// # Errors
    /// The store failing.
    pub async fn retry(&self, account: &Account, task_id: TaskId) -> Result<u64, StoreError> {
        let n = self.store.retry_failed(&account.name, task_id).await?;
        if n > 0 {
            (self.on_submit)();
        }
        Ok(n)
    }

    /// The webhook delivery attempts for the account's task.
    ///
    /// # Errors
    /// The store failing.
    pub async fn deliveries(&self, account: &Account, task_id: TaskId) -> Result<Vec<Delivery>, StoreError> {
        self.store.deliveries(&account.name, task_id).await
    }

    /// Keyset-paged records of the account (the Baidu dialects), ascending by creation.
    ///
    /// # Errors
    /// The store failing.
    pub async fn records(&self, account: &Account, query: RecordQuery<'_>) -> Result<Vec<ItemRecord>, StoreError> {
        self.store.records(&RecordQuery { account: &account.name, ..query }).await
    }

    /// The account's items of one kind created in `[from, to)`, newest first.
    ///
    /// # Errors
    /// The store failing.
    pub async fn window_items(
        &self,
        account: &Account,
        kind: Kind,
        (from, to): (Timestamp, Timestamp),
        url: Option<&str>,
        page: PageRequest,
    ) -> Result<Page<ItemRecord>, StoreError> {
        self.store.window_items(&WindowQuery { account: &account.name, kind, from, to, url, page }).await
    }
}
