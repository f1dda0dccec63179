//! The ingest path (docs/design.md §2, §4): validate, assign `event_id`, route each event to its
//! home
//! zone and halo zones, pack the copies of one locations partition into few records, produce
//! them, and answer only after the broker acknowledged. Used by the CLI now and by REST and
//! gRPC later. A heartbeat tells every zone partition how far event time has come.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use udaconnect_actors::domain::{
    LocationEvent, Micros, NewLocationEvent, PersonId, ReportFingerprint, ValidationError,
};
use udaconnect_actors::messages::RoutedEvent;
use udaconnect_actors::sync_engine::Router;
use uuid::Uuid;

use crate::config::Config;
use crate::kafka::{OutRecord, Producer};
use crate::metrics::IngestCounters;
use crate::pipeline::codec::LocationRecord;
use crate::pipeline::erased::ErasedPersons;
use crate::store::locations::stored_fingerprints;
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

/// Why an event of a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionKind {
    /// A field is malformed or out of range.
    Invalid,
    /// The event is valid but names a person that does not exist.
    UnknownPerson,
    /// Its `event_id` is already the id of a different report (person, place or time).
    IdReused,
}

/// One rejected event of a request: its index, and what is wrong with which field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: usize,
    pub error: ValidationError,
    pub kind: RejectionKind,
}

impl Rejection {
    /// The front ends' error for it: NOT_FOUND for an unknown person, ALREADY_EXISTS (409) for
    /// a reused id, else INVALID_ARGUMENT.
    pub fn api_error(&self) -> crate::error::ApiError {
        use crate::error::{ApiError, ErrorCode};
        let (field, reason) = (self.error.field, self.error.reason.clone());
        match self.kind {
            RejectionKind::UnknownPerson => ApiError::not_found(Some(field), reason),
            RejectionKind::IdReused => ApiError {
                code: ErrorCode::AlreadyExists,
                message: reason,
                field: Some(field.to_owned()),
            },
            RejectionKind::Invalid => ApiError::invalid(field, reason),
        }
    }
}

/// The client-chosen event ids this process acknowledged lately (the latest
/// [`RECENT_IDS`]), and a look-up of older ones in `location`: a reused id is refused at ingest
/// when its first report is known here. (Ids derived from the report cannot be reused: they
/// are a function of person, place and time.)
struct KnownIds {
    pool: Pool,
    recent: Mutex<(HashMap<Uuid, ReportFingerprint>, VecDeque<Uuid>)>,
}

/// How many client-chosen ids an ingest process remembers without asking PostgreSQL.
pub const RECENT_IDS: usize = 100_000;

impl KnownIds {
    fn new(pool: Pool) -> Self {
        Self {
            pool,
            recent: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// The first known report of each of `ids`, where one is known.
    async fn first_reports(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, ReportFingerprint>, IngestError> {
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        {
            let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            for id in ids {
                match recent.0.get(id) {
                    Some(f) => {
                        found.insert(*id, *f);
                    }
                    None => missing.push(*id),
                }
            }
        }
        if !missing.is_empty() {
            let client = self.pool.get().await.map_err(StoreError::from)?;
            found.extend(stored_fingerprints(&client, &missing).await?);
        }
        Ok(found)
    }

    /// Claims each of `reports` for its id, atomically within this process: refused (`false`)
    /// when the id is already another report's (claimed here, or `stored`), else claimed
    /// (`true`). Returns, as well, the claims made now, to [`KnownIds::release`] if the
    /// reports are not acknowledged.
    fn claim(
        &self,
        reports: &[(Uuid, ReportFingerprint)],
        stored: &HashMap<Uuid, ReportFingerprint>,
    ) -> (Vec<bool>, Vec<(Uuid, ReportFingerprint)>) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *recent;
        let mut made = Vec::new();
        let passed = reports
            .iter()
            .map(
                |&(id, mine)| match map.get(&id).or_else(|| stored.get(&id)) {
                    Some(first) if *first != mine => false,
                    Some(_) if map.contains_key(&id) => true,
                    _ => {
                        map.insert(id, mine);
                        order.push_back(id);
                        made.push((id, mine));
                        true
                    }
                },
            )
            .collect();
        while order.len() > RECENT_IDS {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        (passed, made)
    }

    /// Gives back claims whose reports the broker did not acknowledge.
    fn release(&self, claims: &[(Uuid, ReportFingerprint)]) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        for (id, f) in claims {
            if recent.0.get(id) == Some(f) {
                recent.0.remove(id);
            }
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

/// Which persons exist, cached; an erased person is unknown from the moment this process
/// learns of the erasure ([`crate::pipeline::erasure`]).
pub struct PersonDirectory {
    pool: Pool,
    known: RwLock<HashSet<PersonId>>,
    erased: Arc<ErasedPersons>,
}

impl PersonDirectory {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            known: RwLock::default(),
            erased: Arc::default(),
        }
    }

    /// Drops `person` from the cache (it was erased).
    pub fn forget(&self, person: PersonId) {
        self.known.write().expect("not poisoned").remove(&person);
    }

    /// The persons among `ids` that do not exist.
    pub async fn unknown(&self, ids: &[PersonId]) -> Result<HashSet<PersonId>, StoreError> {
        let missing: Vec<PersonId> = {
            let known = self.known.read().expect("not poisoned");
            let erased = self.erased.current();
            let mut m: Vec<PersonId> = ids
                .iter()
                .filter(|id| !known.contains(id) || erased.contains(id))
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
        let erased = self.erased.current();
        let found: HashSet<PersonId> = rows
            .iter()
            .map(|r| r.get(0))
            .filter(|id| !erased.contains(id))
            .collect();
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
    known_ids: KnownIds,
    /// The store, to resume event time from at start.
    pool: Pool,
    sequencer: Sequencer,
    future_skew_s: u32,
    late_horizon_s: u32,
    /// What the heartbeats promise.
    event_time: Mutex<EventTime>,
    /// The engine's parameters (clock skew, lateness).
    params: udaconnect_actors::EngineParams,
    partitions: u32,
    counters: IngestCounters,
    /// [`udaconnect_actors::EngineParams::settle_us`] of the configuration.
    settle_us: Micros,
    /// The bootstrap servers, to name in errors.
    brokers: String,
    /// How long a call waits for the broker's acknowledgement.
    ack_timeout: Duration,
}

/// The ingest side's event time, which its heartbeats carry to every zone partition (see
/// docs/architecture.md, "Time we trust"): the latest trusted time of an acknowledged report
/// ([`udaconnect_actors::EngineParams::trusted_time`]), moving on with the ingest's own clock
/// while no report comes, so that quiet meetings end, when that report was live (received at
/// most `lateness_s` after its time; a replay of the past has no clock of its own); never so
/// far that a report still in flight to the broker would arrive late; and at least what was
/// declared.
#[derive(Debug, Default)]
pub struct EventTime {
    /// The latest trusted time of an acknowledged report (µs since the Unix epoch).
    latest: Option<Micros>,
    /// The most timely acknowledged report's trusted time minus its receive time (µs): while
    /// no report comes, event time follows the receive clock by this much, when that report
    /// was live (received at most `lateness_s` after its time). Kept apart from `latest`, so
    /// that late uploads (newer than every live report but received long after their time)
    /// cannot stop the clock.
    live_offset: Option<Micros>,
    /// Trusted times of reports sent and not yet acknowledged, with their counts.
    in_flight: BTreeMap<Micros, u32>,
    /// The latest time declared by [`Ingestor::advance_event_time`].
    declared: Option<Micros>,
}

impl EventTime {
    /// What a heartbeat sent at `now` promises, or `None` before any report or declaration.
    pub fn heartbeat(&self, now: Micros, lateness_us: Micros) -> Option<Micros> {
        // Only a live stream follows the clock: a conference replayed from the past has no
        // clock of its own, and its event time moves with its reports alone.
        let live = self
            .live_offset
            .filter(|offset| *offset >= -lateness_us)
            .map(|offset| {
                let h = now.saturating_add(offset);
                match self.in_flight.first_key_value() {
                    Some((&oldest, _)) => h.min(oldest.saturating_add(lateness_us)),
                    None => h,
                }
            });
        // `None` orders before any `Some`.
        live.max(self.latest).max(self.declared)
    }

    /// Reports whose earliest trusted time is `t` are on their way to the broker.
    pub fn sending(&mut self, t: Micros) {
        *self.in_flight.entry(t).or_default() += 1;
    }

    /// Those reports were acknowledged (`acked`: their latest trusted time, received at
    /// `received_at`) or failed (`None`).
    pub fn sent(&mut self, t: Micros, acked: Option<(Micros, Micros)>) {
        if let Some(n) = self.in_flight.get_mut(&t) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&t);
            }
        }
        if let Some((latest, received_at)) = acked {
            self.observe(latest, received_at);
        }
    }

    /// Takes in an acknowledged report: trusted time `t`, received at `received_at`.
    fn observe(&mut self, t: Micros, received_at: Micros) {
        self.latest = self.latest.max(Some(t));
        self.live_offset = self.live_offset.max(Some(t.saturating_sub(received_at)));
    }

    /// Starts from what the stored reports say (a restarted process, or one that has not
    /// received a report yet): `stored`, the (trusted time, receive time) of recent reports.
    pub fn resume(&mut self, stored: impl IntoIterator<Item = (Micros, Micros)>) {
        for (t, received_at) in stored {
            self.observe(t, received_at);
        }
    }

    /// The latest trusted or declared time, without the clock's progress.
    pub fn max_event_time(&self) -> Option<Micros> {
        self.latest.max(self.declared)
    }
}

/// Hands the ingest calls' records to the producer in the order the calls came in: a call held
/// up before producing (its PostgreSQL look-ups, a busy core) is never overtaken by a later
/// one, so every partition holds a process's reports in the order it received them, and what
/// a later call moves event time to cannot make an earlier call's reports late.
#[derive(Debug)]
struct Sequencer {
    next: AtomicU64,
    /// The ticket whose turn it is.
    turn: watch::Sender<u64>,
    /// Tickets done out of turn (dropped before their turn came: a call that failed early).
    done: Mutex<BTreeSet<u64>>,
}

impl Default for Sequencer {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(0),
            turn: watch::Sender::new(0),
            done: Mutex::new(BTreeSet::new()),
        }
    }
}

impl Sequencer {
    /// The next place in line.
    fn ticket(&self) -> Ticket<'_> {
        Ticket {
            sequencer: self,
            n: self.next.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// A place in a [`Sequencer`]'s line; dropping it (handed over, failed or cancelled) lets the
/// next one go.
struct Ticket<'a> {
    sequencer: &'a Sequencer,
    n: u64,
}

impl Ticket<'_> {
    /// Waits until every earlier ticket is dropped.
    async fn wait(&self) {
        let mut turn = self.sequencer.turn.subscribe();
        // The sender lives as long as the sequencer, which outlives its tickets.
        let _ = turn.wait_for(|t| *t >= self.n).await;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // A poisoned lock still holds the line's state: go on with it.
        let mut done = self
            .sequencer
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        done.insert(self.n);
        self.sequencer.turn.send_modify(|turn| {
            while done.remove(turn) {
                *turn += 1;
            }
        });
    }
}

/// The ids a call claimed ([`KnownIds::claim`]), given back when it is dropped unless kept
/// (the broker acknowledged the reports).
struct Claims<'a> {
    ids: &'a KnownIds,
    claims: Vec<(Uuid, ReportFingerprint)>,
    kept: bool,
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        if !self.kept && !self.claims.is_empty() {
            self.ids.release(&self.claims);
        }
    }
}

/// One call's reports on their way to the broker, held in [`EventTime`] until this is dropped,
/// so that a call cancelled half-way (a client that hung up) leaves nothing behind to hold the
/// heartbeats back.
struct InFlight<'a> {
    time: &'a Mutex<EventTime>,
    earliest: Micros,
    /// Set when the broker acknowledged: the reports' latest trusted time and receive time.
    acked: Option<(Micros, Micros)>,
}

impl<'a> InFlight<'a> {
    fn start(time: &'a Mutex<EventTime>, earliest: Micros) -> Self {
        time.lock().expect("not poisoned").sending(earliest);
        Self {
            time,
            earliest,
            acked: None,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut time = self.time.lock().unwrap_or_else(|e| e.into_inner());
        time.sent(self.earliest, self.acked.take());
    }
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
            persons: PersonDirectory::new(pool.clone()),
            known_ids: KnownIds::new(pool.clone()),
            pool,
            sequencer: Sequencer::default(),
            future_skew_s: config.future_skew_s,
            late_horizon_s: config.late_horizon_s,
            event_time: Mutex::new(EventTime::default()),
            params: config.engine_params(),
            partitions,
            counters: IngestCounters::default(),
            settle_us: config.engine_params().settle_us(),
            brokers: config.kafka_brokers.clone(),
            ack_timeout: Duration::from_millis(config.ingest_ack_timeout_ms),
        }
    }

    /// Produces `records` and waits for the broker's acknowledgement of all of them, for at
    /// most the configured timeout. With a `turn`, the records are handed to the producer only
    /// once every call that came in before has handed over its own ([`Sequencer`]).
    async fn produce(
        &self,
        records: &[OutRecord<'_>],
        turn: Option<Ticket<'_>>,
    ) -> Result<(), IngestError> {
        let send = async move {
            if let Some(turn) = &turn {
                turn.wait().await;
            }
            let pending = self.producer.enqueue_all(records).await;
            drop(turn);
            Producer::acknowledged(pending?).await
        };
        match tokio::time::timeout(self.ack_timeout, send).await {
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
        c.accepted.inc_by(report.accepted.len() as u64);
        c.rejected.inc_by(report.rejected.len() as u64);
        let reused = report
            .rejected
            .iter()
            .filter(|r| r.kind == RejectionKind::IdReused)
            .count();
        c.id_reused.inc_by(reused as u64);
        Ok(report)
    }

    /// Counts into `counters` (a pipeline's registered series) instead of its own.
    pub fn with_counters(mut self, counters: IngestCounters) -> Self {
        self.counters = counters;
        self
    }

    /// Refuses the reports of the persons in `erased` (those erased in the cluster, as this
    /// process knows them) as those of unknown persons.
    pub fn with_erased(mut self, erased: Arc<ErasedPersons>) -> Self {
        self.persons.erased = erased;
        self
    }

    /// Forgets that `person` exists (it was erased): its next report is checked against the
    /// store, where it is gone.
    pub fn forget_person(&self, person: PersonId) {
        self.persons.forget(person);
    }

    async fn ingest_uncounted(
        &self,
        events: &[NewLocationEvent],
    ) -> Result<IngestReport, IngestError> {
        // Taken before any wait: this call's records go out after those of every call that
        // came in before it, whatever the look-ups below take.
        let turn = self.sequencer.ticket();
        let received_at = now_micros();
        let mut report = IngestReport::default();
        let mut valid: Vec<(usize, LocationEvent)> = Vec::with_capacity(events.len());
        for (index, e) in events.iter().enumerate() {
            match e.validate(received_at, self.future_skew_s, self.late_horizon_s) {
                Ok(event) => valid.push((index, event)),
                Err(error) => report.rejected.push(Rejection {
                    index,
                    error,
                    kind: RejectionKind::Invalid,
                }),
            }
        }
        // In flight from now on: no heartbeat may promise past these reports while this call
        // looks persons and ids up and produces.
        let trusted = |e: &LocationEvent| self.params.trusted_time(e.recorded_at, e.received_at);
        let mut in_flight = valid
            .iter()
            .map(|(_, e)| trusted(e))
            .min()
            .map(|earliest| InFlight::start(&self.event_time, earliest));
        let ids: Vec<PersonId> = valid.iter().map(|(_, e)| e.person_id).collect();
        let unknown = self.persons.unknown(&ids).await?;
        if !unknown.is_empty() {
            valid.retain(|(index, e)| {
                let ok = !unknown.contains(&e.person_id);
                if !ok {
                    report.rejected.push(Rejection {
                        kind: RejectionKind::UnknownPerson,
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
        let claims = self
            .refuse_reused_ids(events, &mut valid, &mut report)
            .await?;
        // Claims are given back unless the broker acknowledges (a failed or cancelled call).
        let claims = Claims {
            ids: &self.known_ids,
            claims,
            kept: false,
        };
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
        let mut ahead = 0u64;
        let mut latest = Micros::MIN;
        for (_, e) in &valid {
            let t = trusted(e);
            ahead += u64::from(t < e.recorded_at);
            latest = latest.max(t);
        }
        self.counters.ahead_of_clock.inc_by(ahead);
        let mut records = Vec::new();
        for (p, copies) in per_partition.iter().enumerate() {
            for chunk in copies.chunks(MAX_COPIES_PER_RECORD) {
                self.counters.copies_per_record.observe(chunk.len() as f64);
                records.push(OutRecord {
                    topic: &self.topic,
                    partition: Some(p as i32),
                    key: None,
                    payload: LocationRecord::Events(chunk.to_vec()).encode(),
                    headers: Vec::new(),
                });
            }
        }
        let produced = self.produce(&records, Some(turn)).await;
        if let Some(in_flight) = &mut in_flight {
            in_flight.acked = produced.is_ok().then_some((latest, received_at));
        }
        drop(in_flight);
        produced?;
        let mut claims = claims;
        claims.kept = true;
        self.counters.records.inc_by(records.len() as u64);
        report.accepted = valid.iter().map(|(i, e)| (*i, e.event_id)).collect();
        Ok(report)
    }

    /// Refuses the events whose client-chosen `event_id` is already the id of a different
    /// report (earlier in this request, claimed by a call of this process, or stored); an
    /// identical retry passes. The ids that pass are claimed at once, so that a call running
    /// at the same time cannot pass with another report; returns the claims made, to give
    /// back if the broker does not acknowledge.
    async fn refuse_reused_ids(
        &self,
        sent: &[NewLocationEvent],
        valid: &mut Vec<(usize, LocationEvent)>,
        report: &mut IngestReport,
    ) -> Result<Vec<(Uuid, ReportFingerprint)>, IngestError> {
        let chosen: Vec<(Uuid, ReportFingerprint)> = valid
            .iter()
            .filter(|(i, _)| sent[*i].event_id.is_some())
            .map(|(_, e)| (e.event_id, ReportFingerprint::of(e)))
            .collect();
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = chosen.iter().map(|(id, _)| *id).collect();
        let stored = self.known_ids.first_reports(&ids).await?;
        let (passed, claims) = self.known_ids.claim(&chosen, &stored);
        let mut verdicts = passed.into_iter();
        let before = report.rejected.len();
        valid.retain(|(index, e)| {
            if sent[*index].event_id.is_none() || verdicts.next().unwrap_or(true) {
                return true;
            }
            report.rejected.push(Rejection {
                index: *index,
                kind: RejectionKind::IdReused,
                error: ValidationError {
                    field: "event_id",
                    reason: format!(
                        "{} is already the id of a different report (person, place or time); a \
                         retry must send the same report, a new report a new id",
                        e.event_id
                    ),
                },
            });
            false
        });
        if report.rejected.len() > before {
            report.rejected.sort_by_key(|r| r.index);
        }
        Ok(claims)
    }

    /// The locations topic's partition count it routes to.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The latest trusted event time accepted or declared so far (`Micros::MIN` before any).
    pub fn max_event_time(&self) -> Micros {
        self.event_time
            .lock()
            .expect("not poisoned")
            .max_event_time()
            .unwrap_or(Micros::MIN)
    }

    /// What a heartbeat sent now promises ([`EventTime::heartbeat`]), or `None` before any
    /// report.
    pub fn heartbeat_time(&self) -> Option<Micros> {
        let lateness_us =
            i64::from(self.params.lateness_s) * udaconnect_actors::domain::MICROS_PER_S;
        self.event_time
            .lock()
            .expect("not poisoned")
            .heartbeat(now_micros(), lateness_us)
    }

    /// Sends a heartbeat with the ingest side's event time ([`EventTime`]) to every locations
    /// partition.
    pub async fn heartbeat(&self) -> Result<(), IngestError> {
        let Some(max_event_time) = self.heartbeat_time() else {
            return Ok(());
        };
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
        self.produce(&records, None).await?;
        Ok(())
    }

    /// Declares that event time has reached `t` (say, the end of a conference day): no event
    /// earlier than `t - lateness` will come, so episodes that ended before it close now.
    pub async fn advance_event_time(&self, t: Micros) -> Result<(), IngestError> {
        {
            let mut event_time = self.event_time.lock().expect("not poisoned");
            event_time.declared = Some(event_time.declared.map_or(t, |d| d.max(t)));
        }
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

    /// How many of the latest stored reports a starting process reads to resume event time.
    const RESUME_FROM: i64 = 1_000;

    /// Resumes event time from the latest stored reports ([`EventTime::resume`]), so that a
    /// restarted process (or one that has not received a report yet) keeps moving it while
    /// nobody reports and quiet meetings still end. A store that does not answer is logged and
    /// skipped: the first report received then starts it.
    async fn resume_event_time(&self) {
        let skew_us = i64::from(self.params.clock_skew_s) * udaconnect_actors::domain::MICROS_PER_S;
        let rows = async {
            let client = self.pool.get().await?;
            let rows = client
                .query(
                    "SELECT recorded_at, received_at FROM location
                     WHERE zone IS NOT NULL ORDER BY recorded_at DESC LIMIT $1",
                    &[&Self::RESUME_FROM],
                )
                .await?;
            Ok::<_, crate::store::StoreError>(rows)
        }
        .await;
        match rows {
            Ok(rows) => {
                let stored: Vec<(Micros, Micros)> = rows
                    .iter()
                    .map(|r| {
                        let recorded = crate::store::micros(r.get(0));
                        let received = crate::store::micros(r.get(1));
                        let trusted =
                            udaconnect_actors::params::trusted_time(recorded, received, skew_us);
                        (trusted, received)
                    })
                    .collect();
                self.event_time
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .resume(stored);
            }
            Err(e) => warn!(error = %e, "event time not resumed from the stored reports"),
        }
    }

    /// Sends heartbeats every `interval` while event time moves (with reports, or with the
    /// clock once there was one), until `shutdown` is cancelled.
    pub fn spawn_heartbeats(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.resume_event_time().await;
            let mut sent = Micros::MIN;
            let mut ticker = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let Some(now) = this.heartbeat_time() else {
                    continue;
                };
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
            // The same rules as a REST body: errors name the field.
            let parsed = crate::input::parse_json(text.as_bytes())
                .and_then(|v| <NewLocationEvent as crate::input::FromJson>::from_json(&v));
            match parsed {
                Ok(event) => pending.push((read, event)),
                Err(e) => report_rejection(&mut rejected, read, e.describe()),
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

#[cfg(test)]
mod tests {
    use udaconnect_actors::domain::MICROS_PER_S;

    use super::{EventTime, Sequencer};

    const T: i64 = 1_790_000_000 * MICROS_PER_S;
    const S: i64 = MICROS_PER_S;

    #[test]
    fn event_time_moves_with_the_clock_while_quiet_but_never_past_a_report_in_flight() {
        let lateness = 30 * S;
        let mut time = EventTime::default();
        assert_eq!(time.heartbeat(T, lateness), None, "nothing to promise yet");
        // A report stamped T - 1 s, received at T, acknowledged.
        time.sending(T - S);
        time.sent(T - S, Some((T - S, T)));
        assert_eq!(time.heartbeat(T, lateness), Some(T - S));
        // Nobody reports for 100 s: event time moves on with the clock.
        assert_eq!(time.heartbeat(T + 100 * S, lateness), Some(T + 99 * S));
        // A report stamped T + 50 s is on its way: no heartbeat may make it late.
        time.sending(T + 50 * S);
        assert_eq!(time.heartbeat(T + 100 * S, lateness), Some(T + 80 * S));
        // It failed: the clock alone again.
        time.sent(T + 50 * S, None);
        assert_eq!(time.heartbeat(T + 100 * S, lateness), Some(T + 99 * S));
        // An older report acknowledged later does not move event time back.
        time.sending(T - 10 * S);
        time.sent(T - 10 * S, Some((T - 10 * S, T + 100 * S)));
        assert_eq!(time.heartbeat(T + 100 * S, lateness), Some(T + 99 * S));
        assert_eq!(time.max_event_time(), Some(T - S));
        // A replay of the past (received long after its time) moves with its reports alone.
        let mut replay = EventTime::default();
        replay.sending(T - 3_600 * S);
        replay.sent(T - 3_600 * S, Some((T - 3_600 * S, T)));
        assert_eq!(replay.heartbeat(T + 100 * S, lateness), Some(T - 3_600 * S));
        // A declaration (the end of a conference) wins when it is later.
        time.declared = Some(T + 1_000 * S);
        assert_eq!(time.heartbeat(T + 100 * S, lateness), Some(T + 1_000 * S));

        // A late upload newer than every live report (stamped T + 10 s, received at T + 40 s)
        // does not stop the clock: it keeps following the live report.
        let mut time = EventTime::default();
        time.sending(T);
        time.sent(T, Some((T, T)));
        time.sending(T + 10 * S);
        time.sent(T + 10 * S, Some((T + 10 * S, T + 40 * S)));
        assert_eq!(time.heartbeat(T + 100 * S, lateness), Some(T + 100 * S));
        assert_eq!(time.max_event_time(), Some(T + 10 * S));

        // A process that starts from the stored reports follows the clock from the live ones.
        let mut restarted = EventTime::default();
        restarted.resume([(T - 3_600 * S, T - 3_000 * S), (T, T + S)]);
        assert_eq!(restarted.heartbeat(T + 100 * S, lateness), Some(T + 99 * S));
        let mut replayed = EventTime::default();
        replayed.resume([(T - 3_600 * S, T)]);
        assert_eq!(
            replayed.heartbeat(T + 100 * S, lateness),
            Some(T - 3_600 * S)
        );
    }

    #[tokio::test]
    async fn calls_hand_over_in_the_order_they_came_in_even_when_one_fails_early() {
        let sequencer = Sequencer::default();
        let first = sequencer.ticket();
        let second = sequencer.ticket();
        let third = sequencer.ticket();
        // The third waits for both before it.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), third.wait());
        assert!(
            waiting.await.is_err(),
            "the third went before the first two"
        );
        // The second fails before its turn: it must not hold the line.
        drop(second);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), third.wait());
        assert!(waiting.await.is_err(), "the third went before the first");
        first.wait().await;
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), third.wait())
            .await
            .expect("the third's turn came");
        assert_eq!(*sequencer.turn.borrow(), 2);
    }
}
