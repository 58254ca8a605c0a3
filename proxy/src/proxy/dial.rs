//! Connecting upstream for a verdict: by name (resolve it ourselves, refuse
//! forbidden answers, try the survivors in order on the original destination
//! port) or by address.
//!
//! The sandbox's destination address is never used for a name-matched
//! connection (THREATS #3): whatever IP the sandbox aimed at, only the
//! proxy's own resolution of the name is dialled.

use std::net::{IpAddr, SocketAddr};
#[cfg(test)]
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::policy::{CompiledPolicy, DenyReason, Dial};

use super::error::ProxyError;
use super::resolve::{Resolve, ResolveError};

/// Rewrites a dialled address just before `connect` (tests only: lets a
/// test stand a loopback canary in for an address it must never reach).
#[cfg(test)]
pub(crate) type Rewrite = Arc<dyn Fn(SocketAddr) -> SocketAddr + Send + Sync>;

/// How upstream connections are made.
#[derive(Clone)]
pub(crate) struct Dialer {
    /// Bound on each connection attempt; all attempts together get twice this.
    pub(crate) connect_timeout: Duration,
    /// Bound on the name lookup.
    pub(crate) dns_timeout: Duration,
    /// Whether IPv6 answers may be dialled (and AAAA asked for).
    pub(crate) ipv6: bool,
    #[cfg(test)]
    pub(crate) rewrite: Option<Rewrite>,
}

/// An established upstream connection.
#[derive(Debug)]
pub(crate) struct Dialed {
    pub(crate) stream: TcpStream,
    /// The address connected to.
    pub(crate) addr: SocketAddr,
}

// === impl Dialer ===

impl Dialer {
    /// Connects for `dial` on `port`, checking every resolved address
    /// against `policy` first.
    pub(crate) async fn dial(
        &self,
        resolver: &dyn Resolve,
        policy: &CompiledPolicy,
        dial: &Dial,
        port: u16,
    ) -> Result<Dialed, ProxyError> {
        let candidates = match dial {
            Dial::Addr(ip) => vec![SocketAddr::new(*ip, port)],
            Dial::Name(name) => self.candidates(resolver, policy, name, port).await?,
        };
        self.connect_any(&candidates).await
    }

    /// The addresses of `name` that may be dialled, in the resolver's order,
    /// without duplicates.
    async fn candidates(
        &self,
        resolver: &dyn Resolve,
        policy: &CompiledPolicy,
        name: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, ProxyError> {
        let resolve_err = |source| ProxyError::Resolve {
            name: name.to_string(),
            source,
        };
        let addrs = tokio::time::timeout(self.dns_timeout, resolver.resolve(name, self.ipv6))
            .await
            .map_err(|_| resolve_err(ResolveError::Timeout))?
            .map_err(resolve_err)?;
        let mut refused: Option<DenyReason> = None;
        let mut out: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
        for ip in addrs {
            let ip = ip.to_canonical();
            if matches!(ip, IpAddr::V6(_)) && !self.ipv6 {
                continue;
            }
            if let Err(reason) = policy.check_resolved(ip) {
                refused.get_or_insert(reason);
                continue;
            }
            let sa = SocketAddr::new(ip, port);
            if !out.contains(&sa) {
                out.push(sa);
            }
        }
        if out.is_empty() {
            return Err(match refused {
                Some(reason) => ProxyError::ResolvedForbidden {
                    name: name.to_string(),
                    reason,
                },
                None => ProxyError::NoAddress(name.to_string()),
            });
        }
        Ok(out)
    }

    /// Tries each address in order; the first that connects wins.
    async fn connect_any(&self, addrs: &[SocketAddr]) -> Result<Dialed, ProxyError> {
        let overall = Instant::now() + self.connect_timeout.saturating_mul(2);
        let mut last = ProxyError::NoAddress(String::new());
        for &addr in addrs {
            let now = Instant::now();
            if now >= overall {
                return Err(ProxyError::ConnectTimeout);
            }
            let budget = self.connect_timeout.min(overall - now);
            let target = self.rewritten(addr);
            match tokio::time::timeout(budget, TcpStream::connect(target)).await {
                Ok(Ok(stream)) => return Ok(Dialed { stream, addr }),
                Ok(Err(source)) => last = ProxyError::Connect { addr, source },
                Err(_) => last = ProxyError::ConnectTimeout,
            }
        }
        Err(last)
    }

    #[cfg(test)]
    fn rewritten(&self, addr: SocketAddr) -> SocketAddr {
        match &self.rewrite {
            Some(f) => f(addr),
            None => addr,
        }
    }

    #[cfg(not(test))]
    fn rewritten(&self, addr: SocketAddr) -> SocketAddr {
        addr
    }
}
