//! The PostgreSQL backend, for several `cachectl serve` instances sharing one database: the work
//! queue is claimed with `FOR UPDATE SKIP LOCKED` under leases, quota charges are conditional
//! upserts, and the Baishan rate-limit counters live here so that limits hold across instances.

use crate::backend::{Backend, SqlStore, check_schema_version, newest_migration};
use crate::records::postgres::{self as records, PING_WHEN_IDLE, Reads};
use crate::sql::unavailable;
use cachectl_core::{AccountName, TaskId};
use cachectl_core::{ItemRecord, Kind, Page, PageRequest, RecordQuery, StoreError, StoreResult, WindowQuery};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgPool, Postgres};
use std::str::FromStr;

/// The PostgreSQL store.
pub type PgStore = SqlStore<Postgres, PgBackend>;

/// What the PostgreSQL store does its own way: the record queries on a pool of their own.
#[derive(Debug, Clone)]
pub struct PgBackend {
    reads: Reads,
}

impl SqlStore<Postgres, PgBackend> {
    /// Connects to `url` (`postgres://user@host:port/db`). With `migrate`, applies the migrations
    /// first (under PostgreSQL's advisory lock, so instances starting together are safe).
    /// Refuses a schema newer than this binary knows either way.
    ///
    /// # Errors
    /// The database cannot be reached, or the schema is newer or cannot be migrated.
    pub async fn open(url: &str, migrate: bool, connections: crate::backend::Connections) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url).map_err(unavailable)?;
        let pool = connect_pool(options.clone(), connections).await?;
        let reads = records::connect(options, connections)?;
        let migrator = crate::migrations::postgres().await?;
        check_schema_version(&pool, &migrator, "SELECT to_regclass('_sqlx_migrations')::text").await?;
        if migrate {
            migrator.run(&pool).await.map_err(|e| StoreError::Schema(e.to_string()))?;
        } else {
            let mut conn = pool.acquire().await.map_err(unavailable)?;
            let applied = newest_migration::<Postgres>(&mut conn).await.map_err(|_| {
                StoreError::Schema("the database has no cachectl schema; run `cachectl migrate`".into())
            })?;
            let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
            if applied.unwrap_or(0) < known {
                return Err(StoreError::Schema(format!(
                    "the database schema is at version {}, this cachectl needs {known}; run `cachectl migrate`",
                    applied.unwrap_or(0)
                )));
            }
        }
        Ok(Self { reader: pool.clone(), writer: pool, backend: PgBackend { reads } })
    }
}

/// The pool of everything but the record queries: writes, the queue, the native API, migrations.
async fn connect_pool(options: PgConnectOptions, connections: crate::backend::Connections) -> StoreResult<PgPool> {
    PgPoolOptions::new()
        .max_connections(connections.max_connections.max(1))
        // sqlx pings a connection when it is returned (and drops it if that fails); pinging
        // again when it is taken is one more round trip per query (see BENCHMARKS.md,
        // "PostgreSQL ping only after a second idle"). Only a connection idle for a while,
        // which a database restart may have cut since, is pinged before use.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_WHEN_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        // A request waits at most this long for a connection while the database is down,
        // then fails with 503 instead of hanging.
        .acquire_timeout(connections.acquire_timeout)
        .connect_with(options)
        .await
        .map_err(unavailable)
}

#[async_trait::async_trait]
impl Backend for PgBackend {
    type Db = Postgres;
    const SHARED_COUNTERS: bool = true;

    async fn task_page(
        &self,
        account: &AccountName,
        kind: Kind,
        id: TaskId,
        page: PageRequest,
    ) -> StoreResult<Page<ItemRecord>> {
        records::task_page(&self.reads, account, kind, id, page).await
    }

    async fn window_page(&self, query: &WindowQuery<'_>) -> StoreResult<Page<ItemRecord>> {
        records::window_page(&self.reads, query).await
    }

    async fn records(&self, query: &RecordQuery<'_>) -> StoreResult<Vec<ItemRecord>> {
        records::records(&self.reads, query).await
    }

    async fn delete_items(conn: &mut sqlx::PgConnection, ids: &[i64]) -> StoreResult<()> {
        crate::retention::delete_array(conn, ids).await
    }
}
