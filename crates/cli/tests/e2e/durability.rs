//! Acknowledged tasks survive `kill -9`; unfinished items resume; old records are swept.

use crate::support::*;
use serde_json::json;
use std::time::Duration;

const REFRESH: &str = "/v2/cache/refresh";

#[tokio::test]
async fn kill_9_with_items_in_flight_loses_nothing() {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    // The second node is down when the tasks are submitted, so every item is still in flight
    // (retrying) when the server is killed.
    let late_port = free_port();
    let edges = format!(
        "{}{}",
        edge("v1", "varnish", &varnish.address(), "edge"),
        edge("v2", "varnish", &format!("127.0.0.1:{late_port}"), "edge")
    );
    let mut server = Cachectl::start(&format!("{ACCOUNTS}{}{edges}", fast_worker("60s"))).await;
    let mut tasks = Vec::new();
    for t in 0..3 {
        let urls: Vec<String> = (0..300).map(|i| format!("http://www.example.com/k/{t}/{i}")).collect();
        tasks.push(server.submit(REFRESH, json!({ "urls": urls })).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let db = server.db().await;
    let unfinished: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE status IN ('waiting', 'processing')")
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    assert!(unfinished > 0, "items must be in flight when the server dies");

    server.kill9();
    let _late = Varnish::start_on(late_port, origin.port).await;
    server.restart().await;

    for task in tasks {
        let items = server.wait_final(REFRESH, task, Duration::from_secs(60)).await;
        assert_eq!(items.len(), 300, "task {task} kept all its items");
        assert!(
            items.iter().all(|i| i["status"] == "completed"),
            "task {task}: {:?}",
            items.iter().find(|i| i["status"] != "completed")
        );
    }
    let db = server.db().await;
    let succeeded: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM node_results WHERE state = 'succeeded'").fetch_one(&db).await.unwrap();
    assert_eq!(succeeded, 1800, "every item succeeded on both nodes");
}

#[tokio::test]
async fn graceful_shutdown_then_restart_resumes() {
    let late_port = free_port();
    let origin = Origin::start().await;
    let mut server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}",
        fast_worker("60s"),
        edge("v1", "varnish", &format!("127.0.0.1:{late_port}"), "edge")
    ))
    .await;
    let task =
        server.submit(REFRESH, json!({"urls": ["http://www.example.com/g1", "http://www.example.com/g2"]})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    server.terminate().await;
    assert!(server.log().contains("Worker stopped."), "{}", server.log());
    let _varnish = Varnish::start_on(late_port, origin.port).await;
    server.restart().await;

    let items = server.wait_final(REFRESH, task, Duration::from_secs(30)).await;
    assert!(items.iter().all(|i| i["status"] == "completed"), "{items:?}");
}

#[tokio::test]
async fn the_retention_sweep_deletes_old_records() {
    let mut server = Cachectl::start(&format!("{ACCOUNTS}\n[retention]\ndays = 31\n")).await;
    let fresh = server.submit(REFRESH, json!({"urls": ["http://www.example.com/fresh"]})).await;
    server.kill9();
    // Records from 40 days ago, written as an older cachectl would have left them.
    let old = super::now_ms() - 40 * 86_400_000;
    {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(server.db_path());
        let db = sqlx::SqlitePool::connect_with(options).await.unwrap();
        sqlx::query("INSERT INTO tasks (id, account, kind, operator, dialect, created_at) VALUES (9000, 'acme', 'refresh', 'x', 'baishan', ?)")
            .bind(old)
            .execute(&db)
            .await
            .unwrap();
        for i in 0..5 {
            sqlx::query(
                "INSERT INTO items (task_id, account, kind, url, host, item_type, status, operator, created_at, not_before)
                 VALUES (9000, 'acme', 'refresh', ?, 'www.example.com', 'url', 'completed', 'x', ?, ?)",
            )
            .bind(format!("http://www.example.com/old/{i}"))
            .bind(old)
            .bind(old)
            .execute(&db)
            .await
            .unwrap();
        }
        db.close().await;
    }

    server.restart().await;

    let db = server.db().await;
    let start = std::time::Instant::now();
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE task_id = 9000").fetch_one(&db).await.unwrap();
        if left == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "old items were not swept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tasks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE id = 9000").fetch_one(&db).await.unwrap();
    assert_eq!(tasks, 0, "the emptied task went too");
    assert_eq!(server.task_items(REFRESH, fresh).await.len(), 1, "recent records stay");
}
