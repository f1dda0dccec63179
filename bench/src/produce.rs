//! Sending simulated conferences through the service's real ingest path (`udaconnect-sim
//! --produce`, `pipeline-bench`): the persons into PostgreSQL, the topics into the broker, the
//! events through an [`Ingestor`], which answers once the broker acknowledged them.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::Pool;
use udaconnect::kafka::Broker;
use udaconnect::pipeline::ingest::{IngestError, IngestReport, Ingestor};
use udaconnect::Config;
use udaconnect_actors::domain::{LocationEvent, Micros, NewLocationEvent, PersonId};

use crate::sim::Simulation;

/// PostgreSQL and the broker of `config`, both checked to answer.
pub struct Services {
    pub pool: Pool,
    pub broker: Broker,
}

impl Services {
    /// Connects to both, retrying each for up to `wait`; the error names the one that did not
    /// answer, where it was looked for, and why.
    pub async fn connect(config: &Config, wait: Duration) -> anyhow::Result<Self> {
        let pool = udaconnect::store::pool(config, wait)?;
        let deadline = Instant::now() + wait;
        loop {
            match pool.get().await {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => {
                    anyhow::bail!(
                        "postgres at {} is unreachable (waited {wait:?}): {}",
                        config.database_url.redacted(),
                        describe(&e)
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        let broker = Broker::new(config).context("failed to create the kafka client")?;
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1));
            match broker.ping(left).await {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => {
                    anyhow::bail!(
                        "kafka broker at {} is unreachable (waited {wait:?}): {}",
                        config.kafka_brokers,
                        describe(&e)
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        Ok(Self { pool, broker })
    }

    /// Applies pending migrations (as `udaconnect serve` does at start-up).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let mut client = self
            .pool
            .get()
            .await
            .context("postgres: no connection for migrating")?;
        udaconnect::store::migrate(&mut client)
            .await
            .context("failed to migrate the database")?;
        Ok(())
    }

    /// Connects (waiting up to 10 s), migrates, inserts the simulation's attendees and creates
    /// the service's topics: a fresh database and prefix made ready for a conference.
    pub async fn prepare(config: &Config, sim: &Simulation) -> anyhow::Result<Self> {
        let services = Self::connect(config, Duration::from_secs(10)).await?;
        services.migrate().await?;
        ensure_persons(&services.pool, sim).await?;
        services
            .broker
            .ensure_topics(
                &udaconnect::kafka::topic_specs(config),
                config.topic_replication,
                Duration::from_secs(10),
            )
            .await
            .context("failed to create the topics")?;
        Ok(services)
    }

    /// An ingestor of its own (no pipeline stages: a running `udaconnect serve` consumes),
    /// after creating the service's topics that do not exist, as start-up does.
    pub async fn ingestor(&self, config: &Config) -> anyhow::Result<Arc<Ingestor>> {
        Ok(Arc::new(
            Ingestor::standalone(config, self.pool.clone()).await?,
        ))
    }
}

/// An error and its sources, each said once (some errors repeat their source's text).
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// Inserts the simulation's attendees that are not in `person` yet (existing rows, such as
/// the POC seed's, are kept as they are); returns how many were inserted.
pub async fn ensure_persons(pool: &Pool, sim: &Simulation) -> anyhow::Result<u64> {
    let mut client = pool.get().await.context("postgres: no connection")?;
    let tx = client.transaction().await?;
    let mut inserted = 0;
    let persons: Vec<_> = sim.persons().collect();
    for chunk in persons.chunks(10_000) {
        let ids: Vec<i64> = chunk.iter().map(|p| p.id).collect();
        let first: Vec<&str> = chunk.iter().map(|p| p.first_name.as_str()).collect();
        let last: Vec<&str> = chunk.iter().map(|p| p.last_name.as_str()).collect();
        let company: Vec<&str> = chunk.iter().map(|p| p.company_name.as_str()).collect();
        inserted += tx
            .execute(
                "INSERT INTO person (id, first_name, last_name, company_name)
                 SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[])
                 ON CONFLICT (id) DO NOTHING",
                &[&ids, &first, &last, &company],
            )
            .await
            .context("failed to insert the attendees")?;
    }
    // Explicit ids bypass the identity sequence; move it past them so new persons fit.
    tx.execute(
        "SELECT setval(seq, GREATEST(m, COALESCE(pg_sequence_last_value(seq), 1)))
         FROM (SELECT pg_get_serial_sequence('person', 'id')::regclass AS seq,
                      (SELECT max(id) FROM person) AS m) s
         WHERE m IS NOT NULL",
        &[],
    )
    .await
    .context("failed to move the person id sequence")?;
    tx.commit().await?;
    Ok(inserted)
}

/// The event as a client sends it, with its id.
pub fn wire(e: &LocationEvent) -> NewLocationEvent {
    NewLocationEvent {
        event_id: Some(e.event_id),
        person_id: e.person_id,
        lat: e.lat,
        lon: e.lon,
        recorded_at: e.recorded_at,
    }
}

/// One ingest call, answered.
pub struct Acked {
    pub events: Vec<NewLocationEvent>,
    pub report: IngestReport,
    /// When the call was made.
    pub sent: Instant,
    /// When the answer came (every accepted event of the call was acknowledged by then).
    pub at: Instant,
}

type Call = std::pin::Pin<Box<dyn std::future::Future<Output = CallResult> + Send>>;
type CallResult = (
    Vec<NewLocationEvent>,
    Result<IngestReport, IngestError>,
    Instant,
    Instant,
);

/// Ingest calls with up to `concurrency` in flight, whose records reach each partition in the
/// order the calls were made (so concurrency adds no disorder beyond what the events carry).
///
/// A call's records are handed to the producer on its first poll, made here, in order; only a
/// call that must look persons up in PostgreSQL would wait before that, so a call with a
/// person not seen before waits for every earlier call and is awaited alone.
pub struct IngestPipe {
    ingestor: Arc<Ingestor>,
    concurrency: usize,
    known: HashSet<PersonId>,
    in_flight: VecDeque<tokio::task::JoinHandle<CallResult>>,
}

impl IngestPipe {
    pub fn new(ingestor: Arc<Ingestor>, concurrency: usize) -> Self {
        Self {
            ingestor,
            concurrency: concurrency.max(1),
            known: HashSet::new(),
            in_flight: VecDeque::new(),
        }
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Starts an ingest call for `events`; returns the calls answered meanwhile, in order.
    /// Waits while `concurrency` calls are in flight.
    pub async fn push(&mut self, events: Vec<NewLocationEvent>) -> anyhow::Result<Vec<Acked>> {
        let mut done = Vec::new();
        let new_persons: Vec<PersonId> = events
            .iter()
            .map(|e| e.person_id)
            .filter(|p| !self.known.contains(p))
            .collect();
        if !new_persons.is_empty() {
            done.extend(self.drain().await?);
        }
        while self.in_flight.len() >= self.concurrency {
            done.push(self.next().await?);
        }
        let ingestor = Arc::clone(&self.ingestor);
        let sent = Instant::now();
        let mut call: Call = Box::pin(async move {
            let report = ingestor.ingest(&events).await;
            (events, report, sent, Instant::now())
        });
        // The first poll hands the records to the producer (see the type's comment).
        match futures::poll!(call.as_mut()) {
            Poll::Ready(result) => done.push(answered(result)?),
            Poll::Pending => self.in_flight.push_back(tokio::spawn(call)),
        }
        if !new_persons.is_empty() {
            done.extend(self.drain().await?);
            self.known.extend(new_persons);
        }
        Ok(done)
    }

    /// Waits for the oldest call in flight.
    async fn next(&mut self) -> anyhow::Result<Acked> {
        let handle = self
            .in_flight
            .pop_front()
            .context("no ingest call in flight")?;
        answered(handle.await.context("an ingest task failed")?)
    }

    /// Waits for every call in flight; their answers in order.
    pub async fn drain(&mut self) -> anyhow::Result<Vec<Acked>> {
        let mut done = Vec::with_capacity(self.in_flight.len());
        while !self.in_flight.is_empty() {
            done.push(self.next().await?);
        }
        Ok(done)
    }
}

fn answered((events, report, sent, at): CallResult) -> anyhow::Result<Acked> {
    let report = report.context("ingest failed")?;
    Ok(Acked {
        events,
        report,
        sent,
        at,
    })
}

/// Counts of what the ingest path answered, with the first few rejections spelled out.
#[derive(Debug, Clone, Default)]
pub struct IngestTally {
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub rejections: Vec<String>,
    pub max_recorded_at: Option<Micros>,
}

impl IngestTally {
    /// Adds the answers of some calls.
    pub fn add(&mut self, acked: &[Acked]) {
        for a in acked {
            self.sent += a.events.len() as u64;
            self.accepted += a.report.accepted.len() as u64;
            self.rejected += a.report.rejected.len() as u64;
            for r in &a.report.rejected {
                if self.rejections.len() < 10 {
                    let e = &a.events[r.index];
                    self.rejections.push(format!(
                        "person {} at {} µs: {}",
                        e.person_id, e.recorded_at, r.error
                    ));
                }
            }
            for (i, _) in &a.report.accepted {
                let t = a.events[*i].recorded_at;
                self.max_recorded_at = Some(self.max_recorded_at.map_or(t, |m| m.max(t)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_keeps_the_event_and_its_id() {
        let e = LocationEvent {
            event_id: uuid::Uuid::from_u128(7),
            person_id: 3,
            lat: 35.1,
            lon: -106.6,
            recorded_at: 1_790_000_000_000_000,
            received_at: 1_790_000_001_000_000,
        };
        let w = wire(&e);
        assert_eq!(
            (w.event_id, w.person_id, w.lat, w.lon, w.recorded_at),
            (Some(e.event_id), 3, 35.1, -106.6, e.recorded_at)
        );
    }
}
