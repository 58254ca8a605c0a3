//! Address arithmetic shared by the floor and the matcher: CIDR parsing and
//! normalisation, sorted range sets, and IPv4 addresses embedded in IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why a CIDR string is unacceptable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CidrError {
    /// Not an address or `addr/len`.
    Syntax,
    /// Bits below the prefix are set; carries the network meant.
    HostBits(IpNet),
}

/// A set of address ranges, sorted and merged, for O(log n) membership.
#[derive(Clone, Debug, Default)]
pub(crate) struct RangeSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

// === impl RangeSet ===

impl RangeSet {
    /// Builds the set from networks, merging overlaps.
    pub(crate) fn from_nets<I: IntoIterator<Item = IpNet>>(nets: I) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        Self {
            v4: merge(v4),
            v6: merge(v6),
        }
    }

    /// Membership of an IPv4 address.
    pub(crate) fn contains_v4(&self, ip: Ipv4Addr) -> bool {
        contains(&self.v4, u32::from(ip))
    }

    /// Membership of an IPv6 address, taken literally (no embedded forms).
    pub(crate) fn contains_v6(&self, ip: Ipv6Addr) -> bool {
        contains(&self.v6, u128::from(ip))
    }

    /// Membership of an address, taken literally (no embedded forms).
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.contains_v4(v4),
            IpAddr::V6(v6) => self.contains_v6(v6),
        }
    }
}

fn merge<T: Ord + Copy>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= last.1 => {
                if end > last.1 {
                    last.1 = end;
                }
            }
            _ => out.push((start, end)),
        }
    }
    out
}

fn contains<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    let idx = ranges.partition_point(|r| r.0 <= x);
    idx > 0 && ranges.get(idx - 1).is_some_and(|r| r.1 >= x)
}

// === CIDRs ===

/// Parses `addr/len` or a bare address (meaning /32 or /128) into its
/// canonical network. An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) is
/// rewritten as the IPv4 network it denotes, because addresses are looked up
/// in their canonical (IPv4) form.
pub(crate) fn parse_cidr(raw: &str) -> Result<IpNet, CidrError> {
    // std's address parsers refuse leading zeros (`010.0.0.1`), which other
    // stacks read as octal; the prefix is at most three plain digits.
    let (addr, len) = match raw.split_once('/') {
        None => (raw, None),
        Some((addr, len)) => {
            if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CidrError::Syntax);
            }
            (
                addr,
                Some(len.parse::<u8>().map_err(|_| CidrError::Syntax)?),
            )
        }
    };
    let addr = IpAddr::from_str(addr).map_err(|_| CidrError::Syntax)?;
    let net = match len {
        None => IpNet::from(addr),
        Some(len) => IpNet::new(addr, len).map_err(|_| CidrError::Syntax)?,
    };
    let trunc = net.trunc();
    if trunc != net {
        return Err(CidrError::HostBits(unmap(trunc)));
    }
    Ok(unmap(net))
}

/// `::ffff:a.b.c.d/n` with n >= 96 becomes `a.b.c.d/(n-96)`.
fn unmap(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net {
        if n.prefix_len() >= 96 {
            if let Some(v4) = n.network().to_ipv4_mapped() {
                if let Ok(v4net) = Ipv4Net::new(v4, n.prefix_len() - 96) {
                    return IpNet::V4(v4net);
                }
            }
        }
    }
    net
}

/// True when `inner` lies entirely inside `outer`.
pub(crate) fn net_within(inner: &IpNet, outer: &IpNet) -> bool {
    match (inner, outer) {
        (IpNet::V4(i), IpNet::V4(o)) => o.contains(i),
        (IpNet::V6(i), IpNet::V6(o)) => o.contains(i),
        _ => false,
    }
}

/// A v4 network from a literal; the inputs are constants, so a bad one is a
/// programming error, reported as an empty /32 of 0.0.0.0 rather than a panic.
pub(crate) fn v4net(a: [u8; 4], len: u8) -> IpNet {
    Ipv4Net::new(Ipv4Addr::from(a), len)
        .map(IpNet::V4)
        .unwrap_or(IpNet::V4(Ipv4Net::default()))
}

/// A v6 network from a literal (see [`v4net`]).
pub(crate) fn v6net(segs: [u16; 8], len: u8) -> IpNet {
    Ipv6Net::new(Ipv6Addr::from(segs), len)
        .map(IpNet::V6)
        .unwrap_or(IpNet::V6(Ipv6Net::default()))
}

// === embedded IPv4 ===

/// The IPv4 addresses an IPv6 address may deliver to, by the standard
/// transition mechanisms. Each is a candidate: if any of them is forbidden,
/// the IPv6 address is treated as forbidden.
///
/// * IPv4-mapped `::ffff:0:0/96` and IPv4-compatible `::/96`: last 32 bits.
/// * SIIT IPv4-translated `::ffff:0:0:0/96`: last 32 bits.
/// * NAT64 well-known prefix `64:ff9b::/96`: last 32 bits.
/// * NAT64 local-use `64:ff9b:1::/48`: every RFC 6052 position (/48, /56,
///   /64, /96), since the operator's prefix length is not visible.
/// * 6to4 `2002::/16`: bits 16..48.
/// * Teredo `2001::/32`: the server at bits 32..64 and the client at bits
///   96..128, stored inverted.
/// * ISATAP interface ids `…:0000:5efe:a.b.c.d` / `…:0200:5efe:a.b.c.d`.
pub(crate) fn embedded_v4(ip: Ipv6Addr) -> impl Iterator<Item = Ipv4Addr> {
    let o = ip.octets();
    let s = ip.segments();
    let v4 = |a: u8, b: u8, c: u8, d: u8| Some(Ipv4Addr::new(a, b, c, d));
    let last = v4(o[12], o[13], o[14], o[15]);
    let mut out: [Option<Ipv4Addr>; 6] = [None; 6];

    // ::/96 (compatible), ::ffff:0:0/96 (mapped), ::ffff:0:0:0/96 (SIIT).
    let head_zero = s[..4].iter().all(|&x| x == 0);
    let legacy = head_zero
        && ((s[4] == 0 && (s[5] == 0 || s[5] == 0xffff)) || (s[4] == 0xffff && s[5] == 0));
    // 64:ff9b::/96 (NAT64 well-known prefix).
    let nat64 = s[0] == 0x0064 && s[1] == 0xff9b && s[2..6].iter().all(|&x| x == 0);
    if legacy || nat64 {
        out[0] = last;
    } else if s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001 {
        out[0] = v4(o[6], o[7], o[9], o[10]);
        out[1] = v4(o[7], o[9], o[10], o[11]);
        out[2] = v4(o[9], o[10], o[11], o[12]);
        out[3] = last;
    } else if s[0] == 0x2002 {
        out[0] = v4(o[2], o[3], o[4], o[5]);
    } else if s[0] == 0x2001 && s[1] == 0 {
        out[0] = v4(o[4], o[5], o[6], o[7]);
        out[1] = v4(!o[12], !o[13], !o[14], !o[15]);
    }
    if (s[4] | 0x0200) == 0x0200 && s[5] == 0x5efe {
        out[5] = last;
    }
    out.into_iter().flatten()
}
