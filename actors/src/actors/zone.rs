//! Stage one: `ZoneSupervisor` (one per zone partition) and `ZoneActor` (one per zone).
//!
//! The supervisor decides lateness in arrival order with the partition's event clock, hands
//! each zone its part of the batch, waits for all of them, then sends the per-person updates,
//! one batch per person partition followed by its watermark, and only then takes the next
//! batch: each zone's updates are in the input order of its copies, the zones' one after the
//! other (in the order their replies are joined). Home events go to the partition's location
//! writer, which stores what has queued up in one write at a time (nothing waits for
//! PostgreSQL on the way to a notification); a snapshot is finished only once the home events
//! it covers are stored.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedSemaphorePermit;

use crate::actors::ports::{
    retry, CapturedSnapshot, LocationSink, PendingSnapshot, PersonUpdateSink, SnapshotBlob,
};
use crate::actors::supervision::{flag_unfinished, restore_header, Child, Children};
use crate::actors::{SupervisionCounters, Writer};
use crate::domain::Micros;
use crate::messages::{LateCopy, PersonBatch, PersonSet, RoutedEvent, SeenCopy};
use crate::params::EngineParams;
use crate::zone_index::{
    admit, snapshot_slice, CellPointList, EventClock, PartitionCounters, RetainedPoint, StoredCopy,
    UpdatesByPartition, ZoneCounters, ZoneIndex, ZoneMeta,
};
use crate::zones::{CellCache, ZoneGrid, ZoneId};

/// How long the supervisor waits for a zone actor's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Snapshot format of a zone partition: postcard of [`ZonePartitionSnapshot`] (with every
/// zone's [`ZoneMeta`]), and of a [`ZoneSlicePart`] per part, keyed by its snapshot slice (see
/// [`SNAPSHOT_SLICE_US`](crate::zone_index::SNAPSHOT_SLICE_US)).
pub const ZONE_SNAPSHOT_FORMAT: u32 = 4;

/// Batches of home events queued in front of a partition's location writer before the
/// supervisor waits (backpressure when the store is slow or away).
const LOCATION_WRITER_QUEUE: usize = 16;
/// Most home events the location writer stores in one write.
const MAX_LOCATIONS_PER_WRITE: usize = 20_000;

/// A zone actor: configuration only; its state is [`ZoneState`].
pub struct ZoneActor;

/// A zone's state: its index and the fine-cell geometry it searches.
pub struct ZoneState {
    index: ZoneIndex,
    cache: CellCache,
    /// How many updates the last batch found for each person partition: the room the next
    /// batch's lists start with ([`UpdatesByPartition::new`]).
    room: Vec<usize>,
}

/// A copy handed to a zone actor, in arrival order: a late one comes with the stored copies of
/// its zone to match it against ([`ZoneIndex::insert_late`]).
pub struct Arriving {
    pub routed: RoutedEvent,
    pub stored: Option<Vec<StoredCopy>>,
}

/// Messages of a zone actor.
pub enum ZoneMsg {
    /// The zone's copies of a batch, in arrival order; evict at `watermark` afterwards. Replies
    /// with the updates found, split over `person_partitions` partitions.
    Batch {
        events: Vec<Arriving>,
        watermark: Micros,
        person_partitions: u32,
        reply: RpcReplyPort<UpdatesByPartition>,
    },
    /// Evict at `watermark` (the partition moved on without input for this zone).
    Evict {
        watermark: Micros,
    },
    View {
        limit: usize,
        reply: RpcReplyPort<ZoneView>,
    },
    Snapshot(RpcReplyPort<ZoneIndex>),
    /// Forgets the points of these persons (erasure); replies with how many were removed.
    Forget {
        persons: PersonSet,
        reply: RpcReplyPort<usize>,
    },
    /// Panics in the handler: exercises the supervisor's restart path.
    #[doc(hidden)]
    Crash,
}

/// A copy of a zone's state for admin APIs and tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneView {
    pub zone: ZoneId,
    pub retained: usize,
    pub cells: usize,
    pub watermark: Micros,
    pub counters: ZoneCounters,
    /// Oldest first, at most the requested number.
    pub points: Vec<RetainedPoint>,
}

impl Actor for ZoneActor {
    type Msg = ZoneMsg;
    type State = ZoneState;
    type Arguments = (ZoneIndex, ZoneGrid);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (index, grid): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(ZoneState {
            index,
            cache: CellCache::new(grid),
            room: Vec::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ZoneMsg::Batch {
                events,
                watermark,
                person_partitions,
                reply,
            } => {
                let mut out = UpdatesByPartition::new(person_partitions, &state.room);
                for Arriving { routed, stored } in &events {
                    let neighbors = state.cache.neighbors(routed.fine_cell);
                    match stored {
                        Some(stored) => {
                            state.index.insert_late(routed, neighbors, stored, &mut out)
                        }
                        None => state.index.insert(routed, neighbors, &mut out),
                    };
                }
                state.index.evict(watermark);
                state.room = out.sizes();
                // The supervisor may have given up waiting; nothing else to do then.
                let _ = reply.send(out);
            }
            ZoneMsg::Evict { watermark } => state.index.evict(watermark),
            ZoneMsg::View { limit, reply } => {
                let _ = reply.send(zone_view(&state.index, limit));
            }
            ZoneMsg::Snapshot(reply) => {
                let _ = reply.send(state.index.clone());
            }
            ZoneMsg::Forget { persons, reply } => {
                let _ = reply.send(state.index.forget(&persons));
            }
            ZoneMsg::Crash => panic!("zone actor asked to crash"),
        }
        Ok(())
    }
}

impl Child for ZoneActor {
    type Key = ZoneId;
    type Part = ZoneIndex;
    type Note = ();
    const KIND: &'static str = "zone";
    const CALL_TIMEOUT: Duration = CALL_TIMEOUT;

    fn key((index, _): &Self::Arguments) -> ZoneId {
        index.zone()
    }

    fn snapshot_request(reply: RpcReplyPort<ZoneIndex>) -> ZoneMsg {
        ZoneMsg::Snapshot(reply)
    }

    fn crash_request() -> ZoneMsg {
        ZoneMsg::Crash
    }

    fn log_restart(partition: u32, zone: ZoneId, error: &ActorProcessingErr) {
        tracing::error!(partition, zone, %error, "zone actor failed, restarting it empty");
    }
}

fn zone_view(index: &ZoneIndex, limit: usize) -> ZoneView {
    ZoneView {
        zone: index.zone(),
        retained: index.retained(),
        cells: index.cells(),
        watermark: index.watermark(),
        counters: index.counters(),
        points: index.points(limit),
    }
}

/// The partition-wide state of a zone partition's snapshot: its clock, counters and every
/// zone without its points (the points are in the [`ZoneSlicePart`]s).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZonePartitionSnapshot {
    pub partition: u32,
    pub clock: EventClock,
    pub counters: PartitionCounters,
    pub zones: Vec<ZoneMeta>,
}

/// One part of a zone partition's snapshot: the points of every zone recorded within one
/// snapshot slice ([`SNAPSHOT_SLICE_US`](crate::zone_index::SNAPSHOT_SLICE_US) of event time). Points never change once indexed,
/// and eviction only removes points older than a zone's horizon
/// ([`ZoneMeta::eviction_horizon`]), so a slice changes only when a copy recorded in it
/// arrives or the horizon reaches it: a snapshot rewrites those slices and leaves the others
/// stored (about a tenth of the points at a steady rate, instead of all of them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZoneSlicePart {
    pub slice: i64,
    pub zones: Vec<(ZoneId, CellPointList)>,
}

/// A stored zone partition's snapshot, decoded ([`decode_zone_snapshot`]).
#[derive(Debug)]
pub struct DecodedZoneSnapshot {
    /// The partition-wide state (its `zones` are the metas the indexes were built from).
    pub header: ZonePartitionSnapshot,
    /// Each zone's index, its points from the slice parts.
    pub zones: Vec<ZoneIndex>,
    /// The slices the snapshot holds.
    pub slices: BTreeSet<i64>,
}

/// Decodes a stored zone snapshot: the zones' metas from the header, their points from the
/// slice parts (in slice order), into one index per zone. Errors, never panics, whatever the
/// bytes: another format, a header or part that does not decode (postcard), an incomplete
/// snapshot, a part filed under another slice than it holds, or a zone the header does not
/// list.
pub fn decode_zone_snapshot(
    blob: &SnapshotBlob,
) -> Result<DecodedZoneSnapshot, ActorProcessingErr> {
    let header: ZonePartitionSnapshot = restore_header::<ZoneActor, _>(blob, ZONE_SNAPSHOT_FORMAT)?;
    if !blob.complete {
        return Err("a zone snapshot to restore must hold every slice (complete)".into());
    }
    let mut points: FxHashMap<ZoneId, CellPointList> =
        header.zones.iter().map(|m| (m.zone, Vec::new())).collect();
    let mut parts: Vec<(i64, &[u8])> = blob.part_states().collect();
    parts.sort_unstable_by_key(|(slice, _)| *slice);
    let mut slices = BTreeSet::new();
    for (slice, bytes) in parts {
        let part: ZoneSlicePart = postcard::from_bytes(bytes)?;
        if part.slice != slice {
            return Err(format!("zone snapshot part {slice} holds slice {}", part.slice).into());
        }
        for (zone, cells) in part.zones {
            let Some(into) = points.get_mut(&zone) else {
                return Err(format!("zone snapshot part {slice} holds zone {zone:x}, which its header does not list").into());
            };
            into.extend(cells);
        }
        slices.insert(slice);
    }
    let zones = header
        .zones
        .iter()
        .map(|meta| {
            let cells = points.remove(&meta.zone).unwrap_or_default();
            ZoneIndex::restore(meta.clone(), cells)
        })
        .collect();
    Ok(DecodedZoneSnapshot {
        header,
        zones,
        slices,
    })
}

/// The zone partition's supervisor: configuration only.
pub struct ZoneSupervisor;

/// What a zone supervisor starts with.
pub struct ZoneSupervisorArgs {
    pub partition: u32,
    pub params: EngineParams,
    pub person_partitions: u32,
    pub locations: Arc<dyn LocationSink>,
    pub updates: Arc<dyn PersonUpdateSink>,
    /// State to restore, as stored by a previous snapshot.
    pub snapshot: Option<SnapshotBlob>,
}

/// A zone supervisor's state.
pub struct ZoneSupervisorState {
    partition: u32,
    params: EngineParams,
    grid: ZoneGrid,
    person_partitions: u32,
    /// Stores the copies seen (`location`, `halo_copy`).
    locations: Writer<SeenCopy>,
    /// The same store, asked for late copies' partners.
    location_sink: Arc<dyn LocationSink>,
    /// Fine-cell neighbour lists, for the late copies' search.
    cells: CellCache,
    /// Batches handed to the location writer and not yet confirmed stored, oldest first, each
    /// with the signal of its storing: searched in memory for late copies.
    unconfirmed: VecDeque<(tokio::sync::oneshot::Receiver<()>, Vec<SeenCopy>)>,
    updates: Arc<dyn PersonUpdateSink>,
    clock: EventClock,
    counters: PartitionCounters,
    /// The zone actors, with their panics and restarts.
    zones: Children<ZoneActor>,
    next_offset: u64,
    port_retries: u64,
    /// Snapshot slices that copies were indexed into since the last snapshot was captured.
    arrived_slices: BTreeSet<i64>,
    /// Slices the stored snapshot holds a part for (as far as the snapshots captured since
    /// say), and whether the next snapshot must hold every slice (nothing stored to build on,
    /// or a zone restarted empty since).
    stored_slices: BTreeSet<i64>,
    complete_next: bool,
    restarts_seen: u64,
    /// Set when a snapshot whose slices were already taken was not finished (it failed, or its
    /// caller dropped it): the next one must then hold every slice.
    snapshot_failed: Arc<std::sync::atomic::AtomicBool>,
}

/// Messages of a zone supervisor.
pub enum ZoneSupervisorMsg {
    /// The next batch of the partition, each copy with the input offset that brought it;
    /// `next_offset` is the input offset after it.
    Batch {
        events: Vec<SeenCopy>,
        next_offset: u64,
        /// Released when the batch is done: the bounded hand-off in front of the supervisor.
        permit: Option<OwnedSemaphorePermit>,
        done: Option<RpcReplyPort<()>>,
    },
    /// The ingest side's heartbeat: no event arriving after it is earlier than
    /// `max_event_time - lateness`, so the partition's watermark may move there even without
    /// traffic; the new watermark goes to every person partition.
    Advance {
        max_event_time: Micros,
        next_offset: u64,
        permit: Option<OwnedSemaphorePermit>,
        done: Option<RpcReplyPort<()>>,
    },
    /// The end of the input: the watermark jumps to the end of time.
    Finish(RpcReplyPort<()>),
    /// Replies once every earlier batch is processed and its home events are stored.
    Flush(RpcReplyPort<()>),
    /// Captures a snapshot; it is serialized in the background (see [`PendingSnapshot`]).
    Snapshot {
        /// Every slice, rather than those that changed since the previous snapshot (a
        /// snapshot that must restore on its own).
        complete: bool,
        reply: RpcReplyPort<PendingSnapshot>,
    },
    View(RpcReplyPort<ZonePartitionView>),
    ZoneView {
        zone: ZoneId,
        limit: usize,
        reply: RpcReplyPort<Option<ZoneView>>,
    },
    /// Erasure: forgets every point of `persons` in the partition's zones and in the copies
    /// not confirmed stored yet, once every earlier batch's home events are stored (so that
    /// none is written after the reply); the next snapshot then holds every slice, rewritten
    /// without them. Replies with how many points were removed, or why it failed (a zone actor
    /// did not answer: retry).
    Forget {
        persons: PersonSet,
        reply: RpcReplyPort<Result<u64, String>>,
    },
    /// Makes one zone actor panic (tests of the restart path).
    #[doc(hidden)]
    CrashZone(ZoneId),
}

/// A copy of a zone partition's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZonePartitionView {
    pub partition: u32,
    pub watermark: Micros,
    pub next_offset: u64,
    pub zones: Vec<ZoneId>,
    pub counters: PartitionCounters,
    pub supervision: SupervisionCounters,
    pub port_retries: u64,
}

/// Adds to each late copy's partners the copies of `unconfirmed` batches in its zone and near
/// cells, within `window_us` of it, of other persons (or its own earlier copy): the part of
/// [`LocationSink::late_partners`] the store may not hold yet, after the store's (in input
/// order: the zone index counts each event once, as its first copy).
fn search_unconfirmed(
    unconfirmed: &VecDeque<(tokio::sync::oneshot::Receiver<()>, Vec<SeenCopy>)>,
    late: &[LateCopy],
    window_us: crate::domain::Micros,
    found: &mut [Vec<StoredCopy>],
) {
    if unconfirmed.is_empty() {
        return;
    }
    let mut by_cell: FxHashMap<(ZoneId, u64), Vec<&SeenCopy>> = FxHashMap::default();
    for c in unconfirmed.iter().flat_map(|(_, copies)| copies) {
        by_cell
            .entry((c.routed.zone, c.routed.fine_cell))
            .or_default()
            .push(c);
    }
    for (l, partners) in late.iter().zip(found.iter_mut()) {
        let e = &l.routed.event;
        for cell in &l.near_cells {
            let Some(copies) = by_cell.get(&(l.routed.zone, *cell)) else {
                continue;
            };
            partners.extend(
                copies
                    .iter()
                    .filter(|c| {
                        let o = &c.routed.event;
                        (o.person_id != e.person_id || o.event_id == e.event_id)
                            && (o.recorded_at - e.recorded_at).abs() <= window_us
                    })
                    .map(|c| StoredCopy::of(&c.routed)),
            );
        }
    }
}

impl ZoneSupervisorState {
    async fn zone(
        &mut self,
        myself: &ActorRef<ZoneSupervisorMsg>,
        zone: ZoneId,
    ) -> Result<ActorRef<ZoneMsg>, ActorProcessingErr> {
        if let Some(actor) = self.zones.get(&zone) {
            return Ok(actor.clone());
        }
        self.spawn_zone(myself, ZoneIndex::new(zone, &self.params))
            .await
    }

    async fn spawn_zone(
        &mut self,
        myself: &ActorRef<ZoneSupervisorMsg>,
        index: ZoneIndex,
    ) -> Result<ActorRef<ZoneMsg>, ActorProcessingErr> {
        self.zones
            .spawn(ZoneActor, (index, self.grid), myself.get_cell())
            .await
    }

    async fn process(
        &mut self,
        myself: &ActorRef<ZoneSupervisorMsg>,
        events: Vec<SeenCopy>,
    ) -> Result<(), ActorProcessingErr> {
        let mut found = Vec::new();
        let mut admitted = Vec::with_capacity(events.len());
        admit(
            &mut self.clock,
            &mut self.counters,
            events.iter().map(|c| c.routed),
            &mut admitted,
        );
        // Late copies are matched against everything their zone saw before this batch: what the
        // store holds (one query for the batch, below the first copy the writer has not
        // confirmed) and the copies handed to the writer since (searched here), so nothing
        // waits for the writer.
        while let Some((stored, _)) = self.unconfirmed.front_mut() {
            match stored.try_recv() {
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => break,
                _ => {
                    self.unconfirmed.pop_front();
                }
            }
        }
        let cache = &mut self.cells;
        let late: Vec<LateCopy> = admitted
            .iter()
            .filter(|a| a.late)
            .map(|a| LateCopy {
                routed: a.routed,
                near_cells: cache.neighbors(a.routed.fine_cell).to_vec(),
            })
            .collect();
        let mut partners = Vec::new().into_iter();
        if !late.is_empty() {
            let batch_start = events.first().map_or(i64::MAX, |c| c.seq);
            let before = self
                .unconfirmed
                .front()
                .and_then(|(_, copies)| copies.first())
                .map_or(batch_start, |c| c.seq.min(batch_start));
            let (sink, partition) = (&self.location_sink, self.partition);
            let (mut found, retries) = retry("matching late copies", partition, || {
                sink.late_partners(partition, &late, before)
            })
            .await;
            self.port_retries += retries;
            let window_us = i64::from(self.params.window_s) * crate::domain::MICROS_PER_S;
            search_unconfirmed(&self.unconfirmed, &late, window_us, &mut found);
            partners = found.into_iter();
        }
        let mut per_zone: FxHashMap<ZoneId, Vec<Arriving>> = FxHashMap::default();
        for a in admitted {
            self.arrived_slices
                .insert(snapshot_slice(a.routed.event.recorded_at));
            let stored = a.late.then(|| partners.next().unwrap_or_default());
            per_zone.entry(a.routed.zone).or_default().push(Arriving {
                routed: a.routed,
                stored,
            });
        }
        let watermark = self.clock.watermark();
        let person_partitions = self.person_partitions;
        let mut calls = Vec::with_capacity(per_zone.len());
        for (zone, events) in per_zone.drain() {
            let actor = self.zone(myself, zone).await?;
            calls.push(async move {
                actor
                    .call(
                        |reply| ZoneMsg::Batch {
                            events,
                            watermark,
                            person_partitions,
                            reply,
                        },
                        Some(CALL_TIMEOUT),
                    )
                    .await
            });
        }
        let called = calls.len();
        for result in join_all(calls).await {
            match result {
                Ok(ractor::rpc::CallResult::Success(out)) => found.push(out),
                Ok(_) | Err(_) => {
                    // The zone actor died or timed out: its updates for this batch are lost
                    // until the partition replays from its snapshot, which the view reports.
                    self.zones.lost_batch();
                }
            }
        }
        if called < self.zones.len() {
            for actor in self.zones.actors() {
                let _ = actor.cast(ZoneMsg::Evict { watermark });
            }
        }
        let kept = events.clone();
        if !self.locations.write(events).await {
            tracing::error!(partition = self.partition, "the location writer is gone");
        }
        let stored = self.locations.stored_so_far().await;
        self.unconfirmed.push_back((stored, kept));
        let updates = UpdatesByPartition::concat(self.person_partitions, found);
        self.publish(updates, watermark).await;
        Ok(())
    }

    /// Evicts what the clock's watermark left behind and tells every person partition.
    async fn publish_watermark(&mut self) {
        let watermark = self.clock.watermark();
        for actor in self.zones.actors() {
            let _ = actor.cast(ZoneMsg::Evict { watermark });
        }
        let nothing = UpdatesByPartition::new(self.person_partitions, &[]);
        self.publish(nothing, watermark).await;
    }

    /// Sends `updates`, one batch per person partition, each followed by `watermark`, retrying
    /// until the sink takes them.
    async fn publish(&mut self, updates: UpdatesByPartition, watermark: Micros) {
        let partition = self.partition;
        let batches: Vec<(u32, Arc<PersonBatch>)> = updates
            .into_batches(partition, watermark)
            .into_iter()
            .enumerate()
            .map(|(q, b)| (q as u32, Arc::new(b)))
            .collect();
        let sink = &self.updates;
        let ((), retries) = retry("publishing person updates", partition, || {
            sink.publish(&batches)
        })
        .await;
        self.port_retries += retries;
    }

    /// Captures the partition's state: every zone's meta, and the snapshot slices that changed
    /// since the last snapshot (copies arrived in them, or a zone's eviction horizon reached
    /// them), or every slice when `complete` or when nothing stored can be built on. An
    /// incremental snapshot is right only on top of the one captured before it, stored: the
    /// stage worker keeps at most one in flight (`src/pipeline/consumer.rs`). Serialized in the
    /// background once the copies it covers are stored.
    async fn snapshot(&mut self, complete: bool) -> Result<PendingSnapshot, ActorProcessingErr> {
        let stored = self.locations.stored_so_far().await;
        let zones = self.zones.states(self.zones.sorted_keys()).await?;
        let failed_before = self
            .snapshot_failed
            .swap(false, std::sync::atomic::Ordering::AcqRel);
        let restarts = self.zones.supervision().restarts;
        let complete =
            complete || self.complete_next || failed_before || restarts != self.restarts_seen;
        // Eviction changes only the slices at or below the newest horizon.
        let evicted_up_to = zones
            .iter()
            .map(|(_, index)| snapshot_slice(index.meta().eviction_horizon()))
            .max()
            .unwrap_or(i64::MIN);
        let arrived = std::mem::take(&mut self.arrived_slices);
        let wanted = |slice: i64| complete || slice <= evicted_up_to || arrived.contains(&slice);
        let mut slices: BTreeMap<i64, Vec<(ZoneId, CellPointList)>> = BTreeMap::new();
        let mut metas = Vec::with_capacity(zones.len());
        for (zone, index) in &zones {
            for (slice, cells) in index.points_by_slice(wanted) {
                slices.entry(slice).or_default().push((*zone, cells));
            }
            metas.push(index.meta());
        }
        drop(zones);
        // Stored slices it would rewrite that hold nothing any more are removed.
        let emptied: Vec<i64> = if complete {
            Vec::new()
        } else {
            self.stored_slices
                .iter()
                .copied()
                .filter(|s| wanted(*s) && !slices.contains_key(s))
                .collect()
        };
        if complete {
            self.stored_slices.clear();
        }
        for s in &emptied {
            self.stored_slices.remove(s);
        }
        self.stored_slices.extend(slices.keys().copied());
        self.complete_next = false;
        self.restarts_seen = restarts;
        let parts = slices
            .into_iter()
            .map(|(slice, zones)| (slice, Some(ZoneSlicePart { slice, zones })))
            .chain(emptied.into_iter().map(|s| (s, None)))
            .collect();
        let header = ZonePartitionSnapshot {
            partition: self.partition,
            clock: self.clock,
            counters: self.counters,
            zones: metas,
        };
        let pending = PendingSnapshot::serialize(
            CapturedSnapshot {
                header,
                parts,
                complete,
                next_offset: self.next_offset,
                format: ZONE_SNAPSHOT_FORMAT,
            },
            Some(stored),
        );
        // The slices it holds were taken from `arrived_slices`: if it is not finished, the
        // next snapshot holds every slice.
        Ok(flag_unfinished(pending, &self.snapshot_failed))
    }

    /// See [`ZoneSupervisorMsg::Forget`]. A zone that does not answer in time counts as a lost
    /// batch, as in [`ZoneSupervisorState::process`], and makes the forgetting fail: the
    /// erasure is then retried.
    async fn forget(&mut self, persons: &PersonSet) -> Result<u64, ActorProcessingErr> {
        let _ = self.locations.stored_so_far().await.await;
        for (_, copies) in &mut self.unconfirmed {
            copies.retain(|c| !persons.contains(&c.routed.event.person_id));
        }
        let calls = self.zones.actors().cloned().map(|actor| {
            let persons = Arc::clone(persons);
            async move {
                actor
                    .call(
                        |reply| ZoneMsg::Forget { persons, reply },
                        Some(CALL_TIMEOUT),
                    )
                    .await
            }
        });
        let mut removed = 0u64;
        let mut failed = 0;
        for result in join_all(calls).await {
            match result {
                Ok(ractor::rpc::CallResult::Success(n)) => removed += n as u64,
                _ => failed += 1,
            }
        }
        if removed > 0 {
            self.complete_next = true;
        }
        if failed > 0 {
            self.zones.lost_batch();
            return Err(format!("{failed} zone actors did not answer the erasure").into());
        }
        Ok(removed)
    }

    /// Restores the zones of a stored snapshot ([`decode_zone_snapshot`]): each zone's actor
    /// starts with its index, and the snapshot's slices count as stored.
    async fn restore(
        &mut self,
        myself: &ActorRef<ZoneSupervisorMsg>,
        zones: Vec<ZoneIndex>,
        slices: BTreeSet<i64>,
    ) -> Result<(), ActorProcessingErr> {
        self.stored_slices.extend(slices);
        for index in zones {
            self.spawn_zone(myself, index).await?;
        }
        Ok(())
    }
}

impl Actor for ZoneSupervisor {
    type Msg = ZoneSupervisorMsg;
    type State = ZoneSupervisorState;
    type Arguments = ZoneSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (sink, partition) = (Arc::clone(&args.locations), args.partition);
        let mut state = ZoneSupervisorState {
            partition: args.partition,
            params: args.params,
            grid: ZoneGrid::new(&args.params),
            person_partitions: args.person_partitions,
            locations: Writer::spawn(
                args.partition,
                "storing locations",
                LOCATION_WRITER_QUEUE,
                MAX_LOCATIONS_PER_WRITE,
                Box::new(move |events| {
                    let sink = Arc::clone(&sink);
                    Box::pin(async move { sink.store(partition, events).await })
                }),
            ),
            location_sink: Arc::clone(&args.locations),
            cells: CellCache::new(ZoneGrid::new(&args.params)),
            unconfirmed: VecDeque::new(),
            updates: args.updates,
            clock: EventClock::new(&args.params),
            counters: PartitionCounters::default(),
            zones: Children::new(),
            next_offset: 0,
            port_retries: 0,
            arrived_slices: BTreeSet::new(),
            stored_slices: BTreeSet::new(),
            complete_next: true,
            restarts_seen: 0,
            snapshot_failed: Arc::default(),
        };
        if let Some(blob) = args.snapshot {
            let DecodedZoneSnapshot {
                header: snapshot,
                zones,
                slices,
            } = decode_zone_snapshot(&blob)?;
            state.clock = snapshot.clock;
            // The lateness and clock skew are this run's, whatever the snapshot's were.
            state.clock.reconfigure(&args.params);
            state.counters = snapshot.counters;
            state.next_offset = blob.next_offset;
            // Restored zones start right away, each with its index; the stored slices are
            // this snapshot's, so the next one may build on them.
            state.restore(&myself, zones, slices).await?;
            state.complete_next = false;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ZoneSupervisorMsg::Batch {
                events,
                next_offset,
                permit,
                done,
            } => {
                state.process(&myself, events).await?;
                state.next_offset = next_offset;
                drop(permit);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            ZoneSupervisorMsg::Advance {
                max_event_time,
                next_offset,
                permit,
                done,
            } => {
                state.clock.advance_to(max_event_time);
                state.publish_watermark().await;
                state.next_offset = next_offset;
                drop(permit);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            ZoneSupervisorMsg::Flush(reply) => {
                let _ = state.locations.stored_so_far().await.await;
                let _ = reply.send(());
            }
            ZoneSupervisorMsg::Finish(reply) => {
                state.clock.finish();
                state.publish_watermark().await;
                let _ = reply.send(());
            }
            ZoneSupervisorMsg::Snapshot { complete, reply } => {
                let blob = state.snapshot(complete).await?;
                let _ = reply.send(blob);
            }
            ZoneSupervisorMsg::View(reply) => {
                let _ = reply.send(ZonePartitionView {
                    partition: state.partition,
                    watermark: state.clock.watermark(),
                    next_offset: state.next_offset,
                    zones: state.zones.sorted_keys(),
                    counters: state.counters,
                    supervision: state.zones.supervision(),
                    port_retries: state.port_retries + state.locations.retries(),
                });
            }
            ZoneSupervisorMsg::ZoneView { zone, limit, reply } => {
                let view = match state.zones.get(&zone) {
                    Some(actor) => match actor
                        .call(|r| ZoneMsg::View { limit, reply: r }, Some(CALL_TIMEOUT))
                        .await
                    {
                        Ok(ractor::rpc::CallResult::Success(v)) => Some(v),
                        _ => None,
                    },
                    None => None,
                };
                let _ = reply.send(view);
            }
            ZoneSupervisorMsg::Forget { persons, reply } => {
                // An error is the caller's to retry; the supervisor goes on.
                let result = state.forget(&persons).await;
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            ZoneSupervisorMsg::CrashZone(zone) => state.zones.crash(zone),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A failed zone actor restarts with an empty index: its points are gone.
        let (params, grid) = (&state.params, state.grid);
        state
            .zones
            .supervise(event, state.partition, myself.get_cell(), |zone| {
                (ZoneActor, (ZoneIndex::new(zone, params), grid))
            })
            .await
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.zones.stop_all();
        Ok(())
    }
}
