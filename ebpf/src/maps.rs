//! Typed access to the shared maps (one set per pin root and instance, every
//! sandbox a slot in them), and the generation switch that makes a slot's
//! policy and floor updates atomic.
//!
//! The generation switch is described in the crate docs ("Atomic updates");
//! [`publish`] implements it. Every function here touches one slot's keys
//! only.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{
    Array, ArrayOfMaps, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, SockMap,
};
use aya::Ebpf;
use ipnet::{Ipv4Net, Ipv6Net};

use crate::abi::{self, names, Config, LpmV4, LpmV6, NetConfig, Owner};
use crate::error::EbpfError;
use crate::policy::{CompiledFloor, EgressPolicy, FloorSet, Mode};
use crate::verdict::Counters;

/// `BPF_NOEXIST`: create only.
const BPF_NOEXIST: u64 = 1;

/// The shared maps the program reads (all but the two of the grace-period
/// wait, see [`SyncMaps`]).
pub(crate) struct Tables {
    owner: Map,
    net: Map,
    active: Map,
    config: Map,
    floor_v4: Map,
    floor_v6: Map,
    allow_v4: Map,
    allow_v6: Map,
    listeners: Map,
    counters: Map,
    unclaimed: Map,
    events: Map,
    tw_slot: Map,
}

/// The map-in-map whose update waits for an RCU grace period, and its
/// inner map. Kept apart from [`Tables`] so that the wait holds no lock
/// other writers need.
pub(crate) struct SyncMaps {
    sync: Map,
    inner: Map,
}

/// The trie entries of one slot's generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Entries {
    pub(crate) floor: CompiledFloor,
    pub(crate) allow_v4: Vec<Ipv4Net>,
    pub(crate) allow_v6: Vec<Ipv6Net>,
}

impl Entries {
    pub(crate) fn of(floor: &CompiledFloor, policy: &EgressPolicy) -> Self {
        Self {
            floor: floor.clone(),
            allow_v4: policy.allow_v4.clone(),
            allow_v6: policy.allow_v6.clone(),
        }
    }

    fn extend(&mut self, other: Entries) {
        self.floor.v4.extend(other.floor.v4);
        self.floor.v6.extend(other.floor.v6);
        self.allow_v4.extend(other.allow_v4);
        self.allow_v6.extend(other.allow_v6);
    }

    fn sort(&mut self) {
        self.floor.v4.sort();
        self.floor.v6.sort();
        self.allow_v4.sort();
        self.allow_v6.sort();
    }
}

/// What a slot's two generations hold, as far as this process knows:
/// `live` is in the active generation, `stale` is whatever the inactive one
/// may still hold (leftovers of an interrupted update), deleted by the next
/// update.
#[derive(Debug, Default)]
pub(crate) struct SlotEntries {
    pub(crate) live: Entries,
    pub(crate) stale: Entries,
}

/// Every trie entry of every slot, grouped by tag (a full scan of the
/// tries: one `get_next_key` per entry).
pub(crate) type Index = HashMap<u32, Entries>;

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, EbpfError> {
    ebpf.take_map(name).ok_or_else(|| EbpfError::Missing {
        what: format!("map {name} in the object"),
    })
}

fn open_map(dir: &Path, name: &'static str) -> Result<Map, EbpfError> {
    let data = MapData::from_pin(dir.join(name)).map_err(EbpfError::map(name))?;
    Map::from_map_data(data).map_err(EbpfError::map(name))
}

impl SyncMaps {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        Ok(Self {
            sync: take_map(ebpf, names::SYNC)?,
            inner: take_map(ebpf, names::SYNC_INNER)?,
        })
    }

    pub(crate) fn open_pinned(dir: &Path) -> Result<Self, EbpfError> {
        Ok(Self {
            sync: open_map(dir, names::SYNC)?,
            inner: open_map(dir, names::SYNC_INNER)?,
        })
    }

    pub(crate) fn pin(&self, dir: &Path) -> Result<(), EbpfError> {
        pin_map(&self.sync, dir, names::SYNC)?;
        pin_map(&self.inner, dir, names::SYNC_INNER)
    }

    /// Returns once no program run that started before the call is still
    /// running: the kernel waits for an RCU grace period on every update of a
    /// map-in-map (`maybe_wait_bpf_programs`).
    pub(crate) fn wait_for_readers(&mut self) -> Result<(), EbpfError> {
        let inner = match &self.inner {
            Map::Array(data) => data,
            _ => {
                return Err(EbpfError::Corrupt(format!(
                    "{} is not an array",
                    names::SYNC_INNER
                )))
            }
        };
        let mut sync: ArrayOfMaps<&mut MapData, MapData> =
            ArrayOfMaps::try_from(&mut self.sync).map_err(EbpfError::map(names::SYNC))?;
        sync.set(0, inner, 0).map_err(EbpfError::map(names::SYNC))
    }
}

fn pin_map(map: &Map, dir: &Path, name: &'static str) -> Result<(), EbpfError> {
    let path = dir.join(name);
    map.pin(&path)
        .map_err(|source| EbpfError::Pin { path, source })
}

impl Tables {
    /// Takes the maps of a freshly loaded object.
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        Ok(Self {
            owner: take_map(ebpf, names::OWNER)?,
            net: take_map(ebpf, names::NET)?,
            active: take_map(ebpf, names::ACTIVE)?,
            config: take_map(ebpf, names::CONFIG)?,
            floor_v4: take_map(ebpf, names::FLOOR_V4)?,
            floor_v6: take_map(ebpf, names::FLOOR_V6)?,
            allow_v4: take_map(ebpf, names::ALLOW_V4)?,
            allow_v6: take_map(ebpf, names::ALLOW_V6)?,
            listeners: take_map(ebpf, names::LISTENERS)?,
            counters: take_map(ebpf, names::COUNTERS)?,
            unclaimed: take_map(ebpf, names::UNCLAIMED)?,
            events: take_map(ebpf, names::EVENTS)?,
            tw_slot: take_map(ebpf, names::TW_SLOT)?,
        })
    }

    /// Opens the maps pinned under `dir` (one file per map name) and checks
    /// every typed view once (a map of another ABI has other sizes).
    pub(crate) fn open_pinned(dir: &Path) -> Result<Self, EbpfError> {
        let tables = Self {
            owner: open_map(dir, names::OWNER)?,
            net: open_map(dir, names::NET)?,
            active: open_map(dir, names::ACTIVE)?,
            config: open_map(dir, names::CONFIG)?,
            floor_v4: open_map(dir, names::FLOOR_V4)?,
            floor_v6: open_map(dir, names::FLOOR_V6)?,
            allow_v4: open_map(dir, names::ALLOW_V4)?,
            allow_v6: open_map(dir, names::ALLOW_V6)?,
            listeners: open_map(dir, names::LISTENERS)?,
            counters: open_map(dir, names::COUNTERS)?,
            unclaimed: open_map(dir, names::UNCLAIMED)?,
            events: open_map(dir, names::EVENTS)?,
            tw_slot: open_map(dir, names::TW_SLOT)?,
        };
        BpfHashMap::<_, u32, Owner>::try_from(&tables.owner)
            .map_err(EbpfError::map(names::OWNER))?;
        tables.net_view()?;
        tables.active_view()?;
        tables.config_view()?;
        LpmTrie::<_, LpmV4, u32>::try_from(&tables.floor_v4)
            .map_err(EbpfError::map(names::FLOOR_V4))?;
        LpmTrie::<_, LpmV6, u32>::try_from(&tables.floor_v6)
            .map_err(EbpfError::map(names::FLOOR_V6))?;
        LpmTrie::<_, LpmV4, u32>::try_from(&tables.allow_v4)
            .map_err(EbpfError::map(names::ALLOW_V4))?;
        LpmTrie::<_, LpmV6, u32>::try_from(&tables.allow_v6)
            .map_err(EbpfError::map(names::ALLOW_V6))?;
        tables.counters_view()?;
        PerCpuArray::<_, u64>::try_from(&tables.unclaimed)
            .map_err(EbpfError::map(names::UNCLAIMED))?;
        SockMap::try_from(&tables.listeners).map_err(EbpfError::map(names::LISTENERS))?;
        Ok(tables)
    }

    /// Pins every map as `dir/<map name>`.
    pub(crate) fn pin(&self, dir: &Path) -> Result<(), EbpfError> {
        for (name, map) in [
            (names::OWNER, &self.owner),
            (names::NET, &self.net),
            (names::ACTIVE, &self.active),
            (names::CONFIG, &self.config),
            (names::FLOOR_V4, &self.floor_v4),
            (names::FLOOR_V6, &self.floor_v6),
            (names::ALLOW_V4, &self.allow_v4),
            (names::ALLOW_V6, &self.allow_v6),
            (names::LISTENERS, &self.listeners),
            (names::COUNTERS, &self.counters),
            (names::UNCLAIMED, &self.unclaimed),
            (names::EVENTS, &self.events),
            (names::TW_SLOT, &self.tw_slot),
        ] {
            pin_map(map, dir, name)?;
        }
        Ok(())
    }

    // --- typed views -------------------------------------------------------

    fn net_view(&self) -> Result<Array<&MapData, NetConfig>, EbpfError> {
        Array::try_from(&self.net).map_err(EbpfError::map(names::NET))
    }

    fn active_view(&self) -> Result<Array<&MapData, u32>, EbpfError> {
        Array::try_from(&self.active).map_err(EbpfError::map(names::ACTIVE))
    }

    fn config_view(&self) -> Result<Array<&MapData, Config>, EbpfError> {
        Array::try_from(&self.config).map_err(EbpfError::map(names::CONFIG))
    }

    fn counters_view(&self) -> Result<Array<&MapData, u64>, EbpfError> {
        Array::try_from(&self.counters).map_err(EbpfError::map(names::COUNTERS))
    }

    // --- slots ---------------------------------------------------------------

    /// Claims `slot` for `owner` unless someone holds it (atomic across
    /// processes). True when claimed.
    pub(crate) fn claim(&mut self, slot: u32, owner: &Owner) -> Result<bool, EbpfError> {
        let mut m: BpfHashMap<&mut MapData, u32, Owner> =
            BpfHashMap::try_from(&mut self.owner).map_err(EbpfError::map(names::OWNER))?;
        match m.insert(slot, owner, BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(false)
            }
            Err(e) => Err(EbpfError::map(names::OWNER)(e)),
        }
    }

    /// Every claimed slot and its owner.
    pub(crate) fn owners(&self) -> Result<Vec<(u32, Owner)>, EbpfError> {
        let m: BpfHashMap<&MapData, u32, Owner> =
            BpfHashMap::try_from(&self.owner).map_err(EbpfError::map(names::OWNER))?;
        m.iter()
            .map(|r| r.map_err(EbpfError::map(names::OWNER)))
            .collect()
    }

    /// Is any slot claimed?
    pub(crate) fn any_owner(&self) -> Result<bool, EbpfError> {
        let m: BpfHashMap<&MapData, u32, Owner> =
            BpfHashMap::try_from(&self.owner).map_err(EbpfError::map(names::OWNER))?;
        match m.keys().next() {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => Err(EbpfError::map(names::OWNER)(e)),
        }
    }

    /// Lets `slot` go (its keys must be gone).
    pub(crate) fn release(&mut self, slot: u32) -> Result<(), EbpfError> {
        let mut m: BpfHashMap<&mut MapData, u32, Owner> =
            BpfHashMap::try_from(&mut self.owner).map_err(EbpfError::map(names::OWNER))?;
        ignore_not_found(m.remove(&slot)).map_err(EbpfError::map(names::OWNER))
    }

    // --- the link's addresses ----------------------------------------------

    pub(crate) fn write_net(&mut self, slot: u32, net: &NetConfig) -> Result<(), EbpfError> {
        let mut view: Array<&mut MapData, NetConfig> =
            Array::try_from(&mut self.net).map_err(EbpfError::map(names::NET))?;
        view.set(slot, net, 0).map_err(EbpfError::map(names::NET))
    }

    pub(crate) fn read_net(&self, slot: u32) -> Result<NetConfig, EbpfError> {
        self.net_view()?
            .get(&slot, 0)
            .map_err(EbpfError::map(names::NET))
    }

    // --- generations -------------------------------------------------------

    pub(crate) fn active(&self, slot: u32) -> Result<u32, EbpfError> {
        let gen = self
            .active_view()?
            .get(&slot, 0)
            .map_err(EbpfError::map(names::ACTIVE))?;
        if gen >= abi::GENERATIONS {
            return Err(EbpfError::Corrupt(format!("tg_active[{slot}] holds {gen}")));
        }
        Ok(gen)
    }

    pub(crate) fn set_active(&mut self, slot: u32, gen: u32) -> Result<(), EbpfError> {
        let mut view: Array<&mut MapData, u32> =
            Array::try_from(&mut self.active).map_err(EbpfError::map(names::ACTIVE))?;
        view.set(slot, gen, 0)
            .map_err(EbpfError::map(names::ACTIVE))
    }

    pub(crate) fn set_config(&mut self, slot: u32, gen: u32, cfg: Config) -> Result<(), EbpfError> {
        let mut view: Array<&mut MapData, Config> =
            Array::try_from(&mut self.config).map_err(EbpfError::map(names::CONFIG))?;
        view.set(abi::tag(slot, gen), cfg, 0)
            .map_err(EbpfError::map(names::CONFIG))
    }

    pub(crate) fn mode(&self, slot: u32, gen: u32) -> Result<Mode, EbpfError> {
        let cfg = self
            .config_view()?
            .get(&abi::tag(slot, gen), 0)
            .map_err(EbpfError::map(names::CONFIG))?;
        Mode::from_abi(cfg.mode).ok_or_else(|| {
            EbpfError::Corrupt(format!(
                "slot {slot} generation {gen} has mode {}",
                cfg.mode
            ))
        })
    }

    /// Writes `entries` under `tag`.
    pub(crate) fn insert(&mut self, tag: u32, e: &Entries) -> Result<(), EbpfError> {
        {
            let mut t: LpmTrie<&mut MapData, LpmV4, u32> =
                LpmTrie::try_from(&mut self.floor_v4).map_err(EbpfError::map(names::FLOOR_V4))?;
            for (net, class) in &e.floor.v4 {
                t.insert(&key_v4(tag, net), *class, 0)
                    .map_err(EbpfError::map(names::FLOOR_V4))?;
            }
        }
        {
            let mut t: LpmTrie<&mut MapData, LpmV6, u32> =
                LpmTrie::try_from(&mut self.floor_v6).map_err(EbpfError::map(names::FLOOR_V6))?;
            for (net, class) in &e.floor.v6 {
                t.insert(&key_v6(tag, net), *class, 0)
                    .map_err(EbpfError::map(names::FLOOR_V6))?;
            }
        }
        {
            let mut t: LpmTrie<&mut MapData, LpmV4, u32> =
                LpmTrie::try_from(&mut self.allow_v4).map_err(EbpfError::map(names::ALLOW_V4))?;
            for net in &e.allow_v4 {
                t.insert(&key_v4(tag, net), abi::ALLOW, 0)
                    .map_err(EbpfError::map(names::ALLOW_V4))?;
            }
        }
        let mut t: LpmTrie<&mut MapData, LpmV6, u32> =
            LpmTrie::try_from(&mut self.allow_v6).map_err(EbpfError::map(names::ALLOW_V6))?;
        for net in &e.allow_v6 {
            t.insert(&key_v6(tag, net), abi::ALLOW, 0)
                .map_err(EbpfError::map(names::ALLOW_V6))?;
        }
        Ok(())
    }

    /// Deletes `entries` under `tag`; entries that are not there are fine.
    pub(crate) fn delete(&mut self, tag: u32, e: &Entries) -> Result<(), EbpfError> {
        {
            let mut t: LpmTrie<&mut MapData, LpmV4, u32> =
                LpmTrie::try_from(&mut self.floor_v4).map_err(EbpfError::map(names::FLOOR_V4))?;
            for (net, _) in &e.floor.v4 {
                ignore_not_found(t.remove(&key_v4(tag, net)))
                    .map_err(EbpfError::map(names::FLOOR_V4))?;
            }
        }
        {
            let mut t: LpmTrie<&mut MapData, LpmV6, u32> =
                LpmTrie::try_from(&mut self.floor_v6).map_err(EbpfError::map(names::FLOOR_V6))?;
            for (net, _) in &e.floor.v6 {
                ignore_not_found(t.remove(&key_v6(tag, net)))
                    .map_err(EbpfError::map(names::FLOOR_V6))?;
            }
        }
        {
            let mut t: LpmTrie<&mut MapData, LpmV4, u32> =
                LpmTrie::try_from(&mut self.allow_v4).map_err(EbpfError::map(names::ALLOW_V4))?;
            for net in &e.allow_v4 {
                ignore_not_found(t.remove(&key_v4(tag, net)))
                    .map_err(EbpfError::map(names::ALLOW_V4))?;
            }
        }
        let mut t: LpmTrie<&mut MapData, LpmV6, u32> =
            LpmTrie::try_from(&mut self.allow_v6).map_err(EbpfError::map(names::ALLOW_V6))?;
        for net in &e.allow_v6 {
            ignore_not_found(t.remove(&key_v6(tag, net)))
                .map_err(EbpfError::map(names::ALLOW_V6))?;
        }
        Ok(())
    }

    /// Every trie entry of every slot, by tag.
    pub(crate) fn scan(&self) -> Result<Index, EbpfError> {
        let mut index = Index::new();
        let v4 = |m: &Map, name: &'static str| -> Result<Vec<(u32, Ipv4Net, u32)>, EbpfError> {
            let t: LpmTrie<&MapData, LpmV4, u32> =
                LpmTrie::try_from(m).map_err(EbpfError::map(name))?;
            let mut out = Vec::new();
            for item in t.iter() {
                let (key, value) = item.map_err(EbpfError::map(name))?;
                let plen = key.prefix_len().saturating_sub(abi::GEN_BITS);
                let net = Ipv4Net::new(Ipv4Addr::from(key.data().addr), plen as u8)
                    .map_err(|e| EbpfError::Corrupt(format!("{name}: {e}")))?;
                out.push((key.data().tag, net, value));
            }
            Ok(out)
        };
        let v6 = |m: &Map, name: &'static str| -> Result<Vec<(u32, Ipv6Net, u32)>, EbpfError> {
            let t: LpmTrie<&MapData, LpmV6, u32> =
                LpmTrie::try_from(m).map_err(EbpfError::map(name))?;
            let mut out = Vec::new();
            for item in t.iter() {
                let (key, value) = item.map_err(EbpfError::map(name))?;
                let plen = key.prefix_len().saturating_sub(abi::GEN_BITS);
                let net = Ipv6Net::new(Ipv6Addr::from(key.data().addr), plen as u8)
                    .map_err(|e| EbpfError::Corrupt(format!("{name}: {e}")))?;
                out.push((key.data().tag, net, value));
            }
            Ok(out)
        };
        for (tag, net, class) in v4(&self.floor_v4, names::FLOOR_V4)? {
            index.entry(tag).or_default().floor.v4.push((net, class));
        }
        for (tag, net, class) in v6(&self.floor_v6, names::FLOOR_V6)? {
            index.entry(tag).or_default().floor.v6.push((net, class));
        }
        for (tag, net, _) in v4(&self.allow_v4, names::ALLOW_V4)? {
            index.entry(tag).or_default().allow_v4.push(net);
        }
        for (tag, net, _) in v6(&self.allow_v6, names::ALLOW_V6)? {
            index.entry(tag).or_default().allow_v6.push(net);
        }
        for e in index.values_mut() {
            e.sort();
        }
        Ok(index)
    }

    // --- listeners, counters, events ---------------------------------------

    pub(crate) fn set_listener(
        &mut self,
        slot: u32,
        which: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), EbpfError> {
        let key = slot * abi::LISTENER_MAX + which;
        let mut map: SockMap<&mut MapData> =
            SockMap::try_from(&mut self.listeners).map_err(EbpfError::map(names::LISTENERS))?;
        match fd {
            Some(fd) => map
                .set(key, &fd, 0)
                .map_err(EbpfError::map(names::LISTENERS)),
            None => match map.clear_index(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                // An empty sockmap entry answers delete with EINVAL.
                Err(MapError::SyscallError(e))
                    if matches!(e.io_error.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) =>
                {
                    Ok(())
                }
                Err(e) => Err(EbpfError::map(names::LISTENERS)(e)),
            },
        }
    }

    pub(crate) fn counters(&self, slot: u32) -> Result<Counters, EbpfError> {
        let view = self.counters_view()?;
        let mut slots = Vec::with_capacity(abi::COUNTERS as usize);
        for i in 0..abi::COUNTERS {
            slots.push(
                view.get(&(slot * abi::COUNTERS + i), 0)
                    .map_err(EbpfError::map(names::COUNTERS))?,
            );
        }
        Ok(Counters::from_slots(&slots))
    }

    pub(crate) fn zero_counters(&mut self, slot: u32) -> Result<(), EbpfError> {
        let mut view: Array<&mut MapData, u64> =
            Array::try_from(&mut self.counters).map_err(EbpfError::map(names::COUNTERS))?;
        for i in 0..abi::COUNTERS {
            view.set(slot * abi::COUNTERS + i, 0, 0)
                .map_err(EbpfError::map(names::COUNTERS))?;
        }
        Ok(())
    }

    /// Packets no slot claimed, summed over CPUs.
    pub(crate) fn unclaimed(&self) -> Result<u64, EbpfError> {
        let view: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(&self.unclaimed).map_err(EbpfError::map(names::UNCLAIMED))?;
        let per_cpu = view.get(&0, 0).map_err(EbpfError::map(names::UNCLAIMED))?;
        Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
    }

    /// A new descriptor of the ring buffer.
    pub(crate) fn events_fd(&self) -> Result<OwnedFd, EbpfError> {
        let Map::RingBuf(data) = &self.events else {
            return Err(EbpfError::Corrupt(format!(
                "{} is not a ring buffer",
                names::EVENTS
            )));
        };
        data.fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(EbpfError::io("duplicating the ring buffer descriptor"))
    }
}

/// Makes `floor` and `policy` the live generation of `slot` atomically
/// (crate docs, "Atomic updates"). `state` says what the generations hold
/// and is kept true on every path (an error leaves what may have been
/// written in `stale`).
pub(crate) fn publish(
    tables: &Mutex<Tables>,
    sync: &Mutex<SyncMaps>,
    slot: u32,
    state: &mut SlotEntries,
    floor: &CompiledFloor,
    policy: &EgressPolicy,
) -> Result<(), EbpfError> {
    let next = Entries::of(floor, policy);
    let old = {
        let mut t = lock(tables);
        let old = t.active(slot)?;
        let new = old ^ 1;
        t.delete(abi::tag(slot, new), &state.stale)?;
        state.stale = next.clone();
        t.insert(abi::tag(slot, new), &next)?;
        t.set_config(
            slot,
            new,
            Config {
                mode: policy.mode.to_abi(),
                flags: 0,
            },
        )?;
        t.set_active(slot, new)?;
        old
    };
    // The old generation is now the inactive one.
    std::mem::swap(&mut state.live, &mut state.stale);
    lock(sync).wait_for_readers()?;
    let mut t = lock(tables);
    t.delete(abi::tag(slot, old), &state.stale)?;
    state.stale = Entries::default();
    t.set_config(slot, old, Config::default())
}

/// Writes the first generation of a freshly claimed slot (no program
/// reads it yet: no grace period to wait for).
pub(crate) fn fill_fresh(
    t: &mut Tables,
    slot: u32,
    state: &mut SlotEntries,
    floor: &CompiledFloor,
    policy: &EgressPolicy,
) -> Result<(), EbpfError> {
    let e = Entries::of(floor, policy);
    state.live = e.clone();
    t.set_active(slot, 0)?;
    t.set_config(slot, 1, Config::default())?;
    t.insert(abi::tag(slot, 0), &e)?;
    t.set_config(
        slot,
        0,
        Config {
            mode: policy.mode.to_abi(),
            flags: 0,
        },
    )
}

/// Deletes every trie entry of `slot` that `state` and `extra` name and
/// zeroes its configuration (the slot then judges nothing).
pub(crate) fn clear_slot(
    t: &mut Tables,
    slot: u32,
    state: &SlotEntries,
    extra: &Index,
) -> Result<(), EbpfError> {
    for gen in 0..abi::GENERATIONS {
        let tag = abi::tag(slot, gen);
        let mut all = Entries::default();
        all.extend(state.live.clone());
        all.extend(state.stale.clone());
        if let Some(e) = extra.get(&tag) {
            all.extend(e.clone());
        }
        t.delete(tag, &all)?;
        t.set_config(slot, gen, Config::default())?;
    }
    t.set_listener(slot, abi::LISTENER_V4, None)?;
    t.set_listener(slot, abi::LISTENER_V6, None)?;
    // Free, with the epoch kept: the next owner's filters get the next one.
    let epoch = t.read_net(slot)?.epoch;
    t.write_net(
        slot,
        &NetConfig {
            epoch,
            ..NetConfig::default()
        },
    )
}

/// The epoch after `epoch` (1..=EPOCH_MAX, wrapping; 0 is never used).
pub(crate) fn next_epoch(epoch: u32) -> u32 {
    if epoch == 0 || epoch >= abi::EPOCH_MAX {
        1
    } else {
        epoch + 1
    }
}

/// What `slot`'s generations hold according to `index` (after a restart):
/// the active one as `(floor, policy)`, the other as leftovers.
pub(crate) fn read_back(
    t: &Tables,
    slot: u32,
    index: &Index,
) -> Result<(CompiledFloor, EgressPolicy, SlotEntries), EbpfError> {
    let gen = t.active(slot)?;
    let mode = t.mode(slot, gen)?;
    let live = index.get(&abi::tag(slot, gen)).cloned().unwrap_or_default();
    let stale = index
        .get(&abi::tag(slot, gen ^ 1))
        .cloned()
        .unwrap_or_default();
    let mut policy = EgressPolicy::new(mode);
    policy.allow_v4 = live.allow_v4.clone();
    policy.allow_v6 = live.allow_v6.clone();
    Ok((live.floor.clone(), policy, SlotEntries { live, stale }))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn key_v4(tag: u32, net: &Ipv4Net) -> Key<LpmV4> {
    Key::new(
        abi::GEN_BITS + u32::from(net.prefix_len()),
        LpmV4 {
            tag,
            addr: net.network().octets(),
        },
    )
}

fn key_v6(tag: u32, net: &Ipv6Net) -> Key<LpmV6> {
    Key::new(
        abi::GEN_BITS + u32::from(net.prefix_len()),
        LpmV6 {
            tag,
            addr: net.network().octets(),
        },
    )
}

fn ignore_not_found(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// A filter's policy maps, loaded but never attached to anything: what
/// writing a whole policy into the kernel costs, without a program or an
/// interface (the `ebpf_maps` bench), and a read-back to check the write.
pub struct PolicyMaps {
    _object: Ebpf,
    tables: Tables,
    floor: CompiledFloor,
    state: SlotEntries,
}

impl PolicyMaps {
    /// Loads a fresh set of maps (root, bpffs not needed: nothing is pinned).
    pub fn load(floor: &FloorSet) -> Result<Self, EbpfError> {
        let mut object = crate::filter::load_egress_object()?;
        let tables = Tables::take(&mut object)?;
        Ok(Self {
            _object: object,
            tables,
            floor: floor.compile()?,
            state: SlotEntries::default(),
        })
    }

    /// Clears slot 0 and writes floor and `policy` into it: the map work of
    /// [`crate::Filter::attach`]'s fill.
    pub fn write(&mut self, policy: &EgressPolicy) -> Result<(), EbpfError> {
        let policy = policy.normalized()?;
        clear_slot(&mut self.tables, 0, &self.state, &Index::new())?;
        fill_fresh(&mut self.tables, 0, &mut self.state, &self.floor, &policy)
    }

    /// The policy and floor the maps hold now, read back entry by entry.
    pub fn read(&self) -> Result<(FloorSet, EgressPolicy), EbpfError> {
        let index = self.tables.scan()?;
        let (floor, policy, _) = read_back(&self.tables, 0, &index)?;
        Ok((floor.to_set(), policy))
    }
}
