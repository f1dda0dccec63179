//! Stage two: `PersonSupervisor` (one per person partition) and `PersonActor` (one per
//! person, passivated when idle).
//!
//! The supervisor groups a batch's updates by person, lets the persons' actors work in
//! parallel, then advances the source's watermark and asks the persons whose deadlines the
//! minimum watermark passed to close episodes. Episode changes and notifications go to the
//! [`ConnectionSink`] before the next batch is taken.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedSemaphorePermit;

use crate::actors::ports::{retry, ConnectionSink, SnapshotBlob};
use crate::actors::SupervisionCounters;
use crate::domain::{Micros, PersonId, MICROS_PER_S};
use crate::episodes::{Deadlines, OpenEpisode, PersonCounters, PersonState, Sighting, Watermarks};
use crate::messages::{PersonBatch, PersonOutput, PersonUpdate};
use crate::params::EngineParams;
use crate::zones::ZoneId;

/// How long the supervisor waits for a person actor's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Snapshot format of a person partition (postcard of [`PersonPartitionSnapshot`]).
pub const PERSON_SNAPSHOT_FORMAT: u32 = 1;

/// A person actor: configuration only; its state is a [`PersonState`].
pub struct PersonActor {
    gap_us: Micros,
    capture: bool,
}

/// Messages of a person actor.
pub enum PersonMsg {
    /// Updates from zone partition `source`, whose watermark this partition has seen is
    /// `source_watermark`. Replies with the output, the deadline of any new episode and how
    /// many co-locations were accepted.
    Apply {
        updates: Vec<PersonUpdate>,
        source_watermark: Micros,
        reply: RpcReplyPort<(PersonOutput, Option<Micros>, u64)>,
    },
    /// Close what `min_watermark` allows; replies with the output and the next deadline.
    Close {
        min_watermark: Micros,
        reply: RpcReplyPort<(PersonOutput, Option<Micros>)>,
    },
    View(RpcReplyPort<PersonView>),
    /// Hands the state over (snapshots, passivation).
    Snapshot(RpcReplyPort<PersonState>),
    #[doc(hidden)]
    Crash,
}

/// A copy of a person actor's state for admin APIs and tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonView {
    pub person: PersonId,
    pub current_zone: Option<ZoneId>,
    pub last_location: Option<Sighting>,
    /// Oldest first.
    pub trajectory: Vec<Sighting>,
    pub open_episodes: Vec<OpenEpisode>,
    pub counters: PersonCounters,
    /// Whether the person was passivated (its state kept, no actor running).
    pub passivated: bool,
}

fn person_view(state: &PersonState, passivated: bool) -> PersonView {
    let trajectory = state.trajectory();
    let last = trajectory.last().copied();
    PersonView {
        person: state.person(),
        current_zone: last.map(|s| s.zone),
        last_location: last,
        trajectory,
        open_episodes: state.open_episodes(),
        counters: state.counters(),
        passivated,
    }
}

impl Actor for PersonActor {
    type Msg = PersonMsg;
    type State = PersonState;
    type Arguments = PersonState;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: PersonState,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PersonMsg::Apply {
                updates,
                source_watermark,
                reply,
            } => {
                let mut out = PersonOutput::default();
                let mut deadline: Option<Micros> = None;
                let before = state.counters().colocations;
                for u in &updates {
                    match u {
                        PersonUpdate::Sighting { event, zone } => state.sighting(event, *zone),
                        PersonUpdate::Colocation(c) => {
                            if let Some(d) = state.colocation(
                                c,
                                source_watermark,
                                self.gap_us,
                                &mut out,
                                self.capture,
                            ) {
                                deadline = Some(deadline.map_or(d, |x: Micros| x.min(d)));
                            }
                        }
                    }
                }
                state.flush(&mut out);
                let accepted = state.counters().colocations - before;
                let _ = reply.send((out, deadline, accepted));
            }
            PersonMsg::Close {
                min_watermark,
                reply,
            } => {
                let mut out = PersonOutput::default();
                let next = state.close(min_watermark, self.gap_us, &mut out);
                let _ = reply.send((out, next));
            }
            PersonMsg::View(reply) => {
                let _ = reply.send(person_view(state, false));
            }
            PersonMsg::Snapshot(reply) => {
                let _ = reply.send(state.clone());
            }
            PersonMsg::Crash => panic!("person actor asked to crash"),
        }
        Ok(())
    }
}

/// The serialized state of a person partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersonPartitionSnapshot {
    pub partition: u32,
    pub watermarks: Watermarks,
    pub deadlines: Deadlines,
    pub persons: Vec<PersonState>,
    pub counters: PersonSupervisorCounters,
}

/// Counters of one person partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonSupervisorCounters {
    pub batches: u64,
    pub updates: u64,
    /// Co-locations accepted (repeats excluded).
    pub colocations: u64,
    pub changes: u64,
    pub notifications: u64,
    pub passivations: u64,
    pub activations: u64,
}

/// The person partition's supervisor: configuration only.
pub struct PersonSupervisor;

/// What a person supervisor starts with.
pub struct PersonSupervisorArgs {
    pub partition: u32,
    pub params: EngineParams,
    pub zone_partitions: u32,
    pub connections: Arc<dyn ConnectionSink>,
    /// Persons idle (in event time) for this long with no open episode are passivated.
    pub passivate_after_s: u32,
    /// Keep accepted co-locations in the outputs (tests).
    pub capture: bool,
    pub snapshot: Option<SnapshotBlob>,
}

/// A person supervisor's state.
pub struct PersonSupervisorState {
    partition: u32,
    gap_us: Micros,
    passivate_after_us: Micros,
    capture: bool,
    connections: Arc<dyn ConnectionSink>,
    watermarks: Watermarks,
    deadlines: Deadlines,
    actors: FxHashMap<PersonId, ActorRef<PersonMsg>>,
    by_actor: FxHashMap<ActorId, PersonId>,
    /// Event time of each active person's latest update.
    last_active: FxHashMap<PersonId, Micros>,
    passivated: FxHashMap<PersonId, PersonState>,
    counters: PersonSupervisorCounters,
    supervision: SupervisionCounters,
    next_offset: u64,
    port_retries: u64,
    captured: PersonOutput,
}

/// Messages of a person supervisor.
pub enum PersonSupervisorMsg {
    /// The next batch of the partition; `next_offset` is the input offset after it.
    Batch {
        batch: PersonBatch,
        next_offset: u64,
        permit: Option<OwnedSemaphorePermit>,
        done: Option<RpcReplyPort<()>>,
    },
    /// Replies once every earlier message is processed.
    Flush(RpcReplyPort<()>),
    Snapshot(RpcReplyPort<SnapshotBlob>),
    View(RpcReplyPort<PersonPartitionView>),
    Person {
        person: PersonId,
        reply: RpcReplyPort<Option<PersonView>>,
    },
    /// Hands over what was captured so far (tests).
    TakeCaptured(RpcReplyPort<PersonOutput>),
    #[doc(hidden)]
    CrashPerson(PersonId),
}

/// A copy of a person partition's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonPartitionView {
    pub partition: u32,
    pub watermarks: Vec<Micros>,
    pub next_offset: u64,
    pub active_persons: usize,
    pub passivated_persons: usize,
    pub counters: PersonSupervisorCounters,
    pub supervision: SupervisionCounters,
    pub port_retries: u64,
}

fn success<T>(r: Result<ractor::rpc::CallResult<T>, impl std::fmt::Debug>) -> Option<T> {
    match r {
        Ok(ractor::rpc::CallResult::Success(v)) => Some(v),
        _ => None,
    }
}

impl PersonSupervisorState {
    async fn actor(
        &mut self,
        myself: &ActorRef<PersonSupervisorMsg>,
        person: PersonId,
    ) -> Result<ActorRef<PersonMsg>, ActorProcessingErr> {
        if let Some(actor) = self.actors.get(&person) {
            return Ok(actor.clone());
        }
        let state = match self.passivated.remove(&person) {
            Some(state) => {
                self.counters.activations += 1;
                state
            }
            None => PersonState::new(person),
        };
        self.spawn(myself, state).await
    }

    async fn spawn(
        &mut self,
        myself: &ActorRef<PersonSupervisorMsg>,
        state: PersonState,
    ) -> Result<ActorRef<PersonMsg>, ActorProcessingErr> {
        let person = state.person();
        let actor = PersonActor {
            gap_us: self.gap_us,
            capture: self.capture,
        };
        let (actor, _) = Actor::spawn_linked(None, actor, state, myself.get_cell()).await?;
        self.by_actor.insert(actor.get_id(), person);
        self.actors.insert(person, actor.clone());
        Ok(actor)
    }

    async fn process(
        &mut self,
        myself: &ActorRef<PersonSupervisorMsg>,
        batch: PersonBatch,
    ) -> Result<(), ActorProcessingErr> {
        self.counters.batches += 1;
        self.counters.updates += batch.updates.len() as u64;
        let source_watermark = self.watermarks.of(batch.source);
        let mut by_person: FxHashMap<PersonId, Vec<PersonUpdate>> = FxHashMap::default();
        for u in batch.updates {
            let person = u.person();
            let t = match &u {
                PersonUpdate::Sighting { event, .. } => event.recorded_at,
                PersonUpdate::Colocation(c) => c.time,
            };
            let active = self.last_active.entry(person).or_insert(t);
            *active = (*active).max(t);
            by_person.entry(person).or_default().push(u);
        }
        let mut calls = Vec::with_capacity(by_person.len());
        for (person, updates) in by_person {
            let actor = self.actor(myself, person).await?;
            calls.push(async move {
                let r = actor
                    .call(
                        |reply| PersonMsg::Apply {
                            updates,
                            source_watermark,
                            reply,
                        },
                        Some(CALL_TIMEOUT),
                    )
                    .await;
                (person, success(r))
            });
        }
        let mut out = PersonOutput::default();
        for (person, result) in join_all(calls).await {
            match result {
                Some((o, deadline, accepted)) => {
                    self.counters.colocations += accepted;
                    out.extend(o);
                    if let Some(d) = deadline {
                        self.deadlines.push(d, person);
                    }
                }
                None => self.supervision.lost_batches += 1,
            }
        }
        let before = self.watermarks.min();
        self.watermarks.advance(batch.source, batch.watermark);
        let min = self.watermarks.min();
        if min > before {
            self.close_due(min, &mut out).await;
            self.passivate_idle(min).await;
        }
        self.emit(out).await;
        Ok(())
    }

    async fn close_due(&mut self, min: Micros, out: &mut PersonOutput) {
        let due = self.deadlines.due(min);
        let mut calls = Vec::new();
        for person in due {
            if let Some(actor) = self.actors.get(&person).cloned() {
                calls.push(async move {
                    let r = actor
                        .call(
                            |reply| PersonMsg::Close {
                                min_watermark: min,
                                reply,
                            },
                            Some(CALL_TIMEOUT),
                        )
                        .await;
                    (person, success(r))
                });
            } else if let Some(state) = self.passivated.get_mut(&person) {
                if let Some(next) = state.close(min, self.gap_us, out) {
                    self.deadlines.push(next, person);
                }
            }
        }
        for (person, result) in join_all(calls).await {
            match result {
                Some((o, next)) => {
                    out.extend(o);
                    if let Some(next) = next {
                        self.deadlines.push(next, person);
                    }
                }
                None => self.supervision.lost_batches += 1,
            }
        }
    }

    /// Stops the actors of persons idle since before `min - passivate_after` whose episodes
    /// are all closed, keeping their state to restart them on their next update.
    async fn passivate_idle(&mut self, min: Micros) {
        let horizon = min.saturating_sub(self.passivate_after_us);
        let idle: Vec<PersonId> = self
            .last_active
            .iter()
            .filter(|(_, &t)| t < horizon)
            .map(|(&p, _)| p)
            .collect();
        for person in idle {
            let Some(actor) = self.actors.get(&person).cloned() else {
                self.last_active.remove(&person);
                continue;
            };
            let Some(state) = success(actor.call(PersonMsg::Snapshot, Some(CALL_TIMEOUT)).await)
            else {
                continue;
            };
            if state.has_open_episodes() {
                continue;
            }
            self.last_active.remove(&person);
            self.actors.remove(&person);
            self.by_actor.remove(&actor.get_id());
            actor.stop(Some("passivated".into()));
            self.passivated.insert(person, state);
            self.counters.passivations += 1;
        }
    }

    async fn emit(&mut self, out: PersonOutput) {
        self.counters.changes += out.changes.len() as u64;
        self.counters.notifications += out.notifications.len() as u64;
        if !out.changes.is_empty() || !out.notifications.is_empty() {
            let sink = &self.connections;
            let partition = self.partition;
            let ((), retries) = retry("applying connection changes", partition, || {
                sink.apply(partition, &out.changes, &out.notifications)
            })
            .await;
            self.port_retries += retries;
        }
        if self.capture {
            self.captured.extend(out);
        }
    }

    async fn snapshot(&self) -> Result<SnapshotBlob, ActorProcessingErr> {
        let calls = self
            .actors
            .values()
            .map(|a| a.call(PersonMsg::Snapshot, Some(CALL_TIMEOUT)));
        let mut persons: Vec<PersonState> =
            Vec::with_capacity(self.actors.len() + self.passivated.len());
        for r in join_all(calls).await {
            persons.push(success(r).ok_or("a person actor did not answer the snapshot request")?);
        }
        persons.extend(self.passivated.values().cloned());
        persons.sort_by_key(PersonState::person);
        let snapshot = PersonPartitionSnapshot {
            partition: self.partition,
            watermarks: self.watermarks.clone(),
            deadlines: self.deadlines.clone(),
            persons,
            counters: self.counters,
        };
        Ok(SnapshotBlob {
            next_offset: self.next_offset,
            format: PERSON_SNAPSHOT_FORMAT,
            bytes: postcard::to_stdvec(&snapshot)?,
        })
    }
}

impl Actor for PersonSupervisor {
    type Msg = PersonSupervisorMsg;
    type State = PersonSupervisorState;
    type Arguments = PersonSupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = PersonSupervisorState {
            partition: args.partition,
            gap_us: i64::from(args.params.episode_gap_s) * MICROS_PER_S,
            passivate_after_us: i64::from(args.passivate_after_s) * MICROS_PER_S,
            capture: args.capture,
            connections: args.connections,
            watermarks: Watermarks::new(args.zone_partitions),
            deadlines: Deadlines::default(),
            actors: FxHashMap::default(),
            by_actor: FxHashMap::default(),
            last_active: FxHashMap::default(),
            passivated: FxHashMap::default(),
            counters: PersonSupervisorCounters::default(),
            supervision: SupervisionCounters::default(),
            next_offset: 0,
            port_retries: 0,
            captured: PersonOutput::default(),
        };
        if let Some(blob) = args.snapshot {
            if blob.format != PERSON_SNAPSHOT_FORMAT {
                return Err(format!(
                    "person snapshot format {} is not {}",
                    blob.format, PERSON_SNAPSHOT_FORMAT
                )
                .into());
            }
            let snapshot: PersonPartitionSnapshot = postcard::from_bytes(&blob.bytes)?;
            state.watermarks = snapshot.watermarks;
            state.deadlines = snapshot.deadlines;
            state.counters = snapshot.counters;
            state.next_offset = blob.next_offset;
            // Restored persons start passivated; their actors start on their next update.
            state.passivated = snapshot
                .persons
                .into_iter()
                .map(|p| (p.person(), p))
                .collect();
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PersonSupervisorMsg::Batch {
                batch,
                next_offset,
                permit,
                done,
            } => {
                state.process(&myself, batch).await?;
                state.next_offset = next_offset;
                drop(permit);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            PersonSupervisorMsg::Flush(reply) => {
                let _ = reply.send(());
            }
            PersonSupervisorMsg::Snapshot(reply) => {
                let blob = state.snapshot().await?;
                let _ = reply.send(blob);
            }
            PersonSupervisorMsg::View(reply) => {
                let _ = reply.send(PersonPartitionView {
                    partition: state.partition,
                    watermarks: state.watermarks.all().to_vec(),
                    next_offset: state.next_offset,
                    active_persons: state.actors.len(),
                    passivated_persons: state.passivated.len(),
                    counters: state.counters,
                    supervision: state.supervision,
                    port_retries: state.port_retries,
                });
            }
            PersonSupervisorMsg::Person { person, reply } => {
                let view = if let Some(actor) = state.actors.get(&person) {
                    success(actor.call(PersonMsg::View, Some(CALL_TIMEOUT)).await)
                } else {
                    state.passivated.get(&person).map(|s| person_view(s, true))
                };
                let _ = reply.send(view);
            }
            PersonSupervisorMsg::TakeCaptured(reply) => {
                let _ = reply.send(std::mem::take(&mut state.captured));
            }
            PersonSupervisorMsg::CrashPerson(person) => {
                if let Some(actor) = state.actors.get(&person) {
                    let _ = actor.cast(PersonMsg::Crash);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                let Some(person) = state.by_actor.remove(&cell.get_id()) else {
                    return Ok(());
                };
                state.supervision.panics += 1;
                state.actors.remove(&person);
                tracing::error!(partition = state.partition, person, %error, "person actor failed, restarting it empty");
                state.supervision.lost_batches += 1;
                state.spawn(&myself, PersonState::new(person)).await?;
                state.supervision.restarts += 1;
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(person) = state.by_actor.remove(&cell.get_id()) {
                    state.actors.remove(&person);
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for actor in state.actors.values() {
            actor.stop(None);
        }
        Ok(())
    }
}
