//! The webhook outbox: a job per configured URL for every finished task, leased to the sender,
//! and the log of its delivery attempts.

use crate::backend::{Backend, SqlStore};
use crate::sql::{Db, Get as _, Sql, SqlWriter as _, unavailable};
use cachectl_core::store::Outbox;
use cachectl_core::{AccountName, TaskId};
use cachectl_core::{Delivery, DeliveryOutcome, StoreResult, Timestamp, WebhookJob};
use std::collections::HashMap;

/// Up to `?1` finished tasks whose notifications are not queued yet.
const FINISHED: &str =
    "SELECT id, account FROM tasks WHERE finished_at IS NOT NULL AND notified = 0 ORDER BY id LIMIT ?1";

/// Queues (or queues again) the notification of task `?1` of account `?2` to URL `?3` at `?4`.
const QUEUE_JOB: &str = "INSERT INTO webhook_jobs (task_id, account, url, next_at) VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (task_id, url) DO UPDATE SET state = 'pending', attempts = 0, next_at = excluded.next_at";

const NOTIFIED: &str = "UPDATE tasks SET notified = 1 WHERE id = ?1";

/// Leases to `?1` up to `?4` jobs due at `?2` (`?3` = `?2`) whose lease is free or expired.
const CLAIM_JOBS: &str = "UPDATE webhook_jobs SET lease_until = ?1 WHERE id IN (SELECT id FROM webhook_jobs \
     WHERE state = 'pending' AND next_at <= ?2 AND (lease_until IS NULL OR lease_until < ?3) \
     ORDER BY next_at LIMIT ?4 {lock}) RETURNING id, task_id, account, url, attempts";

const LOG_DELIVERY: &str = "INSERT INTO webhook_deliveries (job_id, task_id, account, url, attempt, status_code, \
     error, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// Moves job `?4` on after attempt `?2`: its state `?1`, due again at `?3`, its lease ended.
const MOVE_JOB: &str =
    "UPDATE webhook_jobs SET state = ?1, attempts = ?2, next_at = ?3, lease_until = NULL WHERE id = ?4";

const DELIVERIES: &str = "SELECT task_id, url, attempt, status_code, error, at FROM webhook_deliveries \
     WHERE account = ?1 AND task_id = ?2 ORDER BY id";

/// The webhook outbox.
#[async_trait::async_trait]
impl<DB: Db, B: Backend<Db = DB>> Outbox for SqlStore<DB, B> {
    async fn dispatch_finished(
        &self,
        urls: &HashMap<String, Vec<String>>,
        now: Timestamp,
        limit: u32,
    ) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let rows = Sql::<DB>::new().template(FINISHED, &[i64::from(limit).into()]).rows(&mut tx).await?;
        for row in &rows {
            let task_id = row.int("id");
            let account = row.text("account");
            for url in urls.get(&account).into_iter().flatten() {
                let args = [task_id.into(), (&account).into(), url.into(), now.into()];
                Sql::<DB>::new().template(QUEUE_JOB, &args).execute(&mut tx).await?;
            }
            Sql::<DB>::new().template(NOTIFIED, &[task_id.into()]).execute(&mut tx).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(rows.len() as u64)
    }

    async fn claim_webhook_jobs(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<WebhookJob>> {
        let mut conn = self.writer.acquire().await.map_err(unavailable)?;
        let args = [lease_until.into(), now.into(), now.into(), i64::from(limit).into()];
        let rows = Sql::<DB>::new().template(CLAIM_JOBS, &args).rows(&mut conn).await?;
        Ok(rows
            .iter()
            .map(|r| WebhookJob {
                id: r.int("id"),
                task_id: r.task_id("task_id"),
                account: AccountName::new(r.text("account")),
                url: r.text("url"),
                attempts: u32::try_from(r.int("attempts")).unwrap_or(0),
            })
            .collect())
    }

    async fn record_delivery(&self, job: &WebhookJob, attempt: &Delivery, outcome: DeliveryOutcome) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let args = [
            job.id.into(),
            job.task_id.into(),
            (&job.account).into(),
            (&job.url).into(),
            i64::from(attempt.attempt).into(),
            attempt.status_code.map(i64::from).into(),
            attempt.error.as_deref().into(),
            attempt.at.into(),
        ];
        Sql::<DB>::new().template(LOG_DELIVERY, &args).execute(&mut tx).await?;
        let (state, next_at) = match outcome {
            DeliveryOutcome::Delivered => ("delivered", attempt.at),
            DeliveryOutcome::RetryAt(at) => ("pending", at),
            DeliveryOutcome::GaveUp => ("failed", attempt.at),
        };
        let args = [state.into(), i64::from(attempt.attempt).into(), next_at.into(), job.id.into()];
        Sql::<DB>::new().template(MOVE_JOB, &args).execute(&mut tx).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }
}

/// `TaskStore::deliveries`: the log of task `task_id` of `account`, read on `pool`.
pub(crate) async fn deliveries<DB: Db>(
    pool: &sqlx::Pool<DB>,
    account: &AccountName,
    task_id: TaskId,
) -> StoreResult<Vec<Delivery>> {
    let mut conn = pool.acquire().await.map_err(unavailable)?;
    let rows = Sql::<DB>::new().template(DELIVERIES, &[account.into(), task_id.into()]).rows(&mut conn).await?;
    Ok(rows
        .iter()
        .map(|r| Delivery {
            task_id: r.task_id("task_id"),
            url: r.text("url"),
            attempt: u32::try_from(r.int("attempt")).unwrap_or(0),
            status_code: r.opt_int("status_code").and_then(|c| u16::try_from(c).ok()),
            error: r.opt_text("error"),
            at: r.time("at"),
        })
        .collect())
}
