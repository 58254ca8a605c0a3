//! The daemon's side of the data plane: per sandbox, the eBPF filter on the
//! router's guest-facing link, the proxy listeners it steers TCP to, and the
//! tasks that turn what they see into network events.
//!
//! Until the proxy lands, the listener is minimal: it accepts, records the
//! connection's original destination (`getsockname()`, kept by
//! `bpf_sk_assign`) as a `steered` event, and closes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;
use tokio::task::JoinHandle;
use tollgate_ebpf::{DropEvent, EgressPolicy, Filter, FloorSet, Mode, SandboxNet};
use tollgate_proxy::policy::{self, NetworkPolicy};

use crate::events::{EventLog, Kind, NetEvent};
use crate::net::{self, NetworkInfo};

/// Why the data plane failed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// Loading, attaching or updating the eBPF filter failed.
    #[error("eBPF: {0}")]
    Ebpf(#[from] tollgate_ebpf::EbpfError),
    /// The proxy listeners could not be opened.
    #[error("proxy listeners: {0}")]
    Listeners(std::io::Error),
    /// A blocking step panicked or was cancelled.
    #[error("data plane task: {0}")]
    Task(String),
    /// The sandbox has no filter attached.
    #[error("no data plane for sandbox {0}")]
    NotAttached(String),
}

struct Attached {
    filter: Filter,
    tasks: Tasks,
}

/// Tasks that end with their sandbox's data plane (aborted on drop).
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Every sandbox's data plane.
pub struct Dataplane {
    pin_root: PathBuf,
    floor: FloorSet,
    events: Arc<EventLog>,
    attached: Mutex<HashMap<String, Attached>>,
}

impl Dataplane {
    /// A data plane that pins under `pin_root` (one directory per sandbox)
    /// and enforces `floor` in every sandbox.
    pub fn new(pin_root: PathBuf, floor: FloorSet, events: Arc<EventLog>) -> Self {
        Self {
            pin_root,
            floor,
            events,
            attached: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Attached>> {
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pin_dir(&self, id: &str) -> PathBuf {
        self.pin_root.join(id)
    }

    /// The event log.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    /// Attaches a new sandbox's filter and opens its listeners, before its
    /// first process runs.
    pub async fn attach(
        &self,
        id: &str,
        net: &NetworkInfo,
        policy: &NetworkPolicy,
    ) -> Result<(), DataplaneError> {
        let (pin, netns, ifname) = (
            self.pin_dir(id),
            net::netns_path(&net.router_netns),
            net.gateway_if.clone(),
        );
        let (snet, floor, egress) = (sandbox_net(net), self.floor.clone(), egress_policy(policy));
        let filter =
            blocking(move || Filter::attach(&pin, &netns, &ifname, &snet, &floor, &egress))
                .await??;
        self.start(id, net, filter)
    }

    /// After a daemon restart: reopens the pinned filter (enforcement never
    /// stopped), makes it match `policy`, and opens new listeners. A sandbox
    /// whose pins are gone (a host reboot) is attached afresh.
    pub async fn adopt(
        &self,
        id: &str,
        net: &NetworkInfo,
        policy: &NetworkPolicy,
    ) -> Result<(), DataplaneError> {
        let pin = self.pin_dir(id);
        if !Filter::is_pinned(&pin) {
            tracing::warn!(sandbox = %id, "no pinned filter: attaching afresh");
            return self.attach(id, net, policy).await;
        }
        let (floor, egress) = (self.floor.clone(), egress_policy(policy));
        let filter = blocking(move || {
            let mut f = Filter::open_pinned(&pin)?;
            f.replace(&floor, &egress)?;
            Ok::<_, tollgate_ebpf::EbpfError>(f)
        })
        .await??;
        self.start(id, net, filter)
    }

    fn start(&self, id: &str, net: &NetworkInfo, mut filter: Filter) -> Result<(), DataplaneError> {
        let listeners = net::open_listeners(net).map_err(DataplaneError::Listeners)?;
        filter.set_listeners(listeners.v4.as_fd(), Some(listeners.v6.as_fd()))?;
        let mut tasks = Vec::new();
        for l in [listeners.v4, listeners.v6] {
            let listener =
                tokio::net::TcpListener::from_std(l).map_err(DataplaneError::Listeners)?;
            tasks.push(tokio::spawn(accept_loop(
                id.to_string(),
                listener,
                self.events.clone(),
            )));
        }
        let reader = filter
            .event_reader()?
            .into_async()
            .map_err(DataplaneError::Listeners)?;
        tasks.push(tokio::spawn(drop_events(
            id.to_string(),
            reader,
            self.events.clone(),
        )));
        self.lock().insert(
            id.to_string(),
            Attached {
                filter,
                tasks: Tasks(tasks),
            },
        );
        Ok(())
    }

    /// Replaces a sandbox's policy atomically (no packet sees a mix).
    pub async fn set_policy(&self, id: &str, policy: &NetworkPolicy) -> Result<(), DataplaneError> {
        let egress = egress_policy(policy);
        let mut map = self.lock();
        let a = map
            .get_mut(id)
            .ok_or_else(|| DataplaneError::NotAttached(id.to_string()))?;
        a.filter.set_policy(&egress)?;
        Ok(())
    }

    /// Packets per verdict since the filter was attached.
    pub fn counters(&self, id: &str) -> Result<BTreeMap<String, u64>, DataplaneError> {
        let map = self.lock();
        let a = map
            .get(id)
            .ok_or_else(|| DataplaneError::NotAttached(id.to_string()))?;
        Ok(a.filter
            .counters()?
            .iter()
            .map(|(r, n)| (r.as_str().to_string(), n))
            .collect())
    }

    /// Detaches and unpins a sandbox's filter and closes its listeners
    /// (idempotent; also cleans pins of a sandbox this process never saw).
    pub async fn detach(&self, id: &str) -> Result<(), DataplaneError> {
        let attached = self.lock().remove(id);
        let pin = self.pin_dir(id);
        blocking(move || match attached {
            Some(Attached { filter, tasks }) => {
                drop(tasks);
                filter.detach()
            }
            None => Filter::remove(&pin),
        })
        .await??;
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DataplaneError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DataplaneError::Task(e.to_string()))
}

fn sandbox_net(net: &NetworkInfo) -> SandboxNet {
    SandboxNet {
        guest_v4: net.guest_v4,
        gateway_v4: net.gateway_v4,
        guest_v6: Some(net.guest_v6),
        gateway_v6: Some(net.gateway_v6),
    }
}

/// The floor every sandbox gets: the platform floor plus the operator's
/// `deny_cidrs`, the sandbox address pools and the host's own addresses.
pub fn floor(deny: &[IpNet], pools: &[IpNet], host_addrs: &[IpAddr]) -> FloorSet {
    FloorSet::platform()
        .with_floor(deny.iter().copied())
        .with_floor(pools.iter().copied())
        .with_floor(host_addrs.iter().map(|a| IpNet::from(*a)))
}

/// The addresses of this host's interfaces (in the daemon's namespace).
pub fn host_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|i| i.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A `network_policy` as the eBPF program enforces it. `allow_cidrs` entries
/// that are wider than a private range do not open it (the matcher's rule):
/// the private ranges are cut out of them, while entries inside a private
/// range stay as given.
pub fn egress_policy(p: &NetworkPolicy) -> EgressPolicy {
    let mode = match p.mode {
        policy::Mode::AllowAll => Mode::AllowAll,
        policy::Mode::DenyAll => Mode::DenyAll,
        policy::Mode::Custom => Mode::Custom,
    };
    let private = private_ranges();
    let mut allow_v4 = Vec::new();
    let mut allow_v6 = Vec::new();
    for c in &p.allow_cidrs {
        let Ok(net) = c.parse::<IpNet>() else {
            continue;
        };
        let holes: Vec<IpNet> = private
            .iter()
            .copied()
            .filter(|r| net.contains(r) && *r != net)
            .collect();
        let inside_private = private.iter().any(|r| r.contains(&net));
        let pieces = if inside_private {
            vec![net]
        } else {
            subtract(net, &holes)
        };
        for piece in pieces {
            match piece {
                IpNet::V4(n) => allow_v4.push(n),
                IpNet::V6(n) => allow_v6.push(n),
            }
        }
    }
    EgressPolicy {
        mode,
        allow_v4,
        allow_v6,
    }
}

fn private_ranges() -> Vec<IpNet> {
    [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect()
}

/// `net` minus every hole (holes lie inside `net`), as a list of prefixes.
fn subtract(net: IpNet, holes: &[IpNet]) -> Vec<IpNet> {
    if holes.iter().any(|h| h.contains(&net)) {
        return Vec::new();
    }
    if !holes.iter().any(|h| net.contains(h)) {
        return vec![net];
    }
    let Ok(halves) = net.subnets(net.prefix_len() + 1) else {
        return Vec::new();
    };
    halves.flat_map(|half| subtract(half, holes)).collect()
}

async fn accept_loop(id: String, listener: tokio::net::TcpListener, events: Arc<EventLog>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let dst: Option<SocketAddr> = stream.local_addr().ok();
                events.record(NetEvent {
                    seq: 0,
                    time_ms: 0,
                    sandbox_id: id.clone(),
                    kind: Kind::Steered,
                    protocol: "tcp".into(),
                    destination: dst.map(|d| d.ip()),
                    port: dst.map_or(0, |d| d.port()),
                    name: None,
                    reason: "steered".into(),
                });
                tracing::debug!(sandbox = %id, %peer, ?dst, "steered connection accepted");
                drop(stream);
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn drop_events(
    id: String,
    mut reader: tollgate_ebpf::AsyncEventReader,
    events: Arc<EventLog>,
) {
    loop {
        match reader.next().await {
            Ok(ev) => events.record(drop_event(&id, &ev)),
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "event reader failed");
                return;
            }
        }
    }
}

fn drop_event(id: &str, ev: &DropEvent) -> NetEvent {
    let protocol = match ev.proto {
        6 => "tcp".to_string(),
        17 => "udp".to_string(),
        1 => "icmp".to_string(),
        58 => "icmpv6".to_string(),
        0 => format!("ethertype-0x{:04x}", ev.ethertype),
        n => n.to_string(),
    };
    NetEvent {
        seq: 0,
        time_ms: 0,
        sandbox_id: id.to_string(),
        kind: Kind::Denied,
        protocol,
        destination: ev.dst,
        port: ev.dport,
        name: None,
        reason: ev.reason.as_str().to_string(),
    }
}

/// Pin root used by the daemon.
pub fn default_pin_root() -> &'static Path {
    Path::new(tollgate_ebpf::PIN_ROOT)
}

#[cfg(test)]
mod tests;
