//! The store over one backend (`SqlStore`), and what differs between the SQLite and the
//! PostgreSQL backend beyond the spelling of SQL (`sql::Dialect`): the read path of the dialects'
//! record queries, how a sweep deletes items, and whether instances share the rate counters.
//! Everything else is written once, in the modules of the aggregates (`tasks`, `quotas`, `queue`,
//! `outbox`, `counters`, `records`, `retention`), each implementing its role trait of
//! `cachectl_core::store` for `SqlStore`.

use crate::sql::{Db, Sql, SqlWriter as _, unavailable};
use cachectl_core::store::Health;
use cachectl_core::{AccountName, TaskId};
use cachectl_core::{ItemRecord, Kind, Page, PageRequest, RecordQuery, StoreError, StoreResult, WindowQuery};
use std::time::Duration;

/// What one storage backend does its own way.
#[async_trait::async_trait]
pub(crate) trait Backend: Send + Sync + 'static {
    /// Its sqlx database.
    type Db: Db;

    /// Whether several instances share the database, and with it the rate counters
    /// (`Counters::count_requests`); a database of one process leaves them to it.
    const SHARED_COUNTERS: bool;

    /// One page of task `id`'s items, newest first, with how many it has (`TaskStore::task_items`).
    async fn task_page(
        &self,
        account: &AccountName,
        kind: Kind,
        id: TaskId,
        page: PageRequest,
    ) -> StoreResult<Page<ItemRecord>>;

    /// One page of a window, newest first, with its exact total (`TaskStore::window_items`).
    async fn window_page(&self, query: &WindowQuery<'_>) -> StoreResult<Page<ItemRecord>>;

    /// The Baidu dialects' record page (`TaskStore::records`).
    async fn records(&self, query: &RecordQuery<'_>) -> StoreResult<Vec<ItemRecord>>;

    /// Deletes the items `ids` found by the sweep, with their node results, and takes them off
    /// the hourly counters.
    async fn delete_items(conn: &mut <Self::Db as sqlx::Database>::Connection, ids: &[i64]) -> StoreResult<()>;
}

/// A store: every aggregate's operations over the connections of one database and what its
/// backend does its own way. `SqliteStore` and `PgStore` name its two kinds.
#[derive(Debug, Clone)]
pub struct SqlStore<DB: sqlx::Database, B> {
    /// Reads that see committed data only.
    pub(crate) reader: sqlx::Pool<DB>,
    /// Writes and transactions.
    pub(crate) writer: sqlx::Pool<DB>,
    /// What the backend does its own way.
    pub(crate) backend: B,
}

/// Whether the database answers.
#[async_trait::async_trait]
impl<DB: Db, B: Backend<Db = DB>> Health for SqlStore<DB, B> {
    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.reader.acquire().await.map_err(unavailable)?;
        Sql::<DB>::new().sql("SELECT 1").execute(&mut conn).await?;
        Ok(())
    }
}

/// Refuses to run on a database migrated by a newer cachectl: its schema may mean something this
/// binary would corrupt. `table_sql` names the migrations table if it exists (no row, or NULL,
/// when it does not).
pub(crate) async fn check_schema_version<DB: Db>(
    pool: &sqlx::Pool<DB>,
    migrator: &sqlx::migrate::Migrator,
    table_sql: &str,
) -> StoreResult<()> {
    let mut conn = pool.acquire().await.map_err(unavailable)?;
    let table = Sql::<DB>::new().sql(table_sql).row(&mut conn).await?;
    if table.is_none_or(|row| DB::opt_text(&row, 0).is_none()) {
        return Ok(());
    }
    let newest = newest_migration::<DB>(&mut conn).await?;
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    match newest {
        Some(v) if v > known => Err(StoreError::Schema(format!(
            "the database has schema version {v}, newer than the {known} this cachectl knows; upgrade cachectl"
        ))),
        _ => Ok(()),
    }
}

/// The newest migration applied to the database.
pub(crate) async fn newest_migration<DB: Db>(conn: &mut DB::Connection) -> StoreResult<Option<i64>> {
    let row = Sql::<DB>::new().sql("SELECT MAX(version) FROM _sqlx_migrations").row(conn).await?;
    Ok(row.and_then(|row| DB::opt_int(&row, 0)))
}

/// How long an operation waits for a database connection by default.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// PostgreSQL connections of one instance by default.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// How the store holds its database connections (`[store]` of the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connections {
    /// How long an operation may wait for a connection (for PostgreSQL: while the database is
    /// down, operations fail after this instead of hanging).
    pub acquire_timeout: Duration,
    /// PostgreSQL: the size of each of the two pools (the dialects' record queries, and
    /// everything else; so at most twice this many connections); requests beyond a pool's size
    /// wait for a connection in turn. PostgreSQL runs a backend process per connection; more
    /// connections than the database's cores can run at once only make them take turns (see
    /// BENCHMARKS.md, "PostgreSQL pool of 8 connections"). SQLite ignores it (one writer
    /// connection, a fixed set of readers).
    pub max_connections: u32,
}

impl Default for Connections {
    fn default() -> Self {
        Self { acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT, max_connections: DEFAULT_MAX_CONNECTIONS }
    }
}
