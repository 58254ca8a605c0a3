//! Privileged tests of the netns runtime and per-sandbox networks, with real
//! namespaces, links and processes. Run as root:
//! `sudo -E env "PATH=$PATH" cargo test -p tollgate-tests --test runtime_netns`.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::net::{self, AddressPlan};
use tollgate::runtime::netns::{NetnsConfig, NetnsRuntime};
use tollgate::runtime::{
    ExecOutput, ExecRequest, Runtime, RuntimeError, RuntimeHandle, SandboxSpec, Template,
};
use tollgate_tests::privileged::{
    alive, link_exists, netns_file_exists, ns_id, pids_in_pid_ns, pids_with_cmdline, proc_state,
    require_root, tollgate_bin, wait_until, NetworkGuard, SandboxGuard, TempDir,
};

const UID: u32 = 60_123;
const LOOP: [&str; 3] = ["/bin/sh", "-c", "while :; do sleep 3600; done"];

fn runtime(hide: Vec<PathBuf>) -> Arc<NetnsRuntime> {
    require_root();
    Arc::new(NetnsRuntime::new(NetnsConfig {
        exe: tollgate_bin(),
        hide_paths: hide,
        plan: AddressPlan::default(),
    }))
}

fn spec(id: &str, slot: u32, command: &[&str]) -> SandboxSpec {
    SandboxSpec {
        id: id.to_owned(),
        slot,
        template: Template {
            name: "system/test".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::from([("TPL".to_owned(), "from-template".to_owned())]),
        },
        env_vars: BTreeMap::from([("FOO".to_owned(), "bar".to_owned())]),
        uid: UID,
        vcpu: 1,
        memory_mib: 256,
    }
}

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        timeout: Duration::from_secs(30),
    }
}

async fn run(rt: &NetnsRuntime, h: &RuntimeHandle, argv: &[&str]) -> ExecOutput {
    rt.exec(h, req(argv))
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?}: {e}"))
}

async fn ok(rt: &NetnsRuntime, h: &RuntimeHandle, argv: &[&str]) -> String {
    let out = run(rt, h, argv).await;
    assert_eq!(out.exit_code, 0, "{argv:?}: {out:?}");
    out.stdout.trim().to_owned()
}

async fn start(rt: &Arc<NetnsRuntime>, spec: &SandboxSpec) -> SandboxGuard<NetnsRuntime> {
    // Leftovers of an earlier, interrupted run must not hide a bug.
    drop(NetworkGuard::for_sandbox(&spec.id, spec.slot));
    let h = rt
        .start(spec)
        .await
        .unwrap_or_else(|e| panic!("start {}: {e}", spec.id));
    SandboxGuard::new(Arc::clone(rt), h)
}

/// PID namespace of the sandbox (from the host's view of its supervisor).
fn sandbox_pid_ns(h: &RuntimeHandle) -> (u64, u64) {
    ns_id(format!("/proc/{}/ns/pid_for_children", h.pid)).expect("supervisor pid_for_children")
}

/// Asserts that nothing of the sandbox `id` on `slot` is left on the host.
fn assert_nothing_left(id: &str, slot: u32) {
    let netns = net::netns_name(id);
    assert!(!netns_file_exists(&netns), "/run/netns/{netns} left behind");
    assert!(
        !link_exists(&net::host_if_name(slot)),
        "link {} left behind",
        net::host_if_name(slot)
    );
    assert!(
        wait_until(Duration::from_secs(5), || pids_with_cmdline(&netns)
            .is_empty()),
        "processes of {id} left behind: {:?}",
        pids_with_cmdline(&netns)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_is_isolated_and_configured() {
    let state = TempDir::new("rtn-state");
    std::fs::write(state.0.join("ca.key"), "SECRET-CA-KEY").expect("write secret");
    let rt = runtime(vec![state.0.clone()]);
    let id = "sbx-rtn-iso";
    let slot = 4001;
    let sb = start(&rt, &spec(id, slot, &LOOP)).await;
    let h = &sb.handle;
    let link = AddressPlan::default().link(slot).expect("slot in plan");
    assert_eq!(h.backend, "netns");
    assert_eq!(h.network.netns, format!("tollgate-{id}"));
    assert_eq!(h.network.host_if, format!("tgh{slot}"));
    assert_eq!(h.network.guest_addr, link.guest);
    assert_eq!(h.network.gateway, link.gateway);
    assert!(rt.is_alive(h));

    // Its own network namespace: the one bound at /run/netns/<name>.
    let host_net = std::fs::read_link("/proc/self/ns/net").expect("host netns");
    let sb_net = ok(&rt, h, &["readlink", "/proc/self/ns/net"]).await;
    assert_ne!(sb_net, host_net.to_string_lossy());
    let (_, ino) = ns_id(net::netns_path(&h.network.netns)).expect("netns file");
    assert_eq!(sb_net, format!("net:[{ino}]"));

    // Only lo and eth0, with the planned address and default route.
    assert_eq!(ok(&rt, h, &["ls", "/sys/class/net"]).await, "eth0\nlo");
    let mac = ok(&rt, h, &["cat", "/sys/class/net/eth0/address"]).await;
    assert_eq!(mac.len(), 17, "mac {mac:?}");
    assert!(ok(&rt, h, &["cat", "/proc/net/fib_trie"])
        .await
        .contains(&link.guest.to_string()));
    let addr = ok(&rt, h, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).await;
    assert!(addr.contains(&format!("inet {}/30", link.guest)), "{addr}");
    let route = ok(&rt, h, &["ip", "-4", "route", "show", "default"]).await;
    assert!(
        route.contains(&format!("default via {} dev eth0", link.gateway)),
        "{route}"
    );

    // Host side: tgh<slot> is up with the gateway address.
    assert!(link_exists(&h.network.host_if));
    let host_addr = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", &h.network.host_if])
        .output()
        .expect("ip");
    assert!(
        String::from_utf8_lossy(&host_addr.stdout).contains(&format!("inet {}/30", link.gateway))
    );
    let operstate = std::fs::read_to_string(format!("/sys/class/net/{}/flags", h.network.host_if))
        .expect("flags");
    let flags =
        u32::from_str_radix(operstate.trim().trim_start_matches("0x"), 16).expect("hex flags");
    assert_eq!(flags & 1, 1, "host link not up");

    // The link carries traffic: the sandbox reaches a listener on the gateway.
    let listener = TcpListener::bind((link.gateway, 0)).expect("listen on gateway");
    let port = listener.local_addr().expect("addr").port();
    let accept = std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("timeout");
                    let mut buf = String::new();
                    let _ = s.read_to_string(&mut buf);
                    return Some((peer.ip(), buf));
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return None,
            }
        }
    });
    let script = format!(
        "import socket; s = socket.create_connection(('{}', {port}), 5); s.sendall(b'hello'); s.close()",
        link.gateway
    );
    ok(&rt, h, &["python3", "-c", &script]).await;
    let (peer, data) = accept
        .join()
        .expect("accept thread")
        .expect("no connection from the sandbox");
    assert_eq!(peer, std::net::IpAddr::V4(link.guest));
    assert_eq!(data, "hello");

    // Unprivileged uid, no supplementary groups.
    assert_eq!(ok(&rt, h, &["id", "-u"]).await, UID.to_string());
    assert_eq!(ok(&rt, h, &["id", "-G"]).await, UID.to_string());

    // The state dir and /run/netns are empty inside; the secret is unreadable.
    assert_eq!(
        ok(&rt, h, &["ls", "-A", &state.0.to_string_lossy()]).await,
        ""
    );
    let cat = run(&rt, h, &["cat", &format!("{}/ca.key", state.0.display())]).await;
    assert_ne!(cat.exit_code, 0);
    assert!(!cat.stdout.contains("SECRET"));
    assert_eq!(ok(&rt, h, &["ls", "-A", "/run/netns"]).await, "");

    // Own UTS and PID namespaces: hostname is the id, PID 1 is the template.
    assert_eq!(ok(&rt, h, &["hostname"]).await, id);
    let host_pid_ns = std::fs::read_link("/proc/self/ns/pid").expect("host pidns");
    assert_ne!(
        ok(&rt, h, &["readlink", "/proc/self/ns/pid"]).await,
        host_pid_ns.to_string_lossy()
    );
    assert!(ok(&rt, h, &["cat", "/proc/1/cmdline"])
        .await
        .starts_with("/bin/sh\0-c\0while"));

    // Environment: template + env_vars via PID 1, request env on top; cwd.
    assert_eq!(
        ok(&rt, h, &["sh", "-c", "echo $FOO $TPL $HOME"]).await,
        "bar from-template /tmp"
    );
    let mut r = req(&["sh", "-c", "echo $FOO; pwd"]);
    r.env.insert("FOO".into(), "override".into());
    r.cwd = Some(PathBuf::from("/usr"));
    let out = rt.exec(h, r).await.expect("exec");
    assert_eq!(out.stdout, "override\n/usr\n");

    // Private /tmp: writes do not reach the host's.
    let probe = format!("/tmp/tollgate-rtn-probe-{}", std::process::id());
    ok(
        &rt,
        h,
        &["sh", "-c", &format!("echo x > {probe} && cat {probe}")],
    )
    .await;
    assert!(!std::path::Path::new(&probe).exists());

    rt.stop(h).await.expect("stop");
    assert!(!rt.is_alive(h));
    assert_nothing_left(id, slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_exit_codes_output_and_timeout() {
    let rt = runtime(vec![]);
    let sb = start(&rt, &spec("sbx-rtn-exec", 4002, &LOOP)).await;
    let h = &sb.handle;

    let out = run(&rt, h, &["sh", "-c", "echo out; echo err >&2; exit 7"]).await;
    assert_eq!(
        (out.exit_code, out.stdout.as_str(), out.stderr.as_str()),
        (7, "out\n", "err\n")
    );
    assert_eq!(run(&rt, h, &["sh", "-c", "exit 0"]).await.exit_code, 0);
    assert_eq!(
        run(&rt, h, &["sh", "-c", "kill -9 $$"]).await.exit_code,
        137
    );
    let missing = run(&rt, h, &["/nonexistent/tollgate-cmd"]).await;
    assert_eq!(missing.exit_code, 127, "{missing:?}");
    let missing = run(&rt, h, &["tollgate-no-such-command"]).await;
    assert_eq!(missing.exit_code, 127, "{missing:?}");
    assert!(missing.stderr.contains("not found"), "{missing:?}");

    // Timeout: 124, promptly, and the command's whole process group is gone.
    let pidns = sandbox_pid_ns(h);
    let mut r = req(&["sh", "-c", "echo begun; sleep 301; true"]);
    r.timeout = Duration::from_millis(700);
    let t0 = Instant::now();
    let out = rt.exec(h, r).await.expect("exec");
    assert_eq!(out.exit_code, 124, "{out:?}");
    assert_eq!(out.stdout, "begun\n");
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "timeout took {:?}",
        t0.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(5), || pids_in_pid_ns(pidns)
            .iter()
            .all(|p| !pids_with_cmdline("sleep 301").contains(p))),
        "sleep 301 survived the timeout"
    );
    // The sandbox itself is unaffected.
    assert!(rt.is_alive(h));
    assert_eq!(ok(&rt, h, &["echo", "still"]).await, "still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_every_process_and_resume_continues_them() {
    let rt = runtime(vec![]);
    let sb = start(&rt, &spec("sbx-rtn-pause", 4003, &LOOP)).await;
    let h = &sb.handle;
    let pidns = sandbox_pid_ns(h);
    // The shell and its sleep.
    assert!(wait_until(Duration::from_secs(5), || pids_in_pid_ns(pidns)
        .len()
        >= 2));

    rt.pause(h).await.expect("pause");
    let pids = pids_in_pid_ns(pidns);
    assert!(pids.len() >= 2, "{pids:?}");
    for p in &pids {
        assert_eq!(proc_state(*p), Some('T'), "pid {p} not stopped");
    }
    assert!(alive(h.pid), "the supervisor itself keeps running");
    assert!(rt.is_alive(h));

    rt.resume(h).await.expect("resume");
    assert!(
        wait_until(Duration::from_secs(5), || pids_in_pid_ns(pidns)
            .iter()
            .all(|p| proc_state(*p) != Some('T'))),
        "still stopped after resume"
    );
    assert_eq!(ok(&rt, h, &["echo", "awake"]).await, "awake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_removes_everything_and_is_idempotent() {
    let rt = runtime(vec![]);
    let id = "sbx-rtn-stop";
    let slot = 4004;
    let sb = start(&rt, &spec(id, slot, &LOOP)).await;
    let h = sb.handle.clone();
    let pidns = sandbox_pid_ns(&h);
    // An exec'd background process must die too.
    ok(&rt, &h, &["sh", "-c", "sleep 303 >/dev/null 2>&1 &"]).await;
    assert!(netns_file_exists(&h.network.netns));
    assert!(link_exists(&h.network.host_if));
    assert!(pids_in_pid_ns(pidns).len() >= 3);

    rt.stop(&h).await.expect("stop");
    assert!(!netns_file_exists(&h.network.netns));
    assert!(!link_exists(&h.network.host_if));
    assert!(
        pids_in_pid_ns(pidns).is_empty(),
        "{:?}",
        pids_in_pid_ns(pidns)
    );
    assert!(
        wait_until(Duration::from_secs(5), || !alive(h.pid)),
        "supervisor {} still alive",
        h.pid
    );
    assert!(!rt.is_alive(&h));
    assert_nothing_left(id, slot);

    // Second stop, and operations on a stopped sandbox.
    rt.stop(&h).await.expect("second stop");
    assert!(matches!(
        rt.exec(&h, req(&["true"])).await,
        Err(RuntimeError::NotRunning)
    ));
    assert!(matches!(rt.pause(&h).await, Err(RuntimeError::NotRunning)));
    assert!(matches!(rt.resume(&h).await, Err(RuntimeError::NotRunning)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_whose_process_died_is_not_alive_and_stop_still_cleans_up() {
    let rt = runtime(vec![]);
    let id = "sbx-rtn-dead";
    let slot = 4005;
    let sb = start(&rt, &spec(id, slot, &["/bin/sh", "-c", "exit 3"])).await;
    let h = sb.handle.clone();
    assert!(
        wait_until(Duration::from_secs(5), || !rt.is_alive(&h)),
        "exited sandbox reported alive"
    );
    assert!(
        netns_file_exists(&h.network.netns),
        "network is kept until stop"
    );
    rt.stop(&h).await.expect("stop of a dead sandbox");
    assert_nothing_left(id, slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_start_leaves_nothing_behind() {
    let rt = runtime(vec![]);
    let id = "sbx-rtn-nocmd";
    let slot = 4006;
    let _cleanup = NetworkGuard::for_sandbox(id, slot);
    let err = rt
        .start(&spec(id, slot, &["/nonexistent/tollgate-init"]))
        .await
        .expect_err("start must fail");
    match &err {
        RuntimeError::Process(msg) => assert!(msg.contains("/nonexistent/tollgate-init"), "{msg}"),
        other => panic!("unexpected error {other:?}"),
    }
    assert_nothing_left(id, slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_outside_the_plan_or_as_root_creates_nothing() {
    let rt = runtime(vec![]);
    let cap = AddressPlan::default().capacity();
    assert_eq!(cap, 16384);
    let id = "sbx-rtn-noslot";
    let err = rt
        .start(&spec(id, cap, &LOOP))
        .await
        .expect_err("slot outside the plan");
    assert!(matches!(err, RuntimeError::Network(_)), "{err:?}");
    assert_nothing_left(id, cap);

    let mut root = spec("sbx-rtn-root", 4007, &LOOP);
    root.uid = 0;
    let err = rt.start(&root).await.expect_err("uid 0");
    assert!(matches!(err, RuntimeError::Privilege(_)), "{err:?}");
    assert_nothing_left("sbx-rtn-root", 4007);
}

/// Deletes a test link on drop.
struct LinkGuard(&'static str);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", self.0]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_failure_midway_rolls_back_and_spares_foreign_links() {
    let rt = runtime(vec![]);
    let id = "sbx-rtn-clash";
    let slot = 4008;
    let foreign = "tgh4008";
    let _cleanup = NetworkGuard::for_sandbox(id, slot);
    let _ = Command::new("ip").args(["link", "del", foreign]).status();
    let st = Command::new("ip")
        .args(["link", "add", foreign, "type", "bridge"])
        .status()
        .expect("ip link add");
    assert!(st.success());
    let _foreign = LinkGuard(foreign);

    // The namespace gets created, then the link clashes.
    let err = rt
        .start(&spec(id, slot, &LOOP))
        .await
        .expect_err("link name clash");
    assert!(matches!(err, RuntimeError::Network(_)), "{err:?}");
    assert!(
        !netns_file_exists(&net::netns_name(id)),
        "namespace not rolled back"
    );
    assert!(link_exists(foreign), "a link that was not ours was deleted");
    assert!(pids_with_cmdline(&net::netns_name(id)).is_empty());

    // teardown with a stale NetworkInfo does not delete the foreign link either.
    let stale = NetworkGuard::for_sandbox(id, slot);
    net::create_netns(&stale.0.netns)
        .await
        .expect("create netns");
    net::teardown(&stale.0).await.expect("teardown");
    assert!(link_exists(foreign));
    assert!(!netns_file_exists(&stale.0.netns));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_setup_and_teardown_are_idempotent() {
    require_root();
    let plan = AddressPlan::default();
    let name = net::netns_name("sbx-rtn-net");
    let slot = 4009;
    let guard = NetworkGuard::for_sandbox("sbx-rtn-net", slot);
    drop(NetworkGuard::for_sandbox("sbx-rtn-net", slot));

    let a = net::setup(&plan, &name, slot).await.expect("setup");
    let ns_before = ns_id(net::netns_path(&name)).expect("netns");
    let b = net::setup(&plan, &name, slot).await.expect("second setup");
    assert_eq!(a, b);
    assert_eq!(
        ns_id(net::netns_path(&name)),
        Some(ns_before),
        "namespace was replaced"
    );
    assert!(net::netns_exists(&name));
    assert!(link_exists(&a.host_if));
    // /run/netns is a shared mount point, like `ip netns add` leaves it.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        mountinfo
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/run/netns") && l.contains("shared:")),
        "/run/netns is not a shared mount"
    );

    net::teardown(&a).await.expect("teardown");
    net::teardown(&a).await.expect("second teardown");
    assert!(!netns_file_exists(&name));
    assert!(!link_exists(&a.host_if));
    assert!(net::setup(&plan, "../escape", slot).await.is_err());
    assert!(!link_exists(&a.host_if));
    drop(guard);
}

/// A daemon that died mid-start leaves a record without a handle; `release`
/// finds the sandbox's processes, namespace and link by id and slot alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_by_id_and_slot_removes_a_started_sandbox() {
    let rt = runtime(vec![]);
    let id = "sbx-rtn-release";
    let slot = 4009;
    let sb = start(&rt, &spec(id, slot, &LOOP)).await;
    let h = sb.handle.clone();
    assert!(rt.is_alive(&h));
    assert!(link_exists(&net::host_if_name(slot)));
    rt.release(id, slot).await.expect("release");
    assert!(!rt.is_alive(&h), "release left the supervisor alive");
    assert_nothing_left(id, slot);
    rt.release(id, slot).await.expect("second release");
    drop(sb);
}
