//! A Baidu GEO client for scenario 3: lists a window of account 0's purge records page by page,
//! following `nextMarker` to the last page, every request signed with BCE v1 (the server's own
//! signing functions). wrk cannot sign per request, so GEO is always measured with this client.

use crate::load::{LoadFigures, gather};
use crate::loader::Timestamp;
use anyhow::{Context, ensure};
use cachectl_server::api::bce::auth;
use std::time::{Duration, Instant};

const AK: &str = "AK_BENCH";
const SK: &str = "SK_BENCH";
const SITE: &str = "acct00.test";

/// One window of GEO records.
#[derive(Debug, Clone)]
pub struct GeoWindow {
    port: u16,
    start: String,
    end: String,
}

fn rfc3339(at: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(at).expect("a valid time").format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

impl GeoWindow {
    /// The window `[from, to]` (seconds, `to` inclusive as the dialect reads it).
    #[must_use]
    pub fn new(port: u16, from: Timestamp, to: Timestamp) -> Self {
        Self { port, start: rfc3339(from), end: rfc3339(to) }
    }

    /// The request, for the report.
    #[must_use]
    pub fn describe(&self) -> String {
        format!("GET /v2/geo/cache/purge?site={SITE}&startTime={}&endTime={}&marker=… (signed)", self.start, self.end)
    }

    /// The path with its query and the headers of one page request, signed now (a signature
    /// stays valid for 1,800 s).
    fn signed(&self, marker: Option<&str>) -> (String, Vec<(&'static str, String)>) {
        let mut query = vec![
            ("site".to_owned(), SITE.to_owned()),
            ("startTime".to_owned(), self.start.clone()),
            ("endTime".to_owned(), self.end.clone()),
        ];
        if let Some(m) = marker {
            query.push(("marker".to_owned(), m.to_owned()));
        }
        let path = "/v2/geo/cache/purge";
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let headers = vec![
            ("host".to_owned(), format!("127.0.0.1:{}", self.port)),
            ("content-length".to_owned(), "0".to_owned()),
            ("x-bce-date".to_owned(), now.clone()),
        ];
        let request = auth::SignedRequest { method: "GET", path, query: &query, headers: &headers };
        let names: Vec<String> = headers.iter().map(|(n, _)| n.clone()).collect();
        let key = auth::signing_key(SK, AK, &now, 1800);
        let signature = auth::hmac_sha256_hex(key.as_bytes(), &auth::canonical_request(&request, &names));
        let qs: String = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&query).finish();
        let authorization = format!("bce-auth-v1/{AK}/{now}/1800//{signature}");
        (
            format!("{path}?{qs}"),
            vec![("x-bce-date", now), ("content-length", "0".to_owned()), ("authorization", authorization)],
        )
    }

    /// One signed page request; returns (records on the page, next marker).
    ///
    /// # Errors
    /// The request fails or is refused.
    pub async fn page(&self, client: &reqwest::Client, marker: Option<&str>) -> anyhow::Result<(u64, Option<String>)> {
        let (path_and_query, headers) = self.signed(marker);
        let mut request = client.get(format!("http://127.0.0.1:{}{path_and_query}", self.port));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request.send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        ensure!(status.is_success(), "GEO list refused ({status}): {}", String::from_utf8_lossy(&body));
        // Only what the walk needs is decoded: the load generator shares the server's two cores,
        // and building a JSON tree of every page would cost it more than the server's answer.
        let page: GeoPage = serde_json::from_slice(&body)?;
        let next = if page.is_truncated { Some(page.next_marker.context("nextMarker")?) } else { None };
        Ok((page.details.len() as u64, next))
    }

    /// Walks every page once; returns the records seen, each page's time in µs, and the marker
    /// each page was asked with, in order.
    ///
    /// # Errors
    /// A request fails.
    pub async fn walk(&self, client: &reqwest::Client) -> anyhow::Result<(u64, Vec<u64>, Vec<Option<String>>)> {
        let (mut total, mut marker, mut times, mut markers) = (0, None::<String>, Vec::new(), Vec::new());
        loop {
            let sent = Instant::now();
            let (n, next) = self.page(client, marker.as_deref()).await?;
            times.push(u64::try_from(sent.elapsed().as_micros())?);
            total += n;
            markers.push(marker);
            marker = next;
            if marker.is_none() {
                return Ok((total, times, markers));
            }
        }
    }

    /// A wrk script that sends the page requests of a walk (`markers`, as `walk` returns them)
    /// over and over, each connection from its own place in the walk, each request signed now:
    /// the server verifies every signature as it would a client's, and the load generator costs
    /// what wrk costs (signing per request and decoding pages, the Rust client spends more of
    /// the two shared cores than the server's answer takes).
    #[must_use]
    pub fn wrk_script(&self, markers: &[Option<String>]) -> String {
        let mut lua = String::from("local requests = {\n");
        for marker in markers {
            let (path, headers) = self.signed(marker.as_deref());
            // The Host header is written out: wrk fills in its own only after the script loaded.
            let host = format!("[\"Host\"] = \"127.0.0.1:{}\"", self.port);
            let headers: Vec<String> =
                std::iter::once(host).chain(headers.iter().map(|(n, v)| format!("[\"{n}\"] = \"{v}\""))).collect();
            lua.push_str(&format!("  wrk.format(\"GET\", \"{path}\", {{{}}}),\n", headers.join(", ")));
        }
        lua.push_str(
            "}\nlocal next_request = 0\n\
             setup = function(thread) thread:set(\"first\", math.random(#requests)) end\n\
             init = function(args) next_request = first or 1 end\n\
             request = function()\n  local r = requests[next_request]\n  next_request = next_request % #requests + 1\n  return r\nend\n",
        );
        lua
    }

    /// The page requests of a walk (`markers`, as `walk` returns them), each signed now, for the
    /// paced client: a signature stays valid for 1,800 s, longer than any load.
    #[must_use]
    pub fn prepared(&self, markers: &[Option<String>]) -> Vec<crate::load::Prepared> {
        markers
            .iter()
            .map(|marker| {
                let (path, headers) = self.signed(marker.as_deref());
                crate::load::Prepared { url: format!("http://127.0.0.1:{}{path}", self.port), headers }
            })
            .collect()
    }

    /// `connections` clients walking the window over and over for `duration`; one sample per
    /// page request.
    ///
    /// # Errors
    /// The client cannot be built or a task panics.
    pub async fn load(&self, connections: usize, duration: Duration) -> anyhow::Result<LoadFigures> {
        let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(connections).build()?;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (client, me) = (client.clone(), self.clone());
            tasks.push(tokio::spawn(async move {
                let (mut samples, mut errors) = (Vec::new(), 0u64);
                let mut marker: Option<String> = None;
                while start.elapsed() < duration {
                    let sent = Instant::now();
                    match me.page(&client, marker.as_deref()).await {
                        Ok((_, next)) => marker = next,
                        Err(_) => {
                            errors += 1;
                            marker = None;
                        }
                    }
                    samples.push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
                (samples, errors)
            }));
        }
        gather("rust", connections, start, tasks).await
    }
}

/// The parts of a GEO record page the walk reads.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeoPage {
    details: Vec<serde::de::IgnoredAny>,
    is_truncated: bool,
    next_marker: Option<String>,
}
