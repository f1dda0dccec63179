//! UdaConnect's proximity engine.
//!
//! Pure logic, testable without a network: domain types, the proximity index and the zone and
//! person actors. It talks to the outside only through traits that the `udaconnect` binary
//! implements with Kafka and PostgreSQL (docs/design.md §2, §8).

pub mod actors;
pub mod domain;
pub mod engine;
pub mod episodes;
pub mod geo;
pub mod index;
pub mod messages;
#[cfg(any(test, feature = "test-support"))]
pub mod oracle;
pub mod params;
pub mod zones;

pub use engine::{Engine, EngineOptions, EpisodeTable, Router};
pub use params::{EngineParams, ParamsError};
