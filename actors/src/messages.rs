//! What flows between the stages (docs/design.md §2): routed events into zones, per-person updates
//! and
//! zone watermarks into persons, episode changes and notifications out.

use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use crate::domain::{ColocationSummary, Episode, LocationEvent, Micros, Notification, PersonId};
use crate::zones::{FineCell, ZoneId};

/// A copy of an event on its way to one zone: its home zone, or a zone of its halo (a ghost).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoutedEvent {
    pub event: LocationEvent,
    /// The zone this copy is for.
    pub zone: ZoneId,
    /// The event's fine cell (the same for every copy).
    pub fine_cell: FineCell,
    /// Whether `zone` is the event's home zone; `false` for a ghost copy.
    pub home: bool,
}

impl RoutedEvent {
    /// Checks a copy read from the locations topic: its event ([`LocationEvent::check`]), and
    /// its zone and fine cell valid H3 cells. Errors name the field.
    pub fn check(&self) -> Result<(), crate::domain::ValidationError> {
        self.event.check()?;
        check_cell("zone", self.zone)?;
        check_cell("fine_cell", self.fine_cell)
    }
}

/// A copy as a zone partition saw it: with `seq`, the input offset that brought it (copies of
/// one record share it), which orders what a zone saw before what.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeenCopy {
    pub routed: RoutedEvent,
    pub seq: i64,
}

/// A late copy on its way to the store's search ([`crate::actors::ports::LocationSink::late_partners`]),
/// with the fine cells whose points can be within the radius of it (its own included).
#[derive(Debug, Clone, PartialEq)]
pub struct LateCopy {
    pub routed: RoutedEvent,
    pub near_cells: Vec<FineCell>,
}

/// Persons erased (`DELETE /v1/persons/{id}`): the actors forget every trace of them
/// (`Forget` messages of the supervisors) and the stages drop what the logs still hold of them.
pub type PersonSet = Arc<FxHashSet<PersonId>>;

/// One update for one person, from the zone stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum PersonUpdate {
    /// One of the person's own events, seen in its home zone.
    Sighting { event: LocationEvent, zone: ZoneId },
    /// The person's co-locations with one peer found by one arriving event, reported by the
    /// person's home zone.
    Colocations(ColocationSummary),
    /// The same, found by a late copy (one that arrived after its zone partition's watermark
    /// had passed it): its time may be earlier than the source's watermark, and it may reshape
    /// an episode already closed (the late path of docs/architecture.md).
    LateColocations(ColocationSummary),
}

/// `cell` as an H3 cell, or the error naming `field`.
fn check_cell(field: &'static str, cell: u64) -> Result<(), crate::domain::ValidationError> {
    match h3o::CellIndex::try_from(cell) {
        Ok(_) => Ok(()),
        Err(_) => Err(crate::domain::ValidationError {
            field,
            reason: format!("is not an H3 cell (got {cell:#x})"),
        }),
    }
}

impl PersonUpdate {
    /// Whether the update is about one of `persons`: its person, or a summary's peer.
    pub fn involves_any(&self, persons: &FxHashSet<PersonId>) -> bool {
        match self {
            PersonUpdate::Sighting { event, .. } => persons.contains(&event.person_id),
            PersonUpdate::Colocations(c) | PersonUpdate::LateColocations(c) => {
                persons.contains(&c.person) || persons.contains(&c.peer)
            }
        }
    }

    /// Checks an update read from the person-updates topic (a corrupted record, or one another
    /// program wrote): a sighting's event and zone as [`RoutedEvent::check`] does, a summary as
    /// [`ColocationSummary::check`] does. Errors name the field.
    pub fn check(&self) -> Result<(), crate::domain::ValidationError> {
        match self {
            Self::Sighting { event, zone } => {
                event.check()?;
                check_cell("zone", *zone)
            }
            Self::Colocations(c) | Self::LateColocations(c) => {
                c.check()?;
                check_cell("zone", c.zone)
            }
        }
    }

    /// The person the update is for.
    pub fn person(&self) -> PersonId {
        match self {
            Self::Sighting { event, .. } => event.person_id,
            Self::Colocations(c) | Self::LateColocations(c) => c.person,
        }
    }

    /// The update's latest event time (µs since the Unix epoch): the sighting's, or the last
    /// co-location's.
    pub fn time(&self) -> Micros {
        match self {
            Self::Sighting { event, .. } => event.recorded_at,
            Self::Colocations(c) | Self::LateColocations(c) => c.last,
        }
    }
}

/// A batch's updates grouped per person, the way both engines apply a batch: one person at a
/// time, persons in the order of their first update, each person's updates in their batch
/// order. Found with one hash lookup per update and no move of an update (a sort of the
/// 136-byte updates moved each several times); the grouping's room is kept for the next batch.
#[derive(Debug, Default)]
pub struct PersonRuns {
    /// One run per person, in the order of their first update.
    runs: Vec<PersonRun>,
    /// For each update of the batch, the index of its run.
    run_of_update: Vec<u32>,
    /// The run of each person.
    index: FxHashMap<PersonId, u32>,
}

/// One person's updates in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersonRun {
    /// Whose updates these are.
    pub person: PersonId,
    /// How many updates.
    pub len: u32,
    /// The latest of their times ([`PersonUpdate::time`]), µs since the Unix epoch.
    pub latest: Micros,
}

impl PersonRuns {
    /// Groups `updates` (the previous grouping is forgotten).
    pub fn group(&mut self, updates: &[PersonUpdate]) {
        self.runs.clear();
        self.run_of_update.clear();
        self.index.clear();
        self.run_of_update.reserve(updates.len());
        for u in updates {
            let (person, t) = (u.person(), u.time());
            let runs = &mut self.runs;
            let r = *self.index.entry(person).or_insert_with(|| {
                runs.push(PersonRun {
                    person,
                    len: 0,
                    latest: t,
                });
                (runs.len() - 1) as u32
            });
            let run = &mut self.runs[r as usize];
            run.len += 1;
            run.latest = run.latest.max(t);
            self.run_of_update.push(r);
        }
    }

    /// The runs, in the order of their persons' first update.
    pub fn runs(&self) -> &[PersonRun] {
        &self.runs
    }

    /// For each update of the batch, the index of its run in [`PersonRuns::runs`].
    pub fn run_of_update(&self) -> &[u32] {
        &self.run_of_update
    }

    /// The updates' indices in the batch, each person's together in batch order, persons in
    /// the order of [`PersonRuns::runs`] (a new vector each call).
    pub fn in_person_order(&self) -> Vec<u32> {
        let mut next = Vec::with_capacity(self.runs.len());
        let mut at = 0;
        for run in &self.runs {
            next.push(at);
            at += run.len;
        }
        let mut order = vec![0u32; self.run_of_update.len()];
        for (i, &r) in self.run_of_update.iter().enumerate() {
            order[next[r as usize] as usize] = i as u32;
            next[r as usize] += 1;
        }
        order
    }
}

/// How many updates ahead of its use [`updates_at`] asks the CPU to fetch an update.
const PREFETCH_AHEAD: usize = 4;

/// The updates of `updates` at `indices`, in the order of `indices` (one person's run of a
/// [`PersonRuns`] grouping), each one asked of the memory [`PREFETCH_AHEAD`] updates before it
/// is read. A run's updates lie scattered over the batch (136 bytes each, the batch tens of
/// megabytes), so each was a cache miss when its person read it: the load of the update was
/// three quarters of the person actor's own time in engine-bench's profile
/// (docs/benchmarks.md, "Proximity engine"). Panics when an index is out of range.
pub fn updates_at<'a>(
    updates: &'a [PersonUpdate],
    indices: &'a [u32],
) -> impl Iterator<Item = &'a PersonUpdate> + 'a {
    for &i in indices.iter().take(PREFETCH_AHEAD) {
        prefetch(&updates[i as usize]);
    }
    indices.iter().enumerate().map(move |(k, &i)| {
        if let Some(&ahead) = indices.get(k + PREFETCH_AHEAD) {
            prefetch(&updates[ahead as usize]);
        }
        &updates[i as usize]
    })
}

/// Asks the CPU to bring every cache line of `item` into its caches, without waiting for it;
/// nothing elsewhere than on x86-64.
#[inline(always)]
fn prefetch<T>(item: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE: usize = 64;
        let start = std::ptr::from_ref(item).cast::<i8>();
        // The lines from the one of `item`'s first byte to the one of its last.
        let lines = (start as usize % LINE + std::mem::size_of::<T>()).div_ceil(LINE);
        for line in 0..lines {
            // SAFETY: a prefetch is a hint: it reads nothing into the program and never faults,
            // whatever the address; each address here is in a line holding bytes of `item`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line * LINE)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = item;
}

/// What one zone partition sends one person partition after a batch: the updates for persons
/// of that partition, then the zone partition's watermark (no later update from `source` will
/// carry a co-location earlier than it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonBatch {
    /// The zone partition it comes from.
    pub source: u32,
    pub updates: Vec<PersonUpdate>,
    pub watermark: Micros,
}

/// A change to one stored episode: upsert `episode`, removing the rows of the same person and
/// peer whose `started_at` is in `replaces`, in one transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeChange {
    pub episode: Episode,
    pub replaces: Vec<Micros>,
}

/// What a person partition emits after a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PersonOutput {
    pub changes: Vec<EpisodeChange>,
    pub notifications: Vec<Notification>,
    /// Co-location summaries accepted (not repeats), when capturing is on (tests, the oracle
    /// check).
    pub accepted: Vec<ColocationSummary>,
}

impl PersonOutput {
    /// Appends another output.
    pub fn extend(&mut self, other: PersonOutput) {
        self.changes.extend(other.changes);
        self.notifications.extend(other.notifications);
        self.accepted.extend(other.accepted);
    }

    /// One output holding `parts` in order, each of its vectors allocated once at its final
    /// size (a single part is returned as it is). Appending the parts one by one instead doubled
    /// the vectors of a whole batch's changes and notifications again and again: at the end
    /// of a conference, hundreds of MB of fresh memory per partition (docs/benchmarks.md).
    pub fn concat(mut parts: Vec<PersonOutput>) -> PersonOutput {
        if parts.len() <= 1 {
            return parts.pop().unwrap_or_default();
        }
        let mut all = PersonOutput {
            changes: Vec::with_capacity(parts.iter().map(|p| p.changes.len()).sum()),
            notifications: Vec::with_capacity(parts.iter().map(|p| p.notifications.len()).sum()),
            accepted: Vec::with_capacity(parts.iter().map(|p| p.accepted.len()).sum()),
        };
        for p in parts {
            all.extend(p);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sighting(person: PersonId, t: Micros) -> PersonUpdate {
        PersonUpdate::Sighting {
            event: LocationEvent {
                event_id: uuid::Uuid::from_u128((person as u128) << 64 | t as u128),
                person_id: person,
                lat: 35.08,
                lon: -106.65,
                recorded_at: t,
                received_at: t,
            },
            zone: 1,
        }
    }

    #[test]
    fn a_batch_groups_per_person_in_batch_order_persons_in_order_of_their_first_update() {
        let mut runs = PersonRuns::default();
        // An earlier grouping is forgotten.
        runs.group(&[sighting(9, 1), sighting(9, 2)]);
        let updates = [
            sighting(3, 50),
            sighting(1, 20),
            sighting(3, 10),
            sighting(2, 30),
            sighting(1, 40),
        ];
        runs.group(&updates);
        let run = |person, len, latest| PersonRun {
            person,
            len,
            latest,
        };
        assert_eq!(runs.runs(), [run(3, 2, 50), run(1, 2, 40), run(2, 1, 30)]);
        assert_eq!(runs.run_of_update(), [0, 1, 0, 2, 1]);
        assert_eq!(runs.in_person_order(), [0, 2, 1, 4, 3]);
        runs.group(&[]);
        assert!(runs.runs().is_empty() && runs.in_person_order().is_empty());
    }
}
