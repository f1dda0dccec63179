//! Ports: how the actors reach the outside. The binary implements them with Kafka and
//! PostgreSQL; tests and benches implement them in memory.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::domain::Notification;
use crate::messages::{EpisodeChange, LateCopy, PersonBatch, SeenCopy};
use crate::zone_index::StoredCopy;

/// A port's failure; the actors retry until it succeeds (backpressure, never loss). It shows
/// as its cause when it has one ([`PortError::of`]), keeping the cause's own chain.
#[derive(Debug, Clone)]
pub struct PortError {
    message: String,
    cause: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

impl PortError {
    /// A failure described in words.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            cause: None,
        }
    }

    /// A failure caused by `cause` (a store or broker error), kept as the source.
    pub fn of(cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            message: cause.to_string(),
            cause: Some(std::sync::Arc::new(cause)),
        }
    }
}

impl std::fmt::Display for PortError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PortError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().and_then(|c| c.source())
    }
}

impl PartialEq for PortError {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message
    }
}

/// Where the zone stage keeps the copies its zones saw: home events in the `location` table
/// (idempotent on event id), ghost copies beside them, each with the input offset that
/// brought it, so that a late copy can be matched against everything its zone saw before it.
pub trait LocationSink: Send + Sync + 'static {
    /// Stores a run of copies of zone partition `partition`, in input order.
    fn store<'a>(
        &'a self,
        partition: u32,
        copies: &'a [SeenCopy],
    ) -> BoxFuture<'a, Result<(), PortError>>;

    /// For each late copy, the stored copies of its zone with an input offset below `before`
    /// in its `near_cells`, whose time is within `window_s` of its own and whose place is
    /// within `radius_m` (a store may add a margin: the caller decides with the engine's own
    /// distance), of other persons, and its own earlier copy if it is a repeat. One list per
    /// late copy, in order, each in input order (an event sent twice may appear twice: the zone
    /// index counts it once, as its first copy).
    fn late_partners<'a>(
        &'a self,
        partition: u32,
        late: &'a [LateCopy],
        before: i64,
    ) -> BoxFuture<'a, Result<Vec<Vec<StoredCopy>>, PortError>>;
}

/// Where the zone stage sends per-person updates (the `person-updates` topic).
pub trait PersonUpdateSink: Send + Sync + 'static {
    /// Sends each batch to its person partition, in order. The batches are shared, so a sink
    /// in the same process hands them on without copying their updates, and a retry sends
    /// the same ones.
    fn publish<'a>(
        &'a self,
        batches: &'a [(u32, Arc<PersonBatch>)],
    ) -> BoxFuture<'a, Result<(), PortError>>;
}

/// Where the person stage stores episode changes and sends notifications (the `connection`
/// table and the `connections` topic).
pub trait ConnectionSink: Send + Sync + 'static {
    /// Applies episode changes of person partition `partition`, in order, atomically.
    fn store<'a>(
        &'a self,
        partition: u32,
        changes: &'a [EpisodeChange],
    ) -> BoxFuture<'a, Result<(), PortError>>;
    /// Publishes notifications of person partition `partition`, in order.
    fn publish<'a>(
        &'a self,
        partition: u32,
        notifications: &'a [Notification],
    ) -> BoxFuture<'a, Result<(), PortError>>;
}

/// Which stage a snapshot belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// A partition's serialized state and the next input offset it covers: the partition-wide
/// state (`bytes`) and parts by key (a person's state by person id; a zone partition's points
/// of one snapshot slice by slice number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotBlob {
    pub next_offset: u64,
    pub format: u32,
    pub bytes: Vec<u8>,
    /// Parts by key; `None` for one that no longer exists (a person gone, a slice emptied).
    pub parts: Vec<(i64, Option<Vec<u8>>)>,
    /// Whether `parts` holds every actor of the partition (stored parts not among them are
    /// dropped); otherwise it holds only the actors that changed since the previous snapshot,
    /// whose stored parts stay valid for the others.
    pub complete: bool,
}

impl SnapshotBlob {
    /// Bytes of the serialized state: the partition-wide state and every part.
    pub fn serialized_len(&self) -> usize {
        self.bytes.len()
            + self
                .parts
                .iter()
                .map(|(_, p)| p.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }

    /// The parts' states, for a restore (which always reads a complete set).
    pub fn part_states(&self) -> impl Iterator<Item = (i64, &[u8])> {
        self.parts
            .iter()
            .filter_map(|(key, bytes)| bytes.as_deref().map(|b| (*key, b)))
    }
}

/// A snapshot whose state was captured when its supervisor answered, finished in the
/// background (serialized on a blocking thread, after whatever it depends on is durable) so
/// that the supervisor goes on with the next batches meanwhile.
pub struct PendingSnapshot(pub BoxFuture<'static, Result<SnapshotBlob, PortError>>);

/// What a supervisor captured for a snapshot, before serialization.
pub struct CapturedSnapshot<H, P> {
    /// The partition-wide state.
    pub header: H,
    /// Parts by key (see [`SnapshotBlob::parts`]).
    pub parts: Vec<(i64, Option<P>)>,
    pub complete: bool,
    pub next_offset: u64,
    pub format: u32,
}

impl PendingSnapshot {
    /// Serializes `captured` (postcard) off the async threads once `durable` (if any)
    /// resolves.
    pub fn serialize<H, P>(
        captured: CapturedSnapshot<H, P>,
        durable: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> Self
    where
        H: Serialize + Send + 'static,
        P: Serialize + Send + 'static,
    {
        Self(Box::pin(async move {
            if let Some(durable) = durable {
                durable
                    .await
                    .map_err(|_| PortError::new("the writes the snapshot covers were abandoned"))?;
            }
            let serialize = move || -> Result<SnapshotBlob, postcard::Error> {
                let mut parts = Vec::with_capacity(captured.parts.len());
                for (key, part) in &captured.parts {
                    parts.push((*key, part.as_ref().map(postcard::to_stdvec).transpose()?));
                }
                Ok(SnapshotBlob {
                    next_offset: captured.next_offset,
                    format: captured.format,
                    bytes: postcard::to_stdvec(&captured.header)?,
                    parts,
                    complete: captured.complete,
                })
            };
            tokio::task::spawn_blocking(serialize)
                .await
                .map_err(|e| PortError::new(format!("serializing the snapshot panicked: {e}")))?
                .map_err(|e| PortError::new(format!("cannot serialize the snapshot: {e}")))
        }))
    }

    /// Waits for the finished snapshot.
    pub async fn wait(self) -> Result<SnapshotBlob, PortError> {
        self.0.await
    }
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
