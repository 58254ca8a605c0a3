use ipnet::Ipv4Net;

use super::*;

fn pol(mode: &str, cidrs: &[&str]) -> NetworkPolicy {
    NetworkPolicy::from_json(
        &serde_json::json!({"mode": mode, "allow_cidrs": cidrs}),
        "p",
    )
    .expect("valid")
}

fn covers(nets: &[Ipv4Net], ip: &str) -> bool {
    let ip: std::net::Ipv4Addr = ip.parse().expect("ip");
    nets.iter().any(|n| n.contains(&ip))
}

#[test]
fn catch_all_does_not_open_private_ranges() {
    let e = egress_policy(&pol("allow-all", &["0.0.0.0/0", "::/0"]));
    assert_eq!(e.mode, Mode::AllowAll);
    assert!(covers(&e.allow_v4, "198.51.100.10"));
    for private in ["10.99.0.10", "172.16.5.5", "192.168.1.1", "100.64.0.1"] {
        assert!(
            !covers(&e.allow_v4, private),
            "{private} opened by 0.0.0.0/0"
        );
    }
    let v6_private: std::net::Ipv6Addr = "fd99::10".parse().expect("ip");
    assert!(!e.allow_v6.iter().any(|n| n.contains(&v6_private)));
    let v6_public: std::net::Ipv6Addr = "2001:db8:100::10".parse().expect("ip");
    assert!(e.allow_v6.iter().any(|n| n.contains(&v6_public)));
    assert!(
        e.allow_v4.len() < 64,
        "subtraction blew up: {}",
        e.allow_v4.len()
    );
}

#[test]
fn cidrs_inside_a_private_range_stay() {
    let e = egress_policy(&pol("custom", &["10.99.0.0/24", "0.0.0.0/0"]));
    assert!(covers(&e.allow_v4, "10.99.0.10"));
    assert!(!covers(&e.allow_v4, "10.98.0.1"));
    assert_eq!(egress_policy(&pol("deny-all", &[])).mode, Mode::DenyAll);
}

#[test]
fn subtract_is_exact() {
    let net: IpNet = "10.0.0.0/8".parse().expect("net");
    let hole: IpNet = "10.1.0.0/16".parse().expect("net");
    let parts = subtract(net, &[hole]);
    let total: u64 = parts.iter().map(|p| 1u64 << (32 - p.prefix_len())).sum();
    assert_eq!(total, (1 << 24) - (1 << 16));
    assert!(parts
        .iter()
        .all(|p| !p.contains(&hole) && !hole.contains(p)));
}

#[test]
fn the_ebpf_instance_is_stable_per_state_dir_and_a_valid_name() {
    let a = super::ebpf_instance(std::path::Path::new("/var/lib/tollgate"));
    assert_eq!(
        a,
        super::ebpf_instance(std::path::Path::new("/var/lib/tollgate"))
    );
    assert_ne!(
        a,
        super::ebpf_instance(std::path::Path::new("/var/lib/tollgate-b"))
    );
    assert_eq!(a.len(), 17);
    assert!(a.starts_with('d') && a[1..].bytes().all(|b| b.is_ascii_hexdigit()));
}
