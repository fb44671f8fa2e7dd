//! cachectl's domain: what a task, an item and a node result are, how an item's status follows
//! from its nodes, and the store interface. No I/O happens here; backends, drivers and dialects
//! depend on this crate, never the other way round.

pub mod admin;
pub mod model;
pub mod policy;
pub mod ratelimit;
pub mod service;
pub mod store;
pub mod target;
pub mod types;

pub use model::*;
pub use store::{RecordQuery, Store, StoreError, StoreResult, WindowQuery};
pub use types::{AccountName, ItemUrl, QuotaDay, TaskId, Timestamp};
