use super::*;

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

#[test]
fn platform_floor_compiles_with_classes() {
    let c = FloorSet::platform().compile().expect("compiles");
    let class_of = |s: &str| match net(s) {
        IpNet::V4(n) => c.v4.iter().find(|e| e.0 == n).map(|e| e.1),
        IpNet::V6(n) => c.v6.iter().find(|e| e.0 == n).map(|e| e.1),
    };
    assert_eq!(class_of("169.254.0.0/16"), Some(abi::CLASS_FLOOR));
    assert_eq!(class_of("10.0.0.0/8"), Some(abi::CLASS_PRIVATE));
    assert_eq!(class_of("fd00:ec2::254/128"), Some(abi::CLASS_FLOOR));
    assert_eq!(class_of("fc00::/7"), Some(abi::CLASS_PRIVATE));
}

#[test]
fn floor_wins_over_private() {
    let set = FloorSet {
        floor: vec![net("10.0.0.0/8"), net("172.0.0.0/8"), net("10.0.2.0/24")],
        private: vec![
            net("10.0.0.0/8"),
            net("172.16.0.0/12"),
            net("192.168.0.0/16"),
        ],
    };
    let c = set.compile().expect("compiles");
    // equal prefix: floor; private inside floor: dropped; floor inside floor kept.
    assert_eq!(
        c.v4,
        vec![
            ("10.0.0.0/8".parse().expect("p"), abi::CLASS_FLOOR),
            ("10.0.2.0/24".parse().expect("p"), abi::CLASS_FLOOR),
            ("172.0.0.0/8".parse().expect("p"), abi::CLASS_FLOOR),
            ("192.168.0.0/16".parse().expect("p"), abi::CLASS_PRIVATE),
        ]
    );
    let back = c.to_set();
    assert_eq!(back.private, vec![net("192.168.0.0/16")]);
}

#[test]
fn host_bits_are_cleared_and_duplicates_merged() {
    let p = EgressPolicy::new(Mode::Custom)
        .with_allow([
            net("198.51.100.10/24"),
            net("198.51.100.0/24"),
            net("2001:db8::1/32"),
        ])
        .normalized()
        .expect("fits");
    assert_eq!(
        p.allow_v4,
        vec!["198.51.100.0/24".parse::<Ipv4Net>().expect("p")]
    );
    assert_eq!(
        p.allow_v6,
        vec!["2001:db8::/32".parse::<Ipv6Net>().expect("p")]
    );
}

#[test]
fn capacity_is_enforced() {
    let many: Vec<IpNet> = (0..=abi::ALLOW_MAX as u32)
        .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(i << 8), 24).expect("p")))
        .collect();
    let err = EgressPolicy::allow_all().with_allow(many).normalized();
    assert!(matches!(
        err,
        Err(EbpfError::TooManyEntries {
            what: "allow_v4",
            ..
        })
    ));
}

#[test]
fn sandbox_net_needs_both_v6_addresses() {
    let mut n = SandboxNet::v4(
        "10.0.2.15".parse().expect("ip"),
        "10.0.2.2".parse().expect("ip"),
    );
    assert!(n.to_abi().is_ok());
    n.guest_v6 = Some("fd00:7467::15".parse().expect("ip"));
    assert!(matches!(n.to_abi(), Err(EbpfError::InvalidNet(_))));
    n.gateway_v6 = Some("fd00:7467::2".parse().expect("ip"));
    let abi = n.to_abi().expect("valid");
    assert_eq!(abi.flags, abi::NET_HAS_V6);
    assert_eq!(SandboxNet::from_abi(&abi), n);
}
