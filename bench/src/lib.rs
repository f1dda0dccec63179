//! UdaConnect's bench crate: the conference simulator, load generators, criterion benches and
//! the peer baselines (Redis GEO, PostGIS per event, the POC's SQL) measured side by side.
//!
//! The simulator and the benches arrive with the proximity engine; see `docs/benchmarks.md`.

use udaconnect::config::redact_url;

pub mod engine_run;
pub mod peers;
pub mod produce;
pub mod rehearsal;
pub mod scratch;
pub mod sim;

/// One line of `/proc/self/status` in bytes (`VmHWM`, `VmRSS`, …); 0 where it is unavailable.
fn proc_status_bytes(process: &str, key: &str) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{process}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The process's peak resident set size, bytes (0 where `/proc` is unavailable).
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("self", "VmHWM")
}

/// Process `pid`'s peak resident set size, bytes (0 where `/proc` is unavailable).
pub fn peak_rss_bytes_of(pid: u32) -> u64 {
    proc_status_bytes(&pid.to_string(), "VmHWM")
}

/// Resets this process's peak resident set size (`VmHWM`) to its current RSS, so that
/// [`peak_rss_bytes`] then reports the peak of what follows; false where Linux refuses.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's resident set size now, bytes (0 where `/proc` is unavailable).
pub fn rss_bytes() -> u64 {
    proc_status_bytes("self", "VmRSS")
}

/// The value below which a fraction `q` of the sorted `values` lie (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Polls `done` every 50 ms until it holds, for up to `within`; errors when it never did.
pub async fn eventually(
    within: std::time::Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "not within {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    let Some((scheme, rest)) = path.split_once("://") else {
        anyhow::bail!(
            "database_url {} is not a URL; pass --admin-url",
            redact_url(url)
        );
    };
    let server = rest.split_once('/').map_or(rest, |(s, _)| s);
    Ok(match query {
        Some(q) => format!("{scheme}://{server}/{database}?{q}"),
        None => format!("{scheme}://{server}/{database}"),
    })
}
