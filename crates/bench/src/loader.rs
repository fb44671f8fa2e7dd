//! The bulk loader of scenario 3: fills a store migrated by the service itself with a synthetic
//! history (tasks of 100 URLs over N days and M accounts) written directly with sqlx — never
//! through the API — keeping `tasks`, `items` and `item_counts` consistent. The dataset is a
//! pure function of its parameters, so the exact totals a query must answer are computed here,
//! independently of the server.

use anyhow::Context;
use serde::Serialize;
use sqlx::{Connection, Executor, QueryBuilder, Row};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

/// Milliseconds since the epoch.
pub type Timestamp = i64;

const HOUR_MS: Timestamp = 3_600_000;
const DAY_MS: Timestamp = 86_400_000;
/// Items per loaded task (a task the Baishan dialect accepts holds up to 1,000).
pub const TASK_SIZE: u64 = 100;
/// Distinct directories per account: every URL recurs about every 50 tasks of its account.
const DIRS: u64 = 50;
/// The operator recorded on loaded tasks and items.
const OPERATOR: &str = "bulk-loader";

/// A synthetic history.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Dataset {
    /// Items in all.
    pub items: u64,
    /// Accounts the tasks rotate over.
    pub accounts: usize,
    /// Days the tasks are spread over, ending at `end`.
    pub days: u32,
    /// The creation time of the last task.
    pub end: Timestamp,
}

/// One loaded task, as the generator defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskDef {
    /// Its id (1-based, as the store's sequence would give).
    pub id: i64,
    /// Its account index.
    pub account: usize,
    /// Its creation time (all its items share it, as in the service).
    pub created_at: Timestamp,
    /// Its item count.
    pub size: u64,
    /// The id of its first item.
    pub first_item: i64,
}

impl Dataset {
    /// Number of tasks.
    #[must_use]
    pub fn tasks(&self) -> u64 {
        self.items.div_ceil(TASK_SIZE)
    }

    fn span(&self) -> Timestamp {
        Timestamp::from(self.days) * DAY_MS - 60_000
    }

    /// Task `t` (0-based).
    #[must_use]
    pub fn task(&self, t: u64) -> TaskDef {
        let tasks = self.tasks();
        let size = if t + 1 == tasks { self.items - t * TASK_SIZE } else { TASK_SIZE };
        let step = i128::from(self.span()) * i128::from(t) / i128::from(tasks.max(1));
        TaskDef {
            id: i64::try_from(t + 1).unwrap_or(i64::MAX),
            account: usize::try_from(t % self.accounts as u64).unwrap_or(0),
            created_at: self.end - self.span() + i64::try_from(step).unwrap_or(0),
            size,
            first_item: i64::try_from(t * TASK_SIZE + 1).unwrap_or(i64::MAX),
        }
    }

    /// The host of account `a`'s URLs.
    #[must_use]
    pub fn host(account: usize) -> String {
        format!("www.{}.test", crate::fixtures::account_name(account))
    }

    /// The URL of item `i` of task `t`.
    #[must_use]
    pub fn url(&self, t: u64, i: u64) -> String {
        format!("http://{}/static/d{}/{i}.css", Self::host(self.task(t).account), (t / self.accounts as u64) % DIRS)
    }

    /// Items of `account` created in `[from, to)`.
    #[must_use]
    pub fn count_window(&self, account: usize, from: Timestamp, to: Timestamp) -> u64 {
        (0..self.tasks())
            .map(|t| self.task(t))
            .filter(|d| d.account == account && d.created_at >= from && d.created_at < to)
            .map(|d| d.size)
            .sum()
    }

    /// Records of one URL of `account` created in `[from, to)`.
    #[must_use]
    pub fn count_url(&self, account: usize, url: &str, from: Timestamp, to: Timestamp) -> u64 {
        (0..self.tasks())
            .filter(|&t| {
                let d = self.task(t);
                d.account == account && d.created_at >= from && d.created_at < to
            })
            .map(|t| (0..self.task(t).size).filter(|&i| self.url(t, i) == url).count() as u64)
            .sum()
    }

    /// The first task of `account` created at or after `at`.
    #[must_use]
    pub fn task_of(&self, account: usize, at: Timestamp) -> Option<TaskDef> {
        (0..self.tasks()).map(|t| self.task(t)).find(|d| d.account == account && d.created_at >= at)
    }
}

/// What loading took and left on disk.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFigures {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// Items written.
    pub items: u64,
    /// Tasks written.
    pub tasks: u64,
    /// Wall time of the load, indexes included, seconds.
    pub seconds: f64,
    /// Items per second.
    pub items_per_s: f64,
    /// Store size after the load, MiB (SQLite: file and WAL; PostgreSQL: the database).
    pub store_mib: f64,
    /// Store size per million items, MiB.
    pub mib_per_million_items: f64,
}

fn figures(backend: &str, dataset: &Dataset, start: Instant, bytes: u64) -> LoadFigures {
    let seconds = start.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let (items, mib) = (dataset.items as f64, bytes as f64 / 1_048_576.0);
    LoadFigures {
        backend: backend.into(),
        items: dataset.items,
        tasks: dataset.tasks(),
        seconds,
        items_per_s: items / seconds,
        store_mib: mib,
        mib_per_million_items: if items > 0.0 { mib / (items / 1e6) } else { 0.0 },
    }
}

/// Item counts per (account, hour), as `item_counts` must hold them.
fn hourly_counts(dataset: &Dataset) -> BTreeMap<(usize, Timestamp), u64> {
    let mut counts = BTreeMap::new();
    for t in 0..dataset.tasks() {
        let d = dataset.task(t);
        *counts.entry((d.account, d.created_at.div_euclid(HOUR_MS))).or_insert(0) += d.size;
    }
    counts
}

/// Loads `dataset` into the SQLite file at `url` (`sqlite://PATH`), which must not be in use.
/// The schema is the service's: the file is migrated by `cachectl_server::migrate` first. The
/// items table's secondary indexes are dropped during the load and recreated from their own
/// definitions afterwards (sorting once is far faster than 10 million random index inserts).
///
/// # Errors
/// The store fails.
pub async fn load_sqlite(url: &str, dataset: &Dataset) -> anyhow::Result<LoadFigures> {
    let start = Instant::now();
    cachectl_server::migrate(url).await.context("migrating the store")?;
    let path = url.trim_start_matches("sqlite://").to_owned();
    let mut conn = sqlx::SqliteConnection::connect(url).await?;
    for pragma in ["PRAGMA synchronous = OFF", "PRAGMA cache_size = -524288", "PRAGMA temp_store = MEMORY"] {
        conn.execute(pragma).await?;
    }
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'items' AND sql IS NOT NULL",
    )
    .fetch_all(&mut conn)
    .await?;
    for (name, _) in &indexes {
        conn.execute(format!("DROP INDEX {name}").as_str()).await?;
    }
    // 16 bound values a row, 500 rows a statement: within SQLite's 32,766 variables.
    const ROWS: usize = 500;
    let mut tx = conn.begin().await?;
    let mut pending = 0u64;
    for t0 in (0..dataset.tasks()).step_by(ROWS) {
        let ts: Vec<TaskDef> = (t0..(t0 + ROWS as u64).min(dataset.tasks())).map(|t| dataset.task(t)).collect();
        let mut insert: QueryBuilder<'_, sqlx::Sqlite> =
            QueryBuilder::new("INSERT INTO tasks (id, account, kind, operator, dialect, created_at) ");
        insert.push_values(&ts, |mut row, d| {
            row.push_bind(d.id)
                .push_bind(crate::fixtures::account_name(d.account))
                .push_bind("refresh")
                .push_bind(OPERATOR)
                .push_bind("baishan")
                .push_bind(d.created_at);
        });
        insert.build().execute(&mut *tx).await?;
    }
    let mut rows = Vec::with_capacity(ROWS);
    for t in 0..dataset.tasks() {
        let d = dataset.task(t);
        for i in 0..d.size {
            rows.push((d, i));
            if rows.len() == ROWS {
                insert_items_sqlite(&mut tx, dataset, &rows).await?;
                pending += rows.len() as u64;
                rows.clear();
            }
        }
        if pending >= 200_000 {
            tx.commit().await?;
            tx = conn.begin().await?;
            pending = 0;
        }
    }
    if !rows.is_empty() {
        insert_items_sqlite(&mut tx, dataset, &rows).await?;
    }
    for ((account, hour), n) in hourly_counts(dataset) {
        sqlx::query(
            "INSERT INTO item_counts (account, kind, hour, n) VALUES (?, 'refresh', ?, ?)
             ON CONFLICT (account, kind, hour) DO UPDATE SET n = n + excluded.n",
        )
        .bind(crate::fixtures::account_name(account))
        .bind(hour)
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    for (_, sql) in &indexes {
        conn.execute(sql.as_str()).await?;
    }
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").await?;
    conn.close().await?;
    let size = |p: &str| std::fs::metadata(p).map_or(0, |m| m.len());
    let bytes = size(&path) + size(&format!("{path}-wal"));
    Ok(figures("sqlite", dataset, start, bytes))
}

async fn insert_items_sqlite(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    dataset: &Dataset,
    rows: &[(TaskDef, u64)],
) -> anyhow::Result<()> {
    let mut insert: QueryBuilder<'_, sqlx::Sqlite> = QueryBuilder::new(
        "INSERT INTO items (id, task_id, account, kind, url, host, item_type, status, progress, operator, \
         created_at, not_before, started_at, finished_at, reason, lease_owner) ",
    );
    insert.push_values(rows, |mut row, (d, i)| {
        let t = u64::try_from(d.id - 1).unwrap_or(0);
        row.push_bind(d.first_item + i64::try_from(*i).unwrap_or(0))
            .push_bind(d.id)
            .push_bind(crate::fixtures::account_name(d.account))
            .push_bind("refresh")
            .push_bind(dataset.url(t, *i))
            .push_bind(Dataset::host(d.account))
            .push_bind("url")
            .push_bind("completed")
            .push_bind(100_i64)
            .push_bind(OPERATOR)
            .push_bind(d.created_at)
            .push_bind(d.created_at)
            .push_bind(d.created_at + 2)
            .push_bind(d.created_at + 9)
            .push_bind(None::<String>)
            .push_bind(None::<String>);
    });
    insert.build().execute(&mut **tx).await?;
    Ok(())
}

/// Loads `dataset` into the PostgreSQL database at `url` (empty), migrated by the service first.
/// Rows go in with `COPY`; the items table's secondary indexes are dropped and recreated from
/// their own definitions, foreign-key triggers are off for the loading session
/// (`session_replication_role = replica`: the loader writes every task before its items), and
/// the tables are analyzed at the end, as autovacuum would after such a load.
///
/// Longer than the house limit on purpose: a linear script of steps that each use the previous
/// one's results, read top to bottom like the scenario's description in BENCHMARKS.md.
///
/// # Errors
/// The store fails.
pub async fn load_postgres(url: &str, dataset: &Dataset) -> anyhow::Result<LoadFigures> {
    let start = Instant::now();
    cachectl_server::migrate(url).await.context("migrating the store")?;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    conn.execute("SET session_replication_role = replica").await?;
    conn.execute("SET maintenance_work_mem = '512MB'").await?;
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname::text, indexdef FROM pg_indexes WHERE tablename = 'items' AND indexname <> 'items_pkey'",
    )
    .fetch_all(&mut conn)
    .await?;
    for (name, _) in &indexes {
        conn.execute(format!("DROP INDEX {name}").as_str()).await?;
    }
    let mut copy = conn.copy_in_raw("COPY tasks (id, account, kind, operator, dialect, created_at) FROM STDIN").await?;
    let mut buf = String::new();
    for t in 0..dataset.tasks() {
        let d = dataset.task(t);
        let _ = writeln!(
            buf,
            "{}\t{}\trefresh\t{OPERATOR}\tbaishan\t{}",
            d.id,
            crate::fixtures::account_name(d.account),
            d.created_at
        );
        if buf.len() > 1 << 20 {
            copy.send(std::mem::take(&mut buf).into_bytes()).await?;
        }
    }
    copy.send(std::mem::take(&mut buf).into_bytes()).await?;
    copy.finish().await?;
    let mut copy = conn
        .copy_in_raw(
            "COPY items (id, task_id, account, kind, url, host, item_type, status, progress, operator, \
             created_at, not_before, started_at, finished_at) FROM STDIN",
        )
        .await?;
    for t in 0..dataset.tasks() {
        let d = dataset.task(t);
        let (account, host) = (crate::fixtures::account_name(d.account), Dataset::host(d.account));
        for i in 0..d.size {
            let _ = writeln!(
                buf,
                "{}\t{}\t{account}\trefresh\t{}\t{host}\turl\tcompleted\t100\t{OPERATOR}\t{}\t{}\t{}\t{}",
                d.first_item + i64::try_from(i).unwrap_or(0),
                d.id,
                dataset.url(t, i),
                d.created_at,
                d.created_at,
                d.created_at + 2,
                d.created_at + 9
            );
        }
        if buf.len() > 4 << 20 {
            copy.send(std::mem::take(&mut buf).into_bytes()).await?;
        }
    }
    copy.send(std::mem::take(&mut buf).into_bytes()).await?;
    copy.finish().await?;
    for ((account, hour), n) in hourly_counts(dataset) {
        sqlx::query(
            "INSERT INTO item_counts (account, kind, hour, n) VALUES ($1, 'refresh', $2, $3)
             ON CONFLICT (account, kind, hour) DO UPDATE SET n = item_counts.n + excluded.n",
        )
        .bind(crate::fixtures::account_name(account))
        .bind(hour)
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .execute(&mut conn)
        .await?;
    }
    for (_, sql) in &indexes {
        conn.execute(sql.as_str()).await?;
    }
    conn.execute("SELECT setval('tasks_id_seq', (SELECT COALESCE(MAX(id), 1) FROM tasks))").await?;
    conn.execute("SELECT setval('items_id_seq', (SELECT COALESCE(MAX(id), 1) FROM items))").await?;
    // What autovacuum does to a table that received inserts: statistics, and the visibility
    // map that lets counts read the index alone.
    conn.execute("VACUUM (ANALYZE)").await?;
    // The import's dirty pages written out now, as part of the load, instead of by the
    // checkpointer while the queries are measured.
    conn.execute("CHECKPOINT").await?;
    let bytes: i64 = sqlx::query("SELECT pg_database_size(current_database())").fetch_one(&mut conn).await?.get(0);
    conn.close().await?;
    Ok(figures("postgres", dataset, start, u64::try_from(bytes).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dataset_is_consistent() {
        let d = Dataset { items: 5_050, accounts: 3, days: 31, end: 1_800_000_000_000 };
        assert_eq!(d.tasks(), 51);
        assert_eq!((0..d.tasks()).map(|t| d.task(t).size).sum::<u64>(), 5_050);
        assert_eq!(d.task(50).size, 50);
        assert_eq!(d.task(50).first_item, 5_001);
        let all: u64 = (0..3).map(|a| d.count_window(a, 0, Timestamp::MAX)).sum();
        assert_eq!(all, 5_050);
        assert!(d.task(0).created_at >= d.end - 31 * DAY_MS);
        assert!(d.task(50).created_at <= d.end);
        let counted: u64 = hourly_counts(&d).values().sum();
        assert_eq!(counted, 5_050);
    }
}
