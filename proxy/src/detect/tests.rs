//! Tests of protocol detection: real rustls ClientHellos, hand-built and
//! malformed hellos, HTTP heads from THREATS #6 / #22, and `detect` over
//! loopback sockets.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ActiveKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, NamedGroup, SignatureScheme, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

// ---------------------------------------------------------------------------
// Fixtures: rustls-generated hellos
// ---------------------------------------------------------------------------

/// A verifier that is never reached: the handshake stops after the hello.
#[derive(Debug)]
struct NoVerify;

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General("test fixture".into()))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("test fixture".into()))
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("test fixture".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA256,
        ]
    }
}

/// Size of an X25519MLKEM768 client key share (ML-KEM-768 encapsulation key
/// + X25519 public key).
const MLKEM_SHARE_LEN: usize = 1184 + 32;

/// A key-exchange group that names X25519MLKEM768 and offers a share of the
/// real size, so rustls (ring provider, which has no ML-KEM) emits a
/// post-quantum-sized hello. Never completes.
#[derive(Debug)]
struct FakeMlKem;

#[derive(Debug)]
struct FakeMlKemShare(Vec<u8>);

static FAKE_MLKEM: FakeMlKem = FakeMlKem;

impl SupportedKxGroup for FakeMlKem {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        Ok(Box::new(FakeMlKemShare(vec![0x5a; MLKEM_SHARE_LEN])))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: rustls::ProtocolVersion) -> bool {
        version == rustls::ProtocolVersion::TLSv1_3
    }
}

impl ActiveKeyExchange for FakeMlKemShare {
    fn complete(self: Box<Self>, _: &[u8]) -> Result<SharedSecret, rustls::Error> {
        Err(rustls::Error::General("test fixture".into()))
    }

    fn pub_key(&self) -> &[u8] {
        &self.0
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

static TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

struct RustlsHello {
    sni: Option<&'static str>,
    alpn: &'static [&'static [u8]],
    versions: &'static [&'static SupportedProtocolVersion],
    pq: bool,
}

/// The TLS records rustls writes for its first flight.
fn rustls_hello(spec: &RustlsHello) -> Vec<u8> {
    let mut provider = rustls::crypto::ring::default_provider();
    if spec.pq {
        provider.kx_groups.insert(0, &FAKE_MLKEM);
    }
    let provider: Arc<CryptoProvider> = Arc::new(provider);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(spec.versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify))
        .with_no_client_auth();
    config.alpn_protocols = spec.alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_sni = spec.sni.is_some();
    let name = ServerName::try_from(spec.sni.unwrap_or("no-sni.example").to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

fn default_hello() -> Vec<u8> {
    rustls_hello(&RustlsHello {
        sni: Some("api.example.com"),
        alpn: &[b"h2", b"http/1.1"],
        versions: rustls::ALL_VERSIONS,
        pq: false,
    })
}

// ---------------------------------------------------------------------------
// Fixtures: hand-built hellos
// ---------------------------------------------------------------------------

const EXT_SNI: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_PADDING: u16 = 21;
const EXT_SESSION_TICKET: u16 = 35;
const EXT_PSK: u16 = 41;
const EXT_VERSIONS: u16 = 43;
const EXT_KEY_SHARE: u16 = 51;

fn be16(v: usize) -> [u8; 2] {
    u16::try_from(v).unwrap().to_be_bytes()
}

/// `u16 length || data`.
fn vec16(data: &[u8]) -> Vec<u8> {
    let mut v = be16(data.len()).to_vec();
    v.extend_from_slice(data);
    v
}

/// `u8 length || data`.
fn vec8(data: &[u8]) -> Vec<u8> {
    let mut v = vec![u8::try_from(data.len()).unwrap()];
    v.extend_from_slice(data);
    v
}

/// server_name extension data with the given (type, name) entries.
fn sni_data(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (typ, name) in entries {
        list.push(*typ);
        list.extend(vec16(name));
    }
    vec16(&list)
}

fn alpn_data(protos: &[&[u8]]) -> Vec<u8> {
    let list: Vec<u8> = protos.iter().flat_map(|p| vec8(p)).collect();
    vec16(&list)
}

fn versions_data(versions: &[u16]) -> Vec<u8> {
    let list: Vec<u8> = versions.iter().flat_map(|v| v.to_be_bytes()).collect();
    vec8(&list)
}

/// key_share data with (group, share length) entries.
fn key_share_data(shares: &[(u16, usize)]) -> Vec<u8> {
    let mut list = Vec::new();
    for (group, len) in shares {
        list.extend(group.to_be_bytes());
        list.extend(vec16(&vec![0x33; *len]));
    }
    vec16(&list)
}

#[derive(Clone)]
struct Hello {
    handshake_type: u8,
    legacy_version: u16,
    session_id: Vec<u8>,
    suites: Vec<u8>,
    compression: Vec<u8>,
    /// `None`: no extensions block at all (TLS ≤ 1.2 style).
    extensions: Option<Vec<(u16, Vec<u8>)>>,
}

impl Hello {
    /// A TLS 1.3 hello with GREASE, SNI `name`, ALPN h2 and an X25519 share.
    fn with_sni(name: &[u8]) -> Self {
        Self::bare().ext(EXT_SNI, sni_data(&[(0, name)]))
    }

    fn bare() -> Self {
        Self {
            handshake_type: 1,
            legacy_version: 0x0303,
            session_id: vec![7; 32],
            suites: vec![0x0a, 0x0a, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f],
            compression: vec![0],
            extensions: Some(vec![
                (0x0a0a, Vec::new()),
                (EXT_VERSIONS, versions_data(&[0x2a2a, 0x0304, 0x0303])),
                (EXT_ALPN, alpn_data(&[b"h2"])),
                (EXT_KEY_SHARE, key_share_data(&[(0x001d, 32)])),
            ]),
        }
    }

    fn ext(mut self, typ: u16, data: Vec<u8>) -> Self {
        self.extensions
            .get_or_insert_with(Vec::new)
            .push((typ, data));
        self
    }

    /// The body without the handshake header.
    fn body(&self) -> Vec<u8> {
        let mut b = self.legacy_version.to_be_bytes().to_vec();
        b.extend([0x11; 32]);
        b.extend(vec8(&self.session_id));
        b.extend(vec16(&self.suites));
        b.extend(vec8(&self.compression));
        if let Some(exts) = &self.extensions {
            let mut block = Vec::new();
            for (typ, data) in exts {
                block.extend(typ.to_be_bytes());
                block.extend(vec16(data));
            }
            b.extend(vec16(&block));
        }
        b
    }

    /// The handshake message.
    fn message(&self) -> Vec<u8> {
        handshake(self.handshake_type, &self.body())
    }

    /// The message in one record.
    fn wire(&self) -> Vec<u8> {
        records(&self.message(), &[usize::MAX])
    }
}

fn handshake(typ: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap().to_be_bytes();
    let mut m = vec![typ, len[1], len[2], len[3]];
    m.extend_from_slice(body);
    m
}

fn record(content_type: u8, version: u16, payload: &[u8]) -> Vec<u8> {
    let mut r = vec![content_type];
    r.extend(version.to_be_bytes());
    r.extend(be16(payload.len()));
    r.extend_from_slice(payload);
    r
}

/// Frames `msg` into handshake records of the given sizes (the last size
/// repeats; the final record takes the rest).
fn records(msg: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = msg;
    let mut i = 0;
    while !rest.is_empty() {
        let want = sizes.get(i).or(sizes.last()).copied().unwrap_or(usize::MAX);
        let n = want.min(rest.len()).min(16_384);
        let (chunk, tail) = rest.split_at(n);
        out.extend(record(22, 0x0301, chunk));
        rest = tail;
        i += 1;
    }
    out
}

/// Extracts the handshake message from single- or multi-record wire bytes
/// (test helper; assumes well-formed input).
fn unframe(wire: &[u8]) -> Vec<u8> {
    let mut msg = Vec::new();
    let mut rest = wire;
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        msg.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    msg
}

fn parse_ok(wire: &[u8]) -> ClientHelloInfo {
    match parse_client_hello(wire) {
        Ok(Some(info)) => info,
        other => panic!("expected a hello, got {other:?}"),
    }
}

fn tls_err(wire: &[u8]) -> &'static str {
    match parse_client_hello(wire) {
        Err(DetectError::BadTls(d)) => d,
        Err(DetectError::TooLarge) => "too_large",
        other => panic!("expected an error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// TLS: real hellos
// ---------------------------------------------------------------------------

#[test]
fn rustls_hellos_parse() {
    struct Case {
        name: &'static str,
        spec: RustlsHello,
        sni: Option<&'static str>,
        alpn: &'static [&'static [u8]],
        versions: &'static [u16],
        min_len: usize,
    }
    let cases = [
        Case {
            name: "plain sni",
            spec: RustlsHello {
                sni: Some("api.example.com"),
                alpn: &[],
                versions: rustls::ALL_VERSIONS,
                pq: false,
            },
            sni: Some("api.example.com"),
            alpn: &[],
            versions: &[0x0304, 0x0303],
            min_len: 100,
        },
        Case {
            name: "upper-case sni is lower-cased",
            spec: RustlsHello {
                sni: Some("API.Example.COM"),
                alpn: &[],
                versions: rustls::ALL_VERSIONS,
                pq: false,
            },
            sni: Some("api.example.com"),
            alpn: &[],
            versions: &[0x0304, 0x0303],
            min_len: 100,
        },
        Case {
            name: "no sni",
            spec: RustlsHello {
                sni: None,
                alpn: &[],
                versions: rustls::ALL_VERSIONS,
                pq: false,
            },
            sni: None,
            alpn: &[],
            versions: &[0x0304, 0x0303],
            min_len: 100,
        },
        Case {
            name: "alpn h2 http/1.1",
            spec: RustlsHello {
                sni: Some("example.org"),
                alpn: &[b"h2", b"http/1.1"],
                versions: rustls::ALL_VERSIONS,
                pq: false,
            },
            sni: Some("example.org"),
            alpn: &[b"h2", b"http/1.1"],
            versions: &[0x0304, 0x0303],
            min_len: 100,
        },
        Case {
            name: "tls 1.2 only",
            spec: RustlsHello {
                sni: Some("legacy.example"),
                alpn: &[b"http/1.1"],
                versions: TLS12_ONLY,
                pq: false,
            },
            sni: Some("legacy.example"),
            alpn: &[b"http/1.1"],
            versions: &[0x0303],
            min_len: 100,
        },
        Case {
            name: "tls 1.3 only",
            spec: RustlsHello {
                sni: Some("modern.example"),
                alpn: &[b"h2"],
                versions: TLS13_ONLY,
                pq: false,
            },
            sni: Some("modern.example"),
            alpn: &[b"h2"],
            versions: &[0x0304],
            min_len: 100,
        },
        Case {
            name: "post-quantum key share (X25519MLKEM768-sized)",
            spec: RustlsHello {
                sni: Some("pq.example"),
                alpn: &[b"h2"],
                versions: TLS13_ONLY,
                pq: true,
            },
            sni: Some("pq.example"),
            alpn: &[b"h2"],
            versions: &[0x0304],
            min_len: MLKEM_SHARE_LEN + 100,
        },
    ];
    for case in cases {
        let wire = rustls_hello(&case.spec);
        let info = parse_ok(&wire);
        assert_eq!(info.sni.as_deref(), case.sni, "{}", case.name);
        let alpn: Vec<&[u8]> = info.alpn.iter().map(Vec::as_slice).collect();
        assert_eq!(alpn, case.alpn, "{}", case.name);
        assert_eq!(info.supported_versions, case.versions, "{}", case.name);
        assert!(!info.ech, "{}", case.name);
        assert_eq!(info.wire_len, wire.len(), "{}", case.name);
        assert_eq!(info.hello_len + 5, wire.len(), "{}", case.name);
        assert!(
            info.hello_len >= case.min_len,
            "{}: {}",
            case.name,
            info.hello_len
        );
        assert_eq!(info.legacy_version, 0x0303, "{}", case.name);
        assert_eq!(info.record_version >> 8, 3, "{}", case.name);
        // And through the classifier.
        assert_eq!(
            detect_bytes(&wire, DEFAULT_MAX_BYTES).unwrap(),
            Some(Detected::Tls(info)),
            "{}",
            case.name
        );
    }
}

#[test]
fn split_records_and_byte_by_byte() {
    let one = default_hello();
    let expected = parse_ok(&one);
    let msg = unframe(&one);
    let third = msg.len() / 3 + 1;
    let framings: [(&str, Vec<u8>); 4] = [
        ("three records", records(&msg, &[third])),
        ("header split from body", records(&msg, &[2, 2, usize::MAX])),
        ("one-byte records", records(&msg, &[1])),
        ("uneven", records(&msg, &[7, 300, 5])),
    ];
    for (name, wire) in framings {
        let n_records = wire.len() - msg.len();
        assert_eq!(n_records % 5, 0, "{name}");
        let info = parse_ok(&wire);
        assert_eq!(info.sni, expected.sni, "{name}");
        assert_eq!(info.alpn, expected.alpn, "{name}");
        assert_eq!(info.hello_len, expected.hello_len, "{name}");
        assert_eq!(info.wire_len, wire.len(), "{name}");
        // Fed one byte at a time: need-more until the last byte.
        for end in 0..wire.len() {
            assert!(
                matches!(parse_client_hello(&wire[..end]), Ok(None)),
                "{name}: prefix {end} of {}",
                wire.len()
            );
        }
    }
}

#[test]
fn three_record_split_has_three_records() {
    let msg = unframe(&default_hello());
    let wire = records(&msg, &[msg.len() / 3 + 1]);
    assert_eq!(wire.len(), msg.len() + 15);
    assert_eq!(parse_ok(&wire).wire_len, msg.len() + 15);
}

#[test]
fn bytes_after_the_hello_are_ignored() {
    // Early data / a following record: the hello ends at its record.
    let mut wire = default_hello();
    let len = wire.len();
    wire.extend(record(23, 0x0303, b"early data"));
    let info = parse_ok(&wire);
    assert_eq!(info.wire_len, len);
}

#[test]
fn hand_built_hellos_parse() {
    // Chrome-like post-quantum hello: GREASE share, X25519MLKEM768, X25519,
    // session ticket, padding, PSK last: ~1.8 KB.
    let mut pq = Hello::with_sni(b"pq.example.net")
        .ext(0x1a1a, vec![0])
        .ext(EXT_SESSION_TICKET, vec![0x44; 200])
        .ext(EXT_PADDING, vec![0; 100]);
    if let Some(exts) = pq.extensions.as_mut() {
        for (typ, data) in exts.iter_mut() {
            if *typ == EXT_KEY_SHARE {
                *data = key_share_data(&[(0x3a3a, 1), (0x11ec, MLKEM_SHARE_LEN), (0x001d, 32)]);
            }
        }
        exts.push((EXT_PSK, vec16(&[0x55; 60])));
    }
    let pq_wire = pq.wire();
    assert!(pq_wire.len() > 1700, "{}", pq_wire.len());

    let long = name_of_len(253);
    /// (name, wire, sni, supported_versions, ech)
    type Case<'a> = (&'a str, Vec<u8>, Option<&'a str>, Vec<u16>, bool);
    let cases: Vec<Case<'_>> = vec![
        (
            "post-quantum ~1.8 KB",
            pq_wire,
            Some("pq.example.net"),
            vec![0x0304, 0x0303],
            false,
        ),
        (
            "trailing dot and case",
            Hello::with_sni(b"WWW.Example.COM.").wire(),
            Some("www.example.com"),
            vec![0x0304, 0x0303],
            false,
        ),
        (
            "underscore",
            Hello::with_sni(b"_svc.example.com").wire(),
            Some("_svc.example.com"),
            vec![0x0304, 0x0303],
            false,
        ),
        (
            "ipv4 literal",
            Hello::with_sni(b"192.0.2.1").wire(),
            Some("192.0.2.1"),
            vec![0x0304, 0x0303],
            false,
        ),
        (
            "ipv6 literal",
            Hello::with_sni(b"2001:DB8::1").wire(),
            Some("2001:db8::1"),
            vec![0x0304, 0x0303],
            false,
        ),
        (
            "253-byte name",
            Hello::with_sni(long.as_bytes()).wire(),
            Some(long.as_str()),
            vec![0x0304, 0x0303],
            false,
        ),
        (
            "ech outer sni",
            Hello::with_sni(b"public.ech.example")
                .ext(0xfe0d, vec![0; 90])
                .wire(),
            Some("public.ech.example"),
            vec![0x0304, 0x0303],
            true,
        ),
        (
            "no sni",
            Hello::bare().wire(),
            None,
            vec![0x0304, 0x0303],
            false,
        ),
        (
            "legacy tls 1.0 without extensions",
            Hello {
                legacy_version: 0x0301,
                extensions: None,
                ..Hello::bare()
            }
            .wire(),
            None,
            vec![0x0301],
            false,
        ),
        (
            "legacy tls 1.0/1.1 via supported_versions",
            Hello {
                extensions: Some(vec![(EXT_VERSIONS, versions_data(&[0x0302, 0x0301]))]),
                ..Hello::bare()
            }
            .wire(),
            None,
            vec![0x0302, 0x0301],
            false,
        ),
        (
            "empty session id",
            Hello {
                session_id: Vec::new(),
                ..Hello::with_sni(b"a.example")
            }
            .wire(),
            Some("a.example"),
            vec![0x0304, 0x0303],
            false,
        ),
    ];
    for (name, wire, sni, versions, ech) in cases {
        let info = parse_ok(&wire);
        assert_eq!(info.sni.as_deref(), sni, "{name}");
        assert_eq!(info.supported_versions, versions, "{name}");
        assert_eq!(info.ech, ech, "{name}");
        assert_eq!(info.wire_len, wire.len(), "{name}");
    }
}

/// A valid name of exactly `len` bytes (labels of up to 63).
fn name_of_len(len: usize) -> String {
    let mut labels = Vec::new();
    let mut left = len;
    while left > 0 {
        let take = left.min(63);
        labels.push("a".repeat(take));
        left -= take;
        if left > 0 {
            // The dot; the next label needs at least one byte.
            left -= 1;
            if left == 0 {
                // Would end in a dot: lengthen the last label instead.
                let last = labels.pop().unwrap_or_default();
                labels.push(format!("{last}a").chars().take(63).collect());
            }
        }
    }
    let s = labels.join(".");
    assert_eq!(s.len(), len, "{s}");
    s
}

// ---------------------------------------------------------------------------
// TLS: malformed
// ---------------------------------------------------------------------------

fn malformed_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let good = Hello::with_sni(b"ok.example");
    let msg = good.message();
    let mut cases: Vec<(&'static str, Vec<u8>, &'static str)> = vec![
        // SNI contents (THREATS #5).
        (
            "nul in name",
            Hello::with_sni(b"ok.example\0.evil").wire(),
            "sni_nul",
        ),
        (
            "empty label a..b",
            Hello::with_sni(b"a..b").wire(),
            "sni_empty_label",
        ),
        (
            "leading dot",
            Hello::with_sni(b".example.com").wire(),
            "sni_empty_label",
        ),
        ("bare star", Hello::with_sni(b"*").wire(), "sni_wildcard"),
        (
            "wildcard name",
            Hello::with_sni(b"*.example.com").wire(),
            "sni_wildcard",
        ),
        (
            "64-byte label",
            Hello::with_sni(format!("{}.com", "a".repeat(64)).as_bytes()).wire(),
            "sni_label_too_long",
        ),
        (
            "254-byte name",
            Hello::with_sni(name_of_len(254).as_bytes()).wire(),
            "sni_too_long",
        ),
        (
            "raw utf-8 bücher",
            Hello::with_sni("bücher.example".as_bytes()).wire(),
            "sni_non_ascii",
        ),
        (
            "ideographic full stop",
            Hello::with_sni("example\u{3002}com".as_bytes()).wire(),
            "sni_non_ascii",
        ),
        ("empty name", Hello::with_sni(b"").wire(), "sni_empty"),
        ("only a dot", Hello::with_sni(b".").wire(), "sni_empty"),
        (
            "space",
            Hello::with_sni(b"exa mple.com").wire(),
            "sni_bad_char",
        ),
        (
            "slash",
            Hello::with_sni(b"example.com/evil").wire(),
            "sni_bad_char",
        ),
        (
            "port",
            Hello::with_sni(b"example.com:443").wire(),
            "sni_bad_char",
        ),
        (
            "bracketed ipv6",
            Hello::with_sni(b"[::1]").wire(),
            "sni_bad_char",
        ),
        // SNI framing.
        (
            "duplicate sni extension",
            good.clone()
                .ext(EXT_SNI, sni_data(&[(0, b"evil.example")]))
                .wire(),
            "duplicate_extension",
        ),
        (
            "two host_name entries",
            Hello::bare()
                .ext(
                    EXT_SNI,
                    sni_data(&[(0, b"ok.example"), (0, b"evil.example")]),
                )
                .wire(),
            "multiple_sni_names",
        ),
        (
            "unknown name type",
            Hello::bare()
                .ext(EXT_SNI, sni_data(&[(1, b"ok.example")]))
                .wire(),
            "unknown_sni_type",
        ),
        (
            "empty sni list",
            Hello::bare().ext(EXT_SNI, vec16(&[])).wire(),
            "bad_sni_list",
        ),
        (
            "empty sni extension",
            Hello::bare().ext(EXT_SNI, Vec::new()).wire(),
            "bad_sni_list",
        ),
        (
            "sni list length too long",
            Hello::bare()
                .ext(EXT_SNI, {
                    let mut d = sni_data(&[(0, b"ok.example")]);
                    d[1] += 1;
                    d
                })
                .wire(),
            "bad_sni_list",
        ),
        (
            "sni list with trailing byte",
            Hello::bare()
                .ext(EXT_SNI, {
                    let mut d = sni_data(&[(0, b"ok.example")]);
                    d.push(0);
                    d
                })
                .wire(),
            "bad_sni_list",
        ),
        // Other extensions.
        (
            "duplicate alpn",
            good.clone().ext(EXT_ALPN, alpn_data(&[b"h2"])).wire(),
            "duplicate_extension",
        ),
        (
            "duplicate grease",
            good.clone().ext(0x0a0a, Vec::new()).wire(),
            "duplicate_extension",
        ),
        (
            "psk not last",
            good.clone()
                .ext(EXT_PSK, vec16(&[1; 10]))
                .ext(EXT_PADDING, vec![0; 4])
                .wire(),
            "psk_not_last",
        ),
        (
            "odd supported_versions",
            Hello {
                extensions: Some(vec![(EXT_VERSIONS, vec8(&[3, 4, 3]))]),
                ..Hello::bare()
            }
            .wire(),
            "bad_supported_versions",
        ),
        (
            "only grease versions",
            Hello {
                extensions: Some(vec![(EXT_VERSIONS, versions_data(&[0x7a7a]))]),
                ..Hello::bare()
            }
            .wire(),
            "bad_supported_versions",
        ),
        (
            "extension longer than block",
            Hello::bare()
                .ext(EXT_PADDING, vec![0; 4])
                .wire()
                .pipe(|mut w| {
                    // Bump the last extension's length by one.
                    let n = w.len();
                    w[n - 5] += 1;
                    w
                }),
            "truncated_extension",
        ),
        // Body.
        (
            "session id 33",
            Hello {
                session_id: vec![1; 33],
                ..good.clone()
            }
            .wire(),
            "bad_session_id",
        ),
        (
            "no cipher suites",
            Hello {
                suites: Vec::new(),
                ..good.clone()
            }
            .wire(),
            "bad_cipher_suites",
        ),
        (
            "odd cipher suites",
            Hello {
                suites: vec![0x13, 0x01, 0x13],
                ..good.clone()
            }
            .wire(),
            "bad_cipher_suites",
        ),
        (
            "no compression",
            Hello {
                compression: Vec::new(),
                ..good.clone()
            }
            .wire(),
            "bad_compression_methods",
        ),
        (
            "server hello type",
            Hello {
                handshake_type: 2,
                ..good.clone()
            }
            .wire(),
            "not_client_hello",
        ),
        (
            "empty body",
            records(&handshake(1, &[]), &[usize::MAX]),
            "truncated_hello",
        ),
        (
            "truncated body (consistent outer lengths)",
            records(&handshake(1, &good.body()[..90]), &[usize::MAX]),
            "bad_extensions_length",
        ),
        (
            "bytes after the extensions block",
            records(
                &handshake(1, &[good.body(), vec![0]].concat()),
                &[usize::MAX],
            ),
            "trailing_hello_bytes",
        ),
        // Records.
        (
            "zero-length record",
            [record(22, 0x0301, &[]), good.wire()].concat(),
            "empty_record",
        ),
        (
            "zero-length record mid-hello",
            [
                record(22, 0x0301, &msg[..10]),
                record(22, 0x0301, &[]),
                record(22, 0x0301, &msg[10..]),
            ]
            .concat(),
            "empty_record",
        ),
        (
            "application data mid-hello",
            [
                record(22, 0x0301, &msg[..10]),
                record(23, 0x0303, b"xx"),
                record(22, 0x0301, &msg[10..]),
            ]
            .concat(),
            "interleaved_record",
        ),
        (
            "change cipher spec mid-hello",
            [
                record(22, 0x0301, &msg[..10]),
                record(20, 0x0303, &[1]),
                record(22, 0x0301, &msg[10..]),
            ]
            .concat(),
            "interleaved_record",
        ),
        (
            "alert record first",
            record(21, 0x0303, &[2, 40]),
            "not_handshake_record",
        ),
        (
            "record version 2.0",
            record(22, 0x0200, &msg),
            "bad_record_version",
        ),
        (
            "record longer than 2^14+256",
            {
                let mut r = record(22, 0x0301, &msg);
                r[3..5].copy_from_slice(&be16(16_384 + 257));
                r
            },
            "record_too_long",
        ),
        (
            "extra handshake bytes in the last record",
            record(22, 0x0301, &[msg.clone(), handshake(16, &[0; 4])].concat()),
            "trailing_handshake_data",
        ),
    ];
    cases.push((
        "empty alpn list",
        Hello::bare()
            .ext(EXT_SNI, sni_data(&[(0, b"a.example")]))
            .pipe(|mut h| {
                if let Some(exts) = h.extensions.as_mut() {
                    for (typ, data) in exts.iter_mut() {
                        if *typ == EXT_ALPN {
                            *data = vec16(&[]);
                        }
                    }
                }
                h.wire()
            }),
        "bad_alpn",
    ));
    cases.push((
        "empty alpn protocol",
        Hello::bare().pipe(|mut h| {
            if let Some(exts) = h.extensions.as_mut() {
                for (typ, data) in exts.iter_mut() {
                    if *typ == EXT_ALPN {
                        *data = alpn_data(&[b"h2", b""]);
                    }
                }
            }
            h.wire()
        }),
        "bad_alpn",
    ));
    cases
}

/// Tiny helper so table rows can post-process a value inline.
trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

#[test]
fn malformed_hellos_are_rejected() {
    let cases = malformed_cases();
    assert!(cases.len() >= 40, "{}", cases.len());
    for (name, wire, detail) in &cases {
        assert_eq!(tls_err(wire), *detail, "{name}");
        // Never an allow on any prefix: need-more or the same kind of error.
        for end in 0..wire.len() {
            match parse_client_hello(&wire[..end]) {
                Ok(None) | Err(DetectError::BadTls(_)) => {}
                other => panic!("{name}: prefix {end}: {other:?}"),
            }
        }
        // detect_bytes: classified as TLS and rejected the same way, unless
        // the first bytes are not a TLS handshake record at all (opaque).
        let got = detect_bytes(wire, DEFAULT_MAX_BYTES);
        if wire.starts_with(&[0x16, 0x03]) {
            assert!(
                matches!(got, Err(DetectError::BadTls(d)) if d == *detail),
                "{name}: {got:?}"
            );
        } else {
            assert!(matches!(got, Ok(Some(Detected::Opaque))), "{name}: {got:?}");
        }
    }
}

#[test]
fn malformed_errors_map_to_alerts() {
    assert_eq!(
        DetectError::BadTls("sni_nul").tls_alert_description(),
        Some(ALERT_UNRECOGNIZED_NAME)
    );
    assert_eq!(
        DetectError::BadTls("duplicate_extension").tls_alert_description(),
        Some(ALERT_DECODE_ERROR)
    );
    assert_eq!(
        DetectError::TooLarge.tls_alert_description(),
        Some(ALERT_DECODE_ERROR)
    );
    assert_eq!(DetectError::Timeout.tls_alert_description(), None);
    assert_eq!(
        DetectError::BadHttp("duplicate_host").tls_alert_description(),
        None
    );
}

#[test]
fn oversized_hellos_are_too_large() {
    let big = Hello::with_sni(b"big.example").ext(EXT_PADDING, vec![0; 17_000]);
    let msg = big.message();
    let wire = records(&msg, &[16_384]);
    assert!(wire.len() > 16_384);
    assert!(matches!(
        parse_client_hello(&wire),
        Err(DetectError::TooLarge)
    ));
    // Known from the handshake header alone, before the bytes arrive.
    assert!(matches!(
        parse_client_hello(&wire[..9]),
        Err(DetectError::TooLarge)
    ));
    // A record whose end lies beyond the cap.
    let one = record(22, 0x0301, &msg[..16_384]);
    assert!(matches!(
        parse_client_hello(&one[..5]),
        Err(DetectError::TooLarge)
    ));
    // Many small records that add up past the cap.
    let small = Hello::with_sni(b"small.example").ext(EXT_PADDING, vec![0; 9_000]);
    let chopped = records(&small.message(), &[1]);
    assert!(matches!(
        parse_client_hello(&chopped),
        Err(DetectError::TooLarge)
    ));
    assert!(matches!(
        parse_client_hello(&chopped[..16_384]),
        Err(DetectError::TooLarge)
    ));
    // The same 9 KB hello in one record is fine, and a lower cap refuses it.
    let fine = small.wire();
    assert_eq!(parse_ok(&fine).sni.as_deref(), Some("small.example"));
    assert!(matches!(
        parse_client_hello_limited(&fine, 4096),
        Err(DetectError::TooLarge)
    ));
    assert!(matches!(
        detect_bytes(&fine[..4096], 4096),
        Err(DetectError::TooLarge)
    ));
}

#[test]
fn partial_prefixes_never_panic_or_allow() {
    // Every prefix of every valid hello is need-more; truncating a header
    // byte-by-byte never errors spuriously.
    let wires = [
        default_hello(),
        Hello::bare().wire(),
        Hello::with_sni(b"x.example").wire(),
    ];
    for wire in &wires {
        for end in 0..wire.len() {
            assert!(
                matches!(parse_client_hello(&wire[..end]), Ok(None)),
                "prefix {end}"
            );
        }
        assert!(parse_client_hello(wire).unwrap().is_some());
    }
}

#[test]
fn grease_helpers() {
    for v in [0x0a0a, 0x1a1a, 0x2a2a, 0xfafa] {
        assert!(tls::is_grease(v), "{v:#x}");
    }
    for v in [0x0304, 0x0a1a, 0x0b0b, 0x1a0a] {
        assert!(!tls::is_grease(v), "{v:#x}");
    }
}

#[test]
fn alert_bytes() {
    assert_eq!(tls_alert(ALERT_ACCESS_DENIED), [21, 3, 3, 0, 2, 2, 49]);
    assert_eq!(tls_alert(ALERT_UNRECOGNIZED_NAME), [21, 3, 3, 0, 2, 2, 112]);
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

fn http_ok(req: &str) -> HttpHead {
    match parse_http_head(req.as_bytes()) {
        Ok(Some(h)) => h,
        other => panic!("{req:?}: expected a head, got {other:?}"),
    }
}

#[test]
fn http_heads_parse() {
    // (request, host, port, version, method)
    let cases: &[(&str, &str, Option<u16>, u8, &str)] = &[
        ("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "example.com", None, 1, "GET"),
        ("GET / HTTP/1.1\r\nhost: EXAMPLE.com.:8080\r\n\r\n", "example.com", Some(8080), 1, "GET"),
        // THREATS #6 `allowed:22`: the port is parsed; the dial uses the
        // original destination port anyway.
        ("GET / HTTP/1.1\r\nHost: allowed.example:22\r\n\r\n", "allowed.example", Some(22), 1, "GET"),
        ("GET / HTTP/1.0\r\nHost: old.example\r\n\r\n", "old.example", None, 0, "GET"),
        ("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", "::1", Some(80), 1, "GET"),
        ("GET / HTTP/1.1\r\nHost: [2001:DB8::1]\r\n\r\n", "2001:db8::1", None, 1, "GET"),
        ("GET / HTTP/1.1\r\nHost: 192.0.2.7\r\n\r\n", "192.0.2.7", None, 1, "GET"),
        ("GET http://a.example/x?y HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example", None, 1, "GET"),
        ("GET HTTP://A.EXAMPLE:80/ HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example", None, 1, "GET"),
        ("GET http://a.example/ HTTP/1.1\r\nHost: a.example:80\r\n\r\n", "a.example", Some(80), 1, "GET"),
        ("GET https://a.example:443/ HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example", None, 1, "GET"),
        ("GET http://[::1]:8080/ HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", "::1", Some(8080), 1, "GET"),
        ("OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example", None, 1, "OPTIONS"),
        ("CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", "a.example", Some(443), 1, "CONNECT"),
        ("CONNECT a.example:443 HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example", None, 1, "CONNECT"),
        (
            "POST /u HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\nX-Obs: caf\u{e9}\r\nX-Tab:\tv\t\r\n\r\n",
            "a.example",
            None,
            1,
            "POST",
        ),
        ("POST /u HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "a.example", None, 1, "POST"),
        ("POST /u HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: Chunked\r\n\r\n", "a.example", None, 1, "POST"),
        ("M-SEARCH / HTTP/1.1\r\nHost: a.example\r\n\r\n", "a.example", None, 1, "M-SEARCH"),
        ("GET / HTTP/1.1\r\nHost:a.example   \r\n\r\n", "a.example", None, 1, "GET"),
    ];
    for (req, host, port, version, method) in cases {
        let h = http_ok(req);
        assert_eq!(h.host, *host, "{req:?}");
        assert_eq!(h.port, *port, "{req:?}");
        assert_eq!(h.version, *version, "{req:?}");
        assert_eq!(h.method, *method, "{req:?}");
        assert_eq!(h.head_len, req.len(), "{req:?}");
        assert_eq!(
            detect_bytes(req.as_bytes(), DEFAULT_MAX_BYTES).unwrap(),
            Some(Detected::Http(h)),
            "{req:?}"
        );
    }
}

#[test]
fn http_head_len_excludes_body_and_pipelined_requests() {
    let req = "POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: evil\r\n\r\n";
    let h = http_ok(req);
    assert_eq!(h.host, "a.example");
    assert_eq!(
        &req[..h.head_len],
        "POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\n\r\n"
    );
    assert_eq!(h.target, "/");
}

fn http_bad_cases() -> Vec<(String, &'static str)> {
    let mut cases: Vec<(String, &'static str)> = [
        // THREATS #6.
        ("GET http://evil.example/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n", "host_mismatch"),
        ("GET http://allowed.example:8080/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n", "host_mismatch"),
        ("GET https://allowed.example/ HTTP/1.1\r\nHost: allowed.example:80\r\n\r\n", "host_mismatch"),
        ("CONNECT evil.example:22 HTTP/1.1\r\nHost: allowed.example\r\n\r\n", "host_mismatch"),
        ("CONNECT allowed.example:22 HTTP/1.1\r\nHost: allowed.example:443\r\n\r\n", "host_mismatch"),
        ("CONNECT allowed.example HTTP/1.1\r\nHost: allowed.example\r\n\r\n", "bad_port"),
        ("GET / HTTP/1.1\r\nHost: allowed.example\r\nHost: evil.example\r\n\r\n", "duplicate_host"),
        ("GET / HTTP/1.1\r\nHost: allowed.example\r\nhOST: allowed.example\r\n\r\n", "duplicate_host"),
        ("GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", "missing_host"),
        ("GET / HTTP/1.0\r\n\r\n", "missing_host"),
        ("GET / HTTP/1.1\r\nHost: allowed.example@evil.example\r\n\r\n", "userinfo"),
        ("GET http://allowed.example@evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n", "userinfo"),
        ("GET / HTTP/1.1\r\nHost: allowed.example:ssh\r\n\r\n", "bad_port"),
        ("GET / HTTP/1.1\r\nHost: allowed.example:\r\n\r\n", "bad_port"),
        ("GET / HTTP/1.1\r\nHost: allowed.example:65536\r\n\r\n", "bad_port"),
        ("GET / HTTP/1.1\r\nHost: allowed.example:0\r\n\r\n", "bad_port"),
        ("GET / HTTP/1.1\r\nHost: allowed.example:+80\r\n\r\n", "bad_port"),
        ("GET / HTTP/1.1\r\nHost: allowed.example:80:80\r\n\r\n", "bad_port"),
        ("GET / HTTP/1.1\r\nHost: \r\n\r\n", "host_empty"),
        ("GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", "host_empty"),
        ("GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", "bad_host"),
        ("GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", "bad_host"),
        ("GET / HTTP/1.1\r\nHost: [evil.example]\r\n\r\n", "bad_host"),
        ("GET / HTTP/1.1\r\nHost: a..b\r\n\r\n", "host_empty_label"),
        ("GET / HTTP/1.1\r\nHost: *\r\n\r\n", "host_wildcard"),
        ("GET / HTTP/1.1\r\nHost: b\u{fc}cher.example\r\n\r\n", "host_non_ascii"),
        ("GET / HTTP/1.1\r\nHost: example\u{3002}com\r\n\r\n", "host_non_ascii"),
        ("GET / HTTP/1.1\r\nHost: a b.example\r\n\r\n", "host_bad_char"),
        // THREATS #22 (head-level).
        ("GET / HTTP/1.1\r\nHost: a.example\r\nX-Long: a\r\n b\r\n\r\n", "obs_fold"),
        ("GET / HTTP/1.1\r\nHost: a.example\r\nX: 1\r\n\tb\r\n\r\n", "obs_fold"),
        ("GET / HTTP/1.1\nHost: a.example\r\n\r\n", "bare_lf"),
        ("GET / HTTP/1.1\r\nHost: a.example\n\r\n", "bare_lf"),
        ("GET / HTTP/1.1\r\nHost: a.example\r\n\n", "bare_lf"),
        ("GET / HTTP/1.1\r\nHost: a.example\rX: y\r\n\r\n", "bare_cr"),
        ("GET / HTTP/1.1\r\nHost: a.example\0.evil\r\n\r\n", "nul_byte"),
        ("GET / HTTP/1.1\r\nX: \0\r\nHost: a.example\r\n\r\n", "nul_byte"),
        ("GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", "space_before_colon"),
        ("GET / HTTP/1.1\r\nHost\t: a.example\r\n\r\n", "space_before_colon"),
        ("GET / HTTP/1.1\r\nHost: a.example\r\nNoColon\r\n\r\n", "missing_colon"),
        ("GET / HTTP/1.1\r\nHost: a.example\r\n: empty\r\n\r\n", "bad_header_name"),
        ("GET / HTTP/1.1\r\nHost: a.example\r\nX(y): 1\r\n\r\n", "bad_header_name"),
        ("GET / HTTP/1.1\r\nHost: a.example\r\nX: a\x7fb\r\n\r\n", "bad_header_value"),
        ("GET / HTTP/1.1\r\nHost: a.example\r\nX: a\x01b\r\n\r\n", "bad_header_value"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "cl_and_te"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", "cl_and_te"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", "duplicate_content_length"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "duplicate_content_length"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: +5\r\n\r\n", "bad_content_length"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 0x10\r\n\r\n", "bad_content_length"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5, 5\r\n\r\n", "bad_content_length"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: \r\n\r\n", "bad_content_length"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 99999999999999999999\r\n\r\n", "bad_content_length"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked \r\n\r\n", "bad_transfer_encoding"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked, identity\r\n\r\n", "bad_transfer_encoding"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: xchunked\r\n\r\n", "bad_transfer_encoding"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "bad_transfer_encoding"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: ,chunked\r\n\r\n", "bad_transfer_encoding"),
        ("POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "duplicate_transfer_encoding"),
        ("POST / HTTP/1.0\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n", "te_in_http10"),
        // Request line.
        ("G(T / HTTP/1.1\r\nHost: a.example\r\n\r\n", "invalid_method"),
        (" GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "invalid_method"),
        ("\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "invalid_method"),
        ("GET  / HTTP/1.1\r\nHost: a.example\r\n\r\n", "bad_request_line"),
        ("GET / HTTP/1.1 \r\nHost: a.example\r\n\r\n", "bad_request_line"),
        ("GET /\r\nHost: a.example\r\n\r\n", "bad_request_line"),
        ("GET / HTTP/2.0\r\nHost: a.example\r\n\r\n", "unsupported_version"),
        ("GET / http/1.1\r\nHost: a.example\r\n\r\n", "unsupported_version"),
        ("GET / HTTP/1.10\r\nHost: a.example\r\n\r\n", "unsupported_version"),
        ("GET /caf\u{e9} HTTP/1.1\r\nHost: a.example\r\n\r\n", "invalid_target"),
        ("GET * HTTP/1.1\r\nHost: a.example\r\n\r\n", "invalid_target"),
        ("GET a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n", "invalid_target"),
        ("GET 1http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", "invalid_target"),
    ]
    .iter()
    .map(|(r, d)| ((*r).to_owned(), *d))
    .collect();
    let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
    cases.push((
        format!("GET / HTTP/1.1\r\nHost: a.example\r\n{many}\r\n"),
        "too_many_headers",
    ));
    cases.push((
        format!(
            "GET / HTTP/1.1\r\nHost: a.example\r\nX: {}",
            "a".repeat(17_000)
        ),
        "header_too_large",
    ));
    cases
}

#[test]
fn http_bad_heads_are_rejected() {
    let cases = http_bad_cases();
    assert!(cases.len() >= 70, "{}", cases.len());
    for (req, detail) in &cases {
        match parse_http_head(req.as_bytes()) {
            Err(DetectError::BadHttp(d)) => assert_eq!(d, *detail, "{req:?}"),
            other => panic!("{req:?}: expected BadHttp({detail}), got {other:?}"),
        }
        // Prefixes: need-more or an HTTP error, never a head.
        for end in 0..req.len() {
            match parse_http_head(&req.as_bytes()[..end]) {
                Ok(None) | Err(DetectError::BadHttp(_)) => {}
                other => panic!("{req:?}: prefix {end}: {other:?}"),
            }
        }
        // Whatever is classified as HTTP fails the same way through detect.
        match detect_bytes(req.as_bytes(), DEFAULT_MAX_BYTES) {
            Err(DetectError::BadHttp(d)) => assert_eq!(d, *detail, "{req:?}"),
            Ok(Some(Detected::Opaque)) => assert!(
                !req.as_bytes()[0].is_ascii_uppercase() || req.starts_with("G(T"),
                "{req:?}"
            ),
            other => panic!("{req:?}: {other:?}"),
        }
    }
}

#[test]
fn http_errors_are_early_when_possible() {
    // Rejected before the head is complete: no waiting for a deadline.
    for (req, detail) in [
        ("GET / HTTP/1.1\n", "bare_lf"),
        ("GET / HTTP/1.1\r\nHost: a\0", "nul_byte"),
        ("GET / HTTP/1.1\r\nHost: a\rx", "bare_cr"),
        ("G@T", "invalid_method"),
    ] {
        assert!(
            matches!(parse_http_head(req.as_bytes()), Err(DetectError::BadHttp(d)) if d == detail),
            "{req:?}"
        );
    }
    assert!(matches!(
        parse_http_head(b"GET / HTTP/1.1\r\nHost: a.example\r\n"),
        Ok(None)
    ));
    assert!(matches!(parse_http_head(b""), Ok(None)));
    // The cap applies to the head; a lower cap refuses earlier.
    let req = b"GET / HTTP/1.1\r\nHost: a.example\r\nX: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    assert!(parse_http_head(req).unwrap().is_some());
    assert!(matches!(
        parse_http_head_limited(req, 40),
        Err(DetectError::BadHttp("header_too_large"))
    ));
    assert!(matches!(
        detect_bytes(&req[..40], 40),
        Err(DetectError::BadHttp("header_too_large"))
    ));
}

// ---------------------------------------------------------------------------
// Classification and error codes
// ---------------------------------------------------------------------------

#[test]
fn classification() {
    let tls = default_hello();
    /// (name, bytes, Ok(class) / Ok(None) need-more / Err(()) an error)
    type Case = (&'static str, Vec<u8>, Result<Option<&'static str>, ()>);
    let cases: Vec<Case> = vec![
        ("empty", Vec::new(), Ok(None)),
        ("one tls byte", vec![0x16], Ok(None)),
        ("tls record header", tls[..5].to_vec(), Ok(None)),
        ("tls", tls.clone(), Ok(Some("tls"))),
        (
            "0x16 then not 3",
            vec![0x16, 0x02, 0, 0, 1, 1],
            Ok(Some("opaque")),
        ),
        (
            "ssh banner",
            b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n".to_vec(),
            Ok(Some("opaque")),
        ),
        (
            "smtp-ish lower case",
            b"ehlo example.com\r\n".to_vec(),
            Ok(Some("opaque")),
        ),
        (
            "lower-case method",
            b"get / HTTP/1.1\r\n".to_vec(),
            Ok(Some("opaque")),
        ),
        ("binary", vec![0, 1, 2, 3], Ok(Some("opaque"))),
        (
            "sslv2 hello",
            vec![0x80, 0x2e, 0x01, 0x03, 0x01],
            Ok(Some("opaque")),
        ),
        (
            "h2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            Ok(Some("opaque")),
        ),
        ("h2 preface partial", b"PRI * HTTP/2".to_vec(), Ok(None)),
        (
            "PRI as a method",
            b"PRI /x HTTP/1.1\r\nHost: a.example\r\n\r\n".to_vec(),
            Ok(Some("http")),
        ),
        ("method partial", b"GE".to_vec(), Ok(None)),
        ("method then space", b"GET ".to_vec(), Ok(None)),
        (
            "method too long",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n".to_vec(),
            Ok(Some("opaque")),
        ),
        (
            "digits in method",
            b"GET2 / HTTP/1.1\r\n".to_vec(),
            Ok(Some("opaque")),
        ),
        (
            "http",
            b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n".to_vec(),
            Ok(Some("http")),
        ),
        (
            "http broken",
            b"GET / HTTP/1.1\nHost: a.example\r\n\r\n".to_vec(),
            Err(()),
        ),
    ];
    for (name, buf, want) in cases {
        let got = detect_bytes(&buf, DEFAULT_MAX_BYTES).map(|d| {
            d.map(|d| match d {
                Detected::Tls(_) => "tls",
                Detected::Http(_) => "http",
                Detected::Opaque => "opaque",
            })
        });
        assert_eq!(got.map_err(|_| ()), want, "{name}");
    }
}

#[test]
fn reasons_and_details_are_stable() {
    let cases = [
        (DetectError::Timeout, "timeout", "timeout"),
        (DetectError::TooLarge, "too_large", "too_large"),
        (DetectError::Closed, "closed", "closed"),
        (DetectError::Io(std::io::Error::other("x")), "io", "io"),
        (DetectError::BadTls("sni_nul"), "bad_tls", "sni_nul"),
        (
            DetectError::BadHttp("duplicate_host"),
            "bad_http",
            "duplicate_host",
        ),
    ];
    for (e, reason, detail) in cases {
        assert_eq!(e.reason(), reason);
        assert_eq!(e.detail(), detail);
    }
    // Every detail used by the parsers is snake_case.
    let mut details: Vec<&str> = malformed_cases().iter().map(|c| c.2).collect();
    details.extend(http_bad_cases().iter().map(|c| c.1));
    for d in details {
        assert!(
            d.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{d}"
        );
    }
}

#[test]
fn limits_default() {
    let l = DetectLimits::default();
    assert_eq!(l.max_bytes, 16_384);
    assert_eq!(l.deadline, Duration::from_secs(10));
    assert_eq!(l.first_byte_wait, Duration::from_secs(3));
}

// ---------------------------------------------------------------------------
// detect() over loopback
// ---------------------------------------------------------------------------

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client.unwrap();
    client.set_nodelay(true).unwrap();
    (client, accepted.unwrap().0)
}

fn limits(deadline_ms: u64, first_byte_ms: u64) -> DetectLimits {
    DetectLimits {
        max_bytes: DEFAULT_MAX_BYTES,
        deadline: Duration::from_millis(deadline_ms),
        first_byte_wait: Duration::from_millis(first_byte_ms),
    }
}

/// Reads exactly `n` bytes from `server` (after detect) and returns them.
async fn read_n(server: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0; n];
    tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    got
}

#[tokio::test]
async fn detect_one_byte_writes_consumes_nothing() {
    let (mut client, mut server) = pair().await;
    let wire = default_hello();
    let sent = wire.clone();
    let writer = tokio::spawn(async move {
        for b in &sent {
            client.write_all(std::slice::from_ref(b)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        client
    });
    let got = detect(&server, &limits(30_000, 3_000)).await.unwrap();
    let Detected::Tls(info) = got else {
        panic!("{got:?}")
    };
    assert_eq!(info.sni.as_deref(), Some("api.example.com"));
    assert_eq!(info.wire_len, wire.len());
    let _client = writer.await.unwrap();
    // Nothing was consumed: the full hello is still readable.
    assert_eq!(read_n(&mut server, wire.len()).await, wire);
}

#[tokio::test]
async fn detect_multi_record_hello_in_segments() {
    let (mut client, mut server) = pair().await;
    let msg = unframe(&default_hello());
    let wire = records(&msg, &[50]);
    let sent = wire.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(37) {
            client.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        client
    });
    let got = detect(&server, &DetectLimits::default()).await.unwrap();
    assert!(
        matches!(&got, Detected::Tls(i) if i.sni.as_deref() == Some("api.example.com")),
        "{got:?}"
    );
    let _client = writer.await.unwrap();
    assert_eq!(read_n(&mut server, wire.len()).await, wire);
}

#[tokio::test]
async fn detect_http_and_trailing_body_consumes_nothing() {
    let (mut client, server) = pair().await;
    let req = b"POST /v1 HTTP/1.1\r\nHost: Api.Example.com:8080\r\nContent-Length: 4\r\n\r\nbody";
    client.write_all(&req[..20]).await.unwrap();
    let d = tokio::spawn(async move {
        let r = detect(&server, &DetectLimits::default()).await;
        (r, server)
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.write_all(&req[20..]).await.unwrap();
    let (r, mut server) = d.await.unwrap();
    let Detected::Http(head) = r.unwrap() else {
        panic!("not http")
    };
    assert_eq!(head.host, "api.example.com");
    assert_eq!(head.port, Some(8080));
    assert_eq!(read_n(&mut server, req.len()).await, req);
}

#[tokio::test]
async fn detect_large_hello_grows_buffer() {
    // ~9 KB in one record: beyond the initial 2 KiB peek buffer.
    let (mut client, mut server) = pair().await;
    let wire = Hello::with_sni(b"big.example")
        .ext(EXT_PADDING, vec![0; 9_000])
        .wire();
    client.write_all(&wire).await.unwrap();
    let got = detect(&server, &DetectLimits::default()).await.unwrap();
    assert!(
        matches!(&got, Detected::Tls(i) if i.wire_len == wire.len()),
        "{got:?}"
    );
    assert_eq!(read_n(&mut server, wire.len()).await, wire);
}

#[tokio::test]
async fn detect_stalled_hello_times_out() {
    let (mut client, server) = pair().await;
    let wire = default_hello();
    client.write_all(&wire[..wire.len() / 2]).await.unwrap();
    let start = std::time::Instant::now();
    let r = detect(&server, &limits(300, 100)).await;
    let took = start.elapsed();
    assert!(matches!(r, Err(DetectError::Timeout)), "{r:?}");
    assert!(took >= Duration::from_millis(290), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    drop(client);
}

#[tokio::test]
async fn detect_silent_client_is_opaque_after_first_byte_wait() {
    let (mut client, mut server) = pair().await;
    let start = std::time::Instant::now();
    let r = detect(&server, &limits(5_000, 200)).await;
    let took = start.elapsed();
    assert!(matches!(r, Ok(Detected::Opaque)), "{r:?}");
    assert!(took >= Duration::from_millis(190), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // A late banner is still there for the tunnel.
    client.write_all(b"late").await.unwrap();
    assert_eq!(read_n(&mut server, 4).await, b"late");
}

#[tokio::test]
async fn detect_ssh_banner_is_opaque_at_once() {
    let (mut client, mut server) = pair().await;
    let banner = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n";
    client.write_all(banner).await.unwrap();
    let start = std::time::Instant::now();
    let r = detect(&server, &DetectLimits::default()).await;
    assert!(matches!(r, Ok(Detected::Opaque)), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(read_n(&mut server, banner.len()).await, banner);
}

#[tokio::test]
async fn detect_partial_then_close_is_closed() {
    let (mut client, server) = pair().await;
    client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    client.shutdown().await.unwrap();
    let start = std::time::Instant::now();
    let r = detect(&server, &DetectLimits::default()).await;
    assert!(matches!(r, Err(DetectError::Closed)), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn detect_immediate_close_is_closed() {
    let (client, server) = pair().await;
    drop(client);
    let r = detect(&server, &DetectLimits::default()).await;
    assert!(matches!(r, Err(DetectError::Closed)), "{r:?}");
}

#[tokio::test]
async fn detect_oversized_hello_is_too_large() {
    let (mut client, server) = pair().await;
    let wire = records(
        &Hello::with_sni(b"big.example")
            .ext(EXT_PADDING, vec![0; 20_000])
            .message(),
        &[16_384],
    );
    let writer = tokio::spawn(async move {
        // The peer may see a reset once detect returns; ignore write errors.
        let _ = client.write_all(&wire).await;
        client
    });
    let r = detect(&server, &DetectLimits::default()).await;
    assert!(matches!(r, Err(DetectError::TooLarge)), "{r:?}");
    drop(server);
    let _ = writer.await;
}

#[tokio::test]
async fn detect_bad_sni_is_rejected() {
    let (mut client, server) = pair().await;
    client
        .write_all(&Hello::with_sni(b"a..b").wire())
        .await
        .unwrap();
    let r = detect(&server, &DetectLimits::default()).await;
    assert!(
        matches!(r, Err(DetectError::BadTls("sni_empty_label"))),
        "{r:?}"
    );
}

/// CPU time of the calling thread, from /proc (nanoseconds on CPU).
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

#[tokio::test]
async fn detect_waits_without_spinning() {
    // A partial hello sits in the socket for the whole deadline: detect must
    // sleep on readiness, not re-peek in a loop.
    let (mut client, server) = pair().await;
    let wire = default_hello();
    client.write_all(&wire[..40]).await.unwrap();
    let Some(before) = thread_cpu_ns() else {
        return; // no schedstat on this kernel
    };
    let r = detect(&server, &limits(1_000, 100)).await;
    let used = thread_cpu_ns().unwrap_or(before).saturating_sub(before);
    assert!(matches!(r, Err(DetectError::Timeout)), "{r:?}");
    assert!(
        used < 150_000_000,
        "detect used {used} ns of CPU while waiting 1 s"
    );
    drop(client);
}

/// Regenerates the fuzz seed corpus:
/// `TOLLGATE_FUZZ_SEEDS=proxy/fuzz/corpus cargo test -p tollgate-proxy --lib write_fuzz_seeds -- --ignored`
#[test]
#[ignore = "writes files; run by hand to refresh proxy/fuzz/corpus"]
fn write_fuzz_seeds() {
    let Ok(dir) = std::env::var("TOLLGATE_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let msg = unframe(&default_hello());
    let hellos: Vec<(&str, Vec<u8>)> = vec![
        ("rustls-default", default_hello()),
        (
            "rustls-pq",
            rustls_hello(&RustlsHello {
                sni: Some("pq.example"),
                alpn: &[b"h2"],
                versions: TLS13_ONLY,
                pq: true,
            }),
        ),
        (
            "rustls-tls12-nosni",
            rustls_hello(&RustlsHello {
                sni: None,
                alpn: &[b"http/1.1"],
                versions: TLS12_ONLY,
                pq: false,
            }),
        ),
        ("three-records", records(&msg, &[msg.len() / 3 + 1])),
        (
            "tiny-records",
            records(&Hello::with_sni(b"a.example").message(), &[3]),
        ),
        (
            "ech",
            Hello::with_sni(b"public.example")
                .ext(0xfe0d, vec![0; 40])
                .wire(),
        ),
        (
            "legacy-noext",
            Hello {
                legacy_version: 0x0301,
                extensions: None,
                ..Hello::bare()
            }
            .wire(),
        ),
        (
            "duplicate-sni",
            Hello::with_sni(b"a.example")
                .ext(EXT_SNI, sni_data(&[(0, b"b.example")]))
                .wire(),
        ),
    ];
    let heads: [(&str, &[u8]); 5] = [
        ("get", b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"),
        (
            "absolute",
            b"GET http://example.com:8080/x HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n\r\n",
        ),
        (
            "post-chunked",
            b"POST /u HTTP/1.1\r\nHost: [::1]:80\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        ),
        ("http10", b"GET / HTTP/1.0\r\nHost: a.example\r\nContent-Length: 0\r\n\r\n"),
        ("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ];
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("seed-{name}")), bytes).unwrap();
    };
    for (name, bytes) in &hellos {
        write("client_hello", name, bytes);
    }
    for (name, bytes) in heads {
        write("http_head", name, bytes);
    }
}
