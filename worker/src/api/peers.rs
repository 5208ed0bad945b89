//! Asking the other workers over Redis, so a worker's own API answers for the whole fleet
//! without knowing anyone's address: a question is published on `{prefix}-api#query`, which
//! every worker with the API subscribes to; each answers on the asker's own
//! `{prefix}-api#reply#{id}` channel. The asker expects as many answers as the query channel
//! has other subscribers (`PUBSUB NUMSUB`) and waits for them at most [`WAIT`]: a worker that
//! stays silent makes the answer partial, never late.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use socketioxide_redis::drivers::Driver;
use tokio::sync::mpsc;

use super::local::{Local, Question};
use crate::RedisLink;

/// How long the other workers' answers are waited for.
const WAIT: Duration = Duration::from_secs(2);

#[derive(Serialize, Deserialize)]
struct Query {
    id: u64,
    /// The asker's worker id: where the answers go.
    from: String,
    question: Question,
}

#[derive(Serialize, Deserialize)]
struct Reply {
    id: u64,
    answer: Value,
}

/// Questions out, answers in.
#[derive(Clone)]
pub struct Peers {
    link: RedisLink,
    query_channel: String,
    prefix: String,
    worker_id: String,
    pending: Arc<Mutex<HashMap<u64, mpsc::Sender<Value>>>>,
    next: Arc<AtomicU64>,
}

impl Peers {
    /// Subscribes this worker to the questions (answered with `local`) and to its answers.
    pub async fn start(link: RedisLink, prefix: &str, local: Local) -> Self {
        let worker_id = local.fleet.worker_id().to_owned();
        let peers = Peers {
            query_channel: format!("{prefix}-api#query"),
            prefix: prefix.to_owned(),
            link,
            worker_id,
            pending: Arc::default(),
            // Time-seeded: a restarted worker with the same id never takes an old answer for new.
            next: Arc::new(AtomicU64::new(shared::unix_micros())),
        };
        // Subscriptions are kept by the link across Redis outages; errors cannot happen here.
        if let Ok(mut questions) = peers.link.subscribe(peers.query_channel.clone(), 256).await {
            let p = peers.clone();
            tokio::spawn(async move {
                while let Some((_, payload)) = questions.next().await {
                    p.answer(&payload, &local).await;
                }
            });
        }
        let reply_channel = peers.reply_channel(&peers.worker_id);
        if let Ok(mut replies) = peers.link.subscribe(reply_channel, 256).await {
            let pending = Arc::clone(&peers.pending);
            tokio::spawn(async move {
                while let Some((_, payload)) = replies.next().await {
                    let Ok(reply) = serde_json::from_slice::<Reply>(&payload) else {
                        continue;
                    };
                    let to = pending.lock().unwrap().get(&reply.id).cloned();
                    if let Some(to) = to {
                        let _ = to.try_send(reply.answer);
                    }
                }
            });
        }
        peers
    }

    fn reply_channel(&self, worker: &str) -> String {
        format!("{}-api#reply#{worker}", self.prefix)
    }

    async fn answer(&self, payload: &[u8], local: &Local) {
        let Ok(query) = serde_json::from_slice::<Query>(payload) else {
            return;
        };
        if query.from == self.worker_id {
            return; // its own question: answered locally by the asker
        }
        let reply = Reply {
            id: query.id,
            answer: local.answer(&query.question),
        };
        let body = serde_json::to_vec(&reply).expect("JSON values serialise");
        let _ = self
            .link
            .publish(self.reply_channel(&query.from), body)
            .await;
    }

    /// The other workers' answers to `question`, and whether every one answered.
    pub async fn ask(&self, question: Question) -> (Vec<Value>, bool) {
        // Asked of Redis itself, not through the adapter's count (which says "alone" when it
        // cannot tell): an unknown count is an incomplete answer.
        let Some(others) = self.others().await else {
            return (Vec::new(), false);
        };
        if others == 0 {
            return (Vec::new(), true);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(others);
        self.pending.lock().unwrap().insert(id, tx);
        // Removed however this ends, the caller's future dropped included.
        let _pending = Pending {
            map: &self.pending,
            id,
        };
        let query = Query {
            id,
            from: self.worker_id.clone(),
            question,
        };
        let body = serde_json::to_vec(&query).expect("JSON values serialise");
        let _ = self.link.publish(self.query_channel.clone(), body).await;
        let mut answers = Vec::with_capacity(others);
        let deadline = tokio::time::Instant::now() + WAIT;
        while answers.len() < others {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(answer)) => answers.push(answer),
                _ => break,
            }
        }
        let complete = answers.len() == others;
        (answers, complete)
    }

    /// The other workers listening for questions, or `None` when Redis cannot say.
    async fn others(&self) -> Option<usize> {
        let mut conn = self.link.connection()?;
        let mut numsub = redis::cmd("PUBSUB");
        numsub.arg("NUMSUB").arg(&self.query_channel);
        // A map on a cluster (every node's count, summed), pairs on one server.
        let count = tokio::time::timeout(
            WAIT,
            numsub.query_async::<std::collections::HashMap<String, usize>>(&mut conn),
        );
        let n = count
            .await
            .ok()?
            .ok()?
            .get(&self.query_channel)
            .copied()
            .unwrap_or(0);
        Some(n.saturating_sub(1))
    }
}

/// An entry of the pending answers, removed when dropped.
struct Pending<'a> {
    map: &'a Mutex<HashMap<u64, mpsc::Sender<Value>>>,
    id: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.map.lock().unwrap().remove(&self.id);
    }
}
