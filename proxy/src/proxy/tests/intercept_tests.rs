//! Interception on loopback: a TLS origin (h1 + h2) that records what it
//! receives, the proxy with a sandbox CA, and hyper clients that trust only
//! that CA.

use ::http::{Request, StatusCode};
use http_body_util::Empty;

use super::*;
use crate::intercept::{Interception, SandboxCa, UpstreamTrust, REDACTED};

const SECRET: &str = "Bearer sk-live-0123456789abcdef";

/// What the origin saw: requests and raw application bytes per connection.
#[derive(Default)]
struct Origin {
    seen: Mutex<Vec<Seen>>,
    trailers: Mutex<Vec<::http::HeaderMap>>,
    versions: Mutex<Vec<::http::Version>>,
    handshakes: AtomicUsize,
}

/// A TLS origin for the names of `p` speaking h2 and http/1.1:
/// `/echo` echoes request headers as `x-echo-<name>`, `/redirect` answers
/// 302 to another host, anything else `200 ok <path>`.
fn tls_origin(l: TcpListener, p: &Pki) -> (Server, Arc<Origin>) {
    tls_origin_with(l, p, &[b"h2", b"http/1.1"], Duration::ZERO)
}

/// [`tls_origin`] offering `alpn`, waiting `delay` before each handshake.
fn tls_origin_with(
    l: TcpListener,
    p: &Pki,
    alpn: &[&[u8]],
    delay: Duration,
) -> (Server, Arc<Origin>) {
    let mut cfg = (*server_config(p)).clone();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let origin = Arc::new(Origin::default());
    let o = Arc::clone(&origin);
    let server = serve_with(l, move |c| {
        let acceptor = acceptor.clone();
        let o = Arc::clone(&o);
        async move {
            tokio::time::sleep(delay).await;
            let Ok(tls) = acceptor.accept(c).await else {
                return;
            };
            o.handshakes.fetch_add(1, Ordering::SeqCst);
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let o = Arc::clone(&o);
                async move {
                    let (parts, body) = req.into_parts();
                    let collected = body.collect().await?;
                    if let Some(t) = collected.trailers() {
                        o.trailers.lock().unwrap().push(t.clone());
                    }
                    let body = collected.to_bytes().to_vec();
                    let mut resp = ::http::Response::new(Full::new(Bytes::from(format!(
                        "ok {}",
                        parts.uri.path()
                    ))));
                    match parts.uri.path() {
                        "/echo" => {
                            for (n, v) in &parts.headers {
                                let name = format!("x-echo-{n}");
                                resp.headers_mut().append(
                                    ::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                                    v.clone(),
                                );
                            }
                        }
                        "/echo-body" => {
                            let mut text = String::new();
                            for (n, v) in &parts.headers {
                                text.push_str(&format!("{n}: {}\n", v.to_str().unwrap_or("")));
                            }
                            *resp.body_mut() = Full::new(Bytes::from(text));
                        }
                        "/slow" => tokio::time::sleep(Duration::from_millis(600)).await,
                        "/redirect" => {
                            *resp.status_mut() = StatusCode::FOUND;
                            resp.headers_mut().insert(
                                "location",
                                ::http::HeaderValue::from_static("https://elsewhere.test/x"),
                            );
                        }
                        _ => {}
                    }
                    o.versions.lock().unwrap().push(parts.version);
                    o.seen.lock().unwrap().push(Seen {
                        method: parts.method.to_string(),
                        uri: parts.uri.to_string(),
                        headers: parts.headers,
                        body,
                    });
                    Ok::<_, hyper::Error>(resp)
                }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
        }
    });
    (server, origin)
}

struct Setup {
    h: Harness,
    origin: Arc<Origin>,
    upstream: Server,
    ca: Arc<SandboxCa>,
}

fn transform_policy() -> Arc<CompiledPolicy> {
    policy(json!({
        "mode": "custom",
        "transforms": [{
            "domain": "api.test",
            "inject_headers": { "Authorization": SECRET },
            "strip_headers": ["x-api-key"]
        }]
    }))
}

async fn setup_with(origin_pki: &Pki, trust_pki: &Pki) -> Setup {
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    setup_on(tls_origin(up, origin_pki), trust_pki).await
}

/// The proxy in front of `origin`, trusting `trust_pki` upstream.
async fn setup_on((upstream, origin): (Server, Arc<Origin>), trust_pki: &Pki) -> Setup {
    let ca = Arc::new(SandboxCa::generate("sbx-test").unwrap());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust_pki.ca.clone()).unwrap();
    let ic = Interception::new(Arc::clone(&ca), UpstreamTrust::from_roots(roots).unwrap()).unwrap();
    let cfg = ProxyConfig {
        interception: Some(ic),
        ..test_cfg()
    };
    let h = start(
        transform_policy(),
        StaticResolver::new().with("api.test", [ip("127.0.0.2")]),
        cfg,
        upstream.addr,
        ip("127.0.0.1"),
    )
    .await;
    Setup {
        h,
        origin,
        upstream,
        ca,
    }
}

async fn setup() -> Setup {
    let p = pki(&["api.test"]);
    setup_with(&p, &p).await
}

/// A client that trusts only `ca`, offering `alpn`.
fn sandbox_client(ca: &SandboxCa, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

enum Client {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Client {
    async fn connect(s: &Setup, h2: bool) -> Self {
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = tls_connect(s.h.addr, sandbox_client(&s.ca, alpn), "api.test")
            .await
            .expect("the sandbox CA validates the minted leaf");
        let io = TokioIo::new(tls);
        if h2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Client::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Client::H1(send)
        }
    }

    /// GET `path` with `authority` as Host / `:authority` and `headers`.
    async fn get(
        &mut self,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, ::http::HeaderMap, Vec<u8>) {
        let mut b = Request::builder();
        b = match self {
            Client::H1(_) => b.uri(path).header("host", authority),
            Client::H2(_) => b
                .uri(format!("https://{authority}{path}"))
                .version(::http::Version::HTTP_2),
        };
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let req = b.body(Empty::new()).unwrap();
        let resp = bounded(async {
            match self {
                Client::H1(s) => s.send_request(req).await,
                Client::H2(s) => s.send_request(req).await,
            }
        })
        .await
        .unwrap();
        let (parts, body) = resp.into_parts();
        let body = bounded(body.collect()).await.unwrap().to_bytes().to_vec();
        (parts.status, parts.headers, body)
    }
}

async fn injects_and_strips(h2: bool) {
    let s = setup().await;
    let mut c = Client::connect(&s, h2).await;
    let (status, _, body) = c
        .get(
            "api.test",
            "/v1/models",
            &[
                ("authorization", "Bearer sandbox-own"),
                ("Authorization", "Basic c2FuZGJveA=="),
                ("proxy-authorization", "Basic cHJveHk="),
                ("x-api-key", "leak-1"),
                ("X-Api-Key", "leak-2"),
                ("accept", "application/json"),
                ("accept-encoding", "gzip"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"ok /v1/models");
    let seen = s.origin.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let got = &seen[0].headers;
    let auth: Vec<_> = got.get_all("authorization").iter().collect();
    assert_eq!(auth, vec![SECRET]);
    assert!(got.get("x-api-key").is_none());
    assert!(got.get("proxy-authorization").is_none());
    assert_eq!(got.get("accept").unwrap(), "application/json");
    // Responses must stay scannable for the secret.
    assert_eq!(got.get("accept-encoding").unwrap(), "identity");
    assert_eq!(seen[0].method, "GET");
}

#[tokio::test]
async fn http1_request_gets_injected_and_stripped() {
    injects_and_strips(false).await;
}

#[tokio::test]
async fn http2_request_gets_injected_and_stripped() {
    injects_and_strips(true).await;
}

#[tokio::test]
async fn authority_other_than_sni_is_421_and_nothing_goes_upstream() {
    let s = setup().await;
    for h2 in [false, true] {
        let mut c = Client::connect(&s, h2).await;
        let (status, headers, _) = c.get("other.test", "/", &[]).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "h2={h2}");
        assert_eq!(
            headers.get("x-tollgate-reason").unwrap(),
            "misdirected_request"
        );
        // A port other than the original destination's is misdirected too.
        let (status, _, _) = c.get("api.test:1", "/", &[]).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "h2={h2}");
        // The same connection still serves its own name.
        let (status, _, _) = c.get("api.test", "/ok", &[]).await;
        assert_eq!(status, StatusCode::OK, "h2={h2}");
    }
    let seen = s.origin.seen.lock().unwrap();
    assert_eq!(
        seen.iter()
            .map(|r| r.uri.as_str())
            .filter(|u| u.ends_with("/ok"))
            .count(),
        2
    );
    assert_eq!(
        seen.len(),
        2,
        "misdirected requests must not reach the upstream"
    );
}

#[tokio::test]
async fn the_sni_in_any_case_with_a_trailing_dot_or_its_port_is_served() {
    let s = setup().await;
    let port = s.upstream.addr.port();
    let forms = [
        "api.test".to_string(),
        "API.Test".to_string(),
        "api.test.".to_string(),
        format!("api.test:{port}"),
        format!("Api.TEST:{port}"),
    ];
    for h2 in [false, true] {
        let mut c = Client::connect(&s, h2).await;
        for form in &forms {
            let (status, headers, _) = c.get(form, "/ok", &[]).await;
            assert_eq!(status, StatusCode::OK, "h2={h2} authority {form}");
            assert!(headers.get("x-tollgate-reason").is_none());
        }
    }
    // Whatever case the sandbox wrote, the upstream is named as the SNI.
    let seen = s.origin.seen.lock().unwrap();
    assert_eq!(
        seen.len(),
        2 * forms.len(),
        "every form reached the origin once"
    );
    let with_port = format!("api.test:{port}");
    for r in seen.iter() {
        let named = match r.headers.get("host") {
            Some(h) => h.to_str().unwrap().to_string(),
            None => r
                .uri
                .parse::<::http::Uri>()
                .unwrap()
                .authority()
                .unwrap()
                .to_string(),
        };
        assert!(
            named == "api.test" || named == with_port,
            "upstream named {named:?}"
        );
    }
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let s = setup().await;
    let mut c = Client::connect(&s, false).await;
    let (status, headers, _) = c.get("api.test", "/redirect", &[]).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(headers.get("location").unwrap(), "https://elsewhere.test/x");
    assert_eq!(s.origin.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn echoed_secret_is_redacted_before_the_sandbox_sees_it() {
    let s = setup().await;
    for h2 in [false, true] {
        let mut c = Client::connect(&s, h2).await;
        let (status, headers, _) = c.get("api.test", "/echo", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers.get("x-echo-authorization").unwrap(),
            REDACTED,
            "h2={h2}"
        );
        for (n, v) in &headers {
            let v = v.to_str().unwrap_or("");
            assert!(!v.contains("sk-live"), "{n}: {v} leaked (h2={h2})");
        }
    }
}

#[tokio::test]
async fn upstream_certificate_from_an_unknown_ca_is_502_and_no_request_is_sent() {
    let origin = pki(&["api.test"]);
    let trusted = pki(&["api.test"]);
    let s = setup_with(&origin, &trusted).await;
    let mut c = Client::connect(&s, false).await;
    let (status, headers, _) = c.get("api.test", "/", &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    // Both test CAs have the same subject: the chain is found but its
    // signature does not verify.
    let reason = headers.get("x-tollgate-reason").unwrap().to_str().unwrap();
    assert!(reason.starts_with("upstream_cert_"), "{reason}");
    assert_eq!(s.origin.handshakes.load(Ordering::SeqCst), 0);
    assert!(s.origin.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn upstream_certificate_for_another_name_is_502() {
    let origin = pki(&["not-api.test"]);
    let s = setup_with(&origin, &origin).await;
    let mut c = Client::connect(&s, true).await;
    let (status, headers, _) = c.get("api.test", "/", &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        headers.get("x-tollgate-reason").unwrap(),
        "upstream_cert_wrong_name"
    );
    assert!(s.origin.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn upstream_connections_are_pooled_across_sandbox_connections() {
    let s = setup().await;
    for h2 in [true, true, false, false] {
        let mut c = Client::connect(&s, h2).await;
        for _ in 0..3 {
            let (status, _, _) = c.get("api.test", "/p", &[]).await;
            assert_eq!(status, StatusCode::OK);
        }
    }
    assert_eq!(s.origin.seen.lock().unwrap().len(), 12);
    // The upstream protocol mirrors the sandbox's: the first h2 client's
    // upstream h2 connection serves the second one after it (handed back
    // when the first ended), one kept-alive HTTP/1.1 connection serves both
    // HTTP/1.1 clients.
    assert_eq!(s.upstream.accepted(), 2);
    let versions = s.origin.versions.lock().unwrap().clone();
    assert!(
        versions[..6].iter().all(|v| *v == ::http::Version::HTTP_2),
        "{versions:?}"
    );
    assert!(
        versions[6..].iter().all(|v| *v == ::http::Version::HTTP_11),
        "{versions:?}"
    );
}

#[tokio::test]
async fn each_h2_sandbox_connection_gets_one_upstream_connection_of_its_own() {
    let s = setup().await;
    let a = Client::connect(&s, true).await;
    let b = Client::connect(&s, true).await;
    // Eight concurrent first streams on each, both connections open.
    let mut streams = Vec::new();
    for c in [&a, &b] {
        let Client::H2(send) = c else { unreachable!() };
        for i in 0..8 {
            let mut c = Client::H2(send.clone());
            streams.push(tokio::spawn(async move {
                c.get("api.test", &format!("/{i}"), &[]).await.0
            }));
        }
    }
    for t in streams {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(s.origin.seen.lock().unwrap().len(), 16);
    // Not one per stream (the first streams wait for one dial), not one
    // shared by both sandbox connections.
    assert_eq!(s.upstream.accepted(), 2);
    drop((a, b));
}

/// The server's first frames on a new h2 connection: its SETTINGS
/// parameters and the connection-level WINDOW_UPDATE increment, if any.
async fn h2_server_preface(s: &Setup) -> (Vec<(u16, u32)>, Option<u32>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_connect(s.h.addr, sandbox_client(&s.ca, &[b"h2"]), "api.test")
        .await
        .unwrap();
    // Client preface + an empty SETTINGS frame.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let (mut settings, mut conn_increment) = (None, None);
    while settings.is_none() || conn_increment.is_none() {
        let mut head = [0u8; 9];
        // The server writes its preface at once; a frame that does not
        // come within a second is not coming.
        let read = tokio::time::timeout(Duration::from_secs(1), tls.read_exact(&mut head));
        if !matches!(read.await, Ok(Ok(_))) {
            break;
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        bounded(tls.read_exact(&mut payload)).await.unwrap();
        match kind {
            // SETTINGS (not its ACK)
            0x4 if flags & 0x1 == 0 => {
                settings = Some(
                    payload
                        .chunks_exact(6)
                        .map(|c| {
                            (
                                u16::from_be_bytes([c[0], c[1]]),
                                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                            )
                        })
                        .collect::<Vec<_>>(),
                );
            }
            // WINDOW_UPDATE on the connection
            0x8 if stream == 0 => {
                conn_increment = Some(
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        & 0x7fff_ffff,
                );
            }
            _ => {}
        }
    }
    (settings.expect("a SETTINGS frame"), conn_increment)
}

#[tokio::test]
async fn h2_sandbox_connections_get_fixed_receive_windows() {
    let s = setup().await;
    let (settings, conn_increment) = h2_server_preface(&s).await;
    // SETTINGS_INITIAL_WINDOW_SIZE (0x4): 1 MiB per stream (an adaptive
    // window would start at 64 KiB and stay small on a short round trip).
    assert!(settings.contains(&(0x4, 1 << 20)), "{settings:?}");
    // SETTINGS_MAX_CONCURRENT_STREAMS (0x3).
    assert!(settings.contains(&(0x3, 100)), "{settings:?}");
    // The connection window grows from 65,535 to 2 MiB.
    assert_eq!(conn_increment, Some((2 << 20) - 65_535));
}

#[tokio::test]
async fn h2_streams_to_an_http1_only_upstream_dial_in_parallel() {
    // Every upstream handshake takes 300 ms, every /slow answer 600 ms;
    // the upstream offers no h2, so five concurrent streams need five
    // HTTP/1.1 connections (one is the idle one the first request left).
    let p = pki(&["api.test"]);
    let [up] = <[TcpListener; 1]>::try_from(bind_same_port(&["127.0.0.2"]).await).unwrap();
    let origin = tls_origin_with(up, &p, &[b"http/1.1"], Duration::from_millis(300));
    let s = setup_on(origin, &p).await;
    let c = Client::connect(&s, true).await;
    let Client::H2(send) = &c else { unreachable!() };
    // The first request learns that the upstream has no h2.
    let (status, _, _) = Client::H2(send.clone()).get("api.test", "/0", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let start = std::time::Instant::now();
    let streams: Vec<_> = (1..=5)
        .map(|_| {
            let mut c = Client::H2(send.clone());
            tokio::spawn(async move { c.get("api.test", "/slow", &[]).await.0 })
        })
        .collect();
    for t in streams {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    // In parallel: ~300 + 600 ms. Dialled one after another, the last
    // stream would start at 4 x 300 ms and end at 1,800 ms.
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1400), "{took:?}");
    let versions = s.origin.versions.lock().unwrap().clone();
    assert!(
        versions.iter().all(|v| *v == ::http::Version::HTTP_11),
        "{versions:?}"
    );
    assert_eq!(versions.len(), 6);
}

#[tokio::test]
async fn policy_update_applies_to_the_next_request_and_revokes_denied() {
    let s = setup().await;
    let mut c = Client::connect(&s, false).await;
    let (status, _, _) = c.get("api.test", "/1", &[]).await;
    assert_eq!(status, StatusCode::OK);
    // Still allowed, no transform any more: forwarded without injection.
    s.h.proxy.set_policy(custom(&["api.test"]));
    let (status, _, _) = c
        .get("api.test", "/2", &[("authorization", "Bearer sandbox-own")])
        .await;
    assert_eq!(status, StatusCode::OK);
    {
        let seen = s.origin.seen.lock().unwrap();
        assert_eq!(
            seen[1].headers.get("authorization").unwrap(),
            "Bearer sandbox-own"
        );
    }
    // Denied now: the open connection is closed at once.
    s.h.proxy.set_policy(custom(&["other.test"]));
    let Client::H1(mut send) = c else {
        unreachable!()
    };
    bounded(async {
        while !send.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(send
        .send_request(
            Request::builder()
                .uri("/3")
                .header("host", "api.test")
                .body(Empty::new())
                .unwrap()
        )
        .await
        .is_err());
    assert_eq!(s.origin.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn the_leaf_is_minted_once_for_many_connections() {
    let s = setup().await;
    for _ in 0..5 {
        let mut c = Client::connect(&s, false).await;
        c.get("api.test", "/", &[]).await;
    }
    let ic = s.h.proxy.config().interception.clone().unwrap();
    assert_eq!(ic.leaves().mints(), 1);
}

#[tokio::test]
async fn secret_echoed_in_a_body_is_masked_keeping_the_length() {
    let s = setup().await;
    for h2 in [false, true] {
        let mut c = Client::connect(&s, h2).await;
        let (status, headers, body) = c.get("api.test", "/echo-body", &[]).await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(!text.contains("sk-live"), "h2={h2}: {text}");
        assert!(text.contains("authorization: *****"), "h2={h2}: {text}");
        if let Some(len) = headers.get("content-length") {
            assert_eq!(len.to_str().unwrap(), body.len().to_string());
        }
    }
}

#[tokio::test]
async fn trace_and_connect_are_405_and_never_forwarded() {
    let s = setup().await;
    let Client::H1(mut send) = Client::connect(&s, false).await else {
        unreachable!()
    };
    for method in ["TRACE", "CONNECT"] {
        let uri = if method == "CONNECT" {
            "internal.test:22"
        } else {
            "/"
        };
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "api.test")
            .body(Empty::new())
            .unwrap();
        bounded(send.ready()).await.unwrap();
        let resp = bounded(send.send_request(req)).await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method}: {:?}",
            resp.headers()
        );
        let _ = bounded(resp.into_body().collect()).await;
    }
    assert!(s.origin.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_h1_head_over_the_limit_is_431_and_never_forwarded() {
    let s = setup().await;
    let mut c = Client::connect(&s, false).await;
    // 3 × 30 KB: more than the 64 KiB limit, in one write.
    let big = "a".repeat(30_000);
    let (status, _, _) = c
        .get(
            "api.test",
            "/",
            &[
                ("x-a", big.as_str()),
                ("x-b", big.as_str()),
                ("x-c", big.as_str()),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(s.origin.seen.lock().unwrap().is_empty());
    // Just under the limit still goes through.
    let mut c = Client::connect(&s, false).await;
    let ok = "a".repeat(20_000);
    let (status, _, _) = c
        .get(
            "api.test",
            "/",
            &[("x-a", ok.as_str()), ("x-b", ok.as_str())],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn request_trailers_lose_stripped_and_injected_names() {
    let s = setup().await;
    let alpn: &[&[u8]] = &[b"h2"];
    let tls = tls_connect(s.h.addr, sandbox_client(&s.ca, alpn), "api.test")
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut trailers = ::http::HeaderMap::new();
    trailers.insert("x-api-key", "in-trailer".parse().unwrap());
    trailers.insert("authorization", "Bearer smuggled".parse().unwrap());
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let body = WithTrailers {
        data: Some(Bytes::from_static(b"payload")),
        trailers: Some(trailers),
    };
    let req = Request::builder()
        .method("POST")
        .uri("https://api.test/t")
        .version(::http::Version::HTTP_2)
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let resp = bounded(send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = bounded(resp.into_body().collect()).await;
    let seen = s.origin.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, b"payload");
    assert_eq!(
        seen[0]
            .headers
            .get_all("authorization")
            .iter()
            .collect::<Vec<_>>(),
        vec![SECRET]
    );
    let t = s.origin.trailers.lock().unwrap();
    let t = t.first().expect("trailers reached the origin");
    assert_eq!(t.get("x-checksum").unwrap(), "abc");
    assert!(t.get("x-api-key").is_none());
    assert!(t.get("authorization").is_none());
}

/// A request body: one data frame, then trailers.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<::http::HeaderMap>,
}

impl hyper::body::Body for WithTrailers {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let frame = match self.data.take() {
            Some(d) => Some(hyper::body::Frame::data(d)),
            None => self.trailers.take().map(hyper::body::Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}
