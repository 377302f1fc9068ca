//! Who hears of a task's final state besides its watchers: its webhook
//! (contract section 4), when webhooks are configured. Set once at start-up,
//! read by both engines' commits, so every final state — a poll's, a
//! cancel's, a give-up's — goes the same way.

use crate::webhook::Webhooks;
use app::protocol::Task;
use std::sync::{Arc, OnceLock};

/// Cheap to clone; all clones share one setting.
#[derive(Clone, Default)]
pub struct Finals(Arc<OnceLock<Webhooks>>);

impl Finals {
    pub fn set(&self, hooks: Webhooks) {
        let _ = self.0.set(hooks);
    }

    /// A final state was committed: its webhook, if the task has one, is
    /// queued, off the committing path (the caller may hold a lock).
    pub fn reached(&self, task: &Task) {
        if let Some(hooks) = self.0.get() {
            let (hooks, task) = (hooks.clone(), task.clone());
            tokio::spawn(async move { hooks.on_final(&task).await });
        }
    }
}
