//! DNS for the data plane: the host-side [`Resolver`] the proxy dials names
//! with, and the sandbox's own DNS server ([`serve_udp`], [`serve_tcp`],
//! [`DnsServer`]).
//!
//! # Resolver
//!
//! A stub resolver over the host's upstream nameservers (`/etc/resolv.conf`
//! by default). [`Resolver::lookup`] returns the A (and, when asked, AAAA)
//! addresses of a name with their TTL:
//!
//! * every query goes out from a fresh UDP socket (kernel-chosen random
//!   source port) with a random id; a reply is accepted only from the
//!   upstream it was sent to (connected socket), only if it is a response with
//!   the same id and exactly our question (name, type, class); anything else
//!   is ignored and the wait goes on until the deadline;
//! * a truncated (TC) reply is retried over TCP to the same upstream;
//! * answers are read along the CNAME chain inside the answer section only:
//!   records whose owner is off the chain are ignored;
//! * positive answers are cached for the smallest TTL along the chain
//!   (capped at [`MAX_CACHE_TTL`]); TTL 0 is never cached, so a rebinding
//!   server is asked again on every lookup; NXDOMAIN / NODATA are cached for
//!   the SOA's negative TTL (RFC 2308: min of the SOA's TTL and MINIMUM),
//!   capped at [`MAX_NEGATIVE_TTL`], and not at all without an SOA; failures
//!   (timeouts, SERVFAIL) are never cached;
//! * concurrent lookups of the same (name, type) share one upstream query.
//!
//! The resolver only reports what DNS said: the caller checks every address
//! with `CompiledPolicy::check_resolved` before dialling (THREATS #8, #10).
//!
//! # Sandbox DNS server
//!
//! Answers the sandbox at its gateway (UDP and TCP 53). The policy decides
//! before anything is sent upstream (THREATS #15), on the normalised name
//! (lower case, no trailing dot):
//!
//! | query | answer | forwarded |
//! |---|---|---|
//! | not parseable, not exactly one question, answer/authority records present, meta qtype OPT/TSIG | FORMERR | no |
//! | opcode other than QUERY, class other than IN, ANY / AXFR / IXFR / MAILA / MAILB | NOTIMP | no |
//! | name fails host-name validation (bytes other than `[A-Za-z0-9_-]`, empty label, label > 63, name > 253, numeric last label, the root) | REFUSED | no |
//! | [`DnsDecision::Refused`] (`deny-all`) | REFUSED | no |
//! | [`DnsDecision::NxDomain`] (`custom`, name not allowed) | NXDOMAIN | no |
//! | AAAA while the sandbox has no IPv6 | empty NOERROR | no |
//! | over the rate limit ([`DEFAULT_RATE_LIMIT`] queries/s per server) | REFUSED | no |
//! | otherwise | upstream's answer | yes, rebuilt |
//!
//! A forwarded query is rebuilt from the validated question alone (fresh id,
//! RD, EDNS payload 1232, no client options), so nothing the sandbox put in
//! its header, EDNS options or extra records reaches the upstream. The answer
//! is re-encoded for the sandbox: the client's id and question, the
//! upstream's RCODE, answer and authority records; additional records are
//! dropped. `ech` SvcParams are removed from HTTPS and SVCB records (THREATS
//! #16); a record that lists `ech` as mandatory is dropped whole, and so is an
//! HTTPS / SVCB record that could not be decoded. A/AAAA answers are relayed
//! as they are (they are informational: the proxy dials its own resolution)
//! and reported through [`DnsEvents::answered`].

use std::sync::Arc;
use std::time::Duration;

mod cache;
mod resolver;
mod server;
mod transport;
mod wire;

#[cfg(test)]
mod tests;

pub use resolver::{parse_resolv_conf, system_nameservers, Lookup, Resolver, ResolverConfig};
pub use server::{
    policy_decision, serve_tcp, serve_udp, DnsDecision, DnsEvents, DnsPolicy, DnsServer, NoEvents,
    PolicyDns, DEFAULT_RATE_LIMIT, MAX_TCP_CONNECTIONS, TCP_IDLE_TIMEOUT,
};

/// Longest a positive answer is cached, whatever its TTL.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);
/// Longest a negative answer (NXDOMAIN / NODATA) is cached.
pub const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// Why a lookup or a forwarded query failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DnsError {
    /// No acceptable answer arrived from any upstream before the deadline.
    #[error("DNS query timed out")]
    Timeout,
    /// The name does not exist (NXDOMAIN).
    #[error("no such domain (NXDOMAIN)")]
    NxDomain,
    /// The upstream refused the query (REFUSED or NOTIMP).
    #[error("the upstream refused the query")]
    Refused,
    /// The upstream could not answer (SERVFAIL or another error code).
    #[error("the upstream failed to answer (SERVFAIL)")]
    ServFail,
    /// The name, the query or an upstream reply over TCP is not well-formed DNS.
    #[error("malformed DNS name or message: {0}")]
    Malformed(&'static str),
    /// A socket failed, or no upstream is configured.
    #[error("DNS transport error: {0}")]
    Io(Arc<std::io::Error>),
}

impl From<std::io::Error> for DnsError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}
