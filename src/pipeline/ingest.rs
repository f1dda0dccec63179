//! The ingest path (DESIGN §2, §4): validate, assign `event_id`, route each event to its home
//! zone and halo zones, pack the copies of one locations partition into few records, produce
//! them, and answer only after the broker acknowledged. Used by the CLI now and by REST and
//! gRPC later. A heartbeat tells every zone partition how far event time has come.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tracing::warn;
use udaconnect_actors::domain::{
    LocationEvent, Micros, NewLocationEvent, PersonId, ValidationError,
};
use udaconnect_actors::engine::Router;
use udaconnect_actors::messages::RoutedEvent;
use uuid::Uuid;

use crate::config::Config;
use crate::kafka::{OutRecord, Producer};
use crate::metrics::SizeHistogram;
use crate::pipeline::codec::LocationRecord;
use crate::store::StoreError;

/// At most this many routed copies go into one record (about 80 bytes each).
pub const MAX_COPIES_PER_RECORD: usize = 4_096;

/// Why an ingest call failed as a whole; nothing of it was acknowledged, and a retry is safe
/// (event ids make it idempotent).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The broker refused the records or could not be reached in time.
    #[error("the broker at {brokers} did not acknowledge: {source}")]
    Broker {
        brokers: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// No acknowledgement within `ingest_ack_timeout_ms` (the broker away, say); the records
    /// may still be written later, which a retry makes harmless (same event ids).
    #[error("the broker at {brokers} did not acknowledge within {timeout:?}")]
    BrokerTimeout { brokers: String, timeout: Duration },
    #[error("cannot check persons: {0}")]
    Store(#[from] StoreError),
}

impl From<IngestError> for crate::error::ApiError {
    /// A broker that did not acknowledge is an outage (retry; event ids make it safe).
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Broker { .. } | IngestError::BrokerTimeout { .. } => {
                Self::unavailable(e.to_string())
            }
            IngestError::Store(e) => e.into(),
        }
    }
}

/// One rejected event of a request: its index, and what is wrong with which field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: usize,
    pub error: ValidationError,
    /// The event is valid but names a person that does not exist.
    pub unknown_person: bool,
}

impl Rejection {
    /// The front ends' error for it: NOT_FOUND for an unknown person, else INVALID_ARGUMENT.
    pub fn api_error(&self) -> crate::error::ApiError {
        use crate::error::ApiError;
        if self.unknown_person {
            ApiError::not_found(Some(self.error.field), self.error.reason.clone())
        } else {
            ApiError::invalid(self.error.field, self.error.reason.clone())
        }
    }
}

/// The outcome of an ingest call: every accepted event's index and id (acknowledged by the
/// broker), and every rejected one with its reason.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestReport {
    pub accepted: Vec<(usize, Uuid)>,
    pub rejected: Vec<Rejection>,
}

/// Which persons exist, cached (persons are never deleted).
pub struct PersonDirectory {
    pool: Pool,
    known: RwLock<HashSet<PersonId>>,
}

impl PersonDirectory {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            known: RwLock::default(),
        }
    }

    /// The persons among `ids` that do not exist.
    pub async fn unknown(&self, ids: &[PersonId]) -> Result<HashSet<PersonId>, StoreError> {
        let missing: Vec<PersonId> = {
            let known = self.known.read().expect("not poisoned");
            let mut m: Vec<PersonId> = ids
                .iter()
                .filter(|id| !known.contains(id))
                .copied()
                .collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        if missing.is_empty() {
            return Ok(HashSet::new());
        }
        let client = self.pool.get().await?;
        let rows = client
            .query("SELECT id FROM person WHERE id = ANY($1)", &[&missing])
            .await?;
        let found: HashSet<PersonId> = rows.iter().map(|r| r.get(0)).collect();
        self.known
            .write()
            .expect("not poisoned")
            .extend(found.iter().copied());
        Ok(missing
            .into_iter()
            .filter(|id| !found.contains(id))
            .collect())
    }
}

/// The ingest side of one process.
pub struct Ingestor {
    producer: Producer,
    topic: String,
    router: Mutex<Router>,
    persons: PersonDirectory,
    future_skew_s: u32,
    /// The latest event time accepted so far (the heartbeat's promise).
    max_event_time: AtomicI64,
    partitions: u32,
    counters: IngestCounters,
    /// [`udaconnect_actors::EngineParams::settle_us`] of the configuration.
    settle_us: Micros,
    /// The bootstrap servers, to name in errors.
    brokers: String,
    /// How long a call waits for the broker's acknowledgement.
    ack_timeout: Duration,
}

/// What the ingest side counted (for `/metrics`).
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    /// Locations records produced (each packs many routed copies).
    pub records: AtomicU64,
    /// Routed copies (home and halo) per locations record: the packing.
    pub copies_per_record: SizeHistogram,
}

fn now_micros() -> Micros {
    chrono::Utc::now().timestamp_micros()
}

impl Ingestor {
    /// An ingestor producing to the locations topic, which has `partitions` partitions.
    pub fn new(config: &Config, producer: Producer, pool: Pool, partitions: u32) -> Self {
        Self {
            producer,
            topic: config.topics().locations,
            router: Mutex::new(Router::new(&config.engine_params(), partitions)),
            persons: PersonDirectory::new(pool),
            future_skew_s: config.future_skew_s,
            max_event_time: AtomicI64::new(Micros::MIN),
            partitions,
            counters: IngestCounters::default(),
            settle_us: config.engine_params().settle_us(),
            brokers: config.kafka_brokers.clone(),
            ack_timeout: Duration::from_millis(config.ingest_ack_timeout_ms),
        }
    }

    /// Produces `records` and waits for the broker's acknowledgement of all of them, for at
    /// most the configured timeout.
    async fn produce(&self, records: &[OutRecord<'_>]) -> Result<(), IngestError> {
        match tokio::time::timeout(self.ack_timeout, self.producer.send_all(records)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(IngestError::Broker {
                brokers: self.brokers.clone(),
                source,
            }),
            Err(_) => Err(IngestError::BrokerTimeout {
                brokers: self.brokers.clone(),
                timeout: self.ack_timeout,
            }),
        }
    }

    /// Validates, routes and produces `events`; returns once the broker acknowledged every
    /// accepted one.
    pub async fn ingest(&self, events: &[NewLocationEvent]) -> Result<IngestReport, IngestError> {
        let report = self.ingest_uncounted(events).await?;
        let c = &self.counters;
        c.accepted
            .fetch_add(report.accepted.len() as u64, Ordering::Relaxed);
        c.rejected
            .fetch_add(report.rejected.len() as u64, Ordering::Relaxed);
        Ok(report)
    }

    /// What the ingest side counted.
    pub fn counters(&self) -> &IngestCounters {
        &self.counters
    }

    async fn ingest_uncounted(
        &self,
        events: &[NewLocationEvent],
    ) -> Result<IngestReport, IngestError> {
        let received_at = now_micros();
        let mut report = IngestReport::default();
        let mut valid: Vec<(usize, LocationEvent)> = Vec::with_capacity(events.len());
        for (index, e) in events.iter().enumerate() {
            match e.validate(received_at, self.future_skew_s) {
                Ok(event) => valid.push((index, event)),
                Err(error) => report.rejected.push(Rejection {
                    index,
                    error,
                    unknown_person: false,
                }),
            }
        }
        let ids: Vec<PersonId> = valid.iter().map(|(_, e)| e.person_id).collect();
        let unknown = self.persons.unknown(&ids).await?;
        if !unknown.is_empty() {
            valid.retain(|(index, e)| {
                let ok = !unknown.contains(&e.person_id);
                if !ok {
                    report.rejected.push(Rejection {
                        unknown_person: true,
                        index: *index,
                        error: ValidationError {
                            field: "person_id",
                            reason: format!("no person with id {}", e.person_id),
                        },
                    });
                }
                ok
            });
            report.rejected.sort_by_key(|r| r.index);
        }
        if valid.is_empty() {
            return Ok(report);
        }
        let mut per_partition: Vec<Vec<RoutedEvent>> = vec![Vec::new(); self.partitions as usize];
        {
            let mut router = self.router.lock().expect("not poisoned");
            for (_, e) in &valid {
                router.route(e, |p, copy| per_partition[p as usize].push(copy));
            }
        }
        let mut records = Vec::new();
        for (p, copies) in per_partition.iter().enumerate() {
            for chunk in copies.chunks(MAX_COPIES_PER_RECORD) {
                self.counters.copies_per_record.observe(chunk.len() as u64);
                records.push(OutRecord {
                    topic: &self.topic,
                    partition: Some(p as i32),
                    key: None,
                    payload: LocationRecord::Events(chunk.to_vec()).encode(),
                    headers: Vec::new(),
                });
            }
        }
        self.produce(&records).await?;
        self.counters
            .records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        let latest = valid
            .iter()
            .map(|(_, e)| e.recorded_at)
            .max()
            .unwrap_or(Micros::MIN);
        self.max_event_time.fetch_max(latest, Ordering::Relaxed);
        report.accepted = valid.iter().map(|(i, e)| (*i, e.event_id)).collect();
        Ok(report)
    }

    /// The locations topic's partition count it routes to.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The latest event time accepted so far.
    pub fn max_event_time(&self) -> Micros {
        self.max_event_time.load(Ordering::Relaxed)
    }

    /// Sends a heartbeat with the latest event time to every locations partition.
    pub async fn heartbeat(&self) -> Result<(), IngestError> {
        let max_event_time = self.max_event_time();
        if max_event_time == Micros::MIN {
            return Ok(());
        }
        let payload = LocationRecord::Heartbeat { max_event_time }.encode();
        let records: Vec<OutRecord<'_>> = (0..self.partitions)
            .map(|p| OutRecord {
                topic: &self.topic,
                partition: Some(p as i32),
                key: None,
                payload: payload.clone(),
                headers: Vec::new(),
            })
            .collect();
        self.produce(&records).await?;
        Ok(())
    }

    /// Declares that event time has reached `t` (say, the end of a conference day): no event
    /// earlier than `t - lateness` will come, so episodes that ended before it close now.
    pub async fn advance_event_time(&self, t: Micros) -> Result<(), IngestError> {
        self.max_event_time.fetch_max(t, Ordering::Relaxed);
        self.heartbeat().await
    }

    /// Declares the end of the stream (the end of a conference): event time moves past the
    /// latest accepted event by [`udaconnect_actors::EngineParams::settle_us`], so every episode closes. Returns
    /// the event time declared.
    pub async fn finish(&self) -> Result<Micros, IngestError> {
        let end = self.max_event_time().saturating_add(self.settle_us);
        self.advance_event_time(end).await?;
        Ok(end)
    }

    /// An ingestor for a process that runs no stage (the ingest command, the simulator):
    /// creates the topics that are missing, as start-up does, and produces to the locations
    /// topic with its actual partition count.
    pub async fn standalone(config: &Config, pool: Pool) -> anyhow::Result<Self> {
        use anyhow::Context;

        let timeout = Duration::from_secs(10);
        let broker =
            crate::kafka::Broker::new(config).context("failed to create the kafka client")?;
        broker
            .ensure_topics(
                &crate::kafka::topic_specs(config),
                config.topic_replication,
                timeout,
            )
            .await
            .context("failed to create the topics")?;
        let locations = config.topics().locations;
        let partitions = broker
            .partition_count(&locations, timeout)
            .await?
            .with_context(|| format!("topic {locations} has no partitions"))?;
        let producer = Producer::new(config).context("failed to create the kafka producer")?;
        Ok(Self::new(config, producer, pool, partitions))
    }

    /// Sends heartbeats every `interval` while event time moves, until `shutdown` turns true.
    pub fn spawn_heartbeats(
        self: &Arc<Self>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut sent = Micros::MIN;
            let mut ticker = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let now = this.max_event_time();
                if now != sent {
                    match this.heartbeat().await {
                        Ok(()) => sent = now,
                        Err(e) => warn!(error = %e, "heartbeat not sent; retrying"),
                    }
                }
            }
        })
    }
}

/// A location event as JSON clients send it (`recorded_at` in RFC 3339).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireLocationEvent {
    #[serde(default)]
    pub event_id: Option<Uuid>,
    pub person_id: PersonId,
    pub lat: f64,
    pub lon: f64,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
}

impl From<WireLocationEvent> for NewLocationEvent {
    fn from(w: WireLocationEvent) -> Self {
        Self {
            event_id: w.event_id,
            person_id: w.person_id,
            lat: w.lat,
            lon: w.lon,
            recorded_at: w.recorded_at.timestamp_micros(),
        }
    }
}

/// `udaconnect ingest --file`: sends a JSON-lines file through the ingest path in batches,
/// with progress on standard error and a JSON summary last on standard output. Fails when a
/// line was rejected (each is reported with its line number and field).
pub async fn ingest_file(
    config: &Config,
    file: &std::path::Path,
    batch: usize,
) -> anyhow::Result<()> {
    use std::io::BufRead;

    use anyhow::Context;

    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
        ))
    };
    let pool = crate::store::pool(config, Duration::from_secs(5))?;
    let ingestor = Ingestor::standalone(config, pool).await?;

    let started = std::time::Instant::now();
    let (mut read, mut accepted, mut rejected) = (0u64, 0u64, 0u64);
    let mut pending: Vec<(u64, NewLocationEvent)> = Vec::with_capacity(batch);
    fn report_rejection(rejected: &mut u64, line: u64, what: String) {
        *rejected += 1;
        if *rejected <= 20 {
            eprintln!("line {line}: {what}");
        }
    }
    let mut lines = reader.lines();
    loop {
        let next = lines.next();
        if let Some(line) = next.as_ref() {
            read += 1;
            let text = match line {
                Ok(text) => text,
                Err(e) => anyhow::bail!("cannot read line {read}: {e}"),
            };
            if text.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<WireLocationEvent>(text) {
                Ok(w) => pending.push((read, w.into())),
                Err(e) => {
                    report_rejection(&mut rejected, read, format!("not a location event: {e}"))
                }
            }
        }
        if pending.len() >= batch || (next.is_none() && !pending.is_empty()) {
            let events: Vec<NewLocationEvent> = pending.iter().map(|(_, e)| *e).collect();
            let report = ingestor.ingest(&events).await.context("ingest failed")?;
            accepted += report.accepted.len() as u64;
            for r in report.rejected {
                report_rejection(&mut rejected, pending[r.index].0, r.error.to_string());
            }
            pending.clear();
            eprintln!(
                "ingested {accepted} events ({rejected} rejected) in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        if next.is_none() {
            break;
        }
    }
    ingestor
        .heartbeat()
        .await
        .context("final heartbeat failed")?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "lines": read,
            "accepted": accepted,
            "rejected": rejected,
            "seconds": seconds,
            "events_per_s": accepted as f64 / seconds.max(1e-9),
        })
    );
    if rejected > 0 {
        anyhow::bail!("{rejected} of {read} lines were rejected");
    }
    Ok(())
}
