//! What `/v1/status`, the gRPC admin service and `/metrics` report of this process's pipeline:
//! each owned partition's offsets, lag and live figures (asked of its supervisor), the
//! stages' counters, and the cluster's owner rows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use rdkafka::consumer::Consumer;
use serde::Serialize;
use udaconnect_actors::actors::person::{PersonPartitionView, PersonSupervisorMsg};
use udaconnect_actors::actors::ports::Stage;
use udaconnect_actors::actors::zone::{ZonePartitionView, ZoneSupervisorMsg};

use crate::metrics::StageCounters;
use crate::pipeline::hub::HubCounters;
use crate::pipeline::offsets::OffsetMismatch;
use crate::pipeline::stages::{Owned, Restores};
use crate::pipeline::Pipeline;
use crate::store::owners::{shard_owners, ShardOwner};

/// One partition of a stage owned by this process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The offset after the last record whose effects are done; -1 when the supervisor did
    /// not answer.
    pub processed_offset: i64,
    /// The topic's end offset (high watermark); -1 when the broker did not answer.
    pub end_offset: i64,
    /// `end_offset - processed_offset`, unclamped (negative when the log ends before what was
    /// processed); `None` when either is unknown.
    pub lag: Option<i64>,
    /// The snapshot offset the log contradicted when the partition was restored, if it did.
    pub snapshot_mismatch: Option<OffsetMismatch>,
    /// When the partition was restored here and started serving, µs since the Unix epoch.
    pub restored_at_us: Option<i64>,
    /// When it had handled the records its log held at the restore (the replay after its
    /// snapshot), µs since the Unix epoch; `None` while it has not.
    pub replayed_at_us: Option<i64>,
    /// The partition's live figures (from its supervisor's view).
    #[serde(flatten)]
    pub figures: PartitionFigures,
}

/// What a partition's supervisor reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PartitionFigures {
    /// Zone actors (zones stage) or active person actors (persons stage).
    pub actors: u64,
    /// Passivated persons (state kept, no actor running).
    pub passivated: u64,
    /// Event-time watermark, µs since the epoch (the minimum over the zone partitions for the
    /// persons stage).
    pub watermark: i64,
    /// Counters since the partition was assigned here, by name.
    pub counters: BTreeMap<&'static str, u64>,
}

impl PartitionFigures {
    fn of_zones(v: &ZonePartitionView) -> Self {
        Self {
            actors: v.zones.len() as u64,
            passivated: 0,
            watermark: v.watermark,
            counters: BTreeMap::from([
                ("batches", v.counters.batches),
                ("events", v.counters.events),
                ("late_events", v.counters.late),
                ("panics", v.supervision.panics),
                ("restarts", v.supervision.restarts),
                ("port_retries", v.port_retries),
            ]),
        }
    }

    fn of_persons(v: &PersonPartitionView) -> Self {
        Self {
            actors: v.active_persons as u64,
            passivated: v.passivated_persons as u64,
            watermark: v.watermarks.iter().copied().min().unwrap_or(i64::MIN),
            counters: BTreeMap::from([
                ("batches", v.counters.batches),
                ("updates", v.counters.updates),
                ("colocations", v.counters.colocations),
                ("episode_changes", v.counters.changes),
                ("notifications", v.counters.notifications),
                ("passivations", v.counters.passivations),
                ("activations", v.counters.activations),
                ("panics", v.supervision.panics),
                ("restarts", v.supervision.restarts),
                ("port_retries", v.port_retries),
            ]),
        }
    }
}

/// One stage's partitions in this process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageStatus {
    pub stage: Stage,
    pub topic: String,
    pub partitions: Vec<PartitionStatus>,
    /// Records handed to workers, and time blocked on full worker channels.
    pub records: u64,
    pub backpressure_s: f64,
}

/// The pipeline as this process sees it, and the cluster's owners as `shard_owner` says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineStatus {
    /// This process's name (`shard_owner.owner`).
    pub node: String,
    pub stages: Vec<StageStatus>,
    /// The sum of the owned partitions' positive lags: records not processed yet.
    pub lag_total: i64,
    pub dead_letters: u64,
    pub locations_stored: u64,
    /// Every owned partition of both stages in the cluster, with its snapshot's offset and
    /// age; empty with `owners_error` set when PostgreSQL did not answer.
    pub owners: Vec<ShardOwner>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owners_error: Option<String>,
    pub hub: HubCounters,
}

impl Pipeline {
    async fn end_offset(&self, topic: &str, partition: i32) -> i64 {
        let probe = Arc::clone(&self.probe);
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            probe
                .fetch_watermarks(&topic, partition, Duration::from_secs(5))
                .map(|(_, high)| high)
                .unwrap_or(-1)
        })
        .await
        .unwrap_or(-1)
    }

    /// The owned partitions of one stage, with the offset each supervisor has processed.
    async fn stage_status<M: ractor::Message, V: Send + 'static>(
        &self,
        stage: Stage,
        topic: &str,
        (owned, counters, restores): (&Owned<M>, &StageCounters, &Restores),
        view: fn(ractor::RpcReplyPort<V>) -> M,
        read: fn(&V) -> (u64, PartitionFigures),
    ) -> StageStatus {
        let actors: Vec<_> = owned
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        // All partitions at once: a supervisor busy with a large batch (a replay) delays its
        // own answer, not the others'.
        let asked = actors.into_iter().map(|(p, actor)| async move {
            let ((processed, figures), end) = tokio::join!(
                async {
                    match actor.call(view, Some(Duration::from_secs(30))).await {
                        Ok(CallResult::Success(v)) => {
                            let (next, figures) = read(&v);
                            (next as i64, figures)
                        }
                        _ => (-1, PartitionFigures::default()),
                    }
                },
                self.end_offset(topic, p)
            );
            let restored = restores
                .current
                .lock()
                .expect("not poisoned")
                .get(&p)
                .cloned();
            PartitionStatus {
                partition: p,
                processed_offset: processed,
                end_offset: end,
                lag: (end >= 0 && processed >= 0).then_some(end - processed),
                restored_at_us: restored.as_ref().map(|r| r.restored_at_us),
                replayed_at_us: restored.as_ref().and_then(|r| r.replayed_at_us),
                snapshot_mismatch: restored.and_then(|r| r.mismatch),
                figures,
            }
        });
        let partitions = futures::future::join_all(asked).await;
        StageStatus {
            stage,
            topic: topic.to_owned(),
            partitions,
            records: counters.records.get(),
            backpressure_s: counters.backpressure_s.get(),
        }
    }

    /// Owned partitions of both stages with processed and end offsets.
    pub async fn status(&self) -> PipelineStatus {
        let stages = vec![
            self.stage_status(
                Stage::Zones,
                &self.topics.locations,
                (&self.zone_owned, &self.metrics.zones, &self.zone_restores),
                ZoneSupervisorMsg::View,
                |v| (v.next_offset, PartitionFigures::of_zones(v)),
            )
            .await,
            self.stage_status(
                Stage::Persons,
                &self.topics.person_updates,
                (
                    &self.person_owned,
                    &self.metrics.persons,
                    &self.person_restores,
                ),
                PersonSupervisorMsg::View,
                |v| (v.next_offset, PartitionFigures::of_persons(v)),
            )
            .await,
        ];
        let topics = [
            self.topics.locations.as_str(),
            self.topics.person_updates.as_str(),
        ];
        let (owners, owners_error) =
            match tokio::time::timeout(Duration::from_secs(2), shard_owners(&self.pool, &topics))
                .await
            {
                Ok(Ok(owners)) => (owners, None),
                Ok(Err(e)) => (Vec::new(), Some(e.to_string())),
                Err(_) => (
                    Vec::new(),
                    Some("postgres did not answer within 2s".to_owned()),
                ),
            };
        let lag_total = stages
            .iter()
            .flat_map(|s| &s.partitions)
            .filter_map(|p| p.lag)
            .map(|lag| lag.max(0))
            .sum();
        PipelineStatus {
            node: self.node.clone(),
            stages,
            lag_total,
            dead_letters: self.metrics.dead_letters.get(),
            locations_stored: self.metrics.locations.stored.get(),
            owners,
            owners_error,
            hub: self.hub.counters(),
        }
    }
}
