//! `udaconnect-sim --produce`: the simulated conference through the service's real ingest path.
//!
//! An ingestor of its own (validation, routing to zones and halos, packing, acknowledged
//! produce) with its heartbeats, not a whole pipeline: the stages belong to `udaconnect serve`,
//! which would otherwise have to share its partitions with this tool.

use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::mpsc;
use udaconnect::pipeline::HEARTBEAT_INTERVAL;
use udaconnect::Config;
use udaconnect_actors::domain::{LocationEvent, Micros, NewLocationEvent, MICROS_PER_S};
use udaconnect_bench::produce::{ensure_persons, wire, Acked, IngestPipe, IngestTally, Services};
use udaconnect_bench::sim::{SimStats, Simulation};

use super::{write_side_files, Cli};

/// Progress goes to stderr this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Paced events due within this much of each other go in one ingest call.
const PACE_TICK: Duration = Duration::from_millis(50);

/// Runs `--produce`; the summary is the last line of stdout.
pub fn main(cli: &Cli) -> ExitCode {
    init_tracing();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut conference = cli.config();
    // Zones are the service's: place the venue on a border of the zones it routes to.
    if cli.zone_resolution.is_none() {
        conference.zone_resolution = config.zone_resolution;
    }
    let sim = match Simulation::new(conference) {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("error: {e} (flag --{})", e.field.replace('_', "-"));
            return ExitCode::from(2);
        }
    };
    for warning in sim.config().warnings() {
        eprintln!("warning: {warning}");
    }
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
    match runtime.block_on(run(cli, &config, &sim)) {
        Ok(outcome) => {
            println!("{}", outcome.summary);
            if outcome.rejected > 0 {
                eprintln!(
                    "error: {} of {} events were rejected",
                    outcome.rejected, outcome.sent
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

struct Outcome {
    summary: serde_json::Value,
    sent: u64,
    rejected: u64,
}

/// Maps simulated time onto the wall clock for `--realtime`: the conference starts now and
/// runs `speed` times faster than real time.
struct Pace {
    sim_start: Micros,
    anchor: Micros,
    origin: tokio::time::Instant,
    speed: f64,
}

impl Pace {
    fn recorded_at(&self, t: Micros) -> Micros {
        self.anchor + ((t - self.sim_start) as f64 / self.speed).round() as i64
    }

    /// When an event that arrives at simulated `received_at` is due.
    fn due(&self, received_at: Micros) -> tokio::time::Instant {
        let offset = (received_at - self.sim_start).max(0) as f64 / self.speed;
        self.origin + Duration::from_micros(offset as u64)
    }

    /// The event as sent live: shifted in time; its id derived from the shifted fields by the
    /// ingest path (a duplicate is shifted alike and keeps one id).
    fn wire(&self, e: &LocationEvent) -> NewLocationEvent {
        NewLocationEvent {
            event_id: None,
            recorded_at: self.recorded_at(e.recorded_at),
            ..wire(e)
        }
    }
}

fn rfc3339(t: Micros) -> String {
    DateTime::<Utc>::from_timestamp_micros(t).map_or_else(|| t.to_string(), |d| d.to_rfc3339())
}

// Longer than our ~120-line rule on purpose: the produce run's steps in the order they happen
// (side files, connect, send with progress, heartbeats, summary), sharing the tallies the
// summary reports.
async fn run(cli: &Cli, config: &Config, sim: &Simulation) -> anyhow::Result<Outcome> {
    write_side_files(cli, sim)?;
    let c = sim.config();
    let now = Utc::now().timestamp_micros();
    let last_possible =
        c.start + (i64::from(c.duration_s) + i64::from(c.max_disorder_s)) * MICROS_PER_S;
    if !cli.realtime && last_possible > now + i64::from(config.future_skew_s) * MICROS_PER_S {
        anyhow::bail!(
            "the conference's events run until {}, more than future_skew_s = {} s ahead of now: \
             use --realtime or an earlier --start",
            rfc3339(last_possible),
            config.future_skew_s
        );
    }
    // A conference replayed from the past is what a gateway uploading old reports sends: its
    // own ingest takes them in, however much older than the default late horizon they are.
    let mut config = config.clone();
    if !cli.realtime && c.start < now - i64::from(config.late_horizon_s) * MICROS_PER_S {
        let age_s = (now - c.start) / MICROS_PER_S + 86_400;
        config.late_horizon_s = u32::try_from(age_s).unwrap_or(u32::MAX);
        eprintln!(
            "udaconnect-sim: the conference started {} s ago, before the late horizon; this \
             run's ingest takes reports up to late_horizon_s = {} s old",
            (now - c.start) / MICROS_PER_S,
            config.late_horizon_s
        );
    }
    let config = &config;
    eprintln!(
        "udaconnect-sim: connecting to postgres at {} and the kafka broker at {}",
        config.database_url.redacted(),
        config.kafka_brokers
    );
    let services = Services::connect(config, Duration::from_secs(cli.wait_s)).await?;
    services.migrate().await?;
    let inserted = ensure_persons(&services.pool, sim).await?;
    let ids = sim.person_ids();
    eprintln!(
        "udaconnect-sim: persons {}..={}: {inserted} inserted, {} already existed (kept as they are)",
        ids.start(),
        ids.end(),
        u64::from(c.attendees) - inserted
    );
    let ingestor = services.ingestor(config).await?;
    let topic = config.topics().locations;
    eprintln!(
        "udaconnect-sim: producing to {topic} ({} partitions)",
        ingestor.partitions()
    );
    let stop_heartbeats = tokio_util::sync::CancellationToken::new();
    let heartbeats = ingestor.spawn_heartbeats(HEARTBEAT_INTERVAL, stop_heartbeats.clone());

    // Generation runs on its own thread, a few batches ahead of the sender.
    let (tx, rx) = mpsc::channel::<Vec<LocationEvent>>(16);
    let generator = {
        let sim = sim.clone();
        thread::Builder::new()
            .name("generator".to_owned())
            .spawn(move || {
                let mut events = sim.events();
                while let Some(batch) = events.next_batch() {
                    if tx.blocking_send(batch.to_vec()).is_err() {
                        break;
                    }
                }
                events.stats().clone()
            })
            .context("failed to start the generator thread")?
    };
    let pace = cli.realtime.then(|| Pace {
        sim_start: c.start,
        anchor: Utc::now().timestamp_micros(),
        origin: tokio::time::Instant::now(),
        speed: cli.speed,
    });
    let mut pipe = IngestPipe::new(Arc::clone(&ingestor), cli.concurrency as usize);
    let mut sender = Sender {
        tally: IngestTally::default(),
        min_recorded_at: None,
        started: Instant::now(),
        next_progress: Instant::now() + PROGRESS_EVERY,
        behind: Duration::ZERO,
        max_behind: Duration::ZERO,
        duration_s: c.duration_s,
        sim_start: c.start,
        sim_time: c.start,
    };
    let sent = sender
        .send_all(cli, pace.as_ref(), &mut pipe, rx, shutdown_signal())
        .await;
    let stats: SimStats = generator
        .join()
        .map_err(|_| anyhow::anyhow!("the event generator panicked"))?;
    let interrupted = sent?;
    sender.record(&pipe.drain().await?);
    ingestor
        .heartbeat()
        .await
        .context("the final heartbeat was not acknowledged")?;
    let mut finished_at = None;
    if cli.finish && sender.tally.max_recorded_at.is_some() {
        let end = ingestor
            .finish()
            .await
            .context("the end-of-conference heartbeat was not acknowledged")?;
        finished_at = Some(end);
    }
    stop_heartbeats.cancel();
    let _ = heartbeats.await;
    let elapsed = sender.started.elapsed().as_secs_f64();
    let tally = &sender.tally;
    let summary = json!({
        "tool": "udaconnect-sim",
        "mode": "produce",
        "realtime": cli.realtime,
        "speed": if cli.realtime { Some(cli.speed) } else { None },
        "topic": topic,
        "partitions": ingestor.partitions(),
        "persons": c.attendees,
        "persons_inserted": inserted,
        "events": stats.events,
        "duplicates": stats.duplicates,
        "sent": tally.sent,
        "accepted": tally.accepted,
        "rejected": tally.rejected,
        "rejections": tally.rejections,
        "first_recorded_at": sender.min_recorded_at.map(rfc3339),
        "last_recorded_at": tally.max_recorded_at.map(rfc3339),
        "event_time_advanced_to": finished_at.map(rfc3339),
        "interrupted": interrupted,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "events_per_s": (tally.accepted as f64 / elapsed.max(1e-9)).round(),
        "max_behind_s": pace.as_ref().map(|_| sender.max_behind.as_secs_f64()),
        "batch": cli.batch,
        "concurrency": cli.concurrency,
        "config": c,
    });
    Ok(Outcome {
        summary,
        sent: tally.sent,
        rejected: tally.rejected,
    })
}

/// The send loop's figures.
struct Sender {
    tally: IngestTally,
    min_recorded_at: Option<Micros>,
    started: Instant,
    next_progress: Instant,
    /// How far behind the schedule the last paced call went out (--realtime).
    behind: Duration,
    max_behind: Duration,
    duration_s: u32,
    sim_start: Micros,
    /// The latest simulated arrival time sent.
    sim_time: Micros,
}

impl Sender {
    /// Sends every batch from the generator until it is done or `shutdown` completes
    /// (returns whether it was interrupted).
    async fn send_all(
        &mut self,
        cli: &Cli,
        pace: Option<&Pace>,
        pipe: &mut IngestPipe,
        mut batches: mpsc::Receiver<Vec<LocationEvent>>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<bool> {
        tokio::pin!(shutdown);
        let mut pending: Vec<NewLocationEvent> = Vec::with_capacity(cli.batch as usize);
        loop {
            let batch = tokio::select! {
                batch = batches.recv() => batch,
                () = &mut shutdown => return Ok(true),
            };
            let Some(batch) = batch else {
                break;
            };
            match pace {
                None => {
                    for e in &batch {
                        pending.push(wire(e));
                        if pending.len() == cli.batch as usize {
                            self.push(pipe, std::mem::take(&mut pending)).await?;
                        }
                    }
                    self.sim_time = batch.last().map_or(self.sim_time, |e| e.received_at);
                }
                Some(pace) => {
                    for group in due_groups(&batch, pace) {
                        let due = pace.due(group[group.len() - 1].received_at);
                        let now = tokio::time::Instant::now();
                        if due > now {
                            tokio::select! {
                                () = tokio::time::sleep_until(due) => {}
                                () = &mut shutdown => return Ok(true),
                            }
                            self.behind = Duration::ZERO;
                        } else {
                            self.behind = now - due;
                            self.max_behind = self.max_behind.max(self.behind);
                        }
                        let events = group.iter().map(|e| pace.wire(e)).collect();
                        self.sim_time = group[group.len() - 1].received_at;
                        self.push(pipe, events).await?;
                    }
                }
            }
            self.progress(pipe);
        }
        if !pending.is_empty() {
            self.push(pipe, pending).await?;
        }
        Ok(false)
    }

    async fn push(
        &mut self,
        pipe: &mut IngestPipe,
        events: Vec<NewLocationEvent>,
    ) -> anyhow::Result<()> {
        for e in &events {
            self.min_recorded_at = Some(
                self.min_recorded_at
                    .map_or(e.recorded_at, |m| m.min(e.recorded_at)),
            );
        }
        let acked = pipe.push(events).await?;
        self.record(&acked);
        Ok(())
    }

    fn record(&mut self, acked: &[Acked]) {
        self.tally.add(acked);
    }

    fn progress(&mut self, pipe: &IngestPipe) {
        if Instant::now() < self.next_progress {
            return;
        }
        self.next_progress = Instant::now() + PROGRESS_EVERY;
        let elapsed = self.started.elapsed().as_secs_f64();
        let behind = if self.behind > Duration::from_secs(1) {
            format!(", {:.1} s behind schedule", self.behind.as_secs_f64())
        } else {
            String::new()
        };
        eprintln!(
            "udaconnect-sim: {} events acknowledged ({} rejected), {:.0} of {} s simulated, \
             {:.0} events/s, {} calls in flight{behind}",
            self.tally.accepted,
            self.tally.rejected,
            (self.sim_time - self.sim_start) as f64 / MICROS_PER_S as f64,
            self.duration_s,
            self.tally.accepted as f64 / elapsed.max(1e-9),
            pipe.in_flight(),
        );
    }
}

/// Splits a batch (in arrival order) into runs of events due within one [`PACE_TICK`].
fn due_groups<'a>(batch: &'a [LocationEvent], pace: &Pace) -> Vec<&'a [LocationEvent]> {
    let mut groups = Vec::new();
    let mut start = 0;
    for i in 1..=batch.len() {
        let split = i == batch.len()
            || pace.due(batch[i].received_at) >= pace.due(batch[start].received_at) + PACE_TICK;
        if split {
            groups.push(&batch[start..i]);
            start = i;
        }
    }
    groups
}

/// Completes on SIGTERM or Ctrl-C (never, if neither can be listened for).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => eprintln!("udaconnect-sim: interrupted, stopping"),
        () = terminate => eprintln!("udaconnect-sim: terminated, stopping"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(recorded_s: i64, received_s: f64) -> LocationEvent {
        LocationEvent {
            event_id: uuid::Uuid::nil(),
            person_id: 1,
            lat: 35.0,
            lon: -106.0,
            recorded_at: recorded_s * MICROS_PER_S,
            received_at: (received_s * MICROS_PER_S as f64) as i64,
        }
    }

    #[test]
    fn pacing_shifts_event_time_to_now_and_compresses_by_the_speed() {
        let pace = Pace {
            sim_start: 1_000 * MICROS_PER_S,
            anchor: 5_000 * MICROS_PER_S,
            origin: tokio::time::Instant::now(),
            speed: 2.0,
        };
        let e = event(1_010, 1_012.0);
        let w = pace.wire(&e);
        assert_eq!(w.recorded_at, 5_005 * MICROS_PER_S);
        assert_eq!(w.event_id, None);
        assert_eq!(
            pace.due(e.received_at) - pace.origin,
            Duration::from_secs(6)
        );
        // An event never goes out before its recorded time (shifted) has come.
        assert!(
            Duration::from_micros((w.recorded_at - pace.anchor) as u64)
                <= pace.due(e.received_at) - pace.origin
        );
    }

    #[test]
    fn paced_events_are_grouped_by_tick() {
        let pace = Pace {
            sim_start: 0,
            anchor: 0,
            origin: tokio::time::Instant::now(),
            speed: 1.0,
        };
        let batch = [
            event(0, 0.0),
            event(0, 0.01),
            event(0, 0.049),
            event(0, 0.05),
            event(0, 0.5),
        ];
        let sizes: Vec<usize> = due_groups(&batch, &pace).iter().map(|g| g.len()).collect();
        assert_eq!(sizes, [3, 1, 1]);
        assert!(due_groups(&[], &pace).is_empty());
    }
}
