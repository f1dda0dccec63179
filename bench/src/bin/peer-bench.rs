//! `peer-bench`: UdaConnect's proximity engine and the systems a team would otherwise build the
//! service on, side by side on the same simulated conference, in one run (docs/design.md §10).
//!
//! 1. `engine`: the actor engine in process, as `engine-bench --engine actors` runs it, fed in
//!    batches of `--engine-batch` events, each batch awaited through both stages (so that its
//!    latency can be timed); a second, pipelined pass gives the throughput without that wait.
//! 2. `redis`: a `redis-server` this bench starts on a free port; per event, one pipeline (one
//!    round trip): GEOADD into the event's time slice, GEOSEARCH BYRADIUS in each slice of the
//!    event's window, DEL of slices no event can need any more.
//! 3. `postgis`: a fresh database on the given PostgreSQL; per event an INSERT, then one
//!    `ST_DWithin` query with the time window and the other-person condition (two round trips).
//! 4. `tile38`: a `tile38-server` this bench starts, when one is given: SET and NEARBY per time
//!    slice, as for Redis; otherwise reported as skipped, with the reason.
//!
//! The peers find pairs of events; they are compared with the brute-force oracle's pairs. The
//! engine's output is episodes: they are compared with the oracle's episodes, and its
//! co-location counts per pair of persons with the oracle's (see `udaconnect_bench::peers`).
//! Progress goes to stderr; the last line of stdout is one JSON object with every figure.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use udaconnect_actors::domain::{LocationEvent, MICROS_PER_S};
use udaconnect_actors::oracle::{oracle, OracleResult};
use udaconnect_actors::EngineParams;
use udaconnect_bench::engine_run::{
    run_actor_engine, ActorRun, Conference, ConferenceSpec, Progress,
};
use udaconnect_bench::peers::{
    compare_engine, compare_pairs, event_pair, first_copies, free_port, max_boundary_error_m,
    oracle_pairs, EventPair, Latency, PairComparison, ServerProcess, TimeSlices,
};
use udaconnect_bench::scratch::pg_client;
use udaconnect_bench::{
    peak_rss_bytes, peak_rss_bytes_of, reset_peak_rss, rss_bytes, with_database,
};

// The service's allocator (src/main.rs), so that the engine is measured as it runs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Peer {
    /// UdaConnect's actor engine, in process.
    Engine,
    /// Redis GEO, one event at a time.
    Redis,
    /// PostGIS, one event at a time.
    Postgis,
    /// Tile38, one event at a time.
    Tile38,
}

#[derive(Debug, Parser)]
#[command(
    about = "UdaConnect's engine, Redis GEO, PostGIS and Tile38 on the same simulated \
             conference, with their pairs checked against the brute-force oracle",
    // `./dev peers` passes the Tile38 flags first; the caller's own come after and win.
    args_override_self = true
)]
struct Args {
    /// Attendees of the simulated conference.
    #[arg(long, default_value_t = 2_000)]
    attendees: u32,
    /// Simulated event time, seconds.
    #[arg(long, default_value_t = 300)]
    duration_s: u32,
    /// Booths.
    #[arg(long, default_value_t = 2_000)]
    booths: u32,
    /// Probability that a free attendee joins an upcoming talk.
    #[arg(long, default_value_t = 0.05)]
    talk_probability: f64,
    /// Mean time between two reports of one attendee, seconds (default: the simulator's).
    #[arg(long)]
    report_interval_s: Option<f64>,
    /// Seed of the simulation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Which peers to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "engine,redis,postgis,tile38"
    )]
    peers: Vec<Peer>,
    /// Events per engine batch in the timed pass (each batch awaited through both stages).
    #[arg(long, default_value_t = 500)]
    engine_batch: usize,
    /// Events per engine batch in the pipelined pass (engine-bench's default).
    #[arg(long, default_value_t = 20_000)]
    engine_pipelined_batch: usize,
    /// Tokio worker threads for the engine's actors.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Zone partitions of the engine.
    #[arg(long, default_value_t = 2)]
    zone_partitions: u32,
    /// Person partitions of the engine.
    #[arg(long, default_value_t = 2)]
    person_partitions: u32,
    /// H3 resolution of the engine's zones (engine-bench's default).
    #[arg(long, default_value_t = 9)]
    zone_resolution: u8,
    /// Length of the time slices (one key each) in Redis and Tile38, seconds.
    #[arg(long, default_value_t = 10)]
    slice_s: u32,
    /// The `redis-server` binary (`./dev peers` installs Debian's).
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// The `tile38-server` binary (`./dev peers` tries to build it); Tile38 is skipped without.
    #[arg(long)]
    tile38_server: Option<PathBuf>,
    /// Why there is no `tile38-server`, reported in its place (`./dev peers` passes it).
    #[arg(long)]
    tile38_skip_reason: Option<String>,
    /// PostgreSQL (with PostGIS) maintenance URL; the bench creates and drops its own database.
    #[arg(
        long,
        env = "PEER_BENCH_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:55432/postgres"
    )]
    admin_url: String,
}

/// Set by SIGINT or SIGTERM: the peers stop at their next event, so that the servers this bench
/// started are stopped and its database dropped (the default action would leave them behind).
static INTERRUPTED: std::sync::LazyLock<Arc<AtomicBool>> =
    std::sync::LazyLock::new(|| Arc::new(AtomicBool::new(false)));

/// An error once a signal asked the bench to stop.
fn check_interrupted() -> anyhow::Result<()> {
    anyhow::ensure!(
        !INTERRUPTED.load(Ordering::Relaxed),
        "interrupted by a signal"
    );
    Ok(())
}

/// SIGINT and SIGTERM set [`INTERRUPTED`] instead of ending the process.
fn watch_signals() -> anyhow::Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&INTERRUPTED))
            .context("failed to handle SIGINT and SIGTERM")?;
    }
    Ok(())
}

fn main() -> ExitCode {
    udaconnect::allocator::tune();
    let args = Args::parse();
    if let Err(e) = watch_signals() {
        eprintln!("peer-bench: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(&args) {
        Ok((json, failed)) => {
            println!("{json}");
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!("peer-bench: failed: {}", failed.join(", "));
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("peer-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The figures, and the peers that failed (a peer that cannot be built or installed here is
/// skipped with its reason, not failed).
fn run(args: &Args) -> anyhow::Result<(Value, Vec<String>)> {
    anyhow::ensure!(args.engine_batch > 0, "--engine-batch must be at least 1");
    anyhow::ensure!(
        args.engine_pipelined_batch > 0,
        "--engine-pipelined-batch must be at least 1"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.talk_probability),
        "--talk-probability must lie in [0, 1]"
    );
    let peers: BTreeSet<Peer> = args.peers.iter().copied().collect();
    let spec = ConferenceSpec {
        attendees: args.attendees,
        duration_s: args.duration_s,
        booths: Some(args.booths),
        talk_probability: Some(args.talk_probability),
        report_interval_s: args.report_interval_s,
        seed: args.seed,
        zone_resolution: args.zone_resolution,
    };
    let params = EngineParams {
        zone_resolution: args.zone_resolution,
        ..EngineParams::default()
    };
    params.validate()?;
    let slices = TimeSlices::new(args.slice_s, params.window_s)?;
    let Conference {
        config,
        events,
        zones,
        ..
    } = spec.generate()?;
    anyhow::ensure!(!events.is_empty(), "the conference has no events");

    let mut results = serde_json::Map::new();
    let mut failed = Vec::new();
    // The engine first: its peak memory is this process's, before the oracle's tables exist.
    let engine_run = if peers.contains(&Peer::Engine) {
        Some(run_engine(args, &params, &events)?)
    } else {
        None
    };

    check_interrupted()?;
    eprintln!("oracle: brute force over {} events", events.len());
    let started = Instant::now();
    let truth = oracle(&events, &params);
    let first = first_copies(&events);
    let retries = first
        .iter()
        .enumerate()
        .filter(|&(i, &f)| i as u32 != f)
        .count();
    let truth_pairs = oracle_pairs(&events, &first, &truth);
    let oracle_s = started.elapsed().as_secs_f64();
    eprintln!(
        "oracle: {} pairs, {} episodes in {oracle_s:.1} s",
        truth_pairs.len(),
        truth.episodes.len()
    );

    if let Some(engine) = engine_run {
        results.insert("engine".into(), engine.figures(&truth));
    }
    let resp = Workload {
        events: &events,
        first: &first,
        slices,
        params: &params,
        truth: &truth_pairs,
        late: late_events(&events, params.lateness_s),
    };
    if peers.contains(&Peer::Redis) {
        results.insert(
            "redis".into(),
            failed_on_error("redis", run_redis(args, resp), &mut failed)?,
        );
    }
    if peers.contains(&Peer::Postgis) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        results.insert(
            "postgis".into(),
            failed_on_error(
                "postgis",
                runtime.block_on(run_postgis(args, &events, &first, &params, &truth_pairs)),
                &mut failed,
            )?,
        );
    }
    if peers.contains(&Peer::Tile38) {
        results.insert(
            "tile38".into(),
            failed_on_error("tile38", run_tile38(args, resp), &mut failed)?,
        );
    }

    Ok((
        json!({
            "tool": "peer-bench",
            "attendees": args.attendees,
            "duration_s": args.duration_s,
            "booths": config.booths,
            "talk_probability": config.talk_probability,
            "report_interval_s": config.report_interval_s,
            "seed": args.seed,
            "events": events.len(),
            "retried_events": retries,
            "zones": zones,
            "zone_resolution": args.zone_resolution,
            "radius_m": params.radius_m,
            "window_s": params.window_s,
            "lateness_s": params.lateness_s,
            "episode_gap_s": params.episode_gap_s,
            "oracle_pairs": truth_pairs.len(),
            "oracle_episodes": truth.episodes.len(),
            "oracle_s": round3(oracle_s),
            "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "peers": results,
        }),
        failed,
    ))
}

/// A peer that failed is reported with its error, so that the others' figures still come out,
/// and counted in `failed` (the bench then exits with a failure); a signal stops the whole run.
fn failed_on_error(
    name: &str,
    result: anyhow::Result<Value>,
    failed: &mut Vec<String>,
) -> anyhow::Result<Value> {
    check_interrupted()?;
    Ok(result.unwrap_or_else(|e| {
        eprintln!("{name}: failed: {e:#}");
        failed.push(name.to_owned());
        json!({ "failed": format!("{e:#}") })
    }))
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A peer's pairs against the oracle's, with how far from the radius its errors lie.
struct Checked<'a> {
    events: &'a [LocationEvent],
    found: &'a HashSet<EventPair>,
    truth: &'a HashSet<EventPair>,
    radius_m: f64,
}

impl Checked<'_> {
    fn figures(&self, elapsed_s: f64, latency: Latency, peak_memory_bytes: u64) -> Value {
        let mut figures = peer_figures(
            self.events.len(),
            elapsed_s,
            latency,
            peak_memory_bytes,
            compare_pairs(self.found, self.truth),
        );
        let off_m = max_boundary_error_m(self.events, self.found, self.truth, self.radius_m);
        figures["max_boundary_error_m"] = json!((off_m * 1e6).round() / 1e6);
        figures
    }
}

/// The figures every peer reports, in one shape.
fn peer_figures(
    events: usize,
    elapsed_s: f64,
    latency: Latency,
    peak_memory_bytes: u64,
    pairs: PairComparison,
) -> Value {
    json!({
        "events": events,
        "elapsed_s": round3(elapsed_s),
        "events_per_s": (events as f64 / elapsed_s).round(),
        "p50_us": latency.p50_us,
        "p99_us": latency.p99_us,
        "peak_memory_bytes": peak_memory_bytes,
        "pairs_found": pairs.pairs_found,
        "oracle_pairs": pairs.oracle_pairs,
        "missing_pairs": pairs.missing_pairs,
        "extra_pairs": pairs.extra_pairs,
    })
}

/// Events whose time lies more than `lateness_s` behind the latest time seen before them: a
/// store that drops old slices (or an engine past its watermark) may miss their pairs.
fn late_events(events: &[LocationEvent], lateness_s: u32) -> u64 {
    let lateness = i64::from(lateness_s) * MICROS_PER_S;
    let mut latest = i64::MIN;
    let mut late = 0;
    for e in events {
        if e.recorded_at < latest.saturating_sub(lateness) {
            late += 1;
        }
        latest = latest.max(e.recorded_at);
    }
    late
}

// ------------------------------------------------------------------------------------ engine

struct EngineRun {
    events: usize,
    batch: usize,
    timed: udaconnect_bench::engine_run::ActorFigures,
    peak_memory_bytes: u64,
    rss_before_bytes: u64,
    pipelined_batch: usize,
    pipelined_events_per_s: f64,
}

impl EngineRun {
    fn figures(self, truth: &OracleResult) -> Value {
        let comparison = compare_engine(&self.timed.episodes, truth);
        let latency = Latency::of(self.timed.batch_latencies_us.clone());
        let mut figures = peer_figures(
            self.events,
            self.timed.elapsed_s,
            latency,
            self.peak_memory_bytes,
            comparison.pairs,
        );
        figures["latency_is"] =
            json!("per batch: from handing the batch in until both stages are done with it");
        figures["batch"] = json!(self.batch);
        figures["peak_memory_is"] = json!(
            "VmHWM of this process over the timed pass (reset before it; includes rss_before_bytes)"
        );
        figures["rss_before_bytes"] = json!(self.rss_before_bytes);
        figures["episodes"] = json!(comparison.episodes);
        figures["oracle_episodes"] = json!(comparison.oracle_episodes);
        figures["episodes_equal"] = json!(comparison.episodes_equal);
        figures["episodes_differing"] = json!(comparison.episodes_differing);
        figures["asymmetric_person_pairs"] = json!(comparison.asymmetric_person_pairs);
        figures["colocations"] = json!(self.timed.colocations);
        figures["pipelined"] = json!({
            "batch": self.pipelined_batch,
            "events_per_s": self.pipelined_events_per_s.round(),
        });
        figures
    }
}

fn run_engine(
    args: &Args,
    params: &EngineParams,
    events: &[LocationEvent],
) -> anyhow::Result<EngineRun> {
    let rss_before_bytes = rss_bytes();
    let reset = reset_peak_rss();
    if !reset {
        eprintln!("engine: cannot reset the peak RSS; it includes everything before the engine");
    }
    eprintln!(
        "engine: {} events in batches of {}, each awaited through both stages",
        events.len(),
        args.engine_batch
    );
    let run = ActorRun {
        zone_partitions: args.zone_partitions,
        person_partitions: args.person_partitions,
        batch: args.engine_batch,
        workers: args.workers,
        settle_each_batch: true,
        label: "engine",
    };
    let timed = run_actor_engine(params, &run, events)?;
    let peak_memory_bytes = peak_rss_bytes();
    eprintln!(
        "engine: pipelined pass, batches of {}",
        args.engine_pipelined_batch
    );
    let pipelined = run_actor_engine(
        params,
        &ActorRun {
            batch: args.engine_pipelined_batch,
            settle_each_batch: false,
            label: "engine (pipelined)",
            ..run
        },
        events,
    )?;
    anyhow::ensure!(
        pipelined.episodes == timed.episodes,
        "the pipelined pass produced other episodes than the timed pass"
    );
    Ok(EngineRun {
        events: events.len(),
        batch: args.engine_batch,
        timed,
        peak_memory_bytes,
        rss_before_bytes,
        pipelined_batch: args.engine_pipelined_batch,
        pipelined_events_per_s: events.len() as f64 / pipelined.elapsed_s,
    })
}

// ------------------------------------------------------------------- Redis GEO and Tile38

/// How a RESP server with a geo index is asked: Redis GEO or Tile38.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GeoDialect {
    Redis,
    Tile38,
}

/// A slice's key.
fn slice_key(slice: i64) -> String {
    format!("slice:{slice}")
}

/// A stored event's member (Redis) or id (Tile38): input index, person, time (µs).
fn member(index: u32, e: &LocationEvent) -> String {
    format!("{index}:{}:{}", e.person_id, e.recorded_at)
}

fn parse_member(m: &str) -> Option<(u32, i64, i64)> {
    let mut parts = m.splitn(3, ':');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

impl GeoDialect {
    /// The peer's name (its figures' key, its server's name).
    fn name(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Tile38 => "tile38",
        }
    }

    /// Its commands to add, search and drop a slice.
    fn commands(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Redis => ("GEOADD", "GEOSEARCH", "DEL"),
            Self::Tile38 => ("SET", "NEARBY", "DROP"),
        }
    }

    fn add(self, pipe: &mut redis::Pipeline, key: &str, member: &str, e: &LocationEvent) {
        match self {
            // GEOADD takes longitude first.
            Self::Redis => pipe
                .cmd("GEOADD")
                .arg(key)
                .arg(e.lon)
                .arg(e.lat)
                .arg(member),
            Self::Tile38 => pipe
                .cmd("SET")
                .arg(key)
                .arg(member)
                .arg("POINT")
                .arg(e.lat)
                .arg(e.lon),
        }
        .ignore();
    }

    fn search(self, pipe: &mut redis::Pipeline, key: &str, e: &LocationEvent, radius_m: f64) {
        match self {
            Self::Redis => pipe
                .cmd("GEOSEARCH")
                .arg(key)
                .arg("FROMLONLAT")
                .arg(e.lon)
                .arg(e.lat)
                .arg("BYRADIUS")
                .arg(radius_m)
                .arg("m"),
            // NEARBY returns 100 objects unless told otherwise.
            Self::Tile38 => pipe
                .cmd("NEARBY")
                .arg(key)
                .arg("LIMIT")
                .arg(1_000_000)
                .arg("IDS")
                .arg("POINT")
                .arg(e.lat)
                .arg(e.lon)
                .arg(radius_m),
        };
    }

    fn drop_slice(self, pipe: &mut redis::Pipeline, key: &str) {
        match self {
            Self::Redis => pipe.cmd("DEL").arg(key),
            Self::Tile38 => pipe.cmd("DROP").arg(key),
        }
        .ignore();
    }
}

/// Every string in a reply, depth first (GEOSEARCH: an array of members; Tile38's NEARBY
/// IDS: a cursor and an array of ids; an absent key: an empty array).
fn reply_strings(value: &redis::Value, out: &mut Vec<String>) -> anyhow::Result<()> {
    match value {
        redis::Value::Array(items) => {
            for item in items {
                reply_strings(item, out)?;
            }
        }
        redis::Value::BulkString(bytes) => out.push(String::from_utf8_lossy(bytes).into_owned()),
        redis::Value::SimpleString(s) => out.push(s.clone()),
        redis::Value::Int(_) | redis::Value::Nil => {}
        redis::Value::ServerError(e) => anyhow::bail!("server error: {e:?}"),
        other => anyhow::bail!("unexpected reply: {other:?}"),
    }
    Ok(())
}

/// Connects to a RESP server that was just started, waiting up to 10 s for it to listen.
fn connect_resp(server: &mut ServerProcess, port: u16) -> anyhow::Result<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        server.check_running()?;
        match client.get_connection() {
            Ok(con) => return Ok(con),
            Err(e) if Instant::now() > deadline => {
                anyhow::bail!("no connection to 127.0.0.1:{port} within 10 s: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Per event, one pipeline: store it in its slice, drop slices no later event can need,
/// search every slice of its window; keep other persons' events within the window.
fn run_slices(
    name: &str,
    dialect: GeoDialect,
    con: &mut redis::Connection,
    events: &[LocationEvent],
    first: &[u32],
    slices: TimeSlices,
    params: &EngineParams,
) -> anyhow::Result<(HashSet<EventPair>, Vec<f64>, f64, u64)> {
    let lateness = i64::from(params.lateness_s) * MICROS_PER_S;
    let window = i64::from(params.window_s) * MICROS_PER_S;
    let mut live: BTreeSet<i64> = BTreeSet::new();
    let mut latest = i64::MIN;
    let mut pairs = HashSet::new();
    let mut latencies = Vec::with_capacity(events.len());
    let mut dropped = 0;
    let mut progress = Progress::new(name, events.len());
    let mut found = Vec::new();
    let started = Instant::now();
    for (i, e) in events.iter().enumerate() {
        check_interrupted()?;
        let sent = Instant::now();
        let mut pipe = redis::pipe();
        let own = slices.of(e.recorded_at);
        // A retry has its first copy's member: it replaces the stored one.
        dialect.add(&mut pipe, &slice_key(own), &member(first[i], e), e);
        live.insert(own);
        latest = latest.max(e.recorded_at);
        // No event within lateness_s of the latest time needs a slice before this one.
        let keep_from = slices.of(latest - lateness - window);
        while let Some(&oldest) = live.first() {
            if oldest >= keep_from {
                break;
            }
            live.pop_first();
            dialect.drop_slice(&mut pipe, &slice_key(oldest));
            dropped += 1;
        }
        for slice in slices.around(e.recorded_at) {
            dialect.search(&mut pipe, &slice_key(slice), e, params.radius_m);
        }
        let replies: Vec<redis::Value> = pipe
            .query(con)
            .with_context(|| format!("{name}: event {i}"))?;
        found.clear();
        for reply in &replies {
            reply_strings(reply, &mut found).with_context(|| format!("{name}: event {i}"))?;
        }
        for m in &found {
            let (j, person, t) = parse_member(m)
                .with_context(|| format!("{name}: a member this bench did not write: {m}"))?;
            if person != e.person_id && slices.within_window(t, e.recorded_at) {
                pairs.insert(event_pair(first[i], j));
            }
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1e6);
        progress.update(i + 1);
    }
    Ok((pairs, latencies, started.elapsed().as_secs_f64(), dropped))
}

/// What a RESP peer is measured on.
#[derive(Clone, Copy)]
struct Workload<'a> {
    events: &'a [LocationEvent],
    first: &'a [u32],
    slices: TimeSlices,
    params: &'a EngineParams,
    truth: &'a HashSet<EventPair>,
    /// Events later than the lateness (reported, not treated apart).
    late: u64,
}

/// Runs the slice queries of `dialect` ([`run_slices`]) on `server`, then stops it: the figures
/// of the peer, its pairs checked against the oracle.
fn measure_slices(
    dialect: GeoDialect,
    server: ServerProcess,
    con: &mut redis::Connection,
    w: Workload<'_>,
) -> anyhow::Result<Value> {
    let name = dialect.name();
    let (pairs, latencies, elapsed_s, dropped) =
        run_slices(name, dialect, con, w.events, w.first, w.slices, w.params)?;
    // Redis's own count of its peak, beside the process's.
    let used_memory_peak = match dialect {
        GeoDialect::Redis => {
            let memory: String = redis::cmd("INFO").arg("memory").query(con)?;
            info_field(&memory, "used_memory_peak").and_then(|v| v.parse::<u64>().ok())
        }
        GeoDialect::Tile38 => None,
    };
    let peak = server.peak_rss_bytes();
    server.stop();
    let checked = Checked {
        events: w.events,
        found: &pairs,
        truth: w.truth,
        radius_m: w.params.radius_m,
    };
    let mut figures = checked.figures(elapsed_s, Latency::of(latencies), peak);
    figures["peak_memory_is"] = json!(format!("VmHWM of the {name}-server process"));
    if let Some(bytes) = used_memory_peak {
        figures["used_memory_peak_bytes"] = json!(bytes);
    }
    figures["round_trips_per_event"] = json!(1);
    let (add, search, drop) = dialect.commands();
    figures["commands_per_event"] = json!(format!(
        "{add} + {} {search} (+ {drop} of expired slices)",
        w.slices.around(0).count()
    ));
    figures["slices_dropped"] = json!(dropped);
    figures["late_events"] = json!(w.late);
    Ok(figures)
}

fn run_redis(args: &Args, w: Workload<'_>) -> anyhow::Result<Value> {
    let port = free_port()?;
    let mut server = ServerProcess::start("redis", &args.redis_server, |dir| {
        [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    })
    .context("run ./dev peers to install redis-server")?;
    let mut con = connect_resp(&mut server, port)?;
    let version: String = redis::cmd("INFO").arg("server").query(&mut con)?;
    let version = info_field(&version, "redis_version").unwrap_or_default();
    eprintln!(
        "redis: redis-server {version} (pid {}) on port {port}; one pipeline per event",
        server.pid()
    );
    let mut figures = measure_slices(GeoDialect::Redis, server, &mut con, w)?;
    figures["server"] = json!(format!("redis-server {version}"));
    Ok(figures)
}

fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

fn run_tile38(args: &Args, w: Workload<'_>) -> anyhow::Result<Value> {
    let Some(binary) = args.tile38_server.as_deref().filter(|p| p.exists()) else {
        let reason = args
            .tile38_skip_reason
            .clone()
            .unwrap_or_else(|| match &args.tile38_server {
                Some(p) => format!("no tile38-server at {}", p.display()),
                None => "no --tile38-server given (./dev peers builds one when it can)".into(),
            });
        eprintln!("tile38: skipped: {reason}");
        return Ok(json!({ "skipped": reason }));
    };
    let port = free_port()?;
    let mut server = ServerProcess::start("tile38", binary, |dir: &Path| {
        [
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-d",
            &dir.join("data").display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    })?;
    let mut con = connect_resp(&mut server, port)?;
    eprintln!(
        "tile38: {} (pid {}) on port {port}; one pipeline per event",
        binary.display(),
        server.pid()
    );
    measure_slices(GeoDialect::Tile38, server, &mut con, w)
}

// ----------------------------------------------------------------------------------- PostGIS

async fn run_postgis(
    args: &Args,
    events: &[LocationEvent],
    first: &[u32],
    params: &EngineParams,
    truth: &HashSet<EventPair>,
) -> anyhow::Result<Value> {
    let name = format!("peer_bench_{}", std::process::id());
    let admin = pg_client(&args.admin_url).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .with_context(|| format!("failed to create database {name}"))?;
    let url = with_database(&args.admin_url, &name)?;
    let result = postgis_per_event(&url, events, first, params, truth).await;
    if let Err(e) = admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
    {
        eprintln!("postgis: could not drop database {name}: {e}");
    }
    result
}

async fn postgis_per_event(
    url: &str,
    events: &[LocationEvent],
    first: &[u32],
    params: &EngineParams,
    truth: &HashSet<EventPair>,
) -> anyhow::Result<Value> {
    let db = pg_client(url).await?;
    db.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS postgis;
         CREATE TABLE peer_event (
             id integer PRIMARY KEY,
             person_id bigint NOT NULL,
             recorded_at timestamptz NOT NULL,
             geog geography(Point, 4326) NOT NULL);
         CREATE INDEX peer_event_geog ON peer_event USING gist (geog);
         CREATE INDEX peer_event_recorded_at ON peer_event (recorded_at);",
    )
    .await
    .context("failed to create the table (is PostGIS installed?)")?;
    let version: String = db
        .query_one("SELECT postgis_lib_version()", &[])
        .await?
        .get(0);
    let backend: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let insert = db
        .prepare(
            "INSERT INTO peer_event (id, person_id, recorded_at, geog)
             VALUES ($1, $2, $3, ST_SetSRID(ST_MakePoint($4, $5), 4326)::geography)
             ON CONFLICT (id) DO NOTHING",
        )
        .await?;
    let query = db
        .prepare(
            "SELECT id FROM peer_event
             WHERE person_id <> $1
               AND recorded_at BETWEEN $2 AND $3
               AND ST_DWithin(geog, ST_SetSRID(ST_MakePoint($4, $5), 4326)::geography, $6)",
        )
        .await?;
    eprintln!("postgis: PostGIS {version}, backend pid {backend}; an INSERT and a query per event");
    let window = chrono::Duration::seconds(i64::from(params.window_s));
    let mut pairs = HashSet::new();
    let mut latencies = Vec::with_capacity(events.len());
    let mut progress = Progress::new("postgis", events.len());
    let started = Instant::now();
    for (i, e) in events.iter().enumerate() {
        check_interrupted()?;
        let t = chrono::DateTime::from_timestamp_micros(e.recorded_at)
            .with_context(|| format!("event {i}: time out of range"))?;
        let sent = Instant::now();
        // A retry has its first copy's id: the insert does nothing, the query runs again.
        let id = first[i] as i32;
        db.execute(&insert, &[&id, &e.person_id, &t, &e.lon, &e.lat])
            .await
            .with_context(|| format!("postgis: insert of event {i}"))?;
        let rows = db
            .query(
                &query,
                &[
                    &e.person_id,
                    &(t - window),
                    &(t + window),
                    &e.lon,
                    &e.lat,
                    &params.radius_m,
                ],
            )
            .await
            .with_context(|| format!("postgis: query of event {i}"))?;
        for row in rows {
            let j: i32 = row.get(0);
            pairs.insert(event_pair(first[i], j as u32));
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1e6);
        progress.update(i + 1);
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let backend_peak = peak_rss_bytes_of(backend as u32);
    let sizes = db
        .query_one(
            "SELECT pg_table_size('peer_event'), pg_indexes_size('peer_event')",
            &[],
        )
        .await?;
    let (table_bytes, index_bytes): (i64, i64) = (sizes.get(0), sizes.get(1));
    let checked = Checked {
        events,
        found: &pairs,
        truth,
        radius_m: params.radius_m,
    };
    let mut figures = checked.figures(
        elapsed_s,
        Latency::of(latencies),
        backend_peak + table_bytes as u64 + index_bytes as u64,
    );
    figures["server"] = json!(format!("PostGIS {version}"));
    figures["peak_memory_is"] =
        json!("VmHWM of the backend (shared buffers it touched included) + table + indexes");
    figures["backend_peak_rss_bytes"] = json!(backend_peak);
    figures["table_bytes"] = json!(table_bytes);
    figures["index_bytes"] = json!(index_bytes);
    figures["round_trips_per_event"] = json!(2);
    Ok(figures)
}
