-- Tag and regex purges and soft purges (docs/native-api.md, "Tag and regex purges").
--
-- items.item_type now also holds 'tag' and 'regex' (the url column then holds
-- 'tag:<host>:<tag>' or 'regex:<host>:<regex>'), and quota_usage.bucket 'refresh_tag' and
-- 'refresh_regex'; neither needs a schema change. `soft` is 1 for a soft purge: the objects are
-- marked stale (kept for grace) instead of removed. Soft items are never coalesced with hard ones.
ALTER TABLE items ADD COLUMN soft INTEGER NOT NULL DEFAULT 0;
