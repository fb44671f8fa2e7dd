//! Load generators and their figures: `wrk` driven as a child process (its `--latency` output
//! parsed), and a built-in closed-loop Rust client used where wrk is missing or cannot speak
//! the request (signed BCE requests, the smoke test). Latency percentiles are computed here.

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
    let mut samples = Vec::new();
    let mut errors = 0;
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
        client: "rust".into(),
        connections,
        requests: samples.len() as u64,
        rps,
        p50_ms: percentile_ms(&samples, 0.50),
        p99_ms: percentile_ms(&samples, 0.99),
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
