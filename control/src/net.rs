//! Per-sandbox networks: two named network namespaces and two veth pairs per
//! sandbox, configured over rtnetlink (no `ip` subprocesses), with a router
//! namespace that filters, NATs and hosts the transparent proxy's listeners.
//!
//! Sandboxes restored from one snapshot share a guest IP and MAC (a VM's
//! address lives in its memory snapshot), so every sandbox sees the same
//! QEMU-user-net-style addresses, and what tells sandboxes apart on the host is
//! the per-slot uplink behind each sandbox's own router:
//!
//! ```text
//!  sandbox namespace  /run/netns/tollgate-<id>
//!    eth0   10.0.2.15/24, fd00:7467::15/64        (the same in every sandbox)
//!           default via 10.0.2.2 / fd00:7467::2
//!      │ veth
//!  router namespace   /run/netns/tgr-<id>
//!    tgs0   10.0.2.2/24, fd00:7467::2/64          guest-facing; the eBPF TC ingress attaches here
//!    up0    pool4 /30 +2, pool6 /64 ::2           default via the host side (+1, ::1)
//!           forwarding on
//!           rule fwmark 0x1/0x1 lookup 100; table 100: local 0.0.0.0/0 dev lo, local ::/0 dev lo
//!           proxy listeners 0.0.0.0:15001 and [::]:15001 (IP_TRANSPARENT, open_listeners)
//!           the sandbox's resolver on 10.0.2.2:53 / [fd00:7467::2]:53 (open_dns_sockets)
//!           its CA certificate over HTTP on 10.0.2.2:80 / [fd00:7467::2]:80 (open_ca_listeners)
//!           nftables `inet tollgate`:
//!             forward      policy drop; tgs0 → up0 only with mark & 0x2 (set by eBPF for
//!                          allowed traffic); up0 → tgs0 established/related
//!             input        from tgs0: mark & 0x1 (steered to the proxy), established/related,
//!                          tcp/udp 53 and tcp 80 to the gateway, ICMP echo, ICMPv6
//!                          echo + NDP; drop the rest
//!             postrouting  masquerade oif up0 (hides the shared guest address)
//!      │ veth
//!  root namespace
//!    tgh<slot>  pool4 /30 +1, pool6 /64 ::1       (one link per sandbox in the root namespace)
//!    host_setup, once: ip forwarding (v4, v6), nftables `inet tollgate_host`:
//!      forward      pools out through tgh* accepted, tgh* ⇄ tgh* dropped, nothing new
//!                   into tgh* from elsewhere
//!      postrouting  masquerade the pools leaving through a non-tgh* interface
//! ```
//!
//! Slot `n` of a [`NetPlan`] owns the /30 at `pool4 + 4n` (default pool
//! `10.200.0.0/16`: 16,384 slots) and the /64 number `n` of `pool6` (default
//! `fd00:7467:1::/48`).
//!
//! Egress of an allowed guest packet: eth0 → tgs0 (eBPF marks 0x2) → forward →
//! masquerade to up0's address → `tgh<slot>` → the host forwards and
//! masquerades again out of its uplink. A TCP connection the eBPF steers to
//! the proxy is `bpf_sk_assign`ed to a listener and marked 0x1; the fwmark
//! rule routes it to the local table, so it is delivered locally with its
//! original destination (`getsockname()` of the accepted socket). Without
//! eBPF nothing from the guest is forwarded: the forward chain fails closed.
//!
//! Namespace work runs on short-lived dedicated OS threads that `setns`'d
//! (see `ns`): netlink sockets, sysctl writes, listener sockets and the one
//! subprocess (`nft -f -`, see `nft`) are all created from such a thread and
//! so belong to the right namespace; no tokio worker ever changes namespace.
//!
//! [`setup`] and [`teardown`] are idempotent. A failed (or cancelled)
//! [`setup`] releases what that call created. [`teardown`] never deletes a
//! link it cannot prove is this sandbox's: the host link is removed only while
//! it is the peer of this sandbox router's `up0`; everything else lives in
//! namespaces named after the sandbox.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::config::NetworkConfig;
use crate::runtime::RuntimeError;

mod nft;
mod nl;
mod ns;
#[cfg(test)]
mod tests;

use nl::Nl;
pub use ns::{create_netns, delete_netns, netns_exists, netns_path, NETNS_DIR};

/// Prefix of a sandbox's namespace name: `tollgate-<id>`.
pub const SANDBOX_NETNS_PREFIX: &str = "tollgate-";
/// Prefix of a sandbox router's namespace name: `tgr-<id>`.
pub const ROUTER_NETNS_PREFIX: &str = "tgr-";
/// The sandbox's interface (inside the sandbox namespace).
pub const GUEST_IF: &str = "eth0";
/// The router's guest-facing interface; the eBPF TC ingress attaches here.
pub const GATEWAY_IF: &str = "tgs0";
/// The router's uplink towards the root namespace.
pub const UPLINK_IF: &str = "up0";
/// Prefix of the host-side interface of a slot: `tgh<slot>`.
pub const HOST_IF_PREFIX: &str = "tgh";

/// The guest's IPv4 address (the same in every sandbox).
pub const GUEST_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's IPv4 gateway (the router's `tgs0`).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Prefix length of the guest's IPv4 network.
pub const GUEST_PREFIX_V4: u8 = 24;
/// MAC address of the router's `tgs0` (the guest's gateway), the same in
/// every sandbox (locally administered).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x74, 0x67, 0x02];
/// The guest's IPv6 address (the same in every sandbox).
pub const GUEST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7467, 0, 0, 0, 0, 0, 0x15);
/// The guest's IPv6 gateway (the router's `tgs0`).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7467, 0, 0, 0, 0, 0, 0x2);
/// Prefix length of the guest's IPv6 network.
pub const GUEST_PREFIX_V6: u8 = 64;

/// Prefix length of every IPv4 uplink (router ⇄ host).
pub const UPLINK_PREFIX_V4: u8 = 30;
/// Prefix length of every IPv6 uplink (router ⇄ host).
pub const UPLINK_PREFIX_V6: u8 = 64;
/// Default IPv4 pool of the uplinks.
pub const DEFAULT_POOL4: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 200, 0, 0), 16);
/// Default IPv6 pool of the uplinks.
pub const DEFAULT_POOL6: Ipv6Net =
    Ipv6Net::new_assert(Ipv6Addr::new(0xfd00, 0x7467, 1, 0, 0, 0, 0, 0), 48);

/// Port of the proxy listeners in the router namespace.
pub const LISTENER_PORT: u16 = 15001;
/// TCP port on the gateway where the daemon serves the sandbox's CA
/// certificate (`GET /ca.pem`, plain HTTP); the eBPF program passes it
/// locally in every mode.
pub const CA_PORT: u16 = tollgate_ebpf::abi::GATEWAY_HTTP_PORT;
/// Listen backlog of the proxy listeners.
pub const LISTENER_BACKLOG: i32 = 1024;
/// Packet mark (and mask) of traffic steered to the proxy: routed to the local
/// table [`STEER_TABLE`].
pub const STEER_MARK: u32 = 0x1;
/// Packet mark (and mask) the eBPF program sets on traffic it allows to be
/// forwarded.
pub const ALLOW_MARK: u32 = 0x2;
/// Routing table holding `local 0.0.0.0/0` and `local ::/0` in the router.
pub const STEER_TABLE: u32 = 100;
/// Priority of the fwmark policy rule in the router.
pub const STEER_RULE_PRIORITY: u32 = 100;
/// nftables table (family `inet`) of each router namespace.
pub const ROUTER_TABLE: &str = "tollgate";
/// nftables table (family `inet`) of the host, shared by all sandboxes.
pub const HOST_TABLE: &str = "tollgate_host";

/// Sysctls of every router namespace (relative to `/proc/sys`).
const ROUTER_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
];

/// Errors of network setup and teardown.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The address plan cannot serve this request (slot out of range, bad pool).
    #[error("address plan: {0}")]
    Plan(String),
    /// A name (namespace, interface) is invalid.
    #[error("invalid name: {0}")]
    Name(String),
    /// Creating, opening or removing a network namespace failed.
    #[error("network namespace {name}: {reason}")]
    Netns {
        /// Namespace name.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// A netlink request failed.
    #[error("netlink: {0}")]
    Netlink(String),
    /// Writing a sysctl failed.
    #[error("sysctl: {0}")]
    Sysctl(String),
    /// Loading an nftables ruleset failed.
    #[error("nftables: {0}")]
    Nft(String),
    /// Something else already uses a name this sandbox needs.
    #[error("conflict: {0}")]
    Conflict(String),
}

impl From<NetError> for RuntimeError {
    fn from(e: NetError) -> Self {
        RuntimeError::Network(e.to_string())
    }
}

/// Maps sandbox slots to uplink networks: a /30 of `pool4` and a /64 of
/// `pool6` per slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPlan {
    /// IPv4 pool (prefix length ≤ 30).
    pub pool4: Ipv4Net,
    /// IPv6 pool (prefix length ≤ 64).
    pub pool6: Ipv6Net,
}

impl Default for NetPlan {
    fn default() -> Self {
        Self {
            pool4: DEFAULT_POOL4,
            pool6: DEFAULT_POOL6,
        }
    }
}

impl From<&NetworkConfig> for NetPlan {
    /// `network.pool` and `network.pool6`.
    fn from(cfg: &NetworkConfig) -> Self {
        Self::new(cfg.pool, cfg.pool6)
    }
}

/// The uplink networks of one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uplink {
    /// The /30.
    pub net4: Ipv4Net,
    /// Host side (`tgh<slot>`): first address of the /30.
    pub host_v4: Ipv4Addr,
    /// Router side (`up0`): second address of the /30.
    pub router_v4: Ipv4Addr,
    /// The /64.
    pub net6: Ipv6Net,
    /// Host side: `::1` of the /64.
    pub host_v6: Ipv6Addr,
    /// Router side: `::2` of the /64.
    pub router_v6: Ipv6Addr,
}

impl NetPlan {
    /// A plan over these pools. A pool too small for one uplink has no slots
    /// ([`Self::capacity`] is 0, [`Self::uplink`] fails).
    pub fn new(pool4: Ipv4Net, pool6: Ipv6Net) -> Self {
        Self { pool4, pool6 }
    }

    /// Number of slots: the smaller of the pools' uplink counts (16,384 for the
    /// defaults, bounded by the /16).
    pub fn capacity(&self) -> u32 {
        let v4 = match UPLINK_PREFIX_V4.checked_sub(self.pool4.prefix_len()) {
            Some(bits) => 1u64 << bits,
            None => 0,
        };
        let v6 = match UPLINK_PREFIX_V6.checked_sub(self.pool6.prefix_len()) {
            Some(bits) if bits >= 32 => u64::from(u32::MAX),
            Some(bits) => 1u64 << bits,
            None => 0,
        };
        u32::try_from(v4.min(v6)).unwrap_or(u32::MAX)
    }

    /// The uplink of `slot`: `pool4 + 4·slot` (+1 host, +2 router) and the
    /// `slot`-th /64 of `pool6` (::1 host, ::2 router).
    pub fn uplink(&self, slot: u32) -> Result<Uplink, NetError> {
        if slot >= self.capacity() {
            return Err(NetError::Plan(format!(
                "slot {slot} is outside the pools {} / {} (capacity {})",
                self.pool4,
                self.pool6,
                self.capacity()
            )));
        }
        // slot < capacity ≤ 2^30 (v4) and ≤ 2^(64 - pool6 prefix) (v6): no overflow.
        let base4 = u32::from(self.pool4.network()) + 4 * slot;
        let net4 = Ipv4Net::new(Ipv4Addr::from(base4), UPLINK_PREFIX_V4)
            .map_err(|e| NetError::Plan(e.to_string()))?;
        let base6 = u128::from(self.pool6.network()) + (u128::from(slot) << 64);
        let net6 = Ipv6Net::new(Ipv6Addr::from(base6), UPLINK_PREFIX_V6)
            .map_err(|e| NetError::Plan(e.to_string()))?;
        Ok(Uplink {
            net4,
            host_v4: Ipv4Addr::from(base4 + 1),
            router_v4: Ipv4Addr::from(base4 + 2),
            net6,
            host_v6: Ipv6Addr::from(base6 + 1),
            router_v6: Ipv6Addr::from(base6 + 2),
        })
    }
}

/// A sandbox's network (persisted with the sandbox): names and addresses of
/// both namespaces and all four interfaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    /// The sandbox's network namespace (under `/run/netns`): `tollgate-<id>`.
    pub netns: String,
    /// The router's network namespace: `tgr-<id>`.
    pub router_netns: String,
    /// Slot of the address plan.
    pub slot: u32,
    /// The sandbox's interface (`eth0`, sandbox namespace).
    pub guest_if: String,
    /// The router's guest-facing interface (`tgs0`, router namespace).
    pub gateway_if: String,
    /// The router's uplink (`up0`, router namespace).
    pub uplink_if: String,
    /// The host side of the uplink (`tgh<slot>`, root namespace).
    pub host_if: String,
    /// The guest's IPv4 address.
    pub guest_v4: Ipv4Addr,
    /// The guest's IPv6 address.
    pub guest_v6: Ipv6Addr,
    /// The guest's IPv4 gateway (`tgs0`).
    pub gateway_v4: Ipv4Addr,
    /// The guest's IPv6 gateway (`tgs0`).
    pub gateway_v6: Ipv6Addr,
    /// Prefix length of the guest's IPv4 network.
    pub guest_prefix_v4: u8,
    /// Prefix length of the guest's IPv6 network.
    pub guest_prefix_v6: u8,
    /// IPv4 address of `tgh<slot>` (the router's default gateway).
    pub uplink_host_v4: Ipv4Addr,
    /// IPv4 address of `up0` (what the guest's traffic is NATed to).
    pub uplink_router_v4: Ipv4Addr,
    /// Prefix length of the IPv4 uplink.
    pub uplink_prefix_v4: u8,
    /// IPv6 address of `tgh<slot>`.
    pub uplink_host_v6: Ipv6Addr,
    /// IPv6 address of `up0`.
    pub uplink_router_v6: Ipv6Addr,
    /// Prefix length of the IPv6 uplink.
    pub uplink_prefix_v6: u8,
    /// Port of the proxy listeners in the router namespace.
    pub listener_port: u16,
}

/// Network namespace name of a sandbox: `tollgate-<sandbox id>`.
pub fn netns_name(sandbox_id: &str) -> String {
    format!("{SANDBOX_NETNS_PREFIX}{sandbox_id}")
}

/// Network namespace name of a sandbox's router: `tgr-<sandbox id>`.
pub fn router_netns_name(sandbox_id: &str) -> String {
    format!("{ROUTER_NETNS_PREFIX}{sandbox_id}")
}

/// Host-side interface name of a slot: `tgh<slot>`.
pub fn host_if_name(slot: u32) -> String {
    format!("{HOST_IF_PREFIX}{slot}")
}

/// The network sandbox `id` gets on `slot` (what [`setup`] returns), computed
/// without touching the system: lets a caller that lost the [`NetworkInfo`]
/// still [`teardown`] it.
pub fn info_for(plan: &NetPlan, sandbox_id: &str, slot: u32) -> Result<NetworkInfo, NetError> {
    let netns = netns_name(sandbox_id);
    let router_netns = router_netns_name(sandbox_id);
    ns::validate_netns_name(&netns)?;
    ns::validate_netns_name(&router_netns)?;
    let up = plan.uplink(slot)?;
    Ok(NetworkInfo {
        netns,
        router_netns,
        slot,
        guest_if: GUEST_IF.to_owned(),
        gateway_if: GATEWAY_IF.to_owned(),
        uplink_if: UPLINK_IF.to_owned(),
        host_if: host_if_name(slot),
        guest_v4: GUEST_V4,
        guest_v6: GUEST_V6,
        gateway_v4: GATEWAY_V4,
        gateway_v6: GATEWAY_V6,
        guest_prefix_v4: GUEST_PREFIX_V4,
        guest_prefix_v6: GUEST_PREFIX_V6,
        uplink_host_v4: up.host_v4,
        uplink_router_v4: up.router_v4,
        uplink_prefix_v4: UPLINK_PREFIX_V4,
        uplink_host_v6: up.host_v6,
        uplink_router_v6: up.router_v6,
        uplink_prefix_v6: UPLINK_PREFIX_V6,
        listener_port: LISTENER_PORT,
    })
}

/// The nftables ruleset [`setup`] loads into a router namespace (for
/// inspection and documentation; the text is applied as is).
pub fn router_ruleset(info: &NetworkInfo) -> String {
    nft::router_ruleset(info)
}

/// The nftables ruleset [`host_setup`] loads into the root namespace.
pub fn host_ruleset(plan: &NetPlan) -> String {
    nft::host_ruleset(plan)
}

// ---------------------------------------------------------------------------
// host_setup

/// Host-wide preparation, once at daemon start (idempotent): IPv4 and IPv6
/// forwarding on, and the `inet tollgate_host` table (forwarding and
/// masquerading for the pools), replacing an earlier version of it.
///
/// Turning IPv6 forwarding on makes Linux ignore router advertisements on
/// interfaces with `accept_ra = 1`; those are moved to `accept_ra = 2` first so
/// that a host configured by RAs keeps its IPv6 routes.
pub async fn host_setup(plan: &NetPlan) -> Result<(), NetError> {
    ns::on_dedicated_thread("host sysctls", || {
        if ns::read_sysctl("net/ipv6/conf/all/forwarding").as_deref() != Some("1") {
            keep_accepting_router_advertisements()?;
        }
        ns::write_sysctls(&[
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv6/conf/all/forwarding", "1"),
        ])
    })
    .await?;
    nft::apply(None, nft::host_ruleset(plan)).await
}

fn keep_accepting_router_advertisements() -> Result<(), NetError> {
    let Ok(dir) = std::fs::read_dir("/proc/sys/net/ipv6/conf") else {
        return Ok(());
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if matches!(name.as_str(), "all" | "default" | "lo") || name.starts_with(HOST_IF_PREFIX) {
            continue;
        }
        let key = format!("net/ipv6/conf/{name}/accept_ra");
        if ns::read_sysctl(&key).as_deref() == Some("1") {
            ns::write_sysctls(&[(key.as_str(), "2")])?;
            tracing::info!(interface = %name, "accept_ra 1 -> 2 so that IPv6 forwarding keeps router advertisements");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// setup

/// What one [`setup`] call created (and a failure must release).
#[derive(Clone, Copy, Debug, Default)]
struct Created {
    sandbox_ns: bool,
    router_ns: bool,
    host_link: bool,
    guest_link: bool,
}

/// Releases what a [`setup`] created if it is dropped while armed (the setup
/// future was cancelled).
struct SetupGuard {
    info: NetworkInfo,
    created: Created,
    armed: bool,
}

impl Drop for SetupGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let info = self.info.clone();
        let created = self.created;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { rollback(&info, created).await });
            }
            Err(_) => {
                // No runtime for netlink: the namespaces take their links
                // with them once nothing refers to them.
                if created.router_ns {
                    let _ = delete_netns(&info.router_netns);
                }
                if created.sandbox_ns {
                    let _ = delete_netns(&info.netns);
                }
            }
        }
    }
}

/// Creates (or completes) the network of sandbox `sandbox_id` on `slot`: both
/// namespaces, both veth pairs, addresses, routes, the router's sysctls,
/// fwmark rule, local table and nftables ruleset. See the module
/// documentation for the layout.
///
/// Idempotent: calling it again for a complete network re-applies the same
/// configuration. A `tgh<slot>` that is not the peer of this sandbox router's
/// `up0` is a conflict and is left alone. On any failure (or if the returned
/// future is dropped early), what this call created is removed.
pub async fn setup(plan: &NetPlan, sandbox_id: &str, slot: u32) -> Result<NetworkInfo, NetError> {
    let info = info_for(plan, sandbox_id, slot)?;
    // Whose it is, before anything exists (see `crate::reclaim`).
    claim(sandbox_id, slot)?;
    let mut guard = SetupGuard {
        info: info.clone(),
        created: Created::default(),
        armed: true,
    };
    let result = build(&info, &mut guard.created).await;
    guard.armed = false;
    match result {
        Ok(()) => Ok(info),
        Err(e) => {
            rollback(&info, guard.created).await;
            unclaim(sandbox_id);
            Err(e)
        }
    }
}

/// Where each sandbox's owner (the state dir of the daemon that made it) is
/// recorded, and this daemon's own state dir.
static OWNERS: std::sync::OnceLock<(std::path::PathBuf, std::path::PathBuf)> =
    std::sync::OnceLock::new();

/// Makes [`setup`] record every sandbox it builds as `state_dir`'s in
/// `dir/<sandbox id>` (and [`teardown`] forget it). Once per process.
pub fn set_owner(dir: std::path::PathBuf, state_dir: std::path::PathBuf) -> Result<(), NetError> {
    std::fs::create_dir_all(&dir)
        .map_err(|e| NetError::Plan(format!("create {}: {e}", dir.display())))?;
    let _ = OWNERS.set((dir, state_dir));
    Ok(())
}

/// The owner records' directory, when [`set_owner`] was called.
pub fn owners_dir() -> Option<std::path::PathBuf> {
    OWNERS.get().map(|(d, _)| d.clone())
}

fn claim(sandbox_id: &str, slot: u32) -> Result<(), NetError> {
    let Some((dir, me)) = OWNERS.get() else {
        return Ok(());
    };
    let path = dir.join(sandbox_id);
    std::fs::write(&path, format!("{}\n{slot}\n", me.display()))
        .map_err(|e| NetError::Plan(format!("record the owner in {}: {e}", path.display())))
}

/// Forgets sandbox `id`'s owner record (idempotent).
pub fn unclaim(sandbox_id: &str) {
    if let Some((dir, _)) = OWNERS.get() {
        match std::fs::remove_file(dir.join(sandbox_id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(sandbox = %sandbox_id, error = %e, "cannot remove an owner record")
            }
        }
    }
}

/// Is a host-side link of `slot` present in this namespace (a sandbox of
/// another daemon, or one being torn down)? The allocator steps past it.
pub fn host_link_present(slot: u32) -> bool {
    nix::net::if_::if_nametoindex(host_if_name(slot).as_str()).is_ok()
}

async fn build(info: &NetworkInfo, created: &mut Created) -> Result<(), NetError> {
    let sandbox_path = netns_path(&info.netns);
    let router_path = netns_path(&info.router_netns);
    created.sandbox_ns = create_netns(&info.netns).await?;
    created.router_ns = create_netns(&info.router_netns).await?;

    let root = Nl::current()?;
    let router = Nl::in_netns(&router_path).await?;
    let sandbox = Nl::in_netns(&sandbox_path).await?;

    // Uplink pair: tgh<slot> (root) ⇄ up0 (router).
    match root.link(&info.host_if).await? {
        Some(host) => {
            let up = router.link(&info.uplink_if).await?;
            if !matches!(up, Some(up) if up.peer == Some(host.index)) {
                return Err(NetError::Conflict(format!(
                    "link {} exists and is not the uplink of {}",
                    info.host_if, info.router_netns
                )));
            }
        }
        None => {
            // A stale up0 in our own router namespace (its host side is gone).
            if let Some(stale) = router.link(&info.uplink_if).await? {
                router.del_link(stale.index, &info.uplink_if).await?;
            }
            root.create_veth(&info.host_if, &info.uplink_if, &router_path)
                .await?;
            created.host_link = true;
        }
    }

    // Guest pair: tgs0 (router) ⇄ eth0 (sandbox).
    let gateway = router.link(&info.gateway_if).await?;
    let paired = match (gateway, sandbox.link(&info.guest_if).await?) {
        (Some(gw), Some(guest)) => guest.peer == Some(gw.index),
        _ => false,
    };
    if !paired {
        if let Some(stale) = gateway {
            // Everything in the router namespace is this sandbox's.
            router.del_link(stale.index, &info.gateway_if).await?;
        }
        router
            .create_veth(&info.gateway_if, &info.guest_if, &sandbox_path)
            .await?;
        created.guest_link = true;
    }

    ns::run_in(&router_path, "router sysctls", || {
        ns::write_sysctls(ROUTER_SYSCTLS)
    })
    .await?;

    // Root namespace: the host side of the uplink.
    let host = root.require(&info.host_if).await?;
    root.add_addr(
        host,
        &info.host_if,
        IpAddr::V4(info.uplink_host_v4),
        info.uplink_prefix_v4,
    )
    .await?;
    root.add_addr(
        host,
        &info.host_if,
        IpAddr::V6(info.uplink_host_v6),
        info.uplink_prefix_v6,
    )
    .await?;
    root.set_up(host, &info.host_if).await?;

    // Router namespace.
    let lo = router.require("lo").await?;
    router.set_up(lo, "lo").await?;
    let up = router.require(&info.uplink_if).await?;
    router
        .add_addr(
            up,
            &info.uplink_if,
            IpAddr::V4(info.uplink_router_v4),
            info.uplink_prefix_v4,
        )
        .await?;
    router
        .add_addr(
            up,
            &info.uplink_if,
            IpAddr::V6(info.uplink_router_v6),
            info.uplink_prefix_v6,
        )
        .await?;
    router.set_up(up, &info.uplink_if).await?;
    let gw = router.require(&info.gateway_if).await?;
    // The same gateway MAC in every sandbox: a guest restored from a memory
    // snapshot keeps the neighbour entry it had, and it stays right.
    router.set_mac(gw, &info.gateway_if, GATEWAY_MAC).await?;
    router
        .add_addr(
            gw,
            &info.gateway_if,
            IpAddr::V4(info.gateway_v4),
            info.guest_prefix_v4,
        )
        .await?;
    router
        .add_addr(
            gw,
            &info.gateway_if,
            IpAddr::V6(info.gateway_v6),
            info.guest_prefix_v6,
        )
        .await?;
    router.set_up(gw, &info.gateway_if).await?;
    router
        .default_route(IpAddr::V4(info.uplink_host_v4))
        .await?;
    router
        .default_route(IpAddr::V6(info.uplink_host_v6))
        .await?;
    for v6 in [false, true] {
        router
            .fwmark_rule(v6, STEER_MARK, STEER_MARK, STEER_TABLE, STEER_RULE_PRIORITY)
            .await?;
        router.local_default_route(v6, lo, STEER_TABLE).await?;
    }

    // Sandbox namespace.
    let lo = sandbox.require("lo").await?;
    sandbox.set_up(lo, "lo").await?;
    let eth = sandbox.require(&info.guest_if).await?;
    sandbox
        .add_addr(
            eth,
            &info.guest_if,
            IpAddr::V4(info.guest_v4),
            info.guest_prefix_v4,
        )
        .await?;
    sandbox
        .add_addr(
            eth,
            &info.guest_if,
            IpAddr::V6(info.guest_v6),
            info.guest_prefix_v6,
        )
        .await?;
    sandbox.set_up(eth, &info.guest_if).await?;
    sandbox.default_route(IpAddr::V4(info.gateway_v4)).await?;
    sandbox.default_route(IpAddr::V6(info.gateway_v6)).await?;

    nft::apply(Some(&router_path), nft::router_ruleset(info)).await
}

/// Removes what one [`setup`] call created, logging (not returning) failures.
async fn rollback(info: &NetworkInfo, created: Created) {
    if created.host_link {
        if let Err(e) = remove_host_link(info).await {
            tracing::warn!(link = %info.host_if, error = %e, "rollback: delete host link failed");
        }
    }
    if created.guest_link {
        if let Err(e) = remove_guest_link(info).await {
            tracing::warn!(link = %info.gateway_if, error = %e, "rollback: delete guest link failed");
        }
    }
    for (made, name) in [
        (created.router_ns, &info.router_netns),
        (created.sandbox_ns, &info.netns),
    ] {
        if made {
            if let Err(e) = delete_netns(name) {
                tracing::warn!(netns = %name, error = %e, "rollback: delete namespace failed");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// teardown

/// Deletes `tgh<slot>` (and with it `up0`) if it is the peer of this
/// sandbox router's `up0`; a link that is not is left alone.
async fn remove_host_link(info: &NetworkInfo) -> Result<(), NetError> {
    let router_path = netns_path(&info.router_netns);
    if !ns::is_nsfs(&router_path) {
        return Ok(());
    }
    let root = Nl::current()?;
    let Some(host) = root.link(&info.host_if).await? else {
        return Ok(());
    };
    let router = Nl::in_netns(&router_path).await?;
    match router.link(&info.uplink_if).await? {
        Some(up) if up.peer == Some(host.index) => root.del_link(host.index, &info.host_if).await,
        _ => {
            tracing::warn!(
                link = %info.host_if,
                netns = %info.router_netns,
                "teardown: link is not this sandbox's uplink, left in place"
            );
            Ok(())
        }
    }
}

/// Deletes `tgs0` (and with it the sandbox's `eth0`) in the router namespace.
async fn remove_guest_link(info: &NetworkInfo) -> Result<(), NetError> {
    let router_path = netns_path(&info.router_netns);
    if !ns::is_nsfs(&router_path) {
        return Ok(());
    }
    let router = Nl::in_netns(&router_path).await?;
    match router.link(&info.gateway_if).await? {
        Some(gw) => router.del_link(gw.index, &info.gateway_if).await,
        None => Ok(()),
    }
}

/// Removes a sandbox network: the host link (only while it is this sandbox's
/// uplink), the guest link, and both namespaces (with them the router's
/// rules, routes and nftables table). Idempotent; only the fields naming
/// things are used, so an [`info_for`] result works as well.
///
/// Sockets still open in the router namespace (proxy listeners) keep the
/// namespace object alive, though unnamed and without links, until they are
/// closed.
pub async fn teardown(info: &NetworkInfo) -> Result<(), NetError> {
    ns::validate_netns_name(&info.netns)?;
    ns::validate_netns_name(&info.router_netns)?;
    remove_host_link(info).await?;
    remove_guest_link(info).await?;
    delete_netns(&info.router_netns)?;
    delete_netns(&info.netns)?;
    if let Some(id) = info.netns.strip_prefix(SANDBOX_NETNS_PREFIX) {
        unclaim(id);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// a VM's wire

/// The bridge inside a VM sandbox's namespace that joins the VM's tap to
/// `eth0`: the sandbox namespace becomes a plain wire and the guest kernel
/// holds the sandbox's address.
pub const VM_BRIDGE_IF: &str = "br0";

/// Turns the sandbox namespace of `info` into a wire for a VM: IPv6 off in
/// it (no link-local chatter; the VM's tap gets none either), `eth0`'s
/// addresses and routes removed (the guest owns them; the namespace must not
/// answer ARP for them), and `eth0` a port of the bridge [`VM_BRIDGE_IF`].
/// Idempotent. The router namespace, `tgs0`, eBPF and nftables are untouched.
pub async fn prepare_vm_wire(info: &NetworkInfo) -> Result<(), NetError> {
    let path = netns_path(&info.netns);
    ns::run_in(&path, "VM wire sysctls", || {
        ns::write_sysctls(&[
            ("net/ipv6/conf/default/disable_ipv6", "1"),
            ("net/ipv6/conf/all/disable_ipv6", "1"),
        ])
    })
    .await?;
    let nl = Nl::in_netns(&path).await?;
    let eth = nl.require(&info.guest_if).await?;
    nl.flush_addrs(eth, &info.guest_if).await?;
    let br = nl.ensure_bridge(VM_BRIDGE_IF).await?;
    nl.set_master(eth, &info.guest_if, br).await?;
    nl.set_up(eth, &info.guest_if).await?;
    nl.set_up(br, VM_BRIDGE_IF).await
}

/// Name of the tap QEMU creates for the VM on `slot` in the daemon's own
/// namespace, before [`adopt_vm_tap`] moves it into the sandbox's.
pub fn vm_tap_name(slot: u32) -> String {
    format!("{VM_TAP_PREFIX}{slot}")
}

/// Prefix of a VM's tap while it lives in the daemon's namespace: `tgv<slot>`.
pub const VM_TAP_PREFIX: &str = "tgv";

/// Moves the VM's tap `tap` from the daemon's namespace (where QEMU made it,
/// so that QEMU could start before the sandbox's network existed) into the
/// sandbox namespace, adds it to the wire [`prepare_vm_wire`] made, and sets
/// it up.
pub async fn adopt_vm_tap(info: &NetworkInfo, tap: &str) -> Result<(), NetError> {
    let path = netns_path(&info.netns);
    let root = Nl::current()?;
    if let Some(l) = root.link(tap).await? {
        root.set_netns(l.index, tap, &path).await?;
    }
    let nl = Nl::in_netns(&path).await?;
    let br = nl.require(VM_BRIDGE_IF).await?;
    let t = nl.require(tap).await?;
    nl.set_master(t, tap, br).await?;
    nl.set_up(t, tap).await
}

/// Runs `f` on a fresh OS thread inside the network namespace `name` (a
/// process spawned there is born in that namespace).
pub async fn run_in_netns<T, F>(name: &str, what: &str, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
{
    ns::validate_netns_name(name)?;
    ns::run_in(&netns_path(name), what, f).await
}

// ---------------------------------------------------------------------------
// proxy listeners

/// The proxy's listening sockets in a router namespace.
#[derive(Debug)]
pub struct Listeners {
    /// `0.0.0.0:<listener_port>`.
    pub v4: TcpListener,
    /// `[::]:<listener_port>`, IPv6 only.
    pub v6: TcpListener,
}

/// Opens the proxy's listeners inside the router namespace of `info`:
/// non-blocking, `IP_TRANSPARENT` (connections to any original destination
/// can be accepted and answered), `SO_REUSEADDR`, bound to
/// `0.0.0.0:<listener_port>` and `[::]:<listener_port>` (v6 only), backlog
/// [`LISTENER_BACKLOG`]. Blocks briefly (a dedicated thread creates them).
pub fn open_listeners(info: &NetworkInfo) -> io::Result<Listeners> {
    ns::validate_netns_name(&info.router_netns)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let port = info.listener_port;
    ns::run_in_blocking(&netns_path(&info.router_netns), move || {
        Ok(Listeners {
            v4: transparent_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?,
            v6: transparent_listener(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?,
        })
    })
}

/// The sandbox resolver's sockets at its gateway (UDP and TCP port 53, v4
/// and v6), inside the router namespace.
pub struct DnsSockets {
    /// UDP on the v4 gateway.
    pub udp4: std::net::UdpSocket,
    /// UDP on the v6 gateway.
    pub udp6: std::net::UdpSocket,
    /// TCP on the v4 gateway.
    pub tcp4: TcpListener,
    /// TCP on the v6 gateway.
    pub tcp6: TcpListener,
}

/// Opens [`DnsSockets`] inside the router namespace of `info`, non-blocking.
pub fn open_dns_sockets(info: &NetworkInfo) -> io::Result<DnsSockets> {
    ns::validate_netns_name(&info.router_netns)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let (g4, g6) = (info.gateway_v4, info.gateway_v6);
    ns::run_in_blocking(&netns_path(&info.router_netns), move || {
        let udp = |a: SocketAddr| -> io::Result<std::net::UdpSocket> {
            let s = std::net::UdpSocket::bind(a)?;
            s.set_nonblocking(true)?;
            Ok(s)
        };
        let tcp = |a: SocketAddr| -> io::Result<TcpListener> {
            let l = TcpListener::bind(a)?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        Ok(DnsSockets {
            udp4: udp(SocketAddr::from((g4, 53)))?,
            udp6: udp(SocketAddr::from((g6, 53)))?,
            tcp4: tcp(SocketAddr::from((g4, 53)))?,
            tcp6: tcp(SocketAddr::from((g6, 53)))?,
        })
    })
}

/// The listeners of the sandbox's CA endpoint (TCP [`CA_PORT`] on the
/// gateway, v4 and v6), inside the router namespace.
#[derive(Debug)]
pub struct CaListeners {
    /// `10.0.2.2:80`.
    pub v4: TcpListener,
    /// `[fd00:7467::2]:80`.
    pub v6: TcpListener,
}

/// Opens [`CaListeners`] inside the router namespace of `info`,
/// non-blocking.
pub fn open_ca_listeners(info: &NetworkInfo) -> io::Result<CaListeners> {
    ns::validate_netns_name(&info.router_netns)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let (g4, g6) = (info.gateway_v4, info.gateway_v6);
    ns::run_in_blocking(&netns_path(&info.router_netns), move || {
        let tcp = |a: SocketAddr| -> io::Result<TcpListener> {
            let l = TcpListener::bind(a)?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        Ok(CaListeners {
            v4: tcp(SocketAddr::from((g4, CA_PORT)))?,
            v6: tcp(SocketAddr::from((g6, CA_PORT)))?,
        })
    })
}

fn transparent_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn, SockaddrIn6,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    // IP_TRANSPARENT sets the socket's transparent flag for both families
    // (the kernel passes SOL_IP options of IPv6 TCP sockets to the IPv4 code,
    // and IPV6_TRANSPARENT sets the same flag).
    setsockopt(&fd, sockopt::IpTransparent, &true)?;
    match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?;
        }
    }
    listen(&fd, Backlog::new(LISTENER_BACKLOG)?)?;
    Ok(TcpListener::from(fd))
}
