//! A web process's subscription to task changes in Redis: every [`Event`]
//! on [`EVENTS`] goes into the mirror hub (which keeps it only for the
//! sessions connected here, and only when newer than what it has).
//!
//! Pub/sub is at-most-once: what is published while the subscription is
//! down is lost. Events carry a task's whole state, so a missed message is
//! made good by any later one; on a `seq` gap the listener also reads the
//! task from Redis. What no later message can make good is a missed *last*
//! message, so after every (re)subscription the listener reads every
//! mirrored session again from Redis. Redis drops a subscriber only by closing its connection (e.g. its
//! output buffer limit), which this loop sees and answers the same way.

use super::store::{Event, Store, StoreError, EVENTS, RETRY_MAX, RETRY_MIN};
use crate::hub::Hub;
use crate::metrics as m;
use crate::scheduler::SchedulerHandle;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub struct Listener {
    pub store: Store,
    pub hub: Hub,
    /// Expires finished tasks from the mirror after the retention.
    pub scheduler: SchedulerHandle,
    pub retention: Duration,
}

impl Listener {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut retry = RETRY_MIN;
        loop {
            match self.store.subscribe(EVENTS).await {
                Ok(mut pubsub) => match self.resync().await {
                    Err(e) => {
                        // Resubscribe and read again: a final state must not be missed.
                        tracing::warn!(error = %e, "resync after subscribing failed; retrying");
                    }
                    Ok(()) => {
                        retry = RETRY_MIN;
                        let mut messages = pubsub.on_message();
                        loop {
                            tokio::select! {
                                _ = shutdown.changed() => return,
                                msg = messages.next() => match msg {
                                    Some(msg) => self.handle(msg.get_payload_bytes()).await,
                                    None => break,
                                },
                            }
                        }
                        tracing::warn!("lost the Redis subscription; subscribing again");
                    }
                },
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to Redis; retrying"),
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    /// Reads every mirrored session again (after a subscription began).
    async fn resync(&self) -> Result<(), StoreError> {
        for session in self.hub.sessions() {
            for (task, backend_id) in self.store.session_tasks(&session).await? {
                self.apply(&session, Some(&backend_id), task).await;
            }
        }
        metrics::counter!(m::REDIS_RESYNCS).increment(1);
        Ok(())
    }

    async fn handle(&self, payload: &[u8]) {
        let event: Event = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable event on {EVENTS}");
                return;
            }
        };
        if let Some(id) = &event.forget {
            self.hub.forget_remote(&event.s, id);
        }
        if let Some(task) = event.t {
            let gap = self
                .hub
                .seq_of(&task.id)
                .is_some_and(|seq| task.seq > seq + 1);
            let id = task.id.clone();
            self.apply(&event.s, event.b.as_deref(), task).await;
            if gap {
                // A message was lost. This event carries the whole state,
                // so nothing is missing once it is applied; Redis is read
                // all the same, in case more was lost after it.
                metrics::counter!(m::REDIS_SEQ_GAPS).increment(1);
                match self.store.load(&id).await {
                    Ok(Some(stored)) => {
                        self.apply(
                            &stored.session,
                            Some(&stored.backend_id),
                            stored.tracked.task,
                        )
                        .await
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "reading a task after a seq gap failed"),
                }
            }
        }
    }

    async fn apply(&self, session: &str, backend_id: Option<&str>, task: app::protocol::Task) {
        let id: Arc<str> = task.id.as_str().into();
        let is_final = task.state.is_final();
        if self.hub.apply_remote(session, backend_id, task) && is_final {
            self.scheduler.expire_task(id, self.retention).await;
        }
    }
}
