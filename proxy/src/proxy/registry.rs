//! The sandbox's current policy and its open connections, under one lock, so
//! that a policy swap and a decision can never interleave: every decision
//! is taken (and recorded) under the same lock that [`Registry::set_policy`]
//! holds while it swaps the policy and re-decides every open connection.
//! There is no window in which a connection decided under the old policy
//! escapes the sweep.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::policy::{CompiledPolicy, Proto, Verdict};

/// Why a connection is being closed from outside its task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseCause {
    /// A policy update changed its verdict.
    Revoked,
    /// The proxy is shutting down.
    Shutdown,
}

/// What kind of relay a connection is, which decides what a policy change
/// does to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An opaque tunnel (TLS passthrough, address-decided TCP, an upgraded
    /// WebSocket): closed when its verdict changes in any way.
    Tunnel,
    /// A plain HTTP/1 connection: every request is decided on its own, and
    /// the connection is closed when its last decision turns into a denial.
    Http,
}

/// The last decision recorded for a connection.
#[derive(Clone, Debug)]
struct Decided {
    name: Option<String>,
    verdict: Verdict,
    kind: Kind,
    /// The [`State::generation`] of the policy it was taken under.
    generation: u64,
}

#[derive(Debug)]
struct Entry {
    /// Original destination.
    dst: SocketAddr,
    decided: Option<Decided>,
    close: watch::Sender<Option<CloseCause>>,
}

#[derive(Debug)]
struct State {
    policy: Arc<CompiledPolicy>,
    /// Counts policy swaps: a decision taken under the current generation
    /// for the same name and kind is still the policy's answer.
    generation: u64,
    next_id: u64,
    conns: HashMap<u64, Entry>,
    shut: bool,
}

/// Policy plus open connections of one sandbox.
#[derive(Debug)]
pub(crate) struct Registry {
    state: Mutex<State>,
    /// [`State::generation`], readable without the lock: a connection that
    /// decided the same name under this generation already has its answer
    /// (stored under the lock, after the swap).
    generation: AtomicU64,
}

/// A registered connection. Dropping it unregisters the connection and
/// releases its slot under the connection cap.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    id: u64,
    dst: SocketAddr,
    registry: Arc<Registry>,
    close: watch::Receiver<Option<CloseCause>>,
    /// This connection's last decision with the policy it was taken under
    /// (what the registry recorded for it), answered again without the
    /// registry's lock while the generation stands.
    last: Mutex<Option<(Decided, Arc<CompiledPolicy>)>>,
    _permit: OwnedSemaphorePermit,
}

// === impl Registry ===

impl Registry {
    pub(crate) fn new(policy: Arc<CompiledPolicy>) -> Self {
        Self {
            state: Mutex::new(State {
                policy,
                generation: 0,
                next_id: 0,
                conns: HashMap::new(),
                shut: false,
            }),
            generation: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every
        // critical section is a few map operations); keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection to `dst`. `None` once shut down.
    pub(crate) fn register(
        self: &Arc<Self>,
        dst: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Option<ConnHandle> {
        let mut st = self.lock();
        if st.shut {
            return None;
        }
        let id = st.next_id;
        st.next_id += 1;
        let (tx, rx) = watch::channel(None);
        st.conns.insert(
            id,
            Entry {
                dst,
                decided: None,
                close: tx,
            },
        );
        Some(ConnHandle {
            id,
            dst,
            registry: Arc::clone(self),
            close: rx,
            last: Mutex::new(None),
            _permit: permit,
        })
    }

    /// The current policy.
    pub(crate) fn policy(&self) -> Arc<CompiledPolicy> {
        Arc::clone(&self.lock().policy)
    }

    /// Swaps the policy and closes every connection whose verdict changed:
    /// a tunnel on any change, an HTTP connection when its last decision
    /// becomes a denial. Returns how many were told to close.
    pub(crate) fn set_policy(&self, policy: Arc<CompiledPolicy>) -> usize {
        let mut st = self.lock();
        st.policy = policy;
        st.generation += 1;
        self.generation.store(st.generation, Ordering::Release);
        let policy = Arc::clone(&st.policy);
        let mut closed = 0;
        for entry in st.conns.values() {
            let Some(d) = &entry.decided else {
                continue;
            };
            let now = policy.decide(
                d.name.as_deref(),
                entry.dst.ip(),
                entry.dst.port(),
                Proto::Tcp,
            );
            let revoke = match d.kind {
                Kind::Tunnel => now != d.verdict,
                Kind::Http => {
                    matches!(now, Verdict::Deny(_)) && !matches!(d.verdict, Verdict::Deny(_))
                }
            };
            if revoke {
                entry.close.send_replace(Some(CloseCause::Revoked));
                closed += 1;
            }
        }
        closed
    }

    /// Refuses new registrations and tells every open connection to close.
    pub(crate) fn shutdown(&self) {
        let mut st = self.lock();
        st.shut = true;
        for entry in st.conns.values() {
            entry.close.send_replace(Some(CloseCause::Shutdown));
        }
    }

    /// Open (registered) connections.
    pub(crate) fn len(&self) -> usize {
        self.lock().conns.len()
    }
}

// === impl ConnHandle ===

impl ConnHandle {
    /// The original destination.
    pub(crate) fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// Decides `name` for this connection under the current policy and
    /// records the verdict (atomically with respect to policy swaps).
    /// Returns the verdict and the policy it was taken under.
    pub(crate) fn decide(&self, name: Option<&str>, kind: Kind) -> (Verdict, Arc<CompiledPolicy>) {
        let current = self.registry.generation.load(Ordering::Acquire);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((d, policy)) = last.as_ref() {
            if d.generation == current && d.kind == kind && d.name.as_deref() == name {
                return (d.verdict.clone(), Arc::clone(policy));
            }
        }
        let (verdict, policy, decided) = self.decide_locked(name, kind);
        if let Some(d) = decided {
            *last = Some((d, Arc::clone(&policy)));
        }
        (verdict, policy)
    }

    /// [`ConnHandle::decide`] under the registry's lock; also returns what
    /// it recorded.
    fn decide_locked(
        &self,
        name: Option<&str>,
        kind: Kind,
    ) -> (Verdict, Arc<CompiledPolicy>, Option<Decided>) {
        let mut st = self.registry.lock();
        let st = &mut *st;
        let policy = Arc::clone(&st.policy);
        let generation = st.generation;
        let entry = st.conns.get_mut(&self.id);
        // A keep-alive connection asks for the same name again and again:
        // under the same policy the answer is the one recorded.
        if let Some(d) = entry.as_ref().and_then(|e| e.decided.as_ref()) {
            if d.generation == generation && d.kind == kind && d.name.as_deref() == name {
                return (d.verdict.clone(), policy, Some(d.clone()));
            }
        }
        let verdict = policy.decide(name, self.dst.ip(), self.dst.port(), Proto::Tcp);
        let Some(entry) = entry else {
            return (verdict, policy, None);
        };
        let d = Decided {
            name: name.map(str::to_string),
            verdict: verdict.clone(),
            kind,
            generation,
        };
        entry.decided = Some(d.clone());
        (verdict, policy, Some(d))
    }

    /// Turns this connection into a tunnel for policy updates (an HTTP
    /// connection that upgraded to a WebSocket): from now on any change of
    /// its last verdict closes it.
    pub(crate) fn mark_tunnel(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let mut st = self.registry.lock();
        if let Some(d) = st.conns.get_mut(&self.id).and_then(|e| e.decided.as_mut()) {
            d.kind = Kind::Tunnel;
        }
    }

    /// Completes when the connection is told to close.
    pub(crate) async fn closed(&self) -> CloseCause {
        let mut rx = self.close.clone();
        let cause = match rx.wait_for(Option::is_some).await {
            Ok(cause) => cause.unwrap_or(CloseCause::Shutdown),
            // The sender lives in the registry until this handle drops.
            Err(_) => CloseCause::Shutdown,
        };
        cause
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.registry.lock().conns.remove(&self.id);
    }
}
