//! `configure`: make a freshly booted or freshly restored guest this sandbox.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::exec::check_env;
use crate::sys;

pub const RUN_DIR: &str = "/run/tollgate";
pub const CA_PEM: &str = "/run/tollgate/ca.pem";
pub const CA_BUNDLE: &str = "/run/tollgate/ca-bundle.crt";
/// The host's roots, baked into the image: with `ca_roots_from_image` the
/// bundle is these plus `ca_pem`, and the host need not send 200 KB of roots
/// through the port after every restore.
pub const IMAGE_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
pub const SANDBOX_ID: &str = "/run/tollgate/sandbox-id";
const RESOLV_CONF: &str = "/etc/resolv.conf";
const BUSYBOX: &str = "/bin/busybox";

/// The variables that point TLS clients at the CA bundle.
pub const CA_ENV_VARS: [&str; 4] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "CURL_CA_BUNDLE",
];

/// What later execs and spawns inherit. Replaced whole by every configure.
#[derive(Clone, Default)]
pub struct Config {
    pub env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ConfigureRequest {
    sandbox_id: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    ca_pem: Option<String>,
    #[serde(default)]
    ca_bundle: Option<String>,
    #[serde(default)]
    ca_roots_from_image: bool,
    /// Flush the neighbour caches (default on). The host turns it off when
    /// the gateway's MAC is the same for every clone: the cached entry is
    /// right, and the flush costs a process start in a cold emulated guest.
    #[serde(default = "yes")]
    flush_neighbours: bool,
    #[serde(default)]
    resolv_conf: Option<String>,
    #[serde(default)]
    clock_unix_ns: Option<u64>,
}

/// Writes `contents` to `path` (mode 0644) through a temporary file and a
/// rename, so a reader sees the old or the new file, never a partial one.
fn write_atomic(path: &str, contents: &[u8]) -> io::Result<()> {
    let tmp = format!("{path}.tmp-{}", std::process::id());
    let res = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

fn remove_if_present(path: &str) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn check_hostname(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !h.starts_with('-')
        && !h.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid hostname {h:?}"))
    }
}

/// Drops every dynamic IPv4 and IPv6 neighbour entry of every interface but
/// lo: after a memory-snapshot restore the gateway has another MAC address.
fn flush_neighbours() -> Result<(), String> {
    let mut ifaces: Vec<String> = match fs::read_dir("/sys/class/net") {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(e) => return Err(format!("/sys/class/net: {e}")),
    };
    ifaces.retain(|i| i != "lo");
    ifaces.sort();
    // One run per interface: without a family, busybox flushes both (each
    // process costs milliseconds in an emulated guest).
    for iface in ifaces {
        let out = Command::new(BUSYBOX)
            .args(["ip", "neigh", "flush", "dev", &iface])
            .env_clear()
            .output()
            .map_err(|e| format!("{BUSYBOX} ip neigh flush: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip neigh flush dev {iface}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// Applies a configure request to the guest and replaces `config`.
pub fn configure(config: &mut Config, req: Value) -> Result<Value, String> {
    let req: ConfigureRequest =
        serde_json::from_value(req).map_err(|e| format!("bad configure request: {e}"))?;
    // Whatever fails below, nothing of the previous sandbox's config survives.
    *config = Config::default();
    remove_if_present(CA_PEM).map_err(|e| format!("{CA_PEM}: {e}"))?;
    remove_if_present(CA_BUNDLE).map_err(|e| format!("{CA_BUNDLE}: {e}"))?;

    let env = req.env.unwrap_or_default();
    check_env(&env)?;
    if let Some(h) = &req.hostname {
        check_hostname(h)?;
    }
    if req.sandbox_id.is_empty() || req.sandbox_id.contains(['\n', '\0']) {
        return Err(format!("invalid sandbox_id {:?}", req.sandbox_id));
    }

    let mut clock_step_ms: i64 = 0;
    if let Some(ns) = req.clock_unix_ns {
        let before = sys::realtime_ns().map_err(|e| format!("clock_gettime: {e}"))?;
        sys::set_realtime_ns(ns).map_err(|e| format!("clock_settime: {e}"))?;
        let step = (i128::from(ns) - before) / 1_000_000;
        clock_step_ms = i64::try_from(step).unwrap_or(if step < 0 { i64::MIN } else { i64::MAX });
    }
    if let Some(h) = &req.hostname {
        sys::sethostname(h).map_err(|e| format!("sethostname: {e}"))?;
    }
    if let Some(r) = &req.resolv_conf {
        write_atomic(RESOLV_CONF, r.as_bytes()).map_err(|e| format!("{RESOLV_CONF}: {e}"))?;
    }
    fs::create_dir_all(RUN_DIR).map_err(|e| format!("{RUN_DIR}: {e}"))?;
    let _ = fs::set_permissions(RUN_DIR, fs::Permissions::from_mode(0o755));
    if let Some(pem) = &req.ca_pem {
        write_atomic(CA_PEM, pem.as_bytes()).map_err(|e| format!("{CA_PEM}: {e}"))?;
    }
    let bundle = match (&req.ca_bundle, &req.ca_pem, req.ca_roots_from_image) {
        (Some(b), _, _) => Some(b.clone().into_bytes()),
        (None, Some(pem), true) => {
            let mut b = fs::read(IMAGE_ROOTS).map_err(|e| format!("{IMAGE_ROOTS}: {e}"))?;
            if !b.is_empty() && !b.ends_with(b"\n") {
                b.push(b'\n');
            }
            b.extend_from_slice(pem.as_bytes());
            if !b.ends_with(b"\n") {
                b.push(b'\n');
            }
            Some(b)
        }
        _ => None,
    };
    if let Some(bundle) = &bundle {
        write_atomic(CA_BUNDLE, bundle).map_err(|e| format!("{CA_BUNDLE}: {e}"))?;
    }
    write_atomic(SANDBOX_ID, format!("{}\n", req.sandbox_id).as_bytes())
        .map_err(|e| format!("{SANDBOX_ID}: {e}"))?;
    if !req.flush_neighbours {
        // The gateway's address and MAC are the same for every clone.
    } else if Path::new(BUSYBOX).exists() {
        flush_neighbours()?;
    } else {
        return Err(format!(
            "{BUSYBOX} missing: cannot flush the neighbour caches"
        ));
    }

    let mut new_env = env;
    if bundle.is_some() {
        for var in CA_ENV_VARS {
            new_env.insert(var.to_string(), CA_BUNDLE.to_string());
        }
    }
    *config = Config { env: new_env };
    Ok(json!({ "clock_step_ms": clock_step_ms }))
}

fn yes() -> bool {
    true
}
