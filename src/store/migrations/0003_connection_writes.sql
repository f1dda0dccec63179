-- Episode rows are written in bulk by the persons stage (hundreds of thousands an hour at a big
-- conference), so each write is kept cheap:
-- * No foreign keys to person: a foreign-key check takes a row lock on the person row for
--   every episode written. The stage writes only episodes of existing persons (it looks the
--   persons of each write up once), and persons are never deleted.
-- * The history index leaves out the columns an episode's later writes change (last_seen_at,
--   ended_at, counts), and pages keep room for new row versions: those writes are then
--   heap-only (HOT) updates that touch no index.
ALTER TABLE connection DROP CONSTRAINT connection_person_id_fkey;
ALTER TABLE connection DROP CONSTRAINT connection_peer_id_fkey;
DROP INDEX connection_person_time_idx;
CREATE INDEX connection_person_start_idx ON connection (person_id, started_at, peer_id);
ALTER TABLE connection SET (fillfactor = 70);
