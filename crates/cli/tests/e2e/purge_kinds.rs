//! Tag (surrogate key), regex and soft purges against real Varnish with the shipped VCL and
//! varnish-modules' xkey: what each evicts, on every node and nowhere else, the refusals at
//! submit, the stale-while-one-refetch behaviour of a soft purge, and the CLI's flags.

use crate::support::*;
use cachectl_testkit::caches::cache_get;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const OTHER_TOKEN: &str = "other-secret-token";

/// An origin, `nodes` Varnish nodes in front of it, and cachectl with the standard accounts.
async fn varnishes(nodes: usize) -> (Origin, Vec<Varnish>, Cachectl) {
    let origin = Origin::start().await;
    let mut caches = Vec::new();
    let mut config = format!("{ACCOUNTS}{}", fast_worker("10s"));
    for i in 0..nodes {
        let varnish = Varnish::start(origin.port).await;
        config.push_str(&edge(&format!("v{i}"), "varnish", &varnish.address(), "edge"));
        caches.push(varnish);
    }
    let server = Cachectl::start(&config).await;
    (origin, caches, server)
}

/// Caches each object on each node, checking that the second GET is a hit.
async fn warm(caches: &[Varnish], objects: &[(&str, &str)]) {
    for varnish in caches {
        for (host, path) in objects {
            cache_status(&varnish.address(), host, path).await;
            assert_eq!(cache_status(&varnish.address(), host, path).await, "HIT", "{host}{path}");
        }
    }
}

/// Asserts the verdict of a GET of each object on each node.
async fn expect(caches: &[Varnish], objects: &[(&str, &str)], verdict: &str) {
    for (i, varnish) in caches.iter().enumerate() {
        for (host, path) in objects {
            assert_eq!(cache_status(&varnish.address(), host, path).await, verdict, "v{i} {host}{path}");
        }
    }
}

/// A native submission with `token`: the status and the JSON answer.
async fn post_as(server: &Cachectl, token: &str, body: Value) -> (u16, Value) {
    let response = server.http.post(server.url("/api/v1/tasks")).bearer_auth(token).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Submits with `token`, waits for the task and returns its detail.
async fn purge_as(server: &Cachectl, token: &str, body: Value) -> Value {
    let (status, submitted) = post_as(server, token, body).await;
    assert_eq!(status, 201, "{submitted}");
    let id = submitted["task"]["id"].as_i64().unwrap();
    let start = Instant::now();
    loop {
        let response =
            server.http.get(server.url(&format!("/api/v1/tasks/{id}"))).bearer_auth(token).send().await.unwrap();
        let detail: Value = response.json().await.unwrap();
        if detail["task"]["state"] != "running" {
            return detail;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "task {id} still running: {detail}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn tag_purge_evicts_exactly_the_tagged_objects_of_the_host_on_every_node() {
    let (_origin, caches, server) = varnishes(2).await;
    let tagged = [
        ("www.example.com", "/p/1?skey=product-42+cat-7"),
        ("www.example.com", "/p/2?ctag=cat-7,product-42"),
        ("WWW.Example.com:80", "/p/5?skey=x+product-42"), // the same host as clients may spell it
    ];
    let untouched = [
        ("www.example.com", "/p/3?skey=product-43+cat-7"),
        ("www.example.com", "/p/4"),
        ("www.example.com", "/p/6?skey=product-420"),
        ("img.example.com", "/p/1?skey=product-42"), // the same account, another host
        ("other.test", "/p/1?skey=product-42"),      // another account
    ];
    warm(&caches, &tagged).await;
    warm(&caches, &untouched).await;

    let detail =
        purge_as(&server, TOKEN, json!({"type": "tag", "host": "www.example.com", "tags": ["product-42"]})).await;

    let item = &detail["items"][0];
    assert_eq!(detail["task"]["state"], "completed", "{detail}");
    assert_eq!((item["type"].as_str(), item["soft"].as_bool()), (Some("tag"), Some(false)), "{item}");
    assert_eq!(item["url"], "tag:www.example.com:product-42");
    assert_eq!(item["nodes"].as_array().unwrap().len(), 2, "{item}");
    expect(&caches, &tagged, "MISS").await;
    expect(&caches, &untouched, "HIT").await;
}

#[tokio::test]
async fn two_accounts_with_the_same_tag_stay_isolated() {
    let (_origin, caches, server) = varnishes(1).await;
    let acme = [("www.example.com", "/a?skey=sale"), ("shop.example.com", "/b?ctag=sale")];
    let other = [("other.test", "/a?skey=sale"), ("other.test", "/c?ctag=sale,x")];
    warm(&caches, &acme).await;
    warm(&caches, &other).await;

    let detail = purge_as(&server, OTHER_TOKEN, json!({"type": "tag", "host": "other.test", "tags": ["sale"]})).await;
    assert_eq!(detail["task"]["state"], "completed", "{detail}");
    expect(&caches, &other, "MISS").await;
    expect(&caches, &acme, "HIT").await;

    // An account cannot name another account's host.
    let (status, answer) =
        post_as(&server, OTHER_TOKEN, json!({"type": "tag", "host": "www.example.com", "tags": ["sale"]})).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("not one of the account's domains"), "{answer}");
    expect(&caches, &acme, "HIT").await;
}

#[tokio::test]
async fn regex_purge_evicts_exactly_the_matching_paths() {
    let (_origin, caches, server) = varnishes(2).await;
    let matching = [("www.example.com", "/img/a.png"), ("www.example.com", "/img/b.png?v=2")];
    let untouched = [
        ("www.example.com", "/img/c.jpg"),
        ("www.example.com", "/css/img/a.png"),
        ("www.example.com", "/img/A1.png"),
        ("img.example.com", "/img/a.png"), // another host on the same nodes
        ("other.test", "/img/a.png"),
    ];
    warm(&caches, &matching).await;
    warm(&caches, &untouched).await;

    let detail = purge_as(
        &server,
        TOKEN,
        json!({"type": "regex", "host": "www.example.com", "regexes": [r"^/img/[a-z]+\.png"]}),
    )
    .await;

    assert_eq!(detail["task"]["state"], "completed", "{detail}");
    assert_eq!(detail["items"][0]["url"], r"regex:www.example.com:^/img/[a-z]+\.png");
    expect(&caches, &matching, "MISS").await;
    expect(&caches, &untouched, "HIT").await;
}

#[tokio::test]
async fn a_regex_matching_everything_needs_confirm_all_and_bad_regexes_are_refused() {
    let (_origin, caches, server) = varnishes(1).await;
    let site = [("www.example.com", "/"), ("www.example.com", "/a/b.css?x=1")];
    let elsewhere = [("img.example.com", "/a/b.css?x=1")];
    warm(&caches, &site).await;
    warm(&caches, &elsewhere).await;

    let long = "a".repeat(1025);
    for (regex, says) in [
        (".*", "confirm_all"),
        ("^/", "confirm_all"),
        ("(a", "unclosed"),
        (r"\d+", "[0-9]"),
        ("(a+)+$", "backtrack"),
        ("/a b", "%20"),
        (long.as_str(), "1024"),
    ] {
        let body = json!({"type": "regex", "host": "www.example.com", "regexes": ["^/ok/", regex]});
        let (status, answer) = post_as(&server, TOKEN, body).await;
        assert_eq!(status, 400, "{regex}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_argument");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(says) && message.contains("nothing was queued"), "{regex}: {message}");
    }
    let (_, tasks) = server.api(reqwest::Method::GET, "/api/v1/tasks", None, None).await;
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 0, "nothing queued: {tasks}");
    expect(&caches, &site, "HIT").await;

    let detail = purge_as(
        &server,
        TOKEN,
        json!({"type": "regex", "host": "www.example.com", "regexes": [".*"], "confirm_all": true}),
    )
    .await;
    assert_eq!(detail["task"]["state"], "completed", "{detail}");
    expect(&caches, &site, "MISS").await;
    expect(&caches, &elsewhere, "HIT").await;
}

/// After a soft purge of `path`, five requests at once get the stale body while exactly one
/// request reaches the origin; the next request gets the body of that refetch.
async fn stale_while_one_refetch(origin: &Origin, varnish: &Varnish, host: &str, path: &str) {
    let origin_path = path;
    let gets: Vec<_> = (0..5)
        .map(|_| {
            let (address, host, path) = (varnish.address(), host.to_owned(), path.to_owned());
            tokio::spawn(async move { cache_get(&address, &host, &path).await })
        })
        .collect();
    for get in gets {
        let (verdict, body) = get.await.unwrap();
        assert_eq!(verdict, "HIT", "served from the stale object");
        assert!(body.ends_with("#1\n"), "the stale body: {body}");
    }
    let start = Instant::now();
    while origin.count(host, origin_path) < 2 {
        assert!(start.elapsed() < Duration::from_secs(5), "no background refetch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The refetch is answered after REFETCH_DELAY; the five requests all came before.
    tokio::time::sleep(cachectl_testkit::caches::REFETCH_DELAY + Duration::from_millis(500)).await;
    assert_eq!(origin.count(host, origin_path), 2, "exactly one request reached the origin");
    let (_, body) = cache_get(&varnish.address(), host, path).await;
    assert!(body.ends_with("#2\n"), "the fresh body: {body}");
    assert_eq!(origin.count(host, origin_path), 2);
}

#[tokio::test]
async fn soft_purges_serve_stale_while_exactly_one_request_refetches() {
    let (origin, caches, server) = varnishes(1).await;
    let varnish = &caches[0];
    let (url_path, tag_path) = ("/gen/a.css", "/gen/t.html?skey=soft-1");
    for path in [url_path, tag_path] {
        let (_, body) = cache_get(&varnish.address(), "www.example.com", path).await;
        assert!(body.ends_with("#1\n"), "{body}");
        assert_eq!(cache_get(&varnish.address(), "www.example.com", path).await.0, "HIT");
    }

    let detail = purge_as(&server, TOKEN, json!({"urls": ["http://www.example.com/gen/a.css"], "soft": true})).await;
    let item = &detail["items"][0];
    assert_eq!((item["status"].as_str(), item["soft"].as_bool()), (Some("completed"), Some(true)), "{item}");
    stale_while_one_refetch(&origin, varnish, "www.example.com", url_path).await;

    let body = json!({"type": "tag", "host": "www.example.com", "tags": ["soft-1"], "soft": true});
    let detail = purge_as(&server, TOKEN, body).await;
    let item = &detail["items"][0];
    assert_eq!((item["type"].as_str(), item["soft"].as_bool()), (Some("tag"), Some(true)), "{item}");
    assert_eq!(item["status"], "completed", "{item}");
    stale_while_one_refetch(&origin, varnish, "www.example.com", tag_path).await;

    // A ban cannot keep objects stale: soft directories and regexes are refused at submit.
    for body in [
        json!({"urls": ["http://www.example.com/gen/"], "type": "dir", "soft": true}),
        json!({"type": "regex", "host": "www.example.com", "regexes": ["^/gen/"], "soft": true}),
    ] {
        let (status, answer) = post_as(&server, TOKEN, body).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains("ban"), "{answer}");
    }
}

#[tokio::test]
async fn nginx_refuses_tag_regex_and_soft_purges_with_the_reason() {
    let origin = Origin::start().await;
    let nginx = Nginx::start(origin.port, 1).await;
    let config = format!("{ACCOUNTS}{}{}", fast_worker("10s"), edge("n1", "nginx", &nginx.address(0), "edge"));
    let server = Cachectl::start(&config).await;
    for (body, says) in [
        (json!({"type": "tag", "host": "www.example.com", "tags": ["t"]}), "nginx cannot purge by cache tag"),
        (json!({"type": "regex", "host": "www.example.com", "regexes": ["^/x"]}), "nginx cannot purge by regex"),
        (json!({"urls": ["http://www.example.com/x"], "soft": true}), "nginx cannot soft-purge"),
    ] {
        let detail = purge_as(&server, TOKEN, body).await;
        let item = &detail["items"][0];
        assert_eq!(item["status"], "failed", "{item}");
        assert!(item["reason"].as_str().unwrap().contains(says), "{item}");
        assert_eq!(item["nodes"][0]["attempts"], 1, "failed at once: {item}");
    }
}

#[tokio::test]
async fn the_cli_purges_by_tag_regex_and_softly_with_wait() {
    let (origin, caches, server) = varnishes(1).await;
    let address = caches[0].address();
    let host = "www.example.com";
    warm(&caches, &[(host, "/c/1?skey=cli-tag"), (host, "/c/2"), (host, "/c/3.js")]).await;
    cache_get(&address, host, "/gen/cli.css").await;

    let (code, out, err) = server.cli(&["purge", "--host", host, "--tag", "cli-tag", "--wait", "--json"], TOKEN).await;
    assert_eq!(code, 0, "{out}{err}");
    let detail: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(detail["items"][0]["type"], "tag", "{detail}");
    assert_eq!(cache_status(&address, host, "/c/1?skey=cli-tag").await, "MISS");
    assert_eq!(cache_status(&address, host, "/c/2").await, "HIT");

    let (code, out, err) = server.cli(&["purge", "--host", host, "--regex", r"\.js$", "--wait"], TOKEN).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(cache_status(&address, host, "/c/3.js").await, "MISS");
    assert_eq!(cache_status(&address, host, "/c/2").await, "HIT");

    let (code, out, err) = server.cli(&["purge", "--host", host, "--regex", ".*", "--wait"], TOKEN).await;
    assert_eq!(code, 2, "needs --all: {out}{err}");
    assert!(err.contains("confirm"), "{err}");
    assert_eq!(cache_status(&address, host, "/c/2").await, "HIT");

    let (code, out, err) =
        server.cli(&["purge", "http://www.example.com/gen/cli.css", "--soft", "--wait"], TOKEN).await;
    assert_eq!(code, 0, "{out}{err}");
    stale_while_one_refetch(&origin, &caches[0], host, "/gen/cli.css").await;

    let (code, out, err) = server.cli(&["purge", "--host", host, "--regex", ".*", "--all", "--wait"], TOKEN).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(cache_status(&address, host, "/c/2").await, "MISS");
}
