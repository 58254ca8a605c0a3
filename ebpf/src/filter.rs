//! One sandbox's filter: load, fill, attach, pin; reopen after a restart;
//! update; detach.
//!
//! Pin layout under the pin directory (e.g. `/sys/fs/bpf/tollgate/<id>/`):
//! one file per map (`tg_net`, `tg_active`, ... see [`crate::abi::names`]),
//! the program as `prog` and the TCX link as `link`. The link pin is written
//! last: a directory with a `link` pin holds a complete, attached filter.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::EbpfLoader;

use crate::abi::{self, names};
use crate::error::EbpfError;
use crate::events::EventReader;
use crate::maps::Tables;
use crate::policy::{CompiledFloor, EgressPolicy, FloorSet, SandboxNet};
use crate::verdict::Counters;
use crate::{ensure_bpffs, sys, OBJECT};

/// File name of the link pin.
pub const LINK_PIN: &str = "link";
/// File name of the program pin.
pub const PROG_PIN: &str = "prog";

/// An attached egress filter. Dropping it leaves the program attached and
/// enforcing (everything is pinned); [`Filter::detach`] or [`Filter::remove`]
/// take it away.
pub struct Filter {
    pin_dir: PathBuf,
    tables: Tables,
    link: OwnedFd,
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
        let net_abi = net.to_abi()?;
        let floor = floor.compile()?;
        let policy = policy.normalized()?;
        prepare_pin_dir(pin_dir)?;

        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
        let mut tables = Tables::take(&mut ebpf)?;
        tables.write_net(&net_abi)?;
        tables.publish(&floor, &policy)?;

        let prog: &mut SchedClassifier = ebpf
            .program_mut(abi::PROGRAM)
            .ok_or_else(|| EbpfError::Missing {
                what: format!("program {} in the object", abi::PROGRAM),
            })?
            .try_into()
            .map_err(|source| EbpfError::Program {
                step: "program type".into(),
                source,
            })?;
        prog.load().map_err(|source| EbpfError::Program {
            step: "load".into(),
            source,
        })?;

        let attached = in_netns(netns, || {
            prog.attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
        })?;
        let step = || format!("attach to {ifname} in {}", netns.display());
        let link_id = attached.map_err(|source| EbpfError::Program {
            step: step(),
            source,
        })?;
        let link = prog
            .take_link(link_id)
            .map_err(|source| EbpfError::Program {
                step: step(),
                source,
            })?;
        let link: FdLink = link.try_into().map_err(|source| EbpfError::Link {
            path: pin_dir.join(LINK_PIN),
            source,
        })?;

        // Pin maps and program, then the link. Until the link is pinned, the
        // attach lives only as long as `link`: any failure below detaches.
        let pinned = (|| {
            tables.pin(pin_dir)?;
            let prog_path = pin_dir.join(PROG_PIN);
            prog.pin(&prog_path).map_err(|source| EbpfError::Pin {
                path: prog_path,
                source,
            })?;
            let link_path = pin_dir.join(LINK_PIN);
            link.pin(&link_path).map_err(|source| EbpfError::Pin {
                path: link_path.clone(),
                source,
            })?;
            sys::obj_get(&link_path)
                .map_err(EbpfError::io(format!("opening {}", link_path.display())))
        })();
        let link = match pinned {
            Ok(fd) => fd,
            Err(e) => {
                let _ = remove_pins(pin_dir);
                return Err(e);
            }
        };
        Ok(Filter {
            pin_dir: pin_dir.to_path_buf(),
            tables,
            link,
            net: net.clone(),
            floor,
            policy,
        })
    }

    /// Reopens a filter from its pins (after a daemon restart) without
    /// touching the attachment: enforcement never pauses. The live policy and
    /// floor are read back from the maps.
    pub fn open_pinned(pin_dir: &Path) -> Result<Filter, EbpfError> {
        ensure_bpffs()?;
        let link_path = pin_dir.join(LINK_PIN);
        let link = match sys::obj_get(&link_path) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(EbpfError::Missing {
                    what: format!("pinned link {}", link_path.display()),
                })
            }
            Err(e) => return Err(EbpfError::io(format!("opening {}", link_path.display()))(e)),
        };
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
    /// old or entirely by the new one (see [`crate::maps`]). Returns when no
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

    /// Detaches the program from the interface and removes every pin; the
    /// program and maps are freed once the last descriptor closes.
    pub fn detach(self) -> Result<(), EbpfError> {
        sys::link_detach(self.link.as_fd()).map_err(EbpfError::io("BPF_LINK_DETACH"))?;
        remove_pins(&self.pin_dir)
    }

    /// [`Filter::detach`] without an open filter: detaches the pinned link (if
    /// any) and removes every pin and the directory. Idempotent; a missing
    /// directory is fine.
    pub fn remove(pin_dir: &Path) -> Result<(), EbpfError> {
        match sys::obj_get(&pin_dir.join(LINK_PIN)) {
            Ok(link) => sys::link_detach(link.as_fd()).map_err(EbpfError::io("BPF_LINK_DETACH"))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(EbpfError::io(format!(
                    "opening {}",
                    pin_dir.join(LINK_PIN).display()
                ))(e))
            }
        }
        remove_pins(pin_dir)
    }
}

/// Names of the TCX ingress programs attached to `ifname` in the network
/// namespace `netns`, in run order (a health check: tollgate's is
/// [`abi::PROGRAM`]).
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
    let files = [LINK_PIN, PROG_PIN].into_iter().chain(names::ALL);
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
