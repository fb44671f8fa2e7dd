//! The mixed load's figures and their table.

use super::MixedOptions;
use serde::Serialize;

/// One sample, taken every `sample_seconds`.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the start of the load.
    pub t_s: f64,
    /// The server's resident set size (`VmRSS`), MiB.
    pub rss_mib: f64,
    /// Items waiting or processing, from the store.
    pub queue_depth: i64,
    /// URLs acknowledged so far.
    pub submitted_urls: u64,
    /// Items completed so far (the server's `items_finished` counter).
    pub completed_items: u64,
    /// Items failed so far.
    pub failed_items: u64,
    /// Queries answered so far (any status).
    pub queries: u64,
    /// Submission and query errors so far.
    pub errors: u64,
}

/// One kind of query of the mix.
#[derive(Debug, Clone, Serialize)]
pub struct QueryKind {
    /// What it asks.
    pub name: String,
    /// Share of the queries, %.
    pub share_pct: u32,
    /// Queries sent.
    pub requests: u64,
    /// Answers other than 2xx, and transport errors.
    pub errors: u64,
    /// Median latency from the scheduled moment, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

/// What the resident memory did.
#[derive(Debug, Clone, Serialize)]
pub struct RssFigures {
    /// The first sample at or after the end of the warm-up, MiB.
    pub after_warmup_mib: f64,
    /// The last sample, MiB.
    pub at_end_mib: f64,
    /// Lowest sample after the warm-up, MiB.
    pub min_after_warmup_mib: f64,
    /// Highest sample after the warm-up, MiB.
    pub max_after_warmup_mib: f64,
    /// Mean of the last samples (a sixth of those after the warm-up, at least one) minus the
    /// mean of as many first ones after the warm-up, MiB.
    pub growth_mib: f64,
    /// Least-squares slope of the samples after the warm-up, MiB a minute.
    pub slope_mib_per_min: f64,
    /// Peak (`VmHWM`) at the end, MiB.
    pub peak_mib: f64,
    /// One sample interval after the queue drained, the server idle, MiB.
    pub idle_after_drain_mib: f64,
    /// `growth_mib` at most 10 % of the first samples' mean, or 4 MiB.
    pub flat: bool,
}

/// Everything a mixed-load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct MixedFigures {
    /// When it ran (UTC, RFC 3339).
    pub date: String,
    /// What it ran with.
    pub options: MixedOptions,
    /// Submissions sent during the load (besides the few before it that give the queries
    /// their first tasks).
    pub submissions: u64,
    /// URLs acknowledged, the seed submissions included.
    pub submitted_urls: u64,
    /// Submissions refused or failed.
    pub submit_errors: u64,
    /// Submission latency from the scheduled moment, median, ms.
    pub submit_p50_ms: f64,
    /// 99th percentile, ms.
    pub submit_p99_ms: f64,
    /// URLs acknowledged a second during the load.
    pub submitted_urls_per_s: f64,
    /// The queries, by kind.
    pub queries: Vec<QueryKind>,
    /// Queries answered a second.
    pub queries_per_s: f64,
    /// Query errors, all kinds.
    pub query_errors: u64,
    /// Items completed, at the end (after the drain).
    pub items_completed: i64,
    /// Items failed.
    pub items_failed: i64,
    /// The most frequent reasons of failed items, with their counts.
    pub failure_reasons: Vec<(String, i64)>,
    /// Node requests the worker had to retry (5xx, timeouts, transport errors).
    pub node_retries: u64,
    /// Lines of the server's log at WARN or ERROR, and the first few.
    pub server_log_problems: u64,
    /// The first lines at WARN or ERROR.
    pub server_log_sample: Vec<String>,
    /// Submission errors + query errors + failed items + server log problems (goal: 0).
    pub errors: u64,
    /// Items waiting or processing when the load stopped.
    pub queue_depth_at_end: i64,
    /// The largest queue depth sampled during the load.
    pub queue_depth_max: i64,
    /// Seconds after the end of the load until the queue was empty (`None`: not within
    /// `drain_seconds`).
    pub drained_after_s: Option<f64>,
    /// Memory.
    pub rss: RssFigures,
    /// The samples, every `sample_seconds`, one at the end of the submissions and, if the query
    /// client was still sending what it owed then, one when it was done.
    pub samples: Vec<Sample>,
    /// `/proc/loadavg` when the load started and when it ended: what else the machine ran.
    pub load_average: (String, String),
}

/// RSS after the warm-up: where it was, where it ended, its range and its trend.
pub(super) fn rss_figures(samples: &[Sample], warmup_seconds: u64, peak_mib: f64) -> RssFigures {
    #[allow(clippy::cast_precision_loss)]
    let warmup = warmup_seconds as f64;
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= warmup).collect();
    let after: Vec<&Sample> = if after.is_empty() { samples.iter().collect() } else { after };
    let mean = |part: &[&Sample]| {
        #[allow(clippy::cast_precision_loss)]
        let n = part.len().max(1) as f64;
        part.iter().map(|s| s.rss_mib).sum::<f64>() / n
    };
    let window = (after.len() / 6).max(1).min(after.len());
    let (early, late) = (mean(&after[..window]), mean(&after[after.len() - window..]));
    let min = after.iter().map(|s| s.rss_mib).fold(f64::INFINITY, f64::min);
    let max = after.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
    #[allow(clippy::cast_precision_loss)]
    let n = after.len().max(1) as f64;
    let mean_t = after.iter().map(|s| s.t_s).sum::<f64>() / n;
    let mean_r = mean(&after);
    let (num, den) = after.iter().fold((0.0, 0.0), |(num, den), s| {
        (num + (s.t_s - mean_t) * (s.rss_mib - mean_r), den + (s.t_s - mean_t) * (s.t_s - mean_t))
    });
    let growth = late - early;
    RssFigures {
        after_warmup_mib: after.first().map_or(0.0, |s| s.rss_mib),
        at_end_mib: after.last().map_or(0.0, |s| s.rss_mib),
        min_after_warmup_mib: if min.is_finite() { min } else { 0.0 },
        max_after_warmup_mib: max,
        growth_mib: growth,
        slope_mib_per_min: if den > 0.0 { num / den * 60.0 } else { 0.0 },
        peak_mib,
        idle_after_drain_mib: 0.0,
        flat: early > 0.0 && growth <= (early * 0.1).max(4.0),
    }
}

/// The figures of a mixed-load run as printed at its end.
///
/// Longer than the house limit on purpose: one `writeln!` per printed row, in the table's order.
#[must_use]
pub fn table(f: &MixedFigures) -> String {
    use std::fmt::Write as _;
    let o = &f.options;
    let mut s = String::new();
    let _ = writeln!(s, "cachectl mixed load, {}", f.date);
    let _ = writeln!(
        s,
        "{} s on {} Varnish nodes, {} accounts: {:.0} URLs/s submitted ({} per refresh), {:.0} queries/s offered over {} connections",
        o.seconds, o.nodes, o.accounts, o.submit_rate, o.urls_per_submission, o.query_rate, o.query_connections
    );
    let _ = writeln!(
        s,
        "errors: {} (goal 0) = {} submissions + {} queries + {} failed items + {} server log lines at WARN/ERROR",
        f.errors, f.submit_errors, f.query_errors, f.items_failed, f.server_log_problems
    );
    for (reason, n) in &f.failure_reasons {
        let _ = writeln!(s, "  failed items: {n} × {reason}");
    }
    for line in &f.server_log_sample {
        let _ = writeln!(s, "  log: {line}");
    }
    let _ = writeln!(
        s,
        "submissions: {} ({} URLs acknowledged, {:.0} URLs/s), p50 {:.1} ms, p99 {:.1} ms from the scheduled moment",
        f.submissions, f.submitted_urls, f.submitted_urls_per_s, f.submit_p50_ms, f.submit_p99_ms
    );
    let _ = writeln!(s, "queries: {:.0} q/s answered", f.queries_per_s);
    let _ = writeln!(
        s,
        "  {:<44} {:>6} {:>10} {:>7} {:>9} {:>9}",
        "query", "share", "requests", "errors", "p50 ms", "p99 ms"
    );
    for q in &f.queries {
        let _ = writeln!(
            s,
            "  {:<44} {:>5}% {:>10} {:>7} {:>9.2} {:>9.2}",
            q.name, q.share_pct, q.requests, q.errors, q.p50_ms, q.p99_ms
        );
    }
    let _ = writeln!(
        s,
        "items: {} completed, {} failed; node requests retried: {}",
        f.items_completed, f.items_failed, f.node_retries
    );
    let _ = writeln!(
        s,
        "queue depth: {} at the end of the load (largest sampled {}); {}",
        f.queue_depth_at_end,
        f.queue_depth_max,
        f.drained_after_s
            .map_or_else(|| format!("not drained within {} s", o.drain_seconds), |d| format!("drained {d:.1} s later"))
    );
    let r = &f.rss;
    let _ = writeln!(
        s,
        "RSS after the {} s warm-up: {:.1} MiB, at the end {:.1} MiB, range {:.1}–{:.1} MiB, growth {:+.1} MiB, trend {:+.2} MiB/min, peak (VmHWM) {:.1} MiB: {}",
        o.warmup_seconds,
        r.after_warmup_mib,
        r.at_end_mib,
        r.min_after_warmup_mib,
        r.max_after_warmup_mib,
        r.growth_mib,
        r.slope_mib_per_min,
        r.peak_mib,
        if r.flat { "flat" } else { "NOT flat" }
    );
    let _ = writeln!(s, "RSS idle after the drain: {:.1} MiB", r.idle_after_drain_mib);
    let _ = writeln!(
        s,
        "load average (1, 5, 15 min) at the start {} and at the end {} (2 cores shared with whatever else ran)",
        f.load_average.0, f.load_average.1
    );
    let _ = writeln!(
        s,
        "  {:>7} {:>9} {:>8} {:>12} {:>10} {:>7} {:>10} {:>7}",
        "t s", "RSS MiB", "queue", "submitted", "completed", "failed", "queries", "errors"
    );
    for x in &f.samples {
        let _ = writeln!(
            s,
            "  {:>7.0} {:>9.1} {:>8} {:>12} {:>10} {:>7} {:>10} {:>7}",
            x.t_s, x.rss_mib, x.queue_depth, x.submitted_urls, x.completed_items, x.failed_items, x.queries, x.errors
        );
    }
    s
}
