//! The rehearsal's subscribers: each follows one person's notifications over SSE
//! (`/v1/persons/{id}/connections/stream`) on a ready pod, and when the stream ends (its pod
//! went away) connects to another one and then reads the person's connection history, which
//! covers what it could not hear in between. Subscribing before reading leaves no gap but one:
//! episode changes reach the history up to [`CHANGES_FLUSH_INTERVAL`] after their
//! notification (they are written in batches), so the history is read again once that has
//! passed, as a client of the documented API must.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use udaconnect_actors::actors::person::CHANGES_FLUSH_INTERVAL;
use udaconnect_actors::domain::{Micros, PersonId};

use super::pods::Endpoints;
use super::traffic::{record, SharedTally, GET_CONNECTIONS, GET_STREAM};

/// What one notification or history item said about an episode: its peer, start and end
/// (µs since the Unix epoch; `None` while open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Heard {
    pub peer: PersonId,
    pub started_at: Micros,
    pub ended_at: Option<Micros>,
}

/// Everything one subscriber learnt.
#[derive(Debug, Default, Serialize)]
pub struct Subscriber {
    pub person: PersonId,
    /// `connection.started` and `connection.updated` notifications received live.
    pub started: Vec<Heard>,
    /// `connection.ended` notifications received live.
    pub ended: Vec<Heard>,
    /// Episodes read from the history after a reconnect.
    pub recovered: Vec<Heard>,
    /// Streams opened (1 when it never lost its pod).
    pub connects: u32,
}

fn micros_of(v: &Value) -> Option<Micros> {
    chrono::DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.timestamp_micros())
}

/// The episode a notification or history item describes (`peer_id` or `peer.id`).
fn heard(item: &Value) -> Option<Heard> {
    Some(Heard {
        peer: item["peer_id"].as_i64().or(item["peer"]["id"].as_i64())?,
        started_at: micros_of(&item["started_at"])?,
        ended_at: micros_of(&item["ended_at"]),
    })
}

/// Every episode of `person` in the history at `base`, page by page.
async fn history(
    http: &reqwest::Client,
    base: &str,
    person: PersonId,
    tally: &SharedTally,
) -> anyhow::Result<Vec<Heard>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/persons/{person}/connections?limit=1000");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let response = http.get(url).send().await?;
        let (status, text) = record(tally, GET_CONNECTIONS, response).await;
        anyhow::ensure!(status == 200, "history answered {status}");
        let page: Value = serde_json::from_str(&text)?;
        out.extend(
            page["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(heard),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(out),
        }
    }
}

/// Reads `person`'s history again once the episode changes notified before the reconnect
/// have been written (the flush interval and 2 s for the write), from any ready pod.
async fn read_again(
    http: reqwest::Client,
    endpoints: Endpoints,
    person: PersonId,
    tally: SharedTally,
    into: Arc<Mutex<Subscriber>>,
) {
    tokio::time::sleep(CHANGES_FLUSH_INTERVAL + Duration::from_secs(2)).await;
    for turn in 0..50 {
        if let Some((_, base)) = endpoints.pick(turn) {
            if let Ok(items) = history(&http, &base, person, &tally).await {
                into.lock().expect("not poisoned").recovered.extend(items);
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Follows `person` until `stop`, starting with the `first`-th ready pod; records into `into`.
pub async fn follow(
    http: reqwest::Client,
    endpoints: Endpoints,
    first: usize,
    stop: CancellationToken,
    tally: SharedTally,
    into: Arc<Mutex<Subscriber>>,
) {
    let person = into.lock().expect("not poisoned").person;
    for turn in first.. {
        if stop.is_cancelled() {
            return;
        }
        let Some((_, base)) = endpoints.pick(turn) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let url = format!("{base}/v1/persons/{person}/connections/stream");
        let response = match http.get(url).send().await {
            Ok(r) if r.status().as_u16() == 200 => {
                tally
                    .lock()
                    .expect("not poisoned")
                    .answer(GET_STREAM, 200, "");
                r
            }
            Ok(r) => {
                record(&tally, GET_STREAM, r).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => {
                tally.lock().expect("not poisoned").no_answer(GET_STREAM);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let reconnect = {
            let mut s = into.lock().expect("not poisoned");
            s.connects += 1;
            s.connects > 1
        };
        if reconnect {
            // Subscribed first: whatever happens from now on comes on the stream.
            match history(&http, &base, person, &tally).await {
                Ok(items) => into.lock().expect("not poisoned").recovered.extend(items),
                // The history is the gap's cover: without it, connect again.
                Err(_) => continue,
            }
            tokio::spawn(read_again(
                http.clone(),
                endpoints.clone(),
                person,
                Arc::clone(&tally),
                Arc::clone(&into),
            ));
        }
        let mut events = response.bytes_stream().eventsource();
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = events.next() => next,
            };
            let Some(Ok(event)) = next else { break };
            let (Ok(data), kind) = (serde_json::from_str::<Value>(&event.data), event.event) else {
                continue;
            };
            let Some(h) = heard(&data) else { continue };
            let mut s = into.lock().expect("not poisoned");
            match kind.as_str() {
                "connection.ended" => s.ended.push(h),
                _ => s.started.push(h),
            }
        }
    }
}
