//! Privileged end-to-end, netns runtime with `[runtime] warm = 1`: a
//! sandbox built ahead of its request (network, deny-all enforcement, CA)
//! is taken by the next launch like the last one, which then obeys its own
//! policy; a warm sandbox never costs a launch its slot; what a stopped or
//! killed daemon leaves warm is released.

use std::net::IpAddr;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate_tests::daemon::{Daemon, KEY_DEFAULT};
use tollgate_tests::lab::PUBLIC4;
use tollgate_tests::privileged::{netns_file_exists, wait_until};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn config(pool: &str) -> String {
    format!(
        r#"
[[organizations]]
name = "default"
api_keys = []
max_sandboxes = 10

[host]
vcpu = 64
memory_mib = 65536

[network]
pool = "{pool}"

[runtime]
backend = "netns"
warm = 1
"#
    )
}

/// `text` without terminal colour sequences.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits for a warm sandbox other than `not` to be ready; its id.
fn next_warm(d: &Daemon, not: &[String]) -> String {
    let mut found = None;
    let ok = wait_until(Duration::from_secs(20), || {
        found = d
            .warm_ready()
            .into_iter()
            .rev()
            .find(|id| !not.contains(id));
        found.is_some()
    });
    assert!(ok, "no warm sandbox became ready:\n{}", d.log());
    found.expect("warm id")
}

fn create(d: &mut Daemon, body: Value) -> Value {
    let c = d.call(
        Method::POST,
        "/v1/sandbox",
        "/v1/sandbox",
        KEY_DEFAULT,
        Some(&body),
    );
    assert_eq!(c.status, StatusCode::CREATED, "{}", c.body);
    c.body
}

/// Exit code of a TCP connection attempt from inside `id` to the lab's
/// public upstream (port 80).
fn connect_public(d: &mut Daemon, id: &str) -> i64 {
    let (code, _, _) = d.sh(
        id,
        &format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{PUBLIC4}/80' 2>/dev/null"),
        20,
    );
    code
}

/// `GET /v1/sandbox/{id}/`.
fn get(d: &mut Daemon, id: &str) -> tollgate_tests::daemon::Answer {
    d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/"),
        "/v1/sandbox/{id}/",
        KEY_DEFAULT,
        None,
    )
}

fn namespaces_of(id: &str) -> [bool; 2] {
    [
        netns_file_exists(&format!("tollgate-{id}")),
        netns_file_exists(&format!("tgr-{id}")),
    ]
}

#[test]
fn the_next_launch_takes_the_warm_sandbox_and_obeys_its_own_policy() {
    let _s = serial();
    let mut d = Daemon::start("warm-take", &config("10.215.0.0/20"));
    let allow = json!({"mode": "custom", "allow_cidrs": [format!("{PUBLIC4}/32")]});
    let a = create(&mut d, json!({"memory": 512, "network_policy": allow}));
    let a = a["id"].as_str().expect("id").to_owned();
    let w = next_warm(&d, &[]);
    assert_ne!(w, a);
    assert_eq!(namespaces_of(&w), [true, true], "warm namespaces missing");
    // Nothing runs in a warm sandbox, and it enforces deny-all until taken.
    assert!(d.lab.canary.to(IpAddr::V4(PUBLIC4)).is_empty());

    // The same launch again: it gets the warm sandbox, with its policy.
    let b = create(&mut d, json!({"memory": 512, "network_policy": allow}));
    assert_eq!(
        b["id"],
        w.as_str(),
        "the launch did not take the warm sandbox"
    );
    assert_eq!(b["state"], "running", "{b}");
    d.lab.canary.clear();
    assert_eq!(connect_public(&mut d, &w), 0, "allowed CIDR not reached");
    assert!(
        !d.lab.canary.to(IpAddr::V4(PUBLIC4)).is_empty(),
        "the canary saw nothing of the allowed connection"
    );
    let log = plain(&d.log());
    assert!(
        log.lines()
            .any(|l| l.contains("sandbox running") && l.contains(&w) && l.contains("warm=true")),
        "the launch was not reported as warm:\n{log}"
    );

    // B's shape is warm again. A deny-all launch of another shape builds
    // afresh; a second one of that shape takes its warm sandbox and still
    // lets nothing out.
    let w1 = next_warm(&d, std::slice::from_ref(&w));
    let deny = json!({"mode": "deny-all"});
    let c = create(&mut d, json!({"memory": 768, "network_policy": deny}));
    let c = c["id"].as_str().expect("id").to_owned();
    assert!(!d.warm_ready().contains(&c), "a new shape was served warm");
    let w2 = next_warm(&d, &[w.clone(), w1.clone()]);
    let e = create(&mut d, json!({"memory": 768, "network_policy": deny}));
    assert_eq!(e["id"], w2.as_str());
    d.lab.canary.clear();
    assert_ne!(connect_public(&mut d, &w2), 0, "deny-all sandbox connected");
    assert!(d.lab.canary.to(IpAddr::V4(PUBLIC4)).is_empty());

    // One warm sandbox at most: the older shape's (w1) made room for the
    // newer.
    let w3 = next_warm(&d, &[w.clone(), w1.clone(), w2.clone()]);
    assert_eq!(
        namespaces_of(&w1),
        [false, false],
        "more than one warm sandbox kept"
    );
    assert_eq!(namespaces_of(&w3), [true, true]);

    // A graceful stop releases it; the sandboxes keep running.
    let stopped = d.stop_keep_state();
    assert_eq!(
        namespaces_of(&w3),
        [false, false],
        "warm sandbox left at stop"
    );
    assert_eq!(
        namespaces_of(&w),
        [true, true],
        "a real sandbox was released"
    );
    let mut d = Daemon::restart(stopped);
    let g = get(&mut d, &w);
    assert_eq!(g.body["state"], "running", "{}", g.body);
    assert_eq!(connect_public(&mut d, &w), 0);
}

#[test]
fn a_killed_daemon_s_warm_sandbox_is_released_at_the_next_start() {
    let _s = serial();
    let mut d = Daemon::start("warm-kill", &config("10.215.16.0/20"));
    let a = create(&mut d, json!({"memory": 512}));
    let a = a["id"].as_str().expect("id").to_owned();
    let w = next_warm(&d, &[]);
    let stopped = d.kill_keep_state();
    assert_eq!(namespaces_of(&w), [true, true], "SIGKILL cannot clean up");
    let mut d = Daemon::restart(stopped);
    assert_eq!(
        namespaces_of(&w),
        [false, false],
        "the warm sandbox of the killed daemon is still there"
    );
    assert!(
        d.log()
            .contains("released a warm sandbox of the previous run"),
        "{}",
        d.log()
    );
    // Its id was never handed out, and the real sandbox lives on.
    let g = get(&mut d, &w);
    assert_eq!(g.status, StatusCode::NOT_FOUND, "{}", g.body);
    let g = get(&mut d, &a);
    assert_eq!(g.body["state"], "running", "{}", g.body);
}

#[test]
fn a_warm_sandbox_gives_its_slot_to_a_launch_that_needs_it() {
    let _s = serial();
    // A /29 holds two uplinks: two slots.
    let mut d = Daemon::start("warm-slots", &config("10.215.32.0/29"));
    let a = create(&mut d, json!({"memory": 512}));
    let a = a["id"].as_str().expect("id").to_owned();
    let w = next_warm(&d, &[]);
    // Another shape: no warm sandbox for it, and no free slot but the warm one's.
    let b = create(&mut d, json!({"memory": 768}));
    let b = b["id"].as_str().expect("id").to_owned();
    assert_ne!(b, w);
    assert_eq!(
        namespaces_of(&w),
        [false, false],
        "warm sandbox kept its slot"
    );
    assert_eq!(namespaces_of(&b), [true, true]);
    // Full: no warm sandbox can be built now, and a third launch is 503.
    let c = d.call(
        Method::POST,
        "/v1/sandbox",
        "/v1/sandbox",
        KEY_DEFAULT,
        Some(&json!({"memory": 768})),
    );
    assert_eq!(c.status, StatusCode::SERVICE_UNAVAILABLE, "{}", c.body);
    assert_eq!(d.delete_sandbox(&a).status, StatusCode::NO_CONTENT);
    let c = create(&mut d, json!({"memory": 768}));
    assert_eq!(c["state"], "running");
}
