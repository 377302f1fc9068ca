//! When a failed delivery is tried again: exponential backoff with full
//! jitter (uniform over `[0, cap]`, the cap doubling from
//! `retry_initial_ms` up to `retry_max_ms`), and never past the give-up
//! time, where one last attempt is made. Pure: time and the random unit
//! are arguments.

/// What follows a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Try again at this Unix ms.
    RetryAt(u64),
    /// The give-up time has passed: drop the delivery.
    GiveUp,
}

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub give_up_ms: u64,
}

impl Schedule {
    /// The cap of the `failures`-th retry (1 for the first):
    /// `initial × 2^(failures−1)`, at most `max_ms`.
    pub fn cap_ms(&self, failures: u32) -> u64 {
        let shift = failures.saturating_sub(1).min(63);
        self.initial_ms
            .saturating_mul(1u64 << shift)
            .min(self.max_ms.max(self.initial_ms))
    }

    /// After the `failures`-th failed attempt at `now_ms` of a delivery
    /// first tried at `first_ms`; `unit` is uniform in [0, 1).
    pub fn next(&self, first_ms: u64, now_ms: u64, failures: u32, unit: f64) -> Next {
        let deadline = first_ms.saturating_add(self.give_up_ms);
        if now_ms >= deadline {
            return Next::GiveUp;
        }
        let cap = self.cap_ms(failures);
        // Inclusive of the cap: `unit` < 1, so scale over cap + 1.
        let delay = ((cap as f64 + 1.0) * unit.clamp(0.0, 1.0)) as u64;
        Next::RetryAt(now_ms.saturating_add(delay.min(cap)).min(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Schedule = Schedule {
        initial_ms: 1000,
        max_ms: 60_000,
        give_up_ms: 86_400_000,
    };

    #[test]
    fn the_cap_doubles_up_to_the_max() {
        let caps: Vec<u64> = (1..=8).map(|n| S.cap_ms(n)).collect();
        assert_eq!(
            caps,
            [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
        assert_eq!(S.cap_ms(10_000), 60_000);
    }

    #[test]
    fn delays_stay_within_zero_and_the_cap() {
        let mut j = crate::task::jitter::Jitter::new();
        for failures in 1..=20 {
            let cap = S.cap_ms(failures);
            let mut seen_low = false;
            let mut seen_high = false;
            for _ in 0..2000 {
                let Next::RetryAt(at) = S.next(0, 5_000, failures, j.unit()) else {
                    panic!("gave up early");
                };
                let d = at - 5_000;
                assert!(d <= cap, "{failures}: {d} > {cap}");
                seen_low |= d < cap / 4;
                seen_high |= d > cap * 3 / 4;
            }
            assert!(seen_low && seen_high, "{failures}: not spread");
        }
        assert_eq!(S.next(0, 5_000, 1, 0.0), Next::RetryAt(5_000));
        assert_eq!(S.next(0, 5_000, 1, 0.999_999_9), Next::RetryAt(6_000));
    }

    #[test]
    fn gives_up_after_one_last_attempt_at_the_deadline() {
        let s = Schedule {
            give_up_ms: 10_000,
            ..S
        };
        assert_eq!(s.next(100, 9_900, 9, 0.9), Next::RetryAt(10_100));
        assert_eq!(s.next(100, 10_100, 10, 0.0), Next::GiveUp);
        let none = Schedule { give_up_ms: 0, ..S };
        assert_eq!(none.next(100, 100, 1, 0.5), Next::GiveUp);
    }
}
