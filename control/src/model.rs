//! Persistent records: sandboxes and snapshots, their states and identifiers.

use std::collections::BTreeMap;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tollgate_proxy::policy::NetworkPolicy;

use crate::runtime::RuntimeHandle;

/// Lifecycle state of a sandbox, as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Being restored or created.
    Starting,
    /// Up.
    Running,
    /// A snapshot is being taken.
    Snapshotting,
    /// Frozen.
    Paused,
    /// Being thawed.
    Unpausing,
    /// Being torn down.
    Deleting,
    /// Gone: only kept to report a sandbox that was lost (see `status_reason`).
    Deleted,
}

impl State {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Snapshotting => "snapshotting",
            State::Paused => "paused",
            State::Unpausing => "unpausing",
            State::Deleting => "deleting",
            State::Deleted => "deleted",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "starting" => State::Starting,
            "running" => State::Running,
            "snapshotting" => State::Snapshotting,
            "paused" => State::Paused,
            "unpausing" => State::Unpausing,
            "deleting" => State::Deleting,
            "deleted" => State::Deleted,
            _ => return None,
        })
    }

    /// Does a sandbox in this state hold a slot, compute and an org quota?
    pub fn is_live(self) -> bool {
        !matches!(self, State::Deleted)
    }
}

/// A sandbox as stored. Secrets (injected header values, env vars) are kept
/// here, in the 0600 store, and never returned by the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// `sbx-…`.
    pub id: String,
    /// Owning organization.
    pub org: String,
    /// Template the sandbox runs.
    pub template_id: String,
    /// vCPUs held.
    pub vcpu: u32,
    /// Memory held, MiB.
    pub memory_mib: u32,
    /// Disk, MiB.
    pub disk_mib: u32,
    /// Lifetime in seconds from creation; at expiry paused or deleted.
    pub timeout_secs: u64,
    /// Pause instead of delete at expiry.
    pub auto_pause: bool,
    /// Environment variables set inside the sandbox.
    pub env_vars: BTreeMap<String, String>,
    /// Effective network policy (with secret values).
    pub network_policy: NetworkPolicy,
    /// Current state.
    pub state: State,
    /// Why the sandbox is in its state when that is not the obvious one
    /// (for example "lost: its process was gone after a daemon restart").
    #[serde(default)]
    pub status_reason: Option<String>,
    /// Creation time, unix seconds.
    pub created_at: i64,
    /// Last state change, unix seconds.
    pub state_changed_at: i64,
    /// When the timeout fires, unix seconds.
    pub timeout_at: i64,
    /// Address-plan slot (also picks the uid).
    pub slot: u32,
    /// Unprivileged uid of the sandbox's processes.
    pub uid: u32,
    /// Snapshot this sandbox was restored from.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// Runtime handle while the runtime holds resources.
    #[serde(default)]
    pub runtime: Option<RuntimeHandle>,
}

/// A snapshot as stored. In the netns runtime it records template, compute,
/// environment and policy, not memory state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// `snp-…`.
    pub id: String,
    /// Name, unique within the organization.
    pub name: String,
    /// Owning organization.
    pub org: String,
    /// Template of the source sandbox.
    pub template_id: String,
    /// vCPUs a restore needs.
    pub vcpu: u32,
    /// Memory a restore needs, MiB.
    pub memory_mib: u32,
    /// Disk, MiB.
    pub disk_mib: u32,
    /// Environment of the source sandbox.
    pub env_vars: BTreeMap<String, String>,
    /// Policy applied by a restore that gives none.
    pub network_policy: NetworkPolicy,
    /// Sandbox it was taken from.
    pub source_sandbox: String,
    /// Creation time, unix seconds.
    pub created_at: i64,
    /// The memory image (`vm` runtime); `None`: a restore starts the
    /// template afresh (`netns` runtime).
    #[serde(default)]
    pub memory: Option<crate::runtime::MemoryImage>,
}

/// A fresh identifier: `prefix` + 20 random lowercase alphanumerics.
pub fn new_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let tail: String = (0..20)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{tail}")
}

/// Unix seconds now.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// RFC 3339 text of a unix time.
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// A warm sandbox as stored: network, enforcement and (on the vm runtime)
/// a QEMU waiting for its memory, built ahead of a request. Only what a
/// restart needs to release it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WarmRecord {
    /// The id the sandbox that takes it will have.
    pub id: String,
    /// Its address slot.
    pub slot: u32,
    /// When it was built (unix seconds).
    pub created_at: i64,
}
