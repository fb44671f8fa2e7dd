//! The retention sweep: deletes records older than the retention in small batches, each its own
//! short transaction, so that queries and submissions never wait long behind it.

use cachectl_core::store::Retention;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs one sweep to completion: deletes every item created more than `days` ago.
///
/// # Errors
/// The store failing; what was deleted stays deleted.
pub async fn sweep_once(store: &dyn Retention, days: u32, batch: u32) -> Result<u64, cachectl_core::StoreError> {
    let before = crate::clock::now_ms().plus_millis(-i64::from(days) * 86_400_000);
    let mut total = 0;
    loop {
        let deleted = store.sweep(before, batch).await?;
        total += deleted;
        if deleted < u64::from(batch) {
            return Ok(total);
        }
        // Let other writers in between two batches.
        tokio::task::yield_now().await;
    }
}

/// Sweeps at start and then every `interval` until `shutdown`.
pub async fn run(store: Arc<dyn Retention>, days: u32, batch: u32, interval: Duration, shutdown: CancellationToken) {
    loop {
        match sweep_once(store.as_ref(), days, batch).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, days, "Retention sweep deleted old records."),
            Err(e) => {
                tracing::warn!(error = %e, "Retention sweep failed; trying again next interval.")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
