//! Whom the proxy trusts as upstream: the platform's roots (the host's CA
//! bundle) plus, optionally, an operator-supplied extra CA (tests, private
//! upstreams). One pair of client configurations per daemon: one offering
//! h2 and http/1.1 by ALPN, one offering http/1.1 only (WebSocket upgrades).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// The host's CA bundle on Debian-family systems.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why the upstream trust could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A bundle could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A bundle holds no usable certificate.
    #[error("{0} holds no usable CA certificate")]
    Empty(String),
    /// rustls refused the configuration.
    #[error("TLS client configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Verified-upstream TLS client configurations.
#[derive(Clone)]
pub struct UpstreamTrust {
    h2: Arc<ClientConfig>,
    h1: Arc<ClientConfig>,
    roots: usize,
}

impl UpstreamTrust {
    /// The system bundle ([`SYSTEM_BUNDLE`]) plus `extra` (a PEM file of
    /// further CAs). A missing system bundle is tolerated only when `extra`
    /// gives at least one CA.
    pub fn system(extra: Option<&Path>) -> Result<Self, TrustError> {
        let mut roots = RootCertStore::empty();
        let system = Path::new(SYSTEM_BUNDLE);
        if system.exists() {
            add_pem_file(&mut roots, system)?;
        }
        if let Some(p) = extra {
            let before = roots.len();
            add_pem_file(&mut roots, p)?;
            if roots.len() == before {
                return Err(TrustError::Empty(p.display().to_string()));
            }
        }
        if roots.is_empty() {
            return Err(TrustError::Empty(SYSTEM_BUNDLE.into()));
        }
        Self::from_roots(roots)
    }

    /// Exactly these roots.
    pub fn from_roots(roots: RootCertStore) -> Result<Self, TrustError> {
        let n = roots.len();
        let roots = Arc::new(roots);
        let build = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, TrustError> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(Arc::clone(&roots))
                .with_no_client_auth();
            cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(cfg))
        };
        Ok(Self {
            h2: build(&[b"h2", b"http/1.1"])?,
            h1: build(&[b"http/1.1"])?,
            roots: n,
        })
    }

    /// Offers h2 and http/1.1.
    pub fn any_version(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.h2)
    }

    /// Offers http/1.1 only.
    pub fn http1_only(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.h1)
    }

    /// How many roots are trusted.
    pub fn root_count(&self) -> usize {
        self.roots
    }
}

impl std::fmt::Debug for UpstreamTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTrust")
            .field("roots", &self.roots)
            .finish()
    }
}

fn add_pem_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TrustError> {
    let text = std::fs::read(path).map_err(|source| TrustError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&text)
        .filter_map(Result::ok)
        .collect();
    // Certificates rustls cannot parse as anchors are skipped, as every
    // TLS client does with a system bundle.
    roots.add_parsable_certificates(certs);
    Ok(())
}
