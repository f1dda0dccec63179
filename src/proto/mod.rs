//! The `udaconnect.v1` protocol (compiled from `proto/` by `build.rs`) and its conversions to
//! and from the domain types and actor views. Shared by the gRPC front end (`crate::grpc`) and
//! by `crate::cluster`, which forwards live-state questions to the owning process over the same
//! protocol; neither depends on the other through it.

pub mod convert;

/// Messages and services of `proto/udaconnect/v1/`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/udaconnect.v1.rs"));
}

/// The encoded `FileDescriptorSet` of `udaconnect.v1`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/udaconnect_v1_descriptor.bin"));

/// Full names of the `udaconnect.v1` services.
pub const SERVICES: [&str; 3] = [
    "udaconnect.v1.Ingest",
    "udaconnect.v1.Connections",
    "udaconnect.v1.Admin",
];
