//! Erasure in a running process (docs/design.md §6): the set of erased persons every part of
//! the pipeline consults, and [`Pipeline::forget`], which makes this process's actors, caches
//! and notification hub forget a person. The cluster-wide order (mark, every process forgets,
//! rows deleted) is [`crate::cluster::Cluster::erase_person`]'s.
//!
//! What the Kafka topics still hold of an erased person (until their retention deletes it) is
//! dropped where it is read: the zone stage drops its location copies, the person stage the
//! updates about it (as the person or the peer), the hub its notifications. A partition
//! restored from a snapshot taken before an erasure forgets the erased persons before it takes
//! records.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use rustc_hash::FxHashSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use udaconnect_actors::domain::PersonId;
use udaconnect_actors::messages::PersonSet;

use super::consumer::NotOwned;
use super::Pipeline;
use crate::store::erasure::erased_persons;
use crate::store::StoreError;

/// How often a process reads `erased_person` for erasures another process made (a process
/// that owns no partition is not told directly).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// The persons erased in the cluster as far as this process knows: those it was told of and
/// those it read from `erased_person`. Only grows.
#[derive(Debug, Default)]
pub struct ErasedPersons {
    set: RwLock<PersonSet>,
}

impl ErasedPersons {
    /// The set now (a cheap copy of a shared set: take it once per batch).
    pub fn current(&self) -> PersonSet {
        Arc::clone(&self.set.read().expect("not poisoned"))
    }

    /// Adds `persons`; returns those that were not in the set yet.
    pub fn add(&self, persons: impl IntoIterator<Item = PersonId>) -> Vec<PersonId> {
        let mut set = self.set.write().expect("not poisoned");
        let new: Vec<PersonId> = persons.into_iter().filter(|p| !set.contains(p)).collect();
        if !new.is_empty() {
            let mut grown: FxHashSet<PersonId> = (**set).clone();
            grown.extend(new.iter().copied());
            *set = Arc::new(grown);
        }
        new
    }

    /// Reads `erased_person` and adds what it holds; returns the persons new to this process.
    /// Errors: PostgreSQL's (the set is left as it was).
    pub async fn refresh(&self, pool: &Pool) -> Result<Vec<PersonId>, StoreError> {
        Ok(self.add(erased_persons(pool).await?))
    }
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

impl Pipeline {
    /// The persons erased as far as this process knows.
    pub fn erased(&self) -> &Arc<ErasedPersons> {
        &self.erased
    }

    /// Makes this process forget `person`: from now on its reports are refused as those of an
    /// unknown person and whatever the topics still hold of it is dropped; every partition this
    /// process owns (both stages) forgets it (the zones its points, the persons its state and
    /// every episode with it as the peer), writes what it had queued, and stores a snapshot
    /// without it; the hub drops its notifications from the resume buffer. Partitions released
    /// meanwhile forget it at their next owner's restore.
    pub async fn forget(&self, person: PersonId) -> LocalErasure {
        self.erased.add([person]);
        self.ingestor.forget_person(person);
        let persons: PersonSet = Arc::new(std::iter::once(person).collect());
        let mut done = LocalErasure {
            notifications: self.hub.forget(&persons),
            ..LocalErasure::default()
        };
        for (stage, consumer) in [("zones", &self.zones), ("persons", &self.persons)] {
            let Some(consumer) = consumer.lock().await.as_ref().map(|c| c.forgetter()) else {
                continue;
            };
            for (partition, answer) in consumer.forget(&persons).await {
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
        info!(
            person,
            partitions = done.partitions,
            notifications = done.notifications,
            failures = done.failures.len(),
            "person forgotten in this process"
        );
        done
    }

    /// Reads `erased_person` every [`REFRESH_INTERVAL`] until `stop`; a person new to this
    /// process is dropped from its caches and hub (its partitions, if it owns the person's,
    /// were told by the erasing process).
    pub(super) fn spawn_erasure_refresh(
        erased: Arc<ErasedPersons>,
        pool: Pool,
        hub: Arc<super::hub::NotificationHub>,
        ingestor: Arc<super::ingest::Ingestor>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(REFRESH_INTERVAL) => {}
                }
                match erased.refresh(&pool).await {
                    Ok(new) if !new.is_empty() => {
                        for &p in &new {
                            ingestor.forget_person(p);
                        }
                        let purged = hub.forget(&Arc::new(new.iter().copied().collect()));
                        info!(
                            persons = new.len(),
                            purged, "erasures made elsewhere applied"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "cannot read erased_person; retrying"),
                }
            }
        })
    }
}
