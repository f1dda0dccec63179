//! The zone stage's PostgreSQL effects and the late path's search: every copy a zone
//! partition sees, home events into `location` and ghost copies into `halo_copy`, each with
//! the input offset that brought it; idempotent on `event_id`, so a replayed batch changes
//! nothing (docs/design.md §4, §6).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rustc_hash::{FxHashMap, FxHashSet};
use udaconnect_actors::domain::{Micros, ReportFingerprint, MICROS_PER_S};
use udaconnect_actors::messages::{LateCopy, RoutedEvent, SeenCopy};
use udaconnect_actors::zone_index::StoredCopy;
use uuid::Uuid;

use crate::store::{micros, timestamp, StoreError};

/// What [`store_locations`] did with a batch.
#[derive(Debug, Default, PartialEq)]
pub struct StoredLocations {
    /// Rows inserted (a replayed event is already there and not counted).
    pub inserted: u64,
    /// Events whose `event_id` is already the id of a different stored report (person, place
    /// or time), or of a different event earlier in the batch: not stored.
    pub id_reused: Vec<RoutedEvent>,
}

/// Stores the copies a zone partition saw, each with the input offset that brought it (`seq`):
/// home events into `location`, in one multi-row statement per batch, `ON CONFLICT (event_id)
/// DO NOTHING RETURNING event_id`; only when some were not inserted are their stored reports
/// read back, to return the events whose id a different report holds ([`ReportFingerprint`];
/// an identical replay is not one). Ghost copies go to `halo_copy` (for the late path). Events
/// of persons that do not exist are skipped (ingest refuses them, so they only come from
/// records written to the topic by something else).
pub async fn store_locations(
    pool: &Pool,
    copies: &[SeenCopy],
) -> Result<StoredLocations, StoreError> {
    let client = pool.get().await?;
    store_halo_copies(&client, copies).await?;
    // The same id twice in one batch: the first one stands, a different second one is a reuse.
    let mut seen: FxHashMap<Uuid, ReportFingerprint> = FxHashMap::default();
    let mut id_reused = Vec::new();
    let mut unique = Vec::with_capacity(copies.len());
    for c in copies.iter().filter(|c| c.routed.home) {
        let r = &c.routed;
        let mine = ReportFingerprint::of(&r.event);
        match seen.get(&r.event.event_id) {
            Some(first) if *first != mine => id_reused.push(*r),
            Some(_) => {}
            None => {
                seen.insert(r.event.event_id, mine);
                unique.push(c);
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
    let mut seqs = Vec::with_capacity(n);
    let mut cells = Vec::with_capacity(n);
    for c in &unique {
        let r = &c.routed;
        seqs.push(c.seq);
        cells.push(r.fine_cell as i64);
        ids.push(r.event.event_id);
        persons.push(r.event.person_id);
        lats.push(r.event.lat);
        lons.push(r.event.lon);
        recorded.push(timestamp(r.event.recorded_at));
        received.push(timestamp(r.event.received_at));
        zones.push(r.zone as i64);
    }
    // X = latitude, Y = longitude: the POC's axis convention (see the migration).
    let statement = client
        .prepare_cached(
            "INSERT INTO location (event_id, person_id, coordinate, recorded_at, received_at, zone,
                                   seq, fine_cell)
             SELECT e.id, e.person, ST_SetSRID(ST_MakePoint(e.lat, e.lon), 4326), e.rec, e.recv,
                    e.zone, e.seq, e.cell
             FROM unnest($1::uuid[], $2::int8[], $3::float8[], $4::float8[], $5::timestamptz[],
                         $6::timestamptz[], $7::int8[], $8::int8[], $9::int8[])
                  AS e(id, person, lat, lon, rec, recv, zone, seq, cell)
             JOIN person p ON p.id = e.person
             ON CONFLICT (event_id) DO NOTHING
             RETURNING event_id",
        )
        .await?;
    let rows = client
        .query(
            &statement,
            &[
                &ids, &persons, &lats, &lons, &recorded, &received, &zones, &seqs, &cells,
            ],
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
                .filter(|c| {
                    stored
                        .get(&c.routed.event.event_id)
                        .is_some_and(|f| *f != ReportFingerprint::of(&c.routed.event))
                })
                .map(|c| c.routed),
        );
    }
    Ok(StoredLocations {
        inserted: inserted.len() as u64,
        id_reused,
    })
}

/// Stores the ghost copies among `copies` into `halo_copy` (a repeat is already there).
async fn store_halo_copies(
    client: &deadpool_postgres::Client,
    copies: &[SeenCopy],
) -> Result<(), StoreError> {
    let ghosts: Vec<&SeenCopy> = copies.iter().filter(|c| !c.routed.home).collect();
    if ghosts.is_empty() {
        return Ok(());
    }
    let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut times, mut seqs, mut cells) = (Vec::new(), Vec::new(), Vec::new());
    for c in ghosts {
        cells.push(c.routed.fine_cell as i64);
        let e = &c.routed.event;
        cols.0.push(c.routed.zone as i64);
        cols.1.push(e.event_id);
        cols.2.push(e.person_id);
        cols.3.push(e.lat);
        cols.4.push(e.lon);
        times.push(timestamp(e.recorded_at));
        seqs.push(c.seq);
    }
    let statement = client
        .prepare_cached(
            "INSERT INTO halo_copy (zone, event_id, person_id, lat, lon, recorded_at, seq, fine_cell)
             SELECT g.zone, g.id, g.person, g.lat, g.lon, g.rec, g.seq, g.cell
             FROM unnest($1::int8[], $2::uuid[], $3::int8[], $4::float8[], $5::float8[],
                         $6::timestamptz[], $7::int8[], $8::int8[])
                  AS g(zone, id, person, lat, lon, rec, seq, cell)
             JOIN person p ON p.id = g.person
             ON CONFLICT (zone, event_id) DO NOTHING",
        )
        .await?;
    client
        .execute(
            &statement,
            &[
                &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &times, &seqs, &cells,
            ],
        )
        .await?;
    Ok(())
}

/// The late path's search (one statement for a batch's late copies): for each late copy, the
/// copies its zone saw with an input offset below `before` (home ones in `location`, ghosts in
/// `halo_copy`) that lie in the fine cells near it (its `near_cells`, the engine's neighbour
/// list: the cells whose points can be within `radius_m`), whose time is within `window_s` of
/// its own and that lie in the latitude-longitude box around it that holds every point within
/// `radius_m` + 1 m ([`search_box`]), of other persons, plus its own earlier copy if it is a
/// repeat. One list per late copy, in order.
///
/// Late copies of one batch crowd the same cells (a booth, a talk), so the statement reads each
/// (zone, cell, slice of `2 × window_s` that holds the late copy's time) once, from the slice's
/// start − `window_s` to its end + `window_s` (at most twice what one copy needs), through
/// btrees (`location (fine_cell, recorded_at)`, `halo_copy (zone, fine_cell, recorded_at)`),
/// and the copies are sorted out here; the exact geodesic decision is the engine's, as for copies on time (a spheroid
/// `ST_DWithin` per candidate cost 7 times the search itself on a crowded venue).
pub async fn late_partners(
    pool: &Pool,
    late: &[LateCopy],
    before: i64,
    window_s: u32,
    radius_m: f64,
) -> Result<Vec<Vec<StoredCopy>>, StoreError> {
    let window_us = i64::from(window_s) * MICROS_PER_S;
    let slice_us = 2 * window_us;
    let slice = |t: Micros| t.div_euclid(slice_us);
    // The (zone, cell, slice) groups the late copies need, each read once.
    let mut needed: BTreeMap<(u64, u64, i64), usize> = BTreeMap::new();
    for l in late {
        for cell in &l.near_cells {
            let n = needed.len();
            needed
                .entry((l.routed.zone, *cell, slice(l.routed.event.recorded_at)))
                .or_insert(n);
        }
    }
    let (mut groups, mut zones, mut cells, mut from, mut to) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (&(zone, cell, s), &group) in &needed {
        groups.push(group as i32);
        zones.push(zone as i64);
        cells.push(cell as i64);
        from.push(timestamp(s * slice_us - window_us));
        to.push(timestamp((s + 1) * slice_us + window_us));
    }
    let client = pool.get().await?;
    // `location` keeps the POC's axes: X is the latitude, Y the longitude.
    let statement = client
        .prepare_cached(
            "SELECT n.g, c.event_id, c.person_id, c.recorded_at, c.lat, c.lon, c.home
             FROM unnest($1::int4[], $2::int8[], $3::int8[], $4::timestamptz[],
                         $5::timestamptz[])
                  AS n(g, zone, cell, t_from, t_to)
             CROSS JOIN LATERAL (
                 SELECT event_id, person_id, recorded_at, ST_X(coordinate) AS lat,
                        ST_Y(coordinate) AS lon, true AS home
                 FROM location
                 WHERE fine_cell = n.cell AND zone = n.zone AND seq < $6
                   AND recorded_at BETWEEN n.t_from AND n.t_to
                 UNION ALL
                 SELECT event_id, person_id, recorded_at, lat, lon, false
                 FROM halo_copy
                 WHERE zone = n.zone AND fine_cell = n.cell AND seq < $6
                   AND recorded_at BETWEEN n.t_from AND n.t_to
             ) c",
        )
        .await?;
    let rows = client
        .query(&statement, &[&groups, &zones, &cells, &from, &to, &before])
        .await?;
    let mut by_group: Vec<Vec<StoredCopy>> = vec![Vec::new(); needed.len()];
    for r in rows {
        let at: DateTime<Utc> = r.get(3);
        if let Some(group) = by_group.get_mut(r.get::<_, i32>(0) as usize) {
            group.push(StoredCopy {
                event_id: r.get(1),
                person: r.get(2),
                recorded_at: micros(at),
                lat: r.get(4),
                lon: r.get(5),
                home: r.get(6),
            });
        }
    }
    Ok(late
        .iter()
        .map(|l| {
            let e = &l.routed.event;
            let (lat, lon) = search_box(e.lat, e.lon, radius_m + 1.0);
            let s = slice(e.recorded_at);
            l.near_cells
                .iter()
                .filter_map(|cell| needed.get(&(l.routed.zone, *cell, s)))
                .flat_map(|&group| &by_group[group])
                .filter(|c| {
                    (c.person != e.person_id || c.event_id == e.event_id)
                        && (c.recorded_at - e.recorded_at).abs() <= window_us
                        && (lat.0..=lat.1).contains(&c.lat)
                        && (lon.0..=lon.1).contains(&c.lon)
                })
                .copied()
                .collect()
        })
        .collect())
}

/// The latitude and longitude ranges (WGS84 degrees, each `(low, high)`) that hold every point
/// within `distance_m` of (`lat`, `lon`): a degree of latitude is at least 110,574 m (at the
/// equator) and a degree of longitude at least 111,319 m × cos(latitude) (the equatorial
/// radius); near a pole, or where the range would cross the antimeridian, every longitude.
pub fn search_box(lat: f64, lon: f64, distance_m: f64) -> ((f64, f64), (f64, f64)) {
    let dlat = distance_m / 110_574.0;
    let lat_range = ((lat - dlat).max(-90.0), (lat + dlat).min(90.0));
    let widest = lat.abs() + dlat;
    let cos = widest.min(90.0).to_radians().cos();
    if cos < 1e-6 {
        return (lat_range, (-180.0, 180.0));
    }
    let dlon = distance_m / (111_319.0 * cos);
    if lon - dlon < -180.0 || lon + dlon > 180.0 {
        return (lat_range, (-180.0, 180.0));
    }
    (lat_range, (lon - dlon, lon + dlon))
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

#[cfg(test)]
mod search_box_tests {
    use super::search_box;

    /// Every point at `d` meters (geodesic, GeographicLib) in 36 directions from places from
    /// the equator to near the poles lies in the box; across the antimeridian every longitude.
    #[test]
    fn the_box_holds_every_point_within_the_distance() {
        let geod = geographiclib_rs::Geodesic::wgs84();
        for &(lat, lon) in &[
            (0.0, 0.0),
            (41.387, 2.17),
            (-60.0, 100.0),
            (89.99, 10.0),
            (10.0, 179.99999),
        ] {
            let (la, lo) = search_box(lat, lon, 6.0);
            for k in 0..36 {
                use geographiclib_rs::DirectGeodesic;
                let (lat2, lon2): (f64, f64) = geod.direct(lat, lon, f64::from(k) * 10.0, 6.0);
                assert!(la.0 <= lat2 && lat2 <= la.1, "{lat},{lon} -> {lat2}");
                assert!(
                    lo.0 <= lon2 && lon2 <= lo.1,
                    "{lat},{lon} -> {lon2} not in {lo:?}"
                );
            }
        }
        assert_eq!(search_box(10.0, 179.99999, 6.0).1, (-180.0, 180.0));
    }
}
