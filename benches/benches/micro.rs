//! Micro benchmarks of the proxy's per-connection and per-request work,
//! with criterion, named with their parameters:
//!
//! * `policy_decide/max_policy/{exact_hit,wildcard_hit,transform_hit,miss,cidr_hit,no_name}`:
//!   `CompiledPolicy::decide` on a policy at the API's limits (50 domains,
//!   half of them wildcards, 10 CIDRs, 20 transforms);
//! * `client_hello_parse/{small_512B,pq_1800B,split_over_3_records}`;
//! * `leaf_mint/{cold,cached}`: a new name each time vs the cached one;
//! * `transform/strip_inject_30_headers`.
//!
//! `cargo bench -p tollgate-benches --bench micro` (no root needed).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::json;
use tollgate_proxy::detect::parse_client_hello;
use tollgate_proxy::intercept::{LeafCache, Rewrite, SandboxCa};
use tollgate_proxy::policy::{CompiledPolicy, Floor, NetworkPolicy, Proto, Transform};

/// A policy at every limit: 50 domains (25 exact, 25 wildcards), 10 CIDRs,
/// 20 transforms.
fn max_policy() -> CompiledPolicy {
    let mut domains: Vec<String> = (0..25).map(|i| format!("svc{i}.example{i}.com")).collect();
    domains.extend((0..25).map(|i| format!("*.wild{i}.example.org")));
    let cidrs: Vec<String> = (0..10).map(|i| format!("203.0.{i}.0/24")).collect();
    let transforms: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            let domain = if i % 2 == 0 {
                format!("api{i}.llm.test")
            } else {
                format!("*.t{i}.llm.test")
            };
            json!({
                "domain": domain,
                "inject_headers": { "Authorization": format!("Bearer sk-{i:040}") },
                "strip_headers": ["x-api-key", "cookie"]
            })
        })
        .collect();
    let v = json!({
        "mode": "custom",
        "allow_domains": domains,
        "allow_cidrs": cidrs,
        "transforms": transforms,
    });
    let p = NetworkPolicy::from_json(&v, "network_policy").expect("a policy at the limits");
    CompiledPolicy::new(&p, Arc::new(Floor::platform()))
}

fn bench_decide(c: &mut Criterion) {
    let p = max_policy();
    let public: IpAddr = "198.51.100.7".parse().expect("ip");
    let in_cidr: IpAddr = "203.0.7.9".parse().expect("ip");
    let mut g = c.benchmark_group("policy_decide/max_policy");
    let cases: [(&str, Option<&str>, IpAddr); 6] = [
        ("exact_hit", Some("svc24.example24.com"), public),
        ("wildcard_hit", Some("a.b.wild24.example.org"), public),
        ("transform_hit", Some("x.t19.llm.test"), public),
        ("miss", Some("evil.example.net"), public),
        ("cidr_hit", Some("unlisted.example.net"), in_cidr),
        ("no_name", None, public),
    ];
    for (label, name, ip) in cases {
        g.bench_function(label, |b| {
            b.iter(|| p.decide(black_box(name), black_box(ip), 443, Proto::Tcp))
        });
    }
    g.finish();
}

/// A TLS 1.3-style ClientHello for `sni` whose key_share carries `share`
/// bytes of (fake) key material (1,216: an X25519MLKEM768 share), padded
/// with a padding extension to `total` bytes of handshake message, as
/// records of at most `record` bytes.
fn client_hello(sni: &str, share: usize, total: usize, record: usize) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }
    let mut exts = Vec::new();
    let mut sn = Vec::new();
    sn.extend_from_slice(&((sni.len() + 3) as u16).to_be_bytes());
    sn.push(0);
    sn.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    sn.extend_from_slice(sni.as_bytes());
    ext(&mut exts, 0x0000, &sn);
    ext(&mut exts, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]);
    ext(&mut exts, 0x0010, b"\x00\x0c\x02h2\x08http/1.1");
    ext(&mut exts, 0x000a, &[0, 4, 0x11, 0xec, 0x00, 0x1d]);
    let mut ks = Vec::new();
    let mut entries = Vec::new();
    entries.extend_from_slice(&[0x11, 0xec]);
    entries.extend_from_slice(&(share as u16).to_be_bytes());
    entries.extend(std::iter::repeat_n(0x42, share));
    entries.extend_from_slice(&[0x00, 0x1d, 0x00, 0x20]);
    entries.extend(std::iter::repeat_n(0x24, 32));
    ks.extend_from_slice(&(entries.len() as u16).to_be_bytes());
    ks.extend_from_slice(&entries);
    ext(&mut exts, 0x0033, &ks);
    // Everything but the padding extension: 4 (handshake header) + 2 + 32
    // + 33 + 8 + 2 + 2 (extensions length) + the extensions so far.
    let so_far = 83 + exts.len();
    if total >= so_far + 4 {
        ext(&mut exts, 0x0015, &vec![0; total - so_far - 4]);
    }
    let mut body = vec![0x03, 0x03];
    body.extend(std::iter::repeat_n(0x11, 32));
    body.push(32);
    body.extend(std::iter::repeat_n(0x22, 32));
    body.extend_from_slice(&[0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut wire = Vec::new();
    for chunk in hs.chunks(record) {
        wire.extend_from_slice(&[0x16, 0x03, 0x01]);
        wire.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        wire.extend_from_slice(chunk);
    }
    wire
}

fn bench_hello(c: &mut Criterion) {
    let mut g = c.benchmark_group("client_hello_parse");
    let small = client_hello("api.example.com", 0, 512, 16384);
    let pq = client_hello("api.example.com", 1216, 1800, 16384);
    let split = client_hello("api.example.com", 1216, 1800, 620);
    assert_eq!((small.len(), pq.len(), split.len()), (517, 1805, 1815));
    for (label, hello) in [
        ("small_512B", &small),
        ("pq_1800B", &pq),
        ("split_over_3_records", &split),
    ] {
        let parsed = parse_client_hello(hello)
            .expect("parses")
            .expect("complete");
        assert_eq!(parsed.sni.as_deref(), Some("api.example.com"));
        g.bench_function(label, |b| b.iter(|| parse_client_hello(black_box(hello))));
    }
    g.finish();
}

fn bench_leaf(c: &mut Criterion) {
    let ca = Arc::new(SandboxCa::generate("bench").expect("CA"));
    let cache = LeafCache::new(Arc::clone(&ca), 1 << 20);
    let n = AtomicU64::new(0);
    let mut g = c.benchmark_group("leaf_mint");
    g.bench_function("cold", |b| {
        b.iter(|| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            cache.get(&format!("n{i}.bench.test")).expect("mint")
        })
    });
    cache.get("api.bench.test").expect("mint");
    g.bench_function("cached", |b| {
        b.iter(|| cache.get(black_box("api.bench.test")))
    });
    g.finish();
}

fn bench_rewrite(c: &mut Criterion) {
    let t = Transform {
        domain: "api.bench.test".into(),
        inject_headers: BTreeMap::from([
            ("authorization".to_string(), format!("Bearer sk-{:048}", 7)),
            ("openai-organization".to_string(), "org-bench".to_string()),
        ]),
        strip_headers: vec![
            "x-api-key".into(),
            "cookie".into(),
            "x-sandbox-token".into(),
        ],
    };
    let rw = Rewrite::new(&t).expect("transform");
    let mut base = HeaderMap::new();
    for i in 0..26 {
        base.append(
            HeaderName::from_bytes(format!("x-header-{i}").as_bytes()).expect("name"),
            HeaderValue::from_static("some-value-of-moderate-length"),
        );
    }
    base.append("authorization", HeaderValue::from_static("Bearer sandbox"));
    base.append("x-api-key", HeaderValue::from_static("leak"));
    base.append("cookie", HeaderValue::from_static("a=b"));
    base.append("accept", HeaderValue::from_static("*/*"));
    assert_eq!(base.len(), 30);
    c.bench_function("transform/strip_inject_30_headers", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |h| rw.apply(h),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group! {
    name = micro;
    config = tollgate_benches::criterion_config(30);
    targets = bench_decide, bench_hello, bench_leaf, bench_rewrite
}
criterion_main!(micro);
