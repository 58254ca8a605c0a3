//! The network-namespace process runtime (`netns` backend).
//!
//! A sandbox is a process tree on the host, confined by Linux namespaces:
//!
//! * **network**: the namespace `/run/netns/tollgate-<id>` that
//!   [`crate::net::setup`] prepared before [`Runtime::start`] (the runtime
//!   never creates or removes network resources); its only way out is `eth0`,
//!   whose peer `tgs0` lives in the sandbox's router namespace. The sandbox
//!   sees its own `lo`, `eth0` and routes, and a fresh `/sys` for them;
//! * **mounts**: a private mount namespace (`/` made `rprivate`) in which every
//!   configured hide path (the daemon's state directory: keys, CA keys,
//!   secrets) and `/run/netns` are covered by an empty read-only tmpfs, with a
//!   private `/tmp`, `/dev/shm`, and a `/proc` of its own; `/run/tollgate`
//!   shows only the sandbox's own files (its CA bundle), read-only;
//! * **pids**: its own PID namespace; the template command is PID 1, so killing
//!   it kills every process of the sandbox;
//! * **uts / ipc**: its own hostname (the sandbox id) and IPC objects;
//! * **credentials**: processes run as the spec's unprivileged uid/gid with no
//!   supplementary groups and `no_new_privs` (setuid binaries do not elevate).
//!
//! This is **not a VM boundary**: the sandbox shares the host kernel and,
//! apart from the paths above, sees the host's filesystem (read with its uid's
//! permissions). It exists for development and fast tests; production
//! isolation comes from the microVM backends. A snapshot taken of a sandbox on
//! this backend records its template, compute shape and policy only, never
//! memory or process state.
//!
//! Process layout: the daemon spawns `tollgate sandbox-enter --netns …`, the
//! *supervisor*. It joins the network namespace, unshares mount/pid/uts/ipc
//! namespaces, hides paths, sets the hostname and forks PID 1, which mounts its
//! `/proc`, drops privileges and execs the template command. The supervisor
//! reports `ready` (or `error: …`) on its stdout once the exec happened, then
//! waits for PID 1 and exits with its status (128+N when killed by signal N),
//! forwarding SIGTERM/SIGINT. The supervisor's PID and start time form the
//! [`RuntimeHandle`]. `exec` spawns `tollgate sandbox-enter --join <pid>`,
//! which enters the supervisor's namespaces and forks the command into the
//! sandbox's PID namespace. The main process's stdout/stderr are discarded;
//! use `exec` to observe a sandbox.
//!
//! Environment: PATH and HOME (`/tmp`, the sandbox's private tmpfs), then the
//! template's environment, then the CA variables (below), then the sandbox's
//! `env_vars`. It is handed to the helper in one JSON variable, never as
//! process arguments, and never becomes the environment of the privileged
//! helper itself. `exec` inherits the environment of PID 1, overlaid with the
//! request's.
//!
//! The sandbox's CA: when the spec carries the sandbox's CA certificate, the
//! runtime writes `<files_dir>/<id>/ca-bundle.crt` (the host's roots, then the
//! sandbox's CA) and `ca.pem` (the CA alone) on the host, and the sandbox sees
//! that directory read-only at [`SANDBOX_FILES_DIR`] (a bind mount over the
//! host's `/run/tollgate`, so no sandbox sees another's files). Every process
//! gets [`CA_ENV_VARS`] pointing at [`SANDBOX_CA_BUNDLE`], so curl, OpenSSL,
//! Python `requests` and Node trust the proxy's intercepted connections. The
//! CA's key never enters the sandbox: it lives in the daemon's state dir,
//! which is hidden.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, killpg, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{AccessFlags, ForkResult, Gid, Pid, Uid};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::{
    ExecOutput, ExecRequest, NetworkInfo, Runtime, RuntimeError, RuntimeHandle, SandboxSpec,
};
use crate::net;

/// Backend name recorded in [`RuntimeHandle::backend`].
pub const BACKEND: &str = "netns";

/// Environment variable carrying the sandbox environment (JSON object) to the
/// `sandbox-enter` helper.
const ENV_VAR: &str = "TOLLGATE_ENTER_ENV";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_HOME: &str = "/tmp";
/// Prefix of the helper's own error messages in exec mode.
const ENTER_ERROR_MARKER: &str = "tollgate-enter:";
/// Exit code of the exec helper when it failed before running the command.
const ENTER_FAILURE_CODE: i32 = 125;
const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const PAUSE_SETTLE: Duration = Duration::from_secs(2);
const EXEC_KILL_GRACE: Duration = Duration::from_secs(2);
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
const OUTPUT_LIMIT: usize = 16 << 20;
const POLL: Duration = Duration::from_millis(20);
const HOSTNAME_MAX: usize = 64;

/// Where a sandbox sees its files from the host (read-only): its CA bundle
/// and CA certificate.
pub const SANDBOX_FILES_DIR: &str = "/run/tollgate";
/// The trust bundle inside the sandbox: the host's roots plus the sandbox's
/// CA.
pub const SANDBOX_CA_BUNDLE: &str = "/run/tollgate/ca-bundle.crt";
/// The sandbox's CA certificate alone, inside the sandbox.
pub const SANDBOX_CA_CERT: &str = "/run/tollgate/ca.pem";
/// File name of the bundle in a sandbox's files directory.
const BUNDLE_FILE: &str = "ca-bundle.crt";
/// File name of the CA certificate in a sandbox's files directory.
const CA_CERT_FILE: &str = "ca.pem";
/// Variables set to [`SANDBOX_CA_BUNDLE`] in every sandbox process: OpenSSL
/// (and Go, Rust native-certs), Python `requests`, Node, curl.
pub const CA_ENV_VARS: [&str; 4] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "CURL_CA_BUNDLE",
];

/// Configuration of the netns runtime.
#[derive(Clone, Debug)]
pub struct NetnsConfig {
    /// Path of the `tollgate` binary, re-executed as `tollgate sandbox-enter`.
    pub exe: PathBuf,
    /// Host paths that must not be visible inside sandboxes (the daemon's state
    /// directory, …); each is covered by an empty read-only tmpfs (files by
    /// `/dev/null`). Paths that do not exist are skipped.
    pub hide_paths: Vec<PathBuf>,
    /// A file bind-mounted read-only over the sandbox's `/etc/resolv.conf`
    /// (pointing at the sandbox's own resolver on its gateway).
    pub resolv_conf: Option<PathBuf>,
    /// Host directory of the files sandboxes may read: `<files_dir>/<id>/`
    /// holds sandbox `id`'s CA bundle and is shown read-only inside it at
    /// [`SANDBOX_FILES_DIR`]. Must not be inside a hidden path. `None`: no
    /// CA is installed in sandboxes.
    pub files_dir: Option<PathBuf>,
    /// The host's roots, the start of every CA bundle
    /// (`/etc/ssl/certs/ca-certificates.crt`; a missing file gives a bundle
    /// with the sandbox's CA only).
    pub system_roots: PathBuf,
}

/// The network-namespace process runtime. See the module documentation for
/// what it isolates and what it does not.
#[derive(Debug)]
pub struct NetnsRuntime {
    config: NetnsConfig,
}

impl NetnsRuntime {
    /// A runtime with this configuration.
    pub fn new(config: NetnsConfig) -> Self {
        Self { config }
    }

    /// The configuration.
    pub fn config(&self) -> &NetnsConfig {
        &self.config
    }
}

// ---------------------------------------------------------------------------
// /proc helpers (daemon side)

#[derive(Clone, Copy, Debug)]
struct ProcStat {
    state: char,
    start: u64,
}

/// State (field 3) and start time (field 22) of `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain anything, including ") "; it ends at the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some(ProcStat { state, start })
}

/// Start time of `pid` (`/proc/<pid>/stat` field 22), if it exists.
pub fn process_start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|s| s.start)
}

/// Is `pid` still the live (non-zombie) process that started at `start`
/// (`/proc/<pid>/stat` field 22)?
pub fn process_alive(pid: i32, start: u64) -> bool {
    pid > 0 && matches!(proc_stat(pid), Some(s) if s.start == start && s.state != 'Z')
}

/// Is the handle's supervisor still the same live (non-zombie) process?
fn supervisor_alive(handle: &RuntimeHandle) -> bool {
    process_alive(handle.pid, handle.pid_start)
}

type NsId = (u64, u64);

fn ns_id(path: &Path) -> Option<NsId> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// Live processes whose namespace of `kind` (`pid`, `net`) is `id`.
fn pids_in_ns(kind: &str, id: NsId) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| ns_id(Path::new(&format!("/proc/{pid}/ns/{kind}"))) == Some(id))
        .filter(|&pid| matches!(proc_stat(pid), Some(s) if s.state != 'Z'))
        .collect()
}

/// The PID namespace of the sandbox (the supervisor's `pid_for_children`).
fn sandbox_pid_ns(handle: &RuntimeHandle) -> Option<NsId> {
    if !supervisor_alive(handle) {
        return None;
    }
    let id = ns_id(Path::new(&format!(
        "/proc/{}/ns/pid_for_children",
        handle.pid
    )))?;
    // Re-check after reading: the PID was not reused in between.
    supervisor_alive(handle).then_some(id)
}

/// Host PID of the sandbox's PID 1.
fn sandbox_init(pidns: NsId) -> Option<i32> {
    pids_in_ns("pid", pidns).into_iter().find(|&pid| {
        fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .and_then(|v| v.split_whitespace().last().map(|x| x == "1"))
            })
            .unwrap_or(false)
    })
}

/// Real uid and gid of `pid`.
fn proc_ids(pid: i32) -> Option<(u32, u32)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let first = |key: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((first("Uid:")?, first("Gid:")?))
}

fn proc_environ(pid: i32) -> BTreeMap<String, String> {
    let Ok(raw) = fs::read(format!("/proc/{pid}/environ")) else {
        return BTreeMap::new();
    };
    raw.split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            let (k, v) = kv.split_once('=')?;
            (!k.is_empty()).then(|| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn validate_env(env: &BTreeMap<String, String>) -> Result<(), RuntimeError> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(RuntimeError::Process(format!(
                "invalid environment variable {k:?}"
            )));
        }
    }
    Ok(())
}

fn env_json(env: &BTreeMap<String, String>) -> Result<String, RuntimeError> {
    validate_env(env)?;
    serde_json::to_string(env).map_err(|e| RuntimeError::Process(format!("encode env: {e}")))
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// `--name=value` as one argument, so a value starting with `-` is never
/// taken for an option.
fn opt(name: &str, value: impl AsRef<std::ffi::OsStr>) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from(name);
    arg.push("=");
    arg.push(value);
    arg
}

fn send(pid: i32, sig: Signal) {
    if pid > 0 {
        // ESRCH (already gone) is fine.
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// SIGKILLs every process of the sandbox (the supervisor of `handle` when
/// known, its PID namespace, and anything inside the sandbox network
/// namespace `netns`) until none is left or the deadline passes.
async fn kill_everything(handle: Option<&RuntimeHandle>, netns: &str) -> Result<(), RuntimeError> {
    let deadline = Instant::now() + STOP_TIMEOUT;
    let netns_id = ns_id(&net::netns_path(netns));
    let pidns = handle.and_then(sandbox_pid_ns);
    loop {
        let mut victims = Vec::new();
        if let Some(h) = handle.filter(|h| supervisor_alive(h)) {
            victims.push(h.pid);
        }
        if let Some(id) = pidns {
            victims.extend(pids_in_ns("pid", id));
        }
        if let Some(id) = netns_id {
            victims.extend(pids_in_ns("net", id));
        }
        victims.sort_unstable();
        victims.dedup();
        if victims.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RuntimeError::Process(format!(
                "processes of sandbox {netns} still alive after SIGKILL: {victims:?}"
            )));
        }
        for &pid in &victims {
            send(pid, Signal::SIGKILL);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Kills the processes of a half-started sandbox if `start` is cancelled (its
/// future dropped) before it succeeded. The network is the caller's.
struct StartGuard {
    armed: Option<RuntimeHandle>,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        let Some(handle) = self.armed.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = kill_everything(Some(&handle), &handle.network.netns).await {
                        tracing::warn!(netns = %handle.network.netns, error = %e, "cleanup of cancelled start failed");
                    }
                });
            }
            Err(_) => send(handle.pid, Signal::SIGKILL),
        }
    }
}

/// Output of a child stream, collected up to [`OUTPUT_LIMIT`] bytes.
struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

fn collect<R: AsyncRead + Unpin + Send + 'static>(stream: Option<R>) -> Collector {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    let task = tokio::spawn(async move {
        let Some(mut stream) = stream else { return };
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut b = sink.lock().unwrap_or_else(|p| p.into_inner());
                    let room = OUTPUT_LIMIT.saturating_sub(b.len());
                    b.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
    });
    Collector { buf, task }
}

impl Collector {
    /// Waits briefly for EOF (a background process may hold the pipe open),
    /// then returns what was read.
    async fn finish(mut self) -> String {
        if tokio::time::timeout(OUTPUT_GRACE, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        let b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&b).into_owned()
    }
}

impl NetnsRuntime {
    fn sandbox_env(spec: &SandboxSpec, with_ca: bool) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_owned(), DEFAULT_PATH.to_owned());
        env.insert("HOME".to_owned(), DEFAULT_HOME.to_owned());
        env.extend(spec.template.env.clone());
        if with_ca {
            for k in CA_ENV_VARS {
                env.insert(k.to_owned(), SANDBOX_CA_BUNDLE.to_owned());
            }
        }
        env.extend(spec.env_vars.clone());
        env
    }

    /// Host directory of sandbox `id`'s files, when the runtime has one.
    fn files_dir_of(&self, id: &str) -> Result<Option<PathBuf>, RuntimeError> {
        let Some(root) = &self.config.files_dir else {
            return Ok(None);
        };
        if !crate::validate::is_path_component(id, usize::MAX) {
            return Err(RuntimeError::Process(format!("invalid sandbox id {id:?}")));
        }
        Ok(Some(root.join(id)))
    }

    /// Writes sandbox `id`'s CA bundle (the host's roots, then `ca_pem`) and
    /// its CA certificate into its files directory, each atomically, so that
    /// a running sandbox sees the old or the new file, never a mix. Returns
    /// the directory (`None`: the runtime has no files directory).
    fn write_ca_files(&self, id: &str, ca_pem: &str) -> Result<Option<PathBuf>, RuntimeError> {
        let Some(dir) = self.files_dir_of(id)? else {
            return Ok(None);
        };
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            RuntimeError::Process(format!("CA bundle of sandbox {id}: {what}: {e}"))
        };
        let roots = match fs::read(&self.config.system_roots) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(
                    path = %self.config.system_roots.display(),
                    "no system CA bundle: sandboxes trust their own CA only"
                );
                Vec::new()
            }
            Err(e) => return Err(fail(&self.config.system_roots.display().to_string(), &e)),
        };
        let bundle = crate::ca::trust_bundle(&roots, ca_pem);
        for d in [self.config.files_dir.as_deref(), Some(dir.as_path())]
            .into_iter()
            .flatten()
        {
            fs::create_dir_all(d).map_err(|e| fail(&d.display().to_string(), &e))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                .map_err(|e| fail(&d.display().to_string(), &e))?;
        }
        crate::ca::write_atomic(&dir, BUNDLE_FILE, &bundle, 0o644)
            .and_then(|()| crate::ca::write_atomic(&dir, CA_CERT_FILE, ca_pem.as_bytes(), 0o644))
            .map_err(|e| fail("write", &e))?;
        Ok(Some(dir))
    }

    /// Removes sandbox `id`'s files directory (idempotent).
    fn remove_files(&self, id: &str) -> Result<(), RuntimeError> {
        let Some(dir) = self.files_dir_of(id)? else {
            return Ok(());
        };
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::Process(format!(
                "remove {}: {e}",
                dir.display()
            ))),
        }
    }

    /// Spawns the supervisor and waits for its `ready`. On failure everything
    /// it started is killed (the network is the caller's).
    async fn spawn_supervisor(
        &self,
        spec: &SandboxSpec,
        network: &NetworkInfo,
        env: &str,
        files: Option<&Path>,
        guard: &mut StartGuard,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let mut hostname = spec.id.clone();
        while hostname.len() > HOSTNAME_MAX {
            hostname.pop();
        }
        let mut cmd = Command::new(&self.config.exe);
        cmd.arg("sandbox-enter")
            .arg(opt("--netns", net::netns_path(&network.netns)))
            .arg(format!("--hostname={hostname}"))
            .arg("--uid")
            .arg(spec.uid.to_string())
            .arg("--gid")
            .arg(spec.uid.to_string());
        for p in &self.config.hide_paths {
            cmd.arg(opt("--hide", p));
        }
        if let Some(r) = &self.config.resolv_conf {
            cmd.arg(opt("--resolv-conf", r));
        }
        if let Some(f) = files {
            cmd.arg(opt("--files-dir", f));
        }
        cmd.arg("--")
            .args(&spec.template.command)
            .env_clear()
            .env(ENV_VAR, env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            RuntimeError::Process(format!("spawn {}: {e}", self.config.exe.display()))
        })?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| RuntimeError::Process("supervisor has no pid".into()))?;
        // Not yet reaped, so the PID cannot have been reused.
        let pid_start = process_start_time(pid).unwrap_or(0);
        let handle = RuntimeHandle {
            backend: BACKEND.to_owned(),
            pid,
            pid_start,
            network: network.clone(),
            dir: None,
        };
        guard.armed = Some(handle.clone());

        let stdout = child.stdout.take();
        let stderr = collect(child.stderr.take());
        let status = tokio::time::timeout(START_TIMEOUT, async move {
            let mut line = String::new();
            if let Some(out) = stdout {
                let mut out = tokio::io::BufReader::new(out);
                out.read_line(&mut line).await.map(|_| line)
            } else {
                Ok(line)
            }
        })
        .await;
        let failure = match status {
            Ok(Ok(line)) if line.trim_end() == "ready" && pid_start != 0 => None,
            Ok(Ok(line)) if line.is_empty() => {
                Some("sandbox process exited during start".to_owned())
            }
            Ok(Ok(line)) => Some(
                line.trim_end()
                    .strip_prefix("error: ")
                    .unwrap_or(line.trim_end())
                    .to_owned(),
            ),
            Ok(Err(e)) => Some(format!("read supervisor status: {e}")),
            Err(_) => Some(format!("not ready after {START_TIMEOUT:?}")),
        };
        if let Some(reason) = failure {
            let _ = child.start_kill();
            let killed = kill_everything(Some(&handle), &handle.network.netns).await;
            let exit = tokio::time::timeout(STOP_TIMEOUT, child.wait()).await;
            let mut detail = stderr.finish().await.trim().to_owned();
            if let Ok(Ok(st)) = exit {
                if !detail.is_empty() {
                    detail.push_str("; ");
                }
                detail.push_str(&format!("supervisor exit status {}", exit_code(st)));
            }
            if let Err(e) = killed {
                tracing::warn!(sandbox = %spec.id, error = %e, "failed start: kill");
            }
            return Err(RuntimeError::Process(format!(
                "sandbox {} failed to start: {reason} ({detail})",
                spec.id
            )));
        }
        // Nothing of interest is written there after `ready`.
        stderr.task.abort();
        // Reap the supervisor when it exits; nothing else waits for it.
        let id = spec.id.clone();
        tokio::spawn(async move {
            match child.wait().await {
                Ok(st) => {
                    tracing::info!(sandbox = %id, pid, code = exit_code(st), "sandbox supervisor exited")
                }
                Err(e) => {
                    tracing::warn!(sandbox = %id, pid, error = %e, "wait for sandbox supervisor")
                }
            }
        });
        Ok(handle)
    }

    /// Sends `sig` to every process of the sandbox's PID namespace, repeating
    /// until no new process shows up. Returns the signalled PIDs.
    fn signal_all(&self, handle: &RuntimeHandle, sig: Signal) -> Result<Vec<i32>, RuntimeError> {
        let pidns = sandbox_pid_ns(handle).ok_or(RuntimeError::NotRunning)?;
        let mut done = HashSet::new();
        for _ in 0..32 {
            let fresh: Vec<i32> = pids_in_ns("pid", pidns)
                .into_iter()
                .filter(|p| !done.contains(p))
                .collect();
            if fresh.is_empty() {
                break;
            }
            for pid in fresh {
                send(pid, sig);
                done.insert(pid);
            }
        }
        Ok(done.into_iter().collect())
    }
}

impl Runtime for NetnsRuntime {
    async fn start(
        &self,
        spec: &SandboxSpec,
        net: &NetworkInfo,
    ) -> Result<RuntimeHandle, RuntimeError> {
        if spec.template.command.is_empty() {
            return Err(RuntimeError::Process("template command is empty".into()));
        }
        if let Some(image) = &spec.image {
            return Err(RuntimeError::Unusable(format!(
                "the snapshot holds the memory of a {} sandbox, which the netns runtime cannot restore",
                image.backend
            )));
        }
        if spec.uid == 0 {
            return Err(RuntimeError::Privilege(
                "sandboxes must run as an unprivileged uid, not 0".into(),
            ));
        }
        if !net::netns_exists(&net.netns) {
            return Err(RuntimeError::Network(format!(
                "network namespace {} does not exist (net::setup first)",
                net.netns
            )));
        }
        let files = match &spec.ca_pem {
            Some(pem) => self.write_ca_files(&spec.id, pem)?,
            None => None,
        };
        let env = env_json(&Self::sandbox_env(spec, files.is_some()))?;
        // Armed once the supervisor exists and until the start succeeded or
        // was rolled back, so that a cancelled start (future dropped) is
        // cleaned up too.
        let mut guard = StartGuard { armed: None };
        let result = self
            .spawn_supervisor(spec, net, &env, files.as_deref(), &mut guard)
            .await;
        guard.armed = None;
        if result.is_err() && files.is_some() {
            if let Err(e) = self.remove_files(&spec.id) {
                tracing::warn!(sandbox = %spec.id, error = %e, "failed start: remove CA bundle");
            }
        }
        result
    }

    async fn pause(&self, handle: &RuntimeHandle) -> Result<(), RuntimeError> {
        let pids = self.signal_all(handle, Signal::SIGSTOP)?;
        // SIGSTOP is asynchronous: return once every process is stopped.
        let deadline = Instant::now() + PAUSE_SETTLE;
        while Instant::now() < deadline {
            let running = pids.iter().any(
                |&p| matches!(proc_stat(p), Some(s) if !matches!(s.state, 'T' | 't' | 'Z' | 'X')),
            );
            if !running {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
        tracing::warn!(netns = %handle.network.netns, "pause: some processes did not stop in time");
        Ok(())
    }

    async fn resume(&self, handle: &RuntimeHandle) -> Result<(), RuntimeError> {
        self.signal_all(handle, Signal::SIGCONT).map(|_| ())
    }

    async fn stop(&self, handle: &RuntimeHandle) -> Result<(), RuntimeError> {
        kill_everything(Some(handle), &handle.network.netns).await?;
        match handle.network.netns.strip_prefix(net::SANDBOX_NETNS_PREFIX) {
            Some(id) => self.remove_files(id),
            None => Ok(()),
        }
    }

    async fn release(&self, id: &str, _slot: u32) -> Result<(), RuntimeError> {
        // Everything of the sandbox runs in its network namespace, found by id.
        kill_everything(None, &net::netns_name(id)).await?;
        self.remove_files(id)
    }

    async fn prepare(&self, _spec: &SandboxSpec) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn snapshot(
        &self,
        _handle: &RuntimeHandle,
        _dir: &Path,
    ) -> Result<Option<super::MemoryImage>, RuntimeError> {
        // Processes on the host: no memory state is kept.
        Ok(None)
    }

    async fn install_ca(
        &self,
        id: &str,
        _handle: &RuntimeHandle,
        ca_pem: &str,
    ) -> Result<(), RuntimeError> {
        // The sandbox's mount namespace holds a bind mount of its files
        // directory: a file renamed into it is what the sandbox reads next.
        self.write_ca_files(id, ca_pem).map(|_| ())
    }

    async fn exec(
        &self,
        handle: &RuntimeHandle,
        req: ExecRequest,
    ) -> Result<ExecOutput, RuntimeError> {
        if req.argv.is_empty() {
            return Err(RuntimeError::Process("exec: empty argv".into()));
        }
        let pidns = sandbox_pid_ns(handle).ok_or(RuntimeError::NotRunning)?;
        let init = sandbox_init(pidns).ok_or(RuntimeError::NotRunning)?;
        let (uid, gid) = proc_ids(init).ok_or(RuntimeError::NotRunning)?;
        if uid == 0 {
            return Err(RuntimeError::Privilege(
                "sandbox PID 1 runs as root; refusing to exec".into(),
            ));
        }
        let mut env = proc_environ(init);
        env.extend(req.env);
        let env = env_json(&env)?;
        let cwd = req.cwd.unwrap_or_else(|| PathBuf::from("/"));

        let mut cmd = Command::new(&self.config.exe);
        cmd.arg("sandbox-enter")
            .arg("--join")
            .arg(handle.pid.to_string())
            .arg("--join-start")
            .arg(handle.pid_start.to_string())
            .arg("--uid")
            .arg(uid.to_string())
            .arg("--gid")
            .arg(gid.to_string())
            .arg(opt("--cwd", &cwd))
            .arg("--")
            .args(&req.argv)
            .env_clear()
            .env(ENV_VAR, env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            RuntimeError::Process(format!("spawn {}: {e}", self.config.exe.display()))
        })?;
        let out = collect(child.stdout.take());
        let err = collect(child.stderr.take());
        let wait_err = |e: io::Error| RuntimeError::Process(format!("wait for exec helper: {e}"));
        let (status, timed_out) = match tokio::time::timeout(req.timeout, child.wait()).await {
            Ok(st) => (st.map_err(wait_err)?, false),
            Err(_) => {
                // The helper answers SIGTERM by SIGKILLing the command's
                // whole process group; SIGKILL it if it does not exit.
                if let Some(id) = child.id().and_then(|p| i32::try_from(p).ok()) {
                    send(id, Signal::SIGTERM);
                }
                let st = match tokio::time::timeout(EXEC_KILL_GRACE, child.wait()).await {
                    Ok(st) => st.map_err(wait_err)?,
                    Err(_) => {
                        let _ = child.start_kill();
                        child.wait().await.map_err(wait_err)?
                    }
                };
                (st, true)
            }
        };
        let stdout = out.finish().await;
        let stderr = err.finish().await;
        let code = exit_code(status);
        if timed_out {
            return Ok(ExecOutput {
                exit_code: 124,
                stdout,
                stderr,
            });
        }
        if code == ENTER_FAILURE_CODE {
            if let Some(msg) = stderr
                .lines()
                .find_map(|l| l.strip_prefix(ENTER_ERROR_MARKER))
            {
                return Err(RuntimeError::Process(format!("exec: {}", msg.trim())));
            }
        }
        Ok(ExecOutput {
            exit_code: code,
            stdout,
            stderr,
        })
    }

    fn is_alive(&self, handle: &RuntimeHandle) -> bool {
        handle.backend == BACKEND
            && supervisor_alive(handle)
            && net::netns_exists(&handle.network.netns)
    }
}

// ---------------------------------------------------------------------------
// `tollgate sandbox-enter` (runs single-threaded, before any async runtime)

/// Arguments of the hidden `tollgate sandbox-enter` subcommand.
///
/// Start mode (`--netns`): become the supervisor of a new sandbox. Exec mode
/// (`--join`): run a command inside a running sandbox. The command's
/// environment comes from the `TOLLGATE_ENTER_ENV` variable (a JSON object),
/// not from the helper's own environment.
#[derive(Debug, clap::Args)]
pub struct EnterArgs {
    /// Start mode: network namespace file to join (`/run/netns/<name>`).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "join",
        required_unless_present = "join"
    )]
    pub netns: Option<PathBuf>,
    /// Exec mode: host PID of the sandbox supervisor whose namespaces to join.
    #[arg(long, value_name = "PID")]
    pub join: Option<i32>,
    /// Exec mode: start time (`/proc/PID/stat` field 22) the joined PID must have.
    #[arg(long, value_name = "TICKS", requires = "join")]
    pub join_start: Option<u64>,
    /// Start mode: hostname of the sandbox.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Unprivileged uid the command runs as.
    #[arg(long)]
    pub uid: u32,
    /// Gid the command runs as.
    #[arg(long)]
    pub gid: u32,
    /// Start mode: path to cover with an empty read-only tmpfs (repeatable).
    #[arg(long = "hide", value_name = "PATH")]
    pub hide: Vec<PathBuf>,
    /// Start mode: file bind-mounted read-only over `/etc/resolv.conf`.
    #[arg(long = "resolv-conf", value_name = "FILE")]
    pub resolv_conf: Option<PathBuf>,
    /// Start mode: host directory of the sandbox's files (its CA bundle),
    /// bind-mounted read-only over [`SANDBOX_FILES_DIR`].
    #[arg(long = "files-dir", value_name = "DIR")]
    pub files_dir: Option<PathBuf>,
    /// Working directory of the command.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub cwd: PathBuf,
    /// Command to run.
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

/// Entry point of `tollgate sandbox-enter`; runs before any async runtime
/// starts. Does not return on success: exits with the command's status.
pub fn enter_main(args: EnterArgs) -> anyhow::Result<()> {
    if args.join.is_some() {
        match exec_into(&args) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("{ENTER_ERROR_MARKER} {e:#}");
                std::process::exit(ENTER_FAILURE_CODE)
            }
        }
    } else {
        match supervise_sandbox(&args) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                // The daemon reads this status line.
                let mut out = io::stdout();
                let _ = writeln!(out, "error: {}", one_line(&format!("{e:#}")));
                let _ = out.flush();
                std::process::exit(1)
            }
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The command's environment and argv, ready for execve.
struct Prepared {
    argv: Vec<CString>,
    env: Vec<CString>,
    path: Option<String>,
}

fn prepare(args: &EnterArgs) -> anyhow::Result<Prepared> {
    let raw = std::env::var(ENV_VAR).unwrap_or_else(|_| "{}".to_owned());
    let map: BTreeMap<String, String> =
        serde_json::from_str(&raw).with_context(|| format!("parse {ENV_VAR}"))?;
    let mut env = Vec::with_capacity(map.len());
    for (k, v) in &map {
        anyhow::ensure!(
            !k.is_empty() && !k.contains('='),
            "invalid variable name {k:?}"
        );
        env.push(CString::new(format!("{k}={v}")).with_context(|| format!("variable {k}"))?);
    }
    let argv = args
        .argv
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .context("argv contains NUL")?;
    anyhow::ensure!(!argv.is_empty(), "empty command");
    Ok(Prepared {
        argv,
        env,
        path: map.get("PATH").cloned(),
    })
}

fn ensure_single_threaded() -> anyhow::Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .map(str::trim);
    anyhow::ensure!(
        threads == Some("1"),
        "sandbox-enter must be single-threaded"
    );
    Ok(())
}

/// Signals the helper handles synchronously (blocked, then `sigwait`ed).
fn forwarded_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGCHLD);
    set
}

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: Option<&str>) -> anyhow::Result<()> {
    mount(Some(fstype), target, Some(fstype), flags, data)
        .with_context(|| format!("mount {fstype} on {target}"))
}

/// Bind-mounts `src` read-only over `dst` (inside the sandbox's private
/// mount namespace).
fn bind_read_only(src: &Path, dst: &Path) -> anyhow::Result<()> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("bind {} on {}", src.display(), dst.display()))?;
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .with_context(|| format!("remount {} read-only", dst.display()))?;
    Ok(())
}

/// Covers `path` with an empty read-only tmpfs (a file: with `/dev/null`).
fn hide_path(path: &Path) -> anyhow::Result<()> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    };
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if meta.is_dir() {
        mount(
            Some("tollgate-hidden"),
            path,
            Some("tmpfs"),
            ro,
            Some("size=4k,nr_inodes=1,mode=0555"),
        )
        .with_context(|| format!("hide {}", path.display()))
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .and_then(|()| {
            mount(
                None::<&str>,
                path,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | ro,
                None::<&str>,
            )
        })
        .with_context(|| format!("hide {}", path.display()))
    }
}

fn redirect_stdio_to_null(fds: &[i32]) -> anyhow::Result<()> {
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("open /dev/null")?;
    for &fd in fds {
        nix::unistd::dup2(null.as_raw_fd(), fd).with_context(|| format!("dup2 onto fd {fd}"))?;
    }
    Ok(())
}

/// Looks `prog` up like execvp does, in the command's PATH.
fn resolve(prog: &CStr, path: Option<&str>) -> Result<CString, Errno> {
    let bytes = prog.to_bytes();
    if bytes.contains(&b'/') {
        return Ok(prog.to_owned());
    }
    let mut last = Errno::ENOENT;
    for dir in path.unwrap_or(DEFAULT_PATH).split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let mut cand = dir.as_bytes().to_vec();
        cand.push(b'/');
        cand.extend_from_slice(bytes);
        let Ok(cand) = CString::new(cand) else {
            continue;
        };
        match nix::unistd::access(cand.as_c_str(), AccessFlags::X_OK) {
            Ok(()) if !Path::new(OsStr::from_bytes(cand.as_bytes())).is_dir() => return Ok(cand),
            Ok(()) => {}
            Err(Errno::EACCES) => last = Errno::EACCES,
            Err(_) => {}
        }
    }
    Err(last)
}

/// Why the command could not be started: (exit code, message).
type ChildFailure = (i32, String);

fn setup_failure(e: anyhow::Error) -> ChildFailure {
    (ENTER_FAILURE_CODE, format!("{e:#}"))
}

/// Drops privileges, changes directory and execs. Returns only on failure.
fn drop_privileges_and_exec(
    uid: u32,
    gid: u32,
    cwd: &Path,
    cmd: &Prepared,
    mask: &SigSet,
) -> ChildFailure {
    let setup = (|| -> anyhow::Result<()> {
        anyhow::ensure!(uid != 0, "refusing to run as uid 0");
        nix::unistd::setgroups(&[]).context("setgroups")?;
        let g = Gid::from_raw(gid);
        nix::unistd::setresgid(g, g, g).context("setgid")?;
        let u = Uid::from_raw(uid);
        nix::unistd::setresuid(u, u, u).context("setuid")?;
        nix::sys::prctl::set_no_new_privs().context("no_new_privs")?;
        nix::unistd::chdir(cwd).with_context(|| format!("chdir {}", cwd.display()))?;
        sys::default_sigpipe().context("reset SIGPIPE")?;
        Ok(())
    })();
    if let Err(e) = setup {
        return setup_failure(e);
    }
    let name = cmd.argv[0].to_string_lossy().into_owned();
    let prog = match resolve(&cmd.argv[0], cmd.path.as_deref()) {
        Ok(p) => p,
        Err(Errno::ENOENT) => return (127, format!("{name}: command not found")),
        Err(e) => return (126, format!("{name}: {}", e.desc())),
    };
    if let Err(e) = mask.thread_set_mask() {
        return setup_failure(anyhow::anyhow!("restore signal mask: {e}"));
    }
    let err = match nix::unistd::execve(&prog, &cmd.argv, &cmd.env) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let code = if err == Errno::ENOENT { 127 } else { 126 };
    (code, format!("{name}: {}", err.desc()))
}

/// Waits for `child`, forwarding SIGTERM/SIGINT (as SIGKILL to its process
/// group when `kill_group`), and returns its exit code (128+N on signal N).
fn wait_forwarding(child: Pid, kill_group: bool) -> anyhow::Result<i32> {
    let set = forwarded_signals();
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e).context("waitpid"),
        }
        if let sig @ (Signal::SIGTERM | Signal::SIGINT) = set.wait().context("sigwait")? {
            if kill_group {
                let _ = killpg(child, Signal::SIGKILL);
                let _ = kill(child, Signal::SIGKILL);
            } else {
                let _ = kill(child, sig);
            }
        }
    }
}

/// Start mode: the supervisor. Returns the exit code of the sandbox's PID 1.
fn supervise_sandbox(args: &EnterArgs) -> anyhow::Result<i32> {
    ensure_single_threaded()?;
    let netns = args.netns.as_ref().context("--netns is required")?;
    let cmd = prepare(args)?;
    nix::unistd::setsid().context("setsid")?;
    let ns = fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {}", netns.display()))?;
    drop(ns);
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC,
    )
    .context("unshare")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make / rprivate")?;
    // Binds first, hides after: a source below a hidden path stays
    // reachable. resolv.conf before the files directory, which covers
    // `/run/tollgate` (where the daemon keeps resolv.conf).
    if let Some(r) = &args.resolv_conf {
        bind_read_only(r, Path::new("/etc/resolv.conf"))?;
    }
    if let Some(dir) = &args.files_dir {
        let target = Path::new(SANDBOX_FILES_DIR);
        fs::create_dir_all(target).with_context(|| format!("create {}", target.display()))?;
        bind_read_only(dir, target)?;
    }
    for p in &args.hide {
        hide_path(p)?;
    }
    hide_path(Path::new(net::NETNS_DIR))?;
    if let Some(h) = &args.hostname {
        nix::unistd::sethostname(h).context("sethostname")?;
    }
    let (status_r, status_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("pipe")?;
    let old_mask = forwarded_signals()
        .thread_swap_mask(SigmaskHow::SIG_BLOCK)
        .context("block signals")?;

    match sys::fork().context("fork")? {
        ForkResult::Child => {
            drop(status_r);
            let (code, msg) = sandbox_init_child(args, &cmd, &old_mask);
            let mut w = fs::File::from(status_w);
            let _ = w.write_all(one_line(&msg).as_bytes());
            drop(w);
            std::process::exit(code)
        }
        ForkResult::Parent { child } => {
            drop(status_w);
            let mut msg = String::new();
            let _ = fs::File::from(status_r).read_to_string(&mut msg);
            {
                let mut out = io::stdout().lock();
                if msg.is_empty() {
                    let _ = writeln!(out, "ready");
                } else {
                    let _ = writeln!(out, "error: {msg}");
                }
                let _ = out.flush();
            }
            // Nothing reads our stdout/stderr after the status line.
            redirect_stdio_to_null(&[1, 2])?;
            wait_forwarding(child, false)
        }
    }
}

/// PID 1 of the sandbox: fresh /proc, /sys, /tmp, /dev/shm, then the command.
fn sandbox_init_child(args: &EnterArgs, cmd: &Prepared, mask: &SigSet) -> ChildFailure {
    let setup = (|| -> anyhow::Result<()> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("PR_SET_PDEATHSIG")?;
        let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount_fs("proc", "/proc", nodev | MsFlags::MS_NOEXEC, None)?;
        mount_fs(
            "sysfs",
            "/sys",
            nodev | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
            None,
        )?;
        mount_fs("tmpfs", "/tmp", nodev, Some("mode=1777"))?;
        if Path::new("/dev/shm").is_dir() {
            mount_fs("tmpfs", "/dev/shm", nodev, Some("mode=1777"))?;
        }
        redirect_stdio_to_null(&[0, 1, 2])?;
        Ok(())
    })();
    if let Err(e) = setup {
        return setup_failure(e);
    }
    drop_privileges_and_exec(args.uid, args.gid, &args.cwd, cmd, mask)
}

/// Exec mode: joins the supervisor's namespaces and runs the command in the
/// sandbox's PID namespace. Returns the command's exit code.
fn exec_into(args: &EnterArgs) -> anyhow::Result<i32> {
    ensure_single_threaded()?;
    let pid = args.join.context("--join is required")?;
    let cmd = prepare(args)?;
    // Open everything first: after joining the mount namespace, /proc is the
    // sandbox's.
    let open = |name: &str| {
        let p = format!("/proc/{pid}/ns/{name}");
        fs::File::open(&p).with_context(|| format!("open {p}"))
    };
    let pid_ns = open("pid_for_children")?;
    let net_ns = open("net")?;
    let uts_ns = open("uts")?;
    let ipc_ns = open("ipc")?;
    let mnt_ns = open("mnt")?;
    if let Some(start) = args.join_start {
        anyhow::ensure!(
            process_start_time(pid) == Some(start),
            "sandbox supervisor {pid} is gone"
        );
    }
    setns(&pid_ns, CloneFlags::CLONE_NEWPID).context("setns pid")?;
    setns(&net_ns, CloneFlags::CLONE_NEWNET).context("setns net")?;
    setns(&uts_ns, CloneFlags::CLONE_NEWUTS).context("setns uts")?;
    setns(&ipc_ns, CloneFlags::CLONE_NEWIPC).context("setns ipc")?;
    setns(&mnt_ns, CloneFlags::CLONE_NEWNS).context("setns mnt")?;
    drop((pid_ns, net_ns, uts_ns, ipc_ns, mnt_ns));
    let old_mask = forwarded_signals()
        .thread_swap_mask(SigmaskHow::SIG_BLOCK)
        .context("block signals")?;
    match sys::fork().context("fork into the sandbox")? {
        ForkResult::Child => {
            let (code, msg) = (|| {
                if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
                    return setup_failure(anyhow::anyhow!("PR_SET_PDEATHSIG: {e}"));
                }
                // Own process group, so a timeout kills everything it started.
                if let Err(e) = nix::unistd::setsid() {
                    return setup_failure(anyhow::anyhow!("setsid: {e}"));
                }
                drop_privileges_and_exec(args.uid, args.gid, &args.cwd, &cmd, &old_mask)
            })();
            if code == ENTER_FAILURE_CODE {
                eprintln!("{ENTER_ERROR_MARKER} {msg}");
            } else {
                eprintln!("tollgate: {msg}");
            }
            std::process::exit(code)
        }
        ForkResult::Parent { child } => wait_forwarding(child, true),
    }
}

/// The only `unsafe` of the runtime.
mod sys {
    #![allow(unsafe_code)]

    use nix::sys::signal::{signal, SigHandler, Signal};
    use nix::unistd::ForkResult;

    /// `fork(2)` for the `sandbox-enter` helper.
    pub(super) fn fork() -> nix::Result<ForkResult> {
        // SAFETY: only called from `sandbox-enter`, which checked it is
        // single-threaded (`ensure_single_threaded`) before any fork: no other
        // thread can hold a lock (allocator, stdio) the child would inherit
        // locked, so the child may allocate and use std before it execs or
        // exits.
        unsafe { nix::unistd::fork() }
    }

    /// Restores the default SIGPIPE disposition (Rust's runtime ignores it,
    /// and ignored signals survive execve) before running a sandbox command.
    pub(super) fn default_sigpipe() -> nix::Result<()> {
        // SAFETY: installs SIG_DFL, no handler code; the process is
        // single-threaded and about to execve.
        unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.map(|_| ())
    }
}
