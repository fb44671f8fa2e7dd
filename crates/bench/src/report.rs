//! The targets of issue #6, judged against a run's figures, and the table printed at the end.
//! Judging is reporting only: a missed target never fails the run.

use crate::Results;
use crate::scenarios::QueryBackendFigures;
use serde::Serialize;
use std::fmt::Write as _;

/// Peak RSS allowed for the server, MiB.
const RSS_LIMIT_MIB: f64 = 256.0;

/// One target and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The scenario.
    pub scenario: String,
    /// The figure judged.
    pub figure: String,
    /// The measured value, formatted.
    pub value: String,
    /// The target, formatted.
    pub target: String,
    /// Whether it was met.
    pub met: bool,
}

fn target(scenario: &str, figure: &str, value: String, target: &str, met: bool) -> Target {
    Target { scenario: scenario.into(), figure: figure.into(), value, target: target.into(), met }
}

/// The query targets: p99 ≤ 10 ms judged at the paced rate (5,000 q/s offered unless asked
/// otherwise), the rate ≥ 5,000 q/s judged saturated, and the saturated p99 as information
/// (with 64 closed-loop clients it is queueing: Little's law makes it about 64 ÷ the rate).
fn query_targets(out: &mut Vec<Target>, backend: &str, offered: f64, q: &QueryBackendFigures) {
    for query in q.queries.iter().skip(1) {
        let scenario = format!("3 queries ({backend})");
        let name = &query.name;
        let paced = &query.paced;
        out.push(target(
            &scenario,
            &format!("{name}: p99 at {offered:.0} q/s offered"),
            format!("{:.2} ms ({:.0} q/s answered, {} errors)", paced.p99_ms, paced.rps, paced.errors),
            "≤ 10 ms",
            paced.p99_ms <= 10.0 && paced.errors == 0,
        ));
        out.push(target(
            &scenario,
            &format!("{name}: p99 saturated (information)"),
            format!("{:.2} ms", query.load.p99_ms),
            "≤ 10 ms",
            query.load.p99_ms <= 10.0,
        ));
        out.push(target(
            &scenario,
            &format!("{name}: rate, saturated"),
            format!("{:.0} q/s (÷ healthz {:.2})", query.load.rps, query.ratio_healthz),
            "≥ 5,000 q/s",
            query.load.rps >= 5000.0,
        ));
        out.push(target(
            &scenario,
            &format!("{name}: total"),
            format!("{} (expected {})", query.total, query.expected_total),
            "exact",
            query.exact,
        ));
    }
}

/// Every target of the run.
#[must_use]
pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let f = &r.fanout;
    out.push(target(
        "1 fan-out",
        "cachectl ÷ direct PURGE",
        format!("{:.0}/s ÷ {:.0}/s = {:.0}%", f.cachectl_rate, f.direct.rps, f.ratio_direct * 100.0),
        "≥ 70%",
        f.ratio_direct >= 0.7,
    ));
    if let (Some(d), Some(ratio)) = (&f.direct_pipelined, f.ratio_direct_pipelined) {
        out.push(target(
            "1 fan-out",
            "cachectl ÷ direct PURGE pipelined (higher of alike and 4 × 8 a node; information)",
            format!("{:.0}/s ÷ {:.0}/s = {:.0}%", f.cachectl_rate, d.rps, ratio * 100.0),
            "≥ 70%",
            ratio >= 0.7,
        ));
    }
    if let (Some(d), Some(ratio)) = (&f.direct_pipelined, f.ratio_purging_pipelined) {
        out.push(target(
            "1 fan-out",
            "cachectl purging alone (rows committed → last final) ÷ direct PURGE pipelined (higher of alike and 4 × 8 a node)",
            format!("{:.0}/s ÷ {:.0}/s = {:.0}%", f.purging_rate, d.rps, ratio * 100.0),
            "≥ 70%",
            ratio >= 0.7,
        ));
    }
    if let (Some(d), Some(ratio)) = (&f.direct_batched, f.ratio_direct_batched) {
        out.push(target(
            "1 fan-out",
            "cachectl ÷ direct PURGE pipelined and batched alike (information)",
            format!("{:.0}/s ÷ {:.0}/s = {:.0}%", f.cachectl_rate, d.rps, ratio * 100.0),
            "—",
            true,
        ));
    }
    out.push(target(
        "1 fan-out",
        "cachectl ÷ shell loop",
        format!("{:.0}/s ÷ {:.0}/s = {:.1}×", f.cachectl_rate, f.shell_rate, f.ratio_shell),
        "≥ 5×",
        f.ratio_shell >= 5.0,
    ));
    let l = &r.latency;
    out.push(target("2 latency", "p50 submit → completed", format!("{:.0} ms", l.p50_ms), "≤ 5 ms", l.p50_ms <= 5.0));
    out.push(target("2 latency", "p99 submit → completed", format!("{:.0} ms", l.p99_ms), "≤ 25 ms", l.p99_ms <= 25.0));
    query_targets(&mut out, "SQLite", r.options.paced_rate, &r.queries_sqlite);
    if let Some(pg) = &r.queries_postgres {
        query_targets(&mut out, "PostgreSQL", r.options.paced_rate, pg);
    }
    for (figure, i) in [
        ("URLs durably accepted, API-only server", &r.ingest_api_only),
        ("URLs durably accepted, worker purging them", &r.ingest),
    ] {
        out.push(target(
            "4 ingestion",
            figure,
            format!("{:.0} URLs/s", i.urls_per_s),
            "≥ 50,000 URLs/s",
            i.urls_per_s >= 50_000.0,
        ));
    }
    let mut peaks = vec![("live", r.live_server_peak_rss_mib), ("queries SQLite", r.queries_sqlite.peak_rss_mib)];
    if let Some(pg) = &r.queries_postgres {
        peaks.push(("queries PostgreSQL", pg.peak_rss_mib));
    }
    let worst = peaks.iter().map(|p| p.1).fold(0.0, f64::max);
    let detail: Vec<String> = peaks.iter().map(|(n, v)| format!("{n} {v:.0}")).collect();
    out.push(target(
        "5 memory",
        "server peak RSS (VmHWM)",
        format!("{worst:.0} MiB ({})", detail.join(", ")),
        "≤ 256 MB",
        worst > 0.0 && worst <= RSS_LIMIT_MIB,
    ));
    out
}

/// The pipelined baselines of the fan-out line: cachectl's shape, and the reference shape when
/// it was measured too.
fn pipelined_detail(f: &crate::scenarios::FanoutFigures) -> String {
    let shape = |d: &crate::load::LoadFigures| format!("{:.0}/s on {} connections", d.rps, d.connections);
    match (&f.direct_pipelined_alike, &f.direct_pipelined_reference) {
        (Some(alike), Some(reference)) => {
            format!(", pipelined alike {}, pipelined 4 × 8 a node {}", shape(alike), shape(reference))
        }
        (Some(alike), None) => format!(", pipelined alike {}", shape(alike)),
        _ => String::new(),
    }
}

/// The table printed at the end of a run.
///
/// Longer than the house limit on purpose: one `writeln!` per printed row, in the table's order.
#[must_use]
pub fn table(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "cachectl benchmark, {}", r.date);
    let f = &r.fanout;
    let _ = writeln!(
        s,
        "fan-out: {} purges in {} ms, of which {} ms the harness writing the task's rows (purging alone {:.0}/s; {} failed items; CPU s cachectl {:.1}, Varnish {:.1}); direct {} {:.0}/s{}{}; shell loop {} purges {:.0}/s",
        f.purges,
        f.cachectl_ms,
        f.insert_ms,
        f.purging_rate,
        f.failed,
        f.cpu_cachectl_s,
        f.cpu_varnish_s,
        f.direct.client,
        f.direct.rps,
        pipelined_detail(f),
        f.direct_batched.as_ref().map(|d| format!(", pipelined and batched {:.0} purges/s", d.rps)).unwrap_or_default(),
        f.shell_purges,
        f.shell_rate
    );
    let l = &r.latency;
    let _ = writeln!(
        s,
        "latency: {} tasks, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        l.tasks, l.p50_ms, l.p99_ms, l.max_ms
    );
    for (what, i) in [("worker purging", &r.ingest), ("API-only server", &r.ingest_api_only)] {
        let _ = writeln!(
            s,
            "ingestion ({what}): {} URLs, {:.0} URLs/s, submission p50 {:.1} ms p99 {:.1} ms",
            i.accepted_urls, i.urls_per_s, i.p50_ms, i.p99_ms
        );
    }
    let mut backends = vec![("SQLite", &r.queries_sqlite)];
    if let Some(pg) = &r.queries_postgres {
        backends.push(("PostgreSQL", pg));
    }
    for (name, q) in backends {
        let _ = writeln!(
            s,
            "queries on {name}: {} items loaded in {:.1} s, {:.0} MiB ({:.0} MiB per million items)",
            q.load.items, q.load.seconds, q.load.store_mib, q.load.mib_per_million_items
        );
        let _ = writeln!(
            s,
            "  {:<40} {:>10} {:>9} {:>9} {:>7} {:>14} {:>6}",
            "query", "q/s", "p50 ms", "p99 ms", "÷hz", "total", "client"
        );
        for query in &q.queries {
            let _ = writeln!(
                s,
                "  {:<40} {:>10.0} {:>9.2} {:>9.2} {:>7.2} {:>14} {:>6} {:>11.2}",
                query.name,
                query.load.rps,
                query.load.p50_ms,
                query.load.p99_ms,
                query.ratio_healthz,
                if query.name == "healthz" {
                    "-".to_owned()
                } else {
                    format!("{}{}", query.total, if query.exact { "" } else { "!" })
                },
                query.load.client,
                query.unloaded_p50_ms
            );
            let _ = writeln!(
                s,
                "    paced, {:.0} q/s offered over {} connections: {:.0} q/s answered, p50 {:.2} ms, p99 {:.2} ms{}",
                r.options.paced_rate,
                query.paced.connections,
                query.paced.rps,
                query.paced.p50_ms,
                query.paced.p99_ms,
                if query.paced.errors > 0 { format!(", {} errors", query.paced.errors) } else { String::new() }
            );
            if let Some((pages, first, last)) = query.walk {
                let _ = writeln!(s, "    one walk: {pages} pages, first page {first:.2} ms, last page {last:.2} ms");
            }
            if let Some(alone) = &query.database_alone {
                let _ = writeln!(
                    s,
                    "    PostgreSQL alone (pgbench, its statements, {} clients): {:.0} q/s, p50 {:.2} ms, p99 {:.2} ms; cachectl {:.0}% of it",
                    alone.load.connections,
                    alone.load.rps,
                    alone.load.p50_ms,
                    alone.load.p99_ms,
                    alone.ratio * 100.0
                );
                let _ = writeln!(
                    s,
                    "    PostgreSQL alone paced (pgbench -R {:.0}): {:.0} q/s, p50 {:.2} ms, p99 {:.2} ms",
                    r.options.paced_rate, alone.paced.rps, alone.paced.p50_ms, alone.paced.p99_ms
                );
            }
        }
    }
    let _ = writeln!(s, "\n{:<24} {:<72} {:<44} {:<16} met", "scenario", "figure", "value", "target");
    for t in &r.targets {
        let _ = writeln!(
            s,
            "{:<24} {:<72} {:<44} {:<16} {}",
            t.scenario,
            t.figure,
            t.value,
            t.target,
            if t.met { "yes" } else { "NO" }
        );
    }
    s
}
