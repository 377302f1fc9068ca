//! The Redis engine's store: the few commands and scripts the web and
//! worker roles need. Every multi-key change is one script (`lua/`), so it
//! is atomic; every change to a task bumps its `seq` by compare-and-set and
//! publishes the new state on [`keys::EVENTS`]. Key names: [`keys`] (one
//! Redis, not a cluster: `load_session.lua` derives task keys from the ids it
//! reads).
//!
//! Saves are batched: a process's saves of the same moment (a worker's
//! polls that finished within [`SAVE_LINGER`]) go to Redis as one script
//! call, which runs each compare-and-set in turn, moves the queue entries
//! with one `ZADD` per queue and publishes the changes as one message (a
//! JSON array of [`Event`]s). A save whose task and poll memory did not
//! change writes only the queue entry.
//! The delay-queue commands take the backend's queue ([`keys::due`]); the
//! engine knows which backend a task belongs to.

use super::keys::{self, EVENTS, TASK_PREFIX, WAKE};
use crate::engine::admission::{Refusal, StartLimits, PENDING_STALE, START_WINDOW};
use crate::task::policy::NextDue;
use crate::task::{Track, Tracked};
use app::protocol::Task;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Backoff of a process's retries while Redis is unreachable.
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// How long a session lives after its last use (page, connection, start).
pub const SESSION_TTL_S: u64 = 7 * 24 * 3600;
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

/// The outcome of a compare-and-set save.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Saved {
    Done,
    /// Someone else changed the task first: load it again and retry.
    Conflict,
    /// The task is gone (expired or forgotten).
    Gone,
}

static RESOLVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/resolve.lua")));

static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/admit.lua")));

static CREATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/create.lua")));

static SAVE_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/save_many.lua")));

/// Saves per script call, at most.
const SAVE_BATCH: usize = 256;
/// How long the first save of a batch waits for others to join it: the
/// price, in staleness, of one script call and one message for many polls.
pub const SAVE_LINGER: Duration = Duration::from_millis(2);

static LOAD_SESSION: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/load_session.lua")));

static FORGET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/forget.lua")));

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/claim.lua")));
/// Lease renewal of the polls a worker is running (see `worker.rs`).
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/renew.lua")));

static RELOCATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/relocate.lua")));

/// A connection to Redis that reconnects by itself (cheap to clone).
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    client: redis::Client,
    /// The batcher of saves ([`save_batches`]), started by the first save.
    saves: Arc<OnceLock<mpsc::UnboundedSender<SaveReq>>>,
}

/// One compare-and-set save waiting for its batch.
struct SaveReq {
    /// `task`, `due`, `live` keys.
    keys: [String; 3],
    /// `seq`, task json, track json, next, id, event head, final flag, retention.
    args: [String; 8],
    reply: oneshot::Sender<Result<Saved, StoreError>>,
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
        Ok(Store {
            conn,
            client,
            saves: Default::default(),
        })
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
            .key(keys::session(token))
            .key(keys::session_sub(token, "tasks"))
            .key(keys::session_sub(token, "live"))
            .arg(SESSION_TTL_S)
            .invoke_async(&mut c)
            .await?;
        Ok(found == 1)
    }

    pub async fn create_session(&self, token: &str, now_ms: u64) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .hset(keys::session(token), "created", now_ms)
            .ignore()
            .expire(keys::session(token), SESSION_TTL_S as i64)
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
        limits: StartLimits,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let mut c = self.conn.clone();
        let pending_stale_ms = PENDING_STALE.as_millis() as u64;
        let verdict: i64 = ADMIT
            .key(keys::session_sub(session, "starts"))
            .key(keys::session_sub(session, "pending"))
            .key(keys::session_sub(session, "live"))
            .arg(now_ms)
            .arg(limits.per_window)
            .arg(limits.max_live)
            .arg(nonce)
            .arg(now_ms.saturating_sub(pending_stale_ms))
            .arg(START_WINDOW.as_millis() as u64)
            .arg(2 * pending_stale_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(match verdict {
            0 => Ok(()),
            1 => Err(Refusal::PerMinute(limits.per_window)),
            _ => Err(Refusal::Live(limits.max_live)),
        })
    }

    pub async fn start_done(&self, session: &str, nonce: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("ZREM")
            .arg(keys::session_sub(session, "pending"))
            .arg(nonce)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Records a new task in its backend's delay queue `due`, due for its
    /// first poll at once, and tells the web processes and the workers.
    pub async fn create_task(
        &self,
        session: &str,
        task: &Task,
        backend_id: &str,
        due: &str,
    ) -> Result<(), StoreError> {
        let event = Event {
            s: session.into(),
            b: Some(backend_id.into()),
            t: Some(task.clone()),
            forget: None,
        };
        let mut c = self.conn.clone();
        CREATE
            .key(keys::task(&task.id))
            .key(due)
            .key(keys::session_sub(session, "tasks"))
            .key(keys::session_sub(session, "live"))
            .key(keys::session(session))
            .arg(to_json(task))
            .arg(session)
            .arg(backend_id)
            .arg(&task.id)
            .arg(task.created_ms)
            .arg(to_json(&event))
            .arg(SESSION_TTL_S)
            .arg(EVENTS)
            .arg(WAKE)
            .invoke_async::<i64>(&mut c)
            .await?;
        Ok(())
    }

    /// A session's tasks with their task-service ids, oldest first.
    pub async fn session_tasks(&self, session: &str) -> Result<Vec<(Task, String)>, StoreError> {
        let mut c = self.conn.clone();
        let flat: Vec<String> = LOAD_SESSION
            .key(keys::session_sub(session, "tasks"))
            .arg(TASK_PREFIX)
            .invoke_async(&mut c)
            .await?;
        flat.chunks_exact(2)
            .map(|pair| Ok((from_json::<Task>(&pair[0])?, pair[1].clone())))
            .collect()
    }

    pub async fn load(&self, task_id: &str) -> Result<Option<Stored>, StoreError> {
        let mut c = self.conn.clone();
        let row: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(keys::task(task_id))
            .arg(&["task", "seq", "session", "backend", "track"])
            .query_async(&mut c)
            .await?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        stored_from([field(0), field(1), field(2), field(3), field(4)])
    }

    /// Saves `stored` (its task already committed with the next `seq` when
    /// it changed) if nobody changed the task since it was loaded at
    /// `loaded_seq` with the poll memory `loaded_track`, publishes a
    /// change, and moves the task's entry in its backend's delay queue
    /// `due`. Goes to Redis in the next batch of saves.
    pub async fn save(
        &self,
        stored: &Stored,
        due: &str,
        loaded_seq: u64,
        loaded_track: Track,
        next: NextDue,
        retention_s: u64,
    ) -> Result<Saved, StoreError> {
        let task = &stored.tracked.task;
        let changed = task.seq != loaded_seq;
        let (task_json, event_head) = if changed {
            // An `Event` with `t` last: the script appends the task's JSON.
            let head = format!(
                "{{\"s\":{},\"b\":{},\"t\":",
                to_json(&stored.session),
                to_json(&stored.backend_id)
            );
            (to_json(task), head)
        } else {
            (String::new(), String::new())
        };
        let track = if stored.tracked.track != loaded_track {
            to_json(&stored.tracked.track)
        } else {
            String::new()
        };
        let next = match next {
            NextDue::At(ms) => ms.to_string(),
            NextDue::Final => "final".into(),
            NextDue::Keep => "keep".into(),
        };
        let (reply, outcome) = oneshot::channel();
        let req = SaveReq {
            keys: [
                keys::task(&task.id),
                due.to_string(),
                keys::session_sub(&stored.session, "live"),
            ],
            args: [
                loaded_seq.to_string(),
                task_json,
                track,
                next,
                task.id.clone(),
                event_head,
                if task.state.is_final() { "1" } else { "0" }.into(),
                retention_s.max(1).to_string(),
            ],
            reply,
        };
        let saver = self.saves.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(save_batches(self.conn.clone(), rx));
            tx
        });
        if let Err(mpsc::error::SendError(req)) = saver.send(req) {
            // The batcher's runtime is gone (a store outliving it): alone.
            save_batch(&mut self.conn.clone(), vec![req]).await;
        }
        outcome.await.unwrap_or_else(|_| {
            Err(StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the batch of saves was dropped",
            ))))
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
            .key(keys::task(task_id))
            .key(keys::session_sub(session, "tasks"))
            .arg(session)
            .arg(task_id)
            .arg(to_json(&event))
            .arg(EVENTS)
            .invoke_async(&mut c)
            .await?;
        Ok(done == 1)
    }

    /// Claims up to `max` polls due by `now_ms` from the delay queue `due`,
    /// each leased until `lease_until` (a lease score, see `worker.rs`),
    /// then reads their tasks (one pipeline of `HMGET`s).
    pub async fn claim(
        &self,
        due: &str,
        now_ms: u64,
        max: usize,
        lease_until: f64,
    ) -> Result<Claimed, StoreError> {
        let mut c = self.conn.clone();
        let mut flat: Vec<String> = CLAIM
            .key(due)
            .arg(now_ms)
            .arg(max)
            .arg(lease_until)
            .invoke_async(&mut c)
            .await?;
        let next_due = flat.pop().and_then(|s| parse_score(&s));
        if flat.is_empty() {
            return Ok(Claimed {
                due: Vec::new(),
                next_due,
            });
        }
        let mut read = redis::pipe();
        for pair in flat.chunks_exact(2) {
            read.cmd("HMGET")
                .arg(keys::task(&pair[0]))
                .arg(&["task", "seq", "session", "backend", "track"]);
        }
        let rows: Vec<Vec<Option<String>>> = read.query_async(&mut c).await?;
        let claims = flat
            .chunks_exact(2)
            .zip(rows)
            .map(|(pair, row)| {
                let mut row = row.into_iter().map(Option::unwrap_or_default);
                let mut field = || row.next().unwrap_or_default();
                let fields = [field(), field(), field(), field(), field()];
                Claim {
                    id: pair[0].clone(),
                    due_ms: parse_score(&pair[1]).unwrap_or(0),
                    stored: stored_from(fields),
                }
            })
            .collect();
        Ok(Claimed {
            due: claims,
            next_due,
        })
    }

    /// Renews leases in the delay queue `due`: per `(id, held, new)`, the
    /// entry moves from score `held` to `new` if it still has `held`.
    /// Whether each was renewed.
    pub async fn renew(
        &self,
        due: &str,
        leases: &[(&str, f64, f64)],
    ) -> Result<Vec<bool>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn.clone();
        let mut call = RENEW.key(due);
        for (id, held, new) in leases {
            call.arg(*id).arg(*held).arg(*new);
        }
        let flags: Vec<i64> = call.invoke_async(&mut c).await?;
        Ok(flags.into_iter().map(|f| f == 1).collect())
    }

    /// Puts a claimed poll back into `due`, due at `due_ms` (a rate cap
    /// deferred it).
    pub async fn defer(&self, due: &str, task_id: &str, due_ms: u64) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        // XX: only if still queued (it may have turned final meanwhile).
        redis::cmd("ZADD")
            .arg(due)
            .arg("XX")
            .arg(due_ms)
            .arg(task_id)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Moves a claimed poll, still under the lease `held`, from the delay
    /// queue `from` to `to` (its task's own backend's), due at `due_ms`,
    /// and wakes that queue's workers. Whether it moved.
    pub async fn relocate(
        &self,
        from: &str,
        to: &str,
        task_id: &str,
        held: f64,
        due_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let moved: i64 = RELOCATE
            .key(from)
            .key(to)
            .arg(task_id)
            .arg(held)
            .arg(due_ms)
            .arg(WAKE)
            .invoke_async(&mut c)
            .await?;
        Ok(moved == 1)
    }

    /// Takes a task out of the delay queue `due`.
    pub async fn remove_due(&self, due: &str, task_id: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("ZREM")
            .arg(due)
            .arg(task_id)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Entries of the delay queue `due` (for tests and metrics).
    pub async fn queue_len(&self, due: &str) -> Result<u64, StoreError> {
        let mut c = self.conn.clone();
        Ok(redis::cmd("ZCARD").arg(due).query_async(&mut c).await?)
    }
}

/// Collects saves into batches: the first waits [`SAVE_LINGER`] for others
/// (at most [`SAVE_BATCH`]), then the batch goes as one script call; the
/// saves that arrive meanwhile form the next. The channel is unbounded
/// because its callers bound it: each is a poll holding a permit of its
/// backend, or a `cancel` of a connection holding a request permit.
async fn save_batches(conn: ConnectionManager, mut saves: mpsc::UnboundedReceiver<SaveReq>) {
    let mut batch = Vec::with_capacity(SAVE_BATCH);
    while let Some(first) = saves.recv().await {
        batch.push(first);
        let linger = tokio::time::sleep(SAVE_LINGER);
        tokio::pin!(linger);
        while batch.len() < SAVE_BATCH {
            tokio::select! {
                biased;
                more = saves.recv() => match more {
                    Some(req) => batch.push(req),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        save_batch(&mut conn.clone(), std::mem::take(&mut batch)).await;
    }
}

/// One script call for `batch`; each save's outcome to its caller.
async fn save_batch(conn: &mut ConnectionManager, batch: Vec<SaveReq>) {
    let mut call = SAVE_MANY.prepare_invoke();
    call.arg(EVENTS);
    for req in &batch {
        for key in &req.keys {
            call.key(key);
        }
        for arg in &req.args {
            call.arg(arg);
        }
    }
    let outcomes: Result<Vec<i64>, redis::RedisError> = call.invoke_async(conn).await;
    match outcomes {
        Ok(outcomes) => {
            for (req, outcome) in batch.into_iter().zip(outcomes) {
                let _ = req.reply.send(Ok(match outcome {
                    1 => Saved::Done,
                    0 => Saved::Conflict,
                    _ => Saved::Gone,
                }));
            }
        }
        Err(e) => {
            for req in batch {
                let _ = req.reply.send(Err(StoreError::Redis(e.clone())));
            }
        }
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
