//! The Redis store against a real `redis-server`: an owner's writes of the
//! same moment go to Redis together and their changes out as one message;
//! a final task leaves its partition's live set; a web process's cancel
//! waits in the partition's cancel inbox; data of the unpartitioned
//! version is moved.

mod common;

use app::protocol::TaskState;
use common::redis_server::RedisServer;
use futures::StreamExt;
use server::engine::redis::keys;
use server::engine::redis::store::{CancelReq, Event, Store, Stored};
use server::task::new_task;
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
async fn writes_of_one_moment_go_together_as_one_message() {
    let redis = RedisServer::start();
    let store = Store::open(&redis.url()).unwrap();
    let a = created(&store, "s-1").await;
    let b = created(&store, "s-2").await;
    let mut pubsub = store.subscribe(keys::EVENTS).await.unwrap();

    // The owner's changes of two tasks (two sessions, so two partitions
    // most likely), at once: one message with both.
    let step = |s: &Stored, done| {
        let mut s = s.clone();
        s.tracked.commit(app::protocol::Task {
            done,
            state: TaskState::Running,
            ..s.tracked.task.clone()
        });
        s
    };
    let (a1, b1) = (step(&a, 1), step(&b, 2));
    let (wa, wb) = tokio::join!(
        store.write(&a1, true, false, 60),
        store.write(&b1, true, false, 60),
    );
    wa.unwrap();
    wb.unwrap();
    let now_a = store
        .load("s-1", &a.tracked.task.id)
        .await
        .unwrap()
        .unwrap();
    let now_b = store
        .load("s-2", &b.tracked.task.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((now_a.tracked.task.seq, now_a.tracked.task.done), (1, 1));
    assert_eq!((now_b.tracked.task.seq, now_b.tracked.task.done), (1, 2));

    let msg = tokio::time::timeout(Duration::from_secs(2), pubsub.on_message().next())
        .await
        .expect("an event")
        .unwrap();
    let events: Vec<Event> = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
    assert_eq!(events.len(), 2);
    let mut sessions: Vec<_> = events
        .iter()
        .map(|e| (e.s.as_str(), e.b.as_deref(), e.t.as_ref().unwrap().done))
        .collect();
    sessions.sort();
    assert_eq!(sessions, [("s-1", Some("b-1"), 1), ("s-2", Some("b-1"), 2)]);
    assert!(live(&redis, &a.tracked.task.id).await);
    // The new tasks were put in their partitions' inboxes for the owners.
    let id = a.tracked.task.id.clone();
    assert!(store
        .take_new(keys::partition_of(&id), 10)
        .await
        .unwrap()
        .contains(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_write_leaves_the_live_sets_and_a_cancel_waits_for_the_owner() {
    let redis = RedisServer::start();
    let store = Store::open(&redis.url()).unwrap();
    let stored = created(&store, "s-2").await;
    let id = stored.tracked.task.id.clone();

    // Nothing changed: nothing written.
    store.write(&stored, false, false, 60).await.unwrap();
    let now = store.load("s-2", &id).await.unwrap().unwrap().tracked.task;
    assert_eq!(now.seq, 0);

    // A cancel from a web process goes to the partition's cancel inbox.
    let req = CancelReq {
        id: id.clone(),
        status: None,
    };
    store.push_cancel("s-2", &req).await.unwrap();
    let part = keys::partition_of("s-2");
    let taken = store.take_cancels(part, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(
        (taken[0].id.as_str(), taken[0].status.is_none()),
        (id.as_str(), true)
    );
    assert!(store.take_cancels(part, 10).await.unwrap().is_empty());

    // The owner commits it: final, out of the live sets, expiring.
    let mut cancelled = stored.clone();
    cancelled.tracked.commit(app::protocol::Task {
        state: TaskState::Cancelled,
        ..cancelled.tracked.task.clone()
    });
    store.write(&cancelled, true, false, 60).await.unwrap();
    let now = store.load("s-2", &id).await.unwrap().unwrap().tracked.task;
    assert_eq!((now.state, now.seq), (TaskState::Cancelled, 1));
    assert!(!live(&redis, &id).await);
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(keys::task(part, &id))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
    assert!(store.forget("s-2", &id).await.unwrap());
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
