//! tollgate's eBPF layer: a TC ingress program (TCX) on the guest-facing
//! interface of each sandbox's router namespace. It enforces the floor and
//! `allow_cidrs`, steers TCP to the sandbox's proxy with `bpf_sk_assign`,
//! and counts and reports every drop.
//!
//! - [`Filter`]: attach / reopen after a restart / update / detach.
//! - [`SandboxNet`], [`EgressPolicy`], [`FloorSet`]: what it enforces.
//! - [`Counters`], [`DropEvent`], [`EventReader`]: what it saw.
//! - [`abi`]: the mirror of `bpf/tollgate.h`.
//!
//! The program (`bpf/egress.bpf.c`) is compiled by `build.rs` when clang and
//! the libbpf headers are present, else the committed `bpf/egress.bpf.o` is
//! used; `ebpf/check-object` verifies the two agree.
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
#[allow(unsafe_code)]
mod sys;
mod verdict;

use std::path::Path;

pub use error::EbpfError;
pub use events::{AsyncEventReader, EventReader};
pub use filter::{tcx_ingress_programs, Filter, LINK_PIN, PROG_PIN};
pub use policy::{EgressPolicy, FloorSet, Mode, SandboxNet};
pub use verdict::{Counters, DropEvent, Reason};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Directory under bpffs that holds one pin directory per sandbox.
pub const PIN_ROOT: &str = "/sys/fs/bpf/tollgate";

/// The compiled program (see the crate docs for where it comes from).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress.bpf.o"));

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
