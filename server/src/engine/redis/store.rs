//! The Redis engine's store: the few commands and scripts the web and
//! worker roles need. The changes a web process makes (a new task, a
//! session, an admitted start, a forgotten task) are one script each
//! (`lua/`), so they are atomic. A live task is written only by the owner
//! of its partition (`worker.rs`), with plain pipelined commands: every
//! change bumps its `seq` and publishes the new state on [`keys::EVENTS`];
//! a web process's `cancel` is handed to the owner ([`Store::push_cancel`]).
//! Key names: [`keys`]; every call touches the keys of one partition (one
//! hash tag), so it runs the same on one Redis and on a Redis Cluster
//! ([`super::conn`]).
//!
//! Writes are batched: a worker's writes of the same moment (polls that
//! finished within [`WRITE_LINGER`]) go to Redis as one pipeline (one per
//! partition on a cluster) and their changes as one message (a JSON array
//! of [`Event`]s). A poll whose task and poll memory did not change writes
//! nothing. The partition commands (leases, inboxes, live set) serve the
//! worker that owns partitions.

use super::conn::{self, Conn};
use super::keys::{self, EVENTS, PARTITIONS, PARTITION_COUNT, WAKE, WORKERS};
use crate::engine::admission::{Refusal, StartLimits, PENDING_STALE, START_WINDOW};
use crate::task::{Track, Tracked};
use app::protocol::Task;
use redis::Script;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
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

static RESOLVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/resolve.lua")));

static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/admit.lua")));

static CREATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/create.lua")));

/// Cancels a partition's cancel inbox keeps, at most.
const CANCELS_KEPT: usize = 10_000;

/// Writes per pipeline, at most.
const WRITE_BATCH: usize = 256;
/// How long the first write of a batch waits for others to join it: the
/// price, in staleness, of one pipeline and one message for many polls.
pub const WRITE_LINGER: Duration = Duration::from_millis(8);

static LOAD_SESSION: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/load_session.lua")));

static FORGET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/forget.lua")));

/// A worker's lease on a partition: renew or release (see `worker.rs`).
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/lease.lua")));

/// The fields of a task's hash the engine reads, in [`stored_from`]'s order.
const FIELDS: [&str; 5] = ["task", "seq", "session", "backend", "track"];

/// A connection to Redis or a Redis Cluster that reconnects by itself
/// (cheap to clone).
#[derive(Clone)]
pub struct Store {
    conn: Conn,
    /// Clients for pub/sub connections (a cluster's seeds, in turn).
    pubsub: Arc<[redis::Client]>,
    /// Whether `conn` is a cluster.
    cluster: bool,
    /// The batcher of writes ([`write_batches`]), started by the first.
    writes: Arc<OnceLock<mpsc::UnboundedSender<WriteReq>>>,
}

/// One owner's write of a task, waiting for its batch.
struct WriteReq {
    /// The task's partition: on a cluster a pipeline holds one partition's.
    part: u16,
    /// The task's hash.
    key: String,
    /// `HSET` field/value pairs.
    fields: Vec<(&'static str, String)>,
    /// The event to publish (a change), or none (poll memory only).
    event: Option<String>,
    /// Final: `(id, partition live set, session live set, retention s)`.
    ends: Option<(String, String, String, u64)>,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// A `cancel` handed to the owner of the task's partition: the task
/// service's answer (`None`: it does not know the task).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CancelReq {
    pub id: String,
    pub status: Option<crate::task_api::Status>,
}

impl Store {
    /// Connects lazily: the process starts even while Redis is down, and
    /// every call fails fast (about a second) until it is back. `url` names
    /// one Redis or a cluster ([`conn::cluster_seeds`]).
    pub fn open(url: &str) -> Result<Store, StoreError> {
        let target = conn::open(url)?;
        Ok(Store {
            conn: target.conn,
            pubsub: target.pubsub.into(),
            cluster: target.cluster,
            writes: Default::default(),
        })
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// A new pub/sub connection subscribed to `channel` (within 2 s), on
    /// the first node that answers.
    pub async fn subscribe(&self, channel: &str) -> Result<redis::aio::PubSub, StoreError> {
        let mut last = None;
        for client in self.pubsub.iter() {
            let connect = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::time::timeout(Duration::from_secs(2), connect).await {
                Ok(Ok(pubsub)) => return Ok(pubsub),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "subscribing timed out",
                    )))
                }
            }
        }
        Err(StoreError::Redis(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis node"))
        })))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut c).await?;
        Ok(())
    }

    /// Records the partition count on first use, and refuses a Redis whose
    /// data was written with another one (every key would be elsewhere).
    pub async fn check_partitions(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: Option<String> = redis::cmd("SET")
            .arg(PARTITION_COUNT)
            .arg(PARTITIONS)
            .arg("NX")
            .query_async(&mut c)
            .await?;
        let found: Option<String> = redis::cmd("GET")
            .arg(PARTITION_COUNT)
            .query_async(&mut c)
            .await?;
        match found.as_deref() {
            Some(n) if n != PARTITIONS.to_string() => Err(StoreError::Corrupt(format!(
                "this Redis holds data in {n} partitions; this taskwire uses {PARTITIONS}"
            ))),
            _ => Ok(()),
        }
    }

    /// Moves the data of the versions before partitions (`tw:task:{id}`,
    /// `tw:session:{token}…`, the `tw:due` sorted sets) to the partitioned
    /// names, once, on a single Redis (a cluster never held them): each
    /// session's keys into its partition, each task under its session's
    /// partition (live ones into the live set and the inbox, so their
    /// partition's owner polls them). Idempotent; one process at a time
    /// (a lock key). How many keys it moved.
    pub async fn migrate_unpartitioned(&self) -> Result<u64, StoreError> {
        if self.cluster {
            return Ok(0);
        }
        let mut c = self.conn.clone();
        // Done once for this Redis: no scan of its keys at every start.
        let done: Option<String> = redis::cmd("GET")
            .arg(PARTITION_COUNT)
            .query_async(&mut c)
            .await?;
        if done.is_some() {
            return Ok(0);
        }
        let lock: Option<String> = redis::cmd("SET")
            .arg("tw:migrating")
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(60_000)
            .query_async(&mut c)
            .await?;
        if lock.is_none() {
            return Ok(0);
        }
        let mut moved = 0;
        let mut cursor = 0u64;
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("tw:*")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            for key in found {
                if let Some(rest) = key.strip_prefix("tw:session:") {
                    let sub = ["tasks", "live", "starts", "pending"]
                        .iter()
                        .find_map(|w| rest.strip_suffix(&format!(":{w}")).map(|t| (t, *w)));
                    let new = match sub {
                        Some((token, what)) => keys::session_sub(token, what),
                        None => keys::session(rest),
                    };
                    let _: i64 = redis::cmd("RENAMENX")
                        .arg(&key)
                        .arg(new)
                        .query_async(&mut c)
                        .await?;
                    moved += 1;
                } else if let Some(id) = key.strip_prefix("tw:task:") {
                    let (session, fin): (Option<String>, Option<String>) = redis::cmd("HMGET")
                        .arg(&key)
                        .arg(&["session", "final"])
                        .query_async(&mut c)
                        .await?;
                    let Some(session) = session else { continue };
                    let part = keys::partition_of(&session);
                    let mut pipe = redis::pipe();
                    pipe.cmd("RENAMENX")
                        .arg(&key)
                        .arg(keys::task(part, id))
                        .ignore();
                    if fin.as_deref() != Some("1") {
                        pipe.sadd(keys::live(part), id)
                            .ignore()
                            .rpush(keys::inbox(part), id)
                            .ignore()
                            .publish(WAKE, part)
                            .ignore();
                    }
                    pipe.query_async::<()>(&mut c).await?;
                    moved += 1;
                } else if key == "tw:due" || key.starts_with("tw:due:") {
                    // Due times now live in the owners' memory.
                    let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut c).await?;
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        // The partitioned layout is in place: record its count.
        self.check_partitions().await?;
        let _: i64 = redis::cmd("DEL")
            .arg("tw:migrating")
            .query_async(&mut c)
            .await?;
        if moved > 0 {
            tracing::info!(moved, "moved Redis keys to the partitioned names");
        }
        Ok(moved)
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

    /// Records a new task in its session's partition, due for its first
    /// poll at once, and tells the web processes and the partition's owner.
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
        let part = keys::partition_of(session);
        let mut c = self.conn.clone();
        CREATE
            .key(keys::task(part, &task.id))
            .key(keys::live(part))
            .key(keys::inbox(part))
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
            .arg(part)
            .invoke_async::<i64>(&mut c)
            .await?;
        Ok(())
    }

    /// A session's tasks with their task-service ids, oldest first.
    pub async fn session_tasks(&self, session: &str) -> Result<Vec<(Task, String)>, StoreError> {
        let mut c = self.conn.clone();
        let flat: Vec<String> = LOAD_SESSION
            .key(keys::session_sub(session, "tasks"))
            .arg(keys::task_prefix(keys::partition_of(session)))
            .invoke_async(&mut c)
            .await?;
        flat.chunks_exact(2)
            .map(|pair| Ok((from_json::<Task>(&pair[0])?, pair[1].clone())))
            .collect()
    }

    /// Task `task_id` of `session` (`None`: gone, or another session's).
    pub async fn load(&self, session: &str, task_id: &str) -> Result<Option<Stored>, StoreError> {
        let mut c = self.conn.clone();
        let row: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(keys::task(keys::partition_of(session), task_id))
            .arg(&FIELDS)
            .query_async(&mut c)
            .await?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let stored = stored_from([field(0), field(1), field(2), field(3), field(4)])?;
        Ok(stored.filter(|s| s.session == session))
    }

    /// The session task `task_id` belongs to (its id names its partition).
    pub async fn session_of(&self, task_id: &str) -> Result<Option<String>, StoreError> {
        let mut c = self.conn.clone();
        Ok(redis::cmd("HGET")
            .arg(keys::task(keys::partition_of(task_id), task_id))
            .arg("session")
            .query_async(&mut c)
            .await?)
    }

    /// Writes a task its partition's owner changed: the task (when
    /// `changed`, with its new `seq`, and an event published) and its poll
    /// memory (when `track_changed`); a final task leaves the live sets and
    /// expires after `retention_s`. No compare-and-set: the owner is the
    /// only writer of its live tasks (a web process's `cancel` goes to the
    /// owner, [`Store::push_cancel`]). Goes in the next batch: one
    /// pipeline of plain commands and one published message.
    pub async fn write(
        &self,
        stored: &Stored,
        changed: bool,
        track_changed: bool,
        retention_s: u64,
    ) -> Result<(), StoreError> {
        let task = &stored.tracked.task;
        let part = keys::partition_of(&stored.session);
        let mut fields = Vec::with_capacity(4);
        let mut event = None;
        if changed {
            let json = to_json(task);
            // An `Event` with `t` last, the task's JSON written once.
            event = Some(format!(
                "{{\"s\":{},\"b\":{},\"t\":{json}}}",
                to_json(&stored.session),
                to_json(&stored.backend_id)
            ));
            fields.push(("task", json));
            fields.push(("seq", task.seq.to_string()));
            if task.state.is_final() {
                fields.push(("final", "1".into()));
            }
        }
        if track_changed {
            fields.push(("track", to_json(&stored.tracked.track)));
        }
        if fields.is_empty() {
            return Ok(());
        }
        let ends = (changed && task.state.is_final()).then(|| {
            (
                task.id.clone(),
                keys::live(part),
                keys::session_sub(&stored.session, "live"),
                retention_s.max(1),
            )
        });
        let (reply, outcome) = oneshot::channel();
        let req = WriteReq {
            part,
            key: keys::task(part, &task.id),
            fields,
            event,
            ends,
            reply,
        };
        let writer = self.writes.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(write_batches(self.conn.clone(), self.cluster, rx));
            tx
        });
        if let Err(mpsc::error::SendError(req)) = writer.send(req) {
            // The batcher's runtime is gone (a store outliving it): alone.
            write_batch(self.conn.clone(), self.cluster, vec![req]).await;
        }
        outcome.await.unwrap_or_else(|_| {
            Err(StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the batch of writes was dropped",
            ))))
        })
    }

    /// Hands a `cancel` of task `id` of `session` to its partition's owner
    /// (the partition's cancel inbox) and wakes it.
    pub async fn push_cancel(&self, session: &str, req: &CancelReq) -> Result<(), StoreError> {
        let part = keys::partition_of(session);
        let mut c = self.conn.clone();
        redis::pipe()
            .rpush(keys::cancels(part), to_json(req))
            .ignore()
            // Bounded, should no worker drain it for a long time (the task
            // service was told already; the owner's polls see the cancel).
            .ltrim(keys::cancels(part), -(CANCELS_KEPT as isize), -1)
            .ignore()
            .query_async::<()>(&mut c)
            .await?;
        redis::cmd("PUBLISH")
            .arg(WAKE)
            .arg(part)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Takes up to `max` cancels from the partition's cancel inbox.
    pub async fn take_cancels(&self, part: u16, max: usize) -> Result<Vec<CancelReq>, StoreError> {
        Ok(self
            .lpop(&keys::cancels(part), max)
            .await?
            .iter()
            .filter_map(|r| match from_json::<CancelReq>(r) {
                Ok(req) => Some(req),
                Err(e) => {
                    tracing::warn!(error = %e, "an unreadable cancel was dropped");
                    None
                }
            })
            .collect())
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
            .key(keys::task(keys::partition_of(session), task_id))
            .key(keys::session_sub(session, "tasks"))
            .arg(session)
            .arg(task_id)
            .arg(to_json(&event))
            .arg(EVENTS)
            .invoke_async(&mut c)
            .await?;
        Ok(done == 1)
    }

    /// A worker's heartbeat: it is live until `until_ms`; drops the workers
    /// whose heartbeat ended before `now_ms`. The live workers' ids, sorted.
    pub async fn heartbeat(
        &self,
        worker: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn.clone();
        let (mut live,): (Vec<String>,) = redis::pipe()
            .zadd(WORKERS, worker, until_ms)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(WORKERS)
            .arg("-inf")
            .arg(now_ms)
            .ignore()
            .zrange(WORKERS, 0, -1)
            .query_async(&mut c)
            .await?;
        live.sort();
        Ok(live)
    }

    /// A stopping worker leaves the list at once (its partitions released).
    pub async fn leave(&self, worker: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("ZREM")
            .arg(WORKERS)
            .arg(worker)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Takes partition `part` for `worker` for `lease_ms` if nobody holds
    /// it. Whether it did.
    pub async fn take(&self, part: u16, worker: &str, lease_ms: u64) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let ok: Option<String> = redis::cmd("SET")
            .arg(keys::owner(part))
            .arg(worker)
            .arg("NX")
            .arg("PX")
            .arg(lease_ms)
            .query_async(&mut c)
            .await?;
        Ok(ok.is_some())
    }

    /// Renews `worker`'s lease on `part` (`release`: drops it). Whether
    /// the lease was still the worker's.
    pub async fn lease(
        &self,
        part: u16,
        worker: &str,
        lease_ms: u64,
        release: bool,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let held: i64 = LEASE
            .key(keys::owner(part))
            .arg(worker)
            .arg(lease_ms)
            .arg(if release { "release" } else { "renew" })
            .invoke_async(&mut c)
            .await?;
        Ok(held == 1)
    }

    /// Takes up to `max` ids from the partition's inbox of new tasks.
    pub async fn take_new(&self, part: u16, max: usize) -> Result<Vec<String>, StoreError> {
        self.lpop(&keys::inbox(part), max).await
    }

    /// Takes up to `max` entries from the head of list `key`.
    async fn lpop(&self, key: &str, max: usize) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn.clone();
        let taken: Option<Vec<String>> = redis::cmd("LPOP")
            .arg(key)
            .arg(max)
            .query_async(&mut c)
            .await?;
        Ok(taken.unwrap_or_default())
    }

    /// Empties the partition's inbox (its new owner reads the live set).
    pub async fn clear_new(&self, part: u16) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("DEL")
            .arg(keys::inbox(part))
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// The ids of the partition's live tasks.
    pub async fn live_ids(&self, part: u16) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn.clone();
        Ok(redis::cmd("SMEMBERS")
            .arg(keys::live(part))
            .query_async(&mut c)
            .await?)
    }

    /// Reads tasks of partition `part` (one pipeline of `HMGET`s): each
    /// `None` when gone.
    pub async fn read(
        &self,
        part: u16,
        ids: &[String],
    ) -> Result<Vec<Result<Option<Stored>, StoreError>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn.clone();
        let mut read = redis::pipe();
        for id in ids {
            read.cmd("HMGET").arg(keys::task(part, id)).arg(&FIELDS);
        }
        let rows: Vec<Vec<Option<String>>> = read.query_async(&mut c).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let mut row = row.into_iter().map(Option::unwrap_or_default);
                let mut field = || row.next().unwrap_or_default();
                stored_from([field(), field(), field(), field(), field()])
            })
            .collect())
    }

    /// Takes a task that is gone (or final) out of its partition's live set.
    pub async fn drop_live(&self, part: u16, id: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("SREM")
            .arg(keys::live(part))
            .arg(id)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Live tasks of partition `part` (for tests and metrics).
    pub async fn live_len(&self, part: u16) -> Result<u64, StoreError> {
        let mut c = self.conn.clone();
        Ok(redis::cmd("SCARD")
            .arg(keys::live(part))
            .query_async(&mut c)
            .await?)
    }
}

/// Collects writes into batches: the first waits [`WRITE_LINGER`] for
/// others (at most [`WRITE_BATCH`]), then the batch goes as one pipeline of
/// plain commands with one published message — on a cluster one pipeline
/// per partition (a pipeline's keys must share a slot), all at once, then
/// the message. The next batch is collected meanwhile; at most
/// [`WRITES_IN_FLIGHT`] batches are in flight, over the same connection(s),
/// so a task's writes reach Redis in order. The channel is unbounded
/// because its callers bound it: each is a poll holding a permit of its
/// backend.
async fn write_batches(conn: Conn, cluster: bool, mut writes: mpsc::UnboundedReceiver<WriteReq>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(WRITES_IN_FLIGHT));
    while let Some(first) = writes.recv().await {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        batch.push(first);
        let linger = tokio::time::sleep(WRITE_LINGER);
        tokio::pin!(linger);
        while batch.len() < WRITE_BATCH {
            tokio::select! {
                biased;
                more = writes.recv() => match more {
                    Some(req) => batch.push(req),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let conn = conn.clone();
        tokio::spawn(async move {
            write_batch(conn, cluster, batch).await;
            drop(permit);
        });
    }
}

/// Batches of writes in flight at once, at most.
const WRITES_IN_FLIGHT: usize = 4;

/// Writes `batch`; the outcome to every writer. One Redis: one pipeline,
/// the message in it. A cluster: a pipeline per partition (a cluster
/// pipeline goes to one node, chosen by its keys), at once, then one
/// message with the changes of those that were written.
async fn write_batch(conn: Conn, cluster: bool, batch: Vec<WriteReq>) {
    let mut parts: HashMap<u16, Vec<WriteReq>> = HashMap::new();
    for req in batch {
        let group = if cluster { req.part } else { 0 };
        parts.entry(group).or_default().push(req);
    }
    let written = futures::future::join_all(parts.into_values().map(|reqs| {
        let mut conn = conn.clone();
        async move {
            let mut pipe = redis::pipe();
            let mut events = Vec::new();
            for req in &reqs {
                pipe.hset_multiple(&req.key, &req.fields).ignore();
                if let Some((id, live, session_live, retention)) = &req.ends {
                    pipe.srem(live, id)
                        .ignore()
                        .srem(session_live, id)
                        .ignore()
                        .expire(&req.key, *retention as i64)
                        .ignore();
                }
                if let Some(event) = &req.event {
                    events.push(event.clone());
                }
            }
            if !cluster && !events.is_empty() {
                pipe.publish(EVENTS, format!("[{}]", events.join(",")))
                    .ignore();
                events.clear();
            }
            let outcome: Result<(), redis::RedisError> = pipe.query_async(&mut conn).await;
            (reqs, outcome, events)
        }
    }))
    .await;
    let events: Vec<&str> = written
        .iter()
        .filter(|(_, outcome, _)| outcome.is_ok())
        .flat_map(|(_, _, events)| events.iter().map(String::as_str))
        .collect();
    let mut published = Ok(());
    if !events.is_empty() {
        let mut conn = conn.clone();
        published = redis::cmd("PUBLISH")
            .arg(EVENTS)
            .arg(format!("[{}]", events.join(",")))
            .query_async::<()>(&mut conn)
            .await;
    }
    for (reqs, outcome, _) in written {
        let outcome = outcome.and(published.clone());
        for req in reqs {
            let _ = req.reply.send(outcome.clone().map_err(StoreError::Redis));
        }
    }
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

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("our types always serialise")
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}
