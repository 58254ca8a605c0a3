//! The tollgate daemon as a library: the Leap0-compatible HTTP API, sandbox
//! lifecycle, the store, runtimes and per-sandbox network setup. `main.rs` only
//! wires these together.

pub mod runtime;
