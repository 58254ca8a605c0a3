//! Name resolution as the proxy sees it: a name in, addresses out.
//!
//! The proxy only needs the addresses; it checks every one with
//! `CompiledPolicy::check_resolved` before dialling, whatever the resolver.
//! [`crate::dns::Resolver`] is the production implementation;
//! [`StaticResolver`] serves tests and benches.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use crate::dns::{DnsError, Resolver};

/// The future a [`Resolve`] implementation returns.
pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, ResolveError>> + Send + 'a>>;

/// Resolves a (normalised) name to its addresses: A records, plus AAAA when
/// `want_v6`.
pub trait Resolve: Send + Sync + 'static {
    /// Looks `name` up. An empty list is a valid answer (NODATA).
    fn resolve<'a>(&'a self, name: &'a str, want_v6: bool) -> ResolveFuture<'a>;
}

/// Why a name could not be resolved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No answer before the resolver's deadline.
    #[error("DNS lookup timed out")]
    Timeout,
    /// The name does not exist.
    #[error("no such name")]
    NotFound,
    /// Any other failure, as the resolver described it.
    #[error("DNS lookup failed: {0}")]
    Failed(String),
}

impl From<DnsError> for ResolveError {
    fn from(e: DnsError) -> Self {
        match e {
            DnsError::Timeout => Self::Timeout,
            DnsError::NxDomain => Self::NotFound,
            other => Self::Failed(other.to_string()),
        }
    }
}

/// The production resolver: the host-side stub resolver of [`crate::dns`].
impl Resolve for Resolver {
    fn resolve<'a>(&'a self, name: &'a str, want_v6: bool) -> ResolveFuture<'a> {
        Box::pin(async move {
            let lookup = self.lookup(name, want_v6).await?;
            Ok(lookup.addrs)
        })
    }
}

/// A fixed name → addresses map, for tests and benches. Unknown names are
/// [`ResolveError::NotFound`]; `want_v6 = false` drops IPv6 entries.
#[derive(Clone, Debug, Default)]
pub struct StaticResolver {
    map: HashMap<String, Vec<IpAddr>>,
}

// === impl StaticResolver ===

impl StaticResolver {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the addresses of `name` (compared lower-case).
    pub fn with(mut self, name: &str, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.map
            .insert(name.to_ascii_lowercase(), addrs.into_iter().collect());
        self
    }
}

impl Resolve for StaticResolver {
    fn resolve<'a>(&'a self, name: &'a str, want_v6: bool) -> ResolveFuture<'a> {
        let answer = match self.map.get(&name.to_ascii_lowercase()) {
            Some(addrs) => Ok(addrs
                .iter()
                .copied()
                .filter(|a| want_v6 || a.is_ipv4())
                .collect()),
            None => Err(ResolveError::NotFound),
        };
        Box::pin(std::future::ready(answer))
    }
}
