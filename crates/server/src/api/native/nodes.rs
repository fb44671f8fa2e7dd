//! `GET /api/v1/nodes`: the node inventory as the caller may see it — the configured nodes that
//! serve one of its domains, with their agent's health where they are reached through the bus,
//! and the agents that heartbeat without being configured (listed, given no traffic, their
//! domains not shown).

use super::{ApiError, Bearer};
use crate::api::AppState;
use crate::bus::Seen;
use crate::wire::views::time;
use axum::Json;
use axum::extract::State;
use cachectl_core::policy::DomainPattern;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One node of the fleet.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// `parent` or `edge`.
    pub tier: String,
    /// `varnish` or `nginx`.
    pub driver: String,
    /// `http` (sent to directly) or `nats` (through the bus to its agent).
    pub transport: String,
    /// Whether an operator configured it; an unconfigured agent gets no commands.
    pub configured: bool,
    /// A bus node's agent: `up`, `stale` or `down`; null for a node reached over HTTP.
    pub state: Option<String>,
    /// When its agent's last heartbeat arrived (RFC 3339), if ever.
    pub last_heartbeat: Option<String>,
    /// Command messages waiting for its agent in the stream, from its last heartbeat.
    pub lag: Option<u64>,
    /// Commands this instance published to it whose answer has not come back.
    pub in_flight: u64,
    /// The agent's version, from its last heartbeat.
    pub version: Option<String>,
}

/// The inventory.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeList {
    /// Configured nodes first, by name; then unconfigured agents, by name.
    pub nodes: Vec<NodeInfo>,
}

/// The fleet's nodes that serve the caller's domains, and the agents nobody configured.
#[utoipa::path(
    get,
    path = "/api/v1/nodes",
    tag = "nodes",
    responses(
        (status = 200, body = NodeList),
        (status = 401, body = super::ErrorBody),
        (status = 429, description = "Rate limited; see Retry-After", body = super::ErrorBody)),
    security(("bearer" = []))
)]
pub async fn list_nodes(State(state): State<AppState>, Bearer(credential): Bearer) -> Result<Json<NodeList>, ApiError> {
    Ok(Json(inventory(&state, &credential)))
}

/// The inventory as `credential`'s account may see it (the native API and the console).
#[must_use]
pub fn inventory(state: &AppState, credential: &crate::auth::Credential) -> NodeList {
    let account = &credential.account.domains;
    let bus = state.bus.as_deref();
    let beat = |name: &str| bus.and_then(|b| b.last_seen(name));
    let directory = state.directory.current();
    let mut nodes: Vec<NodeInfo> = directory
        .edges
        .iter()
        .map(|e| &e.node)
        .filter(|n| n.node.domains.is_empty() || n.node.domains.iter().any(|d| account.iter().any(|a| overlap(a, d))))
        .map(|n| {
            let seen = if n.via_bus { beat(&n.node.name) } else { None };
            NodeInfo {
                name: n.node.name.clone(),
                tier: n.node.tier.as_str().to_owned(),
                driver: driver(n.node.driver).to_owned(),
                transport: if n.via_bus { "nats" } else { "http" }.to_owned(),
                configured: true,
                state: match (n.via_bus, bus) {
                    (true, Some(b)) => Some(b.health(&n.node.name).as_str().to_owned()),
                    _ => None,
                },
                in_flight: bus.filter(|_| n.via_bus).map_or(0, |b| b.in_flight(&n.node.name)),
                ..from_beat(seen.as_ref())
            }
        })
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(bus) = bus {
        for (seen, health) in bus.agents() {
            if directory.edge(&seen.beat.node).is_some() {
                continue;
            }
            nodes.push(NodeInfo {
                name: seen.beat.node.clone(),
                tier: seen.beat.tier.as_str().to_owned(),
                driver: driver(seen.beat.driver).to_owned(),
                transport: "nats".to_owned(),
                configured: false,
                state: Some(health.as_str().to_owned()),
                in_flight: 0,
                ..from_beat(Some(&seen))
            });
        }
    }
    NodeList { nodes }
}

fn from_beat(seen: Option<&Seen>) -> NodeInfo {
    NodeInfo {
        name: String::new(),
        tier: String::new(),
        driver: String::new(),
        transport: String::new(),
        configured: false,
        state: None,
        last_heartbeat: seen.map(|s| time(s.received_at)),
        lag: seen.map(|s| s.beat.lag),
        in_flight: 0,
        version: seen.map(|s| s.beat.version.clone()),
    }
}

fn driver(driver: cachectl_edge::Driver) -> &'static str {
    match driver {
        cachectl_edge::Driver::Varnish => "varnish",
        cachectl_edge::Driver::Nginx => "nginx",
    }
}

/// Whether two domain patterns have a host in common.
fn overlap(a: &DomainPattern, b: &DomainPattern) -> bool {
    let example = |p: &DomainPattern| match p {
        DomainPattern::Exact(name) => name.clone(),
        DomainPattern::Wildcard(suffix) => format!("x.{suffix}"),
    };
    a.matches(&example(b)) || b.matches(&example(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_overlap_when_they_share_a_host() {
        let p = |t: &str| DomainPattern::parse(t).unwrap();
        assert!(overlap(&p("*.example.com"), &p("www.example.com")));
        assert!(overlap(&p("*.example.com"), &p("*.a.example.com")));
        assert!(overlap(&p("a.example.com"), &p("a.example.com")));
        assert!(!overlap(&p("*.example.com"), &p("example.com")));
        assert!(!overlap(&p("other.test"), &p("*.example.com")));
    }
}
