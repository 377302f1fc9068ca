//! One clock for the whole server: Unix epoch milliseconds that advance with
//! tokio's clock, so `tokio::time::pause()` / `advance()` drive the scheduler,
//! the embedded simulator and `updated_ms` together in tests.

use std::time::{SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base_ms: u64,
    base: Instant,
}

impl Clock {
    pub fn new() -> Self {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            base_ms,
            base: Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
