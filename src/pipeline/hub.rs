//! The NotificationHub (docs/design.md §2): every process reads the whole `connections` topic from
//! its
//! end (no group, no committed offsets), drops repeats by notification id (a replay after a
//! crash re-derives the same ids) and fans each notification out to the in-process
//! subscribers of its person (REST SSE / WebSocket and gRPC streams) and to those of everyone.
//!
//! Each process keeps the last [`RESUME_BUFFER`] notifications it fanned out, in order, so that
//! a subscriber that reconnects naming the last one it received (SSE `Last-Event-ID`, the
//! WebSocket's `last_event_id`) gets exactly those it missed before the live ones
//! ([`NotificationHub::subscribe_after`]).
//!
//! A subscriber's queue is bounded: one that falls [`SUBSCRIBER_QUEUE`] notifications behind is
//! disconnected (its stream ends) rather than slowing the hub or growing without bound; it
//! reconnects and reads what it missed from the history API.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use rustc_hash::FxHashSet;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use udaconnect_actors::domain::{Notification, PersonId};
use udaconnect_actors::messages::PersonSet;
use uuid::Uuid;

use crate::config::Config;
use crate::kafka::consumer_config;
use crate::pipeline::codec;
use crate::pipeline::consumer::ErrorThrottle;
use crate::pipeline::erased::ErasedPersons;

/// Notifications queued for one subscriber before it is disconnected as too slow.
pub const SUBSCRIBER_QUEUE: usize = 4_096;
/// Notifications a process keeps for subscribers that resume after a reconnect: at 1,000
/// notifications per second, the last two minutes or so (about 20 MB).
pub const RESUME_BUFFER: usize = 131_072;
/// How many recent notification ids the hub remembers to drop repeats. A replay re-emits at
/// most a snapshot interval's notifications, far fewer than this.
pub const REMEMBERED_IDS: usize = 262_144;

/// The most recent `capacity` ids seen; `first_time` is false for a repeat among them.
#[derive(Debug)]
pub struct RecentIds {
    capacity: usize,
    order: VecDeque<Uuid>,
    seen: HashSet<Uuid>,
}

impl RecentIds {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            seen: HashSet::new(),
        }
    }

    /// Records `id`; true unless it is among the remembered ids.
    pub fn first_time(&mut self, id: Uuid) -> bool {
        if !self.seen.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// The hub's counters since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HubCounters {
    /// Records read from the connections topic.
    pub received: u64,
    /// Records dropped as repeats of a notification already fanned out.
    pub repeats: u64,
    /// Records that were not notifications.
    pub malformed: u64,
    /// Notifications handed to subscribers (one per subscriber).
    pub delivered: u64,
    /// Subscribers disconnected because their queue was full.
    pub slow_subscribers_dropped: u64,
    /// Notifications dropped because they are about an erased person.
    pub erased_dropped: u64,
    /// Subscribers now.
    pub subscribers: u64,
}

type Sender = mpsc::Sender<Arc<Notification>>;

#[derive(Default)]
struct Subscribers {
    next_id: u64,
    by_person: HashMap<PersonId, Vec<(u64, Sender)>>,
    everyone: Vec<(u64, Sender)>,
    /// Each subscriber's persons (empty for a subscriber of everyone) and its sender, which
    /// keeps its queue open while it follows no one; removing the entry ends its stream.
    members: HashMap<u64, (Vec<PersonId>, Sender)>,
    /// The last [`RESUME_BUFFER`] notifications fanned out, oldest first, each with its id
    /// (kept under the same lock as the subscribers, so that a resumed subscription's backlog
    /// and its live notifications neither overlap nor leave a gap). An erased person's are
    /// emptied in place (`None`): their ids stay valid resume points.
    recent: VecDeque<(Uuid, Option<Arc<Notification>>)>,
    /// The sequence number of `recent[0]`; each fanned-out notification takes the next one.
    first_seq: u64,
    /// Where each id in `recent` is (its sequence number).
    seq_of: HashMap<Uuid, u64>,
}

impl Subscribers {
    /// Appends `n` to the resume buffer, forgetting the oldest beyond its capacity.
    fn remember(&mut self, n: &Arc<Notification>, capacity: usize) {
        let seq = self.first_seq + self.recent.len() as u64;
        self.seq_of.insert(n.id, seq);
        self.recent.push_back((n.id, Some(Arc::clone(n))));
        while self.recent.len() > capacity {
            if let Some((old, _)) = self.recent.pop_front() {
                // An id fanned out again later (once out of the repeat window) is left alone.
                if self.seq_of.get(&old) == Some(&self.first_seq) {
                    self.seq_of.remove(&old);
                }
            }
            self.first_seq += 1;
        }
    }

    /// The buffered notifications after `id` that `wanted` keeps, oldest first; `None` when
    /// `id` is not in the buffer.
    fn after(
        &self,
        id: Uuid,
        wanted: impl Fn(&Notification) -> bool,
    ) -> Option<Vec<Arc<Notification>>> {
        let seq = *self.seq_of.get(&id)?;
        let start = (seq - self.first_seq) as usize + 1;
        Some(
            self.recent
                .range(start..)
                .filter_map(|(_, n)| n.as_ref())
                .filter(|n| wanted(n))
                .cloned()
                .collect(),
        )
    }

    /// Empties the resume buffer's notifications about one of `persons` (as the person or the
    /// peer); returns how many.
    fn forget(&mut self, persons: &FxHashSet<PersonId>) -> u64 {
        let mut emptied = 0;
        for (_, slot) in &mut self.recent {
            if slot.as_ref().is_some_and(|n| involves(n, persons)) {
                *slot = None;
                emptied += 1;
            }
        }
        emptied
    }

    fn remove(&mut self, id: u64) {
        let Some((persons, _)) = self.members.remove(&id) else {
            return;
        };
        self.everyone.retain(|(i, _)| *i != id);
        self.unregister(id, &persons);
    }

    /// Puts subscriber `id` on the lists of `persons`, with its sender.
    fn enroll(&mut self, id: u64, persons: &[PersonId], tx: &Sender) {
        for &person in persons {
            self.by_person
                .entry(person)
                .or_default()
                .push((id, tx.clone()));
        }
    }

    /// Takes subscriber `id` off the lists of `persons`.
    fn unregister(&mut self, id: u64, persons: &[PersonId]) {
        for &person in persons {
            if let Some(list) = self.by_person.get_mut(&person) {
                list.retain(|(i, _)| *i != id);
                if list.is_empty() {
                    self.by_person.remove(&person);
                }
            }
        }
    }
}

/// Whether `n` is about one of `persons`, as the person or the peer.
fn involves(n: &Notification, persons: &FxHashSet<PersonId>) -> bool {
    persons.contains(&n.episode.person) || persons.contains(&n.episode.peer)
}

#[derive(Default)]
struct HubShared {
    subscribers: Mutex<Subscribers>,
    /// Notifications about these persons are dropped as they are read.
    erased: Arc<ErasedPersons>,
    /// How many notifications [`Subscribers::recent`] keeps ([`RESUME_BUFFER`]).
    resume_capacity: usize,
    received: AtomicU64,
    repeats: AtomicU64,
    malformed: AtomicU64,
    delivered: AtomicU64,
    slow_dropped: AtomicU64,
    /// Notifications read about erased persons, dropped.
    erased_dropped: AtomicU64,
}

impl HubShared {
    /// Hands `n` to the subscribers of its person and of everyone; disconnects full ones.
    fn fan_out(&self, n: Notification) {
        let n = Arc::new(n);
        let mut subs = self.subscribers.lock().expect("not poisoned");
        let mut slow: Vec<u64> = Vec::new();
        let mut delivered = 0;
        let person = n.episode.person;
        let targets = subs
            .by_person
            .get(&person)
            .into_iter()
            .flatten()
            .chain(subs.everyone.iter());
        for (id, tx) in targets {
            match tx.try_send(Arc::clone(&n)) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => slow.push(*id),
                // The subscription is being dropped; its Drop unregisters it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        for id in slow {
            warn!(
                subscriber = id,
                "notification subscriber too slow; disconnected"
            );
            subs.remove(id);
            self.slow_dropped.fetch_add(1, Ordering::Relaxed);
        }
        subs.remember(&n, self.resume_capacity);
        self.delivered.fetch_add(delivered, Ordering::Relaxed);
    }
}

/// Notifications for some persons (or everyone), in the order the hub read them.
pub struct Subscription {
    id: u64,
    rx: mpsc::Receiver<Arc<Notification>>,
    shared: Weak<HubShared>,
}

impl Subscription {
    /// The next notification; `None` when the hub stopped or disconnected this subscriber.
    pub async fn recv(&mut self) -> Option<Arc<Notification>> {
        self.rx.recv().await
    }

    /// A notification already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Arc<Notification>> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared
                .subscribers
                .lock()
                .expect("not poisoned")
                .remove(self.id);
        }
    }
}

/// Where a resumed subscription starts ([`NotificationHub::subscribe_after`]).
#[derive(Debug)]
pub enum Resume {
    /// The notifications after the one named, for the subscription's persons, oldest first:
    /// send them before the subscription's own.
    After(Vec<Arc<Notification>>),
    /// The one named is not among those this process keeps (older than its last
    /// [`RESUME_BUFFER`], or read before it started): the subscription starts from now, and
    /// what was missed is in the history.
    Unknown,
}

/// `persons` sorted, each once.
fn distinct(persons: &[PersonId]) -> Vec<PersonId> {
    let mut persons = persons.to_vec();
    persons.sort_unstable();
    persons.dedup();
    persons
}

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0} does not exist")]
    NoTopic(String),
}

/// Reads the connections topic and fans notifications out to subscribers.
pub struct NotificationHub {
    shared: Arc<HubShared>,
    stop: CancellationToken,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl NotificationHub {
    /// Starts reading every partition of the connections topic from its end: every
    /// notification produced after this returns is read, except those about a person in
    /// `erased`. The topic must exist; this blocks on the broker (metadata, end offsets), so
    /// call it off the async threads.
    pub fn start(config: &Config, erased: Arc<ErasedPersons>) -> Result<Self, HubError> {
        let topic = config.topics().connections;
        let consumer: BaseConsumer = consumer_config(config)
            // Never used for offsets: the hub assigns partitions itself and reads from the end.
            .set("group.id", format!("{}.hub", config.topic_prefix))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len())
            .filter(|n| *n > 0)
            .ok_or_else(|| HubError::NoTopic(topic.clone()))?;
        // The end offsets now, not `Offset::End`, which resolves at the first fetch: every
        // notification produced after `start` returns is read.
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            let (_, end) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            tpl.add_partition_offset(&topic, p, Offset::Offset(end))?;
        }
        consumer.assign(&tpl)?;
        let shared = Arc::new(HubShared {
            resume_capacity: RESUME_BUFFER,
            erased,
            ..HubShared::default()
        });
        let stop = CancellationToken::new();
        let thread = {
            let shared = Arc::clone(&shared);
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("notification-hub".to_owned())
                .spawn(move || read_loop(&consumer, &shared, &stop))
                .expect("spawn the hub thread")
        };
        info!(topic, partitions, "notification hub started");
        Ok(Self {
            shared,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Notifications of these persons from now on.
    pub fn subscribe(&self, persons: &[PersonId]) -> Subscription {
        self.register(persons, false, SUBSCRIBER_QUEUE, None).0
    }

    /// Every notification from now on (live feeds).
    pub fn subscribe_all(&self) -> Subscription {
        self.register(&[], true, SUBSCRIBER_QUEUE, None).0
    }

    /// Every notification from now on, with room for `queue` of them before the subscriber
    /// counts as too slow (an audit or a test that must see every one through a burst).
    pub fn subscribe_all_queued(&self, queue: usize) -> Subscription {
        self.register(&[], true, queue.max(1), None).0
    }

    /// A subscriber that reconnects: notifications of these persons (everyone's when
    /// `everyone`) after the one with id `after`, which it received last. The backlog comes
    /// back as [`Resume::After`], taken with the registration under one lock, so the backlog
    /// followed by the subscription holds each notification once and misses none;
    /// [`Resume::Unknown`] when this process no longer (or never) held `after`.
    pub fn subscribe_after(
        &self,
        persons: &[PersonId],
        everyone: bool,
        after: Uuid,
    ) -> (Subscription, Resume) {
        let (subscription, backlog) =
            self.register(persons, everyone, SUBSCRIBER_QUEUE, Some(after));
        (subscription, backlog.map_or(Resume::Unknown, Resume::After))
    }

    fn register(
        &self,
        persons: &[PersonId],
        everyone: bool,
        queue: usize,
        after: Option<Uuid>,
    ) -> (Subscription, Option<Vec<Arc<Notification>>>) {
        let (tx, rx) = mpsc::channel(queue);
        let persons = distinct(persons);
        let mut subs = self.shared.subscribers.lock().expect("not poisoned");
        let backlog = after.and_then(|id| {
            subs.after(id, |n| {
                everyone || persons.binary_search(&n.episode.person).is_ok()
            })
        });
        let id = subs.next_id;
        subs.next_id += 1;
        if everyone {
            subs.everyone.push((id, tx.clone()));
        } else {
            subs.enroll(id, &persons, &tx);
        }
        subs.members.insert(id, (persons, tx));
        (
            Subscription {
                id,
                rx,
                shared: Arc::downgrade(&self.shared),
            },
            backlog,
        )
    }

    /// Makes `subscription` follow `persons` from now on instead of its earlier ones, in place:
    /// what is queued stays queued, and nothing fanned out meanwhile is missed or sent twice
    /// (a new subscription in its place would drop the old one's queue). False when the hub
    /// already cut the subscription off (its stream is ending).
    pub fn resubscribe(&self, subscription: &Subscription, persons: &[PersonId]) -> bool {
        let persons = distinct(persons);
        let mut subs = self.shared.subscribers.lock().expect("not poisoned");
        let id = subscription.id;
        let Some((old, tx)) = subs.members.get(&id).cloned() else {
            return false;
        };
        subs.unregister(id, &old);
        subs.enroll(id, &persons, &tx);
        subs.members.insert(id, (persons, tx));
        true
    }

    /// Erasure: empties the resume buffer's notifications about `persons` (as the person or
    /// the peer); those read from now on are dropped as long as the persons are in the hub's
    /// erased set. Returns how many were emptied.
    pub fn forget(&self, persons: &PersonSet) -> u64 {
        let mut subs = self.shared.subscribers.lock().expect("not poisoned");
        subs.forget(persons)
    }

    /// What the hub did so far.
    pub fn counters(&self) -> HubCounters {
        let s = &self.shared;
        HubCounters {
            received: s.received.load(Ordering::Relaxed),
            repeats: s.repeats.load(Ordering::Relaxed),
            malformed: s.malformed.load(Ordering::Relaxed),
            delivered: s.delivered.load(Ordering::Relaxed),
            slow_subscribers_dropped: s.slow_dropped.load(Ordering::Relaxed),
            erased_dropped: s.erased_dropped.load(Ordering::Relaxed),
            subscribers: s.subscribers.lock().expect("not poisoned").members.len() as u64,
        }
    }

    /// Stops reading; every subscription's stream ends.
    pub async fn stop(&self) {
        self.stop.cancel();
        let thread = self.thread.lock().expect("not poisoned").take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let mut subs = self.shared.subscribers.lock().expect("not poisoned");
        subs.by_person.clear();
        subs.everyone.clear();
        subs.members.clear();
        subs.recent.clear();
        subs.seq_of.clear();
    }
}

impl Drop for NotificationHub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn read_loop(consumer: &BaseConsumer, shared: &HubShared, stop: &CancellationToken) {
    let mut recent = RecentIds::new(REMEMBERED_IDS);
    let mut poll_errors = ErrorThrottle::new(Duration::from_secs(10));
    while !stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => match codec::decode_notifications(message.payload()) {
                Ok(notifications) => {
                    shared
                        .received
                        .fetch_add(notifications.len() as u64, Ordering::Relaxed);
                    let erased = shared.erased.current();
                    for n in notifications {
                        if involves(&n, &erased) {
                            shared.erased_dropped.fetch_add(1, Ordering::Relaxed);
                        } else if recent.first_time(n.id) {
                            shared.fan_out(n);
                        } else {
                            shared.repeats.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => {
                    shared.malformed.fetch_add(1, Ordering::Relaxed);
                    warn!(partition = message.partition(), offset = message.offset(), error = %e, "not a notifications record; skipped");
                }
            },
            Some(Err(e)) => {
                if let Some(suppressed) = poll_errors.report() {
                    warn!(error = %e, suppressed, "notification hub poll error (logged at most every 10 s)");
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use udaconnect_actors::domain::{Episode, NotificationKind};

    use super::*;

    fn notification(person: PersonId, n: u128) -> Notification {
        Notification {
            id: Uuid::from_u128(n),
            kind: NotificationKind::Started,
            episode: Episode {
                person,
                peer: person + 1,
                started_at: 0,
                last_seen_at: 0,
                ended_at: None,
                colocations: 1,
                min_distance_m: 1.0,
                lat: 0.0,
                lon: 0.0,
            },
            replaces: vec![],
        }
    }

    /// A hub over `shared` that reads no topic: the tests fan out themselves.
    fn hub_over(shared: &Arc<HubShared>) -> NotificationHub {
        NotificationHub {
            shared: Arc::clone(shared),
            stop: CancellationToken::new(),
            thread: Mutex::new(None),
        }
    }

    /// The ids of a resumed backlog, in order; `[u128::MAX]` for [`Resume::Unknown`].
    fn resumed(r: &Resume) -> Vec<u128> {
        match r {
            Resume::After(ns) => ns.iter().map(|n| n.id.as_u128()).collect(),
            Resume::Unknown => vec![u128::MAX],
        }
    }

    #[test]
    fn recent_ids_drop_repeats_and_forget_the_oldest() {
        let mut ids = RecentIds::new(2);
        let [a, b, c] = [1, 2, 3].map(Uuid::from_u128);
        assert!(ids.first_time(a));
        assert!(!ids.first_time(a));
        assert!(ids.first_time(b));
        assert!(ids.first_time(c));
        // `a` fell out of the window of two.
        assert!(ids.first_time(a));
        assert!(!ids.first_time(c));
    }

    #[test]
    fn a_resumed_subscription_gets_exactly_what_followed_its_last_notification() {
        let shared = Arc::new(HubShared {
            resume_capacity: 4,
            ..HubShared::default()
        });
        let hub = hub_over(&shared);
        // 1..=6 fanned out for persons 7 and 8 in turn; the buffer keeps the last four (3..=6).
        for n in 1..=6u128 {
            shared.fan_out(notification(if n % 2 == 1 { 7 } else { 8 }, n));
        }
        let (mut seven, resume) = hub.subscribe_after(&[7], false, Uuid::from_u128(3));
        assert_eq!(resumed(&resume), [5]);
        let (_, everyone) = hub.subscribe_after(&[], true, Uuid::from_u128(4));
        assert_eq!(resumed(&everyone), [5, 6]);
        let (_, latest) = hub.subscribe_after(&[7], false, Uuid::from_u128(6));
        assert_eq!(resumed(&latest), Vec::<u128>::new());
        // Out of the buffer, or never seen: from now on.
        let (_, old) = hub.subscribe_after(&[7], false, Uuid::from_u128(2));
        assert!(matches!(old, Resume::Unknown));
        let (_, never) = hub.subscribe_after(&[7], false, Uuid::from_u128(99));
        assert!(matches!(never, Resume::Unknown));
        // What comes next arrives live, once.
        shared.fan_out(notification(7, 7));
        assert_eq!(seven.try_recv().map(|n| n.id.as_u128()), Some(7));
        assert!(seven.try_recv().is_none());
        let (_, after_seven) = hub.subscribe_after(&[7], false, Uuid::from_u128(5));
        assert_eq!(resumed(&after_seven), [7]);
    }

    #[test]
    fn an_erased_persons_notifications_leave_the_resume_buffer_and_are_dropped_as_read() {
        let shared = Arc::new(HubShared {
            resume_capacity: 16,
            ..HubShared::default()
        });
        let hub = hub_over(&shared);
        // Persons 7 (peer 8), 8 (peer 9) and 9 (peer 10) in turn.
        for n in 1..=6u128 {
            shared.fan_out(notification(7 + (n as i64 - 1) % 3, n));
        }
        // Person 8 erased: its notifications and those it is the peer of (person 7's) go.
        let erased: PersonSet = Arc::new([8].into_iter().collect());
        assert_eq!(hub.forget(&erased), 4);
        assert_eq!(hub.forget(&erased), 0);
        let (_, everyone) = hub.subscribe_after(&[], true, Uuid::from_u128(1));
        assert_eq!(resumed(&everyone), [3, 6]);
        // An erased notification's id is still a resume point.
        let (_, after_erased) = hub.subscribe_after(&[], true, Uuid::from_u128(4));
        assert_eq!(resumed(&after_erased), [6]);
        // Read from now on: dropped while the person is in the hub's erased set.
        let read = |n: Notification| {
            if involves(&n, &shared.erased.current()) {
                None
            } else {
                Some(n)
            }
        };
        assert!(read(notification(8, 7)).is_some());
        shared.erased.add([8]);
        assert!(read(notification(8, 7)).is_none());
        assert!(read(notification(7, 8)).is_none());
        assert!(read(notification(9, 9)).is_some());
    }

    #[test]
    fn a_subscription_changes_its_persons_in_place_and_stays_open_following_no_one() {
        let shared = Arc::new(HubShared::default());
        let hub = hub_over(&shared);
        // Following no one: open, nothing arrives (a WebSocket before its first subscribe).
        let mut sub = hub.subscribe(&[]);
        shared.fan_out(notification(7, 1));
        assert!(sub.try_recv().is_none());
        assert!(!sub.rx.is_closed());
        assert!(hub.resubscribe(&sub, &[7]));
        shared.fan_out(notification(7, 2));
        // Switched to 8: the queued notification of 7 is still there, later ones of 7 are not.
        assert!(hub.resubscribe(&sub, &[8]));
        shared.fan_out(notification(7, 3));
        shared.fan_out(notification(8, 4));
        assert_eq!(sub.try_recv().map(|n| n.id.as_u128()), Some(2));
        assert_eq!(sub.try_recv().map(|n| n.id.as_u128()), Some(4));
        assert!(sub.try_recv().is_none());
        assert_eq!(hub.counters().subscribers, 1);
        drop(sub);
        assert_eq!(hub.counters().subscribers, 0);
    }

    #[tokio::test]
    async fn fan_out_reaches_the_persons_subscribers_and_everyone_and_drops_slow_ones() {
        let shared = Arc::new(HubShared::default());
        let hub = hub_over(&shared);
        let mut seven = hub.subscribe(&[7, 7, 9]);
        let mut all = hub.subscribe_all();
        let mut other = hub.subscribe(&[8]);
        assert_eq!(hub.counters().subscribers, 3);
        shared.fan_out(notification(7, 1));
        shared.fan_out(notification(9, 2));
        assert_eq!(seven.try_recv().map(|n| n.id), Some(Uuid::from_u128(1)));
        assert_eq!(seven.try_recv().map(|n| n.id), Some(Uuid::from_u128(2)));
        assert!(seven.try_recv().is_none());
        assert_eq!(all.try_recv().map(|n| n.id), Some(Uuid::from_u128(1)));
        assert!(other.try_recv().is_none());
        assert_eq!(hub.counters().delivered, 4);
        drop(other);
        assert_eq!(hub.counters().subscribers, 2);

        // `seven` stops reading: after its queue fills, it is cut off, `all` is not.
        for n in 0..SUBSCRIBER_QUEUE as u128 + 1 {
            shared.fan_out(notification(7, 100 + n));
            while all.try_recv().is_some() {}
        }
        assert_eq!(hub.counters().slow_subscribers_dropped, 1);
        assert_eq!(hub.counters().subscribers, 1);
        let mut queued = 0;
        while seven.recv().await.is_some() {
            queued += 1;
        }
        assert_eq!(queued, SUBSCRIBER_QUEUE);
    }
}
