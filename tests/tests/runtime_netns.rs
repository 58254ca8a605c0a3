//! Privileged tests of per-sandbox networks (`tollgate::net`) and of the
//! netns runtime on top of them, with real namespaces, links, nftables and
//! processes. Run as root:
//! `sudo -E env "PATH=$PATH" cargo test -p tollgate-tests --test runtime_netns`.
//!
//! Runtime tests set the network up in the test's own namespace (as the
//! daemon does in its own), then start the sandbox on it. Data-path tests run
//! the host side inside a [`Lab`] (a host namespace whose only way out is the
//! upstream namespace with the canary), so no test packet leaves the machine.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::net::{self, NetError, NetPlan, NetworkInfo};
use tollgate::runtime::netns::{
    NetnsConfig, NetnsRuntime, CA_ENV_VARS, SANDBOX_CA_BUNDLE, SANDBOX_CA_CERT, SANDBOX_FILES_DIR,
};
use tollgate::runtime::{
    ExecOutput, ExecRequest, Runtime, RuntimeError, RuntimeHandle, SandboxSpec, Template,
};
use tollgate_proxy::intercept::SandboxCa;
use tollgate_tests::lab::{in_netns, Lab, HOST_WAN, PUBLIC4, PUBLIC6};
use tollgate_tests::privileged::{
    alive, block_on_in, link_exists, links_of, netns_file_exists, nft_in, ns_id, pids_in_pid_ns,
    pids_with_cmdline, proc_state, require_root, run_in, tcp_exchange, tollgate_bin, wait_until,
    NetworkGuard, SandboxGuard, TempDir,
};

const UID: u32 = 60_123;
/// The lab host's v6 address on the upstream link (its v6 NAT address).
const HOST_WAN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
const LOOP: [&str; 3] = ["/bin/sh", "-c", "while :; do sleep 3600; done"];
/// How long a connection that must not get through is given.
const BLOCKED: Duration = Duration::from_millis(1500);
/// How long a connection that must get through is given.
const OPEN: Duration = Duration::from_secs(5);

fn runtime(hide: Vec<PathBuf>) -> Arc<NetnsRuntime> {
    require_root();
    Arc::new(NetnsRuntime::new(NetnsConfig {
        exe: tollgate_bin(),
        hide_paths: hide,
        resolv_conf: None,
        files_dir: None,
        system_roots: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
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
        ca_pem: None,
        image: None,
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

/// Sets up a sandbox network in the test's namespace (after removing
/// leftovers of an earlier, interrupted run) and guards it.
async fn network(id: &str, slot: u32) -> (NetworkInfo, NetworkGuard) {
    require_root();
    let guard = NetworkGuard::for_sandbox(id, slot);
    guard.teardown().expect("remove leftovers");
    let info = net::setup(&NetPlan::default(), id, slot)
        .await
        .unwrap_or_else(|e| panic!("net::setup {id}: {e}"));
    (info, guard)
}

/// A started sandbox. Dropped in field order: processes, then network.
struct Started {
    sb: SandboxGuard<NetnsRuntime>,
    _net: NetworkGuard,
}

async fn start(rt: &Arc<NetnsRuntime>, spec: &SandboxSpec) -> Started {
    let (info, net) = network(&spec.id, spec.slot).await;
    let h = rt
        .start(spec, &info)
        .await
        .unwrap_or_else(|e| panic!("start {}: {e}", spec.id));
    assert_eq!(h.network, info, "the handle carries the given network");
    Started {
        sb: SandboxGuard::new(Arc::clone(rt), h),
        _net: net,
    }
}

/// PID namespace of the sandbox (from the host's view of its supervisor).
fn sandbox_pid_ns(h: &RuntimeHandle) -> (u64, u64) {
    ns_id(format!("/proc/{}/ns/pid_for_children", h.pid)).expect("supervisor pid_for_children")
}

/// Asserts that no process of sandbox `id` is left.
fn assert_no_processes(id: &str) {
    let netns = net::netns_name(id);
    assert!(
        wait_until(Duration::from_secs(5), || pids_with_cmdline(&netns)
            .is_empty()),
        "processes of {id} left behind: {:?}",
        pids_with_cmdline(&netns)
    );
}

/// Asserts that the network of sandbox `id` on `slot` exists.
fn assert_network_present(id: &str, slot: u32) {
    assert!(netns_file_exists(&net::netns_name(id)));
    assert!(netns_file_exists(&net::router_netns_name(id)));
    assert!(link_exists(&net::host_if_name(slot)));
}

/// Asserts that nothing of the sandbox `id` on `slot` is left on the host
/// (host side in the test's namespace).
fn assert_nothing_left(id: &str, slot: u32) {
    for ns in [net::netns_name(id), net::router_netns_name(id)] {
        assert!(!netns_file_exists(&ns), "/run/netns/{ns} left behind");
    }
    assert!(
        !link_exists(&net::host_if_name(slot)),
        "link {} left behind",
        net::host_if_name(slot)
    );
    assert_no_processes(id);
}

/// A TCP listener created inside namespace `ns`, accepting on a thread: the
/// first connection's peer and local address and what it sent (it gets
/// `reply` back), or `None` when nothing connects within `wait`.
type Accepted = Option<(SocketAddr, SocketAddr, String)>;

fn serve_once(
    ns: &str,
    bind: SocketAddr,
    reply: &'static [u8],
    wait: Duration,
) -> (SocketAddr, std::thread::JoinHandle<Accepted>) {
    let listener = in_netns(ns, move || {
        TcpListener::bind(bind).expect("bind in namespace")
    });
    let addr = listener.local_addr().expect("local addr");
    (addr, accept_on_thread(listener, reply, wait))
}

fn accept_on_thread(
    listener: TcpListener,
    reply: &'static [u8],
    wait: Duration,
) -> std::thread::JoinHandle<Accepted> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + wait;
        loop {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    let local = s.local_addr().expect("local addr");
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(Duration::from_secs(2)))
                        .expect("timeout");
                    let mut buf = [0u8; 64];
                    let n = s.read(&mut buf).unwrap_or(0);
                    let _ = s.write_all(reply);
                    return Some((peer, local, String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(_) => return None,
            }
        }
    })
}

// ---------------------------------------------------------------------------
// runtime on a prepared network

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_is_isolated_and_configured() {
    let state = TempDir::new("rtn-state");
    std::fs::write(state.0.join("ca.key"), "SECRET-CA-KEY").expect("write secret");
    let rt = runtime(vec![state.0.clone()]);
    let id = "sbx-rtn-iso";
    let slot = 4001;
    let started = start(&rt, &spec(id, slot, &LOOP)).await;
    let h = &started.sb.handle;
    let up = NetPlan::default().uplink(slot).expect("slot in plan");
    assert_eq!(h.backend, "netns");
    assert_eq!(h.network.netns, format!("tollgate-{id}"));
    assert_eq!(h.network.router_netns, format!("tgr-{id}"));
    assert_eq!(h.network.host_if, format!("tgh{slot}"));
    assert_eq!(h.network.guest_v4, Ipv4Addr::new(10, 0, 2, 15));
    assert_eq!(h.network.gateway_v4, Ipv4Addr::new(10, 0, 2, 2));
    assert_eq!(h.network.uplink_host_v4, up.host_v4);
    assert_eq!(h.network.uplink_router_v4, up.router_v4);
    assert!(rt.is_alive(h));

    // Its own network namespace: the one bound at /run/netns/<name>.
    let host_net = std::fs::read_link("/proc/self/ns/net").expect("host netns");
    let sb_net = ok(&rt, h, &["readlink", "/proc/self/ns/net"]).await;
    assert_ne!(sb_net, host_net.to_string_lossy());
    let (_, ino) = ns_id(net::netns_path(&h.network.netns)).expect("netns file");
    assert_eq!(sb_net, format!("net:[{ino}]"));

    // Only lo and eth0, with the shared guest addresses and default routes.
    assert_eq!(ok(&rt, h, &["ls", "/sys/class/net"]).await, "eth0\nlo");
    let mac = ok(&rt, h, &["cat", "/sys/class/net/eth0/address"]).await;
    assert_eq!(mac.len(), 17, "mac {mac:?}");
    assert!(ok(&rt, h, &["cat", "/proc/net/fib_trie"])
        .await
        .contains("10.0.2.15"));
    let addr = ok(&rt, h, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).await;
    assert!(addr.contains("inet 10.0.2.15/24"), "{addr}");
    let addr6 = ok(&rt, h, &["ip", "-6", "-o", "addr", "show", "dev", "eth0"]).await;
    assert!(addr6.contains("inet6 fd00:7467::15/64"), "{addr6}");
    let route = ok(&rt, h, &["ip", "-4", "route", "show", "default"]).await;
    assert!(route.contains("default via 10.0.2.2 dev eth0"), "{route}");
    let route6 = ok(&rt, h, &["ip", "-6", "route", "show", "default"]).await;
    assert!(
        route6.contains("default via fd00:7467::2 dev eth0"),
        "{route6}"
    );

    // Host side: tgh<slot> is up with the uplink's host addresses.
    let host_addr = Command::new("ip")
        .args(["-o", "addr", "show", "dev", &h.network.host_if])
        .output()
        .expect("ip");
    let host_addr = String::from_utf8_lossy(&host_addr.stdout);
    assert!(
        host_addr.contains(&format!("inet {}/30", up.host_v4)),
        "{host_addr}"
    );
    assert!(
        host_addr.contains(&format!("inet6 {}/64", up.host_v6)),
        "{host_addr}"
    );
    let flags = std::fs::read_to_string(format!("/sys/class/net/{}/flags", h.network.host_if))
        .expect("flags");
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).expect("hex flags");
    assert_eq!(flags & 1, 1, "host link not up");

    // The link carries traffic: the sandbox reaches the gateway's DNS port
    // (one of the few things its router accepts from it).
    let (_, accept) = serve_once(
        &h.network.router_netns,
        SocketAddr::from((Ipv4Addr::new(10, 0, 2, 2), 53)),
        b"",
        Duration::from_secs(15),
    );
    let script = "import socket; s = socket.create_connection(('10.0.2.2', 53), 5); s.sendall(b'hello'); s.close()";
    ok(&rt, h, &["python3", "-c", script]).await;
    let (peer, _, data) = accept
        .join()
        .expect("accept thread")
        .expect("no connection from the sandbox");
    assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::new(10, 0, 2, 15)));
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
    // No CA given, no CA variables.
    assert_eq!(
        run(&rt, h, &["printenv", "SSL_CERT_FILE"]).await.exit_code,
        1
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

    // stop kills the processes only; the network is the caller's.
    rt.stop(h).await.expect("stop");
    assert!(!rt.is_alive(h));
    assert_no_processes(id);
    assert_network_present(id, slot);
    net::teardown(&h.network).await.expect("teardown");
    assert_nothing_left(id, slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_exit_codes_output_and_timeout() {
    let rt = runtime(vec![]);
    let started = start(&rt, &spec("sbx-rtn-exec", 4002, &LOOP)).await;
    let h = &started.sb.handle;

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
    let started = start(&rt, &spec("sbx-rtn-pause", 4003, &LOOP)).await;
    let h = &started.sb.handle;
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
async fn stop_kills_every_process_keeps_the_network_and_is_idempotent() {
    let rt = runtime(vec![]);
    let id = "sbx-rtn-stop";
    let slot = 4004;
    let started = start(&rt, &spec(id, slot, &LOOP)).await;
    let h = started.sb.handle.clone();
    let pidns = sandbox_pid_ns(&h);
    // An exec'd background process must die too.
    ok(&rt, &h, &["sh", "-c", "sleep 303 >/dev/null 2>&1 &"]).await;
    assert!(pids_in_pid_ns(pidns).len() >= 3);

    rt.stop(&h).await.expect("stop");
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
    assert_no_processes(id);
    assert_network_present(id, slot);

    // Second stop, and operations on a stopped sandbox.
    rt.stop(&h).await.expect("second stop");
    assert!(matches!(
        rt.exec(&h, req(&["true"])).await,
        Err(RuntimeError::NotRunning)
    ));
    assert!(matches!(rt.pause(&h).await, Err(RuntimeError::NotRunning)));
    assert!(matches!(rt.resume(&h).await, Err(RuntimeError::NotRunning)));

    net::teardown(&h.network).await.expect("teardown");
    assert_nothing_left(id, slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_whose_process_died_is_not_alive_and_stop_still_cleans_up() {
    let rt = runtime(vec![]);
    let id = "sbx-rtn-dead";
    let slot = 4005;
    let started = start(&rt, &spec(id, slot, &["/bin/sh", "-c", "exit 3"])).await;
    let h = started.sb.handle.clone();
    assert!(
        wait_until(Duration::from_secs(5), || !rt.is_alive(&h)),
        "exited sandbox reported alive"
    );
    assert_network_present(id, slot);
    rt.stop(&h).await.expect("stop of a dead sandbox");
    net::teardown(&h.network).await.expect("teardown");
    assert_nothing_left(id, slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_start_leaves_no_process_and_the_network_to_its_owner() {
    let rt = runtime(vec![]);
    let id = "sbx-rtn-nocmd";
    let slot = 4006;
    let (info, _net) = network(id, slot).await;
    let err = rt
        .start(&spec(id, slot, &["/nonexistent/tollgate-init"]), &info)
        .await
        .expect_err("start must fail");
    match &err {
        RuntimeError::Process(msg) => assert!(msg.contains("/nonexistent/tollgate-init"), "{msg}"),
        other => panic!("unexpected error {other:?}"),
    }
    assert_no_processes(id);
    assert_network_present(id, slot);
    net::teardown(&info).await.expect("teardown");
    assert_nothing_left(id, slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_plan_as_root_or_without_network_nothing_is_created() {
    let rt = runtime(vec![]);
    let plan = NetPlan::default();
    let cap = plan.capacity();
    assert_eq!(cap, 16384);
    let id = "sbx-rtn-noslot";
    let err = net::setup(&plan, id, cap)
        .await
        .expect_err("slot outside the plan");
    assert!(matches!(err, NetError::Plan(_)), "{err:?}");
    assert_nothing_left(id, cap);

    // The runtime refuses uid 0 and a network that was never set up.
    let info = net::info_for(&plan, "sbx-rtn-root", 4007).expect("info");
    let mut root = spec("sbx-rtn-root", 4007, &LOOP);
    root.uid = 0;
    let err = rt.start(&root, &info).await.expect_err("uid 0");
    assert!(matches!(err, RuntimeError::Privilege(_)), "{err:?}");
    let err = rt
        .start(&spec("sbx-rtn-root", 4007, &LOOP), &info)
        .await
        .expect_err("no network");
    assert!(matches!(err, RuntimeError::Network(_)), "{err:?}");
    assert_nothing_left("sbx-rtn-root", 4007);
}

/// A daemon that died mid-start leaves a record without a handle; `release`
/// finds the sandbox's processes by id alone, and the network is found again
/// with `net::info_for`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_by_id_and_slot_kills_a_started_sandbox() {
    let rt = runtime(vec![]);
    let id = "sbx-rtn-release";
    let slot = 4010;
    let started = start(&rt, &spec(id, slot, &LOOP)).await;
    let h = started.sb.handle.clone();
    assert!(rt.is_alive(&h));
    rt.release(id, slot).await.expect("release");
    assert!(!rt.is_alive(&h), "release left the supervisor alive");
    assert_no_processes(id);
    assert_network_present(id, slot);
    rt.release(id, slot).await.expect("second release");
    let info = net::info_for(&NetPlan::default(), id, slot).expect("info");
    assert_eq!(info, h.network, "info_for recomputes the same network");
    net::teardown(&info).await.expect("teardown");
    assert_nothing_left(id, slot);
}

// ---------------------------------------------------------------------------
// network setup and teardown

/// Deletes a test link on drop.
struct LinkGuard(&'static str);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", self.0]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_failure_midway_rolls_back_and_spares_foreign_links() {
    require_root();
    let id = "sbx-rtn-clash";
    let slot = 4008;
    let foreign = "tgh4008";
    let stale = NetworkGuard::for_sandbox(id, slot);
    let _ = Command::new("ip").args(["link", "del", foreign]).status();
    stale.teardown().expect("remove leftovers");
    let st = Command::new("ip")
        .args(["link", "add", foreign, "type", "bridge"])
        .status()
        .expect("ip link add");
    assert!(st.success());
    let _foreign = LinkGuard(foreign);

    // Both namespaces get created, then the host link clashes.
    let err = net::setup(&NetPlan::default(), id, slot)
        .await
        .expect_err("link name clash");
    assert!(matches!(err, NetError::Conflict(_)), "{err:?}");
    for ns in [net::netns_name(id), net::router_netns_name(id)] {
        assert!(!netns_file_exists(&ns), "namespace {ns} not rolled back");
    }
    assert!(link_exists(foreign), "a link that was not ours was deleted");

    // teardown with a stale NetworkInfo does not delete the foreign link either.
    net::create_netns(&stale.info.netns)
        .await
        .expect("create netns");
    net::create_netns(&stale.info.router_netns)
        .await
        .expect("create netns");
    net::teardown(&stale.info).await.expect("teardown");
    assert!(link_exists(foreign));
    assert!(!netns_file_exists(&stale.info.netns));
    assert!(!netns_file_exists(&stale.info.router_netns));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_setup_is_complete_idempotent_and_teardown_removes_it() {
    let id = "sbx-rtn-net";
    let slot = 4009;
    let (a, guard) = network(id, slot).await;
    let router = a.router_netns.clone();
    let ns_before = ns_id(net::netns_path(&a.netns)).expect("netns");
    let router_before = ns_id(net::netns_path(&router)).expect("router netns");
    let b = net::setup(&NetPlan::default(), id, slot)
        .await
        .expect("second setup");
    assert_eq!(a, b);
    assert_eq!(ns_id(net::netns_path(&a.netns)), Some(ns_before));
    assert_eq!(ns_id(net::netns_path(&router)), Some(router_before));
    assert!(net::netns_exists(&a.netns) && net::netns_exists(&router));
    assert!(link_exists(&a.host_if));
    // /run/netns is a shared mount point, like `ip netns add` leaves it.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        mountinfo
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/run/netns") && l.contains("shared:")),
        "/run/netns is not a shared mount"
    );

    // The router: its links and addresses, forwarding, the steering rule and
    // local table, and the ruleset (loaded once, whatever the repetitions).
    let links = links_of(Some(&router));
    assert_eq!(
        links,
        ["lo", "tgs0", "up0"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    let addrs = run_in(&router, &["ip", "-o", "addr"]);
    for want in [
        "tgs0    inet 10.0.2.2/24".to_owned(),
        "tgs0    inet6 fd00:7467::2/64".to_owned(),
        format!("up0    inet {}/30", a.uplink_router_v4),
        format!("up0    inet6 {}/64", a.uplink_router_v6),
    ] {
        assert!(addrs.contains(&want), "{want} missing:\n{addrs}");
    }
    let sysctl = |key: &str| run_in(&router, &["cat", &format!("/proc/sys/{key}")]);
    assert_eq!(sysctl("net/ipv4/ip_forward").trim(), "1");
    assert_eq!(sysctl("net/ipv6/conf/all/forwarding").trim(), "1");
    for fam in ["-4", "-6"] {
        let rules = run_in(&router, &["ip", fam, "rule", "show"]);
        assert_eq!(
            rules.matches("from all fwmark 0x1/0x1 lookup 100").count(),
            1,
            "{fam}: {rules}"
        );
        let table = run_in(&router, &["ip", fam, "route", "show", "table", "100"]);
        assert!(table.contains("local default dev lo"), "{fam}: {table}");
        let default = run_in(&router, &["ip", fam, "route", "show", "default"]);
        let via = if fam == "-4" {
            a.uplink_host_v4.to_string()
        } else {
            a.uplink_host_v6.to_string()
        };
        assert!(
            default.contains(&format!("default via {via} dev up0")),
            "{default}"
        );
    }
    let tables = run_in(&router, &["nft", "list", "tables"]);
    assert_eq!(tables.trim(), "table inet tollgate");
    let ruleset = run_in(&router, &["nft", "list", "table", "inet", "tollgate"]);
    assert!(
        ruleset.contains("policy drop;") && ruleset.contains("masquerade"),
        "{ruleset}"
    );
    // The sandbox side sees only lo and eth0.
    assert_eq!(
        links_of(Some(&a.netns)),
        ["eth0", "lo"].map(String::from).into_iter().collect()
    );

    // Teardown removes everything, twice; nothing of it reaches the host's
    // own rules or tables.
    let host_rules = Command::new("ip").args(["rule"]).output().expect("ip rule");
    net::teardown(&a).await.expect("teardown");
    net::teardown(&a).await.expect("second teardown");
    assert_nothing_left(id, slot);
    let host_rules_after = Command::new("ip").args(["rule"]).output().expect("ip rule");
    assert_eq!(host_rules.stdout, host_rules_after.stdout);
    assert!(net::setup(&NetPlan::default(), "../escape", slot)
        .await
        .is_err());
    assert!(!link_exists(&a.host_if));
    drop(guard);
}

// ---------------------------------------------------------------------------
// data path (inside a lab)

/// Sets up the network of `id` on `slot` with its host side in the lab's
/// host namespace.
fn lab_network(lab: &Lab, id: &'static str, slot: u32) -> (NetworkInfo, NetworkGuard) {
    let guard = NetworkGuard::in_host(&lab.host_ns, id, slot);
    guard.teardown().expect("remove leftovers");
    let info = block_on_in(&lab.host_ns, move || async move {
        net::setup(&NetPlan::default(), id, slot).await
    })
    .unwrap_or_else(|e| panic!("net::setup {id}: {e}"));
    (info, guard)
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// What reached the upstream, without link chatter (multicast such as MLD
/// reports of the lab's own interfaces).
fn contacts(lab: &Lab) -> Vec<tollgate_tests::lab::Seen> {
    lab.canary
        .seen()
        .into_iter()
        .filter(|s| !s.dst.is_multicast())
        .collect()
}

/// Test-only stand-in for the eBPF program's allow verdict: mark everything
/// the guest sends with 0x2.
const ALLOW_ALL: &str = "table inet tgtest {
  chain pre {
    type filter hook prerouting priority mangle; policy accept;
    iifname \"tgs0\" meta mark set 0x2
  }
}
";

/// Test-only stand-in for the eBPF program's steering: mark TCP to port 15001
/// with 0x1 (`bpf_sk_assign` would pick the listener for any port).
const STEER_15001: &str = "table inet tgtest {
  chain pre {
    type filter hook prerouting priority mangle; policy accept;
    iifname \"tgs0\" tcp dport 15001 meta mark set 0x1
  }
}
";

#[test]
fn same_guest_address_twice_fails_closed_without_ebpf_and_is_natted_when_allowed() {
    let lab = Lab::new();
    block_on_in(&lab.host_ns, || async {
        net::host_setup(&NetPlan::default()).await
    })
    .expect("host_setup");
    let host_links_before = links_of(Some(&lab.host_ns));
    let (a, guard_a) = lab_network(&lab, "sbx-rtn-twin-a", 4101);
    let (b, guard_b) = lab_network(&lab, "sbx-rtn-twin-b", 4102);
    assert_eq!(a.guest_v4, b.guest_v4, "both guests are 10.0.2.15");
    assert_eq!(a.guest_v6, b.guest_v6);
    assert_ne!(a.uplink_router_v4, b.uplink_router_v4);
    let added: Vec<String> = links_of(Some(&lab.host_ns))
        .difference(&host_links_before)
        .cloned()
        .collect();
    assert_eq!(added, vec!["tgh4101".to_owned(), "tgh4102".to_owned()]);

    // Without eBPF nothing the guests send is forwarded: v4 or v6, the
    // upstream sees no packet from either.
    lab.canary.clear();
    let blocked: Vec<_> = [&a, &b]
        .into_iter()
        .flat_map(|n| {
            [v4(PUBLIC4, 80), v6(PUBLIC6, 80)].map(|to| {
                let ns = n.netns.clone();
                std::thread::spawn(move || tcp_exchange(&ns, None, to, b"x", BLOCKED))
            })
        })
        .collect();
    for t in blocked {
        let r = t.join().expect("probe thread");
        assert!(r.is_err(), "a guest got through without eBPF: {r:?}");
    }
    assert!(
        contacts(&lab).is_empty(),
        "the upstream saw guest traffic: {:?}",
        contacts(&lab)
    );

    // The router itself reaches the upstream through up0, NATed by the host
    // (the canary sees the host's WAN address).
    for (to, src) in [
        (v4(PUBLIC4, 80), IpAddr::V4(HOST_WAN)),
        (v6(PUBLIC6, 80), IpAddr::V6(HOST_WAN6)),
    ] {
        lab.canary.clear();
        let reply = tcp_exchange(&a.router_netns, None, to, b"hi", OPEN)
            .unwrap_or_else(|e| panic!("router -> {to}: {e}"));
        assert_eq!(reply, "canary\n");
        // The canary's sniffer records on its own thread: wait (bounded)
        // for the SYN to be seen.
        wait_until(Duration::from_secs(3), || {
            !lab.canary.to(to.ip()).is_empty()
        });
        let seen = lab.canary.to(to.ip());
        assert!(
            !seen.is_empty() && seen.iter().all(|s| s.src == src),
            "{seen:?}"
        );
    }
    // The router's masquerade: traffic from the guest-side address leaves
    // up0 with up0's address (the host side sees the uplink, not 10.0.2.2).
    let (host_addr, accept) = serve_once(
        &lab.host_ns,
        v4(a.uplink_host_v4, 0),
        b"host\n",
        Duration::from_secs(10),
    );
    let reply = tcp_exchange(
        &a.router_netns,
        Some(v4(a.gateway_v4, 0)),
        host_addr,
        b"nat?",
        OPEN,
    )
    .expect("router -> host from 10.0.2.2");
    assert_eq!(reply, "host\n");
    let (peer, _, _) = accept.join().expect("accept").expect("no connection");
    assert_eq!(peer.ip(), IpAddr::V4(a.uplink_router_v4), "not masqueraded");

    // With the eBPF allow mark emulated, both guests (same address, same
    // port range) reach the upstream at once, each NATed twice.
    nft_in(&a.router_netns, ALLOW_ALL);
    nft_in(&b.router_netns, ALLOW_ALL);
    lab.canary.clear();
    let allowed: Vec<_> = [&a, &b]
        .into_iter()
        .flat_map(|n| {
            [v4(PUBLIC4, 443), v6(PUBLIC6, 443)].map(|to| {
                let ns = n.netns.clone();
                std::thread::spawn(move || (to, tcp_exchange(&ns, None, to, b"x", OPEN)))
            })
        })
        .collect();
    for t in allowed {
        let (to, r) = t.join().expect("probe thread");
        assert_eq!(
            r.as_deref().map_err(|e| e.to_string()),
            Ok("canary\n"),
            "{to}"
        );
    }
    // The upstream saw both families, and only ever the host's address:
    // neither the shared guest address nor a router's uplink.
    let seen = contacts(&lab);
    let contacts = lab.canary.contacts();
    assert!(
        contacts.contains(&(6, IpAddr::V4(PUBLIC4), 443)),
        "{seen:?}"
    );
    assert!(
        contacts.contains(&(6, IpAddr::V6(PUBLIC6), 443)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|s| s.src == IpAddr::V4(HOST_WAN) || s.src == IpAddr::V6(HOST_WAN6)),
        "{seen:?}"
    );

    // Teardown leaves nothing: no namespace, no host link, only the host
    // table in the host namespace, and no extra policy rule there.
    drop(guard_a);
    drop(guard_b);
    for n in [&a, &b] {
        assert!(!netns_file_exists(&n.netns));
        assert!(!netns_file_exists(&n.router_netns));
    }
    assert_eq!(links_of(Some(&lab.host_ns)), host_links_before);
    let tables = run_in(&lab.host_ns, &["nft", "list", "tables"]);
    assert_eq!(tables.trim(), "table inet tollgate_host");
    let rules = run_in(&lab.host_ns, &["ip", "rule"]);
    assert_eq!(rules.lines().count(), 3, "{rules}");
}

#[test]
fn only_steered_connections_reach_the_transparent_listeners() {
    let lab = Lab::new();
    let (info, guard) = lab_network(&lab, "sbx-rtn-steer", 4103);
    let listeners = net::open_listeners(&info).expect("open_listeners");
    assert_eq!(
        listeners.v4.local_addr().expect("addr"),
        v4(Ipv4Addr::UNSPECIFIED, 15001)
    );
    assert_eq!(
        listeners.v6.local_addr().expect("addr"),
        v6(Ipv6Addr::UNSPECIFIED, 15001)
    );
    // They live in the router namespace, not in the test's.
    let listening = run_in(&info.router_netns, &["ss", "-Hltn", "sport = :15001"]);
    assert_eq!(listening.lines().count(), 2, "{listening}");

    let far4 = v4(Ipv4Addr::new(203, 0, 113, 7), 15001);
    let far6 = v6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 7), 15001);
    let gateway = v4(info.gateway_v4, 15001);

    // Unmarked, nothing reaches them: not via a foreign destination (forward
    // drop) nor directly at the gateway (input drop).
    let probes: Vec<_> = [far4, far6, gateway]
        .into_iter()
        .map(|to| {
            let ns = info.netns.clone();
            std::thread::spawn(move || (to, tcp_exchange(&ns, None, to, b"x", BLOCKED)))
        })
        .collect();
    for p in probes {
        let (to, r) = p.join().expect("probe");
        assert!(r.is_err(), "unmarked connection to {to} got through: {r:?}");
    }
    assert!(
        listeners.v4.accept().is_err(),
        "v4 listener got a connection"
    );
    assert!(
        listeners.v6.accept().is_err(),
        "v6 listener got a connection"
    );

    // Marked 0x1 (what the eBPF steering does), connections to any address
    // are delivered locally to the listeners; the accepted socket's local
    // address is the original destination.
    nft_in(&info.router_netns, STEER_15001);
    let net::Listeners { v4: l4, v6: l6 } = listeners;
    for (listener, to, guest) in [
        (l4, far4, IpAddr::V4(info.guest_v4)),
        (l6, far6, IpAddr::V6(info.guest_v6)),
    ] {
        let accept = accept_on_thread(listener, b"proxied\n", Duration::from_secs(10));
        let reply = tcp_exchange(&info.netns, None, to, b"hello", OPEN)
            .unwrap_or_else(|e| panic!("steered connection to {to}: {e}"));
        assert_eq!(reply, "proxied\n");
        let (peer, local, data) = accept.join().expect("accept").expect("not accepted");
        assert_eq!(local, to, "getsockname() is the original destination");
        assert_eq!(peer.ip(), guest);
        assert_eq!(data, "hello");
    }

    drop(guard);
    assert!(!netns_file_exists(&info.router_netns));
    assert!(!netns_file_exists(&info.netns));
    assert!(!links_of(Some(&lab.host_ns)).contains(&info.host_if));
}

// ---------------------------------------------------------------------------
// the sandbox's CA bundle

/// Removes a file when dropped.
struct FileGuard(PathBuf);

impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A sandbox given its CA sees a read-only bundle (the host's roots, then
/// its CA) at a fixed path with the four variables pointing at it, and no
/// other sandbox's files; the state dir with the CA key stays hidden; the
/// daemon's resolv.conf (kept beside the bundles' mount point on the host)
/// is still bound; `install_ca` replaces the bundle of the running sandbox;
/// `stop` removes the host-side files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_bundle_is_installed_read_only_with_the_variables_set() {
    let id = "sbx-rtn-ca";
    let slot = 4011;
    let state = TempDir::new("rtn-ca-state");
    let key_dir = state.0.join("ca").join(id);
    std::fs::create_dir_all(&key_dir).expect("key dir");
    std::fs::write(key_dir.join("ca.key"), "SECRET-CA-KEY").expect("write key");
    let files = TempDir::new("rtn-ca-files");
    // Another sandbox's files: never visible.
    std::fs::create_dir_all(files.0.join("sbx-rtn-other")).expect("other dir");
    std::fs::write(files.0.join("sbx-rtn-other").join("ca.pem"), "OTHER").expect("other");
    let roots_dir = TempDir::new("rtn-ca-roots");
    let host_root = SandboxCa::generate("host-root").expect("generate");
    let roots = roots_dir.0.join("roots.pem");
    std::fs::write(&roots, host_root.cert_pem()).expect("write roots");
    // resolv.conf where the daemon keeps it: under /run/tollgate, which the
    // sandbox's files directory covers.
    std::fs::create_dir_all(SANDBOX_FILES_DIR).expect("create /run/tollgate");
    let resolv = FileGuard(PathBuf::from(format!(
        "{SANDBOX_FILES_DIR}/rtn-ca-resolv-{}.conf",
        std::process::id()
    )));
    std::fs::write(&resolv.0, "nameserver 10.0.2.2\n# rtn-ca\n").expect("write resolv.conf");
    require_root();
    let rt = Arc::new(NetnsRuntime::new(NetnsConfig {
        exe: tollgate_bin(),
        hide_paths: vec![state.0.clone()],
        resolv_conf: Some(resolv.0.clone()),
        files_dir: Some(files.0.clone()),
        system_roots: roots.clone(),
    }));
    let ca = SandboxCa::generate(id).expect("generate");
    let mut sp = spec(id, slot, &LOOP);
    sp.ca_pem = Some(ca.cert_pem().to_owned());
    // The sandbox's own env_vars still win.
    sp.env_vars
        .insert("CURL_CA_BUNDLE".into(), "/etc/custom.pem".into());
    let started = start(&rt, &sp).await;
    let h = &started.sb.handle;

    // Host side: <files>/<id>/{ca-bundle.crt, ca.pem}, world-readable.
    let dir = files.0.join(id);
    let bundle = std::fs::read_to_string(dir.join("ca-bundle.crt")).expect("bundle on the host");
    assert_eq!(bundle, format!("{}{}", host_root.cert_pem(), ca.cert_pem()));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: PathBuf| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(dir.clone()), 0o755);
        assert_eq!(mode(dir.join("ca-bundle.crt")), 0o644);
        assert_eq!(mode(dir.join("ca.pem")), 0o644);
    }

    // Inside: the variables, the bundle, the CA, nothing else.
    for var in CA_ENV_VARS {
        let want = if var == "CURL_CA_BUNDLE" {
            "/etc/custom.pem"
        } else {
            SANDBOX_CA_BUNDLE
        };
        assert_eq!(ok(&rt, h, &["printenv", var]).await, want, "{var}");
    }
    // Every process inherits them, and a request may override one.
    let mut r = req(&["sh", "-c", "echo $SSL_CERT_FILE $REQUESTS_CA_BUNDLE"]);
    r.env
        .insert("REQUESTS_CA_BUNDLE".into(), "/elsewhere".into());
    let out = rt.exec(h, r).await.expect("exec");
    assert_eq!(out.stdout, format!("{SANDBOX_CA_BUNDLE} /elsewhere\n"));
    assert_eq!(
        ok(&rt, h, &["cat", SANDBOX_CA_BUNDLE]).await,
        bundle.trim_end()
    );
    assert_eq!(
        ok(&rt, h, &["cat", SANDBOX_CA_CERT]).await,
        ca.cert_pem().trim_end()
    );
    assert_eq!(
        ok(&rt, h, &["ls", "-A", SANDBOX_FILES_DIR]).await,
        "ca-bundle.crt\nca.pem"
    );
    let write = run(
        &rt,
        h,
        &["sh", "-c", &format!("echo x > {SANDBOX_CA_BUNDLE}")],
    )
    .await;
    assert_ne!(write.exit_code, 0, "the bundle is writable: {write:?}");
    let resolv_inside = ok(&rt, h, &["cat", "/etc/resolv.conf"]).await;
    assert!(resolv_inside.contains("# rtn-ca"), "{resolv_inside}");
    // The key beside the state dir is hidden.
    let cat = run(&rt, h, &["cat", &key_dir.join("ca.key").to_string_lossy()]).await;
    assert_ne!(cat.exit_code, 0);
    assert!(!cat.stdout.contains("SECRET"));
    assert_eq!(
        ok(&rt, h, &["ls", "-A", &state.0.to_string_lossy()]).await,
        ""
    );

    // A replaced CA reaches the running sandbox.
    let replaced = SandboxCa::generate(id).expect("generate");
    rt.install_ca(id, h, replaced.cert_pem())
        .await
        .expect("install_ca");
    assert_eq!(
        ok(&rt, h, &["cat", SANDBOX_CA_CERT]).await,
        replaced.cert_pem().trim_end()
    );
    let inside = ok(&rt, h, &["cat", SANDBOX_CA_BUNDLE]).await;
    assert!(inside.contains(replaced.cert_pem().trim_end()));
    assert!(!inside.contains(ca.cert_pem().trim_end()));

    // stop removes the sandbox's files, not another's.
    rt.stop(h).await.expect("stop");
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(files.0.join("sbx-rtn-other").exists());
    net::teardown(&h.network).await.expect("teardown");
    assert_nothing_left(id, slot);
}
