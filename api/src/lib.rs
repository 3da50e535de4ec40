//! `pipeline-api`: the server's answers as people and scripts see them, in one place for
//! `pipelinectl` and the server's HTTP API.
//!
//! - [`model`]: the view types (statuses as the contract's words, times as milliseconds).
//! - [`wire`]: the protocol's messages converted into views, validated once (an unknown enum
//!   value becomes `Unknown`, a reply without its task is refused).
//! - [`json`]: the JSON shapes of `CONTRACT.md`, built from views.
//! - [`time`]: RFC 3339 times.
//!
//! The path of an answer: the server's domain → prost (the server's `grpc/convert.rs`) →
//! view ([`wire`]) → JSON ([`json`]); `pipelinectl` takes the same path from the prost
//! message it received, so the CLI's `--json` and the HTTP API print the same bytes.

pub mod json;
pub mod model;
pub mod time;
pub mod wire;
