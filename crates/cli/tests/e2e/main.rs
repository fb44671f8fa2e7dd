//! End-to-end tests: the `cachectl` binary driven through its HTTP interface, against real
//! Varnish and nginx caches and an origin, all started here on 127.0.0.1 with free ports.

mod admin;
mod agents;
mod baishan;
mod bce;
mod cluster;
mod console;
mod diskfull;
mod durability;
mod edges;
mod failover;
mod faults;
mod hostile;
mod misbehaving;
mod monitoring;
mod native;
mod purge_kinds;
mod soak;
mod support;

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}
