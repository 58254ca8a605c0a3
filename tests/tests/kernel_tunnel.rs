//! The kernel tunnel (sockhash + stream-verdict redirect) under a real
//! `SandboxProxy` on loopback: an allowed opaque TCP connection is decided,
//! dialled, and its two sockets are joined to the program, which moves every
//! byte. Each test asserts what the origin and the client received, and that
//! the pair really was in the kernel (the program's pair count while bytes
//! move, no fallback) and left no map entry behind.
//!
//! Needs root (loading the program): `sudo -E env "PATH=$PATH" cargo test -p
//! tollgate-tests --test kernel_tunnel`.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate::kernel_tunnel::EbpfTunnel;
use tollgate_proxy::policy::{CompiledPolicy, Floor, NetworkPolicy};
use tollgate_proxy::proxy::{NoEvents, ProxyConfig, SandboxProxy, StaticResolver};
use tollgate_proxy::tunnel::kernel::kernel_fallbacks;
use tollgate_proxy::tunnel::CopyMode;
use tollgate_tests::privileged::require_root;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;
/// Bound on any single transfer in these tests.
const BOUND: Duration = Duration::from_secs(120);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// One program per test process, as in the daemon.
fn kernel() -> Arc<EbpfTunnel> {
    static KT: OnceLock<Arc<EbpfTunnel>> = OnceLock::new();
    require_root();
    KT.get_or_init(|| EbpfTunnel::load().expect("load the kernel tunnel's program"))
        .clone()
}

fn policy(v: serde_json::Value) -> Arc<CompiledPolicy> {
    let p = NetworkPolicy::from_json(&v, "network_policy").expect("policy");
    // An empty floor so the loopback origin may be dialled (tests only).
    Arc::new(CompiledPolicy::new(&p, Arc::new(Floor::none_for_tests())))
}

/// A stream of `len` bytes that differs per `seed` and per MiB.
struct Pattern {
    base: Vec<u8>,
    seed: u64,
}

impl Pattern {
    fn new(seed: u64) -> Self {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let base = (0..CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Self { base, seed }
    }

    /// The `i`-th MiB: the base with its index and seed in front.
    fn chunk(&self, i: u64) -> Vec<u8> {
        let mut c = self.base.clone();
        c[..8].copy_from_slice(&i.to_be_bytes());
        c[8..16].copy_from_slice(&self.seed.to_be_bytes());
        c
    }

    fn sha256(&self, len: u64) -> [u8; 32] {
        let mut h = Sha256::new();
        for i in 0..len / CHUNK as u64 {
            h.update(self.chunk(i));
        }
        h.finalize().into()
    }
}

async fn send(s: &mut (impl AsyncWriteExt + Unpin), p: &Pattern, len: u64) -> io::Result<()> {
    for i in 0..len / CHUNK as u64 {
        s.write_all(&p.chunk(i)).await?;
    }
    Ok(())
}

/// Reads to end of stream: (bytes, sha256).
async fn drain(s: &mut (impl AsyncReadExt + Unpin)) -> io::Result<(u64, [u8; 32])> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let got = s.read(&mut buf).await?;
        if got == 0 {
            return Ok((n, h.finalize().into()));
        }
        h.update(&buf[..got]);
        n += got as u64;
    }
}

/// A proxy in kernel mode whose every connection has original destination
/// `origin`; returns its address.
async fn proxy_to(origin: SocketAddr, p: Arc<CompiledPolicy>) -> (SocketAddr, Arc<SandboxProxy>) {
    proxy_with(kernel(), origin, p).await
}

/// [`proxy_to`] on the kernel tunnel `kt`.
async fn proxy_with(
    kt: Arc<EbpfTunnel>,
    origin: SocketAddr,
    p: Arc<CompiledPolicy>,
) -> (SocketAddr, Arc<SandboxProxy>) {
    let cfg = ProxyConfig {
        copy_mode: CopyMode::Kernel,
        kernel_tunnel: Some(kt),
        ..ProxyConfig::default()
    };
    let proxy = SandboxProxy::new(
        "kernel-tunnel-test".into(),
        p,
        Arc::new(StaticResolver::new()),
        cfg,
        Arc::new(NoEvents),
    );
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let px = Arc::clone(&proxy);
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            tokio::spawn(Arc::clone(&px).handle_with_dst(c, origin));
        }
    });
    (addr, proxy)
}

/// A listener on a free loopback port (an origin) and its address.
async fn listen() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

fn allow_all() -> Arc<CompiledPolicy> {
    policy(serde_json::json!({"mode": "allow-all"}))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Waits (bounded) until the program holds no pair and no map entry.
async fn assert_no_entries(kt: &EbpfTunnel) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (socks, ends) = kt.kernel_entries();
        if kt.joined() == 0 && socks == 0 && ends == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left in the kernel tunnel: {} pairs, {socks} sockets, {ends} ends",
            kt.joined()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_gib_crosses_the_kernel_tunnel_intact_in_both_directions_at_once() {
    let _g = serial();
    let kt = kernel();
    let fallbacks = kernel_fallbacks();
    let passed = kt.passed_total();
    rt().block_on(async {
        let (origin, origin_addr) = listen().await;
        let (up_pat, down_pat) = (Pattern::new(1), Pattern::new(2));
        let (want_up, want_down) = (up_pat.sha256(GIB), down_pat.sha256(GIB));
        // The origin hashes what it receives and sends its own GiB.
        let origin_task = tokio::spawn(async move {
            let (s, _) = origin.accept().await?;
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                send(&mut w, &Pattern::new(2), GIB).await?;
                w.shutdown().await
            });
            let got = drain(&mut r).await?;
            writer.await.map_err(io::Error::other)??;
            Ok::<_, io::Error>(got)
        });
        let (addr, _proxy) = proxy_to(origin_addr, allow_all()).await;
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            send(&mut w, &up_pat, GIB).await?;
            w.shutdown().await
        });
        // While bytes move, the pair is in the kernel.
        let seen = Arc::new(AtomicU64::new(0));
        let watch = {
            let (kt, seen) = (Arc::clone(&kt), Arc::clone(&seen));
            tokio::spawn(async move {
                for _ in 0..200 {
                    seen.fetch_max(kt.joined() as u64, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let (got_down, origin_got) = tokio::time::timeout(BOUND, async {
            let down = drain(&mut r).await.expect("client read");
            writer.await.unwrap().expect("client write");
            let up = origin_task.await.unwrap().expect("origin");
            (down, up)
        })
        .await
        .expect("1 GiB each way within the bound");
        watch.abort();
        assert_eq!(origin_got.0, GIB, "bytes the origin received");
        assert_eq!(origin_got.1, want_up, "sandbox → origin stream corrupted");
        assert_eq!(got_down.0, GIB, "bytes the client received");
        assert_eq!(got_down.1, want_down, "origin → sandbox stream corrupted");
        assert_eq!(
            seen.load(Ordering::Relaxed),
            1,
            "the pair was never in the kernel"
        );
        assert_no_entries(&kt).await;
        assert_eq!(kt.passed_total(), passed, "bytes left to user space");
    });
    assert_eq!(
        kernel_fallbacks(),
        fallbacks,
        "a tunnel fell back to splice"
    );
}

#[test]
fn half_close_passes_through_the_kernel_tunnel_in_each_direction() {
    let _g = serial();
    let kt = kernel();
    rt().block_on(async {
        // Client first: the client sends and half-closes; the origin reads
        // to end of stream, only then answers, and closes.
        let (origin, o) = listen().await;
        let server = tokio::spawn(async move {
            let (mut s, _) = origin.accept().await?;
            let (n, sha) = drain(&mut s).await?;
            s.write_all(&sha).await?;
            s.write_all(&n.to_be_bytes()).await?;
            send(&mut s, &Pattern::new(7), 3 * CHUNK as u64).await?;
            s.shutdown().await?;
            Ok::<_, io::Error>(())
        });
        let (addr, _p) = proxy_to(o, allow_all()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let p = Pattern::new(5);
        send(&mut c, &p, 2 * CHUNK as u64).await.unwrap();
        c.shutdown().await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(BOUND, c.read_to_end(&mut reply))
            .await
            .expect("reply within the bound")
            .expect("read");
        server.await.unwrap().expect("origin");
        assert_eq!(reply.len(), 40 + 3 * CHUNK, "reply after the client's FIN");
        assert_eq!(
            &reply[..32],
            &p.sha256(2 * CHUNK as u64),
            "what the origin got"
        );
        assert_eq!(&reply[32..40], &(2 * CHUNK as u64).to_be_bytes());
        let mut h = Sha256::new();
        h.update(&reply[40..]);
        assert_eq!(
            <[u8; 32]>::from(h.finalize()),
            Pattern::new(7).sha256(3 * CHUNK as u64)
        );

        // Server first: the origin sends a banner at once and half-closes
        // (bytes that wait in the upstream socket before the join); the
        // client reads it to end of stream, then still sends and closes.
        let (origin, o) = listen().await;
        let server = tokio::spawn(async move {
            let (mut s, _) = origin.accept().await?;
            s.write_all(b"banner: hello\r\n").await?;
            s.shutdown().await?;
            drain(&mut s).await
        });
        let (addr, _p) = proxy_to(o, allow_all()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut banner = Vec::new();
        tokio::time::timeout(BOUND, c.read_to_end(&mut banner))
            .await
            .expect("banner within the bound")
            .expect("read");
        assert_eq!(banner, b"banner: hello\r\n");
        let p = Pattern::new(9);
        send(&mut c, &p, CHUNK as u64).await.unwrap();
        c.shutdown().await.unwrap();
        let (n, sha) = tokio::time::timeout(BOUND, server)
            .await
            .expect("origin done")
            .unwrap()
            .expect("origin");
        assert_eq!((n, sha), (CHUNK as u64, p.sha256(CHUNK as u64)));
        assert_no_entries(&kt).await;
    });
}

#[test]
fn tightening_the_policy_closes_a_kernel_tunnel_within_a_second() {
    let _g = serial();
    let kt = kernel();
    rt().block_on(async {
        let (origin, o) = listen().await;
        // The origin echoes until its connection ends; reports when.
        let server = tokio::spawn(async move {
            let (mut s, _) = origin.accept().await?;
            let mut b = vec![0u8; 65536];
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return Ok::<_, io::Error>(Instant::now()),
                    Ok(n) => {
                        if s.write_all(&b[..n]).await.is_err() {
                            return Ok(Instant::now());
                        }
                    }
                }
            }
        });
        let (addr, proxy) = proxy_to(o, allow_all()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        assert_eq!(kt.joined(), 1, "the tunnel is not in the kernel");
        let t0 = Instant::now();
        proxy.set_policy(policy(serde_json::json!({"mode": "deny-all"})));
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
        let client_closed = t0.elapsed();
        assert!(
            end.is_ok(),
            "the client's connection is still open after 5 s"
        );
        assert!(
            client_closed < Duration::from_secs(1),
            "client closed after {client_closed:?}"
        );
        let origin_closed = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("origin's connection closed")
            .unwrap()
            .unwrap();
        assert!(
            origin_closed.duration_since(t0) < Duration::from_secs(1),
            "origin closed after {:?}",
            origin_closed.duration_since(t0)
        );
        assert!(rest.is_empty(), "bytes after the revocation: {rest:?}");
        assert_no_entries(&kt).await;
    });
}

#[test]
fn a_thousand_kernel_tunnels_open_and_close_and_leave_no_entry() {
    let _g = serial();
    let kt = kernel();
    let fallbacks = kernel_fallbacks();
    rt().block_on(async {
        let (origin, o) = listen().await;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = origin.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 16];
                    if let Ok(n) = s.read(&mut b).await {
                        let _ = s.write_all(&b[..n]).await;
                    }
                });
            }
        });
        let (addr, _p) = proxy_to(o, allow_all()).await;
        let workers: Vec<_> = (0..8u64)
            .map(|w| {
                tokio::spawn(async move {
                    for i in 0..125u64 {
                        let mut c = TcpStream::connect(addr).await?;
                        let msg = (w * 1000 + i).to_be_bytes();
                        c.write_all(&msg).await?;
                        let mut back = Vec::new();
                        c.read_to_end(&mut back).await?;
                        if back != msg {
                            return Err(io::Error::other(format!("echo {back:?} for {msg:?}")));
                        }
                    }
                    Ok::<_, io::Error>(())
                })
            })
            .collect();
        tokio::time::timeout(BOUND, async {
            for w in workers {
                w.await
                    .unwrap()
                    .expect("1,000 echoes through the kernel tunnel");
            }
        })
        .await
        .expect("1,000 tunnels within the bound");
        assert_no_entries(&kt).await;
    });
    assert_eq!(
        kernel_fallbacks(),
        fallbacks,
        "a tunnel fell back to splice"
    );
}

#[test]
fn a_direction_left_to_user_space_is_copied_in_order_and_half_closed() {
    let _g = serial();
    require_root();
    // Every upstream end joins passing: origin → client is copied by the
    // proxy, client → origin is redirected by the program.
    let kt = EbpfTunnel::load_copying_upstream().expect("load the kernel tunnel's program");
    rt().block_on(async {
        let (origin, o) = listen().await;
        let (down_len, up_len) = (64 * CHUNK as u64, 8 * CHUNK as u64);
        let server = tokio::spawn(async move {
            let (s, _) = origin.accept().await?;
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                send(&mut w, &Pattern::new(11), down_len).await?;
                w.shutdown().await
            });
            let got = drain(&mut r).await?;
            writer.await.map_err(io::Error::other)??;
            Ok::<_, io::Error>(got)
        });
        let (addr, _p) = proxy_with(Arc::clone(&kt), o, allow_all()).await;
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            send(&mut w, &Pattern::new(12), up_len).await?;
            w.shutdown().await
        });
        let (down, up) = tokio::time::timeout(BOUND, async {
            let down = drain(&mut r).await.expect("client read");
            writer.await.unwrap().expect("client write");
            (down, server.await.unwrap().expect("origin"))
        })
        .await
        .expect("both directions within the bound");
        assert_eq!(
            down,
            (down_len, Pattern::new(11).sha256(down_len)),
            "copied direction"
        );
        assert_eq!(
            up,
            (up_len, Pattern::new(12).sha256(up_len)),
            "redirected direction"
        );
        assert_no_entries(&kt).await;
        // Exactly the origin's bytes went through user space.
        assert_eq!(
            kt.passed_total(),
            down_len,
            "bytes the program left to user space"
        );
    });
}
