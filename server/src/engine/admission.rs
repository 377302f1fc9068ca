//! Start admission: the per-session limits on `start`, one rule over two
//! stores. The memory engine keeps each session's [`StartWindow`] in its
//! table; the Redis engine keeps the same window in Redis (sorted sets, one
//! script, so web processes share it). Both take their bounds and their
//! refusal texts from here.

use std::collections::VecDeque;
use std::time::Duration;

/// The window of the per-minute cap.
pub const START_WINDOW: Duration = Duration::from_secs(60);
/// A start still pending after this long is taken for dead (its process
/// died before the task service answered) and stops counting.
pub const PENDING_STALE: Duration = Duration::from_secs(60);

/// What one session may start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartLimits {
    /// `start`s admitted per [`START_WINDOW`].
    pub per_window: u64,
    /// Tasks not yet final, starts still waiting on the task service included.
    pub max_live: u64,
}

/// Why a start is refused (`too_many_tasks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("at most {0} tasks may be started per minute")]
    PerMinute(u64),
    #[error("at most {0} tasks may run at once in a session")]
    Live(u64),
}

/// The rule, given what the store counted: `recent` starts in the window,
/// `live` tasks not yet final and `pending` starts waiting on the service.
pub fn check(limits: StartLimits, recent: u64, live: u64, pending: u64) -> Result<(), Refusal> {
    if recent >= limits.per_window {
        return Err(Refusal::PerMinute(limits.per_window));
    }
    if live + pending >= limits.max_live {
        return Err(Refusal::Live(limits.max_live));
    }
    Ok(())
}

/// The memory store of one session's starts.
#[derive(Debug, Default)]
pub struct StartWindow {
    /// When its recent starts were admitted (ms), at most the cap.
    recent: VecDeque<u64>,
    /// Starts admitted and still waiting on the task service.
    pending: u64,
}

impl StartWindow {
    /// Admits one start at `now_ms` of a session with `live` tasks not yet
    /// final; an admitted start must be followed by [`StartWindow::done`].
    pub fn admit(&mut self, limits: StartLimits, now_ms: u64, live: u64) -> Result<(), Refusal> {
        let window_ms = START_WINDOW.as_millis() as u64;
        while self
            .recent
            .front()
            .is_some_and(|&t| now_ms.saturating_sub(t) >= window_ms)
        {
            self.recent.pop_front();
        }
        check(limits, self.recent.len() as u64, live, self.pending)?;
        self.recent.push_back(now_ms);
        self.pending += 1;
        Ok(())
    }

    /// An admitted start got its answer (task created, or refused).
    pub fn done(&mut self) {
        self.pending = self.pending.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: StartLimits = StartLimits {
        per_window: 3,
        max_live: 2,
    };

    #[test]
    fn live_and_pending_count_together() {
        let mut w = StartWindow::default();
        assert_eq!(w.admit(LIMITS, 0, 0), Ok(()));
        assert_eq!(w.admit(LIMITS, 0, 1), Err(Refusal::Live(2)));
        w.done();
        assert_eq!(w.admit(LIMITS, 1, 1), Ok(()));
    }

    #[test]
    fn the_window_slides() {
        let mut w = StartWindow::default();
        for t in 0..3 {
            assert_eq!(w.admit(LIMITS, t, 0), Ok(()));
            w.done();
        }
        assert_eq!(w.admit(LIMITS, 10, 0), Err(Refusal::PerMinute(3)));
        assert_eq!(w.admit(LIMITS, 60_000, 0), Ok(()));
        w.done();
        assert_eq!(
            Refusal::PerMinute(3).to_string(),
            "at most 3 tasks may be started per minute"
        );
    }
}
