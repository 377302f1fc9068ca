//! What a task is and how it changes: pure functions over a [`Tracked`]
//! task (what a poll or a cancel learned → the next state and when to poll
//! again), the poll policy and the cadence jitter. A leaf: it imports
//! nothing of the server but the task-service shapes ([`crate::task_api`]),
//! so both engines, the pipeline and the tests build on it.

pub mod id;
pub mod jitter;
pub mod policy;

use crate::task_api::Status;
use app::protocol::{JsonText, Task, TaskState};
use policy::{Decision, Observed, PollPolicy};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Why a poll got no status, as far as a task's state is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PollError {
    /// The task service does not know the task (`404`).
    Lost,
    /// It could not be reached or answered out of contract: try later.
    Unreachable {
        reason: String,
        retry_after: Option<Duration>,
    },
}

/// A new task of `session`: its first state (`queued`, `seq` 0) under a
/// fresh id (in the session's partition, see [`id::new_task_id`]).
pub fn new_task(session: &str, kind: &str, params: Option<serde_json::Value>, now_ms: u64) -> Task {
    Task {
        id: id::new_task_id(session),
        kind: kind.to_string(),
        state: TaskState::Queued,
        done: 0,
        total: None,
        message: None,
        result: None,
        error: None,
        seq: 0,
        created_ms: now_ms,
        updated_ms: now_ms,
        params: params.map(JsonText::from),
    }
}

/// A task as the poll engine sees it: its state and what the engine
/// remembers between polls.
#[derive(Clone, Debug, PartialEq)]
pub struct Tracked {
    pub task: Task,
    pub track: Track,
}

/// What the engine remembers of a task between polls (kept beside the task
/// in Redis, so another worker carries on where a dead one stopped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Track {
    /// Since when (Unix ms) and after how many failed polls the task
    /// service has been unreachable for this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outage: Option<(u64, u32)>,
    /// The first `(done, changed_at_ms)` the task service reported: the
    /// adaptive cadence measures the rate of progress from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<(u64, u64)>,
}

/// The outcome of one transition: the task's next state, when it changed
/// (its `seq` not yet bumped: [`Tracked::commit`] does that), and what the
/// scheduler does next.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub next: Option<Task>,
    pub decision: Decision,
}

pub const LOST_TASK: &str = "the task service no longer knows this task";

impl Tracked {
    pub fn new(task: Task) -> Self {
        Tracked {
            task,
            track: Track::default(),
        }
    }

    /// Makes `next` the current state with the next `seq`.
    pub fn commit(&mut self, mut next: Task) -> &Task {
        next.seq = self.task.seq + 1;
        self.task = next;
        &self.task
    }

    /// A status the task service reported. A final task never changes
    /// again; an unchanged status changes nothing.
    pub fn on_status(
        &mut self,
        status: &Status,
        policy: &PollPolicy,
        now_ms: u64,
        jitter: f64,
    ) -> Step {
        self.track.outage = None;
        let (first_done, first_changed_at_ms) = *self
            .track
            .first_seen
            .get_or_insert((status.done, status.changed_at_ms));
        let mut next = None;
        if !self.task.state.is_final() {
            let candidate = Task {
                state: status.state,
                done: status.done,
                total: status.total,
                message: status.message.clone(),
                result: status.result.clone().map(JsonText::from),
                error: status.error.clone(),
                updated_ms: status.changed_at_ms,
                ..self.task.clone()
            };
            if candidate != self.task {
                next = Some(candidate);
            }
        }
        let shown = next.as_ref().unwrap_or(&self.task);
        let decision = if shown.state.is_final() {
            policy.after_success(true)
        } else if policy.adaptive {
            let seen = Observed {
                done: shown.done,
                total: shown.total,
                changed_at_ms: shown.updated_ms,
                first_done,
                first_changed_at_ms,
            };
            Decision::Poll(policy.next_poll(&seen, now_ms, jitter))
        } else {
            Decision::Tick(Duration::from_millis(policy.poll_interval_ms))
        };
        Step { next, decision }
    }

    /// A failed poll: the task keeps its state and says, in `message`, that
    /// the service is unreachable and when the next try is; past the
    /// give-up time it turns `failed`. `404` turns it `failed` at once.
    pub fn on_error(&mut self, error: &PollError, policy: &PollPolicy, now_ms: u64) -> Step {
        let (reason, retry_after) = match error {
            PollError::Lost => return self.fail(LOST_TASK.into(), policy, now_ms),
            PollError::Unreachable {
                reason,
                retry_after,
            } => (reason.clone(), *retry_after),
        };
        if self.task.state.is_final() {
            return Step {
                next: None,
                decision: policy.after_success(true),
            };
        }
        let (since_ms, failures) = self.track.outage.unwrap_or((now_ms, 0));
        let failures = failures + 1;
        self.track.outage = Some((since_ms, failures));
        match policy.after_failure(failures, now_ms.saturating_sub(since_ms), retry_after) {
            Decision::Poll(d) => Step {
                next: Some(Task {
                    message: Some(format!(
                        "the task service is unreachable ({reason}); next try in {:.1} s",
                        d.as_secs_f64()
                    )),
                    updated_ms: now_ms,
                    ..self.task.clone()
                }),
                decision: Decision::Poll(d),
            },
            Decision::GiveUp => self.fail(
                format!(
                    "the task service was unreachable for {} s ({reason}); gave up",
                    policy.give_up_ms / 1000
                ),
                policy,
                now_ms,
            ),
            other => Step {
                next: None,
                decision: other,
            },
        }
    }

    /// Turns a live task `failed` for a reason of the server's own.
    pub fn fail(&mut self, error: String, policy: &PollPolicy, now_ms: u64) -> Step {
        self.track.outage = None;
        let next = (!self.task.state.is_final()).then(|| Task {
            state: TaskState::Failed,
            message: None,
            error: Some(error),
            updated_ms: now_ms,
            ..self.task.clone()
        });
        Step {
            next,
            decision: policy.after_success(true),
        }
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
            give_up_ms: 10_000,
            retention_ms: 60_000,
        }
    }

    fn task() -> Task {
        Task {
            id: "t1".into(),
            kind: "simulate".into(),
            state: TaskState::Queued,
            done: 0,
            total: None,
            message: None,
            result: None,
            error: None,
            seq: 0,
            created_ms: 1_000,
            updated_ms: 1_000,
            params: None,
        }
    }

    fn status(state: TaskState, done: u64) -> Status {
        Status {
            id: "b1".into(),
            state,
            done,
            total: Some(10),
            message: None,
            result: None,
            error: None,
            changed_at_ms: 2_000,
        }
    }

    #[test]
    fn a_change_is_a_step_and_the_same_status_is_not() {
        let mut t = Tracked::new(task());
        let step = t.on_status(&status(TaskState::Running, 3), &policy(), 2_000, 0.0);
        let next = step.next.expect("changed");
        assert_eq!(next.done, 3);
        assert_eq!(step.decision, Decision::Tick(Duration::from_millis(500)));
        assert_eq!(t.commit(next).seq, 1);
        let again = t.on_status(&status(TaskState::Running, 3), &policy(), 2_500, 0.0);
        assert_eq!(again.next, None);
        assert_eq!(t.track.first_seen, Some((3, 2_000)));
    }

    #[test]
    fn a_final_task_never_changes_and_expires() {
        let mut t = Tracked::new(task());
        let next = t
            .on_status(&status(TaskState::Succeeded, 10), &policy(), 2_000, 0.0)
            .next
            .unwrap();
        t.commit(next);
        let step = t.on_status(&status(TaskState::Running, 1), &policy(), 3_000, 0.0);
        assert_eq!(step.next, None);
        assert_eq!(
            step.decision,
            Decision::Expire(Duration::from_millis(60_000))
        );
        assert_eq!(t.fail("x".into(), &policy(), 4_000).next, None);
    }

    #[test]
    fn outages_say_so_back_off_and_give_up() {
        let mut t = Tracked::new(task());
        let down = PollError::Unreachable {
            reason: "connection refused".into(),
            retry_after: None,
        };
        let first = t.on_error(&down, &policy(), 10_000);
        assert!(first.next.unwrap().message.unwrap().contains("unreachable"));
        assert_eq!(t.track.outage, Some((10_000, 1)));
        let late = t.on_error(&down, &policy(), 20_001);
        let failed = late.next.unwrap();
        assert_eq!(failed.state, TaskState::Failed);
        assert!(failed.error.unwrap().contains("gave up"));
        assert_eq!(t.track.outage, None);
    }

    #[test]
    fn a_lost_task_fails_at_once() {
        let mut t = Tracked::new(task());
        let step = t.on_error(&PollError::Lost, &policy(), 5_000);
        assert_eq!(step.next.unwrap().error.as_deref(), Some(LOST_TASK));
    }

    #[test]
    fn track_round_trips_as_compact_json() {
        let track = Track {
            outage: Some((5, 2)),
            first_seen: None,
        };
        let json = serde_json::to_string(&track).unwrap();
        assert_eq!(json, r#"{"outage":[5,2]}"#);
        assert_eq!(serde_json::from_str::<Track>(&json).unwrap(), track);
        assert_eq!(
            serde_json::from_str::<Track>("{}").unwrap(),
            Track::default()
        );
    }
}
