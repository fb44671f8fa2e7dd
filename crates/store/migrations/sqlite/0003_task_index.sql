-- A task's count and page are read on the index alone: it now holds the kind and the creation
-- time (and, as every SQLite index, the rowid), so neither reads a table row to filter or sort.
-- The account is checked once on the task. Rebuilding the index takes a few seconds per million
-- items when an existing store is migrated.
DROP INDEX items_task;
CREATE INDEX items_task ON items (task_id, kind, created_at);
