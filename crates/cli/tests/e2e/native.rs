//! The native API and the `cachectl` client commands, against real caches: progress, JSON,
//! exit codes, idempotency, coalescing, cancel, retry, refresh-then-prefetch order, the
//! progress stream, webhooks and the OpenAPI document.

use crate::support::*;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

impl Cachectl {
    /// A native API call with the standard token.
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, self.url(path)).bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}")))
    }

    /// Submits through the native API; returns the task id.
    pub async fn native_submit(&self, body: Value) -> i64 {
        let (status, json) = self.api(reqwest::Method::POST, "/api/v1/tasks", Some(body), None).await;
        assert_eq!(status, 201, "{json}");
        json["task"]["id"].as_i64().unwrap()
    }

    /// Waits until the task is no longer running; returns its detail.
    pub async fn native_wait(&self, id: i64) -> Value {
        let start = Instant::now();
        loop {
            let (status, detail) = self.api(reqwest::Method::GET, &format!("/api/v1/tasks/{id}"), None, None).await;
            assert_eq!(status, 200, "{detail}");
            if detail["task"]["state"] != "running" {
                return detail;
            }
            assert!(start.elapsed() < WAIT, "task {id} still running: {detail}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a client command of the binary against this server.
    pub async fn cli(&self, args: &[&str], token: &str) -> (i32, String, String) {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_cachectl"))
            .args(args)
            .env("CACHECTL_SERVER", self.url(""))
            .env("CACHECTL_TOKEN", token)
            .env_remove("CACHECTL_CLIENT_CONFIG")
            // An empty configuration folder: no client file, so flags and environment decide.
            .env("XDG_CONFIG_HOME", self.dir.path())
            .output()
            .await
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

#[tokio::test]
async fn cli_refresh_waits_with_progress_and_json() {
    let (_origin, varnish, server) = one_varnish().await;
    cache_status(&varnish.address(), "www.example.com", "/cli.css").await;
    assert_eq!(cache_status(&varnish.address(), "www.example.com", "/cli.css").await, "HIT");

    let (code, stdout, stderr) = server
        .cli(&["refresh", "http://www.example.com/cli.css", "http://www.example.com/cli2.css", "--wait"], TOKEN)
        .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stderr.contains("items final"), "progress is shown while waiting: {stderr}");
    assert!(stderr.contains("2/2 items final (2 completed, 0 failed)"), "{stderr}");
    assert!(stdout.contains("completed") && stdout.contains("v1:succeeded 200"), "{stdout}");
    assert_eq!(cache_status(&varnish.address(), "www.example.com", "/cli.css").await, "MISS");

    let (code, stdout, _) =
        server.cli(&["prefetch", "http://www.example.com/warm.js", "--wait", "--json"], TOKEN).await;
    assert_eq!(code, 0);
    let detail: Value = serde_json::from_str(&stdout).expect("--json prints the API's JSON");
    assert_eq!(detail["task"]["state"], "completed");
    assert_eq!(detail["items"][0]["nodes"][0]["node"], "v1");
    assert_eq!(detail["items"][0]["nodes"][0]["state"], "succeeded");
    assert_eq!(cache_status(&varnish.address(), "www.example.com", "/warm.js").await, "HIT");

    let id = detail["task"]["id"].as_i64().unwrap().to_string();
    let (code, stdout, _) = server.cli(&["status", &id, "--json"], TOKEN).await;
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["task"]["id"].to_string(), id);
    let (code, stdout, _) = server.cli(&["tasks", "--since", "1h"], TOKEN).await;
    assert_eq!(code, 0);
    assert!(stdout.starts_with("TASK") && stdout.contains("prefetch") && stdout.contains("refresh"), "{stdout}");
    let (code, stdout, _) = server.cli(&["tasks", "--status", "completed", "--json"], TOKEN).await;
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["tasks"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn cli_exit_codes_and_one_line_errors() {
    let down = format!("127.0.0.1:{}", free_port());
    let server =
        Cachectl::start(&format!("{ACCOUNTS}{}{}", fast_worker("1s"), edge("down-1", "varnish", &down, "edge"))).await;

    let (code, stdout, stderr) = server.cli(&["refresh", "http://www.example.com/x", "--wait"], TOKEN).await;
    assert_eq!(code, 1, "an item failed: {stdout}\n{stderr}");
    assert!(stdout.contains("failed") && stdout.contains("node down-1"), "{stdout}");

    let (code, _, stderr) = server.cli(&["status", "999999"], TOKEN).await;
    assert_eq!((code, stderr.trim()), (5, "error: not found: no such task"));
    let (code, _, stderr) = server.cli(&["tasks"], "wrong-token-123").await;
    assert_eq!((code, stderr.trim()), (4, "error: unauthorized: unknown token"));
    let (code, _, stderr) = server.cli(&["refresh", "http://evil.test/x"], TOKEN).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.starts_with("error: refused: no URL was accepted"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);

    let mut stopped = server;
    stopped.kill9();
    let (code, _, stderr) = stopped.cli(&["tasks"], TOKEN).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.starts_with("error: cannot reach cachectl at http://127.0.0.1:"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);
}

#[tokio::test]
async fn idempotent_submits() {
    let server = Cachectl::start(ACCOUNTS).await;
    let body = json!({"urls": ["http://www.example.com/i1"]});
    let (s1, a) = server.api(reqwest::Method::POST, "/api/v1/tasks", Some(body.clone()), Some("key-1")).await;
    let (s2, b) = server.api(reqwest::Method::POST, "/api/v1/tasks", Some(body), Some("key-1")).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(a["task"]["id"], b["task"]["id"], "the same key and body return the original task");
    let (s3, c) = server
        .api(
            reqwest::Method::POST,
            "/api/v1/tasks",
            Some(json!({"urls": ["http://www.example.com/i2"]})),
            Some("key-1"),
        )
        .await;
    assert_eq!(s3, 409, "{c}");
    assert_eq!(c["error"]["code"], "conflict");
    let (s4, d) = server
        .api(
            reqwest::Method::POST,
            "/api/v1/tasks",
            Some(json!({"urls": ["http://www.example.com/i1"]})),
            Some("key-2"),
        )
        .await;
    assert_eq!(s4, 201);
    assert_ne!(d["task"]["id"], a["task"]["id"]);
    let (_, list) = server.api(reqwest::Method::GET, "/api/v1/tasks", None, None).await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 2, "the replay stored nothing: {list}");
}

/// `domain` names a host and the names under it, whatever its case; a look-alike suffix and a
/// wildcard are not domains.
#[tokio::test]
async fn the_domain_filter_matches_the_host_and_names_under_it_in_any_case() {
    let server = Cachectl::start(ACCOUNTS).await;
    let task = server.native_submit(json!({"urls": ["http://www.example.com/d1"]})).await;
    let count = |json: &Value, key: &str| json[key].as_array().map_or(usize::MAX, Vec::len);
    for (domain, expected) in [("example.com", 1), ("EXAMPLE.com", 1), ("WWW.Example.COM", 1), ("ample.com", 0)] {
        let (status, tasks) =
            server.api(reqwest::Method::GET, &format!("/api/v1/tasks?domain={domain}"), None, None).await;
        assert_eq!((status, count(&tasks, "tasks")), (200, expected), "tasks of {domain}: {tasks}");
        let (status, items) =
            server.api(reqwest::Method::GET, &format!("/api/v1/items?domain={domain}"), None, None).await;
        assert_eq!((status, count(&items, "items")), (200, expected), "items of {domain}: {items}");
        if expected == 1 {
            assert_eq!(tasks["tasks"][0]["id"], task);
        }
    }
    for domain in ["*.example.com", "exa_mple.com", "example..com"] {
        let (status, body) =
            server.api(reqwest::Method::GET, &format!("/api/v1/tasks?domain={domain}"), None, None).await;
        assert_eq!(status, 400, "{domain}: {body}");
        assert_eq!(body["error"]["code"], "invalid_argument", "{body}");
    }
}

/// A server whose single worker slot is held by an item retrying against a node that is
/// down, so that later items stay waiting and unclaimed. Returns the server and the node's port.
async fn busy_server(deadline: &str) -> (Cachectl, u16) {
    let port = free_port();
    let worker = format!(
        "{}max_items_in_flight = 1\n\n",
        fast_worker(deadline).replace("poll_interval = \"200ms\"", "poll_interval = \"50ms\"")
    );
    let server =
        Cachectl::start(&format!("{ACCOUNTS}{worker}{}", edge("n1", "nginx", &format!("127.0.0.1:{port}"), "edge")))
            .await;
    let blocker = server.native_submit(json!({"urls": ["http://www.example.com/blocker"]})).await;
    let start = Instant::now();
    loop {
        let (_, d) = server.api(reqwest::Method::GET, &format!("/api/v1/tasks/{blocker}"), None, None).await;
        if d["items"][0]["status"] == "processing" {
            break;
        }
        assert!(start.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (server, port)
}

#[tokio::test]
async fn identical_waiting_urls_are_coalesced() {
    let (server, port) = busy_server("30s").await;
    let first = server
        .native_submit(json!({"urls": ["http://www.example.com/same", "http://www.example.com/only-first"]}))
        .await;
    let second = server.native_submit(json!({"urls": ["http://www.example.com/same"]})).await;
    let (_, d1) = server.api(reqwest::Method::GET, &format!("/api/v1/tasks/{first}"), None, None).await;
    let (_, d2) = server.api(reqwest::Method::GET, &format!("/api/v1/tasks/{second}"), None, None).await;
    let leader =
        d1["items"].as_array().unwrap().iter().find(|i| i["url"] == "http://www.example.com/same").unwrap()["id"]
            .clone();
    assert_eq!(d2["items"][0]["follows"], leader, "the second task's item follows the waiting one: {d2}");

    let origin = Origin::start().await;
    let nginx = Nginx::start_on_ports(origin.port, &[port]).await;
    let d1 = server.native_wait(first).await;
    let d2 = server.native_wait(second).await;
    assert_eq!(d1["task"]["state"], "completed", "{d1}");
    assert_eq!(d2["task"]["state"], "completed", "the follower completes with its leader: {d2}");
    let purges = nginx.access_log().iter().filter(|l| l.2 == "PURGE" && l.4 == "/same").count();
    assert_eq!(purges, 1, "the URL was purged once for both tasks");
}

#[tokio::test]
async fn cancel_stops_waiting_items_and_retry_requeues_failed_ones() {
    let (server, port) = busy_server("2s").await;
    let task = server.native_submit(json!({"urls": ["http://www.example.com/c1", "http://www.example.com/c2"]})).await;
    let (status, changed) =
        server.api(reqwest::Method::POST, &format!("/api/v1/tasks/{task}/cancel"), None, None).await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["changed"], 2);
    assert_eq!(changed["task"]["state"], "failed");
    let (_, detail) = server.api(reqwest::Method::GET, &format!("/api/v1/tasks/{task}"), None, None).await;
    assert!(detail["items"].as_array().unwrap().iter().all(|i| i["reason"] == "cancelled"), "{detail}");
    let (status, _) = server.api(reqwest::Method::POST, "/api/v1/tasks/999999/cancel", None, None).await;
    assert_eq!(status, 404);

    // The blocker fails at its 2 s deadline; bring the node up and retry it.
    let blocker = 1;
    let failed = server.native_wait(blocker).await;
    assert_eq!(failed["task"]["state"], "failed", "{failed}");
    let origin = Origin::start().await;
    let _nginx = Nginx::start_on_ports(origin.port, &[port]).await;
    let (status, changed) =
        server.api(reqwest::Method::POST, &format!("/api/v1/tasks/{blocker}/retry"), None, None).await;
    assert_eq!((status, changed["changed"].as_u64()), (200, Some(1)), "{changed}");
    let done = server.native_wait(blocker).await;
    assert_eq!(done["task"]["state"], "completed", "{done}");
    assert_eq!(done["items"][0]["nodes"][0]["state"], "succeeded");
}

#[tokio::test]
async fn refresh_then_prefetch_runs_in_order_on_every_node() {
    let origin = Origin::start().await;
    let nginx = Nginx::start(origin.port, 2).await;
    let edges =
        format!("{}{}", edge("e1", "nginx", &nginx.address(0), "edge"), edge("e2", "nginx", &nginx.address(1), "edge"));
    let server = Cachectl::start(&format!("{ACCOUNTS}{}{edges}", fast_worker("10s"))).await;
    let urls: Vec<String> = (0..5).map(|i| format!("http://www.example.com/rtp/{i}")).collect();
    let task = server.native_submit(json!({"kind": "refresh_then_prefetch", "urls": urls})).await;
    let detail = server.native_wait(task).await;
    assert_eq!(detail["task"]["state"], "completed", "{detail}");
    assert_eq!(detail["task"]["counts"]["total"], 10);
    let log = nginx.access_log();
    for i in 0..5 {
        let uri = format!("/rtp/{i}");
        let purges: Vec<usize> =
            log.iter().enumerate().filter(|(_, l)| l.2 == "PURGE" && l.4 == uri).map(|(n, _)| n).collect();
        let gets: Vec<usize> =
            log.iter().enumerate().filter(|(_, l)| l.2 == "GET" && l.4 == uri).map(|(n, _)| n).collect();
        assert_eq!((purges.len(), gets.len()), (2, 2), "{uri} on both nodes: {log:?}");
        assert!(purges.iter().max() < gets.iter().min(), "{uri}: every purge before any prefetch");
    }
    for port in &nginx.ports {
        assert_eq!(cache_status(&format!("127.0.0.1:{port}"), "www.example.com", "/rtp/0").await, "HIT");
    }
}

#[tokio::test]
async fn the_progress_stream_ends_with_the_final_state() {
    let (_origin, _varnish, server) = one_varnish().await;
    let urls: Vec<String> = (0..200).map(|i| format!("http://www.example.com/sse/{i}")).collect();
    let task = server.native_submit(json!({ "urls": urls })).await;
    let response =
        server.http.get(server.url(&format!("/api/v1/tasks/{task}/events"))).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = tokio::time::timeout(WAIT, response.text()).await.expect("the stream ends by itself").unwrap();
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name.to_owned(), serde_json::from_str(data).unwrap()))
        })
        .collect();
    assert!(!events.is_empty(), "{text}");
    let (last_name, last) = events.last().unwrap();
    assert_eq!(last_name, "done");
    assert_eq!(last["state"], "completed");
    assert_eq!(last["counts"]["completed"], 200);
    assert!(events[..events.len() - 1].iter().all(|(n, _)| n == "progress"));
    let done: Vec<u64> = events.iter().map(|(_, e)| e["counts"]["completed"].as_u64().unwrap()).collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "events in order: {done:?}");
}

type Received = Arc<Mutex<Vec<(HeaderMap, String)>>>;

/// A webhook receiver on a free port; it answers 500 to its first `failures` calls.
async fn receiver(failures: usize) -> (u16, Received) {
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .fallback(|State((seen, fail)): State<(Received, usize)>, headers: HeaderMap, body: String| async move {
            let mut seen = seen.lock().unwrap();
            seen.push((headers, body));
            if seen.len() <= fail { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::NO_CONTENT }
        })
        .with_state((received.clone(), failures));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, received)
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_logged() {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let (good, good_seen) = receiver(0).await;
    let (flaky, flaky_seen) = receiver(2).await;
    let secret = "webhook-secret-0123456789";
    let accounts = ACCOUNTS.replace(
        "access_keys = [{ ak = \"AK_ACME\", sk = \"SK_ACME\" }]",
        &format!(
            "access_keys = [{{ ak = \"AK_ACME\", sk = \"SK_ACME\" }}]\nwebhooks = [{{ url = \"http://127.0.0.1:{good}/hook\", secret = \"{secret}\" }}, {{ url = \"http://127.0.0.1:{flaky}/hook\", secret = \"{secret}\" }}]"
        ),
    );
    let server = Cachectl::start(&format!(
        "{accounts}{}{}",
        fast_worker("10s"),
        edge("v1", "varnish", &varnish.address(), "edge")
    ))
    .await;
    let task = server.native_submit(json!({"urls": ["http://www.example.com/hook.css"]})).await;
    server.native_wait(task).await;

    let start = Instant::now();
    while good_seen.lock().unwrap().is_empty() || flaky_seen.lock().unwrap().len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(20), "webhooks not delivered\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (headers, body) = good_seen.lock().unwrap()[0].clone();
    let timestamp: i64 = headers["x-cachectl-timestamp"].to_str().unwrap().parse().unwrap();
    let expected = cachectl_server::webhooks::signature(secret, timestamp, body.as_bytes());
    assert_eq!(headers["x-cachectl-signature"].to_str().unwrap(), expected, "the signature verifies");
    let payload: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(payload["event"], "task.finished");
    assert_eq!(payload["task"]["id"], task);
    assert_eq!(payload["task"]["state"], "completed");
    assert_eq!(good_seen.lock().unwrap().len(), 1, "a delivered webhook is not sent again");

    // The receiver answers before the attempt is logged: read the log until it has caught up.
    let flaky_url = format!("http://127.0.0.1:{flaky}/hook");
    let log = loop {
        let (status, log) =
            server.api(reqwest::Method::GET, &format!("/api/v1/tasks/{task}/webhooks"), None, None).await;
        assert_eq!(status, 200);
        let logged = log["deliveries"].as_array().unwrap().iter().filter(|d| d["url"] == flaky_url).count();
        if logged >= 3 || start.elapsed() > Duration::from_secs(20) {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let attempts: Vec<&Value> =
        log["deliveries"].as_array().unwrap().iter().filter(|d| d["url"] == flaky_url).collect();
    assert_eq!(attempts.len(), 3, "two failures, then success: {log}");
    assert_eq!(attempts[0]["status_code"], 500);
    assert_eq!(attempts[2]["status_code"], 204);
    assert_eq!(attempts[2]["attempt"], 3);
}

#[tokio::test]
async fn the_openapi_document_and_docs_page_are_served() {
    let server = Cachectl::start(ACCOUNTS).await;
    let doc: Value = server.http.get(server.url("/api/v1/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    for path in ["/api/v1/tasks", "/api/v1/tasks/{id}", "/api/v1/items", "/api/v1/tasks/{id}/events"] {
        assert!(doc["paths"].get(path).is_some(), "{path} documented");
    }
    let page = server.http.get(server.url("/api/v1/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().to_lowercase().contains("swagger"));
    let (status, json) = server.api(reqwest::Method::GET, "/api/v1/nothing", None, None).await;
    assert_eq!((status, json["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, json) = server.api(reqwest::Method::DELETE, "/api/v1/tasks", None, None).await;
    assert_eq!((status, json["error"]["code"].as_str()), (405, Some("method_not_allowed")));
    let response = server.http.get(server.url("/api/v1/tasks")).send().await.unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    // The account's operations, with an account token.
    schemathesis(TOKEN, "--exclude-tag", "Tested: 8").await;
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_in_the_admin_api() {
    schemathesis(crate::admin::ADMIN_TOKEN, "--include-tag", "Tested: 15").await;
}

/// Runs schemathesis over the operations `tag_filter admin` selects, with `token`, and expects
/// `tested` in its summary.
async fn schemathesis(token: &str, tag_filter: &str, tested: &str) {
    let python = std::env::var("CACHECTL_TEST_PYTHON")
        .unwrap_or_else(|_| repo_root().join(".venv-tests/bin/python").display().to_string());
    let schemathesis = std::path::Path::new(&python).with_file_name("schemathesis");
    assert!(schemathesis.exists(), "{} is missing: run scripts/test.sh, which installs it", schemathesis.display());
    let accounts = ACCOUNTS.replace("name = \"acme\"", "name = \"acme\"\nrate_limit_per_minute = 1000000");
    let keys = tempfile::tempdir().unwrap();
    let server = Cachectl::start(&format!("{accounts}{}", crate::admin::admin_section(keys.path()))).await;
    server.native_submit(json!({"urls": ["http://www.example.com/seed"]})).await;
    let output = tokio::process::Command::new(&schemathesis)
        .args(["run", &server.url("/api/v1/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args([tag_filter, "admin"])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
        ])
        // The event stream never ends while a task runs; it has its own test.
        .args(["--exclude-path-regex", "/events$"])
        .args(["--max-examples", "25", "--max-time", "60", "--seed", "1", "--no-color"])
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis ({tag_filter} admin) found problems:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.log()
    );
    assert!(stdout.contains(tested), "every operation but the stream was tested ({tested}):\n{stdout}");
}

#[tokio::test]
async fn the_client_reads_its_file_and_waits_out_rate_limits() {
    let accounts = ACCOUNTS.replace("name = \"acme\"", "name = \"acme\"\nrate_limit_per_minute = 2");
    let server = Cachectl::start(&accounts).await;
    // The client file gives server and token when neither flag nor environment does.
    let config_dir = server.dir.path().join("xdg");
    std::fs::create_dir_all(config_dir.join("cachectl")).unwrap();
    std::fs::write(
        config_dir.join("cachectl/client.toml"),
        format!("server = \"{}\"\ntoken = \"{TOKEN}\"\n", server.url("")),
    )
    .unwrap();
    let run = |args: Vec<&'static str>| {
        let config_dir = config_dir.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_cachectl"))
                .args(args)
                .env_remove("CACHECTL_SERVER")
                .env_remove("CACHECTL_TOKEN")
                .env_remove("CACHECTL_CLIENT_CONFIG")
                .env("XDG_CONFIG_HOME", &config_dir)
                .output()
                .await
                .unwrap()
        }
    };
    // All three requests must fall into one rate-limit minute.
    room_in_this_minute(15).await;
    let first = run(vec!["tasks"]).await;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = run(vec!["tasks"]).await;
    assert!(second.status.success());
    // The third request in this minute is refused with Retry-After; the client waits it out.
    let third = run(vec!["tasks", "--json"]).await;
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(third.status.success(), "{stderr}");
    assert!(stderr.contains("rate limited by the server; retrying in"), "the client says it waits: {stderr}");
    let page: Value = serde_json::from_slice(&third.stdout).unwrap();
    assert!(page["tasks"].is_array());
}

/// Every dialect's requests are counted by one layer: native calls (answered, refused, unknown
/// paths) show in `/metrics` beside the Baishan and Baidu ones, by status.
#[tokio::test]
async fn native_requests_are_counted_in_the_request_metric() {
    let server = Cachectl::start(ACCOUNTS).await;
    let (status, _) = server.api(reqwest::Method::GET, "/api/v1/tasks", None, None).await;
    assert_eq!(status, 200);
    let (status, _) = server.api(reqwest::Method::GET, "/api/v1/tasks/999", None, None).await;
    assert_eq!(status, 404);
    let refused = server.http.get(server.url("/api/v1/tasks")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let (status, _, _) = server.get("/v2/cache/prefetchQuota").await;
    assert_eq!(status, 200);
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let count = |dialect: &str, status: u16| {
        let prefix = format!("cachectl_http_requests_total{{dialect=\"{dialect}\",status=\"{status}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(count("native", 200), Some(1), "{metrics}");
    assert_eq!(count("native", 404), Some(1), "{metrics}");
    assert_eq!(count("native", 401), Some(1), "{metrics}");
    assert_eq!(count("baishan", 200), Some(1), "{metrics}");
    assert!(!metrics.contains("dialect=\"operations\""), "health and metrics are not counted: {metrics}");
}
