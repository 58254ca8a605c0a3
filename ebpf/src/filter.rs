//! One sandbox's filter: claim a slot in the shared maps, fill it, attach
//! the shared program, pin; reopen after a restart; update; detach.
//!
//! The TC program is loaded and verified once per pin root and instance
//! (see [`crate::shared`]); a sandbox is a slot in its maps. Pin layout of a
//! sandbox's directory (e.g. `/sys/fs/bpf/tollgate/<id>/`): the slot marker
//! `tg_slot_<slot>_<instance>` (an empty directory naming the slot and the
//! shared object), the shared sk_lookup program's netns link as
//! `lookup_link`, and the shared TC program pinned once more
//! as `link`, written last, once its filter is attached: a directory with a
//! `link` pin holds a complete, attached filter.
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
use std::sync::Arc;

use aya::programs::links::{FdLink, Link};
use aya::programs::tc::{SchedClassifierLink, TcError, TcHandle};
use aya::programs::{Program, ProgramError, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::abi::{self, names};
use crate::error::EbpfError;
use crate::events::EventReader;
use crate::maps::{self, lock, Index, SlotEntries};
use crate::policy::{CompiledFloor, EgressPolicy, FloorSet, SandboxNet};
use crate::shared::{self, Shared};
use crate::verdict::Counters;
use crate::{ensure_bpffs, netlink, sys, EGRESS_OBJECT, LOOKUP_OBJECT};

/// File name of the "attached" marker: the shared TC program pinned once
/// more, after the sandbox's filter is attached.
pub const LINK_PIN: &str = "link";
/// The `cls_bpf` filter's priority on the interface's ingress (first).
pub const TC_PRIORITY: u16 = 1;
/// The `cls_bpf` filter's handle.
pub const TC_HANDLE: u32 = 0x7467;
/// File name of the TC program pin of the per-sandbox layout of ABI 1
/// (removed when found; the shared program is pinned in the shared
/// directory).
pub const PROG_PIN: &str = "prog";
/// File name of the sk_lookup (netns) link pin.
pub const LOOKUP_LINK_PIN: &str = "lookup_link";
/// File name of the sk_lookup program pin of the per-sandbox layout of
/// ABI 1 (removed when found; the shared one is in the shared directory).
pub const LOOKUP_PROG_PIN: &str = "lookup_prog";

/// An attached egress filter. Dropping it leaves the program attached and
/// enforcing (everything is pinned); [`Filter::detach`] or [`Filter::remove`]
/// take it away.
pub struct Filter {
    pin_dir: PathBuf,
    shared: Arc<Shared>,
    marker: shared::Marker,
    slot: u32,
    /// Cookie of the router namespace.
    cookie: u64,
    entries: SlotEntries,
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
            .field("slot", &self.slot)
            .field("net", &self.net)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

// === impl Filter ===

impl Filter {
    /// Claims a slot in the shared maps of `pin_dir`'s parent (loading and
    /// verifying the shared program if this is the first filter there),
    /// fills it (`net`, `floor`, `policy`), attaches the shared program at
    /// ingress of `ifname` — the first `cls_bpf` filter — inside the network
    /// namespace `netns` (e.g. `/run/netns/<router ns>`), and pins the
    /// sandbox's objects under `pin_dir`. The caller's thread never changes
    /// namespace: the attach runs on a short-lived thread that enters
    /// `netns`.
    ///
    /// Fails with [`EbpfError::AlreadyAttached`] when `pin_dir` already holds
    /// a filter; leftovers of an interrupted attach (pins without the marker,
    /// a TC filter without pins, a claimed slot) are removed. TCP is dropped
    /// (`drop_no_listener`) until [`Filter::set_listeners`] registers the
    /// proxy.
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
        let (ifindex, cookie) = in_netns(netns, || {
            let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(io::Error::from);
            (ifindex, sys::current_netns_cookie())
        })?;
        net_abi.ifindex = ifindex.map_err(|e| EbpfError::Io {
            what: format!("no interface {ifname} in {}", netns.display()),
            source: e,
        })?;
        net_abi.netns_cookie = cookie.map_err(EbpfError::io(format!(
            "SO_NETNS_COOKIE in {}",
            netns.display()
        )))?;
        prepare_pin_dir(pin_dir)?;
        let root = pin_dir.parent().unwrap_or(Path::new("/"));
        let (shared, claim) = Shared::claim_under(root, net_abi.netns_cookie)?;
        net_abi.epoch = claim.epoch;
        let mut filter = Filter {
            pin_dir: pin_dir.to_path_buf(),
            shared,
            marker: claim,
            slot: claim.slot,
            cookie: net_abi.netns_cookie,
            entries: SlotEntries::default(),
            site: Some(Site {
                netns: netns.to_path_buf(),
                ifindex: net_abi.ifindex,
            }),
            // Replaced by the attach below; a descriptor is needed first.
            lookup_link: placeholder_fd()?,
            net: net.clone(),
            floor,
            policy,
        };
        let attached = Attach {
            pin_dir,
            netns,
            ifname,
        }
        .run(&mut filter, &net_abi);
        match attached {
            Ok(lookup_link) => {
                filter.lookup_link = lookup_link;
                Ok(filter)
            }
            Err(e) => {
                // The sk_lookup link dies with its descriptor once unpinned;
                // the TC filter, if it got attached, is deleted; the slot's
                // keys go and it is released.
                let _ = detach_tc(netns, net_abi.ifindex);
                let _ = filter.shared.release(
                    filter.marker,
                    filter.cookie,
                    &filter.entries,
                    &Index::new(),
                );
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
        if pin_dir.join(names::NET).exists() {
            // ABI 1 pinned a set of maps per sandbox.
            return Err(EbpfError::AbiMismatch {
                found: 1,
                expected: abi::ABI_VERSION,
            });
        }
        let Some((shared, marker)) = Shared::of_pin_dir(pin_dir)? else {
            return Err(EbpfError::Missing {
                what: format!("slot marker in {}", pin_dir.display()),
            });
        };
        let slot = marker.slot;
        let lookup_link = open_link(&pin_dir.join(LOOKUP_LINK_PIN))?;
        let index = shared.index_take(slot)?;
        let (net, floor, policy, entries) = {
            let t = lock(&shared.tables);
            let net = t.read_net(slot)?;
            if net.abi_version != abi::ABI_VERSION {
                return Err(EbpfError::AbiMismatch {
                    found: net.abi_version,
                    expected: abi::ABI_VERSION,
                });
            }
            if net.epoch != marker.epoch {
                return Err(EbpfError::Corrupt(format!(
                    "{} names slot {slot} epoch {}, the slot is at epoch {}",
                    pin_dir.display(),
                    marker.epoch,
                    net.epoch
                )));
            }
            let (floor, policy, entries) = maps::read_back(&t, slot, &index)?;
            (net, floor, policy, entries)
        };
        shared.events.open(slot, net.netns_cookie);
        shared.hold(net.netns_cookie, marker);
        let site = netns_of_link(lookup_link.as_fd())?.map(|netns| Site {
            netns,
            ifindex: net.ifindex,
        });
        Ok(Filter {
            pin_dir: pin_dir.to_path_buf(),
            shared,
            marker,
            slot,
            cookie: net.netns_cookie,
            entries,
            site,
            lookup_link,
            net: SandboxNet::from_abi(&net),
            floor,
            policy,
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
        let floor = self.floor.clone();
        self.publish(&floor, &policy)?;
        self.policy = policy;
        Ok(())
    }

    /// Replaces floor and policy together in one atomic step (two separate
    /// calls would expose the mix of the new floor and the old policy).
    pub fn replace(&mut self, floor: &FloorSet, policy: &EgressPolicy) -> Result<(), EbpfError> {
        let floor = floor.compile()?;
        let policy = policy.normalized()?;
        self.publish(&floor, &policy)?;
        self.floor = floor;
        self.policy = policy;
        Ok(())
    }

    /// Replaces the floor atomically, like [`Filter::set_policy`].
    pub fn set_floor(&mut self, floor: &FloorSet) -> Result<(), EbpfError> {
        let floor = floor.compile()?;
        let policy = self.policy.clone();
        self.publish(&floor, &policy)?;
        self.floor = floor;
        Ok(())
    }

    fn publish(&mut self, floor: &CompiledFloor, policy: &EgressPolicy) -> Result<(), EbpfError> {
        maps::publish(
            &self.shared.tables,
            &self.shared.sync,
            self.slot,
            &mut self.entries,
            floor,
            policy,
        )
    }

    /// Registers the proxy's transparent listeners (sockets in the router
    /// namespace, listening, with `IP_TRANSPARENT`). `v6: None` clears the
    /// IPv6 entry. A listener that closes leaves the map by itself, and TCP
    /// is then dropped (fail closed).
    pub fn set_listeners(
        &mut self,
        v4: BorrowedFd<'_>,
        v6: Option<BorrowedFd<'_>>,
    ) -> Result<(), EbpfError> {
        let mut t = lock(&self.shared.tables);
        t.set_listener(self.slot, abi::LISTENER_V4, Some(v4))?;
        t.set_listener(self.slot, abi::LISTENER_V6, v6)
    }

    /// Unregisters both listeners (TCP is dropped from now on).
    pub fn clear_listeners(&mut self) -> Result<(), EbpfError> {
        let mut t = lock(&self.shared.tables);
        t.set_listener(self.slot, abi::LISTENER_V4, None)?;
        t.set_listener(self.slot, abi::LISTENER_V6, None)
    }

    /// Packets per verdict since attach.
    pub fn counters(&self) -> Result<Counters, EbpfError> {
        let mut c = lock(&self.shared.tables).counters(self.slot)?;
        c.events_lost += self.shared.events.lost(self.slot, self.cookie);
        Ok(c)
    }

    /// A reader of the drop events (one reader per filter at a time).
    pub fn event_reader(&self) -> Result<EventReader, EbpfError> {
        Ok(EventReader::new(
            self.shared.events.clone(),
            self.slot,
            self.cookie,
        ))
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

    /// The sandbox's slot in the shared maps.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Detaches both programs (the TC filter and the netns link), deletes
    /// every key of the sandbox's slot and releases it, and removes every
    /// pin. A router namespace that is already gone took the filter with it.
    pub fn detach(self) -> Result<(), EbpfError> {
        if let Some(site) = &self.site {
            detach_tc(&site.netns, site.ifindex)?;
        }
        sys::link_detach(self.lookup_link.as_fd())
            .map_err(EbpfError::io("BPF_LINK_DETACH (sk_lookup)"))?;
        self.shared
            .release(self.marker, self.cookie, &self.entries, &Index::new())?;
        remove_pins(&self.pin_dir)
    }

    /// [`Filter::detach`] without an open filter: detaches what the pins
    /// name (if anything), frees the slot they name, and removes every pin
    /// and the directory. Idempotent; a missing directory is fine.
    pub fn remove(pin_dir: &Path) -> Result<(), EbpfError> {
        let shared = match Shared::of_pin_dir(pin_dir) {
            Ok(s) => s,
            // The shared pins are gone: nothing of the slot is left to free.
            Err(EbpfError::Missing { .. }) => None,
            Err(e) => return Err(e),
        };
        // The slot the marker names, if it is still that owner's.
        let net = match &shared {
            Some((s, m)) => Some(lock(&s.tables).read_net(m.slot)?).filter(|n| n.epoch == m.epoch),
            None => None,
        };
        let lookup = pin_dir.join(LOOKUP_LINK_PIN);
        match sys::obj_get(&lookup) {
            Ok(link) => {
                let netns = netns_of_link(link.as_fd())?;
                if let (Some(netns), Some(net)) = (netns, &net) {
                    detach_tc(&netns, net.ifindex)?;
                }
                sys::link_detach(link.as_fd()).map_err(EbpfError::io(format!(
                    "BPF_LINK_DETACH {}",
                    lookup.display()
                )))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(EbpfError::io(format!("opening {}", lookup.display()))(e)),
        }
        if let (Some((s, m)), Some(net)) = (&shared, &net) {
            let extra = s.scan_slot(m.slot)?;
            s.release(*m, net.netns_cookie, &SlotEntries::default(), &extra)?;
        }
        remove_pins(pin_dir)
    }
}

/// A descriptor to hold a place until the real one exists.
fn placeholder_fd() -> Result<OwnedFd, EbpfError> {
    File::open("/dev/null")
        .map(OwnedFd::from)
        .map_err(EbpfError::io("opening /dev/null"))
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

/// The steps of [`Filter::attach`] after the slot is claimed; on error the
/// caller detaches, releases the slot and removes whatever was pinned.
struct Attach<'a> {
    pin_dir: &'a Path,
    netns: &'a Path,
    ifname: &'a str,
}

impl Attach<'_> {
    fn run(&self, f: &mut Filter, net: &abi::NetConfig) -> Result<OwnedFd, EbpfError> {
        let Self {
            pin_dir,
            netns,
            ifname,
        } = *self;
        let shared = f.shared.clone();
        let slot = f.slot;
        let marker = pin_dir.join(shared::marker_name(f.marker, &shared.instance));
        std::fs::create_dir(&marker)
            .map_err(EbpfError::io(format!("creating {}", marker.display())))?;

        // The slot's keys, written before anything routes packets to it.
        {
            let mut t = lock(&shared.tables);
            t.write_net(slot, net)?;
            t.zero_counters(slot)?;
            for which in [abi::LISTENER_V4, abi::LISTENER_V6] {
                t.set_listener(slot, which, None)?;
            }
            maps::fill_fresh(&mut t, slot, &mut f.entries, &f.floor, &f.policy)?;
        }
        shared.events.open(slot, f.cookie);

        // The shared sk_lookup program in the router namespace.
        let ns = File::open(netns).map_err(|source| EbpfError::Netns {
            path: netns.to_path_buf(),
            source,
        })?;
        let link: FdLink = {
            let mut prog = lock(&shared.lookup);
            let id = prog.attach(&ns).map_err(prog_err("attach sk_lookup"))?;
            prog.take_link(id)
                .map_err(prog_err("attach sk_lookup"))?
                .into()
        };
        let lookup_link = pin_link(link, &pin_dir.join(LOOKUP_LINK_PIN))?;

        // The shared TC program, the first cls_bpf filter at ingress,
        // attached from a thread inside the router namespace (ifindex is
        // namespace-relative).
        let step = format!("attach to {ifname} in {}", netns.display());
        let classid = abi::classid(net.epoch, slot);
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
            // The filter names the slot in its classid; it belongs to the
            // interface from now on.
            netlink::add_bpf_filter(&netlink::BpfFilter {
                ifindex: net.ifindex,
                prog: shared.prog.as_fd(),
                name: abi::EGRESS_PROGRAM,
                priority: TC_PRIORITY,
                handle: TC_HANDLE,
                classid,
            })
            .map_err(|e| ProgramError::from(TcError::IoError(e)))
        })?
        .map_err(prog_err(&step))?;
        // Written last: the "attached" marker.
        let marker = pin_dir.join(LINK_PIN);
        sys::obj_pin(shared.prog.as_fd(), &marker)
            .map_err(EbpfError::io(format!("pinning {}", marker.display())))?;
        Ok(lookup_link)
    }
}

/// The process's loaders, one per object. `EbpfLoader::new` parses the
/// kernel's BTF (`/sys/kernel/btf/vmlinux`, 10–20 ms) every time; a loader
/// reused for every load parses it once. The sk_lookup loader's only
/// per-load settings are the pin paths of the maps it shares, which every
/// load overwrites.
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

/// The sk_lookup object, its maps those pinned in `dir`.
pub(crate) fn load_lookup_object(dir: &Path) -> Result<Ebpf, EbpfError> {
    with_loader(&LOADERS.lookup, |l| {
        for name in [names::NET, names::LISTENERS, names::TW_SLOT] {
            l.map_pin_path(name, dir.join(name));
        }
        l.load(LOOKUP_OBJECT)
    })
}

fn with_loader(
    loader: &std::sync::Mutex<EbpfLoader<'static>>,
    f: impl FnOnce(&mut EbpfLoader<'static>) -> Result<Ebpf, aya::EbpfError>,
) -> Result<Ebpf, EbpfError> {
    let mut guard = loader.lock().unwrap_or_else(|p| p.into_inner());
    Ok(f(&mut guard)?)
}

pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, EbpfError>
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

/// Creates `dir`, refusing one with a link pin and clearing leftovers (a
/// slot an interrupted attach claimed is freed).
fn prepare_pin_dir(dir: &Path) -> Result<(), EbpfError> {
    if dir.join(LINK_PIN).exists() {
        return Err(EbpfError::AlreadyAttached(dir.to_path_buf()));
    }
    if dir.exists() {
        Filter::remove(dir)?;
    }
    std::fs::create_dir_all(dir).map_err(EbpfError::io(format!("creating {}", dir.display())))
}

/// Unlinks the pins this crate writes (link first; the per-sandbox maps of
/// ABI 1 too) and the slot marker, then the directory if it is empty.
/// Missing files are fine.
fn remove_pins(dir: &Path) -> Result<(), EbpfError> {
    let unlink = |path: &Path, is_dir: bool| {
        let r = if is_dir {
            std::fs::remove_dir(path)
        } else {
            std::fs::remove_file(path)
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EbpfError::io(format!("removing {}", path.display()))(e)),
        }
    };
    // The marker first: a directory without it is not an attached filter.
    unlink(&dir.join(LINK_PIN), false)?;
    let known = [LOOKUP_LINK_PIN, PROG_PIN, LOOKUP_PROG_PIN];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(shared::SLOT_PREFIX) {
            unlink(&e.path(), true)?;
        } else if known.contains(&name) || names::ALL.contains(&name) {
            unlink(&e.path(), false)?;
        }
    }
    unlink(dir, true)
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
