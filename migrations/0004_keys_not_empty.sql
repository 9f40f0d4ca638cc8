-- Version 4 of an outbox table: an empty dedup key or ordering key is refused at insert. An
-- empty dedup_key becomes an empty message_id, which gives a consumer nothing to deduplicate
-- on; an empty ordering_key puts every such row of every producer on one key, in one line.
-- Both are a producer's mistake, refused where the producer sees it: the insert fails with
-- SQLSTATE 23514 (check_violation) naming the constraint, whose name says what is wrong
-- (outbox_relay_<table>_dedup_key_not_empty, outbox_relay_<table>_ordering_key_not_empty).
-- {table}, {dedup_key_not_empty} and {ordering_key_not_empty} are replaced by validated,
-- quoted names (no ' in them: they are written into the string of the EXECUTE below).
--
-- NOT VALID: adding the constraints does not scan the rows already there, so the table's
-- ACCESS EXCLUSIVE lock is held for a catalog change and one read of the primary key's last
-- entry (milliseconds), however big the table, instead of blocking producers and relays while
-- every row is read.
--
-- NOT VALID alone would not leave the rows already there alone: PostgreSQL checks a NOT VALID
-- constraint on every UPDATE of a row, and the relay updates a row to mark, fail, park, hold
-- or release it, so an old row with an empty key could never be marked. Each check therefore
-- exempts the rows up to the last id at this migration (`OR id <= N`, N read under the lock:
-- no insert is under way, and the order guard gives every later row a larger id from the
-- table's sequence). An old row with an empty key is relayed (or parked) as before; every row
-- inserted from now on is checked.
LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;
DO $migration$
DECLARE
    last_id bigint := (SELECT coalesce(max(id), 0) FROM {table});
BEGIN
    -- Concatenated, not format(): a quoted table name may hold a %.
    EXECUTE 'ALTER TABLE {table} ADD CONSTRAINT {dedup_key_not_empty} '
        'CHECK (dedup_key <> '''' OR id <= ' || last_id || ') NOT VALID';
    EXECUTE 'ALTER TABLE {table} ADD CONSTRAINT {ordering_key_not_empty} '
        'CHECK (ordering_key <> '''' OR id <= ' || last_id || ') NOT VALID';
END
$migration$;
