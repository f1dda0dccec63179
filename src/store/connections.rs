//! The person stage's PostgreSQL effects: episode changes into `connection`, folded per batch
//! and applied in one transaction; idempotent, so a replayed batch changes nothing
//! (docs/design.md §4, §6).

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rustc_hash::{FxHashMap, FxHashSet};
use udaconnect_actors::domain::{Episode, Micros, PersonId};
use udaconnect_actors::messages::EpisodeChange;

use crate::store::{timestamp, StoreError};

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
        let mut table = udaconnect_actors::sync_engine::EpisodeTable::default();
        for c in &changes {
            table.apply(c);
        }
        assert_eq!(net.upserts, table.episodes());
        assert_eq!(net.deletes, vec![(1, 2, 10), (1, 2, 35)]);
    }
}
