//! A rehearsal of what a StatefulSet does to UdaConnect, on one machine (issue 19): pods
//! `udaconnect-0` … `udaconnect-{n-1}` as `udaconnect serve` processes against the `./dev`
//! PostgreSQL and broker, a simulated conference posted through REST to whichever pods are
//! ready (as a Service routes), subscribers following persons over SSE, readers asking for live
//! state, history and status; then a rolling restart (SIGTERM the highest ordinal, start it
//! again, wait until ready, then the next, as the StatefulSet controller rolls), a scale in by
//! one and out again. Afterwards the stored `connection` and `location` rows are compared with
//! the reference engine's over the same reports.
//!
//! Figures per step: SIGTERM to exit; the handover (SIGTERM until the partitions the pod owned
//! are restored and serving on their new owners, and until every partition is); start to
//! `/readyz` 200; start until every partition is served again with this pod serving its share.
//! Between steps the rehearsal waits for that (a settled group), as `minReadySeconds` makes
//! the StatefulSet controller wait. The `rehearsal` binary (`./dev rehearse`) prints them; the bench variant
//! preloads a conference that leaves about 1,000,000 points retained in the zones' windows.

pub mod pods;
pub mod subscribers;
pub mod traffic;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use pods::{wait_ready, Endpoints, Pod, PodSpec};
use serde::Serialize;
use serde_json::Value;
use subscribers::{Heard, Subscriber};
use tokio_util::sync::CancellationToken;
use traffic::{SharedTally, Tally};
use udaconnect::pipeline::ingest::Ingestor;
use udaconnect::Config;
use udaconnect_actors::domain::{Episode, LocationEvent, PersonId, MICROS_PER_S};
use udaconnect_actors::{Engine, EngineOptions, EngineParams};

use crate::produce::Services;
use crate::scratch::{cleanup, fresh, generate, stored_episodes, Leftovers};
use crate::sim::ConferenceConfig;

/// What to rehearse.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `udaconnect` binary the pods run.
    pub binary: PathBuf,
    /// Broker, partition counts and settings the pods share; each run gets a fresh database
    /// (on the server of `admin_url`) and topic prefix.
    pub base: Config,
    /// A URL of the PostgreSQL server's maintenance database (to create the run's database).
    pub admin_url: String,
    /// Pods in the StatefulSet (3).
    pub pods: usize,
    /// The simulated conference; its `start` is moved to end two minutes before the run, so
    /// that the default late horizon takes its reports.
    pub conference: ConferenceConfig,
    /// The share of the reports posted as fast as the pods take them before the roll (the
    /// state the pods hold when it starts); the rest streams in during the roll.
    pub preload: f64,
    /// How long the rest of the reports take to stream in, from the start of the roll.
    pub stream_over: Duration,
    /// Persons followed over SSE (those with the most episodes).
    pub subscribers: usize,
    /// Where the pods' logs go.
    pub work_dir: PathBuf,
    /// Keep the database and topics afterwards.
    pub keep: bool,
}

/// One step of the roll, with its times in seconds.
#[derive(Debug, Default, Serialize)]
pub struct Step {
    /// `restart`, `scale-in` or `scale-out`.
    pub action: &'static str,
    pub pod: String,
    /// Partitions (both stages) the pod owned when it was sent SIGTERM.
    pub partitions_owned: usize,
    /// The stopped pod's peak resident set size, MiB.
    pub peak_rss_mib: Option<f64>,
    pub sigterm_to_exit_s: Option<f64>,
    /// SIGTERM until every partition the pod owned is restored and serving on another pod (the
    /// pods' own times, see [`Run::all_serving_with`]).
    pub handover_s: Option<f64>,
    /// SIGTERM until every partition the pod owned had, on its new owner, handled the records
    /// its log held when it was restored there (the replay after its snapshot; longer when a
    /// release's last snapshot was abandoned: `release_budget_ms`).
    pub handover_caught_up_s: Option<f64>,
    /// SIGTERM until every partition of both stages is serving again.
    pub all_serving_after_stop_s: Option<f64>,
    /// Process start to `/readyz` 200.
    pub start_to_ready_s: Option<f64>,
    /// Process start until every partition is serving again, spread over the running pods
    /// with this one serving its share (restored from their snapshots): the last restore of
    /// the served set, by the pods' own times (see [`Run::all_serving_with`]).
    pub start_to_serving_s: Option<f64>,
    /// The same, as the 50 ms poll of every pod's `/v1/status` first saw it (later under
    /// load: a pod's status waits for its partitions' supervisors).
    pub start_to_serving_polled_s: Option<f64>,
}

/// What [`Run::all_serving_with`] saw, in time since its start.
struct Served {
    /// The last moved partition restored and serving on its new owner.
    moved: Option<Duration>,
    /// The last moved partition done replaying the log it found at its restore.
    caught_up: Option<Duration>,
    /// The last restore of the partitions served (and settled, when asked) when the wait
    /// ended, by the pods' own times.
    settled: Option<Duration>,
    /// Until every partition was served (and settled, when asked), as polled.
    all: Duration,
}

/// A local partition's restore, as its pod's status reports it.
struct Restored {
    at_us: Option<i64>,
    replayed_at_us: Option<i64>,
}

/// What one subscriber received, against the reference episodes of its person.
#[derive(Debug, Serialize)]
pub struct SubscriberFigures {
    pub person: PersonId,
    pub episodes: usize,
    /// Episodes neither announced live nor found in a history read after a reconnect.
    pub started_missing: usize,
    /// Episodes whose end was neither received live nor found in such a history.
    pub ended_missing: usize,
    /// `connection.ended` notifications that match no reference episode.
    pub wrong_ended: usize,
    pub connects: u32,
    pub heard_live: usize,
    pub recovered: usize,
}

/// The rehearsal's outcome.
#[derive(Debug, Serialize)]
pub struct Report {
    pub pods: usize,
    pub events: usize,
    pub unique_events: usize,
    /// Points the zones retain when the roll starts (the reference engine after the preload,
    /// which the actors equal).
    pub retained_points_at_roll: usize,
    pub accepted: u64,
    pub steps: Vec<Step>,
    /// Whether the stream was still posting when the roll ended.
    pub streamed_through_roll: bool,
    pub episodes_expected: usize,
    pub episodes_stored: usize,
    pub episodes_missing: usize,
    pub episodes_extra: usize,
    pub locations_stored: i64,
    /// Distinct reports sent whose event id `location` does not hold, and ids it holds that
    /// were not sent.
    pub locations_missing: usize,
    pub locations_extra: usize,
    pub subscribers: Vec<SubscriberFigures>,
    pub rest: Tally,
    /// `stage/partition` → owner, from `shard_owner`, at the end.
    pub owners_at_end: BTreeMap<String, String>,
    pub running_at_end: Vec<String>,
    /// Pods that exited without being stopped (a crash), with their status.
    pub unexpected_exits: Vec<String>,
    /// The highest peak resident set size of any pod, MiB, its shutdowns included.
    pub peak_rss_mib_max: f64,
    pub wall_s: f64,
}

/// Partitions unserved this long after a SIGTERM mean the group waited out a member's session
/// timeout (10 s): the stopped process did not leave the group.
pub const STALL_S: f64 = 9.0;

impl Report {
    /// Every way the rehearsal can fail its issue's must-show list, in words; empty when it
    /// passed.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.episodes_missing + self.episodes_extra > 0 {
            out.push(format!(
                "connection differs from the reference: {} missing, {} extra of {}",
                self.episodes_missing, self.episodes_extra, self.episodes_expected
            ));
        }
        if self.locations_missing + self.locations_extra > 0 {
            out.push(format!(
                "location differs from the reports sent: {} missing, {} extra of {}",
                self.locations_missing, self.locations_extra, self.unique_events
            ));
        }
        for step in self.steps.iter().filter(|s| s.sigterm_to_exit_s.is_some()) {
            if step.partitions_owned == 0 {
                out.push(format!(
                    "{} {} owned no partition when it was stopped: nothing was handed over",
                    step.action, step.pod
                ));
            }
            if step.all_serving_after_stop_s.is_some_and(|s| s >= STALL_S) {
                out.push(format!(
                    "{} {}: partitions unserved for {:.1} s after SIGTERM (a session timeout: \
                     the pod did not leave the group)",
                    step.action,
                    step.pod,
                    step.all_serving_after_stop_s.unwrap_or_default()
                ));
            }
        }
        if !self.rest.no_answer.is_empty() {
            out.push(format!(
                "REST requests to ready pods got no answer: {:?}",
                self.rest.no_answer
            ));
        }
        if !self.unexpected_exits.is_empty() {
            out.push(format!(
                "pods exited on their own: {:?}",
                self.unexpected_exits
            ));
        }
        for s in &self.subscribers {
            if s.started_missing + s.ended_missing + s.wrong_ended > 0 {
                out.push(format!("subscriber of {}: {s:?}", s.person));
            }
        }
        if self.rest.unexpected_count > 0 {
            out.push(format!(
                "unexpected REST answers: {:?}",
                self.rest.unexpected
            ));
        }
        let running: BTreeSet<&String> = self.running_at_end.iter().collect();
        if let Some((p, o)) = self
            .owners_at_end
            .iter()
            .find(|(_, o)| !running.contains(o))
        {
            out.push(format!(
                "shard_owner names {o} for {p}, which is not running"
            ));
        }
        out
    }
}

/// The reference: the synchronous engine over every report, and the points it retains after
/// the first `preloaded` of them.
fn reference(
    events: &[LocationEvent],
    preloaded: usize,
    params: &EngineParams,
) -> anyhow::Result<(usize, Vec<Episode>)> {
    let mut engine = Engine::new(params, EngineOptions::default())
        .map_err(|e| anyhow::anyhow!("invalid engine parameters: {e:?}"))?;
    for chunk in events[..preloaded].chunks(1_000) {
        engine.ingest(chunk);
    }
    let retained = engine.retained_points();
    for chunk in events[preloaded..].chunks(1_000) {
        engine.ingest(chunk);
    }
    engine.finish();
    Ok((retained, engine.episodes()))
}

/// Runs the rehearsal; `say` hears progress. The database and topics are removed afterwards
/// unless `keep`. Errors when a step cannot be carried out (a pod that does not start or
/// stop); what the run found is in the [`Report`] ([`Report::failures`]).
pub async fn run(options: &Options, say: &(dyn Fn(&str) + Sync)) -> anyhow::Result<Report> {
    let mut leftovers = Leftovers::default();
    let result = rehearse(options, &mut leftovers, say).await;
    if !options.keep {
        cleanup(&options.base, &options.admin_url, &leftovers).await;
    }
    result
}

/// The shared state of a run.
struct Run<'a> {
    options: &'a Options,
    spec: PodSpec,
    pods: Vec<Pod>,
    endpoints: Endpoints,
    http: reqwest::Client,
    db: tokio_postgres::Client,
    /// Zone and person partitions.
    partitions: (usize, usize),
    say: &'a (dyn Fn(&str) + Sync),
}

async fn rehearse(
    options: &Options,
    leftovers: &mut Leftovers,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<Report> {
    let begun = Instant::now();
    let mut conference = options.conference.clone();
    let now = chrono::Utc::now().timestamp();
    conference.start = (now - i64::from(conference.duration_s) - 120) * MICROS_PER_S;
    let mut config = fresh(&options.base, &options.admin_url, leftovers).await?;
    config.zone_resolution = conference.zone_resolution;
    say("generating the conference and its reference");
    let (sim, events) = generate(conference)?;
    let preloaded = ((events.len() as f64) * options.preload.clamp(0.0, 1.0)) as usize;
    let params = config.engine_params();
    let (retained, expected) = reference(&events, preloaded, &params)?;
    let unique: BTreeSet<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
    say(&format!(
        "{} reports ({} distinct), {} episodes; {} points retained after the preload of {preloaded}",
        events.len(),
        unique.len(),
        expected.len(),
        retained
    ));

    // Only the preparation: the pods connect on their own.
    drop(Services::prepare(&config, &sim).await?);
    let (db, connection) =
        tokio_postgres::connect(config.database_url.expose(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    std::fs::create_dir_all(&options.work_dir)?;
    // The pods forward to each other with it, and the rehearsal's own REST calls (status,
    // subscriptions, ingest) carry it: the admin token has the organizer's rights.
    let admin_token = uuid::Uuid::new_v4().simple().to_string();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {admin_token}").parse()?,
    );
    let mut run = Run {
        options,
        spec: PodSpec {
            binary: options.binary.clone(),
            config: config.clone(),
            admin_token,
            jwt_hs256_key: format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
            log_dir: options.work_dir.clone(),
        },
        pods: (0..options.pods)
            .map(Pod::new)
            .collect::<anyhow::Result<_>>()?,
        endpoints: Endpoints::default(),
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .default_headers(headers)
            .build()?,
        db,
        partitions: (
            config.locations_partitions as usize,
            config.person_updates_partitions as usize,
        ),
        say,
    };
    let outcome = run.roll(&events, preloaded, &expected, &config).await;
    let mut peak_rss = 0;
    let mut bad_stops = Vec::new();
    for pod in &mut run.pods {
        if pod.running() {
            match pod.terminate(Duration::from_secs(60)).await {
                Ok((_, peak)) => peak_rss = peak_rss.max(peak),
                Err(e) => bad_stops.push(format!("{e:#}")),
            }
        }
    }
    let mut report = outcome?;
    // A pod that failed its last graceful stop counts as a pod that did not exit cleanly.
    report.unexpected_exits.extend(bad_stops);
    let step_peak = report
        .steps
        .iter()
        .filter_map(|s| s.peak_rss_mib)
        .fold(0.0, f64::max);
    report.peak_rss_mib_max = step_peak.max(peak_rss as f64 / f64::from(1 << 20));
    report.events = events.len();
    report.unique_events = unique.len();
    report.retained_points_at_roll = retained;
    report.wall_s = begun.elapsed().as_secs_f64();
    Ok(report)
}

/// The partitions a `/v1/status` lists as this process's own.
fn local_partitions(status: Option<&Value>) -> impl Iterator<Item = &Value> {
    status
        .and_then(|s| s["partitions"].as_array())
        .into_iter()
        .flatten()
        .filter(|p| p["local"] == true)
}

/// How many episodes of `these` are not in `those` (equal in every field), looked up by
/// (person, peer, start): linear, where a scan of `those` per episode took minutes at 400,000.
fn not_in(these: &[Episode], those: &[Episode]) -> usize {
    let mut by_key: std::collections::HashMap<(PersonId, PersonId, i64), Vec<&Episode>> =
        std::collections::HashMap::with_capacity(those.len());
    for e in those {
        by_key
            .entry((e.person, e.peer, e.started_at))
            .or_default()
            .push(e);
    }
    these
        .iter()
        .filter(|e| {
            !by_key
                .get(&(e.person, e.peer, e.started_at))
                .is_some_and(|found| found.contains(e))
        })
        .count()
}

/// The persons with the most reference episodes (ties by id), `n` of them.
fn most_connected(expected: &[Episode], n: usize) -> Vec<PersonId> {
    let mut counts: BTreeMap<PersonId, usize> = BTreeMap::new();
    for e in expected {
        *counts.entry(e.person).or_default() += 1;
    }
    let mut ranked: Vec<(usize, PersonId)> = counts.into_iter().map(|(p, c)| (c, p)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.into_iter().take(n).map(|(_, p)| p).collect()
}

/// How a subscriber's notifications and recovered history cover its person's episodes.
fn coverage(s: &Subscriber, expected: &[Episode]) -> SubscriberFigures {
    let mine: Vec<&Episode> = expected.iter().filter(|e| e.person == s.person).collect();
    let same = |h: &Heard, e: &Episode| h.peer == e.peer && h.started_at == e.started_at;
    let announced = |e: &Episode| s.started.iter().chain(&s.recovered).any(|h| same(h, e));
    let ended = |e: &Episode| {
        s.ended
            .iter()
            .chain(&s.recovered)
            .any(|h| same(h, e) && h.ended_at == e.ended_at)
    };
    SubscriberFigures {
        person: s.person,
        episodes: mine.len(),
        started_missing: mine.iter().filter(|e| !announced(e)).count(),
        ended_missing: mine.iter().filter(|e| !ended(e)).count(),
        wrong_ended: s
            .ended
            .iter()
            .filter(|h| !mine.iter().any(|e| same(h, e) && h.ended_at == e.ended_at))
            .count(),
        connects: s.connects,
        heard_live: s.started.len() + s.ended.len(),
        recovered: s.recovered.len(),
    }
}

impl Run<'_> {
    async fn roll(
        &mut self,
        events: &[LocationEvent],
        preloaded: usize,
        expected: &[Episode],
        config: &Config,
    ) -> anyhow::Result<Report> {
        (self.say)(&format!("starting {} pods", self.pods.len()));
        for i in 0..self.pods.len() {
            self.pods[i].start(&self.spec)?;
        }
        for i in 0..self.pods.len() {
            let log = self.pods[i].log(&self.spec);
            wait_ready(&self.http, &self.pods[i], Duration::from_secs(120), &log).await?;
            self.endpoints.join(&self.pods[i]);
        }
        // The StatefulSet's first pods, settled before the roll.
        self.all_serving_with(
            true,
            &BTreeSet::new(),
            (Instant::now(), chrono::Utc::now().timestamp_micros()),
            Duration::from_secs(120),
        )
        .await?;

        let tally: SharedTally = Arc::new(Mutex::new(Tally::default()));
        let stop = CancellationToken::new();
        let followed = most_connected(expected, self.options.subscribers);
        let heard: Vec<Arc<Mutex<Subscriber>>> = followed
            .iter()
            .map(|&person| {
                Arc::new(Mutex::new(Subscriber {
                    person,
                    ..Subscriber::default()
                }))
            })
            .collect();
        for (i, into) in heard.iter().enumerate() {
            tokio::spawn(subscribers::follow(
                self.http.clone(),
                self.endpoints.clone(),
                i,
                stop.clone(),
                Arc::clone(&tally),
                Arc::clone(into),
            ));
        }
        crate::eventually(Duration::from_secs(30), || {
            heard
                .iter()
                .all(|s| s.lock().expect("not poisoned").connects >= 1)
        })
        .await
        .context("the subscribers did not connect within 30 s")?;

        (self.say)(&format!("preloading {preloaded} reports"));
        let batching = (2_000, 4);
        let mut accepted = traffic::post_all(
            &self.http,
            &self.endpoints,
            &events[..preloaded],
            batching,
            Duration::ZERO,
            &tally,
        )
        .await?;
        self.caught_up(Duration::from_secs(600)).await?;

        (self.say)(&format!(
            "streaming {} reports over {:?} while the pods roll",
            events.len() - preloaded,
            self.options.stream_over
        ));
        let stream = {
            let (http, endpoints, tally) = (
                self.http.clone(),
                self.endpoints.clone(),
                Arc::clone(&tally),
            );
            let rest = events[preloaded..].to_vec();
            let over = self.options.stream_over;
            tokio::spawn(async move {
                traffic::post_all(&http, &endpoints, &rest, (100, 2), over, &tally).await
            })
        };
        let readers = tokio::spawn(traffic::read_until(
            self.http.clone(),
            self.endpoints.clone(),
            followed.clone(),
            stop.clone(),
            Arc::clone(&tally),
        ));
        let mut steps = Vec::new();
        for i in (0..self.pods.len()).rev() {
            let mut step = self.stop_pod(i, "restart").await?;
            self.start_pod(i, &mut step).await?;
            steps.push(step);
        }
        let last = self.pods.len() - 1;
        steps.push(self.stop_pod(last, "scale-in").await?);
        let mut out = Step {
            action: "scale-out",
            pod: self.pods[last].name.clone(),
            ..Step::default()
        };
        self.start_pod(last, &mut out).await?;
        steps.push(out);
        let streamed_through_roll = !stream.is_finished();
        accepted += stream.await.context("the stream task failed")??;

        (self.say)("declaring the end of the conference");
        let end = events.iter().map(|e| e.recorded_at).max().unwrap_or(0);
        let pool = udaconnect::store::pool(config, Duration::from_secs(10))?;
        Ingestor::standalone(config, pool)
            .await?
            .advance_event_time(end + config.engine_params().settle_us())
            .await?;
        let unique: BTreeSet<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
        let (stored, stored_ids) = self.wait_reference(expected, &unique).await?;
        let covered = || {
            heard.iter().all(|s| {
                let c = coverage(&s.lock().expect("not poisoned"), expected);
                c.started_missing + c.ended_missing == 0
            })
        };
        // Late ones are reported, not waited for forever.
        let _ = crate::eventually(Duration::from_secs(60), covered).await;
        stop.cancel();
        let _ = readers.await;
        let mut rest = std::mem::take(&mut *tally.lock().expect("not poisoned"));
        let spec: Value = self
            .http
            .get(format!("{}/openapi.json", self.pods[0].base_url()))
            .send()
            .await?
            .json()
            .await?;
        rest.check_documented(&spec);
        let mut unexpected_exits = Vec::new();
        let mut running_at_end = Vec::new();
        for pod in &mut self.pods {
            match pod.exited() {
                Some(status) => unexpected_exits.push(format!("{} {status}", pod.name)),
                None if pod.running() => running_at_end.push(pod.name.clone()),
                None => {}
            }
        }
        Ok(Report {
            pods: self.pods.len(),
            events: 0,
            unique_events: 0,
            retained_points_at_roll: 0,
            accepted,
            steps,
            streamed_through_roll,
            episodes_expected: expected.len(),
            episodes_stored: stored.len(),
            episodes_missing: not_in(expected, &stored),
            episodes_extra: not_in(&stored, expected),
            locations_stored: stored_ids.len() as i64,
            locations_missing: unique.difference(&stored_ids).count(),
            locations_extra: stored_ids.difference(&unique).count(),
            subscribers: heard
                .iter()
                .map(|s| coverage(&s.lock().expect("not poisoned"), expected))
                .collect(),
            rest,
            owners_at_end: self.owners().await?,
            running_at_end,
            unexpected_exits,
            peak_rss_mib_max: 0.0,
            wall_s: 0.0,
        })
    }

    /// `stage/partition` → owner, from `shard_owner`.
    async fn owners(&self) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(self
            .db
            .query("SELECT stage, partition, owner FROM shard_owner", &[])
            .await?
            .iter()
            .map(|r| {
                (
                    format!("{}/{}", r.get::<_, String>(0), r.get::<_, i32>(1)),
                    r.get(2),
                )
            })
            .collect())
    }

    /// Each running pod's `/v1/status`, by name; `None` for a pod that does not answer.
    async fn statuses(&self) -> BTreeMap<String, Option<Value>> {
        // All pods at once: one slow to answer (a loaded pod, or one stopping) does not delay
        // what the others say, nor the handover read from them.
        let asked = self.pods.iter().filter(|p| p.running()).map(|pod| {
            let request = self
                .http
                .get(format!("{}/v1/status", pod.base_url()))
                .timeout(Duration::from_secs(2));
            async move {
                let status = match request.send().await {
                    Ok(r) if r.status().is_success() => r.json().await.ok(),
                    _ => None,
                };
                (pod.name.clone(), status)
            }
        });
        futures::future::join_all(asked).await.into_iter().collect()
    }

    /// Each running pod's local partitions, `(stage, partition)`, with when the pod restored
    /// each and had replayed its log (µs since the Unix epoch, from the status's
    /// `restored_at` and `replayed_at`); a pod that does not answer serves nothing.
    async fn local(&self) -> BTreeMap<String, BTreeMap<(String, i64), Restored>> {
        let micros = |v: &Value| {
            v.as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.timestamp_micros())
        };
        self.statuses()
            .await
            .into_iter()
            .map(|(name, status)| {
                let local = local_partitions(status.as_ref())
                    .filter_map(|p| {
                        Some((
                            (p["stage"].as_str()?.to_owned(), p["partition"].as_i64()?),
                            Restored {
                                at_us: micros(&p["restored_at"]),
                                replayed_at_us: micros(&p["replayed_at"]),
                            },
                        ))
                    })
                    .collect();
                (name, local)
            })
            .collect()
    }

    /// Whether every partition of both stages is served by a running pod and, when `settled`,
    /// each running pod serves its share of each stage (the group has finished spreading
    /// them: what a StatefulSet's `minReadySeconds` waits for before the next pod).
    fn served(&self, serving: &BTreeMap<String, BTreeSet<(String, i64)>>, settled: bool) -> bool {
        let all: BTreeSet<&(String, i64)> = serving.values().flatten().collect();
        let (zones, persons) = self.partitions;
        if all.len() != zones + persons {
            return false;
        }
        let pods = serving.len().max(1);
        !settled
            || serving.values().all(|own| {
                let of = |stage: &str| own.iter().filter(|(s, _)| s == stage).count();
                of("zones") >= zones / pods && of("persons") >= persons / pods
            })
    }

    /// Waits until every partition is served (and, when `settled`, spread over the running
    /// pods, see [`Run::served`]) and the partitions in `moved` have replayed their logs on
    /// their new owners. The handover's times are the pods' own (their status's `restored_at`
    /// and `replayed_at`, less `since_us`, the same clock), not when a poll saw them: a loaded
    /// pod answers its status late.
    async fn all_serving_with(
        &self,
        settled: bool,
        moved: &BTreeSet<(String, i64)>,
        (since, since_us): (Instant, i64),
        within: Duration,
    ) -> anyhow::Result<Served> {
        let after = |at_us: Option<i64>| {
            at_us.map(|at| Duration::from_micros(at.saturating_sub(since_us).max(0) as u64))
        };
        loop {
            let local = self.local().await;
            let serving: BTreeMap<String, BTreeSet<(String, i64)>> = local
                .iter()
                .map(|(name, local)| (name.clone(), local.keys().cloned().collect()))
                .collect();
            // Each moved partition as its current owner reports it.
            let now: Vec<Option<&Restored>> = moved
                .iter()
                .map(|p| local.values().find_map(|l| l.get(p)))
                .collect();
            let replayed = now
                .iter()
                .all(|r| r.is_some_and(|r| r.replayed_at_us.is_some()));
            if replayed && self.served(&serving, settled) {
                let latest = |at: fn(&Restored) -> Option<i64>| {
                    now.iter()
                        .map(|r| r.and_then(at))
                        .try_fold(i64::MIN, |m, t| t.map(|t| m.max(t)))
                };
                let some = !moved.is_empty();
                // The last restore completed the served set this poll saw.
                let settled_at = local
                    .values()
                    .flat_map(|l| l.values())
                    .map(|r| r.at_us)
                    .try_fold(i64::MIN, |m, t| t.map(|t| m.max(t)));
                return Ok(Served {
                    moved: after(latest(|r| r.at_us).filter(|_| some)),
                    caught_up: after(latest(|r| r.replayed_at_us).filter(|_| some)),
                    settled: after(settled_at),
                    all: since.elapsed(),
                });
            }
            anyhow::ensure!(
                since.elapsed() < within,
                "not every partition served within {within:?}: {serving:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes pod `i` out of the endpoints, sends it SIGTERM and times its exit and the
    /// handover of its partitions.
    async fn stop_pod(&mut self, i: usize, action: &'static str) -> anyhow::Result<Step> {
        let name = self.pods[i].name.clone();
        let moved: BTreeSet<(String, i64)> = self
            .local()
            .await
            .remove(&name)
            .unwrap_or_default()
            .into_keys()
            .collect();
        (self.say)(&format!(
            "{action}: SIGTERM to {name} ({} partitions)",
            moved.len()
        ));
        self.endpoints.leave(&self.pods[i]);
        let stopping = self.pods[i].signal()?;
        let signalled = (stopping.signalled, stopping.signalled_at_us);
        // The handover is watched while the pod shuts down, not after its exit.
        let (exit, served) = tokio::join!(
            stopping.wait(Duration::from_secs(90)),
            self.all_serving_with(false, &moved, signalled, Duration::from_secs(120)),
        );
        let (exit, peak_rss) = exit?;
        let served = served?;
        Ok(Step {
            action,
            pod: name,
            partitions_owned: moved.len(),
            sigterm_to_exit_s: Some(exit.as_secs_f64()),
            peak_rss_mib: Some(peak_rss as f64 / (1 << 20) as f64),
            handover_s: served.moved.map(|d| d.as_secs_f64()),
            handover_caught_up_s: served.caught_up.map(|d| d.as_secs_f64()),
            all_serving_after_stop_s: Some(served.all.as_secs_f64()),
            ..Step::default()
        })
    }

    /// Starts pod `i` again and times it until ready and serving.
    async fn start_pod(&mut self, i: usize, step: &mut Step) -> anyhow::Result<()> {
        (self.say)(&format!("starting {}", self.pods[i].name));
        let started = self.pods[i].start(&self.spec)?;
        // The same moment on the wall clock (the pods' restore times are compared with it).
        let started_at_us =
            chrono::Utc::now().timestamp_micros() - started.elapsed().as_micros() as i64;
        let log = self.pods[i].log(&self.spec);
        let ready = wait_ready(&self.http, &self.pods[i], Duration::from_secs(120), &log).await?;
        self.endpoints.join(&self.pods[i]);
        let served = self
            .all_serving_with(
                true,
                &BTreeSet::new(),
                (started, started_at_us),
                Duration::from_secs(120),
            )
            .await?;
        step.start_to_ready_s = Some((ready - started).as_secs_f64());
        // The pods' own times; the poll sees it later when a loaded pod answers its status late.
        step.start_to_serving_s = served.settled.map(|d| d.as_secs_f64());
        step.start_to_serving_polled_s = Some(served.all.as_secs_f64());
        Ok(())
    }

    /// Waits until every running pod has processed everything in its partitions and its
    /// effects are durable: each partition's stored snapshot reaches the log's end (Kafka's
    /// consumer-group lag, end minus committed offset, is 0), so a burst posted before is
    /// written, not still queued for PostgreSQL.
    async fn caught_up(&self, within: Duration) -> anyhow::Result<()> {
        let since = Instant::now();
        loop {
            // A pod that does not answer is not caught up.
            let done = self.statuses().await.values().all(|status| {
                status
                    .as_ref()
                    .is_some_and(|s| s["lag_total"].as_i64() == Some(0))
                    && local_partitions(status.as_ref()).all(|p| {
                        let end = p["end_offset"].as_i64();
                        p["lag"].as_i64() == Some(0)
                            && (p["snapshot_offset"].as_i64() == end || end == Some(0))
                    })
            });
            if done {
                return Ok(());
            }
            anyhow::ensure!(
                since.elapsed() < within,
                "the pods did not catch up within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits up to five minutes until `connection` equals `expected` and `location` holds
    /// exactly the event ids `unique`; returns what is stored then (equal or not).
    async fn wait_reference(
        &self,
        expected: &[Episode],
        unique: &BTreeSet<uuid::Uuid>,
    ) -> anyhow::Result<(Vec<Episode>, BTreeSet<uuid::Uuid>)> {
        let since = Instant::now();
        loop {
            let stored = stored_episodes(&self.db).await?;
            let ids: BTreeSet<uuid::Uuid> = self
                .db
                .query("SELECT event_id FROM location", &[])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let equal = stored == expected && ids == *unique;
            if equal || since.elapsed() > Duration::from_secs(300) {
                return Ok((stored, ids));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episodes_are_compared_in_every_field() {
        let a = Episode {
            person: 1,
            peer: 2,
            started_at: 10,
            last_seen_at: 20,
            ended_at: Some(20),
            colocations: 3,
            min_distance_m: 1.5,
            lat: 46.0,
            lon: 7.0,
        };
        let later = Episode {
            started_at: 30,
            last_seen_at: 40,
            ended_at: Some(40),
            ..a
        };
        let other_figures = Episode {
            colocations: 4,
            ..a
        };
        assert_eq!(not_in(&[a, later], &[later, a]), 0);
        assert_eq!(not_in(&[a, later], &[a]), 1);
        assert_eq!(not_in(&[a], &[other_figures]), 1);
        assert_eq!(not_in(&[other_figures, a], &[a, other_figures]), 0);
        assert_eq!(not_in(&[], &[a]), 0);
    }

    fn passing() -> Report {
        Report {
            pods: 3,
            events: 10,
            unique_events: 10,
            retained_points_at_roll: 5,
            accepted: 10,
            steps: vec![Step {
                action: "restart",
                pod: "udaconnect-2".to_owned(),
                partitions_owned: 5,
                sigterm_to_exit_s: Some(1.0),
                handover_s: Some(1.5),
                all_serving_after_stop_s: Some(1.5),
                start_to_ready_s: Some(0.1),
                start_to_serving_s: Some(2.0),
                ..Step::default()
            }],
            streamed_through_roll: true,
            episodes_expected: 4,
            episodes_stored: 4,
            episodes_missing: 0,
            episodes_extra: 0,
            locations_stored: 10,
            locations_missing: 0,
            locations_extra: 0,
            subscribers: Vec::new(),
            rest: Tally::default(),
            owners_at_end: BTreeMap::from([("zones/0".to_owned(), "udaconnect-0".to_owned())]),
            running_at_end: vec!["udaconnect-0".to_owned()],
            unexpected_exits: Vec::new(),
            peak_rss_mib_max: 100.0,
            wall_s: 1.0,
        }
    }

    #[test]
    fn each_way_of_failing_the_issue_is_reported() {
        assert_eq!(passing().failures(), Vec::<String>::new());
        type Break = fn(&mut Report);
        let cases: [(&str, Break); 8] = [
            ("connection differs", |r| r.episodes_missing = 1),
            ("location differs", |r| r.locations_extra = 1),
            ("owned no partition", |r| r.steps[0].partitions_owned = 0),
            ("unserved for 10.4 s", |r| {
                r.steps[0].all_serving_after_stop_s = Some(10.4)
            }),
            ("got no answer", |r| {
                r.rest.no_answer.insert("get /v1/status".to_owned(), 1);
            }),
            ("unexpected REST answers", |r| {
                r.rest.answer(traffic::GET_STATUS, 500, "boom")
            }),
            ("exited on their own", |r| {
                r.unexpected_exits.push("udaconnect-1 signal: 9".to_owned())
            }),
            ("which is not running", |r| r.running_at_end.clear()),
        ];
        for (words, break_it) in cases {
            let mut report = passing();
            break_it(&mut report);
            let failures = report.failures();
            assert!(
                failures.len() == 1 && failures[0].contains(words),
                "{words}: {failures:?}"
            );
        }
    }
}
