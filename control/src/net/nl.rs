//! A small rtnetlink client: links, veth pairs, addresses, routes and policy
//! rules, in the daemon's namespace or in a named one.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlag};
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkInfo};
use netlink_packet_route::route::{RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute};

use super::{ns, NetError};

/// An rtnetlink connection whose driver task is aborted on drop.
pub(super) struct Nl {
    handle: rtnetlink::Handle,
    driver: tokio::task::JoinHandle<()>,
    /// Where this connection lives, for error messages.
    place: String,
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

/// A link as far as this module cares: its index and `IFLA_LINK` (for a veth,
/// the peer's index in the peer's namespace).
#[derive(Clone, Copy, Debug)]
pub(super) struct Link {
    pub index: u32,
    pub peer: Option<u32>,
}

impl Nl {
    /// A connection in the caller's network namespace.
    pub fn current() -> Result<Self, NetError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| nl_err("open netlink socket", e))?;
        let driver = tokio::spawn(conn);
        Ok(Self {
            handle,
            driver,
            place: "root namespace".into(),
        })
    }

    /// A connection bound to the namespace at `path`: the socket is opened by
    /// a dedicated thread that joined the namespace first.
    pub async fn in_netns(path: &Path) -> Result<Self, NetError> {
        let rt =
            tokio::runtime::Handle::try_current().map_err(|e| nl_err("netlink in namespace", e))?;
        let (conn, handle) = ns::run_in(path, "netlink in namespace", move || {
            // The socket is registered with the caller's runtime, but created
            // (and therefore bound) here, inside the namespace.
            let _guard = rt.enter();
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| nl_err("open netlink socket", e))?;
            Ok((conn, handle))
        })
        .await?;
        let driver = tokio::spawn(conn);
        Ok(Self {
            handle,
            driver,
            place: path.display().to_string(),
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> NetError {
        nl_err(&format!("{what} (in {})", self.place), e)
    }

    /// The link named `name`, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetError> {
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
                Ok(Some(Link {
                    index: msg.header.index,
                    peer,
                }))
            }
            Ok(None) => Ok(None),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(self.err(&format!("get link {name}"), e)),
        }
    }

    /// Index of the link named `name`, which must exist.
    pub async fn require(&self, name: &str) -> Result<u32, NetError> {
        self.link(name)
            .await?
            .map(|l| l.index)
            .ok_or_else(|| self.err("find link", format!("{name} not found")))
    }

    pub async fn set_up(&self, index: u32, name: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .map_err(|e| self.err(&format!("set {name} up"), e))
    }

    /// Adds (or re-adds) an address; IPv6 addresses skip duplicate address
    /// detection, so they are usable at once.
    pub async fn add_addr(
        &self,
        index: u32,
        name: &str,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), NetError> {
        let mut req = self.handle.address().add(index, addr, prefix_len).replace();
        if addr.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(vec![AddressFlag::Nodad]));
        }
        req.execute()
            .await
            .map_err(|e| self.err(&format!("add {addr}/{prefix_len} to {name}"), e))
    }

    /// Deletes a link (its veth peer goes with it). A link that is already
    /// gone is fine.
    pub async fn del_link(&self, index: u32, name: &str) -> Result<(), NetError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(self.err(&format!("delete link {name}"), e)),
        }
    }

    /// Creates the veth pair `local` (in this connection's namespace) ⇄
    /// `peer` (created directly inside the namespace at `peer_ns`).
    pub async fn create_veth(
        &self,
        local: &str,
        peer: &str,
        peer_ns: &Path,
    ) -> Result<(), NetError> {
        let ns_file = fs::File::open(peer_ns)
            .map_err(|e| nl_err(&format!("open {}", peer_ns.display()), e))?;
        // rtnetlink's `veth(a, b)` names the main link `b` and the peer `a`.
        let mut req = self
            .handle
            .link()
            .add()
            .veth(peer.to_owned(), local.to_owned());
        let mut placed = false;
        for attr in req.message_mut().attributes.iter_mut() {
            if let LinkAttribute::LinkInfo(infos) = attr {
                for info in infos.iter_mut() {
                    if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) = info {
                        p.attributes
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
                "cannot create veth {local} <-> {peer} (in {}): a link with one of these names exists",
                peer_ns.display()
            ))),
            Err(e) => Err(self.err(&format!("create veth {local} <-> {peer}"), e)),
        }
    }

    /// `ip route replace default via <gw>`.
    pub async fn default_route(&self, gateway: IpAddr) -> Result<(), NetError> {
        let result = match gateway {
            IpAddr::V4(gw) => {
                self.handle
                    .route()
                    .add()
                    .v4()
                    .gateway(gw)
                    .replace()
                    .execute()
                    .await
            }
            IpAddr::V6(gw) => {
                self.handle
                    .route()
                    .add()
                    .v6()
                    .gateway(gw)
                    .replace()
                    .execute()
                    .await
            }
        };
        result.map_err(|e| self.err(&format!("add default route via {gateway}"), e))
    }

    /// `ip rule add fwmark <mark>/<mask> lookup <table> priority <prio>` for
    /// one family; an identical rule already there is fine.
    pub async fn fwmark_rule(
        &self,
        v6: bool,
        mark: u32,
        mask: u32,
        table: u32,
        priority: u32,
    ) -> Result<(), NetError> {
        let base = self.handle.rule().add();
        let result = if v6 {
            let mut req = base
                .v6()
                .fw_mark(mark)
                .table_id(table)
                .priority(priority)
                .action(RuleAction::ToTable);
            req.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(mask));
            req.execute().await
        } else {
            let mut req = base
                .v4()
                .fw_mark(mark)
                .table_id(table)
                .priority(priority)
                .action(RuleAction::ToTable);
            req.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(mask));
            req.execute().await
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(self.err(
                &format!("add rule fwmark {mark:#x}/{mask:#x} lookup {table}"),
                e,
            )),
        }
    }

    /// `ip route replace local 0.0.0.0/0 dev <dev> table <table>` (or `::/0`).
    pub async fn local_default_route(
        &self,
        v6: bool,
        dev: u32,
        table: u32,
    ) -> Result<(), NetError> {
        let result = if v6 {
            self.handle
                .route()
                .add()
                .v6()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .output_interface(dev)
                .table_id(table)
                .replace()
                .execute()
                .await
        } else {
            self.handle
                .route()
                .add()
                .v4()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .output_interface(dev)
                .table_id(table)
                .replace()
                .execute()
                .await
        };
        let fam = if v6 { "::/0" } else { "0.0.0.0/0" };
        result.map_err(|e| self.err(&format!("add route local {fam} table {table}"), e))
    }
}

// === bridging a VM's tap ===

impl Nl {
    /// Creates the bridge `name` unless a link of that name exists.
    pub async fn ensure_bridge(&self, name: &str) -> Result<u32, NetError> {
        if let Some(l) = self.link(name).await? {
            return Ok(l.index);
        }
        match self
            .handle
            .link()
            .add()
            .bridge(name.to_owned())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(self.err(&format!("create bridge {name}"), e)),
        }
        self.require(name).await
    }

    /// Moves link `index` into the network namespace at `ns`.
    pub async fn set_netns(&self, index: u32, name: &str, ns: &Path) -> Result<(), NetError> {
        let file = fs::File::open(ns).map_err(|e| nl_err(&format!("open {}", ns.display()), e))?;
        let result = self
            .handle
            .link()
            .set(index)
            .setns_by_fd(file.as_raw_fd())
            .execute()
            .await;
        drop(file);
        result.map_err(|e| self.err(&format!("move {name} into {}", ns.display()), e))
    }

    /// Sets the MAC address of link `index`.
    pub async fn set_mac(&self, index: u32, name: &str, mac: [u8; 6]) -> Result<(), NetError> {
        self.handle
            .link()
            .set(index)
            .address(mac.to_vec())
            .execute()
            .await
            .map_err(|e| self.err(&format!("set the MAC address of {name}"), e))
    }

    /// Makes link `index` a port of the bridge `master`.
    pub async fn set_master(&self, index: u32, name: &str, master: u32) -> Result<(), NetError> {
        self.handle
            .link()
            .set(index)
            .controller(master)
            .execute()
            .await
            .map_err(|e| self.err(&format!("attach {name} to its bridge"), e))
    }

    /// Deletes every address of link `index`.
    pub async fn flush_addrs(&self, index: u32, name: &str) -> Result<(), NetError> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut found = Vec::new();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|e| self.err(&format!("list addresses of {name}"), e))?
        {
            found.push(msg);
        }
        for msg in found {
            match self.handle.address().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if errno_of(&e) == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(self.err(&format!("delete an address of {name}"), e)),
            }
        }
        Ok(())
    }
}
