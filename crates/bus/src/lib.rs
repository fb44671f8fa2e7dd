//! The bus path to the caches: the messages the control plane and the cache-host agents
//! exchange over NATS JetStream ([`protocol`]), the agent itself ([`agent`]), and what the agent
//! does in an nginx cache directory that nginx cannot ([`nginx_cache`]).

pub mod agent;
pub mod nginx_cache;
pub mod protocol;
