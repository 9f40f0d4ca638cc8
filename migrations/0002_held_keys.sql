-- Version 2 of an outbox table: rows behind a held key leave the due index. {table}, {schema},
-- {due_index}, {held_index} and {order_trigger} are replaced by validated, quoted names.
-- ADD COLUMN with a constant default does not rewrite the table; the due index is built anew
-- (CREATE INDEX blocks writes to the table while it runs: seconds per million pending rows).
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS held boolean NOT NULL DEFAULT false;

DROP INDEX IF EXISTS {schema}.{due_index};
CREATE INDEX {due_index} ON {table} (id)
    WHERE published_at IS NULL AND parked_at IS NULL AND NOT held;

-- The rows waiting behind held keys, by key: what a release puts back, and what `status` counts.
CREATE INDEX IF NOT EXISTS {held_index} ON {table} (ordering_key, id)
    WHERE published_at IS NULL AND held;

DROP TRIGGER IF EXISTS {order_trigger} ON {table};
CREATE TRIGGER {order_trigger} BEFORE INSERT ON {table}
    FOR EACH ROW EXECUTE FUNCTION outbox_relay.order_guard_v2();
