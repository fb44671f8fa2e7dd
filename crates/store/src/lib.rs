//! Storage backends behind `cachectl_core::Store`. The backend is chosen by the scheme of
//! `store.url`; it knows nothing of dialects.
//!
//! The store is written by aggregate, each module implementing its role trait of
//! `cachectl_core::store` once for both backends: `tasks` (tasks, items, the native API's reads),
//! `quotas`, `queue` (leases and worker reports), `outbox` (webhooks), `counters` (hourly item
//! counters and shared rate counters), `records` (the dialects' record pages, each backend's own
//! read path), `retention` (the sweep) and `admin` (the admin API's accounts, credentials and
//! edges, and the audit log). `sql` writes and runs the statements, `backend` holds
//! what the two backends do their own way, `sqlite` and `postgres` open them, each with its own
//! migrations (`migrations/<backend>/`).

mod admin;
mod backend;
mod counters;
mod migrations;
mod outbox;
#[cfg(any(test, feature = "plans"))]
mod plans;
pub mod postgres;
mod queue;
mod quotas;
mod records;
mod retention;
mod rows;
mod sql;
pub mod sqlite;
mod sqlite_read;
mod tasks;

use cachectl_core::{Store, StoreError};
use std::sync::Arc;

pub use backend::{Connections, DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, SqlStore};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Opens the store named by `url`: `sqlite://path/to/file.db` (or `sqlite::memory:`), or
/// `postgres://user@host:port/db`. With `migrate`, brings the schema up to date first; either
/// way a schema newer than this binary is refused.
///
/// # Errors
/// An unsupported scheme, or the backend failing to open or migrate.
pub async fn open(url: &str, migrate: bool) -> Result<Arc<dyn Store>, StoreError> {
    open_with(url, migrate, Connections::default()).await
}

/// `open`, with the connections' settings.
///
/// # Errors
/// As `open`.
pub async fn open_with(url: &str, migrate: bool, connections: Connections) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::open(url, migrate).await?));
    }
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        return Ok(Arc::new(PgStore::open(url, migrate, connections).await?));
    }
    Err(StoreError::unavailable("store.url: unsupported scheme; use sqlite:// or postgres://"))
}

/// Whether `url` names a backend this build supports.
#[must_use]
pub fn supported(url: &str) -> bool {
    ["sqlite:", "postgres:", "postgresql:"].iter().any(|scheme| url.starts_with(scheme))
}
