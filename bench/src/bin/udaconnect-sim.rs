//! `udaconnect-sim`: writes a simulated conference's location events, in arrival order, as
//! JSON lines in the shape of the `/v1` API, for the load tools, the demo and `./dev run`.
//!
//! Events go to `--out` (default stdout) and nothing else does; progress, warnings and the final
//! summary (one JSON object, the last line) go to stderr.
//!
//! With `--produce` it sends them through the service's ingest path instead (see
//! `udaconnect-sim/produce.rs`); then the summary is the last line of stdout.

#[path = "udaconnect-sim/produce.rs"]
mod produce;

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{ArgAction, Parser, ValueEnum};
use serde_json::json;
use udaconnect_actors::domain::{LocationEvent, Micros, MICROS_PER_S};
use udaconnect_bench::sim::{ConferenceConfig, Simulation};
use uuid::Uuid;

/// Progress goes to stderr every this many events.
const PROGRESS_EVERY: u64 = 1_000_000;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// One JSON object per line: event_id, person_id, lat, lon, recorded_at (RFC 3339).
    Jsonl,
}

/// Simulates a conference and writes its attendees' location events in arrival order.
///
/// Booths, talk rooms and the venue's size scale with --attendees unless given. The same flags
/// give byte-identical output.
#[derive(Debug, Parser)]
#[command(name = "udaconnect-sim", version)]
struct Cli {
    /// Attendees reporting locations.
    #[arg(long, default_value_t = 2_000)]
    attendees: u32,
    /// Person id of the first attendee; the others follow consecutively [default: 1].
    #[arg(long)]
    first_person_id: Option<i64>,
    /// Booths in the exhibition hall [default: attendees / 40, at least 1].
    #[arg(long)]
    booths: Option<u32>,
    /// Talk rooms; 0 for none [default: attendees / 2000, at least 1].
    #[arg(long)]
    talk_rooms: Option<u32>,
    /// Seats per talk room [default: 400].
    #[arg(long)]
    room_capacity: Option<u32>,
    /// Distance between neighbouring seats, meters [default: 1.2].
    #[arg(long)]
    seat_pitch_m: Option<f64>,
    /// Length of a talk, minutes [default: 40].
    #[arg(long)]
    talk_min: Option<u32>,
    /// Break between talks, minutes [default: 20].
    #[arg(long)]
    break_min: Option<u32>,
    /// Probability that an attendee free to join an upcoming talk goes [default: 0.25].
    #[arg(long)]
    talk_probability: Option<f64>,
    /// Distance between neighbouring booths (the aisles), meters [default: 9].
    #[arg(long)]
    booth_spacing_m: Option<f64>,
    /// Radius of the crowd disc in front of a booth, meters [default: 3].
    #[arg(long)]
    booth_radius_m: Option<f64>,
    /// Probability that an attendee's next stop is a booth rather than a lounge [default: 0.5].
    #[arg(long)]
    booth_probability: Option<f64>,
    /// Lounges in the open area around the hall [default: attendees / 100, at least 1].
    #[arg(long)]
    lounges: Option<u32>,
    /// Radius of a lounge's crowd disc, meters [default: 8].
    #[arg(long)]
    lounge_radius_m: Option<f64>,
    /// Shortest stay at a booth or lounge, seconds [default: 120].
    #[arg(long)]
    dwell_min_s: Option<u32>,
    /// Longest stay at a booth or lounge, seconds [default: 900].
    #[arg(long)]
    dwell_max_s: Option<u32>,
    /// Mean walking speed, m/s [default: 1.2].
    #[arg(long)]
    walk_speed_mps: Option<f64>,
    /// Simulated event time, seconds [default: 3600].
    #[arg(long)]
    duration_s: Option<u32>,
    /// Mean time between two reports of one attendee, seconds, ± 20 % [default: 15].
    #[arg(long)]
    report_interval_s: Option<f64>,
    /// GPS error (standard deviation per axis), meters [default: 2].
    #[arg(long)]
    gps_noise_m: Option<f64>,
    /// Largest delay from recording to arrival, seconds; the engine's lateness_s is 30
    /// [default: 20].
    #[arg(long)]
    max_disorder_s: Option<u32>,
    /// Fraction of events sent twice [default: 0.02].
    #[arg(long)]
    duplicate_rate: Option<f64>,
    /// Seed of every random choice [default: fixed].
    #[arg(long)]
    seed: Option<u64>,
    /// Latitude of the venue's center, degrees [default: 35.0845].
    #[arg(long, allow_hyphen_values = true)]
    center_lat: Option<f64>,
    /// Longitude of the venue's center, degrees [default: -106.6511].
    #[arg(long, allow_hyphen_values = true)]
    center_lon: Option<f64>,
    /// Venue width (east–west), meters [default: 6 × √attendees, at least 150, or what the
    /// booth hall and talk rooms need].
    #[arg(long)]
    venue_w_m: Option<f64>,
    /// Venue depth (north–south), meters [default: as the width].
    #[arg(long)]
    venue_h_m: Option<f64>,
    /// Move the venue onto a border between two zones [default: true].
    #[arg(long, action = ArgAction::Set)]
    straddle_zones: Option<bool>,
    /// H3 resolution of zones, as the engine's zone_resolution [default: 8].
    #[arg(long)]
    zone_resolution: Option<u8>,
    /// Start of the simulation, RFC 3339 [default: 2026-03-10T09:00:00Z].
    #[arg(long)]
    start: Option<DateTime<Utc>>,
    /// Where to write the events [default: stdout].
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Also write the attendees, one JSON line each: id, first_name, last_name, company_name.
    #[arg(long)]
    persons_out: Option<PathBuf>,
    /// Also write the venue (booths, rooms, sessions) as one JSON document.
    #[arg(long)]
    venue_out: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    format: Format,
    /// Count events per H3 zone for the summary (one H3 lookup per event).
    #[arg(long, action = ArgAction::Set, default_value_t = true)]
    zone_stats: bool,
    /// Send the events through the service's ingest path (validated, routed to zones, produced
    /// to the locations topic, acknowledged by the broker) instead of writing them. Creates the
    /// topics and inserts missing attendees into `person` first. The database, the broker and
    /// the topic prefix come from the same configuration as `udaconnect` (defaults: the ./dev
    /// stack).
    #[arg(long, conflicts_with_all = ["out", "format"])]
    produce: bool,
    /// With --produce: TOML configuration file, as `udaconnect --config`; `UDACONNECT_*`
    /// environment variables override it.
    #[arg(
        long,
        env = "UDACONNECT_CONFIG",
        value_name = "FILE",
        requires = "produce"
    )]
    config: Option<PathBuf>,
    /// With --produce: pace the events as the conference happens, with recorded_at near now,
    /// so a running `udaconnect serve` sees live traffic. Without it, events go as fast as the
    /// broker acknowledges them, with their simulated times.
    #[arg(long, requires = "produce")]
    realtime: bool,
    /// With --realtime: simulated seconds per wall-clock second. Above 1 the conference is
    /// compressed (recorded_at stays near now; attendees walk and report that much faster).
    #[arg(long, default_value_t = 1.0, requires = "realtime", value_parser = parse_speed)]
    speed: f64,
    /// With --produce: events per ingest call (unpaced; paced calls carry what is due).
    #[arg(long, default_value_t = 2_000, requires = "produce",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
    /// With --produce: ingest calls awaiting the broker's acknowledgement at once.
    #[arg(long, default_value_t = 4, requires = "produce",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,
    /// With --produce (not --realtime): at the end, declare event time past the conference's
    /// end, so the service closes every episode and sends the `connection.ended`
    /// notifications.
    #[arg(long, requires = "produce", conflicts_with = "realtime")]
    finish: bool,
    /// With --produce: how long to wait for PostgreSQL and for the broker, seconds.
    #[arg(long, default_value_t = 10, requires = "produce",
          value_parser = clap::value_parser!(u64).range(1..=600))]
    wait_s: u64,
}

fn parse_speed(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.01..=10_000.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("must be between 0.01 and 10000 (got {v})")),
        Err(e) => Err(e.to_string()),
    }
}

impl Cli {
    /// The config: defaults for --attendees, the venue refitted to booths and rooms given, then
    /// every flag given.
    fn config(&self) -> ConferenceConfig {
        let mut c = ConferenceConfig::for_attendees(self.attendees);
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = self.$field {
                    c.$field = v;
                }
            )*};
        }
        set!(
            booths,
            talk_rooms,
            room_capacity,
            seat_pitch_m,
            booth_spacing_m
        );
        c.fit_venue();
        set!(
            first_person_id,
            booth_radius_m,
            booth_probability,
            lounges,
            lounge_radius_m,
            talk_min,
            break_min,
            talk_probability,
            dwell_min_s,
            dwell_max_s,
            walk_speed_mps,
            duration_s,
            report_interval_s,
            gps_noise_m,
            max_disorder_s,
            duplicate_rate,
            seed,
            center_lat,
            center_lon,
            venue_w_m,
            venue_h_m,
            straddle_zones,
            zone_resolution
        );
        if let Some(start) = self.start {
            c.start = start.timestamp_micros();
        }
        c
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.produce {
        return produce::main(&cli);
    }
    let config = cli.config();
    let sim = match Simulation::new(config) {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("error: {e} (flag --{})", e.field.replace('_', "-"));
            return ExitCode::from(2);
        }
    };
    for warning in sim.config().warnings() {
        eprintln!("warning: {warning}");
    }
    match run(&cli, &sim) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is the reader's way of saying it has enough.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn create(path: &Path) -> anyhow::Result<BufWriter<File>> {
    let file =
        File::create(path).with_context(|| format!("failed to create {}", path.display()))?;
    Ok(BufWriter::with_capacity(1 << 20, file))
}

/// Writes `--persons-out` and `--venue-out` when given.
fn write_side_files(cli: &Cli, sim: &Simulation) -> anyhow::Result<()> {
    if let Some(path) = &cli.persons_out {
        let mut out = create(path)?;
        for person in sim.persons() {
            serde_json::to_writer(&mut out, &person)?;
            out.write_all(b"\n")?;
        }
        out.flush()
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    if let Some(path) = &cli.venue_out {
        let mut out = create(path)?;
        serde_json::to_writer_pretty(&mut out, sim.venue())?;
        out.write_all(b"\n")?;
        out.flush()
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}

fn run(cli: &Cli, sim: &Simulation) -> anyhow::Result<()> {
    let Format::Jsonl = cli.format;
    write_side_files(cli, sim)?;
    let (mut out, target): (Box<dyn Write>, String) = match &cli.out {
        Some(path) => (Box::new(create(path)?), path.display().to_string()),
        None => (
            Box::new(BufWriter::with_capacity(1 << 20, io::stdout().lock())),
            "stdout".to_owned(),
        ),
    };
    let started = Instant::now();
    // Generation and formatting take about as long each: one thread for each.
    let (batches, rx) = mpsc::sync_channel::<Vec<LocationEvent>>(16);
    let (written, bytes, stats) = thread::scope(|scope| {
        let generator = scope.spawn(move || {
            let mut events = sim.events().count_zones(cli.zone_stats);
            while let Some(batch) = events.next_batch() {
                if batches.send(batch.to_vec()).is_err() {
                    // The writer stopped on an error; it reports it.
                    break;
                }
            }
            events.stats().clone()
        });
        let written = write_events(rx, out.as_mut(), &target, sim, started);
        let stats = generator
            .join()
            .map_err(|_| anyhow::anyhow!("the event generator panicked"))?;
        written.map(|(n, bytes)| (n, bytes, stats))
    })?;
    out.flush()
        .with_context(|| format!("failed to write events to {target}"))?;
    drop(out);
    let elapsed = started.elapsed().as_secs_f64();
    let venue = sim.venue();
    let summary = json!({
        "tool": "udaconnect-sim",
        "events": stats.events,
        "written": written,
        "duplicates": stats.duplicates,
        "persons": stats.persons,
        "zones_touched": stats.zones_touched,
        "zone_events": stats
            .zone_events
            .iter()
            .map(|(zone, n)| json!([format!("{zone:x}"), n]))
            .collect::<Vec<_>>(),
        "max_disorder_us": stats.max_disorder_us,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "events_per_s": (stats.events as f64 / elapsed).round(),
        "bytes": bytes,
        "out": target,
        "venue": {
            "center_lat": venue.frame.lat,
            "center_lon": venue.frame.lon,
            "width_m": venue.width_m,
            "height_m": venue.height_m,
            "booths": venue.booths.len(),
            "talk_rooms": venue.rooms.len(),
            "lounges": venue.lounges.len(),
            "sessions": venue.sessions.len(),
            "border_zones": venue.border_zones.map(|(w, e)| [format!("{w:x}"), format!("{e:x}")]),
        },
        "config": sim.config(),
    });
    eprintln!("{summary}");
    Ok(())
}

/// Formats and writes the batches from the generator until it is done; the count of events
/// and bytes written.
fn write_events(
    batches: mpsc::Receiver<Vec<LocationEvent>>,
    out: &mut dyn Write,
    target: &str,
    sim: &Simulation,
    started: Instant,
) -> anyhow::Result<(u64, u64)> {
    let mut text = Vec::with_capacity(1 << 20);
    let mut clock = Timestamps::default();
    let (mut written, mut bytes, mut next_progress) = (0u64, 0u64, PROGRESS_EVERY);
    let (start, duration_s) = (sim.config().start, sim.config().duration_s);
    for batch in batches {
        text.clear();
        for e in &batch {
            write_event(&mut text, e, &mut clock);
        }
        out.write_all(&text)
            .with_context(|| format!("failed to write events to {target}"))?;
        written += batch.len() as u64;
        bytes += text.len() as u64;
        if written >= next_progress {
            next_progress += PROGRESS_EVERY;
            let last = batch.last().map_or(start, |e| e.received_at);
            eprintln!(
                "udaconnect-sim: {written} events, {:.0} of {duration_s} s simulated, \
                 {:.2} M events/s",
                (last - start) as f64 / MICROS_PER_S as f64,
                written as f64 / started.elapsed().as_secs_f64() / 1e6,
            );
        }
    }
    Ok((written, bytes))
}

/// Appends one event as a JSON line in the `/v1` API's shape.
fn write_event(line: &mut Vec<u8>, e: &LocationEvent, clock: &mut Timestamps) {
    let mut id = Uuid::encode_buffer();
    line.extend_from_slice(b"{\"event_id\":\"");
    line.extend_from_slice(e.event_id.hyphenated().encode_lower(&mut id).as_bytes());
    line.extend_from_slice(b"\",\"person_id\":");
    write_int(line, e.person_id);
    line.extend_from_slice(b",\"lat\":");
    write_degrees(line, e.lat);
    line.extend_from_slice(b",\"lon\":");
    write_degrees(line, e.lon);
    line.extend_from_slice(b",\"recorded_at\":\"");
    line.extend_from_slice(clock.seconds(e.recorded_at).as_bytes());
    let micros = e.recorded_at.rem_euclid(MICROS_PER_S) as u32;
    line.push(b'.');
    for k in (0..6).rev() {
        line.push(b'0' + (micros / 10u32.pow(k) % 10) as u8);
    }
    line.extend_from_slice(b"Z\"}\n");
}

/// Appends a decimal integer.
fn write_int(line: &mut Vec<u8>, n: i64) {
    if n < 0 {
        line.push(b'-');
    }
    let mut n = n.unsigned_abs();
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    line.extend_from_slice(&digits[i..]);
}

/// Appends a coordinate as JSON: the shortest text that parses back to the same number, so the
/// id derived from these numbers is the id sent. The simulator's coordinates are whole
/// multiples of 1e-7 degrees, whose shortest text is that multiple with trailing zeros cut;
/// anything else falls back to f64's `Display` (also shortest, never exponent notation).
fn write_degrees(line: &mut Vec<u8>, x: f64) {
    let steps = (x * 1e7).round();
    if steps.abs() > 2e9 || steps / 1e7 != x {
        let _ = write!(line, "{x}");
        return;
    }
    let steps = steps as i64;
    if steps < 0 {
        line.push(b'-');
    }
    let (whole, mut frac) = (
        steps.unsigned_abs() / 10_000_000,
        steps.unsigned_abs() % 10_000_000,
    );
    write_int(line, whole as i64);
    if frac > 0 {
        line.push(b'.');
        let mut width = 7;
        while frac % 10 == 0 {
            frac /= 10;
            width -= 1;
        }
        for k in (0..width).rev() {
            line.push(b'0' + (frac / 10u64.pow(k) % 10) as u8);
        }
    }
}

/// RFC 3339 text of whole seconds, cached: events in arrival order reuse a few dozen seconds.
#[derive(Default)]
struct Timestamps {
    slots: Vec<(i64, String)>,
}

impl Timestamps {
    const SLOTS: usize = 128;

    /// `2026-03-10T09:00:00` for the second containing `t`.
    fn seconds(&mut self, t: Micros) -> &str {
        if self.slots.is_empty() {
            self.slots = vec![(i64::MIN, String::new()); Self::SLOTS];
        }
        let second = t.div_euclid(MICROS_PER_S);
        let slot = &mut self.slots[second.rem_euclid(Self::SLOTS as i64) as usize];
        if slot.0 != second {
            slot.0 = second;
            slot.1.clear();
            // Validation keeps `start` within chrono's range.
            if let Some(dt) = DateTime::<Utc>::from_timestamp(second, 0) {
                let _ = write!(slot.1, "{}", dt.format("%Y-%m-%dT%H:%M:%S"));
            }
        }
        &slot.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_are_the_v1_wire_shape() {
        let e = LocationEvent {
            event_id: Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            person_id: 7,
            lat: 35.0845123,
            lon: -106.6511,
            recorded_at: 1_773_133_200 * MICROS_PER_S + 123_456,
            received_at: 0,
        };
        let mut line = Vec::new();
        write_event(&mut line, &e, &mut Timestamps::default());
        let line = String::from_utf8(line).unwrap();
        assert_eq!(
            line,
            "{\"event_id\":\"01234567-89ab-cdef-0123-456789abcdef\",\"person_id\":7,\
             \"lat\":35.0845123,\"lon\":-106.6511,\"recorded_at\":\"2026-03-10T09:00:00.123456Z\"}\n"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["lat"].as_f64(), Some(e.lat));
        let t: DateTime<Utc> = v["recorded_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(t.timestamp_micros(), e.recorded_at);
    }

    #[test]
    fn coordinates_are_written_as_their_shortest_text() {
        let text = |x: f64| {
            let mut line = Vec::new();
            write_degrees(&mut line, x);
            String::from_utf8(line).unwrap()
        };
        for (x, expected) in [
            (0.0, "0"),
            (35.0845, "35.0845"),
            (-106.6511, "-106.6511"),
            (-0.0000001, "-0.0000001"),
            (180.0, "180"),
            (-89.99999, "-89.99999"),
            // Not a multiple of 1e-7: Display's shortest text.
            (1.0 / 3.0, "0.3333333333333333"),
        ] {
            assert_eq!(text(x), expected);
        }
        let mut n: i64 = -1_800_000_000;
        while n <= 1_800_000_000 {
            let x = n as f64 / 1e7;
            assert_eq!(text(x), format!("{x}"), "{n}");
            assert_eq!(text(x).parse::<f64>().unwrap(), x);
            n += 9_876_543;
        }
    }

    #[test]
    fn flags_override_and_refit_the_venue() {
        let cli = Cli::parse_from(["udaconnect-sim", "--attendees", "20000", "--seed", "9"]);
        let c = cli.config();
        assert_eq!((c.booths, c.talk_rooms, c.seed), (500, 10, 9));
        assert_eq!(
            c,
            ConferenceConfig {
                seed: 9,
                ..ConferenceConfig::for_attendees(20_000)
            }
        );
        let cli = Cli::parse_from([
            "udaconnect-sim",
            "--booths",
            "1000",
            "--center-lon",
            "-3.5",
            "--straddle-zones",
            "false",
            "--start",
            "2026-05-01T08:00:00Z",
        ]);
        let c = cli.config();
        assert_eq!(c.booths, 1_000);
        // 32 columns of booths 9 m apart do not fit the default 269 m.
        assert!(c.venue_w_m > ConferenceConfig::default().venue_w_m);
        assert_eq!(c.center_lon, -3.5);
        assert!(!c.straddle_zones);
        assert_eq!(c.start, 1_777_622_400 * MICROS_PER_S);
    }
}
