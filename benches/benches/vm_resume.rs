//! The resume API on the `vm` runtime (root, QEMU, the guest image): a real
//! daemon in a closed lab restores a QEMU microVM from a memory snapshot
//! per round.
//!
//! The snapshot is taken of a VM in which a busybox loop tries a TCP
//! connection to the lab's upstream (198.51.100.10:7070) every 20 ms. That
//! loop is in the snapshot's memory, so a restored clone goes on trying the
//! moment its vCPU runs; the bench's listener there stamps the first
//! connection it accepts. Each round `POST /v1/snapshot/resume` with a policy
//! that allows the address, then the clone is deleted.
//!
//! Two series: N rounds of one snapshot (from the second on, the daemon has
//! a warm VM for it: QEMU waiting for the memory, tap on the wire, network
//! and eBPF filter built, deny-all until taken), and N rounds alternating
//! between two snapshots, where each resume finds the other's warm VM and
//! restores cold (`vm_resume_cold_*`).
//!
//! Figures (p50 and p99 over the rounds; no direct baseline exists for "a VM
//! appears", so targets are absolute):
//! * `vm_resume_to_vcpu_running`: request → QEMU reports the restored vCPU
//!   running (the runtime stamps that moment in the clone's `timings.json`);
//! * `vm_resume_api_response`: request → `201` (running, and the agent has
//!   applied the clone's config);
//! * `vm_resume_to_first_tcp_connection`: request → the first TCP
//!   connection from inside the guest accepted by the allowed host;
//! * memory: unique RSS (private pages of the QEMU process,
//!   `Private_Clean + Private_Dirty`) per idle clone and host memory
//!   (`MemAvailable` drop) per clone, with K sandboxes created from the
//!   template (clones of its memory snapshot running an idle shell; the
//!   probe loop would keep them busy).
//!
//! `sudo -E env "PATH=$PATH" cargo bench -p tollgate-benches --bench vm_resume`

use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use serde_json::json;
use tollgate_benches::{
    ms, percentile, print_summary, proc_kib, quick, require_root, rounds, write_report, Figure,
    Target,
};
use tollgate_tests::daemon::{vm_runtime_section, Daemon};
use tollgate_tests::lab::{in_netns, PUBLIC4};

const SNAPSHOT: &str = "bench-vm-resume-snap";
/// A second snapshot of the same kind, for the cold rounds.
const OTHER_SNAPSHOT: &str = "bench-vm-resume-other";
/// Port of the bench's listener on the lab's upstream address.
const PORT: u16 = 7070;
/// Bound on one clone's first connection.
const CONNECT_WITHIN: Duration = Duration::from_secs(30);

use tollgate_benches::api_call as call;

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

/// Unique memory of a process: its private pages (KiB).
fn uss_kib(pid: i32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

/// The QEMU process of sandbox `id`.
fn qemu_of(id: &str) -> i32 {
    let pids = tollgate_tests::privileged::pids_with_cmdline(&format!("vm/run/{id}/"));
    assert_eq!(pids.len(), 1, "QEMU of {id}: {pids:?}");
    pids[0]
}

fn main() {
    require_root();
    let n = rounds(20, 30);
    let idle = if quick() { 4 } else { 8 };
    let config = format!(
        r#"
[[organizations]]
name = "default"
api_keys = []
max_sandboxes = 100

[host]
vcpu = 1000
memory_mib = 1000000

[network]
pool = "10.217.0.0/16"
{}
"#,
        vm_runtime_section()
    );
    let d = Daemon::start("bench-vm-resume", &config);
    let policy = json!({"mode": "custom", "allow_cidrs": [format!("{PUBLIC4}/32")]});

    // The snapshots: VMs whose memory holds the connecting loop.
    for name in [SNAPSHOT, OTHER_SNAPSHOT] {
        snapshot_of_loop(&d, &policy, name);
    }

    // The allowed host: stamps every connection it accepts.
    let listener = in_netns(&d.lab.up_ns, || {
        TcpListener::bind((PUBLIC4, PORT)).expect("bind the bench listener")
    });
    let (tx, rx) = mpsc::channel::<Instant>();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            if s.is_err() || tx.send(Instant::now()).is_err() {
                return;
            }
        }
    });

    // One snapshot resumed again and again: from the second round on the
    // daemon has a warm VM for it (`[runtime] warm`, default 1).
    let same: Vec<Round> = (0..n)
        .map(|i| round(&d, &rx, &policy, SNAPSHOT, "same snapshot", i, n))
        .collect();
    // Two snapshots in turn: with one warm VM kept, each resume finds the
    // other snapshot's and restores cold (QEMU start, network and eBPF
    // filter built on the request's path).
    let alternating: Vec<Round> = (0..n)
        .map(|i| {
            let snap = if i % 2 == 0 { OTHER_SNAPSHOT } else { SNAPSHOT };
            round(&d, &rx, &policy, snap, "alternating snapshots", i, n)
        })
        .collect();
    let warm_hits = same.iter().filter(|r| r.warm).count();
    let cold: Vec<&Round> = alternating.iter().filter(|r| !r.warm).collect();
    assert!(
        !cold.is_empty(),
        "every alternating round found a warm VM: the pool keeps more than one"
    );
    let running: Vec<f64> = same.iter().map(|r| r.running).collect();
    let api: Vec<f64> = same.iter().map(|r| r.api).collect();
    let connect: Vec<f64> = same.iter().map(|r| r.connect).collect();
    let cold_running: Vec<f64> = cold.iter().map(|r| r.running).collect();
    let cold_api: Vec<f64> = cold.iter().map(|r| r.api).collect();
    let cold_connect: Vec<f64> = cold.iter().map(|r| r.connect).collect();

    // K idle clones of the template's snapshot.
    std::thread::sleep(Duration::from_millis(500));
    let avail0 = proc_kib(None, "MemAvailable:");
    let mut ids = Vec::new();
    for i in 0..idle {
        let (s, body) = call(
            &d,
            Method::POST,
            "/v1/sandbox",
            Some(json!({"memory": 512, "network_policy": policy})),
        );
        assert_eq!(s, StatusCode::CREATED, "idle clone {i}: {body}");
        ids.push(body["id"].as_str().expect("id").to_string());
    }
    std::thread::sleep(Duration::from_secs(3));
    let avail1 = proc_kib(None, "MemAvailable:");
    let uss: Vec<f64> = ids.iter().map(|id| uss_kib(qemu_of(id)) / 1024.0).collect();
    eprintln!("vm_resume: {idle} idle clones, unique RSS MiB {uss:?}, host available {avail0:.0} → {avail1:.0} KiB");
    for id in &ids {
        let _ = call(&d, Method::DELETE, &format!("/v1/sandbox/{id}/"), None);
    }

    let fig = |name: &str, xs: &[f64], p: f64, target: Target| Figure {
        name: format!("{name}_p{p}"),
        value: percentile(xs.to_vec(), p),
        baseline: None,
        unit: "ms",
        target,
    };
    let figures = vec![
        fig(
            "vm_resume_to_vcpu_running",
            &running,
            50.0,
            Target::MaxValue(60.0),
        ),
        fig("vm_resume_to_vcpu_running", &running, 99.0, Target::Report),
        fig("vm_resume_api_response", &api, 50.0, Target::Report),
        fig("vm_resume_api_response", &api, 99.0, Target::Report),
        fig(
            "vm_resume_to_first_tcp_connection",
            &connect,
            50.0,
            Target::MaxValue(400.0),
        ),
        fig(
            "vm_resume_to_first_tcp_connection",
            &connect,
            99.0,
            Target::Report,
        ),
        Figure {
            name: format!("vm_resume_warm_hits_of_{n}"),
            value: warm_hits as f64,
            baseline: None,
            unit: "rounds",
            target: Target::Report,
        },
        fig(
            "vm_resume_cold_to_vcpu_running",
            &cold_running,
            50.0,
            Target::Report,
        ),
        fig(
            "vm_resume_cold_to_vcpu_running",
            &cold_running,
            99.0,
            Target::Report,
        ),
        fig(
            "vm_resume_cold_api_response",
            &cold_api,
            50.0,
            Target::Report,
        ),
        fig(
            "vm_resume_cold_to_first_tcp_connection",
            &cold_connect,
            50.0,
            Target::Report,
        ),
        Figure {
            name: format!("vm_unique_rss_per_idle_clone_x{idle}"),
            value: uss.iter().sum::<f64>() / uss.len().max(1) as f64,
            baseline: None,
            unit: "MiB",
            target: Target::MaxValue(40.0),
        },
        Figure {
            name: format!("vm_host_memory_per_idle_clone_x{idle}"),
            value: (avail0 - avail1) / 1024.0 / idle as f64,
            baseline: None,
            unit: "MiB",
            target: Target::Report,
        },
    ];
    let title =
        "vm runtime: resume → vCPU running → first TCP connection from the guest (TCG here)";
    print_summary(title, &figures);
    let notes = vec![
        format!(
            "rounds: {n}{} of one snapshot (warm VM hits: {warm_hits}) and {n} alternating between two (cold: {}); 512 MiB guests, 1 vCPU; policy custom with allow_cidrs {PUBLIC4}/32; idle clones: {idle}",
            if quick() { " (quick)" } else { "" },
            cold.len()
        ),
        "vm_resume_*: the snapshot resumed again and again (the daemon keeps a warm VM for it); vm_resume_cold_*: two snapshots in turn, so every resume builds QEMU, network and filter on its path".to_string(),
    ];
    write_report("vm_resume", title, &figures, &notes);
    d.delete_all();
}

/// A VM running the connecting loop, snapshotted as `name` and deleted.
fn snapshot_of_loop(d: &Daemon, policy: &serde_json::Value, name: &str) {
    let (s, body) = call(
        d,
        Method::POST,
        "/v1/sandbox",
        // Allowed, with nothing listening yet: every try is refused at once,
        // so the snapshot catches the loop between tries, not inside one.
        Some(json!({"memory": 512, "network_policy": policy})),
    );
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let src = body["id"].as_str().expect("id").to_string();
    let loop_cmd = format!(
        "setsid sh -c 'while :; do nc -w 1 {PUBLIC4} {PORT} </dev/null >/dev/null 2>&1; usleep 20000; done' </dev/null >/dev/null 2>&1 &"
    );
    let (s, body) = call(
        d,
        Method::POST,
        &format!("/v1/sandbox/{src}/process/execute"),
        Some(json!({"command": loop_cmd, "timeout": 30})),
    );
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["exit_code"], 0, "{body}");
    let (s, body) = call(
        d,
        Method::POST,
        &format!("/v1/sandbox/{src}/snapshot/create"),
        Some(json!({"name": name, "kill_sandbox_after": true})),
    );
    assert_eq!(s, StatusCode::CREATED, "{body}");
}

/// One round's figures (ms from the request).
struct Round {
    running: f64,
    api: f64,
    connect: f64,
    /// The clone was a warm VM.
    warm: bool,
}

/// Resumes `snapshot`, waits for the clone's first connection, deletes it.
fn round(
    d: &Daemon,
    rx: &mpsc::Receiver<Instant>,
    policy: &serde_json::Value,
    snapshot: &str,
    what: &str,
    i: usize,
    n: usize,
) -> Round {
    while rx.try_recv().is_ok() {}
    let t0 = Instant::now();
    let t0_unix = unix_ms();
    let (s, body) = call(
        d,
        Method::POST,
        "/v1/snapshot/resume",
        Some(json!({"snapshot_name": snapshot, "network_policy": policy})),
    );
    let answered = ms(t0.elapsed());
    assert_eq!(s, StatusCode::CREATED, "round {i}: {body}");
    let id = body["id"].as_str().expect("id").to_string();
    let first = rx
        .recv_timeout(CONNECT_WITHIN)
        .unwrap_or_else(|_| panic!("round {i}: {id} never connected to the allowed host"));
    let timings: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.state_dir.join("vm/run").join(&id).join("timings.json"))
            .expect("timings.json"),
    )
    .expect("timings");
    let run_ms = timings["running_at_unix_ms"].as_f64().expect("running_at") - t0_unix;
    let conn_ms = ms(first.duration_since(t0));
    let warm = timings["warm"].as_bool().unwrap_or(false);
    let in_runtime = timings["running_ms"].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "vm_resume ({what}) {}/{n}: {} VM, vCPU running after {run_ms:.1} ms ({in_runtime:.1} ms of it in the runtime), 201 after {answered:.1} ms, first TCP connection after {conn_ms:.1} ms",
        i + 1,
        if warm { "warm" } else { "cold" },
    );
    let (s, body) = call(d, Method::DELETE, &format!("/v1/sandbox/{id}/"), None);
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    Round {
        running: run_ms,
        api: answered,
        connect: conn_ms,
        warm,
    }
}
