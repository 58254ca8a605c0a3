//! The platform floor: addresses no policy can reach, and the private ranges
//! that only an explicit `allow_cidrs` entry opens.
//!
//! Both checks see through the IPv6 forms that deliver to an IPv4 address
//! (IPv4-mapped / -compatible / -translated, NAT64, 6to4, Teredo, ISATAP): if
//! any embedded IPv4 address is in the set, so is the IPv6 address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::net::{embedded_v4, v4net, v6net, RangeSet};

/// Addresses denied in every mode, whatever `allow_cidrs` says: the platform
/// ranges below plus the operator's `deny_cidrs`, the host's own addresses and
/// other sandboxes' addresses, given to [`Floor::new`].
///
/// Platform ranges: 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16 (link-local,
/// cloud metadata), 224.0.0.0/4 (multicast), 240.0.0.0/4 (reserved, with
/// 255.255.255.255), 100.100.100.200 (Alibaba Cloud metadata, inside
/// 100.64/10), ::/128, ::1/128, fe80::/10, ff00::/8 and fd00:ec2::254 (AWS
/// IPv6 metadata, inside fc00::/7).
///
/// Lookups are a binary search over merged ranges, so thousands of sandbox
/// addresses cost a few comparisons. The set is immutable; rebuild it and swap
/// the `Arc` when sandboxes come and go.
#[derive(Clone, Debug)]
pub struct Floor {
    set: RangeSet,
}

// === impl Floor ===

impl Floor {
    /// The platform ranges only.
    pub fn platform() -> Self {
        Self::new(std::iter::empty())
    }

    /// The platform ranges plus `extra`: operator `deny_cidrs`, the host's
    /// own addresses and other sandboxes' addresses.
    pub fn new<I: IntoIterator<Item = IpNet>>(extra: I) -> Self {
        let set = RangeSet::from_nets(platform_nets().into_iter().chain(extra));
        Self { set }
    }

    /// An EMPTY floor, for loopback tests and benches only (so they can dial
    /// 127.0.0.x). Never give it to a real sandbox: it opens loopback,
    /// link-local and metadata addresses.
    #[doc(hidden)]
    pub fn none_for_tests() -> Floor {
        Self {
            set: RangeSet::default(),
        }
    }

    /// True when `ip`, or an IPv4 address embedded in it, is in the floor.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.set.contains_v4(v4),
            IpAddr::V6(v6) => {
                self.set.contains_v6(v6) || embedded_v4(v6).any(|v4| self.set.contains_v4(v4))
            }
        }
    }
}

impl Default for Floor {
    fn default() -> Self {
        Self::platform()
    }
}

fn platform_nets() -> [IpNet; 11] {
    [
        v4net([0, 0, 0, 0], 8),
        v4net([127, 0, 0, 0], 8),
        v4net([169, 254, 0, 0], 16),
        v4net([224, 0, 0, 0], 4),
        v4net([240, 0, 0, 0], 4),
        v4net([100, 100, 100, 200], 32),
        v6net([0, 0, 0, 0, 0, 0, 0, 0], 128),
        v6net([0, 0, 0, 0, 0, 0, 0, 1], 128),
        v6net([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        v6net([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
        v6net([0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254], 128),
    ]
}

// === private ranges ===

/// The private ranges: 10/8, 172.16/12, 192.168/16, 100.64/10 (CGNAT),
/// fc00::/7 (ULA) and the deprecated site-local fec0::/10.
pub(crate) fn private_nets() -> [IpNet; 6] {
    [
        v4net([10, 0, 0, 0], 8),
        v4net([172, 16, 0, 0], 12),
        v4net([192, 168, 0, 0], 16),
        v4net([100, 64, 0, 0], 10),
        v6net([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        v6net([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
    ]
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 10
        || (o[0] == 172 && (o[1] & 0xf0) == 16)
        || (o[0] == 192 && o[1] == 168)
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
}

fn is_private_v6(ip: Ipv6Addr) -> bool {
    let s0 = ip.segments()[0];
    (s0 & 0xfe00) == 0xfc00 || (s0 & 0xffc0) == 0xfec0
}

/// True when `ip` is in a private range (10/8, 172.16/12, 192.168/16,
/// 100.64/10, fc00::/7, fec0::/10), directly or as an embedded IPv4 address.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => is_private_v6(v6) || embedded_v4(v6).any(is_private_v4),
    }
}
