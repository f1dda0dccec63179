//! The synchronous engine: the whole logic of both stages over an event stream, with any
//! number of zone and person partitions, in one thread. Tests compare it with the oracle and
//! with the actor engine; benches measure it.

use rustc_hash::FxHashMap;

use crate::domain::{ColocationSummary, Episode, LocationEvent, Micros, Notification, PersonId};
use crate::episodes::PersonPartition;
use crate::messages::{EpisodeChange, PersonBatch, PersonOutput, RoutedEvent};
use crate::params::{EngineParams, ParamsError};
use crate::zone_index::{ZoneBatchOutput, ZonePartition};
use crate::zones::{zone_partition, CellCache, ZoneGrid};

/// Routes events to their home and halo zones, and zones to zone partitions (the ingest side).
#[derive(Debug)]
pub struct Router {
    cache: CellCache,
    zone_partitions: u32,
}

impl Router {
    /// A router for `zone_partitions` partitions of the locations topic.
    pub fn new(params: &EngineParams, zone_partitions: u32) -> Self {
        Self {
            cache: CellCache::new(ZoneGrid::new(params)),
            zone_partitions: zone_partitions.max(1),
        }
    }

    /// How many zone partitions events are spread over.
    pub fn zone_partitions(&self) -> u32 {
        self.zone_partitions
    }

    /// Calls `emit(partition, copy)` for the home copy and each ghost copy of `event`.
    pub fn route(&mut self, event: &LocationEvent, mut emit: impl FnMut(u32, RoutedEvent)) {
        let route = self.cache.route(event.lat, event.lon);
        let copy = |zone, home| RoutedEvent {
            event: *event,
            zone,
            fine_cell: route.fine_cell,
            home,
        };
        emit(
            zone_partition(route.home, self.zone_partitions),
            copy(route.home, true),
        );
        for &zone in &route.halo {
            emit(
                zone_partition(zone, self.zone_partitions),
                copy(zone, false),
            );
        }
    }

    /// Routes a batch, keeping arrival order within each partition.
    pub fn route_batch(&mut self, events: &[LocationEvent]) -> Vec<Vec<RoutedEvent>> {
        let mut out = vec![Vec::new(); self.zone_partitions as usize];
        for e in events {
            self.route(e, |p, r| out[p as usize].push(r));
        }
        out
    }
}

/// The `connection` table in memory: episodes by (person, peer, started_at).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EpisodeTable {
    // Hashed, sorted only when read: it stands in for PostgreSQL in the benches, where its
    // ordered inserts were 3-5 % of the engine's profile.
    rows: FxHashMap<(PersonId, PersonId, Micros), Episode>,
}

impl EpisodeTable {
    /// Applies one change as the store does: remove what it replaces, upsert it.
    pub fn apply(&mut self, change: &EpisodeChange) {
        let e = &change.episode;
        for &start in &change.replaces {
            self.rows.remove(&(e.person, e.peer, start));
        }
        self.rows.insert(e.key(), *e);
    }

    /// All rows, by key (person, peer, started_at).
    pub fn episodes(&self) -> Vec<Episode> {
        let mut rows: Vec<Episode> = self.rows.values().copied().collect();
        rows.sort_unstable_by_key(Episode::key);
        rows
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// How the engine is partitioned and what it keeps for inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    pub zone_partitions: u32,
    pub person_partitions: u32,
    /// Keep every accepted co-location and notification (tests).
    pub capture: bool,
    /// Keep the copies each zone evicted, for late copies to match (the service keeps them in
    /// PostgreSQL). Off only for benches whose input is never late: a late copy then matches
    /// only what its zone still retains.
    pub keep_copies: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            zone_partitions: 1,
            person_partitions: 1,
            capture: false,
            keep_copies: true,
        }
    }
}

/// Figures of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub events: u64,
    pub home_events: u64,
    pub colocations: u64,
    pub notifications: u64,
    pub late: u64,
}

/// Both stages, synchronously.
#[derive(Debug)]
pub struct Engine {
    router: Router,
    zones: Vec<ZonePartition>,
    persons: Vec<PersonPartition>,
    table: EpisodeTable,
    notifications: Vec<Notification>,
    accepted: Vec<ColocationSummary>,
    stats: EngineStats,
    capture: bool,
}

impl Engine {
    /// An engine with validated `params`.
    pub fn new(params: &EngineParams, options: EngineOptions) -> Result<Self, ParamsError> {
        params.validate()?;
        let zp = options.zone_partitions.max(1);
        let pp = options.person_partitions.max(1);
        Ok(Self {
            router: Router::new(params, zp),
            zones: (0..zp)
                .map(|p| ZonePartition::new(p, params, pp, options.keep_copies))
                .collect(),
            persons: (0..pp)
                .map(|_| PersonPartition::new(params, zp, options.capture))
                .collect(),
            table: EpisodeTable::default(),
            notifications: Vec::new(),
            accepted: Vec::new(),
            stats: EngineStats::default(),
            capture: options.capture,
        })
    }

    /// Runs a batch of arrivals through both stages, delivering zone output at once.
    pub fn ingest(&mut self, events: &[LocationEvent]) {
        self.stats.events += events.len() as u64;
        let routed = self.router.route_batch(events);
        for (p, batch) in routed.iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let out = self.process_zone(p as u32, batch);
            self.deliver_all(out);
        }
    }

    /// The end of input: every zone partition's watermark jumps to the end of time, so every
    /// episode closes.
    pub fn finish(&mut self) {
        for p in 0..self.zones.len() {
            let out = self.finish_zone(p as u32);
            self.deliver_all(out);
        }
    }

    /// Routes a batch without processing it (for tests that drive partitions themselves).
    pub fn route(&mut self, events: &[LocationEvent]) -> Vec<Vec<RoutedEvent>> {
        self.stats.events += events.len() as u64;
        self.router.route_batch(events)
    }

    /// Runs one zone partition over its part of a batch; the output is not delivered yet.
    pub fn process_zone(&mut self, partition: u32, batch: &[RoutedEvent]) -> ZoneBatchOutput {
        let zone = &mut self.zones[partition as usize];
        let late_before = zone.counters().late;
        let out = zone.process(batch);
        self.stats.late += zone.counters().late - late_before;
        self.stats.home_events += out.home_events.len() as u64;
        out
    }

    /// Ends one zone partition's input.
    pub fn finish_zone(&mut self, partition: u32) -> ZoneBatchOutput {
        self.zones[partition as usize].finish()
    }

    /// Delivers one zone partition's batch to one person partition.
    pub fn deliver(&mut self, person_partition: u32, batch: &PersonBatch) {
        let mut out = PersonOutput::default();
        self.persons[person_partition as usize].apply(batch, &mut out);
        for change in &out.changes {
            self.table.apply(change);
        }
        self.stats.notifications += out.notifications.len() as u64;
        if self.capture {
            self.notifications.extend(out.notifications);
            self.accepted.extend(out.accepted);
        }
    }

    fn deliver_all(&mut self, out: ZoneBatchOutput) {
        for (q, batch) in out.person_batches.iter().enumerate() {
            self.deliver(q as u32, batch);
        }
    }

    /// The episode table.
    pub fn episodes(&self) -> Vec<Episode> {
        self.table.episodes()
    }

    /// The accepted co-location summaries (when capturing), sorted by (person, peer,
    /// arriving event, zone, closest pair).
    pub fn colocations(&self) -> Vec<ColocationSummary> {
        let key = |c: &ColocationSummary| {
            (
                c.person,
                c.peer,
                c.arriving_event,
                c.zone,
                c.closest.own_event,
                c.closest.peer_event,
            )
        };
        let mut v = self.accepted.clone();
        v.sort_by_key(key);
        v
    }

    /// The notifications (when capturing), in emission order.
    pub fn notifications(&self) -> &[Notification] {
        &self.notifications
    }

    /// Figures so far.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            colocations: self.persons.iter().map(|p| p.counters().colocations).sum(),
            ..self.stats
        }
    }

    /// Points retained over all zone partitions.
    pub fn retained_points(&self) -> usize {
        self.zones.iter().map(ZonePartition::retained).sum()
    }

    /// Candidates probed over all zone partitions ([`crate::zone_index::ZoneIndex::probed`]).
    pub fn probed(&self) -> u64 {
        self.zones.iter().map(ZonePartition::probed).sum()
    }

    /// Persons held over all person partitions.
    pub fn persons(&self) -> usize {
        self.persons.iter().map(PersonPartition::persons).sum()
    }
}
