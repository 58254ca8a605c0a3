//! The sandbox's DNS server: policy before forwarding, hardened parsing,
//! `ech` stripping, a per-server rate limit. See the module docs of `dns`
//! for the decision table.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::wire::{
    build_query, header_only, lossy_name, name_from_normalized, normalize_name, raw_header,
    strip_ech, EDNS_PAYLOAD, HEADER_LEN,
};
use super::Resolver;
use crate::policy::{CompiledPolicy, Mode};

/// Queries per second one server answers before it answers REFUSED (also
/// the burst size).
pub const DEFAULT_RATE_LIMIT: u32 = 200;
/// Most TCP connections one server keeps open; further ones are closed at
/// once.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection that completes no query for this long is closed.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most UDP queries one server has in flight; beyond, REFUSED at once.
const MAX_UDP_INFLIGHT: usize = 256;
/// Most queries in flight on one TCP connection; reading pauses beyond.
const MAX_TCP_PIPELINE: usize = 16;
/// Largest UDP reply to a client without EDNS.
const CLASSIC_UDP: u16 = 512;
/// Pause after a failing `accept` / `recv` so a persistent error cannot spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// What the sandbox's resolver does with a question.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DnsDecision {
    /// Ask the upstream and relay its answer.
    Forward,
    /// Answer NXDOMAIN without asking anyone (`custom`, name not allowed).
    NxDomain,
    /// Answer REFUSED without asking anyone (`deny-all`).
    Refused,
}

/// The policy the server consults, on normalised names (lower case, no
/// trailing dot), before anything is forwarded.
pub trait DnsPolicy: Send + Sync {
    /// The decision for one question name.
    fn decide(&self, qname: &str) -> DnsDecision;
    /// Whether the sandbox has IPv6; without it AAAA questions get an empty
    /// answer and are not forwarded.
    fn ipv6(&self) -> bool;
}

/// Where the server reports what it did.
pub trait DnsEvents: Send + Sync {
    /// A question refused or answered NXDOMAIN by policy, or refused for an
    /// invalid name (`qname` is then a printable rendering). Rate-limited
    /// queries are not reported one by one.
    fn denied(&self, qname: &str, qtype: u16, decision: DnsDecision);
    /// A forwarded question's answer was relayed; `addrs` are its A / AAAA
    /// records (possibly none).
    fn answered(&self, qname: &str, addrs: &[IpAddr]);
}

/// [`DnsEvents`] that reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoEvents;

/// A [`DnsPolicy`] over a live-updatable [`CompiledPolicy`].
#[derive(Debug)]
pub struct PolicyDns {
    policy: RwLock<Arc<CompiledPolicy>>,
    ipv6: bool,
}

/// One sandbox's DNS server: policy, upstream, events and one rate-limit
/// budget shared by its UDP and TCP listeners. Cheap to clone.
#[derive(Clone)]
pub struct DnsServer {
    inner: Arc<ServerInner>,
}

struct ServerInner {
    policy: Arc<dyn DnsPolicy>,
    resolver: Arc<Resolver>,
    events: Arc<dyn DnsEvents>,
    limiter: TokenBucket,
}

/// Token bucket: `rate` tokens per second, at most `rate` stored.
pub(crate) struct TokenBucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

/// How a reply travels, which bounds its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

// === impl NoEvents ===

impl DnsEvents for NoEvents {
    fn denied(&self, _: &str, _: u16, _: DnsDecision) {}
    fn answered(&self, _: &str, _: &[IpAddr]) {}
}

// === impl PolicyDns ===

impl PolicyDns {
    /// Decides with `policy`; `ipv6` tells whether the sandbox has IPv6.
    pub fn new(policy: Arc<CompiledPolicy>, ipv6: bool) -> Self {
        Self {
            policy: RwLock::new(policy),
            ipv6,
        }
    }

    /// Replaces the policy; the next question sees it.
    pub fn set(&self, policy: Arc<CompiledPolicy>) {
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = policy;
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<CompiledPolicy> {
        Arc::clone(&self.policy.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl DnsPolicy for PolicyDns {
    fn decide(&self, qname: &str) -> DnsDecision {
        policy_decision(&self.current(), qname)
    }

    fn ipv6(&self) -> bool {
        self.ipv6
    }
}

// === impl DnsServer ===

impl DnsServer {
    /// A server with the default rate limit.
    pub fn new(
        policy: Arc<dyn DnsPolicy>,
        resolver: Arc<Resolver>,
        events: Arc<dyn DnsEvents>,
    ) -> Self {
        Self::with_rate_limit(policy, resolver, events, DEFAULT_RATE_LIMIT)
    }

    /// A server answering at most `qps` queries per second (burst `qps`).
    pub fn with_rate_limit(
        policy: Arc<dyn DnsPolicy>,
        resolver: Arc<Resolver>,
        events: Arc<dyn DnsEvents>,
        qps: u32,
    ) -> Self {
        Self {
            inner: Arc::new(ServerInner {
                policy,
                resolver,
                events,
                limiter: TokenBucket::new(qps),
            }),
        }
    }

    /// Answers queries arriving on `sock` until the future is dropped. Each
    /// query is handled in its own task (at most 256 at once, REFUSED
    /// beyond); dropping the future aborts them.
    pub async fn serve_udp(&self, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let mut tasks = JoinSet::new();
        loop {
            let readable = tokio::select! {
                r = sock.readable() => r,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            };
            // The datagram buffer exists only while a datagram is read: an
            // idle sandbox's two UDP servers hold none (64 KiB each).
            let received = match readable {
                Ok(()) => {
                    let mut buf = vec![0u8; 65_535];
                    sock.try_recv_from(&mut buf)
                        .map(|(n, peer)| (buf.get(..n).map(<[u8]>::to_vec), peer))
                }
                Err(e) => Err(e),
            };
            let (query, peer) = match received {
                Ok((Some(q), peer)) => (q, peer),
                Ok((None, _)) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => {
                    tokio::time::sleep(ERROR_BACKOFF).await;
                    continue;
                }
            };
            while tasks.try_join_next().is_some() {}
            if tasks.len() >= MAX_UDP_INFLIGHT {
                if let Some((id, opcode, rd, false)) = raw_header(&query) {
                    let reply = header_only(id, opcode, rd, ResponseCode::Refused);
                    let _ = sock.send_to(&reply, peer).await;
                }
                continue;
            }
            let inner = Arc::clone(&self.inner);
            let sock = Arc::clone(&sock);
            tasks.spawn(async move {
                if let Some(reply) = inner.answer(&query, Transport::Udp).await {
                    let _ = send_udp(&sock, &reply, peer).await;
                }
            });
        }
    }

    /// Answers length-prefixed queries on connections accepted from
    /// `listener` until the future is dropped: several queries per
    /// connection, answered as they complete (up to 16 in flight), at most
    /// [`MAX_TCP_CONNECTIONS`] connections, each closed after
    /// [`TCP_IDLE_TIMEOUT`] without a complete query.
    pub async fn serve_tcp(&self, listener: TcpListener) {
        let mut conns = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(ERROR_BACKOFF).await;
                    continue;
                }
            };
            while conns.try_join_next().is_some() {}
            if conns.len() >= MAX_TCP_CONNECTIONS {
                drop(stream);
                continue;
            }
            let inner = Arc::clone(&self.inner);
            conns.spawn(serve_conn(inner, stream));
        }
    }

    /// The reply to one raw query (`None`: send nothing), as over UDP.
    /// Exposed for callers that receive queries some other way.
    pub async fn answer_udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.inner.answer(query, Transport::Udp).await
    }
}

/// [`DnsServer::serve_udp`] with a server of its own (its own rate-limit
/// budget; build one [`DnsServer`] to share it with TCP).
pub async fn serve_udp(
    sock: UdpSocket,
    policy: Arc<dyn DnsPolicy>,
    resolver: Arc<Resolver>,
    events: Arc<dyn DnsEvents>,
) {
    DnsServer::new(policy, resolver, events)
        .serve_udp(sock)
        .await;
}

/// [`DnsServer::serve_tcp`] with a server of its own (its own rate-limit
/// budget; build one [`DnsServer`] to share it with UDP).
pub async fn serve_tcp(
    listener: TcpListener,
    policy: Arc<dyn DnsPolicy>,
    resolver: Arc<Resolver>,
    events: Arc<dyn DnsEvents>,
) {
    DnsServer::new(policy, resolver, events)
        .serve_tcp(listener)
        .await;
}

/// The sandbox-resolver decision of a compiled policy: `deny-all` →
/// REFUSED; a name [`CompiledPolicy::name_allowed`] accepts → forward;
/// anything else (a `custom` name matching neither `allow_domains` nor a
/// transform) → NXDOMAIN.
pub fn policy_decision(policy: &CompiledPolicy, qname: &str) -> DnsDecision {
    if policy.mode() == Mode::DenyAll {
        DnsDecision::Refused
    } else if policy.name_allowed(qname) {
        DnsDecision::Forward
    } else {
        DnsDecision::NxDomain
    }
}

// === impl ServerInner ===

impl ServerInner {
    /// Everything between a received query and the reply to send.
    async fn answer(&self, bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
        // Too short for a header, or a response (never answer those:
        // no loops, no reflection).
        let (id, opcode, rd, qr) = raw_header(bytes)?;
        if qr {
            return None;
        }
        if !self.limiter.take() {
            return Some(header_only(id, opcode, rd, ResponseCode::Refused));
        }
        let Ok(query) = Message::from_vec(bytes) else {
            return Some(header_only(id, opcode, rd, ResponseCode::FormErr));
        };
        if query.metadata.op_code != OpCode::Query {
            return Some(header_only(id, opcode, rd, ResponseCode::NotImp));
        }
        let (Some(q), 1) = (query.queries.first(), query.queries.len()) else {
            return Some(header_only(id, opcode, rd, ResponseCode::FormErr));
        };
        if !query.answers.is_empty() || !query.authorities.is_empty() {
            return Some(header_only(id, opcode, rd, ResponseCode::FormErr));
        }
        let reply = Reply {
            query: &query,
            q,
            transport,
        };
        let qtype = q.query_type();
        match qtype {
            RecordType::OPT | RecordType::TSIG => return reply.empty(ResponseCode::FormErr),
            RecordType::ANY | RecordType::AXFR | RecordType::IXFR => {
                return reply.empty(ResponseCode::NotImp)
            }
            RecordType::Unknown(253 | 254) => return reply.empty(ResponseCode::NotImp),
            _ => {}
        }
        if q.query_class() != DNSClass::IN {
            return reply.empty(ResponseCode::NotImp);
        }
        let Some(qname) = normalize_name(q.name()) else {
            self.events.denied(
                &lossy_name(q.name()),
                u16::from(qtype),
                DnsDecision::Refused,
            );
            return reply.empty(ResponseCode::Refused);
        };
        match self.policy.decide(&qname) {
            DnsDecision::Forward => {}
            decision @ DnsDecision::Refused => {
                self.events.denied(&qname, u16::from(qtype), decision);
                return reply.empty(ResponseCode::Refused);
            }
            decision @ DnsDecision::NxDomain => {
                self.events.denied(&qname, u16::from(qtype), decision);
                return reply.empty(ResponseCode::NXDomain);
            }
        }
        if qtype == RecordType::AAAA && !self.policy.ipv6() {
            return reply.empty(ResponseCode::NoError);
        }
        let Some(upstream_query) =
            name_from_normalized(&qname).and_then(|name| build_query(0, &name, qtype))
        else {
            return reply.empty(ResponseCode::ServFail);
        };
        let relayed = match self.resolver.forward(&upstream_query).await {
            Ok(raw) => Message::from_vec(&raw).ok(),
            Err(_) => None,
        };
        let Some(mut upstream) = relayed else {
            return reply.empty(ResponseCode::ServFail);
        };
        strip_ech(&mut upstream);
        let addrs: Vec<IpAddr> = upstream
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        self.events.answered(&qname, &addrs);
        let rcode = match upstream.metadata.response_code {
            c @ (ResponseCode::NoError
            | ResponseCode::NXDomain
            | ResponseCode::ServFail
            | ResponseCode::Refused
            | ResponseCode::NotImp) => c,
            _ => ResponseCode::ServFail,
        };
        reply.with(rcode, upstream.answers, upstream.authorities)
    }
}

/// Builds the replies to one parsed query.
struct Reply<'a> {
    query: &'a Message,
    q: &'a Query,
    transport: Transport,
}

impl Reply<'_> {
    /// A reply with the question and no records.
    fn empty(&self, rcode: ResponseCode) -> Option<Vec<u8>> {
        self.with(rcode, Vec::new(), Vec::new())
    }

    /// The client's id, RD/CD bits and question; RA set; the given RCODE
    /// and records; an OPT record when the client sent one. Too large for
    /// the client's UDP size → the question alone with TC set.
    fn with(
        &self,
        rcode: ResponseCode,
        answers: Vec<Record>,
        authorities: Vec<Record>,
    ) -> Option<Vec<u8>> {
        let req = &self.query.metadata;
        let mut msg = Message::new(req.id, MessageType::Response, OpCode::Query);
        msg.metadata.recursion_desired = req.recursion_desired;
        msg.metadata.checking_disabled = req.checking_disabled;
        msg.metadata.recursion_available = true;
        msg.metadata.response_code = rcode;
        msg.add_query(self.q.clone());
        let limit = match (self.transport, &self.query.edns) {
            (Transport::Tcp, _) => usize::from(u16::MAX),
            (Transport::Udp, None) => usize::from(CLASSIC_UDP),
            (Transport::Udp, Some(e)) => {
                usize::from(e.max_payload().clamp(CLASSIC_UDP, EDNS_PAYLOAD))
            }
        };
        if self.query.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            msg.set_edns(edns);
        }
        let fallback = || {
            header_only(
                req.id,
                u8::from(req.op_code),
                req.recursion_desired,
                ResponseCode::ServFail,
            )
        };
        let bare = msg.clone();
        msg.insert_answers(answers);
        msg.insert_authorities(authorities);
        let Ok(full) = msg.to_vec() else {
            return Some(fallback());
        };
        if full.len() <= limit {
            return Some(full);
        }
        if self.transport == Transport::Tcp {
            return Some(fallback());
        }
        let mut truncated = bare;
        truncated.metadata.truncation = true;
        Some(truncated.to_vec().unwrap_or_else(|_| fallback()))
    }
}

// === impl TokenBucket ===

impl TokenBucket {
    pub(crate) fn new(qps: u32) -> Self {
        let rate = f64::from(qps);
        Self {
            rate,
            state: Mutex::new((rate, Instant::now())),
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.rate;
        *tokens = (*tokens + refill).min(self.rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

// === functions ===

async fn send_udp(sock: &UdpSocket, reply: &[u8], peer: SocketAddr) -> std::io::Result<()> {
    sock.send_to(reply, peer).await.map(|_| ())
}

/// One TCP connection: a reader that hands each query to its own task, and
/// a writer that sends replies as they complete.
async fn serve_conn(inner: Arc<ServerInner>, stream: TcpStream) {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_TCP_PIPELINE);
    let reader = async move {
        let mut handlers = JoinSet::new();
        while let Ok(Some(query)) = tokio::time::timeout(TCP_IDLE_TIMEOUT, read_frame(&mut rd))
            .await
            .unwrap_or(Ok(None))
        {
            while handlers.len() >= MAX_TCP_PIPELINE {
                if handlers.join_next().await.is_none() {
                    break;
                }
            }
            let inner = Arc::clone(&inner);
            let tx = tx.clone();
            handlers.spawn(async move {
                if let Some(reply) = inner.answer(&query, Transport::Tcp).await {
                    let _ = tx.send(reply).await;
                }
            });
        }
        drop(tx);
        while handlers.join_next().await.is_some() {}
    };
    let writer = async move {
        while let Some(reply) = rx.recv().await {
            let Ok(len) = u16::try_from(reply.len()) else {
                continue;
            };
            let mut frame = Vec::with_capacity(reply.len() + 2);
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(&reply);
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// One length-prefixed message; `None` at a clean end of stream, or for a
/// frame too short to hold a header (the connection is then closed).
async fn read_frame(rd: &mut OwnedReadHalf) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match rd.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(u16::from_be_bytes(len));
    if len < HEADER_LEN {
        return Ok(None);
    }
    let mut buf = vec![0u8; len];
    rd.read_exact(&mut buf).await?;
    Ok(Some(buf))
}
