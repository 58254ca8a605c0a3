//! Privileged end-to-end: a resumed sandbox lives in its own network
//! namespace with its own address, `tollgate exec` reaches it, delete leaves
//! nothing behind, and daemon restarts keep every object.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;
use tollgate_tests::daemon::{default_config, Daemon, KEY_DEFAULT};
use tollgate_tests::lab::Lab;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// `tollgate exec` through the CLI, as a user would run it.
fn cli_exec(d: &Daemon, id: &str, argv: &[&str]) -> (i32, String, String) {
    let out = d
        .cli()
        .arg("exec")
        .arg(id)
        .arg("--")
        .args(argv)
        .output()
        .expect("run tollgate exec");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Interfaces of the namespace the daemon runs in (the lab's host).
fn links(lab: &Lab) -> BTreeSet<String> {
    let out = Command::new("ip")
        .args(["-n", &lab.host_ns, "-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect()
}

/// PIDs of processes running as `uid`.
fn pids_of_uid(uid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let real = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok());
        if real == Some(uid) {
            out.push(pid);
        }
    }
    out
}

fn snapshot_and_resume(d: &mut Daemon) -> String {
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
        Some(&json!({"name": "img", "kill_sandbox_after": true})),
    );
    assert_eq!(s.status, StatusCode::CREATED, "{}", s.body);
    let r = d.call(
        Method::POST,
        "/v1/snapshot/resume",
        "/v1/snapshot/resume",
        KEY_DEFAULT,
        Some(&json!({"snapshot_name": "img", "network_policy": {"mode": "custom", "allow_domains": ["example.com"]}})),
    );
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

#[test]
fn resume_exec_shows_own_namespace_and_address_and_delete_leaves_nothing() {
    let _g = serial();
    let mut d = Daemon::start("netns", &default_config("10.211.0.0/20"));
    let before_links = links(&d.lab);
    let id = snapshot_and_resume(&mut d);
    let ns_file = format!("/run/netns/tollgate-{id}");
    assert!(
        std::path::Path::new(&ns_file).exists(),
        "no namespace {ns_file}"
    );

    let host_ns = std::fs::read_link("/proc/self/ns/net").expect("host netns");
    let (code, out, err) = cli_exec(&d, &id, &["readlink", "/proc/self/ns/net"]);
    assert_eq!(code, 0, "{err}");
    assert_ne!(
        out.trim(),
        host_ns.to_string_lossy(),
        "exec ran in the host's network namespace"
    );

    // Every sandbox sees the same guest addresses (10.0.2.15/24 and
    // fd00:7467::15/64, behind its own router at 10.0.2.2); the pool only
    // numbers the uplinks between routers and host.
    let (code, out, err) = cli_exec(&d, &id, &["cat", "/proc/net/fib_trie"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("10.0.2.15") && !out.contains("10.211."),
        "guest address missing inside: {out}"
    );
    let (code, out, _) = cli_exec(&d, &id, &["cat", "/proc/net/if_inet6"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("fd007467000000000000000000000015 ") && l.ends_with("eth0")),
        "guest v6 address missing inside: {out}"
    );
    let (code, out, _) = cli_exec(&d, &id, &["cat", "/proc/net/route"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|l| l.starts_with("eth0\t00000000")),
        "no default route via eth0: {out}"
    );

    // Unprivileged, and the daemon's state dir is not visible.
    // Name resolution inside goes to the sandbox's own resolver.
    let (code, out, _) = cli_exec(&d, &id, &["cat", "/etc/resolv.conf"]);
    assert_eq!(code, 0);
    let servers: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("nameserver"))
        .collect();
    assert_eq!(
        servers,
        ["nameserver 10.0.2.2", "nameserver fd00:7467::2"],
        "{out}"
    );
    let (_, out, _) = cli_exec(&d, &id, &["id", "-u"]);
    assert_eq!(out.trim(), "200000");
    let state = d.state_dir.to_string_lossy().into_owned();
    let (_, out, _) = cli_exec(&d, &id, &["ls", "-A", &state]);
    assert_eq!(out.trim(), "", "state dir visible inside the sandbox");
    let (code, _, _) = cli_exec(&d, &id, &["sh", "-c", "exit 7"]);
    assert_eq!(code, 7, "exit code not propagated");
    let new_links: Vec<String> = links(&d.lab).difference(&before_links).cloned().collect();
    assert_eq!(
        new_links,
        vec!["tgh0".to_string()],
        "expected one host-side link, got {new_links:?}"
    );
    let router_file = format!("/run/netns/tgr-{id}");
    assert!(
        std::path::Path::new(&router_file).exists(),
        "no router namespace {router_file}"
    );
    assert!(
        !pids_of_uid(200_000).is_empty(),
        "sandbox process not found"
    );

    let del = d.delete_sandbox(&id);
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert!(
        !std::path::Path::new(&ns_file).exists(),
        "namespace left behind"
    );
    assert!(
        !std::path::Path::new(&router_file).exists(),
        "router namespace left behind"
    );
    assert_eq!(links(&d.lab), before_links, "link left behind");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pids_of_uid(200_000).is_empty() {
        assert!(
            Instant::now() < deadline,
            "process left behind: {:?}",
            pids_of_uid(200_000)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, err) = cli_exec(&d, &id, &["true"]);
    assert_ne!(code, 0);
    assert!(err.contains("404"), "exec on a deleted sandbox: {err}");
}

#[test]
fn restart_keeps_every_object_and_reports_lost_sandboxes() {
    let _g = serial();
    let mut d = Daemon::start("restart", &default_config("10.211.16.0/20"));
    let before_links = links(&d.lab);
    let id = snapshot_and_resume(&mut d);

    // Graceful stop, then a SIGKILL: both times the sandbox is re-adopted.
    let stopped = d.stop_keep_state();
    let mut d = Daemon::restart(stopped);
    let g = d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/"),
        "/v1/sandbox/{id}/",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.body["state"], "running");
    assert_eq!(
        g.body["network_policy"]["allow_domains"],
        json!(["example.com"])
    );
    let (code, out, _) = cli_exec(&d, &id, &["echo", "still here"]);
    assert_eq!((code, out.trim()), (0, "still here"));
    let stopped = d.kill_keep_state();
    let mut d = Daemon::restart(stopped);
    let snaps = d.call(
        Method::GET,
        "/v1/snapshots",
        "/v1/snapshots",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(
        snaps.body["total_items"], 1,
        "snapshot forgotten: {}",
        snaps.body
    );
    let (code, _, _) = cli_exec(&d, &id, &["true"]);
    assert_eq!(
        code, 0,
        "sandbox not re-adopted after SIGKILL of the daemon"
    );

    // While the daemon is down the sandbox dies: it is reported, not forgotten,
    // and its namespace and link are released.
    let stopped = d.stop_keep_state();
    for pid in pids_of_uid(200_000) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut d = Daemon::restart(stopped);
    let g = d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/"),
        "/v1/sandbox/{id}/",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(g.status, StatusCode::OK, "lost sandbox silently forgotten");
    assert_eq!(g.body["state"], "deleted");
    assert!(
        g.body["status_reason"]
            .as_str()
            .is_some_and(|r| r.contains("lost")),
        "{}",
        g.body
    );
    assert!(!std::path::Path::new(&format!("/run/netns/tollgate-{id}")).exists());
    assert!(!std::path::Path::new(&format!("/run/netns/tgr-{id}")).exists());
    assert_eq!(
        links(&d.lab),
        before_links,
        "lost sandbox's link not released"
    );
    let del = d.delete_sandbox(&id);
    assert_eq!(del.status, StatusCode::NO_CONTENT);
}

/// A daemon killed with SIGKILL whose state dir is then lost leaves its
/// sandbox's namespaces, links, pins and processes behind; the next daemon
/// reclaims them at start and its first create succeeds on the same slot.
#[test]
fn leftovers_of_a_daemon_whose_state_dir_was_lost_are_reclaimed() {
    let _g = serial();
    let mut d = Daemon::start("lost-state", &default_config("10.211.48.0/20"));
    let before_links = links(&d.lab);
    let old = d.create_sandbox(&json!({"mode": "allow-all"}));
    let uid = 200_000;
    assert!(
        !pids_of_uid(uid).is_empty(),
        "the sandbox's process is not running"
    );
    let stopped = d.kill_keep_state();
    std::fs::remove_dir_all(&stopped.state_dir).expect("lose the state dir");
    assert!(
        links(&stopped.lab).contains("tgh0"),
        "the killed daemon's link is gone"
    );
    let mut d = Daemon::restart(stopped);
    for ns in [format!("tollgate-{old}"), format!("tgr-{old}")] {
        assert!(
            !std::path::Path::new("/run/netns").join(&ns).exists(),
            "leftover namespace {ns} kept"
        );
    }
    assert!(
        !std::path::Path::new("/sys/fs/bpf/tollgate")
            .join(&old)
            .exists(),
        "leftover pins kept"
    );
    assert!(
        pids_of_uid(uid).is_empty(),
        "leftover process kept: {:?}",
        pids_of_uid(uid)
    );
    let log = d.log();
    assert!(
        log.contains("reclaimed a leftover sandbox") && log.contains(&old),
        "{log}"
    );
    // The same slot again (tgh0): 201, and a working sandbox.
    let new = d.create_sandbox(&json!({"mode": "allow-all"}));
    let (code, out, _) = cli_exec(&d, &new, &["echo", "fresh"]);
    assert_eq!((code, out.trim()), (0, "fresh"));
    assert!(d.delete_sandbox(&new).status.is_success());
    assert_eq!(links(&d.lab), before_links, "link left behind");
}

/// A second daemon with its own state dir starting while the first runs
/// leaves the first one's sandboxes alone.
#[test]
fn a_second_daemon_leaves_a_running_daemon_s_sandboxes_alone() {
    let _g = serial();
    let mut a = Daemon::start("owner-a", &default_config("10.211.64.0/20"));
    let mine = a.create_sandbox(&json!({"mode": "allow-all"}));
    let mut b = Daemon::start("owner-b", &default_config("10.211.80.0/20"));
    let theirs = b.create_sandbox(&json!({"mode": "allow-all"}));
    assert!(
        b.log().contains("leftover of another daemon: left alone"),
        "{}",
        b.log()
    );
    for ns in [format!("tollgate-{mine}"), format!("tgr-{mine}")] {
        assert!(
            std::path::Path::new("/run/netns").join(&ns).exists(),
            "{ns} reclaimed"
        );
    }
    let (code, out, _) = cli_exec(&a, &mine, &["echo", "still mine"]);
    assert_eq!((code, out.trim()), (0, "still mine"));
    assert!(b.delete_sandbox(&theirs).status.is_success());
    assert!(a.delete_sandbox(&mine).status.is_success());
}
