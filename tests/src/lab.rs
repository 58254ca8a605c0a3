//! A closed test world for data-plane tests: a *host* namespace the daemon
//! runs in, and an *upstream* namespace that stands in for the internet and
//! holds the canary. The host's only route out goes to the upstream, so no
//! packet a test provokes can leave the machine.
//!
//! ```text
//!  host ns  tgl-h-<n>            wan0 192.0.2.1/24  2001:db8:ff::1/64  default via upstream
//!      │ veth
//!  upstream ns tgl-u-<n>         lan0 192.0.2.2/24  2001:db8:ff::2/64
//!                                canary addresses (local here): 198.51.100.10 (public),
//!                                10.99.0.10 (private), 169.254.169.254 (metadata),
//!                                2001:db8:100::10 (public v6), fd99::10 (private v6)
//! ```
//!
//! The canary records every IP packet that arrives on `lan0` (an AF_PACKET
//! socket: TCP, UDP, ICMP, anything) and answers on TCP 22/53/80/443/8443 and
//! UDP 53/443/9999 so that allowed clients see a working server.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// The host's address on the upstream link (its NAT address).
pub const HOST_WAN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// A public v4 canary address.
pub const PUBLIC4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// A private v4 canary address.
pub const PRIVATE4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);
/// The metadata address, served by the canary if anything lets it through.
pub const METADATA4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// A public v6 canary address.
pub const PUBLIC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
/// A private v6 canary address.
pub const PRIVATE6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 0x10);
/// Addresses the canary answers on (TCP and UDP).
const CANARY_ADDRS: [IpAddr; 7] = [
    IpAddr::V4(PUBLIC4),
    IpAddr::V4(PRIVATE4),
    IpAddr::V4(METADATA4),
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
    IpAddr::V6(PUBLIC6),
    IpAddr::V6(PRIVATE6),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 2)),
];

/// Port of the host namespace's canary service (TCP and UDP).
pub const HOST_PORT: u16 = 7777;
/// TCP ports the canary serves.
pub const TCP_PORTS: [u16; 4] = [22, 80, 443, 8443];
/// UDP ports the canary answers.
pub const UDP_PORTS: [u16; 3] = [53, 443, 9999];

/// One packet the canary saw.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seen {
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6).
    pub proto: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port (0 for ICMP).
    pub dport: u16,
}

/// The canary's record.
#[derive(Clone, Default)]
pub struct Canary {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Canary {
    /// Everything seen so far (ICMPv6 neighbour discovery excluded).
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Packets seen for `dst`.
    pub fn to(&self, dst: IpAddr) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.dst == dst).collect()
    }

    /// Distinct (proto, dst, port) contacts, for readable assertions.
    pub fn contacts(&self) -> BTreeSet<(u8, IpAddr, u16)> {
        self.seen()
            .into_iter()
            .map(|s| (s.proto, s.dst, s.dport))
            .collect()
    }

    /// Forgets what was seen.
    pub fn clear(&self) {
        if let Ok(mut v) = self.seen.lock() {
            v.clear();
        }
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The two namespaces, their link and the canary; removed on drop.
pub struct Lab {
    /// Name of the host namespace (under /run/netns).
    pub host_ns: String,
    /// Name of the upstream namespace.
    pub up_ns: String,
    /// What reached the upstream.
    pub canary: Canary,
    /// What reached the host namespace's own services (TCP and UDP port
    /// [`HOST_PORT`] on every address, v4 and v6).
    pub host_canary: Canary,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sysctl(ns: &str, key: &str, value: &str) {
    ip(&[
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ]);
}

/// Runs `f` on a thread that entered network namespace `ns` (sockets it
/// creates stay in that namespace).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

impl Lab {
    /// Builds the lab and starts the canary.
    // No `Default`: building a lab needs root and creates namespaces.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        crate::privileged::require_root();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id() % 100_000);
        let host_ns = format!("tgl-h-{tag}");
        let up_ns = format!("tgl-u-{tag}");
        for ns in [&host_ns, &up_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
        }
        let mut lab = Self {
            host_ns: host_ns.clone(),
            up_ns: up_ns.clone(),
            canary: Canary::default(),
            host_canary: Canary::default(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        let (h, u) = (host_ns.as_str(), up_ns.as_str());
        ip(&["-n", h, "link", "set", "lo", "up"]);
        ip(&["-n", u, "link", "set", "lo", "up"]);
        ip(&[
            "-n", h, "link", "add", "wan0", "type", "veth", "peer", "name", "lan0", "netns", u,
        ]);
        ip(&["-n", h, "addr", "add", "192.0.2.1/24", "dev", "wan0"]);
        ip(&[
            "-n",
            h,
            "addr",
            "add",
            "2001:db8:ff::1/64",
            "dev",
            "wan0",
            "nodad",
        ]);
        ip(&["-n", u, "addr", "add", "192.0.2.2/24", "dev", "lan0"]);
        ip(&[
            "-n",
            u,
            "addr",
            "add",
            "2001:db8:ff::2/64",
            "dev",
            "lan0",
            "nodad",
        ]);
        for a in ["198.51.100.10/32", "10.99.0.10/32", "169.254.169.254/32"] {
            ip(&["-n", u, "addr", "add", a, "dev", "lo"]);
        }
        for a in ["2001:db8:100::10/128", "fd99::10/128"] {
            ip(&["-n", u, "addr", "add", a, "dev", "lo", "nodad"]);
        }
        ip(&["-n", h, "link", "set", "wan0", "up"]);
        ip(&["-n", u, "link", "set", "lan0", "up"]);
        ip(&["-n", h, "route", "add", "default", "via", "192.0.2.2"]);
        ip(&[
            "-n",
            h,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:ff::2",
        ]);
        // The upstream answers everything through the host (return path of
        // routed, non-NATed traffic).
        ip(&["-n", u, "route", "add", "default", "via", "192.0.2.1"]);
        ip(&[
            "-n",
            u,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:ff::1",
        ]);
        sysctl(u, "net.ipv4.conf.all.rp_filter", "0");
        sysctl(u, "net.ipv4.conf.lan0.rp_filter", "0");
        lab.start_canary();
        lab.start_host_canary();
        lab
    }

    fn start_host_canary(&mut self) {
        for any in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let ns = self.host_ns.clone();
            let (listener, udp) = in_netns(&ns, move || {
                let addr = SocketAddr::new(any, HOST_PORT);
                let t = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
                let u = Socket::new(Domain::for_address(addr), Type::DGRAM, None).expect("socket");
                if any.is_ipv6() {
                    t.set_only_v6(true).expect("v6only");
                    u.set_only_v6(true).expect("v6only");
                }
                t.set_reuse_address(true).expect("reuse");
                t.bind(&addr.into()).expect("bind host canary tcp");
                t.listen(128).expect("listen");
                t.set_nonblocking(true).expect("nonblocking");
                u.bind(&addr.into()).expect("bind host canary udp");
                u.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("timeout");
                (TcpListener::from(t), UdpSocket::from(u))
            });
            let (stop, seen) = (self.stop.clone(), self.host_canary.seen.clone());
            self.threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((c, peer)) => {
                            let dst = c.local_addr().map(|a| a.ip()).unwrap_or(any);
                            if let Ok(mut v) = seen.lock() {
                                v.push(Seen {
                                    proto: 6,
                                    src: peer.ip(),
                                    dst,
                                    dport: HOST_PORT,
                                });
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
            let (stop, seen) = (self.stop.clone(), self.host_canary.seen.clone());
            self.threads.push(std::thread::spawn(move || {
                let mut b = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut b) {
                        if let Ok(mut v) = seen.lock() {
                            v.push(Seen {
                                proto: 17,
                                src: from.ip(),
                                dst: any,
                                dport: HOST_PORT,
                            });
                        }
                        let _ = udp.send_to(&b[..n], from);
                    }
                }
            }));
        }
    }

    /// Makes `addr` local in the upstream namespace (for extra origins).
    pub fn add_upstream_addr(&self, addr: IpAddr) {
        let cidr = match addr {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        };
        let mut args = vec!["-n", &self.up_ns, "addr", "add", &cidr, "dev", "lo"];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        ip(&args);
    }

    /// Runs `f` on a thread inside the host namespace.
    pub fn in_host<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.host_ns, f)
    }

    fn start_canary(&mut self) {
        // Capture: every IP packet arriving on lan0.
        let seen = self.canary.seen.clone();
        let stop = self.stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = self.up_ns.clone();
        self.threads.push(std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open upstream ns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns upstream");
            // ETH_P_ALL in network byte order.
            let sock = Socket::new(
                Domain::PACKET,
                Type::DGRAM,
                Some(Protocol::from(0x0003u16.to_be() as i32)),
            )
            .expect("AF_PACKET socket");
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let _ = ready_tx.send(());
            let mut sock = sock;
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Ok(n) = sock.read(&mut buf) else { continue };
                let Some(s) = parse(&buf[..n]) else { continue };
                // Replies the upstream sends are captured too: keep only what
                // arrives from elsewhere.
                if is_upstream_addr(s.src) {
                    continue;
                }
                if let Ok(mut v) = seen.lock() {
                    v.push(s);
                }
            }
        }));
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        // Responders.
        for port in TCP_PORTS {
            // The canary's own addresses only: other addresses of the
            // upstream namespace belong to test origins.
            for any in CANARY_ADDRS {
                let stop = self.stop.clone();
                let ns = self.up_ns.clone();
                let listener = in_netns(&ns, move || {
                    let s = Socket::new(
                        Domain::for_address(SocketAddr::new(any, port)),
                        Type::STREAM,
                        None,
                    )
                    .expect("socket");
                    if any.is_ipv6() {
                        s.set_only_v6(true).expect("v6only");
                    }
                    s.set_reuse_address(true).expect("reuse");
                    s.bind(&SocketAddr::new(any, port).into())
                        .expect("bind canary tcp");
                    s.listen(128).expect("listen");
                    s.set_nonblocking(true).expect("nonblocking");
                    TcpListener::from(s)
                });
                self.threads.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut c, _)) => {
                                let _ = c.set_nonblocking(false);
                                let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                                let mut b = [0u8; 4096];
                                let _ = c.read(&mut b);
                                let _ = c.write_all(b"canary\n");
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(10)),
                        }
                    }
                }));
            }
        }
        // One UDP socket per canary address and port, so that replies leave
        // from the address the client sent to (NAT on the way back needs it).
        for port in UDP_PORTS {
            for addr in CANARY_ADDRS {
                let stop = self.stop.clone();
                let ns = self.up_ns.clone();
                let sock = in_netns(&ns, move || {
                    let s = Socket::new(
                        Domain::for_address(SocketAddr::new(addr, port)),
                        Type::DGRAM,
                        None,
                    )
                    .expect("socket");
                    s.bind(&SocketAddr::new(addr, port).into())
                        .expect("bind canary udp");
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .expect("timeout");
                    UdpSocket::from(s)
                });
                self.threads.push(std::thread::spawn(move || {
                    let mut b = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = sock.recv_from(&mut b) {
                            let _ = sock.send_to(&b[..n], from);
                        }
                    }
                }));
            }
        }
    }
}

/// Addresses that belong to the upstream namespace itself.
fn is_upstream_addr(a: IpAddr) -> bool {
    const LINK4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    const LINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 2);
    match a {
        IpAddr::V4(v) => [LINK4, PUBLIC4, PRIVATE4, METADATA4].contains(&v),
        IpAddr::V6(v) => {
            [LINK6, PUBLIC6, PRIVATE6].contains(&v) || (v.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Parses an IPv4 / IPv6 packet (no link header).
fn parse(p: &[u8]) -> Option<Seen> {
    let version = p.first()? >> 4;
    let (proto, src, dst, l4) = match version {
        4 => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            let src = Ipv4Addr::new(*p.get(12)?, *p.get(13)?, *p.get(14)?, *p.get(15)?);
            let dst = Ipv4Addr::new(*p.get(16)?, *p.get(17)?, *p.get(18)?, *p.get(19)?);
            (*p.get(9)?, IpAddr::V4(src), IpAddr::V4(dst), p.get(ihl..)?)
        }
        6 => {
            let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            (
                *p.get(6)?,
                IpAddr::V6(src.into()),
                IpAddr::V6(dst.into()),
                p.get(40..)?,
            )
        }
        _ => return None,
    };
    // Neighbour discovery, MLD and other multicast are link chatter, not contacts.
    if proto == 58 && matches!(l4.first(), Some(130..=137) | Some(143)) {
        return None;
    }
    if dst.is_multicast() || dst == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return None;
    }
    let dport = match proto {
        6 | 17 => u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]),
        _ => 0,
    };
    Some(Seen {
        proto,
        src,
        dst,
        dport,
    })
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ns in [&self.host_ns, &self.up_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
