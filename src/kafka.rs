//! Kafka plumbing shared by every stage: client settings, topic creation and the broker probe.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{info, warn};

use crate::config::Config;

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The client could not be created or a request failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The broker refused to create a topic.
    #[error("kafka: cannot create topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    /// No answer in time.
    #[error("kafka broker at {brokers} did not answer within {timeout:?}")]
    Timeout { brokers: String, timeout: Duration },
}

/// Client settings every UdaConnect Kafka client starts from.
pub fn client_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka_brokers)
        .set("client.id", "udaconnect")
        // Notice a returning broker within a second, not librdkafka's default ten.
        .set("reconnect.backoff.max.ms", "1000")
        .set("socket.connection.setup.timeout.ms", "5000");
    client
}

/// One admin client per process: creates topics and answers whether the broker is up.
#[derive(Clone)]
pub struct Broker {
    admin: Arc<AdminClient<DefaultClientContext>>,
    brokers: String,
}

/// A topic the service needs, with its partition count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Full topic name.
    pub name: String,
    /// Partitions to create it with.
    pub partitions: i32,
}

/// The topics of DESIGN §2 with the configured partition counts.
pub fn topic_specs(config: &Config) -> Vec<TopicSpec> {
    let topics = config.topics();
    let spec = |name: String, partitions| TopicSpec { name, partitions };
    vec![
        spec(topics.locations, config.locations_partitions),
        spec(topics.person_updates, config.person_updates_partitions),
        spec(topics.connections, config.connections_partitions),
        spec(topics.locations_dlq, 1),
        spec(topics.person_updates_dlq, 1),
    ]
}

impl Broker {
    /// Creates the admin client; it connects lazily, so this works while the broker is down.
    pub fn new(config: &Config) -> Result<Self, BrokerError> {
        let admin = client_config(config).create()?;
        Ok(Self {
            admin: Arc::new(admin),
            brokers: config.kafka_brokers.clone(),
        })
    }

    /// Answers whether the broker serves a metadata request within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<(), BrokerError> {
        self.metadata(timeout).await.map(|_| ())
    }

    /// Partition count of every topic the broker knows.
    pub async fn partition_counts(
        &self,
        timeout: Duration,
    ) -> Result<Vec<(String, usize)>, BrokerError> {
        let metadata = self.metadata(timeout).await?;
        Ok(metadata
            .topics()
            .iter()
            .map(|t| (t.name().to_owned(), t.partitions().len()))
            .collect())
    }

    /// Partition count of `topic`; `None` when it does not exist (or has no partitions).
    pub async fn partition_count(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Option<u32>, BrokerError> {
        Ok(self
            .partition_counts(timeout)
            .await?
            .into_iter()
            .find(|(name, _)| name == topic)
            .map(|(_, n)| n as u32)
            .filter(|n| *n > 0))
    }

    /// The broker's metadata of every topic, or `Timeout` when it does not answer in time.
    async fn metadata(&self, timeout: Duration) -> Result<Metadata, BrokerError> {
        let admin = Arc::clone(&self.admin);
        // fetch_metadata blocks its thread until the broker answers or the timeout passes.
        let answered =
            tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(None, timeout)).await;
        match answered {
            Ok(Ok(metadata)) => Ok(metadata),
            Ok(Err(KafkaError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut))) | Err(_) => {
                Err(BrokerError::Timeout {
                    brokers: self.brokers.clone(),
                    timeout,
                })
            }
            Ok(Err(e)) => Err(BrokerError::Kafka(e)),
        }
    }

    /// Creates the topics that do not exist yet; existing ones are left as they are.
    /// Returns the names it created.
    pub async fn ensure_topics(
        &self,
        specs: &[TopicSpec],
        replication: i32,
        timeout: Duration,
    ) -> Result<Vec<String>, BrokerError> {
        let new_topics: Vec<NewTopic<'_>> = specs
            .iter()
            .map(|s| NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(replication)))
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout));
        let results = self.admin.create_topics(&new_topics, &options).await?;
        let mut created = Vec::new();
        for result in results {
            match result {
                Ok(topic) => {
                    info!(topic, "topic created");
                    created.push(topic);
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(BrokerError::CreateTopic { topic, code }),
            }
        }
        let counts = self.partition_counts(timeout).await?;
        for spec in specs {
            if let Some((_, actual)) = counts.iter().find(|(name, _)| *name == spec.name) {
                if *actual != spec.partitions as usize {
                    warn!(
                        topic = spec.name,
                        configured = spec.partitions,
                        actual,
                        "topic exists with a different partition count; keeping the broker's"
                    );
                }
            }
        }
        Ok(created)
    }
}

/// One record to produce.
#[derive(Debug, Clone)]
pub struct OutRecord<'a> {
    pub topic: &'a str,
    /// `None`: the partitioner picks it from the key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Header (name, value) pairs, such as a dead letter's reason.
    pub headers: Vec<(&'static str, String)>,
}

/// The process's one producer (DESIGN §4): idempotent, `acks=all`, shared by every stage.
#[derive(Clone)]
pub struct Producer {
    inner: rdkafka::producer::FutureProducer,
}

impl Producer {
    /// Creates the producer; it connects lazily.
    pub fn new(config: &Config) -> Result<Self, BrokerError> {
        let inner = client_config(config)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("compression.type", "lz4")
            .set("message.max.bytes", "4000000")
            // An unacknowledged send fails after this; callers retry (nothing is lost).
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self { inner })
    }

    /// Produces every record and waits until the broker acknowledged all of them.
    pub async fn send_all(&self, records: &[OutRecord<'_>]) -> Result<(), KafkaError> {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::FutureRecord;

        let mut pending = Vec::with_capacity(records.len());
        for r in records {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (name, value) in &r.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
            let mut record = FutureRecord::to(r.topic)
                .payload(&r.payload)
                .headers(headers);
            if let Some(key) = &r.key {
                record = record.key(key);
            }
            if let Some(p) = r.partition {
                record = record.partition(p);
            }
            loop {
                match self.inner.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e),
                Err(_) => return Err(KafkaError::Canceled),
            }
        }
        Ok(())
    }
}
