//! A stage's Kafka consumer (docs/design.md §4, §5; quickwit's source is the model): a dedicated
//! thread
//! polls the group's partitions and hands records to one worker task per assigned partition
//! through a bounded channel (backpressure: a full channel stops the polling). A partition is
//! paused when it is assigned; its worker restores it from the last snapshot, checks the
//! snapshot's offset against the log ([`crate::pipeline::offsets`]), and has the poll thread
//! seek there and resume. The worker takes snapshots periodically (stored in the background
//! while it goes on), and on revocation or shutdown flushes, snapshots and returns its offset,
//! which is committed before the partition is released. Storing that last snapshot has a
//! budget (`release_budget_ms`): past it the store is abandoned (rolled back, never half
//! stored) and the partition is released on its last stored snapshot, which the next owner
//! restores and replays from, as after a crash. Committed offsets never pass a stored
//! snapshot, so a crash replays from at most one snapshot interval back, and replays are
//! idempotent.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use udaconnect_actors::actors::ports::Stage;
use udaconnect_actors::messages::PersonSet;

use crate::config::Config;
use crate::kafka::consumer_config;
use crate::metrics::StageCounters;

/// One record of an assigned partition.
#[derive(Debug, Clone)]
pub struct Record {
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
}

/// The logic of one assigned partition of a stage.
pub trait PartitionWorker: Send + 'static {
    /// The offset of the first record the worker needs after its restore; the partition is
    /// fetched from there.
    fn start_offset(&self) -> i64;
    /// Handles records in offset order (effects may still be in flight when it returns).
    fn handle(&mut self, records: Vec<Record>) -> impl Future<Output = ()> + Send;
    /// Captures a snapshot of what was handled so far, unless nothing changed since the last
    /// one, and returns the work that finishes it: once every effect it covers is durable,
    /// it stores the snapshot and yields its next offset (`None` when that failed or was
    /// abandoned). The work runs while the worker goes on with the next records. Once
    /// `abandon` is cancelled the work stops storing, leaving the stored snapshot as it was,
    /// and yields `None` (the effects it waits for are still awaited: none may land after a
    /// release).
    fn begin_checkpoint(
        &mut self,
        abandon: CancellationToken,
    ) -> impl Future<Output = Option<Checkpoint>> + Send;
    /// Notes that a snapshot covering the records before `offset` is stored.
    fn checkpoint_stored(&mut self, offset: i64);
    /// Erasure: the partition's actors forget `persons` (see
    /// [`crate::pipeline::Pipeline::forget`]), and the next checkpoint is taken even if no
    /// record came since the last one. Errors: why the actors could not (retry).
    fn forget(&mut self, persons: &PersonSet) -> impl Future<Output = Result<(), String>> + Send;
    /// Stops the partition's actors.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// The work that finishes a snapshot ([`PartitionWorker::begin_checkpoint`]).
pub type Checkpoint = futures::future::BoxFuture<'static, Option<i64>>;

/// Opens workers for assigned partitions.
pub trait WorkerFactory: Send + Sync + 'static {
    type Worker: PartitionWorker;
    /// Restores the partition from its snapshot (retrying until the store answers).
    fn open(&self, partition: i32) -> impl Future<Output = Self::Worker> + Send;
}

enum Input {
    Record(Record),
    /// Flush, snapshot, stop; answer with the offset to commit.
    Revoke(oneshot::Sender<Option<i64>>),
    /// Snapshot now (admin), as the periodic snapshot does; answer with the offset of the new
    /// snapshot, `None` when nothing changed since the last one.
    Checkpoint(oneshot::Sender<Option<i64>>),
    /// Forget these persons (erasure), then snapshot as [`Input::Checkpoint`] does, after the
    /// snapshot being stored if one is: the answer comes once the stored snapshot no longer
    /// holds them (`Ok(None)`: it did not hold them; `Err`: why not, to retry).
    Forget(PersonSet, oneshot::Sender<Result<Option<i64>, String>>),
}

enum Command {
    Commit(i32, i64),
    /// The worker of generation `.1` of a newly assigned partition is restored: fetch from
    /// offset `.2` (ignored when the partition was reassigned to a newer worker meanwhile).
    Start(i32, u64, i64),
    /// Stop fetching (operations, tests); answered once the partition is paused.
    Pause(i32, oneshot::Sender<()>),
    Resume(i32, oneshot::Sender<()>),
}

/// The hand-off of each partition worker, by partition (shared with [`StageConsumer`]).
type Workers = Arc<Mutex<HashMap<i32, mpsc::Sender<Input>>>>;

/// Records handed to a partition's worker before the poll thread waits for room.
const CHANNEL_RECORDS: usize = 64;
/// Records a worker takes in one go.
const MAX_RECORDS_PER_HANDLE: usize = 32;

struct StageContext<F: WorkerFactory> {
    stage: Stage,
    topic: String,
    factory: Arc<F>,
    runtime: tokio::runtime::Handle,
    timing: Timing,
    workers: Workers,
    commands: std_mpsc::Sender<Command>,
    assigned: Arc<Mutex<Vec<i32>>>,
    /// Each assigned partition's worker: its generation, and whether it has restored and said
    /// where to fetch from.
    generations: Mutex<HashMap<i32, (u64, bool)>>,
    next_generation: AtomicU64,
    counters: Arc<StageCounters>,
    /// Cancelled when the stage stops: partitions assigned while the consumer closes are not
    /// opened (they go straight to their next owner).
    stopping: CancellationToken,
}

impl<F: WorkerFactory> ClientContext for StageContext<F> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            warn!(
                stage = self.stage.as_str(),
                fac, "librdkafka: {log_message}"
            );
        } else {
            debug!(
                stage = self.stage.as_str(),
                fac, "librdkafka: {log_message}"
            );
        }
    }
}

impl<F: WorkerFactory> ConsumerContext for StageContext<F> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            self.release(consumer, &partitions);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if self.stopping.is_cancelled() {
                return;
            }
            // Nothing is fetched until the partition's worker has restored its snapshot and
            // said where to start ([`Command::Start`]): the group's committed offset is not
            // what decides it.
            if let Err(e) = consumer.pause(tpl) {
                warn!(stage = self.stage.as_str(), error = %e, "cannot pause newly assigned partitions");
            }
            for e in tpl.elements() {
                self.open(e.partition());
            }
        }
    }
}

impl<F: WorkerFactory> StageContext<F> {
    fn open(&self, partition: i32) {
        let (tx, rx) = mpsc::channel(CHANNEL_RECORDS);
        let mut workers = self.workers.lock().expect("not poisoned");
        if workers.contains_key(&partition) {
            return;
        }
        workers.insert(partition, tx);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.generations
            .lock()
            .expect("not poisoned")
            .insert(partition, (generation, false));
        let mut assigned = self.assigned.lock().expect("not poisoned");
        assigned.push(partition);
        assigned.sort_unstable();
        info!(stage = self.stage.as_str(), partition, "partition assigned");
        self.runtime.spawn(run_worker(
            Arc::clone(&self.factory),
            self.stage,
            (partition, generation),
            rx,
            self.commands.clone(),
            self.timing,
            Arc::clone(&self.counters),
        ));
    }

    /// Flushes, snapshots and stops the workers of `partitions`, then commits their offsets
    /// (runs on the poll thread, before the partitions go to another consumer).
    fn release(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        let senders: Vec<(i32, mpsc::Sender<Input>)> = {
            let mut workers = self.workers.lock().expect("not poisoned");
            partitions
                .iter()
                .filter_map(|p| workers.remove(p).map(|tx| (*p, tx)))
                .collect()
        };
        if senders.is_empty() {
            return;
        }
        let mut acks = Vec::new();
        for (partition, tx) in senders {
            let (ack, done) = oneshot::channel();
            if tx.blocking_send(Input::Revoke(ack)).is_ok() {
                acks.push((partition, done));
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, done) in acks {
            if let Ok(Some(offset)) = done.blocking_recv() {
                let _ = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(offset));
            }
        }
        self.assigned
            .lock()
            .expect("not poisoned")
            .retain(|p| !partitions.contains(p));
        self.generations
            .lock()
            .expect("not poisoned")
            .retain(|p, _| !partitions.contains(p));
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                warn!(stage = self.stage.as_str(), error = %e, "commit on release failed; the next owner replays from the snapshot");
            }
        }
        info!(
            stage = self.stage.as_str(),
            ?partitions,
            "partitions released"
        );
    }
}

/// When a stage's partitions snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Between periodic snapshots.
    pub snapshot_interval: Duration,
    /// How long a release may take to store its last snapshot, from the revocation (a
    /// periodic snapshot still being stored counts against it); past it the partition is
    /// released on the last stored snapshot.
    pub release_budget: Duration,
}

async fn run_worker<F: WorkerFactory>(
    factory: Arc<F>,
    stage: Stage,
    (partition, generation): (i32, u64),
    mut rx: mpsc::Receiver<Input>,
    commands: std_mpsc::Sender<Command>,
    timing: Timing,
    counters: Arc<StageCounters>,
) {
    let snapshot_interval = timing.snapshot_interval;
    // Cancelled when a release's budget runs out: every store of this worker gives up then.
    let abandon = CancellationToken::new();
    let mut worker = factory.open(partition).await;
    let _ = commands.send(Command::Start(partition, generation, worker.start_offset()));
    // Partitions snapshot at staggered times, so that their snapshots do not all compete
    // for the two cores and PostgreSQL at once.
    let stagger = snapshot_interval.mul_f64(f64::from(partition.rem_euclid(8)) / 8.0);
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + snapshot_interval + stagger,
        snapshot_interval,
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The periodic snapshot being stored, if one is: at most one at a time.
    let mut storing: Option<tokio::task::JoinHandle<Option<i64>>> = None;
    loop {
        // The tick before the input: a partition that always has records waiting (a backlog,
        // a sustained rate) must still snapshot every interval, or a crash would replay all
        // of it (with the input first, a busy partition never took a periodic snapshot).
        let input = tokio::select! {
            biased;
            stored = async { storing.as_mut().expect("guarded").await }, if storing.is_some() => {
                storing = None;
                stored_checkpoint(&mut worker, partition, &commands, stored.ok().flatten());
                continue;
            }
            _ = ticker.tick() => {
                if storing.is_none() {
                    if let Some(work) = worker.begin_checkpoint(abandon.clone()).await {
                        storing = Some(tokio::spawn(work));
                    }
                }
                continue;
            }
            input = rx.recv() => input,
        };
        let (records, control) = match input {
            Some(Input::Record(first)) => {
                let mut records = vec![first];
                let mut control = None;
                while records.len() < MAX_RECORDS_PER_HANDLE {
                    match rx.try_recv() {
                        Ok(Input::Record(r)) => records.push(r),
                        Ok(other) => {
                            control = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                (records, control)
            }
            Some(other) => (Vec::new(), Some(other)),
            None => {
                worker.close().await;
                debug!(stage = stage.as_str(), partition, "worker stopped");
                return;
            }
        };
        if !records.is_empty() {
            counters.batch_records.observe(records.len() as f64);
            worker.handle(records).await;
        }
        match control {
            Some(Input::Revoke(ack)) => {
                let budget = {
                    let abandon = abandon.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(timing.release_budget).await;
                        abandon.cancel();
                    })
                };
                let offset =
                    checkpoint_now(&mut worker, partition, &commands, &mut storing, &abandon).await;
                budget.abort();
                worker.close().await;
                let _ = ack.send(offset);
                return;
            }
            Some(Input::Checkpoint(ack)) => {
                let offset =
                    checkpoint_now(&mut worker, partition, &commands, &mut storing, &abandon).await;
                let _ = ack.send(offset);
            }
            Some(Input::Forget(persons, ack)) => {
                // The snapshot being stored was captured before: it is stored (and noted)
                // first, so that noting it cannot undo the forgetting's mark that the next
                // snapshot is due; the one taken after the actors forgot replaces it.
                if let Some(work) = storing.take() {
                    stored_checkpoint(&mut worker, partition, &commands, work.await.ok().flatten());
                }
                let answer = match worker.forget(&persons).await {
                    Ok(()) => Ok(checkpoint_now(
                        &mut worker,
                        partition,
                        &commands,
                        &mut storing,
                        &abandon,
                    )
                    .await),
                    Err(e) => Err(e),
                };
                let _ = ack.send(answer);
            }
            Some(Input::Record(_)) | None => {}
        }
    }
}

/// Notes a stored snapshot and has its offset committed.
fn stored_checkpoint<W: PartitionWorker>(
    worker: &mut W,
    partition: i32,
    commands: &std_mpsc::Sender<Command>,
    offset: Option<i64>,
) {
    if let Some(offset) = offset {
        worker.checkpoint_stored(offset);
        let _ = commands.send(Command::Commit(partition, offset));
    }
}

/// Snapshots now and waits until it is stored (after the one being stored, if any), as the
/// periodic snapshot does; returns the offset the stored snapshot covers, `None` when nothing
/// changed since the last one or when `abandon` was cancelled before it was stored.
async fn checkpoint_now<W: PartitionWorker>(
    worker: &mut W,
    partition: i32,
    commands: &std_mpsc::Sender<Command>,
    storing: &mut Option<tokio::task::JoinHandle<Option<i64>>>,
    abandon: &CancellationToken,
) -> Option<i64> {
    if let Some(work) = storing.take() {
        stored_checkpoint(worker, partition, commands, work.await.ok().flatten());
    }
    let work = worker.begin_checkpoint(abandon.clone()).await?;
    let offset = work.await;
    stored_checkpoint(worker, partition, commands, offset);
    offset
}

/// The partition is not (or no longer) owned by this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the partition is not owned by this process")]
pub struct NotOwned;

/// Erasures on a stage's partitions ([`StageConsumer::forgetter`]).
pub struct Forgetter(Workers);

impl Forgetter {
    /// Erasure on every partition this process owns in the stage ([`Input::Forget`]): each
    /// partition's answer, by partition (a partition released meanwhile answers
    /// `Err(NotOwned)`: its next owner forgets the persons at its restore).
    pub async fn forget(
        &self,
        persons: &PersonSet,
    ) -> Vec<(i32, Result<Result<Option<i64>, String>, NotOwned>)> {
        let workers: Vec<(i32, mpsc::Sender<Input>)> = self
            .0
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(p, tx)| (*p, tx.clone()))
            .collect();
        let asks = workers.into_iter().map(|(partition, tx)| async move {
            let (ack, done) = oneshot::channel();
            let answer = match tx.send(Input::Forget(Arc::clone(persons), ack)).await {
                Ok(()) => done.await.map_err(|_| NotOwned),
                Err(_) => Err(NotOwned),
            };
            (partition, answer)
        });
        let mut answers = futures::future::join_all(asks).await;
        answers.sort_by_key(|(p, _)| *p);
        answers
    }
}

/// A running stage consumer.
pub struct StageConsumer {
    stage: Stage,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
    commands: std_mpsc::Sender<Command>,
    assigned: Arc<Mutex<Vec<i32>>>,
    workers: Workers,
}

/// Consumer settings of a stage: the group, no auto-commit, start from the beginning when the
/// group has no offset yet.
pub struct StageOptions {
    pub stage: Stage,
    pub group: String,
    pub topic: String,
    pub timing: Timing,
    /// Where the consumer counts (a pipeline's registered series).
    pub counters: StageCounters,
}

impl StageConsumer {
    /// Joins the group and starts polling on a dedicated thread.
    pub fn start<F: WorkerFactory>(
        config: &Config,
        options: StageOptions,
        factory: Arc<F>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let (commands, command_rx) = std_mpsc::channel();
        let assigned = Arc::new(Mutex::new(Vec::new()));
        let counters = Arc::new(options.counters);
        let workers: Workers = Arc::default();
        let stop = CancellationToken::new();
        let context = StageContext {
            stage: options.stage,
            topic: options.topic.clone(),
            factory,
            runtime: tokio::runtime::Handle::current(),
            timing: options.timing,
            workers: Arc::clone(&workers),
            commands: commands.clone(),
            assigned: Arc::clone(&assigned),
            generations: Mutex::default(),
            next_generation: AtomicU64::new(0),
            counters: Arc::clone(&counters),
            stopping: stop.clone(),
        };
        let consumer: BaseConsumer<StageContext<F>> = consumer_config(config)
            .set("group.id", &options.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Incremental rebalancing (KIP-429): a process joining or leaving moves only the
            // partitions that change owner; the others keep being served instead of being
            // snapshotted, released and restored by every member (the eager protocol).
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "10000")
            // The others learn of a rebalance (a member left) at their next heartbeat: a
            // short interval shortens every handover, for a few requests a second.
            .set("heartbeat.interval.ms", "250")
            // Also the rebalance timeout: how long a join waits for members that vanished
            // (kill -9). The poll thread blocks at most while a worker waits for a store that
            // is down, which this must outlast.
            .set("max.poll.interval.ms", "45000")
            .create_with_context(context)?;
        consumer.subscribe(&[&options.topic])?;
        let thread = {
            let stop = stop.clone();
            let stage = options.stage.as_str();
            let topic = options.topic.clone();
            std::thread::Builder::new()
                .name(format!("poll-{stage}"))
                .spawn(move || poll_loop(consumer, &topic, &stop, &command_rx))
                .expect("spawn the poll thread")
        };
        info!(
            stage = options.stage.as_str(),
            topic = options.topic,
            group = options.group,
            "stage consumer started"
        );
        Ok(Self {
            stage: options.stage,
            stop,
            thread: Some(thread),
            commands,
            assigned,
            workers,
        })
    }

    /// The partitions this process owns in the stage right now.
    pub fn assigned(&self) -> Vec<i32> {
        self.assigned.lock().expect("not poisoned").clone()
    }

    /// Snapshots `partition` now (see [`Input::Checkpoint`]); `Err` when this process does not
    /// own it.
    pub async fn checkpoint(&self, partition: i32) -> Result<Option<i64>, NotOwned> {
        let tx = self
            .workers
            .lock()
            .expect("not poisoned")
            .get(&partition)
            .cloned()
            .ok_or(NotOwned)?;
        let (ack, done) = oneshot::channel();
        tx.send(Input::Checkpoint(ack))
            .await
            .map_err(|_| NotOwned)?;
        done.await.map_err(|_| NotOwned)
    }

    /// A handle for erasures on the stage's partitions, usable without holding the consumer.
    pub fn forgetter(&self) -> Forgetter {
        Forgetter(Arc::clone(&self.workers))
    }

    /// Stops fetching a partition (its worker keeps what it has); for operations and tests.
    /// Returns once the poll thread has paused it: no record fetched after that reaches the
    /// worker.
    pub async fn pause(&self, partition: i32) {
        let (ack, done) = oneshot::channel();
        if self.commands.send(Command::Pause(partition, ack)).is_ok() {
            let _ = done.await;
        }
    }

    /// Fetches a paused partition again.
    pub async fn resume(&self, partition: i32) {
        let (ack, done) = oneshot::channel();
        if self.commands.send(Command::Resume(partition, ack)).is_ok() {
            let _ = done.await;
        }
    }

    /// Flushes, snapshots and commits every owned partition, leaves the group, and returns
    /// when done.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        info!(stage = self.stage.as_str(), "stage consumer stopped");
    }
}

fn set_paused<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, p: i32, paused: bool) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, p);
    let result = if paused {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(e) = result {
        warn!(partition = p, paused, error = %e, "cannot pause or resume");
    }
}

/// Lets a repeated error through at most once per interval (a broker away makes every poll
/// fail, ten times a second per consumer), counting the ones it held back.
pub(crate) struct ErrorThrottle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorThrottle {
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(errors held back since the last one let through)` when this one may be logged.
    pub(crate) fn report(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A restored partition waiting to be moved to the offset its worker starts from.
struct PendingStart {
    generation: u64,
    offset: i64,
    since: Instant,
    warned: bool,
}

/// Tries to move each restored partition's fetch position to its worker's start offset; a
/// partition stays paused until that succeeded, then resumes (unless an operator holds it
/// paused). librdkafka refuses a seek until the partition's fetcher has started (after the
/// group's committed offset was fetched), so a refused seek is tried again on the next turn
/// of the poll loop: starting from the committed offset instead could skip records.
fn start_partitions<F: WorkerFactory>(
    consumer: &BaseConsumer<StageContext<F>>,
    topic: &str,
    starting: &mut BTreeMap<i32, PendingStart>,
    held: &BTreeSet<i32>,
) {
    let context = consumer.context();
    starting.retain(|&p, start| {
        let current = context
            .generations
            .lock()
            .expect("not poisoned")
            .get(&p)
            .is_some_and(|(g, _)| *g == start.generation);
        if !current {
            // Revoked, or a newer worker took the partition over: its own start decides.
            return false;
        }
        match consumer.seek(topic, p, Offset::Offset(start.offset), Duration::from_millis(500)) {
            Ok(()) => {
                if let Some((_, started)) = context.generations.lock().expect("not poisoned").get_mut(&p) {
                    *started = true;
                }
                if !held.contains(&p) {
                    set_paused(consumer, topic, p, false);
                }
                debug!(partition = p, offset = start.offset, "partition started");
                false
            }
            Err(e) => {
                if !start.warned && start.since.elapsed() > Duration::from_secs(10) {
                    warn!(stage = context.stage.as_str(), partition = p, offset = start.offset, error = %e, "cannot seek to the restored offset yet; the partition stays paused");
                    start.warned = true;
                }
                true
            }
        }
    });
}

/// The partitions whose workers run here now.
fn owned_partitions<F: WorkerFactory>(consumer: &BaseConsumer<StageContext<F>>) -> Vec<i32> {
    consumer
        .context()
        .workers
        .lock()
        .expect("not poisoned")
        .keys()
        .copied()
        .collect()
}

/// Commits the pending offsets of the partitions this process still owns (asynchronously: a
/// later commit covers a failed one).
fn commit_owned<F: WorkerFactory>(
    consumer: &BaseConsumer<StageContext<F>>,
    topic: &str,
    pending: &mut BTreeMap<i32, i64>,
) {
    let owned = owned_partitions(consumer);
    let mut tpl = TopicPartitionList::new();
    for (&p, &offset) in pending.iter() {
        if owned.contains(&p) {
            let _ = tpl.add_partition_offset(topic, p, Offset::Offset(offset));
        }
    }
    pending.clear();
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            warn!(error = %e, "offset commit failed; a later one covers it");
        }
    }
}

/// Hands a fetched record to its partition's worker, waiting while the worker's channel is
/// full (backpressure reaches the broker), counted.
fn hand_over<F: WorkerFactory>(
    consumer: &BaseConsumer<StageContext<F>>,
    message: &rdkafka::message::BorrowedMessage<'_>,
) {
    let record = Record {
        offset: message.offset(),
        payload: message.payload().map(<[u8]>::to_vec),
    };
    let tx = consumer
        .context()
        .workers
        .lock()
        .expect("not poisoned")
        .get(&message.partition())
        .cloned();
    if let Some(tx) = tx {
        let counters = &consumer.context().counters;
        counters.records.inc();
        match tx.try_send(Input::Record(record)) {
            Err(mpsc::error::TrySendError::Full(input)) => {
                let waited = Instant::now();
                let _ = tx.blocking_send(input);
                counters
                    .backpressure_s
                    .inc_by(waited.elapsed().as_secs_f64());
            }
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

fn poll_loop<F: WorkerFactory>(
    consumer: BaseConsumer<StageContext<F>>,
    topic: &str,
    stop: &CancellationToken,
    commands: &std_mpsc::Receiver<Command>,
) {
    let mut pending_commits: BTreeMap<i32, i64> = BTreeMap::new();
    let mut poll_errors = ErrorThrottle::new(Duration::from_secs(10));
    // Restored partitions not moved to their start offset yet.
    let mut starting: BTreeMap<i32, PendingStart> = BTreeMap::new();
    // Partitions paused by an operator.
    let mut held: BTreeSet<i32> = BTreeSet::new();
    let mut last_commit = Instant::now();
    while !stop.is_cancelled() {
        while let Ok(command) = commands.try_recv() {
            match command {
                Command::Commit(p, offset) => {
                    pending_commits.insert(p, offset);
                }
                Command::Start(p, generation, offset) => {
                    starting.insert(
                        p,
                        PendingStart {
                            generation,
                            offset,
                            since: Instant::now(),
                            warned: false,
                        },
                    );
                }
                Command::Pause(p, ack) => {
                    held.insert(p);
                    set_paused(&consumer, topic, p, true);
                    let _ = ack.send(());
                }
                Command::Resume(p, ack) => {
                    held.remove(&p);
                    // A partition still restoring stays paused until its worker starts it.
                    let started = consumer
                        .context()
                        .generations
                        .lock()
                        .expect("not poisoned")
                        .get(&p)
                        .is_some_and(|(_, started)| *started);
                    if started {
                        set_paused(&consumer, topic, p, false);
                    }
                    let _ = ack.send(());
                }
            }
        }
        if !starting.is_empty() {
            start_partitions(&consumer, topic, &mut starting, &held);
        }
        if !pending_commits.is_empty() && last_commit.elapsed() > Duration::from_millis(200) {
            commit_owned(&consumer, topic, &mut pending_commits);
            last_commit = Instant::now();
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => hand_over(&consumer, &message),
            Some(Err(e)) => {
                if let Some(suppressed) = poll_errors.report() {
                    warn!(stage = consumer.context().stage.as_str(), error = %e, suppressed, "poll error (the same kind of error is logged at most every 10 s)");
                }
            }
            None => {}
        }
    }
    let owned = owned_partitions(&consumer);
    consumer.context().release(&consumer, &owned);
    // Dropping the consumer closes it (rd_kafka_consumer_close, polled until closed), which
    // leaves the group from any join state, so the others take the partitions over at once. An
    // unsubscribe() first is postponed by librdkafka while a rebalance is in progress, and a
    // process stopped then was only removed from the group at its session timeout (10 s).
    drop(consumer);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, AtomicUsize};

    use super::*;

    /// Counts its snapshots; each is stored at once, or, with `stall`, not before its
    /// `abandon` is cancelled (a store PostgreSQL is too busy to finish).
    struct Counting {
        handled: Arc<AtomicI64>,
        snapshots: Arc<AtomicUsize>,
        stall: bool,
    }

    impl PartitionWorker for Counting {
        fn start_offset(&self) -> i64 {
            0
        }

        async fn handle(&mut self, records: Vec<Record>) {
            let last = records.last().map_or(0, |r| r.offset + 1);
            self.handled.store(last, Ordering::Release);
            // A little work per batch, as a stage does.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        async fn begin_checkpoint(&mut self, abandon: CancellationToken) -> Option<Checkpoint> {
            self.snapshots.fetch_add(1, Ordering::AcqRel);
            let offset = self.handled.load(Ordering::Acquire);
            let stall = self.stall;
            Some(Box::pin(async move {
                if stall {
                    abandon.cancelled().await;
                    return None;
                }
                Some(offset)
            }))
        }

        fn checkpoint_stored(&mut self, _offset: i64) {}

        async fn forget(&mut self, _persons: &PersonSet) -> Result<(), String> {
            Ok(())
        }

        async fn close(self) {}
    }

    struct Factory {
        handled: Arc<AtomicI64>,
        snapshots: Arc<AtomicUsize>,
        stall: bool,
    }

    impl WorkerFactory for Factory {
        type Worker = Counting;

        async fn open(&self, _partition: i32) -> Counting {
            Counting {
                handled: Arc::clone(&self.handled),
                snapshots: Arc::clone(&self.snapshots),
                stall: self.stall,
            }
        }
    }

    /// A worker of partition 0 over a [`Counting`] worker (stalling its snapshots when
    /// `stall`): its input, the commands it sends, its task, and its snapshot count.
    fn spawn_worker(
        stall: bool,
        timing: Timing,
    ) -> (
        mpsc::Sender<Input>,
        std_mpsc::Receiver<Command>,
        tokio::task::JoinHandle<()>,
        Arc<AtomicUsize>,
    ) {
        let snapshots = Arc::new(AtomicUsize::new(0));
        let factory = Arc::new(Factory {
            handled: Arc::default(),
            snapshots: Arc::clone(&snapshots),
            stall,
        });
        let (tx, rx) = mpsc::channel(64);
        let (commands, command_rx) = std_mpsc::channel();
        let worker = tokio::spawn(run_worker(
            factory,
            Stage::Zones,
            (0, 0),
            rx,
            commands,
            timing,
            Arc::new(StageCounters::default()),
        ));
        (tx, command_rx, worker, snapshots)
    }

    async fn send_record(tx: &mpsc::Sender<Input>, offset: i64) {
        let record = Record {
            offset,
            payload: None,
        };
        tx.send(Input::Record(record))
            .await
            .expect("worker running");
    }

    #[tokio::test]
    async fn a_partition_that_always_has_records_waiting_still_snapshots_every_interval() {
        let (tx, _command_rx, worker, snapshots) = spawn_worker(
            false,
            Timing {
                snapshot_interval: Duration::from_millis(50),
                release_budget: Duration::from_secs(2),
            },
        );
        // A backlog that never drains for a second: the channel is refilled as fast as the
        // worker empties it.
        let started = tokio::time::Instant::now();
        let mut offset = 0;
        while started.elapsed() < Duration::from_secs(1) {
            send_record(&tx, offset).await;
            offset += 1;
        }
        drop(tx);
        worker.await.expect("worker stopped");
        // 20 intervals of 50 ms (the first one staggered); well over half must have ticked.
        let taken = snapshots.load(Ordering::Acquire);
        assert!(
            taken >= 10,
            "{taken} periodic snapshots in 1 s at a 50 ms interval"
        );
    }

    #[tokio::test]
    async fn a_release_whose_snapshot_cannot_be_stored_ends_at_its_budget_without_an_offset() {
        let budget = Duration::from_millis(300);
        let (tx, command_rx, worker, _) = spawn_worker(
            true,
            Timing {
                // No periodic snapshot during the test.
                snapshot_interval: Duration::from_secs(3600),
                release_budget: budget,
            },
        );
        for offset in 0..10 {
            send_record(&tx, offset).await;
        }
        let began = tokio::time::Instant::now();
        let (ack, done) = oneshot::channel();
        tx.send(Input::Revoke(ack)).await.expect("worker running");
        let offset = tokio::time::timeout(Duration::from_secs(10), done)
            .await
            .expect("the release ends at its budget, not when the store would")
            .expect("answered");
        let took = began.elapsed();
        worker.await.expect("worker stopped");
        // Nothing to commit: the next owner starts from the last stored snapshot.
        assert_eq!(offset, None);
        assert!(
            took >= budget && took < budget + Duration::from_secs(2),
            "released after {took:?} with a budget of {budget:?}"
        );
        assert!(
            command_rx
                .try_iter()
                .all(|c| !matches!(c, Command::Commit(..))),
            "an abandoned snapshot's offset was committed"
        );
    }
}
