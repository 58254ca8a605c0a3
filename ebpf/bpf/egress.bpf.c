// SPDX-License-Identifier: Apache-2.0
/*
 * egress.bpf.c — tollgate's TC ingress program for the guest-facing interface
 * of a sandbox's router namespace (TCX attach). It sees every packet the
 * sandbox sends and decides, in this order:
 *
 *   1. L2: ARP (from the guest's address) passes; VLAN / QinQ / other
 *      ethertypes drop.
 *   2. L3: IPv4 fragments, options and spoofed sources drop; IPv6 on a sandbox
 *      without IPv6, extension headers and spoofed sources drop; NDP passes
 *      only link-locally (hop limit 255, link-scoped destination).
 *   3. L4: only TCP, UDP and ICMP(v6) echo.
 *   4. Gateway: only DNS (UDP/TCP 53), echo and TCP 80 (the host's CA
 *      endpoint); DNS is dropped in deny-all, TCP 80 passes in every mode.
 *   5. Floor (with the IPv4 embedded in mapped / compatible / NAT64 / 6to4 /
 *      Teredo IPv6 addresses): dropped in every mode.
 *   6. deny-all: dropped.  7. allow_cidrs: forwarded (mark FORWARD).
 *   8. TCP: assigned to the proxy's transparent listener (mark LOCAL), or
 *      dropped when no listener is registered (fail closed).
 *   9. UDP / echo: allow-all forwards public destinations except UDP 443
 *      (QUIC); custom drops.
 *
 * One loaded and verified copy of this program serves every sandbox under a
 * pin root. Each sandbox's cls_bpf filter carries its slot in the filter's
 * classid (TG_CLASSID), which cls_bpf hands to the program as
 * skb->tc_classid before it runs; every map the program reads is indexed by
 * that slot. A packet whose classid names no live slot (or a slot that is not
 * this link's, or an earlier owner of the slot) is dropped as
 * TG_DROP_NO_CONFIG and counted in tg_unclaimed.
 *
 * Every verdict counts in the slot's tg_counters; every drop also emits a
 * tg_event. Policy lives in two generations per slot (see tollgate.h and
 * src/maps.rs): a packet reads its slot's tg_active once and judges with that
 * generation only.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "tollgate.h"
#include "shared_maps.h"

char LICENSE[] SEC("license") = "Apache-2.0";

/* ---- maps (tg_net and tg_listeners: shared_maps.h) ------------------------ */

/* Never read by the program: the slots' owners (struct tg_owner). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TG_SLOTS);
	__type(key, __u32);
	__type(value, struct tg_owner);
} tg_owner SEC(".maps");

/* tg_active[slot]: the generation (0 or 1) that the slot's packets are
 * judged with. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TG_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} tg_active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TG_SLOTS * TG_GENERATIONS);
	__type(key, __u32);
	__type(value, struct tg_config);
} tg_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TG_FLOOR_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tg_lpm_v4);
	__type(value, __u32);
} tg_floor_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TG_FLOOR_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tg_lpm_v6);
	__type(value, __u32);
} tg_floor_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TG_ALLOW_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tg_lpm_v4);
	__type(value, __u32);
} tg_allow_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TG_ALLOW_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tg_lpm_v6);
	__type(value, __u32);
} tg_allow_v6 SEC(".maps");

/* Per slot, TG_COUNTERS counters (atomic adds: a slot's counters share no
 * cache line with another slot's but two CPUs of one sandbox do). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TG_SLOTS * TG_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} tg_counters SEC(".maps");

/* tg_unclaimed[0]: packets that no slot claimed (dropped). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} tg_unclaimed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, TG_EVENTS_BYTES);
} tg_events SEC(".maps");

/* Never read by the program. Userspace updates tg_sync[0] after flipping
 * tg_active: the kernel waits for an RCU grace period on every update of a
 * map-in-map, so when the update returns no packet is still being judged with
 * the old generation and its entries may be deleted. */
struct tg_sync_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} tg_sync_inner SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct tg_sync_inner);
} tg_sync SEC(".maps");

/* ---- packet summary ------------------------------------------------------ */

#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define IP_MF_ 0x2000
#define IP_OFFSET_ 0x1FFF

#define ICMP_ECHOREPLY_ 0
#define ICMP_ECHO_ 8
#define ICMPV6_ECHO_REQUEST_ 128
#define ICMPV6_ECHO_REPLY_ 129
#define NDISC_FIRST_ 133 /* router solicitation */
#define NDISC_LAST_ 137	 /* redirect */

#define DNS_PORT 53
#define QUIC_PORT 443

struct tg_pkt {
	__u64 cookie; /* the slot owner's router namespace */
	__u8 src[16]; /* 4-byte aligned: compared as __u32 words */
	__u8 dst[16];
	__u32 slot; /* TG_SLOTS until a slot claims the packet */
	__u16 ethertype;
	__u8 family; /* 4, 6, or 0 before L3 is known */
	__u8 proto;
	__u16 sport; /* host order; ICMP: code */
	__u16 dport; /* host order; ICMP: type */
	__u8 hop_limit;
};

/* ---- helpers ------------------------------------------------------------- */

static __always_inline int addr4_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int addr6_eq(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a;
	const __u32 *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int addr6_is_zero(const __u8 *a)
{
	const __u32 *x = (const __u32 *)a;

	return (x[0] | x[1] | x[2] | x[3]) == 0;
}

/* fe80::/10 */
static __always_inline int addr6_is_link_local(const __u8 *a)
{
	return a[0] == 0xfe && (a[1] & 0xc0) == 0x80;
}

/* ff02::/16: link-scoped multicast (never forwarded). */
static __always_inline int addr6_is_ll_multicast(const __u8 *a)
{
	return a[0] == 0xff && (a[1] & 0x0f) == 0x02;
}

/* Counter `what` of the packet's slot. */
static __always_inline void count(const struct tg_pkt *p, __u32 what)
{
	__u32 key = p->slot * TG_COUNTERS + what;
	__u64 *n;

	if (p->slot >= TG_SLOTS) {
		key = 0;
		n = bpf_map_lookup_elem(&tg_unclaimed, &key);
		if (n)
			*n += 1;
		return;
	}
	n = bpf_map_lookup_elem(&tg_counters, &key);
	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline void emit_event(const struct tg_pkt *p, __u32 reason)
{
	struct tg_event *e;

	if (p->slot >= TG_SLOTS)
		return;
	e = bpf_ringbuf_reserve(&tg_events, sizeof(*e), 0);
	if (!e) {
		count(p, TG_COUNTER_EVENTS_LOST);
		return;
	}
	e->netns_cookie = p->cookie;
	e->slot = p->slot;
	e->reason = reason;
	e->ethertype = p->ethertype;
	e->family = p->family;
	e->proto = p->proto;
	e->dport = p->dport;
	e->sport = p->sport;
	__builtin_memcpy(e->dst, p->dst, sizeof(e->dst));
	__builtin_memcpy(e->src, p->src, sizeof(e->src));
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void set_mark(struct __sk_buff *skb, __u32 bits)
{
	skb->mark = (skb->mark & ~TG_MARK_MASK) | bits;
}

/* Floor class of an IPv4 address under `tag` (slot and generation; 0 when
 * unlisted). */
static __always_inline __u32 floor_class_v4(const __u8 *addr, __u32 tag)
{
	struct tg_lpm_v4 key = {
		.prefixlen = TG_GEN_BITS + 32,
		.tag = tag,
	};
	__u32 *class;

	__builtin_memcpy(key.addr, addr, 4);
	class = bpf_map_lookup_elem(&tg_floor_v4, &key);
	return class ? *class : 0;
}

/* The stricter of two classes: FLOOR > PRIVATE > unlisted. */
static __always_inline __u32 stricter(__u32 a, __u32 b)
{
	if (a == TG_CLASS_FLOOR || b == TG_CLASS_FLOOR)
		return TG_CLASS_FLOOR;
	if (a == TG_CLASS_PRIVATE || b == TG_CLASS_PRIVATE)
		return TG_CLASS_PRIVATE;
	return 0;
}

/*
 * Floor class of an IPv6 address: its own entry in the v6 trie, made
 * stricter by the class of any IPv4 address it embeds:
 *   ::a.b.c.d (compatible, ::/96), ::ffff:a.b.c.d (mapped),
 *   ::ffff:0:a.b.c.d (SIIT), 64:ff9b::a.b.c.d (NAT64, and the last 32 bits of
 *   the local-use 64:ff9b:1::/48), 2002:aabb:ccdd:: (6to4, bits 16..48),
 *   2001:0::/32 Teredo (client = last 32 bits XOR 0xffffffff).
 */
static __always_inline __u32 floor_class_v6(const __u8 *a, __u32 tag)
{
	struct tg_lpm_v6 key = {
		.prefixlen = TG_GEN_BITS + 128,
		.tag = tag,
	};
	const __u32 *w = (const __u32 *)a;
	__u8 v4[4];
	__u32 *found;
	__u32 class;

	__builtin_memcpy(key.addr, a, 16);
	found = bpf_map_lookup_elem(&tg_floor_v6, &key);
	class = found ? *found : 0;

	if (w[0] == 0 && w[1] == 0 &&
	    (w[2] == 0 || w[2] == bpf_htonl(0x0000ffff) || w[2] == bpf_htonl(0xffff0000))) {
		class = stricter(class, floor_class_v4(a + 12, tag));
	} else if (w[0] == bpf_htonl(0x0064ff9b) &&
		   ((w[1] == 0 && w[2] == 0) || (w[1] & bpf_htonl(0xffff0000)) == bpf_htonl(0x00010000))) {
		class = stricter(class, floor_class_v4(a + 12, tag));
	} else if (a[0] == 0x20 && a[1] == 0x02) {
		class = stricter(class, floor_class_v4(a + 2, tag));
	} else if (w[0] == bpf_htonl(0x20010000)) {
		v4[0] = a[12] ^ 0xff;
		v4[1] = a[13] ^ 0xff;
		v4[2] = a[14] ^ 0xff;
		v4[3] = a[15] ^ 0xff;
		class = stricter(class, floor_class_v4(v4, tag));
	}
	return class;
}

static __always_inline int allowed_v4(const __u8 *addr, __u32 tag)
{
	struct tg_lpm_v4 key = {
		.prefixlen = TG_GEN_BITS + 32,
		.tag = tag,
	};

	__builtin_memcpy(key.addr, addr, 4);
	return bpf_map_lookup_elem(&tg_allow_v4, &key) != NULL;
}

static __always_inline int allowed_v6(const __u8 *addr, __u32 tag)
{
	struct tg_lpm_v6 key = {
		.prefixlen = TG_GEN_BITS + 128,
		.tag = tag,
	};

	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&tg_allow_v6, &key) != NULL;
}

/* Reads ports (TCP/UDP) or type/code (ICMP) at `off`. */
static __always_inline __u32 load_l4(struct __sk_buff *skb, struct tg_pkt *p, __u32 off,
				     __u8 icmp_proto)
{
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) {
		__u8 uh[4];

		if (bpf_skb_load_bytes(skb, off, uh, sizeof(uh)))
			return TG_DROP_MALFORMED;
		p->sport = ((__u16)uh[0] << 8) | uh[1];
		p->dport = ((__u16)uh[2] << 8) | uh[3];
	} else if (p->proto == icmp_proto) {
		__u8 ih[2];

		if (bpf_skb_load_bytes(skb, off, ih, sizeof(ih)))
			return TG_DROP_MALFORMED;
		p->dport = ih[0];
		p->sport = ih[1];
	} else {
		return TG_DROP_L4_PROTO;
	}
	return TG_PASS_LOCAL; /* "parsed"; not a verdict */
}

/*
 * Assigns a TCP packet to its socket in the router namespace: an existing
 * flow's socket (see below), else the proxy's listener from tg_listeners.
 * Every socket reference is released.
 */
static __always_inline __u32 steer_tcp(struct __sk_buff *skb, const struct tg_pkt *p)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 slot;
	long err;

	if (p->family == 4) {
		__builtin_memcpy(&t.ipv4.saddr, p->src, 4);
		__builtin_memcpy(&t.ipv4.daddr, p->dst, 4);
		t.ipv4.sport = bpf_htons(p->sport);
		t.ipv4.dport = bpf_htons(p->dport);
		sk = (struct bpf_sock *)bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4),
							    BPF_F_CURRENT_NETNS, 0);
		slot = p->slot * TG_LISTENER_MAX + TG_LISTENER_V4;
	} else {
		__builtin_memcpy(t.ipv6.saddr, p->src, 16);
		__builtin_memcpy(t.ipv6.daddr, p->dst, 16);
		t.ipv6.sport = bpf_htons(p->sport);
		t.ipv6.dport = bpf_htons(p->dport);
		sk = (struct bpf_sock *)bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv6),
							    BPF_F_CURRENT_NETNS, 0);
		slot = p->slot * TG_LISTENER_MAX + TG_LISTENER_V6;
	}

	/* A listener that happens to match the original destination is not
	 * ours to use. Any other socket of the 4-tuple takes the segment: an
	 * established or closing socket, a request sock (the handshake's last
	 * ACK) or a TIME_WAIT sock. A SYN that hits TIME_WAIT must go to the
	 * TIME_WAIT sock too: the kernel then retires it and asks for a
	 * listener, which lookup.bpf.c provides (assigning the listener here
	 * would fail: the request sock would duplicate the TIME_WAIT entry). */
	if (sk && sk->state == BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		sk = NULL;
	}
	if (sk && sk->state == BPF_TCP_TIME_WAIT) {
		/* lookup.bpf.c answers the listener lookup that follows (for a
		 * SYN): tell it whose packet this is. */
		struct tg_tw_key key = {
			.family = p->family,
			.sport = p->sport,
			.dport = p->dport,
		};

		__builtin_memcpy(key.saddr, p->src, 16);
		__builtin_memcpy(key.daddr, p->dst, 16);
		bpf_map_update_elem(&tg_tw_slot, &key, &p->slot, BPF_ANY);
	}
	if (!sk) {
		sk = bpf_map_lookup_elem(&tg_listeners, &slot);
		if (!sk)
			return TG_DROP_NO_LISTENER;
		if (sk->state != BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
			return TG_DROP_NO_LISTENER;
		}
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return TG_DROP_ASSIGN_FAILED;
	set_mark(skb, TG_MARK_LOCAL);
	return TG_STEERED;
}

/* Steps 3-9 for an IPv4 or IPv6 packet whose source was accepted. */
static __always_inline __u32 decide(struct __sk_buff *skb, const struct tg_pkt *p,
				    const struct tg_net *net, const struct tg_config *cfg,
				    __u32 tag)
{
	int v4 = p->family == 4;
	__u8 echo = v4 ? ICMP_ECHO_ : ICMPV6_ECHO_REQUEST_;
	__u8 echo_reply = v4 ? ICMP_ECHOREPLY_ : ICMPV6_ECHO_REPLY_;
	int icmp = p->proto == (v4 ? IPPROTO_ICMP : IPPROTO_ICMPV6);
	int to_gateway;
	__u32 class;

	if (icmp && p->dport != echo && p->dport != echo_reply)
		return TG_DROP_ICMP_TYPE;

	to_gateway = v4 ? addr4_eq(p->dst, net->gateway_v4) : addr6_eq(p->dst, net->gateway_v6);
	if (to_gateway) {
		if (icmp)
			return TG_PASS_LOCAL;
		/* The host's own service (the sandbox's CA certificate), not
		 * egress: every mode, deny-all included. */
		if (p->proto == IPPROTO_TCP && p->dport == TG_GATEWAY_HTTP_PORT)
			return TG_PASS_LOCAL;
		if (p->dport != DNS_PORT)
			return TG_DROP_GATEWAY_PORT;
		if (cfg->mode == TG_MODE_DENY_ALL)
			return TG_DROP_DENY_ALL;
		return TG_PASS_LOCAL;
	}
	if (icmp && p->dport != echo)
		return TG_DROP_ICMP_TYPE; /* echo replies only to the gateway */

	class = v4 ? floor_class_v4(p->dst, tag) : floor_class_v6(p->dst, tag);
	if (class == TG_CLASS_FLOOR)
		return TG_DROP_FLOOR;

	if (cfg->mode == TG_MODE_DENY_ALL)
		return TG_DROP_DENY_ALL;

	if (v4 ? allowed_v4(p->dst, tag) : allowed_v6(p->dst, tag)) {
		set_mark(skb, TG_MARK_FORWARD);
		return TG_PASS_CIDR;
	}

	if (p->proto == IPPROTO_TCP)
		return steer_tcp(skb, p);

	/* UDP or echo request */
	if (cfg->mode != TG_MODE_ALLOW_ALL)
		return TG_DROP_NOT_ALLOWED;
	if (p->proto == IPPROTO_UDP && p->dport == QUIC_PORT)
		return TG_DROP_QUIC;
	if (class == TG_CLASS_PRIVATE)
		return TG_DROP_PRIVATE;
	set_mark(skb, TG_MARK_FORWARD);
	return TG_PASS_PUBLIC;
}

static __always_inline __u32 judge_arp(struct __sk_buff *skb, const struct tg_net *net)
{
	/* Ethernet/IPv4 ARP: htype(2) ptype(2) hlen(1) plen(1) op(2) sha(6) spa(4) */
	__u8 arp[10];

	if (bpf_skb_load_bytes(skb, ETH_HLEN + 8 + 6, arp, 4))
		return TG_DROP_MALFORMED;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, arp + 4, 6))
		return TG_DROP_MALFORMED;
	/* arp[4..6] htype = 1, arp[6..8] ptype = IPv4, hlen 6, plen 4 */
	if (arp[4] != 0 || arp[5] != 1 || arp[6] != 0x08 || arp[7] != 0x00 || arp[8] != 6 ||
	    arp[9] != 4)
		return TG_DROP_MALFORMED;
	/* Sender protocol address: the guest's, or 0.0.0.0 for a probe. */
	if (!addr4_eq(arp, net->guest_v4) && (arp[0] | arp[1] | arp[2] | arp[3]) != 0)
		return TG_DROP_SPOOF;
	return TG_PASS_LOCAL;
}

static __always_inline __u32 judge_v4(struct __sk_buff *skb, struct tg_pkt *p,
				      const struct tg_net *net, const struct tg_config *cfg,
				      __u32 tag)
{
	struct iphdr ip;
	__u32 r;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
		return TG_DROP_MALFORMED;
	p->family = 4;
	p->proto = ip.protocol;
	__builtin_memcpy(p->src, &ip.saddr, 4);
	__builtin_memcpy(p->dst, &ip.daddr, 4);
	if (ip.version != 4 || ip.ihl < 5)
		return TG_DROP_MALFORMED;
	if (ip.frag_off & bpf_htons(IP_MF_ | IP_OFFSET_))
		return TG_DROP_FRAGMENT;
	if (ip.ihl != 5)
		return TG_DROP_IP_OPTIONS;
	/* Ports first so that a spoof event still names them. */
	r = load_l4(skb, p, ETH_HLEN + sizeof(ip), IPPROTO_ICMP);
	if (!addr4_eq(p->src, net->guest_v4))
		return TG_DROP_SPOOF;
	if (r != TG_PASS_LOCAL)
		return r;
	return decide(skb, p, net, cfg, tag);
}

static __always_inline int is_ext_header(__u8 nexthdr)
{
	switch (nexthdr) {
	case 0:	  /* hop-by-hop */
	case 43:  /* routing */
	case 50:  /* ESP */
	case 51:  /* AH */
	case 60:  /* destination options */
	case 135: /* mobility */
	case 139: /* HIP */
	case 140: /* shim6 */
	case 253: /* experimental */
	case 254:
		return 1;
	}
	return 0;
}

static __always_inline __u32 judge_v6(struct __sk_buff *skb, struct tg_pkt *p,
				      const struct tg_net *net, const struct tg_config *cfg,
				      __u32 tag)
{
	struct ipv6hdr ip6;
	__u32 r;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
		return TG_DROP_MALFORMED;
	p->family = 6;
	p->proto = ip6.nexthdr;
	p->hop_limit = ip6.hop_limit;
	__builtin_memcpy(p->src, &ip6.saddr, 16);
	__builtin_memcpy(p->dst, &ip6.daddr, 16);
	if (ip6.version != 6)
		return TG_DROP_MALFORMED;
	if (!(net->flags & TG_NET_HAS_V6))
		return TG_DROP_IPV6_DISABLED;
	if (ip6.nexthdr == 44)
		return TG_DROP_FRAGMENT;
	if (is_ext_header(ip6.nexthdr))
		return TG_DROP_EXT_HDR;
	r = load_l4(skb, p, ETH_HLEN + sizeof(ip6), IPPROTO_ICMPV6);
	if (r != TG_PASS_LOCAL)
		return r;

	if (p->proto == IPPROTO_ICMPV6 && p->dport >= NDISC_FIRST_ && p->dport <= NDISC_LAST_) {
		/* NDP: from the guest's address, its link-local address or ::
		 * (DAD), hop limit 255 and a destination that is never forwarded. */
		if (!addr6_eq(p->src, net->guest_v6) && !addr6_is_link_local(p->src) &&
		    !addr6_is_zero(p->src))
			return TG_DROP_SPOOF;
		if (p->hop_limit != 255)
			return TG_DROP_MALFORMED;
		if (addr6_is_link_local(p->dst) || addr6_is_ll_multicast(p->dst) ||
		    addr6_eq(p->dst, net->gateway_v6))
			return TG_PASS_LOCAL;
		return TG_DROP_MALFORMED;
	}
	if (!addr6_eq(p->src, net->guest_v6)) {
		/* A link-local source may only ping link-locally. */
		if (addr6_is_link_local(p->src) && p->proto == IPPROTO_ICMPV6 &&
		    p->dport == ICMPV6_ECHO_REQUEST_ &&
		    (addr6_is_link_local(p->dst) || addr6_is_ll_multicast(p->dst)))
			return TG_PASS_LOCAL;
		return TG_DROP_SPOOF;
	}
	return decide(skb, p, net, cfg, tag);
}

/* The sandbox's slot and link, from the classid of the filter that runs
 * the program, or NULL when it names no live slot of this link. */
static __always_inline const struct tg_net *claim(struct __sk_buff *skb, struct tg_pkt *p)
{
	__u32 classid = skb->tc_classid;
	const struct tg_net *net;
	__u32 s = TG_CLASSID_SLOT(classid);

	net = bpf_map_lookup_elem(&tg_net, &s);
	if (!net || net->abi_version != TG_ABI_VERSION || net->epoch != TG_CLASSID_EPOCH(classid) ||
	    net->ifindex != skb->ingress_ifindex)
		return NULL;
	p->slot = s;
	p->cookie = net->netns_cookie;
	return net;
}

static __always_inline __u32 judge(struct __sk_buff *skb, struct tg_pkt *p)
{
	const struct tg_net *net;
	const struct tg_config *cfg;
	__u32 *active;
	__u32 slot, gen, tag;
	__u8 eth[ETH_HLEN];

	net = claim(skb, p);
	if (!net)
		return TG_DROP_NO_CONFIG;
	slot = p->slot;

	if (bpf_skb_load_bytes(skb, 0, eth, sizeof(eth)))
		return TG_DROP_MALFORMED;
	p->ethertype = ((__u16)eth[12] << 8) | eth[13];

	/* A tag in the frame, or one the stack already moved out of band (it
	 * untags before TC ingress): report the tag's protocol. */
	if (skb->vlan_present) {
		p->ethertype = bpf_ntohs((__u16)skb->vlan_proto);
		return TG_DROP_L2;
	}
	if (p->ethertype == ETH_P_8021Q_ || p->ethertype == ETH_P_8021AD_)
		return TG_DROP_L2;
	if (skb->protocol != bpf_htons(p->ethertype))
		return TG_DROP_L2;

	active = bpf_map_lookup_elem(&tg_active, &slot);
	if (!active)
		return TG_DROP_NO_CONFIG;
	/* Read the generation once; every lookup below uses this value. */
	gen = *active & 1;
	tag = slot * TG_GENERATIONS + gen;
	cfg = bpf_map_lookup_elem(&tg_config, &tag);
	if (!cfg || cfg->mode == TG_MODE_UNSET || cfg->mode > TG_MODE_CUSTOM)
		return TG_DROP_NO_CONFIG;

	switch (p->ethertype) {
	case ETH_P_ARP:
		return judge_arp(skb, net);
	case ETH_P_IP:
		return judge_v4(skb, p, net, cfg, tag);
	case ETH_P_IPV6:
		return judge_v6(skb, p, net, cfg, tag);
	}
	return TG_DROP_L2;
}

SEC("classifier")
int tg_egress(struct __sk_buff *skb)
{
	struct tg_pkt p = { .slot = TG_SLOTS };
	__u32 reason;

	/* Marks are tollgate's to set: never trust bits the sandbox's side set. */
	set_mark(skb, 0);
	reason = judge(skb, &p);
	if (reason >= TG_REASON_MAX)
		reason = TG_DROP_MALFORMED;
	count(&p, reason);
	if (reason < TG_FIRST_DROP)
		return TC_ACT_OK;
	set_mark(skb, 0);
	emit_event(&p, reason);
	return TC_ACT_SHOT;
}
