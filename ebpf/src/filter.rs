//! One sandbox's filter: load, fill, attach, pin; reopen after a restart;
//! update; detach.
//!
//! Pin layout under the pin directory (e.g. `/sys/fs/bpf/tollgate/<id>/`):
//! one file per map (`tg_net`, `tg_active`, ... see [`crate::abi::names`]),
//! the sk_lookup program and its netns link as `lookup_prog` / `lookup_link`,
//! the TC program as `prog`, and the TC program once more as `link`, written
//! last, once its filter is attached: a directory with a `link` pin holds a
//! complete, attached filter.
//!
//! The TC program is attached as a direct-action `cls_bpf` filter on a
//! `clsact` qdisc (netlink), priority [`TC_PRIORITY`], handle [`TC_HANDLE`].
//! A filter belongs to the interface, not to a descriptor: it keeps enforcing
//! when the daemon dies, and goes with the interface. A TCX link would do the
//! same, but each TCX attach and detach waits for an RCU grace period
//! (10–20 ms here) where adding or deleting a filter takes well under 1 ms.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, Link};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle};
use aya::programs::{Program, ProgramError, SchedClassifier, SkLookup, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::abi::{self, names};
use crate::error::EbpfError;
use crate::events::EventReader;
use crate::maps::Tables;
use crate::policy::{CompiledFloor, EgressPolicy, FloorSet, SandboxNet};
use crate::verdict::Counters;
use crate::{ensure_bpffs, sys, EGRESS_OBJECT, LOOKUP_OBJECT};

/// File name of the "attached" marker: the TC program pinned a second time,
/// after its filter is attached.
pub const LINK_PIN: &str = "link";
/// The `cls_bpf` filter's priority on the interface's ingress (first).
pub const TC_PRIORITY: u16 = 1;
/// The `cls_bpf` filter's handle.
pub const TC_HANDLE: u32 = 0x7467;
/// File name of the TC program pin.
pub const PROG_PIN: &str = "prog";
/// File name of the sk_lookup (netns) link pin.
pub const LOOKUP_LINK_PIN: &str = "lookup_link";
/// File name of the sk_lookup program pin.
pub const LOOKUP_PROG_PIN: &str = "lookup_prog";

/// An attached egress filter. Dropping it leaves the program attached and
/// enforcing (everything is pinned); [`Filter::detach`] or [`Filter::remove`]
/// take it away.
pub struct Filter {
    pin_dir: PathBuf,
    tables: Tables,
    /// Where the TC filter is (None: its router namespace is gone).
    site: Option<Site>,
    lookup_link: OwnedFd,
    net: SandboxNet,
    floor: CompiledFloor,
    policy: EgressPolicy,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("pin_dir", &self.pin_dir)
            .field("net", &self.net)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

// === impl Filter ===

impl Filter {
    /// Loads the program with fresh maps, fills them (`net`, `floor`,
    /// `policy`), attaches it at ingress of `ifname` — the first `cls_bpf`
    /// filter — inside the network namespace `netns` (e.g.
    /// `/run/netns/<router ns>`), and pins maps, program and link under
    /// `pin_dir`. The caller's thread never changes namespace: the attach runs
    /// on a short-lived thread that enters `netns`.
    ///
    /// Fails with [`EbpfError::AlreadyAttached`] when `pin_dir` already holds
    /// a filter; leftovers of an interrupted attach (pins without the marker,
    /// a TC filter without pins) are removed. TCP is dropped (`drop_no_listener`) until
    /// [`Filter::set_listeners`] registers the proxy.
    pub fn attach(
        pin_dir: &Path,
        netns: &Path,
        ifname: &str,
        net: &SandboxNet,
        floor: &FloorSet,
        policy: &EgressPolicy,
    ) -> Result<Filter, EbpfError> {
        ensure_bpffs()?;
        let mut net_abi = net.to_abi()?;
        let floor = floor.compile()?;
        let policy = policy.normalized()?;
        net_abi.ifindex =
            in_netns(netns, || nix::net::if_::if_nametoindex(ifname))?.map_err(|e| {
                EbpfError::Io {
                    what: format!("no interface {ifname} in {}", netns.display()),
                    source: e.into(),
                }
            })?;
        prepare_pin_dir(pin_dir)?;
        let attached = Attach {
            pin_dir,
            netns,
            ifname,
        }
        .run(&net_abi, &floor, &policy);
        match attached {
            Ok((tables, lookup_link)) => Ok(Filter {
                pin_dir: pin_dir.to_path_buf(),
                tables,
                site: Some(Site {
                    netns: netns.to_path_buf(),
                    ifindex: net_abi.ifindex,
                }),
                lookup_link,
                net: net.clone(),
                floor,
                policy,
            }),
            Err(e) => {
                // The sk_lookup link dies with its descriptor once unpinned;
                // the TC filter, if it got attached, is deleted.
                let _ = detach_tc(netns, net_abi.ifindex);
                let _ = remove_pins(pin_dir);
                Err(e)
            }
        }
    }

    /// Reopens a filter from its pins (after a daemon restart) without
    /// touching the attachment: enforcement never pauses. The live policy and
    /// floor are read back from the maps.
    pub fn open_pinned(pin_dir: &Path) -> Result<Filter, EbpfError> {
        ensure_bpffs()?;
        // The marker: the TC filter was attached.
        open_link(&pin_dir.join(LINK_PIN))?;
        let lookup_link = open_link(&pin_dir.join(LOOKUP_LINK_PIN))?;
        let tables = Tables::open_pinned(pin_dir)?;
        let net = tables.read_net()?;
        if net.abi_version != abi::ABI_VERSION {
            return Err(EbpfError::AbiMismatch {
                found: net.abi_version,
                expected: abi::ABI_VERSION,
            });
        }
        let live = tables.read_generation(tables.active()?)?;
        let site = netns_of_link(lookup_link.as_fd())?.map(|netns| Site {
            netns,
            ifindex: net.ifindex,
        });
        Ok(Filter {
            pin_dir: pin_dir.to_path_buf(),
            tables,
            site,
            lookup_link,
            net: SandboxNet::from_abi(&net),
            floor: live.floor,
            policy: live.policy,
        })
    }

    /// Does `pin_dir` hold an attached filter (a link pin)?
    pub fn is_pinned(pin_dir: &Path) -> bool {
        pin_dir.join(LINK_PIN).exists()
    }

    /// Replaces the policy atomically: every packet is judged entirely by the
    /// old or entirely by the new one (see the crate docs, "Atomic updates"). Returns when no
    /// packet is judged by the old one any more.
    pub fn set_policy(&mut self, policy: &EgressPolicy) -> Result<(), EbpfError> {
        let policy = policy.normalized()?;
        self.tables.publish(&self.floor, &policy)?;
        self.policy = policy;
        Ok(())
    }

    /// Replaces floor and policy together in one atomic step (two separate
    /// calls would expose the mix of the new floor and the old policy).
    pub fn replace(&mut self, floor: &FloorSet, policy: &EgressPolicy) -> Result<(), EbpfError> {
        let floor = floor.compile()?;
        let policy = policy.normalized()?;
        self.tables.publish(&floor, &policy)?;
        self.floor = floor;
        self.policy = policy;
        Ok(())
    }

    /// Replaces the floor atomically, like [`Filter::set_policy`].
    pub fn set_floor(&mut self, floor: &FloorSet) -> Result<(), EbpfError> {
        let floor = floor.compile()?;
        self.tables.publish(&floor, &self.policy)?;
        self.floor = floor;
        Ok(())
    }

    /// Registers the proxy's transparent listeners (sockets in the router
    /// namespace, listening, with `IP_TRANSPARENT`). `v6: None` clears the
    /// IPv6 slot. A listener that closes leaves the map by itself, and TCP is
    /// then dropped (fail closed).
    pub fn set_listeners(
        &mut self,
        v4: BorrowedFd<'_>,
        v6: Option<BorrowedFd<'_>>,
    ) -> Result<(), EbpfError> {
        self.tables.set_listener(abi::LISTENER_V4, Some(v4))?;
        self.tables.set_listener(abi::LISTENER_V6, v6)
    }

    /// Unregisters both listeners (TCP is dropped from now on).
    pub fn clear_listeners(&mut self) -> Result<(), EbpfError> {
        self.tables.set_listener(abi::LISTENER_V4, None)?;
        self.tables.set_listener(abi::LISTENER_V6, None)
    }

    /// Packets per verdict since attach, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, EbpfError> {
        self.tables.counters()
    }

    /// A reader of the drop events (one reader per filter at a time).
    pub fn event_reader(&self) -> Result<EventReader, EbpfError> {
        EventReader::new(self.tables.events_fd()?)
    }

    /// The live policy (normalised: host bits cleared, sorted).
    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// The live floor as written to the maps (normalised; private prefixes
    /// inside floor prefixes omitted).
    pub fn floor(&self) -> FloorSet {
        self.floor.to_set()
    }

    /// The sandbox's addresses.
    pub fn net(&self) -> &SandboxNet {
        &self.net
    }

    /// Where the filter is pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Detaches both programs (the TC filter and the netns link) and
    /// removes every pin; programs and maps are freed once the last
    /// descriptor closes. A router namespace that is already gone took the
    /// filter with it.
    pub fn detach(self) -> Result<(), EbpfError> {
        if let Some(site) = &self.site {
            detach_tc(&site.netns, site.ifindex)?;
        }
        sys::link_detach(self.lookup_link.as_fd())
            .map_err(EbpfError::io("BPF_LINK_DETACH (sk_lookup)"))?;
        remove_pins(&self.pin_dir)
    }

    /// [`Filter::detach`] without an open filter: detaches what the pins
    /// name (if anything) and removes every pin and the directory.
    /// Idempotent; a missing directory is fine.
    pub fn remove(pin_dir: &Path) -> Result<(), EbpfError> {
        let lookup = pin_dir.join(LOOKUP_LINK_PIN);
        match sys::obj_get(&lookup) {
            Ok(link) => {
                let netns = netns_of_link(link.as_fd())?;
                let ifindex = Tables::open_pinned(pin_dir)
                    .and_then(|t| t.read_net())
                    .map(|n| n.ifindex);
                if let (Some(netns), Ok(ifindex)) = (netns, ifindex) {
                    detach_tc(&netns, ifindex)?;
                }
                sys::link_detach(link.as_fd()).map_err(EbpfError::io(format!(
                    "BPF_LINK_DETACH {}",
                    lookup.display()
                )))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(EbpfError::io(format!("opening {}", lookup.display()))(e)),
        }
        remove_pins(pin_dir)
    }
}

/// Where a filter's TC program is attached.
#[derive(Clone, Debug)]
struct Site {
    /// The router namespace (a path under `/run/netns`).
    netns: PathBuf,
    /// The interface's index inside it.
    ifindex: u32,
}

/// Deletes tollgate's `cls_bpf` filter from ingress of interface `ifindex`
/// in `netns`. A namespace, interface, qdisc or filter that is gone is fine:
/// the filter went with it.
fn detach_tc(netns: &Path, ifindex: u32) -> Result<(), EbpfError> {
    if !netns.exists() {
        return Ok(());
    }
    let step = format!("delete the TC filter in {}", netns.display());
    in_netns(netns, || match nix::net::if_::if_indextoname(ifindex) {
        Ok(name) => delete_filter_here(&name.to_string_lossy()),
        Err(_) => Ok(()),
    })?
    .map_err(prog_err(&step))
}

/// Deletes tollgate's `cls_bpf` filter from ingress of `ifname` in the
/// calling thread's network namespace; one that is not there is fine.
fn delete_filter_here(ifname: &str) -> Result<(), ProgramError> {
    let link = match SchedClassifierLink::attached(
        ifname,
        TcAttachType::Ingress,
        TC_PRIORITY,
        TcHandle::from(TC_HANDLE),
        None,
    ) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV) => {
            return Ok(())
        }
        Err(e) => return Err(ProgramError::from(TcError::IoError(e))),
    };
    // ENOENT: no such filter; EINVAL: no clsact qdisc (any more); ENODEV: no
    // such interface any more.
    let gone = |code: Option<i32>| matches!(code, Some(libc::ENOENT | libc::EINVAL | libc::ENODEV));
    match link.detach() {
        Err(ProgramError::NetlinkError(e)) if gone(e.raw_os_error()) => Ok(()),
        Err(ProgramError::TcError(TcError::NetlinkError(e))) if gone(e.raw_os_error()) => Ok(()),
        other => other,
    }
}

/// The router namespace an sk_lookup link is attached to: the entry of
/// `/run/netns` whose namespace is the link's. None when no entry names it
/// (the namespace was deleted, or is not under `/run/netns`).
fn netns_of_link(link: BorrowedFd<'_>) -> Result<Option<PathBuf>, EbpfError> {
    use std::os::unix::fs::MetadataExt;
    let ino =
        sys::netns_link_ino(link).map_err(EbpfError::io("BPF_OBJ_GET_INFO_BY_FD (netns link)"))?;
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Ok(None);
    };
    Ok(dir
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == u64::from(ino))))
}

/// Where `ip netns` (and tollgate) name network namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The steps of [`Filter::attach`] after validation; on error the caller
/// removes whatever was pinned.
struct Attach<'a> {
    pin_dir: &'a Path,
    netns: &'a Path,
    ifname: &'a str,
}

impl Attach<'_> {
    fn run(
        &self,
        net: &abi::NetConfig,
        floor: &CompiledFloor,
        policy: &EgressPolicy,
    ) -> Result<(Tables, OwnedFd), EbpfError> {
        let Self {
            pin_dir,
            netns,
            ifname,
        } = *self;

        // Fresh maps, filled before anything is attached.
        let mut egress = load_egress_object()?;
        let mut tables = Tables::take(&mut egress)?;
        tables.write_net(net)?;
        tables.fill_fresh(floor, policy)?;
        tables.pin(pin_dir)?;

        // sk_lookup in the router namespace; it shares tg_net and
        // tg_listeners through their pins.
        let mut lookup = with_loader(&LOADERS.lookup, |l| {
            l.map_pin_path(names::NET, pin_dir.join(names::NET))
                .map_pin_path(names::LISTENERS, pin_dir.join(names::LISTENERS))
                .load(LOOKUP_OBJECT)
        })?;
        let prog: &mut SkLookup = program(&mut lookup, abi::LOOKUP_PROGRAM)?;
        prog.load().map_err(prog_err("load sk_lookup"))?;
        pin_prog(pin_dir.join(LOOKUP_PROG_PIN), |p| prog.pin(p))?;
        let ns = File::open(netns).map_err(|source| EbpfError::Netns {
            path: netns.to_path_buf(),
            source,
        })?;
        let id = prog.attach(&ns).map_err(prog_err("attach sk_lookup"))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(prog_err("attach sk_lookup"))?
            .into();
        let lookup_link = pin_link(link, &pin_dir.join(LOOKUP_LINK_PIN))?;

        // The TC program, the first cls_bpf filter at ingress, attached
        // from a thread inside the router namespace (ifindex is
        // namespace-relative).
        let prog: &mut SchedClassifier = program(&mut egress, abi::EGRESS_PROGRAM)?;
        prog.load().map_err(prog_err("load tc"))?;
        pin_prog(pin_dir.join(PROG_PIN), |p| prog.pin(p))?;
        let step = format!("attach to {ifname} in {}", netns.display());
        in_netns(netns, || {
            // A filter at tollgate's priority and handle while the pin
            // directory was not complete is a leftover of an interrupted
            // attach (or of pins lost while the interface lived on): it goes,
            // or the new filter could not be added.
            delete_filter_here(ifname)?;
            match aya::programs::tc::qdisc_add_clsact(ifname) {
                Ok(()) => {}
                // Another user's clsact qdisc is as good as ours.
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(ProgramError::from(e)),
            }
            let id = prog.attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: TC_PRIORITY,
                    handle: TcHandle::from(TC_HANDLE),
                    ..NlOptions::default()
                }),
            )?;
            // The filter belongs to the interface from now on: dropping
            // aya's handle would delete it, so the handle is let go
            // (it holds no descriptor, only the interface, priority and
            // handle that `detach_tc` uses).
            std::mem::forget(prog.take_link(id)?);
            Ok(())
        })?
        .map_err(prog_err(&step))?;
        // Written last: the "attached" marker.
        pin_prog(pin_dir.join(LINK_PIN), |p| prog.pin(p))?;
        Ok((tables, lookup_link))
    }
}

/// The process's loaders, one per object. `EbpfLoader::new` parses the
/// kernel's BTF (`/sys/kernel/btf/vmlinux`, 10–20 ms) every time; a loader
/// reused for every attach parses it once. The sk_lookup loader's only
/// per-load settings are the pin paths of `tg_net` and `tg_listeners`, which
/// every load overwrites, so nothing of one sandbox reaches the next.
struct Loaders {
    egress: std::sync::Mutex<EbpfLoader<'static>>,
    lookup: std::sync::Mutex<EbpfLoader<'static>>,
}

static LOADERS: std::sync::LazyLock<Loaders> = std::sync::LazyLock::new(|| Loaders {
    egress: std::sync::Mutex::new(EbpfLoader::new()),
    lookup: std::sync::Mutex::new(EbpfLoader::new()),
});

/// The TC object with fresh maps.
pub(crate) fn load_egress_object() -> Result<Ebpf, EbpfError> {
    with_loader(&LOADERS.egress, |l| l.load(EGRESS_OBJECT))
}

fn with_loader(
    loader: &std::sync::Mutex<EbpfLoader<'static>>,
    f: impl FnOnce(&mut EbpfLoader<'static>) -> Result<Ebpf, aya::EbpfError>,
) -> Result<Ebpf, EbpfError> {
    let mut guard = loader.lock().unwrap_or_else(|p| p.into_inner());
    Ok(f(&mut guard)?)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| EbpfError::Missing {
            what: format!("program {name} in the object"),
        })?
        .try_into()
        .map_err(prog_err(&format!("program {name}")))
}

fn prog_err(step: &str) -> impl FnOnce(ProgramError) -> EbpfError + '_ {
    move |source| EbpfError::Program {
        step: step.to_owned(),
        source,
    }
}

fn pin_prog(
    path: PathBuf,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), EbpfError> {
    pin(&path).map_err(|source| EbpfError::Pin { path, source })
}

/// Pins `link` and returns a descriptor of the pinned link.
fn pin_link(link: FdLink, path: &Path) -> Result<OwnedFd, EbpfError> {
    link.pin(path).map_err(|source| EbpfError::Pin {
        path: path.to_path_buf(),
        source,
    })?;
    sys::obj_get(path).map_err(EbpfError::io(format!("opening {}", path.display())))
}

/// A descriptor of the link pinned at `path`.
fn open_link(path: &Path) -> Result<OwnedFd, EbpfError> {
    match sys::obj_get(path) {
        Ok(fd) => Ok(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(EbpfError::Missing {
            what: format!("pinned link {}", path.display()),
        }),
        Err(e) => Err(EbpfError::io(format!("opening {}", path.display()))(e)),
    }
}

/// Creates `dir`, refusing one with a link pin and clearing leftovers.
fn prepare_pin_dir(dir: &Path) -> Result<(), EbpfError> {
    if dir.join(LINK_PIN).exists() {
        return Err(EbpfError::AlreadyAttached(dir.to_path_buf()));
    }
    if dir.exists() {
        remove_pins(dir)?;
    }
    std::fs::create_dir_all(dir).map_err(EbpfError::io(format!("creating {}", dir.display())))
}

/// Unlinks the pins this crate writes (link first), then the directory if
/// it is empty. Missing files are fine.
fn remove_pins(dir: &Path) -> Result<(), EbpfError> {
    let files = [LINK_PIN, LOOKUP_LINK_PIN, PROG_PIN, LOOKUP_PROG_PIN]
        .into_iter()
        .chain(names::ALL);
    for name in files {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(EbpfError::io(format!("removing {}", path.display()))(e)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(EbpfError::io(format!("removing {}", dir.display()))(e)),
    }
}

/// Runs `f` on a new thread that has entered the network namespace `netns`.
fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T, EbpfError> {
    let ns_err = |source: io::Error| EbpfError::Netns {
        path: netns.to_path_buf(),
        source,
    };
    let file = File::open(netns).map_err(ns_err)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("attach thread panicked")))
    })
    .map_err(ns_err)
}
