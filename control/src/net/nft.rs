//! The nftables rulesets of the router namespace and of the host, and the
//! one subprocess the network code runs: `nft -f -`.
//!
//! Each ruleset replaces its table atomically and idempotently: `table X`
//! (create if missing), `delete table X`, then the full definition, all in one
//! nft transaction, so concurrent or repeated loads never see a half table.
//!
//! `nft` is started by a dedicated thread that first joined the target
//! network namespace, so the process is born there (a child inherits the
//! namespaces of the thread that spawns it): no `pre_exec`, no `ip netns
//! exec`, no unsafe code.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{
    ns, NetError, NetPlan, NetworkInfo, ALLOW_MARK, CA_PORT, HOST_IF_PREFIX, HOST_TABLE,
    ROUTER_TABLE, STEER_MARK,
};

/// The router namespace's table (`inet tollgate`): see the module
/// documentation of [`crate::net`] for what each rule is for.
pub(super) fn router_ruleset(info: &NetworkInfo) -> String {
    let t = ROUTER_TABLE;
    let g = &info.gateway_if;
    let up = &info.uplink_if;
    let gw4 = info.gateway_v4;
    let gw6 = info.gateway_v6;
    let steer = STEER_MARK;
    let allow = ALLOW_MARK;
    let ca = CA_PORT;
    format!(
        "table inet {t}
delete table inet {t}
table inet {t} {{
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname \"{g}\" jump from_guest
\t}}
\tchain from_guest {{
\t\tmeta mark & {steer:#x} == {steer:#x} accept
\t\tct state established,related accept
\t\tip daddr {gw4} meta l4proto {{ tcp, udp }} th dport 53 accept
\t\tip6 daddr {gw6} meta l4proto {{ tcp, udp }} th dport 53 accept
\t\tip daddr {gw4} tcp dport {ca} accept
\t\tip6 daddr {gw6} tcp dport {ca} accept
\t\ticmp type echo-request accept
\t\ticmpv6 type {{ echo-request, nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }} accept
\t\tdrop
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy drop;
\t\tiifname \"{g}\" oifname \"{up}\" meta mark & {allow:#x} == {allow:#x} accept
\t\tiifname \"{up}\" oifname \"{g}\" ct state established,related accept
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname \"{up}\" masquerade
\t}}
}}
"
    )
}

/// The host's table (`inet tollgate_host`, root namespace).
pub(super) fn host_ruleset(plan: &NetPlan) -> String {
    let t = HOST_TABLE;
    let h = format!("{HOST_IF_PREFIX}*");
    let p4 = plan.pool4.trunc();
    let p6 = plan.pool6.trunc();
    let mut s = String::new();
    let _ = write!(
        s,
        "table inet {t}
delete table inet {t}
table inet {t} {{
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname \"{h}\" oifname \"{h}\" drop
\t\tiifname \"{h}\" ip saddr {p4} accept
\t\tiifname \"{h}\" ip6 saddr {p6} accept
\t\tiifname \"{h}\" drop
\t\toifname \"{h}\" ct state established,related accept
\t\toifname \"{h}\" drop
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname != \"{h}\" ip saddr {p4} masquerade
\t\toifname != \"{h}\" ip6 saddr {p6} masquerade
\t}}
}}
"
    );
    s
}

/// Where `nft` is: `$PATH`, then the Debian locations (a daemon started
/// without sbin in its PATH still finds it).
fn nft_binary() -> Result<PathBuf, NetError> {
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join("nft"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            NetError::Nft("the nft binary was not found: apt-get install -y nftables".into())
        })
}

fn run_nft(nft: &Path, ruleset: &str) -> Result<(), NetError> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Nft(format!("spawn {}: {e}", nft.display())))?;
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(ruleset.as_bytes()),
        None => Err(std::io::Error::other("no stdin")),
    };
    // stdin is closed here, so nft sees EOF.
    let out = child
        .wait_with_output()
        .map_err(|e| NetError::Nft(format!("wait for nft: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(NetError::Nft(format!(
            "nft -f - failed ({}): {}",
            out.status,
            stderr.trim()
        )));
    }
    written.map_err(|e| NetError::Nft(format!("write ruleset to nft: {e}")))
}

/// Loads `ruleset` with `nft -f -` inside the network namespace at `netns`
/// (the daemon's own namespace when `None`).
pub(super) async fn apply(netns: Option<&Path>, ruleset: String) -> Result<(), NetError> {
    let nft = nft_binary()?;
    let run = move || run_nft(&nft, &ruleset);
    match netns {
        Some(path) => ns::run_in(path, "nft", run).await,
        None => ns::on_dedicated_thread("nft", run).await,
    }
}
