//! The process's allocator, tuned once at start-up: every binary of the project that runs the
//! engine (the service, `engine-bench`, `peer-bench`, `memory-probe`) uses mimalloc and calls
//! [`tune`] first, so they measure what the service does.

use std::os::raw::c_long;

/// mimalloc's `mi_option_purge_delay`, the index of the option in its `mi_option_e` (the same
/// in mimalloc 2 and 3; libmimalloc-sys names the options around it, not this one). A test
/// checks it holds mimalloc 3's default purge delay, 1,000 ms.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc keeps freed memory before it gives it back to the kernel, milliseconds:
/// 10 s, jemalloc's default decay. mimalloc 3's default, 1 s, gave back the engine's per-batch
/// buffers (updates, outputs) between two batches of the same size, and the kernel cleared
/// every page again when they were made anew: `engine-bench` took about 10 % more CPU time
/// and a hundred times the page faults (docs/benchmarks.md, "Run of 2026-12-02"), for a peak
/// RSS about 10 % lower.
pub const PURGE_DELAY_MS: c_long = 10_000;

/// mimalloc's environment variables for the purge delay (the second is its older name).
const PURGE_DELAY_VARIABLES: [&str; 2] = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"];

/// Whether the purge delay was set from the environment.
fn purge_delay_from_environment() -> bool {
    PURGE_DELAY_VARIABLES
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Sets mimalloc's options for this process ([`PURGE_DELAY_MS`]); call first in `main`.
/// mimalloc's environment variables (`MIMALLOC_PURGE_DELAY`, or its older name
/// `MIMALLOC_RESET_DELAY`) still win when set, for experiments.
pub fn tune() {
    if !purge_delay_from_environment() {
        // SAFETY: sets an integer option of the allocator; mimalloc reads options atomically
        // and this one only changes when freed memory is given back.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mimalloc's current purge delay, milliseconds.
    fn purge_delay_ms() -> c_long {
        // SAFETY: reads an integer option of the allocator.
        unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
    }

    #[test]
    fn the_purge_delay_option_is_the_one_tuned_and_starts_at_mimallocs_default() {
        // mimalloc 3 documents 1,000 ms as the purge delay's default; no option next to it
        // starts there, so a wrong index fails here.
        if purge_delay_from_environment() {
            // What the environment gave stays.
            let given = purge_delay_ms();
            tune();
            assert_eq!(purge_delay_ms(), given);
        } else {
            assert_eq!(purge_delay_ms(), 1_000);
            tune();
            assert_eq!(purge_delay_ms(), PURGE_DELAY_MS);
        }
    }
}
