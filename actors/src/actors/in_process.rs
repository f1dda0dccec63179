//! The actor engine wired in one process, with in-memory ports: for tests, benches and the
//! simulator. The binary wires the same supervisors to Kafka and PostgreSQL instead.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rustc_hash::FxHashMap;

use crate::actors::person::{
    PersonPartitionView, PersonSupervisor, PersonSupervisorArgs, PersonSupervisorMsg, PersonView,
    CALL_TIMEOUT, WAVE,
};
use crate::actors::ports::{
    ConnectionSink, LocationSink, PersonUpdateSink, PortError, SnapshotBlob,
};
use crate::actors::zone::{
    ZonePartitionView, ZoneSupervisor, ZoneSupervisorArgs, ZoneSupervisorMsg, ZoneView,
};
use crate::actors::PartitionHandle;
use crate::domain::{Episode, LocationEvent, Notification, PersonId};
use crate::messages::{EpisodeChange, LateCopy, PersonBatch, PersonOutput, SeenCopy};
use crate::params::EngineParams;
use crate::sync_engine::{EpisodeTable, Router};
use crate::zone_index::StoredCopy;
use crate::zones::{zone_partition, ZoneId};

/// Sends person updates straight to the person supervisors (in place of the topic).
pub struct InProcessUpdates {
    persons: Vec<Arc<PartitionHandle<PersonSupervisorMsg>>>,
}

impl PersonUpdateSink for InProcessUpdates {
    fn publish<'a>(
        &'a self,
        batches: &'a [(u32, Arc<PersonBatch>)],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        Box::pin(async move {
            for (q, batch) in batches {
                let handle = &self.persons[*q as usize];
                handle
                    .send(|permit| PersonSupervisorMsg::Batch {
                        batches: vec![Arc::clone(batch)],
                        next_offset: 0,
                        permit: Some(permit),
                        done: None,
                    })
                    .await
                    .map_err(|e| PortError::new(format!("person partition {q} is gone: {e}")))?;
            }
            Ok(())
        })
    }
}

/// The `location` table in memory: counts home events and keeps every copy (home and ghost)
/// for late copies to match, per zone partition, in input order.
#[derive(Default)]
pub struct CountingLocations {
    stored: std::sync::atomic::AtomicU64,
    copies: Mutex<FxHashMap<u32, Vec<SeenCopy>>>,
    /// Whether copies are kept: benches whose input is never late leave them out (a late copy
    /// then finds only what its zone still retains).
    keep_copies: bool,
}

impl CountingLocations {
    /// A store that keeps copies when `keep_copies`.
    pub fn new(keep_copies: bool) -> Self {
        Self {
            keep_copies,
            ..Self::default()
        }
    }

    /// Home events stored so far.
    pub fn stored(&self) -> u64 {
        self.stored.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl LocationSink for CountingLocations {
    fn store<'a>(
        &'a self,
        partition: u32,
        copies: &'a [SeenCopy],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        let home = copies.iter().filter(|c| c.routed.home).count();
        self.stored
            .fetch_add(home as u64, std::sync::atomic::Ordering::Relaxed);
        if self.keep_copies {
            let mut kept = self.copies.lock().expect("not poisoned");
            kept.entry(partition).or_default().extend_from_slice(copies);
        }
        Box::pin(async { Ok(()) })
    }

    fn late_partners<'a>(
        &'a self,
        partition: u32,
        late: &'a [LateCopy],
        before: i64,
    ) -> BoxFuture<'a, Result<Vec<Vec<StoredCopy>>, PortError>> {
        let kept = self.copies.lock().expect("not poisoned");
        let none = Vec::new();
        let copies = kept.get(&partition).unwrap_or(&none);
        // By cell only: the zone index decides the time and the distance.
        let found = late
            .iter()
            .map(
                |LateCopy {
                     routed: l,
                     near_cells,
                 }| {
                    copies
                        .iter()
                        .filter(|c| {
                            c.seq < before
                                && c.routed.zone == l.zone
                                && near_cells.contains(&c.routed.fine_cell)
                                && (c.routed.event.person_id != l.event.person_id
                                    || c.routed.event.event_id == l.event.event_id)
                        })
                        .map(|c| StoredCopy::of(&c.routed))
                        .collect()
                },
            )
            .collect();
        Box::pin(async move { Ok(found) })
    }
}

/// The `connection` table and the notification stream in memory.
#[derive(Default)]
pub struct MemoryConnections {
    inner: Mutex<(EpisodeTable, u64, Vec<Notification>)>,
    keep_notifications: bool,
}

impl MemoryConnections {
    /// A table that also keeps every notification when `keep_notifications`.
    pub fn new(keep_notifications: bool) -> Self {
        Self {
            inner: Mutex::default(),
            keep_notifications,
        }
    }

    /// A table that starts with `table`'s rows (a restarted process sharing the database).
    pub fn with_table(table: EpisodeTable, keep_notifications: bool) -> Self {
        Self {
            inner: Mutex::new((table, 0, Vec::new())),
            keep_notifications,
        }
    }

    /// The episodes stored.
    pub fn episodes(&self) -> Vec<Episode> {
        self.inner.lock().expect("not poisoned").0.episodes()
    }

    /// A copy of the table.
    pub fn table(&self) -> EpisodeTable {
        self.inner.lock().expect("not poisoned").0.clone()
    }

    /// How many notifications were published.
    pub fn notification_count(&self) -> u64 {
        self.inner.lock().expect("not poisoned").1
    }

    /// The notifications kept.
    pub fn notifications(&self) -> Vec<Notification> {
        self.inner.lock().expect("not poisoned").2.clone()
    }
}

impl ConnectionSink for MemoryConnections {
    fn store<'a>(
        &'a self,
        _partition: u32,
        changes: &'a [EpisodeChange],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        let mut inner = self.inner.lock().expect("not poisoned");
        for c in changes {
            inner.0.apply(c);
        }
        Box::pin(async { Ok(()) })
    }

    fn publish<'a>(
        &'a self,
        _partition: u32,
        notifications: &'a [Notification],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.1 += notifications.len() as u64;
        if self.keep_notifications {
            inner.2.extend_from_slice(notifications);
        }
        Box::pin(async { Ok(()) })
    }
}

/// How the actor engine is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActorEngineOptions {
    pub zone_partitions: u32,
    pub person_partitions: u32,
    /// Batches in flight per partition before senders wait.
    pub capacity: usize,
    pub passivate_after_s: u32,
    /// Keep accepted co-locations and notifications (tests).
    pub capture: bool,
    /// Keep every copy for late copies to match (see [`CountingLocations`]); off only for
    /// benches whose input is never late.
    pub keep_copies: bool,
}

impl Default for ActorEngineOptions {
    fn default() -> Self {
        Self {
            zone_partitions: 2,
            person_partitions: 2,
            capacity: 4,
            passivate_after_s: 900,
            capture: false,
            keep_copies: true,
        }
    }
}

/// Snapshots of every partition of both stages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineSnapshot {
    pub zones: Vec<SnapshotBlob>,
    pub persons: Vec<SnapshotBlob>,
}

/// Both stages as actors in this process.
pub struct ActorEngine {
    router: Router,
    zones: Vec<PartitionHandle<ZoneSupervisorMsg>>,
    persons: Vec<Arc<PartitionHandle<PersonSupervisorMsg>>>,
    locations: Arc<CountingLocations>,
    connections: Arc<MemoryConnections>,
    zone_offsets: Vec<u64>,
}

fn call_ok<T>(
    r: Result<CallResult<T>, impl std::fmt::Display>,
    what: &str,
) -> Result<T, ActorProcessingErr> {
    match r {
        Ok(CallResult::Success(v)) => Ok(v),
        Ok(CallResult::Timeout) => Err(format!("{what}: timed out").into()),
        Ok(CallResult::SenderError) => Err(format!("{what}: the actor stopped").into()),
        Err(e) => Err(format!("{what}: {e}").into()),
    }
}

impl ActorEngine {
    /// Starts every supervisor, restoring from `snapshot` when given.
    pub async fn start(
        params: &EngineParams,
        options: ActorEngineOptions,
        snapshot: Option<EngineSnapshot>,
    ) -> Result<Self, ActorProcessingErr> {
        Self::start_with_table(params, options, snapshot, EpisodeTable::default()).await
    }

    /// Like [`ActorEngine::start`], with the episode table starting as `table`.
    pub async fn start_with_table(
        params: &EngineParams,
        options: ActorEngineOptions,
        snapshot: Option<EngineSnapshot>,
        table: EpisodeTable,
    ) -> Result<Self, ActorProcessingErr> {
        Self::start_in_waves(params, options, snapshot, table, WAVE).await
    }

    /// Like [`ActorEngine::start_with_table`] (which passes [`WAVE`]), the person supervisors
    /// asking at most `wave` person actors at once when more are due, and emitting after each
    /// such wave (tests make it small to run many waves).
    pub async fn start_in_waves(
        params: &EngineParams,
        options: ActorEngineOptions,
        snapshot: Option<EngineSnapshot>,
        table: EpisodeTable,
        wave: usize,
    ) -> Result<Self, ActorProcessingErr> {
        params.validate()?;
        let zp = options.zone_partitions.max(1);
        let pp = options.person_partitions.max(1);
        let connections = Arc::new(MemoryConnections::with_table(table, options.capture));
        let locations = Arc::new(CountingLocations::new(options.keep_copies));
        let mut persons = Vec::new();
        for q in 0..pp {
            let args = PersonSupervisorArgs {
                partition: q,
                params: *params,
                zone_partitions: zp,
                connections: connections.clone(),
                passivate_after_s: options.passivate_after_s,
                capture: options.capture,
                snapshot: snapshot
                    .as_ref()
                    .and_then(|s| s.persons.get(q as usize).cloned()),
                wave,
            };
            let (actor, _) = Actor::spawn(None, PersonSupervisor, args).await?;
            persons.push(Arc::new(PartitionHandle::new(actor, options.capacity)));
        }
        let updates = Arc::new(InProcessUpdates {
            persons: persons.clone(),
        });
        let mut zones = Vec::new();
        let mut zone_offsets = Vec::new();
        for p in 0..zp {
            let blob = snapshot
                .as_ref()
                .and_then(|s| s.zones.get(p as usize).cloned());
            zone_offsets.push(blob.as_ref().map_or(0, |b| b.next_offset));
            let args = ZoneSupervisorArgs {
                partition: p,
                params: *params,
                person_partitions: pp,
                locations: locations.clone(),
                updates: updates.clone(),
                snapshot: blob,
            };
            let (actor, _) = Actor::spawn(None, ZoneSupervisor, args).await?;
            zones.push(PartitionHandle::new(actor, options.capacity));
        }
        Ok(Self {
            router: Router::new(params, zp),
            zones,
            persons,
            locations,
            connections,
            zone_offsets,
        })
    }

    /// Routes a batch of arrivals and hands each zone partition its part (waiting for room).
    pub async fn ingest(&mut self, events: &[LocationEvent]) -> Result<(), ActorProcessingErr> {
        let routed = self.router.route_batch(events);
        for (p, batch) in routed.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let seq = self.zone_offsets[p] as i64;
            self.zone_offsets[p] += 1;
            let next_offset = self.zone_offsets[p];
            let batch: Vec<SeenCopy> = batch
                .into_iter()
                .map(|routed| SeenCopy { routed, seq })
                .collect();
            self.zones[p]
                .send(|permit| ZoneSupervisorMsg::Batch {
                    events: batch,
                    next_offset,
                    permit: Some(permit),
                    done: None,
                })
                .await
                .map_err(|e| format!("zone partition {p} is gone: {e}"))?;
        }
        Ok(())
    }

    /// Waits until everything sent so far went through both stages.
    pub async fn settle(&self) -> Result<(), ActorProcessingErr> {
        for (p, z) in self.zones.iter().enumerate() {
            call_ok(
                z.actor()
                    .call(ZoneSupervisorMsg::Flush, Some(CALL_TIMEOUT))
                    .await,
                &format!("zone partition {p}"),
            )?;
        }
        for (q, h) in self.persons.iter().enumerate() {
            call_ok(
                h.actor()
                    .call(PersonSupervisorMsg::Flush, Some(CALL_TIMEOUT))
                    .await,
                &format!("person partition {q}"),
            )?;
        }
        Ok(())
    }

    /// The end of the input: every zone partition's watermark jumps to the end of time, so
    /// every episode closes; returns when both stages are done.
    pub async fn finish(&self) -> Result<(), ActorProcessingErr> {
        for (p, z) in self.zones.iter().enumerate() {
            call_ok(
                z.actor()
                    .call(ZoneSupervisorMsg::Finish, Some(CALL_TIMEOUT))
                    .await,
                &format!("zone partition {p}"),
            )?;
        }
        self.settle().await
    }

    /// Snapshots of every partition (after [`ActorEngine::settle`], a consistent cut).
    pub async fn snapshot(&self) -> Result<EngineSnapshot, ActorProcessingErr> {
        self.settle().await?;
        let mut snapshot = EngineSnapshot::default();
        for z in &self.zones {
            let pending = call_ok(
                z.actor()
                    .call(
                        |reply| ZoneSupervisorMsg::Snapshot {
                            complete: true,
                            reply,
                        },
                        Some(CALL_TIMEOUT),
                    )
                    .await,
                "zone snapshot",
            )?;
            snapshot.zones.push(pending.wait().await?);
        }
        for h in &self.persons {
            let pending = call_ok(
                h.actor()
                    .call(
                        |reply| PersonSupervisorMsg::Snapshot {
                            complete: true,
                            reply,
                        },
                        Some(CALL_TIMEOUT),
                    )
                    .await,
                "person snapshot",
            )?;
            snapshot.persons.push(pending.wait().await?);
        }
        Ok(snapshot)
    }

    /// The episodes stored so far.
    pub fn episodes(&self) -> Vec<Episode> {
        self.connections.episodes()
    }

    /// A copy of the episode table.
    pub fn table(&self) -> EpisodeTable {
        self.connections.table()
    }

    /// Notifications published so far.
    pub fn notification_count(&self) -> u64 {
        self.connections.notification_count()
    }

    /// The notifications kept (when capturing).
    pub fn notifications(&self) -> Vec<Notification> {
        self.connections.notifications()
    }

    /// Home events stored so far.
    pub fn stored_locations(&self) -> u64 {
        self.locations.stored()
    }

    /// What the person partitions captured (when capturing), taken out.
    pub async fn take_captured(&self) -> Result<PersonOutput, ActorProcessingErr> {
        let mut out = PersonOutput::default();
        for h in &self.persons {
            out.extend(call_ok(
                h.actor()
                    .call(PersonSupervisorMsg::TakeCaptured, Some(CALL_TIMEOUT))
                    .await,
                "captured",
            )?);
        }
        Ok(out)
    }

    /// Views of every zone partition.
    pub async fn zone_partitions(&self) -> Result<Vec<ZonePartitionView>, ActorProcessingErr> {
        let mut v = Vec::new();
        for z in &self.zones {
            v.push(call_ok(
                z.actor()
                    .call(ZoneSupervisorMsg::View, Some(CALL_TIMEOUT))
                    .await,
                "zone view",
            )?);
        }
        Ok(v)
    }

    /// Views of every person partition.
    pub async fn person_partitions(&self) -> Result<Vec<PersonPartitionView>, ActorProcessingErr> {
        let mut v = Vec::new();
        for h in &self.persons {
            v.push(call_ok(
                h.actor()
                    .call(PersonSupervisorMsg::View, Some(CALL_TIMEOUT))
                    .await,
                "person view",
            )?);
        }
        Ok(v)
    }

    /// One zone's state, from the partition that owns it.
    pub async fn zone(
        &self,
        zone: ZoneId,
        limit: usize,
    ) -> Result<Option<ZoneView>, ActorProcessingErr> {
        let p = zone_partition(zone, self.zones.len() as u32);
        let z = &self.zones[p as usize];
        call_ok(
            z.actor()
                .call(
                    |reply| ZoneSupervisorMsg::ZoneView { zone, limit, reply },
                    Some(CALL_TIMEOUT),
                )
                .await,
            "zone",
        )
    }

    /// One person's state, from the partition that owns them.
    pub async fn person(&self, person: PersonId) -> Result<Option<PersonView>, ActorProcessingErr> {
        let q = crate::zones::person_partition(person, self.persons.len() as u32);
        let h = &self.persons[q as usize];
        call_ok(
            h.actor()
                .call(
                    |reply| PersonSupervisorMsg::Person { person, reply },
                    Some(CALL_TIMEOUT),
                )
                .await,
            "person",
        )
    }

    /// Time the ingest side spent waiting for room in front of the zone partitions, ns.
    pub fn zone_backpressure_ns(&self) -> u64 {
        self.zones.iter().map(|z| z.blocked_ns()).sum()
    }

    /// The zone supervisors (tests poke them directly).
    pub fn zone_supervisor(&self, partition: u32) -> &ActorRef<ZoneSupervisorMsg> {
        self.zones[partition as usize].actor()
    }

    /// The person supervisors.
    pub fn person_supervisor(&self, partition: u32) -> &ActorRef<PersonSupervisorMsg> {
        self.persons[partition as usize].actor()
    }

    /// Stops every supervisor (and with them, their actors).
    pub async fn stop(self) {
        for z in &self.zones {
            z.actor().stop(None);
        }
        for h in &self.persons {
            h.actor().stop(None);
        }
    }
}
