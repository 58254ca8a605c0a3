//! Reading drop events from the per-sandbox ring buffer, synchronously or
//! from tokio.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use aya::maps::{Map, MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::abi::names;
use crate::error::EbpfError;
use crate::verdict::DropEvent;

/// The consumer side of a filter's ring buffer. It holds its own descriptor,
/// so it may outlive the [`crate::Filter`] it came from and move to another
/// task. The kernel keeps one consumer position per ring buffer: use one
/// reader per filter at a time.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

/// [`EventReader`] registered with the tokio reactor.
pub struct AsyncEventReader {
    fd: AsyncFd<EventReader>,
}

// === impl EventReader ===

impl EventReader {
    pub(crate) fn new(fd: OwnedFd) -> Result<Self, EbpfError> {
        let data = MapData::from_fd(fd).map_err(EbpfError::map(names::EVENTS))?;
        let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(EbpfError::map(names::EVENTS))?;
        Ok(Self { ring })
    }

    /// The next event, if one is waiting.
    pub fn try_next(&mut self) -> Option<DropEvent> {
        loop {
            let item = self.ring.next()?;
            // A record this crate cannot decode (a newer program) is skipped.
            if let Some(e) = DropEvent::from_bytes(&item) {
                return Some(e);
            }
        }
    }

    /// Every event waiting now.
    pub fn drain(&mut self) -> Vec<DropEvent> {
        std::iter::from_fn(|| self.try_next()).collect()
    }

    /// For tokio: `AsyncFd` readiness on the ring buffer.
    pub fn into_async(self) -> io::Result<AsyncEventReader> {
        Ok(AsyncEventReader {
            fd: crate::sys::register_async(self)?,
        })
    }
}

impl AsFd for EventReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

// === impl AsyncEventReader ===

impl AsyncEventReader {
    /// Waits for the next event.
    pub async fn next(&mut self) -> io::Result<DropEvent> {
        loop {
            if let Some(e) = self.fd.get_mut().try_next() {
                return Ok(e);
            }
            let mut guard = self.fd.readable_mut().await?;
            match guard.get_inner_mut().try_next() {
                Some(e) => return Ok(e),
                None => guard.clear_ready(),
            }
        }
    }

    /// Every event waiting now, without waiting.
    pub fn drain(&mut self) -> Vec<DropEvent> {
        self.fd.get_mut().drain()
    }
}
