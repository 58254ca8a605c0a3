//! Privileged end-to-end tests of the `vm` runtime: QEMU microVMs restored
//! from memory snapshots (copy-on-write clones), on the same per-sandbox
//! network, eBPF program and proxy as the netns runtime.
//!
//! Needs root, QEMU and the guest image (`sudo ./scripts/deps` installs and
//! builds both); without them every test fails with the command to run.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate_tests::daemon::{vm_runtime_section, Daemon, KEY_DEFAULT};
use tollgate_tests::privileged::{netns_file_exists, pids_with_cmdline, wait_until};

/// One VM test at a time: each cold boot or restore under TCG wants both
/// cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn vm_config(pool: &str) -> String {
    vm_config_with(pool, "")
}

/// Room for 20 VMs on `pool`, the VM runtime, and `extra` TOML sections.
fn vm_config_with(pool: &str, extra: &str) -> String {
    format!(
        r#"
[[organizations]]
name = "default"
api_keys = []
max_sandboxes = 20

[host]
vcpu = 16
memory_mib = 16384

[network]
pool = "{pool}"
{extra}
{}
"#,
        vm_runtime_section()
    )
}

fn create(d: &mut Daemon, body: &Value) -> Value {
    let c = d.call(
        Method::POST,
        "/v1/sandbox",
        "/v1/sandbox",
        KEY_DEFAULT,
        Some(body),
    );
    assert_eq!(c.status, StatusCode::CREATED, "{}\n{}", c.body, d.log());
    c.body
}

fn snapshot(d: &mut Daemon, id: &str, name: &str) -> Value {
    let s = d.call(
        Method::POST,
        &format!("/v1/sandbox/{id}/snapshot/create"),
        "/v1/sandbox/{id}/snapshot/create",
        KEY_DEFAULT,
        Some(&json!({ "name": name })),
    );
    assert_eq!(s.status, StatusCode::CREATED, "{}\n{}", s.body, d.log());
    s.body
}

fn resume(d: &mut Daemon, body: &Value) -> (StatusCode, Value) {
    let r = d.call(
        Method::POST,
        "/v1/snapshot/resume",
        "/v1/snapshot/resume",
        KEY_DEFAULT,
        Some(body),
    );
    (r.status, r.body)
}

fn get(d: &mut Daemon, id: &str) -> Value {
    let g = d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/"),
        "/v1/sandbox/{id}/",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(g.status, StatusCode::OK, "{}", g.body);
    g.body
}

fn sh_ok(d: &mut Daemon, id: &str, cmd: &str) -> String {
    let (code, out, err) = d.sh(id, cmd, 30);
    assert_eq!(
        code, 0,
        "{cmd}: exit {code}, stdout {out:?}, stderr {err:?}"
    );
    out
}

/// QEMU processes serving sandbox `id` (their command line names its run
/// directory).
fn qemu_of(id: &str) -> Vec<i32> {
    pids_with_cmdline(&format!("vm/run/{id}/"))
}

/// Starts a counter in the guest that lives in a shell's memory and writes
/// every value to tmpfs; waits until it has counted past 5.
fn start_counter(d: &mut Daemon, id: &str) {
    sh_ok(
        d,
        id,
        "echo kept-in-tmpfs > /tmp/hello; \
         setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.2; done' \
         </dev/null >/dev/null 2>&1 &",
    );
    let ok = wait_until(Duration::from_secs(30), || {
        counter(d, id).is_some_and(|c| c > 5)
    });
    assert!(ok, "the counter never passed 5");
}

fn counter(d: &mut Daemon, id: &str) -> Option<u64> {
    let (code, out, _) = d.sh(id, "cat /tmp/counter", 30);
    if code != 0 {
        return None;
    }
    out.trim().parse().ok()
}

fn pid_of_counter(d: &mut Daemon, id: &str) -> String {
    sh_ok(
        d,
        id,
        "for p in /proc/[0-9]*; do if grep -q 'counter.new' $p/cmdline 2>/dev/null; then basename $p; fi; done | sort -n | head -1",
    )
    .trim()
    .to_owned()
}

#[test]
fn a_resumed_vm_continues_from_its_memory_snapshot() {
    let _s = serial();
    let mut d = Daemon::start("vm-memory", &vm_config("10.214.0.0/20"));
    let src = create(
        &mut d,
        &json!({ "memory": 512, "env_vars": { "WHO": "source" } }),
    );
    let src_id = src["id"].as_str().expect("id").to_owned();
    assert_eq!(src["state"], "running");
    // A real VM: its own kernel, not the host's.
    let kernel = sh_ok(&mut d, &src_id, "uname -r");
    assert_ne!(
        kernel.trim(),
        nix::sys::utsname::uname()
            .expect("uname")
            .release()
            .to_string_lossy()
    );
    let boot_id = sh_ok(&mut d, &src_id, "cat /proc/sys/kernel/random/boot_id");
    start_counter(&mut d, &src_id);
    let counter_pid = pid_of_counter(&mut d, &src_id);
    let before = counter(&mut d, &src_id).expect("counter");
    snapshot(&mut d, &src_id, "vm-memory-snap");
    // The source carries on after its snapshot.
    let ok = wait_until(Duration::from_secs(10), || {
        counter(&mut d, &src_id).is_some_and(|c| c > before + 3)
    });
    assert!(ok, "the source VM stopped counting after its snapshot");

    let (status, clone) = resume(&mut d, &json!({ "snapshot_name": "vm-memory-snap" }));
    assert_eq!(status, StatusCode::CREATED, "{clone}\n{}", d.log());
    let id = clone["id"].as_str().expect("id").to_owned();
    assert_ne!(id, src_id);
    // Memory state, not a reboot: the same boot, the same process, the
    // counter going on from where the snapshot caught it.
    assert_eq!(
        sh_ok(&mut d, &id, "cat /proc/sys/kernel/random/boot_id"),
        boot_id
    );
    assert_eq!(sh_ok(&mut d, &id, "cat /tmp/hello").trim(), "kept-in-tmpfs");
    assert_eq!(pid_of_counter(&mut d, &id), counter_pid);
    let first = counter(&mut d, &id).expect("counter in the clone");
    assert!(
        first >= before,
        "clone counter {first} < {before} at snapshot"
    );
    let ok = wait_until(Duration::from_secs(10), || {
        counter(&mut d, &id).is_some_and(|c| c > first + 3)
    });
    assert!(ok, "the clone's counter does not go on");
    // The clone's own config replaced the source's.
    let env = sh_ok(
        &mut d,
        &id,
        "echo $(cat /run/tollgate/sandbox-id) $WHO $(hostname)",
    );
    let lines: Vec<&str> = env.split_whitespace().collect();
    assert_eq!(lines[0], id, "{env}");
    assert_eq!(lines[1], "source", "snapshot env restored: {env}");
    assert_eq!(lines[2], id, "{env}");
    // Its clock was stepped from the host's.
    let guest_now: i64 = sh_ok(&mut d, &id, "date +%s").trim().parse().expect("date");
    let host_now = tollgate::model::now();
    assert!(
        (guest_now - host_now).abs() <= 5,
        "guest clock {guest_now} vs host {host_now}"
    );

    for sid in [&id, &src_id] {
        let del = d.delete_sandbox(sid);
        assert_eq!(del.status, StatusCode::NO_CONTENT, "{}", del.body);
        assert!(qemu_of(sid).is_empty(), "QEMU of {sid} outlived its delete");
        assert!(!netns_file_exists(&format!("tollgate-{sid}")));
        assert!(!d.state_dir.join("vm/run").join(sid.as_str()).exists());
    }
}

#[test]
fn clones_share_the_snapshot_memory_copy_on_write() {
    let _s = serial();
    let mut d = Daemon::start("vm-cow", &vm_config("10.214.16.0/20"));
    let src = create(&mut d, &json!({ "memory": 512 }));
    let src_id = src["id"].as_str().expect("id").to_owned();
    sh_ok(&mut d, &src_id, "echo one > /tmp/mark");
    snapshot(&mut d, &src_id, "vm-cow-snap");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, c) = resume(&mut d, &json!({ "snapshot_name": "vm-cow-snap" }));
        assert_eq!(status, StatusCode::CREATED, "{c}");
        ids.push(c["id"].as_str().expect("id").to_owned());
    }
    // A write in one clone is its own.
    sh_ok(&mut d, &ids[0], "echo two > /tmp/mark");
    assert_eq!(sh_ok(&mut d, &ids[1], "cat /tmp/mark").trim(), "one");
    assert_eq!(sh_ok(&mut d, &ids[0], "cat /tmp/mark").trim(), "two");
    // Each clone maps the snapshot's RAM file privately (copy-on-write).
    let ram = d
        .state_dir
        .join("snapshots")
        .join(snapshot_id(&mut d, "vm-cow-snap"))
        .join("ram");
    for id in &ids {
        let pids = qemu_of(id);
        assert_eq!(pids.len(), 1, "one QEMU for {id}: {pids:?}");
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", pids[0])).expect("maps");
        let line = maps
            .lines()
            .find(|l| l.ends_with(&ram.display().to_string()))
            .unwrap_or_else(|| panic!("{id} does not map {}", ram.display()));
        let perms = line.split_whitespace().nth(1).unwrap_or("");
        assert!(
            perms.ends_with('p'),
            "{id} maps the RAM file shared: {line}"
        );
    }
    // A snapshot file deleted under a record: 409, and nothing else moves.
    let snap_dir = ram.parent().expect("dir").to_owned();
    std::fs::remove_file(snap_dir.join("state")).expect("remove state");
    let (status, body) = resume(&mut d, &json!({ "snapshot_name": "vm-cow-snap" }));
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("missing"),
        "{body}"
    );
    // A damaged one: 500 with what is wrong.
    std::fs::write(snap_dir.join("state"), b"garbage, not a migration stream").expect("write");
    let (status, body) = resume(&mut d, &json!({ "snapshot_name": "vm-cow-snap" }));
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("not a QEMU migration stream"),
        "{body}"
    );
    let listed = d.call(
        Method::GET,
        "/v1/sandboxes",
        "/v1/sandboxes",
        KEY_DEFAULT,
        None,
    );
    let live: Vec<&str> = listed.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(live.len(), 3, "a failed restore left a sandbox: {live:?}");
    for id in &ids {
        assert_eq!(sh_ok(&mut d, id, "echo alive").trim(), "alive");
    }
}

fn snapshot_id(d: &mut Daemon, name: &str) -> String {
    let l = d.call(
        Method::GET,
        "/v1/snapshots",
        "/v1/snapshots",
        KEY_DEFAULT,
        None,
    );
    l.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["id"].as_str())
        .expect("snapshot listed")
        .to_owned()
}

#[test]
fn a_dead_qemu_is_reported_deleted_and_its_network_released() {
    let _s = serial();
    let mut d = Daemon::start("vm-kill-qemu", &vm_config("10.214.32.0/20"));
    let sb = create(&mut d, &json!({ "memory": 512 }));
    let id = sb["id"].as_str().expect("id").to_owned();
    let pids = qemu_of(&id);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let tap_before =
        tollgate_tests::privileged::run_in(&format!("tollgate-{id}"), &["ip", "-o", "link"]);
    assert!(
        tap_before
            .lines()
            .any(|l| l.contains(": tgv") && l.contains("master br0")),
        "no VM tap on the sandbox's bridge: {tap_before}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
    let ok = wait_until(Duration::from_secs(10), || {
        get(&mut d, &id)["state"] == "deleted"
    });
    assert!(
        ok,
        "sandbox not deleted after its QEMU died: {}",
        get(&mut d, &id)
    );
    let g = get(&mut d, &id);
    let reason = g["status_reason"].as_str().unwrap_or("");
    assert!(reason.contains("QEMU"), "status_reason {reason:?}");
    assert!(
        !netns_file_exists(&format!("tollgate-{id}")),
        "sandbox namespace left"
    );
    assert!(
        !netns_file_exists(&format!("tgr-{id}")),
        "router namespace left"
    );
    assert!(
        !d.state_dir.join("vm/run").join(&id).exists(),
        "run dir left"
    );
}

#[test]
fn a_killed_daemon_leaves_vms_running_and_its_restart_adopts_them() {
    let _s = serial();
    let mut d = Daemon::start("vm-kill-daemon", &vm_config("10.214.48.0/20"));
    let sb = create(
        &mut d,
        &json!({ "memory": 512, "network_policy": { "mode": "deny-all" } }),
    );
    let id = sb["id"].as_str().expect("id").to_owned();
    sh_ok(&mut d, &id, "echo before > /tmp/mark");
    let pids = qemu_of(&id);
    let stopped = d.kill_keep_state();
    // The VM lives on without the daemon.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(qemu_of(&id), pids, "QEMU died with the daemon");
    let mut d = Daemon::restart(stopped);
    let g = get(&mut d, &id);
    assert_eq!(g["state"], "running", "{g}");
    assert_eq!(sh_ok(&mut d, &id, "cat /tmp/mark").trim(), "before");
    // Enforcement held: deny-all still lets nothing out.
    let (code, _, _) = d.sh(
        &id,
        "ping -c 1 -W 1 10.0.2.2 >/dev/null 2>&1; nc -w 2 192.0.2.1 80 </dev/null",
        30,
    );
    assert_ne!(code, 0, "deny-all sandbox reached out after the restart");
    let counters = d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/network/counters"),
        "/v1/sandbox/{id}/network/counters",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(counters.status, StatusCode::OK, "{}", counters.body);
    let t0 = Instant::now();
    let del = d.delete_sandbox(&id);
    assert_eq!(del.status, StatusCode::NO_CONTENT, "{}", del.body);
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert!(qemu_of(&id).is_empty());
}

/// Four clones of one memory snapshot, four policies, each obeyed by the
/// same eBPF program and proxy as a netns sandbox's: evidence from the lab's
/// canary (every packet that reaches the upstream side) and from recording
/// TLS origins.
#[test]
fn four_clones_of_one_snapshot_each_obey_their_own_policy() {
    use std::collections::HashMap;
    use tollgate_tests::lab::{PRIVATE4, PUBLIC4};
    use tollgate_tests::origin::{CertKind, Origin, OriginSpec};
    use tollgate_tests::upstream::{Answer, ScriptedDns, TestCa};

    const DNS: &str = "198.51.100.53";
    const SECRET: &str = "Bearer sk-tollgate-vm-0123456789abcdef";
    let _s = serial();
    let ca = TestCa::new("vm-four");
    let ca_file = std::env::temp_dir().join("tollgate-vm-four-ca.pem");
    std::fs::write(&ca_file, &ca.pem).expect("write test CA");
    let config = vm_config_with(
        "10.214.64.0/20",
        &format!(
            "[dns]\nupstreams = [\"{DNS}:53\"]\n\n[proxy]\nupstream_ca_file = \"{}\"\n",
            ca_file.display()
        ),
    );
    let mut d = Daemon::start("vm-four", &config);
    let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("ip") };
    let mut origins = HashMap::new();
    let mut table = HashMap::new();
    for (name, addr) in [
        ("api.test", "198.51.100.40"),
        ("tunnel.test", "198.51.100.41"),
    ] {
        d.lab.add_upstream_addr(ip(addr));
        let spec = OriginSpec::new(&[name], ip(addr)).cert(CertKind::Valid);
        origins.insert(name, Origin::start(&d.lab, &ca, spec));
        table.insert(name.to_string(), Answer::Fixed(vec![ip(addr)], 60));
    }
    d.lab.add_upstream_addr(ip(DNS));
    let _dns = ScriptedDns::start(&d.lab, ip(DNS), table);

    let src = create(&mut d, &json!({ "memory": 512 }));
    let src_id = src["id"].as_str().expect("id").to_owned();
    // The test CA goes into the snapshot's memory (tmpfs): tunnelled names
    // present the origins' own certificates.
    sh_ok(
        &mut d,
        &src_id,
        &format!("cat > /tmp/test-ca.pem <<'EOF'\n{}\nEOF", ca.pem.trim()),
    );
    snapshot(&mut d, &src_id, "vm-four-snap");
    let del = d.delete_sandbox(&src_id);
    assert_eq!(del.status, StatusCode::NO_CONTENT);

    let policies = [
        json!({ "mode": "deny-all" }),
        json!({ "mode": "custom", "allow_cidrs": [format!("{PUBLIC4}/32")] }),
        json!({ "mode": "custom", "allow_domains": ["tunnel.test"] }),
        json!({ "mode": "custom", "transforms": [{
            "domain": "api.test", "inject_headers": { "Authorization": SECRET } }] }),
    ];
    let mut ids = Vec::new();
    for p in &policies {
        let (status, c) = resume(
            &mut d,
            &json!({ "snapshot_name": "vm-four-snap", "network_policy": p }),
        );
        assert_eq!(status, StatusCode::CREATED, "{c}\n{}", d.log());
        ids.push(c["id"].as_str().expect("id").to_owned());
    }
    let canary = d.lab.canary.clone();
    let nc = |host: std::net::Ipv4Addr| format!("nc -w 3 {host} 80 </dev/null >/dev/null 2>&1");
    let curl = |url: &str, extra: &str| {
        format!("curl -sS --max-time 10 {extra} -o /dev/null -w '%{{http_code}}' {url}")
    };

    // deny-all: nothing reaches the canary, TCP, UDP or DNS.
    canary.clear();
    let (code, _, _) = d.sh(&ids[0], &nc(PUBLIC4), 30);
    assert_ne!(code, 0, "deny-all connected");
    let (code, _, _) = d.sh(
        &ids[0],
        &curl("https://tunnel.test/echo", "--cacert /tmp/test-ca.pem"),
        30,
    );
    assert_ne!(code, 0, "deny-all reached tunnel.test");
    let _ = d.sh(&ids[0], "nslookup tunnel.test 10.0.2.2 >/dev/null 2>&1", 30);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        canary.seen().is_empty(),
        "deny-all clone reached the upstream: {:?}",
        canary.seen()
    );

    // allow_cidrs: the allowed address is reached, a private one is not.
    canary.clear();
    let (code, _, err) = d.sh(&ids[1], &nc(PUBLIC4), 30);
    assert_eq!(code, 0, "allowed CIDR not reached: {err}");
    // (A TCP handshake to an address outside allow_cidrs completes with
    // the proxy, which waits for a name: the canary is the evidence.)
    let _ = d.sh(&ids[1], &nc(PRIVATE4), 30);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !canary.to(PUBLIC4.into()).is_empty(),
        "canary saw nothing from the allowed clone"
    );
    assert!(
        canary.to(PRIVATE4.into()).is_empty(),
        "canary saw the private address"
    );

    // allow_domains: tunnelled untouched (the origin's own certificate
    // verifies), and nothing else is allowed.
    canary.clear();
    let out = sh_ok(
        &mut d,
        &ids[2],
        &curl("https://tunnel.test/echo", "--cacert /tmp/test-ca.pem"),
    );
    assert_eq!(out, "200");
    let r = origins["tunnel.test"].wait_requests(1, Duration::from_secs(10));
    assert!(r
        .last()
        .is_some_and(|r| r.header("authorization").is_none()));
    let _ = d.sh(&ids[2], &nc(PUBLIC4), 30);
    let (_, out, _) = d.sh(&ids[2], &curl(&format!("http://{PUBLIC4}/"), ""), 30);
    assert_eq!(out, "403", "plain HTTP to an address outside the policy");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        canary.to(PUBLIC4.into()).is_empty(),
        "canary reached by the domain-only clone"
    );

    // transform: intercepted with this clone's own CA (curl trusts the
    // bundle the runtime installed, no flags), the secret injected upstream
    // and nowhere inside the guest.
    let out = sh_ok(&mut d, &ids[3], &curl("https://api.test/echo", ""));
    assert_eq!(out, "200");
    let r = origins["api.test"].wait_requests(1, Duration::from_secs(10));
    assert_eq!(
        r.last().expect("request").header_all("authorization"),
        vec![SECRET]
    );
    let leak = d.sh(
        &ids[3],
        "grep -rl sk-tollgate-vm /run /tmp /etc 2>/dev/null; env | grep -c sk-tollgate-vm; \
         curl -sS https://api.test/echo | grep -c sk-tollgate-vm",
        30,
    );
    assert!(!leak.1.contains("/"), "secret in a guest file: {}", leak.1);
    assert!(
        leak.1.lines().all(|l| l.trim() == "0"),
        "secret visible in the guest: {}",
        leak.1
    );
    // Each clone trusts its own CA and no other clone's.
    let mut cas = Vec::new();
    for id in &ids {
        // What the guest trusts, and what the daemon serves this sandbox on
        // its gateway (the CA its proxy intercepts with).
        let inside = sh_ok(&mut d, id, "cat /run/tollgate/ca.pem");
        let own = sh_ok(&mut d, id, "curl -sS --max-time 10 http://10.0.2.2/ca.pem");
        assert!(own.starts_with("-----BEGIN CERTIFICATE-----"), "{own}");
        cas.push((inside, own));
    }
    for (i, (inside, _)) in cas.iter().enumerate() {
        for (j, (_, own)) in cas.iter().enumerate() {
            let same = inside.trim() == own.trim();
            assert_eq!(same, i == j, "clone {i} sees clone {j}'s CA: {same}");
        }
    }
    let _ = std::fs::remove_file(&ca_file);
}

/// Ids the daemon's log says became warm, newest first.
fn warm_ready(d: &Daemon) -> Vec<String> {
    let mut ids = d.warm_ready();
    ids.reverse();
    ids
}

/// The clone's `timings.json`.
fn timings(d: &Daemon, id: &str) -> Value {
    let text = std::fs::read(d.state_dir.join("vm/run").join(id).join("timings.json"))
        .expect("timings.json");
    serde_json::from_slice(&text).expect("timings")
}

/// A warm VM (QEMU waiting for the snapshot's memory, its tap on the
/// sandbox's wire, deny-all enforcement) is what the next resume of the
/// same snapshot gets: the memory state is the snapshot's, the policy the
/// request's; deleting the snapshot releases the warm VM made for it.
#[test]
fn the_next_resume_of_a_snapshot_takes_a_warm_vm() {
    use tollgate_tests::lab::PUBLIC4;
    let _s = serial();
    let mut d = Daemon::start("vm-warm", &vm_config("10.214.96.0/20"));
    let src = create(&mut d, &json!({ "memory": 512 }));
    let src_id = src["id"].as_str().expect("id").to_owned();
    start_counter(&mut d, &src_id);
    let before = counter(&mut d, &src_id).expect("counter");
    let snap = snapshot(&mut d, &src_id, "vm-warm-snap");
    let snap_id = snap["id"].as_str().expect("snapshot id").to_owned();
    let allow = json!({"mode": "custom", "allow_cidrs": [format!("{PUBLIC4}/32")]});
    let body = json!({ "snapshot_name": "vm-warm-snap", "network_policy": allow });

    let (status, first) = resume(&mut d, &body);
    assert_eq!(status, StatusCode::CREATED, "{first}\n{}", d.log());
    let first = first["id"].as_str().expect("id").to_owned();
    assert_eq!(timings(&d, &first)["warm"], false);
    let mut warm = None;
    let ok = wait_until(Duration::from_secs(60), || {
        warm = warm_ready(&d)
            .into_iter()
            .find(|w| qemu_of(w).len() == 1 && w != &first);
        warm.is_some()
    });
    assert!(ok, "no warm VM for the snapshot:\n{}", d.log());
    let warm = warm.expect("warm id");
    // Its QEMU waits for the snapshot's memory; nothing runs in it yet.
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", qemu_of(&warm)[0]))
        .expect("cmdline")
        .replace('\0', " ");
    assert!(
        cmdline.contains(&format!("snapshots/{snap_id}/ram")) && cmdline.contains("-incoming"),
        "{cmdline}"
    );

    let (status, second) = resume(&mut d, &body);
    assert_eq!(status, StatusCode::CREATED, "{second}\n{}", d.log());
    assert_eq!(
        second["id"],
        warm.as_str(),
        "the resume did not take the warm VM"
    );
    assert_eq!(timings(&d, &warm)["warm"], true);
    // The snapshot's memory, going on.
    let c = counter(&mut d, &warm).expect("counter in the warm clone");
    assert!(c >= before, "counter {c} < {before} at the snapshot");
    assert_eq!(
        sh_ok(&mut d, &warm, "cat /run/tollgate/sandbox-id").trim(),
        warm
    );
    // The request's policy, not the warm VM's deny-all.
    d.lab.canary.clear();
    sh_ok(
        &mut d,
        &warm,
        &format!("nc -w 3 {PUBLIC4} 80 </dev/null >/dev/null 2>&1; true"),
    );
    assert!(
        !d.lab.canary.to(std::net::IpAddr::V4(PUBLIC4)).is_empty(),
        "the warm clone's allowed connection never reached the canary"
    );

    // The pool refills for the snapshot; deleting the snapshot releases it.
    let mut next = None;
    let ok = wait_until(Duration::from_secs(60), || {
        next = warm_ready(&d)
            .into_iter()
            .find(|w| w != &warm && qemu_of(w).len() == 1 && w != &first);
        next.is_some()
    });
    assert!(ok, "the pool did not refill:\n{}", d.log());
    let next = next.expect("next warm id");
    let del = d.call(
        Method::DELETE,
        &format!("/v1/snapshot/{snap_id}"),
        "/v1/snapshot/{id}",
        KEY_DEFAULT,
        None,
    );
    assert!(del.status.is_success(), "{}", del.body);
    let ok = wait_until(Duration::from_secs(15), || {
        qemu_of(&next).is_empty() && !netns_file_exists(&format!("tollgate-{next}"))
    });
    assert!(ok, "the warm VM of a deleted snapshot was kept");
    // The clones keep their private copy of the memory.
    assert_eq!(sh_ok(&mut d, &warm, "echo alive").trim(), "alive");
}
