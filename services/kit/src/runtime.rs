//! Where a service's main future runs.
//!
//! `#[tokio::main]` polls the future it wraps on the process's main thread, which is *not* one
//! of the runtime's workers: whenever that future waits on a socket (a PostgreSQL reply, an
//! AMQP delivery, an accepted connection), the worker whose I/O driver saw the socket become
//! ready has to wake the main thread through a futex, and the main thread goes back to sleep
//! after a few microseconds of work. Two context switches for every await, on the service's
//! busiest loop. [`on_workers`] spawns the future onto the runtime instead, so that the
//! worker that sees the socket ready runs it too.
//!
//! Measured on the lab at 100 orders/s (persistence consumes on its main future):
//! 2,715 -> ~1,750 context switches per second and 7.8 -> ~5.2 % of a CPU for persistence
//! (docs/persistence.md, "Threads and context switches").

use std::future::Future;

/// Runs `fut` as a task on the runtime's worker threads and waits for its output. A panic in
/// it comes back as an error (`JoinError`: "task ... panicked with message ...") instead of
/// unwinding through `main`.
pub async fn on_workers<F>(fut: F) -> Result<F::Output, tokio::task::JoinError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(fut).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_on_a_worker_and_returns_the_output() {
        let main = std::thread::current().id();
        let (thread, value) = on_workers(async { (std::thread::current().id(), 42) })
            .await
            .expect("task");
        assert_eq!(value, 42);
        assert_ne!(
            thread, main,
            "the future must run on a worker, not the caller's thread"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_is_an_error_naming_the_panic() {
        let err = on_workers(async { panic!("boom") }).await.unwrap_err();
        assert!(err.is_panic());
        assert!(err.to_string().contains("boom"), "{err}");
    }
}
