//! The per-sandbox transparent proxy: accept what eBPF steers here, look at
//! the first bytes, decide, then refuse, tunnel or serve HTTP.
//!
//! eBPF in the sandbox's router namespace hands every TCP connection that
//! needs a name check to this listener with `bpf_sk_assign`, so
//! `local_addr()` of an accepted socket is the sandbox's ORIGINAL
//! destination. Per connection:
//!
//! 1. A slot under the per-sandbox connection cap ([`ProxyConfig::max_connections`]);
//!    over the cap → reset and a `connection_limit` denial.
//! 2. [`detect`](crate::detect::detect) peeks (bounded in bytes and time)
//!    without consuming. A detection error is a denial: a TLS alert for a
//!    TLS-looking stream, a `400` for an HTTP-looking one, else a reset.
//! 3. The policy decides on the name (TLS: the SNI; HTTP: the Host of each
//!    request; opaque: none, so by destination address alone):
//!    * `Deny` → TLS alert (`unrecognized_name` for a name that is not
//!      allowed, else `access_denied`), HTTP `403` with
//!      `x-tollgate-reason`, opaque reset.
//!    * `Tunnel { Dial::Name }` → the proxy resolves the name itself, drops
//!      every answer `check_resolved` refuses (floor, private: DNS
//!      rebinding) and dials the survivors in order on the original port.
//!      The sandbox's destination IP is ignored (THREATS #3).
//!    * `Tunnel { Dial::Addr }` → dial that address.
//!    * `Intercept` (a transform domain) over TLS → terminated with a leaf
//!      from the sandbox's CA and served by `intercept` (strip / inject per
//!      request). Without [`ProxyConfig::interception`] it is **denied**
//!      with `interception_unavailable`: a tunnel would let the sandbox's
//!      own credentials through un-transformed. Over plain HTTP it is
//!      forwarded without injection (values never pass over plaintext).
//!    * A ClientHello offering only TLS 1.0 / 1.1 → denied (`tls_version`).
//! 4. TLS and opaque tunnels relay bytes untouched ([`crate::tunnel`]);
//!    the peeked bytes are still in the socket. Plain HTTP is served by
//!    hyper and every request is authorised on its own (`http`).
//!
//! **Live update.** The policy and the open connections live under one lock
//! (`registry`): [`SandboxProxy::set_policy`] swaps the policy and
//! re-decides every open connection in the same critical section; a tunnel
//! whose verdict changed, or an HTTP connection whose last decision became a
//! denial, is told to close and does so at once (reset), well within 1 s.
//!
//! **Isolation.** A `SandboxProxy` shares nothing with another but the
//! runtime: its own connection cap, registry and policy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::detect::{self, ClientHelloInfo, DetectError, DetectLimits, Detected};
use crate::intercept::Interception;
use crate::policy::{CompiledPolicy, Dial, Verdict};
use crate::respond::{self, RefuseAs};
use crate::tunnel::kernel::{KernelOutcome, KernelTunnel};
use crate::tunnel::{self, CopyMode, RelayEnd, RelayOptions, RelayStats, TunnelError};

mod dial;
mod error;
mod http;
mod intercept;
mod registry;
mod resolve;

#[cfg(test)]
mod tests;

pub use error::{ProxyError, Side};
pub use resolve::{Resolve, ResolveError, ResolveFuture, StaticResolver};

use dial::Dialer;
use registry::{ConnHandle, Kind, Registry};

/// Lowest TLS version a client must offer (TLS 1.2).
const TLS_1_2: u16 = 0x0303;

/// Limits and timeouts of one sandbox's proxy.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Bound on each upstream connection attempt (all attempts of one
    /// connection together get twice this). Default 10 s.
    pub connect_timeout: Duration,
    /// Bound on resolving a name before dialling it. Default 5 s.
    pub dns_timeout: Duration,
    /// Bounds on the first-bytes peek (slowloris on the ClientHello).
    pub detect: DetectLimits,
    /// Most connections open at once for this sandbox. Default 1024.
    pub max_connections: usize,
    /// A tunnel or HTTP connection with no byte moving for this long is
    /// closed. Default 1 h.
    pub idle_timeout: Duration,
    /// Bound on receiving a complete HTTP request head. Default 10 s.
    pub http_header_timeout: Duration,
    /// Most header fields in an HTTP request (more → 431). Default 100.
    pub max_request_headers: usize,
    /// Most bytes in an HTTP request head (more → 431). Default 64 KiB.
    pub max_header_bytes: usize,
    /// Whether the sandbox has IPv6 egress: AAAA answers are asked for and
    /// dialled. Default false.
    pub ipv6: bool,
    /// How tunnels move bytes. Default [`tunnel::DEFAULT_COPY_MODE`].
    pub copy_mode: CopyMode,
    /// The kernel tunnel, for [`CopyMode::Kernel`] (without it that mode
    /// relays with `splice(2)`).
    pub kernel_tunnel: Option<Arc<dyn KernelTunnel>>,
    /// TLS interception for transform domains (this sandbox's CA and the
    /// upstream trust). `None`: a TLS connection to a transform domain is
    /// refused with `interception_unavailable` (fail closed).
    pub interception: Option<Arc<Interception>>,
}

/// Where the proxy reports what it refused and what it relayed.
pub trait ProxyEvents: Send + Sync + 'static {
    /// A connection or request was refused: by policy, by a limit, or
    /// because the sandbox's bytes could not be accepted. `reason` is a
    /// stable snake_case code (the one in `x-tollgate-reason`).
    fn denied(&self, name: Option<&str>, dst: SocketAddr, reason: &str);
    /// A tunnel (or an HTTP upstream connection) was established to
    /// `upstream` for a connection to `dst`.
    fn tunneled(&self, name: Option<&str>, dst: SocketAddr, upstream: SocketAddr);
    /// An allowed connection or request failed on the upstream's side
    /// (DNS, connect, HTTP). Not a denial. Default: ignored.
    fn upstream_failed(&self, name: Option<&str>, dst: SocketAddr, reason: &str) {
        let _ = (name, dst, reason);
    }
}

/// [`ProxyEvents`] that discards everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoEvents;

/// One sandbox's transparent proxy.
pub struct SandboxProxy {
    sandbox_id: String,
    cfg: ProxyConfig,
    resolver: Arc<dyn Resolve>,
    events: Arc<dyn ProxyEvents>,
    registry: Arc<Registry>,
    permits: Arc<Semaphore>,
    stop: watch::Sender<bool>,
    dialer: Dialer,
    /// Upstream connections of intercepted requests.
    pool: Arc<intercept::Pool>,
}

// === impl ProxyConfig ===

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            dns_timeout: Duration::from_secs(5),
            detect: DetectLimits::default(),
            max_connections: 1024,
            idle_timeout: Duration::from_secs(3600),
            http_header_timeout: Duration::from_secs(10),
            max_request_headers: 100,
            max_header_bytes: 64 * 1024,
            ipv6: false,
            copy_mode: tunnel::DEFAULT_COPY_MODE,
            kernel_tunnel: None,
            interception: None,
        }
    }
}

// === impl NoEvents ===

impl ProxyEvents for NoEvents {
    fn denied(&self, _: Option<&str>, _: SocketAddr, _: &str) {}
    fn tunneled(&self, _: Option<&str>, _: SocketAddr, _: SocketAddr) {}
}

// === impl SandboxProxy ===

impl SandboxProxy {
    /// A proxy for `sandbox_id` enforcing `policy`.
    pub fn new(
        sandbox_id: String,
        policy: Arc<CompiledPolicy>,
        resolver: Arc<dyn Resolve>,
        cfg: ProxyConfig,
        events: Arc<dyn ProxyEvents>,
    ) -> Arc<Self> {
        let dialer = Dialer {
            connect_timeout: cfg.connect_timeout,
            dns_timeout: cfg.dns_timeout,
            ipv6: cfg.ipv6,
            #[cfg(test)]
            rewrite: None,
        };
        Arc::new(Self::build(
            sandbox_id, policy, resolver, cfg, events, dialer,
        ))
    }

    fn build(
        sandbox_id: String,
        policy: Arc<CompiledPolicy>,
        resolver: Arc<dyn Resolve>,
        cfg: ProxyConfig,
        events: Arc<dyn ProxyEvents>,
        dialer: Dialer,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(cfg.max_connections));
        Self {
            sandbox_id,
            cfg,
            resolver,
            events,
            registry: Arc::new(Registry::new(policy)),
            permits,
            stop: watch::channel(false).0,
            dialer,
            pool: Arc::new(intercept::Pool::default()),
        }
    }

    /// The sandbox this proxy serves.
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }

    /// The configuration in force.
    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<CompiledPolicy> {
        self.registry.policy()
    }

    /// Replaces the policy. New connections and requests see it at once;
    /// open tunnels whose verdict changed, and HTTP connections whose last
    /// decision became a denial, are closed immediately.
    pub fn set_policy(&self, policy: Arc<CompiledPolicy>) {
        let closed = self.registry.set_policy(policy);
        if closed > 0 {
            tracing::debug!(sandbox = %self.sandbox_id, closed, "policy update closed connections");
        }
    }

    /// Stops accepting and closes every open connection.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
        self.registry.shutdown();
        self.pool.shutdown();
    }

    /// The pool of intercepted requests' upstream connections.
    pub(crate) fn pool(&self) -> &Arc<intercept::Pool> {
        &self.pool
    }

    /// Connections currently open (detecting, relaying or serving HTTP).
    pub fn active_connections(&self) -> usize {
        self.registry.len()
    }

    /// Accepts connections until [`Self::shutdown`], one task each. Accept
    /// errors (descriptor exhaustion, aborted handshakes) are logged and
    /// retried after a short pause; they never end the loop.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let mut stop = self.stop.subscribe();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((conn, _peer)) => {
                    tokio::spawn(Arc::clone(&self).handle(conn));
                }
                Err(e) => {
                    tracing::warn!(sandbox = %self.sandbox_id, error = %e, "accept failed");
                    let pause = if e.raw_os_error() == Some(libc::EMFILE)
                        || e.raw_os_error() == Some(libc::ENFILE)
                    {
                        Duration::from_millis(100)
                    } else {
                        Duration::from_millis(5)
                    };
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// Handles one accepted connection; its original destination is its
    /// local address (`bpf_sk_assign` keeps the 4-tuple).
    pub async fn handle(self: Arc<Self>, conn: TcpStream) {
        match conn.local_addr() {
            Ok(dst) => self.handle_with_dst(conn, dst).await,
            Err(_) => respond::reset(conn),
        }
    }

    /// [`Self::handle`] with the original destination given, for tests and
    /// benches where the socket's local address is the listener's own (no
    /// eBPF). Production code calls [`Self::handle`].
    pub async fn handle_with_dst(self: Arc<Self>, conn: TcpStream, dst: SocketAddr) {
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            self.report(None, dst, &ProxyError::ConnectionLimit);
            respond::reset(conn);
            return;
        };
        let Some(handle) = self.registry.register(dst, permit) else {
            respond::reset(conn);
            return;
        };
        // Latency over batching: TLS handshakes and request heads are small.
        let _ = conn.set_nodelay(true);
        let detected = tokio::select! {
            biased;
            _ = handle.closed() => {
                respond::reset(conn);
                return;
            }
            d = detect::detect(&conn, &self.cfg.detect) => d,
        };
        match detected {
            Err(e) => {
                let speak = refuse_detect_as(&e);
                self.refuse(conn, dst, None, speak, ProxyError::Detect(e))
                    .await;
            }
            Ok(Detected::Tls(hello)) => Arc::clone(&self).serve_tls(conn, handle, hello).await,
            Ok(Detected::Http(_)) => http::serve(Arc::clone(&self), conn, handle).await,
            Ok(Detected::Opaque) => self.serve_opaque(conn, handle).await,
        }
    }

    /// TLS: decide on the SNI, then tunnel or refuse with an alert.
    async fn serve_tls(
        self: Arc<Self>,
        conn: TcpStream,
        handle: ConnHandle,
        hello: ClientHelloInfo,
    ) {
        let dst = handle.dst();
        let name = hello.sni.as_deref();
        let (verdict, policy) = handle.decide(name, Kind::Tunnel);
        let dial = match verdict {
            Verdict::Tunnel { dial } => dial,
            Verdict::Deny(r) => {
                return self
                    .refuse(conn, dst, name, RefuseAs::Tls, ProxyError::Denied(r))
                    .await
            }
            Verdict::Intercept { name: matched, .. } => {
                let Some(ic) = self.cfg.interception.clone() else {
                    return self
                        .refuse(
                            conn,
                            dst,
                            name,
                            RefuseAs::Tls,
                            ProxyError::InterceptionUnavailable,
                        )
                        .await;
                };
                if !offers_tls12_or_later(&hello) {
                    return self
                        .refuse(conn, dst, name, RefuseAs::Tls, ProxyError::TlsVersion)
                        .await;
                }
                return intercept::serve(Arc::clone(&self), conn, handle, matched, ic).await;
            }
            Verdict::Allow => {
                let err = ProxyError::Internal("allow_verdict_for_tcp");
                return self.refuse(conn, dst, name, RefuseAs::Tls, err).await;
            }
        };
        if !offers_tls12_or_later(&hello) {
            return self
                .refuse(conn, dst, name, RefuseAs::Tls, ProxyError::TlsVersion)
                .await;
        }
        self.tunnel(conn, &handle, name, &dial, &policy, RefuseAs::Tls)
            .await;
    }

    /// Neither TLS nor HTTP: no name, decided by destination address alone.
    async fn serve_opaque(&self, conn: TcpStream, handle: ConnHandle) {
        let dst = handle.dst();
        let (verdict, policy) = handle.decide(None, Kind::Tunnel);
        let err = match verdict {
            Verdict::Tunnel { dial } => {
                return self
                    .tunnel(conn, &handle, None, &dial, &policy, RefuseAs::Reset)
                    .await
            }
            Verdict::Deny(r) => ProxyError::Denied(r),
            Verdict::Intercept { .. } => ProxyError::InterceptionUnavailable,
            Verdict::Allow => ProxyError::Internal("allow_verdict_for_tcp"),
        };
        self.refuse(conn, dst, None, RefuseAs::Reset, err).await;
    }

    /// Dials for `dial` and relays until done, idle, or told to close.
    async fn tunnel(
        &self,
        conn: TcpStream,
        handle: &ConnHandle,
        name: Option<&str>,
        dial: &Dial,
        policy: &CompiledPolicy,
        speak: RefuseAs,
    ) {
        let dst = handle.dst();
        let dialed = tokio::select! {
            biased;
            _ = handle.closed() => {
                respond::reset(conn);
                return;
            }
            r = self.dialer.dial(&*self.resolver, policy, dial, dst.port()) => r,
        };
        let dialed = match dialed {
            Ok(d) => d,
            Err(e) => return self.refuse(conn, dst, name, speak, e).await,
        };
        self.events.tunneled(name, dst, dialed.addr);
        let up = dialed.stream;
        let _ = up.set_nodelay(true);
        let opts = RelayOptions {
            idle_timeout: self.cfg.idle_timeout,
            mode: self.cfg.copy_mode,
        };
        let (conn, up) = match (&self.cfg.kernel_tunnel, opts.mode) {
            (Some(kt), CopyMode::Kernel) => {
                let cancel = async {
                    handle.closed().await;
                };
                match tunnel::kernel::relay(&**kt, conn, up, &opts, cancel).await {
                    KernelOutcome::Relayed { down, up, result } => {
                        let (down_reset, up_reset) =
                            self.tunnel_ended(dst, dialed.addr, true, result);
                        for (s, reset) in [(down, down_reset), (up, up_reset)] {
                            if reset {
                                respond::reset_std(s);
                            }
                        }
                        return;
                    }
                    KernelOutcome::Failed(e) => {
                        self.tunnel_ended(dst, dialed.addr, true, Err(e));
                        return;
                    }
                    KernelOutcome::NotJoined { down, up, error } => {
                        tracing::warn!(
                            sandbox = %self.sandbox_id, %dst, %error,
                            "kernel tunnel: join failed, relaying with splice(2)"
                        );
                        (down, up)
                    }
                }
            }
            _ => (conn, up),
        };
        let cancel = async {
            handle.closed().await;
        };
        let result = tunnel::relay(&conn, &up, &opts, cancel).await;
        let (down_reset, up_reset) = self.tunnel_ended(dst, dialed.addr, false, result);
        if down_reset {
            respond::reset(conn);
        }
        if up_reset {
            respond::reset(up);
        }
    }

    /// Logs how a tunnel ended; which of (downstream, upstream) to reset: a
    /// reset is passed on to the other side (a plain close would look like
    /// a clean end of stream), and a cancelled tunnel resets both.
    fn tunnel_ended(
        &self,
        dst: SocketAddr,
        upstream: SocketAddr,
        kernel: bool,
        result: Result<RelayStats, TunnelError>,
    ) -> (bool, bool) {
        match result {
            Ok(stats) => {
                tracing::debug!(
                    sandbox = %self.sandbox_id, %dst, %upstream, kernel,
                    up = stats.to_upstream, down = stats.to_downstream, end = ?stats.end,
                    "tunnel ended"
                );
                let cancelled = stats.end == RelayEnd::Cancelled;
                (cancelled, cancelled)
            }
            Err(TunnelError::Upstream(e)) => {
                tracing::debug!(sandbox = %self.sandbox_id, %dst, kernel, error = %e, "upstream failed");
                (true, false)
            }
            Err(TunnelError::Downstream(e)) => {
                tracing::debug!(sandbox = %self.sandbox_id, %dst, kernel, error = %e, "downstream failed");
                (false, true)
            }
        }
    }

    /// Reports `err` and refuses the connection in its protocol.
    async fn refuse(
        &self,
        conn: TcpStream,
        dst: SocketAddr,
        name: Option<&str>,
        speak: RefuseAs,
        err: ProxyError,
    ) {
        self.report(name, dst, &err);
        respond::refuse(conn, speak, &err).await;
    }

    /// One event per refusal: `denied` for the policy's and the sandbox's
    /// side, `upstream_failed` for the upstream's and internal failures.
    fn report(&self, name: Option<&str>, dst: SocketAddr, err: &ProxyError) {
        tracing::debug!(
            sandbox = %self.sandbox_id, %dst, name = name.unwrap_or("-"),
            side = err.side().as_str(), reason = err.reason(), error = %err,
            "refused"
        );
        match err.side() {
            Side::Policy | Side::Downstream => self.events.denied(name, dst, err.reason()),
            Side::Upstream | Side::Internal => self.events.upstream_failed(name, dst, err.reason()),
        }
    }
}

impl std::fmt::Debug for SandboxProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxProxy")
            .field("sandbox_id", &self.sandbox_id)
            .field("active_connections", &self.active_connections())
            .finish_non_exhaustive()
    }
}

/// In which protocol a detection error is answered: an alert when the
/// bytes were a ClientHello, a 400 when they were an HTTP head, else a reset
/// (stalled, closed or unreadable streams get no words).
fn refuse_detect_as(e: &DetectError) -> RefuseAs {
    if e.tls_alert_description().is_some() {
        RefuseAs::Tls
    } else if matches!(e, DetectError::BadHttp(_)) {
        RefuseAs::Http
    } else {
        RefuseAs::Reset
    }
}

/// Whether the ClientHello offers TLS 1.2 or later (THREATS #18: no
/// downgrade to 1.0 / 1.1).
fn offers_tls12_or_later(hello: &ClientHelloInfo) -> bool {
    hello
        .supported_versions
        .iter()
        .any(|&v| (TLS_1_2..=0x03ff).contains(&v))
}

#[cfg(test)]
impl SandboxProxy {
    /// [`Self::new`] whose dialler rewrites every address just before
    /// `connect` (a loopback canary standing in for an address that must
    /// never be reached).
    pub(crate) fn new_with_rewrite(
        policy: Arc<CompiledPolicy>,
        resolver: Arc<dyn Resolve>,
        cfg: ProxyConfig,
        events: Arc<dyn ProxyEvents>,
        rewrite: dial::Rewrite,
    ) -> Arc<Self> {
        let dialer = Dialer {
            connect_timeout: cfg.connect_timeout,
            dns_timeout: cfg.dns_timeout,
            ipv6: cfg.ipv6,
            rewrite: Some(rewrite),
        };
        Arc::new(Self::build(
            "test".into(),
            policy,
            resolver,
            cfg,
            events,
            dialer,
        ))
    }
}
