//! Several `cachectl serve` instances on one PostgreSQL: shared work under leases that survives
//! a `kill -9`, rate limits that hold across instances, and a database restart under load.

use crate::support::*;
use cachectl_testkit::PgCluster;
use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const REFRESH: &str = "/v2/cache/refresh";

#[tokio::test]
async fn three_instances_share_the_work_and_survive_a_kill_9() {
    let pg = PgCluster::start();
    let db = pg.database("cluster").await;
    let origin = Origin::start().await;
    let (v1, v2) = (Varnish::start(origin.port).await, Varnish::start(origin.port).await);
    let accounts = ACCOUNTS;
    // Small per-instance capacity so that no single instance can take the whole queue, and a
    // short lease so that the killed instance's items are taken over quickly.
    let worker = fast_worker("60s").replace("lease = \"5s\"", "lease = \"3s\"");
    let extra = format!(
        "{accounts}{worker}per_node_concurrency = 4\nmax_items_in_flight = 150\n\n{}{}",
        edge("v1", "varnish", &v1.address(), "edge"),
        edge("v2", "varnish", &v2.address(), "edge"),
    );
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Cachectl::start_on_store(Some(&db), &extra).await);
    }

    let mut tasks = Vec::new();
    for batch in 0..5 {
        let urls: Vec<String> = (0..1000).map(|i| format!("http://www.example.com/c/{batch}/{i}")).collect();
        tasks.push(instances[batch % 3].submit(REFRESH, json!({ "urls": urls })).await);
    }
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    // Kill one instance once the run is well under way.
    let start = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM node_results WHERE state = 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if done >= 1500 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the run did not start: {done}\n{}", instances[0].log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unfinished: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE status IN ('waiting', 'processing')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(unfinished > 0, "the kill must happen mid-run");
    instances[1].kill9();

    for task in &tasks {
        let items = instances[0].wait_final(REFRESH, *task, Duration::from_secs(120)).await;
        assert_eq!(items.len(), 1000, "task {task} kept every item");
        assert!(
            items.iter().all(|i| i["status"] == "completed"),
            "task {task}: {:?}",
            items.iter().find(|i| i["status"] != "completed")
        );
    }
    let succeeded: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM node_results WHERE state = 'succeeded'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(succeeded, 10_000, "every purge was sent and succeeded on both nodes");
    let workers: Vec<(String, i64)> =
        sqlx::query_as("SELECT instance, COUNT(*) FROM node_results GROUP BY instance ORDER BY 2 DESC")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(workers.len() >= 2, "the work was spread over the instances: {workers:?}");
    let unique: HashSet<&str> = workers.iter().map(|(w, _)| w.as_str()).collect();
    assert!(unique.len() >= 2);
    println!("node results per instance: {workers:?}");
}

/// `[worker] enabled = false` makes an API-only instance: it accepts a task and never runs it;
/// an instance with its worker on, sharing the store, does.
#[tokio::test]
async fn an_api_only_instance_leaves_the_work_to_instances_with_a_worker() {
    let pg = PgCluster::start();
    let db = pg.database("apionly").await;
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let worker = fast_worker("30s");
    let nodes = edge("v1", "varnish", &varnish.address(), "edge");
    let api_only = Cachectl::start_on_store(Some(&db), &format!("{ACCOUNTS}{worker}enabled = false\n\n{nodes}")).await;
    let task = api_only.submit(REFRESH, json!({"urls": ["http://www.example.com/api-only.css"]})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let items = api_only.task_items(REFRESH, task).await;
    assert_eq!(items[0]["status"], "waiting", "nobody runs the task yet: {items:?}");
    assert!(api_only.log().contains("worker is disabled"), "{}", api_only.log());

    let working = Cachectl::start_on_store(Some(&db), &format!("{ACCOUNTS}{worker}{nodes}")).await;
    let items = api_only.wait_final(REFRESH, task, Duration::from_secs(30)).await;
    assert_eq!(items[0]["status"], "completed", "{items:?}\n{}", working.log());
}

#[tokio::test]
async fn a_rate_limit_holds_across_instances() {
    let pg = PgCluster::start();
    let db = pg.database("limits").await;
    let accounts = ACCOUNTS.replace("name = \"acme\"", "name = \"acme\"\nrate_limit_per_minute = 30");
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Cachectl::start_on_store(Some(&db), &accounts).await);
    }
    room_in_this_minute(15).await;

    let mut accepted = 0;
    let mut limited = 0;
    for i in 0..90 {
        let (status, headers, json) = instances[i % 3].get(&format!("{REFRESH}?task_id=1")).await;
        match status {
            200 => accepted += 1,
            429 => {
                limited += 1;
                assert_eq!(json["code"], 429);
                assert_eq!(headers["x-ratelimit-remaining"], "0");
            }
            other => panic!("unexpected {other}: {json}"),
        }
    }
    assert_eq!(accepted, 30, "exactly the limit is accepted over all three instances");
    assert_eq!(limited, 60);
}

/// Above 199 requests per minute each instance counts its requests in the store in reservations
/// of 1 % of the limit: the limit still holds over all instances, and at most one unused
/// reservation per instance is refused early.
#[tokio::test]
async fn a_high_rate_limit_holds_across_instances_by_reservations() {
    let pg = PgCluster::start();
    let db = pg.database("reserved").await;
    let accounts = ACCOUNTS.replace("name = \"acme\"", "name = \"acme\"\nrate_limit_per_minute = 300");
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Cachectl::start_on_store(Some(&db), &accounts).await);
    }
    room_in_this_minute(20).await;

    let mut accepted = 0;
    let mut limited = 0;
    for i in 0..400 {
        let (status, headers, json) = instances[i % 3].get(&format!("{REFRESH}?task_id=1")).await;
        match status {
            200 => accepted += 1,
            429 => {
                limited += 1;
                assert_eq!(headers["x-ratelimit-remaining"], "0");
            }
            other => panic!("unexpected {other}: {json}"),
        }
    }
    // Reservations of 3: each instance may hold at most 2 reserved requests unused.
    assert!((294..=300).contains(&accepted), "accepted {accepted} of a limit of 300");
    assert_eq!(accepted + limited, 400);
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let counted: i64 = sqlx::query_scalar("SELECT MAX(count) FROM rate_windows").fetch_one(&pool).await.unwrap();
    assert!(counted >= 300 && counted % 3 == 0, "the store counted whole reservations of 3: {counted}");
}

#[tokio::test]
async fn postgres_restart_under_load_loses_nothing_acknowledged() {
    let pg = PgCluster::start();
    let db = pg.database("restart").await;
    let accounts = ACCOUNTS.replace("name = \"acme\"", "name = \"acme\"\nrate_limit_per_minute = 100000");
    let server = Cachectl::start_on_store(Some(&db), &accounts).await;

    let stop_at = Instant::now() + Duration::from_secs(8);
    let http = server.http.clone();
    let url = server.url(&format!("{REFRESH}?token={TOKEN}"));
    let load = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        let mut failures = Vec::new();
        let mut i = 0;
        while Instant::now() < stop_at {
            i += 1;
            let body = json!({"urls": [format!("http://www.example.com/restart/{i}")]});
            match http.post(&url).json(&body).timeout(Duration::from_secs(10)).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let json: serde_json::Value = r.json().await.expect("every answer is JSON");
                    if status == 200 {
                        acknowledged.push(json["data"]["task_id"].as_i64().unwrap());
                    } else {
                        failures.push((status, json));
                    }
                }
                Err(e) => panic!("the server must answer every request: {e}"),
            }
        }
        (acknowledged, failures)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.stop();
    // Longer than the store's connection wait (1 s in the tests): requests meanwhile must fail cleanly.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    pg.start_again();
    let (acknowledged, failures) = load.await.unwrap();

    assert!(
        !failures.is_empty(),
        "some requests met the database down ({} acknowledged)\n{}",
        acknowledged.len(),
        server.log()
    );
    for (status, json) in &failures {
        assert_eq!(*status, 503, "{json}");
        assert_eq!(json["code"], 503, "in the dialect's envelope: {json}");
        assert!(json["message"].as_str().unwrap().contains("temporarily unavailable"), "{json}");
    }
    let (status, _, _) = server.get(&format!("{REFRESH}?task_id=1")).await;
    assert_eq!(status, 200, "the service reconnected");
    let readyz = server.http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 200);
    assert!(acknowledged.len() > 10, "{}", acknowledged.len());
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let stored: Vec<i64> = sqlx::query_scalar("SELECT task_id FROM items WHERE task_id = ANY($1)")
        .bind(&acknowledged)
        .fetch_all(&pool)
        .await
        .unwrap();
    let stored: HashSet<i64> = stored.into_iter().collect();
    let lost: Vec<&i64> = acknowledged.iter().filter(|t| !stored.contains(t)).collect();
    assert!(lost.is_empty(), "acknowledged tasks lost: {lost:?}");
    for task in acknowledged.iter().rev().take(5) {
        assert_eq!(server.task_items(REFRESH, *task).await.len(), 1, "task {task} is readable through the API");
    }
}

#[tokio::test]
async fn cachectl_migrate_prepares_a_database_for_instances_that_do_not_migrate() {
    let pg = PgCluster::start();
    let db = pg.database("migrate").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("[store]\nurl = \"{db}\"\nmigrate_on_start = false\n{ACCOUNTS}")).unwrap();
    let bin = env!("CARGO_BIN_EXE_cachectl");

    // Without migrations an instance that may not migrate refuses to start, naming the fix.
    let refused = std::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env("CACHECTL_SERVER__LISTEN", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("cachectl migrate"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let migrated = std::process::Command::new(bin).args(["migrate", "--config"]).arg(&config).output().unwrap();
    assert!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
    assert!(String::from_utf8_lossy(&migrated.stdout).starts_with("store migrated"));
    let again = std::process::Command::new(bin).args(["migrate", "--config"]).arg(&config).output().unwrap();
    assert!(again.status.success(), "migrating twice is harmless");

    let server = Cachectl::start_on_store(Some(&db), ACCOUNTS).await;
    let task = server.submit(REFRESH, json!({"urls": ["http://www.example.com/m"]})).await;
    assert_eq!(server.task_items(REFRESH, task).await.len(), 1);
}
