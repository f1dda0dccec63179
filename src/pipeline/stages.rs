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
    ConnectionSink, LocationSink, PersonUpdateSink, PortError, SnapshotBlob, Stage,
};
use udaconnect_actors::actors::zone::{ZoneSupervisor, ZoneSupervisorArgs, ZoneSupervisorMsg};
use udaconnect_actors::actors::PartitionHandle;
use udaconnect_actors::domain::{Micros, Notification};
use udaconnect_actors::messages::{EpisodeChange, PersonBatch, RoutedEvent};
use udaconnect_actors::params::EngineParams;

use crate::kafka::{OutRecord, Producer};
use crate::pipeline::codec::{self, LocationRecord};
use crate::pipeline::consumer::{PartitionWorker, Record, WorkerFactory};
use crate::store::pipeline::{apply_changes, store_locations, PgSnapshots};

/// How long a call to a supervisor may take (a snapshot of a big partition included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Batches in flight in front of a supervisor.
const IN_FLIGHT: usize = 4;

/// Retries `op` until it succeeds, backing off up to two seconds (backpressure, never loss).
async fn until_ok<T, E: std::fmt::Display, Fut: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    partition: i32,
    mut op: impl FnMut() -> Fut,
) -> T {
    let mut delay = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) => {
                warn!(partition, error = %e, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

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
        until_ok("dead-lettering", partition, || self.producer.send_all(&out)).await;
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// The supervisors of the partitions this process owns, for status and admin views.
pub type Owned<M> = Arc<Mutex<BTreeMap<i32, ActorRef<M>>>>;

async fn load_snapshot(
    snapshots: &PgSnapshots,
    stage: Stage,
    partition: i32,
) -> Option<SnapshotBlob> {
    until_ok("loading the snapshot", partition, || {
        snapshots.load(stage, partition as u32)
    })
    .await
}

async fn store_snapshot<M: ractor::Message>(
    snapshots: &PgSnapshots,
    stage: Stage,
    partition: i32,
    actor: &ActorRef<M>,
    request: impl Fn(ractor::RpcReplyPort<SnapshotBlob>) -> M,
) -> Option<SnapshotBlob> {
    // The supervisor answers after every batch sent before, whose effects it awaited.
    let blob = match actor.call(&request, Some(CALL_TIMEOUT)).await {
        Ok(CallResult::Success(blob)) => blob,
        other => {
            error!(stage = stage.as_str(), partition, result = ?other.map(|_| ()), "snapshot request failed");
            return None;
        }
    };
    until_ok("storing the snapshot", partition, || {
        snapshots.store(stage, partition as u32, &blob)
    })
    .await;
    Some(blob)
}

/// Stage one: a zone partition's worker factory.
pub struct ZoneStage {
    pub params: EngineParams,
    pub person_partitions: u32,
    pub locations: Arc<PgLocations>,
    pub updates: Arc<KafkaPersonUpdates>,
    pub snapshots: PgSnapshots,
    pub dead_letters: DeadLetters,
    pub owned: Owned<ZoneSupervisorMsg>,
}

pub struct ZoneWorker {
    partition: i32,
    handle: PartitionHandle<ZoneSupervisorMsg>,
    snapshots: PgSnapshots,
    dead_letters: DeadLetters,
    owned: Owned<ZoneSupervisorMsg>,
    /// The offset after the last record handled.
    next_offset: i64,
    /// The offset the supervisor has been told about.
    sent_offset: i64,
    snapshotted: i64,
}

impl WorkerFactory for ZoneStage {
    type Worker = ZoneWorker;

    async fn open(&self, partition: i32) -> ZoneWorker {
        let blob = load_snapshot(&self.snapshots, Stage::Zones, partition).await;
        let restored = blob.as_ref().map_or(0, |b| b.next_offset as i64);
        let args = |snapshot| ZoneSupervisorArgs {
            partition: partition as u32,
            params: self.params,
            person_partitions: self.person_partitions,
            locations: self.locations.clone(),
            updates: self.updates.clone(),
            snapshot,
        };
        let (actor, restored) = match Actor::spawn(None, ZoneSupervisor, args(blob)).await {
            Ok((actor, _)) => (actor, restored),
            Err(e) => {
                // An unreadable snapshot (another version's format): start over from offset 0.
                error!(partition, error = %e, "zone snapshot unusable; replaying the partition from its start");
                let (actor, _) = Actor::spawn(None, ZoneSupervisor, args(None))
                    .await
                    .expect("a zone supervisor without a snapshot starts");
                (actor, 0)
            }
        };
        info!(partition, next_offset = restored, "zone partition restored");
        self.owned
            .lock()
            .expect("not poisoned")
            .insert(partition, actor.clone());
        ZoneWorker {
            partition,
            handle: PartitionHandle::new(actor, IN_FLIGHT),
            snapshots: self.snapshots.clone(),
            dead_letters: self.dead_letters.clone(),
            owned: Arc::clone(&self.owned),
            next_offset: restored,
            sent_offset: restored,
            snapshotted: restored,
        }
    }
}

impl ZoneWorker {
    async fn send_events(&mut self, events: Vec<RoutedEvent>, next_offset: i64) {
        let sent = self
            .handle
            .send(|permit| ZoneSupervisorMsg::Batch {
                events,
                next_offset: next_offset as u64,
                permit: Some(permit),
                done: None,
            })
            .await;
        if sent.is_err() {
            error!(partition = self.partition, "zone supervisor is gone");
        }
        self.sent_offset = next_offset;
    }
}

impl PartitionWorker for ZoneWorker {
    async fn handle(&mut self, records: Vec<Record>) {
        let mut events: Vec<RoutedEvent> = Vec::new();
        for record in records {
            // Covered by the snapshot the partition was restored from.
            if record.offset < self.next_offset {
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
                        .send(self.partition, &record, &e.to_string())
                        .await
                }
            }
            self.next_offset = record.offset + 1;
        }
        if !events.is_empty() || self.sent_offset < self.next_offset {
            self.send_events(events, self.next_offset).await;
        }
    }

    async fn checkpoint(&mut self) -> Option<i64> {
        if self.next_offset == self.snapshotted {
            return None;
        }
        let blob = store_snapshot(
            &self.snapshots,
            Stage::Zones,
            self.partition,
            self.handle.actor(),
            ZoneSupervisorMsg::Snapshot,
        )
        .await?;
        self.snapshotted = blob.next_offset as i64;
        Some(self.snapshotted)
    }

    async fn close(self) {
        self.owned
            .lock()
            .expect("not poisoned")
            .remove(&self.partition);
        self.handle.actor().stop(None);
    }
}

/// Stage two: a person partition's worker factory.
pub struct PersonStage {
    pub params: EngineParams,
    pub zone_partitions: u32,
    pub passivate_after_s: u32,
    pub connections: Arc<PgConnections>,
    pub snapshots: PgSnapshots,
    pub dead_letters: DeadLetters,
    pub owned: Owned<PersonSupervisorMsg>,
}

pub struct PersonWorker {
    partition: i32,
    handle: PartitionHandle<PersonSupervisorMsg>,
    snapshots: PgSnapshots,
    dead_letters: DeadLetters,
    owned: Owned<PersonSupervisorMsg>,
    next_offset: i64,
    snapshotted: i64,
}

impl WorkerFactory for PersonStage {
    type Worker = PersonWorker;

    async fn open(&self, partition: i32) -> PersonWorker {
        let blob = load_snapshot(&self.snapshots, Stage::Persons, partition).await;
        let restored = blob.as_ref().map_or(0, |b| b.next_offset as i64);
        let args = |snapshot| PersonSupervisorArgs {
            partition: partition as u32,
            params: self.params,
            zone_partitions: self.zone_partitions,
            connections: self.connections.clone(),
            passivate_after_s: self.passivate_after_s,
            capture: false,
            snapshot,
        };
        let (actor, restored) = match Actor::spawn(None, PersonSupervisor, args(blob)).await {
            Ok((actor, _)) => (actor, restored),
            Err(e) => {
                error!(partition, error = %e, "person snapshot unusable; replaying the partition from its start");
                let (actor, _) = Actor::spawn(None, PersonSupervisor, args(None))
                    .await
                    .expect("a person supervisor without a snapshot starts");
                (actor, 0)
            }
        };
        info!(
            partition,
            next_offset = restored,
            "person partition restored"
        );
        self.owned
            .lock()
            .expect("not poisoned")
            .insert(partition, actor.clone());
        PersonWorker {
            partition,
            handle: PartitionHandle::new(actor, IN_FLIGHT),
            snapshots: self.snapshots.clone(),
            dead_letters: self.dead_letters.clone(),
            owned: Arc::clone(&self.owned),
            next_offset: restored,
            snapshotted: restored,
        }
    }
}

impl PartitionWorker for PersonWorker {
    async fn handle(&mut self, records: Vec<Record>) {
        for record in records {
            if record.offset < self.next_offset {
                continue;
            }
            let batch = match codec::decode_person_batch(record.payload.as_deref()) {
                Ok(batch) => batch,
                Err(e) => {
                    self.dead_letters
                        .send(self.partition, &record, &e.to_string())
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
                .handle
                .send(|permit| PersonSupervisorMsg::Batch {
                    batch,
                    next_offset: (record.offset + 1) as u64,
                    permit: Some(permit),
                    done: None,
                })
                .await;
            if sent.is_err() {
                error!(partition = self.partition, "person supervisor is gone");
            }
            self.next_offset = record.offset + 1;
        }
    }

    async fn checkpoint(&mut self) -> Option<i64> {
        if self.next_offset == self.snapshotted {
            return None;
        }
        let blob = store_snapshot(
            &self.snapshots,
            Stage::Persons,
            self.partition,
            self.handle.actor(),
            PersonSupervisorMsg::Snapshot,
        )
        .await?;
        self.snapshotted = blob.next_offset as i64;
        Some(self.snapshotted)
    }

    async fn close(self) {
        self.owned
            .lock()
            .expect("not poisoned")
            .remove(&self.partition);
        self.handle.actor().stop(None);
    }
}
