//! Every query of the dialects, the work queue and the retention sweep is served by an index:
//! the plans of the statements that run must never scan the items table from end to end.

use cachectl_core::{AccountName, ItemType, ItemUrl, Kind, NewItem, NewTask, Store, TaskKind, Timestamp};
use cachectl_store::{PgStore, SqliteStore};
use cachectl_testkit::PgCluster;

const T0: Timestamp = Timestamp::from_millis(1_704_067_200_000);
const WEEK: i64 = 7 * 86_400_000;

/// The index each statement must use, by the start of its name.
const EXPECTED: [(&str, &str); 10] = [
    ("task id", "items_task"),
    ("apply: followers", "items_follows"),
    ("apply: dependents", "items_depends"),
    ("window: hourly", "item_counts"),
    ("window:", "items_window"),
    ("one URL", "items_url"),
    ("queue: claim", "items_runnable"),
    ("queue: re", "items_lease"),
    ("retention", "items_created"),
    ("records: one URL", "items_url"),
];

fn expected_index(name: &str) -> &'static str {
    match name {
        "records: task id" => "items_task",
        n if n.starts_with("records:") && !n.ends_with("URL") => "items_window",
        n => EXPECTED.iter().find(|(prefix, _)| n.starts_with(prefix)).map_or("", |(_, index)| index),
    }
}

/// Fills the store with 4 accounts × 40 tasks × 25 items, so that the planners have statistics
/// shaped like a real store's (many tasks per account, few items per task), not an empty one's.
async fn fill(store: &dyn Store) {
    for account in 0..4 {
        for t in 0..40_i64 {
            let items = (0..25)
                .map(|i| NewItem {
                    kind: if t % 3 == 2 { Kind::Prefetch } else { Kind::Refresh },
                    depends_on: None,
                    url: ItemUrl::accepted(
                        format!("http://h{account}.example.com/{t}/{i}"),
                        format!("h{account}.example.com"),
                    ),
                    item_type: ItemType::Url,
                    not_before: None,
                    soft: false,
                })
                .collect();
            let task = NewTask {
                account: AccountName::new(format!("account-{account}")),
                kind: if t % 3 == 2 { TaskKind::Prefetch } else { TaskKind::Refresh },
                idempotency: None,
                operator: "op".into(),
                dialect: "test".into(),
                address: "127.0.0.1".into(),
                created_at: T0.plus_millis(t * 600_000 + account),
                items,
            };
            store.create_task(&task, &[]).await.unwrap();
        }
    }
}

#[tokio::test]
async fn sqlite_plans_use_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&format!("sqlite://{}/c.db", dir.path().display()), true).await.unwrap();
    fill(&store).await;
    let plans = store.explain(&AccountName::new("account-1"), (T0, T0.plus_millis(WEEK))).await.unwrap();
    assert!(plans.len() >= 14, "{plans:?}");
    for (name, plan) in &plans {
        println!("{name}:\n{plan}\n");
        // SQLite says SCAN for a pass over a whole table or index, SEARCH for an index lookup.
        assert!(!plan.lines().any(|l| l.contains("SCAN items")), "{name} scans the items table:\n{plan}");
        assert!(plan.contains(expected_index(name)), "{name} should use {}:\n{plan}", expected_index(name));
        // A page comes in the index's order, read down it until the page is full: no sort.
        if name.ends_with(": page") {
            assert!(!plan.contains("TEMP B-TREE"), "{name} sorts its rows:\n{plan}");
        }
    }
}

/// A private cluster with database `name`, migrated and filled: the cluster (keep it alive), the
/// database URL and the store.
async fn filled_postgres(name: &str) -> (PgCluster, String, PgStore) {
    let pg = PgCluster::start();
    let url = pg.database(name).await;
    let store = PgStore::open(&url, true, cachectl_store::Connections::default()).await.unwrap();
    fill(&store).await;
    (pg, url, store)
}

#[tokio::test]
async fn postgres_plans_use_indexes() {
    let (_pg, _, store) = filled_postgres("plans").await;
    let plans = store.explain(&AccountName::new("account-1"), (T0, T0.plus_millis(WEEK))).await.unwrap();
    // Count and page are one statement per query here (one round trip each).
    assert!(plans.len() >= 11, "{plans:?}");
    for (name, plan) in &plans {
        println!("{name}:\n{plan}\n");
        assert!(!plan.contains("Seq Scan on items"), "{name} scans the items table sequentially:\n{plan}");
        assert!(plan.contains(expected_index(name)), "{name} should use {}:\n{plan}", expected_index(name));
    }
}

/// A GEO page (a site's records in a window) walks the window in index order until the page is
/// full. PostgreSQL estimates `host LIKE '%.site'` to keep 0.5 % of the rows and, on a large
/// window, would rather sort all of it; the query hides that estimate.
#[tokio::test]
async fn postgres_geo_pages_read_the_window_in_order() {
    let (_pg, url, store) = filled_postgres("geo_plans").await;
    // A million items of 100 accounts over 31 days, each account with its own site: the planner
    // takes the account and the site filter for independent and expects almost no row to match
    // both.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO items (task_id, account, kind, url, host, item_type, status, operator, created_at, not_before)
         SELECT 1, 'account-' || n % 100, 'refresh', 'http://x/' || n,
                CASE n % 100 WHEN 1 THEN 'www.example.com' ELSE 'www.other' || n % 100 || '.test' END,
                'url', 'completed', 'op', $1 + n::bigint * 2678, $1 + n::bigint * 2678
         FROM generate_series(1, 1000000) AS n",
    )
    .bind(T0.millis())
    .execute(&pool)
    .await
    .unwrap();
    let plans = store.explain(&AccountName::new("account-1"), (T0, T0.plus_millis(WEEK))).await.unwrap();
    let (_, plan) = plans.iter().find(|(name, _)| name == "records: site").unwrap();
    println!("{plan}");
    // A full sort reads the whole window first; an incremental one on a presorted key does not.
    let full_sort = plan.lines().any(|l| l.trim_start().trim_start_matches("->").trim_start().starts_with("Sort  ("));
    assert!(!full_sort, "the GEO page sorts the window:\n{plan}");
}
