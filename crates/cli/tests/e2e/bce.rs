//! The Baidu GEO and CDN dialects (docs/baidu.md), driven by Baidu's official `bce-python-sdk`
//! (installed by scripts/test.sh), plus raw signed requests for what the SDK cannot send.

use crate::support::*;
use cachectl_server::api::bce::auth;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::Duration;

/// Runs one SDK call through `bce_sdk.py`; returns its JSON result.
async fn sdk(server: &Cachectl, sk: &str, command: &str, args: Value) -> Value {
    let python = std::env::var("CACHECTL_TEST_PYTHON")
        .unwrap_or_else(|_| repo_root().join(".venv-tests/bin/python").display().to_string());
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} is missing: run scripts/test.sh, which installs bce-python-sdk into .venv-tests"
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/bce_sdk.py");
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .arg(format!("http://127.0.0.1:{}", server.port))
        .args(["AK_ACME", sk, command, &args.to_string()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{command}: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("{command} printed {stdout:?}"))
}

async fn ok(server: &Cachectl, command: &str, args: Value) -> Value {
    let result = sdk(server, "SK_ACME", command, args.clone()).await;
    assert_eq!(result["ok"], true, "{command} {args}: {result}");
    result["body"].clone()
}

/// Sends a raw request signed like the Python SDK does (empty signed-headers field).
pub(crate) async fn signed(
    server: &Cachectl,
    method: &str,
    path_and_query: &str,
    body: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    signed_as(server, ("AK_ACME", "SK_ACME"), method, path_and_query, body).await
}

/// `signed`, with the access key pair `(ak, sk)`.
pub(crate) async fn signed_as(
    server: &Cachectl,
    (ak, sk): (&str, &str),
    method: &str,
    path_and_query: &str,
    body: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let host = format!("127.0.0.1:{}", server.port);
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
    let pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), percent_decode(v))
        })
        .collect();
    let headers = vec![
        ("host".to_owned(), host),
        ("content-length".to_owned(), body.len().to_string()),
        ("x-bce-date".to_owned(), now.clone()),
    ];
    let request = auth::SignedRequest { method, path, query: &pairs, headers: &headers };
    let names: Vec<String> = headers.iter().map(|(n, _)| n.clone()).collect();
    let key = auth::signing_key(sk, ak, &now, 1800);
    let signature = hmac_hex(&key, &auth::canonical_request(&request, &names));
    let response = server
        .http
        .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), server.url(path_and_query))
        .header("x-bce-date", &now)
        .header("content-length", body.len())
        .header("authorization", format!("bce-auth-v1/{ak}/{now}/1800//{signature}"))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    (status, headers, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}")))
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes()).next().unwrap().1.into_owned()
}

fn hmac_hex(key: &str, message: &str) -> String {
    auth::hmac_sha256_hex(key.as_bytes(), message)
}

fn rfc3339(offset_secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(offset_secs)).format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[tokio::test]
async fn geo_purge_prefetch_and_list_with_the_official_sdk() {
    let server = Cachectl::start(ACCOUNTS).await;
    let purge = ok(
        &server,
        "eo_purge",
        json!({"site": "example.com", "tasks": [
            {"url": "http://www.example.com/a.css", "type": "file"},
            {"url": "http://www.example.com/static/", "type": "directory"}
        ]}),
    )
    .await;
    let id = purge["id"].as_str().expect("id is a string").to_owned();
    let prefetch =
        ok(&server, "eo_prefetch", json!({"site": "example.com", "tasks": [{"url": "http://img.example.com/p.png"}]}))
            .await;

    let by_id = ok(&server, "eo_list_purge", json!({"site": "example.com", "id": id})).await;
    let details = by_id["details"].as_array().unwrap();
    assert_eq!(details.len(), 2, "{by_id}");
    assert_eq!(by_id["isTruncated"], false);
    assert!(by_id.get("nextMarker").is_none());
    let types: HashSet<&str> = details.iter().map(|d| d["task"]["type"].as_str().unwrap()).collect();
    assert_eq!(types, HashSet::from(["file", "directory"]));
    for d in details {
        assert!(["in-progress", "completed", "failed"].contains(&d["status"].as_str().unwrap()), "{d}");
        assert_eq!(d["operator"], "AK_ACME");
        assert!(d["createdAt"].as_str().unwrap().ends_with('Z'));
        assert!(d["progress"].is_u64());
    }

    let window =
        ok(&server, "eo_list_purge", json!({"site": "example.com", "startTime": rfc3339(-60), "endTime": rfc3339(60)}))
            .await;
    assert_eq!(window["details"].as_array().unwrap().len(), 2);
    let dirs = ok(&server, "eo_list_purge", json!({"site": "example.com", "type": "directory"})).await;
    assert_eq!(dirs["details"].as_array().unwrap().len(), 1);
    assert_eq!(dirs["details"][0]["task"]["url"], "http://www.example.com/static/");
    let files = ok(&server, "eo_list_purge", json!({"site": "example.com", "type": "url"})).await;
    assert_eq!(files["details"][0]["task"]["type"], "file", "the filter says url, the record says file");
    let pre = ok(&server, "eo_list_prefetch", json!({"site": "example.com", "id": prefetch["id"]})).await;
    assert_eq!(pre["details"][0]["task"]["url"], "http://img.example.com/p.png");
    // A site is its domain and the names under it.
    let sub = ok(&server, "eo_list_purge", json!({"site": "img.example.com"})).await;
    assert_eq!(sub["details"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn geo_marker_paging_returns_every_record_once_while_tasks_arrive() {
    let server = Cachectl::start(ACCOUNTS).await;
    let start = rfc3339(-5);
    let mut expected = HashSet::new();
    for batch in 0..3 {
        let tasks: Vec<Value> =
            (0..90).map(|i| json!({"url": format!("http://www.example.com/page/{batch}/{i}")})).collect();
        for t in &tasks {
            expected.insert(t["url"].as_str().unwrap().to_owned());
        }
        ok(&server, "eo_purge", json!({"site": "example.com", "tasks": tasks})).await;
    }

    // Walk page by page by hand, submitting new tasks between pages.
    let end = rfc3339(3600);
    let mut seen = Vec::new();
    let mut marker: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut args = json!({"site": "example.com", "startTime": start, "endTime": end});
        if let Some(m) = &marker {
            args["marker"] = json!(m);
        }
        let page = ok(&server, "eo_list_purge", args).await;
        pages += 1;
        let details = page["details"].as_array().unwrap();
        assert!(details.len() <= 100);
        seen.extend(details.iter().map(|d| d["task"]["url"].as_str().unwrap().to_owned()));
        if pages == 1 {
            ok(
                &server,
                "eo_purge",
                json!({"site": "example.com", "tasks": [{"url": "http://www.example.com/late/1"}]}),
            )
            .await;
        }
        if page["isTruncated"] == false {
            assert!(page.get("nextMarker").is_none());
            break;
        }
        marker = Some(page["nextMarker"].as_str().unwrap().to_owned());
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no record twice");
    for url in &expected {
        assert!(unique.contains(url), "{url} missing: no gap allowed");
    }
    assert!(pages >= 3, "{pages} pages for {} records", seen.len());

    // The SDK-side walk agrees, and ascending order holds.
    let walked = ok(&server, "eo_walk_purge", json!({"site": "example.com", "startTime": start, "endTime": end})).await;
    let created: Vec<&str> =
        walked["details"].as_array().unwrap().iter().map(|d| d["createdAt"].as_str().unwrap()).collect();
    assert!(created.windows(2).all(|w| w[0] <= w[1]), "ascending by creation");
    assert_eq!(created.len(), 271);
}

#[tokio::test]
async fn cdn_purge_prefetch_quota_and_records_with_the_official_sdk() {
    let accounts = ACCOUNTS.replace(
        "access_keys = [{ ak = \"AK_ACME\", sk = \"SK_ACME\" }]",
        "access_keys = [{ ak = \"AK_ACME\", sk = \"SK_ACME\" }]\nquotas = { refresh_urls = 50, refresh_dirs = 5, prefetch_urls = 40 }",
    );
    // No edge node: every item fails at once with a reason, which the records show.
    let server = Cachectl::start(&accounts).await;
    let purge = ok(
        &server,
        "cdn_purge",
        json!({"tasks": [{"url": "http://www.example.com/c.js"}, {"url": "http://www.example.com/d/", "type": "directory"}]}),
    )
    .await;
    let now_task = ok(&server, "cdn_prefetch", json!({"tasks": [{"url": "http://www.example.com/now.js"}]})).await;
    let later = ok(
        &server,
        "cdn_prefetch",
        json!({"tasks": [{"url": "http://www.example.com/later.js", "startTime": rfc3339(3600), "speed": 100}]}),
    )
    .await;

    let listed = ok(&server, "cdn_list_purge", json!({"id": purge["id"]})).await;
    assert_eq!(listed["details"].as_array().unwrap().len(), 2);
    let by_url = ok(&server, "cdn_list_purge", json!({"url": "http://www.example.com/c.js"})).await;
    assert_eq!(by_url["details"].as_array().unwrap().len(), 1);
    let scheduled = ok(&server, "cdn_list_prefetch", json!({"id": later["id"]})).await;
    assert_eq!(scheduled["details"][0]["status"], "waiting", "{scheduled}");
    assert_eq!(scheduled["details"][0]["progress"], 0);

    let quota = ok(&server, "cdn_quota", json!({})).await;
    assert_eq!((quota["urlQuota"].clone(), quota["urlRemain"].clone()), (json!(50), json!(49)));
    assert_eq!((quota["dirQuota"].clone(), quota["dirRemain"].clone()), (json!(5), json!(4)));

    // Wait for the immediate items to fail (no node serves the host), then read the reasons.
    let start = std::time::Instant::now();
    loop {
        let records = ok(&server, "cdn_records", json!({"Type": "purge"})).await;
        let details = records["details"].as_array().unwrap().clone();
        if details.len() == 2 && details.iter().all(|d| d["status"] == "failed") {
            assert!(details.iter().all(|d| d["reason"].as_str().unwrap().contains("no edge node serves")), "{records}");
            assert!(details.iter().all(|d| d.get("finishedAt").is_some()));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{records}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let prefetch_records =
        ok(&server, "cdn_records", json!({"Type": "prefetch", "url": "http://www.example.com/now.js"})).await;
    assert_eq!(prefetch_records["details"].as_array().unwrap().len(), 1, "{prefetch_records} {now_task}");
    let scheduled = ok(&server, "cdn_list_prefetch", json!({"id": later["id"]})).await;
    assert_eq!(scheduled["details"][0]["status"], "waiting", "a scheduled prefetch is not executed before its time");
}

#[tokio::test]
async fn sdk_errors_carry_the_code_and_a_request_id() {
    let server = Cachectl::start(ACCOUNTS).await;
    let wrong = sdk(&server, "WRONG_SECRET", "eo_list_purge", json!({"site": "example.com"})).await;
    assert_eq!(wrong["ok"], false);
    assert_eq!(wrong["last_error"], "BceServerError", "{wrong}");
    assert_eq!(wrong["code"], "SignatureDoesNotMatch");
    assert_eq!(wrong["status_code"], 403);
    assert!(wrong["request_id"].as_str().is_some_and(|id| id.len() == 36), "{wrong}");

    let expired = sdk(&server, "SK_ACME", "cdn_quota", json!({"_expired": true})).await;
    assert_eq!(
        (expired["last_error"].as_str(), expired["code"].as_str()),
        (Some("BceServerError"), Some("RequestExpired")),
        "{expired}"
    );

    let cases = [
        ("eo_purge", json!({"site": "evil.test", "tasks": [{"url": "http://evil.test/x"}]}), "not one of your domains"),
        ("eo_purge", json!({"site": "example.com", "tasks": [{"url": "http://other.test/x"}]}), "site"),
        (
            "eo_purge",
            json!({"site": "example.com", "tasks": [{"url": "http://www.example.com/d", "type": "directory"}]}),
            "end with",
        ),
        ("eo_purge", json!({"site": "example.com", "tasks": []}), "tasks"),
        (
            "eo_purge",
            json!({"site": "example.com", "tasks": [{"url": "http://www.example.com/", "type": "folder"}]}),
            "type",
        ),
        ("eo_list_purge", json!({"site": "example.com", "marker": "not-a-marker"}), "marker"),
        ("eo_list_purge", json!({"site": "example.com", "type": "file"}), "type"),
        (
            "eo_list_purge",
            json!({"site": "example.com", "startTime": "2025-01-01T00:00:00Z", "endTime": "2025-03-01T00:00:00Z"}),
            "30 days",
        ),
        ("eo_list_purge", json!({"site": "example.com", "startTime": rfc3339(0), "endTime": rfc3339(-3600)}), "after"),
        ("eo_list_purge", json!({"site": "example.com", "endTime": "tomorrow"}), "RFC 3339"),
        ("cdn_purge", json!({"tasks": [{"url": "http://evil.test/x"}]}), "domains"),
        (
            "cdn_prefetch",
            json!({"tasks": [{"url": "http://www.example.com/x", "startTime": rfc3339(3 * 86400)}]}),
            "24 hours",
        ),
        ("cdn_records", json!({"Type": "delete"}), "type"),
    ];
    for (command, args, needle) in cases {
        let result = sdk(&server, "SK_ACME", command, args.clone()).await;
        assert_eq!(result["ok"], false, "{command} {args}");
        assert_eq!(result["status_code"], 400, "{command} {args}: {result}");
        assert_eq!(result["code"], "InvalidArgument", "{command} {args}: {result}");
        assert!(result["message"].as_str().unwrap().contains(needle), "{command} {args}: {result}");
        assert!(result["request_id"].is_string());
    }
    let too_many: Vec<Value> = (0..1001).map(|i| json!({"url": format!("http://www.example.com/{i}")})).collect();
    let result = sdk(&server, "SK_ACME", "cdn_purge", json!({ "tasks": too_many })).await;
    assert!(result["message"].as_str().unwrap().contains("at most 1000"), "{result}");
}

#[tokio::test]
async fn raw_requests_get_json_errors_with_request_ids() {
    let server = Cachectl::start(ACCOUNTS).await;
    let (status, headers, body) = signed(&server, "POST", "/v2/geo/cache/purge", "{not json").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "MalformedJSON");
    assert_eq!(headers["x-bce-request-id"].to_str().unwrap(), body["requestId"].as_str().unwrap());
    let (status, _, body) =
        signed(&server, "POST", "/v2/geo/cache/purge", r#"{"tasks": [{"url": "http://www.example.com/"}]}"#).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("InvalidArgument")), "missing site: {body}");
    let (status, _, body) = signed(&server, "GET", "/v2/geo/cache/purge?id=&marker=&type=", "").await;
    assert_eq!(status, 400, "site is required: {body}");
    let (status, _, body) = signed(&server, "GET", "/v2/geo/cache/purge?id=&marker=&site=example.com&type=", "").await;
    assert_eq!(status, 200, "empty values mean absent: {body}");
    let (status, _, body) = signed(&server, "GET", "/v2/geo/cache/nothing", "").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("NotFound")));
    let (status, _, body) = signed(&server, "DELETE", "/v2/cache/purge", "").await;
    assert_eq!((status, body["code"].as_str()), (405, Some("MethodNotAllowed")));
    // No credentials at all.
    let response = server.http.get(server.url("/v2/cache/quota")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("x-bce-request-id"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "AccessDenied");
    assert!(body["requestId"].is_string());
}

#[tokio::test]
async fn one_account_across_all_dialects() {
    let accounts = ACCOUNTS.replace(
        "access_keys = [{ ak = \"AK_ACME\", sk = \"SK_ACME\" }]",
        "access_keys = [{ ak = \"AK_ACME\", sk = \"SK_ACME\" }]\nquotas = { prefetch_urls = 10 }",
    );
    let server = Cachectl::start(&accounts).await;
    let baishan_task =
        server.submit("/v2/cache/refresh", json!({"urls": ["http://www.example.com/from-baishan"]})).await;
    let geo = ok(&server, "eo_list_purge", json!({"site": "example.com", "id": baishan_task.to_string()})).await;
    assert_eq!(geo["details"][0]["task"]["url"], "http://www.example.com/from-baishan");
    let cdn = ok(&server, "cdn_list_purge", json!({"id": baishan_task.to_string()})).await;
    assert_eq!(cdn["details"][0]["task"]["url"], "http://www.example.com/from-baishan");

    let geo_task =
        ok(&server, "eo_purge", json!({"site": "example.com", "tasks": [{"url": "http://www.example.com/from-geo"}]}))
            .await;
    let items = server.task_items("/v2/cache/refresh", geo_task["id"].as_str().unwrap().parse().unwrap()).await;
    assert_eq!(items[0]["url"], "http://www.example.com/from-geo");

    // A quota spent through one dialect is spent for all.
    ok(
        &server,
        "cdn_prefetch",
        json!({"tasks": [{"url": "http://www.example.com/q1"}, {"url": "http://www.example.com/q2"}]}),
    )
    .await;
    let (_, headers, body) = server.get("/v2/cache/prefetchQuota").await;
    assert_eq!(body["data"], json!({"url_quota": 10, "url_remain": 8}));
    assert_eq!(headers["x-push-remaining"], "8");
    server.submit("/v2/cache/prefetch", json!({"urls": ["http://www.example.com/q3"]})).await;
    let quota = ok(&server, "cdn_quota", json!({})).await;
    assert_eq!(quota["prefetchRemain"], 7);
}

#[tokio::test]
async fn geo_and_cdn_purges_take_effect_on_varnish() {
    let (_origin, varnish, server) = one_varnish().await;
    for path in ["/geo.css", "/cdn/a.js", "/cdn/b.js"] {
        cache_status(&varnish.address(), "www.example.com", path).await;
        assert_eq!(cache_status(&varnish.address(), "www.example.com", path).await, "HIT");
    }

    let geo =
        ok(&server, "eo_purge", json!({"site": "example.com", "tasks": [{"url": "http://www.example.com/geo.css"}]}))
            .await;
    let cdn =
        ok(&server, "cdn_purge", json!({"tasks": [{"url": "http://www.example.com/cdn/", "type": "directory"}]})).await;
    for id in [geo["id"].as_str().unwrap(), cdn["id"].as_str().unwrap()] {
        let items = server.wait_final("/v2/cache/refresh", id.parse().unwrap(), Duration::from_secs(20)).await;
        assert_eq!(items[0]["status"], "completed", "{items:?}");
    }

    for path in ["/geo.css", "/cdn/a.js", "/cdn/b.js"] {
        assert_eq!(cache_status(&varnish.address(), "www.example.com", path).await, "MISS", "{path}");
    }
    let listed = ok(&server, "eo_list_purge", json!({"site": "example.com", "id": geo["id"]})).await;
    assert_eq!(listed["details"][0]["status"], "completed");
    assert_eq!(listed["details"][0]["progress"], 100);
    assert!(listed["details"][0]["finishedAt"].is_string());
}
