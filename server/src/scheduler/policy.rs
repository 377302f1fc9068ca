//! When to poll next: pure functions of what the last poll saw and the
//! configured bounds, tested without clocks or sockets.

use std::time::Duration;

/// Longest wait between two tries while the task service is unreachable.
pub const MAX_BACKOFF_MS: u64 = 30_000;

#[derive(Clone, Debug)]
pub struct PollPolicy {
    /// Cadence of polls of a live task.
    pub poll_interval_ms: u64,
    /// After this long unreachable, a task turns `failed`.
    pub give_up_ms: u64,
    /// How long a finished task stays listed.
    pub retention_ms: u64,
}

/// What the scheduler does with a task after a poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Poll again after this delay.
    Poll(Duration),
    /// Final: forget it after the retention.
    Expire(Duration),
    /// The task service stayed unreachable past the give-up time.
    GiveUp,
    /// The task is gone from the hub: nothing to do.
    Drop,
}

impl PollPolicy {
    pub fn after_success(&self, is_final: bool) -> Decision {
        if is_final {
            Decision::Expire(Duration::from_millis(self.retention_ms))
        } else {
            Decision::Poll(Duration::from_millis(self.poll_interval_ms))
        }
    }

    /// After the `failures`-th failed poll in a row (1-based), the outage having
    /// begun `outage_ms` ago: exponential backoff from the poll interval up to
    /// [`MAX_BACKOFF_MS`], never sooner than the service's `Retry-After`, and
    /// a give-up once the outage lasts `give_up_ms`.
    pub fn after_failure(
        &self,
        failures: u32,
        outage_ms: u64,
        retry_after: Option<Duration>,
    ) -> Decision {
        if outage_ms >= self.give_up_ms {
            return Decision::GiveUp;
        }
        let exp = failures.saturating_sub(1).min(20);
        let backoff = self
            .poll_interval_ms
            .saturating_mul(1 << exp)
            .min(MAX_BACKOFF_MS.max(self.poll_interval_ms));
        let mut delay = Duration::from_millis(backoff);
        if let Some(ra) = retry_after {
            delay = delay.max(ra);
        }
        // Never wait past the give-up moment: the task fails on time.
        let left = Duration::from_millis(self.give_up_ms - outage_ms);
        Decision::Poll(delay.min(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PollPolicy {
        PollPolicy {
            poll_interval_ms: 500,
            give_up_ms: 300_000,
            retention_ms: 600_000,
        }
    }

    #[test]
    fn live_tasks_poll_at_the_interval_and_final_ones_expire() {
        assert_eq!(
            policy().after_success(false),
            Decision::Poll(Duration::from_millis(500))
        );
        assert_eq!(
            policy().after_success(true),
            Decision::Expire(Duration::from_secs(600))
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_ceiling() {
        let delays: Vec<_> = (1..=9)
            .map(|n| match policy().after_failure(n, 0, None) {
                Decision::Poll(d) => d.as_millis() as u64,
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn retry_after_is_honoured_and_give_up_is_on_time() {
        assert_eq!(
            policy().after_failure(1, 0, Some(Duration::from_secs(7))),
            Decision::Poll(Duration::from_secs(7))
        );
        assert_eq!(
            policy().after_failure(9, 299_000, None),
            Decision::Poll(Duration::from_secs(1))
        );
        assert_eq!(policy().after_failure(9, 300_000, None), Decision::GiveUp);
    }
}
