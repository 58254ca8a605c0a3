//! The compiled policy: one decision per connection, per DNS question and per
//! resolved address.
//!
//! Order of [`CompiledPolicy::decide`], first match wins:
//!
//! 1. Destination in the [`Floor`] → `Deny(floor)`, in every mode and whatever
//!    the name. Floor traffic is normally dropped by eBPF before it reaches the
//!    proxy; services on such addresses are served by the host before policy.
//! 2. `deny-all` → `Deny(deny_all)`.
//! 3. The name is normalised. Malformed → `Deny(invalid_name)`, never a
//!    fall-back to the destination address. An IP literal counts as no name.
//! 4. UDP to port 443 with a name (QUIC to a domain) → `Deny(quic)`; clients
//!    fall back to TCP.
//! 5. UDP and ICMP are decided by destination: `allow_cidrs` → `Allow`; in
//!    `allow-all` any public address → `Allow`. DNS to the sandbox's own
//!    resolver never reaches this function: the caller answers it (and asks
//!    [`CompiledPolicy::name_allowed`]).
//! 6. TCP with a name: a transform match → `Intercept` (most specific rule;
//!    transform domains are implicitly allowed). Otherwise in `allow-all`, or
//!    in `custom` when `allow_domains` matches → `Tunnel` dialling the name
//!    (the proxy resolves it and checks each answer with
//!    [`CompiledPolicy::check_resolved`]). Otherwise in `custom`, destination
//!    in `allow_cidrs` → `Tunnel` to the address, else
//!    `Deny(domain_not_allowed)`.
//! 7. TCP without a name: `allow_cidrs` → `Tunnel` to the address; `allow-all`
//!    and a public address → `Tunnel` to the address; else deny.
//!
//! **Private ranges and `allow_cidrs`.** A private address (10/8, 172.16/12,
//! 192.168/16, 100.64/10, fc00::/7) is reachable only through an
//! `allow_cidrs` entry that itself lies inside a private range, e.g.
//! `10.0.0.0/8` or `192.168.1.5`. A catch-all such as `0.0.0.0/0` or `::/0`
//! opens the public internet, not private networks (THREATS #9: "reachable
//! only at the addresses that allow_cidrs lists"). IPv6 forms that embed a
//! private IPv4 address other than IPv4-mapped (NAT64, 6to4, Teredo) are never
//! reachable. IPv4-mapped destinations are looked up as IPv4.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::domain::{parse_host, DomainMap, Host, Pattern, Side};
use super::floor::{is_private, private_nets, Floor};
use super::net::{net_within, parse_cidr, RangeSet};
use super::{Mode, NetworkPolicy, Transform};

/// Transport protocol of a connection or flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP: may carry a name (SNI / Host) and be proxied.
    Tcp,
    /// UDP: decided by destination address; QUIC to a name is dropped.
    Udp,
    /// ICMP / ICMPv6: decided by destination address.
    Icmp,
}

/// Where a tunnel connects upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dial {
    /// A name matched: the proxy resolves this (normalised) name itself,
    /// checks every answer with [`CompiledPolicy::check_resolved`] and
    /// connects to the original destination port.
    Name(String),
    /// Decided by destination address: connect to it.
    Addr(IpAddr),
}

/// The outcome of [`CompiledPolicy::decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Refused, with the reason used for metrics and events.
    Deny(DenyReason),
    /// Non-TCP traffic that may pass directly to its destination address.
    Allow,
    /// TCP relayed opaquely, without decryption.
    Tunnel {
        /// What to connect to.
        dial: Dial,
    },
    /// TCP to a transform domain: terminate TLS and rewrite headers.
    Intercept {
        /// The normalised name that matched (SNI, else Host).
        name: String,
        /// The most specific matching rule.
        transform: Arc<Transform>,
    },
}

/// Why a connection was denied. [`DenyReason::as_str`] gives stable
/// snake_case codes for metric labels and events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The address is in the platform floor.
    Floor,
    /// A private address not opened by a private `allow_cidrs` entry.
    PrivateRange,
    /// The mode is `deny-all`.
    DenyAll,
    /// `custom`: the name matches no allowed domain or transform, and the
    /// destination is not in `allow_cidrs`.
    DomainNotAllowed,
    /// `custom`: TCP without a usable name, destination not in `allow_cidrs`.
    NoName,
    /// `custom`: UDP to an address outside `allow_cidrs`.
    UdpNotAllowed,
    /// `custom`: ICMP to an address outside `allow_cidrs`.
    IcmpNotAllowed,
    /// UDP to port 443 carrying a name: QUIC to a domain.
    Quic,
    /// The name (SNI / Host) is malformed.
    InvalidName,
}

/// A [`NetworkPolicy`] prepared for fast decisions.
///
/// Built from any `NetworkPolicy`; entries that fail validation (possible
/// only for policies that skipped [`NetworkPolicy::from_json`]) are left out,
/// so they allow nothing.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    mode: Mode,
    allow: DomainMap<()>,
    transforms: DomainMap<Arc<Transform>>,
    /// Every `allow_cidrs` entry.
    cidrs: RangeSet,
    /// The entries that lie inside a private range: the only ones that open
    /// private addresses.
    private_grants: RangeSet,
    floor: Arc<Floor>,
}

// === impl DenyReason ===

impl DenyReason {
    /// Every reason, for pre-registering metric labels.
    pub const ALL: [DenyReason; 9] = [
        Self::Floor,
        Self::PrivateRange,
        Self::DenyAll,
        Self::DomainNotAllowed,
        Self::NoName,
        Self::UdpNotAllowed,
        Self::IcmpNotAllowed,
        Self::Quic,
        Self::InvalidName,
    ];

    /// The stable snake_case code of this reason.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::PrivateRange => "private_range",
            Self::DenyAll => "deny_all",
            Self::DomainNotAllowed => "domain_not_allowed",
            Self::NoName => "no_name",
            Self::UdpNotAllowed => "udp_not_allowed",
            Self::IcmpNotAllowed => "icmp_not_allowed",
            Self::Quic => "quic",
            Self::InvalidName => "invalid_name",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Verdict ===

impl Verdict {
    /// The reason when this is a denial.
    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            Self::Deny(r) => Some(*r),
            _ => None,
        }
    }
}

// === impl CompiledPolicy ===

impl CompiledPolicy {
    /// Compiles `policy` against `floor`.
    pub fn new(policy: &NetworkPolicy, floor: Arc<Floor>) -> Self {
        let mut allow = DomainMap::default();
        for raw in &policy.allow_domains {
            if let Ok(p) = Pattern::parse(raw) {
                allow.insert(p, ());
            }
        }
        let mut transforms = DomainMap::default();
        for t in &policy.transforms {
            if let Ok(p) = Pattern::parse(&t.domain) {
                let mut t = t.clone();
                t.domain = p.text();
                transforms.insert(p, Arc::new(t));
            }
        }
        let nets: Vec<IpNet> = policy
            .allow_cidrs
            .iter()
            .filter_map(|raw| parse_cidr(raw).ok())
            .collect();
        let private = private_nets();
        let grants = nets
            .iter()
            .filter(|n| private.iter().any(|p| net_within(n, p)))
            .copied()
            .collect::<Vec<_>>();
        Self {
            mode: policy.mode,
            allow,
            transforms,
            cidrs: RangeSet::from_nets(nets),
            private_grants: RangeSet::from_nets(grants),
            floor,
        }
    }

    /// The policy's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The floor this policy was compiled against.
    pub fn floor(&self) -> &Arc<Floor> {
        &self.floor
    }

    /// Decides a new connection or flow. `name` is the SNI, else the HTTP
    /// Host without its port, else `None`; `dst` and `port` are the original
    /// destination. See the module docs for the order of rules.
    pub fn decide(&self, name: Option<&str>, dst: IpAddr, port: u16, proto: Proto) -> Verdict {
        let dst = dst.to_canonical();
        if self.floor.contains(dst) {
            return Verdict::Deny(DenyReason::Floor);
        }
        if self.mode == Mode::DenyAll {
            return Verdict::Deny(DenyReason::DenyAll);
        }
        let name = match name.map(|n| parse_host(n, Side::Wire)) {
            None | Some(Ok(Host::Ip(_))) => None,
            Some(Ok(Host::Name(n))) => Some(n),
            Some(Err(_)) => return Verdict::Deny(DenyReason::InvalidName),
        };
        if proto != Proto::Tcp {
            if proto == Proto::Udp && port == 443 && name.is_some() {
                return Verdict::Deny(DenyReason::Quic);
            }
            return self.by_address(dst, proto);
        }
        let Some(name) = name else {
            return self.by_address(dst, proto);
        };
        if let Some(t) = self.transforms.get(&name) {
            return Verdict::Intercept {
                name,
                transform: Arc::clone(t),
            };
        }
        match self.mode {
            Mode::AllowAll => Verdict::Tunnel {
                dial: Dial::Name(name),
            },
            Mode::Custom if self.allow.get(&name).is_some() => Verdict::Tunnel {
                dial: Dial::Name(name),
            },
            Mode::Custom if self.cidr_allows(dst) => Verdict::Tunnel {
                dial: Dial::Addr(dst),
            },
            Mode::Custom | Mode::DenyAll => Verdict::Deny(DenyReason::DomainNotAllowed),
        }
    }

    /// Checks one DNS answer for a name-matched connection before it is
    /// dialled: the floor is refused, and so is a private address unless a
    /// private `allow_cidrs` entry covers it (DNS rebinding).
    pub fn check_resolved(&self, ip: IpAddr) -> Result<(), DenyReason> {
        let ip = ip.to_canonical();
        if self.floor.contains(ip) {
            return Err(DenyReason::Floor);
        }
        if self.mode == Mode::DenyAll {
            return Err(DenyReason::DenyAll);
        }
        if is_private(ip) && !self.private_grants.contains(ip) {
            return Err(DenyReason::PrivateRange);
        }
        Ok(())
    }

    /// Whether the sandbox's resolver may look `name` up: `allow-all` always,
    /// `deny-all` never, `custom` when the name matches `allow_domains` or a
    /// transform. Malformed names and IP literals are refused in `custom`.
    pub fn name_allowed(&self, name: &str) -> bool {
        match self.mode {
            Mode::AllowAll => true,
            Mode::DenyAll => false,
            Mode::Custom => match parse_host(name, Side::Wire) {
                Ok(Host::Name(n)) => {
                    self.allow.get(&n).is_some() || self.transforms.get(&n).is_some()
                }
                Ok(Host::Ip(_)) | Err(_) => false,
            },
        }
    }

    /// The most specific transform for `name` (normalised here), if any.
    pub fn transform_for(&self, name: &str) -> Option<Arc<Transform>> {
        if self.mode == Mode::DenyAll || self.transforms.is_empty() {
            return None;
        }
        match parse_host(name, Side::Wire) {
            Ok(Host::Name(n)) => self.transforms.get(&n).cloned(),
            _ => None,
        }
    }

    /// Private addresses need a private grant; others any entry.
    fn cidr_allows(&self, dst: IpAddr) -> bool {
        if is_private(dst) {
            self.private_grants.contains(dst)
        } else {
            self.cidrs.contains(dst)
        }
    }

    /// Decides by destination address alone (no usable name, or non-TCP).
    fn by_address(&self, dst: IpAddr, proto: Proto) -> Verdict {
        let pass = || match proto {
            Proto::Tcp => Verdict::Tunnel {
                dial: Dial::Addr(dst),
            },
            Proto::Udp | Proto::Icmp => Verdict::Allow,
        };
        if self.cidr_allows(dst) {
            return pass();
        }
        let private = is_private(dst);
        match self.mode {
            Mode::AllowAll if private => Verdict::Deny(DenyReason::PrivateRange),
            Mode::AllowAll => pass(),
            Mode::Custom if private && self.cidrs.contains(dst) => {
                Verdict::Deny(DenyReason::PrivateRange)
            }
            Mode::Custom => Verdict::Deny(match proto {
                Proto::Tcp => DenyReason::NoName,
                Proto::Udp => DenyReason::UdpNotAllowed,
                Proto::Icmp => DenyReason::IcmpNotAllowed,
            }),
            Mode::DenyAll => Verdict::Deny(DenyReason::DenyAll),
        }
    }
}
