//! The profiler arena (kit::alloc): renewing pprof-rs's sample table inside it reuses the pages
//! of the table before it instead of faulting in ~80 MB of fresh ones.
//!
//! Its own test binary: it installs kit's allocator as a service does, and makes jemalloc's
//! ordinary arenas return free pages at once (as they do, after ten seconds, to a service whose
//! profiling session is renewed every few minutes).
#![allow(unsafe_code)]

#[global_allocator]
static ALLOC: kit::debug::Jemalloc = kit::debug::Jemalloc;

#[allow(non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
pub static malloc_conf: &u8 = &b"dirty_decay_ms:0,muzzy_decay_ms:0\0"[0];

/// Minor page faults of the calling thread so far (`/proc/thread-self/stat`, field 10).
fn minor_faults() -> u64 {
    let stat =
        std::fs::read_to_string("/proc/thread-self/stat").expect("read /proc/thread-self/stat");
    let after_comm = &stat[stat.rfind(')').expect("comm in stat") + 1..];
    after_comm
        .split_whitespace()
        .nth(7)
        .and_then(|f| f.parse().ok())
        .expect("minflt in stat")
}

fn start() -> pprof::ProfilerGuard<'static> {
    pprof::ProfilerGuardBuilder::default()
        .frequency(99)
        .build()
        .expect("start pprof-rs")
}

/// CPU time of the calling thread so far, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Page faults and CPU nanoseconds of one stop (which builds the next table) of a running
/// profiler.
fn cost_of_stop(guard: pprof::ProfilerGuard<'static>, in_arena: bool) -> (u64, u64) {
    let (faults, cpu) = (minor_faults(), thread_cpu_ns());
    if in_arena {
        kit::alloc::in_profiler_arena(|| drop(guard));
    } else {
        drop(guard);
    }
    (minor_faults() - faults, thread_cpu_ns() - cpu)
}

#[test]
fn renewing_the_profiler_in_its_arena_reuses_the_old_tables_pages() {
    // Outside the arena: each stop's new table lands in pages the previous free gave back.
    let _ = cost_of_stop(start(), false);
    let (plain, plain_ns) = cost_of_stop(start(), false);
    // Inside: the first stops fill the arena; from then on the table freed by one stop is
    // there for the next.
    for _ in 0..2 {
        let _ = cost_of_stop(kit::alloc::in_profiler_arena(start), true);
    }
    let mut stops: Vec<(u64, u64)> = (0..5)
        .map(|_| cost_of_stop(kit::alloc::in_profiler_arena(start), true))
        .collect();
    stops.sort_by_key(|&(_, ns)| ns);
    let (arena, arena_ns) = stops[stops.len() / 2];
    println!(
        "per stop: {plain} page faults and {:.2} ms of CPU plain; {arena} and {:.2} ms in the profiler arena (median of 5)",
        plain_ns as f64 / 1e6,
        arena_ns as f64 / 1e6
    );
    // 80 MB of 4 KiB pages is ~20,000 faults; less than half would mean the table is not
    // what this test (and docs/profiling.md) assumes.
    assert!(plain > 10_000, "a plain stop faulted only {plain} pages");
    assert!(
        arena * 10 < plain,
        "a stop in the profiler arena faulted {arena} pages, a plain one {plain}"
    );
    // Handing the pages back leaves the arena usable.
    kit::alloc::release_profiler_arena();
    let (again, _) = cost_of_stop(kit::alloc::in_profiler_arena(start), true);
    assert!(
        again > 10_000,
        "after release the next table must fault its pages in again: {again}"
    );
}
