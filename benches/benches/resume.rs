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
//!   policy all in place).
//!
//! `sudo -E env "PATH=$PATH" cargo bench -p tollgate-benches --bench resume`

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;
use tollgate_benches::{
    ms, percentile, print_summary, quick, require_root, rounds, write_report, Figure, Target,
};
use tollgate_tests::daemon::{default_config, Daemon, KEY_DEFAULT};
use tollgate_tests::lab::{in_netns, PUBLIC4};

const SNAPSHOT: &str = "bench-resume-snap";
/// Bound on one sandbox becoming reachable.
const REACH_WITHIN: Duration = Duration::from_secs(20);

fn call(
    d: &Daemon,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (StatusCode, serde_json::Value) {
    let a = d
        .call_raw(method.clone(), path, Some(KEY_DEFAULT), body.as_ref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (a.status, a.body)
}

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

fn main() {
    require_root();
    let n = rounds(5, 20);
    let d = Daemon::start("bench-resume", &default_config("10.216.0.0/20"));
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
    let (mut api, mut reach) = (Vec::new(), Vec::new());
    for i in 0..n {
        let t0 = Instant::now();
        let (s, body) = call(
            &d,
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
        let reached = t0.elapsed();
        eprintln!(
            "resume {}/{n}: 201 after {:.1} ms, reachable after {:.1} ms",
            i + 1,
            ms(answered),
            ms(reached)
        );
        api.push(ms(answered));
        reach.push(ms(reached));
        let (s, body) = call(&d, Method::DELETE, &format!("/v1/sandbox/{id}/"), None);
        assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
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
