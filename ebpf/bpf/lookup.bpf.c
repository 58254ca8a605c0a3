// SPDX-License-Identifier: Apache-2.0
/*
 * lookup.bpf.c — tollgate's sk_lookup program for a sandbox's router
 * namespace (netns link). It complements egress.bpf.c in the one case where
 * a TC-assigned socket is not enough: a SYN that reuses the 4-tuple of a
 * connection whose proxy side is in TIME_WAIT. egress.bpf.c assigns that SYN
 * to the TIME_WAIT sock; the kernel retires it and looks up a listener for
 * the original destination, and this program answers that lookup with the
 * proxy's listener.
 *
 * It acts only on TCP listener lookups for packets that arrived on the
 * sandbox's link from the guest's address and are not for the gateway (DNS
 * over TCP keeps its own listener); everything else is left to the kernel.
 *
 * One loaded copy serves every sandbox (a netns link per router namespace).
 * An sk_lookup program cannot learn its network namespace, so the sandbox's
 * slot comes from egress.bpf.c, which saw the same SYN first and recorded
 * its 4-tuple and slot in tg_tw_slot when it handed it to the TIME_WAIT
 * socket. The slot's link must then match the lookup (interface, guest
 * address), or nothing is assigned.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "tollgate.h"
#include "shared_maps.h"

char LICENSE[] SEC("license") = "Apache-2.0";

#define AF_INET_ 2
#define AF_INET6_ 10

static __always_inline int ip4_eq(__u32 a, const __u8 *b)
{
	return a == *(const __u32 *)b;
}

static __always_inline int ip6_eq(const __u32 *a, const __u8 *b)
{
	const __u32 *w = (const __u32 *)b;

	return a[0] == w[0] && a[1] == w[1] && a[2] == w[2] && a[3] == w[3];
}

/* The listener slot for this lookup, or -1 when it is not ours. */
static __always_inline int listener_slot(const struct bpf_sk_lookup *ctx, const struct tg_net *net)
{
	__u32 remote6[4], local6[4];

	if (ctx->protocol != IPPROTO_TCP || ctx->ingress_ifindex != net->ifindex)
		return -1;
	if (ctx->family == AF_INET_) {
		if (!ip4_eq(ctx->remote_ip4, net->guest_v4) || ip4_eq(ctx->local_ip4, net->gateway_v4))
			return -1;
		return TG_LISTENER_V4;
	}
	if (ctx->family == AF_INET6_ && (net->flags & TG_NET_HAS_V6)) {
		remote6[0] = ctx->remote_ip6[0];
		remote6[1] = ctx->remote_ip6[1];
		remote6[2] = ctx->remote_ip6[2];
		remote6[3] = ctx->remote_ip6[3];
		local6[0] = ctx->local_ip6[0];
		local6[1] = ctx->local_ip6[1];
		local6[2] = ctx->local_ip6[2];
		local6[3] = ctx->local_ip6[3];
		if (!ip6_eq(remote6, net->guest_v6) || ip6_eq(local6, net->gateway_v6))
			return -1;
		return TG_LISTENER_V6;
	}
	return -1;
}

SEC("sk_lookup")
int tg_lookup(struct bpf_sk_lookup *ctx)
{
	struct tg_tw_key key = {};
	const struct tg_net *net;
	struct bpf_sock *sk;
	__u32 *found;
	__u32 slot, index;
	int s;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->family == AF_INET_) {
		key.family = 4;
		__builtin_memcpy(key.saddr, &ctx->remote_ip4, 4);
		__builtin_memcpy(key.daddr, &ctx->local_ip4, 4);
	} else if (ctx->family == AF_INET6_) {
		__u32 a[4];

		key.family = 6;
		a[0] = ctx->remote_ip6[0];
		a[1] = ctx->remote_ip6[1];
		a[2] = ctx->remote_ip6[2];
		a[3] = ctx->remote_ip6[3];
		__builtin_memcpy(key.saddr, a, 16);
		a[0] = ctx->local_ip6[0];
		a[1] = ctx->local_ip6[1];
		a[2] = ctx->local_ip6[2];
		a[3] = ctx->local_ip6[3];
		__builtin_memcpy(key.daddr, a, 16);
	} else {
		return SK_PASS;
	}
	key.sport = bpf_ntohs(ctx->remote_port);
	key.dport = ctx->local_port;
	found = bpf_map_lookup_elem(&tg_tw_slot, &key);
	if (!found)
		return SK_PASS;
	slot = *found;
	bpf_map_delete_elem(&tg_tw_slot, &key);
	net = bpf_map_lookup_elem(&tg_net, &slot);
	if (!net || net->abi_version != TG_ABI_VERSION)
		return SK_PASS;
	s = listener_slot(ctx, net);
	if (s < 0)
		return SK_PASS;
	index = slot * TG_LISTENER_MAX + s;
	sk = bpf_map_lookup_elem(&tg_listeners, &index);
	if (!sk)
		return SK_PASS; /* no proxy: the kernel finds no listener either */
	bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return SK_PASS;
}
