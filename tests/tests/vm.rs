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
    assert!(tap_before.contains("tap0"), "{tap_before}");
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
