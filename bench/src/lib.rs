//! UdaConnect's bench crate: the conference simulator, load generators, criterion benches and
//! the peer baselines (Redis GEO, PostGIS per event, the POC's SQL) measured side by side.
//!
//! The simulator and the benches arrive with the proximity engine; see `docs/benchmarks.md`.

pub mod produce;
pub mod sim;

/// One line of `/proc/self/status` in bytes (`VmHWM`, `VmRSS`, …); 0 where it is unavailable.
fn proc_status_bytes(key: &str) -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
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
    proc_status_bytes("VmHWM")
}

/// The process's resident set size now, bytes (0 where `/proc` is unavailable).
pub fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS")
}
