//! Helpers for tests that need root and namespaces: a hard root check (never
//! a silent skip), the `tollgate` binary, cleanup guards and `/proc` probes.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
        let status = Command::new(&cargo)
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

/// Removes a sandbox network (namespace and host link) when dropped.
pub struct NetworkGuard(pub NetworkInfo);

impl NetworkGuard {
    /// Guards the network a sandbox with this id on this slot would get.
    pub fn for_sandbox(id: &str, slot: u32) -> Self {
        Self(NetworkInfo {
            netns: tollgate::net::netns_name(id),
            host_if: tollgate::net::host_if_name(slot),
            guest_if: tollgate::net::GUEST_IF.to_owned(),
            gateway: std::net::Ipv4Addr::UNSPECIFIED,
            guest_addr: std::net::Ipv4Addr::UNSPECIFIED,
            prefix_len: tollgate::net::LINK_PREFIX_LEN,
        })
    }
}

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        let info = self.0.clone();
        if let Err(e) = block_on_fresh(async move { tollgate::net::teardown(&info).await }) {
            eprintln!("cleanup: teardown {}: {e}", self.0.netns);
        }
    }
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
