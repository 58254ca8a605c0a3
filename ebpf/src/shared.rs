//! The one loaded and verified TC program and its maps, shared by every
//! sandbox of a pin root and instance.
//!
//! Pinned as `<pin root>/_shared-<instance>/` (bpffs refuses names with a
//! dot): the program as `prog`, each
//! map under its name. The instance names the daemon (see
//! [`crate::set_instance`]) so that two daemons on one host never consume
//! each other's events; a restarted daemon with the same instance reopens
//! the pins. A sandbox holds a slot in the maps; its pin directory names
//! it with an (empty) directory `tg_slot_<slot>_<epoch>_<instance>`: a
//! marker whose epoch is not the slot's any more names a slot that was
//! freed and claimed again, and is not acted on.
//!
//! Slots are claimed in `tg_owner` with `BPF_NOEXIST` (atomic across
//! processes) before any of their keys is written and released after the
//! last is deleted. A slot whose claimer died before its sandbox's pin
//! directory named it is reclaimed when the shared object is next opened; a
//! slot this process holds for a router namespace that attaches again (its
//! pins were lost) is released by that attach. The pins go when the last
//! slot is released.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use std::os::fd::OwnedFd;

use aya::programs::{SchedClassifier, SkLookup};

use crate::abi::{self, names, Owner};
use crate::error::EbpfError;
use crate::events::Dispatch;
use crate::maps::{self, lock, Index, SlotEntries, SyncMaps, Tables};
use crate::sys;

/// File name of the shared TC program's pin.
pub(crate) const PROG_PIN: &str = "prog";
/// File name of the shared sk_lookup program's pin.
pub(crate) const LOOKUP_PIN: &str = "lookup_prog";
/// Prefix of the shared directories under a pin root.
pub(crate) const SHARED_PREFIX: &str = "_shared-";
/// Prefix of a sandbox's slot marker directory.
pub(crate) const SLOT_PREFIX: &str = "tg_slot_";

/// One shared program and its maps.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) instance: String,
    pub(crate) tables: Mutex<Tables>,
    pub(crate) sync: Mutex<SyncMaps>,
    /// The loaded, verified TC program.
    pub(crate) prog: OwnedFd,
    /// The loaded sk_lookup program (attached once per router namespace).
    pub(crate) lookup: Mutex<SkLookup>,
    pub(crate) events: Arc<Dispatch>,
    /// Where the next slot search starts.
    cursor: AtomicU32,
    /// The slots this process holds, by router namespace cookie.
    held: Mutex<HashMap<u64, Marker>>,
    /// The tries' contents when this process opened the pins (what
    /// [`crate::Filter::open_pinned`] reads back), built on first use.
    index: Mutex<Option<Index>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.events.stop();
    }
}

/// The shared objects this process has open, by directory.
static OPEN: LazyLock<Mutex<HashMap<PathBuf, Arc<Shared>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The instance attaches use (see [`crate::set_instance`]).
static INSTANCE: LazyLock<Mutex<String>> =
    LazyLock::new(|| Mutex::new(format!("pid{}", std::process::id())));

pub(crate) fn set_instance(name: &str) -> Result<(), EbpfError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(EbpfError::InvalidNet(format!(
            "instance name {name:?}: 1-64 characters of [A-Za-z0-9_-]"
        )));
    }
    *lock(&INSTANCE) = name.to_owned();
    Ok(())
}

pub(crate) fn instance() -> String {
    lock(&INSTANCE).clone()
}

/// A slot and its epoch for one owner: what a pin directory's marker names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Marker {
    pub(crate) slot: u32,
    /// The slot's epoch for this owner (the high bits of its filter's
    /// classid).
    pub(crate) epoch: u32,
}

impl Shared {
    /// The shared object for attaches under `root` (created and pinned if
    /// it does not exist) and a slot claimed in it for the namespace
    /// `cookie`, in one step: a concurrent release of the last slot cannot
    /// take the pins away in between.
    pub(crate) fn claim_under(root: &Path, cookie: u64) -> Result<(Arc<Self>, Marker), EbpfError> {
        let instance = instance();
        let dir = root.join(format!("{SHARED_PREFIX}{instance}"));
        let mut open = lock(&OPEN);
        let s = match open.get(&dir) {
            Some(s) => s.clone(),
            None => {
                sweep_dead_processes(root);
                let s = if dir.join(PROG_PIN).exists() {
                    Self::open_pins(&dir, &instance)?
                } else {
                    Self::create(root, &dir, &instance)?
                };
                open.insert(dir, s.clone());
                s
            }
        };
        let m = s.claim(cookie)?;
        Ok((s, m))
    }

    /// The shared object a sandbox's pin directory names (its slot marker),
    /// with the slot.
    pub(crate) fn of_pin_dir(pin_dir: &Path) -> Result<Option<(Arc<Self>, Marker)>, EbpfError> {
        let Some((marker, instance)) = slot_marker(pin_dir)? else {
            return Ok(None);
        };
        let root = pin_dir.parent().unwrap_or(Path::new("/"));
        let dir = root.join(format!("{SHARED_PREFIX}{instance}"));
        let mut open = lock(&OPEN);
        if let Some(s) = open.get(&dir) {
            return Ok(Some((s.clone(), marker)));
        }
        if !dir.join(PROG_PIN).exists() {
            return Err(EbpfError::Missing {
                what: format!(
                    "the shared program {} that {} names",
                    dir.display(),
                    pin_dir.display()
                ),
            });
        }
        let s = Self::open_pins(&dir, &instance)?;
        open.insert(dir, s.clone());
        Ok(Some((s, marker)))
    }

    fn open_pins(dir: &Path, instance: &str) -> Result<Arc<Self>, EbpfError> {
        let tables = Tables::open_pinned(dir)?;
        let sync = SyncMaps::open_pinned(dir)?;
        let path = dir.join(PROG_PIN);
        let prog =
            sys::obj_get(&path).map_err(EbpfError::io(format!("opening {}", path.display())))?;
        let path = dir.join(LOOKUP_PIN);
        let lookup = SkLookup::from_pin(&path).map_err(|source| EbpfError::Program {
            step: format!("open {}", path.display()),
            source,
        })?;
        let s = Self::assemble(dir, instance, tables, sync, prog, lookup)?;
        s.reclaim_orphans()?;
        Ok(s)
    }

    /// Loads and verifies the program once, pins it with its maps in a
    /// fresh directory, then renames that into place (a concurrent creator
    /// that renamed first wins and its pins are used).
    fn create(root: &Path, dir: &Path, instance: &str) -> Result<Arc<Self>, EbpfError> {
        std::fs::create_dir_all(root)
            .map_err(EbpfError::io(format!("creating {}", root.display())))?;
        let tmp = root.join(format!(
            "_new-{}-{}",
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let built = (|| {
            std::fs::create_dir(&tmp)
                .map_err(EbpfError::io(format!("creating {}", tmp.display())))?;
            let mut object = crate::filter::load_egress_object()?;
            let tables = Tables::take(&mut object)?;
            let sync = SyncMaps::take(&mut object)?;
            let prog: &mut SchedClassifier =
                crate::filter::program(&mut object, abi::EGRESS_PROGRAM)?;
            load_and_pin("load tc", tmp.join(PROG_PIN), prog.load(), |p| prog.pin(p))?;
            tables.pin(&tmp)?;
            sync.pin(&tmp)?;
            // The sk_lookup program reads the shared tg_net, tg_listeners
            // and tg_tw_slot through their pins.
            let mut lookup = crate::filter::load_lookup_object(&tmp)?;
            let prog: &mut SkLookup = crate::filter::program(&mut lookup, abi::LOOKUP_PROGRAM)?;
            load_and_pin("load sk_lookup", tmp.join(LOOKUP_PIN), prog.load(), |p| {
                prog.pin(p)
            })?;
            Ok::<_, EbpfError>(())
        })();
        if let Err(e) = built {
            let _ = remove_shared_pins(&tmp);
            return Err(e);
        }
        match std::fs::rename(&tmp, dir) {
            Ok(()) => {}
            Err(e) if dir.join(PROG_PIN).exists() => {
                let _ = e;
                remove_shared_pins(&tmp)?;
            }
            Err(e) => {
                let _ = remove_shared_pins(&tmp);
                return Err(EbpfError::io(format!(
                    "renaming {} to {}",
                    tmp.display(),
                    dir.display()
                ))(e));
            }
        }
        Self::open_pins(dir, instance)
    }

    fn assemble(
        dir: &Path,
        instance: &str,
        tables: Tables,
        sync: SyncMaps,
        prog: OwnedFd,
        lookup: SkLookup,
    ) -> Result<Arc<Self>, EbpfError> {
        let events = Dispatch::start(tables.events_fd()?)?;
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            instance: instance.to_owned(),
            tables: Mutex::new(tables),
            sync: Mutex::new(sync),
            prog,
            lookup: Mutex::new(lookup),
            events,
            cursor: AtomicU32::new(0),
            held: Mutex::new(HashMap::new()),
            index: Mutex::new(None),
        }))
    }

    /// Claims a free slot for the namespace `cookie`. A slot this process
    /// still holds for that namespace (its sandbox attaches again after its
    /// pins were lost) is released first: a namespace has one filter.
    fn claim(&self, cookie: u64) -> Result<Marker, EbpfError> {
        let stale = lock(&self.held).get(&cookie).copied();
        if let Some(m) = stale {
            let extra = self.scan_slot(m.slot)?;
            self.free(m, cookie, &SlotEntries::default(), &extra)?;
        }
        let owner = Owner {
            netns_cookie: cookie,
            pid: std::process::id(),
            reserved: 0,
        };
        let mut t = lock(&self.tables);
        let start = self.cursor.load(Ordering::Relaxed);
        for i in 0..abi::SLOTS {
            let slot = (start + i) % abi::SLOTS;
            if t.claim(slot, &owner)? {
                self.cursor
                    .store((slot + 1) % abi::SLOTS, Ordering::Relaxed);
                let epoch = maps::next_epoch(t.read_net(slot)?.epoch);
                let m = Marker { slot, epoch };
                lock(&self.held).insert(cookie, m);
                return Ok(m);
            }
        }
        Err(EbpfError::NoFreeSlot {
            dir: self.dir.clone(),
            max: abi::SLOTS,
        })
    }

    /// Deletes every key of the slot `m` names and releases it, unless the
    /// slot has another epoch now (it was freed and claimed again: not
    /// ours); when it was the last slot, the shared pins go too (the
    /// program and maps are freed once the last descriptor closes).
    pub(crate) fn release(
        self: &Arc<Self>,
        m: Marker,
        cookie: u64,
        state: &SlotEntries,
        extra: &Index,
    ) -> Result<(), EbpfError> {
        let mut open = lock(&OPEN);
        self.free(m, cookie, state, extra)?;
        let empty = !lock(&self.tables).any_owner()?;
        if empty {
            open.remove(&self.dir);
            remove_shared_pins(&self.dir)?;
        }
        Ok(())
    }

    /// [`Shared::release`] without the shared pins' removal.
    fn free(
        &self,
        m: Marker,
        cookie: u64,
        state: &SlotEntries,
        extra: &Index,
    ) -> Result<(), EbpfError> {
        {
            let mut t = lock(&self.tables);
            let net = t.read_net(m.slot)?;
            if net.epoch != m.epoch {
                return Ok(());
            }
            maps::clear_slot(&mut t, m.slot, state, extra)?;
            t.release(m.slot)?;
        }
        {
            let mut held = lock(&self.held);
            if held.get(&cookie) == Some(&m) {
                held.remove(&cookie);
            }
        }
        self.events.close(m.slot, cookie);
        Ok(())
    }

    /// Records that this process holds `m` for the namespace `cookie`
    /// (a filter reopened from its pins).
    pub(crate) fn hold(&self, cookie: u64, m: Marker) {
        lock(&self.held).insert(cookie, m);
    }

    /// The tries' entries of every slot, scanned once per process.
    pub(crate) fn index_take(&self, slot: u32) -> Result<Index, EbpfError> {
        let mut guard = lock(&self.index);
        if guard.is_none() {
            *guard = Some(lock(&self.tables).scan()?);
        }
        let index = guard.as_mut().expect("just built");
        let mut out = Index::new();
        for gen in 0..abi::GENERATIONS {
            let tag = abi::tag(slot, gen);
            if let Some(e) = index.remove(&tag) {
                out.insert(tag, e);
            }
        }
        Ok(out)
    }

    /// A fresh scan of `slot`'s entries (for [`crate::Filter::remove`],
    /// which must see what any process wrote last).
    pub(crate) fn scan_slot(&self, slot: u32) -> Result<Index, EbpfError> {
        let mut all = lock(&self.tables).scan()?;
        all.retain(|tag, _| *tag / abi::GENERATIONS == slot);
        Ok(all)
    }

    /// Releases slots whose claimer died before a pin directory named
    /// them (an attach interrupted between its claim and its marker).
    fn reclaim_orphans(self: &Arc<Self>) -> Result<(), EbpfError> {
        let owners = lock(&self.tables).owners()?;
        let root = self.dir.parent().unwrap_or(Path::new("/"));
        let named = named_slots(root, &self.instance);
        let orphans: Vec<(u32, Owner)> = owners
            .into_iter()
            .filter(|(slot, o)| !named.contains(slot) && !sys::process_alive(o.pid))
            .collect();
        if orphans.is_empty() {
            return Ok(());
        }
        let index = lock(&self.tables).scan()?;
        let mut t = lock(&self.tables);
        for (slot, _) in orphans {
            maps::clear_slot(&mut t, slot, &SlotEntries::default(), &index)?;
            t.release(slot)?;
        }
        Ok(())
    }
}

static NEXT_TMP: AtomicU32 = AtomicU32::new(0);

/// A program's load (verification) result, then its pin at `path`.
fn load_and_pin<P>(
    step: &str,
    path: PathBuf,
    loaded: Result<(), aya::programs::ProgramError>,
    pin: P,
) -> Result<(), EbpfError>
where
    P: FnOnce(&Path) -> Result<(), aya::pin::PinError>,
{
    loaded.map_err(|source| EbpfError::Program {
        step: step.to_owned(),
        source,
    })?;
    pin(&path).map_err(|source| EbpfError::Pin { path, source })
}

/// Frees what processes that died left under `root` in their own
/// (`pid<N>`) instances: slots no pin directory names, and the instance's
/// pins once no slot is left. Slots that pin directories name keep
/// enforcing until [`crate::Filter::remove`] takes them. Best effort: a
/// failure leaves things as they were.
fn sweep_dead_processes(root: &Path) {
    let me = std::process::id();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(inst) = name.to_str().and_then(|n| n.strip_prefix(SHARED_PREFIX)) else {
            continue;
        };
        let Some(pid) = inst.strip_prefix("pid").and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || sys::process_alive(pid) {
            continue;
        }
        let dir = e.path();
        let _ = (|| {
            let mut t = Tables::open_pinned(&dir)?;
            let named = named_slots(root, inst);
            let index = t.scan()?;
            for (slot, _) in t.owners()? {
                if !named.contains(&slot) {
                    maps::clear_slot(&mut t, slot, &SlotEntries::default(), &index)?;
                    t.release(slot)?;
                }
            }
            if !t.any_owner()? {
                remove_shared_pins(&dir)?;
            }
            Ok::<_, EbpfError>(())
        })();
    }
}

/// The slot marker of a sandbox's pin directory: `(marker, instance)`.
pub(crate) fn slot_marker(pin_dir: &Path) -> Result<Option<(Marker, String)>, EbpfError> {
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EbpfError::io(format!("reading {}", pin_dir.display()))(e)),
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(SLOT_PREFIX)) else {
            continue;
        };
        let parsed = (|| {
            let (slot, rest) = rest.split_once('_')?;
            let (epoch, inst) = rest.split_once('_')?;
            let m = Marker {
                slot: slot.parse().ok()?,
                epoch: epoch.parse().ok()?,
            };
            (m.slot < abi::SLOTS && m.epoch <= abi::EPOCH_MAX && !inst.is_empty())
                .then(|| (m, inst.to_owned()))
        })();
        return match parsed {
            Some(p) => Ok(Some(p)),
            None => Err(EbpfError::Corrupt(format!(
                "slot marker {rest} in {}",
                pin_dir.display()
            ))),
        };
    }
    Ok(None)
}

/// The marker directory name of `m` of `instance`.
pub(crate) fn marker_name(m: Marker, instance: &str) -> String {
    format!("{SLOT_PREFIX}{}_{}_{instance}", m.slot, m.epoch)
}

/// Slots of `instance` that some pin directory under `root` names.
fn named_slots(root: &Path, instance: &str) -> std::collections::HashSet<u32> {
    let mut out = std::collections::HashSet::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if let Ok(Some((m, inst))) = slot_marker(&e.path()) {
            if inst == instance {
                out.insert(m.slot);
            }
        }
    }
    out
}

/// Unlinks a shared directory's pins and the directory.
fn remove_shared_pins(dir: &Path) -> Result<(), EbpfError> {
    for name in [PROG_PIN, LOOKUP_PIN].into_iter().chain(names::ALL) {
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
