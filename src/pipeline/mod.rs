//! The Kafka pipeline (docs/design.md §2, §4, §5): ingest → locations topic → zone stage →
//! person-updates
//! topic → person stage → `connection` + connections topic, with snapshots and at-least-once,
//! idempotent effects.

pub mod codec;
pub mod consumer;
pub mod hub;
pub mod ingest;
pub mod live;
pub mod metrics;
pub mod offsets;
pub mod stages;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use rdkafka::consumer::BaseConsumer;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use udaconnect_actors::actors::person::PersonSupervisorMsg;
use udaconnect_actors::actors::ports::Stage;
use udaconnect_actors::actors::zone::ZoneSupervisorMsg;

use crate::config::Config;
use crate::kafka::{client_config, Broker, Producer};
use crate::metrics::{PipelineMetrics, Registry};
use crate::pipeline::consumer::{StageConsumer, StageOptions};
use crate::pipeline::hub::NotificationHub;
use crate::pipeline::ingest::Ingestor;
use crate::pipeline::offsets::MismatchKind;
use crate::pipeline::stages::{
    DeadLetters, KafkaPersonUpdates, OffsetMismatches, Owned, PartitionStore, PersonStage,
    PgConnections, PgLocations, ZoneStage,
};
pub use crate::pipeline::status::{PartitionFigures, PartitionStatus, PipelineStatus, StageStatus};
use crate::store::pipeline::{PgOwners, PgSnapshots};

/// Consumer group of stage one.
pub const ZONES_GROUP: &str = "udaconnect-zones";
/// Consumer group of stage two.
pub const PERSONS_GROUP: &str = "udaconnect-persons";

/// Both stages, the ingestor and its heartbeats, running in this process.
pub struct Pipeline {
    ingestor: Arc<Ingestor>,
    zones: Mutex<Option<StageConsumer>>,
    persons: Mutex<Option<StageConsumer>>,
    zone_owned: Owned<ZoneSupervisorMsg>,
    person_owned: Owned<PersonSupervisorMsg>,
    /// The series the pipeline's parts count into, and the registry that exports them.
    metrics: PipelineMetrics,
    registry: Registry,
    zone_mismatches: Arc<OffsetMismatches>,
    person_mismatches: Arc<OffsetMismatches>,
    hub: Arc<NotificationHub>,
    node: String,
    pool: Pool,
    probe: Arc<BaseConsumer>,
    topics: crate::config::Topics,
    shutdown: CancellationToken,
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
        let mut registry = Registry::default();
        let metrics = PipelineMetrics::register(
            &mut registry,
            &[
                MismatchKind::OtherTopicId,
                MismatchKind::AboveEnd,
                MismatchKind::BelowStart,
            ]
            .map(MismatchKind::as_str),
        );
        let dead_letters = |source_topic: &str, topic: &str| DeadLetters {
            producer: producer.clone(),
            source_topic: source_topic.to_owned(),
            topic: topic.to_owned(),
            count: metrics.dead_letters.clone(),
        };
        let locations = Arc::new(PgLocations {
            pool: pool.clone(),
            window_s: params.window_s,
            radius_m: params.radius_m,
            counters: metrics.locations.clone(),
            dead_letters: dead_letters(&topics.locations, &topics.locations_dlq),
        });
        let node = config.node();
        // Where peers reach this process's gRPC server (start-up fills in the bound address).
        let owner_addr = config
            .grpc_advertise_addr
            .clone()
            .unwrap_or_else(|| config.grpc_addr.to_string());
        let mismatches = || {
            Arc::new(OffsetMismatches {
                current: std::sync::Mutex::default(),
                found: metrics.mismatches.clone(),
            })
        };
        let (zone_mismatches, person_mismatches) = (mismatches(), mismatches());
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
            dead_letters: dead_letters(&topics.locations, &topics.locations_dlq),
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
            dead_letters: dead_letters(&topics.person_updates, &topics.person_updates_dlq),
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
                stage: Stage::Persons,
                group: group(PERSONS_GROUP),
                topic: topics.person_updates.clone(),
                snapshot_interval: SNAPSHOT_INTERVAL,
                counters: metrics.persons.clone(),
            },
            Arc::new(person_stage),
        )
        .context("failed to start the persons stage")?;
        let zones = StageConsumer::start(
            config,
            StageOptions {
                stage: Stage::Zones,
                group: group(ZONES_GROUP),
                topic: topics.locations.clone(),
                snapshot_interval: SNAPSHOT_INTERVAL,
                counters: metrics.zones.clone(),
            },
            Arc::new(zone_stage),
        )
        .context("failed to start the zones stage")?;
        let ingestor = Arc::new(
            Ingestor::new(config, producer, pool.clone(), zone_partitions)
                .with_counters(metrics.ingest.clone()),
        );
        let shutdown = CancellationToken::new();
        let heartbeats = ingestor.spawn_heartbeats(HEARTBEAT_INTERVAL, shutdown.clone());
        let probe: BaseConsumer = client_config(config)
            .create()
            .context("failed to create the kafka probe")?;
        Ok(Self {
            ingestor,
            metrics,
            registry,
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

    /// Stops heartbeats and both stages; every owned partition is flushed, snapshotted and
    /// committed first.
    pub async fn stop(&self) {
        self.shutdown.cancel();
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
