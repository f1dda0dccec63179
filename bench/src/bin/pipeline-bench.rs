//! `pipeline-bench`: the pipeline end to end through the broker (docs/design.md §10), against bare
//! producers and consumers moving the same Kafka records through the same broker in the same
//! run, and the ingest-ack → notification latency at half the sustainable rate.
//!
//! 1. **pipeline**: a fresh database and topic prefix, the persons inserted, a [`Pipeline`]
//!    started in this process; a simulated conference (generated before the clock starts) is
//!    ingested as fast as acknowledgements allow (`--concurrency` calls of `--batch` events in
//!    flight), then event time is declared past its end. The clock runs from the first ingest
//!    call until everything is durable: the last notification is read from the connections
//!    topic (the persons stage emits the final `connection.ended` notifications only once
//!    every zone partition has processed its records up to the end-of-conference heartbeat),
//!    and then every partition of both stages has stored a snapshot, which it does only once
//!    the home events and episode changes it covers are written (both are written in the
//!    background, apart from the notifications). That both stages then have nothing left is
//!    checked, polling the pipeline's status once a second (each poll asks the broker for 16
//!    end offsets; polling faster would load the broker during the measurement).
//! 2. **bare**: the exact records the pipeline wrote to its locations, person-updates and
//!    connections topics are read back and moved again through fresh topics with the same
//!    partition counts: a producer writes the locations records; a consumer of those forwards
//!    the person-updates records in proportion to what it consumed; a consumer of those
//!    forwards the connections records likewise; a last consumer reads them. The clock runs
//!    from the first record produced until that consumer has the last one.
//! 3. **latency**: a new conference (fresh database and prefix, arrival in event-time order)
//!    paced at half the pipeline's events/s; each `connection.started` notification is matched
//!    to the acknowledgement of the event whose `recorded_at` is the episode's `started_at`
//!    (the person's or the peer's).
//!
//! With `--late-share`, that share of the reports is held back and uploaded late, as phones
//! that were offline do (60 s to `--late-delay-s` of event time after the others): the pipeline
//! phase then also checks the stored episodes against the reference engine, and the latency
//! phase reports the late path's delay (a late upload's acknowledgement to the
//! `connection.started` of the episode it starts) apart from the on-time figures.
//!
//! Progress goes to stderr; the last line of stdout is one JSON object with the figures.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer as _, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use udaconnect::kafka::{consumer_config, producer_config, TopicSpec};
use udaconnect::pipeline::codec::decode_notifications;
use udaconnect::pipeline::Pipeline;
use udaconnect::Config;
use udaconnect_actors::actors::ports::Stage;
use udaconnect_actors::domain::{
    LocationEvent, Micros, NewLocationEvent, NotificationKind, PersonId, MICROS_PER_S,
};
use udaconnect_bench::produce::{wire, Acked, IngestPipe, IngestTally, Services};
use udaconnect_bench::scratch::{cleanup, fresh, generate, Leftovers};
use udaconnect_bench::sim::{ConferenceConfig, Simulation};
use udaconnect_bench::{percentile, with_database};
use uuid::Uuid;

/// Phases to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    Pipeline,
    Bare,
    Latency,
}

/// Measures the pipeline through the broker against bare producers and consumers, and the
/// ingest-ack → notification latency at half the sustainable rate.
#[derive(Debug, Parser)]
#[command(name = "pipeline-bench", version)]
struct Cli {
    /// Attendees of the simulated conference.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(2..))]
    attendees: u32,
    /// Simulated event time of the throughput conference, seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u32).range(60..))]
    duration_s: u32,
    /// Booths [default: attendees / 4, a sparse crowd as in the pipeline test].
    #[arg(long)]
    booths: Option<u32>,
    /// Probability that an attendee free to join a talk goes.
    #[arg(long, default_value_t = 0.05)]
    talk_probability: f64,
    /// Seed of the simulation (the latency phase uses the next one).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Events per ingest call.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
    /// Ingest calls in flight in the throughput phase.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,
    /// Partitions of the locations topic [default: the configuration's].
    #[arg(long)]
    locations_partitions: Option<i32>,
    /// Partitions of the person-updates topic [default: the configuration's].
    #[arg(long)]
    person_updates_partitions: Option<i32>,
    /// Partitions of the connections topic [default: the configuration's].
    #[arg(long)]
    connections_partitions: Option<i32>,
    /// Wall-clock length of the paced latency phase, seconds.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=3_600))]
    latency_seconds: u32,
    /// Events/s of the latency phase [default: half the pipeline phase's events/s; required
    /// when that phase does not run].
    #[arg(long)]
    latency_rate: Option<f64>,
    /// The latency phase makes one ingest call per tick with the events due by then (a
    /// gateway's batching window; the latency is measured from the call's acknowledgement).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    latency_tick_ms: u32,
    /// Largest arrival delay in the latency conference, seconds. 0 (arrival in event-time
    /// order) makes the event at an episode's started_at the one whose arrival opened it.
    #[arg(long, default_value_t = 0)]
    latency_disorder_s: u32,
    /// Share of the reports uploaded late (0 to 0.5): each is held back until the others'
    /// event time is past it by a delay drawn from 60 s to `--late-delay-s` (a phone that was
    /// offline), so it takes the late path. The pipeline phase then also checks the episodes
    /// against the reference engine, and the latency phase measures the late path's delay.
    #[arg(long, default_value_t = 0.0)]
    late_share: f64,
    /// Longest delay of a late report, simulated seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u32).range(61..=86_400))]
    late_delay_s: u32,
    /// Phases to run (comma separated); bare needs pipeline.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Phase::Pipeline, Phase::Bare, Phase::Latency])]
    phases: Vec<Phase>,
    /// fetch.wait.max.ms of this tool's consumers (the bare stages and the readers of the
    /// connections topic); the service's stage consumers use 20.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    fetch_wait_ms: u32,
    /// How long to wait for the pipeline to catch up, seconds.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
    /// Maintenance database on the configured server, where the fresh databases are created
    /// [default: database_url with the database `postgres`].
    #[arg(long)]
    admin_url: Option<String>,
    /// Keep the fresh databases and topics (they are dropped at the end otherwise).
    #[arg(long)]
    keep: bool,
    /// TOML configuration file, as `udaconnect --config`; `UDACONNECT_*` variables override it.
    #[arg(long, env = "UDACONNECT_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn say(text: impl std::fmt::Display) {
    eprintln!("pipeline-bench: {text}");
}

async fn run(cli: &Cli) -> anyhow::Result<serde_json::Value> {
    let mut base = Config::load(cli.config.as_deref())?;
    if let Some(p) = cli.locations_partitions {
        base.locations_partitions = p;
    }
    if let Some(p) = cli.person_updates_partitions {
        base.person_updates_partitions = p;
    }
    if let Some(p) = cli.connections_partitions {
        base.connections_partitions = p;
    }
    // The bench replays a conference of 2026-03-10: its reports are older than the default
    // late horizon of a day, which would refuse them.
    base.late_horizon_s = base.late_horizon_s.max(10 * 366 * 86_400);
    // Nor may retention delete them while the bench runs.
    base.retention_days = 0;
    base.validate()?;
    let admin_url = match &cli.admin_url {
        Some(url) => url.clone(),
        None => with_database(base.database_url.expose(), "postgres")?,
    };
    if cli.phases.contains(&Phase::Bare) && !cli.phases.contains(&Phase::Pipeline) {
        anyhow::bail!(
            "the bare phase moves the records of the pipeline phase: add --phases pipeline"
        );
    }
    if cli.phases.contains(&Phase::Latency)
        && !cli.phases.contains(&Phase::Pipeline)
        && cli.latency_rate.is_none()
    {
        anyhow::bail!("the latency phase without the pipeline phase needs --latency-rate");
    }
    let mut leftovers = Leftovers::default();
    let result = phases(cli, &base, &admin_url, &mut leftovers).await;
    if !cli.keep {
        cleanup(&base, &admin_url, &leftovers).await;
    }
    result
}

async fn phases(
    cli: &Cli,
    base: &Config,
    admin_url: &str,
    leftovers: &mut Leftovers,
) -> anyhow::Result<serde_json::Value> {
    let machine = json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": cpu_model(),
    });
    let mut out = json!({
        "tool": "pipeline-bench",
        "machine": machine,
        "params": {
            "attendees": cli.attendees,
            "duration_s": cli.duration_s,
            "booths": cli.booths.unwrap_or(cli.attendees / 4),
            "talk_probability": cli.talk_probability,
            "seed": cli.seed,
            "batch": cli.batch,
            "concurrency": cli.concurrency,
            "locations_partitions": base.locations_partitions,
            "person_updates_partitions": base.person_updates_partitions,
            "connections_partitions": base.connections_partitions,
            "latency_seconds": cli.latency_seconds,
            "latency_tick_ms": cli.latency_tick_ms,
            "fetch_wait_ms": cli.fetch_wait_ms,
            "latency_disorder_s": cli.latency_disorder_s,
            "late_share": cli.late_share,
            "late_delay_s": cli.late_delay_s,
        },
    });
    let mut events_per_s = None;
    if cli.phases.contains(&Phase::Pipeline) {
        let conference = conference(cli, cli.seed, cli.duration_s, None);
        let a = pipeline_phase(cli, base, admin_url, &conference, leftovers).await?;
        events_per_s = Some(a.events_per_s);
        out["events"] = json!(a.events);
        out["events_per_s"] = json!(a.events_per_s.round());
        out["pipeline"] = a.figures.clone();
        if cli.phases.contains(&Phase::Bare) {
            let b = bare_phase(
                base,
                &a,
                cli.fetch_wait_ms,
                Duration::from_secs(cli.timeout_s),
                leftovers,
            )
            .await?;
            out["bare_events_per_s"] = json!(b.events_per_s.round());
            out["ratio_to_bare"] =
                json!((a.events_per_s / b.events_per_s * 1000.0).round() / 1000.0);
            out["bare"] = b.figures;
        }
    }
    if cli.phases.contains(&Phase::Latency) {
        let rate = match (cli.latency_rate, events_per_s) {
            (Some(rate), _) => rate,
            (None, Some(eps)) => eps / 2.0,
            (None, None) => anyhow::bail!("no rate for the latency phase"),
        };
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "the latency rate must be positive (got {rate})"
        );
        let c = latency_phase(cli, base, admin_url, rate, leftovers).await?;
        out["p50_ms"] = json!(c.p50_ms);
        out["p99_ms"] = json!(c.p99_ms);
        out["late_path_p50_ms"] = c.figures["late_path_p50_ms"].clone();
        out["late_path_p99_ms"] = c.figures["late_path_p99_ms"].clone();
        out["latency"] = c.figures;
    }
    Ok(out)
}

// ------------------------------------------------------------------------------- set-up

/// Holds back `share` of `events` (chosen by a hash of the event id and position) as phones
/// that were offline do: each goes out once the event time of the others (their latest
/// `recorded_at` so far) is past its own by a delay from 60 s to `max_delay_s`, uploads in the
/// order they become due. Returns the new order and which positions of it are late uploads.
fn hold_back_late(
    events: Vec<LocationEvent>,
    share: f64,
    max_delay_s: u32,
    seed: u64,
) -> (Vec<LocationEvent>, Vec<bool>) {
    let mix = udaconnect_actors::zones::mix64;
    if share <= 0.0 {
        let n = events.len();
        return (events, vec![false; n]);
    }
    let threshold = (share.min(1.0) * u64::MAX as f64) as u64;
    let mut order = Vec::with_capacity(events.len());
    let mut late = Vec::with_capacity(events.len());
    let mut held: std::collections::BTreeMap<(Micros, usize), LocationEvent> = Default::default();
    let mut stream_time = Micros::MIN;
    for (i, e) in events.into_iter().enumerate() {
        let h = mix(e.event_id.as_u64_pair().0 ^ mix(i as u64 ^ seed));
        if h < threshold {
            let delay_s = 60 + mix(h) % u64::from(max_delay_s - 60 + 1);
            held.insert((e.recorded_at + delay_s as i64 * MICROS_PER_S, i), e);
            continue;
        }
        stream_time = stream_time.max(e.recorded_at);
        while let Some(entry) = held.first_entry() {
            if entry.key().0 > stream_time {
                break;
            }
            order.push(entry.remove());
            late.push(true);
        }
        order.push(e);
        late.push(false);
    }
    for (_, e) in held {
        order.push(e);
        late.push(true);
    }
    (order, late)
}

/// The simulated conference of the bench: a sparse crowd, as in the pipeline test.
fn conference(cli: &Cli, seed: u64, duration_s: u32, disorder_s: Option<u32>) -> ConferenceConfig {
    let mut c = ConferenceConfig::for_attendees(cli.attendees);
    c.duration_s = duration_s;
    c.booths = cli.booths.unwrap_or(cli.attendees / 4).max(1);
    c.talk_probability = cli.talk_probability;
    c.seed = seed;
    c.fit_venue();
    if let Some(d) = disorder_s {
        c.max_disorder_s = d;
        c.duplicate_rate = 0.0;
    }
    c
}

/// Persons, topics, and a pipeline owning every partition of both stages.
async fn start_pipeline(config: &Config, sim: &Simulation) -> anyhow::Result<(Services, Pipeline)> {
    let services = Services::prepare(config, sim).await?;
    let pipeline = Pipeline::start(config, services.pool.clone(), &services.broker)
        .await
        .context("failed to start the pipeline")?;
    let want = [
        config.locations_partitions as usize,
        config.person_updates_partitions as usize,
    ];
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = pipeline.status().await;
        let owned: Vec<usize> = status.stages.iter().map(|s| s.partitions.len()).collect();
        if owned == want {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pipeline was not assigned every partition within 90 s: {owned:?} of {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((services, pipeline))
}

/// Waits until both stages have processed every record in their topics (polled once a second:
/// each poll asks the broker for every partition's end offset).
async fn wait_processed(pipeline: &Pipeline, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let status = pipeline.status().await;
        let done = status.lag_total == 0
            && status
                .stages
                .iter()
                .flat_map(|s| &s.partitions)
                .all(|p| p.end_offset >= 0 && p.processed_offset == p.end_offset);
        if done {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pipeline did not catch up within {within:?}: lag {}",
            status.lag_total
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

// ------------------------------------------------------------------------------- Kafka I/O

/// One stored record of a topic.
#[derive(Debug, Clone)]
struct StoredRecord {
    partition: i32,
    offset: i64,
    timestamp_ms: i64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// A consumer with the service's consumer settings ([`consumer_config`]), and this tool's
/// `--fetch-wait-ms`.
fn consumer(config: &Config, fetch_wait_ms: u32) -> anyhow::Result<BaseConsumer> {
    consumer_config(config)
        .set(
            "group.id",
            format!("pipeline-bench-{}", Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .create()
        .context("failed to create a kafka consumer")
}

fn assign_all(c: &BaseConsumer, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)
        .with_context(|| format!("cannot assign {topic}"))?;
    Ok(())
}

/// High watermarks of every partition of `topic` (a topic created a moment ago may answer
/// "not leader" for a while: asked again for up to 10 s).
fn high_watermarks(c: &BaseConsumer, topic: &str, partitions: i32) -> anyhow::Result<Vec<i64>> {
    (0..partitions)
        .map(|p| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match c.fetch_watermarks(topic, p, Duration::from_secs(10)) {
                    Ok((_, high)) => return Ok(high),
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("cannot read the end offset of {topic}/{p}"))
                    }
                }
            }
        })
        .collect()
}

/// Every record now in `topic`, in (timestamp, partition, offset) order: about the order in
/// which they were produced.
fn read_topic(config: &Config, topic: &str, partitions: i32) -> anyhow::Result<Vec<StoredRecord>> {
    let c = consumer(config, 100)?;
    let ends = high_watermarks(&c, topic, partitions)?;
    assign_all(&c, topic, partitions)?;
    let total: i64 = ends.iter().sum();
    let mut records = Vec::with_capacity(total as usize);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (records.len() as i64) < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "read {} of {total} records of {topic} in 120 s",
            records.len()
        );
        match c.poll(Duration::from_millis(200)) {
            // Records produced after the end offsets were read are not this read's.
            Some(Ok(m)) if m.offset() < ends[m.partition() as usize] => {
                records.push(StoredRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                });
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => anyhow::bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    records.sort_by_key(|r| (r.timestamp_ms, r.partition, r.offset));
    Ok(records)
}

/// One record a [`Tap`] read.
struct TappedRecord {
    at: Instant,
    /// The record's timestamp (its producer's clock when it was produced), ms since the epoch.
    created_ms: i64,
    /// When it was read, ms since the epoch.
    read_ms: i64,
    payload: Vec<u8>,
}

/// What a [`Tap`] has read.
#[derive(Default)]
struct Tapped {
    count: u64,
    last: Option<Instant>,
    records: Vec<TappedRecord>,
}

/// A consumer of every partition of a topic from the beginning, on its own thread, noting
/// when each record arrived.
struct Tap {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<Tapped>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Tap {
    fn start(
        config: &Config,
        topic: &str,
        partitions: i32,
        fetch_wait_ms: u32,
        keep: bool,
    ) -> anyhow::Result<Self> {
        let c = consumer(config, fetch_wait_ms)?;
        // A metadata round trip first, so the clock does not include the connection.
        high_watermarks(&c, topic, partitions)?;
        assign_all(&c, topic, partitions)?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(Tapped::default()));
        let thread = {
            let (stop, state) = (Arc::clone(&stop), Arc::clone(&state));
            let topic = topic.to_owned();
            std::thread::Builder::new()
                .name("tap".to_owned())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        match c.poll(Duration::from_millis(50)) {
                            Some(Ok(m)) => {
                                let at = Instant::now();
                                let mut s = state.lock().expect("not poisoned");
                                s.count += 1;
                                s.last = Some(at);
                                if keep {
                                    s.records.push(TappedRecord {
                                        at,
                                        created_ms: m.timestamp().to_millis().unwrap_or(0),
                                        read_ms: chrono::Utc::now().timestamp_millis(),
                                        payload: m
                                            .payload()
                                            .map(<[u8]>::to_vec)
                                            .unwrap_or_default(),
                                    });
                                }
                            }
                            Some(Err(e)) => anyhow::bail!("reading {topic}: {e}"),
                            None => {}
                        }
                    }
                    Ok(())
                })
                .context("failed to start a consumer thread")?
        };
        Ok(Self {
            stop,
            state,
            thread: Some(thread),
        })
    }

    fn count_and_last(&self) -> (u64, Option<Instant>) {
        let s = self.state.lock().expect("not poisoned");
        (s.count, s.last)
    }

    /// Stops the consumer; what it read.
    fn finish(mut self) -> anyhow::Result<Tapped> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("a consumer thread panicked"))??;
        }
        Ok(std::mem::take(
            &mut *self.state.lock().expect("not poisoned"),
        ))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Waits until `tap` has read `total` records; when it read the last.
async fn tap_reaches(tap: &Tap, total: u64, within: Duration) -> anyhow::Result<Option<Instant>> {
    let deadline = Instant::now() + within;
    loop {
        let (count, last) = tap.count_and_last();
        if count >= total {
            return Ok(last);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "read {count} of {total} records within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn total_records(config: &Config, topic: &str, partitions: i32) -> anyhow::Result<u64> {
    let c = consumer(config, 100)?;
    Ok(high_watermarks(&c, topic, partitions)?.iter().sum::<i64>() as u64)
}

// ------------------------------------------------------------------------------- CPU

/// CPU seconds used so far, per process: this one, the broker (the process listening on the
/// configured broker port) and PostgreSQL (the backends of the phase's database and the
/// server's auxiliary processes, not other databases' backends: other clients share the
/// server).
#[derive(Debug, Clone, Default)]
struct Cpu {
    processes: HashMap<u32, (Role, f64)>,
    broker_found: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Bench,
    Broker,
    Postgres,
}

/// What [`Cpu::now`] counts.
struct CpuProbe {
    broker_pid: Option<u32>,
    database: String,
}

impl CpuProbe {
    fn new(config: &Config) -> Self {
        let port = config
            .kafka_brokers
            .split(',')
            .next()
            .and_then(|b| b.rsplit_once(':'))
            .and_then(|(_, p)| p.trim().parse::<u16>().ok());
        let database = config
            .database_url
            .expose()
            .split('?')
            .next()
            .and_then(|u| u.rsplit_once('/'))
            .map(|(_, d)| d.to_owned())
            .unwrap_or_default();
        Self {
            broker_pid: port.and_then(listener_pid),
            database,
        }
    }
}

/// Every process's pid and `/proc/<pid>` directory (none when `/proc` cannot be read).
fn processes() -> impl Iterator<Item = (u32, std::path::PathBuf)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((pid, entry.path()))
        })
}

/// The process listening on local TCP `port`, if this user may see it.
fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is ADDR:PORT in hex; state 0A is LISTEN; the inode is field 10.
            let listening = f.get(3) == Some(&"0A");
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for (pid, dir) in processes() {
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// Linux reports process times in USER_HZ ticks, 100 per second on every architecture's ABI.
const USER_HZ: f64 = 100.0;

/// A `/proc/<pid>/stat` line's command name and CPU seconds (its own, not its children's).
fn process_cpu(stat: &str) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) / USER_HZ))
}

impl Cpu {
    fn now(probe: &CpuProbe) -> Self {
        let mut cpu = Cpu {
            broker_found: probe.broker_pid.is_some(),
            ..Cpu::default()
        };
        let me = std::process::id();
        for (pid, dir) in processes() {
            let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
                continue;
            };
            let Some((comm, seconds)) = process_cpu(&stat) else {
                continue;
            };
            let role = if pid == me {
                Role::Bench
            } else if Some(pid) == probe.broker_pid {
                Role::Broker
            } else if comm == "postgres" {
                // Backends show `postgres: USER DATABASE HOST(PORT) STATE`; auxiliary
                // processes `postgres: checkpointer` and the like; the postmaster its path.
                let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                let Some(title) = cmdline.strip_prefix("postgres: ") else {
                    continue;
                };
                let backend = title.contains('(') || title.contains("[local]");
                let ours = title.split_whitespace().nth(1) == Some(probe.database.as_str());
                if backend && !ours {
                    continue;
                }
                Role::Postgres
            } else {
                continue;
            };
            cpu.processes.insert(pid, (role, seconds));
        }
        cpu
    }

    /// CPU seconds per role since `before` (processes that started and ended in between, and
    /// were not reaped by one counted here, are missed).
    fn since(&self, before: &Cpu, wall: f64) -> serde_json::Value {
        let used = |role: Role| {
            self.processes
                .iter()
                .filter(|(_, (r, _))| *r == role)
                .map(|(pid, (_, s))| s - before.processes.get(pid).map_or(0.0, |(_, b)| *b))
                .sum::<f64>()
        };
        let r = |x: f64| (x * 100.0).round() / 100.0;
        json!({
            "wall_s": r(wall),
            "bench_process_s": r(used(Role::Bench)),
            "broker_s": if self.broker_found { Some(r(used(Role::Broker))) } else { None },
            "postgres_s": r(used(Role::Postgres)),
        })
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default()
}

// ------------------------------------------------------------------------------- phase 1

struct PipelineRun {
    events: u64,
    events_per_s: f64,
    config: Config,
    figures: serde_json::Value,
}

// Longer than our ~120-line rule on purpose: one phase of the bench, its steps in the order
// they run (set up, warm up, measure, drain, verify, report), sharing the timings and counts
// they report; split, each step would take and return a dozen of them.
async fn pipeline_phase(
    cli: &Cli,
    base: &Config,
    admin_url: &str,
    conference: &ConferenceConfig,
    leftovers: &mut Leftovers,
) -> anyhow::Result<PipelineRun> {
    say(format!(
        "pipeline phase: generating {} attendees × {} s",
        conference.attendees, conference.duration_s
    ));
    let mut config = fresh(base, admin_url, leftovers).await?;
    config.zone_resolution = conference.zone_resolution;
    let (sim, events) = generate(conference.clone())?;
    let (events, late) = hold_back_late(events, cli.late_share, cli.late_delay_s, cli.seed);
    let late_uploads = late.iter().filter(|l| **l).count();
    // With late uploads, what the episodes must be (before the clock starts): the engine,
    // which the oracle property tests hold equal to the brute force.
    let expected_episodes = if late_uploads > 0 {
        say(format!(
            "pipeline phase: {late_uploads} reports held back as late uploads; computing the \
             reference episodes"
        ));
        let mut engine = udaconnect_actors::Engine::new(
            &config.engine_params(),
            udaconnect_actors::EngineOptions::default(),
        )?;
        for chunk in events.chunks(1_000) {
            engine.ingest(chunk);
        }
        engine.finish();
        let episodes = engine.episodes();
        let colocations: i64 = episodes.iter().map(|e| i64::from(e.colocations)).sum();
        Some((episodes.len() as i64, colocations))
    } else {
        None
    };
    let (services, pipeline) = start_pipeline(&config, &sim).await?;
    let topics = config.topics();
    let tap = Tap::start(
        &config,
        &topics.connections,
        config.connections_partitions,
        cli.fetch_wait_ms,
        false,
    )?;
    say(format!(
        "pipeline phase: ingesting {} events ({} per call, {} calls in flight)",
        events.len(),
        cli.batch,
        cli.concurrency
    ));
    let probe = CpuProbe::new(&config);
    let cpu_before = Cpu::now(&probe);
    let started = Instant::now();
    let ingestor = Arc::clone(pipeline.ingestor());
    let mut pipe = IngestPipe::new(Arc::clone(&ingestor), cli.concurrency as usize);
    let mut tally = IngestTally::default();
    let mut next_progress = Instant::now() + Duration::from_secs(5);
    for chunk in events.chunks(cli.batch as usize) {
        tally.add(&pipe.push(chunk.iter().map(wire).collect()).await?);
        if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(5);
            say(format!(
                "pipeline phase: {} events acknowledged, {:.0} events/s",
                tally.accepted,
                tally.accepted as f64 / started.elapsed().as_secs_f64()
            ));
        }
    }
    tally.add(&pipe.drain().await?);
    anyhow::ensure!(
        tally.rejected == 0 && tally.accepted == events.len() as u64,
        "{} of {} events rejected: {:?}",
        tally.rejected,
        events.len(),
        tally.rejections
    );
    ingestor
        .finish()
        .await
        .context("the end-of-conference heartbeat was not acknowledged")?;
    let ingested = started.elapsed().as_secs_f64();
    say(format!(
        "pipeline phase: all acknowledged after {ingested:.1} s; waiting for both stages"
    ));
    let timeout = Duration::from_secs(cli.timeout_s);
    wait_processed(&pipeline, timeout).await?;
    let connections = total_records(&config, &topics.connections, config.connections_partitions)?;
    let last_notification = tap_reaches(&tap, connections, timeout).await?;
    let notified = last_notification.context("the conference produced no notification")?;
    // Durable: every partition snapshots now, which waits for its location and episode writes.
    let partitions: Vec<(Stage, i32)> = [Stage::Zones, Stage::Persons]
        .into_iter()
        .flat_map(|stage| (0..pipeline.partitions(stage) as i32).map(move |p| (stage, p)))
        .collect();
    for result in futures::future::join_all(
        partitions
            .iter()
            .map(|(stage, p)| pipeline.snapshot_now(*stage, *p)),
    )
    .await
    {
        result.context("a partition could not snapshot at the end")?;
    }
    let finished = Instant::now();
    let elapsed = (finished - started).as_secs_f64();
    let cpu = Cpu::now(&probe).since(&cpu_before, elapsed);
    let status = pipeline.status().await;
    pipeline.stop().await;
    drop(tap.finish()?);

    let client = services
        .pool
        .get()
        .await
        .context("postgres: no connection")?;
    let count = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(sql, &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .with_context(|| format!("{sql} failed"))
        }
    };
    let stored = count("SELECT count(*) FROM location").await?;
    let episodes = count("SELECT count(*) FROM connection").await?;
    let open = count("SELECT count(*) FROM connection WHERE ended_at IS NULL").await?;
    let distinct = {
        let mut ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len() as i64
    };
    anyhow::ensure!(
        stored == distinct,
        "the pipeline stored {stored} locations of {distinct} distinct events"
    );
    if let Some(expected) = expected_episodes {
        let colocations =
            count("SELECT coalesce(sum(colocations), 0)::int8 FROM connection").await?;
        anyhow::ensure!(
            (episodes, colocations) == expected,
            "the pipeline stored {episodes} episode rows of {colocations} co-locations; the \
             reference has {} of {}",
            expected.0,
            expected.1
        );
    }
    let locations_records = total_records(&config, &topics.locations, config.locations_partitions)?;
    let person_update_records = total_records(
        &config,
        &topics.person_updates,
        config.person_updates_partitions,
    )?;
    let events_per_s = events.len() as f64 / elapsed;
    say(format!(
        "pipeline phase: {} events in {elapsed:.2} s = {events_per_s:.0} events/s \
         ({locations_records} locations records, {person_update_records} person-updates \
         records, {connections} connections records, {episodes} episode rows)",
        events.len()
    ));
    Ok(PipelineRun {
        events: events.len() as u64,
        events_per_s,
        figures: json!({
            "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
            "last_notification_s": ((notified - started).as_secs_f64() * 1000.0).round() / 1000.0,
            "ingest_acked_s": (ingested * 1000.0).round() / 1000.0,
            "events_per_s": events_per_s.round(),
            "distinct_events": distinct,
            "late_uploads": late_uploads,
            "late_copies": status.stages[0].partitions.iter()
                .map(|p| p.figures.counters.get("late_events").copied().unwrap_or(0))
                .sum::<u64>(),
            "episodes_expected": expected_episodes.map(|e| e.0),
            "locations_stored": stored,
            "episodes": episodes,
            "open_episodes_after": open,
            "dead_letters": status.dead_letters,
            "locations_records": locations_records,
            "person_update_records": person_update_records,
            "connection_records": connections,
            "cpu": cpu,
            "topic_prefix": config.topic_prefix,
        }),
        config,
    })
}

// ------------------------------------------------------------------------------- phase 2

struct BareRun {
    events_per_s: f64,
    figures: serde_json::Value,
}

/// Counts the records the broker did not take.
#[derive(Default)]
struct DeliveryCount {
    failed: std::sync::atomic::AtomicU64,
}

impl rdkafka::ClientContext for DeliveryCount {}

impl rdkafka::producer::ProducerContext for DeliveryCount {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type BareProducer = ThreadedProducer<DeliveryCount>;

/// The bare producers' settings: those of the service's one producer
/// ([`producer_config`], with `kafka_producer_options`), except that a record waits for
/// delivery as long as it takes: a bare producer enqueues everything at once, where the
/// service awaits each batch's acknowledgements before it sends more.
fn bare_producer(config: &Config) -> anyhow::Result<BareProducer> {
    producer_config(config)
        .set("message.timeout.ms", "0")
        .create_with_context(DeliveryCount::default())
        .context("failed to create a kafka producer")
}

/// Waits until every record is delivered; fails if the broker refused any.
fn flush(producer: &BareProducer, topic: &str) -> anyhow::Result<()> {
    producer
        .flush(Duration::from_secs(600))
        .with_context(|| format!("flushing to {topic}"))?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    anyhow::ensure!(
        failed == 0,
        "{failed} records to {topic} were not delivered"
    );
    Ok(())
}

/// Produces `record`, waiting while the producer's queue is full.
fn send(producer: &BareProducer, topic: &str, r: &StoredRecord) -> anyhow::Result<()> {
    let mut record: BaseRecord<'_, Vec<u8>, Vec<u8>> = BaseRecord::to(topic)
        .payload(&r.payload)
        .partition(r.partition);
    if let Some(key) = &r.key {
        record = record.key(key);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                back,
            )) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => anyhow::bail!("producing to {topic}: {e}"),
        }
    }
}

/// A consumer of `from` that, having read `i` of its `inputs` records, has produced the first
/// `⌈i × outputs.len() / inputs⌉` of `outputs` to `to`.
fn forwarder(
    config: &Config,
    fetch_wait_ms: u32,
    from: (String, i32),
    inputs: u64,
    to: String,
    outputs: Arc<Vec<StoredRecord>>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let c = consumer(config, fetch_wait_ms)?;
    high_watermarks(&c, &from.0, from.1)?;
    assign_all(&c, &from.0, from.1)?;
    let producer = bare_producer(config)?;
    std::thread::Builder::new()
        .name("forwarder".to_owned())
        .spawn(move || {
            let (mut read, mut sent) = (0u64, 0usize);
            let deadline = Instant::now() + Duration::from_secs(600);
            while read < inputs {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "forwarder read {read} of {inputs} records of {}",
                    from.0
                );
                match c.poll(Duration::from_millis(100)) {
                    Some(Ok(_)) => {
                        read += 1;
                        let target = proportional(read, inputs, outputs.len());
                        while sent < target {
                            send(&producer, &to, &outputs[sent])?;
                            sent += 1;
                        }
                    }
                    Some(Err(e)) => anyhow::bail!("reading {}: {e}", from.0),
                    None => {}
                }
            }
            flush(&producer, &to)
        })
        .context("failed to start a forwarder thread")
}

/// How many of `outputs` records are due after `read` of `inputs`: rounded up, all at the end.
fn proportional(read: u64, inputs: u64, outputs: usize) -> usize {
    if inputs == 0 || read >= inputs {
        return outputs;
    }
    let due = (u128::from(read) * outputs as u128).div_ceil(u128::from(inputs));
    (due as usize).min(outputs)
}

// Longer than our ~120-line rule on purpose: one phase of the bench, its steps in the order
// they run (set up, warm up, measure, drain, verify, report), sharing the timings and counts
// they report; split, each step would take and return a dozen of them.
async fn bare_phase(
    base: &Config,
    a: &PipelineRun,
    fetch_wait_ms: u32,
    timeout: Duration,
    leftovers: &mut Leftovers,
) -> anyhow::Result<BareRun> {
    let source = a.config.clone();
    let topics = source.topics();
    let (lp, pp, cp) = (
        source.locations_partitions,
        source.person_updates_partitions,
        source.connections_partitions,
    );
    say("bare phase: reading back the pipeline's records");
    let (locations, updates, connections) = {
        let s = source.clone();
        let t = topics.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            Ok((
                read_topic(&s, &t.locations, lp)?,
                read_topic(&s, &t.person_updates, pp)?,
                read_topic(&s, &t.connections, cp)?,
            ))
        })
        .await
        .context("the read-back task failed")??
    };
    let bytes = |rs: &[StoredRecord]| rs.iter().map(|r| r.payload.len() as u64).sum::<u64>();
    let prefix = format!("bench-{}-bare", Uuid::new_v4().simple());
    leftovers.prefixes.push(prefix.clone());
    let mut config = base.clone();
    config.topic_prefix = prefix;
    let bare = config.topics();
    let services =
        udaconnect::kafka::Broker::new(&config).context("failed to create the kafka client")?;
    services
        .ensure_topics(
            &[
                TopicSpec {
                    name: bare.locations.clone(),
                    partitions: lp,
                },
                TopicSpec {
                    name: bare.person_updates.clone(),
                    partitions: pp,
                },
                TopicSpec {
                    name: bare.connections.clone(),
                    partitions: cp,
                },
            ],
            config.topic_replication,
            Duration::from_secs(10),
        )
        .await
        .context("failed to create the bare topics")?;
    let (n, m, k) = (locations.len(), updates.len(), connections.len());
    say(format!(
        "bare phase: moving {n} locations, {m} person-updates and {k} connections records"
    ));
    let tap = Tap::start(&config, &bare.connections, cp, fetch_wait_ms, false)?;
    let stage2 = forwarder(
        &config,
        fetch_wait_ms,
        (bare.person_updates.clone(), pp),
        m as u64,
        bare.connections.clone(),
        Arc::new(connections.clone()),
    )?;
    let stage1 = forwarder(
        &config,
        fetch_wait_ms,
        (bare.locations.clone(), lp),
        n as u64,
        bare.person_updates.clone(),
        Arc::new(updates.clone()),
    )?;
    let producer = bare_producer(&config)?;
    let probe = CpuProbe::new(&source);
    let cpu_before = Cpu::now(&probe);
    let started = Instant::now();
    let topic = bare.locations.clone();
    let source_records = locations.clone();
    let source = std::thread::Builder::new()
        .name("producer".to_owned())
        .spawn(move || -> anyhow::Result<()> {
            for r in &source_records {
                send(&producer, &topic, r)?;
            }
            flush(&producer, &topic)
        })
        .context("failed to start the producer thread")?;
    let mut workers = [
        ("the producer", Some(source)),
        ("the zones forwarder", Some(stage1)),
        ("the persons forwarder", Some(stage2)),
    ];
    let deadline = Instant::now() + timeout;
    let last = loop {
        // A worker that stopped on an error ends the phase at once.
        for (name, worker) in &mut workers {
            if worker.as_ref().is_some_and(JoinHandle::is_finished) {
                if let Some(w) = worker.take() {
                    w.join()
                        .map_err(|_| anyhow::anyhow!("{name} panicked"))?
                        .with_context(|| format!("{name} failed"))?;
                }
            }
        }
        let (count, last) = tap.count_and_last();
        if count >= k as u64 {
            break last;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the bare pipeline moved {count} of {k} connections records within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for (name, worker) in &mut workers {
        if let Some(w) = worker.take() {
            w.join()
                .map_err(|_| anyhow::anyhow!("{name} panicked"))?
                .with_context(|| format!("{name} failed"))?;
        }
    }
    let finished = last.unwrap_or_else(Instant::now);
    let elapsed = (finished - started).as_secs_f64();
    let cpu = Cpu::now(&probe).since(&cpu_before, elapsed);
    drop(tap.finish()?);
    let events_per_s = a.events as f64 / elapsed;
    say(format!(
        "bare phase: the same {} events' records in {elapsed:.3} s = {events_per_s:.0} events/s",
        a.events
    ));
    let notifications: u64 = connections
        .iter()
        .map(|r| decode_notifications(Some(&r.payload)).map_or(0, |ns| ns.len() as u64))
        .sum();
    let per_event = |records: usize, bytes: u64| {
        json!({
            "records": records,
            "bytes": bytes,
            "records_per_event": (records as f64 / a.events as f64 * 1e4).round() / 1e4,
            "bytes_per_event": (bytes as f64 / a.events as f64 * 10.0).round() / 10.0,
        })
    };
    Ok(BareRun {
        events_per_s,
        figures: json!({
            "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
            "events_per_s": events_per_s.round(),
            "locations_records": n,
            "locations_bytes": bytes(&locations),
            "person_update_records": m,
            "person_update_bytes": bytes(&updates),
            "connection_records": k,
            "connection_bytes": bytes(&connections),
            "notifications": notifications,
            "topics": {
                "locations": per_event(n, bytes(&locations)),
                "person_updates": per_event(m, bytes(&updates)),
                "connections": per_event(k, bytes(&connections)),
            },
            "cpu": cpu,
        }),
    })
}

// ------------------------------------------------------------------------------- phase 3

struct LatencyRun {
    p50_ms: f64,
    p99_ms: f64,
    figures: serde_json::Value,
}

// Longer than our ~120-line rule on purpose: one phase of the bench, its steps in the order
// they run (set up, warm up, measure, drain, verify, report), sharing the timings and counts
// they report; split, each step would take and return a dozen of them.
async fn latency_phase(
    cli: &Cli,
    base: &Config,
    admin_url: &str,
    rate: f64,
    leftovers: &mut Leftovers,
) -> anyhow::Result<LatencyRun> {
    let wanted = (rate * f64::from(cli.latency_seconds)).ceil() as u64;
    // Simulated seconds that hold the warm-up (about two reports per attendee) and the wanted
    // events (one report per attendee per report_interval_s), and some to spare.
    let per_sim_second = f64::from(cli.attendees) / ConferenceConfig::default().report_interval_s;
    let needed = wanted as f64 + 2.0 * f64::from(cli.attendees);
    let duration_s = ((needed / per_sim_second).ceil() as u32).saturating_add(60);
    let mut conf = conference(cli, cli.seed + 1, duration_s, Some(cli.latency_disorder_s));
    // Another day than the throughput conference.
    conf.start += 86_400 * MICROS_PER_S;
    say(format!(
        "latency phase: {wanted} events at {rate:.0} events/s ({} attendees, {duration_s} simulated s)",
        cli.attendees
    ));
    let mut config = fresh(base, admin_url, leftovers).await?;
    config.zone_resolution = conf.zone_resolution;
    let (sim, events) = generate(conf)?;
    let (mut events, late) = hold_back_late(events, cli.late_share, cli.late_delay_s, cli.seed + 1);
    let late_keys: std::collections::HashSet<(PersonId, Micros)> = events
        .iter()
        .zip(&late)
        .filter(|(_, l)| **l)
        .map(|(e, _)| (e.person_id, e.recorded_at))
        .collect();
    let (_services, pipeline) = start_pipeline(&config, &sim).await?;
    let topics = config.topics();
    let tap = Tap::start(
        &config,
        &topics.connections,
        config.connections_partitions,
        cli.fetch_wait_ms,
        true,
    )?;
    let ingestor = Arc::clone(pipeline.ingestor());
    // Enough calls in flight that waiting for acknowledgements never holds the pace back.
    let mut pipe = IngestPipe::new(Arc::clone(&ingestor), 256);
    let mut acks: HashMap<(PersonId, Micros), Instant> = HashMap::with_capacity(events.len());
    let mut ack_ms = Vec::new();
    let mut record = |acked: Vec<Acked>| {
        for a in acked {
            ack_ms.push((a.at - a.sent).as_secs_f64() * 1e3);
            for (i, _) in &a.report.accepted {
                let e: &NewLocationEvent = &a.events[*i];
                acks.entry((e.person_id, e.recorded_at)).or_insert(a.at);
            }
        }
    };
    // Warm-up, not measured: the first report of every attendee, so that the ingestor knows
    // every person (a call with a new person waits for PostgreSQL and for the calls before it).
    let mut seen = std::collections::HashSet::new();
    let warm_up = events
        .iter()
        .position(|e| {
            seen.insert(e.person_id);
            seen.len() == cli.attendees as usize
        })
        .map_or(events.len(), |i| i + 1);
    events.truncate(warm_up + wanted as usize);
    for chunk in events[..warm_up].chunks(cli.batch as usize) {
        pipe.push(chunk.iter().map(wire).collect()).await?;
    }
    pipe.drain().await?;
    wait_processed(&pipeline, Duration::from_secs(cli.timeout_s)).await?;
    let warm_notifications =
        total_records(&config, &topics.connections, config.connections_partitions)?;
    tap_reaches(&tap, warm_notifications, Duration::from_secs(cli.timeout_s)).await?;
    say(format!(
        "latency phase: warmed up with {warm_up} events; pacing the other {}",
        events.len() - warm_up
    ));
    let probe = CpuProbe::new(&config);
    let cpu_before = Cpu::now(&probe);
    let started = tokio::time::Instant::now();
    let paced_from = started.into_std();
    let mut sent = warm_up;
    let mut max_behind = Duration::ZERO;
    let mut ticker = tokio::time::interval(Duration::from_millis(u64::from(cli.latency_tick_ms)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < events.len() {
        ticker.tick().await;
        let elapsed = started.elapsed().as_secs_f64();
        let due = (warm_up + (elapsed * rate) as usize).min(events.len());
        if due > sent {
            let on_time = (sent - warm_up) as f64 / rate;
            let behind = Duration::from_secs_f64((elapsed - on_time).max(0.0));
            max_behind = max_behind.max(behind);
            let batch = events[sent..due].iter().map(wire).collect();
            sent = due;
            record(pipe.push(batch).await?);
        }
    }
    let send_s = started.elapsed().as_secs_f64();
    record(pipe.drain().await?);
    let paced = sent - warm_up;
    say(format!(
        "latency phase: {paced} events sent in {send_s:.1} s ({:.0} events/s); waiting for the pipeline",
        paced as f64 / send_s
    ));
    let timeout = Duration::from_secs(cli.timeout_s);
    wait_processed(&pipeline, timeout).await?;
    let notifications = total_records(&config, &topics.connections, config.connections_partitions)?;
    tap_reaches(&tap, notifications, timeout).await?;
    let cpu = Cpu::now(&probe).since(&cpu_before, started.elapsed().as_secs_f64());
    pipeline.stop().await;
    let tapped = tap.finish()?;
    let locations_records = total_records(&config, &topics.locations, config.locations_partitions)?;
    let person_update_records = total_records(
        &config,
        &topics.person_updates,
        config.person_updates_partitions,
    )?;

    let mut latencies = Vec::new();
    // `connection.started` of an episode whose first co-location involves a late upload: the
    // late path's delay from that upload's acknowledgement.
    let mut late_path = Vec::new();
    let (mut started_count, mut unmatched, mut other) = (0u64, 0u64, 0u64);
    // The warm-up's notifications were all read before the pace began.
    let mut delivery_ms = Vec::new();
    let mut by_window: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for TappedRecord {
        at,
        created_ms,
        read_ms,
        payload,
    } in tapped.records.iter().skip(warm_notifications as usize)
    {
        delivery_ms.push((read_ms - created_ms) as f64);
        let notifications = match decode_notifications(Some(payload)) {
            Ok(ns) => ns,
            Err(e) => anyhow::bail!("a connections record that does not decode: {e}"),
        };
        for n in notifications {
            if n.kind != NotificationKind::Started {
                other += 1;
                continue;
            }
            started_count += 1;
            let ep = &n.episode;
            let ack = [ep.person, ep.peer]
                .iter()
                .filter_map(|p| acks.get(&(*p, ep.started_at)).map(|a| (a, *p)))
                .max();
            match ack {
                Some((ack, p)) => {
                    let ms = if at >= ack {
                        (*at - *ack).as_secs_f64() * 1e3
                    } else {
                        -((*ack - *at).as_secs_f64() * 1e3)
                    };
                    if late_keys.contains(&(p, ep.started_at)) {
                        late_path.push(ms);
                        continue;
                    }
                    latencies.push(ms);
                    let window = ack.saturating_duration_since(paced_from).as_secs() / 5;
                    by_window.entry(window).or_default().push(ms);
                }
                None => unmatched += 1,
            }
        }
    }
    // The median per 5 s of the pace, by acknowledgement time: flat when the pipeline keeps
    // up, growing when a queue builds.
    let p50_by_window: Vec<f64> = by_window
        .into_values()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            (percentile(&v, 0.5) * 10.0).round() / 10.0
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    late_path.sort_by(f64::total_cmp);
    ack_ms.sort_by(f64::total_cmp);
    delivery_ms.sort_by(f64::total_cmp);
    anyhow::ensure!(
        !latencies.is_empty(),
        "no connection.started notification to measure ({started_count} started, {unmatched} unmatched)"
    );
    let r = |x: f64| (x * 100.0).round() / 100.0;
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    say(format!(
        "latency phase: {} notifications matched; p50 {p50:.1} ms, p99 {p99:.1} ms",
        latencies.len()
    ));
    Ok(LatencyRun {
        p50_ms: r(p50),
        p99_ms: r(p99),
        figures: json!({
            "rate_target": rate.round(),
            "warm_up_events": warm_up,
            "warm_up_connection_records": warm_notifications,
            "events_sent": paced,
            "send_s": r(send_s),
            "rate_achieved": (paced as f64 / send_s).round(),
            "max_behind_schedule_ms": r(max_behind.as_secs_f64() * 1e3),
            "connection_records": tapped.records.len() as u64 - warm_notifications,
            "notifications": started_count + other,
            "locations_records": locations_records,
            "person_update_records": person_update_records,
            "started_notifications": started_count,
            "other_notifications": other,
            "matched": latencies.len(),
            "unmatched": unmatched,
            "min_ms": r(latencies[0]),
            "p50_ms": r(p50),
            "p90_ms": r(percentile(&latencies, 0.9)),
            "p99_ms": r(p99),
            "max_ms": r(latencies[latencies.len() - 1]),
            "p50_ms_per_5s": p50_by_window,
            "ingest_call_ack_p50_ms": r(percentile(&ack_ms, 0.5)),
            "ingest_call_ack_p99_ms": r(percentile(&ack_ms, 0.99)),
            "late_uploads": late_keys.len(),
            "late_path_matched": late_path.len(),
            "late_path_p50_ms": (!late_path.is_empty()).then(|| r(percentile(&late_path, 0.5))),
            "late_path_p99_ms": (!late_path.is_empty()).then(|| r(percentile(&late_path, 0.99))),
            "late_path_max_ms": late_path.last().map(|x| r(*x)),
            "notification_produced_to_read_p50_ms": percentile(&delivery_ms, 0.5),
            "notification_produced_to_read_p99_ms": percentile(&delivery_ms, 0.99),
            "cpu": cpu,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_is_proportional_and_complete() {
        assert_eq!(proportional(0, 10, 25), 0);
        assert_eq!(proportional(1, 10, 25), 3);
        assert_eq!(proportional(4, 10, 25), 10);
        assert_eq!(proportional(10, 10, 25), 25);
        assert_eq!(proportional(3, 10, 0), 0);
        assert_eq!(proportional(0, 0, 7), 7);
        let steps: Vec<usize> = (0..=3).map(|i| proportional(i, 3, 2)).collect();
        assert_eq!(steps, [0, 1, 2, 2]);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn the_admin_url_names_the_maintenance_database() {
        assert_eq!(
            with_database("postgres://u:p@h:5/udaconnect", "postgres").unwrap(),
            "postgres://u:p@h:5/postgres"
        );
        assert_eq!(
            with_database("postgres://h/db?sslmode=disable", "x").unwrap(),
            "postgres://h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h", "x").unwrap(),
            "postgres://h/x"
        );
        assert!(with_database("host=h dbname=d", "x").is_err());
    }

    #[test]
    fn process_times_are_read_from_proc_stat() {
        let line = "42 (kafka broker) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 10 40 20 0 9 0 1 2 3";
        let (comm, seconds) = process_cpu(line).unwrap();
        assert_eq!(comm, "kafka broker");
        assert!((seconds - 3.0).abs() < 1e-9);
        assert!(process_cpu("42 (x) S 1").is_none());
    }
}
