//! The admin API under `/admin/v1` (docs/administration.md): accounts, their tokens and access
//! keys, edges, and the audit log, changed while the service runs. Only an admin token
//! (`[[admin.tokens]]`, kept as its SHA-256) opens it; an account's token never does. Every change
//! is one store transaction with its audit entry; this instance rebuilds its directory at once,
//! the others within `[admin] poll_interval`. Errors use the native API's JSON shape.

use super::AppState;
use super::native::{ApiError, ErrorBody};
use crate::clock::now_ms;
use crate::config::{EdgeConfig, EdgeTransport, QuotaConfig};
use crate::directory::{AccountSpec, Directory, Source};
use crate::wire::views::time;
use axum::Json;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use cachectl_core::Timestamp;
use cachectl_core::admin::{
    AccountRow, AuditEntry, AuditQuery, ChangeError, CredentialKind, CredentialRow, DirectoryChange, EdgeRow, EdgeState,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};

/// The longest overlap of a rotation: old and new credential both work this long at most.
const MAX_OVERLAP: Duration = Duration::from_secs(30 * 86_400);
/// The overlap of a rotation when none is given.
const DEFAULT_OVERLAP: Duration = Duration::from_secs(86_400);

/// A caller holding an admin token.
pub struct Admin {
    name: String,
    address: String,
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| unauthorized("missing Authorization: Bearer <admin token>"))?;
        let directory = state.directory.current();
        let name = directory.admin(token).ok_or_else(|| unauthorized("not an admin token"))?;
        Ok(Self { name: name.to_owned(), address: crate::auth::client_address(parts) })
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "conflict", message)
}

impl Admin {
    fn audit(&self, action: &str, target: &str, detail: serde_json::Value) -> AuditEntry {
        AuditEntry {
            id: 0,
            at: now_ms(),
            actor: "admin".to_owned(),
            credential: self.name.clone(),
            address: self.address.clone(),
            action: action.to_owned(),
            target: target.to_owned(),
            detail: detail.to_string(),
        }
    }
}

/// Applies `change` with its audit entry and rebuilds this instance's directory.
async fn apply(state: &AppState, change: DirectoryChange, audit: AuditEntry) -> Result<(), ApiError> {
    state.directory_store().change_directory(&change, &audit).await.map_err(|e| match e {
        ChangeError::Conflict(what) => conflict(format!("{what} already exists")),
        ChangeError::NotFound(what) => ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no such {what}")),
        ChangeError::Store(e) => e.into(),
    })?;
    state.directory.reload().await.map_err(|e| {
        tracing::warn!(error = %e, "Rebuilding the directory after an admin change failed; the poll will retry.");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "stored, but not yet visible; retry the read")
    })
}

// ---------------------------------------------------------------------------------------------
// Accounts

/// Daily quotas; an absent one takes its default.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaBody {
    /// Refreshed URLs per day (default 10,000).
    pub refresh_urls: Option<u64>,
    /// Refreshed directories per day (default 100).
    pub refresh_dirs: Option<u64>,
    /// Prefetched URLs per day (default 10,000).
    pub prefetch_urls: Option<u64>,
    /// Purged cache tags per day (default 10,000).
    pub refresh_tags: Option<u64>,
    /// Regex purges per day (default 100).
    pub refresh_regexes: Option<u64>,
}

impl From<QuotaBody> for QuotaConfig {
    fn from(q: QuotaBody) -> Self {
        Self {
            refresh_urls: q.refresh_urls,
            refresh_dirs: q.refresh_dirs,
            prefetch_urls: q.prefetch_urls,
            refresh_tags: q.refresh_tags,
            refresh_regexes: q.refresh_regexes,
        }
    }
}

/// A new account.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    /// Unique name: 1 to 64 of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// Domains it owns: `www.example.com` or `*.example.com`.
    pub domains: Vec<String>,
    /// Daily quotas.
    #[serde(default)]
    pub quotas: Option<QuotaBody>,
    /// Requests per minute per credential per endpoint (default: `[baishan] rate_limit_per_minute`).
    #[serde(default)]
    pub rate_limit_per_minute: Option<u32>,
}

/// A change of an account: the fields given replace the account's. An account of the
/// configuration file takes only `disabled`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountChange {
    /// New domains.
    pub domains: Option<Vec<String>>,
    /// New quotas (replacing all five).
    pub quotas: Option<QuotaBody>,
    /// New rate limit.
    pub rate_limit_per_minute: Option<u32>,
    /// Refuse (true) or accept again (false) every credential of the account.
    pub disabled: Option<bool>,
}

/// An account.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountView {
    /// Its name.
    pub name: String,
    /// `file` (the configuration file) or `api`.
    pub source: Source,
    /// Whether its credentials are refused.
    pub disabled: bool,
    /// Domains it owns.
    pub domains: Vec<String>,
    /// Daily quotas in force.
    pub quotas: QuotaView,
    /// Requests per minute per credential per endpoint.
    pub rate_limit_per_minute: u32,
}

/// Daily quotas in force.
#[derive(Debug, Serialize, ToSchema)]
pub struct QuotaView {
    /// Refreshed URLs per day.
    pub refresh_urls: u64,
    /// Refreshed directories per day.
    pub refresh_dirs: u64,
    /// Prefetched URLs per day.
    pub prefetch_urls: u64,
    /// Purged cache tags per day.
    pub refresh_tags: u64,
    /// Regex purges per day.
    pub refresh_regexes: u64,
}

/// Accounts.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountList {
    /// By name.
    pub accounts: Vec<AccountView>,
}

fn account_view(directory: &Directory, name: &str) -> Option<AccountView> {
    let entry = directory.accounts.get(name)?;
    let a = &entry.account;
    let q = a.quotas;
    Some(AccountView {
        name: a.name.as_str().to_owned(),
        source: entry.source,
        disabled: entry.disabled,
        domains: a.domains.iter().map(ToString::to_string).collect(),
        quotas: QuotaView {
            refresh_urls: q.refresh_urls,
            refresh_dirs: q.refresh_dirs,
            prefetch_urls: q.prefetch_urls,
            refresh_tags: q.refresh_tags,
            refresh_regexes: q.refresh_regexes,
        },
        rate_limit_per_minute: a.rate_limit_per_minute,
    })
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Checks `spec` as the file's accounts are checked.
fn check_spec(state: &AppState, name: &str, spec: &AccountSpec) -> Result<(), ApiError> {
    let default_rate = state.directory.file().default_rate_limit;
    crate::config::build_account(name, &spec.domains, &spec.quotas, spec.rate_limit_per_minute, default_rate)
        .map(|_| ())
        .map_err(|(field, m)| ApiError::invalid(format!("{field}: {m}")))
}

/// Every account.
#[utoipa::path(get, path = "/admin/v1/accounts", tag = "admin",
    responses((status = 200, body = AccountList), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
pub async fn list_accounts(State(state): State<AppState>, _admin: Admin) -> Json<AccountList> {
    let directory = state.directory.current();
    let mut names: Vec<&String> = directory.accounts.keys().collect();
    names.sort();
    Json(AccountList { accounts: names.into_iter().filter_map(|n| account_view(&directory, n)).collect() })
}

/// Creates an account.
#[utoipa::path(post, path = "/admin/v1/accounts", tag = "admin", request_body = NewAccount,
    responses((status = 201, body = AccountView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_account(
    State(state): State<AppState>,
    admin: Admin,
    body: Result<Json<NewAccount>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<AccountView>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    if !valid_name(&body.name) {
        return Err(ApiError::invalid("name: 1 to 64 of A-Z a-z 0-9 . _ -"));
    }
    if state.directory.current().accounts.contains_key(&body.name) {
        return Err(conflict(format!("account {:?} already exists", body.name)));
    }
    let spec = AccountSpec {
        domains: body.domains,
        quotas: body.quotas.unwrap_or_default().into(),
        rate_limit_per_minute: body.rate_limit_per_minute,
    };
    check_spec(&state, &body.name, &spec)?;
    let now = now_ms();
    let text = serde_json::to_string(&spec).unwrap_or_default();
    let row = AccountRow {
        name: body.name.clone(),
        spec: Some(text.clone()),
        disabled: false,
        created_at: now,
        updated_at: now,
    };
    let detail = serde_json::from_str(&text).unwrap_or_default();
    apply(&state, DirectoryChange::CreateAccount(row), admin.audit("account.create", &body.name, detail)).await?;
    let view = account_view(&state.directory.current(), &body.name).ok_or_else(|| ApiError::not_found("account"))?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// One account.
#[utoipa::path(get, path = "/admin/v1/accounts/{name}", tag = "admin", params(("name" = String, Path)),
    responses((status = 200, body = AccountView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_account(
    State(state): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<AccountView>, ApiError> {
    account_view(&state.directory.current(), &name).map(Json).ok_or_else(|| ApiError::not_found("account"))
}

/// Changes an account (an account of the configuration file: only `disabled`).
#[utoipa::path(patch, path = "/admin/v1/accounts/{name}", tag = "admin", params(("name" = String, Path)),
    request_body = AccountChange,
    responses((status = 200, body = AccountView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "A file account's settings", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn change_account(
    State(state): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
    body: Result<Json<AccountChange>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<AccountView>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    let directory = state.directory.current();
    let entry = directory.accounts.get(&name).ok_or_else(|| ApiError::not_found("account"))?;
    let now = now_ms();
    let disabled = body.disabled.unwrap_or(entry.disabled);
    let spec = match (&entry.spec, entry.source) {
        (_, Source::File) => {
            if body.domains.is_some() || body.quotas.is_some() || body.rate_limit_per_minute.is_some() {
                return Err(conflict(
                    "this account is defined in the configuration file: change it there and send SIGHUP; \
                     the API can only disable it",
                ));
            }
            None
        }
        (Some(old), Source::Api) => {
            let spec = AccountSpec {
                domains: body.domains.unwrap_or_else(|| old.domains.clone()),
                quotas: body.quotas.map_or_else(|| old.quotas.clone(), Into::into),
                rate_limit_per_minute: body.rate_limit_per_minute.or(old.rate_limit_per_minute),
            };
            check_spec(&state, &name, &spec)?;
            Some(serde_json::to_string(&spec).unwrap_or_default())
        }
        (None, Source::Api) => return Err(ApiError::not_found("account")),
    };
    let action = match body.disabled {
        Some(true) if !entry.disabled => "account.disable",
        Some(false) if entry.disabled => "account.enable",
        _ => "account.change",
    };
    let detail = serde_json::json!({"disabled": disabled, "spec": spec.as_deref().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())});
    let row = AccountRow { name: name.clone(), spec, disabled, created_at: now, updated_at: now };
    apply(&state, DirectoryChange::PutAccount(row), admin.audit(action, &name, detail)).await?;
    if action == "account.disable" {
        // Its queued items go now; items already leased to a worker fail there, at their start,
        // with the same reason (the worker follows the directory).
        let reason = format!("{}{name} disabled", cachectl_core::admin::CANCELLED_ACCOUNT);
        let cancelled = state.directory_store().cancel_queued(&name, &reason, now_ms()).await?;
        let detail = serde_json::json!({"cancelled_items": cancelled});
        state.directory_store().append_audit(&admin.audit("account.cancel_queued", &name, detail)).await?;
    }
    account_view(&state.directory.current(), &name).map(Json).ok_or_else(|| ApiError::not_found("account"))
}

// ---------------------------------------------------------------------------------------------
// Credentials

/// A credential, never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct CredentialView {
    /// Its id: `tok_…` for an API token, the access key id, or a file token's name.
    pub id: String,
    /// `token` or `access_key`.
    pub kind: String,
    /// Its label.
    pub name: String,
    /// `file` or `api`.
    pub source: Source,
    /// When it was issued (API credentials).
    pub created_at: Option<String>,
    /// When it stops (or stopped) working.
    pub expires_at: Option<String>,
    /// Whether it works now.
    pub active: bool,
}

/// An account's credentials.
#[derive(Debug, Serialize, ToSchema)]
pub struct CredentialList {
    /// The file's first, then the API's by issue time.
    pub credentials: Vec<CredentialView>,
}

/// A credential to issue.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    /// A label (default: the kind).
    pub name: Option<String>,
}

/// A rotation.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// How long the old credential keeps working beside the new one (`24h` by default, at most
    /// `30d`; `0s` ends it at once).
    pub overlap: Option<String>,
}

/// A credential just issued: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct Issued {
    /// The account.
    pub account: String,
    /// Its id (`tok_…`, or the access key id).
    pub id: String,
    /// `token` or `access_key`.
    pub kind: String,
    /// Its label.
    pub name: String,
    /// The token, or the secret access key. Not stored in clear and never shown again.
    pub secret: String,
    /// For a rotation: when the credential it replaces stops working.
    pub replaces_until: Option<String>,
}

async fn credential_rows(state: &AppState, account: &str) -> Result<Vec<CredentialRow>, ApiError> {
    let rows = state.directory_store().directory().await?;
    Ok(rows.credentials.into_iter().filter(|c| c.account == account).collect())
}

/// An account's tokens and access keys, never their secrets.
#[utoipa::path(get, path = "/admin/v1/accounts/{name}/credentials", tag = "admin", params(("name" = String, Path)),
    responses((status = 200, body = CredentialList), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_credentials(
    State(state): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<CredentialList>, ApiError> {
    if !state.directory.current().accounts.contains_key(&name) {
        return Err(ApiError::not_found("account"));
    }
    let file = state.directory.file();
    let now = now_ms();
    let mut credentials = Vec::new();
    let mut file_tokens: Vec<&str> =
        file.tokens.values().filter(|c| c.account.name.as_str() == name).map(|c| c.operator.as_str()).collect();
    file_tokens.sort_unstable();
    for token in file_tokens {
        credentials.push(file_credential(token, CredentialKind::Token));
    }
    let mut file_keys: Vec<&str> = file
        .access_keys
        .iter()
        .filter(|(_, (c, _))| c.account.name.as_str() == name)
        .map(|(ak, _)| ak.as_str())
        .collect();
    file_keys.sort_unstable();
    for ak in file_keys {
        credentials.push(file_credential(ak, CredentialKind::AccessKey));
    }
    for row in credential_rows(&state, &name).await? {
        credentials.push(CredentialView {
            active: row.expires_at.is_none_or(|at| now < at),
            id: row.id,
            kind: row.kind.as_str().to_owned(),
            name: row.name,
            source: Source::Api,
            created_at: Some(time(row.created_at)),
            expires_at: row.expires_at.map(time),
        });
    }
    Ok(Json(CredentialList { credentials }))
}

fn file_credential(id: &str, kind: CredentialKind) -> CredentialView {
    CredentialView {
        id: id.to_owned(),
        kind: kind.as_str().to_owned(),
        name: id.to_owned(),
        source: Source::File,
        created_at: None,
        expires_at: None,
        active: true,
    }
}

/// Makes a new credential of `kind` for `account` and its row.
fn new_credential(
    state: &AppState,
    account: &str,
    kind: CredentialKind,
    name: &str,
    now: Timestamp,
) -> Result<(CredentialRow, String), ApiError> {
    match kind {
        CredentialKind::Token => {
            let token = crate::secrets::new_token();
            let row = CredentialRow {
                id: crate::secrets::new_token_id(),
                kind,
                account: account.to_owned(),
                name: name.to_owned(),
                secret_hash: Some(hex::encode(crate::secrets::hash_token(&token))),
                sealed_secret: None,
                created_at: now,
                expires_at: None,
            };
            Ok((row, token))
        }
        CredentialKind::AccessKey => {
            let key = state.directory.file().admin.key.clone().ok_or_else(|| {
                conflict("access keys cannot be issued: set [admin] key_file, the key that seals their secrets")
            })?;
            let (ak, sk) = crate::secrets::new_access_key();
            let row = CredentialRow {
                sealed_secret: Some(key.seal(&ak, &sk)),
                id: ak,
                kind,
                account: account.to_owned(),
                name: name.to_owned(),
                secret_hash: None,
                created_at: now,
                expires_at: None,
            };
            Ok((row, sk))
        }
    }
}

async fn issue(
    state: &AppState,
    admin: &Admin,
    account: &str,
    kind: CredentialKind,
    body: IssueBody,
) -> Result<(StatusCode, Json<Issued>), ApiError> {
    if !state.directory.current().accounts.contains_key(account) {
        return Err(ApiError::not_found("account"));
    }
    let name = body.name.unwrap_or_else(|| kind.as_str().to_owned());
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid("name: 1 to 64 printable characters"));
    }
    let (row, secret) = new_credential(state, account, kind, &name, now_ms())?;
    let issued = Issued {
        account: account.to_owned(),
        id: row.id.clone(),
        kind: kind.as_str().to_owned(),
        name: name.clone(),
        secret,
        replaces_until: None,
    };
    let audit = admin.audit(
        &format!("{}.issue", kind.as_str()),
        &row.id,
        serde_json::json!({"account": account, "name": name}),
    );
    apply(state, DirectoryChange::IssueCredential(row), audit).await?;
    Ok((StatusCode::CREATED, Json(issued)))
}

/// A JSON body that may be left out (an empty body is the defaults).
fn optional<T: Default + serde::de::DeserializeOwned>(body: &bytes::Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the body is not the expected JSON: {e}")))
}

/// Issues a token (shown once).
#[utoipa::path(post, path = "/admin/v1/accounts/{name}/tokens", tag = "admin", params(("name" = String, Path)),
    request_body = IssueBody,
    responses((status = 201, body = Issued), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn issue_token(
    State(state): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<Issued>), ApiError> {
    issue(&state, &admin, &name, CredentialKind::Token, optional(&body)?).await
}

/// Issues a BCE access key pair (the secret key shown once).
#[utoipa::path(post, path = "/admin/v1/accounts/{name}/access-keys", tag = "admin", params(("name" = String, Path)),
    request_body = IssueBody,
    responses((status = 201, body = Issued), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "No [admin] key_file", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn issue_access_key(
    State(state): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<Issued>), ApiError> {
    issue(&state, &admin, &name, CredentialKind::AccessKey, optional(&body)?).await
}

async fn api_credential(state: &AppState, account: &str, id: &str) -> Result<CredentialRow, ApiError> {
    let file = state.directory.file();
    let in_file = file.tokens.values().any(|c| c.account.name.as_str() == account && c.operator == id)
        || file.access_keys.get(id).is_some_and(|(c, _)| c.account.name.as_str() == account);
    if in_file {
        return Err(conflict("this credential is in the configuration file: remove it there and send SIGHUP"));
    }
    credential_rows(state, account)
        .await?
        .into_iter()
        .find(|c| c.id == id)
        .ok_or_else(|| ApiError::not_found("credential of this account"))
}

/// Replaces a credential with a new one of the same kind and label; the old one keeps working
/// for the overlap.
#[utoipa::path(post, path = "/admin/v1/accounts/{name}/credentials/{id}/rotate", tag = "admin",
    params(("name" = String, Path), ("id" = String, Path)), request_body = RotateBody,
    responses((status = 201, body = Issued), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate(
    State(state): State<AppState>,
    admin: Admin,
    Path((name, id)): Path<(String, String)>,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<Issued>), ApiError> {
    let body: RotateBody = optional(&body)?;
    let overlap = match body.overlap.as_deref() {
        None => DEFAULT_OVERLAP,
        Some(text) => humantime::parse_duration(text)
            .ok()
            .filter(|d| *d <= MAX_OVERLAP)
            .ok_or_else(|| ApiError::invalid("overlap: a duration such as 24h, at most 30d"))?,
    };
    let old = api_credential(&state, &name, &id).await?;
    let now = now_ms();
    if old.expires_at.is_some_and(|at| at <= now) {
        return Err(conflict("this credential no longer works; issue a new one instead"));
    }
    let (row, secret) = new_credential(&state, &name, old.kind, &old.name, now)?;
    let until = now.after(overlap);
    let issued = Issued {
        account: name.clone(),
        id: row.id.clone(),
        kind: old.kind.as_str().to_owned(),
        name: old.name.clone(),
        secret,
        replaces_until: Some(time(until)),
    };
    let kind = old.kind.as_str();
    let detail = serde_json::json!({"account": name, "new": row.id, "old_expires_at": time(until)});
    apply(&state, DirectoryChange::IssueCredential(row), admin.audit(&format!("{kind}.rotate"), &id, detail)).await?;
    let expire = DirectoryChange::ExpireCredential { id: id.clone(), account: name.clone(), at: until };
    let detail = serde_json::json!({"account": name, "expires_at": time(until)});
    apply(&state, expire, admin.audit(&format!("{kind}.expire"), &id, detail)).await?;
    Ok((StatusCode::CREATED, Json(issued)))
}

/// Ends a credential now.
#[utoipa::path(post, path = "/admin/v1/accounts/{name}/credentials/{id}/revoke", tag = "admin",
    params(("name" = String, Path), ("id" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    admin: Admin,
    Path((name, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let old = api_credential(&state, &name, &id).await?;
    let change = DirectoryChange::ExpireCredential { id: id.clone(), account: name.clone(), at: now_ms() };
    let action = format!("{}.revoke", old.kind.as_str());
    apply(&state, change, admin.audit(&action, &id, serde_json::json!({"account": name}))).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Edges

/// An edge to add (the shape of an `[[edges]]` entry).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEdge {
    /// Unique node name.
    pub name: String,
    /// `varnish` or `nginx`.
    pub driver: String,
    /// `http` (the default: cachectl sends to `address`) or `nats` (through the bus to the agent
    /// of this name; needs `[bus] url`).
    #[serde(default)]
    pub transport: Option<String>,
    /// `host:port` of the cache's HTTP listener (`http` transport).
    #[serde(default)]
    pub address: String,
    /// `parent` or `edge` (the default).
    #[serde(default)]
    pub tier: Option<String>,
    /// Domains it serves (default: all).
    #[serde(default)]
    pub domains: Vec<String>,
}

/// An edge.
#[derive(Debug, Serialize, ToSchema)]
pub struct EdgeView {
    /// Node name.
    pub name: String,
    /// `varnish` or `nginx`.
    pub driver: String,
    /// `http` or `nats`.
    pub transport: String,
    /// `host:port` (HTTP edges).
    pub address: String,
    /// `parent` or `edge`.
    pub tier: String,
    /// Domains it serves (empty: all).
    pub domains: Vec<String>,
    /// `file` or `api`.
    pub source: Source,
    /// `active` or `draining`.
    pub state: String,
}

/// Edges.
#[derive(Debug, Serialize, ToSchema)]
pub struct EdgeList {
    /// The file's in its order, then the API's by name.
    pub edges: Vec<EdgeView>,
}

fn edge_view(entry: &crate::directory::EdgeEntry) -> EdgeView {
    let node = &entry.node.node;
    EdgeView {
        name: node.name.clone(),
        driver: serde_json::to_value(node.driver).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
        transport: if entry.node.via_bus { "nats" } else { "http" }.to_owned(),
        address: node.address.clone(),
        tier: node.tier.as_str().to_owned(),
        domains: node.domains.iter().map(ToString::to_string).collect(),
        source: entry.source,
        state: entry.state.as_str().to_owned(),
    }
}

/// Every edge.
#[utoipa::path(get, path = "/admin/v1/edges", tag = "admin",
    responses((status = 200, body = EdgeList), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
pub async fn list_edges(State(state): State<AppState>, _admin: Admin) -> Json<EdgeList> {
    Json(EdgeList { edges: state.directory.current().edges.iter().map(edge_view).collect() })
}

/// Adds an edge: new items go to it at once (items already running keep their nodes).
#[utoipa::path(post, path = "/admin/v1/edges", tag = "admin", request_body = NewEdge,
    responses((status = 201, body = EdgeView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn add_edge(
    State(state): State<AppState>,
    admin: Admin,
    body: Result<Json<NewEdge>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<EdgeView>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    let parse = |field: &str, text: &str| -> Result<serde_json::Value, ApiError> {
        Ok(serde_json::Value::String(text.to_owned())).and_then(|v| {
            if text.is_empty() { Err(ApiError::invalid(format!("{field}: must not be empty"))) } else { Ok(v) }
        })
    };
    let config = EdgeConfig {
        name: body.name.clone(),
        driver: serde_json::from_value(parse("driver", &body.driver)?)
            .map_err(|_| ApiError::invalid("driver: varnish or nginx"))?,
        transport: match body.transport.as_deref() {
            None | Some("http") => EdgeTransport::Http,
            Some("nats") if state.bus.is_some() => EdgeTransport::Nats,
            Some("nats") => {
                return Err(conflict("an edge reached through the bus needs [bus] url in the configuration"));
            }
            Some(_) => return Err(ApiError::invalid("transport: http or nats")),
        },
        address: body.address,
        tier: match body.tier.as_deref() {
            None => cachectl_core::Tier::Edge,
            Some(t) => {
                serde_json::from_value(parse("tier", t)?).map_err(|_| ApiError::invalid("tier: parent or edge"))?
            }
        },
        domains: body.domains,
    };
    crate::config::build_node(&config).map_err(|(field, m)| ApiError::invalid(format!("{field}: {m}")))?;
    if state.directory.current().edge(&config.name).is_some() {
        return Err(conflict(format!("edge {:?} already exists", config.name)));
    }
    let now = now_ms();
    let spec = serde_json::to_string(&config).unwrap_or_default();
    let row = EdgeRow {
        name: config.name.clone(),
        spec: Some(spec.clone()),
        state: EdgeState::Active,
        created_at: now,
        updated_at: now,
    };
    let detail = serde_json::from_str(&spec).unwrap_or_default();
    apply(&state, DirectoryChange::CreateEdge(row), admin.audit("edge.add", &config.name, detail)).await?;
    let directory = state.directory.current();
    let view = directory.edge(&config.name).map(edge_view).ok_or_else(|| ApiError::not_found("edge"))?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn set_edge_state(
    state: &AppState,
    admin: &Admin,
    name: &str,
    to: EdgeState,
) -> Result<Json<EdgeView>, ApiError> {
    let directory = state.directory.current();
    let entry = directory.edge(name).ok_or_else(|| ApiError::not_found("edge"))?;
    let now = now_ms();
    let spec = entry.spec.as_ref().map(|s| serde_json::to_string(s).unwrap_or_default());
    let row = EdgeRow { name: name.to_owned(), spec, state: to, created_at: now, updated_at: now };
    let action = if to == EdgeState::Draining { "edge.drain" } else { "edge.activate" };
    apply(state, DirectoryChange::PutEdge(row), admin.audit(action, name, serde_json::json!({}))).await?;
    state.directory.current().edge(name).map(edge_view).map(Json).ok_or_else(|| ApiError::not_found("edge"))
}

/// Drains an edge: no new items are sent to it; the items that already started on it finish.
#[utoipa::path(post, path = "/admin/v1/edges/{name}/drain", tag = "admin", params(("name" = String, Path)),
    responses((status = 200, body = EdgeView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn drain_edge(
    State(state): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<EdgeView>, ApiError> {
    set_edge_state(&state, &admin, &name, EdgeState::Draining).await
}

/// Puts a drained edge back into service.
#[utoipa::path(post, path = "/admin/v1/edges/{name}/activate", tag = "admin", params(("name" = String, Path)),
    responses((status = 200, body = EdgeView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn activate_edge(
    State(state): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<EdgeView>, ApiError> {
    set_edge_state(&state, &admin, &name, EdgeState::Active).await
}

/// Removes an edge added through the API (drain it first to let its work finish).
#[utoipa::path(delete, path = "/admin/v1/edges/{name}", tag = "admin", params(("name" = String, Path)),
    responses((status = 204, description = "Removed"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "An edge of the configuration file", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove_edge(
    State(state): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let directory = state.directory.current();
    let entry = directory.edge(&name).ok_or_else(|| ApiError::not_found("edge"))?;
    if entry.source == Source::File {
        return Err(conflict("this edge is in the configuration file: remove it there and send SIGHUP"));
    }
    apply(&state, DirectoryChange::RemoveEdge(name.clone()), admin.audit("edge.remove", &name, serde_json::json!({})))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Audit log

/// Filters of the audit log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only this actor (`admin`, or an account).
    pub actor: Option<String>,
    /// Only actions starting with this (`account.`, `task.submit`).
    pub action: Option<String>,
    /// Only entries at or after this time (RFC 3339).
    pub from: Option<String>,
    /// Only entries before this time (RFC 3339).
    pub to: Option<String>,
    /// The previous page's `next`.
    pub before: Option<i64>,
    /// Entries per page (1 to 1,000, default 100).
    pub limit: Option<u32>,
}

/// One audit entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    /// Its position.
    pub id: i64,
    /// When.
    pub at: String,
    /// `admin`, or the account.
    pub actor: String,
    /// The credential's public id (an admin token's holder, a token id or name, an access key id).
    pub credential: String,
    /// The client's address.
    pub address: String,
    /// What was done.
    pub action: String,
    /// To what.
    pub target: String,
    /// Details.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// A page of the audit log, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// The entries.
    pub entries: Vec<AuditView>,
    /// Pass as `before` for the next page; absent on the last.
    pub next: Option<i64>,
}

fn parse_time(field: &str, text: Option<&str>) -> Result<Option<Timestamp>, ApiError> {
    text.map(|t| {
        chrono::DateTime::parse_from_rfc3339(t)
            .map(|d| Timestamp::from_millis(d.timestamp_millis()))
            .map_err(|_| ApiError::invalid(format!("{field}: an RFC 3339 time such as 2026-12-01T00:00:00Z")))
    })
    .transpose()
}

/// The audit log: every admin change and every submitted task, newest first.
#[utoipa::path(get, path = "/admin/v1/audit", tag = "admin", params(AuditParams),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit_log(
    State(state): State<AppState>,
    _admin: Admin,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit: 1 to 1000"));
    }
    let query = AuditQuery {
        actor: p.actor,
        action: p.action,
        from: parse_time("from", p.from.as_deref())?,
        to: parse_time("to", p.to.as_deref())?,
        before_id: p.before,
        limit,
    };
    let entries = state.directory_store().audit_log(&query).await?;
    let next = (entries.len() == limit as usize).then(|| entries.last().map(|e| e.id)).flatten();
    let entries = entries
        .into_iter()
        .map(|e| AuditView {
            id: e.id,
            at: time(e.at),
            actor: e.actor,
            credential: e.credential,
            address: e.address,
            action: e.action,
            target: e.target,
            detail: serde_json::from_str(&e.detail).unwrap_or(serde_json::Value::Null),
        })
        .collect();
    Ok(Json(AuditPage { entries, next }))
}

/// The admin routes.
pub fn routes() -> axum::Router<AppState> {
    use axum::routing::{delete, get, post};
    axum::Router::new()
        .route("/admin/v1/accounts", get(list_accounts).post(create_account))
        .route("/admin/v1/accounts/{name}", get(get_account).patch(change_account))
        .route("/admin/v1/accounts/{name}/credentials", get(list_credentials))
        .route("/admin/v1/accounts/{name}/tokens", post(issue_token))
        .route("/admin/v1/accounts/{name}/access-keys", post(issue_access_key))
        .route("/admin/v1/accounts/{name}/credentials/{id}/rotate", post(rotate))
        .route("/admin/v1/accounts/{name}/credentials/{id}/revoke", post(revoke))
        .route("/admin/v1/edges", get(list_edges).post(add_edge))
        .route("/admin/v1/edges/{name}", delete(remove_edge))
        .route("/admin/v1/edges/{name}/drain", post(drain_edge))
        .route("/admin/v1/edges/{name}/activate", post(activate_edge))
        .route("/admin/v1/audit", get(audit_log))
        .method_not_allowed_fallback(super::native::method_not_allowed)
}
