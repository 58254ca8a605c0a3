//! The tollgate daemon as a library: the Leap0-compatible HTTP API, sandbox
//! lifecycle, the store, runtimes and per-sandbox network setup. `main.rs` only
//! wires these together.

pub mod api;
pub mod ca;
pub mod client;
pub mod config;
pub mod dataplane;
pub mod events;
pub mod kernel_tunnel;
pub mod model;
pub mod net;
pub mod openapi;
pub mod reclaim;
pub mod runtime;
pub mod service;
pub mod store;
pub mod validate;
