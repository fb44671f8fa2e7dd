//! The monitoring that ships with cachectl (docs/monitoring.md): the Grafana dashboard
//! (deploy/grafana/cachectl.json) is linted and its every query parsed by promtool; the alert
//! rules (deploy/prometheus/) pass `promtool check rules` and their unit tests; and every metric
//! the dashboard and the rules use is exposed by a running server after real traffic through a
//! real Varnish, one item completing and one failing on a node that does not answer.

use crate::support::*;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const REFRESH: &str = "/v2/cache/refresh";

fn dashboard_path() -> PathBuf {
    repo_root().join("deploy/grafana/cachectl.json")
}

fn rules_dir() -> PathBuf {
    repo_root().join("deploy/prometheus")
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(dashboard_path()).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("deploy/grafana/cachectl.json is not JSON: {e}"))
}

/// Debian's promtool (package `prometheus`, which scripts/test.sh installs when missing).
fn promtool() -> Command {
    let path = PathBuf::from("/usr/bin/promtool");
    assert!(path.exists(), "promtool is missing: install Debian's prometheus package (scripts/test.sh does)");
    Command::new(path)
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// Every PromQL expression of the dashboard: the panels' queries and the variables' queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries: Vec<String> = panels(dashboard)
        .iter()
        .filter_map(|p| p["targets"].as_array())
        .flatten()
        .map(|t| t["expr"].as_str().unwrap_or_default().to_owned())
        .collect();
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            queries.push(q.to_owned());
        }
    }
    queries
}

/// The metric names `text` mentions: every `cachectl_…` word.
fn cachectl_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("cachectl_") {
        let preceded = text.len() - rest.len() + at;
        let word_start = preceded == 0 || !text.as_bytes()[preceded - 1].is_ascii_alphanumeric();
        let tail = &rest[at..];
        let len = tail.bytes().take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_').count();
        if word_start {
            names.insert(tail[..len].to_owned());
        }
        rest = &tail[len..];
    }
    names
}

/// The identifiers directly followed by `{` in a PromQL expression: metric selectors.
fn selectors(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'{' && i > 0 {
            let start = bytes[..i]
                .iter()
                .rposition(|c| !(c.is_ascii_alphanumeric() || *c == b'_' || *c == b':'))
                .map_or(0, |p| p + 1);
            if start < i {
                out.push(expr[start..i].to_owned());
            }
        }
    }
    out
}

/// A dashboard query as Prometheus sees it once Grafana filled in its variables.
fn as_prometheus(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$node", ".*")
}

#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "a title");
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "a uid of at most 40 characters");
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "a current schemaVersion");
    assert!(d.get("__inputs").is_none(), "no import-time inputs: the data source is a variable");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let ds = vars.iter().find(|v| v["name"] == "datasource").expect("a datasource variable");
    assert_eq!((ds["type"].as_str(), ds["query"].as_str()), (Some("datasource"), Some("prometheus")));
    for var in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(
            var["datasource"]["uid"], "${datasource}",
            "variable {} queries the chosen data source",
            var["name"]
        );
    }

    let mut ids = HashSet::new();
    let mut cells: Vec<(u64, u64, u64, u64, String)> = Vec::new();
    let mut graphs = 0;
    for panel in panels(&d) {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        assert!(!title.is_empty(), "every panel has a title: {panel}");
        assert!(ids.insert(panel["id"].as_u64().expect("a numeric id")), "panel ids are unique: {title}");
        let grid = &panel["gridPos"];
        let (x, y, w, h) = (grid["x"].as_u64(), grid["y"].as_u64(), grid["w"].as_u64(), grid["h"].as_u64());
        let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else { panic!("{title}: gridPos x, y, w, h") };
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: inside the 24-column grid");
        for (cx, cy, cw, ch, other) in &cells {
            let overlaps = x < cx + cw && *cx < x + w && y < cy + ch && *cy < y + h;
            assert!(!overlaps, "{title} overlaps {other}");
        }
        cells.push((x, y, w, h, title.clone()));
        if panel["type"] == "row" {
            continue;
        }
        graphs += 1;
        assert!(panel["description"].as_str().is_some_and(|s| !s.is_empty()), "{title}: a description");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}: the data source is the variable");
        let targets =
            panel["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{title}: no query"));
        let mut refs = HashSet::new();
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{title}: an empty query");
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "{title}: the query's data source is the variable"
            );
            assert!(refs.insert(target["refId"].as_str().expect("refId").to_owned()), "{title}: refIds are unique");
            assert!(expr.contains("$instance"), "{title}: {expr} follows the instance selection");
        }
    }
    assert!(graphs >= 10, "the panels the monitoring docs describe: {graphs}");
    // Nothing but the variable names a data source anywhere in the file.
    let text = std::fs::read_to_string(dashboard_path()).unwrap();
    for (at, _) in text.match_indices("\"uid\": \"") {
        let value: String = text[at + 8..].chars().take_while(|c| *c != '"').collect();
        assert!(value == "${datasource}" || value == d["uid"], "a hard-coded uid: {value}");
    }
    // The queries the panels need, by subject (the list).
    let queries = dashboard_queries(&d).join("\n");
    for needed in [
        "cachectl_submitted_urls_total",
        "cachectl_node_requests_total",
        "cachectl_item_duration_seconds_bucket",
        "cachectl_node_failures_total",
        "cachectl_queue_items",
        "cachectl_quota_max_use_ratio",
    ] {
        assert!(queries.contains(needed), "no panel shows {needed}");
    }
    for expr in dashboard_queries(&d) {
        for selector in selectors(&expr) {
            assert!(selector.starts_with("cachectl_"), "{expr}: {selector} is not a cachectl metric");
        }
    }
}

/// Every dashboard query is valid PromQL: promtool parses each as a recording rule.
#[test]
fn dashboard_queries_parse_as_promql() {
    let d = dashboard();
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_queries(&d).iter().filter(|q| !q.starts_with("label_values(")).enumerate() {
        rules.push_str(&format!("      - record: dashboard:query_{i}\n        expr: {}\n", json!(as_prometheus(expr))));
    }
    let path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&path, &rules).unwrap();
    let out = promtool().args(["check", "rules"]).arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejects a dashboard query:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool() {
    let check = promtool().args(["check", "rules", "cachectl-alerts.yml"]).current_dir(rules_dir()).output().unwrap();
    let said = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    assert!(check.status.success(), "promtool check rules:\n{}", said(&check));
    assert!(said(&check).contains("SUCCESS: 6 rules found"), "{}", said(&check));
    let test =
        promtool().args(["test", "rules", "cachectl-alerts.test.yml"]).current_dir(rules_dir()).output().unwrap();
    assert!(test.status.success(), "promtool test rules:\n{}", said(&test));
    // Each alert has a unit test that sees it fire.
    let rules = std::fs::read_to_string(rules_dir().join("cachectl-alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(rules_dir().join("cachectl-alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert_eq!(alerts.len(), 6, "{alerts:?}");
    for alert in alerts {
        let fired = tests.split("alertname: ").skip(1).any(|t| t.starts_with(alert) && t.contains("exp_labels"));
        assert!(fired, "no unit test sees {alert} fire");
    }
}

/// The samples of a `/metrics` text: (name with labels, value).
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_owned(), v.parse().unwrap_or(f64::NAN))))
        .collect()
}

fn value(text: &str, series: &str) -> Option<f64> {
    samples(text).into_iter().find(|(k, _)| k == series).map(|(_, v)| v)
}

async fn scrape(server: &Cachectl) -> String {
    let r = server.http.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// Scrapes until `series` has `want` (the store's figures are read at most every 2 s).
async fn scrape_until(server: &Cachectl, series: &str, want: f64, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = scrape(server).await;
        if value(&text, series) == Some(want) {
            return text;
        }
        assert!(start.elapsed() < timeout, "{series} never became {want}:\n{text}\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_is_exposed() {
    let origin = Origin::start().await;
    let varnish = Varnish::start(origin.port).await;
    // A node that answers nothing (a port nobody listens on), serving one host only.
    let dead = format!(
        "[[edges]]\nname = \"dead\"\ndriver = \"varnish\"\naddress = \"127.0.0.1:{}\"\ndomains = [\"dead.example.com\"]\n\n",
        free_port()
    );
    let server = Cachectl::start(&format!(
        "{ACCOUNTS}{}{}{dead}",
        fast_worker("8s"),
        edge("v1", "varnish", &varnish.address(), "edge")
            .replace("tier = \"edge\"\n", "tier = \"edge\"\ndomains = [\"example.com\", \"*.example.com\"]\n")
    ))
    .await;
    // Fill the cache, then purge through cachectl: the object is gone from the real Varnish.
    let address = varnish.address();
    cache_status(&address, "www.example.com", "/a.css").await;
    assert_eq!(cache_status(&address, "www.example.com", "/a.css").await, "HIT", "cached before the purge");
    let done = server.submit(REFRESH, json!({"urls": ["http://www.example.com/a.css"]})).await;
    let items = server.wait_final(REFRESH, done, Duration::from_secs(20)).await;
    assert_eq!(items[0]["status"], "completed", "{items:?}");
    assert_eq!(cache_status(&address, "www.example.com", "/a.css").await, "MISS", "purged on the real Varnish");

    // An item on the dead node: retried, past half its deadline after 4 s, failed at 8 s.
    let failing = server.submit(REFRESH, json!({"urls": ["http://dead.example.com/x"]})).await;
    scrape_until(&server, "cachectl_items_past_half_deadline", 1.0, Duration::from_secs(10)).await;
    let items = server.wait_final(REFRESH, failing, Duration::from_secs(20)).await;
    assert_eq!(items[0]["status"], "failed", "{items:?}");
    let text = scrape_until(&server, "cachectl_items_past_half_deadline", 0.0, Duration::from_secs(10)).await;

    // What happened, as the metrics tell it.
    let expect = [
        ("cachectl_submitted_urls_total{dialect=\"baishan\",kind=\"refresh\"}", 2.0),
        ("cachectl_node_failures_total{node=\"dead\",reason=\"deadline\"}", 1.0),
        ("cachectl_items_finished_total{kind=\"refresh\",status=\"completed\"}", 1.0),
        ("cachectl_items_finished_total{kind=\"refresh\",status=\"failed\"}", 1.0),
        ("cachectl_item_duration_seconds_count{kind=\"refresh\",status=\"completed\"}", 1.0),
        ("cachectl_item_duration_seconds_count{kind=\"refresh\",status=\"failed\"}", 1.0),
        ("cachectl_queue_items{state=\"waiting\"}", 0.0),
        ("cachectl_queue_items{state=\"processing\"}", 0.0),
        ("cachectl_queue_oldest_due_seconds", 0.0),
        ("cachectl_item_deadline_seconds", 8.0),
        ("cachectl_quota_used{bucket=\"refresh_url\"}", 2.0),
        ("cachectl_store_read_errors_total", 0.0),
    ];
    for (series, want) in expect {
        assert_eq!(value(&text, series), Some(want), "{series}:\n{text}");
    }
    // A URL's purge may take more than one request (docs/edges.md); none was retried.
    assert!(value(&text, "cachectl_node_requests_total{node=\"v1\",outcome=\"success\"}").unwrap() >= 1.0, "{text}");
    assert_eq!(value(&text, "cachectl_node_requests_total{node=\"v1\",outcome=\"retry\"}"), Some(0.0), "{text}");
    assert!(value(&text, "cachectl_node_requests_total{node=\"dead\",outcome=\"retry\"}").unwrap() >= 2.0, "{text}");
    let failed_after = value(&text, "cachectl_item_duration_seconds_sum{kind=\"refresh\",status=\"failed\"}").unwrap();
    assert!((6.0..20.0).contains(&failed_after), "the failed item took about its 8 s deadline: {failed_after}");
    let limit = value(&text, "cachectl_quota_limit{bucket=\"refresh_url\"}").unwrap();
    let ratio = value(&text, "cachectl_quota_max_use_ratio{bucket=\"refresh_url\"}").unwrap();
    assert!(limit > 0.0 && (ratio - 2.0 / (limit / 2.0)).abs() < 1e-9, "two accounts, one spent 2: {ratio} of {limit}");

    // Every metric the dashboard and the alert rules name has samples in /metrics.
    let exposed: HashSet<String> =
        samples(&text).into_iter().map(|(k, _)| k.split('{').next().unwrap().to_owned()).collect();
    let mut used = BTreeSet::new();
    for expr in dashboard_queries(&dashboard()) {
        used.extend(cachectl_names(&expr));
    }
    let rules = std::fs::read_to_string(rules_dir().join("cachectl-alerts.yml")).unwrap();
    let from_rules = cachectl_names(&rules);
    assert!(from_rules.len() >= 5, "{from_rules:?}");
    used.extend(from_rules);
    assert!(used.len() >= 12, "{used:?}");
    let missing: Vec<&String> = used.iter().filter(|name| !exposed.contains(*name)).collect();
    assert!(missing.is_empty(), "used by the dashboard or the alerts but not in /metrics: {missing:?}\n{text}");
    // No label that could name an account, a token or a URL.
    for (series, _) in samples(&text) {
        for forbidden in ["account=", "token=", "url=", "acme", "example.com"] {
            assert!(!series.contains(forbidden), "{series} carries {forbidden}");
        }
    }
}
