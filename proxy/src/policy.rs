//! The `network_policy` contract: wire types, validation with field paths,
//! normalisation, the platform floor and the compiled matcher.
//!
//! * [`NetworkPolicy::from_json`] walks the JSON by hand so that every bad
//!   field is reported at once, each with its path (`validate`).
//! * [`Floor`] is the set of addresses no policy can reach (`floor`).
//! * [`CompiledPolicy`] answers "may this connection leave, and how?" in
//!   O(labels) per name and O(log n) per address (`matcher`).
//!
//! Domain names are compared as lower-case A-labels without a trailing dot
//! (`domain`); CIDRs as sorted, merged address ranges (`net`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod domain;
mod floor;
mod matcher;
mod net;
mod validate;

#[cfg(test)]
mod tests;

pub use floor::{is_private, Floor};
pub use matcher::{CompiledPolicy, DenyReason, Dial, Proto, Verdict};

/// Marker shown in place of every `inject_headers` value in responses and logs.
pub const REDACTED: &str = "[REDACTED]";

/// Most entries `allow_domains` may hold.
pub const MAX_ALLOW_DOMAINS: usize = 50;
/// Most entries `allow_cidrs` may hold.
pub const MAX_ALLOW_CIDRS: usize = 10;
/// Most entries `transforms` may hold.
pub const MAX_TRANSFORMS: usize = 20;
/// Longest `inject_headers` value accepted, in bytes.
pub const MAX_HEADER_VALUE_LEN: usize = 16 * 1024;

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
///
/// After [`NetworkPolicy::from_json`]: `domain` is a normalised pattern,
/// `inject_headers` keys keep the case the user wrote (they are unique
/// case-insensitively), and `strip_headers` are lower-case and unique.
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
///
/// `deny-all` accepts `allow_domains`, `allow_cidrs` and `transforms` (they
/// are validated and kept, so switching the mode back restores them) but they
/// are inert: nothing leaves in `deny-all`.
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

// === impl NetworkPolicy ===

impl NetworkPolicy {
    /// Nothing leaves (what a sandbox built ahead of its request enforces
    /// until it gets its own policy).
    pub fn deny_all() -> Self {
        Self {
            mode: Mode::DenyAll,
            allow_domains: vec![],
            allow_cidrs: vec![],
            transforms: vec![],
        }
    }

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
    ///
    /// Optional fields that are `null` count as omitted. See the module docs
    /// of `validate` for the full rule set.
    pub fn from_json(value: &serde_json::Value, path: &str) -> Result<Self, Vec<FieldError>> {
        validate::policy(value, path)
    }

    /// Re-validates a policy that did not come through [`Self::from_json`]
    /// (built in code, read from a store) and returns its normalised form.
    pub fn normalized(&self, path: &str) -> Result<Self, Vec<FieldError>> {
        match serde_json::to_value(self) {
            Ok(v) => Self::from_json(&v, path),
            Err(e) => Err(vec![FieldError {
                field: path.to_string(),
                error: format!("the policy could not be encoded for validation: {e}"),
            }]),
        }
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
