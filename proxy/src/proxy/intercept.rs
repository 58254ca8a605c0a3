//! TLS interception for a transform domain: terminate the sandbox's TLS with
//! a leaf from its CA, serve HTTP/1.1 or HTTP/2 (by ALPN) with hyper, and
//! forward every request over verified TLS to the real upstream.
//!
//! Per connection:
//! 1. The leaf for the SNI is minted (or taken from the cache) after the
//!    ClientHello was read (`LazyConfigAcceptor`); the ClientHello rustls
//!    parses must carry the same name the detector saw.
//! 2. hyper serves the sandbox: h2 when ALPN says so, else HTTP/1.1 (with
//!    upgrades).
//!
//! Per request:
//! 1. `Host` (HTTP/1.1) / `:authority` (HTTP/2) must name the SNI (and the
//!    original port, when a port is given), else `421` and nothing goes
//!    upstream. `CONNECT` and `Upgrade: h2c` → `400`.
//! 2. The policy decides again (a live update applies to the next request):
//!    deny → `403`; still a transform → rewrite; allowed without a
//!    transform any more → forwarded as it is.
//! 3. Hop-by-hop headers go (`te: trailers` is kept for gRPC), then the
//!    transform strips and injects; request trailers lose the stripped and
//!    injected names. Bodies stream both ways.
//! 4. Upstream: the NAME is dialled (floor and private answers refused as
//!    for tunnels), TLS verified against the platform roots; the protocol
//!    mirrors the sandbox's (HTTP/1.1 → HTTP/1.1; h2 → h2 when the upstream
//!    offers it, by ALPN), connections pooled per sandbox, name, port and
//!    protocol; while a sandbox connection lives it keeps the upstream
//!    connection it used (h2: one per sandbox connection, dialled once for
//!    its concurrent first streams), and hands it to the pool when it
//!    ends. A certificate failure → `502` with `upstream_cert_*`; no request byte
//!    was sent. Redirects are returned, never followed.
//! 5. Response headers and trailers that carry an injected value (or its
//!    base64) are redacted; in bodies every occurrence is masked with `*`
//!    (same length). Requests carrying a secret ask for
//!    `accept-encoding: identity` so that bodies stay scannable.
//!    `TRACE` and `CONNECT` → `405`.
//! 6. A WebSocket upgrade (HTTP/1.1) goes over a fresh HTTP/1.1-only
//!    upstream connection and becomes a byte relay only on a genuine `101`.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT_ENCODING, CONNECTION, CONTENT_ENCODING, EXPECT, HOST, TE, UPGRADE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::intercept::{Interception, Rewrite, ScrubBody};
use crate::policy::{CompiledPolicy, Dial, Transform, Verdict};
use crate::respond::{self, Body};
use crate::tunnel::{serve_until, ActiveIo, Activity};

use super::error::ProxyError;
use super::http::{h1_server, strip_hop_by_hop, switching_protocols};
use super::registry::{ConnHandle, Kind};
use super::SandboxProxy;

mod pool;

pub(crate) use pool::Pool;
use pool::{Key, Sender};

/// A request body as sent upstream: the sandbox's, its trailers rewritten
/// by the transform (a body type of its own, not a boxed one: no
/// allocation per request).
pub(crate) struct UpBody {
    inner: Incoming,
    rewrite: Option<Arc<Rewrite>>,
}

impl hyper::body::Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        Poll::Ready(polled.map(|frame| {
            frame.map(|mut f| {
                if let (Some(t), Some(rw)) = (f.trailers_mut(), &this.rewrite) {
                    rw.apply_trailers(t);
                }
                f
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Most concurrent HTTP/2 streams a sandbox may open per connection.
const MAX_STREAMS: u32 = 100;
/// HTTP/2 receive windows, fixed: what a sandbox may send on a connection
/// (and on one stream) before the proxy has forwarded it, and what an
/// upstream may. They bound the bytes buffered per connection. BDP-based
/// adaptive windows were measured worse here: on a short round trip they
/// stay small, and a 256 MiB h2 response through interception took ~2.2
/// instead of ~1.4 CPU-s/GiB in the proxy (0.25 vs 0.45x direct).
const DOWN_H2_STREAM_WINDOW: u32 = 1 << 20;
const DOWN_H2_CONN_WINDOW: u32 = 2 << 20;
const UP_H2_STREAM_WINDOW: u32 = 2 << 20;
const UP_H2_CONN_WINDOW: u32 = 5 << 20;
/// How long a request waits for its connection's own HTTP/1.1 upstream
/// connection to finish the previous exchange (it normally has: the
/// response was read to its end) before it goes back to the shared pool
/// and another connection is used.
const LOCAL_READY_WAIT: Duration = Duration::from_millis(50);

/// One intercepted downstream connection.
struct Conn {
    proxy: Arc<SandboxProxy>,
    ic: Arc<Interception>,
    handle: ConnHandle,
    /// The SNI, normalised (lower case, no trailing dot).
    sni: String,
    /// Whether the sandbox speaks HTTP/2 on this connection.
    h2: bool,
    activity: Arc<Activity>,
    /// The last transform compiled, reused while the policy keeps it.
    rewrite: Mutex<Option<(Arc<Transform>, Arc<Rewrite>)>>,
    /// Where this connection's requests go upstream in the pool.
    key: Key,
    /// The upstream authority without and with the port (built once;
    /// `None` if the SNI cannot be one, when no request can name it).
    authorities: Option<(UpAuthority, UpAuthority)>,
    /// HTTP/1.1: the upstream connection this connection's last request
    /// used, kept for its next one (and when it was last used); it returns
    /// to the shared pool when this connection ends.
    up_h1: Mutex<Option<(http1::SendRequest<UpBody>, Instant)>>,
    /// HTTP/2: this connection's own upstream h2 connection, shared by its
    /// streams (not by other sandbox connections: streams of several
    /// connections multiplexed onto one upstream connection contend on
    /// its state, measured at ~20% more proxy CPU per request); it returns
    /// to the shared pool when this connection ends.
    up_h2: Mutex<Option<http2::SendRequest<UpBody>>>,
    /// Held while `up_h2` is being found or dialled, so that the first
    /// concurrent streams of a connection open one upstream connection,
    /// not one each.
    up_h2_dial: tokio::sync::Mutex<()>,
    /// The upstream answered an h2 offer with HTTP/1.1: streams then take
    /// (or dial) HTTP/1.1 connections in parallel, without `up_h2_dial`.
    up_no_h2: AtomicBool,
}

/// An upstream authority, as the `:authority` of an HTTP/2 request and as
/// the `Host` of an HTTP/1.1 one.
#[derive(Clone)]
struct UpAuthority {
    uri: Authority,
    host: HeaderValue,
}

impl UpAuthority {
    fn new(s: String) -> Option<Self> {
        let host = HeaderValue::from_str(&s).ok()?;
        let uri = Authority::from_maybe_shared(Bytes::from(s)).ok()?;
        Some(Self { uri, host })
    }
}

/// What the authority of a request says, once it names the SNI.
struct Target {
    port: Option<u16>,
}

/// Terminates TLS for `sni` and serves requests until the connection ends,
/// idles out, or is told to close.
pub(super) async fn serve(
    proxy: Arc<SandboxProxy>,
    conn: TcpStream,
    handle: ConnHandle,
    sni: String,
    ic: Arc<Interception>,
) {
    let dst = handle.dst();
    let sni = normalise(&sni);
    if let Err(e) = ic.leaves().get(&sni) {
        tracing::warn!(sandbox = %proxy.sandbox_id, %dst, error = %e, "minting a leaf failed");
        let err = ProxyError::Internal("leaf_mint_failed");
        proxy.report(Some(&sni), dst, &err);
        respond::refuse(conn, respond::RefuseAs::Tls, &err).await;
        return;
    }
    let activity = Arc::new(Activity::new());
    let io = ActiveIo::new(conn, Arc::clone(&activity));
    let handshake = async {
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
        let start = acceptor.await.map_err(|_| "tls_handshake_failed")?;
        let same = start
            .client_hello()
            .server_name()
            .is_some_and(|n| normalise(n) == sni);
        if !same {
            return Err("sni_mismatch");
        }
        start
            .into_stream(ic.server_config())
            .await
            .map_err(|_| "tls_handshake_failed")
    };
    let tls = tokio::select! {
        biased;
        _ = handle.closed() => return,
        r = tokio::time::timeout(proxy.cfg.http_header_timeout, handshake) => r,
    };
    let tls = match tls {
        Ok(Ok(s)) => s,
        Ok(Err(reason)) => {
            proxy.events.denied(Some(&sni), dst, reason);
            return;
        }
        Err(_) => {
            proxy
                .events
                .denied(Some(&sni), dst, "tls_handshake_timeout");
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let cfg = proxy.cfg.clone();
    let idle_timeout = cfg.idle_timeout;
    let authorities =
        UpAuthority::new(sni.clone()).zip(UpAuthority::new(format!("{sni}:{}", dst.port())));
    let key = Key {
        name: sni.clone(),
        port: dst.port(),
        http1_only: !h2,
    };
    let ctx = Arc::new(Conn {
        proxy,
        ic,
        handle,
        sni,
        h2,
        activity: Arc::clone(&activity),
        rewrite: Mutex::new(None),
        key,
        authorities,
        up_h1: Mutex::new(None),
        up_h2: Mutex::new(None),
        up_h2_dial: tokio::sync::Mutex::new(()),
        up_no_h2: AtomicBool::new(false),
    });
    let svc_ctx = Arc::clone(&ctx);
    let svc = hyper::service::service_fn(move |req| {
        let ctx = Arc::clone(&svc_ctx);
        // Boxed: hyper moves a service future several times (for HTTP/2,
        // into a task of its own) before it is first polled; a request's
        // state is KiBs, a box is a pointer.
        async move { Ok::<_, Infallible>(Box::pin(ctx.request(req)).await) }
    });
    let io = TokioIo::new(tls);
    let served = async move {
        if h2 {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .initial_stream_window_size(DOWN_H2_STREAM_WINDOW)
                .initial_connection_window_size(DOWN_H2_CONN_WINDOW)
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX));
            b.serve_connection(io, svc).await
        } else {
            h1_server(&cfg)
                .serve_connection(io, svc)
                .with_upgrades()
                .await
        }
    };
    let stop = async {
        tokio::select! {
            _ = ctx.handle.closed() => {}
            () = activity.idle_for(idle_timeout) => {}
        }
    };
    if let Some(Err(e)) = serve_until(served, stop).await {
        tracing::debug!(sandbox = %ctx.proxy.sandbox_id, %dst, error = %e, "intercepted connection ended");
    }
    ctx.release_upstream();
}

/// Bytes of an HTTP/1 request head as sent: request line, each header line
/// (`name: value` + CRLF) and the final CRLF.
fn head_size<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len() + uri_len(req.uri()) + 12;
    req.headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
        + 2
}

/// The length of `uri` as written in a request line (as its `Display`
/// writes it), without writing it.
fn uri_len(uri: &Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path().len()
        + uri.query().map_or(0, |q| q.len() + 1)
}

/// Lower case, no trailing dot.
fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

// === impl Conn ===

impl Conn {
    /// Answers one request (never fails: refusals are responses).
    async fn request(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let dst = self.handle.dst();
        let name = Some(self.sni.as_str());
        // No tunnel inside an intercepted stream; TRACE would reflect the
        // injected headers.
        if req.method() == Method::CONNECT {
            return self.refuse(ProxyError::MethodNotAllowed("connect_not_allowed"));
        }
        if req.method() == Method::TRACE {
            return self.refuse(ProxyError::MethodNotAllowed("trace_not_allowed"));
        }
        // hyper's read-buffer cap is soft (one large read can carry a head
        // past it); the head's own size is the limit.
        if !self.h2 && head_size(&req) > self.proxy.cfg.max_header_bytes {
            return self.refuse(ProxyError::Detect(crate::detect::DetectError::BadHttp(
                "header_too_large",
            )));
        }
        let target = match self.target(&req) {
            Ok(t) => t,
            Err(e) => return self.refuse(e),
        };
        if target.port.is_some_and(|p| p != dst.port()) {
            return self.refuse(ProxyError::Misdirected);
        }
        let upgrade = !self.h2 && wants_upgrade(&req);
        if upgrade
            && req
                .headers()
                .get_all(UPGRADE)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"))
        {
            return self.refuse(ProxyError::BadRequest("h2c_upgrade"));
        }
        let (verdict, policy) = self.handle.decide(name, Kind::Http);
        let rewrite = match verdict {
            Verdict::Intercept { transform, .. } => match self.rewrite_for(&transform) {
                Ok(r) => Some(r),
                Err(e) => return self.refuse(e),
            },
            // Still allowed, but no longer a transform domain: forwarded as
            // it is.
            Verdict::Tunnel { .. } => None,
            Verdict::Deny(r) => return self.refuse(ProxyError::Denied(r)),
            Verdict::Allow => return self.refuse(ProxyError::Internal("allow_verdict_for_tcp")),
        };
        match self.forward(req, &target, upgrade, rewrite, &policy).await {
            Ok(resp) => resp,
            Err(e) => self.refuse(e),
        }
    }

    /// The request's authority: `:authority` / absolute URI, else the one
    /// `Host`; both present → they must agree; it must name the SNI
    /// (else `421`).
    fn target(&self, req: &Request<Incoming>) -> Result<Target, ProxyError> {
        let mut hosts = req.headers().get_all(HOST).iter();
        let host = hosts.next();
        if hosts.next().is_some() {
            return Err(ProxyError::BadRequest("duplicate_host"));
        }
        // The common case, without parsing: the one authority given is the
        // SNI as it was normalised, alone or with the original port.
        let named = match (req.uri().authority(), host) {
            (Some(a), None) => Some(a.as_str().as_bytes()),
            (None, Some(h)) => Some(h.as_bytes()),
            _ => None,
        };
        if let (Some(named), Some((bare, with_port))) = (named, &self.authorities) {
            if named.eq_ignore_ascii_case(bare.host.as_bytes()) {
                return Ok(Target { port: None });
            }
            if named.eq_ignore_ascii_case(with_port.host.as_bytes()) {
                return Ok(Target {
                    port: Some(self.handle.dst().port()),
                });
            }
        }
        let from_host = host
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|s| s.parse::<Authority>().ok())
                    .ok_or(ProxyError::BadRequest("invalid_host"))
            })
            .transpose()?;
        let auth = match (req.uri().authority(), from_host) {
            (Some(a), Some(h)) => {
                if !a.host().eq_ignore_ascii_case(h.host()) || a.port_u16() != h.port_u16() {
                    return Err(ProxyError::Misdirected);
                }
                a.clone()
            }
            (Some(a), None) => a.clone(),
            (None, Some(h)) => h,
            (None, None) => return Err(ProxyError::BadRequest("missing_host")),
        };
        if auth.as_str().contains('@') {
            return Err(ProxyError::BadRequest("userinfo_in_authority"));
        }
        if normalise(auth.host()) != self.sni {
            return Err(ProxyError::Misdirected);
        }
        Ok(Target {
            port: auth.port_u16(),
        })
    }

    fn rewrite_for(&self, t: &Arc<Transform>) -> Result<Arc<Rewrite>, ProxyError> {
        let mut cur = self.rewrite.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((rule, rw)) = cur.as_ref() {
            if Arc::ptr_eq(rule, t) || **rule == **t {
                return Ok(Arc::clone(rw));
            }
        }
        let rw = Arc::new(Rewrite::new(t).map_err(|_| ProxyError::Internal("invalid_transform"))?);
        *cur = Some((Arc::clone(t), Arc::clone(&rw)));
        Ok(rw)
    }

    /// Reports a refusal and builds its response.
    fn refuse(&self, err: ProxyError) -> Response<Body> {
        self.proxy.report(Some(&self.sni), self.handle.dst(), &err);
        let mut resp = respond::http_error(&err);
        if self.h2 {
            // Connection-specific headers are not allowed in HTTP/2.
            resp.headers_mut().remove(CONNECTION);
        }
        resp
    }

    async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        target: &Target,
        upgrade: bool,
        rewrite: Option<Arc<Rewrite>>,
        policy: &CompiledPolicy,
    ) -> Result<Response<Body>, ProxyError> {
        let down_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let te_trailers = parts.headers.get_all(TE).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
        let upgrade_value = if upgrade {
            parts.headers.get(UPGRADE).cloned()
        } else {
            None
        };
        strip_hop_by_hop(&mut parts.headers);
        // (`Host` is set, or removed for HTTP/2, by `Head::build`.)
        // The proxy sends the body as soon as the upstream is ready; the
        // sandbox's client got its `100 Continue` from hyper when the body
        // was first polled.
        parts.headers.remove(EXPECT);
        if let Some(rw) = &rewrite {
            rw.apply(&mut parts.headers);
            if rw.has_secrets() {
                // Responses must stay scannable for echoed secrets.
                parts
                    .headers
                    .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
            }
        }
        if te_trailers {
            parts
                .headers
                .insert(TE, HeaderValue::from_static("trailers"));
        }
        if let Some(v) = upgrade_value {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, v);
        }
        let body = UpBody {
            inner: body,
            rewrite: rewrite.clone(),
        };
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let authority = match (&self.authorities, target.port) {
            (Some((_, a)), Some(_)) | (Some((a, _)), None) => a.clone(),
            (None, _) => {
                return Err(ProxyError::BadRequest(if self.h2 {
                    "invalid_target"
                } else {
                    "invalid_host"
                }))
            }
        };
        let head = Head {
            method: parts.method,
            path,
            authority,
            headers: parts.headers,
        };
        // The upstream protocol mirrors the sandbox's: an HTTP/1.1 client
        // gets HTTP/1.1 upstream (no multiplexing hop; its semantics kept
        // end to end), an h2 client gets h2 where the upstream offers it.
        let mut resp = if upgrade {
            let sender = self.connect(policy, true, true).await?;
            let Sender::H1(mut s) = sender else {
                return Err(ProxyError::Internal("h2_for_upgrade"));
            };
            s.send_request(head.build(body, false)?)
                .await
                .map_err(ProxyError::UpstreamHttp)?
        } else {
            self.send_pooled(head, body, policy).await?
        };
        let rewrite = rewrite.as_ref();
        if let Some(down) = down_upgrade {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let up = hyper::upgrade::on(&mut resp);
                self.spawn_upgraded(down, up);
                return Ok(switching_protocols(resp));
            }
            let mut resp = self.relayed(resp, rewrite);
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return Ok(resp);
        }
        Ok(self.relayed(resp, rewrite))
    }

    /// Sends over this connection's own upstream connection, a pooled one,
    /// or a new one. A request a reused HTTP/1.1 connection could not take
    /// (it closed meanwhile) is retried once on a fresh connection; its
    /// body was not touched.
    async fn send_pooled(
        self: &Arc<Self>,
        head: Head,
        body: UpBody,
        policy: &CompiledPolicy,
    ) -> Result<Response<Incoming>, ProxyError> {
        let pool = self.proxy.pool();
        let key = &self.key;
        let mut pending = (head, body);
        for attempt in 0..2 {
            let sender = if attempt > 0 {
                self.connect(policy, key.http1_only, false).await?
            } else if self.h2 {
                self.h2_sender(policy).await?
            } else {
                match self.local_h1().await {
                    Some(s) => Sender::H1(s),
                    None => match pool.checkout(key) {
                        Some(s) => s,
                        None => self.connect(policy, key.http1_only, false).await?,
                    },
                }
            };
            let (head, body) = pending;
            match sender {
                Sender::H2(mut s) => {
                    let req = head.build(body, true)?;
                    return s.send_request(req).await.map_err(ProxyError::UpstreamHttp);
                }
                Sender::H1(mut s) => {
                    let authority = head.authority.clone();
                    let req = head.build(body, false)?;
                    let sent = s.try_send_request(req).await;
                    match sent {
                        Ok(resp) => {
                            if self.h2 {
                                // Concurrent streams: the connection goes
                                // back to the shared pool.
                                pool.checkin_h1_when_ready(key.clone(), s, Instant::now());
                            } else {
                                self.keep_h1(s);
                            }
                            return Ok(resp);
                        }
                        Err(mut e) => match e.take_message() {
                            // Not sent (the reused connection closed
                            // meanwhile): once more, on a new connection.
                            Some(req) if attempt == 0 => pending = Head::unbuild(req, authority),
                            _ => return Err(ProxyError::UpstreamHttp(e.into_error())),
                        },
                    }
                }
            }
        }
        Err(ProxyError::Internal("upstream_retry_exhausted"))
    }

    /// An upstream sender for a stream of this HTTP/2 connection: its own
    /// upstream h2 connection once that can take another stream; else,
    /// one at a time per connection, an idle pooled connection or a new
    /// one, which becomes its own when it is h2 (an upstream without h2
    /// gives HTTP/1.1 connections, pooled per request).
    async fn h2_sender(&self, policy: &CompiledPolicy) -> Result<Sender, ProxyError> {
        if let Some(s) = self.own_h2_ready().await {
            return Ok(Sender::H2(s));
        }
        let pooled_or_new = || async {
            match self.proxy.pool().checkout(&self.key) {
                Some(s) => Ok(s),
                None => self.connect(policy, self.key.http1_only, false).await,
            }
        };
        if self.up_no_h2.load(Ordering::Relaxed) {
            return pooled_or_new().await;
        }
        let _dialling = self.up_h2_dial.lock().await;
        // Another stream may have found or dialled one meanwhile.
        if let Some(s) = self.lock_up_h2().clone().filter(|s| s.is_ready()) {
            return Ok(Sender::H2(s));
        }
        let sender = pooled_or_new().await?;
        match &sender {
            // A saturated one it replaces keeps serving its open streams.
            Sender::H2(s) => *self.lock_up_h2() = Some(s.clone()),
            Sender::H1(_) => self.up_no_h2.store(true, Ordering::Relaxed),
        }
        Ok(sender)
    }

    /// This connection's own upstream h2 connection once it can take
    /// another stream (waiting a little when it is at the upstream's
    /// stream limit).
    async fn own_h2_ready(&self) -> Option<http2::SendRequest<UpBody>> {
        let mut s = self.lock_up_h2().clone()?;
        if s.is_closed() {
            return None;
        }
        if s.is_ready() {
            return Some(s);
        }
        match tokio::time::timeout(pool::H2_READY_WAIT, s.ready()).await {
            Ok(Ok(())) => Some(s),
            _ => None,
        }
    }

    fn lock_up_h2(&self) -> std::sync::MutexGuard<'_, Option<http2::SendRequest<UpBody>>> {
        self.up_h2.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This connection's own HTTP/1.1 upstream connection, once it is ready
    /// for another request. One that does not become ready soon goes back
    /// to the shared pool (which takes it when it is).
    async fn local_h1(&self) -> Option<http1::SendRequest<UpBody>> {
        let (mut s, since) = self.lock_up_h1().take()?;
        if s.is_closed() || since.elapsed() >= pool::IDLE_H1_FOR {
            return None;
        }
        if s.is_ready() {
            return Some(s);
        }
        match tokio::time::timeout(LOCAL_READY_WAIT, s.ready()).await {
            Ok(Ok(())) => Some(s),
            Ok(Err(_)) => None,
            Err(_) => {
                self.proxy
                    .pool()
                    .checkin_h1_when_ready(self.key.clone(), s, since);
                None
            }
        }
    }

    /// Keeps the HTTP/1.1 upstream connection a request went out on for
    /// this connection's next request.
    fn keep_h1(&self, s: http1::SendRequest<UpBody>) {
        let old = self.lock_up_h1().replace((s, Instant::now()));
        if let Some((s, since)) = old {
            self.proxy
                .pool()
                .checkin_h1_when_ready(self.key.clone(), s, since);
        }
    }

    /// The connection ended: its own upstream connection goes to the
    /// shared pool.
    fn release_upstream(&self) {
        let kept = self.lock_up_h1().take();
        if let Some((s, since)) = kept {
            self.proxy
                .pool()
                .checkin_h1_when_ready(self.key.clone(), s, since);
        }
        let kept = self.lock_up_h2().take();
        if let Some(s) = kept {
            self.proxy.pool().put_h2(self.key.clone(), s);
        }
    }

    fn lock_up_h1(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(http1::SendRequest<UpBody>, Instant)>> {
        self.up_h1.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Dials the SNI's own addresses, verifies its certificate, and starts
    /// an HTTP connection (h2 when the upstream picks it, unless
    /// `http1_only`; an HTTP/1.1 one that can be upgraded when `upgrade`,
    /// the others do without hyper's upgrade plumbing on every exchange).
    async fn connect(
        &self,
        policy: &CompiledPolicy,
        http1_only: bool,
        upgrade: bool,
    ) -> Result<Sender, ProxyError> {
        // Boxed: a dial's state (TLS and HTTP handshakes, several KiB)
        // would otherwise be part of every request's future, which is
        // moved at each request even when, as usual, nothing is dialled.
        Box::pin(self.dial(policy, http1_only, upgrade)).await
    }

    async fn dial(
        &self,
        policy: &CompiledPolicy,
        http1_only: bool,
        upgrade: bool,
    ) -> Result<Sender, ProxyError> {
        let dst = self.handle.dst();
        let proxy = &self.proxy;
        let dialed = proxy
            .dialer
            .dial(
                &*proxy.resolver,
                policy,
                &Dial::Name(self.sni.clone()),
                dst.port(),
            )
            .await?;
        let _ = dialed.stream.set_nodelay(true);
        let config = if http1_only {
            self.ic.trust().http1_only()
        } else {
            self.ic.trust().any_version()
        };
        let server_name = ServerName::try_from(self.sni.clone())
            .map_err(|_| ProxyError::BadRequest("invalid_sni"))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = tokio::time::timeout(
            proxy.cfg.connect_timeout,
            connector.connect(server_name, dialed.stream),
        )
        .await
        .map_err(|_| ProxyError::ConnectTimeout)?
        .map_err(upstream_tls_error)?;
        proxy.events.tunneled(Some(&self.sni), dst, dialed.addr);
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        let io = TokioIo::new(tls);
        let pool = proxy.pool();
        if h2 {
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(UP_H2_STREAM_WINDOW)
                .initial_connection_window_size(UP_H2_CONN_WINDOW)
                .handshake::<_, UpBody>(io)
                .await
                .map_err(ProxyError::UpstreamHttp)?;
            pool.spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::Builder::new()
                .handshake::<_, UpBody>(io)
                .await
                .map_err(ProxyError::UpstreamHttp)?;
            if upgrade {
                pool.spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
            } else {
                pool.spawn(async move {
                    let _ = conn.await;
                });
            }
            Ok(Sender::H1(sender))
        }
    }

    /// An upstream response as the sandbox gets it: hop-by-hop headers
    /// removed, injected values redacted from headers and trailers and
    /// masked in the body, body streamed.
    fn relayed(&self, resp: Response<Incoming>, rewrite: Option<&Arc<Rewrite>>) -> Response<Body> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = if self.h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        parts.extensions = http::Extensions::new();
        let Some(rw) = rewrite.filter(|rw| rw.has_secrets()) else {
            return Response::from_parts(parts, body.boxed());
        };
        let redacted = rw.redact(&mut parts.headers);
        let trailer_rw = Arc::clone(rw);
        let redact_trailers = move |t: &mut http::HeaderMap| {
            trailer_rw.redact(t);
        };
        let encoded = parts
            .headers
            .get(CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        let body = match rw.scrubber() {
            Some(scrub) if !encoded => ScrubBody::new(body, scrub, redact_trailers).boxed(),
            _ => {
                // The upstream compressed despite `accept-encoding:
                // identity`: the body cannot be scanned (trailers still are).
                if encoded {
                    tracing::warn!(
                        sandbox = %self.proxy.sandbox_id, name = %self.sni,
                        "encoded response body from a transform domain is not scrubbed"
                    );
                }
                body.map_frame(move |mut f| {
                    if let Some(t) = f.trailers_mut() {
                        redact_trailers(t);
                    }
                    f
                })
                .boxed()
            }
        };
        if redacted > 0 {
            tracing::info!(
                sandbox = %self.proxy.sandbox_id, name = %self.sni, headers = redacted,
                "redacted injected values from a response"
            );
        }
        Response::from_parts(parts, body)
    }

    /// Relays an upgraded (WebSocket) connection both ways until either
    /// side closes, it idles out, or its verdict changes.
    fn spawn_upgraded(self: &Arc<Self>, down: OnUpgrade, up: OnUpgrade) {
        self.handle.mark_tunnel();
        let ctx = Arc::clone(self);
        super::http::spawn_upgraded_relay(
            down,
            up,
            Arc::clone(&self.activity),
            self.proxy.cfg.idle_timeout,
            async move {
                ctx.handle.closed().await;
            },
        );
    }
}

/// Whether an HTTP/1.1 request asks for a protocol upgrade.
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(UPGRADE)
        && req.headers().get_all(CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// A certificate failure gets its own reason; the rest is a TLS failure.
fn upstream_tls_error(e: io::Error) -> ProxyError {
    use rustls::CertificateError as C;
    let reason = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|tls| match tls {
            rustls::Error::InvalidCertificate(c) => Some(match c {
                C::Expired | C::ExpiredContext { .. } => "upstream_cert_expired",
                C::NotValidForName | C::NotValidForNameContext { .. } => "upstream_cert_wrong_name",
                C::UnknownIssuer => "upstream_cert_unknown_issuer",
                _ => "upstream_cert_invalid",
            }),
            _ => None,
        });
    match reason {
        Some(r) => ProxyError::UpstreamCertificate(r),
        None => ProxyError::UpstreamTls(e),
    }
}

/// A request head ready to be built for either upstream protocol.
struct Head {
    method: Method,
    path: PathAndQuery,
    authority: UpAuthority,
    headers: http::HeaderMap,
}

impl Head {
    /// The head of a request built by [`Head::build`] for HTTP/1.1 with
    /// `authority`, back.
    fn unbuild(req: Request<UpBody>, authority: UpAuthority) -> (Self, UpBody) {
        let (parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let head = Self {
            method: parts.method,
            path,
            authority,
            headers: parts.headers,
        };
        (head, body)
    }

    /// HTTP/2: absolute URI, no Host. HTTP/1.1: origin form plus Host (in
    /// place of any the sandbox sent).
    fn build(self, body: UpBody, h2: bool) -> Result<Request<UpBody>, ProxyError> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.headers_mut() = self.headers;
        if h2 {
            req.headers_mut().remove(HOST);
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTPS);
            uri.authority = Some(self.authority.uri);
            uri.path_and_query = Some(self.path);
            *req.uri_mut() =
                Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest("invalid_target"))?;
            *req.version_mut() = Version::HTTP_2;
        } else {
            *req.uri_mut() = Uri::from(self.path);
            *req.version_mut() = Version::HTTP_11;
            req.headers_mut().insert(HOST, self.authority.host);
        }
        Ok(req)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn uri_len_is_the_written_length() {
        for s in [
            "/",
            "/a/b?c=d&e",
            "/?",
            "*",
            "https://api.test/x?y",
            "https://api.test:8443",
            "http://api.test:80/",
            "api.test:443",
            "/%E2%82%AC?q=%20",
        ] {
            let uri: Uri = s.parse().unwrap();
            assert_eq!(uri_len(&uri), uri.to_string().len(), "{s}");
        }
    }
}
