//! Doubling delays between retries, cut short by shutdown. Every "retry until it works" loop
//! in the roles waits through this, so they all back off the same way.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

const FIRST_DELAY: Duration = Duration::from_millis(100);

pub(crate) struct Backoff {
    delay: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Self {
        Backoff {
            delay: FIRST_DELAY,
            max,
        }
    }

    /// How long the next wait will be, for the log line that announces it.
    pub(crate) fn delay(&self) -> Duration {
        self.delay
    }

    /// Wait the current delay, then double the next one up to the maximum; `false` when
    /// shutdown came first.
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(self.delay) => {}
        }
        self.delay = (self.delay * 2).min(self.max);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delays_double_up_to_the_maximum_and_shutdown_cuts_a_wait_short() {
        let shutdown = CancellationToken::new();
        let mut backoff = Backoff::new(Duration::from_millis(300));
        let mut delays = Vec::new();
        for _ in 0..3 {
            delays.push(backoff.delay());
            assert!(backoff.wait(&shutdown).await);
        }
        delays.push(backoff.delay());
        assert_eq!(delays, [100, 200, 300, 300].map(Duration::from_millis));
        shutdown.cancel();
        assert!(!backoff.wait(&shutdown).await);
    }
}
