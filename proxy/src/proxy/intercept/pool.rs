//! Upstream connections of one sandbox's interception, pooled per name and
//! port: the HTTP/2 connection a sandbox connection used, left when that
//! connection ended (while a sandbox connection lives, its streams have an
//! upstream h2 connection of their own), and a stack of idle HTTP/1.1
//! connections. Connection tasks are tracked so that the sandbox's
//! shutdown ends every one of them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use tokio::task::AbortHandle;

use super::UpBody;

/// Idle HTTP/1.1 connections kept per name and port.
const MAX_IDLE_H1: usize = 64;
/// An idle HTTP/1.1 connection older than this is not reused (upstreams
/// commonly close idle keep-alive connections after 60 s or more).
pub(super) const IDLE_H1_FOR: Duration = Duration::from_secs(50);
/// How long a request waits for its connection's HTTP/2 upstream
/// connection to accept a new stream before another connection is opened.
pub(super) const H2_READY_WAIT: Duration = Duration::from_millis(200);

/// Where a pooled connection goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    /// The upstream name (the SNI).
    pub(crate) name: String,
    /// The original destination port.
    pub(crate) port: u16,
    /// Connections that offered only HTTP/1.1 (for sandboxes speaking
    /// HTTP/1.1) are kept apart from those that offered h2.
    pub(crate) http1_only: bool,
}

/// A connection ready for a request.
pub(crate) enum Sender {
    H1(http1::SendRequest<UpBody>),
    H2(http2::SendRequest<UpBody>),
}

/// One sandbox's upstream connections.
#[derive(Default)]
pub(crate) struct Pool {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    h2: HashMap<Key, http2::SendRequest<UpBody>>,
    h1: HashMap<Key, Vec<(http1::SendRequest<UpBody>, Instant)>>,
    tasks: Vec<AbortHandle>,
    /// `tasks` is pruned of finished tasks when it grows to this length
    /// (amortised: not on every spawn).
    prune_at: usize,
    closed: bool,
}

/// Length of the task list below which it is never pruned.
const PRUNE_FLOOR: usize = 64;

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection to `key` ready for a request, if one is open;
    /// it leaves the pool (an h2 one becomes the taker's own).
    pub(crate) fn checkout(&self, key: &Key) -> Option<Sender> {
        let mut inner = self.lock();
        if let Some(s) = inner.h2.remove(key) {
            if !s.is_closed() && s.is_ready() {
                return Some(Sender::H2(s));
            }
        }
        let idle = inner.h1.get_mut(key)?;
        while let Some((s, since)) = idle.pop() {
            if !s.is_closed() && s.is_ready() && since.elapsed() < IDLE_H1_FOR {
                return Some(Sender::H1(s));
            }
        }
        None
    }

    /// Keeps the HTTP/2 connection to `key` of a sandbox connection that
    /// ended, for the next one (one per key; a closed one is not kept).
    pub(crate) fn put_h2(&self, key: Key, sender: http2::SendRequest<UpBody>) {
        let mut inner = self.lock();
        if !inner.closed && !sender.is_closed() {
            inner.h2.insert(key, sender);
        }
    }

    /// Returns an HTTP/1.1 connection to the pool once its response has
    /// been read to the end (it is dropped if that fails). `since` is when
    /// it was last used.
    pub(crate) fn checkin_h1_when_ready(
        self: &Arc<Self>,
        key: Key,
        mut sender: http1::SendRequest<UpBody>,
        since: Instant,
    ) {
        if sender.is_closed() || since.elapsed() >= IDLE_H1_FOR {
            return;
        }
        if sender.is_ready() {
            self.put_h1(key, sender, since);
            return;
        }
        let pool = Arc::clone(self);
        self.spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            pool.put_h1(key, sender, since);
        });
    }

    /// Pools an idle HTTP/1.1 connection last used at `since`.
    fn put_h1(&self, key: Key, sender: http1::SendRequest<UpBody>, since: Instant) {
        let mut inner = self.lock();
        if inner.closed {
            return;
        }
        let idle = inner.h1.entry(key).or_default();
        idle.retain(|(s, since)| !s.is_closed() && since.elapsed() < IDLE_H1_FOR);
        if idle.len() < MAX_IDLE_H1 {
            idle.push((sender, since));
        }
    }

    /// Runs `fut` (a connection driver) until it ends or the pool closes.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut inner = self.lock();
        if inner.closed {
            return;
        }
        let task = tokio::spawn(fut);
        if inner.tasks.len() >= inner.prune_at {
            inner.tasks.retain(|t| !t.is_finished());
            inner.prune_at = (inner.tasks.len() * 2).max(PRUNE_FLOOR);
        }
        inner.tasks.push(task.abort_handle());
    }

    /// Closes every connection; nothing is pooled afterwards.
    pub(crate) fn shutdown(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.h2.clear();
        inner.h1.clear();
        for t in inner.tasks.drain(..) {
            t.abort();
        }
    }
}
