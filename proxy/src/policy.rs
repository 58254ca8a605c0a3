//! The `network_policy` contract: wire types, validation with field paths,
//! normalisation, and the compiled matcher.
//!
//! INTERFACE STUB — being implemented; the names below are the public contract
//! that `control/` relies on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Marker shown in place of every `inject_headers` value in responses and logs.
pub const REDACTED: &str = "[REDACTED]";

/// One validation failure: where (`network_policy.allow_domains[2]`) and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Path of the offending field, dotted with `[i]` for list items.
    pub field: String,
    /// A sentence for a human.
    pub error: String,
}

/// Egress mode of a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Public internet allowed; private ranges only via `allow_cidrs`.
    AllowAll,
    /// Nothing leaves, DNS included.
    DenyAll,
    /// Only listed domains, transform domains and CIDRs.
    Custom,
}

/// A header rewrite rule for one domain pattern.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transform {
    /// Exact name or `*.suffix` pattern (normalised A-label form).
    pub domain: String,
    /// Headers to set on every request, replacing what the sandbox sent.
    #[serde(default)]
    pub inject_headers: BTreeMap<String, String>,
    /// Headers to remove from every request (case-insensitive).
    #[serde(default)]
    pub strip_headers: Vec<String>,
}

/// A validated, normalised `network_policy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    /// Egress mode.
    pub mode: Mode,
    /// Domain patterns allowed in `custom` mode.
    #[serde(default)]
    pub allow_domains: Vec<String>,
    /// Networks reachable directly (normalised `addr/len`).
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    /// Header rewrite rules; their domains are implicitly allowed.
    #[serde(default)]
    pub transforms: Vec<Transform>,
}

impl NetworkPolicy {
    /// The policy of a sandbox that was given none.
    pub fn allow_all() -> Self {
        Self {
            mode: Mode::AllowAll,
            allow_domains: vec![],
            allow_cidrs: vec![],
            transforms: vec![],
        }
    }

    /// Parses and validates a JSON `network_policy`, reporting every bad field
    /// with its path under `path`, and returns the normalised policy.
    pub fn from_json(_value: &serde_json::Value, _path: &str) -> Result<Self, Vec<FieldError>> {
        unimplemented!("policy validation is being implemented")
    }

    /// A copy safe to show: every injected value replaced by [`REDACTED`].
    pub fn redacted(&self) -> Self {
        let mut p = self.clone();
        for t in &mut p.transforms {
            for v in t.inject_headers.values_mut() {
                *v = REDACTED.to_string();
            }
        }
        p
    }
}
