//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// What went wrong in the eBPF layer. Every variant names the step that
/// failed; none is meant to be matched on by its text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EbpfError {
    /// bpffs is not mounted at `/sys/fs/bpf` and mounting it failed.
    #[error("cannot mount bpffs at {path}: {source}")]
    MountBpffs {
        /// The mount point.
        path: PathBuf,
        /// The mount(2) error.
        source: nix::Error,
    },
    /// The compiled object could not be parsed or its maps created.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// The verifier or the kernel refused the program, or attaching it failed.
    #[error("{step}: {source}")]
    Program {
        /// Which step (`load`, `attach to tgs0`, ...).
        step: String,
        /// aya's error (includes the verifier log for `load`).
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        /// The map's name (`tg_floor_v4`, ...).
        map: &'static str,
        /// aya's error.
        source: aya::maps::MapError,
    },
    /// A map, program or link is missing from the object or from the pins.
    #[error("{what} is missing")]
    Missing {
        /// The object's name or pin path.
        what: String,
    },
    /// Pinning an object under the pin directory failed.
    #[error("pinning {path}: {source}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// aya's error.
        source: aya::pin::PinError,
    },
    /// Opening a pinned link failed.
    #[error("pinned link {path}: {source}")]
    Link {
        /// The pin path.
        path: PathBuf,
        /// aya's error.
        source: aya::programs::links::LinkError,
    },
    /// The pin directory already holds an attached filter.
    #[error("{0} already holds an attached filter (open_pinned or remove it first)")]
    AlreadyAttached(PathBuf),
    /// Every slot of the shared maps is taken.
    #[error("{dir}: all {max} sandbox slots are in use")]
    NoFreeSlot {
        /// The shared object's directory.
        dir: PathBuf,
        /// [`crate::abi::SLOTS`].
        max: u32,
    },
    /// The pinned maps were written by a different ABI version of this crate.
    #[error("pinned maps have ABI version {found}, this build speaks {expected}")]
    AbiMismatch {
        /// Version in the pinned `tg_net`.
        found: u32,
        /// [`crate::abi::ABI_VERSION`].
        expected: u32,
    },
    /// A policy or floor does not fit the maps.
    #[error("{what}: {count} entries, at most {max}")]
    TooManyEntries {
        /// Which list (`allow_v4`, `floor_v6`, ...).
        what: &'static str,
        /// Entries given.
        count: usize,
        /// Capacity.
        max: usize,
    },
    /// The sandbox addresses are inconsistent (e.g. a guest IPv6 address
    /// without a gateway IPv6 address).
    #[error("invalid sandbox network: {0}")]
    InvalidNet(String),
    /// A pinned map holds a value this crate never writes.
    #[error("pinned state is corrupt: {0}")]
    Corrupt(String),
    /// Entering the router network namespace failed.
    #[error("entering network namespace {path}: {source}")]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// The open(2) / setns(2) error.
        source: io::Error,
    },
    /// A filesystem or system call on the pin directory or a descriptor failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
}

impl EbpfError {
    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |source| Self::Map { map, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
