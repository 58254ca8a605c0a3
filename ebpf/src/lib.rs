//! tollgate's eBPF layer: a TC ingress program (a `cls_bpf` filter) on the guest-facing
//! interface of each sandbox's router namespace. It enforces the floor and
//! `allow_cidrs`, steers TCP to the sandbox's proxy with `bpf_sk_assign`,
//! and counts and reports every drop.
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
//! (`tg_config[gen]`), the floor and private prefixes and allow_cidrs (LPM
//! keys `{prefixlen, gen, addr}` whose prefix length counts the 32
//! generation bits) — exists in two generations, and `tg_active[0]` names the
//! live one. The program reads `tg_active` once per packet and does every
//! lookup with that value, so a packet is judged by one generation only. An
//! update ([`Filter::set_policy`], [`Filter::set_floor`], [`Filter::replace`]):
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
mod policy;
mod splice;
mod sys;
mod verdict;

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
