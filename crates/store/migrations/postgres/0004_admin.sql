-- Live administration (docs/administration.md): accounts, credentials and edges the admin API
-- adds or changes while the service runs, the audit log, and the counter that tells every
-- instance to reload. An account or edge row whose spec is NULL belongs to the configuration
-- file and records only what the API set on it (disabled, draining).
CREATE TABLE accounts (
    name        TEXT    PRIMARY KEY,
    spec        TEXT,
    disabled    BIGINT  NOT NULL DEFAULT 0,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);

-- Tokens are kept as their SHA-256 (secret_hash), access keys' secrets sealed with AES-256-GCM
-- under the service's key (sealed_secret); neither is ever kept in clear.
CREATE TABLE credentials (
    id             TEXT    PRIMARY KEY,
    kind           TEXT    NOT NULL,
    account        TEXT    NOT NULL,
    name           TEXT    NOT NULL,
    secret_hash    TEXT    UNIQUE,
    sealed_secret  TEXT,
    created_at     BIGINT  NOT NULL,
    expires_at     BIGINT
);
CREATE INDEX credentials_account ON credentials (account);

CREATE TABLE edges (
    name        TEXT    PRIMARY KEY,
    spec        TEXT,
    state       TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);

-- Append-only: rows are inserted, and deleted only by the retention sweep.
CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT  NOT NULL,
    actor       TEXT    NOT NULL,
    credential  TEXT    NOT NULL,
    address     TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    target      TEXT    NOT NULL,
    detail      TEXT    NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);

CREATE TABLE directory_version (
    id       BIGINT  PRIMARY KEY CHECK (id = 1),
    version  BIGINT  NOT NULL
);
INSERT INTO directory_version (id, version) VALUES (1, 0);
