//! The kernel tunnel: after the decision, both sockets of an allowed tunnel
//! join a sockhash whose stream-verdict program redirects what each one
//! receives to the other one's egress ([`KernelTunnel`], implemented on
//! `tollgate-ebpf`'s `KernelSplice`). No byte crosses into user space.
//!
//! The proxy keeps both sockets. They leave tokio's reactor for the
//! tunnel's life (each redirected chunk would otherwise wake it) and are
//! watched on an epoll instance of their own for `EPOLLRDHUP` / `EPOLLHUP` /
//! `EPOLLERR` only, so moving data wakes nobody. On end-of-stream from one
//! side the proxy waits until the program has handed over every byte that
//! side received (`tcpi_bytes_received` = redirected + copied) and the other
//! socket has had them acknowledged (`tcpi_bytes_acked`), then half-closes
//! it with `shutdown(SHUT_WR)`: the FIN follows the last byte, never
//! overtakes it. The idle timeout reads the program's byte counters; the
//! cancel future (a policy change, shutdown) ends it at once.
//!
//! A direction whose end the program marked *passing* (its peer was not in
//! the map when a chunk came: see `KernelSplice`) is copied here, in user
//! space, in order.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{RelayEnd, RelayOptions, RelayStats, TunnelError, COPY_BUF};

/// Sockets joined to a kernel tunnel, by cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelPair {
    /// The downstream (sandbox) socket's cookie.
    pub down: u64,
    /// The upstream socket's cookie.
    pub up: u64,
}

/// What the program moved for one pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// Bytes redirected downstream → upstream.
    pub down_to_up: u64,
    /// Bytes redirected upstream → downstream.
    pub up_to_down: u64,
    /// Downstream's data is left to user space from now on.
    pub down_passing: bool,
    /// Upstream's data is left to user space from now on.
    pub up_passing: bool,
}

/// Byte progress of one TCP socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpProgress {
    /// `tcpi_bytes_received`: received in order (a FIN counts one).
    pub received: u64,
    /// Written into the socket so far, at least: `tcpi_bytes_acked` plus,
    /// read after it, the send queue (`SIOCOUTQ`).
    pub written: u64,
}

/// The kernel side of the kernel tunnel (one per process).
pub trait KernelTunnel: std::fmt::Debug + Send + Sync + 'static {
    /// Joins a connected pair: from now on each socket's data goes to the
    /// other. On error nothing of the pair is left joined.
    fn join(&self, down: BorrowedFd<'_>, up: BorrowedFd<'_>) -> io::Result<KernelPair>;
    /// The program's counts for `pair`.
    fn counts(&self, pair: KernelPair) -> io::Result<KernelCounts>;
    /// Takes the pair out (the sockets stay open); its final counts.
    fn part(&self, pair: KernelPair) -> KernelCounts;
    /// `TCP_INFO` progress of a socket.
    fn progress(&self, fd: BorrowedFd<'_>) -> io::Result<TcpProgress>;
}

/// Tunnels that asked for the kernel tunnel and were relayed with
/// `splice(2)` because the join failed (map full, ...), since start.
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// See [`FALLBACKS`].
pub fn kernel_fallbacks() -> u64 {
    FALLBACKS.load(Ordering::Relaxed)
}

/// How [`relay`] went.
pub enum KernelOutcome {
    /// The pair could not join (map full, ...): the sockets come back
    /// untouched, still on tokio, for a `splice(2)` relay.
    NotJoined {
        /// The downstream socket.
        down: TcpStream,
        /// The upstream socket.
        up: TcpStream,
        /// Why.
        error: io::Error,
    },
    /// The relay ran; both sockets come back (off tokio) for the caller's
    /// resets and closes.
    Relayed {
        /// The downstream socket.
        down: std::net::TcpStream,
        /// The upstream socket.
        up: std::net::TcpStream,
        /// What moved and how it ended, or which side failed.
        result: Result<RelayStats, TunnelError>,
    },
    /// A socket could not leave tokio's reactor; both are closed.
    Failed(TunnelError),
}

/// Index of a side in the relay's arrays (and its epoll token).
const DOWN: usize = 0;
const UP: usize = 1;

/// One direction's state, by source side.
#[derive(Default)]
struct Direction {
    /// End-of-stream read from the source.
    eof: bool,
    /// `shutdown(SHUT_WR)` done on the destination.
    fin_sent: bool,
    /// Copying in user space (the source end is passing).
    copying: bool,
    /// Bytes user space read from the source.
    copied_in: u64,
    /// Bytes user space wrote to the destination.
    copied_out: u64,
    /// Read but not yet written.
    pending: Vec<u8>,
}

/// The relay's own epoll instance, registered with tokio.
struct Watch {
    epoll: Epoll,
}

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.0.as_raw_fd()
    }
}

/// Send buffer of a kernel-tunnelled socket. The program hands each chunk
/// to a work item that sends it on the peer socket; when that socket's send
/// buffer is full the work item retries a scheduler tick later (4 ms at
/// HZ=250), so a send buffer that rarely fills is what keeps the tunnel
/// moving. 4 MiB (the kernel doubles it) is `tcp_wmem`'s default maximum.
/// Quick `tunnel` bench runs (256 MiB, 3 × 3 rounds against the bare relay
/// of the same rounds) put it ahead of autotuning on the netns path
/// (0.86–1.17× vs 0.83–0.87× the bare relay) and even on loopback. The
/// price: a direction whose destination reads slowly can hold up to 8 MiB
/// in that socket's send queue (autotuning: up to 4 MiB), within the
/// kernel's global `tcp_mem` limits like every socket buffer.
const SEND_BUFFER: usize = 4 << 20;

/// [`SEND_BUFFER`]: forced past `net.core.wmem_max` where the proxy may
/// (`CAP_NET_ADMIN`, which loading the program needed anyway), else capped.
fn set_send_buffer(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(s, sockopt::SndBufForce, &SEND_BUFFER).is_err() {
        let _ = setsockopt(s, sockopt::SndBuf, &SEND_BUFFER);
    }
}

/// How often a tunnel checks its counters for the idle timeout.
fn idle_tick(idle: Duration) -> Duration {
    (idle / 8).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// How often a pending half-close re-checks that everything was delivered:
/// first after 1 ms, then backing off to 64 ms while nothing changes.
const DRAIN_TICK: Duration = Duration::from_millis(1);
const DRAIN_TICK_MAX: Duration = Duration::from_millis(64);

/// Relays `down` ↔ `up` through the kernel until both directions are
/// closed, nothing moves for the idle timeout, `cancel` completes, or one
/// side fails.
pub async fn relay<C: Future<Output = ()>>(
    kt: &dyn KernelTunnel,
    down: TcpStream,
    up: TcpStream,
    opts: &RelayOptions,
    cancel: C,
) -> KernelOutcome {
    for s in [&down, &up] {
        set_send_buffer(s);
    }
    let pair = match kt.join(down.as_fd(), up.as_fd()) {
        Ok(p) => p,
        Err(error) => {
            FALLBACKS.fetch_add(1, Ordering::Relaxed);
            return KernelOutcome::NotJoined { down, up, error };
        }
    };
    // Parts the pair on every path, also when this future is dropped
    // (the connection's task aborted, the runtime shutting down).
    let joined = Joined { kt, pair };
    let (down, up) = match (down.into_std(), up.into_std()) {
        (Ok(d), Ok(u)) => (d, u),
        (Err(e), _) => return KernelOutcome::Failed(TunnelError::Downstream(e)),
        (_, Err(e)) => return KernelOutcome::Failed(TunnelError::Upstream(e)),
    };
    let result = run(kt, pair, [&down, &up], opts, cancel).await;
    drop(joined);
    KernelOutcome::Relayed { down, up, result }
}

/// A joined pair, parted when dropped.
struct Joined<'a> {
    kt: &'a dyn KernelTunnel,
    pair: KernelPair,
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        self.kt.part(self.pair);
    }
}

fn side_err(side: usize, e: io::Error) -> TunnelError {
    if side == DOWN {
        TunnelError::Downstream(e)
    } else {
        TunnelError::Upstream(e)
    }
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The relay proper (the pair is joined, the sockets are off tokio).
async fn run<C: Future<Output = ()>>(
    kt: &dyn KernelTunnel,
    pair: KernelPair,
    socks: [&std::net::TcpStream; 2],
    opts: &RelayOptions,
    cancel: C,
) -> Result<RelayStats, TunnelError> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
        .map_err(|e| TunnelError::Downstream(errno(e)))?;
    let base = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
    for (side, s) in socks.iter().enumerate() {
        epoll
            .add(s, EpollEvent::new(base, side as u64))
            .map_err(|e| side_err(side, errno(e)))?;
    }
    // `AsyncFd::new` is deprecated for types that could close or swap their
    // descriptor while registered; `Watch` owns its epoll descriptor, never
    // replaces it, and is dropped (deregistered) with the `AsyncFd`.
    #[allow(deprecated)]
    let watch = AsyncFd::new(Watch { epoll }).map_err(TunnelError::Downstream)?;
    let mut dirs = [Direction::default(), Direction::default()];
    let tick = idle_tick(opts.idle_timeout);
    let mut last_moved = (0u64, 0u64);
    let mut last_activity = Instant::now();
    let mut drain_tick = DRAIN_TICK;
    tokio::pin!(cancel);
    loop {
        let counts = kt.counts(pair).map_err(TunnelError::Downstream)?;
        // Directions the program leaves to user space.
        for (side, passing) in [(DOWN, counts.down_passing), (UP, counts.up_passing)] {
            if passing && !dirs[side].copying {
                dirs[side].copying = true;
                // Its end of stream is now the read that returns 0, after
                // the bytes it holds (an EPOLLRDHUP seen before may have
                // come ahead of them).
                dirs[side].eof = false;
                let interest = base | EpollFlags::EPOLLIN;
                watch
                    .get_ref()
                    .epoll
                    .modify(socks[side], &mut EpollEvent::new(interest, side as u64))
                    .map_err(|e| side_err(side, errno(e)))?;
            }
        }
        for side in [DOWN, UP] {
            if dirs[side].copying {
                let dst_copying = dirs[1 - side].copying;
                copy_some(&mut dirs[side], socks, side, dst_copying, &watch)?;
            }
        }
        // Half-close a direction once everything its source sent is with
        // the destination's peer.
        for side in [DOWN, UP] {
            let d = &dirs[side];
            if d.eof && !d.fin_sent && d.pending.is_empty() {
                let redirected = if side == DOWN {
                    counts.down_to_up
                } else {
                    counts.up_to_down
                };
                let src = kt
                    .progress(socks[side].as_fd())
                    .map_err(|e| side_err(side, e))?;
                let dst = kt
                    .progress(socks[1 - side].as_fd())
                    .map_err(|e| side_err(1 - side, e))?;
                // The FIN counts one in `tcpi_bytes_received`.
                let handed_over = src.received.saturating_sub(1) <= redirected + d.copied_in;
                // In the destination's send queue: a FIN queued now
                // follows them. (Waiting for their acknowledgement instead
                // would hold the FIN for the peer's delayed ACK, and a
                // client that saw TLS close_notify would close first.)
                let queued = dst.written >= redirected + d.copied_out;
                if handed_over && queued {
                    super::shutdown_write_fd(socks[1 - side].as_fd())
                        .map_err(|e| side_err(1 - side, e))?;
                    dirs[side].fin_sent = true;
                }
            }
        }
        if dirs.iter().all(|d| d.fin_sent) {
            return Ok(stats(counts, &dirs, RelayEnd::Closed));
        }
        let moved = (
            counts.down_to_up + dirs[DOWN].copied_out,
            counts.up_to_down + dirs[UP].copied_out,
        );
        if moved != last_moved {
            last_moved = moved;
            last_activity = Instant::now();
            drain_tick = DRAIN_TICK;
        } else if last_activity.elapsed() >= opts.idle_timeout {
            return Ok(stats(counts, &dirs, RelayEnd::Idle));
        }
        let draining = dirs.iter().any(|d| d.eof && !d.fin_sent);
        let wait = if draining {
            let w = drain_tick;
            drain_tick = (drain_tick * 2).min(DRAIN_TICK_MAX);
            w
        } else {
            tick
        };
        tokio::select! {
            biased;
            () = &mut cancel => {
                let counts = kt.counts(pair).unwrap_or_default();
                return Ok(stats(counts, &dirs, RelayEnd::Cancelled));
            }
            guard = watch.readable() => {
                let mut guard = guard.map_err(TunnelError::Downstream)?;
                let mut events = [EpollEvent::empty(); 4];
                let n = guard
                    .get_inner()
                    .epoll
                    .wait(&mut events, EpollTimeout::ZERO)
                    .map_err(|e| TunnelError::Downstream(errno(e)))?;
                if n == 0 {
                    guard.clear_ready();
                }
                for ev in events.iter().take(n) {
                    let side = usize::from(ev.data() == UP as u64);
                    let flags = ev.events();
                    if flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP) {
                        if let Some(e) = socks[side].take_error().map_err(|e| side_err(side, e))? {
                            return Err(side_err(side, e));
                        }
                    }
                    if flags.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP)
                        && !dirs[side].copying
                    {
                        dirs[side].eof = true;
                    }
                }
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

fn stats(counts: KernelCounts, dirs: &[Direction; 2], end: RelayEnd) -> RelayStats {
    RelayStats {
        to_upstream: counts.down_to_up + dirs[DOWN].copied_out,
        to_downstream: counts.up_to_down + dirs[UP].copied_out,
        end,
    }
}

/// User-space copy of a passing direction: read what the source holds and
/// write what the destination takes, without blocking. Sets `eof` at
/// end-of-stream; asks for `EPOLLOUT` on the destination while it is full.
fn copy_some(
    d: &mut Direction,
    socks: [&std::net::TcpStream; 2],
    side: usize,
    dst_copying: bool,
    watch: &AsyncFd<Watch>,
) -> Result<(), TunnelError> {
    use std::io::{Read, Write};
    let (src, dst) = (socks[side], socks[1 - side]);
    loop {
        if !d.pending.is_empty() {
            match (&*dst).write(&d.pending) {
                Ok(w) => {
                    d.pending.drain(..w);
                    d.copied_out += w as u64;
                    continue;
                }
                Err(e) if super::retry(&e) => {
                    let mut interest =
                        EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET | EpollFlags::EPOLLOUT;
                    if dst_copying {
                        interest |= EpollFlags::EPOLLIN;
                    }
                    let _ = watch
                        .get_ref()
                        .epoll
                        .modify(dst, &mut EpollEvent::new(interest, (1 - side) as u64));
                    return Ok(());
                }
                Err(e) => return Err(side_err(1 - side, e)),
            }
        }
        if d.eof {
            return Ok(());
        }
        let mut buf = vec![0u8; COPY_BUF];
        match (&*src).read(&mut buf) {
            Ok(0) => {
                d.eof = true;
                return Ok(());
            }
            Ok(n) => {
                buf.truncate(n);
                d.copied_in += n as u64;
                d.pending = buf;
            }
            Err(e) if super::retry(&e) => return Ok(()),
            Err(e) => return Err(side_err(side, e)),
        }
    }
}
