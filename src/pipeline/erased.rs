//! The persons erased in the cluster as far as this process knows (docs/design.md §6): the set
//! the stages, the hub and ingest consult to drop what the Kafka topics still hold of them.
//! How a process forgets them is [`crate::pipeline::erasure`]'s.

use std::sync::{Arc, RwLock};

use deadpool_postgres::Pool;
use rustc_hash::FxHashSet;
use udaconnect_actors::domain::PersonId;
use udaconnect_actors::messages::PersonSet;

use crate::store::erasure::erased_persons;
use crate::store::StoreError;

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

    /// Adds `persons` (the set is copied only when one of them is new).
    pub fn add(&self, persons: impl IntoIterator<Item = PersonId>) {
        let mut set = self.set.write().expect("not poisoned");
        let new: Vec<PersonId> = persons.into_iter().filter(|p| !set.contains(p)).collect();
        if !new.is_empty() {
            let mut grown: FxHashSet<PersonId> = (**set).clone();
            grown.extend(new);
            *set = Arc::new(grown);
        }
    }

    /// Reads `erased_person` and adds what it holds. Errors: PostgreSQL's (the set is left
    /// as it was).
    pub async fn refresh(&self, pool: &Pool) -> Result<(), StoreError> {
        self.add(erased_persons(pool).await?);
        Ok(())
    }
}
