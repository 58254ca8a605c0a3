//! A second, strict reader of the sandbox's HTTP/1 byte stream.
//!
//! hyper's server is forgiving in ways that are safe for an origin but hide
//! smuggling attempts from a proxy: it silently drops `Content-Length` when
//! `Transfer-Encoding` is present, merges equal duplicate lengths, and
//! accepts codings before `chunked`. So every byte hyper reads from the
//! sandbox also passes through a [`Scanner`], which finds each request head
//! at its exact position (tracking the body framing in between), parses it
//! with the same strict parser that detection uses
//! ([`crate::detect::parse_http_head_limited`]) and adds the proxy's own
//! rules:
//!
//! * `Transfer-Encoding` must be exactly `chunked` (a token list with one
//!   element, no other coding);
//! * no `CONNECT`; `Upgrade` only to `websocket` (never `h2c`).
//!
//! One [`HeadCheck`] per head is queued in stream order; the request handler
//! pops one per request hyper hands it (hyper parses heads in the same
//! order), so a rejected head turns into `400` + close for exactly that
//! request. After a rejected head or an upgrade request the scanner stops
//! ([`Phase::Off`]); the handler then closes the connection after the
//! response, so no later request goes unchecked. A malformed chunked body is
//! an I/O error for hyper (the request aborts, the connection closes).

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use crate::detect::{self, HttpHead};
use crate::proxy::ProxyError;

/// Longest chunk extension or trailer line accepted, in bytes.
const MAX_LINE: usize = 8 * 1024;
/// Most hex digits in a chunk size (fits u64).
const MAX_SIZE_DIGITS: u8 = 16;

/// The verdict on one request head.
#[derive(Debug)]
pub(super) enum HeadCheck {
    /// Acceptable; what the handler needs from it.
    Ok(HeadInfo),
    /// Refused: answer 400 (or 431) and close.
    Reject(ProxyError),
}

/// An accepted head.
#[derive(Debug)]
pub(super) struct HeadInfo {
    /// As parsed by detection (lower-case host, no port, IPv6 unbracketed).
    pub(super) head: HttpHead,
    /// The request asks to upgrade to a WebSocket.
    pub(super) upgrade: bool,
}

/// Where in the stream the scanner is.
#[derive(Debug)]
enum Phase {
    /// Collecting a request head.
    Head,
    /// Inside a `Content-Length` body: bytes left.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Stopped (after a rejected head or an upgrade request).
    Off,
}

/// Position inside a chunked body.
#[derive(Debug)]
enum Chunk {
    /// Reading the hex size: value so far, digits so far.
    Size(u64, u8),
    /// Skipping a chunk extension (after `;`): size, bytes so far.
    Ext(u64, usize),
    /// After the size line's CR.
    SizeLf(u64),
    /// Inside chunk data: bytes left.
    Data(u64),
    /// After chunk data: expecting CR.
    DataCr,
    /// After chunk data's CR: expecting LF.
    DataLf,
    /// In the trailer section: bytes on the current line, whether CR seen.
    Trailer(usize, bool),
}

#[derive(Debug)]
struct State {
    phase: Phase,
    head: Vec<u8>,
    max_head: usize,
    checks: VecDeque<HeadCheck>,
}

/// The strict reader; shared by the I/O wrapper (which feeds it) and the
/// request handler (which pops verdicts).
#[derive(Debug)]
pub(super) struct Scanner {
    state: Mutex<State>,
}

// === impl Scanner ===

impl Scanner {
    /// A scanner expecting a request head of at most `max_head` bytes.
    pub(super) fn new(max_head: usize) -> Self {
        Self {
            state: Mutex::new(State {
                phase: Phase::Head,
                head: Vec::new(),
                max_head,
                checks: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads bytes hyper is about to see. `Err` (a malformed chunked body)
    /// must end the connection.
    pub(super) fn feed(&self, input: &[u8]) -> Result<(), &'static str> {
        self.lock().feed(input)
    }

    /// The verdict on the next request head, in stream order.
    pub(super) fn pop(&self) -> Option<HeadCheck> {
        self.lock().checks.pop_front()
    }
}

// === impl State ===

impl State {
    fn feed(&mut self, mut input: &[u8]) -> Result<(), &'static str> {
        while !input.is_empty() {
            match &mut self.phase {
                Phase::Off => return Ok(()),
                Phase::Head => input = self.feed_head(input),
                Phase::Body(left) => {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(input.len());
                    *left -= take as u64;
                    input = input.get(take..).unwrap_or_default();
                    if *left == 0 {
                        self.phase = Phase::Head;
                    }
                }
                Phase::Chunked(_) => input = self.feed_chunked(input)?,
            }
        }
        Ok(())
    }

    /// Appends to the head; once it is complete, judges it and returns the
    /// bytes after it.
    fn feed_head<'a>(&mut self, input: &'a [u8]) -> &'a [u8] {
        let prev = self.head.len();
        self.head.extend_from_slice(input);
        // Only parse when the end of a head may have arrived (or the cap is
        // reached, which the parser reports): a client dribbling one byte at
        // a time costs one short search per byte, not a full parse.
        let from = prev.saturating_sub(3);
        let ended = self
            .head
            .get(from..)
            .is_some_and(|w| w.windows(2).any(|p| p == b"\n\r" || p == b"\n\n"));
        if !ended && self.head.len() < self.max_head {
            return &[];
        }
        match detect::parse_http_head_limited(&self.head, self.max_head) {
            Ok(None) => &[],
            Err(e) => {
                self.reject(ProxyError::Detect(e));
                &[]
            }
            Ok(Some(head)) => {
                let used = head.head_len.saturating_sub(prev).min(input.len());
                let raw = std::mem::take(&mut self.head);
                let raw = raw.get(..head.head_len).unwrap_or_default();
                self.judge(raw, head);
                input.get(used..).unwrap_or_default()
            }
        }
    }

    fn reject(&mut self, err: ProxyError) {
        self.checks.push_back(HeadCheck::Reject(err));
        self.phase = Phase::Off;
        self.head = Vec::new();
    }

    /// The proxy's own rules on a head detection accepted; sets the phase
    /// for its body.
    fn judge(&mut self, raw: &[u8], head: HttpHead) {
        if head.method.eq_ignore_ascii_case("CONNECT") {
            return self.reject(ProxyError::BadRequest("connect"));
        }
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut upgrade = false;
        for (name, value) in fields(raw) {
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                let mut codings = value
                    .split(|&b| b == b',')
                    .map(trim)
                    .filter(|c| !c.is_empty());
                let only_chunked = codings
                    .next()
                    .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
                    && codings.next().is_none();
                if !only_chunked {
                    return self.reject(ProxyError::BadRequest("transfer_encoding"));
                }
                chunked = true;
            } else if name.eq_ignore_ascii_case(b"content-length") {
                // Detection accepted it: one field, plain digits.
                let parsed = std::str::from_utf8(trim(value))
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok());
                match parsed {
                    Some(n) => length = Some(n),
                    None => return self.reject(ProxyError::BadRequest("content_length")),
                }
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                for proto in value.split(|&b| b == b',').map(trim) {
                    let proto = proto.split(|&b| b == b'/').next().unwrap_or_default();
                    if proto.eq_ignore_ascii_case(b"h2c") {
                        return self.reject(ProxyError::BadRequest("h2c_upgrade"));
                    }
                    if !proto.eq_ignore_ascii_case(b"websocket") {
                        return self.reject(ProxyError::BadRequest("upgrade_not_allowed"));
                    }
                }
                upgrade = true;
            } else if name.eq_ignore_ascii_case(b"http2-settings") {
                return self.reject(ProxyError::BadRequest("h2c_upgrade"));
            }
        }
        if chunked && length.is_some() {
            // Detection refuses this already; never rely on one layer.
            return self.reject(ProxyError::BadRequest("cl_and_te"));
        }
        self.checks
            .push_back(HeadCheck::Ok(HeadInfo { head, upgrade }));
        self.phase = if upgrade {
            Phase::Off
        } else if chunked {
            Phase::Chunked(Chunk::Size(0, 0))
        } else {
            match length {
                Some(n) if n > 0 => Phase::Body(n),
                _ => Phase::Head,
            }
        };
    }

    /// Walks a chunked body; returns the bytes after it once it ends.
    fn feed_chunked<'a>(&mut self, mut input: &'a [u8]) -> Result<&'a [u8], &'static str> {
        const BAD: &str = "bad_chunked_body";
        while let Phase::Chunked(chunk) = &mut self.phase {
            if let Chunk::Data(left) = chunk {
                let take = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                *left -= take as u64;
                input = input.get(take..).unwrap_or_default();
                if *left == 0 {
                    *chunk = Chunk::DataCr;
                }
                if input.is_empty() {
                    return Ok(input);
                }
                continue;
            }
            let Some((&b, rest)) = input.split_first() else {
                return Ok(input);
            };
            input = rest;
            *chunk = match *chunk {
                Chunk::Size(v, n) => match (b as char).to_digit(16) {
                    Some(d) if n < MAX_SIZE_DIGITS => Chunk::Size(v << 4 | u64::from(d), n + 1),
                    Some(_) => return Err(BAD),
                    None if n == 0 => return Err(BAD),
                    None if b == b';' => Chunk::Ext(v, 0),
                    None if b == b'\r' => Chunk::SizeLf(v),
                    None => return Err(BAD),
                },
                Chunk::Ext(v, len) => match b {
                    b'\r' => Chunk::SizeLf(v),
                    b'\n' | 0 => return Err(BAD),
                    _ if len >= MAX_LINE => return Err(BAD),
                    _ => Chunk::Ext(v, len + 1),
                },
                Chunk::SizeLf(v) => match b {
                    b'\n' if v == 0 => Chunk::Trailer(0, false),
                    b'\n' => Chunk::Data(v),
                    _ => return Err(BAD),
                },
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::Size(0, 0),
                Chunk::DataCr | Chunk::DataLf => return Err(BAD),
                Chunk::Trailer(len, cr) => match b {
                    b'\r' if !cr => Chunk::Trailer(len, true),
                    b'\n' if cr && len == 0 => {
                        self.phase = Phase::Head;
                        break;
                    }
                    b'\n' if cr => Chunk::Trailer(0, false),
                    _ if cr || b == b'\n' || b == 0 => return Err(BAD),
                    _ if len >= MAX_LINE => return Err(BAD),
                    _ => Chunk::Trailer(len + 1, false),
                },
                Chunk::Data(_) => return Err(BAD),
            };
        }
        Ok(input)
    }
}

/// `(name, value)` of each header line of a head that detection accepted
/// (CRLF line ends, no obs-fold). Values are not trimmed.
fn fields(raw: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    raw.split(|&b| b == b'\n')
        .skip(1)
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty())
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            Some((line.get(..colon)?, line.get(colon + 1..)?))
        })
}

/// Strips optional whitespace (SP / HTAB) on both ends.
fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}
