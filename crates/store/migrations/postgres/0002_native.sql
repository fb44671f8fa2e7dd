-- What the native API adds: task completion (for webhooks and the progress stream),
-- coalescing of identical waiting URLs, refresh-then-prefetch ordering, idempotent submits,
-- and the webhook outbox with its delivery log.

-- How many of the task's items are not final yet, kept in step with every transition, and when
-- the last one became final (set in the transaction that made it so). `notified` is 0 until the
-- webhook dispatcher has queued the task's notifications.
ALTER TABLE tasks ADD COLUMN pending BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN finished_at BIGINT;
ALTER TABLE tasks ADD COLUMN notified BIGINT NOT NULL DEFAULT 1;
CREATE INDEX tasks_unnotified ON tasks (id) WHERE finished_at IS NOT NULL AND notified = 0;
-- Idempotency-Key of a native submit, with a hash of its body: the same key and body return
-- the same task, the same key with another body is a conflict.
ALTER TABLE tasks ADD COLUMN idempotency_key TEXT;
ALTER TABLE tasks ADD COLUMN request_hash TEXT;
CREATE UNIQUE INDEX tasks_idempotency ON tasks (account, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- The tasks of an account, newest first, for the native task list.
CREATE INDEX tasks_account ON tasks (account, id);

-- A coalesced item is never executed itself: it mirrors the waiting item it follows.
ALTER TABLE items ADD COLUMN follows BIGINT;
-- A prefetch of a refresh-then-prefetch task runs only once this refresh item completed.
ALTER TABLE items ADD COLUMN depends_on BIGINT;
CREATE INDEX items_follows ON items (follows) WHERE follows IS NOT NULL;
CREATE INDEX items_depends ON items (depends_on) WHERE depends_on IS NOT NULL;

-- One row per webhook URL to notify of a finished task: the outbox the dispatcher works from.
CREATE TABLE webhook_jobs (
    id          BIGSERIAL PRIMARY KEY,
    task_id     BIGINT NOT NULL,
    account     TEXT    NOT NULL,
    url         TEXT    NOT NULL,
    attempts    BIGINT NOT NULL DEFAULT 0,
    state       TEXT    NOT NULL DEFAULT 'pending',   -- 'pending' | 'delivered' | 'failed'
    next_at     BIGINT NOT NULL,
    lease_until BIGINT,
    UNIQUE (task_id, url)
);
CREATE INDEX webhook_jobs_due ON webhook_jobs (next_at) WHERE state = 'pending';

-- Every delivery attempt, for the API's delivery log.
CREATE TABLE webhook_deliveries (
    id          BIGSERIAL PRIMARY KEY,
    job_id      BIGINT NOT NULL,
    task_id     BIGINT NOT NULL,
    account     TEXT    NOT NULL,
    url         TEXT    NOT NULL,
    attempt     BIGINT NOT NULL,
    status_code BIGINT,
    error       TEXT,
    at          BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_task ON webhook_deliveries (account, task_id);
