//! Host names and domain patterns: normalisation to lower-case A-labels and
//! the suffix-walk lookup used by the matcher.
//!
//! One normaliser serves both sides, so a pattern and a name that mean the
//! same host always compare equal: ASCII is lower-cased, one trailing dot is
//! dropped, and anything with `xn--` labels or non-ASCII goes through UTS-46
//! `ToASCII` (the `idna` crate).
//!
//! Differences between the two sides, on purpose:
//! * Patterns (config) accept Unicode (`bücher.example` becomes
//!   `xn--bcher-kva.example`) and reject `_`.
//! * Names (SNI, Host, DNS questions) must already be ASCII: a client that
//!   puts a U-label or U+3002 in an SNI is malformed (THREATS #5), and matching
//!   happens on A-labels only (THREATS #7). Names may contain `_` because DNS
//!   questions do (`_mongodb._tcp.cluster.example.net` under
//!   `*.example.net`); no pattern can name such a label exactly.
//! * A name whose last label is numeric (`2130706433`, `127.1`, `0x7f.1`)
//!   reads as an IP address to many resolvers and URL parsers; it is refused on
//!   both sides rather than guessed at.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};

/// Longest name accepted, in bytes, without the trailing dot.
pub(crate) const MAX_NAME_LEN: usize = 253;
/// Longest label accepted, in bytes.
pub(crate) const MAX_LABEL_LEN: usize = 63;
/// Inputs longer than this are refused before any Unicode processing.
const MAX_RAW_LEN: usize = 1024;

/// Every ASCII character that is neither a letter, a digit, `-`, `.` nor `_`
/// (plus space, controls and DEL): rejected inside UTS-46 processing. `_` is
/// decided by the caller's [`Side`].
const DENY: AsciiDenyList = AsciiDenyList::new(true, "!\"#$%&'()*+,/:;<=>?@[\\]^`{|}~");

/// Why a name or pattern is unacceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NameError {
    /// Nothing left after dropping the trailing dot.
    Empty,
    /// A character that no host name may contain.
    BadChar(char),
    /// Non-ASCII in a name that must already be in A-label form.
    NonAscii,
    /// `host:port`.
    Port,
    /// An IPv4 or IPv6 literal where a domain is required.
    IpLiteral,
    /// The last label is numeric, which reads as an IP address.
    NumericTld,
    /// A `*` anywhere but a leading `*.` of a pattern.
    MidWildcard,
    /// `*` alone.
    BareWildcard,
    /// `*.com`: fewer than two labels after `*.`.
    ShortWildcard,
    /// `a..b`, `.a`, or a label that was empty after mapping.
    EmptyLabel,
    /// A label longer than 63 bytes (after A-label conversion).
    LabelTooLong,
    /// A pattern's label that starts or ends with a hyphen (`-bad.com`).
    EdgeHyphen,
    /// More than 253 bytes (after A-label conversion).
    TooLong,
    /// UTS-46 processing refused the name (bad punycode, disallowed code point).
    Idna,
}

/// Which side of the policy a string comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// A domain pattern in the config: Unicode accepted, `_` rejected.
    Pattern,
    /// A name seen on the wire: ASCII only, `_` accepted.
    Wire,
}

/// A host as written in an SNI, Host header or pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Host {
    /// A normalised DNS name.
    Name(String),
    /// An IP literal (`1.2.3.4`, `::1`, `[::1]`).
    Ip(IpAddr),
}

/// A normalised domain pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Pattern {
    /// Matches exactly this name.
    Exact(String),
    /// Matches any name strictly below this suffix (never the suffix itself).
    Wildcard(String),
}

/// Exact names and wildcard suffixes mapped to values; a lookup walks the
/// name's suffixes, so it costs one hash probe per label.
#[derive(Clone, Debug)]
pub(crate) struct DomainMap<V> {
    exact: HashMap<String, V>,
    wildcard: HashMap<String, V>,
}

// === impl NameError ===

impl NameError {
    /// A sentence fragment to follow the quoted input in a validation error.
    pub(crate) fn describe(self) -> String {
        match self {
            Self::Empty => "is empty".into(),
            Self::BadChar(c) => format!(
                "contains {c:?}, which is not allowed in a host name \
                 (letters, digits, hyphens and dots only)"
            ),
            Self::NonAscii => "contains non-ASCII characters".into(),
            Self::Port => "includes a port; domain patterns match every port, \
                           remove the \":port\""
                .into(),
            Self::IpLiteral => "is an IP address; list addresses in allow_cidrs instead".into(),
            Self::NumericTld => "ends in a numeric label, which reads as an IP address; \
                                 list addresses in allow_cidrs instead"
                .into(),
            Self::MidWildcard => "has a wildcard that is not a whole leading label; \
                                  only the form *.example.com is supported"
                .into(),
            Self::BareWildcard => "would allow every domain; use mode allow-all instead".into(),
            Self::ShortWildcard => "is a wildcard over fewer than two labels; \
                                    write at least *.example.com"
                .into(),
            Self::EmptyLabel => "has an empty label (a leading dot or two dots in a row); \
                                 to allow every subdomain write *.example.com"
                .into(),
            Self::LabelTooLong => {
                format!("has a label longer than {MAX_LABEL_LEN} characters")
            }
            Self::EdgeHyphen => "has a label that starts or ends with a hyphen; a label is \
                                 letters, digits and hyphens, with a letter or digit at each end"
                .into(),
            Self::TooLong => format!("is longer than {MAX_NAME_LEN} characters"),
            Self::Idna => "is not a valid internationalised domain name".into(),
        }
    }
}

// === impl Pattern ===

impl Pattern {
    /// Parses and normalises a config pattern: `example.com` or `*.example.com`.
    pub(crate) fn parse(raw: &str) -> Result<Self, NameError> {
        if raw == "*" || raw == "*." {
            return Err(NameError::BareWildcard);
        }
        if let Some(suffix) = raw.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(NameError::MidWildcard);
            }
            let suffix = match parse_host(suffix, Side::Pattern)? {
                Host::Name(n) => n,
                Host::Ip(_) => return Err(NameError::IpLiteral),
            };
            if !suffix.contains('.') {
                return Err(NameError::ShortWildcard);
            }
            // The shortest name the pattern matches is `x.suffix`.
            if suffix.len() + 2 > MAX_NAME_LEN {
                return Err(NameError::TooLong);
            }
            return Ok(Self::Wildcard(suffix));
        }
        if raw.contains('*') {
            return Err(NameError::MidWildcard);
        }
        match parse_host(raw, Side::Pattern)? {
            Host::Name(n) => Ok(Self::Exact(n)),
            Host::Ip(_) => Err(NameError::IpLiteral),
        }
    }

    /// The canonical text: `example.com` or `*.example.com`.
    pub(crate) fn text(&self) -> String {
        match self {
            Self::Exact(n) => n.clone(),
            Self::Wildcard(s) => format!("*.{s}"),
        }
    }
}

// === impl DomainMap ===

impl<V> Default for DomainMap<V> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

impl<V> DomainMap<V> {
    /// Adds a pattern; the first value stored for a pattern is kept.
    pub(crate) fn insert(&mut self, pattern: Pattern, value: V) {
        let (map, key) = match pattern {
            Pattern::Exact(n) => (&mut self.exact, n),
            Pattern::Wildcard(s) => (&mut self.wildcard, s),
        };
        map.entry(key).or_insert(value);
    }

    /// The value of the most specific pattern matching a normalised `name`:
    /// the exact entry, else the wildcard with the longest suffix.
    pub(crate) fn get(&self, name: &str) -> Option<&V> {
        if let Some(v) = self.exact.get(name) {
            return Some(v);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        let mut rest = name;
        while let Some(dot) = rest.find('.') {
            rest = rest.get(dot + 1..).unwrap_or("");
            if let Some(v) = self.wildcard.get(rest) {
                return Some(v);
            }
        }
        None
    }

    /// True when nothing was inserted.
    pub(crate) fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }
}

// === functions ===

/// Classifies and normalises a host: an IP literal, or a name in lower-case
/// A-label form without a trailing dot.
pub(crate) fn parse_host(raw: &str, side: Side) -> Result<Host, NameError> {
    if raw.is_empty() {
        return Err(NameError::Empty);
    }
    if raw.len() > MAX_RAW_LEN {
        return Err(NameError::TooLong);
    }
    if let Some(inner) = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| NameError::BadChar('['));
    }
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let s = raw.strip_suffix('.').unwrap_or(raw);
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    if side == Side::Wire && !s.is_ascii() {
        return Err(NameError::NonAscii);
    }
    precheck_ascii(s, side)?;

    let lower = s.to_ascii_lowercase();
    let needs_idna = !lower.is_ascii() || lower.split('.').any(|l| l.starts_with("xn--"));
    let name = if needs_idna {
        let out = Uts46::new()
            .to_ascii(lower.as_bytes(), DENY, Hyphens::Allow, DnsLength::Ignore)
            .map_err(|_| NameError::Idna)?
            .into_owned();
        // A mapped full stop (U+3002 and friends) may leave a trailing dot.
        match out.strip_suffix('.') {
            Some(stripped) if side == Side::Pattern && !s.ends_with('.') => stripped.to_string(),
            _ => out,
        }
    } else {
        lower
    };
    check_structure(&name, side)?;
    Ok(Host::Name(name))
}

/// Rejects ASCII characters no host may contain, with a precise reason.
fn precheck_ascii(s: &str, side: Side) -> Result<(), NameError> {
    for (i, c) in s.char_indices() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '.' => {}
            '_' if side == Side::Wire => {}
            '*' => return Err(NameError::MidWildcard),
            ':' => {
                let after = s.get(i + 1..).unwrap_or("");
                if !after.is_empty() && after.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(NameError::Port);
                }
                return Err(NameError::BadChar(':'));
            }
            c if c.is_ascii() => return Err(NameError::BadChar(c)),
            _ => {}
        }
    }
    Ok(())
}

/// Length, label and character rules on the final A-label form.
fn check_structure(name: &str, side: Side) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong);
        }
        // Names on the wire are only matched (such a name matches no
        // pattern); a pattern must be a host name that can exist.
        if side == Side::Pattern && (label.starts_with('-') || label.ends_with('-')) {
            return Err(NameError::EdgeHyphen);
        }
        for c in label.chars() {
            match c {
                'a'..='z' | '0'..='9' | '-' => {}
                '_' if side == Side::Wire => {}
                c => return Err(NameError::BadChar(c)),
            }
        }
        last = label;
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if looks_numeric(last) {
        return Err(NameError::NumericTld);
    }
    Ok(())
}

/// A label that IPv4 parsers read as a number: decimal, or `0x` hex.
fn looks_numeric(label: &str) -> bool {
    if label.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    match label.strip_prefix("0x") {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}
