//! The Kafka pipeline (docs/design.md §2, §4, §5): ingest → locations topic → zone stage →
//! person-updates
//! topic → person stage → `connection` + connections topic, with snapshots and at-least-once,
//! idempotent effects.

pub mod codec;
pub mod consumer;
pub mod erased;
pub mod erasure;
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

use crate::config::{Config, Topics};
use crate::kafka::{client_config, Broker, Producer};
use crate::metrics::{PipelineMetrics, Registry};
use crate::pipeline::consumer::{StageConsumer, StageOptions, Timing};
use crate::pipeline::erased::ErasedPersons;
use crate::pipeline::erasure::Forgetting;
use crate::pipeline::hub::NotificationHub;
use crate::pipeline::ingest::Ingestor;
use crate::pipeline::offsets::MismatchKind;
use crate::pipeline::stages::{
    DeadLetters, KafkaPersonUpdates, Owned, PartitionStore, PersonStage, PgConnections,
    PgLocations, Restores, ZoneStage,
};
pub use crate::pipeline::status::{PartitionFigures, PartitionStatus, PipelineStatus, StageStatus};
use crate::store::owners::PgOwners;
use crate::store::retention::Retention;
use crate::store::snapshots::PgSnapshots;

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
    zone_restores: Arc<Restores>,
    person_restores: Arc<Restores>,
    hub: Arc<NotificationHub>,
    node: String,
    pool: Pool,
    probe: Arc<BaseConsumer>,
    topics: Topics,
    shutdown: CancellationToken,
    heartbeats: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The retention passes (`retention_days`), when on.
    retention: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// What forgets erased persons here, and the task that re-reads them.
    forgetting: Arc<Forgetting>,
    erasure_refresh: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    zone_partitions: u32,
    person_partitions: u32,
}

/// How often each partition snapshots while records flow.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);
/// How often the ingest side sends a heartbeat while event time moves.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// What the stages of one pipeline are built from.
struct Parts<'a> {
    config: &'a Config,
    pool: &'a Pool,
    broker: &'a Broker,
    producer: &'a Producer,
    metrics: &'a PipelineMetrics,
    node: String,
    /// Where peers reach this process's gRPC server (start-up fills in the bound address).
    owner_addr: String,
    erased: &'a Arc<ErasedPersons>,
}

impl Parts<'_> {
    /// Where a stage reading `source_topic` dead-letters into `topic`.
    fn dead_letters(&self, source_topic: &str, topic: &str) -> DeadLetters {
        DeadLetters {
            producer: self.producer.clone(),
            source_topic: source_topic.to_owned(),
            topic: topic.to_owned(),
            count: self.metrics.dead_letters.clone(),
        }
    }

    /// Where the stage reading `topic` keeps its snapshots and owner rows.
    fn store(&self, stage: Stage, topic: &str) -> PartitionStore {
        PartitionStore {
            stage,
            topic: topic.to_owned(),
            snapshots: PgSnapshots::new(self.pool.clone(), topic).owned_by(&self.node),
            owners: PgOwners::new(self.pool.clone(), topic, &self.node, &self.owner_addr),
            broker: self.broker.clone(),
            restores: Arc::new(Restores {
                found: self.metrics.mismatches.clone(),
                ..Restores::default()
            }),
            abandoned: match stage {
                Stage::Zones => self.metrics.zones.snapshot_stores_abandoned.clone(),
                Stage::Persons => self.metrics.persons.snapshot_stores_abandoned.clone(),
            },
            erased: Arc::clone(self.erased),
            pool: self.pool.clone(),
        }
    }

    /// Joins `stage`'s consumer group on `topic`, its partitions handled by `factory`.
    fn consumer<F: crate::pipeline::consumer::WorkerFactory>(
        &self,
        stage: Stage,
        topic: &str,
        factory: F,
    ) -> anyhow::Result<StageConsumer> {
        let (group, counters) = match stage {
            Stage::Zones => (ZONES_GROUP, &self.metrics.zones),
            Stage::Persons => (PERSONS_GROUP, &self.metrics.persons),
        };
        StageConsumer::start(
            self.config,
            StageOptions {
                stage,
                group: format!("{}.{group}", self.config.topic_prefix),
                topic: topic.to_owned(),
                timing: Timing {
                    snapshot_interval: SNAPSHOT_INTERVAL,
                    release_budget: Duration::from_millis(self.config.release_budget_ms),
                },
                counters: counters.clone(),
            },
            Arc::new(factory),
        )
        .with_context(|| format!("failed to start the {} stage", stage.as_str()))
    }
}

/// The partition counts of the locations, person-updates and connections topics.
async fn partition_counts(broker: &Broker, topics: &Topics) -> anyhow::Result<[u32; 3]> {
    let mut counts = [0; 3];
    for (count, name) in counts.iter_mut().zip([
        &topics.locations,
        &topics.person_updates,
        &topics.connections,
    ]) {
        *count = broker
            .partition_count(name, Duration::from_secs(10))
            .await
            .context("failed to read topic metadata")?
            .with_context(|| format!("topic {name} does not exist"))?;
    }
    Ok(counts)
}

impl Pipeline {
    /// Starts the producer, the ingestor and both stage consumers. The topics must exist.
    pub async fn start(config: &Config, pool: Pool, broker: &Broker) -> anyhow::Result<Self> {
        let topics = config.topics();
        let [zone_partitions, person_partitions, connection_partitions] =
            partition_counts(broker, &topics).await?;
        let producer = Producer::new(config).context("failed to create the kafka producer")?;
        let params = config.engine_params();
        // Erasures made before this start: dropped from the first record on.
        let erased = Arc::new(ErasedPersons::default());
        erased
            .refresh(&pool)
            .await
            .context("failed to read erased_person")?;
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
        let parts = Parts {
            config,
            pool: &pool,
            broker,
            producer: &producer,
            metrics: &metrics,
            node: config.node(),
            owner_addr: config
                .grpc_advertise_addr
                .clone()
                .unwrap_or_else(|| config.grpc_addr.to_string()),
            erased: &erased,
        };
        let zone_stage = ZoneStage {
            params,
            person_partitions,
            locations: Arc::new(PgLocations {
                pool: pool.clone(),
                window_s: params.window_s,
                radius_m: params.radius_m,
                counters: metrics.locations.clone(),
                dead_letters: parts.dead_letters(&topics.locations, &topics.locations_dlq),
            }),
            updates: Arc::new(KafkaPersonUpdates {
                producer: producer.clone(),
                topic: topics.person_updates.clone(),
            }),
            store: parts.store(Stage::Zones, &topics.locations),
            dead_letters: parts.dead_letters(&topics.locations, &topics.locations_dlq),
            owned: Arc::default(),
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
            store: parts.store(Stage::Persons, &topics.person_updates),
            dead_letters: parts.dead_letters(&topics.person_updates, &topics.person_updates_dlq),
            owned: Arc::default(),
        };
        let (zone_owned, person_owned) = (
            Arc::clone(&zone_stage.owned),
            Arc::clone(&person_stage.owned),
        );
        let (zone_restores, person_restores) = (
            Arc::clone(&zone_stage.store.restores),
            Arc::clone(&person_stage.store.restores),
        );
        // Started first, so it reads every notification the stages produce from now on.
        let hub = {
            let (config, erased) = (config.clone(), Arc::clone(&erased));
            tokio::task::spawn_blocking(move || NotificationHub::start(&config, erased))
                .await
                .context("the notification hub's start panicked")?
                .context("failed to start the notification hub")?
        };
        let persons = parts.consumer(Stage::Persons, &topics.person_updates, person_stage)?;
        let zones = parts.consumer(Stage::Zones, &topics.locations, zone_stage)?;
        let node = parts.node;
        let ingestor = Arc::new(
            Ingestor::new(config, producer, pool.clone(), zone_partitions)
                .with_counters(metrics.ingest.clone())
                .with_erased(Arc::clone(&erased)),
        );
        let hub = Arc::new(hub);
        let shutdown = CancellationToken::new();
        let heartbeats = ingestor.spawn_heartbeats(HEARTBEAT_INTERVAL, shutdown.clone());
        let retention = (config.retention_days > 0).then(|| {
            let retention = Retention::new(
                pool.clone(),
                config.retention_days,
                metrics.retention.clone(),
            );
            tokio::spawn(retention.run(shutdown.clone()))
        });
        let forgetting = Arc::new(Forgetting {
            erased: Arc::clone(&erased),
            ingestor: Arc::clone(&ingestor),
            hub: Arc::clone(&hub),
            stages: [
                ("zones", zones.forgetter()),
                ("persons", persons.forgetter()),
            ],
            applied: std::sync::Mutex::new(erased.current().iter().copied().collect()),
        });
        let erasure_refresh = Arc::clone(&forgetting).spawn_refresh(pool.clone(), shutdown.clone());
        let probe: BaseConsumer = client_config(config)
            .create()
            .context("failed to create the kafka probe")?;
        Ok(Self {
            ingestor,
            metrics,
            registry,
            zone_restores,
            person_restores,
            zones: Mutex::new(Some(zones)),
            persons: Mutex::new(Some(persons)),
            zone_owned,
            person_owned,
            hub,
            node,
            pool,
            probe: Arc::new(probe),
            topics,
            shutdown,
            heartbeats: std::sync::Mutex::new(Some(heartbeats)),
            retention: std::sync::Mutex::new(retention),
            forgetting,
            erasure_refresh: std::sync::Mutex::new(Some(erasure_refresh)),
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
    /// committed first. The stages stop side by side: each one's offsets and effects are its
    /// own (§4), and what the zones stage publishes while it stops reaches whichever process
    /// owns the persons partition next.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        let heartbeats = self.heartbeats.lock().expect("not poisoned").take();
        if let Some(h) = heartbeats {
            let _ = h.await;
        }
        let zones = self.zones.lock().await.take();
        let persons = self.persons.lock().await.take();
        futures::future::join(
            async move {
                if let Some(zones) = zones {
                    zones.stop().await;
                }
            },
            async move {
                if let Some(persons) = persons {
                    persons.stop().await;
                }
            },
        )
        .await;
        // After the stages: a retention pass in progress must not delay their release (it
        // stops before its next statement).
        let retention = self.retention.lock().expect("not poisoned").take();
        if let Some(r) = retention {
            let _ = r.await;
        }
        let refresh = self.erasure_refresh.lock().expect("not poisoned").take();
        if let Some(r) = refresh {
            let _ = r.await;
        }
        self.hub.stop().await;
    }
}
