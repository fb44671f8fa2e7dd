//! The Baishan v2 dialect's rules (docs/baishan.md): auth, envelope, headers, limits, quotas,
//! submit and query validation, and the seeds' examples.

use crate::support::*;
use reqwest::Method;
use serde_json::{Value, json};

const REFRESH: &str = "/v2/cache/refresh";
const PREFETCH: &str = "/v2/cache/prefetch";

/// Today's date in the dialect's default zone (+08:00), offset by `days`.
fn day(days: i64) -> String {
    let zone = chrono::FixedOffset::east_opt(8 * 3600).unwrap();
    (chrono::Utc::now().with_timezone(&zone) + chrono::Duration::days(days)).format("%Y-%m-%d").to_string()
}

fn assert_error(status: u16, json: &Value, expected: u16, needle: &str) {
    assert_eq!(status, expected, "{json}");
    assert_eq!(json["code"], expected, "code equals the HTTP status: {json}");
    let message = json["message"].as_str().unwrap();
    assert!(message.contains(needle), "message {message:?} should mention {needle:?}");
}

#[tokio::test]
async fn auth_is_required_and_checked() {
    let server = Cachectl::start(ACCOUNTS).await;
    let (status, headers, json) = server.raw(Method::GET, &format!("{REFRESH}?task_id=1"), None).await;
    assert_error(status, &json, 401, "missing token");
    assert_eq!(headers["api-id"], "70946227");
    let (status, _, json) = server.raw(Method::GET, &format!("{REFRESH}?task_id=1&token=wrong-token"), None).await;
    assert_error(status, &json, 401, "unknown token");
    let r = server
        .http
        .get(server.url(&format!("{REFRESH}?task_id=1")))
        .header("token", "wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = server.http.get(server.url(&format!("{REFRESH}?task_id=1"))).header("Token", TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200, "the Token header works as well as the query parameter");
}

#[tokio::test]
async fn every_response_carries_the_rate_limit_headers_and_429_past_the_limit() {
    let server =
        Cachectl::start(&ACCOUNTS.replace("name = \"acme\"", "name = \"acme\"\nrate_limit_per_minute = 5")).await;
    // Every request of this test must fall into one rate-limit minute.
    room_in_this_minute(10).await;
    let mut last = None;
    for i in 0..5u32 {
        let (status, headers, _) = server.get(&format!("{REFRESH}?task_id=1")).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-ratelimit-grad"], "minute");
        assert_eq!(headers["x-ratelimit-limit"], "5");
        assert_eq!(headers["x-ratelimit-remaining"], (4 - i).to_string().as_str());
        let retry: u64 = headers["x-retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        last = Some(retry);
    }
    let (status, headers, json) = server.get(&format!("{REFRESH}?task_id=1")).await;
    assert_error(status, &json, 429, "rate limit");
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    let retry: u64 = headers["x-retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry <= last.unwrap() && retry >= 1, "X-Retry-After counts down to the window's end: {retry}");
    // Another endpoint has its own budget.
    let (status, headers, _) = server.get(&format!("{PREFETCH}?task_id=1")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["api-id"], "70945467");
    assert!(headers.contains_key("x-push-remaining"));
}

#[tokio::test]
async fn submit_accepts_json_and_forms_and_reports_rejected_urls() {
    let nginx_origin = Origin::start().await;
    let nginx = Nginx::start(nginx_origin.port, 1).await;
    let server =
        Cachectl::start(&format!("{ACCOUNTS}{}{}", fast_worker("5s"), edge("n1", "nginx", &nginx.address(0), "edge")))
            .await;

    let (status, headers, json) = server
        .post(
            REFRESH,
            json!({"urls": [
                "http://www.example.com/a", "http://www.example.com/a", "https://img.example.com/b?x=1",
                "http://evil.test/steal", "not a url", "ftp://www.example.com/x"
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["code"], 0);
    assert_eq!(json["message"], "");
    assert_eq!(json["data"]["count"], 2, "duplicates merged: {json}");
    assert_eq!(json["data"]["err_urls"], json!(["http://evil.test/steal", "not a url", "ftp://www.example.com/x"]));
    assert_eq!(headers["api-id"], "70946226");
    let task = json["data"]["task_id"].as_i64().unwrap();
    let items = server.wait_final(REFRESH, task, std::time::Duration::from_secs(20)).await;
    assert_eq!(items.len(), 2);
    let log = nginx.access_log();
    assert!(log.iter().any(|l| l.3 == "img.example.com" && l.4 == "/b?x=1"), "{log:?}");
    assert!(log.iter().all(|l| l.3 != "evil.test"), "a foreign URL never reaches a node: {log:?}");

    let form = "urls=http%3A%2F%2Fwww.example.com%2Fd1%2F&urls[]=http://www.example.com/d2/&type=dir";
    let (status, _, json) = server
        .raw(Method::POST, &format!("{REFRESH}?token={TOKEN}"), Some(("application/x-www-form-urlencoded", form)))
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["data"]["count"], 2);
    // JSON whatever the Content-Type says, even the form type `curl -d` sends by default.
    let (status, _, json) = server
        .raw(
            Method::POST,
            &format!("{REFRESH}?token={TOKEN}"),
            Some(("application/x-www-form-urlencoded", r#"{"urls": ["http://www.example.com/q?a=1"]}"#)),
        )
        .await;
    assert_eq!((status, json["data"]["count"].clone()), (200, json!(1)), "{json}");
    let body = r#"{"urls": ["http://www.example.com/p1"]}"#;
    let (status, headers, json) =
        server.raw(Method::POST, &format!("{PREFETCH}?token={TOKEN}"), Some(("text/plain", body))).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(headers["api-id"], "70945466");
    assert_eq!(headers["x-push-remaining"], "9999");
}

#[tokio::test]
async fn bad_submissions_get_400_with_a_message() {
    let server = Cachectl::start(ACCOUNTS).await;
    let post = |body: &'static str| {
        let server = &server;
        async move { server.raw(Method::POST, &format!("{REFRESH}?token={TOKEN}"), Some(("application/json", body))).await }
    };
    let (s, _, j) = post("{not json").await;
    assert_error(s, &j, 400, "not valid JSON");
    let (s, _, j) = post("").await;
    assert_error(s, &j, 400, "empty");
    let (s, _, j) = post(r#"{"type": "url"}"#).await;
    assert_error(s, &j, 400, "urls is required");
    let (s, _, j) = post(r#"{"urls": []}"#).await;
    assert_error(s, &j, 400, "urls is required");
    let (s, _, j) = post(r#"{"urls": [1, 2]}"#).await;
    assert_error(s, &j, 400, "list of strings");
    let (s, _, j) = post(r#"{"urls": ["http://www.example.com/"], "type": "file"}"#).await;
    assert_error(s, &j, 400, "type");
    let (s, _, j) = post(r#"{"urls": ["http://evil.test/x", "http://www.example.com/nodir"], "type": "dir"}"#).await;
    assert_error(s, &j, 400, "no URL was accepted");
    assert_eq!(j["data"]["err_urls"], json!(["http://evil.test/x", "http://www.example.com/nodir"]));

    let too_many: Vec<String> = (0..1001).map(|i| format!("http://www.example.com/{i}")).collect();
    let (s, _, j) = server.post(REFRESH, json!({ "urls": too_many })).await;
    assert_error(s, &j, 400, "at most 1000");
    let dirs: Vec<String> = (0..101).map(|i| format!("http://www.example.com/{i}/")).collect();
    let (s, _, j) = server.post(REFRESH, json!({"urls": dirs, "type": "dir"})).await;
    assert_error(s, &j, 400, "at most 100");
    let prefetch: Vec<String> = (0..501).map(|i| format!("http://www.example.com/{i}")).collect();
    let (s, _, j) = server.post(PREFETCH, json!({ "urls": prefetch })).await;
    assert_error(s, &j, 400, "at most 500");
    let (s, _, j) = server.post(PREFETCH, json!({"urls": ["http://www.example.com/"], "type": "dir"})).await;
    assert_error(s, &j, 400, "prefetch");

    // Nothing of the above was stored.
    let (_, _, j) = server.get(&format!("{REFRESH}?start_time={}&end_time={}", day(0), day(0))).await;
    assert_eq!(j["data"]["total"], 0, "{j}");
}

#[tokio::test]
async fn daily_quotas_are_enforced_and_reported() {
    let accounts = ACCOUNTS.replace(
        "access_keys = [{ ak = \"AK_ACME\", sk = \"SK_ACME\" }]",
        "access_keys = [{ ak = \"AK_ACME\", sk = \"SK_ACME\" }]\nquotas = { refresh_urls = 3, refresh_dirs = 1, prefetch_urls = 2 }",
    );
    let server = Cachectl::start(&accounts).await;
    server.submit(REFRESH, json!({"urls": ["http://www.example.com/1", "http://www.example.com/2"]})).await;
    let (s, _, j) =
        server.post(REFRESH, json!({"urls": ["http://www.example.com/3", "http://www.example.com/4"]})).await;
    assert_error(s, &j, 400, "daily refresh URL quota exceeded: 1 of 3 left");
    server.submit(REFRESH, json!({"urls": ["http://www.example.com/3"]})).await;
    server.submit(REFRESH, json!({"urls": ["http://www.example.com/d/"], "type": "dir"})).await;
    let (s, _, j) = server.post(REFRESH, json!({"urls": ["http://www.example.com/e/"], "type": "dir"})).await;
    assert_error(s, &j, 400, "refresh directory quota");

    let (s, headers, j) = server.get("/v2/cache/prefetchQuota").await;
    assert_eq!(s, 200);
    assert_eq!(j["data"], json!({"url_quota": 2, "url_remain": 2}));
    assert_eq!(headers["x-push-remaining"], "2");
    server.submit(PREFETCH, json!({"urls": ["http://www.example.com/p"]})).await;
    let (_, headers, j) = server.get("/v2/cache/prefetchQuota").await;
    assert_eq!(j["data"], json!({"url_quota": 2, "url_remain": 1}));
    assert_eq!(headers["x-push-remaining"], "1");
}

#[tokio::test]
async fn bad_queries_get_400_with_a_message() {
    let server = Cachectl::start(ACCOUNTS).await;
    let cases = [
        (format!("task_id=1&start_time={0}&end_time={0}", day(0)), "exclusive"),
        (String::new(), "either task_id"),
        (format!("start_time={}", day(0)), "together"),
        (format!("end_time={}", day(0)), "together"),
        (format!("start_time={}&end_time={}", day(0), day(-1)), "before"),
        (format!("start_time={}&end_time={}", day(-7), day(0)), "7 days"),
        ("start_time=2024-13-01&end_time=2024-13-02".to_owned(), "YYYY-MM-DD"),
        ("task_id=abc".to_owned(), "positive integer"),
        ("task_id=-4".to_owned(), "positive integer"),
        ("task_id=1&page_size=0".to_owned(), "page_size"),
        ("task_id=1&page_size=501".to_owned(), "page_size"),
        ("task_id=1&page_number=0".to_owned(), "page_number"),
    ];
    for (query, needle) in cases {
        for path in [REFRESH, PREFETCH] {
            let (s, _, j) = server.get(&format!("{path}?{query}")).await;
            assert_error(s, &j, 400, needle);
        }
    }
    // Seven whole days is the longest span allowed.
    let (s, _, j) = server.get(&format!("{REFRESH}?start_time={}&end_time={}", day(-6), day(0))).await;
    assert_eq!(s, 200, "{j}");
    let (s, _, j) =
        server.get(&format!("{REFRESH}?start_time={} 00:00:00&end_time={} 23:59:59", day(-6), day(0))).await;
    assert_eq!(s, 200, "{j}");
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_in_the_envelope() {
    let server = Cachectl::start(ACCOUNTS).await;
    let (s, _, j) = server.raw(Method::GET, "/v2/cache/nothing", None).await;
    assert_error(s, &j, 404, "no such API endpoint");
    let (s, headers, j) =
        server.raw(Method::PUT, &format!("{REFRESH}?token={TOKEN}"), Some(("application/json", "{}"))).await;
    assert_error(s, &j, 405, "method not allowed");
    assert!(headers.contains_key("allow"));
    let (s, _, j) = server.raw(Method::DELETE, "/v2/cache/prefetchQuota", None).await;
    assert_error(s, &j, 405, "method not allowed");
}

#[tokio::test]
async fn queries_page_newest_first_and_hide_other_accounts() {
    let server = Cachectl::start(ACCOUNTS).await;
    let first =
        server.submit(REFRESH, json!({"urls": ["http://www.example.com/q/1", "http://www.example.com/q/2"]})).await;
    let second = server.submit(REFRESH, json!({"urls": ["http://www.example.com/q/3"]})).await;
    let prefetch = server.submit(PREFETCH, json!({"urls": ["http://www.example.com/q/1"]})).await;

    // Mode 2, newest first, page rules.
    let (_, _, j) = server.get(&format!("{REFRESH}?start_time={}&end_time={}&page_size=2", day(0), day(0))).await;
    assert_eq!(j["data"]["total"], 3);
    assert_eq!(j["data"]["page_number"], "1", "a string in refresh responses");
    let list = j["data"]["list"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["url"], "http://www.example.com/q/3");
    let (_, _, j) =
        server.get(&format!("{REFRESH}?start_time={}&end_time={}&page_size=2&page_number=2", day(0), day(0))).await;
    assert_eq!(j["data"]["list"].as_array().unwrap().len(), 1);
    let (_, _, j) = server.get(&format!("{REFRESH}?start_time={}&end_time={}&page_number=100", day(0), day(0))).await;
    assert_eq!(
        (j["data"]["total"].clone(), j["data"]["list"].clone()),
        (json!(3), json!([])),
        "a page past the end is empty"
    );

    // Mode 2 with one URL, spelled `url` or `urls`.
    for name in ["url", "urls"] {
        let (_, _, j) = server
            .get(&format!("{PREFETCH}?start_time={0}&end_time={0}&{name}=http://www.example.com/q/1", day(0)))
            .await;
        assert_eq!(j["data"]["total"], 1, "{j}");
        assert_eq!(j["data"]["page_number"], 1, "a number in prefetch responses");
        assert!(j["data"]["list"][0]["id"].as_str().unwrap().parse::<i64>().is_ok());
    }
    // Mode 1.
    let items = server.task_items(REFRESH, first).await;
    assert_eq!(items.len(), 2);
    assert!(server.task_items(REFRESH, prefetch).await.is_empty(), "a prefetch task is not a refresh task");
    assert_eq!(server.task_items(PREFETCH, prefetch).await.len(), 1);
    // A day before the window, and a range older than the retention: empty, not an error.
    let (s, _, j) = server.get(&format!("{REFRESH}?start_time={0}&end_time={0}", day(-1))).await;
    assert_eq!((s, j["data"]["total"].clone()), (200, json!(0)));
    let (s, _, j) = server.get(&format!("{REFRESH}?start_time={}&end_time={}", day(-60), day(-58))).await;
    assert_eq!((s, j["data"]["list"].clone()), (200, json!([])));

    // The other account sees none of it, even by task id.
    let (_, _, j) =
        server.raw(Method::GET, &format!("{REFRESH}?task_id={second}&token=other-secret-token"), None).await;
    assert_eq!(j["data"], json!({"total": 0, "page_number": "1", "list": []}));
    let (_, _, j) = server.raw(Method::GET, &format!("{REFRESH}?task_id=999999&token={TOKEN}"), None).await;
    assert_eq!(j["data"], json!({"total": 0, "page_number": "1", "list": []}), "an unknown task reads as empty");
    let (_, _, j) = server
        .raw(Method::GET, &format!("{REFRESH}?start_time={0}&end_time={0}&token=other-secret-token", day(0)), None)
        .await;
    assert_eq!(j["data"]["total"], 0);
}

#[tokio::test]
async fn the_seed_examples_answer_in_the_documented_shape() {
    let server = Cachectl::start(ACCOUNTS).await;
    let task = server.submit(REFRESH, json!({"urls": ["http://abc.example.com/track/main.html"]})).await;
    let ptask = server.submit(PREFETCH, json!({"urls": ["http://abc.example.com/domain/fun/info"]})).await;

    // curl "…/v2/cache/refresh?token=xx&task_id=2400008"
    let (s, headers, j) = server.get(&format!("{REFRESH}?task_id={task}")).await;
    assert_eq!(s, 200);
    for h in ["api-id", "x-ratelimit-grad", "x-ratelimit-limit", "x-ratelimit-remaining", "x-retry-after"] {
        assert!(headers.contains_key(h), "{h}");
    }
    assert_eq!(j["code"], 0);
    assert_eq!(j["message"], "");
    let item = &j["data"]["list"][0];
    let mut keys: Vec<&str> = item.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["complete_time", "create_time", "id", "status", "type", "url"]);
    assert!(item["id"].is_string());
    assert_eq!(item["type"], "url");
    assert!(["waiting", "processing", "completed", "failed"].contains(&item["status"].as_str().unwrap()));
    let create = item["create_time"].as_str().unwrap();
    assert!(chrono::NaiveDateTime::parse_from_str(create, "%Y-%m-%d %H:%M:%S").is_ok(), "{create}");
    assert!(create.starts_with(&day(0)), "times are in +08:00: {create}");

    // curl "…/v2/cache/refresh?token=xxx&start_time=2018-02-23&end_time=2018-02-23&page_number=100"
    let (s, _, j) = server.get(&format!("{REFRESH}?start_time={0}&end_time={0}&page_number=100", day(0))).await;
    assert_eq!(s, 200);
    assert_eq!(j["data"]["page_number"], "100");
    assert_eq!(j["data"]["total"], 1);

    // curl "…&start_time=2018-02-24&end_time=2018-02-24&page_number=100&url=http://abc.qingcdn.com/track/main.html"
    let (_, _, j) = server
        .get(&format!("{REFRESH}?start_time={0}&end_time={0}&url=http://abc.example.com/track/main.html", day(0)))
        .await;
    assert_eq!(j["data"]["list"][0]["url"], "http://abc.example.com/track/main.html");

    // The prefetch seed: task id, and `urls`.
    let (_, headers, j) = server.get(&format!("{PREFETCH}?task_id={ptask}")).await;
    assert_eq!(headers["api-id"], "70945467");
    assert_eq!(j["data"]["page_number"], 1);
    assert_eq!(j["data"]["list"][0]["url"], "http://abc.example.com/domain/fun/info");
    let (_, _, j) = server
        .get(&format!(
            "{PREFETCH}?start_time={0}&end_time={0}&page_number=1&urls=http://abc.example.com/domain/fun/info",
            day(0)
        ))
        .await;
    assert_eq!(j["data"]["total"], 1);
}

#[tokio::test]
async fn environment_overrides_the_file_and_bad_config_names_the_key() {
    let bin = env!("CARGO_BIN_EXE_cachectl");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, format!("[server]\nlisten = \"127.0.0.1:1\"\n{ACCOUNTS}")).unwrap();
    let out = std::process::Command::new(bin)
        .args(["check-config", "--config"])
        .arg(&path)
        .env("CACHECTL_SERVER__LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.listen") && err.contains("not-an-address"), "{err}");

    std::fs::write(&path, format!("{ACCOUNTS}\n[[edges]]\nname = \"x\"\ndriver = \"varnish\"\naddress = \"nope\"\n"))
        .unwrap();
    let out = std::process::Command::new(bin).args(["check-config", "--config"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("edges[0].address"), "{err}");

    let out = std::process::Command::new(bin)
        .args(["check-config", "--config"])
        .arg(repo_root().join("cachectl.example.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the shipped example configuration is valid: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
