//! The two stages' partition workers (docs/design.md §2): stage one feeds a partition's
//! `ZoneSupervisor` from the locations topic, stage two a `PersonSupervisor` from the
//! person-updates topic. The ports they emit to are implemented here with PostgreSQL and the
//! shared producer.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use udaconnect_actors::actors::person::{
    PersonSupervisor, PersonSupervisorArgs, PersonSupervisorMsg, WAVE,
};
use udaconnect_actors::actors::ports::{
    retry, ConnectionSink, LocationSink, PendingSnapshot, PersonUpdateSink, PortError,
    SnapshotBlob, Stage,
};
use udaconnect_actors::actors::zone::{ZoneSupervisor, ZoneSupervisorArgs, ZoneSupervisorMsg};
use udaconnect_actors::actors::PartitionHandle;
use udaconnect_actors::domain::{Micros, Notification};
use udaconnect_actors::messages::{EpisodeChange, LateCopy, PersonBatch, PersonSet, SeenCopy};
use udaconnect_actors::params::EngineParams;
use udaconnect_actors::zone_index::StoredCopy;
use udaconnect_actors::zones::person_partition;

use crate::kafka::{Broker, OutRecord, Producer};
use crate::metrics::{LocationCounters, MismatchLabels};
use crate::pipeline::codec::{self, LocationRecord};
use crate::pipeline::consumer::{Checkpoint, PartitionWorker, Record, WorkerFactory};
use crate::pipeline::erased::ErasedPersons;
use crate::pipeline::offsets::{self, OffsetMismatch};
use crate::store::connections::apply_changes;
use crate::store::locations::{late_partners, store_locations};
use crate::store::owners::PgOwners;
use crate::store::snapshots::{PgSnapshots, Stored};

/// How long a call to a supervisor may take (a snapshot of a big partition included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Batches in flight in front of a supervisor.
const IN_FLIGHT: usize = 4;

/// Home events into `location`, ghost copies into `halo_copy`; a report whose `event_id` a
/// different stored report holds goes to the locations dead-letter topic instead, with the
/// reason. Late copies' partners come from the same tables ([`late_partners`]).
pub struct PgLocations {
    pub pool: deadpool_postgres::Pool,
    /// The co-location rule's window and radius, for the late path's search.
    pub window_s: u32,
    pub radius_m: f64,
    /// Stored events, late copies and searches, reused ids.
    pub counters: LocationCounters,
    pub dead_letters: DeadLetters,
}

impl LocationSink for PgLocations {
    fn late_partners<'a>(
        &'a self,
        _partition: u32,
        late: &'a [LateCopy],
        before: i64,
    ) -> BoxFuture<'a, Result<Vec<Vec<StoredCopy>>, PortError>> {
        Box::pin(async move {
            let found = late_partners(&self.pool, late, before, self.window_s, self.radius_m)
                .await
                .map_err(PortError::of)?;
            self.counters.late_searches.inc();
            self.counters.late_copies.inc_by(late.len() as u64);
            Ok(found)
        })
    }

    fn store<'a>(
        &'a self,
        partition: u32,
        events: &'a [SeenCopy],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        Box::pin(async move {
            let stored = store_locations(&self.pool, events)
                .await
                .map_err(PortError::of)?;
            self.counters.stored.inc_by(stored.inserted);
            for r in &stored.id_reused {
                let e = &r.event;
                let reason = format!(
                    "event_id {} is already the id of a different report; this one (person {}, \
                     lat {}, lon {}, recorded_at {} µs) was acknowledged but is not stored",
                    e.event_id, e.person_id, e.lat, e.lon, e.recorded_at
                );
                let payload = crate::pipeline::codec::LocationRecord::Events(vec![*r]).encode();
                self.dead_letters
                    .send_payload(partition as i32, payload, &reason)
                    .await;
                self.counters.id_reused.inc();
            }
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
    fn publish<'a>(
        &'a self,
        batches: &'a [(u32, Arc<PersonBatch>)],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        Box::pin(async move {
            let mut records: Vec<OutRecord<'_>> = Vec::with_capacity(batches.len());
            for (q, batch) in batches {
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
                .map_err(PortError::of)
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

/// Episodes into `connection` (one transaction per write), and notifications into the
/// connections topic, packed: one record per connections partition per batch, the partition
/// chosen from the person ([`person_partition`] of the connections topic's count).
pub struct PgConnections {
    pub pool: deadpool_postgres::Pool,
    pub producer: Producer,
    pub topic: String,
    /// The connections topic's partition count.
    pub partitions: u32,
}

/// Notifications per connections record; a bigger batch is split (about 300 bytes each).
pub const MAX_NOTIFICATIONS_PER_RECORD: usize = 2_000;

impl ConnectionSink for PgConnections {
    fn store<'a>(
        &'a self,
        _partition: u32,
        changes: &'a [EpisodeChange],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        Box::pin(async move {
            apply_changes(&self.pool, changes)
                .await
                .map_err(PortError::of)
        })
    }

    fn publish<'a>(
        &'a self,
        _partition: u32,
        notifications: &'a [Notification],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        Box::pin(async move {
            let mut by_partition: BTreeMap<u32, Vec<&Notification>> = BTreeMap::new();
            for n in notifications {
                let p = person_partition(n.episode.person, self.partitions);
                by_partition.entry(p).or_default().push(n);
            }
            let mut records: Vec<OutRecord<'_>> = Vec::with_capacity(by_partition.len());
            for (p, ns) in &by_partition {
                for chunk in ns.chunks(MAX_NOTIFICATIONS_PER_RECORD) {
                    records.push(OutRecord {
                        topic: &self.topic,
                        partition: Some(*p as i32),
                        key: None,
                        payload: codec::encode_notifications(chunk),
                        headers: Vec::new(),
                    });
                }
            }
            self.producer
                .send_all(&records)
                .await
                .map_err(PortError::of)
        })
    }
}

/// Where a stage sends records it cannot read.
#[derive(Clone)]
pub struct DeadLetters {
    pub producer: Producer,
    pub source_topic: String,
    pub topic: String,
    /// Records sent, over both stages.
    pub count: Counter,
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
        let payload = record.payload.clone().unwrap_or_default();
        self.produce(partition, payload, reason, Some(record.offset))
            .await;
    }

    /// Produces `payload` (one event of a record, as the stage read it) to the dead-letter
    /// topic with the reason, retrying until the broker takes it.
    pub async fn send_payload(&self, partition: i32, payload: Vec<u8>, reason: &str) {
        warn!(
            topic = self.source_topic,
            partition, reason, "event sent to the dead-letter topic"
        );
        self.produce(partition, payload, reason, None).await;
    }

    async fn produce(&self, partition: i32, payload: Vec<u8>, reason: &str, offset: Option<i64>) {
        let mut headers = vec![
            ("reason", reason.to_owned()),
            ("source.topic", self.source_topic.clone()),
            ("source.partition", partition.to_string()),
        ];
        if let Some(offset) = offset {
            headers.push(("source.offset", offset.to_string()));
        }
        let out = [OutRecord {
            topic: &self.topic,
            partition: None,
            key: None,
            payload,
            headers,
        }];
        retry("dead-lettering", partition as u32, || {
            self.producer.send_all(&out)
        })
        .await;
        self.count.inc();
    }
}

/// The supervisors of the partitions this process owns, for status and admin views.
pub type Owned<M> = Arc<Mutex<BTreeMap<i32, ActorRef<M>>>>;

/// Where a stage keeps its partitions' snapshots and records their owners, and how it checks
/// a snapshot's offset against the log.
#[derive(Clone)]
pub struct PartitionStore {
    pub stage: Stage,
    /// The stage's input topic.
    pub topic: String,
    pub snapshots: PgSnapshots,
    pub owners: PgOwners,
    pub broker: Broker,
    /// What the restores of owned partitions found (for the status and the metrics).
    pub restores: Arc<Restores>,
    /// Snapshot stores given up because a release's budget ran out
    /// (`udaconnect_stage_snapshot_stores_abandoned_total`).
    pub abandoned: Counter,
    /// The erased persons, re-read from `erased_person` at each restore (on `pool`).
    pub erased: Arc<ErasedPersons>,
    pub pool: deadpool_postgres::Pool,
}

/// What a stage's restores found since this process started: each owned partition's restore,
/// until it is released, and the snapshot offsets the log contradicted, counted.
#[derive(Debug, Default)]
pub struct Restores {
    pub current: Mutex<BTreeMap<i32, Restored>>,
    /// How many were found, by stage and kind (`udaconnect_snapshot_offset_mismatches_total`).
    pub found: Family<MismatchLabels, Counter>,
}

/// How an owned partition was restored here: the snapshot offset the log contradicted, if it
/// did; when it started serving (a handover's end), and when it had replayed the records its
/// log held then (a replay's end: those after its snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub mismatch: Option<OffsetMismatch>,
    /// Restored from its snapshot and fetching, µs since the Unix epoch.
    pub restored_at_us: i64,
    /// When the records its log held at the restore had been handed to the partition's
    /// actors, µs since the Unix epoch; `None` until then.
    pub replayed_at_us: Option<i64>,
}

/// How long a restore waits for the broker's answer about a partition's log, per attempt.
const LOG_POSITION_TIMEOUT: Duration = Duration::from_secs(5);

/// Refreshes the owner row's heartbeat (best effort: the group decides ownership; the row
/// tells the cluster who owns what).
async fn confirm_owner(store: &PartitionStore, partition: i32) {
    let (stage, partition) = (store.stage, partition as u32);
    let heartbeat = store.owners.heartbeat(stage, partition);
    match tokio::time::timeout(Duration::from_secs(2), heartbeat).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(stage = stage.as_str(), partition, error = %e, "cannot confirm the partition's owner row")
        }
        Err(_) => {
            warn!(
                stage = stage.as_str(),
                partition, "confirming the partition's owner row timed out"
            )
        }
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
    snapshot_request: fn(ractor::RpcReplyPort<PendingSnapshot>) -> M,
    forget_request: ForgetRequest<M>,
    /// The offset after the last record handled.
    next_offset: i64,
    /// The offset the stored snapshot covers (-1: store one at the next checkpoint).
    snapshotted: i64,
    /// The id of the topic incarnation the partition reads, stored with each snapshot.
    topic_id: String,
    /// The log's end at the restore while the records before it are not all handled yet.
    replay_end: Option<i64>,
}

/// How a supervisor is asked to forget persons (`Forget` of either stage).
type ForgetRequest<M> = fn(PersonSet, ractor::RpcReplyPort<Result<u64, String>>) -> M;

impl<M: ractor::Message> PartitionCore<M> {
    /// Loads the partition's snapshot, checks its offset against the log (see
    /// [`offsets`](crate::pipeline::offsets)) and starts its supervisor from it (from nothing
    /// when there is none, or when it cannot be read: the partition then replays its log from
    /// the start).
    async fn restore<A>(
        partition: i32,
        store: &PartitionStore,
        owned: &Owned<M>,
        supervisor: impl Fn() -> A,
        args: impl Fn(Option<SnapshotBlob>) -> A::Arguments,
        snapshot_request: fn(ractor::RpcReplyPort<PendingSnapshot>) -> M,
        forget_request: ForgetRequest<M>,
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
        let (stored, _) = retry("loading the snapshot", partition_u32, || {
            store.snapshots.load(stage, partition_u32)
        })
        .await;
        let (log, _) = retry("reading the partition's log offsets", partition_u32, || {
            store
                .broker
                .log_position(&store.topic, partition, LOG_POSITION_TIMEOUT)
        })
        .await;
        let (mut blob, snapshot_topic_id) = match stored {
            Some((blob, topic_id)) => (Some(blob), topic_id),
            None => (None, None),
        };
        let snapshot_offset = blob.as_ref().map_or(0, |b| b.next_offset as i64);
        let (mut start, mut mismatch) =
            offsets::start_offset(snapshot_offset, snapshot_topic_id.as_deref(), &log);
        if let Some(b) = blob.as_mut() {
            b.next_offset = start as u64;
        }
        let actor = match Actor::spawn(None, supervisor(), args(blob)).await {
            Ok((actor, _)) => actor,
            Err(e) => {
                // An unreadable snapshot (another version's format): start over from the log's
                // start.
                error!(stage = stage.as_str(), partition, error = %e, "snapshot unusable; replaying the partition from its start");
                (start, mismatch) = offsets::start_offset(0, None, &log);
                let (actor, _) = Actor::spawn(None, supervisor(), args(None))
                    .await
                    .expect("a supervisor without a snapshot starts");
                actor
            }
        };
        if let Some(m) = &mismatch {
            error!(
                stage = stage.as_str(),
                partition,
                kind = m.kind.as_str(),
                snapshot_offset = m.snapshot_offset,
                log_start = m.log_start,
                log_end = m.log_end,
                "snapshot offset contradicted by the log: {}",
                m.describe()
            );
            store
                .restores
                .found
                .get_or_create(&MismatchLabels {
                    stage: stage.as_str(),
                    kind: m.kind.as_str(),
                })
                .inc();
        }
        info!(
            stage = stage.as_str(),
            partition,
            next_offset = start,
            log_start = log.start,
            log_end = log.end,
            "partition restored"
        );
        let restored_at_us = chrono::Utc::now().timestamp_micros();
        store.restores.current.lock().expect("not poisoned").insert(
            partition,
            Restored {
                mismatch: mismatch.clone(),
                restored_at_us,
                replayed_at_us: (start >= log.end).then_some(restored_at_us),
            },
        );
        owned
            .lock()
            .expect("not poisoned")
            .insert(partition, actor.clone());
        let mut core = Self {
            replay_end: (start < log.end).then_some(log.end),
            stage,
            partition,
            handle: PartitionHandle::new(actor, IN_FLIGHT),
            store: store.clone(),
            owned: Arc::clone(owned),
            snapshot_request,
            forget_request,
            next_offset: start,
            // A snapshot the log contradicted is replaced at the next checkpoint, so that the
            // stored one agrees with the log again.
            snapshotted: if mismatch.is_some() { -1 } else { start },
            topic_id: log.topic_id,
        };
        // Erasures the snapshot predates (another process erased while this one did not own
        // the partition): forgotten before the first record, and the snapshot replaced.
        retry("reading the erased persons", partition_u32, || async {
            store
                .erased
                .refresh(&store.pool)
                .await
                .map_err(PortError::of)
        })
        .await;
        let erased = store.erased.current();
        if !erased.is_empty() {
            let (held, _) = retry(
                "forgetting erased persons after the restore",
                partition_u32,
                || core.ask_forget(Arc::clone(&erased)),
            )
            .await;
            if held {
                core.snapshotted = -1;
                info!(
                    stage = stage.as_str(),
                    partition,
                    erased = erased.len(),
                    "erased persons forgotten after the restore"
                );
            }
        }
        core
    }

    /// Asks the supervisor to forget `persons` (after every batch sent before); whether it held
    /// any of them (the next checkpoint must then be taken whether records came or not: the
    /// caller marks it). Errors: the supervisor's, or its silence.
    async fn ask_forget(&self, persons: PersonSet) -> Result<bool, PortError> {
        let request = self.forget_request;
        let answer = self
            .handle
            .actor()
            .call(|reply| request(persons, reply), Some(CALL_TIMEOUT))
            .await;
        match answer {
            Ok(CallResult::Success(Ok(touched))) => Ok(touched > 0),
            Ok(CallResult::Success(Err(e))) => Err(PortError::new(e)),
            Ok(other) => Err(PortError::new(format!(
                "the supervisor did not answer the erasure ({})",
                match other {
                    CallResult::Timeout => "timed out",
                    _ => "stopped",
                }
            ))),
            Err(e) => Err(PortError::new(format!(
                "the supervisor did not take the erasure: {e}"
            ))),
        }
    }

    /// Notes when the records the log held at the restore have all been handled.
    fn note_replay(&mut self) {
        let Some(end) = self.replay_end else { return };
        if self.next_offset < end {
            return;
        }
        self.replay_end = None;
        let now = chrono::Utc::now().timestamp_micros();
        if let Some(t) = self
            .store
            .restores
            .current
            .lock()
            .expect("not poisoned")
            .get_mut(&self.partition)
        {
            t.replayed_at_us = Some(now);
        }
    }

    /// Captures a snapshot of the partition, unless nothing was handled since the last one,
    /// and returns the work that stores it (see [`PartitionWorker::begin_checkpoint`]; once
    /// `abandon` is cancelled the store gives up and the work yields `None`).
    async fn begin_checkpoint(&mut self, abandon: CancellationToken) -> Option<Checkpoint> {
        if self.next_offset == self.snapshotted {
            confirm_owner(&self.store, self.partition).await;
            return None;
        }
        // The supervisor answers after every batch sent before; the snapshot it hands back
        // finishes once their effects are durable.
        let began = std::time::Instant::now();
        let pending = match self
            .handle
            .actor()
            .call(self.snapshot_request, Some(CALL_TIMEOUT))
            .await
        {
            Ok(CallResult::Success(pending)) => pending,
            other => {
                error!(stage = self.stage.as_str(), partition = self.partition, result = ?other.map(|_| ()), "snapshot request failed");
                return None;
            }
        };
        let (store, partition, topic_id) =
            (self.store.clone(), self.partition, self.topic_id.clone());
        let captured = began.elapsed();
        Some(Box::pin(async move {
            let stage = store.stage;
            let blob = match pending.wait().await {
                Ok(blob) => blob,
                Err(e) => {
                    error!(stage = stage.as_str(), partition, error = %e, "snapshot failed");
                    return None;
                }
            };
            let serialized = began.elapsed();
            let (stored, _) = retry("storing the snapshot", partition as u32, || {
                store
                    .snapshots
                    .store(stage, partition as u32, &blob, &topic_id, &abandon)
            })
            .await;
            if stored == Stored::Abandoned {
                store.abandoned.inc();
                warn!(
                    stage = stage.as_str(),
                    partition,
                    bytes = blob.serialized_len(),
                    parts = blob.parts.len(),
                    serialized_ms = serialized.as_millis() as u64,
                    abandoned_ms = began.elapsed().as_millis() as u64,
                    "snapshot not stored within the release's budget; the next owner replays from the last stored one"
                );
                return None;
            }
            if stored == Stored::Superseded {
                warn!(
                    stage = stage.as_str(),
                    partition,
                    "snapshot not stored: the partition's owner row names another process, which took the partition over; its snapshot stays"
                );
                return None;
            }
            debug!(
                stage = stage.as_str(),
                partition,
                bytes = blob.serialized_len(),
                parts = blob.parts.len(),
                captured_ms = captured.as_millis() as u64,
                serialized_ms = serialized.as_millis() as u64,
                stored_ms = began.elapsed().as_millis() as u64,
                "snapshot stored"
            );
            confirm_owner(&store, partition).await;
            Some(blob.next_offset as i64)
        }))
    }

    /// Stops the supervisor and removes the partition's owner row (best effort: the next
    /// owner replaces it anyway).
    async fn close(self) {
        self.owned
            .lock()
            .expect("not poisoned")
            .remove(&self.partition);
        self.store
            .restores
            .current
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

/// What a stage does with one partition's records; the rest of a worker (restore, offsets,
/// checkpoints, close) is [`Worker`]'s, shared by both stages.
pub trait StageRecords: Send + Sync + Sized + 'static {
    /// The partition supervisor's message.
    type Msg: ractor::Message;
    /// Decodes `records` (those a restored snapshot covers are skipped), dead-letters what
    /// cannot be read, and hands the rest to the partition's supervisor.
    fn handle(worker: &mut Worker<Self>, records: Vec<Record>) -> impl Future<Output = ()> + Send;
}

/// One assigned partition of a stage: its supervisor and offsets, and where unreadable records
/// go.
pub struct Worker<S: StageRecords> {
    core: PartitionCore<S::Msg>,
    dead_letters: DeadLetters,
    /// The offset the supervisor has been told about.
    sent_offset: i64,
}

impl<S: StageRecords> Worker<S> {
    fn new(core: PartitionCore<S::Msg>, dead_letters: DeadLetters) -> Self {
        Self {
            sent_offset: core.next_offset,
            core,
            dead_letters,
        }
    }

    /// Sends `record` to the dead-letter topic with `reason`.
    async fn dead_letter(&self, record: &Record, reason: &str) {
        self.dead_letters
            .send(self.core.partition, record, reason)
            .await;
    }
}

impl<S: StageRecords> PartitionWorker for Worker<S> {
    fn start_offset(&self) -> i64 {
        self.core.next_offset
    }

    async fn handle(&mut self, records: Vec<Record>) {
        S::handle(self, records).await;
        self.core.note_replay();
    }

    async fn begin_checkpoint(&mut self, abandon: CancellationToken) -> Option<Checkpoint> {
        self.core.begin_checkpoint(abandon).await
    }

    fn checkpoint_stored(&mut self, offset: i64) {
        self.core.snapshotted = offset;
    }

    async fn forget(&mut self, persons: &PersonSet) -> Result<(), String> {
        let held = self
            .core
            .ask_forget(Arc::clone(persons))
            .await
            .map_err(|e| e.to_string())?;
        if held {
            self.core.snapshotted = -1;
        }
        Ok(())
    }

    async fn close(self) {
        self.core.close().await;
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

/// Stage one's records: routed event copies and heartbeats.
pub enum ZoneRecords {}

impl WorkerFactory for ZoneStage {
    type Worker = Worker<ZoneRecords>;

    async fn open(&self, partition: i32) -> Worker<ZoneRecords> {
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
            |reply| ZoneSupervisorMsg::Snapshot {
                complete: false,
                reply,
            },
            |persons, reply| ZoneSupervisorMsg::Forget { persons, reply },
        )
        .await;
        Worker::new(core, self.dead_letters.clone())
    }
}

impl Worker<ZoneRecords> {
    async fn send_events(&mut self, events: Vec<SeenCopy>, next_offset: i64) {
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

impl StageRecords for ZoneRecords {
    type Msg = ZoneSupervisorMsg;

    async fn handle(worker: &mut Worker<Self>, records: Vec<Record>) {
        let erased = worker.core.store.erased.current();
        let mut events: Vec<SeenCopy> = Vec::new();
        for record in records {
            // Covered by the snapshot the partition was restored from.
            if record.offset < worker.core.next_offset {
                continue;
            }
            match LocationRecord::decode(record.payload.as_deref()) {
                Ok(LocationRecord::Events(copies)) => {
                    let seq = record.offset;
                    events.extend(
                        copies
                            .into_iter()
                            .filter(|c| !erased.contains(&c.event.person_id))
                            .map(|routed| SeenCopy { routed, seq }),
                    );
                }
                Ok(LocationRecord::Heartbeat { max_event_time }) => {
                    if !events.is_empty() {
                        worker
                            .send_events(std::mem::take(&mut events), record.offset)
                            .await;
                    }
                    let next_offset = (record.offset + 1) as u64;
                    let _ = worker
                        .core
                        .handle
                        .send(|permit| ZoneSupervisorMsg::Advance {
                            max_event_time,
                            next_offset,
                            permit: Some(permit),
                            done: None,
                        })
                        .await;
                    worker.sent_offset = record.offset + 1;
                }
                Err(e) => worker.dead_letter(&record, &e.to_string()).await,
            }
            worker.core.next_offset = record.offset + 1;
        }
        if !events.is_empty() || worker.sent_offset < worker.core.next_offset {
            worker.send_events(events, worker.core.next_offset).await;
        }
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

/// Stage two's records: per-person batches of co-locations and sightings.
pub enum PersonRecords {}

impl WorkerFactory for PersonStage {
    type Worker = Worker<PersonRecords>;

    async fn open(&self, partition: i32) -> Worker<PersonRecords> {
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
                wave: WAVE,
            },
            |reply| PersonSupervisorMsg::Snapshot {
                complete: false,
                reply,
            },
            |persons, reply| PersonSupervisorMsg::Forget { persons, reply },
        )
        .await;
        Worker::new(core, self.dead_letters.clone())
    }
}

impl StageRecords for PersonRecords {
    type Msg = PersonSupervisorMsg;

    async fn handle(worker: &mut Worker<Self>, records: Vec<Record>) {
        // The records taken together go to the supervisor as one message: one write of
        // their episode changes and one publish of their notifications.
        let erased = worker.core.store.erased.current();
        let mut batches = Vec::with_capacity(records.len());
        for record in records {
            if record.offset < worker.core.next_offset {
                continue;
            }
            match codec::decode_person_batch(record.payload.as_deref()) {
                Ok(mut batch) => {
                    if !erased.is_empty() {
                        batch.updates.retain(|u| !u.involves_any(&erased));
                    }
                    batches.push(Arc::new(batch))
                }
                Err(e) => {
                    worker.dead_letter(&record, &e.to_string()).await;
                }
            }
            worker.core.next_offset = record.offset + 1;
        }
        if batches.is_empty() && worker.core.next_offset <= worker.sent_offset {
            return;
        }
        let next_offset = worker.core.next_offset;
        let sent = worker
            .core
            .handle
            .send(|permit| PersonSupervisorMsg::Batch {
                batches,
                next_offset: next_offset as u64,
                permit: Some(permit),
                done: None,
            })
            .await;
        if sent.is_err() {
            error!(
                partition = worker.core.partition,
                "person supervisor is gone"
            );
        }
        worker.sent_offset = next_offset;
    }
}
