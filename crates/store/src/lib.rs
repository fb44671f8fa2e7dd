//! Storage backends behind `cachectl_core::Store`. The backend is chosen by the scheme of
//! `store.url`; each backend owns its SQL and its migrations, and knows nothing of dialects.

mod rows;
pub mod sqlite;

use cachectl_core::{Store, StoreError};
use std::sync::Arc;

pub use sqlite::SqliteStore;

/// Opens the store named by `url`: `sqlite://path/to/file.db` (or `sqlite::memory:`).
///
/// # Errors
/// An unsupported scheme, or the backend failing to open or migrate.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::open(url).await?));
    }
    Err(StoreError::Unavailable(format!("store.url {url:?}: unsupported scheme (this build supports sqlite://)")))
}
