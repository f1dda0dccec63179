//! Integration tests against the real PostgreSQL+PostGIS and the real broker that `./dev`
//! starts (`./dev test` exports where they are). Each test gets a fresh database and fresh
//! topic names.

mod auth;
mod browser;
mod cli;
mod erasure;
mod grpc;
mod grpc_docs;
mod helpers;
mod hostile;
mod manifests;
mod metrics;
mod monitoring;
mod pipeline;
mod recovery;
mod rest;
mod resume;
mod service;
mod store;
mod subscribers;
mod time;
