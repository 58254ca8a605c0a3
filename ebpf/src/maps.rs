//! Typed access to the program's maps, and the generation switch that makes
//! policy and floor updates atomic.
//!
//! The generation switch is described in the crate docs ("Atomic updates");
//! [`Tables::publish`] implements it.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, ArrayOfMaps, Map, MapData, MapError, PerCpuArray, SockMap};
use aya::Ebpf;
use ipnet::{Ipv4Net, Ipv6Net};

use crate::abi::{self, names, Config, LpmV4, LpmV6, NetConfig};
use crate::error::EbpfError;
use crate::policy::{CompiledFloor, EgressPolicy, FloorSet, Mode};
use crate::verdict::Counters;

/// Every map of one attached filter.
pub(crate) struct Tables {
    net: Map,
    active: Map,
    config: Map,
    floor_v4: Map,
    floor_v6: Map,
    allow_v4: Map,
    allow_v6: Map,
    listeners: Map,
    counters: Map,
    events: Map,
    sync: Map,
    sync_inner: Map,
}

/// One generation's contents.
pub(crate) struct Generation {
    pub(crate) floor: CompiledFloor,
    pub(crate) policy: EgressPolicy,
}

impl Tables {
    /// Takes the maps of a freshly loaded object.
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or_else(|| EbpfError::Missing {
                what: format!("map {name} in the object"),
            })
        };
        Ok(Self {
            net: take(names::NET)?,
            active: take(names::ACTIVE)?,
            config: take(names::CONFIG)?,
            floor_v4: take(names::FLOOR_V4)?,
            floor_v6: take(names::FLOOR_V6)?,
            allow_v4: take(names::ALLOW_V4)?,
            allow_v6: take(names::ALLOW_V6)?,
            listeners: take(names::LISTENERS)?,
            counters: take(names::COUNTERS)?,
            events: take(names::EVENTS)?,
            sync: take(names::SYNC)?,
            sync_inner: take(names::SYNC_INNER)?,
        })
    }

    /// Opens the maps pinned under `dir` (one file per map name).
    pub(crate) fn open_pinned(dir: &Path) -> Result<Self, EbpfError> {
        let open = |name: &'static str| -> Result<Map, EbpfError> {
            let data = MapData::from_pin(dir.join(name)).map_err(EbpfError::map(name))?;
            Map::from_map_data(data).map_err(EbpfError::map(name))
        };
        let tables = Self {
            net: open(names::NET)?,
            active: open(names::ACTIVE)?,
            config: open(names::CONFIG)?,
            floor_v4: open(names::FLOOR_V4)?,
            floor_v6: open(names::FLOOR_V6)?,
            allow_v4: open(names::ALLOW_V4)?,
            allow_v6: open(names::ALLOW_V6)?,
            listeners: open(names::LISTENERS)?,
            counters: open(names::COUNTERS)?,
            events: open(names::EVENTS)?,
            sync: open(names::SYNC)?,
            sync_inner: open(names::SYNC_INNER)?,
        };
        // Type and size checks of every typed view, once.
        tables.net_view()?;
        tables.active_view()?;
        tables.config_view()?;
        tables.floor_v4_view()?;
        tables.floor_v6_view()?;
        tables.allow_v4_view()?;
        tables.allow_v6_view()?;
        tables.counters_view()?;
        SockMap::try_from(&tables.listeners).map_err(EbpfError::map(names::LISTENERS))?;
        Ok(tables)
    }

    /// Pins every map as `dir/<map name>`.
    pub(crate) fn pin(&self, dir: &Path) -> Result<(), EbpfError> {
        for (name, map) in self.all() {
            let path = dir.join(name);
            map.pin(&path)
                .map_err(|source| EbpfError::Pin { path, source })?;
        }
        Ok(())
    }

    fn all(&self) -> [(&'static str, &Map); 12] {
        [
            (names::NET, &self.net),
            (names::ACTIVE, &self.active),
            (names::CONFIG, &self.config),
            (names::FLOOR_V4, &self.floor_v4),
            (names::FLOOR_V6, &self.floor_v6),
            (names::ALLOW_V4, &self.allow_v4),
            (names::ALLOW_V6, &self.allow_v6),
            (names::LISTENERS, &self.listeners),
            (names::COUNTERS, &self.counters),
            (names::EVENTS, &self.events),
            (names::SYNC, &self.sync),
            (names::SYNC_INNER, &self.sync_inner),
        ]
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

    fn floor_v4_view(&self) -> Result<LpmTrie<&MapData, LpmV4, u32>, EbpfError> {
        LpmTrie::try_from(&self.floor_v4).map_err(EbpfError::map(names::FLOOR_V4))
    }

    fn floor_v6_view(&self) -> Result<LpmTrie<&MapData, LpmV6, u32>, EbpfError> {
        LpmTrie::try_from(&self.floor_v6).map_err(EbpfError::map(names::FLOOR_V6))
    }

    fn allow_v4_view(&self) -> Result<LpmTrie<&MapData, LpmV4, u32>, EbpfError> {
        LpmTrie::try_from(&self.allow_v4).map_err(EbpfError::map(names::ALLOW_V4))
    }

    fn allow_v6_view(&self) -> Result<LpmTrie<&MapData, LpmV6, u32>, EbpfError> {
        LpmTrie::try_from(&self.allow_v6).map_err(EbpfError::map(names::ALLOW_V6))
    }

    fn counters_view(&self) -> Result<PerCpuArray<&MapData, u64>, EbpfError> {
        PerCpuArray::try_from(&self.counters).map_err(EbpfError::map(names::COUNTERS))
    }

    // --- the link's addresses ----------------------------------------------

    pub(crate) fn write_net(&mut self, net: &NetConfig) -> Result<(), EbpfError> {
        let mut view: Array<&mut MapData, NetConfig> =
            Array::try_from(&mut self.net).map_err(EbpfError::map(names::NET))?;
        view.set(0, net, 0).map_err(EbpfError::map(names::NET))
    }

    pub(crate) fn read_net(&self) -> Result<NetConfig, EbpfError> {
        self.net_view()?
            .get(&0, 0)
            .map_err(EbpfError::map(names::NET))
    }

    // --- generations -------------------------------------------------------

    pub(crate) fn active(&self) -> Result<u32, EbpfError> {
        let gen = self
            .active_view()?
            .get(&0, 0)
            .map_err(EbpfError::map(names::ACTIVE))?;
        if gen >= abi::GENERATIONS {
            return Err(EbpfError::Corrupt(format!("tg_active holds {gen}")));
        }
        Ok(gen)
    }

    fn set_active(&mut self, gen: u32) -> Result<(), EbpfError> {
        let mut view: Array<&mut MapData, u32> =
            Array::try_from(&mut self.active).map_err(EbpfError::map(names::ACTIVE))?;
        view.set(0, gen, 0).map_err(EbpfError::map(names::ACTIVE))
    }

    fn set_config(&mut self, gen: u32, cfg: Config) -> Result<(), EbpfError> {
        let mut view: Array<&mut MapData, Config> =
            Array::try_from(&mut self.config).map_err(EbpfError::map(names::CONFIG))?;
        view.set(gen, cfg, 0).map_err(EbpfError::map(names::CONFIG))
    }

    /// Makes `floor` and `policy` the live generation atomically (module docs).
    pub(crate) fn publish(
        &mut self,
        floor: &CompiledFloor,
        policy: &EgressPolicy,
    ) -> Result<(), EbpfError> {
        let old = self.active()?;
        let new = old ^ 1;
        self.clear_generation(new)?;
        self.write_generation(new, floor, policy)?;
        self.set_active(new)?;
        self.wait_for_readers()?;
        self.clear_generation(old)?;
        self.set_config(old, Config::default())
    }

    /// Writes the active generation of maps that no program reads (before
    /// attach): no grace period to wait for. Whatever the generation held is
    /// cleared first.
    pub(crate) fn fill_fresh(
        &mut self,
        floor: &CompiledFloor,
        policy: &EgressPolicy,
    ) -> Result<(), EbpfError> {
        let gen = self.active()?;
        self.clear_generation(gen)?;
        self.write_generation(gen, floor, policy)
    }

    fn write_generation(
        &mut self,
        gen: u32,
        floor: &CompiledFloor,
        policy: &EgressPolicy,
    ) -> Result<(), EbpfError> {
        {
            let mut t: LpmTrie<&mut MapData, LpmV4, u32> =
                LpmTrie::try_from(&mut self.floor_v4).map_err(EbpfError::map(names::FLOOR_V4))?;
            for (net, class) in &floor.v4 {
                t.insert(&key_v4(gen, net), *class, 0)
                    .map_err(EbpfError::map(names::FLOOR_V4))?;
            }
        }
        {
            let mut t: LpmTrie<&mut MapData, LpmV6, u32> =
                LpmTrie::try_from(&mut self.floor_v6).map_err(EbpfError::map(names::FLOOR_V6))?;
            for (net, class) in &floor.v6 {
                t.insert(&key_v6(gen, net), *class, 0)
                    .map_err(EbpfError::map(names::FLOOR_V6))?;
            }
        }
        {
            let mut t: LpmTrie<&mut MapData, LpmV4, u32> =
                LpmTrie::try_from(&mut self.allow_v4).map_err(EbpfError::map(names::ALLOW_V4))?;
            for net in &policy.allow_v4 {
                t.insert(&key_v4(gen, net), abi::ALLOW, 0)
                    .map_err(EbpfError::map(names::ALLOW_V4))?;
            }
        }
        {
            let mut t: LpmTrie<&mut MapData, LpmV6, u32> =
                LpmTrie::try_from(&mut self.allow_v6).map_err(EbpfError::map(names::ALLOW_V6))?;
            for net in &policy.allow_v6 {
                t.insert(&key_v6(gen, net), abi::ALLOW, 0)
                    .map_err(EbpfError::map(names::ALLOW_V6))?;
            }
        }
        self.set_config(
            gen,
            Config {
                mode: policy.mode.to_abi(),
                flags: 0,
            },
        )
    }

    /// Deletes every trie entry of generation `gen`.
    fn clear_generation(&mut self, gen: u32) -> Result<(), EbpfError> {
        clear_gen_v4(&mut self.floor_v4, names::FLOOR_V4, gen)?;
        clear_gen_v6(&mut self.floor_v6, names::FLOOR_V6, gen)?;
        clear_gen_v4(&mut self.allow_v4, names::ALLOW_V4, gen)?;
        clear_gen_v6(&mut self.allow_v6, names::ALLOW_V6, gen)
    }

    /// Returns once no program run that started before the call is still
    /// running: the kernel waits for an RCU grace period on every update of a
    /// map-in-map (`maybe_wait_bpf_programs`).
    fn wait_for_readers(&mut self) -> Result<(), EbpfError> {
        let inner = match &self.sync_inner {
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

    /// Reads generation `gen` back (after a restart).
    pub(crate) fn read_generation(&self, gen: u32) -> Result<Generation, EbpfError> {
        let cfg = self
            .config_view()?
            .get(&gen, 0)
            .map_err(EbpfError::map(names::CONFIG))?;
        let mode = Mode::from_abi(cfg.mode)
            .ok_or_else(|| EbpfError::Corrupt(format!("generation {gen} has mode {}", cfg.mode)))?;
        let mut floor = CompiledFloor::default();
        for (key, class) in entries_v4(&self.floor_v4_view()?, names::FLOOR_V4, gen)? {
            floor.v4.push((key, class));
        }
        for (key, class) in entries_v6(&self.floor_v6_view()?, names::FLOOR_V6, gen)? {
            floor.v6.push((key, class));
        }
        floor.v4.sort();
        floor.v6.sort();
        let mut policy = EgressPolicy::new(mode);
        for (net, _) in entries_v4(&self.allow_v4_view()?, names::ALLOW_V4, gen)? {
            policy.allow_v4.push(net);
        }
        for (net, _) in entries_v6(&self.allow_v6_view()?, names::ALLOW_V6, gen)? {
            policy.allow_v6.push(net);
        }
        policy.allow_v4.sort();
        policy.allow_v6.sort();
        Ok(Generation { floor, policy })
    }

    // --- listeners, counters, events ---------------------------------------

    pub(crate) fn set_listener(
        &mut self,
        slot: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), EbpfError> {
        let mut map: SockMap<&mut MapData> =
            SockMap::try_from(&mut self.listeners).map_err(EbpfError::map(names::LISTENERS))?;
        match fd {
            Some(fd) => map
                .set(slot, &fd, 0)
                .map_err(EbpfError::map(names::LISTENERS)),
            None => match map.clear_index(&slot) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                // An empty sockmap slot answers delete with EINVAL.
                Err(MapError::SyscallError(e))
                    if matches!(e.io_error.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) =>
                {
                    Ok(())
                }
                Err(e) => Err(EbpfError::map(names::LISTENERS)(e)),
            },
        }
    }

    pub(crate) fn counters(&self) -> Result<Counters, EbpfError> {
        let view = self.counters_view()?;
        let mut slots = Vec::with_capacity(abi::COUNTERS as usize);
        for i in 0..abi::COUNTERS {
            let per_cpu = view.get(&i, 0).map_err(EbpfError::map(names::COUNTERS))?;
            slots.push(per_cpu.iter().copied().fold(0u64, u64::wrapping_add));
        }
        Ok(Counters::from_slots(&slots))
    }

    /// A new descriptor of the ring buffer (for an independent reader).
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

fn key_v4(gen: u32, net: &Ipv4Net) -> Key<LpmV4> {
    Key::new(
        abi::GEN_BITS + u32::from(net.prefix_len()),
        LpmV4 {
            gen,
            addr: net.network().octets(),
        },
    )
}

fn key_v6(gen: u32, net: &Ipv6Net) -> Key<LpmV6> {
    Key::new(
        abi::GEN_BITS + u32::from(net.prefix_len()),
        LpmV6 {
            gen,
            addr: net.network().octets(),
        },
    )
}

fn entries_v4(
    t: &LpmTrie<&MapData, LpmV4, u32>,
    name: &'static str,
    gen: u32,
) -> Result<Vec<(Ipv4Net, u32)>, EbpfError> {
    let mut out = Vec::new();
    for item in t.iter() {
        let (key, value) = item.map_err(EbpfError::map(name))?;
        let data = key.data();
        if data.gen != gen {
            continue;
        }
        let plen = key.prefix_len().saturating_sub(abi::GEN_BITS);
        let net = Ipv4Net::new(Ipv4Addr::from(data.addr), plen as u8)
            .map_err(|e| EbpfError::Corrupt(format!("{name}: {e}")))?;
        out.push((net, value));
    }
    Ok(out)
}

fn entries_v6(
    t: &LpmTrie<&MapData, LpmV6, u32>,
    name: &'static str,
    gen: u32,
) -> Result<Vec<(Ipv6Net, u32)>, EbpfError> {
    let mut out = Vec::new();
    for item in t.iter() {
        let (key, value) = item.map_err(EbpfError::map(name))?;
        let data = key.data();
        if data.gen != gen {
            continue;
        }
        let plen = key.prefix_len().saturating_sub(abi::GEN_BITS);
        let net = Ipv6Net::new(Ipv6Addr::from(data.addr), plen as u8)
            .map_err(|e| EbpfError::Corrupt(format!("{name}: {e}")))?;
        out.push((net, value));
    }
    Ok(out)
}

fn clear_gen_v4(map: &mut Map, name: &'static str, gen: u32) -> Result<(), EbpfError> {
    let mut t: LpmTrie<&mut MapData, LpmV4, u32> =
        LpmTrie::try_from(map).map_err(EbpfError::map(name))?;
    let mut stale = Vec::new();
    for key in t.keys() {
        let key = key.map_err(EbpfError::map(name))?;
        if key.data().gen == gen {
            stale.push(key);
        }
    }
    for key in stale {
        ignore_not_found(t.remove(&key)).map_err(EbpfError::map(name))?;
    }
    Ok(())
}

fn clear_gen_v6(map: &mut Map, name: &'static str, gen: u32) -> Result<(), EbpfError> {
    let mut t: LpmTrie<&mut MapData, LpmV6, u32> =
        LpmTrie::try_from(map).map_err(EbpfError::map(name))?;
    let mut stale = Vec::new();
    for key in t.keys() {
        let key = key.map_err(EbpfError::map(name))?;
        if key.data().gen == gen {
            stale.push(key);
        }
    }
    for key in stale {
        ignore_not_found(t.remove(&key)).map_err(EbpfError::map(name))?;
    }
    Ok(())
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
        })
    }

    /// Clears the active generation and writes floor and `policy` into it:
    /// the map work of [`crate::Filter::attach`]'s fill.
    pub fn write(&mut self, policy: &EgressPolicy) -> Result<(), EbpfError> {
        let policy = policy.normalized()?;
        self.tables.fill_fresh(&self.floor, &policy)
    }

    /// The policy and floor the maps hold now, read back entry by entry.
    pub fn read(&self) -> Result<(FloorSet, EgressPolicy), EbpfError> {
        let gen = self.tables.read_generation(self.tables.active()?)?;
        Ok((gen.floor.to_set(), gen.policy))
    }
}
