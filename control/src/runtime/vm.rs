//! The QEMU microVM runtime (`vm` backend).
//!
//! A sandbox is a `qemu-system-x86_64 -M microvm` process: a stock Debian
//! kernel, an initramfs the project builds (busybox and the guest agent), a
//! userspace virtio-net NIC on a tap (`vhost=off`) and a virtio-serial port
//! for the agent. Every sandbox is a **restore** of a memory snapshot:
//!
//! * **RAM** lives in a file-backed memory backend. A VM that will be
//!   snapshotted as a whole (a template's cold boot) maps its RAM file
//!   shared; a restored clone maps the snapshot's RAM file **private**
//!   (`share=off`), so N clones of one snapshot share its page cache and
//!   only the pages a clone writes become its own.
//! * **Device state** is a QEMU migration stream (tens of KiB) taken with
//!   `x-ignore-shared`: the shared RAM block stays out of it.
//! * A **template** (`system/debian:bookworm`) is cold-booted once per
//!   machine shape (vCPUs, memory), its main process started by the agent,
//!   and snapshotted into the template cache; `POST /v1/sandbox` restores it.
//! * **Snapshotting a clone**: its RAM is a private mapping, which
//!   `x-ignore-shared` cannot leave out, so the clone is stopped and
//!   migrated (RAM included) into a *materializer*, a paused QEMU whose RAM
//!   is a new shared file in the snapshot's directory; the materializer then
//!   writes the device state with `x-ignore-shared` and quits. The clone
//!   carries on as it was.
//!
//! Network: QEMU starts while the daemon builds the sandbox's network
//! ([`Runtime::prepare`]), waiting for its memory image with a tap of its own
//! in the daemon's namespace (`tgv<slot>`); [`crate::net::prepare_vm_wire`]
//! removes the sandbox namespace's own addresses and makes a bridge of it,
//! and [`crate::net::adopt_vm_tap`] moves the tap in and onto the bridge, so the guest kernel holds
//! `10.0.2.15` and its frames reach the router's `tgs0` (eBPF, nftables, the
//! proxy) exactly as a netns sandbox's do. Every clone keeps the guest
//! address of its snapshot; the router NATs it.
//!
//! After every restore the host sends the agent the clone's own config
//! (sandbox id, environment, CA bundle, resolver, the host's clock); the
//! agent replaces the previous clone's and flushes the neighbour caches.
//!
//! QEMU runs in its own process group, so a daemon that dies (or is told to
//! stop) leaves it running; the handle (PID and start time, the run
//! directory with the QMP and agent sockets) lets a restarted daemon
//! re-adopt it. QEMU's stderr goes to `qemu.log` and the guest console to
//! `console.log`, both in the run directory.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::netns::{process_alive, process_start_time};
use super::{
    ExecOutput, ExecRequest, MemoryImage, NetworkInfo, Runtime, RuntimeError, RuntimeHandle,
    SandboxSpec,
};
use crate::net;

pub mod agent;
pub mod qmp;

use agent::{AgentConn, Channels};
use qmp::Qmp;

/// Backend name recorded in [`RuntimeHandle::backend`] and [`MemoryImage::backend`].
pub const BACKEND: &str = "vm";
/// The guest's MAC address (the same in every clone: it is in the snapshot).
pub const GUEST_MAC: &str = "52:54:00:74:67:15";
/// Where the guest sees its CA bundle (set in every exec's environment).
pub const GUEST_CA_BUNDLE: &str = "/run/tollgate/ca-bundle.crt";

/// File names inside an image directory and a run directory.
const RAM_FILE: &str = "ram";
const STATE_FILE: &str = "state";
const IMAGE_META: &str = "image.json";
const QMP_SOCK: &str = "qmp.sock";
const AGENT_SOCK: &str = "agent.sock";
const MIGRATE_SOCK: &str = "migrate.sock";
const PID_FILE: &str = "qemu.pid";
const QEMU_LOG: &str = "qemu.log";
const CONSOLE_LOG: &str = "console.log";
const CONFIG_FILE: &str = "config.json";
/// The materializer's tap (in the clone's namespace, on no bridge).
const MATERIALIZER_TAP: &str = "tap1";
/// First bytes of a QEMU migration stream.
const STREAM_MAGIC: &[u8; 4] = b"QEVM";
/// Longest unix socket path (sun_path holds 108 bytes with the NUL).
const SOCKET_PATH_MAX: usize = 107;

const QMP_WAIT: Duration = Duration::from_secs(10);
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);
const AGENT_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(5);

/// Which accelerator QEMU uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation (`/dev/kvm`), `-cpu host`.
    Kvm,
    /// Software emulation, `-cpu max`.
    Tcg,
}

impl Accel {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Picks the accelerator for the setting `auto` / `kvm` / `tcg` and says why.
/// `auto` takes KVM only when `/dev/kvm` can be opened and is not the
/// paravirtual PVM device (`/sys/module/kvm_pvm`), which cannot boot stock
/// kernels.
pub fn choose_accel(setting: &str) -> Result<(Accel, String), String> {
    match setting {
        "tcg" => Ok((Accel::Tcg, "configured: tcg".into())),
        "kvm" => {
            if Path::new("/dev/kvm").exists() {
                Ok((Accel::Kvm, "configured: kvm".into()))
            } else {
                Err("vm.accel = \"kvm\" but /dev/kvm does not exist".into())
            }
        }
        "auto" => {
            if Path::new("/sys/module/kvm_pvm").exists() {
                return Ok((
                    Accel::Tcg,
                    "/dev/kvm is the paravirtual PVM device (kvm_pvm is loaded), which cannot \
                     boot stock kernels: using TCG"
                        .into(),
                ));
            }
            match fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
            {
                Ok(_) => Ok((Accel::Kvm, "/dev/kvm is usable".into())),
                Err(e) => Ok((
                    Accel::Tcg,
                    format!("/dev/kvm cannot be opened ({e}): using TCG"),
                )),
            }
        }
        other => Err(format!(
            "vm.accel must be \"auto\", \"kvm\" or \"tcg\", not {other:?}"
        )),
    }
}

/// Configuration of the VM runtime.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The guest kernel (bzImage).
    pub kernel: PathBuf,
    /// The guest initramfs (busybox + agent).
    pub initramfs: PathBuf,
    /// The accelerator.
    pub accel: Accel,
    /// TCG translation cache size in MiB (`None`: QEMU's default).
    pub tb_size_mib: Option<u32>,
    /// Parent of the per-sandbox run directories (sockets, logs).
    pub run_dir: PathBuf,
    /// Where template images (cold boot + snapshot) are cached.
    pub template_dir: PathBuf,
    /// The host's roots, the start of every CA bundle.
    pub system_roots: PathBuf,
    /// The guest's `/etc/resolv.conf`.
    pub resolv_conf: String,
}

impl VmConfig {
    /// Is everything the runtime needs installed? `Err` says what is missing
    /// and how to get it.
    pub fn check_installed(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        for (what, p) in [
            ("QEMU", &self.qemu),
            ("guest kernel", &self.kernel),
            ("guest initramfs", &self.initramfs),
        ] {
            if !p.is_file() {
                missing.push(format!("{what} {}", p.display()));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "missing {} (./scripts/deps installs QEMU and builds the guest)",
                missing.join(", ")
            ))
        }
    }
}

/// The QEMU microVM runtime. See the module documentation.
pub struct VmRuntime {
    config: VmConfig,
    /// Identifies the guest build: part of every template image's key.
    guest_id: String,
    agents: Channels,
    /// The image holds the same roots as [`VmConfig::system_roots`] (its
    /// `manifest.json` says so): the guest builds the CA bundle itself.
    roots_in_image: bool,
    /// What a restore passes as `-kernel` (and no `-initrd`): the kernel's
    /// setup header alone (see [`restore_kernel`]), or the whole kernel.
    restore_kernel: (PathBuf, bool),
    /// QEMU processes started by [`Runtime::prepare`], by sandbox id, until
    /// [`Runtime::start`] takes them (or [`Runtime::release`] kills them).
    prepared: std::sync::Mutex<std::collections::HashMap<String, Prepared>>,
    /// One cold boot at a time (a template image is built once).
    cold_boot: tokio::sync::Mutex<()>,
}

/// What the daemon last told a VM's agent (kept in the run directory so a
/// restarted daemon can send it again with a new CA).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct GuestConfig {
    sandbox_id: String,
    env: BTreeMap<String, String>,
    ca_pem: Option<String>,
}

/// A QEMU waiting (`-incoming defer`) for the memory image of a sandbox
/// whose network is still being built.
struct Prepared {
    q: Qemu,
    image: MemoryImage,
    /// Its tap, in the daemon's namespace until the network exists.
    tap: String,
    t0: Instant,
    /// The tap is on the sandbox's wire already ([`Runtime::connect`]).
    wired: bool,
}

/// How one QEMU process is to be started.
struct Machine<'a> {
    vcpu: u32,
    memory_mib: u32,
    /// The RAM file.
    ram: &'a Path,
    /// Map it shared (`true`: writes go to the file) or private.
    share: bool,
    /// Directory of the sockets and logs.
    run: &'a Path,
    /// Attach a tap of this name (created by QEMU in its network namespace).
    tap: Option<&'a str>,
    /// Wait for an incoming migration (`-incoming defer`).
    incoming: bool,
    /// Stay paused after loading (`-S`).
    paused: bool,
    /// Give the agent port a socket (else a null chardev).
    agent: bool,
}

/// A started QEMU process.
#[derive(Clone, Copy, Debug)]
struct Qemu {
    pid: i32,
    start: u64,
}

impl VmRuntime {
    /// A runtime with this configuration; hashes the guest kernel and
    /// initramfs (template images are keyed by them).
    pub fn new(config: VmConfig) -> Result<Self, RuntimeError> {
        config.check_installed().map_err(RuntimeError::Unusable)?;
        let mut h = Sha256::new();
        for p in [&config.kernel, &config.initramfs] {
            let bytes = fs::read(p)
                .map_err(|e| RuntimeError::Process(format!("read {}: {e}", p.display())))?;
            h.update(Sha256::digest(&bytes));
        }
        h.update(config.accel.as_str());
        let guest_id = hex(&h.finalize()[..8]);
        for d in [&config.run_dir, &config.template_dir] {
            fs::create_dir_all(d)
                .map_err(|e| RuntimeError::Process(format!("create {}: {e}", d.display())))?;
        }
        let roots_in_image = image_has_roots(&config);
        let restore_kernel = restore_kernel(&config)?;
        tracing::info!(roots_in_image, "guest image");
        Ok(Self {
            config,
            guest_id,
            roots_in_image,
            restore_kernel,
            prepared: std::sync::Mutex::default(),
            agents: Channels::default(),
            cold_boot: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    fn run_dir_of(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        if !crate::validate::is_path_component(id, 100) {
            return Err(RuntimeError::Process(format!("invalid sandbox id {id:?}")));
        }
        Ok(self.config.run_dir.join(id))
    }

    /// The kernel command line: quiet console on the serial port, the guest
    /// network from the address plan's constants (the same in every clone).
    fn cmdline(&self) -> String {
        // Under TCG the guest's PIT-based TSC calibration fails when the
        // emulation runs slowly (a loaded host, a small translation cache)
        // and the boot then hangs: the host's TSC rate is given instead.
        let tsc = match (self.config.accel, host_tsc_khz()) {
            (Accel::Tcg, Some(khz)) => format!(" tsc=reliable tsc_early_khz={khz}"),
            _ => String::new(),
        };
        format!(
            "console=ttyS0 quiet panic=-1{tsc} tollgate.ip={}/{} tollgate.gw={} tollgate.ip6={}/{} tollgate.gw6={}",
            net::GUEST_V4,
            net::GUEST_PREFIX_V4,
            net::GATEWAY_V4,
            net::GUEST_V6,
            net::GUEST_PREFIX_V6,
            net::GATEWAY_V6
        )
    }

    /// QEMU's arguments for `m`. Everything that shapes the guest's devices
    /// is the same for a cold boot, a materializer and a restore, so that
    /// their migration streams fit each other.
    fn args(&self, m: &Machine<'_>) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: String| a.push(OsString::from(s));
        push("-M".into());
        push("microvm,acpi=on".into());
        push("-accel".into());
        push(match (self.config.accel, self.config.tb_size_mib) {
            (Accel::Tcg, Some(tb)) => format!("tcg,tb-size={tb}"),
            (accel, _) => accel.as_str().to_owned(),
        });
        push("-cpu".into());
        push(match self.config.accel {
            Accel::Kvm => "host".into(),
            Accel::Tcg => "max".into(),
        });
        push("-smp".into());
        push(m.vcpu.to_string());
        push("-m".into());
        push(format!("{}M", m.memory_mib));
        push("-object".into());
        push(format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
            m.memory_mib,
            m.ram.display(),
            if m.share { "on" } else { "off" }
        ));
        push("-machine".into());
        push("memory-backend=mem".into());
        for s in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ] {
            push(s.into());
        }
        // A restore's guest is past its boot: QEMU needs the kernel only for
        // the boot ROM it adds (which the stream expects), not its bytes.
        let (kernel, stub) = &self.restore_kernel;
        if m.incoming && *stub {
            push("-kernel".into());
            push(kernel.display().to_string());
        } else {
            push("-kernel".into());
            push(self.config.kernel.display().to_string());
            push("-initrd".into());
            push(self.config.initramfs.display().to_string());
        }
        push("-append".into());
        push(self.cmdline());
        push("-chardev".into());
        push(if m.agent {
            format!("file,id=con,path={}", m.run.join(CONSOLE_LOG).display())
        } else {
            "null,id=con".into()
        });
        push("-serial".into());
        push("chardev:con".into());
        push("-device".into());
        push("virtio-serial-device".into());
        push("-chardev".into());
        push(if m.agent {
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                m.run.join(AGENT_SOCK).display()
            )
        } else {
            "null,id=agent".into()
        });
        push("-device".into());
        push(format!(
            "virtserialport,chardev=agent,name={}",
            agent::PORT_NAME
        ));
        if let Some(tap) = m.tap {
            push("-netdev".into());
            push(format!(
                "tap,id=net0,ifname={tap},script=no,downscript=no,vhost=off"
            ));
            push("-device".into());
            push(format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}"));
        } else {
            push("-device".into());
            push(format!("virtio-net-device,mac={GUEST_MAC}"));
        }
        push("-qmp".into());
        push(format!(
            "unix:{},server=on,wait=off",
            m.run.join(QMP_SOCK).display()
        ));
        if m.incoming {
            push("-incoming".into());
            push("defer".into());
        }
        if m.paused {
            push("-S".into());
        }
        a
    }

    /// Starts QEMU for `m` (inside network namespace `netns` when given) in
    /// its own process group, stderr to `qemu.log`, and records its PID and
    /// start time in `qemu.pid`. The daemon reaps it while it lives.
    async fn spawn(&self, m: &Machine<'_>, netns: Option<&str>) -> Result<Qemu, RuntimeError> {
        for sock in [QMP_SOCK, AGENT_SOCK, MIGRATE_SOCK] {
            let p = m.run.join(sock);
            if p.as_os_str().len() > SOCKET_PATH_MAX {
                return Err(RuntimeError::Process(format!(
                    "socket path {} is longer than {SOCKET_PATH_MAX} bytes: use a shorter state dir",
                    p.display()
                )));
            }
            remove_if_exists(&p)?;
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.run.join(QEMU_LOG))
            .map_err(|e| RuntimeError::Process(format!("open {QEMU_LOG}: {e}")))?;
        let mut cmd = tokio::process::Command::new(&self.config.qemu);
        cmd.args(self.args(m))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(false);
        let child = match netns {
            Some(ns) => {
                let rt = tokio::runtime::Handle::current();
                net::run_in_netns(ns, "start QEMU", move || {
                    let _guard = rt.enter();
                    cmd.spawn().map_err(|e| net::NetError::Netns {
                        name: "QEMU".into(),
                        reason: e.to_string(),
                    })
                })
                .await
                .map_err(|e| RuntimeError::Process(format!("start QEMU: {e}")))?
            }
            None => cmd.spawn().map_err(|e| {
                RuntimeError::Process(format!("start {}: {e}", self.config.qemu.display()))
            })?,
        };
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| RuntimeError::Process("QEMU has no pid".into()))?;
        // Not reaped yet, so the PID is still this process.
        let start = process_start_time(pid).unwrap_or(0);
        let q = Qemu { pid, start };
        let mut child = child;
        tokio::spawn(async move {
            match child.wait().await {
                Ok(st) => tracing::debug!(pid, status = %st, "QEMU exited"),
                Err(e) => tracing::warn!(pid, error = %e, "wait for QEMU"),
            }
        });
        write_private(&m.run.join(PID_FILE), format!("{pid} {start}\n").as_bytes())?;
        Ok(q)
    }

    /// `e` with QEMU's own words (the end of `run/qemu.log`) added to a
    /// process-control failure.
    fn with_qemu_words(e: RuntimeError, run: &Path) -> RuntimeError {
        match e {
            RuntimeError::Process(msg) => {
                RuntimeError::Process(format!("{msg} ({})", Self::qemu_said(run)))
            }
            other => other,
        }
    }

    /// QEMU's own words about a failure: the end of `qemu.log`.
    fn qemu_said(run: &Path) -> String {
        let text = tail(&run.join(QEMU_LOG), 600);
        let text = text.trim();
        if text.is_empty() {
            "QEMU said nothing".into()
        } else {
            format!("QEMU: {text}")
        }
    }

    /// Builds (or finds) the template image for `spec`'s template and shape.
    async fn template_image(&self, spec: &SandboxSpec) -> Result<MemoryImage, RuntimeError> {
        let mut h = Sha256::new();
        h.update(self.guest_id.as_bytes());
        h.update(serde_json::to_vec(&spec.template).unwrap_or_default());
        h.update(format!("{}x{}", spec.vcpu, spec.memory_mib));
        let key = hex(&h.finalize()[..12]);
        let dir = self.config.template_dir.join(&key);
        let image = MemoryImage {
            backend: BACKEND.into(),
            dir: dir.clone(),
            vcpu: spec.vcpu,
            memory_mib: spec.memory_mib,
        };
        if dir.join(IMAGE_META).is_file() {
            return Ok(image);
        }
        let _one = self.cold_boot.lock().await;
        if dir.join(IMAGE_META).is_file() {
            return Ok(image);
        }
        let t0 = Instant::now();
        let tmp = self
            .config
            .template_dir
            .join(format!(".{key}.{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let result = self.cold_boot(spec, &tmp).await;
        match result {
            Ok(()) => {
                let meta = serde_json::to_vec_pretty(&image).unwrap_or_default();
                write_private(&tmp.join(IMAGE_META), &meta)?;
                match fs::rename(&tmp, &dir) {
                    Ok(()) => {}
                    // Another daemon sharing the cache finished first.
                    Err(_) if dir.join(IMAGE_META).is_file() => {
                        let _ = fs::remove_dir_all(&tmp);
                    }
                    Err(e) => {
                        let _ = fs::remove_dir_all(&tmp);
                        return Err(RuntimeError::Process(format!(
                            "store template image {}: {e}",
                            dir.display()
                        )));
                    }
                }
                tracing::info!(template = %spec.template.name, vcpu = spec.vcpu, memory_mib = spec.memory_mib,
                    ms = t0.elapsed().as_millis() as u64, dir = %dir.display(), "template image built (cold boot + snapshot)");
                Ok(image)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Cold-boots the template into `dir` (RAM shared in `dir/ram`), starts
    /// its main process, and snapshots it (`dir/state`).
    async fn cold_boot(&self, spec: &SandboxSpec, dir: &Path) -> Result<(), RuntimeError> {
        create_private_dir(dir)?;
        let ram = dir.join(RAM_FILE);
        make_ram_file(&ram, spec.memory_mib)?;
        let m = Machine {
            vcpu: spec.vcpu,
            memory_mib: spec.memory_mib,
            ram: &ram,
            share: true,
            run: dir,
            tap: None,
            incoming: false,
            paused: false,
            agent: true,
        };
        let q = self.spawn(&m, None).await?;
        let booted = async {
            let conn = wait_for_agent(&dir.join(AGENT_SOCK), q, BOOT_TIMEOUT)
                .await
                .map_err(|e| RuntimeError::Process(format!("cold boot: {e}")))?;
            let mut env = Map::new();
            for (k, v) in &spec.template.env {
                env.insert(k.clone(), Value::from(v.as_str()));
            }
            let mut f = Map::new();
            f.insert("argv".into(), json!(spec.template.command));
            f.insert("env".into(), Value::Object(env));
            conn.call("spawn", f, AGENT_TIMEOUT)
                .await
                .map_err(|e| RuntimeError::Process(format!("start the template's process: {e}")))?;
            drop(conn);
            let mut qmp = Qmp::connect(&dir.join(QMP_SOCK), QMP_WAIT)
                .await
                .map_err(proc_err)?;
            qmp.execute("stop", json!({})).await.map_err(proc_err)?;
            qmp.ignore_shared(true).await.map_err(proc_err)?;
            migrate_to_file(&mut qmp, &dir.join(MIGRATE_SOCK), &dir.join(STATE_FILE)).await?;
            let _ = qmp.execute("quit", json!({})).await;
            Ok::<(), RuntimeError>(())
        }
        .await;
        kill_and_wait(q).await;
        for f in [QMP_SOCK, AGENT_SOCK, MIGRATE_SOCK, PID_FILE] {
            let _ = fs::remove_file(dir.join(f));
        }
        booted.map_err(|e| Self::with_qemu_words(e, dir))
    }

    /// Checks that `image` is whole before a restore maps it.
    fn check_image(image: &MemoryImage) -> Result<(), RuntimeError> {
        if image.backend != BACKEND {
            return Err(RuntimeError::Unusable(format!(
                "the snapshot was taken by the {} runtime",
                image.backend
            )));
        }
        let ram = image.dir.join(RAM_FILE);
        let state = image.dir.join(STATE_FILE);
        let ram_len = match fs::metadata(&ram) {
            Ok(m) => m.len(),
            Err(e) => {
                return Err(RuntimeError::Unusable(format!(
                    "the snapshot's memory file {} is missing: {e}",
                    ram.display()
                )))
            }
        };
        if ram_len != u64::from(image.memory_mib) << 20 {
            return Err(RuntimeError::Corrupt(format!(
                "the snapshot's memory file {} has {ram_len} bytes, not the {} MiB it was taken with",
                ram.display(),
                image.memory_mib
            )));
        }
        let mut magic = [0u8; 4];
        match fs::File::open(&state).and_then(|mut f| f.read_exact(&mut magic)) {
            Ok(()) if &magic == STREAM_MAGIC => Ok(()),
            Ok(()) => Err(RuntimeError::Corrupt(format!(
                "the snapshot's device state {} is not a QEMU migration stream",
                state.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(RuntimeError::Unusable(format!(
                "the snapshot's device state {} is missing",
                state.display()
            ))),
            Err(e) => Err(RuntimeError::Corrupt(format!(
                "the snapshot's device state {} cannot be read: {e}",
                state.display()
            ))),
        }
    }

    /// Starts the QEMU that will restore sandbox `spec`'s image (the
    /// template's when the spec has none), in the daemon's namespace with a
    /// tap of its own: it comes up while the sandbox's network is built.
    async fn prepare_vm(&self, spec: &SandboxSpec) -> Result<(), RuntimeError> {
        let t0 = Instant::now();
        let image = match &spec.image {
            Some(i) => i.clone(),
            None => self.template_image(spec).await?,
        };
        Self::check_image(&image)?;
        let run = self.run_dir_of(&spec.id)?;
        let _ = fs::remove_dir_all(&run);
        create_private_dir(&run)?;
        let ram = image.dir.join(RAM_FILE);
        let tap = net::vm_tap_name(spec.slot);
        let m = Machine {
            vcpu: image.vcpu,
            memory_mib: image.memory_mib,
            ram: &ram,
            share: false,
            run: &run,
            tap: Some(&tap),
            incoming: true,
            paused: false,
            agent: true,
        };
        let q = match self.spawn(&m, None).await {
            Ok(q) => q,
            Err(e) => {
                let _ = fs::remove_dir_all(&run);
                return Err(e);
            }
        };
        let old = lock_map(&self.prepared).insert(
            spec.id.clone(),
            Prepared {
                q,
                image,
                tap,
                t0,
                wired: false,
            },
        );
        if let Some(old) = old {
            kill_and_wait(old.q).await;
        }
        Ok(())
    }

    /// Restores sandbox `spec` on `network` with the QEMU [`Self::prepare_vm`]
    /// started (starting one now if it did not).
    async fn restore(
        &self,
        spec: &SandboxSpec,
        network: &NetworkInfo,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let taken = lock_map(&self.prepared).remove(&spec.id);
        let p = match taken {
            Some(p) => p,
            None => {
                self.prepare_vm(spec).await?;
                lock_map(&self.prepared)
                    .remove(&spec.id)
                    .ok_or_else(|| RuntimeError::Process("prepared VM vanished".into()))?
            }
        };
        // A QEMU prepared and wired ahead (a warm sandbox) counts from now.
        let warm = p.wired;
        let t0 = if warm { Instant::now() } else { p.t0 };
        let (q, image) = (p.q, p.image);
        let image = &image;
        if warm {
            // Its files were whole when it was prepared; are they still?
            if let Err(e) = Self::check_image(image) {
                kill_and_wait(q).await;
                let _ = fs::remove_dir_all(self.run_dir_of(&spec.id)?);
                return Err(e);
            }
        }
        let run = self.run_dir_of(&spec.id)?;
        let handle = RuntimeHandle {
            backend: BACKEND.into(),
            pid: q.pid,
            pid_start: q.start,
            network: network.clone(),
            dir: Some(run.clone()),
        };
        let restored = async {
            let mut qmp = Qmp::connect(&run.join(QMP_SOCK), QMP_WAIT)
                .await
                .map_err(|e| RuntimeError::Process(format!("{e} ({})", Self::qemu_said(&run))))?;
            let spawned_ms = t0.elapsed().as_secs_f64() * 1e3;
            let sock = run.join(MIGRATE_SOCK);
            // The namespace becomes a wire and takes the tap while QEMU
            // gets ready for the stream; the guest runs once both are done.
            let wire = async {
                if warm {
                    return Ok(());
                }
                wire_tap(network, &p.tap).await
            };
            let incoming = async {
                qmp.ignore_shared(true).await.map_err(proc_err)?;
                qmp.execute(
                    "migrate-incoming",
                    json!({ "uri": format!("unix:{}", sock.display()) }),
                )
                .await
                .map_err(proc_err)?;
                tokio::fs::read(image.dir.join(STATE_FILE)).await.map_err(|e| {
                    RuntimeError::Corrupt(format!("read the snapshot's device state: {e}"))
                })
            };
            let (wired, state) = tokio::join!(wire, incoming);
            wired?;
            let state = state?;
            let fed = async {
                let mut s = connect_retry(&sock, QMP_WAIT).await?;
                s.write_all(&state).await?;
                s.shutdown().await
            }
            .await;
            let loaded = match fed {
                Ok(()) => qmp.wait_loaded(LOAD_TIMEOUT).await,
                Err(e) => {
                    return Err(RuntimeError::Corrupt(format!(
                        "feed the device state to QEMU: {e} ({})",
                        Self::qemu_said(&run)
                    )))
                }
            };
            match loaded {
                Ok(s) if s == "running" => {}
                Ok(s) if s == "paused" => {
                    qmp.execute("cont", json!({})).await.map_err(proc_err)?;
                }
                Ok(s) => {
                    return Err(RuntimeError::Corrupt(format!(
                        "the VM is {s} after loading the snapshot ({})",
                        Self::qemu_said(&run)
                    )))
                }
                Err(e) => {
                    return Err(RuntimeError::Corrupt(format!(
                        "the snapshot could not be loaded: {e} ({})",
                        Self::qemu_said(&run)
                    )))
                }
            }
            let running_ms = t0.elapsed().as_secs_f64() * 1e3;
            let running_at_unix_ms = unix_ms();
            drop(qmp);
            let conn = Arc::new(
                AgentConn::connect(&run.join(AGENT_SOCK), QMP_WAIT)
                    .await
                    .map_err(|e| RuntimeError::Process(e.to_string()))?,
            );
            let cfg = GuestConfig {
                sandbox_id: spec.id.clone(),
                env: guest_env(spec),
                ca_pem: spec.ca_pem.clone(),
            };
            self.configure(&conn, &run, &cfg).await?;
            self.agents.put(&spec.id, conn);
            let configured_ms = t0.elapsed().as_secs_f64() * 1e3;
            let timings = json!({
                "warm": warm,
                "spawned_ms": spawned_ms,
                "running_ms": running_ms,
                "configured_ms": configured_ms,
                "running_at_unix_ms": running_at_unix_ms,
            });
            write_private(&run.join("timings.json"), timings.to_string().as_bytes())?;
            tracing::info!(sandbox = %spec.id, warm, spawned_ms, running_ms, configured_ms, image = %image.dir.display(), "VM restored");
            Ok(())
        }
        .await;
        match restored {
            Ok(()) => Ok(handle),
            Err(e) => {
                let said = Self::qemu_said(&run);
                kill_and_wait(q).await;
                self.agents.remove(&spec.id);
                let _ = fs::remove_dir_all(&run);
                tracing::warn!(sandbox = %spec.id, error = %e, qemu = %said, "VM restore failed; released");
                Err(e)
            }
        }
    }

    /// Sends `cfg` (plus the CA bundle, resolver and clock) to the agent and
    /// keeps it in the run directory.
    async fn configure(
        &self,
        conn: &AgentConn,
        run: &Path,
        cfg: &GuestConfig,
    ) -> Result<(), RuntimeError> {
        // The image carries the host's roots (ca-certificates.crt, copied
        // at build time): the agent appends the CA to them. The bundle is
        // sent whole only when the host's roots are not the image's.
        let bundle = match &cfg.ca_pem {
            Some(pem) if !self.roots_in_image => Some(self.bundle(pem)?),
            _ => None,
        };
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut f = Map::new();
        f.insert("sandbox_id".into(), json!(cfg.sandbox_id));
        f.insert("hostname".into(), json!(hostname_of(&cfg.sandbox_id)));
        f.insert("env".into(), json!(cfg.env));
        f.insert("ca_pem".into(), json!(cfg.ca_pem));
        f.insert("ca_bundle".into(), json!(bundle));
        f.insert("ca_roots_from_image".into(), json!(self.roots_in_image));
        // Every sandbox's gateway has the same address and MAC
        // (`net::GATEWAY_MAC`): the guest's neighbour entry stays right.
        f.insert("flush_neighbours".into(), json!(false));
        f.insert("resolv_conf".into(), json!(self.config.resolv_conf));
        f.insert("clock_unix_ns".into(), json!(clock));
        conn.call("configure", f, AGENT_TIMEOUT)
            .await
            .map_err(|e| RuntimeError::Process(format!("configure the guest: {e}")))?;
        let saved = serde_json::to_vec(cfg)
            .map_err(|e| RuntimeError::Process(format!("encode guest config: {e}")))?;
        write_private(&run.join(CONFIG_FILE), &saved)
    }

    /// The host's roots followed by `ca_pem`.
    fn bundle(&self, ca_pem: &str) -> Result<String, RuntimeError> {
        let roots = match fs::read(&self.config.system_roots) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(RuntimeError::Process(format!(
                    "read {}: {e}",
                    self.config.system_roots.display()
                )))
            }
        };
        let bundle = crate::ca::trust_bundle(&roots, ca_pem);
        Ok(String::from_utf8_lossy(&bundle).into_owned())
    }

    fn handle_dir(handle: &RuntimeHandle) -> Result<&Path, RuntimeError> {
        handle
            .dir
            .as_deref()
            .ok_or_else(|| RuntimeError::Process("VM handle without a run directory".into()))
    }

    fn sandbox_id(handle: &RuntimeHandle) -> &str {
        handle
            .network
            .netns
            .strip_prefix(net::SANDBOX_NETNS_PREFIX)
            .unwrap_or(&handle.network.netns)
    }

    async fn qmp_of(&self, handle: &RuntimeHandle) -> Result<Qmp, RuntimeError> {
        if !self.is_alive(handle) {
            return Err(RuntimeError::NotRunning);
        }
        let dir = Self::handle_dir(handle)?;
        Qmp::connect(&dir.join(QMP_SOCK), QMP_WAIT)
            .await
            .map_err(proc_err)
    }

    /// Migrates the stopped VM behind `qmp` (RAM included) into a paused
    /// materializer whose RAM is `dir/ram` (shared), then writes the
    /// materializer's device state to `dir/state`.
    /// The materializer runs in the clone's network namespace with a tap of
    /// its own (`tap1`, on no bridge): a VM whose NIC negotiated a tap's
    /// vnet header can only be loaded where a tap offers one.
    async fn materialize(
        &self,
        qmp: &mut Qmp,
        netns: &str,
        vcpu: u32,
        memory_mib: u32,
        dir: &Path,
    ) -> Result<(), RuntimeError> {
        let ram = dir.join(RAM_FILE);
        make_ram_file(&ram, memory_mib)?;
        let m = Machine {
            vcpu,
            memory_mib,
            ram: &ram,
            share: true,
            run: dir,
            tap: Some(MATERIALIZER_TAP),
            incoming: true,
            paused: true,
            agent: false,
        };
        let q = self.spawn(&m, Some(netns)).await?;
        let done = async {
            let mut mat = Qmp::connect(&dir.join(QMP_SOCK), QMP_WAIT)
                .await
                .map_err(proc_err)?;
            // The materializer takes RAM pages: its shared block must not be
            // ignored while loading.
            mat.ignore_shared(false).await.map_err(proc_err)?;
            let sock = dir.join(MIGRATE_SOCK);
            let uri = format!("unix:{}", sock.display());
            mat.execute("migrate-incoming", json!({ "uri": uri }))
                .await
                .map_err(proc_err)?;
            qmp.ignore_shared(false).await.map_err(proc_err)?;
            wait_for_socket(&sock, QMP_WAIT).await?;
            qmp.execute("migrate", json!({ "uri": uri }))
                .await
                .map_err(proc_err)?;
            let sent = qmp.wait_migration(MIGRATE_TIMEOUT).await;
            // Later snapshots of this VM decide again; leave it as restores have it.
            let _ = qmp.ignore_shared(true).await;
            sent.map_err(proc_err)?;
            let s = mat.wait_loaded(LOAD_TIMEOUT).await.map_err(proc_err)?;
            if s != "paused" {
                return Err(RuntimeError::Process(format!(
                    "materializer is {s} after loading, not paused"
                )));
            }
            mat.ignore_shared(true).await.map_err(proc_err)?;
            migrate_to_file(&mut mat, &sock, &dir.join(STATE_FILE)).await?;
            let _ = mat.execute("quit", json!({})).await;
            Ok::<(), RuntimeError>(())
        }
        .await;
        kill_and_wait(q).await;
        let done = done.map_err(|e| Self::with_qemu_words(e, dir));
        for f in [QMP_SOCK, AGENT_SOCK, MIGRATE_SOCK, PID_FILE, QEMU_LOG] {
            let _ = fs::remove_file(dir.join(f));
        }
        done
    }
}

impl Runtime for VmRuntime {
    async fn start(
        &self,
        spec: &SandboxSpec,
        net: &NetworkInfo,
    ) -> Result<RuntimeHandle, RuntimeError> {
        if !crate::net::netns_exists(&net.netns) {
            return Err(RuntimeError::Network(format!(
                "network namespace {} does not exist (net::setup first)",
                net.netns
            )));
        }
        self.restore(spec, net).await
    }

    async fn prepare(&self, spec: &SandboxSpec) -> Result<(), RuntimeError> {
        self.prepare_vm(spec).await
    }

    async fn connect(&self, spec: &SandboxSpec, net: &NetworkInfo) -> Result<(), RuntimeError> {
        let tap = match lock_map(&self.prepared).get(&spec.id) {
            Some(p) if !p.wired => p.tap.clone(),
            Some(_) => return Ok(()),
            None => {
                return Err(RuntimeError::Process(format!(
                    "sandbox {}: no prepared VM to connect",
                    spec.id
                )))
            }
        };
        // QEMU creates its tap before it serves QMP.
        let run = self.run_dir_of(&spec.id)?;
        Qmp::connect(&run.join(QMP_SOCK), QMP_WAIT)
            .await
            .map_err(|e| RuntimeError::Process(format!("{e} ({})", Self::qemu_said(&run))))?;
        wire_tap(net, &tap).await?;
        if let Some(p) = lock_map(&self.prepared).get_mut(&spec.id) {
            p.wired = true;
        }
        Ok(())
    }

    fn prepared_alive(&self, id: &str) -> bool {
        lock_map(&self.prepared)
            .get(id)
            .is_none_or(|p| process_alive(p.q.pid, p.q.start))
    }

    async fn pause(&self, handle: &RuntimeHandle) -> Result<(), RuntimeError> {
        let mut qmp = self.qmp_of(handle).await?;
        qmp.execute("stop", json!({})).await.map_err(proc_err)?;
        Ok(())
    }

    async fn resume(&self, handle: &RuntimeHandle) -> Result<(), RuntimeError> {
        let mut qmp = self.qmp_of(handle).await?;
        qmp.execute("cont", json!({})).await.map_err(proc_err)?;
        Ok(())
    }

    async fn stop(&self, handle: &RuntimeHandle) -> Result<(), RuntimeError> {
        let id = Self::sandbox_id(handle).to_owned();
        self.agents.remove(&id);
        if process_alive(handle.pid, handle.pid_start) {
            let gone = kill_and_wait(Qemu {
                pid: handle.pid,
                start: handle.pid_start,
            })
            .await;
            if !gone {
                return Err(RuntimeError::Process(format!(
                    "QEMU (pid {}) of sandbox {id} still alive after SIGKILL",
                    handle.pid
                )));
            }
        }
        if let Some(dir) = &handle.dir {
            remove_dir(dir)?;
        }
        Ok(())
    }

    async fn exec(
        &self,
        handle: &RuntimeHandle,
        req: ExecRequest,
    ) -> Result<ExecOutput, RuntimeError> {
        if req.argv.is_empty() {
            return Err(RuntimeError::Process("exec: empty argv".into()));
        }
        if !self.is_alive(handle) {
            return Err(RuntimeError::NotRunning);
        }
        let dir = Self::handle_dir(handle)?;
        let conn = self
            .agents
            .get(Self::sandbox_id(handle), &dir.join(AGENT_SOCK))
            .await
            .map_err(|e| RuntimeError::Process(e.to_string()))?;
        let timeout_ms = u64::try_from(req.timeout.as_millis()).unwrap_or(u64::MAX);
        let mut f = Map::new();
        f.insert("argv".into(), json!(req.argv));
        f.insert("env".into(), json!(req.env));
        f.insert(
            "cwd".into(),
            json!(req
                .cwd
                .map(|c| c.display().to_string())
                .unwrap_or_else(|| "/".into())),
        );
        f.insert("timeout_ms".into(), json!(timeout_ms));
        let v = conn
            .call("exec", f, req.timeout + AGENT_TIMEOUT)
            .await
            .map_err(|e| RuntimeError::Process(e.to_string()))?;
        Ok(ExecOutput {
            exit_code: v["exit_code"]
                .as_i64()
                .and_then(|c| i32::try_from(c).ok())
                .unwrap_or(255),
            stdout: v["stdout"].as_str().unwrap_or("").to_owned(),
            stderr: v["stderr"].as_str().unwrap_or("").to_owned(),
        })
    }

    async fn release(&self, id: &str, _slot: u32) -> Result<(), RuntimeError> {
        self.agents.remove(id);
        let prepared = lock_map(&self.prepared).remove(id);
        if let Some(p) = prepared {
            kill_and_wait(p.q).await;
        }
        let run = self.run_dir_of(id)?;
        if let Ok(text) = fs::read_to_string(run.join(PID_FILE)) {
            let mut it = text.split_whitespace();
            if let (Some(Ok(pid)), Some(Ok(start))) =
                (it.next().map(str::parse), it.next().map(str::parse))
            {
                if process_alive(pid, start) && !kill_and_wait(Qemu { pid, start }).await {
                    return Err(RuntimeError::Process(format!(
                        "QEMU (pid {pid}) of sandbox {id} still alive after SIGKILL"
                    )));
                }
            }
        }
        remove_dir(&run)
    }

    fn is_alive(&self, handle: &RuntimeHandle) -> bool {
        process_alive(handle.pid, handle.pid_start) && net::netns_exists(&handle.network.netns)
    }

    async fn snapshot(
        &self,
        handle: &RuntimeHandle,
        dir: &Path,
    ) -> Result<Option<MemoryImage>, RuntimeError> {
        let mut qmp = self.qmp_of(handle).await?;
        let was = qmp.status().await.map_err(proc_err)?;
        let info = machine_shape(&mut qmp).await?;
        if dir.exists() {
            return Err(RuntimeError::Process(format!(
                "snapshot directory {} exists",
                dir.display()
            )));
        }
        create_private_dir(dir)?;
        let t0 = Instant::now();
        if was == "running" {
            qmp.execute("stop", json!({})).await.map_err(proc_err)?;
        }
        let made = self
            .materialize(&mut qmp, &handle.network.netns, info.0, info.1, dir)
            .await;
        // The clone carries on as it was, whatever happened.
        if was == "running" {
            if let Err(e) = qmp.execute("cont", json!({})).await {
                tracing::warn!(error = %e, "cannot resume a VM after its snapshot");
            }
        }
        match made {
            Ok(()) => {
                let image = MemoryImage {
                    backend: BACKEND.into(),
                    dir: dir.to_owned(),
                    vcpu: info.0,
                    memory_mib: info.1,
                };
                let meta = serde_json::to_vec_pretty(&image).unwrap_or_default();
                write_private(&dir.join(IMAGE_META), &meta)?;
                tracing::info!(sandbox = %Self::sandbox_id(handle), ms = t0.elapsed().as_millis() as u64,
                    dir = %dir.display(), "VM snapshot taken");
                Ok(Some(image))
            }
            Err(e) => {
                let _ = fs::remove_dir_all(dir);
                Err(e)
            }
        }
    }

    async fn install_ca(
        &self,
        id: &str,
        handle: &RuntimeHandle,
        ca_pem: &str,
    ) -> Result<(), RuntimeError> {
        let dir = Self::handle_dir(handle)?;
        let saved = fs::read(dir.join(CONFIG_FILE))
            .map_err(|e| RuntimeError::Process(format!("read the guest config: {e}")))?;
        let mut cfg: GuestConfig = serde_json::from_slice(&saved)
            .map_err(|e| RuntimeError::Process(format!("parse the guest config: {e}")))?;
        cfg.ca_pem = Some(ca_pem.to_owned());
        let conn = self
            .agents
            .get(id, &dir.join(AGENT_SOCK))
            .await
            .map_err(|e| RuntimeError::Process(e.to_string()))?;
        self.configure(&conn, dir, &cfg).await
    }
}

/// The kernel a restore starts QEMU with. QEMU loads `-kernel` and
/// `-initrd` into its own memory for the guest's firmware to fetch, 18 MB
/// per clone that a restored guest never reads; what the migration stream
/// needs is only the boot ROM QEMU adds for a kernel. So a restore gets the
/// bzImage's setup header and one page (`<run_dir>/../restore-kernel`) and no
/// initramfs. A kernel that is not a bzImage is passed whole (`false`).
fn restore_kernel(config: &VmConfig) -> Result<(PathBuf, bool), RuntimeError> {
    let whole = (config.kernel.clone(), false);
    let Ok(bytes) = fs::read(&config.kernel) else {
        return Ok(whole);
    };
    if bytes.len() < 0x260 || &bytes[0x202..0x206] != b"HdrS" {
        return Ok(whole);
    }
    let sects = match bytes[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let len = ((sects + 1) * 512 + 4096).min(bytes.len());
    let dir = config.run_dir.parent().unwrap_or(&config.run_dir);
    let path = dir.join("restore-kernel");
    write_private(&path, &bytes[..len])?;
    Ok((path, true))
}

/// Does the guest image carry the host's roots? `manifest.json` beside the
/// initramfs records their sha256 (`./scripts/guest-image`).
fn image_has_roots(config: &VmConfig) -> bool {
    let Some(dir) = config.initramfs.parent() else {
        return false;
    };
    let Ok(text) = fs::read(dir.join("manifest.json")) else {
        return false;
    };
    let Ok(manifest) = serde_json::from_slice::<Value>(&text) else {
        return false;
    };
    let Ok(roots) = fs::read(&config.system_roots) else {
        return false;
    };
    manifest["roots_sha256"].as_str() == Some(hex(&Sha256::digest(&roots)).as_str())
}

/// vCPUs and RAM (MiB) of the VM behind `qmp`.
async fn machine_shape(qmp: &mut Qmp) -> Result<(u32, u32), RuntimeError> {
    let cpus = qmp
        .execute("query-cpus-fast", json!({}))
        .await
        .map_err(proc_err)?;
    let vcpu = cpus.as_array().map_or(0, Vec::len);
    let mem = qmp
        .execute("query-memory-size-summary", json!({}))
        .await
        .map_err(proc_err)?;
    let base = mem["base-memory"].as_u64().unwrap_or(0);
    let vcpu = u32::try_from(vcpu).unwrap_or(0);
    let mib = u32::try_from(base >> 20).unwrap_or(0);
    if vcpu == 0 || mib == 0 {
        return Err(RuntimeError::Process(
            "QEMU reports no vCPU or no memory".into(),
        ));
    }
    Ok((vcpu, mib))
}

/// The environment the guest's processes get from the daemon: the
/// template's, then the sandbox's own (the agent adds PATH, HOME and the CA
/// variables).
fn guest_env(spec: &SandboxSpec) -> BTreeMap<String, String> {
    let mut env = spec.template.env.clone();
    env.extend(spec.env_vars.clone());
    env
}

/// Wall-clock milliseconds since the epoch.
fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

/// The host CPU's clock in kHz (`cpu MHz` of `/proc/cpuinfo`), which TCG
/// guests see as their TSC rate.
pub fn host_tsc_khz() -> Option<u64> {
    let info = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then_some((mhz * 1000.0).round() as u64)
}

fn hostname_of(id: &str) -> String {
    id.chars().take(63).collect()
}

fn lock_map<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn proc_err(e: qmp::QmpError) -> RuntimeError {
    RuntimeError::Process(e.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last `max` bytes of a file, as text.
fn tail(path: &Path, max: u64) -> String {
    let Ok(bytes) = fs::read(path) else {
        return String::new();
    };
    let from = bytes.len().saturating_sub(max as usize);
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

fn remove_if_exists(p: &Path) -> Result<(), RuntimeError> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::Process(format!(
            "remove {}: {e}",
            p.display()
        ))),
    }
}

fn remove_dir(p: &Path) -> Result<(), RuntimeError> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::Process(format!(
            "remove {}: {e}",
            p.display()
        ))),
    }
}

fn create_private_dir(p: &Path) -> Result<(), RuntimeError> {
    fs::create_dir_all(p)
        .and_then(|()| fs::set_permissions(p, fs::Permissions::from_mode(0o700)))
        .map_err(|e| RuntimeError::Process(format!("create {}: {e}", p.display())))
}

fn write_private(p: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    let dir = p.parent().unwrap_or(Path::new("."));
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| RuntimeError::Process(format!("bad file name {}", p.display())))?;
    crate::ca::write_atomic(dir, name, bytes, 0o600)
        .map_err(|e| RuntimeError::Process(format!("write {}: {e}", p.display())))
}

/// A sparse RAM file of `memory_mib` MiB.
fn make_ram_file(p: &Path, memory_mib: u32) -> Result<(), RuntimeError> {
    let f = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(p)
        .map_err(|e| RuntimeError::Process(format!("create {}: {e}", p.display())))?;
    f.set_len(u64::from(memory_mib) << 20)
        .map_err(|e| RuntimeError::Process(format!("size {}: {e}", p.display())))?;
    fs::set_permissions(p, fs::Permissions::from_mode(0o600))
        .map_err(|e| RuntimeError::Process(format!("chmod {}: {e}", p.display())))
}

async fn connect_retry(path: &Path, wait: Duration) -> io::Result<tokio::net::UnixStream> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(POLL).await,
            Err(e) => return Err(e),
        }
    }
}

async fn wait_for_socket(path: &Path, wait: Duration) -> Result<(), RuntimeError> {
    let deadline = tokio::time::Instant::now() + wait;
    while !path.exists() {
        if tokio::time::Instant::now() >= deadline {
            return Err(RuntimeError::Process(format!(
                "{} did not appear",
                path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Waits until the agent behind `path` answers a ping (the guest booted),
/// or QEMU `q` dies, or `limit` passes.
async fn wait_for_agent(path: &Path, q: Qemu, limit: Duration) -> Result<AgentConn, String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if !process_alive(q.pid, q.start) {
            return Err("QEMU exited during boot".into());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("the guest agent did not answer within {limit:?}"));
        }
        if let Ok(conn) = AgentConn::connect(path, Duration::from_millis(100)).await {
            while tokio::time::Instant::now() < deadline && !conn.is_broken() {
                if conn
                    .call("ping", Map::new(), Duration::from_millis(500))
                    .await
                    .is_ok()
                {
                    return Ok(conn);
                }
                if !process_alive(q.pid, q.start) {
                    return Err("QEMU exited during boot".into());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Migrates the VM behind `qmp` into `out`: the daemon listens on `sock`,
/// QEMU connects and streams, the stream lands in the file.
async fn migrate_to_file(qmp: &mut Qmp, sock: &Path, out: &Path) -> Result<u64, RuntimeError> {
    remove_if_exists(sock)?;
    let listener = tokio::net::UnixListener::bind(sock)
        .map_err(|e| RuntimeError::Process(format!("listen on {}: {e}", sock.display())))?;
    let file = tokio::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(out)
        .await
        .map_err(|e| RuntimeError::Process(format!("create {}: {e}", out.display())))?;
    let receive = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut file = file;
        let n = tokio::io::copy(&mut s, &mut file).await?;
        file.sync_all().await?;
        Ok::<u64, io::Error>(n)
    });
    let uri = format!("unix:{}", sock.display());
    let sent = match qmp.execute("migrate", json!({ "uri": uri })).await {
        Ok(_) => qmp.wait_migration(MIGRATE_TIMEOUT).await,
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        receive.abort();
        let _ = fs::remove_file(out);
        return Err(proc_err(e));
    }
    let n = match tokio::time::timeout(MIGRATE_TIMEOUT, receive).await {
        Ok(Ok(Ok(n))) => n,
        Ok(Ok(Err(e))) => return Err(RuntimeError::Process(format!("receive the snapshot: {e}"))),
        Ok(Err(e)) => return Err(RuntimeError::Process(format!("receive the snapshot: {e}"))),
        Err(_) => {
            return Err(RuntimeError::Process(
                "receive the snapshot: timed out".into(),
            ))
        }
    };
    let _ = fs::remove_file(sock);
    Ok(n)
}

/// SIGKILLs QEMU `q` and waits until it is gone; `false` if it outlived
/// [`STOP_TIMEOUT`].
async fn kill_and_wait(q: Qemu) -> bool {
    let deadline = Instant::now() + STOP_TIMEOUT;
    while process_alive(q.pid, q.start) {
        if Instant::now() >= deadline {
            return false;
        }
        let _ = kill(Pid::from_raw(q.pid), Signal::SIGKILL);
        tokio::time::sleep(POLL).await;
    }
    true
}

/// Makes the sandbox namespace a wire and moves the VM's tap onto it.
async fn wire_tap(network: &NetworkInfo, tap: &str) -> Result<(), RuntimeError> {
    net::prepare_vm_wire(network).await?;
    net::adopt_vm_tap(network, tap).await?;
    Ok(())
}
