-- The first schema of cachectl on PostgreSQL: the same tables as on SQLite (see
-- migrations/sqlite/0001_initial.sql for what each column means), with PostgreSQL types.
-- All times are milliseconds since the Unix epoch, UTC; every integer is BIGINT so that both
-- backends decode the same Rust types.

CREATE TABLE tasks (
    id          BIGSERIAL PRIMARY KEY,
    account     TEXT   NOT NULL,
    kind        TEXT   NOT NULL,
    operator    TEXT   NOT NULL,
    dialect     TEXT   NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX tasks_created ON tasks (created_at);

CREATE TABLE items (
    id          BIGSERIAL PRIMARY KEY,
    task_id     BIGINT   NOT NULL REFERENCES tasks (id),
    account     TEXT     NOT NULL,
    kind        TEXT     NOT NULL,
    url         TEXT     NOT NULL,
    host        TEXT     NOT NULL,
    item_type   TEXT     NOT NULL,
    status      TEXT     NOT NULL DEFAULT 'waiting',
    progress    BIGINT   NOT NULL DEFAULT 0,
    operator    TEXT     NOT NULL,
    created_at  BIGINT   NOT NULL,
    not_before  BIGINT   NOT NULL,
    started_at  BIGINT,
    finished_at BIGINT,
    reason      TEXT,
    lease_owner TEXT,
    lease_until BIGINT
);
-- Baishan mode 1 and the Baidu `id` queries.
CREATE INDEX items_task ON items (task_id, id);
-- Windows per account and kind, both directions (Baishan newest first, Baidu ascending), with
-- the id as the tie-breaker of the keyset.
CREATE INDEX items_window ON items (account, kind, created_at, id);
-- One URL's records.
CREATE INDEX items_url ON items (account, kind, url, created_at, id);
-- The work queue: only unfinished items, so it stays small; claims take it with SKIP LOCKED.
CREATE INDEX items_runnable ON items (not_before, id) WHERE status IN ('waiting', 'processing');
-- The leases one instance holds (renewal, release).
CREATE INDEX items_lease ON items (lease_owner) WHERE lease_owner IS NOT NULL;
-- The retention sweep.
CREATE INDEX items_created ON items (created_at);

CREATE TABLE node_results (
    item_id     BIGINT  NOT NULL,
    node        TEXT    NOT NULL,
    instance    TEXT    NOT NULL DEFAULT '',
    state       TEXT    NOT NULL,
    attempts    BIGINT  NOT NULL,
    status_code BIGINT,
    error       TEXT,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (item_id, node)
);

CREATE TABLE quota_usage (
    account TEXT   NOT NULL,
    bucket  TEXT   NOT NULL,
    day     TEXT   NOT NULL,
    used    BIGINT NOT NULL,
    PRIMARY KEY (account, bucket, day)
);

CREATE TABLE item_counts (
    account TEXT   NOT NULL,
    kind    TEXT   NOT NULL,
    hour    BIGINT NOT NULL,
    n       BIGINT NOT NULL,
    PRIMARY KEY (account, kind, hour)
);

-- Baishan rate-limit counters shared by every instance: one row per credential, endpoint and
-- minute, incremented atomically. Old windows are deleted by the retention sweep.
CREATE TABLE rate_windows (
    credential TEXT    NOT NULL,   -- SHA-256 of the token, never the token
    api_id     BIGINT  NOT NULL,
    minute     BIGINT  NOT NULL,
    count      BIGINT  NOT NULL,
    PRIMARY KEY (credential, api_id, minute)
);
