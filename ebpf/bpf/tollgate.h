/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tollgate.h — the whole C/Rust ABI of tollgate's eBPF layer: constants, map
 * keys and values. `ebpf/src/abi.rs` mirrors every item here and asserts the
 * sizes; change both in the same commit and bump TG_ABI_VERSION when a layout
 * or a meaning changes (pinned maps of an older ABI are then refused).
 */
#ifndef TOLLGATE_H
#define TOLLGATE_H

#include <linux/types.h>

/* Stored in tg_net.abi_version; `Filter::open_pinned` refuses a mismatch. */
#define TG_ABI_VERSION 2

/* ---- policy ---------------------------------------------------------- */

/* tg_config.mode. UNSET (an all-zero map value) fails closed. */
enum tg_mode {
	TG_MODE_UNSET = 0,
	TG_MODE_ALLOW_ALL = 1,
	TG_MODE_DENY_ALL = 2,
	TG_MODE_CUSTOM = 3,
};

/* Value of the floor tries: FLOOR is denied in every mode, PRIVATE only
 * matters in allow-all (reachable for UDP/ICMP only through allow_cidrs). */
enum tg_class {
	TG_CLASS_FLOOR = 1,
	TG_CLASS_PRIVATE = 2,
};

/* Value of the allow tries (any non-zero value means "listed"). */
#define TG_ALLOW 1

/* tg_net.flags */
#define TG_NET_HAS_V6 (1u << 0)

/* skb->mark bits owned by tollgate. LOCAL: the router's
 * `fwmark 0x1/0x1 lookup 100` rule delivers the (sk_assigned) packet locally.
 * FORWARD: the router's nftables forward chain accepts only packets with it. */
#define TG_MARK_LOCAL 0x1u
#define TG_MARK_FORWARD 0x2u
#define TG_MARK_MASK (TG_MARK_LOCAL | TG_MARK_FORWARD)

/* TCP port of the host's own service on the gateway address (the daemon
 * serves the sandbox's CA certificate there): delivered locally in every
 * mode, deny-all included, because it is not egress. */
#define TG_GATEWAY_HTTP_PORT 80

/* A sandbox's listeners in tg_listeners: slot * TG_LISTENER_MAX + one of
 * these (the proxy's transparent listeners). */
#define TG_LISTENER_V4 0
#define TG_LISTENER_V6 1
#define TG_LISTENER_MAX 2

/* ---- slots ------------------------------------------------------------- */

/* One TC program and one set of maps serve every sandbox under a pin root.
 * A sandbox owns a slot: every per-sandbox map is indexed by it (arrays) or
 * carries it in its key (the LPM tries' tag, see tg_lpm_v4). The sandbox's
 * cls_bpf filter names it in its classid, which cls_bpf hands to the program
 * in skb->tc_classid (16 bits): the low 12 bits are the slot, the high 4 the
 * slot's epoch (tg_net.epoch, 1..15, advanced at every claim), so a filter
 * left behind by an earlier owner of the slot judges nothing. */
#define TG_SLOTS 4096
#define TG_CLASSID(epoch, slot) ((((__u32)(epoch)) << 12) | (slot))
#define TG_CLASSID_SLOT(classid) ((classid) & 0xfffu)
#define TG_CLASSID_EPOCH(classid) (((classid) >> 12) & 0xfu)
#define TG_EPOCH_MAX 15

/* Capacities. Two generations share each trie (see tg_lpm_v4). The
 * per-sandbox limits are enforced by the loader; the tries' capacities
 * bound the sum over every slot. */
#define TG_GENERATIONS 2
#define TG_FLOOR_MAX 1024 /* floor + private prefixes per family and generation */
#define TG_ALLOW_MAX 256  /* allow_cidrs prefixes per family and generation */
#define TG_FLOOR_ENTRIES (1u << 20) /* all slots, both generations, per family */
#define TG_ALLOW_ENTRIES (1u << 20)
#define TG_EVENTS_BYTES (1024 * 1024) /* ~18,000 events shared by every slot */

/* ---- verdicts --------------------------------------------------------- */

/* Why a packet passed or was dropped: the index of tg_counters and
 * tg_event.reason. Passes come first; every value >= TG_FIRST_DROP drops. */
enum tg_reason {
	TG_PASS_LOCAL = 0,	 /* ARP, NDP, DNS / echo / TCP 80 to the gateway */
	TG_PASS_CIDR = 1,	 /* destination in allow_cidrs (mark FORWARD) */
	TG_PASS_PUBLIC = 2,	 /* allow-all UDP / echo to a public address (mark FORWARD) */
	TG_STEERED = 3,		 /* TCP assigned to the proxy's listener (mark LOCAL) */
	TG_DROP_L2 = 4,		 /* VLAN / QinQ / non-IP ethertype */
	TG_DROP_MALFORMED = 5,	 /* truncated or inconsistent headers */
	TG_DROP_FRAGMENT = 6,	 /* IPv4 fragment or IPv6 fragment header */
	TG_DROP_IP_OPTIONS = 7,	 /* IPv4 header with options */
	TG_DROP_EXT_HDR = 8,	 /* IPv6 extension header (hop-by-hop, routing, ...) */
	TG_DROP_IPV6_DISABLED = 9, /* IPv6 on a sandbox without IPv6 */
	TG_DROP_SPOOF = 10,	 /* source is not the sandbox's address */
	TG_DROP_L4_PROTO = 11,	 /* not TCP / UDP / ICMP(v6) */
	TG_DROP_ICMP_TYPE = 12,	 /* ICMP other than echo (and NDP) */
	TG_DROP_GATEWAY_PORT = 13, /* to the gateway, not DNS, echo or TCP 80 */
	TG_DROP_FLOOR = 14,	 /* destination in the floor */
	TG_DROP_DENY_ALL = 15,	 /* deny-all mode */
	TG_DROP_PRIVATE = 16,	 /* allow-all UDP / echo to a private range */
	TG_DROP_QUIC = 17,	 /* allow-all UDP to port 443 */
	TG_DROP_NOT_ALLOWED = 18, /* custom mode UDP / echo outside allow_cidrs */
	TG_DROP_NO_LISTENER = 19, /* TCP to steer but no proxy listener (fail closed) */
	TG_DROP_ASSIGN_FAILED = 20, /* bpf_sk_assign refused the listener */
	TG_DROP_NO_CONFIG = 21,	 /* maps not filled / ABI mismatch (fail closed) */
	TG_REASON_MAX = 22,
};
#define TG_FIRST_DROP TG_DROP_L2

/* tg_counters has, per sandbox slot, one counter per reason plus this one:
 * counter `c` of slot `s` is element s * TG_COUNTERS + c. */
#define TG_COUNTER_EVENTS_LOST TG_REASON_MAX
#define TG_COUNTERS (TG_REASON_MAX + 1)

/* ---- map keys and values ---------------------------------------------- */

/* tg_net[slot]: the sandbox's link, written once at attach. Addresses are
 * in network byte order; ifindex is the guest-facing interface's index in the
 * router namespace, netns_cookie that namespace's cookie (SO_NETNS_COOKIE,
 * copied into events). A packet is judged by a slot only when the filter's
 * classid names the slot's epoch and it arrived on `ifindex`. abi_version 0:
 * the slot is free (epoch is kept for the next owner). */
struct tg_net {
	__u32 abi_version;
	__u32 flags;
	__u8 guest_v4[4];
	__u8 gateway_v4[4];
	__u8 guest_v6[16];
	__u8 gateway_v6[16];
	__u32 ifindex;
	__u32 epoch;
	__u64 netns_cookie;
}; /* 64 bytes */

/* Key of tg_tw_slot: a TCP 4-tuple as the guest sent it (ports in host
 * order; IPv4 addresses in the first 4 bytes). */
struct tg_tw_key {
	__u8 family; /* 4 or 6 */
	__u8 pad[3]; /* 0 */
	__u16 sport;
	__u16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
}; /* 40 bytes */

#define TG_TW_MAX 16384

/* tg_owner[slot]: who holds a slot. Claimed with BPF_NOEXIST (the claim is
 * atomic across processes) before anything of the slot is written; deleted
 * last, once every key of the slot is gone. */
struct tg_owner {
	__u64 netns_cookie;
	__u32 pid; /* the process that claimed it */
	__u32 reserved; /* 0 */
}; /* 16 bytes */

/* tg_config[slot * TG_GENERATIONS + generation] */
struct tg_config {
	__u32 mode;
	__u32 flags; /* reserved, 0 */
}; /* 8 bytes */

/* Keys of the shared LPM tries. The tag names the slot and the generation
 * (tag = slot * TG_GENERATIONS + generation) and is part of the matched data:
 * `prefixlen` counts its 32 bits plus the address prefix, so a lookup with
 * tag T only ever matches entries written for that slot and generation. */
struct tg_lpm_v4 {
	__u32 prefixlen;
	__u32 tag;
	__u8 addr[4];
}; /* 12 bytes */

struct tg_lpm_v6 {
	__u32 prefixlen;
	__u32 tag;
	__u8 addr[16];
}; /* 24 bytes */

#define TG_GEN_BITS 32 /* the tag's bits at the front of every LPM key */

/* One ring-buffer record per dropped packet, in the ring every slot shares.
 * slot and netns_cookie name the sandbox (a record of a slot's previous
 * owner has another cookie). Ports are in host byte order; for ICMP /
 * ICMPv6, dport holds the type and sport the code. family is 4, 6, or 0 for
 * an L2 drop (then only ethertype is set). A packet that no slot claims is
 * counted, not reported. */
struct tg_event {
	__u64 netns_cookie;
	__u32 slot;
	__u32 reason;
	__u16 ethertype;
	__u8 family;
	__u8 proto;
	__u16 dport;
	__u16 sport;
	__u8 dst[16]; /* IPv4 in the first 4 bytes */
	__u8 src[16];
}; /* 56 bytes */

#endif /* TOLLGATE_H */
