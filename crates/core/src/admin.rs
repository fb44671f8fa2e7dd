//! What the admin API manages in the store: accounts, their credentials and edges added or changed
//! while the service runs (the configuration file's entries stay as they are written there), and
//! the append-only audit log. Secrets never reach this module in clear: tokens arrive hashed and
//! BCE secret keys sealed; `cachectl-server` does both.

use crate::model::Timestamp;
use crate::store::StoreResult;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// An account as the store keeps it. `spec` is `None` for an account of the configuration file,
/// whose row only records that the API disabled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRow {
    /// Unique name.
    pub name: String,
    /// Domains, quotas and rate limit (JSON), or `None` for a file account.
    pub spec: Option<String>,
    /// Refused on every API while set.
    pub disabled: bool,
    /// When the row was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

/// What a credential is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// A bearer token (Baishan `token`, native `Authorization: Bearer`, console sign-in).
    Token,
    /// A BCE access key pair (the Baidu dialects' signatures).
    AccessKey,
}

impl CredentialKind {
    /// Its name in the store and the API.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::AccessKey => "access_key",
        }
    }

    /// The kind named `s`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "token" => Some(Self::Token),
            "access_key" => Some(Self::AccessKey),
            _ => None,
        }
    }
}

/// A credential issued through the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRow {
    /// Its public id: `tok_…` for a token, the access key id for a key pair.
    pub id: String,
    /// Token or access key.
    pub kind: CredentialKind,
    /// The account it belongs to.
    pub account: String,
    /// A label; recorded as the operator of the tasks it submits.
    pub name: String,
    /// A token's SHA-256, hex.
    pub secret_hash: Option<String>,
    /// An access key's secret, sealed with the service's key.
    pub sealed_secret: Option<String>,
    /// When it was issued.
    pub created_at: Timestamp,
    /// When it stops working (a rotation's overlap, or a revocation), if ever.
    pub expires_at: Option<Timestamp>,
}

/// The state of an edge as the admin API sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeState {
    /// Receives commands.
    Active,
    /// Receives no new commands; the commands already sent finish.
    Draining,
}

impl EdgeState {
    /// Its name in the store and the API.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
        }
    }

    /// The state named `s`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "draining" => Some(Self::Draining),
            _ => None,
        }
    }
}

/// An edge as the store keeps it. `spec` is `None` for an edge of the configuration file, whose
/// row only records its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeRow {
    /// Unique node name.
    pub name: String,
    /// The edge's settings (JSON, the shape of an `[[edges]]` entry), or `None` for a file edge.
    pub spec: Option<String>,
    /// Active or draining.
    pub state: EdgeState,
    /// When the row was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

/// Everything the admin API keeps, read at once to build an instance's view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectoryRows {
    /// Bumped by every change; instances reload when it moves.
    pub version: i64,
    /// Accounts.
    pub accounts: Vec<AccountRow>,
    /// Issued credentials, expired ones included.
    pub credentials: Vec<CredentialRow>,
    /// Edges.
    pub edges: Vec<EdgeRow>,
}

/// One change of the directory, applied with its audit entry in one transaction.
#[derive(Debug, Clone)]
pub enum DirectoryChange {
    /// Creates an account row; fails with `Conflict` if the name exists.
    CreateAccount(AccountRow),
    /// Replaces an account row's spec and flag (creates the row of a file account).
    PutAccount(AccountRow),
    /// Issues a credential; fails with `Conflict` if its id or hash exists.
    IssueCredential(CredentialRow),
    /// Sets when a credential stops working (only ever earlier); fails with `NotFound` if absent.
    ExpireCredential {
        /// The credential's id.
        id: String,
        /// The account it must belong to.
        account: String,
        /// When it stops working.
        at: Timestamp,
    },
    /// Creates an edge row; fails with `Conflict` if the name exists.
    CreateEdge(EdgeRow),
    /// Replaces an edge row (creates the row of a file edge).
    PutEdge(EdgeRow),
    /// Deletes an edge row; fails with `NotFound` if absent.
    RemoveEdge(String),
}

/// Why a directory change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// Something with that name or id exists already.
    #[error("{0} already exists")]
    Conflict(String),
    /// Nothing with that name or id exists.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// One line of the audit log: who did what, with which credential, from where, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its position in the log (0 before it is stored).
    pub id: i64,
    /// When.
    pub at: Timestamp,
    /// `admin` for an admin token, else the account.
    pub actor: String,
    /// The credential's public id (a token's name or id, an access key id), never a secret.
    pub credential: String,
    /// The client's address.
    pub address: String,
    /// What: `account.create`, `token.issue`, `edge.drain`, `task.submit`, …
    pub action: String,
    /// What it was done to: an account, a credential id, an edge, a task id.
    pub target: String,
    /// Details (JSON), never a secret.
    pub detail: String,
}

/// How the reason of an item cancelled because its account was disabled starts; the account's
/// name and ` disabled` follow.
pub const CANCELLED_ACCOUNT: &str = "cancelled: account ";

/// A page request of the audit log, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this actor.
    pub actor: Option<String>,
    /// Only actions starting with this (`account.`, `task.submit`).
    pub action: Option<String>,
    /// Only entries at or after this time.
    pub from: Option<Timestamp>,
    /// Only entries before this time.
    pub to: Option<Timestamp>,
    /// Only entries older than this id (the previous page's last).
    pub before_id: Option<i64>,
    /// At most this many.
    pub limit: u32,
}

/// The admin API's part of the store.
#[async_trait]
pub trait DirectoryStore: Send + Sync + 'static {
    /// The change counter alone (polled by every instance).
    async fn directory_version(&self) -> StoreResult<i64>;

    /// Every row, with the counter they were read at.
    async fn directory(&self) -> StoreResult<DirectoryRows>;

    /// Applies `change` and appends `audit`, in one transaction that also bumps the counter.
    async fn change_directory(&self, change: &DirectoryChange, audit: &AuditEntry) -> Result<(), ChangeError>;

    /// Fails the account's queued items (waiting and not leased to a worker) with `reason`,
    /// settling their tasks. Returns how many.
    async fn cancel_queued(&self, account: &str, reason: &str, now: Timestamp) -> StoreResult<u64>;

    /// Appends an entry that changes nothing else (kept by the retention like the records).
    async fn append_audit(&self, audit: &AuditEntry) -> StoreResult<()>;

    /// The log, newest first.
    async fn audit_log(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEntry>>;
}
