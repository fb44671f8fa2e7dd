//! The query plans of every read path, queue and sweep statement, for the tests that forbid
//! scanning the items table from end to end (`tests/plans.rs`). Built with the `plans` feature
//! (which the store's own tests enable) or in unit tests only.

use crate::backend::SqlStore;
use crate::counters::split_window;
use crate::postgres::PgBackend;
use crate::queue::{RELEASE, RENEW, claim_statement, dependents_update, followers_update, items_update};
use crate::records::{postgres, sqlite};
use crate::retention::SWEEP_SELECT;
use crate::sql::{Db as _, Get as _, Sql, SqlWriter, unavailable};
use crate::sqlite::SqliteBackend;
use cachectl_core::{
    AccountName, ItemStatus, ItemUpdate, Kind, PageRequest, RecordQuery, StoreResult, TaskId, Timestamp, WindowQuery,
};
use sqlx::{Postgres, Sqlite};

/// The lease owner in the plans of the queue's statements.
const OWNER: &str = "owner";

/// The record queries whose plans are checked: every filter the Baidu dialects use.
fn sample_record_queries(
    account: &AccountName,
    (from, to): (Timestamp, Timestamp),
) -> Vec<(&'static str, RecordQuery<'_>)> {
    let base = RecordQuery {
        account,
        kind: Kind::Refresh,
        task_id: None,
        from,
        to,
        site: None,
        url: None,
        item_type: None,
        after: None,
        limit: 101,
    };
    vec![
        ("records: window and marker", RecordQuery { after: Some((Timestamp::EPOCH, 0)), ..base.clone() }),
        ("records: site", RecordQuery { site: Some("example.com"), ..base.clone() }),
        ("records: task id", RecordQuery { task_id: Some(TaskId::new(1)), site: Some("example.com"), ..base.clone() }),
        ("records: one URL", RecordQuery { url: Some("http://x/"), after: Some((Timestamp::EPOCH, 0)), ..base }),
    ]
}

/// A worker report whose batched statements are checked: a failed final transition, which runs
/// all three (the item, its followers, its dependents).
fn sample_update() -> ItemUpdate {
    ItemUpdate {
        item_id: 1,
        status: ItemStatus::Failed,
        progress: 50,
        started_at: Some(Timestamp::from_millis(1)),
        finished_at: Some(Timestamp::from_millis(2)),
        reason: Some("node a: 500".into()),
        nodes: Vec::new(),
    }
}

/// The statements of the queue and the sweep that both backends run, by name, each written
/// into a statement that `new` starts.
fn queue_statements<'a, W: SqlWriter<'a>>(
    from: Timestamp,
    update: &'a ItemUpdate,
    updates: &'a [&'a ItemUpdate],
    new: impl Fn() -> W,
) -> Vec<(&'static str, W)> {
    let mut statements: Vec<(&'static str, W)> =
        ["queue: claim", "queue: renew", "queue: release", "retention sweep", "apply: items", "apply: followers"]
            .into_iter()
            .chain(["apply: dependents"])
            .map(|name| (name, new()))
            .collect();
    claim_statement(&mut statements[0].1, OWNER, Timestamp::EPOCH, Timestamp::from_millis(1), 100);
    statements[1].1.template(RENEW, &[1.into(), OWNER.into()]);
    statements[2].1.template(RELEASE, &[OWNER.into()]);
    statements[3].1.template(SWEEP_SELECT, &[from.into(), 2000.into()]);
    items_update(&mut statements[4].1, std::slice::from_ref(update));
    followers_update(&mut statements[5].1, updates);
    dependents_update(&mut statements[6].1, updates);
    statements
}

/// A statement that starts with `EXPLAIN `.
fn explain_start<'a>() -> Sql<'a, Postgres> {
    let mut q = Sql::new();
    q.sql("EXPLAIN ");
    q
}

/// `EXPLAIN ` and what `write` writes after it, named.
fn explained<'a>(name: impl Into<String>, write: impl FnOnce(&mut Sql<'a, Postgres>)) -> (String, Sql<'a, Postgres>) {
    let mut q = explain_start();
    write(&mut q);
    (name.into(), q)
}

impl SqlStore<Sqlite, SqliteBackend> {
    /// The query plans (`EXPLAIN QUERY PLAN`) of every read path and queue statement, by name,
    /// for the test that forbids full scans of the items table.
    ///
    /// # Errors
    /// The store failing.
    pub async fn explain(
        &self,
        account: &AccountName,
        window: (Timestamp, Timestamp),
    ) -> StoreResult<Vec<(String, String)>> {
        // A window with partial hours at both ends, so that the total uses every part.
        let (from, to) = (window.0.plus_millis(60_000), window.1.plus_millis(-60_000));
        let page = PageRequest { number: 100, size: 50 };
        let total = |url| {
            let query = WindowQuery { account, kind: Kind::Refresh, from, to, url, page };
            sqlite::window_total(&query).sql
        };
        let mut statements: Vec<(String, String)> = vec![
            ("task id: count".into(), sqlite::TASK_COUNT.into()),
            ("task id: page".into(), sqlite::task_page()),
            ("window: total".into(), total(None)),
            ("window: page".into(), sqlite::window_page(false)),
            ("window: hourly counters of a deep page".into(), sqlite::WINDOW_HOURS.into()),
            ("window: edges of a deep page".into(), sqlite::WINDOW_EDGE_COUNT.into()),
            ("one URL: total".into(), total(Some("http://x/"))),
            ("one URL: page".into(), sqlite::window_page(true)),
        ];
        let update = sample_update();
        let updates = [&update];
        let queue = queue_statements(from, &update, &updates, Sql::<Sqlite>::new);
        statements.extend(queue.iter().map(|(name, q)| ((*name).into(), q.text_of().to_owned())));
        for (name, query) in sample_record_queries(account, window) {
            statements.push((name.into(), sqlite::records_query(&query).sql));
        }
        let mut conn = self.writer.acquire().await.map_err(unavailable)?;
        Sql::<Sqlite>::new().sql("ANALYZE").execute(&mut conn).await?;
        let mut plans = Vec::new();
        for (name, sql) in statements {
            let rows = Sql::<Sqlite>::new().sql(&format!("EXPLAIN QUERY PLAN {sql}")).rows(&mut conn).await?;
            let plan: Vec<String> = rows.iter().map(|r| r.text("detail")).collect();
            plans.push((name, plan.join("\n")));
        }
        Ok(plans)
    }
}

impl SqlStore<Postgres, PgBackend> {
    /// The query plans (`EXPLAIN`, with sequential scans disabled so that the planner shows
    /// whether an index can serve each statement at all) of every read path and queue
    /// statement, by name, for the test that forbids sequential scans of the items table.
    ///
    /// # Errors
    /// The store failing.
    pub async fn explain(
        &self,
        account: &AccountName,
        (from, to): (Timestamp, Timestamp),
    ) -> StoreResult<Vec<(String, String)>> {
        let mut conn = self.writer.acquire().await.map_err(unavailable)?;
        Sql::<Postgres>::new().sql("ANALYZE items").execute(&mut conn).await?;
        Sql::<Postgres>::new().sql("SET enable_seqscan = off").execute(&mut conn).await?;
        let first = PageRequest { number: 1, size: 50 };
        let mut statements = vec![explained("task id: count and page", |q| {
            postgres::write_task_page(q, account, Kind::Refresh, TaskId::new(1), first)
        })];
        // A window with partial hours at both ends, so that the total uses every part.
        let (total_from, total_to) = (from.plus_millis(60_000), to.plus_millis(-60_000));
        let page = PageRequest { number: 100, size: 50 };
        let windows = [None, Some("http://x/")].map(|url| {
            let what = if url.is_some() { "one URL" } else { "window" };
            (what, WindowQuery { account, kind: Kind::Refresh, from: total_from, to: total_to, url, page })
        });
        for (what, query) in &windows {
            statements
                .push(explained(format!("{what}: total and page"), |q| postgres::write_window_page(q, query, 4950)));
            statements
                .push(explained(format!("{what}: total and first page"), |q| postgres::write_window_page(q, query, 0)));
            if query.url.is_none()
                && let (Some(hours), _) = split_window(query.from.millis(), query.to.millis())
            {
                let name = format!("{what}: deep page, hourly counters");
                statements.push(explained(name, |q| postgres::write_deep_window_page(q, query, hours, 4950)));
            }
        }
        let update = sample_update();
        let updates = [&update];
        let queue = queue_statements(from, &update, &updates, explain_start);
        statements.extend(queue.into_iter().map(|(name, q)| (name.to_owned(), q)));
        let records = sample_record_queries(account, (from, to));
        for (name, query) in &records {
            statements.push(explained(*name, |q| {
                postgres::write_records(q, query);
            }));
        }
        let mut plans = Vec::new();
        for (name, q) in statements {
            let rows = q.rows(&mut conn).await?;
            plans.push((name, rows.iter().map(|r| Postgres::text(r, 0)).collect::<Vec<_>>().join("\n")));
        }
        Sql::<Postgres>::new().sql("RESET enable_seqscan").execute(&mut conn).await?;
        Ok(plans)
    }
}
