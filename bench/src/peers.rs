//! What `peer-bench` needs to hold other systems to the same account as the engine: event pairs
//! compared with the brute-force oracle, the engine's episodes and per-peer counts compared with
//! the oracle's, latency percentiles, time slices for stores without a time index, and server
//! processes started and stopped by the bench itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use udaconnect_actors::domain::{Episode, LocationEvent, Micros, PersonId, MICROS_PER_S};
use udaconnect_actors::geo::distance_m;
use udaconnect_actors::oracle::OracleResult;

use crate::{peak_rss_bytes_of, percentile};

/// An unordered pair of events, by their indices in the input (smaller index first).
pub type EventPair = (u32, u32);

/// The unordered pair of the events at indices `a` and `b`.
pub fn event_pair(a: u32, b: u32) -> EventPair {
    (a.min(b), a.max(b))
}

/// Per input event, the index of the first event with its `event_id`: a retry is the same
/// event (a store keyed on the id keeps one copy), so pairs are counted between first copies.
pub fn first_copies(events: &[LocationEvent]) -> Vec<u32> {
    let mut first = HashMap::with_capacity(events.len());
    events
        .iter()
        .enumerate()
        .map(|(i, e)| *first.entry(e.event_id).or_insert(i as u32))
        .collect()
}

/// The oracle's co-locations as unordered pairs of input indices (first copies, see
/// [`first_copies`]).
pub fn oracle_pairs(
    events: &[LocationEvent],
    first: &[u32],
    oracle: &OracleResult,
) -> HashSet<EventPair> {
    let index: HashMap<_, u32> = events
        .iter()
        .zip(first)
        .map(|(e, &i)| (e.event_id, i))
        .collect();
    oracle
        .colocations
        .iter()
        .map(|c| event_pair(index[&c.own_event], index[&c.peer_event]))
        .collect()
}

/// How a peer's pairs compare with the oracle's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PairComparison {
    /// Pairs the peer found.
    pub pairs_found: u64,
    /// Pairs the oracle found.
    pub oracle_pairs: u64,
    /// Oracle pairs the peer did not find.
    pub missing_pairs: u64,
    /// Pairs the peer found that the oracle did not.
    pub extra_pairs: u64,
}

/// Compares `found` with `oracle`.
pub fn compare_pairs(found: &HashSet<EventPair>, oracle: &HashSet<EventPair>) -> PairComparison {
    PairComparison {
        pairs_found: found.len() as u64,
        oracle_pairs: oracle.len() as u64,
        missing_pairs: oracle.difference(found).count() as u64,
        extra_pairs: found.difference(oracle).count() as u64,
    }
}

/// The largest |geodesic distance − `radius_m`| over the pairs in only one of `found` and
/// `oracle`, meters (0 when they agree): how close to the boundary a peer's errors lie.
pub fn max_boundary_error_m(
    events: &[LocationEvent],
    found: &HashSet<EventPair>,
    oracle: &HashSet<EventPair>,
    radius_m: f64,
) -> f64 {
    found
        .symmetric_difference(oracle)
        .map(|&(a, b)| {
            let (a, b) = (&events[a as usize], &events[b as usize]);
            (distance_m(a.lat, a.lon, b.lat, b.lon) - radius_m).abs()
        })
        .fold(0.0, f64::max)
}

/// How the engine's output compares with the oracle's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EngineComparison {
    /// Whether the episode tables are equal, field for field.
    pub episodes_equal: bool,
    /// Episodes of the engine.
    pub episodes: u64,
    /// Episodes of the oracle.
    pub oracle_episodes: u64,
    /// Episode keys (person, peer, started_at) in only one of the two tables, plus keys in both
    /// whose episodes differ in any field.
    pub episodes_differing: u64,
    /// The pair counts, per unordered pair of persons {p, q}: the engine's count is the sum of
    /// co-locations over p's episodes with q (p < q), the oracle's the number of its unordered
    /// event pairs between p and q; missing and extra are the sums of the shortfalls and excesses.
    pub pairs: PairComparison,
    /// Person pairs where the engine's count on p's side differs from q's side.
    pub asymmetric_person_pairs: u64,
}

/// Compares the engine's `episodes` (closed) with the oracle's.
pub fn compare_engine(episodes: &[Episode], oracle: &OracleResult) -> EngineComparison {
    let ours: BTreeMap<_, &Episode> = episodes.iter().map(|e| (e.key(), e)).collect();
    let theirs: BTreeMap<_, &Episode> = oracle.episodes.iter().map(|e| (e.key(), e)).collect();
    let keys: std::collections::BTreeSet<_> = ours.keys().chain(theirs.keys()).collect();
    let episodes_differing = keys
        .into_iter()
        .filter(|k| ours.get(*k) != theirs.get(*k))
        .count() as u64;

    let mut engine_sides: HashMap<(PersonId, PersonId), u64> = HashMap::new();
    for e in episodes {
        *engine_sides.entry((e.person, e.peer)).or_default() += u64::from(e.colocations);
    }
    let mut oracle_counts: HashMap<(PersonId, PersonId), u64> = HashMap::new();
    for c in &oracle.colocations {
        if c.person < c.peer {
            *oracle_counts.entry((c.person, c.peer)).or_default() += 1;
        }
    }
    let mut pairs = PairComparison {
        pairs_found: 0,
        oracle_pairs: oracle_counts.values().sum(),
        missing_pairs: 0,
        extra_pairs: 0,
    };
    let mut asymmetric_person_pairs = 0;
    let mut person_pairs: HashSet<(PersonId, PersonId)> = oracle_counts.keys().copied().collect();
    person_pairs.extend(engine_sides.keys().map(|&(p, q)| (p.min(q), p.max(q))));
    for (p, q) in person_pairs {
        let found = engine_sides.get(&(p, q)).copied().unwrap_or(0);
        if engine_sides.get(&(q, p)).copied().unwrap_or(0) != found {
            asymmetric_person_pairs += 1;
        }
        let expected = oracle_counts.get(&(p, q)).copied().unwrap_or(0);
        pairs.pairs_found += found;
        pairs.missing_pairs += expected.saturating_sub(found);
        pairs.extra_pairs += found.saturating_sub(expected);
    }
    EngineComparison {
        episodes_equal: episodes == oracle.episodes.as_slice(),
        episodes: episodes.len() as u64,
        oracle_episodes: oracle.episodes.len() as u64,
        episodes_differing,
        pairs,
        asymmetric_person_pairs,
    }
}

/// Median and 99th percentile of per-event (or per-batch) latencies, µs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Latency {
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile (nearest rank), µs.
    pub p99_us: f64,
}

impl Latency {
    /// The percentiles of `samples_us` (µs), rounded to 0.1 µs.
    pub fn of(mut samples_us: Vec<f64>) -> Self {
        samples_us.sort_by(f64::total_cmp);
        let round = |v: f64| (v * 10.0).round() / 10.0;
        Self {
            p50_us: round(percentile(&samples_us, 0.50)),
            p99_us: round(percentile(&samples_us, 0.99)),
        }
    }
}

/// Time slices of a store that has no time index: an event at `t` goes into the slice
/// `t / slice`, and the events within `window` of `t` lie in the slices [`TimeSlices::around`]
/// returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeSlices {
    slice_us: Micros,
    window_us: Micros,
}

impl TimeSlices {
    /// Slices `slice_s` seconds long for a matching window of ± `window_s` seconds.
    pub fn new(slice_s: u32, window_s: u32) -> anyhow::Result<Self> {
        anyhow::ensure!(slice_s > 0, "a time slice must be at least 1 s long");
        Ok(Self {
            slice_us: i64::from(slice_s) * MICROS_PER_S,
            window_us: i64::from(window_s) * MICROS_PER_S,
        })
    }

    /// The slice of time `t` (µs since the Unix epoch).
    pub fn of(&self, t: Micros) -> i64 {
        t.div_euclid(self.slice_us)
    }

    /// The slices that hold every time within the window of `t` (µs since the Unix epoch).
    pub fn around(&self, t: Micros) -> std::ops::RangeInclusive<i64> {
        self.of(t - self.window_us)..=self.of(t + self.window_us)
    }

    /// Whether `a` and `b` (µs since the Unix epoch) lie within the window of each other.
    pub fn within_window(&self, a: Micros, b: Micros) -> bool {
        (a - b).abs() <= self.window_us
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; another process could take it before use).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A server process this bench started, with its own directory; stopped by its pid on
/// [`ServerProcess::stop`] or when dropped.
pub struct ServerProcess {
    name: String,
    child: Option<Child>,
    dir: PathBuf,
}

impl ServerProcess {
    /// Starts `program` with `args` in a fresh directory below the system's temp directory,
    /// its output to `server.log` there.
    pub fn start(
        name: &str,
        program: &Path,
        args: impl FnOnce(&Path) -> Vec<String>,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("peer-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("server.log"))?;
        let child = Command::new(program)
            .args(args(&dir))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", program.display()))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            dir,
        })
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The server's peak resident set size so far (`VmHWM`), bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        peak_rss_bytes_of(self.pid())
    }

    /// The last lines of the server's log (for error messages).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// Errors unless the server is still running.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("{} exited ({status}): {}", self.name, self.log_tail());
            }
        }
        Ok(())
    }

    /// Stops the server: SIGTERM to its pid, SIGKILL after 5 s; then removes its directory.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = child.try_wait() {
            eprintln!(
                "{} did not stop within 5 s: killing pid {}",
                self.name,
                child.id()
            );
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_around_a_time_hold_the_whole_window() {
        let slices = TimeSlices::new(10, 60).unwrap();
        let t = 1_000_000 * MICROS_PER_S + 3 * MICROS_PER_S;
        let around = slices.around(t);
        for dt in [-60, -59, 0, 59, 60] {
            assert!(
                around.contains(&slices.of(t + dt * MICROS_PER_S)),
                "dt {dt}"
            );
        }
        assert_eq!(around.count(), 13);
    }

    #[test]
    fn missing_and_extra_pairs_are_the_two_differences() {
        let oracle: HashSet<EventPair> = [(0, 1), (1, 2), (2, 3)].into();
        let found: HashSet<EventPair> = [event_pair(1, 0), (2, 3), (3, 4)].into();
        let c = compare_pairs(&found, &oracle);
        assert_eq!(
            (
                c.pairs_found,
                c.oracle_pairs,
                c.missing_pairs,
                c.extra_pairs
            ),
            (3, 3, 1, 1)
        );
    }
}
