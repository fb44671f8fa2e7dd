//! Webhook delivery: when a task's last item becomes final, every webhook URL of its account
//! receives a POST with the task summary, signed with HMAC-SHA256, retried with backoff, each
//! attempt logged. Works from the store's outbox, so that several instances share the work and
//! a restart loses no notification.

use crate::auth::Secret;
use crate::wire::views::TaskView;
use cachectl_core::store::{Outbox, TaskStore};
use cachectl_core::{Delivery, DeliveryOutcome, WebhookJob};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A configured receiver.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where to POST.
    pub url: String,
    /// The HMAC key.
    pub secret: Secret,
}

/// Attempts per notification before giving up.
pub const MAX_ATTEMPTS: u32 = 8;
/// How long a claimed job stays with this instance.
const LEASE: Duration = Duration::from_secs(60);

/// `sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`: the `X-Cachectl-Signature` header.
#[must_use]
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The wait before attempt `attempts + 1`: 1 s, 2 s, 4 s, … at most 5 minutes.
fn backoff(attempts: u32) -> i64 {
    (1000_i64 << attempts.saturating_sub(1).min(20)).min(300_000)
}

/// Runs the dispatcher until `shutdown`: queues and delivers the notifications of `outbox`, each
/// with its task as `tasks` shows it.
pub async fn run(
    outbox: Arc<dyn Outbox>,
    tasks: Arc<dyn TaskStore>,
    mut directory: tokio::sync::watch::Receiver<Arc<crate::directory::Directory>>,
    shutdown: CancellationToken,
) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "Webhooks disabled: the HTTP client cannot be built.");
            return;
        }
    };
    loop {
        let current = directory.borrow_and_update().clone();
        let targets = &current.webhooks;
        if targets.is_empty() {
            // Nothing to notify until the configuration gains a receiver (SIGHUP).
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = directory.changed() => if changed.is_err() { return },
            }
            continue;
        }
        let urls: HashMap<String, Vec<String>> =
            targets.iter().map(|(account, t)| (account.clone(), t.iter().map(|t| t.url.clone()).collect())).collect();
        let now = crate::clock::now_ms();
        if let Err(e) = outbox.dispatch_finished(&urls, now, 200).await {
            tracing::warn!(error = %e, "Queueing webhook notifications failed; retrying.");
        }
        match outbox.claim_webhook_jobs(now, now.after(LEASE), 32).await {
            Ok(jobs) => {
                let deliveries =
                    jobs.into_iter().map(|job| deliver(outbox.as_ref(), tasks.as_ref(), &http, targets, job));
                futures::future::join_all(deliveries).await;
            }
            Err(e) => tracing::warn!(error = %e, "Claiming webhook jobs failed; retrying."),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

async fn deliver(
    outbox: &dyn Outbox,
    tasks: &dyn TaskStore,
    http: &reqwest::Client,
    targets: &HashMap<String, Vec<Target>>,
    job: WebhookJob,
) {
    let attempt = job.attempts + 1;
    let Some(target) = targets.get(job.account.as_str()).and_then(|t| t.iter().find(|t| t.url == job.url)) else {
        // The URL was removed from the configuration: nothing to deliver to.
        let at = crate::clock::now_ms();
        let log = Delivery {
            task_id: job.task_id,
            url: job.url.clone(),
            attempt,
            status_code: None,
            error: Some("no longer configured".into()),
            at,
        };
        let _ = outbox.record_delivery(&job, &log, DeliveryOutcome::GaveUp).await;
        return;
    };
    let task = match tasks.task(&job.account, job.task_id).await {
        Ok(Some(task)) => task,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "Reading a task for its webhook failed; the job is retried.");
            return;
        }
    };
    let body = serde_json::to_vec(&serde_json::json!({"event": "task.finished", "task": TaskView::from(&task)}))
        .unwrap_or_default();
    let timestamp = crate::clock::now_ms().millis() / 1000;
    let result = http
        .post(&target.url)
        .header("content-type", "application/json")
        .header("x-cachectl-event", "task.finished")
        .header("x-cachectl-delivery", format!("{}-{attempt}", job.id))
        .header("x-cachectl-timestamp", timestamp.to_string())
        .header("x-cachectl-signature", signature(target.secret.expose(), timestamp, &body))
        .body(body)
        .send()
        .await;
    let at = crate::clock::now_ms();
    let (status_code, error) = match result {
        Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
        Ok(r) => (Some(r.status().as_u16()), Some(format!("receiver answered HTTP {}", r.status().as_u16()))),
        Err(e) => (None, Some(format!("request failed: {e}"))),
    };
    let outcome = if error.is_none() {
        DeliveryOutcome::Delivered
    } else if attempt >= MAX_ATTEMPTS {
        DeliveryOutcome::GaveUp
    } else {
        DeliveryOutcome::RetryAt(at.plus_millis(backoff(attempt)))
    };
    tracing::debug!(task = job.task_id.get(), url = %job.url, attempt, ?outcome, "Webhook delivery attempted.");
    let log = Delivery { task_id: job.task_id, url: job.url.clone(), attempt, status_code, error, at };
    if let Err(e) = outbox.record_delivery(&job, &log, outcome).await {
        tracing::warn!(error = %e, "Recording a webhook delivery failed.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_cover_timestamp_and_body() {
        let a = signature("s3cret", 1_700_000_000, b"{}");
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64);
        assert_ne!(a, signature("s3cret", 1_700_000_001, b"{}"));
        assert_ne!(a, signature("other", 1_700_000_000, b"{}"));
        assert_eq!(backoff(1), 1000);
        assert_eq!(backoff(3), 4000);
        assert_eq!(backoff(30), 300_000);
    }
}
