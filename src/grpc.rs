//! gRPC front end (tonic): the `udaconnect.v1` package compiled from `proto/` by `build.rs`.

/// Messages and services of `proto/udaconnect/v1/`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/udaconnect.v1.rs"));
}
