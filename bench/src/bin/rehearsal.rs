//! `rehearsal`: what a StatefulSet does to UdaConnect, rehearsed on one machine against the
//! `./dev` stack (`./dev rehearse` runs it): pods `udaconnect-0` … as `udaconnect serve`
//! processes, a simulated conference posted through REST, subscribers over SSE, a rolling
//! restart, a scale in and out, and the stored result compared with the reference engine's
//! (see `udaconnect_bench::rehearsal`).
//!
//! Progress goes to stderr; the last line of stdout is one JSON object with the figures. The
//! exit code is 1 when the rehearsal found a difference (listed on stderr), 2 when it could not
//! be carried out.
//!
//! The bench variant (about 1,000,000 points retained when the roll starts):
//! `rehearsal --attendees 34000 --report-interval-s 3 --booths 34000 --talk-probability 0
//! --duration-s 120 --preload 0.95` (docs/benchmarks.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use udaconnect::Config;
use udaconnect_bench::rehearsal::{run, Options};
use udaconnect_bench::sim::ConferenceConfig;
use udaconnect_bench::with_database;

/// Rehearses a rolling restart and a scale in and out of UdaConnect pods on one machine.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The `udaconnect` binary the pods run [default: `udaconnect` next to this program].
    #[arg(long, env = "UDACONNECT_REHEARSAL_BINARY")]
    binary: Option<PathBuf>,
    /// TOML configuration file, as `udaconnect --config`; `UDACONNECT_*` variables override it
    /// (the broker, the database server, partition counts).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The PostgreSQL maintenance database, to create the run's database [default: the
    /// configured database_url's server, database `postgres`].
    #[arg(long)]
    admin_url: Option<String>,
    /// Pods in the StatefulSet.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=16))]
    pods: u16,
    /// Attendees of the simulated conference.
    #[arg(long, default_value_t = 1_000)]
    attendees: u32,
    /// Length of the conference, seconds of event time.
    #[arg(long, default_value_t = 600)]
    duration_s: u32,
    /// Seconds between an attendee's reports.
    #[arg(long, default_value_t = 15.0)]
    report_interval_s: f64,
    /// Booths [default: a quarter of the attendees].
    #[arg(long)]
    booths: Option<u32>,
    /// Probability that an attendee goes to a talk when one starts.
    #[arg(long, default_value_t = 0.05)]
    talk_probability: f64,
    /// Share of the reports posted before the roll, as fast as the pods take them.
    #[arg(long, default_value_t = 0.5)]
    preload: f64,
    /// Seconds over which the other reports stream in from the start of the roll.
    #[arg(long, default_value_t = 60)]
    stream_s: u64,
    /// Persons followed over SSE.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    subscribers: u16,
    /// Where the pods' logs go [default: a new directory under the system's temp dir].
    #[arg(long, env = "UDACONNECT_REHEARSAL_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Keep the run's database and topics.
    #[arg(long)]
    keep: bool,
}

fn say(text: &str) {
    eprintln!("rehearsal: {text}");
}

fn options(cli: &Cli) -> anyhow::Result<Options> {
    let base = Config::load(cli.config.as_deref())?;
    let admin_url = match &cli.admin_url {
        Some(url) => url.clone(),
        None => with_database(base.database_url.expose(), "postgres")?,
    };
    let binary = match &cli.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|dir| dir.join("udaconnect"))
            .ok_or_else(|| anyhow::anyhow!("cannot tell where this program is; pass --binary"))?,
    };
    anyhow::ensure!(
        binary.is_file(),
        "binary: {} does not exist (build it with `cargo build --release --bin udaconnect`, or \
         pass --binary)",
        binary.display()
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&cli.preload),
        "preload: must be from 0 to 1 (got {})",
        cli.preload
    );
    let mut conference = ConferenceConfig::for_attendees(cli.attendees);
    conference.duration_s = cli.duration_s;
    conference.report_interval_s = cli.report_interval_s;
    conference.booths = cli.booths.unwrap_or(cli.attendees / 4).max(1);
    conference.talk_probability = cli.talk_probability;
    conference.fit_venue();
    let work_dir = match &cli.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("udaconnect-rehearsal-{}", std::process::id())),
    };
    Ok(Options {
        binary,
        base,
        admin_url,
        pods: usize::from(cli.pods),
        conference,
        preload: cli.preload,
        stream_over: Duration::from_secs(cli.stream_s),
        subscribers: usize::from(cli.subscribers),
        work_dir,
        keep: cli.keep,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let options = match options(&cli) {
        Ok(o) => o,
        Err(e) => {
            say(&format!("error: {e:#}"));
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    say(&format!("pods' logs: {}", options.work_dir.display()));
    match runtime.block_on(run(&options, &say)) {
        Ok(report) => {
            let failures = report.failures();
            println!("{}", serde_json::to_string(&report).expect("JSON"));
            if failures.is_empty() {
                say("passed");
                ExitCode::SUCCESS
            } else {
                for f in failures {
                    say(&format!("FAILED: {f}"));
                }
                ExitCode::from(1)
            }
        }
        Err(e) => {
            say(&format!("error: {e:#}"));
            ExitCode::from(2)
        }
    }
}
