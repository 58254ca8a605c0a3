//! The kernel tunnel: `bpf/splice.bpf.c`, a stream-verdict program on a
//! sockhash that redirects what one socket of a pair receives to the other
//! socket's egress, so a tunnel's bytes never cross into user space.
//!
//! One [`KernelSplice`] per process: the program is loaded and verified
//! once, at [`KernelSplice::load`], and every tunnel is two map entries per
//! socket ([`KernelSplice::join`] / [`KernelSplice::part`]). Nothing is
//! pinned: the maps live as long as the process, and a socket that closes
//! (also when the process dies) leaves the sockhash by itself, so a killed
//! daemon's spliced connections are closed, not leaked.
//!
//! # Joining without losing or reordering a byte
//!
//! Data that a socket already holds when it joins stays in its receive
//! queue until the next chunk arrives or until [`KernelSplice::join`]
//! "kicks" it (`SO_RCVLOWAT`, which runs the socket's data-ready callback,
//! now the program's), and is then redirected ahead of anything newer. The
//! two sockets join one after the other, the upstream first: a chunk the
//! upstream receives before the downstream has joined finds no peer, and
//! the program marks that end *passing*: this and every later chunk of
//! that socket stay with it for user space, in order, and the caller
//! copies that direction itself ([`SpliceCounts`]).

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};

use crate::abi::SpliceEnd;
use crate::error::EbpfError;
use crate::sys;

/// The compiled kernel-tunnel program.
pub static SPLICE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/splice.bpf.o"));

/// Most sockets in the kernel tunnel at once (`TG_SPLICE_MAX` in the C
/// source): 32,768 tunnels. A join beyond it fails and the caller relays
/// that tunnel with `splice(2)`.
pub const SPLICE_MAX: u32 = 65_536;

/// The program's name in the object.
const PROGRAM: &str = "tg_splice_verdict";
const SOCKS: &str = "tg_splice_socks";
const ENDS: &str = "tg_splice_ends";

/// The two sockets of one kernel tunnel, by cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SplicePair {
    /// The downstream (sandbox) socket's cookie.
    pub down: u64,
    /// The upstream socket's cookie.
    pub up: u64,
}

/// What the program did for one pair so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceCounts {
    /// Bytes the downstream socket received and the program redirected to
    /// the upstream.
    pub down_to_up: u64,
    /// Bytes the upstream socket received and the program redirected to the
    /// downstream.
    pub up_to_down: u64,
    /// The downstream end passes its data to user space (see the module
    /// docs): the caller copies downstream → upstream.
    pub down_passing: bool,
    /// The upstream end passes its data to user space.
    pub up_passing: bool,
    /// Chunks (verdicts) redirected, both directions.
    pub chunks: u64,
    /// Bytes the program left to user space (passing ends), both
    /// directions.
    pub passed: u64,
}

/// Send and acknowledgement progress of a TCP socket (`TCP_INFO`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpBytes {
    /// `tcpi_bytes_received`: payload bytes received in order.
    pub received: u64,
    /// `tcpi_bytes_acked`: payload bytes sent and acknowledged by the peer.
    pub acked: u64,
    /// `SIOCOUTQ`, read after `acked`: bytes in the send queue not yet
    /// acknowledged. `acked + queued` never exceeds what was written.
    pub queued: u64,
}

struct Maps {
    socks: SockHash<MapData, u64>,
    ends: HashMap<MapData, u64, SpliceEnd>,
    /// Pairs joined and not yet parted (for [`KernelSplice::len`]).
    live: HashSet<SplicePair>,
}

/// The loaded kernel-tunnel program and its maps.
pub struct KernelSplice {
    maps: Mutex<Maps>,
    /// Every upstream end joins passing ([`KernelSplice::load_copying_upstream`]).
    upstream_passing: bool,
    /// Bytes left to user space by pairs parted so far.
    passed: AtomicU64,
    /// Keeps the program loaded and attached to the sockhash.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for KernelSplice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSplice").finish_non_exhaustive()
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { map, source }
}

fn prog_err(step: &'static str) -> impl Fn(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program {
        step: step.to_owned(),
        source,
    }
}

// === impl KernelSplice ===

impl KernelSplice {
    /// Loads and verifies the program and attaches it to a new sockhash as
    /// its stream verdict. Fails where the kernel has no sockmap support or
    /// the caller lacks `CAP_BPF` / `CAP_NET_ADMIN`.
    pub fn load() -> Result<Self, EbpfError> {
        Self::load_with(false)
    }

    /// [`KernelSplice::load`] where every upstream end joins *passing*: the
    /// program leaves the upstream's data to user space and the caller
    /// copies that direction, as it does when a chunk comes before the
    /// downstream has joined. For tests of that path, which a race makes
    /// rare otherwise.
    pub fn load_copying_upstream() -> Result<Self, EbpfError> {
        Self::load_with(true)
    }

    fn load_with(upstream_passing: bool) -> Result<Self, EbpfError> {
        let mut ebpf = EbpfLoader::new().load(SPLICE_OBJECT)?;
        let socks: SockHash<MapData, u64> =
            SockHash::try_from(ebpf.take_map(SOCKS).ok_or_else(|| EbpfError::Missing {
                what: SOCKS.to_owned(),
            })?)
            .map_err(map_err(SOCKS))?;
        let ends: HashMap<MapData, u64, SpliceEnd> =
            HashMap::try_from(ebpf.take_map(ENDS).ok_or_else(|| EbpfError::Missing {
                what: ENDS.to_owned(),
            })?)
            .map_err(map_err(ENDS))?;
        let prog: &mut SkSkb = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| EbpfError::Missing {
                what: PROGRAM.to_owned(),
            })?
            .try_into()
            .map_err(prog_err("sk_skb program type"))?;
        prog.load().map_err(prog_err("load sk_skb verdict"))?;
        let sock_fd = socks.fd().try_clone().map_err(|e| EbpfError::Io {
            what: "duplicating the sockhash descriptor".to_owned(),
            source: e,
        })?;
        prog.attach(&sock_fd)
            .map_err(prog_err("attach sk_skb verdict"))?;
        Ok(Self {
            maps: Mutex::new(Maps {
                socks,
                ends,
                live: HashSet::new(),
            }),
            upstream_passing,
            passed: AtomicU64::new(0),
            _ebpf: ebpf,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts a connected pair into the kernel tunnel: from now on what either
    /// socket receives goes to the other one's egress. Both must be
    /// connected TCP sockets; neither may have a read pending in user space.
    /// On failure nothing of the pair is left in the maps.
    pub fn join(&self, down: BorrowedFd<'_>, up: BorrowedFd<'_>) -> Result<SplicePair, EbpfError> {
        let io_err = |what: &str| {
            let what = what.to_owned();
            move |source| EbpfError::Io { what, source }
        };
        let pair = SplicePair {
            down: sys::socket_cookie(down).map_err(io_err("SO_COOKIE of the downstream"))?,
            up: sys::socket_cookie(up).map_err(io_err("SO_COOKIE of the upstream"))?,
        };
        let mut maps = self.lock();
        let joined = (|| {
            maps.ends
                .insert(pair.down, SpliceEnd::to(pair.up), 0)
                .map_err(map_err(ENDS))?;
            let mut up_end = SpliceEnd::to(pair.down);
            up_end.passing = u32::from(self.upstream_passing);
            maps.ends
                .insert(pair.up, up_end, 0)
                .map_err(map_err(ENDS))?;
            maps.socks
                .insert(pair.up, up.as_raw_fd(), 0)
                .map_err(map_err(SOCKS))?;
            maps.socks
                .insert(pair.down, down.as_raw_fd(), 0)
                .map_err(map_err(SOCKS))?;
            Ok(())
        })();
        if let Err(e) = joined {
            remove(&mut maps, pair);
            return Err(e);
        }
        maps.live.insert(pair);
        drop(maps);
        // Data that arrived before the join: hand it to the program now.
        for fd in [up, down] {
            if let Err(e) = sys::kick_rcvlowat(fd) {
                let _ = self.part(pair);
                return Err(io_err("SO_RCVLOWAT (kick)")(e));
            }
        }
        Ok(pair)
    }

    /// The program's counts for `pair`.
    pub fn counts(&self, pair: SplicePair) -> Result<SpliceCounts, EbpfError> {
        let maps = self.lock();
        read_counts(&maps, pair)
    }

    /// Takes the pair out of the kernel tunnel (the sockets stay open) and
    /// returns the final counts. Parting a pair twice is not an error.
    pub fn part(&self, pair: SplicePair) -> Result<SpliceCounts, EbpfError> {
        let mut maps = self.lock();
        // Sockets first: no verdict runs for them afterwards.
        for key in [pair.down, pair.up] {
            let _ = maps.socks.remove(&key);
        }
        let counts = read_counts(&maps, pair).unwrap_or_default();
        for key in [pair.down, pair.up] {
            let _ = maps.ends.remove(&key);
        }
        if maps.live.remove(&pair) {
            self.passed.fetch_add(counts.passed, Ordering::Relaxed);
        }
        Ok(counts)
    }

    /// Bytes the program left to user space, over every pair parted so far.
    pub fn passed_total(&self) -> u64 {
        self.passed.load(Ordering::Relaxed)
    }

    /// Pairs joined and not parted.
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    /// No pair is joined.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries in the program's two maps (sockets, ends), read from the
    /// kernel: what tests check is zero once every pair is parted.
    pub fn kernel_entries(&self) -> (usize, usize) {
        let maps = self.lock();
        (maps.socks.keys().count(), maps.ends.keys().count())
    }
}

/// `TCP_INFO` byte progress of a TCP socket.
pub fn tcp_bytes(fd: BorrowedFd<'_>) -> io::Result<TcpBytes> {
    let (received, acked, queued) = sys::tcp_bytes(fd)?;
    Ok(TcpBytes {
        received,
        acked,
        queued,
    })
}

fn read_counts(maps: &Maps, pair: SplicePair) -> Result<SpliceCounts, EbpfError> {
    let down = maps.ends.get(&pair.down, 0).map_err(map_err(ENDS))?;
    let up = maps.ends.get(&pair.up, 0).map_err(map_err(ENDS))?;
    Ok(SpliceCounts {
        down_to_up: down.bytes,
        up_to_down: up.bytes,
        down_passing: down.passing != 0,
        up_passing: up.passing != 0,
        chunks: down.chunks + up.chunks,
        passed: down.passed + up.passed,
    })
}

fn remove(maps: &mut Maps, pair: SplicePair) {
    for key in [pair.down, pair.up] {
        let _ = maps.socks.remove(&key);
        let _ = maps.ends.remove(&key);
    }
}
