//! The wire protocol of pipeline: the `pipeline.v1` gRPC package, generated at build time from
//! `proto/pipeline/v1/pipeline.proto`.
//!
//! Only this crate and the `grpc` modules of the binaries know these types; the domain converts
//! them at the edge with validating `TryFrom` implementations.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("pipeline.v1");
}

/// The protocol version a runner must announce at registration; bumped on breaking changes.
pub const PROTOCOL_VERSION: u32 = 1;
