//! HTTP/1.x request-head parsing (RFC 9112) for the Host decision.
//!
//! Strict on purpose: the head is forwarded verbatim to an upstream that may
//! read it differently, so anything two parsers could disagree on is an
//! error (`BadHttp`), checked as bytes arrive where possible:
//! * NUL anywhere, LF not preceded by CR (`bare_lf`), CR not followed by LF
//!   (`bare_cr`), no CRLFCRLF within the cap (`header_too_large`);
//! * request line other than `token SP target SP HTTP/1.0|1.1`; a target
//!   with controls, spaces or non-ASCII;
//! * obs-fold, whitespace in or before the colon of a field name, a name that
//!   is not a token, a value with controls, more than 100 fields;
//! * Host: missing (1.0 included: a name is required), twice, empty, with
//!   userinfo, with a port that is not 1–65535, or a bad name; an
//!   absolute-form or CONNECT target whose authority differs from Host
//!   (case-insensitive, default ports of http/https/ws/wss applied);
//! * framing (THREATS #22): Content-Length twice or not plain digits,
//!   Transfer-Encoding twice, with Content-Length, in HTTP/1.0, with trailing
//!   whitespace, or whose codings are not `[gzip|deflate|compress …,]
//!   chunked`.

use std::net::Ipv6Addr;

use super::{name, DetectError, HttpHead};

/// Most header fields accepted (Envoy's default).
const MAX_HEADERS: usize = 100;
/// Longest Content-Length value accepted, in digits.
const MAX_CL_DIGITS: usize = 18;

fn bad(detail: &'static str) -> DetectError {
    DetectError::BadHttp(detail)
}

/// RFC 9110 `tchar`.
pub(super) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_ows(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_ows(*last) {
            break;
        }
        s = rest;
    }
    s
}

fn ascii(b: &[u8]) -> String {
    b.iter().map(|&c| char::from(c)).collect()
}

/// Finds the end of the head (index after CRLFCRLF) in `window`, rejecting
/// NUL, bare LF, bare CR and a bad method as soon as they are visible.
fn find_end(window: &[u8]) -> Result<Option<usize>, DetectError> {
    let mut last = [0u8; 3];
    let mut in_method = true;
    for (i, &b) in window.iter().enumerate() {
        match b {
            0 => return Err(bad("nul_byte")),
            b'\n' if last[2] != b'\r' => return Err(bad("bare_lf")),
            b'\n' if last == [b'\r', b'\n', b'\r'] => return Ok(Some(i + 1)),
            _ if last[2] == b'\r' && b != b'\n' => return Err(bad("bare_cr")),
            _ => {}
        }
        if in_method {
            if b == b' ' && i > 0 {
                in_method = false;
            } else if !is_tchar(b) {
                return Err(bad("invalid_method"));
            }
        }
        last = [last[1], last[2], b];
    }
    Ok(None)
}

/// Parses a request head; see the module docs.
pub(super) fn parse(buf: &[u8], max: usize) -> Result<Option<HttpHead>, DetectError> {
    let window = buf.get(..buf.len().min(max)).unwrap_or_default();
    let Some(head_len) = find_end(window)? else {
        return if buf.len() >= max {
            Err(bad("header_too_large"))
        } else {
            Ok(None)
        };
    };
    // Everything before the final CRLFCRLF; every LF here follows a CR.
    let body = window.get(..head_len.saturating_sub(4)).unwrap_or_default();
    let mut lines = body
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let (method, target, version) = parse_request_line(request_line)?;

    let mut host: Option<&[u8]> = None;
    let mut content_length: Option<&[u8]> = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    for (count, line) in lines.enumerate() {
        if count >= MAX_HEADERS {
            return Err(bad("too_many_headers"));
        }
        let Some(&first) = line.first() else {
            return Err(bad("bad_header_line"));
        };
        if is_ows(first) {
            return Err(bad("obs_fold"));
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(bad("missing_colon"));
        };
        let (field, rest) = line.split_at(colon);
        let raw_value = rest.get(1..).unwrap_or_default();
        if field.iter().any(|&b| is_ows(b)) {
            return Err(bad("space_before_colon"));
        }
        if field.is_empty() || !field.iter().all(|&b| is_tchar(b)) {
            return Err(bad("bad_header_name"));
        }
        if raw_value
            .iter()
            .any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f))
        {
            return Err(bad("bad_header_value"));
        }
        let value = trim_ows(raw_value);
        if field.eq_ignore_ascii_case(b"host") {
            if host.replace(value).is_some() {
                return Err(bad("duplicate_host"));
            }
        } else if field.eq_ignore_ascii_case(b"content-length") {
            if content_length.replace(value).is_some() {
                return Err(bad("duplicate_content_length"));
            }
            if value.is_empty()
                || value.len() > MAX_CL_DIGITS
                || !value.iter().all(u8::is_ascii_digit)
            {
                return Err(bad("bad_content_length"));
            }
        } else if field.eq_ignore_ascii_case(b"transfer-encoding") {
            // Leading OWS is the usual `: `; trailing whitespace is not
            // tolerated (`chunked ` is read differently by some servers).
            let v = raw_value.trim_ascii_start();
            if transfer_encoding.replace(v).is_some() {
                return Err(bad("duplicate_transfer_encoding"));
            }
        }
    }
    if let Some(te) = transfer_encoding {
        if version == 0 {
            return Err(bad("te_in_http10"));
        }
        if content_length.is_some() {
            return Err(bad("cl_and_te"));
        }
        check_transfer_encoding(te)?;
    }

    let host = host.ok_or(bad("missing_host"))?;
    let (host, port) = parse_authority(host)?;
    check_target(method, target, &host, port)?;
    Ok(Some(HttpHead {
        method: ascii(method),
        target: ascii(target),
        host,
        port,
        version,
        head_len,
    }))
}

fn parse_request_line(line: &[u8]) -> Result<(&[u8], &[u8], u8), DetectError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("bad_request_line"));
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(bad("invalid_method"));
    }
    if target.is_empty() || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Err(bad("invalid_target"));
    }
    let version = match version {
        b"HTTP/1.1" => 1,
        b"HTTP/1.0" => 0,
        _ => return Err(bad("unsupported_version")),
    };
    Ok((method, target, version))
}

/// `[coding ,]* chunked` with codings from a short list; no parameters.
fn check_transfer_encoding(value: &[u8]) -> Result<(), DetectError> {
    const WHAT: &str = "bad_transfer_encoding";
    if value.last().is_some_and(|&b| is_ows(b)) {
        return Err(bad(WHAT));
    }
    let codings: Vec<&[u8]> = value.split(|&b| b == b',').map(trim_ows).collect();
    let Some((last, before)) = codings.split_last() else {
        return Err(bad(WHAT));
    };
    if !last.eq_ignore_ascii_case(b"chunked") {
        return Err(bad(WHAT));
    }
    for c in before {
        let known = [
            &b"gzip"[..],
            b"x-gzip",
            b"deflate",
            b"compress",
            b"x-compress",
        ]
        .iter()
        .any(|k| c.eq_ignore_ascii_case(k));
        if !known {
            return Err(bad(WHAT));
        }
    }
    Ok(())
}

/// Parses `host[:port]` or `[v6][:port]` into a validated host (IPv6 without
/// brackets) and port.
fn parse_authority(raw: &[u8]) -> Result<(String, Option<u16>), DetectError> {
    if raw.contains(&b'@') {
        return Err(bad("userinfo"));
    }
    if raw.is_empty() {
        return Err(bad("host_empty"));
    }
    let (host, port) = if let Some(rest) = raw.strip_prefix(b"[") {
        let close = rest
            .iter()
            .position(|&b| b == b']')
            .ok_or(bad("bad_host"))?;
        let (inner, after) = rest.split_at(close);
        let after = after.get(1..).unwrap_or_default();
        let ip: Ipv6Addr = std::str::from_utf8(inner)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(bad("bad_host"))?;
        let port = match after {
            [] => None,
            [b':', p @ ..] => Some(p),
            _ => return Err(bad("bad_host")),
        };
        (ip.to_string(), port)
    } else {
        let (name, port) = match raw.iter().position(|&b| b == b':') {
            Some(i) => {
                let (n, p) = raw.split_at(i);
                (n, Some(p.get(1..).unwrap_or_default()))
            }
            None => (raw, None),
        };
        (name::validate(name).map_err(|f| bad(f.host()))?, port)
    };
    let port = match port {
        None => None,
        Some(p) => Some(parse_port(p)?),
    };
    Ok((host, port))
}

fn parse_port(p: &[u8]) -> Result<u16, DetectError> {
    if p.is_empty() || p.len() > 5 || !p.iter().all(u8::is_ascii_digit) {
        return Err(bad("bad_port"));
    }
    let n = p
        .iter()
        .fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0'));
    match u16::try_from(n) {
        Ok(n) if n != 0 => Ok(n),
        _ => Err(bad("bad_port")),
    }
}

/// Checks the target's form and that an authority in it agrees with Host.
fn check_target(
    method: &[u8],
    target: &[u8],
    host: &str,
    port: Option<u16>,
) -> Result<(), DetectError> {
    if target.first() == Some(&b'/') {
        return Ok(());
    }
    if target == b"*" {
        return if method == b"OPTIONS" {
            Ok(())
        } else {
            Err(bad("invalid_target"))
        };
    }
    if method == b"CONNECT" {
        let (t_host, t_port) = parse_authority(target)?;
        if t_port.is_none() {
            return Err(bad("bad_port"));
        }
        if t_host != host || port.is_some_and(|p| Some(p) != t_port) {
            return Err(bad("host_mismatch"));
        }
        return Ok(());
    }
    // absolute-form: scheme "://" authority [ path-abempty ] [ "?" query ]
    let Some(sep) = target.windows(3).position(|w| w == b"://") else {
        return Err(bad("invalid_target"));
    };
    let (scheme, rest) = target.split_at(sep);
    let valid_scheme = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.');
    if !valid_scheme {
        return Err(bad("invalid_target"));
    }
    let rest = rest.get(3..).unwrap_or_default();
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?' || b == b'#')
        .unwrap_or(rest.len());
    let authority = rest.get(..end).unwrap_or_default();
    let (t_host, t_port) = parse_authority(authority)?;
    let default = if scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"ws") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case(b"https") || scheme.eq_ignore_ascii_case(b"wss") {
        Some(443)
    } else {
        None
    };
    if t_host != host || t_port.or(default) != port.or(default) {
        return Err(bad("host_mismatch"));
    }
    Ok(())
}
