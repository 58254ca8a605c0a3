//! Wire helpers shared by the resolver and the server: host-name validation,
//! query construction, reply matching, `ech` stripping and hand-built error
//! replies that need no encoder.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::svcb::{SvcParamKey, SvcParamValue, SVCB};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// Longest name accepted, in bytes, without the trailing dot.
pub(crate) const MAX_NAME_LEN: usize = 253;
/// Longest label accepted, in bytes.
pub(crate) const MAX_LABEL_LEN: usize = 63;
/// EDNS UDP payload size we advertise (DNS flag day 2020).
pub(crate) const EDNS_PAYLOAD: u16 = 1232;
/// Length of the fixed DNS header.
pub(crate) const HEADER_LEN: usize = 12;

/// Checks one label: 1–63 bytes of `[A-Za-z0-9_-]`.
fn label_ok(label: &[u8]) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL_LEN
        && label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
}

/// A label that IPv4 parsers read as a number: decimal, or `0x` hex.
fn looks_numeric(label: &[u8]) -> bool {
    if label.iter().all(u8::is_ascii_digit) {
        return true;
    }
    match label.strip_prefix(b"0x".as_slice()) {
        Some(hex) => hex.iter().all(u8::is_ascii_hexdigit),
        None => false,
    }
}

/// Validates and normalises labels into `a.b.c` (lower case, no trailing
/// dot). `None` when any rule fails: empty name, bad byte, empty or long
/// label, name longer than 253 bytes, numeric last label.
pub(crate) fn normalize_labels<'a, I>(labels: I) -> Option<String>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut out = String::new();
    let mut last: &[u8] = &[];
    for label in labels {
        if !label_ok(label) {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        for b in label {
            out.push(char::from(b.to_ascii_lowercase()));
        }
        if out.len() > MAX_NAME_LEN {
            return None;
        }
        last = label;
    }
    if out.is_empty() || looks_numeric(last) {
        return None;
    }
    Some(out)
}

/// Normalises a host name given as text (one trailing dot allowed).
pub(crate) fn normalize_text(name: &str) -> Option<String> {
    let s = name.strip_suffix('.').unwrap_or(name);
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return None;
    }
    normalize_labels(s.split('.').map(str::as_bytes))
}

/// Normalises a name decoded from the wire.
pub(crate) fn normalize_name(name: &Name) -> Option<String> {
    normalize_labels(name.iter())
}

/// A fully-qualified [`Name`] from a normalised name.
pub(crate) fn name_from_normalized(normalized: &str) -> Option<Name> {
    let mut name = Name::from_labels(normalized.split('.').map(str::as_bytes)).ok()?;
    name.set_fqdn(true);
    Some(name)
}

/// A printable rendering of a wire name for events and logs: bytes outside
/// the host-name alphabet become `?`, and the text is capped at 255 chars.
pub(crate) fn lossy_name(name: &Name) -> String {
    let mut out = String::new();
    for label in name.iter() {
        if !out.is_empty() {
            out.push('.');
        }
        for b in label {
            let c = if b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_' {
                char::from(b.to_ascii_lowercase())
            } else {
                '?'
            };
            out.push(c);
        }
        if out.len() > 255 {
            out.truncate(255);
            break;
        }
    }
    out
}

/// A recursive query for one question of class IN, with an EDNS OPT record
/// (payload [`EDNS_PAYLOAD`], DO clear) and no other records.
pub(crate) fn build_query(id: u16, name: &Name, qtype: RecordType) -> Option<Vec<u8>> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    let mut q = Query::query(name.clone(), qtype);
    q.set_query_class(DNSClass::IN);
    msg.add_query(q);
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    msg.set_edns(edns);
    msg.to_vec().ok()
}

/// True when `resp` answers our query `id` for `q`: a response, the same id,
/// opcode QUERY, and exactly the same question (name compared without case).
pub(crate) fn reply_matches(resp: &Message, id: u16, q: &Query) -> bool {
    resp.metadata.message_type == MessageType::Response
        && resp.metadata.id == id
        && resp.metadata.op_code == OpCode::Query
        && resp.queries.len() == 1
        && resp.queries.first().is_some_and(|r| {
            r.query_type() == q.query_type()
                && r.query_class() == q.query_class()
                && r.name() == q.name()
        })
}

/// Whether a decoded SVCB/HTTPS record may be relayed once `ech` is
/// removed: not when `mandatory` names `ech` (the record is unusable
/// without it).
fn strip_ech_svcb(svcb: &mut SVCB) -> bool {
    let ech_mandatory = svcb.svc_params.iter().any(|(_, v)| match v {
        SvcParamValue::Mandatory(m) => m.0.contains(&SvcParamKey::EchConfigList),
        _ => false,
    });
    if ech_mandatory {
        return false;
    }
    svcb.svc_params.retain(|(k, v)| {
        *k != SvcParamKey::EchConfigList && !matches!(v, SvcParamValue::EchConfigList(_))
    });
    true
}

/// Removes `ech` SvcParams from the HTTPS (65) and SVCB (64) records of one
/// section; drops those with a mandatory `ech`, and any record of those types
/// that hickory could not decode into its structured form.
fn strip_ech_records(records: &mut Vec<Record>) {
    records.retain_mut(|r| match &mut r.data {
        RData::HTTPS(https) => strip_ech_svcb(&mut https.0),
        RData::SVCB(svcb) => strip_ech_svcb(svcb),
        _ => !matches!(r.record_type(), RecordType::HTTPS | RecordType::SVCB),
    });
}

/// Applies [`strip_ech_records`] to every section of `msg`.
pub(crate) fn strip_ech(msg: &mut Message) {
    strip_ech_records(&mut msg.answers);
    strip_ech_records(&mut msg.authorities);
    strip_ech_records(&mut msg.additionals);
}

/// A 12-byte reply with no sections: the given id, opcode and RD bit echoed,
/// RA set, and `rcode` (low four bits). Needs no encoder, so it cannot fail.
pub(crate) fn header_only(id: u16, opcode: u8, rd: bool, rcode: ResponseCode) -> Vec<u8> {
    let [id_hi, id_lo] = id.to_be_bytes();
    let flags_hi = 0x80 | ((opcode & 0x0f) << 3) | u8::from(rd);
    let code = rcode.low() & 0x0f;
    let flags_lo = 0x80 | code;
    vec![id_hi, id_lo, flags_hi, flags_lo, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// The fields of a raw header that a reply must echo: (id, opcode, RD, QR).
pub(crate) fn raw_header(bytes: &[u8]) -> Option<(u16, u8, bool, bool)> {
    let id = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
    let flags = *bytes.get(2)?;
    bytes.get(HEADER_LEN - 1)?;
    Some((
        id,
        (flags >> 3) & 0x0f,
        flags & 0x01 != 0,
        flags & 0x80 != 0,
    ))
}
