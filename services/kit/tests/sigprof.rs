//! `kit::sigprof` against a real SIGPROF handler: in a test binary of its own, because it
//! replaces the process's SIGPROF handler, which the CPU profiler tests elsewhere use.

#![allow(unsafe_code)]

use kit::sigprof::{totals, wrap};
use std::sync::atomic::{AtomicU64, Ordering};

type SigAction = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// A stand-in for pprof-rs's handler: counts its calls.
static CALLS: AtomicU64 = AtomicU64::new(0);
extern "C" fn counting(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    CALLS.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn the_wrapper_times_the_handler_it_wraps_and_is_installed_once() {
    // Nothing to wrap yet: refused.
    // SAFETY: setting SIGPROF to ignored; no other test in this binary touches it.
    unsafe { libc::signal(libc::SIGPROF, libc::SIG_IGN) };
    assert!(!wrap(), "no handler, no wrapper");

    // SAFETY: installs a SA_SIGINFO handler of the right signature for SIGPROF.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = counting as SigAction as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    assert_eq!(
        unsafe { libc::sigaction(libc::SIGPROF, &action, std::ptr::null_mut()) },
        0
    );
    assert!(wrap(), "the wrapper goes in front of a SA_SIGINFO handler");
    assert!(wrap(), "a second wrap sees the wrapper and leaves it");
    let (ns0, runs0) = totals();
    for _ in 0..5 {
        // SAFETY: raising a signal whose handler is installed above.
        assert_eq!(unsafe { libc::raise(libc::SIGPROF) }, 0);
    }
    let (ns1, runs1) = totals();
    assert_eq!(
        CALLS.load(Ordering::Relaxed),
        5,
        "the wrapped handler ran each time"
    );
    assert_eq!(runs1 - runs0, 5, "each run was counted");
    assert!(ns1 > ns0, "and timed");
    // The flags were kept: still SA_SIGINFO (and SA_RESTART).
    let mut now: libc::sigaction = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::sigaction(libc::SIGPROF, std::ptr::null(), &mut now) },
        0
    );
    assert_ne!(now.sa_flags & libc::SA_SIGINFO, 0);
    assert_ne!(now.sa_flags & libc::SA_RESTART, 0);
    unsafe { libc::signal(libc::SIGPROF, libc::SIG_IGN) };
}
