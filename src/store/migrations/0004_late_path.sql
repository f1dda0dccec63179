-- The late path (docs/architecture.md, "Late reports"): a report later than its zone
-- partition's watermark is matched against every copy its zone saw before it.
-- * Home copies are `location` rows; `seq` is the offset of the locations-topic record that
--   brought the row (NULL for rows that did not come through the pipeline: the POC seed).
-- * Ghost copies (the halo: a report delivered to a neighbouring zone too) are kept in
--   `halo_copy`, one row per (zone, report).
-- Both are searched by zone and time (a btree), then by distance.
ALTER TABLE location ADD COLUMN seq bigint;
CREATE INDEX location_zone_time_idx ON location (zone, recorded_at) WHERE zone IS NOT NULL;

CREATE TABLE halo_copy (
    zone        bigint NOT NULL,
    event_id    uuid NOT NULL,
    person_id   bigint NOT NULL,
    -- WGS84 degrees (not the POC's swapped axes).
    lat         double precision NOT NULL,
    lon         double precision NOT NULL,
    recorded_at timestamptz NOT NULL,
    seq         bigint NOT NULL,
    PRIMARY KEY (zone, event_id)
);
CREATE INDEX halo_copy_zone_time_idx ON halo_copy (zone, recorded_at);
