//! Plain HTTP/1 (no TLS): serve the sandbox with hyper's server, authorise
//! every request on its own, re-serialise allowed ones upstream with hyper's
//! client.
//!
//! Per request, in order:
//!
//! 1. The strict [`scan::Scanner`] verdict for this head: ambiguous framing
//!    (`Content-Length` with `Transfer-Encoding`, duplicate or odd lengths,
//!    codings other than exactly `chunked`), obs-fold, bare LF, `CONNECT`,
//!    `Upgrade: h2c`, an absolute-form target that disagrees with Host …
//!    → `400` and close.
//! 2. A Host port that is not the original destination port → `421`.
//! 3. The policy decides on the Host (an IP literal counts as no name):
//!    deny → `403` with `x-tollgate-reason` (the connection stays open;
//!    the next request is decided on its own). An `Intercept` verdict (a
//!    transform domain) is forwarded like a tunnel by name and WITHOUT
//!    injection: injected values never pass over plaintext (DESIGN.md).
//! 4. Forward: hop-by-hop headers removed, `Host` kept, origin-form target,
//!    HTTP/1.1, framing chosen by hyper from the body (canonical
//!    `Content-Length` or `chunked`). Redirects are returned, never
//!    followed. The upstream connection is kept for the next request of the
//!    same downstream connection when it goes to the same name and port.
//! 5. A WebSocket upgrade becomes a tunnel only on a genuine `101` from the
//!    upstream; any other answer is relayed and the connection closed after
//!    it.
//!
//! Refusals are built in [`crate::respond`].

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, UPGRADE};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use crate::policy::{CompiledPolicy, Dial, Verdict};
use crate::respond::{self, Body};
use crate::tunnel::{serve_until, ActiveIo, Activity};

use super::error::ProxyError;
use super::registry::{ConnHandle, Kind};
use super::{ProxyConfig, SandboxProxy};

mod scan;

use scan::{HeadCheck, Scanner};

/// How long a kept upstream connection may take to become ready for the
/// next request before a fresh one is dialled instead.
const REUSE_WAIT: Duration = Duration::from_millis(100);
/// Bound on completing both sides of a WebSocket upgrade after the 101.
const UPGRADE_WAIT: Duration = Duration::from_secs(10);

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the proxy ones): never relayed.
static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    UPGRADE,
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
];

/// Whether `n` is one of [`HOP_BY_HOP`] (by its text: a few length and
/// byte compares, where comparing names is a match per name).
fn is_hop_by_hop(n: &HeaderName) -> bool {
    matches!(
        n.as_str(),
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Headers a `Connection` option can never remove: the message's identity
/// and framing are the proxy's to decide.
static NEVER_NOMINATED: [HeaderName; 2] = [http::header::HOST, http::header::CONTENT_LENGTH];

/// One plain-HTTP downstream connection.
struct HttpConn {
    proxy: Arc<SandboxProxy>,
    handle: ConnHandle,
    scanner: Arc<Scanner>,
    activity: Arc<Activity>,
    /// The upstream connection kept for the next request.
    kept: Mutex<Option<Kept>>,
    /// Tasks driving upstream connections; aborted when this connection
    /// ends.
    tasks: Mutex<Vec<AbortHandle>>,
}

/// A kept upstream connection and what it was dialled for.
struct Kept {
    dial: Dial,
    sender: SendRequest<Incoming>,
}

/// The sandbox's socket as hyper sees it: every byte read also goes
/// through the [`Scanner`]; reads and writes count as activity.
struct TapIo {
    inner: ActiveIo<TcpStream>,
    scanner: Arc<Scanner>,
}

/// Serves one plain-HTTP connection until it closes, idles out, or is told
/// to close (policy revocation, shutdown).
pub(super) async fn serve(proxy: Arc<SandboxProxy>, conn: TcpStream, handle: ConnHandle) {
    let cfg = proxy.cfg.clone();
    let scanner = Arc::new(Scanner::new(cfg.max_header_bytes));
    let activity = Arc::new(Activity::new());
    let ctx = Arc::new(HttpConn {
        proxy,
        handle,
        scanner: Arc::clone(&scanner),
        activity: Arc::clone(&activity),
        kept: Mutex::new(None),
        tasks: Mutex::new(Vec::new()),
    });
    let io = TokioIo::new(TapIo {
        inner: ActiveIo::new(conn, Arc::clone(&activity)),
        scanner,
    });
    let svc_ctx = Arc::clone(&ctx);
    let svc = hyper::service::service_fn(move |req| {
        let ctx = Arc::clone(&svc_ctx);
        async move { Ok::<_, Infallible>(ctx.request(req).await) }
    });
    let served = h1_server(&cfg).serve_connection(io, svc).with_upgrades();
    let stop = async {
        tokio::select! {
            _ = ctx.handle.closed() => {}
            () = activity.idle_for(cfg.idle_timeout) => {}
        }
    };
    if let Some(Err(e)) = serve_until(served, stop).await {
        ctx.report_hyper_error(&e);
    }
}

// === impl HttpConn ===

impl HttpConn {
    /// Answers one request (never fails: refusals are responses).
    async fn request(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let dst = self.handle.dst();
        let info = match self.scanner.pop() {
            Some(HeadCheck::Ok(info)) if info.head.method == req.method().as_str() => info,
            Some(HeadCheck::Reject(e)) => return self.refuse(None, e, true),
            _ => return self.refuse(None, ProxyError::Internal("http_framing_desync"), true),
        };
        let host = info.head.host.as_str();
        let name = (host.parse::<IpAddr>().is_err()).then_some(host);
        if info.head.port.is_some_and(|p| p != dst.port()) {
            return self.refuse(name, ProxyError::BadRequest("host_port_mismatch"), true);
        }
        let (verdict, policy) = self.handle.decide(Some(host), Kind::Http);
        let dial = match verdict {
            Verdict::Deny(r) => return self.refuse(name, ProxyError::Denied(r), false),
            Verdict::Tunnel { dial } => dial,
            // Plain HTTP to a transform domain: forwarded as it is, without
            // injection (values never pass over plaintext).
            Verdict::Intercept { name, .. } => Dial::Name(name),
            Verdict::Allow => {
                return self.refuse(name, ProxyError::Internal("allow_verdict_for_tcp"), true)
            }
        };
        match self.forward(req, info.upgrade, dial, &policy, name).await {
            Ok(resp) => resp,
            Err(e) => self.refuse(name, e, false),
        }
    }

    /// Reports a refusal and builds its response (closing the connection
    /// after it when `close`, or when the error's side calls for it).
    fn refuse(&self, name: Option<&str>, err: ProxyError, close: bool) -> Response<Body> {
        self.proxy.report(name, self.handle.dst(), &err);
        let mut resp = respond::http_error(&err);
        if close {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    fn report_hyper_error(&self, e: &hyper::Error) {
        let reason = if e.is_parse_too_large() {
            "header_too_large"
        } else if e.is_parse() {
            "bad_request"
        } else if e.is_timeout() {
            "header_timeout"
        } else {
            return;
        };
        self.proxy.events.denied(None, self.handle.dst(), reason);
    }

    async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        upgrade: bool,
        dial: Dial,
        policy: &CompiledPolicy,
        name: Option<&str>,
    ) -> Result<Response<Body>, ProxyError> {
        let down_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let up_req = upstream_request(req, upgrade)?;
        let kept = if upgrade {
            None
        } else {
            self.take_kept(&dial).await
        };
        let mut sender = match kept {
            Some(s) => s,
            None => self.connect(&dial, policy, name).await?,
        };
        let mut resp = sender
            .send_request(up_req)
            .await
            .map_err(ProxyError::UpstreamHttp)?;
        if let Some(down_upgrade) = down_upgrade {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let up_upgrade = hyper::upgrade::on(&mut resp);
                self.spawn_websocket(down_upgrade, up_upgrade);
                return Ok(switching_protocols(resp));
            }
            // Not a genuine upgrade: no tunnel. The scanner stopped at the
            // upgrade request, so no further request is accepted here.
            let mut resp = relayed(resp);
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return Ok(resp);
        }
        self.keep(dial, sender);
        Ok(relayed(resp))
    }

    /// The kept upstream connection, if it was dialled for `dial` and is
    /// ready for another request.
    async fn take_kept(&self, dial: &Dial) -> Option<SendRequest<Incoming>> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        if &kept.dial != dial || kept.sender.is_closed() {
            return None;
        }
        let mut sender = kept.sender;
        if sender.is_ready() {
            return Some(sender);
        }
        match tokio::time::timeout(REUSE_WAIT, sender.ready()).await {
            Ok(Ok(())) => Some(sender),
            _ => None,
        }
    }

    fn keep(&self, dial: Dial, sender: SendRequest<Incoming>) {
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(Kept { dial, sender });
    }

    /// Dials upstream for `dial` and starts an HTTP/1.1 client connection.
    async fn connect(
        &self,
        dial: &Dial,
        policy: &CompiledPolicy,
        name: Option<&str>,
    ) -> Result<SendRequest<Incoming>, ProxyError> {
        let dst = self.handle.dst();
        let dialed = self
            .proxy
            .dialer
            .dial(&*self.proxy.resolver, policy, dial, dst.port())
            .await?;
        self.proxy.events.tunneled(name, dst, dialed.addr);
        // Nagle only delays small request heads.
        let _ = dialed.stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Incoming>(TokioIo::new(dialed.stream))
            .await
            .map_err(ProxyError::UpstreamHttp)?;
        let task = tokio::spawn(async move {
            // Errors surface on the request that is waiting for a response.
            let _ = conn.with_upgrades().await;
        });
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
        Ok(sender)
    }

    /// Relays an upgraded (WebSocket) connection both ways until either
    /// side closes, it idles out, or its verdict changes.
    fn spawn_websocket(self: &Arc<Self>, down: OnUpgrade, up: OnUpgrade) {
        self.handle.mark_tunnel();
        let ctx = Arc::clone(self);
        spawn_upgraded_relay(
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

/// Relays an upgraded connection (both sides' `OnUpgrade`, completed within
/// [`UPGRADE_WAIT`]) both ways until either side closes, no byte moves for
/// `idle`, or `closed` completes (the connection's verdict changed).
pub(super) fn spawn_upgraded_relay(
    down: OnUpgrade,
    up: OnUpgrade,
    activity: Arc<Activity>,
    idle: Duration,
    closed: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        let both = tokio::time::timeout(UPGRADE_WAIT, async { tokio::try_join!(down, up) });
        let Ok(Ok((down, up))) = both.await else {
            return;
        };
        let mut down = TokioIo::new(down);
        let mut up = TokioIo::new(up);
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
            () = closed => {}
            () = activity.idle_for(idle) => {}
        }
    });
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

/// Re-serialises a request for the upstream: origin-form target, HTTP/1.1,
/// hop-by-hop headers removed (a WebSocket upgrade keeps exactly
/// `Connection: upgrade` and its `Upgrade`), everything else (Host
/// included) as sent. hyper's client picks the framing from the body.
fn upstream_request(
    req: Request<Incoming>,
    upgrade: bool,
) -> Result<Request<Incoming>, ProxyError> {
    let (parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let uri: Uri = target
        .parse()
        .map_err(|_| ProxyError::BadRequest("invalid_target"))?;
    let mut headers = parts.headers;
    let upgrade_value = headers.get(UPGRADE).cloned();
    strip_hop_by_hop(&mut headers);
    if upgrade {
        if let Some(v) = upgrade_value {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(UPGRADE, v);
        }
    }
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;
    Ok(out)
}

/// hyper's HTTP/1.1 server as the sandbox's connections get it: the head
/// read timeout, the header count and size limits, keep-alive.
pub(super) fn h1_server(cfg: &ProxyConfig) -> hyper::server::conn::http1::Builder {
    keep_timers_near();
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(cfg.http_header_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    // hyper's own limit is 100 headers, parsed into stack arrays; any
    // explicit limit (even 100) makes it fill heap-sized arrays for every
    // request head, measured at ~2% of an intercepted request's CPU.
    if cfg.max_request_headers != HYPER_MAX_HEADERS {
        b.max_headers(cfg.max_request_headers);
    }
    b
}

/// How far ahead the runtime's timer driver always has a timer to fire.
const TIMER_TICK: Duration = Duration::from_secs(1);

/// Keeps a timer firing every [`TIMER_TICK`] on this thread's runtime (one
/// task per worker thread that serves HTTP/1.1, started on its first
/// connection). hyper arms the head read timeout (seconds) anew for each
/// request head; tokio wakes a time driver parked in `epoll_wait` (an
/// `eventfd` write and a context switch) whenever a new timer is due before
/// its next wake, which with no other timer pending is every time: measured
/// on a quarter of intercepted keep-alive requests. With a tick never more
/// than a second away, a head timeout never is.
fn keep_timers_near() {
    thread_local! {
        static TICKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if TICKING.with(|t| t.replace(true)) {
        return;
    }
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
        }
    });
}

/// The header count hyper's HTTP/1.1 parser allows when not told otherwise.
const HYPER_MAX_HEADERS: usize = 100;

/// Removes hop-by-hop headers and those the `Connection` header nominates
/// (except Host and Content-Length).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them (and so no `Connection` naming
    // more): one pass over the names instead of a lookup per name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let nominated: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !NEVER_NOMINATED.contains(n))
        .collect();
    for n in nominated.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
}

/// An upstream response as the sandbox gets it: hop-by-hop headers
/// removed, body streamed.
fn relayed(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    Response::from_parts(parts, body.boxed())
}

/// The upstream's `101` as the sandbox gets it: its headers minus the
/// hop-by-hop ones, plus exactly `Connection: upgrade` and its `Upgrade`.
pub(super) fn switching_protocols(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, _body) = resp.into_parts();
    let upgrade = parts.headers.get(UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(v) = upgrade {
        parts.headers.insert(UPGRADE, v);
    }
    parts.version = Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    Response::from_parts(parts, respond::full(bytes::Bytes::new()))
}

// === impl TapIo ===

impl AsyncRead for TapIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let new = buf.filled().get(before..).unwrap_or_default();
        if !new.is_empty() {
            if let Err(reason) = this.scanner.feed(new) {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, reason)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TapIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names_are_recognised_by_their_text() {
        for n in HOP_BY_HOP.iter() {
            assert!(is_hop_by_hop(n), "{n}");
        }
        for n in [
            "host",
            "content-length",
            "authorization",
            "x-connection",
            "tee",
            "upgrades",
            "keep",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(n)), "{n}");
        }
    }

    #[test]
    fn stripping_leaves_end_to_end_headers_and_takes_nominated_ones() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("a.test"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before, "nothing hop-by-hop: unchanged");
        h.insert(
            "connection",
            HeaderValue::from_static("x-trace, content-length, host"),
        );
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("content-length", HeaderValue::from_static("0"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "content-length", "host"]);
    }
}
