//! Prometheus metrics of the service, served at `/metrics`. Labels are low-cardinality by rule:
//! dialect, kind, node, outcome, status — never a URL, an account or a token.

use cachectl_core::{ItemStatus, Kind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
struct ItemLabels {
    kind: &'static str,
    status: &'static str,
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    submitted: Family<SubmitLabels, Counter>,
    node_requests: Family<NodeLabels, Counter>,
    items_finished: Family<ItemLabels, Counter>,
    items_in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cachectl");
        let requests = Family::<RequestLabels, Counter>::default();
        let submitted = Family::<SubmitLabels, Counter>::default();
        let node_requests = Family::<NodeLabels, Counter>::default();
        let items_finished = Family::<ItemLabels, Counter>::default();
        let items_in_flight = Gauge::default();
        registry.register("http_requests", "API requests answered, by dialect and HTTP status", requests.clone());
        registry.register("submitted_urls", "URLs accepted for execution, by dialect and kind", submitted.clone());
        registry.register("node_requests", "Requests sent to edge nodes, by node and outcome", node_requests.clone());
        registry.register(
            "items_finished",
            "Items that reached a final status, by kind and status",
            items_finished.clone(),
        );
        registry.register("items_in_flight", "Items being executed by this instance's worker", items_in_flight.clone());
        Self { registry, requests, submitted, node_requests, items_finished, items_in_flight }
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

    /// Counts an item reaching a final status.
    pub fn item_finished(&self, kind: Kind, status: ItemStatus) {
        self.items_finished.get_or_create(&ItemLabels { kind: kind.as_str(), status: status.as_str() }).inc();
    }

    /// Sets the number of items in flight.
    pub fn set_in_flight(&self, n: usize) {
        self.items_in_flight.set(i64::try_from(n).unwrap_or(i64::MAX));
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
