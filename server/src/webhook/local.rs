//! The in-process delivery queue: registrations and pending deliveries in
//! maps, due times in one binary heap the loop sleeps on. With a data
//! directory, every change is written to a redb file of its own
//! ([`FILE_NAME`]) before it takes effect in memory, so a restart loses
//! neither a registration nor a delivery (one synced commit each: webhooks
//! are rare next to polls, so no group commit).

use super::store::{Claimed, Delivery, Enqueued};
use super::WebhookError;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The file under the data directory.
pub const FILE_NAME: &str = "webhooks.redb";
/// redb's page cache: the file is read once, at start-up.
const CACHE_BYTES: usize = 1 << 20;

/// task id → webhook URL.
const HOOKS: TableDefinition<&str, &str> = TableDefinition::new("hooks");
/// delivery id → [`Delivery`] as JSON.
const DELIVERIES: TableDefinition<&str, &[u8]> = TableDefinition::new("deliveries");

#[derive(Default)]
struct State {
    hooks: HashMap<String, String>,
    /// Every pending delivery, in flight or waiting.
    pending: HashMap<String, Delivery>,
    /// The waiting ones by due time (exactly those not in flight: an entry
    /// is popped when claimed and pushed again only by `retry`).
    due: BinaryHeap<Reverse<(u64, String)>>,
}

pub struct Local {
    // A std mutex: held for a few map operations, never across an await.
    state: Mutex<State>,
    /// `None` in memory, and once closed.
    file: Mutex<Option<Arc<Database>>>,
    durable: bool,
    path: PathBuf,
    max_queue: usize,
}

/// One synced write.
enum Op {
    Register(String, String),
    /// Drop the task's registration; queue the delivery if any.
    Take(String, Option<Delivery>),
    Put(Delivery),
    Remove(String),
}

impl Local {
    pub fn memory(max_queue: usize) -> Local {
        Local {
            state: Mutex::new(State::default()),
            file: Mutex::new(None),
            durable: false,
            path: PathBuf::new(),
            max_queue,
        }
    }

    /// Opens (or creates) the file and loads what it holds.
    pub async fn open(dir: &Path, max_queue: usize) -> Result<Local, WebhookError> {
        let dir = dir.to_path_buf();
        let path = dir.join(FILE_NAME);
        let p = path.clone();
        let (db, state) = tokio::task::spawn_blocking(move || -> Result<_, WebhookError> {
            std::fs::create_dir_all(&dir).map_err(|source| WebhookError::Dir {
                path: dir.clone(),
                source,
            })?;
            let open_err = |e: redb::Error| WebhookError::Open {
                path: p.clone(),
                source: e,
            };
            let db = redb::Builder::new()
                .set_cache_size(CACHE_BYTES)
                .create(&p)
                .map_err(|e| open_err(e.into()))?;
            let state = load(&db, &p)?;
            Ok((db, state))
        })
        .await
        .map_err(|e| WebhookError::Store(format!("loading the webhook file: {e}")))??;
        Ok(Local {
            state: Mutex::new(state),
            file: Mutex::new(Some(Arc::new(db))),
            durable: true,
            path,
            max_queue,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `op`, synced (nothing in memory).
    async fn write(&self, op: Op) -> Result<(), WebhookError> {
        if !self.durable {
            return Ok(());
        }
        let db = self
            .file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(WebhookError::Closed)?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write(&db, op))
            .await
            .map_err(|e| WebhookError::Store(e.to_string()))?
            .map_err(|e| WebhookError::Store(format!("writing {}: {e}", path.display())))
    }

    pub async fn register(&self, task_id: &str, url: &str) -> Result<(), WebhookError> {
        self.write(Op::Register(task_id.into(), url.into())).await?;
        self.state().hooks.insert(task_id.into(), url.into());
        Ok(())
    }

    pub async fn take_and_enqueue(
        &self,
        task_id: &str,
        make: impl FnOnce(String) -> Delivery,
    ) -> Result<Enqueued, WebhookError> {
        // Taken from the map first, under the lock: exactly once per task.
        let (url, full) = {
            let mut st = self.state();
            let Some(url) = st.hooks.remove(task_id) else {
                return Ok(Enqueued::NoHook);
            };
            let full = st.pending.len() >= self.max_queue;
            (url, full)
        };
        if full {
            self.write(Op::Take(task_id.into(), None)).await?;
            return Ok(Enqueued::Full);
        }
        let d = make(url);
        // Written before it is queued, so the loop never finishes (and
        // deletes) a delivery the file has not got yet. A failed write
        // still delivers from memory: better than not at all.
        let written = self.write(Op::Take(task_id.into(), Some(d.clone()))).await;
        let mut st = self.state();
        st.due.push(Reverse((d.due_ms, d.id.clone())));
        st.pending.insert(d.id.clone(), d);
        drop(st);
        written.map(|()| Enqueued::Queued)
    }

    pub fn claim(&self, now_ms: u64, max: usize) -> Claimed {
        let mut st = self.state();
        let mut due = Vec::new();
        while due.len() < max {
            match st.due.peek() {
                Some(Reverse((at, _))) if *at <= now_ms => {}
                _ => break,
            }
            let Some(Reverse((_, id))) = st.due.pop() else {
                break;
            };
            if let Some(d) = st.pending.get(&id) {
                due.push(d.clone());
            }
        }
        Claimed {
            due,
            next_due_ms: st.due.peek().map(|Reverse((at, _))| *at),
            depth: st.pending.len(),
        }
    }

    pub async fn done(&self, d: &Delivery) -> Result<(), WebhookError> {
        self.state().pending.remove(&d.id);
        self.write(Op::Remove(d.id.clone())).await
    }

    pub async fn retry(&self, d: &Delivery) -> Result<(), WebhookError> {
        let written = self.write(Op::Put(d.clone())).await;
        let mut st = self.state();
        st.due.push(Reverse((d.due_ms, d.id.clone())));
        st.pending.insert(d.id.clone(), d.clone());
        written
    }

    pub fn depth(&self) -> usize {
        self.state().pending.len()
    }

    /// Releases the file (the loop has stopped): the same directory may be
    /// opened again.
    pub fn close(&self) {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

fn load(db: &Database, path: &Path) -> Result<State, WebhookError> {
    let open_err = |e: redb::Error| WebhookError::Open {
        path: path.to_path_buf(),
        source: e,
    };
    let mut st = State::default();
    let txn = db.begin_read().map_err(|e| open_err(e.into()))?;
    match txn.open_table(HOOKS) {
        Ok(t) => {
            for row in t.iter().map_err(|e| open_err(e.into()))? {
                let (k, v) = row.map_err(|e| open_err(e.into()))?;
                st.hooks
                    .insert(k.value().to_string(), v.value().to_string());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(open_err(e.into())),
    }
    match txn.open_table(DELIVERIES) {
        Ok(t) => {
            for row in t.iter().map_err(|e| open_err(e.into()))? {
                let (k, v) = row.map_err(|e| open_err(e.into()))?;
                let d: Delivery =
                    serde_json::from_slice(v.value()).map_err(|e| WebhookError::Corrupt {
                        path: path.to_path_buf(),
                        id: k.value().to_string(),
                        source: e,
                    })?;
                st.due.push(Reverse((d.due_ms, d.id.clone())));
                st.pending.insert(d.id.clone(), d);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(open_err(e.into())),
    }
    Ok(st)
}

fn write(db: &Database, op: Op) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut hooks = txn.open_table(HOOKS)?;
        let mut deliveries = txn.open_table(DELIVERIES)?;
        match op {
            Op::Register(task, url) => {
                hooks.insert(task.as_str(), url.as_str())?;
            }
            Op::Take(task, d) => {
                hooks.remove(task.as_str())?;
                if let Some(d) = d {
                    put(&mut deliveries, &d)?;
                }
            }
            Op::Put(d) => put(&mut deliveries, &d)?,
            Op::Remove(id) => {
                deliveries.remove(id.as_str())?;
            }
        }
    }
    txn.commit()?;
    Ok(())
}

fn put(table: &mut redb::Table<&str, &[u8]>, d: &Delivery) -> Result<(), redb::Error> {
    let bytes = serde_json::to_vec(d).expect("a delivery always serialises");
    table.insert(d.id.as_str(), bytes.as_slice())?;
    Ok(())
}
