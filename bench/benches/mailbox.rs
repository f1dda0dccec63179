//! Actor runtime shoot-out: `ractor` 0.16 against `actix` 0.13 on UdaConnect's zone workload.
//!
//! Every case pushes the same synthetic [`ZonePoint`]s (64 bytes each) into zone actors that do
//! the same work through the shared [`ZoneWindow`]: append to a window that is cleared every
//! 4096 points and count, and in the `fanout-scan` case also compare each point with the last
//! 64 points of its zone, roughly what a zone actor's proximity check costs. The clock stops
//! only when every actor has answered a `Flush` request, which also proves that no point was
//! lost. Producers build points, batches and routes with the same code for both runtimes.
//!
//! Groups:
//! - `mailbox`: 100,000 points, one message per point, to one actor (`Throughput::Elements`).
//! - `batched`: the same points as messages of 256 points each.
//! - `latency`: one ping and its reply; criterion's time per iteration is one round trip.
//!   `ractor-mt2-external` calls from a thread outside the runtime, so that every round trip
//!   crosses threads as `actix-arbiter`'s does.
//! - `fanout-insert` / `fanout-scan`: the points routed by person to 64 zone actors in batches
//!   of 256, then a flush of all 64.
//!
//! Thread layouts, because they explain most of the differences:
//! - `ractor-mt2`: a multi-thread tokio runtime with 2 workers, as the service runs it. The
//!   producer is itself a task on that runtime (as the Kafka consumer is), so producer and
//!   actors share the 2 workers and tokio's work stealing decides where each actor runs.
//! - `ractor-ct`: a current-thread tokio runtime: producer and actors on one thread, the layout
//!   of `actix-system`, to separate the runtime's own cost from the cost of crossing threads.
//! - `actix-system`: the idiomatic actix set-up. A `System` is one single-threaded arbiter (a
//!   current-thread tokio runtime with a `LocalSet`); the producer is the System's future and
//!   every actor runs on the same thread, so nothing runs in parallel.
//! - `actix-arbiter` (one actor) and `actix-2arbiters` (fan-out): the actors are started with
//!   `start_in_arbiter` on their own `Arbiter` threads (the 64 zone actors sharded round-robin
//!   over 2 of them) while the producer stays on the System thread. An actor never moves from
//!   its arbiter, so the sharding is fixed by hand where tokio would balance ractor's tasks.
//!
//! Fairness notes:
//! - Points are sent fire-and-forget: ractor `cast` into its unbounded mailbox, actix `do_send`,
//!   which ignores the mailbox capacity (16 by default); neither producer is ever held back.
//! - Both runtimes box each message (ractor erases the message type, actix wraps it in an
//!   envelope). ractor also polls four channels per message (signals, stop, supervision,
//!   messages) and, with its default `message_span_propogation` feature, captures the current
//!   tracing span with each message; with no subscriber installed here that is a no-op.
//! - Every request carries a timeout, as in the service: ractor `call`/`multi_call` with
//!   `Some(timeout)`, actix `send(..).timeout(..)`. `multi_call` also spawns one small task per
//!   actor to await its reply, which is part of ractor's idiomatic cost.
//! - Actors are started once per case, outside the timed region, and stopped afterwards.
//!
//! What explains the differences measured (figures in `docs/mailbox-bench.md`):
//! - Per message, ractor does more than actix: it waits on four ports in priority order, then
//!   runs the handler raced against the signal port inside `catch_unwind`, which is what buys
//!   kill signals, supervision and panic capture. One message per point therefore costs ractor
//!   a few times what it costs actix; with 256 points per message the difference almost
//!   disappears, because the per-point work dominates.
//! - On this virtual machine waking a parked thread costs tens of microseconds, so any layout
//!   where every round trip crosses threads (`actix-arbiter`, `ractor-mt2-external`) has high
//!   and noisy latency; tokio's multi-thread scheduler avoids it for `ractor-mt2` by running the
//!   woken actor on the caller's worker.

use std::hint::black_box;
use std::time::{Duration, Instant};

use actix::{Actor as _, Arbiter, ArbiterHandle, System};
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use ractor::rpc::CallResult;
use tokio::runtime::Runtime;

/// Points per throughput iteration.
const POINTS: usize = 100_000;
/// Points per batch message.
const BATCH: usize = 256;
/// Zone actors in the fan-out cases.
const ZONES: usize = 64;
/// Points a zone window holds before it is cleared.
const WINDOW: usize = 4096;
/// Recent points of its zone that each point is compared with in the scan workload.
const SCAN_DEPTH: usize = 64;
/// Squared distance (m²) under which two points are neighbours in the scan workload.
const NEAR_SQUARED: f64 = 25.0;
/// Time difference (s) under which two points are neighbours in the scan workload.
const NEAR_SECONDS: i64 = 30;
/// Timeout of every request/reply, as the service puts on every call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One located person at one time, the unit the zone actors ingest.
#[derive(Clone, Copy, Debug)]
struct ZonePoint {
    x: f64,
    y: f64,
    z: f64,
    time: i64,
    person: i64,
    id: u128,
}

const _: () = assert!(std::mem::size_of::<ZonePoint>() == 64);

impl ZonePoint {
    /// The `i`-th point of the synthetic stream: 4096 people, 64 per zone, a few metres apart.
    fn synthetic(i: usize) -> Self {
        let person = (i % 4096) as i64;
        Self {
            x: (person / 64) as f64 * 1.5 + (i % 7) as f64 * 0.25,
            y: (i % 13) as f64 * 0.4,
            z: 0.0,
            time: (i / 64) as i64,
            person,
            id: i as u128,
        }
    }

    /// The zone actor that owns this point's person.
    fn zone(&self) -> usize {
        self.person as usize % ZONES
    }

    fn is_near(&self, other: &ZonePoint) -> bool {
        let (dx, dy, dz) = (self.x - other.x, self.y - other.y, self.z - other.z);
        (self.time - other.time).abs() <= NEAR_SECONDS
            && dx * dx + dy * dy + dz * dz <= NEAR_SQUARED
    }
}

/// What a zone actor does with each point.
#[derive(Clone, Copy, Debug)]
enum Work {
    /// Append and count.
    Insert,
    /// Also compare with the zone's most recent points.
    Scan,
}

/// What a zone actor reports on a flush: points since the last flush, neighbours found and
/// the XOR of the point ids (a checksum that also keeps every field of a point in use).
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    points: u64,
    neighbours: u64,
    ids: u128,
}

impl Tally {
    /// XOR of the ids of one iteration's points.
    const EXPECTED_IDS: u128 = {
        let (mut ids, mut i) = (0, 0);
        while i < POINTS {
            ids ^= i as u128;
            i += 1;
        }
        ids
    };

    /// Panics unless every point of one iteration arrived exactly once.
    fn assert_complete(self) {
        assert_eq!(self.points, POINTS as u64, "points lost or duplicated");
        assert_eq!(self.ids, Self::EXPECTED_IDS, "points lost or duplicated");
        black_box(self.neighbours);
    }

    fn merge(self, other: Tally) -> Tally {
        Tally {
            points: self.points + other.points,
            neighbours: self.neighbours + other.neighbours,
            ids: self.ids ^ other.ids,
        }
    }
}

/// The state both runtimes' zone actors keep, so that the per-point work is the same code.
struct ZoneWindow {
    work: Work,
    points: Vec<ZonePoint>,
    tally: Tally,
}

impl ZoneWindow {
    fn new(work: Work) -> Self {
        Self {
            work,
            points: Vec::with_capacity(WINDOW),
            tally: Tally::default(),
        }
    }

    fn insert(&mut self, point: ZonePoint) {
        if let Work::Scan = self.work {
            let recent = &self.points[self.points.len().saturating_sub(SCAN_DEPTH)..];
            self.tally.neighbours += recent.iter().filter(|p| point.is_near(p)).count() as u64;
        }
        if self.points.len() == WINDOW {
            self.points.clear();
        }
        self.points.push(point);
        self.tally.points += 1;
        self.tally.ids ^= point.id;
    }

    fn flush(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }
}

/// Calls `send` with each batch of consecutive points, as a producer that batches its input.
fn for_each_batch(mut send: impl FnMut(Vec<ZonePoint>)) {
    for start in (0..POINTS).step_by(BATCH) {
        send(
            (start..(start + BATCH).min(POINTS))
                .map(ZonePoint::synthetic)
                .collect(),
        );
    }
}

/// Calls `send` with each zone's batches, routed by person, then with the partial remainders.
fn for_each_routed_batch(mut send: impl FnMut(usize, Vec<ZonePoint>)) {
    let mut buffers: Vec<Vec<ZonePoint>> = (0..ZONES).map(|_| Vec::with_capacity(BATCH)).collect();
    for i in 0..POINTS {
        let point = ZonePoint::synthetic(i);
        let zone = point.zone();
        buffers[zone].push(point);
        if buffers[zone].len() == BATCH {
            send(
                zone,
                std::mem::replace(&mut buffers[zone], Vec::with_capacity(BATCH)),
            );
        }
    }
    for (zone, buffer) in buffers.into_iter().enumerate() {
        if !buffer.is_empty() {
            send(zone, buffer);
        }
    }
}

/// How the producer hands points to a single actor.
#[derive(Clone, Copy)]
enum Delivery {
    PerPoint,
    Batched,
}

mod ractor_zone {
    use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

    use super::{Tally, Work, ZonePoint, ZoneWindow};

    /// Messages of the ractor zone actor.
    pub(super) enum ZoneMsg {
        Point(ZonePoint),
        Batch(Vec<ZonePoint>),
        Flush(RpcReplyPort<Tally>),
        Ping(RpcReplyPort<()>),
    }

    /// The ractor zone actor; its state is a [`ZoneWindow`].
    pub(super) struct ZoneActor;

    impl Actor for ZoneActor {
        type Msg = ZoneMsg;
        type State = ZoneWindow;
        type Arguments = Work;

        async fn pre_start(
            &self,
            _myself: ActorRef<Self::Msg>,
            work: Work,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(ZoneWindow::new(work))
        }

        async fn handle(
            &self,
            _myself: ActorRef<Self::Msg>,
            msg: Self::Msg,
            state: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            match msg {
                ZoneMsg::Point(point) => state.insert(point),
                ZoneMsg::Batch(points) => points.into_iter().for_each(|p| state.insert(p)),
                ZoneMsg::Flush(reply) => reply.send(state.flush())?,
                ZoneMsg::Ping(reply) => reply.send(())?,
            }
            Ok(())
        }
    }
}

mod actix_zone {
    use actix::{Actor, Context, Handler, Message, MessageResult};

    use super::{Tally, Work, ZonePoint, ZoneWindow};

    #[derive(Message)]
    #[rtype(result = "()")]
    pub(super) struct Point(pub(super) ZonePoint);

    #[derive(Message)]
    #[rtype(result = "()")]
    pub(super) struct Batch(pub(super) Vec<ZonePoint>);

    #[derive(Message)]
    #[rtype(result = "Tally")]
    pub(super) struct Flush;

    #[derive(Message)]
    #[rtype(result = "()")]
    pub(super) struct Ping;

    /// The actix zone actor; actix keeps state in the actor itself.
    pub(super) struct ZoneActor(ZoneWindow);

    impl ZoneActor {
        pub(super) fn new(work: Work) -> Self {
            Self(ZoneWindow::new(work))
        }
    }

    impl Actor for ZoneActor {
        type Context = Context<Self>;
    }

    impl Handler<Point> for ZoneActor {
        type Result = ();

        fn handle(&mut self, msg: Point, _ctx: &mut Context<Self>) {
            self.0.insert(msg.0);
        }
    }

    impl Handler<Batch> for ZoneActor {
        type Result = ();

        fn handle(&mut self, msg: Batch, _ctx: &mut Context<Self>) {
            msg.0.into_iter().for_each(|p| self.0.insert(p));
        }
    }

    impl Handler<Flush> for ZoneActor {
        type Result = MessageResult<Flush>;

        fn handle(&mut self, _msg: Flush, _ctx: &mut Context<Self>) -> MessageResult<Flush> {
            MessageResult(self.0.flush())
        }
    }

    impl Handler<Ping> for ZoneActor {
        type Result = ();

        fn handle(&mut self, _msg: Ping, _ctx: &mut Context<Self>) {}
    }
}

/// ractor zone actors and their join handles.
struct RactorZones {
    refs: Vec<ractor::ActorRef<ractor_zone::ZoneMsg>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl RactorZones {
    fn spawn(rt: &Runtime, count: usize, work: Work) -> Self {
        rt.block_on(async {
            let mut zones = Self {
                refs: Vec::with_capacity(count),
                handles: Vec::with_capacity(count),
            };
            for _ in 0..count {
                let (zone, handle) = ractor::Actor::spawn(None, ractor_zone::ZoneActor, work)
                    .await
                    .expect("ractor zone actor starts");
                zones.refs.push(zone);
                zones.handles.push(handle);
            }
            zones
        })
    }

    fn stop(self, rt: &Runtime) {
        rt.block_on(async {
            for zone in &self.refs {
                zone.stop(None);
            }
            for handle in self.handles {
                handle.await.expect("ractor zone actor stops");
            }
        });
    }
}

/// Runs `producer` as a task on `rt`, as the service's Kafka consumer runs, and returns its time.
fn run_ractor_producer<F>(rt: &Runtime, producer: F) -> Duration
where
    F: std::future::Future<Output = Duration> + Send + 'static,
{
    rt.block_on(async {
        tokio::spawn(producer)
            .await
            .expect("producer task completes")
    })
}

/// The two ractor set-ups: the service's 2-worker runtime and a single thread like actix's.
fn ractor_runtimes() -> [(&'static str, Runtime); 2] {
    let two_workers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime builds");
    let one_thread = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime builds");
    [("ractor-mt2", two_workers), ("ractor-ct", one_thread)]
}

async fn ractor_flush(zones: &[ractor::ActorRef<ractor_zone::ZoneMsg>]) -> Tally {
    let replies = ractor::rpc::multi_call(zones, ractor_zone::ZoneMsg::Flush, Some(CALL_TIMEOUT))
        .await
        .expect("zone actors are alive");
    replies
        .into_iter()
        .fold(Tally::default(), |sum, reply| match reply {
            CallResult::Success(tally) => sum.merge(tally),
            CallResult::Timeout | CallResult::SenderError => panic!("zone actor did not flush"),
        })
}

async fn ractor_stream(
    zone: ractor::ActorRef<ractor_zone::ZoneMsg>,
    delivery: Delivery,
    iters: u64,
) -> Duration {
    use ractor_zone::ZoneMsg;
    let start = Instant::now();
    for _ in 0..iters {
        match delivery {
            Delivery::PerPoint => {
                for i in 0..POINTS {
                    zone.cast(ZoneMsg::Point(ZonePoint::synthetic(i)))
                        .expect("zone actor is alive");
                }
            }
            Delivery::Batched => for_each_batch(|batch| {
                zone.cast(ZoneMsg::Batch(batch))
                    .expect("zone actor is alive")
            }),
        }
        let tally = ractor_flush(std::slice::from_ref(&zone)).await;
        tally.assert_complete();
    }
    start.elapsed()
}

async fn ractor_ping(zone: ractor::ActorRef<ractor_zone::ZoneMsg>, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let reply = zone
            .call(ractor_zone::ZoneMsg::Ping, Some(CALL_TIMEOUT))
            .await
            .expect("zone actor is alive");
        assert!(matches!(reply, CallResult::Success(())));
    }
    start.elapsed()
}

async fn ractor_fanout(zones: Vec<ractor::ActorRef<ractor_zone::ZoneMsg>>, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        for_each_routed_batch(|zone, batch| {
            zones[zone]
                .cast(ractor_zone::ZoneMsg::Batch(batch))
                .expect("zone actor is alive")
        });
        let tally = ractor_flush(&zones).await;
        tally.assert_complete();
    }
    start.elapsed()
}

/// actix zone actors: on the System's own thread when `arbiters` is empty, else spread
/// round-robin over the given arbiters.
fn start_actix_zones(
    system: &actix::SystemRunner,
    arbiters: &[ArbiterHandle],
    count: usize,
    work: Work,
) -> Vec<actix::Addr<actix_zone::ZoneActor>> {
    system.block_on(async {
        (0..count)
            .map(|i| match arbiters {
                [] => actix_zone::ZoneActor::new(work).start(),
                _ => actix_zone::ZoneActor::start_in_arbiter(
                    &arbiters[i % arbiters.len()],
                    move |_| actix_zone::ZoneActor::new(work),
                ),
            })
            .collect()
    })
}

/// The actix set-ups: every actor on the System thread, or on `arbiters` extra arbiter threads.
fn actix_layouts(arbiters: usize) -> [(String, Vec<Arbiter>); 2] {
    let extra = (0..arbiters).map(|_| Arbiter::new()).collect();
    let name = match arbiters {
        1 => "actix-arbiter".to_owned(),
        n => format!("actix-{n}arbiters"),
    };
    [("actix-system".to_owned(), Vec::new()), (name, extra)]
}

fn stop_arbiters(arbiters: Vec<Arbiter>) {
    for arbiter in arbiters {
        arbiter.stop();
        arbiter.join().expect("arbiter thread exits");
    }
}

async fn actix_flush(zones: &[actix::Addr<actix_zone::ZoneActor>]) -> Tally {
    // `send` enqueues at once; the requests are then awaited together, like `multi_call`.
    let requests: Vec<_> = zones
        .iter()
        .map(|zone| zone.send(actix_zone::Flush).timeout(CALL_TIMEOUT))
        .collect();
    let mut sum = Tally::default();
    for request in requests {
        sum = sum.merge(request.await.expect("zone actor flushes in time"));
    }
    sum
}

async fn actix_stream(
    zone: &actix::Addr<actix_zone::ZoneActor>,
    delivery: Delivery,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        match delivery {
            Delivery::PerPoint => {
                for i in 0..POINTS {
                    zone.do_send(actix_zone::Point(ZonePoint::synthetic(i)));
                }
            }
            Delivery::Batched => for_each_batch(|batch| zone.do_send(actix_zone::Batch(batch))),
        }
        let tally = actix_flush(std::slice::from_ref(zone)).await;
        tally.assert_complete();
    }
    start.elapsed()
}

async fn actix_ping(zone: &actix::Addr<actix_zone::ZoneActor>, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        zone.send(actix_zone::Ping)
            .timeout(CALL_TIMEOUT)
            .await
            .expect("zone actor answers in time");
    }
    start.elapsed()
}

async fn actix_fanout(zones: &[actix::Addr<actix_zone::ZoneActor>], iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        for_each_routed_batch(|zone, batch| zones[zone].do_send(actix_zone::Batch(batch)));
        let tally = actix_flush(zones).await;
        tally.assert_complete();
    }
    start.elapsed()
}

fn throughput_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .throughput(Throughput::Elements(POINTS as u64))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group
}

/// One actor, fed per point or in batches.
fn single_actor(c: &mut Criterion, name: &str, delivery: Delivery) {
    let mut group = throughput_group(c, name);
    for (layout, rt) in ractor_runtimes() {
        let zones = RactorZones::spawn(&rt, 1, Work::Insert);
        let zone = zones.refs[0].clone();
        group.bench_function(layout, |b| {
            b.iter_custom(|iters| {
                run_ractor_producer(&rt, ractor_stream(zone.clone(), delivery, iters))
            })
        });
        zones.stop(&rt);
    }
    let system = System::new();
    for (layout, arbiters) in actix_layouts(1) {
        let handles: Vec<_> = arbiters.iter().map(Arbiter::handle).collect();
        let zone = start_actix_zones(&system, &handles, 1, Work::Insert).remove(0);
        group.bench_function(layout, |b| {
            b.iter_custom(|iters| system.block_on(actix_stream(&zone, delivery, iters)))
        });
        drop(zone);
        stop_arbiters(arbiters);
    }
    group.finish();
}

fn mailbox(c: &mut Criterion) {
    single_actor(c, "mailbox", Delivery::PerPoint);
}

fn batched(c: &mut Criterion) {
    single_actor(c, "batched", Delivery::Batched);
}

/// Request/reply round trip with an idle mailbox.
fn latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("latency");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (layout, rt) in ractor_runtimes() {
        let zones = RactorZones::spawn(&rt, 1, Work::Insert);
        let zone = zones.refs[0].clone();
        group.bench_function(layout, |b| {
            b.iter_custom(|iters| run_ractor_producer(&rt, ractor_ping(zone.clone(), iters)))
        });
        if layout == "ractor-mt2" {
            // The caller is the thread blocked in `block_on`, outside the runtime: every round
            // trip crosses threads, as with `actix-arbiter`, instead of tokio running caller
            // and actor back to back on one worker.
            group.bench_function("ractor-mt2-external", |b| {
                b.iter_custom(|iters| rt.block_on(ractor_ping(zone.clone(), iters)))
            });
        }
        zones.stop(&rt);
    }
    let system = System::new();
    for (layout, arbiters) in actix_layouts(1) {
        let handles: Vec<_> = arbiters.iter().map(Arbiter::handle).collect();
        let zone = start_actix_zones(&system, &handles, 1, Work::Insert).remove(0);
        group.bench_function(layout, |b| {
            b.iter_custom(|iters| system.block_on(actix_ping(&zone, iters)))
        });
        drop(zone);
        stop_arbiters(arbiters);
    }
    group.finish();
}

/// 64 zone actors fed routed batches, with and without the neighbour scan.
fn fanout(c: &mut Criterion) {
    for (name, work) in [("fanout-insert", Work::Insert), ("fanout-scan", Work::Scan)] {
        let mut group = throughput_group(c, name);
        for (layout, rt) in ractor_runtimes() {
            let zones = RactorZones::spawn(&rt, ZONES, work);
            let refs = zones.refs.clone();
            group.bench_function(layout, |b| {
                b.iter_custom(|iters| run_ractor_producer(&rt, ractor_fanout(refs.clone(), iters)))
            });
            zones.stop(&rt);
        }
        let system = System::new();
        for (layout, arbiters) in actix_layouts(2) {
            let handles: Vec<_> = arbiters.iter().map(Arbiter::handle).collect();
            let zones = start_actix_zones(&system, &handles, ZONES, work);
            group.bench_function(layout, |b| {
                b.iter_custom(|iters| system.block_on(actix_fanout(&zones, iters)))
            });
            drop(zones);
            stop_arbiters(arbiters);
        }
        group.finish();
    }
}

criterion_group!(benches, mailbox, batched, latency, fanout);
criterion_main!(benches);
