//! `cachectl admin …`: the admin API (`/admin/v1`) from the command line, with an admin token
//! (`--admin-token` or `CACHECTL_ADMIN_TOKEN`), and `admin new-token`, which makes one offline.

use crate::client::{Client, Connection, Failure, exit};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::path::PathBuf;

/// Where the admin API is and the token that opens it.
#[derive(Debug, Args)]
pub struct AdminRemote {
    /// Base URL of the cachectl server.
    #[arg(long, env = "CACHECTL_SERVER", global = true)]
    server: Option<String>,
    /// An admin token (`[[admin.tokens]]`), not an account's.
    #[arg(long, env = "CACHECTL_ADMIN_TOKEN", global = true, hide_env_values = true)]
    admin_token: Option<String>,
    /// Client configuration file with `server = "..."` (default: ~/.config/cachectl/client.toml).
    #[arg(long, env = "CACHECTL_CLIENT_CONFIG", global = true)]
    client_config: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

/// `cachectl admin`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Make a new admin token: prints the token (give it to its holder) and the
    /// `[[admin.tokens]]` entry with its SHA-256 (put it in the configuration file).
    NewToken {
        /// Who will hold it (recorded in the audit log).
        #[arg(long, default_value = "admin")]
        name: String,
    },
    /// Accounts.
    #[command(subcommand)]
    Accounts(AccountCommand),
    /// Tokens and BCE access keys of an account.
    #[command(subcommand)]
    Keys(KeyCommand),
    /// Edges.
    #[command(subcommand)]
    Edges(EdgeCommand),
    /// The audit log, newest first.
    Audit {
        /// Only this actor (`admin`, or an account).
        #[arg(long)]
        actor: Option<String>,
        /// Only actions starting with this (`account.`, `task.submit`).
        #[arg(long)]
        action: Option<String>,
        /// Entries at most.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// Daily quotas and the rate limit of an account.
#[derive(Debug, Args)]
pub struct Limits {
    /// Refreshed URLs per day.
    #[arg(long)]
    refresh_urls: Option<u64>,
    /// Refreshed directories per day.
    #[arg(long)]
    refresh_dirs: Option<u64>,
    /// Prefetched URLs per day.
    #[arg(long)]
    prefetch_urls: Option<u64>,
    /// Purged cache tags per day.
    #[arg(long)]
    refresh_tags: Option<u64>,
    /// Regex purges per day.
    #[arg(long)]
    refresh_regexes: Option<u64>,
    /// Requests per minute per credential per endpoint.
    #[arg(long)]
    rate_limit: Option<u32>,
}

impl Limits {
    fn quotas(&self) -> Option<Value> {
        let q = [
            ("refresh_urls", self.refresh_urls),
            ("refresh_dirs", self.refresh_dirs),
            ("prefetch_urls", self.prefetch_urls),
            ("refresh_tags", self.refresh_tags),
            ("refresh_regexes", self.refresh_regexes),
        ];
        q.iter()
            .any(|(_, v)| v.is_some())
            .then(|| Value::Object(q.iter().filter_map(|(k, v)| v.map(|v| ((*k).to_owned(), json!(v)))).collect()))
    }
}

/// `cachectl admin accounts`.
#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Every account.
    List,
    /// One account.
    Show {
        /// Its name.
        name: String,
    },
    /// Create an account.
    Create {
        /// Its name.
        name: String,
        /// A domain it owns (repeatable): `www.example.com` or `*.example.com`.
        #[arg(long = "domain", required = true)]
        domains: Vec<String>,
        #[command(flatten)]
        limits: Limits,
    },
    /// Change an account's domains, quotas or rate limit (the quotas given replace all five).
    Set {
        /// Its name.
        name: String,
        /// Its domains (repeatable; replaces them all).
        #[arg(long = "domain")]
        domains: Vec<String>,
        #[command(flatten)]
        limits: Limits,
    },
    /// Refuse every credential of an account.
    Disable {
        /// Its name.
        name: String,
    },
    /// Accept an account's credentials again.
    Enable {
        /// Its name.
        name: String,
    },
}

/// `cachectl admin keys`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// An account's tokens and access keys (never their secrets).
    List {
        /// The account.
        account: String,
    },
    /// Issue a token (printed once).
    IssueToken {
        /// The account.
        account: String,
        /// A label.
        #[arg(long)]
        name: Option<String>,
    },
    /// Issue a BCE access key pair (the secret key printed once).
    IssueAccessKey {
        /// The account.
        account: String,
        /// A label.
        #[arg(long)]
        name: Option<String>,
    },
    /// Replace a token or access key; the old one keeps working for the overlap.
    Rotate {
        /// The account.
        account: String,
        /// The credential's id (`tok_…` or the access key id).
        id: String,
        /// How long the old one keeps working (default 24h, at most 30d).
        #[arg(long)]
        overlap: Option<String>,
    },
    /// End a token or access key now.
    Revoke {
        /// The account.
        account: String,
        /// The credential's id.
        id: String,
    },
}

/// `cachectl admin edges`.
#[derive(Debug, Subcommand)]
pub enum EdgeCommand {
    /// Every edge with its state.
    List,
    /// Add an edge (HTTP transport).
    Add {
        /// Its node name.
        name: String,
        /// `varnish` or `nginx`.
        #[arg(long)]
        driver: String,
        /// `host:port` of the cache's HTTP listener.
        #[arg(long)]
        address: String,
        /// `parent` or `edge`.
        #[arg(long)]
        tier: Option<String>,
        /// A domain it serves (repeatable; default all).
        #[arg(long = "domain")]
        domains: Vec<String>,
    },
    /// Send no new items to an edge; what it started finishes.
    Drain {
        /// Its node name.
        name: String,
    },
    /// Put a drained edge back into service.
    Activate {
        /// Its node name.
        name: String,
    },
    /// Remove an edge added through the API.
    Remove {
        /// Its node name.
        name: String,
    },
}

/// A request of the admin API and how its answer is printed.
type Request = (reqwest::Method, String, Option<Value>, fn(&Value) -> String);

/// Runs `cachectl admin <command>`.
///
/// # Errors
/// See `Failure`.
pub async fn run(command: AdminCommand, remote: &AdminRemote) -> Result<u8, Failure> {
    use reqwest::Method;
    if let AdminCommand::NewToken { name } = &command {
        let token = format!("cca_{}", hex::encode(rand::random::<[u8; 32]>()));
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
        println!("token: {token}");
        println!("\nAdd to the configuration file (then send SIGHUP or restart):\n");
        println!("[[admin.tokens]]\nname = {name:?}\nsha256 = \"{hash}\"");
        return Ok(exit::OK);
    }
    let Some(token) = remote.admin_token.clone() else {
        return Err(Failure {
            code: exit::UNAUTHORIZED,
            message: "no admin token: pass --admin-token or set CACHECTL_ADMIN_TOKEN".into(),
        });
    };
    let conn = Connection::resolve(remote.server.clone(), Some(token), remote.client_config.as_deref())?;
    let client = Client::new(conn).map_err(|e| Failure { code: exit::SERVER, message: format!("{e:#}") })?;
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
    let (method, path, body, render): Request = match command {
        AdminCommand::NewToken { .. } => unreachable!("answered above"),
        AdminCommand::Accounts(c) => match c {
            AccountCommand::List => (Method::GET, "/admin/v1/accounts".into(), None, render_accounts),
            AccountCommand::Show { name } => (Method::GET, format!("/admin/v1/accounts/{}", enc(&name)), None, pretty),
            AccountCommand::Create { name, domains, limits } => {
                let body = json!({"name": name, "domains": domains, "quotas": limits.quotas(), "rate_limit_per_minute": limits.rate_limit});
                (Method::POST, "/admin/v1/accounts".into(), Some(body), pretty)
            }
            AccountCommand::Set { name, domains, limits } => {
                let mut body = json!({"quotas": limits.quotas(), "rate_limit_per_minute": limits.rate_limit});
                if !domains.is_empty() {
                    body["domains"] = json!(domains);
                }
                (Method::PATCH, format!("/admin/v1/accounts/{}", enc(&name)), Some(body), pretty)
            }
            AccountCommand::Disable { name } => {
                (Method::PATCH, format!("/admin/v1/accounts/{}", enc(&name)), Some(json!({"disabled": true})), pretty)
            }
            AccountCommand::Enable { name } => {
                (Method::PATCH, format!("/admin/v1/accounts/{}", enc(&name)), Some(json!({"disabled": false})), pretty)
            }
        },
        AdminCommand::Keys(c) => match c {
            KeyCommand::List { account } => {
                (Method::GET, format!("/admin/v1/accounts/{}/credentials", enc(&account)), None, render_credentials)
            }
            KeyCommand::IssueToken { account, name } => (
                Method::POST,
                format!("/admin/v1/accounts/{}/tokens", enc(&account)),
                Some(json!({"name": name})),
                render_issued,
            ),
            KeyCommand::IssueAccessKey { account, name } => (
                Method::POST,
                format!("/admin/v1/accounts/{}/access-keys", enc(&account)),
                Some(json!({"name": name})),
                render_issued,
            ),
            KeyCommand::Rotate { account, id, overlap } => (
                Method::POST,
                format!("/admin/v1/accounts/{}/credentials/{}/rotate", enc(&account), enc(&id)),
                Some(json!({"overlap": overlap})),
                render_issued,
            ),
            KeyCommand::Revoke { account, id } => (
                Method::POST,
                format!("/admin/v1/accounts/{}/credentials/{}/revoke", enc(&account), enc(&id)),
                None,
                |_| "revoked\n".to_owned(),
            ),
        },
        AdminCommand::Edges(c) => match c {
            EdgeCommand::List => (Method::GET, "/admin/v1/edges".into(), None, render_edges),
            EdgeCommand::Add { name, driver, address, tier, domains } => {
                let body =
                    json!({"name": name, "driver": driver, "address": address, "tier": tier, "domains": domains});
                (Method::POST, "/admin/v1/edges".into(), Some(body), pretty)
            }
            EdgeCommand::Drain { name } => {
                (Method::POST, format!("/admin/v1/edges/{}/drain", enc(&name)), None, pretty)
            }
            EdgeCommand::Activate { name } => {
                (Method::POST, format!("/admin/v1/edges/{}/activate", enc(&name)), None, pretty)
            }
            EdgeCommand::Remove { name } => {
                (Method::DELETE, format!("/admin/v1/edges/{}", enc(&name)), None, |_| "removed\n".to_owned())
            }
        },
        AdminCommand::Audit { actor, action, limit } => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(actor.map(|a| ("actor", a)));
            query.extend(action.map(|a| ("action", a)));
            let qs = serde_urlencoded::to_string(&query).unwrap_or_default();
            (Method::GET, format!("/admin/v1/audit?{qs}"), None, render_audit)
        }
    };
    let value = client.admin(method, &path, body.as_ref()).await?;
    if remote.json {
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
    } else {
        print!("{}", render(&value));
    }
    Ok(exit::OK)
}

fn pretty(value: &Value) -> String {
    format!("{}\n", serde_json::to_string_pretty(value).unwrap_or_default())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn render_accounts(value: &Value) -> String {
    let mut rows =
        vec![["ACCOUNT".to_owned(), "SOURCE".into(), "DISABLED".into(), "DOMAINS".into(), "RATE/MIN".into()]];
    for a in value["accounts"].as_array().into_iter().flatten() {
        let domains: Vec<String> = a["domains"].as_array().into_iter().flatten().map(text).collect();
        rows.push([
            text(&a["name"]),
            text(&a["source"]),
            text(&a["disabled"]),
            domains.join(","),
            text(&a["rate_limit_per_minute"]),
        ]);
    }
    crate::client::table(&rows)
}

fn render_credentials(value: &Value) -> String {
    let mut rows =
        vec![["ID".to_owned(), "KIND".into(), "NAME".into(), "SOURCE".into(), "ACTIVE".into(), "EXPIRES".into()]];
    for c in value["credentials"].as_array().into_iter().flatten() {
        rows.push([
            text(&c["id"]),
            text(&c["kind"]),
            text(&c["name"]),
            text(&c["source"]),
            text(&c["active"]),
            text(&c["expires_at"]),
        ]);
    }
    crate::client::table(&rows)
}

fn render_issued(value: &Value) -> String {
    let mut out =
        format!("{} {} issued for account {}\n", text(&value["kind"]), text(&value["id"]), text(&value["account"]));
    if value["kind"] == "access_key" {
        out.push_str(&format!("access key id: {}\nsecret key:    {}\n", text(&value["id"]), text(&value["secret"])));
    } else {
        out.push_str(&format!("token: {}\n", text(&value["secret"])));
    }
    if !value["replaces_until"].is_null() {
        out.push_str(&format!("the credential it replaces works until {}\n", text(&value["replaces_until"])));
    }
    out.push_str("The secret is shown only now: store it safely.\n");
    out
}

fn render_edges(value: &Value) -> String {
    let mut rows = vec![[
        "EDGE".to_owned(),
        "TIER".into(),
        "DRIVER".into(),
        "TRANSPORT".into(),
        "ADDRESS".into(),
        "SOURCE".into(),
        "STATE".into(),
    ]];
    for e in value["edges"].as_array().into_iter().flatten() {
        rows.push([
            text(&e["name"]),
            text(&e["tier"]),
            text(&e["driver"]),
            text(&e["transport"]),
            text(&e["address"]),
            text(&e["source"]),
            text(&e["state"]),
        ]);
    }
    crate::client::table(&rows)
}

fn render_audit(value: &Value) -> String {
    let mut rows = vec![[
        "AT".to_owned(),
        "ACTOR".into(),
        "CREDENTIAL".into(),
        "ADDRESS".into(),
        "ACTION".into(),
        "TARGET".into(),
    ]];
    for e in value["entries"].as_array().into_iter().flatten() {
        rows.push([
            text(&e["at"]),
            text(&e["actor"]),
            text(&e["credential"]),
            text(&e["address"]),
            text(&e["action"]),
            text(&e["target"]),
        ]);
    }
    crate::client::table(&rows)
}
