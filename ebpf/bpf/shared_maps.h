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

#endif /* TOLLGATE_SHARED_MAPS_H */
