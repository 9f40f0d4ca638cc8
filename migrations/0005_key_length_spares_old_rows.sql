-- Version 5 of an outbox table: migration 3's key-length check spares the rows that were
-- already there. PostgreSQL checks a NOT VALID constraint on every UPDATE of a row, and the
-- relay updates a row to mark, fail, park, hold or release it: a row inserted before
-- migration 3 with an ordering key over 1024 bytes could never be marked, and the mark of its
-- whole batch failed with it, again and again. The check is made again as migration 4 makes
-- its checks: it exempts the rows up to the last id at this migration (`OR id <= N`, N read
-- under the lock; the order guard gives every later row a larger id), and is NOT VALID (no
-- scan: the lock is held for a catalog change and one read of the primary key's last entry).
-- Rows inserted between migrations 3 and 5 were checked at insert, so exempting them changes
-- nothing. {table} and {key_check} are replaced by validated, quoted names.
LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;
DO $migration$
DECLARE
    last_id bigint := (SELECT coalesce(max(id), 0) FROM {table});
BEGIN
    -- Concatenated, not format(): a quoted table name may hold a %.
    EXECUTE 'ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {key_check}';
    EXECUTE 'ALTER TABLE {table} ADD CONSTRAINT {key_check} '
        'CHECK (octet_length(ordering_key) <= 1024 OR id <= ' || last_id || ') NOT VALID';
END
$migration$;
