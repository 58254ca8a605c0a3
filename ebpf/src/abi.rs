//! Rust mirror of `bpf/tollgate.h`: every constant, map key and map value the
//! program and this crate share. Sizes are asserted at compile time; the
//! `aya::Pod` impls live in the crate's one `unsafe` module (`src/sys.rs`).

use std::mem::size_of;

use aya::maps::lpm_trie::Key;

/// `TG_ABI_VERSION`: stored in [`NetConfig::abi_version`].
pub const ABI_VERSION: u32 = 1;

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

/// `TG_GENERATIONS`.
pub const GENERATIONS: u32 = 2;
/// `TG_FLOOR_MAX`: floor + private prefixes per family and generation.
pub const FLOOR_MAX: usize = 1024;
/// `TG_ALLOW_MAX`: allow_cidrs prefixes per family and generation.
pub const ALLOW_MAX: usize = 256;
/// `TG_GEN_BITS`: bits of the generation at the front of every LPM key.
pub const GEN_BITS: u32 = 32;

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
    /// `struct tg_net`, one element.
    pub const NET: &str = "tg_net";
    /// Active generation, one element.
    pub const ACTIVE: &str = "tg_active";
    /// `struct tg_config` per generation.
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
    /// Per-CPU verdict counters.
    pub const COUNTERS: &str = "tg_counters";
    /// Ring buffer of drop events.
    pub const EVENTS: &str = "tg_events";
    /// Map-in-map used only to wait for an RCU grace period.
    pub const SYNC: &str = "tg_sync";
    /// The inner map stored in [`SYNC`].
    pub const SYNC_INNER: &str = "tg_sync_inner";
    /// Every map, in pin order.
    pub const ALL: [&str; 12] = [
        NET, ACTIVE, CONFIG, FLOOR_V4, FLOOR_V6, ALLOW_V4, ALLOW_V6, LISTENERS, COUNTERS, EVENTS,
        SYNC, SYNC_INNER,
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
    /// Generation, 0 or 1.
    pub gen: u32,
    /// Address, network byte order.
    pub addr: [u8; 4],
}

/// Data part of `struct tg_lpm_v6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LpmV6 {
    /// Generation, 0 or 1.
    pub gen: u32,
    /// Address, network byte order.
    pub addr: [u8; 16],
}

/// `struct tg_event`: one dropped packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
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
const _: () = assert!(size_of::<NetConfig>() == 56);
const _: () = assert!(size_of::<Config>() == 8);
const _: () = assert!(size_of::<Key<LpmV4>>() == 12);
const _: () = assert!(size_of::<Key<LpmV6>>() == 24);
const _: () = assert!(size_of::<RawEvent>() == 44);

impl RawEvent {
    /// Decodes a ring-buffer record (native byte order, as the kernel wrote
    /// it). `None` when the record is shorter than the struct.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < size_of::<Self>() {
            return None;
        }
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&b[12..28]);
        let mut src = [0u8; 16];
        src.copy_from_slice(&b[28..44]);
        Some(Self {
            reason: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            ethertype: u16_at(4),
            family: b[6],
            proto: b[7],
            dport: u16_at(8),
            sport: u16_at(10),
            dst,
            src,
        })
    }
}
