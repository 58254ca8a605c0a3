//! (h) The resume API, end to end (root): a real daemon in a closed lab
//! (`tollgate-tests`' `Daemon` + `Lab`), a snapshot, then for each round
//! `POST /v1/snapshot/resume` with an `allow_cidrs` policy and, from inside
//! the new sandbox's network namespace, TCP connects to the lab's canary
//! (198.51.100.10:80) every millisecond until one succeeds.
//!
//! Figures (no direct baseline exists for "a sandbox appears"; reported for
//! information, p50 and p99 over the rounds):
//! * `resume_api_response`: request → `201` (the sandbox is `starting`);
//! * `resume_to_reachable`: request → first TCP connection from inside the
//!   sandbox to a host it is allowed to reach (network, eBPF, proxy and
//!   policy all in place);
//! * (g) memory per idle sandbox: the daemon's resident memory and the
//!   host's available memory before and after resuming K more sandboxes
//!   that then stay idle (K = 10 quick, 100 full), and (f) the daemon's peak
//!   RSS over the whole run;
//! * (g) load on one sandbox while the others idle: the resume → reachable
//!   rounds again with the K idle sandboxes up, against the rounds without.
//!
//! `sudo -E env "PATH=$PATH" cargo bench -p tollgate-benches --bench resume`

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;
use tollgate_benches::{
    ms, percentile, print_summary, proc_kib, quick, require_root, rounds, write_report, Figure,
    Target,
};
use tollgate_tests::daemon::Daemon;
use tollgate_tests::lab::{in_netns, PUBLIC4};

const SNAPSHOT: &str = "bench-resume-snap";
/// Bound on one sandbox becoming reachable.
const REACH_WITHIN: Duration = Duration::from_secs(20);

use tollgate_benches::api_call as call;

/// Connects from inside `ns` to the canary until it answers; false after
/// [`REACH_WITHIN`].
fn wait_reachable(ns: &str, t0: Instant) -> bool {
    let dst = SocketAddr::from((PUBLIC4, 80));
    let path = format!("/run/netns/{ns}");
    while t0.elapsed() < REACH_WITHIN {
        if Path::new(&path).exists() {
            let ok = in_netns(ns, move || {
                TcpStream::connect_timeout(&dst, Duration::from_millis(50)).is_ok()
            });
            if ok {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Room for many sandboxes: the default organisation's limit and the host
/// budget raised.
const CONFIG: &str = r#"
[[organizations]]
name = "default"
api_keys = []
max_sandboxes = 500

[host]
vcpu = 100000
memory_mib = 100000000

[network]
pool = "10.216.0.0/16"
"#;

/// The daemon's pid: the newest `tollgate serve` process.
fn daemon_pid() -> Option<u32> {
    let mut best = None;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_daemon = args.first().is_some_and(|a| a.ends_with(b"/tollgate"))
            && args.iter().any(|a| *a == b"serve");
        if is_daemon && best.is_none_or(|b| pid > b) {
            best = Some(pid);
        }
    }
    best
}

/// `n` rounds of [`resume_round`], each sandbox deleted after it: the ms to
/// each 201 and the ms until each sandbox was reachable.
fn resume_rounds(
    d: &Daemon,
    policy: &serde_json::Value,
    n: usize,
    label: &str,
) -> (Vec<f64>, Vec<f64>) {
    let (mut api, mut reach) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (answered, reached, id) = resume_round(d, policy, i);
        eprintln!(
            "{label} {}/{n}: 201 after {answered:.1} ms, reachable after {reached:.1} ms",
            i + 1
        );
        api.push(answered);
        reach.push(reached);
        let (s, body) = call(d, Method::DELETE, &format!("/v1/sandbox/{id}/"), None);
        assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    }
    (api, reach)
}

/// One resume with `policy`: (ms to the 201, ms until reachable, the id).
fn resume_round(d: &Daemon, policy: &serde_json::Value, i: usize) -> (f64, f64, String) {
    let t0 = Instant::now();
    let (s, body) = call(
        d,
        Method::POST,
        "/v1/snapshot/resume",
        Some(json!({"snapshot_name": SNAPSHOT, "network_policy": policy})),
    );
    let answered = t0.elapsed();
    assert_eq!(s, StatusCode::CREATED, "round {i}: {body}");
    let id = body["id"].as_str().expect("id").to_string();
    assert!(
        wait_reachable(&format!("tollgate-{id}"), t0),
        "round {i}: sandbox {id} never reached the canary"
    );
    (ms(answered), ms(t0.elapsed()), id)
}

fn main() {
    require_root();
    let n = rounds(5, 20);
    let idle = if quick() { 10 } else { 100 };
    let d = Daemon::start("bench-resume", CONFIG);
    // The snapshot every round resumes.
    let (s, body) = call(
        &d,
        Method::POST,
        "/v1/sandbox",
        Some(json!({"memory": 512})),
    );
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let src = body["id"].as_str().expect("id").to_string();
    let (s, body) = call(
        &d,
        Method::POST,
        &format!("/v1/sandbox/{src}/snapshot/create"),
        Some(json!({"name": SNAPSHOT, "kill_sandbox_after": true})),
    );
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let policy = json!({"mode": "custom", "allow_cidrs": [format!("{PUBLIC4}/32")]});
    let (api, reach) = resume_rounds(&d, &policy, n, "resume");
    // (g) K more sandboxes that stay idle.
    let pid = daemon_pid().expect("the daemon's process");
    std::thread::sleep(Duration::from_millis(300));
    let (rss0, avail0) = (
        proc_kib(Some(pid), "VmRSS:"),
        proc_kib(None, "MemAvailable:"),
    );
    let mut idle_ids = Vec::new();
    for i in 0..idle {
        let (s, body) = call(
            &d,
            Method::POST,
            "/v1/snapshot/resume",
            Some(json!({"snapshot_name": SNAPSHOT, "network_policy": policy})),
        );
        assert_eq!(s, StatusCode::CREATED, "idle sandbox {i}: {body}");
        idle_ids.push(body["id"].as_str().expect("id").to_string());
    }
    let last = idle_ids.last().expect("idle sandboxes").clone();
    assert!(
        wait_reachable(&format!("tollgate-{last}"), Instant::now()),
        "the last idle sandbox never came up"
    );
    std::thread::sleep(Duration::from_millis(300));
    let (rss1, avail1) = (
        proc_kib(Some(pid), "VmRSS:"),
        proc_kib(None, "MemAvailable:"),
    );
    eprintln!(
        "resume: {idle} idle sandboxes: daemon RSS {rss0:.0} → {rss1:.0} KiB, host available {avail0:.0} → {avail1:.0} KiB"
    );
    // (g) load on one sandbox while the others idle: the same resume →
    // reachable rounds with the K idle sandboxes up.
    let (_, reach_idle) = resume_rounds(&d, &policy, n, &format!("resume with {idle} idle"));
    let peak = proc_kib(Some(pid), "VmHWM:");
    for id in &idle_ids {
        let _ = call(&d, Method::DELETE, &format!("/v1/sandbox/{id}/"), None);
    }
    let fig = |name: &str, xs: &[f64], p: f64| Figure {
        name: format!("{name}_p{p}"),
        value: percentile(xs.to_vec(), p),
        baseline: None,
        unit: "ms",
        target: Target::Report,
    };
    let figures = vec![
        fig("resume_api_response", &api, 50.0),
        fig("resume_api_response", &api, 99.0),
        fig("resume_to_reachable", &reach, 50.0),
        fig("resume_to_reachable", &reach, 99.0),
        Figure {
            name: format!("resume_to_reachable_p50_with_{idle}_idle_sandboxes (direct: with none)"),
            value: percentile(reach_idle.clone(), 50.0),
            baseline: Some(percentile(reach.clone(), 50.0)),
            unit: "ms",
            target: Target::Report,
        },
        Figure {
            name: format!("daemon_rss_per_idle_sandbox_x{idle}"),
            value: (rss1 - rss0) / idle as f64,
            baseline: None,
            unit: "KiB",
            target: Target::MaxValue(256.0),
        },
        Figure {
            name: format!(
                "host_memory_per_idle_sandbox_x{idle} (kernel included: netns, links, eBPF maps)"
            ),
            value: (avail0 - avail1) / idle as f64,
            baseline: None,
            unit: "KiB",
            target: Target::Report,
        },
        Figure {
            name: "daemon_peak_rss".into(),
            value: peak,
            baseline: None,
            unit: "KiB",
            target: Target::Report,
        },
    ];
    let title = "resume API: request → sandbox reachable on the network (netns runtime)";
    print_summary(title, &figures);
    let notes = vec![format!(
        "rounds: {n}{}; policy custom with allow_cidrs {PUBLIC4}/32; reachability = first TCP connect from the sandbox's namespace to the lab canary",
        if quick() { " (quick)" } else { "" }
    )];
    write_report("resume", title, &figures, &notes);
    d.delete_all();
}
