//! Live state across the cluster (docs/design.md §5): a question about a person's or a zone's actor
//! is answered by this process when it owns the actor's partition, and forwarded over gRPC
//! (`udaconnect.v1.Admin`) to the owner otherwise, whose address is the `owner_addr` of the
//! partition's `shard_owner` row. A forwarded request carries [`FORWARDED`] and is answered
//! locally only, so forwarding never loops. Used by the gRPC Admin service and by REST.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};
use udaconnect_actors::actors::person::PersonView;
use udaconnect_actors::actors::ports::Stage;
use udaconnect_actors::actors::zone::ZoneView;
use udaconnect_actors::domain::PersonId;
use udaconnect_actors::zones::ZoneId;

use crate::config::Secret;
use crate::error::{ApiError, ErrorCode};
use crate::input::{zone_hex, BoundingBox};
use crate::pipeline::erasure::Erasure;
use crate::pipeline::live::{LivePoints, LocalError};
use crate::pipeline::Pipeline;
use crate::proto::convert;
use crate::proto::v1::admin_client::AdminClient;
use crate::proto::v1::{ErasePersonRequest, GetPersonRequest, GetZoneRequest, ListPointsRequest};
use crate::store::erasure;
use crate::store::owners::{shard_owners, ShardOwner};

/// Metadata key marking a request one process forwarded to another: answer it locally.
pub const FORWARDED: &str = "x-udaconnect-forwarded";
/// How long a forwarded request may take (its `grpc-timeout`, which the owner enforces).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// The client-side bound of any forwarded request, for an owner that hangs (a forwarded
/// snapshot may take up to a minute).
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(75);
/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// An answer and where it came from: the partition and the process that owns it.
#[derive(Debug, Clone, PartialEq)]
pub struct FromOwner<T> {
    pub value: T,
    pub partition: i32,
    pub owner: String,
}

impl<T> FromOwner<Option<T>> {
    /// `owner`'s answer for `partition`; with no value (no actor holds state for the key)
    /// there is nobody to name, and `owner` is left empty.
    fn maybe(value: Option<T>, partition: i32, owner: String) -> Self {
        let owner = if value.is_some() {
            owner
        } else {
            String::new()
        };
        Self {
            value,
            partition,
            owner,
        }
    }
}

/// This process's entry to the cluster's live state; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pipeline: Arc<tokio::sync::OnceCell<Arc<Pipeline>>>,
    pool: Pool,
    admin_token: Option<Secret>,
    /// One lazily connected channel per peer address, reused.
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Cluster {
    /// A cluster view over this process's pipeline (once started) and the `shard_owner` rows.
    pub fn new(
        pipeline: Arc<tokio::sync::OnceCell<Arc<Pipeline>>>,
        pool: Pool,
        admin_token: Option<Secret>,
    ) -> Self {
        Self {
            pipeline,
            pool,
            admin_token,
            channels: Arc::default(),
        }
    }

    /// The pipeline; UNAVAILABLE until it started.
    pub fn pipeline(&self) -> Result<Arc<Pipeline>, ApiError> {
        self.pipeline
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable(crate::readiness::PIPELINE_NOT_STARTED))
    }

    /// A person's live state, wherever its actor lives: one answer for REST
    /// (`/v1/persons/{id}/live`) and gRPC (`Admin.GetPerson`). `value` is `None` when no actor
    /// holds state for the person (never seen, or idle past the window); then `owner` is
    /// empty. NOT_FOUND naming `person_id` when no person has that id (not checked again by
    /// the owner of a forwarded question, `local_only`); UNAVAILABLE when the owner does not
    /// answer or the pipeline has not started.
    pub async fn person(
        &self,
        person: PersonId,
        local_only: bool,
    ) -> Result<FromOwner<Option<PersonView>>, ApiError> {
        if !local_only
            && crate::store::queries::person(&self.pool, person)
                .await?
                .is_none()
        {
            return Err(ApiError::unknown_person(person));
        }
        let pipeline = self.pipeline()?;
        let partition = pipeline.person_partition_of(person);
        let local = pipeline.person_view(person).await;
        if let Some(answer) = Self::answer_here(&pipeline, partition, local, local_only)? {
            return Ok(answer);
        }
        let owner = self.owner(&pipeline, Stage::Persons, partition).await?;
        let request = self.forwarded(GetPersonRequest { person_id: person })?;
        let answer = self
            .admin(&owner.owner_addr)?
            .get_person(request)
            .await
            .map_err(|s| forward_error(&owner, s))?
            .into_inner();
        let value = convert::person_view(&answer).map_err(|e| bad_answer(&owner, e))?;
        Ok(FromOwner::maybe(value, partition, owner.owner))
    }

    /// The zone's actor state and its owner, with at most `limit` points; with `local_only`
    /// only this process's partitions are asked. NOT_FOUND naming `zone` when the zone has no
    /// actor (no recent points); UNAVAILABLE as for [`Cluster::person`].
    pub async fn zone(
        &self,
        zone: ZoneId,
        limit: usize,
        local_only: bool,
    ) -> Result<FromOwner<ZoneView>, ApiError> {
        let pipeline = self.pipeline()?;
        let partition = pipeline.zone_partition_of(zone);
        let local = pipeline.zone_view(zone, limit).await;
        if let Some(answer) = Self::answer_here(&pipeline, partition, local, local_only)? {
            let value = answer.value.ok_or_else(|| {
                ApiError::not_found(
                    Some("zone"),
                    format!("zone {} has no actor (no recent points)", zone_hex(zone)),
                )
            })?;
            return Ok(FromOwner {
                value,
                partition,
                owner: answer.owner,
            });
        }
        let owner = self.owner(&pipeline, Stage::Zones, partition).await?;
        let request = self.forwarded(GetZoneRequest {
            zone: zone_hex(zone),
            point_limit: u32::try_from(limit).unwrap_or(u32::MAX),
        })?;
        let answer = self
            .admin(&owner.owner_addr)?
            .get_zone(request)
            .await
            .map_err(|s| forward_error(&owner, s))?
            .into_inner();
        Ok(FromOwner {
            value: convert::zone_view(&answer).map_err(|e| bad_answer(&owner, e))?,
            partition,
            owner: owner.owner,
        })
    }

    /// The home points the zone actors retain now inside `bbox`, across the cluster, newest
    /// first, at most `limit` (one answer for REST's `/v1/points` and gRPC's
    /// `Admin.ListPoints`): this process answers for its zone partitions and asks every other
    /// process that owns one, all at once; with `local_only` (a forwarded request) only its
    /// own. A process or partition that does not answer is named in `unanswered`; UNAVAILABLE
    /// only while the pipeline has not started or `shard_owner` cannot be read.
    pub async fn live_points(
        &self,
        bbox: &BoundingBox,
        limit: usize,
        local_only: bool,
    ) -> Result<LivePoints, ApiError> {
        let pipeline = self.pipeline()?;
        let local_partitions = pipeline.owned_partitions(Stage::Zones);
        // Holding every zone partition, this process answers alone (PostgreSQL not needed).
        if local_only || local_partitions.len() == pipeline.partitions(Stage::Zones) as usize {
            return Ok(pipeline.live_points(bbox, limit).await);
        }
        let owners = self.owners(&pipeline).await?;
        let mut peers: BTreeMap<&str, &str> = BTreeMap::new();
        let mut ownerless = Vec::new();
        for partition in 0..pipeline.partitions(Stage::Zones) as i32 {
            if local_partitions.contains(&partition) {
                continue;
            }
            let row = owners.iter().find(|o| {
                o.stage == Stage::Zones.as_str()
                    && o.partition == partition
                    && o.owner != pipeline.node()
            });
            match row {
                Some(o) => {
                    peers.insert(&o.owner, &o.owner_addr);
                }
                None => {
                    ownerless.push(format!("zone partition {partition} has no owner right now"))
                }
            }
        }
        let asked = peers.iter().map(|(node, addr)| async move {
            let answer = async {
                let request = self.forwarded(ListPointsRequest {
                    min_lat: bbox.min_lat,
                    min_lon: bbox.min_lon,
                    max_lat: bbox.max_lat,
                    max_lon: bbox.max_lon,
                    limit: limit as u32,
                })?;
                let answer = self
                    .admin(addr)?
                    .list_points(request)
                    .await
                    .map_err(|s| peer_error(node, addr, s))?
                    .into_inner();
                convert::live_points(&answer).map_err(|e| {
                    ApiError::unavailable(format!(
                        "{node} answered points that do not parse: {}",
                        e.describe()
                    ))
                })
            }
            .await;
            answer.unwrap_or_else(|e| LivePoints {
                unanswered: vec![format!("{node} ({addr}): {}", e.describe())],
                ..LivePoints::default()
            })
        });
        let (local, remote) = futures::future::join(
            pipeline.live_points(bbox, limit),
            futures::future::join_all(asked),
        )
        .await;
        let mut all = LivePoints::merge(std::iter::once(local).chain(remote), limit);
        all.unanswered.extend(ownerless);
        Ok(all)
    }

    /// The answer when this process owns the partition (`value` is `None` when no actor holds
    /// state for the key; `owner` then empty), `None` when the question must go to the owner;
    /// UNAVAILABLE when the local supervisor did not answer, or when a forwarded question
    /// (`local_only`) reached a process that does not own the partition (any more).
    fn answer_here<T>(
        pipeline: &Pipeline,
        partition: i32,
        local: Result<Option<T>, LocalError>,
        local_only: bool,
    ) -> Result<Option<FromOwner<Option<T>>>, ApiError> {
        match local {
            Ok(value) => Ok(Some(FromOwner::maybe(
                value,
                partition,
                pipeline.node().to_owned(),
            ))),
            Err(e @ LocalError::NoAnswer { .. }) => Err(ApiError::unavailable(e.to_string())),
            Err(e @ LocalError::NotOwned { .. }) if local_only => {
                Err(ApiError::unavailable(e.to_string()))
            }
            Err(LocalError::NotOwned { .. }) => Ok(None),
        }
    }

    /// Erases `person` across the cluster (docs/design.md §6; REST `DELETE /v1/persons/{id}`
    /// and gRPC `Admin.ErasePerson` both come here), in this order:
    /// 1. marks it in `erased_person` (from then on every process drops what the Kafka topics
    ///    still hold of it, and refuses its reports);
    /// 2. this process and every other process that owns partitions forget it
    ///    ([`Pipeline::forget`]; a process is asked over gRPC, `FORWARDED`), each storing its
    ///    partitions' snapshots again without it;
    /// 3. its rows are deleted in one transaction ([`erasure::delete_rows`]).
    ///
    /// A `forwarded` request does step 2 here only. Errors: NOT_FOUND (`person_id`) when no
    /// person has the id and none was erased under it; UNAVAILABLE when the store or a process
    /// did not do its part (the rows are deleted all the same; erasing again finishes it).
    pub async fn erase_person(
        &self,
        person: PersonId,
        forwarded: bool,
    ) -> Result<Erasure, ApiError> {
        let pipeline = self.pipeline()?;
        let mut failures = Vec::new();
        if forwarded {
            let local = pipeline.forget(person).await;
            if !local.failures.is_empty() {
                return Err(ApiError::unavailable(format!(
                    "{} did not forget person {person}: {}",
                    pipeline.node(),
                    local.failures.join("; ")
                )));
            }
            return Ok(Erasure {
                person,
                processes: 1,
                partitions: local.partitions,
                notifications: local.notifications,
                ..Erasure::default()
            });
        }
        if erasure::mark(&self.pool, person).await? == erasure::Mark::NoSuchPerson {
            return Err(ApiError::unknown_person(person));
        }
        let local = pipeline.forget(person).await;
        let mut done = Erasure {
            person,
            processes: 1,
            partitions: local.partitions,
            notifications: local.notifications,
            ..Erasure::default()
        };
        failures.extend(local.failures);
        let mut peers: BTreeMap<String, String> = BTreeMap::new();
        for o in self.owners(&pipeline).await? {
            if o.owner != pipeline.node() {
                peers.insert(o.owner, o.owner_addr);
            }
        }
        let asks = peers.iter().map(|(node, addr)| async move {
            let result = async {
                let mut request = self.forwarded(ErasePersonRequest { person_id: person })?;
                // Each partition stores a snapshot; the owner bounds each at a minute.
                request.set_timeout(Duration::from_secs(70));
                self.admin(addr)?
                    .erase_person(request)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| peer_error(node, addr, s))
            }
            .await;
            (node, result)
        });
        for (node, result) in futures::future::join_all(asks).await {
            match result {
                Ok(answer) => {
                    done.processes += 1;
                    done.partitions += answer.partitions;
                    done.notifications += answer.notifications;
                }
                Err(e) => failures.push(format!("{node}: {}", e.message)),
            }
        }
        let rows = erasure::delete_rows(&self.pool, person).await?;
        done.rows = rows;
        tracing::info!(
            person,
            locations = rows.locations,
            halo_copies = rows.halo_copies,
            connections = rows.connections,
            processes = done.processes,
            partitions = done.partitions,
            failures = failures.len(),
            "person erased"
        );
        if !failures.is_empty() {
            return Err(ApiError::unavailable(format!(
                "person {person} is erased from the store and its reports are dropped, but not \
                 every process forgot it ({}); erase it again to finish",
                failures.join("; ")
            )));
        }
        Ok(done)
    }

    /// The `shard_owner` rows of both stages' topics.
    pub async fn owners(&self, pipeline: &Pipeline) -> Result<Vec<ShardOwner>, ApiError> {
        let topics = [
            pipeline.stage_topic(Stage::Zones),
            pipeline.stage_topic(Stage::Persons),
        ];
        Ok(shard_owners(&self.pool, &topics).await?)
    }

    /// Who owns `partition` of `stage`, when it is another process; UNAVAILABLE when nobody
    /// does, or when the row names this process, which does not hold it (a hand-over under
    /// way).
    pub async fn owner(
        &self,
        pipeline: &Pipeline,
        stage: Stage,
        partition: i32,
    ) -> Result<ShardOwner, ApiError> {
        let owner = self
            .owners(pipeline)
            .await?
            .into_iter()
            .find(|o| o.stage == stage.as_str() && o.partition == partition)
            .ok_or_else(|| {
                ApiError::unavailable(format!(
                    "partition {partition} of the {} stage has no owner right now; retry",
                    stage.as_str()
                ))
            })?;
        if owner.owner == pipeline.node() {
            return Err(ApiError::unavailable(format!(
                "partition {partition} of the {} stage is being handed over; retry",
                stage.as_str()
            )));
        }
        Ok(owner)
    }

    /// An Admin client of the process at `addr` (a reused, lazily connected channel).
    pub fn admin(&self, addr: &str) -> Result<AdminClient<Channel>, ApiError> {
        let mut channels = self.channels.lock().expect("not poisoned");
        if let Some(channel) = channels.get(addr) {
            return Ok(AdminClient::new(channel.clone()));
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| {
            ApiError::unavailable(format!("the owner's address {addr:?} is not usable: {e}"))
        })?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CHANNEL_TIMEOUT)
            .connect_lazy();
        debug!(addr, "channel to a peer created");
        channels.insert(addr.to_owned(), channel.clone());
        Ok(AdminClient::new(channel))
    }

    /// `message` as a request to a peer: marked forwarded, with the admin token.
    pub fn forwarded<T>(&self, message: T) -> Result<tonic::Request<T>, ApiError> {
        let token = self.admin_token.as_ref().ok_or_else(|| {
            ApiError::unavailable(
                "the state is on another process, and forwarding needs admin_token to be set",
            )
        })?;
        let mut request = tonic::Request::new(message);
        request.set_timeout(FORWARD_TIMEOUT);
        let metadata = request.metadata_mut();
        metadata.insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        let bearer = format!("Bearer {}", token.expose())
            .parse()
            .map_err(|_| ApiError::unavailable("admin_token is not a valid header value"))?;
        metadata.insert("authorization", bearer);
        Ok(request)
    }
}

/// What a failed forwarded call means here: the owner's NOT_FOUND and INVALID_ARGUMENT stand,
/// anything else is the owner being unavailable.
pub fn forward_error(owner: &ShardOwner, status: tonic::Status) -> ApiError {
    peer_error(&owner.owner, &owner.owner_addr, status)
}

/// [`forward_error`] for the process `node` at `addr`.
pub fn peer_error(node: &str, addr: &str, status: tonic::Status) -> ApiError {
    match status.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument => {
            let field = status
                .metadata()
                .get("x-error-field")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let message = match &field {
                Some(f) => status
                    .message()
                    .strip_prefix(&format!("{f}: "))
                    .unwrap_or(status.message())
                    .to_owned(),
                None => status.message().to_owned(),
            };
            let code = if status.code() == tonic::Code::NotFound {
                ErrorCode::NotFound
            } else {
                ErrorCode::InvalidArgument
            };
            ApiError {
                code,
                message,
                field,
            }
        }
        code => {
            warn!(
                node,
                addr,
                ?code,
                error = status.message(),
                "forwarded request failed"
            );
            ApiError::unavailable(format!(
                "{node} at {addr} did not answer: {} ({code:?})",
                status.message()
            ))
        }
    }
}

fn bad_answer(owner: &ShardOwner, e: ApiError) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("the owner {} sent an unreadable answer: {e}", owner.owner),
    )
}
