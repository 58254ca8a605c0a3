//! Clients that run *inside* a sandbox's network namespace (on a thread that
//! entered it), for the proxy tests: an HTTPS GET with full control over the
//! ClientHello, and a raw DNS query.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};

use crate::lab::in_netns;

/// How the ClientHello is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hello {
    /// One write.
    Normal,
    /// One byte per TCP segment.
    OneByte,
    /// Padded past 1,800 bytes with ALPN protocol ids.
    Large,
}

/// What the client saw.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The handshake and request succeeded.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// The leaf certificate the client received.
    pub leaf: Option<CertificateDer<'static>>,
    /// Status line.
    pub status: String,
    /// Body bytes.
    pub body_len: usize,
    /// sha256 of the body.
    pub sha256: [u8; 32],
    /// Bytes of the ClientHello sent.
    pub hello_len: usize,
}

/// `GET path` over TLS to `dst` with server name `sni`, trusting `ca_pem`,
/// from inside network namespace `netns`.
pub fn https_get(
    netns: &str,
    dst: SocketAddr,
    sni: &str,
    ca_pem: &str,
    path: &str,
    hello: Hello,
) -> Outcome {
    let (sni, ca_pem, path) = (sni.to_string(), ca_pem.to_string(), path.to_string());
    in_netns(netns, move || match get(dst, &sni, &ca_pem, &path, hello) {
        Ok(o) => o,
        Err((e, hello_len)) => Outcome {
            error: Some(e),
            hello_len,
            ..Outcome::default()
        },
    })
}

fn get(
    dst: SocketAddr,
    sni: &str,
    ca_pem: &str,
    path: &str,
    hello: Hello,
) -> Result<Outcome, (String, usize)> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile_certs(ca_pem) {
        roots.add(c).map_err(|e| (format!("ca: {e}"), 0))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| (e.to_string(), 0))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if hello == Hello::Large {
        config.alpn_protocols = (0..30)
            .map(|i| format!("x-tollgate-padding-protocol-{i:02}-{}", "p".repeat(24)).into_bytes())
            .collect();
        config.alpn_protocols.push(b"http/1.1".to_vec());
    }
    let name = ServerName::try_from(sni.to_string()).map_err(|e| (format!("sni: {e}"), 0))?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| (e.to_string(), 0))?;
    let mut tcp = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
        .map_err(|e| (format!("connect: {e}"), 0))?;
    tcp.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| (e.to_string(), 0))?;
    tcp.set_nodelay(true).map_err(|e| (e.to_string(), 0))?;
    let mut first = Vec::new();
    conn.write_tls(&mut first).map_err(|e| (e.to_string(), 0))?;
    let hello_len = first.len();
    match hello {
        Hello::OneByte => {
            for b in &first {
                tcp.write_all(std::slice::from_ref(b))
                    .map_err(|e| (format!("write: {e}"), hello_len))?;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        _ => tcp
            .write_all(&first)
            .map_err(|e| (format!("write: {e}"), hello_len))?,
    }
    let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .map_err(|e| (format!("tls: {e}"), hello_len))?;
    let mut head = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut hasher = Sha256::new();
    let mut body_len = 0usize;
    let mut in_body = false;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err((format!("tls: {e}"), hello_len)),
        };
        if in_body {
            hasher.update(&buf[..n]);
            body_len += n;
            continue;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = head.split_off(p + 4);
            hasher.update(&rest);
            body_len += rest.len();
            in_body = true;
        }
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let status = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    Ok(Outcome {
        ok: in_body,
        error: None,
        leaf,
        status,
        body_len,
        sha256: hasher.finalize().into(),
        hello_len,
    })
}

fn rustls_pemfile_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// A DNS question's outcome as the sandbox sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsReply {
    /// RCODE (0 NOERROR, 3 NXDOMAIN, 5 REFUSED, ...).
    pub rcode: u8,
    /// Addresses in the answer section.
    pub addrs: Vec<IpAddr>,
}

/// Sends one UDP query for `name`/`qtype` (1 A, 28 AAAA) to `server` from
/// inside `netns`; None on timeout.
pub fn dns_query(netns: &str, server: SocketAddr, name: &str, qtype: u16) -> Option<DnsReply> {
    let name = name.to_string();
    in_netns(netns, move || {
        let sock = UdpSocket::bind(if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })
        .ok()?;
        sock.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        let id: u16 = 0x7467;
        let mut q = Vec::new();
        q.extend_from_slice(&id.to_be_bytes());
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.trim_end_matches('.').split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        sock.send_to(&q, server).ok()?;
        let mut b = [0u8; 1500];
        let n = sock.recv(&mut b).ok()?;
        parse_reply(&b[..n], id)
    })
}

fn parse_reply(p: &[u8], id: u16) -> Option<DnsReply> {
    if p.len() < 12 || u16::from_be_bytes([p[0], p[1]]) != id {
        return None;
    }
    let rcode = p[3] & 0x0f;
    let qd = u16::from_be_bytes([p[4], p[5]]);
    let an = u16::from_be_bytes([p[6], p[7]]);
    let mut i = 12;
    let skip_name = |mut i: usize| -> Option<usize> {
        loop {
            let l = *p.get(i)?;
            if l & 0xc0 == 0xc0 {
                return Some(i + 2);
            }
            i += 1 + usize::from(l);
            if l == 0 {
                return Some(i);
            }
        }
    };
    for _ in 0..qd {
        i = skip_name(i)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..an {
        i = skip_name(i)?;
        let ty = u16::from_be_bytes([*p.get(i)?, *p.get(i + 1)?]);
        let len = usize::from(u16::from_be_bytes([*p.get(i + 8)?, *p.get(i + 9)?]));
        let data = p.get(i + 10..i + 10 + len)?;
        match (ty, len) {
            (1, 4) => addrs.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (28, 16) => addrs.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => {}
        }
        i += 10 + len;
    }
    Some(DnsReply { rcode, addrs })
}
