//! Ports: how the actors reach the outside. The binary implements them with Kafka and
//! PostgreSQL; tests and benches implement them in memory.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::domain::Notification;
use crate::messages::{EpisodeChange, PersonBatch, RoutedEvent};

/// A port's failure; the actors retry until it succeeds (backpressure, never loss).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PortError(pub String);

/// Where the zone stage stores home events (the `location` table; idempotent on event id).
pub trait LocationSink: Send + Sync + 'static {
    /// Stores a batch of home events (home copies, with their zone) of zone partition
    /// `partition`.
    fn store<'a>(
        &'a self,
        partition: u32,
        events: &'a [RoutedEvent],
    ) -> BoxFuture<'a, Result<(), PortError>>;
}

/// Where the zone stage sends per-person updates (the `person-updates` topic).
pub trait PersonUpdateSink: Send + Sync + 'static {
    /// Sends each batch to its person partition, in order.
    fn publish(&self, batches: Vec<(u32, PersonBatch)>) -> BoxFuture<'_, Result<(), PortError>>;
}

/// Where the person stage applies episode changes and sends notifications (the `connection`
/// table and the `connections` topic).
pub trait ConnectionSink: Send + Sync + 'static {
    /// Applies changes, then publishes notifications, of person partition `partition`.
    fn apply<'a>(
        &'a self,
        partition: u32,
        changes: &'a [EpisodeChange],
        notifications: &'a [Notification],
    ) -> BoxFuture<'a, Result<(), PortError>>;
}

/// Which stage a snapshot belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stage {
    Zones,
    Persons,
}

impl Stage {
    /// The name stored in `shard_snapshot.stage`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Zones => "zones",
            Self::Persons => "persons",
        }
    }
}

/// A partition's serialized actor state and the next input offset it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotBlob {
    pub next_offset: u64,
    pub format: u32,
    pub bytes: Vec<u8>,
}

/// Where partition snapshots are kept (the `shard_snapshot` table).
pub trait SnapshotStore: Send + Sync + 'static {
    /// Stores (replaces) the snapshot of one stage's partition.
    fn store(
        &self,
        stage: Stage,
        partition: u32,
        snapshot: SnapshotBlob,
    ) -> BoxFuture<'_, Result<(), PortError>>;
    /// Loads it, if there is one.
    fn load(
        &self,
        stage: Stage,
        partition: u32,
    ) -> BoxFuture<'_, Result<Option<SnapshotBlob>, PortError>>;
}

/// Runs `op` until it succeeds, backing off up to a second; returns how many retries it took.
pub async fn retry<T, E, F, Fut>(what: &'static str, partition: u32, mut op: F) -> (T, u64)
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = std::time::Duration::from_millis(10);
    let mut retries = 0;
    loop {
        match op().await {
            Ok(v) => return (v, retries),
            Err(e) => {
                retries += 1;
                tracing::warn!(partition, error = %e, retries, "{what} failed, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}
