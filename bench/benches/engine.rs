//! Criterion benches of the engine's hot paths: the distance, routing, and the synchronous
//! engine over a small simulated conference.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use udaconnect_actors::geo::Ecef;
use udaconnect_actors::{Engine, EngineOptions, EngineParams, Router};
use udaconnect_bench::sim::{simulate, ConferenceConfig};

fn distance(c: &mut Criterion) {
    let a = Ecef::from_degrees(35.0845, -106.6511);
    let b = Ecef::from_degrees(35.08452, -106.65112);
    let far = Ecef::from_degrees(35.0855, -106.6511);
    let mut g = c.benchmark_group("distance");
    g.bench_function("within_5m_hit", |bench| {
        bench.iter(|| std::hint::black_box(&a).within(std::hint::black_box(&b), 5.0))
    });
    g.bench_function("within_5m_reject", |bench| {
        bench.iter(|| std::hint::black_box(&a).within(std::hint::black_box(&far), 5.0))
    });
    g.bench_function("ecef_from_degrees", |bench| {
        bench.iter(|| {
            Ecef::from_degrees(
                std::hint::black_box(35.0845),
                std::hint::black_box(-106.6511),
            )
        })
    });
    g.finish();
}

fn conference() -> (EngineParams, Vec<udaconnect_actors::domain::LocationEvent>) {
    let mut config = ConferenceConfig::for_attendees(1_000);
    config.booths = 1_000;
    config.fit_venue();
    config.venue_w_m = config.venue_w_m.max(600.0);
    config.venue_h_m = config.venue_h_m.max(600.0);
    config.talk_probability = 0.05;
    config.duration_s = 300;
    config.zone_resolution = 9;
    let params = EngineParams {
        zone_resolution: 9,
        ..EngineParams::default()
    };
    (params, simulate(&config).expect("valid"))
}

fn engine(c: &mut Criterion) {
    let (params, events) = conference();
    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("route", |bench| {
        let mut router = Router::new(&params, 2);
        bench.iter(|| router.route_batch(&events))
    });
    g.bench_function("sync_engine_1000_attendees_300s", |bench| {
        bench.iter_batched(
            || {
                Engine::new(
                    &params,
                    EngineOptions {
                        zone_partitions: 2,
                        person_partitions: 2,
                        capture: false,
                        keep_copies: false,
                    },
                )
                .expect("valid")
            },
            |mut engine| {
                for chunk in events.chunks(5_000) {
                    engine.ingest(chunk);
                }
                engine.finish();
                engine.stats().colocations
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, distance, engine);
criterion_main!(benches);
