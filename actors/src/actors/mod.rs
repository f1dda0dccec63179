//! The actor engine (ractor): two stages as in docs/design.md §2, each partition a supervisor with
//! one actor per zone or per person, bounded hand-off in front, outputs through ports.

pub mod in_process;
pub mod person;
pub mod ports;
mod supervision;
pub mod zone;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ractor::{ActorRef, Message};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A partition's writer task: stores what its supervisor hands it in order, everything queued
/// at a time in one write (up to `max_per_write` items), retrying each write until the store
/// takes it. The queue is bounded, so a store that is slow or away makes the supervisor wait
/// (backpressure, never loss); [`Writer::stored_so_far`] tells when what was handed over is
/// durable (a snapshot waits for it).
pub struct Writer<T> {
    queue: tokio::sync::mpsc::Sender<WriterMsg<T>>,
    retries: Arc<AtomicU64>,
}

enum WriterMsg<T> {
    /// Items to store, in order, as parts (each non-empty).
    Write(Vec<Vec<T>>),
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// How a [`Writer`] stores a run of items.
pub type StoreFn<T> = Box<
    dyn for<'a> Fn(&'a [T]) -> futures::future::BoxFuture<'a, Result<(), ports::PortError>>
        + Send
        + Sync,
>;

impl<T: Send + Sync + 'static> Writer<T> {
    /// Starts the task of partition `partition`; `what` names the writes in logs.
    pub fn spawn(
        partition: u32,
        what: &'static str,
        capacity: usize,
        max_per_write: usize,
        store: StoreFn<T>,
    ) -> Self {
        let (queue, mut rx) = tokio::sync::mpsc::channel::<WriterMsg<T>>(capacity.max(1));
        let retries = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&retries);
        tokio::spawn(async move {
            let mut pending: Vec<T> = Vec::new();
            let mut barriers = Vec::new();
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                while let Some(msg) = next.take() {
                    match msg {
                        WriterMsg::Write(parts) => {
                            // Exactly: the list keeps its room for the next writes, and
                            // grown by doubling part by part it kept up to twice what a
                            // write needs (63 bytes per person in memory-probe).
                            pending.reserve_exact(parts.iter().map(Vec::len).sum());
                            parts.into_iter().for_each(|p| pending.extend(p));
                        }
                        WriterMsg::Barrier(done) => barriers.push(done),
                    }
                    if pending.len() < max_per_write {
                        next = rx.try_recv().ok();
                    }
                }
                if !pending.is_empty() {
                    let ((), n) = ports::retry(what, partition, || store(&pending)).await;
                    counted.fetch_add(n, Ordering::Relaxed);
                    pending.clear();
                }
                for done in barriers.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        Self { queue, retries }
    }

    /// Hands `items` over, waiting for room in the queue; `false` when the task is gone.
    pub async fn write(&self, items: Vec<T>) -> bool {
        self.write_parts(vec![items]).await
    }

    /// Hands `parts` over, stored as one list in their order (the writer copies each into
    /// the list it keeps for its writes, so they are never joined first); waits for room in
    /// the queue; `false` when the task is gone.
    pub async fn write_parts(&self, mut parts: Vec<Vec<T>>) -> bool {
        parts.retain(|p| !p.is_empty());
        parts.is_empty() || self.queue.send(WriterMsg::Write(parts)).await.is_ok()
    }

    /// Resolves once everything handed over so far is stored.
    pub async fn stored_so_far(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (done, stored) = tokio::sync::oneshot::channel();
        let _ = self.queue.send(WriterMsg::Barrier(done)).await;
        stored
    }

    /// How many writes had to be tried again (the store away).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

/// The answers of many actors to one request each (the persons of a batch), gathered in one
/// place: each actor fills its own slot through its [`Answer`], and the last one to answer
/// wakes the caller once. ractor's `call` made a reply channel, a timer and a task of the
/// caller's join per actor, a tenth of the person stage's time in engine-bench's profile
/// (docs/benchmarks.md, "Proximity engine").
pub struct Answers<T> {
    board: Arc<Board<T>>,
    /// Slots handed out so far ([`Answers::answer`]).
    handed: usize,
}

struct Board<T> {
    slots: std::sync::Mutex<Vec<Option<T>>>,
    /// Slots whose [`Answer`] was neither sent nor dropped yet.
    waiting: AtomicUsize,
    /// How many slots the board has.
    waiting_at_start: usize,
    done: tokio::sync::Notify,
}

/// One actor's slot of [`Answers`]: [`Answer::send`] fills it; dropped unsent (the actor
/// failed, or the message never reached it), the slot stays empty and counts as answered.
pub struct Answer<T> {
    board: Arc<Board<T>>,
    slot: usize,
}

impl<T> Answers<T> {
    /// Room for `slots` answers; [`Answers::answer`] must be taken for each slot, or
    /// [`Answers::gather`] waits for its whole timeout.
    pub fn new(slots: usize) -> Self {
        Self {
            handed: 0,
            board: Arc::new(Board {
                slots: std::sync::Mutex::new((0..slots).map(|_| None).collect()),
                waiting: AtomicUsize::new(slots),
                waiting_at_start: slots,
                done: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The handle of the next slot, in order: the first call's fills slot 0. Panics when
    /// every slot was handed out already (a slot answered twice, or one past the end, would
    /// let [`Answers::gather`] return before the others answered).
    pub fn answer(&mut self) -> Answer<T> {
        let slot = self.handed;
        assert!(
            slot < self.board.waiting_at_start,
            "all {slot} slots of the board were handed out already"
        );
        self.handed += 1;
        Answer {
            board: Arc::clone(&self.board),
            slot,
        }
    }

    /// Waits until every slot is answered or dropped, or `timeout` passes, and returns the
    /// slots in order: `None` for an actor that did not answer (failed, or too late).
    pub async fn gather(self, timeout: std::time::Duration) -> Vec<Option<T>> {
        if self.board.waiting.load(Ordering::Acquire) > 0 {
            // The last answer stores a permit when nobody waits yet: no wake-up is lost.
            let _ = tokio::time::timeout(timeout, self.board.done.notified()).await;
        }
        let mut slots = self.board.slots.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *slots)
    }
}

impl<T> Answer<T> {
    /// Fills the slot with `value`.
    pub fn send(self, value: T) {
        let mut slots = self.board.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Empty once the caller gathered (it stopped waiting): the answer is too late.
        if let Some(slot) = slots.get_mut(self.slot) {
            *slot = Some(value);
        }
    }
}

impl<T> Drop for Answer<T> {
    fn drop(&mut self) {
        if self.board.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.board.done.notify_one();
        }
    }
}

/// Panics and restarts of a supervisor's children.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisionCounters {
    pub panics: u64,
    pub restarts: u64,
    /// Batches whose effects an actor failure may have cut short (the partition must replay
    /// from its last snapshot to be exact again).
    pub lost_batches: u64,
}

/// The bounded hand-off in front of a supervisor: at most `capacity` batches in flight; time
/// spent waiting for room is counted (backpressure).
pub struct PartitionHandle<M: Message> {
    actor: ActorRef<M>,
    permits: Arc<Semaphore>,
    blocked_ns: AtomicU64,
}

impl<M: Message> PartitionHandle<M> {
    /// A handle allowing `capacity` batches in flight.
    pub fn new(actor: ActorRef<M>, capacity: usize) -> Self {
        Self {
            actor,
            permits: Arc::new(Semaphore::new(capacity.max(1))),
            blocked_ns: AtomicU64::new(0),
        }
    }

    /// Sends the message `build` makes from a permit, waiting for room first.
    pub async fn send(
        &self,
        build: impl FnOnce(OwnedSemaphorePermit) -> M,
    ) -> Result<(), ractor::MessagingErr<M>> {
        let started = Instant::now();
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.blocked_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.actor.cast(build(permit))
    }

    /// Nanoseconds spent waiting for room so far.
    pub fn blocked_ns(&self) -> u64 {
        self.blocked_ns.load(Ordering::Relaxed)
    }

    /// The supervisor behind the handle.
    pub fn actor(&self) -> &ActorRef<M> {
        &self.actor
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_come_back_in_slot_order_whoever_answers_first_and_a_dropped_one_is_empty() {
        let mut answers: Answers<u32> = Answers::new(4);
        let handles: Vec<Answer<u32>> = (0..4).map(|_| answers.answer()).collect();
        let mut handles = handles.into_iter();
        let (a0, a1, a2, a3) = (
            handles.next().expect("0"),
            handles.next().expect("1"),
            handles.next().expect("2"),
            handles.next().expect("3"),
        );
        // Answered from other tasks, the last slot first; slot 1's actor fails (its answer is
        // dropped unsent).
        let tasks = [
            tokio::spawn(async move { a3.send(30) }),
            tokio::spawn(async move { drop(a1) }),
            tokio::spawn(async move { a0.send(0) }),
            tokio::spawn(async move { a2.send(20) }),
        ];
        // The caller is woken by the last answer, long before its own timeout.
        let got = tokio::time::timeout(
            Duration::from_secs(60),
            answers.gather(Duration::from_secs(3_600)),
        )
        .await
        .expect("woken by the last answer, not by the timeout");
        assert_eq!(got, vec![Some(0), None, Some(20), Some(30)]);
        for t in tasks {
            t.await.expect("answered");
        }
        // Nobody to ask: nothing to wait for.
        let none: Answers<u32> = Answers::new(0);
        assert!(none.gather(Duration::from_secs(3_600)).await.is_empty());
    }

    #[tokio::test]
    async fn an_answer_that_never_comes_leaves_its_slot_empty_after_the_timeout() {
        let mut answers: Answers<&str> = Answers::new(2);
        answers.answer().send("on time");
        let late = answers.answer();
        let got = answers.gather(Duration::from_millis(20)).await;
        assert_eq!(got, vec![Some("on time"), None]);
        // Answering after the caller gave up is harmless.
        late.send("too late");
    }

    #[test]
    #[should_panic(expected = "handed out already")]
    fn a_board_hands_out_each_slot_once() {
        let mut answers: Answers<u32> = Answers::new(1);
        let _first = answers.answer();
        let _one_too_many = answers.answer();
    }

    #[tokio::test]
    async fn a_writer_stores_in_order_coalesces_what_queued_parts_included_and_answers_barriers_after(
    ) {
        // The store blocks until the test lets it go, so that batches queue up behind it.
        let stored: Arc<Mutex<Vec<Vec<u32>>>> = Arc::default();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let writer = {
            let (stored, gate) = (Arc::clone(&stored), Arc::clone(&gate));
            Writer::spawn(
                0,
                "test writes",
                8,
                100,
                Box::new(move |items: &[u32]| {
                    let (stored, gate) = (Arc::clone(&stored), Arc::clone(&gate));
                    let items = items.to_vec();
                    Box::pin(async move {
                        gate.acquire().await.expect("open").forget();
                        stored.lock().expect("lock").push(items);
                        Ok(())
                    })
                }),
            )
        };
        assert!(writer.write(vec![1]).await);
        // While the first write waits, three more batches and a barrier queue up.
        tokio::task::yield_now().await;
        assert!(writer.write(vec![2, 3]).await);
        assert!(writer.write(vec![]).await);
        // Parts are stored as one list, in order; empty ones are nothing to write.
        assert!(writer.write_parts(vec![vec![4], vec![], vec![5, 6]]).await);
        assert!(writer.write_parts(vec![vec![], vec![]]).await);
        let mut barrier = writer.stored_so_far().await;
        assert!(barrier.try_recv().is_err(), "nothing is stored yet");
        gate.add_permits(2);
        barrier.await.expect("answered");
        assert_eq!(
            *stored.lock().expect("lock"),
            vec![vec![1], vec![2, 3, 4, 5, 6]]
        );
    }
}
