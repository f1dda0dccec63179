//! The rehearsal's REST traffic through the Service's endpoints: location reports posted in
//! batches (sent again to another pod when a pod answers 503 or goes away, so nothing is
//! lost: a repeat carries the same event ids, which the pipeline drops), and readers asking
//! for live state, connection history and status. Every answer is tallied by operation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::SecondsFormat;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use udaconnect_actors::domain::{LocationEvent, PersonId};

use super::pods::Endpoints;

/// An operation of the REST API: method and path template, as `/openapi.json` names it.
pub type Operation = (&'static str, &'static str);

/// `POST /v1/locations/batch`.
pub const POST_BATCH: Operation = ("post", "/v1/locations/batch");
/// `GET /v1/persons/{person_id}/live`.
pub const GET_LIVE: Operation = ("get", "/v1/persons/{person_id}/live");
/// `GET /v1/persons/{person_id}/connections`.
pub const GET_CONNECTIONS: Operation = ("get", "/v1/persons/{person_id}/connections");
/// `GET /v1/status`.
pub const GET_STATUS: Operation = ("get", "/v1/status");
/// `GET /v1/persons/{person_id}/connections/stream`.
pub const GET_STREAM: Operation = ("get", "/v1/persons/{person_id}/connections/stream");

/// How the REST API answered during a run.
#[derive(Debug, Default, Serialize)]
pub struct Tally {
    /// Answers by `"<method> <path> <status>"`.
    pub answers: BTreeMap<String, u64>,
    /// Requests that got no answer (connection refused or reset), by `"<method> <path>"`.
    pub no_answer: BTreeMap<String, u64>,
    /// Answers that are neither 2xx nor a 503 (the first 20, with their bodies).
    pub unexpected: Vec<String>,
    /// How many such answers there were.
    pub unexpected_count: u64,
    /// Operations that answered 503: checked against `/openapi.json` at the end.
    #[serde(skip)]
    pub answered_503: std::collections::BTreeSet<Operation>,
}

impl Tally {
    /// Counts one answer of `op`; `body` is kept when the status is unexpected.
    pub fn answer(&mut self, op: Operation, status: u16, body: &str) {
        *self
            .answers
            .entry(format!("{} {} {status}", op.0, op.1))
            .or_default() += 1;
        if status == 503 {
            self.answered_503.insert(op);
        } else if !(200..300).contains(&status) {
            self.unexpected_count += 1;
            if self.unexpected.len() < 20 {
                self.unexpected
                    .push(format!("{} {} answered {status}: {body}", op.0, op.1));
            }
        }
    }

    /// Counts one request of `op` that got no answer.
    pub fn no_answer(&mut self, op: Operation) {
        *self
            .no_answer
            .entry(format!("{} {}", op.0, op.1))
            .or_default() += 1;
    }

    /// Notes every 503 answer of an operation whose `responses` in `spec` (the service's
    /// `/openapi.json`) has no 503 as unexpected.
    pub fn check_documented(&mut self, spec: &Value) {
        for (method, path) in std::mem::take(&mut self.answered_503) {
            if spec["paths"][path][method]["responses"]["503"].is_null() {
                self.unexpected_count += 1;
                self.unexpected.push(format!(
                    "{method} {path} answered 503, which it does not document"
                ));
            }
        }
    }
}

/// A tally shared by the tasks of a run.
pub type SharedTally = Arc<Mutex<Tally>>;

/// Reads `response` to its end and tallies its status as an answer of `op`; returns the
/// status and the body (empty when it could not be read).
pub async fn record(
    tally: &SharedTally,
    op: Operation,
    response: reqwest::Response,
) -> (u16, String) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    tally
        .lock()
        .expect("not poisoned")
        .answer(op, status, &text);
    (status, text)
}

/// One report as the REST API takes it (`recorded_at` in RFC 3339, µs).
fn report_json(e: &LocationEvent) -> Value {
    json!({
        "event_id": e.event_id,
        "person_id": e.person_id,
        "lat": e.lat,
        "lon": e.lon,
        "recorded_at": udaconnect::store::timestamp(e.recorded_at)
            .to_rfc3339_opts(SecondsFormat::Micros, true),
    })
}

/// Posts one batch, to the next ready pod, until a pod accepts every report; returns how many
/// were accepted. A 503 or no answer moves on to the next pod; errors when a report is
/// rejected (the simulator's reports are valid) or no pod accepts within two minutes.
async fn post_batch(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    batch: &[LocationEvent],
    turn: usize,
    tally: &SharedTally,
) -> anyhow::Result<u64> {
    let body = json!({ "events": batch.iter().map(report_json).collect::<Vec<_>>() });
    let deadline = Instant::now() + Duration::from_secs(120);
    for attempt in 0.. {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no pod accepted a batch within 2 minutes ({attempt} attempts)"
        );
        let Some((_, base)) = endpoints.pick(turn + attempt) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let answer = http
            .post(format!("{base}/v1/locations/batch"))
            .json(&body)
            .send()
            .await;
        let response = match answer {
            Ok(r) => r,
            Err(_) => {
                tally.lock().expect("not poisoned").no_answer(POST_BATCH);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (status, text) = record(tally, POST_BATCH, response).await;
        if status == 202 {
            let report: Value = serde_json::from_str(&text)?;
            let rejected = report["rejected"].as_array().map_or(0, Vec::len);
            anyhow::ensure!(rejected == 0, "a pod rejected simulated reports: {text}");
            return Ok(report["accepted"].as_u64().unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!("the loop returns or fails")
}

/// Posts `events` in batches of `batch`, `in_flight` at a time, the `i`-th of `n` batches
/// not before `over × i / n` from now (as fast as answers come when `over` is zero); returns
/// the reports accepted.
pub async fn post_all(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    events: &[LocationEvent],
    (batch, in_flight): (usize, usize),
    over: Duration,
    tally: &SharedTally,
) -> anyhow::Result<u64> {
    let start = tokio::time::Instant::now();
    let batches = events.len().div_ceil(batch.max(1)).max(1);
    // Owned, so that the stream can run in a spawned task.
    let sends: Vec<_> = events
        .chunks(batch.max(1))
        .enumerate()
        .map(|(i, chunk)| {
            let (http, endpoints, tally) = (http.clone(), endpoints.clone(), Arc::clone(tally));
            let chunk = chunk.to_vec();
            async move {
                tokio::time::sleep_until(start + over.mul_f64(i as f64 / batches as f64)).await;
                post_batch(&http, &endpoints, &chunk, i, &tally).await
            }
        })
        .collect();
    let mut answers = futures::stream::iter(sends).buffered(in_flight.max(1));
    let mut accepted = 0;
    while let Some(n) = answers.next().await {
        accepted += n?;
    }
    Ok(accepted)
}

/// Until `stop`, asks a ready pod every 100 ms, in turn, for a person's live state, their
/// connection history, or the pipeline's status, and tallies the answers.
pub async fn read_until(
    http: reqwest::Client,
    endpoints: Endpoints,
    persons: Vec<PersonId>,
    stop: CancellationToken,
    tally: SharedTally,
) {
    let ops = [GET_LIVE, GET_CONNECTIONS, GET_STATUS];
    for turn in 0usize.. {
        if stop.is_cancelled() {
            return;
        }
        let op = ops[turn % ops.len()];
        let person = persons[(turn / ops.len()) % persons.len().max(1)];
        if let Some((_, base)) = endpoints.pick(turn) {
            let url = format!("{base}{}", op.1.replace("{person_id}", &person.to_string()));
            match http.get(url).send().await {
                Ok(r) => {
                    record(&tally, op, r).await;
                }
                Err(_) => tally.lock().expect("not poisoned").no_answer(op),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
