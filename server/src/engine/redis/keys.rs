//! Every Redis key and channel name of the Redis engine, defined once. The
//! Lua scripts (`lua/`) receive them as `KEYS`, or — where a script derives
//! a task's key from an id it read — the prefix as an argument, so no name
//! is written twice.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `tw:task:{id}` | hash | `task` (JSON), `seq`, `session`, `backend`, `track` (JSON), `final` |
//! | `tw:due` | sorted set | the first backend's live task ids by next due poll (Unix ms) — its delay queue |
//! | `tw:due:{backend}` | sorted set | the same for each further `[[backend]]`, by name |
//! | `tw:session:{token}` | hash | `created`; exists while the session does |
//! | `tw:session:{token}:tasks` | sorted set | the session's task ids by creation |
//! | `tw:session:{token}:live` | set | its tasks not yet final |
//! | `tw:session:{token}:starts` | sorted set | its starts of the last minute |
//! | `tw:session:{token}:pending` | sorted set | its starts waiting on the task service |

/// Channel of task changes (`Event`s), read by every web process.
pub const EVENTS: &str = "tw:events";
/// Channel that wakes the workers when a task is created (due at once);
/// the message is the delay queue ([`due`]) the task went into.
pub const WAKE: &str = "tw:wake";
/// The first backend's delay queue: the one queue of the versions with a
/// single backend, kept so that an upgrade moves nothing.
pub const DUE: &str = "tw:due";

/// The delay queue of the backend at `slot` (in the configuration's order)
/// named `name`: each backend has its own, claimed by its own loop.
pub fn due(slot: usize, name: &str) -> String {
    if slot == 0 {
        DUE.to_string()
    } else {
        format!("{DUE}:{name}")
    }
}
/// Prefix of a task's hash: `TASK_PREFIX` + id.
pub const TASK_PREFIX: &str = "tw:task:";

pub fn task(id: &str) -> String {
    format!("{TASK_PREFIX}{id}")
}

pub fn session(token: &str) -> String {
    format!("tw:session:{token}")
}

/// One of a session's sets: `tasks`, `live`, `starts`, `pending`.
pub fn session_sub(token: &str, what: &str) -> String {
    format!("tw:session:{token}:{what}")
}
