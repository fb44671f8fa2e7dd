//! The web console in Debian's Chromium, driven over WebDriver (chromedriver on a free port of
//! 127.0.0.1, in a process group of its own that is stopped with the browser when the test
//! ends): sign-in, a refresh of 3 URLs against a real Varnish followed to 100 % by the task
//! page's SSE stream without a reload, per-node rows, a cache tag purge from the form, record
//! filters with their exact totals, the CSV downloaded by clicking its link, the task page's
//! fallback when its stream cannot be opened, sign-out, a wrong token, another account's task,
//! and markup that must not run. Screenshots are kept in a directory whose path is printed.

use crate::support::*;
use cachectl_testkit::Group;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Chromium under chromedriver; both stopped on drop (the session first, when the test
/// reaches `close`, else with chromedriver's process group).
struct Browser {
    client: Client,
    _driver: Group,
    _profile: tempfile::TempDir,
    /// Where Chromium saves downloads (set in the session's capabilities).
    downloads: tempfile::TempDir,
    shots: PathBuf,
}

impl Browser {
    async fn start() -> Self {
        let port = free_port();
        let driver = Group::spawn(
            Command::new("/usr/bin/chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("chromedriver (apt-get install chromium chromium-driver)");
        cachectl_testkit::caches::wait_port(port, "chromedriver").await;
        let profile = tempfile::tempdir().unwrap();
        let downloads = tempfile::tempdir().unwrap();
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-proxy-server".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        let prefs = json!({
            "download.default_directory": downloads.path(),
            "download.prompt_for_download": false,
            "download.directory_upgrade": true,
        });
        caps.insert(
            "goog:chromeOptions".to_owned(),
            json!({ "binary": "/usr/bin/chromium", "args": args, "prefs": prefs }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        let shots = tempfile::Builder::new().prefix("cachectl-console-screens-").tempdir().unwrap().keep();
        println!("console screenshots: {}", shots.display());
        Self { client, _driver: driver, _profile: profile, downloads, shots }
    }

    /// Saves the page at desktop and phone width as `<name>-desktop.png` and `<name>-phone.png`.
    async fn shoot(&self, name: &str) {
        for (suffix, w, h) in [("desktop", 1280, 900), ("phone", 390, 844)] {
            self.client.set_window_size(w, h).await.unwrap();
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(self.shots.join(format!("{name}-{suffix}.png")), png).unwrap();
        }
        self.client.set_window_size(1280, 900).await.unwrap();
    }

    /// The text of the element `css` names; found again when the page's script replaced it meanwhile.
    async fn text(&self, css: &str) -> String {
        let mut tries = 0;
        loop {
            let found = match self.client.find(Locator::Css(css)).await {
                Ok(element) => element.text().await,
                Err(e) => Err(e),
            };
            match found {
                Ok(text) => return text,
                Err(e) if tries >= 50 => panic!("{css}: {e}"),
                Err(_) => tries += 1,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to 10 s for the page's path to start with `prefix`, and returns the URL.
    async fn wait_path(&self, prefix: &str) -> url::Url {
        let start = Instant::now();
        loop {
            let url = self.client.current_url().await.unwrap();
            if url.path().starts_with(prefix) || start.elapsed() > Duration::from_secs(10) {
                assert!(url.path().starts_with(prefix), "{url} is not under {prefix}");
                return url;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to 10 s for the text of `css` to contain `needle`, and returns it.
    async fn wait_text(&self, css: &str, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let text = self.text(css).await;
            if text.contains(needle) || start.elapsed() > Duration::from_secs(10) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to 10 s for Chromium to finish downloading `name`, and returns its text.
    async fn downloaded(&self, name: &str) -> String {
        let path = self.downloads.path().join(name);
        let start = Instant::now();
        loop {
            // Chromium reserves `<name>` as an empty file, writes `<name>.crdownload` and renames
            // it over the placeholder once the download is complete: the download is there when
            // no `.crdownload` is left and the file has its content.
            let listing: Vec<_> =
                std::fs::read_dir(self.downloads.path()).unwrap().flatten().map(|e| e.file_name()).collect();
            let in_progress = listing.iter().any(|n| n.to_string_lossy().ends_with(".crdownload"));
            if !in_progress
                && let Ok(text) = std::fs::read_to_string(&path)
                && !text.is_empty()
            {
                return text;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no {name} downloaded: {listing:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.client.find(Locator::Css(css)).await.unwrap().attr(name).await.unwrap()
    }

    async fn count(&self, css: &str) -> usize {
        self.client.find_all(Locator::Css(css)).await.unwrap().len()
    }

    async fn js(&self, script: &str) -> serde_json::Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    async fn sign_in(&self, server: &Cachectl, token: &str) {
        self.client.goto(&server.url("/console/login")).await.unwrap();
        self.client.find(Locator::Id("token")).await.unwrap().send_keys(token).await.unwrap();
        self.client.find(Locator::Css("main button[type=submit]")).await.unwrap().click().await.unwrap();
    }
}

/// An edge that answers every request after `delay`: it keeps items processing long enough for
/// the task page to show them moving.
async fn slow_edge(delay: Duration) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(move || async move {
        tokio::time::sleep(delay).await;
        "purged"
    });
    (port, tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_chromium_signs_in_follows_a_refresh_live_filters_exports_and_signs_out() {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    let (slow_port, _slow) = slow_edge(Duration::from_millis(2500)).await;
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}{}",
        fast_worker("10s"),
        edge("v1", "varnish", &varnish.address(), "edge"),
        edge("slow", "varnish", &format!("127.0.0.1:{slow_port}"), "edge")
    ))
    .await;
    let b = Browser::start().await;

    // A wrong token is refused with a sentence.
    b.sign_in(&server, "not-a-token").await;
    assert!(b.wait_text("main", "unknown token").await.contains("Sign-in failed: unknown token."));
    b.shoot("sign-in-error").await;

    b.sign_in(&server, TOKEN).await;
    assert!(b.wait_text("h1", "Overview").await.contains("Overview"));
    let cookie = b.client.get_named_cookie("cachectl_console").await.unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(cookie.same_site().map(|s| s.to_string()).as_deref(), Some("Strict"));
    assert_eq!(cookie.value().len(), 64);

    let (task_url, task_id, urls) = submit_and_follow(&b, &server).await;
    records_and_csv(&b, &server, &urls).await;
    stream_refused_falls_back_to_the_fragment(&b, &server).await;

    // Sign out: the session is gone.
    b.client.find(Locator::Css("form.signout button")).await.unwrap().click().await.unwrap();
    b.wait_path("/console/login").await;
    b.client.goto(task_url.as_str()).await.unwrap();
    b.wait_path("/console/login").await;

    // Another account: acme's task does not exist for it.
    b.sign_in(&server, "other-secret-token").await;
    // The sign-in's redirect must land before the next navigation, or it overtakes it.
    assert!(b.wait_text("h1", "Overview").await.contains("Overview"));
    b.client.goto(&server.url(&format!("/console/tasks/{task_id}"))).await.unwrap();
    let main = b.wait_text("main", "Task not found.").await;
    assert!(main.contains("Task not found."), "{main}");
    b.shoot("not-found").await;
    b.client.clone().close().await.unwrap();
}

/// The form refuses an invalid line, then submits 3 URLs; the task page follows them to 100 %
/// through its SSE stream, without a reload. The task page's URL, the task id and the URLs.
async fn submit_and_follow(b: &Browser, server: &Cachectl) -> (url::Url, i64, [String; 3]) {
    // An invalid line is shown with its reason, escaped, and nothing is submitted.
    b.client.goto(&server.url("/console/submit")).await.unwrap();
    assert!(b.text("p.hint").await.contains("refresh URLs 10000 of 10000"));
    let urls = ["a", "b", "c"].map(|n| format!("http://www.example.com/console-{n}.css"));
    let evil = "http://evil.test/<script>window.__pwned=1</script>";
    b.client.find(Locator::Id("urls")).await.unwrap().send_keys(&format!("{}\n{evil}", urls.join("\n"))).await.unwrap();
    b.client.find(Locator::Css("main button[type=submit]")).await.unwrap().click().await.unwrap();
    let invalid = b.wait_text("main", "invalid line").await;
    assert!(
        invalid.contains(&format!("line 4: {evil}")) && invalid.contains("not one of the account's domains"),
        "{invalid}"
    );
    assert_eq!(b.js("return typeof window.__pwned").await, json!("undefined"));
    b.shoot("submit-invalid").await;

    // Fixed: the 3 URLs go through and the task page follows them live.
    let area = b.client.find(Locator::Id("urls")).await.unwrap();
    area.clear().await.unwrap();
    area.send_keys(&urls.join("\n")).await.unwrap();
    b.client.find(Locator::Css("main button[type=submit]")).await.unwrap().click().await.unwrap();
    let task_url = b.wait_path("/console/tasks/").await;
    let task_id: i64 = task_url.path().rsplit('/').next().unwrap().parse().unwrap();
    b.js("window.__samePage = 42").await;
    let first = b.text("#progress-text").await;
    assert!(!first.starts_with("100 %"), "the slow edge keeps the task running at first: {first}");
    b.shoot("task-running").await;
    let start = Instant::now();
    while !b.text("#progress-text").await.starts_with("100 %") {
        assert!(start.elapsed() < Duration::from_secs(20), "the task page never reached 100 %");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(b.js("return window.__samePage").await, json!(42), "the page must not have been reloaded");
    // Driven by the stream: events arrived (the live parts while it ran, then `done`), the
    // stream was closed at the end, and the fragment fallback was never needed.
    let start = Instant::now();
    while b.attr("#task", "data-stream").await.as_deref() != Some("done") {
        assert!(start.elapsed() < Duration::from_secs(5), "the script never closed the stream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events: u32 = b.attr("#task", "data-events").await.unwrap().parse().unwrap();
    assert!(events >= 2, "the page received {events} events");
    let fetched = b.js("return performance.getEntriesByType('resource').map(e => e.name)").await;
    let fetched: Vec<String> = serde_json::from_value(fetched).unwrap();
    assert!(!fetched.iter().any(|u| u.ends_with("/live")), "the fallback fetched the fragment: {fetched:?}");
    let streams = fetched.iter().filter(|u| u.ends_with("/events")).count();
    println!("task page: {events} events over {streams} stream(s)");
    assert_eq!(b.attr("#live", "data-state").await.as_deref(), Some("completed"));
    // Screen readers are told the progress sentence through the page's `role=status` element.
    let announced = b.js("return document.getElementById('announce').textContent").await;
    assert!(announced.as_str().is_some_and(|t| t.starts_with("100 % done: 3 completed")), "{announced}");
    assert!(b.text("#live").await.contains("completed"));
    assert_eq!(b.count("#nodes tr.item").await, 3);
    assert_eq!(b.count("#nodes tr.node").await, 6, "each URL on v1 and slow");
    let nodes = b.text("#nodes").await;
    assert!(nodes.contains("↳ v1") && nodes.contains("↳ slow") && nodes.contains("ok"), "{nodes}");
    b.shoot("task-done").await;

    (task_url, task_id, urls)
}

/// Markup in records is not run; the filters and the CSV export; the overview.
async fn records_and_csv(b: &Browser, server: &Cachectl, urls: &[String; 3]) {
    // A cache tag purge from the form; markup in the record (a tag may hold '<' and '/') is
    // shown as text, never run.
    let tag = "<svg/onload=window.__pwned=1>";
    b.client.goto(&server.url("/console/submit")).await.unwrap();
    b.client.find(Locator::Id("type")).await.unwrap().select_by_value("tag").await.unwrap();
    b.client.find(Locator::Id("urls")).await.unwrap().send_keys(tag).await.unwrap();
    b.client.find(Locator::Css("main button[type=submit]")).await.unwrap().click().await.unwrap();
    // Without a host, the form says so and submits nothing.
    assert!(b.wait_text("main", "Enter the host").await.contains("Enter the host whose objects the cache tags purge."));
    b.client.find(Locator::Id("host")).await.unwrap().send_keys("www.example.com").await.unwrap();
    b.shoot("submit-tag").await;
    b.client.find(Locator::Css("main button[type=submit]")).await.unwrap().click().await.unwrap();
    b.wait_path("/console/tasks/").await;
    assert!(b.wait_text("#nodes", "tag:").await.contains(&format!("tag:www.example.com:{tag}")));
    assert_eq!(b.js("return typeof window.__pwned").await, json!("undefined"));
    b.client.goto(&server.url("/console/records")).await.unwrap();
    assert_eq!(b.count("#records tbody tr").await, 4);
    assert!(b.text("#records").await.contains(&format!("tag:www.example.com:{tag}")));
    assert_eq!(b.js("return typeof window.__pwned").await, json!("undefined"));
    assert_eq!(b.count("#records svg").await, 0);
    b.shoot("records").await;

    // Filters: URL substring, then status and kind.
    b.client.find(Locator::Id("url")).await.unwrap().send_keys("console-b").await.unwrap();
    b.client.find(Locator::Css("form.filters button")).await.unwrap().click().await.unwrap();
    let start = Instant::now();
    while !b.client.current_url().await.unwrap().as_str().contains("url=console-b") {
        assert!(start.elapsed() < Duration::from_secs(10), "the filter form never navigated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.count("#records tbody tr").await, 1);
    assert!(b.text("#records").await.contains("console-b.css"));
    assert_eq!(b.text("#total").await, "Records 1–1 of 1 matching.");
    b.client.goto(&server.url("/console/records?status=failed&kind=refresh")).await.unwrap();
    assert_eq!(b.count("#records tbody tr").await, 0);
    assert_eq!(b.text("#total").await, "No records match: 0 in total.");

    // The CSV of the filtered records, downloaded by clicking its link.
    b.client.goto(&server.url("/console/records?url=console-")).await.unwrap();
    assert_eq!(b.text("#total").await, "Records 1–3 of 3 matching.");
    b.client.find(Locator::Id("csv")).await.unwrap().click().await.unwrap();
    let csv = b.downloaded("cachectl-records.csv").await;
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 4, "{csv}");
    assert_eq!(rows[0], "id,task_id,created_at,kind,type,url,status,finished_at,reason");
    for (row, url) in rows[1..].iter().zip(urls.iter().rev()) {
        let fields: Vec<&str> = row.split(',').collect();
        assert_eq!(
            (fields[3], fields[4], fields[5], fields[6]),
            ("refresh", "url", url.as_str(), "completed"),
            "{csv}"
        );
    }

    b.client.goto(&server.url("/console/")).await.unwrap();
    assert!(b.text("#node-list").await.contains("slow"));
    assert_eq!(b.count("#chart rect.bar").await, 24);
    b.shoot("overview").await;
}

/// A proxy in front of `server` that answers every task stream with 502 and passes everything
/// else through (cookies are per host, not per port, so the browser's session goes along).
async fn proxy_refusing_streams(server: &Cachectl) -> (u16, tokio::task::JoinHandle<()>) {
    use axum::body::Body;
    use axum::http::{Request, Response, StatusCode};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = server.url("");
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let app = axum::Router::new().fallback(move |request: Request<Body>| {
        let (client, upstream) = (client.clone(), upstream.clone());
        async move {
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
            if request.uri().path().ends_with("/events") {
                return Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(Body::from("no streams here"))
                    .unwrap();
            }
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let mut forward = client.request(parts.method.clone(), format!("{upstream}{path}")).body(body);
            for (name, value) in &parts.headers {
                if name != "host" {
                    forward = forward.header(name, value);
                }
            }
            let answer = forward.send().await.unwrap();
            let mut response = Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                response = response.header(name, value);
            }
            response.body(Body::from(answer.bytes().await.unwrap())).unwrap()
        }
    });
    (port, tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }))
}

/// When the browser cannot open the stream at all (here a proxy answers it with 502), the page
/// fetches the fragment every 2 s and still reaches the task's final state without a reload.
async fn stream_refused_falls_back_to_the_fragment(b: &Browser, server: &Cachectl) {
    let (port, proxy) = proxy_refusing_streams(server).await;
    let through = |path: &str| format!("http://127.0.0.1:{port}{path}");
    b.client.goto(&through("/console/submit")).await.unwrap();
    let area = b.client.find(Locator::Id("urls")).await.unwrap();
    area.send_keys("http://www.example.com/console-fallback.css").await.unwrap();
    b.client.find(Locator::Css("main button[type=submit]")).await.unwrap().click().await.unwrap();
    let task_url = b.wait_path("/console/tasks/").await;
    assert_eq!(task_url.port(), Some(port), "{task_url}");
    b.js("window.__samePage = 43").await;
    let start = Instant::now();
    while !b.text("#progress-text").await.starts_with("100 %") {
        assert!(start.elapsed() < Duration::from_secs(20), "the task page never reached 100 % without its stream");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(b.js("return window.__samePage").await, json!(43), "the page must not have been reloaded");
    assert_eq!(b.attr("#task", "data-stream").await.as_deref(), Some("done"));
    assert_eq!(b.attr("#task", "data-events").await.as_deref(), Some("0"), "no event came through the proxy");
    let fetched = b.js("return performance.getEntriesByType('resource').map(e => e.name)").await;
    let fetched: Vec<String> = serde_json::from_value(fetched).unwrap();
    assert!(fetched.iter().any(|u| u.ends_with("/live")), "the fragment was fetched: {fetched:?}");
    assert_eq!(b.count("#nodes tr.node").await, 2, "{}", b.text("#nodes").await);
    // Back to the server itself for what follows.
    b.client.goto(&server.url("/console/")).await.unwrap();
    assert!(b.wait_text("h1", "Overview").await.contains("Overview"));
    proxy.abort();
}
