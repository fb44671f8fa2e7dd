//! Hostile clients: numbers chosen to overflow, connections left stalled or idle, slow and
//! oversized bodies, more connections than the cap, and URLs whose host or characters a cache
//! would never see as sent. Each gets an answer in its dialect's format, or its connection closed,
//! and the server goes on serving everyone else.

use crate::support::*;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads from `stream` until it closes or `limit` passes; returns what was read and whether the
/// server closed it.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut received = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&received).into_owned(), closed)
}

/// Reads one whole response to a `GET /healthz` (its body is `ok\n`).
async fn read_healthz(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    while !received.ends_with(b"ok\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before answering: {:?}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";

/// An expiry of i64::MAX once overflowed the signature's time window and closed the
/// connection without an answer; now it is a malformed header, answered in the BCE format.
#[tokio::test]
async fn a_bce_expiry_that_would_overflow_is_refused_in_the_bce_format() {
    let server = Cachectl::start(ACCOUNTS).await;
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    for expiry in ["9223372036854775807", "604801"] {
        let response = server
            .http
            .post(server.url("/v2/cache/purge"))
            .header("x-bce-date", &now)
            .header("authorization", format!("bce-auth-v1/AK_ACME/{now}/{expiry}//{}", "a".repeat(64)))
            .body(r#"{"tasks":[{"url":"http://www.example.com/a"}]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{expiry}");
        assert!(response.headers().contains_key("x-bce-request-id"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "AccessDenied", "{body}");
        assert!(body["message"].as_str().unwrap().contains("604800"), "{body}");
    }
    let (status, _, _) = server.get("/v2/cache/prefetchQuota").await;
    assert_eq!(status, 200, "the server goes on serving");
}

/// A header sent line by line and never finished is cut at `header_timeout`; an idle keep-alive
/// connection lives past the header timeout and is closed at `keepalive_timeout`; a body that
/// stops arriving is answered with the dialect's 400 at `body_timeout`.
#[tokio::test]
async fn stalled_headers_idle_connections_and_slow_bodies_are_closed() {
    let server = Cachectl::start_with_server(
        "header_timeout = \"1s\"\nkeepalive_timeout = \"6s\"\nbody_timeout = \"1s\"",
        ACCOUNTS,
    )
    .await;
    let address = format!("127.0.0.1:{}", server.port);

    let mut partial = TcpStream::connect(&address).await.unwrap();
    partial.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n").await.unwrap();
    let (text, closed) = read_until_closed(&mut partial, Duration::from_secs(20)).await;
    assert!(closed, "a request whose headers never end is closed");
    assert!(text.is_empty(), "and never answered: {text:?}");

    let mut idle = TcpStream::connect(&address).await.unwrap();
    idle.write_all(HEALTHZ).await.unwrap();
    assert!(read_healthz(&mut idle).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    idle.write_all(HEALTHZ).await.unwrap();
    assert!(read_healthz(&mut idle).await.starts_with("HTTP/1.1 200"), "idle longer than the header timeout is fine");
    let (text, closed) = read_until_closed(&mut idle, Duration::from_secs(30)).await;
    assert!(closed && text.is_empty(), "an idle connection is closed at the keep-alive timeout: {text:?}");

    let mut slow = TcpStream::connect(&address).await.unwrap();
    slow.write_all(
        format!(
            "POST /v2/cache/refresh?token={TOKEN} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Content-Length: 1000\r\n\r\n{{\"urls\": ["
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (text, closed) = read_until_closed(&mut slow, Duration::from_secs(20)).await;
    assert!(closed, "a body that stops arriving ends its connection");
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    let body: Value = serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert!(body["message"].as_str().unwrap().contains("not received whole within 1s"), "{body}");

    let (status, _, _) = server.get("/v2/cache/prefetchQuota").await;
    assert_eq!(status, 200, "the server goes on serving");
}

/// A server with the `[server]` settings `server` and one edge nobody listens on, and the id of a
/// one-URL task submitted to it: the task runs until the item `deadline`, then fails.
async fn with_a_task_on_an_unreachable_node(server: &str, deadline: &str) -> (Cachectl, i64) {
    let closed_port = free_port();
    let server = Cachectl::start_with_server(
        server,
        &format!(
            "{ACCOUNTS}{}{}",
            fast_worker(deadline),
            edge("gone", "varnish", &format!("127.0.0.1:{closed_port}"), "edge")
        ),
    )
    .await;
    let response = server
        .http
        .post(server.url("/api/v1/tasks"))
        .bearer_auth(TOKEN)
        .json(&json!({ "urls": ["http://www.example.com/stream"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let task = response.json::<Value>().await.unwrap()["task"]["id"].as_i64().unwrap();
    (server, task)
}

/// A progress stream is a response still being sent, not an idle connection: it outlives the
/// keep-alive timeout and ends with the task's final state.
#[tokio::test]
async fn a_progress_stream_outlives_the_keepalive_timeout() {
    let (server, task) =
        with_a_task_on_an_unreachable_node("keepalive_timeout = \"1s\"\nheader_timeout = \"1s\"", "4s").await;
    let response =
        server.http.get(server.url(&format!("/api/v1/tasks/{task}/events"))).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(60), response.text()).await.unwrap().unwrap();
    let last = text.split("\n\n").filter(|b| b.contains("event: ")).last().unwrap_or_default();
    assert!(last.contains("event: done"), "the stream reached its end: {text}");
    assert!(last.contains("\"failed\""), "with the final state (the node is unreachable): {last}");
}

/// An account holds at most `[server] max_streams_per_account` progress streams open at once:
/// one more is refused with 429 in the native API's format (`too_many_streams`, `Retry-After`),
/// and the slot comes back once the client of an open stream goes away.
#[tokio::test]
async fn progress_streams_per_account_are_capped() {
    let (server, task) = with_a_task_on_an_unreachable_node("max_streams_per_account = 2", "120s").await;
    let events = server.url(&format!("/api/v1/tasks/{task}/events"));
    // Each stream on a connection of its own, as separate clients hold them.
    let open = || async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        client.get(&events).bearer_auth(TOKEN).send().await.unwrap()
    };
    let first = open().await;
    assert_eq!(first.status(), 200);
    let second = open().await;
    assert_eq!(second.status(), 200);
    let third = open().await;
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "1");
    let body = third.json::<Value>().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("2 progress streams"), "{body}");
    // Other requests of the account are not affected.
    let page = server.http.get(server.url(&format!("/api/v1/tasks/{task}"))).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(page.status(), 200);
    drop(first);
    // The server notices the client gone at its next write to the stream (the keep-alive
    // comment comes every 15 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let again = open().await;
        if again.status() == 200 {
            break;
        }
        assert_eq!(again.status(), 429);
        assert!(tokio::time::Instant::now() < deadline, "the slot of a closed stream came back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(second);
}

/// At `max_connections`, a new connection waits in the backlog and is served as soon as one of
/// the others closes.
#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let mut server = Cachectl::start_with_server("max_connections = 2\nkeepalive_timeout = \"60s\"", ACCOUNTS).await;
    // The start-up health checks left a kept-alive connection in the client's pool: close it.
    server.http = reqwest::Client::builder().no_proxy().build().unwrap();
    let address = format!("127.0.0.1:{}", server.port);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&address).await.unwrap();
        stream.write_all(HEALTHZ).await.unwrap();
        read_healthz(&mut stream).await;
        held.push(stream);
    }
    let mut third = TcpStream::connect(&address).await.unwrap();
    third.write_all(HEALTHZ).await.unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_secs(1), third.read(&mut buf)).await;
    assert!(early.is_err(), "a third connection is not served while two are held");
    drop(held.pop());
    assert!(read_healthz(&mut third).await.starts_with("HTTP/1.1 200"), "it is served once a slot frees");
}

/// Bodies far over the limit are read to their end and answered with each dialect's error,
/// instead of a connection reset while the client is still sending.
#[tokio::test]
async fn oversized_bodies_get_each_dialects_error() {
    let server = Cachectl::start(ACCOUNTS).await;
    let huge = format!("{{\"urls\": [\"{}\"]}}", "a".repeat(100 * 1024 * 1024));
    let response = server
        .http
        .post(server.url("/v2/cache/refresh"))
        .header("token", TOKEN)
        .header("content-type", "application/json")
        .body(huge.clone())
        .send()
        .await
        .expect("the Baishan answer arrives");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("larger than 8 MiB"), "{body}");

    let response = server
        .http
        .post(server.url("/api/v1/tasks"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("the native answer arrives");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_argument", "{body}");

    let ten_mb = format!("{{\"tasks\": [{{\"url\": \"{}\"}}]}}", "a".repeat(10 * 1024 * 1024));
    let (status, headers, body) = crate::bce::signed(&server, "POST", "/v2/cache/purge", &ten_mb).await;
    assert_eq!(status, 400, "{body}");
    assert!(headers.contains_key("x-bce-request-id"));
    assert_eq!(body["code"], "InvalidArgument", "{body}");
    assert!(body["message"].as_str().unwrap().contains("larger than 8 MiB"), "{body}");
}

/// Hosts that are not DNS names, port 0 and control characters are refused with their reason in
/// every dialect's list of rejected URLs, beside an accepted URL of the same request.
#[tokio::test]
async fn hosts_ports_and_control_characters_are_refused_with_a_reason() {
    let server = Cachectl::start(ACCOUNTS).await;
    let bad = [
        "http://*.example.com/x",
        "http://a..example.com/x",
        "http://www.example.com:0/x",
        "http://www.example.com/a\r\nX-Injected: 1",
        "http://www.example.com/a\tb",
    ];
    let mut urls: Vec<&str> = bad.to_vec();
    urls.push("http://www.example.com/fine");
    let (status, _, body) = server.post("/v2/cache/refresh", json!({ "urls": urls })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["count"], 1, "{body}");
    let refused: Vec<&str> = body["data"]["err_urls"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    assert_eq!(refused, bad, "{body}");

    let response = server
        .http
        .post(server.url("/api/v1/tasks"))
        .bearer_auth(TOKEN)
        .json(&json!({ "urls": urls }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    let reasons: Vec<(String, String)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["url"].as_str().unwrap().to_owned(), r["reason"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(reasons.len(), 5, "{body}");
    assert!(reasons[0].1.contains("not a domain name") && reasons[1].1.contains("not a domain name"), "{reasons:?}");
    assert!(reasons[2].1.contains("port 0"), "{reasons:?}");
    assert!(reasons[3].1.contains("control character") && reasons[4].1.contains("control character"), "{reasons:?}");
}
