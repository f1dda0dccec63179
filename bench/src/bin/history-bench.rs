//! `history-bench`: history queries at volume (docs/design.md §10: p99 ≤ 10 ms at 1M stored
//! locations),
//! through the running REST API, with the POC's own algorithm as the peer.
//!
//! A fresh database gets `--persons` persons, `--locations` locations spread over a venue of
//! about 600 m × 600 m and three days, and `--episodes` connection rows; then a `udaconnect`
//! server runs in this process (REST only is used; its broker is unreachable on purpose, so no
//! topic is created) and, one request at a time from one client:
//! 1. `GET /v1/persons/{id}/connections?from=&to=&limit=100` for random persons and 2-hour windows;
//! 2. `GET /api/persons/{id}/connection?start_date=&end_date=&distance=5` (the POC contract, one
//!    set-based statement) for random persons and one-day windows;
//! 3. the POC's algorithm for the same inputs: one `ST_DWithin` query per own location, sent
//!    directly to PostgreSQL (no HTTP), as its Flask service did; its (person, location) set is
//!    compared with the one from step 2.
//!
//! Progress goes to stderr; the last line of stdout is one JSON object with the figures.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::{json, Value};
use udaconnect::Config;
use udaconnect_bench::scratch::pg_client;
use udaconnect_bench::{percentile, with_database};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(about = "History query latency at volume, with the POC's algorithm as the peer")]
struct Cli {
    /// Persons to create.
    #[arg(long, default_value_t = 10_000)]
    persons: u32,
    /// Locations to store.
    #[arg(long, default_value_t = 1_000_000)]
    locations: u32,
    /// Connection rows (episodes) to store.
    #[arg(long, default_value_t = 200_000)]
    episodes: u32,
    /// History queries to time.
    #[arg(long, default_value_t = 2_000)]
    queries: u32,
    /// POC connection queries to time (each also run the POC's way).
    #[arg(long, default_value_t = 200)]
    poc_queries: u32,
    /// PostgreSQL maintenance URL (default: `database_url` of the configuration, database
    /// `postgres`).
    #[arg(long)]
    admin_url: Option<String>,
    /// Keep the database afterwards.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("history-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(figures) => {
            println!("{figures}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("history-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<Value> {
    let base = Config::load(None)?;
    let admin_url = match &cli.admin_url {
        Some(url) => url.clone(),
        None => with_database(base.database_url.expose(), "postgres")?,
    };
    let name = format!("udaconnect_bench_history_{}", Uuid::new_v4().simple());
    let admin = pg_client(&admin_url).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .with_context(|| format!("failed to create database {name}"))?;
    let url = with_database(&admin_url, &name)?;
    let result = measure(cli, &base, &url).await;
    if cli.keep {
        eprintln!("kept database {name}");
    } else if let Err(e) = admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
    {
        eprintln!("could not drop database {name}: {e}");
    }
    result
}

async fn populate(cli: &Cli, db: &tokio_postgres::Client) -> anyhow::Result<Duration> {
    let started = Instant::now();
    // Persons, then locations in a ~600 m square over three days, then episodes with random
    // peers (all in SQL: the load is not what is measured).
    db.execute(
        "INSERT INTO person (id, first_name, last_name, company_name)
         SELECT i, 'First' || i, 'Last' || i, 'Company ' || (i % 97) FROM generate_series(1, $1::int) i",
        &[&(cli.persons as i32)],
    )
    .await?;
    eprintln!("{} persons stored", cli.persons);
    db.execute(
        "INSERT INTO location (event_id, person_id, coordinate, recorded_at, zone)
         SELECT gen_random_uuid(), 1 + (i % $2::int),
                ST_SetSRID(ST_Point(37.55 + random() * 0.0054, -122.29 + random() * 0.0068), 4326),
                timestamptz '2020-08-15' + random() * interval '3 days', NULL
         FROM generate_series(1, $1::int) i",
        &[&(cli.locations as i32), &(cli.persons as i32)],
    )
    .await?;
    eprintln!("{} locations stored", cli.locations);
    db.execute(
        "INSERT INTO connection (person_id, peer_id, started_at, last_seen_at, ended_at,
                                 colocations, min_distance_m, lat, lon)
         SELECT p, q, s, s + d, s + d, 1 + (random() * 20)::int, random() * 5, 37.55, -122.29
         FROM (SELECT 1 + (i % $2::int) AS p, 1 + ((i * 7919 + 13) % $2::int) AS q,
                      timestamptz '2020-08-15' + random() * interval '3 days' AS s,
                      random() * interval '30 minutes' AS d
               FROM generate_series(1, $1::int) i) e
         WHERE p <> q
         ON CONFLICT DO NOTHING",
        &[&(cli.episodes as i32), &(cli.persons as i32)],
    )
    .await?;
    db.batch_execute("ANALYZE").await?;
    eprintln!("{} episodes stored; analyzed", cli.episodes);
    Ok(started.elapsed())
}

/// p50, p99 and max of latencies in milliseconds.
fn summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({
        "count": ms.len(),
        "p50_ms": r(percentile(&ms, 0.5)),
        "p99_ms": r(percentile(&ms, 0.99)),
        "max_ms": r(ms.last().copied().unwrap_or(f64::NAN)),
    })
}

/// GETs `url` and returns its JSON body and how long the request took, in milliseconds.
async fn timed_get(http: &reqwest::Client, url: &str) -> anyhow::Result<(Value, f64)> {
    let t = Instant::now();
    let body: Value = http
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok((body, t.elapsed().as_secs_f64() * 1e3))
}

/// A small deterministic generator (the inputs are the same in every run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

// Longer than our ~120-line rule on purpose: one phase of the bench, its steps in the order
// they run (set up, warm up, measure, drain, verify, report), sharing the timings and counts
// they report; split, each step would take and return a dozen of them.
async fn measure(cli: &Cli, base: &Config, url: &str) -> anyhow::Result<Value> {
    let db = pg_client(url).await?;
    udaconnect::store::migrate(&mut pg_client(url).await?)
        .await
        .context("failed to migrate")?;
    let load = populate(cli, &db).await?;

    let mut config = base.clone();
    config.database_url = udaconnect::config::DatabaseUrl::new(url);
    config.rest_addr = "127.0.0.1:0".parse()?;
    config.grpc_addr = "127.0.0.1:0".parse()?;
    // Nothing answers there: the pipeline never starts and no topic is created.
    config.kafka_brokers = "127.0.0.1:9".to_owned();
    config.topic_prefix = format!("bench-history-{}", Uuid::new_v4().simple());
    // The POC's connection query is the peer measured: serve its `/api`.
    config.poc_api = true;
    // The queries carry an organizer's JWT, as a real client's would (its check is measured).
    if config.jwt_hs256_key.is_none() {
        let key = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
        config.jwt_hs256_key = Some(udaconnect::config::Secret::new(key));
    }
    let token = udaconnect::auth::mint(
        &config,
        udaconnect::auth::Role::Organizer,
        None,
        Duration::from_secs(86_400),
    )?;
    let server = udaconnect::Server::build(config).await?;
    let rest = format!("http://{}", server.rest_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()?;
    let mut rng = Lcg(42);
    let day = |d: u64| format!("2020-08-{:02}", 15 + d);

    // 1. History through REST.
    let mut history_ms = Vec::new();
    let mut items = 0u64;
    for _ in 0..cli.queries {
        let person = 1 + rng.below(u64::from(cli.persons));
        let from_h = rng.below(70);
        let from = chrono::DateTime::parse_from_rfc3339("2020-08-15T00:00:00Z")?
            + chrono::Duration::hours(from_h as i64);
        let to = from + chrono::Duration::hours(2);
        let query = format!(
            "{rest}/v1/persons/{person}/connections?from={}&to={}&limit=100",
            from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        let (body, ms) = timed_get(&http, &query).await?;
        history_ms.push(ms);
        items += body["items"].as_array().map_or(0, |a| a.len() as u64);
    }
    eprintln!(
        "history: {} queries, {items} episodes returned",
        cli.queries
    );

    // 2 and 3. The POC's connection query: set-based through REST, then the POC's way.
    let mut poc_rest_ms = Vec::new();
    let mut poc_peer_ms = Vec::new();
    let mut rows = 0u64;
    for _ in 0..cli.poc_queries {
        let person = 1 + rng.below(u64::from(cli.persons)) as i64;
        let d = rng.below(3);
        let (start, end) = (day(d), day(d + 1));
        let query = format!(
            "{rest}/api/persons/{person}/connection?start_date={start}&end_date={end}&distance=5"
        );
        let (body, ms) = timed_get(&http, &query).await?;
        poc_rest_ms.push(ms);
        let ours: BTreeSet<(i64, i64)> = body
            .as_array()
            .context("the POC answer is a list")?
            .iter()
            .map(|r| {
                (
                    r["person"]["id"].as_i64().unwrap_or(-1),
                    r["location"]["id"].as_i64().unwrap_or(-1),
                )
            })
            .collect();
        rows += ours.len() as u64;

        let t = Instant::now();
        let own = db
            .query(
                "SELECT ST_X(coordinate), ST_Y(coordinate) FROM location
                 WHERE person_id = $1 AND recorded_at < $3::text::date AND recorded_at >= $2::text::date",
                &[&person, &start, &end],
            )
            .await?;
        let mut theirs = BTreeSet::new();
        for row in own {
            let (x, y): (f64, f64) = (row.get(0), row.get(1));
            let near = db
                .query(
                    "SELECT person_id, id FROM location
                     WHERE ST_DWithin(coordinate::geography, ST_SetSRID(ST_MakePoint($1, $2), 4326)::geography, 5)
                       AND person_id != $3
                       AND TO_DATE($4, 'YYYY-MM-DD') <= recorded_at
                       AND TO_DATE($5, 'YYYY-MM-DD') + 1 > recorded_at",
                    &[&x, &y, &person, &start, &end],
                )
                .await?;
            theirs.extend(
                near.iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1))),
            );
        }
        poc_peer_ms.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            ours == theirs,
            "person {person}, {start}..{end}: the API returned {} pairs, the POC's algorithm {}",
            ours.len(),
            theirs.len()
        );
    }
    eprintln!(
        "poc connection: {} queries, {rows} rows, equal to the POC's algorithm",
        cli.poc_queries
    );
    let _ = stop.send(());
    serving.await.context("server task")??;

    Ok(json!({
        "bench": "history",
        "persons": cli.persons,
        "locations": cli.locations,
        "episodes": cli.episodes,
        "load_s": (load.as_secs_f64() * 10.0).round() / 10.0,
        "history_rest": summary(history_ms),
        "history_items": items,
        "poc_connection_rest": summary(poc_rest_ms),
        "poc_connection_poc_algorithm": summary(poc_peer_ms),
        "poc_rows": rows,
    }))
}
