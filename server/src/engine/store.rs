//! The Redis store of the Redis engine: keys, Lua scripts and the few
//! commands the web and worker roles need. Every multi-key change is one
//! script, so it is atomic; every change to a task bumps its `seq` by
//! compare-and-set and publishes the new state on [`EVENTS`].
//!
//! Keys (one Redis, not a cluster: the scripts reach task keys they were not
//! passed):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `tw:task:{id}` | hash | `task` (JSON), `seq`, `session`, `backend`, `track` (JSON), `final` |
//! | `tw:due` | sorted set | live task ids by next due poll (Unix ms) — the delay queue |
//! | `tw:session:{token}` | hash | `created`; exists while the session does |
//! | `tw:session:{token}:tasks` | sorted set | the session's task ids by creation |
//! | `tw:session:{token}:live` | set | its tasks not yet final |
//! | `tw:session:{token}:starts` | sorted set | its starts of the last minute |
//! | `tw:session:{token}:pending` | sorted set | its starts waiting on the task service |

use crate::hub::transition::{Track, Tracked};
use app::protocol::Task;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;
use std::time::Duration;

/// Channel of task changes (`Event`s), read by every web process.
pub const EVENTS: &str = "tw:events";
/// Channel that wakes the workers when a task is created (due at once).
pub const WAKE: &str = "tw:wake";
pub const DUE: &str = "tw:due";

/// Backoff of a process's retries while Redis is unreachable.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// How long a session lives after its last use (page, connection, start).
pub const SESSION_TTL_S: u64 = 7 * 24 * 3600;
/// A start still pending after this long is taken for dead (its web
/// process died) and stops counting against the session's live tasks.
const PENDING_STALE_MS: u64 = 60_000;

fn task_key(id: &str) -> String {
    format!("tw:task:{id}")
}
fn session_key(token: &str) -> String {
    format!("tw:session:{token}")
}
fn session_sub(token: &str, what: &str) -> String {
    format!("tw:session:{token}:{what}")
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("taskwire's store (Redis) is unreachable: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("taskwire's store holds a task it cannot read: {0}")]
    Corrupt(String),
}

/// What goes over [`EVENTS`]: a task's new state, or a forgotten task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The session the task belongs to.
    pub s: String,
    /// The task service's id of the task (for `cancel` on any web process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t: Option<Task>,
    /// The id of a task dropped by `forget`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forget: Option<String>,
}

/// A task as stored, with what the poll engine needs beside it.
#[derive(Clone, Debug)]
pub struct Stored {
    pub tracked: Tracked,
    pub session: String,
    pub backend_id: String,
}

/// Where a task's next poll goes after a change is saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextDue {
    /// Due at this Unix ms.
    At(u64),
    /// Final: out of the queue, expires after the retention.
    Final,
    /// Leave the queue entry as it is (a `cancel` that left it running).
    Keep,
}

/// The outcome of a compare-and-set save.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Saved {
    Done,
    /// Someone else changed the task first: load it again and retry.
    Conflict,
    /// The task is gone (expired or forgotten).
    Gone,
}

static RESOLVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
return 1",
    )
});

static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    // KEYS: starts, pending, live. ARGV: now, per_min, max_live, nonce, stale_before.
    Script::new(
        r"
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 1 end
if redis.call('SCARD', KEYS[3]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 2 end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('ZADD', KEYS[2], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], 60000)
redis.call('PEXPIRE', KEYS[2], 120000)
return 0",
    )
});

static CREATE: LazyLock<Script> = LazyLock::new(|| {
    // KEYS: task, due, session tasks, session live, session.
    // ARGV: task json, session, backend, id, created ms, event, ttl.
    Script::new(
        r"
redis.call('HSET', KEYS[1], 'task', ARGV[1], 'seq', 0, 'session', ARGV[2],
  'backend', ARGV[3], 'track', '{}', 'final', 0)
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('HSETNX', KEYS[5], 'created', ARGV[5])
for i = 3, 5 do redis.call('EXPIRE', KEYS[i], ARGV[7]) end
redis.call('PUBLISH', 'tw:events', ARGV[6])
redis.call('PUBLISH', 'tw:wake', ARGV[4])
return 1",
    )
});

static SAVE: LazyLock<Script> = LazyLock::new(|| {
    // KEYS: task, due, session live.
    // ARGV: expected seq, task json ('' = unchanged), track json,
    //       next ('keep' | 'final' | due ms), retention s, id, event, final flag.
    Script::new(
        r"
local cur = redis.call('HGET', KEYS[1], 'seq')
if not cur then redis.call('ZREM', KEYS[2], ARGV[6]) return -1 end
if cur ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'task', ARGV[2], 'seq', tonumber(ARGV[1]) + 1, 'final', ARGV[8])
  redis.call('PUBLISH', 'tw:events', ARGV[7])
end
redis.call('HSET', KEYS[1], 'track', ARGV[3])
if ARGV[4] == 'final' then
  redis.call('ZREM', KEYS[2], ARGV[6])
  redis.call('SREM', KEYS[3], ARGV[6])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
elseif ARGV[4] ~= 'keep' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
end
return 1",
    )
});

static LOAD_SESSION: LazyLock<Script> = LazyLock::new(|| {
    // KEYS: session tasks. Returns [task json, backend id]* oldest first,
    // dropping the ids whose task has expired.
    Script::new(
        r"
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('HMGET', 'tw:task:' .. id, 'task', 'backend')
  if v[1] then
    out[#out + 1] = v[1]
    out[#out + 1] = v[2]
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out",
    )
});

static FORGET: LazyLock<Script> = LazyLock::new(|| {
    // KEYS: task, session tasks. ARGV: session, id, event.
    Script::new(
        r"
local v = redis.call('HMGET', KEYS[1], 'session', 'final')
if not v[1] then redis.call('ZREM', KEYS[2], ARGV[2]) return 0 end
if v[1] ~= ARGV[1] or v[2] ~= '1' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', 'tw:events', ARGV[3])
return 1",
    )
});

static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    // KEYS: due. ARGV: now, max, lease until. Moves each due entry to the
    // end of its lease, so no other worker takes it; the worker's save sets
    // the real next due time, and a dead worker's claims come due again.
    // Returns, per claim, [id, due, task, seq, session, backend, track]
    // (the task's fields false when it is gone), then the earliest due time
    // left ('' if none): one round trip claims and reads.
    Script::new(
        r"
local got = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
local out = {}
for i = 1, #got, 2 do
  redis.call('ZADD', KEYS[1], ARGV[3], got[i])
  local v = redis.call('HMGET', 'tw:task:' .. got[i], 'task', 'seq', 'session', 'backend', 'track')
  out[#out + 1] = got[i]
  out[#out + 1] = got[i + 1]
  for j = 1, 5 do out[#out + 1] = v[j] or '' end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
out[#out + 1] = first[2] or ''
return out",
    )
});

/// A connection to Redis that reconnects by itself (cheap to clone).
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    client: redis::Client,
}

impl Store {
    /// Connects lazily: the process starts even while Redis is down, and
    /// every call fails fast (about a second) until it is back.
    pub fn open(url: &str) -> Result<Store, StoreError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Store { conn, client })
    }

    /// A new pub/sub connection subscribed to `channel` (within 2 s).
    pub async fn subscribe(&self, channel: &str) -> Result<redis::aio::PubSub, StoreError> {
        let connect = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok(pubsub)
        };
        tokio::time::timeout(Duration::from_secs(2), connect)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Redis(redis::RedisError::from(
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "subscribing timed out"),
                )))
            })
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut c).await?;
        Ok(())
    }

    /// Whether `token` names a live session (refreshing its lifetime).
    pub async fn session_exists(&self, token: &str) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let found: i64 = RESOLVE
            .key(session_key(token))
            .key(session_sub(token, "tasks"))
            .key(session_sub(token, "live"))
            .arg(SESSION_TTL_S)
            .invoke_async(&mut c)
            .await?;
        Ok(found == 1)
    }

    pub async fn create_session(&self, token: &str, now_ms: u64) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .hset(session_key(token), "created", now_ms)
            .ignore()
            .expire(session_key(token), SESSION_TTL_S as i64)
            .ignore()
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Admits one start of `session` (see `Hub::admit_start`): `Ok(None)`
    /// when admitted under `nonce`, else which limit it hit.
    pub async fn admit_start(
        &self,
        session: &str,
        nonce: &str,
        now_ms: u64,
        per_min: u64,
        max_live: u64,
    ) -> Result<Option<String>, StoreError> {
        let mut c = self.conn.clone();
        let verdict: i64 = ADMIT
            .key(session_sub(session, "starts"))
            .key(session_sub(session, "pending"))
            .key(session_sub(session, "live"))
            .arg(now_ms)
            .arg(per_min)
            .arg(max_live)
            .arg(nonce)
            .arg(now_ms.saturating_sub(PENDING_STALE_MS))
            .invoke_async(&mut c)
            .await?;
        Ok(match verdict {
            0 => None,
            1 => Some(format!("at most {per_min} tasks may be started per minute")),
            _ => Some(format!(
                "at most {max_live} tasks may run at once in a session"
            )),
        })
    }

    pub async fn start_done(&self, session: &str, nonce: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("ZREM")
            .arg(session_sub(session, "pending"))
            .arg(nonce)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Records a new task, due for its first poll at once, and tells the
    /// web processes and the workers.
    pub async fn create_task(
        &self,
        session: &str,
        task: &Task,
        backend_id: &str,
    ) -> Result<(), StoreError> {
        let event = Event {
            s: session.into(),
            b: Some(backend_id.into()),
            t: Some(task.clone()),
            forget: None,
        };
        let mut c = self.conn.clone();
        CREATE
            .key(task_key(&task.id))
            .key(DUE)
            .key(session_sub(session, "tasks"))
            .key(session_sub(session, "live"))
            .key(session_key(session))
            .arg(to_json(task))
            .arg(session)
            .arg(backend_id)
            .arg(&task.id)
            .arg(task.created_ms)
            .arg(to_json(&event))
            .arg(SESSION_TTL_S)
            .invoke_async::<i64>(&mut c)
            .await?;
        Ok(())
    }

    /// A session's tasks with their task-service ids, oldest first.
    pub async fn session_tasks(&self, session: &str) -> Result<Vec<(Task, String)>, StoreError> {
        let mut c = self.conn.clone();
        let flat: Vec<String> = LOAD_SESSION
            .key(session_sub(session, "tasks"))
            .invoke_async(&mut c)
            .await?;
        flat.chunks_exact(2)
            .map(|pair| Ok((from_json::<Task>(&pair[0])?, pair[1].clone())))
            .collect()
    }

    pub async fn load(&self, task_id: &str) -> Result<Option<Stored>, StoreError> {
        let mut c = self.conn.clone();
        let row: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(task_key(task_id))
            .arg(&["task", "seq", "session", "backend", "track"])
            .query_async(&mut c)
            .await?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        stored_from([field(0), field(1), field(2), field(3), field(4)])
    }

    /// Saves `stored` (its task already committed with the next `seq` when
    /// `changed`) if nobody changed the task since it was loaded at
    /// `loaded_seq`, publishes a change, and moves the task's queue entry.
    pub async fn save(
        &self,
        stored: &Stored,
        loaded_seq: u64,
        changed: bool,
        next: NextDue,
        retention_s: u64,
    ) -> Result<Saved, StoreError> {
        let task = &stored.tracked.task;
        let (task_json, event) = if changed {
            let event = Event {
                s: stored.session.clone(),
                b: Some(stored.backend_id.clone()),
                t: Some(task.clone()),
                forget: None,
            };
            (to_json(task), to_json(&event))
        } else {
            (String::new(), String::new())
        };
        let next = match next {
            NextDue::At(ms) => ms.to_string(),
            NextDue::Final => "final".into(),
            NextDue::Keep => "keep".into(),
        };
        let mut c = self.conn.clone();
        let outcome: i64 = SAVE
            .key(task_key(&task.id))
            .key(DUE)
            .key(session_sub(&stored.session, "live"))
            .arg(loaded_seq)
            .arg(task_json)
            .arg(to_json(&stored.tracked.track))
            .arg(next)
            .arg(retention_s.max(1))
            .arg(&task.id)
            .arg(event)
            .arg(if task.state.is_final() { "1" } else { "0" })
            .invoke_async(&mut c)
            .await?;
        Ok(match outcome {
            1 => Saved::Done,
            0 => Saved::Conflict,
            _ => Saved::Gone,
        })
    }

    /// `forget`: drops a final task of `session`. Whether it did.
    pub async fn forget(&self, session: &str, task_id: &str) -> Result<bool, StoreError> {
        let event = Event {
            s: session.into(),
            b: None,
            t: None,
            forget: Some(task_id.into()),
        };
        let mut c = self.conn.clone();
        let done: i64 = FORGET
            .key(task_key(task_id))
            .key(session_sub(session, "tasks"))
            .arg(session)
            .arg(task_id)
            .arg(to_json(&event))
            .invoke_async(&mut c)
            .await?;
        Ok(done == 1)
    }

    /// Claims up to `max` polls due by `now_ms`, each leased until
    /// `lease_until_ms`, and reads their tasks in the same round trip.
    pub async fn claim(
        &self,
        now_ms: u64,
        max: usize,
        lease_until_ms: u64,
    ) -> Result<Claimed, StoreError> {
        let mut c = self.conn.clone();
        let mut flat: Vec<String> = CLAIM
            .key(DUE)
            .arg(now_ms)
            .arg(max)
            .arg(lease_until_ms)
            .invoke_async(&mut c)
            .await?;
        let next_due = flat.pop().and_then(|s| parse_score(&s));
        let mut due = Vec::with_capacity(flat.len() / 7);
        let mut it = flat.into_iter();
        while let (
            Some(id),
            Some(score),
            Some(task),
            Some(seq),
            Some(session),
            Some(backend),
            Some(track),
        ) = (
            it.next(),
            it.next(),
            it.next(),
            it.next(),
            it.next(),
            it.next(),
            it.next(),
        ) {
            let stored = stored_from([task, seq, session, backend, track]);
            due.push(Claim {
                id,
                due_ms: parse_score(&score).unwrap_or(0),
                stored,
            });
        }
        Ok(Claimed { due, next_due })
    }

    /// Puts a claimed poll back, due at `due_ms` (a rate cap deferred it).
    pub async fn defer(&self, task_id: &str, due_ms: u64) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        // XX: only if still queued (it may have turned final meanwhile).
        redis::cmd("ZADD")
            .arg(DUE)
            .arg("XX")
            .arg(due_ms)
            .arg(task_id)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Takes a task out of the delay queue.
    pub async fn remove_due(&self, task_id: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("ZREM")
            .arg(DUE)
            .arg(task_id)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Entries of the delay queue (for tests and metrics).
    pub async fn queue_len(&self) -> Result<u64, StoreError> {
        let mut c = self.conn.clone();
        Ok(redis::cmd("ZCARD").arg(DUE).query_async(&mut c).await?)
    }
}

/// What [`Store::claim`] got.
#[derive(Debug, Default)]
pub struct Claimed {
    pub due: Vec<Claim>,
    /// When the earliest poll left in the queue is due (Unix ms).
    pub next_due: Option<u64>,
}

/// One claimed poll.
#[derive(Debug)]
pub struct Claim {
    pub id: String,
    /// When the poll was due (Unix ms).
    pub due_ms: u64,
    /// The task as the claim read it (`None`: it is gone).
    pub stored: Result<Option<Stored>, StoreError>,
}

/// A task from its hash fields `task`, `seq`, `session`, `backend`,
/// `track` (empty when missing).
fn stored_from(fields: [String; 5]) -> Result<Option<Stored>, StoreError> {
    let [task, seq, session, backend_id, track] = fields;
    if task.is_empty() || session.is_empty() {
        return Ok(None);
    }
    let mut task: Task = from_json(&task)?;
    task.seq = seq
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("seq `{seq}`")))?;
    let track = if track.is_empty() {
        Track::default()
    } else {
        from_json(&track)?
    };
    Ok(Some(Stored {
        tracked: Tracked { task, track },
        session,
        backend_id,
    }))
}

fn parse_score(s: &str) -> Option<u64> {
    s.parse::<f64>().ok().map(|f| f.max(0.0) as u64)
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("our types always serialise")
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}
