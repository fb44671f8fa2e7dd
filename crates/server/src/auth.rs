//! Who is calling: the credentials a request can present (Baishan tokens, BCE access keys,
//! bearer tokens) resolve to a [`Credential`], and secrets are kept in [`Secret`], which never
//! prints. Each dialect's extractor (in `api/`) turns a request into one of these.

use cachectl_core::service::Account;
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;

/// A string that must not be printed: a token or a secret key.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for comparison and signing only.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// Who a credential belongs to and what operator name it records.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The account.
    pub account: Arc<Account>,
    /// Operator name recorded on tasks: a token's name or id, an access key id.
    pub operator: String,
    /// The address of the client that presented it (for the audit log; empty until a request
    /// presents it).
    pub address: String,
}

impl Credential {
    /// This credential as presented by the client of `parts`.
    #[must_use]
    pub fn presented(mut self, parts: &axum::http::request::Parts) -> Self {
        self.address = client_address(parts);
        self
    }
}

/// The client's IP address, as the listener saw it.
#[must_use]
pub fn client_address(parts: &axum::http::request::Parts) -> String {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string())
}
