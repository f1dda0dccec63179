//! UdaConnect's proximity engine.
//!
//! Pure logic, testable without a network: domain types, the proximity index and the zone and
//! person actors. It talks to the outside only through traits that the `udaconnect` binary
//! implements with Kafka and PostgreSQL (DESIGN §2, §8).

pub mod params;

pub use params::{EngineParams, ParamsError};
