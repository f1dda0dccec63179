-- Retention (docs/design.md §6): reports older than `retention_days` are deleted in batches by
-- `recorded_at`. `location` has a btree on it already; `halo_copy` gets a BRIN index, which
-- costs the hot insert path next to nothing (ghost copies arrive nearly in time order).
CREATE INDEX halo_copy_recorded_at_idx ON halo_copy USING brin (recorded_at);
