//! Every libc call of the agent, behind small safe wrappers.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// Makes the command's child call setsid(2) before exec: its own session and
/// process group, whose id is the child's pid.
pub fn new_session_on_exec(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls setsid(2),
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(File, File)> {
    let mut fds: [libc::c_int; 2] = [-1; 2];
    // SAFETY: pipe2 writes two file descriptors into the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(last_error());
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(rd), File::from(wr)))
}

/// Sends SIGKILL to every member of process group `pgid`.
pub fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory
    // is passed.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Waits until one of `fds` is readable (data, EOF or error) or the timeout
/// passes (None: no timeout). Returns one flag per fd; all false on timeout
/// or EINTR.
pub fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let timeout_ms: libc::c_int = match timeout {
        None => -1,
        // Round up so a poll never returns just before its deadline.
        Some(d) => {
            libc::c_int::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(libc::c_int::MAX)
        }
    };
    let nfds = libc::nfds_t::try_from(pfds.len()).map_err(|_| io::Error::other("too many fds"))?;
    // SAFETY: pfds is a valid, writable array of nfds pollfd structures for
    // the whole call.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, timeout_ms) };
    if rc < 0 {
        let e = last_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
        .collect())
}

/// CLOCK_REALTIME in nanoseconds since the epoch (negative before 1970).
pub fn realtime_ns() -> io::Result<i128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } < 0 {
        return Err(last_error());
    }
    Ok(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

/// Steps CLOCK_REALTIME to `ns` nanoseconds since the epoch.
pub fn set_realtime_ns(ns: u64) -> io::Result<()> {
    let secs = libc::time_t::try_from(ns / 1_000_000_000)
        .map_err(|_| io::Error::other("clock out of range"))?;
    let nanos = libc::c_long::try_from(ns % 1_000_000_000)
        .map_err(|_| io::Error::other("clock out of range"))?;
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    // SAFETY: ts is a valid timespec that the kernel only reads.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(last_error());
    }
    Ok(())
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe the bytes of `name`, which the
    // kernel only reads.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } < 0 {
        return Err(last_error());
    }
    Ok(())
}

fn errno() -> libc::c_int {
    // SAFETY: __errno_location returns the calling thread's errno slot, always
    // valid; reading it is async-signal-safe.
    unsafe { *libc::__errno_location() }
}

/// Writes all of `buf` to `fd` with write(2) only (async-signal-safe).
fn raw_write_all(fd: RawFd, buf: &[u8]) {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: the pointer and length stay inside `buf`.
        let n = unsafe { libc::write(fd, buf[off..].as_ptr().cast(), buf.len() - off) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return;
        }
        if n == 0 {
            return;
        }
        off += n.unsigned_abs();
    }
}

/// Starts `path` with `argv` and `envp` as a detached daemon: a double fork,
/// so the process is a child of init (PID 1, which reaps it), never of the
/// agent; it calls setsid(2) (pid = process group = session), its stdio is
/// /dev/null and its working directory `cwd`. Returns its pid once it has
/// exec'd, or the exec error.
pub fn spawn_detached(
    path: &CStr,
    argv: &[CString],
    envp: &[CString],
    cwd: &CStr,
) -> io::Result<i32> {
    let devnull = File::options().read(true).write(true).open("/dev/null")?;
    let devnull_fd = devnull.as_raw_fd();
    let argv_p: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_p: Vec<*const libc::c_char> = envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    let (rd, wr) = pipe()?;
    let wr_fd = wr.as_raw_fd();

    // SAFETY: fork(2) in a multithreaded process: the child below calls only
    // async-signal-safe functions (pipe2, fork, setsid, dup2, signal,
    // sigprocmask, chdir, execve, read, write, close, waitpid, _exit) on
    // memory prepared before the fork, and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_error());
    }
    if pid == 0 {
        // SAFETY: see above; this is the intermediate child.
        unsafe {
            intermediate(
                wr_fd,
                path.as_ptr(),
                &argv_p,
                &envp_p,
                devnull_fd,
                cwd.as_ptr(),
            )
        }
    }
    drop(wr);
    drop(devnull);
    let mut report = [0u8; 8];
    let read = (&rd).read_exact(&mut report);
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waits for our own intermediate child; status is writable.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc >= 0 || errno() != libc::EINTR {
            break;
        }
    }
    read.map_err(|e| io::Error::other(format!("spawn: no report from the forked child: {e}")))?;
    let child = i32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
    let err = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    if child <= 0 {
        return Err(io::Error::other("spawn: fork failed"));
    }
    Ok(child)
}

/// The intermediate child of `spawn_detached`: forks the daemon, reports
/// (pid, exec errno) to the agent on `report_fd`, and exits.
///
/// # Safety
/// Must only be called in a freshly forked child; all pointers must be valid
/// NUL-terminated strings / NULL-terminated arrays.
unsafe fn intermediate(
    report_fd: RawFd,
    path: *const libc::c_char,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    devnull: RawFd,
    cwd: *const libc::c_char,
) -> ! {
    let report = |pid: libc::pid_t, err: libc::c_int| {
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&pid.to_ne_bytes());
        buf[4..].copy_from_slice(&err.to_ne_bytes());
        raw_write_all(report_fd, &buf);
    };
    let mut efds: [libc::c_int; 2] = [-1; 2];
    // SAFETY: as in spawn_detached.
    unsafe {
        if libc::pipe2(efds.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
            report(-1, errno());
            libc::_exit(1);
        }
        let pid = libc::fork();
        if pid < 0 {
            report(-1, errno());
            libc::_exit(1);
        }
        if pid == 0 {
            // The daemon itself.
            libc::close(efds[0]);
            libc::setsid();
            for fd in 0..3 {
                libc::dup2(devnull, fd);
            }
            // The agent ignores SIGPIPE (Rust's runtime does); an ignored
            // disposition survives exec, so restore the default.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if libc::chdir(cwd) == 0 {
                libc::execve(path, argv.as_ptr(), envp.as_ptr());
            }
            let e = errno();
            raw_write_all(efds[1], &e.to_ne_bytes());
            libc::_exit(127);
        }
        libc::close(efds[1]);
        let mut buf = [0u8; 4];
        let mut got = 0usize;
        loop {
            let n = libc::read(efds[0], buf[got..].as_mut_ptr().cast(), 4 - got);
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            got += n.unsigned_abs();
            if got == 4 {
                break;
            }
        }
        let err = if got == 4 {
            libc::c_int::from_ne_bytes(buf)
        } else {
            0
        };
        if err != 0 {
            // The daemon failed to exec and exits at once: reap it here.
            let mut st: libc::c_int = 0;
            libc::waitpid(pid, &mut st, 0);
        }
        report(pid, err);
        libc::_exit(0);
    }
}
