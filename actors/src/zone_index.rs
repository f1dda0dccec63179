//! The zone stage's core: a fine-cell index of one zone's recent points, the partition's
//! event-time watermark, and detection on arrival with the reporting rule (docs/design.md §3).

use std::collections::BTreeMap;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{ColocationReport, ColocationSummary, Micros, PersonId, MICROS_PER_S};
use crate::geo::Ecef;
use crate::messages::{PersonBatch, PersonUpdate, RoutedEvent};
use crate::params::EngineParams;
use crate::zones::{person_partition, CellCache, FineCell, ZoneGrid, ZoneId};

/// Width of the eviction buckets in event time.
const BUCKET_US: Micros = MICROS_PER_S;

/// Width of a snapshot slice in event time (µs): a zone partition's snapshot holds its points
/// by slice of their `recorded_at`, one snapshot part per slice, and rewrites only the slices
/// whose points changed since the previous snapshot (see `actors/src/actors/zone.rs`).
pub const SNAPSHOT_SLICE_US: Micros = 5 * MICROS_PER_S;

/// The snapshot slice of a point recorded at `recorded_at` (µs since the Unix epoch).
pub fn snapshot_slice(recorded_at: Micros) -> i64 {
    recorded_at.div_euclid(SNAPSHOT_SLICE_US)
}

/// Points by fine cell, each cell's in the index's order.
pub type CellPointList = Vec<(FineCell, Vec<RetainedPoint>)>;

/// A zone's state without its points, as a zone partition's snapshot holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneMeta {
    pub zone: ZoneId,
    radius_m: f64,
    window_us: Micros,
    sum_per_peer: bool,
    watermark: Micros,
    counters: ZoneCounters,
}

impl ZoneMeta {
    /// The oldest time a point may still have after the zone's last eviction could have
    /// removed it: eviction only ever removes points older than `watermark - window_s`, so the
    /// points of later slices change only by arrivals (µs since the Unix epoch).
    pub fn eviction_horizon(&self) -> Micros {
        self.watermark.saturating_sub(self.window_us)
    }
}

/// A point a zone keeps while it can still be matched. Serialized as its [`StoredCopy`]: the
/// Earth-centred position is computed again when it is read (the same function of the same
/// degrees, so the same bits): 43 bytes a point instead of 67, a zone snapshot about a third
/// smaller.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredCopy", into = "StoredCopy")]
pub struct RetainedPoint {
    pub ecef: Ecef,
    pub recorded_at: Micros,
    pub person: PersonId,
    pub event_id: Uuid,
    pub lat: f64,
    pub lon: f64,
    /// Whether this zone is the point's home zone (else it is a ghost copy).
    pub home: bool,
}

/// A copy a zone saw in an earlier batch, as the store returns it for a late copy's matching
/// (the service: `location` for home copies, `halo_copy` for ghosts).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StoredCopy {
    pub event_id: Uuid,
    pub person: PersonId,
    /// µs since the Unix epoch.
    pub recorded_at: Micros,
    /// WGS84 degrees.
    pub lat: f64,
    pub lon: f64,
    /// Whether the zone is the event's home zone.
    pub home: bool,
}

impl StoredCopy {
    /// The copy of `routed` a zone keeps.
    pub fn of(routed: &RoutedEvent) -> Self {
        let e = &routed.event;
        Self {
            event_id: e.event_id,
            person: e.person_id,
            recorded_at: e.recorded_at,
            lat: e.lat,
            lon: e.lon,
            home: routed.home,
        }
    }

    /// As a retained point (its Earth-centred position computed).
    pub fn point(&self) -> RetainedPoint {
        RetainedPoint {
            ecef: Ecef::from_degrees(self.lat, self.lon),
            recorded_at: self.recorded_at,
            person: self.person,
            event_id: self.event_id,
            lat: self.lat,
            lon: self.lon,
            home: self.home,
        }
    }
}

impl From<StoredCopy> for RetainedPoint {
    fn from(c: StoredCopy) -> Self {
        c.point()
    }
}

impl From<RetainedPoint> for StoredCopy {
    fn from(p: RetainedPoint) -> Self {
        Self::from(&p)
    }
}

impl From<&RetainedPoint> for StoredCopy {
    fn from(p: &RetainedPoint) -> Self {
        Self {
            event_id: p.event_id,
            person: p.person,
            recorded_at: p.recorded_at,
            lat: p.lat,
            lon: p.lon,
            home: p.home,
        }
    }
}

/// What the candidate scan reads of a retained point: 48 bytes. The Earth-centred position
/// stays exact (`f64`): an `f32` offset from the cell would save 16 bytes a point, but the
/// co-locations it lets through must then be decided on the exact position computed again
/// from the degrees, and that trigonometry cost the engine about 2 % (docs/benchmarks.md,
/// "Memory per retained point").
#[derive(Debug, Clone, Copy, PartialEq)]
struct HotPoint {
    ecef: Ecef,
    /// µs since the Unix epoch.
    recorded_at: Micros,
    person: PersonId,
    /// [`id_tag`] of the event id: the duplicate check reads the cold column only on a match.
    id_tag: u32,
    /// Whether this zone is the point's home zone.
    home: bool,
}

/// A 32-bit digest of an event id, kept in the padding of [`HotPoint`]. All 16 bytes are
/// folded in: client ids may be time-ordered (UUID v7), alike in their first bytes.
fn id_tag(id: &Uuid) -> u32 {
    let (a, b) = id.as_u64_pair();
    let x = a ^ b;
    (x ^ (x >> 32)) as u32
}

/// The rest of a retained point, read only for a co-location, a duplicate or a copy out.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ColdPoint {
    event_id: Uuid,
    /// WGS84 degrees.
    lat: f64,
    lon: f64,
}

// The per-point budget of docs/benchmarks.md ("Memory per retained point").
const _: () =
    assert!(std::mem::size_of::<HotPoint>() == 48 && std::mem::size_of::<ColdPoint>() == 32);

/// One fine cell's points, in the order they were retained, as two columns of the same length.
#[derive(Debug, Clone, PartialEq)]
struct CellPoints {
    hot: Vec<HotPoint>,
    cold: Vec<ColdPoint>,
    /// The eviction bucket this cell is filed under: that of its oldest point.
    bucket: Micros,
}

impl CellPoints {
    /// An empty cell.
    fn new() -> Self {
        Self {
            hot: Vec::new(),
            cold: Vec::new(),
            bucket: Micros::MAX,
        }
    }

    fn len(&self) -> usize {
        self.hot.len()
    }

    fn is_empty(&self) -> bool {
        self.hot.is_empty()
    }

    /// Appends `copy`, at `ecef` (its exact position). The cell grows by a quarter, not
    /// double: a cell holds a handful of points, and doubling left a third of them unused.
    fn push(&mut self, copy: &StoredCopy, ecef: &Ecef) {
        if self.hot.len() == self.hot.capacity() {
            let more = (self.hot.len() / 4).max(1);
            self.hot.reserve_exact(more);
            self.cold.reserve_exact(more);
        }
        self.hot.push(HotPoint {
            ecef: *ecef,
            recorded_at: copy.recorded_at,
            person: copy.person,
            id_tag: id_tag(&copy.event_id),
            home: copy.home,
        });
        self.cold.push(ColdPoint {
            event_id: copy.event_id,
            lat: copy.lat,
            lon: copy.lon,
        });
    }

    /// The `i`th point as it is stored.
    fn copy(&self, i: usize) -> StoredCopy {
        let (h, c) = (&self.hot[i], &self.cold[i]);
        StoredCopy {
            event_id: c.event_id,
            person: h.person,
            recorded_at: h.recorded_at,
            lat: c.lat,
            lon: c.lon,
            home: h.home,
        }
    }

    fn copies(&self) -> impl Iterator<Item = StoredCopy> + '_ {
        (0..self.len()).map(|i| self.copy(i))
    }

    /// Keeps the points `keep` accepts, in their order; returns how many were removed.
    fn retain(&mut self, keep: impl Fn(&HotPoint) -> bool) -> usize {
        let len = self.len();
        let mut kept = 0;
        for i in 0..len {
            if keep(&self.hot[i]) {
                self.hot.swap(kept, i);
                self.cold.swap(kept, i);
                kept += 1;
            }
        }
        self.hot.truncate(kept);
        self.cold.truncate(kept);
        // Give back room left unused.
        if self.hot.capacity() > kept + kept / 2 + 1 {
            self.hot.shrink_to(kept + kept / 4);
            self.cold.shrink_to(kept + kept / 4);
        }
        len - kept
    }

    fn oldest(&self) -> Option<Micros> {
        self.hot.iter().map(|p| p.recorded_at).min()
    }
}

/// A cell as the index's own serde form keeps it (the form of the index before points were
/// packed): its points as [`RetainedPoint`]s, that is [`StoredCopy`]s.
#[derive(Serialize, Deserialize)]
struct StoredCell {
    points: Vec<RetainedPoint>,
    bucket: Micros,
}

impl Serialize for CellPoints {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        StoredCell {
            points: self.copies().map(|c| c.point()).collect(),
            bucket: self.bucket,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for CellPoints {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let stored = StoredCell::deserialize(d)?;
        let mut cell = CellPoints::new();
        for p in &stored.points {
            cell.push(&StoredCopy::from(p), &p.ecef);
        }
        cell.bucket = stored.bucket;
        Ok(cell)
    }
}

/// Counters of one zone, for its state view and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneCounters {
    pub home_events: u64,
    pub ghost_events: u64,
    pub duplicates: u64,
    pub colocations: u64,
    pub evicted: u64,
}

/// One zone's recent points, indexed by fine cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZoneIndex {
    zone: ZoneId,
    radius_m: f64,
    window_us: Micros,
    /// Whether an arrival's co-locations with one peer are summed up into one update: exact
    /// when `window_s <= episode_gap_s` (see [`ColocationSummary`]); one update per
    /// co-location otherwise.
    #[serde(default = "summing_default")]
    sum_per_peer: bool,
    cells: FxHashMap<FineCell, CellPoints>,
    /// Cells to revisit at eviction, by bucket of their points' event time.
    buckets: BTreeMap<Micros, Vec<FineCell>>,
    retained: usize,
    watermark: Micros,
    counters: ZoneCounters,
    /// Reused between arrivals: the summaries of the arrival being matched, by person and
    /// peer, in the order they were first found.
    #[serde(skip)]
    scratch: Vec<ColocationSummary>,
    #[serde(skip)]
    scratch_index: FxHashMap<(PersonId, PersonId), usize>,
    /// Candidates probed: retained points of the neighbor cells (and stored copies) that
    /// arrivals looked at, since this index was made (not kept in snapshots).
    #[serde(skip)]
    probed: u64,
}

fn summing_default() -> bool {
    true
}

/// What happened to an arriving event copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Indexed; it formed this many co-locations with points already there.
    Indexed { colocations: u32 },
    /// The same event (same id) is already in the zone: nothing to do.
    Duplicate,
}

impl ZoneIndex {
    /// An empty index for `zone`.
    pub fn new(zone: ZoneId, params: &EngineParams) -> Self {
        Self {
            zone,
            radius_m: params.radius_m,
            window_us: i64::from(params.window_s) * MICROS_PER_S,
            sum_per_peer: params.window_s <= params.episode_gap_s,
            cells: FxHashMap::default(),
            buckets: BTreeMap::new(),
            retained: 0,
            watermark: Micros::MIN,
            counters: ZoneCounters::default(),
            scratch: Vec::new(),
            scratch_index: FxHashMap::default(),
            probed: 0,
        }
    }

    /// The zone's state without its points.
    pub fn meta(&self) -> ZoneMeta {
        ZoneMeta {
            zone: self.zone,
            radius_m: self.radius_m,
            window_us: self.window_us,
            sum_per_peer: self.sum_per_peer,
            watermark: self.watermark,
            counters: self.counters,
        }
    }

    /// The retained points of the snapshot slices `wanted` accepts, by slice, grouped by fine
    /// cell (cells in ascending order, each cell's points in the index's order).
    pub fn points_by_slice(&self, wanted: impl Fn(i64) -> bool) -> BTreeMap<i64, CellPointList> {
        let mut by_slice: BTreeMap<i64, BTreeMap<FineCell, Vec<RetainedPoint>>> = BTreeMap::new();
        for (cell, points) in &self.cells {
            for p in points.copies() {
                let slice = snapshot_slice(p.recorded_at);
                if wanted(slice) {
                    by_slice
                        .entry(slice)
                        .or_default()
                        .entry(*cell)
                        .or_default()
                        .push(p.point());
                }
            }
        }
        by_slice
            .into_iter()
            .map(|(slice, cells)| (slice, cells.into_iter().collect()))
            .collect()
    }

    /// The zone of `meta` holding exactly `cells`' points (in the order given, per cell), as
    /// [`ZoneIndex::meta`] and [`ZoneIndex::points_by_slice`] captured it; each cell is filed
    /// for eviction under its oldest point, as arrivals file it.
    pub fn restore(
        meta: ZoneMeta,
        cells: impl IntoIterator<Item = (FineCell, Vec<RetainedPoint>)>,
    ) -> Self {
        let mut index = Self {
            zone: meta.zone,
            radius_m: meta.radius_m,
            window_us: meta.window_us,
            sum_per_peer: meta.sum_per_peer,
            cells: FxHashMap::default(),
            buckets: BTreeMap::new(),
            retained: 0,
            watermark: meta.watermark,
            counters: meta.counters,
            scratch: Vec::new(),
            scratch_index: FxHashMap::default(),
            probed: 0,
        };
        for (cell_id, points) in cells {
            if points.is_empty() {
                continue;
            }
            let cell = index.cells.entry(cell_id).or_insert_with(CellPoints::new);
            index.retained += points.len();
            for p in &points {
                cell.push(&StoredCopy::from(p), &p.ecef);
            }
        }
        for (cell_id, cell) in &mut index.cells {
            let oldest = cell.oldest();
            cell.bucket = oldest.unwrap_or(Micros::MAX).div_euclid(BUCKET_US);
            index.buckets.entry(cell.bucket).or_default().push(*cell_id);
        }
        index
    }

    /// The zone this index is for.
    pub fn zone(&self) -> ZoneId {
        self.zone
    }

    /// How many points are retained.
    pub fn retained(&self) -> usize {
        self.retained
    }

    /// Candidates probed since this index was made: the retained points of the neighbor cells,
    /// and the stored copies, that arrivals looked at (not kept in snapshots).
    pub fn probed(&self) -> u64 {
        self.probed
    }

    /// Counters since the zone started (restored with snapshots).
    pub fn counters(&self) -> ZoneCounters {
        self.counters
    }

    /// The last watermark applied by [`ZoneIndex::evict`].
    pub fn watermark(&self) -> Micros {
        self.watermark
    }

    /// Matches a copy that is not late against the retained points of `neighbors` (the cells
    /// near its fine cell), reports its co-locations to the person of each event that is home
    /// here, summed up per (person, peer) (and a home event as a sighting), then retains it.
    pub fn insert(
        &mut self,
        routed: &RoutedEvent,
        neighbors: &[FineCell],
        out: &mut impl Extend<PersonUpdate>,
    ) -> Arrival {
        self.arrive(routed, neighbors, None, out)
    }

    /// Matches a late copy (one that arrived after the partition's watermark had passed it)
    /// against every copy this zone saw before it: the retained points of `neighbors` and
    /// `stored`, the zone's copies from earlier batches that the store returned for it, in input
    /// order (they may repeat retained ones, or one event sent twice; each event counts once). Its co-locations go out as
    /// [`PersonUpdate::LateColocations`] under the same reporting rule; then it is retained,
    /// so that copies arriving after it match it in real time. A copy whose id the zone saw
    /// before is a repeat and changes nothing.
    pub fn insert_late(
        &mut self,
        routed: &RoutedEvent,
        neighbors: &[FineCell],
        stored: &[StoredCopy],
        out: &mut impl Extend<PersonUpdate>,
    ) -> Arrival {
        self.arrive(routed, neighbors, Some(stored), out)
    }

    // Longer than our ~120-line rule on purpose: this is the engine's hot path, one pass over
    // the candidate cells that checks, reports and retains in the order the reporting rule
    // states (docs/design.md §3). Its steps share the candidate loop's state; splitting them
    // would pass that state across calls per candidate, which we will not do without a bench
    // (engine-bench) showing it costs nothing.
    fn arrive(
        &mut self,
        routed: &RoutedEvent,
        neighbors: &[FineCell],
        stored: Option<&[StoredCopy]>,
        out: &mut impl Extend<PersonUpdate>,
    ) -> Arrival {
        let e = &routed.event;
        if let Some(cell) = self.cells.get(&routed.fine_cell) {
            let tag = id_tag(&e.event_id);
            let mut same = cell.hot.iter().zip(&cell.cold);
            if same.any(|(h, c)| h.id_tag == tag && c.event_id == e.event_id) {
                self.counters.duplicates += 1;
                return Arrival::Duplicate;
            }
        }
        let late = stored.is_some();
        let stored = stored.unwrap_or(&[]);
        if stored.iter().any(|p| p.event_id == e.event_id) {
            self.counters.duplicates += 1;
            return Arrival::Duplicate;
        }
        let ecef = Ecef::from_degrees(e.lat, e.lon);
        if routed.home {
            self.counters.home_events += 1;
            out.extend([PersonUpdate::Sighting {
                event: *e,
                zone: self.zone,
            }]);
        } else {
            self.counters.ghost_events += 1;
        }
        let mut summaries = std::mem::take(&mut self.scratch);
        let mut index = std::mem::take(&mut self.scratch_index);
        summaries.clear();
        index.clear();
        let sum_per_peer = self.sum_per_peer;
        let zone = self.zone;
        let mut report = |c: ColocationReport| {
            if !sum_per_peer {
                summaries.push(ColocationSummary::of(&c, e.event_id, zone));
                return;
            }
            match index.entry((c.person, c.peer)) {
                std::collections::hash_map::Entry::Occupied(at) => summaries[*at.get()].add(&c),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(summaries.len());
                    summaries.push(ColocationSummary::of(&c, e.event_id, zone));
                }
            }
        };
        let (window_us, radius_m) = (self.window_us, self.radius_m);
        // Nobody to tell when neither event is home here; a person does not meet itself.
        let candidate = |home: bool, person: PersonId, recorded_at: Micros| {
            (routed.home || home)
                && person != e.person_id
                && (recorded_at - e.recorded_at).abs() <= window_us
        };
        let mut found = 0u32;
        let mut meet = |p: &StoredCopy, distance_m: f64| {
            found += 1;
            let time = p.recorded_at.max(e.recorded_at);
            if routed.home {
                report(ColocationReport {
                    person: e.person_id,
                    own_event: e.event_id,
                    peer: p.person,
                    peer_event: p.event_id,
                    time,
                    distance_m,
                    lat: e.lat,
                    lon: e.lon,
                });
            }
            if p.home {
                report(ColocationReport {
                    person: p.person,
                    own_event: p.event_id,
                    peer: e.person_id,
                    peer_event: e.event_id,
                    time,
                    distance_m,
                    lat: p.lat,
                    lon: p.lon,
                });
            }
        };
        // An event is matched once: a stored copy that is also retained as the retained one,
        // one stored several times (a retried send) as its first copy.
        let mut matched: FxHashSet<Uuid> = FxHashSet::default();
        // Neighbors are looked up a batch at a time, each cell's first points read before any
        // is scanned: the cache misses of a batch then overlap instead of following one another.
        const BATCH: usize = 16;
        let mut probed = 0u64;
        for batch in neighbors.chunks(BATCH) {
            let mut cells: [Option<&CellPoints>; BATCH] = [None; BATCH];
            let mut warm = 0;
            for (slot, cell) in cells.iter_mut().zip(batch) {
                *slot = self.cells.get(cell);
                warm ^= slot
                    .and_then(|c| c.hot.first())
                    .map_or(0, |h| h.recorded_at);
            }
            std::hint::black_box(warm);
            for points in cells.iter().flatten() {
                probed += points.hot.len() as u64;
                for (i, p) in points.hot.iter().enumerate() {
                    if late {
                        matched.insert(points.cold[i].event_id);
                    }
                    if !candidate(p.home, p.person, p.recorded_at) {
                        continue;
                    }
                    if let Some(distance_m) = ecef.within(&p.ecef, radius_m) {
                        meet(&points.copy(i), distance_m);
                    }
                }
            }
        }
        probed += stored.len() as u64;
        for copy in stored {
            if matched.insert(copy.event_id) && candidate(copy.home, copy.person, copy.recorded_at)
            {
                if let Some(distance_m) = ecef.within(&copy.point().ecef, radius_m) {
                    meet(copy, distance_m);
                }
            }
        }
        if late {
            out.extend(summaries.drain(..).map(PersonUpdate::LateColocations));
        } else {
            out.extend(summaries.drain(..).map(PersonUpdate::Colocations));
        }
        self.scratch = summaries;
        self.scratch_index = index;
        self.counters.colocations += u64::from(found);
        self.probed += probed;
        let bucket = e.recorded_at.div_euclid(BUCKET_US);
        let cell = self
            .cells
            .entry(routed.fine_cell)
            .or_insert_with(CellPoints::new);
        cell.push(&StoredCopy::of(routed), &ecef);
        // File the cell under the bucket of its oldest point: it is revisited once that bucket
        // falls out of the window, then refiled under its new oldest point.
        if bucket < cell.bucket {
            cell.bucket = bucket;
            self.buckets
                .entry(bucket)
                .or_default()
                .push(routed.fine_cell);
        }
        self.retained += 1;
        Arrival::Indexed { colocations: found }
    }

    /// Drops the points that no event at or after `watermark` can match (older than
    /// `watermark - window_s`), keeping memory bounded whatever the input rate.
    pub fn evict(&mut self, watermark: Micros) {
        self.evict_into(watermark, None);
    }

    /// [`ZoneIndex::evict`], keeping the evicted points in `evicted` when given.
    pub fn evict_into(&mut self, watermark: Micros, mut evicted_out: Option<&mut Vec<StoredCopy>>) {
        if watermark <= self.watermark {
            return;
        }
        self.watermark = watermark;
        let horizon = watermark.saturating_sub(self.window_us);
        // A bucket is done when all its times are below the horizon.
        while let Some(entry) = self.buckets.first_entry() {
            if (*entry.key() + 1).saturating_mul(BUCKET_US) > horizon {
                break;
            }
            let bucket = *entry.key();
            for cell_id in entry.remove() {
                let Some(cell) = self.cells.get_mut(&cell_id) else {
                    continue;
                };
                if cell.bucket != bucket {
                    continue;
                }
                if let Some(into) = evicted_out.as_deref_mut() {
                    into.extend(cell.copies().filter(|p| p.recorded_at < horizon));
                }
                let evicted = cell.retain(|p| p.recorded_at >= horizon);
                self.retained -= evicted;
                self.counters.evicted += evicted as u64;
                if cell.is_empty() {
                    self.cells.remove(&cell_id);
                } else {
                    let b = cell.oldest().unwrap_or(horizon).div_euclid(BUCKET_US);
                    cell.bucket = b;
                    self.buckets.entry(b).or_default().push(cell_id);
                }
            }
        }
    }

    /// Forgets every retained point of `persons` (erasure), home and ghost copies alike;
    /// returns how many were removed. A cell left empty is dropped; a cell's eviction bucket
    /// may then be older than its oldest point, which eviction tolerates (it refiles the cell).
    pub fn forget(&mut self, persons: &FxHashSet<PersonId>) -> usize {
        if persons.is_empty() {
            return 0;
        }
        let mut removed = 0;
        self.cells.retain(|_, cell| {
            removed += cell.retain(|p| !persons.contains(&p.person));
            !cell.is_empty()
        });
        self.retained -= removed;
        removed
    }

    /// The retained points, oldest first, at most `limit` of them.
    pub fn points(&self, limit: usize) -> Vec<RetainedPoint> {
        let mut all: Vec<StoredCopy> = self.cells.values().flat_map(CellPoints::copies).collect();
        all.sort_by_key(|p| (p.recorded_at, p.event_id));
        all.truncate(limit);
        all.iter().map(StoredCopy::point).collect()
    }

    /// How many fine cells hold points.
    pub fn cells(&self) -> usize {
        self.cells.len()
    }
}

/// Counters of one zone partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionCounters {
    pub batches: u64,
    pub events: u64,
    /// Copies that arrived later than the watermark: stored, not matched in real time.
    pub late: u64,
}

/// The event-time clock of one zone partition: the watermark is the latest trusted event time
/// seen minus `lateness_s`; a copy earlier than the watermark on arrival is late. A report
/// moves it no further than its receive time plus `clock_skew_s`
/// ([`EngineParams::trusted_time`]), so one device's fast clock cannot make everyone else late.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventClock {
    lateness_us: Micros,
    max_seen: Micros,
    watermark: Micros,
    #[serde(default = "default_skew_us")]
    skew_us: Micros,
}

fn default_skew_us() -> Micros {
    i64::from(EngineParams::default().clock_skew_s) * MICROS_PER_S
}

impl EventClock {
    /// A clock that has seen nothing.
    pub fn new(params: &EngineParams) -> Self {
        Self {
            lateness_us: i64::from(params.lateness_s) * MICROS_PER_S,
            max_seen: Micros::MIN,
            watermark: Micros::MIN,
            skew_us: i64::from(params.clock_skew_s) * MICROS_PER_S,
        }
    }

    /// Observes an arriving copy's `recorded_at`, received (by the ingest) at `received_at`;
    /// `true` when it is late (earlier than the watermark). The clock moves to at most
    /// `received_at + clock_skew_s`.
    pub fn observe(&mut self, recorded_at: Micros, received_at: Micros) -> bool {
        let late = recorded_at < self.watermark;
        self.advance(crate::params::trusted_time(
            recorded_at,
            received_at,
            self.skew_us,
        ));
        late
    }

    fn advance(&mut self, trusted: Micros) {
        if trusted > self.max_seen {
            self.max_seen = trusted;
            self.watermark = self.watermark.max(trusted.saturating_sub(self.lateness_us));
        }
    }

    /// The current watermark.
    pub fn watermark(&self) -> Micros {
        self.watermark
    }

    /// Applies `params`' `lateness_s` and `clock_skew_s` to a clock restored from a snapshot
    /// taken under other settings. The watermark moves to the latest trusted time seen minus
    /// the new lateness when that is later; it never goes back, so a longer lateness takes
    /// effect as event time moves on.
    pub fn reconfigure(&mut self, params: &EngineParams) {
        self.lateness_us = i64::from(params.lateness_s) * MICROS_PER_S;
        self.skew_us = i64::from(params.clock_skew_s) * MICROS_PER_S;
        if self.max_seen != Micros::MIN {
            self.watermark = self
                .watermark
                .max(self.max_seen.saturating_sub(self.lateness_us));
        }
    }

    /// Moves the clock to at least `max_event_time` without an event: the ingest side's
    /// promise that nothing later than this arrives earlier than `max_event_time - lateness`
    /// (a heartbeat). Lets partitions without traffic advance.
    pub fn advance_to(&mut self, max_event_time: Micros) {
        self.advance(max_event_time);
    }

    /// The end of the input: every time is now in the past.
    pub fn finish(&mut self) {
        self.watermark = Micros::MAX;
    }
}

/// A copy taken into a zone partition's batch, in arrival order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admitted {
    pub routed: RoutedEvent,
    /// Whether the partition's watermark had passed it on arrival: it is matched by
    /// [`ZoneIndex::insert_late`] against everything its zone saw before.
    pub late: bool,
}

/// The intake of a zone partition's batch, in arrival order: every copy goes to `admitted`
/// with whether it is late (earlier than the watermark on arrival; counted).
pub fn admit(
    clock: &mut EventClock,
    counters: &mut PartitionCounters,
    batch: impl IntoIterator<Item = RoutedEvent>,
    admitted: &mut Vec<Admitted>,
) {
    counters.batches += 1;
    for routed in batch {
        counters.events += 1;
        let late = clock.observe(routed.event.recorded_at, routed.event.received_at);
        if late {
            counters.late += 1;
        }
        admitted.push(Admitted { routed, late });
    }
}

/// A zone batch's person updates, split by destination person partition as they are found
/// ([`person_partition`] of each update's person), each partition's in the order found. An
/// update is written into its partition's list when found, and copied once more only when
/// several zones' lists are joined ([`UpdatesByPartition::concat`]); a list of the batch's
/// updates split afterwards wrote every 136-byte update twice more, into pages the kernel had
/// to clear first (a fifth of engine-bench's profile was the kernel clearing pages).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdatesByPartition {
    parts: Vec<Vec<PersonUpdate>>,
}

impl UpdatesByPartition {
    /// Empty lists for `person_partitions` partitions (at least one), with room for as many
    /// updates as `room` gives for each (what the previous batch held: a list grown by doubling
    /// copies its updates again at each step), none where `room` is shorter.
    pub fn new(person_partitions: u32, room: &[usize]) -> Self {
        let parts = (0..person_partitions.max(1) as usize)
            .map(|q| Vec::with_capacity(room.get(q).copied().unwrap_or(0)))
            .collect();
        Self { parts }
    }

    /// How many updates each partition holds, by partition.
    pub fn sizes(&self) -> Vec<usize> {
        self.parts.iter().map(Vec::len).collect()
    }

    /// The lists of `all`, partition by partition, in the order of `all`: each update copied
    /// once, into a list of its exact final size, or not at all when one list holds all of its
    /// partition's (moved). Empty lists are dropped, with the room they had. Every element
    /// must be for the same number of partitions as `person_partitions`.
    pub fn concat(person_partitions: u32, all: Vec<UpdatesByPartition>) -> Self {
        let n = person_partitions.max(1) as usize;
        debug_assert!(all.iter().all(|u| u.parts.len() == n));
        let mut sizes = vec![0usize; n];
        for u in &all {
            for (size, part) in sizes.iter_mut().zip(&u.parts) {
                *size += part.len();
            }
        }
        let mut out = Self::new(person_partitions, &[]);
        for u in all {
            for (q, part) in u.parts.into_iter().enumerate() {
                if part.is_empty() {
                    continue;
                }
                let into = &mut out.parts[q];
                if into.is_empty() && part.len() == sizes[q] {
                    *into = part;
                } else {
                    into.reserve_exact(sizes[q] - into.len());
                    into.extend(part);
                }
            }
        }
        out
    }

    /// One batch per person partition, indexed by partition, each followed by the source's
    /// watermark; every partition gets a batch, so watermarks reach all of them.
    pub fn into_batches(self, source: u32, watermark: Micros) -> Vec<PersonBatch> {
        self.parts
            .into_iter()
            .map(|updates| PersonBatch {
                source,
                updates,
                watermark,
            })
            .collect()
    }
}

impl Extend<PersonUpdate> for UpdatesByPartition {
    fn extend<I: IntoIterator<Item = PersonUpdate>>(&mut self, updates: I) {
        let n = self.parts.len() as u32;
        for u in updates {
            self.parts[person_partition(u.person(), n) as usize].push(u);
        }
    }
}

/// What a zone partition produced for one batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ZoneBatchOutput {
    /// One batch per person partition, indexed by partition.
    pub person_batches: Vec<PersonBatch>,
    /// The batch's home events (late ones included), for the `location` table.
    pub home_events: Vec<RoutedEvent>,
}

/// The synchronous core of one zone partition: its zones' indexes and its event clock.
#[derive(Debug)]
pub struct ZonePartition {
    partition: u32,
    params: EngineParams,
    person_partitions: u32,
    cache: CellCache,
    zones: FxHashMap<ZoneId, ZoneIndex>,
    /// Copies evicted from each zone's index, kept for late copies to match (the service keeps
    /// them in PostgreSQL); dropped once older than the late horizon. `None`: not kept.
    evicted: Option<FxHashMap<ZoneId, Vec<StoredCopy>>>,
    clock: EventClock,
    counters: PartitionCounters,
    /// Candidates probed by the zones dropped so far (emptied by eviction).
    probed_dropped: u64,
    /// How many updates the last batch sent to each person partition: the room the next
    /// batch's lists start with.
    room: Vec<usize>,
}

impl ZonePartition {
    /// An empty partition; `keep_copies` keeps evicted copies for late copies to match.
    pub fn new(
        partition: u32,
        params: &EngineParams,
        person_partitions: u32,
        keep_copies: bool,
    ) -> Self {
        Self {
            partition,
            params: *params,
            person_partitions,
            cache: CellCache::new(ZoneGrid::new(params)),
            zones: FxHashMap::default(),
            evicted: keep_copies.then(FxHashMap::default),
            clock: EventClock::new(params),
            counters: PartitionCounters::default(),
            probed_dropped: 0,
            room: Vec::new(),
        }
    }

    /// Processes one batch in order and evicts at its end.
    pub fn process(&mut self, batch: &[RoutedEvent]) -> ZoneBatchOutput {
        let mut updates = UpdatesByPartition::new(self.person_partitions, &self.room);
        let home_events: Vec<RoutedEvent> = batch.iter().filter(|r| r.home).copied().collect();
        let mut admitted = Vec::new();
        admit(
            &mut self.clock,
            &mut self.counters,
            batch.iter().copied(),
            &mut admitted,
        );
        let window_us = i64::from(self.params.window_s) * MICROS_PER_S;
        for Admitted { routed, late } in &admitted {
            let neighbors = self.cache.neighbors(routed.fine_cell);
            let params = &self.params;
            let index = self
                .zones
                .entry(routed.zone)
                .or_insert_with(|| ZoneIndex::new(routed.zone, params));
            if *late {
                let t = routed.event.recorded_at;
                let stored: Vec<StoredCopy> = self
                    .evicted
                    .as_ref()
                    .and_then(|e| e.get(&routed.zone))
                    .map(|v| {
                        v.iter()
                            .filter(|c| (c.recorded_at - t).abs() <= window_us)
                            .copied()
                            .collect()
                    })
                    .unwrap_or_default();
                index.insert_late(routed, neighbors, &stored, &mut updates);
            } else {
                index.insert(routed, neighbors, &mut updates);
            }
        }
        let watermark = self.clock.watermark();
        let keep_after = watermark.saturating_sub(self.params.closed_retention_us());
        for index in self.zones.values_mut() {
            match self.evicted.as_mut() {
                Some(evicted) => {
                    let log = evicted.entry(index.zone()).or_default();
                    index.evict_into(watermark, Some(log));
                    log.retain(|c| c.recorded_at >= keep_after);
                }
                None => index.evict(watermark),
            }
        }
        if let Some(evicted) = self.evicted.as_mut() {
            evicted.retain(|_, log| !log.is_empty());
        }
        let mut dropped = 0;
        self.zones.retain(|_, z| {
            let keep = z.retained() > 0;
            if !keep {
                dropped += z.probed();
            }
            keep
        });
        self.probed_dropped += dropped;
        self.room = updates.sizes();
        ZoneBatchOutput {
            person_batches: updates.into_batches(self.partition, watermark),
            home_events,
        }
    }

    /// The end of the input: the watermark jumps to the end of time and everything is evicted.
    pub fn finish(&mut self) -> ZoneBatchOutput {
        self.clock.finish();
        self.probed_dropped += self.zones.values().map(ZoneIndex::probed).sum::<u64>();
        self.zones.clear();
        ZoneBatchOutput {
            person_batches: UpdatesByPartition::new(self.person_partitions, &[])
                .into_batches(self.partition, self.clock.watermark()),
            home_events: Vec::new(),
        }
    }

    /// Points retained over all zones.
    pub fn retained(&self) -> usize {
        self.zones.values().map(ZoneIndex::retained).sum()
    }

    /// Candidates probed by this partition's zones since it was made ([`ZoneIndex::probed`]),
    /// the dropped ones included.
    pub fn probed(&self) -> u64 {
        self.probed_dropped + self.zones.values().map(ZoneIndex::probed).sum::<u64>()
    }

    /// The partition's counters.
    pub fn counters(&self) -> PartitionCounters {
        self.counters
    }

    /// The zone indexes, for views.
    pub fn zones(&self) -> impl Iterator<Item = &ZoneIndex> {
        self.zones.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{derived_event_id, LocationEvent};

    const T0: Micros = 1_790_000_000 * MICROS_PER_S;

    fn event(person: PersonId, lat: f64, lon: f64, t_s: i64) -> LocationEvent {
        let recorded_at = T0 + t_s * MICROS_PER_S;
        LocationEvent {
            event_id: derived_event_id(person, recorded_at, lat, lon),
            person_id: person,
            lat,
            lon,
            recorded_at,
            received_at: recorded_at,
        }
    }

    fn routed(grid: &ZoneGrid, e: LocationEvent) -> RoutedEvent {
        let fine_cell = grid.fine_cell(e.lat, e.lon);
        RoutedEvent {
            event: e,
            zone: grid.zone_of(fine_cell),
            fine_cell,
            home: true,
        }
    }

    fn colocations(out: &[PersonUpdate]) -> Vec<(PersonId, PersonId)> {
        out.iter()
            .filter_map(|u| match u {
                PersonUpdate::Colocations(c) => Some((c.person, c.peer)),
                PersonUpdate::Sighting { .. } | PersonUpdate::LateColocations(_) => None,
            })
            .collect()
    }

    #[test]
    fn forgetting_a_person_drops_its_points_only_and_leaves_matching_and_eviction_working() {
        let params = EngineParams::default();
        let grid = ZoneGrid::new(&params);
        let mut cache = CellCache::new(grid);
        let a = routed(&grid, event(1, 48.0, 11.0, 0));
        let mut z = ZoneIndex::new(a.zone, &params);
        let mut out = Vec::new();
        // Persons 1 and 2 at one place, 3 a cell away, twice each over 20 s.
        for (person, dlat, t) in [(1, 0.0, 0), (2, 0.00001, 0), (3, 0.0002, 10), (2, 0.0, 20)] {
            let e = routed(&grid, event(person, 48.0 + dlat, 11.0, t));
            z.insert(&e, cache.neighbors(e.fine_cell), &mut out);
        }
        assert_eq!(z.retained(), 4);
        let erased: FxHashSet<PersonId> = [2].into_iter().collect();
        assert_eq!(z.forget(&erased), 2);
        assert_eq!(z.retained(), 2);
        let persons: Vec<PersonId> = z.points(10).iter().map(|p| p.person).collect();
        assert_eq!(persons, [1, 3]);
        assert_eq!(z.forget(&erased), 0);
        // A newcomer next to person 1 meets person 1 only.
        out.clear();
        let b = routed(&grid, event(4, 48.00001, 11.0, 30));
        z.insert(&b, cache.neighbors(b.fine_cell), &mut out);
        assert_eq!(colocations(&out), [(4, 1), (1, 4)]);
        // Eviction still finds every point, though cells were emptied and refiled.
        z.evict(T0 + 1_000 * MICROS_PER_S);
        assert_eq!(z.retained(), 0);
        assert_eq!(z.cells(), 0);
    }

    #[test]
    fn detects_within_radius_and_window_and_reports_to_both() {
        let params = EngineParams::default();
        let grid = ZoneGrid::new(&params);
        let mut cache = CellCache::new(grid);
        let a = routed(&grid, event(1, 48.0, 11.0, 0));
        // ~3.3 m north 60 s later: co-located; ~6.7 m: not; 61 s later: not; same person: not.
        for (person, dlat, t, expected) in [
            (2, 0.00003, 60, vec![(2, 1), (1, 2)]),
            (2, 0.00003, -60, vec![(2, 1), (1, 2)]),
            (3, 0.00006, 0, vec![]),
            (4, 0.00001, 61, vec![]),
            (1, 0.00001, 1, vec![]),
        ] {
            let mut z = ZoneIndex::new(a.zone, &params);
            let mut out = Vec::new();
            z.insert(&a, cache.neighbors(a.fine_cell), &mut out);
            let b = routed(&grid, event(person, 48.0 + dlat, 11.0, t));
            out.clear();
            assert!(matches!(
                z.insert(&b, cache.neighbors(b.fine_cell), &mut out),
                Arrival::Indexed { .. }
            ));
            assert_eq!(colocations(&out), expected, "person {person} at {t} s");
            out.clear();
            assert_eq!(
                z.insert(&a, cache.neighbors(a.fine_cell), &mut out),
                Arrival::Duplicate
            );
            assert!(out.is_empty());
        }
    }

    /// The summaries an arrival reported, as (person, peer, count, first s, last s).
    fn summaries(out: &[PersonUpdate]) -> Vec<(PersonId, PersonId, u32, i64, i64)> {
        out.iter()
            .filter_map(|u| match u {
                PersonUpdate::Colocations(c) | PersonUpdate::LateColocations(c) => Some((
                    c.person,
                    c.peer,
                    c.count,
                    (c.first - T0) / MICROS_PER_S,
                    (c.last - T0) / MICROS_PER_S,
                )),
                PersonUpdate::Sighting { .. } => None,
            })
            .collect()
    }

    #[test]
    fn an_arrival_sums_up_its_co_locations_with_each_peer() {
        let params = EngineParams::default();
        let grid = ZoneGrid::new(&params);
        let mut cache = CellCache::new(grid);
        let first = routed(&grid, event(2, 48.0, 11.0, 0));
        let mut z = ZoneIndex::new(first.zone, &params);
        let mut out = Vec::new();
        // Person 2 reports three times, person 3 once, all within 2 m and a minute.
        for (person, t) in [(2, 0), (2, 20), (3, 30), (2, 40)] {
            let e = routed(&grid, event(person, 48.00001, 11.0, t));
            z.insert(&e, cache.neighbors(e.fine_cell), &mut out);
        }
        out.clear();
        let arrival = routed(&grid, event(1, 48.0, 11.00001, 50));
        z.insert(&arrival, cache.neighbors(arrival.fine_cell), &mut out);
        // One summary per (person told, peer): person 1 hears of 3 co-locations with 2 and 1
        // with 3; 2 and 3 each hear of theirs with 1. Times are the later event's (the
        // arrival's, 50 s).
        let mut got = summaries(&out);
        got.sort_unstable();
        assert_eq!(
            got,
            vec![
                (1, 2, 3, 50, 50),
                (1, 3, 1, 50, 50),
                (2, 1, 3, 50, 50),
                (3, 1, 1, 50, 50)
            ]
        );
        // A window wider than the episode gap: one update per co-location.
        let wide = EngineParams {
            window_s: 600,
            episode_gap_s: 60,
            ..params
        };
        let mut z = ZoneIndex::new(first.zone, &wide);
        for (person, t) in [(2, 0), (2, 20)] {
            let e = routed(&grid, event(person, 48.00001, 11.0, t));
            z.insert(&e, cache.neighbors(e.fine_cell), &mut out);
        }
        out.clear();
        z.insert(&arrival, cache.neighbors(arrival.fine_cell), &mut out);
        assert_eq!(summaries(&out).len(), 4, "{:?}", summaries(&out));
    }

    #[test]
    fn a_ghost_copy_reports_only_to_the_home_person() {
        let params = EngineParams::default();
        let grid = ZoneGrid::new(&params);
        let mut cache = CellCache::new(grid);
        let home = routed(&grid, event(1, 48.0, 11.0, 0));
        let mut ghost = routed(&grid, event(2, 48.00002, 11.0, 5));
        ghost.home = false;
        let mut z = ZoneIndex::new(home.zone, &params);
        let mut out = Vec::new();
        z.insert(&home, cache.neighbors(home.fine_cell), &mut out);
        out.clear();
        z.insert(&ghost, cache.neighbors(ghost.fine_cell), &mut out);
        assert_eq!(colocations(&out), vec![(1, 2)]);
    }

    #[test]
    fn eviction_keeps_what_can_still_match() {
        let params = EngineParams::default();
        let grid = ZoneGrid::new(&params);
        let mut cache = CellCache::new(grid);
        let mut z = ZoneIndex::new(grid.home_zone(48.0, 11.0), &params);
        let mut out = Vec::new();
        for t in 0..100 {
            let r = routed(&grid, event(1 + t % 3, 48.0, 11.0, t));
            z.insert(&r, cache.neighbors(r.fine_cell), &mut out);
        }
        assert_eq!(z.retained(), 100);
        // Watermark at 99 s: points before 39 s can match nothing at or after 99 s.
        z.evict(T0 + 99 * MICROS_PER_S);
        assert_eq!(z.retained(), 61);
        assert!(z
            .points(1000)
            .iter()
            .all(|p| p.recorded_at >= T0 + 39 * MICROS_PER_S));
        z.evict(T0 + 1_000 * MICROS_PER_S);
        assert_eq!((z.retained(), z.cells()), (0, 0));
        assert_eq!(z.counters().evicted, 100);
    }

    #[test]
    fn a_cell_keeps_its_points_in_order_through_eviction_forgetting_serde_and_restore() {
        let params = EngineParams::default();
        let grid = ZoneGrid::new(&params);
        let mut cache = CellCache::new(grid);
        let first = routed(&grid, event(1, 48.0, 11.0, 0));
        let mut z = ZoneIndex::new(first.zone, &params);
        let mut out = Vec::new();
        // 40 points in one or two cells, persons 1..=5, over 80 s: cells grow past their
        // first capacities and shrink again.
        for i in 0..40 {
            let e = routed(&grid, event(1 + i % 5, 48.0 + 1e-6 * i as f64, 11.0, 2 * i));
            z.insert(&e, cache.neighbors(e.fine_cell), &mut out);
        }
        z.evict(T0 + 110 * MICROS_PER_S);
        let erased: FxHashSet<PersonId> = [3].into_iter().collect();
        // Horizon 50 s: points 25..40 stay, of which 27, 32 and 37 are person 3's.
        assert_eq!(z.forget(&erased), 3);
        let kept = z.points(usize::MAX);
        assert_eq!(kept.len(), 12);
        assert!(kept
            .iter()
            .all(|p| p.person != 3 && p.recorded_at >= T0 + 50 * MICROS_PER_S));
        // Each point as it was retained, its position bit for bit.
        for p in &kept {
            assert_eq!(*p, StoredCopy::from(p).point());
        }
        let bytes = postcard::to_allocvec(&z).expect("encodes");
        let back: ZoneIndex = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(back.points(usize::MAX), kept);
        let by_cell: Vec<(FineCell, Vec<RetainedPoint>)> = z
            .points_by_slice(|_| true)
            .into_values()
            .flatten()
            .collect();
        let restored = ZoneIndex::restore(z.meta(), by_cell);
        assert_eq!(restored.points(usize::MAX), kept);
        assert_eq!(
            (restored.retained(), restored.cells()),
            (z.retained(), z.cells())
        );
    }

    #[test]
    fn the_clock_flags_late_events() {
        let mut clock = EventClock::new(&EngineParams::default());
        let on_time = |clock: &mut EventClock, t: Micros| clock.observe(t, t);
        assert!(!on_time(&mut clock, T0));
        assert!(!on_time(&mut clock, T0 + 100 * MICROS_PER_S));
        assert_eq!(clock.watermark(), T0 + 70 * MICROS_PER_S);
        assert!(!on_time(&mut clock, T0 + 70 * MICROS_PER_S));
        assert!(on_time(&mut clock, T0 + 70 * MICROS_PER_S - 1));
    }

    #[test]
    fn a_fast_device_clock_moves_the_watermark_only_by_the_allowed_skew() {
        let params = EngineParams::default();
        let mut clock = EventClock::new(&params);
        let skew = i64::from(params.clock_skew_s) * MICROS_PER_S;
        let lateness = i64::from(params.lateness_s) * MICROS_PER_S;
        // Received at T0, stamped 290 s ahead: not late, but trusted only to T0 + skew.
        assert!(!clock.observe(T0 + 290 * MICROS_PER_S, T0));
        assert_eq!(clock.watermark(), T0 + skew - lateness);
        // Restored under a shorter lateness: the watermark moves up to it, never back.
        let mut shorter = clock;
        shorter.reconfigure(&EngineParams {
            lateness_s: params.lateness_s / 3,
            ..params
        });
        assert_eq!(shorter.watermark(), T0 + skew - lateness / 3);
        let mut longer = shorter;
        longer.reconfigure(&params);
        assert_eq!(longer.watermark(), shorter.watermark());
        // A report stamped and received at T0 + 1 s is on time.
        assert!(!clock.observe(T0 + MICROS_PER_S, T0 + MICROS_PER_S));
        assert_eq!(params.trusted_time(T0 + 290 * MICROS_PER_S, T0), T0 + skew);
        assert_eq!(params.trusted_time(T0 - 7, T0), T0 - 7);
    }

    #[test]
    fn a_retained_point_is_stored_without_its_earth_centred_position_and_read_back_the_same() {
        let e = event(7, 35.081_234_567, -106.651_234_567, 3);
        let copy = StoredCopy {
            event_id: e.event_id,
            person: e.person_id,
            recorded_at: e.recorded_at,
            lat: e.lat,
            lon: e.lon,
            home: true,
        };
        let point = copy.point();
        let bytes = postcard::to_allocvec(&point).expect("encodes");
        assert_eq!(bytes, postcard::to_allocvec(&copy).expect("encodes"));
        let back: RetainedPoint = postcard::from_bytes(&bytes).expect("decodes");
        // Bit for bit: a restored zone decides every distance as before its snapshot.
        assert_eq!(back, point);
        assert_eq!(
            back.ecef.0.map(f64::to_bits),
            point.ecef.0.map(f64::to_bits)
        );
    }

    #[test]
    fn updates_split_by_person_partition_keep_their_order_and_every_partition_gets_a_batch() {
        let sighting = |person: PersonId, t_s: i64| PersonUpdate::Sighting {
            event: event(person, 48.0, 11.0, t_s),
            zone: 1,
        };
        let partitions = 3;
        let first: Vec<PersonUpdate> = (1..=40).map(|p| sighting(p, p)).collect();
        let second: Vec<PersonUpdate> = (1..=40).map(|p| sighting(p, 100 + p)).collect();
        let mut a = UpdatesByPartition::new(partitions, &[7]);
        a.extend(first.iter().copied());
        let mut b = UpdatesByPartition::new(partitions, &[]);
        b.extend(second.iter().copied());
        let empty = UpdatesByPartition::new(partitions, &[]);
        assert_eq!(a.sizes().iter().sum::<usize>(), 40);
        assert!(empty.sizes().iter().all(|&n| n == 0));
        let all = UpdatesByPartition::concat(partitions, vec![empty, a, b]);
        assert_eq!(all.sizes().iter().sum::<usize>(), 80);
        let batches = all.into_batches(5, T0);
        assert_eq!(batches.len(), 3);
        for (q, batch) in batches.iter().enumerate() {
            assert_eq!((batch.source, batch.watermark), (5, T0));
            // Each partition holds exactly its persons' updates, in the order they were found.
            let expected: Vec<PersonUpdate> = first
                .iter()
                .chain(&second)
                .filter(|u| person_partition(u.person(), partitions) as usize == q)
                .copied()
                .collect();
            assert!(!expected.is_empty());
            assert_eq!(batch.updates, expected);
        }
        // With nothing found, every partition still gets a batch, for the watermark.
        let nothing = UpdatesByPartition::new(partitions, &[]).into_batches(5, T0);
        assert_eq!(nothing.len(), 3);
        assert!(nothing.iter().all(|b| b.updates.is_empty()));
    }
}
