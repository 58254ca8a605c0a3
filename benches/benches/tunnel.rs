//! Tunnel path bench: the per-sandbox transparent proxy's tunnel against a
//! direct connection to the same origin, measured in the same run.
//!
//! One process, three tokio runtimes (two workers each):
//!
//! * the **origin**: a TLS server (tokio-rustls, a leaf for [`NAME`] signed by
//!   a CA made here with rcgen) and a plain TCP server. Each connection reads
//!   an 8-byte big-endian length, sends that many bytes and closes (TLS:
//!   `close_notify`, then FIN);
//! * the **proxy**: [`SandboxProxy`]s (one per copy mode) on their own
//!   runtime, so the CPU of its threads can be read apart from the
//!   endpoints'. The policy allows [`NAME`] and the resolver maps it to the
//!   origin, so a connection is peeked (ClientHello → SNI), decided,
//!   dialled BY NAME and relayed untouched, as in production;
//! * the **clients**: tokio-rustls with SNI [`NAME`] (a real ClientHello),
//!   session resumption off, so every new connection is a full handshake.
//!
//! Two topologies:
//!
//! * `loopback` (no privileges): everything on 127.0.0.1; the proxy's
//!   listener hands each socket to `handle_with_dst(conn, origin)` and its
//!   policy is compiled against an empty floor so loopback may be dialled;
//! * `netns_ebpf` (root; `TOLLGATE_BENCH_NETNS=0` skips it): the clients'
//!   runtime lives in a sandbox namespace, the proxy's in the router
//!   namespace behind the egress eBPF program, the origin's in a host
//!   namespace (the [`Pair`] of the eBPF bench). Direct = to the origin's
//!   address, which `allow_cidrs` passes; tunnel = to an address the
//!   program steers to the proxy's `IP_TRANSPARENT` listener, served by
//!   [`SandboxProxy::serve`] (original destination = local address) with
//!   the platform floor: the production path.
//!
//! Direct = client → origin; tunnel = client → proxy → origin. Runs of the
//! paths are interleaved (the order rotates every round) so background
//! noise hits all of them; figures are medians over rounds.
//!
//! Figures: bulk TLS throughput, one 1 GiB stream origin → client (target
//! ≥ 0.9× direct with the production copy mode; the other mode is measured
//! alongside); new TLS connections per second with [`CONCURRENCY`]
//! clients (target ≥ 0.7× direct); the proxy's CPU per GiB relayed and per
//! connection (its runtime's threads, `/proc/self/task/<tid>/schedstat`);
//! the whole process's CPU per GiB / per connection for tunnel and direct
//! (`CLOCK_PROCESS_CPUTIME_ID`), which also counts kernel work for the
//! proxy's sockets done on the endpoints' threads; and, on loopback, the
//! bulk figures for an opaque (non-TLS) TCP stream through an `allow-all`
//! proxy, for information.
//!
//! On loopback a **bare relay** ([`bare_relay`]: blocking threads, splice,
//! no peek, no policy, no runtime) is measured on the same bulk streams: what
//! any user-space relay costs here, since every relay adds a second TCP
//! connection whose kernel work runs on these same cores. The tunnel is
//! reported against it too (`(direct: bare relay)`).
//!
//! Everything shares the same cores: the throughput ratio is the share of
//! the machine the relay takes from both endpoints, not a ceiling of the
//! relay itself (that is about `1 / proxy CPU s/GiB` GiB/s per core).
//!
//! To try it: `cargo bench -p tollgate-benches --bench tunnel`
//! (`TOLLGATE_BENCH_QUICK=1` for a shorter run, `TOLLGATE_BENCH_ROUNDS=N`).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tollgate_benches::rig::{
    client_config, interleaved, loadavg, loopback_listener, med, on, policy, runtime, BoxError,
    Events, Pki, Role, Sample, Tag, Threads,
};
use tollgate_benches::{
    print_summary, quick, rounds, write_report, Figure, Pair, Pins, Target, GATEWAY, GUEST, SINK,
    STEERED_DST,
};
use tollgate_ebpf::{EgressPolicy, Filter, FloorSet, Mode, SandboxNet};
use tollgate_proxy::policy::Floor;
use tollgate_proxy::proxy::{ProxyConfig, ProxyEvents, SandboxProxy, StaticResolver};
use tollgate_proxy::tunnel::CopyMode;

/// The origin's name: the SNI clients send and the name the policy allows.
const NAME: &str = "origin.bench.tollgate.test";
/// Bytes per origin write and per client read.
const CHUNK: usize = 256 * 1024;
/// Reply size of one "new connection" exchange.
const SMALL_REPLY: u64 = 128;
/// Concurrent clients in the connection-rate scenario.
const CONCURRENCY: usize = 8;
/// Bound on one bulk transfer.
const BULK_BOUND: Duration = Duration::from_secs(60);
/// Bound on one small exchange (connect, handshake, request, reply).
const CONN_BOUND: Duration = Duration::from_secs(10);
/// Bound on one connection-rate round.
const ROUND_BOUND: Duration = Duration::from_secs(120);

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

// === TLS material ===

struct Tls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn tls() -> Tls {
    let pki = Pki::new("tollgate tunnel bench CA", &[NAME]);
    Tls {
        server: pki.server(&[]),
        client: client_config(&pki.ca, &[]),
    }
}

// === origin ===

/// Reads the 8-byte length, sends that many bytes, closes its side.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, chunk: &[u8]) -> io::Result<()> {
    let mut req = [0u8; 8];
    s.read_exact(&mut req).await?;
    let mut left = u64::from_be_bytes(req);
    while left > 0 {
        let n = usize::try_from(left).map_or(chunk.len(), |l| l.min(chunk.len()));
        s.write_all(chunk.get(..n).unwrap_or_default()).await?;
        left -= n as u64;
    }
    s.shutdown().await
}

/// The origin's TLS and plain TCP listeners on `ip`, served on the current
/// runtime.
async fn origin(server: Arc<rustls::ServerConfig>, ip: Ipv4Addr) -> (SocketAddr, SocketAddr) {
    let chunk: Arc<[u8]> = (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let tls_l = TcpListener::bind((ip, 0)).await.expect("bind origin tls");
    let tcp_l = TcpListener::bind((ip, 0)).await.expect("bind origin tcp");
    let addrs = (
        tls_l.local_addr().expect("addr"),
        tcp_l.local_addr().expect("addr"),
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let c = Arc::clone(&chunk);
    tokio::spawn(async move {
        while let Ok((s, _)) = tls_l.accept().await {
            let (acceptor, chunk) = (acceptor.clone(), Arc::clone(&c));
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = answer(&mut tls, &chunk).await;
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp_l.accept().await {
            let chunk = Arc::clone(&chunk);
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let _ = answer(&mut s, &chunk).await;
            });
        }
    });
    addrs
}

// === proxy ===

/// Netns: an `IP_TRANSPARENT` listener served by [`SandboxProxy::serve`]
/// (original destination = local address, as with eBPF steering); returns
/// a descriptor of it to register with the program.
async fn transparent_listener(proxy: Arc<SandboxProxy>) -> OwnedFd {
    let l = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind proxy");
    nix::sys::socket::setsockopt(&l, nix::sys::socket::sockopt::IpTransparent, &true)
        .expect("IP_TRANSPARENT");
    let fd = OwnedFd::from(l.try_clone().expect("dup listener"));
    l.set_nonblocking(true).expect("nonblocking");
    let l = TcpListener::from_std(l).expect("tokio listener");
    tokio::spawn(proxy.serve(l));
    fd
}

/// The kernel tunnel's program, loaded once (root); the kernel relay is
/// measured only where it loads.
fn kernel_tunnel() -> Option<Arc<dyn tollgate_proxy::tunnel::kernel::KernelTunnel>> {
    match tollgate::kernel_tunnel::EbpfTunnel::load() {
        Ok(kt) => Some(kt),
        Err(e) => panic!(
            "tunnel: the kernel tunnel's program does not load ({e}); run as root: sudo -E cargo bench -p tollgate-benches --bench tunnel"
        ),
    }
}

// === the bare relay ===

/// A relay with nothing but the moving of bytes: blocking threads, one per
/// direction, `splice(2)` through a 256 KiB pipe (as the proxy's), no peek,
/// no policy, no async runtime. It is what any user-space relay costs on
/// this machine (a second TCP connection and two splices per chunk), so
/// the proxy's tunnel is measured against it as well as against direct.
/// Its threads end with their connection, so its CPU is read as what the
/// process spent beyond the registered threads ([`Sample::proxy_cpu`] is
/// fixed up in [`Rig::bulk`]).
fn bare_relay(origin: SocketAddr) -> SocketAddr {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind bare relay");
    let addr = l.local_addr().expect("addr");
    serve_bare(l, origin);
    addr
}

/// Netns: the bare relay on an `IP_TRANSPARENT` listener in the calling
/// thread's (the router's) namespace, steered to by the program like the
/// proxy's; returns a descriptor of it to register.
fn bare_transparent_relay(origin: SocketAddr) -> OwnedFd {
    let l = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind bare relay");
    nix::sys::socket::setsockopt(&l, nix::sys::socket::sockopt::IpTransparent, &true)
        .expect("IP_TRANSPARENT");
    let fd = OwnedFd::from(l.try_clone().expect("dup listener"));
    serve_bare(l, origin);
    fd
}

/// The bare relay's accept loop on its own thread (which, like the
/// connection threads it starts, stays in the caller's namespace).
fn serve_bare(l: std::net::TcpListener, origin: SocketAddr) {
    std::thread::spawn(move || {
        for down in l.incoming() {
            let Ok(down) = down else { return };
            std::thread::spawn(move || {
                let Ok(up) = std::net::TcpStream::connect(origin) else {
                    return;
                };
                let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else {
                    return;
                };
                let outbound = std::thread::spawn(move || splice_to_end(&down2, &up2));
                let inbound = splice_to_end(&up, &down);
                let outbound = outbound.join();
                if let Err(e) = inbound {
                    eprintln!("tunnel: bare relay inbound: {e}");
                }
                if let Ok(Err(e)) = outbound {
                    eprintln!("tunnel: bare relay outbound: {e}");
                }
            });
        }
    });
}

/// Blocking `src` → pipe → `dst` until end-of-stream, then `SHUT_WR` on `dst`.
fn splice_to_end(src: &std::net::TcpStream, dst: &std::net::TcpStream) -> io::Result<()> {
    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(256 * 1024))?;
    loop {
        let n = splice(src, None, &w, None, 1 << 20, SpliceFFlags::SPLICE_F_MOVE)?;
        if n == 0 {
            return dst.shutdown(std::net::Shutdown::Write);
        }
        let mut left = n;
        while left > 0 {
            let m = splice(&r, None, dst, None, left, SpliceFFlags::SPLICE_F_MOVE)?;
            if m == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= m.min(left);
        }
    }
}

// === the rig ===

/// Where the three parties live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// One namespace, 127.0.0.1; the proxy is given the original destination.
    Loopback,
    /// Client in a sandbox namespace, proxy in its router namespace behind
    /// the eBPF program (steering, `allow_cidrs` pass), origin in a host
    /// namespace: the production path (root).
    Netns,
}

/// How a tunnel moves bytes (the proxy's [`CopyMode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Relay {
    /// The kernel tunnel (sockhash + stream verdict), production's.
    Kernel,
    Splice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Path {
    Direct,
    Tunnel(Relay),
    /// [`bare_relay`]: the floor of a user-space relay (loopback only).
    Bare,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Proto {
    Tls,
    Tcp,
}

/// The netns topology's namespaces and program, torn down on drop.
struct Steering {
    filter: Option<Filter>,
    /// The listener each steered path's connections go to.
    listeners: Vec<(Path, OwnedFd)>,
    _pins: Pins,
    _pair: Pair,
}

struct Rig {
    topology: Topology,
    // Runtimes first: they are dropped (their sockets closed) before the
    // namespaces go.
    clients: Runtime,
    _origin_rt: Runtime,
    _proxy_rt: Runtime,
    client_tls: Arc<rustls::ClientConfig>,
    targets: HashMap<(Path, Proto), SocketAddr>,
    steering: Option<Mutex<Steering>>,
    threads: Threads,
    events: Arc<Events>,
}

// === impl Topology ===

impl Topology {
    fn tag(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Netns => "netns_ebpf",
        }
    }
}

// === impl Relay ===

impl Relay {
    /// What the daemon uses by default (`[proxy] tunnel = "kernel"`).
    fn default_mode() -> Self {
        Self::Kernel
    }

    fn other(self) -> Self {
        match self {
            Self::Kernel => Self::Splice,
            Self::Splice => Self::Kernel,
        }
    }

    fn mode(self) -> CopyMode {
        match self {
            Self::Kernel => CopyMode::Kernel,
            Self::Splice => CopyMode::Splice,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Splice => "splice",
        }
    }
}

// === impl Path ===

impl Tag for Path {
    fn tag(&self) -> String {
        match *self {
            Self::Direct => "direct".into(),
            Self::Tunnel(r) => format!("tunnel/{}", r.tag()),
            Self::Bare => "bare_relay".into(),
        }
    }
}

// === impl Steering ===

impl Drop for Steering {
    fn drop(&mut self) {
        if let Some(f) = self.filter.take() {
            if let Err(e) = f.detach() {
                eprintln!("tunnel: detaching the bench's program: {e}");
            }
        }
    }
}

// === impl Rig ===

impl Rig {
    fn new(topology: Topology) -> Self {
        let tls = tls();
        let threads = Threads::default();
        let events = Arc::new(Events::default());
        let pair = (topology == Topology::Netns).then(Pair::new);
        let ns = |f: fn(&Pair) -> &String| pair.as_ref().map(|p| f(p).clone());
        let clients = runtime(Role::Client, &threads, ns(|p| &p.s));
        let origin_rt = runtime(Role::Origin, &threads, ns(|p| &p.h));
        let proxy_rt = runtime(Role::Proxy, &threads, ns(|p| &p.r));

        let origin_ip = match topology {
            Topology::Loopback => Ipv4Addr::LOCALHOST,
            Topology::Netns => SINK,
        };
        let (origin_tls, origin_tcp) = on(&origin_rt, origin(Arc::clone(&tls.server), origin_ip));
        let mut targets = HashMap::from([
            ((Path::Direct, Proto::Tls), origin_tls),
            ((Path::Direct, Proto::Tcp), origin_tcp),
        ]);
        let resolver = Arc::new(StaticResolver::new().with(NAME, [IpAddr::V4(origin_ip)]));
        let mut listeners = Vec::new();
        let kernel = kernel_tunnel();
        for relay in [Relay::Kernel, Relay::Splice] {
            let cfg = ProxyConfig {
                copy_mode: relay.mode(),
                kernel_tunnel: kernel.clone(),
                ..ProxyConfig::default()
            };
            let proxy = |name: &str, policy| {
                SandboxProxy::new(
                    format!("bench-{}-{name}-{}", topology.tag(), relay.tag()),
                    policy,
                    Arc::clone(&resolver) as _,
                    cfg.clone(),
                    Arc::clone(&events) as Arc<dyn ProxyEvents>,
                )
            };
            match topology {
                Topology::Loopback => {
                    // An EMPTY floor so the loopback origin may be dialled
                    // (benches only); the policy allows the origin's name.
                    let allow_name =
                        serde_json::json!({ "mode": "custom", "allow_domains": [NAME] });
                    let tls_proxy = proxy("tls", policy(allow_name, Floor::none_for_tests()));
                    let addr = on(&proxy_rt, loopback_listener(tls_proxy, origin_tls));
                    targets.insert((Path::Tunnel(relay), Proto::Tls), addr);
                    // No name: decided by address, which allow-all passes.
                    let all = serde_json::json!({ "mode": "allow-all" });
                    let tcp_proxy = proxy("tcp", policy(all, Floor::none_for_tests()));
                    let addr = on(&proxy_rt, loopback_listener(tcp_proxy, origin_tcp));
                    targets.insert((Path::Tunnel(relay), Proto::Tcp), addr);
                    if relay == Relay::Splice {
                        for (proto, origin) in [(Proto::Tls, origin_tls), (Proto::Tcp, origin_tcp)]
                        {
                            let bare = bare_relay(origin);
                            targets.insert((Path::Bare, proto), bare);
                        }
                    }
                }
                Topology::Netns => {
                    // As the daemon compiles it: the platform floor, the
                    // origin's name and its network allowed.
                    let p = serde_json::json!({
                        "mode": "custom",
                        "allow_domains": [NAME],
                        "allow_cidrs": ["198.51.100.0/24"],
                    });
                    let tls_proxy = proxy("tls", policy(p, Floor::platform()));
                    let path = Path::Tunnel(relay);
                    listeners.push((path, on(&proxy_rt, transparent_listener(tls_proxy))));
                    if relay == Relay::Splice {
                        let fd = on(&proxy_rt, async move { bare_transparent_relay(origin_tls) });
                        listeners.push((Path::Bare, fd));
                        targets.insert(
                            (Path::Bare, Proto::Tls),
                            SocketAddr::from((STEERED_DST, origin_tls.port())),
                        );
                    }
                    // Any address the program steers; the proxy dials the name.
                    targets.insert(
                        (Path::Tunnel(relay), Proto::Tls),
                        SocketAddr::from((STEERED_DST, origin_tls.port())),
                    );
                }
            }
        }
        let steering = pair.map(|pair| {
            tollgate_ebpf::ensure_bpffs().expect("bpffs");
            // Removed on every path from here on, a failed attach included.
            let pins = Pins(PathBuf::from(format!(
                "{}/bench-tunnel-{}",
                tollgate_ebpf::PIN_ROOT,
                std::process::id()
            )));
            let filter = Filter::attach(
                &pins.0.join("pair"),
                &PathBuf::from(format!("/run/netns/{}", pair.r)),
                "tgs0",
                &SandboxNet::v4(GUEST, GATEWAY),
                &FloorSet::platform(),
                &EgressPolicy {
                    mode: Mode::Custom,
                    allow_v4: vec!["198.51.100.0/24".parse().expect("net")],
                    allow_v6: vec![],
                },
            )
            .expect("attach the egress program");
            Mutex::new(Steering {
                filter: Some(filter),
                listeners,
                _pins: pins,
                _pair: pair,
            })
        });
        Self {
            topology,
            clients,
            _origin_rt: origin_rt,
            _proxy_rt: proxy_rt,
            client_tls: tls.client,
            targets,
            steering,
            threads,
            events,
        }
    }

    /// Where a client connects for `path`; with the program, registers the
    /// listener of the path's relay first.
    fn target(&self, path: Path, proto: Proto) -> SocketAddr {
        if let (Some(s), Path::Tunnel(_) | Path::Bare) = (&self.steering, path) {
            let mut s = s.lock().expect("steering");
            let s = &mut *s;
            let fd = s
                .listeners
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, fd)| fd.as_fd())
                .expect("listener");
            s.filter
                .as_mut()
                .expect("filter")
                .set_listeners(fd, None)
                .expect("register the proxy listener");
        }
        *self
            .targets
            .get(&(path, proto))
            .unwrap_or_else(|| panic!("no {proto:?} target for {path:?} on {:?}", self.topology))
    }

    /// Runs `f` as a client task, timing it and the CPU it cost.
    fn measure<F>(&self, what: &str, f: F) -> Sample
    where
        F: std::future::Future<Output = Result<Duration, BoxError>> + Send + 'static,
    {
        let mark = self.threads.mark();
        let res = self
            .clients
            .block_on(self.clients.spawn(f))
            .unwrap_or_else(|e| Err(e.into()));
        match res {
            Ok(d) => self.threads.sample(&mark, d.as_secs_f64()),
            Err(e) => panic!(
                "{} {what}: {e}; {}",
                self.topology.tag(),
                self.events.describe()
            ),
        }
    }

    /// One stream of `bytes` from the origin to a client over `proto`.
    fn bulk(&self, path: Path, proto: Proto, bytes: u64) -> Sample {
        let to = self.target(path, proto);
        let cfg = Arc::clone(&self.client_tls);
        let mut sample = self.measure(&format!("{proto:?} bulk {}", path.tag()), async move {
            let mut buf = vec![0u8; CHUNK];
            let fetch = fetch(cfg, proto, to, bytes, &mut buf);
            let (got, secs) = tokio::time::timeout(BULK_BOUND, fetch)
                .await
                .map_err(|_| format!("no end of stream within {BULK_BOUND:?}"))??;
            if got != bytes {
                return Err(format!("received {got} of {bytes} bytes").into());
            }
            Ok(secs)
        });
        if path == Path::Bare {
            // Its threads are not registered: the rest of the process's.
            let s = &mut sample;
            s.proxy_cpu = (s.process_cpu - s.client_cpu - s.origin_cpu - s.proxy_cpu).max(0.0);
        }
        sample
    }

    /// `total` small TLS exchanges, each on a new connection, by
    /// [`CONCURRENCY`] clients at once.
    fn connections(&self, path: Path, total: usize) -> Sample {
        let to = self.target(path, Proto::Tls);
        let cfg = Arc::clone(&self.client_tls);
        self.measure(&format!("new connections {}", path.tag()), async move {
            let next = Arc::new(AtomicUsize::new(0));
            let start = Instant::now();
            let workers: Vec<_> = (0..CONCURRENCY)
                .map(|_| {
                    let (cfg, next) = (Arc::clone(&cfg), Arc::clone(&next));
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 4096];
                        while next.fetch_add(1, Ordering::Relaxed) < total {
                            let one =
                                fetch(Arc::clone(&cfg), Proto::Tls, to, SMALL_REPLY, &mut buf);
                            let (got, _) = tokio::time::timeout(CONN_BOUND, one)
                                .await
                                .map_err(|_| format!("an exchange took over {CONN_BOUND:?}"))??;
                            if got != SMALL_REPLY {
                                return Err::<(), BoxError>(
                                    format!("received {got} of {SMALL_REPLY} bytes").into(),
                                );
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            let all = async {
                for w in workers {
                    w.await??;
                }
                Ok::<(), BoxError>(())
            };
            tokio::time::timeout(ROUND_BOUND, all)
                .await
                .map_err(|_| format!("{total} connections took over {ROUND_BOUND:?}"))??;
            Ok(start.elapsed())
        })
    }
}

/// Connects to `to`, asks for `want` bytes and reads to end of stream.
/// Returns the bytes received and the time from the request to the end.
async fn fetch(
    cfg: Arc<rustls::ClientConfig>,
    proto: Proto,
    to: SocketAddr,
    want: u64,
    buf: &mut [u8],
) -> Result<(u64, Duration), BoxError> {
    let tcp = TcpStream::connect(to).await?;
    tcp.set_nodelay(true)?;
    match proto {
        Proto::Tls => {
            let name = ServerName::try_from(NAME)?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            request(tls, want, buf).await
        }
        Proto::Tcp => request(tcp, want, buf).await,
    }
}

async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    want: u64,
    buf: &mut [u8],
) -> Result<(u64, Duration), BoxError> {
    let start = Instant::now();
    s.write_all(&want.to_be_bytes()).await?;
    s.flush().await?;
    let mut got = 0u64;
    loop {
        let n = s.read(buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    // Dropped without a close_notify of its own: the origin closed first.
    Ok((got, start.elapsed()))
}

// === scenarios ===

fn bulk_figures(
    notes: &mut Vec<String>,
    rig: &Rig,
    proto: Proto,
    bytes: u64,
    rounds: usize,
) -> Vec<Figure> {
    let topo = rig.topology.tag();
    let size = format!("{}MiB", bytes >> 20);
    let tag = match proto {
        Proto::Tls => "tls",
        Proto::Tcp => "tcp_opaque",
    };
    let label = format!("{topo} {tag} bulk {size}");
    eprintln!(
        "tunnel: {label}: one stream origin → client, direct vs tunnel ({rounds} rounds) ..."
    );
    let gib = bytes as f64 / GIB;
    let mibps = move |s: &Sample| bytes as f64 / MIB / s.secs;
    let main = Relay::default_mode();
    let mut paths = vec![Path::Direct, Path::Tunnel(main), Path::Tunnel(main.other())];
    let bare = rig.targets.contains_key(&(Path::Bare, proto));
    if bare {
        paths.push(Path::Bare);
    }
    let runs = interleaved(
        "tunnel",
        notes,
        rounds,
        &label,
        &paths,
        |p| rig.bulk(p, proto, bytes),
        mibps,
        |s| {
            format!(
                "{:.0} MiB/s (CPU s/GiB client {:.2} origin {:.2} proxy {:.2} outside {:.2} machine {:.2})",
                mibps(s),
                s.client_cpu / gib,
                s.origin_cpu / gib,
                s.proxy_cpu / gib,
                s.outside_cpu() / gib,
                s.machine_cpu / gib
            )
        },
    );
    let direct = &runs[&Path::Direct];
    let mut figures = Vec::new();
    for relay in [main, main.other()] {
        let tunnel = &runs[&Path::Tunnel(relay)];
        figures.push(Figure {
            name: format!("{topo}_{tag}_bulk_throughput_{size}_{}", relay.tag()),
            value: med(tunnel, mibps),
            baseline: Some(med(direct, mibps)),
            unit: "MiB/s",
            // The target is the production relay's, over TLS.
            target: if proto == Proto::Tls && relay == main {
                Target::MinRatio(0.9)
            } else {
                Target::Report
            },
        });
    }
    if bare {
        let b = &runs[&Path::Bare];
        figures.push(Figure {
            name: format!("{topo}_{tag}_bulk_throughput_{size}_bare_relay"),
            value: med(b, mibps),
            baseline: Some(med(direct, mibps)),
            unit: "MiB/s",
            target: Target::Report,
        });
        // The figures that decide: the production relay against the bare
        // relay measured in the same rounds.
        let tls = proto == Proto::Tls;
        figures.push(Figure {
            name: format!(
                "{topo}_{tag}_bulk_throughput_{size}_{} (direct: bare relay)",
                main.tag()
            ),
            value: med(&runs[&Path::Tunnel(main)], mibps),
            baseline: Some(med(b, mibps)),
            unit: "MiB/s",
            target: if tls {
                Target::MinRatio(1.15)
            } else {
                Target::Report
            },
        });
        // The relay's CPU, its threads and the kernel work done outside the
        // process meanwhile (the kernel tunnel's redirects run in kernel
        // workers), against the bare relay's threads and the same.
        let relay_cpu = move |s: &Sample| (s.proxy_cpu + s.outside_cpu()) / gib;
        figures.push(Figure {
            name: format!(
                "{topo}_{tag}_bulk_relay_cpu_per_gib_{} incl. kernel workers (direct: bare relay's)",
                main.tag()
            ),
            value: med(&runs[&Path::Tunnel(main)], relay_cpu),
            baseline: Some(med(b, relay_cpu)),
            unit: "CPU s/GiB",
            target: if tls {
                Target::MaxRatio(0.5)
            } else {
                Target::Report
            },
        });
        figures.push(Figure {
            name: format!(
                "{topo}_{tag}_bulk_machine_cpu_per_gib_{} (direct: bare relay's)",
                main.tag()
            ),
            value: med(&runs[&Path::Tunnel(main)], |s| s.machine_cpu / gib),
            baseline: Some(med(b, |s| s.machine_cpu / gib)),
            unit: "CPU s/GiB",
            target: Target::Report,
        });
        figures.push(Figure {
            name: format!("{topo}_{tag}_bulk_bare_relay_cpu_per_gib (direct: origin's)"),
            value: med(b, |s| s.proxy_cpu / gib),
            baseline: Some(med(direct, |s| s.origin_cpu / gib)),
            unit: "CPU s/GiB",
            target: Target::Report,
        });
    }
    for relay in [main, main.other()] {
        figures.push(Figure {
            name: format!(
                "{topo}_{tag}_bulk_proxy_cpu_per_gib_{} (direct: origin's)",
                relay.tag()
            ),
            value: med(&runs[&Path::Tunnel(relay)], |s| s.proxy_cpu / gib),
            baseline: Some(med(direct, |s| s.origin_cpu / gib)),
            unit: "CPU s/GiB",
            target: Target::Report,
        });
    }
    // The whole process's CPU per GiB against the direct path's: what the
    // tunnel costs in all, including kernel work for the proxy's sockets
    // that runs on the endpoints' threads (loopback and veth deliver in the
    // sender's context).
    for relay in [main, main.other()] {
        figures.push(Figure {
            name: format!(
                "{topo}_{tag}_bulk_process_cpu_per_gib_{} (lower is better)",
                relay.tag()
            ),
            value: med(&runs[&Path::Tunnel(relay)], |s| s.process_cpu / gib),
            baseline: Some(med(direct, |s| s.process_cpu / gib)),
            unit: "CPU s/GiB",
            target: Target::Report,
        });
    }
    figures
}

fn connection_figures(
    notes: &mut Vec<String>,
    rig: &Rig,
    total: usize,
    rounds: usize,
) -> Vec<Figure> {
    let topo = rig.topology.tag();
    let label = format!("{topo} tls new connections x{total}");
    eprintln!(
        "tunnel: {label}: {CONCURRENCY} concurrent clients, full handshakes, direct vs tunnel ({rounds} rounds) ..."
    );
    let n = total as f64;
    let rate = move |s: &Sample| n / s.secs;
    let us = move |x: f64| x / n * 1e6;
    let main = Relay::default_mode();
    let runs = interleaved(
        "tunnel",
        notes,
        rounds,
        &label,
        &[Path::Direct, Path::Tunnel(main)],
        |p| rig.connections(p, total),
        rate,
        |s| {
            format!(
                "{:.0} conn/s (CPU µs/conn client {:.0} origin {:.0} proxy {:.0})",
                rate(s),
                us(s.client_cpu),
                us(s.origin_cpu),
                us(s.proxy_cpu)
            )
        },
    );
    let (direct, tunnel) = (&runs[&Path::Direct], &runs[&Path::Tunnel(main)]);
    vec![
        Figure {
            name: format!("{topo}_tls_new_connections_per_s_c{CONCURRENCY}"),
            value: med(tunnel, rate),
            baseline: Some(med(direct, rate)),
            unit: "conn/s",
            target: Target::MinRatio(0.75),
        },
        Figure {
            name: format!("{topo}_tls_new_connection_proxy_cpu (direct: origin's)"),
            value: med(tunnel, |s| us(s.proxy_cpu)),
            baseline: Some(med(direct, |s| us(s.origin_cpu))),
            unit: "CPU µs/conn",
            target: Target::Report,
        },
        Figure {
            name: format!("{topo}_tls_new_connection_process_cpu (lower is better)"),
            value: med(tunnel, |s| us(s.process_cpu)),
            baseline: Some(med(direct, |s| us(s.process_cpu))),
            unit: "CPU µs/conn",
            target: Target::Report,
        },
    ]
}

/// Every scenario on `topology`; `tcp`: also the opaque TCP stream.
fn scenarios(
    notes: &mut Vec<String>,
    topology: Topology,
    tcp: bool,
    bytes: u64,
    conns: usize,
    rounds: usize,
) -> Vec<Figure> {
    let rig = Rig::new(topology);
    // Warm-up: first connections, lazy allocations, on every path.
    let main = Relay::default_mode();
    for p in [Path::Direct, Path::Tunnel(main), Path::Tunnel(main.other())] {
        rig.bulk(p, Proto::Tls, 32 << 20);
        if tcp {
            rig.bulk(p, Proto::Tcp, 32 << 20);
        }
        rig.connections(p, 100);
    }
    rig.bulk(Path::Bare, Proto::Tls, 32 << 20);
    let mut figures = bulk_figures(notes, &rig, Proto::Tls, bytes, rounds);
    figures.extend(connection_figures(notes, &rig, conns, rounds));
    if tcp {
        figures.extend(bulk_figures(notes, &rig, Proto::Tcp, bytes, rounds));
    }
    let events = rig.events.describe();
    eprintln!("tunnel: {} done; {events}", topology.tag());
    figures
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    let started = Instant::now();
    let rounds = rounds(3, 5);
    let bytes: u64 = if quick() { 256 << 20 } else { 1 << 30 };
    let conns: usize = if quick() { 2_000 } else { 10_000 };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load0 = loadavg();
    let main = Relay::default_mode();
    eprintln!(
        "tunnel: proxy copy mode {} (production default; {} measured alongside for comparison); {cpus} CPUs, load average {load0}",
        main.tag(),
        main.other().tag()
    );
    let mut paired = Vec::new();
    let mut figures = scenarios(&mut paired, Topology::Loopback, true, bytes, conns, rounds);
    let netns = match std::env::var("TOLLGATE_BENCH_NETNS").as_deref() {
        Ok("0") => Err("TOLLGATE_BENCH_NETNS=0"),
        _ if !nix::unistd::geteuid().is_root() => Err("not root"),
        _ => Ok(()),
    };
    let netns_note = match netns {
        Ok(()) => {
            figures.extend(scenarios(
                &mut paired,
                Topology::Netns,
                false,
                bytes,
                conns,
                rounds,
            ));
            "netns_ebpf: sandbox netns → router netns (eBPF steering, IP_TRANSPARENT listener, SandboxProxy::serve) → host netns".to_string()
        }
        Err(why) => {
            eprintln!(
                "tunnel: netns_ebpf scenarios skipped ({why}); run as root for the production path"
            );
            format!("netns_ebpf: skipped ({why})")
        }
    };
    let title = format!(
        "proxy tunnel vs a direct connection to the same origin (same run; copy mode {})",
        main.tag()
    );
    print_summary(&title, &figures);
    let mut notes = vec![
        format!(
            "copy mode: {} (production default); {} measured alongside",
            main.tag(),
            main.other().tag()
        ),
        format!("rounds: {rounds} (medians), paths interleaved"),
        format!("bulk: one stream of {} MiB per run, origin → client", bytes >> 20),
        format!(
            "new connections: {conns} per run, {CONCURRENCY} concurrent clients, full TLS 1.3 handshakes (no resumption), {SMALL_REPLY}-byte reply"
        ),
        "loopback: client, proxy and origin on 127.0.0.1 in one namespace".to_string(),
        netns_note,
        format!("CPUs: {cpus}; load average at start {load0}, at end {}", loadavg()),
        format!("wall time: {:.1} s", started.elapsed().as_secs_f64()),
    ];
    notes.extend(paired);
    write_report("tunnel", &title, &figures, &notes);
    eprintln!("tunnel: done in {:.1} s", started.elapsed().as_secs_f64());
}
