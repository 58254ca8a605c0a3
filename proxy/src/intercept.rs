//! TLS interception for transform domains: the per-sandbox CA, its leaf
//! cache, the server-side TLS configuration, the verified upstream trust and
//! the header rewrite. The request path itself lives in the proxy
//! (`proxy/intercept.rs`), which uses an [`Interception`] per sandbox.
//!
//! Only connections whose SNI matches a transform rule are terminated
//! here; everything else stays an opaque tunnel.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

mod ca;
mod headers;
mod scrub;
mod trust;

pub use ca::{
    CaError, LeafCache, SandboxCa, BACKDATE, DEFAULT_LEAF_CAPACITY, LEAF_BACKDATE, LEAF_LIFETIME,
};
pub use headers::{Rewrite, RewriteError, REDACTED};
pub use scrub::{ScrubBody, Scrubber};
pub use trust::{TrustError, UpstreamTrust, SYSTEM_BUNDLE};

/// Sessions remembered per sandbox for TLS resumption by the sandbox.
const SESSION_CACHE: usize = 1024;

/// Everything one sandbox's proxy needs to intercept.
pub struct Interception {
    leaves: Arc<LeafCache>,
    server: Arc<ServerConfig>,
    trust: UpstreamTrust,
}

/// Serves the cached leaf for the ClientHello's SNI. The proxy mints it
/// before the handshake proceeds (after reading the ClientHello), so this
/// only looks it up; a name that has none ends the handshake.
#[derive(Debug)]
struct LeafResolver {
    leaves: Arc<LeafCache>,
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        self.leaves.cached(&name.to_ascii_lowercase())
    }
}

impl Interception {
    /// Interception with `ca` for the sandbox, trusting `trust` upstream.
    pub fn new(ca: Arc<SandboxCa>, trust: UpstreamTrust) -> Result<Arc<Self>, CaError> {
        let leaves = Arc::new(LeafCache::new(ca, DEFAULT_LEAF_CAPACITY));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(LeafResolver {
                leaves: Arc::clone(&leaves),
            }));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        server.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
        server.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Arc::new(Self {
            leaves,
            server: Arc::new(server),
            trust,
        }))
    }

    /// The sandbox's CA.
    pub fn ca(&self) -> &Arc<SandboxCa> {
        self.leaves.ca()
    }

    /// The leaf cache.
    pub fn leaves(&self) -> &Arc<LeafCache> {
        &self.leaves
    }

    /// The server-side TLS configuration (ALPN h2, http/1.1).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server)
    }

    /// Upstream client configurations.
    pub fn trust(&self) -> &UpstreamTrust {
        &self.trust
    }
}

impl std::fmt::Debug for Interception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interception")
            .field("leaves", &self.leaves)
            .field("trust", &self.trust)
            .finish()
    }
}

#[cfg(test)]
mod tests;
