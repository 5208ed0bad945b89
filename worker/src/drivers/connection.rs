//! A live connection to the fleet's Redis, one server or a Redis Cluster, usable with every
//! redis-rs command (`redis::AsyncCommands`) and knowing how each kind (un)subscribes and
//! publishes: on a cluster a room's channel is sharded (SSUBSCRIBE/SPUBLISH, served by the
//! shard that owns its slot), the adapter's common channels are not (PUBLISH reaches every
//! node).

use futures_util::future::join_all;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value};

/// The fleet's Redis connection, as [`crate::Fleet::redis`] gives it: cheap to clone, usable
/// with `redis::AsyncCommands` whichever deployment the fleet uses.
///
/// ```no_run
/// use worker::redis::AsyncCommands;
///
/// async fn visits(fleet: &worker::Fleet) -> worker::redis::RedisResult<i64> {
///     match fleet.redis() {
///         Some(mut redis) => redis.incr("myapp:visits", 1).await,
///         None => Ok(0), // Redis is away
///     }
/// }
/// ```
#[derive(Clone)]
pub enum RedisConnection {
    /// One server (`redis.url`, or the master Sentinel names).
    Single(MultiplexedConnection),
    /// A Redis Cluster (`redis.cluster`): commands go to the node owning their key's slot.
    Cluster(ClusterConnection),
}

/// At most this many sharded (un)subscriptions are in flight at once on a cluster.
const SHARDED_IN_FLIGHT: usize = 256;

impl RedisConnection {
    /// Subscribe to `channels`, sharded ones (room channels) with SSUBSCRIBE on a cluster.
    pub(crate) async fn subscribe(
        &mut self,
        channels: &[String],
        sharded: bool,
    ) -> RedisResult<()> {
        self.subscription(channels, sharded, true).await
    }

    /// Unsubscribe from `channels` (see [`RedisConnection::subscribe`]).
    pub(crate) async fn unsubscribe(
        &mut self,
        channels: &[String],
        sharded: bool,
    ) -> RedisResult<()> {
        self.subscription(channels, sharded, false).await
    }

    async fn subscription(
        &mut self,
        channels: &[String],
        sharded: bool,
        on: bool,
    ) -> RedisResult<()> {
        match self {
            RedisConnection::Single(c) if on => c.subscribe(channels).await,
            RedisConnection::Single(c) => c.unsubscribe(channels).await,
            RedisConnection::Cluster(c) if !sharded && on => c.subscribe(channels).await,
            RedisConnection::Cluster(c) if !sharded => c.unsubscribe(channels).await,
            RedisConnection::Cluster(c) => {
                // One command per channel: channels of different slots live on different
                // shards, and one SSUBSCRIBE may only name channels of one slot.
                for batch in channels.chunks(SHARDED_IN_FLIGHT) {
                    let results = join_all(batch.iter().map(|chan| {
                        let mut c = c.clone();
                        async move {
                            if on {
                                c.ssubscribe(chan).await
                            } else {
                                c.sunsubscribe(chan).await
                            }
                        }
                    }))
                    .await;
                    results.into_iter().collect::<RedisResult<Vec<()>>>()?;
                }
                Ok(())
            }
        }
    }

    /// Publish `messages` (`(channel, payload, sharded)`): one pipeline on one server; on a
    /// cluster one command each, all in flight at once (each goes to its shard's connection).
    pub(crate) async fn publish_all(
        &mut self,
        messages: Vec<(String, Vec<u8>, bool)>,
    ) -> RedisResult<()> {
        match self {
            RedisConnection::Single(c) => {
                let mut pipe = redis::pipe();
                for (chan, payload, _) in messages {
                    pipe.cmd("PUBLISH").arg(chan).arg(payload).ignore();
                }
                pipe.query_async::<()>(c).await
            }
            RedisConnection::Cluster(c) => {
                let results = join_all(messages.into_iter().map(|(chan, payload, sharded)| {
                    let mut c = c.clone();
                    async move {
                        redis::cmd(if sharded { "SPUBLISH" } else { "PUBLISH" })
                            .arg(chan)
                            .arg(payload)
                            .query_async::<()>(&mut c)
                            .await
                    }
                }))
                .await;
                results
                    .into_iter()
                    .collect::<RedisResult<Vec<()>>>()
                    .map(drop)
            }
        }
    }
}

impl RedisConnection {
    /// Whether the deployment is whole: the server answers PING; on a cluster every master
    /// does. A master lost to a failover fails this until its replica has taken its slots.
    pub(crate) async fn check(&mut self) -> RedisResult<()> {
        match self {
            RedisConnection::Single(c) => redis::cmd("PING").query_async::<()>(c).await,
            RedisConnection::Cluster(c) => {
                let masters = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                ));
                c.route_command(redis::cmd("PING"), masters).await.map(drop)
            }
        }
    }

    /// Which master serves which slots, as a comparable text (`None` for one server). A
    /// change means a failover or a resharding: sharded subscriptions must move.
    pub(crate) async fn topology(&mut self) -> RedisResult<Option<String>> {
        let RedisConnection::Cluster(c) = self else {
            return Ok(None);
        };
        let slots: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(c).await?;
        let Value::Array(ranges) = slots else {
            return Ok(Some(String::new()));
        };
        let mut owners: Vec<String> = ranges
            .into_iter()
            .filter_map(|range| {
                let Value::Array(fields) = range else {
                    return None;
                };
                let mut fields = fields.into_iter();
                let start = i64::from_redis_value(fields.next()?).ok()?;
                let end = i64::from_redis_value(fields.next()?).ok()?;
                let Value::Array(master) = fields.next()? else {
                    return None;
                };
                let mut master = master.into_iter();
                let host = String::from_redis_value(master.next()?).ok()?;
                let port = i64::from_redis_value(master.next()?).ok()?;
                Some(format!("{start}-{end}@{host}:{port}"))
            })
            .collect();
        owners.sort();
        Ok(Some(owners.join(",")))
    }

    /// `INFO memory` of each master: `(node, text)`, the node empty for one server.
    pub(crate) async fn memory_info(&mut self) -> RedisResult<Vec<(String, String)>> {
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        match self {
            RedisConnection::Single(c) => Ok(vec![(String::new(), info.query_async(c).await?)]),
            RedisConnection::Cluster(c) => {
                let masters = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::Special),
                ));
                let Value::Map(answers) = c.route_command(info, masters).await? else {
                    return Ok(Vec::new());
                };
                Ok(answers
                    .into_iter()
                    .filter_map(|(node, text)| {
                        Some((
                            String::from_redis_value(node).ok()?,
                            String::from_redis_value(text).ok()?,
                        ))
                    })
                    .collect())
            }
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}
