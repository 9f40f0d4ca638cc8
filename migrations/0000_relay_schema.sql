-- The relay's own objects, shared by every outbox table. Re-applied by every `migrate`.
CREATE SCHEMA IF NOT EXISTS outbox_relay;

CREATE TABLE IF NOT EXISTS outbox_relay.migrations (
    table_name  text        NOT NULL,
    version     integer     NOT NULL,
    description text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, version)
);

-- Rows of one ordering key commit in id order: an inserting transaction first takes the key's
-- transaction-scoped advisory lock, then draws its id. A second producer of the same key waits
-- for the first to commit, so it can never commit a smaller id after a larger one was published.
CREATE OR REPLACE FUNCTION outbox_relay.order_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(
        hashtext(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME),
        hashtext(NEW.ordering_key));
    NEW.id := nextval(pg_get_serial_sequence(format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), 'id'));
    RETURN NEW;
END
$$;

-- A hint that rows arrived; the payload is empty and identical notifications in one
-- transaction collapse into one. The channel name is the trigger's argument.
CREATE OR REPLACE FUNCTION outbox_relay.notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;
