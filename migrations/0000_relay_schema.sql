-- The relay's own objects, shared by every outbox table. Re-applied by every `migrate`, beside
-- running relays and producers: a statement that would lock an existing table (an index, a
-- column) runs only when its object is missing, so a `migrate` with nothing to do takes no lock
-- that a relay's or a producer's statement could wait for.
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

-- Ordering keys held back by a failed row (parked under hold_key, or waiting for its retry
-- delay), per table instance (`table_oid`, so a table dropped and created again starts clean).
-- `holder` is the failed row; the key's later rows carry `held = true` and stay out of the due
-- index until the holder is published (or parked under skip), so however many rows queue
-- behind a held key, the fetch never reads them. Written only by the relay, under the same
-- per-key advisory lock the order guard takes.
CREATE TABLE IF NOT EXISTS outbox_relay.held_keys (
    table_oid    bigint      NOT NULL,
    ordering_key text        NOT NULL,
    holder       bigint      NOT NULL,
    held_since   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_oid, ordering_key)
);
DO $$ BEGIN
    IF to_regclass('outbox_relay.held_keys_holder') IS NULL THEN
        CREATE INDEX held_keys_holder ON outbox_relay.held_keys (table_oid, holder);
    END IF;
END $$;

-- Whether any key of any outbox table in the database may be held: what lets the order guard
-- skip its held_keys probe (an index scan through the executor, half of what the guard costs)
-- on the common path, where nothing is held. A sequence, read without a query
-- (pg_sequence_last_value) and written outside transactions: 0 = no key is held; anything
-- else (1, or never set) = probe. Turned on by every statement that holds keys
-- (holding_keys, before its held_keys rows can commit) and off only by clear_held_flag, when
-- held_keys is empty; the two exclude each other by an advisory lock (shared for holds,
-- exclusive for the check), so the flag reads 0 only while no key is held. The guard's
-- answer is an optimisation either way: a row of a held key that starts out not held is still
-- held back by the fetch (see order_guard_v2).
CREATE SEQUENCE IF NOT EXISTS outbox_relay.held_flag MINVALUE 0;

-- Called by the relay's hold statement (SECURITY DEFINER: the relay needs no right on the
-- sequence); true.
CREATE OR REPLACE FUNCTION outbox_relay.holding_keys() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock_shared(
        pg_catalog.hashtextextended('outbox_relay:held_flag', 0));
    PERFORM pg_catalog.setval('outbox_relay.held_flag'::pg_catalog.regclass, 1);
    RETURN true;
END
$$;

-- Called by a relay whose table holds no key: sets the flag to 0 when no table holds one,
-- unless a hold is in progress. Each query of this VOLATILE function reads what committed
-- before it ran, so the check runs after the lock is taken. True when it cleared the flag.
CREATE OR REPLACE FUNCTION outbox_relay.clear_held_flag() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF pg_catalog.pg_sequence_last_value('outbox_relay.held_flag'::pg_catalog.regclass)
           OPERATOR(pg_catalog.=) 0
       OR NOT pg_catalog.pg_try_advisory_xact_lock(
           pg_catalog.hashtextextended('outbox_relay:held_flag', 0)) THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM outbox_relay.held_keys) THEN
        RETURN false;
    END IF;
    PERFORM pg_catalog.setval('outbox_relay.held_flag'::pg_catalog.regclass, 0);
    RETURN true;
END
$$;

-- Version 2 of the order guard (tables at migration 2 and later): as order_guard, and a row of
-- a held key starts out held. The advisory lock orders the check with the relay's hold and
-- release of the key (both take it), so under READ COMMITTED (PostgreSQL's default) the check
-- is exact. A producer in REPEATABLE READ or SERIALIZABLE may see an older held_keys; its row
-- then starts out not held, where the fetch still holds it back by its key (order is kept, the
-- row only costs the fetch a probe). SECURITY DEFINER: producers need no privilege on
-- held_keys (nor on the id sequence).
--
-- What a producer's row pays here is kept small (it runs in every producer transaction):
-- - the id sequence comes from the trigger's argument (`migrate` writes the table's identity
--   sequence there), not from pg_get_serial_sequence, which reads pg_depend on every call; a
--   trigger without the argument (an earlier release's) or a name that no longer resolves
--   (the schema was renamed) falls back to that lookup, so it never fails an insert;
-- - the held_keys probe only while held_flag says a key may be held (above);
-- - no `SET search_path` on the function (PostgreSQL 15 recomputes the search path on each
--   call of a function that sets it: a fifth of the guard's cost). Instead every function,
--   operator, type and table below is qualified, so nothing a producer puts on its
--   search_path can stand in for them while the function runs with the definer's rights.
CREATE OR REPLACE FUNCTION outbox_relay.order_guard_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock(
        pg_catalog.hashtext(TG_TABLE_SCHEMA OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) TG_TABLE_NAME),
        pg_catalog.hashtext(NEW.ordering_key));
    NEW.id := pg_catalog.nextval(coalesce(
        pg_catalog.to_regclass(TG_ARGV[0]),
        pg_catalog.pg_get_serial_sequence(
            pg_catalog.format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), 'id')::pg_catalog.regclass));
    -- The probe only while some key may be held (held_flag); a producer's own value of held
    -- is never kept.
    IF coalesce(pg_catalog.pg_sequence_last_value('outbox_relay.held_flag'::pg_catalog.regclass), 1)
           OPERATOR(pg_catalog.<>) 0
       AND pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.=) 'read committed' THEN
        NEW.held := EXISTS (SELECT 1 FROM outbox_relay.held_keys k
                            WHERE k.table_oid OPERATOR(pg_catalog.=) TG_RELID::pg_catalog.int8
                              AND k.ordering_key OPERATOR(pg_catalog.=) NEW.ordering_key);
    ELSE
        NEW.held := false;
    END IF;
    RETURN NEW;
END
$$;

-- Partition leases (several active relays per table). A table's ordering keys hash into
-- `partitions` partitions (fixed once chosen); a member is one relay process's incarnation on
-- one table, live while `expires_at` (the database's clock) is in the future and renewed by its
-- heartbeat. A lease row per partition names its owner and an epoch that grows on every change
-- of owner; a lease counts only while its owner is live, so a member's heartbeat renews all its
-- leases in one row. Members are numbered from one sequence, so a newcomer sorts after everyone
-- already there and a join does not shift anyone's fair share but the newcomer's.
CREATE SEQUENCE IF NOT EXISTS outbox_relay.member_seq;
CREATE TABLE IF NOT EXISTS outbox_relay.lease_tables (
    table_oid  bigint  PRIMARY KEY,
    partitions integer NOT NULL CHECK (partitions > 0)
);
CREATE TABLE IF NOT EXISTS outbox_relay.members (
    table_oid     bigint      NOT NULL,
    member        bigint      NOT NULL DEFAULT nextval('outbox_relay.member_seq'),
    name          text        NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (table_oid, member)
);
CREATE TABLE IF NOT EXISTS outbox_relay.leases (
    table_oid  bigint      NOT NULL,
    partition  integer     NOT NULL,
    owner      bigint,
    epoch      bigint      NOT NULL DEFAULT 0,
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_oid, partition)
);
DO $$ BEGIN
    IF to_regclass('outbox_relay.leases_owner') IS NULL THEN
        CREATE INDEX leases_owner ON outbox_relay.leases (table_oid, owner);
    END IF;
END $$;

-- The fence for one partition: true only while `member` holds `partition` of the table at
-- `epoch` and is live. The relay's statements inline the same check for all the partitions
-- they touch at once (store/leases.rs, `fenced`), so a deposed owner (a new epoch) or one
-- whose lease ran out (a pause, a lost connection) changes nothing; this function is for
-- operators and tests asking about one partition.
CREATE OR REPLACE FUNCTION outbox_relay.lease_held(
    p_table_oid bigint, p_partition integer, p_member bigint, p_epoch bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM outbox_relay.leases l
        JOIN outbox_relay.members m ON m.table_oid = l.table_oid AND m.member = l.owner
        WHERE l.table_oid = p_table_oid AND l.partition = p_partition
          AND l.owner = p_member AND l.epoch = p_epoch AND m.expires_at > now())
$$;

-- The member's coordination session (the one holding the table's advisory lock, shared among
-- relays of this release): a member whose session is gone (its process was killed) is dead at
-- once, without waiting for its lease; a paused or cut-off one keeps its session, and waits.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'outbox_relay.members'::regclass
                   AND attname = 'lock_objid' AND NOT attisdropped) THEN
        ALTER TABLE outbox_relay.members
            ADD COLUMN IF NOT EXISTS session_pid  integer,
            ADD COLUMN IF NOT EXISTS lock_classid bigint,
            ADD COLUMN IF NOT EXISTS lock_objid   bigint;
    END IF;
END $$;

-- The wake-up, version 2: a producer's transaction notifies only while a relay waits for work
-- on the table. NOTIFY is not free: PostgreSQL commits the transactions that sent one one at a
-- time (a database-wide lock held until the commit is written), so a NOTIFY from every
-- producer transaction caps the application's commit rate. A relay's coordination session
-- writes a row here (table, its backend pid) when a relay of that table goes idle, probes the
-- table once more, and deletes the row when producers keep notifying while the relay is busy
-- (it finds new rows by fetching again) or when the relay stops; the trigger only reads it.
-- UNLOGGED: it is the state of live sessions, not data (a crash empties it, the relays write
-- it again).
CREATE UNLOGGED TABLE IF NOT EXISTS outbox_relay.waiting (
    table_oid bigint      NOT NULL,
    pid       integer     NOT NULL,
    since     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_oid, pid)
);

-- Fired by a deferred constraint trigger, once per inserted row at commit: the check is made
-- as late as it can be, so a relay that goes idle (writes its row, then probes) misses a
-- commit only in the moment between this check and the commit becoming visible; the relay's
-- poll (`poll_interval`) catches that one. Notifications with the same channel collapse into
-- one per transaction. SECURITY DEFINER, as the order guard: producers need no privilege on
-- the relay's schema, so a database that revokes PUBLIC's rights cannot make their commits fail
-- (and, as there, everything is qualified instead of a `SET search_path`).
CREATE OR REPLACE FUNCTION outbox_relay.notify_waiting() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outbox_relay.waiting w
               WHERE w.table_oid OPERATOR(pg_catalog.=) TG_RELID::pg_catalog.int8) THEN
        PERFORM pg_catalog.pg_notify(TG_ARGV[0], '');
    END IF;
    RETURN NULL;
END
$$;

-- Parked rows an operator ended for good with `outbox-relay discard`, per table instance
-- (`table_oid`) and row (`row_id`: `id`, or `outbox_relay_seq` on an adopted table). The
-- table's row goes the way a published row goes, so its ordering key moves on: marked
-- (`published_at` set, `parked_at` cleared, `last_error` saying "discarded: <reason>") and
-- deleted by retention like the published history, or deleted at once under
-- `on_published = "delete"`. This record stays until an operator deletes it: the reason, the
-- time, the row's state when it was discarded and the row itself (`row_data`, to_jsonb of the
-- row). `replay` never sends a row recorded here; `status` counts and lists them. Written only
-- by `discard`, under the key's order-guard lock.
CREATE TABLE IF NOT EXISTS outbox_relay.discarded (
    table_oid    bigint      NOT NULL,
    row_id       bigint      NOT NULL,
    table_name   text        NOT NULL,
    ordering_key text        NOT NULL,
    dedup_key    text        NOT NULL,
    reason       text        NOT NULL CHECK (btrim(reason) <> ''),
    discarded_at timestamptz NOT NULL DEFAULT now(),
    parked_at    timestamptz,
    attempts     integer     NOT NULL,
    last_error   text,
    row_data     jsonb       NOT NULL,
    PRIMARY KEY (table_oid, row_id)
);

-- Published rows the retention sweeper deleted, per table instance: written in the
-- transaction of each sweep batch that deleted rows, so it is exact for this release on.
-- `replay` refuses a range that reaches before the oldest published row still in a table only
-- when the relay deleted rows of that table (here, or `on_published = "delete"`), never
-- because ids are sparse.
CREATE TABLE IF NOT EXISTS outbox_relay.deleted_history (
    table_oid     bigint      PRIMARY KEY,
    rows          bigint      NOT NULL,
    first_deleted timestamptz NOT NULL DEFAULT now(),
    last_deleted  timestamptz NOT NULL DEFAULT now()
);
