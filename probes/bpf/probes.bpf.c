// SPDX-License-Identifier: GPL-2.0 OR MIT
/* The eBPF side of the probes agent: tracepoint programs only (this kernel has no kprobes).
 *
 * Programs, grouped as the agent attaches them:
 *   tcp_retransmit  tcp:tcp_retransmit_skb  -> `retrans` (count per flow and state)
 *   tcp_lifecycle   sock:inet_sock_set_state -> `events` ring (connects, failures, closes)
 *   tcp_resets      tcp:tcp_receive_reset, tcp:tcp_send_reset -> `events` ring
 *   runqueue        sched:sched_switch (+ sched_wakeup_new; with BTF the wait is the
 *                   kernel's own sched_info accounting; without, sched_wakeup -> switch)
 *                                           -> `runq` (log2 histogram + switches per component)
 *   block_io        block:block_rq_issue / block_rq_complete -> `blk` (log2 histogram per dev, op)
 *   oom             oom:mark_victim         -> `events` ring
 *
 * Where the kernel has BTF, the TCP, scheduler and block programs attach as BTF raw
 * tracepoints (tp_btf) instead of classic ones: no trace record is formatted for them, and
 * they are not skipped while another eBPF program runs on the CPU (see tcp_retransmit_skb_btf).
 *
 * Cost is bounded: every map has a fixed size (LRU where stale entries can pile up), the ring
 * buffer drops (and counts) when full, and the scheduler programs do a single hash lookup for
 * tasks outside the lab unless the agent asked to track everything.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "tracepoints.h"
#include "shared.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7

/* sched_switch prev_state: bits below TASK_REPORT_MAX (0x100) are sleep states; none set means
 * the task was still runnable (preempted or yielded): an involuntary switch. */
#define TASK_STATE_MASK 0xff

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* The one kernel-internal struct the programs look into, relocated against the kernel's BTF at
 * load time (CO-RE): sk_buff.cb, where TCP keeps its control block. Its first fields (seq,
 * end_seq, then tcp_gso_segs) have had the same layout since Linux 3.18. */
struct sk_buff {
	char cb[48];
} __attribute__((preserve_access_index));
#define TCP_SKB_CB_GSO_SEGS 8

/* What the BTF raw tracepoints read of a socket, relocated against the kernel's BTF (the
 * kernel nests most of these in anonymous unions; CO-RE finds them by name). */
struct in6_addr {
	union {
		__u8 u6_addr8[16];
	} in6_u;
} __attribute__((preserve_access_index));

struct sock_common {
	__u32 skc_daddr;
	__u32 skc_rcv_saddr;
	__u16 skc_dport; /* network order */
	__u16 skc_num;   /* host order */
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

/* Early exits of __tcp_retransmit_skb that fire the tracepoint without counting RetransSegs. */
#define EAGAIN 11
#define ENOMEM 12
#define EBUSY 16
#define EINVAL 22
#define EHOSTUNREACH 113

/* Set by the agent at load time from the format file: tcp_retransmit_skb has an `err` field
 * (6.x) and the program counts only successful retransmits, as RetransSegs does. */
const volatile __u32 retrans_has_err = 1;
/* Set by the agent: kernel BTF exists, so the sk_buff access below was relocated and the
 * segment count can be read; without it each retransmitted skb counts as one segment. */
const volatile __u32 have_btf = 1;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CTR_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* tid -> component index, filled by the agent from the lab state; children inherit it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u32);
} tracked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} runq_start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_COMPONENTS);
	__type(key, __u32);
	__type(value, struct runq_val);
} runq SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct flow_key);
	__type(value, struct retrans_val);
} retrans SEC(".maps");

struct sock_info {
	__u64 start_ns;
	__u64 established_ns;
	__u32 tgid;
	__u32 pid;
	char comm[16];
};

/* struct sock * -> who opened it and when; kernel-private. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct sock_info);
} socks SEC(".maps");

struct blk_start_key {
	__u32 dev;
	__u32 pad;
	__u64 sector;
};

struct blk_start_val {
	__u64 ts;
	__u32 bytes;
	__u32 op;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct blk_start_key);
	__type(value, struct blk_start_val);
} blk_start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 512);
	__type(key, struct blk_key);
	__type(value, struct blk_val);
} blk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &slot);
	if (v)
		*v += 1;
}

static __always_inline __u32 log2_slot(__u64 v)
{
	__u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	if (r >= HIST_SLOTS)
		r = HIST_SLOTS - 1;
	return r;
}

static __always_inline void copy16(__u8 *dst, const __u8 *src)
{
#pragma unroll
	for (int i = 0; i < 16; i++)
		dst[i] = src[i];
}

static __always_inline void copy4(__u8 *dst, const __u8 *src)
{
#pragma unroll
	for (int i = 0; i < 4; i++)
		dst[i] = src[i];
}

/* A flow from a classic TCP tracepoint's record (a stack copy): they all carry family, ports
 * in host order, and IPv4 and IPv6 addresses. A macro, as the record types differ. */
#define flow_of_record(key, rec)                                                                   \
	do {                                                                                       \
		(key)->family = (rec)->family;                                                     \
		(key)->sport = (rec)->sport;                                                       \
		(key)->dport = (rec)->dport;                                                       \
		if ((rec)->family == AF_INET6) {                                                   \
			copy16((key)->saddr, (rec)->saddr_v6);                                     \
			copy16((key)->daddr, (rec)->daddr_v6);                                     \
		} else {                                                                           \
			copy4((key)->saddr, (rec)->saddr);                                         \
			copy4((key)->daddr, (rec)->daddr);                                         \
		}                                                                                  \
	} while (0)

/* A socket's addresses and ports as the TCP tracepoints report them (ports in host order). For
 * a connected socket the bound address and port (skc_rcv_saddr, skc_num) are the ones the
 * tracepoints read from inet_sock. */
static __always_inline void flow_of_sock(struct flow_key *key, struct sock *sk)
{
	struct sock_common *c = &sk->__sk_common;
	key->family = c->skc_family;
	key->sport = c->skc_num;
	key->dport = bpf_ntohs(c->skc_dport);
	if (key->family == AF_INET6) {
		copy16(key->saddr, c->skc_v6_rcv_saddr.in6_u.u6_addr8);
		copy16(key->daddr, c->skc_v6_daddr.in6_u.u6_addr8);
	} else {
		__u32 s4 = c->skc_rcv_saddr;
		__u32 d4 = c->skc_daddr;
		__builtin_memcpy(key->saddr, &s4, 4);
		__builtin_memcpy(key->daddr, &d4, 4);
	}
}

static __always_inline struct event *reserve(__u32 kind)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CTR_RINGBUF_FULL);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->ts_ns = bpf_ktime_get_ns();
	return e;
}

/* The agent drains the ring on every poll of the maps (every few seconds, and whenever
 * /metrics or /events is read), so an event does not wake it: a quiet machine then costs no
 * wake-up, read and decode per connection. The ring wakes it when it is a quarter full, so a
 * burst (a connect storm during a partition) is drained long before anything is dropped, and
 * for an OOM kill, which should reach /events at once. */
#define RING_WAKE_BYTES (64 * 1024)

static __always_inline void submit(struct event *e, int urgent)
{
	__u64 flags = BPF_RB_NO_WAKEUP;
	if (urgent || bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= RING_WAKE_BYTES)
		flags = BPF_RB_FORCE_WAKEUP;
	bpf_ringbuf_submit(e, flags);
}

/* ---------------------------------------------------------------- tcp_retransmit */

/* Early exits of __tcp_retransmit_skb: the tracepoint fired (6.10+), nothing was sent and
 * RetransSegs was not counted. */
static __always_inline int retransmit_gave_up(int err)
{
	return err == -EBUSY || err == -EAGAIN || err == -ENOMEM || err == -EINVAL ||
	       err == -EHOSTUNREACH;
}

/* Counts one retransmitted skb of flow `key` on socket `skaddr`. */
static __always_inline int count_retransmit(struct flow_key *key, __u64 skaddr, __u64 skbaddr)
{
	__u64 now = bpf_ktime_get_ns();
	struct retrans_val *v = bpf_map_lookup_elem(&retrans, key);
	if (!v) {
		struct retrans_val init = {};
		struct sock_info *si = bpf_map_lookup_elem(&socks, &skaddr);
		if (si)
			init.tgid = si->tgid;
		bpf_map_update_elem(&retrans, key, &init, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&retrans, key);
		if (!v) {
			count(CTR_MAP_FULL);
			return 0;
		}
	}
	/* A retransmitted skb can carry several segments (GSO); RetransSegs counts segments. */
	struct sk_buff *skb = (struct sk_buff *)skbaddr;
	__u16 segs = 0;
	if (have_btf)
		bpf_probe_read_kernel(&segs, sizeof(segs), &skb->cb[TCP_SKB_CB_GSO_SEGS]);
	__sync_fetch_and_add(&v->count, segs ? segs : 1);
	v->last_ns = now;
	return 0;
}

/* The classic tracepoint: the fallback without kernel BTF. Since 6.10 it also fires for
 * attempts that gave up before sending; count what the kernel counts in RetransSegs: segments
 * of attempts that reached the device path (a failed transmit still counts there, and in
 * TCPRetransFail). */
SEC("tracepoint/tcp/tcp_retransmit_skb")
int tcp_retransmit_skb(struct tp_tcp_retransmit_skb *ctx)
{
	if (retrans_has_err && retransmit_gave_up(ctx->err))
		return 0;
	/* Work on a stack copy: the address arrays are copied byte by byte, and the verifier
	 * rejects reads through a ctx pointer the compiler has advanced in a loop. */
	struct tp_tcp_retransmit_skb c;
	if (bpf_probe_read_kernel(&c, sizeof(c), ctx))
		return 0;
	struct flow_key key = {};
	flow_of_record(&key, &c);
	key.state = (__u8)c.state;
	return count_retransmit(&key, c.skaddr, c.skbaddr);
}

/* The same as a BTF raw tracepoint, attached instead when the kernel has BTF and the
 * tracepoint passes `err` (TP_PROTO(const struct sock *sk, const struct sk_buff *skb, int err),
 * as 6.18 has it; kernels without it reject the third argument and get the classic program).
 * Why it matters: the kernel skips a classic tracepoint's programs whenever any other kprobe
 * or classic tracepoint program is running on that CPU (one `bpf_prog_active` flag per CPU,
 * also held by map syscalls), and a retransmit timer firing in that window is lost to us; a
 * raw tracepoint is only skipped when this very program is already running there. */
SEC("tp_btf/tcp_retransmit_skb")
int tcp_retransmit_skb_btf(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	__u64 skb = ctx[1];
	int err = (int)ctx[2];
	if (retransmit_gave_up(err))
		return 0;
	struct flow_key key = {};
	flow_of_sock(&key, sk);
	key.state = sk->__sk_common.skc_state;
	return count_retransmit(&key, (__u64)sk, skb);
}

/* ---------------------------------------------------------------- tcp_lifecycle */

static __always_inline void fill_tuple_v(struct event *e, __u16 family, const __u8 *s4,
					 const __u8 *d4, const __u8 *s6, const __u8 *d6)
{
	e->family = family;
	if (family == AF_INET6) {
		copy16(e->saddr, s6);
		copy16(e->daddr, d6);
	} else {
		copy4(e->saddr, s4);
		copy4(e->daddr, d4);
	}
}

static __always_inline void from_sock_info(struct event *e, struct sock_info *si)
{
	e->tgid = si->tgid;
	e->pid = si->pid;
	__builtin_memcpy(e->comm, si->comm, sizeof(e->comm));
}

static __always_inline void fill_tuple(struct event *e, const struct flow_key *t)
{
	e->family = t->family;
	copy16(e->saddr, t->saddr);
	copy16(e->daddr, t->daddr);
	e->sport = t->sport;
	e->dport = t->dport;
}

/* A TCP socket `sk` (its addresses in `t`) moved from state `old` to `new`. */
static __always_inline int on_set_state(__u64 sk, int old, int new, const struct flow_key *t)
{
	__u64 now = bpf_ktime_get_ns();
	struct event *e;

	if (new == TCP_SYN_SENT) {
		/* connect(): runs in the connecting task, so the pid is meaningful here (and only
		 * here: SYN-ACKs, timeouts and resets arrive in softirq context). The local port
		 * is not assigned yet. */
		struct sock_info si = {};
		__u64 id = bpf_get_current_pid_tgid();
		si.start_ns = now;
		si.tgid = id >> 32;
		si.pid = (__u32)id;
		bpf_get_current_comm(si.comm, sizeof(si.comm));
		if (bpf_map_update_elem(&socks, &sk, &si, BPF_ANY))
			count(CTR_MAP_FULL);
		e = reserve(EV_CONNECT);
		if (!e)
			return 0;
		from_sock_info(e, &si);
	} else if (new == TCP_SYN_RECV) {
		struct sock_info si = {};
		si.start_ns = now;
		bpf_map_update_elem(&socks, &sk, &si, BPF_ANY);
		return 0;
	} else if (new == TCP_ESTABLISHED) {
		struct sock_info *si = bpf_map_lookup_elem(&socks, &sk);
		if (!si) {
			struct sock_info fresh = {};
			fresh.start_ns = now;
			fresh.established_ns = now;
			bpf_map_update_elem(&socks, &sk, &fresh, BPF_ANY);
			return 0;
		}
		si->established_ns = now;
		if (old != TCP_SYN_SENT)
			return 0;
		e = reserve(EV_ESTABLISHED);
		if (!e)
			return 0;
		from_sock_info(e, si);
		e->duration_ns = now - si->start_ns;
	} else if (new == TCP_CLOSE) {
		struct sock_info *si = bpf_map_lookup_elem(&socks, &sk);
		if (old == TCP_SYN_SENT) {
			e = reserve(EV_CONNECT_FAILED);
			if (!e)
				goto forget;
			if (si) {
				from_sock_info(e, si);
				e->duration_ns = now - si->start_ns;
			}
		} else if (si && si->established_ns) {
			e = reserve(EV_CLOSED);
			if (!e)
				goto forget;
			from_sock_info(e, si);
			e->duration_ns = now - si->established_ns;
		} else {
			goto forget;
		}
		fill_tuple(e, t);
		e->oldstate = (__u8)old;
		e->newstate = (__u8)new;
		submit(e, 0);
	forget:
		bpf_map_delete_elem(&socks, &sk);
		return 0;
	} else {
		return 0;
	}
	fill_tuple(e, t);
	e->oldstate = (__u8)old;
	e->newstate = (__u8)new;
	submit(e, 0);
	return 0;
}

/* The classic tracepoint: the fallback without kernel BTF. */
SEC("tracepoint/sock/inet_sock_set_state")
int inet_sock_set_state(struct tp_inet_sock_set_state *tp)
{
	if (tp->protocol != IPPROTO_TCP)
		return 0;
	struct tp_inet_sock_set_state c;
	if (bpf_probe_read_kernel(&c, sizeof(c), tp))
		return 0;
	struct flow_key t = {};
	flow_of_record(&t, &c);
	return on_set_state(c.skaddr, c.oldstate, c.newstate, &t);
}

/* The same as a BTF raw tracepoint (TP_PROTO(const struct sock *sk, const int oldstate,
 * const int newstate)), attached instead when the kernel has BTF: a connect failing in a
 * timer while another classic tracepoint program runs on that CPU would be lost to the
 * classic one (see tcp_retransmit_skb_btf). */
SEC("tp_btf/inet_sock_set_state")
int inet_sock_set_state_btf(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	struct flow_key t = {};
	flow_of_sock(&t, sk);
	return on_set_state((__u64)sk, (int)ctx[1], (int)ctx[2], &t);
}

SEC("tracepoint/tcp/tcp_receive_reset")
int tcp_receive_reset(struct tp_tcp_receive_reset *tp)
{
	struct tp_tcp_receive_reset c;
	if (bpf_probe_read_kernel(&c, sizeof(c), tp))
		return 0;
	struct tp_tcp_receive_reset *ctx = &c;
	struct event *e = reserve(EV_RESET_RX);
	if (!e)
		return 0;
	__u64 sk = ctx->skaddr;
	struct sock_info *si = bpf_map_lookup_elem(&socks, &sk);
	if (si)
		from_sock_info(e, si);
	fill_tuple_v(e, ctx->family, ctx->saddr, ctx->daddr, ctx->saddr_v6, ctx->daddr_v6);
	e->sport = ctx->sport;
	e->dport = ctx->dport;
	submit(e, 0);
	return 0;
}

/* sockaddr_in / sockaddr_in6: family (host order), port (network order), then the address
 * at offset 4 (in) or 8 (in6). */
static __always_inline void from_sockaddr(const __u8 *sa, __u8 *addr, __u16 *port, __u16 *family)
{
	__u16 fam = sa[0] | (sa[1] << 8);
	*family = fam;
	*port = (sa[2] << 8) | sa[3];
	if (fam == AF_INET6)
		copy16(addr, sa + 8);
	else
		copy4(addr, sa + 4);
}

SEC("tracepoint/tcp/tcp_send_reset")
int tcp_send_reset(struct tp_tcp_send_reset *tp)
{
	struct tp_tcp_send_reset c;
	if (bpf_probe_read_kernel(&c, sizeof(c), tp))
		return 0;
	struct tp_tcp_send_reset *ctx = &c;
	struct event *e = reserve(EV_RESET_TX);
	if (!e)
		return 0;
	__u64 sk = ctx->skaddr;
	if (sk) {
		struct sock_info *si = bpf_map_lookup_elem(&socks, &sk);
		if (si)
			from_sock_info(e, si);
	}
	__u16 fam2 = 0;
	from_sockaddr(ctx->saddr, e->saddr, &e->sport, &e->family);
	from_sockaddr(ctx->daddr, e->daddr, &e->dport, &fam2);
	e->oldstate = (__u8)ctx->state;
	e->reason = ctx->reason;
	submit(e, 0);
	return 0;
}

/* ---------------------------------------------------------------- runqueue */

static __always_inline int component_of(__u32 tid, __u32 *comp)
{
	__u32 *c = bpf_map_lookup_elem(&tracked, &tid);
	if (c) {
		*comp = *c;
		return 1;
	}
	__u32 zero = 0;
	struct settings *s = bpf_map_lookup_elem(&settings, &zero);
	if (s && s->track_all) {
		*comp = 0;
		return 1;
	}
	return 0;
}

static __always_inline void mark_runnable(__u32 tid)
{
	__u32 comp;
	if (!tid || !component_of(tid, &comp))
		return;
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&runq_start, &tid, &now, BPF_ANY);
}

/* wake_up_new_task runs in the parent: a new thread or child process of a tracked task belongs
 * to the same component until the agent's next scan says otherwise. */
static __always_inline void on_inherit(__u32 tid)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 parent = (__u32)id;
	__u32 parent_tgid = id >> 32;
	__u32 *c = bpf_map_lookup_elem(&tracked, &parent);
	if (!c)
		c = bpf_map_lookup_elem(&tracked, &parent_tgid);
	if (c) {
		__u32 comp = *c;
		bpf_map_update_elem(&tracked, &tid, &comp, BPF_NOEXIST);
	}
}

/* `involuntary`: prev was still runnable (preempted or throttled), so it is back on the run
 * queue from now on. */
static __always_inline void on_switch(__u32 prev, __u32 next, int involuntary)
{
	__u32 comp;
	__u64 now = bpf_ktime_get_ns();

	if (prev && component_of(prev, &comp) && comp < MAX_COMPONENTS) {
		struct runq_val *v = bpf_map_lookup_elem(&runq, &comp);
		if (v) {
			if (involuntary) {
				v->involuntary += 1;
				bpf_map_update_elem(&runq_start, &prev, &now, BPF_ANY);
			} else {
				v->voluntary += 1;
			}
		}
	}

	if (!next)
		return;
	__u64 *start = bpf_map_lookup_elem(&runq_start, &next);
	if (!start)
		return;
	__u64 delta = now - *start;
	bpf_map_delete_elem(&runq_start, &next);
	if ((__s64)delta < 0 || !component_of(next, &comp) || comp >= MAX_COMPONENTS)
		return;
	struct runq_val *v = bpf_map_lookup_elem(&runq, &comp);
	if (!v)
		return;
	__u32 slot = log2_slot(delta);
	if (slot < HIST_SLOTS)
		v->slots[slot] += 1;
	v->sum_ns += delta;
	v->count += 1;
}

/* BTF-enabled raw tracepoints (tp_btf), attached when the kernel has BTF: the kernel hands the
 * programs its own arguments (task pointers) without formatting a trace record.
 *
 * Run-queue latency comes from the scheduler's own accounting (CONFIG_SCHED_INFO, the numbers
 * behind /proc/PID/schedstat): when a task is queued to run (woken, or preempted while still
 * runnable) the kernel stamps `sched_info.last_queued` with its run-queue clock; when it is
 * picked, the difference to the run queue's clock (`rq->clock`, updated at the top of
 * __schedule, before this tracepoint) is the wait, the same `delta` the kernel adds to the
 * task's run_delay right after. So one program on sched_switch measures it: no wakeup
 * program, no timestamp of our own, nothing stored per wait. The component of each task is
 * cached in task-local storage until the agent changes the filter (settings.generation). */
struct sched_info {
	unsigned long long last_queued;
} __attribute__((preserve_access_index));

struct rq {
	__u64 clock;
} __attribute__((preserve_access_index));

/* With CONFIG_FAIR_GROUP_SCHED (cgroup CPU control) every CFS run queue knows its CPU's run
 * queue; without it this relocation fails, and the agent attaches the classic tracepoints. */
struct cfs_rq {
	struct rq *rq;
} __attribute__((preserve_access_index));

struct sched_entity {
	struct cfs_rq *cfs_rq;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	struct sched_info sched_info;
	struct sched_entity se;
} __attribute__((preserve_access_index));

struct task_info {
	__u32 comp; /* component + 1; 0: not tracked */
	__u32 gen;  /* settings.generation + 1 when comp was decided; 0: never */
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_info);
} task_infos SEC(".maps");

/* The component of a task + 1, 0 when it is not tracked. */
static __always_inline __u32 comp_of(struct task_struct *p)
{
	struct task_info *ti = bpf_task_storage_get(&task_infos, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!ti)
		return 0;
	__u32 zero = 0;
	struct settings *s = bpf_map_lookup_elem(&settings, &zero);
	__u32 gen = s ? s->generation + 1 : 1;
	if (ti->gen != gen) {
		__u32 comp;
		__u32 tid = (__u32)p->pid;
		ti->comp = (tid && component_of(tid, &comp)) ? comp + 1 : 0;
		ti->gen = gen;
	}
	return ti->comp;
}

/* A new thread or child inherits its parent's component (the agent's next scan confirms it). */
SEC("tp_btf/sched_wakeup_new")
int sched_wakeup_new_btf(__u64 *ctx)
{
	struct task_struct *p = (struct task_struct *)ctx[0];
	on_inherit((__u32)p->pid);
	return 0;
}

/* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
 *          unsigned int prev_state) since Linux 5.18. */
SEC("tp_btf/sched_switch")
int sched_switch_btf(__u64 *ctx)
{
	int preempt = (int)(ctx[0] & 1);
	struct task_struct *prev = (struct task_struct *)ctx[1];
	struct task_struct *next = (struct task_struct *)ctx[2];
	__u32 prev_state = (__u32)ctx[3];

	/* The task switched away from is looked up only when it is still runnable (preempted or
	 * throttled: an involuntary switch, the rare kind). A voluntary switch is counted when the
	 * task comes back, as a switch-in below (voluntary = switch-ins - involuntary), so the
	 * common switch — a task blocks, the CPU goes idle — costs no storage lookup at all. The
	 * idle task (pid 0) is always "runnable" and never tracked. */
	if ((preempt || (prev_state & TASK_STATE_MASK) == 0) && prev->pid) {
		__u32 pc = comp_of(prev);
		if (pc) {
			__u32 comp = pc - 1;
			struct runq_val *v = bpf_map_lookup_elem(&runq, &comp);
			if (v)
				v->involuntary += 1;
		}
	}

	/* 0: next did not wait in the queue (the idle task, or accounting is off). */
	__u64 queued = next->sched_info.last_queued;
	if (!queued)
		return 0;
	__u32 nc = comp_of(next);
	if (!nc)
		return 0;
	__u32 comp = nc - 1;
	struct runq_val *v = bpf_map_lookup_elem(&runq, &comp);
	if (!v)
		return 0;
	v->switch_ins += 1;
	struct rq *rq = next->se.cfs_rq->rq;
	if (!rq)
		return 0;
	__u64 delta = rq->clock - queued;
	if ((__s64)delta < 0)
		return 0;
	__u32 slot = log2_slot(delta);
	if (slot < HIST_SLOTS)
		v->slots[slot] += 1;
	v->sum_ns += delta;
	v->count += 1;
	return 0;
}

/* Classic tracepoints: the fallback without kernel BTF. */
SEC("tracepoint/sched/sched_wakeup")
int sched_wakeup(struct tp_sched_wakeup *ctx)
{
	mark_runnable((__u32)ctx->pid);
	return 0;
}

SEC("tracepoint/sched/sched_wakeup_new")
int sched_wakeup_new(struct tp_sched_wakeup *ctx)
{
	on_inherit((__u32)ctx->pid);
	mark_runnable((__u32)ctx->pid);
	return 0;
}

SEC("tracepoint/sched/sched_switch")
int sched_switch(struct tp_sched_switch *ctx)
{
	/* prev_state: bits below TASK_REPORT_MAX are sleep states; none set means still runnable. */
	on_switch((__u32)ctx->prev_pid, (__u32)ctx->next_pid,
		  (ctx->prev_state & TASK_STATE_MASK) == 0);
	return 0;
}

/* ---------------------------------------------------------------- block_io */

static __always_inline __u32 classify(const char *rwbs)
{
	char c = rwbs[0];
	/* A leading F is a preflush when an operation letter follows ("FWS"); alone it is a
	 * flush ("F", "FS"). */
	if (c == 'F') {
		char n = rwbs[1];
		if (n == 'W' || n == 'R' || n == 'D' || n == 'F' || n == 'N')
			c = n;
	}
	switch (c) {
	case 'R':
		return OP_READ;
	case 'W':
		return OP_WRITE;
	case 'F':
		return OP_FLUSH;
	case 'D':
		return OP_DISCARD;
	default:
		return OP_OTHER;
	}
}

/* Adds one completed request to the per-(device, operation) histogram. */
static __always_inline void blk_account(__u32 dev, __u32 op, __u64 bytes, __u64 delta, int failed)
{
	struct blk_key hk = {};
	hk.dev = dev;
	hk.op = op;
	struct blk_val *v = bpf_map_lookup_elem(&blk, &hk);
	if (!v) {
		struct blk_val zero = {};
		bpf_map_update_elem(&blk, &hk, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&blk, &hk);
		if (!v) {
			count(CTR_MAP_FULL);
			return;
		}
	}
	__u32 slot = log2_slot(delta);
	if (slot < HIST_SLOTS)
		__sync_fetch_and_add(&v->slots[slot], 1);
	__sync_fetch_and_add(&v->sum_ns, delta);
	__sync_fetch_and_add(&v->count, 1);
	__sync_fetch_and_add(&v->bytes, bytes);
	if (failed)
		__sync_fetch_and_add(&v->errors, 1);
}

SEC("tracepoint/block/block_rq_issue")
int block_rq_issue(struct tp_block_rq_issue *ctx)
{
	struct blk_start_key key = {};
	key.dev = ctx->dev;
	key.sector = ctx->sector;
	struct blk_start_val val = {};
	val.ts = bpf_ktime_get_ns();
	val.bytes = ctx->bytes;
	val.op = classify(ctx->rwbs);
	if (bpf_map_update_elem(&blk_start, &key, &val, BPF_ANY))
		count(CTR_MAP_FULL);
	return 0;
}

SEC("tracepoint/block/block_rq_complete")
int block_rq_complete(struct tp_block_rq_complete *ctx)
{
	struct blk_start_key key = {};
	key.dev = ctx->dev;
	key.sector = ctx->sector;
	struct blk_start_val *start = bpf_map_lookup_elem(&blk_start, &key);
	if (!start)
		return 0;
	__u64 delta = bpf_ktime_get_ns() - start->ts;
	__u32 op = start->op;
	__u64 bytes = start->bytes;
	bpf_map_delete_elem(&blk_start, &key);
	blk_account(ctx->dev, op, bytes, delta, ctx->error != 0);
	return 0;
}

/* BTF raw tracepoints for block I/O: the kernel hands over its `struct request` without
 * formatting a trace record (the classic record builds the rwbs string and copies the command
 * on every issue and completion). The request's address keys its start while it is in flight;
 * the LRU bound drops requests whose completion never came (requeued, driver reset). */
struct gendisk {
	int major;
	int first_minor;
} __attribute__((preserve_access_index));

struct request_queue {
	struct gendisk *disk;
	unsigned long queue_flags;
} __attribute__((preserve_access_index));

struct request {
	struct request_queue *q;
	__u32 cmd_flags;
	unsigned int __data_len;
	/* Stamped by the kernel right after the issue tracepoint (blk_mq_start_request), with the
	 * sectors issued, when the queue keeps I/O statistics (QUEUE_FLAG_STATS: writeback
	 * throttling, on by default, turns it on); 0 otherwise. */
	__u64 io_start_time_ns;
	unsigned int stats_sectors;
} __attribute__((preserve_access_index));

/* The bit of QUEUE_FLAG_STATS in request_queue.queue_flags: an enumerator of an anonymous
 * enum, which CO-RE cannot relocate, so the agent reads it from the kernel's BTF and sets it at
 * load time. Unknown (>= 64): every request goes through `blk_inflight`. */
const volatile __u32 queue_flag_stats_bit = 0xffffffff;

/* REQ_OP_DRV_IN and above: passthrough requests, which the kernel never stamps. */
#define REQ_OP_DRV_IN 34

/* enum req_op: the low 8 bits of cmd_flags. */
#define REQ_OP_MASK 0xff
#define REQ_OP_READ 0
#define REQ_OP_WRITE 1
#define REQ_OP_FLUSH 2
#define REQ_OP_DISCARD 3
/* The kernel's dev_t as the classic tracepoints print it (MKDEV). */
#define MINORBITS 20

struct blk_rq_start {
	__u64 ts;
	__u32 bytes;
	__u32 op;
	__u32 dev;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct blk_rq_start);
} blk_inflight SEC(".maps");

static __always_inline __u32 classify_op(__u32 cmd_flags)
{
	switch (cmd_flags & REQ_OP_MASK) {
	case REQ_OP_READ:
		return OP_READ;
	case REQ_OP_WRITE:
		return OP_WRITE;
	case REQ_OP_FLUSH:
		return OP_FLUSH;
	case REQ_OP_DISCARD:
		return OP_DISCARD;
	default:
		return OP_OTHER;
	}
}

/* Whether the kernel will stamp this request's issue time itself (see `struct request`). */
static __always_inline int kernel_stamps_issue(struct request *rq)
{
	__u32 bit = queue_flag_stats_bit;
	if (bit >= 64)
		return 0;
	if ((rq->cmd_flags & REQ_OP_MASK) >= REQ_OP_DRV_IN)
		return 0;
	return (rq->q->queue_flags >> bit) & 1;
}

static __always_inline __u32 dev_of(struct request *rq)
{
	struct gendisk *disk = rq->q->disk;
	if (!disk)
		return 0;
	return ((__u32)disk->major << MINORBITS) | (__u32)disk->first_minor;
}

/* TP_PROTO(struct request *rq) since Linux 5.11. Nothing to do when the kernel stamps the
 * issue itself; otherwise the start goes into `blk_inflight`, keyed by the request. */
SEC("tp_btf/block_rq_issue")
int block_rq_issue_btf(__u64 *ctx)
{
	struct request *rq = (struct request *)ctx[0];
	if (kernel_stamps_issue(rq))
		return 0;
	__u64 key = (__u64)rq;
	struct blk_rq_start val = {};
	val.ts = bpf_ktime_get_ns();
	val.bytes = rq->__data_len;
	val.op = classify_op(rq->cmd_flags);
	val.dev = dev_of(rq);
	if (bpf_map_update_elem(&blk_inflight, &key, &val, BPF_ANY))
		count(CTR_MAP_FULL);
	return 0;
}

/* TP_PROTO(struct request *rq, blk_status_t error, unsigned int nr_bytes). A request that was
 * never issued (the empty write of a cache flush, which the flush machinery completes after
 * its own flush request) has neither a stamp nor an entry, and is not counted. */
SEC("tp_btf/block_rq_complete")
int block_rq_complete_btf(__u64 *ctx)
{
	struct request *rq = (struct request *)ctx[0];
	int failed = (__u8)ctx[1] != 0;
	__u32 nr_bytes = (__u32)ctx[2];
	/* Only when the issue program leaves stamped requests to the kernel: otherwise each one
	 * has its entry, which must go. */
	__u64 issued = queue_flag_stats_bit < 64 ? rq->io_start_time_ns : 0;
	if (issued) {
		/* A request may complete in parts; the part that finishes it counts it. */
		if (nr_bytes < rq->__data_len)
			return 0;
		__u64 delta = bpf_ktime_get_ns() - issued;
		if ((__s64)delta < 0)
			return 0;
		blk_account(dev_of(rq), classify_op(rq->cmd_flags), (__u64)rq->stats_sectors << 9, delta,
			    failed);
		return 0;
	}
	__u64 key = ctx[0];
	struct blk_rq_start *start = bpf_map_lookup_elem(&blk_inflight, &key);
	if (!start)
		return 0;
	__u64 delta = bpf_ktime_get_ns() - start->ts;
	__u32 dev = start->dev;
	__u32 op = start->op;
	__u64 bytes = start->bytes;
	bpf_map_delete_elem(&blk_inflight, &key);
	blk_account(dev, op, bytes, delta, failed);
	return 0;
}

/* ---------------------------------------------------------------- oom */

SEC("tracepoint/oom/mark_victim")
int oom_mark_victim(struct tp_mark_victim *ctx)
{
	struct event *e = reserve(EV_OOM);
	if (!e)
		return 0;
	__u32 victim = (__u32)ctx->pid;
	e->pid = victim;
	e->tgid = victim;
	__u32 *c = bpf_map_lookup_elem(&tracked, &victim);
	if (c)
		e->comp = *c;
	__u32 loc = ctx->comm;
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), (char *)ctx + (loc & 0xffff));
	e->total_vm = ctx->total_vm;
	e->anon_rss = ctx->anon_rss;
	e->file_rss = ctx->file_rss;
	e->shmem_rss = ctx->shmem_rss;
	e->pgtables = ctx->pgtables;
	e->uid = ctx->uid;
	e->oom_score_adj = ctx->oom_score_adj;
	submit(e, 1);
	return 0;
}
