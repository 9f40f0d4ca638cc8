-- Version 3 of an outbox table: an ordering key the relay can always hold and park. A key is
-- stored in the relay's indexes (failed and held rows by key, the held_keys table), whose
-- entries PostgreSQL limits to about 2.7 KB; a longer key could be inserted but its row could
-- never be parked or held, so it is refused at insert, where the producer sees why.
-- {table} and {key_check} are replaced by validated, quoted names. NOT VALID: rows already
-- there are not scanned (and not checked); every row inserted or updated from now on is.
ALTER TABLE {table} ADD CONSTRAINT {key_check}
    CHECK (octet_length(ordering_key) <= 1024) NOT VALID;
