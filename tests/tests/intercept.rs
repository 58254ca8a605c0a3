//! TLS interception for transform domains, end to end: a real daemon in a
//! closed lab, recording origins with certificates from a test CA (trusted
//! by the daemon through `[proxy] upstream_ca_file`), a scripted DNS server,
//! and real clients (curl, Python requests, Node fetch, a gRPC client, a
//! WebSocket client) run inside the sandbox with `process/execute` and only
//! the environment the runtime set. Assertions are on what the origins
//! received and what the clients saw.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate_tests::daemon::{Daemon, KEY_DEFAULT};
use tollgate_tests::origin::{big_sha256_hex, CertKind, Origin, OriginSpec, ECHO_PREFIX};
use tollgate_tests::upstream::{Answer, ScriptedDns, TestCa};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const DNS: &str = "198.51.100.53";
const SECRET: &str = "Bearer sk-tollgate-test-0123456789abcdef";
const SECRET_KEY: &str = "sk-tollgate-test-0123456789abcdef";
const REDACTED: &str = "[redacted by tollgate]";
/// Probe scripts, written into the sandbox (whose /tmp is private, so the
/// checkout's path may not be visible inside).
const WS_PROBE: &str = include_str!("../probe/ws_echo.py");
const GRPC_PROBE: &str = include_str!("../probe/grpc_call.py");

/// A shell prefix that writes `script` to `/tmp/<name>` inside the sandbox.
fn install(name: &str, script: &str) -> String {
    assert!(!script.contains("TOLLGATE_PROBE_EOF"));
    format!("cat > /tmp/{name} <<'TOLLGATE_PROBE_EOF'\n{script}\nTOLLGATE_PROBE_EOF\n")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

/// A daemon that trusts the test CA upstream, origins by name, a DNS server
/// that knows them.
struct World {
    d: Daemon,
    /// The origins' CA, PEM (tunnelled names present its certificates).
    test_ca_pem: String,
    origins: HashMap<String, Origin>,
    _dns: ScriptedDns,
    ca_file: PathBuf,
}

impl World {
    fn new(tag: &str, pool: &str, origins: Vec<(&str, &str, CertKind)>) -> Self {
        let ca = TestCa::new(tag);
        let ca_file = std::env::temp_dir().join(format!("tollgate-intercept-{tag}-ca.pem"));
        std::fs::write(&ca_file, &ca.pem).expect("write test CA");
        let config = format!(
            r#"
[network]
pool = "{pool}"

[dns]
upstreams = ["{DNS}:53"]

[proxy]
upstream_ca_file = "{}"
"#,
            ca_file.display()
        );
        let d = Daemon::start(tag, &config);
        let mut table = HashMap::new();
        let mut started = HashMap::new();
        for (name, addr, kind) in origins {
            let addr = ip(addr);
            d.lab.add_upstream_addr(addr);
            let spec = OriginSpec::new(&[name], addr).cert(kind);
            started.insert(name.to_string(), Origin::start(&d.lab, &ca, spec));
            table.insert(name.to_string(), Answer::Fixed(vec![addr], 60));
        }
        d.lab.add_upstream_addr(ip(DNS));
        let dns = ScriptedDns::start(&d.lab, ip(DNS), table);
        Self {
            d,
            test_ca_pem: ca.pem.clone(),
            origins: started,
            _dns: dns,
            ca_file,
        }
    }

    fn origin(&self, name: &str) -> &Origin {
        &self.origins[name]
    }

    fn sandbox(&mut self, policy: Value) -> String {
        self.d.create_sandbox(&policy)
    }

    /// Runs `/bin/sh -c command` in the sandbox: (exit code, stdout, stderr).
    fn sh(&mut self, id: &str, command: &str) -> (i64, String, String) {
        self.d.sh(id, command, 120)
    }

    /// Like [`Self::sh`], but the command must succeed; its stdout.
    fn ok(&mut self, id: &str, command: &str) -> String {
        let (code, out, err) = self.sh(id, command);
        assert_eq!(code, 0, "{command}\nstdout: {out}\nstderr: {err}");
        out
    }

    /// The sandbox's CA certificate as the sandbox itself fetches it from
    /// its gateway.
    fn ca_pem(&mut self, id: &str) -> String {
        let pem = self.ok(id, "curl -sS --fail http://10.0.2.2/ca.pem");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        pem
    }

    fn events(&mut self, id: &str) -> Vec<Value> {
        self.d.events(id)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca_file);
    }
}

fn transform_policy(extra_domains: &[&str]) -> Value {
    json!({
        "mode": "custom",
        "allow_domains": extra_domains,
        "transforms": [{
            "domain": "api.test",
            "inject_headers": { "Authorization": SECRET },
            "strip_headers": ["x-api-key"]
        }]
    })
}

/// The last request `origin` received on `path`.
fn last_to(o: &Origin, path: &str) -> tollgate_tests::origin::RequestRecord {
    o.wait_requests(1, Duration::from_secs(10));
    o.requests_to(path)
        .pop()
        .unwrap_or_else(|| panic!("{} received no request for {path}", o.name()))
}

#[test]
fn curl_h1_and_h2_get_the_injected_credential_and_64_mib_both_ways() {
    let _g = serial();
    let mut w = World::new(
        "icurl",
        "10.215.0.0/20",
        vec![("api.test", "198.51.100.30", CertKind::Valid)],
    );
    let id = w.sandbox(transform_policy(&[]));
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        // No --cacert, no -k: the runtime's environment is enough.
        let out = w.ok(
            &id,
            &format!(
                "curl -sS {flag} -o /dev/null -w '%{{http_code}} %{{http_version}}' \
                 -H 'Authorization: Bearer sandbox-own' -H 'X-Api-Key: leak-me' \
                 https://api.test/echo"
            ),
        );
        assert_eq!(out, format!("200 {version}"), "{flag}");
        let r = last_to(w.origin("api.test"), "/echo");
        assert_eq!(r.header_all("authorization"), vec![SECRET], "{flag}");
        assert!(
            r.header("x-api-key").is_none(),
            "{flag}: stripped header arrived"
        );
        assert!(
            !r.mentions("sandbox-own"),
            "{flag}: the sandbox's own value arrived"
        );
        assert!(!r.mentions("leak-me"), "{flag}");

        // 64 MiB down.
        let out = w.ok(
            &id,
            &format!("curl -sS {flag} https://api.test/big | sha256sum | cut -d' ' -f1"),
        );
        assert_eq!(out.trim(), big_sha256_hex(), "{flag}: download corrupted");

        // 64 MiB up.
        let out = w.ok(
            &id,
            &format!(
                "head -c 67108864 /dev/urandom > /tmp/up && sha256sum /tmp/up | cut -d' ' -f1 \
                 && curl -sS {flag} -H 'Content-Type: application/octet-stream' \
                 --data-binary @/tmp/up https://api.test/upload; rm -f /tmp/up"
            ),
        );
        let mut lines = out.lines();
        let sent = lines.next().expect("local sha256").trim().to_string();
        let answer: Value = serde_json::from_str(lines.next().expect("upload answer"))
            .unwrap_or_else(|e| panic!("{flag}: {e}: {out}"));
        assert_eq!(answer["len"], 67_108_864, "{flag}");
        assert_eq!(answer["sha256"], sent.as_str(), "{flag}: upload corrupted");
        let up = last_to(w.origin("api.test"), "/upload");
        assert_eq!(up.header_all("authorization"), vec![SECRET]);
    }

    // HTTP/1.1 chunked upload with `Expect: 100-continue`: the client gets
    // its 100 from the proxy, the body streams through intact.
    let out = w.ok(
        &id,
        "head -c 3000000 /dev/urandom > /tmp/up && sha256sum /tmp/up | cut -d' ' -f1 \
         && curl -sS --http1.1 -H 'Transfer-Encoding: chunked' -H 'Expect: 100-continue' \
         --data-binary @/tmp/up https://api.test/upload; rm -f /tmp/up",
    );
    let mut lines = out.lines();
    let sent = lines.next().expect("local sha256").trim().to_string();
    let answer: Value = serde_json::from_str(lines.next().expect("upload answer"))
        .unwrap_or_else(|e| panic!("chunked: {e}: {out}"));
    assert_eq!(answer["len"], 3_000_000);
    assert_eq!(answer["sha256"], sent.as_str(), "chunked upload corrupted");
}

#[test]
fn python_requests_and_node_fetch_work_with_no_flags() {
    let _g = serial();
    let mut w = World::new(
        "ilang",
        "10.215.16.0/20",
        vec![("api.test", "198.51.100.31", CertKind::Valid)],
    );
    let id = w.sandbox(transform_policy(&[]));
    let env = w.ok(
        &id,
        "echo $SSL_CERT_FILE $REQUESTS_CA_BUNDLE $NODE_EXTRA_CA_CERTS $CURL_CA_BUNDLE",
    );
    assert_eq!(
        env.split_whitespace().count(),
        4,
        "runtime environment: {env}"
    );

    let out = w.ok(
        &id,
        "/usr/bin/python3 -c \"import requests; r = requests.get('https://api.test/echo', \
         headers={'X-Client': 'python'}); print(r.status_code)\"",
    );
    assert_eq!(out.trim(), "200");
    let r = last_to(w.origin("api.test"), "/echo");
    assert_eq!(r.header("x-client"), Some("python"));
    assert_eq!(r.header_all("authorization"), vec![SECRET]);

    let out = w.ok(
        &id,
        "node -e \"fetch('https://api.test/echo', {headers: {'x-client': 'node'}}) \
         .then(r => console.log(r.status)) \
         .catch(e => { console.error(e); process.exit(1) })\"",
    );
    assert_eq!(out.trim(), "200");
    let r = last_to(w.origin("api.test"), "/echo");
    assert_eq!(r.header("x-client"), Some("node"));
    assert_eq!(r.header_all("authorization"), vec![SECRET]);
}

#[test]
fn misdirected_requests_get_421_and_redirects_never_carry_the_secret() {
    let _g = serial();
    let mut w = World::new(
        "imisdir",
        "10.215.32.0/20",
        vec![
            ("api.test", "198.51.100.32", CertKind::Valid),
            ("other.test", "198.51.100.33", CertKind::Valid),
        ],
    );
    let id = w.sandbox(transform_policy(&["other.test"]));
    for flag in ["--http1.1", "--http2"] {
        // curl sends a custom Host as HTTP/1.1 Host and as HTTP/2
        // :authority; the SNI stays api.test.
        let out = w.ok(
            &id,
            &format!(
                "curl -sS {flag} -o /dev/null -w '%{{http_code}}' -H 'Host: other.test' \
                 https://api.test/echo"
            ),
        );
        assert_eq!(out, "421", "{flag}");
    }
    assert!(w.origin("api.test").requests().is_empty());
    assert!(w.origin("other.test").requests().is_empty());
    let evs = w.events(&id);
    assert!(
        evs.iter().any(|e| e["reason"] == "misdirected_request"),
        "421 not reported: {evs:#?}"
    );

    // A 302 to another host reaches the client as it is ...
    let to = "https://other.test/echo";
    let out = w.ok(
        &id,
        &format!(
            "curl -sS -o /dev/null -w '%{{http_code}} %{{redirect_url}}' \
             'https://api.test/redirect?to={to}'"
        ),
    );
    assert_eq!(out, format!("302 {to}"));
    assert!(
        w.origin("other.test").requests().is_empty(),
        "the proxy followed a redirect"
    );
    // ... and when the client follows it, the other host (a tunnel: its
    // own certificate, so the client also trusts the origins' CA) gets no
    // secret.
    let pem = w.test_ca_pem.clone();
    let out = w.ok(
        &id,
        &format!(
            "cat \"$SSL_CERT_FILE\" - > /tmp/all.pem <<'EOF'\n{pem}EOF\n\
             curl -sS -L --cacert /tmp/all.pem -o /dev/null -w '%{{http_code}}' \
             'https://api.test/redirect?to={to}'"
        ),
    );
    assert_eq!(out, "200");
    let r = last_to(w.origin("other.test"), "/echo");
    assert!(
        !r.mentions(SECRET_KEY),
        "the secret reached another host: {r:?}"
    );
}

#[test]
fn bad_upstream_certificates_are_502_and_the_upstream_gets_no_request_byte() {
    let _g = serial();
    let mut w = World::new(
        "ibadcert",
        "10.215.48.0/20",
        vec![
            ("expired.test", "198.51.100.34", CertKind::Expired),
            (
                "wronghost.test",
                "198.51.100.35",
                CertKind::WrongHost("not-wronghost.test".into()),
            ),
            ("selfsigned.test", "198.51.100.36", CertKind::SelfSigned),
        ],
    );
    let transforms: Vec<Value> = ["expired.test", "wronghost.test", "selfsigned.test"]
        .iter()
        .map(|d| json!({"domain": d, "inject_headers": {"Authorization": SECRET}}))
        .collect();
    let id = w.sandbox(json!({"mode": "custom", "transforms": transforms}));
    for (name, reason) in [
        ("expired.test", "upstream_cert_expired"),
        ("wronghost.test", "upstream_cert_wrong_name"),
        ("selfsigned.test", "upstream_cert_unknown_issuer"),
    ] {
        let out = w.ok(
            &id,
            &format!(
                "curl -sS -D - -o /dev/null -H 'X-Probe: 1' https://{name}/secret-path \
                 | tr -d '\\r'"
            ),
        );
        assert!(
            out.starts_with("HTTP/1.1 502") || out.starts_with("HTTP/2 502"),
            "{name}: {out}"
        );
        assert!(
            out.to_ascii_lowercase()
                .contains(&format!("x-tollgate-reason: {reason}")),
            "{name}: {out}"
        );
        let o = w.origin(name);
        assert_eq!(o.request_bytes(), 0, "{name} received request bytes");
        assert!(o.requests().is_empty(), "{name} received a request");
    }
}

#[test]
fn websocket_and_grpc_work_through_interception() {
    let _g = serial();
    let mut w = World::new(
        "iwsgrpc",
        "10.215.64.0/20",
        vec![("api.test", "198.51.100.37", CertKind::Valid)],
    );
    let id = w.sandbox(transform_policy(&[]));
    let out = w.ok(
        &id,
        &format!(
            "{}/usr/bin/python3 /tmp/ws_echo.py api.test 443 \"$SSL_CERT_FILE\"",
            install("ws_echo.py", WS_PROBE)
        ),
    );
    let ws: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        w.origin("api.test").ws_frames() > 0,
        "no frame reached the origin: {ws}"
    );
    let up = last_to(w.origin("api.test"), "/ws");
    assert_eq!(up.header_all("authorization"), vec![SECRET]);

    let out = w.ok(
        &id,
        &format!(
            "{}/usr/bin/python3 /tmp/grpc_call.py api.test 443 \"$SSL_CERT_FILE\" --messages 5",
            install("grpc_call.py", GRPC_PROBE)
        ),
    );
    let g: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let calls = w.origin("api.test").requests();
    let grpc: Vec<_> = calls
        .iter()
        .filter(|r| r.path.starts_with("/grpc.test.Echo/"))
        .collect();
    assert!(
        grpc.len() >= 2,
        "unary + stream expected at the origin: {g}"
    );
    for r in grpc {
        assert_eq!(r.header_all("authorization"), vec![SECRET]);
        assert_eq!(r.header("te"), Some("trailers"), "gRPC needs te: trailers");
    }
    // The client saw the echoed metadata redacted.
    assert!(
        !out.contains(SECRET_KEY),
        "secret leaked to the gRPC client: {out}"
    );
}

#[test]
fn another_sandboxs_ca_does_not_validate_this_sandboxs_leaf() {
    let _g = serial();
    let mut w = World::new(
        "icaiso",
        "10.215.80.0/20",
        vec![("api.test", "198.51.100.38", CertKind::Valid)],
    );
    let a = w.sandbox(transform_policy(&[]));
    let b = w.sandbox(transform_policy(&[]));
    let a_pem = w.ca_pem(&a);
    let b_pem = w.ca_pem(&b);
    assert_ne!(a_pem, b_pem, "two sandboxes share a CA");
    for (name, pem, expect) in [("own", &a_pem, 0), ("other", &b_pem, 60)] {
        let (code, out, err) = w.sh(
            &a,
            &format!(
                "cat > /tmp/ca.pem <<'EOF'\n{pem}EOF\n\
                 curl -sS -o /dev/null -w '%{{http_code}}' --cacert /tmp/ca.pem https://api.test/"
            ),
        );
        assert_eq!(code, expect, "{name} CA: {out} {err}");
    }
}

#[test]
fn an_echoed_secret_never_reaches_the_sandbox() {
    let _g = serial();
    let mut w = World::new(
        "iredact",
        "10.215.96.0/20",
        vec![("api.test", "198.51.100.39", CertKind::Valid)],
    );
    let id = w.sandbox(transform_policy(&[]));
    for flag in ["--http1.1", "--http2"] {
        let out = w.ok(
            &id,
            &format!("curl -sS {flag} -D - -o /dev/null https://api.test/echo"),
        );
        let lower = out.to_ascii_lowercase();
        assert!(
            lower.contains(&format!("{ECHO_PREFIX}authorization: {}", REDACTED)),
            "{flag}: {out}"
        );
        assert!(
            !out.contains(SECRET_KEY),
            "{flag}: secret in response headers: {out}"
        );
    }
    // The origin's /echo body (a JSON summary of the request headers)
    // reaches the sandbox with the value masked.
    let body = w.ok(&id, "curl -sS https://api.test/echo");
    assert!(body.contains("authorization"), "{body}");
    assert!(
        !body.contains(SECRET_KEY),
        "secret in a response body: {body}"
    );
    // Events, the daemon's log and the API never carry the value either.
    let evs = serde_json::to_string(&w.events(&id)).expect("json");
    assert!(!evs.contains(SECRET_KEY));
    assert!(
        !w.d.log().contains(SECRET_KEY),
        "the secret is in the daemon's log"
    );
    let got = w.d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/"),
        "/v1/sandbox/{id}/",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(got.status, StatusCode::OK);
    assert!(
        !got.body.to_string().contains(SECRET_KEY),
        "the API returned the secret: {}",
        got.body
    );
}
