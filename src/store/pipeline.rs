//! The pipeline's PostgreSQL effects: home events into `location`, episode changes into
//! `connection`, partition snapshots into `shard_snapshot`. Every write is idempotent, so a
//! replayed batch changes nothing (DESIGN §4, §6).

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rustc_hash::{FxHashMap, FxHashSet};
use udaconnect_actors::actors::ports::{PortError, SnapshotBlob, Stage};
use udaconnect_actors::domain::{Episode, Micros, PersonId, ReportFingerprint};
use udaconnect_actors::messages::{EpisodeChange, RoutedEvent};
use uuid::Uuid;

use crate::store::StoreError;

/// A timestamp in microseconds since the epoch as PostgreSQL `timestamptz`.
pub fn timestamp(micros: Micros) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Microseconds since the epoch of a `timestamptz`.
pub fn micros(t: DateTime<Utc>) -> Micros {
    t.timestamp_micros()
}

fn port(e: impl std::fmt::Display) -> PortError {
    PortError(e.to_string())
}

/// What [`store_locations`] did with a batch.
#[derive(Debug, Default, PartialEq)]
pub struct StoredLocations {
    /// Rows inserted (a replayed event is already there and not counted).
    pub inserted: u64,
    /// Events whose `event_id` is already the id of a different stored report (person, place
    /// or time), or of a different event earlier in the batch: not stored.
    pub id_reused: Vec<RoutedEvent>,
}

/// Stores home events: one multi-row statement per batch, `ON CONFLICT (event_id) DO NOTHING
/// RETURNING event_id`; only when some were not inserted are their stored reports read back,
/// to return the events whose id a different report holds ([`ReportFingerprint`]; an identical
/// replay is not one). Events of persons that do not exist are skipped (ingest refuses them, so
/// they only come from records written to the topic by something else).
pub async fn store_locations(
    pool: &Pool,
    events: &[RoutedEvent],
) -> Result<StoredLocations, StoreError> {
    // The same id twice in one batch: the first one stands, a different second one is a reuse.
    let mut seen: FxHashMap<Uuid, ReportFingerprint> = FxHashMap::default();
    let mut id_reused = Vec::new();
    let mut unique = Vec::with_capacity(events.len());
    for r in events {
        let mine = ReportFingerprint::of(&r.event);
        match seen.get(&r.event.event_id) {
            Some(first) if *first != mine => id_reused.push(*r),
            Some(_) => {}
            None => {
                seen.insert(r.event.event_id, mine);
                unique.push(r);
            }
        }
    }
    let n = unique.len();
    let mut ids = Vec::with_capacity(n);
    let mut persons = Vec::with_capacity(n);
    let mut lats = Vec::with_capacity(n);
    let mut lons = Vec::with_capacity(n);
    let mut recorded = Vec::with_capacity(n);
    let mut received = Vec::with_capacity(n);
    let mut zones = Vec::with_capacity(n);
    for r in &unique {
        ids.push(r.event.event_id);
        persons.push(r.event.person_id);
        lats.push(r.event.lat);
        lons.push(r.event.lon);
        recorded.push(timestamp(r.event.recorded_at));
        received.push(timestamp(r.event.received_at));
        zones.push(r.zone as i64);
    }
    let client = pool.get().await?;
    // X = latitude, Y = longitude: the POC's axis convention (see the migration).
    let statement = client
        .prepare_cached(
            "INSERT INTO location (event_id, person_id, coordinate, recorded_at, received_at, zone)
             SELECT e.id, e.person, ST_SetSRID(ST_MakePoint(e.lat, e.lon), 4326), e.rec, e.recv, e.zone
             FROM unnest($1::uuid[], $2::int8[], $3::float8[], $4::float8[], $5::timestamptz[],
                         $6::timestamptz[], $7::int8[]) AS e(id, person, lat, lon, rec, recv, zone)
             JOIN person p ON p.id = e.person
             ON CONFLICT (event_id) DO NOTHING
             RETURNING event_id",
        )
        .await?;
    let rows = client
        .query(
            &statement,
            &[&ids, &persons, &lats, &lons, &recorded, &received, &zones],
        )
        .await?;
    let inserted: FxHashSet<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    // Only what was not inserted (a replay, a reuse, or a person that does not exist) is
    // looked at again.
    if inserted.len() < unique.len() {
        let skipped: Vec<Uuid> = ids
            .iter()
            .filter(|id| !inserted.contains(id))
            .copied()
            .collect();
        let stored = stored_fingerprints(&client, &skipped).await?;
        id_reused.extend(
            unique
                .iter()
                .filter(|r| {
                    stored
                        .get(&r.event.event_id)
                        .is_some_and(|f| *f != ReportFingerprint::of(&r.event))
                })
                .map(|r| **r),
        );
    }
    Ok(StoredLocations {
        inserted: inserted.len() as u64,
        id_reused,
    })
}

/// The stored reports' fingerprints of those of `ids` that are in `location`.
pub async fn stored_fingerprints(
    client: &deadpool_postgres::Client,
    ids: &[Uuid],
) -> Result<FxHashMap<Uuid, ReportFingerprint>, StoreError> {
    let statement = client
        .prepare_cached(
            "SELECT event_id, person_id, ST_X(coordinate), ST_Y(coordinate), recorded_at
             FROM location WHERE event_id = ANY($1)",
        )
        .await?;
    let rows = client.query(&statement, &[&ids]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let at: DateTime<Utc> = r.get(4);
            let f = ReportFingerprint::new(r.get(1), r.get(2), r.get(3), micros(at));
            (r.get(0), f)
        })
        .collect())
}

/// The net effect of a sequence of episode changes: rows to delete, rows to upsert. Applying
/// it equals applying the changes one by one.
#[derive(Debug, Default, PartialEq)]
pub struct NetChanges {
    pub deletes: Vec<(PersonId, PersonId, Micros)>,
    pub upserts: Vec<Episode>,
}

/// Folds `changes`, in order, into one delete set and one upsert set (a key appears at most once,
/// as `ON CONFLICT DO UPDATE` requires).
pub fn net_changes(changes: &[EpisodeChange]) -> NetChanges {
    let mut upserts: FxHashMap<(PersonId, PersonId, Micros), Episode> = FxHashMap::default();
    let mut deletes: FxHashSet<(PersonId, PersonId, Micros)> = FxHashSet::default();
    for c in changes {
        let e = &c.episode;
        for &start in &c.replaces {
            let key = (e.person, e.peer, start);
            upserts.remove(&key);
            deletes.insert(key);
        }
        deletes.remove(&e.key());
        upserts.insert(e.key(), *e);
    }
    let mut deletes: Vec<_> = deletes.into_iter().collect();
    deletes.sort_unstable();
    let mut upserts: Vec<_> = upserts.into_values().collect();
    upserts.sort_unstable_by_key(Episode::key);
    NetChanges { deletes, upserts }
}

/// Applies episode changes in one transaction: the replaced rows go, the new ones are upserted.
pub async fn apply_changes(pool: &Pool, changes: &[EpisodeChange]) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let net = net_changes(changes);
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    if !net.deletes.is_empty() {
        let persons: Vec<i64> = net.deletes.iter().map(|k| k.0).collect();
        let peers: Vec<i64> = net.deletes.iter().map(|k| k.1).collect();
        let starts: Vec<DateTime<Utc>> = net.deletes.iter().map(|k| timestamp(k.2)).collect();
        let statement = tx
            .prepare_cached(
                "DELETE FROM connection c
                 USING unnest($1::int8[], $2::int8[], $3::timestamptz[]) AS d(person, peer, start)
                 WHERE c.person_id = d.person AND c.peer_id = d.peer AND c.started_at = d.start",
            )
            .await?;
        tx.execute(&statement, &[&persons, &peers, &starts]).await?;
    }
    // Episodes of persons that do not exist (records written to the topics by something other
    // than the ingest path) are skipped: one lookup of the batch's persons, not two per row.
    let mut ids: Vec<i64> = net
        .upserts
        .iter()
        .flat_map(|e| [e.person, e.peer])
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let statement = tx
        .prepare_cached("SELECT id FROM person WHERE id = ANY($1)")
        .await?;
    let known: FxHashSet<i64> = tx
        .query(&statement, &[&ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let u: Vec<&Episode> = net
        .upserts
        .iter()
        .filter(|e| known.contains(&e.person) && known.contains(&e.peer))
        .collect();
    let persons: Vec<i64> = u.iter().map(|e| e.person).collect();
    let peers: Vec<i64> = u.iter().map(|e| e.peer).collect();
    let starts: Vec<DateTime<Utc>> = u.iter().map(|e| timestamp(e.started_at)).collect();
    let lasts: Vec<DateTime<Utc>> = u.iter().map(|e| timestamp(e.last_seen_at)).collect();
    let ends: Vec<Option<DateTime<Utc>>> = u.iter().map(|e| e.ended_at.map(timestamp)).collect();
    let counts: Vec<i32> = u
        .iter()
        .map(|e| i32::try_from(e.colocations).unwrap_or(i32::MAX))
        .collect();
    let distances: Vec<f64> = u.iter().map(|e| e.min_distance_m).collect();
    let lats: Vec<f64> = u.iter().map(|e| e.lat).collect();
    let lons: Vec<f64> = u.iter().map(|e| e.lon).collect();
    let statement = tx
        .prepare_cached(
            "INSERT INTO connection (person_id, peer_id, started_at, last_seen_at, ended_at,
                                     colocations, min_distance_m, lat, lon)
             SELECT u.* FROM unnest($1::int8[], $2::int8[], $3::timestamptz[], $4::timestamptz[],
                                    $5::timestamptz[], $6::int4[], $7::float8[], $8::float8[],
                                    $9::float8[])
                  AS u(person, peer, start, last, ended, n, dist, lat, lon)
             ON CONFLICT (person_id, peer_id, started_at) DO UPDATE SET
                 last_seen_at = EXCLUDED.last_seen_at,
                 ended_at = EXCLUDED.ended_at,
                 colocations = EXCLUDED.colocations,
                 min_distance_m = EXCLUDED.min_distance_m,
                 lat = EXCLUDED.lat,
                 lon = EXCLUDED.lon,
                 updated_at = now()",
        )
        .await?;
    tx.execute(
        &statement,
        &[
            &persons, &peers, &starts, &lasts, &ends, &counts, &distances, &lats, &lons,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `shard_snapshot` for one topic: snapshots of a stage's partitions.
#[derive(Clone)]
pub struct PgSnapshots {
    pool: Pool,
    topic: String,
}

impl PgSnapshots {
    /// Snapshots of partitions of `topic`.
    pub fn new(pool: Pool, topic: impl Into<String>) -> Self {
        Self {
            pool,
            topic: topic.into(),
        }
    }

    /// Stores a partition's snapshot, taken on the topic incarnation `topic_id` (Kafka's topic
    /// id: the offset means nothing on another one), in one transaction: the partition-wide
    /// state replaces the stored one; the parts replace theirs (all of them when the snapshot
    /// is complete, only the changed ones otherwise).
    pub async fn store(
        &self,
        stage: Stage,
        partition: u32,
        snapshot: &SnapshotBlob,
        topic_id: &str,
    ) -> Result<(), PortError> {
        let mut client = self.pool.get().await.map_err(port)?;
        let tx = client.transaction().await.map_err(port)?;
        let (stage, partition) = (stage.as_str(), partition as i32);
        tx.execute(
            "INSERT INTO shard_snapshot
                 (stage, topic, partition, next_offset, format, state, topic_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (stage, topic, partition) DO UPDATE SET
                 next_offset = EXCLUDED.next_offset, format = EXCLUDED.format,
                 state = EXCLUDED.state, topic_id = EXCLUDED.topic_id, taken_at = now()",
            &[
                &stage,
                &self.topic,
                &partition,
                &(snapshot.next_offset as i64),
                &(snapshot.format as i32),
                &snapshot.bytes,
                &topic_id,
            ],
        )
        .await
        .map_err(port)?;
        let (mut keys, mut states, mut removed) = (Vec::new(), Vec::new(), Vec::new());
        for (key, state) in &snapshot.parts {
            match state {
                Some(state) => {
                    keys.push(*key);
                    states.push(state.as_slice());
                }
                None => removed.push(*key),
            }
        }
        if snapshot.complete {
            tx.execute(
                "DELETE FROM shard_snapshot_part
                 WHERE stage = $1 AND topic = $2 AND partition = $3 AND key <> ALL($4)",
                &[&stage, &self.topic, &partition, &keys],
            )
            .await
            .map_err(port)?;
        } else if !removed.is_empty() {
            tx.execute(
                "DELETE FROM shard_snapshot_part
                 WHERE stage = $1 AND topic = $2 AND partition = $3 AND key = ANY($4)",
                &[&stage, &self.topic, &partition, &removed],
            )
            .await
            .map_err(port)?;
        }
        if !keys.is_empty() {
            tx.execute(
                "INSERT INTO shard_snapshot_part (stage, topic, partition, key, state)
                 SELECT $1, $2, $3, p.key, p.state FROM unnest($4::int8[], $5::bytea[]) AS p(key, state)
                 ON CONFLICT (stage, topic, partition, key) DO UPDATE SET state = EXCLUDED.state",
                &[&stage, &self.topic, &partition, &keys, &states],
            )
            .await
            .map_err(port)?;
        }
        tx.commit().await.map_err(port)?;
        Ok(())
    }

    /// A partition's snapshot, if one was stored (complete: with every part), with the topic
    /// id it was taken on (`None` for snapshots stored before topic ids were recorded).
    pub async fn load(
        &self,
        stage: Stage,
        partition: u32,
    ) -> Result<Option<(SnapshotBlob, Option<String>)>, PortError> {
        let mut client = self.pool.get().await.map_err(port)?;
        // The row and its parts as of one moment (a previous owner may still be storing).
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(port)?;
        let (stage, partition) = (stage.as_str(), partition as i32);
        let Some(row) = tx
            .query_opt(
                "SELECT next_offset, format, state, topic_id FROM shard_snapshot
                 WHERE stage = $1 AND topic = $2 AND partition = $3",
                &[&stage, &self.topic, &partition],
            )
            .await
            .map_err(port)?
        else {
            return Ok(None);
        };
        let parts = tx
            .query(
                "SELECT key, state FROM shard_snapshot_part
                 WHERE stage = $1 AND topic = $2 AND partition = $3 ORDER BY key",
                &[&stage, &self.topic, &partition],
            )
            .await
            .map_err(port)?
            .into_iter()
            .map(|r| (r.get::<_, i64>(0), Some(r.get::<_, Vec<u8>>(1))))
            .collect();
        tx.commit().await.map_err(port)?;
        Ok(Some((
            SnapshotBlob {
                next_offset: row.get::<_, i64>(0) as u64,
                format: row.get::<_, i32>(1) as u32,
                bytes: row.get(2),
                parts,
                complete: true,
            },
            row.get(3),
        )))
    }
}

/// Who owns a partition of a stage, as `shard_owner` records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ShardOwner {
    pub stage: String,
    pub topic: String,
    pub partition: i32,
    /// The owning process's name (the pod name on K3s).
    pub owner: String,
    /// Where the owner answers internal requests.
    pub owner_addr: String,
    /// Since when it owns the partition (RFC 3339).
    pub since: DateTime<Utc>,
    /// The last time it confirmed the ownership (each snapshot).
    pub heartbeat_at: DateTime<Utc>,
    /// The partition's stored snapshot: its next offset (what the group committed at most)
    /// and its age in seconds; `None` before the first snapshot.
    pub snapshot_offset: Option<i64>,
    pub snapshot_age_s: Option<f64>,
}

/// `shard_owner` rows written by one process (DESIGN §5): it claims a partition when it is
/// assigned, confirms it with each snapshot, and releases it on revocation.
#[derive(Clone)]
pub struct PgOwners {
    pool: Pool,
    topic: String,
    owner: String,
    owner_addr: String,
}

impl PgOwners {
    pub fn new(pool: Pool, topic: impl Into<String>, owner: &str, owner_addr: &str) -> Self {
        Self {
            pool,
            topic: topic.into(),
            owner: owner.to_owned(),
            owner_addr: owner_addr.to_owned(),
        }
    }

    /// Records this process as the partition's owner (replacing a previous owner's row).
    pub async fn claim(&self, stage: Stage, partition: u32) -> Result<(), PortError> {
        let client = self.pool.get().await.map_err(port)?;
        client
            .execute(
                "INSERT INTO shard_owner (stage, topic, partition, owner, owner_addr)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (stage, topic, partition) DO UPDATE SET
                     owner = EXCLUDED.owner, owner_addr = EXCLUDED.owner_addr,
                     since = now(), heartbeat_at = now()",
                &[
                    &stage.as_str(),
                    &self.topic,
                    &(partition as i32),
                    &self.owner,
                    &self.owner_addr,
                ],
            )
            .await
            .map_err(port)?;
        Ok(())
    }

    /// Confirms the ownership (a no-op when another process took the row over).
    pub async fn heartbeat(&self, stage: Stage, partition: u32) -> Result<(), PortError> {
        self.update(
            "UPDATE shard_owner SET heartbeat_at = now()
             WHERE stage = $1 AND topic = $2 AND partition = $3 AND owner = $4",
            stage,
            partition,
        )
        .await
    }

    /// Removes the row, if it is still this process's.
    pub async fn release(&self, stage: Stage, partition: u32) -> Result<(), PortError> {
        self.update(
            "DELETE FROM shard_owner
             WHERE stage = $1 AND topic = $2 AND partition = $3 AND owner = $4",
            stage,
            partition,
        )
        .await
    }

    async fn update(&self, sql: &str, stage: Stage, partition: u32) -> Result<(), PortError> {
        let client = self.pool.get().await.map_err(port)?;
        client
            .execute(
                sql,
                &[
                    &stage.as_str(),
                    &self.topic,
                    &(partition as i32),
                    &self.owner,
                ],
            )
            .await
            .map_err(port)?;
        Ok(())
    }
}

/// Every partition of `topics` with an owner or a snapshot, with both: the cluster's view.
pub async fn shard_owners(pool: &Pool, topics: &[&str]) -> Result<Vec<ShardOwner>, StoreError> {
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT o.stage, o.topic, o.partition, o.owner, o.owner_addr, o.since,
                    o.heartbeat_at, s.next_offset,
                    extract(epoch FROM now() - s.taken_at)::float8
             FROM shard_owner o
             LEFT JOIN shard_snapshot s USING (stage, topic, partition)
             WHERE o.topic = ANY($1)
             ORDER BY o.stage DESC, o.partition",
            &[&topics],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ShardOwner {
            stage: r.get(0),
            topic: r.get(1),
            partition: r.get(2),
            owner: r.get(3),
            owner_addr: r.get(4),
            since: r.get(5),
            heartbeat_at: r.get(6),
            snapshot_offset: r.get(7),
            snapshot_age_s: r.get(8),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn episode(started_at: Micros, last: Micros) -> Episode {
        Episode {
            person: 1,
            peer: 2,
            started_at,
            last_seen_at: last,
            ended_at: None,
            colocations: 1,
            min_distance_m: 1.0,
            lat: 0.0,
            lon: 0.0,
        }
    }

    #[test]
    fn net_changes_equal_applying_one_by_one() {
        let changes = vec![
            EpisodeChange {
                episode: episode(10, 20),
                replaces: vec![],
            },
            // Late data moves the start earlier: 10 is replaced by 5.
            EpisodeChange {
                episode: episode(5, 20),
                replaces: vec![10],
            },
            // Then the episode at 5 grows.
            EpisodeChange {
                episode: episode(5, 30),
                replaces: vec![],
            },
            // A replaced key comes back.
            EpisodeChange {
                episode: episode(40, 40),
                replaces: vec![],
            },
            EpisodeChange {
                episode: episode(35, 40),
                replaces: vec![40],
            },
            EpisodeChange {
                episode: episode(40, 45),
                replaces: vec![35],
            },
        ];
        let net = net_changes(&changes);
        let mut table = udaconnect_actors::engine::EpisodeTable::default();
        for c in &changes {
            table.apply(c);
        }
        assert_eq!(net.upserts, table.episodes());
        assert_eq!(net.deletes, vec![(1, 2, 10), (1, 2, 35)]);
    }
}
