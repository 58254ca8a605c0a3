//! Validation of names seen on the wire (SNI host_name, Host header).

use std::net::{IpAddr, Ipv6Addr};

/// Longest name, in bytes, without the trailing dot.
const MAX_NAME: usize = 253;
/// Longest label, in bytes.
const MAX_LABEL: usize = 63;

/// Why a wire name is unacceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    Empty,
    Nul,
    NonAscii,
    Wildcard,
    BadChar,
    EmptyLabel,
    LabelTooLong,
    TooLong,
}

impl Fault {
    /// Detail code for `BadTls`.
    pub(super) fn sni(self) -> &'static str {
        match self {
            Self::Empty => "sni_empty",
            Self::Nul => "sni_nul",
            Self::NonAscii => "sni_non_ascii",
            Self::Wildcard => "sni_wildcard",
            Self::BadChar => "sni_bad_char",
            Self::EmptyLabel => "sni_empty_label",
            Self::LabelTooLong => "sni_label_too_long",
            Self::TooLong => "sni_too_long",
        }
    }

    /// Detail code for `BadHttp`.
    pub(super) fn host(self) -> &'static str {
        match self {
            Self::Empty => "host_empty",
            Self::Nul => "host_nul",
            Self::NonAscii => "host_non_ascii",
            Self::Wildcard => "host_wildcard",
            Self::BadChar => "host_bad_char",
            Self::EmptyLabel => "host_empty_label",
            Self::LabelTooLong => "host_label_too_long",
            Self::TooLong => "host_too_long",
        }
    }
}

/// Validates and normalises a name: an IP literal (IPv4 dotted quad or
/// IPv6, returned as sent but lower-cased), or a DNS name of ASCII letters,
/// digits, `-`, `_` and dots, lower-cased, one trailing dot removed, no empty
/// label, labels ≤ 63 and the name ≤ 253 bytes.
pub(super) fn validate(raw: &[u8]) -> Result<String, Fault> {
    if raw.is_empty() {
        return Err(Fault::Empty);
    }
    if raw.contains(&0) {
        return Err(Fault::Nul);
    }
    if !raw.is_ascii() {
        return Err(Fault::NonAscii);
    }
    // ASCII was checked, so this is valid UTF-8.
    let text = std::str::from_utf8(raw).map_err(|_| Fault::NonAscii)?;
    let lower = text.to_ascii_lowercase();
    if lower.contains(':') {
        return match lower.parse::<Ipv6Addr>() {
            Ok(_) => Ok(lower),
            Err(_) => Err(Fault::BadChar),
        };
    }
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.is_empty() {
        return Err(Fault::Empty);
    }
    if name.parse::<IpAddr>().is_ok() {
        return Ok(name.to_owned());
    }
    if name.len() > MAX_NAME {
        return Err(Fault::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(Fault::EmptyLabel);
        }
        if label.len() > MAX_LABEL {
            return Err(Fault::LabelTooLong);
        }
        for b in label.bytes() {
            match b {
                b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => {}
                b'*' => return Err(Fault::Wildcard),
                _ => return Err(Fault::BadChar),
            }
        }
    }
    Ok(name.to_owned())
}
