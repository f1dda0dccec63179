//! `udaconnect.v1.Admin`: the cluster's status, zones, a zone's or a person's actor state,
//! snapshots on demand. Any process answers for the whole cluster: what another process owns
//! is forwarded to it ([`crate::cluster`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tonic::{Request, Response, Status};
use udaconnect_actors::actors::ports::Stage;

use super::GrpcState;
use crate::cluster::{forward_error, peer_error, FORWARDED};
use crate::error::ApiError;
use crate::input::{parse_zone, person_id, point_limit, zone_hex, BoundingBox};
use crate::pipeline::live::LocalError;
use crate::pipeline::{Pipeline, PipelineStatus};
use crate::proto::convert;
use crate::proto::v1::admin_server::Admin;
use crate::proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, ErasePersonRequest, ErasePersonResponse,
    GetPersonRequest, GetZoneRequest, ListPointsRequest, ListPointsResponse, ListZonesRequest,
    ListZonesResponse, PartitionStatus, PersonState, Process, TriggerSnapshotRequest,
    TriggerSnapshotResponse, ZonePartition, ZoneState, ZoneSummary,
};
use crate::store::owners::ShardOwner;

/// Points of a zone returned when the request names no limit.
pub const DEFAULT_POINT_LIMIT: u32 = 100;
/// Most points of a zone one request returns.
pub const MAX_POINT_LIMIT: u32 = 10_000;

/// Whether `request` was forwarded by another process of the cluster: it carries the
/// [`FORWARDED`] mark and the admin token (from anyone else the mark is ignored, and the
/// request is answered for the whole cluster).
fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().get(FORWARDED).is_some() && super::caller(request).is_ok_and(|p| p.cluster)
}

fn parse_stage(stage: &str) -> Result<Stage, ApiError> {
    match stage {
        "zones" => Ok(Stage::Zones),
        "persons" => Ok(Stage::Persons),
        other => Err(ApiError::invalid(
            "stage",
            format!("must be zones or persons (got {other:?})"),
        )),
    }
}

fn check_partition(pipeline: &Pipeline, stage: Stage, partition: i32) -> Result<(), ApiError> {
    let count = pipeline.partitions(stage);
    if partition < 0 || partition as u32 >= count {
        return Err(ApiError::invalid(
            "partition",
            format!(
                "must be between 0 and {} for the {} stage (got {partition})",
                count.saturating_sub(1),
                stage.as_str()
            ),
        ));
    }
    Ok(())
}

fn local_error(e: LocalError) -> ApiError {
    ApiError::unavailable(e.to_string())
}

/// The Admin service.
pub struct AdminService {
    state: Arc<GrpcState>,
}

impl AdminService {
    /// The service over the shared state.
    pub fn new(state: Arc<GrpcState>) -> Self {
        Self { state }
    }

    /// This process's partitions with their offsets and figures, and its own entry.
    fn local_status(&self, pipeline: &Pipeline, status: &PipelineStatus) -> ClusterStatusResponse {
        let mut partitions = Vec::new();
        for stage in &status.stages {
            for p in &stage.partitions {
                partitions.push(PartitionStatus {
                    stage: stage.stage.as_str().to_owned(),
                    topic: stage.topic.clone(),
                    partition: p.partition,
                    owner: status.node.clone(),
                    processed_offset: p.processed_offset,
                    end_offset: p.end_offset,
                    lag: p.lag,
                    snapshot_mismatch: p.snapshot_mismatch.as_ref().map(convert::snapshot_mismatch),
                    restored_at: p.restored_at_us.map(convert::timestamp),
                    replayed_at: p.replayed_at_us.map(convert::timestamp),
                    actors: p.figures.actors,
                    passivated: p.figures.passivated,
                    watermark: convert::optional_timestamp(p.figures.watermark),
                    counters: p
                        .figures
                        .counters
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), *v))
                        .collect(),
                    ..PartitionStatus::default()
                });
            }
        }
        let addr = status
            .owners
            .iter()
            .find(|o| o.owner == status.node)
            .map(|o| o.owner_addr.clone())
            .unwrap_or_default();
        ClusterStatusResponse {
            node: pipeline.node().to_owned(),
            processes: vec![Process {
                node: status.node.clone(),
                addr,
                reachable: true,
                error: String::new(),
                dead_letters: status.dead_letters,
                locations_stored: status.locations_stored,
                subscribers: status.hub.subscribers,
            }],
            partitions,
            lag_total: status.lag_total,
        }
    }

    /// One zone partition's zones, from this process (which owns it).
    async fn local_zones(
        &self,
        pipeline: &Pipeline,
        partition: i32,
    ) -> Result<ZonePartition, ApiError> {
        let view = pipeline
            .zone_partition_view(partition)
            .await
            .map_err(local_error)?;
        let mut zones = Vec::with_capacity(view.zones.len());
        for zone in view.zones {
            let retained = match pipeline.zone_view(zone, 0).await {
                Ok(Some(v)) => v.retained as u64,
                _ => 0,
            };
            zones.push(ZoneSummary {
                zone: zone_hex(zone),
                retained,
            });
        }
        zones.sort_by(|a, b| a.zone.cmp(&b.zone)); // same-resolution cells: hex order is numeric order
        Ok(ZonePartition {
            partition,
            owner: pipeline.node().to_owned(),
            watermark: convert::optional_timestamp(view.watermark),
            zones,
            error: String::new(),
        })
    }

    /// One zone partition's zones, from whichever process owns it.
    async fn zones_of(
        &self,
        pipeline: &Pipeline,
        owners: &[ShardOwner],
        partition: i32,
    ) -> Result<ZonePartition, ApiError> {
        if pipeline.owned_partitions(Stage::Zones).contains(&partition) {
            return self.local_zones(pipeline, partition).await;
        }
        let owner = owners
            .iter()
            .find(|o| {
                o.stage == Stage::Zones.as_str()
                    && o.partition == partition
                    && o.owner != pipeline.node()
            })
            .ok_or_else(|| {
                ApiError::unavailable(format!("zone partition {partition} has no owner right now"))
            })?;
        let cluster = &self.state.cluster;
        let request = cluster.forwarded(ListZonesRequest {
            partition: Some(partition),
        })?;
        let answer = cluster
            .admin(&owner.owner_addr)?
            .list_zones(request)
            .await
            .map_err(|s| forward_error(owner, s))?
            .into_inner();
        answer
            .partitions
            .into_iter()
            .find(|p| p.partition == partition)
            .ok_or_else(|| {
                ApiError::unavailable(format!(
                    "the owner {} did not list zone partition {partition}",
                    owner.owner
                ))
            })
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let pipeline = self.state.pipeline()?;
        let status = pipeline.status().await;
        let local = self.local_status(&pipeline, &status);
        if is_forwarded(&request) {
            return Ok(Response::new(local));
        }
        if let Some(e) = &status.owners_error {
            return Err(ApiError::unavailable(format!("cannot read shard_owner: {e}")).into());
        }
        // Every other owning process reports its own partitions.
        let mut peers: BTreeMap<&str, &str> = BTreeMap::new();
        for o in status.owners.iter().filter(|o| o.owner != status.node) {
            peers.insert(&o.owner, &o.owner_addr);
        }
        let cluster = &self.state.cluster;
        let answers = join_all(peers.iter().map(|(node, addr)| async move {
            let result = async {
                let request = cluster.forwarded(ClusterStatusRequest {})?;
                cluster
                    .admin(addr)?
                    .cluster_status(request)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| peer_error(node, addr, s))
            }
            .await;
            (*node, *addr, result)
        }))
        .await;

        let mut processes = local.processes.clone();
        let mut reported: BTreeMap<(String, i32), PartitionStatus> = local
            .partitions
            .into_iter()
            .map(|p| ((p.stage.clone(), p.partition), p))
            .collect();
        for (node, addr, result) in answers {
            match result {
                Ok(answer) => {
                    processes.extend(answer.processes.into_iter().filter(|p| p.node == node));
                    for p in answer.partitions.into_iter().filter(|p| p.owner == node) {
                        reported.insert((p.stage.clone(), p.partition), p);
                    }
                }
                Err(e) => processes.push(Process {
                    node: node.to_owned(),
                    addr: addr.to_owned(),
                    reachable: false,
                    error: e.message,
                    ..Process::default()
                }),
            }
        }
        let mut partitions = Vec::new();
        for stage in [Stage::Zones, Stage::Persons] {
            for partition in 0..pipeline.partitions(stage) as i32 {
                let row = status
                    .owners
                    .iter()
                    .find(|o| o.stage == stage.as_str() && o.partition == partition);
                let mut p = match row.and_then(|o| {
                    reported
                        .remove(&(stage.as_str().to_owned(), partition))
                        .filter(|p| p.owner == o.owner)
                }) {
                    Some(p) => p,
                    None => PartitionStatus {
                        stage: stage.as_str().to_owned(),
                        partition,
                        processed_offset: -1,
                        end_offset: -1,
                        lag: None,
                        ..PartitionStatus::default()
                    },
                };
                p.topic = pipeline.stage_topic(stage).to_owned();
                if let Some(o) = row {
                    p.owner = o.owner.clone();
                    p.owner_addr = o.owner_addr.clone();
                    p.owner_since = Some(convert::chrono_timestamp(o.since));
                    p.heartbeat_at = Some(convert::chrono_timestamp(o.heartbeat_at));
                    p.snapshot_offset = o.snapshot_offset;
                    p.snapshot_age_s = o.snapshot_age_s;
                }
                partitions.push(p);
            }
        }
        let lag_total = partitions
            .iter()
            .filter_map(|p| p.lag)
            .map(|l| l.max(0))
            .sum();
        Ok(Response::new(ClusterStatusResponse {
            node: pipeline.node().to_owned(),
            processes,
            partitions,
            lag_total,
        }))
    }

    async fn list_zones(
        &self,
        request: Request<ListZonesRequest>,
    ) -> Result<Response<ListZonesResponse>, Status> {
        let pipeline = self.state.pipeline()?;
        let forwarded = is_forwarded(&request);
        let wanted = request.into_inner().partition;
        if let Some(p) = wanted {
            check_partition(&pipeline, Stage::Zones, p)?;
        }
        if forwarded {
            let Some(p) = wanted else {
                return Err(ApiError::invalid("partition", "a forwarded request names one").into());
            };
            return Ok(Response::new(ListZonesResponse {
                partitions: vec![self.local_zones(&pipeline, p).await?],
            }));
        }
        let owners = self.state.cluster.owners(&pipeline).await?;
        if let Some(p) = wanted {
            return Ok(Response::new(ListZonesResponse {
                partitions: vec![self.zones_of(&pipeline, &owners, p).await?],
            }));
        }
        let all = (0..pipeline.partitions(Stage::Zones) as i32).map(|p| {
            let (pipeline, owners) = (&pipeline, &owners);
            async move {
                self.zones_of(pipeline, owners, p)
                    .await
                    .unwrap_or_else(|e| ZonePartition {
                        partition: p,
                        owner: owners
                            .iter()
                            .find(|o| o.stage == Stage::Zones.as_str() && o.partition == p)
                            .map(|o| o.owner.clone())
                            .unwrap_or_default(),
                        error: e.describe(),
                        ..ZonePartition::default()
                    })
            }
        });
        Ok(Response::new(ListZonesResponse {
            partitions: join_all(all).await,
        }))
    }

    async fn list_points(
        &self,
        request: Request<ListPointsRequest>,
    ) -> Result<Response<ListPointsResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let r = request.into_inner();
        let bbox = if [r.min_lat, r.min_lon, r.max_lat, r.max_lon] == [0.0; 4] {
            BoundingBox::WORLD
        } else {
            BoundingBox::new((r.min_lat, r.min_lon), (r.max_lat, r.max_lon), "bbox")?
        };
        let limit = point_limit((r.limit != 0).then_some(i64::from(r.limit)), "limit")?;
        let points = self
            .state
            .cluster
            .live_points(&bbox, limit, forwarded)
            .await?;
        Ok(Response::new(convert::list_points(&points)))
    }

    async fn get_zone(
        &self,
        request: Request<GetZoneRequest>,
    ) -> Result<Response<ZoneState>, Status> {
        let forwarded = is_forwarded(&request);
        let r = request.into_inner();
        let zone = parse_zone(&r.zone, "zone", Some(self.state.zone_resolution))?;
        let limit = match r.point_limit {
            0 => DEFAULT_POINT_LIMIT,
            n if n <= MAX_POINT_LIMIT => n,
            n => {
                return Err(ApiError::invalid(
                    "point_limit",
                    format!("must be between 1 and {MAX_POINT_LIMIT}, or 0 for {DEFAULT_POINT_LIMIT} (got {n})"),
                )
                .into())
            }
        };
        let answer = self
            .state
            .cluster
            .zone(zone, limit as usize, forwarded)
            .await?;
        Ok(Response::new(convert::zone_state(
            &answer.value,
            answer.partition,
            &answer.owner,
        )))
    }

    async fn get_person(
        &self,
        request: Request<GetPersonRequest>,
    ) -> Result<Response<PersonState>, Status> {
        let forwarded = is_forwarded(&request);
        let person = person_id(request.into_inner().person_id)?;
        let answer = self.state.cluster.person(person, forwarded).await?;
        Ok(Response::new(convert::person_state(
            person,
            answer.value.as_ref(),
            answer.partition,
            &answer.owner,
        )))
    }

    async fn erase_person(
        &self,
        request: Request<ErasePersonRequest>,
    ) -> Result<Response<ErasePersonResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let person = person_id(request.into_inner().person_id)?;
        let done = self.state.cluster.erase_person(person, forwarded).await?;
        Ok(Response::new(convert::erasure(&done)))
    }

    async fn trigger_snapshot(
        &self,
        request: Request<TriggerSnapshotRequest>,
    ) -> Result<Response<TriggerSnapshotResponse>, Status> {
        let pipeline = self.state.pipeline()?;
        let forwarded = is_forwarded(&request);
        let r = request.into_inner();
        let stage = parse_stage(&r.stage)?;
        check_partition(&pipeline, stage, r.partition)?;
        let cluster = &self.state.cluster;
        match pipeline.snapshot_now(stage, r.partition).await {
            Ok(taken) => {
                let snapshot_offset = match taken {
                    Some(offset) => Some(offset),
                    None => cluster
                        .owners(&pipeline)
                        .await?
                        .into_iter()
                        .find(|o| o.stage == stage.as_str() && o.partition == r.partition)
                        .and_then(|o| o.snapshot_offset),
                };
                tracing::info!(
                    stage = stage.as_str(),
                    partition = r.partition,
                    taken = taken.is_some(),
                    "snapshot requested"
                );
                Ok(Response::new(TriggerSnapshotResponse {
                    stage: stage.as_str().to_owned(),
                    partition: r.partition,
                    owner: pipeline.node().to_owned(),
                    taken: taken.is_some(),
                    snapshot_offset,
                }))
            }
            Err(e @ LocalError::NoAnswer { .. }) => Err(local_error(e).into()),
            Err(e @ LocalError::NotOwned { .. }) if forwarded => Err(local_error(e).into()),
            Err(LocalError::NotOwned { .. }) => {
                let owner = cluster.owner(&pipeline, stage, r.partition).await?;
                let mut request = cluster.forwarded(r)?;
                // The owner bounds its snapshot at a minute.
                request.set_timeout(Duration::from_secs(70));
                let answer = cluster
                    .admin(&owner.owner_addr)?
                    .trigger_snapshot(request)
                    .await
                    .map_err(|s| forward_error(&owner, s))?;
                Ok(answer)
            }
        }
    }
}
