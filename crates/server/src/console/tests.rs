//! The console through the whole router on a fresh SQLite store: sign-in, cookie flags, CSRF,
//! ownership and escaping. (The browser tests are in crates/cli/tests/e2e/console.rs.)

use crate::api::{AppState, router};
use crate::config::Config;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use cachectl_core::service::Service;
use std::sync::Arc;
use tower::ServiceExt as _;

const CONFIG: &str = r#"
[store]
url = "sqlite::memory:"

[[admin.tokens]]
name = "ops"
# The SHA-256 of "the-admin-token".
sha256 = "ae663fb089dd97eaa8d11c8dff2ca45b65e246361695a7587db9b932f72c41fa"

[[accounts]]
name = "acme"
domains = ["example.com", "*.example.com"]
tokens = ["acme-secret-token"]

[[accounts]]
name = "other"
domains = ["other.test"]
tokens = ["other-secret-token"]
"#;

struct App {
    router: axum::Router,
    _dir: tempfile::TempDir,
}

async fn app() -> App {
    app_with("").await
}

/// The app with `server`, the `[server]` table's settings.
async fn app_with(server: &str) -> App {
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace("sqlite::memory:", &format!("sqlite://{}/c.db", dir.path().display()));
    let config = format!("[server]\n{server}\n{config}");
    let settings = Arc::new(Config::from_toml(&config).unwrap().validate().unwrap());
    let store = cachectl_store::open(&settings.store_url, true).await.unwrap();
    let service = Service::new(store.clone(), settings.timezone, Arc::new(|| {}));
    let directory = crate::directory::DirectoryHandle::start(store.clone(), settings.clone()).await.unwrap();
    let streams = crate::streams::StreamSlots::new(settings.max_streams_per_account);
    let state =
        AppState { service, settings, metrics: Arc::default(), bus: None, directory, admin_store: store, streams };
    App { router: router(state), _dir: dir }
}

async fn send(app: &App, request: Request<Body>) -> Response {
    app.router.clone().oneshot(request).await.unwrap()
}

async fn text(response: Response) -> String {
    String::from_utf8(axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap()
}

fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut r = Request::get(path);
    if let Some(c) = cookie {
        r = r.header(header::COOKIE, format!("cachectl_console={c}"));
    }
    r.body(Body::empty()).unwrap()
}

fn post(path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Request<Body> {
    let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
    let mut r = Request::post(path).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        r = r.header(header::COOKIE, format!("cachectl_console={c}"));
    }
    r.body(Body::from(body)).unwrap()
}

fn set_cookie(r: &Response) -> String {
    r.headers().get(header::SET_COOKIE).unwrap().to_str().unwrap().to_owned()
}

fn cookie_value(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().split_once('=').unwrap().1.to_owned()
}

fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    html[at..at + 64].to_owned()
}

/// Signs in with `token`; the session id and its CSRF token.
async fn sign_in(app: &App, token: &str) -> (String, String) {
    let form = send(app, get("/console/login", None)).await;
    let anonymous = cookie_value(&set_cookie(&form));
    let csrf = csrf_of(&text(form).await);
    let r = send(app, post("/console/login", Some(&anonymous), &[("csrf", &csrf), ("token", token)])).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let id = cookie_value(&set_cookie(&r));
    assert_ne!(id, anonymous, "signing in must give a new session id");
    let page = text(send(app, get("/console/submit", Some(&id))).await).await;
    (id.clone(), csrf_of(&page))
}

#[tokio::test]
async fn the_session_cookie_is_httponly_strict_and_secure_behind_tls() {
    let app = app().await;
    let plain = send(&app, get("/console/login", None)).await;
    let cookie = set_cookie(&plain);
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Path=/console"));
    assert!(!cookie.contains("Secure"), "{cookie}");
    let tls = Request::get("/console/login").header("x-forwarded-proto", "https").body(Body::empty()).unwrap();
    let cookie = set_cookie(&send(&app, tls).await);
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("; Secure"));
}

#[tokio::test]
async fn pages_need_a_session_and_a_wrong_token_is_refused() {
    let app = app().await;
    let r = send(&app, get("/console/records", None)).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[header::LOCATION], "/console/login");
    let form = send(&app, get("/console/login", None)).await;
    let anonymous = cookie_value(&set_cookie(&form));
    let csrf = csrf_of(&text(form).await);
    let r = send(&app, post("/console/login", Some(&anonymous), &[("csrf", &csrf), ("token", "nope")])).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(text(r).await.contains("Sign-in failed: unknown token."));
    let r = send(&app, get("/console/records", Some(&anonymous))).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "an anonymous session is not signed in");
}

#[tokio::test]
async fn every_post_without_the_sessions_csrf_token_is_403() {
    let app = app().await;
    let (id, csrf) = sign_in(&app, "acme-secret-token").await;
    let urls = ("urls", "http://www.example.com/a.css");
    for form in [vec![urls], vec![("csrf", "0".repeat(64).as_str()), urls], vec![("csrf", ""), urls]] {
        let r = send(&app, post("/console/submit", Some(&id), &form)).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
    // Another session's token is not this session's.
    let (_, other_csrf) = sign_in(&app, "acme-secret-token").await;
    let r = send(&app, post("/console/submit", Some(&id), &[("csrf", &other_csrf), urls])).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    for path in ["/console/logout", "/console/tasks/1/cancel", "/console/tasks/1/retry", "/console/login"] {
        assert_eq!(send(&app, post(path, Some(&id), &[])).await.status(), StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(
        send(&app, post("/console/login", None, &[("token", "acme-secret-token")])).await.status(),
        StatusCode::FORBIDDEN
    );
    // With the token, the submission goes through to its task page.
    let r = send(&app, post("/console/submit", Some(&id), &[("csrf", &csrf), urls])).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[header::LOCATION], "/console/tasks/1");
}

#[tokio::test]
async fn invalid_lines_are_shown_escaped_and_nothing_is_submitted() {
    let app = app().await;
    let (id, csrf) = sign_in(&app, "acme-secret-token").await;
    let lines = "http://www.example.com/ok.css\nhttp://evil.test/<script>window.__pwned=1</script>\n";
    let r = send(&app, post("/console/submit", Some(&id), &[("csrf", &csrf), ("urls", lines)])).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let html = text(r).await;
    assert!(
        html.contains("line 2: <code>http://evil.test/&lt;script&gt;window.__pwned=1&lt;/script&gt;</code>"),
        "{html}"
    );
    assert!(
        html.contains("host is not one of the account&#39;s domains")
            || html.contains("host is not one of the account's domains")
    );
    assert!(!html.contains("<script>window"));
    let records = text(send(&app, get("/console/records", Some(&id))).await).await;
    assert!(records.contains("No records match: 0 in total."), "nothing may be submitted while a line is invalid");
}

#[tokio::test]
async fn another_accounts_task_is_not_found_and_sign_out_ends_the_session() {
    let app = app().await;
    let (acme, csrf) = sign_in(&app, "acme-secret-token").await;
    let r = send(&app, post("/console/submit", Some(&acme), &[("csrf", &csrf), ("urls", "http://www.example.com/x")]))
        .await;
    assert_eq!(r.headers()[header::LOCATION], "/console/tasks/1");
    let page = text(send(&app, get("/console/tasks/1", Some(&acme))).await).await;
    assert!(page.contains("http://www.example.com/x"));
    let (other, other_csrf) = sign_in(&app, "other-secret-token").await;
    for path in ["/console/tasks/1", "/console/tasks/1/live", "/console/tasks/abc", "/console/tasks/-1"] {
        let r = send(&app, get(path, Some(&other))).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(text(r).await.contains("Task not found."));
    }
    let r = send(&app, post("/console/tasks/1/cancel", Some(&other), &[("csrf", &other_csrf)])).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let csv = text(send(&app, get("/console/records.csv", Some(&other))).await).await;
    assert_eq!(csv.lines().count(), 1, "only the header: {csv}");
    let r = send(&app, post("/console/logout", Some(&acme), &[("csrf", &csrf)])).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(set_cookie(&r).contains("Max-Age=0"));
    assert_eq!(send(&app, get("/console/tasks/1", Some(&acme))).await.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn pages_carry_a_strict_content_security_policy_and_the_script_is_served() {
    let app = app().await;
    let r = send(&app, get("/console/login", None)).await;
    let csp = r.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
    assert!(text(r).await.contains(r#"<script src="/console/assets/console.js" defer>"#));
    let js = send(&app, get("/console/assets/console.js", None)).await;
    assert_eq!(js.status(), StatusCode::OK);
    assert_eq!(js.headers()[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
    assert!(text(js).await.contains("new EventSource("));
    assert_eq!(send(&app, get("/console/nothing-here", None)).await.status(), StatusCode::NOT_FOUND);
}

#[test]
fn csv_fields_are_quoted_and_never_formulas() {
    use super::records::field;
    assert_eq!(field("plain"), "plain");
    assert_eq!(field("a,b"), "\"a,b\"");
    assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
    assert_eq!(field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
    assert_eq!(field("-1"), "'-1");
}

#[tokio::test]
async fn cancel_and_retry_buttons_change_the_task() {
    // No worker runs here: the items stay waiting until cancelled.
    let app = app().await;
    let (id, csrf) = sign_in(&app, "acme-secret-token").await;
    let urls = "http://www.example.com/1\nhttp://www.example.com/2";
    send(&app, post("/console/submit", Some(&id), &[("csrf", &csrf), ("urls", urls)])).await;
    let page = text(send(&app, get("/console/tasks/1", Some(&id))).await).await;
    assert!(page.contains("Cancel waiting items") && !page.contains("Retry failed items"));
    assert!(page.contains(r#"data-events-url="/console/tasks/1/events""#), "{page}");
    assert!(page.contains(r#"data-state="running""#), "the script follows a running task");
    let r = send(&app, post("/console/tasks/1/cancel", Some(&id), &[("csrf", &csrf)])).await;
    assert_eq!(r.headers()[header::LOCATION], "/console/tasks/1");
    let page = text(send(&app, get("/console/tasks/1/live", Some(&id))).await).await;
    assert!(page.contains("2 failed") && page.contains("cancelled") && page.contains("Retry failed items"), "{page}");
    assert!(page.contains(r#"data-state="failed""#), "the script stops at a final task: {page}");
    send(&app, post("/console/tasks/1/retry", Some(&id), &[("csrf", &csrf)])).await;
    let page = text(send(&app, get("/console/tasks/1/live", Some(&id))).await).await;
    assert!(page.contains("2 waiting") && page.contains("Cancel waiting items"), "{page}");
}

#[tokio::test]
async fn sign_in_attempts_are_limited_per_address() {
    let app = app().await;
    let form = send(&app, get("/console/login", None)).await;
    let anonymous = cookie_value(&set_cookie(&form));
    let csrf = csrf_of(&text(form).await);
    let attempt = || post("/console/login", Some(&anonymous), &[("csrf", &csrf), ("token", "guess")]);
    // 20 a minute: 41 attempts put 21 in one minute even if they straddle two.
    let mut refused = None;
    for _ in 0..41 {
        let r = send(&app, attempt()).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let r = refused.expect("the 21st attempt in a minute is refused");
    assert!(text(r).await.contains("Too many sign-in attempts"));
}

/// The next SSE event of `body` within 5 s: its name and its JSON data; `None` when the stream ended.
async fn next_event(
    body: &mut (impl futures::Stream<Item = Result<bytes::Bytes, axum::Error>> + Unpin),
    buffer: &mut String,
) -> Option<(String, serde_json::Value)> {
    use futures::StreamExt as _;
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(str::to_owned);
            // Keep-alive comments (`:`) carry no event.
            if let (Some(event), Some(data)) = (field("event: "), field("data: ")) {
                return Some((event, serde_json::from_str(&data).unwrap()));
            }
            continue;
        }
        let chunk =
            tokio::time::timeout(std::time::Duration::from_secs(5), body.next()).await.expect("an event in 5 s");
        buffer.push_str(std::str::from_utf8(&chunk?.unwrap()).unwrap());
    }
}

#[tokio::test]
async fn the_task_stream_sends_the_live_part_until_the_task_is_final_and_only_to_its_account() {
    let app = app().await;
    let (id, csrf) = sign_in(&app, "acme-secret-token").await;
    let urls = "http://www.example.com/1\nhttp://www.example.com/2";
    send(&app, post("/console/submit", Some(&id), &[("csrf", &csrf), ("urls", urls)])).await;

    // Another account, no session, a malformed id: no stream.
    let (other, _) = sign_in(&app, "other-secret-token").await;
    let r = send(&app, get("/console/tasks/1/events", Some(&other))).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(text(r).await.contains("Task not found."));
    assert_eq!(send(&app, get("/console/tasks/1/events", None)).await.status(), StatusCode::SEE_OTHER);
    assert_eq!(send(&app, get("/console/tasks/x/events", Some(&id))).await.status(), StatusCode::NOT_FOUND);

    // The running task: its live part at once, with the reconnection delay.
    let r = send(&app, get("/console/tasks/1/events", Some(&id))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = r.into_body().into_data_stream();
    let mut buffer = String::new();
    let (event, data) = next_event(&mut body, &mut buffer).await.unwrap();
    assert_eq!((event.as_str(), data["state"].as_str(), data["progress"].as_u64()), ("live", Some("running"), Some(0)));
    let html = data["html"].as_str().unwrap();
    assert!(html.starts_with(r#"<div id="live" data-state="running""#) && html.contains("2 waiting"), "{html}");
    assert!(buffer.is_empty());

    // Cancelling finishes the task: one `done` event with the final part, then the end.
    send(&app, post("/console/tasks/1/cancel", Some(&id), &[("csrf", &csrf)])).await;
    let (event, data) = next_event(&mut body, &mut buffer).await.unwrap();
    assert_eq!(
        (event.as_str(), data["state"].as_str(), data["progress"].as_u64()),
        ("done", Some("failed"), Some(100))
    );
    let html = data["html"].as_str().unwrap();
    assert!(
        html.contains(r#"data-state="failed""#) && html.contains("2 failed") && html.contains("cancelled"),
        "{html}"
    );
    assert!(next_event(&mut body, &mut buffer).await.is_none(), "the stream ends after `done`");

    // A final task's stream is its `done` event alone.
    let r = send(&app, get("/console/tasks/1/events", Some(&id))).await;
    let mut body = r.into_body().into_data_stream();
    let mut buffer = String::new();
    assert_eq!(next_event(&mut body, &mut buffer).await.unwrap().0, "done");
    assert!(next_event(&mut body, &mut buffer).await.is_none());
}

#[tokio::test]
async fn the_task_stream_of_a_running_task_ends_after_the_shutdown_grace_and_starts_again() {
    let app = app_with(r#"shutdown_grace = "1s""#).await;
    let (id, csrf) = sign_in(&app, "acme-secret-token").await;
    send(&app, post("/console/submit", Some(&id), &[("csrf", &csrf), ("urls", "http://www.example.com/1")])).await;
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let mut body = send(&app, get("/console/tasks/1/events", Some(&id))).await.into_body().into_data_stream();
        let mut buffer = String::new();
        let (event, data) = next_event(&mut body, &mut buffer).await.unwrap();
        assert_eq!((event.as_str(), data["state"].as_str()), ("live", Some("running")));
        let (event, data) = next_event(&mut body, &mut buffer).await.unwrap();
        assert_eq!((event.as_str(), data), ("restart", serde_json::json!({})), "no `done`: the browser reconnects");
        assert!(next_event(&mut body, &mut buffer).await.is_none());
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_secs(1) && took < std::time::Duration::from_secs(3), "{took:?}");
    }
}

/// The console's streams count against `[server] max_streams_per_account` like the API's: one
/// more is a 429 page (the page's script then fetches the live part every 2 seconds), and a
/// stream that ends gives its slot back.
#[tokio::test]
async fn the_task_streams_of_an_account_are_capped() {
    let app = app_with("max_streams_per_account = 1").await;
    let (id, csrf) = sign_in(&app, "acme-secret-token").await;
    send(&app, post("/console/submit", Some(&id), &[("csrf", &csrf), ("urls", "http://www.example.com/1")])).await;
    let mut body = send(&app, get("/console/tasks/1/events", Some(&id))).await.into_body().into_data_stream();
    let mut buffer = String::new();
    assert_eq!(next_event(&mut body, &mut buffer).await.unwrap().0, "live");
    let r = send(&app, get("/console/tasks/1/events", Some(&id))).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(text(r).await.contains("updated every 2 seconds instead"));
    // The live part itself is still served.
    assert_eq!(send(&app, get("/console/tasks/1/live", Some(&id))).await.status(), StatusCode::OK);
    drop(body);
    let r = send(&app, get("/console/tasks/1/events", Some(&id))).await;
    assert_eq!(r.status(), StatusCode::OK, "the slot came back when the stream ended");
}

#[tokio::test]
async fn the_task_stream_ends_with_the_session() {
    let app = app().await;
    let (id, csrf) = sign_in(&app, "acme-secret-token").await;
    send(&app, post("/console/submit", Some(&id), &[("csrf", &csrf), ("urls", "http://www.example.com/1")])).await;
    let mut body = send(&app, get("/console/tasks/1/events", Some(&id))).await.into_body().into_data_stream();
    let mut buffer = String::new();
    assert_eq!(next_event(&mut body, &mut buffer).await.unwrap().0, "live");
    assert_eq!(
        send(&app, post("/console/logout", Some(&id), &[("csrf", &csrf)])).await.status(),
        StatusCode::SEE_OTHER
    );
    assert!(next_event(&mut body, &mut buffer).await.is_none(), "signing out ends the stream");
}

#[tokio::test]
async fn records_show_exact_totals_of_every_filter_and_the_csv_holds_them_all() {
    let app = app().await;
    let (id, csrf) = sign_in(&app, "acme-secret-token").await;
    // 1,200 URLs in two tasks (the per-request limit is 1,000): 120 of them contain "/x_".
    for batch in 0..2 {
        let urls: Vec<String> = (0..600)
            .map(|i| {
                let dir = if i % 10 == 0 { "x_" } else { "y" };
                format!("http://www.example.com/{dir}/{batch}-{i}.css")
            })
            .collect();
        let r = send(&app, post("/console/submit", Some(&id), &[("csrf", &csrf), ("urls", &urls.join("\n"))])).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
    }
    let (other, other_csrf) = sign_in(&app, "other-secret-token").await;
    send(&app, post("/console/submit", Some(&other), &[("csrf", &other_csrf), ("urls", "http://other.test/x_/1")]))
        .await;

    let page = text(send(&app, get("/console/records", Some(&id))).await).await;
    assert!(page.contains("Records 1–50 of 1,200 matching."), "{page}");
    let page = text(send(&app, get("/console/records?url=%2Fx_%2F&window=24h&kind=refresh", Some(&id))).await).await;
    assert!(page.contains("Records 1–50 of 120 matching."), "{page}");
    // Keyset paging keeps the exact position and total.
    let next = page.split("id=\"next\" href=\"").nth(1).unwrap().split('"').next().unwrap().replace("&amp;", "&");
    let page = text(send(&app, get(&next, Some(&id))).await).await;
    assert!(page.contains("Records 51–100 of 120 matching."), "{page}");
    let last = page.split("id=\"next\" href=\"").nth(1).unwrap().split('"').next().unwrap().replace("&amp;", "&");
    let page = text(send(&app, get(&last, Some(&id))).await).await;
    assert!(page.contains("Records 101–120 of 120 matching.") && !page.contains("id=\"next\""), "{page}");
    // Exact, case-sensitive substrings; other filters; nothing of the other account.
    for (query, sentence) in [
        ("url=%2FX_%2F", "No records match: 0 in total."),
        ("url=%25", "No records match: 0 in total."),
        ("status=waiting&url=1-59", "Records 1–11 of 11 matching."),
        ("status=failed", "No records match: 0 in total."),
        ("kind=prefetch", "No records match: 0 in total."),
        ("window=1h&url=other.test", "No records match: 0 in total."),
    ] {
        let page = text(send(&app, get(&format!("/console/records?{query}"), Some(&id))).await).await;
        assert!(page.contains(sentence), "{query}: {page}");
    }
    // Invalid filters are a 400 with a sentence, never a 5xx.
    for query in ["url=a%00b", "window=2h", "kind=purge", "status=done"] {
        let r = send(&app, get(&format!("/console/records?{query}"), Some(&id))).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
        let r = send(&app, get(&format!("/console/records.csv?{query}"), Some(&id))).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
    }

    // The CSV holds every matching record, across its 1,000-row reads.
    let csv = text(send(&app, get("/console/records.csv", Some(&id))).await).await;
    assert_eq!(csv.lines().count(), 1 + 1_200);
    let csv = text(send(&app, get("/console/records.csv?url=%2Fx_%2F", Some(&id))).await).await;
    assert_eq!(csv.lines().count(), 1 + 120);
    assert!(csv.lines().skip(1).all(|l| l.contains("/x_/")));
    // From a cursor: the records older than it.
    let cursor = next.split("cursor=").nth(1).unwrap();
    let csv =
        text(send(&app, get(&format!("/console/records.csv?url=%2Fx_%2F&cursor={cursor}"), Some(&id))).await).await;
    assert_eq!(csv.lines().count(), 1 + 70);
}

#[tokio::test]
async fn tags_and_regexes_of_one_host_are_submitted_with_the_same_inline_checks() {
    let app = app().await;
    let (id, csrf) = sign_in(&app, "acme-secret-token").await;
    let form = text(send(&app, get("/console/submit", Some(&id))).await).await;
    assert!(form.contains(r#"<option value="tag">"#) && form.contains(r#"<option value="regex">"#), "{form}");
    assert!(form.contains("cache tags 10000 of 10000") && form.contains("regexes 100 of 100"), "{form}");
    let submit = |fields: Vec<(&'static str, &'static str)>| {
        let mut form = vec![("csrf", csrf.as_str())];
        form.extend(fields);
        post("/console/submit", Some(&id), &form)
    };
    let refused = |html: &str, sentence: &str| assert!(html.contains(sentence), "{sentence}: {html}");

    // Wrong combinations are refused with a sentence, and nothing is submitted.
    let host = ("host", "www.example.com");
    for (fields, sentence) in [
        (vec![("type", "tag"), ("urls", "p-1")], "Enter the host whose objects the cache tags purge."),
        (vec![("type", "tag"), ("kind", "prefetch"), ("urls", "p-1"), host], "Cache tags can only be refreshed."),
        (
            vec![("type", "regex"), ("urls", "^/a\n^/b\n^/c\n^/d\n^/e\n^/f\n^/g\n^/h\n^/i\n^/j\n^/k"), host],
            "Enter from 1 to 10 regexes, one a line.",
        ),
        (
            vec![("type", "url"), ("urls", "http://www.example.com/a"), host],
            "The host is for cache tags and regexes only",
        ),
        (
            vec![("type", "tag"), ("urls", "p-1"), host, ("confirm_all", "1")],
            "Purging the whole host is for regexes only.",
        ),
    ] {
        let r = send(&app, submit(fields)).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        refused(&text(r).await, sentence);
    }
    // Each invalid line with its number and the API's reason; the host must be the account's.
    let r = send(&app, submit(vec![("type", "regex"), ("urls", "^/img/\n\\d+\n.*"), host])).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let html = text(r).await;
    refused(&html, "2 invalid line(s); nothing was submitted.");
    refused(&html, "line 2: <code>\\d+</code>");
    refused(&html, "line 3: <code>.*</code>");
    let r = send(&app, submit(vec![("type", "tag"), ("urls", "p-1"), ("host", "other.test")])).await;
    refused(&text(r).await, "line 1: <code>p-1</code>");
    let records = text(send(&app, get("/console/records", Some(&id))).await).await;
    assert!(records.contains("No records match: 0 in total."), "{records}");

    // Valid: tags (markup in one is only text), then a whole-host regex confirmed.
    let r = send(&app, submit(vec![("type", "tag"), ("urls", "product-42\n<b>x</b>\nproduct-42"), host])).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[header::LOCATION], "/console/tasks/1");
    let page = text(send(&app, get("/console/tasks/1", Some(&id))).await).await;
    assert!(page.contains("tag:www.example.com:product-42") && page.contains("of 2."), "duplicates merged: {page}");
    assert!(page.contains("tag:www.example.com:&lt;b&gt;x&lt;/b&gt;") && !page.contains("<b>x</b>"), "{page}");
    let r = send(&app, submit(vec![("type", "regex"), ("urls", ".*"), host, ("confirm_all", "1")])).await;
    assert_eq!(r.headers()[header::LOCATION], "/console/tasks/2");
    let page = text(send(&app, get("/console/records?url=regex%3A", Some(&id))).await).await;
    assert!(page.contains("Records 1–1 of 1 matching.") && page.contains("regex:www.example.com:.*"), "{page}");
    let form = text(send(&app, get("/console/submit", Some(&id))).await).await;
    assert!(form.contains("cache tags 9998 of 10000") && form.contains("regexes 99 of 100"), "{form}");
}

#[tokio::test]
async fn soft_purges_of_urls_and_tags_are_submitted_and_shown() {
    let app = app().await;
    let (id, csrf) = sign_in(&app, "acme-secret-token").await;
    let submit = |fields: Vec<(&'static str, &'static str)>| {
        let mut form = vec![("csrf", csrf.as_str()), ("soft", "1")];
        form.extend(fields);
        post("/console/submit", Some(&id), &form)
    };
    let host = ("host", "www.example.com");
    let ban = "A soft purge is for refreshes of URLs or cache tags";
    for fields in [
        vec![("type", "dir"), ("urls", "http://www.example.com/d/")],
        vec![("type", "regex"), ("urls", "^/img/"), host],
        vec![("kind", "prefetch"), ("urls", "http://www.example.com/a")],
        vec![("kind", "refresh_then_prefetch"), ("urls", "http://www.example.com/a")],
    ] {
        let r = send(&app, submit(fields)).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let html = text(r).await;
        assert!(html.contains(ban), "{html}");
    }
    let r = send(&app, submit(vec![("urls", "http://www.example.com/a")])).await;
    assert_eq!(r.headers()[header::LOCATION], "/console/tasks/1");
    let r = send(&app, submit(vec![("type", "tag"), ("urls", "p-1"), host])).await;
    assert_eq!(r.headers()[header::LOCATION], "/console/tasks/2");
    let page = text(send(&app, get("/console/tasks/1", Some(&id))).await).await;
    assert!(page.contains("<b>http://www.example.com/a</b> (soft)"), "{page}");
    let records = text(send(&app, get("/console/records", Some(&id))).await).await;
    assert!(records.contains("refresh tag (soft)") && records.contains("refresh url (soft)"), "{records}");
    // Without the box, a purge is hard.
    let hard = post("/console/submit", Some(&id), &[("csrf", &csrf), ("urls", "http://www.example.com/b")]);
    assert_eq!(send(&app, hard).await.headers()[header::LOCATION], "/console/tasks/3");
    assert!(!text(send(&app, get("/console/tasks/3", Some(&id))).await).await.contains("(soft)"));
}

#[tokio::test]
async fn disabling_the_account_ends_its_console_sessions_at_the_next_request() {
    let app = app().await;
    let (id, _) = sign_in(&app, "acme-secret-token").await;
    assert_eq!(send(&app, get("/console/submit", Some(&id))).await.status(), StatusCode::OK);
    let disable = Request::patch("/admin/v1/accounts/acme")
        .header(header::AUTHORIZATION, "Bearer the-admin-token")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"disabled": true}"#))
        .unwrap();
    let r = send(&app, disable).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", text(r).await);
    let r = send(&app, get("/console/submit", Some(&id))).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "the session ended");
    assert_eq!(r.headers()[header::LOCATION], "/console/login");
    let enable = Request::patch("/admin/v1/accounts/acme")
        .header(header::AUTHORIZATION, "Bearer the-admin-token")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"disabled": false}"#))
        .unwrap();
    assert_eq!(send(&app, enable).await.status(), StatusCode::OK);
    let r = send(&app, get("/console/submit", Some(&id))).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "a session once ended stays ended: sign in again");
}
