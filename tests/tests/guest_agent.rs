//! The guest image against real QEMU: boots `target/guest`'s kernel and
//! initramfs in a TCG microVM and talks to `tollgate-agent` over the
//! virtio-serial port `org.tollgate.agent`, like the vm runtime does.
//!
//! Needs QEMU and the guest image (`./scripts/guest-image`); without them the
//! tests fail with the command to run, they never skip.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// From QEMU's start to the agent's first answer, under TCG.
const BOOT_BUDGET: Duration = Duration::from_secs(60);
/// One request's answer.
const CALL_BUDGET: Duration = Duration::from_secs(30);
const NET_ARGS: &str = "tollgate.ip=10.0.2.15/24 tollgate.gw=10.0.2.2 \
                        tollgate.ip6=fd00:7467::15/64 tollgate.gw6=fd00:7467::2";

/// One VM at a time: a TCG boot wants both cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn guest_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let dir = workspace.join("target").join("guest");
    let missing: Vec<String> = ["vmlinuz", "vmlinux", "initramfs.img"]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "the guest image is missing ({}). Build it with: ./scripts/guest-image",
        missing.join(", ")
    );
    assert!(
        Path::new(QEMU).is_file(),
        "{QEMU} is missing. Install it with: apt-get install -y qemu-system-x86"
    );
    dir
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
}

struct Vm {
    child: Child,
    dir: PathBuf,
    started: Instant,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("guest files kept in {}", self.dir.display());
        }
    }
}

impl Vm {
    fn boot(with_net: bool) -> Vm {
        static N: AtomicU32 = AtomicU32::new(0);
        let guest = guest_dir();
        let dir = std::env::temp_dir().join(format!(
            "tollgate-guest-agent-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        let tsc = tollgate::runtime::vm::host_tsc_khz()
            .map(|k| format!(" tsc_early_khz={k}"))
            .unwrap_or_default();
        let append = format!("console=ttyS0 quiet panic=-1 tsc=reliable{tsc} {NET_ARGS}");
        let mut cmd = Command::new(QEMU);
        cmd.args([
            "-M",
            "microvm,acpi=on",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(guest.join("vmlinux"))
        .arg("-initrd")
        .arg(guest.join("initramfs.img"))
        .arg("-append")
        .arg(&append)
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()));
        if with_net {
            // User-mode networking with restrict=on: nothing leaves QEMU.
            cmd.args([
                "-netdev",
                "user,id=n0,restrict=on,ipv6-prefix=fd00:7467::,ipv6-prefixlen=64",
                "-device",
                "virtio-net-device,netdev=n0",
            ]);
        }
        cmd.args(["-device", "virtio-serial-device", "-chardev"])
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                dir.join("agent.sock").display()
            ))
            .args([
                "-device",
                "virtserialport,chardev=agent,name=org.tollgate.agent",
            ])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("qemu.log")).expect("qemu.log"))
            .stderr(fs::File::create(dir.join("qemu.err")).expect("qemu.err"));
        let started = Instant::now();
        let child = cmd.spawn().expect("start qemu-system-x86_64");
        Vm {
            child,
            dir,
            started,
        }
    }

    fn console(&self) -> String {
        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// The console's and QEMU's output, for failure messages.
    fn diag(&self) -> String {
        let console = self.console();
        let tail: String = console
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        let err = fs::read_to_string(self.dir.join("qemu.err")).unwrap_or_default();
        format!("--- console (last 40 lines)\n{tail}\n--- qemu stderr\n{err}")
    }

    /// Connects to the agent's socket (QEMU creates it at start).
    fn connect(&mut self) -> Conn {
        let path = self.dir.join("agent.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("qemu exited: {st}\n{}", self.diag());
            }
            match UnixStream::connect(&path) {
                Ok(s) => return Conn::new(s),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connect {}: {e}\n{}", path.display(), self.diag()),
            }
        }
    }

    /// Boots until the agent answers a ping; returns the connection and the
    /// time from QEMU's start to that answer.
    fn wait_ready(&mut self) -> (Conn, Duration, Value) {
        let mut c = self.connect();
        // A newline first ends whatever partial line an earlier client left.
        c.send_raw(b"\n");
        let remaining = BOOT_BUDGET.saturating_sub(self.started.elapsed());
        let id = c.send(json!({"op": "ping"}));
        let ok = match c.recv_for(id, remaining) {
            Some(v) => v,
            None => panic!(
                "the agent did not answer a ping within {BOOT_BUDGET:?} of QEMU's start\n{}",
                self.diag()
            ),
        };
        let elapsed = self.started.elapsed();
        (c, elapsed, ok)
    }
}

struct Conn {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next: u64,
    /// Answers that arrived for other ids while waiting.
    stash: Vec<Value>,
}

impl Conn {
    fn new(s: UnixStream) -> Conn {
        let reader = BufReader::new(s.try_clone().expect("clone socket"));
        Conn {
            writer: s,
            reader,
            next: 1000,
            stash: Vec::new(),
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .expect("write to the agent socket");
    }

    /// Sends `req` with a fresh id; returns the id.
    fn send(&mut self, mut req: Value) -> u64 {
        self.next += 1;
        let id = self.next;
        req["id"] = json!(id);
        let mut line = serde_json::to_vec(&req).expect("encode");
        line.push(b'\n');
        self.send_raw(&line);
        id
    }

    /// The next response line, or None after `budget`.
    fn recv_line(&mut self, budget: Duration) -> Option<Value> {
        self.writer
            .set_read_timeout(Some(budget.max(Duration::from_millis(1))))
            .expect("timeout");
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("the agent socket closed"),
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("the agent sent a non-JSON line {line:?}: {e}")),
            ),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                None
            }
            Err(e) => panic!("read from the agent socket: {e}"),
        }
    }

    /// The whole response for `id` (`{"id":..,"ok"|"error":..}`).
    fn recv_for(&mut self, id: u64, budget: Duration) -> Option<Value> {
        if let Some(i) = self.stash.iter().position(|v| v["id"] == json!(id)) {
            return Some(self.stash.remove(i));
        }
        let deadline = Instant::now() + budget;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let v = self.recv_line(left)?;
            if v["id"] == json!(id) {
                return Some(v);
            }
            self.stash.push(v);
        }
    }

    fn call(&mut self, req: Value) -> Value {
        let desc = req.to_string();
        let id = self.send(req);
        self.recv_for(id, CALL_BUDGET)
            .unwrap_or_else(|| panic!("no answer to {desc} within {CALL_BUDGET:?}"))
    }

    /// The `ok` body of a request that must succeed.
    fn ok(&mut self, req: Value) -> Value {
        let r = self.call(req.clone());
        assert!(r.get("error").is_none(), "{req} failed: {r}");
        r["ok"].clone()
    }

    fn exec(&mut self, argv: &[&str]) -> Value {
        self.ok(json!({"op": "exec", "argv": argv, "timeout_ms": 20000}))
    }

    /// `sh -c script`: (exit code, stdout, stderr).
    fn sh(&mut self, script: &str) -> (i64, String, String) {
        let r = self.exec(&["sh", "-c", script]);
        (
            r["exit_code"].as_i64().expect("exit_code"),
            r["stdout"].as_str().expect("stdout").to_string(),
            r["stderr"].as_str().expect("stderr").to_string(),
        )
    }

    fn sh_out(&mut self, script: &str) -> String {
        let (code, out, err) = self.sh(script);
        assert_eq!(code, 0, "{script}: exit {code}, stderr {err}");
        out
    }
}

const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBtollgateTESTca\n-----END CERTIFICATE-----\n";
const CA_BUNDLE: &str = "-----BEGIN CERTIFICATE-----\nMIIBsystemROOT\n-----END CERTIFICATE-----\n\
                         -----BEGIN CERTIFICATE-----\nMIIBtollgateTESTca\n-----END CERTIFICATE-----\n";

#[test]
fn guest_boots_and_the_agent_serves_over_virtio_serial() {
    let _serial = serial();
    let mut vm = Vm::boot(true);
    let (mut c, boot, ping) = vm.wait_ready();
    println!("guest: QEMU start to first ping answer: {boot:?}");
    let ping = &ping["ok"];
    assert!(ping["pid"].as_u64().is_some_and(|p| p > 1), "{ping}");
    assert!(ping["uptime_ms"].as_u64().is_some(), "{ping}");
    let console = vm.console();
    assert!(console.contains("tollgate-guest: ready"), "{}", vm.diag());
    assert!(!console.contains("tollgate-guest: error"), "{}", vm.diag());

    // The network from the kernel command line.
    let addrs = c.sh_out(
        "ip addr show dev eth0; ip route; ip -6 route; cat /proc/sys/net/ipv6/conf/eth0/accept_ra",
    );
    assert!(addrs.contains("inet 10.0.2.15/24"), "{addrs}");
    assert!(addrs.contains("inet6 fd00:7467::15/64"), "{addrs}");
    assert!(addrs.contains("default via 10.0.2.2"), "{addrs}");
    assert!(addrs.contains("default via fd00:7467::2"), "{addrs}");
    assert!(addrs.trim_end().ends_with('0'), "accept_ra: {addrs}");

    // Neighbour entries for the gateway (QEMU's user network answers ARP and
    // NDP): after a snapshot restore they would be stale.
    c.sh("ping -c 1 -W 2 10.0.2.2; ping6 -c 1 -W 2 fd00:7467::2");
    let neigh = c.sh_out("ip neigh show dev eth0; ip -6 neigh show dev eth0");
    assert!(
        neigh.contains("10.0.2.2 ") && neigh.contains("fd00:7467::2 "),
        "{neigh}"
    );

    // configure, the clock an hour ahead.
    let ahead = unix_now() + Duration::from_secs(3600);
    let conf = c.ok(json!({
        "op": "configure",
        "sandbox_id": "sbx-first",
        "hostname": "sbx-first",
        "env": {"FOO": "bar", "ONLY_FIRST": "1"},
        "ca_pem": CA_PEM,
        "ca_bundle": CA_BUNDLE,
        "resolv_conf": "nameserver 10.0.2.3\n",
        "clock_unix_ns": u64::try_from(ahead.as_nanos()).expect("ns"),
    }));
    let step = conf["clock_step_ms"].as_i64().expect("clock_step_ms");
    assert!(
        (3_590_000..3_610_000).contains(&step),
        "clock_step_ms {step}"
    );
    let guest_now: i64 = c.sh_out("date +%s").trim().parse().expect("date +%s");
    let host_now = unix_now().as_secs() as i64;
    assert!(
        (guest_now - host_now - 3600).abs() <= 5,
        "guest clock {guest_now}, host {host_now}"
    );
    let neigh = c.sh_out("ip neigh show dev eth0; ip -6 neigh show dev eth0");
    assert!(
        !neigh.contains("10.0.2.2 ") && !neigh.contains("fd00:7467::2 "),
        "neighbour caches not flushed: {neigh}"
    );
    assert_eq!(c.sh_out("cat /run/tollgate/ca.pem"), CA_PEM);
    assert_eq!(c.sh_out("cat /run/tollgate/ca-bundle.crt"), CA_BUNDLE);
    assert_eq!(
        c.sh_out("stat -c %a /run/tollgate/ca.pem /run/tollgate/ca-bundle.crt"),
        "644\n644\n"
    );
    assert_eq!(c.sh_out("cat /run/tollgate/sandbox-id"), "sbx-first\n");
    assert_eq!(c.sh_out("hostname"), "sbx-first\n");
    assert_eq!(c.sh_out("cat /etc/resolv.conf"), "nameserver 10.0.2.3\n");
    assert_eq!(
        c.sh_out("echo $SSL_CERT_FILE $FOO"),
        "/run/tollgate/ca-bundle.crt bar\n"
    );
    assert_eq!(
        c.sh_out("echo $REQUESTS_CA_BUNDLE $NODE_EXTRA_CA_CERTS $CURL_CA_BUNDLE $HOME $PATH"),
        "/run/tollgate/ca-bundle.crt /run/tollgate/ca-bundle.crt /run/tollgate/ca-bundle.crt \
         /root /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
    // The request's env over the configured one; cwd.
    let r = c.ok(
        json!({"op": "exec", "argv": ["sh", "-c", "echo $FOO $ONLY_FIRST; pwd"],
                        "env": {"FOO": "override"}, "cwd": "/tmp", "timeout_ms": 10000}),
    );
    assert_eq!(r["stdout"], "override 1\n/tmp\n", "{r}");

    // A second configure replaces everything: no CA, other env.
    let conf = c.ok(json!({
        "op": "configure",
        "sandbox_id": "sbx-second",
        "hostname": "sbx-second",
        "env": {"BAR": "2"},
        "ca_pem": null,
        "ca_bundle": null,
        "resolv_conf": "nameserver 10.0.2.3\n",
    }));
    assert_eq!(conf["clock_step_ms"], 0, "{conf}");
    assert_eq!(
        c.sh_out("echo \"[$FOO][$ONLY_FIRST][$BAR][$SSL_CERT_FILE][$CURL_CA_BUNDLE]\"; ls -A /run/tollgate"),
        "[][][2][][]\nsandbox-id\n"
    );
    assert_eq!(
        c.sh_out("cat /run/tollgate/sandbox-id; hostname"),
        "sbx-second\nsbx-second\n"
    );

    // Exit codes and output.
    assert_eq!(c.sh("exit 7"), (7, String::new(), String::new()));
    assert_eq!(
        c.sh("echo out; echo oops >&2; exit 3"),
        (3, "out\n".into(), "oops\n".into())
    );
    assert_eq!(c.sh("kill -TERM $$").0, 128 + 15);
    let t = Instant::now();
    let big = c.exec(&["sh", "-c", "head -c 2097152 /dev/zero | tr '\\0' x"]);
    let big_took = t.elapsed();
    let out = big["stdout"].as_str().expect("stdout");
    assert_eq!(
        out.len(),
        2 << 20,
        "2 MiB stdout arrived as {} bytes",
        out.len()
    );
    assert!(out.bytes().all(|b| b == b'x'));
    println!("guest: 2 MiB of stdout in {big_took:?}");
    // Not UTF-8: lossy.
    let r = c.exec(&["sh", "-c", "printf 'a\\377b'"]);
    assert_eq!(r["stdout"], "a\u{fffd}b");

    // Timeout: the whole process group is killed, 124.
    let t = Instant::now();
    let r =
        c.ok(json!({"op": "exec", "argv": ["sh", "-c", "sleep 30 & sleep 30"], "timeout_ms": 500}));
    let took = t.elapsed();
    assert_eq!(r["exit_code"], 124, "{r}");
    assert!(took < Duration::from_secs(5), "timeout took {took:?}");
    let left = c.sh_out("ps -o args | grep '^sleep 30' | wc -l");
    assert_eq!(left.trim(), "0", "the timed-out group survived");
    // A background child holding stdout open does not hold the answer.
    let t = Instant::now();
    let (code, out, _) = c.sh("sleep 20 & echo started");
    assert_eq!((code, out.as_str()), (0, "started\n"));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );

    // Not found / not executable, like a shell.
    let r = c.exec(&["no-such-program", "x"]);
    assert_eq!(r["exit_code"], 127, "{r}");
    assert!(
        r["stderr"]
            .as_str()
            .is_some_and(|e| e.contains("not found")),
        "{r}"
    );
    let r = c.exec(&["/etc/passwd"]);
    assert_eq!(r["exit_code"], 126, "{r}");
    let r = c.call(json!({"op": "exec", "argv": []}));
    assert!(r["error"].is_string(), "{r}");

    // spawn: detached, a child of init, its own session.
    let pid = c.ok(json!({"op": "spawn", "argv": ["sleep", "300"], "env": {"X": "1"}}))["pid"]
        .as_u64()
        .expect("pid");
    let stat = c.sh_out(&format!(
        "cat /proc/{pid}/stat; tr '\\0' ' ' < /proc/{pid}/environ"
    ));
    let fields: Vec<&str> = stat
        .split(')')
        .nth(1)
        .expect("stat")
        .split_whitespace()
        .collect();
    assert_eq!(fields[1], "1", "ppid of the spawned process: {stat}");
    assert_eq!(fields[2], pid.to_string(), "pgid: {stat}");
    assert_eq!(fields[3], pid.to_string(), "sid: {stat}");
    assert!(stat.contains("X=1") && stat.contains("BAR=2"), "{stat}");
    let r = c.call(json!({"op": "spawn", "argv": ["no-such-daemon"]}));
    assert!(r["error"].is_string(), "{r}");

    // Bad input: an error answer each, and the agent goes on.
    c.send_raw(b"this is not json\n");
    let r = c
        .recv_line(CALL_BUDGET)
        .expect("answer to a malformed line");
    assert!(r["id"].is_null() && r["error"].is_string(), "{r}");
    c.send_raw(b"[1,2,3]\n{\"op\":\"ping\"}\n{\"id\":-4,\"op\":\"ping\"}\n");
    for _ in 0..3 {
        let r = c.recv_line(CALL_BUDGET).expect("answer to a bad request");
        assert!(r["id"].is_null() && r["error"].is_string(), "{r}");
    }
    for bad in [
        json!({"op": "no-such-op"}),
        json!({"op": 5}),
        json!({"op": "exec", "argv": "sh"}),
        json!({"op": "exec", "argv": ["sh"], "env": {"A": 1}}),
        json!({"op": "exec", "argv": ["sh"], "timeout_ms": "soon"}),
        json!({"op": "configure", "sandbox_id": 7}),
        json!({"op": "configure", "sandbox_id": "x", "hostname": "bad host/name"}),
    ] {
        let r = c.call(bad.clone());
        assert!(r["error"].is_string(), "{bad} → {r}");
    }
    c.ok(json!({"op": "ping"}));

    // Requests overlap: a ping is answered while an exec runs.
    let slow = c.send(
        json!({"op": "exec", "argv": ["sh", "-c", "sleep 2; echo slow"], "timeout_ms": 10000}),
    );
    let fast = c.send(json!({"op": "ping"}));
    let first = c.recv_line(CALL_BUDGET).expect("an answer");
    assert_eq!(first["id"], fast, "the ping waited for the exec: {first}");
    let r = c.recv_for(slow, CALL_BUDGET).expect("the exec's answer");
    assert_eq!(r["ok"]["stdout"], "slow\n");

    // No zombies: the agent reaps its execs, init the daemons that exit.
    c.ok(json!({"op": "spawn", "argv": ["true"]}));
    c.ok(json!({"op": "spawn", "argv": ["sh", "-c", "sleep 0.2 &"]}));
    std::thread::sleep(Duration::from_millis(1500));
    let zombies = c.sh_out(
        "for s in /proc/[0-9]*/stat; do read -r l < $s 2>/dev/null; case \"$l\" in *') Z '*) echo \"$l\";; esac; done",
    );
    assert_eq!(zombies, "", "zombie processes");
    let agent_pid = ping["pid"].as_u64().expect("pid");

    // The host disconnects and reconnects (as around a snapshot restore):
    // reads see EOF meanwhile, the agent keeps serving.
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    let mut c = vm.connect();
    c.send_raw(b"\n");
    assert_eq!(c.ok(json!({"op": "ping"}))["pid"], agent_pid);
    // A partial line from a client that went away becomes one error answer
    // once the next client's leading newline ends it.
    c.send_raw(b"{\"id\":77,\"op\":\"pi");
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    let mut c = vm.connect();
    c.send_raw(b"\n");
    let r = c.recv_line(CALL_BUDGET).expect("answer to the torn line");
    assert!(r["id"].is_null() && r["error"].is_string(), "{r}");
    assert_eq!(c.ok(json!({"op": "ping"}))["pid"], agent_pid);
    // An answer produced while no host is connected is delivered to the next
    // connection (the guest's write waits for the host side).
    let late = c.send(
        json!({"op": "exec", "argv": ["sh", "-c", "sleep 1; echo late"], "timeout_ms": 10000}),
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(c);
    std::thread::sleep(Duration::from_secs(2));
    let mut c = vm.connect();
    c.send_raw(b"\n");
    let r = c
        .recv_for(late, CALL_BUDGET)
        .expect("the answer written while disconnected");
    assert_eq!(r["ok"]["stdout"], "late\n", "{r}");
    assert_eq!(c.ok(json!({"op": "ping"}))["pid"], agent_pid);

    // /init restarts an agent that dies.
    c.ok(json!({"op": "spawn", "argv": ["sh", "-c", format!("sleep 0.5; kill -9 {agent_pid}")]}));
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_pid = loop {
        assert!(
            Instant::now() < deadline,
            "the agent was not restarted\n{}",
            vm.diag()
        );
        std::thread::sleep(Duration::from_millis(500));
        let id = c.send(json!({"op": "ping"}));
        if let Some(r) = c.recv_for(id, Duration::from_secs(2)) {
            let p = r["ok"]["pid"].as_u64().expect("pid");
            if p != agent_pid {
                break p;
            }
        }
    };
    assert_ne!(new_pid, agent_pid);
    // The restarted agent starts with no config.
    assert_eq!(c.sh_out("echo \"[$BAR]\""), "[]\n");
    assert!(vm.console().contains("restarting"), "{}", vm.diag());
}

#[test]
fn guest_boots_without_a_network_device() {
    let _serial = serial();
    let mut vm = Vm::boot(false);
    let (mut c, boot, _) = vm.wait_ready();
    println!("guest without eth0: QEMU start to first ping answer: {boot:?}");
    let console = vm.console();
    assert!(
        console.contains("tollgate-guest: error: eth0 did not appear"),
        "{}",
        vm.diag()
    );
    assert!(console.contains("tollgate-guest: ready"), "{}", vm.diag());
    // configure works without interfaces to flush.
    let conf = c.ok(json!({"op": "configure", "sandbox_id": "sbx-nonet", "env": {}, "ca_pem": null, "ca_bundle": null}));
    assert_eq!(conf["clock_step_ms"], 0);
    assert_eq!(c.sh_out("cat /run/tollgate/sandbox-id"), "sbx-nonet\n");
    assert_eq!(c.sh_out("ls /sys/class/net"), "lo\n");
}
