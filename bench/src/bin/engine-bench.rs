//! `engine-bench`: a simulated conference through the actor engine, in process, no I/O.
//!
//! The events are generated first (not timed), then routed, matched in the zone actors and
//! turned into episodes by the person actors, as fast as the engine takes them. The last line
//! is one JSON object with the figures (docs/design.md §10).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use udaconnect_actors::domain::LocationEvent;
use udaconnect_actors::zone_index::ZonePartition;
use udaconnect_actors::{Engine, EngineOptions, EngineParams, Router};
use udaconnect_bench::engine_run::{
    run_actor_engine, ActorRun, Conference, ConferenceSpec, Progress,
};
use udaconnect_bench::peak_rss_bytes;

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
    udaconnect::allocator::tune();
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
    let spec = ConferenceSpec {
        attendees: args.attendees,
        duration_s: args.duration_s,
        booths: args.booths,
        talk_probability: args.talk_probability,
        report_interval_s: args.report_interval_s,
        seed: args.seed,
        zone_resolution: args.zone_resolution,
    };
    let params = EngineParams {
        zone_resolution: args.zone_resolution,
        ..EngineParams::default()
    };
    params.validate()?;
    let Conference {
        config,
        events,
        zones,
        ..
    } = spec.generate()?;
    let figures = match args.engine.as_str() {
        "actors" => run_actors(args, &params, &events)?,
        "sync" => run_sync(args, &params, &events),
        other => anyhow::bail!("--engine must be `actors` or `sync`, not `{other}`"),
    };
    let probed = figures
        .probed
        .unwrap_or_else(|| zone_stage_probes(args, &params, &events));
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
        "ns_per_event": (figures.elapsed_s * 1e9 / events.len().max(1) as f64).round(),
        "candidates_per_event": probed as f64 / events.len().max(1) as f64,
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
    /// Candidates the zones probed (retained points looked at by arrivals), when counted.
    probed: Option<u64>,
    colocations: u64,
    episodes: usize,
    notifications: u64,
    table: Vec<udaconnect_actors::domain::Episode>,
}

/// The candidates the zone stage probes on `events` (untimed): the zone partitions alone, over
/// the same routing and batches as the engines (the actor engine's zones do the same work, but
/// their counts are not gathered from the actors).
fn zone_stage_probes(args: &Args, params: &EngineParams, events: &[LocationEvent]) -> u64 {
    let mut router = Router::new(params, args.zone_partitions);
    let mut zones: Vec<ZonePartition> = (0..args.zone_partitions)
        .map(|p| ZonePartition::new(p, params, args.person_partitions, false))
        .collect();
    for chunk in events.chunks(args.batch) {
        for (p, routed) in router.route_batch(chunk).iter().enumerate() {
            drop(zones[p].process(routed));
        }
    }
    zones.iter().map(ZonePartition::probed).sum()
}

fn run_actors(
    args: &Args,
    params: &EngineParams,
    events: &[LocationEvent],
) -> anyhow::Result<Figures> {
    let run = ActorRun {
        zone_partitions: args.zone_partitions,
        person_partitions: args.person_partitions,
        batch: args.batch,
        workers: args.workers,
        settle_each_batch: false,
        label: "",
    };
    let figures = run_actor_engine(params, &run, events)?;
    eprintln!(
        "backpressure: ingest waited {:.2} s for room in front of the zone partitions",
        figures.backpressure_s
    );
    Ok(Figures {
        elapsed_s: figures.elapsed_s,
        probed: None,
        colocations: figures.colocations,
        episodes: figures.episodes.len(),
        notifications: figures.notifications,
        table: figures.episodes,
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
    let mut progress = Progress::new("", events.len());
    let mut done = 0;
    for chunk in events.chunks(args.batch) {
        engine.ingest(chunk);
        done += chunk.len();
        progress.update(done);
    }
    engine.finish();
    let elapsed_s = started.elapsed().as_secs_f64();
    let stats = engine.stats();
    let mut table = engine.episodes();
    table.sort_by_key(|e| e.key());
    Figures {
        elapsed_s,
        probed: Some(engine.probed()),
        colocations: stats.colocations,
        episodes: table.len(),
        notifications: stats.notifications,
        table,
    }
}
