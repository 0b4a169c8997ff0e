/* Layouts shared by the eBPF programs and the agent: map keys and values, ring buffer events.
 *
 * Userspace decodes these from bytes (src/wire.rs) at the offsets asserted here; a unit test
 * parses the LAYOUT/SIZE lines of this file and compares them with the Rust constants, so the
 * two sides cannot drift apart silently.
 */
#ifndef PROBES_SHARED_H
#define PROBES_SHARED_H

#include <linux/types.h>

#define LAYOUT(st, field, off, size)                                                          \
	_Static_assert(__builtin_offsetof(struct st, field) == (off), #st "." #field " offset");  \
	_Static_assert(sizeof(((struct st *)0)->field) == (size), #st "." #field " size");
#define SIZE(st, size) _Static_assert(sizeof(struct st) == (size), #st " size");

/* Components the agent knows; index 0 is "unknown" (no lab state, or not a lab task). */
#define MAX_COMPONENTS 64
/* log2 histogram slots over nanoseconds: slot k counts values in [2^k, 2^(k+1)) ns; the last
 * slot also takes everything larger (2^39 ns is about 9 minutes). */
#define HIST_SLOTS 40

/* Indices into the per-CPU `counters` array. */
#define CTR_RINGBUF_FULL 0
#define CTR_MAP_FULL 1
#define CTR_SLOTS 4

/* `settings` array, index 0. */
struct settings {
	__u32 track_all; /* 1: run-queue probes track every task (as component 0) */
	__u32 generation; /* bumped by the agent whenever `tracked` or track_all changed */
};
SIZE(settings, 8)
LAYOUT(settings, track_all, 0, 4)
LAYOUT(settings, generation, 4, 4)

/* `retrans` key: one TCP flow (local side in saddr/sport) in one TCP state. */
struct flow_key {
	__u8 saddr[16]; /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 state;
	__u8 pad;
};
SIZE(flow_key, 40)
LAYOUT(flow_key, saddr, 0, 16)
LAYOUT(flow_key, daddr, 16, 16)
LAYOUT(flow_key, sport, 32, 2)
LAYOUT(flow_key, dport, 34, 2)
LAYOUT(flow_key, family, 36, 2)
LAYOUT(flow_key, state, 38, 1)

struct retrans_val {
	__u64 count;
	__u64 last_ns;
	__u32 tgid; /* owner learned when the socket connected, 0 if unknown */
	__u32 pad;
};
SIZE(retrans_val, 24)
LAYOUT(retrans_val, count, 0, 8)
LAYOUT(retrans_val, last_ns, 8, 8)
LAYOUT(retrans_val, tgid, 16, 4)

/* `runq` per-CPU array, indexed by component. */
struct runq_val {
	__u64 slots[HIST_SLOTS];
	__u64 sum_ns;
	__u64 count;
	__u64 voluntary;   /* classic programs: switches away while blocked */
	__u64 involuntary; /* switches away while still runnable (preempted, throttled) */
	__u64 switch_ins;  /* tp_btf program: switches to the component's tasks (voluntary =
			    * switch_ins - involuntary: each switch-in ends one switch-away) */
};
SIZE(runq_val, 360)
LAYOUT(runq_val, slots, 0, 320)
LAYOUT(runq_val, sum_ns, 320, 8)
LAYOUT(runq_val, count, 328, 8)
LAYOUT(runq_val, voluntary, 336, 8)
LAYOUT(runq_val, involuntary, 344, 8)
LAYOUT(runq_val, switch_ins, 352, 8)

/* Block I/O operations. */
#define OP_READ 0
#define OP_WRITE 1
#define OP_FLUSH 2
#define OP_DISCARD 3
#define OP_OTHER 4

struct blk_key {
	__u32 dev; /* kernel dev_t: major << 20 | minor */
	__u32 op;
};
SIZE(blk_key, 8)
LAYOUT(blk_key, dev, 0, 4)
LAYOUT(blk_key, op, 4, 4)

struct blk_val {
	__u64 slots[HIST_SLOTS];
	__u64 sum_ns;
	__u64 count;
	__u64 bytes;
	__u64 errors;
};
SIZE(blk_val, 352)
LAYOUT(blk_val, slots, 0, 320)
LAYOUT(blk_val, sum_ns, 320, 8)
LAYOUT(blk_val, count, 328, 8)
LAYOUT(blk_val, bytes, 336, 8)
LAYOUT(blk_val, errors, 344, 8)

/* Ring buffer events. */
#define EV_CONNECT 1        /* CLOSE -> SYN_SENT, in the connecting task */
#define EV_ESTABLISHED 2    /* SYN_SENT -> ESTABLISHED; duration = time to establish */
#define EV_CONNECT_FAILED 3 /* SYN_SENT -> CLOSE; duration = time spent trying */
#define EV_CLOSED 4         /* an established connection reached CLOSE; duration = lifetime */
#define EV_RESET_RX 5       /* the peer reset the connection */
#define EV_RESET_TX 6       /* this host sent a reset */
#define EV_OOM 7            /* oom:mark_victim */

struct event {
	__u64 ts_ns; /* CLOCK_MONOTONIC */
	__u64 duration_ns;
	__u32 kind;
	__u32 tgid;
	__u32 pid;
	__u32 comp; /* kernel-side component (tracked task), 0 if unknown */
	char comm[16];
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 oldstate;
	__u8 newstate;
	__u64 total_vm; /* kB, as oom:mark_victim reports them */
	__u64 anon_rss;
	__u64 file_rss;
	__u64 shmem_rss;
	__u64 pgtables;
	__u32 uid;
	__s32 oom_score_adj;
	__u32 reason; /* tcp_send_reset: enum sk_rst_reason */
	__u32 pad;
};
SIZE(event, 144)
LAYOUT(event, ts_ns, 0, 8)
LAYOUT(event, duration_ns, 8, 8)
LAYOUT(event, kind, 16, 4)
LAYOUT(event, tgid, 20, 4)
LAYOUT(event, pid, 24, 4)
LAYOUT(event, comp, 28, 4)
LAYOUT(event, comm, 32, 16)
LAYOUT(event, saddr, 48, 16)
LAYOUT(event, daddr, 64, 16)
LAYOUT(event, sport, 80, 2)
LAYOUT(event, dport, 82, 2)
LAYOUT(event, family, 84, 2)
LAYOUT(event, oldstate, 86, 1)
LAYOUT(event, newstate, 87, 1)
LAYOUT(event, total_vm, 88, 8)
LAYOUT(event, anon_rss, 96, 8)
LAYOUT(event, file_rss, 104, 8)
LAYOUT(event, shmem_rss, 112, 8)
LAYOUT(event, pgtables, 120, 8)
LAYOUT(event, uid, 128, 4)
LAYOUT(event, oom_score_adj, 132, 4)
LAYOUT(event, reason, 136, 4)

/* Off-CPU stacks (bpf/offcpu.bpf.c). */
#define OFFCPU_MAX_STACKS 16384
#define OFFCPU_STACK_DEPTH 127 /* PERF_MAX_STACK_DEPTH */
#define OFFCPU_NO_STACK -1

/* `offcpu_ns` key: a process, a thread name and where that thread waited. */
struct offcpu_key {
	__u32 tgid;
	__s32 user_stack;
	__s32 kernel_stack;
	__u32 pad;
	char comm[16];
};
SIZE(offcpu_key, 32)
LAYOUT(offcpu_key, tgid, 0, 4)
LAYOUT(offcpu_key, user_stack, 4, 4)
LAYOUT(offcpu_key, kernel_stack, 8, 4)
LAYOUT(offcpu_key, comm, 16, 16)

/* `offcpu_start` value: a thread that went off the CPU, since when and where. */
struct offcpu_start {
	__u64 ts; /* CLOCK_MONOTONIC */
	struct offcpu_key key;
};
SIZE(offcpu_start, 40)
LAYOUT(offcpu_start, ts, 0, 8)
LAYOUT(offcpu_start, key, 8, 32)

struct offcpu_val {
	__u64 ns;
	__u64 count;
};
SIZE(offcpu_val, 16)
LAYOUT(offcpu_val, ns, 0, 8)
LAYOUT(offcpu_val, count, 8, 8)

#endif
