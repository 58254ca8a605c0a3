//! Shared harness for tollgate's end-to-end tests.

pub mod privileged;
