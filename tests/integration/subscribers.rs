//! 2,000 notification subscribers at once, half Server-Sent Events and half WebSockets, each
//! an attendee following itself with its own token, while a simulated conference posts just
//! over 1,000 reports a second for 60 s through `/v1/locations/batch` (as a gateway), each as
//! its phone sends it: each subscriber receives every notification of its person, in order, or is disconnected as too slow and counted; the
//! service's memory stays bounded (its peak RSS is printed and checked).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use udaconnect::auth::Role;
use udaconnect_actors::domain::PersonId;
use udaconnect_bench::produce::{ensure_persons, wire};
use udaconnect_bench::sim::{ConferenceConfig, Simulation};

use crate::helpers::{
    client_as, free_port, spawn_serve, test_config, token, wait_for_status, TestDb,
};

const SUBSCRIBERS: usize = 2_000;
const FEED_S: u32 = 60;
/// Peak resident memory the service may reach, bytes: about four times what a run measures,
/// so that only growth without bound (a subscriber's queue that never empties, a leak per
/// connection) fails it.
const MAX_RSS: u64 = 1536 << 20;

/// What one subscriber received: notification ids in order, and whether its stream ended
/// before the test closed it.
#[derive(Debug, Default)]
struct Heard {
    ids: Vec<String>,
    cut: bool,
}

/// The service's resident memory, bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Follows `person` over SSE as that attendee until `stop`; each event's id goes to `heard`.
async fn sse(
    base: String,
    person: PersonId,
    heard: Arc<Mutex<Heard>>,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: tokio_util::sync::CancellationToken,
) {
    let client = client_as(&token(Role::Attendee, Some(person)));
    let response = client
        .get(format!("{base}/v1/persons/{person}/connections/stream"))
        .send()
        .await
        .expect("SSE request");
    assert_eq!(response.status().as_u16(), 200);
    let _ = ready.send(()).await;
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    loop {
        let chunk = tokio::select! {
            () = stop.cancelled() => return,
            chunk = stream.next() => chunk,
        };
        let Some(Ok(chunk)) = chunk else {
            heard.lock().unwrap().cut = true;
            return;
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if let Some(id) = block.lines().find_map(|l| l.strip_prefix("id:")) {
                heard.lock().unwrap().ids.push(id.trim().to_owned());
            }
        }
    }
}

/// Follows `person` over a WebSocket as that attendee until `stop`.
async fn websocket(
    addr: String,
    person: PersonId,
    heard: Arc<Mutex<Heard>>,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: tokio_util::sync::CancellationToken,
) {
    let url = format!(
        "ws://{addr}/v1/ws?person_ids={person}&access_token={}",
        token(Role::Attendee, Some(person))
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket");
    match socket.next().await {
        Some(Ok(Message::Text(t))) => assert!(t.contains("subscribed"), "{t}"),
        other => panic!("no subscribed answer: {other:?}"),
    }
    let _ = ready.send(()).await;
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => {
                let _ = socket.close(None).await;
                return;
            }
            message = socket.next() => message,
        };
        match message {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                match v["id"].as_str() {
                    Some(id) => heard.lock().unwrap().ids.push(id.to_owned()),
                    // The hub cut it off as too slow (an error message, then the close).
                    None => heard.lock().unwrap().cut = true,
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            _ => {
                heard.lock().unwrap().cut = true;
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_subscribers_each_get_every_notification_of_their_person_or_are_counted_out() {
    // Two thousand sockets on each side of the connection.
    if let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let want = 8_192.min(hard);
        if soft < want {
            rlimit::setrlimit(rlimit::Resource::NOFILE, want, hard)
                .expect("raise the open-file limit");
        }
        assert!(
            want >= 2 * SUBSCRIBERS as u64 + 512,
            "the open-file limit ({hard}) is too low for {SUBSCRIBERS} subscribers"
        );
    }
    let (db, _client) = TestDb::migrated().await;
    let config = test_config(&db);
    let log = tempfile::NamedTempFile::new().expect("log");
    let port = free_port();
    let served = spawn_serve(&config, (port, 0), "subscribers", log.path());
    let pid = served.id();
    let base = format!("http://127.0.0.1:{port}");
    wait_for_status(&format!("{base}/readyz"), 200, Duration::from_secs(90)).await;

    // A conference of 3,000 attendees reporting every 2.9 s: about 1,030 reports a second
    // (duplicates included).
    let mut conference = ConferenceConfig::for_attendees(3_000);
    conference.first_person_id = 1001;
    conference.duration_s = FEED_S;
    conference.report_interval_s = 2.9;
    // Phones send within 2 s of each reading (the default's 20 s would stretch the 60 s of
    // readings over 80 s of arrivals, ramping the rate up and down for 20 s at each end).
    conference.max_disorder_s = 2;
    conference.start = chrono::Utc::now().timestamp_micros() + 5_000_000;
    conference.fit_venue();
    let sim = Simulation::new(conference).expect("valid conference");
    let pool = udaconnect::store::pool(&config, Duration::from_secs(5)).expect("pool");
    ensure_persons(&pool, &sim).await.expect("insert persons");
    let mut events = Vec::new();
    let mut it = sim.events();
    while let Some(batch) = it.next_batch() {
        events.extend_from_slice(batch);
    }
    events.sort_by_key(|e| e.received_at);

    // The truth: every notification the pipeline publishes, read from the topic.
    let hub = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            udaconnect::pipeline::hub::NotificationHub::start(&config, Default::default())
        })
        .await
        .expect("no panic")
        .expect("hub")
    };
    let mut truth_feed = hub.subscribe_all_queued(1 << 22);

    // The subscribers, half SSE and half WebSocket, each for one attendee.
    let stop = tokio_util::sync::CancellationToken::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(SUBSCRIBERS);
    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let person = 1001 + i as PersonId;
        let heard = Arc::new(Mutex::new(Heard::default()));
        let task = if i % 2 == 0 {
            tokio::spawn(sse(
                base.clone(),
                person,
                Arc::clone(&heard),
                ready_tx.clone(),
                stop.clone(),
            ))
        } else {
            tokio::spawn(websocket(
                format!("127.0.0.1:{port}"),
                person,
                Arc::clone(&heard),
                ready_tx.clone(),
                stop.clone(),
            ))
        };
        subscribers.push((person, heard, task));
    }
    for _ in 0..SUBSCRIBERS {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .expect("every subscriber connects within a minute")
            .expect("ready");
    }
    let rss_idle = rss(pid);

    // The feed: each second, the reports whose phones would have sent them by then; how far
    // behind their sending the last of a round is acknowledged says whether ingest kept up.
    let gateway = client_as(&token(Role::Gateway, None));
    let started = Instant::now();
    let mut peak = rss_idle;
    let mut rest = events.as_slice();
    let mut posted = 0usize;
    let mut behind_us = 0i64;
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !rest.is_empty() {
        ticks.tick().await;
        peak = peak.max(rss(pid));
        let now = chrono::Utc::now().timestamp_micros();
        let due = rest.partition_point(|e| e.received_at <= now);
        let oldest = rest.first().map_or(now, |e| e.received_at);
        for chunk in rest[..due].chunks(5_000) {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|e| {
                    let e = wire(e);
                    json!({"event_id": e.event_id, "person_id": e.person_id, "lat": e.lat, "lon": e.lon,
                           "recorded_at": udaconnect::store::timestamp(e.recorded_at)})
                })
                .collect();
            let response = gateway
                .post(format!("{base}/v1/locations/batch"))
                .json(&json!({ "events": batch }))
                .send()
                .await
                .expect("batch posted");
            assert_eq!(response.status().as_u16(), 202);
            posted += chunk.len();
        }
        if due > 0 {
            behind_us = behind_us.max(chrono::Utc::now().timestamp_micros() - oldest);
        }
        rest = &rest[due..];
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the feed took too long"
        );
    }
    let fed_s = started.elapsed().as_secs_f64();
    // The rate the phones sent at: the reports over the time from the first one sent to the
    // last.
    let sent_s =
        events.last().map_or(0, |e| e.received_at) - events.first().map_or(0, |e| e.received_at);
    let sent_s = sent_s as f64 / 1e6;

    // Drain: until the notifications stop coming for 10 s.
    let mut truth: HashMap<PersonId, Vec<String>> = HashMap::new();
    let mut total = 0usize;
    loop {
        peak = peak.max(rss(pid));
        match tokio::time::timeout(Duration::from_secs(10), truth_feed.recv()).await {
            Ok(Some(n)) => {
                total += 1;
                truth
                    .entry(n.episode.person)
                    .or_default()
                    .push(n.id.to_string());
            }
            Ok(None) => panic!("the truth feed ended"),
            Err(_) => break,
        }
    }
    // What the subscribers still have in flight arrives within that quiet time too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for (_, _, task) in &mut subscribers {
        let _ = task.await;
    }
    hub.stop().await;

    let mut complete = 0usize;
    let mut cut = 0usize;
    let mut delivered = 0usize;
    let mut wrong = BTreeMap::new();
    for (person, heard, _) in &subscribers {
        let heard = heard.lock().unwrap();
        let expected = truth.get(person).cloned().unwrap_or_default();
        delivered += heard.ids.len();
        if heard.cut {
            cut += 1;
            // What it got before the cut is a prefix of its person's notifications.
            if !expected.starts_with(&heard.ids) {
                wrong.insert(*person, (heard.ids.clone(), expected));
            }
        } else if heard.ids == expected {
            complete += 1;
        } else {
            wrong.insert(*person, (heard.ids.clone(), expected));
        }
    }
    let summary = format!(
        "{SUBSCRIBERS} subscribers ({} SSE, {} WebSocket): {posted} reports sent over {sent_s:.0} s \
         ({:.0}/s), each posted as it came due, acknowledged at most {:.1} s after its phone sent \
         it (the feed took {fed_s:.0} s); {total} notifications published, {delivered} \
         delivered; {complete} subscribers complete, {cut} cut off as too slow; service RSS {} \
         MiB with the subscribers idle, peak {} MiB",
        SUBSCRIBERS / 2,
        SUBSCRIBERS / 2,
        posted as f64 / sent_s,
        behind_us as f64 / 1e6,
        rss_idle >> 20,
        peak >> 20,
    );
    println!("{summary}");
    crate::hostile::record_summary(&summary);
    assert!(
        wrong.is_empty(),
        "{} subscribers got something else than their person's notifications, e.g. {:?}",
        wrong.len(),
        wrong.iter().next()
    );
    assert_eq!(complete + cut, SUBSCRIBERS);
    let followed: usize = subscribers
        .iter()
        .map(|(p, _, _)| truth.get(p).map_or(0, Vec::len))
        .sum();
    assert!(
        followed > 1_000,
        "too few notifications for the followed persons to tell: {followed}"
    );
    assert!(
        posted as f64 / fed_s > 600.0,
        "the feed ran at {:.0}/s",
        posted as f64 / fed_s
    );
    assert!(
        peak < MAX_RSS,
        "the service's RSS peaked at {} MiB",
        peak >> 20
    );
    // The service counted the same subscribers out.
    let metrics = crate::helpers::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let dropped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("udaconnect_hub_slow_subscribers_dropped_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("udaconnect_hub_slow_subscribers_dropped_total");
    assert_eq!(dropped as usize, cut, "subscribers the hub cut off");
    drop(served);
    db.drop_db().await;
}
