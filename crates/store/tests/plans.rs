//! Every query of the dialects, the work queue and the retention sweep is served by an index:
//! the plans of the statements that run must never scan the items table from end to end.

use cachectl_core::{ItemType, Kind, NewItem, NewTask, Store, TaskKind};
use cachectl_store::{PgStore, SqliteStore};
use cachectl_testkit::PgCluster;
use std::time::Duration;

const T0: i64 = 1_704_067_200_000;

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
                    url: format!("http://h{account}.example.com/{t}/{i}"),
                    host: format!("h{account}.example.com"),
                    item_type: ItemType::Url,
                    not_before: None,
                })
                .collect();
            let task = NewTask {
                account: format!("account-{account}"),
                kind: if t % 3 == 2 { TaskKind::Prefetch } else { TaskKind::Refresh },
                idempotency: None,
                operator: "op".into(),
                dialect: "test".into(),
                created_at: T0 + t * 600_000 + account,
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
    let plans = store.explain("account-1", (T0, T0 + 7 * 86_400_000)).await.unwrap();
    assert!(plans.len() >= 14, "{plans:?}");
    for (name, plan) in &plans {
        println!("{name}:\n{plan}\n");
        // SQLite says SCAN for a pass over a whole table or index, SEARCH for an index lookup.
        assert!(!plan.lines().any(|l| l.contains("SCAN items")), "{name} scans the items table:\n{plan}");
        assert!(plan.contains(expected_index(name)), "{name} should use {}:\n{plan}", expected_index(name));
    }
}

#[tokio::test]
async fn postgres_plans_use_indexes() {
    let pg = PgCluster::start();
    let url = pg.database("plans").await;
    let store = PgStore::open(&url, true, Duration::from_secs(3)).await.unwrap();
    fill(&store).await;
    let plans = store.explain("account-1", (T0, T0 + 7 * 86_400_000)).await.unwrap();
    // Count and page are one statement per query here (one round trip each).
    assert!(plans.len() >= 11, "{plans:?}");
    for (name, plan) in &plans {
        println!("{name}:\n{plan}\n");
        assert!(!plan.contains("Seq Scan on items"), "{name} scans the items table sequentially:\n{plan}");
        assert!(plan.contains(expected_index(name)), "{name} should use {}:\n{plan}", expected_index(name));
    }
}
