//! `tollgate`: the daemon (`serve`), the CLI (`exec`), and the hidden
//! `sandbox-enter` helper the netns runtime re-executes itself as.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use tollgate::api::{Api, Keys};
use tollgate::config::Config;
use tollgate::runtime::any::{Backend, Runtimes};
use tollgate::runtime::netns::{NetnsConfig, NetnsRuntime};
use tollgate::runtime::vm::{choose_accel, VmConfig, VmRuntime};
use tollgate::service::{Org, Service};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Egress data plane and sandbox API for microVM sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (needs root: it creates network namespaces and links).
    Serve {
        /// Address of the HTTP API [default: 127.0.0.1:8080].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Where sandboxes, snapshots and keys are kept [default: /var/lib/tollgate].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// TOML file adding organizations, keys, limits, host capacity, templates.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a command inside a sandbox; prints its output and exits with its code.
    Exec {
        /// Kill the command after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Working directory inside the sandbox.
        #[arg(long)]
        cwd: Option<String>,
        /// Sandbox id (`sbx-…`).
        sandbox_id: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Internal: set up a sandbox's namespaces and exec its process.
    #[command(hide = true)]
    SandboxEnter(tollgate::runtime::netns::EnterArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        // Must run before any thread is started: setns(2) into a mount namespace
        // requires a single-threaded caller.
        Cmd::SandboxEnter(args) => tollgate::runtime::netns::enter_main(args),
        Cmd::Serve {
            listen,
            state_dir,
            config,
        } => {
            init_logging();
            let mut cfg = match &config {
                Some(p) => Config::load(p)?,
                None => Config::default(),
            };
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(d) = state_dir {
                cfg.state_dir = d;
            }
            tokio::runtime::Runtime::new()?.block_on(serve(cfg))
        }
        Cmd::Exec {
            timeout,
            cwd,
            sandbox_id,
            argv,
        } => {
            let code = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(exec(&sandbox_id, argv, cwd, timeout))?;
            std::process::exit(code)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// The default organization's key: `TOLLGATE_API_KEY`, else the one kept in
/// the state dir, else a new one (written 0600 and printed once).
fn default_key(state_dir: &Path) -> anyhow::Result<String> {
    if let Ok(k) = std::env::var("TOLLGATE_API_KEY") {
        let k = k.trim().to_string();
        anyhow::ensure!(
            k.len() >= 16,
            "TOLLGATE_API_KEY must be at least 16 characters"
        );
        return Ok(k);
    }
    let path = state_dir.join("api-key");
    if let Ok(k) = std::fs::read_to_string(&path) {
        let k = k.trim().to_string();
        if !k.is_empty() {
            tracing::info!(path = %path.display(), "using the API key kept in the state dir");
            return Ok(k);
        }
    }
    let key = tollgate::model::new_id("tg_").replace('-', "");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    tollgate::store::restrict(&path);
    writeln!(f, "{key}")?;
    eprintln!(
        "TOLLGATE_API_KEY={key}   (generated; kept in {})",
        path.display()
    );
    Ok(key)
}

/// The runtime of this daemon: `netns` always, `vm` as configured
/// (`auto`: where QEMU and the guest image are installed).
fn runtimes(cfg: &Config, netns: NetnsRuntime, resolv_conf: &Path) -> anyhow::Result<Runtimes> {
    let rc = &cfg.runtime;
    if rc.backend == "netns" {
        tracing::info!(backend = "netns", "runtime: netns (configured)");
        return Ok(Runtimes::new(netns, None, Backend::Netns));
    }
    let (accel, why) = choose_accel(&rc.vm.accel).map_err(anyhow::Error::msg)?;
    let vm_cfg = VmConfig {
        qemu: rc.vm.qemu.clone(),
        kernel: rc.vm.kernel.clone(),
        initramfs: rc.vm.initramfs.clone(),
        accel,
        tb_size_mib: rc.vm.tb_size_mib,
        run_dir: cfg.state_dir.join("vm").join("run"),
        template_dir: rc
            .vm
            .template_dir
            .clone()
            .unwrap_or_else(|| cfg.state_dir.join("vm").join("templates")),
        system_roots: PathBuf::from(tollgate_proxy::intercept::SYSTEM_BUNDLE),
        resolv_conf: std::fs::read_to_string(resolv_conf)
            .with_context(|| format!("cannot read {}", resolv_conf.display()))?,
    };
    match (vm_cfg.check_installed(), rc.backend.as_str()) {
        (Ok(()), _) => {
            let vm = VmRuntime::new(vm_cfg).map_err(|e| anyhow::anyhow!("vm runtime: {e}"))?;
            tracing::info!(backend = "vm", accel = accel.as_str(), reason = %why, "runtime: QEMU microVMs");
            Ok(Runtimes::new(netns, Some(vm), Backend::Vm))
        }
        (Err(missing), "vm") => anyhow::bail!("runtime.backend = \"vm\": {missing}"),
        (Err(missing), _) => {
            tracing::warn!(reason = %missing, "runtime: netns (the vm runtime is not installed)");
            Ok(Runtimes::new(netns, None, Backend::Netns))
        }
    }
}

async fn serve(mut cfg: Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "tollgate serve creates network namespaces and links and must run as root: sudo -E tollgate serve"
    );
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create state dir {}", cfg.state_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // One daemon per state dir; every sandbox it builds is recorded as its
    // own, so a later daemon can tell its leftovers from another's sandboxes.
    let _state_lock = tollgate::reclaim::lock_state_dir(&cfg.state_dir)
        .with_context(|| format!("cannot lock state dir {}", cfg.state_dir.display()))?;
    // The shared eBPF program and maps are this daemon's: named after its
    // state dir, so a restart reopens them and another daemon on the host
    // has its own.
    tollgate_ebpf::set_instance(&tollgate::dataplane::ebpf_instance(&cfg.state_dir))
        .context("naming the eBPF instance")?;
    let owner = std::fs::canonicalize(&cfg.state_dir)?;
    tollgate::net::set_owner(PathBuf::from(RUN_DIR).join("owners"), owner)?;
    let mut keys = HashMap::new();
    let mut orgs = vec![Org {
        name: "default".into(),
        max_sandboxes: 3,
    }];
    keys.insert(default_key(&cfg.state_dir)?, "default".to_string());
    for o in &cfg.organizations {
        if o.name == "default" {
            orgs[0].max_sandboxes = o.max_sandboxes;
        } else {
            orgs.push(Org {
                name: o.name.clone(),
                max_sandboxes: o.max_sandboxes,
            });
        }
        for k in &o.api_keys {
            anyhow::ensure!(
                !keys.contains_key(k),
                "an API key of organization {:?} is already in use",
                o.name
            );
            keys.insert(k.clone(), o.name.clone());
        }
    }
    // Whom TLS interception trusts upstream: checked before anything is set
    // up, so a bad bundle stops the daemon at once.
    let trust = upstream_trust(cfg.proxy.upstream_ca_file.as_deref())?;
    let exe = std::env::current_exe().context("cannot find the tollgate binary")?;
    tollgate::net::host_setup(&tollgate::net::NetPlan::from(&cfg.network))
        .await
        .context("host network setup")?;
    let resolv_conf = write_resolv_conf()?;
    // The state dir (API key, store, CA keys) is hidden in every sandbox.
    let netns = NetnsRuntime::new(NetnsConfig {
        exe,
        hide_paths: vec![cfg.state_dir.clone()],
        resolv_conf: Some(resolv_conf.clone()),
        files_dir: Some(PathBuf::from(RUN_DIR).join("sandboxes")),
        system_roots: PathBuf::from(tollgate_proxy::intercept::SYSTEM_BUNDLE),
    });
    let runtime = runtimes(&cfg, netns, &resolv_conf)?;
    let warm = cfg.runtime.warm.unwrap_or(match runtime.default_backend() {
        Backend::Vm => 1,
        Backend::Netns => 0,
    });
    cfg.runtime.warm = Some(warm);
    tracing::info!(warm, "warm sandboxes: at most this many kept ready, one per recently launched template or snapshot");
    tollgate_ebpf::ensure_bpffs().context("bpffs")?;
    let floor = tollgate::dataplane::floor(
        &cfg.network.deny_cidrs,
        &[cfg.network.pool.into(), cfg.network.pool6.into()],
        &tollgate::dataplane::host_addresses(),
    );
    let events = Arc::new(tollgate::events::EventLog::new(
        cfg.state_dir.join("events"),
    ));
    let extra_floor: Vec<ipnet::IpNet> = cfg
        .network
        .deny_cidrs
        .iter()
        .copied()
        .chain([cfg.network.pool.into(), cfg.network.pool6.into()])
        .chain(
            tollgate::dataplane::host_addresses()
                .into_iter()
                .map(ipnet::IpNet::from),
        )
        .collect();
    let mut resolver_cfg = tollgate_proxy::dns::ResolverConfig::default();
    if !cfg.dns.upstreams.is_empty() {
        resolver_cfg.upstreams = cfg.dns.upstreams.clone();
    }
    resolver_cfg.timeout = Duration::from_millis(cfg.dns.timeout_ms);
    anyhow::ensure!(
        !resolver_cfg.upstreams.is_empty(),
        "no DNS upstream: set [dns] upstreams in the config or a nameserver in /etc/resolv.conf"
    );
    let proxy_cfg = tollgate_proxy::proxy::ProxyConfig {
        max_connections: cfg.proxy.max_connections,
        connect_timeout: Duration::from_millis(cfg.proxy.connect_timeout_ms),
        idle_timeout: Duration::from_millis(cfg.proxy.idle_timeout_ms),
        detect: tollgate_proxy::detect::DetectLimits {
            deadline: Duration::from_millis(cfg.proxy.detect_timeout_ms),
            ..Default::default()
        },
        ipv6: true,
        ..Default::default()
    };
    let proxy_cfg = with_tunnel_mode(proxy_cfg, cfg.proxy.tunnel);
    let dataplane = Arc::new(tollgate::dataplane::Dataplane::new(
        tollgate::dataplane::default_pin_root().to_path_buf(),
        tollgate::dataplane::Shared {
            floor,
            policy_floor: Arc::new(tollgate_proxy::policy::Floor::new(extra_floor)),
            resolver: Arc::new(tollgate_proxy::dns::Resolver::new(resolver_cfg)),
            proxy: proxy_cfg,
            trust,
            cas: tollgate::ca::CaStore::in_state_dir(&cfg.state_dir),
        },
        events,
    ));
    let listen = cfg.listen;
    let service = Service::open(cfg, orgs, runtime, dataplane).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(%listen, "tollgate API listening");

    let reaper = {
        let service = service.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                service.reap_dead().await;
                service.expire().await;
            }
        })
    };
    let api = Arc::new(Api {
        service: service.clone(),
        keys: Keys(keys),
    });
    tollgate::api::serve(listener, api, shutdown_signal()).await;
    reaper.abort();
    service.release_all_warm().await;
    tracing::info!("tollgate stopped; sandboxes keep running and are re-adopted on the next start");
    Ok(())
}

/// The daemon's runtime directory: the sandboxes' resolv.conf and their CA
/// bundles (public files only; keys live in the state dir).
const RUN_DIR: &str = "/run/tollgate";

/// The upstream trust of TLS interception: the host's roots plus `extra`.
fn upstream_trust(
    extra: Option<&Path>,
) -> anyhow::Result<tollgate_proxy::intercept::UpstreamTrust> {
    use tollgate_proxy::intercept::{UpstreamTrust, SYSTEM_BUNDLE};
    let trust = UpstreamTrust::system(extra).with_context(|| match extra {
        Some(p) => format!(
            "cannot build the upstream trust of TLS interception from {SYSTEM_BUNDLE} and \
             [proxy] upstream_ca_file = {:?}",
            p.display().to_string()
        ),
        None => format!(
            "cannot build the upstream trust of TLS interception from {SYSTEM_BUNDLE} \
             (apt-get install -y ca-certificates, or set [proxy] upstream_ca_file)"
        ),
    })?;
    tracing::info!(
        roots = trust.root_count(),
        extra = ?extra.map(Path::display),
        "upstream trust for TLS interception loaded"
    );
    Ok(trust)
}

/// The `/etc/resolv.conf` every sandbox sees: its own resolver at its
/// gateway (the same addresses in every sandbox).
fn write_resolv_conf() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(RUN_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("resolv.conf");
    let text = format!(
        "# tollgate: this sandbox's resolver (policy-aware)\nnameserver {}\nnameserver {}\noptions timeout:2 attempts:2\n",
        tollgate::net::GATEWAY_V4,
        tollgate::net::GATEWAY_V6
    );
    let tmp = dir.join(format!("resolv.conf.{}", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn exec(
    id: &str,
    argv: Vec<String>,
    cwd: Option<String>,
    timeout: u64,
) -> anyhow::Result<i32> {
    let base = std::env::var("TOLLGATE_API_URL")
        .unwrap_or_else(|_| tollgate::client::DEFAULT_API_URL.to_string());
    let key = std::env::var("TOLLGATE_API_KEY").context("TOLLGATE_API_KEY is not set")?;
    let mut body = json!({ "argv": argv, "timeout": timeout });
    if let (Some(c), Some(m)) = (cwd, body.as_object_mut()) {
        m.insert("cwd".into(), json!(c));
    }
    let path = format!("/v1/sandbox/{id}/process/execute");
    let (status, v) =
        tollgate::client::call(&base, &key, http::Method::POST, &path, Some(&body)).await?;
    if !status.is_success() {
        let msg = v.get("message").and_then(|m| m.as_str()).unwrap_or("");
        let mut detail = String::new();
        if let Some(errs) = v.get("errors").and_then(|e| e.as_array()) {
            for e in errs {
                detail.push_str(&format!(
                    "\n  {}: {}",
                    e["field"].as_str().unwrap_or(""),
                    e["error"].as_str().unwrap_or("")
                ));
            }
        }
        anyhow::bail!("tollgate exec: {status}: {msg}{detail}");
    }
    let out = v.get("stdout").and_then(|s| s.as_str()).unwrap_or("");
    let err = v.get("stderr").and_then(|s| s.as_str()).unwrap_or("");
    std::io::stdout().write_all(out.as_bytes())?;
    std::io::stderr().write_all(err.as_bytes())?;
    Ok(v.get("exit_code").and_then(|c| c.as_i64()).unwrap_or(1) as i32)
}

/// Sets how tunnels move bytes; loads the kernel tunnel's program for
/// `kernel`, and says so when it cannot (tunnels then use `splice(2)`).
fn with_tunnel_mode(
    mut proxy_cfg: tollgate_proxy::proxy::ProxyConfig,
    mode: tollgate::config::TunnelMode,
) -> tollgate_proxy::proxy::ProxyConfig {
    use tollgate::config::TunnelMode;
    use tollgate_proxy::tunnel::CopyMode;
    proxy_cfg.copy_mode = match mode {
        TunnelMode::Kernel => match tollgate::kernel_tunnel::EbpfTunnel::load() {
            Ok(kt) => {
                tracing::info!("kernel tunnel loaded: allowed tunnels are spliced in the kernel");
                proxy_cfg.kernel_tunnel = Some(kt);
                CopyMode::Kernel
            }
            Err(e) => {
                tracing::warn!(error = %e, "kernel tunnel unavailable: tunnels relay with splice(2)");
                CopyMode::Splice
            }
        },
        TunnelMode::Splice => CopyMode::Splice,
        TunnelMode::Userspace => CopyMode::Userspace,
    };
    proxy_cfg
}
