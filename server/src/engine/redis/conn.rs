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
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::time::Duration;

/// How long connecting to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a reply may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A cheap-to-clone connection to a single Redis or a cluster.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
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
            let conn = client.get_pending_async_connection_with_config(config);
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
            Conn::Cluster(c) => c.req_packed_command(cmd),
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
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
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
