//! What the zone and person supervisors share about their children (one actor per zone, one
//! per person): [`Children`] keeps them by key, restarts one that panicked (empty: what it held
//! is lost until the partition replays from its last snapshot), counts panics, restarts and
//! lost batches, asks them for their states when a snapshot is captured and stops them with
//! their supervisor; [`restore_header`] and [`restore_parts`] read a partition snapshot back.
//!
//! Where the two supervisors differ on purpose the difference is a parameter: which children a
//! snapshot asks ([`Children::states`]), what a restarted child starts with
//! ([`Children::supervise`]) and how a failure is logged ([`Child::log_restart`]).

use std::fmt::Display;
use std::hash::Hash;
use std::time::Duration;

use futures::future::join_all;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::de::DeserializeOwned;

use crate::actors::ports::{PendingSnapshot, SnapshotBlob};
use crate::actors::SupervisionCounters;

/// Marks an incremental snapshot as not finished when dropped while still holding the flag.
struct Unfinished(Option<std::sync::Arc<std::sync::atomic::AtomicBool>>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// `pending`, setting `failed` if it is not finished (it fails, or it is dropped because its
/// caller gave up waiting): the changes it took are then in no stored snapshot, and the
/// supervisor's next snapshot must hold everything.
pub(crate) fn flag_unfinished(
    pending: PendingSnapshot,
    failed: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> PendingSnapshot {
    let mut unfinished = Unfinished(Some(std::sync::Arc::clone(failed)));
    PendingSnapshot(Box::pin(async move {
        let result = pending.wait().await;
        if result.is_ok() {
            unfinished.0 = None;
        }
        drop(unfinished);
        result
    }))
}

/// A kind of child actor of a partition's supervisor (the zone actor, the person actor): one
/// per key, its state handed over when a snapshot is captured.
pub(crate) trait Child: Actor {
    /// What the supervisor knows a child by (zone id, person id).
    type Key: Copy + Eq + Hash + Ord + Display + Send + Sync + 'static;
    /// A child's state as a snapshot part holds it ([`crate::zone_index::ZoneIndex`],
    /// [`crate::episodes::PersonState`]).
    type Part: DeserializeOwned + Send + 'static;
    /// What the supervisor keeps beside each live child (the person supervisor: the event time
    /// of the person's latest update, for passivation).
    type Note: Copy + Default + Send + Sync + 'static;
    /// The kind's name in errors ("zone", "person").
    const KIND: &'static str;
    /// How long the supervisor waits for a child's answer.
    const CALL_TIMEOUT: Duration;

    /// The key of the child started with `args`.
    fn key(args: &Self::Arguments) -> Self::Key;
    /// The request for a child's state, answered on `reply`.
    fn snapshot_request(reply: RpcReplyPort<Self::Part>) -> Self::Msg;
    /// The message that makes a child panic (tests of the restart path).
    fn crash_request() -> Self::Msg;
    /// Logs that the child of `key` in partition `partition` failed with `error` and is
    /// restarted empty.
    // One function per kind rather than a shared line: the key's log field is named after the
    // kind (`zone`, `person`), and tracing's field names are fixed at compile time.
    fn log_restart(partition: u32, key: Self::Key, error: &ActorProcessingErr);
}

/// A kind of child whose state is one part of its partition's snapshot, keyed by the child (the
/// person actor; a zone partition stores its points by slice instead).
pub(crate) trait PartPerChild: Child {
    /// The key of the child a snapshot part belongs to.
    fn part_key(part: &Self::Part) -> Self::Key;
    /// `key` as a snapshot stores it (see [`SnapshotBlob::parts`]).
    fn stored_key(key: Self::Key) -> i64;
}

/// A live child and what its supervisor keeps beside it.
struct Live<C: Child> {
    actor: ActorRef<C::Msg>,
    note: C::Note,
}

/// A supervisor's live children by key, with the counts of their panics, restarts and lost
/// batches.
///
/// There is no map from actor to key (it cost 22 bytes per active person): a supervision
/// event about a child this supervisor stopped on purpose is recognized by its pid in
/// `stopping`, held only until that event arrives; any other event (a panic, an unexpected
/// stop: rare) finds its child by a scan of the live children.
pub(crate) struct Children<C: Child> {
    by_key: FxHashMap<C::Key, Live<C>>,
    /// Local pids of children stopped by [`Children::stop`] whose termination has not been
    /// heard yet (children are spawned in this process, so their pids are unique here).
    stopping: FxHashSet<u64>,
    supervision: SupervisionCounters,
}

impl<C: Child> Children<C> {
    /// No children, nothing counted.
    pub(crate) fn new() -> Self {
        Self {
            by_key: FxHashMap::default(),
            stopping: FxHashSet::default(),
            supervision: SupervisionCounters::default(),
        }
    }

    /// The live child of `key`, if any.
    pub(crate) fn get(&self, key: &C::Key) -> Option<&ActorRef<C::Msg>> {
        self.by_key.get(key).map(|live| &live.actor)
    }

    /// The note kept beside the live child of `key`, if any, to change.
    pub(crate) fn note_mut(&mut self, key: &C::Key) -> Option<&mut C::Note> {
        self.by_key.get_mut(key).map(|live| &mut live.note)
    }

    /// The live children's keys and notes, in no particular order.
    pub(crate) fn notes(&self) -> impl Iterator<Item = (&C::Key, &C::Note)> {
        self.by_key.iter().map(|(key, live)| (key, &live.note))
    }

    /// How many children are live.
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// The live children's keys, in no particular order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &C::Key> {
        self.by_key.keys()
    }

    /// The live children's keys, ascending.
    pub(crate) fn sorted_keys(&self) -> Vec<C::Key> {
        let mut keys: Vec<C::Key> = self.by_key.keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    /// The live children, in no particular order.
    pub(crate) fn actors(&self) -> impl Iterator<Item = &ActorRef<C::Msg>> {
        self.by_key.values().map(|live| &live.actor)
    }

    /// Panics, restarts and lost batches so far.
    pub(crate) fn supervision(&self) -> SupervisionCounters {
        self.supervision
    }

    /// Counts a batch whose effects a child's failure or silence cut short.
    pub(crate) fn lost_batch(&mut self) {
        self.supervision.lost_batches += 1;
    }

    /// Starts `child` with `args`, linked to `supervisor` (whose
    /// [`Children::supervise`] then hears of its failure); errors if it does not start.
    pub(crate) async fn spawn(
        &mut self,
        child: C,
        args: C::Arguments,
        supervisor: ActorCell,
    ) -> Result<ActorRef<C::Msg>, ActorProcessingErr> {
        self.spawn_noted(child, args, supervisor, C::Note::default())
            .await
    }

    /// [`Children::spawn`], with `note` kept beside the child.
    async fn spawn_noted(
        &mut self,
        child: C,
        args: C::Arguments,
        supervisor: ActorCell,
        note: C::Note,
    ) -> Result<ActorRef<C::Msg>, ActorProcessingErr> {
        let key = C::key(&args);
        let (actor, _) = Actor::spawn_linked(None, child, args, supervisor).await?;
        self.by_key.insert(
            key,
            Live {
                actor: actor.clone(),
                note,
            },
        );
        Ok(actor)
    }

    /// Stops the child of `key` for `reason`, forgotten first so that it is not restarted.
    pub(crate) fn stop(&mut self, key: C::Key, reason: &str) {
        if let Some(live) = self.by_key.remove(&key) {
            self.stopping.insert(live.actor.get_id().pid());
            live.actor.stop(Some(reason.into()));
        }
    }

    /// Stops every child (the supervisor's `post_stop`).
    pub(crate) fn stop_all(&self) {
        for live in self.by_key.values() {
            live.actor.stop(None);
        }
    }

    /// How many children stopped on purpose have not been heard to terminate yet.
    #[cfg(test)]
    pub(crate) fn stopping(&self) -> usize {
        self.stopping.len()
    }

    /// Makes the child of `key`, if live, panic (tests of the restart path).
    pub(crate) fn crash(&self, key: C::Key) {
        if let Some(live) = self.by_key.get(&key) {
            let _ = live.actor.cast(C::crash_request());
        }
    }

    /// Forgets the live child `cell` is, if it is one of them (a scan: see [`Children`]);
    /// returns its key and note. A child stopped on purpose is not live any more: its pid
    /// leaves `stopping` and nothing is returned.
    fn forget_cell(&mut self, cell: &ActorCell) -> Option<(C::Key, C::Note)> {
        let pid = cell.get_id().pid();
        if self.stopping.remove(&pid) {
            // A passivation wave may have listed many: give the room back once all are heard.
            if self.stopping.is_empty() && self.stopping.capacity() > 1024 {
                self.stopping.shrink_to_fit();
            }
            return None;
        }
        let key = self
            .by_key
            .iter()
            .find(|(_, live)| live.actor.get_id().pid() == pid)
            .map(|(key, _)| *key)?;
        self.by_key.remove(&key).map(|live| (key, live.note))
    }

    /// Handles a supervision event of partition `partition`'s supervisor `supervisor`: a child
    /// that failed is counted (a panic and a lost batch) and started again, under the same
    /// key, as `fresh` makes it; a child that stopped is forgotten. Events about actors that
    /// are not (or no longer) its children are ignored. Errors if the restarted child does
    /// not start.
    ///
    /// `fresh` is where the supervisors differ: each knows what an empty child of its kind
    /// needs, and the person supervisor also notes that the person's state changed (its next
    /// incremental snapshot must hold it); the zone supervisor sees the restart in the
    /// counters and makes its next snapshot complete.
    pub(crate) async fn supervise(
        &mut self,
        event: SupervisionEvent,
        partition: u32,
        supervisor: ActorCell,
        fresh: impl FnOnce(C::Key) -> (C, C::Arguments),
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                let Some((key, note)) = self.forget_cell(&cell) else {
                    return Ok(());
                };
                self.supervision.panics += 1;
                C::log_restart(partition, key, &error);
                // What it held is gone: its effects are lost until the partition replays from
                // its last snapshot (the pipeline's job; `lost_batches` tells).
                self.supervision.lost_batches += 1;
                let (child, args) = fresh(key);
                self.spawn_noted(child, args, supervisor, note).await?;
                self.supervision.restarts += 1;
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                self.forget_cell(&cell);
            }
            _ => {}
        }
        Ok(())
    }

    /// The states of the live children among `keys`, in the order of `keys` (keys without a
    /// live child are skipped), each asked with [`Child::snapshot_request`], all at once.
    /// Errors if any of them does not answer within [`Child::CALL_TIMEOUT`].
    ///
    /// Which keys is the caller's: the zone supervisor asks every zone, the person supervisor
    /// only the persons that changed since its previous snapshot (it also holds passivated
    /// persons, which have no actor to ask).
    pub(crate) async fn states(
        &self,
        keys: impl IntoIterator<Item = C::Key>,
    ) -> Result<Vec<(C::Key, C::Part)>, ActorProcessingErr> {
        let calls = keys
            .into_iter()
            .filter_map(|key| self.get(&key).map(|actor| (key, actor)))
            .map(|(key, actor)| async move {
                let answer = actor.call(C::snapshot_request, Some(C::CALL_TIMEOUT)).await;
                (key, answer)
            });
        let mut states = Vec::new();
        for (key, answer) in join_all(calls).await {
            match answer {
                Ok(CallResult::Success(part)) => states.push((key, part)),
                _ => {
                    return Err(
                        format!("a {} actor did not answer the snapshot request", C::KIND).into(),
                    )
                }
            }
        }
        Ok(states)
    }
}

/// The partition-wide state (postcard) of a snapshot of `C`'s partitions; errors if the
/// snapshot's format is not `format` or its bytes do not decode.
pub(crate) fn restore_header<C: Child, H: DeserializeOwned>(
    blob: &SnapshotBlob,
    format: u32,
) -> Result<H, ActorProcessingErr> {
    if blob.format != format {
        return Err(format!(
            "{} snapshot format {} is not {}",
            C::KIND,
            blob.format,
            format
        )
        .into());
    }
    Ok(postcard::from_bytes(&blob.bytes)?)
}

/// The children's states (postcard) of a snapshot of `C`'s partitions, decoded one at a time
/// in the snapshot's order; an item errors if its bytes do not decode or hold another child
/// than the part's key names.
pub(crate) fn restore_parts<C: PartPerChild>(
    blob: &SnapshotBlob,
) -> impl Iterator<Item = Result<C::Part, ActorProcessingErr>> + '_ {
    blob.part_states().map(|(key, bytes)| {
        let part: C::Part = postcard::from_bytes(bytes)?;
        let holds = C::part_key(&part);
        if C::stored_key(holds) != key {
            return Err(format!(
                "{kind} snapshot part {key} holds {kind} {holds}",
                kind = C::KIND
            )
            .into());
        }
        Ok(part)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::person::PersonActor;
    use crate::episodes::PersonState;

    fn blob(format: u32, parts: Vec<(i64, Option<Vec<u8>>)>) -> SnapshotBlob {
        SnapshotBlob {
            next_offset: 0,
            format,
            bytes: postcard::to_stdvec(&7u32).expect("serializes"),
            parts,
            complete: true,
        }
    }

    #[test]
    fn a_snapshot_of_another_format_or_with_a_part_under_another_key_is_refused() {
        let refused = restore_header::<PersonActor, u32>(&blob(2, Vec::new()), 3);
        assert_eq!(
            refused.expect_err("format 2").to_string(),
            "person snapshot format 2 is not 3"
        );
        let header = restore_header::<PersonActor, u32>(&blob(3, Vec::new()), 3);
        assert_eq!(header.expect("format 3"), 7);

        let five = postcard::to_stdvec(&PersonState::new(5)).expect("serializes");
        let snapshot = blob(3, vec![(5, Some(five.clone())), (8, None), (6, Some(five))]);
        let mut parts = restore_parts::<PersonActor>(&snapshot);
        assert_eq!(parts.next().expect("part 5").expect("decodes").person(), 5);
        let misplaced = parts.next().expect("part 6").expect_err("holds person 5");
        assert_eq!(
            misplaced.to_string(),
            "person snapshot part 6 holds person 5"
        );
        assert!(parts.next().is_none());
    }
}
