//! Protocol detection: what a redirected connection speaks and which name it
//! asks for, read from its first bytes without consuming them.
//!
//! [`detect`] peeks (`MSG_PEEK`) at a freshly accepted socket until one of:
//!
//! * a complete TLS ClientHello → [`Detected::Tls`] with its SNI, ALPN,
//!   versions and whether ECH was offered;
//! * a complete HTTP/1.x request head → [`Detected::Http`] with its Host;
//! * bytes that are neither → [`Detected::Opaque`] (SSH, SMTP after the
//!   server greets, h2c prior knowledge, anything else), and also a client
//!   that sends nothing within [`DetectLimits::first_byte_wait`]
//!   (server-speaks-first protocols);
//! * an error: the size cap, the deadline, the peer closing, a malformed
//!   hello or head. **Every error means deny.** Nothing is ever consumed, so
//!   on success the caller forwards the socket's bytes verbatim.
//!
//! Classification looks only at the first bytes:
//!
//! | first bytes | class |
//! |---|---|
//! | `0x16 0x03` (TLS handshake record) | TLS |
//! | `A-Z` then up to 23 more of `A-Z - _`, then a space | HTTP/1 |
//! | the HTTP/2 connection preface `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` | opaque |
//! | anything else | opaque |
//!
//! Once a connection is classified as TLS or HTTP it must parse as such: a
//! malformed hello or head is an error, never a fall-back to opaque (which
//! would decide by destination address alone).
//!
//! **Names.** The SNI and the Host are returned lower-cased without one
//! trailing dot and must be ASCII letters, digits, `-`, `_` and dots, with no
//! empty label, labels ≤ 63 and names ≤ 253 bytes; `*`, NUL, non-ASCII
//! (raw UTF-8, U+3002 …) and other characters are errors. An IP literal
//! (`192.0.2.1`, `::1`; in a Host also `[::1]`) is *not* an error: it is
//! returned as the name (IPv6 without brackets) and the policy matcher treats
//! it as no name, i.e. the connection is decided by destination address.
//! Names that only the matcher can judge (numeric last label, IDNA rules)
//! are left to it: it denies them as `invalid_name`.
//!
//! **Cost.** Each new segment re-peeks from the start of the socket buffer
//! into a buffer that grows to at most [`DetectLimits::max_bytes`]; a client
//! dribbling one byte per segment costs O(max_bytes²) byte copies in the
//! worst case (≈ 128 MB of memcpy for 16 KiB), bounded by the deadline.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::io::{Interest, Ready};
use tokio::net::TcpStream;
use tokio::time::Instant;

mod http;
mod name;
mod tls;

#[cfg(test)]
mod tests;

/// Default [`DetectLimits::max_bytes`]: the ClientHello buffer of THREATS.md.
pub const DEFAULT_MAX_BYTES: usize = 16_384;

/// TLS alert `illegal_parameter`.
pub const ALERT_ILLEGAL_PARAMETER: u8 = 47;
/// TLS alert `access_denied`: the policy refused the name.
pub const ALERT_ACCESS_DENIED: u8 = 49;
/// TLS alert `decode_error`: the ClientHello could not be parsed.
pub const ALERT_DECODE_ERROR: u8 = 50;
/// TLS alert `unrecognized_name`: the SNI is malformed.
pub const ALERT_UNRECOGNIZED_NAME: u8 = 112;

/// Bounds on what [`detect`] reads and how long it waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetectLimits {
    /// Most bytes peeked: a ClientHello's records or an HTTP head must fit.
    pub max_bytes: usize,
    /// Total time from the call until a complete hello or head.
    pub deadline: Duration,
    /// How long a client may stay silent before the connection is declared
    /// opaque (server-speaks-first protocols such as SMTP). Capped by
    /// `deadline`.
    pub first_byte_wait: Duration,
}

impl Default for DetectLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            deadline: Duration::from_secs(10),
            first_byte_wait: Duration::from_secs(3),
        }
    }
}

/// What the first bytes of a connection turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detected {
    /// A complete TLS ClientHello.
    Tls(ClientHelloInfo),
    /// A complete HTTP/1.x request head.
    Http(HttpHead),
    /// Neither, or nothing sent within `first_byte_wait`: no name is visible.
    Opaque,
}

/// What the policy needs from a ClientHello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `server_name` host_name: ASCII, lower-cased, no trailing dot.
    /// `None` when the extension is absent. May be an IP literal (see the
    /// module docs), which the matcher treats as no name.
    pub sni: Option<String>,
    /// Offered ALPN protocols, in the client's order.
    pub alpn: Vec<Vec<u8>>,
    /// An `encrypted_client_hello` extension (0xfe0d) was present; `sni` is
    /// then the outer (public) name, which is what policy decides on.
    pub ech: bool,
    /// From `supported_versions` with GREASE removed, else
    /// `[legacy_version]`.
    pub supported_versions: Vec<u16>,
    /// Version field of the first record.
    pub record_version: u16,
    /// `legacy_version` of the ClientHello body.
    pub legacy_version: u16,
    /// Bytes of the whole ClientHello handshake message, header included.
    pub hello_len: usize,
    /// Bytes of the TLS records that carried it (headers included).
    pub wire_len: usize,
}

/// What the policy needs from an HTTP/1.x request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpHead {
    /// The request method, exactly as sent (a token).
    pub method: String,
    /// The request target, exactly as sent.
    pub target: String,
    /// From the Host header: lower-case, no port, no trailing dot; an IPv6
    /// literal without brackets.
    pub host: String,
    /// The Host header's port, if it had one.
    pub port: Option<u16>,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Bytes of the request line and headers including the final CRLFCRLF.
    pub head_len: usize,
}

/// Why detection failed. Every variant means DENY.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The deadline passed before a complete hello or head arrived.
    #[error("timed out waiting for a complete ClientHello or request head")]
    Timeout,
    /// The ClientHello needs more than `max_bytes`.
    #[error("ClientHello larger than the limit")]
    TooLarge,
    /// The peer closed before a complete hello or head.
    #[error("peer closed before a complete ClientHello or request head")]
    Closed,
    /// A socket error.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// Malformed record, handshake, extension or SNI (detail in snake_case).
    #[error("malformed TLS ClientHello: {0}")]
    BadTls(&'static str),
    /// Malformed or ambiguous HTTP/1 request head (detail in snake_case).
    #[error("malformed HTTP request head: {0}")]
    BadHttp(&'static str),
}

impl DetectError {
    /// Stable snake_case category for metrics and events: `timeout`,
    /// `too_large`, `closed`, `io`, `bad_tls`, `bad_http`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::TooLarge => "too_large",
            Self::Closed => "closed",
            Self::Io(_) => "io",
            Self::BadTls(_) => "bad_tls",
            Self::BadHttp(_) => "bad_http",
        }
    }

    /// Stable snake_case detail: the specific defect for `BadTls` /
    /// `BadHttp` (e.g. `duplicate_extension`, `sni_nul`, `duplicate_host`),
    /// else the same as [`DetectError::reason`].
    pub fn detail(&self) -> &'static str {
        match self {
            Self::BadTls(d) | Self::BadHttp(d) => d,
            other => other.reason(),
        }
    }

    /// The alert to send before closing, for errors on a connection that was
    /// classified as TLS: `unrecognized_name` for a bad SNI, `decode_error`
    /// for any other malformed or oversized hello. `None` for the rest
    /// (a stalled or closed client is just closed; HTTP errors get a 400).
    pub fn tls_alert_description(&self) -> Option<u8> {
        match self {
            Self::BadTls(d) if d.starts_with("sni_") => Some(ALERT_UNRECOGNIZED_NAME),
            Self::BadTls(_) | Self::TooLarge => Some(ALERT_DECODE_ERROR),
            _ => None,
        }
    }
}

/// A fatal TLS alert record (`level` 2) with the given description, record
/// version 0x0303, e.g. [`ALERT_ACCESS_DENIED`] or [`ALERT_UNRECOGNIZED_NAME`].
pub fn tls_alert(description: u8) -> [u8; 7] {
    [21, 0x03, 0x03, 0x00, 0x02, 2, description]
}

/// Parses a ClientHello from the start of `buf` (TLS records, possibly
/// several) with the default size cap ([`DEFAULT_MAX_BYTES`]). `Ok(None)`:
/// more bytes are needed.
pub fn parse_client_hello(buf: &[u8]) -> Result<Option<ClientHelloInfo>, DetectError> {
    tls::parse(buf, DEFAULT_MAX_BYTES)
}

/// [`parse_client_hello`] with an explicit cap on the records' total size:
/// a hello that cannot fit in `max_bytes` is [`DetectError::TooLarge`] as
/// soon as its record or handshake header says so.
pub fn parse_client_hello_limited(
    buf: &[u8],
    max_bytes: usize,
) -> Result<Option<ClientHelloInfo>, DetectError> {
    tls::parse(buf, max_bytes)
}

/// Parses an HTTP/1.x request head from the start of `buf` with the default
/// cap ([`DEFAULT_MAX_BYTES`]). `Ok(None)`: more bytes are needed.
pub fn parse_http_head(buf: &[u8]) -> Result<Option<HttpHead>, DetectError> {
    http::parse(buf, DEFAULT_MAX_BYTES)
}

/// [`parse_http_head`] with an explicit cap: a head without its CRLFCRLF in
/// the first `max_bytes` is `BadHttp("header_too_large")`.
pub fn parse_http_head_limited(
    buf: &[u8],
    max_bytes: usize,
) -> Result<Option<HttpHead>, DetectError> {
    http::parse(buf, max_bytes)
}

/// The HTTP/2 connection preface (h2c with prior knowledge).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token that classifies a connection as HTTP.
const MAX_METHOD_LEN: usize = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    NeedMore,
    Tls,
    Http,
    Opaque,
}

fn classify(buf: &[u8]) -> Class {
    let Some(&first) = buf.first() else {
        return Class::NeedMore;
    };
    if first == 0x16 {
        return match buf.get(1) {
            None => Class::NeedMore,
            Some(0x03) => Class::Tls,
            Some(_) => Class::Opaque,
        };
    }
    if !first.is_ascii_uppercase() {
        return Class::Opaque;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf.get(..n) == H2_PREFACE.get(..n) {
        return if n == H2_PREFACE.len() {
            Class::Opaque
        } else {
            Class::NeedMore
        };
    }
    for (i, &b) in buf.iter().enumerate().skip(1) {
        match b {
            b' ' => return Class::Http,
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD_LEN => {}
            _ => return Class::Opaque,
        }
    }
    Class::NeedMore
}

/// The synchronous core of [`detect`]: classifies `buf` (the bytes a
/// connection has sent so far) and parses it. `Ok(None)`: more bytes are
/// needed. Never returns `Ok(None)` when `buf.len() >= max_bytes`.
pub fn detect_bytes(buf: &[u8], max_bytes: usize) -> Result<Option<Detected>, DetectError> {
    let out = match classify(buf) {
        Class::NeedMore => None,
        Class::Opaque => Some(Detected::Opaque),
        Class::Tls => tls::parse(buf, max_bytes)?.map(Detected::Tls),
        Class::Http => http::parse(buf, max_bytes)?.map(Detected::Http),
    };
    match out {
        None if buf.len() >= max_bytes => match classify(buf) {
            Class::Http => Err(DetectError::BadHttp("header_too_large")),
            Class::Tls => Err(DetectError::TooLarge),
            // Only reachable with a tiny max_bytes.
            _ => Ok(Some(Detected::Opaque)),
        },
        out => Ok(out),
    }
}

/// Peeks (`MSG_PEEK`; never consumes) until a full ClientHello or HTTP/1
/// request head is available, the limit is hit, or the deadline passes.
/// Bytes stay in the socket so the caller can forward them verbatim.
///
/// A client that sends nothing within `first_byte_wait` is
/// [`Detected::Opaque`]; one that sends part of a hello or head and stalls
/// until `deadline` is [`DetectError::Timeout`]. The task sleeps between
/// segments (readiness-driven, no polling loop).
pub async fn detect(stream: &TcpStream, limits: &DetectLimits) -> Result<Detected, DetectError> {
    let start = Instant::now();
    let deadline = start + limits.deadline;
    let first_byte_deadline = start + limits.first_byte_wait.min(limits.deadline);
    let max = limits.max_bytes.max(1);
    let mut buf = vec![0u8; max.min(2048)];
    let mut have = 0usize;
    loop {
        let until = if have == 0 {
            first_byte_deadline
        } else {
            deadline
        };
        let ready = match tokio::time::timeout_at(until, stream.ready(Interest::READABLE)).await {
            Ok(r) => r?,
            Err(_) if have == 0 => return Ok(Detected::Opaque),
            Err(_) => return Err(DetectError::Timeout),
        };
        let n = match peek_more(stream, &mut buf, have, max, ready) {
            Ok(Some(n)) => n,
            // Readiness was stale; it has been cleared, wait again.
            Ok(None) => continue,
            Err(e) => return Err(e),
        };
        have = n;
        if let Some(d) = detect_bytes(buf.get(..have).unwrap_or_default(), max)? {
            return Ok(d);
        }
    }
}

/// One peek. `Ok(Some(n))`: `n > have` bytes are now in `buf` (grown as
/// needed). `Ok(None)`: nothing new; readiness was cleared so the next
/// `ready()` waits for new data.
fn peek_more(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    have: usize,
    max: usize,
    ready: Ready,
) -> Result<Option<usize>, DetectError> {
    loop {
        let fd = stream.as_raw_fd();
        let res = stream.try_io(Interest::READABLE, || {
            nix::sys::socket::recv(fd, buf, nix::sys::socket::MsgFlags::MSG_PEEK)
                .map_err(io::Error::from)
                .and_then(|n| {
                    if n == 0 && !buf.is_empty() {
                        // End of stream with nothing (more) buffered.
                        Ok(0)
                    } else if n <= have && !ready.is_read_closed() {
                        Err(io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(n)
                    }
                })
        });
        let n = match res {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DetectError::Io(e)),
        };
        if n <= have {
            // Read side closed and nothing new can arrive.
            return Err(DetectError::Closed);
        }
        if n == buf.len() && buf.len() < max {
            // The buffer is full: there may be more; grow and peek again.
            let len = (buf.len() * 2).min(max);
            buf.resize(len, 0);
            continue;
        }
        return Ok(Some(n));
    }
}
