/* SPDX-License-Identifier: Apache-2.0 */
/*
 * shared_maps.h — the maps that more than one program uses. Each object
 * declares them identically; the loader creates them with the egress object
 * (once per pin root, for every sandbox) and hands the pinned instances to
 * each sandbox's sk_lookup program.
 */
#ifndef TOLLGATE_SHARED_MAPS_H
#define TOLLGATE_SHARED_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "tollgate.h"

/* tg_net[slot]: each sandbox's link. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TG_SLOTS);
	__type(key, __u32);
	__type(value, struct tg_net);
} tg_net SEC(".maps");

/* Each sandbox's proxy listeners: slot * TG_LISTENER_MAX + TG_LISTENER_V4 /
 * TG_LISTENER_V6. A closed listener leaves the map by itself, so a dead
 * proxy means an empty entry. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, TG_SLOTS * TG_LISTENER_MAX);
	__type(key, __u32);
	__type(value, __u32);
} tg_listeners SEC(".maps");

/* A SYN that egress.bpf.c handed to a TIME_WAIT socket: its 4-tuple -> the
 * sandbox's slot, for lookup.bpf.c, which runs for that SYN in the same
 * router namespace but cannot tell which sandbox's it is. Entries are
 * deleted when used; the LRU evicts any other. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TG_TW_MAX);
	__type(key, struct tg_tw_key);
	__type(value, __u32);
} tg_tw_slot SEC(".maps");

#endif /* TOLLGATE_SHARED_MAPS_H */
