//! The daemon's side of the data plane: per sandbox, the eBPF filter on the
//! router's guest-facing link, the proxy listeners it steers TCP to, and the
//! tasks that turn what they see into network events.
//!
//! Every connection the filter steers is recorded as a `steered` event with
//! its original destination (`getsockname()`, kept by `bpf_sk_assign`), then
//! handed to the sandbox's [`SandboxProxy`]; the sandbox's resolver on its
//! gateway answers by policy.
//!
//! Each sandbox also gets its own CA ([`crate::ca`]): created with the
//! sandbox, reloaded after a daemon restart, removed with it. Its proxy
//! intercepts TLS to transform domains with leaves minted from it, and its
//! gateway serves the CA certificate on port 80 (`GET /ca.pem`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use ipnet::IpNet;
use tokio::task::JoinHandle;
use tollgate_ebpf::{DropEvent, EgressPolicy, Filter, FloorSet, Mode, SandboxNet};
use tollgate_proxy::dns::{DnsDecision, DnsEvents, DnsServer, PolicyDns, Resolver};
use tollgate_proxy::intercept::{Interception, SandboxCa, UpstreamTrust};
use tollgate_proxy::policy::{self, CompiledPolicy, Floor, NetworkPolicy};
use tollgate_proxy::proxy::{ProxyConfig, ProxyEvents, Resolve, SandboxProxy};

use crate::ca::{self, CaStore, CaStoreError};
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
    /// The sandbox's CA could not be created, loaded, used or removed.
    #[error("{0}")]
    Ca(#[from] CaStoreError),
}

struct Attached {
    filter: Filter,
    ca: Arc<SandboxCa>,
    proxy: Arc<SandboxProxy>,
    dns: Arc<PolicyDns>,
    sink: Arc<EventSink>,
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

/// What every sandbox's data plane shares.
pub struct Shared {
    /// The floor the eBPF program enforces.
    pub floor: FloorSet,
    /// The same floor for the proxy's name decisions and DNS answers.
    pub policy_floor: Arc<Floor>,
    /// The host-side resolver (one cache for every sandbox).
    pub resolver: Arc<Resolver>,
    /// Per-sandbox proxy limits (its `interception` is set per sandbox).
    pub proxy: ProxyConfig,
    /// Whom TLS interception trusts upstream: the host's roots plus
    /// `[proxy] upstream_ca_file`.
    pub trust: UpstreamTrust,
    /// Where the sandboxes' CAs are kept (`<state_dir>/ca`).
    pub cas: CaStore,
}

/// Every sandbox's data plane.
pub struct Dataplane {
    pin_root: PathBuf,
    shared: Shared,
    events: Arc<EventLog>,
    attached: Mutex<HashMap<String, Attached>>,
}

impl Dataplane {
    /// A data plane that pins under `pin_root` (one directory per sandbox)
    /// and enforces `shared.floor` in every sandbox.
    pub fn new(pin_root: PathBuf, shared: Shared, events: Arc<EventLog>) -> Self {
        Self {
            pin_root,
            shared,
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

    fn compile(&self, policy: &NetworkPolicy) -> Arc<CompiledPolicy> {
        Arc::new(CompiledPolicy::new(
            policy,
            self.shared.policy_floor.clone(),
        ))
    }

    /// Where sandboxes' filters are pinned (one directory per sandbox).
    pub fn pin_root(&self) -> &std::path::Path {
        &self.pin_root
    }

    /// The event log.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    /// Creates a new sandbox's CA, attaches its filter and starts its proxy,
    /// resolver and CA endpoint, before its first process runs. On failure
    /// the caller releases what was made with [`Self::detach`].
    pub async fn attach(
        &self,
        id: &str,
        net: &NetworkInfo,
        policy: &NetworkPolicy,
    ) -> Result<(), DataplaneError> {
        let (cas, sid) = (self.shared.cas.clone(), id.to_string());
        let ca = blocking(move || cas.create(&sid)).await??;
        let filter = self.attach_filter(id, net, policy).await?;
        self.start(id, net, filter, policy, ca)
    }

    /// A new filter on the sandbox's link, pinned.
    async fn attach_filter(
        &self,
        id: &str,
        net: &NetworkInfo,
        policy: &NetworkPolicy,
    ) -> Result<Filter, DataplaneError> {
        let (pin, netns, ifname) = (
            self.pin_dir(id),
            net::netns_path(&net.router_netns),
            net.gateway_if.clone(),
        );
        let (snet, floor, egress) = (
            sandbox_net(net),
            self.shared.floor.clone(),
            egress_policy(policy),
        );
        let filter =
            blocking(move || Filter::attach(&pin, &netns, &ifname, &snet, &floor, &egress))
                .await??;
        Ok(filter)
    }

    /// After a daemon restart: reloads the sandbox's CA (the guest keeps
    /// trusting it; a CA that is gone or broken is replaced, with a warning),
    /// reopens the pinned filter (enforcement never stopped), makes it match
    /// `policy`, and starts a new proxy, resolver and CA endpoint. A sandbox
    /// whose pins are gone (a host reboot) gets a new filter.
    pub async fn adopt(
        &self,
        id: &str,
        net: &NetworkInfo,
        policy: &NetworkPolicy,
    ) -> Result<(), DataplaneError> {
        let (cas, sid) = (self.shared.cas.clone(), id.to_string());
        let (ca, _replaced) = blocking(move || cas.load_or_create(&sid)).await??;
        let pin = self.pin_dir(id);
        let filter = if Filter::is_pinned(&pin) {
            let (floor, egress) = (self.shared.floor.clone(), egress_policy(policy));
            blocking(move || {
                let mut f = Filter::open_pinned(&pin)?;
                f.replace(&floor, &egress)?;
                Ok::<_, tollgate_ebpf::EbpfError>(f)
            })
            .await??
        } else {
            tracing::warn!(sandbox = %id, "no pinned filter: attaching afresh");
            self.attach_filter(id, net, policy).await?
        };
        self.start(id, net, filter, policy, ca)
    }

    fn start(
        &self,
        id: &str,
        net: &NetworkInfo,
        mut filter: Filter,
        policy: &NetworkPolicy,
        ca: Arc<SandboxCa>,
    ) -> Result<(), DataplaneError> {
        let interception = Interception::new(Arc::clone(&ca), self.shared.trust.clone())
            .map_err(CaStoreError::from)?;
        let proxy_cfg = ProxyConfig {
            interception: Some(interception),
            ..self.shared.proxy.clone()
        };
        let compiled = self.compile(policy);
        let sink = Arc::new(EventSink {
            id: id.to_string(),
            events: self.events.clone(),
            counts: Mutex::new(BTreeMap::new()),
        });
        let resolver: Arc<dyn Resolve> = self.shared.resolver.clone();
        let proxy = SandboxProxy::new(
            id.to_string(),
            compiled.clone(),
            resolver,
            proxy_cfg,
            sink.clone(),
        );
        let dns = Arc::new(PolicyDns::new(compiled, true));
        let listeners = net::open_listeners(net).map_err(DataplaneError::Listeners)?;
        let dns_socks = net::open_dns_sockets(net).map_err(DataplaneError::Listeners)?;
        let ca_socks = net::open_ca_listeners(net).map_err(DataplaneError::Listeners)?;
        filter.set_listeners(listeners.v4.as_fd(), Some(listeners.v6.as_fd()))?;
        let mut tasks = Vec::new();
        for l in [listeners.v4, listeners.v6] {
            let listener =
                tokio::net::TcpListener::from_std(l).map_err(DataplaneError::Listeners)?;
            tasks.push(tokio::spawn(accept_loop(
                id.to_string(),
                listener,
                self.events.clone(),
                proxy.clone(),
            )));
        }
        let server = DnsServer::new(dns.clone(), self.shared.resolver.clone(), sink.clone());
        for u in [dns_socks.udp4, dns_socks.udp6] {
            let sock = tokio::net::UdpSocket::from_std(u).map_err(DataplaneError::Listeners)?;
            let s = server.clone();
            tasks.push(tokio::spawn(async move { s.serve_udp(sock).await }));
        }
        for t in [dns_socks.tcp4, dns_socks.tcp6] {
            let listener =
                tokio::net::TcpListener::from_std(t).map_err(DataplaneError::Listeners)?;
            let s = server.clone();
            tasks.push(tokio::spawn(async move { s.serve_tcp(listener).await }));
        }
        let (pem, slots) = (Bytes::from(ca.cert_pem().to_owned()), ca::endpoint_slots());
        for l in [ca_socks.v4, ca_socks.v6] {
            let listener =
                tokio::net::TcpListener::from_std(l).map_err(DataplaneError::Listeners)?;
            tasks.push(tokio::spawn(ca::serve_endpoint(
                id.to_string(),
                listener,
                pem.clone(),
                slots.clone(),
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
                ca,
                proxy,
                dns,
                sink,
                tasks: Tasks(tasks),
            },
        );
        Ok(())
    }

    /// Replaces a sandbox's policy: the eBPF maps atomically (no packet sees
    /// a mix), then the proxy and the resolver. New connections and questions
    /// see the new policy at once; open tunnels whose verdict changed close.
    pub async fn set_policy(&self, id: &str, policy: &NetworkPolicy) -> Result<(), DataplaneError> {
        let egress = egress_policy(policy);
        let compiled = self.compile(policy);
        let mut map = self.lock();
        let a = map
            .get_mut(id)
            .ok_or_else(|| DataplaneError::NotAttached(id.to_string()))?;
        a.filter.set_policy(&egress)?;
        a.proxy.set_policy(compiled.clone());
        a.dns.set(compiled);
        Ok(())
    }

    /// Packets per eBPF verdict since the filter was attached, plus the
    /// proxy's (`proxy_<reason>`) and the resolver's (`dns_<reason>`) denials.
    pub fn counters(&self, id: &str) -> Result<BTreeMap<String, u64>, DataplaneError> {
        let map = self.lock();
        let a = map
            .get(id)
            .ok_or_else(|| DataplaneError::NotAttached(id.to_string()))?;
        let mut out: BTreeMap<String, u64> = a
            .filter
            .counters()?
            .iter()
            .map(|(r, n)| (r.as_str().to_string(), n))
            .collect();
        if let Ok(counts) = a.sink.counts.lock() {
            out.extend(counts.iter().map(|(k, v)| (k.clone(), *v)));
        }
        Ok(out)
    }

    /// The sandbox's CA certificate (PEM): the one its proxy uses, else the
    /// stored one (a sandbox whose data plane could not be re-adopted).
    pub fn ca_pem(&self, id: &str) -> Option<String> {
        if let Some(a) = self.lock().get(id) {
            return Some(a.ca.cert_pem().to_owned());
        }
        self.shared.cas.cert_pem(id)
    }

    /// Detaches and unpins a sandbox's filter, closes its listeners and
    /// removes its CA (idempotent; also cleans pins and the CA of a sandbox
    /// this process never saw).
    pub async fn detach(&self, id: &str) -> Result<(), DataplaneError> {
        let attached = self.lock().remove(id);
        let pin = self.pin_dir(id);
        blocking(move || match attached {
            Some(Attached {
                filter,
                proxy,
                tasks,
                ..
            }) => {
                proxy.shutdown();
                drop(tasks);
                filter.detach()
            }
            None => Filter::remove(&pin),
        })
        .await??;
        let (cas, sid) = (self.shared.cas.clone(), id.to_string());
        blocking(move || cas.remove(&sid)).await??;
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

async fn accept_loop(
    id: String,
    listener: tokio::net::TcpListener,
    events: Arc<EventLog>,
    proxy: Arc<SandboxProxy>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
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
                tokio::spawn(proxy.clone().handle(stream));
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Turns the proxy's and the resolver's reports into network events.
struct EventSink {
    id: String,
    events: Arc<EventLog>,
    /// Denials per reason.
    counts: Mutex<BTreeMap<String, u64>>,
}

impl EventSink {
    fn record_denial(
        &self,
        protocol: &str,
        dst: Option<SocketAddr>,
        name: Option<&str>,
        reason: &str,
    ) {
        let key = if reason.starts_with("dns_") {
            reason.to_string()
        } else {
            format!("proxy_{reason}")
        };
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(key).or_insert(0) += 1;
        }
        self.events.record(NetEvent {
            seq: 0,
            time_ms: 0,
            sandbox_id: self.id.clone(),
            kind: Kind::Denied,
            protocol: protocol.into(),
            destination: dst.map(|d| d.ip()),
            port: dst.map_or(53, |d| d.port()),
            name: name.map(str::to_string),
            reason: reason.to_string(),
        });
    }
}

impl ProxyEvents for EventSink {
    fn denied(&self, name: Option<&str>, dst: SocketAddr, reason: &str) {
        self.record_denial("tcp", Some(dst), name, reason);
    }

    fn tunneled(&self, name: Option<&str>, dst: SocketAddr, upstream: SocketAddr) {
        tracing::debug!(sandbox = %self.id, ?name, %dst, %upstream, "tunnel open");
    }

    fn upstream_failed(&self, name: Option<&str>, dst: SocketAddr, reason: &str) {
        tracing::info!(sandbox = %self.id, ?name, %dst, reason, "upstream failed");
    }
}

impl DnsEvents for EventSink {
    fn denied(&self, qname: &str, _qtype: u16, decision: DnsDecision) {
        let reason = match decision {
            DnsDecision::NxDomain => "dns_not_allowed",
            DnsDecision::Refused => "dns_refused",
            DnsDecision::Forward => "dns_invalid",
        };
        self.record_denial("dns", None, Some(qname), reason);
    }

    fn answered(&self, qname: &str, addrs: &[IpAddr]) {
        tracing::debug!(sandbox = %self.id, qname, ?addrs, "dns answer");
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

/// The eBPF instance name of the daemon whose state dir is `state_dir`:
/// `d` and the first 16 hex digits of the SHA-256 of its absolute path
/// (stable across restarts, distinct per state dir).
pub fn ebpf_instance(state_dir: &Path) -> String {
    use sha2::Digest;
    let path = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("d{hex}")
}

/// Pin root used by the daemon.
pub fn default_pin_root() -> &'static Path {
    Path::new(tollgate_ebpf::PIN_ROOT)
}

#[cfg(test)]
mod tests;
