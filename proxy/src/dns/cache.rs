//! The resolver's answer cache: one entry per (normalised name, type),
//! expiring with the answer's TTL.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

/// What one (name, type) question resolved to. `ttl` is how long the answer
/// may be reused: for a fresh answer the TTL to cache it with, for a cached
/// one the time it has left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Addresses (possibly reached through CNAMEs).
    Addrs {
        /// The addresses, in the upstream's order.
        addrs: Vec<IpAddr>,
        /// Smallest TTL along the chain.
        ttl: Duration,
    },
    /// The name exists but has no record of this type.
    NoData {
        /// Negative-caching TTL (zero without an SOA).
        ttl: Duration,
    },
    /// The name does not exist.
    NxDomain {
        /// Negative-caching TTL (zero without an SOA).
        ttl: Duration,
    },
}

/// Cache key: normalised name and query type.
pub(crate) type Key = (String, RecordType);

struct Entry {
    answer: Answer,
    expires: Instant,
}

/// A bounded TTL cache. When full, expired entries go first, then the entry
/// closest to expiry.
pub(crate) struct Cache {
    map: HashMap<Key, Entry>,
    cap: usize,
}

// === impl Answer ===

impl Answer {
    /// The TTL carried by any variant.
    pub(crate) fn ttl(&self) -> Duration {
        match self {
            Self::Addrs { ttl, .. } | Self::NoData { ttl } | Self::NxDomain { ttl } => *ttl,
        }
    }

    fn with_ttl(&self, ttl: Duration) -> Self {
        match self {
            Self::Addrs { addrs, .. } => Self::Addrs {
                addrs: addrs.clone(),
                ttl,
            },
            Self::NoData { .. } => Self::NoData { ttl },
            Self::NxDomain { .. } => Self::NxDomain { ttl },
        }
    }
}

// === impl Cache ===

impl Cache {
    /// An empty cache holding at most `cap` entries (0 disables caching).
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap,
        }
    }

    /// The live entry for `key`, its TTL set to the time it has left.
    pub(crate) fn get(&mut self, key: &Key, now: Instant) -> Option<Answer> {
        let entry = self.map.get(key)?;
        if entry.expires <= now {
            self.map.remove(key);
            return None;
        }
        let left = entry.expires.saturating_duration_since(now);
        Some(entry.answer.with_ttl(left))
    }

    /// Stores `answer` for its TTL. A zero TTL is never stored (and drops
    /// any older entry for the key).
    pub(crate) fn insert(&mut self, key: Key, answer: &Answer, now: Instant) {
        let ttl = answer.ttl();
        if ttl.is_zero() || self.cap == 0 {
            self.map.remove(&key);
            return;
        }
        let Some(expires) = now.checked_add(ttl) else {
            return;
        };
        if !self.map.contains_key(&key) && self.map.len() >= self.cap {
            self.map.retain(|_, e| e.expires > now);
            if self.map.len() >= self.cap {
                let soonest = self
                    .map
                    .iter()
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone());
                if let Some(k) = soonest {
                    self.map.remove(&k);
                }
            }
        }
        self.map.insert(
            key,
            Entry {
                answer: answer.clone(),
                expires,
            },
        );
    }

    /// Number of entries, expired ones included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}
