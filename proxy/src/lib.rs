//! tollgate's data plane: the network-policy model and matcher, and (as they land)
//! ClientHello / Host detection, the tunnel, TLS interception and DNS.
#![forbid(unsafe_code)]

pub mod detect;
pub mod dns;
pub mod intercept;
pub mod policy;
pub mod proxy;
pub mod respond;
pub mod tunnel;
