//! Doubling delays between retries, cut short by shutdown. Every "retry until it works" loop
//! in the roles waits through this, so they all back off the same way.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

const FIRST_DELAY: Duration = Duration::from_millis(100);

/// The delay before retry number `retry` (0 for the first): `first`, doubled per retry, at
/// most `max`. The one doubling rule of every retry in the roles, whether a loop counts its
/// attempts ([`Backoff`]) or the intake counts its deliveries.
pub(crate) fn doubled(first: Duration, max: Duration, retry: u32) -> Duration {
    first
        .saturating_mul(2u32.saturating_pow(retry.min(31)))
        .min(max)
}

pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    retries: u32,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Self {
        Backoff::starting_at(FIRST_DELAY, max)
    }

    pub(crate) fn starting_at(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            retries: 0,
        }
    }

    /// How long the next wait will be, for the log line that announces it.
    pub(crate) fn delay(&self) -> Duration {
        doubled(self.first, self.max, self.retries)
    }

    /// Wait the current delay, then double the next one up to the maximum; `false` when
    /// shutdown came first.
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(self.delay()) => {}
        }
        self.retries = self.retries.saturating_add(1);
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

    #[test]
    fn the_doubling_rule_saturates_at_its_maximum() {
        let delays: Vec<_> = (0..6)
            .map(|retry| doubled(Duration::from_millis(25), Duration::from_millis(250), retry))
            .collect();
        assert_eq!(
            delays,
            [25, 50, 100, 200, 250, 250].map(Duration::from_millis)
        );
        assert_eq!(
            doubled(Duration::from_secs(1), Duration::from_secs(4), u32::MAX),
            Duration::from_secs(4)
        );
    }
}
