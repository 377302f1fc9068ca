//! When to poll next: pure functions of what the last poll saw and the
//! configured bounds, tested without clocks or sockets.

use std::time::Duration;

/// Longest wait between two tries while the task service is unreachable.
pub const MAX_BACKOFF_MS: u64 = 30_000;

/// Fraction of a delay that jitter may take off, so tasks started together
/// drift apart instead of polling in lock-step.
pub const JITTER_FRACTION: f64 = 0.1;
/// How long after a predicted change the poll lands, to be past it.
pub const PREDICTION_MARGIN_MS: u64 = 5;

#[derive(Clone, Debug)]
pub struct PollPolicy {
    /// Cadence of polls of a live task; with `adaptive`, the ceiling.
    pub poll_interval_ms: u64,
    /// With `adaptive`, never poll a task more often than this.
    pub poll_min_ms: u64,
    /// Poll sooner when a step or the end is due (and add jitter).
    pub adaptive: bool,
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
    /// Fixed cadence: poll again this long after the previous poll was
    /// *due* (not after it answered), so a slow answer does not push every
    /// later tick back; a missed tick is polled at once, never twice.
    Tick(Duration),
    /// Final: forget it after the retention.
    Expire(Duration),
    /// The task service stayed unreachable past the give-up time.
    GiveUp,
    /// The task is gone: nothing to do.
    Drop,
}

/// Where a task's next poll goes once a change is committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextDue {
    /// Due at this Unix ms.
    At(u64),
    /// Final (or gone): out of the queue, expires after the retention.
    Final,
    /// Leave the queue entry as it is (a `cancel` that left the task running).
    Keep,
}

impl Decision {
    /// The one "next due" rule of both engines, for a poll that was due at
    /// `due_ms` and answered at `now_ms`. Fixed cadence ticks from the due
    /// time, so a slow answer does not push every later tick back; a missed
    /// tick is due at once, never twice.
    ///
    /// `phase`: the tick moves to the nearest instant that is `phase`
    /// modulo the interval (at most half an interval sooner or later, once:
    /// then it stays there), so tasks given the same phase (a session's)
    /// are due at the same instants: their polls go out together and their
    /// updates reach the client in one write.
    pub fn next_due(self, due_ms: u64, now_ms: u64, phase: Option<u64>) -> NextDue {
        match self {
            Decision::Poll(d) => NextDue::At(now_ms + d.as_millis() as u64),
            Decision::Tick(i) => {
                let i = i.as_millis() as u64;
                let mut at = due_ms + i;
                if let (Some(phase), true) = (phase, i > 0) {
                    // How far `at` is past its phase: back that much, or on
                    // to the next, whichever is nearer.
                    let past = (at + i - phase % i) % i;
                    at = if past <= i / 2 {
                        at - past
                    } else {
                        at + (i - past)
                    };
                }
                NextDue::At(at.max(now_ms))
            }
            Decision::Expire(_) | Decision::GiveUp | Decision::Drop => NextDue::Final,
        }
    }
}

/// What the polls so far saw of a task's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    pub done: u64,
    pub total: Option<u64>,
    /// When `done` was reached (the service's `changed_at_ms`).
    pub changed_at_ms: u64,
    /// The first progress seen, to measure the rate from.
    pub first_done: u64,
    pub first_changed_at_ms: u64,
}

impl PollPolicy {
    pub fn after_success(&self, is_final: bool) -> Decision {
        if is_final {
            Decision::Expire(Duration::from_millis(self.retention_ms))
        } else {
            Decision::Poll(Duration::from_millis(self.poll_interval_ms))
        }
    }

    /// The next poll of a live task seen at `now_ms`; `jitter` is uniform in
    /// [0, 1). Fixed: the interval. Adaptive: from the observed rate, poll
    /// just after the next step when steps are sparser than the interval, or
    /// just after the end when it falls within the interval; otherwise the
    /// interval. Always within [`poll_min_ms`, `poll_interval_ms`], jitter
    /// only ever making it sooner.
    pub fn next_poll(&self, seen: &Observed, now_ms: u64, jitter: f64) -> Duration {
        let ceiling = self.poll_interval_ms;
        if !self.adaptive {
            return Duration::from_millis(ceiling);
        }
        let floor = self.poll_min_ms.min(ceiling);
        let steps = seen.done.saturating_sub(seen.first_done);
        let span = seen.changed_at_ms.saturating_sub(seen.first_changed_at_ms);
        let mut delay = ceiling as f64;
        if steps > 0 && span > 0 {
            let ms_per_step = span as f64 / steps as f64;
            let target = if ms_per_step >= ceiling as f64 {
                // Sparse steps: the next one is the next change worth seeing.
                Some(seen.changed_at_ms as f64 + ms_per_step)
            } else {
                // Dense steps: every poll sees a change; only the end matters.
                seen.total.map(|t| {
                    seen.changed_at_ms as f64 + t.saturating_sub(seen.done) as f64 * ms_per_step
                })
            };
            if let Some(at) = target {
                let until = at + PREDICTION_MARGIN_MS as f64 - now_ms as f64;
                delay = delay.min(until);
            }
        }
        delay *= 1.0 - JITTER_FRACTION * jitter.clamp(0.0, 1.0);
        Duration::from_millis(delay.clamp(floor as f64, ceiling as f64) as u64)
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
            poll_min_ms: 100,
            adaptive: false,
            give_up_ms: 300_000,
            retention_ms: 600_000,
        }
    }

    #[test]
    fn the_next_due_rule_ticks_from_the_due_time() {
        let tick = Decision::Tick(Duration::from_millis(500));
        assert_eq!(tick.next_due(1_000, 1_100, None), NextDue::At(1_500));
        // Answered after the next tick was due: at once, not twice.
        assert_eq!(tick.next_due(1_000, 2_300, None), NextDue::At(2_300));
        let poll = Decision::Poll(Duration::from_millis(200));
        assert_eq!(poll.next_due(1_000, 1_100, Some(7)), NextDue::At(1_300));
        assert_eq!(
            Decision::Expire(Duration::ZERO).next_due(0, 5, None),
            NextDue::Final
        );
    }

    #[test]
    fn a_phase_moves_a_tick_once_to_the_nearest_instant_of_the_phase() {
        let tick = Decision::Tick(Duration::from_millis(500));
        // 1_500 is 0 past phase 0: stays; then every 500.
        assert_eq!(tick.next_due(1_000, 1_010, Some(0)), NextDue::At(1_500));
        // Phase 100 (≡ 600): 1_500 is 400 past 1_100, 100 before 1_600.
        assert_eq!(tick.next_due(1_000, 1_010, Some(600)), NextDue::At(1_600));
        // Phase 300: 1_500 is 200 past 1_300: back to it.
        assert_eq!(tick.next_due(1_000, 1_010, Some(300)), NextDue::At(1_300));
        // Once on the phase, a tick is the interval.
        assert_eq!(tick.next_due(1_300, 1_310, Some(300)), NextDue::At(1_800));
        // Never before now.
        assert_eq!(tick.next_due(1_000, 1_400, Some(300)), NextDue::At(1_400));
        // Two tasks of one phase started apart end up due together.
        let (a, b) = (
            tick.next_due(10_020, 10_030, Some(42)),
            tick.next_due(10_390, 10_400, Some(42)),
        );
        let (NextDue::At(a), NextDue::At(b)) = (a, b) else {
            panic!("{a:?} {b:?}")
        };
        assert_eq!((a % 500, b % 500), (42, 42));
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

    fn adaptive() -> PollPolicy {
        PollPolicy {
            adaptive: true,
            ..policy()
        }
    }

    fn seen(done: u64, total: u64, changed_at_ms: u64) -> Observed {
        Observed {
            done,
            total: Some(total),
            changed_at_ms,
            first_done: 0,
            first_changed_at_ms: 0,
        }
    }

    fn ms(d: Duration) -> u64 {
        d.as_millis() as u64
    }

    #[test]
    fn fixed_cadence_ignores_progress_and_jitter() {
        assert_eq!(ms(policy().next_poll(&seen(5, 100, 500), 520, 0.9)), 500);
    }

    #[test]
    fn adaptive_without_a_rate_polls_at_the_ceiling() {
        assert_eq!(ms(adaptive().next_poll(&seen(0, 100, 0), 10, 0.0)), 500);
    }

    #[test]
    fn dense_steps_poll_at_the_ceiling_until_the_end_is_near() {
        // 100 steps over 10 s: a step every 100 ms, end at 10 000.
        assert_eq!(
            ms(adaptive().next_poll(&seen(50, 100, 5_000), 5_020, 0.0)),
            500
        );
        // At 9 700 with done 97 the end is due in ~300 ms: poll just after it.
        assert_eq!(
            ms(adaptive().next_poll(&seen(97, 100, 9_700), 9_710, 0.0)),
            295
        );
    }

    #[test]
    fn sparse_steps_poll_just_after_the_next_one() {
        // 10 steps over 20 s: a step every 2 s; the next after 4 000 is at 6 000.
        assert_eq!(
            ms(adaptive().next_poll(&seen(2, 10, 4_000), 5_700, 0.0)),
            305
        );
        // Far from the next step: the ceiling.
        assert_eq!(
            ms(adaptive().next_poll(&seen(2, 10, 4_000), 4_100, 0.0)),
            500
        );
    }

    #[test]
    fn never_below_the_floor_and_jitter_only_makes_it_sooner() {
        assert_eq!(
            ms(adaptive().next_poll(&seen(99, 100, 9_900), 9_990, 0.0)),
            100
        );
        let d = ms(adaptive().next_poll(&seen(50, 100, 5_000), 5_020, 0.99));
        assert!((450..500).contains(&d), "{d}");
    }
}
