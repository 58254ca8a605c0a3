//! The one rtnetlink request aya's TC API cannot make: a direct-action
//! `cls_bpf` filter with a classid (`TCA_BPF_CLASSID`), which is how the
//! shared program learns which sandbox's filter runs it (`skb->tc_classid`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

const RTM_NEWTFILTER: u16 = 44;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_CLASSID: u16 = 3;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`.
const PARENT_INGRESS: u32 = 0xFFFF_FFF2;
/// `ETH_P_ALL`.
const ETH_P_ALL: u16 = 0x0003;

/// A `cls_bpf` filter to add.
pub(crate) struct BpfFilter<'a> {
    pub(crate) ifindex: u32,
    pub(crate) prog: BorrowedFd<'a>,
    pub(crate) name: &'a str,
    pub(crate) priority: u16,
    pub(crate) handle: u32,
    pub(crate) classid: u32,
}

/// Appends one attribute (header, payload, padding to 4 bytes).
fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The request's bytes.
fn request(f: &BpfFilter<'_>, seq: u32) -> Vec<u8> {
    let mut opts = Vec::new();
    attr(&mut opts, TCA_BPF_CLASSID, &f.classid.to_ne_bytes());
    attr(
        &mut opts,
        TCA_BPF_FD,
        &(f.prog.as_raw_fd() as u32).to_ne_bytes(),
    );
    let mut name = f.name.as_bytes().to_vec();
    name.push(0);
    attr(&mut opts, TCA_BPF_NAME, &name);
    attr(
        &mut opts,
        TCA_BPF_FLAGS,
        &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes(),
    );

    let mut body = Vec::new();
    // struct tcmsg: family, pad, pad, ifindex, handle, parent, info.
    body.extend_from_slice(&[0u8; 4]);
    body.extend_from_slice(&(f.ifindex as i32).to_ne_bytes());
    body.extend_from_slice(&f.handle.to_ne_bytes());
    body.extend_from_slice(&PARENT_INGRESS.to_ne_bytes());
    let info = (u32::from(f.priority) << 16) | u32::from(ETH_P_ALL.to_be());
    body.extend_from_slice(&info.to_ne_bytes());
    attr(&mut body, TCA_KIND, b"bpf\0");
    attr(&mut body, TCA_OPTIONS, &opts);

    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&RTM_NEWTFILTER.to_ne_bytes());
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// Adds the filter at ingress (the `clsact` qdisc must exist) in the
/// calling thread's network namespace and waits for the kernel's answer.
pub(crate) fn add_bpf_filter(f: &BpfFilter<'_>) -> io::Result<()> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    let seq = 1;
    let msg = request(f, seq);
    let sent = send(sock.as_raw_fd(), &msg, MsgFlags::empty())?;
    if sent != msg.len() {
        return Err(io::Error::other("short netlink send"));
    }
    let mut buf = vec![0u8; 8192];
    loop {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
            let got_seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().expect("4 bytes"));
            if len < 16 || off + len > n {
                return Err(io::Error::other("malformed netlink answer"));
            }
            if kind == NLMSG_ERROR && got_seq == seq {
                if len < 20 {
                    return Err(io::Error::other("short netlink error message"));
                }
                let code = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().expect("4 bytes"));
                return if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
            off += len.next_multiple_of(4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"))
    }

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_ne_bytes(b[o..o + 2].try_into().expect("2 bytes"))
    }

    #[test]
    fn the_request_carries_the_classid_and_direct_action() {
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let f = BpfFilter {
            ifindex: 7,
            prog: null.as_fd(),
            name: "tg_egress",
            priority: 1,
            handle: 0x7467,
            classid: 0x0003_0005,
        };
        let m = request(&f, 9);
        assert_eq!(m.len() % 4, 0);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWTFILTER);
        // tcmsg
        assert_eq!((u32_at(&m, 20) as i32), 7);
        assert_eq!(u32_at(&m, 24), 0x7467);
        assert_eq!(u32_at(&m, 28), PARENT_INGRESS);
        assert_eq!(u32_at(&m, 32) >> 16, 1);
        // TCA_KIND "bpf", then TCA_OPTIONS whose first attribute is the classid.
        assert_eq!(&m[40..44], b"bpf\0");
        assert_eq!(u16_at(&m, 46), TCA_OPTIONS);
        assert_eq!(u16_at(&m, 50), TCA_BPF_CLASSID);
        assert_eq!(u32_at(&m, 52), 0x0003_0005);
        let flags = &m[m.len() - 4..];
        assert_eq!(u32_at(flags, 0), TCA_BPF_FLAG_ACT_DIRECT);
    }
}
