//! Local lookups of live actor state, and snapshots on demand: what the admin API and the
//! cluster forwarding ask of the partitions this process owns.

use std::time::Duration;

use ractor::rpc::CallResult;
use udaconnect_actors::actors::person::{PersonSupervisorMsg, PersonView};
use udaconnect_actors::actors::ports::Stage;
use udaconnect_actors::actors::zone::{ZonePartitionView, ZoneSupervisorMsg, ZoneView};
use udaconnect_actors::domain::PersonId;
use udaconnect_actors::zones::{person_partition, zone_partition, ZoneId};

use super::consumer::NotOwned;
use super::stages::Owned;
use super::Pipeline;
use crate::config::Topics;

/// How long a supervisor may take to answer a view request.
const VIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot on demand may take (a big partition's included).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a local lookup has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    /// Another process owns the partition (or nobody does right now).
    #[error("partition {partition} of the {} stage is not owned by this process", stage.as_str())]
    NotOwned { stage: Stage, partition: i32 },
    /// The partition's supervisor did not answer in time (or stopped meanwhile).
    #[error("partition {partition} of the {} stage did not answer: {reason}", stage.as_str())]
    NoAnswer {
        stage: Stage,
        partition: i32,
        reason: String,
    },
}

impl Pipeline {
    /// This process's name (`shard_owner.owner`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The topic names this pipeline reads and writes.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Partitions of a stage's input topic.
    pub fn partitions(&self, stage: Stage) -> u32 {
        match stage {
            Stage::Zones => self.zone_partitions,
            Stage::Persons => self.person_partitions,
        }
    }

    /// The topic a stage reads.
    pub fn stage_topic(&self, stage: Stage) -> &str {
        match stage {
            Stage::Zones => &self.topics.locations,
            Stage::Persons => &self.topics.person_updates,
        }
    }

    /// The zone partition that holds `zone`'s actor (the ingest side's routing).
    pub fn zone_partition_of(&self, zone: ZoneId) -> i32 {
        zone_partition(zone, self.zone_partitions) as i32
    }

    /// The person partition that holds `person`'s actor (the zone stage's routing).
    pub fn person_partition_of(&self, person: PersonId) -> i32 {
        person_partition(person, self.person_partitions) as i32
    }

    /// The partitions of `stage` this process owns now.
    pub fn owned_partitions(&self, stage: Stage) -> Vec<i32> {
        match stage {
            Stage::Zones => self
                .zone_owned
                .lock()
                .expect("not poisoned")
                .keys()
                .copied()
                .collect(),
            Stage::Persons => self
                .person_owned
                .lock()
                .expect("not poisoned")
                .keys()
                .copied()
                .collect(),
        }
    }

    /// The person's actor state, when this process owns its partition; `Ok(None)` when the
    /// partition has no state for the person.
    pub async fn person_view(&self, person: PersonId) -> Result<Option<PersonView>, LocalError> {
        let partition = self.person_partition_of(person);
        ask(&self.person_owned, Stage::Persons, partition, |reply| {
            PersonSupervisorMsg::Person { person, reply }
        })
        .await
    }

    /// The zone's actor state with at most `limit` points, when this process owns its
    /// partition; `Ok(None)` when the partition has no actor for the zone.
    pub async fn zone_view(
        &self,
        zone: ZoneId,
        limit: usize,
    ) -> Result<Option<ZoneView>, LocalError> {
        let partition = self.zone_partition_of(zone);
        ask(&self.zone_owned, Stage::Zones, partition, |reply| {
            ZoneSupervisorMsg::ZoneView { zone, limit, reply }
        })
        .await
    }

    /// The view of a zone partition this process owns (its zones, watermark, offsets).
    pub async fn zone_partition_view(
        &self,
        partition: i32,
    ) -> Result<ZonePartitionView, LocalError> {
        ask(
            &self.zone_owned,
            Stage::Zones,
            partition,
            ZoneSupervisorMsg::View,
        )
        .await
    }

    /// Snapshots a partition this process owns now, through the same step as the periodic
    /// snapshot, and commits its offset; the offset of the new snapshot, `None` when nothing
    /// changed since the last one.
    pub async fn snapshot_now(
        &self,
        stage: Stage,
        partition: i32,
    ) -> Result<Option<i64>, LocalError> {
        let not_owned = |_: NotOwned| LocalError::NotOwned { stage, partition };
        let consumer = self.stage(stage).lock().await;
        let consumer = consumer
            .as_ref()
            .ok_or(LocalError::NotOwned { stage, partition })?;
        // A partition held up by backpressure (PostgreSQL away) answers when it can; bounded.
        match tokio::time::timeout(SNAPSHOT_TIMEOUT, consumer.checkpoint(partition)).await {
            Ok(result) => result.map_err(not_owned),
            Err(_) => Err(LocalError::NoAnswer {
                stage,
                partition,
                reason: format!("no snapshot within {SNAPSHOT_TIMEOUT:?}"),
            }),
        }
    }
}

/// Asks the supervisor of a partition this process owns; NOT_OWNED when it does not own it.
async fn ask<M: ractor::Message, T: Send + 'static>(
    owned: &Owned<M>,
    stage: Stage,
    partition: i32,
    message: impl FnOnce(ractor::RpcReplyPort<T>) -> M,
) -> Result<T, LocalError> {
    let actor = owned
        .lock()
        .expect("not poisoned")
        .get(&partition)
        .cloned()
        .ok_or(LocalError::NotOwned { stage, partition })?;
    let reply = actor.call(message, Some(VIEW_TIMEOUT)).await;
    success(reply, stage, partition)
}

fn success<T>(
    reply: Result<CallResult<T>, ractor::MessagingErr<impl Sized>>,
    stage: Stage,
    partition: i32,
) -> Result<T, LocalError> {
    let reason = match reply {
        Ok(CallResult::Success(v)) => return Ok(v),
        Ok(CallResult::Timeout) => "timed out".to_owned(),
        Ok(CallResult::SenderError) => "the supervisor stopped".to_owned(),
        Err(e) => e.to_string(),
    };
    Err(LocalError::NoAnswer {
        stage,
        partition,
        reason,
    })
}
