//! Pieces shared by the proxy benches (`tunnel`, `intercept`): tokio
//! runtimes whose threads' CPU time is read apart, the proxy's event
//! counter, policies, a loopback listener, TLS material and the driver of
//! interleaved rounds.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tollgate_proxy::policy::{CompiledPolicy, Floor, NetworkPolicy};
use tollgate_proxy::proxy::{ProxyEvents, SandboxProxy};

use crate::median;

/// Errors of client tasks.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

// === the proxy's view: events ===

/// Counts what the proxy refused or failed, keeping the last reason, so a
/// failing client can say why.
#[derive(Default)]
pub struct Events {
    denied: AtomicUsize,
    failed: AtomicUsize,
    last: Mutex<Option<String>>,
}

impl Events {
    fn note(&self, what: &str, name: Option<&str>, dst: SocketAddr, reason: &str) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some(format!("{what} {reason} (name {name:?}, dst {dst})"));
        }
    }

    /// Refusals and failures so far, with the last reason.
    pub fn describe(&self) -> String {
        format!(
            "proxy: {} denied, {} upstream failures, last: {}",
            self.denied.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.last
                .lock()
                .ok()
                .and_then(|l| l.clone())
                .unwrap_or_else(|| "none".into())
        )
    }
}

impl ProxyEvents for Events {
    fn denied(&self, name: Option<&str>, dst: SocketAddr, reason: &str) {
        self.denied.fetch_add(1, Ordering::Relaxed);
        self.note("denied", name, dst, reason);
    }
    fn tunneled(&self, _: Option<&str>, _: SocketAddr, _: SocketAddr) {}
    fn upstream_failed(&self, name: Option<&str>, dst: SocketAddr, reason: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.note("upstream failed", name, dst, reason);
    }
}

// === CPU of each runtime ===

/// Which runtime a thread belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The clients (the sandbox's side).
    Client,
    /// The origin server.
    Origin,
    /// The proxy.
    Proxy,
}

/// The thread ids of the runtimes, to read their CPU time apart.
#[derive(Clone, Default)]
pub struct Threads(Arc<Mutex<Vec<(Role, i32)>>>);

/// Nanoseconds each thread has run, by thread id.
pub type CpuSnapshot = HashMap<i32, (Role, u64)>;

/// CPU consumed so far: every registered thread's, and the process's.
pub struct CpuMark {
    threads: CpuSnapshot,
    process: f64,
    machine: f64,
}

/// One measured run: wall seconds and CPU seconds spent meanwhile (the
/// whole process, and each runtime's threads).
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Wall time of the run.
    pub secs: f64,
    /// CPU of the whole process (every thread, kernel work included).
    pub process_cpu: f64,
    /// CPU of the clients' runtime threads.
    pub client_cpu: f64,
    /// CPU of the origin's runtime threads.
    pub origin_cpu: f64,
    /// CPU of the proxy's runtime threads.
    pub proxy_cpu: f64,
    /// CPU of the whole machine (every CPU's busy time, `/proc/stat`):
    /// also kernel work done outside the process (workqueues, softirqs on
    /// idle CPUs), e.g. the kernel tunnel's redirects.
    pub machine_cpu: f64,
}

impl Sample {
    /// Machine CPU spent outside this process (kernel workers, other load).
    pub fn outside_cpu(&self) -> f64 {
        (self.machine_cpu - self.process_cpu).max(0.0)
    }
}

impl Threads {
    /// Records the calling thread as one of `role`'s.
    pub fn register(&self, role: Role) {
        if let Ok(mut t) = self.0.lock() {
            t.push((role, nix::unistd::gettid().as_raw()));
        }
    }

    /// CPU time of every registered thread now
    /// (`/proc/self/task/<tid>/schedstat`).
    pub fn snapshot(&self) -> CpuSnapshot {
        let tids = self.0.lock().map(|t| t.clone()).unwrap_or_default();
        tids.into_iter()
            .filter_map(|(role, tid)| {
                let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
                Some((tid, (role, s.split_whitespace().next()?.parse().ok()?)))
            })
            .collect()
    }

    /// Seconds `role`'s threads ran since `before`.
    pub fn since(now: &CpuSnapshot, before: &CpuSnapshot, role: Role) -> f64 {
        let ns: u64 = now
            .iter()
            .filter(|(_, (r, _))| *r == role)
            .map(|(tid, (_, ns))| ns.saturating_sub(before.get(tid).map_or(0, |b| b.1)))
            .sum();
        ns as f64 / 1e9
    }

    /// The CPU consumed so far, to measure a run from.
    pub fn mark(&self) -> CpuMark {
        CpuMark {
            threads: self.snapshot(),
            process: process_cpu(),
            machine: machine_cpu(),
        }
    }

    /// A run of `secs` wall seconds with the CPU consumed since `mark`.
    pub fn sample(&self, mark: &CpuMark, secs: f64) -> Sample {
        let process_cpu = process_cpu() - mark.process;
        let now = self.snapshot();
        Sample {
            secs,
            process_cpu,
            client_cpu: Self::since(&now, &mark.threads, Role::Client),
            origin_cpu: Self::since(&now, &mark.threads, Role::Origin),
            proxy_cpu: Self::since(&now, &mark.threads, Role::Proxy),
            machine_cpu: machine_cpu() - mark.machine,
        }
    }
}

/// Busy CPU seconds of the whole machine since boot: user, nice, system,
/// irq, softirq and steal of the `cpu` line of `/proc/stat` (clock ticks).
pub fn machine_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .enumerate()
                // user nice system idle iowait irq softirq steal
                .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6 | 7))
                .filter_map(|(_, v)| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks as f64 / hz
}

/// CPU seconds the whole process has run (every thread, exited ones too).
pub fn process_cpu() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .expect("CLOCK_PROCESS_CPUTIME_ID")
}

/// A two-worker runtime whose threads are registered as `role`'s and, with
/// `netns`, live in that network namespace (so do the sockets its tasks
/// make).
pub fn runtime(role: Role, threads: &Threads, netns: Option<String>) -> Runtime {
    let t = threads.clone();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("tg-bench-{role:?}").to_lowercase())
        .on_thread_start(move || {
            if let Some(ns) = &netns {
                let path = format!("/run/netns/{ns}");
                let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            }
            t.register(role);
        })
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs `f` as a task of `rt` (on one of its threads, in its namespace).
pub fn on<T: Send + 'static>(
    rt: &Runtime,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    rt.block_on(rt.spawn(f)).expect("setup task")
}

// === proxy ===

/// Compiles the `network_policy` `v` against `floor`; panics if rejected.
pub fn policy(v: serde_json::Value, floor: Floor) -> Arc<CompiledPolicy> {
    let p = NetworkPolicy::from_json(&v, "network_policy")
        .unwrap_or_else(|e| panic!("bench policy rejected: {e:?}"));
    Arc::new(CompiledPolicy::new(&p, Arc::new(floor)))
}

/// Loopback: a listener whose connections all get original destination
/// `dst` (`handle_with_dst`, no eBPF); returns its address.
pub async fn loopback_listener(proxy: Arc<SandboxProxy>, dst: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind proxy");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            tokio::spawn(Arc::clone(&proxy).handle_with_dst(c, dst));
        }
    });
    addr
}

// === TLS material ===

/// The ring provider every bench TLS configuration uses (no cmake).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An origin's PKI: a CA made here with rcgen and a leaf for some names.
pub struct Pki {
    /// The CA certificate (what clients of the origin trust).
    pub ca: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Pki {
    /// A CA with common name `ca_name` and a leaf for `names`.
    pub fn new(ca_name: &str, names: &[&str]) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("leaf params")
            .signed_by(&leaf_key, &ca)
            .expect("leaf");
        Self {
            ca: CertificateDer::from(ca.der().to_vec()),
            leaf: leaf.der().clone(),
            key: leaf_key.serialize_der(),
        }
    }

    /// A server configuration with the leaf, offering `alpn`, sending no
    /// TLS 1.3 session tickets (clients never resume: tickets would be work
    /// thrown away).
    pub fn server(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.leaf.clone()], key)
            .expect("server config");
        server.send_tls13_tickets = 0;
        server.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(server)
    }
}

/// A client configuration trusting exactly `root`, offering `alpn`, with
/// session resumption off (every new connection is a full handshake).
pub fn client_config(root: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("root");
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();
    client.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(client)
}

// === interleaved rounds ===

/// A path as printed in progress lines.
pub trait Tag {
    /// Short name: `direct`, `tunnel/splice`, `intercept`…
    fn tag(&self) -> String;
}

/// Samples of each of `paths` (the first is the baseline), interleaved
/// over `rounds`: the order rotates every round so no path always runs
/// first. Prints each round (prefixed `bench:`) with every path's ratio to
/// that round's baseline by `metric` (higher is better), and at the end
/// the median of those paired ratios, a cross-check of the figures less
/// exposed to background load that changes between rounds; that line also
/// goes to `notes`.
#[allow(clippy::too_many_arguments)]
pub fn interleaved<P, S>(
    bench: &str,
    notes: &mut Vec<String>,
    rounds: usize,
    label: &str,
    paths: &[P],
    mut run: impl FnMut(P) -> S,
    metric: impl Fn(&S) -> f64,
    show: impl Fn(&S) -> String,
) -> HashMap<P, Vec<S>>
where
    P: Copy + Eq + Hash + Tag,
{
    let mut out: HashMap<P, Vec<S>> = HashMap::new();
    let mut paired: HashMap<P, Vec<f64>> = HashMap::new();
    for r in 0..rounds {
        let mut line = Vec::new();
        for i in 0..paths.len() {
            let p = paths[(r + i) % paths.len()];
            let s = run(p);
            let shown = show(&s);
            let m = metric(&s);
            line.push((paths.iter().position(|x| *x == p).unwrap_or(0), p, m, shown));
            out.entry(p).or_default().push(s);
        }
        line.sort_by_key(|(i, _, _, _)| *i);
        let base = line[0].2;
        let shown: Vec<String> = line
            .iter()
            .map(|(i, p, m, s)| {
                if *i == 0 {
                    format!("{} {s}", p.tag())
                } else {
                    let ratio = m / base;
                    paired.entry(*p).or_default().push(ratio);
                    format!("{} {s} = {ratio:.3}x", p.tag())
                }
            })
            .collect();
        eprintln!(
            "{bench}: {label} round {}/{rounds}: {}",
            r + 1,
            shown.join("; ")
        );
    }
    let medians: Vec<String> = paths
        .iter()
        .skip(1)
        .filter_map(|p| {
            Some(format!(
                "{} {:.3}x",
                p.tag(),
                median(paired.get(p)?.clone())
            ))
        })
        .collect();
    let line = format!(
        "{label}: median of per-round ratios: {}",
        medians.join(", ")
    );
    eprintln!("{bench}: {line}");
    notes.push(line);
    out
}

/// The median of `f` over `xs`.
pub fn med<S>(xs: &[S], f: impl Fn(&S) -> f64) -> f64 {
    median(xs.iter().map(f).collect())
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
