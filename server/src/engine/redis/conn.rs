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

/// A cluster's masters by partition, for the owner's writes: one pipeline
/// per node, sent on a connection of its own to that node, instead of one
/// per partition through the cluster client (whose pipelines hold one
/// slot). Read from `CLUSTER SLOTS` at first use and every 30 s; a write
/// that fails on it (a slot moved, a node gone) marks it stale and goes the
/// cluster client's way instead.
#[derive(Default)]
pub struct Nodes {
    state: tokio::sync::Mutex<NodesState>,
}

#[derive(Default)]
struct NodesState {
    /// Per partition, its master's index in `conns`.
    node_of: Vec<usize>,
    conns: Vec<redis::aio::MultiplexedConnection>,
    read: Option<std::time::Instant>,
    stale: bool,
}

/// How long a read of the cluster's slots is trusted.
const NODES_FRESH: Duration = Duration::from_secs(30);
/// The least time between two tries to read them.
const NODES_RETRY: Duration = Duration::from_secs(1);

impl Nodes {
    /// Per partition its node's index, and a connection per node; `None`
    /// while unknown.
    pub async fn current(
        &self,
        conn: &Conn,
    ) -> Option<(Vec<usize>, Vec<redis::aio::MultiplexedConnection>)> {
        let mut st = self.state.lock().await;
        let age = st.read.map(|t| t.elapsed());
        let due = match age {
            None => true,
            Some(age) if st.stale || st.conns.is_empty() => age >= NODES_RETRY,
            Some(age) => age >= NODES_FRESH,
        };
        if due {
            st.read = Some(std::time::Instant::now());
            match read_nodes(conn).await {
                Ok((node_of, conns)) => {
                    st.node_of = node_of;
                    st.conns = conns;
                    st.stale = false;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading the cluster's slots failed");
                    st.stale = true;
                }
            }
        }
        (!st.stale && !st.conns.is_empty()).then(|| (st.node_of.clone(), st.conns.clone()))
    }

    /// A write on a node's connection failed: read the slots again.
    pub async fn mark_stale(&self) {
        self.state.lock().await.stale = true;
    }
}

/// The hash slot of a key's hash tag `tag` (CRC16/XMODEM mod 16384).
pub fn slot(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for b in tag.bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

async fn read_nodes(
    conn: &Conn,
) -> RedisResult<(Vec<usize>, Vec<redis::aio::MultiplexedConnection>)> {
    let mut c = conn.clone();
    let slots: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut c)
        .await?;
    let bad = || redis::RedisError::from((redis::ErrorKind::Parse, "CLUSTER SLOTS"));
    let int = |v: &Value| match v {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let Value::Array(ranges) = slots else {
        return Err(bad());
    };
    let mut addrs: Vec<String> = Vec::new();
    let mut owner: Vec<(i64, i64, usize)> = Vec::new();
    for range in &ranges {
        let Value::Array(fields) = range else {
            return Err(bad());
        };
        let (Some(from), Some(to), Some(Value::Array(master))) = (
            fields.first().and_then(int),
            fields.get(1).and_then(int),
            fields.get(2),
        ) else {
            return Err(bad());
        };
        let (Some(ip), Some(port)) = (master.first().and_then(text), master.get(1).and_then(int))
        else {
            return Err(bad());
        };
        let addr = format!("{ip}:{port}");
        let i = match addrs.iter().position(|a| *a == addr) {
            Some(i) => i,
            None => {
                addrs.push(addr);
                addrs.len() - 1
            }
        };
        owner.push((from, to, i));
    }
    let node_of = (0..super::keys::PARTITIONS)
        .map(|p| {
            let s = i64::from(slot(&format!("tw:{p}")));
            owner
                .iter()
                .find(|(from, to, _)| (*from..=*to).contains(&s))
                .map(|(_, _, i)| *i)
                .ok_or_else(bad)
        })
        .collect::<RedisResult<Vec<_>>>()?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut conns = Vec::with_capacity(addrs.len());
    for addr in &addrs {
        let client = redis::Client::open(format!("redis://{addr}/"))?;
        conns.push(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        );
    }
    Ok((node_of, conns))
}

#[cfg(test)]
mod slot_tests {
    #[test]
    fn slots_are_redis_cluster_s() {
        // Values from `redis-cli cluster keyslot`.
        assert_eq!(super::slot("123456789"), 12739);
        assert_eq!(super::slot("foo"), 12182);
    }
}
