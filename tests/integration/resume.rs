//! Notification streams that survive a reconnect: a client that drops mid-conference and
//! comes back naming the last notification it received (SSE `Last-Event-ID`, the WebSocket's
//! `last_event_id`) ends with exactly what an uninterrupted client got: nothing missed, nothing
//! twice. A resume point the process does not hold starts with a `resume.gap` event.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::helpers::{client, organizer_token, test_config, TestApp, TestDb};
use crate::rest::{assert_error, create_person, next_text, now_rfc3339, post};

/// One Server-Sent Event: its `event:`, `id:` and parsed `data:`.
#[derive(Debug, Clone)]
struct Sse {
    kind: String,
    id: Option<String>,
    data: Value,
}

/// An open SSE response and what has been read of it.
struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    /// Opens `url` as an organizer, resuming after `last_event_id` when given.
    async fn open(url: &str, last_event_id: Option<&str>) -> Self {
        let mut request = client().get(url);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("SSE request");
        assert_eq!(response.status().as_u16(), 200, "{url}");
        Self {
            stream: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped), within `within`.
    async fn next(&mut self, within: Duration) -> Sse {
        tokio::time::timeout(within, async {
            loop {
                while let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let (mut kind, mut id, mut data) = (None, None, String::new());
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            kind = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("id:") {
                            id = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim());
                        }
                    }
                    if let Some(kind) = kind {
                        let data = serde_json::from_str(&data).expect("event data is JSON");
                        return Sse { kind, id, data };
                    }
                }
                let chunk = self
                    .stream
                    .next()
                    .await
                    .expect("stream open")
                    .expect("chunk");
                self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .expect("an event in time")
    }
}

/// `person` meets `peer`: both report at one place, now, 1 m apart.
async fn meet(app: &TestApp, person: i64, peer: i64, lat: f64) {
    let t = now_rfc3339();
    for (who, lat) in [(person, lat), (peer, lat + 0.000009)] {
        let body = json!({"person_id": who, "lat": lat, "lon": -122.290524, "recorded_at": t});
        let (status, body) = post(&app.url("/v1/locations"), &body).await;
        assert_eq!(status, 202, "{body}");
    }
}

/// The notification of a started connection between `person` and `peer` from `reader`.
async fn started(reader: &mut SseReader, person: i64, peer: i64) -> Sse {
    let event = reader.next(Duration::from_secs(30)).await;
    assert_eq!(event.kind, "connection.started", "{event:?}");
    assert_eq!(
        (
            event.data["person_id"].as_i64(),
            event.data["peer_id"].as_i64()
        ),
        (Some(person), Some(peer)),
        "{event:?}"
    );
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sse_client_resuming_with_last_event_id_gets_exactly_what_it_missed() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    app.pipeline(Duration::from_secs(60)).await;
    let alice = create_person(&app, "Alice").await;
    let mut peers = Vec::new();
    for name in ["Bob", "Carol", "Dan", "Erin", "Frank", "Grace"] {
        peers.push(create_person(&app, name).await);
    }
    let url = app.url(&format!("/v1/persons/{alice}/connections/stream"));
    let mut steady = SseReader::open(&url, None).await;
    let mut dropping = SseReader::open(&url, None).await;
    let mut heard_steady = Vec::new();
    let mut heard_dropping = Vec::new();
    // Each meeting at its own place, 100 m apart, so each is a new episode.
    let place = |i: usize| 37.5 + 0.001 * i as f64;

    // Alice meets Bob and Carol: both clients hear both.
    for (i, peer) in peers[..2].iter().enumerate() {
        meet(&app, alice, *peer, place(i)).await;
        heard_steady.push(started(&mut steady, alice, *peer).await);
        heard_dropping.push(started(&mut dropping, alice, *peer).await);
    }
    // The second client drops; Alice meets Dan and Erin meanwhile.
    let last = heard_dropping
        .last()
        .and_then(|e| e.id.clone())
        .expect("an id");
    drop(dropping);
    for (i, peer) in peers[2..4].iter().enumerate() {
        meet(&app, alice, *peer, place(2 + i)).await;
        heard_steady.push(started(&mut steady, alice, *peer).await);
    }
    // It comes back naming the last one it heard: first what it missed, once each.
    let mut resumed = SseReader::open(&url, Some(&last)).await;
    for peer in &peers[2..4] {
        heard_dropping.push(started(&mut resumed, alice, *peer).await);
    }
    // Then the live ones, with the other client.
    for (i, peer) in peers[4..].iter().enumerate() {
        meet(&app, alice, *peer, place(4 + i)).await;
        heard_steady.push(started(&mut steady, alice, *peer).await);
        heard_dropping.push(started(&mut resumed, alice, *peer).await);
    }
    let ids = |events: &[Sse]| -> Vec<String> {
        events
            .iter()
            .map(|e| e.id.clone().expect("an id"))
            .collect()
    };
    assert_eq!(ids(&heard_dropping), ids(&heard_steady));
    assert_eq!(heard_steady.len(), 6);
    let data = |events: &[Sse]| -> Vec<Value> { events.iter().map(|e| e.data.clone()).collect() };
    assert_eq!(data(&heard_dropping), data(&heard_steady));

    // The everyone feed resumes the same way: after Alice's meeting with Dan, its stream holds
    // Alice's and each peer's notifications that followed.
    let feed = app.url("/v1/connections/stream");
    let dan = &heard_steady[2];
    let mut everyone = SseReader::open(&feed, dan.id.as_deref()).await;
    // The peers' own notifications interleave with Alice's in the order this process read
    // them (another partition); Alice's are read until her three.
    let mut alices = Vec::new();
    while alices.len() < 3 {
        let event = everyone.next(Duration::from_secs(10)).await;
        if event.data["person_id"].as_i64() == Some(alice) {
            alices.push(event.id.expect("an id"));
        }
    }
    assert_eq!(alices, ids(&heard_steady[3..]));

    // A resume point this process does not hold: a `resume.gap` first, then live.
    let unknown = uuid::Uuid::new_v4().to_string();
    let mut gap = SseReader::open(&url, Some(&unknown)).await;
    let first = gap.next(Duration::from_secs(10)).await;
    assert_eq!(first.kind, "resume.gap", "{first:?}");
    assert_eq!(first.data["last_event_id"], unknown.as_str());
    assert_eq!(first.id, None);
    // Not a notification id at all: 400 naming the header.
    let response = client()
        .get(&url)
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .expect("sent");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON");
    assert_error(
        &(status, body),
        400,
        "invalid_argument",
        Some("Last-Event-ID"),
    );

    // The WebSocket: `last_event_id` replays what followed for its persons, after `subscribed`.
    let ws = format!(
        "ws://{}/v1/ws?access_token={}&person_ids={alice}&last_event_id={}",
        app.rest_addr,
        organizer_token(),
        dan.id.as_deref().expect("an id")
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.expect("socket");
    assert_eq!(
        next_text(&mut socket).await,
        json!({"type": "subscribed", "person_ids": [alice]})
    );
    let mut replayed = Vec::new();
    for _ in 0..3 {
        let event = next_text(&mut socket).await;
        replayed.push(event["id"].as_str().expect("an id").to_owned());
    }
    assert_eq!(replayed, ids(&heard_steady[3..]));
    let _ = socket.close(None).await;
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}
