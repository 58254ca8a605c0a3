//! Moving bytes between the sandbox and an upstream, untouched, in both
//! directions, with correct half-close, an idle timeout and cancellation.
//!
//! [`relay`] runs one pump per direction in the calling task. A pump reads
//! until end-of-stream on its source, then shuts down the WRITE side of its
//! destination (`shutdown(SHUT_WR)`) and ends; the other direction keeps
//! flowing. The relay ends when both pumps have ended, when no byte has moved
//! in either direction for `idle_timeout`, when the `cancel` future completes
//! (policy revocation, shutdown), or on the first I/O error, which says which
//! side failed.
//!
//! Three ways to move bytes ([`CopyMode`]):
//!
//! * [`CopyMode::Kernel`] (the daemon's default): both sockets join the
//!   kernel tunnel's sockhash and a stream-verdict program redirects each
//!   one's data to the other ([`kernel`]); the proxy only watches for
//!   end-of-stream, errors, idleness and revocation. It needs the sockets
//!   by value and a [`kernel::KernelTunnel`], so the proxy runs it itself
//!   (`SandboxProxy`); [`relay`] treats it as [`CopyMode::Splice`].
//! * [`CopyMode::Splice`]: `splice(2)` socket → pipe → socket, one pipe per
//!   direction, driven by tokio readiness (`readable()` / `writable()` +
//!   `try_io`), so the payload never enters user space. If the kernel
//!   refuses (`EINVAL` on the first call, or no pipe can be created), that
//!   direction falls back to the user-space copy before any byte has moved.
//! * [`CopyMode::Userspace`]: a 64 KiB buffer per direction, `try_read` /
//!   `try_write` on readiness.
//!
//! **Measured** by the `tunnel` bench (`cargo bench -p tollgate-benches
//! --bench tunnel`), which runs both modes and a bare relay (blocking
//! threads, splice, no policy) against a direct connection in the same run.
//! One TLS stream origin → client, 2 cores shared by client, relay and
//! origin; medians of per-round ratios of two full runs (1 GiB, 5 rounds):
//!
//! | path | loopback | netns + eBPF (production path) |
//! |---|---|---|
//! | `Splice` | 0.61–0.67× direct | 0.54–0.63× direct |
//! | `Userspace` (64 KiB buffer) | 0.67–0.70× direct | 0.55–0.69× direct |
//! | bare splice relay | 0.61–0.62× direct | - |
//!
//! The two modes are even within the noise of these runs (a quick run had
//! splice ahead on the netns path, 0.73 vs 0.64×). The relay's own threads
//! spend 0.37–0.42 (splice) vs 0.66–0.76 (copy) CPU-s/GiB on the netns
//! path; with splice the receiving client then spends more per GiB
//! (0.7–0.8 vs 0.5 CPU-s/GiB), which evens the total. Splice is the
//! default where there is no kernel tunnel: it leaves the proxy's cores to
//! other sandboxes (the kernel tunnel's figures: the README's bench section).
//!
//! Each tunnel in splice mode holds two pipes (four descriptors) besides its
//! two sockets; each pipe asks for 256 KiB (`PIPE_SIZE` in `tunnel/splice.rs`), and
//! keeps the default 64 KiB when that is over `fs.pipe-user-pages-soft`.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub mod kernel;
mod splice;

#[cfg(test)]
mod tests;

/// How [`relay`] moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// `splice(2)` through a pipe per direction (zero-copy), falling back to
    /// [`CopyMode::Userspace`] where the kernel refuses.
    Splice,
    /// Read into and write from a user-space buffer.
    Userspace,
    /// The kernel tunnel ([`kernel`]): both sockets join a sockhash whose
    /// program redirects each one's data to the other, where the proxy has
    /// a [`kernel::KernelTunnel`]; [`CopyMode::Splice`] otherwise (and for
    /// [`relay`], which borrows its sockets).
    Kernel,
}

/// The mode [`RelayOptions::default`] uses: the faster of the two on the
/// measurement in the module docs.
pub const DEFAULT_COPY_MODE: CopyMode = CopyMode::Splice;

/// Bytes one user-space copy moves at most per read.
pub const COPY_BUF: usize = 64 * 1024;

/// How a relay runs.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// End the relay when no byte has moved in either direction this long.
    pub idle_timeout: Duration,
    /// How bytes are moved.
    pub mode: CopyMode,
}

/// Why a relay ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed their write direction; everything was delivered.
    Closed,
    /// Nothing moved for `idle_timeout`.
    Idle,
    /// The `cancel` future completed (policy revocation, shutdown).
    Cancelled,
}

/// What a relay moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes from the sandbox to the upstream.
    pub to_upstream: u64,
    /// Bytes from the upstream to the sandbox.
    pub to_downstream: u64,
    /// How it ended.
    pub end: RelayEnd,
}

/// Which side of a relay failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// Reading from or writing to the sandbox's connection failed.
    #[error("downstream (sandbox) side: {0}")]
    Downstream(#[source] io::Error),
    /// Reading from or writing to the upstream connection failed.
    #[error("upstream side: {0}")]
    Upstream(#[source] io::Error),
}

/// Which end of the relay a socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Down,
    Up,
}

/// When bytes last moved, for the idle timeout; shared by both pumps.
#[derive(Debug)]
pub(crate) struct Activity {
    base: Instant,
    /// The coarse clock at `base` (`None` if it cannot be read: then the
    /// precise one is used).
    base_coarse_ms: Option<u64>,
    /// Milliseconds after `base` of the last movement (within a clock
    /// tick: plenty for idle timeouts of seconds).
    last_ms: AtomicU64,
}

/// Milliseconds on the kernel's coarse monotonic clock (`Instant`'s clock
/// at the resolution of a tick): read from memory the kernel updates,
/// several times cheaper than a precise clock read.
fn coarse_ms() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).ok()?;
    let secs = u64::try_from(t.tv_sec()).ok()?;
    let nanos = u64::try_from(t.tv_nsec()).ok()?;
    Some(secs * 1000 + nanos / 1_000_000)
}

/// One direction of a relay: where it reads, where it writes, what it counts.
struct Pump<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_end: End,
    dst_end: End,
    moved: &'a AtomicU64,
    activity: &'a Activity,
}

/// A pump failed reading its source or writing its destination.
enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

// === impl RelayOptions ===

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(3600),
            mode: DEFAULT_COPY_MODE,
        }
    }
}

// === impl TunnelError ===

impl TunnelError {
    fn on(end: End, e: io::Error) -> Self {
        match end {
            End::Down => Self::Downstream(e),
            End::Up => Self::Upstream(e),
        }
    }
}

// === impl Activity ===

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            base_coarse_ms: coarse_ms(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Records that bytes moved now (every read and write of a connection:
    /// a coarse clock read, and a shared write at most once a millisecond).
    pub(crate) fn touch(&self) {
        let ms = self
            .base_coarse_ms
            .zip(coarse_ms())
            .map(|(base, now)| now.saturating_sub(base))
            .unwrap_or_else(|| u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX));
        if ms > self.last_ms.load(Ordering::Relaxed) {
            self.last_ms.fetch_max(ms, Ordering::Relaxed);
        }
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Completes once nothing has moved for `idle`.
    pub(crate) async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Runs `serve` (a connection's server) as a task of its own until it ends,
/// or until `stop` completes, when it is aborted and awaited, so nothing
/// of it runs afterwards. The task's wakeups (every read and write of a
/// busy connection) do not poll `stop`, as a `select!` over both would;
/// dropping the returned future aborts the task too. `None` when stopped
/// (or when `serve` panicked).
pub(crate) async fn serve_until<T: Send + 'static>(
    serve: impl Future<Output = T> + Send + 'static,
    stop: impl Future<Output = ()>,
) -> Option<T> {
    /// Aborts the task when dropped.
    struct Served<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for Served<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = Served(tokio::spawn(serve));
    tokio::select! {
        r = &mut task.0 => r.ok(),
        () = stop => {
            task.0.abort();
            let _ = (&mut task.0).await;
            None
        }
    }
}

/// A byte stream whose reads and writes count as [`Activity`] (idle
/// timeouts of served HTTP and intercepted connections).
#[derive(Debug)]
pub(crate) struct ActiveIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> ActiveIo<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActiveIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActiveIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// === impl Pump ===

impl Pump<'_> {
    /// Moves bytes until end-of-stream on `src`, then half-closes `dst`.
    async fn run(&self, mode: CopyMode) -> Result<(), TunnelError> {
        let res = match mode {
            CopyMode::Splice | CopyMode::Kernel => match splice::pump(self).await {
                Ok(splice::Spliced::Done) => Ok(()),
                Ok(splice::Spliced::Unsupported) => self.copy().await,
                Err(e) => Err(e),
            },
            CopyMode::Userspace => self.copy().await,
        };
        match res {
            Ok(()) => {
                shutdown_write(self.dst).map_err(|e| TunnelError::on(self.dst_end, e))?;
                Ok(())
            }
            Err(PumpError::Read(e)) => Err(TunnelError::on(self.src_end, e)),
            Err(PumpError::Write(e)) => Err(TunnelError::on(self.dst_end, e)),
        }
    }

    /// The user-space copy: read a buffer's worth, write all of it, repeat.
    async fn copy(&self) -> Result<(), PumpError> {
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            let n = loop {
                self.src.readable().await.map_err(PumpError::Read)?;
                match self.src.try_read(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if retry(&e) => continue,
                    Err(e) => return Err(PumpError::Read(e)),
                }
            };
            if n == 0 {
                return Ok(());
            }
            self.activity.touch();
            let mut chunk = buf.get(..n).unwrap_or_default();
            while !chunk.is_empty() {
                self.dst.writable().await.map_err(PumpError::Write)?;
                match self.dst.try_write(chunk) {
                    Ok(w) => {
                        chunk = chunk.get(w..).unwrap_or_default();
                        self.moved.fetch_add(w as u64, Ordering::Relaxed);
                        self.activity.touch();
                    }
                    Err(e) if retry(&e) => continue,
                    Err(e) => return Err(PumpError::Write(e)),
                }
            }
        }
    }
}

/// Would-block and EINTR mean "wait for readiness again".
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// `shutdown(SHUT_WR)`: the peer reads end-of-stream once everything sent so
/// far is delivered. A socket the peer already reset is not an error here.
pub(crate) fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    shutdown_write_fd(s.as_fd())
}

/// [`shutdown_write`] of a descriptor.
pub(crate) fn shutdown_write_fd(s: BorrowedFd<'_>) -> io::Result<()> {
    match nix::sys::socket::shutdown(s.as_raw_fd(), nix::sys::socket::Shutdown::Write) {
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Relays bytes between `down` (the sandbox's connection) and `up` (the
/// upstream) until both directions are closed, nothing moves for
/// `idle_timeout`, `cancel` completes, or one side fails.
///
/// Bytes already waiting in either socket (e.g. a ClientHello that was only
/// peeked) are relayed first, untouched. The sockets are not closed here: the
/// caller drops them (or resets them after a cancellation or an error).
pub async fn relay<C>(
    down: &TcpStream,
    up: &TcpStream,
    opts: &RelayOptions,
    cancel: C,
) -> Result<RelayStats, TunnelError>
where
    C: Future<Output = ()>,
{
    let to_up = AtomicU64::new(0);
    let to_down = AtomicU64::new(0);
    let activity = Activity::new();
    let outbound = Pump {
        src: down,
        dst: up,
        src_end: End::Down,
        dst_end: End::Up,
        moved: &to_up,
        activity: &activity,
    };
    let inbound = Pump {
        src: up,
        dst: down,
        src_end: End::Up,
        dst_end: End::Down,
        moved: &to_down,
        activity: &activity,
    };
    let both =
        async { tokio::try_join!(outbound.run(opts.mode), inbound.run(opts.mode)).map(|_| ()) };
    let end = tokio::select! {
        biased;
        () = cancel => RelayEnd::Cancelled,
        () = activity.idle_for(opts.idle_timeout) => RelayEnd::Idle,
        r = both => {
            r?;
            RelayEnd::Closed
        }
    };
    Ok(RelayStats {
        to_upstream: to_up.load(Ordering::Relaxed),
        to_downstream: to_down.load(Ordering::Relaxed),
        end,
    })
}
