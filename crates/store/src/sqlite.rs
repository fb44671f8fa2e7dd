//! The embedded SQLite backend: one file, WAL mode, one writer connection (SQLite admits one
//! writer at a time; a single connection avoids busy errors inside the process) and a small pool
//! of readers. Commits are `synchronous = FULL`: an acknowledged task survives a power cut too.

use crate::backend::{Backend, SqlStore, check_schema_version};
use crate::sql::unavailable;
use crate::sqlite_read::Readers;
use cachectl_core::{AccountName, TaskId};
use cachectl_core::{ItemRecord, Kind, Page, PageRequest, RecordQuery, StoreError, StoreResult, WindowQuery};
use sqlx::Sqlite;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::str::FromStr;
use std::time::Duration;

/// Read-only connections, in each of the two read pools.
const READERS: u32 = 4;

/// The SQLite store.
pub type SqliteStore = SqlStore<Sqlite, SqliteBackend>;

/// What the SQLite store does its own way: the record queries' read path (see `sqlite_read`).
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    read: Readers,
}

/// Whether the writer connection, given back to its pool with no transaction of ours open, may
/// be used again; a connection that still counts an open transaction is closed instead, and the
/// pool opens a new one.
///
/// Some errors (`SQLITE_FULL` when the disk fills, `SQLITE_IOERR`) make SQLite roll the whole
/// transaction back by itself. sqlx's `ROLLBACK` then fails ("no transaction is active") and sqlx
/// keeps counting the transaction as open: its next `begin` issues `SAVEPOINT` instead of `BEGIN`,
/// and after the next failure `ROLLBACK TO SAVEPOINT`, which leaves SQLite's transaction open. From
/// then on every "commit" only released a savepoint inside a transaction that was never committed:
/// tasks were acknowledged and lost, and the file stayed locked until the process ended (the disk
/// full test, `crates/cli/tests/e2e/diskfull.rs`). Closing the connection rolls back whatever it
/// left open, and its successor starts clean.
async fn writer_is_sound(conn: &mut sqlx::SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection;
    // The rollback of a dropped transaction is queued on the connection's worker; waiting for the
    // handle orders this check after it.
    drop(conn.lock_handle().await?);
    if conn.is_in_transaction() {
        tracing::warn!("The SQLite writer connection was left inside a transaction; replacing it.");
        return Ok(false);
    }
    Ok(true)
}

/// The writer's page cache, as SQLite's `cache_size` (negative: KiB): 64 MiB. SQLite's 2 MiB
/// default is smaller than what the node results of a busy fleet touch between two commits: the
/// writer spilled dirty pages into the WAL in the middle of its transactions and read the
/// B-trees' upper pages back from the file over and over (BENCHMARKS.md, "Fleet through the
/// bus").
///
/// The WAL keeps SQLite's checkpoint every 1,000 pages (4 MiB). Checkpointing every 10,000 pages
/// copied fewer pages but let the WAL itself grow to 40 MiB: on a disk with less free space than
/// that, the WAL filled the disk before its first checkpoint, and a checkpoint then had no room
/// to grow the database file, so the store stayed full after the operator freed space (the WAL
/// grew into it again). The disk full test (`crates/cli/tests/e2e/diskfull.rs`, 16 MiB) failed
/// that way; a checkpoint forced on `SQLITE_FULL` failed for the same lack of room.
const WRITER_CACHE_KIB: i64 = -65_536;

impl SqlStore<Sqlite, SqliteBackend> {
    /// Opens (creating if needed) the database at `url` (`sqlite://path` or `sqlite::memory:`)
    /// and, with `migrate`, applies the migrations. Refuses a schema newer than this binary knows.
    ///
    /// # Errors
    /// The file cannot be opened or the migrations fail.
    pub async fn open(url: &str, migrate: bool) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(unavailable)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::unavailable(format!("{}: {e}", dir.display())))?;
        }
        let writer_options = options.clone().pragma("cache_size", WRITER_CACHE_KIB.to_string());
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .after_release(|conn, _| Box::pin(writer_is_sound(conn)))
            .connect_with(writer_options)
            .await
            .map_err(unavailable)?;
        let migrations_table = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'";
        let migrator = crate::migrations::sqlite().await?;
        check_schema_version(&writer, &migrator, migrations_table).await?;
        if migrate {
            migrator.run(&writer).await.map_err(|e| StoreError::Schema(e.to_string()))?;
        }
        // One SQLite file serves one process: leases left by an earlier process (killed before it
        // could release them) are void, so its unfinished items resume at once.
        sqlx::query("UPDATE items SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL")
            .execute(&writer)
            .await
            .map_err(unavailable)?;
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let read = Readers::open(options.get_filename(), in_memory, READERS)?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(options.read_only(true))
            .await
            .map_err(unavailable)?;
        Ok(Self { reader, writer, backend: SqliteBackend { read } })
    }
}

#[async_trait::async_trait]
impl Backend for SqliteBackend {
    type Db = Sqlite;
    const SHARED_COUNTERS: bool = false;

    async fn task_page(
        &self,
        account: &AccountName,
        kind: Kind,
        id: TaskId,
        page: PageRequest,
    ) -> StoreResult<Page<ItemRecord>> {
        self.read.task_page(account.as_str().to_owned(), kind, id, page).await
    }

    async fn window_page(&self, query: &WindowQuery<'_>) -> StoreResult<Page<ItemRecord>> {
        self.read.window_page(query).await
    }

    async fn records(&self, query: &RecordQuery<'_>) -> StoreResult<Vec<ItemRecord>> {
        self.read.records(query).await
    }

    async fn delete_items(conn: &mut sqlx::SqliteConnection, ids: &[i64]) -> StoreResult<()> {
        crate::retention::delete_listed::<Sqlite>(conn, ids).await
    }
}
