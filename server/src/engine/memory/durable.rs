//! The memory engine's durable store: every task (with its session, its
//! task-service id, its last known state and `seq`) in one `redb` file
//! under `--data-dir`, so a restart — a deploy, a crash, SIGKILL — loses no
//! task a client was told about.
//!
//! - **Acknowledged is durable.** A new task is written, and the file
//!   synced, before its `accepted` goes out ([`Durable::flush`]); concurrent
//!   starts share one commit (group commit).
//! - **Progress is checkpointed**, not written per poll: changed tasks are
//!   marked dirty in the table and written together every
//!   [`CHECKPOINT_INTERVAL`]; after a crash the task service (the source of
//!   truth) is simply polled again.
//! - **`seq` never goes back**: a loaded task's `seq` is the checkpointed one
//!   plus [`SEQ_HEADROOM`], more changes than a task can make between two
//!   checkpoints (one per poll, at most one per millisecond).
//! - **Bounded by the retention**: expired and forgotten tasks are deleted
//!   from the file too; sessions are not stored apart (a session is its
//!   tasks), and the file is compacted every [`COMPACT_INTERVAL`].
//!
//! One thread owns the database and does every write, so no async task ever
//! blocks on the disk.

use super::table::{Table, CHECKPOINT_CHUNK};
use crate::task::{Track, Tracked};
use app::protocol::Task;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How often changed tasks are written.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the file is compacted (freed pages returned).
pub const COMPACT_INTERVAL: Duration = Duration::from_secs(600);
/// Added to a loaded task's `seq`: above any change it can have made after
/// its last checkpoint.
pub const SEQ_HEADROOM: u64 = 10_000;
/// redb's page cache. The checkpoint writes in key order, so each page is
/// read once per checkpoint whatever the cache holds: 1 MiB costs no more
/// CPU than 4 and ~3.5 MB less RSS at 10,000 tasks.
const CACHE_BYTES: usize = 1 << 20;
/// The file under `--data-dir`.
pub const FILE_NAME: &str = "taskwire.redb";

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");

/// One task as stored (JSON in the `tasks` table, keyed by task id).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub session: String,
    pub backend_id: String,
    pub task: Task,
    #[serde(default)]
    pub track: Track,
}

/// A [`Record`] borrowed from the table: serialised under its lock, so a
/// checkpoint copies no task (the same JSON as `Record`'s).
#[derive(Serialize)]
pub struct RecordRef<'a> {
    pub session: &'a str,
    pub backend_id: &'a str,
    pub task: &'a Task,
    pub track: Track,
}

/// A chunk of a checkpoint: changed tasks' records, serialised one after
/// another into one buffer (one allocation, not one per task), reused for
/// every chunk.
#[derive(Default)]
pub struct Batch {
    /// Every record's JSON, back to back.
    pub bytes: Vec<u8>,
    /// Each changed task and its record's range in `bytes` (`None`: gone).
    pub entries: Vec<(Arc<str>, Option<std::ops::Range<usize>>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("cannot create the data directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open taskwire's data file {path}: {source} (a damaged file is never replaced silently: move it away to start empty)")]
    Open { path: PathBuf, source: redb::Error },
    #[error("taskwire's data file {path} holds a task it cannot read ({id}): {source}")]
    Corrupt {
        path: PathBuf,
        id: String,
        source: serde_json::Error,
    },
    #[error("writing taskwire's data file failed: {0}")]
    Write(String),
    #[error("taskwire's data file is closed")]
    Closed,
}

enum Msg {
    /// Write what is dirty now, synced, then answer.
    Flush(oneshot::Sender<Result<(), String>>),
    /// Write what is dirty, then stop.
    Stop(oneshot::Sender<()>),
}

/// The handle of the writer thread (cheap to clone).
#[derive(Clone)]
pub struct Durable {
    // Unbounded, but bounded in practice: every sender waits for its answer,
    // so at most one message per start in flight (16 per connection).
    tx: mpsc::Sender<Msg>,
}

/// Opens (or creates) the file, reporting a damaged one as an error.
pub fn open(dir: &Path) -> Result<(Database, PathBuf), DurableError> {
    std::fs::create_dir_all(dir).map_err(|source| DurableError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(FILE_NAME);
    // A small page cache: the file is read once, at start-up, and written
    // in batches; redb's default cache would grow the RSS by tens of MB.
    let db = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(&path)
        .map_err(|e| DurableError::Open {
            path: path.clone(),
            source: e.into(),
        })?;
    Ok((db, path))
}

/// Every stored task, `seq` already raised by [`SEQ_HEADROOM`].
pub fn load(db: &Database, path: &Path) -> Result<Vec<Record>, DurableError> {
    let open_err = |e: redb::Error| DurableError::Open {
        path: path.to_path_buf(),
        source: e,
    };
    let txn = db.begin_read().map_err(|e| open_err(e.into()))?;
    let table = match txn.open_table(TASKS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(open_err(e.into())),
    };
    let mut out = Vec::new();
    for row in table.iter().map_err(|e| open_err(e.into()))? {
        let (k, v) = row.map_err(|e| open_err(e.into()))?;
        let mut record: Record =
            serde_json::from_slice(v.value()).map_err(|source| DurableError::Corrupt {
                path: path.to_path_buf(),
                id: k.value().to_string(),
                source,
            })?;
        record.task.seq = record.task.seq.saturating_add(SEQ_HEADROOM);
        out.push(record);
    }
    Ok(out)
}

impl Durable {
    /// Starts the writer thread over `db`, taking dirty tasks from `table`.
    pub fn start(db: Database, table: Table) -> Durable {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("taskwire-store".into())
            .spawn(move || writer(db, table, rx))
            .expect("a thread can be spawned");
        Durable { tx }
    }

    /// Writes every change made so far, synced to disk.
    pub async fn flush(&self) -> Result<(), DurableError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Msg::Flush(ack))
            .map_err(|_| DurableError::Closed)?;
        done.await
            .map_err(|_| DurableError::Closed)?
            .map_err(DurableError::Write)
    }

    /// Writes what is left and stops the writer (at shutdown).
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Stop(ack)).is_ok() {
            let _ = done.await;
        }
    }
}

fn writer(mut db: Database, table: Table, rx: mpsc::Receiver<Msg>) {
    let mut next_checkpoint = Instant::now() + CHECKPOINT_INTERVAL;
    let mut next_compact = Instant::now() + COMPACT_INTERVAL;
    let mut batch = Batch::default();
    loop {
        let mut acks = Vec::new();
        let mut stop: Option<Option<oneshot::Sender<()>>> = None;
        let wait = next_checkpoint.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Msg::Flush(ack)) => acks.push(ack),
            Ok(Msg::Stop(ack)) => stop = Some(Some(ack)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Every handle dropped: write what is left and stop.
            Err(mpsc::RecvTimeoutError::Disconnected) => stop = Some(None),
        }
        // Everyone waiting now shares this commit.
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Flush(ack) => acks.push(ack),
                Msg::Stop(ack) => stop = Some(Some(ack)),
            }
        }
        // In key order: each of the B-tree's pages is read and written once
        // per checkpoint. In the set's order (random) nearly every insert
        // missed the small page cache and read its page from the file again
        // (a sixth of the server's CPU at 10,000 tasks, in `pread`).
        let mut dirty = table.take_dirty();
        dirty.sort_unstable();
        let result = if dirty.is_empty() {
            Ok(())
        } else {
            write(&db, &table, &dirty, &mut batch).map_err(|e| e.to_string())
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "writing the data file failed; will retry");
            // Not lost: marked dirty again for the next try.
            table.mark_dirty(dirty);
        }
        for ack in acks {
            let _ = ack.send(result.clone());
        }
        if Instant::now() >= next_checkpoint {
            next_checkpoint = Instant::now() + CHECKPOINT_INTERVAL;
        }
        if let Some(ack) = stop {
            // Closed before the answer: whoever waits may open it again.
            drop(db);
            if let Some(ack) = ack {
                let _ = ack.send(());
            }
            return;
        }
        if Instant::now() >= next_compact {
            next_compact = Instant::now() + COMPACT_INTERVAL;
            if let Err(e) = db.compact() {
                tracing::warn!(error = %e, "compacting the data file failed");
            }
        }
    }
}

/// One synced transaction: the `dirty` tasks' upserts and deletes, their
/// records serialised [`CHECKPOINT_CHUNK`] at a time into `batch` (10,000
/// changed tasks are ~4 MB of JSON: never all in memory at once).
fn write(
    db: &Database,
    table: &Table,
    dirty: &[Arc<str>],
    batch: &mut Batch,
) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut tasks = txn.open_table(TASKS)?;
        for ids in dirty.chunks(CHECKPOINT_CHUNK) {
            table.serialise(ids, batch);
            for (id, record) in &batch.entries {
                match record {
                    Some(range) => {
                        tasks.insert(&**id, &batch.bytes[range.clone()])?;
                    }
                    None => {
                        tasks.remove(&**id)?;
                    }
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

impl Record {
    pub fn tracked(&self) -> Tracked {
        Tracked {
            task: self.task.clone(),
            track: self.track,
        }
    }
}
