//! A web process's subscription to task changes in Redis: every [`Event`]
//! on [`EVENTS`] (one, or a batch of saves' as a JSON array) goes into the
//! fanout (which keeps it only for the sessions
//! connected here, and only when newer than what it has). Finished tasks
//! leave the fanout after the retention, from this loop's own delay queue.
//!
//! Pub/sub is at-most-once: what is published while the subscription is
//! down is lost. Events carry a task's whole state, so a missed message is
//! made good by any later one; on a `seq` gap the listener also reads the
//! task from Redis. What no later message can make good is a missed *last*
//! message, so after every (re)subscription the listener reads every
//! mirrored session again from Redis, and again [`RESYNC_AGAIN`] later: on
//! a Redis Cluster the subscription is on one node, and a node that has
//! just come back relays the other nodes' messages only once its cluster
//! bus is connected again, which can be after the first read. Redis drops
//! a subscriber only by closing its connection (e.g. its output buffer
//! limit), which this loop sees and answers the same way.

use super::keys::EVENTS;
use super::store::{Event, Store, StoreError, RETRY_MAX, RETRY_MIN};
use crate::engine::fanout::Fanout;
use crate::metrics as m;
use app::protocol::Task;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::time::DelayQueue;

/// After a (re)subscription, the mirrored sessions are read again at each
/// of these delays (see the module's doc).
const RESYNC_AGAIN: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(3),
    Duration::from_secs(10),
];

pub struct Listener {
    pub store: Store,
    pub fanout: Fanout,
    pub retention: Duration,
    /// `(session, task)` of finished tasks, due when they leave the fanout.
    pub expiries: DelayQueue<(Arc<str>, Arc<str>)>,
}

impl Listener {
    pub fn new(store: Store, fanout: Fanout, retention: Duration) -> Self {
        Listener {
            store,
            fanout,
            retention,
            expiries: DelayQueue::new(),
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
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
                        // One timer for the later reads, moved on after each
                        // (not a new one per message).
                        let subscribed = tokio::time::Instant::now();
                        let mut again = RESYNC_AGAIN.iter().map(|d| subscribed + *d);
                        let mut pending = true;
                        let resync_at =
                            tokio::time::sleep_until(again.next().unwrap_or(subscribed));
                        tokio::pin!(resync_at);
                        loop {
                            tokio::select! {
                                _ = shutdown.changed() => return,
                                _ = &mut resync_at, if pending => {
                                    if let Err(e) = self.resync().await {
                                        tracing::warn!(error = %e, "reading the sessions again failed");
                                    }
                                    match again.next() {
                                        Some(at) => resync_at.as_mut().reset(at),
                                        None => pending = false,
                                    }
                                }
                                msg = messages.next() => match msg {
                                    Some(msg) => self.handle(msg.get_payload_bytes()).await,
                                    None => break,
                                },
                                Some(expired) = self.expiries.next(), if !self.expiries.is_empty() => {
                                    let (session, task) = expired.into_inner();
                                    self.fanout.forget(&session, &task);
                                }
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
    async fn resync(&mut self) -> Result<(), StoreError> {
        for session in self.fanout.sessions() {
            for (task, _) in self.store.session_tasks(&session).await? {
                self.apply(&session, &task);
            }
        }
        metrics::counter!(m::REDIS_RESYNCS).increment(1);
        Ok(())
    }

    async fn handle(&mut self, payload: &[u8]) {
        let events = if payload.first() == Some(&b'[') {
            serde_json::from_slice::<Vec<Event>>(payload)
        } else {
            serde_json::from_slice::<Event>(payload).map(|e| vec![e])
        };
        match events {
            Ok(events) => {
                for event in events {
                    self.handle_one(event).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "unreadable event on {EVENTS}"),
        }
    }

    async fn handle_one(&mut self, event: Event) {
        if let Some(id) = &event.forget {
            self.fanout.forget(&event.s, id);
        }
        if let Some(task) = event.t {
            let gap = self
                .fanout
                .seq_of(&task.id)
                .is_some_and(|seq| task.seq > seq + 1);
            let id = task.id.clone();
            self.apply(&event.s, &task);
            if gap {
                // A message was lost. This event carries the whole state,
                // so nothing is missing once it is applied; Redis is read
                // all the same, in case more was lost after it.
                metrics::counter!(m::REDIS_SEQ_GAPS).increment(1);
                match self.store.load(&event.s, &id).await {
                    Ok(Some(stored)) => self.apply(&stored.session, &stored.tracked.task),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "reading a task after a seq gap failed"),
                }
            }
        }
    }

    fn apply(&mut self, session: &str, task: &Task) {
        if self.fanout.apply(session, task) && task.state.is_final() {
            self.expiries
                .insert((session.into(), task.id.as_str().into()), self.retention);
        }
    }
}
