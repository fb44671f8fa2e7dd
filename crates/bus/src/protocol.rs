//! What travels on the bus: subjects, the three JetStream streams, and the JSON messages.
//!
//! - `cachectl.cmd.<node>` (stream `CACHECTL_COMMANDS`, work queue): a [`Batch`] of commands for
//!   one node, consumed by that node's agent through a durable consumer named after the node.
//! - `cachectl.res.<instance>` (stream `CACHECTL_RESULTS`, work queue): the [`Results`] of the
//!   commands an instance published, consumed by that instance's durable consumer.
//! - `cachectl.hb.<node>` (core NATS, not stored): a [`Heartbeat`] every few seconds.
//! - `cachectl.dead.<node>` (stream `CACHECTL_DEAD`): a command message the agent could not
//!   read, kept for an operator with the reason in the `Cachectl-Error` header.

use async_nats::jetstream;
use cachectl_core::{ItemType, Kind, Tier};
use cachectl_edge::Driver;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The stream of commands to agents.
pub const COMMAND_STREAM: &str = "CACHECTL_COMMANDS";
/// The stream of agents' results to control-plane instances.
pub const RESULT_STREAM: &str = "CACHECTL_RESULTS";
/// The stream of unreadable command messages.
pub const DEAD_LETTER_STREAM: &str = "CACHECTL_DEAD";
/// Every heartbeat.
pub const HEARTBEATS: &str = "cachectl.hb.*";

/// The subject of `node`'s commands.
#[must_use]
pub fn command_subject(node: &str) -> String {
    format!("cachectl.cmd.{node}")
}

/// The subject of results for the instance whose bus name is `instance`.
#[must_use]
pub fn result_subject(instance: &str) -> String {
    format!("cachectl.res.{instance}")
}

/// The subject of `node`'s heartbeats.
#[must_use]
pub fn heartbeat_subject(node: &str) -> String {
    format!("cachectl.hb.{node}")
}

/// The subject of `node`'s unreadable commands.
#[must_use]
pub fn dead_letter_subject(node: &str) -> String {
    format!("cachectl.dead.{node}")
}

/// Whether `name` can be a node's or an instance's name on the bus: it becomes one subject
/// token and a consumer name, so 1 to 64 of `A-Z a-z 0-9 _ -`.
#[must_use]
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `text` made a valid bus name: every other character becomes `-`, cut to 64.
#[must_use]
pub fn bus_name(text: &str) -> String {
    let name: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
        .take(64)
        .collect();
    if name.is_empty() { "instance".to_owned() } else { name }
}

/// One message on a node's command subject: the commands it carries are applied together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// At least one command.
    pub commands: Vec<Command>,
}

/// Do one item on the agent's cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// Unique per publication; the result carries it back.
    pub id: String,
    /// Refresh or prefetch.
    pub kind: Kind,
    /// url, dir, tag or regex.
    pub item_type: ItemType,
    /// The item's URL, or its `tag:<host>:<tag>` / `regex:<host>:<regex>` text.
    pub target: String,
    /// A soft purge.
    #[serde(default)]
    pub soft: bool,
    /// Milliseconds since the Unix epoch after which the agent stops trying.
    pub deadline: i64,
    /// The subject to publish the result on.
    pub reply: String,
}

/// What an agent publishes after a batch: one answer per command for this reply subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Results {
    /// The agent's node name.
    pub node: String,
    /// The answers.
    pub answers: Vec<Answer>,
}

/// The end of one command on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The command's id.
    pub id: String,
    /// Whether the cache did what was asked.
    pub ok: bool,
    /// The cache's HTTP status, when it answered over HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How many cached objects the agent removed itself (an nginx directory, regex or tag purge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<u64>,
    /// Requests sent to the cache (1 unless retried).
    pub attempts: u32,
}

/// An agent saying it is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Its node name.
    pub node: String,
    /// Its tier.
    pub tier: Tier,
    /// The kind of cache beside it.
    pub driver: Driver,
    /// The domains it says it serves (empty: all).
    pub domains: Vec<String>,
    /// The agent's version.
    pub version: String,
    /// Command messages waiting for it in the stream.
    pub lag: u64,
    /// Commands it is executing.
    pub in_flight: u64,
    /// When it was sent, milliseconds since the Unix epoch.
    pub sent_at: i64,
}

/// How the streams are created when missing.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// Copies of each stream in a clustered NATS (1 for a single server, 3 for a 3-node cluster).
    pub replicas: usize,
    /// How long an unconsumed command or result is kept: the item deadline, after which the
    /// control plane has failed the item anyway.
    pub max_age: Duration,
}

/// Creates the three streams when they do not exist (an existing stream is left as it is).
///
/// # Errors
/// JetStream is not enabled on the server, or a stream cannot be created.
pub async fn ensure_streams(js: &jetstream::Context, settings: StreamSettings) -> anyhow::Result<()> {
    use jetstream::stream::{Config, RetentionPolicy, StorageType};
    let work_queue = |name: &str, subjects: &str, max_age: Duration| Config {
        name: name.to_owned(),
        subjects: vec![subjects.to_owned()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        num_replicas: settings.replicas.max(1),
        max_age,
        ..Config::default()
    };
    js.get_or_create_stream(work_queue(COMMAND_STREAM, "cachectl.cmd.*", settings.max_age))
        .await
        .map_err(|e| anyhow::anyhow!("creating stream {COMMAND_STREAM}: {e}"))?;
    js.get_or_create_stream(work_queue(RESULT_STREAM, "cachectl.res.*", settings.max_age))
        .await
        .map_err(|e| anyhow::anyhow!("creating stream {RESULT_STREAM}: {e}"))?;
    let dead = Config {
        retention: RetentionPolicy::Limits,
        ..work_queue(DEAD_LETTER_STREAM, "cachectl.dead.*", Duration::from_secs(7 * 86_400))
    };
    js.get_or_create_stream(dead).await.map_err(|e| anyhow::anyhow!("creating stream {DEAD_LETTER_STREAM}: {e}"))?;
    Ok(())
}

/// Milliseconds since the Unix epoch, now.
#[must_use]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_subject_token() {
        assert!(valid_name("edge-1_a"));
        for bad in ["", "a.b", "a b", "a*", ">", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(bus_name("host.example.com-42"), "host-example-com-42");
        assert!(valid_name(&bus_name("ä.*>")));
    }

    #[test]
    fn a_batch_reads_back_and_refuses_unknown_fields() {
        let batch = Batch {
            commands: vec![Command {
                id: "1".into(),
                kind: Kind::Refresh,
                item_type: ItemType::Dir,
                target: "http://a.example.com/d/".into(),
                soft: false,
                deadline: 5,
                reply: result_subject("i"),
            }],
        };
        let text = serde_json::to_string(&batch).unwrap();
        assert_eq!(serde_json::from_str::<Batch>(&text).unwrap(), batch);
        assert!(serde_json::from_str::<Batch>(r#"{"commands":[],"x":1}"#).is_err());
        assert!(serde_json::from_str::<Batch>(r#"{"commands":[{"id":"1"}]}"#).is_err());
    }
}
