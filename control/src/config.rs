//! Daemon configuration: an embedded default that works with no file, and an
//! optional TOML file (`--config`) that adds organizations, keys, limits,
//! host capacity and templates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

use crate::runtime::Template;

/// Name of the default template (an idle shell), as the SDKs default to it.
pub const DEFAULT_TEMPLATE: &str = "system/debian:bookworm";

/// The configuration file. Every field is optional; unknown fields are errors.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP API (`--listen` overrides it).
    pub listen: SocketAddr,
    /// Where sandboxes, snapshots and keys are kept (`--state-dir` overrides it).
    pub state_dir: PathBuf,
    /// Organizations and their API keys. When empty, one organization named
    /// `default` is used whose key is `TOLLGATE_API_KEY` (or generated).
    pub organizations: Vec<OrgConfig>,
    /// Compute budget of this host; a restore that does not fit gets 503.
    pub host: HostConfig,
    /// Per-sandbox network settings.
    pub network: NetworkConfig,
    /// Templates in addition to the built-in `system/debian:bookworm`.
    pub templates: Vec<TemplateConfig>,
    /// How the proxy and the sandboxes' resolver reach DNS.
    pub dns: DnsConfig,
    /// Per-sandbox proxy limits and the upstream trust of TLS interception.
    pub proxy: ProxyLimits,
    /// Which runtime new sandboxes get, and the VM runtime's settings.
    pub runtime: RuntimeConfig,
}

/// Most warm sandboxes `[runtime] warm` may ask for.
pub const MAX_WARM: u32 = 64;

/// Where the guest image is installed by `./scripts/deps`.
pub const DEFAULT_GUEST_DIR: &str = "/usr/local/lib/tollgate/guest";

/// Runtime selection.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// `auto` (the `vm` runtime where QEMU and the guest image are installed,
    /// else `netns`), `vm` (fail at start without them) or `netns`.
    pub backend: String,
    /// Warm sandboxes kept ready, one per recently launched template or
    /// snapshot (network, deny-all enforcement, CA and, on the vm runtime, a
    /// QEMU waiting for its memory with its tap on the wire): a launch that
    /// finds one skips all of that. Default: 1 on the vm runtime, 0 on netns.
    pub warm: Option<u32>,
    /// The VM runtime.
    pub vm: VmSettings,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            backend: "auto".into(),
            warm: None,
            vm: VmSettings::default(),
        }
    }
}

/// Settings of the QEMU microVM runtime.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmSettings {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs (busybox and the agent).
    pub initramfs: PathBuf,
    /// `auto` (KVM when `/dev/kvm` is usable hardware virtualisation, TCG
    /// otherwise, e.g. on a paravirtual PVM `/dev/kvm`), `kvm` or `tcg`.
    pub accel: String,
    /// TCG translation cache in MiB (bounds each VM's resident memory).
    pub tb_size_mib: Option<u32>,
    /// Where cold-booted template images are cached (default:
    /// `<state_dir>/vm/templates`). Daemons may share one.
    pub template_dir: Option<PathBuf>,
}

impl Default for VmSettings {
    fn default() -> Self {
        Self {
            qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            kernel: Path::new(DEFAULT_GUEST_DIR).join("vmlinuz"),
            initramfs: Path::new(DEFAULT_GUEST_DIR).join("initramfs.img"),
            accel: "auto".into(),
            tb_size_mib: Some(64),
            template_dir: None,
        }
    }
}

/// DNS settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Resolvers the host uses for sandboxes (empty: those of /etc/resolv.conf).
    pub upstreams: Vec<SocketAddr>,
    /// Per-query timeout in milliseconds.
    pub timeout_ms: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            timeout_ms: 5000,
        }
    }
}

/// Per-sandbox proxy limits, and whom TLS interception trusts upstream.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyLimits {
    /// Concurrent connections per sandbox; more are refused.
    pub max_connections: usize,
    /// Upstream connect timeout in milliseconds.
    pub connect_timeout_ms: u64,
    /// Time a sandbox has to send its ClientHello or request head, in ms.
    pub detect_timeout_ms: u64,
    /// A tunnel idle this long (ms) is closed.
    pub idle_timeout_ms: u64,
    /// How allowed tunnels move bytes: `kernel` (the sockhash redirect
    /// program; `splice` where it cannot load), `splice`, or `userspace`.
    pub tunnel: TunnelMode,
    /// A PEM bundle of CAs trusted for upstream certificates of intercepted
    /// connections in addition to the host's roots
    /// (`/etc/ssl/certs/ca-certificates.crt`): private upstreams, tests.
    pub upstream_ca_file: Option<PathBuf>,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            connect_timeout_ms: 10_000,
            detect_timeout_ms: 10_000,
            idle_timeout_ms: 3_600_000,
            tunnel: TunnelMode::Kernel,
            upstream_ca_file: None,
        }
    }
}

/// `[proxy] tunnel`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TunnelMode {
    /// Kernel redirect between the two sockets (sockhash + stream verdict).
    Kernel,
    /// `splice(2)` through a pipe per direction.
    Splice,
    /// A user-space buffer per direction.
    Userspace,
}

/// One organization.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgConfig {
    /// Organization name (appears in logs, never in responses).
    pub name: String,
    /// API keys that authenticate as this organization.
    pub api_keys: Vec<String>,
    /// Live sandboxes allowed at once; more gets 429.
    #[serde(default = "default_max_sandboxes")]
    pub max_sandboxes: u32,
}

/// Compute budget of the host.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// vCPUs that live sandboxes may hold in total.
    pub vcpu: u32,
    /// Memory in MiB that live sandboxes may hold in total.
    pub memory_mib: u64,
}

/// Per-sandbox network settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Pool the per-sandbox /30 uplinks are cut from (a /16 holds 16,384 sandboxes).
    pub pool: Ipv4Net,
    /// IPv6 pool the per-sandbox /64 uplinks are cut from.
    pub pool6: ipnet::Ipv6Net,
    /// Extra ranges denied to every sandbox in every mode (added to the floor).
    pub deny_cidrs: Vec<IpNet>,
    /// First uid of the range sandboxes run as (uid = base + slot).
    pub uid_base: u32,
}

/// A template: what a sandbox created from it runs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// Name used by `template_name`.
    pub name: String,
    /// argv of the sandbox's main process.
    pub command: Vec<String>,
    /// Environment of the main process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_max_sandboxes() -> u32 {
    3
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            state_dir: PathBuf::from("/var/lib/tollgate"),
            organizations: Vec::new(),
            host: HostConfig::default(),
            network: NetworkConfig::default(),
            templates: Vec::new(),
            dns: DnsConfig::default(),
            proxy: ProxyLimits::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            vcpu: 64,
            memory_mib: 65536,
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            pool: crate::net::DEFAULT_POOL4,
            pool6: crate::net::DEFAULT_POOL6,
            deny_cidrs: Vec::new(),
            uid_base: 200_000,
        }
    }
}

impl Config {
    /// Reads and checks a TOML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Rejects configurations that parse but cannot work.
    pub fn check(&self) -> anyhow::Result<()> {
        let mut seen_keys = std::collections::HashSet::new();
        let mut seen_orgs = std::collections::HashSet::new();
        for org in &self.organizations {
            anyhow::ensure!(!org.name.is_empty(), "an organization has an empty name");
            anyhow::ensure!(
                seen_orgs.insert(&org.name),
                "organization {:?} is listed twice",
                org.name
            );
            // "default" always has the daemon's own key (TOLLGATE_API_KEY or
            // the one kept in the state dir); listing it only to change its
            // limit is fine.
            anyhow::ensure!(
                !org.api_keys.is_empty() || org.name == "default",
                "organization {:?} has no api_keys",
                org.name
            );
            for k in &org.api_keys {
                anyhow::ensure!(
                    k.len() >= 16,
                    "organization {:?} has an API key shorter than 16 characters",
                    org.name
                );
                anyhow::ensure!(
                    seen_keys.insert(k),
                    "an API key is listed for two organizations"
                );
            }
        }
        anyhow::ensure!(
            self.network.pool.prefix_len() <= 29,
            "network.pool must be /29 or larger"
        );
        anyhow::ensure!(
            matches!(self.runtime.backend.as_str(), "auto" | "vm" | "netns"),
            "runtime.backend must be \"auto\", \"vm\" or \"netns\", not {:?}",
            self.runtime.backend
        );
        anyhow::ensure!(
            self.runtime.warm.unwrap_or(0) <= MAX_WARM,
            "runtime.warm must be at most {MAX_WARM}, not {}",
            self.runtime.warm.unwrap_or(0)
        );
        anyhow::ensure!(
            matches!(self.runtime.vm.accel.as_str(), "auto" | "kvm" | "tcg"),
            "runtime.vm.accel must be \"auto\", \"kvm\" or \"tcg\", not {:?}",
            self.runtime.vm.accel
        );
        for t in &self.templates {
            anyhow::ensure!(
                !t.command.is_empty(),
                "template {:?} has an empty command",
                t.name
            );
            anyhow::ensure!(
                t.name != DEFAULT_TEMPLATE,
                "template {:?} is built in",
                t.name
            );
        }
        Ok(())
    }

    /// Every template this daemon knows, the built-in one first.
    pub fn templates(&self) -> Vec<Template> {
        let mut out = vec![Template {
            name: DEFAULT_TEMPLATE.to_string(),
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "while :; do sleep 3600; done".into(),
            ],
            env: BTreeMap::new(),
        }];
        out.extend(self.templates.iter().map(|t| Template {
            name: t.name.clone(),
            command: t.command.clone(),
            env: t.env.clone(),
        }));
        out
    }
}

#[cfg(test)]
mod tests;
