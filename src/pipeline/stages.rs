//! The two stages' partition workers (DESIGN §2): stage one feeds a partition's
//! `ZoneSupervisor` from the locations topic, stage two a `PersonSupervisor` from the
//! person-updates topic. The ports they emit to are implemented here with PostgreSQL and the
//! shared producer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use tracing::{error, info, warn};
use udaconnect_actors::actors::person::{
    PersonSupervisor, PersonSupervisorArgs, PersonSupervisorMsg,
};
use udaconnect_actors::actors::ports::{
    retry, ConnectionSink, LocationSink, PersonUpdateSink, PortError, SnapshotBlob, Stage,
};
use udaconnect_actors::actors::zone::{ZoneSupervisor, ZoneSupervisorArgs, ZoneSupervisorMsg};
use udaconnect_actors::actors::PartitionHandle;
use udaconnect_actors::domain::{Micros, Notification};
use udaconnect_actors::messages::{EpisodeChange, PersonBatch, RoutedEvent};
use udaconnect_actors::params::EngineParams;

use crate::kafka::{OutRecord, Producer};
use crate::pipeline::codec::{self, LocationRecord};
use crate::pipeline::consumer::{PartitionWorker, Record, WorkerFactory};
use crate::store::pipeline::{apply_changes, store_locations, PgOwners, PgSnapshots};

/// How long a call to a supervisor may take (a snapshot of a big partition included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Batches in flight in front of a supervisor.
const IN_FLIGHT: usize = 4;

/// Home events into `location`.
pub struct PgLocations {
    pub pool: deadpool_postgres::Pool,
    pub stored: AtomicU64,
}

impl LocationSink for PgLocations {
    fn store<'a>(
        &'a self,
        _partition: u32,
        events: &'a [RoutedEvent],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        Box::pin(async move {
            let n = store_locations(&self.pool, events)
                .await
                .map_err(|e| PortError(e.to_string()))?;
            self.stored.fetch_add(n, Ordering::Relaxed);
            Ok(())
        })
    }
}

/// Per-person updates into the person-updates topic, one record per destination partition.
pub struct KafkaPersonUpdates {
    pub producer: Producer,
    pub topic: String,
}

/// Updates per person-updates record; a bigger batch is split over several records.
pub const MAX_UPDATES_PER_RECORD: usize = 2_000;

impl PersonUpdateSink for KafkaPersonUpdates {
    fn publish(&self, batches: Vec<(u32, PersonBatch)>) -> BoxFuture<'_, Result<(), PortError>> {
        Box::pin(async move {
            let mut records: Vec<OutRecord<'_>> = Vec::with_capacity(batches.len());
            for (q, batch) in &batches {
                for payload in split_batch(batch, MAX_UPDATES_PER_RECORD) {
                    records.push(OutRecord {
                        topic: &self.topic,
                        partition: Some(*q as i32),
                        key: None,
                        payload,
                        headers: Vec::new(),
                    });
                }
            }
            self.producer
                .send_all(&records)
                .await
                .map_err(|e| PortError(e.to_string()))
        })
    }
}

/// Encodes `batch` as records of at most `max` updates. Only the last carries the batch's
/// watermark: the earlier ones carry none (`Micros::MIN`, which moves nothing), since updates
/// of the later records may be earlier than the new watermark.
pub fn split_batch(batch: &PersonBatch, max: usize) -> Vec<Vec<u8>> {
    let chunks: Vec<&[udaconnect_actors::messages::PersonUpdate]> =
        batch.updates.chunks(max.max(1)).collect();
    if chunks.len() <= 1 {
        return vec![codec::encode_person_batch(batch)];
    }
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, updates)| {
            codec::encode_person_batch(&PersonBatch {
                source: batch.source,
                updates: updates.to_vec(),
                watermark: if i == last {
                    batch.watermark
                } else {
                    Micros::MIN
                },
            })
        })
        .collect()
}

/// Episodes into `connection` (one transaction), then notifications into the connections
/// topic, keyed by person.
pub struct PgConnections {
    pub pool: deadpool_postgres::Pool,
    pub producer: Producer,
    pub topic: String,
}

impl ConnectionSink for PgConnections {
    fn apply<'a>(
        &'a self,
        _partition: u32,
        changes: &'a [EpisodeChange],
        notifications: &'a [Notification],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        Box::pin(async move {
            apply_changes(&self.pool, changes)
                .await
                .map_err(|e| PortError(e.to_string()))?;
            let records: Vec<OutRecord<'_>> = notifications
                .iter()
                .map(|n| OutRecord {
                    topic: &self.topic,
                    partition: None,
                    key: Some(n.episode.person.to_string().into_bytes()),
                    payload: codec::encode_notification(n),
                    headers: Vec::new(),
                })
                .collect();
            self.producer
                .send_all(&records)
                .await
                .map_err(|e| PortError(e.to_string()))
        })
    }
}

/// Where a stage sends records it cannot read.
#[derive(Clone)]
pub struct DeadLetters {
    pub producer: Producer,
    pub source_topic: String,
    pub topic: String,
    pub count: Arc<AtomicU64>,
}

impl DeadLetters {
    /// Produces the record to the dead-letter topic with the reason and where it came from,
    /// retrying until the broker takes it.
    pub async fn send(&self, partition: i32, record: &Record, reason: &str) {
        warn!(
            topic = self.source_topic,
            partition,
            offset = record.offset,
            reason,
            "record sent to the dead-letter topic"
        );
        let out = [OutRecord {
            topic: &self.topic,
            partition: None,
            key: None,
            payload: record.payload.clone().unwrap_or_default(),
            headers: vec![
                ("reason", reason.to_owned()),
                ("source.topic", self.source_topic.clone()),
                ("source.partition", partition.to_string()),
                ("source.offset", record.offset.to_string()),
            ],
        }];
        retry("dead-lettering", partition as u32, || {
            self.producer.send_all(&out)
        })
        .await;
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// The supervisors of the partitions this process owns, for status and admin views.
pub type Owned<M> = Arc<Mutex<BTreeMap<i32, ActorRef<M>>>>;

/// Where a stage keeps its partitions' snapshots and records their owners.
#[derive(Clone)]
pub struct PartitionStore {
    pub stage: Stage,
    /// The stage topic's partition count.
    pub partitions: u32,
    pub snapshots: PgSnapshots,
    pub owners: PgOwners,
}

/// An owner row not confirmed for this long belongs to a process that is gone (live owners
/// confirm theirs every snapshot interval).
const OWNER_FRESH_S: f64 = 20.0;

impl PartitionStore {
    /// How many of the stage's partitions no live process owns.
    async fn orphaned(&self) -> Result<u32, String> {
        self.owners
            .orphaned(self.stage, self.partitions, OWNER_FRESH_S)
            .await
            .map_err(|e| e.to_string())
    }
}

/// What both stages' workers share: the supervisor behind its bounded hand-off, the offsets
/// handled and snapshotted, and the snapshot and close steps.
struct PartitionCore<M: ractor::Message> {
    stage: Stage,
    partition: i32,
    handle: PartitionHandle<M>,
    store: PartitionStore,
    owned: Owned<M>,
    snapshot_request: fn(ractor::RpcReplyPort<SnapshotBlob>) -> M,
    /// The offset after the last record handled.
    next_offset: i64,
    snapshotted: i64,
}

impl<M: ractor::Message> PartitionCore<M> {
    /// Loads the partition's snapshot and starts its supervisor from it (from nothing when
    /// there is none, or when it cannot be read: the partition then replays from offset 0).
    async fn restore<A>(
        partition: i32,
        store: &PartitionStore,
        owned: &Owned<M>,
        supervisor: impl Fn() -> A,
        args: impl Fn(Option<SnapshotBlob>) -> A::Arguments,
        snapshot_request: fn(ractor::RpcReplyPort<SnapshotBlob>) -> M,
    ) -> Self
    where
        A: Actor<Msg = M>,
    {
        let stage = store.stage;
        let partition_u32 = partition as u32;
        retry("claiming the partition", partition_u32, || {
            store.owners.claim(stage, partition_u32)
        })
        .await;
        let (blob, _) = retry("loading the snapshot", partition_u32, || {
            store.snapshots.load(stage, partition_u32)
        })
        .await;
        let restored = blob.as_ref().map_or(0, |b| b.next_offset as i64);
        let (actor, restored) = match Actor::spawn(None, supervisor(), args(blob)).await {
            Ok((actor, _)) => (actor, restored),
            Err(e) => {
                // An unreadable snapshot (another version's format): start over from offset 0.
                error!(stage = stage.as_str(), partition, error = %e, "snapshot unusable; replaying the partition from its start");
                let (actor, _) = Actor::spawn(None, supervisor(), args(None))
                    .await
                    .expect("a supervisor without a snapshot starts");
                (actor, 0)
            }
        };
        info!(
            stage = stage.as_str(),
            partition,
            next_offset = restored,
            "partition restored"
        );
        owned
            .lock()
            .expect("not poisoned")
            .insert(partition, actor.clone());
        Self {
            stage,
            partition,
            handle: PartitionHandle::new(actor, IN_FLIGHT),
            store: store.clone(),
            owned: Arc::clone(owned),
            snapshot_request,
            next_offset: restored,
            snapshotted: restored,
        }
    }

    /// Snapshots the partition and stores it, unless nothing was handled since the last one;
    /// returns the offset the snapshot covers.
    async fn checkpoint(&mut self) -> Option<i64> {
        if self.next_offset == self.snapshotted {
            self.confirm_owner().await;
            return None;
        }
        // The supervisor answers after every batch sent before, whose effects it awaited.
        let blob = match self
            .handle
            .actor()
            .call(self.snapshot_request, Some(CALL_TIMEOUT))
            .await
        {
            Ok(CallResult::Success(blob)) => blob,
            other => {
                error!(stage = self.stage.as_str(), partition = self.partition, result = ?other.map(|_| ()), "snapshot request failed");
                return None;
            }
        };
        let partition = self.partition as u32;
        let snapshots = &self.store.snapshots;
        retry("storing the snapshot", partition, || {
            snapshots.store(self.stage, partition, &blob)
        })
        .await;
        self.snapshotted = blob.next_offset as i64;
        self.confirm_owner().await;
        Some(self.snapshotted)
    }

    /// Refreshes the owner row's heartbeat (best effort: the group decides ownership; the row
    /// tells the cluster who owns what, and lets a member that was left without partitions
    /// see that nobody live owns them).
    async fn confirm_owner(&self) {
        let partition = self.partition as u32;
        let heartbeat = self.store.owners.heartbeat(self.stage, partition);
        match tokio::time::timeout(Duration::from_secs(2), heartbeat).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(stage = self.stage.as_str(), partition, error = %e, "cannot confirm the partition's owner row")
            }
            Err(_) => {
                warn!(
                    stage = self.stage.as_str(),
                    partition, "confirming the partition's owner row timed out"
                )
            }
        }
    }

    /// Stops the supervisor and removes the partition's owner row (best effort: the next
    /// owner replaces it anyway).
    async fn close(self) {
        self.owned
            .lock()
            .expect("not poisoned")
            .remove(&self.partition);
        self.handle.actor().stop(None);
        let release = self.store.owners.release(self.stage, self.partition as u32);
        match tokio::time::timeout(Duration::from_secs(2), release).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(stage = self.stage.as_str(), partition = self.partition, error = %e, "cannot remove the partition's owner row")
            }
            Err(_) => {
                warn!(
                    stage = self.stage.as_str(),
                    partition = self.partition,
                    "removing the partition's owner row timed out"
                )
            }
        }
    }
}

/// Stage one: a zone partition's worker factory.
pub struct ZoneStage {
    pub params: EngineParams,
    pub person_partitions: u32,
    pub locations: Arc<PgLocations>,
    pub updates: Arc<KafkaPersonUpdates>,
    pub store: PartitionStore,
    pub dead_letters: DeadLetters,
    pub owned: Owned<ZoneSupervisorMsg>,
}

pub struct ZoneWorker {
    core: PartitionCore<ZoneSupervisorMsg>,
    dead_letters: DeadLetters,
    /// The offset the supervisor has been told about.
    sent_offset: i64,
}

impl WorkerFactory for ZoneStage {
    type Worker = ZoneWorker;

    async fn orphaned(&self) -> Result<u32, String> {
        self.store.orphaned().await
    }

    async fn open(&self, partition: i32) -> ZoneWorker {
        let core = PartitionCore::restore(
            partition,
            &self.store,
            &self.owned,
            || ZoneSupervisor,
            |snapshot| ZoneSupervisorArgs {
                partition: partition as u32,
                params: self.params,
                person_partitions: self.person_partitions,
                locations: self.locations.clone(),
                updates: self.updates.clone(),
                snapshot,
            },
            ZoneSupervisorMsg::Snapshot,
        )
        .await;
        ZoneWorker {
            sent_offset: core.next_offset,
            core,
            dead_letters: self.dead_letters.clone(),
        }
    }
}

impl ZoneWorker {
    async fn send_events(&mut self, events: Vec<RoutedEvent>, next_offset: i64) {
        let sent = self
            .core
            .handle
            .send(|permit| ZoneSupervisorMsg::Batch {
                events,
                next_offset: next_offset as u64,
                permit: Some(permit),
                done: None,
            })
            .await;
        if sent.is_err() {
            error!(partition = self.core.partition, "zone supervisor is gone");
        }
        self.sent_offset = next_offset;
    }
}

impl PartitionWorker for ZoneWorker {
    async fn handle(&mut self, records: Vec<Record>) {
        let mut events: Vec<RoutedEvent> = Vec::new();
        for record in records {
            // Covered by the snapshot the partition was restored from.
            if record.offset < self.core.next_offset {
                continue;
            }
            match LocationRecord::decode(record.payload.as_deref()) {
                Ok(LocationRecord::Events(mut copies)) => events.append(&mut copies),
                Ok(LocationRecord::Heartbeat { max_event_time }) => {
                    if !events.is_empty() {
                        self.send_events(std::mem::take(&mut events), record.offset)
                            .await;
                    }
                    let next_offset = (record.offset + 1) as u64;
                    let _ = self
                        .core
                        .handle
                        .send(|permit| ZoneSupervisorMsg::Advance {
                            max_event_time,
                            next_offset,
                            permit: Some(permit),
                            done: None,
                        })
                        .await;
                    self.sent_offset = record.offset + 1;
                }
                Err(e) => {
                    self.dead_letters
                        .send(self.core.partition, &record, &e.to_string())
                        .await
                }
            }
            self.core.next_offset = record.offset + 1;
        }
        if !events.is_empty() || self.sent_offset < self.core.next_offset {
            self.send_events(events, self.core.next_offset).await;
        }
    }

    async fn checkpoint(&mut self) -> Option<i64> {
        self.core.checkpoint().await
    }

    async fn close(self) {
        self.core.close().await;
    }
}

/// Stage two: a person partition's worker factory.
pub struct PersonStage {
    pub params: EngineParams,
    pub zone_partitions: u32,
    pub passivate_after_s: u32,
    pub connections: Arc<PgConnections>,
    pub store: PartitionStore,
    pub dead_letters: DeadLetters,
    pub owned: Owned<PersonSupervisorMsg>,
}

pub struct PersonWorker {
    core: PartitionCore<PersonSupervisorMsg>,
    dead_letters: DeadLetters,
}

impl WorkerFactory for PersonStage {
    type Worker = PersonWorker;

    async fn orphaned(&self) -> Result<u32, String> {
        self.store.orphaned().await
    }

    async fn open(&self, partition: i32) -> PersonWorker {
        let core = PartitionCore::restore(
            partition,
            &self.store,
            &self.owned,
            || PersonSupervisor,
            |snapshot| PersonSupervisorArgs {
                partition: partition as u32,
                params: self.params,
                zone_partitions: self.zone_partitions,
                connections: self.connections.clone(),
                passivate_after_s: self.passivate_after_s,
                capture: false,
                snapshot,
            },
            PersonSupervisorMsg::Snapshot,
        )
        .await;
        PersonWorker {
            core,
            dead_letters: self.dead_letters.clone(),
        }
    }
}

impl PartitionWorker for PersonWorker {
    async fn handle(&mut self, records: Vec<Record>) {
        for record in records {
            if record.offset < self.core.next_offset {
                continue;
            }
            let batch = match codec::decode_person_batch(record.payload.as_deref()) {
                Ok(batch) => batch,
                Err(e) => {
                    self.dead_letters
                        .send(self.core.partition, &record, &e.to_string())
                        .await;
                    // Nothing to apply; the supervisor still learns the offset moved.
                    PersonBatch {
                        source: 0,
                        updates: Vec::new(),
                        watermark: Micros::MIN,
                    }
                }
            };
            let sent = self
                .core
                .handle
                .send(|permit| PersonSupervisorMsg::Batch {
                    batch,
                    next_offset: (record.offset + 1) as u64,
                    permit: Some(permit),
                    done: None,
                })
                .await;
            if sent.is_err() {
                error!(partition = self.core.partition, "person supervisor is gone");
            }
            self.core.next_offset = record.offset + 1;
        }
    }

    async fn checkpoint(&mut self) -> Option<i64> {
        self.core.checkpoint().await
    }

    async fn close(self) {
        self.core.close().await;
    }
}
