//! Graceful shutdown: SIGTERM or SIGINT starts a drain that every task can wait on.
//!
//! The order of a drain is the same in every service: stop accepting (the HTTP server stops
//! taking connections), finish in-flight work (handlers complete, batches commit, journals
//! flush), then `main` returns.

use tokio::sync::watch;

/// A cloneable handle to the process's drain signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        Shutdown {
            tx: std::sync::Arc::new(tx),
            rx,
        }
    }

    /// A handle that also triggers on SIGTERM or SIGINT. Must be called inside a runtime.
    pub fn on_signals() -> std::io::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        let s = Shutdown::new();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let trigger = s.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(
                signal = name,
                "draining: stop accepting, finish in-flight work"
            );
            trigger.trigger();
        });
        Ok(s)
    }

    /// Starts the drain.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once the drain has started (immediately if it already has).
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means every sender is gone, which cannot happen while `self` holds one.
        let _ = rx.wait_for(|t| *t).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_on_trigger() {
        let s = Shutdown::new();
        let w = s.clone();
        let task = tokio::spawn(async move { w.wait().await });
        assert!(!s.is_triggered());
        s.trigger();
        task.await.unwrap();
        assert!(s.is_triggered());
        // Waiting after the fact returns at once.
        s.wait().await;
    }
}
