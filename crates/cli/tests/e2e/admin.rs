//! Live administration: accounts, tokens, access keys and edges changed through `/admin/v1` on
//! one instance and seen by another sharing its PostgreSQL, secrets kept hashed or sealed, the
//! audit trail, the `cachectl admin` commands, and SIGHUP.

use crate::bce::signed_as;
use crate::support::*;
use cachectl_testkit::PgCluster;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

pub(crate) const ADMIN_TOKEN: &str = "admin-token-for-the-tests-0123456789";

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// `[admin]` with the test's admin token, a sealing key written in `dir`, and a fast poll.
pub(crate) fn admin_section(dir: &std::path::Path) -> String {
    use base64::Engine as _;
    let key = dir.join("secret.key");
    std::fs::write(&key, base64::engine::general_purpose::STANDARD.encode([42u8; 32])).unwrap();
    format!(
        "[admin]\nkey_file = \"{}\"\npoll_interval = \"200ms\"\n[[admin.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\n\n",
        key.display(),
        sha256_hex(ADMIN_TOKEN)
    )
}

pub(crate) async fn admin(server: &Cachectl, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = server.http.request(method, server.url(path)).bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A native submission with `token`; returns the status and answer.
async fn native_submit(server: &Cachectl, token: &str, urls: &[&str]) -> (u16, Value) {
    let response = server
        .http
        .post(server.url("/api/v1/tasks"))
        .bearer_auth(token)
        .json(&json!({"kind": "refresh", "type": "url", "urls": urls}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Retries `check` until it holds (another instance sees a change within its poll interval).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}: not seen within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The native task's node names of its first item, once final.
async fn nodes_of(server: &Cachectl, token: &str, task: i64) -> Vec<String> {
    let start = Instant::now();
    loop {
        let detail: Value = server
            .http
            .get(server.url(&format!("/api/v1/tasks/{task}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if detail["task"]["state"] != "running" {
            let item = &detail["items"][0];
            assert_eq!(item["status"], "completed", "{detail}");
            let mut names: Vec<String> =
                item["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap().to_owned()).collect();
            names.sort();
            return names;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "task {task} not final: {detail}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn accounts_credentials_and_edges_change_live_across_instances_with_an_audit_trail() {
    let pg = PgCluster::start();
    let db = pg.database("admin").await;
    let origin = Origin::start().await;
    let (v1, v2) = (Varnish::start(origin.port).await, Varnish::start(origin.port).await);
    let keys = tempfile::tempdir().unwrap();
    let extra = format!(
        "{ACCOUNTS}{}{}{}",
        admin_section(keys.path()),
        fast_worker("10s"),
        edge("v1", "varnish", &v1.address(), "edge")
    );
    let a = Cachectl::start_on_store(Some(&db), &extra).await;
    let b = Cachectl::start_on_store(Some(&db), &extra).await;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let patch = reqwest::Method::PATCH;

    // Only an admin token opens the admin API.
    let r = a.http.get(a.url("/admin/v1/accounts")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "an account's token is not an admin token");
    let r = a.http.get(a.url("/admin/v1/accounts")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // A new account, made on instance A, used on instance B.
    let (status, body) = admin(
        &a,
        post.clone(),
        "/admin/v1/accounts",
        Some(json!({"name": "beta", "domains": ["beta.example.com"], "quotas": {"refresh_urls": 50}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!((body["source"].as_str(), body["quotas"]["refresh_urls"].as_u64()), (Some("api"), Some(50)));
    let (status, _) =
        admin(&a, post.clone(), "/admin/v1/accounts", Some(json!({"name": "beta", "domains": ["x.test"]}))).await;
    assert_eq!(status, 409, "the name is taken");
    let (status, body) =
        admin(&a, post.clone(), "/admin/v1/accounts", Some(json!({"name": "gamma", "domains": ["bad domain"]}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("domains[0]"), "{body}");
    let (status, issued) = admin(&a, post.clone(), "/admin/v1/accounts/beta/tokens", Some(json!({"name": "ci"}))).await;
    assert_eq!(status, 201, "{issued}");
    let token = issued["secret"].as_str().unwrap().to_owned();
    let token_id = issued["id"].as_str().unwrap().to_owned();
    let start = Instant::now();
    let task = loop {
        let (status, body) = native_submit(&b, &token, &["http://beta.example.com/a"]).await;
        if status == 201 {
            break body["task"]["id"].as_i64().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the new token on instance B: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(nodes_of(&b, &token, task).await, ["v1"], "purged on the real Varnish");
    let (status, _) = native_submit(&b, &token, &["http://www.example.com/a"]).await;
    assert_eq!(status, 400, "beta owns only its own domain");

    // Secrets at rest: the token only as its SHA-256, the secret key sealed.
    let (status, key) = admin(&a, post.clone(), "/admin/v1/accounts/beta/access-keys", None).await;
    assert_eq!(status, 201, "{key}");
    let (ak, sk) = (key["id"].as_str().unwrap().to_owned(), key["secret"].as_str().unwrap().to_owned());
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let stored: Vec<(String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT id, secret_hash, sealed_secret FROM credentials").fetch_all(&pool).await.unwrap();
    let everything = format!("{stored:?}");
    assert!(!everything.contains(&token) && !everything.contains(&sk), "no secret in clear: {everything}");
    assert!(everything.contains(&sha256_hex(&token)), "the token's hash is what is kept");
    let dump = std::process::Command::new(pg.tool("pg_dump")).arg("--dbname").arg(&db).output().unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains(&ak) && !dump.contains(&token) && !dump.contains(&sk), "a PostgreSQL dump holds no secret");
    let (status, listed) = admin(&b, get.clone(), "/admin/v1/accounts/beta/credentials", None).await;
    assert_eq!(status, 200);
    assert!(!listed.to_string().contains(&sk) && !listed.to_string().contains(&token), "never shown again: {listed}");
    let bce_purge = r#"{"tasks": [{"url": "http://beta.example.com/k"}]}"#;
    eventually("the new access key on instance B", || async {
        signed_as(&b, (&ak, &sk), "POST", "/v2/cache/purge", bce_purge).await.0 == 201
    })
    .await;

    // Disabling an account: its credentials get the dialects' auth errors, its queued items
    // (here two prefetches scheduled an hour ahead) are cancelled with that reason.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ");
    let scheduled = format!(
        r#"{{"tasks": [{{"url": "http://beta.example.com/s1", "startTime": "{later}"}}, {{"url": "http://beta.example.com/s2", "startTime": "{later}"}}]}}"#
    );
    let (status, _, answer) = signed_as(&b, (&ak, &sk), "POST", "/v2/cache/prefetch", &scheduled).await;
    assert_eq!(status, 201, "{answer}");
    let (status, body) = admin(&a, patch.clone(), "/admin/v1/accounts/beta", Some(json!({"disabled": true}))).await;
    assert_eq!(status, 200, "{body}");
    let cancelled: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, reason FROM items WHERE url LIKE 'http://beta.example.com/s_' ORDER BY url")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        cancelled,
        vec![("failed".to_owned(), Some("cancelled: account beta disabled".to_owned())); 2],
        "queued items are cancelled with the reason"
    );
    eventually("beta refused on B", || async {
        native_submit(&b, &token, &["http://beta.example.com/x"]).await.0 == 401
    })
    .await;
    let (status, _, body) = signed_as(&b, (&ak, &sk), "POST", "/v2/cache/purge", bce_purge).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("AccessDenied")), "the BCE dialect's auth error: {body}");
    let r = b.http.get(b.url(&format!("/v2/cache/refresh?token={TOKEN}x"))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let baishan: Value = b
        .http
        .get(b.url(&format!("/v2/cache/refresh?token={ADMIN_TOKEN}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(baishan["code"], 401, "an admin token is no account token on a dialect: {baishan}");
    admin(&a, patch.clone(), "/admin/v1/accounts/beta", Some(json!({"disabled": false}))).await;
    eventually("beta enabled again on B", || async {
        native_submit(&b, &token, &["http://beta.example.com/y"]).await.0 == 201
    })
    .await;

    // Rotation with an overlap: both work, then only the new one.
    let (status, rotated) = admin(
        &a,
        post.clone(),
        &format!("/admin/v1/accounts/beta/credentials/{token_id}/rotate"),
        Some(json!({"overlap": "2s"})),
    )
    .await;
    assert_eq!(status, 201, "{rotated}");
    let new_token = rotated["secret"].as_str().unwrap().to_owned();
    eventually("the rotated token on B", || async {
        native_submit(&b, &new_token, &["http://beta.example.com/r"]).await.0 == 201
    })
    .await;
    assert_eq!(
        native_submit(&b, &token, &["http://beta.example.com/o"]).await.0,
        201,
        "the old token works during the overlap"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        native_submit(&b, &token, &["http://beta.example.com/o"]).await.0,
        401,
        "the old token ended with the overlap"
    );
    assert_eq!(native_submit(&b, &new_token, &["http://beta.example.com/n"]).await.0, 201);

    // Revoking the access key; disabling the account and the file's account.
    let (status, _) = admin(&a, post.clone(), &format!("/admin/v1/accounts/beta/credentials/{ak}/revoke"), None).await;
    assert_eq!(status, 204);
    eventually("the revoked key refused on B", || async {
        signed_as(&b, (&ak, &sk), "POST", "/v2/cache/purge", bce_purge).await.0 != 201
    })
    .await;
    let (status, body) =
        admin(&a, patch.clone(), "/admin/v1/accounts/acme", Some(json!({"domains": ["x.test"]}))).await;
    assert_eq!(status, 409, "a file account's settings are the file's: {body}");
    let (status, body) = admin(&a, patch.clone(), "/admin/v1/accounts/acme", Some(json!({"disabled": true}))).await;
    assert_eq!((status, body["disabled"].as_bool()), (200, Some(true)), "{body}");
    eventually("acme disabled on B", || async {
        native_submit(&b, TOKEN, &["http://www.example.com/d"]).await.0 == 401
    })
    .await;
    admin(&a, patch.clone(), "/admin/v1/accounts/acme", Some(json!({"disabled": false}))).await;
    eventually("acme enabled again on B", || async {
        native_submit(&b, TOKEN, &["http://www.example.com/e"]).await.0 == 201
    })
    .await;

    // Edges: one added through the API serves new items; a drained one gets none.
    let (status, body) = admin(
        &a,
        post.clone(),
        "/admin/v1/edges",
        Some(json!({"name": "v2", "driver": "varnish", "address": v2.address()})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = admin(
        &a,
        post.clone(),
        "/admin/v1/edges",
        Some(json!({"name": "v1", "driver": "varnish", "address": v2.address()})),
    )
    .await;
    assert_eq!(status, 409);
    eventually("v2 serving on B", || async {
        let (_, body) =
            native_submit(&b, &new_token, &[&format!("http://beta.example.com/e{}", crate::now_ms())]).await;
        nodes_of(&b, &new_token, body["task"]["id"].as_i64().unwrap()).await == ["v1", "v2"]
    })
    .await;
    let (status, body) = admin(&a, post.clone(), "/admin/v1/edges/v1/drain", None).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("draining")), "{body}");
    eventually("v1 drained on B", || async {
        let (_, body) =
            native_submit(&b, &new_token, &[&format!("http://beta.example.com/d{}", crate::now_ms())]).await;
        nodes_of(&b, &new_token, body["task"]["id"].as_i64().unwrap()).await == ["v2"]
    })
    .await;
    let (status, _) = admin(&a, reqwest::Method::DELETE, "/admin/v1/edges/v1", None).await;
    assert_eq!(status, 409, "a file edge is removed from the file");
    let (status, _) = admin(&a, reqwest::Method::DELETE, "/admin/v1/edges/v2", None).await;
    assert_eq!(status, 204);
    eventually("v2 removed on B", || async {
        let (_, edges) = admin(&b, reqwest::Method::GET, "/admin/v1/edges", None).await;
        edges["edges"].as_array().unwrap().len() == 1
    })
    .await;

    // The audit trail: who, with which credential, from where, what; tasks included.
    let (status, log) = admin(&b, get.clone(), "/admin/v1/audit?limit=1000", None).await;
    assert_eq!(status, 200, "{log}");
    let entries = log["entries"].as_array().unwrap();
    let find =
        |action: &str| entries.iter().find(|e| e["action"] == action).unwrap_or_else(|| panic!("no {action}: {log}"));
    let created = find("account.create");
    assert_eq!(
        (created["actor"].as_str(), created["credential"].as_str(), created["address"].as_str()),
        (Some("admin"), Some("ops"), Some("127.0.0.1"))
    );
    assert_eq!(created["detail"]["domains"][0], "beta.example.com");
    for action in [
        "token.issue",
        "access_key.issue",
        "token.rotate",
        "token.expire",
        "access_key.revoke",
        "account.disable",
        "account.enable",
        "edge.add",
        "edge.drain",
        "edge.remove",
    ] {
        find(action);
    }
    let submitted = entries
        .iter()
        .find(|e| e["action"] == "task.submit" && e["target"].as_str() == Some(task.to_string().as_str()))
        .unwrap_or_else(|| panic!("the first task is audited: {log}"));
    assert_eq!(
        (submitted["actor"].as_str(), submitted["credential"].as_str()),
        (Some("beta"), Some(token_id.as_str()))
    );
    assert_eq!(submitted["address"], "127.0.0.1");
    assert!(!log.to_string().contains(&token) && !log.to_string().contains(&sk), "no secret in the audit log");
    let (_, page) = admin(&b, get.clone(), "/admin/v1/audit?action=edge.&limit=2", None).await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 2);
    let (_, rest) =
        admin(&b, get, &format!("/admin/v1/audit?action=edge.&limit=2&before={}", page["next"]), None).await;
    assert_eq!(rest["entries"][0]["action"], "edge.add", "{rest}");

    // The command line.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cachectl"))
            .args(args)
            .env("CACHECTL_SERVER", a.url(""))
            .env("CACHECTL_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("CACHECTL_TOKEN")
            .output()
            .unwrap()
    };
    let out = cli(&["admin", "accounts", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("beta") && text.contains("acme"), "{text}");
    let out = cli(&["admin", "keys", "issue-token", "beta", "--name", "from-cli"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("token: cct_"), "{text}");
    let cli_token = text.lines().find_map(|l| l.strip_prefix("token: ")).unwrap().to_owned();
    eventually("the CLI's token", || async {
        native_submit(&b, &cli_token, &["http://beta.example.com/cli"]).await.0 == 201
    })
    .await;
    let out = cli(&["admin", "edges", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("draining"));
    let out = cli(&["admin", "audit", "--action", "token.issue"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("token.issue"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachectl"))
        .args(["admin", "accounts", "list"])
        .env("CACHECTL_SERVER", a.url(""))
        .env_remove("CACHECTL_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "no admin token: exit 4");
    let out = cli(&["admin", "new-token", "--name", "alice"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let made = text.lines().find_map(|l| l.strip_prefix("token: ")).unwrap();
    assert!(text.contains(&format!("sha256 = \"{}\"", sha256_hex(made))), "{text}");
}

#[tokio::test]
async fn sighup_rereads_the_file_and_keeps_the_running_configuration_when_it_is_invalid() {
    let (_origin, _varnish, server) = one_varnish().await;
    let gamma = "\n[[accounts]]\nname = \"gamma\"\ndomains = [\"gamma.test\"]\ntokens = [\"gamma-secret-token\"]\n";
    assert_eq!(native_submit(&server, "gamma-secret-token", &["http://gamma.test/a"]).await.0, 401);
    server.rewrite_config(|text| format!("{text}{gamma}"));
    server.signal(cachectl_testkit::Signal::SIGHUP);
    eventually("the new account after SIGHUP", || async {
        native_submit(&server, "gamma-secret-token", &["http://gamma.test/a"]).await.0 == 201
    })
    .await;
    assert!(server.log().contains("SIGHUP: configuration reloaded"), "{}", server.log());

    // An invalid file is refused whole; what runs stays.
    server.rewrite_config(|text| format!("{text}\n[[accounts]]\nname = \"gamma\"\ndomains = []\n"));
    server.signal(cachectl_testkit::Signal::SIGHUP);
    eventually("the refusal in the log", || async { server.log().contains("SIGHUP: the configuration is invalid") })
        .await;
    assert_eq!(native_submit(&server, "gamma-secret-token", &["http://gamma.test/b"]).await.0, 201);

    // A restart-only setting is named, not applied.
    server.rewrite_config(|text| {
        let text = text.replace("\n[[accounts]]\nname = \"gamma\"\ndomains = []\n", "");
        text.replace("listen = \"127.0.0.1:", "listen = \"127.0.0.2:")
    });
    server.signal(cachectl_testkit::Signal::SIGHUP);
    eventually("the restart-only warning", || async { server.log().contains("takes effect only at a restart") }).await;
    assert!(server.log().contains("server.listen"), "{}", server.log());
    assert_eq!(native_submit(&server, TOKEN, &["http://www.example.com/still"]).await.0, 201, "still listening");
}

#[tokio::test]
async fn no_secret_reaches_the_sqlite_file_and_a_disabled_accounts_queue_is_cancelled() {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let keys = tempfile::tempdir().unwrap();
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}{}",
        admin_section(keys.path()),
        fast_worker("10s"),
        edge("v1", "varnish", &varnish.address(), "edge")
    ))
    .await;
    let post = reqwest::Method::POST;
    let (status, issued) = admin(&server, post.clone(), "/admin/v1/accounts/acme/tokens", None).await;
    assert_eq!(status, 201, "{issued}");
    let token = issued["secret"].as_str().unwrap().to_owned();
    let (_, key) = admin(&server, post, "/admin/v1/accounts/acme/access-keys", None).await;
    let (ak, sk) = (key["id"].as_str().unwrap().to_owned(), key["secret"].as_str().unwrap().to_owned());
    assert_eq!(native_submit(&server, &token, &["http://www.example.com/t"]).await.0, 201);
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ");
    let scheduled = format!(r#"{{"tasks": [{{"url": "http://www.example.com/later", "startTime": "{later}"}}]}}"#);
    let (status, _, answer) = signed_as(&server, (&ak, &sk), "POST", "/v2/cache/prefetch", &scheduled).await;
    assert_eq!(status, 201, "{answer}");
    // Every byte SQLite wrote (the database and its write-ahead log).
    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", server.db_path().display());
        bytes.extend(std::fs::read(&path).unwrap_or_default());
    }
    let find = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(find(&ak), "the access key id is there (the search works)");
    assert!(!find(&token) && !find(&sk), "no token or secret key in the SQLite files");

    let (status, _) =
        admin(&server, reqwest::Method::PATCH, "/admin/v1/accounts/acme", Some(json!({"disabled": true}))).await;
    assert_eq!(status, 200);
    let db = server.db().await;
    let (status, reason): (String, Option<String>) =
        sqlx::query_as("SELECT status, reason FROM items WHERE url = 'http://www.example.com/later'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((status.as_str(), reason.as_deref()), ("failed", Some("cancelled: account acme disabled")));
    let (status, _, body) = signed_as(
        &server,
        (&ak, &sk),
        "POST",
        "/v2/cache/purge",
        r#"{"tasks": [{"url": "http://www.example.com/u"}]}"#,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("AccessDenied")), "{body}");
    let (status, _, body) = server.raw(reqwest::Method::GET, &format!("/v2/cache/refresh?token={TOKEN}"), None).await;
    assert_eq!((status, body["code"].as_i64()), (401, Some(401)), "the Baishan dialect's auth error: {body}");
}

#[tokio::test]
async fn draining_an_edge_mid_run_sends_it_nothing_new_and_the_run_completes_on_the_others() {
    let origin = Origin::start().await;
    let (v1, v2) = (Varnish::start(origin.port).await, Varnish::start(origin.port).await);
    let keys = tempfile::tempdir().unwrap();
    // Few requests at once per node, so that the run lasts long enough to drain in its middle.
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}per_node_concurrency = 1\npipeline_depth = 1\nmax_items_in_flight = 100\n\n{}{}",
        admin_section(keys.path()),
        fast_worker("60s"),
        edge("v1", "varnish", &v1.address(), "edge"),
        edge("v2", "varnish", &v2.address(), "edge")
    ))
    .await;
    let mut tasks = Vec::new();
    for batch in 0..5 {
        let urls: Vec<String> = (0..1000).map(|i| format!("http://www.example.com/drain/{batch}/{i}")).collect();
        tasks.push(server.native_submit(json!({"kind": "refresh", "type": "url", "urls": urls})).await);
    }
    let db = server.db().await;
    let on_v2 = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM node_results WHERE node = 'v2'")
            .fetch_one(&db)
            .await
            .unwrap()
    };
    let start = Instant::now();
    while on_v2().await < 300 {
        assert!(start.elapsed() < Duration::from_secs(60), "the run did not start:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = admin(&server, reqwest::Method::POST, "/admin/v1/edges/v2/drain", None).await;
    assert_eq!(status, 200, "{body}");
    let drained_at = crate::now_ms();
    let at_drain = on_v2().await;
    for task in &tasks {
        let detail = server.native_wait(*task).await;
        assert_eq!(
            detail["task"]["counts"]["completed"], 1000,
            "task {task} completed on the other node: {}",
            detail["task"]
        );
    }
    let rows: Vec<(i64, Option<String>, i64, Option<String>)> = sqlx::query_as(
        "SELECT i.id, i.reason, i.started_at, (SELECT state FROM node_results r WHERE r.item_id = i.id AND r.node = 'v2') \
         FROM items i",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 5000);
    let v1_done: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM node_results WHERE node = 'v1' AND state = 'succeeded'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(v1_done, 5000, "every item on v1");
    let sent_to_v2: Vec<_> = rows.iter().filter(|r| r.3.is_some()).collect();
    let skipped: Vec<_> = rows.iter().filter(|r| r.3.is_none()).collect();
    assert!(sent_to_v2.iter().all(|r| r.3.as_deref() == Some("succeeded")), "what v2 had started finished there");
    assert!(sent_to_v2.iter().all(|r| r.1.is_none()), "no reason on the items v2 served");
    assert!(!skipped.is_empty(), "the drain came mid-run");
    assert!(
        skipped.iter().all(|r| r.1.as_deref() == Some("not sent to draining node v2")),
        "the records say which node was drained: {:?}",
        skipped.iter().find(|r| r.1.as_deref() != Some("not sent to draining node v2"))
    );
    // No command reached v2 after the drain: its last answers are those of the one request in
    // flight then (one connection, no pipelining), within moments of it.
    let last_on_v2: i64 =
        sqlx::query_scalar("SELECT MAX(updated_at) FROM node_results WHERE node = 'v2'").fetch_one(&db).await.unwrap();
    assert!(
        last_on_v2 < drained_at + 500,
        "no new command went to the drained node ({} ms after)",
        last_on_v2 - drained_at
    );
    let last_on_v1: i64 =
        sqlx::query_scalar("SELECT MAX(updated_at) FROM node_results WHERE node = 'v1'").fetch_one(&db).await.unwrap();
    assert!(last_on_v1 > drained_at + 1000, "the run went on well after the drain, on v1 alone");
    println!(
        "v2 had {at_drain} results at the drain, {} at the end; {} items skipped it",
        sent_to_v2.len(),
        skipped.len()
    );
}
