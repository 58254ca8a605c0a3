// SPDX-License-Identifier: Apache-2.0
/*
 * splice.bpf.c — the kernel tunnel. Once the proxy has allowed a tunnelled
 * connection and dialled its upstream, it puts both sockets into
 * tg_splice_socks (keyed by socket cookie) and records each one's peer in
 * tg_splice_ends. This stream-verdict program, attached to the sockhash,
 * runs for every chunk of data either socket receives and redirects it to
 * the egress of the peer socket: the bytes never reach user space.
 *
 * The proxy keeps both sockets (and their descriptors): it watches them for
 * end-of-stream and errors, half-closes, enforces the idle timeout and the
 * live policy, and removes them from the map before it closes or resets
 * them. A socket that is closed leaves the sockhash by itself.
 *
 * Each end counts the bytes it redirected (tg_splice_end.bytes), which the
 * proxy reads for its stats, its idle timeout and its half-close: once a
 * socket has read end-of-stream, the proxy waits until the program has
 * handed over every byte it received (tcpi_bytes_received) and the peer
 * socket holds them (tcpi_bytes_acked + SIOCOUTQ), then passes the FIN on
 * with shutdown(SHUT_WR).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Apache-2.0";

/* Keep in sync with src/splice.rs. */
#define TG_SPLICE_MAX 65536

struct tg_splice_end {
	__u64 peer;    /* the peer socket's cookie (its key in tg_splice_socks) */
	__u64 bytes;   /* bytes this socket received and redirected to the peer */
	__u64 chunks;  /* chunks redirected (one verdict each) */
	__u64 passed;  /* bytes left to user space (see below) */
	__u32 passing; /* set once: every later chunk is left to user space */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, TG_SPLICE_MAX);
	__type(key, __u64);
	__type(value, __u32);
} tg_splice_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TG_SPLICE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct tg_splice_end);
} tg_splice_ends SEC(".maps");

SEC("sk_skb/stream_verdict")
int tg_splice_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct tg_splice_end *end = bpf_map_lookup_elem(&tg_splice_ends, &cookie);

	/* A socket in the sockhash without an end is being set up or taken
	 * down: its data stays with the socket, where the proxy sees it. */
	if (!end)
		return SK_PASS;
	/* An empty chunk carries only the FIN, which TCP has already taken
	 * note of (the proxy sees it as EPOLLRDHUP and passes it on itself).
	 * Redirected, the peer's send of zero bytes would count as a broken
	 * pipe on the peer socket. */
	if (skb->len == 0)
		return SK_DROP;
	if (!end->passing) {
		/* The peer is not (yet, or any more) in the sockhash: a chunk
		 * that arrives while the proxy is between its two inserts, or
		 * after the peer closed. It is left to user space, and so is
		 * every later chunk of this socket, so that the bytes reach
		 * the peer in order (the proxy copies them). */
		struct bpf_sock *peer = bpf_map_lookup_elem(&tg_splice_socks, &end->peer);

		if (peer) {
			bpf_sk_release(peer);
		} else {
			end->passing = 1;
		}
	}
	if (end->passing) {
		__sync_fetch_and_add(&end->passed, skb->len);
		return SK_PASS;
	}
	__sync_fetch_and_add(&end->bytes, skb->len);
	__sync_fetch_and_add(&end->chunks, 1);
	return bpf_sk_redirect_hash(skb, &tg_splice_socks, &end->peer, 0);
}
