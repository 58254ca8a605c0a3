//! The recording origins the TLS-interception tests talk to, exercised
//! directly (client in a lab's host namespace → origin in its upstream
//! namespace, no proxy) with real clients: curl over HTTP/1.1 and HTTP/2,
//! grpcio, python websockets, rustls/hyper. Needs root (namespaces).

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use http::Version;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tollgate_tests::client::{https_get, Hello};
use tollgate_tests::http_client::{https_request, Proto, Req};
use tollgate_tests::lab::Lab;
use tollgate_tests::origin::{
    bad_cert_origins, big_sha256_hex, hex, CertKind, Handshake, Origin, OriginSpec, GRPC_STREAM,
    GRPC_UNARY,
};
use tollgate_tests::upstream::TestCa;

/// Debian's Python, which sees the apt modules (grpcio, websockets).
const PY: &str = "/usr/bin/python3";
const NAME: &str = "origin.test";
const ADDR: &str = "198.51.100.30";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

struct World {
    lab: Lab,
    ca: TestCa,
    origin: Origin,
}

fn world(tag: &str) -> World {
    let lab = Lab::new();
    let ca = TestCa::new(tag);
    lab.add_upstream_addr(ip(ADDR));
    let origin = Origin::start(
        &lab,
        &ca,
        OriginSpec::new(&[NAME, "alt.origin.test"], ip(ADDR)).http_ports(&[80]),
    );
    World { lab, ca, origin }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `argv` in the lab's host namespace.
fn run(lab: &Lab, argv: &[&str]) -> Run {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.host_ns])
        .args(argv)
        .output()
        .expect("ip netns exec");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// curl to `https://NAME...` at `addr`, trusting the test CA.
fn curl(w: &World, name: &str, addr: &str, extra: &[&str]) -> Run {
    let resolve = format!("{name}:443:{addr}");
    let mut argv = vec![
        "curl",
        "-sS",
        "--max-time",
        "60",
        "--cacert",
        w.ca.file.to_str().expect("ca path"),
        "--resolve",
        &resolve,
    ];
    argv.extend_from_slice(extra);
    run(&w.lab, &argv)
}

fn probe(script: &str) -> String {
    format!("{}/probe/{script}", env!("CARGO_MANIFEST_DIR"))
}

fn require_python_module(m: &str) {
    let ok = Command::new(PY)
        .args(["-c", &format!("import {m}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{PY} cannot import {m}: install the Debian packages with ./scripts/deps"
    );
}

/// (status line, headers, body) of `curl -i` output.
fn split_response(out: &str) -> (String, Vec<(String, String)>, String) {
    let (head, body) = out.split_once("\r\n\r\n").expect("response head");
    let mut lines = head.lines();
    let status = lines.next().unwrap_or("").to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn echo_over_http1_http2_and_cleartext_records_every_header() {
    let w = world("ofx-echo");
    for (flag, version, alpn) in [
        ("--http1.1", Version::HTTP_11, "http/1.1"),
        ("--http2", Version::HTTP_2, "h2"),
    ] {
        w.origin.clear();
        let r = curl(
            &w,
            NAME,
            ADDR,
            &[
                flag,
                "-i",
                "-H",
                "Authorization: Bearer sk-fixture",
                "-H",
                "X-Dup: one",
                "-H",
                "X-Dup: two",
                "-d",
                "payload",
                &format!("https://{NAME}/echo?q=1"),
            ],
        );
        assert_eq!(r.code, 0, "curl {flag}: {}", r.stderr);
        let (status, headers, body) = split_response(&r.stdout);
        assert!(status.contains("200"), "{status}");
        assert_eq!(
            values(&headers, "x-echo-authorization"),
            ["Bearer sk-fixture"]
        );
        assert_eq!(values(&headers, "x-echo-x-dup"), ["one", "two"]);
        assert_eq!(values(&headers, "x-origin"), [NAME]);
        let summary: Value = serde_json::from_str(&body).expect("echo json");
        assert_eq!(summary["body_len"], 7);
        assert_eq!(summary["alpn"], alpn);

        let reqs = w.origin.requests();
        assert_eq!(reqs.len(), 1, "{reqs:#?}");
        let q = &reqs[0];
        assert_eq!(q.method, "POST");
        assert_eq!(q.path, "/echo");
        assert_eq!(q.target, "/echo?q=1");
        assert_eq!(q.version, version);
        assert!(q.tls);
        assert_eq!(q.sni.as_deref(), Some(NAME));
        assert_eq!(q.alpn.as_deref(), Some(alpn));
        assert_eq!(q.authority.as_deref(), Some(NAME));
        assert_eq!(q.header("authorization"), Some("Bearer sk-fixture"));
        assert_eq!(q.header_all("x-dup"), ["one", "two"]);
        assert!(q.mentions("sk-fixture"));
        assert_eq!(q.body_len, 7);
        assert_eq!(q.body_sha256_hex(), hex(&Sha256::digest(b"payload")));
        let conns = w.origin.connections();
        assert_eq!(conns.len(), 1);
        assert_eq!(conns[0].handshake, Handshake::Done);
        assert!(conns[0].plain_in > 0 && conns[0].raw_in_after_handshake > 0);
    }

    // Cleartext port: h1, and h2 with prior knowledge.
    for flag in ["--http1.1", "--http2-prior-knowledge"] {
        w.origin.clear();
        let r = run(
            &w.lab,
            &[
                "curl",
                "-sS",
                "-i",
                flag,
                "-H",
                "X-Plain: yes",
                &format!("http://{ADDR}/echo"),
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let (_, headers, _) = split_response(&r.stdout);
        assert_eq!(values(&headers, "x-echo-x-plain"), ["yes"]);
        let q = &w.origin.requests()[0];
        assert!(!q.tls);
        assert_eq!(q.header("x-plain"), Some("yes"));
        assert_eq!(w.origin.connections()[0].handshake, Handshake::Plain);
    }
}

#[test]
fn request_and_response_trailers_and_authority_over_h2() {
    let w = world("ofx-trailers");
    let dst = SocketAddr::new(ip(ADDR), 443);
    let req = Req::post("/echo", b"with trailers".to_vec())
        .header("x-a", "1")
        .header("x-a", "2")
        .trailer("x-checksum", "abc123")
        .authority("alt.origin.test");
    let x = https_request(&w.lab.host_ns, dst, NAME, &w.ca.pem, Proto::Http2, &req)
        .expect("h2 exchange");
    assert_eq!(x.status, 200);
    assert_eq!(x.version, Version::HTTP_2);
    assert_eq!(x.alpn.as_deref(), Some("h2"));
    assert_eq!(x.header_all("x-echo-x-a"), ["1", "2"]);
    assert_eq!(x.leaf.as_ref(), Some(&w.origin.leaf));
    let q = &w.origin.requests()[0];
    assert_eq!(q.sni.as_deref(), Some(NAME));
    assert_eq!(q.authority.as_deref(), Some("alt.origin.test"));
    assert_eq!(q.trailer("x-checksum"), Some("abc123"));
    assert_eq!(q.body_len, 13);

    // gRPC trailers come back to a hyper client too.
    let mut msg = vec![0u8];
    msg.extend_from_slice(&3u32.to_be_bytes());
    msg.extend_from_slice(b"abc");
    let x = https_request(
        &w.lab.host_ns,
        dst,
        NAME,
        &w.ca.pem,
        Proto::Http2,
        &Req::post(GRPC_UNARY, msg.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers"),
    )
    .expect("grpc exchange");
    assert_eq!(x.status, 200);
    assert_eq!(x.body, msg);
    assert!(
        x.trailers.contains(&("grpc-status".into(), "0".into())),
        "{:?}",
        x.trailers
    );

    // HTTP/1.1 through the same client.
    let x = https_request(
        &w.lab.host_ns,
        dst,
        NAME,
        &w.ca.pem,
        Proto::Http1,
        &Req::get("/status/204"),
    )
    .expect("h1 exchange");
    assert_eq!(x.status, 204);
    assert_eq!(x.version, Version::HTTP_11);
}

#[test]
fn upload_8_mib_and_download_64_mib_over_h1_and_h2() {
    let w = world("ofx-bulk");
    let file = format!("/run/tollgate-tests/upload-{}.bin", std::process::id());
    let data: Vec<u8> = (0..8usize << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    std::fs::write(&file, &data).expect("write upload file");
    let want = hex(&Sha256::digest(&data));
    for flag in ["--http1.1", "--http2"] {
        w.origin.clear();
        let r = curl(
            &w,
            NAME,
            ADDR,
            &[
                flag,
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                &format!("@{file}"),
                &format!("https://{NAME}/upload"),
            ],
        );
        assert_eq!(r.code, 0, "{flag}: {}", r.stderr);
        let v: Value = serde_json::from_str(&r.stdout).expect("upload json");
        assert_eq!(v["sha256"], want.as_str(), "{flag}");
        assert_eq!(v["len"], 8 << 20);
        let q = &w.origin.requests_to("/upload")[0];
        assert_eq!(q.body_len, 8 << 20);
        assert_eq!(q.body_sha256_hex(), want);

        let resolve = format!("{NAME}:443:{ADDR}");
        let cmd = format!(
            "curl -sS --max-time 120 {flag} --cacert {} --resolve {resolve} https://{NAME}/big | sha256sum",
            w.ca.file.display()
        );
        let r = run(&w.lab, &["sh", "-c", &cmd]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(
            r.stdout.split_whitespace().next(),
            Some(big_sha256_hex().as_str()),
            "/big over {flag}"
        );
    }
    let _ = std::fs::remove_file(&file);
}

#[test]
fn redirect_status_and_default_routes() {
    let w = world("ofx-routes");
    let r = curl(
        &w,
        NAME,
        ADDR,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            &format!("https://{NAME}/redirect?to=https%3A%2F%2Fexample.test%2Fx%3Fa%3D1"),
        ],
    );
    assert_eq!(r.stdout, "302 https://example.test/x?a=1", "{}", r.stderr);
    let r = curl(&w, NAME, ADDR, &[&format!("https://{NAME}/anything")]);
    assert_eq!(r.stdout, format!("hello from {NAME}\n"));
    let r = curl(
        &w,
        NAME,
        ADDR,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://{NAME}/status/503"),
        ],
    );
    assert_eq!(r.stdout, "503");
}

#[test]
fn grpc_unary_and_bidi_stream_with_a_real_grpc_client() {
    require_python_module("grpc");
    let w = world("ofx-grpc");
    let ca = w.ca.file.to_str().expect("ca path").to_owned();
    let r = run(
        &w.lab,
        &[
            PY,
            &probe("grpc_call.py"),
            ADDR,
            "443",
            &ca,
            "--name",
            NAME,
            "--metadata",
            "authorization=Bearer sk-grpc",
            "--metadata",
            "x-trace=7",
        ],
    );
    assert_eq!(r.code, 0, "stdout {} stderr {}", r.stdout, r.stderr);
    let v: Value = serde_json::from_str(r.stdout.trim()).expect("grpc json");
    for call in ["unary", "stream"] {
        assert_eq!(v[call]["ok"], true, "{call}: {v}");
        assert_eq!(v[call]["code"], "OK", "{call}: {v}");
        assert!(
            v[call]["initial_metadata"]
                .as_array()
                .expect("metadata")
                .iter()
                .any(|m| m[0] == "x-echo-authorization" && m[1] == "Bearer sk-grpc"),
            "{v}"
        );
    }
    assert_eq!(v["stream"]["interleaved"], true);
    assert_eq!(v["stream"]["reply_hex"].as_array().map(Vec::len), Some(4));

    let reqs = w.origin.wait_requests(2, Duration::from_secs(5));
    let unary = reqs.iter().find(|q| q.path == GRPC_UNARY).expect("unary");
    let stream = reqs.iter().find(|q| q.path == GRPC_STREAM).expect("stream");
    for q in [unary, stream] {
        assert_eq!(q.version, Version::HTTP_2);
        assert_eq!(q.method, "POST");
        assert_eq!(q.authority.as_deref(), Some(NAME));
        assert_eq!(q.sni.as_deref(), Some(NAME));
        assert!(q
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/grpc")));
        assert_eq!(q.header("te"), Some("trailers"));
        assert_eq!(q.header("authorization"), Some("Bearer sk-grpc"));
        assert_eq!(q.header("x-trace"), Some("7"));
    }
    // 5-byte prefix + the 267-byte unary message.
    assert_eq!(unary.body_len, 5 + 267);
    assert!(stream.body_len > 200 * 1024);
}

#[test]
fn websocket_echo_with_a_real_client_over_tls_and_cleartext() {
    require_python_module("websockets");
    let w = world("ofx-ws");
    let ca = w.ca.file.to_str().expect("ca path").to_owned();
    let r = run(
        &w.lab,
        &[
            PY,
            &probe("ws_echo.py"),
            ADDR,
            "443",
            &ca,
            "--name",
            NAME,
            "--header",
            "Authorization=Bearer sk-ws",
        ],
    );
    assert_eq!(r.code, 0, "stdout {} stderr {}", r.stdout, r.stderr);
    let v: Value = serde_json::from_str(r.stdout.trim()).expect("ws json");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["close_code"], 1000, "{v}");
    let q = &w.origin.requests_to("/ws")[0];
    assert_eq!(q.version, Version::HTTP_11);
    assert_eq!(
        q.header("upgrade").map(str::to_ascii_lowercase),
        Some("websocket".into())
    );
    assert_eq!(q.header("authorization"), Some("Bearer sk-ws"));
    assert_eq!(q.sni.as_deref(), Some(NAME));
    // text, binary, three fragments.
    assert!(w.origin.ws_frames() >= 5, "{}", w.origin.ws_frames());

    let r = run(
        &w.lab,
        &[PY, &probe("ws_echo.py"), ADDR, "80", &ca, "--plain"],
    );
    assert_eq!(r.code, 0, "stdout {} stderr {}", r.stdout, r.stderr);
}

#[test]
fn bad_certificates_fail_verification_before_any_request_byte() {
    let w = world("ofx-bad");
    let addrs = [
        ip("198.51.100.40"),
        ip("198.51.100.41"),
        ip("198.51.100.42"),
    ];
    let bad = bad_cert_origins(&w.lab, &w.ca, "bad.test", addrs);
    let expect = [
        (CertKind::Expired, "certificate has expired"),
        (
            CertKind::WrongHost("not-bad.test".into()),
            "no alternative certificate subject name matches",
        ),
        (CertKind::SelfSigned, "self-signed certificate"),
    ];
    for (o, (kind, message)) in bad.iter().zip(expect) {
        assert_eq!(o.cert, kind);
        let addr = o.addr.to_string();
        for flag in ["--http1.1", "--http2"] {
            let r = curl(
                &w,
                "bad.test",
                &addr,
                &[
                    flag,
                    "-H",
                    "Authorization: Bearer sk-never",
                    "https://bad.test/echo",
                ],
            );
            assert_eq!(r.code, 60, "{kind:?} {flag}: {} {}", r.stdout, r.stderr);
            assert!(r.stderr.contains(message), "{kind:?}: {}", r.stderr);
        }
        // A rustls client refuses it too.
        let out = https_get(
            &w.lab.host_ns,
            SocketAddr::new(o.addr, 443),
            "bad.test",
            &w.ca.pem,
            "/echo",
            Hello::Normal,
        );
        assert!(!out.ok, "{kind:?}: {out:?}");
        assert!(
            out.error
                .as_deref()
                .is_some_and(|e| e.contains("invalid peer certificate")),
            "{kind:?}: {out:?}"
        );

        let conns = o.wait_connections_settled(3, Duration::from_secs(5));
        assert_eq!(conns.len(), 3, "{kind:?}: {conns:#?}");
        for c in &conns {
            assert!(c.raw_in > 0, "the ClientHello arrived: {c:?}");
            assert_eq!(c.plain_in, 0, "{kind:?}: {c:?}");
            // curl (OpenSSL) checks the name only after the handshake, then
            // hangs up without a request; every other refusal ends the
            // handshake itself.
            if kind == CertKind::Expired || kind == CertKind::SelfSigned {
                assert!(
                    matches!(c.handshake, Handshake::Failed(_)),
                    "{kind:?}: {c:?}"
                );
                assert_eq!(c.raw_in_after_handshake, 0, "{kind:?}: {c:?}");
            }
        }
        // rustls (as the proxy) refuses a wrong name in the handshake.
        assert!(
            matches!(conns[2].handshake, Handshake::Failed(_)),
            "{kind:?}: {:?}",
            conns[2]
        );
        assert_eq!(o.request_bytes(), 0);
        assert!(o.requests().is_empty());

        // Without verification the same origin serves: the zero above is
        // the client's refusal, not a dead origin.
        let r = curl(&w, "bad.test", &addr, &["-k", "https://bad.test/anything"]);
        assert_eq!(r.stdout, "hello from bad.test\n", "{}", r.stderr);
        assert!(o.request_bytes() > 0);
        assert_eq!(o.requests().len(), 1);
    }
}

#[test]
fn many_concurrent_h2_streams_with_h2load() {
    let w = world("ofx-h2load");
    let r = run(
        &w.lab,
        &[
            "h2load",
            "-n",
            "400",
            "-c",
            "4",
            "-m",
            "16",
            "-H",
            "x-load: 1",
            &format!("https://{ADDR}/echo"),
        ],
    );
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("400 succeeded"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    assert!(r.stdout.contains("h2"), "{}", r.stdout);
    let reqs = w.origin.requests();
    assert_eq!(reqs.len(), 400);
    assert!(reqs
        .iter()
        .all(|q| q.version == Version::HTTP_2 && q.header("x-load") == Some("1")));
    assert_eq!(w.origin.connection_count(), 4);
}
