//! `pipeline-server`, the coordinator: the one owner of task state.
//!
//! Layers, from the edge inwards: [`grpc`] (decode, validate, call one coordinator method,
//! encode) → [`coordinator`] (read, decide with [`lifecycle`], persist, act) → [`store`]
//! (durable state behind a trait; SQLite by default). [`domain`] holds the validated types all
//! layers share; [`git`] is the only way to run git; [`runners`] and [`integrate`] are the
//! coordinator's dispatch loop and integrator; [`listener`] bounds the connections the server
//! accepts; [`server`] wires it all up.

pub mod auth;
pub mod config;
pub mod coordinator;
pub mod domain;
pub mod error;
pub mod git;
pub mod grpc;
pub mod integrate;
pub mod lifecycle;
pub mod listener;
pub mod logs;
pub mod prompt;
pub mod registry;
pub mod runners;
pub mod server;
pub mod store;
