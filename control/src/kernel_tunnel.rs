//! The proxy's kernel tunnel ([`tollgate_proxy::tunnel::kernel`]) on
//! `tollgate-ebpf`'s [`KernelSplice`]: one program, loaded and verified once
//! per process.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use tollgate_ebpf::{EbpfError, KernelSplice, SpliceCounts, SplicePair};
use tollgate_proxy::tunnel::kernel::{KernelCounts, KernelPair, KernelTunnel, TcpProgress};

/// [`KernelTunnel`] backed by the sockhash program.
#[derive(Debug)]
pub struct EbpfTunnel {
    splice: KernelSplice,
}

impl EbpfTunnel {
    /// Loads the program (needs `CAP_BPF` + `CAP_NET_ADMIN`).
    pub fn load() -> Result<Arc<Self>, EbpfError> {
        Ok(Arc::new(Self {
            splice: KernelSplice::load()?,
        }))
    }

    /// [`EbpfTunnel::load`] whose upstream → downstream direction is always
    /// copied in user space ([`KernelSplice::load_copying_upstream`]): tests.
    pub fn load_copying_upstream() -> Result<Arc<Self>, EbpfError> {
        Ok(Arc::new(Self {
            splice: KernelSplice::load_copying_upstream()?,
        }))
    }

    /// Pairs joined now.
    pub fn joined(&self) -> usize {
        self.splice.len()
    }

    /// Bytes the program left to user space (passing ends) over every pair
    /// parted so far.
    pub fn passed_total(&self) -> u64 {
        self.splice.passed_total()
    }

    /// Entries in the kernel maps (sockets, ends).
    pub fn kernel_entries(&self) -> (usize, usize) {
        self.splice.kernel_entries()
    }
}

fn io_err(e: EbpfError) -> io::Error {
    match e {
        EbpfError::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

fn counts(c: SpliceCounts) -> KernelCounts {
    KernelCounts {
        down_to_up: c.down_to_up,
        up_to_down: c.up_to_down,
        down_passing: c.down_passing,
        up_passing: c.up_passing,
    }
}

fn pair(p: KernelPair) -> SplicePair {
    SplicePair {
        down: p.down,
        up: p.up,
    }
}

impl KernelTunnel for EbpfTunnel {
    fn join(&self, down: BorrowedFd<'_>, up: BorrowedFd<'_>) -> io::Result<KernelPair> {
        let p = self.splice.join(down, up).map_err(io_err)?;
        Ok(KernelPair {
            down: p.down,
            up: p.up,
        })
    }

    fn counts(&self, p: KernelPair) -> io::Result<KernelCounts> {
        self.splice.counts(pair(p)).map(counts).map_err(io_err)
    }

    fn part(&self, p: KernelPair) -> KernelCounts {
        self.splice.part(pair(p)).map(counts).unwrap_or_default()
    }

    fn progress(&self, fd: BorrowedFd<'_>) -> io::Result<TcpProgress> {
        let b = tollgate_ebpf::tcp_bytes(fd)?;
        Ok(TcpProgress {
            received: b.received,
            written: b.acked + b.queued,
        })
    }
}
