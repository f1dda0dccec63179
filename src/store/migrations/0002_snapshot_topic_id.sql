-- Snapshots checked against the log and stored in parts.
--
-- The Kafka topic id (KIP-516) of the log a snapshot was taken on: a topic deleted and created
-- again keeps its name and restarts its offsets, so an offset alone cannot tell the two logs
-- apart. NULL for snapshots stored before this column existed.
ALTER TABLE shard_snapshot ADD COLUMN topic_id text;
-- `state` is now the partition-wide state; each actor's state is a part, stored only when it
-- changed since the previous snapshot. lz4 (rather than pglz) keeps compressing them cheap.
ALTER TABLE shard_snapshot ALTER COLUMN state SET COMPRESSION lz4;
CREATE TABLE shard_snapshot_part (
    stage     text NOT NULL,
    topic     text NOT NULL,
    partition integer NOT NULL,
    -- The person id, or the zone's H3 cell as a signed 64-bit integer.
    key       bigint NOT NULL,
    state     bytea COMPRESSION lz4 NOT NULL,
    PRIMARY KEY (stage, topic, partition, key),
    FOREIGN KEY (stage, topic, partition) REFERENCES shard_snapshot ON DELETE CASCADE
);
