//! Every Redis key and channel name of the Redis engine, defined once. The
//! Lua scripts (`lua/`) receive them as `KEYS`, or — where a script derives
//! a task's key from an id it read — the prefix as an argument, so no name
//! is written twice.
//!
//! The task space is split into [`PARTITIONS`] partitions by the session a
//! task belongs to ([`partition_of`]; a task's id is made to fall in the
//! same partition as its session's token). Every key of a partition carries its
//! hash tag `{tw:N}`, so whatever one script touches (a task, its session's
//! sets, the partition's sets) lives in one slot of a Redis Cluster, and
//! the partitions spread over the cluster's shards. A worker owns whole
//! partitions ([`owner`], see `worker.rs`).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{tw:N}:task:{id}` | hash | `task` (JSON), `seq`, `session`, `backend`, `track` (JSON), `final` |
//! | `{tw:N}:live` | set | the partition's task ids not yet final |
//! | `{tw:N}:new` | list | ids created and not yet taken by the partition's owner |
//! | `{tw:N}:cancels` | list | cancels from web processes, for the partition's owner to apply |
//! | `{tw:N}:owner` | string | the worker owning the partition (expires: a lease) |
//! | `{tw:N}:session:{token}` | hash | `created`; exists while the session does |
//! | `{tw:N}:session:{token}:tasks` | sorted set | the session's task ids by creation |
//! | `{tw:N}:session:{token}:live` | set | its tasks not yet final |
//! | `{tw:N}:session:{token}:starts` | sorted set | its starts of the last minute |
//! | `{tw:N}:session:{token}:pending` | sorted set | its starts waiting on the task service |
//! | `tw:workers` | sorted set | live workers by the end of their heartbeat (Unix ms) |
//! | `tw:partitions` | string | the partition count the data was written with |

/// How many partitions the task space has. Fixed: it decides where every
/// key lives (`tw:partitions` records it; a worker built with another
/// count refuses to poll that Redis).
pub use crate::task::id::PARTITIONS;

/// Channel of task changes (`Event`s), read by every web process.
pub const EVENTS: &str = "tw:events";
/// Channel that wakes the owner of a partition when a task is created in
/// it (due at once); the message is the partition's number.
pub const WAKE: &str = "tw:wake";
/// The live workers, by heartbeat end.
pub const WORKERS: &str = "tw:workers";
/// The partition count, written by the first process.
pub const PARTITION_COUNT: &str = "tw:partitions";

/// The partition of a session's keys and tasks; a task id is in its
/// session's partition (`task::id::new_task_id`), so either finds it.
pub fn partition_of(session_or_task: &str) -> u16 {
    crate::task::id::partition(session_or_task)
}

/// The hash tag of partition `p`.
pub fn tag(p: u16) -> String {
    format!("{{tw:{p}}}")
}

/// Prefix of a task's hash in partition `p`: prefix + id.
pub fn task_prefix(p: u16) -> String {
    format!("{{tw:{p}}}:task:")
}

pub fn task(p: u16, id: &str) -> String {
    format!("{{tw:{p}}}:task:{id}")
}

/// The partition's live task ids.
pub fn live(p: u16) -> String {
    format!("{{tw:{p}}}:live")
}

/// The partition's new task ids, for its owner to take.
pub fn inbox(p: u16) -> String {
    format!("{{tw:{p}}}:new")
}

/// The partition's cancels, for its owner to apply (`CancelReq` JSON).
pub fn cancels(p: u16) -> String {
    format!("{{tw:{p}}}:cancels")
}

/// The lease of the partition's owner.
pub fn owner(p: u16) -> String {
    format!("{{tw:{p}}}:owner")
}

pub fn session(token: &str) -> String {
    format!("{{tw:{}}}:session:{token}", partition_of(token))
}

/// One of a session's sets: `tasks`, `live`, `starts`, `pending`.
pub fn session_sub(token: &str, what: &str) -> String {
    format!("{{tw:{}}}:session:{token}:{what}", partition_of(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_and_its_tasks_share_a_tag() {
        let p = partition_of("s-abc");
        assert!(p < PARTITIONS);
        let t = tag(p);
        assert!(session("s-abc").starts_with(&t));
        assert!(session_sub("s-abc", "live").starts_with(&t));
        assert!(task(p, "x").starts_with(&t));
        assert!(live(p).starts_with(&t) && inbox(p).starts_with(&t) && owner(p).starts_with(&t));
    }

    #[test]
    fn sessions_spread_over_the_partitions() {
        let mut seen = [0u32; PARTITIONS as usize];
        for i in 0..6400 {
            seen[partition_of(&format!("session-{i:04}")) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
