//! DNS tests against a scripted authoritative server on 127.0.0.1 that
//! counts every question it receives, by name and by transport.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::svcb::{
    Alpn, EchConfigList, Mandatory, SvcParamKey, SvcParamValue, SVCB,
};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use super::cache::Answer;
use super::server::TokenBucket;
use super::wire::{normalize_text, strip_ech};
use super::*;
use crate::policy::{CompiledPolicy, Floor, Mode, NetworkPolicy};

// ---------------------------------------------------------------------------
// The scripted upstream
// ---------------------------------------------------------------------------

/// How the upstream answers one (name, type).
#[derive(Clone, Default)]
struct Script {
    rcode: Option<ResponseCode>,
    answers: Vec<Record>,
    /// When non-empty, query n gets `seq[n % len]` instead of `answers`.
    seq: Vec<Vec<Record>>,
    authorities: Vec<Record>,
    /// Over UDP: an empty reply with TC set.
    truncate_udp: bool,
    /// Before the real reply: forged replies (wrong id, wrong name, wrong
    /// type, a query instead of a response) carrying 10.6.6.6.
    spoof: bool,
    /// Send no real reply at all.
    silent: bool,
    /// Wait before the real reply.
    delay: Duration,
}

#[derive(Default)]
struct UpstreamState {
    table: Mutex<HashMap<(String, RecordType), Script>>,
    by_name: Mutex<HashMap<String, usize>>,
    served: Mutex<HashMap<(String, RecordType), usize>>,
    udp: AtomicUsize,
    tcp: AtomicUsize,
    /// (source port, id) of every UDP question.
    sources: Mutex<Vec<(u16, u16)>>,
}

struct Upstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

const SPOOF_IP: Ipv4Addr = Ipv4Addr::new(10, 6, 6, 6);

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Upstream {
    /// UDP and TCP on the same 127.0.0.1 port.
    async fn start() -> Self {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = TcpListener::bind(addr).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let state = Arc::new(UpstreamState::default());
        let udp = Arc::new(udp);
        let st = Arc::clone(&state);
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                let data = buf[..n].to_vec();
                let st = Arc::clone(&st);
                let udp = Arc::clone(&udp);
                tokio::spawn(async move {
                    st.udp.fetch_add(1, Ordering::SeqCst);
                    if data.len() >= 2 {
                        let id = u16::from_be_bytes([data[0], data[1]]);
                        st.sources.lock().unwrap().push((peer.port(), id));
                    }
                    for reply in st.respond(&data, true).await {
                        let _ = udp.send_to(&reply, peer).await;
                    }
                });
            }
        });
        let st = Arc::clone(&state);
        let tcp_task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = tcp.accept().await else {
                    continue;
                };
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    loop {
                        let mut len = [0u8; 2];
                        if s.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut data = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if s.read_exact(&mut data).await.is_err() {
                            return;
                        }
                        st.tcp.fetch_add(1, Ordering::SeqCst);
                        // Over TCP only the real reply is sent.
                        if let Some(reply) = st.respond(&data, false).await.pop() {
                            let mut frame = (reply.len() as u16).to_be_bytes().to_vec();
                            frame.extend_from_slice(&reply);
                            if s.write_all(&frame).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            state,
            tasks: vec![udp_task, tcp_task],
        }
    }

    fn script(&self, name: &str, rtype: RecordType, script: Script) {
        self.state
            .table
            .lock()
            .unwrap()
            .insert((key(name), rtype), script);
    }

    /// Questions received for `name` (any type, UDP and TCP).
    fn count(&self, name: &str) -> usize {
        *self
            .state
            .by_name
            .lock()
            .unwrap()
            .get(&key(name))
            .unwrap_or(&0)
    }

    /// Questions received in all.
    fn total(&self) -> usize {
        self.state.udp.load(Ordering::SeqCst) + self.state.tcp.load(Ordering::SeqCst)
    }

    fn resolver(&self, timeout: Duration, attempts: u32) -> Resolver {
        Resolver::new(ResolverConfig {
            upstreams: vec![self.addr],
            timeout,
            attempts,
            cache_entries: 1000,
        })
    }
}

impl UpstreamState {
    /// Replies to send, in order (forgeries first, the real one last).
    async fn respond(&self, data: &[u8], udp: bool) -> Vec<Vec<u8>> {
        let Ok(query) = Message::from_vec(data) else {
            return vec![];
        };
        let Some(q) = query.queries.first().cloned() else {
            return vec![];
        };
        let name = key(&q.name().to_ascii());
        *self
            .by_name
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_default() += 1;
        let k = (name, q.query_type());
        let script = self.table.lock().unwrap().get(&k).cloned();
        let n = {
            let mut served = self.served.lock().unwrap();
            let e = served.entry(k).or_default();
            *e += 1;
            *e - 1
        };
        let id = query.metadata.id;
        let reply = |id: u16, q: Query, rcode, answers: Vec<Record>, auth: Vec<Record>, tc| {
            let mut m = Message::new(id, MessageType::Response, OpCode::Query);
            m.metadata.recursion_available = true;
            m.metadata.recursion_desired = true;
            m.metadata.response_code = rcode;
            m.metadata.truncation = tc;
            m.add_query(q);
            m.insert_answers(answers);
            m.insert_authorities(auth);
            m.to_vec().unwrap()
        };
        let Some(script) = script else {
            return vec![reply(id, q, ResponseCode::NXDomain, vec![], vec![], false)];
        };
        let mut out = Vec::new();
        if script.spoof && udp {
            let bad = vec![a_rec(&q.name().to_ascii(), 300, SPOOF_IP)];
            out.push(reply(
                id ^ 0x5a5a,
                q.clone(),
                ResponseCode::NoError,
                bad.clone(),
                vec![],
                false,
            ));
            let mut other = q.clone();
            other.set_name(Name::from_ascii("other.test.").unwrap());
            out.push(reply(
                id,
                other,
                ResponseCode::NoError,
                bad.clone(),
                vec![],
                false,
            ));
            let mut other = q.clone();
            other.set_query_type(RecordType::MX);
            out.push(reply(
                id,
                other,
                ResponseCode::NoError,
                bad.clone(),
                vec![],
                false,
            ));
            let mut as_query = Message::from_vec(&reply(
                id,
                q.clone(),
                ResponseCode::NoError,
                bad,
                vec![],
                false,
            ))
            .unwrap();
            as_query.metadata.message_type = MessageType::Query;
            out.push(as_query.to_vec().unwrap());
        }
        if script.silent {
            return out;
        }
        if !script.delay.is_zero() {
            tokio::time::sleep(script.delay).await;
        }
        let answers = if script.seq.is_empty() {
            script.answers.clone()
        } else {
            script.seq[n % script.seq.len()].clone()
        };
        let rcode = script.rcode.unwrap_or(ResponseCode::NoError);
        if script.truncate_udp && udp {
            out.push(reply(id, q, rcode, vec![], vec![], true));
        } else {
            out.push(reply(
                id,
                q,
                rcode,
                answers,
                script.authorities.clone(),
                false,
            ));
        }
        out
    }
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn a_rec(owner: &str, ttl: u32, ip: Ipv4Addr) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(ip)))
}

fn aaaa_rec(owner: &str, ttl: u32, ip: Ipv6Addr) -> Record {
    Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip)))
}

fn cname_rec(owner: &str, ttl: u32, target: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
}

fn soa_rec(zone: &str, ttl: u32, minimum: u32) -> Record {
    let soa = SOA::new(
        name("ns.test."),
        name("hostmaster.test."),
        1,
        3600,
        600,
        86400,
        minimum,
    );
    Record::from_rdata(name(zone), ttl, RData::SOA(soa))
}

fn answer(records: Vec<Record>) -> Script {
    Script {
        answers: records,
        ..Script::default()
    }
}

const PUBLIC: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);
const PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

// ---------------------------------------------------------------------------
// Resolver
// ---------------------------------------------------------------------------

#[tokio::test]
async fn cache_honours_ttl() {
    let up = Upstream::start().await;
    up.script(
        "ttl.test",
        RecordType::A,
        answer(vec![a_rec("ttl.test.", 1, PUBLIC)]),
    );
    let r = up.resolver(secs(2.0), 1);

    let first = r.lookup("ttl.test", false).await.unwrap();
    assert_eq!(first.addrs, vec![IpAddr::V4(PUBLIC)]);
    assert_eq!(first.ttl, Duration::from_secs(1));
    let second = r.lookup("TTL.test.", false).await.unwrap();
    assert_eq!(second.addrs, first.addrs);
    assert!(second.ttl <= Duration::from_secs(1));
    assert_eq!(
        up.count("ttl.test"),
        1,
        "second lookup must come from the cache"
    );

    tokio::time::sleep(secs(1.1)).await;
    r.lookup("ttl.test", false).await.unwrap();
    assert_eq!(up.count("ttl.test"), 2, "expired entry must be asked again");
}

#[tokio::test]
async fn ttl_zero_is_never_cached_and_rebinding_answers_are_fresh() {
    let up = Upstream::start().await;
    up.script(
        "rebind.test",
        RecordType::A,
        Script {
            seq: vec![
                vec![a_rec("rebind.test.", 0, PUBLIC)],
                vec![a_rec("rebind.test.", 0, PRIVATE)],
            ],
            ..Script::default()
        },
    );
    let r = up.resolver(secs(2.0), 1);
    let policy = compiled(Mode::AllowAll, &[]);
    let mut dialable_private = 0;
    for i in 0..20 {
        let l = r.lookup("rebind.test", false).await.unwrap();
        let want = if i % 2 == 0 { PUBLIC } else { PRIVATE };
        assert_eq!(l.addrs, vec![IpAddr::V4(want)], "lookup {i}");
        assert_eq!(l.ttl, Duration::ZERO);
        dialable_private += l
            .addrs
            .iter()
            .filter(|ip| policy.check_resolved(**ip).is_ok() && crate::policy::is_private(**ip))
            .count();
    }
    assert_eq!(up.count("rebind.test"), 20, "every TTL-0 lookup asks again");
    let sources = up.state.sources.lock().unwrap().clone();
    let ports: std::collections::HashSet<u16> = sources.iter().map(|s| s.0).collect();
    let ids: std::collections::HashSet<u16> = sources.iter().map(|s| s.1).collect();
    assert!(
        ports.len() >= 15 && ids.len() >= 15,
        "ports {ports:?} ids {ids:?}"
    );
    assert_eq!(r.cache_len(), 0);
    assert_eq!(dialable_private, 0);
}

#[tokio::test]
async fn concurrent_identical_lookups_are_coalesced() {
    let up = Upstream::start().await;
    up.script(
        "slow.test",
        RecordType::A,
        Script {
            answers: vec![a_rec("slow.test.", 60, PUBLIC)],
            delay: secs(0.3),
            ..Script::default()
        },
    );
    let r = up.resolver(secs(3.0), 1);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let r = r.clone();
        set.spawn(async move { r.lookup("slow.test", false).await });
    }
    let mut n = 0;
    while let Some(res) = set.join_next().await {
        assert_eq!(res.unwrap().unwrap().addrs, vec![IpAddr::V4(PUBLIC)]);
        n += 1;
    }
    assert_eq!(n, 10);
    assert_eq!(up.count("slow.test"), 1);
}

#[tokio::test]
async fn coalescing_with_ttl_zero_still_shares_one_query() {
    let up = Upstream::start().await;
    up.script(
        "slow0.test",
        RecordType::A,
        Script {
            answers: vec![a_rec("slow0.test.", 0, PUBLIC)],
            delay: secs(0.3),
            ..Script::default()
        },
    );
    let r = up.resolver(secs(3.0), 1);
    let lookups = (0..10).map(|_| r.lookup("slow0.test", false));
    let results = futures_join_all(lookups).await;
    assert!(results
        .iter()
        .all(|l| l.as_ref().unwrap().addrs == vec![IpAddr::V4(PUBLIC)]));
    assert_eq!(up.count("slow0.test"), 1);
    // Nothing cached: the next lookup asks again.
    r.lookup("slow0.test", false).await.unwrap();
    assert_eq!(up.count("slow0.test"), 2);
}

/// Polls futures concurrently on the current task (no extra dependency).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn truncated_udp_reply_falls_back_to_tcp() {
    let up = Upstream::start().await;
    up.script(
        "big.test",
        RecordType::A,
        Script {
            answers: (1..=40)
                .map(|i| a_rec("big.test.", 60, Ipv4Addr::new(93, 184, 0, i)))
                .collect(),
            truncate_udp: true,
            ..Script::default()
        },
    );
    let r = up.resolver(secs(2.0), 1);
    let l = r.lookup("big.test", false).await.unwrap();
    assert_eq!(l.addrs.len(), 40);
    assert_eq!(up.state.udp.load(Ordering::SeqCst), 1);
    assert_eq!(up.state.tcp.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn forged_replies_are_ignored() {
    let up = Upstream::start().await;
    up.script(
        "spoofed.test",
        RecordType::A,
        Script {
            answers: vec![a_rec("spoofed.test.", 60, PUBLIC)],
            spoof: true,
            delay: secs(0.1),
            ..Script::default()
        },
    );
    let r = up.resolver(secs(2.0), 1);
    let l = r.lookup("spoofed.test", false).await.unwrap();
    assert_eq!(
        l.addrs,
        vec![IpAddr::V4(PUBLIC)],
        "a forged reply was accepted"
    );
}

#[tokio::test]
async fn only_wrong_replies_end_in_timeout() {
    let up = Upstream::start().await;
    up.script(
        "wrongid.test",
        RecordType::A,
        Script {
            spoof: true,
            silent: true,
            ..Script::default()
        },
    );
    let r = up.resolver(secs(0.4), 1);
    let start = Instant::now();
    let err = r.lookup("wrongid.test", false).await.unwrap_err();
    assert!(matches!(err, DnsError::Timeout), "{err:?}");
    assert!(start.elapsed() >= secs(0.35));
    assert_eq!(up.count("wrongid.test"), 1);
}

#[tokio::test]
async fn cname_chain_is_followed_inside_the_answer_only() {
    let up = Upstream::start().await;
    up.script(
        "www.chain.test",
        RecordType::A,
        answer(vec![
            cname_rec("www.chain.test.", 300, "a.chain.test."),
            // Off the chain: must be ignored.
            a_rec("www.chain.test.evil.", 300, SPOOF_IP),
            a_rec("elsewhere.test.", 300, SPOOF_IP),
            cname_rec("a.chain.test.", 60, "B.Chain.Test."),
            a_rec("b.chain.test.", 120, Ipv4Addr::new(93, 184, 1, 1)),
            a_rec("b.chain.test.", 90, Ipv4Addr::new(93, 184, 1, 2)),
        ]),
    );
    let r = up.resolver(secs(2.0), 1);
    let l = r.lookup("www.chain.test", false).await.unwrap();
    assert_eq!(
        l.addrs,
        vec![
            IpAddr::V4(Ipv4Addr::new(93, 184, 1, 1)),
            IpAddr::V4(Ipv4Addr::new(93, 184, 1, 2))
        ]
    );
    assert_eq!(
        l.ttl,
        Duration::from_secs(60),
        "smallest TTL along the chain"
    );
    // Only the question was asked; the chain was not chased with new queries.
    assert_eq!(up.count("a.chain.test"), 0);
    assert_eq!(up.count("b.chain.test"), 0);
}

#[tokio::test]
async fn cname_loop_gives_nodata() {
    let up = Upstream::start().await;
    up.script(
        "loop.test",
        RecordType::A,
        answer(vec![
            cname_rec("loop.test.", 60, "loop2.test."),
            cname_rec("loop2.test.", 60, "loop.test."),
        ]),
    );
    let r = up.resolver(secs(2.0), 1);
    let l = r.lookup("loop.test", false).await.unwrap();
    assert!(l.addrs.is_empty());
}

#[tokio::test]
async fn nxdomain_is_cached_per_soa_minimum_capped() {
    let up = Upstream::start().await;
    up.script(
        "gone.test",
        RecordType::A,
        Script {
            rcode: Some(ResponseCode::NXDomain),
            authorities: vec![soa_rec("test.", 3600, 1)],
            ..Script::default()
        },
    );
    up.script(
        "gone-long.test",
        RecordType::A,
        Script {
            rcode: Some(ResponseCode::NXDomain),
            authorities: vec![soa_rec("test.", 3600, 600)],
            ..Script::default()
        },
    );
    up.script(
        "gone-nosoa.test",
        RecordType::A,
        Script {
            rcode: Some(ResponseCode::NXDomain),
            ..Script::default()
        },
    );
    let r = up.resolver(secs(2.0), 1);
    for _ in 0..2 {
        assert!(matches!(
            r.lookup("gone.test", false).await,
            Err(DnsError::NxDomain)
        ));
    }
    assert_eq!(up.count("gone.test"), 1, "NXDOMAIN with SOA is cached");
    tokio::time::sleep(secs(1.1)).await;
    assert!(matches!(
        r.lookup("gone.test", false).await,
        Err(DnsError::NxDomain)
    ));
    assert_eq!(up.count("gone.test"), 2, "negative TTL = SOA minimum");

    assert!(matches!(
        r.lookup("gone-long.test", false).await,
        Err(DnsError::NxDomain)
    ));
    let cached = r.cached_answer("gone-long.test", RecordType::A).unwrap();
    assert!(matches!(cached, Answer::NxDomain { .. }));
    assert!(cached.ttl() <= MAX_NEGATIVE_TTL && cached.ttl() > Duration::from_secs(25));

    for _ in 0..2 {
        assert!(matches!(
            r.lookup("gone-nosoa.test", false).await,
            Err(DnsError::NxDomain)
        ));
    }
    assert_eq!(
        up.count("gone-nosoa.test"),
        2,
        "no SOA, no negative caching"
    );
}

#[test]
fn negative_ttl_follows_rfc_2308_and_is_capped() {
    let with_soa = |ttl, minimum| {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = ResponseCode::NXDomain;
        m.add_authority(soa_rec("test.", ttl, minimum));
        super::resolver::negative_ttl(&m)
    };
    assert_eq!(
        with_soa(5, 20),
        Duration::from_secs(5),
        "the SOA's own TTL bounds it"
    );
    assert_eq!(with_soa(20, 5), Duration::from_secs(5), "MINIMUM bounds it");
    assert_eq!(with_soa(3600, 600), MAX_NEGATIVE_TTL);
    let bare = Message::new(1, MessageType::Response, OpCode::Query);
    assert_eq!(super::resolver::negative_ttl(&bare), Duration::ZERO);
}

#[tokio::test]
async fn nodata_is_cached_and_gives_an_empty_lookup() {
    let up = Upstream::start().await;
    up.script(
        "v6only.test",
        RecordType::A,
        Script {
            authorities: vec![soa_rec("test.", 60, 20)],
            ..Script::default()
        },
    );
    up.script(
        "v6only.test",
        RecordType::AAAA,
        answer(vec![aaaa_rec(
            "v6only.test.",
            60,
            "2001:db8::1".parse().unwrap(),
        )]),
    );
    let r = up.resolver(secs(2.0), 1);
    let l = r.lookup("v6only.test", false).await.unwrap();
    assert!(l.addrs.is_empty());
    assert_eq!(l.ttl, Duration::from_secs(20));
    let l = r.lookup("v6only.test", true).await.unwrap();
    assert_eq!(l.addrs, vec!["2001:db8::1".parse::<IpAddr>().unwrap()]);
    // A: once (then cached as NODATA); AAAA: once.
    assert_eq!(up.count("v6only.test"), 2);
}

#[tokio::test]
async fn servfail_and_timeouts_are_not_cached() {
    let up = Upstream::start().await;
    up.script(
        "broken.test",
        RecordType::A,
        Script {
            rcode: Some(ResponseCode::ServFail),
            ..Script::default()
        },
    );
    let r = up.resolver(secs(2.0), 1);
    for _ in 0..2 {
        assert!(matches!(
            r.lookup("broken.test", false).await,
            Err(DnsError::ServFail)
        ));
    }
    assert_eq!(up.count("broken.test"), 2);

    up.script(
        "refused.test",
        RecordType::A,
        Script {
            rcode: Some(ResponseCode::Refused),
            ..Script::default()
        },
    );
    assert!(matches!(
        r.lookup("refused.test", false).await,
        Err(DnsError::Refused)
    ));
}

#[tokio::test]
async fn attempts_retry_after_servfail_and_the_next_upstream_answers() {
    let bad = Upstream::start().await;
    bad.script(
        "retry.test",
        RecordType::A,
        Script {
            rcode: Some(ResponseCode::ServFail),
            ..Script::default()
        },
    );
    let good = Upstream::start().await;
    good.script(
        "retry.test",
        RecordType::A,
        answer(vec![a_rec("retry.test.", 60, PUBLIC)]),
    );
    let r = Resolver::new(ResolverConfig {
        upstreams: vec![bad.addr, good.addr],
        timeout: secs(2.0),
        attempts: 2,
        cache_entries: 10,
    });
    let l = r.lookup("retry.test", false).await.unwrap();
    assert_eq!(l.addrs, vec![IpAddr::V4(PUBLIC)]);
    assert_eq!((bad.count("retry.test"), good.count("retry.test")), (1, 1));
}

#[tokio::test]
async fn lookup_v6_merges_both_families() {
    let up = Upstream::start().await;
    up.script(
        "dual.test",
        RecordType::A,
        answer(vec![a_rec("dual.test.", 30, PUBLIC)]),
    );
    up.script(
        "dual.test",
        RecordType::AAAA,
        answer(vec![aaaa_rec(
            "dual.test.",
            10,
            "2001:db8::7".parse().unwrap(),
        )]),
    );
    let r = up.resolver(secs(2.0), 1);
    let l = r.lookup("dual.test", true).await.unwrap();
    assert_eq!(
        l.addrs,
        vec![IpAddr::V4(PUBLIC), "2001:db8::7".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(l.ttl, Duration::from_secs(10));
    let l = r.lookup("dual.test", false).await.unwrap();
    assert_eq!(l.addrs, vec![IpAddr::V4(PUBLIC)]);
}

#[tokio::test]
async fn invalid_names_are_not_looked_up() {
    let up = Upstream::start().await;
    let r = up.resolver(secs(1.0), 1);
    let long = vec!["a"; 130].join(".");
    for bad in [
        "",
        ".",
        "a..test",
        "a\0b.test",
        "1.2.3.4",
        "bad name.test",
        &long,
        "*.test",
    ] {
        let res = r.lookup(bad, false).await;
        assert!(
            matches!(res, Err(DnsError::Malformed(_))),
            "{bad:?}: {res:?}"
        );
    }
    assert_eq!(up.total(), 0);
}

#[tokio::test]
async fn no_upstream_is_an_io_error() {
    let r = Resolver::new(ResolverConfig {
        upstreams: vec![],
        timeout: secs(1.0),
        attempts: 2,
        cache_entries: 10,
    });
    assert!(matches!(
        r.lookup("x.test", false).await,
        Err(DnsError::Io(_))
    ));
}

#[tokio::test]
async fn forward_relays_raw_and_restores_the_id() {
    let up = Upstream::start().await;
    up.script(
        "fwd.test",
        RecordType::A,
        answer(vec![a_rec("fwd.test.", 60, PUBLIC)]),
    );
    let r = up.resolver(secs(2.0), 1);
    let q = query_bytes(0xbeef, "fwd.test.", RecordType::A, false);
    let raw = r.forward(&q).await.unwrap();
    let msg = Message::from_vec(&raw).unwrap();
    assert_eq!(msg.metadata.id, 0xbeef);
    assert_eq!(msg.answers.len(), 1);
    assert!(matches!(
        r.forward(b"\x00\x01garbage").await,
        Err(DnsError::Malformed(_))
    ));
    assert_eq!(up.count("fwd.test"), 1);
}

#[test]
fn resolv_conf_parsing() {
    let text = "# comment\nsearch example.com\nnameserver 10.0.0.2 # primary\n\
                nameserver ::1\nnameserver fe80::1%eth0\nnameserver bogus\n\
                ;nameserver 9.9.9.9\nnameserver 1.1.1.1\nnameserver 8.8.8.8\n";
    let got = parse_resolv_conf(text);
    assert_eq!(
        got,
        vec![
            "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
            "[::1]:53".parse().unwrap(),
            "1.1.1.1:53".parse().unwrap(),
        ]
    );
}

#[test]
fn name_normalisation() {
    assert_eq!(
        normalize_text("WWW.Example.COM.").as_deref(),
        Some("www.example.com")
    );
    assert_eq!(
        normalize_text("_srv._tcp.example.com").as_deref(),
        Some("_srv._tcp.example.com")
    );
    let max = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(max.len(), 253);
    assert!(normalize_text(&max).is_some());
    assert!(normalize_text(&format!("{max}e")).is_none());
    assert!(normalize_text(&format!("{}.test", "a".repeat(64))).is_none());
    for bad in [
        "",
        ".",
        "..",
        "a..b",
        ".a",
        "a.b..",
        "a\0.test",
        "a b.test",
        "é.test",
        "127.0.0.1",
        "x.0x7f",
    ] {
        assert!(normalize_text(bad).is_none(), "{bad:?}");
    }
}

// ---------------------------------------------------------------------------
// Sandbox server
// ---------------------------------------------------------------------------

fn compiled(mode: Mode, allow: &[&str]) -> Arc<CompiledPolicy> {
    let p = NetworkPolicy {
        mode,
        allow_domains: allow.iter().map(|s| s.to_string()).collect(),
        allow_cidrs: vec![],
        transforms: vec![],
    };
    Arc::new(CompiledPolicy::new(&p, Arc::new(Floor::platform())))
}

#[derive(Default)]
struct Recorder {
    denied: Mutex<Vec<(String, u16, DnsDecision)>>,
    answered: Mutex<Vec<(String, Vec<IpAddr>)>>,
}

impl DnsEvents for Recorder {
    fn denied(&self, qname: &str, qtype: u16, decision: DnsDecision) {
        self.denied
            .lock()
            .unwrap()
            .push((qname.to_string(), qtype, decision));
    }
    fn answered(&self, qname: &str, addrs: &[IpAddr]) {
        self.answered
            .lock()
            .unwrap()
            .push((qname.to_string(), addrs.to_vec()));
    }
}

/// A sandbox server on 127.0.0.1 (UDP and TCP) in front of `up`.
struct Sandbox {
    udp: SocketAddr,
    tcp: SocketAddr,
    policy: Arc<PolicyDns>,
    events: Arc<Recorder>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Sandbox {
    async fn start(up: &Upstream, policy: Arc<CompiledPolicy>, ipv6: bool) -> Self {
        Self::start_with(up, policy, ipv6, None, secs(2.0)).await
    }

    async fn start_with(
        up: &Upstream,
        policy: Arc<CompiledPolicy>,
        ipv6: bool,
        qps: Option<u32>,
        timeout: Duration,
    ) -> Self {
        let policy = Arc::new(PolicyDns::new(policy, ipv6));
        let events = Arc::new(Recorder::default());
        let resolver = Arc::new(up.resolver(timeout, 1));
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let tasks = match qps {
            None => vec![
                tokio::spawn(serve_udp(
                    udp,
                    policy.clone(),
                    resolver.clone(),
                    events.clone(),
                )),
                tokio::spawn(serve_tcp(tcp, policy.clone(), resolver, events.clone())),
            ],
            Some(qps) => {
                let server =
                    DnsServer::with_rate_limit(policy.clone(), resolver, events.clone(), qps);
                let s2 = server.clone();
                vec![
                    tokio::spawn(async move { server.serve_udp(udp).await }),
                    tokio::spawn(async move { s2.serve_tcp(tcp).await }),
                ]
            }
        };
        Self {
            udp: udp_addr,
            tcp: tcp_addr,
            policy,
            events,
            tasks,
        }
    }

    async fn ask(&self, via_tcp: bool, bytes: &[u8]) -> Option<Vec<u8>> {
        if via_tcp {
            tcp_exchange(self.tcp, bytes).await
        } else {
            udp_exchange(self.udp, bytes).await
        }
    }

    async fn query(&self, via_tcp: bool, qname: &str, qtype: RecordType) -> Message {
        let id = rand::random();
        let raw = self
            .ask(via_tcp, &query_bytes(id, qname, qtype, true))
            .await
            .expect("no reply");
        let msg = Message::from_vec(&raw).unwrap();
        assert_eq!(msg.metadata.id, id);
        assert_eq!(msg.metadata.message_type, MessageType::Response);
        msg
    }
}

fn query_bytes(id: u16, qname: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(qname).unwrap(), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

async fn udp_exchange(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(secs(3.0), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn tcp_exchange(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(server).await.unwrap();
    write_frame(&mut s, bytes).await;
    read_frame(&mut s, secs(3.0)).await
}

async fn write_frame(s: &mut TcpStream, bytes: &[u8]) {
    let mut frame = (bytes.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(bytes);
    s.write_all(&frame).await.unwrap();
}

async fn read_frame(s: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    tokio::time::timeout(wait, async {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.ok()?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf)
    })
    .await
    .ok()
    .flatten()
}

fn rcode(raw: &[u8]) -> u8 {
    raw[3] & 0x0f
}

const FORMERR: u8 = 1;
const NXDOMAIN: u8 = 3;
const NOTIMP: u8 = 4;
const REFUSED: u8 = 5;

#[tokio::test]
async fn deny_all_refuses_everything_and_forwards_nothing() {
    let up = Upstream::start().await;
    up.script(
        "allowed.test",
        RecordType::A,
        answer(vec![a_rec("allowed.test.", 60, PUBLIC)]),
    );
    let sb = Sandbox::start(&up, compiled(Mode::DenyAll, &["allowed.test"]), true).await;
    for via_tcp in [false, true] {
        for (n, t) in [
            ("allowed.test", RecordType::A),
            ("x.attacker.test", RecordType::TXT),
            ("allowed.test", RecordType::AAAA),
        ] {
            let m = sb.query(via_tcp, n, t).await;
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::Refused,
                "{n} {t} tcp={via_tcp}"
            );
            assert!(m.answers.is_empty());
        }
    }
    assert_eq!(up.total(), 0, "deny-all must not forward a single query");
    let denied = sb.events.denied.lock().unwrap();
    assert_eq!(denied.len(), 6);
    assert!(denied.iter().all(|(_, _, d)| *d == DnsDecision::Refused));
}

#[tokio::test]
async fn custom_unlisted_names_get_nxdomain_unforwarded() {
    let up = Upstream::start().await;
    let exfil = "c2VjcmV0LWRhdGE.attacker.test";
    up.script(
        exfil,
        RecordType::A,
        answer(vec![a_rec("x.attacker.test.", 60, PUBLIC)]),
    );
    let sb = Sandbox::start(
        &up,
        compiled(Mode::Custom, &["allowed.test", "*.api.test"]),
        true,
    )
    .await;
    for via_tcp in [false, true] {
        for (n, t) in [
            (exfil, RecordType::A),
            (exfil, RecordType::TXT),
            ("api.test", RecordType::A), // the wildcard never matches its apex
            ("allowed.test.attacker.test", RecordType::A),
        ] {
            let m = sb.query(via_tcp, n, t).await;
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::NXDomain,
                "{n} tcp={via_tcp}"
            );
            assert!(m.answers.is_empty());
            // The client's question is echoed.
            assert_eq!(m.queries.len(), 1);
            assert_eq!(m.queries[0].query_type(), t);
        }
    }
    assert_eq!(
        up.count(exfil),
        0,
        "the exfiltration name reached the upstream"
    );
    assert_eq!(up.total(), 0);
    let denied = sb.events.denied.lock().unwrap();
    assert!(denied
        .iter()
        .any(|(n, t, d)| n == &exfil.to_ascii_lowercase()
            && *t == 16
            && *d == DnsDecision::NxDomain));
}

#[tokio::test]
async fn allowed_names_are_forwarded_and_reported() {
    let up = Upstream::start().await;
    up.script(
        "allowed.test",
        RecordType::A,
        answer(vec![a_rec("allowed.test.", 60, PUBLIC)]),
    );
    up.script(
        "v1.api.test",
        RecordType::A,
        answer(vec![
            cname_rec("v1.api.test.", 60, "lb.api.test."),
            a_rec("lb.api.test.", 60, PRIVATE),
        ]),
    );
    let sb = Sandbox::start(
        &up,
        compiled(Mode::Custom, &["allowed.test", "*.api.test"]),
        false,
    )
    .await;
    let m = sb.query(false, "AlLoWeD.TeSt.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.recursion_available);
    assert_eq!(
        m.queries[0].name().to_ascii(),
        "AlLoWeD.TeSt.",
        "question echoed as asked"
    );
    assert_eq!(m.answers.len(), 1);
    assert!(matches!(m.answers[0].data, RData::A(A(ip)) if ip == PUBLIC));
    assert!(m.edns.is_some(), "EDNS answered with EDNS");
    assert_eq!(up.count("allowed.test"), 1);

    let m = sb.query(true, "v1.api.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 2, "A answers are relayed as they are");
    assert_eq!(up.count("v1.api.test"), 1);

    let answered = sb.events.answered.lock().unwrap();
    assert_eq!(
        *answered,
        vec![
            ("allowed.test".to_string(), vec![IpAddr::V4(PUBLIC)]),
            ("v1.api.test".to_string(), vec![IpAddr::V4(PRIVATE)]),
        ]
    );
}

#[tokio::test]
async fn allow_all_forwards_everything_and_relays_nxdomain() {
    let up = Upstream::start().await;
    up.script("any.test", RecordType::TXT, answer(vec![]));
    let sb = Sandbox::start(&up, compiled(Mode::AllowAll, &[]), false).await;
    let m = sb.query(false, "any.test", RecordType::TXT).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let m = sb.query(false, "unknown.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!((up.count("any.test"), up.count("unknown.test")), (1, 1));
}

#[tokio::test]
async fn policy_updates_apply_to_the_next_question() {
    let up = Upstream::start().await;
    up.script(
        "allowed.test",
        RecordType::A,
        answer(vec![a_rec("allowed.test.", 60, PUBLIC)]),
    );
    let sb = Sandbox::start(&up, compiled(Mode::Custom, &["allowed.test"]), false).await;
    let m = sb.query(false, "allowed.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    sb.policy.set(compiled(Mode::Custom, &["other.test"]));
    let m = sb.query(false, "allowed.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    sb.policy.set(compiled(Mode::DenyAll, &[]));
    let m = sb.query(false, "allowed.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert_eq!(up.count("allowed.test"), 1);
}

#[tokio::test]
async fn aaaa_without_ipv6_is_answered_empty_and_not_forwarded() {
    let up = Upstream::start().await;
    let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
    up.script(
        "allowed.test",
        RecordType::AAAA,
        answer(vec![aaaa_rec("allowed.test.", 60, v6)]),
    );
    let sb = Sandbox::start(&up, compiled(Mode::AllowAll, &[]), false).await;
    for via_tcp in [false, true] {
        let m = sb.query(via_tcp, "allowed.test", RecordType::AAAA).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }
    assert_eq!(up.count("allowed.test"), 0);

    let sb6 = Sandbox::start(&up, compiled(Mode::AllowAll, &[]), true).await;
    let m = sb6.query(false, "allowed.test", RecordType::AAAA).await;
    assert!(matches!(m.answers[0].data, RData::AAAA(AAAA(ip)) if ip == v6));
    assert_eq!(up.count("allowed.test"), 1);
}

fn https_rec(owner: &str, params: Vec<(SvcParamKey, SvcParamValue)>) -> Record {
    Record::from_rdata(
        name(owner),
        60,
        RData::HTTPS(HTTPS(SVCB::new(1, Name::root(), params))),
    )
}

const ECH_BYTES: [u8; 24] = [
    0xec, 0x4e, 0xc4, 0xec, 0x11, 0x22, 0x33, 0x44, 0xec, 0x4e, 0xc4, 0xec, 0x55, 0x66, 0x77, 0x88,
    0xec, 0x4e, 0xc4, 0xec, 0x99, 0xaa, 0xbb, 0xcc,
];

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn ech_is_stripped_from_https_records() {
    let up = Upstream::start().await;
    let ech = || {
        (
            SvcParamKey::EchConfigList,
            SvcParamValue::EchConfigList(EchConfigList(ECH_BYTES.to_vec())),
        )
    };
    let alpn = || {
        (
            SvcParamKey::Alpn,
            SvcParamValue::Alpn(Alpn(vec!["h2".into()])),
        )
    };
    up.script(
        "allowed.test",
        RecordType::HTTPS,
        answer(vec![
            https_rec("allowed.test.", vec![alpn(), ech()]),
            https_rec(
                "allowed.test.",
                vec![
                    (
                        SvcParamKey::Mandatory,
                        SvcParamValue::Mandatory(Mandatory(vec![SvcParamKey::EchConfigList])),
                    ),
                    alpn(),
                    ech(),
                ],
            ),
        ]),
    );
    // The upstream really sends the ECH config (the test can fail).
    let direct = up
        .resolver(secs(2.0), 1)
        .forward(&query_bytes(1, "allowed.test.", RecordType::HTTPS, true))
        .await
        .unwrap();
    assert!(contains(&direct, &ECH_BYTES[..8]));

    let sb = Sandbox::start(&up, compiled(Mode::Custom, &["allowed.test"]), false).await;
    for via_tcp in [false, true] {
        let id = 7;
        let raw = sb
            .ask(
                via_tcp,
                &query_bytes(id, "allowed.test.", RecordType::HTTPS, true),
            )
            .await
            .unwrap();
        assert!(
            !contains(&raw, &ECH_BYTES[..8]),
            "ech bytes reached the sandbox"
        );
        let m = Message::from_vec(&raw).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            m.answers.len(),
            1,
            "the record with a mandatory ech is dropped"
        );
        let RData::HTTPS(h) = &m.answers[0].data else {
            panic!("not HTTPS")
        };
        assert_eq!(h.0.svc_params.len(), 1);
        assert_eq!(h.0.svc_params[0].0, SvcParamKey::Alpn);
    }
}

#[test]
fn strip_ech_handles_svcb_and_every_section() {
    let ech = (
        SvcParamKey::EchConfigList,
        SvcParamValue::EchConfigList(EchConfigList(vec![1, 2, 3])),
    );
    let mut m = Message::new(1, MessageType::Response, OpCode::Query);
    m.add_answer(Record::from_rdata(
        name("a.test."),
        60,
        RData::SVCB(SVCB::new(1, Name::root(), vec![ech.clone()])),
    ));
    m.add_authority(https_rec("a.test.", vec![ech.clone()]));
    m.add_additional(https_rec("a.test.", vec![ech]));
    m.add_additional(a_rec("a.test.", 60, PUBLIC));
    strip_ech(&mut m);
    let params = |r: &Record| match &r.data {
        RData::SVCB(s) => s.svc_params.len(),
        RData::HTTPS(h) => h.0.svc_params.len(),
        _ => 99,
    };
    assert_eq!(params(&m.answers[0]), 0);
    assert_eq!(params(&m.authorities[0]), 0);
    assert_eq!(params(&m.additionals[0]), 0);
    assert_eq!(m.additionals.len(), 2);
}

#[tokio::test]
async fn malformed_and_unsupported_queries_are_never_forwarded() {
    let up = Upstream::start().await;
    up.script(
        "allowed.test",
        RecordType::A,
        answer(vec![a_rec("allowed.test.", 60, PUBLIC)]),
    );
    let sb = Sandbox::start(&up, compiled(Mode::AllowAll, &[]), true).await;

    let good = query_bytes(0x1234, "allowed.test.", RecordType::A, false);
    // Header claims one question, body cut short.
    let cut = good[..good.len() - 3].to_vec();
    // Two questions.
    let mut two = Message::new(0x1234, MessageType::Query, OpCode::Query);
    two.add_query(Query::query(name("allowed.test."), RecordType::A));
    two.add_query(Query::query(name("allowed.test."), RecordType::AAAA));
    let two = two.to_vec().unwrap();
    // No question.
    let none = Message::new(0x1234, MessageType::Query, OpCode::Query)
        .to_vec()
        .unwrap();
    // An answer record inside the query.
    let mut with_answer = Message::from_vec(&good).unwrap();
    with_answer.add_answer(a_rec("allowed.test.", 60, PUBLIC));
    let with_answer = with_answer.to_vec().unwrap();
    // Opcode STATUS.
    let mut status = Message::from_vec(&good).unwrap();
    status.metadata.op_code = OpCode::Status;
    let status = status.to_vec().unwrap();
    // Class CH.
    let mut chaos = Message::new(0x1234, MessageType::Query, OpCode::Query);
    let mut q = Query::query(name("allowed.test."), RecordType::TXT);
    q.set_query_class(DNSClass::CH);
    chaos.add_query(q);
    let chaos = chaos.to_vec().unwrap();
    let any = query_bytes(0x1234, "allowed.test.", RecordType::ANY, false);
    let axfr = query_bytes(0x1234, "allowed.test.", RecordType::AXFR, false);
    // Raw names the host-name rules refuse.
    let raw_q = |labels: &[&[u8]]| {
        let mut b = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in labels {
            b.push(l.len() as u8);
            b.extend_from_slice(l);
        }
        b.extend_from_slice(&[0, 0, 1, 0, 1]);
        b
    };
    let nul = raw_q(&[b"allow\0ed", b"test"]);
    let dot = raw_q(&[b"allowed.test"]);
    let numeric = raw_q(&[b"1", b"2", b"3", b"4"]);
    let root = raw_q(&[]);
    let long = raw_q(&[&[b'a'; 63], &[b'b'; 63], &[b'c'; 63], &[b'd'; 63]]);
    let bigchar = raw_q(&[b"all\xc3\xa9", b"test"]);

    let cases: Vec<(&str, Vec<u8>, &[u8])> = vec![
        ("cut", cut, &[FORMERR]),
        ("two questions", two, &[FORMERR]),
        ("no question", none, &[FORMERR]),
        ("answer in query", with_answer, &[FORMERR]),
        ("opcode status", status, &[NOTIMP]),
        ("class CH", chaos, &[NOTIMP]),
        ("ANY", any, &[NOTIMP]),
        ("AXFR", axfr, &[NOTIMP]),
        ("NUL in label", nul, &[REFUSED]),
        ("dot in label", dot, &[REFUSED]),
        ("numeric name", numeric, &[REFUSED]),
        ("root", root, &[REFUSED]),
        ("name > 253", long, &[REFUSED, FORMERR]),
        ("non-ASCII", bigchar, &[REFUSED]),
        (
            "garbage",
            b"\x12\x34\x01\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
            &[FORMERR],
        ),
    ];
    for via_tcp in [false, true] {
        for (what, bytes, want) in &cases {
            let raw = sb
                .ask(via_tcp, bytes)
                .await
                .unwrap_or_else(|| panic!("{what}: no reply"));
            assert_eq!(&raw[..2], &[0x12, 0x34], "{what}: id echoed");
            assert!(raw[2] & 0x80 != 0, "{what}: QR set");
            assert!(
                want.contains(&rcode(&raw)),
                "{what}: rcode {} tcp={via_tcp}",
                rcode(&raw)
            );
        }
    }
    // Responses and runts get no reply at all.
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert_eq!(sb.ask(false, &resp).await, None);
    assert_eq!(sb.ask(false, b"\x12\x34\x01").await, None);

    assert_eq!(up.total(), 0, "something was forwarded");
    // And a good query still works.
    let m = sb.query(false, "allowed.test", RecordType::A).await;
    assert_eq!(m.answers.len(), 1);
}

#[tokio::test]
async fn upstream_timeout_becomes_servfail() {
    let up = Upstream::start().await;
    up.script(
        "silent.test",
        RecordType::A,
        Script {
            silent: true,
            ..Script::default()
        },
    );
    let sb = Sandbox::start_with(&up, compiled(Mode::AllowAll, &[]), false, None, secs(0.3)).await;
    let m = sb.query(false, "silent.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(up.count("silent.test"), 1);
}

#[tokio::test]
async fn udp_replies_over_the_client_size_are_truncated() {
    let up = Upstream::start().await;
    up.script(
        "big.test",
        RecordType::A,
        answer(
            (1..=60)
                .map(|i| a_rec("big.test.", 60, Ipv4Addr::new(93, 184, 0, i)))
                .collect(),
        ),
    );
    let sb = Sandbox::start(&up, compiled(Mode::AllowAll, &[]), false).await;
    // No EDNS: 512 bytes at most.
    let raw = sb
        .ask(false, &query_bytes(9, "big.test.", RecordType::A, false))
        .await
        .unwrap();
    assert!(raw.len() <= 512);
    let m = Message::from_vec(&raw).unwrap();
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    // Over TCP: everything.
    let m = sb.query(true, "big.test", RecordType::A).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 60);
}

#[tokio::test]
async fn rate_limit_refuses_beyond_the_budget() {
    let up = Upstream::start().await;
    let qps = 50;
    let sb = Sandbox::start_with(
        &up,
        compiled(Mode::Custom, &[]),
        false,
        Some(qps),
        secs(1.0),
    )
    .await;
    let start = Instant::now();
    let (mut nx, mut refused) = (0u32, 0u32);
    for i in 0..150u16 {
        let raw = sb
            .ask(
                i % 2 == 1,
                &query_bytes(i, "denied.test.", RecordType::A, false),
            )
            .await
            .unwrap();
        match rcode(&raw) {
            NXDOMAIN => nx += 1,
            REFUSED => refused += 1,
            other => panic!("rcode {other}"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let budget = f64::from(qps) * (1.0 + elapsed) + 1.0;
    assert!(nx >= qps, "the burst must be served: {nx}");
    assert!(
        f64::from(nx) <= budget,
        "{nx} answered in {elapsed:.2}s, budget {budget:.0}"
    );
    assert_eq!(nx + refused, 150);
    assert!(refused > 0);
    assert_eq!(up.total(), 0);
}

#[test]
fn default_rate_limit_is_200_per_second() {
    let bucket = TokenBucket::new(DEFAULT_RATE_LIMIT);
    let start = Instant::now();
    let granted = (0..1000).filter(|_| bucket.take()).count();
    let elapsed = start.elapsed().as_secs_f64();
    assert!(granted >= 200, "{granted}");
    assert!(
        (granted as f64) <= 200.0 + 200.0 * elapsed + 1.0,
        "{granted} in {elapsed}s"
    );
}

#[tokio::test]
async fn tcp_carries_several_queries_per_connection() {
    let up = Upstream::start().await;
    up.script(
        "allowed.test",
        RecordType::A,
        answer(vec![a_rec("allowed.test.", 60, PUBLIC)]),
    );
    up.script(
        "slow.test",
        RecordType::A,
        Script {
            answers: vec![a_rec("slow.test.", 60, PUBLIC)],
            delay: secs(0.3),
            ..Script::default()
        },
    );
    let sb = Sandbox::start(
        &up,
        compiled(Mode::Custom, &["allowed.test", "slow.test"]),
        false,
    )
    .await;
    let mut s = TcpStream::connect(sb.tcp).await.unwrap();
    // Pipelined: the slow one first; the others must not wait for it.
    write_frame(&mut s, &query_bytes(1, "slow.test.", RecordType::A, false)).await;
    write_frame(
        &mut s,
        &query_bytes(2, "allowed.test.", RecordType::A, false),
    )
    .await;
    write_frame(&mut s, &query_bytes(3, "nope.test.", RecordType::A, false)).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let raw = read_frame(&mut s, secs(3.0)).await.unwrap();
        ids.push(u16::from_be_bytes([raw[0], raw[1]]));
    }
    assert_eq!(ids.len(), 3);
    assert_eq!(*ids.last().unwrap(), 1, "replies are sent as they complete");
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3]);
}

#[tokio::test]
async fn tcp_connections_are_capped() {
    let up = Upstream::start().await;
    let sb = Sandbox::start(&up, compiled(Mode::Custom, &[]), false).await;
    let mut held = Vec::new();
    for _ in 0..MAX_TCP_CONNECTIONS {
        let mut s = TcpStream::connect(sb.tcp).await.unwrap();
        // Make sure the server has taken this one.
        write_frame(&mut s, &query_bytes(1, "x.test.", RecordType::A, false)).await;
        assert!(read_frame(&mut s, secs(3.0)).await.is_some());
        held.push(s);
    }
    let mut extra = TcpStream::connect(sb.tcp).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(secs(2.0), extra.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "connection 65 was kept: {closed:?}"
    );
    // Freeing one makes room again.
    drop(held.pop());
    tokio::time::sleep(secs(0.2)).await;
    let m = sb.query(true, "x.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn idle_tcp_connections_are_closed() {
    let up = Upstream::start().await;
    let sb = Sandbox::start(&up, compiled(Mode::Custom, &[]), false).await;
    let mut s = TcpStream::connect(sb.tcp).await.unwrap();
    write_frame(&mut s, &query_bytes(1, "x.test.", RecordType::A, false)).await;
    assert!(read_frame(&mut s, secs(3.0)).await.is_some());
    let start = Instant::now();
    // Half a length prefix, then silence (slowloris).
    s.write_all(&[0]).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(secs(15.0), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    let waited = start.elapsed();
    assert!(waited >= secs(9.0) && waited <= secs(12.0), "{waited:?}");
}
