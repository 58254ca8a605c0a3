//! Recording origins for the TLS-interception tests: an HTTPS (and optional
//! cleartext HTTP) server for a set of names that speaks HTTP/1.1 and HTTP/2
//! (ALPN `h2`, `http/1.1`), records every request it receives (method,
//! target, version, every header occurrence, body sha256 + length, request
//! trailers) and counts, per connection, the bytes it received before and
//! after the TLS handshake — so a test can assert that an upstream with a
//! bad certificate received no request byte.
//!
//! Endpoints (any method):
//!
//! | path | answer |
//! |---|---|
//! | `/echo` | 200; every request header comes back as `x-echo-<name>` (every occurrence, in order), the body is a JSON summary of the request |
//! | `/echo-split` | 200; the request's `Authorization` value in the body, split over two chunks sent 100 ms apart |
//! | `/big` | 200, [`BIG`] deterministic bytes ([`big_byte`], sha256 [`big_sha256`]) |
//! | `/upload` | reads the body as a stream; 200 `{"sha256": "<hex>", "len": N}` |
//! | `/redirect?to=URL` | 302, `Location: URL` (percent-decoded) |
//! | `/status/NNN` | that status, empty body |
//! | `/ws` | a WebSocket echo (HTTP/1.1 upgrade, RFC 6455): text, binary and continuation frames come back as sent, ping → pong, close → close |
//! | [`GRPC_UNARY`] | gRPC over h2: echoes the one request message, trailers `grpc-status: 0` |
//! | [`GRPC_STREAM`] | gRPC over h2, bidirectional: echoes each message as soon as it has arrived, then `grpc-status: 0` |
//! | anything else | 200 `hello from <first name>` |
//!
//! Every response carries `x-origin: <first name>` and `x-origin-conn: <id>`
//! (the [`ConnRecord::id`] it was served on). gRPC responses also echo the
//! request headers as `x-echo-<name>` (initial metadata).
//!
//! Certificates come from the lab's [`TestCa`], or are deliberately bad
//! ([`CertKind`]) for the "upstream verification fails → 502, nothing sent"
//! tests.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::lab::{in_netns, Lab};
use crate::privileged::wait_until;
pub use crate::upstream::{big_byte, TestCa, BIG};

/// Path of the unary gRPC echo method.
pub const GRPC_UNARY: &str = "/grpc.test.Echo/Unary";
/// Path of the bidirectional-streaming gRPC echo method.
pub const GRPC_STREAM: &str = "/grpc.test.Echo/Stream";
/// Prefix of the response headers `/echo` (and gRPC) echo request headers as.
pub const ECHO_PREFIX: &str = "x-echo-";

/// The certificate an origin presents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertKind {
    /// From the test CA, valid now, for every name of the origin.
    Valid,
    /// From the test CA for every name, but expired (valid 2020-01-01 to
    /// 2021-01-01).
    Expired,
    /// From the test CA and valid now, but for this other name only.
    WrongHost(String),
    /// Self-signed for every name (not issued by the test CA).
    SelfSigned,
}

/// What to start: names, address, ports, certificate, ALPN.
#[derive(Clone, Debug)]
pub struct OriginSpec {
    /// Names of the certificate (SANs); the first is the origin's name.
    pub names: Vec<String>,
    /// Address to listen on (must be local in the namespace it runs in,
    /// see [`Lab::add_upstream_addr`]).
    pub addr: IpAddr,
    /// TLS ports (default `[443]`; 0 picks a free port).
    pub tls_ports: Vec<u16>,
    /// Cleartext HTTP ports, h1 and h2 prior knowledge (default none).
    pub http_ports: Vec<u16>,
    /// Certificate (default [`CertKind::Valid`]).
    pub cert: CertKind,
    /// ALPN protocols offered, in preference order (default `h2`,
    /// `http/1.1`). Empty: no ALPN (the client speaks HTTP/1.1).
    pub alpn: Vec<Vec<u8>>,
}

impl OriginSpec {
    /// A valid-certificate origin for `names` on `addr`:443, h2 + http/1.1.
    pub fn new(names: &[&str], addr: IpAddr) -> Self {
        assert!(!names.is_empty(), "an origin needs at least one name");
        Self {
            names: names.iter().map(|n| n.to_string()).collect(),
            addr,
            tls_ports: vec![443],
            http_ports: Vec::new(),
            cert: CertKind::Valid,
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }

    /// With this certificate.
    pub fn cert(mut self, cert: CertKind) -> Self {
        self.cert = cert;
        self
    }

    /// On these TLS ports.
    pub fn tls_ports(mut self, ports: &[u16]) -> Self {
        self.tls_ports = ports.to_vec();
        self
    }

    /// Also cleartext HTTP on these ports.
    pub fn http_ports(mut self, ports: &[u16]) -> Self {
        self.http_ports = ports.to_vec();
        self
    }

    /// Offering these ALPN protocols (e.g. `&["http/1.1"]` for an h1-only
    /// origin).
    pub fn alpn(mut self, protocols: &[&str]) -> Self {
        self.alpn = protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
        self
    }
}

/// One request as the origin received it.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// Order of arrival (of the request head) at this origin, from 0.
    pub seq: u64,
    /// The connection it came on ([`ConnRecord::id`]).
    pub conn: u64,
    /// Over TLS.
    pub tls: bool,
    /// SNI of that connection.
    pub sni: Option<String>,
    /// ALPN protocol of that connection.
    pub alpn: Option<String>,
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query as received.
    pub target: String,
    /// Path only.
    pub path: String,
    /// HTTP version.
    pub version: Version,
    /// `:authority` (h2) or `Host` (h1).
    pub authority: Option<String>,
    /// Every header occurrence: names lower-case, in order of each name's
    /// first appearance, every value of a name in the order received (hyper
    /// groups the values of a name together). Values lossily as UTF-8.
    pub headers: Vec<(String, String)>,
    /// Request body length.
    pub body_len: u64,
    /// sha256 of the request body.
    pub body_sha256: [u8; 32],
    /// Request trailers (h2, or chunked h1), like `headers`.
    pub trailers: Vec<(String, String)>,
    /// Reading the body failed (e.g. the client reset the stream).
    pub body_error: Option<String>,
}

impl RequestRecord {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        crate::http_client::values_of(&self.headers, name)
    }

    /// First value of trailer `name` (case-insensitive).
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Does any header or trailer value contain `needle`?
    pub fn mentions(&self, needle: &str) -> bool {
        self.headers
            .iter()
            .chain(self.trailers.iter())
            .any(|(_, v)| v.contains(needle))
    }

    /// The body's sha256 as lower-case hex.
    pub fn body_sha256_hex(&self) -> String {
        hex(&self.body_sha256)
    }
}

/// State of a connection's TLS handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// Still in progress.
    Pending,
    /// Completed.
    Done,
    /// Failed (the client rejected the certificate, went away, ...).
    Failed(String),
    /// A cleartext connection (no TLS).
    Plain,
}

/// One accepted connection.
#[derive(Clone, Debug)]
pub struct ConnRecord {
    /// Id, from 1 in accept order (also in `x-origin-conn`).
    pub id: u64,
    /// Client address.
    pub peer: SocketAddr,
    /// Local address it was accepted on.
    pub local: SocketAddr,
    /// A TLS port.
    pub tls: bool,
    /// TLS handshake outcome.
    pub handshake: Handshake,
    /// SNI sent by the client.
    pub sni: Option<String>,
    /// ALPN protocol negotiated.
    pub alpn: Option<String>,
    /// Raw TCP bytes received (handshake included).
    pub raw_in: u64,
    /// Raw TCP bytes received after the handshake completed (0 when it
    /// never did). Bytes that arrived together with the client's Finished
    /// count as handshake bytes; alerts (close_notify) after it count here.
    pub raw_in_after_handshake: u64,
    /// Application bytes received: decrypted application data over TLS,
    /// every byte on a cleartext port. 0 means the origin received no
    /// request byte — the measure for "nothing was sent upstream" (a client
    /// that checks the name after the handshake, as curl with OpenSSL does,
    /// completes it and then hangs up with 0 here).
    pub plain_in: u64,
    /// Requests (heads) received on it.
    pub requests: usize,
}

#[derive(Default)]
struct ConnMeta {
    handshake: Option<Handshake>,
    sni: Option<String>,
    alpn: Option<String>,
}

struct ConnState {
    id: u64,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
    raw_in: AtomicU64,
    raw_at_handshake: AtomicU64,
    plain_in: AtomicU64,
    requests: AtomicUsize,
    meta: Mutex<ConnMeta>,
}

impl ConnState {
    fn record(&self) -> ConnRecord {
        let meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let raw_in = self.raw_in.load(Ordering::SeqCst);
        let at = self.raw_at_handshake.load(Ordering::SeqCst);
        ConnRecord {
            id: self.id,
            peer: self.peer,
            local: self.local,
            tls: self.tls,
            handshake: meta.handshake.clone().unwrap_or(if self.tls {
                Handshake::Pending
            } else {
                Handshake::Plain
            }),
            sni: meta.sni.clone(),
            alpn: meta.alpn.clone(),
            raw_in,
            raw_in_after_handshake: if at == u64::MAX {
                0
            } else {
                raw_in.saturating_sub(at)
            },
            plain_in: self.plain_in.load(Ordering::SeqCst),
            requests: self.requests.load(Ordering::SeqCst),
        }
    }
}

#[derive(Default)]
struct OriginLog {
    conns: Mutex<Vec<Arc<ConnState>>>,
    requests: Mutex<Vec<RequestRecord>>,
    next_conn: AtomicU64,
    next_seq: AtomicU64,
    ws_messages: AtomicU64,
}

impl OriginLog {
    fn push(&self, r: RequestRecord) {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(r);
    }
}

struct Ctx {
    name: String,
    log: OriginLog,
}

/// A running recording origin; stopped (listeners closed, connections
/// dropped) when dropped.
pub struct Origin {
    /// Names of its certificate (the first is its name).
    pub names: Vec<String>,
    /// Its address.
    pub addr: IpAddr,
    /// Its certificate kind.
    pub cert: CertKind,
    /// Its leaf certificate.
    pub leaf: CertificateDer<'static>,
    /// TLS listening addresses (ports resolved).
    pub tls_addrs: Vec<SocketAddr>,
    /// Cleartext HTTP listening addresses.
    pub http_addrs: Vec<SocketAddr>,
    ctx: Arc<Ctx>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Origin {
    /// Starts an origin in the lab's upstream namespace (`spec.addr` must be
    /// local there: [`Lab::add_upstream_addr`]).
    pub fn start(lab: &Lab, ca: &TestCa, spec: OriginSpec) -> Self {
        Self::start_in(&lab.up_ns, ca, spec)
    }

    /// Starts an origin with its listeners in network namespace `ns`.
    pub fn start_in(ns: &str, ca: &TestCa, spec: OriginSpec) -> Self {
        let (chain, key) = certificate(ca, &spec.names, &spec.cert);
        let leaf = chain[0].clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("origin certificate");
        config.alpn_protocols = spec.alpn.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let mut wanted: Vec<(SocketAddr, bool)> = Vec::new();
        for p in &spec.tls_ports {
            wanted.push((SocketAddr::new(spec.addr, *p), true));
        }
        for p in &spec.http_ports {
            wanted.push((SocketAddr::new(spec.addr, *p), false));
        }
        let listeners = in_netns(ns, move || {
            wanted
                .into_iter()
                .map(|(a, tls)| (bind(a), tls))
                .collect::<Vec<_>>()
        });
        let mut tls_addrs = Vec::new();
        let mut http_addrs = Vec::new();
        for (l, tls) in &listeners {
            let a = l.local_addr().expect("listener address");
            if *tls {
                tls_addrs.push(a);
            } else {
                http_addrs.push(a);
            }
        }

        let ctx = Arc::new(Ctx {
            name: spec.names[0].clone(),
            log: OriginLog::default(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let c = ctx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("origin-{}", spec.names[0]))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("origin runtime");
                rt.block_on(async move {
                    for (l, tls) in listeners {
                        let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
                        let tls = tls.then(|| acceptor.clone());
                        tokio::spawn(accept_loop(l, tls, c.clone()));
                    }
                    let _ = stopped.await;
                });
                // Dropping the runtime cancels every task: listeners and
                // connections close.
                drop(rt);
            })
            .expect("origin thread");
        Self {
            names: spec.names,
            addr: spec.addr,
            cert: spec.cert,
            leaf,
            tls_addrs,
            http_addrs,
            ctx,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The origin's name (first certificate name).
    pub fn name(&self) -> &str {
        &self.names[0]
    }

    /// The first TLS listening address.
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls_addrs[0]
    }

    /// Every request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<RequestRecord> {
        let mut v = self
            .ctx
            .log
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        v.sort_by_key(|r| r.seq);
        v
    }

    /// Requests received for `path`.
    pub fn requests_to(&self, path: &str) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Waits up to `timeout` until at least `n` requests were recorded and
    /// returns them.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<RequestRecord> {
        wait_until(timeout, || self.requests().len() >= n);
        self.requests()
    }

    /// Every connection accepted so far, in accept order.
    pub fn connections(&self) -> Vec<ConnRecord> {
        self.ctx
            .log
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.record())
            .collect()
    }

    /// Connections accepted so far.
    pub fn connection_count(&self) -> usize {
        self.ctx
            .log
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Waits up to `timeout` until at least `n` connections were accepted
    /// and none is still in its TLS handshake; returns them.
    pub fn wait_connections_settled(&self, n: usize, timeout: Duration) -> Vec<ConnRecord> {
        wait_until(timeout, || {
            let c = self.connections();
            c.len() >= n && c.iter().all(|c| c.handshake != Handshake::Pending)
        });
        self.connections()
    }

    /// Application bytes received over all connections (decrypted bytes
    /// over TLS): 0 means no request byte ever arrived.
    pub fn request_bytes(&self) -> u64 {
        self.connections().iter().map(|c| c.plain_in).sum()
    }

    /// Raw bytes received after TLS handshakes completed, over all
    /// connections.
    pub fn raw_bytes_after_handshake(&self) -> u64 {
        self.connections()
            .iter()
            .map(|c| c.raw_in_after_handshake)
            .sum()
    }

    /// TLS handshakes that completed.
    pub fn handshakes_done(&self) -> usize {
        self.connections()
            .iter()
            .filter(|c| c.handshake == Handshake::Done)
            .count()
    }

    /// WebSocket data frames echoed so far.
    pub fn ws_frames(&self) -> u64 {
        self.ctx.log.ws_messages.load(Ordering::SeqCst)
    }

    /// Forgets every record (connections and requests).
    pub fn clear(&self) {
        self.ctx
            .log
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.ctx
            .log
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts three origins for `name` whose certificates a verifying client
/// must reject — expired, for another name, self-signed — on `addrs` (in
/// that order, each made local in the lab's upstream namespace first).
pub fn bad_cert_origins(lab: &Lab, ca: &TestCa, name: &str, addrs: [IpAddr; 3]) -> [Origin; 3] {
    let kinds = [
        CertKind::Expired,
        CertKind::WrongHost(format!("not-{name}")),
        CertKind::SelfSigned,
    ];
    std::array::from_fn(|i| {
        lab.add_upstream_addr(addrs[i]);
        Origin::start(
            lab,
            ca,
            OriginSpec::new(&[name], addrs[i]).cert(kinds[i].clone()),
        )
    })
}

fn bind(addr: SocketAddr) -> std::net::TcpListener {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    if addr.is_ipv6() {
        s.set_only_v6(true).expect("v6only");
    }
    s.set_reuse_address(true).expect("reuseaddr");
    s.bind(&addr.into())
        .unwrap_or_else(|e| panic!("bind origin {addr}: {e}"));
    s.listen(1024).expect("listen");
    s.set_nonblocking(true).expect("nonblocking");
    s.into()
}

fn certificate(
    ca: &TestCa,
    names: &[String],
    kind: &CertKind,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let sans = match kind {
        CertKind::WrongHost(other) => vec![other.clone()],
        _ => names.to_vec(),
    };
    let mut params = rcgen::CertificateParams::new(sans.clone()).expect("certificate names");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, sans[0].as_str());
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    match kind {
        CertKind::Valid | CertKind::WrongHost(_) => ca.sign(&params),
        CertKind::Expired => {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            ca.sign(&params)
        }
        CertKind::SelfSigned => {
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = params.self_signed(&key).expect("self-sign");
            (
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
        }
    }
}

// ---------------------------------------------------------------- plumbing

/// Counts the bytes read through it into its connection's raw or
/// application counter.
struct Counted<T> {
    inner: T,
    conn: Arc<ConnState>,
    raw: bool,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            let counter = if self.raw {
                &self.conn.raw_in
            } else {
                &self.conn.plain_in
            };
            counter.fetch_add(n, Ordering::SeqCst);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
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

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ctx: Arc<Ctx>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().unwrap_or(peer);
        let conn = Arc::new(ConnState {
            id: ctx.log.next_conn.fetch_add(1, Ordering::SeqCst) + 1,
            peer,
            local,
            tls: tls.is_some(),
            raw_in: AtomicU64::new(0),
            raw_at_handshake: AtomicU64::new(u64::MAX),
            plain_in: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
            meta: Mutex::default(),
        });
        ctx.log
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn.clone());
        tokio::spawn(serve_conn(tcp, tls.clone(), ctx.clone(), conn));
    }
}

async fn serve_conn(
    tcp: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ctx: Arc<Ctx>,
    conn: Arc<ConnState>,
) {
    let raw = Counted {
        inner: tcp,
        conn: conn.clone(),
        raw: true,
    };
    match tls {
        None => {
            let io = Counted {
                inner: raw,
                conn: conn.clone(),
                raw: false,
            };
            serve_http(io, ctx, conn).await;
        }
        Some(acceptor) => {
            let accepted =
                tokio::time::timeout(Duration::from_secs(30), acceptor.accept(raw)).await;
            let stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    set_handshake(&conn, Handshake::Failed(e.to_string()), None, None);
                    return;
                }
                Err(_) => {
                    set_handshake(&conn, Handshake::Failed("timeout".into()), None, None);
                    return;
                }
            };
            conn.raw_at_handshake
                .store(conn.raw_in.load(Ordering::SeqCst), Ordering::SeqCst);
            let (_, server) = stream.get_ref();
            let sni = server.server_name().map(str::to_owned);
            let alpn = server
                .alpn_protocol()
                .map(|a| String::from_utf8_lossy(a).into_owned());
            set_handshake(&conn, Handshake::Done, sni, alpn);
            let io = Counted {
                inner: stream,
                conn: conn.clone(),
                raw: false,
            };
            serve_http(io, ctx, conn).await;
        }
    }
}

fn set_handshake(conn: &ConnState, h: Handshake, sni: Option<String>, alpn: Option<String>) {
    let mut m = conn.meta.lock().unwrap_or_else(|p| p.into_inner());
    m.handshake = Some(h);
    m.sni = sni;
    m.alpn = alpn;
}

async fn serve_http<I>(io: I, ctx: Arc<Ctx>, conn: Arc<ConnState>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (ctx, conn) = (ctx.clone(), conn.clone());
        async move { Ok::<_, Infallible>(handle(req, ctx, conn).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .max_concurrent_streams(1000);
    let _ = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
}

type Body = BoxBody<Bytes, io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A response body fed through a channel (streams, trailers).
struct ChanBody(tokio::sync::mpsc::Receiver<Frame<Bytes>>);

impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// A known body handed out in chunks.
struct Chunks {
    data: Bytes,
    chunk: usize,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.data.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.chunk.min(self.data.len());
        let c = self.data.split_to(n);
        Poll::Ready(Some(Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.len() as u64)
    }
}

/// The `/big` body.
pub fn big_body() -> Bytes {
    static BODY: OnceLock<Bytes> = OnceLock::new();
    BODY.get_or_init(|| Bytes::from((0..BIG).map(big_byte).collect::<Vec<u8>>()))
        .clone()
}

/// sha256 of the `/big` body.
pub fn big_sha256() -> [u8; 32] {
    static SUM: OnceLock<[u8; 32]> = OnceLock::new();
    *SUM.get_or_init(|| Sha256::digest(big_body()).into())
}

/// sha256 of the `/big` body as lower-case hex.
pub fn big_sha256_hex() -> String {
    hex(&big_sha256())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn header_list(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn new_record(req: &Request<Incoming>, conn: &ConnState, seq: u64) -> RequestRecord {
    let meta = conn.meta.lock().unwrap_or_else(|p| p.into_inner());
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        });
    RequestRecord {
        seq,
        conn: conn.id,
        tls: conn.tls,
        sni: meta.sni.clone(),
        alpn: meta.alpn.clone(),
        method: req.method().as_str().to_owned(),
        target: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into()),
        path: req.uri().path().to_owned(),
        version: req.version(),
        authority,
        headers: header_list(req.headers()),
        body_len: 0,
        body_sha256: Sha256::digest(b"").into(),
        trailers: Vec::new(),
        body_error: None,
    }
}

/// Reads `body` to its end into `rec` (hash, length, trailers).
async fn read_body(mut body: Incoming, rec: &mut RequestRecord) {
    let mut h = Sha256::new();
    while let Some(f) = body.frame().await {
        match f {
            Ok(f) => match f.into_data() {
                Ok(d) => {
                    rec.body_len += d.len() as u64;
                    h.update(&d);
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        rec.trailers.extend(header_list(&t));
                    }
                }
            },
            Err(e) => {
                rec.body_error = Some(e.to_string());
                break;
            }
        }
    }
    rec.body_sha256 = h.finalize().into();
}

fn response(ctx: &Ctx, rec: &RequestRecord, status: StatusCode, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&ctx.name) {
        h.insert("x-origin", v);
    }
    h.insert("x-origin-conn", HeaderValue::from(rec.conn));
    r
}

fn echo_headers(into: &mut HeaderMap, from: &HeaderMap) {
    for (n, v) in from {
        if let Ok(name) = HeaderName::from_bytes(format!("{ECHO_PREFIX}{n}").as_bytes()) {
            into.append(name, v.clone());
        }
    }
}

async fn handle(req: Request<Incoming>, ctx: Arc<Ctx>, conn: Arc<ConnState>) -> Response<Body> {
    let seq = ctx.log.next_seq.fetch_add(1, Ordering::SeqCst);
    conn.requests.fetch_add(1, Ordering::SeqCst);
    let mut rec = new_record(&req, &conn, seq);
    let path = req.uri().path().to_owned();
    if path.starts_with("/grpc.test.Echo/") {
        return grpc(req, rec, ctx);
    }
    if path == "/ws" {
        return websocket(req, rec, ctx);
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let req_headers = req.headers().clone();
    read_body(req.into_body(), &mut rec).await;
    ctx.log.push(rec.clone());
    match path.as_str() {
        "/echo" => {
            let summary = serde_json::json!({
                "method": rec.method,
                "target": rec.target,
                "version": format!("{:?}", rec.version),
                "authority": rec.authority,
                "sni": rec.sni,
                "alpn": rec.alpn,
                "headers": rec.headers,
                "trailers": rec.trailers,
                "body_len": rec.body_len,
                "body_sha256": rec.body_sha256_hex(),
            });
            let mut r = response(&ctx, &rec, StatusCode::OK, full(summary.to_string()));
            echo_headers(r.headers_mut(), &req_headers);
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        "/echo-split" => {
            // The request's Authorization value comes back in the body split
            // over two chunks sent 100 ms apart.
            let auth = req_headers
                .get(http::header::AUTHORIZATION)
                .map(|v| Bytes::copy_from_slice(v.as_bytes()))
                .unwrap_or_default();
            let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(4);
            tokio::spawn(async move {
                let mid = auth.len() / 2;
                let mut first = b"reflected: ".to_vec();
                first.extend_from_slice(&auth[..mid]);
                let _ = tx.send(Frame::data(Bytes::from(first))).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut second = auth[mid..].to_vec();
                second.extend_from_slice(b" (end)\n");
                let _ = tx.send(Frame::data(Bytes::from(second))).await;
            });
            response(&ctx, &rec, StatusCode::OK, ChanBody(rx).boxed())
        }
        "/big" => {
            let mut r = response(
                &ctx,
                &rec,
                StatusCode::OK,
                Chunks {
                    data: big_body(),
                    chunk: 256 << 10,
                }
                .boxed(),
            );
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(BIG));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        "/upload" => {
            let body = serde_json::json!({"sha256": rec.body_sha256_hex(), "len": rec.body_len});
            let mut r = response(&ctx, &rec, StatusCode::OK, full(body.to_string()));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        "/redirect" => {
            let to = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("to="))
                .map(percent_decode)
                .and_then(|t| HeaderValue::from_bytes(&t).ok());
            match to {
                Some(loc) => {
                    let mut r = response(&ctx, &rec, StatusCode::FOUND, full(""));
                    r.headers_mut().insert(http::header::LOCATION, loc);
                    r
                }
                None => response(
                    &ctx,
                    &rec,
                    StatusCode::BAD_REQUEST,
                    full("missing ?to=URL\n"),
                ),
            }
        }
        p if p.starts_with("/status/") => {
            let code = p["/status/".len()..]
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            response(&ctx, &rec, code, full(""))
        }
        _ => {
            let body = format!("hello from {}\n", ctx.name);
            response(&ctx, &rec, StatusCode::OK, full(body))
        }
    }
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hexval = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hexval(b[i + 1]), hexval(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

// ---------------------------------------------------------------- gRPC

fn grpc_trailers(status: u32, message: &str, count: usize) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(status));
    if !message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(message) {
            t.insert("grpc-message", v);
        }
    }
    t.insert("x-message-count", HeaderValue::from(count));
    t
}

fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.freeze()
}

/// Takes one complete length-prefixed message off `buf`: (compressed, message).
fn take_grpc_message(buf: &mut BytesMut) -> Option<(bool, Bytes)> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    let compressed = buf[0] & 1 == 1;
    buf.advance(5);
    Some((compressed, buf.split_to(len).freeze()))
}

fn grpc(req: Request<Incoming>, mut rec: RequestRecord, ctx: Arc<Ctx>) -> Response<Body> {
    let method = rec.path["/grpc.test.Echo/".len()..].to_owned();
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"));
    let unary = match method.as_str() {
        "Unary" => true,
        "Stream" => false,
        _ => {
            ctx.log.push(rec.clone());
            let mut r = response(&ctx, &rec, StatusCode::OK, full(""));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            r.headers_mut()
                .extend(grpc_trailers(12, "unknown method", 0));
            return r;
        }
    };
    if !is_grpc {
        ctx.log.push(rec.clone());
        return response(
            &ctx,
            &rec,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            full("application/grpc expected\n"),
        );
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(64);
    let mut r = response(&ctx, &rec, StatusCode::OK, ChanBody(rx).boxed());
    echo_headers(r.headers_mut(), req.headers());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut buf = BytesMut::new();
        let mut received: Vec<Bytes> = Vec::new();
        let mut count = 0usize;
        let mut failure: Option<(u32, String)> = None;
        while let Some(f) = body.frame().await {
            let f = match f {
                Ok(f) => f,
                Err(e) => {
                    rec.body_error = Some(e.to_string());
                    failure = Some((13, "request stream failed".into()));
                    break;
                }
            };
            let f = match f.into_data() {
                Ok(d) => d,
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        rec.trailers.extend(header_list(&t));
                    }
                    continue;
                }
            };
            rec.body_len += f.len() as u64;
            h.update(&f);
            buf.extend_from_slice(&f);
            while let Some((compressed, m)) = take_grpc_message(&mut buf) {
                count += 1;
                if compressed {
                    failure.get_or_insert((12, "compression is not supported".into()));
                    continue;
                }
                if unary {
                    received.push(m);
                } else if tx.send(Frame::data(grpc_frame(&m))).await.is_err() {
                    return;
                }
            }
        }
        rec.body_sha256 = h.finalize().into();
        ctx.log.push(rec);
        if failure.is_none() && !buf.is_empty() {
            failure = Some((13, "truncated message".into()));
        }
        if failure.is_none() && unary {
            if received.len() == 1 {
                let _ = tx.send(Frame::data(grpc_frame(&received[0]))).await;
            } else {
                failure = Some((13, format!("{} messages for a unary call", received.len())));
            }
        }
        let (status, message) = failure.unwrap_or((0, String::new()));
        let _ = tx
            .send(Frame::trailers(grpc_trailers(status, &message, count)))
            .await;
    });
    r
}

// ---------------------------------------------------------------- WebSocket

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn websocket_accept(key: &str) -> String {
    let mut input = key.trim().as_bytes().to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64(digest.as_ref())
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (k, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if k <= group.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn has_token(h: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn websocket(mut req: Request<Incoming>, rec: RequestRecord, ctx: Arc<Ctx>) -> Response<Body> {
    ctx.log.push(rec.clone());
    let h = req.headers();
    let key = h
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let ok = req.version() == Version::HTTP_11
        && has_token(h, http::header::UPGRADE, "websocket")
        && has_token(h, http::header::CONNECTION, "upgrade")
        && h.get("sec-websocket-version")
            .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = key.filter(|_| ok) else {
        return response(
            &ctx,
            &rec,
            StatusCode::BAD_REQUEST,
            full("a WebSocket upgrade (HTTP/1.1, version 13) expected\n"),
        );
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let c = ctx.clone();
    tokio::spawn(async move {
        if let Ok(up) = upgrade.await {
            let _ = ws_echo(TokioIo::new(up), &c).await;
        }
    });
    let mut r = response(&ctx, &rec, StatusCode::SWITCHING_PROTOCOLS, full(""));
    let h = r.headers_mut();
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = HeaderValue::from_str(&websocket_accept(&key)) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

/// Largest frame payload accepted.
const WS_MAX: u64 = 64 << 20;

async fn ws_write<W: AsyncWrite + Unpin>(w: &mut W, b0: u8, payload: &[u8]) -> io::Result<()> {
    let mut head = vec![b0];
    match payload.len() {
        n if n < 126 => head.push(n as u8),
        n if n <= 0xffff => {
            head.push(126);
            head.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            head.push(127);
            head.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// Echoes frames until the client closes (or breaks the protocol).
async fn ws_echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, ctx: &Ctx) -> io::Result<()> {
    loop {
        let mut hdr = [0u8; 2];
        s.read_exact(&mut hdr).await?;
        let (b0, b1) = (hdr[0], hdr[1]);
        let opcode = b0 & 0x0f;
        let mut len = u64::from(b1 & 0x7f);
        if len == 126 {
            len = u64::from(s.read_u16().await?);
        } else if len == 127 {
            len = s.read_u64().await?;
        }
        if b1 & 0x80 == 0 || b0 & 0x70 != 0 || len > WS_MAX {
            // Unmasked client frame, reserved bits, or too large: 1002.
            let _ = ws_write(&mut s, 0x88, &1002u16.to_be_bytes()).await;
            return Ok(());
        }
        let mut mask = [0u8; 4];
        s.read_exact(&mut mask).await?;
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        match opcode {
            0x0..=0x2 => {
                ctx.log.ws_messages.fetch_add(1, Ordering::SeqCst);
                ws_write(&mut s, b0, &payload).await?;
            }
            0x8 => {
                ws_write(&mut s, 0x88, &payload[..payload.len().min(125)]).await?;
                let _ = s.shutdown().await;
                return Ok(());
            }
            0x9 => ws_write(&mut s, 0x8a, &payload).await?,
            0xa => {}
            _ => {
                let _ = ws_write(&mut s, 0x88, &1002u16.to_be_bytes()).await;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_matches_rfc_6455_example() {
        assert_eq!(
            websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("https%3A%2F%2Fa.test%2Fx%3Fy%3D1"),
            b"https://a.test/x?y=1"
        );
        assert_eq!(percent_decode("100%"), b"100%");
        assert_eq!(percent_decode("%zz"), b"%zz");
    }

    #[test]
    fn grpc_messages_split_across_reads() {
        let mut buf = BytesMut::new();
        let f = grpc_frame(b"hello");
        buf.extend_from_slice(&f[..3]);
        assert!(take_grpc_message(&mut buf).is_none());
        buf.extend_from_slice(&f[3..]);
        buf.extend_from_slice(&grpc_frame(b"")[..]);
        assert_eq!(
            take_grpc_message(&mut buf),
            Some((false, Bytes::from_static(b"hello")))
        );
        assert_eq!(take_grpc_message(&mut buf), Some((false, Bytes::new())));
        assert!(buf.is_empty());
    }
}
