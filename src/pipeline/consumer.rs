//! A stage's Kafka consumer (DESIGN §4, §5; quickwit's source is the model): a dedicated thread
//! polls the group's partitions and hands records to one worker task per assigned partition
//! through a bounded channel (backpressure: a full channel stops the polling). A worker
//! restores its partition from the last snapshot on assignment, takes snapshots periodically,
//! and on revocation or shutdown flushes, snapshots and returns its offset, which is committed
//! before the partition is released. Committed offsets never pass a stored snapshot, so a
//! crash replays from at most one snapshot interval back, and replays are idempotent.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::kafka::client_config;
use crate::metrics::SizeHistogram;

/// What a stage's consumer counts (for `/metrics`).
#[derive(Debug, Default)]
pub struct StageCounters {
    /// Records handed to the partitions' workers.
    pub records: AtomicU64,
    /// Time the poll thread waited for room in a worker's channel (backpressure), µs.
    pub backpressure_us: AtomicU64,
    /// Records per worker batch.
    pub batch_records: SizeHistogram,
    /// Times the member rejoined its group because partitions had no live owner.
    pub rejoins: AtomicU64,
}

/// One record of an assigned partition.
#[derive(Debug, Clone)]
pub struct Record {
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
}

/// The logic of one assigned partition of a stage.
pub trait PartitionWorker: Send + 'static {
    /// Handles records in offset order (effects may still be in flight when it returns).
    fn handle(&mut self, records: Vec<Record>) -> impl Future<Output = ()> + Send;
    /// Waits until every handled record's effects are durable, stores a snapshot covering
    /// them, and returns its next offset; `None` when nothing changed since the last one.
    fn checkpoint(&mut self) -> impl Future<Output = Option<i64>> + Send;
    /// Stops the partition's actors.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Opens workers for assigned partitions.
pub trait WorkerFactory: Send + Sync + 'static {
    type Worker: PartitionWorker;
    /// Restores the partition from its snapshot (retrying until the store answers).
    fn open(&self, partition: i32) -> impl Future<Output = Self::Worker> + Send;
    /// How many of the stage's partitions no live process owns (from the owner rows).
    fn orphaned(&self) -> impl Future<Output = Result<u32, String>> + Send;
}

enum Input {
    Record(Record),
    /// Flush, snapshot, stop; answer with the offset to commit.
    Revoke(oneshot::Sender<Option<i64>>),
    /// Snapshot now (admin), as the periodic snapshot does; answer with the offset of the new
    /// snapshot, `None` when nothing changed since the last one.
    Checkpoint(oneshot::Sender<Option<i64>>),
}

enum Command {
    Commit(i32, i64),
    Pause(i32),
    Resume(i32),
}

/// The hand-off of each partition worker, by partition (shared with [`StageConsumer`]).
type Workers = Arc<Mutex<HashMap<i32, mpsc::Sender<Input>>>>;

/// Records handed to a partition's worker before the poll thread waits for room.
const CHANNEL_RECORDS: usize = 64;
/// Records a worker takes in one go.
const MAX_RECORDS_PER_HANDLE: usize = 32;

struct StageContext<F: WorkerFactory> {
    stage: &'static str,
    topic: String,
    factory: Arc<F>,
    runtime: tokio::runtime::Handle,
    snapshot_interval: Duration,
    workers: Workers,
    commands: std_mpsc::Sender<Command>,
    assigned: Arc<Mutex<Vec<i32>>>,
    counters: Arc<StageCounters>,
}

impl<F: WorkerFactory> ClientContext for StageContext<F> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            warn!(stage = self.stage, fac, "librdkafka: {log_message}");
        } else {
            debug!(stage = self.stage, fac, "librdkafka: {log_message}");
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

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
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
        let mut assigned = self.assigned.lock().expect("not poisoned");
        assigned.push(partition);
        assigned.sort_unstable();
        info!(stage = self.stage, partition, "partition assigned");
        self.runtime.spawn(run_worker(
            Arc::clone(&self.factory),
            self.stage,
            partition,
            rx,
            self.commands.clone(),
            self.snapshot_interval,
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
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                warn!(stage = self.stage, error = %e, "commit on release failed; the next owner replays from the snapshot");
            }
        }
        info!(stage = self.stage, ?partitions, "partitions released");
    }
}

async fn run_worker<F: WorkerFactory>(
    factory: Arc<F>,
    stage: &'static str,
    partition: i32,
    mut rx: mpsc::Receiver<Input>,
    commands: std_mpsc::Sender<Command>,
    snapshot_interval: Duration,
    counters: Arc<StageCounters>,
) {
    let mut worker = factory.open(partition).await;
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + snapshot_interval,
        snapshot_interval,
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let input = tokio::select! {
            biased;
            input = rx.recv() => input,
            _ = ticker.tick() => {
                if let Some(offset) = worker.checkpoint().await {
                    let _ = commands.send(Command::Commit(partition, offset));
                }
                continue;
            }
        };
        match input {
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
                counters.batch_records.observe(records.len() as u64);
                worker.handle(records).await;
                match control {
                    Some(Input::Revoke(ack)) => {
                        let offset = worker.checkpoint().await;
                        worker.close().await;
                        let _ = ack.send(offset);
                        return;
                    }
                    Some(Input::Checkpoint(ack)) => {
                        checkpoint_now(&mut worker, partition, &commands, ack).await
                    }
                    _ => {}
                }
            }
            Some(Input::Checkpoint(ack)) => {
                checkpoint_now(&mut worker, partition, &commands, ack).await
            }
            Some(Input::Revoke(ack)) => {
                let offset = worker.checkpoint().await;
                worker.close().await;
                let _ = ack.send(offset);
                return;
            }
            None => {
                worker.close().await;
                debug!(stage, partition, "worker stopped");
                return;
            }
        }
    }
}

/// Snapshots now and has the offset committed, as the periodic snapshot does.
async fn checkpoint_now<W: PartitionWorker>(
    worker: &mut W,
    partition: i32,
    commands: &std_mpsc::Sender<Command>,
    ack: oneshot::Sender<Option<i64>>,
) {
    let offset = worker.checkpoint().await;
    if let Some(offset) = offset {
        let _ = commands.send(Command::Commit(partition, offset));
    }
    let _ = ack.send(offset);
}

/// The partition is not (or no longer) owned by this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the partition is not owned by this process")]
pub struct NotOwned;

/// A running stage consumer.
pub struct StageConsumer {
    stage: &'static str,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    commands: std_mpsc::Sender<Command>,
    assigned: Arc<Mutex<Vec<i32>>>,
    counters: Arc<StageCounters>,
    workers: Workers,
}

/// Consumer settings of a stage: the group, no auto-commit, start from the beginning when the
/// group has no offset yet.
pub struct StageOptions {
    pub stage: &'static str,
    pub group: String,
    pub topic: String,
    pub snapshot_interval: Duration,
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
        let counters = Arc::new(StageCounters::default());
        let workers: Workers = Arc::default();
        let context = StageContext {
            stage: options.stage,
            topic: options.topic.clone(),
            factory,
            runtime: tokio::runtime::Handle::current(),
            snapshot_interval: options.snapshot_interval,
            workers: Arc::clone(&workers),
            commands: commands.clone(),
            assigned: Arc::clone(&assigned),
            counters: Arc::clone(&counters),
        };
        let consumer: BaseConsumer<StageContext<F>> = client_config(config)
            .set("group.id", &options.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // Also the rebalance timeout: how long a join waits for members that vanished
            // (kill -9). The poll thread blocks at most while a worker waits for a store that
            // is down, which this must outlast.
            .set("max.poll.interval.ms", "45000")
            .set("fetch.wait.max.ms", "20")
            .create_with_context(context)?;
        consumer.subscribe(&[&options.topic])?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            let stage = options.stage;
            let topic = options.topic.clone();
            std::thread::Builder::new()
                .name(format!("poll-{stage}"))
                .spawn(move || poll_loop(consumer, &topic, &stop, &command_rx))
                .expect("spawn the poll thread")
        };
        info!(
            stage = options.stage,
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
            counters,
            workers,
        })
    }

    /// What the consumer counted.
    pub fn counters(&self) -> &Arc<StageCounters> {
        &self.counters
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

    /// Stops fetching a partition (its worker keeps what it has); for operations and tests.
    pub fn pause(&self, partition: i32) {
        let _ = self.commands.send(Command::Pause(partition));
    }

    /// Fetches a paused partition again.
    pub fn resume(&self, partition: i32) {
        let _ = self.commands.send(Command::Resume(partition));
    }

    /// Flushes, snapshots and commits every owned partition, leaves the group, and returns
    /// when done.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        info!(stage = self.stage, "stage consumer stopped");
    }
}

/// A member left without partitions while some partition has no live owner rejoins its group
/// after this long. It guards against a broker that hands a member an empty assignment and
/// never rebalances again (tansu 0.6 does when a member is killed while it leads the group:
/// the replacement's follower SyncGroup is accepted as the leader's).
const ORPHAN_REJOIN_AFTER: Duration = Duration::from_secs(25);
/// How often the watchdog asks the owner rows while it waits.
const ORPHAN_CHECK_EVERY: Duration = Duration::from_secs(5);

struct Watchdog {
    empty_since: Option<Instant>,
    last_check: Instant,
}

impl Watchdog {
    fn new() -> Self {
        Self {
            empty_since: None,
            last_check: Instant::now(),
        }
    }

    /// True when this member owned nothing for [`ORPHAN_REJOIN_AFTER`] and the owner rows
    /// show partitions nobody live owns.
    /// Looks at the assignment only every [`ORPHAN_CHECK_EVERY`]: the poll loop calls this
    /// once per record.
    fn should_rejoin<F: WorkerFactory>(&mut self, context: &StageContext<F>) -> bool {
        if self.last_check.elapsed() < ORPHAN_CHECK_EVERY {
            return false;
        }
        self.last_check = Instant::now();
        let empty = context.assigned.lock().expect("not poisoned").is_empty();
        if !empty {
            self.empty_since = None;
            return false;
        }
        let since = *self.empty_since.get_or_insert_with(Instant::now);
        if since.elapsed() < ORPHAN_REJOIN_AFTER {
            return false;
        }
        let factory = Arc::clone(&context.factory);
        let orphaned = context.runtime.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), factory.orphaned()).await
        });
        match orphaned {
            Ok(Ok(n)) if n > 0 => {
                self.empty_since = None;
                true
            }
            Ok(Ok(_)) => false,
            Ok(Err(e)) => {
                debug!(stage = context.stage, error = %e, "cannot read the owner rows");
                false
            }
            Err(_) => false,
        }
    }
}

fn poll_loop<F: WorkerFactory>(
    consumer: BaseConsumer<StageContext<F>>,
    topic: &str,
    stop: &AtomicBool,
    commands: &std_mpsc::Receiver<Command>,
) {
    let mut pending_commits: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_commit = Instant::now();
    let mut watchdog = Watchdog::new();
    while !stop.load(Ordering::Acquire) {
        if watchdog.should_rejoin(consumer.context()) {
            warn!(
                stage = consumer.context().stage,
                "no partitions while some have no live owner; rejoining the group"
            );
            consumer
                .context()
                .counters
                .rejoins
                .fetch_add(1, Ordering::Relaxed);
            consumer.unsubscribe();
            if let Err(e) = consumer.subscribe(&[topic]) {
                warn!(stage = consumer.context().stage, error = %e, "cannot subscribe again");
            }
        }
        while let Ok(command) = commands.try_recv() {
            let mut tpl = TopicPartitionList::new();
            match command {
                Command::Commit(p, offset) => {
                    pending_commits.insert(p, offset);
                }
                Command::Pause(p) => {
                    tpl.add_partition(topic, p);
                    if let Err(e) = consumer.pause(&tpl) {
                        warn!(partition = p, error = %e, "cannot pause");
                    }
                }
                Command::Resume(p) => {
                    tpl.add_partition(topic, p);
                    if let Err(e) = consumer.resume(&tpl) {
                        warn!(partition = p, error = %e, "cannot resume");
                    }
                }
            }
        }
        if !pending_commits.is_empty() && last_commit.elapsed() > Duration::from_millis(200) {
            let owned = consumer
                .context()
                .workers
                .lock()
                .expect("not poisoned")
                .keys()
                .copied()
                .collect::<Vec<_>>();
            let mut tpl = TopicPartitionList::new();
            for (&p, &offset) in &pending_commits {
                if owned.contains(&p) {
                    let _ = tpl.add_partition_offset(topic, p, Offset::Offset(offset));
                }
            }
            pending_commits.clear();
            last_commit = Instant::now();
            if tpl.count() > 0 {
                if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                    warn!(error = %e, "offset commit failed; a later one covers it");
                }
            }
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let partition = message.partition();
                let record = Record {
                    offset: message.offset(),
                    payload: message.payload().map(<[u8]>::to_vec),
                };
                let tx = consumer
                    .context()
                    .workers
                    .lock()
                    .expect("not poisoned")
                    .get(&partition)
                    .cloned();
                if let Some(tx) = tx {
                    let counters = &consumer.context().counters;
                    counters.records.fetch_add(1, Ordering::Relaxed);
                    match tx.try_send(Input::Record(record)) {
                        Err(mpsc::error::TrySendError::Full(input)) => {
                            // Waits while the worker is busy: backpressure reaches the broker.
                            let waited = Instant::now();
                            let _ = tx.blocking_send(input);
                            counters
                                .backpressure_us
                                .fetch_add(waited.elapsed().as_micros() as u64, Ordering::Relaxed);
                        }
                        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
            }
            Some(Err(e)) => warn!(error = %e, "poll error"),
            None => {}
        }
    }
    let owned: Vec<i32> = consumer
        .context()
        .workers
        .lock()
        .expect("not poisoned")
        .keys()
        .copied()
        .collect();
    consumer.context().release(&consumer, &owned);
    consumer.unsubscribe();
}
