//! eBPF egress enforcement end to end: a real daemon in a closed lab, real
//! sandboxes, real packets. Every assertion is on what the canary (upstream
//! namespace) or the host's own canary service received, or on what the
//! sandbox's proxy listener accepted, never on a client's exit code alone.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate_tests::daemon::{default_config, Daemon, KEY_DEFAULT};
use tollgate_tests::lab::{HOST_PORT, HOST_WAN, METADATA4, PRIVATE4, PRIVATE6, PUBLIC4, PUBLIC6};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

/// Runs the probe script inside sandbox `id`'s network namespace and returns
/// (probe, client-side result) pairs.
fn probe(id: &str, args: &[&str]) -> Vec<(String, String)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("probe/probe.py");
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/tollgate-{id}"))
        .arg("--")
        .arg("/usr/bin/python3")
        .arg(&script)
        .args(args)
        .output()
        .expect("run probe");
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            (
                v["probe"].as_str().unwrap_or("").to_string(),
                v["result"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn result_of(results: &[(String, String)], probe: &str) -> String {
    results
        .iter()
        .find(|(p, _)| p == probe)
        .map(|(_, r)| r.clone())
        .unwrap_or_else(|| panic!("no result for {probe}: {results:?}"))
}

/// Creates a sandbox and snapshots it as `name` (the source is deleted).
fn snapshot(d: &mut Daemon, name: &str) {
    let c = d.call(
        Method::POST,
        "/v1/sandbox",
        "/v1/sandbox",
        KEY_DEFAULT,
        Some(&json!({"memory": 512})),
    );
    assert_eq!(c.status, StatusCode::CREATED, "{}", c.body);
    let src = c.body["id"].as_str().expect("id").to_string();
    let s = d.call(
        Method::POST,
        &format!("/v1/sandbox/{src}/snapshot/create"),
        "/v1/sandbox/{id}/snapshot/create",
        KEY_DEFAULT,
        Some(&json!({"name": name, "kill_sandbox_after": true})),
    );
    assert_eq!(s.status, StatusCode::CREATED, "{}", s.body);
}

fn resume(d: &mut Daemon, snap: &str, policy: Value) -> String {
    let r = d.call(
        Method::POST,
        "/v1/snapshot/resume",
        "/v1/snapshot/resume",
        KEY_DEFAULT,
        Some(&json!({"snapshot_name": snap, "network_policy": policy})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

fn events(d: &mut Daemon, id: &str) -> Vec<Value> {
    d.events(id)
}

fn counters(d: &mut Daemon, id: &str) -> Value {
    let a = d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/network/counters"),
        "/v1/sandbox/{id}/network/counters",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    a.body["counters"].clone()
}

/// (destination, port) of the events with `reason`.
fn targets(evs: &[Value], reason: &str) -> BTreeSet<(IpAddr, u16)> {
    evs.iter()
        .filter(|e| e["reason"] == reason)
        .filter_map(|e| {
            Some((
                e["destination"].as_str()?.parse().ok()?,
                e["port"].as_u64()? as u16,
            ))
        })
        .collect()
}

/// Waits (bounded) until the events of `id` satisfy `pred`.
fn wait_events(
    d: &mut Daemon,
    id: &str,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let evs = events(d, id);
        if pred(&evs) {
            return evs;
        }
        assert!(Instant::now() < deadline, "{what}: events were {evs:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The uplink address of slot `slot` in `pool` (the router's side, +2).
fn uplink(pool_base: [u8; 4], slot: u8) -> IpAddr {
    IpAddr::from([
        pool_base[0],
        pool_base[1],
        pool_base[2],
        pool_base[3] + slot * 4 + 2,
    ])
}

#[test]
fn custom_cidrs_reach_their_targets_and_the_floor_is_never_reached() {
    let _g = serial();
    let pool = "10.213.0.0/20";
    let mut d = Daemon::start("cidrs", &default_config(pool));
    snapshot(&mut d, "img");
    // Every floor target below is also covered by allow_cidrs: it must not matter.
    let policy = json!({"mode": "custom", "allow_cidrs": [
        "10.99.0.0/24", "fd99::/64", "169.254.0.0/16", "192.0.2.0/24", pool, "127.0.0.0/8"]});
    let a = resume(&mut d, "img", policy.clone());
    let b = resume(&mut d, "img", policy);
    let b_uplink = uplink([10, 213, 0, 0], 1);
    let b_uplink_s = b_uplink.to_string();
    let host_wan = HOST_WAN.to_string();
    let port = HOST_PORT.to_string();
    let r = probe(
        &a,
        &[
            "tcp",
            "10.99.0.10",
            "80",
            "tcp",
            "fd99::10",
            "80",
            "udp",
            "10.99.0.10",
            "9999",
            "tcp",
            "10.99.1.10",
            "80",
            "udp",
            "10.99.1.10",
            "9999",
            "udp",
            "198.51.100.10",
            "9999",
            "tcp",
            "169.254.169.254",
            "80",
            "udp",
            "169.254.169.254",
            "53",
            "tcp",
            &host_wan,
            &port,
            "udp",
            &host_wan,
            &port,
            "tcp",
            &b_uplink_s,
            &port,
        ],
    );
    assert_eq!(result_of(&r, "tcp 10.99.0.10 80"), "answered", "{r:?}");
    assert_eq!(result_of(&r, "tcp fd99::10 80"), "answered", "{r:?}");
    assert_eq!(result_of(&r, "udp 10.99.0.10 9999"), "answered", "{r:?}");

    let seen = d.lab.canary.contacts();
    let expected: BTreeSet<(u8, IpAddr, u16)> = [
        (6, IpAddr::V4(PRIVATE4), 80),
        (6, IpAddr::V6(PRIVATE6), 80),
        (17, IpAddr::V4(PRIVATE4), 9999),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        seen, expected,
        "the canary saw exactly the allow_cidrs traffic"
    );
    assert!(d.lab.canary.to(IpAddr::V4(METADATA4)).is_empty());
    assert!(
        d.lab.host_canary.seen().is_empty(),
        "the host's own services were reached: {:?}",
        d.lab.host_canary.seen()
    );
    // The canary saw the sandbox only behind NAT, never its shared guest address.
    assert!(d
        .lab
        .canary
        .seen()
        .iter()
        .all(|s| s.src != ip("10.0.2.15") && s.src != ip("fd00:7467::15")));

    // Events and counters match the attempts.
    let evs = wait_events(&mut d, &a, "floor drops", |e| {
        targets(e, "drop_floor").len() >= 4
    });
    let floor: BTreeSet<(IpAddr, u16)> = [
        (IpAddr::V4(METADATA4), 80),
        (IpAddr::V4(METADATA4), 53),
        (IpAddr::V4(HOST_WAN), HOST_PORT),
        (b_uplink, HOST_PORT),
    ]
    .into_iter()
    .collect();
    assert_eq!(targets(&evs, "drop_floor"), floor);
    assert_eq!(
        targets(&evs, "drop_not_allowed"),
        [(ip("10.99.1.10"), 9999), (IpAddr::V4(PUBLIC4), 9999)]
            .into_iter()
            .collect()
    );
    assert_eq!(
        targets(&evs, "steered"),
        [(ip("10.99.1.10"), 80)].into_iter().collect(),
        "TCP outside the CIDRs goes to the proxy"
    );
    let c = counters(&mut d, &a);
    let n_floor = evs.iter().filter(|e| e["reason"] == "drop_floor").count() as u64;
    assert_eq!(
        c["drop_floor"].as_u64(),
        Some(n_floor),
        "one event per dropped packet: {c}"
    );
    assert!(c["pass_cidr"].as_u64().unwrap_or(0) >= 3, "{c}");
    // Sandbox B made no attempt: nothing recorded for it.
    assert!(targets(&events(&mut d, &b), "drop_floor").is_empty());
}

#[test]
fn deny_all_lets_nothing_out() {
    let _g = serial();
    let mut d = Daemon::start("denyall", &default_config("10.213.16.0/20"));
    snapshot(&mut d, "img");
    let id = resume(&mut d, "img", json!({"mode": "deny-all"}));
    let r = probe(
        &id,
        &[
            "tcp",
            "198.51.100.10",
            "80",
            "udp",
            "198.51.100.10",
            "53",
            "udp",
            "10.0.2.2",
            "53",
            "udp",
            "198.51.100.10",
            "443",
            "icmp",
            "198.51.100.10",
            "tcp",
            "2001:db8:100::10",
            "80",
            "udp",
            "2001:db8:100::10",
            "9999",
            "icmp",
            "2001:db8:100::10",
        ],
    );
    assert!(r.iter().all(|(_, res)| res != "answered"), "{r:?}");
    assert!(
        d.lab.canary.seen().is_empty(),
        "deny-all leaked: {:?}",
        d.lab.canary.seen()
    );
    assert!(d.lab.host_canary.seen().is_empty());
    let evs = wait_events(&mut d, &id, "deny-all drops", |e| {
        targets(e, "drop_deny_all").len() >= 6
    });
    let denied = targets(&evs, "drop_deny_all");
    for t in [
        (IpAddr::V4(PUBLIC4), 80),
        (IpAddr::V4(PUBLIC4), 53),
        (ip("10.0.2.2"), 53),
        (IpAddr::V4(PUBLIC4), 443),
        (IpAddr::V6(PUBLIC6), 80),
        (IpAddr::V6(PUBLIC6), 9999),
    ] {
        assert!(denied.contains(&t), "{t:?} not reported: {denied:?}");
    }
}

#[test]
fn allow_all_forwards_public_udp_but_not_quic_or_private() {
    let _g = serial();
    let mut d = Daemon::start("allowall", &default_config("10.213.32.0/20"));
    snapshot(&mut d, "img");
    let id = resume(&mut d, "img", json!({"mode": "allow-all"}));
    let r = probe(
        &id,
        &[
            "udp",
            "198.51.100.10",
            "9999",
            "udp",
            "2001:db8:100::10",
            "9999",
            "icmp",
            "198.51.100.10",
            "udp",
            "198.51.100.10",
            "443",
            "udp",
            "10.99.0.10",
            "9999",
            "udp",
            "fd99::10",
            "9999",
            "tcp",
            "198.51.100.10",
            "80",
        ],
    );
    assert_eq!(result_of(&r, "udp 198.51.100.10 9999"), "answered", "{r:?}");
    assert_eq!(
        result_of(&r, "udp 2001:db8:100::10 9999"),
        "answered",
        "{r:?}"
    );
    assert_eq!(result_of(&r, "icmp 198.51.100.10"), "answered", "{r:?}");
    let seen = d.lab.canary.contacts();
    assert!(
        seen.contains(&(17, IpAddr::V4(PUBLIC4), 9999))
            && seen.contains(&(17, IpAddr::V6(PUBLIC6), 9999)),
        "{seen:?}"
    );
    assert!(
        !seen.contains(&(17, IpAddr::V4(PUBLIC4), 443)),
        "QUIC left: {seen:?}"
    );
    assert!(
        d.lab.canary.to(IpAddr::V4(PRIVATE4)).is_empty()
            && d.lab.canary.to(IpAddr::V6(PRIVATE6)).is_empty(),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|(p, _, _)| *p == 6),
        "TCP must go to the proxy, not straight out: {seen:?}"
    );
    let evs = wait_events(&mut d, &id, "quic, private and steered", |e| {
        !targets(e, "drop_quic").is_empty()
            && targets(e, "drop_private").len() >= 2
            && !targets(e, "steered").is_empty()
    });
    assert_eq!(
        targets(&evs, "drop_quic"),
        [(IpAddr::V4(PUBLIC4), 443)].into_iter().collect()
    );
    assert_eq!(
        targets(&evs, "steered"),
        [(IpAddr::V4(PUBLIC4), 80)].into_iter().collect()
    );
}

#[test]
fn sandboxes_restored_from_one_snapshot_are_steered_to_their_own_listener() {
    let _g = serial();
    let mut d = Daemon::start("twins", &default_config("10.213.48.0/20"));
    snapshot(&mut d, "img");
    let a = resume(
        &mut d,
        "img",
        json!({"mode": "custom", "allow_domains": ["example.com"]}),
    );
    let b = resume(
        &mut d,
        "img",
        json!({"mode": "custom", "allow_domains": ["example.com"]}),
    );
    // Both run at the same time with the same guest address.
    let ra = probe(
        &a,
        &[
            "tcp",
            "198.51.100.10",
            "443",
            "tcp",
            "2001:db8:100::10",
            "443",
        ],
    );
    let rb = probe(
        &b,
        &[
            "tcp",
            "198.51.100.10",
            "8443",
            "tcp",
            "2001:db8:100::10",
            "8443",
        ],
    );
    assert!(
        d.lab.canary.seen().is_empty(),
        "steered TCP reached the upstream: {:?} {ra:?} {rb:?}",
        d.lab.canary.seen()
    );
    let want_a: BTreeSet<(IpAddr, u16)> = [(IpAddr::V4(PUBLIC4), 443), (IpAddr::V6(PUBLIC6), 443)]
        .into_iter()
        .collect();
    let want_b: BTreeSet<(IpAddr, u16)> =
        [(IpAddr::V4(PUBLIC4), 8443), (IpAddr::V6(PUBLIC6), 8443)]
            .into_iter()
            .collect();
    let ea = wait_events(&mut d, &a, "a steered", |e| {
        targets(e, "steered").len() >= 2
    });
    let eb = wait_events(&mut d, &b, "b steered", |e| {
        targets(e, "steered").len() >= 2
    });
    assert_eq!(
        targets(&ea, "steered"),
        want_a,
        "A's listener got another sandbox's connection"
    );
    assert_eq!(
        targets(&eb, "steered"),
        want_b,
        "B's listener got another sandbox's connection"
    );
}

#[test]
fn daemon_kill_9_keeps_enforcement_and_restart_resumes_steering() {
    let _g = serial();
    let mut d = Daemon::start("kill9", &default_config("10.213.64.0/20"));
    snapshot(&mut d, "img");
    let id = resume(
        &mut d,
        "img",
        json!({"mode": "custom", "allow_cidrs": ["10.99.0.0/24"]}),
    );
    let stopped = d.kill_keep_state();
    // Daemon gone: no proxy listener, the pinned filter still enforces.
    let r = probe(
        &id,
        &[
            "tcp",
            "198.51.100.10",
            "443",
            "tcp",
            "169.254.169.254",
            "80",
            "udp",
            "198.51.100.10",
            "9999",
            "tcp",
            "10.99.0.10",
            "80",
        ],
    );
    assert_eq!(
        result_of(&r, "tcp 10.99.0.10 80"),
        "answered",
        "allow_cidrs stopped working: {r:?}"
    );
    assert_ne!(result_of(&r, "tcp 198.51.100.10 443"), "answered");
    let seen = stopped.lab.canary.contacts();
    assert_eq!(
        seen,
        [(6, IpAddr::V4(PRIVATE4), 80)].into_iter().collect(),
        "something left while the daemon was down: {seen:?}"
    );
    stopped.lab.canary.clear();

    let mut d = Daemon::restart(stopped);
    let g = d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/"),
        "/v1/sandbox/{id}/",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(g.body["state"], "running", "{}", g.body);
    let before = targets(&events(&mut d, &id), "steered");
    assert!(!before.contains(&(IpAddr::V4(PUBLIC4), 8443)));
    let _ = probe(
        &id,
        &[
            "tcp",
            "198.51.100.10",
            "8443",
            "tcp",
            "169.254.169.254",
            "80",
        ],
    );
    wait_events(&mut d, &id, "steering after restart", |e| {
        targets(e, "steered").contains(&(IpAddr::V4(PUBLIC4), 8443))
    });
    assert!(d.lab.canary.seen().is_empty(), "{:?}", d.lab.canary.seen());
    // The events from while the daemon was down were read after the restart.
    let evs = events(&mut d, &id);
    assert!(
        targets(&evs, "drop_no_listener").contains(&(IpAddr::V4(PUBLIC4), 443)),
        "{evs:#?}"
    );
}

#[test]
fn policy_update_applies_to_the_next_packet() {
    let _g = serial();
    let mut d = Daemon::start("update", &default_config("10.213.80.0/20"));
    snapshot(&mut d, "img");
    let id = resume(
        &mut d,
        "img",
        json!({"mode": "custom", "allow_cidrs": ["10.99.0.0/24"]}),
    );
    let r = probe(&id, &["udp", "10.99.0.10", "9999"]);
    assert_eq!(result_of(&r, "udp 10.99.0.10 9999"), "answered");
    let u = d.call(
        Method::PUT,
        &format!("/v1/sandbox/{id}/network_policy"),
        "/v1/sandbox/{id}/network_policy",
        KEY_DEFAULT,
        Some(&json!({"mode": "custom", "allow_cidrs": ["10.98.0.0/24"]})),
    );
    assert_eq!(u.status, StatusCode::OK, "{}", u.body);
    d.lab.canary.clear();
    let r = probe(&id, &["udp", "10.99.0.10", "9999"]);
    assert_ne!(result_of(&r, "udp 10.99.0.10 9999"), "answered");
    assert!(
        d.lab.canary.seen().is_empty(),
        "old policy still applied: {:?}",
        d.lab.canary.seen()
    );
    let u = d.call(
        Method::PUT,
        &format!("/v1/sandbox/{id}/network_policy"),
        "/v1/sandbox/{id}/network_policy",
        KEY_DEFAULT,
        Some(&json!({"mode": "allow-all"})),
    );
    assert_eq!(u.status, StatusCode::OK);
    let r = probe(&id, &["udp", "198.51.100.10", "9999"]);
    assert_eq!(result_of(&r, "udp 198.51.100.10 9999"), "answered", "{r:?}");
}
