//! Erasure of a person's rows (`DELETE /v1/persons/{id}`, docs/design.md §6): the mark in
//! `erased_person` that makes every process drop what the Kafka topics still hold of the
//! person, and the deletion of its `person`, `location`, `halo_copy` and `connection` rows
//! (both sides of each episode) in one transaction. The actors' state is the pipeline's
//! ([`crate::pipeline::Pipeline::forget`]); the order of the whole is [`crate::cluster`]'s.

use deadpool_postgres::Pool;
use rustc_hash::FxHashSet;
use udaconnect_actors::domain::PersonId;

use crate::store::StoreError;

/// Whether a person can be erased: it exists, or it was marked erased before (an erasure that
/// did not finish, done again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Marked now; the person existed.
    Marked,
    /// Marked by an earlier erasure (its rows may be gone already).
    MarkedBefore,
    /// No such person, and none was erased under this id.
    NoSuchPerson,
}

/// Marks `person` erased when it exists (or was marked before). Errors: PostgreSQL's.
pub async fn mark(pool: &Pool, person: PersonId) -> Result<Mark, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "WITH marked AS (
                 INSERT INTO erased_person (person_id)
                 SELECT id FROM person WHERE id = $1
                 ON CONFLICT (person_id) DO NOTHING
                 RETURNING person_id)
             SELECT EXISTS (SELECT 1 FROM marked),
                    EXISTS (SELECT 1 FROM erased_person WHERE person_id = $1)",
            &[&person],
        )
        .await?;
    Ok(match (row.get::<_, bool>(0), row.get::<_, bool>(1)) {
        (true, _) => Mark::Marked,
        (false, true) => Mark::MarkedBefore,
        (false, false) => Mark::NoSuchPerson,
    })
}

/// Every person marked erased. Errors: PostgreSQL's.
pub async fn erased_persons(pool: &Pool) -> Result<FxHashSet<PersonId>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query("SELECT person_id FROM erased_person", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The rows one erasure deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeletedRows {
    /// The person's reports (`location`).
    pub locations: u64,
    /// Their ghost copies (`halo_copy`).
    pub halo_copies: u64,
    /// Episode rows of either side (`connection`: the person's and its peers' about it).
    pub connections: u64,
    /// Whether the `person` row was deleted (false when an earlier erasure had).
    pub person: bool,
}

/// Deletes every row of `person`, in one transaction. Call it once every process has
/// forgotten the person (no writer holds a row of it any more). Errors: PostgreSQL's; nothing
/// is deleted then.
pub async fn delete_rows(pool: &Pool, person: PersonId) -> Result<DeletedRows, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let connections = tx
        .execute(
            "DELETE FROM connection WHERE person_id = $1 OR peer_id = $1",
            &[&person],
        )
        .await?;
    let halo_copies = tx
        .execute("DELETE FROM halo_copy WHERE person_id = $1", &[&person])
        .await?;
    let locations = tx
        .execute("DELETE FROM location WHERE person_id = $1", &[&person])
        .await?;
    let person = tx
        .execute("DELETE FROM person WHERE id = $1", &[&person])
        .await?
        > 0;
    tx.commit().await?;
    Ok(DeletedRows {
        locations,
        halo_copies,
        connections,
        person,
    })
}
