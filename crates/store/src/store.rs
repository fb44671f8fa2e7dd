//! `Store` for every backend: each operation is its aggregate's.

use crate::backend::{Backend, SqlStore};
use crate::sql::{Db, Sql, SqlWriter as _, unavailable};
use cachectl_core::{
    ClaimedItem, Delivery, DeliveryOutcome, Item, ItemFilter, ItemRecord, ItemUpdate, Kind, Millis, NewTask,
    NodeResult, Page, PageRequest, QuotaBucket, QuotaCharge, RecordQuery, Store, StoreResult, TaskFilter, TaskSummary,
    WebhookJob, WindowQuery,
};
use std::collections::HashMap;

#[async_trait::async_trait]
impl<DB: Db, B: Backend<Db = DB>> Store for SqlStore<DB, B> {
    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.reader.acquire().await.map_err(unavailable)?;
        Sql::<DB>::new().sql("SELECT 1").execute(&mut conn).await?;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(account = %task.account, items = task.items.len()))]
    async fn create_task(&self, task: &NewTask, charges: &[QuotaCharge]) -> StoreResult<i64> {
        crate::tasks::create_task(self, task, charges).await
    }

    async fn quota_used(&self, account: &str, bucket: QuotaBucket, day: &str) -> StoreResult<u64> {
        crate::quotas::quota_used(self, account, bucket, day).await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn task_items(
        &self,
        account: &str,
        kind: Kind,
        task_id: i64,
        page: PageRequest,
    ) -> StoreResult<Page<ItemRecord>> {
        self.backend.task_page(account, kind, task_id, page).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(account = query.account))]
    async fn window_items(&self, query: &WindowQuery<'_>) -> StoreResult<Page<ItemRecord>> {
        self.backend.window_page(query).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(account = query.account))]
    async fn records(&self, query: &RecordQuery<'_>) -> StoreResult<Vec<ItemRecord>> {
        self.backend.records(query).await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn claim_items(
        &self,
        owner: &str,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedItem>> {
        crate::queue::claim(self, owner, now, lease_until, limit).await
    }

    async fn renew_leases(&self, owner: &str, lease_until: Millis) -> StoreResult<u64> {
        crate::queue::renew(self, owner, lease_until).await
    }

    async fn release_leases(&self, owner: &str) -> StoreResult<()> {
        crate::queue::release(self, owner).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(updates = updates.len()))]
    async fn apply_updates(&self, updates: &[ItemUpdate]) -> StoreResult<()> {
        crate::queue::apply_updates(self, updates).await
    }

    async fn task(&self, account: &str, task_id: i64) -> StoreResult<Option<TaskSummary>> {
        crate::tasks::task(self, account, task_id).await
    }

    async fn list_tasks(&self, account: &str, filter: &TaskFilter<'_>, limit: u32) -> StoreResult<Vec<TaskSummary>> {
        crate::tasks::list_tasks(self, account, filter, limit).await
    }

    async fn list_items(&self, account: &str, filter: &ItemFilter<'_>, limit: u32) -> StoreResult<Vec<Item>> {
        crate::tasks::list_items(self, account, filter, limit).await
    }

    async fn node_results(&self, account: &str, item_ids: &[i64]) -> StoreResult<Vec<(i64, NodeResult)>> {
        crate::tasks::node_results(self, account, item_ids).await
    }

    async fn cancel_waiting(&self, account: &str, task_id: i64, now: Millis) -> StoreResult<u64> {
        crate::tasks::cancel_waiting(self, account, task_id, now).await
    }

    async fn retry_failed(&self, account: &str, task_id: i64) -> StoreResult<u64> {
        crate::tasks::retry_failed(self, account, task_id).await
    }

    async fn dispatch_finished(
        &self,
        urls: &HashMap<String, Vec<String>>,
        now: Millis,
        limit: u32,
    ) -> StoreResult<u64> {
        crate::outbox::dispatch_finished(self, urls, now, limit).await
    }

    async fn claim_webhook_jobs(&self, now: Millis, lease_until: Millis, limit: u32) -> StoreResult<Vec<WebhookJob>> {
        crate::outbox::claim_jobs(self, now, lease_until, limit).await
    }

    async fn record_delivery(&self, job: &WebhookJob, attempt: &Delivery, outcome: DeliveryOutcome) -> StoreResult<()> {
        crate::outbox::record_delivery(self, job, attempt, outcome).await
    }

    async fn deliveries(&self, account: &str, task_id: i64) -> StoreResult<Vec<Delivery>> {
        crate::outbox::deliveries(self, account, task_id).await
    }

    async fn count_requests(&self, credential: &str, api_id: u32, minute: i64, n: u32) -> StoreResult<Option<u64>> {
        crate::counters::count_requests(self, credential, api_id, minute, n).await
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn sweep(&self, before: Millis, batch: u32) -> StoreResult<u64> {
        crate::retention::sweep(self, before, batch).await
    }
}
