//! What travels on the bus: subjects, the JetStream streams (four of commands, one of dead
//! letters), and the JSON messages.
//!
//! - `cachectl.fan.<shard>` (stream `CACHECTL_FANOUT_<shard>`, limits retention; [`COMMAND_SHARDS`]
//!   of them, a node's shard fixed by its name, [`command_shard`]): a [`Batch`] of commands and
//!   the nodes of that shard they are for. Every agent reads every message of its shard through
//!   its own durable consumer named after its node, and applies the commands of the messages
//!   that name it. One message carries a batch to a whole shard of the fleet: JetStream stores it
//!   once and keeps one acknowledgement floor per consumer, where a subject per node cost one
//!   stored message per node and, in NATS 2.9, work for every consumer at every message
//!   (quadratic in the fleet's size; see BENCHMARKS.md). The shards exist because NATS hands a
//!   stream's deliveries to its consumers through one goroutine per stream: four streams let a
//!   fleet's deliveries proceed on four, and each agent reads a quarter of the names.
//! - `cachectl.res.<instance>` (core NATS, not stored): the [`Results`] of the commands an
//!   instance published, with the JetStream acknowledgement subject of the agent's command
//!   message in the [`ACK_HEADER`]. The instance acknowledges the message on the agent's behalf
//!   once it has handed the answers on; the agent goes on to its next message without waiting.
//!   Results that never arrive (the instance cut from NATS, or gone) leave the message
//!   unacknowledged: JetStream delivers it again after its acknowledgement wait and its commands
//!   are applied again, until their deadline (purges and prefetches are idempotent).
//! - `cachectl.hb.<node>` (core NATS, not stored): a [`Heartbeat`] every few seconds.
//! - `cachectl.dead.<node>` (stream `CACHECTL_DEAD`): a command message the agent could not
//!   read, kept for an operator with the reason in the `Cachectl-Error` header.

use async_nats::jetstream;
use cachectl_core::{ItemType, Kind, Tier};
use cachectl_edge::Driver;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The streams of commands to agents: `CACHECTL_FANOUT_0` to `CACHECTL_FANOUT_3`
/// ([`command_stream`]).
pub const COMMAND_STREAM: &str = "CACHECTL_FANOUT";
/// The subjects of commands, `cachectl.fan.0` to `cachectl.fan.3` ([`command_subject`]): every
/// agent consumes its shard's.
pub const COMMAND_SUBJECT: &str = "cachectl.fan";
/// Command streams: the fleet's nodes are spread over them by name ([`command_shard`]). Part of
/// the protocol: control planes and agents must agree on it.
pub const COMMAND_SHARDS: usize = 4;

/// The command shard of `node`: FNV-1a of its name, modulo [`COMMAND_SHARDS`]. Fixed by the name,
/// so a node's durable consumer stays on one stream and its commands in one order.
#[must_use]
pub fn command_shard(node: &str) -> usize {
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    // The remainder is below COMMAND_SHARDS.
    usize::try_from(hash % COMMAND_SHARDS as u64).unwrap_or(0)
}

/// The name of command stream `shard`.
#[must_use]
pub fn command_stream(shard: usize) -> String {
    format!("{COMMAND_STREAM}_{shard}")
}

/// The subject of command stream `shard`.
#[must_use]
pub fn command_subject(shard: usize) -> String {
    format!("{COMMAND_SUBJECT}.{shard}")
}

/// The command shard whose stream is named `name`.
#[must_use]
pub fn shard_of_stream(name: &str) -> Option<usize> {
    let shard = name.strip_prefix(COMMAND_STREAM)?.strip_prefix('_')?;
    let valid = !shard.is_empty() && shard.len() <= 3 && shard.bytes().all(|b| b.is_ascii_digit());
    shard.parse().ok().filter(|&n| valid && n < COMMAND_SHARDS && command_stream(n) == name)
}

/// The stream of unreadable command messages.
pub const DEAD_LETTER_STREAM: &str = "CACHECTL_DEAD";
/// Every heartbeat.
pub const HEARTBEATS: &str = "cachectl.hb.*";
/// Node names carried by one command message at most: a larger node set is sent as several
/// messages with the same commands.
pub const MAX_NODES_PER_MESSAGE: usize = 1_000;

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

/// One message on the command subject: the commands it carries are for each node it names,
/// and each of those nodes applies them together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// The nodes that apply these commands; an agent whose node is not named acknowledges the
    /// message and does nothing. On the wire one string, the names separated by single spaces
    /// (`"nodes": "edge-1 edge-2"`): every agent reads every message, and in a fleet of 1,000 a
    /// message names 1,000 nodes; read as a JSON list of strings, the names took a quarter of
    /// the agents' CPU during single-URL purges (BENCHMARKS.md, "Fleet through the bus"), where
    /// one string is checked in one pass.
    #[serde(with = "spaced")]
    pub nodes: Vec<String>,
    /// The subject of the publishing instance's results ([`result_subject`]).
    pub reply: String,
    /// At least one command.
    pub commands: Vec<Command>,
}

impl Batch {
    /// Whether `node` is one of the nodes this batch is for.
    #[must_use]
    pub fn names(&self, node: &str) -> bool {
        self.nodes.iter().any(|n| n == node)
    }
}

/// What an agent reads of a command message that names its node.
#[derive(Debug, PartialEq, Eq)]
pub struct ForNode {
    /// As [`Batch::reply`].
    pub reply: String,
    /// As [`Batch::commands`].
    pub commands: Vec<Command>,
}

/// Reads a command message (a [`Batch`]) for `node` in one pass: `None` when it does not name
/// `node`, without allocating a name (in a fleet of 1,000 a message names 1,000 nodes, and
/// every agent reads every message).
///
/// A message that does not name `node` is not this agent's to judge: only its `nodes` must be
/// readable, so a message some agents cannot read is dead-lettered by the nodes it names, not
/// by the whole fleet. (Its `commands`, when they come before its `nodes`, must be readable
/// too: they are read before the agent knows whether they are its own. [`Batch`] is written
/// with `nodes` first.)
///
/// # Errors
/// The message is not a [`Batch`], or names `node` and is not a valid one: an unknown field, a
/// missing one, or a `reply` that is not a results subject ([`result_subject`] of a valid name).
pub fn read_batch(payload: &[u8], node: &str) -> serde_json::Result<Option<ForNode>> {
    use serde::de::DeserializeSeed;
    let mut reader = serde_json::Deserializer::from_slice(payload);
    let read = BatchFor(node).deserialize(&mut reader)?;
    reader.end()?;
    Ok(read)
}

/// Whether `subject` is the results subject of a valid instance name.
#[must_use]
pub fn is_result_subject(subject: &str) -> bool {
    subject.strip_prefix("cachectl.res.").is_some_and(valid_name)
}

/// [`read_batch`]'s reader.
struct BatchFor<'n>(&'n str);

impl<'de> serde::de::DeserializeSeed<'de> for BatchFor<'_> {
    type Value = Option<ForNode>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_struct("Batch", FIELDS, self)
    }
}

/// The fields of a [`Batch`].
const FIELDS: &[&str] = &["nodes", "reply", "commands"];

/// A field's value read without failing on its type, for messages that may not be this agent's.
#[derive(Deserialize)]
#[serde(untagged)]
enum Loose {
    Text(String),
    Other(serde::de::IgnoredAny),
}

impl<'de> serde::de::Visitor<'de> for BatchFor<'_> {
    type Value = Option<ForNode>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a command message")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let (mut named, mut reply, mut commands) = (None, None, None);
        // Judged once it is known whether the message is this node's.
        let mut unknown = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "nodes" if named.is_none() => named = Some(map.next_value_seed(Names(self.0))?),
                "reply" if reply.is_none() => reply = Some(map.next_value::<Loose>()?),
                // The commands of a message for other nodes are not read.
                "commands" if commands.is_none() && named == Some(false) => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    commands = Some(Vec::new());
                }
                "commands" if commands.is_none() => commands = Some(map.next_value::<Vec<Command>>()?),
                "nodes" | "reply" | "commands" => return Err(A::Error::custom(format!("duplicate field `{key}`"))),
                other => {
                    unknown.get_or_insert_with(|| other.to_owned());
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        let named = named.ok_or_else(|| A::Error::missing_field("nodes"))?;
        if !named {
            return Ok(None);
        }
        if let Some(unknown) = unknown {
            return Err(A::Error::unknown_field(&unknown, FIELDS));
        }
        let reply = match reply.ok_or_else(|| A::Error::missing_field("reply"))? {
            Loose::Text(reply) if is_result_subject(&reply) => reply,
            Loose::Text(reply) => return Err(A::Error::custom(format!("`reply` {reply:?} is not a results subject"))),
            Loose::Other(_) => return Err(A::Error::custom("`reply` is not a string")),
        };
        let commands = commands.ok_or_else(|| A::Error::missing_field("commands"))?;
        Ok(Some(ForNode { reply, commands }))
    }
}

/// Reads a [`Batch`]'s node names (one string, separated by spaces) into whether one of them
/// is the given name, without allocating.
struct Names<'n>(&'n str);

impl<'de> serde::de::DeserializeSeed<'de> for Names<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Names<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("node names separated by spaces")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v.split(' ').any(|name| name == self.0))
    }
}

/// [`Batch::nodes`] on the wire: one string, the names separated by single spaces.
mod spaced {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(nodes: &[String], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&nodes.join(" "))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        // Only tests read a whole `Batch`; agents read the names in place
        // (`Names`), so an owned string is enough here.
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = text.split(' ').map(str::to_owned).collect();
        if names.iter().any(String::is_empty) {
            return Err(serde::de::Error::custom("node names are separated by single spaces"));
        }
        Ok(names)
    }
}

/// Do one item on the agent's cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// Unique per publication; each node's result carries it back.
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
}

/// What an agent publishes to [`Batch::reply`] after applying a batch: one answer per command.
/// The message carries the [`ACK_HEADER`]: the instance acknowledges the command message on
/// the agent's behalf once it has the answers.
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
    /// Command messages behind the last one it read in the stream (named for it or not).
    pub lag: u64,
    /// Commands it is executing.
    pub in_flight: u64,
    /// When it was sent, milliseconds since the Unix epoch.
    pub sent_at: i64,
}

/// The header of a [`Results`] message naming the JetStream acknowledgement subject of the
/// command message it answers.
pub const ACK_HEADER: &str = "Cachectl-Ack";

/// The node whose command message `subject` acknowledges, when it is a JetStream
/// acknowledgement subject of the node's command stream: `$JS.ACK.CACHECTL_FANOUT_<shard>.<node>.` and five
/// numbers, or with the domain and account hash before the stream (`$JS.ACK.<domain>.<hash>.…`,
/// and a last token, as newer servers write it). A control plane acknowledges on no other
/// subject, and only for the node whose results carried it.
#[must_use]
pub fn acknowledged_node(subject: &str) -> Option<&str> {
    let rest = subject.strip_prefix("$JS.ACK.")?;
    if subject.len() > 1024 || rest.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return None;
    }
    let tokens: Vec<&str> = rest.split('.').collect();
    let (stream, numbers) = match tokens.len() {
        7 => (0, 2..7),
        9 | 10 => (2, 4..9),
        _ => return None,
    };
    let numeric = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let node = tokens[stream + 1];
    let sound = shard_of_stream(tokens[stream]).is_some_and(|shard| shard == command_shard(node))
        && valid_name(node)
        && tokens[numbers].iter().all(|t| numeric(t))
        && tokens.iter().all(|t| !t.is_empty() && *t != "*" && *t != ">");
    sound.then_some(node)
}

/// How the streams are created when missing.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// Copies of each stream in a clustered NATS (1 for a single server, 3 for a 3-node cluster).
    pub replicas: usize,
    /// How long a command is kept: the item deadline, after which the
    /// control plane has failed the item anyway.
    pub max_age: Duration,
    /// The command streams' size at most, all together (each stream is given its share); past
    /// it, the oldest commands are dropped (their items fail at their deadline on the nodes that
    /// had not read them). Each stream gets a [`COMMAND_SHARDS`]th, at least 1 MiB.
    pub max_bytes: u64,
}

/// Creates the command streams and the dead-letter stream when they do not exist (an existing
/// stream is left as it is).
///
/// # Errors
/// JetStream is not enabled on the server, or a stream cannot be created.
pub async fn ensure_streams(js: &jetstream::Context, settings: StreamSettings) -> anyhow::Result<()> {
    use jetstream::stream::{Config, RetentionPolicy, StorageType};
    // Limits retention: a message is kept (for every consumer, acknowledged or not) until its
    // max age. Interest retention would drop a command once every consumer acknowledged it, but
    // NATS 2.9 checks every consumer at every acknowledgement, which a fleet of 1,000 does not
    // afford.
    let stream = |name: &str, subjects: &str, max_age: Duration| Config {
        name: name.to_owned(),
        subjects: vec![subjects.to_owned()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        num_replicas: settings.replicas.max(1),
        max_age,
        ..Config::default()
    };
    let share = (settings.max_bytes / COMMAND_SHARDS as u64).max(1 << 20);
    for shard in 0..COMMAND_SHARDS {
        let commands = Config {
            max_bytes: i64::try_from(share).unwrap_or(i64::MAX),
            ..stream(&command_stream(shard), &command_subject(shard), settings.max_age)
        };
        create_if_missing(js, commands).await?;
    }
    create_if_missing(js, stream(DEAD_LETTER_STREAM, "cachectl.dead.*", Duration::from_secs(7 * 86_400))).await?;
    Ok(())
}

/// Creates the stream unless it exists. Two processes starting at once (a control plane and its
/// agents, each with its own settings) may both find it missing: the one whose creation loses
/// gets "already in use with a different configuration", and takes the stream the other made.
async fn create_if_missing(js: &jetstream::Context, config: jetstream::stream::Config) -> anyhow::Result<()> {
    let name = config.name.clone();
    match js.get_or_create_stream(config).await {
        Ok(_) => Ok(()),
        Err(created) => match js.get_stream(&name).await {
            Ok(_) => Ok(()),
            Err(_) => Err(anyhow::anyhow!("creating stream {name}: {created}")),
        },
    }
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
            nodes: vec!["n1".into(), "n2".into()],
            commands: vec![Command {
                id: "1".into(),
                kind: Kind::Refresh,
                item_type: ItemType::Dir,
                target: "http://a.example.com/d/".into(),
                soft: false,
                deadline: 5,
            }],
            reply: result_subject("i"),
        };
        assert!(batch.names("n2") && !batch.names("n3"));
        let text = serde_json::to_string(&batch).unwrap();
        let read = read_batch(text.as_bytes(), "n1").unwrap().unwrap();
        assert_eq!((read.reply.as_str(), &read.commands), (batch.reply.as_str(), &batch.commands));
        assert_eq!(read_batch(text.as_bytes(), "n").unwrap(), None);
        // An escaped name is read as the name it stands for.
        assert!(read_batch(br#"{"nodes":"n\u0031","reply":"cachectl.res.i","commands":[]}"#, "n1").unwrap().is_some());
        // A message for other nodes is theirs to judge: only its node list must be readable.
        for theirs in [
            &br#"{"nodes":"n2","reply":"r","commands":[],"x":1}"#[..],
            br#"{"x":{"y":[1]},"nodes":"n2","reply":7}"#,
            br#"{"nodes":"n2","commands":[{"id":"1"}]}"#,
        ] {
            assert_eq!(read_batch(theirs, "n1").unwrap(), None, "{}", String::from_utf8_lossy(theirs));
        }
        assert_eq!(serde_json::from_str::<Batch>(&text).unwrap(), batch);
        // The names are one string, separated by spaces: a name is matched whole.
        assert!(text.contains(r#""nodes":"n1 n2""#), "{text}");
        let named = |nodes: &str| {
            read_batch(format!(r#"{{"nodes":"{nodes}","reply":"cachectl.res.i","commands":[]}}"#).as_bytes(), "n1")
                .unwrap()
                .is_some()
        };
        assert!(named("n2 n1 n3") && named("n1") && named("n0 n1"));
        assert!(!named("n10 n11") && !named("xn1") && !named("") && !named("n2"));
        for bad in [
            &br#"{"nodes":"n1","reply":"cachectl.res.i","commands":[],"x":1}"#[..],
            br#"{"x":1,"nodes":"n1","reply":"cachectl.res.i","commands":[]}"#,
            br#"{"nodes":"n1","reply":"cachectl.res.i","commands":[{"id":"1"}]}"#,
            br#"{"nodes":"n1","commands":[]}"#,
            br#"{"reply":"cachectl.res.i","commands":[]}"#,
            br#"{"nodes":"n1","nodes":"n2","reply":"cachectl.res.i","commands":[]}"#,
            br#"{"nodes":"n1","reply":"cachectl.res.i","commands":[]} x"#,
            br#"{"nodes":1,"reply":"cachectl.res.i","commands":[]}"#,
            br#"{"nodes":"n1","reply":"r","commands":[]}"#,
            br#"{"nodes":"n1","reply":"cachectl.res.*","commands":[]}"#,
            br#"{"nodes":"n1","reply":"cachectl.res.a.b","commands":[]}"#,
            br#"{"nodes":"n1","reply":7,"commands":[]}"#,
            // The list of an earlier version.
            br#"{"nodes":["n1"],"reply":"cachectl.res.i","commands":[]}"#,
            b"not json",
        ] {
            assert!(read_batch(bad, "n1").is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(serde_json::from_slice::<Batch>(br#"{"nodes":"","reply":"r","commands":[],"x":1}"#).is_err());
        assert!(serde_json::from_slice::<Batch>(br#"{"nodes":"n1  n2","reply":"r","commands":[]}"#).is_err());
    }

    #[test]
    fn nodes_spread_over_the_command_shards_by_name() {
        let mut counts = [0usize; COMMAND_SHARDS];
        for i in 0..1_000 {
            counts[command_shard(&format!("edge-{i:04}"))] += 1;
        }
        assert!(counts.iter().all(|&c| (200..=300).contains(&c)), "{counts:?}");
        // Fixed by the name, the same on every host and every version: FNV-1a 64 modulo 4.
        let shards: Vec<usize> = ["edge-0001", "edge-0002", "node-1", "n7"].iter().map(|n| command_shard(n)).collect();
        assert_eq!(shards, vec![0, 1, 3, 2]);
        for shard in 0..COMMAND_SHARDS {
            assert_eq!(shard_of_stream(&command_stream(shard)), Some(shard));
        }
        for bad in ["CACHECTL_FANOUT", "CACHECTL_FANOUT_", "CACHECTL_FANOUT_4", "CACHECTL_FANOUT_x", "X_0"] {
            assert_eq!(shard_of_stream(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_acknowledgement_subjects_of_the_command_stream_are_acknowledged_on() {
        let shard = command_shard("node-1");
        let v1 = format!("$JS.ACK.CACHECTL_FANOUT_{shard}.node-1.1.42.42.1733100000000000000.0");
        assert_eq!(acknowledged_node(&v1), Some("node-1"));
        let v2 = format!("$JS.ACK.hub.ACCHASH.CACHECTL_FANOUT_{shard}.node-1.1.42.42.1733100000000000000.0.rnd");
        assert_eq!(acknowledged_node(&v2), Some("node-1"));
        // Another shard's stream is not node-1's.
        let other = (shard + 1) % COMMAND_SHARDS;
        let elsewhere = format!("$JS.ACK.CACHECTL_FANOUT_{other}.node-1.1.42.42.1733100000000000000.0");
        assert_eq!(acknowledged_node(&elsewhere), None);
        for bad in [
            "",
            "$JS.ACK.",
            "$JS.ACK.a..b",
            "$JS.ACK.a.*",
            "$JS.ACK.>",
            "cachectl.fan",
            "$JS.ACK.a b",
            "$JS.API.x",
            "$JS.ACK.OTHER.node-1.1.42.42.1733100000000000000.0",
            "$JS.ACK.CACHECTL_FANOUT.node-1.1.42.42.1733100000000000000.0",
            "$JS.ACK.CACHECTL_FANOUT_9.node-1.1.42.42.1733100000000000000.0",
            "$JS.ACK.CACHECTL_FANOUT_01.node-1.1.42.42.1733100000000000000.0",
            "$JS.ACK.CACHECTL_FANOUT_3.node-1.1.x.42.1733100000000000000.0",
            "$JS.ACK.CACHECTL_FANOUT_3.node-1.1.42.42.1733100000000000000",
            "$JS.ACK.CACHECTL_FANOUT_3.*.1.42.42.1733100000000000000.0",
        ] {
            assert_eq!(acknowledged_node(bad), None, "{bad}");
        }
    }
}
