//! Helpers for tests that need root and namespaces: a hard root check (never
//! a silent skip), the `tollgate` binary, cleanup guards (sandbox processes,
//! sandbox networks), namespace-scoped probes and `/proc` probes.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tollgate::net::{self, NetPlan};
use tollgate::runtime::{NetworkInfo, Runtime, RuntimeHandle};

/// The command that runs the privileged tests.
pub const ROOT_COMMAND: &str = r#"sudo -E env "PATH=$PATH" cargo test -p tollgate-tests"#;

/// Panics (never skips) unless the process is root and can create network
/// namespaces; the message names the command to run instead.
pub fn require_root() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECK.get_or_init(|| {
        if !nix::unistd::geteuid().is_root() {
            return Err(format!(
                "not running as root (euid {})",
                nix::unistd::geteuid()
            ));
        }
        // Try on a throwaway thread: unshare(CLONE_NEWNET) affects only it.
        std::thread::spawn(|| nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET))
            .join()
            .map_err(|_| "namespace probe thread panicked".to_owned())?
            .map_err(|e| format!("cannot create a network namespace: {e}"))
    });
    if let Err(why) = result {
        panic!(
            "these tests need root and network namespaces: {why}. \
             Run them as root with: {ROOT_COMMAND}"
        );
    }
}

/// `target/guest`, holding the guest kernel and initramfs that
/// `./scripts/guest-image` builds; panics (never skips) with the commands to
/// run when they or QEMU are missing.
pub fn guest_image_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let dir = workspace.join("target").join("guest");
    let missing: Vec<String> = [
        dir.join("vmlinuz"),
        dir.join("initramfs.img"),
        PathBuf::from("/usr/bin/qemu-system-x86_64"),
    ]
    .into_iter()
    .filter(|p| !p.is_file())
    .map(|p| p.display().to_string())
    .collect();
    assert!(
        missing.is_empty(),
        "the VM tests need QEMU and the guest image; missing: {}. \
         Run: sudo ./scripts/deps (installs QEMU and builds the guest), or ./scripts/guest-image",
        missing.join(", ")
    );
    dir
}

/// Path of the `tollgate` binary of the profile the tests were built with
/// (`target/<profile>/tollgate`). It is (re)built once per test process with
/// `cargo build -p tollgate --bin tollgate` (a no-op when up to date), so a
/// stale binary is never tested; without cargo, an existing binary is used.
pub fn tollgate_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current test executable");
        // target/<profile>/deps/<test> → target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable is not under target/<profile>/deps")
            .to_path_buf();
        let bin = profile_dir.join("tollgate");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(other) => other.to_owned(),
        };
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(&cargo);
        // Cargo gives a test or bench process the variables of its own
        // package (CARGO_MANIFEST_DIR, CARGO_PKG_*, OUT_DIR, ...). Build
        // scripts track some of them (ring's tracks CARGO_MANIFEST_DIR), so
        // inheriting them would make this build redo what `cargo test` /
        // `cargo bench` just built, and that redo the next time.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let per_package = name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_MANIFEST_")
                || name.starts_with("CARGO_BIN_")
                || matches!(
                    name.as_ref(),
                    "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "CARGO_RUSTC_CURRENT_DIR"
                        | "OUT_DIR"
                );
            if per_package {
                build.env_remove(name.as_ref());
            }
        }
        let status = build
            .args([
                "build",
                "-p",
                "tollgate",
                "--bin",
                "tollgate",
                "--profile",
                &profile,
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .current_dir(&workspace)
            .status();
        match status {
            Ok(st) if st.success() => {}
            Ok(st) => panic!("cargo build -p tollgate --bin tollgate failed: {st}"),
            Err(e) if bin.exists() => {
                eprintln!(
                    "warning: cannot run cargo ({e}); using existing {}",
                    bin.display()
                );
            }
            Err(e) => panic!(
                "{} is missing and cargo cannot be run ({e}); build it with \
                 `cargo build -p tollgate --bin tollgate`",
                bin.display()
            ),
        }
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a future to completion on a fresh current-thread runtime on its own
/// thread (usable from `Drop`, inside or outside a tokio runtime).
pub fn block_on_fresh<F>(fut: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime")
                .block_on(fut)
        })
        .join()
        .expect("cleanup thread panicked")
    })
}

/// Stops a sandbox when dropped (also when the test panics).
pub struct SandboxGuard<R: Runtime> {
    runtime: Arc<R>,
    /// The guarded sandbox.
    pub handle: RuntimeHandle,
}

impl<R: Runtime> SandboxGuard<R> {
    /// Guards `handle`.
    pub fn new(runtime: Arc<R>, handle: RuntimeHandle) -> Self {
        Self { runtime, handle }
    }
}

impl<R: Runtime> Drop for SandboxGuard<R> {
    fn drop(&mut self) {
        let rt = Arc::clone(&self.runtime);
        let handle = self.handle.clone();
        if let Err(e) = block_on_fresh(async move { rt.stop(&handle).await }) {
            eprintln!("cleanup: stop {}: {e}", self.handle.network.netns);
        }
    }
}

/// Runs a future on a fresh current-thread runtime on a thread inside the
/// named network namespace `ns`: everything `tollgate::net` does "in the
/// daemon's namespace" (host link, host nftables, sysctls) then happens in
/// `ns` (e.g. a lab's host namespace) instead of the test's own.
pub fn block_on_in<T, Fut>(ns: &str, make: impl FnOnce() -> Fut + Send + 'static) -> T
where
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    crate::lab::in_netns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(make())
    })
}

/// Removes a sandbox network (both namespaces, the host link) when dropped.
pub struct NetworkGuard {
    /// The guarded network (names are what teardown uses).
    pub info: NetworkInfo,
    /// Namespace the host side lives in (the daemon's; `None`: the test's).
    pub host_ns: Option<String>,
}

impl NetworkGuard {
    /// Guards the network a sandbox with this id on this slot would get from
    /// the default plan, with its host side in the test's namespace. A slot
    /// outside the plan still gets the right names.
    pub fn for_sandbox(id: &str, slot: u32) -> Self {
        Self::guard(id, slot, None)
    }

    /// Like [`Self::for_sandbox`], with the host side in namespace `host_ns`.
    pub fn in_host(host_ns: &str, id: &str, slot: u32) -> Self {
        Self::guard(id, slot, Some(host_ns.to_owned()))
    }

    fn guard(id: &str, slot: u32, host_ns: Option<String>) -> Self {
        let plan = NetPlan::default();
        let mut info = net::info_for(&plan, id, slot)
            .or_else(|_| net::info_for(&plan, id, 0))
            .expect("sandbox network names");
        info.slot = slot;
        info.host_if = net::host_if_name(slot);
        Self { info, host_ns }
    }

    /// Removes the network now (also done on drop), returning the error.
    pub fn teardown(&self) -> Result<(), net::NetError> {
        let info = self.info.clone();
        match &self.host_ns {
            Some(ns) => block_on_in(ns, move || async move { net::teardown(&info).await }),
            None => block_on_fresh(async move { net::teardown(&info).await }),
        }
    }
}

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("cleanup: teardown {}: {e}", self.info.netns);
        }
    }
}

/// Loads an nftables ruleset inside the named network namespace (test-only
/// rules, e.g. marks that stand in for the eBPF program).
pub fn nft_in(ns: &str, ruleset: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(ruleset.as_bytes())
        .expect("write ruleset");
    let out = child.wait_with_output().expect("wait for nft");
    assert!(
        out.status.success(),
        "nft in {ns}: {}\n{ruleset}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Output of a command run inside the named network namespace (`ip netns
/// exec`); panics when it fails.
pub fn run_in(ns: &str, argv: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{argv:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// From inside namespace `ns`: connects to `to` (bound to `from` when
/// given), sends `hello`, and returns the reply (read until EOF or a short
/// timeout) or the connect/IO error.
pub fn tcp_exchange(
    ns: &str,
    from: Option<SocketAddr>,
    to: SocketAddr,
    hello: &[u8],
    timeout: Duration,
) -> std::io::Result<String> {
    let hello = hello.to_vec();
    crate::lab::in_netns(ns, move || {
        let mut stream = match from {
            None => TcpStream::connect_timeout(&to, timeout)?,
            Some(local) => {
                let sock = socket2::Socket::new(
                    socket2::Domain::for_address(to),
                    socket2::Type::STREAM,
                    None,
                )?;
                sock.bind(&local.into())?;
                sock.connect_timeout(&to.into(), timeout)?;
                TcpStream::from(sock)
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(&hello)?;
        let mut reply = String::new();
        match stream.read_to_string(&mut reply) {
            Ok(_) => Ok(reply),
            Err(_) if !reply.is_empty() => Ok(reply),
            Err(e) => Err(e),
        }
    })
}

/// Interfaces of a network namespace (`None`: the test's own).
pub fn links_of(ns: Option<&str>) -> std::collections::BTreeSet<String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let out = cmd.args(["-o", "link", "show"]).output().expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .collect()
}

/// A host directory (e.g. a fake daemon state dir) removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `/run/tollgate-tests/<name>-<pid>` (outside `/tmp`, which
    /// sandboxes replace with their own tmpfs anyway).
    pub fn new(name: &str) -> Self {
        let p = PathBuf::from(format!("/run/tollgate-tests/{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("create test dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Does a network interface with this name exist in the test's namespace?
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Does `/run/netns/<name>` exist?
pub fn netns_file_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// (device, inode) of a namespace link such as `/proc/<pid>/ns/pid`.
pub fn ns_id(path: impl AsRef<Path>) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// All PIDs in `/proc`.
pub fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// State letter (`R`, `S`, `T`, `Z`…) of a process.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Is `pid` a live (existing, non-zombie) process?
pub fn alive(pid: i32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Live processes whose PID namespace is `id`.
pub fn pids_in_pid_ns(id: (u64, u64)) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| ns_id(format!("/proc/{p}/ns/pid")) == Some(id) && alive(*p))
        .collect()
}

/// Live processes whose command line contains `needle`.
pub fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&p| p != me && alive(p))
        .filter(|p| {
            fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}
