//! Property tests of a connection's outbox (`server::hub::outbox::Outbox`):
//! a random interleaving of task updates (increasing `seq` per task), replies
//! and reads, checked against what the contract promises a slow client:
//! `seq` never decreases, the final state always arrives, the queue is
//! bounded by tasks rather than by updates, and replies keep their order.
//!
//! Each property runs 2,000 cases; `PROPTEST_CASES=N` overrides that.

use axum::extract::ws::Utf8Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use server::engine::fanout::outbox::{CloseReason, Next, Outbox, MAX_QUEUED_REPLIES};
use std::sync::Arc;

/// Cases per property: 2,000 unless `PROPTEST_CASES` says otherwise.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(2_000);
    ProptestConfig {
        cases,
        // A failure prints its minimal input; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Most tasks one connection watches in these scenarios.
const MAX_TASKS: usize = 20;

#[derive(Clone, Debug)]
enum Op {
    /// The hub publishes the next state of task `.0`, `seq` advanced by `.1`.
    Update(usize, u64),
    /// The hub queues a reply.
    Reply,
    /// The connection's writer reads one frame.
    Pop,
}

/// `(K, ops)`: K tasks, and a reader whose speed (share of pops) varies from
/// one scenario to the next, from nearly stalled to keeping up.
fn scenario() -> impl Strategy<Value = (usize, Vec<Op>)> {
    (1..=MAX_TASKS, 1u32..=12).prop_flat_map(|(k, pop_weight)| {
        let op = prop_oneof![
            8 => (0..k, 1u64..=3).prop_map(|(t, gap)| Op::Update(t, gap)),
            1 => Just(Op::Reply),
            pop_weight => Just(Op::Pop),
        ];
        (Just(k), vec(op, 0..400))
    })
}

/// What a popped frame says: a reply's number, or a task's state.
#[derive(Debug, PartialEq)]
enum Popped {
    Reply(usize),
    Update { task: usize, seq: u64, last: bool },
    Empty,
    Close(CloseReason),
}

fn pop(outbox: &Outbox) -> Popped {
    match outbox.pop() {
        Next::Frame(f) => {
            let text = f.as_str();
            if let Some(n) = text.strip_prefix("reply:") {
                return Popped::Reply(n.parse().unwrap());
            }
            // "task:seq:final?"
            let mut parts = text.split(':');
            let task = parts.next().unwrap().parse().unwrap();
            let seq = parts.next().unwrap().parse().unwrap();
            let last = match parts.next().unwrap() {
                "final" => true,
                "live" => false,
                other => panic!("bad frame {text}: {other}"),
            };
            Popped::Update { task, seq, last }
        }
        Next::Empty => Popped::Empty,
        Next::Close(reason) => Popped::Close(reason),
    }
}

fn update_frame(task: usize, seq: u64, last: bool) -> Utf8Bytes {
    Utf8Bytes::from(format!(
        "{task}:{seq}:{}",
        if last { "final" } else { "live" }
    ))
}

/// What the reader has seen, and what the hub has pushed.
struct Reader {
    /// Per task: newest `seq` pushed.
    pushed: Vec<Option<u64>>,
    /// Per task: the frames popped, in order.
    popped: Vec<Vec<(u64, bool)>>,
    replies_pushed: usize,
    replies_popped: usize,
}

impl Reader {
    fn unread_replies(&self) -> usize {
        self.replies_pushed - self.replies_popped
    }

    /// Tasks whose newest pushed state the reader has not popped yet.
    fn pending_tasks(&self) -> usize {
        (0..self.pushed.len())
            .filter(|&t| self.pushed[t] != self.popped[t].last().map(|&(seq, _)| seq))
            .count()
    }

    /// Pops one frame and checks it; `false` once the queue is empty.
    fn read(&mut self, outbox: &Outbox) -> Result<bool, TestCaseError> {
        match pop(outbox) {
            Popped::Reply(n) => {
                // (d) replies in the order pushed, none lost or repeated.
                prop_assert_eq!(n, self.replies_popped, "replies out of order");
                self.replies_popped += 1;
            }
            Popped::Update { task, seq, last } => {
                // Replies go first.
                prop_assert_eq!(self.unread_replies(), 0, "an update before a reply");
                // (a) strictly increasing seq per task: no step back, no repeat.
                if let Some(&(prev, _)) = self.popped[task].last() {
                    prop_assert!(seq > prev, "task {}: seq {} after {}", task, seq, prev);
                }
                // Coalesced to the newest state: never an outdated one.
                prop_assert_eq!(Some(seq), self.pushed[task], "task {} stale", task);
                self.popped[task].push((seq, last));
            }
            Popped::Empty => {
                prop_assert_eq!(self.unread_replies(), 0, "empty with a reply unread");
                prop_assert_eq!(self.pending_tasks(), 0, "empty with an update pending");
                return Ok(false);
            }
            Popped::Close(reason) => {
                prop_assert!(false, "closed ({:?}) with fewer than 256 replies", reason)
            }
        }
        Ok(true)
    }
}

/// Runs the scenario and checks properties (a) to (d) along the way.
fn run(k: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let ids: Vec<Arc<str>> = (0..k).map(|t| Arc::from(format!("task-{t}"))).collect();
    // Each task's seqs, and which push is its last (its final state).
    let mut seq = vec![0u64; k];
    let mut last_push = vec![None; k];
    let planned: Vec<Option<u64>> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| match op {
            Op::Update(t, gap) => {
                seq[*t] += gap;
                last_push[*t] = Some(i);
                Some(seq[*t])
            }
            _ => None,
        })
        .collect();
    let final_seq = seq;

    let outbox = Outbox::new();
    let mut reader = Reader {
        pushed: vec![None; k],
        popped: vec![vec![]; k],
        replies_pushed: 0,
        replies_popped: 0,
    };
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Update(t, _) => {
                let s = planned[i].unwrap();
                outbox.push_update(&ids[*t], s, update_frame(*t, s, last_push[*t] == Some(i)));
                reader.pushed[*t] = Some(s);
            }
            // Fewer than 256 replies in all, so the queue never closes.
            Op::Reply if reader.replies_pushed < MAX_QUEUED_REPLIES - 1 => {
                let n = reader.replies_pushed;
                outbox.push_reply(Utf8Bytes::from(format!("reply:{n}")));
                reader.replies_pushed += 1;
            }
            Op::Reply => {}
            Op::Pop => {
                reader.read(&outbox)?;
            }
        }
        // (c) bounded by tasks, not by updates: one pending frame per task.
        let len = outbox.len();
        prop_assert!(
            len <= k + reader.unread_replies(),
            "len {} after op {}",
            len,
            i
        );
        prop_assert_eq!(len, reader.pending_tasks() + reader.unread_replies());
    }

    // The pushes end; the reader drains.
    let mut reads = 0;
    while reader.read(&outbox)? {
        reads += 1;
        prop_assert!(reads <= k + MAX_QUEUED_REPLIES, "the queue does not drain");
    }
    prop_assert_eq!(outbox.len(), 0);
    prop_assert_eq!(reader.replies_popped, reader.replies_pushed);
    // (b) each task's last popped frame is its final state.
    for t in 0..k {
        match last_push[t] {
            Some(_) => prop_assert_eq!(
                reader.popped[t].last(),
                Some(&(final_seq[t], true)),
                "task {} did not end on its final state",
                t
            ),
            None => prop_assert!(reader.popped[t].is_empty()),
        }
    }
    Ok(())
}

/// `n` replies with task updates mixed in anywhere, then the first read.
fn replies_then_read() -> impl Strategy<Value = (usize, Vec<(Index, usize)>)> {
    (
        prop_oneof![
            0..=MAX_QUEUED_REPLIES + 64,
            Just(MAX_QUEUED_REPLIES),
            Just(MAX_QUEUED_REPLIES + 1)
        ],
        vec((any::<Index>(), 0..MAX_TASKS), 0..40),
    )
}

proptest! {
    #![proptest_config(config())]

    /// (a) seq strictly increasing per task, (b) final states always read
    /// last, (c) len() ≤ K + unread replies, (d) replies in order.
    #[test]
    fn coalescing_keeps_order_bound_and_final_states((k, ops) in scenario()) {
        run(k, &ops)?;
    }

    /// Up to 256 unread replies are kept and read in order; the 257th closes
    /// the connection as not reading, and it stays closed.
    #[test]
    fn the_257th_unread_reply_closes((n, updates) in replies_then_read()) {
        let outbox = Outbox::new();
        let ids: Vec<Arc<str>> = (0..MAX_TASKS).map(|t| Arc::from(format!("task-{t}"))).collect();
        let mut at: Vec<(usize, usize)> = updates.iter().map(|(i, t)| (i.index(n + 1), *t)).collect();
        at.sort_by_key(|&(i, _)| i);
        let mut at = at.into_iter().peekable();
        let mut seq = 0;
        for r in 0..=n {
            while let Some((_, t)) = at.next_if(|&(i, _)| i == r) {
                seq += 1;
                outbox.push_update(&ids[t], seq, update_frame(t, seq, false));
            }
            if r < n {
                outbox.push_reply(Utf8Bytes::from(format!("reply:{r}")));
            }
        }
        if n > MAX_QUEUED_REPLIES {
            prop_assert_eq!(pop(&outbox), Popped::Close(CloseReason::NotReading));
            // Closed for good: later pushes are dropped, reads keep closing.
            outbox.push_reply(Utf8Bytes::from("reply:late".to_string()));
            outbox.push_update(&ids[0], u64::MAX, update_frame(0, u64::MAX, true));
            prop_assert_eq!(pop(&outbox), Popped::Close(CloseReason::NotReading));
        } else {
            for r in 0..n {
                prop_assert_eq!(pop(&outbox), Popped::Reply(r));
            }
            let mut updates = 0;
            loop {
                match pop(&outbox) {
                    Popped::Update { .. } => updates += 1,
                    Popped::Empty => break,
                    other => prop_assert!(false, "after the replies: {:?}", other),
                }
            }
            prop_assert!(updates <= MAX_TASKS);
        }
    }
}

/// The case exactly: 257 replies, nothing read.
#[test]
fn pushing_257_replies_without_reading_closes() {
    let outbox = Outbox::new();
    for r in 0..257 {
        outbox.push_reply(Utf8Bytes::from(format!("reply:{r}")));
    }
    assert_eq!(pop(&outbox), Popped::Close(CloseReason::NotReading));
}
