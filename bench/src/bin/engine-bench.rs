//! `engine-bench`: a simulated conference through the actor engine, in process, no I/O.
//!
//! The events are generated first (not timed), then routed, matched in the zone actors and
//! turned into episodes by the person actors, as fast as the engine takes them. The last line
//! is one JSON object with the figures (docs/design.md §10).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use udaconnect_actors::actors::in_process::{ActorEngine, ActorEngineOptions};
use udaconnect_actors::domain::LocationEvent;
use udaconnect_actors::{Engine, EngineOptions, EngineParams};
use udaconnect_bench::peak_rss_bytes;
use udaconnect_bench::sim::{self, ConferenceConfig};

// The service's allocator (src/main.rs), so that the engine is measured as it runs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "Measure the proximity engine on a simulated conference (in process, no I/O)")]
struct Args {
    /// Attendees of the simulated conference.
    #[arg(long, default_value_t = 20_000)]
    attendees: u32,
    /// Simulated event time, seconds.
    #[arg(long, default_value_t = 3_600)]
    duration_s: u32,
    /// Booths (default: the simulator's, attendees / 40).
    #[arg(long)]
    booths: Option<u32>,
    /// Probability that a free attendee joins an upcoming talk (default: the simulator's).
    #[arg(long)]
    talk_probability: Option<f64>,
    /// Mean time between two reports of one attendee, seconds (default: the simulator's).
    #[arg(long)]
    report_interval_s: Option<f64>,
    /// Seed of the simulation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Zone partitions (the locations topic's partitions).
    #[arg(long, default_value_t = 2)]
    zone_partitions: u32,
    /// Person partitions (the person-updates topic's partitions).
    #[arg(long, default_value_t = 2)]
    person_partitions: u32,
    /// Events per ingest batch (a Kafka poll's worth).
    #[arg(long, default_value_t = 20_000)]
    batch: usize,
    /// H3 resolution of zones.
    #[arg(long, default_value_t = 9)]
    zone_resolution: u8,
    /// Tokio worker threads for the actors.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Which engine: `actors` (ractor, both stages) or `sync` (the single-threaded facade).
    #[arg(long, default_value = "actors")]
    engine: String,
    /// Also run the synchronous engine on the same events and fail unless the episodes match.
    #[arg(long)]
    verify: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("engine-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<serde_json::Value> {
    if args.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let mut config = ConferenceConfig::for_attendees(args.attendees);
    config.duration_s = args.duration_s;
    config.seed = args.seed;
    config.zone_resolution = args.zone_resolution;
    if let Some(booths) = args.booths {
        config.booths = booths;
        config.fit_venue();
        // Leave room for the talk rooms around a larger booth hall.
        config.venue_w_m += 100.0;
        config.venue_h_m += 100.0;
    }
    if let Some(p) = args.talk_probability {
        config.talk_probability = p;
    }
    if let Some(r) = args.report_interval_s {
        config.report_interval_s = r;
    }
    let params = EngineParams {
        zone_resolution: args.zone_resolution,
        ..EngineParams::default()
    };
    params.validate()?;
    let started = Instant::now();
    let mut stream = sim::events(&config)?.count_zones(true);
    let mut events: Vec<LocationEvent> = Vec::new();
    for e in stream.by_ref() {
        events.push(e);
    }
    let zones = stream.stats().zones_touched;
    eprintln!(
        "generated {} events of {} attendees over {} s in {:.1} s ({} home zones)",
        events.len(),
        args.attendees,
        args.duration_s,
        started.elapsed().as_secs_f64(),
        zones
    );
    let figures = match args.engine.as_str() {
        "actors" => run_actors(args, &params, &events)?,
        "sync" => run_sync(args, &params, &events),
        other => anyhow::bail!("--engine must be `actors` or `sync`, not `{other}`"),
    };
    let mut json = serde_json::json!({
        "engine": args.engine,
        "attendees": args.attendees,
        "duration_s": args.duration_s,
        "events": events.len(),
        "zones": zones,
        "zone_resolution": args.zone_resolution,
        "zone_partitions": args.zone_partitions,
        "person_partitions": args.person_partitions,
        "batch": args.batch,
        "booths": config.booths,
        "talk_probability": config.talk_probability,
        "report_interval_s": config.report_interval_s,
        "colocations_per_event": figures.colocations as f64 / events.len().max(1) as f64,
        "workers": args.workers,
        "elapsed_s": figures.elapsed_s,
        "events_per_s": (events.len() as f64 / figures.elapsed_s).round(),
        "colocations": figures.colocations,
        "episodes": figures.episodes,
        "notifications": figures.notifications,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    if args.verify {
        let sync = run_sync(args, &params, &events);
        let same = sync.table == figures.table;
        json["verified_against_sync_engine"] = serde_json::Value::Bool(same);
        if !same {
            println!("{json}");
            anyhow::bail!(
                "the engines disagree: {} episodes (actors) vs {} (sync)",
                figures.episodes,
                sync.episodes
            );
        }
    }
    Ok(json)
}

struct Figures {
    elapsed_s: f64,
    colocations: u64,
    episodes: usize,
    notifications: u64,
    table: Vec<udaconnect_actors::domain::Episode>,
}

fn progress(done: usize, total: usize, started: Instant, last: &mut usize) {
    if done * 10 / total.max(1) > *last {
        *last = done * 10 / total.max(1);
        eprintln!(
            "  {:>3}% {} events in {:.1} s",
            *last * 10,
            done,
            started.elapsed().as_secs_f64()
        );
    }
}

fn run_actors(
    args: &Args,
    params: &EngineParams,
    events: &[LocationEvent],
) -> anyhow::Result<Figures> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let options = ActorEngineOptions {
            zone_partitions: args.zone_partitions,
            person_partitions: args.person_partitions,
            capacity: 4,
            passivate_after_s: 900,
            capture: false,
            // The simulated input is never later than lateness_s: nothing to keep for late copies.
            keep_copies: false,
        };
        let mut engine = ActorEngine::start(params, options, None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = Instant::now();
        let mut last = 0;
        let mut done = 0;
        for chunk in events.chunks(args.batch) {
            engine
                .ingest(chunk)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            done += chunk.len();
            progress(done, events.len(), started, &mut last);
        }
        engine.finish().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let elapsed_s = started.elapsed().as_secs_f64();
        let persons = engine
            .person_partitions()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let colocations = persons.iter().map(|p| p.counters.colocations).sum();
        let table = engine.episodes();
        let notifications = engine.notification_count();
        eprintln!(
            "backpressure: ingest waited {:.2} s for room in front of the zone partitions",
            engine.zone_backpressure_ns() as f64 / 1e9
        );
        engine.stop().await;
        Ok(Figures {
            elapsed_s,
            colocations,
            episodes: table.len(),
            notifications,
            table,
        })
    })
}

fn run_sync(args: &Args, params: &EngineParams, events: &[LocationEvent]) -> Figures {
    let options = EngineOptions {
        zone_partitions: args.zone_partitions,
        person_partitions: args.person_partitions,
        capture: false,
        // The simulated input is never later than lateness_s: nothing to keep for late copies.
        keep_copies: false,
    };
    let mut engine = Engine::new(params, options).expect("validated");
    let started = Instant::now();
    let mut last = 0;
    let mut done = 0;
    for chunk in events.chunks(args.batch) {
        engine.ingest(chunk);
        done += chunk.len();
        progress(done, events.len(), started, &mut last);
    }
    engine.finish();
    let elapsed_s = started.elapsed().as_secs_f64();
    let stats = engine.stats();
    let table = engine.episodes();
    Figures {
        elapsed_s,
        colocations: stats.colocations,
        episodes: table.len(),
        notifications: stats.notifications,
        table,
    }
}
