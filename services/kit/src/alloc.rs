//! The services' global allocator: jemalloc, plus an arena of its own for the CPU profiler's
//! sample tables.
//!
//! pprof-rs keeps its samples in a fixed table of about 80 MB (4,096 buckets of four 4 KB stack
//! keys, each bucket its own 20 KB allocation). Stopping the profiler builds a fresh table
//! before dropping the old one, so with jemalloc's defaults every renewal of a continuous
//! profiling session wrote 80 MB into freshly mapped pages (the old table's pages had long been
//! returned to the kernel): ~20,000 page faults, 40–60 ms of CPU each time, the largest single
//! cost of profiling continuously (docs/profiling.md). Allocations made inside
//! [`in_profiler_arena`] come from a jemalloc arena that never returns its free pages to the
//! kernel, so each new table reuses the pages of the table before it: 5–7 ms instead.
//! [`release_profiler_arena`] hands those pages back once profiling stops, so an idle process
//! keeps no more than before.
//!
//! A service makes it its allocator in `main.rs`:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: kit::debug::Jemalloc = kit::debug::Jemalloc;
//! ```
//!
//! Everything outside [`in_profiler_arena`] is plain `tikv_jemallocator::Jemalloc`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::{CString, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use tikv_jemalloc_sys as ffi;

/// jemalloc as the global allocator, routing the calling thread's allocations to the profiler
/// arena while it runs [`in_profiler_arena`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Jemalloc;

thread_local! {
    /// `MALLOCX_ARENA` flags of the arena this thread allocates from; 0: jemalloc's choice.
    /// A const-initialized `Cell` without a destructor: reading it never allocates.
    static ROUTE: Cell<i32> = const { Cell::new(0) };
}

/// jemalloc's `MALLOCX_ARENA(a)`.
fn arena_flags(arena: u32) -> i32 {
    ((arena as i32) + 1) << 20
}

/// Threads inside [`in_profiler_arena`] right now. Every allocation of the process asks
/// [`routed`]; while this is 0 (nearly always) the answer is one load of a shared, read-mostly
/// word, without touching the thread-local.
static ROUTING: AtomicUsize = AtomicUsize::new(0);

/// The extra `mallocx` flags for this thread's allocations, or `None` for the plain path.
#[inline(always)]
fn routed(layout: &Layout) -> Option<i32> {
    if ROUTING.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let route = ROUTE.try_with(Cell::get).unwrap_or(0);
    if route == 0 {
        return None;
    }
    // The cache would hand these blocks to other allocations of the thread later: bypass it.
    let mut flags = route | ffi::MALLOCX_TCACHE_NONE;
    // As tikv_jemallocator does: alignment flags only when malloc's own is not enough.
    if layout.align() > 16 || layout.align() > layout.size() {
        flags |= layout.align().trailing_zeros() as i32;
    }
    Some(flags)
}

// SAFETY: every path hands the request to jemalloc, which upholds GlobalAlloc's contract; a
// block from either path may be freed or resized by the other (jemalloc finds its arena from
// the address).
unsafe impl GlobalAlloc for Jemalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match routed(&layout) {
            None => unsafe { tikv_jemallocator::Jemalloc.alloc(layout) },
            Some(flags) => unsafe { ffi::mallocx(layout.size(), flags).cast() },
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match routed(&layout) {
            None => unsafe { tikv_jemallocator::Jemalloc.alloc_zeroed(layout) },
            Some(flags) => unsafe { ffi::mallocx(layout.size(), flags | ffi::MALLOCX_ZERO).cast() },
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { tikv_jemallocator::Jemalloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align(new_size, layout.align()).ok();
        match new.as_ref().and_then(routed) {
            None => unsafe { tikv_jemallocator::Jemalloc.realloc(ptr, layout, new_size) },
            Some(flags) => unsafe { ffi::rallocx(ptr.cast::<c_void>(), new_size, flags).cast() },
        }
    }
}

/// Reads or writes one `mallctl` value; `Err` with jemalloc's error number.
unsafe fn mallctl(
    name: &str,
    old: *mut c_void,
    old_len: *mut usize,
    new: *mut c_void,
    new_len: usize,
) -> Result<(), String> {
    let c_name = CString::new(name).map_err(|e| e.to_string())?;
    match unsafe { ffi::mallctl(c_name.as_ptr(), old, old_len, new, new_len) } {
        0 => Ok(()),
        errno => Err(format!("mallctl {name}: error {errno}")),
    }
}

/// The profiler arena's index, created on first use with page purging turned off; `None` when
/// jemalloc refused (then everything takes the plain path).
fn profiler_arena() -> Option<u32> {
    static ARENA: OnceLock<Option<u32>> = OnceLock::new();
    *ARENA.get_or_init(|| {
        let create = || -> Result<u32, String> {
            let mut index: u32 = 0;
            let mut len = size_of::<u32>();
            unsafe {
                mallctl(
                    "arenas.create",
                    (&raw mut index).cast(),
                    &raw mut len,
                    std::ptr::null_mut(),
                    0,
                )?;
                // -1: never purge on a timer; unused pages stay mapped for the next table.
                for kind in ["dirty", "muzzy"] {
                    let mut never: isize = -1;
                    mallctl(
                        &format!("arena.{index}.{kind}_decay_ms"),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        (&raw mut never).cast(),
                        size_of::<isize>(),
                    )?;
                }
            }
            Ok(index)
        };
        create()
            .inspect_err(|e| tracing::warn!(error = %e, "no arena for the profiler's tables"))
            .ok()
    })
}

/// Runs `f` with the calling thread's allocations served by the profiler arena (see the
/// module documentation). Only allocations the process makes through [`Jemalloc`] as its
/// global allocator are routed; elsewhere this just runs `f`.
pub fn in_profiler_arena<R>(f: impl FnOnce() -> R) -> R {
    let Some(arena) = profiler_arena() else {
        return f();
    };
    struct Restore(i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = ROUTE.try_with(|r| r.set(self.0));
            ROUTING.fetch_sub(1, Ordering::Relaxed);
        }
    }
    // Counted before the thread-local is set: this thread's own allocations see both.
    ROUTING.fetch_add(1, Ordering::Relaxed);
    let _restore = Restore(ROUTE.with(|r| r.replace(arena_flags(arena))));
    f()
}

/// Returns the profiler arena's unused pages to the kernel (when profiling stops: the next
/// session's first table faults its pages in again, once).
pub fn release_profiler_arena() {
    let Some(arena) = profiler_arena() else {
        return;
    };
    let purged = unsafe {
        mallctl(
            &format!("arena.{arena}.purge"),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if let Err(e) = purged {
        tracing::warn!(error = %e, "could not release the profiler arena's pages");
    }
}
