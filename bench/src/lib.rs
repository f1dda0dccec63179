//! UdaConnect's bench crate: the conference simulator, load generators, criterion benches and
//! the peer baselines (Redis GEO, PostGIS per event, the POC's SQL) measured side by side.
//!
//! The simulator and the benches arrive with the proximity engine; see `docs/benchmarks.md`.
