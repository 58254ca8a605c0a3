//! Named verdicts: why a packet passed or was dropped, per-reason counters and
//! drop events.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::abi;

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $value:literal => $name:literal,)*) => {
        /// `enum tg_reason`: why a packet passed or was dropped.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        pub enum Reason {
            $($(#[$doc])* $variant = $value,)*
        }

        impl Reason {
            /// Every reason, in ABI order.
            pub const ALL: [Reason; abi::REASON_MAX as usize] = [$(Reason::$variant,)*];

            /// snake_case name for metrics and events (`drop_floor`, ...).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }

            /// The reason with this ABI value.
            pub fn from_u32(v: u32) -> Option<Self> {
                match v {
                    $($value => Some(Reason::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    /// ARP, NDP, DNS, echo or TCP 80 (the CA endpoint) to the gateway.
    PassLocal = 0 => "pass_local",
    /// Destination in allow_cidrs (forwarded, mark 0x2).
    PassCidr = 1 => "pass_cidr",
    /// allow-all UDP / echo to a public address (forwarded, mark 0x2).
    PassPublic = 2 => "pass_public",
    /// TCP assigned to the proxy's listener (mark 0x1).
    Steered = 3 => "steered",
    /// VLAN / QinQ tag or a non-IP, non-ARP ethertype.
    DropL2 = 4 => "drop_l2",
    /// Truncated or inconsistent headers.
    DropMalformed = 5 => "drop_malformed",
    /// IPv4 fragment or IPv6 fragment header.
    DropFragment = 6 => "drop_fragment",
    /// IPv4 options.
    DropIpOptions = 7 => "drop_ip_options",
    /// IPv6 extension header.
    DropExtHdr = 8 => "drop_ext_hdr",
    /// IPv6 from a sandbox without IPv6.
    DropIpv6Disabled = 9 => "drop_ipv6_disabled",
    /// Source address is not the sandbox's.
    DropSpoof = 10 => "drop_spoof",
    /// Not TCP, UDP or ICMP(v6).
    DropL4Proto = 11 => "drop_l4_proto",
    /// ICMP other than echo (and NDP).
    DropIcmpType = 12 => "drop_icmp_type",
    /// To the gateway, not DNS, echo or TCP 80.
    DropGatewayPort = 13 => "drop_gateway_port",
    /// Destination in the floor.
    DropFloor = 14 => "drop_floor",
    /// deny-all.
    DropDenyAll = 15 => "drop_deny_all",
    /// allow-all UDP / echo to a private range not in allow_cidrs.
    DropPrivate = 16 => "drop_private",
    /// allow-all UDP to port 443 (QUIC; clients fall back to TCP).
    DropQuic = 17 => "drop_quic",
    /// custom-mode UDP / echo outside allow_cidrs.
    DropNotAllowed = 18 => "drop_not_allowed",
    /// TCP to steer, but no proxy listener is registered (fail closed).
    DropNoListener = 19 => "drop_no_listener",
    /// bpf_sk_assign refused the socket.
    DropAssignFailed = 20 => "drop_assign_failed",
    /// The maps are not filled or from another ABI (fail closed).
    DropNoConfig = 21 => "drop_no_config",
}

impl Reason {
    /// Does this verdict drop the packet?
    pub fn is_drop(self) -> bool {
        self as u32 >= abi::FIRST_DROP
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Packet counts per verdict, summed over CPUs, since the filter was attached
/// (they survive [`crate::Filter::open_pinned`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    by_reason: [u64; abi::REASON_MAX as usize],
    /// Drop events the ring buffer had no room for.
    pub events_lost: u64,
}

impl Counters {
    pub(crate) fn from_slots(slots: &[u64]) -> Self {
        let mut c = Self::default();
        for (i, v) in slots.iter().enumerate() {
            if i < c.by_reason.len() {
                c.by_reason[i] = *v;
            } else if i as u32 == abi::COUNTER_EVENTS_LOST {
                c.events_lost = *v;
            }
        }
        c
    }

    /// Packets judged with this reason.
    pub fn get(&self, reason: Reason) -> u64 {
        self.by_reason[reason as usize]
    }

    /// (reason, packets) for every reason, in ABI order.
    pub fn iter(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        Reason::ALL.iter().map(|r| (*r, self.get(*r)))
    }

    /// Packets dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.iter()
            .filter(|(r, _)| r.is_drop())
            .map(|(_, n)| n)
            .sum()
    }

    /// Packets passed (locally, forwarded or steered).
    pub fn passed(&self) -> u64 {
        self.iter()
            .filter(|(r, _)| !r.is_drop())
            .map(|(_, n)| n)
            .sum()
    }

    /// `self - earlier`, per reason (saturating).
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut d = self.clone();
        for (a, b) in d.by_reason.iter_mut().zip(earlier.by_reason.iter()) {
            *a = a.saturating_sub(*b);
        }
        d.events_lost = d.events_lost.saturating_sub(earlier.events_lost);
        d
    }
}

/// One dropped packet, as reported by the program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// Why it was dropped.
    pub reason: Reason,
    /// Ethertype of the frame (0x0800, 0x86dd, 0x8100, ...).
    pub ethertype: u16,
    /// IP protocol / IPv6 next header (0 for an L2 drop).
    pub proto: u8,
    /// Destination address; `None` for an L2 drop.
    pub dst: Option<IpAddr>,
    /// Source address as sent (the spoofed one for `drop_spoof`).
    pub src: Option<IpAddr>,
    /// Destination port; for ICMP / ICMPv6 the type.
    pub dport: u16,
    /// Source port; for ICMP / ICMPv6 the code.
    pub sport: u16,
}

impl DropEvent {
    /// Decodes a ring-buffer record; `None` for a short record or an unknown
    /// reason (a newer program than this crate).
    pub(crate) fn from_bytes(b: &[u8]) -> Option<Self> {
        let raw = abi::RawEvent::from_bytes(b)?;
        let reason = Reason::from_u32(raw.reason)?;
        let addr = |a: [u8; 16]| -> Option<IpAddr> {
            match raw.family {
                4 => Some(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
                6 => Some(IpAddr::V6(Ipv6Addr::from(a))),
                _ => None,
            }
        };
        Some(Self {
            reason,
            ethertype: raw.ethertype,
            proto: raw.proto,
            dst: addr(raw.dst),
            src: addr(raw.src),
            dport: raw.dport,
            sport: raw.sport,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_and_are_named() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(Reason::from_u32(i as u32), Some(*r));
            assert!(r
                .as_str()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()));
            assert_eq!(r.is_drop(), r.as_str().starts_with("drop_"));
        }
        assert_eq!(Reason::from_u32(abi::REASON_MAX), None);
    }

    #[test]
    fn event_decodes() {
        let raw = abi::RawEvent {
            netns_cookie: 4100,
            slot: 7,
            reason: Reason::DropFloor as u32,
            ethertype: 0x0800,
            family: 4,
            proto: 17,
            dport: 53,
            sport: 40000,
            dst: [169, 254, 169, 254, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            src: [10, 0, 2, 15, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        let mut b = Vec::new();
        b.extend_from_slice(&raw.netns_cookie.to_ne_bytes());
        b.extend_from_slice(&raw.slot.to_ne_bytes());
        b.extend_from_slice(&raw.reason.to_ne_bytes());
        b.extend_from_slice(&raw.ethertype.to_ne_bytes());
        b.push(raw.family);
        b.push(raw.proto);
        b.extend_from_slice(&raw.dport.to_ne_bytes());
        b.extend_from_slice(&raw.sport.to_ne_bytes());
        b.extend_from_slice(&raw.dst);
        b.extend_from_slice(&raw.src);
        assert_eq!(abi::RawEvent::from_bytes(&b), Some(raw));
        let e = DropEvent::from_bytes(&b).expect("decodes");
        assert_eq!(e.reason, Reason::DropFloor);
        assert_eq!(e.dst, Some("169.254.169.254".parse().expect("ip")));
        assert_eq!(e.src, Some("10.0.2.15".parse().expect("ip")));
        assert_eq!((e.proto, e.dport, e.sport), (17, 53, 40000));
        assert!(DropEvent::from_bytes(&b[..55]).is_none());
    }
}
