//! Drop events: every slot's records arrive in the one ring buffer of the
//! shared maps; a dispatcher thread per shared object moves them into
//! per-sandbox queues, read synchronously or from tokio.
//!
//! The kernel keeps one consumer position per ring buffer, so one consumer
//! ([`Dispatch::pump`], under a lock) drains it for every sandbox; a record
//! goes to the queue of its slot and namespace cookie, made on demand (a
//! restarted daemon drains records written while it was away before it has
//! reopened every sandbox). A record of an owner whose slot was released
//! (its key closed) is discarded.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{Map, MapData, RingBuf};
use tokio::sync::Notify;

use crate::abi::{self, names};
use crate::error::EbpfError;
use crate::maps::lock;
use crate::verdict::DropEvent;

/// Events a sandbox's queue holds before newer ones are counted as lost.
pub const QUEUE_MAX: usize = 1024;

/// One sandbox's queue.
#[derive(Default)]
struct Queue {
    events: VecDeque<DropEvent>,
    lost: u64,
    notify: Arc<Notify>,
}

/// The ring and the per-sandbox queues of one shared object.
pub(crate) struct Dispatch {
    ring: Mutex<RingBuf<MapData>>,
    queues: Mutex<Queues>,
    stop: AtomicBool,
}

/// Keys of released owners remembered, so that their late records make no
/// new queue.
const CLOSED_MAX: usize = 8192;

#[derive(Default)]
struct Queues {
    open: HashMap<(u32, u64), Queue>,
    closed: HashSet<(u32, u64)>,
    closed_order: VecDeque<(u32, u64)>,
}

impl Dispatch {
    /// Takes a descriptor of the ring and starts the dispatcher thread,
    /// which runs until [`Dispatch::stop`].
    pub(crate) fn start(ring_fd: OwnedFd) -> Result<Arc<Self>, EbpfError> {
        let data = MapData::from_fd(ring_fd).map_err(EbpfError::map(names::EVENTS))?;
        let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(EbpfError::map(names::EVENTS))?;
        let d = Arc::new(Self {
            ring: Mutex::new(ring),
            queues: Mutex::new(Queues::default()),
            stop: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&d);
        let poll_fd = lock(&d.ring)
            .as_fd()
            .try_clone_to_owned()
            .map_err(EbpfError::io("duplicating the ring buffer descriptor"))?;
        std::thread::Builder::new()
            .name("tg-ebpf-events".into())
            .spawn(move || loop {
                // Readable: records wait. The timeout only bounds how long a
                // stop takes to be seen.
                let ready = crate::sys::wait_readable(poll_fd.as_fd(), 200).unwrap_or(false);
                let Some(d) = weak.upgrade() else { return };
                if d.stop.load(Ordering::Relaxed) {
                    return;
                }
                if ready {
                    d.pump();
                }
            })
            .map_err(EbpfError::io("starting the event dispatcher"))?;
        Ok(d)
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Moves every waiting record into its queue and wakes the readers.
    fn pump(&self) {
        let mut woken = Vec::new();
        let mut ring = lock(&self.ring);
        let mut queues = lock(&self.queues);
        while let Some(item) = ring.next() {
            let Some(raw) = abi::RawEvent::from_bytes(&item) else {
                continue;
            };
            // A record this crate cannot decode (a newer program) is skipped.
            let Some(event) = DropEvent::from_bytes(&item) else {
                continue;
            };
            let key = (raw.slot, raw.netns_cookie);
            if queues.closed.contains(&key) {
                continue;
            }
            let q = queues.open.entry(key).or_default();
            if q.events.len() >= QUEUE_MAX {
                q.lost += 1;
                continue;
            }
            q.events.push_back(event);
            woken.push(q.notify.clone());
        }
        drop(queues);
        drop(ring);
        for n in woken {
            n.notify_one();
        }
    }

    /// Opens the queue of `slot` owned by the namespace `cookie` (a no-op
    /// when it is open): its events are kept from now on.
    pub(crate) fn open(&self, slot: u32, cookie: u64) {
        lock(&self.queues).open.entry((slot, cookie)).or_default();
    }

    /// Drops the queue of `slot` (the sandbox is gone); its late records
    /// are discarded.
    pub(crate) fn close(&self, slot: u32, cookie: u64) {
        let key = (slot, cookie);
        let mut q = lock(&self.queues);
        q.open.remove(&key);
        if q.closed.insert(key) {
            q.closed_order.push_back(key);
            if q.closed_order.len() > CLOSED_MAX {
                if let Some(old) = q.closed_order.pop_front() {
                    q.closed.remove(&old);
                }
            }
        }
    }

    /// Events lost because the queue was full.
    pub(crate) fn lost(&self, slot: u32, cookie: u64) -> u64 {
        lock(&self.queues)
            .open
            .get(&(slot, cookie))
            .map_or(0, |q| q.lost)
    }

    fn pop(&self, key: (u32, u64)) -> Option<DropEvent> {
        lock(&self.queues)
            .open
            .get_mut(&key)
            .and_then(|q| q.events.pop_front())
    }

    fn notify(&self, key: (u32, u64)) -> Arc<Notify> {
        lock(&self.queues)
            .open
            .entry(key)
            .or_default()
            .notify
            .clone()
    }
}

/// The events of one sandbox. It may outlive the [`crate::Filter`] it came
/// from and move to another task; use one reader per filter at a time (two
/// would share its events).
pub struct EventReader {
    dispatch: Arc<Dispatch>,
    key: (u32, u64),
}

/// [`EventReader`] for tokio.
pub struct AsyncEventReader {
    reader: EventReader,
    notify: Arc<Notify>,
}

// === impl EventReader ===

impl EventReader {
    pub(crate) fn new(dispatch: Arc<Dispatch>, slot: u32, cookie: u64) -> Self {
        dispatch.open(slot, cookie);
        Self {
            dispatch,
            key: (slot, cookie),
        }
    }

    /// The next event, if one is waiting.
    pub fn try_next(&mut self) -> Option<DropEvent> {
        if let Some(e) = self.dispatch.pop(self.key) {
            return Some(e);
        }
        self.dispatch.pump();
        self.dispatch.pop(self.key)
    }

    /// Every event waiting now.
    pub fn drain(&mut self) -> Vec<DropEvent> {
        std::iter::from_fn(|| self.try_next()).collect()
    }

    /// Waits up to `timeout` for the next event.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<DropEvent> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_next() {
                return Some(e);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// For tokio.
    pub fn into_async(self) -> std::io::Result<AsyncEventReader> {
        let notify = self.dispatch.notify(self.key);
        Ok(AsyncEventReader {
            reader: self,
            notify,
        })
    }
}

// === impl AsyncEventReader ===

impl AsyncEventReader {
    /// Waits for the next event.
    pub async fn next(&mut self) -> std::io::Result<DropEvent> {
        loop {
            // The dispatcher stores a permit when it queues an event while
            // nobody waits, so an event queued after this check still wakes
            // the wait below.
            if let Some(e) = self.reader.dispatch.pop(self.reader.key) {
                return Ok(e);
            }
            self.notify.notified().await;
        }
    }

    /// Every event waiting now, without waiting.
    pub fn drain(&mut self) -> Vec<DropEvent> {
        self.reader.drain()
    }
}
