//! The `udaconnect` command line: `serve`, `migrate`, `ingest --file`, `seed poc <dir>`,
//! `token`, `docs`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::startup::{serve, wait_for_postgres};
use crate::store;

/// UdaConnect: who met whom at the conference, in real time.
#[derive(Debug, Parser)]
#[command(name = "udaconnect", version, about)]
pub struct Cli {
    /// TOML configuration file; `UDACONNECT_*` environment variables override it.
    #[arg(long, global = true, env = "UDACONNECT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: migrations, pipeline, REST and gRPC, until SIGTERM or Ctrl-C.
    Serve,
    /// Apply pending schema migrations and exit.
    Migrate,
    /// Send location events from a JSON-lines file through the ingest path (validated,
    /// routed, produced; acknowledged by the broker). One object per line:
    /// `{"event_id"?, "person_id", "lat", "lon", "recorded_at": RFC 3339}`.
    Ingest {
        /// The file (`-` for standard input).
        #[arg(long)]
        file: PathBuf,
        /// Events per request to the broker.
        #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
    },
    /// Write the API documents generated from the code: `openapi.yaml` (OpenAPI 3) and
    /// `postman.json` (Postman v2.1 collection).
    Docs {
        /// The folder to write them to.
        #[arg(long, default_value = "docs")]
        out: PathBuf,
    },
    /// Print a bearer JWT signed with `jwt_hs256_key` (development, tests, a gateway's
    /// credential). An RS256 deployment's tokens come from its identity provider instead.
    Token {
        /// The caller's role.
        #[arg(long, value_enum)]
        role: crate::auth::Role,
        /// The attendee's person id (the token's `sub`); attendee tokens only.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        person: Option<i64>,
        /// How long the token is valid: `30m`, `12h`, `7days` (at most 366 days).
        #[arg(long, default_value = "12h", value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Load seed data.
    Seed {
        #[command(subcommand)]
        source: SeedSource,
    },
}

/// Seed data sources.
#[derive(Debug, Subcommand)]
pub enum SeedSource {
    /// The POC's `persons.csv` and `locations.csv` (ids and raw X/Y kept exactly).
    Poc {
        /// Folder holding `persons.csv` and `locations.csv`.
        dir: PathBuf,
    },
}

/// Parses the command line, runs the command and returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file (`./dev run`'s) stays plain text to grep.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    tracing::debug!(?config, "configuration loaded");
    match cli.command {
        Command::Serve => serve(config, shutdown_signal()).await,
        Command::Migrate => {
            let mut client = connect(&config).await?;
            let report = store::migrate(&mut client)
                .await
                .context("failed to migrate")?;
            println!(
                "schema at version {} (applied now: {})",
                report.version,
                if report.applied.is_empty() {
                    "none".to_owned()
                } else {
                    format!("{:?}", report.applied)
                }
            );
            Ok(())
        }
        Command::Ingest { file, batch } => {
            crate::pipeline::ingest::ingest_file(&config, &file, batch as usize).await
        }
        Command::Token { role, person, ttl } => {
            println!("{}", crate::auth::mint(&config, role, person, ttl)?);
            Ok(())
        }
        Command::Docs { out } => {
            for (name, text) in crate::rest::docs::documents()? {
                let path = out.join(name);
                std::fs::write(&path, text)
                    .with_context(|| format!("failed to write {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Seed {
            source: SeedSource::Poc { dir },
        } => {
            let mut client = connect(&config).await?;
            store::migrate(&mut client)
                .await
                .context("failed to migrate")?;
            let report = store::seed_poc(&mut client, &dir)
                .await
                .with_context(|| format!("failed to load the POC seed from {}", dir.display()))?;
            println!(
                "persons: {} read, {} inserted; locations: {} read, {} inserted",
                report.persons_read,
                report.persons_inserted,
                report.locations_read,
                report.locations_inserted
            );
            if report.persons_erased > 0 {
                println!(
                    "left out: {} erased persons and their locations",
                    report.persons_erased
                );
            }
            Ok(())
        }
    }
}

/// A token lifetime: a humantime duration of 1 s to 366 days.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 30m, 12h, 7days)"))?;
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(366 * 86_400) {
        return Err(format!("must be between 1s and 366days (got {text})"));
    }
    Ok(ttl)
}

async fn connect(config: &Config) -> anyhow::Result<deadpool_postgres::Object> {
    let pool = store::pool(config, Duration::from_secs(5))?;
    wait_for_postgres(&pool, config).await
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for sigterm");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("ctrl-c received, shutting down"),
        () = terminate => tracing::info!("sigterm received, shutting down"),
    }
}
