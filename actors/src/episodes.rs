//! The person stage's core: each person's trajectory and episodes with each peer, closed only
//! once the minimum watermark over all zone partitions has passed them (docs/design.md §1, §3).
//!
//! Episodes are the connected components of a (person, peer)'s co-location times, linked when
//! at most `episode_gap_s` apart. Adding a time only ever merges components, so an open
//! episode is kept as a summary (start, last, count, closest co-location), whatever the order
//! in which co-locations arrive. Every co-location a zone partition reports after publishing
//! watermark `w` has a time at or after `w`; so once the minimum watermark is later than
//! `last + episode_gap_s`, nothing can touch the episode any more and it is closed. Repeats
//! (replays after a crash) are dropped: earlier than their source's watermark, or seen already.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use thin_vec::ThinVec;
use uuid::Uuid;

use crate::domain::{
    Closest, ColocationSummary, Episode, LocationEvent, Micros, Notification, NotificationKind,
    PersonId, MICROS_PER_S,
};
use crate::messages::{
    updates_at, EpisodeChange, PersonBatch, PersonOutput, PersonRun, PersonRuns, PersonUpdate,
};
use crate::params::EngineParams;
use crate::zones::{mix64, ZoneId};

/// How many recent sightings a person keeps for its live view.
pub const TRAJECTORY_LEN: usize = 32;

/// The episode rules a person applies, in µs (from [`EngineParams`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpisodeRules {
    /// `episode_gap_s`: co-locations at most this far apart are one episode.
    pub gap_us: Micros,
    /// How long a closed episode is kept for late co-locations after its deadline
    /// ([`EngineParams::closed_retention_us`]).
    pub closed_retention_us: Micros,
}

impl EpisodeRules {
    /// The rules of `params`.
    pub fn of(params: &EngineParams) -> Self {
        Self {
            gap_us: i64::from(params.episode_gap_s) * MICROS_PER_S,
            closed_retention_us: params.closed_retention_us(),
        }
    }
}

/// An episode with one peer: open, or closed and kept for late co-locations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Segment {
    start: Micros,
    last: Micros,
    count: u32,
    closest: Closest,
    /// The `started_at` under which the sink last stored it, if it did.
    stored_start: StoredStart,
    /// Stored rows that merged into this one, to remove at the next flush (a `ThinVec`: 8
    /// bytes, where a `Vec` took 24 in every episode and is almost always empty).
    absorbed: ThinVec<Micros>,
    dirty: bool,
    /// Closed (announced as ended) and kept only for late co-locations to reshape, until the
    /// minimum watermark is `closed_retention_us` past its deadline.
    closed: bool,
    /// Whether `connection.started` went out for it (announcements wait for the flush, so that
    /// one batch announces each episode once, with its figures at the end of the batch).
    announced: bool,
    /// A `connection.updated` is due at the flush, replacing these announced starts.
    update: Option<ThinVec<Micros>>,
}

impl Segment {
    /// When the episode closes unless a co-location extends it: its last co-location plus the
    /// episode gap, µs since the Unix epoch.
    fn deadline(&self, gap_us: Micros) -> Micros {
        self.last.saturating_add(gap_us)
    }

    /// Whether the episode is open and `min_watermark` passed its deadline: it closes now.
    fn closes_before(&self, gap_us: Micros, min_watermark: Micros) -> bool {
        !self.closed && self.deadline(gap_us) < min_watermark
    }
}

// A segment is 112 bytes (152 with an `Option` start and `Vec`s), so a peers map slot is 128:
// the size of the map of a person who met people (docs/benchmarks.md, "Person actors").
const _: () = assert!(std::mem::size_of::<Segment>() == 112);

/// The `started_at` (µs since the Unix epoch) under which the sink last stored an episode, if
/// it did: `Micros::MIN` for none, 8 bytes where an `Option` took 16. Serialized as an
/// `Option<Micros>` (the snapshots' form); a stored `Micros::MIN` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StoredStart(Micros);

impl StoredStart {
    const NONE: Self = Self(Micros::MIN);

    fn get(self) -> Option<Micros> {
        (self != Self::NONE).then_some(self.0)
    }
}

impl Serialize for StoredStart {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(s)
    }
}

impl<'de> Deserialize<'de> for StoredStart {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Option::<Micros>::deserialize(d)? {
            None => Ok(Self::NONE),
            Some(Micros::MIN) => Err(serde::de::Error::custom(
                "an episode stored under the earliest time there is",
            )),
            Some(t) => Ok(Self(t)),
        }
    }
}

/// A person's episodes with one peer, in time order (serialized as a sequence, like a `Vec`).
type Segments = SmallVec<[Segment; 1]>;

/// One of a person's own events, for the live view.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sighting {
    pub event_id: Uuid,
    pub recorded_at: Micros,
    pub lat: f64,
    pub lon: f64,
    pub zone: ZoneId,
}

/// Counters of one person.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonCounters {
    pub sightings: u64,
    pub colocations: u64,
    /// Co-locations dropped as repeats of ones already counted.
    pub repeats: u64,
    pub started: u64,
    pub updated: u64,
    pub ended: u64,
}

/// A copyable view of an open episode.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OpenEpisode {
    pub peer: PersonId,
    pub started_at: Micros,
    pub last_seen_at: Micros,
    pub colocations: u32,
    pub min_distance_m: f64,
}

/// One person's state: recent trajectory, open episodes per peer, recent summary ids.
///
/// Serialized (snapshots, passivation) as one flat record: person, trajectory, peers, recent
/// summary ids, dirty peers, counters ([`StoredPersonState`]).
#[derive(Debug, Clone)]
pub struct PersonState {
    person: PersonId,
    trajectory: VecDeque<Sighting>,
    /// Its episodes and the summaries it counted, allocated at its first co-location and
    /// dropped when they are all forgotten: 8 bytes instead of 96 for a person without, and
    /// this state lives in its actor's task, whose allocation comes in steps of 128 bytes
    /// (tokio's task cell): 96 bytes more put a person actor a step higher, 128 bytes more
    /// for every person (docs/benchmarks.md, "Person actors").
    book: Option<Box<EpisodeBook>>,
    counters: PersonCounters,
}

/// A person's episodes and the summary identities it counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct EpisodeBook {
    /// Episodes by peer, in time order. Most peers have one, kept in the map's entry itself:
    /// a co-location then costs one lookup, not a lookup and a second allocation to read
    /// (that second read was half of `colocation`'s time in engine-bench's profile).
    peers: FxHashMap<PersonId, Segments>,
    /// Summaries counted whose first time is not yet below every source's watermark, by
    /// identity ([`summary_key`]).
    recent: RecentSummaries,
    dirty_peers: Vec<PersonId>,
}

impl EpisodeBook {
    fn is_empty(&self) -> bool {
        self.peers.is_empty() && self.recent.keep.is_empty() && self.dirty_peers.is_empty()
    }
}

/// The book of a person without one.
static NO_BOOK: std::sync::LazyLock<EpisodeBook> = std::sync::LazyLock::new(EpisodeBook::default);

/// [`PersonState`] as it is serialized: the fields in this order (the form of every snapshot
/// format so far; postcard writes no names).
#[derive(Serialize)]
struct StoredPersonStateRef<'a> {
    person: PersonId,
    #[serde(serialize_with = "packed_trajectory::serialize_ref")]
    trajectory: &'a VecDeque<Sighting>,
    peers: &'a FxHashMap<PersonId, Segments>,
    recent: &'a RecentSummaries,
    dirty_peers: &'a Vec<PersonId>,
    counters: PersonCounters,
}

/// [`StoredPersonStateRef`], owned, to read.
#[derive(Deserialize)]
struct StoredPersonState {
    person: PersonId,
    #[serde(with = "packed_trajectory")]
    trajectory: VecDeque<Sighting>,
    peers: FxHashMap<PersonId, Segments>,
    recent: RecentSummaries,
    dirty_peers: Vec<PersonId>,
    counters: PersonCounters,
}

impl Serialize for PersonState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let book = self.book();
        StoredPersonStateRef {
            person: self.person,
            trajectory: &self.trajectory,
            peers: &book.peers,
            recent: &book.recent,
            dirty_peers: &book.dirty_peers,
            counters: self.counters,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for PersonState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let stored = StoredPersonState::deserialize(d)?;
        let book = EpisodeBook {
            peers: stored.peers,
            recent: stored.recent,
            dirty_peers: stored.dirty_peers,
        };
        Ok(Self {
            person: stored.person,
            trajectory: stored.trajectory,
            book: (!book.is_empty()).then(|| Box::new(book)),
            counters: stored.counters,
        })
    }
}

/// Equal when they hold the same: a person without a book and one with an empty book are equal.
impl PartialEq for PersonState {
    fn eq(&self, other: &Self) -> bool {
        self.person == other.person
            && self.trajectory == other.trajectory
            && self.counters == other.counters
            && self.book() == other.book()
    }
}

/// Summary identities ([`summary_key`]) counted, each with the time until which a replay may
/// still repeat it (µs since the Unix epoch): an on-time summary's first time, a late one's
/// plus the closed-episode retention. A key is forgotten once the minimum watermark passes that
/// time, at a sweep: when the map has doubled since the last one (amortized over the inserts in
/// between), and at every [`PersonState::close`]. (Sweeping only at `close` let the keys pile up
/// for as long as the episode gap, 10 minutes by default: ~25 KB per person at a crowded booth,
/// most of a person's snapshot.) A sweep keeps the table's capacity; the snapshot holds only
/// the keys ([`PackedRecent`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(into = "PackedRecent", from = "PackedRecent")]
struct RecentSummaries {
    keep: FxHashMap<u64, Micros>,
    #[serde(skip)]
    sweep_at: usize,
}

impl PartialEq for RecentSummaries {
    fn eq(&self, other: &Self) -> bool {
        self.keep == other.keep
    }
}

/// [`RecentSummaries`] as a snapshot stores it: in time order, each key as its 8 bytes and each
/// time as the difference from the previous one (about 11 bytes an entry, where a random key
/// and a time as varints took 17.5).
#[derive(Serialize, Deserialize)]
struct PackedRecent {
    entries: Vec<([u8; 8], Micros)>,
}

impl From<RecentSummaries> for PackedRecent {
    fn from(r: RecentSummaries) -> Self {
        let mut entries: Vec<(Micros, u64)> = r.keep.into_iter().map(|(k, t)| (t, k)).collect();
        entries.sort_unstable();
        let mut previous = 0;
        Self {
            entries: entries
                .into_iter()
                .map(|(t, k)| {
                    let after = t.wrapping_sub(previous);
                    previous = t;
                    (k.to_le_bytes(), after)
                })
                .collect(),
        }
    }
}

impl From<PackedRecent> for RecentSummaries {
    fn from(p: PackedRecent) -> Self {
        let mut previous: Micros = 0;
        Self {
            keep: p
                .entries
                .into_iter()
                .map(|(k, after)| {
                    previous = previous.wrapping_add(after);
                    (u64::from_le_bytes(k), previous)
                })
                .collect(),
            sweep_at: 0,
        }
    }
}

/// A trajectory as a snapshot stores it: each sighting's id as its 16 bytes, its time as the
/// difference from the previous sighting's (the trajectory is in time order), its zone only
/// where it differs from the previous sighting's (about 37 bytes a sighting, where the derived
/// form took 50).
mod packed_trajectory {
    use std::collections::VecDeque;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use uuid::Uuid;

    use super::Sighting;
    use crate::domain::Micros;
    use crate::zones::ZoneId;

    #[derive(Serialize, Deserialize)]
    struct Packed {
        event_id: [u8; 16],
        after_us: Micros,
        lat: f64,
        lon: f64,
        zone: Option<ZoneId>,
    }

    /// [`serialize`] for a field that holds a reference.
    pub fn serialize_ref<S: Serializer>(t: &&VecDeque<Sighting>, s: S) -> Result<S::Ok, S::Error> {
        serialize(t, s)
    }

    pub fn serialize<S: Serializer>(t: &VecDeque<Sighting>, s: S) -> Result<S::Ok, S::Error> {
        let (mut time, mut zone) = (0, None);
        let packed: Vec<Packed> = t
            .iter()
            .map(|x| {
                let p = Packed {
                    event_id: x.event_id.into_bytes(),
                    after_us: x.recorded_at.wrapping_sub(time),
                    lat: x.lat,
                    lon: x.lon,
                    zone: (zone != Some(x.zone)).then_some(x.zone),
                };
                (time, zone) = (x.recorded_at, Some(x.zone));
                p
            })
            .collect();
        packed.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VecDeque<Sighting>, D::Error> {
        let packed = Vec::<Packed>::deserialize(d)?;
        // The invariants `PersonState::sighting` keeps, checked on what a snapshot says.
        if packed.len() > super::TRAJECTORY_LEN {
            return Err(serde::de::Error::custom(format!(
                "a trajectory holds at most {} sightings, not {}",
                super::TRAJECTORY_LEN,
                packed.len()
            )));
        }
        let (mut time, mut zone) = (0 as Micros, None);
        let mut out = VecDeque::with_capacity(packed.len());
        for p in packed {
            let previous = time;
            time = time.wrapping_add(p.after_us);
            if !out.is_empty() && time < previous {
                return Err(serde::de::Error::custom(
                    "a trajectory's sightings are out of time order",
                ));
            }
            zone = p.zone.or(zone);
            let Some(zone) = zone else {
                return Err(serde::de::Error::custom(
                    "a trajectory's first sighting has no zone",
                ));
            };
            out.push_back(Sighting {
                event_id: Uuid::from_bytes(p.event_id),
                recorded_at: time,
                lat: p.lat,
                lon: p.lon,
                zone,
            });
        }
        Ok(out)
    }
}

/// The fewest entries at which [`RecentSummaries`] is swept.
const MIN_SWEEP: usize = 64;

impl RecentSummaries {
    /// Records `key` until `keep_until`; false when it was recorded already (a repeat).
    /// Forgets keys whose time `min_watermark` passed, when the map has doubled.
    fn insert(&mut self, key: u64, keep_until: Micros, min_watermark: Micros) -> bool {
        if self.keep.len() >= self.sweep_at.max(MIN_SWEEP) {
            self.sweep(min_watermark);
            self.sweep_at = self.keep.len() * 2;
        }
        self.keep.insert(key, keep_until).is_none()
    }

    /// Forgets keys whose time `min_watermark` passed.
    fn sweep(&mut self, min_watermark: Micros) {
        self.keep.retain(|_, t| *t >= min_watermark);
    }
}

/// A summary's identity: a single co-location is its pair of events (reported to the person
/// once, by one zone); more are (arriving event, peer, zone), of which a zone makes one
/// summary per person.
fn summary_key(c: &ColocationSummary) -> u64 {
    if c.count == 1 {
        let (a, b) = (
            c.closest.own_event.as_u64_pair(),
            c.closest.peer_event.as_u64_pair(),
        );
        return mix64(a.0 ^ mix64(a.1 ^ mix64(b.0 ^ mix64(b.1))));
    }
    let a = c.arriving_event.as_u64_pair();
    mix64(a.0 ^ mix64(a.1 ^ mix64(c.peer as u64 ^ mix64(c.zone))))
}

/// A passivated person's state, packed: the postcard bytes of its [`PersonState`], the same
/// bytes as its snapshot part (under 100 bytes for a person seen once with no episode, where
/// the live state takes about 250 and its actor about 7,500 more). A person is passivated only
/// with every episode closed, so the packed state is read again only when the person reports
/// again, a closed episode's retention ends, a snapshot or a view asks for it, or an erasure
/// touches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassivatedPerson(Box<[u8]>);

impl PassivatedPerson {
    /// `state`, packed.
    pub fn pack(state: &PersonState) -> Self {
        // Every field of a person's state serializes with postcard (snapshots rely on it).
        let bytes = postcard::to_allocvec(state).expect("a person's state serializes");
        Self(bytes.into_boxed_slice())
    }

    /// The state packed, as it was.
    pub fn unpack(&self) -> PersonState {
        // Bytes `pack` wrote, never input from outside: they decode.
        postcard::from_bytes(&self.0).expect("a packed person's state decodes")
    }

    /// Heap bytes the packed state holds.
    pub fn packed_len(&self) -> usize {
        self.0.len()
    }
}

impl PersonState {
    /// A person with no history.
    pub fn new(person: PersonId) -> Self {
        Self {
            person,
            trajectory: VecDeque::new(),
            book: None,
            counters: PersonCounters::default(),
        }
    }

    /// Its episode book (an empty one when it has none).
    fn book(&self) -> &EpisodeBook {
        self.book.as_deref().unwrap_or(&NO_BOOK)
    }

    /// Whether an episode changed since the last [`PersonState::flush`].
    fn has_dirty_peers(&self) -> bool {
        self.book
            .as_ref()
            .is_some_and(|b| !b.dirty_peers.is_empty())
    }

    /// Drops the episode book once it holds nothing.
    fn drop_book_if_empty(&mut self) {
        if self.book.as_ref().is_some_and(|b| b.is_empty()) {
            self.book = None;
        }
    }

    /// The person.
    pub fn person(&self) -> PersonId {
        self.person
    }

    /// Records one of the person's own events (repeats ignored), keeping the latest few.
    pub fn sighting(&mut self, event: &LocationEvent, zone: ZoneId) {
        if self.trajectory.iter().any(|s| s.event_id == event.event_id) {
            return;
        }
        self.counters.sightings += 1;
        let s = Sighting {
            event_id: event.event_id,
            recorded_at: event.recorded_at,
            lat: event.lat,
            lon: event.lon,
            zone,
        };
        let mut at = self
            .trajectory
            .partition_point(|x| x.recorded_at <= s.recorded_at);
        if self.trajectory.len() == TRAJECTORY_LEN {
            if at == 0 {
                // Older than every sighting kept: it would be the one to drop.
                return;
            }
            self.trajectory.pop_front();
            at -= 1;
        }
        // Grown by doubling up to TRAJECTORY_LEN exactly: a person seen once holds one
        // sighting (a VecDeque's first growth is 4), a full trajectory 32 (not 64: the
        // deque never holds 33).
        let (len, capacity) = (self.trajectory.len(), self.trajectory.capacity());
        if len == capacity {
            self.trajectory
                .reserve_exact(capacity.max(1).min(TRAJECTORY_LEN - len));
        }
        self.trajectory.insert(at, s);
    }

    /// Adds a co-location summary reported by a source whose watermark (as this partition has
    /// seen it) is `source_watermark`, when the minimum watermark over all sources is
    /// `min_watermark`. Returns when the person needs a [`PersonState::close`] call for the
    /// episode it touched, if it does: the deadline of one it opened or reopened, or when a
    /// closed one it created or reshaped is to be forgotten.
    ///
    /// Its co-locations join the episodes within `gap_us` of any of them; since they span at
    /// most `window_s <= episode_gap_s` with no gap wider than that, they join as one, and an
    /// episode is within reach of one of them exactly when it is within reach of `first` or
    /// `last` (an episode's reach is at least twice the gap wide).
    ///
    /// A late summary (the late path: found by a copy that arrived after its zone partition's
    /// watermark) may be earlier than the source's watermark and may reach closed episodes,
    /// which are kept for that: the result is announced as `connection.updated` (or
    /// `connection.started`, then `connection.ended` when it is a new episode already past its
    /// deadline), and rewritten with its `ended_at` when still closed.
    ///
    /// (Longer than our ~120-line rule on purpose: the episode rule's cases — repeat, extend,
    /// merge, start, reopen — read top to bottom as docs/design.md §1 states them, each
    /// touching the same segments; the oracle proptests pin them.)
    #[allow(clippy::too_many_arguments)]
    pub fn colocation(
        &mut self,
        c: &ColocationSummary,
        late: bool,
        source_watermark: Micros,
        min_watermark: Micros,
        params: &EpisodeRules,
        out: &mut PersonOutput,
        capture: bool,
    ) -> Option<Micros> {
        let gap_us = params.gap_us;
        // Everything a source reports on time after publishing watermark w is at or after w:
        // an earlier summary is a replay of one counted before.
        if !late && c.first < source_watermark {
            self.counters.repeats += u64::from(c.count);
            return None;
        }
        let key = summary_key(c) ^ u64::from(late);
        // A late summary's key is kept as long as the episodes it may reach.
        let keep_until = if late {
            c.first.saturating_add(params.closed_retention_us)
        } else {
            c.first
        };
        let book = self.book.get_or_insert_with(Box::default);
        if !book.recent.insert(key, keep_until, min_watermark) {
            self.counters.repeats += u64::from(c.count);
            return None;
        }
        self.counters.colocations += u64::from(c.count);
        if capture {
            out.accepted.push(*c);
        }
        let segments = book.peers.entry(c.peer).or_default();
        // A peer is listed in `dirty_peers` once, while any of its episodes is dirty.
        let was_dirty = segments.iter().any(|s| s.dirty);
        let first = segments.partition_point(|s| s.last.saturating_add(gap_us) < c.first);
        let mut end = first;
        while end < segments.len() && segments[end].start.saturating_sub(gap_us) <= c.last {
            end += 1;
        }
        if first == end {
            let deadline = c.last.saturating_add(gap_us);
            let closed = late && deadline < min_watermark;
            segments.insert(
                first,
                Segment {
                    start: c.first,
                    last: c.last,
                    count: c.count,
                    closest: c.closest,
                    stored_start: StoredStart::NONE,
                    absorbed: ThinVec::new(),
                    dirty: true,
                    closed,
                    announced: false,
                    update: None,
                },
            );
            if !was_dirty {
                book.dirty_peers.push(c.peer);
            }
            return Some(if closed {
                deadline.saturating_add(params.closed_retention_us)
            } else {
                deadline
            });
        }
        let mut merged: Vec<Segment> = segments.drain(first + 1..end).collect();
        let seg = &mut segments[first];
        let before = seg.start;
        let before_announced = seg.announced;
        let mut reshaped_closed = seg.closed;
        // The announced starts this one replaces (the others were never heard of).
        let mut replaced = Vec::new();
        let mut stored_changed = false;
        seg.start = seg.start.min(c.first);
        seg.last = seg.last.max(c.last);
        seg.count += c.count;
        seg.closest = seg.closest.min(c.closest);
        for m in merged.drain(..) {
            reshaped_closed |= m.closed;
            stored_changed = true;
            if m.announced {
                replaced.push(m.start);
            }
            seg.announced |= m.announced;
            seg.last = seg.last.max(m.last);
            seg.count += m.count;
            seg.closest = seg.closest.min(m.closest);
            seg.absorbed.extend(m.stored_start.get());
            seg.absorbed.extend(m.absorbed);
            if let Some(r) = m.update {
                replaced.extend(r);
            }
        }
        if seg.start != before {
            stored_changed = true;
            if before_announced {
                replaced.push(before);
            }
        }
        let deadline = seg.deadline(gap_us);
        let reopened = reshaped_closed && deadline >= min_watermark;
        seg.closed = reshaped_closed && !reopened;
        // A stored open episode that only grew keeps its row until it closes (history shows
        // an open episode as it was announced; its live figures are in the person's state):
        // rows are written when an episode opens, is reshaped (its start or its merges change
        // the stored rows) and closes, not on every co-location. A closed one that changes in
        // any way is rewritten and announced.
        if stored_changed || reshaped_closed {
            seg.dirty = true;
            if seg.announced {
                seg.update.get_or_insert_with(ThinVec::new).extend(replaced);
            }
            if !was_dirty {
                book.dirty_peers.push(c.peer);
            }
        }
        if reopened {
            Some(deadline)
        } else {
            seg.closed
                .then(|| deadline.saturating_add(params.closed_retention_us))
        }
    }

    /// Emits the changed open episodes for the sink.
    pub fn flush(&mut self, out: &mut PersonOutput) {
        let Some(book) = self.book.as_deref_mut() else {
            return;
        };
        for peer in book.dirty_peers.drain(..) {
            let Some(segments) = book.peers.get_mut(&peer) else {
                continue;
            };
            for seg in segments.iter_mut().filter(|s| s.dirty) {
                announce(self.person, peer, seg, &mut self.counters, out);
                let ended_at = seg.closed.then_some(seg.last);
                out.changes
                    .push(change_of(self.person, peer, seg, ended_at));
            }
        }
    }

    /// Closes the episodes that nothing on time can extend once every source is past
    /// `min_watermark` (they are kept, closed, for late co-locations), and forgets closed ones
    /// `closed_retention_us` past their deadline; returns the earliest time at which this has
    /// more to do.
    pub fn close(
        &mut self,
        min_watermark: Micros,
        params: &EpisodeRules,
        out: &mut PersonOutput,
    ) -> Option<Micros> {
        let gap_us = params.gap_us;
        let mut next: Option<Micros> = None;
        let mut sooner = |t: Micros| next = Some(next.map_or(t, |n: Micros| n.min(t)));
        let person = self.person;
        let book = self.book.as_deref_mut()?;
        // Room for the change and the `ended` notification of every episode that closes now,
        // at once: grown push by push, the outputs of a watermark jump that closes every
        // episode took twice their size in fresh memory. (An episode never announced adds a
        // `started` too, which may still grow the notifications.)
        let closing = book
            .peers
            .values()
            .flatten()
            .filter(|seg| seg.closes_before(gap_us, min_watermark))
            .count();
        out.changes.reserve(closing);
        out.notifications.reserve(closing);
        let mut emptied = Vec::new();
        for (&peer, segments) in book.peers.iter_mut() {
            segments.retain_mut(|seg| {
                let deadline = seg.deadline(gap_us);
                let forget_at = deadline.saturating_add(params.closed_retention_us);
                if seg.closed {
                    if forget_at < min_watermark && !seg.dirty {
                        return false;
                    }
                    sooner(forget_at);
                    return true;
                }
                if seg.closes_before(gap_us, min_watermark) {
                    announce(person, peer, seg, &mut self.counters, out);
                    seg.closed = true;
                    let change = change_of(person, peer, seg, Some(seg.last));
                    self.counters.ended += 1;
                    out.notifications.push(Notification::new(
                        NotificationKind::Ended,
                        change.episode,
                        Vec::new(),
                    ));
                    out.changes.push(change);
                    sooner(forget_at);
                } else {
                    sooner(deadline);
                }
                true
            });
            if segments.is_empty() {
                emptied.push(peer);
            }
        }
        for peer in emptied {
            book.peers.remove(&peer);
        }
        book.recent.sweep(min_watermark);
        self.drop_book_if_empty();
        next
    }

    /// Forgets every episode, open or closed, with one of `persons` as the peer (erasure: no
    /// change or notification is emitted for them); true when any was held. The summary
    /// identities of [`RecentSummaries`] are hashes and age out at the watermark.
    pub fn forget_peers(&mut self, persons: &FxHashSet<PersonId>) -> bool {
        let Some(book) = self.book.as_deref_mut() else {
            return false;
        };
        let before = book.peers.len();
        book.peers.retain(|peer, _| !persons.contains(peer));
        book.dirty_peers.retain(|peer| !persons.contains(peer));
        let forgot = book.peers.len() != before;
        self.drop_book_if_empty();
        forgot
    }

    /// Whether any episode is open.
    pub fn has_open_episodes(&self) -> bool {
        self.book().peers.values().flatten().any(|s| !s.closed)
    }

    /// The open episodes, by peer then start.
    pub fn open_episodes(&self) -> Vec<OpenEpisode> {
        let mut v: Vec<OpenEpisode> = self
            .book()
            .peers
            .iter()
            .flat_map(|(&peer, segs)| {
                segs.iter().filter(|s| !s.closed).map(move |s| OpenEpisode {
                    peer,
                    started_at: s.start,
                    last_seen_at: s.last,
                    colocations: s.count,
                    min_distance_m: s.closest.distance_m,
                })
            })
            .collect();
        v.sort_by_key(|e| (e.peer, e.started_at));
        v
    }

    /// Every peer the person holds an episode with, open or closed (kept until the late path
    /// can no longer reshape it), in ascending order.
    pub fn peers(&self) -> Vec<PersonId> {
        let mut peers: Vec<PersonId> = self.book().peers.keys().copied().collect();
        peers.sort_unstable();
        peers
    }

    /// The recent trajectory, oldest first.
    pub fn trajectory(&self) -> Vec<Sighting> {
        self.trajectory.iter().copied().collect()
    }

    /// The person's counters.
    pub fn counters(&self) -> PersonCounters {
        self.counters
    }
}

/// The announcements a segment has due: `connection.started` for a new one (then
/// `connection.ended` when a late one is already closed), or `connection.updated` (with the
/// announced starts it replaces) for an announced one that changed.
fn announce(
    person: PersonId,
    peer: PersonId,
    seg: &mut Segment,
    counters: &mut PersonCounters,
    out: &mut PersonOutput,
) {
    let ended_at = seg.closed.then_some(seg.last);
    if !seg.announced {
        seg.announced = true;
        seg.update = None;
        counters.started += 1;
        let episode = episode_of(person, peer, seg, None);
        out.notifications.push(Notification::new(
            NotificationKind::Started,
            episode,
            Vec::new(),
        ));
        if ended_at.is_some() {
            counters.ended += 1;
            let ended = episode_of(person, peer, seg, ended_at);
            out.notifications.push(Notification::new(
                NotificationKind::Ended,
                ended,
                Vec::new(),
            ));
        }
    } else if let Some(replaces) = seg.update.take() {
        let mut replaces = Vec::from(replaces);
        replaces.sort_unstable();
        replaces.dedup();
        counters.updated += 1;
        let episode = episode_of(person, peer, seg, ended_at);
        out.notifications.push(Notification::new(
            NotificationKind::Updated,
            episode,
            replaces,
        ));
    }
}

fn episode_of(
    person: PersonId,
    peer: PersonId,
    seg: &Segment,
    ended_at: Option<Micros>,
) -> Episode {
    Episode {
        person,
        peer,
        started_at: seg.start,
        last_seen_at: seg.last,
        ended_at,
        colocations: seg.count,
        min_distance_m: seg.closest.distance_m,
        lat: seg.closest.lat,
        lon: seg.closest.lon,
    }
}

fn change_of(
    person: PersonId,
    peer: PersonId,
    seg: &mut Segment,
    ended_at: Option<Micros>,
) -> EpisodeChange {
    let mut replaces = Vec::from(std::mem::take(&mut seg.absorbed));
    if let Some(stored) = seg.stored_start.get() {
        if stored != seg.start {
            replaces.push(stored);
        }
    }
    replaces.sort_unstable();
    replaces.dedup();
    seg.stored_start = StoredStart(seg.start);
    seg.dirty = false;
    EpisodeChange {
        episode: episode_of(person, peer, seg, ended_at),
        replaces,
    }
}

/// Counters of one person partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonPartitionCounters {
    pub batches: u64,
    pub updates: u64,
    /// Co-locations accepted (repeats excluded).
    pub colocations: u64,
    pub notifications: u64,
}

/// Which zone partitions' watermarks a person partition has seen, and their minimum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermarks {
    by_source: Vec<Micros>,
}

impl Watermarks {
    /// Nothing seen from any of `sources` zone partitions.
    pub fn new(sources: u32) -> Self {
        Self {
            by_source: vec![Micros::MIN; sources.max(1) as usize],
        }
    }

    /// The watermark of one source (`Micros::MIN` for an unknown one).
    pub fn of(&self, source: u32) -> Micros {
        self.by_source
            .get(source as usize)
            .copied()
            .unwrap_or(Micros::MIN)
    }

    /// Advances one source (watermarks never go back: a replaying source repeats old ones).
    pub fn advance(&mut self, source: u32, watermark: Micros) {
        if let Some(w) = self.by_source.get_mut(source as usize) {
            *w = (*w).max(watermark);
        }
    }

    /// The minimum over all sources: no co-location earlier than it can still arrive.
    pub fn min(&self) -> Micros {
        self.by_source.iter().copied().min().unwrap_or(Micros::MIN)
    }

    /// Per source, in source order.
    pub fn all(&self) -> &[Micros] {
        &self.by_source
    }
}

/// The deadlines at which persons may have episodes to close, earliest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Deadlines {
    heap: BinaryHeap<Reverse<(Micros, PersonId)>>,
}

impl Deadlines {
    /// Schedules a check of `person` once the minimum watermark passes `deadline`.
    pub fn push(&mut self, deadline: Micros, person: PersonId) {
        self.heap.push(Reverse((deadline, person)));
    }

    /// Takes the persons whose deadlines `min_watermark` has passed (each once).
    pub fn due(&mut self, min_watermark: Micros) -> Vec<PersonId> {
        let mut due = Vec::new();
        while let Some(Reverse((deadline, person))) = self.heap.peek().copied() {
            if deadline >= min_watermark {
                break;
            }
            self.heap.pop();
            due.push(person);
        }
        due.sort_unstable();
        due.dedup();
        due
    }

    /// How many checks are scheduled.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no check is scheduled.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// The synchronous core of one person partition.
#[derive(Debug)]
pub struct PersonPartition {
    rules: EpisodeRules,
    watermarks: Watermarks,
    persons: FxHashMap<PersonId, PersonState>,
    deadlines: Deadlines,
    counters: PersonPartitionCounters,
    capture: bool,
    /// A batch's updates grouped per person (kept between batches, for its room).
    runs: PersonRuns,
}

impl PersonPartition {
    /// An empty partition fed by `zone_partitions` zone partitions; `capture` keeps every
    /// accepted co-location in the output (for tests).
    pub fn new(params: &EngineParams, zone_partitions: u32, capture: bool) -> Self {
        Self {
            rules: EpisodeRules::of(params),
            watermarks: Watermarks::new(zone_partitions),
            persons: FxHashMap::default(),
            deadlines: Deadlines::default(),
            counters: PersonPartitionCounters::default(),
            capture,
            runs: PersonRuns::default(),
        }
    }

    /// Applies a batch from one zone partition: its updates, then its watermark, closing what
    /// the new minimum watermark allows.
    pub fn apply(&mut self, batch: &PersonBatch, out: &mut PersonOutput) {
        self.counters.batches += 1;
        let notified_before = out.notifications.len();
        let source_watermark = self.watermarks.of(batch.source);
        let min_watermark = self.watermarks.min();
        let mut touched: Vec<PersonId> = Vec::new();
        // Each person's updates in a row (in their batch order), so that a person's state is
        // looked up once per batch rather than once per update, as the actor engine's
        // supervisor groups them per person actor ([`PersonRuns`]).
        self.runs.group(&batch.updates);
        let order = self.runs.in_person_order();
        let mut at = 0;
        for &PersonRun { person, len, .. } in self.runs.runs() {
            let run = len as usize;
            let state = self
                .persons
                .entry(person)
                .or_insert_with(|| PersonState::new(person));
            let before = state.counters.colocations;
            // Every batch ends with a flush that empties `dirty_peers`.
            let was_clean = !state.has_dirty_peers();
            for update in updates_at(&batch.updates, &order[at..at + run]) {
                self.counters.updates += 1;
                match update {
                    PersonUpdate::Sighting { event, zone } => state.sighting(event, *zone),
                    PersonUpdate::Colocations(c) | PersonUpdate::LateColocations(c) => {
                        let late = matches!(update, PersonUpdate::LateColocations(_));
                        if let Some(deadline) = state.colocation(
                            c,
                            late,
                            source_watermark,
                            min_watermark,
                            &self.rules,
                            out,
                            self.capture,
                        ) {
                            self.deadlines.push(deadline, person);
                        }
                    }
                }
            }
            self.counters.colocations += state.counters.colocations - before;
            if was_clean && state.has_dirty_peers() {
                touched.push(person);
            }
            at += run;
        }
        for person in touched {
            if let Some(state) = self.persons.get_mut(&person) {
                state.flush(out);
            }
        }
        let before = self.watermarks.min();
        self.watermarks.advance(batch.source, batch.watermark);
        let min = self.watermarks.min();
        if min > before {
            for person in self.deadlines.due(min) {
                if let Some(state) = self.persons.get_mut(&person) {
                    if let Some(next) = state.close(min, &self.rules, out) {
                        self.deadlines.push(next, person);
                    }
                }
            }
        }
        self.counters.notifications += (out.notifications.len() - notified_before) as u64;
    }

    /// A person's state, if the partition knows the person.
    pub fn person(&self, person: PersonId) -> Option<&PersonState> {
        self.persons.get(&person)
    }

    /// How many persons the partition holds.
    pub fn persons(&self) -> usize {
        self.persons.len()
    }

    /// The watermarks seen.
    pub fn watermarks(&self) -> &Watermarks {
        &self.watermarks
    }

    /// The partition's counters.
    pub fn counters(&self) -> PersonPartitionCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Micros = 1_790_000_000 * MICROS_PER_S;
    const S: Micros = MICROS_PER_S;

    fn rules() -> EpisodeRules {
        EpisodeRules {
            gap_us: 600 * S,
            closed_retention_us: 3_600 * S,
        }
    }

    /// One co-location of person 1 with person 2 at `t_s`, `n` telling them apart.
    fn at(t_s: i64, n: u128) -> ColocationSummary {
        let (own, peer) = (Uuid::from_u128(n), Uuid::from_u128(1_000 + n));
        let t = T0 + t_s * S;
        ColocationSummary {
            person: 1,
            peer: 2,
            arriving_event: own,
            zone: 7,
            count: 1,
            first: t,
            last: t,
            closest: Closest {
                distance_m: 1.0 + n as f64,
                time: t,
                own_event: own,
                peer_event: peer,
                lat: 0.0,
                lon: 0.0,
            },
        }
    }

    /// Person 1's own event `t_s` seconds after `T0`, at one place.
    fn own_event(t_s: i64) -> LocationEvent {
        LocationEvent {
            event_id: Uuid::from_u128(10_000 + t_s as u128),
            person_id: 1,
            lat: 35.08,
            lon: -106.65,
            recorded_at: T0 + t_s * S,
            received_at: T0 + t_s * S,
        }
    }

    fn kinds(out: &PersonOutput) -> Vec<NotificationKind> {
        out.notifications.iter().map(|n| n.kind).collect()
    }

    #[test]
    fn late_co_locations_reshape_closed_episodes_and_are_announced() {
        use NotificationKind::{Ended, Started, Updated};
        let r = rules();
        let mut p = PersonState::new(1);
        let mut out = PersonOutput::default();
        // On time: co-locations at 0 s and 100 s, one episode, closed once the minimum
        // watermark is past 100 + 600 s.
        p.colocation(&at(0, 1), false, T0, T0, &r, &mut out, false);
        p.colocation(&at(100, 2), false, T0, T0, &r, &mut out, false);
        p.flush(&mut out);
        let min = T0 + 701 * S;
        let forget_at = p.close(min, &r, &mut out);
        assert_eq!(kinds(&out), [Started, Ended]);
        assert_eq!(forget_at, Some(T0 + (100 + 600 + 3_600) * S));
        assert!(!p.has_open_episodes() && p.open_episodes().is_empty());

        // A late one at -300 s moves the start earlier: announced as updated, still ended, and
        // the row stored under the old start is replaced.
        let mut out = PersonOutput::default();
        p.colocation(&at(-300, 3), true, min, min, &r, &mut out, false);
        p.flush(&mut out);
        assert_eq!(kinds(&out), [Updated]);
        let n = &out.notifications[0];
        assert_eq!(
            (
                n.episode.started_at,
                n.episode.ended_at,
                n.episode.colocations
            ),
            (T0 - 300 * S, Some(T0 + 100 * S), 3)
        );
        assert_eq!(n.replaces, [T0]);
        assert_eq!(out.changes.len(), 1);
        assert_eq!(out.changes[0].episode, n.episode);
        assert_eq!(out.changes[0].replaces, [T0]);

        // The same late summary again (a replayed zone partition): nothing.
        let mut out = PersonOutput::default();
        p.colocation(&at(-300, 3), true, min, min, &r, &mut out, false);
        p.flush(&mut out);
        assert!(out.notifications.is_empty() && out.changes.is_empty());
        assert_eq!(p.counters().repeats, 1);

        // A late one 2,000 s on, its deadline already passed: a new episode, started and ended.
        let mut out = PersonOutput::default();
        let later = T0 + 2_000 * S;
        let min = later + 601 * S;
        p.colocation(&at(2_000, 4), true, min, min, &r, &mut out, false);
        p.flush(&mut out);
        assert_eq!(kinds(&out), [Started, Ended]);
        assert_eq!(out.changes.len(), 1);
        assert_eq!(out.changes[0].episode.ended_at, Some(later));

        // Late ones at 650 s and 1,200 s extend the first; one at 1,500 s then bridges the gap
        // to the second: the two merge into one, the second's row replaced. One batch, one
        // announcement, with the figures at its end.
        let mut out = PersonOutput::default();
        p.colocation(&at(650, 5), true, min, min, &r, &mut out, false);
        p.colocation(&at(1_200, 6), true, min, min, &r, &mut out, false);
        p.colocation(&at(1_500, 8), true, min, min, &r, &mut out, false);
        assert!(out.notifications.is_empty(), "announced at the flush");
        p.flush(&mut out);
        assert_eq!(kinds(&out), [Updated]);
        let merged = &out.notifications[0];
        assert_eq!(
            (
                merged.episode.started_at,
                merged.episode.ended_at,
                merged.episode.colocations
            ),
            (T0 - 300 * S, Some(later), 7),
            "{merged:?}"
        );
        assert_eq!(merged.replaces, [later]);
        assert_eq!(out.changes.len(), 1, "{:?}", out.changes);
        assert_eq!(out.changes[0].replaces, [later]);

        // A late co-location that brings the deadline past the minimum watermark reopens it.
        let mut out = PersonOutput::default();
        p.colocation(&at(2_500, 7), true, min, min, &r, &mut out, false);
        p.flush(&mut out);
        assert_eq!(kinds(&out), [Updated]);
        assert_eq!(out.notifications[0].episode.ended_at, None);
        assert_eq!(p.open_episodes().len(), 1);

        // Closed episodes are forgotten once the retention has passed.
        let mut out = PersonOutput::default();
        let far = T0 + 100_000 * S;
        p.close(far, &r, &mut out);
        assert_eq!(kinds(&out), [Ended]);
        p.close(far + 1, &r, &mut out);
        assert!(p.book().peers.is_empty(), "{:?}", p.book);
    }

    #[test]
    fn summaries_are_forgotten_as_the_watermark_passes_them_while_an_episode_stays_open() {
        let r = rules();
        let mut p = PersonState::new(1);
        let mut out = PersonOutput::default();
        // One co-location a second for an hour: one open episode, never closed, the minimum
        // watermark 30 s behind. Only what a replay could repeat may be kept.
        let lag = 30;
        for t in 0..3_600 {
            let min = T0 + (t - lag) * S;
            p.colocation(&at(t, t as u128), false, min, min, &r, &mut out, false);
            assert!(
                p.book().recent.keep.len() <= 2 * (lag as usize + 1) + MIN_SWEEP,
                "{} kept at {t} s",
                p.book().recent.keep.len()
            );
        }
        assert_eq!(p.open_episodes().len(), 1);
        assert_eq!(p.counters().colocations, 3_600);
        // A repeat still within reach of a replay is dropped; one the watermark passed never
        // gets this far (the source's watermark drops it first).
        let min = T0 + (3_599 - lag) * S;
        p.colocation(&at(3_599, 3_599), false, min, min, &r, &mut out, false);
        p.colocation(&at(3_580, 3_580), false, min, min, &r, &mut out, false);
        assert_eq!(p.counters().colocations, 3_600);
        assert_eq!(p.counters().repeats, 2);
    }

    #[test]
    fn a_trajectory_keeps_the_latest_sightings_in_time_order_in_room_for_no_more() {
        let mut p = PersonState::new(1);
        let sight = |p: &mut PersonState, t_s: i64, n: u128| {
            let e = LocationEvent {
                event_id: Uuid::from_u128(n),
                person_id: 1,
                lat: 0.0,
                lon: 0.0,
                recorded_at: T0 + t_s * S,
                received_at: T0 + t_s * S,
            };
            p.sighting(&e, 7);
        };
        sight(&mut p, 0, 1);
        assert_eq!(p.trajectory.capacity(), 1, "a person seen once");
        // 40 sightings out of order (each odd second arrives after the next even one).
        for i in 1..40 {
            let t = if i % 2 == 1 { i + 1 } else { i - 1 };
            sight(&mut p, t, 100 + i as u128);
            assert!(p.trajectory.capacity() <= TRAJECTORY_LEN);
        }
        let times: Vec<i64> = p
            .trajectory()
            .iter()
            .map(|s| (s.recorded_at - T0) / S)
            .collect();
        // Sent: 0, 2, 1, 4, 3, …, 38, 37, 40 (39 never): the latest 32 are 8..=38 and 40.
        assert_eq!(times, (8..39).chain([40]).collect::<Vec<_>>());
        // Older than every sighting kept: counted, not kept; a repeat: neither.
        sight(&mut p, 3, 999);
        sight(&mut p, 39, 100 + 38);
        assert_eq!(
            p.trajectory().first().map(|s| s.recorded_at),
            Some(T0 + 8 * S)
        );
        assert_eq!(p.counters().sightings, 41);
    }

    /// The bytes of a person's state are those every snapshot format so far wrote (postcard of
    /// the fields person, trajectory, peers, recent summary ids, dirty peers, counters, in this
    /// order; pinned from the state before the episode book was boxed): a stored snapshot and a
    /// passivated person read back across the change.
    #[test]
    fn a_persons_bytes_are_the_ones_snapshots_stored_before() {
        let r = rules();
        let mut p = PersonState::new(1);
        let mut out = PersonOutput::default();
        p.sighting(&own_event(0), 0x0894_88d4_a2a3_ffff);
        let seen_once = postcard::to_allocvec(&p).expect("encodes");
        // Two co-locations with one peer, the second not flushed (a dirty peer).
        p.colocation(&at(1, 1), false, T0, T0, &r, &mut out, false);
        p.flush(&mut out);
        p.colocation(&at(2, 2), false, T0, T0, &r, &mut out, false);
        let met = postcard::to_allocvec(&p).expect("encodes");
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        // Only a person who met someone holds an episode book; both read back equal.
        assert!(p.book.is_some() && PersonState::new(1).book.is_none());
        for bytes in [&seen_once, &met] {
            let back: PersonState = postcard::from_bytes(bytes).expect("decodes");
            assert_eq!(postcard::to_allocvec(&back).expect("encodes"), *bytes);
        }
        // An episode's stored start is an `Option` on the wire; the one value it cannot hold
        // is refused, not read as "never stored".
        let stored = |t: Option<Micros>| {
            postcard::from_bytes::<StoredStart>(&postcard::to_allocvec(&t).expect("encodes"))
        };
        assert_eq!(stored(None).expect("none").get(), None);
        assert_eq!(stored(Some(T0)).expect("a time").get(), Some(T0));
        assert!(stored(Some(Micros::MIN)).is_err());
        let got = format!("{} {}", hex(&seen_once), hex(&met));
        assert_eq!(got, "0201000000000000000000000000000027108080afa2dbffad060ad7a3703d8a41409a99999999a95ac001ffff8f95ca9aa2ca08000000010000000000 0201000000000000000000000000000027108080afa2dbffad060ad7a3703d8a41409a99999999a95ac001ffff8f95ca9aa2ca080104018089a9a3dbffad068092a3a4dbffad060200000000000000408089a9a3dbffad06100000000000000000000000000000000110000000000000000000000000000003e900000000000000000000000000000000018089a9a3dbffad06000000010002e9b38fa452f527cf8089a9a3dbffad068bf65b5ba3bab1da80897a00010200010000");
    }

    #[test]
    fn a_person_reads_back_from_its_packed_snapshot_bytes_unchanged() {
        let r = rules();
        let mut p = PersonState::new(1);
        let mut out = PersonOutput::default();
        for t in 0..40i64 {
            let e = LocationEvent {
                event_id: Uuid::from_u128(10_000 + t as u128),
                person_id: 1,
                lat: 35.08 + t as f64 * 1e-6,
                lon: -106.65,
                recorded_at: T0 + t * S,
                received_at: T0 + t * S,
            };
            // Two zones (H3 cells of resolution 9, as ids go), so that a sighting's zone
            // differs from the one before now and then.
            p.sighting(&e, 0x0894_88d4_a2a3_ffff + (t / 10) as u64 % 2 * 0x40_0000);
            let min = T0 + (t - 30) * S;
            p.colocation(&at(t, t as u128), false, min, min, &r, &mut out, false);
        }
        // A late key, kept far longer than the on-time ones.
        p.colocation(&at(-500, 999), true, T0, T0, &r, &mut out, false);
        p.flush(&mut out);
        let bytes = postcard::to_allocvec(&p).expect("encodes");
        let back: PersonState = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(back, p);
        assert_eq!(back.trajectory(), p.trajectory());
        let trajectory = postcard::to_allocvec(&p.trajectory).expect("encodes").len();
        // The packed form alone: the person with an empty trajectory, subtracted.
        let mut without = p.clone();
        without.trajectory.clear();
        let packed = bytes.len() - postcard::to_allocvec(&without).expect("encodes").len();
        assert!(
            packed * 10 < trajectory * 8,
            "{packed} bytes packed, {trajectory} derived, for {} sightings",
            p.trajectory.len()
        );
    }

    #[test]
    fn a_passivated_person_unpacks_to_the_state_it_was_and_a_person_seen_once_packs_small() {
        let r = rules();
        let mut p = PersonState::new(1);
        let mut out = PersonOutput::default();
        p.sighting(&own_event(0), 0x0894_88d4_a2a3_ffff);
        let once = PassivatedPerson::pack(&p);
        assert_eq!(once.unpack(), p);
        assert!(
            once.packed_len() <= 100,
            "a person seen once packs in {} bytes",
            once.packed_len()
        );
        for t in 1..20i64 {
            p.sighting(&own_event(t), 0x0894_88d4_a2a3_ffff);
            p.colocation(&at(t, t as u128), false, T0, T0, &r, &mut out, false);
        }
        p.flush(&mut out);
        p.close(T0 + 3_000 * S, &r, &mut out);
        assert!(!p.has_open_episodes() && !p.peers().is_empty());
        let packed = PassivatedPerson::pack(&p);
        let back = packed.unpack();
        assert_eq!(back, p);
        assert_eq!(back.trajectory(), p.trajectory());
        assert_eq!(back.peers(), p.peers());
    }

    #[test]
    fn a_snapshot_with_a_trajectory_too_long_or_out_of_order_is_refused() {
        let sighting = |t: i64| Sighting {
            event_id: Uuid::from_u128(t as u128),
            recorded_at: T0 + t * S,
            lat: 0.0,
            lon: 0.0,
            zone: 7,
        };
        let mut p = PersonState::new(1);
        p.trajectory = (0..33).map(sighting).collect();
        let long = postcard::to_allocvec(&p).expect("encodes");
        assert!(postcard::from_bytes::<PersonState>(&long).is_err());
        p.trajectory = [sighting(2), sighting(1)].into_iter().collect();
        let unordered = postcard::to_allocvec(&p).expect("encodes");
        assert!(postcard::from_bytes::<PersonState>(&unordered).is_err());
        p.trajectory = [sighting(1), sighting(2)].into_iter().collect();
        let fine = postcard::to_allocvec(&p).expect("encodes");
        assert_eq!(
            postcard::from_bytes::<PersonState>(&fine).expect("decodes"),
            p
        );
    }
}
