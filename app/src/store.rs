//! The page's list of tasks and how each server message changes it: plain
//! data and functions, so the rules (newest first, `seq` never goes back,
//! `welcome` is the truth after a reconnect) are unit-tested natively.

use crate::protocol::Task;

/// Merges one task into a list ordered newest first. A state older than the
/// one held (lower `seq`) is ignored. Returns whether the list changed.
pub fn upsert(tasks: &mut Vec<Task>, task: Task) -> bool {
    if let Some(held) = tasks.iter_mut().find(|t| t.id == task.id) {
        if task.seq < held.seq || *held == task {
            return false;
        }
        *held = task;
        return true;
    }
    let at = tasks
        .iter()
        .position(|t| (t.created_ms, &t.id) < (task.created_ms, &task.id))
        .unwrap_or(tasks.len());
    tasks.insert(at, task);
    true
}

/// A `welcome` is the session's whole truth: the list becomes exactly its
/// tasks (a restarted server may have fewer, with lower `seq`s).
pub fn replace_all(tasks: &mut Vec<Task>, mut incoming: Vec<Task>) {
    incoming.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
    *tasks = incoming;
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
            updated_ms: created_ms,
        }
    }

    #[test]
    fn newest_first_and_seq_never_goes_back() {
        let mut list = vec![];
        assert!(upsert(&mut list, task("a", 1, 0)));
        assert!(upsert(&mut list, task("b", 2, 0)));
        assert!(upsert(&mut list, task("a", 1, 3)));
        assert!(!upsert(&mut list, task("a", 1, 2)));
        let ids: Vec<_> = list.iter().map(|t| (t.id.as_str(), t.seq)).collect();
        assert_eq!(ids, [("b", 0), ("a", 3)]);
    }

    #[test]
    fn welcome_replaces_the_list() {
        let mut list = vec![task("a", 1, 5), task("gone", 0, 1)];
        replace_all(&mut list, vec![task("a", 1, 0), task("c", 3, 0)]);
        let ids: Vec<_> = list.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["c", "a"]);
    }
}
