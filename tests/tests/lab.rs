//! The closed test world itself: the canary records what reaches it and
//! answers, and nothing is routed anywhere but the upstream namespace.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use tollgate_tests::lab::{Lab, PRIVATE6, PUBLIC4};

#[test]
fn canary_records_and_answers_tcp_and_udp_from_the_host_namespace() {
    let lab = Lab::new();
    let (reply, echoed) = lab.in_host(|| {
        let mut c = TcpStream::connect_timeout(
            &SocketAddr::new(IpAddr::V4(PUBLIC4), 80),
            Duration::from_secs(3),
        )
        .expect("connect canary");
        c.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        c.write_all(b"hello").expect("write");
        let mut r = String::new();
        let _ = c.read_to_string(&mut r);
        let u = UdpSocket::bind("[::]:0").expect("udp");
        u.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        u.send_to(b"ping", SocketAddr::new(IpAddr::V6(PRIVATE6), 9999))
            .expect("send");
        let mut b = [0u8; 16];
        let n = u.recv(&mut b).unwrap_or(0);
        (r, b[..n].to_vec())
    });
    assert_eq!(reply, "canary\n");
    assert_eq!(echoed, b"ping");
    let c = lab.canary.contacts();
    assert!(c.contains(&(6, IpAddr::V4(PUBLIC4), 80)), "{c:?}");
    assert!(c.contains(&(17, IpAddr::V6(PRIVATE6), 9999)), "{c:?}");
    lab.canary.clear();
    assert!(lab.canary.seen().is_empty());
    // The host namespace has no way to the real network: only the upstream link.
    let routes = std::process::Command::new("ip")
        .args(["-n", &lab.host_ns, "route", "show", "default"])
        .output()
        .expect("ip route");
    assert_eq!(
        String::from_utf8_lossy(&routes.stdout).trim(),
        "default via 192.0.2.2 dev wan0"
    );
}
