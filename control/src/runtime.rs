//! Runtimes restore a snapshot onto a prepared host link and control the
//! sandbox's life: start, pause, resume, stop, exec, and re-adoption after a
//! daemon restart.
//!
//! The network is not a runtime's business: [`crate::net::setup`] prepares
//! it (sandbox and router namespaces, links, filtering) before
//! [`Runtime::start`] and [`crate::net::teardown`] removes it after
//! [`Runtime::stop`]. A runtime only attaches the sandbox to the prepared
//! network it is given (the netns backend runs the sandbox's processes in
//! [`NetworkInfo::netns`]; a VM backend would attach its NIC there), so every
//! backend gets the same data plane.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::net::NetworkInfo;

/// What a template runs: a command and its environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// Template name as the API knows it (`system/debian:bookworm`).
    pub name: String,
    /// argv of the sandbox's main process.
    pub command: Vec<String>,
    /// Environment of the main process (merged under the sandbox's `env_vars`).
    pub env: BTreeMap<String, String>,
}

/// Everything a runtime needs to start one sandbox.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    /// `sbx-…` identifier.
    pub id: String,
    /// Slot of the network plan; unique among live sandboxes.
    pub slot: u32,
    /// What to run.
    pub template: Template,
    /// The sandbox's own environment variables (from the API).
    pub env_vars: BTreeMap<String, String>,
    /// Unprivileged uid/gid the sandbox's processes run as.
    pub uid: u32,
    /// vCPUs granted (informational for the netns backend).
    pub vcpu: u32,
    /// Memory granted in MiB (informational for the netns backend).
    pub memory_mib: u32,
    /// The sandbox's CA certificate (PEM), which its proxy intercepts with:
    /// the runtime makes the guest trust it (see [`Runtime::install_ca`]).
    /// `None`: nothing is installed.
    pub ca_pem: Option<String>,
    /// The memory snapshot to restore (a snapshot taken by
    /// [`Runtime::snapshot`]); `None`: start from the template.
    pub image: Option<MemoryImage>,
}

/// A memory snapshot on disk: what a restore maps and loads. Kept in the
/// snapshot record; the files live in `dir`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryImage {
    /// Backend that took it (`vm`).
    pub backend: String,
    /// Directory holding `ram` (guest RAM, mapped copy-on-write by every
    /// restore) and `state` (device state, a QEMU migration stream).
    pub dir: PathBuf,
    /// vCPUs of the machine the image was taken from (a restore gets the same).
    pub vcpu: u32,
    /// Guest RAM in MiB (the size of `ram`).
    pub memory_mib: u32,
}

/// Handle a runtime returns for a started sandbox; persisted so that a
/// restarted daemon can re-adopt it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeHandle {
    /// Runtime backend name (`netns`).
    pub backend: String,
    /// PID of the sandbox's supervising process on the host.
    pub pid: i32,
    /// Start time of that PID (from `/proc/PID/stat`, field 22), to detect reuse.
    pub pid_start: u64,
    /// The network the sandbox was started on (the one given to
    /// [`Runtime::start`]).
    pub network: NetworkInfo,
    /// The backend's per-sandbox directory (the `vm` backend: QMP and agent
    /// sockets, console log); `None` for backends without one.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

/// Result of a command run inside a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Exit code; 128+N when killed by signal N; 124 on timeout.
    pub exit_code: i32,
    /// Captured standard output (lossy UTF-8).
    pub stdout: String,
    /// Captured standard error (lossy UTF-8).
    pub stderr: String,
}

/// A command to run inside a sandbox.
#[derive(Clone, Debug)]
pub struct ExecRequest {
    /// argv.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox (default `/`).
    pub cwd: Option<PathBuf>,
    /// Kill the command after this long.
    pub timeout: Duration,
}

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The sandbox's network could not be set up or removed (netlink,
    /// namespace, nftables); see [`crate::net::NetError`].
    #[error("network setup failed: {0}")]
    Network(String),
    /// The sandbox's process could not be started or controlled.
    #[error("process control failed: {0}")]
    Process(String),
    /// The sandbox is not running (dead, or never started).
    #[error("sandbox is not running")]
    NotRunning,
    /// The operation needs privileges the daemon does not have.
    #[error("insufficient privileges: {0}")]
    Privilege(String),
    /// A snapshot's memory image cannot be used here: files missing, or a
    /// backend this host does not run (the API answers 409).
    #[error("{0}")]
    Unusable(String),
    /// A snapshot's memory image is damaged: the restore was refused or
    /// failed while loading it.
    #[error("{0}")]
    Corrupt(String),
}

/// A sandbox runtime backend. It manages processes (or VMs) only, never the
/// network. Every method releases what it created on every failure path: a
/// failed `start` leaves no process behind.
#[allow(async_fn_in_trait)]
pub trait Runtime: Send + Sync + 'static {
    /// Starts the sandbox on `net`, a network [`crate::net::setup`] already
    /// created: the netns backend runs the sandbox's processes in
    /// `net.netns`. The returned handle carries a copy of `net`.
    fn start(
        &self,
        spec: &SandboxSpec,
        net: &NetworkInfo,
    ) -> impl std::future::Future<Output = Result<RuntimeHandle, RuntimeError>> + Send;
    /// Freezes every process of the sandbox.
    fn pause(
        &self,
        handle: &RuntimeHandle,
    ) -> impl std::future::Future<Output = Result<(), RuntimeError>> + Send;
    /// Thaws a paused sandbox.
    fn resume(
        &self,
        handle: &RuntimeHandle,
    ) -> impl std::future::Future<Output = Result<(), RuntimeError>> + Send;
    /// Gets ready to start `spec` while the caller builds its network (the
    /// `vm` backend starts QEMU, waiting for its memory image). Whatever
    /// happens next, [`Runtime::start`] or [`Runtime::release`] follows.
    fn prepare(
        &self,
        spec: &SandboxSpec,
    ) -> impl std::future::Future<Output = Result<(), RuntimeError>> + Send;
    /// After [`Runtime::prepare`] and [`crate::net::setup`]: joins what
    /// prepare started to `net` ahead of [`Runtime::start`] (the `vm`
    /// backend moves its tap onto the sandbox's wire), so a sandbox kept
    /// warm starts with nothing left to wire. Without this call `start`
    /// does it.
    fn connect(
        &self,
        spec: &SandboxSpec,
        net: &NetworkInfo,
    ) -> impl std::future::Future<Output = Result<(), RuntimeError>> + Send {
        let _ = (spec, net);
        async { Ok(()) }
    }
    /// Is what [`Runtime::prepare`] started for sandbox `id` (not yet
    /// started) still usable? `true` when it started nothing.
    fn prepared_alive(&self, id: &str) -> bool {
        let _ = id;
        true
    }
    /// Kills every process of the sandbox. Idempotent. The network stays
    /// (the caller tears it down with [`crate::net::teardown`]).
    fn stop(
        &self,
        handle: &RuntimeHandle,
    ) -> impl std::future::Future<Output = Result<(), RuntimeError>> + Send;
    /// Runs a command inside the sandbox and collects its output.
    fn exec(
        &self,
        handle: &RuntimeHandle,
        req: ExecRequest,
    ) -> impl std::future::Future<Output = Result<ExecOutput, RuntimeError>> + Send;
    /// Releases whatever a start that never completed (the daemon died
    /// mid-start) may have left for sandbox `id` on `slot`: processes only,
    /// found without a handle. Idempotent. The network is the caller's
    /// ([`crate::net::info_for`] + [`crate::net::teardown`]).
    fn release(
        &self,
        id: &str,
        slot: u32,
    ) -> impl std::future::Future<Output = Result<(), RuntimeError>> + Send;
    /// After a daemon restart, and while it runs: is this sandbox still alive
    /// (same PID, same start time, sandbox namespace present)?
    fn is_alive(&self, handle: &RuntimeHandle) -> bool;
    /// Takes a memory snapshot of a running or paused sandbox into `dir`
    /// (created by the runtime; removed again on failure) and leaves the
    /// sandbox as it was. `Ok(None)`: this backend keeps no memory state (a
    /// restore starts the template afresh).
    fn snapshot(
        &self,
        handle: &RuntimeHandle,
        dir: &std::path::Path,
    ) -> impl std::future::Future<Output = Result<Option<MemoryImage>, RuntimeError>> + Send;
    /// Makes sandbox `id` trust `ca_pem` (its CA certificate) in addition to
    /// the host's roots: the netns backend writes the bundle the sandbox's
    /// `SSL_CERT_FILE` & co. point at. [`Runtime::start`] does it for a new
    /// sandbox (from [`SandboxSpec::ca_pem`]); the daemon calls this for a
    /// sandbox it re-adopts after a restart.
    fn install_ca(
        &self,
        id: &str,
        handle: &RuntimeHandle,
        ca_pem: &str,
    ) -> impl std::future::Future<Output = Result<(), RuntimeError>> + Send;
}

pub mod any;
pub mod netns;
pub mod vm;
