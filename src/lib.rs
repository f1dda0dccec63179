//! The `udaconnect` service: configuration, start-up wiring, Kafka I/O, the PostgreSQL store,
//! the REST and gRPC front ends and the command line (docs/design.md §8).

pub mod allocator;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod error;
pub mod grpc;
pub mod input;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod proto;
pub mod readiness;
pub mod rest;
pub mod startup;
pub mod store;

pub use config::Config;
pub use startup::{serve, Server};
