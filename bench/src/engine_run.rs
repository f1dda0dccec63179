//! The proximity engine on a simulated conference, in process: what `engine-bench` and
//! `peer-bench` share, so that both build the same conference from the same flags and drive the
//! actor engine the same way.

use std::time::Instant;

use udaconnect_actors::actors::in_process::{ActorEngine, ActorEngineOptions};
use udaconnect_actors::domain::{Episode, LocationEvent};
use udaconnect_actors::EngineParams;

use crate::sim::{self, ConferenceConfig};

/// The simulated conference a bench runs on; `None` keeps the simulator's default.
#[derive(Debug, Clone, PartialEq)]
pub struct ConferenceSpec {
    /// Attendees reporting locations.
    pub attendees: u32,
    /// Simulated event time, seconds.
    pub duration_s: u32,
    /// Booths (the simulator's default is attendees / 40).
    pub booths: Option<u32>,
    /// Probability that a free attendee joins an upcoming talk.
    pub talk_probability: Option<f64>,
    /// Mean time between two reports of one attendee, seconds.
    pub report_interval_s: Option<f64>,
    /// Seed of the simulation.
    pub seed: u64,
    /// H3 resolution of zones.
    pub zone_resolution: u8,
}

/// Events of a simulated conference, in the order the simulator emits them (arrival order).
pub struct Conference {
    /// The simulator's configuration, defaults filled in.
    pub config: ConferenceConfig,
    /// Every report, in arrival order.
    pub events: Vec<LocationEvent>,
    /// Home zones the events touched.
    pub zones: u64,
    /// Time taken to generate the events, seconds.
    pub generated_in_s: f64,
}

impl ConferenceSpec {
    /// The simulator's configuration for this conference.
    pub fn config(&self) -> ConferenceConfig {
        let mut config = ConferenceConfig::for_attendees(self.attendees);
        config.duration_s = self.duration_s;
        config.seed = self.seed;
        config.zone_resolution = self.zone_resolution;
        if let Some(booths) = self.booths {
            config.booths = booths;
            config.fit_venue();
            // Leave room for the talk rooms around a larger booth hall.
            config.venue_w_m += 100.0;
            config.venue_h_m += 100.0;
        }
        if let Some(p) = self.talk_probability {
            config.talk_probability = p;
        }
        if let Some(r) = self.report_interval_s {
            config.report_interval_s = r;
        }
        config
    }

    /// Generates every event of the conference (a line on stderr says how many).
    pub fn generate(&self) -> anyhow::Result<Conference> {
        let config = self.config();
        let started = Instant::now();
        let mut stream = sim::events(&config)?.count_zones(true);
        let events: Vec<LocationEvent> = stream.by_ref().collect();
        let zones = stream.stats().zones_touched;
        let generated_in_s = started.elapsed().as_secs_f64();
        eprintln!(
            "generated {} events of {} attendees over {} s in {:.1} s ({} home zones)",
            events.len(),
            self.attendees,
            self.duration_s,
            generated_in_s,
            zones
        );
        Ok(Conference {
            config,
            events,
            zones,
            generated_in_s,
        })
    }
}

/// A line on stderr each time another tenth of the work is done.
pub struct Progress {
    label: String,
    total: usize,
    started: Instant,
    tenths: usize,
}

impl Progress {
    /// Progress over `total` items, each line starting with `label` (may be empty).
    pub fn new(label: impl Into<String>, total: usize) -> Self {
        Self {
            label: label.into(),
            total,
            started: Instant::now(),
            tenths: 0,
        }
    }

    /// `done` items are done; prints when that crosses another tenth.
    pub fn update(&mut self, done: usize) {
        let tenths = done * 10 / self.total.max(1);
        if tenths > self.tenths {
            self.tenths = tenths;
            let sep = if self.label.is_empty() { "" } else { " " };
            eprintln!(
                "  {}{sep}{:>3}% {} events in {:.1} s",
                self.label,
                tenths * 10,
                done,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// How the actor engine is laid out and fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActorRun {
    /// Zone partitions (the locations topic's partitions).
    pub zone_partitions: u32,
    /// Person partitions (the person-updates topic's partitions).
    pub person_partitions: u32,
    /// Events per ingest batch.
    pub batch: usize,
    /// Tokio worker threads for the actors.
    pub workers: usize,
    /// Wait after each batch until it went through both stages, and time that: per-batch
    /// latency at the cost of the pipelining between batches.
    pub settle_each_batch: bool,
    /// Label of the progress lines.
    pub label: &'static str,
}

/// What a run of the actor engine produced and how long it took.
pub struct ActorFigures {
    /// From the first ingest to the last episode closed, seconds.
    pub elapsed_s: f64,
    /// Co-locations the person stage received (each is one side of a pair of events).
    pub colocations: u64,
    /// Notifications published.
    pub notifications: u64,
    /// The episode table at the end, every episode closed.
    pub episodes: Vec<Episode>,
    /// Time the ingest side waited for room in front of the zone partitions, seconds.
    pub backpressure_s: f64,
    /// With `settle_each_batch`: per batch, µs from handing it in until both stages are done
    /// with it, in input order; empty otherwise.
    pub batch_latencies_us: Vec<f64>,
}

/// Runs `events` through the actor engine (both stages, in-memory sinks) on its own runtime.
pub fn run_actor_engine(
    params: &EngineParams,
    run: &ActorRun,
    events: &[LocationEvent],
) -> anyhow::Result<ActorFigures> {
    anyhow::ensure!(run.batch > 0, "the batch size must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(run.workers.max(1))
        .enable_all()
        .build()?;
    let engine_err = |e: ractor::ActorProcessingErr| anyhow::anyhow!("{e}");
    runtime.block_on(async {
        let options = ActorEngineOptions {
            zone_partitions: run.zone_partitions,
            person_partitions: run.person_partitions,
            capacity: 4,
            passivate_after_s: 900,
            capture: false,
            // The simulated input is never later than lateness_s: nothing to keep for late copies.
            keep_copies: false,
        };
        let mut engine = ActorEngine::start(params, options, None)
            .await
            .map_err(engine_err)?;
        let started = Instant::now();
        let mut progress = Progress::new(run.label, events.len());
        let mut done = 0;
        let mut batch_latencies_us = Vec::new();
        for chunk in events.chunks(run.batch) {
            let handed_in = Instant::now();
            engine.ingest(chunk).await.map_err(engine_err)?;
            if run.settle_each_batch {
                engine.settle().await.map_err(engine_err)?;
                batch_latencies_us.push(handed_in.elapsed().as_secs_f64() * 1e6);
            }
            done += chunk.len();
            progress.update(done);
        }
        engine.finish().await.map_err(engine_err)?;
        let elapsed_s = started.elapsed().as_secs_f64();
        let persons = engine.person_partitions().await.map_err(engine_err)?;
        let colocations = persons.iter().map(|p| p.counters.colocations).sum();
        let mut episodes = engine.episodes();
        episodes.sort_by_key(|e| e.key());
        let notifications = engine.notification_count();
        let backpressure_s = engine.zone_backpressure_ns() as f64 / 1e9;
        engine.stop().await;
        Ok(ActorFigures {
            elapsed_s,
            colocations,
            notifications,
            episodes,
            backpressure_s,
            batch_latencies_us,
        })
    })
}
