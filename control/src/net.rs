//! Per-sandbox networks: a named network namespace plus a veth pair, set up
//! over rtnetlink (no `ip` subprocesses).
//!
//! Layout for slot `n` of an [`AddressPlan`] (default pool `10.200.0.0/16`):
//!
//! ```text
//!  root namespace                      namespace /run/netns/tollgate-<id>
//!  tgh<n>  gateway = base+4n+1/30  ⇄  eth0  guest = base+4n+2/30
//!                                      lo up, default via gateway
//! ```
//!
//! Netlink sockets are bound to the network namespace of the thread that
//! created them, so everything done *inside* a sandbox namespace goes through
//! a socket opened by a short-lived dedicated OS thread that first `setns`'d
//! into it; no tokio worker ever changes namespace.
//!
//! [`setup`] and [`teardown`] are idempotent. A failed [`setup`] releases what
//! that call created (namespace, link) before returning the error.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkInfo};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use serde::{Deserialize, Serialize};

use crate::runtime::{NetworkInfo, RuntimeError};

/// Directory holding named network namespaces (same as iproute2).
pub const NETNS_DIR: &str = "/run/netns";
/// Name of the sandbox-side interface inside its namespace.
pub const GUEST_IF: &str = "eth0";
/// Prefix length of every sandbox link network.
pub const LINK_PREFIX_LEN: u8 = 30;
/// Default address pool.
pub const DEFAULT_POOL: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 200, 0, 0), 16);

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
    /// Something else already uses a name this sandbox needs.
    #[error("conflict: {0}")]
    Conflict(String),
}

impl From<NetError> for RuntimeError {
    fn from(e: NetError) -> Self {
        RuntimeError::Network(e.to_string())
    }
}

/// Maps sandbox slots to /30 link networks inside a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressPlan {
    /// The pool every link network is carved from (prefix length ≤ 30).
    pub pool: Ipv4Net,
}

impl Default for AddressPlan {
    fn default() -> Self {
        Self { pool: DEFAULT_POOL }
    }
}

/// Addresses of one sandbox link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkAddrs {
    /// The /30 link network.
    pub network: Ipv4Net,
    /// Host-side address (the sandbox's default gateway).
    pub gateway: Ipv4Addr,
    /// The sandbox's address.
    pub guest: Ipv4Addr,
    /// Prefix length of `network` (always [`LINK_PREFIX_LEN`]).
    pub prefix_len: u8,
}

impl AddressPlan {
    /// A plan over `pool`. A pool smaller than a /30 has no slots
    /// ([`Self::capacity`] is 0, [`Self::link`] fails).
    pub fn new(pool: Ipv4Net) -> Self {
        Self { pool }
    }

    /// Number of slots (/30 networks) in the pool: 16384 for a /16.
    pub fn capacity(&self) -> u32 {
        match LINK_PREFIX_LEN.checked_sub(self.pool.prefix_len()) {
            Some(bits) => 1u32 << bits,
            None => 0,
        }
    }

    /// The link network of `slot`: base + 4·slot, gateway +1, guest +2.
    pub fn link(&self, slot: u32) -> Result<LinkAddrs, NetError> {
        if slot >= self.capacity() {
            return Err(NetError::Plan(format!(
                "slot {slot} is outside the pool {} (capacity {})",
                self.pool,
                self.capacity()
            )));
        }
        // slot < capacity ≤ 2^30, so 4·slot fits and stays inside the pool.
        let base = u32::from(self.pool.network()) + 4 * slot;
        let network = Ipv4Net::new(Ipv4Addr::from(base), LINK_PREFIX_LEN)
            .map_err(|e| NetError::Plan(e.to_string()))?;
        Ok(LinkAddrs {
            network,
            gateway: Ipv4Addr::from(base + 1),
            guest: Ipv4Addr::from(base + 2),
            prefix_len: LINK_PREFIX_LEN,
        })
    }
}

/// Network namespace name of a sandbox: `tollgate-<sandbox id>`.
pub fn netns_name(sandbox_id: &str) -> String {
    format!("tollgate-{sandbox_id}")
}

/// Host-side interface name of a slot: `tgh<slot>`.
pub fn host_if_name(slot: u32) -> String {
    format!("tgh{slot}")
}

/// Path of a named network namespace: `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn validate_netns_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(NetError::Name(format!("network namespace name {name:?}")))
    }
}

fn ns_err(name: &str, reason: impl std::fmt::Display) -> NetError {
    NetError::Netns {
        name: name.to_owned(),
        reason: reason.to_string(),
    }
}

/// Is `path` a mounted namespace file (nsfs)?
fn is_nsfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

/// Does the named network namespace exist (as a mounted namespace file)?
pub fn netns_exists(name: &str) -> bool {
    is_nsfs(&netns_path(name))
}

/// Makes `/run/netns` exist and be a shared mount point, like `ip netns add`,
/// so that namespace mounts below it propagate to every mount namespace that
/// was cloned from ours.
fn prepare_netns_dir() -> Result<(), NetError> {
    // Serialised so that two concurrent first setups do not both bind-mount
    // the directory onto itself.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _lock = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Path::new(NETNS_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| ns_err(NETNS_DIR, format!("create directory: {e}")))?;
    let mut bound = false;
    loop {
        match mount(
            None::<&str>,
            dir,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) => return Ok(()),
            // Not a mount point yet: bind it onto itself, then retry.
            Err(Errno::EINVAL) if !bound => {
                mount(
                    Some(dir),
                    dir,
                    Some("none"),
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| ns_err(NETNS_DIR, format!("bind mount onto itself: {e}")))?;
                bound = true;
            }
            Err(e) => return Err(ns_err(NETNS_DIR, format!("make shared: {e}"))),
        }
    }
}

/// Creates the namespace on this (dedicated, about to exit) thread and binds
/// it to `path`.
fn create_netns_blocking(name: &str) -> Result<bool, NetError> {
    validate_netns_name(name)?;
    prepare_netns_dir()?;
    let path = netns_path(name);
    if is_nsfs(&path) {
        return Ok(false);
    }
    let created_file = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&path)
    {
        Ok(_) => true,
        // A leftover plain file (e.g. a crash between create and mount): reuse it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(ns_err(name, format!("create {}: {e}", path.display()))),
    };
    let result = unshare(CloneFlags::CLONE_NEWNET)
        .map_err(|e| ns_err(name, format!("unshare(CLONE_NEWNET): {e}")))
        .and_then(|()| {
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| ns_err(name, format!("bind mount to {}: {e}", path.display())))
        });
    if let Err(e) = result {
        if created_file {
            let _ = fs::remove_file(&path);
        }
        return Err(e);
    }
    Ok(true)
}

/// Runs `f` on a fresh OS thread (which may change its namespaces freely and
/// then exits) without blocking the async caller.
async fn on_dedicated_thread<T, F>(what: &str, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("tollgate-netns".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| NetError::Netlink(format!("{what}: spawn thread: {e}")))?;
    rx.await
        .map_err(|_| NetError::Netlink(format!("{what}: worker thread died")))?
}

/// Creates the named network namespace `/run/netns/<name>` (like
/// `ip netns add`). Returns whether it was created (`false`: already there).
pub async fn create_netns(name: &str) -> Result<bool, NetError> {
    let name = name.to_owned();
    on_dedicated_thread("create namespace", move || create_netns_blocking(&name)).await
}

/// Deletes the named network namespace (like `ip netns delete`): lazy unmount
/// and unlink. Idempotent.
pub fn delete_netns(name: &str) -> Result<(), NetError> {
    validate_netns_name(name)?;
    let path = netns_path(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point; ENOENT: already gone.
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(ns_err(name, format!("unmount: {e}"))),
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ns_err(name, format!("remove {}: {e}", path.display()))),
    }
}

/// An rtnetlink connection whose driver task is aborted on drop.
struct Nl {
    handle: rtnetlink::Handle,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Nl {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

fn nl_err(what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Netlink(format!("{what}: {e}"))
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

impl Nl {
    /// A connection in the caller's network namespace.
    fn current() -> Result<Self, NetError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| nl_err("open netlink socket", e))?;
        let driver = tokio::spawn(conn);
        Ok(Self { handle, driver })
    }

    /// A connection bound to the namespace at `path`: the socket is opened by
    /// a dedicated thread that joined the namespace first.
    async fn in_netns(path: PathBuf) -> Result<Self, NetError> {
        let rt =
            tokio::runtime::Handle::try_current().map_err(|e| nl_err("netlink in namespace", e))?;
        let (conn, handle) = on_dedicated_thread("netlink in namespace", move || {
            let file = fs::File::open(&path)
                .map_err(|e| nl_err(&format!("open {}", path.display()), e))?;
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| nl_err(&format!("setns {}", path.display()), e))?;
            // The socket is registered with the caller's runtime, but created
            // (and therefore bound) here, inside the namespace.
            let _guard = rt.enter();
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| nl_err("open netlink socket", e))?;
            Ok((conn, handle))
        })
        .await?;
        let driver = tokio::spawn(conn);
        Ok(Self { handle, driver })
    }

    /// Index and IFLA_LINK of the link named `name`, if it exists.
    async fn link(&self, name: &str) -> Result<Option<(u32, Option<u32>)>, NetError> {
        let mut req = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match req.try_next().await {
            Ok(Some(msg)) => {
                let peer = msg.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Link(i) => Some(*i),
                    _ => None,
                });
                Ok(Some((msg.header.index, peer)))
            }
            Ok(None) => Ok(None),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(&format!("get link {name}"), e)),
        }
    }

    async fn require_link(&self, name: &str) -> Result<u32, NetError> {
        self.link(name)
            .await?
            .map(|(i, _)| i)
            .ok_or_else(|| NetError::Netlink(format!("link {name} not found")))
    }

    async fn set_up(&self, index: u32, name: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .map_err(|e| nl_err(&format!("set {name} up"), e))
    }

    async fn add_addr(&self, index: u32, name: &str, addr: Ipv4Addr) -> Result<(), NetError> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), LINK_PREFIX_LEN)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_err(&format!("add {addr}/{LINK_PREFIX_LEN} to {name}"), e))
    }

    async fn del_link(&self, index: u32, name: &str) -> Result<(), NetError> {
        let mut links = self.handle.link();
        match links.del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(nl_err(&format!("delete link {name}"), e)),
        }
    }
}

/// Creates `tgh<slot>` in the current namespace with its peer created directly
/// inside the sandbox namespace under the name `eth0`.
async fn create_veth(root: &Nl, host_if: &str, netns: &Path) -> Result<(), NetError> {
    let ns_file =
        fs::File::open(netns).map_err(|e| nl_err(&format!("open {}", netns.display()), e))?;
    // `veth(a, b)`: `b` is the link of the main message (here, host side),
    // `a` is the peer.
    let mut req = root
        .handle
        .link()
        .add()
        .veth(GUEST_IF.to_owned(), host_if.to_owned());
    let mut placed = false;
    for attr in req.message_mut().attributes.iter_mut() {
        if let LinkAttribute::LinkInfo(infos) = attr {
            for info in infos.iter_mut() {
                if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))) = info {
                    peer.attributes
                        .push(LinkAttribute::NetNsFd(ns_file.as_raw_fd()));
                    placed = true;
                }
            }
        }
    }
    if !placed {
        return Err(NetError::Netlink(
            "veth request has no peer to place in the namespace".into(),
        ));
    }
    let result = req.execute().await;
    drop(ns_file);
    match result {
        Ok(()) => Ok(()),
        Err(e) if errno_of(&e) == Some(libc::EEXIST) => Err(NetError::Conflict(format!(
            "cannot create veth {host_if} <-> {GUEST_IF}: a link with one of these names exists"
        ))),
        Err(e) => Err(nl_err(&format!("create veth {host_if}"), e)),
    }
}

/// Whether `tgh<slot>` (index `host_index`) is the peer of `eth0` in the
/// namespace at `netns_path`.
async fn link_belongs_to(host_index: u32, netns_path: &Path) -> Result<bool, NetError> {
    let ns = Nl::in_netns(netns_path.to_owned()).await?;
    Ok(matches!(ns.link(GUEST_IF).await?, Some((_, Some(peer))) if peer == host_index))
}

/// Configures both ends once the pair exists.
async fn configure(
    root: &Nl,
    host_if: &str,
    path: &Path,
    addrs: &LinkAddrs,
) -> Result<(), NetError> {
    let host = root.require_link(host_if).await?;
    root.add_addr(host, host_if, addrs.gateway).await?;
    root.set_up(host, host_if).await?;

    let ns = Nl::in_netns(path.to_owned()).await?;
    let lo = ns.require_link("lo").await?;
    ns.set_up(lo, "lo").await?;
    let eth0 = ns.require_link(GUEST_IF).await?;
    ns.add_addr(eth0, GUEST_IF, addrs.guest).await?;
    ns.set_up(eth0, GUEST_IF).await?;
    ns.handle
        .route()
        .add()
        .v4()
        .gateway(addrs.gateway)
        .replace()
        .execute()
        .await
        .map_err(|e| nl_err(&format!("add default route via {}", addrs.gateway), e))?;
    Ok(())
}

/// Creates (or completes) the network of the sandbox whose namespace is
/// `netns` on `slot`: namespace, veth pair, addresses, routes.
///
/// Idempotent: calling it again for a complete network re-applies the same
/// configuration. A link `tgh<slot>` that is not the peer of this namespace's
/// `eth0` is a conflict and is left alone. On any failure, what this call
/// created (namespace, link) is removed before the error is returned.
pub async fn setup(plan: &AddressPlan, netns: &str, slot: u32) -> Result<NetworkInfo, NetError> {
    let addrs = plan.link(slot)?;
    validate_netns_name(netns)?;
    let host_if = host_if_name(slot);
    let path = netns_path(netns);
    let info = NetworkInfo {
        netns: netns.to_owned(),
        host_if: host_if.clone(),
        guest_if: GUEST_IF.to_owned(),
        gateway: addrs.gateway,
        guest_addr: addrs.guest,
        prefix_len: addrs.prefix_len,
    };

    let root = Nl::current()?;
    let created_ns = create_netns(netns).await?;
    let mut created_link = false;
    let result = async {
        match root.link(&host_if).await? {
            Some((index, _)) => {
                if !link_belongs_to(index, &path).await? {
                    return Err(NetError::Conflict(format!(
                        "link {host_if} exists and does not belong to namespace {netns}"
                    )));
                }
            }
            None => {
                create_veth(&root, &host_if, &path).await?;
                created_link = true;
            }
        }
        configure(&root, &host_if, &path, &addrs).await
    }
    .await;

    if let Err(e) = result {
        if created_link {
            if let Ok(Some((index, _))) = root.link(&host_if).await {
                if let Err(de) = root.del_link(index, &host_if).await {
                    tracing::warn!(link = %host_if, error = %de, "rollback: delete link failed");
                }
            }
        }
        if created_ns {
            if let Err(de) = delete_netns(netns) {
                tracing::warn!(netns, error = %de, "rollback: delete namespace failed");
            }
        }
        return Err(e);
    }
    Ok(info)
}

/// Removes a sandbox network: the host link (which takes the peer with it)
/// and the namespace. Idempotent.
///
/// The host link is deleted only while it is still the peer of the
/// namespace's `eth0`, so a stale [`NetworkInfo`] never removes the link of a
/// newer sandbox that reused the slot.
pub async fn teardown(info: &NetworkInfo) -> Result<(), NetError> {
    validate_netns_name(&info.netns)?;
    let path = netns_path(&info.netns);
    if is_nsfs(&path) {
        let root = Nl::current()?;
        if let Some((index, _)) = root.link(&info.host_if).await? {
            if link_belongs_to(index, &path).await? {
                root.del_link(index, &info.host_if).await?;
            } else {
                tracing::warn!(
                    link = %info.host_if,
                    netns = %info.netns,
                    "teardown: link belongs to another namespace, left in place"
                );
            }
        }
    }
    delete_netns(&info.netns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_maps_slots_to_slash30() {
        let plan = AddressPlan::default();
        assert_eq!(plan.capacity(), 16384);
        let l0 = plan.link(0).expect("slot 0");
        assert_eq!(l0.network.to_string(), "10.200.0.0/30");
        assert_eq!(l0.gateway, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(l0.guest, Ipv4Addr::new(10, 200, 0, 2));
        let l = plan.link(16383).expect("last slot");
        assert_eq!(l.gateway, Ipv4Addr::new(10, 200, 255, 253));
        assert_eq!(l.guest, Ipv4Addr::new(10, 200, 255, 254));
        assert!(plan.link(16384).is_err());
        let small = AddressPlan::new("192.168.7.0/29".parse().expect("net"));
        assert_eq!(small.capacity(), 2);
        assert_eq!(
            small.link(1).expect("1").guest,
            Ipv4Addr::new(192, 168, 7, 6)
        );
        let tiny = AddressPlan::new("10.0.0.0/31".parse().expect("net"));
        assert_eq!(tiny.capacity(), 0);
        assert!(tiny.link(0).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(netns_name("sbx-1"), "tollgate-sbx-1");
        assert_eq!(host_if_name(4001), "tgh4001");
        assert!(validate_netns_name("tollgate-sbx-1").is_ok());
        assert!(validate_netns_name("../x").is_err());
        assert!(validate_netns_name("").is_err());
    }
}
