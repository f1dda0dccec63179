//! The Kafka pipeline (DESIGN §2, §4, §5): ingest → locations topic → zone stage → person-updates
//! topic → person stage → `connection` + connections topic, with snapshots and at-least-once,
//! idempotent effects.

pub mod codec;
pub mod consumer;
pub mod ingest;
pub mod stages;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use ractor::rpc::CallResult;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use tokio::sync::{watch, Mutex};
use udaconnect_actors::actors::person::PersonSupervisorMsg;
use udaconnect_actors::actors::zone::ZoneSupervisorMsg;

use crate::config::Config;
use crate::kafka::{client_config, Broker, Producer};
use crate::pipeline::consumer::{StageConsumer, StageOptions};
use crate::pipeline::ingest::Ingestor;
use crate::pipeline::stages::{
    DeadLetters, KafkaPersonUpdates, Owned, PersonStage, PgConnections, PgLocations, ZoneStage,
};
use crate::store::pipeline::PgSnapshots;

/// Consumer group of stage one.
pub const ZONES_GROUP: &str = "udaconnect-zones";
/// Consumer group of stage two.
pub const PERSONS_GROUP: &str = "udaconnect-persons";

/// One partition of a stage owned by this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The offset after the last record whose effects are done.
    pub processed_offset: i64,
    /// The topic's end offset (high watermark).
    pub end_offset: i64,
    pub lag: i64,
}

/// One stage's partitions in this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageStatus {
    pub stage: &'static str,
    pub topic: String,
    pub partitions: Vec<PartitionStatus>,
}

/// The pipeline as this process sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PipelineStatus {
    pub stages: Vec<StageStatus>,
    pub lag_total: i64,
    pub dead_letters: u64,
    pub locations_stored: u64,
}

/// Both stages, the ingestor and its heartbeats, running in this process.
pub struct Pipeline {
    ingestor: Arc<Ingestor>,
    zones: Mutex<Option<StageConsumer>>,
    persons: Mutex<Option<StageConsumer>>,
    zone_owned: Owned<ZoneSupervisorMsg>,
    person_owned: Owned<PersonSupervisorMsg>,
    probe: Arc<BaseConsumer>,
    topics: crate::config::Topics,
    dead_letters: Arc<AtomicU64>,
    locations: Arc<PgLocations>,
    shutdown: watch::Sender<bool>,
    heartbeats: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How often each partition snapshots while records flow.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);
/// How often the ingest side sends a heartbeat while event time moves.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

impl Pipeline {
    /// Starts the producer, the ingestor and both stage consumers. The topics must exist.
    pub async fn start(config: &Config, pool: Pool, broker: &Broker) -> anyhow::Result<Self> {
        let topics = config.topics();
        let counts = broker
            .partition_counts(Duration::from_secs(10))
            .await
            .context("failed to read topic metadata")?;
        let count = |name: &str| {
            counts
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| *c as u32)
                .filter(|c| *c > 0)
                .with_context(|| format!("topic {name} does not exist"))
        };
        let zone_partitions = count(&topics.locations)?;
        let person_partitions = count(&topics.person_updates)?;
        let producer = Producer::new(config).context("failed to create the kafka producer")?;
        let params = config.engine_params();
        let dead_letters = Arc::new(AtomicU64::new(0));
        let locations = Arc::new(PgLocations {
            pool: pool.clone(),
            stored: AtomicU64::new(0),
        });
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
            snapshots: PgSnapshots::new(pool.clone(), topics.locations.clone()),
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
            }),
            snapshots: PgSnapshots::new(pool.clone(), topics.person_updates.clone()),
            dead_letters: DeadLetters {
                producer: producer.clone(),
                source_topic: topics.person_updates.clone(),
                topic: topics.person_updates_dlq.clone(),
                count: Arc::clone(&dead_letters),
            },
            owned: Arc::clone(&person_owned),
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
        let ingestor = Arc::new(Ingestor::new(config, producer, pool, zone_partitions));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let heartbeats = ingestor.spawn_heartbeats(HEARTBEAT_INTERVAL, shutdown_rx);
        let probe: BaseConsumer = client_config(config)
            .create()
            .context("failed to create the kafka probe")?;
        Ok(Self {
            ingestor,
            zones: Mutex::new(Some(zones)),
            persons: Mutex::new(Some(persons)),
            zone_owned,
            person_owned,
            probe: Arc::new(probe),
            topics,
            dead_letters,
            locations,
            shutdown,
            heartbeats: std::sync::Mutex::new(Some(heartbeats)),
        })
    }

    /// The ingest side.
    pub fn ingestor(&self) -> &Arc<Ingestor> {
        &self.ingestor
    }

    /// Stops fetching one partition of a stage (operations; the tests of watermark alignment).
    pub async fn pause(&self, stage: &str, partition: i32) {
        if let Some(c) = self.stage(stage).lock().await.as_ref() {
            c.pause(partition);
        }
    }

    /// Fetches a paused partition again.
    pub async fn resume(&self, stage: &str, partition: i32) {
        if let Some(c) = self.stage(stage).lock().await.as_ref() {
            c.resume(partition);
        }
    }

    fn stage(&self, stage: &str) -> &Mutex<Option<StageConsumer>> {
        if stage == "zones" {
            &self.zones
        } else {
            &self.persons
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
        owned: &Owned<M>,
        view: fn(ractor::RpcReplyPort<V>) -> M,
        next_offset: fn(&V) -> u64,
    ) -> StageStatus {
        let actors: Vec<_> = owned
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        let mut partitions = Vec::new();
        for (p, actor) in actors {
            let processed = match actor.call(view, Some(Duration::from_secs(30))).await {
                Ok(CallResult::Success(v)) => next_offset(&v) as i64,
                _ => -1,
            };
            partitions.push(self.partition_status(topic, p, processed).await);
        }
        StageStatus {
            stage,
            topic: topic.to_owned(),
            partitions,
        }
    }

    /// Owned partitions of both stages with processed and end offsets.
    pub async fn status(&self) -> PipelineStatus {
        let stages = vec![
            self.stage_status(
                "zones",
                &self.topics.locations,
                &self.zone_owned,
                ZoneSupervisorMsg::View,
                |v| v.next_offset,
            )
            .await,
            self.stage_status(
                "persons",
                &self.topics.person_updates,
                &self.person_owned,
                PersonSupervisorMsg::View,
                |v| v.next_offset,
            )
            .await,
        ];
        let lag_total = stages
            .iter()
            .flat_map(|s| &s.partitions)
            .map(|p| p.lag.max(0))
            .sum();
        PipelineStatus {
            stages,
            lag_total,
            dead_letters: self.dead_letters.load(std::sync::atomic::Ordering::Relaxed),
            locations_stored: self
                .locations
                .stored
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    async fn partition_status(
        &self,
        topic: &str,
        partition: i32,
        processed: i64,
    ) -> PartitionStatus {
        let end = self.end_offset(topic, partition).await;
        PartitionStatus {
            partition,
            processed_offset: processed,
            end_offset: end,
            lag: (end - processed).max(0),
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
    }
}
