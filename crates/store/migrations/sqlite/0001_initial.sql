-- The first schema of cachectl on SQLite.
--
-- Tasks are submissions. Items repeat the task's account, kind and operator so that every query
-- the dialects make is answered from the items table and its indexes alone, without a join.
-- All times are milliseconds since the Unix epoch, UTC.

CREATE TABLE tasks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after the retention sweep
    account     TEXT    NOT NULL,
    kind        TEXT    NOT NULL,                   -- 'refresh' | 'prefetch'
    operator    TEXT    NOT NULL,                   -- token name or access key id, never a secret
    dialect     TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX tasks_created ON tasks (created_at);

CREATE TABLE items (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     INTEGER NOT NULL REFERENCES tasks (id),
    account     TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    url         TEXT    NOT NULL,
    host        TEXT    NOT NULL,
    item_type   TEXT    NOT NULL,                   -- 'url' | 'dir'
    status      TEXT    NOT NULL DEFAULT 'waiting', -- derived from node_results by the worker
    progress    INTEGER NOT NULL DEFAULT 0,
    operator    TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    not_before  INTEGER NOT NULL,                   -- scheduled prefetch: not executed before
    started_at  INTEGER,                            -- first sent to a node; the deadline counts from here
    finished_at INTEGER,
    reason      TEXT,
    lease_owner TEXT,                               -- the worker executing it, until lease_until
    lease_until INTEGER
);
-- Baishan mode 1: one task's items.
CREATE INDEX items_task ON items (task_id);
-- Baishan mode 2: an account's items of a kind in a window, newest first (rowid breaks ties).
CREATE INDEX items_window ON items (account, kind, created_at);
-- One URL's records in a window.
CREATE INDEX items_url ON items (account, kind, url, created_at);
-- The worker's queue: only unfinished items are in this partial index, so it stays small.
CREATE INDEX items_runnable ON items (not_before) WHERE status IN ('waiting', 'processing');
-- The leases one worker holds (renewal, release).
CREATE INDEX items_lease ON items (lease_owner) WHERE lease_owner IS NOT NULL;
-- The retention sweep.
CREATE INDEX items_created ON items (created_at);

-- One row per item and node, written when a node finishes or an attempt fails.
CREATE TABLE node_results (
    item_id     INTEGER NOT NULL,
    node        TEXT    NOT NULL,
    instance    TEXT    NOT NULL DEFAULT '',        -- the worker that wrote this result
    state       TEXT    NOT NULL,                   -- 'pending' | 'succeeded' | 'failed'
    attempts    INTEGER NOT NULL,
    status_code INTEGER,
    error       TEXT,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (item_id, node)
) WITHOUT ROWID;

-- Daily quota counters, charged in the same transaction that stores the task.
CREATE TABLE quota_usage (
    account TEXT    NOT NULL,
    bucket  TEXT    NOT NULL,                       -- 'refresh_url' | 'refresh_dir' | 'prefetch_url'
    day     TEXT    NOT NULL,                       -- YYYY-MM-DD in the quota time zone
    used    INTEGER NOT NULL,
    PRIMARY KEY (account, bucket, day)
) WITHOUT ROWID;

-- Items per account, kind and hour (created_at / 3,600,000): a window's exact total is the sum
-- of its whole hours plus a count of the two partial hours at its edges, so `total` never
-- needs to scan the window. Kept in step by create_task and the retention sweep.
CREATE TABLE item_counts (
    account TEXT    NOT NULL,
    kind    TEXT    NOT NULL,
    hour    INTEGER NOT NULL,
    n       INTEGER NOT NULL,
    PRIMARY KEY (account, kind, hour)
) WITHOUT ROWID;

