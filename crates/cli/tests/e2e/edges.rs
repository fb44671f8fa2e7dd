//! Refresh and prefetch take effect on real Varnish and nginx caches, in tier order, and survive
//! nodes that are down.

use crate::support::*;
use serde_json::json;
use std::time::Duration;

const REFRESH: &str = "/v2/cache/refresh";
const PREFETCH: &str = "/v2/cache/prefetch";
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn varnish_url_refresh_turns_a_hit_into_a_miss() {
    let (_origin, varnish, server) = one_varnish().await;
    let host = "www.example.com";
    for path in ["/a.css", "/b.css?v=1"] {
        cache_status(&varnish.address(), host, path).await;
        assert_eq!(cache_status(&varnish.address(), host, path).await, "HIT");
    }

    let task = server.submit(REFRESH, json!({"urls": ["http://www.example.com/b.css?v=1"]})).await;
    let items = server.wait_final(REFRESH, task, WAIT).await;

    assert_eq!(items[0]["status"], "completed", "{items:?}");
    assert_ne!(items[0]["complete_time"], "");
    assert_eq!(cache_status(&varnish.address(), host, "/b.css?v=1").await, "MISS");
    assert_eq!(cache_status(&varnish.address(), host, "/a.css").await, "HIT", "only the named URL is evicted");
}

#[tokio::test]
async fn varnish_dir_refresh_evicts_the_directory_and_nothing_else() {
    let (_origin, varnish, server) = one_varnish().await;
    let inside = [("www.example.com", "/static/a.js"), ("www.example.com", "/static/deep/b.png?x=1")];
    let outside = [
        ("www.example.com", "/staticfile"), // shares the prefix without the slash
        ("www.example.com", "/other/static/a.js"),
        ("img.example.com", "/static/a.js"), // same path, another host on the same node
        ("www.example.com", "/static.x/a"),  // '.' must not act as a regex wildcard
    ];
    for (host, path) in inside.iter().chain(&outside) {
        cache_status(&varnish.address(), host, path).await;
        assert_eq!(cache_status(&varnish.address(), host, path).await, "HIT");
    }

    let task = server.submit(REFRESH, json!({"urls": ["http://www.example.com/static/"], "type": "dir"})).await;
    let items = server.wait_final(REFRESH, task, WAIT).await;
    assert_eq!(items[0]["status"], "completed", "{items:?}");
    assert_eq!(items[0]["type"], "dir");
    // The ban lurker evicts in the background; a request checks the ban list itself, so the
    // answer is already a miss.
    for (host, path) in inside {
        assert_eq!(cache_status(&varnish.address(), host, path).await, "MISS", "{host}{path}");
    }
    for (host, path) in outside {
        assert_eq!(cache_status(&varnish.address(), host, path).await, "HIT", "{host}{path}");
    }
}

#[tokio::test]
async fn varnish_prefetch_makes_the_next_get_a_hit() {
    let (origin, varnish, server) = one_varnish().await;

    let task = server
        .submit(PREFETCH, json!({"urls": ["http://www.example.com/big.bin", "http://www.example.com/p.html"]}))
        .await;
    let items = server.wait_final(PREFETCH, task, WAIT).await;

    assert!(items.iter().all(|i| i["status"] == "completed"), "{items:?}");
    assert_eq!(origin.count("www.example.com", "/big.bin"), 1);
    assert_eq!(cache_status(&varnish.address(), "www.example.com", "/big.bin").await, "HIT");
    assert_eq!(cache_status(&varnish.address(), "www.example.com", "/p.html").await, "HIT");
    assert_eq!(origin.count("www.example.com", "/p.html"), 1, "the client GET was served from the cache");
}

#[tokio::test]
async fn prefetch_of_an_origin_error_fails_with_the_status() {
    let (_origin, _varnish, server) = one_varnish().await;

    let task = server.submit(PREFETCH, json!({"urls": ["http://www.example.com/status/404/x"]})).await;
    let items = server.wait_final(PREFETCH, task, WAIT).await;

    assert_eq!(items[0]["status"], "failed");
    let reason: String = sqlx::query_scalar("SELECT reason FROM items").fetch_one(&server.db().await).await.unwrap();
    assert!(reason.contains("v1") && reason.contains("404"), "{reason}");
}

#[tokio::test]
async fn nginx_url_refresh_and_prefetch() {
    let origin = Origin::start().await;
    let nginx = Nginx::start(origin.port, 1).await;
    let server =
        Cachectl::start(&format!("{ACCOUNTS}{}{}", fast_worker("10s"), edge("n1", "nginx", &nginx.address(0), "edge")))
            .await;
    let host = "www.example.com";
    cache_status(&nginx.address(0), host, "/n.css?v=2").await;
    assert_eq!(cache_status(&nginx.address(0), host, "/n.css?v=2").await, "HIT");
    cache_status(&nginx.address(0), host, "/keep.css").await;

    let task = server
        .submit(REFRESH, json!({"urls": ["http://www.example.com/n.css?v=2", "http://www.example.com/never-cached"]}))
        .await;
    let items = server.wait_final(REFRESH, task, WAIT).await;
    assert!(items.iter().all(|i| i["status"] == "completed"), "a 404 (not cached) is a success: {items:?}");
    assert_eq!(cache_status(&nginx.address(0), host, "/n.css?v=2").await, "MISS");
    assert_eq!(cache_status(&nginx.address(0), host, "/keep.css").await, "HIT");

    let task = server.submit(PREFETCH, json!({"urls": ["http://www.example.com/warm.js"]})).await;
    let items = server.wait_final(PREFETCH, task, WAIT).await;
    assert_eq!(items[0]["status"], "completed", "{items:?}");
    assert_eq!(cache_status(&nginx.address(0), host, "/warm.js").await, "HIT");
    assert_eq!(origin.count(host, "/warm.js"), 1);
}

/// Purges are pipelined (`[worker] pipeline_depth`); nginx closes a kept-alive connection after
/// `keepalive_requests` answers and drops what was pipelined behind the last one. Those requests
/// are written again on a new connection: every purge is done once, none waits for a retry.
#[tokio::test]
async fn pipelined_purges_survive_nginx_closing_connections() {
    let origin = Origin::start().await;
    let nginx = Nginx::start_with(origin.port, &[free_port()], "keepalive_requests 7;").await;
    let worker = fast_worker("20s").replace("[worker]\n", "[worker]\nper_node_concurrency = 8\npipeline_depth = 4\n");
    let server =
        Cachectl::start(&format!("{ACCOUNTS}{worker}{}", edge("n1", "nginx", &nginx.address(0), "edge"))).await;
    let host = "www.example.com";
    cache_status(&nginx.address(0), host, "/p/cached.css").await;
    assert_eq!(cache_status(&nginx.address(0), host, "/p/cached.css").await, "HIT");

    let mut urls: Vec<String> = (0..299).map(|i| format!("http://{host}/p/{i}.css")).collect();
    urls.push(format!("http://{host}/p/cached.css"));
    let task = server.submit(REFRESH, json!({ "urls": urls })).await;
    let items = server.wait_final(REFRESH, task, WAIT).await;

    assert_eq!(items.len(), 300);
    assert!(items.iter().all(|i| i["status"] == "completed"), "{items:?}");
    assert_eq!(cache_status(&nginx.address(0), host, "/p/cached.css").await, "MISS");
    let db = server.db().await;
    let attempts: Vec<i64> = sqlx::query_scalar("SELECT attempts FROM node_results").fetch_all(&db).await.unwrap();
    assert_eq!(attempts.len(), 300);
    assert!(attempts.iter().all(|a| *a == 1), "no purge needed a second attempt: {attempts:?}");
    // What nginx dropped unanswered was sent again and purged once. A request whose answer was
    // lost with the connection (a reset before it was read) is sent again too, and purged twice:
    // harmless, and rare.
    let purged: Vec<String> =
        nginx.access_log().into_iter().filter(|l| l.2 == "PURGE" && l.4.starts_with("/p/")).map(|l| l.4).collect();
    let distinct: std::collections::HashSet<&String> = purged.iter().collect();
    assert_eq!(distinct.len(), 300, "every URL was purged");
    assert!(
        purged.len() <= 305,
        "{} purges for 300 URLs: dropped requests were resent once, not every time",
        purged.len()
    );
}

/// `[worker] edge_transport` picks what carries purges and bans. With `per_node_concurrency = 8`
/// and `pipeline_depth = 8`, `pipelined` sends them all on one connection; `plain` (reqwest's
/// pool, one request per connection at a time) on several, at most `per_node_concurrency`. nginx
/// logs each request's connection serial number. Either way every purge is done at its first
/// attempt.
#[tokio::test]
async fn the_edge_transport_setting_picks_pipelined_or_plain_purges() {
    let origin = Origin::start().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("connections.log");
    let directives =
        format!("log_format conn '$connection $request_method $request_uri';\n    access_log {} conn;", log.display());
    let nginx = Nginx::start_with(origin.port, &[free_port()], &directives).await;
    let host = "www.example.com";
    for transport in ["pipelined", "plain"] {
        let keys =
            format!("[worker]\nper_node_concurrency = 8\npipeline_depth = 8\nedge_transport = \"{transport}\"\n");
        let worker = fast_worker("20s").replace("[worker]\n", &keys);
        let server =
            Cachectl::start(&format!("{ACCOUNTS}{worker}{}", edge("n1", "nginx", &nginx.address(0), "edge"))).await;
        let cached = format!("/{transport}/0.css");
        cache_status(&nginx.address(0), host, &cached).await;
        assert_eq!(cache_status(&nginx.address(0), host, &cached).await, "HIT");

        let urls: Vec<String> = (0..100).map(|i| format!("http://{host}/{transport}/{i}.css")).collect();
        let task = server.submit(REFRESH, json!({ "urls": urls })).await;
        let items = server.wait_final(REFRESH, task, WAIT).await;

        assert!(items.iter().all(|i| i["status"] == "completed"), "{transport}: {items:?}");
        assert_eq!(cache_status(&nginx.address(0), host, &cached).await, "MISS", "{transport}");
        let attempts: Vec<i64> =
            sqlx::query_scalar("SELECT attempts FROM node_results").fetch_all(&server.db().await).await.unwrap();
        assert!(attempts.len() == 100 && attempts.iter().all(|a| *a == 1), "{transport}: {attempts:?}");
        let text = std::fs::read_to_string(&log).unwrap();
        let connections: std::collections::HashSet<&str> = text
            .lines()
            .filter_map(|line| line.split_once(' '))
            .filter(|(_, request)| request.starts_with(&format!("PURGE /{transport}/")))
            .map(|(connection, _)| connection)
            .collect();
        match transport {
            "pipelined" => assert_eq!(connections.len(), 1, "8 deep on ceil(8 / 8) connection"),
            // A pooled connection goes back to the pool a moment after its permit, so a busy
            // node may see a few more than per_node_concurrency; what tells the two apart is
            // that plain requests are not pipelined onto one connection.
            _ => assert!(
                connections.len() >= 2,
                "one request per connection at a time, on several connections: {connections:?}"
            ),
        }
    }
}

#[tokio::test]
async fn nginx_dir_refresh_fails_with_a_reason() {
    let origin = Origin::start().await;
    let nginx = Nginx::start(origin.port, 1).await;
    let server =
        Cachectl::start(&format!("{ACCOUNTS}{}{}", fast_worker("10s"), edge("n1", "nginx", &nginx.address(0), "edge")))
            .await;

    let task = server.submit(REFRESH, json!({"urls": ["http://www.example.com/dir/"], "type": "dir"})).await;
    let items = server.wait_final(REFRESH, task, WAIT).await;

    assert_eq!(items[0]["status"], "failed");
    let reason: String = sqlx::query_scalar("SELECT reason FROM items").fetch_one(&server.db().await).await.unwrap();
    assert!(reason.contains("node n1") && reason.contains("nginx cannot purge a directory"), "{reason}");
    assert!(nginx.access_log().iter().all(|l| l.2 != "PURGE"), "nothing was sent to nginx");
}

#[tokio::test]
async fn parents_are_purged_before_edges() {
    let origin = Origin::start().await;
    let nginx = Nginx::start(origin.port, 2).await;
    let (parent, edge_port) = (nginx.ports[0], nginx.ports[1]);
    // The edge is listed first: order in the configuration must not matter.
    let edges = format!(
        "{}{}",
        edge("edge-1", "nginx", &nginx.address(1), "edge"),
        edge("parent-1", "nginx", &nginx.address(0), "parent")
    );
    let server = Cachectl::start(&format!("{ACCOUNTS}{}{edges}", fast_worker("10s"))).await;
    let urls: Vec<String> = (0..20).map(|i| format!("http://www.example.com/tier/{i}")).collect();

    let task = server.submit(REFRESH, json!({ "urls": urls })).await;
    let items = server.wait_final(REFRESH, task, WAIT).await;
    assert!(items.iter().all(|i| i["status"] == "completed"), "{items:?}");

    let log = nginx.access_log();
    for i in 0..20 {
        let uri = format!("/tier/{i}");
        let position = |port: u16| log.iter().position(|l| l.1 == port && l.2 == "PURGE" && l.4 == uri);
        let (p, e) = (position(parent).expect("parent purged"), position(edge_port).expect("edge purged"));
        assert!(p < e, "{uri}: parent purge logged at line {p}, edge purge at line {e}");
        assert!(log[p].0 <= log[e].0, "{uri}: parent at {}, edge at {}", log[p].0, log[e].0);
    }
}

#[tokio::test]
async fn a_node_that_stays_down_fails_the_item_while_the_other_completes() {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let down = format!("127.0.0.1:{}", free_port());
    let edges =
        format!("{}{}", edge("up-1", "varnish", &varnish.address(), "edge"), edge("down-1", "varnish", &down, "edge"));
    let server = Cachectl::start(&format!("{ACCOUNTS}{}{edges}", fast_worker("2s"))).await;
    cache_status(&varnish.address(), "www.example.com", "/d.css").await;

    let task = server.submit(REFRESH, json!({"urls": ["http://www.example.com/d.css"]})).await;
    let items = server.wait_final(REFRESH, task, WAIT).await;

    assert_eq!(items[0]["status"], "failed");
    let db = server.db().await;
    let reason: String = sqlx::query_scalar("SELECT reason FROM items").fetch_one(&db).await.unwrap();
    assert!(reason.contains("node down-1") && reason.contains("connect"), "{reason}");
    let nodes: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT node, state, attempts FROM node_results ORDER BY node").fetch_all(&db).await.unwrap();
    assert_eq!(nodes[0].0, "down-1");
    assert_eq!(nodes[0].1, "failed");
    assert!(nodes[0].2 > 1, "the down node was retried: {nodes:?}");
    assert_eq!((nodes[1].0.as_str(), nodes[1].1.as_str()), ("up-1", "succeeded"));
    assert_eq!(cache_status(&varnish.address(), "www.example.com", "/d.css").await, "MISS");
}

#[tokio::test]
async fn a_node_that_comes_back_before_the_deadline_completes() {
    let origin = Origin::start().await;
    let late_port = free_port();
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}",
        fast_worker("30s"),
        edge("late-1", "varnish", &format!("127.0.0.1:{late_port}"), "edge")
    ))
    .await;

    let task = server.submit(REFRESH, json!({"urls": ["http://www.example.com/late.css"]})).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let items = server.task_items(REFRESH, task).await;
    assert_eq!(items[0]["status"], "processing", "retrying while the node is down: {items:?}");
    let _varnish = Varnish::start_on(late_port, origin.port).await;
    let items = server.wait_final(REFRESH, task, WAIT).await;

    assert_eq!(items[0]["status"], "completed", "{items:?}");
    let attempts: i64 =
        sqlx::query_scalar("SELECT attempts FROM node_results").fetch_one(&server.db().await).await.unwrap();
    assert!(attempts > 1, "{attempts}");
}
