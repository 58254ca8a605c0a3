//! Origins for proxy tests, inside a [`Lab`]'s upstream namespace: TLS
//! servers for several names with certificates from a test CA, and a scripted
//! authoritative DNS server that records every query it receives.
//!
//! The TLS origin answers `GET /big` with 64 MiB of deterministic bytes and
//! anything else with `hello from <name>`; it counts the connections and
//! request bytes it received.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::lab::{in_netns, Lab};

/// Size of the `/big` body.
pub const BIG: usize = 64 << 20;

/// The deterministic `/big` body's byte at `i`.
pub fn big_byte(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 13)) as u8
}

/// A certificate authority for test origins.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// PEM of the CA certificate.
    pub pem: String,
    /// The PEM written to a world-readable file (for clients in sandboxes).
    pub file: PathBuf,
}

impl TestCa {
    /// A new CA.
    pub fn new(tag: &str) -> Self {
        let key = rcgen::KeyPair::generate().expect("ca key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tollgate test origin CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).expect("self-sign ca");
        let pem = cert.pem();
        let file = PathBuf::from(format!(
            "/run/tollgate-tests/ca-{tag}-{}.pem",
            std::process::id()
        ));
        std::fs::create_dir_all("/run/tollgate-tests").expect("mkdir");
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(
                "/run/tollgate-tests",
                std::fs::Permissions::from_mode(0o755),
            );
            std::fs::write(&file, &pem).expect("write ca");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))
                .expect("chmod ca");
        }
        Self {
            issuer: rcgen::Issuer::new(params, key),
            pem,
            file,
        }
    }

    /// A server certificate chain and key for `name`.
    pub fn leaf(&self, name: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params =
            rcgen::CertificateParams::new(vec![name.to_string()]).expect("leaf params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// A certificate for `params` (names, validity, usages as given) signed
    /// by this CA, with a fresh key.
    pub fn sign(
        &self,
        params: &rcgen::CertificateParams,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// What an origin received.
#[derive(Default)]
pub struct OriginLog {
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Request heads received (first line + headers).
    pub requests: Mutex<Vec<String>>,
    /// `/big` answers cut short because the connection failed under them.
    pub aborted: AtomicUsize,
}

/// A TLS origin for one name, on `addr` ports 443 and 8443.
pub struct TlsOrigin {
    /// The name its certificate is for.
    pub name: String,
    /// Its address.
    pub addr: IpAddr,
    /// What it received.
    pub log: Arc<OriginLog>,
    /// Its leaf certificate (what a client of an untouched tunnel sees).
    pub leaf: CertificateDer<'static>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl TlsOrigin {
    /// Starts an origin for `name` at `addr` (which must be local in the
    /// lab's upstream namespace, see [`Lab::add_upstream_addr`]).
    pub fn start(lab: &Lab, ca: &TestCa, name: &str, addr: IpAddr) -> Self {
        let (chain, key) = ca.leaf(name);
        let leaf = chain[0].clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server cert");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let log = Arc::new(OriginLog::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for port in [443u16, 8443] {
            let listener = in_netns(&lab.up_ns, move || {
                let l =
                    std::net::TcpListener::bind(SocketAddr::new(addr, port)).expect("bind origin");
                l.set_nonblocking(true).expect("nonblocking");
                l
            });
            let (acceptor, log, stop, name) = (
                acceptor.clone(),
                log.clone(),
                stop.clone(),
                name.to_string(),
            );
            threads.push(std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    while !stop.load(Ordering::Relaxed) {
                        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
                        let Ok(Ok((tcp, _))) = accepted else { continue };
                        log.connections.fetch_add(1, Ordering::SeqCst);
                        let (acceptor, log, name) = (acceptor.clone(), log.clone(), name.clone());
                        tokio::spawn(async move {
                            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                            let mut head = Vec::new();
                            let mut b = [0u8; 4096];
                            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                                match tls.read(&mut b).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => head.extend_from_slice(&b[..n]),
                                }
                            }
                            let text = String::from_utf8_lossy(&head).into_owned();
                            if let Ok(mut r) = log.requests.lock() {
                                r.push(text.clone());
                            }
                            if text.starts_with("GET /big ") {
                                let _ = tls
                                    .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\nconnection: close\r\n\r\n").as_bytes())
                                    .await;
                                let mut chunk = vec![0u8; 1 << 16];
                                let mut i = 0;
                                while i < BIG {
                                    for (k, c) in chunk.iter_mut().enumerate() {
                                        *c = big_byte(i + k);
                                    }
                                    if tls.write_all(&chunk).await.is_err() {
                                        log.aborted.fetch_add(1, Ordering::SeqCst);
                                        return;
                                    }
                                    i += chunk.len();
                                }
                            } else {
                                let body = format!("hello from {name}\n");
                                let _ = tls
                                    .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes())
                                    .await;
                            }
                            let _ = tls.shutdown().await;
                        });
                    }
                });
            }));
        }
        Self {
            name: name.to_string(),
            addr,
            log,
            leaf,
            stop,
            threads,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.log.connections.load(Ordering::SeqCst)
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One scripted answer set for a name.
#[derive(Clone, Debug)]
pub enum Answer {
    /// These addresses, with this TTL.
    Fixed(Vec<IpAddr>, u32),
    /// Alternate between the lists on every query (TTL 0): DNS rebinding.
    Rebind(Vec<IpAddr>, Vec<IpAddr>),
}

/// A scripted authoritative DNS server (UDP) that records every query.
pub struct ScriptedDns {
    /// Its address (port 53).
    pub addr: IpAddr,
    queries: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ScriptedDns {
    /// Starts it at `addr`:53 in the lab's upstream namespace; names not in
    /// `table` get NXDOMAIN.
    pub fn start(lab: &Lab, addr: IpAddr, table: HashMap<String, Answer>) -> Self {
        let sock = in_netns(&lab.up_ns, move || {
            let s = std::net::UdpSocket::bind(SocketAddr::new(addr, 53)).expect("bind dns");
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            s
        });
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, st) = (queries.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut flips: HashMap<String, usize> = HashMap::new();
            let mut buf = [0u8; 1500];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Some((id, qname, qtype, qend)) = parse_query(&buf[..n]) else {
                    continue;
                };
                if let Ok(mut v) = q.lock() {
                    v.push(qname.clone());
                }
                let (addrs, ttl, found) = match table.get(&qname) {
                    Some(Answer::Fixed(a, ttl)) => (a.clone(), *ttl, true),
                    Some(Answer::Rebind(x, y)) => {
                        let k = flips.entry(qname.clone()).or_insert(0);
                        *k += 1;
                        (if *k % 2 == 1 { x.clone() } else { y.clone() }, 0, true)
                    }
                    None => (Vec::new(), 0, false),
                };
                let reply = build_reply(id, &buf[12..qend], qtype, &addrs, ttl, found);
                let _ = sock.send_to(&reply, from);
            }
        });
        Self {
            addr,
            queries,
            stop,
            thread: Some(thread),
        }
    }

    /// Every query name received, in order.
    pub fn queries(&self) -> Vec<String> {
        self.queries.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// How many queries for `name` (or names under it) arrived.
    pub fn count(&self, name: &str) -> usize {
        self.queries()
            .iter()
            .filter(|q| q.as_str() == name || q.ends_with(&format!(".{name}")))
            .count()
    }
}

impl Drop for ScriptedDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// (id, lower-case name without trailing dot, qtype, end of question).
fn parse_query(p: &[u8]) -> Option<(u16, String, u16, usize)> {
    if p.len() < 12 || u16::from_be_bytes([p[4], p[5]]) != 1 {
        return None;
    }
    let id = u16::from_be_bytes([p[0], p[1]]);
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*p.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(p.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*p.get(i)?, *p.get(i + 1)?]);
    Some((id, labels.join("."), qtype, i + 4))
}

fn build_reply(
    id: u16,
    question: &[u8],
    qtype: u16,
    addrs: &[IpAddr],
    ttl: u32,
    found: bool,
) -> Vec<u8> {
    let answers: Vec<&IpAddr> = addrs
        .iter()
        .filter(|a| (qtype == 1 && a.is_ipv4()) || (qtype == 28 && a.is_ipv6()))
        .collect();
    let mut out = Vec::new();
    let rcode: u16 = if found { 0 } else { 3 };
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(0x8400u16 | rcode).to_be_bytes()); // QR, AA
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for a in answers {
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        match a {
            IpAddr::V4(v) => {
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&v.octets());
            }
            IpAddr::V6(v) => {
                out.extend_from_slice(&16u16.to_be_bytes());
                out.extend_from_slice(&v.octets());
            }
        }
    }
    let _ = std::io::sink().write_all(&out);
    out
}
