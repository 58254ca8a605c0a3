//! tollgate's eBPF layer: a TC ingress program (a `cls_bpf` filter) on the guest-facing
//! interface of each sandbox's router namespace. It enforces the floor and
//! `allow_cidrs`, steers TCP to the sandbox's proxy with `bpf_sk_assign`,
//! and counts and reports every drop.
//!
//! The TC program is loaded and verified once per pin root and instance
//! (the daemon): every sandbox's filter is the same program, and a sandbox is
//! a slot in its shared maps, found per packet from the cookie of the router
//! namespace the packet arrived in. Attaching a sandbox is map writes, one
//! small sk_lookup program and a `cls_bpf` filter add; detaching deletes its
//! keys (see [`shared_keys`]).
//!
//! - [`Filter`]: attach / reopen after a restart / update / detach.
//! - [`SandboxNet`], [`EgressPolicy`], [`FloorSet`]: what it enforces.
//! - [`Counters`], [`DropEvent`], [`EventReader`]: what it saw.
//! - [`abi`]: the mirror of `bpf/tollgate.h`.
//!
//! Two programs, one per attach point: `bpf/egress.bpf.c` (TC ingress: every
//! verdict) and `bpf/lookup.bpf.c` (sk_lookup in the router namespace: hands
//! the proxy's listener to a SYN that reuses a TIME_WAIT 4-tuple). `build.rs`
//! compiles them when clang and the libbpf headers are present, else the
//! committed `bpf/*.bpf.o` are used; `ebpf/check-object` verifies they agree.
//!
//! # Atomic updates
//!
//! Everything a verdict depends on besides the link's addresses — the mode
//! (`tg_config[slot * 2 + gen]`), the floor and private prefixes and
//! allow_cidrs (LPM keys `{prefixlen, tag, addr}` with `tag = slot * 2 + gen`,
//! whose prefix length counts the 32 tag bits) — exists in two generations
//! per slot, and `tg_active[slot]` names the live one. The program reads it
//! once per packet and does every lookup with that value, so a packet is
//! judged by one generation only. An update ([`Filter::set_policy`],
//! [`Filter::set_floor`], [`Filter::replace`]), which touches its own slot's
//! keys only:
//!
//! 1. deletes whatever the inactive generation holds (leftovers of an update
//!    that was interrupted), then writes the new floor, allow_cidrs and mode
//!    into it. No packet reads it: `tg_active` names the other one.
//! 2. flips `tg_active` with one 4-byte array update. Packets that read it
//!    afterwards see only the complete new generation.
//! 3. waits until no packet that read the old value is still being judged:
//!    updating the map-in-map `tg_sync` makes the kernel wait for an RCU
//!    grace period (`maybe_wait_bpf_programs`), and TC programs run inside an
//!    RCU read-side section.
//! 4. deletes the old generation and zeroes its mode (a stray flip back to it
//!    would fail closed with `drop_no_config`).
//!
//! So every packet is judged entirely by the old or entirely by the new
//! floor + policy: nothing that neither allows can pass, whatever the
//! interleaving. Floor and policy changing together must use
//! [`Filter::replace`] (two calls would expose new floor + old policy).
//! Writers are serialised by `&mut self`; one process owns a filter.
//!
//! The router namespace needs, besides the filter: `ip rule add fwmark
//! 0x1/0x1 lookup 100` with `ip route add local 0.0.0.0/0 dev lo table 100`
//! (and the `-6` pair) so steered packets are delivered locally, listeners with
//! `IP_TRANSPARENT`, and a forward chain that accepts only packets marked
//! [`abi::MARK_FORWARD`] from the sandbox's link (the backup).

pub mod abi;
mod error;
mod events;
mod filter;
mod maps;
mod netlink;
mod policy;
mod shared;
mod splice;
mod sys;
mod verdict;

use std::collections::BTreeMap;
use std::path::Path;

pub use error::EbpfError;
pub use events::{AsyncEventReader, EventReader};
pub use filter::{
    Filter, LINK_PIN, LOOKUP_LINK_PIN, LOOKUP_PROG_PIN, PROG_PIN, TC_HANDLE, TC_PRIORITY,
};
pub use maps::PolicyMaps;
pub use policy::{EgressPolicy, FloorSet, Mode, SandboxNet};
pub use splice::{
    tcp_bytes, KernelSplice, SpliceCounts, SplicePair, TcpBytes, SPLICE_MAX, SPLICE_OBJECT,
};
pub use verdict::{Counters, DropEvent, Reason};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Directory under bpffs that holds one pin directory per sandbox.
pub const PIN_ROOT: &str = "/sys/fs/bpf/tollgate";

/// The compiled TC program (see the crate docs for where it comes from).
pub static EGRESS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress.bpf.o"));

/// The compiled sk_lookup program.
pub static LOOKUP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lookup.bpf.o"));

/// Mounts bpffs at [`BPFFS`] unless a bpffs is already mounted there.
pub fn ensure_bpffs() -> Result<(), EbpfError> {
    let path = Path::new(BPFFS);
    if is_bpffs(path) {
        return Ok(());
    }
    let mount_err = |source| EbpfError::MountBpffs {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path)
        .map_err(|e| mount_err(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    match nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    ) {
        Ok(()) => Ok(()),
        // Lost a race with another caller that mounted it meanwhile.
        Err(_) if is_bpffs(path) => Ok(()),
        Err(e) => Err(mount_err(e)),
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Names the daemon instance whose shared program later attaches use
/// (default: `pid<pid>`, one per process). A daemon passes a name that is
/// stable across its restarts (e.g. derived from its state directory), so a
/// restart reopens the same shared program and maps; two daemons on one
/// host use different names and never consume each other's events.
/// 1-64 characters of `[A-Za-z0-9_-]`.
pub fn set_instance(name: &str) -> Result<(), EbpfError> {
    shared::set_instance(name)
}

/// The instance name attaches use now.
pub fn instance() -> String {
    shared::instance()
}

/// What the shared maps of this instance under a pin root hold: every key
/// a slot leaves behind if its sandbox's detach forgot one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedKeys {
    /// Claimed slots (`tg_owner`).
    pub owners: Vec<u32>,
    /// Slots with a link (`tg_net` with an ABI version; a free slot keeps
    /// only its epoch).
    pub nets: Vec<u32>,
    /// Trie entries per slot (all four tries, both generations).
    pub trie_entries: BTreeMap<u32, usize>,
    /// Packets the program dropped because no slot claimed them.
    pub unclaimed_packets: u64,
}

/// The keys of this process's instance's shared maps under `root`, or None
/// when there are none (no sandbox holds a slot: the pins are gone).
pub fn shared_keys(root: &Path) -> Result<Option<SharedKeys>, EbpfError> {
    let dir = root.join(format!("{}{}", shared::SHARED_PREFIX, instance()));
    if !dir.exists() {
        return Ok(None);
    }
    let t = maps::Tables::open_pinned(&dir)?;
    let mut keys = SharedKeys {
        owners: t.owners()?.into_iter().map(|(s, _)| s).collect(),
        unclaimed_packets: t.unclaimed()?,
        ..SharedKeys::default()
    };
    keys.owners.sort_unstable();
    for slot in 0..abi::SLOTS {
        if t.read_net(slot)?.abi_version != 0 {
            keys.nets.push(slot);
        }
    }
    for (tag, e) in t.scan()? {
        let n = e.floor.v4.len() + e.floor.v6.len() + e.allow_v4.len() + e.allow_v6.len();
        *keys.trie_entries.entry(tag / abi::GENERATIONS).or_default() += n;
    }
    Ok(Some(keys))
}
