//! UdaConnect's proximity engine.
//!
//! Pure logic, testable without a network: domain types, the proximity index and the zone and
//! person actors. It talks to the outside only through traits that the `udaconnect` binary
//! implements with Kafka and PostgreSQL (docs/design.md §2, §8).

pub mod actors;
pub mod domain;
pub mod episodes;
pub mod geo;
pub mod messages;
#[cfg(any(test, feature = "test-support"))]
pub mod oracle;
pub mod params;
pub mod sync_engine;
pub mod zone_index;
pub mod zones;

pub use params::{EngineParams, ParamsError};
pub use sync_engine::{Engine, EngineOptions, EpisodeTable, Router};
