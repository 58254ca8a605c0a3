//! A transform rule compiled for requests: strip, inject, and redact the
//! injected values from what comes back.
//!
//! Order per request (DESIGN.md): strip every listed header (every
//! occurrence; names are case-insensitive by construction of
//! [`HeaderName`]), then inject each header, replacing whatever the sandbox
//! sent under that name. Request trailers lose both the stripped and the
//! injected names (a trailer must not smuggle a second credential). Response
//! headers and trailers whose value contains an injected value (or a long
//! token of it, such as the key inside `Bearer <key>`) are replaced with
//! [`REDACTED`] before they reach the sandbox.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::policy::Transform;

use super::scrub::Scrubber;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[redacted by tollgate]";

/// Tokens of an injected value at least this long are redacted on their own.
const MIN_SECRET_TOKEN: usize = 8;

/// Why a transform could not be compiled (the policy validator rejects
/// these first; this is the last line).
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// A header name is not a valid token.
    #[error("invalid header name in a transform")]
    Name,
    /// A header value has bytes HTTP does not allow.
    #[error("invalid header value in a transform")]
    Value,
}

/// A compiled transform.
#[derive(Clone)]
pub struct Rewrite {
    strip: Vec<HeaderName>,
    inject: Vec<(HeaderName, HeaderValue)>,
    secrets: Vec<Vec<u8>>,
    /// The length of the shortest secret: no shorter value can carry one.
    shortest: usize,
    /// Built once; each response gets a cheap copy.
    scrubber: Option<Scrubber>,
}

impl Rewrite {
    /// Compiles `t`.
    pub fn new(t: &Transform) -> Result<Self, RewriteError> {
        let strip = t
            .strip_headers
            .iter()
            .map(|n| HeaderName::from_bytes(n.as_bytes()).map_err(|_| RewriteError::Name))
            .collect::<Result<Vec<_>, _>>()?;
        let mut inject = Vec::with_capacity(t.inject_headers.len());
        let mut secrets: Vec<Vec<u8>> = Vec::new();
        for (n, v) in &t.inject_headers {
            let name = HeaderName::from_bytes(n.as_bytes()).map_err(|_| RewriteError::Name)?;
            let mut value =
                HeaderValue::from_bytes(v.as_bytes()).map_err(|_| RewriteError::Value)?;
            value.set_sensitive(true);
            inject.push((name, value));
            let v = v.trim();
            if !v.is_empty() {
                secrets.push(v.as_bytes().to_vec());
            }
            for tok in v.split_ascii_whitespace() {
                if tok.len() >= MIN_SECRET_TOKEN && tok != v {
                    secrets.push(tok.as_bytes().to_vec());
                }
            }
        }
        // Their base64 forms too (an echo of a Basic credential, a JSON
        // body with the value encoded).
        let encoded: Vec<Vec<u8>> = secrets
            .iter()
            .filter(|s| s.len() >= MIN_SECRET_TOKEN)
            .flat_map(|s| [base64(s, STD), base64(s, URL_SAFE)])
            .collect();
        secrets.extend(encoded);
        secrets.sort();
        secrets.dedup();
        let scrubber = Scrubber::new(&secrets);
        let shortest = secrets.iter().map(Vec::len).min().unwrap_or(0);
        Ok(Self {
            strip,
            inject,
            secrets,
            shortest,
            scrubber,
        })
    }

    /// Rewrites request headers: strip, then inject.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.strip {
            headers.remove(n);
        }
        for (n, v) in &self.inject {
            headers.insert(n.clone(), v.clone());
        }
    }

    /// Rewrites request trailers: every stripped and injected name goes.
    pub fn apply_trailers(&self, trailers: &mut HeaderMap) {
        for n in self.strip.iter().chain(self.inject.iter().map(|(n, _)| n)) {
            trailers.remove(n);
        }
    }

    /// Replaces every response header value that carries a secret; returns
    /// how many were replaced.
    pub fn redact(&self, headers: &mut HeaderMap) -> usize {
        if self.secrets.is_empty() {
            return 0;
        }
        let mut n = 0;
        for v in headers.values_mut() {
            if self.carries_secret(v.as_bytes()) {
                *v = HeaderValue::from_static(REDACTED);
                n += 1;
            }
        }
        n
    }

    /// Whether `value` contains an injected value or one of its tokens.
    pub fn carries_secret(&self, value: &[u8]) -> bool {
        // The scrubber's finders are built from exactly `secrets`.
        value.len() >= self.shortest && self.scrubber.as_ref().is_some_and(|s| s.finds_any(value))
    }

    /// A scrubber for response bodies, when something is injected.
    pub fn scrubber(&self) -> Option<Scrubber> {
        self.scrubber.clone()
    }

    /// Whether this transform injects anything (whose value must then
    /// never come back).
    pub fn has_secrets(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// Whether this transform changes nothing.
    pub fn is_noop(&self) -> bool {
        self.strip.is_empty() && self.inject.is_empty()
    }
}

const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 of `data` as it appears inside a longer encoding: without
/// padding, and without the last character when padding was needed (its
/// bits depend on the bytes that follow).
fn base64(data: &[u8], alphabet: &[u8; 64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize]);
        }
    }
    if data.len() % 3 != 0 {
        out.pop();
    }
    out
}

impl std::fmt::Debug for Rewrite {
    // Values are secrets: only names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewrite")
            .field("strip", &self.strip)
            .field(
                "inject",
                &self.inject.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rule() -> Rewrite {
        let t = Transform {
            domain: "api.test".into(),
            inject_headers: BTreeMap::from([(
                "Authorization".to_string(),
                "Bearer sk-real-secret-0123".to_string(),
            )]),
            strip_headers: vec!["X-Api-Key".into(), "cookie".into()],
        };
        Rewrite::new(&t).unwrap()
    }

    #[test]
    fn strips_every_occurrence_then_injects_replacing_the_sandboxes_value() {
        let mut h = HeaderMap::new();
        h.append("x-api-key", HeaderValue::from_static("a"));
        h.append("X-API-KEY", HeaderValue::from_static("b"));
        h.append("Cookie", HeaderValue::from_static("c=1"));
        h.append("authorization", HeaderValue::from_static("Bearer sandbox"));
        h.append("authorization", HeaderValue::from_static("Basic x"));
        h.append("accept", HeaderValue::from_static("*/*"));
        rule().apply(&mut h);
        assert!(h.get("x-api-key").is_none());
        assert!(h.get("cookie").is_none());
        let auth: Vec<_> = h.get_all("authorization").iter().collect();
        assert_eq!(auth, vec!["Bearer sk-real-secret-0123"]);
        assert_eq!(h.get("accept").unwrap(), "*/*");
    }

    #[test]
    fn trailers_lose_stripped_and_injected_names() {
        let mut t = HeaderMap::new();
        t.append("x-api-key", HeaderValue::from_static("a"));
        t.append("authorization", HeaderValue::from_static("Bearer smuggled"));
        t.append("grpc-status", HeaderValue::from_static("0"));
        rule().apply_trailers(&mut t);
        assert_eq!(t.len(), 1);
        assert_eq!(t.get("grpc-status").unwrap(), "0");
    }

    #[test]
    fn redacts_echoed_values_and_the_bare_key() {
        let mut h = HeaderMap::new();
        h.append(
            "x-echo-authorization",
            HeaderValue::from_static("Bearer sk-real-secret-0123"),
        );
        h.append(
            "x-key",
            HeaderValue::from_static("key=sk-real-secret-0123;"),
        );
        h.append("x-other", HeaderValue::from_static("Bearer"));
        h.append("content-type", HeaderValue::from_static("text/plain"));
        assert_eq!(rule().redact(&mut h), 2);
        assert_eq!(h.get("x-echo-authorization").unwrap(), REDACTED);
        assert_eq!(h.get("x-key").unwrap(), REDACTED);
        assert_eq!(h.get("x-other").unwrap(), "Bearer");
        assert_eq!(h.get("content-type").unwrap(), "text/plain");
    }

    #[test]
    fn base64_forms_are_secrets_too() {
        assert_eq!(base64(b"Man", STD), b"TWFu");
        assert_eq!(base64(b"Ma", STD), b"TW");
        assert_eq!(base64(b"\xfb\xff", URL_SAFE), b"-_");
        let rw = rule();
        // base64("sk-real-secret-0123") = c2stcmVhbC1zZWNyZXQtMDEyMw==
        assert!(rw.carries_secret(b"x c2stcmVhbC1zZWNyZXQtMDEyM y"));
        assert!(!rw.carries_secret(b"c2stcmVhbC1z"));
    }

    #[test]
    fn debug_never_shows_values() {
        let s = format!("{:?}", rule());
        assert!(!s.contains("sk-real"), "{s}");
        assert!(s.contains("authorization"), "{s}");
    }
}
