//! Privileged: tollgate's eBPF egress filter on real namespaces and real
//! packets.
//!
//! Each test builds its own three namespaces:
//!
//! ```text
//! sandbox ns  eth0 10.0.2.15/24 fd00:7467::15/64
//!    │ veth
//! router ns   tgs0 10.0.2.2/24 fd00:7467::2/64   ← the filter (TC ingress)
//!             up0 192.0.2.1/24 2001:db8:ffff::1/64 (the "host" address)
//!             fwmark 0x1/0x1 → table 100: local 0/0 and ::/0 dev lo; forwarding
//!    │ veth
//! upstream ns up1 192.0.2.2/24 2001:db8:ffff::2/64; canary addresses on lo
//!             (198.51.100.10, 10.99.0.10, 169.254.169.254, 2001:db8:100::10, ...)
//! ```
//!
//! The canary in the upstream namespace records every IP packet that reaches
//! it (an AF_PACKET socket) plus what its TCP and UDP sockets accept; the
//! router namespace holds "host services" and the proxy's transparent
//! listeners. Tests assert on what they received, and on counters and events.
//! Nothing leaves the machine: every address lives in these namespaces.
//!
//! Run as root: `sudo -E env "PATH=$PATH" cargo test -p tollgate-tests --test ebpf_filter`

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tollgate_ebpf::{
    Counters, DropEvent, EgressPolicy, EventReader, Filter, FloorSet, Mode, Reason, SandboxNet,
};
use tollgate_tests::privileged::{require_root, wait_until};

// ---- addresses ---------------------------------------------------------------

const GUEST4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GW4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7467, 0, 0, 0, 0, 0, 0x15);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7467, 0, 0, 0, 0, 0, 0x2);
/// The router's uplink address: a host address, in the floor.
const HOST4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
const PUB4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const PUB4_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const PUB4_C: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 12);
const PUB4_D: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const PRIV4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);
const PRIV4_B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 11);
const META4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const PUB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
const PUB6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x11);
const PRIV6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 0x10);

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x15];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Canary ports: TCP 80 accepts, UDP 9999 receives.
const CANARY_TCP: u16 = 80;
const CANARY_UDP: u16 = 9999;
/// Host services in the router namespace.
const HOST_TCP: u16 = 8080;
const HOST_UDP: u16 = 9999;

const SETTLE: Duration = Duration::from_millis(400);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);

static SERIAL: Mutex<()> = Mutex::new(());
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

fn v4(a: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(a, port))
}

fn v6(a: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(a, port, 0, 0))
}

// ---- commands and namespaces --------------------------------------------------

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(ns: &str, args: &str) {
    let mut v = vec!["ip", "-n", ns];
    v.extend(args.split_whitespace());
    run(&v);
}

fn sysctl(ns: &str, kv: &str) {
    run(&["ip", "netns", "exec", ns, "sysctl", "-q", "-w", kv]);
}

fn ns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

/// Runs `f` on a thread inside the network namespace `ns`. Sockets created
/// there stay in `ns` wherever they are used afterwards.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(ns_path(ns)).expect("open netns");
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// Like [`in_ns`] for a long-running thread.
fn spawn_in_ns(ns: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    let file = std::fs::File::open(ns_path(ns)).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

// ---- the canary -----------------------------------------------------------------

/// One IP packet seen by the canary.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    src: IpAddr,
    dst: IpAddr,
    /// IPv4 protocol / first IPv6 next header.
    proto: u8,
    sport: u16,
    dport: u16,
    /// IPv4 fragment (MF or offset).
    fragment: bool,
}

#[derive(Default)]
struct Records {
    packets: Mutex<Vec<Seen>>,
    /// (peer, local) of accepted TCP connections.
    accepted: Mutex<Vec<(SocketAddr, SocketAddr)>>,
    /// (peer, payload) of received UDP datagrams.
    datagrams: Mutex<Vec<(SocketAddr, Vec<u8>)>>,
}

impl Records {
    fn packets(&self) -> Vec<Seen> {
        self.packets.lock().expect("lock").clone()
    }

    fn saw(&self, pred: impl Fn(&Seen) -> bool) -> bool {
        self.packets.lock().expect("lock").iter().any(pred)
    }

    fn count(&self, pred: impl Fn(&Seen) -> bool) -> usize {
        self.packets
            .lock()
            .expect("lock")
            .iter()
            .filter(|p| pred(p))
            .count()
    }

    fn accepted(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.accepted.lock().expect("lock").clone()
    }

    fn datagrams(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.datagrams.lock().expect("lock").clone()
    }
}

fn from_sandbox(p: &Seen) -> bool {
    p.src == IpAddr::V4(GUEST4) || p.src == IpAddr::V6(GUEST6)
}

fn parse_frame(f: &[u8]) -> Option<Seen> {
    if f.len() < 14 {
        return None;
    }
    let ports = |l4: &[u8]| -> (u16, u16) {
        if l4.len() >= 4 {
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        } else {
            (0, 0)
        }
    };
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 if f.len() >= 34 => {
            let ip = &f[14..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            let fragment = frag & 0x3fff != 0;
            let proto = ip[9];
            let (sport, dport) =
                if frag & 0x1fff == 0 && ip.len() > ihl && (proto == 6 || proto == 17) {
                    ports(&ip[ihl..])
                } else {
                    (0, 0)
                };
            Some(Seen {
                src: IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
                dst: IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])),
                proto,
                sport,
                dport,
                fragment,
            })
        }
        0x86dd if f.len() >= 54 => {
            let ip = &f[14..];
            let mut s = [0u8; 16];
            s.copy_from_slice(&ip[8..24]);
            let mut d = [0u8; 16];
            d.copy_from_slice(&ip[24..40]);
            let proto = ip[6];
            let (sport, dport) = if proto == 6 || proto == 17 {
                ports(&ip[40..])
            } else {
                (0, 0)
            };
            Some(Seen {
                src: IpAddr::V6(Ipv6Addr::from(s)),
                dst: IpAddr::V6(Ipv6Addr::from(d)),
                proto,
                sport,
                dport,
                fragment: proto == 44,
            })
        }
        _ => None,
    }
}

/// Threads that record contacts; stopped and joined on drop.
struct Threads {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Sniffer + TCP + UDP listeners in `ns`. `sniff` records every IP frame.
fn start_recorders(ns: &str, tcp_port: u16, udp_port: u16, sniff: bool) -> (Arc<Records>, Threads) {
    let rec = Arc::new(Records::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();

    if sniff {
        let (rec, stop, ready) = (rec.clone(), stop.clone(), ready_tx.clone());
        handles.push(spawn_in_ns(ns, move || {
            let eth_p_all = i32::from(0x0003u16.to_be());
            let sock = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(eth_p_all)))
                .expect("AF_PACKET socket");
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            ready.send(()).expect("ready");
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::SeqCst) {
                match (&sock).read(&mut buf) {
                    Ok(n) => {
                        if let Some(p) = parse_frame(&buf[..n]) {
                            rec.packets.lock().expect("lock").push(p);
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("sniffer: {e}"),
                }
            }
        }));
    }
    {
        let (rec, stop, ready) = (rec.clone(), stop.clone(), ready_tx.clone());
        handles.push(spawn_in_ns(ns, move || {
            let l = TcpListener::bind(v6(Ipv6Addr::UNSPECIFIED, tcp_port)).expect("bind tcp");
            l.set_nonblocking(true).expect("nonblocking");
            ready.send(()).expect("ready");
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        let local = s.local_addr().expect("local addr");
                        rec.accepted
                            .lock()
                            .expect("lock")
                            .push((unmap(peer), unmap(local)));
                        let _ = s.write_all(b"canary");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
    }
    {
        let (rec, stop, ready) = (rec.clone(), stop.clone(), ready_tx);
        handles.push(spawn_in_ns(ns, move || {
            let u = UdpSocket::bind(v6(Ipv6Addr::UNSPECIFIED, udp_port)).expect("bind udp");
            u.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            ready.send(()).expect("ready");
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = u.recv_from(&mut buf) {
                    rec.datagrams
                        .lock()
                        .expect("lock")
                        .push((unmap(peer), buf[..n].to_vec()));
                }
            }
        }));
    }
    let expected = if sniff { 3 } else { 2 };
    for _ in 0..expected {
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("recorder ready");
    }
    (rec, Threads { stop, handles })
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(s) => match s.ip().to_ipv4_mapped() {
            Some(v4addr) => v4(v4addr, s.port()),
            None => a,
        },
        a => a,
    }
}

// ---- the topology ---------------------------------------------------------------

struct Topo {
    sbx: String,
    rtr: String,
    up: String,
    pin_dir: PathBuf,
    /// What reached the upstream namespace.
    canary: Arc<Records>,
    /// What reached the router's own services (host address, gateway).
    host: Arc<Records>,
    _threads: Vec<Threads>,
}

const PIN_TEST_ROOT: &str = "/sys/fs/bpf/tollgate-tests";

impl Topo {
    /// Builds the three namespaces. `backup` adds the router's nftables
    /// forward chain that only accepts packets marked 0x2.
    fn new(backup: bool) -> Topo {
        let n = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let mut topo = Topo {
            sbx: format!("tgeb-s-{id}"),
            rtr: format!("tgeb-r-{id}"),
            up: format!("tgeb-u-{id}"),
            pin_dir: Path::new(PIN_TEST_ROOT).join(&id),
            canary: Arc::default(),
            host: Arc::default(),
            _threads: Vec::new(),
        };
        let (s, r, u) = (topo.sbx.clone(), topo.rtr.clone(), topo.up.clone());
        for ns in [&s, &r, &u] {
            run(&["ip", "netns", "add", ns]);
            ip(ns, "link set lo up");
            // No duplicate address detection: a tentative link-local address
            // makes the router drop forwarded IPv6 until DAD ends.
            sysctl(ns, "net.ipv6.conf.all.accept_dad=0");
            sysctl(ns, "net.ipv6.conf.default.accept_dad=0");
        }
        // sandbox ⇄ router
        ip(
            &s,
            &format!(
                "link add eth0 address 02:00:00:00:00:15 type veth peer name tgs0 \
                 address 02:00:00:00:00:02 netns {r}"
            ),
        );
        ip(&s, "addr add 10.0.2.15/24 dev eth0");
        ip(&s, "addr add fd00:7467::15/64 dev eth0 nodad");
        ip(&s, "link set eth0 up");
        ip(&s, "route add default via 10.0.2.2");
        ip(&s, "-6 route add default via fd00:7467::2");
        ip(&r, "addr add 10.0.2.2/24 dev tgs0");
        ip(&r, "addr add fd00:7467::2/64 dev tgs0 nodad");
        ip(&r, "link set tgs0 up");
        // router ⇄ upstream
        ip(
            &r,
            &format!("link add up0 type veth peer name up1 netns {u}"),
        );
        ip(&r, "addr add 192.0.2.1/24 dev up0");
        ip(&r, "addr add 2001:db8:ffff::1/64 dev up0 nodad");
        ip(&r, "link set up0 up");
        ip(&u, "addr add 192.0.2.2/24 dev up1");
        ip(&u, "addr add 2001:db8:ffff::2/64 dev up1 nodad");
        ip(&u, "link set up1 up");
        for a in [
            "198.51.100.10/32",
            "198.51.100.11/32",
            "10.99.0.10/32",
            "169.254.169.254/32",
        ] {
            ip(&u, &format!("addr add {a} dev lo"));
        }
        for a in [
            "2001:db8:100::10/128",
            "2001:db8:100::11/128",
            "fd99::10/128",
        ] {
            ip(&u, &format!("addr add {a} dev lo nodad"));
        }
        ip(&u, "route add 10.0.2.0/24 via 192.0.2.1");
        ip(&u, "-6 route add fd00:7467::/64 via 2001:db8:ffff::1");
        ip(&r, "route add default via 192.0.2.2");
        ip(&r, "-6 route add default via 2001:db8:ffff::2");
        // steering: marked packets are delivered locally
        ip(&r, "rule add fwmark 0x1/0x1 lookup 100");
        ip(&r, "route add local 0.0.0.0/0 dev lo table 100");
        ip(&r, "-6 rule add fwmark 0x1/0x1 lookup 100");
        ip(&r, "-6 route add local ::/0 dev lo table 100");
        sysctl(&r, "net.ipv4.ip_forward=1");
        sysctl(&r, "net.ipv6.conf.all.forwarding=1");
        sysctl(&r, "net.ipv4.conf.all.rp_filter=0");
        sysctl(&r, "net.ipv4.conf.tgs0.rp_filter=0");
        // IPv6 is usable once each link has its link-local and multicast
        // routes (addrconf installs them from a work item, sometimes late).
        for (ns, dev) in [(&s, "eth0"), (&r, "tgs0"), (&r, "up0"), (&u, "up1")] {
            let ready = wait_until(Duration::from_secs(10), || {
                let out = Command::new("ip")
                    .args([
                        "-n", ns, "-6", "route", "show", "table", "local", "dev", dev,
                    ])
                    .output()
                    .expect("ip route");
                let routes = String::from_utf8_lossy(&out.stdout);
                routes.contains("ff00::/8") && routes.contains("local fe80::")
            });
            assert!(ready, "IPv6 on {dev} in {ns} never became ready");
        }
        if backup {
            let rules =
                "table inet tgeb { chain tgeb_forward { type filter hook forward priority 0; \
                         policy accept; iifname \"tgs0\" meta mark & 0x2 != 0x2 drop; }; }";
            run(&["ip", "netns", "exec", &r, "nft", rules]);
        }
        let (canary, t1) = start_recorders(&u, CANARY_TCP, CANARY_UDP, true);
        let (host, t2) = start_recorders(&r, HOST_TCP, HOST_UDP, false);
        topo.canary = canary;
        topo.host = host;
        topo._threads = vec![t1, t2];
        topo
    }

    fn net(&self) -> SandboxNet {
        SandboxNet {
            guest_v4: GUEST4,
            gateway_v4: GW4,
            guest_v6: Some(GUEST6),
            gateway_v6: Some(GW6),
        }
    }

    /// The platform floor plus what the control plane adds: the host's
    /// (router uplink) addresses and the sandbox address pool.
    fn floor() -> FloorSet {
        FloorSet::platform().with_floor([
            IpNet::from(IpAddr::V4(HOST4)),
            IpNet::from(IpAddr::V6(HOST6)),
            net("10.0.2.0/24"),
            net("fd00:7467::/64"),
        ])
    }

    fn attach(&self, policy: &EgressPolicy) -> Filter {
        self.attach_with(&self.net(), &Self::floor(), policy)
    }

    fn attach_with(&self, net: &SandboxNet, floor: &FloorSet, policy: &EgressPolicy) -> Filter {
        Filter::attach(
            &self.pin_dir,
            &ns_path(&self.rtr),
            "tgs0",
            net,
            floor,
            policy,
        )
        .expect("attach filter")
    }

    /// The proxy's transparent listeners in the router namespace.
    fn proxy_listeners(&self) -> (Socket, Socket) {
        in_ns(&self.rtr, || {
            let l4 = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
            l4.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
            l4.set_reuse_address(true).expect("reuse");
            l4.bind(&SockAddr::from(v4(Ipv4Addr::LOCALHOST, 15001)))
                .expect("bind v4");
            l4.listen(128).expect("listen v4");
            let l6 = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).expect("socket");
            l6.set_only_v6(true).expect("v6only");
            l6.set_ip_transparent_v4(true).expect("IP_TRANSPARENT v6");
            l6.set_reuse_address(true).expect("reuse");
            l6.bind(&SockAddr::from(v6(Ipv6Addr::LOCALHOST, 15001)))
                .expect("bind v6");
            l6.listen(128).expect("listen v6");
            for l in [&l4, &l6] {
                l.set_read_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
            }
            (l4, l6)
        })
    }

    // --- the sandbox's side ---

    fn udp(&self, dst: SocketAddr, payload: &[u8]) -> u16 {
        let payload = payload.to_vec();
        in_ns(&self.sbx, move || {
            let bind = if dst.is_ipv4() {
                v4(Ipv4Addr::UNSPECIFIED, 0)
            } else {
                v6(Ipv6Addr::UNSPECIFIED, 0)
            };
            let s = UdpSocket::bind(bind).expect("bind");
            s.send_to(&payload, dst).expect("send_to");
            s.local_addr().expect("local").port()
        })
    }

    fn connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        in_ns(&self.sbx, move || {
            TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)
        })
    }

    /// One ICMP / ICMPv6 echo request; true when a reply came back.
    fn ping(&self, dst: IpAddr) -> bool {
        in_ns(&self.sbx, move || {
            let (domain, proto, ty) = match dst {
                IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8),
                IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8),
            };
            let s = Socket::new(domain, Type::RAW, Some(proto)).expect("raw icmp socket");
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            let mut msg = vec![ty, 0, 0, 0, 0x12, 0x34, 0, 1];
            msg.extend_from_slice(b"tollgate");
            if dst.is_ipv4() {
                let c = checksum(&msg, 0);
                msg[2..4].copy_from_slice(&c.to_be_bytes());
            }
            s.send_to(&msg, &SockAddr::from(SocketAddr::new(dst, 0)))
                .expect("send echo");
            let deadline = Instant::now() + Duration::from_millis(600);
            let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
            while Instant::now() < deadline {
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    if from.as_socket().map(|a| a.ip()) == Some(dst) {
                        return true;
                    }
                }
            }
            false
        })
    }

    /// Sends raw Ethernet frames out of the sandbox's eth0 (AF_PACKET, via
    /// python3: std has no sockaddr_ll).
    fn send_frames(&self, frames: &[Vec<u8>]) {
        let script = "import socket,sys\n\
                      s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n\
                      s.bind((sys.argv[1],0))\n\
                      [s.send(bytes.fromhex(h)) for h in sys.argv[2:]]";
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let hex: Vec<String> = frames
            .iter()
            .map(|f| f.iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        let mut args = vec![
            "ip",
            "netns",
            "exec",
            self.sbx.as_str(),
            python,
            "-c",
            script,
            "eth0",
        ];
        args.extend(hex.iter().map(String::as_str));
        run(&args);
    }

    /// Names of the BPF programs on the router's tgs0 at ingress, as
    /// `tc filter show` lists them (`... bpf ... <name> direct-action ...`).
    fn ingress_programs(&self) -> Vec<String> {
        self.bpf_filter_lines()
            .iter()
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let at = words.iter().position(|w| *w == "direct-action")?;
                words.get(at.checked_sub(1)?).map(|w| (*w).to_string())
            })
            .collect()
    }
}

impl Topo {
    /// The direct-action `cls_bpf` lines of `tc filter show` for the
    /// router's tgs0 at ingress.
    fn bpf_filter_lines(&self) -> Vec<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", ns_path(&self.rtr).display()))
            .args(["tc", "filter", "show", "dev", "tgs0", "ingress"])
            .output()
            .expect("run tc filter show");
        assert!(out.status.success(), "tc filter show: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(" bpf ") && l.contains("direct-action"))
            .map(str::to_string)
            .collect()
    }

    /// Kernel ids of the BPF programs on the router's tgs0 at ingress and
    /// the filters' classids (`tc filter show`: `... flowid M:N ... id <id>`).
    fn ingress_ids(&self) -> Vec<(String, u32)> {
        self.bpf_filter_lines()
            .iter()
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let after = |key: &str| {
                    let at = words.iter().position(|w| *w == key)?;
                    words.get(at + 1).map(|w| (*w).to_string())
                };
                let id = after("id")?.parse().ok()?;
                Some((after("flowid").unwrap_or_default(), id))
            })
            .collect()
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        if let Err(e) = Filter::remove(&self.pin_dir) {
            eprintln!("cleanup: remove {}: {e}", self.pin_dir.display());
        }
        let _ = std::fs::remove_dir(PIN_TEST_ROOT);
        self._threads.clear();
        for ns in [&self.sbx, &self.rtr, &self.up] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

// ---- packet crafting --------------------------------------------------------------

fn checksum(data: &[u8], init: u32) -> u16 {
    let mut sum = init;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from(chunk[0]) << 8
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(src);
    p.extend_from_slice(dst);
    if src.len() == 4 {
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
    }
    u32::from(!checksum(&p, 0))
}

fn udp_segment(src: &[u8], dst: &[u8], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut c = checksum(&u, pseudo_sum(src, dst, 17, len));
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// IPv4 packet; `frag` = flags|offset field, `options` padded by the caller.
fn ipv4_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    frag: u16,
    options: &[u8],
    body: &[u8],
) -> Vec<u8> {
    let hlen = 20 + options.len();
    let mut h = vec![0u8; hlen];
    h[0] = 0x40 | (hlen / 4) as u8;
    h[2..4].copy_from_slice(&((hlen + body.len()) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x7467u16.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h[20..].copy_from_slice(options);
    let c = checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(body);
    h
}

fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, nexthdr: u8, body: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(body.len() as u16).to_be_bytes());
    h[6] = nexthdr;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend_from_slice(body);
    h
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&ROUTER_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn udp4_frame(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let u = udp_segment(&src.octets(), &dst.octets(), 40000, dport, b"tollgate-raw");
    eth(0x0800, &ipv4_packet(src, dst, 17, 0, &[], &u))
}

fn udp6_frame(src: Ipv6Addr, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let u = udp_segment(&src.octets(), &dst.octets(), 40000, dport, b"tollgate-raw");
    eth(0x86dd, &ipv6_packet(src, dst, 17, &u))
}

/// UDP behind one IPv6 extension header (`kind`: 0 hop-by-hop, 60 destination
/// options, 44 fragment).
fn udp6_ext_frame(kind: u8, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let u = udp_segment(
        &GUEST6.octets(),
        &dst.octets(),
        40000,
        dport,
        b"tollgate-ext",
    );
    let mut body = match kind {
        // fragment header: next=UDP, offset 0, M=0, id
        44 => vec![17, 0, 0, 0, 0, 0, 0x74, 0x67],
        // hop-by-hop / destination options: next=UDP, len 0, PadN(4)
        _ => vec![17, 0, 1, 4, 0, 0, 0, 0],
    };
    body.extend_from_slice(&u);
    eth(0x86dd, &ipv6_packet(GUEST6, dst, kind, &body))
}

// ---- filter observation -------------------------------------------------------------

fn delta(f: &Filter, before: &Counters) -> Counters {
    f.counters().expect("counters").since(before)
}

fn events_for(events: &[DropEvent], reason: Reason, dst: IpAddr) -> Vec<DropEvent> {
    events
        .iter()
        .filter(|e| e.reason == reason && e.dst == Some(dst))
        .cloned()
        .collect()
}

fn drain_after(reader: &mut EventReader, settle: Duration) -> Vec<DropEvent> {
    std::thread::sleep(settle);
    reader.drain()
}

// ---- tests --------------------------------------------------------------------------

/// allow_cidrs (v4 and v6) reach the canary directly in custom mode; private
/// and public addresses that are not listed do not.
#[test]
fn allow_cidrs_reach_the_canary_others_do_not() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let policy = EgressPolicy::new(Mode::Custom).with_allow([
        net("198.51.100.10/32"),
        net("10.99.0.10/32"),
        net("2001:db8:100::10/128"),
    ]);
    let f = t.attach(&policy);
    let before = f.counters().expect("counters");

    for dst in [
        v4(PUB4, CANARY_UDP),
        v4(PRIV4, CANARY_UDP),
        v6(PUB6, CANARY_UDP),
    ] {
        t.udp(dst, b"allowed");
    }
    for dst in [
        v4(PRIV4_B, CANARY_UDP),
        v4(PUB4_B, CANARY_UDP),
        v6(PRIV6, CANARY_UDP),
        v6(PUB6_B, CANARY_UDP),
    ] {
        t.udp(dst, b"not allowed");
    }
    let tcp4 = t
        .connect(v4(PUB4, CANARY_TCP))
        .expect("TCP to an allow_cidr connects");
    let tcp6 = t
        .connect(v6(PUB6, CANARY_TCP))
        .expect("TCP6 to an allow_cidr connects");
    for mut s in [tcp4, tcp6] {
        let mut buf = [0u8; 6];
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        s.read_exact(&mut buf).expect("canary greets");
        assert_eq!(&buf, b"canary");
    }
    assert!(wait_until(Duration::from_secs(3), || t
        .canary
        .datagrams()
        .len()
        >= 3));
    std::thread::sleep(SETTLE);

    let got: BTreeSet<IpAddr> = t.canary.datagrams().iter().map(|(p, _)| p.ip()).collect();
    assert_eq!(
        got,
        BTreeSet::from([IpAddr::V4(GUEST4), IpAddr::V6(GUEST6)])
    );
    for dst in [IpAddr::V4(PUB4), IpAddr::V4(PRIV4), IpAddr::V6(PUB6)] {
        assert!(
            t.canary.saw(|p| p.dst == dst && p.proto == 17),
            "UDP to {dst} must arrive"
        );
    }
    for dst in [
        IpAddr::V4(PRIV4_B),
        IpAddr::V4(PUB4_B),
        IpAddr::V6(PRIV6),
        IpAddr::V6(PUB6_B),
    ] {
        assert!(
            !t.canary.saw(|p| p.dst == dst),
            "{dst} is not in allow_cidrs: {:?}",
            t.canary.packets()
        );
    }
    let accepted: BTreeSet<SocketAddr> = t.canary.accepted().iter().map(|(_, l)| *l).collect();
    assert_eq!(
        accepted,
        BTreeSet::from([v4(PUB4, CANARY_TCP), v6(PUB6, CANARY_TCP)])
    );

    let d = delta(&f, &before);
    assert_eq!(d.get(Reason::DropNotAllowed), 4, "{d:?}");
    assert!(d.get(Reason::PassCidr) >= 3 + 2 * 3, "{d:?}");
}

/// The floor is dropped in every mode even when allow_cidrs covers
/// everything: metadata, loopback, the host's own address, the gateway's
/// non-DNS ports, and IPv6 forms embedding a floor IPv4 address.
#[test]
fn floor_wins_over_allow_cidrs_in_every_mode() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let everything = [net("0.0.0.0/0"), net("::/0")];
    let mut f = t.attach(&EgressPolicy::allow_all().with_allow(everything));

    for mode in [Mode::AllowAll, Mode::Custom] {
        f.set_policy(&EgressPolicy::new(mode).with_allow(everything))
            .expect("set policy");
        let before = f.counters().expect("counters");
        let mut reader = f.event_reader().expect("events");
        reader.drain();

        // Control: the policy does let public traffic through.
        t.udp(v4(PUB4, CANARY_UDP), b"control");
        // Floor over ordinary sockets.
        t.udp(v4(META4, CANARY_UDP), b"metadata");
        assert!(
            t.connect(v4(META4, CANARY_TCP)).is_err(),
            "TCP to 169.254.169.254 must fail"
        );
        assert!(
            !t.ping(IpAddr::V4(META4)),
            "echo to 169.254.169.254 must fail"
        );
        t.udp(v4(HOST4, HOST_UDP), b"host");
        assert!(
            t.connect(v4(HOST4, HOST_TCP)).is_err(),
            "TCP to the host must fail"
        );
        t.udp(v6(HOST6, HOST_UDP), b"host6");
        // Host services behind the gateway address: only DNS, echo and the
        // CA endpoint (TCP 80); TCP 8080 is dropped.
        t.udp(v4(GW4, HOST_UDP), b"gateway");
        assert!(
            t.connect(v4(GW4, HOST_TCP)).is_err(),
            "TCP to a gateway port must fail"
        );
        // Frames a sandbox kernel would never route out: 127.0.0.2 and the
        // IPv6 forms of 169.254.169.254.
        let embedded: [Ipv6Addr; 5] = [
            "::ffff:169.254.169.254".parse().expect("ip"),
            "::169.254.169.254".parse().expect("ip"),
            "64:ff9b::a9fe:a9fe".parse().expect("ip"),
            "2002:a9fe:a9fe::1".parse().expect("ip"),
            // Teredo: client 169.254.169.254 obfuscated (XOR 0xffffffff)
            "2001:0:4136:e378:8000:63bf:5601:5601".parse().expect("ip"),
        ];
        let mut frames = vec![udp4_frame(GUEST4, Ipv4Addr::new(127, 0, 0, 2), CANARY_UDP)];
        frames.extend(embedded.iter().map(|d| udp6_frame(GUEST6, *d, CANARY_UDP)));
        t.send_frames(&frames);

        assert!(wait_until(Duration::from_secs(3), || t
            .canary
            .saw(|p| p.dst == IpAddr::V4(PUB4) && from_sandbox(p))));
        let events = drain_after(&mut reader, SETTLE);
        let floored: Vec<IpAddr> = [
            IpAddr::V4(META4),
            IpAddr::V4(HOST4),
            IpAddr::V6(HOST6),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        ]
        .into_iter()
        .chain(embedded.iter().map(|a| IpAddr::V6(*a)))
        .collect();
        for dst in &floored {
            assert!(
                !events_for(&events, Reason::DropFloor, *dst).is_empty(),
                "{mode:?}: no drop_floor event for {dst}: {events:?}"
            );
            assert!(
                !t.canary.saw(|p| p.dst == *dst),
                "{mode:?}: {dst} reached the canary"
            );
        }
        assert!(!events_for(&events, Reason::DropGatewayPort, IpAddr::V4(GW4)).is_empty());
        assert!(
            t.host.accepted().is_empty(),
            "host TCP service was reached: {:?}",
            t.host.accepted()
        );
        assert!(
            t.host.datagrams().is_empty(),
            "host UDP service was reached: {:?}",
            t.host.datagrams()
        );
        let d = delta(&f, &before);
        // 3 UDP + ≥1 SYN + 1 echo + 5 embedded + 127.0.0.2 + host TCP SYN(s)
        assert!(d.get(Reason::DropFloor) >= 11, "{mode:?}: {d:?}");
        assert!(d.get(Reason::DropGatewayPort) >= 2, "{mode:?}: {d:?}");
    }
}

/// deny-all: nothing reaches the canary — TCP, UDP 53, UDP 443, ICMP, IPv6 —
/// and DNS to the gateway is dropped too.
#[test]
fn deny_all_lets_nothing_out() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let f = t.attach(&EgressPolicy::deny_all());
    // A DNS listener on the gateway (the proxy's resolver).
    let dns = in_ns(&t.rtr, || UdpSocket::bind(v4(GW4, 53)).expect("bind dns"));
    dns.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let before = f.counters().expect("counters");

    assert!(t.connect(v4(PUB4, CANARY_TCP)).is_err());
    assert!(t.connect(v6(PUB6, CANARY_TCP)).is_err());
    for dst in [
        v4(PUB4, 53),
        v4(PUB4, 443),
        v4(PUB4, CANARY_UDP),
        v6(PUB6, 53),
        v6(PUB6, 443),
    ] {
        t.udp(dst, b"deny-all");
    }
    assert!(!t.ping(IpAddr::V4(PUB4)));
    assert!(!t.ping(IpAddr::V6(PUB6)));
    t.udp(v4(GW4, 53), b"dns");
    std::thread::sleep(SETTLE);

    assert!(
        !t.canary.saw(from_sandbox),
        "deny-all leaked: {:?}",
        t.canary.packets()
    );
    assert!(t.canary.accepted().is_empty() && t.canary.datagrams().is_empty());
    let mut buf = [0u8; 64];
    assert!(
        dns.recv_from(&mut buf).is_err(),
        "DNS to the gateway must be dropped in deny-all"
    );
    let d = delta(&f, &before);
    // 2 SYNs, 5 datagrams, 2 echoes, DNS to the gateway
    let attempts = 2 + 5 + 2 + 1;
    assert!(d.get(Reason::DropDenyAll) >= attempts, "{d:?}");
    assert_eq!(
        d.get(Reason::PassCidr) + d.get(Reason::PassPublic) + d.get(Reason::Steered),
        0,
        "{d:?}"
    );
}

/// allow-all: UDP and echo to public addresses pass (and come back), QUIC and
/// private ranges do not; DNS to the gateway is delivered locally.
#[test]
fn allow_all_passes_public_udp_but_not_quic_or_private() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let f = t.attach(&EgressPolicy::allow_all());
    let dns = in_ns(&t.rtr, || UdpSocket::bind(v4(GW4, 53)).expect("bind dns"));
    dns.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let before = f.counters().expect("counters");

    t.udp(v4(PUB4, CANARY_UDP), b"public4");
    t.udp(v6(PUB6, CANARY_UDP), b"public6");
    t.udp(v4(PUB4, 443), b"quic4");
    t.udp(v6(PUB6, 443), b"quic6");
    t.udp(v4(PRIV4, CANARY_UDP), b"private4");
    t.udp(v6(PRIV6, CANARY_UDP), b"private6");
    assert!(
        t.ping(IpAddr::V4(PUB4)),
        "echo to a public address gets a reply"
    );
    let ok6 = t.ping(IpAddr::V6(PUB6));
    if !ok6 {
        eprintln!(
            "DEBUG {:?}\n{:?}",
            f.counters().expect("c").since(&before),
            t.canary.packets()
        );
    }
    assert!(ok6, "echo6 to a public address gets a reply");
    assert!(
        !t.ping(IpAddr::V4(PRIV4)),
        "echo to a private address is dropped"
    );
    assert!(t.ping(IpAddr::V4(GW4)), "echo to the gateway");
    t.udp(v4(GW4, 53), b"dns");

    let mut buf = [0u8; 64];
    let (n, from) = dns.recv_from(&mut buf).expect("DNS to the gateway arrives");
    assert_eq!((&buf[..n], from.ip()), (&b"dns"[..], IpAddr::V4(GUEST4)));
    assert!(wait_until(Duration::from_secs(3), || t
        .canary
        .datagrams()
        .len()
        >= 2));
    std::thread::sleep(SETTLE);
    let payloads: BTreeSet<Vec<u8>> = t.canary.datagrams().into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        payloads,
        BTreeSet::from([b"public4".to_vec(), b"public6".to_vec()])
    );
    assert!(!t.canary.saw(|p| p.dport == 443), "QUIC leaked");
    assert!(
        !t.canary
            .saw(|p| p.dst == IpAddr::V4(PRIV4) || p.dst == IpAddr::V6(PRIV6)),
        "private leaked"
    );

    let d = delta(&f, &before);
    assert_eq!(d.get(Reason::DropQuic), 2, "{d:?}");
    assert!(d.get(Reason::DropPrivate) >= 3, "{d:?}");
    assert!(d.get(Reason::PassPublic) >= 4, "{d:?}");
}

/// TCP to a destination outside allow_cidrs lands on the proxy's listener in
/// the router namespace with the original destination as its local address
/// (v4 and v6); with the listeners closed it fails and nothing leaves.
#[test]
fn tcp_is_steered_to_the_listener_and_fails_closed_without_it() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let mut f = t.attach(&EgressPolicy::allow_all());

    // Before any listener is registered: fail closed.
    let before = f.counters().expect("counters");
    assert!(t.connect(v4(PUB4_B, 443)).is_err());
    assert!(delta(&f, &before).get(Reason::DropNoListener) >= 1);

    let (l4, l6) = t.proxy_listeners();
    f.set_listeners(l4.as_fd(), Some(l6.as_fd()))
        .expect("set listeners");
    let before = f.counters().expect("counters");
    for (dst, listener) in [(v4(PUB4_B, 443), &l4), (v6(PUB6_B, 8443), &l6)] {
        let mut client = t
            .connect(dst)
            .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        let (conn, peer) = listener
            .accept()
            .unwrap_or_else(|e| panic!("accept for {dst}: {e}"));
        let local = conn.local_addr().expect("local").as_socket().expect("inet");
        let peer = peer.as_socket().expect("inet");
        assert_eq!(local, dst, "getsockname() is the original destination");
        assert_eq!(peer, client.local_addr().expect("client addr"));
        // Bytes both ways: later segments find the established socket.
        let mut conn: TcpStream = conn.into();
        client.write_all(b"hello proxy").expect("write");
        let mut buf = [0u8; 11];
        conn.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        conn.read_exact(&mut buf).expect("proxy reads");
        assert_eq!(&buf, b"hello proxy");
        conn.write_all(b"hi").expect("proxy writes");
        let mut buf = [0u8; 2];
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        client.read_exact(&mut buf).expect("client reads");
        assert_eq!(&buf, b"hi");
    }
    let d = delta(&f, &before);
    assert!(d.get(Reason::Steered) >= 2 * 4, "{d:?}");
    assert!(
        !t.canary.saw(|p| p.proto == 6),
        "steered TCP reached the canary"
    );

    // The proxy dies: its listeners leave the sockmap by themselves.
    drop((l4, l6));
    let before = f.counters().expect("counters");
    let mut reader = f.event_reader().expect("events");
    reader.drain();
    assert!(
        t.connect(v4(PUB4_B, 443)).is_err(),
        "no listener: connect must fail"
    );
    assert!(
        t.connect(v6(PUB6_B, 8443)).is_err(),
        "no listener: connect6 must fail"
    );
    std::thread::sleep(SETTLE);
    assert!(
        !t.canary.saw(|p| p.proto == 6),
        "TCP leaked without a proxy"
    );
    let d = delta(&f, &before);
    assert!(d.get(Reason::DropNoListener) >= 2, "{d:?}");
    assert_eq!(d.get(Reason::Steered), 0, "{d:?}");
    let events = reader.drain();
    let ev4 = events_for(&events, Reason::DropNoListener, IpAddr::V4(PUB4_B));
    let ev6 = events_for(&events, Reason::DropNoListener, IpAddr::V6(PUB6_B));
    assert!(
        ev4.iter().all(|e| e.proto == 6 && e.dport == 443) && !ev4.is_empty(),
        "{events:?}"
    );
    assert!(
        ev6.iter().all(|e| e.proto == 6 && e.dport == 8443) && !ev6.is_empty(),
        "{events:?}"
    );
}

/// Spoofed sources, IPv4 fragments and options, IPv6 extension headers,
/// VLAN tags and other L4 protocols are dropped; the same frames without the
/// trick pass (so the crafted path itself works).
#[test]
fn lower_layer_tricks_are_dropped() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let f = t.attach(&EgressPolicy::allow_all());
    let mut reader = f.event_reader().expect("events");
    let before = f.counters().expect("counters");

    let udp_frag = udp_segment(&GUEST4.octets(), &PUB4.octets(), 40000, 7003, &[0x55; 32]);
    let mut vlan = Vec::new();
    vlan.extend_from_slice(&0x0005u16.to_be_bytes()); // VID 5
    vlan.extend_from_slice(&0x0800u16.to_be_bytes());
    vlan.extend_from_slice(&udp4_frame(GUEST4, PUB4, 7006)[14..]);
    let frames = vec![
        udp4_frame(GUEST4, PUB4, 7001),                      // control v4
        udp6_frame(GUEST6, PUB6, 7005),                      // control v6
        udp4_frame(Ipv4Addr::new(10, 0, 2, 99), PUB4, 7002), // spoofed v4
        udp6_frame("2001:db8:dead::1".parse().expect("ip"), PUB6, 7002), // spoofed v6
        // fragments: first (MF) and second (offset 24 bytes) of one datagram
        eth(
            0x0800,
            &ipv4_packet(GUEST4, PUB4, 17, 0x2000, &[], &udp_frag[..24]),
        ),
        eth(
            0x0800,
            &ipv4_packet(GUEST4, PUB4, 17, 3, &[], &udp_frag[24..]),
        ),
        // IPv4 with options (NOP x3 + EOL)
        eth(
            0x0800,
            &ipv4_packet(
                GUEST4,
                PUB4,
                17,
                0,
                &[1, 1, 1, 0],
                &udp_segment(&GUEST4.octets(), &PUB4.octets(), 40000, 7007, b"opt"),
            ),
        ),
        udp6_ext_frame(0, PUB6, 7004),  // hop-by-hop
        udp6_ext_frame(60, PUB6, 7004), // destination options
        udp6_ext_frame(44, PUB6, 7004), // fragment header
        eth(0x8100, &vlan),             // 802.1Q
        eth(0x88a8, &vlan),             // 802.1ad
        eth(
            0x0800,
            &ipv4_packet(GUEST4, PUB4, 47, 0, &[], &[0, 0, 0x08, 0, 0x45]),
        ), // GRE
        eth(0x0800, &ipv4_packet(GUEST4, PUB4, 132, 0, &[], &[0; 12])), // SCTP
        eth(
            0x0806,
            &[
                0, 1, 8, 0, 6, 4, 0, 2, 2, 0, 0, 0, 0, 0x15, 10, 0, 2, 77, 2, 0, 0, 0, 0, 2, 10, 0,
                2, 2,
            ],
        ), // ARP from another IP
        eth(0x88cc, &[0; 32]),          // LLDP
    ];
    t.send_frames(&frames);

    assert!(
        wait_until(Duration::from_secs(3), || {
            t.canary.saw(|p| p.dport == 7001) && t.canary.saw(|p| p.dport == 7005)
        }),
        "control frames must pass: {:?}",
        t.canary.packets()
    );
    let events = drain_after(&mut reader, SETTLE);
    assert!(
        !t.canary
            .saw(|p| [7002, 7003, 7004, 7006, 7007].contains(&p.dport)),
        "{:?}",
        t.canary.packets()
    );
    let to_canary = |p: &Seen| p.dst == IpAddr::V4(PUB4) || p.dst == IpAddr::V6(PUB6);
    assert!(
        !t.canary
            .saw(|p| to_canary(p) && (p.fragment || [0, 47, 60, 132].contains(&p.proto))),
        "{:?}",
        t.canary.packets()
    );

    let d = delta(&f, &before);
    let expect = [
        (Reason::DropSpoof, 3), // v4, v6, ARP
        (Reason::DropFragment, 3),
        (Reason::DropIpOptions, 1),
        (Reason::DropExtHdr, 2),
        (Reason::DropL2, 3),
        (Reason::DropL4Proto, 2),
    ];
    for (reason, n) in expect {
        // Background IPv6 (MLD reports carry hop-by-hop) may add ext-hdr drops.
        assert!(d.get(reason) >= n, "{reason}: {d:?}");
        assert!(
            events.iter().filter(|e| e.reason == reason).count() as u64 >= n,
            "{reason}: {events:?}"
        );
    }
    let spoof4 = events_for(&events, Reason::DropSpoof, IpAddr::V4(PUB4));
    assert_eq!(spoof4.len(), 1, "{events:?}");
    assert_eq!(
        (spoof4[0].src, spoof4[0].dport),
        (Some(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 99))), 7002)
    );
    assert!(events
        .iter()
        .any(|e| e.reason == Reason::DropL2 && e.ethertype == 0x8100 && e.dst.is_none()));
}

/// A sandbox without IPv6 gets every IPv6 packet dropped.
#[test]
fn ipv6_is_dropped_when_not_provisioned() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let f = t.attach_with(
        &SandboxNet::v4(GUEST4, GW4),
        &Topo::floor(),
        &EgressPolicy::allow_all(),
    );
    let before = f.counters().expect("counters");
    t.udp(v6(PUB6, CANARY_UDP), b"v6");
    t.udp(v4(PUB4, CANARY_UDP), b"v4");
    assert!(t.connect(v6(PUB6, CANARY_TCP)).is_err());
    assert!(wait_until(Duration::from_secs(3), || t
        .canary
        .datagrams()
        .len()
        == 1));
    std::thread::sleep(SETTLE);
    assert!(
        !t.canary.saw(|p| p.src == IpAddr::V6(GUEST6)),
        "{:?}",
        t.canary.packets()
    );
    let d = delta(&f, &before);
    assert!(d.get(Reason::DropIpv6Disabled) >= 2, "{d:?}");
}

/// Counters and ring-buffer events match the attempts: exact counts for UDP,
/// events carrying reason, destination, ports and protocol; the async reader
/// wakes up on a new event.
#[test]
fn counters_and_events_match_attempts() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let f = t.attach(&EgressPolicy::allow_all());
    let mut reader = f.event_reader().expect("events");
    std::thread::sleep(SETTLE);
    reader.drain();
    let before = f.counters().expect("counters");

    let mut floor_ports = BTreeSet::new();
    for _ in 0..5 {
        floor_ports.insert(t.udp(v4(META4, 53), b"meta"));
    }
    let mut quic_ports = BTreeSet::new();
    for _ in 0..3 {
        quic_ports.insert(t.udp(v6(PUB6, 443), b"quic"));
    }
    for _ in 0..2 {
        t.udp(v4(GW4, 8053), b"gw");
    }
    for _ in 0..4 {
        t.udp(v4(PUB4, CANARY_UDP), b"ok");
    }
    assert!(wait_until(Duration::from_secs(3), || t
        .canary
        .datagrams()
        .len()
        >= 4));
    let events = drain_after(&mut reader, SETTLE);
    let d = delta(&f, &before);
    assert_eq!(d.get(Reason::DropFloor), 5, "{d:?}");
    assert_eq!(d.get(Reason::DropQuic), 3, "{d:?}");
    assert_eq!(d.get(Reason::DropGatewayPort), 2, "{d:?}");
    assert_eq!(d.get(Reason::PassPublic), 4, "{d:?}");
    assert_eq!(d.events_lost, 0);

    let floor = events_for(&events, Reason::DropFloor, IpAddr::V4(META4));
    assert_eq!(floor.len(), 5, "{events:?}");
    assert!(floor
        .iter()
        .all(|e| e.proto == 17 && e.dport == 53 && e.src == Some(IpAddr::V4(GUEST4))));
    assert_eq!(
        floor.iter().map(|e| e.sport).collect::<BTreeSet<_>>(),
        floor_ports
    );
    let quic = events_for(&events, Reason::DropQuic, IpAddr::V6(PUB6));
    assert_eq!(
        quic.iter().map(|e| e.sport).collect::<BTreeSet<_>>(),
        quic_ports
    );
    assert_eq!(
        events_for(&events, Reason::DropGatewayPort, IpAddr::V4(GW4)).len(),
        2
    );
    assert_eq!(Reason::DropFloor.as_str(), "drop_floor");

    // The tokio reader wakes up for a new event.
    let got = tollgate_tests::privileged::block_on_fresh(async {
        let mut reader = reader.into_async().expect("register with tokio");
        let send = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            t.udp(v4(META4, 4242), b"async");
        };
        let recv = async {
            loop {
                let e = reader.next().await.expect("event");
                if e.dport == 4242 {
                    return e;
                }
            }
        };
        let (_, e) =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(send, recv) })
                .await
                .expect("event within 5 s");
        e
    });
    assert_eq!(
        (got.reason, got.dst),
        (Reason::DropFloor, Some(IpAddr::V4(META4)))
    );
}

/// Flipping between two policies (each with its own floor) while the sandbox
/// sends: a destination neither allows never reaches the canary, while both
/// policies were live (each one's allowed destination arrived).
///
/// A: allow-all, floor also holds 198.51.100.0/24.  B: custom, allow_cidrs
/// 198.51.100.10/32, platform floor. 198.51.100.12 is allowed by neither, but
/// by A's mode combined with B's floor.
#[test]
fn policy_updates_are_atomic() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let floor_a = Topo::floor().with_floor([net("198.51.100.0/24")]);
    let policy_a = EgressPolicy::allow_all();
    let floor_b = Topo::floor();
    let policy_b = EgressPolicy::new(Mode::Custom).with_allow([net("198.51.100.10/32")]);
    let mut f = t.attach_with(&t.net(), &floor_a, &policy_a);

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU32::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        spawn_in_ns(&t.sbx, move || {
            let s = UdpSocket::bind(v4(Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            for i in 0..200_000u32 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let _ = s.send_to(b"x", v4(PUB4_C, 7200)); // neither
                let _ = s.send_to(b"b", v4(PUB4, 7201)); // B only
                let _ = s.send_to(b"a", v4(PUB4_D, 7202)); // A only
                sent.store(i + 1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    };
    let started = Instant::now();
    let mut flips = 0;
    while flips < 200 && started.elapsed() < Duration::from_secs(30) {
        let (floor, policy) = if flips % 2 == 0 {
            (&floor_b, &policy_b)
        } else {
            (&floor_a, &policy_a)
        };
        f.replace(floor, policy).expect("replace");
        flips += 1;
    }
    stop.store(true, Ordering::SeqCst);
    sender.join().expect("sender");
    std::thread::sleep(SETTLE);

    let sent = sent.load(Ordering::SeqCst);
    let leaked = t.canary.count(|p| p.dst == IpAddr::V4(PUB4_C));
    let only_a = t.canary.count(|p| p.dst == IpAddr::V4(PUB4_D));
    let only_b = t.canary.count(|p| p.dst == IpAddr::V4(PUB4));
    eprintln!("{flips} flips, {sent} rounds: A-only {only_a}, B-only {only_b}, neither {leaked}");
    assert!(sent > 100, "the sender barely ran");
    assert_eq!(
        leaked, 0,
        "a packet allowed by neither policy reached the canary"
    );
    assert!(
        only_a > 0 && only_b > 0,
        "both policies must have been live"
    );
    // Nothing is left of the inactive generation.
    assert_eq!(f.policy(), &policy_a.clone());
}

/// Pins keep enforcing after the Filter is dropped (daemon exit);
/// open_pinned reads the live policy back and updates it; detach removes
/// every pin and the program, after which the topology forwards unfiltered.
#[test]
fn pinned_filter_survives_restart_and_detaches() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let policy = EgressPolicy::new(Mode::Custom).with_allow([net("198.51.100.10/32")]);
    let f = t.attach(&policy);
    let counted = f.counters().expect("counters");

    // The sandbox's own pins, and the shared program and maps it is a slot of.
    let slot = f.slot();
    drop(f); // the daemon exits
    for name in ["link", "lookup_link"] {
        assert!(t.pin_dir.join(name).exists(), "{name} is pinned");
    }
    // The slot marker: tg_slot_<slot>_<epoch>_<instance>.
    let marker: Vec<String> = std::fs::read_dir(&t.pin_dir)
        .expect("pin dir")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("tg_slot_{slot}_")))
        .collect();
    assert_eq!(marker.len(), 1, "{marker:?}");
    assert!(marker[0].ends_with(&format!("_{}", tollgate_ebpf::instance())));
    let shared = Path::new(PIN_TEST_ROOT).join(format!("_shared-{}", tollgate_ebpf::instance()));
    for name in [
        "prog",
        "lookup_prog",
        "tg_tw_slot",
        "tg_owner",
        "tg_net",
        "tg_active",
        "tg_floor_v4",
        "tg_allow_v6",
        "tg_listeners",
        "tg_events",
    ] {
        assert!(shared.join(name).exists(), "shared {name} is pinned");
    }
    assert_eq!(t.ingress_programs(), ["tg_egress"]);
    t.udp(v4(PUB4, 7301), b"allowed");
    t.udp(v4(PUB4_B, 7302), b"denied");
    assert!(wait_until(Duration::from_secs(3), || t
        .canary
        .saw(|p| p.dport == 7301)));
    std::thread::sleep(SETTLE);
    assert!(
        !t.canary.saw(|p| p.dport == 7302),
        "enforcement stopped without the daemon"
    );

    let mut f = Filter::open_pinned(&t.pin_dir).expect("open pinned");
    assert_eq!(f.policy(), &policy);
    assert_eq!(f.net(), &t.net());
    assert!(f.floor().floor.contains(&net("169.254.0.0/16")));
    let c = f.counters().expect("counters");
    assert!(
        c.get(Reason::PassCidr) > counted.get(Reason::PassCidr),
        "counters survive: {c:?}"
    );
    assert!(matches!(
        Filter::attach(
            &t.pin_dir,
            &ns_path(&t.rtr),
            "tgs0",
            &t.net(),
            &Topo::floor(),
            &policy
        ),
        Err(tollgate_ebpf::EbpfError::AlreadyAttached(_))
    ));

    f.set_policy(&EgressPolicy::new(Mode::Custom).with_allow([net("198.51.100.11/32")]))
        .expect("update after reopen");
    t.udp(v4(PUB4, 7303), b"now denied");
    t.udp(v4(PUB4_B, 7304), b"now allowed");
    assert!(wait_until(Duration::from_secs(3), || t
        .canary
        .saw(|p| p.dport == 7304)));
    std::thread::sleep(SETTLE);
    assert!(!t.canary.saw(|p| p.dport == 7303));

    f.detach().expect("detach");
    assert!(!t.pin_dir.exists(), "pins left behind");
    assert!(t.ingress_programs().is_empty(), "program still attached");
    // The last slot's release takes the shared pins (tests run one at a time).
    assert!(!shared.exists(), "shared pins left behind");
    assert!(matches!(
        Filter::open_pinned(&t.pin_dir),
        Err(tollgate_ebpf::EbpfError::Missing { .. })
    ));
    Filter::remove(&t.pin_dir).expect("remove is idempotent");
    // Without the program this topology forwards everything (no backup chain).
    t.udp(v4(PUB4, 443), b"unfiltered");
    assert!(wait_until(Duration::from_secs(3), || t
        .canary
        .saw(|p| p.dport == 443)));
}

/// With the router's backup forward chain (accept only mark 0x2), forwarded
/// verdicts carry the mark; after detach nothing is forwarded at all.
#[test]
fn forwarded_packets_carry_the_mark_the_backup_chain_needs() {
    require_root();
    let _g = serial();
    let t = Topo::new(true);
    let mut f = t.attach(&EgressPolicy::allow_all().with_allow([net("10.99.0.10/32")]));
    t.udp(v4(PUB4, CANARY_UDP), b"pass_public");
    t.udp(v6(PUB6, CANARY_UDP), b"pass_public6");
    t.udp(v4(PRIV4, CANARY_UDP), b"pass_cidr");
    let mut s = t
        .connect(v4(PRIV4, CANARY_TCP))
        .expect("TCP to an allow_cidr through the backup chain");
    let mut buf = [0u8; 6];
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s.read_exact(&mut buf).expect("canary greets");
    assert!(wait_until(Duration::from_secs(3), || t
        .canary
        .datagrams()
        .len()
        >= 3));
    f.clear_listeners().expect("clear");
    f.detach().expect("detach");
    t.udp(v4(PUB4, CANARY_UDP), b"unmarked");
    std::thread::sleep(SETTLE);
    assert!(
        !t.canary.datagrams().iter().any(|(_, p)| p == b"unmarked"),
        "the backup chain must drop unmarked packets"
    );
}

/// Every test cleans up: no namespace, pin or program of a dropped topology
/// remains.
#[test]
fn cleanup_leaves_nothing_behind() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let f = t.attach(&EgressPolicy::allow_all());
    drop(f);
    let (names, pin_dir) = (
        [t.sbx.clone(), t.rtr.clone(), t.up.clone()],
        t.pin_dir.clone(),
    );
    assert!(pin_dir.join("link").exists());
    drop(t);
    for n in &names {
        assert!(!ns_path(n).exists(), "namespace {n} left behind");
    }
    assert!(!pin_dir.exists(), "pins left behind");
}

/// TCP 80 on the gateway (the host's CA endpoint) is delivered locally, v4
/// and v6, in every mode — deny-all included: it is the host's own service,
/// not egress. It is never steered to the proxy. UDP 80 and other TCP ports
/// on the gateway are still dropped, and nothing reaches the upstream.
#[test]
fn tcp_80_to_the_gateway_passes_locally_in_every_mode() {
    require_root();
    let _g = serial();
    let t = Topo::new(true);
    let mut f = t.attach(&EgressPolicy::deny_all());
    // The proxy's listeners are registered: port 80 must still not reach them.
    let (l4, l6) = t.proxy_listeners();
    f.set_listeners(l4.as_fd(), Some(l6.as_fd()))
        .expect("register listeners");
    let (ca4, ca6) = in_ns(&t.rtr, || {
        let a = TcpListener::bind(v4(GW4, 80)).expect("bind gateway:80 v4");
        let b = TcpListener::bind(v6(GW6, 80)).expect("bind gateway:80 v6");
        (a, b)
    });
    for mode in [Mode::DenyAll, Mode::Custom, Mode::AllowAll] {
        f.set_policy(&EgressPolicy::new(mode)).expect("policy");
        let before = f.counters().expect("counters");
        let mut reader = f.event_reader().expect("events");
        reader.drain();
        for (listener, dst) in [(&ca4, v4(GW4, 80)), (&ca6, v6(GW6, 80))] {
            let mut c = t
                .connect(dst)
                .unwrap_or_else(|e| panic!("{mode:?}: TCP to {dst}: {e}"));
            c.write_all(b"GET /ca.pem HTTP/1.0\r\n\r\n").expect("write");
            let (mut s, peer) = listener.accept().expect("accept");
            assert_eq!(peer, c.local_addr().expect("local"), "{mode:?}");
            assert_eq!(s.local_addr().expect("local"), dst, "{mode:?}");
            // Read the request first: closing with unread data is a reset.
            let mut request = [0u8; 64];
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let n = s.read(&mut request).expect("read request");
            assert!(request[..n].starts_with(b"GET /ca.pem"), "{mode:?}");
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\npem").expect("reply");
            drop(s);
            let mut reply = String::new();
            c.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            c.read_to_string(&mut reply).expect("read reply");
            assert!(reply.ends_with("pem"), "{mode:?}: {reply:?}");
        }
        // Still dropped: UDP 80 and TCP 8080 on the gateway.
        t.udp(v4(GW4, 80), b"udp80");
        assert!(
            t.connect(v4(GW4, HOST_TCP)).is_err(),
            "{mode:?}: TCP 8080 on the gateway must fail"
        );
        let events = drain_after(&mut reader, SETTLE);
        let d = delta(&f, &before);
        // SYN, ACK, data, FIN... of two connections
        assert!(d.get(Reason::PassLocal) >= 2 * 3, "{mode:?}: {d:?}");
        assert_eq!(d.get(Reason::Steered), 0, "{mode:?}: {d:?}");
        assert_eq!(d.get(Reason::DropDenyAll), 0, "{mode:?}: {d:?}");
        assert!(d.get(Reason::DropGatewayPort) >= 2, "{mode:?}: {d:?}");
        let gw = events_for(&events, Reason::DropGatewayPort, IpAddr::V4(GW4));
        assert!(gw.iter().any(|e| e.proto == 17 && e.dport == 80), "{gw:?}");
        assert!(gw.iter().all(|e| e.dport != 80 || e.proto != 6), "{gw:?}");
    }
    for l in [&l4, &l6] {
        l.set_nonblocking(true).expect("nonblocking");
        assert!(l.accept().is_err(), "the proxy got a gateway connection");
    }
    assert!(
        !t.canary.saw(from_sandbox),
        "the upstream saw sandbox traffic: {:?}",
        t.canary.packets()
    );
    assert!(t.host.accepted().is_empty(), "{:?}", t.host.accepted());
}

/// DNS to the sandbox's own resolver (the gateway) passes over UDP and TCP,
/// v4 and v6, in allow-all and custom; other gateway ports do not.
#[test]
fn dns_to_the_gateway_passes_in_allow_all_and_custom() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let mut f = t.attach(&EgressPolicy::allow_all());
    let (udp4, udp6, tcp4, tcp6) = in_ns(&t.rtr, || {
        let u4 = UdpSocket::bind(v4(GW4, 53)).expect("bind udp4 53");
        let u6 = UdpSocket::bind(v6(GW6, 53)).expect("bind udp6 53");
        let t4 = TcpListener::bind(v4(GW4, 53)).expect("bind tcp4 53");
        let t6 = TcpListener::bind(v6(GW6, 53)).expect("bind tcp6 53");
        (u4, u6, t4, t6)
    });
    for s in [&udp4, &udp6] {
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
    }
    for mode in [Mode::AllowAll, Mode::Custom] {
        f.set_policy(&EgressPolicy::new(mode)).expect("policy");
        let before = f.counters().expect("counters");
        t.udp(v4(GW4, 53), b"q4");
        t.udp(v6(GW6, 53), b"q6");
        let mut buf = [0u8; 16];
        let (n, from) = udp4.recv_from(&mut buf).expect("UDP DNS v4");
        assert_eq!((&buf[..n], from.ip()), (&b"q4"[..], IpAddr::V4(GUEST4)));
        let (n, from) = udp6.recv_from(&mut buf).expect("UDP DNS v6");
        assert_eq!((&buf[..n], from.ip()), (&b"q6"[..], IpAddr::V6(GUEST6)));
        let c4 = t.connect(v4(GW4, 53)).expect("TCP DNS v4 connects");
        let c6 = t.connect(v6(GW6, 53)).expect("TCP DNS v6 connects");
        let (_, p4) = tcp4.accept().expect("accept v4");
        let (_, p6) = tcp6.accept().expect("accept v6");
        assert_eq!(
            (p4, p6),
            (c4.local_addr().expect("a"), c6.local_addr().expect("a"))
        );
        t.udp(v6(GW6, 123), b"ntp");
        let d = delta(&f, &before);
        // 2 datagrams + SYN and ACK of each handshake
        assert!(d.get(Reason::PassLocal) >= 2 + 2 * 2, "{mode:?}: {d:?}");
        assert_eq!(d.get(Reason::DropGatewayPort), 1, "{mode:?}: {d:?}");
        assert_eq!(
            d.get(Reason::Steered),
            0,
            "{mode:?}: DNS to the gateway is not steered"
        );
    }
}

/// A new connection that reuses the 4-tuple of one the proxy closed first
/// (its socket is in TIME_WAIT) still reaches the listener: a SYN that hits a
/// TIME_WAIT socket is assigned to the listener, not to the TIME_WAIT socket.
#[test]
fn reconnect_over_a_time_wait_socket_reaches_the_listener() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let mut f = t.attach(&EgressPolicy::allow_all());
    let (l4, l6) = t.proxy_listeners();
    f.set_listeners(l4.as_fd(), Some(l6.as_fd()))
        .expect("listeners");
    let dst = v4(PUB4_B, 443);
    let client_port = 45123;
    let connect_from_port = || {
        in_ns(&t.sbx, move || {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
            s.set_reuse_address(true).expect("reuse");
            s.bind(&SockAddr::from(v4(GUEST4, client_port)))
                .expect("bind client port");
            s.connect_timeout(&SockAddr::from(dst), Duration::from_secs(2))
                .map(|()| TcpStream::from(s))
        })
    };

    let mut client = connect_from_port().expect("first connection");
    let (conn, _) = l4.accept().expect("first accept");
    drop(conn); // the proxy closes first: its side ends in TIME_WAIT
    let mut buf = [0u8; 1];
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert_eq!(client.read(&mut buf).expect("EOF"), 0);
    drop(client);
    let tw = wait_until(Duration::from_secs(2), || {
        let out = Command::new("ip")
            .args(["netns", "exec", &t.rtr, "ss", "-Htan", "state", "time-wait"])
            .output()
            .expect("ss");
        String::from_utf8_lossy(&out.stdout).contains("198.51.100.11:443")
    });
    assert!(
        tw,
        "the proxy's side of the first connection should be in TIME_WAIT"
    );

    let mut client = connect_from_port().expect("second connection over TIME_WAIT");
    let (conn, peer) = l4.accept().expect("second accept");
    assert_eq!(peer.as_socket(), Some(v4(GUEST4, client_port)));
    let mut conn: TcpStream = conn.into();
    conn.write_all(b"again").expect("write");
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"again");
}

/// The public handles can move between threads (the control plane keeps
/// them in async tasks).
#[test]
fn handles_are_send() {
    fn send<T: Send>() {}
    send::<Filter>();
    send::<EventReader>();
    send::<tollgate_ebpf::AsyncEventReader>();
}

#[test]
fn a_whole_policy_written_into_fresh_maps_reads_back_and_a_rewrite_leaves_nothing_stale() {
    require_root();
    let floor = FloorSet::platform();
    let big = EgressPolicy::new(Mode::Custom).with_allow(
        (0..5)
            .map(|i| net(&format!("203.0.{i}.0/24")))
            .chain((0..5).map(|i| net(&format!("2001:db8:{i}::/48")))),
    );
    let mut maps = tollgate_ebpf::PolicyMaps::load(&floor).expect("load maps");
    maps.write(&big).expect("write");
    let (read_floor, read_policy) = maps.read().expect("read back");
    // `big` is already normalised (sorted, no host bits): read back as is.
    assert_eq!(read_policy, big);
    let mut want: Vec<IpNet> = floor.floor.clone();
    let mut got: Vec<IpNet> = read_floor.floor.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "every floor prefix is in the maps");
    let mut want: Vec<IpNet> = floor.private.clone();
    let mut got: Vec<IpNet> = read_floor.private.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "every private prefix is in the maps");
    // A smaller policy written over it: no entry of the big one remains.
    let small = EgressPolicy::new(Mode::Custom).with_allow([net("198.51.100.0/24")]);
    maps.write(&small).expect("rewrite");
    let (_, read_policy) = maps.read().expect("read back");
    assert_eq!(
        read_policy.allow_v4,
        vec!["198.51.100.0/24".parse().expect("net")]
    );
    assert!(
        read_policy.allow_v6.is_empty(),
        "{:?}",
        read_policy.allow_v6
    );
}

/// After a restart, `Filter::remove` with nothing but the pin directory finds
/// the router namespace and deletes the TC filter; a filter whose router
/// namespace is gone is removed without error.
#[test]
fn remove_by_pins_alone_deletes_the_tc_filter() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let f = t.attach(&EgressPolicy::deny_all());
    drop(f); // the daemon exits
    assert_eq!(t.ingress_programs(), ["tg_egress"]);
    Filter::remove(&t.pin_dir).expect("remove");
    assert!(t.ingress_programs().is_empty(), "program still attached");
    assert!(!t.pin_dir.exists(), "pins left behind");
    // Without the program this topology forwards everything.
    t.udp(v4(PUB4, 7401), b"unfiltered");
    assert!(wait_until(Duration::from_secs(3), || t
        .canary
        .saw(|p| p.dport == 7401)));

    // The interface goes first (a sandbox torn down while the daemon was
    // away): the filter went with it; remove only unpins.
    let f = t.attach(&EgressPolicy::deny_all());
    drop(f);
    ip(&t.rtr, "link del tgs0");
    Filter::remove(&t.pin_dir).expect("remove after the link is gone");
    assert!(!t.pin_dir.exists(), "pins left behind");
}

/// Pins lost while the interface lived on (or an attach interrupted after
/// the filter went in): a new attach replaces the leftover filter instead of
/// failing, and exactly one filter enforces the new policy.
#[test]
fn attach_replaces_a_leftover_filter_without_pins() {
    require_root();
    let _g = serial();
    let t = Topo::new(false);
    let f = t.attach(&EgressPolicy::deny_all());
    drop(f);
    std::fs::remove_dir_all(&t.pin_dir).expect("lose the pins");
    assert_eq!(t.ingress_programs(), ["tg_egress"], "the leftover enforces");
    let f = t.attach(&EgressPolicy::new(Mode::Custom).with_allow([net("198.51.100.10/32")]));
    assert_eq!(t.ingress_programs(), ["tg_egress"], "one filter, not two");
    t.udp(v4(PUB4, 7501), b"allowed by the new policy");
    assert!(wait_until(Duration::from_secs(3), || t
        .canary
        .saw(|p| p.dport == 7501)));
    f.detach().expect("detach");
    assert!(t.ingress_programs().is_empty());
}

/// Two sandboxes on the one shared program — same guest address, same
/// interface name, different policies — are judged each by its own policy
/// only: each canary sees only what its own policy allows, and each
/// sandbox's counters and events count only its own packets.
#[test]
fn two_sandboxes_on_the_one_program_never_see_each_others_verdicts() {
    require_root();
    let _g = serial();
    let a = Topo::new(false);
    let b = Topo::new(false);
    let fa = a.attach(&EgressPolicy::new(Mode::Custom).with_allow([net("198.51.100.10/32")]));
    let fb = b.attach(&EgressPolicy::new(Mode::Custom).with_allow([net("198.51.100.11/32")]));
    assert_ne!(fa.slot(), fb.slot());
    let (ia, ib) = (a.ingress_ids(), b.ingress_ids());
    assert_eq!(ia.len(), 1, "{ia:?}");
    assert_eq!(ib.len(), 1, "{ib:?}");
    assert_eq!(
        ia[0].1, ib[0].1,
        "one loaded program for both: {ia:?} {ib:?}"
    );
    assert_ne!(
        ia[0].0, ib[0].0,
        "each filter names its own slot: {ia:?} {ib:?}"
    );

    let mut ra = fa.event_reader().expect("events a");
    let mut rb = fb.event_reader().expect("events b");
    std::thread::sleep(SETTLE);
    ra.drain();
    rb.drain();
    let (ca, cb) = (fa.counters().expect("a"), fb.counters().expect("b"));

    // Each sends to both public addresses, 3 times each.
    for _ in 0..3 {
        a.udp(v4(PUB4, 7401), b"a to its own");
        a.udp(v4(PUB4_B, 7402), b"a to b's");
        b.udp(v4(PUB4, 7403), b"b to a's");
        b.udp(v4(PUB4_B, 7404), b"b to its own");
    }
    assert!(wait_until(Duration::from_secs(3), || a
        .canary
        .saw(|p| p.dport == 7401)
        && b.canary.saw(|p| p.dport == 7404)));
    std::thread::sleep(SETTLE);
    assert!(!a.canary.saw(|p| p.dport == 7402), "a passed by b's policy");
    assert!(!b.canary.saw(|p| p.dport == 7403), "b passed by a's policy");

    let (da, db) = (delta(&fa, &ca), delta(&fb, &cb));
    assert_eq!(da.get(Reason::PassCidr), 3, "{da:?}");
    assert_eq!(da.get(Reason::DropNotAllowed), 3, "{da:?}");
    assert_eq!(db.get(Reason::PassCidr), 3, "{db:?}");
    assert_eq!(db.get(Reason::DropNotAllowed), 3, "{db:?}");
    // UDP only: the sandboxes' own IPv6 housekeeping (MLD) is dropped too.
    let udp = |v: Vec<DropEvent>| v.into_iter().filter(|e| e.proto == 17).collect::<Vec<_>>();
    let ea = udp(drain_after(&mut ra, SETTLE));
    let eb = udp(drain_after(&mut rb, SETTLE));
    assert_eq!(
        ea.iter().map(|e| e.dport).collect::<Vec<_>>(),
        [7402, 7402, 7402],
        "{ea:?}"
    );
    assert_eq!(
        eb.iter().map(|e| e.dport).collect::<Vec<_>>(),
        [7403, 7403, 7403],
        "{eb:?}"
    );

    // A policy update of one leaves the other's verdicts alone.
    let mut fa = fa;
    fa.set_policy(&EgressPolicy::new(Mode::Custom).with_allow([net("198.51.100.11/32")]))
        .expect("update a");
    a.udp(v4(PUB4_B, 7405), b"a now allowed");
    b.udp(v4(PUB4, 7406), b"b still denied");
    assert!(wait_until(Duration::from_secs(3), || a
        .canary
        .saw(|p| p.dport == 7405)));
    std::thread::sleep(SETTLE);
    assert!(!b.canary.saw(|p| p.dport == 7406));
    fa.detach().expect("detach a");
    // b keeps enforcing after a is gone.
    b.udp(v4(PUB4, 7407), b"b denied");
    b.udp(v4(PUB4_B, 7408), b"b allowed");
    assert!(wait_until(Duration::from_secs(3), || b
        .canary
        .saw(|p| p.dport == 7408)));
    std::thread::sleep(SETTLE);
    assert!(!b.canary.saw(|p| p.dport == 7407));
    fb.detach().expect("detach b");
}

/// 1,000 attach/detach cycles of one sandbox, beside one that stays, leave
/// no key of the cycled sandbox in the shared maps, and the one that stays
/// keeps its keys and its verdicts.
#[test]
fn a_thousand_attach_detach_cycles_leave_no_key_behind() {
    require_root();
    let _g = serial();
    let stay = Topo::new(false);
    let cycled = Topo::new(false);
    let root = Path::new(PIN_TEST_ROOT);
    let fs = stay.attach(&EgressPolicy::new(Mode::Custom).with_allow([net("198.51.100.10/32")]));
    let before = tollgate_ebpf::shared_keys(root)
        .expect("keys")
        .expect("shared maps exist");
    assert_eq!(before.owners, [fs.slot()]);
    assert_eq!(before.nets, [fs.slot()]);
    let stay_entries = before.trie_entries.clone();
    assert_eq!(
        stay_entries.keys().copied().collect::<Vec<_>>(),
        [fs.slot()]
    );

    let listener = in_ns(&cycled.rtr, || {
        let l = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        l.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
        l.bind(&SockAddr::from(v4(Ipv4Addr::LOCALHOST, 15011)))
            .expect("bind");
        l.listen(16).expect("listen");
        l
    });
    let mut slots = BTreeSet::new();
    for i in 0..1000u32 {
        let policy = EgressPolicy::new(Mode::Custom).with_allow([
            net(&format!("203.0.{}.0/24", i % 250)),
            net("2001:db8::/48"),
        ]);
        let mut f = cycled.attach(&policy);
        slots.insert(f.slot());
        if i % 10 == 0 {
            f.set_listeners(listener.as_fd(), None).expect("listeners");
            f.set_policy(&EgressPolicy::allow_all()).expect("update");
        }
        f.detach().expect("detach");
    }
    assert!(
        slots.len() > 1,
        "slots are reused round the table: {slots:?}"
    );
    let after = tollgate_ebpf::shared_keys(root)
        .expect("keys")
        .expect("shared maps exist");
    assert_eq!(after.owners, [fs.slot()], "{after:?}");
    assert_eq!(after.nets, [fs.slot()], "{after:?}");
    assert_eq!(after.trie_entries, stay_entries, "{after:?}");

    // The sandbox that stayed still judges by its own policy.
    stay.udp(v4(PUB4, 7501), b"allowed");
    stay.udp(v4(PUB4_B, 7502), b"denied");
    assert!(wait_until(Duration::from_secs(3), || stay
        .canary
        .saw(|p| p.dport == 7501)));
    std::thread::sleep(SETTLE);
    assert!(!stay.canary.saw(|p| p.dport == 7502));
    fs.detach().expect("detach");
    assert_eq!(tollgate_ebpf::shared_keys(root).expect("keys"), None);
}
