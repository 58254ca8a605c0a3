//! Shared harness for tollgate's end-to-end tests: a real daemon per test,
//! OpenAPI checks of every answer, and the root / namespace helpers.

pub mod client;
pub mod daemon;
pub mod http_client;
pub mod lab;
pub mod openapi;
pub mod origin;
pub mod privileged;
pub mod upstream;
