//! End-to-end tests of the proxy core on loopback (no root, no eBPF).
//!
//! Upstreams listen on different 127.0.0.x addresses (Linux routes all of
//! 127/8 to `lo`), standing in for different hosts; a name maps to its
//! address through a [`StaticResolver`]. The policy is compiled against an
//! EMPTY floor (`Floor::none_for_tests`) so loopback can be dialled. The
//! original destination, which eBPF would give as the socket's local
//! address, is injected with `handle_with_dst`. Every proxy here also
//! rewrites any non-loopback address it dials to the test's canary, so a
//! bug can never send a packet off this machine, and shows up as a canary
//! contact instead. Tests assert on what upstreams and canaries RECEIVED.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::dial::Rewrite;
use super::*;
use crate::policy::{Floor, NetworkPolicy};

/// Every awaited test step is bounded by this.
const BOUND: Duration = Duration::from_secs(15);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("test step timed out")
}

// === events ===

#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Denied {
        name: Option<String>,
        dst: SocketAddr,
        reason: String,
    },
    Tunneled {
        name: Option<String>,
        upstream: SocketAddr,
    },
    Failed {
        reason: String,
    },
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Ev>>,
}

impl ProxyEvents for Recorder {
    fn denied(&self, name: Option<&str>, dst: SocketAddr, reason: &str) {
        self.events.lock().unwrap().push(Ev::Denied {
            name: name.map(str::to_string),
            dst,
            reason: reason.to_string(),
        });
    }
    fn tunneled(&self, name: Option<&str>, _dst: SocketAddr, upstream: SocketAddr) {
        self.events.lock().unwrap().push(Ev::Tunneled {
            name: name.map(str::to_string),
            upstream,
        });
    }
    fn upstream_failed(&self, _name: Option<&str>, _dst: SocketAddr, reason: &str) {
        self.events.lock().unwrap().push(Ev::Failed {
            reason: reason.to_string(),
        });
    }
}

impl Recorder {
    fn all(&self) -> Vec<Ev> {
        self.events.lock().unwrap().clone()
    }

    fn denials(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .filter_map(|e| match e {
                Ev::Denied { reason, .. } => Some(reason),
                _ => None,
            })
            .collect()
    }

    fn tunnels(&self) -> Vec<SocketAddr> {
        self.all()
            .into_iter()
            .filter_map(|e| match e {
                Ev::Tunneled { upstream, .. } => Some(upstream),
                _ => None,
            })
            .collect()
    }

    /// Waits (bounded) until a denial with `reason` was reported.
    async fn wait_denied(&self, reason: &str) {
        bounded(async {
            while !self.denials().iter().any(|r| r == reason) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

// === policies ===

fn policy(v: serde_json::Value) -> Arc<CompiledPolicy> {
    let p = NetworkPolicy::from_json(&v, "network_policy").unwrap_or_else(|e| panic!("{e:?}"));
    Arc::new(CompiledPolicy::new(&p, Arc::new(Floor::none_for_tests())))
}

fn custom(domains: &[&str]) -> Arc<CompiledPolicy> {
    policy(json!({ "mode": "custom", "allow_domains": domains }))
}

fn allow_all() -> Arc<CompiledPolicy> {
    policy(json!({ "mode": "allow-all" }))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// === listeners ===

/// A listener that counts what it accepted and hands each connection to a
/// handler.
struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Server {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn serve_with<F, Fut>(l: TcpListener, handler: F) -> Server
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(handler(c));
        }
    });
    Server { addr, accepted }
}

/// A canary: counts contacts, says nothing.
fn canary(l: TcpListener) -> Server {
    serve_with(l, |c| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(c);
    })
}

/// Binds the same (free) port on each of `ips`.
async fn bind_same_port(ips: &[&str]) -> Vec<TcpListener> {
    for _ in 0..50 {
        let first = TcpListener::bind((ip(ips[0]), 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut out = vec![first];
        for other in &ips[1..] {
            match TcpListener::bind((ip(other), port)).await {
                Ok(l) => out.push(l),
                Err(_) => break,
            }
        }
        if out.len() == ips.len() {
            return out;
        }
    }
    panic!("no common free port on {ips:?}");
}

// === the proxy under test ===

struct Harness {
    proxy: Arc<SandboxProxy>,
    /// Where the "sandbox" connects.
    addr: SocketAddr,
    events: Arc<Recorder>,
}

fn test_cfg() -> ProxyConfig {
    ProxyConfig {
        connect_timeout: Duration::from_secs(2),
        dns_timeout: Duration::from_secs(2),
        detect: DetectLimits {
            deadline: Duration::from_secs(5),
            first_byte_wait: Duration::from_millis(500),
            ..DetectLimits::default()
        },
        ..ProxyConfig::default()
    }
}

/// Starts a proxy whose connections all have original destination `dst`;
/// any non-loopback address it dials is rewritten to `canary_ip` (same
/// port).
async fn start(
    policy: Arc<CompiledPolicy>,
    resolver: StaticResolver,
    cfg: ProxyConfig,
    dst: SocketAddr,
    canary_ip: IpAddr,
) -> Harness {
    let events = Arc::new(Recorder::default());
    let rewrite: Rewrite = Arc::new(move |sa: SocketAddr| {
        if sa.ip().is_loopback() {
            sa
        } else {
            SocketAddr::new(canary_ip, sa.port())
        }
    });
    let proxy = SandboxProxy::new_with_rewrite(
        policy,
        Arc::new(resolver),
        cfg,
        Arc::clone(&events) as Arc<dyn ProxyEvents>,
        rewrite,
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let p = Arc::clone(&proxy);
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            tokio::spawn(Arc::clone(&p).handle_with_dst(c, dst));
        }
    });
    Harness {
        proxy,
        addr,
        events,
    }
}

// === TLS fixtures ===

struct Pki {
    ca: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
    key: Vec<u8>,
}

fn pki(names: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tollgate proxy test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let leaf = CertificateParams::new(names)
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    Pki {
        ca: ca.der().clone(),
        leaf: leaf.der().clone(),
        key: leaf_key.serialize_der(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(p: &Pki) -> Arc<rustls::ServerConfig> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.key.clone()));
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![p.leaf.clone()], key)
        .unwrap();
    Arc::new(cfg)
}

fn client_config(p: &Pki) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.ca.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(cfg)
}

/// A TLS server that echoes everything until end-of-stream.
fn tls_echo(l: TcpListener, cfg: Arc<rustls::ServerConfig>) -> Server {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    serve_with(l, move |c| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(c).await else {
                return;
            };
            let (mut r, mut w) = tokio::io::split(tls);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
    })
}

async fn tls_connect(
    proxy: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    sni: &str,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(proxy).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// A minimal ClientHello: SNI (if any), `supported_versions` (if any),
/// `legacy` as the body's version.
fn client_hello(sni: Option<&str>, versions: Option<&[u16]>, legacy: u16) -> Vec<u8> {
    let mut ext = Vec::new();
    if let Some(name) = sni {
        let n = name.as_bytes();
        let list_len = 3 + n.len();
        ext.extend_from_slice(&0u16.to_be_bytes());
        ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(list_len as u16).to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
        ext.extend_from_slice(n);
    }
    if let Some(vs) = versions {
        ext.extend_from_slice(&43u16.to_be_bytes());
        ext.extend_from_slice(&((1 + 2 * vs.len()) as u16).to_be_bytes());
        ext.push((2 * vs.len()) as u8);
        for v in vs {
            ext.extend_from_slice(&v.to_be_bytes());
        }
    }
    let mut body = Vec::new();
    body.extend_from_slice(&legacy.to_be_bytes());
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&4u16.to_be_bytes());
    body.extend_from_slice(&[0x13, 0x01, 0x00, 0x2f]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1u8];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn modern_hello(sni: &str) -> Vec<u8> {
    client_hello(Some(sni), Some(&[0x0304, 0x0303]), 0x0303)
}

/// Reads until end-of-stream or reset (bounded); what arrived before.
async fn read_all(s: &mut TcpStream) -> (Vec<u8>, Option<io::ErrorKind>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match bounded(s.read(&mut buf)).await {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e.kind())),
        }
    }
}

fn alert(description: u8) -> Vec<u8> {
    vec![21, 3, 3, 0, 2, 2, description]
}

/// Deterministic bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x & 0xff) as u8
        })
        .collect()
}

// === TLS tunnel ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_allowed_sni_reaches_upstream_untouched_8mib_echo() {
    let pki = pki(&["allowed.test"]);
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let upstream = tls_echo(up, server_config(&pki));
    let dst = upstream.addr;
    let h = start(
        custom(&["allowed.test"]),
        StaticResolver::new().with("allowed.test", [ip("127.0.0.2")]),
        test_cfg(),
        dst,
        ip("127.0.0.1"),
    )
    .await;
    let tls = bounded(tls_connect(h.addr, client_config(&pki), "allowed.test"))
        .await
        .expect("handshake through the proxy");
    // The client sees the upstream's own certificate: no interception.
    let seen = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(seen, pki.leaf, "the leaf received is not the upstream's");
    let data = pattern(8 << 20, 42);
    let (mut r, mut w) = tokio::io::split(tls);
    let expect = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::with_capacity(expect.len());
    bounded(r.read_to_end(&mut got)).await.unwrap();
    let _w = bounded(writer).await.unwrap();
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "echoed bytes differ");
    assert_eq!(upstream.accepted(), 1);
    assert_eq!(h.events.tunnels(), vec![upstream.addr]);
}

#[tokio::test]
async fn tls_denied_sni_gets_alert_and_upstream_sees_nothing() {
    let pki = pki(&["evil.test"]);
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let upstream = tls_echo(up, server_config(&pki));
    // The resolver knows evil.test: a wrong allow would reach the upstream.
    let h = start(
        custom(&["allowed.test"]),
        StaticResolver::new().with("evil.test", [ip("127.0.0.2")]),
        test_cfg(),
        upstream.addr,
        ip("127.0.0.1"),
    )
    .await;
    // A real client sees a fatal unrecognized_name alert.
    let err = bounded(tls_connect(h.addr, client_config(&pki), "evil.test"))
        .await
        .expect_err("handshake must fail");
    let msg = format!("{err:?}");
    assert!(
        msg.contains("UnrecognisedName") || msg.contains("UnrecognizedName"),
        "{msg}"
    );
    // And on the wire it is exactly the alert record, then end-of-stream.
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&modern_hello("evil.test")).await.unwrap();
    let (got, _) = read_all(&mut s).await;
    assert_eq!(got, alert(112));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(upstream.accepted(), 0, "a denied name reached the upstream");
    assert_eq!(
        h.events.denials(),
        vec!["domain_not_allowed", "domain_not_allowed"]
    );
    assert!(h.events.all().iter().all(|e| match e {
        Ev::Denied { name, dst, .. } =>
            name.as_deref() == Some("evil.test") && *dst == upstream.addr,
        _ => false,
    }));
}

/// THREATS #3: SNI=allowed aimed at the canary's address → only the
/// proxy's resolution of the name is dialled.
#[tokio::test]
async fn tls_dials_the_name_never_the_sandbox_destination() {
    let pki = pki(&["allowed.test"]);
    let ls = bind_same_port(&["127.0.0.2", "127.0.0.9"]).await;
    let mut ls = ls.into_iter();
    let upstream = tls_echo(ls.next().unwrap(), server_config(&pki));
    let canary = canary(ls.next().unwrap());
    let h = start(
        custom(&["allowed.test"]),
        StaticResolver::new().with("allowed.test", [ip("127.0.0.2")]),
        test_cfg(),
        canary.addr, // the sandbox aimed at the canary
        ip("127.0.0.1"),
    )
    .await;
    let mut tls = bounded(tls_connect(h.addr, client_config(&pki), "allowed.test"))
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    bounded(tls.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"ping");
    assert_eq!(
        canary.accepted(),
        0,
        "the sandbox's destination was dialled"
    );
    assert_eq!(upstream.accepted(), 1);
}

/// DNS rebinding: a private answer (not opened by allow_cidrs) is dropped,
/// the permitted one is dialled. The private address is rewritten to the
/// canary, so dialling it would show.
#[tokio::test]
async fn rebinding_private_answer_is_never_dialled() {
    let ls = bind_same_port(&["127.0.0.2", "127.0.0.9"]).await;
    let mut ls = ls.into_iter();
    let upstream = serve_with(ls.next().unwrap(), |mut c| async move {
        let mut buf = vec![0u8; 4096];
        let _ = c.read(&mut buf).await;
        let _ = c.write_all(b"upstream").await;
    });
    let canary = canary(ls.next().unwrap());
    let h = start(
        allow_all(),
        StaticResolver::new().with("allowed.test", [ip("10.0.0.9"), ip("127.0.0.2")]),
        test_cfg(),
        upstream.addr,
        ip("127.0.0.9"),
    )
    .await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&modern_hello("allowed.test")).await.unwrap();
    let mut b = [0u8; 8];
    bounded(s.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"upstream");
    assert_eq!(canary.accepted(), 0, "the private answer was dialled");
    assert_eq!(upstream.accepted(), 1);

    // Only forbidden answers: refused with an alert, nothing dialled.
    let h2 = start(
        allow_all(),
        StaticResolver::new().with("allowed.test", [ip("10.0.0.9"), ip("192.168.1.1")]),
        test_cfg(),
        upstream.addr,
        ip("127.0.0.9"),
    )
    .await;
    let mut s = TcpStream::connect(h2.addr).await.unwrap();
    s.write_all(&modern_hello("allowed.test")).await.unwrap();
    let (got, _) = read_all(&mut s).await;
    assert_eq!(got, alert(49));
    assert_eq!(h2.events.denials(), vec!["resolved_to_private"]);
    assert_eq!(canary.accepted(), 0);
    assert_eq!(upstream.accepted(), 1);
}

/// With the platform floor, metadata / loopback answers are refused as
/// `resolved_to_floor` (the destination is a public address that is never
/// dialled; anything non-loopback would be rewritten to the canary).
#[tokio::test]
async fn floor_answers_are_refused() {
    let [c] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.9"]).await).unwrap();
    let canary = canary(c);
    let p = NetworkPolicy::from_json(&json!({ "mode": "allow-all" }), "p").unwrap();
    let compiled = Arc::new(CompiledPolicy::new(&p, Arc::new(Floor::platform())));
    let dst = SocketAddr::new(ip("93.184.215.14"), canary.addr.port());
    let h = start(
        compiled,
        StaticResolver::new().with("meta.test", [ip("169.254.169.254"), ip("127.0.0.9")]),
        test_cfg(),
        dst,
        ip("127.0.0.9"),
    )
    .await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&modern_hello("meta.test")).await.unwrap();
    let (got, _) = read_all(&mut s).await;
    assert_eq!(got, alert(49));
    assert_eq!(h.events.denials(), vec!["resolved_to_floor"]);
    assert_eq!(canary.accepted(), 0);
}

/// THREATS #17: a ClientHello dribbled one byte per segment is reassembled
/// and decided; the upstream receives it byte for byte.
#[tokio::test]
async fn client_hello_one_byte_at_a_time() {
    let hello = modern_hello("allowed.test");
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let len = hello.len();
    let upstream = serve_with(up, move |mut c| {
        let tx = Arc::clone(&tx);
        async move {
            let mut got = vec![0u8; len];
            if c.read_exact(&mut got).await.is_ok() {
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(got);
                }
            }
        }
    });
    let h = start(
        custom(&["allowed.test"]),
        StaticResolver::new().with("allowed.test", [ip("127.0.0.2")]),
        test_cfg(),
        upstream.addr,
        ip("127.0.0.1"),
    )
    .await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for b in &hello {
        s.write_all(std::slice::from_ref(b)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let got = bounded(rx).await.unwrap();
    assert_eq!(
        got, hello,
        "the upstream did not receive the hello verbatim"
    );

    // The same, denied: the alert comes after the last byte.
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for b in &modern_hello("evil.test") {
        s.write_all(std::slice::from_ref(b)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (got, _) = read_all(&mut s).await;
    assert_eq!(got, alert(112));
    assert_eq!(upstream.accepted(), 1);
}

/// THREATS #18: a hello offering only TLS 1.0 / 1.1 is refused.
#[tokio::test]
async fn legacy_tls_only_is_refused() {
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let upstream = canary(up);
    let h = start(
        custom(&["allowed.test"]),
        StaticResolver::new().with("allowed.test", [ip("127.0.0.2")]),
        test_cfg(),
        upstream.addr,
        ip("127.0.0.1"),
    )
    .await;
    for hello in [
        client_hello(Some("allowed.test"), None, 0x0301),
        client_hello(Some("allowed.test"), Some(&[0x0302, 0x0301]), 0x0302),
    ] {
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        let (got, _) = read_all(&mut s).await;
        assert_eq!(got, alert(70));
    }
    assert_eq!(h.events.denials(), vec!["tls_version", "tls_version"]);
    assert_eq!(upstream.accepted(), 0);
}

/// A transform domain over TLS fails closed until interception lands.
#[tokio::test]
async fn transform_domain_over_tls_without_interception_is_refused() {
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let upstream = canary(up);
    let p = policy(json!({
        "mode": "custom",
        "transforms": [{ "domain": "api.test", "inject_headers": { "authorization": "Bearer S3CRET" } }]
    }));
    let h = start(
        p,
        StaticResolver::new().with("api.test", [ip("127.0.0.2")]),
        test_cfg(),
        upstream.addr,
        ip("127.0.0.1"),
    )
    .await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&modern_hello("api.test")).await.unwrap();
    let (got, _) = read_all(&mut s).await;
    assert_eq!(got, alert(49));
    assert_eq!(h.events.denials(), vec!["interception_unavailable"]);
    assert_eq!(upstream.accepted(), 0);
}

/// THREATS #4 / #13: no name (opaque bytes, or TLS without SNI) is
/// decided by destination: denied in custom mode with a reset / alert.
#[tokio::test]
async fn no_name_is_decided_by_destination() {
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let upstream = canary(up);
    let h = start(
        custom(&["allowed.test"]),
        StaticResolver::new().with("allowed.test", [ip("127.0.0.2")]),
        test_cfg(),
        upstream.addr,
        ip("127.0.0.1"),
    )
    .await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    let (got, err) = read_all(&mut s).await;
    assert!(got.is_empty());
    assert_eq!(err, Some(io::ErrorKind::ConnectionReset));
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&client_hello(None, Some(&[0x0304]), 0x0303))
        .await
        .unwrap();
    let (got, _) = read_all(&mut s).await;
    assert_eq!(got, alert(49));
    assert_eq!(h.events.denials(), vec!["no_name", "no_name"]);
    assert_eq!(upstream.accepted(), 0);

    // allow_cidrs covering the destination: the opaque stream is tunnelled
    // to the destination address.
    let echo = serve_with(
        TcpListener::bind("127.0.0.3:0").await.unwrap(),
        |mut c| async move {
            let mut b = [0u8; 64];
            if let Ok(n) = c.read(&mut b).await {
                let _ = c.write_all(&b[..n]).await;
            }
        },
    );
    let h = start(
        policy(json!({ "mode": "custom", "allow_cidrs": ["127.0.0.3/32"] })),
        StaticResolver::new(),
        test_cfg(),
        echo.addr,
        ip("127.0.0.1"),
    )
    .await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"SSH-2.0-x\r\n").await.unwrap();
    let mut b = [0u8; 11];
    bounded(s.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"SSH-2.0-x\r\n");
    assert_eq!(echo.accepted(), 1);
}

/// A malformed hello is an alert, never a fall-back to the address.
#[tokio::test]
async fn malformed_hello_gets_alert() {
    let h = start(
        allow_all(),
        StaticResolver::new(),
        test_cfg(),
        "127.0.0.2:443".parse().unwrap(),
        ip("127.0.0.1"),
    )
    .await;
    let mut hello = modern_hello("allowed.test");
    // Claim a longer extensions block than there is.
    let n = hello.len();
    hello.truncate(n - 1);
    hello[3..5].copy_from_slice(&((n - 1 - 5) as u16).to_be_bytes());
    let hs_len = (n - 1 - 9) as u32;
    hello[6..9].copy_from_slice(&hs_len.to_be_bytes()[1..]);
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let (got, _) = read_all(&mut s).await;
    assert_eq!(got.len(), 7, "expected one alert record, got {got:?}");
    assert_eq!(&got[..6], &[21, 3, 3, 0, 2, 2]);
    assert_eq!(h.events.denials().len(), 1);
}

/// Half-close through the whole proxy: the client shuts its write side and
/// still receives everything the upstream sends afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_through_the_proxy() {
    let hello = modern_hello("allowed.test");
    let reply = pattern(1 << 20, 9);
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let (hello2, reply2) = (hello.clone(), reply.clone());
    let upstream = serve_with(up, move |mut c| {
        let (hello, reply) = (hello2.clone(), reply2.clone());
        async move {
            let mut got = Vec::new();
            // Reads to end-of-stream: the client's shutdown must arrive.
            if c.read_to_end(&mut got).await.is_ok() && got == hello {
                let _ = c.write_all(&reply).await;
            }
            let _ = c.shutdown().await;
        }
    });
    let h = start(
        custom(&["allowed.test"]),
        StaticResolver::new().with("allowed.test", [ip("127.0.0.2")]),
        test_cfg(),
        upstream.addr,
        ip("127.0.0.1"),
    )
    .await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&hello).await.unwrap();
    s.shutdown().await.unwrap();
    let (got, err) = read_all(&mut s).await;
    assert_eq!(err, None);
    assert!(
        got == reply,
        "got {} bytes, want {}",
        got.len(),
        reply.len()
    );
}

// === live update ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_open_tunnel_within_one_second() {
    let pki = pki(&["allowed.test", "other.test"]);
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let upstream = tls_echo(up, server_config(&pki));
    let h = start(
        custom(&["allowed.test", "other.test"]),
        StaticResolver::new()
            .with("allowed.test", [ip("127.0.0.2")])
            .with("other.test", [ip("127.0.0.2")]),
        test_cfg(),
        upstream.addr,
        ip("127.0.0.1"),
    )
    .await;
    let mut revoked = bounded(tls_connect(h.addr, client_config(&pki), "allowed.test"))
        .await
        .unwrap();
    let mut kept = bounded(tls_connect(h.addr, client_config(&pki), "other.test"))
        .await
        .unwrap();
    for t in [&mut revoked, &mut kept] {
        t.write_all(b"before").await.unwrap();
        let mut b = [0u8; 6];
        bounded(t.read_exact(&mut b)).await.unwrap();
    }
    assert_eq!(h.proxy.active_connections(), 2);

    let t0 = Instant::now();
    h.proxy.set_policy(custom(&["other.test"]));
    let mut b = [0u8; 1];
    let r = bounded(revoked.read(&mut b)).await;
    let took = t0.elapsed();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "revoked tunnel still delivers data: {r:?}"
    );
    assert!(took < Duration::from_secs(1), "closing took {took:?}");

    // The unchanged verdict keeps its tunnel.
    kept.write_all(b"after!").await.unwrap();
    let mut b = [0u8; 6];
    bounded(kept.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"after!");
    bounded(async {
        while h.proxy.active_connections() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // New connections see the new policy at once.
    assert!(
        bounded(tls_connect(h.addr, client_config(&pki), "allowed.test"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn shutdown_closes_everything_and_stops_serving() {
    let pki = pki(&["allowed.test"]);
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let upstream = tls_echo(up, server_config(&pki));
    let events = Arc::new(Recorder::default());
    let proxy = SandboxProxy::new(
        "sbx-shutdown".into(),
        custom(&["allowed.test"]),
        Arc::new(StaticResolver::new().with("allowed.test", [ip("127.0.0.2")])),
        test_cfg(),
        events,
    );
    // Through `serve`: the original destination is the listener's own
    // address, so bind the listener on the upstream's port.
    let l = TcpListener::bind(("127.0.0.5", upstream.addr.port()))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let served = tokio::spawn(Arc::clone(&proxy).serve(l));
    let mut tls = bounded(tls_connect(addr, client_config(&pki), "allowed.test"))
        .await
        .unwrap();
    tls.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    bounded(tls.read_exact(&mut b)).await.unwrap();
    assert_eq!(
        upstream.accepted(),
        1,
        "serve() dialled the name on the original port"
    );
    proxy.shutdown();
    bounded(served).await.unwrap();
    let r = bounded(tls.read(&mut b)).await;
    assert!(matches!(r, Ok(0) | Err(_)));
    bounded(async {
        while proxy.active_connections() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

// === limits ===

#[tokio::test]
async fn connection_cap_resets_excess_and_frees_slots() {
    let events = Arc::new(Recorder::default());
    let cfg = ProxyConfig {
        max_connections: 2,
        detect: DetectLimits {
            first_byte_wait: Duration::from_secs(10),
            deadline: Duration::from_secs(10),
            ..DetectLimits::default()
        },
        ..test_cfg()
    };
    let proxy = SandboxProxy::new(
        "sbx-cap".into(),
        custom(&[]),
        Arc::new(StaticResolver::new()),
        cfg,
        Arc::clone(&events) as Arc<dyn ProxyEvents>,
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(Arc::clone(&proxy).serve(l));
    // Two silent clients hold both slots (detection waits for bytes).
    let a = TcpStream::connect(addr).await.unwrap();
    let b = TcpStream::connect(addr).await.unwrap();
    bounded(async {
        while proxy.active_connections() != 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    let (got, err) = read_all(&mut c).await;
    assert!(got.is_empty());
    assert_eq!(err, Some(io::ErrorKind::ConnectionReset));
    events.wait_denied("connection_limit").await;
    assert_eq!(proxy.active_connections(), 2);
    // Slots come back when connections end.
    drop(a);
    drop(b);
    bounded(async {
        while proxy.active_connections() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let _d = TcpStream::connect(addr).await.unwrap();
    bounded(async {
        while proxy.active_connections() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// THREATS #17 / #31: a hello stalled mid-way is closed at the deadline.
#[tokio::test]
async fn stalled_hello_is_closed_at_the_deadline() {
    let cfg = ProxyConfig {
        detect: DetectLimits {
            deadline: Duration::from_millis(300),
            ..test_cfg().detect
        },
        ..test_cfg()
    };
    let h = start(
        allow_all(),
        StaticResolver::new(),
        cfg,
        "127.0.0.2:443".parse().unwrap(),
        ip("127.0.0.1"),
    )
    .await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    let hello = modern_hello("allowed.test");
    s.write_all(&hello[..20]).await.unwrap();
    let t0 = Instant::now();
    let (got, _) = read_all(&mut s).await;
    assert!(got.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(h.events.denials(), vec!["timeout"]);
}

// === plain HTTP ===

/// What an HTTP upstream received.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    uri: String,
    headers: ::http::HeaderMap,
    body: Vec<u8>,
}

/// An HTTP/1 upstream that records each request and answers
/// `200 ok <host> <path>`.
fn http_upstream(l: TcpListener) -> (Server, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let server = serve_with(l, move |c| {
        let log = Arc::clone(&log);
        async move {
            let svc =
                hyper::service::service_fn(move |req: ::http::Request<hyper::body::Incoming>| {
                    let log = Arc::clone(&log);
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes().to_vec();
                        let host = parts
                            .headers
                            .get("host")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string();
                        let text = format!("ok {host} {}", parts.uri.path());
                        log.lock().unwrap().push(Seen {
                            method: parts.method.to_string(),
                            uri: parts.uri.to_string(),
                            headers: parts.headers,
                            body,
                        });
                        Ok::<_, hyper::Error>(::http::Response::new(Full::new(Bytes::from(text))))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(c), svc)
                .await;
        }
    });
    (server, seen)
}

/// A raw HTTP/1 client connection that reads responses with
/// `Content-Length` bodies (all this proxy's and upstream's are).
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) -> bool {
        let mut b = [0u8; 8192];
        match bounded(self.s.read(&mut b)).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
        }
    }

    /// The next response, or `None` at end-of-stream.
    async fn response(&mut self) -> Option<Resp> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        self.buf.drain(..end);
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next().unwrap()[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_string(), v.trim().to_string())
            })
            .collect();
        let len = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse::<usize>().unwrap());
        while self.buf.len() < len {
            if !self.fill().await {
                break;
            }
        }
        let body = self.buf.drain(..len.min(self.buf.len())).collect();
        Some(Resp {
            status,
            headers,
            body,
        })
    }

    /// True when the proxy closed the connection (bounded wait).
    async fn closed(&mut self) -> bool {
        !self.fill().await
    }
}

async fn http_harness(p: Arc<CompiledPolicy>) -> (Harness, Server, Arc<Mutex<Vec<Seen>>>) {
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let (server, seen) = http_upstream(up);
    let h = start(
        p,
        StaticResolver::new()
            .with("allowed.test", [ip("127.0.0.2")])
            .with("evil.test", [ip("127.0.0.2")])
            .with("api.test", [ip("127.0.0.2")]),
        test_cfg(),
        server.addr,
        ip("127.0.0.1"),
    )
    .await;
    (h, server, seen)
}

#[tokio::test]
async fn http_allowed_is_forwarded_and_denied_gets_403() {
    let (h, upstream, seen) = http_harness(custom(&["allowed.test"])).await;
    let mut c = Raw::connect(h.addr).await;
    c.send(b"GET /hello?x=1 HTTP/1.1\r\nHost: allowed.test\r\nX-Keep: yes\r\n\r\n")
        .await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"ok allowed.test /hello");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, "GET");
        assert_eq!(seen[0].uri, "/hello?x=1");
        assert_eq!(seen[0].headers["host"], "allowed.test");
        assert_eq!(seen[0].headers["x-keep"], "yes");
    }

    let mut d = Raw::connect(h.addr).await;
    d.send(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n").await;
    let r = d.response().await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-tollgate-reason"), Some("domain_not_allowed"));
    assert!(String::from_utf8_lossy(&r.body).contains("domain_not_allowed"));
    assert_eq!(
        upstream.accepted(),
        1,
        "a denied request reached the upstream"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(h.events.denials(), vec!["domain_not_allowed"]);
}

/// THREATS #22 / tests-that-matter #15: every request on a keep-alive
/// connection is authorised on its own.
#[tokio::test]
async fn keep_alive_second_request_to_evil_is_denied() {
    let (h, _upstream, seen) = http_harness(custom(&["allowed.test"])).await;
    let mut c = Raw::connect(h.addr).await;
    c.send(b"GET /1 HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        .await;
    assert_eq!(c.response().await.unwrap().status, 200);
    c.send(b"GET /2 HTTP/1.1\r\nHost: evil.test\r\n\r\n").await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-tollgate-reason"), Some("domain_not_allowed"));
    // Pipelined: an allowed and a denied request in one segment.
    c.send(
        b"GET /3 HTTP/1.1\r\nHost: allowed.test\r\n\r\nGET /4 HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    )
    .await;
    assert_eq!(c.response().await.unwrap().status, 200);
    assert_eq!(c.response().await.unwrap().status, 403);
    let seen = seen.lock().unwrap();
    let paths: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(paths, vec!["/1", "/3"]);
    assert!(seen.iter().all(|s| s.headers["host"] == "allowed.test"));
}

/// THREATS #22 corpus: 400 and close, as the first request (caught while
/// detecting) and pipelined after a good one (caught by the scanner); the
/// upstream never receives the bad request.
#[tokio::test]
async fn smuggling_corpus_is_refused_with_400_and_close() {
    let corpus: &[(&str, &[u8])] = &[
        ("cl.te", b"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("te.cl", b"POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
        ("dup cl", b"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
        ("unequal cl", b"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy"),
        ("cl +5", b"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: +1\r\n\r\nx"),
        ("cl 0x10", b"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 0x1\r\n\r\nx"),
        ("cl list", b"POST / HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 1, 1\r\n\r\nx"),
        ("te trailing space", b"POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked \r\n\r\n0\r\n\r\n"),
        ("te chunked, identity", b"POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
        ("te xchunked", b"POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
        ("te gzip, chunked", b"POST / HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: allowed.test\r\nX-A: 1\r\n  folded\r\n\r\n"),
        ("bare lf", b"GET / HTTP/1.1\nHost: allowed.test\n\n"),
        ("nul", b"GET / HTTP/1.1\r\nHost: allowed.test\r\nX-A: a\0b\r\n\r\n"),
        ("space before colon", b"GET / HTTP/1.1\r\nHost: allowed.test\r\nX-A : 1\r\n\r\n"),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: allowed.test\r\nHost: evil.test\r\n\r\n"),
        ("userinfo host", b"GET / HTTP/1.1\r\nHost: allowed.test@evil.test\r\n\r\n"),
        ("absolute-form mismatch", b"GET http://evil.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n"),
        ("no host", b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n"),
        ("connect", b"CONNECT allowed.test:22 HTTP/1.1\r\nHost: allowed.test:22\r\n\r\n"),
        ("h2c", b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"),
        ("host port", b"GET / HTTP/1.1\r\nHost: allowed.test:22\r\n\r\n"),
    ];
    let (h, _upstream, seen) = http_harness(custom(&["allowed.test"])).await;
    for (what, bad) in corpus {
        // First request on the connection.
        let mut c = Raw::connect(h.addr).await;
        c.send(bad).await;
        let r = c
            .response()
            .await
            .unwrap_or_else(|| panic!("{what}: no response"));
        assert_eq!(r.status, 400, "{what} (first request): {r:?}");
        assert!(r.header("x-tollgate-reason").is_some(), "{what}: no reason");
        assert!(
            c.closed().await,
            "{what} (first request): connection left open"
        );

        // Pipelined after a good request.
        let before = seen.lock().unwrap().len();
        let mut c = Raw::connect(h.addr).await;
        let mut bytes = b"GET /good HTTP/1.1\r\nHost: allowed.test\r\n\r\n".to_vec();
        bytes.extend_from_slice(bad);
        c.send(&bytes).await;
        let r = c.response().await.unwrap();
        assert_eq!(r.status, 200, "{what}: good request");
        let r = c
            .response()
            .await
            .unwrap_or_else(|| panic!("{what}: no second response"));
        assert_eq!(r.status, 400, "{what} (pipelined): {r:?}");
        assert!(c.closed().await, "{what} (pipelined): connection left open");
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.len(),
            before + 1,
            "{what}: the bad request reached the upstream"
        );
        assert_eq!(seen[before].uri, "/good");
    }
}

/// Allowed requests are re-serialised: canonical framing, hop-by-hop
/// headers gone, Host kept.
#[tokio::test]
async fn upstream_receives_canonical_framing() {
    let (h, _upstream, seen) = http_harness(custom(&["allowed.test"])).await;
    let mut c = Raw::connect(h.addr).await;
    c.send(
        b"POST /chunked HTTP/1.1\r\nHost: allowed.test\r\nTransfer-Encoding: chunked\r\n\
          Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n\
          Proxy-Authorization: Basic Zm9vOmJhcg==\r\nTE: trailers\r\n\r\n\
          5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    .await;
    assert_eq!(c.response().await.unwrap().status, 200);
    c.send(b"POST /length HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 5\r\n\r\nabcde")
        .await;
    assert_eq!(c.response().await.unwrap().status, 200);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let chunked = &seen[0];
    assert_eq!(chunked.body, b"hello world");
    assert_eq!(chunked.headers["host"], "allowed.test");
    for hop in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "connection",
    ] {
        assert!(!chunked.headers.contains_key(hop), "{hop} was forwarded");
    }
    // Exactly one framing header.
    let te = chunked.headers.get_all("transfer-encoding").iter().count();
    let cl = chunked.headers.get_all("content-length").iter().count();
    assert_eq!(te + cl, 1, "{:?}", chunked.headers);
    let sized = &seen[1];
    assert_eq!(sized.body, b"abcde");
    assert_eq!(sized.headers["content-length"], "5");
    assert!(!sized.headers.contains_key("transfer-encoding"));
}

/// Plain HTTP to a transform domain is forwarded WITHOUT injection.
#[tokio::test]
async fn plain_http_to_transform_domain_has_no_injection() {
    let p = policy(json!({
        "mode": "custom",
        "transforms": [{ "domain": "api.test", "inject_headers": { "x-api-key": "S3CRET" } }]
    }));
    let (h, _upstream, seen) = http_harness(p).await;
    let mut c = Raw::connect(h.addr).await;
    c.send(b"GET /v1 HTTP/1.1\r\nHost: api.test\r\nX-Api-Key: mine\r\n\r\n")
        .await;
    assert_eq!(c.response().await.unwrap().status, 200);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let values: Vec<_> = seen[0].headers.get_all("x-api-key").iter().collect();
    assert_eq!(values, vec!["mine"]);
}

/// Live update on HTTP: the next request is decided under the new policy,
/// and a connection whose last decision flipped to deny is closed.
#[tokio::test]
async fn http_connection_closes_when_its_name_is_revoked() {
    let (h, _upstream, seen) = http_harness(custom(&["allowed.test", "other.test"])).await;
    let mut c = Raw::connect(h.addr).await;
    c.send(b"GET /1 HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        .await;
    assert_eq!(c.response().await.unwrap().status, 200);
    let t0 = Instant::now();
    h.proxy.set_policy(custom(&["other.test"]));
    assert!(c.closed().await, "connection stayed open after revocation");
    assert!(t0.elapsed() < Duration::from_secs(1));
    let mut d = Raw::connect(h.addr).await;
    d.send(b"GET /2 HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        .await;
    assert_eq!(d.response().await.unwrap().status, 403);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// THREATS #24: a genuine 101 opens a tunnel; an upstream that answers 200
/// to an upgrade does not.
#[tokio::test]
async fn websocket_tunnels_only_on_genuine_101() {
    async fn read_head(c: &mut TcpStream) -> Vec<u8> {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if c.read(&mut b).await.unwrap_or(0) == 0 {
                break;
            }
            head.push(b[0]);
        }
        head
    }
    let ls = bind_same_port(&["127.0.0.2", "127.0.0.3"]).await;
    let mut ls = ls.into_iter();
    let real = serve_with(ls.next().unwrap(), |mut c| async move {
        let _ = read_head(&mut c).await;
        let _ = c
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\n")
            .await;
        let (mut r, mut w) = c.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    let after_200 = Arc::new(Mutex::new(Vec::<u8>::new()));
    let log = Arc::clone(&after_200);
    let fake = serve_with(ls.next().unwrap(), move |mut c| {
        let log = Arc::clone(&log);
        async move {
            let _ = read_head(&mut c).await;
            let _ = c
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
            let mut b = [0u8; 64];
            while let Ok(n) = c.read(&mut b).await {
                if n == 0 {
                    break;
                }
                log.lock().unwrap().extend_from_slice(&b[..n]);
            }
        }
    });
    let h = start(
        custom(&["ws.test", "fake.test"]),
        StaticResolver::new()
            .with("ws.test", [ip("127.0.0.2")])
            .with("fake.test", [ip("127.0.0.3")]),
        test_cfg(),
        real.addr,
        ip("127.0.0.1"),
    )
    .await;
    let upgrade = |host: &str| {
        format!(
            "GET /chat HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let mut c = Raw::connect(h.addr).await;
    c.send(upgrade("ws.test").as_bytes()).await;
    let r = c.response().await.unwrap();
    assert_eq!(r.status, 101);
    assert_eq!(r.header("upgrade"), Some("websocket"));
    c.send(b"\x81\x04ping").await;
    while c.buf.len() < 6 {
        assert!(c.fill().await, "tunnel closed");
    }
    assert_eq!(&c.buf[..6], b"\x81\x04ping");

    let mut f = Raw::connect(h.addr).await;
    f.send(upgrade("fake.test").as_bytes()).await;
    let r = f.response().await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    let _ = f.s.write_all(b"\x81\x04ping").await;
    assert!(f.closed().await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        after_200.lock().unwrap().is_empty(),
        "bytes after a 200 were tunnelled"
    );
    assert_eq!(fake.accepted(), 1);
}

/// THREATS #31: oversized heads get 431; a stalled second head is closed
/// by the header timeout.
#[tokio::test]
async fn oversized_and_stalled_heads() {
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let (server, seen) = http_upstream(up);
    let cfg = ProxyConfig {
        http_header_timeout: Duration::from_millis(300),
        ..test_cfg()
    };
    let h = start(
        custom(&["allowed.test"]),
        StaticResolver::new().with("allowed.test", [ip("127.0.0.2")]),
        cfg,
        server.addr,
        ip("127.0.0.1"),
    )
    .await;
    let mut many = b"GET / HTTP/1.1\r\nHost: allowed.test\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let mut big = b"GET / HTTP/1.1\r\nHost: allowed.test\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    for (what, bytes) in [("many", &many), ("big", &big)] {
        let mut c = Raw::connect(h.addr).await;
        let _ = c.s.write_all(bytes).await;
        let r = c
            .response()
            .await
            .unwrap_or_else(|| panic!("{what}: no response"));
        assert_eq!(r.status, 431, "{what}");
        // Pipelined after a good request.
        let mut c = Raw::connect(h.addr).await;
        let mut two = b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n".to_vec();
        two.extend_from_slice(bytes);
        let _ = c.s.write_all(&two).await;
        assert_eq!(c.response().await.unwrap().status, 200);
        let r = c
            .response()
            .await
            .unwrap_or_else(|| panic!("{what}: no 2nd response"));
        assert_eq!(r.status, 431, "{what} pipelined");
    }
    // Slowloris on the second head.
    let mut c = Raw::connect(h.addr).await;
    c.send(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        .await;
    assert_eq!(c.response().await.unwrap().status, 200);
    c.send(b"GET / HTTP/1.1\r\nHo").await;
    let t0 = Instant::now();
    while c.fill().await {}
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "stalled head kept open"
    );
    assert_eq!(seen.lock().unwrap().len(), 3);
}

/// A header count limit other than hyper's own 100 is the one enforced.
#[tokio::test]
async fn a_configured_header_count_limit_is_enforced() {
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let (server, seen) = http_upstream(up);
    let cfg = ProxyConfig {
        max_request_headers: 20,
        ..test_cfg()
    };
    let h = start(
        custom(&["allowed.test"]),
        StaticResolver::new().with("allowed.test", [ip("127.0.0.2")]),
        cfg,
        server.addr,
        ip("127.0.0.1"),
    )
    .await;
    for (extra, status) in [(15, 200), (25, 431)] {
        let mut head = b"GET / HTTP/1.1\r\nHost: allowed.test\r\n".to_vec();
        for i in 0..extra {
            head.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let mut c = Raw::connect(h.addr).await;
        c.send(&head).await;
        let r = c.response().await.expect("a response");
        assert_eq!(r.status, status, "{extra} extra headers");
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "only the head within the limit went upstream"
    );
}

mod intercept_tests;
