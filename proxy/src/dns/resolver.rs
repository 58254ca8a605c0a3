//! The host-side resolver: lookups with a TTL cache and coalescing, and raw
//! forwarding for the sandbox server.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::sync::watch;
use tokio::time::Instant;

use super::cache::{Answer, Cache, Key};
use super::transport::{exchange, Reply};
use super::wire::{build_query, name_from_normalized, normalize_text};
use super::{DnsError, MAX_CACHE_TTL, MAX_NEGATIVE_TTL};

/// Where `ResolverConfig::default()` reads its upstreams from.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Most nameservers taken from a resolv.conf (glibc's MAXNS).
const MAX_NAMESERVERS: usize = 3;
/// Most CNAME hops followed inside one answer.
const MAX_CNAME_HOPS: usize = 8;

/// How the [`Resolver`] reaches its upstreams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Upstream nameservers, tried in order (the first one first on every
    /// query, as glibc does). Default: the `nameserver` lines of
    /// `/etc/resolv.conf`, port 53.
    pub upstreams: Vec<SocketAddr>,
    /// Total time one question may take, all attempts included (5 s). Each
    /// attempt gets an equal share of what is left.
    pub timeout: Duration,
    /// Queries sent per question, cycling through `upstreams` (2; at least
    /// 1). A timeout, SERVFAIL, REFUSED or a socket error moves on to the
    /// next attempt; NXDOMAIN and answers end the question.
    pub attempts: u32,
    /// Most (name, type) answers kept in the cache (10 000; 0 disables it).
    pub cache_entries: usize,
}

/// The addresses of a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// A addresses, then AAAA addresses when they were asked for, each in
    /// the upstream's order. Empty when the name exists but has no address
    /// of the wanted families (NODATA).
    pub addrs: Vec<IpAddr>,
    /// How long the answer stays valid: the smallest TTL of the answers
    /// used (time left when served from the cache). Zero means "do not
    /// reuse".
    pub ttl: Duration,
}

/// Outcome shared between the task that asks upstream and its waiters.
type Shared = Option<Result<Answer, DnsError>>;

/// A caching stub resolver; cheap to clone (clones share cache and
/// in-flight queries). See the module docs of `dns` for its rules.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    attempts: u32,
    cache: Mutex<Cache>,
    inflight: Mutex<HashMap<Key, watch::Receiver<Shared>>>,
}

/// Removes a question from the in-flight table when its task ends, however
/// it ends.
struct InflightGuard {
    inner: Arc<Inner>,
    key: Key,
}

// === impl ResolverConfig ===

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            upstreams: system_nameservers(),
            timeout: Duration::from_secs(5),
            attempts: 2,
            cache_entries: 10_000,
        }
    }
}

// === impl Resolver ===

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("upstreams", &self.inner.upstreams)
            .field("timeout", &self.inner.timeout)
            .field("attempts", &self.inner.attempts)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver over `config.upstreams`. With no upstream every query
    /// fails with [`DnsError::Io`].
    pub fn new(config: ResolverConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                upstreams: config.upstreams,
                timeout: config.timeout,
                attempts: config.attempts.max(1),
                cache: Mutex::new(Cache::new(config.cache_entries)),
                inflight: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The A (and, with `want_v6`, AAAA) addresses of `name`.
    ///
    /// `name` is normalised (lower case, one trailing dot dropped) and must
    /// be a valid host name, else [`DnsError::Malformed`]. The two families
    /// are asked concurrently; the lookup succeeds when either yields
    /// addresses, otherwise the A error wins over the AAAA one, and two
    /// NODATA answers give an empty [`Lookup`].
    pub async fn lookup(&self, name: &str, want_v6: bool) -> Result<Lookup, DnsError> {
        let name = normalize_text(name).ok_or(DnsError::Malformed("invalid host name"))?;
        if want_v6 {
            let (a, aaaa) = tokio::join!(
                self.question(&name, RecordType::A),
                self.question(&name, RecordType::AAAA)
            );
            combine([a, aaaa])
        } else {
            combine([self.question(&name, RecordType::A).await])
        }
    }

    /// Relays one raw query to the upstreams and returns the reply, its id
    /// set back to the query's.
    ///
    /// The query must parse and carry exactly one question, else
    /// [`DnsError::Malformed`]. Each attempt sends it with a fresh random id
    /// and accepts only a reply matching that id and the question. Any
    /// RCODE is returned as a reply (SERVFAIL / REFUSED / NOTIMP move on to
    /// the next attempt first). Nothing is cached or coalesced: the sandbox
    /// server decides what may be asked before it calls this.
    pub async fn forward(&self, query: &[u8]) -> Result<Vec<u8>, DnsError> {
        let msg = Message::from_vec(query).map_err(|_| DnsError::Malformed("unparseable query"))?;
        if msg.metadata.message_type != MessageType::Query || msg.queries.len() != 1 {
            return Err(DnsError::Malformed("not a query with exactly one question"));
        }
        let Some(q) = msg.queries.first() else {
            return Err(DnsError::Malformed("no question"));
        };
        let orig_id = msg.metadata.id;
        let mut bytes = query.to_vec();
        let inner = &self.inner;
        let deadline = inner.deadline();
        let mut last = DnsError::Timeout;
        for attempt in 0..inner.attempts {
            let Some((upstream, attempt_deadline)) = inner.attempt(attempt, deadline) else {
                break;
            };
            let id: u16 = rand::random();
            set_id(&mut bytes, id);
            match exchange(upstream, &bytes, id, q, attempt_deadline).await {
                Ok(Reply { msg, mut raw }) => {
                    let retry = matches!(
                        msg.metadata.response_code,
                        ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp
                    );
                    if retry && attempt + 1 < inner.attempts {
                        last = rcode_error(msg.metadata.response_code);
                        continue;
                    }
                    set_id(&mut raw, orig_id);
                    return Ok(raw);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// One question through the cache and the in-flight table.
    async fn question(&self, name: &str, rtype: RecordType) -> Result<Answer, DnsError> {
        let key: Key = (name.to_string(), rtype);
        if let Some(hit) = self.inner.cached(&key) {
            return Ok(hit);
        }
        let mut rx = {
            let mut inflight = lock(&self.inner.inflight);
            match inflight.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    // A task stores its answer before leaving this table, so
                    // a second look at the cache under this lock cannot miss
                    // an answer that just arrived.
                    if let Some(hit) = self.inner.cached(&key) {
                        return Ok(hit);
                    }
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(key.clone(), rx.clone());
                    let guard = InflightGuard {
                        inner: Arc::clone(&self.inner),
                        key,
                    };
                    tokio::spawn(guard.run(tx));
                    rx
                }
            }
        };
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(v) => (*v).clone(),
            Err(_) => None,
        };
        outcome.unwrap_or_else(|| {
            Err(std::io::Error::other("the DNS query task ended without an answer").into())
        })
    }

    /// The cache entry of (name, type), with its TTL left (tests).
    #[cfg(test)]
    pub(crate) fn cached_answer(&self, name: &str, rtype: RecordType) -> Option<Answer> {
        self.inner.cached(&(name.to_string(), rtype))
    }

    /// Number of cache entries, expired ones included (tests).
    #[cfg(test)]
    pub(crate) fn cache_len(&self) -> usize {
        lock(&self.inner.cache).len()
    }
}

// === impl Inner ===

impl Inner {
    fn cached(&self, key: &Key) -> Option<Answer> {
        lock(&self.cache).get(key, Instant::now().into_std())
    }

    /// When a question started now must be answered (a timeout too large
    /// to represent means "in a day").
    fn deadline(&self) -> Instant {
        let now = Instant::now();
        now.checked_add(self.timeout)
            .unwrap_or_else(|| now + Duration::from_secs(86_400))
    }

    /// Upstream and deadline of attempt `n`: upstreams in turn, each attempt
    /// an equal share of the time left. `None` once the deadline passed.
    fn attempt(&self, n: u32, deadline: Instant) -> Option<(SocketAddr, Instant)> {
        if self.upstreams.is_empty() {
            return None;
        }
        let idx = usize::try_from(n).ok()? % self.upstreams.len();
        let upstream = *self.upstreams.get(idx)?;
        let now = Instant::now();
        let left = deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())?;
        let share = left / self.attempts.saturating_sub(n).max(1);
        Some((upstream, now + share))
    }

    /// Asks the upstreams one question; no cache.
    async fn resolve(&self, name: &str, rtype: RecordType) -> Result<Answer, DnsError> {
        if self.upstreams.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no DNS upstream configured",
            )
            .into());
        }
        let qname = name_from_normalized(name).ok_or(DnsError::Malformed("invalid host name"))?;
        let mut q = Query::query(qname.clone(), rtype);
        q.set_query_class(DNSClass::IN);
        let deadline = self.deadline();
        let mut last = DnsError::Timeout;
        for attempt in 0..self.attempts {
            let Some((upstream, attempt_deadline)) = self.attempt(attempt, deadline) else {
                break;
            };
            let id: u16 = rand::random();
            let bytes = build_query(id, &qname, rtype)
                .ok_or(DnsError::Malformed("query could not be encoded"))?;
            match exchange(upstream, &bytes, id, &q, attempt_deadline).await {
                Ok(reply) => match interpret(&reply.msg, &qname, rtype) {
                    Ok(answer) => return Ok(answer),
                    Err(e @ (DnsError::ServFail | DnsError::Refused | DnsError::Malformed(_))) => {
                        last = e;
                    }
                    Err(e) => return Err(e),
                },
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

// === impl InflightGuard ===

impl InflightGuard {
    /// Asks upstream, caches, leaves the in-flight table, then wakes the
    /// waiters, in that order.
    async fn run(self, tx: watch::Sender<Shared>) {
        let (name, rtype) = (self.key.0.clone(), self.key.1);
        let outcome = self.inner.resolve(&name, rtype).await;
        if let Ok(answer) = &outcome {
            lock(&self.inner.cache).insert(self.key.clone(), answer, Instant::now().into_std());
        }
        drop(self);
        let _ = tx.send(Some(outcome));
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        lock(&self.inner.inflight).remove(&self.key);
    }
}

// === functions ===

/// The `nameserver` addresses of the system's resolv.conf, port 53. Empty
/// when the file is missing or lists none.
pub fn system_nameservers() -> Vec<SocketAddr> {
    std::fs::read_to_string(RESOLV_CONF)
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

/// The `nameserver` addresses of a resolv.conf text, port 53, at most three
/// (as glibc). Comments (`#`, `;`), other options, malformed addresses and
/// scoped IPv6 addresses (`fe80::1%eth0`) are skipped.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .take(MAX_NAMESERVERS)
        .collect()
}

/// Merges the per-family answers of one lookup (see [`Resolver::lookup`]).
fn combine<const N: usize>(parts: [Result<Answer, DnsError>; N]) -> Result<Lookup, DnsError> {
    let mut addrs = Vec::new();
    let mut ttl: Option<Duration> = None;
    let mut negative: Option<Duration> = None;
    let mut error: Option<DnsError> = None;
    for part in parts {
        match part {
            Ok(Answer::Addrs { addrs: a, ttl: t }) => {
                addrs.extend(a);
                ttl = Some(ttl.map_or(t, |x| x.min(t)));
            }
            Ok(Answer::NoData { ttl: t }) => negative = Some(negative.map_or(t, |x| x.min(t))),
            Ok(Answer::NxDomain { .. }) => {
                error.get_or_insert(DnsError::NxDomain);
            }
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    if !addrs.is_empty() {
        return Ok(Lookup {
            addrs,
            ttl: ttl.unwrap_or_default(),
        });
    }
    match error {
        Some(e) => Err(e),
        None => Ok(Lookup {
            addrs,
            ttl: negative.unwrap_or_default(),
        }),
    }
}

/// Reads the answer to `qname`/`rtype` out of a matching reply: the RCODE,
/// then the records along the CNAME chain that starts at `qname`. Records
/// off the chain, of another class or of another type are ignored.
pub(crate) fn interpret(
    msg: &Message,
    qname: &Name,
    rtype: RecordType,
) -> Result<Answer, DnsError> {
    match msg.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => {
            return Ok(Answer::NxDomain {
                ttl: negative_ttl(msg),
            })
        }
        code => return Err(rcode_error(code)),
    }
    let mut current = qname.clone();
    let mut ttl = u32::MAX;
    let mut addrs = Vec::new();
    for _ in 0..=MAX_CNAME_HOPS {
        let mut cname: Option<(Name, u32)> = None;
        let mut min_addr_ttl = u32::MAX;
        for r in &msg.answers {
            if r.dns_class != DNSClass::IN || r.name != current {
                continue;
            }
            match (&r.data, rtype) {
                (RData::A(a), RecordType::A) => {
                    addrs.push(IpAddr::V4(a.0));
                    min_addr_ttl = min_addr_ttl.min(r.ttl);
                }
                (RData::AAAA(a), RecordType::AAAA) => {
                    addrs.push(IpAddr::V6(a.0));
                    min_addr_ttl = min_addr_ttl.min(r.ttl);
                }
                (RData::CNAME(c), _) if cname.is_none() => cname = Some((c.0.clone(), r.ttl)),
                _ => {}
            }
        }
        if !addrs.is_empty() {
            ttl = ttl.min(min_addr_ttl);
            break;
        }
        match cname {
            Some((target, t)) => {
                ttl = ttl.min(t);
                current = target;
            }
            None => break,
        }
    }
    if addrs.is_empty() {
        return Ok(Answer::NoData {
            ttl: negative_ttl(msg),
        });
    }
    let ttl = Duration::from_secs(u64::from(ttl)).min(MAX_CACHE_TTL);
    Ok(Answer::Addrs { addrs, ttl })
}

/// RFC 2308 negative TTL: the smaller of the authority SOA's own TTL and its
/// MINIMUM, capped at [`MAX_NEGATIVE_TTL`]; zero (not cached) without SOA.
pub(crate) fn negative_ttl(msg: &Message) -> Duration {
    msg.authorities
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
            _ => None,
        })
        .map_or(Duration::ZERO, |s| {
            Duration::from_secs(u64::from(s)).min(MAX_NEGATIVE_TTL)
        })
}

/// The error for a non-answer RCODE.
fn rcode_error(code: ResponseCode) -> DnsError {
    match code {
        ResponseCode::NXDomain => DnsError::NxDomain,
        ResponseCode::Refused | ResponseCode::NotImp => DnsError::Refused,
        ResponseCode::FormErr => DnsError::Malformed("the upstream answered FORMERR"),
        _ => DnsError::ServFail,
    }
}

/// Writes `id` into the first two bytes of a message.
fn set_id(msg: &mut [u8], id: u16) {
    if let Some(head) = msg.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
}

/// Locks a mutex, ignoring poisoning (the data stay consistent: every
/// critical section is a single map operation).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
