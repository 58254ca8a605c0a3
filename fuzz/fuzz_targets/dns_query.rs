//! The sandbox resolver's answer to one raw UDP query, under a deny-all and
//! a custom policy that allows nothing the fuzzer can reach (so nothing is
//! forwarded). Invariants: no panic; a reply, if any, echoes the query id;
//! under deny-all it is never NOERROR with answers.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tollgate_proxy::dns::{DnsServer, NoEvents, PolicyDns, Resolver, ResolverConfig};
use tollgate_proxy::policy::{CompiledPolicy, Floor, NetworkPolicy};

struct Rig {
    rt: tokio::runtime::Runtime,
    deny: DnsServer,
    custom: DnsServer,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let resolver = Arc::new(Resolver::new(ResolverConfig {
            // Nothing listens there, and nothing is forwarded anyway.
            upstreams: vec!["127.0.0.1:9".parse().expect("addr")],
            timeout: std::time::Duration::from_millis(1),
            ..ResolverConfig::default()
        }));
        let server = |p: NetworkPolicy| {
            let compiled = Arc::new(CompiledPolicy::new(&p, Arc::new(Floor::new(Vec::new()))));
            // No rate limit: every input is parsed, none is dropped.
            DnsServer::with_rate_limit(
                Arc::new(PolicyDns::new(compiled, true)),
                resolver.clone(),
                Arc::new(NoEvents),
                1_000_000_000,
            )
        };
        let custom = NetworkPolicy::from_json(
            &serde_json::json!({"mode": "custom", "allow_cidrs": ["192.0.2.0/24"]}),
            "p",
        )
        .expect("policy");
        Rig {
            deny: server(NetworkPolicy::deny_all()),
            custom: server(custom),
            rt,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let r = rig();
    for server in [&r.deny, &r.custom] {
        if let Some(reply) = r.rt.block_on(server.answer_udp(data)) {
            assert!(reply.len() >= 12 && data.len() >= 2, "short reply or query");
            assert_eq!(reply[..2], data[..2], "reply id differs");
            if std::ptr::eq(server, &r.deny) {
                let rcode = reply[3] & 0x0f;
                let answers = u16::from_be_bytes([reply[6], reply[7]]);
                assert!(rcode != 0 || answers == 0, "deny-all answered");
            }
        }
    }
});
