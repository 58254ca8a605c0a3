//! A small HTTPS client (hyper over rustls) with full control over what is
//! sent — HTTP/1.1 or HTTP/2, `Host` / `:authority` independent of the SNI,
//! repeated headers, request trailers — that reports everything it got back,
//! response trailers included. Runs inside a network namespace (a sandbox's,
//! or a lab's host namespace) on a thread that entered it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Version};
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};

use crate::lab::in_netns;

/// Which protocol to offer (ALPN) and speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// ALPN `http/1.1`.
    Http1,
    /// ALPN `h2`.
    Http2,
}

/// What to send.
#[derive(Clone, Debug)]
pub struct Req {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `Host` (h1) / `:authority` (h2); `None`: the SNI.
    pub authority: Option<String>,
    /// Headers, sent in this order (repeats allowed).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Request trailers (h2; sent after the body).
    pub trailers: Vec<(String, String)>,
}

impl Req {
    /// `GET path`.
    pub fn get(path: &str) -> Self {
        Self {
            method: "GET".into(),
            path: path.into(),
            authority: None,
            headers: Vec::new(),
            body: Vec::new(),
            trailers: Vec::new(),
        }
    }

    /// `POST path` with `body`.
    pub fn post(path: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            method: "POST".into(),
            body: body.into(),
            ..Self::get(path)
        }
    }

    /// With one more header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// With one more request trailer.
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers.push((name.into(), value.into()));
        self
    }

    /// With this `Host` / `:authority` (instead of the SNI).
    pub fn authority(mut self, authority: &str) -> Self {
        self.authority = Some(authority.into());
        self
    }
}

/// What came back.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// Status code.
    pub status: u16,
    /// Response version.
    pub version: Version,
    /// ALPN protocol negotiated.
    pub alpn: Option<String>,
    /// Leaf certificate presented by the server.
    pub leaf: Option<CertificateDer<'static>>,
    /// Response headers (lower-case names, every occurrence).
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
    /// Response trailers.
    pub trailers: Vec<(String, String)>,
}

impl Exchange {
    /// First value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }

    /// Every value of header `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        values_of(&self.headers, name)
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` over TLS to `dst` with server name `sni` (verified against
/// `ca_pem`), from inside network namespace `netns`.
pub fn https_request(
    netns: &str,
    dst: SocketAddr,
    sni: &str,
    ca_pem: &str,
    proto: Proto,
    req: &Req,
) -> Result<Exchange, String> {
    let (sni, ca_pem, req) = (sni.to_owned(), ca_pem.to_owned(), req.clone());
    in_netns(netns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(async move {
                tokio::time::timeout(
                    Duration::from_secs(60),
                    exchange(dst, &sni, &ca_pem, proto, req),
                )
                .await
                .map_err(|_| "timeout".to_owned())?
            })
    })
}

fn pairs(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn header_map(list: &[(String, String)]) -> Result<HeaderMap, String> {
    let mut m = HeaderMap::new();
    for (n, v) in list {
        m.append(
            HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("{n}: {e}"))?,
            HeaderValue::from_str(v).map_err(|e| format!("{n}: {e}"))?,
        );
    }
    Ok(m)
}

/// Data frames, then trailers.
struct Frames(VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

async fn exchange(
    dst: SocketAddr,
    sni: &str,
    ca_pem: &str,
    proto: Proto,
    req: Req,
) -> Result<Exchange, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()).filter_map(Result::ok) {
        roots.add(c).map_err(|e| format!("ca: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![match proto {
        Proto::Http1 => b"http/1.1".to_vec(),
        Proto::Http2 => b"h2".to_vec(),
    }];
    let name = ServerName::try_from(sni.to_owned()).map_err(|e| format!("sni: {e}"))?;
    let tcp = tokio::net::TcpStream::connect(dst)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (_, conn) = tls.get_ref();
    let alpn = conn
        .alpn_protocol()
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());

    let authority = req.authority.clone().unwrap_or_else(|| sni.to_owned());
    let mut frames = VecDeque::new();
    if !req.body.is_empty() {
        frames.push_back(Frame::data(Bytes::from(req.body.clone())));
    }
    if !req.trailers.is_empty() {
        frames.push_back(Frame::trailers(header_map(&req.trailers)?));
    }
    let mut builder = Request::builder().method(req.method.as_str());
    builder = match proto {
        Proto::Http1 => builder
            .uri(req.path.as_str())
            .header(http::header::HOST, authority.as_str()),
        Proto::Http2 => builder
            .uri(format!("https://{authority}{}", req.path))
            .version(Version::HTTP_2),
    };
    let mut request = builder
        .body(Frames(frames))
        .map_err(|e| format!("request: {e}"))?;
    for (n, v) in &req.headers {
        request.headers_mut().append(
            HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("{n}: {e}"))?,
            HeaderValue::from_str(v).map_err(|e| format!("{n}: {e}"))?,
        );
    }

    let io = TokioIo::new(tls);
    let response = match proto {
        Proto::Http1 => {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("h1 handshake: {e}"))?;
            tokio::spawn(conn);
            send.send_request(request)
                .await
                .map_err(|e| format!("h1: {e}"))?
        }
        Proto::Http2 => {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            send.send_request(request)
                .await
                .map_err(|e| format!("h2: {e}"))?
        }
    };
    let status = response.status().as_u16();
    let version = response.version();
    let headers = pairs(response.headers());
    let mut body = Vec::new();
    let mut trailers = Vec::new();
    let mut b = response.into_body();
    while let Some(f) = b.frame().await {
        let f = f.map_err(|e| format!("body: {e}"))?;
        match f.into_data() {
            Ok(d) => body.extend_from_slice(&d),
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    trailers.extend(pairs(&t));
                }
            }
        }
    }
    Ok(Exchange {
        status,
        version,
        alpn,
        leaf,
        headers,
        body,
        trailers,
    })
}

/// Every value of header `name` (case-insensitive) in `headers`, in order.
pub fn values_of<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}
