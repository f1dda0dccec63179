//! The actor engine (ractor): two stages as in DESIGN §2, each partition a supervisor with
//! one actor per zone or per person, bounded hand-off in front, outputs through ports.

pub mod engine;
pub mod person;
pub mod ports;
pub mod zone;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ractor::{ActorRef, Message};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
