//! One conformance suite for every store backend: each test runs the same operations and
//! assertions against SQLite and against a private PostgreSQL cluster.

use cachectl_core::admin::{
    AccountRow, AuditEntry, AuditQuery, ChangeError, CredentialKind, CredentialRow, DirectoryChange, EdgeRow, EdgeState,
};
use cachectl_core::{AccountName, ItemUrl, QuotaDay, Timestamp};
use cachectl_core::{
    ItemStatus, ItemType, ItemUpdate, Kind, NewItem, NewTask, NodeResult, NodeState, PageRequest, QuotaBucket,
    QuotaCharge, RecordQuery, Store, StoreError, WindowQuery,
};
use cachectl_testkit::PgCluster;
use std::collections::HashSet;
use std::sync::Arc;

const H: i64 = 3_600_000;
/// A fixed base time, a whole hour (2024-01-01T00:00:00Z).
const T0: i64 = 1_704_067_200_000;

/// The backends under test: a fresh SQLite file and a fresh PostgreSQL database.
struct Backends {
    stores: Vec<(&'static str, Arc<dyn Store>)>,
    _dir: tempfile::TempDir,
    _pg: PgCluster,
}

async fn backends() -> Backends {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = cachectl_store::open(&format!("sqlite://{}/c.db", dir.path().display()), true).await.unwrap();
    let pg = PgCluster::start();
    let url = pg.database("conformance").await;
    let postgres = cachectl_store::open(&url, true).await.unwrap();
    Backends { stores: vec![("sqlite", sqlite), ("postgres", postgres)], _dir: dir, _pg: pg }
}

fn task(account: &str, kind: Kind, created_at: i64, urls: &[&str]) -> NewTask {
    NewTask {
        account: acct(account),
        kind: kind.into(),
        operator: "op".into(),
        dialect: "test".into(),
        address: "127.0.0.1".into(),
        created_at: at(created_at),
        idempotency: None,
        items: urls
            .iter()
            .map(|u| NewItem {
                kind,
                depends_on: None,
                url: ItemUrl::accepted((*u).into(), url_host(u)),
                item_type: if u.ends_with('/') { ItemType::Dir } else { ItemType::Url },
                not_before: None,
                soft: false,
            })
            .collect(),
    }
}

fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(ms)
}

/// A quota day written `YYYY-MM-DD` (UTC).
fn day(text: &str) -> QuotaDay {
    let days = match text {
        "2024-01-01" => 0,
        "2024-01-02" => 1,
        _ => panic!("no test charges {text}"),
    };
    let day = QuotaDay::of(at(T0 + days * 24 * H), &chrono::FixedOffset::east_opt(0).unwrap());
    assert_eq!(day.as_str(), text);
    day
}

fn acct(name: &str) -> AccountName {
    AccountName::new(name)
}

fn url_host(u: &str) -> String {
    u.split('/').nth(2).unwrap_or("").to_owned()
}

/// acme's refreshes created in `[from, to)`, newest first.
fn acme_window(from: i64, to: i64, page: PageRequest) -> WindowQuery<'static> {
    static ACME: std::sync::LazyLock<AccountName> = std::sync::LazyLock::new(|| acct("acme"));
    WindowQuery { account: &ACME, kind: Kind::Refresh, from: at(from), to: at(to), url: None, page }
}

fn page(number: u32, size: u32) -> PageRequest {
    PageRequest { number, size }
}

#[tokio::test]
async fn tasks_are_stored_and_read_back_by_id() {
    for (name, store) in backends().await.stores {
        let id = store
            .create_task(
                &task(
                    "acme",
                    Kind::Refresh,
                    T0,
                    &["http://a.example.com/1", "http://a.example.com/2", "http://a.example.com/d/"],
                ),
                &[],
            )
            .await
            .unwrap();
        let other =
            store.create_task(&task("acme", Kind::Refresh, T0 + 5, &["http://a.example.com/x"]), &[]).await.unwrap();
        assert!(other > id, "{name}: ids increase");

        let p = store.task_items(&acct("acme"), Kind::Refresh, id, page(1, 2)).await.unwrap();
        assert_eq!(p.total, 3, "{name}");
        assert_eq!(p.records.len(), 2, "{name}");
        assert_eq!(p.records[0].url, "http://a.example.com/d/", "{name}: newest (highest id) first");
        assert_eq!(p.records[0].item_type, ItemType::Dir);
        assert_eq!(p.records[0].status, ItemStatus::Waiting);
        assert_eq!(p.records[0].not_before, at(T0));
        let p2 = store.task_items(&acct("acme"), Kind::Refresh, id, page(2, 2)).await.unwrap();
        assert_eq!(p2.records.len(), 1, "{name}");
        assert!(store.task_items(&acct("acme"), Kind::Refresh, id, page(3, 2)).await.unwrap().records.is_empty());
        assert_eq!(
            store.task_items(&acct("other"), Kind::Refresh, id, page(1, 50)).await.unwrap().total,
            0,
            "{name}: ownership"
        );
        assert_eq!(
            store.task_items(&acct("acme"), Kind::Prefetch, id, page(1, 50)).await.unwrap().total,
            0,
            "{name}: kind"
        );
    }
}

#[tokio::test]
async fn quotas_are_charged_atomically_with_the_task() {
    for (name, store) in backends().await.stores {
        let charge = |amount| QuotaCharge { bucket: QuotaBucket::RefreshUrl, day: day("2024-01-01"), limit: 3, amount };
        store.create_task(&task("acme", Kind::Refresh, T0, &["http://a/1", "http://a/2"]), &[charge(2)]).await.unwrap();
        let err = store
            .create_task(&task("acme", Kind::Refresh, T0, &["http://a/3", "http://a/4"]), &[charge(2)])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::QuotaExceeded { used: 2, limit: 3, .. }), "{name}: {err:?}");
        let too_big = store
            .create_task(&task("acme", Kind::Refresh, T0, &["http://a/5"]), &[QuotaCharge { amount: 9, ..charge(1) }])
            .await;
        assert!(too_big.is_err(), "{name}");
        assert_eq!(
            store.quota_used(&acct("acme"), QuotaBucket::RefreshUrl, &day("2024-01-01")).await.unwrap(),
            2,
            "{name}"
        );
        let window = acme_window(T0 - H, T0 + H, page(1, 50));
        assert_eq!(store.window_items(&window).await.unwrap().total, 2, "{name}: a refused task stored nothing");
        store.create_task(&task("acme", Kind::Refresh, T0, &["http://a/6"]), &[charge(1)]).await.unwrap();
        assert_eq!(
            store.quota_used(&acct("acme"), QuotaBucket::RefreshUrl, &day("2024-01-01")).await.unwrap(),
            3,
            "{name}"
        );
        assert_eq!(
            store.quota_used(&acct("acme"), QuotaBucket::RefreshUrl, &day("2024-01-02")).await.unwrap(),
            0,
            "{name}: per day"
        );
    }
}

#[tokio::test]
async fn window_totals_are_exact_across_hours_and_edges() {
    for (name, store) in backends().await.stores {
        // 3 items per hour over 10 hours, at minute 0, 20 and 40 of each.
        for hour in 0..10 {
            for minute in [0, 20, 40] {
                let at = T0 + hour * H + minute * 60_000;
                store
                    .create_task(
                        &task("acme", Kind::Refresh, at, &[&format!("http://a.example.com/{hour}/{minute}")]),
                        &[],
                    )
                    .await
                    .unwrap();
            }
        }
        store.create_task(&task("other", Kind::Refresh, T0 + H, &["http://o/1"]), &[]).await.unwrap();
        store.create_task(&task("acme", Kind::Prefetch, T0 + H, &["http://a.example.com/p"]), &[]).await.unwrap();
        let total = |from: i64, to: i64| {
            let store = store.clone();
            async move { store.window_items(&acme_window(from, to, page(1, 500))).await.unwrap() }
        };
        let cases = [
            (T0, T0 + 10 * H, 30),                   // whole hours only
            (T0 + 10 * 60_000, T0 + 10 * H, 29),     // a partial first hour
            (T0, T0 + 9 * H + 30 * 60_000, 29),      // a partial last hour
            (T0 + 30 * 60_000, T0 + 50 * 60_000, 1), // inside one hour
            (T0 - 5 * H, T0, 0),
        ];
        for (from, to, expected) in cases {
            let p = total(from, to).await;
            assert_eq!(p.total, expected, "{name}: [{from}, {to})");
            assert_eq!(p.records.len() as u64, expected, "{name}: the list agrees with the total");
        }
        let p = total(T0, T0 + 10 * H).await;
        assert_eq!(p.records[0].url, "http://a.example.com/9/40", "{name}: newest first");
        let paged = store.window_items(&acme_window(T0, T0 + 10 * H, page(3, 7))).await.unwrap();
        assert_eq!(paged.records.len(), 7, "{name}");
        assert_eq!(paged.records[0].url, p.records[14].url, "{name}: offset paging");
        let one = store
            .window_items(&WindowQuery {
                account: &acct("acme"),
                kind: Kind::Refresh,
                from: at(T0),
                to: at(T0 + 10 * H),
                url: Some("http://a.example.com/4/20"),
                page: page(1, 50),
            })
            .await
            .unwrap();
        assert_eq!((one.total, one.records.len()), (1, 1), "{name}");
    }
}

#[tokio::test]
async fn records_walk_by_keyset_with_filters() {
    for (name, store) in backends().await.stores {
        let mut ids = Vec::new();
        for batch in 0..5 {
            let urls: Vec<String> = (0..50).map(|i| format!("http://www.example.com/{batch}/{i}")).collect();
            let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
            ids.push(store.create_task(&task("acme", Kind::Refresh, T0 + batch, &refs), &[]).await.unwrap());
        }
        store
            .create_task(
                &task("acme", Kind::Refresh, T0 + 2, &["http://img.example.org/x", "http://www.example.com/dir/"]),
                &[],
            )
            .await
            .unwrap();
        let base = RecordQuery {
            account: &acct("acme"),
            kind: Kind::Refresh,
            task_id: None,
            from: at(T0),
            to: at(T0 + H),
            site: Some("example.com"),
            url: None,
            item_type: None,
            after: None,
            limit: 100,
        };
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.records(&RecordQuery { after, ..base.clone() }).await.unwrap();
            if page.is_empty() {
                break;
            }
            let last = page.last().unwrap();
            after = Some((last.created_at, last.id));
            seen.extend(page);
        }
        assert_eq!(seen.len(), 251, "{name}: the site filter drops example.org");
        let unique: HashSet<i64> = seen.iter().map(|i| i.id).collect();
        assert_eq!(unique.len(), 251, "{name}: no record twice");
        assert!(seen.windows(2).all(|w| (w[0].created_at, w[0].id) < (w[1].created_at, w[1].id)), "{name}: ascending");
        let dirs = store.records(&RecordQuery { item_type: Some(ItemType::Dir), ..base.clone() }).await.unwrap();
        assert_eq!(dirs.len(), 1, "{name}");
        let by_task = store
            .records(&RecordQuery { task_id: Some(ids[3]), from: at(0), to: at(0), limit: 1000, ..base.clone() })
            .await
            .unwrap();
        assert_eq!(by_task.len(), 50, "{name}: a task ignores the window");
        let sub = store.records(&RecordQuery { site: Some("www.example.com"), ..base.clone() }).await.unwrap();
        assert_eq!(sub.len(), 100, "{name}: the exact host is the site");
        let none = store.records(&RecordQuery { site: Some("ample.com"), ..base }).await.unwrap();
        assert!(none.is_empty(), "{name}: a suffix that is not a label boundary does not match");
    }
}

fn node(name: &str, state: NodeState, when: i64) -> NodeResult {
    NodeResult {
        node: name.into(),
        state,
        attempts: 1,
        status_code: Some(200),
        error: None,
        updated_at: at(when),
        instance: "w1".into(),
    }
}

#[tokio::test]
async fn the_queue_hands_out_items_under_leases() {
    for (name, store) in backends().await.stores {
        store
            .create_task(&task("acme", Kind::Refresh, T0, &["http://a/1", "http://a/2", "http://a/3"]), &[])
            .await
            .unwrap();
        let mut later = task("acme", Kind::Prefetch, T0, &["http://a/later"]);
        later.items[0].not_before = Some(at(T0 + H));
        store.create_task(&later, &[]).await.unwrap();

        let now = T0 + 1000;
        let a = store.claim_items("A", at(now), at(now + 30_000), 2).await.unwrap();
        assert_eq!(a.len(), 2, "{name}");
        let b = store.claim_items("B", at(now), at(now + 30_000), 10).await.unwrap();
        assert_eq!(b.len(), 1, "{name}: leased items and future items are not handed out");
        assert!(a.iter().all(|c| b.iter().all(|d| d.item.id != c.item.id)), "{name}");
        assert!(store.claim_items("C", at(now), at(now + 30_000), 10).await.unwrap().is_empty(), "{name}");

        // A renews; B does not. After B's lease ran out, C takes B's item, not A's.
        assert_eq!(store.renew_leases("A", at(now + 60_000)).await.unwrap(), 2, "{name}");
        let c = store.claim_items("C", at(now + 40_000), at(now + 70_000), 10).await.unwrap();
        assert_eq!(c.iter().map(|x| x.item.id).collect::<Vec<_>>(), vec![b[0].item.id], "{name}");

        // B's late result is dropped: C holds the lease and may still be executing the item.
        let late = ItemUpdate {
            item_id: b[0].item.id,
            status: ItemStatus::Completed,
            progress: 100,
            started_at: Some(at(now)),
            finished_at: Some(at(now + 45_000)),
            reason: None,
            nodes: vec![node("n1", NodeState::Succeeded, now + 45_000)],
        };
        assert_eq!(store.apply_updates("B", std::slice::from_ref(&late)).await.unwrap(), 1, "{name}: lost lease");
        let kept = store.task_items(&acct("acme"), Kind::Refresh, b[0].item.task_id, page(1, 50)).await.unwrap();
        let kept = kept.records.iter().find(|i| i.id == b[0].item.id).unwrap();
        assert_eq!(kept.status, ItemStatus::Waiting, "{name}: B's result did not finish the item");
        assert!(
            store.node_results(&acct("acme"), &[kept.id]).await.unwrap().is_empty(),
            "{name}: nor stored its nodes"
        );
        assert_eq!(store.apply_updates("C", &[late]).await.unwrap(), 0, "{name}: the holder's result counts");

        // Progress is stored and comes back with a later claim.
        let id = a[0].item.id;
        store
            .apply_updates(
                "A",
                &[ItemUpdate {
                    item_id: id,
                    status: ItemStatus::Processing,
                    progress: 50,
                    started_at: Some(at(now)),
                    finished_at: None,
                    reason: None,
                    nodes: vec![node("n1", NodeState::Succeeded, now)],
                }],
            )
            .await
            .unwrap();
        store.release_leases("A").await.unwrap();
        let again = store.claim_items("D", at(now + 41_000), at(now + 80_000), 10).await.unwrap();
        let resumed = again.iter().find(|x| x.item.id == id).expect("released items are claimable at once");
        assert_eq!(resumed.started_at, Some(at(now)), "{name}");
        assert_eq!(resumed.nodes, vec![node("n1", NodeState::Succeeded, now)], "{name}");
        assert_eq!(resumed.item.status, ItemStatus::Processing);
        assert_eq!(resumed.item.progress, 50);

        // A final item leaves the queue and keeps its result.
        store
            .apply_updates(
                "D",
                &[ItemUpdate {
                    item_id: id,
                    status: ItemStatus::Failed,
                    progress: 100,
                    started_at: Some(at(now)),
                    finished_at: Some(at(now + 5)),
                    reason: Some("node n2: HTTP 403".into()),
                    nodes: vec![node("n2", NodeState::Failed, now + 5)],
                }],
            )
            .await
            .unwrap();
        assert!(
            store
                .claim_items("E", at(now + 200_000), at(now + 300_000), 10)
                .await
                .unwrap()
                .iter()
                .all(|x| x.item.id != id),
            "{name}"
        );
        let items = store.task_items(&acct("acme"), Kind::Refresh, resumed.item.task_id, page(1, 50)).await.unwrap();
        let done = items.records.iter().find(|i| i.id == id).unwrap();
        assert_eq!(
            (done.status, done.finished_at, done.reason.as_deref()),
            (ItemStatus::Failed, Some(at(now + 5)), Some("node n2: HTTP 403")),
            "{name}"
        );

        // The future item becomes claimable at its time.
        let due = store.claim_items("F", at(T0 + H), at(T0 + 2 * H), 10).await.unwrap();
        assert!(due.iter().any(|x| x.item.url == "http://a/later"), "{name}");
    }
}

/// The queue's figures for `/metrics` (`Queue::backlog`): waiting and due, scheduled,
/// processing, past half the deadline, and the oldest due item.
#[tokio::test]
async fn the_backlog_counts_unfinished_items_by_state() {
    for (name, store) in backends().await.stores {
        let empty = store.backlog(at(T0), at(T0 - 1000)).await.unwrap();
        assert_eq!(empty, cachectl_core::store::Backlog::default(), "{name}");
        store
            .create_task(&task("acme", Kind::Refresh, T0, &["http://a/1", "http://a/2", "http://a/3"]), &[])
            .await
            .unwrap();
        let mut later = task("acme", Kind::Prefetch, T0, &["http://a/later"]);
        later.items[0].not_before = Some(at(T0 + H));
        store.create_task(&later, &[]).await.unwrap();
        let now = T0 + 10_000;
        let b = store.backlog(at(now), at(now - 150_000)).await.unwrap();
        assert_eq!((b.waiting, b.scheduled, b.processing, b.past_half_deadline), (3, 1, 0, 0), "{name}");
        assert_eq!(b.oldest_due, Some(at(T0)), "{name}");

        // Two started: one at T0 + 1 s, one long before the half-deadline mark; one finished.
        let claimed = store.claim_items("A", at(now), at(now + 30_000), 3).await.unwrap();
        // Claimed, their first state not written yet (the worker holds it briefly): under a live
        // lease they are processing, not waiting; once the lease lapsed, waiting again.
        let b = store.backlog(at(now), at(now - 150_000)).await.unwrap();
        assert_eq!((b.waiting, b.processing, b.oldest_due), (0, 3, None), "{name}: {b:?}");
        let b = store.backlog(at(now + 30_001), at(now - 150_000)).await.unwrap();
        assert_eq!((b.waiting, b.processing, b.oldest_due), (3, 0, Some(at(T0))), "{name}: {b:?}");
        let update = |id, status, started, finished: Option<i64>| ItemUpdate {
            item_id: id,
            status,
            progress: 0,
            started_at: Some(at(started)),
            finished_at: finished.map(at),
            reason: None,
            nodes: vec![node("n1", NodeState::Pending, started)],
        };
        store
            .apply_updates(
                "A",
                &[
                    update(claimed[0].item.id, ItemStatus::Processing, T0 + 1000, None),
                    update(claimed[1].item.id, ItemStatus::Processing, T0 - 200_000, None),
                    update(claimed[2].item.id, ItemStatus::Completed, T0 + 1000, Some(T0 + 2000)),
                ],
            )
            .await
            .unwrap();
        let b = store.backlog(at(now), at(now - 150_000)).await.unwrap();
        assert_eq!((b.waiting, b.scheduled, b.processing, b.past_half_deadline), (0, 1, 2, 1), "{name}: {b:?}");
        assert_eq!(b.oldest_due, None, "{name}: nothing due waits");
        // At its time, the scheduled prefetch is due and waiting.
        let b = store.backlog(at(T0 + H + 5000), at(now - 150_000)).await.unwrap();
        assert_eq!((b.waiting, b.scheduled, b.oldest_due), (1, 0, Some(at(T0 + H))), "{name}");
    }
}

#[tokio::test]
async fn concurrent_claims_never_overlap() {
    for (name, store) in backends().await.stores {
        let urls: Vec<String> = (0..600).map(|i| format!("http://a/{i}")).collect();
        let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
        store.create_task(&task("acme", Kind::Refresh, T0, &refs), &[]).await.unwrap();
        let claims = (0..6).map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = store.claim_items(&format!("w{w}"), at(T0), at(T0 + 60_000), 25).await.unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got.into_iter().map(|c| c.item.id));
                }
            })
        });
        let mut all = Vec::new();
        for claim in claims {
            all.extend(claim.await.unwrap());
        }
        let unique: HashSet<i64> = all.iter().copied().collect();
        assert_eq!((all.len(), unique.len()), (600, 600), "{name}: every item claimed exactly once");
    }
}

#[tokio::test]
async fn the_sweep_deletes_old_records_and_keeps_totals_exact() {
    for (name, store) in backends().await.stores {
        let old = store
            .create_task(&task("acme", Kind::Refresh, T0, &["http://a/old1", "http://a/old2"]), &[])
            .await
            .unwrap();
        store.create_task(&task("acme", Kind::Refresh, T0 + 2 * H, &["http://a/new"]), &[]).await.unwrap();
        let first = store.claim_items("w", at(T0), at(T0 + 60_000), 1).await.unwrap();
        assert_eq!(first[0].item.task_id, old, "{name}");
        store
            .apply_updates(
                "w",
                &[ItemUpdate {
                    item_id: first[0].item.id,
                    status: ItemStatus::Completed,
                    progress: 100,
                    started_at: Some(at(T0)),
                    finished_at: Some(at(T0)),
                    reason: None,
                    nodes: vec![node("n1", NodeState::Succeeded, T0)],
                }],
            )
            .await
            .unwrap();
        assert_eq!(store.sweep(at(T0 + H), 1).await.unwrap(), 1, "{name}: batches");
        assert_eq!(store.sweep(at(T0 + H), 10).await.unwrap(), 1, "{name}");
        assert_eq!(store.sweep(at(T0 + H), 10).await.unwrap(), 0, "{name}");
        assert_eq!(store.task_items(&acct("acme"), Kind::Refresh, old, page(1, 5)).await.unwrap().total, 0, "{name}");
        let window = acme_window(T0, T0 + 3 * H, page(1, 50));
        let p = store.window_items(&window).await.unwrap();
        assert_eq!((p.total, p.records.len()), (1, 1), "{name}: the hourly counters followed the sweep");
    }
}

#[tokio::test]
async fn request_counters_are_shared_only_where_instances_share_the_store() {
    for (name, store) in backends().await.stores {
        let first = store.count_requests("digest", 7, 100, 1).await.unwrap();
        let second = store.count_requests("digest", 7, 100, 1).await.unwrap();
        match name {
            "sqlite" => assert_eq!((first, second), (None, None)),
            _ => {
                assert_eq!((first, second), (Some(1), Some(2)), "{name}");
                assert_eq!(
                    store.count_requests("digest", 7, 100, 10).await.unwrap(),
                    Some(12),
                    "{name}: a reservation"
                );
                assert_eq!(store.count_requests("digest", 7, 101, 1).await.unwrap(), Some(1), "{name}: a new minute");
                assert_eq!(
                    store.count_requests("digest", 8, 100, 3).await.unwrap(),
                    Some(3),
                    "{name}: another endpoint"
                );
            }
        }
    }
}

/// Opens and migrates the store at `url`, then records in its database (through `insert`, on a
/// pool of sqlx database `DB`) a migration newer than this cachectl knows: opening the store
/// again is refused.
async fn refused_once_newer<DB>(url: &str, insert: &str)
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    drop(cachectl_store::open(url, true).await.unwrap());
    let pool = sqlx::Pool::<DB>::connect(url).await.unwrap();
    sqlx::query(insert).execute(&pool).await.unwrap();
    pool.close().await;
    let err = cachectl_store::open(url, true).await.err().expect("refused");
    assert!(err.to_string().contains("newer"), "{err}");
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}/c.db", dir.path().display());
    let future = "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time) VALUES (9999, 'future', CURRENT_TIMESTAMP, 1, x'00', 0)";
    refused_once_newer::<sqlx::Sqlite>(&sqlite_url, future).await;

    let pg = PgCluster::start();
    let pg_url = pg.database("future").await;
    let future = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (9999, 'future', true, '\\x00', 0)";
    refused_once_newer::<sqlx::Postgres>(&pg_url, future).await;
    // Without migrating, a database that was never migrated is refused with a hint.
    let empty = pg.database("empty").await;
    let err = cachectl_store::open(&empty, false).await.err().expect("refused");
    assert!(err.to_string().contains("cachectl migrate"), "{err}");
}

/// A record query of the dialects (the PostgreSQL store runs them on connections of their own).
fn record_query() -> RecordQuery<'static> {
    static ACME: std::sync::LazyLock<AccountName> = std::sync::LazyLock::new(|| acct("acme"));
    RecordQuery {
        account: &ACME,
        kind: Kind::Refresh,
        task_id: None,
        from: at(T0),
        to: at(T0 + H),
        site: None,
        url: None,
        item_type: None,
        after: None,
        limit: 10,
    }
}

/// A private cluster (keep it alive) with database `name`, its URL, and the store on it with at
/// most `max_connections` per pool.
async fn postgres_store(name: &str, max_connections: u32) -> (PgCluster, String, Arc<dyn Store>) {
    let pg = PgCluster::start();
    let url = pg.database(name).await;
    let connections = cachectl_store::Connections { max_connections, ..Default::default() };
    let store = cachectl_store::open_with(&url, true, connections).await.unwrap();
    (pg, url, store)
}

const WAITING_ON_LOCK: &str =
    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";

/// Another session's transaction holding the items table locked: every read of it waits inside
/// PostgreSQL, holding its connection, until the transaction ends.
async fn lock_items(url: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let admin = sqlx::PgPool::connect(url).await.unwrap();
    let mut lock = admin.begin().await.unwrap();
    sqlx::query("LOCK TABLE items IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    lock
}

/// Polls until `n` sessions wait on a lock (at most 60 s: on a machine busy with the other
/// tests, opening a pool's connections has taken more than 5 s, and once more than 20 s), then a
/// moment more for any beyond.
async fn wait_for_lock_waiters(conn: &mut sqlx::PgConnection, n: i64) -> i64 {
    for _ in 0..1200 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let waiting: i64 = sqlx::query_scalar(WAITING_ON_LOCK).fetch_one(&mut *conn).await.unwrap();
        if waiting >= n {
            break;
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    sqlx::query_scalar(WAITING_ON_LOCK).fetch_one(&mut *conn).await.unwrap()
}

#[tokio::test]
async fn a_postgres_instance_holds_at_most_max_connections_per_pool() {
    use cachectl_core::ItemFilter;
    let (_pg, url, store) = postgres_store("pool", 3).await;
    // Another session locks the items table: every read then waits inside PostgreSQL, holding
    // its connection, and the queries beyond a pool's size wait for one in cachectl. Ten record
    // queries (their own pool) and ten native item lists (the pool of everything else).
    let mut lock = lock_items(&url).await;
    let mut queries = Vec::new();
    for _ in 0..10 {
        let (reads, lists) = (store.clone(), store.clone());
        queries.push(tokio::spawn(async move { reads.records(&record_query()).await.map(|page| page.len()) }));
        queries.push(tokio::spawn(async move {
            lists.list_items(&acct("acme"), &ItemFilter::default(), 10).await.map(|items| items.len())
        }));
    }
    let waiting = wait_for_lock_waiters(&mut lock, 6).await;
    assert_eq!(waiting, 6, "three record queries and three item lists wait on the lock, one per connection");
    let count_sessions = "SELECT COUNT(*) FROM pg_stat_activity
         WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()";
    let sessions: i64 = sqlx::query_scalar(count_sessions).fetch_one(&mut *lock).await.unwrap();
    assert_eq!(sessions, 6, "max_connections sessions per pool besides this one");
    lock.commit().await.unwrap();
    for query in queries {
        assert_eq!(query.await.unwrap().unwrap(), 0, "every query is answered once the lock is gone");
    }
}

#[tokio::test]
async fn a_cancelled_postgres_record_query_leaves_its_connection_usable() {
    let (_pg, url, store) = postgres_store("cancel", 2).await;
    let id = store.create_task(&task("acme", Kind::Refresh, T0 + 5, &["http://a.example.com/1"]), &[]).await.unwrap();
    // Both record connections are opened before the lock is taken: what is tested is a query
    // cancelled on an open connection. (Once, under load, only one of two queries reached the
    // lock within 60 s and neither ended; a connection opened while the lock was held is the one
    // step that differs from the queries below.)
    let query = record_query();
    let (a, b) = tokio::join!(store.records(&query), store.records(&query));
    assert_eq!((a.unwrap().len(), b.unwrap().len()), (1, 1));
    // Both record connections send a query that waits on the lock, and the requests are dropped
    // (a client that went away): each connection has a query in flight whose answer nobody read.
    let mut lock = lock_items(&url).await;
    let cancelled: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(
                async move { store.records(&RecordQuery { account: &acct("nobody"), ..record_query() }).await },
            )
        })
        .collect();
    let waiting = wait_for_lock_waiters(&mut lock, 2).await;
    if waiting != 2 {
        // Say why: a query that ended instead of waiting on the lock, and with what.
        let mut ended = Vec::new();
        for query in cancelled {
            if query.is_finished() {
                ended.push(format!("{:?}", query.await.map(|r| r.map(|page| page.len()))));
            }
        }
        panic!("both connections should be busy, {waiting} waiting on the lock; queries that ended: {ended:?}");
    }
    for query in cancelled {
        query.abort();
        assert!(query.await.unwrap_err().is_cancelled());
    }
    lock.commit().await.unwrap();
    // The next queries get the same two connections, and their own answers, not the dropped ones.
    for _ in 0..6 {
        let records = store.records(&record_query()).await.unwrap();
        assert_eq!(records.len(), 1, "the record of acme, not the empty answer meant for the dropped query");
        assert_eq!(records[0].url, "http://a.example.com/1");
        let task = store.task_items(&acct("acme"), Kind::Refresh, id, page(1, 50)).await.unwrap();
        assert_eq!((task.total, task.records.len()), (1, 1));
    }
}

#[tokio::test]
async fn native_operations_behave_the_same_on_both_backends() {
    use cachectl_core::{DeliveryOutcome, ItemFilter, TaskFilter, TaskState};
    for (name, store) in backends().await.stores {
        // A refresh-then-prefetch task: the prefetch of each URL depends on its refresh.
        let mut rtp = task("acme", Kind::Refresh, T0, &["http://www.example.com/r1", "http://www.example.com/r2"]);
        rtp.kind = cachectl_core::TaskKind::RefreshThenPrefetch;
        let prefetches: Vec<NewItem> = rtp
            .items
            .iter()
            .enumerate()
            .map(|(i, r)| NewItem { kind: Kind::Prefetch, depends_on: Some(i), ..r.clone() })
            .collect();
        rtp.items.extend(prefetches);
        let rtp_id = store.create_task(&rtp, &[]).await.unwrap();
        // Coalescing: the same URL again while the first is waiting and unclaimed.
        let follower_task =
            store.create_task(&task("acme", Kind::Refresh, T0 + 1, &["http://www.example.com/r1"]), &[]).await.unwrap();
        let items = store
            .list_items(&acct("acme"), &ItemFilter { task_id: Some(follower_task), ..ItemFilter::default() }, 10)
            .await
            .unwrap();
        let leader = store
            .list_items(
                &acct("acme"),
                &ItemFilter {
                    task_id: Some(rtp_id),
                    kind: Some(Kind::Refresh),
                    url: Some("http://www.example.com/r1"),
                    ..ItemFilter::default()
                },
                10,
            )
            .await
            .unwrap();
        assert_eq!(items[0].follows, Some(leader[0].id), "{name}: coalesced");

        // Only the two refreshes are runnable: prefetches wait, the follower mirrors.
        let claimed = store.claim_items("w", at(T0 + 10), at(T0 + 60_000), 10).await.unwrap();
        let claimed_urls: Vec<(Kind, &str)> = claimed.iter().map(|c| (c.item.kind, c.item.url.as_str())).collect();
        assert_eq!(claimed.len(), 2, "{name}: {claimed_urls:?}");
        assert!(claimed.iter().all(|c| c.item.kind == Kind::Refresh), "{name}");
        let done = |id, status| ItemUpdate {
            item_id: id,
            status,
            progress: 100,
            started_at: Some(at(T0 + 10)),
            finished_at: Some(at(T0 + 20)),
            reason: (status == ItemStatus::Failed).then(|| "node n: HTTP 403".to_owned()),
            nodes: vec![node(
                "n",
                if status == ItemStatus::Failed { NodeState::Failed } else { NodeState::Succeeded },
                T0 + 20,
            )],
        };
        let r1 = claimed.iter().find(|c| c.item.url.ends_with("/r1")).unwrap().item.id;
        let r2 = claimed.iter().find(|c| c.item.url.ends_with("/r2")).unwrap().item.id;
        store.apply_updates("w", &[done(r1, ItemStatus::Completed), done(r2, ItemStatus::Failed)]).await.unwrap();
        let follower = &store
            .list_items(&acct("acme"), &ItemFilter { task_id: Some(follower_task), ..ItemFilter::default() }, 10)
            .await
            .unwrap()[0];
        assert_eq!(follower.status, ItemStatus::Completed, "{name}: the follower mirrors its leader");
        let next = store.claim_items("w", at(T0 + 30), at(T0 + 60_000), 10).await.unwrap();
        assert_eq!(next.len(), 1, "{name}: only the prefetch whose refresh completed");
        assert_eq!((next[0].item.kind, next[0].item.url.as_str()), (Kind::Prefetch, "http://www.example.com/r1"));
        let summary = store.task(&acct("acme"), rtp_id).await.unwrap().unwrap();
        assert_eq!(
            (summary.counts.completed, summary.counts.failed, summary.counts.waiting),
            (1, 2, 1),
            "{name}: {summary:?}"
        );
        assert!(summary.finished_at.is_none());
        assert!(store.task(&acct("other"), rtp_id).await.unwrap().is_none(), "{name}: ownership");

        // Finishing the last item stamps the task; the webhook outbox picks it up once.
        store.apply_updates("w", &[done(next[0].item.id, ItemStatus::Completed)]).await.unwrap();
        let summary = store.task(&acct("acme"), rtp_id).await.unwrap().unwrap();
        assert_eq!(summary.finished_at, Some(at(T0 + 20)), "{name}");
        assert_eq!(summary.state(), TaskState::Failed);
        let urls = std::collections::HashMap::from([("acme".to_owned(), vec!["http://hook/".to_owned()])]);
        assert!(store.dispatch_finished(&urls, at(T0 + 40), 10).await.unwrap() >= 2, "{name}: both finished tasks");
        assert_eq!(store.dispatch_finished(&urls, at(T0 + 41), 10).await.unwrap(), 0, "{name}: once");
        let jobs = store.claim_webhook_jobs(at(T0 + 50), at(T0 + 60_000), 10).await.unwrap();
        assert_eq!(jobs.len(), 2, "{name}");
        assert!(store.claim_webhook_jobs(at(T0 + 51), at(T0 + 60_000), 10).await.unwrap().is_empty(), "{name}: leased");
        let job = jobs.iter().find(|j| j.task_id == rtp_id).unwrap();
        let attempt = cachectl_core::Delivery {
            task_id: rtp_id,
            url: job.url.clone(),
            attempt: 1,
            status_code: Some(500),
            error: Some("HTTP 500".into()),
            at: at(T0 + 52),
        };
        store.record_delivery(job, &attempt, DeliveryOutcome::RetryAt(at(T0 + 1000))).await.unwrap();
        assert!(
            store.claim_webhook_jobs(at(T0 + 999), at(T0 + 60_000), 10).await.unwrap().is_empty(),
            "{name}: not yet due"
        );
        let again = store.claim_webhook_jobs(at(T0 + 1000), at(T0 + 60_000), 10).await.unwrap();
        assert_eq!((again.len(), again[0].attempts), (1, 1), "{name}");
        let ok = cachectl_core::Delivery {
            attempt: 2,
            status_code: Some(204),
            error: None,
            at: at(T0 + 1001),
            ..attempt.clone()
        };
        store.record_delivery(&again[0], &ok, DeliveryOutcome::Delivered).await.unwrap();
        let log = store.deliveries(&acct("acme"), rtp_id).await.unwrap();
        assert_eq!(log.iter().map(|d| d.attempt).collect::<Vec<_>>(), vec![1, 2], "{name}");

        // Retry requeues the failed items; the task runs again.
        assert_eq!(
            store.retry_failed(&acct("acme"), rtp_id).await.unwrap(),
            2,
            "{name}: the failed refresh and its prefetch"
        );
        let summary = store.task(&acct("acme"), rtp_id).await.unwrap().unwrap();
        assert_eq!((summary.state(), summary.finished_at), (TaskState::Running, None), "{name}");

        // Cancel fails what is waiting and unclaimed.
        let waiting = store
            .create_task(
                &task("acme", Kind::Prefetch, T0 + 2, &["http://www.example.com/c1", "http://www.example.com/c2"]),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(store.cancel_waiting(&acct("acme"), waiting, at(T0 + 3)).await.unwrap(), 2, "{name}");
        assert_eq!(store.cancel_waiting(&acct("other"), rtp_id, at(T0 + 3)).await.unwrap(), 0, "{name}: ownership");
        let cancelled = store.task(&acct("acme"), waiting).await.unwrap().unwrap();
        assert_eq!((cancelled.state(), cancelled.finished_at), (TaskState::Failed, Some(at(T0 + 3))), "{name}");

        // Task lists: filters and the cursor.
        let all = store.list_tasks(&acct("acme"), &TaskFilter::default(), 10).await.unwrap();
        assert_eq!(
            all.iter().map(|t| t.id).collect::<Vec<_>>(),
            vec![waiting, follower_task, rtp_id],
            "{name}: newest first"
        );
        let page = store
            .list_tasks(
                &acct("acme"),
                &TaskFilter { before_id: Some(follower_task.get()), ..TaskFilter::default() },
                10,
            )
            .await
            .unwrap();
        assert_eq!(page.iter().map(|t| t.id).collect::<Vec<_>>(), vec![rtp_id], "{name}: cursor");
        let failed = store
            .list_tasks(&acct("acme"), &TaskFilter { state: Some(TaskState::Failed), ..TaskFilter::default() }, 10)
            .await
            .unwrap();
        assert_eq!(failed.iter().map(|t| t.id).collect::<Vec<_>>(), vec![waiting], "{name}");
        let by_url = store
            .list_tasks(
                &acct("acme"),
                &TaskFilter { url: Some("http://www.example.com/r2"), ..TaskFilter::default() },
                10,
            )
            .await
            .unwrap();
        assert_eq!(by_url.iter().map(|t| t.id).collect::<Vec<_>>(), vec![rtp_id], "{name}");
        let by_domain = store
            .list_tasks(&acct("acme"), &TaskFilter { domain: Some("example.com"), ..TaskFilter::default() }, 10)
            .await
            .unwrap();
        assert_eq!(by_domain.len(), 3, "{name}: names under the domain");
        for (domain, expected) in [("www.example.com", 3), ("ample.com", 0), ("w.example.com", 0)] {
            let filter = TaskFilter { domain: Some(domain), ..TaskFilter::default() };
            assert_eq!(
                store.list_tasks(&acct("acme"), &filter, 10).await.unwrap().len(),
                expected,
                "{name}: tasks of {domain}"
            );
        }
        let filter = ItemFilter { domain: Some("example.com"), ..ItemFilter::default() };
        let items = store.list_items(&acct("acme"), &filter, 100).await.unwrap();
        assert!(!items.is_empty() && items.iter().all(|i| i.host.ends_with(".example.com")), "{name}: {items:?}");
        for domain in ["ample.com", "w.example.com", "example.co"] {
            let filter = ItemFilter { domain: Some(domain), ..ItemFilter::default() };
            assert!(
                store.list_items(&acct("acme"), &filter, 100).await.unwrap().is_empty(),
                "{name}: no item of {domain}"
            );
        }
        let results = store.node_results(&acct("acme"), &[r1, r2]).await.unwrap();
        assert_eq!(results.len(), 1, "{name}: the retried item's result was cleared");
        assert!(store.node_results(&acct("other"), &[r1]).await.unwrap().is_empty(), "{name}: ownership");
    }
}

/// `sqlite::memory:` is one database shared by the writer and both read paths.
#[tokio::test]
async fn an_in_memory_sqlite_store_reads_what_it_wrote() {
    let store = cachectl_store::open("sqlite::memory:", true).await.unwrap();
    let id = store.create_task(&task("acme", Kind::Refresh, T0, &["http://a.example.com/1"]), &[]).await.unwrap();
    let p = store.task_items(&acct("acme"), Kind::Refresh, id, page(1, 50)).await.unwrap();
    assert_eq!((p.total, p.records.len()), (1, 1));
    assert_eq!(p.records[0].url, "http://a.example.com/1");
    assert!(store.task(&acct("acme"), id).await.unwrap().is_some());
}

/// Pages deep in a window (offset 1,000 and beyond, where SQLite skips whole hours by their
/// counters) hold exactly the records a walk from the newest one finds, on both backends.
#[tokio::test]
async fn deep_window_pages_hold_the_same_records_as_a_walk() {
    const H: i64 = 3_600_000;
    for (name, store) in backends().await.stores {
        // 100 items every 20 minutes over 6 hours: 1,800 items, several tasks per hour.
        let mut created = Vec::new();
        for slot in 0..18_i64 {
            let at = T0 + slot * 20 * 60_000 + 7_000;
            let urls: Vec<String> = (0..100).map(|i| format!("http://a.example.com/{slot}/{i}")).collect();
            let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
            store.create_task(&task("acme", Kind::Refresh, at, &refs), &[]).await.unwrap();
            created.push((at, urls));
        }
        store.create_task(&task("other", Kind::Refresh, T0 + H, &["http://o/1"]), &[]).await.unwrap();
        // The window cuts partial hours at both ends: [T0 + 10 min, T0 + 5 h 50 min).
        let (from, to) = (T0 + 10 * 60_000, T0 + 5 * H + 50 * 60_000);
        let mut expected: Vec<String> = Vec::new();
        for (at, urls) in created.iter().rev() {
            if *at >= from && *at < to {
                // Newest first, and within one creation time by id, descending.
                expected.extend(urls.iter().rev().cloned());
            }
        }
        for (size, number) in [(50_u32, 21_u32), (50, 25), (100, 11), (500, 3), (70, 17), (50, 200)] {
            let p = store.window_items(&acme_window(from, to, page(number, size))).await.unwrap();
            assert_eq!(p.total, expected.len() as u64, "{name}");
            let start = ((number - 1) * size) as usize;
            let want: Vec<&String> = expected.iter().skip(start).take(size as usize).collect();
            let got: Vec<&String> = p.records.iter().map(|r| &r.url).collect();
            assert_eq!(got, want, "{name}: page {number} of {size}");
        }
    }
}

fn audit(action: &str, target: &str, when: i64) -> AuditEntry {
    AuditEntry {
        id: 0,
        at: at(when),
        actor: "admin".into(),
        credential: "ops".into(),
        address: "127.0.0.1".into(),
        action: action.into(),
        target: target.into(),
        detail: "{}".into(),
    }
}

#[tokio::test]
async fn directory_changes_are_atomic_audited_and_versioned() {
    for (name, store) in backends().await.stores {
        assert_eq!(store.directory_version().await.unwrap(), 0, "{name}");
        let account = AccountRow {
            name: "beta".into(),
            spec: Some(r#"{"domains":["beta.example"]}"#.into()),
            disabled: false,
            created_at: at(T0),
            updated_at: at(T0),
        };
        store
            .change_directory(&DirectoryChange::CreateAccount(account.clone()), &audit("account.create", "beta", T0))
            .await
            .unwrap();
        let again = store
            .change_directory(&DirectoryChange::CreateAccount(account.clone()), &audit("account.create", "beta", T0))
            .await;
        assert!(matches!(again, Err(ChangeError::Conflict(_))), "{name}: {again:?}");
        let disabled = AccountRow { disabled: true, updated_at: at(T0 + 1), ..account.clone() };
        store
            .change_directory(&DirectoryChange::PutAccount(disabled), &audit("account.disable", "beta", T0 + 1))
            .await
            .unwrap();
        let token = CredentialRow {
            id: "tok_1".into(),
            kind: CredentialKind::Token,
            account: "beta".into(),
            name: "ci".into(),
            secret_hash: Some("ab".repeat(32)),
            sealed_secret: None,
            created_at: at(T0),
            expires_at: None,
        };
        store
            .change_directory(&DirectoryChange::IssueCredential(token.clone()), &audit("token.issue", "tok_1", T0))
            .await
            .unwrap();
        let same_hash = CredentialRow { id: "tok_2".into(), ..token.clone() };
        let clash = store
            .change_directory(&DirectoryChange::IssueCredential(same_hash), &audit("token.issue", "tok_2", T0))
            .await;
        assert!(matches!(clash, Err(ChangeError::Conflict(_))), "{name}: the same secret twice: {clash:?}");
        let expire = |at_ms: i64, account: &str| DirectoryChange::ExpireCredential {
            id: "tok_1".into(),
            account: account.into(),
            at: at(at_ms),
        };
        store.change_directory(&expire(T0 + H, "beta"), &audit("token.rotate", "tok_1", T0)).await.unwrap();
        store.change_directory(&expire(T0 + 2 * H, "beta"), &audit("token.rotate", "tok_1", T0)).await.unwrap();
        let other = store.change_directory(&expire(T0, "acme"), &audit("token.revoke", "tok_1", T0)).await;
        assert!(matches!(other, Err(ChangeError::NotFound(_))), "{name}: another account's credential: {other:?}");
        let edge = EdgeRow {
            name: "e9".into(),
            spec: Some("{}".into()),
            state: EdgeState::Active,
            created_at: at(T0),
            updated_at: at(T0),
        };
        store.change_directory(&DirectoryChange::CreateEdge(edge.clone()), &audit("edge.add", "e9", T0)).await.unwrap();
        let draining = EdgeRow { state: EdgeState::Draining, ..edge.clone() };
        store.change_directory(&DirectoryChange::PutEdge(draining), &audit("edge.drain", "e9", T0)).await.unwrap();
        let rows = store.directory().await.unwrap();
        assert_eq!(rows.version, 7, "{name}: one bump per applied change, none for the refused ones");
        assert!(rows.accounts[0].disabled, "{name}");
        assert_eq!(rows.credentials.len(), 1, "{name}");
        assert_eq!(rows.credentials[0].expires_at, Some(at(T0 + H)), "{name}: an expiry only moves earlier");
        assert_eq!(rows.edges[0].state, EdgeState::Draining, "{name}");
        store
            .change_directory(&DirectoryChange::RemoveEdge("e9".into()), &audit("edge.remove", "e9", T0))
            .await
            .unwrap();
        let gone =
            store.change_directory(&DirectoryChange::RemoveEdge("e9".into()), &audit("edge.remove", "e9", T0)).await;
        assert!(matches!(gone, Err(ChangeError::NotFound(_))), "{name}");
        assert!(store.directory().await.unwrap().edges.is_empty(), "{name}");

        let id =
            store.create_task(&task("beta", Kind::Refresh, T0 + 5, &["http://beta.example/a"]), &[]).await.unwrap();
        let log = store.audit_log(&AuditQuery { limit: 100, ..AuditQuery::default() }).await.unwrap();
        let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(
            actions,
            [
                "task.submit",
                "edge.remove",
                "edge.drain",
                "edge.add",
                "token.rotate",
                "token.rotate",
                "token.issue",
                "account.disable",
                "account.create"
            ],
            "{name}: newest first, refused changes not logged"
        );
        assert_eq!(
            (log[0].target.as_str(), log[0].actor.as_str(), log[0].credential.as_str()),
            (id.get().to_string().as_str(), "beta", "op"),
            "{name}"
        );
        assert!(log[0].detail.contains("\"refresh_items\":1"), "{name}: {}", log[0].detail);
        let tokens = store
            .audit_log(&AuditQuery { action: Some("token.".into()), limit: 2, ..AuditQuery::default() })
            .await
            .unwrap();
        assert_eq!(tokens.len(), 2, "{name}");
        let next = store
            .audit_log(&AuditQuery {
                action: Some("token.".into()),
                before_id: Some(tokens[1].id),
                limit: 10,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(
            next.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["token.issue"],
            "{name}: keyset paging"
        );
        store.sweep(at(T0 + 3), 100).await.unwrap();
        let kept = store.audit_log(&AuditQuery { limit: 100, ..AuditQuery::default() }).await.unwrap();
        assert_eq!(kept.len(), 1, "{name}: the sweep takes the audit log's old entries: {kept:?}");
        assert_eq!(kept[0].action, "task.submit", "{name}");
        assert_eq!(store.directory_version().await.unwrap(), 8, "{name}");

        // The state row of a file account (no spec) does not block creating that name through the
        // API once the file no longer has it.
        let state_only =
            AccountRow { name: "legacy".into(), spec: None, disabled: true, created_at: at(T0), updated_at: at(T0) };
        store
            .change_directory(&DirectoryChange::PutAccount(state_only), &audit("account.disable", "legacy", T0))
            .await
            .unwrap();
        let created = AccountRow {
            name: "legacy".into(),
            spec: Some("{}".into()),
            disabled: false,
            created_at: at(T0 + 9),
            updated_at: at(T0 + 9),
        };
        store
            .change_directory(&DirectoryChange::CreateAccount(created.clone()), &audit("account.create", "legacy", T0))
            .await
            .unwrap();
        let rows = store.directory().await.unwrap();
        assert_eq!(rows.accounts.iter().find(|a| a.name == "legacy"), Some(&created), "{name}");
        let twice = store
            .change_directory(&DirectoryChange::CreateAccount(created), &audit("account.create", "legacy", T0))
            .await;
        assert!(matches!(twice, Err(ChangeError::Conflict(_))), "{name}: an API account's row is a conflict");
    }
}

#[tokio::test]
async fn item_counts_and_url_substrings_are_exact_for_every_filter() {
    use cachectl_core::{Item, ItemFilter};
    for (name, store) in backends().await.stores {
        let acme = acct("acme");
        let a = "http://www.example.com/a/100%25_off.css";
        let upper = "http://www.example.com/A/Upper.css";
        let lower = "http://www.example.com/a/lower.css";
        store.create_task(&task("acme", Kind::Refresh, T0, &[a, upper, lower]), &[]).await.unwrap();
        let second = task("acme", Kind::Refresh, T0 + H, &[lower, "http://www.example.com/b/"]);
        let cancelled = store.create_task(&second, &[]).await.unwrap();
        assert_eq!(store.cancel_waiting(&acme, cancelled, at(T0 + H + 1)).await.unwrap(), 2, "{name}");
        store
            .create_task(&task("acme", Kind::Prefetch, T0 + 2 * H, &[a, "http://www.example.com/a/x.css"]), &[])
            .await
            .unwrap();
        // Another account's items are never counted.
        store.create_task(&task("other", Kind::Refresh, T0 + H, &[lower, a]), &[]).await.unwrap();

        let all = store.list_items(&acme, &ItemFilter::default(), 1000).await.unwrap();
        assert_eq!(all.len(), 7, "{name}");
        assert_eq!(store.count_items(&acme, &ItemFilter::default()).await.unwrap(), 7, "{name}");
        let contains = [
            None,
            Some(""),
            Some("%25_"),
            Some("_"),
            Some("%"),
            Some("Upper"),
            Some("upper"),
            Some("/a/"),
            Some("none"),
        ];
        for url_contains in contains {
            for kind in [None, Some(Kind::Refresh), Some(Kind::Prefetch)] {
                for status in [None, Some(ItemStatus::Failed), Some(ItemStatus::Waiting)] {
                    for since in [None, Some(at(T0 + H))] {
                        let filter = ItemFilter { url_contains, kind, status, since, ..ItemFilter::default() };
                        let expected: Vec<i64> = all
                            .iter()
                            .filter(|i: &&Item| url_contains.is_none_or(|t| i.url.contains(t)))
                            .filter(|i| kind.is_none_or(|k| i.kind == k))
                            .filter(|i| status.is_none_or(|s| i.status == s))
                            .filter(|i| since.is_none_or(|s| i.created_at >= s))
                            .map(|i| i.id)
                            .collect();
                        let count = store.count_items(&acme, &filter).await.unwrap();
                        assert_eq!(count, expected.len() as u64, "{name}: {filter:?}");
                        // Keyset pages of 2 walk exactly the same items, newest first.
                        let (mut walked, mut before) = (Vec::new(), None);
                        loop {
                            let page_filter = ItemFilter { before_id: before, ..filter.clone() };
                            let page = store.list_items(&acme, &page_filter, 2).await.unwrap();
                            walked.extend(page.iter().map(|i| i.id));
                            before = page.last().map(|i| i.id);
                            if page.len() < 2 {
                                break;
                            }
                        }
                        assert_eq!(walked, expected, "{name}: {filter:?}");
                    }
                }
            }
        }
        // Spot checks of the exact matching: no wildcards, case kept.
        let count = |t: &'static str| {
            let store = store.clone();
            let acme = acme.clone();
            async move {
                store.count_items(&acme, &ItemFilter { url_contains: Some(t), ..ItemFilter::default() }).await.unwrap()
            }
        };
        assert_eq!(count("%25_").await, 2, "{name}: the refresh and the prefetch of a");
        assert_eq!(count("a%25").await, 0, "{name}: '%' is no wildcard");
        assert_eq!(count("Upper").await, 1, "{name}");
        assert_eq!(count("upper").await, 0, "{name}: case-sensitive");
        let before = all[2].id;
        let filter = ItemFilter { before_id: Some(before), ..ItemFilter::default() };
        assert_eq!(store.count_items(&acme, &filter).await.unwrap(), 4, "{name}: the cursor counts too");
    }
}
