//! The Kafka pipeline (docs/design.md §2, §4, §5): ingest → locations topic → zone stage →
//! person-updates
//! topic → person stage → `connection` + connections topic, with snapshots and at-least-once,
//! idempotent effects.

pub mod codec;
pub mod consumer;
pub mod hub;
pub mod ingest;
pub mod live;
pub mod offsets;
pub mod stages;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use ractor::rpc::CallResult;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use tokio::sync::{watch, Mutex};
use tracing::warn;
use udaconnect_actors::actors::person::{PersonPartitionView, PersonSupervisorMsg};
use udaconnect_actors::actors::ports::Stage;
use udaconnect_actors::actors::zone::{ZonePartitionView, ZoneSupervisorMsg};

use crate::config::Config;
use crate::kafka::{client_config, Broker, Producer};
use crate::metrics::{Exposition, Kind};
use crate::pipeline::consumer::{StageConsumer, StageCounters, StageOptions};
use crate::pipeline::hub::{HubCounters, NotificationHub};
use crate::pipeline::ingest::Ingestor;
use crate::pipeline::offsets::{MismatchKind, OffsetMismatch};
use crate::pipeline::stages::{
    DeadLetters, KafkaPersonUpdates, OffsetMismatches, Owned, PartitionStore, PersonStage,
    PgConnections, PgLocations, ZoneStage,
};
use crate::store::pipeline::{shard_owners, PgOwners, PgSnapshots, ShardOwner};

/// Consumer group of stage one.
pub const ZONES_GROUP: &str = "udaconnect-zones";
/// Consumer group of stage two.
pub const PERSONS_GROUP: &str = "udaconnect-persons";

/// One partition of a stage owned by this process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The offset after the last record whose effects are done; -1 when the supervisor did
    /// not answer.
    pub processed_offset: i64,
    /// The topic's end offset (high watermark); -1 when the broker did not answer.
    pub end_offset: i64,
    /// `end_offset - processed_offset`, unclamped (negative when the log ends before what was
    /// processed); `None` when either is unknown.
    pub lag: Option<i64>,
    /// The snapshot offset the log contradicted when the partition was restored, if it did.
    pub snapshot_mismatch: Option<OffsetMismatch>,
    /// The partition's live figures (from its supervisor's view).
    #[serde(flatten)]
    pub figures: PartitionFigures,
}

/// What a partition's supervisor reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PartitionFigures {
    /// Zone actors (zones stage) or active person actors (persons stage).
    pub actors: u64,
    /// Passivated persons (state kept, no actor running).
    pub passivated: u64,
    /// Event-time watermark, µs since the epoch (the minimum over the zone partitions for the
    /// persons stage).
    pub watermark: i64,
    /// Counters since the partition was assigned here, by name.
    pub counters: BTreeMap<&'static str, u64>,
}

impl PartitionFigures {
    fn of_zones(v: &ZonePartitionView) -> Self {
        Self {
            actors: v.zones.len() as u64,
            passivated: 0,
            watermark: v.watermark,
            counters: BTreeMap::from([
                ("batches", v.counters.batches),
                ("events", v.counters.events),
                ("late_events", v.counters.late),
                ("panics", v.supervision.panics),
                ("restarts", v.supervision.restarts),
                ("port_retries", v.port_retries),
            ]),
        }
    }

    fn of_persons(v: &PersonPartitionView) -> Self {
        Self {
            actors: v.active_persons as u64,
            passivated: v.passivated_persons as u64,
            watermark: v.watermarks.iter().copied().min().unwrap_or(i64::MIN),
            counters: BTreeMap::from([
                ("batches", v.counters.batches),
                ("updates", v.counters.updates),
                ("colocations", v.counters.colocations),
                ("episode_changes", v.counters.changes),
                ("notifications", v.counters.notifications),
                ("passivations", v.counters.passivations),
                ("activations", v.counters.activations),
                ("panics", v.supervision.panics),
                ("restarts", v.supervision.restarts),
                ("port_retries", v.port_retries),
            ]),
        }
    }
}

/// One stage's partitions in this process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageStatus {
    pub stage: &'static str,
    pub topic: String,
    pub partitions: Vec<PartitionStatus>,
    /// Records handed to workers, and time blocked on full worker channels.
    pub records: u64,
    pub backpressure_s: f64,
}

/// The pipeline as this process sees it, and the cluster's owners as `shard_owner` says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineStatus {
    /// This process's name (`shard_owner.owner`).
    pub node: String,
    pub stages: Vec<StageStatus>,
    /// The sum of the owned partitions' positive lags: records not processed yet.
    pub lag_total: i64,
    pub dead_letters: u64,
    pub locations_stored: u64,
    /// Every owned partition of both stages in the cluster, with its snapshot's offset and
    /// age; empty with `owners_error` set when PostgreSQL did not answer.
    pub owners: Vec<ShardOwner>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owners_error: Option<String>,
    pub hub: HubCounters,
}

/// Both stages, the ingestor and its heartbeats, running in this process.
pub struct Pipeline {
    ingestor: Arc<Ingestor>,
    zones: Mutex<Option<StageConsumer>>,
    persons: Mutex<Option<StageConsumer>>,
    zone_owned: Owned<ZoneSupervisorMsg>,
    person_owned: Owned<PersonSupervisorMsg>,
    zone_counters: Arc<StageCounters>,
    person_counters: Arc<StageCounters>,
    zone_mismatches: Arc<OffsetMismatches>,
    person_mismatches: Arc<OffsetMismatches>,
    hub: Arc<NotificationHub>,
    node: String,
    pool: Pool,
    probe: Arc<BaseConsumer>,
    topics: crate::config::Topics,
    dead_letters: Arc<AtomicU64>,
    locations: Arc<PgLocations>,
    shutdown: watch::Sender<bool>,
    heartbeats: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    zone_partitions: u32,
    person_partitions: u32,
}

/// How often each partition snapshots while records flow.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);
/// How often the ingest side sends a heartbeat while event time moves.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

impl Pipeline {
    /// Starts the producer, the ingestor and both stage consumers. The topics must exist.
    pub async fn start(config: &Config, pool: Pool, broker: &Broker) -> anyhow::Result<Self> {
        let topics = config.topics();
        let count = |name: String| async move {
            broker
                .partition_count(&name, Duration::from_secs(10))
                .await
                .context("failed to read topic metadata")?
                .with_context(|| format!("topic {name} does not exist"))
        };
        let zone_partitions = count(topics.locations.clone()).await?;
        let person_partitions = count(topics.person_updates.clone()).await?;
        let connection_partitions = count(topics.connections.clone()).await?;
        let producer = Producer::new(config).context("failed to create the kafka producer")?;
        let params = config.engine_params();
        let dead_letters = Arc::new(AtomicU64::new(0));
        let locations = Arc::new(PgLocations {
            pool: pool.clone(),
            window_s: params.window_s,
            radius_m: params.radius_m,
            late_copies: AtomicU64::new(0),
            late_searches: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            id_reused: AtomicU64::new(0),
            dead_letters: DeadLetters {
                producer: producer.clone(),
                source_topic: topics.locations.clone(),
                topic: topics.locations_dlq.clone(),
                count: Arc::clone(&dead_letters),
            },
        });
        let node = config.node();
        // Where peers reach this process's gRPC server (start-up fills in the bound address).
        let owner_addr = config
            .grpc_advertise_addr
            .clone()
            .unwrap_or_else(|| config.grpc_addr.to_string());
        let zone_mismatches = Arc::new(OffsetMismatches::default());
        let person_mismatches = Arc::new(OffsetMismatches::default());
        let store =
            |stage: Stage, topic: &str, mismatches: &Arc<OffsetMismatches>| PartitionStore {
                stage,
                topic: topic.to_owned(),
                snapshots: PgSnapshots::new(pool.clone(), topic),
                owners: PgOwners::new(pool.clone(), topic, &node, &owner_addr),
                broker: broker.clone(),
                mismatches: Arc::clone(mismatches),
            };
        let zone_owned: Owned<ZoneSupervisorMsg> = Arc::default();
        let person_owned: Owned<PersonSupervisorMsg> = Arc::default();
        let zone_stage = ZoneStage {
            params,
            person_partitions,
            locations: Arc::clone(&locations),
            updates: Arc::new(KafkaPersonUpdates {
                producer: producer.clone(),
                topic: topics.person_updates.clone(),
            }),
            store: store(Stage::Zones, &topics.locations, &zone_mismatches),
            dead_letters: DeadLetters {
                producer: producer.clone(),
                source_topic: topics.locations.clone(),
                topic: topics.locations_dlq.clone(),
                count: Arc::clone(&dead_letters),
            },
            owned: Arc::clone(&zone_owned),
        };
        let person_stage = PersonStage {
            params,
            zone_partitions,
            passivate_after_s: config.episode_gap_s.saturating_mul(2),
            connections: Arc::new(PgConnections {
                pool: pool.clone(),
                producer: producer.clone(),
                topic: topics.connections.clone(),
                partitions: connection_partitions,
            }),
            store: store(Stage::Persons, &topics.person_updates, &person_mismatches),
            dead_letters: DeadLetters {
                producer: producer.clone(),
                source_topic: topics.person_updates.clone(),
                topic: topics.person_updates_dlq.clone(),
                count: Arc::clone(&dead_letters),
            },
            owned: Arc::clone(&person_owned),
        };
        // Started first, so it reads every notification the stages produce from now on.
        let hub = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || NotificationHub::start(&config))
                .await
                .context("the notification hub's start panicked")?
                .context("failed to start the notification hub")?
        };
        let group = |base: &str| format!("{}.{base}", config.topic_prefix);
        let persons = StageConsumer::start(
            config,
            StageOptions {
                stage: "persons",
                group: group(PERSONS_GROUP),
                topic: topics.person_updates.clone(),
                snapshot_interval: SNAPSHOT_INTERVAL,
            },
            Arc::new(person_stage),
        )
        .context("failed to start the persons stage")?;
        let zones = StageConsumer::start(
            config,
            StageOptions {
                stage: "zones",
                group: group(ZONES_GROUP),
                topic: topics.locations.clone(),
                snapshot_interval: SNAPSHOT_INTERVAL,
            },
            Arc::new(zone_stage),
        )
        .context("failed to start the zones stage")?;
        let ingestor = Arc::new(Ingestor::new(
            config,
            producer,
            pool.clone(),
            zone_partitions,
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let heartbeats = ingestor.spawn_heartbeats(HEARTBEAT_INTERVAL, shutdown_rx);
        let probe: BaseConsumer = client_config(config)
            .create()
            .context("failed to create the kafka probe")?;
        Ok(Self {
            ingestor,
            zone_counters: Arc::clone(zones.counters()),
            person_counters: Arc::clone(persons.counters()),
            zone_mismatches,
            person_mismatches,
            zones: Mutex::new(Some(zones)),
            persons: Mutex::new(Some(persons)),
            zone_owned,
            person_owned,
            hub: Arc::new(hub),
            node,
            pool,
            probe: Arc::new(probe),
            topics,
            dead_letters,
            locations,
            shutdown,
            heartbeats: std::sync::Mutex::new(Some(heartbeats)),
            zone_partitions,
            person_partitions,
        })
    }

    /// The ingest side.
    pub fn ingestor(&self) -> &Arc<Ingestor> {
        &self.ingestor
    }

    /// The process's notification hub (live streams subscribe to it).
    pub fn hub(&self) -> &Arc<NotificationHub> {
        &self.hub
    }

    /// Stops fetching one partition of a stage (operations; the tests of watermark alignment).
    pub async fn pause(&self, stage: Stage, partition: i32) {
        if let Some(c) = self.stage(stage).lock().await.as_ref() {
            c.pause(partition).await;
        }
    }

    /// Fetches a paused partition again.
    pub async fn resume(&self, stage: Stage, partition: i32) {
        if let Some(c) = self.stage(stage).lock().await.as_ref() {
            c.resume(partition).await;
        }
    }

    fn stage(&self, stage: Stage) -> &Mutex<Option<StageConsumer>> {
        match stage {
            Stage::Zones => &self.zones,
            Stage::Persons => &self.persons,
        }
    }

    async fn end_offset(&self, topic: &str, partition: i32) -> i64 {
        let probe = Arc::clone(&self.probe);
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            probe
                .fetch_watermarks(&topic, partition, Duration::from_secs(5))
                .map(|(_, high)| high)
                .unwrap_or(-1)
        })
        .await
        .unwrap_or(-1)
    }

    /// The owned partitions of one stage, with the offset each supervisor has processed.
    async fn stage_status<M: ractor::Message, V: Send + 'static>(
        &self,
        stage: &'static str,
        topic: &str,
        (owned, counters, mismatches): (&Owned<M>, &StageCounters, &OffsetMismatches),
        view: fn(ractor::RpcReplyPort<V>) -> M,
        read: fn(&V) -> (u64, PartitionFigures),
    ) -> StageStatus {
        let actors: Vec<_> = owned
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        let mut partitions = Vec::new();
        for (p, actor) in actors {
            let (processed, figures) = match actor.call(view, Some(Duration::from_secs(30))).await {
                Ok(CallResult::Success(v)) => {
                    let (next, figures) = read(&v);
                    (next as i64, figures)
                }
                _ => (-1, PartitionFigures::default()),
            };
            let end = self.end_offset(topic, p).await;
            let mismatch = mismatches
                .current
                .lock()
                .expect("not poisoned")
                .get(&p)
                .cloned();
            partitions.push(PartitionStatus {
                partition: p,
                processed_offset: processed,
                end_offset: end,
                lag: (end >= 0 && processed >= 0).then_some(end - processed),
                snapshot_mismatch: mismatch,
                figures,
            });
        }
        StageStatus {
            stage,
            topic: topic.to_owned(),
            partitions,
            records: counters.records.load(Ordering::Relaxed),
            backpressure_s: counters.backpressure_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// Owned partitions of both stages with processed and end offsets.
    pub async fn status(&self) -> PipelineStatus {
        let stages = vec![
            self.stage_status(
                "zones",
                &self.topics.locations,
                (&self.zone_owned, &self.zone_counters, &self.zone_mismatches),
                ZoneSupervisorMsg::View,
                |v| (v.next_offset, PartitionFigures::of_zones(v)),
            )
            .await,
            self.stage_status(
                "persons",
                &self.topics.person_updates,
                (
                    &self.person_owned,
                    &self.person_counters,
                    &self.person_mismatches,
                ),
                PersonSupervisorMsg::View,
                |v| (v.next_offset, PartitionFigures::of_persons(v)),
            )
            .await,
        ];
        let topics = [
            self.topics.locations.as_str(),
            self.topics.person_updates.as_str(),
        ];
        let (owners, owners_error) =
            match tokio::time::timeout(Duration::from_secs(2), shard_owners(&self.pool, &topics))
                .await
            {
                Ok(Ok(owners)) => (owners, None),
                Ok(Err(e)) => (Vec::new(), Some(e.to_string())),
                Err(_) => (
                    Vec::new(),
                    Some("postgres did not answer within 2s".to_owned()),
                ),
            };
        let lag_total = stages
            .iter()
            .flat_map(|s| &s.partitions)
            .filter_map(|p| p.lag)
            .map(|lag| lag.max(0))
            .sum();
        PipelineStatus {
            node: self.node.clone(),
            stages,
            lag_total,
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
            locations_stored: self
                .locations
                .stored
                .load(std::sync::atomic::Ordering::Relaxed),
            owners,
            owners_error,
            hub: self.hub.counters(),
        }
    }

    /// Stops heartbeats and both stages; every owned partition is flushed, snapshotted and
    /// committed first.
    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        let heartbeats = self.heartbeats.lock().expect("not poisoned").take();
        if let Some(h) = heartbeats {
            let _ = h.await;
        }
        if let Some(zones) = self.zones.lock().await.take() {
            zones.stop().await;
        }
        if let Some(persons) = self.persons.lock().await.take() {
            persons.stop().await;
        }
        self.hub.stop().await;
    }
}

/// Help texts of the per-partition counters in `/metrics`.
const PARTITION_COUNTERS: [(&str, &str); 12] = [
    ("batches", "Batches the partition's supervisor handled"),
    (
        "events",
        "Routed event copies (home and halo) the zone partition handled",
    ),
    (
        "late_events",
        "Event copies that arrived later than the watermark (matched by the late path against the copies their zone saw before)",
    ),
    ("updates", "Per-person updates the person partition handled"),
    (
        "colocations",
        "Co-locations accepted by the person partition (repeats excluded)",
    ),
    (
        "episode_changes",
        "Episode changes (opened, grown, reshaped, closed) written to connection",
    ),
    (
        "notifications",
        "Notifications produced to the connections topic",
    ),
    ("passivations", "Person actors passivated"),
    ("activations", "Person actors activated"),
    ("panics", "Actor panics"),
    ("restarts", "Actor restarts after a panic"),
    (
        "port_retries",
        "Retries of a failed effect (PostgreSQL or the broker away)",
    ),
];

impl Pipeline {
    /// This process's metrics in the Prometheus text format.
    pub async fn prometheus(&self) -> String {
        let status = self.status().await;
        let mut out = Exposition::default();
        let ingest = self.ingestor.counters();
        out.family(
            "udaconnect_ingest_events_total",
            Kind::Counter,
            "Location events the ingest path accepted (acknowledged by the broker) or rejected",
        )
        .sample(
            "udaconnect_ingest_events_total",
            &[("result", "accepted")],
            ingest.accepted.load(Ordering::Relaxed) as f64,
        )
        .sample(
            "udaconnect_ingest_events_total",
            &[("result", "rejected")],
            ingest.rejected.load(Ordering::Relaxed) as f64,
        );
        out.family(
            "udaconnect_ingest_untrusted_times_total",
            Kind::Counter,
            "Accepted reports not trusted to move event time as far as their recorded_at, per \
             reason (ahead_of_clock: stamped more than clock_skew_s ahead of their receive time)",
        )
        .sample(
            "udaconnect_ingest_untrusted_times_total",
            &[("reason", "ahead_of_clock")],
            ingest.ahead_of_clock.load(Ordering::Relaxed) as f64,
        );
        out.family(
            "udaconnect_event_id_reused_total",
            Kind::Counter,
            "Reports whose event_id was already a different report's: refused at ingest (409), \
             or dead-lettered by the zone stage when ingest did not know the first",
        )
        .sample(
            "udaconnect_event_id_reused_total",
            &[("stage", "ingest")],
            ingest.id_reused.load(Ordering::Relaxed) as f64,
        )
        .sample(
            "udaconnect_event_id_reused_total",
            &[("stage", "zones")],
            self.locations.id_reused.load(Ordering::Relaxed) as f64,
        );
        out.family(
            "udaconnect_late_searches_total",
            Kind::Counter,
            "Searches of the stored copies for late copies (one per zone batch that has any)",
        )
        .sample(
            "udaconnect_late_searches_total",
            &[],
            self.locations.late_searches.load(Ordering::Relaxed) as f64,
        );
        out.family(
            "udaconnect_late_copies_searched_total",
            Kind::Counter,
            "Late copies matched against the copies their zone saw before them (the late path)",
        )
        .sample(
            "udaconnect_late_copies_searched_total",
            &[],
            self.locations.late_copies.load(Ordering::Relaxed) as f64,
        );
        out.family(
            "udaconnect_ingest_records_total",
            Kind::Counter,
            "Records produced to the locations topic",
        )
        .sample(
            "udaconnect_ingest_records_total",
            &[],
            ingest.records.load(Ordering::Relaxed) as f64,
        );
        out.family(
            "udaconnect_ingest_copies_per_record",
            Kind::Histogram,
            "Routed event copies packed into one locations record",
        )
        .histogram(
            "udaconnect_ingest_copies_per_record",
            &[],
            &ingest.copies_per_record.read(),
        );

        let stage_counters = [
            ("zones", &self.zone_counters),
            ("persons", &self.person_counters),
        ];
        out.family(
            "udaconnect_stage_records_total",
            Kind::Counter,
            "Kafka records a stage handed to its partition workers",
        );
        for (stage, c) in &stage_counters {
            out.sample(
                "udaconnect_stage_records_total",
                &[("stage", stage)],
                c.records.load(Ordering::Relaxed) as f64,
            );
        }
        out.family(
            "udaconnect_stage_backpressure_seconds_total",
            Kind::Counter,
            "Time a stage's poll thread waited for room in a partition worker's bounded channel",
        );
        for (stage, c) in &stage_counters {
            out.sample(
                "udaconnect_stage_backpressure_seconds_total",
                &[("stage", stage)],
                c.backpressure_us.load(Ordering::Relaxed) as f64 / 1e6,
            );
        }
        out.family(
            "udaconnect_snapshot_offset_mismatches_total",
            Kind::Counter,
            "Snapshot offsets the log contradicted when a partition was restored (the topic \
             recreated, the log ending before the offset or starting after it), by kind",
        );
        for (stage, mismatches) in [
            ("zones", &self.zone_mismatches),
            ("persons", &self.person_mismatches),
        ] {
            let found = mismatches.found.lock().expect("not poisoned").clone();
            for kind in [
                MismatchKind::OtherTopicId,
                MismatchKind::AboveEnd,
                MismatchKind::BelowStart,
            ] {
                out.sample(
                    "udaconnect_snapshot_offset_mismatches_total",
                    &[("stage", stage), ("kind", kind.as_str())],
                    found.get(kind.as_str()).copied().unwrap_or(0) as f64,
                );
            }
        }
        out.family(
            "udaconnect_stage_batch_records",
            Kind::Histogram,
            "Kafka records per batch a partition worker handled",
        );
        for (stage, c) in &stage_counters {
            out.histogram(
                "udaconnect_stage_batch_records",
                &[("stage", stage)],
                &c.batch_records.read(),
            );
        }

        let owned: Vec<(&str, &PartitionStatus)> = status
            .stages
            .iter()
            .flat_map(|s| s.partitions.iter().map(move |p| (s.stage, p)))
            .collect();
        type Gauge = (&'static str, &'static str, fn(&PartitionStatus) -> f64);
        let gauges: [Gauge; 4] = [
            (
                "udaconnect_partition_lag",
                "Records of an owned partition not processed yet (negative: the log ends before \
                 what was processed; NaN: unknown)",
                |p| p.lag.map_or(f64::NAN, |lag| lag as f64),
            ),
            (
                "udaconnect_partition_actors",
                "Zone actors, or active person actors, of an owned partition",
                |p| p.figures.actors as f64,
            ),
            (
                "udaconnect_partition_passivated_persons",
                "Passivated persons of an owned person partition",
                |p| p.figures.passivated as f64,
            ),
            (
                "udaconnect_partition_watermark_seconds",
                "Event-time watermark of an owned partition, seconds since the epoch",
                |p| {
                    if p.figures.watermark == i64::MIN {
                        f64::NAN
                    } else {
                        p.figures.watermark as f64 / 1e6
                    }
                },
            ),
        ];
        for (name, help, value) in gauges {
            out.family(name, Kind::Gauge, help);
            for (stage, p) in &owned {
                let partition = p.partition.to_string();
                out.sample(
                    name,
                    &[("stage", stage), ("partition", &partition)],
                    value(p),
                );
            }
        }
        for (counter, help) in PARTITION_COUNTERS {
            let name = format!("udaconnect_partition_{counter}_total");
            let samples: Vec<(&str, i32, u64)> = owned
                .iter()
                .filter_map(|(stage, p)| {
                    p.figures
                        .counters
                        .get(counter)
                        .map(|v| (*stage, p.partition, *v))
                })
                .collect();
            if samples.is_empty() {
                continue;
            }
            out.family(
                &name,
                Kind::Counter,
                &format!("{help}, since the partition was assigned to this process"),
            );
            for (stage, partition, v) in samples {
                let partition = partition.to_string();
                out.sample(
                    &name,
                    &[("stage", stage), ("partition", &partition)],
                    v as f64,
                );
            }
        }
        out.family(
            "udaconnect_lag_total",
            Kind::Gauge,
            "Records of this process's partitions not processed yet",
        )
        .sample("udaconnect_lag_total", &[], status.lag_total as f64);
        out.family(
            "udaconnect_snapshot_age_seconds",
            Kind::Gauge,
            "Age of the stored snapshot of a partition this process owns",
        );
        for o in status.owners.iter().filter(|o| o.owner == status.node) {
            if let Some(age) = o.snapshot_age_s {
                let partition = o.partition.to_string();
                out.sample(
                    "udaconnect_snapshot_age_seconds",
                    &[("stage", &o.stage), ("partition", &partition)],
                    age,
                );
            }
        }
        out.family(
            "udaconnect_dead_letters_total",
            Kind::Counter,
            "Records sent to a dead-letter topic because they could not be read",
        )
        .sample(
            "udaconnect_dead_letters_total",
            &[],
            status.dead_letters as f64,
        );
        out.family(
            "udaconnect_locations_stored_total",
            Kind::Counter,
            "Home events newly stored in the location table",
        )
        .sample(
            "udaconnect_locations_stored_total",
            &[],
            status.locations_stored as f64,
        );
        let hub = status.hub;
        let hub_counters: [(&str, &str, u64, Kind); 6] = [
            (
                "udaconnect_hub_received_total",
                "Records the notification hub read",
                hub.received,
                Kind::Counter,
            ),
            (
                "udaconnect_hub_repeats_total",
                "Notifications the hub dropped as repeats (replays)",
                hub.repeats,
                Kind::Counter,
            ),
            (
                "udaconnect_hub_malformed_total",
                "Records of the connections topic that were not notifications",
                hub.malformed,
                Kind::Counter,
            ),
            (
                "udaconnect_hub_delivered_total",
                "Notifications handed to subscribers",
                hub.delivered,
                Kind::Counter,
            ),
            (
                "udaconnect_hub_slow_subscribers_dropped_total",
                "Subscribers disconnected for falling behind",
                hub.slow_subscribers_dropped,
                Kind::Counter,
            ),
            (
                "udaconnect_hub_subscribers",
                "Live notification subscribers",
                hub.subscribers,
                Kind::Gauge,
            ),
        ];
        for (name, help, value, kind) in hub_counters {
            out.family(name, kind, help).sample(name, &[], value as f64);
        }
        if let Some(e) = &status.owners_error {
            warn!(error = e, "metrics without the owner rows");
        }
        out.finish()
    }
}
