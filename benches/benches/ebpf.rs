//! eBPF layer benches (root):
//!
//! * (g) scale, at 1, 100 and 1,000 sandboxes (1 and 100 quick): attach and
//!   detach time per sandbox (p50, p99; every sandbox is a slot of the one
//!   loaded program, so an attach is map writes, a netns link and a filter
//!   add), the kernel memory each attached filter adds (the `memlock` the
//!   kernel accounts, from fdinfo), and a load on one sandbox while the
//!   others idle — TCP throughput through that sandbox's filter with the
//!   others attached, against the same path with none attached, measured
//!   just before;
//! * the kernel memory per sandbox at the eBPF layer's policy limits (256
//!   IPv4 + 256 IPv6 allow prefixes, the platform floor): what its slot's
//!   entries add, plus its share (1 / slots) of the shared maps;
//! * TCP throughput sandbox → host through the program (allow_cidrs pass and
//!   proxy steering) against the same path without it, in the same run.
//!
//! To try it: `sudo -E env "PATH=$PATH" cargo bench -p tollgate-benches --bench ebpf`
//! (`TOLLGATE_BENCH_QUICK=1` for a shorter run).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tollgate_benches::{
    in_netns, ip_batch, median, ms, percentile, print_summary, quick, require_root, rounds,
    write_report, Figure, Pair, Pins, Target, GATEWAY, GUEST, SINK, STEERED_DST,
};
use tollgate_ebpf::{EgressPolicy, Filter, FloorSet, Mode, SandboxNet};

fn snet() -> SandboxNet {
    SandboxNet::v4(GUEST, GATEWAY)
}

fn policy_with_sink() -> EgressPolicy {
    EgressPolicy {
        mode: Mode::Custom,
        allow_v4: vec!["198.51.100.0/24".parse().expect("net")],
        allow_v6: vec![],
    }
}

fn pin_root() -> PathBuf {
    PathBuf::from(format!(
        "{}/bench-{}",
        tollgate_ebpf::PIN_ROOT,
        std::process::id()
    ))
}

/// Namespaces `tgb-<pid>-<i>` each holding a veth pair `tgb<i>` / `tgp<i>`.
struct Fleet {
    names: Vec<String>,
}

impl Fleet {
    fn new(n: usize) -> Self {
        let names: Vec<String> = (0..n)
            .map(|i| format!("tgb-{}-{i}", std::process::id()))
            .collect();
        let mut script = String::new();
        for ns in &names {
            script.push_str(&format!("netns add {ns}\n"));
        }
        ip_batch(&script);
        let mut script = String::new();
        for (i, ns) in names.iter().enumerate() {
            script.push_str(&format!(
                "link add tgb{i} netns {ns} type veth peer name tgp{i} netns {ns}\n"
            ));
        }
        ip_batch(&script);
        Self { names }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let mut script = String::new();
        for ns in &self.names {
            script.push_str(&format!("netns del {ns}\n"));
        }
        ip_batch(&script);
    }
}

/// Kernel memory of the eBPF maps and programs this process holds a
/// descriptor of, KiB: the `memlock` the kernel accounts for each (from
/// `/proc/self/fdinfo`), each map or program counted once.
fn bpf_memlock_kib() -> f64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return f64::NAN;
    };
    for e in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        let id = field("map_id:")
            .map(|v| format!("map {v}"))
            .or_else(|| field("prog_id:").map(|v| format!("prog {v}")));
        if let (Some(id), Some(bytes)) = (id, field("memlock:").and_then(|v| v.parse::<u64>().ok()))
        {
            if seen.insert(id) {
                total += bytes;
            }
        }
    }
    total as f64 / 1024.0
}

/// Attach and detach samples taken at least, at every scale (a fleet of 1
/// is attached and detached this many times).
const MIN_SAMPLES: usize = 20;

/// The sink of the loaded sandbox in the scale runs.
const SCALE_SINK_PORT: u16 = 5002;

/// What one scale step measured.
struct Scale {
    attach_ms: Vec<f64>,
    detach_ms: Vec<f64>,
    /// eBPF memory (maps and programs held) per attached filter, KiB.
    kernel_kib_per_filter: f64,
    /// One sandbox's TCP throughput with the others idle / with none, MiB/s.
    loaded: f64,
    alone: f64,
}

/// Attaches `n` filters (idle sandboxes), loads one more sandbox (`pair`,
/// its filter attached) before and while they are attached, then detaches
/// them one by one; below [`MIN_SAMPLES`] filters, attaches and detaches
/// them again until there are that many samples.
fn scale(n: usize, pair: &Pair, sink: &TcpListener) -> Scale {
    let fleet = Fleet::new(n);
    let root = pin_root();
    let _pins = Pins(root.clone());
    let floor = FloorSet::platform();
    let bytes = 256 << 20;
    let rounds = rounds(3, 5);
    let dst = SocketAddr::from((SINK, SCALE_SINK_PORT));
    let loaded_filter = Filter::attach(
        &root.join("loaded"),
        &PathBuf::from(format!("/run/netns/{}", pair.r)),
        "tgs0",
        &snet(),
        &floor,
        &policy_with_sink(),
    )
    .expect("attach the loaded sandbox's filter");
    // One stream to warm the path (routes, neighbour, page cache of the
    // socket buffers) before the rounds that count.
    stream(pair, sink, dst, bytes);
    let alone: Vec<f64> = (0..rounds)
        .map(|_| stream(pair, sink, dst, bytes))
        .collect();

    let mem0 = bpf_memlock_kib();
    let (mut mem1, mut loaded) = (mem0, Vec::new());
    let mut attach = Vec::with_capacity(n);
    let mut detach = Vec::with_capacity(n);
    // Small fleets attach and detach again, for enough samples.
    for cycle in 0..(MIN_SAMPLES / n).max(1) {
        let mut filters = Vec::with_capacity(n);
        for (i, ns) in fleet.names.iter().enumerate() {
            let t = Instant::now();
            let f = Filter::attach(
                &root.join(ns),
                &PathBuf::from(format!("/run/netns/{ns}")),
                &format!("tgb{i}"),
                &snet(),
                &floor,
                &policy_with_sink(),
            )
            .expect("attach");
            attach.push(ms(t.elapsed()));
            filters.push(f);
        }
        if cycle == 0 {
            mem1 = bpf_memlock_kib();
            loaded = (0..rounds)
                .map(|_| stream(pair, sink, dst, bytes))
                .collect();
        }
        for f in filters {
            let t = Instant::now();
            f.detach().expect("detach");
            detach.push(ms(t.elapsed()));
        }
    }
    loaded_filter
        .detach()
        .expect("detach the loaded sandbox's filter");
    let mib = |v: Vec<f64>| median(v) / (1 << 20) as f64;
    Scale {
        attach_ms: attach,
        detach_ms: detach,
        kernel_kib_per_filter: (mem1 - mem0) / n as f64,
        loaded: mib(loaded),
        alone: mib(alone),
    }
}

/// Bytes/s of one TCP stream of `bytes` from the sandbox to `dst`, received
/// by `listener` in the router namespace.
fn stream(pair: &Pair, listener: &TcpListener, dst: SocketAddr, bytes: usize) -> f64 {
    let phase = dst;
    let l = listener.try_clone().expect("clone listener");
    let sink = std::thread::spawn(move || {
        // Bounded: a connection that lands elsewhere fails the bench.
        l.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut c = loop {
            match l.accept() {
                Ok((c, _)) => break c,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("no connection reached the sink for {phase}: {e}"),
            }
        };
        c.set_nonblocking(false).expect("blocking");
        c.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        total
    });
    let t = in_netns(&pair.s, move || {
        let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("connect");
        c.set_write_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        c.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let chunk = vec![7u8; 1 << 16];
        let start = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            c.write_all(&chunk).expect("write");
            sent += chunk.len();
        }
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut b = [0u8; 1];
        let _ = c.read(&mut b);
        start.elapsed()
    });
    let got = sink.join().expect("sink");
    assert!(got >= bytes, "sink got {got} of {bytes} bytes");
    bytes as f64 / t.as_secs_f64()
}

fn throughput(pair: &Pair) -> Vec<Figure> {
    let bytes = if quick() { 128 << 20 } else { 512 << 20 };
    let rounds = rounds(3, 5);
    // The sink (plain) and the proxy's transparent listener, both in the router.
    let sink = in_netns(&pair.h, || {
        TcpListener::bind((SINK, 5001)).expect("bind sink")
    });
    let proxy = in_netns(&pair.r, || {
        let s = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 15001)).expect("bind proxy");
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpTransparent, &true)
            .expect("IP_TRANSPARENT");
        s
    });
    let proxy6 = in_netns(&pair.r, || {
        let s = std::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, 15002))
            .expect("bind proxy v6");
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpTransparent, &true)
            .expect("IP_TRANSPARENT");
        s
    });
    let root = pin_root();
    let _pins = Pins(root.clone());
    let mut direct = Vec::new();
    let mut pass = Vec::new();
    let mut steered = Vec::new();
    for round in 0..rounds {
        if std::env::var("TOLLGATE_BENCH_TRACE").is_ok() {
            eprintln!("round {round}");
        }
        direct.push(stream(pair, &sink, SocketAddr::from((SINK, 5001)), bytes));
        let mut f = Filter::attach(
            &root.join("pair"),
            &PathBuf::from(format!("/run/netns/{}", pair.r)),
            "tgs0",
            &snet(),
            &FloorSet::platform(),
            &policy_with_sink(),
        )
        .expect("attach");
        f.set_listeners(proxy.as_fd(), Some(proxy6.as_fd()))
            .expect("listeners");
        if std::env::var("TOLLGATE_BENCH_TRACE").is_ok() {
            eprintln!("round {round}: pass");
        }
        pass.push(stream(pair, &sink, SocketAddr::from((SINK, 5001)), bytes));
        steered.push(stream(
            pair,
            &proxy,
            SocketAddr::from((STEERED_DST, 443)),
            bytes,
        ));
        f.detach().expect("detach");
    }
    let mib = |v: Vec<f64>| median(v) / (1 << 20) as f64;
    let d = mib(direct);
    vec![
        Figure {
            name: "tcp_throughput_sandbox_to_host_allow_cidr_pass".into(),
            value: mib(pass),
            baseline: Some(d),
            unit: "MiB/s",
            target: Target::MinRatio(0.95),
        },
        Figure {
            name: "tcp_throughput_sandbox_to_proxy_listener_steered".into(),
            value: mib(steered),
            baseline: Some(d),
            unit: "MiB/s",
            target: Target::MinRatio(0.95),
        },
    ]
}

/// A policy at the eBPF layer's limits: 256 IPv4 and 256 IPv6 prefixes.
fn policy_at_limits() -> EgressPolicy {
    EgressPolicy {
        mode: Mode::Custom,
        allow_v4: (0..256u32)
            .map(|i| format!("198.18.{i}.0/24").parse().expect("net"))
            .collect(),
        allow_v6: (0..256u32)
            .map(|i| format!("2001:db8:{i:x}::/48").parse().expect("net"))
            .collect(),
    }
}

/// Kernel memory per sandbox with its policy at the limits: the memlock
/// that `n` such sandboxes add beyond one already attached (their slots'
/// trie entries; the shared maps exist already), per sandbox, plus the
/// sandbox's share of everything the shared object holds (measured as what
/// the first attach added, less one sandbox's entries, over the slots).
fn memory_at_limits() -> Figure {
    let n = if quick() { 10 } else { 50 };
    let fleet = Fleet::new(n + 1);
    let root = pin_root();
    let _pins = Pins(root.clone());
    let (floor, policy) = (FloorSet::platform(), policy_at_limits());
    let attach = |i: usize| {
        let ns = &fleet.names[i];
        Filter::attach(
            &root.join(ns),
            &PathBuf::from(format!("/run/netns/{ns}")),
            &format!("tgb{i}"),
            &snet(),
            &floor,
            &policy,
        )
        .expect("attach at the limits")
    };
    let empty = bpf_memlock_kib();
    let first = attach(0);
    let with_shared = bpf_memlock_kib();
    let filters: Vec<Filter> = (1..=n).map(attach).collect();
    let per_sandbox = (bpf_memlock_kib() - with_shared) / n as f64;
    let shared = (with_shared - empty - per_sandbox).max(0.0);
    eprintln!(
        "ebpf: shared object {shared:.0} KiB for {} slots; one sandbox's entries at the limits {per_sandbox:.1} KiB",
        tollgate_ebpf::abi::SLOTS
    );
    for f in filters {
        f.detach().expect("detach");
    }
    first.detach().expect("detach");
    Figure {
        name: "ebpf_kernel_memory_per_sandbox_at_policy_limits (entries + share of shared maps)"
            .into(),
        value: per_sandbox + shared / f64::from(tollgate_ebpf::abi::SLOTS),
        baseline: None,
        unit: "KiB",
        target: Target::MaxValue(64.0),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    require_root();
    tollgate_ebpf::ensure_bpffs().expect("bpffs");
    let pair = Pair::new();
    let sink = in_netns(&pair.h, || {
        TcpListener::bind((SINK, SCALE_SINK_PORT)).expect("bind the scale sink")
    });
    let mut figures = Vec::new();
    let scales: &[usize] = if quick() { &[1, 100] } else { &[1, 100, 1000] };
    for &n in scales {
        eprintln!("ebpf: attach + detach with {n} sandboxes, one loaded ...");
        let s = scale(n, &pair, &sink);
        for (what, v) in [("attach", &s.attach_ms), ("detach", &s.detach_ms)] {
            for p in [50.0, 99.0] {
                figures.push(Figure {
                    name: format!("ebpf_{what}_x{n}_p{p}"),
                    value: percentile(v.clone(), p),
                    baseline: None,
                    unit: "ms",
                    target: Target::MaxValue(match (what, p as u32) {
                        ("attach", 50) => 1.0,
                        ("attach", _) => 2.0,
                        (_, 99) => 1.0,
                        _ => 5.0,
                    }),
                });
            }
        }
        figures.push(Figure {
            name: format!("ebpf_map_memory_per_attached_filter_x{n} (kernel memlock)"),
            value: s.kernel_kib_per_filter,
            baseline: None,
            unit: "KiB",
            target: Target::Report,
        });
        figures.push(Figure {
            name: format!(
                "ebpf_one_sandbox_tcp_throughput_with_{n}_idle_attached (direct: none attached)"
            ),
            value: s.loaded,
            baseline: Some(s.alone),
            unit: "MiB/s",
            target: Target::MinRatio(0.95),
        });
    }
    eprintln!("ebpf: kernel memory per sandbox at the policy limits ...");
    figures.push(memory_at_limits());
    eprintln!("ebpf: TCP throughput with and without the program ...");
    figures.extend(throughput(&pair));
    let title = "eBPF layer (ratios against the same path without the program, same run)";
    print_summary(title, &figures);
    write_report("ebpf", title, &figures, &[]);
}
