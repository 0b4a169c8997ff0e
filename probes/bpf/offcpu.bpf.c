// SPDX-License-Identifier: GPL-2.0 OR MIT
/* Off-CPU stacks: where the threads of chosen processes wait, and for how long.
 *
 * One BTF raw tracepoint on sched_switch, loaded and attached only while a capture runs
 * (`probes offcpu`, the agent's `GET /debug/offcpu`), then detached and freed: it costs
 * nothing the rest of the time.
 *
 *   switch-out of a thread of a target process (it is `current` here): remember when, its
 *     user stack (walked through frame pointers), its kernel stack (why it stopped running:
 *     a futex, epoll, fdatasync, a sleep, or a preemption) and its thread name;
 *   switch-in of such a thread: add the time it was off the CPU to that
 *     (process, user stack, kernel stack, thread name), when it is at least `min_ns`.
 *
 * The time includes waiting in the run queue after the wakeup, as off-CPU time is usually
 * defined (bcc's offcputime). Threads still off the CPU when the capture ends are in
 * `offcpu_start`; the agent adds them up to the end of the window.
 *
 * Every map is bounded; what does not fit is counted in `offcpu_lost` (index 0: no room for a
 * new stack in `offcpu_stacks` or a new key in `offcpu_ns`; 1: a stack could not be read).
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "shared.h"

/* Shorter waits are not worth a map update (bcc's default minimum is 1 µs too). */
const volatile __u64 min_ns = 1000;

struct task_struct {
	int pid;
	int tgid;
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);  /* tgid */
	__type(value, __u8); /* 1 */
} offcpu_targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, OFFCPU_MAX_STACKS);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, OFFCPU_STACK_DEPTH * sizeof(__u64));
} offcpu_stacks SEC(".maps");

/* Threads off the CPU now: since when, and where they stopped. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* tid */
	__type(value, struct offcpu_start);
} offcpu_start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct offcpu_key);
	__type(value, struct offcpu_val);
} offcpu_ns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} offcpu_lost SEC(".maps");

static __always_inline void lost(__u32 index)
{
	__u64 *n = bpf_map_lookup_elem(&offcpu_lost, &index);
	if (n)
		*n += 1;
}

/* A stack id, or OFFCPU_NO_STACK (counted) when the stack could not be stored. */
static __always_inline __s32 stack_id(void *ctx, __u64 flags)
{
	long id = bpf_get_stackid(ctx, &offcpu_stacks, flags);
	if (id < 0) {
		/* -EEXIST: another stack holds the slot; -ENOMEM or -EFAULT otherwise. */
		lost(id == -17 ? 0 : 1);
		return OFFCPU_NO_STACK;
	}
	return (__s32)id;
}

/* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
 *          unsigned int prev_state) since Linux 5.18. */
SEC("tp_btf/sched_switch")
int offcpu_switch(__u64 *ctx)
{
	struct task_struct *prev = (struct task_struct *)ctx[1];
	struct task_struct *next = (struct task_struct *)ctx[2];
	__u64 now = bpf_ktime_get_ns();

	__u32 prev_tgid = (__u32)prev->tgid;
	if (prev_tgid && bpf_map_lookup_elem(&offcpu_targets, &prev_tgid)) {
		/* prev is still `current`: the stack helpers walk its stacks. */
		struct offcpu_start start = {
			.ts = now,
			.key = {
				.tgid = prev_tgid,
				.user_stack = stack_id(ctx, BPF_F_USER_STACK),
				.kernel_stack = stack_id(ctx, 0),
			},
		};
		bpf_get_current_comm(start.key.comm, sizeof(start.key.comm));
		__u32 tid = (__u32)prev->pid;
		bpf_map_update_elem(&offcpu_start, &tid, &start, BPF_ANY);
	}

	__u32 next_tgid = (__u32)next->tgid;
	if (!next_tgid || !bpf_map_lookup_elem(&offcpu_targets, &next_tgid))
		return 0;
	__u32 next_tid = (__u32)next->pid;
	struct offcpu_start *s = bpf_map_lookup_elem(&offcpu_start, &next_tid);
	if (!s)
		return 0;
	__u64 delta = now - s->ts;
	struct offcpu_key key = s->key;
	bpf_map_delete_elem(&offcpu_start, &next_tid);
	if ((__s64)delta < (__s64)min_ns)
		return 0;
	struct offcpu_val *v = bpf_map_lookup_elem(&offcpu_ns, &key);
	if (v) {
		__sync_fetch_and_add(&v->ns, delta);
		__sync_fetch_and_add(&v->count, 1);
		return 0;
	}
	struct offcpu_val init = { .ns = delta, .count = 1 };
	if (bpf_map_update_elem(&offcpu_ns, &key, &init, BPF_NOEXIST) != 0) {
		/* Full, or another CPU inserted it first: try adding once more. */
		v = bpf_map_lookup_elem(&offcpu_ns, &key);
		if (v) {
			__sync_fetch_and_add(&v->ns, delta);
			__sync_fetch_and_add(&v->count, 1);
		} else {
			lost(0);
		}
	}
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
