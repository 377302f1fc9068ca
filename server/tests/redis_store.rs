//! The Redis store's batched saves against a real `redis-server`: saves of
//! the same moment go to Redis together (one script call), and each keeps
//! its own compare-and-set; the changes go out as one message.

mod common;

use app::protocol::TaskState;
use common::redis_server::RedisServer;
use futures::StreamExt;
use server::engine::redis::keys;
use server::engine::redis::store::{Event, Saved, Store, Stored};
use server::task::new_task;
use server::task::policy::NextDue;
use std::time::Duration;

async fn created(store: &Store, session: &str) -> Stored {
    let task = new_task("simulate", None, 1_000);
    store.create_session(session, 1_000).await.unwrap();
    store
        .create_task(session, &task, "b-1", keys::DUE)
        .await
        .unwrap();
    store.load(&task.id).await.unwrap().expect("just created")
}

async fn due_score(redis: &RedisServer, id: &str) -> Option<f64> {
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("ZSCORE")
        .arg(keys::DUE)
        .arg(id)
        .query_async(&mut c)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_of_one_moment_keep_each_compare_and_set() {
    let redis = RedisServer::start();
    let store = Store::open(&redis.url()).unwrap();
    let stored = created(&store, "s-1").await;
    let id = stored.tracked.task.id.clone();
    let mut pubsub = store.subscribe(keys::EVENTS).await.unwrap();

    // Two writers change the task from the same seq, at once: one wins.
    let mut a = stored.clone();
    a.tracked.commit(app::protocol::Task {
        done: 1,
        state: TaskState::Running,
        ..a.tracked.task.clone()
    });
    let mut b = stored.clone();
    b.tracked.commit(app::protocol::Task {
        done: 2,
        state: TaskState::Running,
        ..b.tracked.task.clone()
    });
    let track = stored.tracked.track;
    let (sa, sb) = tokio::join!(
        store.save(&a, keys::DUE, 0, track, NextDue::At(5_000), 60),
        store.save(&b, keys::DUE, 0, track, NextDue::At(6_000), 60),
    );
    let mut outcomes = [sa.unwrap(), sb.unwrap()];
    outcomes.sort_by_key(|s| *s != Saved::Done);
    assert_eq!(outcomes, [Saved::Done, Saved::Conflict]);
    let now = store.load(&id).await.unwrap().unwrap().tracked.task;
    assert_eq!(now.seq, 1);
    assert!(now.done == 1 || now.done == 2);

    // One message for the batch: a JSON array holding the winner's change.
    let msg = tokio::time::timeout(Duration::from_secs(2), pubsub.on_message().next())
        .await
        .expect("an event")
        .unwrap();
    let events: Vec<Event> = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].s.as_str(), events[0].b.as_deref()),
        ("s-1", Some("b-1"))
    );
    assert_eq!(events[0].t.as_ref().unwrap().done, now.done);
    assert_eq!(
        due_score(&redis, &id).await,
        Some(if now.done == 1 { 5_000.0 } else { 6_000.0 })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_save_in_the_same_batch_as_an_unchanged_one_leaves_the_queue() {
    let redis = RedisServer::start();
    let store = Store::open(&redis.url()).unwrap();
    let stored = created(&store, "s-2").await;
    let id = stored.tracked.task.id.clone();
    let track = stored.tracked.track;

    // A poll that changed nothing (it only moves the queue entry) and a
    // cancel that ends the task, from the same seq, in one batch: both
    // hold, in that order, and the final task is out of the queue.
    let mut cancelled = stored.clone();
    cancelled.tracked.commit(app::protocol::Task {
        state: TaskState::Cancelled,
        ..cancelled.tracked.task.clone()
    });
    let (poll, cancel) = tokio::join!(
        store.save(&stored, keys::DUE, 0, track, NextDue::At(5_000), 60),
        store.save(&cancelled, keys::DUE, 0, track, NextDue::Final, 60),
    );
    assert_eq!(cancel.unwrap(), Saved::Done);
    assert!(matches!(poll.unwrap(), Saved::Done | Saved::Conflict));
    let now = store.load(&id).await.unwrap().unwrap().tracked.task;
    assert_eq!((now.state, now.seq), (TaskState::Cancelled, 1));
    assert_eq!(due_score(&redis, &id).await, None);

    // A task that is gone: the save says so and drops its queue entry.
    assert!(store.forget("s-2", &id).await.unwrap());
    assert_eq!(
        store
            .save(&cancelled, keys::DUE, 1, track, NextDue::Final, 60)
            .await
            .unwrap(),
        Saved::Gone
    );
}
