//! What the program enforces, in Rust terms: the sandbox's addresses, the
//! egress policy (mode + allow_cidrs) and the floor.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::abi;
use crate::error::EbpfError;

/// The sandbox's link as the router namespace sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxNet {
    /// The guest's IPv4 address: the only IPv4 source accepted.
    pub guest_v4: Ipv4Addr,
    /// The router's address on the link (DNS, echo and TCP 80 only).
    pub gateway_v4: Ipv4Addr,
    /// The guest's IPv6 address; `None` drops all IPv6.
    pub guest_v6: Option<Ipv6Addr>,
    /// The router's IPv6 address on the link; set exactly when `guest_v6` is.
    pub gateway_v6: Option<Ipv6Addr>,
}

/// The eBPF side of a sandbox's `network_policy` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Public internet allowed: UDP/echo forwarded (not to private ranges,
    /// not QUIC), TCP steered to the proxy.
    AllowAll,
    /// Nothing leaves, DNS to the gateway included.
    DenyAll,
    /// Only allow_cidrs is forwarded; TCP is steered to the proxy (which
    /// checks names); other UDP/ICMP is dropped.
    Custom,
}

/// The per-sandbox policy the program enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressPolicy {
    /// The mode.
    pub mode: Mode,
    /// IPv4 destinations forwarded directly (never past the floor).
    pub allow_v4: Vec<Ipv4Net>,
    /// IPv6 destinations forwarded directly (never past the floor).
    pub allow_v6: Vec<Ipv6Net>,
}

/// Destinations the program treats specially in every mode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FloorSet {
    /// Denied in every mode, whatever allow_cidrs says.
    pub floor: Vec<IpNet>,
    /// Private ranges: in allow-all, UDP/echo to them is dropped unless
    /// allow_cidrs lists them. A private prefix inside a floor prefix stays
    /// floor.
    pub private: Vec<IpNet>,
}

// === impl SandboxNet ===

impl SandboxNet {
    /// An IPv4-only sandbox.
    pub fn v4(guest: Ipv4Addr, gateway: Ipv4Addr) -> Self {
        Self {
            guest_v4: guest,
            gateway_v4: gateway,
            guest_v6: None,
            gateway_v6: None,
        }
    }

    pub(crate) fn to_abi(&self) -> Result<abi::NetConfig, EbpfError> {
        let (flags, guest_v6, gateway_v6) = match (self.guest_v6, self.gateway_v6) {
            (Some(g), Some(gw)) => (abi::NET_HAS_V6, g.octets(), gw.octets()),
            (None, None) => (0, [0; 16], [0; 16]),
            _ => {
                return Err(EbpfError::InvalidNet(
                    "guest_v6 and gateway_v6 must be set together".into(),
                ))
            }
        };
        if self.guest_v4 == self.gateway_v4 {
            return Err(EbpfError::InvalidNet(
                "guest and gateway IPv4 addresses are equal".into(),
            ));
        }
        Ok(abi::NetConfig {
            abi_version: abi::ABI_VERSION,
            flags,
            guest_v4: self.guest_v4.octets(),
            gateway_v4: self.gateway_v4.octets(),
            guest_v6,
            gateway_v6,
            ifindex: 0,
            epoch: 0,
            netns_cookie: 0,
        })
    }

    pub(crate) fn from_abi(n: &abi::NetConfig) -> Self {
        let v6 = n.flags & abi::NET_HAS_V6 != 0;
        Self {
            guest_v4: Ipv4Addr::from(n.guest_v4),
            gateway_v4: Ipv4Addr::from(n.gateway_v4),
            guest_v6: v6.then(|| Ipv6Addr::from(n.guest_v6)),
            gateway_v6: v6.then(|| Ipv6Addr::from(n.gateway_v6)),
        }
    }
}

// === impl Mode ===

impl Mode {
    pub(crate) fn to_abi(self) -> u32 {
        match self {
            Self::AllowAll => abi::MODE_ALLOW_ALL,
            Self::DenyAll => abi::MODE_DENY_ALL,
            Self::Custom => abi::MODE_CUSTOM,
        }
    }

    pub(crate) fn from_abi(v: u32) -> Option<Self> {
        match v {
            abi::MODE_ALLOW_ALL => Some(Self::AllowAll),
            abi::MODE_DENY_ALL => Some(Self::DenyAll),
            abi::MODE_CUSTOM => Some(Self::Custom),
            _ => None,
        }
    }
}

// === impl EgressPolicy ===

impl EgressPolicy {
    /// `allow-all` with no allow_cidrs.
    pub fn allow_all() -> Self {
        Self::new(Mode::AllowAll)
    }

    /// `deny-all`.
    pub fn deny_all() -> Self {
        Self::new(Mode::DenyAll)
    }

    /// `mode` with no allow_cidrs.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            allow_v4: Vec::new(),
            allow_v6: Vec::new(),
        }
    }

    /// Adds allow_cidrs of either family.
    pub fn with_allow(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        for net in nets {
            match net {
                IpNet::V4(n) => self.allow_v4.push(n),
                IpNet::V6(n) => self.allow_v6.push(n),
            }
        }
        self
    }

    /// Host bits cleared, sorted, deduplicated, and within capacity.
    pub(crate) fn normalized(&self) -> Result<Self, EbpfError> {
        let mut v4: Vec<Ipv4Net> = self.allow_v4.iter().map(Ipv4Net::trunc).collect();
        let mut v6: Vec<Ipv6Net> = self.allow_v6.iter().map(Ipv6Net::trunc).collect();
        v4.sort();
        v4.dedup();
        v6.sort();
        v6.dedup();
        check_len("allow_v4", v4.len(), abi::ALLOW_MAX)?;
        check_len("allow_v6", v6.len(), abi::ALLOW_MAX)?;
        Ok(Self {
            mode: self.mode,
            allow_v4: v4,
            allow_v6: v6,
        })
    }
}

// === impl FloorSet ===

impl FloorSet {
    /// The platform floor and private ranges of DESIGN.md. Callers add the
    /// host's addresses, the sandbox address pool and operator `deny_cidrs`
    /// to `floor`.
    pub fn platform() -> Self {
        let floor = [
            "127.0.0.0/8",
            "0.0.0.0/8",
            "169.254.0.0/16",
            "224.0.0.0/4",
            "240.0.0.0/4",
            "255.255.255.255/32",
            "100.100.100.200/32",
            "::1/128",
            "::/128",
            "fe80::/10",
            "ff00::/8",
            "fd00:ec2::254/128",
        ];
        let private = [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "fc00::/7",
        ];
        let parse = |s: &&str| -> IpNet { s.parse().expect("static prefix") };
        Self {
            floor: floor.iter().map(parse).collect(),
            private: private.iter().map(parse).collect(),
        }
    }

    /// Adds prefixes to the floor.
    pub fn with_floor(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.floor.extend(nets);
        self
    }

    /// The entries to write: per family, (prefix, class) with host bits
    /// cleared, private prefixes inside a floor prefix dropped (so the
    /// longest match of any floor address is a floor entry), floor winning
    /// over an equal private prefix.
    pub(crate) fn compile(&self) -> Result<CompiledFloor, EbpfError> {
        let mut out = CompiledFloor::default();
        let floor: Vec<IpNet> = self.floor.iter().map(IpNet::trunc).collect();
        for net in &floor {
            match net {
                IpNet::V4(n) => out.v4.push((*n, abi::CLASS_FLOOR)),
                IpNet::V6(n) => out.v6.push((*n, abi::CLASS_FLOOR)),
            }
        }
        for net in self.private.iter().map(IpNet::trunc) {
            if floor.iter().any(|f| f.contains(&net)) {
                continue;
            }
            match net {
                IpNet::V4(n) => out.v4.push((n, abi::CLASS_PRIVATE)),
                IpNet::V6(n) => out.v6.push((n, abi::CLASS_PRIVATE)),
            }
        }
        // Sort by prefix, FLOOR (1) before PRIVATE (2), and keep the first.
        out.v4.sort();
        out.v4.dedup_by_key(|e| e.0);
        out.v6.sort();
        out.v6.dedup_by_key(|e| e.0);
        check_len("floor_v4", out.v4.len(), abi::FLOOR_MAX)?;
        check_len("floor_v6", out.v6.len(), abi::FLOOR_MAX)?;
        Ok(out)
    }
}

/// A [`FloorSet`] as trie entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CompiledFloor {
    pub(crate) v4: Vec<(Ipv4Net, u32)>,
    pub(crate) v6: Vec<(Ipv6Net, u32)>,
}

impl CompiledFloor {
    /// Back to a [`FloorSet`] (as read from pinned maps).
    pub(crate) fn to_set(&self) -> FloorSet {
        let mut set = FloorSet::default();
        let v4 = self.v4.iter().map(|(n, c)| (IpNet::V4(*n), *c));
        let v6 = self.v6.iter().map(|(n, c)| (IpNet::V6(*n), *c));
        for (net, class) in v4.chain(v6) {
            if class == abi::CLASS_FLOOR {
                set.floor.push(net);
            } else {
                set.private.push(net);
            }
        }
        set
    }
}

fn check_len(what: &'static str, count: usize, max: usize) -> Result<(), EbpfError> {
    if count > max {
        return Err(EbpfError::TooManyEntries { what, count, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
