//! `pipeline-server`, the coordinator: the one owner of task state.
//!
//! Layers, from the edge inwards: [`grpc`] (decode, validate, call one coordinator method,
//! encode) and [`http`] (the web page and the JSON API, over the same coordinator methods and
//! conversions) → [`coordinator`] (read, decide with [`lifecycle`], commit, act: the one place that
//! changes state) → [`store`] (durable state behind a trait; SQLite by default). Beside the
//! coordinator: [`scheduler`] (the registry of runners and leases, and the pure lease planner),
//! [`integrate`] (the integrator, which lands Verified tasks), [`logs`] (run logs and live
//! transitions), [`repo`] (the canonical repository, through `pipeline_core::git`). [`domain`]
//! holds the types every layer shares; [`landing`] and [`usage`] what `status` reads from memory
//! (landing and its pauses, the last day's cost);
//! [`task_refs`] deletes the refs of landed tasks from the push remote (servers in a group).
//! [`webhooks`] sends the feed's events to `--webhook` endpoints, signed, at least once, from a
//! durable cursor.
//! [`app`] wires it all up and supervises the background loops; [`admin_note`] tells a local
//! `pipelinectl` where the admin token is. [`metrics`] (the Prometheus registry), [`health`]
//! (which loops are alive) and [`telemetry`] (tracing, and its optional OTLP export) sit
//! lowest, so every layer may report to them.

pub mod admin_note;
pub mod app;
pub mod auth;
pub mod build;
pub mod config;
pub mod coordinator;
pub mod domain;
pub mod error;
pub mod failpoint;
pub mod feed;
pub mod grpc;
pub mod health;
pub mod http;
pub mod integrate;
pub mod landing;
pub mod leader;
pub mod lifecycle;
pub mod logs;
pub mod metrics;
pub mod ports;
pub mod prompt;
pub mod remote_build;
pub mod repo;
pub mod scheduler;
pub mod store;
pub mod task_refs;
pub mod telemetry;
pub mod usage;
pub mod webhooks;
