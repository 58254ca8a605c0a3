//! Every response the proxy makes up itself, in one place: HTTP statuses
//! with an `x-tollgate-reason` header, TLS alerts, and resets.
//!
//! | side of the failure | HTTP | TLS alert |
//! |---|---|---|
//! | policy | 403 | `unrecognized_name` (112) for a name that is not allowed or malformed, `protocol_version` (70) for TLS < 1.2, else `access_denied` (49) |
//! | downstream | 400; 431 for oversized heads, 408 for a stalled one | what detection suggests, else `decode_error` (50) |
//! | upstream | 502; 504 on a timeout | `internal_error` (80) |
//! | internal | 500 | `internal_error` (80) |
//!
//! Opaque (neither TLS nor HTTP) connections are refused with a reset
//! (`SO_LINGER` 0): there is no protocol to speak a refusal in.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::detect::{self, DetectError};
use crate::policy::DenyReason;
use crate::proxy::{ProxyError, Side};

/// The header that carries the stable reason code of a synthetic response.
pub const REASON_HEADER: HeaderName = HeaderName::from_static("x-tollgate-reason");

/// TLS alert `internal_error`.
pub const ALERT_INTERNAL_ERROR: u8 = 80;
/// TLS alert `protocol_version`.
pub const ALERT_PROTOCOL_VERSION: u8 = 70;

/// Body type of every response the HTTP path returns (synthetic or relayed).
pub type Body = BoxBody<Bytes, hyper::Error>;

/// After a refusal, how long the peer's unread bytes are drained before the
/// socket is closed (closing with unread data would reset the connection and
/// could destroy the alert or response before the client reads it).
const DRAIN_FOR: Duration = Duration::from_secs(1);
/// At most this many unread bytes are drained; past that, reset.
const DRAIN_MAX: usize = 64 * 1024;

/// The HTTP status for a failure.
pub fn status_for(err: &ProxyError) -> StatusCode {
    match err.side() {
        Side::Policy => StatusCode::FORBIDDEN,
        Side::Downstream => match err {
            ProxyError::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Detect(DetectError::Timeout) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Detect(DetectError::TooLarge) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            ProxyError::Detect(DetectError::BadHttp("header_too_large" | "too_many_headers")) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        },
        Side::Upstream if err.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
        Side::Upstream => StatusCode::BAD_GATEWAY,
        Side::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The TLS alert description for a failure on a TLS connection.
pub fn alert_for(err: &ProxyError) -> u8 {
    match err {
        ProxyError::Denied(DenyReason::DomainNotAllowed | DenyReason::InvalidName) => {
            detect::ALERT_UNRECOGNIZED_NAME
        }
        ProxyError::TlsVersion => ALERT_PROTOCOL_VERSION,
        ProxyError::Detect(e) => e
            .tls_alert_description()
            .unwrap_or(detect::ALERT_DECODE_ERROR),
        e => match e.side() {
            Side::Policy => detect::ALERT_ACCESS_DENIED,
            Side::Downstream => detect::ALERT_DECODE_ERROR,
            Side::Upstream | Side::Internal => ALERT_INTERNAL_ERROR,
        },
    }
}

/// Whether the connection should close after the response to `err`: a
/// downstream error leaves the request stream in an unknown state.
pub fn closes_connection(err: &ProxyError) -> bool {
    // A misdirected request leaves the stream intact: the client may retry
    // on another connection while this one serves its own name.
    !matches!(
        err,
        ProxyError::Misdirected | ProxyError::MethodNotAllowed(_)
    ) && matches!(err.side(), Side::Downstream | Side::Internal)
}

fn body_text(status: StatusCode, reason: &str) -> String {
    format!(
        "tollgate: {} {}: {reason}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("error")
    )
}

/// A body from bytes, for synthetic responses.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A synthetic response: `status`, `x-tollgate-reason: reason`, a one-line
/// text body, and `connection: close` when `close`.
pub fn http(status: StatusCode, reason: &'static str, close: bool) -> Response<Body> {
    let mut resp = Response::new(full(body_text(status, reason)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(REASON_HEADER, HeaderValue::from_static(reason));
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    if close {
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The synthetic response for a failure.
pub fn http_error(err: &ProxyError) -> Response<Body> {
    http(status_for(err), err.reason(), closes_connection(err))
}

/// The same response as raw HTTP/1.1 bytes, always `connection: close`, for
/// refusals written before (or instead of) an HTTP server.
pub fn http_raw(status: StatusCode, reason: &str) -> Vec<u8> {
    let body = body_text(status, reason);
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         {}: {reason}\r\ncache-control: no-store\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("error"),
        REASON_HEADER.as_str(),
        body.len(),
    )
    .into_bytes()
}

/// Refuses a connection in its own protocol and closes it: a TLS alert for
/// TLS, a raw HTTP response for HTTP, a reset for anything else.
pub async fn refuse(stream: TcpStream, proto: RefuseAs, err: &ProxyError) {
    match proto {
        RefuseAs::Tls => send_and_close(stream, &detect::tls_alert(alert_for(err))).await,
        RefuseAs::Http => send_and_close(stream, &http_raw(status_for(err), err.reason())).await,
        RefuseAs::Reset => reset(stream),
    }
}

/// The protocol a refusal is spoken in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseAs {
    /// A fatal TLS alert record.
    Tls,
    /// An HTTP/1.1 response with `connection: close`.
    Http,
    /// No words: `SO_LINGER` 0 and close, so the peer sees a reset.
    Reset,
}

/// Writes `bytes`, half-closes, drains what the peer still sends (bounded
/// in time and size) and closes; resets instead if the peer keeps sending.
pub async fn send_and_close(mut stream: TcpStream, bytes: &[u8]) {
    let sent = tokio::time::timeout(DRAIN_FOR, stream.write_all(bytes)).await;
    if !matches!(sent, Ok(Ok(()))) {
        reset(stream);
        return;
    }
    if crate::tunnel::shutdown_write(&stream).is_err() {
        reset(stream);
        return;
    }
    let drained = tokio::time::timeout(DRAIN_FOR, async {
        let mut buf = [0u8; 4096];
        let mut total = 0usize;
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return true,
                Ok(n) => {
                    total += n;
                    if total > DRAIN_MAX {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    })
    .await;
    if !matches!(drained, Ok(true)) {
        reset(stream);
    }
}

/// Closes with a reset (`SO_LINGER` 0): the peer sees `ECONNRESET`.
pub fn reset(stream: TcpStream) {
    // Failing to set the option only downgrades the reset to a close.
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// [`reset`] of a socket that is not on tokio (the kernel tunnel's).
pub fn reset_std(stream: std::net::TcpStream) {
    let zero = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // As above: at worst a close.
    let _ = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &zero);
    drop(stream);
}
