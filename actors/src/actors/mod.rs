//! The actor engine (ractor): two stages as in docs/design.md §2, each partition a supervisor with
//! one actor per zone or per person, bounded hand-off in front, outputs through ports.

pub mod in_process;
pub mod person;
pub mod ports;
mod supervision;
pub mod zone;

use std::sync::atomic::{AtomicU64, Ordering};
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
    Write(Vec<T>),
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
                        WriterMsg::Write(items) => pending.extend(items),
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
        items.is_empty() || self.queue.send(WriterMsg::Write(items)).await.is_ok()
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

    use super::*;

    #[tokio::test]
    async fn a_writer_stores_in_order_coalesces_what_queued_and_answers_barriers_after() {
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
        assert!(writer.write(vec![4]).await);
        let mut barrier = writer.stored_so_far().await;
        assert!(barrier.try_recv().is_err(), "nothing is stored yet");
        gate.add_permits(2);
        barrier.await.expect("answered");
        assert_eq!(*stored.lock().expect("lock"), vec![vec![1], vec![2, 3, 4]]);
    }
}
