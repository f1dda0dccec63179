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
    /// The broker answered a topic description with an error (an unknown topic, say).
    #[error("kafka: cannot describe topic {topic}: {reason}")]
    Describe { topic: String, reason: String },
}

/// Where one partition's log starts and ends, and which incarnation of its topic it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPosition {
    /// The offset of the first record the log still holds (the log start offset: retention and
    /// `DeleteRecords` move it up).
    pub start: i64,
    /// The offset the next record will get (the high watermark).
    pub end: i64,
    /// The topic's id (Kafka topic ids, KIP-516, in their base64 form): a topic deleted and
    /// created again under the same name gets a new one.
    pub topic_id: String,
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

/// The producer's settings: idempotent with `acks=all` (ingest answers only once every replica
/// has the record; configuration validation refuses options that would weaken this), no linger (records are sent together anyway: each
/// stage hands the producer a batch's records at once, and more collect while requests are
/// in flight) and lz4 — each measured in docs/benchmarks.md — then `kafka_producer_options`.
/// Validated configurations only.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("compression.type", "lz4")
        .set("message.max.bytes", "4000000")
        // An unacknowledged send fails after this; callers retry (nothing is lost).
        .set("message.timeout.ms", "30000");
    for (key, value) in
        crate::config::kafka_options(&config.kafka_producer_options).unwrap_or_default()
    {
        client.set(key, value);
    }
    client
}

/// The consumers' settings: a fetch is answered as soon as one byte is there, or after 20 ms
/// (measured in docs/benchmarks.md), then `kafka_consumer_options`. Validated configurations
/// only.
pub fn consumer_config(config: &Config) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("fetch.wait.max.ms", "20")
        .set("fetch.min.bytes", "1");
    for (key, value) in
        crate::config::kafka_options(&config.kafka_consumer_options).unwrap_or_default()
    {
        client.set(key, value);
    }
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

/// The topics of docs/design.md §2 with the configured partition counts.
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

    /// Waits until the `specs` topics are known and every partition of theirs has a leader
    /// that answers offset requests: a topic just created (those in `created`) answers "not
    /// leader" for a moment, even after the metadata names its leaders.
    async fn wait_for_leaders(
        &self,
        specs: &[TopicSpec],
        created: &[String],
        timeout: Duration,
    ) -> Result<(), BrokerError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let metadata = self.metadata(timeout).await?;
            let led = specs.iter().all(|spec| {
                metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == spec.name)
                    .is_some_and(|t| {
                        t.error().is_none()
                            && !t.partitions().is_empty()
                            && t.partitions()
                                .iter()
                                .all(|p| p.leader() >= 0 && p.error().is_none())
                    })
            });
            if led {
                let admin = Arc::clone(&self.admin);
                let probes: Vec<(String, i32)> = specs
                    .iter()
                    .filter(|s| created.contains(&s.name))
                    .flat_map(|s| (0..s.partitions).map(|p| (s.name.clone(), p)))
                    .collect();
                let answered = tokio::task::spawn_blocking(move || {
                    probes.iter().all(|(topic, p)| {
                        admin
                            .inner()
                            .fetch_watermarks(topic, *p, Duration::from_secs(1))
                            .is_ok()
                    })
                })
                .await
                .unwrap_or(false);
                if answered {
                    return Ok(());
                }
            }
            if std::time::Instant::now() >= deadline {
                return Err(BrokerError::Timeout {
                    brokers: self.brokers.clone(),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log start and end offsets of `topic`'s `partition` and the topic's id.
    pub async fn log_position(
        &self,
        topic: &str,
        partition: i32,
        timeout: Duration,
    ) -> Result<LogPosition, BrokerError> {
        let topic_id = self.topic_id(topic, timeout).await?;
        let admin = Arc::clone(&self.admin);
        let name = topic.to_owned();
        let answered = tokio::task::spawn_blocking(move || {
            admin.inner().fetch_watermarks(&name, partition, timeout)
        })
        .await;
        match answered {
            Ok(Ok((start, end))) => Ok(LogPosition {
                start,
                end,
                topic_id,
            }),
            Ok(Err(KafkaError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut))) | Err(_) => {
                Err(BrokerError::Timeout {
                    brokers: self.brokers.clone(),
                    timeout,
                })
            }
            Ok(Err(e)) => Err(BrokerError::Kafka(e)),
        }
    }

    /// The id of `topic` (KIP-516), from a DescribeTopics request.
    pub async fn topic_id(&self, topic: &str, timeout: Duration) -> Result<String, BrokerError> {
        let admin = Arc::clone(&self.admin);
        let name = topic.to_owned();
        let brokers = self.brokers.clone();
        tokio::task::spawn_blocking(move || describe_topic_id(&admin, &name, timeout))
            .await
            .unwrap_or(Err(None))
            .map_err(|reason| match reason {
                Some(reason) => BrokerError::Describe {
                    topic: topic.to_owned(),
                    reason,
                },
                None => BrokerError::Timeout { brokers, timeout },
            })
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
        self.wait_for_leaders(specs, &created, timeout).await?;
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

/// DescribeTopics through librdkafka's C API: the crate does not wrap it (rdkafka 0.39).
/// Blocks until the answer or `timeout`; `Err(None)` on a timeout, `Err(Some(reason))` when the
/// broker answered with an error.
fn describe_topic_id(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    timeout: Duration,
) -> Result<String, Option<String>> {
    use std::ffi::{CStr, CString};

    use rdkafka_sys as rd;

    fn text(p: *const std::os::raw::c_char) -> String {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: librdkafka hands out NUL-terminated strings that live as long as the
            // object they belong to, which is alive here.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    }

    let name = CString::new(topic).map_err(|_| Some("topic name has a NUL byte".to_owned()))?;
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let rk = admin.inner().native_ptr();
    // SAFETY: every pointer passed is either owned here (created above and destroyed below,
    // once) or borrowed from the admin client, which outlives the call; results are read
    // before the event that owns them is destroyed.
    unsafe {
        let mut names = [name.as_ptr()];
        let collection = rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1);
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        );
        let mut errstr = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let queue = rd::rd_kafka_queue_new(rk);
        rd::rd_kafka_DescribeTopics(rk, collection, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, timeout_ms.saturating_add(1_000));
        let answer = if event.is_null() {
            Err(None)
        } else if rd::rd_kafka_event_error(event)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            let code = rd::rd_kafka_event_error(event);
            if code == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__TIMED_OUT {
                Err(None)
            } else {
                Err(Some(text(rd::rd_kafka_event_error_string(event))))
            }
        } else {
            let result = rd::rd_kafka_event_DescribeTopics_result(event);
            let mut count = 0usize;
            let topics = if result.is_null() {
                std::ptr::null_mut()
            } else {
                rd::rd_kafka_DescribeTopics_result_topics(result, &mut count)
            };
            if topics.is_null() || count == 0 {
                Err(Some("no description in the answer".to_owned()))
            } else {
                let description = *topics;
                let error = rd::rd_kafka_TopicDescription_error(description);
                if !error.is_null()
                    && rd::rd_kafka_error_code(error)
                        != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                {
                    Err(Some(text(rd::rd_kafka_error_string(error))))
                } else {
                    let id = rd::rd_kafka_TopicDescription_topic_id(description);
                    if id.is_null() {
                        Err(Some("the broker gave no topic id".to_owned()))
                    } else {
                        Ok(text(rd::rd_kafka_Uuid_base64str(id)))
                    }
                }
            }
        };
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_TopicCollection_destroy(collection);
        answer
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

/// The process's one producer (docs/design.md §4): idempotent, `acks=all`, shared by every stage.
#[derive(Clone)]
pub struct Producer {
    inner: rdkafka::producer::FutureProducer,
}

impl Producer {
    /// Creates the producer; it connects lazily.
    pub fn new(config: &Config) -> Result<Self, BrokerError> {
        let inner = producer_config(config).create()?;
        Ok(Self { inner })
    }

    /// Hands `records` to the client library in order (waiting while its queue is full) and
    /// returns their deliveries; a record is in a partition after the ones handed over before
    /// it.
    pub async fn enqueue_all(
        &self,
        records: &[OutRecord<'_>],
    ) -> Result<Vec<rdkafka::producer::DeliveryFuture>, KafkaError> {
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
        Ok(pending)
    }

    /// Waits for the broker's acknowledgement of records [`Producer::enqueue_all`] handed over.
    pub async fn acknowledged(
        pending: Vec<rdkafka::producer::DeliveryFuture>,
    ) -> Result<(), KafkaError> {
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e),
                Err(_) => return Err(KafkaError::Canceled),
            }
        }
        Ok(())
    }

    /// Produces `records` and waits for the broker's acknowledgement of all of them (in order per
    /// partition: the producer is idempotent).
    pub async fn send_all(&self, records: &[OutRecord<'_>]) -> Result<(), KafkaError> {
        Self::acknowledged(self.enqueue_all(records).await?).await
    }
}
