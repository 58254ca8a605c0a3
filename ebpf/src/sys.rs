//! The crate's only `unsafe`: `aya::Pod` for the ABI structs and the
//! bpf(2) commands aya does not expose for links (`BPF_OBJ_GET` returning a
//! plain descriptor, `BPF_LINK_DETACH`, a netns link's namespace from
//! `BPF_OBJ_GET_INFO_BY_FD`), socket options and poll(2).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::abi::{Config, LpmV4, LpmV6, NetConfig, Owner, RawEvent, SpliceEnd};

// SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte
// arrays with no padding (sizes asserted in abi.rs), so every bit pattern is
// a valid value and the kernel may read or write them as raw bytes.
unsafe impl aya::Pod for NetConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for Owner {}
// SAFETY: as above.
unsafe impl aya::Pod for LpmV4 {}
// SAFETY: as above.
unsafe impl aya::Pod for LpmV6 {}
// SAFETY: as above.
unsafe impl aya::Pod for RawEvent {}
// SAFETY: as above.
unsafe impl aya::Pod for SpliceEnd {}

/// `BPF_OBJ_PIN` from `enum bpf_cmd`.
const BPF_OBJ_PIN: libc::c_long = 6;
/// `BPF_OBJ_GET` from `enum bpf_cmd`.
const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_LINK_DETACH` from `enum bpf_cmd`.
const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_OBJ_GET_INFO_BY_FD` from `enum bpf_cmd`.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_LINK_TYPE_NETNS` from `enum bpf_link_type`.
const BPF_LINK_TYPE_NETNS: u32 = 5;

/// The `info` member of `union bpf_attr`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` with its `netns` union member
/// (`type`, `id`, `prog_id`, then the 8-aligned union), and room to spare:
/// the kernel accepts a longer buffer whose tail is zero.
#[repr(C, align(8))]
struct LinkInfoNetns {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    netns_ino: u32,
    attach_type: u32,
    _rest: [u64; 12],
}

/// The `link_detach` member of `union bpf_attr`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// The `BPF_OBJ_*` member of `union bpf_attr` (without `path_fd`).
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// bpf(2): `cmd` with `attr` as its member of `union bpf_attr` (the kernel
/// reads `size_of::<A>()` bytes and zero-extends the rest). The
/// non-negative result, else the OS error.
///
/// # Safety
/// `A` must be the `#[repr(C)]` layout the kernel expects for `cmd`, and
/// every pointer inside `attr` must stay valid, for the reads and writes
/// `cmd` makes through it, for the duration of the call.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live value of `size_of::<A>()` bytes; what the
    // kernel does through the pointers inside it is the caller's contract.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const A,
            std::mem::size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the BPF object (map, program or link) pinned at `path`.
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a pin path"))?;
    let attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `ObjAttr` is BPF_OBJ_GET's layout; `pathname` points at a
    // NUL-terminated string that outlives the call; no user memory is
    // written.
    let rc = unsafe { bpf(BPF_OBJ_GET, &attr) }?;
    // SAFETY: on success BPF_OBJ_GET returns a new descriptor that nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as libc::c_int) })
}

/// Pins the BPF object `fd` at `path` (one more reference to it).
pub(crate) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a pin path"))?;
    let attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: `ObjAttr` is BPF_OBJ_PIN's layout; `pathname` points at a
    // NUL-terminated string that outlives the call; no user memory is
    // written.
    unsafe { bpf(BPF_OBJ_PIN, &attr) }.map(|_| ())
}

/// Detaches a BPF link from its hook even while other descriptors or pins
/// still reference it (they then hold a defunct link).
pub(crate) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: `LinkDetachAttr` is BPF_LINK_DETACH's layout; it holds no
    // pointer and no memory is written.
    unsafe { bpf(BPF_LINK_DETACH, &attr) }.map(|_| ())
}

/// The inode of the network namespace a netns link (sk_lookup) is attached
/// to; 0 once that namespace is gone.
pub(crate) fn netns_link_ino(link: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = LinkInfoNetns {
        kind: 0,
        id: 0,
        prog_id: 0,
        _pad: 0,
        netns_ino: 0,
        attach_type: 0,
        _rest: [0; 12],
    };
    let attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfoNetns>() as u32,
        info: &mut info as *mut LinkInfoNetns as u64,
    };
    // SAFETY: `InfoAttr` is BPF_OBJ_GET_INFO_BY_FD's layout; the kernel
    // writes at most `info_len` bytes into `info`, a live, exclusively
    // borrowed #[repr(C)] buffer of exactly that size made only of integers.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &attr) }?;
    if info.kind != BPF_LINK_TYPE_NETNS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("link type {} is not a netns link", info.kind),
        ));
    }
    Ok(info.netns_ino)
}

/// Waits up to `timeout_ms` for `fd` to become readable (poll(2)); true
/// when it is.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live, exclusively borrowed pollfd, and nfds = 1.
    let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    match rc {
        r if r < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// `SO_NETNS_COOKIE` (asm-generic/socket.h): the cookie of the socket's
/// network namespace.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace.
pub(crate) fn current_netns_cookie() -> io::Result<u64> {
    let s = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
    // SAFETY: SO_NETNS_COOKIE writes one u64.
    unsafe {
        getsockopt_pod(
            std::os::fd::AsFd::as_fd(&s),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            0u64,
        )
    }
}

/// Is process `pid` alive (kill(pid, 0) does not answer ESRCH)?
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// `SO_COOKIE` (asm-generic/socket.h): the socket's 64-bit cookie, the key
/// the kernel tunnel's maps use.
const SO_COOKIE: libc::c_int = 57;

/// getsockopt(2) of a plain-old-data value.
///
/// # Safety
/// `T` must be the layout the kernel writes for `level`/`name` (or a prefix
/// of it: the kernel writes at most `size_of::<T>()` bytes), made only of
/// integers, so that every bit pattern is valid.
unsafe fn getsockopt_pod<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    mut value: T,
) -> io::Result<T> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a live, exclusively borrowed `T` of `len` bytes;
    // the kernel writes at most `len` bytes into it and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// The socket's cookie (`SO_COOKIE`).
pub(crate) fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: SO_COOKIE writes one u64.
    unsafe { getsockopt_pod(fd, libc::SOL_SOCKET, SO_COOKIE, 0u64) }
}

/// `tcpi_bytes_received` and `tcpi_bytes_acked` of a TCP socket
/// (`TCP_INFO`), then the bytes in its send queue, not yet acknowledged
/// (`SIOCOUTQ`), read in that order.
pub(crate) fn tcp_bytes(fd: BorrowedFd<'_>) -> io::Result<(u64, u64, u64)> {
    // SAFETY: an all-zero `tcp_info` (integers only) is a valid value.
    let zero: libc::tcp_info = unsafe { std::mem::zeroed() };
    // SAFETY: TCP_INFO writes (a prefix of) `struct tcp_info`, whose libc
    // mirror is made only of integers.
    let info = unsafe { getsockopt_pod(fd, libc::IPPROTO_TCP, libc::TCP_INFO, zero) }?;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one c_int through the pointer, a
    // live, exclusively borrowed value.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCOUTQ,
            &mut outq as *mut libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((
        info.tcpi_bytes_received,
        info.tcpi_bytes_acked,
        u64::try_from(outq).unwrap_or(0),
    ))
}

/// `setsockopt(SOL_SOCKET, SO_RCVLOWAT, 1)`: besides setting the low-water
/// mark to its default, TCP runs the socket's data-ready callback when data
/// is waiting (`tcp_set_rcvlowat`).
pub(crate) fn kick_rcvlowat(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: SO_RCVLOWAT reads one c_int from a live value of that size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
