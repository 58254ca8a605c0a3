//! Rust mirror of `bpf/tollgate.h`: every constant, map key and map value the
//! program and this crate share. Sizes are asserted at compile time; the
//! `aya::Pod` impls live in the crate's one `unsafe` module (`src/sys.rs`).

use std::mem::size_of;

use aya::maps::lpm_trie::Key;

/// `TG_ABI_VERSION`: stored in [`NetConfig::abi_version`].
pub const ABI_VERSION: u32 = 2;

/// `enum tg_mode`.
pub const MODE_UNSET: u32 = 0;
/// `TG_MODE_ALLOW_ALL`.
pub const MODE_ALLOW_ALL: u32 = 1;
/// `TG_MODE_DENY_ALL`.
pub const MODE_DENY_ALL: u32 = 2;
/// `TG_MODE_CUSTOM`.
pub const MODE_CUSTOM: u32 = 3;

/// `enum tg_class`: denied in every mode.
pub const CLASS_FLOOR: u32 = 1;
/// `enum tg_class`: private range.
pub const CLASS_PRIVATE: u32 = 2;
/// `TG_ALLOW`: value of the allow tries.
pub const ALLOW: u32 = 1;

/// `TG_NET_HAS_V6`.
pub const NET_HAS_V6: u32 = 1;

/// `TG_MARK_LOCAL`: the fwmark bit that the router's policy rule delivers
/// locally (steered TCP).
pub const MARK_LOCAL: u32 = 0x1;
/// `TG_MARK_FORWARD`: the bit the router's nftables forward chain requires.
pub const MARK_FORWARD: u32 = 0x2;

/// `TG_GATEWAY_HTTP_PORT`: TCP port of the host's own service on the
/// gateway address (the sandbox's CA certificate); delivered locally in
/// every mode, deny-all included.
pub const GATEWAY_HTTP_PORT: u16 = 80;

/// `TG_LISTENER_V4`: sockmap slot of the IPv4 listener.
pub const LISTENER_V4: u32 = 0;
/// `TG_LISTENER_V6`: sockmap slot of the IPv6 listener.
pub const LISTENER_V6: u32 = 1;
/// `TG_LISTENER_MAX`: listener entries per sandbox slot.
pub const LISTENER_MAX: u32 = 2;

/// `TG_SLOTS`: sandboxes one shared program and its maps serve.
pub const SLOTS: u32 = 4096;
/// `TG_EPOCH_MAX`: epochs run 1..=this, then wrap to 1.
pub const EPOCH_MAX: u32 = 15;

/// `TG_CLASSID`: the classid of `slot`'s `cls_bpf` filter in `epoch`
/// (16 bits: cls_bpf hands the program only the minor).
pub const fn classid(epoch: u32, slot: u32) -> u32 {
    (epoch << 12) | slot
}

const _: () = assert!(SLOTS <= 1 << 12 && EPOCH_MAX < 1 << 4);

/// `TG_GENERATIONS`.
pub const GENERATIONS: u32 = 2;
/// `TG_FLOOR_MAX`: floor + private prefixes per family and generation.
pub const FLOOR_MAX: usize = 1024;
/// `TG_ALLOW_MAX`: allow_cidrs prefixes per family and generation.
pub const ALLOW_MAX: usize = 256;
/// `TG_GEN_BITS`: bits of the tag (slot and generation) at the front of
/// every LPM key.
pub const GEN_BITS: u32 = 32;

/// The LPM tag of `slot`'s generation `gen`.
pub const fn tag(slot: u32, gen: u32) -> u32 {
    slot * GENERATIONS + gen
}

/// `TG_REASON_MAX`: number of verdict reasons.
pub const REASON_MAX: u32 = 22;
/// `TG_FIRST_DROP`: reasons at or above it drop.
pub const FIRST_DROP: u32 = 4;
/// `TG_COUNTER_EVENTS_LOST`: counter slot of events the ring buffer had no
/// room for.
pub const COUNTER_EVENTS_LOST: u32 = REASON_MAX;
/// `TG_COUNTERS`: slots of `tg_counters`.
pub const COUNTERS: u32 = REASON_MAX + 1;

/// Map names in the object (and file names of their pins).
pub mod names {
    /// Slot → `struct tg_owner`.
    pub const OWNER: &str = "tg_owner";
    /// `struct tg_net` per slot.
    pub const NET: &str = "tg_net";
    /// Active generation per slot.
    pub const ACTIVE: &str = "tg_active";
    /// `struct tg_config` per slot and generation.
    pub const CONFIG: &str = "tg_config";
    /// IPv4 floor / private trie.
    pub const FLOOR_V4: &str = "tg_floor_v4";
    /// IPv6 floor / private trie.
    pub const FLOOR_V6: &str = "tg_floor_v6";
    /// IPv4 allow_cidrs trie.
    pub const ALLOW_V4: &str = "tg_allow_v4";
    /// IPv6 allow_cidrs trie.
    pub const ALLOW_V6: &str = "tg_allow_v6";
    /// Sockmap of the proxy's listeners.
    pub const LISTENERS: &str = "tg_listeners";
    /// Verdict counters, [`super::COUNTERS`] per slot.
    pub const COUNTERS: &str = "tg_counters";
    /// Per-CPU count of packets no slot claimed.
    pub const UNCLAIMED: &str = "tg_unclaimed";
    /// Ring buffer of drop events.
    pub const EVENTS: &str = "tg_events";
    /// TIME_WAIT SYN 4-tuple → slot (for the sk_lookup program).
    pub const TW_SLOT: &str = "tg_tw_slot";
    /// Map-in-map used only to wait for an RCU grace period.
    pub const SYNC: &str = "tg_sync";
    /// The inner map stored in [`SYNC`].
    pub const SYNC_INNER: &str = "tg_sync_inner";
    /// Every map, in pin order.
    pub const ALL: [&str; 15] = [
        OWNER, NET, ACTIVE, CONFIG, FLOOR_V4, FLOOR_V6, ALLOW_V4, ALLOW_V6, LISTENERS, COUNTERS,
        UNCLAIMED, EVENTS, TW_SLOT, SYNC, SYNC_INNER,
    ];
}

/// The TC program in `egress.bpf.o`.
pub const EGRESS_PROGRAM: &str = "tg_egress";
/// The sk_lookup program in `lookup.bpf.o`.
pub const LOOKUP_PROGRAM: &str = "tg_lookup";

/// `struct tg_net`: the sandbox's link. Addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// [`NET_HAS_V6`].
    pub flags: u32,
    /// Guest IPv4 address.
    pub guest_v4: [u8; 4],
    /// Gateway IPv4 address.
    pub gateway_v4: [u8; 4],
    /// Guest IPv6 address (zero without IPv6).
    pub guest_v6: [u8; 16],
    /// Gateway IPv6 address (zero without IPv6).
    pub gateway_v6: [u8; 16],
    /// Index of the guest-facing interface in the router namespace.
    pub ifindex: u32,
    /// The slot's epoch (the major of its filter's classid).
    pub epoch: u32,
    /// Cookie of the router namespace (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
}

/// `struct tg_owner`: who holds a slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// Cookie of the sandbox's router namespace.
    pub netns_cookie: u64,
    /// The process that claimed the slot.
    pub pid: u32,
    /// Reserved, 0.
    pub reserved: u32,
}

/// `struct tg_config`: the mode of one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `MODE_*`.
    pub mode: u32,
    /// Reserved, 0.
    pub flags: u32,
}

/// Data part of `struct tg_lpm_v4` (aya's [`Key`] adds `prefixlen`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LpmV4 {
    /// [`tag`]: the slot and the generation.
    pub tag: u32,
    /// Address, network byte order.
    pub addr: [u8; 4],
}

/// Data part of `struct tg_lpm_v6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LpmV6 {
    /// [`tag`]: the slot and the generation.
    pub tag: u32,
    /// Address, network byte order.
    pub addr: [u8; 16],
}

/// `struct tg_event`: one dropped packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
    /// Cookie of the sandbox's router namespace.
    pub netns_cookie: u64,
    /// The sandbox's slot.
    pub slot: u32,
    /// `enum tg_reason`.
    pub reason: u32,
    /// Ethertype of the frame.
    pub ethertype: u16,
    /// 4, 6, or 0 for an L2 drop.
    pub family: u8,
    /// IP protocol / IPv6 next header.
    pub proto: u8,
    /// Destination port (ICMP: type), host order.
    pub dport: u16,
    /// Source port (ICMP: code), host order.
    pub sport: u16,
    /// Destination address (IPv4 in the first 4 bytes).
    pub dst: [u8; 16],
    /// Source address (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
}

/// `struct tg_splice_end` (`bpf/splice.bpf.c`): one socket of a kernel
/// tunnel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceEnd {
    /// The peer socket's cookie.
    pub peer: u64,
    /// Bytes received and redirected to the peer.
    pub bytes: u64,
    /// Chunks redirected.
    pub chunks: u64,
    /// Bytes left to user space once `passing` is set.
    pub passed: u64,
    /// Non-zero: every chunk stays with the socket for user space.
    pub passing: u32,
    /// Zero.
    pub pad: u32,
}

impl SpliceEnd {
    /// A fresh end whose data goes to `peer`.
    pub fn to(peer: u64) -> Self {
        Self {
            peer,
            ..Self::default()
        }
    }
}

const _: () = assert!(size_of::<SpliceEnd>() == 40);
const _: () = assert!(size_of::<NetConfig>() == 64);
const _: () = assert!(size_of::<Owner>() == 16);
const _: () = assert!(size_of::<Config>() == 8);
const _: () = assert!(size_of::<Key<LpmV4>>() == 12);
const _: () = assert!(size_of::<Key<LpmV6>>() == 24);
const _: () = assert!(size_of::<RawEvent>() == 56);

impl RawEvent {
    /// Decodes a ring-buffer record (native byte order, as the kernel wrote
    /// it). `None` when the record is shorter than the struct.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < size_of::<Self>() {
            return None;
        }
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut cookie = [0u8; 8];
        cookie.copy_from_slice(&b[0..8]);
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&b[24..40]);
        let mut src = [0u8; 16];
        src.copy_from_slice(&b[40..56]);
        Some(Self {
            netns_cookie: u64::from_ne_bytes(cookie),
            slot: u32_at(8),
            reason: u32_at(12),
            ethertype: u16_at(16),
            family: b[18],
            proto: b[19],
            dport: u16_at(20),
            sport: u16_at(22),
            dst,
            src,
        })
    }
}
