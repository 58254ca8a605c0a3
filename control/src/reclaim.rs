//! What an earlier daemon left on the host and no store knows any more (its
//! state dir was lost, or it was killed between creating a sandbox's network
//! and recording it): namespaces `tollgate-<id>` / `tgr-<id>`, the processes
//! in them (and QEMUs serving them), eBPF pins under the pin root, and the
//! owner files below.
//!
//! Every daemon holds an exclusive lock on `<state_dir>/daemon.lock` while
//! it runs, and [`crate::net::setup`] records, before it creates anything,
//! which state dir a sandbox belongs to (`/run/tollgate/owners/<id>`). At
//! start the daemon reclaims every leftover that is its own, or whose owner
//! is gone for good (no daemon holds the owner's lock and the owner's store
//! is gone). A leftover of another running daemon, or of a stopped one whose
//! store still knows it, is left alone (that daemon adopts or releases it);
//! the slot allocator steps past the links such a sandbox holds.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::net::{self, ROUTER_NETNS_PREFIX, SANDBOX_NETNS_PREFIX};

/// The lock file every running daemon holds in its state dir.
pub const LOCK_FILE: &str = "daemon.lock";
/// The store file whose presence says a stopped daemon still knows its
/// sandboxes.
pub const STORE_FILE: &str = "tollgate.redb";

/// An exclusive lock on a state dir, held for the daemon's lifetime.
pub struct StateLock {
    _lock: Flock<fs::File>,
}

/// Takes the exclusive lock on `state_dir` (created if needed): a second
/// daemon on the same state dir is refused with a clear message.
pub fn lock_state_dir(state_dir: &Path) -> io::Result<StateLock> {
    fs::create_dir_all(state_dir)?;
    let path = state_dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(StateLock { _lock: lock }),
        Err((_, Errno::EWOULDBLOCK)) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another tollgate daemon runs on the state dir {}",
                state_dir.display()
            ),
        )),
        Err((_, e)) => Err(e.into()),
    }
}

/// Does a running daemon hold the lock of `state_dir`?
fn lock_held(state_dir: &Path) -> bool {
    let Ok(file) = fs::OpenOptions::new()
        .write(true)
        .open(state_dir.join(LOCK_FILE))
    else {
        return false;
    };
    // A lock taken here is released when it is dropped.
    matches!(
        Flock::lock(file, FlockArg::LockExclusiveNonblock),
        Err((_, Errno::EWOULDBLOCK))
    )
}

/// Who a leftover belongs to, and what to do with it.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Ours, or its owner is gone: release it.
    Reclaim,
    /// Another daemon (running, or stopped with its store) keeps it.
    Foreign(String),
}

/// Decides about leftover `id` whose owner file names `owner` (`None`: no
/// owner file).
pub fn verdict(owner: Option<&Path>, me: &Path) -> Verdict {
    match owner {
        None => Verdict::Reclaim,
        Some(o) if o == me => Verdict::Reclaim,
        Some(o) if lock_held(o) => {
            Verdict::Foreign(format!("the running daemon of state dir {}", o.display()))
        }
        Some(o) if o.join(STORE_FILE).exists() => Verdict::Foreign(format!(
            "the stopped daemon of state dir {}, whose store knows it",
            o.display()
        )),
        Some(_) => Verdict::Reclaim,
    }
}

/// Sandbox ids something of which is on the host: namespaces, pins, owner
/// files.
pub fn ids_on_host(pin_root: &Path) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for e in read_names(Path::new(net::NETNS_DIR)) {
        for prefix in [SANDBOX_NETNS_PREFIX, ROUTER_NETNS_PREFIX] {
            if let Some(id) = e.strip_prefix(prefix) {
                ids.insert(id.to_owned());
            }
        }
    }
    ids.extend(read_names(pin_root));
    if let Some(dir) = net::owners_dir() {
        ids.extend(read_names(&dir));
    }
    ids.retain(|id| crate::validate::is_path_component(id, 100) && id.starts_with("sbx-"));
    ids
}

fn read_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect()
}

/// Kills every process in the namespaces of sandbox `id` and every QEMU
/// serving it (its command line names `vm/run/<id>/`); waits (bounded) for
/// them to go. Returns how many were killed.
pub fn kill_processes(id: &str) -> usize {
    let inodes: HashSet<u64> = [net::netns_name(id), net::router_netns_name(id)]
        .iter()
        .filter_map(|n| fs::metadata(net::netns_path(n)).ok())
        .map(|m| m.ino())
        .collect();
    let run_dir = format!("vm/run/{id}/");
    let mut killed = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let in_ns = fs::read_link(e.path().join("ns/net"))
            .ok()
            .and_then(|l| {
                let l = l.to_string_lossy().into_owned();
                l.strip_prefix("net:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            })
            .is_some_and(|ino| inodes.contains(&ino));
        let serves = fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&run_dir))
            .unwrap_or(false);
        if (in_ns || serves) && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            killed.push(pid);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline
        && killed
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}/ns")).exists())
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    killed.len()
}

/// The owner file of a leftover: the state dir it names.
pub fn owner_of(id: &str) -> Option<PathBuf> {
    let dir = net::owners_dir()?;
    let text = fs::read_to_string(dir.join(id)).ok()?;
    text.lines().next().map(PathBuf::from)
}
