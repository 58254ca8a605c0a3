//! ClientHello reassembly and parsing (RFC 8446 §4.1.2, RFC 6066 §3,
//! RFC 7301, RFC 8701 GREASE).
//!
//! Records of content type 22 are concatenated until the handshake message
//! announced by the first 4 handshake bytes is complete. Strictness, all of
//! which is `BadTls`:
//! * a record of another content type before the hello is complete, a record
//!   version whose major byte is not 3, a record length of 0 or more than
//!   2^14 + 256;
//! * a handshake type other than ClientHello, handshake bytes after the hello
//!   inside its last record (a client's first flight is the hello alone);
//! * any length field that disagrees with its container, an empty cipher
//!   suite or compression list, a session id longer than 32;
//! * an extension type present twice (GREASE included), `pre_shared_key`
//!   not last;
//! * `server_name`: an empty list, a name type other than host_name, more
//!   than one name, a name that fails validation (see `name.rs`);
//! * ALPN: an empty list or an empty protocol; `supported_versions`: an
//!   odd-length or empty list, or one with only GREASE values.

use super::{name, ClientHelloInfo, DetectError};

/// Largest record length accepted (TLSCiphertext bound; plaintext is 2^14).
const MAX_RECORD: usize = 16_384 + 256;
const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_PRE_SHARED_KEY: u16 = 41;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_ECH: u16 = 0xfe0d;
const SNI_HOST_NAME: u8 = 0;

fn bad(detail: &'static str) -> DetectError {
    DetectError::BadTls(detail)
}

/// GREASE values (RFC 8701): 0x0a0a, 0x1a1a, … 0xfafa.
pub(super) fn is_grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff
}

/// A bounds-checked cursor.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DetectError> {
        if n > self.buf.len() {
            return Err(bad(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DetectError> {
        match self.take(1, what)? {
            [b] => Ok(*b),
            _ => Err(bad(what)),
        }
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DetectError> {
        match self.take(2, what)? {
            [a, b] => Ok(u16::from_be_bytes([*a, *b])),
            _ => Err(bad(what)),
        }
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], DetectError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], DetectError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }

    /// Requires that everything was consumed.
    fn finish(&self, what: &'static str) -> Result<(), DetectError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(bad(what))
        }
    }
}

/// Reassembles and parses; see the module docs. `max` bounds the records'
/// total size (headers included).
pub(super) fn parse(buf: &[u8], max: usize) -> Result<Option<ClientHelloInfo>, DetectError> {
    let mut pos = 0usize;
    let mut hs: Vec<u8> = Vec::new();
    let mut record_version: Option<u16> = None;
    loop {
        let header = buf.get(pos..).unwrap_or_default();
        if let Some(&content_type) = header.first() {
            if content_type != CONTENT_HANDSHAKE {
                return Err(bad(if pos == 0 {
                    "not_handshake_record"
                } else {
                    "interleaved_record"
                }));
            }
        }
        if let Some(&major) = header.get(1) {
            if major != 3 {
                return Err(bad("bad_record_version"));
            }
        }
        let [_, major, minor, l0, l1, ..] = *header else {
            return if pos + RECORD_HEADER > max {
                Err(DetectError::TooLarge)
            } else {
                Ok(None)
            };
        };
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        if len == 0 {
            return Err(bad("empty_record"));
        }
        if len > MAX_RECORD {
            return Err(bad("record_too_long"));
        }
        let end = pos + RECORD_HEADER + len;
        if end > max {
            return Err(DetectError::TooLarge);
        }
        record_version.get_or_insert(u16::from_be_bytes([major, minor]));
        let hs_before = hs.len();
        let start = pos + RECORD_HEADER;
        hs.extend_from_slice(buf.get(start..end.min(buf.len())).unwrap_or_default());
        if let Some(&t) = hs.first() {
            if t != HANDSHAKE_CLIENT_HELLO {
                return Err(bad("not_client_hello"));
            }
        }
        let total = match *hs.as_slice() {
            [_, a, b, c, ..] => {
                let total = HANDSHAKE_HEADER
                    + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
                // The records carrying it need at least one header more.
                if total + RECORD_HEADER > max {
                    return Err(DetectError::TooLarge);
                }
                if hs_before + len > total {
                    return Err(bad("trailing_handshake_data"));
                }
                Some(total)
            }
            _ => None,
        };
        if end > buf.len() {
            return Ok(None);
        }
        pos = end;
        if total == Some(hs.len()) {
            break;
        }
    }
    let record_version = record_version.ok_or(bad("truncated_hello"))?;
    let body = hs.get(HANDSHAKE_HEADER..).unwrap_or_default();
    let mut info = parse_body(body)?;
    info.record_version = record_version;
    info.hello_len = hs.len();
    info.wire_len = pos;
    Ok(Some(info))
}

/// Parses the ClientHello body (after the handshake header).
fn parse_body(body: &[u8]) -> Result<ClientHelloInfo, DetectError> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16("truncated_hello")?;
    r.take(32, "truncated_hello")?;
    let session_id = r.vec8("bad_session_id")?;
    if session_id.len() > 32 {
        return Err(bad("bad_session_id"));
    }
    let suites = r.vec16("bad_cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(bad("bad_cipher_suites"));
    }
    let compression = r.vec8("bad_compression_methods")?;
    if compression.is_empty() {
        return Err(bad("bad_compression_methods"));
    }
    let mut info = ClientHelloInfo {
        sni: None,
        alpn: Vec::new(),
        ech: false,
        supported_versions: Vec::new(),
        record_version: 0,
        legacy_version,
        hello_len: 0,
        wire_len: 0,
    };
    // TLS ≤ 1.2 hellos may end here, without an extensions block.
    if !r.is_empty() {
        let extensions = r.vec16("bad_extensions_length")?;
        r.finish("trailing_hello_bytes")?;
        check_extension_types(extensions)?;
        let mut er = Reader::new(extensions);
        while !er.is_empty() {
            let typ = er.u16("truncated_extension")?;
            let data = er.vec16("truncated_extension")?;
            match typ {
                EXT_SERVER_NAME => info.sni = Some(parse_sni(data)?),
                EXT_ALPN => info.alpn = parse_alpn(data)?,
                EXT_SUPPORTED_VERSIONS => info.supported_versions = parse_versions(data)?,
                EXT_ECH => info.ech = true,
                _ => {}
            }
        }
    }
    if info.supported_versions.is_empty() {
        info.supported_versions.push(legacy_version);
    }
    Ok(info)
}

/// First pass over the extensions block: well-formed framing, no type twice,
/// `pre_shared_key` last.
fn check_extension_types(extensions: &[u8]) -> Result<(), DetectError> {
    let mut types = Vec::new();
    let mut er = Reader::new(extensions);
    let mut psk_seen = false;
    while !er.is_empty() {
        let typ = er.u16("truncated_extension")?;
        er.vec16("truncated_extension")?;
        if psk_seen {
            return Err(bad("psk_not_last"));
        }
        psk_seen = typ == EXT_PRE_SHARED_KEY;
        types.push(typ);
    }
    types.sort_unstable();
    if types.windows(2).any(|w| w.first() == w.get(1)) {
        return Err(bad("duplicate_extension"));
    }
    Ok(())
}

fn parse_sni(data: &[u8]) -> Result<String, DetectError> {
    const WHAT: &str = "bad_sni_list";
    let mut r = Reader::new(data);
    let list = r.vec16(WHAT)?;
    r.finish(WHAT)?;
    if list.is_empty() {
        return Err(bad(WHAT));
    }
    let mut lr = Reader::new(list);
    let mut found = None;
    while !lr.is_empty() {
        let typ = lr.u8(WHAT)?;
        let raw = lr.vec16(WHAT)?;
        if typ != SNI_HOST_NAME {
            return Err(bad("unknown_sni_type"));
        }
        if found.is_some() {
            return Err(bad("multiple_sni_names"));
        }
        found = Some(name::validate(raw).map_err(|f| bad(f.sni()))?);
    }
    found.ok_or(bad(WHAT))
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, DetectError> {
    const WHAT: &str = "bad_alpn";
    let mut r = Reader::new(data);
    let list = r.vec16(WHAT)?;
    r.finish(WHAT)?;
    if list.is_empty() {
        return Err(bad(WHAT));
    }
    let mut lr = Reader::new(list);
    let mut out = Vec::new();
    while !lr.is_empty() {
        let proto = lr.vec8(WHAT)?;
        if proto.is_empty() {
            return Err(bad(WHAT));
        }
        out.push(proto.to_vec());
    }
    Ok(out)
}

fn parse_versions(data: &[u8]) -> Result<Vec<u16>, DetectError> {
    const WHAT: &str = "bad_supported_versions";
    let mut r = Reader::new(data);
    let list = r.vec8(WHAT)?;
    r.finish(WHAT)?;
    if list.is_empty() || list.len() % 2 != 0 {
        return Err(bad(WHAT));
    }
    let mut lr = Reader::new(list);
    let mut out = Vec::new();
    while !lr.is_empty() {
        let v = lr.u16(WHAT)?;
        if !is_grease(v) {
            out.push(v);
        }
    }
    if out.is_empty() {
        return Err(bad(WHAT));
    }
    Ok(out)
}
