//! Load generators and their figures: `wrk` driven as a child process (its `--latency` output
//! parsed), a built-in closed-loop Rust client used where wrk is missing or cannot speak
//! the request (signed BCE requests, the smoke test), and a paced (open-loop) Rust client that
//! offers a fixed rate. Latency percentiles are computed here.

use anyhow::{Context, bail};
use serde::Serialize;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFigures {
    /// `wrk` or `rust`.
    pub client: String,
    /// Concurrent connections.
    pub connections: usize,
    /// Requests completed.
    pub requests: u64,
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Answers that were not 2xx (or transport errors).
    pub errors: u64,
}

/// `sorted[q]` of sorted microsecond samples, in ms.
#[must_use]
pub fn percentile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let i = ((sorted_us.len() as f64 - 1.0) * q).round() as usize;
    #[allow(clippy::cast_precision_loss)]
    let ms = sorted_us[i.min(sorted_us.len() - 1)] as f64 / 1000.0;
    ms
}

/// Runs `wrk` against `url` for `seconds` with `connections` over `threads`, optionally with a
/// Lua script, and parses its summary.
///
/// # Errors
/// wrk fails or its output does not parse.
pub fn wrk(
    url: &str,
    connections: usize,
    threads: usize,
    seconds: u64,
    script: Option<&Path>,
) -> anyhow::Result<LoadFigures> {
    let mut command = Command::new("wrk");
    command.args(["-t", &threads.to_string(), "-c", &connections.to_string(), "-d", &format!("{seconds}s")]).args([
        "--latency",
        "--timeout",
        "5s",
    ]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let out = command.arg(url).output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text, connections).with_context(|| format!("parsing wrk output:\n{text}"))
}

fn parse_duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(number / 1000.0),
        "ms" => Some(number),
        "s" => Some(number * 1000.0),
        "m" => Some(number * 60_000.0),
        _ => None,
    }
}

/// Parses the summary `wrk --latency` prints.
///
/// # Errors
/// A figure is missing.
pub fn parse_wrk(text: &str, connections: usize) -> anyhow::Result<LoadFigures> {
    let mut figures = LoadFigures {
        client: "wrk".into(),
        connections,
        requests: 0,
        rps: 0.0,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        errors: 0,
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => figures.p50_ms = parse_duration_ms(v).context("p50")?,
            ["99%", v] => figures.p99_ms = parse_duration_ms(v).context("p99")?,
            ["Requests/sec:", v] => figures.rps = v.parse()?,
            [n, "requests", "in", ..] => figures.requests = n.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => figures.errors += n.parse::<u64>()?,
            ["Socket", "errors:", rest @ ..] => {
                for w in rest {
                    figures.errors += w.trim_end_matches(',').parse::<u64>().unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    if figures.requests == 0 || figures.p99_ms.is_nan() {
        bail!("no requests or no latency distribution");
    }
    Ok(figures)
}

/// One request of the Rust client: builds it from the connection's counter.
pub type MakeRequest = Arc<dyn Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync>;

/// A closed-loop client: `connections` tasks each send one request after another (built by
/// `make` from a global counter) for `duration`; every answer must be 2xx to count as a success.
///
/// # Errors
/// The HTTP client cannot be built.
pub async fn rust_load(connections: usize, duration: Duration, make: MakeRequest) -> anyhow::Result<LoadFigures> {
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(connections).build()?;
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, counter, make) = (client.clone(), counter.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0u64;
            while start.elapsed() < duration {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let sent = Instant::now();
                match make(&client, n).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                    }
                    _ => errors += 1,
                }
                samples.push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            (samples, errors)
        }));
    }
    gather("rust", connections, start, tasks).await
}

/// One client task of a load: it returns its latency samples (µs) and its errors.
pub(crate) type ClientTask = tokio::task::JoinHandle<(Vec<u64>, u64)>;

/// Joins the client tasks of a load that started at `start` and sums up what they measured.
///
/// # Errors
/// A task panicked.
pub(crate) async fn gather(
    client: &str,
    connections: usize,
    start: Instant,
    tasks: Vec<ClientTask>,
) -> anyhow::Result<LoadFigures> {
    let (mut samples, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (s, e) = task.await?;
        samples.extend(s);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    samples.sort_unstable();
    #[allow(clippy::cast_precision_loss)]
    let rps = samples.len() as f64 / elapsed;
    Ok(LoadFigures {
        client: client.into(),
        connections,
        requests: samples.len() as u64,
        rps,
        p50_ms: percentile_ms(&samples, 0.50),
        p99_ms: percentile_ms(&samples, 0.99),
        errors,
    })
}

/// How late tokio's timer may fire a paced request without the lateness counting as latency.
pub(crate) const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// Waits until request `index` of a load paced at `rate` a second from `start` is due, and
/// returns the moment its latency counts from: its scheduled moment when the client is late (so
/// that a server falling behind is charged for the wait), else when the timer fired, at most
/// `TIMER_RESOLUTION` after it. `None` once the request would fall past `duration`.
pub(crate) async fn paced_slot(
    start: tokio::time::Instant,
    index: usize,
    rate: f64,
    duration: Duration,
) -> Option<tokio::time::Instant> {
    #[allow(clippy::cast_precision_loss)]
    let at = Duration::from_secs_f64(index as f64 / rate);
    if at >= duration {
        return None;
    }
    let scheduled = start + at;
    if tokio::time::Instant::now() < scheduled {
        tokio::time::sleep_until(scheduled).await;
        Some(tokio::time::Instant::now().min(scheduled + TIMER_RESOLUTION))
    } else {
        Some(scheduled)
    }
}

/// One request of the paced client, prepared before the load: its URL and headers.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The whole URL (`http://127.0.0.1:PORT/path?query`).
    pub url: String,
    /// Headers besides `Host`.
    pub headers: Vec<(&'static str, String)>,
}

impl Prepared {
    /// A plain GET of `url`.
    #[must_use]
    pub fn get(url: String) -> Self {
        Self { url, headers: Vec::new() }
    }
}

/// A prepared request as the paced client sends it: its target and headers, parsed once.
pub(crate) struct Target {
    pub(crate) path: http::uri::PathAndQuery,
    pub(crate) headers: http::HeaderMap,
}

pub(crate) type Body = http_body_util::Empty<hyper::body::Bytes>;

/// One HTTP/1.1 connection of the paced client.
pub(crate) async fn connect(
    address: std::net::SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Body>> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    // Drives the connection; it ends when the sender is dropped or the server closes.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends `target` on `sender` and reads the whole answer; `Ok(false)` for a status other than 2xx.
pub(crate) async fn exchange(
    sender: &mut hyper::client::conn::http1::SendRequest<Body>,
    target: &Target,
) -> anyhow::Result<bool> {
    use http_body_util::BodyExt as _;
    let mut request = http::Request::new(Body::new());
    *request.uri_mut() = http::Uri::from(target.path.clone());
    request.headers_mut().clone_from(&target.headers);
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let ok = response.status().is_success();
    response.into_body().collect().await?;
    Ok(ok)
}

/// An open-loop client that offers `rate` requests a second over `connections` connections for
/// `duration`, cycling through `requests`: connection `k` sends its `n`-th request at
/// `(k + n × connections) / rate` seconds after the start. A request whose moment passed while
/// the connection still waited for the previous answer goes out at once, and its latency runs
/// from its scheduled moment, not from when it could go out: a server that falls behind is
/// charged for the wait it caused (no coordinated omission, as wrk2 measures). A request that
/// was on time is timed from when its timer fired, but from 1 ms after its moment at the
/// latest: tokio's timer has a resolution of 1 ms, and up to that much lateness is the
/// client's; a timer that fires later still (the client starved of CPU by a busy server) is
/// charged to the server. Before the start every connection sends one request that is not
/// counted, so that no sample includes a TCP handshake.
///
/// The client shares the two cores with the server, so it is built to cost little, as wrk
/// does: one thread of its own with a single-threaded runtime (no wake-ups across threads), and
/// HTTP/1.1 on hyper's own connections, one per connection task, instead of reqwest's pool.
///
/// # Errors
/// `requests` is empty or not all for one `http://` server, a connection cannot be opened, a
/// warm-up request fails, or a task panics.
pub async fn paced_load(
    connections: usize,
    rate: f64,
    duration: Duration,
    requests: Arc<Vec<Prepared>>,
) -> anyhow::Result<LoadFigures> {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(paced(
            connections,
            rate,
            duration,
            &requests,
        ))
    })
    .await?
}

async fn paced(
    connections: usize,
    rate: f64,
    duration: Duration,
    requests: &[Prepared],
) -> anyhow::Result<LoadFigures> {
    anyhow::ensure!(
        !requests.is_empty() && connections > 0 && rate > 0.0,
        "the paced client needs a request, a connection and a rate above 0"
    );
    let first: http::Uri = requests[0].url.parse()?;
    let authority = first.authority().context("the paced client's URL has no host")?.clone();
    let address: std::net::SocketAddr = authority.as_str().parse().context("the paced client's host is an IP:port")?;
    let mut targets = Vec::with_capacity(requests.len());
    for r in requests.iter() {
        let uri: http::Uri = r.url.parse()?;
        anyhow::ensure!(uri.authority() == Some(&authority), "the paced client's requests go to one server");
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, http::HeaderValue::from_str(authority.as_str())?);
        for (name, value) in &r.headers {
            headers.insert(http::HeaderName::try_from(*name)?, http::HeaderValue::from_str(value)?);
        }
        let path = uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        targets.push(Target { path, headers });
    }
    let targets = Arc::new(targets);
    // Warm-up: every connection opened and one uncounted request answered on it.
    let warm = (0..connections).map(|k| {
        let targets = targets.clone();
        async move {
            let mut sender = connect(address).await?;
            exchange(&mut sender, &targets[k % targets.len()]).await?;
            anyhow::Ok(sender)
        }
    });
    let senders = futures::future::try_join_all(warm).await?;
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let mut tasks = Vec::new();
    for (k, mut sender) in senders.into_iter().enumerate() {
        let targets = targets.clone();
        tasks.push(tokio::spawn(async move {
            let (mut samples, mut errors) = (Vec::new(), 0u64);
            for n in 0.. {
                let index = k + n * connections;
                let Some(from) = paced_slot(start, index, rate, duration).await else { break };
                match exchange(&mut sender, &targets[index % targets.len()]).await {
                    Ok(true) => {}
                    Ok(false) => errors += 1,
                    Err(_) => {
                        // The connection failed: counted, and the next request gets a new one.
                        errors += 1;
                        if let Ok(fresh) = connect(address).await {
                            sender = fresh;
                        }
                    }
                }
                samples.push(u64::try_from(from.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            (samples, errors)
        }));
    }
    gather("paced", connections, start.into_std(), tasks).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on 127.0.0.1 that answers every request after `delay`, one request at a time
    /// per connection; returns its URL.
    async fn slow_server(delay: Duration) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().fallback(move || async move {
            tokio::time::sleep(delay).await;
            "ok"
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://127.0.0.1:{port}/")
    }

    #[tokio::test]
    async fn the_paced_client_sends_its_schedule_and_times_what_it_asks_on_time() {
        // 200 q/s over 4 connections for 0.5 s: 100 requests, each answered in 2 ms, well
        // inside its connection's 20 ms between requests.
        let url = slow_server(Duration::from_millis(2)).await;
        let f = paced_load(4, 200.0, Duration::from_millis(500), Arc::new(vec![Prepared::get(url)])).await.unwrap();
        assert_eq!((f.requests, f.errors, f.client.as_str()), (100, 0, "paced"));
        assert!((150.0..=210.0).contains(&f.rps), "about the offered rate: {f:?}");
        assert!(f.p50_ms >= 2.0, "no answer is faster than the server: {f:?}");
    }

    #[tokio::test]
    async fn a_server_that_falls_behind_is_charged_for_the_wait_it_caused() {
        // One connection offered 100 q/s (a request every 10 ms) against a server that takes
        // 30 ms: request n is answered about 30 n ms after the start but was due at 10 n ms, so
        // the waits add up. Timed from when each request went out, every sample would be ~30 ms.
        let url = slow_server(Duration::from_millis(30)).await;
        let f = paced_load(1, 100.0, Duration::from_millis(300), Arc::new(vec![Prepared::get(url)])).await.unwrap();
        assert_eq!((f.requests, f.errors), (30, 0));
        // The last request was due at 290 ms and answered at about 900 ms.
        assert!(f.p99_ms >= 400.0, "the queue the server built counts in the latency: {f:?}");
        assert!(f.rps < 50.0, "the server answered fewer than offered: {f:?}");
    }

    #[test]
    fn parses_wrk_latency_output() {
        let text = "Running 2s test @ http://127.0.0.1:1/healthz\n  1 threads and 8 connections\n\
            Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   210.00us  100.00us   2.00ms   90.00%\n\
            Latency Distribution\n     50%  190.00us\n     75%  230.00us\n     90%  300.00us\n     99%    1.20ms\n\
            80000 requests in 2.00s, 10.00MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:  40000.00\n";
        let f = parse_wrk(text, 8).unwrap();
        assert_eq!(f.requests, 80_000);
        assert!((f.p50_ms - 0.19).abs() < 1e-9);
        assert!((f.p99_ms - 1.2).abs() < 1e-9);
        assert!((f.rps - 40_000.0).abs() < 1e-9);
        assert_eq!(f.errors, 3);
    }

    #[test]
    fn percentiles_of_sorted_samples() {
        let samples: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert!(
            (percentile_ms(&samples, 0.5) - 51.0).abs() < 1e-9 || (percentile_ms(&samples, 0.5) - 50.0).abs() < 1e-9
        );
        assert!((percentile_ms(&samples, 0.99) - 99.0).abs() < 1.01);
    }
}
