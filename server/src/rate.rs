//! A token bucket, for every "at most N per second" limit (polls to the
//! task service, messages from a client). Pure: the caller passes the
//! time, so it is tested without a clock.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct TokenBucket {
    per_ms: f64,
    burst: f64,
    tokens: f64,
    last_ms: f64,
}

impl TokenBucket {
    /// `per_s` tokens a second, at most `burst` saved up (full at start).
    pub fn new(per_s: u64, burst: u64) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket {
            per_ms: per_s as f64 / 1000.0,
            burst,
            tokens: burst,
            last_ms: 0.0,
        }
    }

    /// Takes a token at `now_ms`, or says how long until one is there.
    pub fn take(&mut self, now_ms: f64) -> Result<(), Duration> {
        if now_ms > self.last_ms {
            self.tokens = (self.tokens + (now_ms - self.last_ms) * self.per_ms).min(self.burst);
            self.last_ms = now_ms;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait_ms = ((1.0 - self.tokens) / self.per_ms).ceil().max(1.0);
            Err(Duration::from_millis(wait_ms as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_the_rate() {
        let mut b = TokenBucket::new(1000, 10);
        for _ in 0..10 {
            assert!(b.take(0.0).is_ok());
        }
        assert_eq!(b.take(0.0), Err(Duration::from_millis(1)));
        assert!(b.take(1.0).is_ok());
        assert!(b.take(1.0).is_err());
        // A long pause saves up only the burst.
        let granted = (0..100).filter(|_| b.take(1_000_000.0).is_ok()).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn a_slow_rate_says_how_long_to_wait() {
        let mut b = TokenBucket::new(2, 1);
        assert!(b.take(0.0).is_ok());
        assert_eq!(b.take(0.0), Err(Duration::from_millis(500)));
        assert_eq!(b.take(250.0), Err(Duration::from_millis(250)));
        assert!(b.take(500.0).is_ok());
    }
}
