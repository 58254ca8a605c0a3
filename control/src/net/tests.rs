use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;

#[test]
fn plan_maps_slots_to_uplinks() {
    let plan = NetPlan::default();
    assert_eq!(plan.capacity(), 16384);
    let u0 = plan.uplink(0).expect("slot 0");
    assert_eq!(u0.net4.to_string(), "10.200.0.0/30");
    assert_eq!(u0.host_v4, Ipv4Addr::new(10, 200, 0, 1));
    assert_eq!(u0.router_v4, Ipv4Addr::new(10, 200, 0, 2));
    assert_eq!(u0.net6.to_string(), "fd00:7467:1::/64");
    assert_eq!(
        u0.host_v6,
        "fd00:7467:1::1".parse::<Ipv6Addr>().expect("v6")
    );
    assert_eq!(
        u0.router_v6,
        "fd00:7467:1::2".parse::<Ipv6Addr>().expect("v6")
    );
    let last = plan.uplink(16383).expect("last slot");
    assert_eq!(last.host_v4, Ipv4Addr::new(10, 200, 255, 253));
    assert_eq!(last.router_v4, Ipv4Addr::new(10, 200, 255, 254));
    assert_eq!(last.net6.to_string(), "fd00:7467:1:3fff::/64");
    assert!(plan.uplink(16384).is_err());

    let small = NetPlan::new("192.168.7.0/29".parse().expect("net"), DEFAULT_POOL6);
    assert_eq!(small.capacity(), 2);
    assert_eq!(
        small.uplink(1).expect("1").router_v4,
        Ipv4Addr::new(192, 168, 7, 6)
    );
    let tiny = NetPlan::new("10.0.0.0/31".parse().expect("net"), DEFAULT_POOL6);
    assert_eq!(tiny.capacity(), 0);
    assert!(tiny.uplink(0).is_err());
    // The IPv6 pool bounds the capacity too.
    let v6_small = NetPlan::new(DEFAULT_POOL4, "fd00:1::/62".parse().expect("net"));
    assert_eq!(v6_small.capacity(), 4);
    assert!(v6_small.uplink(4).is_err());
    let v6_none = NetPlan::new(DEFAULT_POOL4, "fd00:1::/80".parse().expect("net"));
    assert_eq!(v6_none.capacity(), 0);
    // A huge IPv6 pool does not overflow.
    let v6_huge = NetPlan::new(
        "10.0.0.0/8".parse().expect("net"),
        "fd00::/8".parse().expect("net"),
    );
    assert_eq!(v6_huge.capacity(), 1 << 22);
    // A pool given with host bits set is used from its network address.
    let unaligned = NetPlan::new("10.9.0.77/16".parse().expect("net"), DEFAULT_POOL6);
    assert_eq!(
        unaligned.uplink(1).expect("1").host_v4,
        Ipv4Addr::new(10, 9, 0, 5)
    );
}

#[test]
fn names_and_info() {
    assert_eq!(netns_name("sbx-1"), "tollgate-sbx-1");
    assert_eq!(router_netns_name("sbx-1"), "tgr-sbx-1");
    assert_eq!(host_if_name(4001), "tgh4001");
    assert!(host_if_name(u32::MAX).len() <= 15, "IFNAMSIZ");
    assert!(ns::validate_netns_name("tollgate-sbx-1").is_ok());
    assert!(ns::validate_netns_name("../x").is_err());
    assert!(ns::validate_netns_name("").is_err());

    let info = info_for(&NetPlan::default(), "sbx-1", 3).expect("info");
    assert_eq!(info.netns, "tollgate-sbx-1");
    assert_eq!(info.router_netns, "tgr-sbx-1");
    assert_eq!(info.slot, 3);
    assert_eq!(
        (
            info.guest_if.as_str(),
            info.gateway_if.as_str(),
            info.uplink_if.as_str(),
            info.host_if.as_str()
        ),
        ("eth0", "tgs0", "up0", "tgh3")
    );
    assert_eq!(info.guest_v4, Ipv4Addr::new(10, 0, 2, 15));
    assert_eq!(info.gateway_v4, Ipv4Addr::new(10, 0, 2, 2));
    assert_eq!(info.guest_v6.to_string(), "fd00:7467::15");
    assert_eq!(info.gateway_v6.to_string(), "fd00:7467::2");
    assert_eq!((info.guest_prefix_v4, info.guest_prefix_v6), (24, 64));
    assert_eq!(info.uplink_host_v4, Ipv4Addr::new(10, 200, 0, 13));
    assert_eq!(info.uplink_router_v4, Ipv4Addr::new(10, 200, 0, 14));
    assert_eq!(info.uplink_host_v6.to_string(), "fd00:7467:1:3::1");
    assert_eq!(info.uplink_router_v6.to_string(), "fd00:7467:1:3::2");
    assert_eq!((info.uplink_prefix_v4, info.uplink_prefix_v6), (30, 64));
    assert_eq!(info.listener_port, 15001);

    // Same guest addresses on every slot; uplinks differ.
    let other = info_for(&NetPlan::default(), "sbx-2", 4).expect("info");
    assert_eq!(other.guest_v4, info.guest_v4);
    assert_ne!(other.uplink_router_v4, info.uplink_router_v4);

    assert!(info_for(&NetPlan::default(), "../x", 0).is_err());
    assert!(info_for(&NetPlan::default(), "sbx-1", 16384).is_err());

    // Persisted as JSON and read back unchanged.
    let json = serde_json::to_string(&info).expect("encode");
    let back: NetworkInfo = serde_json::from_str(&json).expect("decode");
    assert_eq!(back, info);
}

#[test]
fn router_ruleset_is_fail_closed() {
    let info = info_for(&NetPlan::default(), "sbx-1", 0).expect("info");
    let r = router_ruleset(&info);
    // Atomic, idempotent replacement of the one table.
    assert!(
        r.starts_with("table inet tollgate\ndelete table inet tollgate\ntable inet tollgate {\n")
    );
    assert!(r.contains("type filter hook forward priority filter; policy drop;"));
    assert!(r.contains("iifname \"tgs0\" oifname \"up0\" meta mark & 0x2 == 0x2 accept"));
    assert!(r.contains("iifname \"up0\" oifname \"tgs0\" ct state established,related accept"));
    assert!(r.contains("iifname \"tgs0\" jump from_guest"));
    assert!(r.contains("meta mark & 0x1 == 0x1 accept"));
    assert!(r.contains("ip daddr 10.0.2.2 meta l4proto { tcp, udp } th dport 53 accept"));
    assert!(r.contains("ip6 daddr fd00:7467::2 meta l4proto { tcp, udp } th dport 53 accept"));
    // The CA endpoint on the gateway.
    assert!(r.contains("ip daddr 10.0.2.2 tcp dport 80 accept"));
    assert!(r.contains("ip6 daddr fd00:7467::2 tcp dport 80 accept"));
    assert!(r.contains("oifname \"up0\" masquerade"));
    // The guest chain ends in a drop.
    let guest = &r[r.find("chain from_guest").expect("chain")..];
    let guest = &guest[..guest.find("\n\t}").expect("end")];
    assert!(guest.trim_end().ends_with("drop"), "{guest}");
    // Exactly one forward accept for guest traffic, and it needs the mark.
    assert_eq!(r.matches("iifname \"tgs0\" oifname").count(), 1);
}

#[test]
fn host_ruleset_covers_both_pools() {
    let r = host_ruleset(&NetPlan::default());
    assert!(r.starts_with(
        "table inet tollgate_host\ndelete table inet tollgate_host\ntable inet tollgate_host {\n"
    ));
    assert!(r.contains("iifname \"tgh*\" oifname \"tgh*\" drop"));
    assert!(r.contains("iifname \"tgh*\" ip saddr 10.200.0.0/16 accept"));
    assert!(r.contains("iifname \"tgh*\" ip6 saddr fd00:7467:1::/48 accept"));
    assert!(r.contains("oifname \"tgh*\" ct state established,related accept"));
    assert!(r.contains("oifname != \"tgh*\" ip saddr 10.200.0.0/16 masquerade"));
    assert!(r.contains("oifname != \"tgh*\" ip6 saddr fd00:7467:1::/48 masquerade"));
}
