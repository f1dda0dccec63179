//! Stage two: `PersonSupervisor` (one per person partition) and `PersonActor` (one per
//! person, passivated when idle).
//!
//! The supervisor groups a batch's updates by person, lets the persons' actors work in
//! parallel, then advances the source's watermark and asks the persons whose deadlines the
//! minimum watermark passed to close episodes. Notifications go to the [`ConnectionSink`]
//! before the next batch is taken. Episode changes wait up to [`CHANGES_FLUSH_INTERVAL`] (less
//! when persons due together are asked in waves: see [`WAVE`]) and are written together (many
//! changes to one episode become one row write) by the partition's writer task, in order,
//! while the supervisor goes on; a snapshot is finished only once the changes it covers are
//! stored.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedSemaphorePermit;

use crate::actors::ports::{
    retry, CapturedSnapshot, ConnectionSink, PendingSnapshot, SnapshotBlob,
};
use crate::actors::supervision::{
    flag_unfinished, restore_header, restore_parts, Child, Children, PartPerChild,
};
use crate::actors::{Answer, Answers, SupervisionCounters, Writer};
use crate::domain::{Micros, PersonId, MICROS_PER_S};
use crate::episodes::{
    Deadlines, EpisodeRules, OpenEpisode, PassivatedPerson, PersonCounters, PersonState, Sighting,
    Watermarks,
};
use crate::messages::{
    updates_at, EpisodeChange, PersonBatch, PersonOutput, PersonRun, PersonRuns, PersonSet,
    PersonUpdate,
};
use crate::params::EngineParams;
use crate::zones::ZoneId;

/// How long the supervisor waits for a person actor's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Snapshot format of a person partition: postcard of [`PersonPartitionSnapshot`], and of a
/// [`PersonState`] per part (keyed by person id).
pub const PERSON_SNAPSHOT_FORMAT: u32 = 4;
/// How long episode changes may wait before they are written to the sink (history queries
/// see an episode's changes up to this much later than its notifications).
pub const CHANGES_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Flushes of episode changes queued in front of the writer before the supervisor waits
/// (backpressure when the store is slow or away).
const WRITER_QUEUE: usize = 4;
/// Most episode changes the writer stores in one write.
const MAX_CHANGES_PER_WRITE: usize = 100_000;

/// Person actors asked at once when more are due together (closing episodes, passivating):
/// when the watermark jumps, every person may be due, and their outputs, gathered all at once
/// and then joined, were hundreds of MB of fresh memory (docs/benchmarks.md). With more than
/// one wave due, the outputs are emitted after each wave.
pub const WAVE: usize = 2_048;

/// A person actor: its partition's configuration, shared (8 bytes in each actor's task, where
/// a copy took 24); its state is a [`PersonState`].
pub struct PersonActor(Arc<PersonConfig>);

/// What every person actor of a partition works with.
struct PersonConfig {
    rules: EpisodeRules,
    /// Keep accepted co-locations in the outputs (tests).
    capture: bool,
}

/// Messages of a person actor.
pub enum PersonMsg {
    /// The person's updates in a batch from zone partition `source`: `batch.updates[i]` for
    /// each `i` of `order[run]`, in that order (the batch and the order are shared by every
    /// person of the batch, so no update is copied per person). The watermark this partition
    /// has seen from `source` is `source_watermark` (the minimum over all sources:
    /// `min_watermark`). Replies with the output, the earliest deadline of an episode it
    /// opened, reopened or closed, and how many co-locations were accepted.
    Apply {
        batch: Arc<PersonBatch>,
        order: Arc<Vec<u32>>,
        run: std::ops::Range<u32>,
        source_watermark: Micros,
        min_watermark: Micros,
        reply: Answer<(PersonOutput, Option<Micros>, u64)>,
    },
    /// Close what `min_watermark` allows; replies with the output and the next deadline.
    Close {
        min_watermark: Micros,
        reply: Answer<(PersonOutput, Option<Micros>)>,
    },
    View(RpcReplyPort<PersonView>),
    /// Hands the state over (snapshots).
    Snapshot(RpcReplyPort<PersonState>),
    /// Packs the state for passivation: the packed bytes, or `None` while an episode is still
    /// open. The actor keeps its state; the caller stops it. (Packing here spares sending a
    /// copy of the whole state to the supervisor, which touched as much fresh memory again.)
    Passivate(RpcReplyPort<Option<PassivatedPerson>>),
    /// Forgets the episodes with these persons as the peer ([`PersonState::forget_peers`]);
    /// replies whether any was held.
    ForgetPeers {
        persons: PersonSet,
        reply: RpcReplyPort<bool>,
    },
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

    /// Handles `msg` at once and returns a ready future: nothing here awaits, and an `async`
    /// body would keep the message (72 bytes) and its own arguments in every person actor's
    /// task for as long as the actor lives (docs/benchmarks.md, "Person actors").
    fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> impl std::future::Future<Output = Result<(), ActorProcessingErr>> + Send {
        self.handle_now(msg, state);
        std::future::ready(Ok(()))
    }
}

impl PersonActor {
    /// What [`Actor::handle`] does with `msg`, synchronously.
    fn handle_now(&self, msg: PersonMsg, state: &mut PersonState) {
        match msg {
            PersonMsg::Apply {
                batch,
                order,
                run,
                source_watermark,
                min_watermark,
                reply,
            } => {
                let mut out = PersonOutput::default();
                let mut deadline: Option<Micros> = None;
                let before = state.counters().colocations;
                let run = &order[run.start as usize..run.end as usize];
                for u in updates_at(&batch.updates, run) {
                    match u {
                        PersonUpdate::Sighting { event, zone } => state.sighting(event, *zone),
                        PersonUpdate::Colocations(c) | PersonUpdate::LateColocations(c) => {
                            if let Some(d) = state.colocation(
                                c,
                                matches!(u, PersonUpdate::LateColocations(_)),
                                source_watermark,
                                min_watermark,
                                &self.0.rules,
                                &mut out,
                                self.0.capture,
                            ) {
                                deadline = Some(deadline.map_or(d, |x: Micros| x.min(d)));
                            }
                        }
                    }
                }
                state.flush(&mut out);
                let accepted = state.counters().colocations - before;
                reply.send((out, deadline, accepted));
            }
            PersonMsg::Close {
                min_watermark,
                reply,
            } => {
                let mut out = PersonOutput::default();
                let next = state.close(min_watermark, &self.0.rules, &mut out);
                reply.send((out, next));
            }
            PersonMsg::View(reply) => {
                let _ = reply.send(person_view(state, false));
            }
            PersonMsg::Snapshot(reply) => {
                let _ = reply.send(state.clone());
            }
            PersonMsg::Passivate(reply) => {
                let packed = (!state.has_open_episodes()).then(|| PassivatedPerson::pack(state));
                let _ = reply.send(packed);
            }
            PersonMsg::ForgetPeers { persons, reply } => {
                let _ = reply.send(state.forget_peers(&persons));
            }
            PersonMsg::Crash => panic!("person actor asked to crash"),
        }
    }
}

impl Child for PersonActor {
    type Key = PersonId;
    type Part = PersonState;
    /// Event time of the person's latest update (µs since the Unix epoch), for passivation.
    type Note = Micros;
    const KIND: &'static str = "person";
    const CALL_TIMEOUT: Duration = CALL_TIMEOUT;

    fn key(state: &PersonState) -> PersonId {
        state.person()
    }

    fn snapshot_request(reply: RpcReplyPort<PersonState>) -> PersonMsg {
        PersonMsg::Snapshot(reply)
    }

    fn crash_request() -> PersonMsg {
        PersonMsg::Crash
    }

    fn log_restart(partition: u32, person: PersonId, error: &ActorProcessingErr) {
        tracing::error!(partition, person, %error, "person actor failed, restarting it empty");
    }
}

impl PartPerChild for PersonActor {
    fn part_key(state: &PersonState) -> PersonId {
        state.person()
    }

    fn stored_key(person: PersonId) -> i64 {
        person
    }
}

/// The partition-wide state of a person partition's snapshot (each person's state is a part
/// of its own, stored only when it changed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersonPartitionSnapshot {
    pub partition: u32,
    pub watermarks: Watermarks,
    pub deadlines: Deadlines,
    pub counters: PersonSupervisorCounters,
}

/// Decodes a stored person partition's snapshot: its partition-wide state and every person's
/// state, in the snapshot's order. Errors, never panics, whatever the bytes: another format, a
/// header or part that does not decode (postcard), or a part filed under another person than it
/// holds.
pub fn decode_person_snapshot(
    blob: &SnapshotBlob,
) -> Result<(PersonPartitionSnapshot, Vec<PersonState>), ActorProcessingErr> {
    let header = restore_header::<PersonActor, _>(blob, PERSON_SNAPSHOT_FORMAT)?;
    let persons = restore_parts::<PersonActor>(blob).collect::<Result<Vec<_>, _>>()?;
    Ok((header, persons))
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
    /// Person actors asked at once when more are due ([`WAVE`] in the service; 0 counts as 1).
    /// A smaller wave holds less at once and publishes a batch's notifications in more calls.
    pub wave: usize,
}

/// A person supervisor's state.
pub struct PersonSupervisorState {
    partition: u32,
    /// Shared with its person actors.
    config: Arc<PersonConfig>,
    passivate_after_us: Micros,
    connections: Arc<dyn ConnectionSink>,
    watermarks: Watermarks,
    deadlines: Deadlines,
    /// The active persons' actors, each with the event time of its latest update, and their
    /// panics and restarts.
    actors: Children<PersonActor>,
    /// A batch's updates grouped per person (kept between batches, for its room).
    runs: PersonRuns,
    /// Person actors asked at once when more are due ([`WAVE`]).
    wave: usize,
    /// Idle persons' states, packed.
    passivated: FxHashMap<PersonId, PassivatedPerson>,
    counters: PersonSupervisorCounters,
    next_offset: u64,
    port_retries: u64,
    captured: PersonOutput,
    /// Episode changes not handed to the writer yet, in order, as the emissions made them
    /// (kept apart, not joined: a list grown emission by emission took fresh memory at each
    /// doubling, a tenth of engine-bench's profile with the kernel clearing it), and whether a
    /// flush is scheduled.
    pending_changes: Vec<Vec<EpisodeChange>>,
    flush_scheduled: bool,
    /// Stores episode changes (`connection`), in order.
    writer: Writer<EpisodeChange>,
    /// Persons whose state may have changed since the last snapshot, and whether the next
    /// snapshot must hold every person (nothing stored yet to build on).
    changed: FxHashSet<PersonId>,
    complete_next: bool,
    /// Set when a snapshot whose changes were already taken was not finished (it failed, or
    /// its caller dropped it): the next one must then hold every person.
    snapshot_failed: Arc<std::sync::atomic::AtomicBool>,
}

/// Messages of a person supervisor.
pub enum PersonSupervisorMsg {
    /// The next batches of the partition, in input order (one per input record);
    /// `next_offset` is the input offset after the last.
    Batch {
        batches: Vec<Arc<PersonBatch>>,
        next_offset: u64,
        permit: Option<OwnedSemaphorePermit>,
        done: Option<RpcReplyPort<()>>,
    },
    /// Writes the pending episode changes; replies once every earlier message is processed.
    Flush(RpcReplyPort<()>),
    /// Writes the pending episode changes (scheduled [`CHANGES_FLUSH_INTERVAL`] after the
    /// first of them).
    FlushChanges,
    /// Captures a snapshot; it is finished in the background (see [`PendingSnapshot`]).
    Snapshot {
        /// Every person's state, rather than those that changed since the previous snapshot
        /// (a snapshot that must restore on its own).
        complete: bool,
        reply: RpcReplyPort<PendingSnapshot>,
    },
    View(RpcReplyPort<PersonPartitionView>),
    Person {
        person: PersonId,
        reply: RpcReplyPort<Option<PersonView>>,
    },
    /// Hands over what was captured so far (tests).
    TakeCaptured(RpcReplyPort<PersonOutput>),
    /// Erasure: drops the state of `persons` (their actors stopped, passivated states
    /// removed), forgets their episodes in every other person's state, drops the pending
    /// episode changes that involve them, and replies once every earlier change is stored (so
    /// that none about them is written after the reply). The next snapshot then holds every
    /// person, rewritten without them. Replies with how many persons' states held a trace of
    /// them, or why it failed (a person actor did not answer: retry).
    Forget {
        persons: PersonSet,
        reply: RpcReplyPort<Result<u64, String>>,
    },
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
            Some(packed) => {
                self.counters.activations += 1;
                packed.unpack()
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
        let actor = PersonActor(Arc::clone(&self.config));
        self.actors.spawn(actor, state, myself.get_cell()).await
    }

    /// Applies one batch, adding the outputs of the persons it reached to `out` (one part
    /// per person, joined once by [`PersonOutput::concat`]).
    async fn process(
        &mut self,
        myself: &ActorRef<PersonSupervisorMsg>,
        batch: &Arc<PersonBatch>,
        out: &mut Vec<PersonOutput>,
    ) -> Result<(), ActorProcessingErr> {
        self.counters.batches += 1;
        self.counters.updates += batch.updates.len() as u64;
        let source_watermark = self.watermarks.of(batch.source);
        let min_watermark = self.watermarks.min();
        // Each person actor reads its own updates from the batch, through one order of the
        // batch's indices that puts each person's together ([`PersonRuns`]): moving each
        // person's updates into a vector of their own wrote every 136-byte update once more
        // and made a vector per person per batch.
        self.runs.group(&batch.updates);
        let order = Arc::new(self.runs.in_person_order());
        let runs: Vec<PersonRun> = self.runs.runs().to_vec();
        let mut answers = Answers::new(runs.len());
        let mut at = 0;
        for &PersonRun {
            person,
            len,
            latest,
        } in &runs
        {
            let run = at..at + len;
            at += len;
            let (batch, order) = (Arc::clone(batch), Arc::clone(&order));
            self.changed.insert(person);
            let actor = self.actor(myself, person).await?;
            if let Some(active) = self.actors.note_mut(&person) {
                *active = (*active).max(latest);
            }
            // Not delivered (the actor stopped): the message and its answer are dropped, and
            // the slot stays empty.
            let _ = actor.send_message(PersonMsg::Apply {
                batch,
                order,
                run,
                source_watermark,
                min_watermark,
                reply: answers.answer(),
            });
        }
        let results = answers.gather(CALL_TIMEOUT).await;
        for (person, result) in runs.iter().map(|r| r.person).zip(results) {
            match result {
                Some((o, deadline, accepted)) => {
                    self.counters.colocations += accepted;
                    out.push(o);
                    if let Some(d) = deadline {
                        self.deadlines.push(d, person);
                    }
                }
                None => self.actors.lost_batch(),
            }
        }
        let before = self.watermarks.min();
        self.watermarks.advance(batch.source, batch.watermark);
        let min = self.watermarks.min();
        if min > before {
            self.close_due(myself, min, out).await;
            self.passivate_idle(min).await;
        }
        Ok(())
    }

    /// Closes what `min` allows for the persons due, a wave of them at a time ([`WAVE`]),
    /// adding their outputs to `out`; when more than one wave is due, emits `out` after each
    /// (in order, what the batch gathered before included: notifications published, changes
    /// handed to the writer, the supervisor waiting for room in its queue).
    async fn close_due(
        &mut self,
        myself: &ActorRef<PersonSupervisorMsg>,
        min: Micros,
        out: &mut Vec<PersonOutput>,
    ) {
        let due = self.deadlines.due(min);
        let waves = due.len() > self.wave;
        for wave in due.chunks(self.wave) {
            let mut active = Vec::with_capacity(wave.len());
            for &person in wave {
                self.changed.insert(person);
                if let Some(actor) = self.actors.get(&person).cloned() {
                    active.push((person, actor));
                } else if let Some(packed) = self.passivated.get_mut(&person) {
                    let mut state = packed.unpack();
                    let mut closed = PersonOutput::default();
                    if let Some(next) = state.close(min, &self.config.rules, &mut closed) {
                        self.deadlines.push(next, person);
                    }
                    *packed = PassivatedPerson::pack(&state);
                    out.push(closed);
                }
            }
            let mut answers = Answers::new(active.len());
            for (_, actor) in &active {
                let _ = actor.send_message(PersonMsg::Close {
                    min_watermark: min,
                    reply: answers.answer(),
                });
            }
            let results = answers.gather(CALL_TIMEOUT).await;
            for ((person, _), result) in active.into_iter().zip(results) {
                match result {
                    Some((o, next)) => {
                        out.push(o);
                        if let Some(next) = next {
                            self.deadlines.push(next, person);
                        }
                    }
                    None => self.actors.lost_batch(),
                }
            }
            if waves {
                let parts = std::mem::take(out);
                self.emit(myself, PersonOutput::concat(parts)).await;
                // The changes too: left pending, every wave's would wait for the end of the
                // batch message, all together.
                self.flush_changes().await;
            }
        }
    }

    /// Stops the actors of persons idle since before `min - passivate_after` whose episodes
    /// are all closed, keeping their state to restart them on their next update.
    async fn passivate_idle(&mut self, min: Micros) {
        let horizon = min.saturating_sub(self.passivate_after_us);
        let idle: Vec<PersonId> = self
            .actors
            .notes()
            .filter(|(_, &t)| t < horizon)
            .map(|(&p, _)| p)
            .collect();
        for wave in idle.chunks(self.wave) {
            let calls: Vec<_> = wave
                .iter()
                .filter_map(|&person| {
                    let actor = self.actors.get(&person)?.clone();
                    Some(async move {
                        let r = actor.call(PersonMsg::Passivate, Some(CALL_TIMEOUT)).await;
                        (person, success(r).flatten())
                    })
                })
                .collect();
            for (person, packed) in join_all(calls).await {
                // `None`: an episode is open, or the actor did not answer (kept active).
                let Some(packed) = packed else { continue };
                self.actors.stop(person, "passivated");
                self.passivated.insert(person, packed);
                self.counters.passivations += 1;
            }
        }
    }

    /// Publishes the notifications now and queues the changes, scheduling their write.
    async fn emit(&mut self, myself: &ActorRef<PersonSupervisorMsg>, out: PersonOutput) {
        if self.config.capture {
            self.captured.extend(out.clone());
        }
        self.counters.changes += out.changes.len() as u64;
        self.counters.notifications += out.notifications.len() as u64;
        if !out.notifications.is_empty() {
            let sink = &self.connections;
            let partition = self.partition;
            let ((), retries) = retry("publishing notifications", partition, || {
                sink.publish(partition, &out.notifications)
            })
            .await;
            self.port_retries += retries;
        }
        if !out.changes.is_empty() {
            if self.pending_changes.is_empty() && !self.flush_scheduled {
                self.flush_scheduled = true;
                myself.send_after(CHANGES_FLUSH_INTERVAL, || PersonSupervisorMsg::FlushChanges);
            }
            // Moved: the captured copy above, in tests, is the only clone.
            self.pending_changes.push(out.changes);
        }
    }

    /// Hands the pending episode changes to the writer (waiting for room in its queue).
    async fn flush_changes(&mut self) {
        if self.pending_changes.is_empty() {
            return;
        }
        let changes = std::mem::take(&mut self.pending_changes);
        if !self.writer.write_parts(changes).await {
            tracing::error!(partition = self.partition, "the episode writer is gone");
        }
    }

    /// Hands the pending changes to the writer; the receiver resolves once every change so
    /// far is stored.
    async fn stored_so_far(&mut self) -> tokio::sync::oneshot::Receiver<()> {
        self.flush_changes().await;
        self.writer.stored_so_far().await
    }

    /// See [`PersonSupervisorMsg::Forget`].
    async fn forget(&mut self, persons: &PersonSet) -> Result<u64, ActorProcessingErr> {
        let involves = |c: &EpisodeChange| {
            persons.contains(&c.episode.person) || persons.contains(&c.episode.peer)
        };
        for part in &mut self.pending_changes {
            part.retain(|c| !involves(c));
        }
        self.pending_changes.retain(|part| !part.is_empty());
        let _ = self.stored_so_far().await.await;
        let mut touched = 0u64;
        for &person in persons.iter() {
            let active = self.actors.get(&person).is_some();
            if active {
                self.actors.stop(person, "erased");
            }
            let passivated = self.passivated.remove(&person).is_some();
            self.changed.remove(&person);
            touched += u64::from(active || passivated);
        }
        for packed in self.passivated.values_mut() {
            let mut state = packed.unpack();
            if state.forget_peers(persons) {
                *packed = PassivatedPerson::pack(&state);
                touched += 1;
            }
        }
        let calls = self.actors.actors().cloned().map(|actor| {
            let persons = Arc::clone(persons);
            async move {
                actor
                    .call(
                        |reply| PersonMsg::ForgetPeers { persons, reply },
                        Some(CALL_TIMEOUT),
                    )
                    .await
            }
        });
        let mut failed = 0;
        for result in join_all(calls).await {
            match success(result) {
                Some(held) => touched += u64::from(held),
                None => failed += 1,
            }
        }
        if touched > 0 {
            self.complete_next = true;
        }
        if self.config.capture {
            self.captured.changes.retain(|c| !involves(c));
        }
        if failed > 0 {
            self.actors.lost_batch();
            return Err(format!("{failed} person actors did not answer the erasure").into());
        }
        Ok(touched)
    }

    /// Captures the partition's state (every person's when `complete`, else those that
    /// changed since the last snapshot); it is serialized in the background once the episode
    /// changes it covers are stored.
    async fn snapshot(&mut self, complete: bool) -> Result<PendingSnapshot, ActorProcessingErr> {
        let stored = self.stored_so_far().await;
        let failed_before = self
            .snapshot_failed
            .swap(false, std::sync::atomic::Ordering::AcqRel);
        let complete = complete || self.complete_next || failed_before;
        let mut wanted: Vec<PersonId> = if complete {
            self.actors
                .keys()
                .chain(self.passivated.keys())
                .copied()
                .collect()
        } else {
            self.changed.iter().copied().collect()
        };
        wanted.sort_unstable();
        let mut active: FxHashMap<PersonId, PersonState> = self
            .actors
            .states(wanted.iter().copied())
            .await?
            .into_iter()
            .collect();
        let parts = wanted
            .iter()
            .filter_map(|p| {
                let state = active
                    .remove(p)
                    .or_else(|| self.passivated.get(p).map(PassivatedPerson::unpack));
                state.map(|s| (*p, Some(s)))
            })
            .collect();
        self.changed.clear();
        self.complete_next = false;
        let header = PersonPartitionSnapshot {
            partition: self.partition,
            watermarks: self.watermarks.clone(),
            deadlines: self.deadlines.clone(),
            counters: self.counters,
        };
        let pending = PendingSnapshot::serialize(
            CapturedSnapshot {
                header,
                parts,
                complete,
                next_offset: self.next_offset,
                format: PERSON_SNAPSHOT_FORMAT,
            },
            Some(stored),
        );
        // The changes it holds were taken from `changed`: if it is not finished, the next
        // snapshot holds everyone.
        Ok(flag_unfinished(pending, &self.snapshot_failed))
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
        let (sink, partition) = (Arc::clone(&args.connections), args.partition);
        let writer = Writer::spawn(
            partition,
            "storing episode changes",
            WRITER_QUEUE,
            MAX_CHANGES_PER_WRITE,
            Box::new(move |changes| {
                let sink = Arc::clone(&sink);
                Box::pin(async move { sink.store(partition, changes).await })
            }),
        );
        let mut state = PersonSupervisorState {
            partition: args.partition,
            config: Arc::new(PersonConfig {
                rules: EpisodeRules::of(&args.params),
                capture: args.capture,
            }),
            passivate_after_us: i64::from(args.passivate_after_s) * MICROS_PER_S,
            connections: args.connections,
            watermarks: Watermarks::new(args.zone_partitions),
            deadlines: Deadlines::default(),
            actors: Children::new(),
            runs: PersonRuns::default(),
            wave: args.wave.max(1),
            passivated: FxHashMap::default(),
            counters: PersonSupervisorCounters::default(),
            next_offset: 0,
            port_retries: 0,
            captured: PersonOutput::default(),
            pending_changes: Vec::new(),
            flush_scheduled: false,
            writer,
            changed: FxHashSet::default(),
            complete_next: true,
            snapshot_failed: Arc::default(),
        };
        if let Some(blob) = args.snapshot {
            let (snapshot, persons) = decode_person_snapshot(&blob)?;
            state.watermarks = snapshot.watermarks;
            state.deadlines = snapshot.deadlines;
            state.counters = snapshot.counters;
            state.next_offset = blob.next_offset;
            // Restored persons start passivated; their actors start on their next update.
            for restored in persons {
                state
                    .passivated
                    .insert(restored.person(), PassivatedPerson::pack(&restored));
            }
            // The stored parts are this snapshot's: the next one may build on them.
            state.complete_next = false;
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
                batches,
                next_offset,
                permit,
                done,
            } => {
                let mut out = Vec::new();
                for batch in &batches {
                    state.process(&myself, batch, &mut out).await?;
                }
                state.emit(&myself, PersonOutput::concat(out)).await;
                state.next_offset = next_offset;
                drop(permit);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            PersonSupervisorMsg::Flush(reply) => {
                let stored = state.stored_so_far().await;
                let _ = stored.await;
                let _ = reply.send(());
            }
            PersonSupervisorMsg::FlushChanges => {
                state.flush_scheduled = false;
                state.flush_changes().await;
            }
            PersonSupervisorMsg::Snapshot { complete, reply } => {
                let pending = state.snapshot(complete).await?;
                let _ = reply.send(pending);
            }
            PersonSupervisorMsg::View(reply) => {
                let _ = reply.send(PersonPartitionView {
                    partition: state.partition,
                    watermarks: state.watermarks.all().to_vec(),
                    next_offset: state.next_offset,
                    active_persons: state.actors.len(),
                    passivated_persons: state.passivated.len(),
                    counters: state.counters,
                    supervision: state.actors.supervision(),
                    port_retries: state.port_retries + state.writer.retries(),
                });
            }
            PersonSupervisorMsg::Person { person, reply } => {
                let view = if let Some(actor) = state.actors.get(&person) {
                    success(actor.call(PersonMsg::View, Some(CALL_TIMEOUT)).await)
                } else {
                    state
                        .passivated
                        .get(&person)
                        .map(|s| person_view(&s.unpack(), true))
                };
                let _ = reply.send(view);
            }
            PersonSupervisorMsg::TakeCaptured(reply) => {
                let _ = reply.send(std::mem::take(&mut state.captured));
            }
            PersonSupervisorMsg::Forget { persons, reply } => {
                // An error is the caller's to retry; the supervisor goes on.
                let result = state.forget(&persons).await;
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            PersonSupervisorMsg::CrashPerson(person) => state.actors.crash(person),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A failed person actor restarts with an empty state, which the next snapshot, even an
        // incremental one, must hold: the person counts as changed.
        let (config, changed) = (&state.config, &mut state.changed);
        state
            .actors
            .supervise(event, state.partition, myself.get_cell(), |person| {
                changed.insert(person);
                (PersonActor(Arc::clone(config)), PersonState::new(person))
            })
            .await
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.actors.stop_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parent that keeps person actors as the person supervisor does (with [`Children`]),
    /// to watch what ractor's supervision events do to them.
    struct Parent(Arc<PersonConfig>);

    /// The live children with their notes (ascending), how many stopped children were not
    /// heard to terminate yet, and the supervision counters.
    type Look = (Vec<(PersonId, Micros)>, usize, SupervisionCounters);

    enum ParentMsg {
        Spawn(PersonId, Micros, RpcReplyPort<()>),
        Stop(PersonId),
        Crash(PersonId),
        Look(RpcReplyPort<Look>),
    }

    impl Actor for Parent {
        type Msg = ParentMsg;
        type State = Children<PersonActor>;
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<ParentMsg>,
            _args: (),
        ) -> Result<Children<PersonActor>, ActorProcessingErr> {
            Ok(Children::new())
        }

        async fn handle(
            &self,
            myself: ActorRef<ParentMsg>,
            msg: ParentMsg,
            children: &mut Children<PersonActor>,
        ) -> Result<(), ActorProcessingErr> {
            match msg {
                ParentMsg::Spawn(person, note, reply) => {
                    let actor = PersonActor(Arc::clone(&self.0));
                    children
                        .spawn(actor, PersonState::new(person), myself.get_cell())
                        .await?;
                    *children.note_mut(&person).expect("just spawned") = note;
                    let _ = reply.send(());
                }
                ParentMsg::Stop(person) => children.stop(person, "test"),
                ParentMsg::Crash(person) => children.crash(person),
                ParentMsg::Look(reply) => {
                    let mut live: Vec<(PersonId, Micros)> =
                        children.notes().map(|(&p, &t)| (p, t)).collect();
                    live.sort_unstable();
                    let _ = reply.send((live, children.stopping(), children.supervision()));
                }
            }
            Ok(())
        }

        async fn handle_supervisor_evt(
            &self,
            myself: ActorRef<ParentMsg>,
            event: SupervisionEvent,
            children: &mut Children<PersonActor>,
        ) -> Result<(), ActorProcessingErr> {
            let config = Arc::clone(&self.0);
            children
                .supervise(event, 0, myself.get_cell(), |person| {
                    (PersonActor(config), PersonState::new(person))
                })
                .await
        }
    }

    /// What the parent says once `done` holds of it (asked every 10 ms, for up to 5 s).
    async fn look_until(parent: &ActorRef<ParentMsg>, done: impl Fn(&Look) -> bool) -> Look {
        for _ in 0..500 {
            let look = parent.call(ParentMsg::Look, None).await.expect("answers");
            let ractor::rpc::CallResult::Success(look) = look else {
                panic!("the parent did not answer");
            };
            if done(&look) {
                return look;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the parent never got there");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopped_children_are_forgotten_when_heard_and_a_failed_one_restarts_with_its_note() {
        let config = Arc::new(PersonConfig {
            rules: EpisodeRules::of(&EngineParams::default()),
            capture: false,
        });
        let (parent, task) = Actor::spawn(None, Parent(config), ())
            .await
            .expect("spawns");
        for person in 1..=20 {
            parent
                .call(|r| ParentMsg::Spawn(person, person * 10, r), None)
                .await
                .expect("spawned");
        }
        for person in 1..=10 {
            parent.cast(ParentMsg::Stop(person)).expect("sent");
        }
        // Every stopped child's termination is heard: none stays listed as stopping.
        let (live, stopping, counters) =
            look_until(&parent, |(_, stopping, _)| *stopping == 0).await;
        let expected: Vec<(PersonId, Micros)> = (11..=20).map(|p| (p, p * 10)).collect();
        assert_eq!((live, stopping), (expected.clone(), 0));
        assert_eq!(
            counters,
            SupervisionCounters::default(),
            "a stop is not a failure"
        );

        // A child that panics is found among the live ones, counted and restarted under its
        // key with its note.
        parent.cast(ParentMsg::Crash(15)).expect("sent");
        let (live, stopping, counters) = look_until(&parent, |(_, _, c)| c.restarts == 1).await;
        assert_eq!((live, stopping), (expected, 0));
        assert_eq!((counters.panics, counters.lost_batches), (1, 1));

        parent.stop(None);
        let _ = task.await;
    }
}
