//! Erasure in a running process (docs/design.md §6): [`Pipeline::forget`], which makes this process's actors, caches
//! and notification hub forget a person. The cluster-wide order (mark, every process forgets,
//! rows deleted) is [`crate::cluster::Cluster::erase_person`]'s.
//!
//! What the Kafka topics still hold of an erased person (until their retention deletes it) is
//! dropped where it is read: the zone stage drops its location copies, the person stage the
//! updates about it (as the person or the peer), the hub its notifications. A partition
//! restored from a snapshot taken before an erasure forgets the erased persons before it takes
//! records.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use rustc_hash::FxHashSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use udaconnect_actors::domain::PersonId;
use udaconnect_actors::messages::PersonSet;

use super::consumer::{Forgetter, NotOwned};
use super::erased::ErasedPersons;
use super::Pipeline;
use crate::store::erasure::{erased_persons, DeletedRows};

/// How often a process reads `erased_person` for erasures another process made (a process
/// that owns no partition is not told directly).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// What an erasure did across the cluster ([`crate::cluster::Cluster::erase_person`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Erasure {
    pub person: PersonId,
    /// Rows deleted (none for a forwarded request, which forgets live state only).
    pub rows: DeletedRows,
    /// Processes that forgot the person, this one included.
    pub processes: u32,
    /// Partitions (both stages) whose snapshots were stored again without it.
    pub partitions: u32,
    /// Notifications emptied from the resume buffers.
    pub notifications: u64,
}

/// What forgetting a person did in this process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalErasure {
    /// Partitions (both stages) whose actors forgot the person and whose snapshot was stored
    /// again without it, or held nothing of it.
    pub partitions: u32,
    /// Notifications removed from the hub's resume buffer.
    pub notifications: u64,
    /// Why some partitions could not forget it (to retry), one sentence each.
    pub failures: Vec<String>,
}

/// What forgets persons in this process: the erased set, the ingest cache, the hub, and both
/// stages' partitions. Shared by [`Pipeline::forget`] and the refresh from `erased_person`.
pub(super) struct Forgetting {
    pub erased: Arc<ErasedPersons>,
    pub ingestor: Arc<super::ingest::Ingestor>,
    pub hub: Arc<super::hub::NotificationHub>,
    pub stages: [(&'static str, Forgetter); 2],
    /// The persons every partition of this process has forgotten (those erased before it
    /// started, which its partitions forget at their restore, and those forgotten since). The
    /// erased set is not enough to tell: a partition's restore adds to it what it reads from
    /// `erased_person`, for its own partition only.
    pub applied: std::sync::Mutex<FxHashSet<PersonId>>,
}

impl Forgetting {
    /// Makes this process forget `persons`: from now on their reports are refused as those of
    /// unknown persons and whatever the topics still hold of them is dropped; every partition
    /// this process owns (both stages) forgets them (the zones their points, the persons their
    /// state and every episode with them as the peer), writes what it had queued, and stores
    /// a snapshot without them; the hub drops their notifications from the resume buffer.
    /// Partitions released meanwhile forget them at their next owner's restore.
    async fn forget(&self, persons: &[PersonId]) -> LocalErasure {
        self.erased.add(persons.iter().copied());
        for &p in persons {
            self.ingestor.forget_person(p);
        }
        let set: PersonSet = Arc::new(persons.iter().copied().collect());
        let mut done = LocalErasure {
            notifications: self.hub.forget(&set),
            ..LocalErasure::default()
        };
        for (stage, forgetter) in &self.stages {
            for (partition, answer) in forgetter.forget(&set).await {
                match answer {
                    Ok(Ok(_)) => done.partitions += 1,
                    Ok(Err(e)) => done
                        .failures
                        .push(format!("{stage} partition {partition}: {e}")),
                    // Released meanwhile: its next owner forgets at its restore.
                    Err(NotOwned) => {}
                }
            }
        }
        if done.failures.is_empty() {
            self.applied
                .lock()
                .expect("not poisoned")
                .extend(persons.iter().copied());
        }
        info!(
            ?persons,
            partitions = done.partitions,
            notifications = done.notifications,
            failures = done.failures.len(),
            "persons forgotten in this process"
        );
        done
    }

    /// Reads `erased_person` every [`REFRESH_INTERVAL`] until `stop`, and forgets the persons
    /// new to this process as [`Forgetting::forget`] does: erasures this process was not told
    /// of (it owned nothing then, or the erasing process could not reach it). Partitions that
    /// could not forget are asked again at the next read.
    pub(super) fn spawn_refresh(
        self: Arc<Self>,
        pool: Pool,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(REFRESH_INTERVAL) => {}
                }
                let all = match erased_persons(&pool).await {
                    Ok(all) => all,
                    Err(e) => {
                        warn!(error = %e, "cannot read erased_person; retrying");
                        continue;
                    }
                };
                let new: Vec<PersonId> = {
                    let applied = self.applied.lock().expect("not poisoned");
                    let mut new: Vec<PersonId> =
                        all.into_iter().filter(|p| !applied.contains(p)).collect();
                    new.sort_unstable();
                    new
                };
                if new.is_empty() {
                    continue;
                }
                let done = self.forget(&new).await;
                info!(
                    persons = new.len(),
                    partitions = done.partitions,
                    "erasures made elsewhere applied"
                );
                if !done.failures.is_empty() {
                    // Not applied: read again, and asked again, at the next refresh.
                    warn!(failures = ?done.failures, "some partitions did not forget erased persons; retrying");
                }
            }
        })
    }
}

impl Pipeline {
    /// Makes this process forget `person` ([`Forgetting::forget`]); the cluster's erasure asks
    /// every owning process for it.
    pub async fn forget(&self, person: PersonId) -> LocalErasure {
        self.forgetting.forget(&[person]).await
    }
}
