//! Validation of a JSON `network_policy`, by hand rather than through serde,
//! so that every bad field is reported at once with its path.
//!
//! Rules (DESIGN.md "Policy semantics", THREATS #7, #12, #25):
//! * The policy is an object with `mode` (required: `allow-all`, `deny-all`
//!   or `custom`) and optional `allow_domains`, `allow_cidrs`, `transforms`;
//!   `null` counts as omitted; any other field is an error.
//! * At most 50 domains, 10 CIDRs and 20 transforms (the error is on the
//!   list; its entries are still checked).
//! * Domain patterns: see `domain`. Duplicates after normalisation are an
//!   error on the later entry, in `allow_domains` and among transform domains.
//! * CIDRs: `addr/len` or a bare address (/32, /128), canonical text, no host
//!   bits, no duplicates.
//! * `inject_headers`: names are RFC 9110 tokens, unique case-insensitively,
//!   and not hop-by-hop, framing, `Proxy-*` or pseudo-headers; keys keep the
//!   case the user wrote. Values are strings without control characters other
//!   than HTAB (so no CR, LF, NUL) and at most 16 KiB; errors never echo a
//!   value.
//! * `strip_headers`: tokens, stored lower-case and de-duplicated; `Host`,
//!   `Content-Length` and `Transfer-Encoding` cannot be stripped because the
//!   proxy owns Host checking and message framing.
//! * `deny-all` with domains, CIDRs or transforms is accepted; they are inert.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use super::domain::Pattern;
use super::net::{parse_cidr, CidrError};
use super::{
    FieldError, Mode, NetworkPolicy, Transform, MAX_ALLOW_CIDRS, MAX_ALLOW_DOMAINS,
    MAX_HEADER_VALUE_LEN, MAX_TRANSFORMS,
};

const POLICY_FIELDS: &str = "mode, allow_domains, allow_cidrs and transforms";
const TRANSFORM_FIELDS: &str = "domain, inject_headers and strip_headers";
const MODES: &str = "\"allow-all\", \"deny-all\" or \"custom\"";

/// Headers the proxy owns; `inject_headers` may not set them.
const NOT_INJECTABLE: [&str; 8] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
];

/// Headers `strip_headers` may not remove.
const NOT_STRIPPABLE: [&str; 3] = ["host", "content-length", "transfer-encoding"];

/// Collects errors while walking.
#[derive(Default)]
struct Errors(Vec<FieldError>);

// === impl Errors ===

impl Errors {
    fn push(&mut self, field: &str, error: impl Into<String>) {
        self.0.push(FieldError {
            field: field.to_string(),
            error: error.into(),
        });
    }
}

// === entry point ===

/// Validates and normalises a policy; see the module docs.
pub(super) fn policy(value: &Value, path: &str) -> Result<NetworkPolicy, Vec<FieldError>> {
    let mut errs = Errors::default();
    let Some(obj) = value.as_object() else {
        errs.push(
            path,
            format!(
                "must be an object with {POLICY_FIELDS}, not {}.",
                kind(value)
            ),
        );
        return Err(errs.0);
    };

    let mode = mode(present(obj, "mode"), &field(path, "mode"), &mut errs);
    let allow_domains = allow_domains(
        present(obj, "allow_domains"),
        &field(path, "allow_domains"),
        &mut errs,
    );
    let allow_cidrs = allow_cidrs(
        present(obj, "allow_cidrs"),
        &field(path, "allow_cidrs"),
        &mut errs,
    );
    let transforms = transforms(
        present(obj, "transforms"),
        &field(path, "transforms"),
        &mut errs,
    );
    unknown_fields(
        obj,
        &["mode", "allow_domains", "allow_cidrs", "transforms"],
        POLICY_FIELDS,
        path,
        &mut errs,
    );

    match mode {
        Some(mode) if errs.0.is_empty() => Ok(NetworkPolicy {
            mode,
            allow_domains,
            allow_cidrs,
            transforms,
        }),
        _ => Err(errs.0),
    }
}

// === fields ===

fn mode(v: Option<&Value>, path: &str, errs: &mut Errors) -> Option<Mode> {
    match v {
        None => {
            errs.push(path, format!("is required: one of {MODES}."));
            None
        }
        Some(Value::String(s)) => match s.as_str() {
            "allow-all" => Some(Mode::AllowAll),
            "deny-all" => Some(Mode::DenyAll),
            "custom" => Some(Mode::Custom),
            other => {
                errs.push(
                    path,
                    format!("must be one of {MODES}, not {}.", quote(other)),
                );
                None
            }
        },
        Some(other) => {
            errs.push(
                path,
                format!("must be a string, one of {MODES}, not {}.", kind(other)),
            );
            None
        }
    }
}

fn allow_domains(v: Option<&Value>, path: &str, errs: &mut Errors) -> Vec<String> {
    let items = string_list(v, path, errs);
    check_limit(items.len(), MAX_ALLOW_DOMAINS, "domains", path, errs);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, raw) in items.iter().enumerate() {
        let Some(raw) = raw else { continue };
        let item_path = index(path, i);
        match Pattern::parse(raw) {
            Err(e) => errs.push(&item_path, format!("{} {}.", quote(raw), e.describe())),
            Ok(p) => {
                let text = p.text();
                if let Some(first) = seen.get(&text) {
                    errs.push(
                        &item_path,
                        format!(
                            "{} duplicates allow_domains[{first}] (both are {text}).",
                            quote(raw)
                        ),
                    );
                } else {
                    seen.insert(text.clone(), i);
                    out.push(text);
                }
            }
        }
    }
    out
}

fn allow_cidrs(v: Option<&Value>, path: &str, errs: &mut Errors) -> Vec<String> {
    let items = string_list(v, path, errs);
    check_limit(items.len(), MAX_ALLOW_CIDRS, "CIDRs", path, errs);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, raw) in items.iter().enumerate() {
        let Some(raw) = raw else { continue };
        let item_path = index(path, i);
        match parse_cidr(raw) {
            Err(CidrError::Syntax) => errs.push(
                &item_path,
                format!(
                    "{} is not an IP address or network; write e.g. 10.0.0.0/8, \
                     2001:db8::/32 or 203.0.113.7.",
                    quote(raw)
                ),
            ),
            Err(CidrError::HostBits(net)) => errs.push(
                &item_path,
                format!("{raw} has host bits set; did you mean {net}?"),
            ),
            Ok(net) => {
                let text = net.to_string();
                if let Some(first) = seen.get(&text) {
                    errs.push(
                        &item_path,
                        format!(
                            "{} duplicates allow_cidrs[{first}] (both are {text}).",
                            quote(raw)
                        ),
                    );
                } else {
                    seen.insert(text.clone(), i);
                    out.push(text);
                }
            }
        }
    }
    out
}

fn transforms(v: Option<&Value>, path: &str, errs: &mut Errors) -> Vec<Transform> {
    let items = match v {
        None => return Vec::new(),
        Some(Value::Array(items)) => items,
        Some(other) => {
            errs.push(
                path,
                format!(
                    "must be a list of objects with {TRANSFORM_FIELDS}, not {}.",
                    kind(other)
                ),
            );
            return Vec::new();
        }
    };
    check_limit(items.len(), MAX_TRANSFORMS, "transforms", path, errs);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let item_path = index(path, i);
        let Some(obj) = item.as_object() else {
            errs.push(
                &item_path,
                format!(
                    "must be an object with {TRANSFORM_FIELDS}, not {}.",
                    kind(item)
                ),
            );
            continue;
        };
        let before = errs.0.len();
        let domain_path = field(&item_path, "domain");
        let domain = match present(obj, "domain") {
            None => {
                errs.push(
                    &domain_path,
                    "is required: the domain pattern this rule applies to.",
                );
                None
            }
            Some(Value::String(raw)) => match Pattern::parse(raw) {
                Err(e) => {
                    errs.push(&domain_path, format!("{} {}.", quote(raw), e.describe()));
                    None
                }
                Ok(p) => {
                    let text = p.text();
                    if let Some(first) = seen.get(&text) {
                        errs.push(
                            &domain_path,
                            format!(
                                "{} duplicates transforms[{first}].domain (both are {text}).",
                                quote(raw)
                            ),
                        );
                        None
                    } else {
                        seen.insert(text.clone(), i);
                        Some(text)
                    }
                }
            },
            Some(other) => {
                errs.push(
                    &domain_path,
                    format!("must be a string, not {}.", kind(other)),
                );
                None
            }
        };
        let inject_headers = inject_headers(
            present(obj, "inject_headers"),
            &field(&item_path, "inject_headers"),
            errs,
        );
        let strip_headers = strip_headers(
            present(obj, "strip_headers"),
            &field(&item_path, "strip_headers"),
            errs,
        );
        unknown_fields(
            obj,
            &["domain", "inject_headers", "strip_headers"],
            TRANSFORM_FIELDS,
            &item_path,
            errs,
        );
        if let (Some(domain), true) = (domain, errs.0.len() == before) {
            out.push(Transform {
                domain,
                inject_headers,
                strip_headers,
            });
        }
    }
    out
}

fn inject_headers(v: Option<&Value>, path: &str, errs: &mut Errors) -> BTreeMap<String, String> {
    let map = match v {
        None => return BTreeMap::new(),
        Some(Value::Object(map)) => map,
        Some(other) => {
            errs.push(
                path,
                format!(
                    "must be an object mapping header names to values, not {}.",
                    kind(other)
                ),
            );
            return BTreeMap::new();
        }
    };
    let mut seen: HashMap<String, &str> = HashMap::new();
    let mut out = BTreeMap::new();
    for (name, value) in map {
        let header_path = field(path, name);
        let lower = name.to_ascii_lowercase();
        let mut ok = match header_name_problem(name) {
            Some(problem) => {
                errs.push(&header_path, problem);
                false
            }
            None => match injectable_problem(&lower) {
                Some(problem) => {
                    errs.push(&header_path, format!("{name} {problem}"));
                    false
                }
                None => true,
            },
        };
        if ok {
            if let Some(first) = seen.get(&lower) {
                errs.push(
                    &header_path,
                    format!(
                        "{name} duplicates header {first} (header names are case-insensitive)."
                    ),
                );
                ok = false;
            } else {
                seen.insert(lower, name);
            }
        }
        match value {
            Value::String(s) => {
                if let Some(problem) = header_value_problem(s) {
                    errs.push(&header_path, problem);
                } else if ok {
                    out.insert(name.clone(), s.clone());
                }
            }
            other => errs.push(
                &header_path,
                format!("must be a string value, not {}.", kind(other)),
            ),
        }
    }
    out
}

fn strip_headers(v: Option<&Value>, path: &str, errs: &mut Errors) -> Vec<String> {
    let items = string_list(v, path, errs);
    let mut out: Vec<String> = Vec::new();
    for (i, raw) in items.iter().enumerate() {
        let Some(raw) = raw else { continue };
        let item_path = index(path, i);
        if let Some(problem) = header_name_problem(raw) {
            errs.push(&item_path, problem);
            continue;
        }
        let lower = raw.to_ascii_lowercase();
        if NOT_STRIPPABLE.contains(&lower.as_str()) {
            errs.push(
                &item_path,
                format!(
                    "{raw} cannot be stripped: the proxy manages Host and message framing itself."
                ),
            );
            continue;
        }
        if !out.contains(&lower) {
            out.push(lower);
        }
    }
    out
}

// === header rules ===

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Why `name` is not a valid header name, as a sentence.
fn header_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("A header name must not be empty.".into());
    }
    if name.starts_with(':') {
        return Some(format!(
            "{} is a pseudo-header; pseudo-headers cannot be set or removed.",
            quote(name)
        ));
    }
    if !name.bytes().all(is_tchar) {
        return Some(format!(
            "{} is not a valid header name: use letters, digits and !#$%&'*+-.^_`|~ only \
             (an RFC 9110 token).",
            quote(name)
        ));
    }
    None
}

/// Why a (valid, lower-cased) header name cannot be injected.
fn injectable_problem(lower: &str) -> Option<&'static str> {
    if NOT_INJECTABLE.contains(&lower) {
        return Some(
            "cannot be injected: the proxy manages hop-by-hop and framing headers itself.",
        );
    }
    if lower.starts_with("proxy-") {
        return Some("cannot be injected: Proxy-* headers are for the hop to a proxy.");
    }
    None
}

/// Why a header value is refused. Never includes the value: it is a secret.
fn header_value_problem(value: &str) -> Option<String> {
    let bad = value
        .chars()
        .any(|c| (c < ' ' && c != '\t') || c == '\u{7f}');
    if bad {
        return Some(
            "The value must not contain CR, LF, NUL or other control characters \
             (the value is not shown)."
                .into(),
        );
    }
    if value.len() > MAX_HEADER_VALUE_LEN {
        return Some(format!(
            "The value is longer than {MAX_HEADER_VALUE_LEN} bytes (the value is not shown)."
        ));
    }
    None
}

// === helpers ===

/// `obj[key]`, with `null` meaning absent.
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// A list of strings: `None` items were not strings (already reported).
fn string_list<'a>(v: Option<&'a Value>, path: &str, errs: &mut Errors) -> Vec<Option<&'a str>> {
    match v {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Some(s.as_str()),
                other => {
                    errs.push(
                        &index(path, i),
                        format!("must be a string, not {}.", kind(other)),
                    );
                    None
                }
            })
            .collect(),
        Some(other) => {
            errs.push(
                path,
                format!("must be a list of strings, not {}.", kind(other)),
            );
            Vec::new()
        }
    }
}

fn check_limit(len: usize, max: usize, what: &str, path: &str, errs: &mut Errors) {
    if len > max {
        errs.push(
            path,
            format!("has {len} entries; at most {max} {what} are allowed."),
        );
    }
}

fn unknown_fields(
    obj: &Map<String, Value>,
    known: &[&str],
    expected: &str,
    path: &str,
    errs: &mut Errors,
) {
    for key in obj.keys() {
        if !known.contains(&key.as_str()) {
            errs.push(
                &field(path, key),
                format!("unknown field; the fields are {expected}."),
            );
        }
    }
}

/// `path.key`, or `path["key"]` when the key is not a plain identifier.
fn field(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match (path.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!(
            "{path}[{}]",
            serde_json::to_string(key).unwrap_or_else(|_| "\"?\"".into())
        ),
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// The JSON type of a value, with its article.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// User input quoted for an error message: escaped, and cut at 100 characters.
fn quote(s: &str) -> String {
    const MAX: usize = 100;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}…", s.get(..cut).unwrap_or("")),
        None => format!("{s:?}"),
    }
}
