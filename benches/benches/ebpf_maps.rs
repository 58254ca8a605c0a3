//! Micro benchmarks of writing a policy into the eBPF maps (root), with
//! criterion, named with their parameters:
//!
//! * `ebpf_policy_write/fresh_maps/floor_platform+cidrs10`: clear and write
//!   the platform floor and a policy at the API's limit (10 `allow_cidrs`,
//!   5 IPv4 + 5 IPv6) into maps no program reads — the map work of an attach;
//! * `ebpf_policy_update/attached_filter/cidrs10`: `Filter::set_policy` on a
//!   filter attached to a veth — the live update, including the RCU grace
//!   period it waits for so that no packet is judged by a mix of the two
//!   policies.
//!
//! Each checks what it wrote before it measures.
//! `sudo -E env "PATH=$PATH" cargo bench -p tollgate-benches --bench ebpf_maps`

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use ipnet::IpNet;
use tollgate_benches::{ip_batch, require_root, Pins, GATEWAY, GUEST};
use tollgate_ebpf::{EgressPolicy, Filter, FloorSet, Mode, PolicyMaps, SandboxNet};

/// 10 CIDRs (the API's limit), given offset `k` so two policies differ.
fn policy(k: u8) -> EgressPolicy {
    let nets: Vec<IpNet> = (0..5u8)
        .map(|i| format!("203.{k}.{i}.0/24"))
        .chain((0..5u8).map(|i| format!("2001:db8:{k}:{i}::/64")))
        .map(|s| s.parse().expect("net"))
        .collect();
    EgressPolicy::new(Mode::Custom).with_allow(nets)
}

fn bench_fresh(c: &mut Criterion) {
    require_root();
    let floor = FloorSet::platform();
    let mut maps = PolicyMaps::load(&floor).expect("load the maps");
    let p = policy(1);
    maps.write(&p).expect("write");
    let (_, back) = maps.read().expect("read back");
    assert_eq!(back, p, "the maps hold the policy written");
    c.bench_function("ebpf_policy_write/fresh_maps/floor_platform+cidrs10", |b| {
        b.iter(|| maps.write(&p).expect("write"))
    });
}

/// One namespace with a veth pair; removed on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        ip_batch(&format!("netns del {}\n", self.0));
    }
}

fn bench_update(c: &mut Criterion) {
    require_root();
    tollgate_ebpf::ensure_bpffs().expect("bpffs");
    let ns = Netns(format!("tgb-maps-{}", std::process::id()));
    ip_batch(&format!(
        "netns add {0}\nlink add tgm0 netns {0} type veth peer name tgm1 netns {0}\n",
        ns.0
    ));
    let root = PathBuf::from(format!(
        "{}/bench-maps-{}",
        tollgate_ebpf::PIN_ROOT,
        std::process::id()
    ));
    let _pins = Pins(root.clone());
    let (a, b) = (policy(1), policy(2));
    let mut f = Filter::attach(
        &root.join("f"),
        &PathBuf::from(format!("/run/netns/{}", ns.0)),
        "tgm0",
        &SandboxNet::v4(GUEST, GATEWAY),
        &FloorSet::platform(),
        &a,
    )
    .expect("attach");
    f.set_policy(&b).expect("update");
    let reopened = Filter::open_pinned(&root.join("f")).expect("reopen");
    assert_eq!(reopened.policy(), &b, "the live maps hold the new policy");
    let mut flip = false;
    c.bench_function("ebpf_policy_update/attached_filter/cidrs10", |bench| {
        bench.iter(|| {
            flip = !flip;
            f.set_policy(if flip { &a } else { &b }).expect("update")
        })
    });
    f.detach().expect("detach");
}

criterion_group! {
    name = ebpf_maps;
    config = tollgate_benches::criterion_config(20);
    targets = bench_fresh, bench_update
}
criterion_main!(ebpf_maps);
