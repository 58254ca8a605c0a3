//! Why a connection or request was not relayed, and which side failed.
//!
//! The [`Side`] picks the HTTP status, the TLS alert and the event
//! (`denied` for the sandbox's and the policy's side, `upstream_failed` for
//! the upstream's); [`ProxyError::reason`] is the stable snake_case code for
//! the `x-tollgate-reason` header, events and metric labels. Nobody matches
//! on `Display` text.

use std::io;
use std::net::SocketAddr;

use crate::detect::DetectError;
use crate::policy::DenyReason;

use super::resolve::ResolveError;

/// Which party a failure is attributed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The sandbox sent something the proxy refuses (malformed, ambiguous,
    /// too large, too slow) or its socket failed.
    Downstream,
    /// The upstream could not be resolved, reached or spoken to.
    Upstream,
    /// The policy (or a limit standing in for it) refused.
    Policy,
    /// The proxy itself failed.
    Internal,
}

/// Why a connection or request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The policy refused the name or destination.
    #[error("denied by policy: {0}")]
    Denied(DenyReason),
    /// The name is a transform domain, which needs TLS interception; that is
    /// not available yet, so the connection is refused (fail closed: secrets
    /// must never flow un-transformed).
    #[error("the name needs TLS interception, which is not available")]
    InterceptionUnavailable,
    /// The ClientHello offers only TLS versions below 1.2.
    #[error("the client offers only TLS 1.0 / 1.1")]
    TlsVersion,
    /// Every address the name resolved to was refused by
    /// `check_resolved` (floor, private range: DNS rebinding).
    #[error("every address of {name} is refused ({reason})")]
    ResolvedForbidden {
        /// The name that was resolved.
        name: String,
        /// Why the first refused address was refused.
        reason: DenyReason,
    },
    /// The sandbox's connection cap is reached.
    #[error("the sandbox's connection limit is reached")]
    ConnectionLimit,
    /// The first bytes could not be classified or parsed (malformed, too
    /// large, stalled, closed).
    #[error("detection failed: {0}")]
    Detect(#[from] DetectError),
    /// An HTTP request has a shape the proxy refuses (ambiguous framing,
    /// CONNECT, h2c upgrade, a Host port that is not the destination port).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The sandbox's socket failed.
    #[error("downstream I/O: {0}")]
    DownstreamIo(#[source] io::Error),
    /// The name could not be resolved.
    #[error("resolving {name}: {source}")]
    Resolve {
        /// The name.
        name: String,
        /// The resolver's error.
        #[source]
        source: ResolveError,
    },
    /// The name resolved to no address of a usable family.
    #[error("{0} has no usable address")]
    NoAddress(String),
    /// Connecting to the upstream failed (last attempt's error).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The last address tried.
        addr: SocketAddr,
        /// Its error.
        #[source]
        source: io::Error,
    },
    /// No upstream connection was established within the connect timeout.
    #[error("connecting upstream timed out")]
    ConnectTimeout,
    /// The upstream HTTP exchange failed.
    #[error("upstream HTTP: {0}")]
    UpstreamHttp(#[source] hyper::Error),
    /// The upstream's socket failed.
    #[error("upstream I/O: {0}")]
    UpstreamIo(#[source] io::Error),
    /// The upstream's certificate failed verification (the reason code
    /// says how); no request byte was sent.
    #[error("upstream certificate rejected: {0}")]
    UpstreamCertificate(&'static str),
    /// The TLS handshake with the upstream failed otherwise.
    #[error("upstream TLS: {0}")]
    UpstreamTls(#[source] io::Error),
    /// An intercepted request's Host / `:authority` does not name the
    /// connection's SNI (or its port is not the destination port).
    #[error("the request's authority is not the connection's server name")]
    Misdirected,
    /// A method the proxy does not forward on this connection.
    #[error("method not allowed: {0}")]
    MethodNotAllowed(&'static str),
    /// A proxy bug or resource exhaustion.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

// === impl Side ===

impl Side {
    /// Stable snake_case label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Downstream => "downstream",
            Self::Upstream => "upstream",
            Self::Policy => "policy",
            Self::Internal => "internal",
        }
    }
}

// === impl ProxyError ===

impl ProxyError {
    /// Who failed.
    pub fn side(&self) -> Side {
        match self {
            Self::Denied(_)
            | Self::InterceptionUnavailable
            | Self::TlsVersion
            | Self::ResolvedForbidden { .. }
            | Self::ConnectionLimit => Side::Policy,
            Self::Detect(_)
            | Self::BadRequest(_)
            | Self::DownstreamIo(_)
            | Self::Misdirected
            | Self::MethodNotAllowed(_) => Side::Downstream,
            Self::Resolve { .. }
            | Self::NoAddress(_)
            | Self::Connect { .. }
            | Self::ConnectTimeout
            | Self::UpstreamHttp(_)
            | Self::UpstreamIo(_)
            | Self::UpstreamCertificate(_)
            | Self::UpstreamTls(_) => Side::Upstream,
            Self::Internal(_) => Side::Internal,
        }
    }

    /// Stable snake_case code for `x-tollgate-reason`, events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Denied(r) => r.as_str(),
            Self::InterceptionUnavailable => "interception_unavailable",
            Self::TlsVersion => "tls_version",
            Self::ResolvedForbidden { reason, .. } => match reason {
                DenyReason::Floor => "resolved_to_floor",
                DenyReason::PrivateRange => "resolved_to_private",
                other => other.as_str(),
            },
            Self::ConnectionLimit => "connection_limit",
            Self::Detect(e) => e.detail(),
            Self::BadRequest(r) => r,
            Self::DownstreamIo(_) => "downstream_io",
            Self::Resolve { source, .. } => match source {
                ResolveError::Timeout => "dns_timeout",
                ResolveError::NotFound => "dns_not_found",
                ResolveError::Failed(_) => "dns_failed",
            },
            Self::NoAddress(_) => "no_address",
            Self::Connect { .. } => "upstream_connect_failed",
            Self::ConnectTimeout => "upstream_connect_timeout",
            Self::UpstreamHttp(_) => "upstream_http",
            Self::UpstreamIo(_) => "upstream_io",
            Self::UpstreamCertificate(r) => r,
            Self::UpstreamTls(_) => "upstream_tls",
            Self::Misdirected => "misdirected_request",
            Self::MethodNotAllowed(r) => r,
            Self::Internal(r) => r,
        }
    }

    /// True for failures that are a timeout (picked as 504 / 408).
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::ConnectTimeout => true,
            Self::Resolve { source, .. } => matches!(source, ResolveError::Timeout),
            Self::Detect(e) => matches!(e, DetectError::Timeout),
            Self::UpstreamHttp(e) => e.is_timeout(),
            _ => false,
        }
    }
}
