//! The zero-copy pump: socket → pipe → socket with `splice(2)`.
//!
//! The pipe is filled only when it is empty and then drained completely, so
//! an `EAGAIN` from the filling splice always means "the source socket has
//! nothing" and one from the draining splice "the destination socket is
//! full": tokio's readiness for the right socket is cleared in each case
//! (`try_io`), and the pump sleeps until that socket is ready again.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;

use super::{retry, Pump, PumpError};

/// Most bytes asked for per splice; the kernel moves at most what the pipe
/// holds.
const SPLICE_LEN: usize = 1 << 20;

/// Capacity asked for each pipe (`F_SETPIPE_SZ`). 256 KiB cut the relay
/// thread's CPU per GiB by ~20% against the 64 KiB default (0.26 vs 0.33
/// s/GiB, loopback, one relay thread); the `tunnel` bench reports the
/// proxy's CPU per GiB for both copy modes. Pipe pages are only pinned
/// while data is in flight.
const PIPE_SIZE: i32 = 256 * 1024;

/// How a splice pump ended.
pub(super) enum Spliced {
    /// End-of-stream on the source; everything was written.
    Done,
    /// The kernel cannot splice these descriptors (or no pipe could be
    /// made); nothing has moved yet, so the caller copies instead.
    Unsupported,
}

/// A pipe used as the in-kernel buffer of one direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Best effort: a pipe over the user's page budget keeps its default
        // size and still works.
        let _ = fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Self { read, write })
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// One splice call as an `io::Result`, for `try_io`.
fn splice_once(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    splice(from, None, to, None, len, flags()).map_err(io::Error::from)
}

/// Moves `pump.src` to `pump.dst` through a pipe until end-of-stream.
pub(super) async fn pump(pump: &Pump<'_>) -> Result<Spliced, PumpError> {
    let Ok(pipe) = Pipe::new() else {
        return Ok(Spliced::Unsupported);
    };
    let mut first = true;
    loop {
        // Fill: the pipe is empty here.
        let n = loop {
            pump.src.readable().await.map_err(PumpError::Read)?;
            let res = pump.src.try_io(Interest::READABLE, || {
                splice_once(pump.src, &pipe.write, SPLICE_LEN)
            });
            match res {
                Ok(n) => break n,
                Err(e) if retry(&e) => continue,
                Err(e) if first && e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                    return Ok(Spliced::Unsupported);
                }
                Err(e) => return Err(PumpError::Read(e)),
            }
        };
        first = false;
        if n == 0 {
            return Ok(Spliced::Done);
        }
        pump.activity.touch();
        // Drain: everything in the pipe goes to the destination.
        let mut left = n;
        while left > 0 {
            pump.dst.writable().await.map_err(PumpError::Write)?;
            let res = pump.dst.try_io(Interest::WRITABLE, || {
                splice_once(&pipe.read, pump.dst, left)
            });
            match res {
                Ok(0) => {
                    return Err(PumpError::Write(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice wrote nothing",
                    )))
                }
                Ok(w) => {
                    left -= w.min(left);
                    pump.moved.fetch_add(w as u64, Ordering::Relaxed);
                    pump.activity.touch();
                }
                Err(e) if retry(&e) => continue,
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
    }
}
