//! The NotificationHub (docs/design.md §2): every process reads the whole `connections` topic from
//! its
//! end (no group, no committed offsets), drops repeats by notification id (a replay after a
//! crash re-derives the same ids) and fans each notification out to the in-process
//! subscribers of its person (REST SSE / WebSocket and gRPC streams) and to those of everyone.
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
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use udaconnect_actors::domain::{Notification, PersonId};
use uuid::Uuid;

use crate::config::Config;
use crate::kafka::consumer_config;
use crate::pipeline::codec;
use crate::pipeline::consumer::ErrorThrottle;

/// Notifications queued for one subscriber before it is disconnected as too slow.
pub const SUBSCRIBER_QUEUE: usize = 4_096;
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
    /// Subscribers now.
    pub subscribers: u64,
}

type Sender = mpsc::Sender<Arc<Notification>>;

#[derive(Default)]
struct Subscribers {
    next_id: u64,
    by_person: HashMap<PersonId, Vec<(u64, Sender)>>,
    everyone: Vec<(u64, Sender)>,
    /// Each subscriber's persons (empty for a subscriber of everyone).
    members: HashMap<u64, Vec<PersonId>>,
}

impl Subscribers {
    fn remove(&mut self, id: u64) {
        let Some(persons) = self.members.remove(&id) else {
            return;
        };
        self.everyone.retain(|(i, _)| *i != id);
        for person in persons {
            if let Some(list) = self.by_person.get_mut(&person) {
                list.retain(|(i, _)| *i != id);
                if list.is_empty() {
                    self.by_person.remove(&person);
                }
            }
        }
    }
}

#[derive(Default)]
struct HubShared {
    subscribers: Mutex<Subscribers>,
    received: AtomicU64,
    repeats: AtomicU64,
    malformed: AtomicU64,
    delivered: AtomicU64,
    slow_dropped: AtomicU64,
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
    /// notification produced after this returns is read. The topic must exist; this blocks on
    /// the broker (metadata, end offsets), so call it off the async threads.
    pub fn start(config: &Config) -> Result<Self, HubError> {
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
        let shared = Arc::new(HubShared::default());
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
        self.register(persons, false, SUBSCRIBER_QUEUE)
    }

    /// Every notification from now on (live feeds).
    pub fn subscribe_all(&self) -> Subscription {
        self.register(&[], true, SUBSCRIBER_QUEUE)
    }

    /// Every notification from now on, with room for `queue` of them before the subscriber
    /// counts as too slow (an audit or a test that must see every one through a burst).
    pub fn subscribe_all_queued(&self, queue: usize) -> Subscription {
        self.register(&[], true, queue.max(1))
    }

    fn register(&self, persons: &[PersonId], everyone: bool, queue: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(queue);
        let mut persons = persons.to_vec();
        persons.sort_unstable();
        persons.dedup();
        let mut subs = self.shared.subscribers.lock().expect("not poisoned");
        let id = subs.next_id;
        subs.next_id += 1;
        subs.members.insert(id, persons.clone());
        if everyone {
            subs.everyone.push((id, tx));
        } else {
            for p in &persons {
                subs.by_person.entry(*p).or_default().push((id, tx.clone()));
            }
        }
        Subscription {
            id,
            rx,
            shared: Arc::downgrade(&self.shared),
        }
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
                    for n in notifications {
                        if recent.first_time(n.id) {
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

    #[tokio::test]
    async fn fan_out_reaches_the_persons_subscribers_and_everyone_and_drops_slow_ones() {
        let shared = Arc::new(HubShared::default());
        let hub = NotificationHub {
            shared: Arc::clone(&shared),
            stop: CancellationToken::new(),
            thread: Mutex::new(None),
        };
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
