//! The Redis store's batched saves against a real `redis-server`: saves of
//! the same moment go to Redis together (one script call per partition),
//! and each keeps its own compare-and-set; the changes go out as one
//! message; a final task leaves its partition's live set.

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
    let task = new_task(session, "simulate", None, 1_000);
    store.create_session(session, 1_000).await.unwrap();
    store.create_task(session, &task, "b-1").await.unwrap();
    // The id falls in its session's partition: found from the id alone.
    assert_eq!(keys::partition_of(&task.id), keys::partition_of(session));
    assert_eq!(
        store.session_of(&task.id).await.unwrap().as_deref(),
        Some(session)
    );
    // Another session does not see it.
    assert!(store.load("s-other", &task.id).await.unwrap().is_none());
    store
        .load(session, &task.id)
        .await
        .unwrap()
        .expect("just created")
}

/// Whether task `id` is in its partition's live set.
async fn live(redis: &RedisServer, id: &str) -> bool {
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("SISMEMBER")
        .arg(keys::live(keys::partition_of(id)))
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
        store.save(&a, 0, track, NextDue::At(5_000), 60),
        store.save(&b, 0, track, NextDue::At(6_000), 60),
    );
    let mut outcomes = [sa.unwrap(), sb.unwrap()];
    outcomes.sort_by_key(|s| *s != Saved::Done);
    assert_eq!(outcomes, [Saved::Done, Saved::Conflict]);
    let now = store.load("s-1", &id).await.unwrap().unwrap().tracked.task;
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
    assert!(live(&redis, &id).await);
    // The new task was put in its partition's inbox for the owner.
    assert_eq!(
        store.take_new(keys::partition_of(&id), 10).await.unwrap(),
        vec![id.clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_save_in_the_same_batch_as_an_unchanged_one_leaves_the_queue() {
    let redis = RedisServer::start();
    let store = Store::open(&redis.url()).unwrap();
    let stored = created(&store, "s-2").await;
    let id = stored.tracked.task.id.clone();
    let track = stored.tracked.track;

    // A poll that changed nothing (it writes nothing) and a cancel that
    // ends the task, from the same seq, in one batch: both hold, in that
    // order, and the final task is out of the live set.
    let mut cancelled = stored.clone();
    cancelled.tracked.commit(app::protocol::Task {
        state: TaskState::Cancelled,
        ..cancelled.tracked.task.clone()
    });
    let (poll, cancel) = tokio::join!(
        store.save(&stored, 0, track, NextDue::At(5_000), 60),
        store.save(&cancelled, 0, track, NextDue::Final, 60),
    );
    assert_eq!(cancel.unwrap(), Saved::Done);
    assert!(matches!(poll.unwrap(), Saved::Done | Saved::Conflict));
    let now = store.load("s-2", &id).await.unwrap().unwrap().tracked.task;
    assert_eq!((now.state, now.seq), (TaskState::Cancelled, 1));
    assert!(!live(&redis, &id).await);

    // A task that is gone: the save says so.
    assert!(store.forget("s-2", &id).await.unwrap());
    assert_eq!(
        store
            .save(&cancelled, 1, track, NextDue::Final, 60)
            .await
            .unwrap(),
        Saved::Gone
    );
}

/// Data of a version before partitions (unpartitioned names, a `tw:due`
/// queue) is moved to the partitioned names on start: the session, its
/// tasks, and its live task into the live set and the owner's inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_the_unpartitioned_version_are_moved() {
    let redis = RedisServer::start();
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let session = "0123456789abcdef0123456789abcdef";
    let live_task = new_task(session, "simulate", None, 1_000);
    let mut done_task = new_task(session, "simulate", None, 1_000);
    done_task.id = "t-old-done".into();
    done_task.state = TaskState::Succeeded;
    for (task, fin) in [(&live_task, 0), (&done_task, 1)] {
        redis::pipe()
            .hset_multiple(
                format!("tw:task:{}", task.id),
                &[
                    ("task", serde_json::to_string(task).unwrap()),
                    ("seq", "0".into()),
                    ("session", session.into()),
                    ("backend", "b-1".into()),
                    ("track", "{}".into()),
                    ("final", fin.to_string()),
                ],
            )
            .zadd(format!("tw:session:{session}:tasks"), &task.id, 1_000)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
    redis::pipe()
        .hset(format!("tw:session:{session}"), "created", 1_000)
        .sadd(format!("tw:session:{session}:live"), &live_task.id)
        .zadd("tw:due", &live_task.id, 5_000)
        .query_async::<()>(&mut c)
        .await
        .unwrap();

    let store = Store::open(&redis.url()).unwrap();
    assert_eq!(store.migrate_unpartitioned().await.unwrap(), 5);
    assert!(store.session_exists(session).await.unwrap());
    let listed = store.session_tasks(session).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(store.load(session, &live_task.id).await.unwrap().is_some());
    assert!(live(&redis, &live_task.id).await);
    let part = keys::partition_of(session);
    assert_eq!(
        store.take_new(part, 10).await.unwrap(),
        vec![live_task.id.clone()]
    );
    let due: bool = redis::cmd("EXISTS")
        .arg("tw:due")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!due, "the old queue is gone");
    // Once moved, nothing more to move.
    assert_eq!(store.migrate_unpartitioned().await.unwrap(), 0);
}
