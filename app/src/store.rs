//! The page's list of tasks and how each server message changes it: plain
//! data and functions, so the rules (running first, then finished newest
//! first; `seq` never goes back; `welcome` is the truth after a reconnect;
//! rate and ETA from recent progress) are unit-tested natively.

use crate::protocol::Task;

/// Progress samples kept per task, for the sparkline and the rate.
pub const MAX_SAMPLES: usize = 60;
/// The rate is measured over the samples of this last window.
pub const RATE_WINDOW_MS: u64 = 10_000;

/// A task and the progress the page has seen of it.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskView {
    pub task: Task,
    /// `(updated_ms, done)`, oldest first, at most [`MAX_SAMPLES`].
    pub samples: Vec<(u64, u64)>,
}

impl TaskView {
    pub fn new(task: Task) -> Self {
        let samples = vec![(task.updated_ms, task.done)];
        TaskView { task, samples }
    }

    fn sample(&mut self) {
        let point = (self.task.updated_ms, self.task.done);
        if self.samples.last() != Some(&point) {
            self.samples.push(point);
            if self.samples.len() > MAX_SAMPLES {
                self.samples.remove(0);
            }
        }
    }

    /// Steps per second over the last [`RATE_WINDOW_MS`] of samples.
    pub fn rate(&self) -> Option<f64> {
        let &(t1, d1) = self.samples.last()?;
        let &(t0, d0) = self
            .samples
            .iter()
            .find(|(t, _)| t1.saturating_sub(*t) <= RATE_WINDOW_MS)?;
        (t1 > t0 && d1 > d0).then(|| (d1 - d0) as f64 * 1000.0 / (t1 - t0) as f64)
    }

    /// Milliseconds until done at the current rate, from the last update.
    pub fn eta_ms(&self) -> Option<u64> {
        if self.task.state.is_final() {
            return None;
        }
        let left = self.task.total?.saturating_sub(self.task.done);
        Some((left as f64 * 1000.0 / self.rate()?) as u64)
    }
}

/// Running (not final) first, then finished; newest first within each.
fn order(a: &TaskView, b: &TaskView) -> std::cmp::Ordering {
    let key = |v: &TaskView| {
        (
            v.task.state.is_final(),
            std::cmp::Reverse(v.task.created_ms),
        )
    };
    key(a).cmp(&key(b)).then_with(|| b.task.id.cmp(&a.task.id))
}

/// Merges one task into the list. A state older than the one held (lower
/// `seq`) is ignored. Returns whether it changed, and whether it became
/// final with this update.
pub fn upsert(list: &mut Vec<TaskView>, task: Task) -> (bool, bool) {
    if let Some(held) = list.iter_mut().find(|v| v.task.id == task.id) {
        if task.seq < held.task.seq || held.task == task {
            return (false, false);
        }
        let became_final = task.state.is_final() && !held.task.state.is_final();
        held.task = task;
        held.sample();
        list.sort_by(order);
        return (true, became_final);
    }
    list.push(TaskView::new(task));
    list.sort_by(order);
    (true, false)
}

/// A `welcome` is the session's whole truth: the list becomes exactly its
/// tasks (a restarted server may have fewer, with lower `seq`s); the
/// samples of tasks still there are kept.
pub fn replace_all(list: &mut Vec<TaskView>, incoming: Vec<Task>) {
    let mut next: Vec<TaskView> = incoming
        .into_iter()
        .map(
            |task| match list.iter().position(|v| v.task.id == task.id) {
                Some(i) => {
                    let mut v = list.swap_remove(i);
                    v.task = task;
                    v.sample();
                    v
                }
                None => TaskView::new(task),
            },
        )
        .collect();
    next.sort_by(order);
    *list = next;
}

/// Drops a task from the list.
pub fn remove(list: &mut Vec<TaskView>, id: &str) {
    list.retain(|v| v.task.id != id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TaskState;

    fn task(id: &str, created_ms: u64, seq: u64) -> Task {
        Task {
            id: id.into(),
            kind: "simulate".into(),
            state: TaskState::Running,
            done: seq,
            total: Some(10),
            message: None,
            result: None,
            error: None,
            seq,
            created_ms,
            updated_ms: created_ms + seq * 1000,
            params: None,
        }
    }

    fn ids(list: &[TaskView]) -> Vec<&str> {
        list.iter().map(|v| v.task.id.as_str()).collect()
    }

    #[test]
    fn running_first_newest_first_and_seq_never_goes_back() {
        let mut list = vec![];
        upsert(&mut list, task("a", 1, 0));
        upsert(&mut list, task("b", 2, 0));
        assert_eq!(upsert(&mut list, task("a", 1, 3)), (true, false));
        assert_eq!(upsert(&mut list, task("a", 1, 2)), (false, false));
        assert_eq!(ids(&list), ["b", "a"]);
        let mut done = task("b", 2, 4);
        done.state = TaskState::Succeeded;
        assert_eq!(upsert(&mut list, done), (true, true));
        assert_eq!(
            ids(&list),
            ["a", "b"],
            "finished tasks go after running ones"
        );
    }

    #[test]
    fn welcome_replaces_the_list_and_keeps_samples() {
        let mut list = vec![];
        upsert(&mut list, task("a", 1, 1));
        upsert(&mut list, task("a", 1, 2));
        upsert(&mut list, task("gone", 0, 1));
        replace_all(&mut list, vec![task("a", 1, 3), task("c", 3, 0)]);
        assert_eq!(ids(&list), ["c", "a"]);
        assert_eq!(list[1].samples.len(), 3);
    }

    #[test]
    fn rate_and_eta_from_recent_samples() {
        let mut list = vec![];
        for seq in 0..=4 {
            upsert(&mut list, task("a", 0, seq));
        }
        // One step a second.
        assert_eq!(list[0].rate(), Some(1.0));
        assert_eq!(list[0].eta_ms(), Some(6_000));
    }
}
