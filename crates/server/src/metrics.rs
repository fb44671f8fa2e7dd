//! Prometheus metrics of the service, served at `/metrics`. Labels are low-cardinality by rule:
//! dialect, kind, node, outcome, status, a failure's class, a queue state, a quota bucket —
//! never a URL, an account or a token. docs/monitoring.md describes every metric, and the
//! dashboard (deploy/grafana/) and alert rules (deploy/prometheus/) built on them.

use crate::api::AppState;
use cachectl_core::store::Backlog;
use cachectl_core::{ItemStatus, Kind, QuotaBucket, Timestamp};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// How long the figures read from the store at a scrape (queue, quotas) are reused: several
/// Prometheus servers scraping one instance cost one read.
const STORE_FIGURES_TTL: Duration = Duration::from_secs(2);

/// Upper bounds of the submit→final latency buckets, in seconds: from a fast purge on a few
/// nodes (tens of milliseconds) to the default item deadline (5 minutes) and beyond.
const LATENCY_BUCKETS: [f64; 14] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// Every quota bucket, in the order they are shown.
const BUCKETS: [QuotaBucket; 5] = [
    QuotaBucket::RefreshUrl,
    QuotaBucket::RefreshDir,
    QuotaBucket::PrefetchUrl,
    QuotaBucket::RefreshTag,
    QuotaBucket::RefreshRegex,
];

/// Why a node's part of an item failed for good: a small fixed set of classes, never the error
/// text (which names URLs and addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// The node answered an HTTP status that fails the item (a refused purge, an origin's error
    /// on a prefetch).
    Status,
    /// The request could not be built for the node's driver (e.g. a regex purge on a driver
    /// that has none).
    Unsupported,
    /// Retried until the item's deadline without success (timeouts, refused connections, 5xx).
    Deadline,
    /// The node's agent answered that it failed.
    Agent,
    /// The node's agent did not answer before the item's deadline.
    AgentSilent,
    /// No configured node serves the item's host (counted with an empty node label).
    NoNode,
}

impl FailureReason {
    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Unsupported => "unsupported",
            Self::Deadline => "deadline",
            Self::Agent => "agent",
            Self::AgentSilent => "agent_silent",
            Self::NoNode => "no_node",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    dialect: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubmitLabels {
    dialect: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    node: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ItemLabels {
    kind: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    bucket: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    submitted: Family<SubmitLabels, Counter>,
    node_requests: Family<NodeLabels, Counter>,
    node_failures: Family<FailureLabels, Counter>,
    items_finished: Family<ItemLabels, Counter>,
    item_duration: Family<ItemLabels, Histogram, fn() -> Histogram>,
    items_in_flight: Gauge,
    queue_items: Family<QueueLabels, Gauge>,
    past_half_deadline: Gauge,
    oldest_due: FloatGauge,
    item_deadline: FloatGauge,
    quota_used: Family<QuotaLabels, Gauge>,
    quota_limit: Family<QuotaLabels, Gauge>,
    quota_max_ratio: Family<QuotaLabels, FloatGauge>,
    store_read_errors: Counter,
    /// When the store figures were last read (`None`: never).
    refreshed: tokio::sync::Mutex<Option<Instant>>,
}

impl Default for Metrics {
    #[allow(clippy::too_many_lines)]
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cachectl");
        let requests = Family::<RequestLabels, Counter>::default();
        let submitted = Family::<SubmitLabels, Counter>::default();
        let node_requests = Family::<NodeLabels, Counter>::default();
        let node_failures = Family::<FailureLabels, Counter>::default();
        let items_finished = Family::<ItemLabels, Counter>::default();
        let item_duration =
            Family::<ItemLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        let items_in_flight = Gauge::default();
        let queue_items = Family::<QueueLabels, Gauge>::default();
        let past_half_deadline = Gauge::default();
        let oldest_due = FloatGauge::default();
        let item_deadline = FloatGauge::default();
        let quota_used = Family::<QuotaLabels, Gauge>::default();
        let quota_limit = Family::<QuotaLabels, Gauge>::default();
        let quota_max_ratio = Family::<QuotaLabels, FloatGauge>::default();
        let store_read_errors = Counter::default();
        registry.register("http_requests", "API requests answered, by dialect and HTTP status", requests.clone());
        registry.register("submitted_urls", "URLs accepted for execution, by dialect and kind", submitted.clone());
        registry.register("node_requests", "Requests sent to edge nodes, by node and outcome", node_requests.clone());
        registry.register(
            "node_failures",
            "Nodes' parts of items that failed for good, by node and reason (status, unsupported, deadline, agent, agent_silent, no_node)",
            node_failures.clone(),
        );
        registry.register(
            "items_finished",
            "Items that reached a final status, by kind and status",
            items_finished.clone(),
        );
        registry.register(
            "item_duration_seconds",
            "From an item's submission (or its scheduled time) to its final status, by kind and final status",
            item_duration.clone(),
        );
        registry.register("items_in_flight", "Items being executed by this instance's worker", items_in_flight.clone());
        registry.register(
            "queue_items",
            "Unfinished items in the store, by state (waiting: due, scheduled: not yet due, processing); the same on every instance",
            queue_items.clone(),
        );
        registry.register(
            "items_past_half_deadline",
            "Unfinished items first sent more than half the item deadline ago; the same on every instance",
            past_half_deadline.clone(),
        );
        registry.register(
            "queue_oldest_due_seconds",
            "How long the longest-waiting due item has waited to be claimed (0 when none waits)",
            oldest_due.clone(),
        );
        registry.register(
            "item_deadline_seconds",
            "The configured item deadline ([worker] item_deadline)",
            item_deadline.clone(),
        );
        registry.register("quota_used", "Today's quota spent, summed over the accounts, by bucket", quota_used.clone());
        registry.register(
            "quota_limit",
            "Today's quota limits, summed over the accounts, by bucket",
            quota_limit.clone(),
        );
        registry.register(
            "quota_max_use_ratio",
            "The highest share of its daily quota any one account has spent today, by bucket (0 to 1)",
            quota_max_ratio.clone(),
        );
        registry.register(
            "store_read_errors",
            "Scrapes whose queue or quota figures could not be read from the store (the previous values are shown)",
            store_read_errors.clone(),
        );
        Self {
            registry,
            requests,
            submitted,
            node_requests,
            node_failures,
            items_finished,
            item_duration,
            items_in_flight,
            queue_items,
            past_half_deadline,
            oldest_due,
            item_deadline,
            quota_used,
            quota_limit,
            quota_max_ratio,
            store_read_errors,
            refreshed: tokio::sync::Mutex::new(None),
        }
    }
}

impl Metrics {
    /// Counts an answered API request.
    pub fn request(&self, dialect: &'static str, status: u16) {
        self.requests.get_or_create(&RequestLabels { dialect, status }).inc();
    }

    /// Counts accepted URLs.
    pub fn submitted(&self, dialect: &'static str, kind: Kind, count: usize) {
        self.submitted.get_or_create(&SubmitLabels { dialect, kind: kind.as_str() }).inc_by(count as u64);
    }

    /// The counter of requests to `node` with `outcome` (`success`, `retry` or `fail`): the
    /// worker keeps it, so that counting a purge is one atomic add, not a lookup.
    #[must_use]
    pub fn node_counter(&self, node: &str, outcome: &'static str) -> Counter {
        self.node_requests.get_or_create(&NodeLabels { node: node.to_owned(), outcome }).clone()
    }

    /// Counts a node's part of an item failing for good (`node` empty for `NoNode`).
    pub fn node_failed(&self, node: &str, reason: FailureReason) {
        self.node_failures.get_or_create(&FailureLabels { node: node.to_owned(), reason: reason.as_str() }).inc();
    }

    /// Counts an item reaching a final status, `latency` after it was submitted (or due).
    pub fn item_finished(&self, kind: Kind, status: ItemStatus, latency: Duration) {
        let labels = ItemLabels { kind: kind.as_str(), status: status.as_str() };
        self.items_finished.get_or_create(&labels).inc();
        self.item_duration.get_or_create(&labels).observe(latency.as_secs_f64());
    }

    /// Sets the number of items in flight.
    pub fn set_in_flight(&self, n: usize) {
        self.items_in_flight.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the queue's figures as read from the store at `now`.
    pub fn set_backlog(&self, backlog: &Backlog, now: Timestamp) {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (state, n) in
            [("waiting", backlog.waiting), ("scheduled", backlog.scheduled), ("processing", backlog.processing)]
        {
            self.queue_items.get_or_create(&QueueLabels { state }).set(gauge(n));
        }
        self.past_half_deadline.set(gauge(backlog.past_half_deadline));
        self.oldest_due.set(backlog.oldest_due.map_or(0.0, |due| now.since(due).as_secs_f64()));
    }

    /// Sets one quota bucket's figures: spent and limit summed over the accounts, and the
    /// highest share any one account spent.
    pub fn set_quota(&self, bucket: QuotaBucket, used: u64, limit: u64, max_ratio: f64) {
        let labels = QuotaLabels { bucket: bucket.as_str() };
        self.quota_used.get_or_create(&labels).set(i64::try_from(used).unwrap_or(i64::MAX));
        self.quota_limit.get_or_create(&labels).set(i64::try_from(limit).unwrap_or(i64::MAX));
        self.quota_max_ratio.get_or_create(&labels).set(max_ratio);
    }

    /// Reads the store figures (queue, quotas) unless they were read less than
    /// `STORE_FIGURES_TTL` ago. A failing store keeps the previous values and counts the error.
    pub async fn refresh(&self, state: &AppState) {
        let mut refreshed = self.refreshed.lock().await;
        if refreshed.is_some_and(|at| at.elapsed() < STORE_FIGURES_TTL) {
            return;
        }
        *refreshed = Some(Instant::now());
        let deadline = state.settings.worker.item_deadline;
        self.item_deadline.set(deadline.as_secs_f64());
        let now = crate::api::now_ms();
        match state.service.backlog(now, now.before(deadline / 2)).await {
            Ok(backlog) => self.set_backlog(&backlog, now),
            Err(e) => {
                self.store_read_errors.inc();
                tracing::warn!(error = %e, "Reading the queue's figures for /metrics failed.");
            }
        }
        // The accounts in force now: the file's and the admin API's, disabled ones left out.
        let directory = state.directory.current();
        for bucket in BUCKETS {
            let (mut used, mut limit, mut max_ratio) = (0u64, 0u64, 0.0f64);
            for account in directory.enabled_accounts() {
                match state.service.quota(account, bucket, now).await {
                    Ok(q) => {
                        let spent = q.limit.saturating_sub(q.remaining);
                        used = used.saturating_add(spent);
                        limit = limit.saturating_add(q.limit);
                        if q.limit > 0 {
                            #[allow(clippy::cast_precision_loss)]
                            let ratio = spent as f64 / q.limit as f64;
                            max_ratio = max_ratio.max(ratio);
                        }
                    }
                    Err(e) => {
                        self.store_read_errors.inc();
                        tracing::warn!(error = %e, "Reading quota use for /metrics failed.");
                        return;
                    }
                }
            }
            self.set_quota(bucket, used, limit, max_ratio);
        }
    }

    /// The text exposition format.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_low_cardinality_labels() {
        let m = Metrics::default();
        m.request("baishan", 200);
        m.submitted("native", Kind::Refresh, 2);
        let _ = m.node_counter("v1", "success");
        m.node_failed("v1", FailureReason::Deadline);
        m.item_finished(Kind::Refresh, ItemStatus::Completed, Duration::from_millis(70));
        m.set_backlog(
            &Backlog {
                waiting: 3,
                scheduled: 1,
                processing: 2,
                past_half_deadline: 1,
                oldest_due: Some(Timestamp::from_millis(1_000)),
            },
            Timestamp::from_millis(4_000),
        );
        m.set_quota(QuotaBucket::RefreshUrl, 50, 200, 0.5);
        let text = m.render();
        for line in [
            "cachectl_node_failures_total{node=\"v1\",reason=\"deadline\"} 1",
            "cachectl_item_duration_seconds_bucket{le=\"0.1\",kind=\"refresh\",status=\"completed\"} 1",
            "cachectl_item_duration_seconds_bucket{le=\"0.05\",kind=\"refresh\",status=\"completed\"} 0",
            "cachectl_queue_items{state=\"waiting\"} 3",
            "cachectl_queue_items{state=\"processing\"} 2",
            "cachectl_items_past_half_deadline 1",
            "cachectl_queue_oldest_due_seconds 3.0",
            "cachectl_quota_used{bucket=\"refresh_url\"} 50",
            "cachectl_quota_limit{bucket=\"refresh_url\"} 200",
            "cachectl_quota_max_use_ratio{bucket=\"refresh_url\"} 0.5",
            "cachectl_store_read_errors_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
    }
}
