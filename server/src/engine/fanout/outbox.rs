//! One connection's outgoing queue. Replies (`welcome`, `accepted`, `error`)
//! queue in order, bounded; task updates are coalesced to the newest state of
//! each task, so a slow reader costs one frame per subscribed task at most
//! and never misses a final state (a final state has the highest `seq` and so
//! is never replaced).

use crate::engine::hash::Map;
use axum::extract::ws::Utf8Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Updates coalesced on all connections since start (for metrics).
pub static COALESCED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Replies queued for one connection before it counts as not reading.
pub const MAX_QUEUED_REPLIES: usize = 256;
/// Replies queued past which the connection's reader stops reading frames
/// until the writer has sent some (backpressure: TCP then slows a sender
/// that does not read). Each frame read queues at most one reply at once
/// and each request in flight one more later, so with the reader paused
/// here the queue stays under [`MAX_QUEUED_REPLIES`] for any client whose
/// requests in flight stay under the margin.
pub const REPLY_HIGH_WATER: usize = MAX_QUEUED_REPLIES / 2;

/// Why a connection's writer stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The reader went away.
    Gone,
    /// The server is shutting down (close 1012).
    Restart,
    /// The client did not read its replies (close 1008).
    NotReading,
    /// The client sent a message over the size limit (close 1009).
    TooBig,
    /// The connection's watch token expired unrefreshed (close 1008, after
    /// what is queued, the `unauthorized` error last).
    Expired,
}

#[derive(Default)]
struct State {
    replies: VecDeque<Utf8Bytes>,
    updates: Map<Arc<str>, (u64, Utf8Bytes)>,
    order: VecDeque<Arc<str>>,
    closed: Option<CloseReason>,
}

/// Shared by the hub (which pushes) and the connection's writer (which pops).
/// A `std::sync::Mutex` is right: every critical section is a few pointer
/// moves and is never held across an `.await`.
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    /// Woken when replies drop below [`REPLY_HIGH_WATER`].
    room: Notify,
    coalesced: AtomicU64,
}

/// What the writer gets next.
pub enum Next {
    Frame(Utf8Bytes),
    Close(CloseReason),
    Empty,
}

impl Outbox {
    pub fn new() -> Arc<Self> {
        Arc::new(Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            room: Notify::new(),
            coalesced: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere never leaves the queue half-updated; carry on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a reply. A client that leaves this many replies unread is not
    /// reading: the connection is closed rather than the queue grown.
    pub fn push_reply(&self, frame: Utf8Bytes) {
        let mut s = self.lock();
        if s.closed.is_some() {
            return;
        }
        if s.replies.len() >= MAX_QUEUED_REPLIES {
            s.closed = Some(CloseReason::NotReading);
        } else {
            s.replies.push_back(frame);
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Queues the state `seq` of task `id`, replacing an older pending state.
    pub fn push_update(&self, id: &Arc<str>, seq: u64, frame: Utf8Bytes) {
        let mut s = self.lock();
        if s.closed.is_some() {
            return;
        }
        match s.updates.get_mut(id) {
            Some(pending) => {
                if seq > pending.0 {
                    *pending = (seq, frame);
                    self.coalesced.fetch_add(1, Ordering::Relaxed);
                    COALESCED_TOTAL.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            None => {
                s.updates.insert(id.clone(), (seq, frame));
                s.order.push_back(id.clone());
            }
        }
        drop(s);
        self.notify.notify_one();
    }

    pub fn close(&self, reason: CloseReason) {
        let mut s = self.lock();
        s.closed.get_or_insert(reason);
        drop(s);
        self.notify.notify_one();
        self.room.notify_waiters();
    }

    /// Replies first, then task updates in the order they first became pending.
    /// A restart still flushes what is queued; "not reading" does not.
    pub fn pop(&self) -> Next {
        let mut s = self.lock();
        if let Some(reason @ (CloseReason::Gone | CloseReason::NotReading | CloseReason::TooBig)) =
            s.closed
        {
            return Next::Close(reason);
        }
        if let Some(frame) = s.replies.pop_front() {
            if s.replies.len() < REPLY_HIGH_WATER {
                drop(s);
                self.room.notify_waiters();
            }
            return Next::Frame(frame);
        }
        while let Some(id) = s.order.pop_front() {
            if let Some((_, frame)) = s.updates.remove(&id) {
                return Next::Frame(frame);
            }
        }
        match s.closed {
            Some(reason) => Next::Close(reason),
            None => Next::Empty,
        }
    }

    /// Waits until something may have been pushed.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Waits until fewer than [`REPLY_HIGH_WATER`] replies are queued (or
    /// the connection is closing).
    pub async fn room_for_replies(&self) {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let s = self.lock();
                if s.replies.len() < REPLY_HIGH_WATER || s.closed.is_some() {
                    return;
                }
            }
            room.await;
        }
    }

    /// Replies queued, not yet sent.
    pub fn replies_len(&self) -> usize {
        self.lock().replies.len()
    }

    /// Pending frames (for tests and metrics).
    pub fn len(&self) -> usize {
        let s = self.lock();
        s.replies.len() + s.updates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Updates replaced by a newer state before they were sent.
    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s)
    }

    fn drain(o: &Outbox) -> Vec<String> {
        let mut out = vec![];
        while let Next::Frame(f) = o.pop() {
            out.push(f.as_str().to_string());
        }
        out
    }

    #[test]
    fn coalesces_to_the_newest_state_per_task_and_keeps_order() {
        let o = Outbox::new();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        o.push_update(&a, 1, frame("a1"));
        o.push_update(&b, 1, frame("b1"));
        o.push_update(&a, 2, frame("a2"));
        o.push_update(&a, 1, frame("a1-stale"));
        o.push_reply(frame("reply"));
        assert_eq!(drain(&o), ["reply", "a2", "b1"]);
        assert_eq!(o.coalesced(), 1);
        assert!(o.is_empty());
    }

    #[test]
    fn length_is_bounded_by_tasks_not_by_updates() {
        let o = Outbox::new();
        let ids: Vec<Arc<str>> = (0..10).map(|i| Arc::from(i.to_string())).collect();
        for seq in 0..1000 {
            for id in &ids {
                o.push_update(id, seq, frame("x"));
            }
        }
        assert_eq!(o.len(), 10);
    }

    #[test]
    fn too_many_unread_replies_close_the_connection() {
        let o = Outbox::new();
        for _ in 0..=MAX_QUEUED_REPLIES {
            o.push_reply(frame("r"));
        }
        assert!(matches!(o.pop(), Next::Close(CloseReason::NotReading)));
    }

    #[test]
    fn restart_flushes_before_closing() {
        let o = Outbox::new();
        o.push_reply(frame("last"));
        o.close(CloseReason::Restart);
        assert!(matches!(o.pop(), Next::Frame(_)));
        assert!(matches!(o.pop(), Next::Close(CloseReason::Restart)));
    }
}
