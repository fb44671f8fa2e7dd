//! Who may call and which edges serve, as this instance knows it now: the configuration file's
//! accounts, credentials and edges merged with what the admin API keeps in the store
//! (docs/administration.md, "Precedence"). The merged view is rebuilt whenever the store's
//! change counter moves (polled every `[admin] poll_interval`), right after this instance's own
//! admin changes, and on SIGHUP with the re-read file; every reader takes the current view from
//! a watch channel.

use crate::auth::{Credential, Secret};
use crate::config::{EdgeConfig, EdgeNode, QuotaConfig, Settings};
use crate::secrets::{TokenHash, hash_token};
use cachectl_core::Timestamp;
use cachectl_core::admin::{CredentialKind, DirectoryRows, EdgeState};
use cachectl_core::service::Account;
use cachectl_core::store::Store;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use subtle::ConstantTimeEq as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where an account or edge is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The configuration file: changed by editing it (and SIGHUP); the API may only disable
    /// the account or drain the edge.
    File,
    /// The admin API.
    Api,
}

/// An account's settings as the admin API stores them (`accounts.spec`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountSpec {
    /// Domains it owns.
    pub domains: Vec<String>,
    /// Daily quotas (defaults where absent).
    #[serde(default)]
    pub quotas: QuotaConfig,
    /// Requests per minute per credential per endpoint (default: `[baishan] rate_limit_per_minute`).
    #[serde(default)]
    pub rate_limit_per_minute: Option<u32>,
}

/// An account as the directory knows it.
#[derive(Debug, Clone)]
pub struct AccountEntry {
    /// The account.
    pub account: Arc<Account>,
    /// Where it is defined.
    pub source: Source,
    /// Disabled through the API: its credentials are refused.
    pub disabled: bool,
    /// Its settings as stored, for an API account.
    pub spec: Option<AccountSpec>,
}

/// A credential the directory accepts, with when it stops working.
#[derive(Debug, Clone)]
pub struct CredentialEntry {
    /// Who it is.
    pub credential: Credential,
    /// Its public id (for the audit log): a token's id or name, an access key id.
    pub id: String,
    /// When it stops working, if ever.
    pub expires_at: Option<Timestamp>,
}

impl CredentialEntry {
    fn valid_at(&self, now: Timestamp) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// An edge as the directory knows it.
#[derive(Debug, Clone)]
pub struct EdgeEntry {
    /// The node and how it is reached.
    pub node: EdgeNode,
    /// Where it is defined.
    pub source: Source,
    /// Active or draining.
    pub state: EdgeState,
    /// Its settings, for an API edge.
    pub spec: Option<EdgeConfig>,
}

/// One moment's view.
#[derive(Debug, Default)]
pub struct Directory {
    /// The store's change counter it was built at.
    pub version: i64,
    /// Every account by name, disabled ones included.
    pub accounts: HashMap<String, AccountEntry>,
    tokens: HashMap<TokenHash, CredentialEntry>,
    access_keys: HashMap<String, (CredentialEntry, Secret)>,
    /// Every edge, in the file's order, then the API's by name.
    pub edges: Vec<EdgeEntry>,
    admins: Vec<(String, TokenHash)>,
    /// Account name → webhook receivers (from the file).
    pub webhooks: HashMap<String, Vec<crate::webhooks::Target>>,
    /// What could not be taken from the store (shown in the log at each rebuild).
    pub warnings: Vec<String>,
}

impl Directory {
    /// The credential of bearer or Baishan token `token`, if it works at `now`.
    #[must_use]
    pub fn token(&self, token: &str, now: Timestamp) -> Option<&CredentialEntry> {
        self.tokens.get(&hash_token(token)).filter(|e| e.valid_at(now))
    }

    /// The credential of the token whose SHA-256 is `hash`, if it works at `now`.
    #[must_use]
    pub fn token_by_hash(&self, hash: &TokenHash, now: Timestamp) -> Option<&CredentialEntry> {
        self.tokens.get(hash).filter(|e| e.valid_at(now))
    }

    /// The credential and secret key of BCE access key `ak`, if it works at `now`.
    #[must_use]
    pub fn access_key(&self, ak: &str, now: Timestamp) -> Option<(&CredentialEntry, &Secret)> {
        self.access_keys.get(ak).filter(|(e, _)| e.valid_at(now)).map(|(e, s)| (e, s))
    }

    /// The holder of admin token `token`; every configured hash is compared, in constant time.
    #[must_use]
    pub fn admin(&self, token: &str) -> Option<&str> {
        let hash = hash_token(token);
        let mut found = None;
        for (name, expected) in &self.admins {
            if bool::from(expected.ct_eq(&hash)) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// Edge `name`.
    #[must_use]
    pub fn edge(&self, name: &str) -> Option<&EdgeEntry> {
        self.edges.iter().find(|e| e.node.node.name == name)
    }

    /// The enabled accounts.
    pub fn enabled_accounts(&self) -> impl Iterator<Item = &Arc<Account>> {
        self.accounts.values().filter(|a| !a.disabled).map(|a| &a.account)
    }

    /// Builds the view of `file` (the configuration) and `rows` (the store), opening sealed
    /// secrets with `key`. What the store holds that cannot be used (a spec that no longer
    /// validates, a secret sealed under another key) is left out with a warning.
    #[must_use]
    pub fn build(file: &Settings, rows: &DirectoryRows) -> Self {
        let mut d = Self { version: rows.version, admins: file.admin.tokens.clone(), ..Self::default() };
        let key = file.admin.key.as_ref();
        let disabled: HashMap<&str, bool> = rows.accounts.iter().map(|a| (a.name.as_str(), a.disabled)).collect();
        for account in &file.accounts {
            let name = account.name.as_str();
            let entry = AccountEntry {
                account: account.clone(),
                source: Source::File,
                disabled: disabled.get(name).copied().unwrap_or(false),
                spec: None,
            };
            d.accounts.insert(name.to_owned(), entry);
        }
        for row in &rows.accounts {
            let Some(spec) = &row.spec else { continue };
            if d.accounts.contains_key(&row.name) {
                d.warnings.push(format!("account {:?} is in the file and the store; the file's is used", row.name));
                continue;
            }
            match serde_json::from_str::<AccountSpec>(spec).map_err(|e| e.to_string()).and_then(|spec| {
                crate::config::build_account(
                    &row.name,
                    &spec.domains,
                    &spec.quotas,
                    spec.rate_limit_per_minute,
                    file.default_rate_limit,
                )
                .map(|a| (a, spec))
                .map_err(|(field, m)| format!("{field}: {m}"))
            }) {
                Ok((account, spec)) => {
                    let entry = AccountEntry {
                        account: Arc::new(account),
                        source: Source::Api,
                        disabled: row.disabled,
                        spec: Some(spec),
                    };
                    d.accounts.insert(row.name.clone(), entry);
                }
                Err(e) => d.warnings.push(format!("account {:?} in the store is unusable: {e}", row.name)),
            }
        }
        let enabled = |name: &str| d.accounts.get(name).filter(|a| !a.disabled).map(|a| a.account.clone());
        let mut tokens = HashMap::new();
        let mut access_keys = HashMap::new();
        for (token, credential) in &file.tokens {
            if let Some(account) = enabled(credential.account.name.as_str()) {
                let credential = Credential { account, operator: credential.operator.clone(), address: String::new() };
                let id = credential.operator.clone();
                tokens.insert(hash_token(token), CredentialEntry { credential, id, expires_at: None });
            }
        }
        for (ak, (credential, secret)) in &file.access_keys {
            if let Some(account) = enabled(credential.account.name.as_str()) {
                let credential = Credential { account, operator: ak.clone(), address: String::new() };
                access_keys.insert(
                    ak.clone(),
                    (CredentialEntry { credential, id: ak.clone(), expires_at: None }, secret.clone()),
                );
            }
        }
        for row in &rows.credentials {
            let Some(account) = enabled(&row.account) else { continue };
            // Tasks record the credential's id: unique, unlike the label an operator gave it.
            let credential = Credential { account, operator: row.id.clone(), address: String::new() };
            let entry = CredentialEntry { credential, id: row.id.clone(), expires_at: row.expires_at };
            match row.kind {
                CredentialKind::Token => {
                    let hash = row.secret_hash.as_deref().and_then(|h| hex::decode(h).ok());
                    match hash.and_then(|h| <TokenHash>::try_from(h).ok()) {
                        Some(hash) => {
                            tokens.entry(hash).or_insert(entry);
                        }
                        None => d.warnings.push(format!("token {} has no usable hash", row.id)),
                    }
                }
                CredentialKind::AccessKey => {
                    let secret = key.zip(row.sealed_secret.as_deref()).and_then(|(k, s)| k.open(&row.id, s));
                    match secret {
                        Some(secret) => {
                            access_keys.entry(row.id.clone()).or_insert((entry, secret));
                        }
                        None => d.warnings.push(format!(
                            "access key {} cannot be opened: [admin] key_file is missing or is not the key it was sealed with",
                            row.id
                        )),
                    }
                }
            }
        }
        d.tokens = tokens;
        d.access_keys = access_keys;
        d.webhooks = file
            .webhooks
            .iter()
            .filter(|(account, _)| enabled(account).is_some())
            .map(|(a, t)| (a.clone(), t.clone()))
            .collect();
        let states: HashMap<&str, EdgeState> = rows.edges.iter().map(|e| (e.name.as_str(), e.state)).collect();
        for node in &file.nodes {
            let state = states.get(node.node.name.as_str()).copied().unwrap_or(EdgeState::Active);
            d.edges.push(EdgeEntry { node: node.clone(), source: Source::File, state, spec: None });
        }
        for row in &rows.edges {
            let Some(spec) = &row.spec else { continue };
            if d.edge(&row.name).is_some() {
                d.warnings.push(format!("edge {:?} is in the file and the store; the file's is used", row.name));
                continue;
            }
            let built = serde_json::from_str::<EdgeConfig>(spec).map_err(|e| e.to_string()).and_then(|config| {
                crate::config::build_node(&config).map(|n| (n, config)).map_err(|(f, m)| format!("{f}: {m}"))
            });
            match built {
                Ok((node, config)) if node.node.name == row.name => {
                    d.edges.push(EdgeEntry { node, source: Source::Api, state: row.state, spec: Some(config) });
                }
                Ok(_) => d.warnings.push(format!("edge {:?} in the store names another node", row.name)),
                Err(e) => d.warnings.push(format!("edge {:?} in the store is unusable: {e}", row.name)),
            }
        }
        d
    }
}

/// The current view and how to refresh it.
pub struct DirectoryHandle {
    store: Arc<dyn Store>,
    file: RwLock<Arc<Settings>>,
    tx: watch::Sender<Arc<Directory>>,
}

impl DirectoryHandle {
    /// Builds the first view from `file` and the store.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn start(store: Arc<dyn Store>, file: Arc<Settings>) -> anyhow::Result<Arc<Self>> {
        let rows = store.directory().await?;
        let directory = Directory::build(&file, &rows);
        log_warnings(&directory);
        let (tx, _) = watch::channel(Arc::new(directory));
        Ok(Arc::new(Self { store, file: RwLock::new(file), tx }))
    }

    /// The current view.
    #[must_use]
    pub fn current(&self) -> Arc<Directory> {
        self.tx.borrow().clone()
    }

    /// Follows the view as it changes.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Arc<Directory>> {
        self.tx.subscribe()
    }

    /// The configuration the view was last built from.
    #[must_use]
    pub fn file(&self) -> Arc<Settings> {
        self.file.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Rebuilds the view from the store (after a change, or when the counter moved).
    ///
    /// # Errors
    /// The store cannot be read; the view stays as it was.
    pub async fn reload(&self) -> anyhow::Result<()> {
        self.rebuild(false).await
    }

    /// Rebuilds the view; unless `file_changed`, a view read before a newer one already in place
    /// (two rebuilds racing: the poll's and an admin change's) is dropped.
    async fn rebuild(&self, file_changed: bool) -> anyhow::Result<()> {
        let rows = self.store.directory().await?;
        let directory = Arc::new(Directory::build(&self.file(), &rows));
        log_warnings(&directory);
        self.tx.send_if_modified(|current| {
            let newer = file_changed || directory.version >= current.version;
            if newer {
                *current = directory.clone();
            }
            newer
        });
        Ok(())
    }

    /// Takes a re-read configuration file (SIGHUP) and rebuilds the view from it.
    ///
    /// # Errors
    /// The store cannot be read; the file is kept for the next rebuild.
    pub async fn replace_file(&self, file: Arc<Settings>) -> anyhow::Result<()> {
        *self.file.write().unwrap_or_else(std::sync::PoisonError::into_inner) = file;
        self.rebuild(true).await
    }

    /// Reloads whenever the store's change counter moves, checking every `interval`, until
    /// `shutdown`.
    pub async fn poll(self: Arc<Self>, interval: std::time::Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            match self.store.directory_version().await {
                Ok(version) if version != self.current().version => {
                    if let Err(e) = self.reload().await {
                        tracing::warn!(error = %e, "Reloading the accounts and edges failed; retrying.");
                    } else {
                        tracing::info!(version, "Accounts, credentials or edges changed; reloaded.");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "Checking for directory changes failed."),
            }
        }
    }
}

fn log_warnings(directory: &Directory) {
    for warning in &directory.warnings {
        tracing::warn!("{warning}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use cachectl_core::admin::{AccountRow, CredentialRow, EdgeRow};

    fn file() -> Settings {
        let mut settings = Config::from_toml(
            r#"
[[accounts]]
name = "acme"
domains = ["example.com"]
tokens = ["acme-secret-token"]
access_keys = [{ ak = "AK", sk = "SK" }]

[[edges]]
name = "v1"
driver = "varnish"
address = "127.0.0.1:6081"

[[admin.tokens]]
name = "ops"
sha256 = "4a8a08f09d37b73795649038408b5f33e0ae38c2e4bf5e0b9b4bbd2b7f2c3c5a"
"#,
        )
        .unwrap()
        .validate()
        .unwrap();
        settings.admin.key = crate::secrets::SealKey::from_bytes(&[3; 32]);
        settings
    }

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn the_file_and_the_store_merge_with_the_file_winning() {
        let file = file();
        let key = file.admin.key.clone().unwrap();
        let spec = |domains: &str| Some(format!(r#"{{"domains": [{domains}]}}"#));
        let rows = DirectoryRows {
            version: 7,
            accounts: vec![
                AccountRow { name: "beta".into(), spec: spec(r#""beta.test""#), disabled: false, created_at: at(0), updated_at: at(0) },
                AccountRow { name: "acme".into(), spec: spec(r#""stolen.test""#), disabled: false, created_at: at(0), updated_at: at(0) },
                AccountRow { name: "broken".into(), spec: spec(r#""bad domain""#), disabled: false, created_at: at(0), updated_at: at(0) },
            ],
            credentials: vec![
                CredentialRow {
                    id: "tok_1".into(),
                    kind: CredentialKind::Token,
                    account: "beta".into(),
                    name: "ci".into(),
                    secret_hash: Some(hex::encode(hash_token("beta-token"))),
                    sealed_secret: None,
                    created_at: at(0),
                    expires_at: Some(at(1000)),
                },
                CredentialRow {
                    id: "AK2".into(),
                    kind: CredentialKind::AccessKey,
                    account: "beta".into(),
                    name: "sdk".into(),
                    secret_hash: None,
                    sealed_secret: Some(key.seal("AK2", "SK2")),
                    created_at: at(0),
                    expires_at: None,
                },
                CredentialRow {
                    id: "AK3".into(),
                    kind: CredentialKind::AccessKey,
                    account: "beta".into(),
                    name: "other key".into(),
                    secret_hash: None,
                    sealed_secret: Some(crate::secrets::SealKey::from_bytes(&[4; 32]).unwrap().seal("AK3", "SK3")),
                    created_at: at(0),
                    expires_at: None,
                },
            ],
            edges: vec![
                EdgeRow { name: "v1".into(), spec: None, state: EdgeState::Draining, created_at: at(0), updated_at: at(0) },
                EdgeRow {
                    name: "v2".into(),
                    spec: Some(r#"{"name": "v2", "driver": "nginx", "address": "127.0.0.1:8081", "transport": "http", "tier": "parent", "domains": []}"#.into()),
                    state: EdgeState::Active,
                    created_at: at(0),
                    updated_at: at(0),
                },
            ],
        };
        let d = Directory::build(&file, &rows);
        assert_eq!(d.version, 7);
        assert_eq!(d.accounts["acme"].source, Source::File);
        assert_eq!(d.accounts["acme"].account.domains[0].to_string(), "example.com", "the file wins");
        assert_eq!(d.accounts["beta"].source, Source::Api);
        assert!(!d.accounts.contains_key("broken"));
        assert!(d.warnings.iter().any(|w| w.contains("broken")) && d.warnings.iter().any(|w| w.contains("AK3")));
        assert_eq!(d.token("acme-secret-token", at(0)).unwrap().credential.account.name.as_str(), "acme");
        let beta = d.token("beta-token", at(999)).unwrap();
        assert_eq!(beta.credential.operator, "tok_1", "tasks record the credential's id");
        assert!(d.token("beta-token", at(1000)).is_none(), "expired");
        assert_eq!(d.access_key("AK2", at(0)).unwrap().1.expose(), "SK2");
        assert!(d.access_key("AK3", at(0)).is_none(), "sealed under another key");
        assert_eq!(d.access_key("AK", at(0)).unwrap().1.expose(), "SK");
        assert_eq!(d.edges.len(), 2);
        assert_eq!(d.edge("v1").unwrap().state, EdgeState::Draining, "a file edge drained through the API");
        assert_eq!(d.edge("v2").unwrap().node.node.tier, cachectl_core::Tier::Parent);
        assert!(d.admin("wrong").is_none());
    }

    #[test]
    fn a_disabled_account_loses_every_credential() {
        let file = file();
        let rows = DirectoryRows {
            accounts: vec![AccountRow {
                name: "acme".into(),
                spec: None,
                disabled: true,
                created_at: at(0),
                updated_at: at(0),
            }],
            ..DirectoryRows::default()
        };
        let d = Directory::build(&file, &rows);
        assert!(d.accounts["acme"].disabled);
        assert!(d.token("acme-secret-token", at(0)).is_none());
        assert!(d.access_key("AK", at(0)).is_none());
        assert_eq!(d.enabled_accounts().count(), 0);
    }

    #[test]
    fn admin_tokens_match_their_hash() {
        let mut file = file();
        file.admin.tokens = vec![("ops".into(), hash_token("the admin token"))];
        let d = Directory::build(&file, &DirectoryRows::default());
        assert_eq!(d.admin("the admin token"), Some("ops"));
        assert_eq!(d.admin("the admin token "), None);
    }
}
