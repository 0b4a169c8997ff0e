/* Hand-written context structs for the tracepoints the probes attach to.
 *
 * Each struct mirrors /sys/kernel/tracing/events/CAT/EV/format on the lab's kernel (6.18):
 * the first 8 bytes are the common header (common_type, common_flags, common_preempt_count,
 * common_pid), then the event's own fields. Only the fields the programs read are checked.
 *
 * Every TP_FIELD line below is a compile-time check (offset and size) AND the source of the
 * userspace table (src/layout.rs) that the agent compares with the running kernel's format
 * files before it attaches anything; a unit test keeps the two in sync. If the kernel moves a
 * field, the agent refuses to attach that probe and names the field.
 */
#ifndef PROBES_TRACEPOINTS_H
#define PROBES_TRACEPOINTS_H

#include <linux/types.h>

#define TP_FIELD(cat, ev, field, off, size)                                                   \
	_Static_assert(__builtin_offsetof(struct tp_##ev, field) == (off), #ev "." #field " offset"); \
	_Static_assert(sizeof(((struct tp_##ev *)0)->field) == (size), #ev "." #field " size");
/* A field that older kernels lack: the agent checks for it and tells the program (a global). */
#define TP_FIELD_OPT(cat, ev, field, off, size) TP_FIELD(cat, ev, field, off, size)

struct tp_common {
	__u16 common_type;
	__u8 common_flags;
	__u8 common_preempt_count;
	__s32 common_pid;
};

/* tcp:tcp_retransmit_skb */
struct tp_tcp_retransmit_skb {
	struct tp_common common;
	__u64 skbaddr;
	__u64 skaddr;
	__s32 state;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 saddr[4];
	__u8 daddr[4];
	__u8 saddr_v6[16];
	__u8 daddr_v6[16];
	__u16 pad;
	__s32 err; /* 6.x: present; the agent tells the program whether to read it */
};
TP_FIELD(tcp, tcp_retransmit_skb, skbaddr, 8, 8)
TP_FIELD(tcp, tcp_retransmit_skb, skaddr, 16, 8)
TP_FIELD(tcp, tcp_retransmit_skb, state, 24, 4)
TP_FIELD(tcp, tcp_retransmit_skb, sport, 28, 2)
TP_FIELD(tcp, tcp_retransmit_skb, dport, 30, 2)
TP_FIELD(tcp, tcp_retransmit_skb, family, 32, 2)
TP_FIELD(tcp, tcp_retransmit_skb, saddr, 34, 4)
TP_FIELD(tcp, tcp_retransmit_skb, daddr, 38, 4)
TP_FIELD(tcp, tcp_retransmit_skb, saddr_v6, 42, 16)
TP_FIELD(tcp, tcp_retransmit_skb, daddr_v6, 58, 16)
TP_FIELD_OPT(tcp, tcp_retransmit_skb, err, 76, 4)

/* sock:inet_sock_set_state */
struct tp_inet_sock_set_state {
	struct tp_common common;
	__u64 skaddr;
	__s32 oldstate;
	__s32 newstate;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol;
	__u8 saddr[4];
	__u8 daddr[4];
	__u8 saddr_v6[16];
	__u8 daddr_v6[16];
};
TP_FIELD(sock, inet_sock_set_state, skaddr, 8, 8)
TP_FIELD(sock, inet_sock_set_state, oldstate, 16, 4)
TP_FIELD(sock, inet_sock_set_state, newstate, 20, 4)
TP_FIELD(sock, inet_sock_set_state, sport, 24, 2)
TP_FIELD(sock, inet_sock_set_state, dport, 26, 2)
TP_FIELD(sock, inet_sock_set_state, family, 28, 2)
TP_FIELD(sock, inet_sock_set_state, protocol, 30, 2)
TP_FIELD(sock, inet_sock_set_state, saddr, 32, 4)
TP_FIELD(sock, inet_sock_set_state, daddr, 36, 4)
TP_FIELD(sock, inet_sock_set_state, saddr_v6, 40, 16)
TP_FIELD(sock, inet_sock_set_state, daddr_v6, 56, 16)

/* tcp:tcp_receive_reset */
struct tp_tcp_receive_reset {
	struct tp_common common;
	__u64 skaddr;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 saddr[4];
	__u8 daddr[4];
	__u8 saddr_v6[16];
	__u8 daddr_v6[16];
};
TP_FIELD(tcp, tcp_receive_reset, skaddr, 8, 8)
TP_FIELD(tcp, tcp_receive_reset, sport, 16, 2)
TP_FIELD(tcp, tcp_receive_reset, dport, 18, 2)
TP_FIELD(tcp, tcp_receive_reset, family, 20, 2)
TP_FIELD(tcp, tcp_receive_reset, saddr, 22, 4)
TP_FIELD(tcp, tcp_receive_reset, daddr, 26, 4)
TP_FIELD(tcp, tcp_receive_reset, saddr_v6, 30, 16)
TP_FIELD(tcp, tcp_receive_reset, daddr_v6, 46, 16)

/* tcp:tcp_send_reset: addresses are a struct sockaddr_in or sockaddr_in6 (28 bytes), local
 * side in saddr whether or not a socket exists. */
struct tp_tcp_send_reset {
	struct tp_common common;
	__u64 skbaddr;
	__u64 skaddr;
	__s32 state;
	__u32 reason;
	__u8 saddr[28];
	__u8 daddr[28];
};
TP_FIELD(tcp, tcp_send_reset, skaddr, 16, 8)
TP_FIELD(tcp, tcp_send_reset, state, 24, 4)
TP_FIELD(tcp, tcp_send_reset, saddr, 32, 28)
TP_FIELD(tcp, tcp_send_reset, daddr, 60, 28)

/* sched:sched_wakeup and sched:sched_wakeup_new (same layout) */
struct tp_sched_wakeup {
	struct tp_common common;
	char comm[16];
	__s32 pid;
	__s32 prio;
	__s32 target_cpu;
};
TP_FIELD(sched, sched_wakeup, pid, 24, 4)
#define tp_sched_wakeup_new tp_sched_wakeup
TP_FIELD(sched, sched_wakeup_new, pid, 24, 4)

/* sched:sched_switch */
struct tp_sched_switch {
	struct tp_common common;
	char prev_comm[16];
	__s32 prev_pid;
	__s32 prev_prio;
	__s64 prev_state;
	char next_comm[16];
	__s32 next_pid;
	__s32 next_prio;
};
TP_FIELD(sched, sched_switch, prev_pid, 24, 4)
TP_FIELD(sched, sched_switch, prev_state, 32, 8)
TP_FIELD(sched, sched_switch, next_pid, 56, 4)

/* block:block_rq_issue */
struct tp_block_rq_issue {
	struct tp_common common;
	__u32 dev;
	__u32 pad;
	__u64 sector;
	__u32 nr_sector;
	__u32 bytes;
	__u16 ioprio;
	char rwbs[10];
};
TP_FIELD(block, block_rq_issue, dev, 8, 4)
TP_FIELD(block, block_rq_issue, sector, 16, 8)
TP_FIELD(block, block_rq_issue, bytes, 28, 4)
TP_FIELD(block, block_rq_issue, rwbs, 34, 10)

/* block:block_rq_complete */
struct tp_block_rq_complete {
	struct tp_common common;
	__u32 dev;
	__u32 pad;
	__u64 sector;
	__u32 nr_sector;
	__s32 error;
	__u16 ioprio;
	char rwbs[10];
};
TP_FIELD(block, block_rq_complete, dev, 8, 4)
TP_FIELD(block, block_rq_complete, sector, 16, 8)
TP_FIELD(block, block_rq_complete, error, 28, 4)
TP_FIELD(block, block_rq_complete, rwbs, 34, 10)

/* oom:mark_victim; comm is a __data_loc (u32: length << 16 | offset from the record start) */
struct tp_mark_victim {
	struct tp_common common;
	__s32 pid;
	__u32 comm;
	__u64 total_vm;
	__u64 anon_rss;
	__u64 file_rss;
	__u64 shmem_rss;
	__u32 uid;
	__u32 pad;
	__u64 pgtables;
	__s16 oom_score_adj;
};
TP_FIELD(oom, mark_victim, pid, 8, 4)
TP_FIELD(oom, mark_victim, comm, 12, 4)
TP_FIELD(oom, mark_victim, total_vm, 16, 8)
TP_FIELD(oom, mark_victim, anon_rss, 24, 8)
TP_FIELD(oom, mark_victim, file_rss, 32, 8)
TP_FIELD(oom, mark_victim, shmem_rss, 40, 8)
TP_FIELD(oom, mark_victim, uid, 48, 4)
TP_FIELD(oom, mark_victim, pgtables, 56, 8)
TP_FIELD(oom, mark_victim, oom_score_adj, 64, 2)

#endif
