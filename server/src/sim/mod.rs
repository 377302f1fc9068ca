//! The task service's simulator: the store of `simulate` tasks, whose
//! progress is a pure function of their start time and the instant the
//! caller passes in ([`spec`]; the task-service API of docs/protocol.md).
//! No I/O, no timers, no clock reads: `http` serves it with the wall clock,
//! tests drive it with chosen instants.

pub mod http;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use app::protocol::TaskState;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::task_api::Status;

pub use spec::{
    progress_at, Progress, SimError, SimSpec, KIND_SIMULATE, MAX_DURATION_MS, MAX_STEPS,
};

/// Most tasks held at once, finished ones included; beyond it `start` is
/// refused with [`SimError::Full`] (HTTP 503).
pub const MAX_TASKS: usize = 1_000_000;
/// How long a finished task is still served after it finished, in ms.
pub const RETENTION_MS: u64 = 60 * 60 * 1000;
/// Expired tasks forgotten per `start`, at most. More than one, so pruning
/// outpaces the one task each start adds; bounded, so a start after a quiet
/// hour does not hold the lock while thousands of tasks are dropped.
const PRUNE_PER_START: usize = 8;
/// Random bytes in a task id (shown as twice as many hex chars).
const ID_BYTES: usize = 8;

/// The counters `GET /stats` shows, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Tasks held now, finished ones included.
    pub tasks: u64,
    /// Status requests (`GET /tasks/{id}`), unknown ids included.
    pub polls: u64,
    /// Tasks started.
    pub starts: u64,
    /// Cancel requests that found their task, finished or not.
    pub cancels: u64,
}

/// One task as the simulator holds it: its spec and start, never a snapshot
/// of its progress (that is computed on each request).
#[derive(Clone, Debug)]
struct SimTask {
    spec: SimSpec,
    start_ms: u64,
    /// `(done, at_ms)` once cancelled while running.
    cancelled: Option<(u64, u64)>,
    polls: u64,
}

impl SimTask {
    fn progress(&self, now_ms: u64) -> Progress {
        match self.cancelled {
            Some((done, at_ms)) => Progress {
                state: TaskState::Cancelled,
                done,
                changed_at_ms: at_ms,
            },
            None => progress_at(&self.spec, self.start_ms, now_ms),
        }
    }

    /// When the task is forgotten: `retention_ms` after it finished (or
    /// will finish, since that instant is known at start).
    fn expires_at_ms(&self, retention_ms: u64) -> u64 {
        let finished_ms = match self.cancelled {
            Some((_, at_ms)) => at_ms,
            None => self.start_ms.saturating_add(self.spec.natural_end_ms()),
        };
        finished_ms.saturating_add(retention_ms)
    }

    fn status(&self, id: &str, now_ms: u64) -> Status {
        let progress = self.progress(now_ms);
        let result =
            (progress.state == TaskState::Succeeded).then(|| json!({ "steps": self.spec.steps }));
        let error = match (progress.state, self.spec.fail_at) {
            (TaskState::Failed, Some(fail_at)) => {
                Some(format!("simulated failure at step {fail_at}"))
            }
            _ => None,
        };
        Status {
            id: id.to_owned(),
            state: progress.state,
            done: progress.done,
            total: Some(self.spec.steps),
            message: None,
            result,
            error,
            changed_at_ms: progress.changed_at_ms,
        }
    }
}

/// The tasks and an index of them by expiry, so pruning pops only what has
/// expired instead of scanning every task.
#[derive(Default)]
struct Tasks {
    by_id: HashMap<String, SimTask>,
    /// `(expires_at_ms, id)` of every task in `by_id`, exactly once each.
    by_expiry: BTreeSet<(u64, String)>,
}

impl Tasks {
    /// Forgets up to `limit` tasks that expired at or before `now_ms`.
    fn prune(&mut self, now_ms: u64, limit: usize) {
        for _ in 0..limit {
            if self.by_expiry.first().is_none_or(|(at, _)| *at > now_ms) {
                break;
            }
            if let Some((_, id)) = self.by_expiry.pop_first() {
                self.by_id.remove(&id);
            }
        }
    }

    fn forget(&mut self, id: &str, expires_at_ms: u64) {
        self.by_id.remove(id);
        self.by_expiry.remove(&(expires_at_ms, id.to_owned()));
    }
}

/// The simulator: a handle shared by every request (wrap it in an `Arc`).
pub struct Simulator {
    // A std Mutex, not tokio's: every critical section is a few map
    // operations and arithmetic, and none is held across an `.await`, so
    // blocking briefly is cheaper than an async lock's bookkeeping.
    tasks: Mutex<Tasks>,
    max_tasks: usize,
    retention_ms: u64,
    polls: AtomicU64,
    starts: AtomicU64,
    cancels: AtomicU64,
}

impl Default for Simulator {
    fn default() -> Self {
        Simulator::new()
    }
}

impl Simulator {
    /// A simulator with the default bounds, [`MAX_TASKS`] and [`RETENTION_MS`].
    pub fn new() -> Self {
        Simulator::with_limits(MAX_TASKS, RETENTION_MS)
    }

    /// A simulator holding at most `max_tasks` tasks, forgetting finished
    /// ones `retention_ms` after they finished.
    pub fn with_limits(max_tasks: usize, retention_ms: u64) -> Self {
        Simulator {
            tasks: Mutex::new(Tasks::default()),
            max_tasks,
            retention_ms,
            polls: AtomicU64::new(0),
            starts: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tasks> {
        // No critical section can panic halfway through an update that
        // matters (pruning tolerates a missing task), so a poisoned lock's
        // data is still good.
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a task at `now_ms` and returns its id.
    pub fn start(&self, kind: &str, params: &Value, now_ms: u64) -> Result<String, SimError> {
        if kind != KIND_SIMULATE {
            return Err(SimError::UnknownKind(kind.to_owned()));
        }
        let spec = SimSpec::from_params(params)?;
        let task = SimTask {
            spec,
            start_ms: now_ms,
            cancelled: None,
            polls: 0,
        };
        let expires_at_ms = task.expires_at_ms(self.retention_ms);
        let mut id = new_id();
        let mut tasks = self.lock();
        tasks.prune(now_ms, PRUNE_PER_START);
        // Full only if fewer than PRUNE_PER_START tasks had expired (else
        // the prune made room), i.e. only if every expired task is gone.
        if tasks.by_id.len() >= self.max_tasks {
            return Err(SimError::Full);
        }
        while tasks.by_id.contains_key(&id) {
            id = new_id();
        }
        tasks.by_expiry.insert((expires_at_ms, id.clone()));
        tasks.by_id.insert(id.clone(), task);
        drop(tasks);
        self.starts.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Takes back a task this simulator started before a restart (the
    /// embedded simulator lives in taskwire's process, so taskwire's durable
    /// store is its memory too): same id, same spec, same start, so it
    /// carries on where wall-clock time has brought it. An id already known
    /// is left alone.
    pub fn restore(
        &self,
        id: &str,
        kind: &str,
        params: &Value,
        start_ms: u64,
    ) -> Result<(), SimError> {
        if kind != KIND_SIMULATE {
            return Err(SimError::UnknownKind(kind.to_owned()));
        }
        let spec = SimSpec::from_params(params)?;
        let task = SimTask {
            spec,
            start_ms,
            cancelled: None,
            polls: 0,
        };
        let expires_at_ms = task.expires_at_ms(self.retention_ms);
        let mut tasks = self.lock();
        if tasks.by_id.len() >= self.max_tasks {
            return Err(SimError::Full);
        }
        if !tasks.by_id.contains_key(id) {
            tasks.by_expiry.insert((expires_at_ms, id.to_owned()));
            tasks.by_id.insert(id.to_owned(), task);
        }
        Ok(())
    }

    /// The task's status at `now_ms`, or `None` if unknown or forgotten.
    /// Counts as a poll.
    pub fn status(&self, id: &str, now_ms: u64) -> Option<Status> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        let mut tasks = self.lock();
        let task = tasks.by_id.get_mut(id)?;
        let expires_at_ms = task.expires_at_ms(self.retention_ms);
        if expires_at_ms <= now_ms {
            tasks.forget(id, expires_at_ms);
            return None;
        }
        task.polls += 1;
        Some(task.status(id, now_ms))
    }

    /// Cancels the task at `now_ms` if it is still running (it keeps the
    /// `done` it had then); a finished task is returned unchanged. `None` if
    /// unknown or forgotten.
    pub fn cancel(&self, id: &str, now_ms: u64) -> Option<Status> {
        let mut tasks = self.lock();
        let task = tasks.by_id.get_mut(id)?;
        let expires_at_ms = task.expires_at_ms(self.retention_ms);
        if expires_at_ms <= now_ms {
            tasks.forget(id, expires_at_ms);
            return None;
        }
        let progress = task.progress(now_ms);
        if !progress.state.is_final() {
            task.cancelled = Some((progress.done, now_ms));
        }
        let status = task.status(id, now_ms);
        let new_expires_at_ms = task.expires_at_ms(self.retention_ms);
        if new_expires_at_ms != expires_at_ms {
            tasks.by_expiry.remove(&(expires_at_ms, id.to_owned()));
            tasks.by_expiry.insert((new_expires_at_ms, id.to_owned()));
        }
        drop(tasks);
        self.cancels.fetch_add(1, Ordering::Relaxed);
        Some(status)
    }

    /// The counters, as `GET /stats` shows them.
    pub fn stats(&self) -> SimStats {
        let tasks = self.lock().by_id.len() as u64;
        SimStats {
            tasks,
            polls: self.polls.load(Ordering::Relaxed),
            starts: self.starts.load(Ordering::Relaxed),
            cancels: self.cancels.load(Ordering::Relaxed),
        }
    }

    /// How many times the task's status was requested, `None` if unknown.
    pub fn polls_of(&self, id: &str) -> Option<u64> {
        self.lock().by_id.get(id).map(|task| task.polls)
    }

    /// Every held task's poll count, by id (sorted, for stable output).
    pub fn polls_per_task(&self) -> BTreeMap<String, u64> {
        self.lock()
            .by_id
            .iter()
            .map(|(id, task)| (id.clone(), task.polls))
            .collect()
    }
}

/// A fresh random id: [`ID_BYTES`] from the OS as lowercase hex, so ids are
/// unguessable and a restarted simulator never reuses an old one.
fn new_id() -> String {
    let mut bytes = [0u8; ID_BYTES];
    // The OS random source failing means the host is broken; no task id
    // could be trusted then.
    getrandom::fill(&mut bytes).expect("the OS random source failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::spec::tests::*;
    use super::*;
    use TaskState::{Cancelled, Failed, Running, Succeeded};

    #[test]
    fn simulator_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Simulator>();
    }

    #[test]
    fn status_follows_the_clock() {
        let sim = Simulator::new();
        let id = sim.start("simulate", &params(1000, 10), T0).unwrap();
        let s = sim.status(&id, T0 + 250).unwrap();
        assert_eq!(
            s,
            Status {
                id: id.clone(),
                state: Running,
                done: 2,
                total: Some(10),
                message: None,
                result: None,
                error: None,
                changed_at_ms: T0 + 200,
            }
        );
        let s = sim.status(&id, T0 + 1500).unwrap();
        assert_eq!(
            (s.state, s.done, s.changed_at_ms),
            (Succeeded, 10, T0 + 1000)
        );
        assert_eq!(s.result, Some(json!({ "steps": 10 })));
        assert_eq!(s.error, None);
    }

    #[test]
    fn status_json_has_every_contract_field() {
        let sim = Simulator::new();
        let id = sim.start("simulate", &params(1000, 10), T0).unwrap();
        let value = serde_json::to_value(sim.status(&id, T0 + 100).unwrap()).unwrap();
        assert_eq!(
            value,
            json!({
                "id": id, "state": "running", "done": 1, "total": 10, "message": null,
                "result": null, "error": null, "changed_at_ms": T0 + 100,
            })
        );
    }

    #[test]
    fn failed_status_says_where() {
        let sim = Simulator::new();
        let p = json!({ "duration_ms": 1000, "steps": 10, "fail_at": 4 });
        let id = sim.start("simulate", &p, T0).unwrap();
        let s = sim.status(&id, T0 + 700).unwrap();
        assert_eq!((s.state, s.done, s.changed_at_ms), (Failed, 4, T0 + 400));
        assert_eq!(s.error.as_deref(), Some("simulated failure at step 4"));
        assert_eq!(s.result, None);
        assert_eq!(s.total, Some(10));
    }

    #[test]
    fn cancel_mid_run_keeps_done_and_takes_cancel_time() {
        let sim = Simulator::new();
        let id = sim.start("simulate", &params(1000, 10), T0).unwrap();
        let s = sim.cancel(&id, T0 + 550).unwrap();
        assert_eq!((s.state, s.done, s.changed_at_ms), (Cancelled, 5, T0 + 550));
        assert_eq!((s.result, s.error), (None, None));
        // Stays so, however late it is asked.
        let later = sim.status(&id, T0 + 5000).unwrap();
        assert_eq!(
            (later.state, later.done, later.changed_at_ms),
            (Cancelled, 5, T0 + 550)
        );
        // A second cancel changes nothing.
        assert_eq!(sim.cancel(&id, T0 + 6000).unwrap(), later);
    }

    #[test]
    fn cancel_at_start_keeps_zero() {
        let sim = Simulator::new();
        let id = sim.start("simulate", &params(1000, 10), T0).unwrap();
        let s = sim.cancel(&id, T0).unwrap();
        assert_eq!((s.state, s.done, s.changed_at_ms), (Cancelled, 0, T0));
    }

    #[test]
    fn cancel_after_finish_is_unchanged() {
        let sim = Simulator::new();
        let ok = sim.start("simulate", &params(1000, 10), T0).unwrap();
        let before = sim.status(&ok, T0 + 2000).unwrap();
        assert_eq!(sim.cancel(&ok, T0 + 2000).unwrap(), before);
        assert_eq!(sim.status(&ok, T0 + 3000).unwrap(), before);

        let p = json!({ "duration_ms": 1000, "steps": 10, "fail_at": 3 });
        let failed = sim.start("simulate", &p, T0).unwrap();
        let s = sim.cancel(&failed, T0 + 500).unwrap();
        assert_eq!((s.state, s.done, s.changed_at_ms), (Failed, 3, T0 + 300));
        assert_eq!(sim.status(&failed, T0 + 900).unwrap(), s);
    }

    #[test]
    fn unknown_ids_are_none() {
        let sim = Simulator::new();
        assert_eq!(sim.status("nope", T0), None);
        assert_eq!(sim.cancel("nope", T0), None);
        assert_eq!(sim.polls_of("nope"), None);
    }

    #[test]
    fn ids_are_random_hex() {
        let sim = Simulator::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let id = sim.start("simulate", &params(1000, 10), T0).unwrap();
            assert_eq!(id.len(), 2 * ID_BYTES);
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(seen.insert(id));
        }
        // Another simulator (a restart) does not repeat them.
        let other = Simulator::new();
        let id = other.start("simulate", &params(1000, 10), T0).unwrap();
        assert!(!seen.contains(&id));
    }

    #[test]
    fn unknown_kind_is_rejected_before_params() {
        let sim = Simulator::new();
        assert_eq!(
            sim.start("sleep", &params(1000, 10), T0),
            Err(SimError::UnknownKind("sleep".into()))
        );
        assert_eq!(
            sim.start("", &json!(null), T0),
            Err(SimError::UnknownKind(String::new()))
        );
        assert_eq!(
            sim.start("Simulate", &params(1000, 10), T0),
            Err(SimError::UnknownKind("Simulate".into()))
        );
        assert_eq!(sim.stats().starts, 0);
    }

    #[test]
    fn start_rejects_invalid_params() {
        let sim = Simulator::new();
        let e = sim
            .start("simulate", &json!({ "steps": 1 }), T0)
            .unwrap_err();
        assert!(
            matches!(e, SimError::InvalidParams(ref m) if m.contains("duration_ms")),
            "{e}"
        );
        assert_eq!(sim.stats(), SimStats::default());
    }

    // ---- params ----

    #[test]
    fn full_until_a_finished_task_expires() {
        let sim = Simulator::with_limits(2, 500);
        let a = sim.start("simulate", &params(1000, 10), T0).unwrap();
        let _b = sim.start("simulate", &params(5000, 10), T0).unwrap();
        assert_eq!(
            sim.start("simulate", &params(1000, 10), T0),
            Err(SimError::Full)
        );
        // `a` finishes at +1000 and is kept until +1500.
        assert_eq!(
            sim.start("simulate", &params(1000, 10), T0 + 1499),
            Err(SimError::Full)
        );
        assert!(sim.status(&a, T0 + 1499).is_some());
        let c = sim.start("simulate", &params(1000, 10), T0 + 1500).unwrap();
        assert_eq!(sim.status(&a, T0 + 1500), None);
        assert!(sim.status(&c, T0 + 1500).is_some());
        assert_eq!(sim.stats().tasks, 2);
        assert_eq!(sim.stats().starts, 3);
    }

    #[test]
    fn finished_tasks_are_forgotten_after_retention() {
        let sim = Simulator::with_limits(100, 1000);
        let p = json!({ "duration_ms": 1000, "steps": 10, "fail_at": 2 });
        let failed = sim.start("simulate", &p, T0).unwrap(); // ends at +200
        let ok = sim.start("simulate", &params(1000, 10), T0).unwrap(); // ends at +1000
        let long = sim
            .start("simulate", &params(MAX_DURATION_MS, 10), T0)
            .unwrap();
        assert!(sim.status(&failed, T0 + 1199).is_some());
        assert_eq!(sim.status(&failed, T0 + 1200), None);
        assert!(sim.status(&ok, T0 + 1999).is_some());
        assert_eq!(sim.cancel(&ok, T0 + 2000), None);
        // A running task is never forgotten, however long it runs.
        assert_eq!(
            sim.status(&long, T0 + MAX_DURATION_MS - 1).unwrap().state,
            Running
        );
        assert_eq!(sim.stats().tasks, 1);
    }

    #[test]
    fn cancelled_tasks_are_forgotten_after_retention_from_the_cancel() {
        let sim = Simulator::with_limits(100, 1000);
        let id = sim
            .start("simulate", &params(MAX_DURATION_MS, 10), T0)
            .unwrap();
        sim.cancel(&id, T0 + 10).unwrap();
        assert!(sim.status(&id, T0 + 1009).is_some());
        // Pruned by a start, not by asking for it.
        sim.start("simulate", &params(1000, 10), T0 + 1010).unwrap();
        assert_eq!(sim.polls_of(&id), None);
        assert_eq!(sim.stats().tasks, 1);
    }

    #[test]
    fn pruning_is_bounded_per_start() {
        let sim = Simulator::with_limits(1000, 0);
        for _ in 0..20 {
            sim.start("simulate", &params(1, 1), T0).unwrap();
        }
        assert_eq!(sim.stats().tasks, 20);
        // All 20 have expired by +1; each start drops at most PRUNE_PER_START.
        sim.start("simulate", &params(1000, 1), T0 + 1).unwrap();
        assert_eq!(sim.stats().tasks, (20 - PRUNE_PER_START + 1) as u64);
        sim.start("simulate", &params(1000, 1), T0 + 1).unwrap();
        sim.start("simulate", &params(1000, 1), T0 + 1).unwrap();
        assert_eq!(sim.stats().tasks, 3);
    }

    // ---- counters ----

    #[test]
    fn counters() {
        let sim = Simulator::new();
        let a = sim.start("simulate", &params(1000, 10), T0).unwrap();
        let b = sim.start("simulate", &params(1000, 10), T0).unwrap();
        let _ = sim.start("nope", &params(1000, 10), T0);
        for _ in 0..3 {
            sim.status(&a, T0 + 1).unwrap();
        }
        sim.status(&b, T0 + 1).unwrap();
        assert_eq!(sim.status("unknown", T0), None);
        sim.cancel(&b, T0 + 2).unwrap();
        sim.cancel(&b, T0 + 3).unwrap();
        assert_eq!(sim.cancel("unknown", T0), None);
        assert_eq!(sim.polls_of(&a), Some(3));
        assert_eq!(sim.polls_of(&b), Some(1));
        assert_eq!(
            sim.stats(),
            SimStats {
                tasks: 2,
                polls: 5,
                starts: 2,
                cancels: 2,
            }
        );
        assert_eq!(
            serde_json::to_value(sim.stats()).unwrap(),
            json!({ "tasks": 2, "polls": 5, "starts": 2, "cancels": 2 })
        );
        let per_task = sim.polls_per_task();
        assert_eq!(per_task.len(), 2);
        assert_eq!(per_task[&a], 3);
        assert_eq!(per_task[&b], 1);
    }
}
