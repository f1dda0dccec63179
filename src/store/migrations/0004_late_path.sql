-- The late path (docs/architecture.md, "Late data and the late path"): a report later than its
-- zone partition's watermark is matched against every copy its zone saw before it.
-- * Home copies are `location` rows; `seq` is the offset of the locations-topic record that
--   brought the row and `fine_cell` the H3 cell the engine indexes it under (both NULL for rows
--   that did not come through the pipeline: the POC seed).
-- * Ghost copies (the halo: a report delivered to a neighbouring zone too) are kept in
--   `halo_copy`, one row per (zone, report).
-- Both are searched the way the engine searches its memory: by the fine cells near the late
-- copy and by time (a btree), then by distance.
ALTER TABLE location ADD COLUMN seq bigint, ADD COLUMN fine_cell bigint;
CREATE INDEX location_fine_cell_time_idx ON location (fine_cell, recorded_at)
    WHERE fine_cell IS NOT NULL;

CREATE TABLE halo_copy (
    zone        bigint NOT NULL,
    event_id    uuid NOT NULL,
    person_id   bigint NOT NULL,
    -- WGS84 degrees (not the POC's swapped axes).
    lat         double precision NOT NULL,
    lon         double precision NOT NULL,
    recorded_at timestamptz NOT NULL,
    seq         bigint NOT NULL,
    fine_cell   bigint NOT NULL,
    PRIMARY KEY (zone, event_id)
);
CREATE INDEX halo_copy_cell_time_idx ON halo_copy (zone, fine_cell, recorded_at);
