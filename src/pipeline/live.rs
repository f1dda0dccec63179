//! Local lookups of live actor state, and snapshots on demand: what the admin API and the
//! cluster forwarding ask of the partitions this process owns.

use std::time::Duration;

use ractor::rpc::CallResult;
use udaconnect_actors::actors::person::{PersonSupervisorMsg, PersonView};
use udaconnect_actors::actors::ports::Stage;
use udaconnect_actors::actors::zone::{ZonePartitionView, ZoneSupervisorMsg, ZoneView};
use udaconnect_actors::domain::{Micros, PersonId};
use udaconnect_actors::zones::{person_partition, zone_partition, ZoneId};

use super::consumer::NotOwned;
use super::stages::Owned;
use super::Pipeline;
use crate::config::Topics;
use crate::input::BoundingBox;

/// Points the zone actors retain now, as the live floor map shows them: the answer of one
/// process, or of the whole cluster once merged ([`LivePoints::merge`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LivePoints {
    /// Home copies only (a halo copy is the same event seen from a neighbouring zone),
    /// newest first.
    pub points: Vec<LivePoint>,
    /// Every zone whose actor was asked (its cell meets the box), with how many of its home
    /// points lie in the box.
    pub zones: Vec<LiveZone>,
    /// Whether points were left out to keep to the limit.
    pub truncated: bool,
    /// Why parts of the cluster did not answer (a zone partition or a process), one sentence
    /// each; their points are missing.
    pub unanswered: Vec<String>,
}

/// One retained location report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LivePoint {
    pub person: PersonId,
    /// WGS84 degrees.
    pub lat: f64,
    pub lon: f64,
    /// Microseconds since the Unix epoch.
    pub recorded_at: Micros,
    pub zone: ZoneId,
}

/// A zone actor and where it lives.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveZone {
    pub zone: ZoneId,
    pub partition: i32,
    pub owner: String,
    /// Its home points inside the box.
    pub points: usize,
}

impl LivePoints {
    /// The union of several processes' answers, newest first, at most `limit` points.
    pub fn merge(parts: impl IntoIterator<Item = LivePoints>, limit: usize) -> Self {
        let mut all = Self::default();
        for part in parts {
            all.points.extend(part.points);
            all.zones.extend(part.zones);
            all.truncated |= part.truncated;
            all.unanswered.extend(part.unanswered);
        }
        all.finish(limit);
        all
    }

    /// Newest first (ties by person), cut to `limit`; zones in hexadecimal order.
    fn finish(&mut self, limit: usize) {
        self.points
            .sort_by(|a, b| (b.recorded_at, a.person).cmp(&(a.recorded_at, b.person)));
        if self.points.len() > limit {
            self.points.truncate(limit);
            self.truncated = true;
        }
        self.zones.sort_by_key(|z| z.zone);
    }
}

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

    /// The home points this process's zone actors retain now inside `bbox`, newest first, at
    /// most `limit`, with the zones asked; a partition whose supervisor did not answer is
    /// named in `unanswered`.
    pub async fn live_points(&self, bbox: &BoundingBox, limit: usize) -> LivePoints {
        let mut answer = LivePoints::default();
        let mut partitions = self.owned_partitions(Stage::Zones);
        partitions.sort_unstable();
        for partition in partitions {
            let view = match self.zone_partition_view(partition).await {
                Ok(view) => view,
                Err(LocalError::NotOwned { .. }) => continue, // released meanwhile
                Err(e) => {
                    answer.unanswered.push(e.to_string());
                    continue;
                }
            };
            for zone in view.zones.into_iter().filter(|z| bbox.meets_zone(*z)) {
                let points = match self.zone_view(zone, usize::MAX).await {
                    Ok(Some(v)) => v.points,
                    Ok(None) | Err(LocalError::NotOwned { .. }) => continue,
                    Err(e) => {
                        answer.unanswered.push(e.to_string());
                        continue;
                    }
                };
                let before = answer.points.len();
                answer.points.extend(
                    points
                        .iter()
                        .filter(|p| p.home && bbox.contains(p.lat, p.lon))
                        .map(|p| LivePoint {
                            person: p.person,
                            lat: p.lat,
                            lon: p.lon,
                            recorded_at: p.recorded_at,
                            zone,
                        }),
                );
                answer.zones.push(LiveZone {
                    zone,
                    partition,
                    owner: self.node.clone(),
                    points: answer.points.len() - before,
                });
            }
        }
        answer.finish(limit);
        answer
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
