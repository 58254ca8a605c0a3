//! Named network namespaces (`/run/netns/<name>`, like `ip netns`) and the
//! dedicated OS threads that enter them.
//!
//! A thread that `setns`'d stays in that namespace, so namespace work never
//! runs on a tokio worker or the caller's thread: it runs on a fresh OS thread
//! that exits when done. Sockets (netlink, listeners) created on such a
//! thread stay bound to its namespace after the thread is gone; sysctl files
//! under `/proc/sys/net` resolve to the namespace of the thread that opens
//! them; a child process spawned by it is born in that namespace.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use super::NetError;

/// Directory holding named network namespaces (same as iproute2).
pub const NETNS_DIR: &str = "/run/netns";

/// Path of a named network namespace: `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub(super) fn validate_netns_name(name: &str) -> Result<(), NetError> {
    if crate::validate::is_path_component(name, 200) {
        Ok(())
    } else {
        Err(NetError::Name(format!("network namespace name {name:?}")))
    }
}

pub(super) fn ns_err(name: &str, reason: impl std::fmt::Display) -> NetError {
    NetError::Netns {
        name: name.to_owned(),
        reason: reason.to_string(),
    }
}

/// Is `path` a mounted namespace file (nsfs)?
pub(super) fn is_nsfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

/// Does the named network namespace exist (as a mounted namespace file)?
pub fn netns_exists(name: &str) -> bool {
    is_nsfs(&netns_path(name))
}

/// Makes `/run/netns` exist and be a shared mount point, like `ip netns add`,
/// so that namespace mounts below it propagate to every mount namespace that
/// was cloned from ours.
fn prepare_netns_dir() -> Result<(), NetError> {
    // Serialised so that two concurrent first setups do not both bind-mount
    // the directory onto itself.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _lock = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Path::new(NETNS_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| ns_err(NETNS_DIR, format!("create directory: {e}")))?;
    let mut bound = false;
    loop {
        match mount(
            None::<&str>,
            dir,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) => return Ok(()),
            // Not a mount point yet: bind it onto itself, then retry.
            Err(Errno::EINVAL) if !bound => {
                mount(
                    Some(dir),
                    dir,
                    Some("none"),
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| ns_err(NETNS_DIR, format!("bind mount onto itself: {e}")))?;
                bound = true;
            }
            Err(e) => return Err(ns_err(NETNS_DIR, format!("make shared: {e}"))),
        }
    }
}

/// Creates the namespace on this (dedicated, about to exit) thread and binds
/// it to `/run/netns/<name>`. Returns whether it was created.
fn create_netns_blocking(name: &str) -> Result<bool, NetError> {
    validate_netns_name(name)?;
    prepare_netns_dir()?;
    let path = netns_path(name);
    if is_nsfs(&path) {
        return Ok(false);
    }
    let created_file = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&path)
    {
        Ok(_) => true,
        // A leftover plain file (e.g. a crash between create and mount): reuse it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(ns_err(name, format!("create {}: {e}", path.display()))),
    };
    let result = unshare(CloneFlags::CLONE_NEWNET)
        .map_err(|e| ns_err(name, format!("unshare(CLONE_NEWNET): {e}")))
        .and_then(|()| {
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| ns_err(name, format!("bind mount to {}: {e}", path.display())))
        });
    if let Err(e) = result {
        if created_file {
            let _ = fs::remove_file(&path);
        }
        return Err(e);
    }
    Ok(true)
}

/// Runs `f` on a fresh OS thread (which may change its namespaces freely and
/// then exits) without blocking the async caller.
pub(super) async fn on_dedicated_thread<T, F>(what: &str, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("tollgate-netns".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| NetError::Netlink(format!("{what}: spawn thread: {e}")))?;
    rx.await
        .map_err(|_| NetError::Netlink(format!("{what}: worker thread died")))?
}

/// Moves the calling thread into the network namespace at `path`. Only for
/// dedicated threads that exit afterwards.
pub(super) fn enter(path: &Path) -> io::Result<()> {
    let file = fs::File::open(path)?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Runs `f` inside the network namespace at `path`, on a dedicated thread.
pub(super) async fn run_in<T, F>(path: &Path, what: &str, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
{
    let path = path.to_owned();
    let label = what.to_owned();
    on_dedicated_thread(what, move || {
        enter(&path).map_err(|e| ns_err(&path.display().to_string(), format!("{label}: {e}")))?;
        f()
    })
    .await
}

/// Blocking variant of [`run_in`] for synchronous callers: spawns the thread
/// and joins it.
pub(super) fn run_in_blocking<T, F>(path: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("tollgate-netns".into())
        .spawn(move || {
            enter(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("enter {}: {e}", path.display())))?;
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("namespace worker thread panicked"))?
}

/// Writes sysctls (paths relative to `/proc/sys`) in the calling thread's
/// network namespace.
pub(super) fn write_sysctls(settings: &[(&str, &str)]) -> Result<(), NetError> {
    for (key, value) in settings {
        let path = Path::new("/proc/sys").join(key);
        fs::write(&path, value)
            .map_err(|e| NetError::Sysctl(format!("{} = {value}: {e}", path.display())))?;
    }
    Ok(())
}

/// Reads a sysctl (path relative to `/proc/sys`) in the calling thread's
/// network namespace.
pub(super) fn read_sysctl(key: &str) -> Option<String> {
    fs::read_to_string(Path::new("/proc/sys").join(key))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Creates the named network namespace `/run/netns/<name>` (like
/// `ip netns add`). Returns whether it was created (`false`: already there).
pub async fn create_netns(name: &str) -> Result<bool, NetError> {
    let name = name.to_owned();
    on_dedicated_thread("create namespace", move || create_netns_blocking(&name)).await
}

/// Deletes the named network namespace (like `ip netns delete`): lazy unmount
/// and unlink. Idempotent. The namespace itself goes away once nothing (a
/// process, an open socket or file) refers to it any more.
pub fn delete_netns(name: &str) -> Result<(), NetError> {
    validate_netns_name(name)?;
    let path = netns_path(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point; ENOENT: already gone.
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(ns_err(name, format!("unmount: {e}"))),
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ns_err(name, format!("remove {}: {e}", path.display()))),
    }
}
