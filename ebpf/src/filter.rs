//! One sandbox's filter: load, fill, attach, pin; reopen after a restart;
//! update; detach.
//!
//! Pin layout under the pin directory (e.g. `/sys/fs/bpf/tollgate/<id>/`):
//! one file per map (`tg_net`, `tg_active`, ... see [`crate::abi::names`]),
//! the sk_lookup program and its netns link as `lookup_prog` / `lookup_link`,
//! the TC program as `prog` and its TCX link as `link`. The TCX link pin is
//! written last: a directory with a `link` pin holds a complete, attached
//! filter.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, Program, ProgramError, SchedClassifier, SkLookup, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::abi::{self, names};
use crate::error::EbpfError;
use crate::events::EventReader;
use crate::maps::Tables;
use crate::policy::{CompiledFloor, EgressPolicy, FloorSet, SandboxNet};
use crate::verdict::Counters;
use crate::{ensure_bpffs, sys, EGRESS_OBJECT, LOOKUP_OBJECT};

/// File name of the TCX link pin (written last: the "attached" marker).
pub const LINK_PIN: &str = "link";
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
    link: OwnedFd,
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
    /// `policy`), attaches it with TCX at ingress of `ifname` — first in the
    /// chain — inside the network namespace `netns` (e.g.
    /// `/run/netns/<router ns>`), and pins maps, program and link under
    /// `pin_dir`. The caller's thread never changes namespace: the attach runs
    /// on a short-lived thread that enters `netns`.
    ///
    /// Fails with [`EbpfError::AlreadyAttached`] when `pin_dir` already holds
    /// a filter; leftovers of an interrupted attach (pins without a link) are
    /// removed. TCP is dropped (`drop_no_listener`) until
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
            Ok((tables, link, lookup_link)) => Ok(Filter {
                pin_dir: pin_dir.to_path_buf(),
                tables,
                link,
                lookup_link,
                net: net.clone(),
                floor,
                policy,
            }),
            Err(e) => {
                // Links die with their descriptors once unpinned: nothing
                // stays attached.
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
        let link = open_link(&pin_dir.join(LINK_PIN))?;
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
        Ok(Filter {
            pin_dir: pin_dir.to_path_buf(),
            tables,
            link,
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

    /// Detaches both programs (TCX link and netns link) and removes every
    /// pin; programs and maps are freed once the last descriptor closes.
    pub fn detach(self) -> Result<(), EbpfError> {
        sys::link_detach(self.link.as_fd()).map_err(EbpfError::io("BPF_LINK_DETACH (tcx)"))?;
        sys::link_detach(self.lookup_link.as_fd())
            .map_err(EbpfError::io("BPF_LINK_DETACH (sk_lookup)"))?;
        remove_pins(&self.pin_dir)
    }

    /// [`Filter::detach`] without an open filter: detaches the pinned links
    /// (if any) and removes every pin and the directory. Idempotent; a
    /// missing directory is fine.
    pub fn remove(pin_dir: &Path) -> Result<(), EbpfError> {
        for name in [LINK_PIN, LOOKUP_LINK_PIN] {
            let path = pin_dir.join(name);
            match sys::obj_get(&path) {
                Ok(link) => sys::link_detach(link.as_fd())
                    .map_err(EbpfError::io(format!("BPF_LINK_DETACH {}", path.display())))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(EbpfError::io(format!("opening {}", path.display()))(e)),
            }
        }
        remove_pins(pin_dir)
    }
}

/// Names of the TCX ingress programs attached to `ifname` in the network
/// namespace `netns`, in run order (a health check: tollgate's is
/// [`abi::EGRESS_PROGRAM`]).
pub fn tcx_ingress_programs(netns: &Path, ifname: &str) -> Result<Vec<String>, EbpfError> {
    let (_, programs) = in_netns(netns, || {
        SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
    })?
    .map_err(|source| EbpfError::Program {
        step: format!("query TCX programs of {ifname}"),
        source,
    })?;
    Ok(programs
        .iter()
        .map(|p| p.name_as_str().unwrap_or_default().to_owned())
        .collect())
}

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
    ) -> Result<(Tables, OwnedFd, OwnedFd), EbpfError> {
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

        // The TC program, first in the TCX chain, attached from a thread
        // inside the router namespace (ifindex is namespace-relative).
        let prog: &mut SchedClassifier = program(&mut egress, abi::EGRESS_PROGRAM)?;
        prog.load().map_err(prog_err("load tc"))?;
        pin_prog(pin_dir.join(PROG_PIN), |p| prog.pin(p))?;
        let step = format!("attach to {ifname} in {}", netns.display());
        let id = in_netns(netns, || {
            prog.attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
        })?
        .map_err(prog_err(&step))?;
        let link = prog.take_link(id).map_err(prog_err(&step))?;
        let link: FdLink = link.try_into().map_err(|source| EbpfError::Link {
            path: pin_dir.join(LINK_PIN),
            source,
        })?;
        let link = pin_link(link, &pin_dir.join(LINK_PIN))?;
        Ok((tables, link, lookup_link))
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
