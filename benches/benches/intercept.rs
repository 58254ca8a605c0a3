//! Interception bench: HTTPS through the proxy's TLS interception of a
//! transform domain (strip one header, inject `Authorization`) against the
//! same client talking HTTPS to the origin directly, in the same run.
//!
//! One process, three tokio runtimes (two workers each), as in the tunnel
//! bench:
//!
//! * the **origin**: a real HTTP server over TLS (hyper-util's auto
//!   builder, HTTP/1.1 and HTTP/2 by ALPN; a leaf for [`NAME`] signed by a
//!   CA made here). `/small` answers [`SMALL`] bytes, `/bulk/<n>` answers
//!   `n` bytes; it counts the requests that arrive transformed (the
//!   injected `Authorization`, no [`STRIPPED`]) so every run is checked;
//! * the **proxy**: a [`SandboxProxy`] with [`Interception`] (a
//!   [`SandboxCa`] generated here, upstream trust = the origin's CA) and a
//!   custom policy whose only rule is a transform for [`NAME`]; on loopback
//!   its listener hands each socket to `handle_with_dst(conn, origin)` and
//!   the resolver maps [`NAME`] to 127.0.0.1, so a connection is peeked,
//!   decided, terminated with a minted leaf, and every request is rewritten
//!   and forwarded over the proxy's pooled, verified upstream connection
//!   (HTTP/2 when the origin offers it, as real APIs do);
//! * the **clients**: hyper client connections over tokio-rustls with SNI
//!   [`NAME`], session resumption off; direct = trusting the origin's CA,
//!   intercept = trusting the sandbox CA. Every request carries the
//!   sandbox's own `Authorization` and an `x-api-key`.
//!
//! Scenarios, direct and intercepted runs interleaved (the order rotates
//! every round), figures are medians over rounds:
//!
//! * keep-alive requests/s, HTTP/1.1 ([`H1_CONNS`] connections each sending
//!   requests one after another) and HTTP/2 ([`H2_CONNS`] connections ×
//!   [`H2_STREAMS`] concurrent streams), for a fixed duration per run;
//!   target ≥ 0.5× direct each;
//! * new TLS connections/s: connect, full handshake, one small HTTP/1.1
//!   request, close, by [`NEW_CONNS`] clients at once; target ≥ 0.4×
//!   (issue 5), also shown against 0.5× (issue 6);
//! * bulk: one response of 64 MiB (quick) / 256 MiB (full) over HTTP/1.1
//!   and HTTP/2; target ≥ 0.8×;
//! * CPU: the proxy's threads per 1,000 requests / connections against the
//!   origin's own threads for the same direct work (issue 6 (f): ≤ 1.5×),
//!   and the whole process's per 1,000 intercepted vs direct;
//! * micro (information): minting a leaf (`LeafCache::get` of a new name,
//!   `SandboxCa::mint`), a cached leaf (`LeafCache::get` of the same name),
//!   the strip + inject of a [`Rewrite`] on a 30-header request, and what a
//!   response costs when a value is injected: its body scrubber
//!   (`Rewrite::scrubber`, built per response) and the scan of its body.
//!
//! A run whose origin counts disagree with the client's (a request not
//! transformed, a stripped header left in) is reported and the bench exits
//! with status 1 after writing its report.
//!
//! Everything shares the same cores: an intercepted request costs a TLS
//! record decrypted and encrypted twice and an HTTP exchange parsed and
//! built twice more than a direct one, and that CPU is taken from the
//! clients' and the origin's share.
//!
//! To try it: `cargo bench -p tollgate-benches --bench intercept`
//! (`TOLLGATE_BENCH_QUICK=1` for a shorter run, `TOLLGATE_BENCH_ROUNDS=N`;
//! `-- <filter>` for one scenario, see [`filter`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, HOST, USER_AGENT};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tollgate_benches::rig::{
    client_config, interleaved, loadavg, loopback_listener, med, on, policy, runtime, BoxError,
    CpuMark, Events, Pki, Role, Sample, Tag, Threads,
};
use tollgate_benches::{
    median, percentile, print_summary, quick, rounds, write_report, Figure, Target,
};
use tollgate_proxy::intercept::{Interception, LeafCache, Rewrite, SandboxCa, UpstreamTrust};
use tollgate_proxy::policy::{Floor, Transform};
use tollgate_proxy::proxy::{ProxyConfig, ProxyEvents, SandboxProxy, StaticResolver};

/// The transform domain: the SNI and authority clients use.
const NAME: &str = "api.bench";
/// What the transform injects as `Authorization`.
const SECRET: &str = "Bearer sk-bench-0123456789abcdef0123456789abcdef";
/// The header the transform strips.
const STRIPPED: &str = "x-api-key";
/// Response body of a small request.
const SMALL: u64 = 128;
/// HTTP/1.1 keep-alive connections, each sending one request at a time.
const H1_CONNS: usize = 16;
/// HTTP/2 connections in the request-rate scenario.
const H2_CONNS: usize = 4;
/// Concurrent streams on each HTTP/2 connection.
const H2_STREAMS: usize = 32;
/// Concurrent clients in the new-connection scenario.
const NEW_CONNS: usize = 8;
/// Bytes per origin write in bulk responses.
const CHUNK: usize = 256 * 1024;
/// Bytes per push in the body-scrub micro figure (an HTTP/2 DATA frame).
const SCRUB_FRAME: usize = 16 * 1024;
/// Bound on one small exchange (connect, handshake, request, response).
const OP_BOUND: Duration = Duration::from_secs(10);
/// Bound on one bulk response.
const BULK_BOUND: Duration = Duration::from_secs(60);

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

const BENCH: &str = "intercept";

// === origin ===

/// What the origin received, to check every run.
#[derive(Default)]
struct Seen {
    requests: AtomicU64,
    /// With the injected `Authorization` and without [`STRIPPED`].
    transformed: AtomicU64,
    /// With the injected `Authorization` and still [`STRIPPED`].
    leaked: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    requests: u64,
    transformed: u64,
    leaked: u64,
}

impl Seen {
    fn counts(&self) -> Counts {
        Counts {
            requests: self.requests.load(Ordering::Relaxed),
            transformed: self.transformed.load(Ordering::Relaxed),
            leaked: self.leaked.load(Ordering::Relaxed),
        }
    }
}

impl Counts {
    fn since(self, before: Counts) -> Counts {
        Counts {
            requests: self.requests - before.requests,
            transformed: self.transformed - before.transformed,
            leaked: self.leaked - before.leaked,
        }
    }
}

/// A response body of `left` bytes sent as slices of one shared chunk.
struct Repeat {
    chunk: Bytes,
    left: u64,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(self.left).map_or(self.chunk.len(), |l| l.min(self.chunk.len()));
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// Counts the request and answers `/bulk/<n>` with `n` bytes, anything
/// else with [`SMALL`] bytes, with a few headers as an API would.
fn answer(req: &Request<Incoming>, seen: &Seen, chunk: &Bytes) -> Response<Repeat> {
    seen.requests.fetch_add(1, Ordering::Relaxed);
    let h = req.headers();
    if h.get(AUTHORIZATION).is_some_and(|v| v == SECRET) {
        if h.contains_key(STRIPPED) {
            seen.leaked.fetch_add(1, Ordering::Relaxed);
        } else {
            seen.transformed.fetch_add(1, Ordering::Relaxed);
        }
    }
    let len = req
        .uri()
        .path()
        .strip_prefix("/bulk/")
        .and_then(|n| n.parse().ok())
        .unwrap_or(SMALL);
    let mut resp = Response::new(Repeat {
        chunk: chunk.clone(),
        left: len,
    });
    let headers = resp.headers_mut();
    for (n, v) in [
        ("content-type", "application/octet-stream"),
        ("cache-control", "no-store"),
        ("x-request-id", "req_0123456789abcdef0123456789abcdef"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("x-ratelimit-remaining-tokens", "1999999"),
    ] {
        headers.insert(n, HeaderValue::from_static(v));
    }
    resp
}

/// The origin's TLS listener (HTTP/1.1 and HTTP/2 by ALPN) on 127.0.0.1,
/// served on the current runtime.
async fn origin(server: Arc<rustls::ServerConfig>, seen: Arc<Seen>) -> SocketAddr {
    let chunk = Bytes::from((0..CHUNK).map(|i| (i * 31 % 251) as u8).collect::<Vec<_>>());
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind origin");
    let addr = l.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (acceptor, seen, chunk) = (acceptor.clone(), Arc::clone(&seen), chunk.clone());
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let resp = answer(&req, &seen, &chunk);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

// === the bare proxy ===

/// A proxy that terminates TLS and HTTP and re-originates them, and does
/// nothing else: the origin's own certificate (no leaf minted), one
/// upstream connection per client connection in the client's protocol
/// (no pool), the request and the response passed through as hyper hands
/// them over (no policy, no header rewrite, no scrubbing). What any
/// terminating proxy built on hyper and rustls costs here, so interception
/// is measured against it as well as against direct. Served on the
/// current runtime (the proxy's).
async fn bare_proxy(
    server: Arc<rustls::ServerConfig>,
    upstream: HashMap<Http, Arc<rustls::ClientConfig>>,
    origin: SocketAddr,
) -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind bare proxy");
    let addr = l.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let upstream = Arc::new(upstream);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), Arc::clone(&upstream));
            tokio::spawn(async move {
                // An error ends the connection; a client whose exchange it
                // broke fails its run.
                let _ = bare_connection(s, acceptor, &upstream, origin).await;
            });
        }
    });
    addr
}

/// One client connection of [`bare_proxy`].
async fn bare_connection(
    s: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    upstream: &HashMap<Http, Arc<rustls::ClientConfig>>,
    origin: SocketAddr,
) -> Result<(), BoxError> {
    s.set_nodelay(true)?;
    let down = acceptor.accept(s).await?;
    let http = match down.get_ref().1.alpn_protocol() {
        Some(b"h2") => Http::H2,
        _ => Http::H1,
    };
    let up = TcpStream::connect(origin).await?;
    up.set_nodelay(true)?;
    let up = tokio_rustls::TlsConnector::from(Arc::clone(&upstream[&http]))
        .connect(ServerName::try_from(NAME)?, up)
        .await?;
    let (up, down) = (TokioIo::new(up), TokioIo::new(down));
    match http {
        Http::H1 => {
            let (send, conn) = hyper::client::conn::http1::handshake::<_, Incoming>(up).await?;
            tokio::spawn(conn);
            // One request at a time on an HTTP/1.1 connection.
            let send = Arc::new(tokio::sync::Mutex::new(send));
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let send = Arc::clone(&send);
                async move { send.lock().await.send_request(req).await }
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(down, svc)
                .await?;
        }
        Http::H2 => {
            let (send, conn) =
                hyper::client::conn::http2::handshake::<_, _, Incoming>(TokioExecutor::new(), up)
                    .await?;
            tokio::spawn(conn);
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let mut send = send.clone();
                async move { send.send_request(req).await }
            });
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(down, svc)
                .await?;
        }
    }
    Ok(())
}

// === clients ===

/// Which way the client goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Path {
    /// Client → origin.
    Direct,
    /// Client → proxy (terminates, rewrites) → origin.
    Intercept,
    /// Client → proxy (an allowed name without a transform: an opaque
    /// tunnel, the origin's own certificate) → origin.
    Tunnel,
    /// Client → [`bare_proxy`] (terminates and re-originates, nothing
    /// else) → origin.
    Bare,
}

impl Tag for Path {
    fn tag(&self) -> String {
        match self {
            Self::Direct => "direct",
            Self::Intercept => "intercept",
            Self::Tunnel => "tunnel",
            Self::Bare => "bare_proxy",
        }
        .into()
    }
}

/// The client's HTTP version (negotiated by ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Http {
    H1,
    H2,
}

impl Http {
    fn alpn(self) -> &'static [u8] {
        match self {
            Self::H1 => b"http/1.1",
            Self::H2 => b"h2",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::H1 => "h1",
            Self::H2 => "h2",
        }
    }

    /// The keep-alive load's shape, as figure names carry it.
    fn shape(self) -> String {
        match self {
            Self::H1 => format!("c{H1_CONNS}"),
            Self::H2 => format!("{H2_CONNS}x{H2_STREAMS}"),
        }
    }
}

/// One client connection.
enum Client {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Client {
    /// Connects to `to`, handshakes with SNI [`NAME`] (a full handshake:
    /// `cfg` does not resume) and starts `http`.
    async fn connect(
        to: SocketAddr,
        cfg: Arc<rustls::ClientConfig>,
        http: Http,
    ) -> Result<Self, BoxError> {
        let tcp = TcpStream::connect(to).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from(NAME)?, tcp)
            .await?;
        let alpn = tls.get_ref().1.alpn_protocol();
        if alpn != Some(http.alpn()) {
            return Err(format!("ALPN {alpn:?} instead of {}", http.tag()).into());
        }
        let io = TokioIo::new(tls);
        Ok(match http {
            Http::H1 => {
                let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(conn);
                Self::H1(send)
            }
            Http::H2 => {
                let (send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                Self::H2(send)
            }
        })
    }

    /// Another handle on the same HTTP/2 connection (another stream).
    fn share(&self) -> Option<Self> {
        match self {
            Self::H1(_) => None,
            Self::H2(s) => Some(Self::H2(s.clone())),
        }
    }

    /// GET `path` with the sandbox's own credentials; the body's length.
    async fn get(&mut self, path: &str) -> Result<u64, BoxError> {
        let b = match self {
            Self::H1(_) => Request::builder().uri(path).header(HOST, NAME),
            Self::H2(_) => Request::builder()
                .uri(format!("https://{NAME}{path}"))
                .version(Version::HTTP_2),
        };
        let req = b
            .header(USER_AGENT, "tollgate-bench/1")
            .header(ACCEPT, "application/json")
            .header(AUTHORIZATION, "Bearer sandbox-own-key")
            .header(STRIPPED, "sandbox-key")
            .body(Empty::new())?;
        let resp = match self {
            Self::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Self::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        if resp.status() != StatusCode::OK {
            return Err(format!(
                "status {} (reason {:?})",
                resp.status(),
                resp.headers().get("x-tollgate-reason")
            )
            .into());
        }
        let mut body = resp.into_body();
        let mut got = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                got += data.len() as u64;
            }
        }
        Ok(got)
    }
}

/// Small GETs one after another on `c` until `deadline`; how many.
async fn keep_asking(mut c: Client, deadline: Instant) -> Result<u64, BoxError> {
    let mut n = 0;
    while Instant::now() < deadline {
        let got = tokio::time::timeout(OP_BOUND, c.get("/small"))
            .await
            .map_err(|_| format!("a request took over {OP_BOUND:?}"))??;
        if got != SMALL {
            return Err(format!("received {got} of {SMALL} bytes").into());
        }
        n += 1;
    }
    Ok(n)
}

/// New connections, one small GET each, until `deadline`; how many.
async fn keep_connecting(
    to: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    deadline: Instant,
) -> Result<u64, BoxError> {
    let mut n = 0;
    while Instant::now() < deadline {
        let one = async {
            let mut c = Client::connect(to, Arc::clone(&cfg), Http::H1).await?;
            c.get("/small").await
        };
        let got = tokio::time::timeout(OP_BOUND, one)
            .await
            .map_err(|_| format!("an exchange took over {OP_BOUND:?}"))??;
        if got != SMALL {
            return Err(format!("received {got} of {SMALL} bytes").into());
        }
        n += 1;
    }
    Ok(n)
}

// === the rig ===

/// One measured run: `ops` (requests, connections or bytes) in the
/// sample's time, and the client's completed requests.
#[derive(Clone, Copy, Debug)]
struct Run {
    ops: u64,
    requests: u64,
    sample: Sample,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.sample.secs
    }

    /// CPU milliseconds per 1,000 ops of `cpu` seconds.
    fn per_1k(&self, cpu: f64) -> f64 {
        cpu / self.ops as f64 * 1e6
    }

    /// The progress line of a run: its rate of `op`s and where the CPU went
    /// per 1,000 of them, with `prec` decimals.
    fn progress(&self, op: &str, prec: usize) -> String {
        let s = &self.sample;
        format!(
            "{:.0} {op}/s (CPU ms/1k {op} client {:.prec$} origin {:.prec$} proxy {:.prec$} process {:.prec$})",
            self.rate(),
            self.per_1k(s.client_cpu),
            self.per_1k(s.origin_cpu),
            self.per_1k(s.proxy_cpu),
            self.per_1k(s.process_cpu)
        )
    }
}

/// What a client task needs to time itself once it is set up.
#[derive(Clone)]
struct Meter {
    threads: Threads,
    seen: Arc<Seen>,
}

/// An open measurement window.
struct Window {
    meter: Meter,
    mark: CpuMark,
    counts: Counts,
    start: Instant,
}

impl Meter {
    fn open(&self) -> Window {
        Window {
            meter: self.clone(),
            mark: self.threads.mark(),
            counts: self.seen.counts(),
            start: Instant::now(),
        }
    }
}

impl Window {
    /// Closes the window: the run, and what the origin saw meanwhile.
    fn close(self, ops: u64, requests: u64) -> (Run, Counts) {
        let secs = self.start.elapsed().as_secs_f64();
        let sample = self.meter.threads.sample(&self.mark, secs);
        let seen = self.meter.seen.counts().since(self.counts);
        (
            Run {
                ops,
                requests,
                sample,
            },
            seen,
        )
    }
}

struct Rig {
    clients: Runtime,
    _origin_rt: Runtime,
    _proxy_rt: Runtime,
    meter: Meter,
    events: Arc<Events>,
    origin: SocketAddr,
    proxy: SocketAddr,
    /// A second sandbox proxy whose policy allows the name with no
    /// transform.
    tunnel: SocketAddr,
    /// [`bare_proxy`].
    bare: SocketAddr,
    tls: HashMap<(Path, Http), Arc<rustls::ClientConfig>>,
    interception: Arc<Interception>,
    /// Runs whose origin counts did not match (printed at the end).
    problems: Mutex<Vec<String>>,
}

impl Rig {
    fn new() -> Self {
        let threads = Threads::default();
        let events = Arc::new(Events::default());
        let seen = Arc::new(Seen::default());
        let clients = runtime(Role::Client, &threads, None);
        let origin_rt = runtime(Role::Origin, &threads, None);
        let proxy_rt = runtime(Role::Proxy, &threads, None);

        let pki = Pki::new("tollgate intercept bench origin CA", &[NAME]);
        let server = pki.server(&[b"h2", b"http/1.1"]);
        let origin_addr = on(&origin_rt, origin(server, Arc::clone(&seen)));

        let ca = Arc::new(SandboxCa::generate("bench").expect("sandbox CA"));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.clone()).expect("origin CA");
        let trust = UpstreamTrust::from_roots(roots).expect("upstream trust");
        let interception = Interception::new(Arc::clone(&ca), trust).expect("interception");
        let cfg = ProxyConfig {
            interception: Some(Arc::clone(&interception)),
            ..ProxyConfig::default()
        };
        // An EMPTY floor so the loopback origin may be dialled (benches
        // only); the only rule is the transform.
        let rules = serde_json::json!({
            "mode": "custom",
            "transforms": [{
                "domain": NAME,
                "inject_headers": { "Authorization": SECRET },
                "strip_headers": [STRIPPED],
            }],
        });
        let resolver =
            Arc::new(StaticResolver::new().with(NAME, [IpAddr::V4(Ipv4Addr::LOCALHOST)]));
        let proxy = SandboxProxy::new(
            "bench-intercept".into(),
            policy(rules, Floor::none_for_tests()),
            resolver as _,
            cfg,
            Arc::clone(&events) as Arc<dyn ProxyEvents>,
        );
        let proxy_addr = on(&proxy_rt, loopback_listener(proxy, origin_addr));
        let tunnel_proxy = SandboxProxy::new(
            "bench-tunnel".into(),
            policy(
                serde_json::json!({"mode": "custom", "allow_domains": [NAME]}),
                Floor::none_for_tests(),
            ),
            Arc::new(StaticResolver::new().with(NAME, [IpAddr::V4(Ipv4Addr::LOCALHOST)])) as _,
            ProxyConfig::default(),
            Arc::clone(&events) as Arc<dyn ProxyEvents>,
        );
        let tunnel_addr = on(&proxy_rt, loopback_listener(tunnel_proxy, origin_addr));
        let bare_upstream = [Http::H1, Http::H2]
            .into_iter()
            .map(|h| (h, client_config(&pki.ca, &[h.alpn()])))
            .collect();
        let bare_addr = on(
            &proxy_rt,
            bare_proxy(
                pki.server(&[b"h2", b"http/1.1"]),
                bare_upstream,
                origin_addr,
            ),
        );

        let mut tls = HashMap::new();
        for http in [Http::H1, Http::H2] {
            let alpn = [http.alpn()];
            tls.insert((Path::Direct, http), client_config(&pki.ca, &alpn));
            tls.insert((Path::Intercept, http), client_config(ca.cert_der(), &alpn));
            // The tunnel hands the origin's own certificate through: the
            // client verifies it against the origin's CA, which checks
            // that the bytes really came from the origin.
            tls.insert((Path::Tunnel, http), client_config(&pki.ca, &alpn));
            tls.insert((Path::Bare, http), client_config(&pki.ca, &alpn));
        }
        Self {
            clients,
            _origin_rt: origin_rt,
            _proxy_rt: proxy_rt,
            meter: Meter { threads, seen },
            events,
            origin: origin_addr,
            proxy: proxy_addr,
            tunnel: tunnel_addr,
            bare: bare_addr,
            tls,
            interception,
            problems: Mutex::default(),
        }
    }

    /// Where the client connects, and its TLS configuration.
    fn way(&self, path: Path, http: Http) -> (SocketAddr, Arc<rustls::ClientConfig>) {
        let to = match path {
            Path::Direct => self.origin,
            Path::Intercept => self.proxy,
            Path::Tunnel => self.tunnel,
            Path::Bare => self.bare,
        };
        (to, Arc::clone(&self.tls[&(path, http)]))
    }

    /// Runs `f` as a client task; checks what the origin saw.
    fn measure<F>(&self, path: Path, what: &str, f: F) -> Run
    where
        F: std::future::Future<Output = Result<(Run, Counts), BoxError>> + Send + 'static,
    {
        let res = self
            .clients
            .block_on(self.clients.spawn(f))
            .unwrap_or_else(|e| Err(e.into()));
        let (run, seen) = match res {
            Ok(r) => r,
            Err(e) => panic!("{what} {}: {e}; {}", path.tag(), self.events.describe()),
        };
        let transformed = match path {
            Path::Direct | Path::Tunnel | Path::Bare => 0,
            Path::Intercept => run.requests,
        };
        if seen.requests != run.requests || seen.transformed != transformed || seen.leaked != 0 {
            let p = format!(
                "{what} {}: {} requests completed, the origin saw {} ({} transformed, {} with {STRIPPED} left in)",
                path.tag(),
                run.requests,
                seen.requests,
                seen.transformed,
                seen.leaked
            );
            eprintln!("{BENCH}: CHECK FAILED: {p}");
            self.problems.lock().expect("problems").push(p);
        }
        run
    }

    /// Keep-alive small requests over `http` for `dur`.
    fn requests(&self, path: Path, http: Http, dur: Duration) -> Run {
        let (to, cfg) = self.way(path, http);
        let meter = self.meter.clone();
        self.measure(path, &format!("{} requests", http.tag()), async move {
            let (conns, streams) = match http {
                Http::H1 => (H1_CONNS, 1),
                Http::H2 => (H2_CONNS, H2_STREAMS),
            };
            // Set up outside the window: connected, one request answered.
            let mut clients = Vec::new();
            for _ in 0..conns {
                let mut c = Client::connect(to, Arc::clone(&cfg), http).await?;
                c.get("/small").await?;
                for _ in 1..streams {
                    clients.extend(c.share());
                }
                clients.push(c);
            }
            let window = meter.open();
            let deadline = Instant::now() + dur;
            let workers: Vec<_> = clients
                .into_iter()
                .map(|c| tokio::spawn(keep_asking(c, deadline)))
                .collect();
            let mut n = 0;
            for w in workers {
                n += w.await??;
            }
            Ok(window.close(n, n))
        })
    }

    /// Small requests on one keep-alive connection, paced at `rate` per
    /// second for `dur` (a request late by more than one interval starts at
    /// once); each request's latency in µs into `out`.
    fn latency(
        &self,
        path: Path,
        http: Http,
        rate: u32,
        dur: Duration,
        out: Arc<Mutex<Vec<f64>>>,
    ) -> Run {
        let (to, cfg) = self.way(path, http);
        let meter = self.meter.clone();
        self.measure(path, &format!("{} latency", http.tag()), async move {
            let mut c = Client::connect(to, cfg, http).await?;
            c.get("/small").await?;
            let window = meter.open();
            let interval = Duration::from_secs(1) / rate;
            let start = Instant::now();
            let mut next = start;
            let mut lat = Vec::new();
            while start.elapsed() < dur {
                tokio::time::sleep_until(next.into()).await;
                let t0 = Instant::now();
                let got = tokio::time::timeout(OP_BOUND, c.get("/small"))
                    .await
                    .map_err(|_| format!("a request took over {OP_BOUND:?}"))??;
                if got != SMALL {
                    return Err(format!("received {got} of {SMALL} bytes").into());
                }
                lat.push(t0.elapsed().as_secs_f64() * 1e6);
                next = (next + interval).max(Instant::now());
            }
            let n = lat.len() as u64;
            out.lock().expect("latencies").extend(lat);
            Ok(window.close(n, n))
        })
    }

    /// New connections (one small HTTP/1.1 request each) for `dur`.
    fn connections(&self, path: Path, dur: Duration) -> Run {
        let (to, cfg) = self.way(path, Http::H1);
        let meter = self.meter.clone();
        self.measure(path, "new connections", async move {
            let window = meter.open();
            let deadline = Instant::now() + dur;
            let workers: Vec<_> = (0..NEW_CONNS)
                .map(|_| tokio::spawn(keep_connecting(to, Arc::clone(&cfg), deadline)))
                .collect();
            let mut n = 0;
            for w in workers {
                n += w.await??;
            }
            Ok(window.close(n, n))
        })
    }

    /// One response of `bytes` over `http` (on a connection set up first).
    fn bulk(&self, path: Path, http: Http, bytes: u64) -> Run {
        let (to, cfg) = self.way(path, http);
        let meter = self.meter.clone();
        self.measure(path, &format!("{} bulk", http.tag()), async move {
            let mut c = Client::connect(to, cfg, http).await?;
            c.get("/small").await?;
            let window = meter.open();
            let got = tokio::time::timeout(BULK_BOUND, c.get(&format!("/bulk/{bytes}")))
                .await
                .map_err(|_| format!("no end of body within {BULK_BOUND:?}"))??;
            if got != bytes {
                return Err(format!("received {got} of {bytes} bytes").into());
            }
            Ok(window.close(bytes, 1))
        })
    }
}

// === scenarios ===

/// Request rate of the latency scenario (moderate: far below saturation).
const LATENCY_RATE: u32 = 500;

const PATHS: [Path; 2] = [Path::Direct, Path::Intercept];

/// [`PATHS`] and the bare proxy, where it is measured too.
const WITH_BARE: [Path; 3] = [Path::Direct, Path::Intercept, Path::Bare];

/// The bare proxy against direct (`direct_metric` of the direct runs,
/// named by `direct_note`), and interception against the bare proxy with
/// `target`: how far interception is from what terminating and
/// re-originating costs by itself here (keep-alive req/s ≥ 0.97×, proxy CPU
/// per 1k requests ≤ 1.05×, bulk ≥ 0.95×).
fn bare_figures(
    runs: &HashMap<Path, Vec<Run>>,
    what: &str,
    metric: impl Fn(&Run) -> f64 + Copy,
    (direct_metric, direct_note): (impl Fn(&Run) -> f64, &str),
    unit: &'static str,
    target: Target,
) -> [Figure; 2] {
    let (direct, icpt, bare) = (
        &runs[&Path::Direct],
        &runs[&Path::Intercept],
        &runs[&Path::Bare],
    );
    [
        Figure {
            name: format!("loopback_bare_proxy_{what}{direct_note}"),
            value: med(bare, metric),
            baseline: Some(med(direct, direct_metric)),
            unit,
            target: Target::Report,
        },
        Figure {
            name: format!("loopback_intercept_{what} (direct: bare proxy)"),
            value: med(icpt, metric),
            baseline: Some(med(bare, metric)),
            unit,
            target,
        },
    ]
}

fn request_figures(
    notes: &mut Vec<String>,
    rig: &Rig,
    http: Http,
    dur: Duration,
    rounds: usize,
) -> Vec<Figure> {
    let h = http.tag();
    let shape = http.shape();
    let label = format!("loopback {h} keep-alive requests {shape}");
    eprintln!(
        "{BENCH}: {label}: {}, {:.1} s per run, direct vs intercept ({rounds} rounds) ...",
        match http {
            Http::H1 => format!("{H1_CONNS} connections, one request at a time each"),
            Http::H2 => format!("{H2_CONNS} connections x {H2_STREAMS} concurrent streams"),
        },
        dur.as_secs_f64()
    );
    let runs = interleaved(
        BENCH,
        notes,
        rounds,
        &label,
        &WITH_BARE,
        |p| rig.requests(p, http, dur),
        Run::rate,
        |r| r.progress("req", 1),
    );
    let (direct, icpt) = (&runs[&Path::Direct], &runs[&Path::Intercept]);
    let what = format!("{h}_requests_per_s_{shape}");
    let bare_cpu = format!("{h}_proxy_cpu_per_1k_requests");
    let per_1k = |r: &Run| r.per_1k(r.sample.proxy_cpu);
    vec![Figure {
        name: format!("loopback_intercept_{what}"),
        value: med(icpt, Run::rate),
        baseline: Some(med(direct, Run::rate)),
        unit: "req/s",
        target: Target::MinRatio(0.5),
    }]
    .into_iter()
    .chain(cpu_figures(
        direct,
        icpt,
        &format!("loopback_intercept_{h}"),
        "requests",
        "CPU ms/1k req",
    ))
    .chain(bare_figures(
        &runs,
        &what,
        Run::rate,
        (Run::rate, ""),
        "req/s",
        Target::MinRatio(0.97),
    ))
    .chain(bare_figures(
        &runs,
        &bare_cpu,
        per_1k,
        (
            |r: &Run| r.per_1k(r.sample.origin_cpu),
            " (direct: origin's)",
        ),
        "CPU ms/1k req",
        Target::MaxRatio(1.05),
    ))
    .collect()
}

/// (f) The proxy's CPU per 1,000 ops against the origin's own for the same
/// direct work (target ≤ 1.5×), and the whole process's, intercept against
/// direct.
fn cpu_figures(
    direct: &[Run],
    icpt: &[Run],
    prefix: &str,
    ops: &str,
    unit: &'static str,
) -> [Figure; 2] {
    [
        Figure {
            name: format!("{prefix}_proxy_cpu_per_1k_{ops} (direct: origin's)"),
            value: med(icpt, |r| r.per_1k(r.sample.proxy_cpu)),
            baseline: Some(med(direct, |r| r.per_1k(r.sample.origin_cpu))),
            unit,
            target: Target::MaxRatio(1.5),
        },
        Figure {
            name: format!("{prefix}_process_cpu_per_1k_{ops} (lower is better)"),
            value: med(icpt, |r| r.per_1k(r.sample.process_cpu)),
            baseline: Some(med(direct, |r| r.per_1k(r.sample.process_cpu))),
            unit,
            target: Target::Report,
        },
    ]
}

/// (e) Added latency at a fixed moderate rate: p50 / p99 through
/// interception minus direct, samples pooled over interleaved rounds.
fn latency_figures(rig: &Rig, http: Http, dur: Duration, rounds: usize) -> Vec<Figure> {
    let h = http.tag();
    eprintln!(
        "{BENCH}: loopback {h} latency at {LATENCY_RATE} req/s, one connection, {:.1} s per run, direct vs intercept ({rounds} rounds) ...",
        dur.as_secs_f64()
    );
    let direct = Arc::new(Mutex::new(Vec::new()));
    let icpt = Arc::new(Mutex::new(Vec::new()));
    for round in 0..rounds {
        for p in PATHS {
            let out = match p {
                Path::Direct | Path::Tunnel | Path::Bare => Arc::clone(&direct),
                Path::Intercept => Arc::clone(&icpt),
            };
            let r = rig.latency(p, http, LATENCY_RATE, dur, out);
            eprintln!(
                "{BENCH}:   round {}/{rounds} {}: {} requests",
                round + 1,
                p.tag(),
                r.requests
            );
        }
    }
    let direct = direct.lock().expect("latencies").clone();
    let icpt = icpt.lock().expect("latencies").clone();
    let pct = |xs: &[f64], q: f64| percentile(xs.to_vec(), q) / 1000.0;
    let mut out = Vec::new();
    for (q, target) in [(50.0, Target::Report), (99.0, Target::MaxValue(1.0))] {
        let (a, b) = (pct(&icpt, q), pct(&direct, q));
        out.push(Figure {
            name: format!("loopback_intercept_{h}_latency_p{q}_at_{LATENCY_RATE}rps"),
            value: a,
            baseline: Some(b),
            unit: "ms",
            target: Target::Report,
        });
        out.push(Figure {
            name: format!("loopback_intercept_{h}_added_latency_p{q}_at_{LATENCY_RATE}rps"),
            value: a - b,
            baseline: None,
            unit: "ms",
            target,
        });
    }
    out
}

/// (d) Keep-alive requests/s through a tunnel (allowed name, no
/// transform) against direct.
fn tunnel_request_figures(
    notes: &mut Vec<String>,
    rig: &Rig,
    http: Http,
    dur: Duration,
    rounds: usize,
) -> Vec<Figure> {
    let h = http.tag();
    let shape = http.shape();
    let label = format!("loopback {h} keep-alive requests {shape} through a tunnel");
    eprintln!("{BENCH}: {label}: direct vs tunnel ({rounds} rounds) ...");
    let runs = interleaved(
        BENCH,
        notes,
        rounds,
        &label,
        &[Path::Direct, Path::Tunnel],
        |p| rig.requests(p, http, dur),
        Run::rate,
        |r| format!("{:.0} req/s", r.rate()),
    );
    let (direct, tunnel) = (&runs[&Path::Direct], &runs[&Path::Tunnel]);
    vec![Figure {
        name: format!("loopback_tunnel_{h}_requests_per_s_{shape}"),
        value: med(tunnel, Run::rate),
        baseline: Some(med(direct, Run::rate)),
        unit: "req/s",
        target: Target::MinRatio(0.9),
    }]
}

fn connection_figures(
    notes: &mut Vec<String>,
    rig: &Rig,
    dur: Duration,
    rounds: usize,
) -> Vec<Figure> {
    let label = format!("loopback new tls connections c{NEW_CONNS}");
    eprintln!(
        "{BENCH}: {label}: {NEW_CONNS} concurrent clients, full handshakes, one small h1 request each, {:.1} s per run, direct vs intercept ({rounds} rounds) ...",
        dur.as_secs_f64()
    );
    let runs = interleaved(
        BENCH,
        notes,
        rounds,
        &label,
        &PATHS,
        |p| rig.connections(p, dur),
        Run::rate,
        |r| r.progress("conn", 0),
    );
    let (direct, icpt) = (&runs[&Path::Direct], &runs[&Path::Intercept]);
    let name = format!("loopback_intercept_new_connections_per_s_c{NEW_CONNS}");
    let rate = |target| Figure {
        name: match target {
            Target::MinRatio(t) if t > 0.45 => format!("{name} (issue 6 target)"),
            _ => name.clone(),
        },
        value: med(icpt, Run::rate),
        baseline: Some(med(direct, Run::rate)),
        unit: "conn/s",
        target,
    };
    [rate(Target::MinRatio(0.4)), rate(Target::MinRatio(0.5))]
        .into_iter()
        .chain(cpu_figures(
            direct,
            icpt,
            "loopback_intercept",
            "connections",
            "CPU ms/1k conn",
        ))
        .collect()
}

fn bulk_figures(
    notes: &mut Vec<String>,
    rig: &Rig,
    http: Http,
    bytes: u64,
    rounds: usize,
) -> Vec<Figure> {
    let h = http.tag();
    let size = format!("{}MiB", bytes >> 20);
    let label = format!("loopback {h} bulk {size}");
    eprintln!(
        "{BENCH}: {label}: one response origin → client, direct vs intercept ({rounds} rounds) ..."
    );
    let gib = bytes as f64 / GIB;
    let mibps = |r: &Run| r.ops as f64 / MIB / r.sample.secs;
    let runs = interleaved(
        BENCH,
        notes,
        rounds,
        &label,
        &WITH_BARE,
        |p| rig.bulk(p, http, bytes),
        mibps,
        |r| {
            format!(
                "{:.0} MiB/s (CPU s/GiB client {:.2} origin {:.2} proxy {:.2} process {:.2})",
                mibps(r),
                r.sample.client_cpu / gib,
                r.sample.origin_cpu / gib,
                r.sample.proxy_cpu / gib,
                r.sample.process_cpu / gib
            )
        },
    );
    let (direct, icpt) = (&runs[&Path::Direct], &runs[&Path::Intercept]);
    let what = format!("{h}_bulk_throughput_{size}");
    let mut figures = vec![
        Figure {
            name: format!("loopback_intercept_{h}_bulk_throughput_{size}"),
            value: med(icpt, mibps),
            baseline: Some(med(direct, mibps)),
            unit: "MiB/s",
            target: Target::MinRatio(0.8),
        },
        Figure {
            name: format!("loopback_intercept_{h}_bulk_proxy_cpu_per_gib (direct: origin's)"),
            value: med(icpt, |r| r.sample.proxy_cpu / gib),
            baseline: Some(med(direct, |r| r.sample.origin_cpu / gib)),
            unit: "CPU s/GiB",
            target: Target::Report,
        },
        Figure {
            name: format!("loopback_intercept_{h}_bulk_process_cpu_per_gib (lower is better)"),
            value: med(icpt, |r| r.sample.process_cpu / gib),
            baseline: Some(med(direct, |r| r.sample.process_cpu / gib)),
            unit: "CPU s/GiB",
            target: Target::Report,
        },
    ];
    figures.extend(bare_figures(
        &runs,
        &what,
        mibps,
        (mibps, ""),
        "MiB/s",
        Target::MinRatio(0.95),
    ));
    figures
}

// === micro ===

/// The median over `batches` of the time per call of `f` (run `per_batch`
/// times a batch), in `scale` units per second (1e6: µs, 1e9: ns).
fn per_call(batches: usize, per_batch: usize, scale: f64, mut f: impl FnMut(usize)) -> f64 {
    let mut i = 0;
    let times = (0..batches)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_batch {
                f(i);
                i += 1;
            }
            start.elapsed().as_secs_f64() / per_batch as f64 * scale
        })
        .collect();
    median(times)
}

/// A request head of 30 fields as an SDK sends it, with the sandbox's own
/// `Authorization` and the header the transform strips.
fn thirty_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    let fields = [
        ("host", "api.bench"),
        ("user-agent", "OpenAI/Python 1.40.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-US,en;q=0.9"),
        ("content-type", "application/json"),
        ("content-length", "1234"),
        ("authorization", "Bearer sandbox-own-key"),
        (STRIPPED, "sandbox-key"),
        ("openai-organization", "org-0123456789"),
        ("openai-project", "proj_0123456789"),
        ("x-stainless-lang", "python"),
        ("x-stainless-package-version", "1.40.0"),
        ("x-stainless-os", "Linux"),
        ("x-stainless-arch", "x64"),
        ("x-stainless-runtime", "CPython"),
        ("x-stainless-runtime-version", "3.11.9"),
        ("x-stainless-async", "false"),
        ("x-stainless-retry-count", "0"),
        ("x-request-id", "req_0123456789abcdef"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("tracestate", "vendor=value"),
        ("baggage", "user=bench"),
        ("cache-control", "no-cache"),
        ("pragma", "no-cache"),
        ("origin", "https://app.bench"),
        ("referer", "https://app.bench/chat"),
        ("sec-fetch-mode", "cors"),
        ("idempotency-key", "3f1c1f2e-1b7a-4d0a-9d7e-5d1f0c6a9b11"),
        ("x-custom-feature", "beta"),
    ];
    for (n, v) in fields {
        h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
    }
    assert_eq!(h.len(), 30);
    h
}

fn micro_figures(notes: &mut Vec<String>, rig: &Rig) -> Vec<Figure> {
    let q = quick();
    eprintln!("{BENCH}: micro: leaf mint (cold, cached), strip + inject, body scrub ...");
    let ca = Arc::new(SandboxCa::generate("bench-micro").expect("sandbox CA"));
    // Room for every name: no eviction, every get of a new name mints.
    let cache = LeafCache::new(Arc::clone(&ca), 1 << 20);
    let (batches, per) = if q { (10, 20) } else { (20, 50) };
    per_call(1, 20, 1e6, |i| {
        black_box(cache.get(&format!("warm{i}.api.bench")).expect("mint"));
    });
    let cold = per_call(batches, per, 1e6, |i| {
        black_box(cache.get(&format!("n{i}.api.bench")).expect("mint"));
    });
    let mint = per_call(batches, per, 1e6, |i| {
        black_box(ca.mint(&format!("m{i}.api.bench")).expect("mint"));
    });
    cache.get(NAME).expect("mint");
    let cached = per_call(batches, 20_000, 1e6, |_| {
        black_box(cache.get(black_box(NAME)).expect("cached"));
    });
    // The proxy's own cache: one mint however many connections came.
    let mints = rig.interception.leaves().mints();

    let t = Transform {
        domain: NAME.into(),
        inject_headers: BTreeMap::from([("Authorization".to_string(), SECRET.to_string())]),
        strip_headers: vec![STRIPPED.into()],
    };
    let rw = Rewrite::new(&t).expect("rewrite");
    let template = thirty_headers();
    let (batches, per) = if q { (20, 1_000) } else { (50, 1_000) };
    let mut maps: Vec<HeaderMap> = Vec::with_capacity(per);
    let rewrite = median(
        (0..batches)
            .map(|_| {
                maps.clear();
                maps.extend((0..per).map(|_| template.clone()));
                let start = Instant::now();
                for m in &mut maps {
                    rw.apply(black_box(m));
                }
                start.elapsed().as_secs_f64() / per as f64 * 1e9
            })
            .collect(),
    );
    let mut check = template.clone();
    rw.apply(&mut check);
    assert!(check.get(STRIPPED).is_none() && check.get(AUTHORIZATION).is_some_and(|v| v == SECRET));

    // What every intercepted response costs when a value is injected: a
    // scrubber for its body (built per response), and the body's scan.
    let scrub_new = per_call(batches, 1_000, 1e6, |_| {
        black_box(rw.scrubber().expect("a scrubber"));
    });
    let frame: Vec<u8> = (0..SCRUB_FRAME).map(|i| (i * 31 % 251) as u8).collect();
    let frames = if q { 4096 } else { 16384 };
    let scrub_rate = median(
        (0..if q { 3 } else { 5 })
            .map(|_| {
                let mut scrub = rw.scrubber().expect("a scrubber");
                let start = Instant::now();
                for _ in 0..frames {
                    black_box(scrub.push(black_box(&frame)));
                }
                black_box(scrub.finish());
                (frames * SCRUB_FRAME) as f64 / MIB / start.elapsed().as_secs_f64()
            })
            .collect(),
    );
    notes.push(format!(
        "micro: medians of batches; the proxy minted {mints} leaf certificate(s) for all its connections; the body scan pushes {} KiB frames (an HTTP/2 upstream's DATA frames)",
        SCRUB_FRAME / 1024
    ));
    let info = |name: &str, value: f64, unit: &'static str| Figure {
        name: name.into(),
        value,
        baseline: None,
        unit,
        target: Target::Report,
    };
    vec![
        info(
            "leaf_mint_cold_leafcache_get (new name each time)",
            cold,
            "µs",
        ),
        info("leaf_mint_sandboxca_mint", mint, "µs"),
        info("leaf_cached_leafcache_get (same name)", cached, "µs"),
        info("rewrite_strip_inject_30_headers", rewrite, "ns"),
        info(
            "scrubber_new_per_response (Rewrite::scrubber)",
            scrub_new,
            "µs",
        ),
        info("scrub_response_body (Scrubber::push)", scrub_rate, "MiB/s"),
    ]
}

/// `cargo bench --bench intercept -- <filter>`: only the scenarios whose
/// name contains `<filter>` (`h1_requests`, `h2_requests`, `connections`,
/// `h1_bulk`, `h2_bulk`, `micro`), for profiling; no report is written.
fn filter() -> Option<String> {
    std::env::args().skip(1).find(|a| !a.starts_with('-'))
}

/// `TOLLGATE_BENCH_PROFILE=<path>:<h1|h2>` (path: `direct`, `intercept`,
/// `bare_proxy`, `tunnel`): keep-alive requests over that one path only, for
/// `TOLLGATE_BENCH_PROFILE_SECS` (default 10) seconds, so that a profiler
/// attached to the process (`perf record`, `perf stat`, `strace -c`) sees
/// one path's work alone. Prints the rate and where the CPU went; writes no
/// report.
fn profile(spec: &str) -> Result<(), String> {
    let (path, http) = spec
        .split_once(':')
        .ok_or_else(|| format!("TOLLGATE_BENCH_PROFILE={spec:?}: expected <path>:<h1|h2>"))?;
    let path = [Path::Direct, Path::Intercept, Path::Bare, Path::Tunnel]
        .into_iter()
        .find(|p| p.tag() == path)
        .ok_or_else(|| format!("unknown path {path:?} (direct, intercept, bare_proxy, tunnel)"))?;
    let http = [Http::H1, Http::H2]
        .into_iter()
        .find(|h| h.tag() == http)
        .ok_or_else(|| format!("unknown protocol {http:?} (h1, h2)"))?;
    let secs: f64 = match std::env::var("TOLLGATE_BENCH_PROFILE_SECS") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("TOLLGATE_BENCH_PROFILE_SECS={v:?}: not a number"))?,
        Err(_) => 10.0,
    };
    let rig = Rig::new();
    let warm = rig.requests(path, http, Duration::from_millis(500));
    eprintln!(
        "{BENCH}: profiling {} {} for {secs} s (pid {})",
        path.tag(),
        http.tag(),
        std::process::id()
    );
    let allocs = ALLOCS.load(Ordering::Relaxed);
    COUNT_ALLOCS.store(true, Ordering::Relaxed);
    let run = rig.requests(path, http, Duration::from_secs_f64(secs));
    COUNT_ALLOCS.store(false, Ordering::Relaxed);
    let allocs = ALLOCS.load(Ordering::Relaxed) - allocs;
    println!(
        "{BENCH}: profile {} {}: {} requests (after {} warming up), {}, {:.1} allocations per request (whole process)",
        path.tag(),
        http.tag(),
        run.requests,
        warm.requests,
        run.progress("req", 2),
        allocs as f64 / run.requests.max(1) as f64
    );
    let problems = rig.problems.lock().expect("problems").clone();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The system allocator, counting allocations while [`COUNT_ALLOCS`] is on
/// (the profile mode only: whole process, so the paths' difference is the
/// proxy's, the client and origin doing the same work on every path).
struct Counting;

static COUNT_ALLOCS: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on to the system allocator unchanged.
#[allow(unsafe_code)] // a global allocator is an unsafe trait; bench diagnostics only
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNT_ALLOCS.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNT_ALLOCS.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNT_ALLOCS.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    if let Ok(spec) = std::env::var("TOLLGATE_BENCH_PROFILE") {
        if let Err(e) = profile(&spec) {
            eprintln!("{BENCH}: {e}");
            std::process::exit(1);
        }
        return;
    }
    let started = Instant::now();
    let rounds = rounds(3, 5);
    let dur = if quick() {
        Duration::from_millis(1000)
    } else {
        Duration::from_millis(2000)
    };
    let bytes: u64 = if quick() { 64 << 20 } else { 256 << 20 };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load0 = loadavg();
    let only = filter();
    let run = |scenario: &str| only.as_ref().is_none_or(|f| scenario.contains(f.as_str()));
    eprintln!("{BENCH}: {cpus} CPUs, load average {load0}");
    let rig = Rig::new();
    // Warm-up: the leaf, the proxy's upstream connection, lazy allocations.
    let warm = Duration::from_millis(200);
    for p in PATHS {
        for http in [Http::H1, Http::H2] {
            if run(&format!("{}_requests", http.tag())) {
                rig.requests(p, http, warm);
            }
            if run(&format!("{}_bulk", http.tag())) {
                rig.bulk(p, http, 8 << 20);
            }
        }
        if run("connections") {
            rig.connections(p, warm);
        }
    }
    let mut notes = Vec::new();
    let mut figures = Vec::new();
    for http in [Http::H1, Http::H2] {
        if run(&format!("{}_requests", http.tag())) {
            figures.extend(request_figures(&mut notes, &rig, http, dur, rounds));
        }
    }
    for http in [Http::H1, Http::H2] {
        if run(&format!("{}_tunnel_requests", http.tag())) {
            figures.extend(tunnel_request_figures(&mut notes, &rig, http, dur, rounds));
        }
    }
    if run("connections") {
        figures.extend(connection_figures(&mut notes, &rig, dur, rounds));
    }
    for http in [Http::H1, Http::H2] {
        if run(&format!("{}_latency", http.tag())) {
            figures.extend(latency_figures(&rig, http, dur, rounds));
        }
    }
    for http in [Http::H1, Http::H2] {
        if run(&format!("{}_bulk", http.tag())) {
            figures.extend(bulk_figures(&mut notes, &rig, http, bytes, rounds));
        }
    }
    if run("micro") {
        figures.extend(micro_figures(&mut notes, &rig));
    }
    let problems = rig.problems.lock().expect("problems").clone();
    eprintln!("{BENCH}: done; {}", rig.events.describe());

    let title = "proxy TLS interception (transform: inject Authorization, strip x-api-key) vs direct HTTPS to the same origin (same run)";
    print_summary(title, &figures);
    let mut head = vec![
        format!("rounds: {rounds} (medians), direct and intercept interleaved"),
        format!(
            "requests: {:.1} s per run; h1: {H1_CONNS} keep-alive connections, one request at a time each; h2: {H2_CONNS} connections x {H2_STREAMS} streams; {SMALL}-byte responses",
            dur.as_secs_f64()
        ),
        format!(
            "new connections: {:.1} s per run, {NEW_CONNS} concurrent clients, full TLS 1.3 handshakes (no resumption), one h1 request each",
            dur.as_secs_f64()
        ),
        format!("bulk: one {} MiB response per run", bytes >> 20),
        "proxy upstream: pooled, verified connections in the client's protocol (HTTP/1.1 clients: HTTP/1.1; h2 clients: an h2 connection per client connection, its streams multiplexed)".to_string(),
        format!("latency: one keep-alive connection paced at {LATENCY_RATE} req/s; added = intercept - direct (issue 6 (e): p99 <= 1 ms)"),
        "CPU: (direct: origin's) figures compare the proxy's threads in intercepted runs with the origin's threads in direct runs (issue 6 (f): <= 1.5x)".to_string(),
        "loopback: client, proxy (handle_with_dst) and origin on 127.0.0.1 in one namespace; netns_ebpf: not measured here (see the tunnel bench)".to_string(),
        format!("CPUs: {cpus}; load average at start {load0}, at end {}", loadavg()),
        format!("wall time: {:.1} s", started.elapsed().as_secs_f64()),
    ];
    if problems.is_empty() {
        head.push("checks: every intercepted request reached the origin transformed, every direct one untouched".into());
    } else {
        for p in &problems {
            eprintln!("{BENCH}: CHECK FAILED: {p}");
            head.push(format!("CHECK FAILED: {p}"));
        }
    }
    head.extend(notes);
    match &only {
        None => write_report(BENCH, title, &figures, &head),
        Some(f) => eprintln!("{BENCH}: filter {f:?}: no report written"),
    }
    eprintln!("{BENCH}: done in {:.1} s", started.elapsed().as_secs_f64());
    if !problems.is_empty() {
        std::process::exit(1);
    }
}
