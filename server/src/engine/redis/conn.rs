//! One connection to "Redis" whichever it is: a single `redis-server`
//! (`redis://host:port/db`) or a Redis Cluster, named by its seed nodes —
//! `redis+cluster://host:port[,host:port...]`, or several `redis://` URLs
//! separated by commas. Both connect lazily (a process starts while Redis
//! is down; calls fail fast until it is back) and reconnect by themselves.
//!
//! Every key a command or script of taskwire touches at once shares one
//! hash tag ([`super::keys`]), so the cluster routes each call to one shard.
//! Pub/sub is the classic kind, which a cluster carries to every node: a
//! subscriber connects to the first seed that answers.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisFuture, RedisResult, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long connecting to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a reply may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The least time between two rebuilds of a cluster connection.
const REBUILD_MIN: Duration = Duration::from_secs(1);

/// A cheap-to-clone connection to a single Redis or a cluster.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(Cluster),
}

/// A cluster connection that is made again from the seeds when it has lost
/// every node. redis-rs (1.8) repairs a lost node, or refreshes the slots,
/// through the connections it still has; when every node went away at once
/// (a whole cluster restarted) a refresh can leave it with none, and from
/// then on each call fails with `ClusterConnectionNotFound` for good (and
/// its task retries the refresh in a busy loop). Seen in
/// `tests/redis.rs`'s whole-cluster restart; the new connection goes back
/// to the seeds, and dropping the old one ends its task.
#[derive(Clone)]
pub struct Cluster(Arc<ClusterShared>);

struct ClusterShared {
    client: ClusterClient,
    config: ClusterConfig,
    /// The connection, its generation, and when it was made.
    current: Mutex<(ClusterConnection, u64, Instant)>,
}

impl Cluster {
    fn new(client: ClusterClient, config: ClusterConfig) -> Cluster {
        let conn = client.get_pending_async_connection_with_config(config.clone());
        Cluster(Arc::new(ClusterShared {
            client,
            config,
            current: Mutex::new((conn, 0, Instant::now())),
        }))
    }

    /// The connection to use now, and its generation.
    fn current(&self) -> (ClusterConnection, u64) {
        let current = self.0.current.lock().unwrap_or_else(|e| e.into_inner());
        (current.0.clone(), current.1)
    }

    /// After a call on generation `gen` failed: a connection that has lost
    /// every node is replaced (once per generation, at most every
    /// [`REBUILD_MIN`]).
    fn failed(&self, gen: u64, kind: ErrorKind) {
        if kind != ErrorKind::ClusterConnectionNotFound {
            return;
        }
        let mut current = self.0.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.1 != gen || current.2.elapsed() < REBUILD_MIN {
            return;
        }
        tracing::warn!(
            "the Redis Cluster connection lost every node; connecting to the seeds again"
        );
        let conn = self
            .0
            .client
            .get_pending_async_connection_with_config(self.0.config.clone());
        *current = (conn, gen + 1, Instant::now());
    }
}

/// Where the store connects: its command connection, and the clients that
/// open pub/sub connections (the seeds, tried in turn).
#[derive(Clone)]
pub struct Target {
    pub conn: Conn,
    pub pubsub: Vec<redis::Client>,
    /// Whether it is a cluster.
    pub cluster: bool,
}

/// The seed URLs of a cluster `url` names, or `None` for a single Redis.
pub fn cluster_seeds(url: &str) -> Option<Vec<String>> {
    if let Some(rest) = url.strip_prefix("redis+cluster://") {
        return Some(
            rest.split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    let s = s.trim();
                    if s.contains("://") {
                        s.to_string()
                    } else {
                        format!("redis://{s}")
                    }
                })
                .collect(),
        );
    }
    url.contains(',').then(|| {
        url.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    })
}

/// Opens (lazily) what `url` names.
pub fn open(url: &str) -> RedisResult<Target> {
    match cluster_seeds(url) {
        None => {
            let client = redis::Client::open(url)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
            Ok(Target {
                conn: Conn::Single(conn),
                pubsub: vec![client],
                cluster: false,
            })
        }
        Some(seeds) => {
            if seeds.is_empty() {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "a Redis Cluster URL names no node",
                )));
            }
            let client = ClusterClient::builder(seeds.clone())
                .retries(2)
                .min_retry_wait(50)
                .max_retry_wait(500)
                .build()?;
            let config = ClusterConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(RESPONSE_TIMEOUT);
            let conn = Cluster::new(client, config);
            let pubsub = seeds
                .iter()
                .map(|s| redis::Client::open(s.as_str()))
                .collect::<RedisResult<_>>()?;
            Ok(Target {
                conn: Conn::Cluster(conn),
                pubsub,
                cluster: true,
            })
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => {
                let (mut conn, gen) = c.current();
                Box::pin(async move {
                    let result = conn.req_packed_command(cmd).await;
                    if let Err(e) = &result {
                        c.failed(gen, e.kind());
                    }
                    result
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => {
                let (mut conn, gen) = c.current();
                Box::pin(async move {
                    let result = conn.req_packed_commands(pipeline, offset, count).await;
                    if let Err(e) = &result {
                        c.failed(gen, e.kind());
                    }
                    result
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.current().0.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cluster_seeds;

    #[test]
    fn cluster_urls() {
        assert_eq!(cluster_seeds("redis://h:6379/0"), None);
        assert_eq!(
            cluster_seeds("redis+cluster://a:7000,b:7001"),
            Some(vec!["redis://a:7000".into(), "redis://b:7001".into()])
        );
        assert_eq!(
            cluster_seeds("redis://a:7000, redis://b:7001"),
            Some(vec!["redis://a:7000".into(), "redis://b:7001".into()])
        );
    }
}
