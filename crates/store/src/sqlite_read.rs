//! The SQLite read path of the record queries (Baishan by task and by window, the Baidu record
//! pages), on `rusqlite` connections, each owned by a reader thread of its own (see `Readers`),
//! however many statements and rows a query has. Through sqlx every statement is a message to
//! the connection's worker thread and every row a message back, most of a page's cost (see
//! BENCHMARKS.md, "SQLite record queries on rusqlite").
//!
//! The statements are those of `records::sqlite`, which `SqliteStore::explain` checks; writes
//! stay on sqlx's single writer connection.

use crate::records::sqlite as statements;
use cachectl_core::TaskId;
use cachectl_core::{
    ItemRecord, Kind, Page, PageRequest, RecordQuery, StoreError, StoreResult, Timestamp, WindowQuery,
};
use rusqlite::OpenFlags;
use rusqlite::types::Value;
use std::time::Duration;

/// Queries waiting for a reader thread at most; beyond, a query is refused as unavailable (the
/// API answers 503) instead of waiting behind thousands of others.
const QUEUE: usize = 4096;

/// A query for a reader thread: it runs on that thread's connection.
type Job = Box<dyn FnOnce(&rusqlite::Connection) + Send>;

/// Reader threads, each with its own read-only connection, taking queries from one queue.
/// Dropping the last clone closes the queue and the threads end.
///
/// Threads of their own rather than the runtime's: `spawn_blocking` costs a blocking-pool
/// hand-off per query, `block_in_place` a worker hand-off, and running on a worker unannounced
/// would let a cold read stall it. Under load the reader threads take one query after another
/// without sleeping (see BENCHMARKS.md, "SQLite reader threads").
#[derive(Clone)]
pub(crate) struct Readers {
    jobs: flume::Sender<Job>,
    threads: u32,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers").field("threads", &self.threads).finish_non_exhaustive()
    }
}

fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError::unavailable(e)
}

impl Readers {
    /// Opens `size` read-only connections to the database file `filename` (a shared-cache
    /// in-memory database when `in_memory`, as sqlx names it), each on a thread of its own.
    pub(crate) fn open(filename: &std::path::Path, in_memory: bool, size: u32) -> StoreResult<Self> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if in_memory {
            flags |= OpenFlags::SQLITE_OPEN_MEMORY | OpenFlags::SQLITE_OPEN_SHARED_CACHE;
        }
        let (jobs, queue) = flume::bounded::<Job>(QUEUE);
        for i in 0..size {
            let conn = rusqlite::Connection::open_with_flags(filename, flags).map_err(failed)?;
            conn.set_prepared_statement_cache_capacity(64);
            // 16 MiB of page cache per connection (SQLite's default is 2 MiB): the index pages a
            // query walks stay in the connection instead of being read again from the OS.
            conn.pragma_update(None, "cache_size", -16_384).map_err(failed)?;
            conn.busy_timeout(Duration::from_secs(10)).map_err(failed)?;
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("sqlite-reader-{i}"))
                .spawn(move || {
                    while let Ok(job) = queue.recv() {
                        // A panic fails that one query (its answer channel is dropped), not
                        // the thread.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&conn)));
                    }
                })
                .map_err(failed)?;
        }
        Ok(Self { jobs, threads: size })
    }

    /// Runs `f` on the connection of the next free reader thread. Queries wait in the queue,
    /// never on the runtime's threads; under load the reader threads take one query after the
    /// other without sleeping in between.
    async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            // A request that went away while its query waited costs no query.
            if !tx.is_closed() {
                let _ = tx.send(f(conn).map_err(failed));
            }
        });
        self.jobs.try_send(job).map_err(|e| match e {
            flume::TrySendError::Full(_) => failed(format!("{QUEUE} queries are waiting for the SQLite readers")),
            flume::TrySendError::Disconnected(_) => failed("the SQLite reader threads have stopped"),
        })?;
        rx.await.map_err(|_| failed("the query failed on its SQLite reader thread"))?
    }

    /// One page of a task's items, newest first, and how many it has.
    pub(crate) async fn task_page(
        &self,
        account: String,
        kind: Kind,
        task_id: TaskId,
        page: PageRequest,
    ) -> StoreResult<Page<ItemRecord>> {
        let (limit, offset) = (i64::from(page.size), i64::try_from(page.offset()).unwrap_or(i64::MAX));
        let task_id = task_id.get();
        self.run(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let total: i64 = tx
                .prepare_cached(statements::TASK_COUNT)?
                .query_row((task_id, &account, kind.as_str()), |r| r.get(0))?;
            page_of(tx, total, &statements::task_page(), (task_id, &account, kind.as_str(), limit, offset))
        })
        .await
    }

    /// One page of an account's items in a window, newest first, and how many there are.
    pub(crate) async fn window_page(&self, query: &WindowQuery<'_>) -> StoreResult<Page<ItemRecord>> {
        let total = statements::window_total(query);
        let page_sql = statements::window_page(query.url.is_some());
        let (account, kind, url) = (query.account.as_str().to_owned(), query.kind, query.url.map(str::to_owned));
        let (from, to, size) = (query.from.millis(), query.to.millis(), i64::from(query.page.size));
        let offset = i64::try_from(query.page.offset()).unwrap_or(i64::MAX);
        self.run(move |conn| {
            // One snapshot for the total, the skip and the page.
            let tx = conn.unchecked_transaction()?;
            let deep = if url.is_none() && offset >= crate::counters::DEEP_PAGE {
                deep_page(&tx, &account, kind, (from, to), offset)?
            } else {
                None
            };
            let (total, upper, rest) = match deep {
                Some(deep) => deep,
                None => {
                    let total: i64 = tx
                        .prepare_cached(&total.sql)?
                        .query_row(rusqlite::params_from_iter(total.args), |r| r.get(0))?;
                    (total, to, offset)
                }
            };
            let mut args: Vec<Value> = vec![account.into(), kind.as_str().to_owned().into()];
            args.extend(url.map(Value::from));
            args.extend([from.into(), upper.into(), size.into(), rest.into()]);
            page_of(tx, total, &page_sql, rusqlite::params_from_iter(args))
        })
        .await
    }

    /// The Baidu dialects' record page.
    pub(crate) async fn records(&self, query: &RecordQuery<'_>) -> StoreResult<Vec<ItemRecord>> {
        let statement = statements::records_query(query);
        self.run(move |conn| {
            let mut select = conn.prepare_cached(&statement.sql)?;
            let rows = select.query_map(rusqlite::params_from_iter(statement.args), record_from_row)?;
            rows.collect::<rusqlite::Result<_>>()
        })
        .await
    }
}

/// The page of records `sql` selects with `params`, of `total` in all, read in `tx`, which ends.
fn page_of(
    tx: rusqlite::Transaction<'_>,
    total: i64,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<Page<ItemRecord>> {
    let records = tx.prepare_cached(sql)?.query_map(params, record_from_row)?.collect::<rusqlite::Result<_>>()?;
    tx.commit()?;
    Ok(Page { total: u64::try_from(total).unwrap_or(0), records })
}

/// A deep page of the window `[from, to)`: its exact total and where the page starts
/// (`counters::skip_hours`), both from one reading of the counters: the partial hours at the two
/// edges counted on the index, the whole hours from their hourly counters — what
/// `window_total` adds up, read once instead of twice. `None` when the window holds no whole
/// hour to skip by.
fn deep_page(
    conn: &rusqlite::Connection,
    account: &str,
    kind: Kind,
    (from, to): (i64, i64),
    offset: i64,
) -> rusqlite::Result<Option<(i64, i64, i64)>> {
    let (Some((first, end)), _) = crate::counters::split_window(from, to) else {
        return Ok(None);
    };
    let edge = |start: i64, end: i64| -> rusqlite::Result<i64> {
        if start >= end {
            return Ok(0);
        }
        conn.prepare_cached(statements::WINDOW_EDGE_COUNT)?
            .query_row((account, kind.as_str(), start, end), |r| r.get(0))
    };
    let top_start = end * crate::counters::HOUR_MS;
    let top = if top_start < to { Some((top_start, edge(top_start, to)?)) } else { None };
    let bottom = edge(from, first * crate::counters::HOUR_MS)?;
    let hours: Vec<(i64, i64)> = conn
        .prepare_cached(statements::WINDOW_HOURS)?
        .query_map((account, kind.as_str(), first, end), |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let total = bottom + top.map_or(0, |(_, n)| n) + hours.iter().map(|(_, n)| n).sum::<i64>();
    let (upper, rest) = crate::counters::skip_hours(to, top, hours, offset);
    Ok(Some((total, upper, rest)))
}

/// A text column borrowed from the row (no `String` for a value that is only parsed).
fn text<'r>(row: &'r rusqlite::Row<'_>, index: usize) -> rusqlite::Result<&'r str> {
    row.get_ref(index)?
        .as_str()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e)))
}

/// An item record from a row of `RECORD_COLUMNS`, by position.
fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ItemRecord> {
    let (kind, item_type, status, progress) =
        crate::rows::item_enums(text(row, 1)?, text(row, 3)?, text(row, 4)?, row.get(5)?);
    Ok(ItemRecord {
        id: row.get(0)?,
        kind,
        url: row.get(2)?,
        item_type,
        status,
        progress,
        operator: row.get(6)?,
        created_at: Timestamp::from_millis(row.get(7)?),
        not_before: Timestamp::from_millis(row.get(8)?),
        finished_at: row.get::<_, Option<i64>>(9)?.map(Timestamp::from_millis),
        reason: row.get(10)?,
    })
}
