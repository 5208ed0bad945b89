//! This worker's part of an API answer: its members of a room, its sockets disconnected, its
//! state. Every worker computes these for the others (see `peers`) and for the balancer.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use socketioxide::socket::Sid;

use crate::fleet::Fleet;
use crate::health::{Readiness, Status};
use crate::metrics::WorkerMetrics;

/// A question every worker answers for itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "op", content = "arg")]
pub enum Question {
    /// Members of a room.
    Room(String),
    /// Disconnect every socket of a user.
    DisconnectUser(String),
    /// Disconnect one socket.
    DisconnectSid(String),
    /// The worker's state.
    Info,
}

/// What one worker knows of itself.
#[derive(Clone)]
pub struct Local {
    /// The worker's handle.
    pub fleet: Fleet,
    /// Its readiness.
    pub readiness: Readiness,
    /// Its metrics (the Redis link's state).
    pub metrics: WorkerMetrics,
}

impl Local {
    /// This worker's sockets in every namespace.
    fn all_sockets(&self) -> Vec<crate::Socket> {
        self.fleet
            .io()
            .nsps()
            .into_iter()
            .flat_map(|ns| ns.local().sockets())
            .collect()
    }

    /// This worker's answer: `{"members": [...]}`, `{"disconnected": n}` or `{"worker", ...}`.
    pub fn answer(&self, question: &Question) -> Value {
        let io = self.fleet.io();
        match question {
            Question::Room(room) => {
                // The API's rooms are those of `/`, which an app need not serve.
                let sockets = io
                    .of("/")
                    .map(|ns| ns.local().within(room.clone()).sockets())
                    .unwrap_or_default();
                let members: Vec<Value> = sockets
                    .iter()
                    .take(shared::api::MAX_MEMBERS)
                    .map(|s| {
                        json!({
                            "sid": s.id.to_string(),
                            "user": Fleet::grant(s).user,
                            "worker": self.fleet.worker_id(),
                        })
                    })
                    .collect();
                json!({ "count": sockets.len(), "members": members })
            }
            Question::DisconnectUser(user) => {
                // By each socket's grant, in every namespace: not by room membership, which
                // an app's code could have changed.
                let sockets = self
                    .all_sockets()
                    .into_iter()
                    .filter(|s| Fleet::grant(s).user.as_deref() == Some(user.as_str()));
                json!({ "disconnected": sockets.filter(|s| s.clone().disconnect().is_ok()).count() })
            }
            Question::DisconnectSid(sid) => {
                let socket = sid
                    .parse::<Sid>()
                    .ok()
                    .and_then(|sid| io.nsps().into_iter().find_map(|ns| ns.get_socket(sid)));
                json!({ "disconnected": socket.into_iter().filter(|s| s.clone().disconnect().is_ok()).count() })
            }
            Question::Info => json!({
                "worker": self.fleet.worker_id(),
                "ready": matches!(self.readiness.check(), Status::Ready | Status::Degraded(_)),
                "connections": crate::fleet::local_sids(io).len(),
                "redis_up": self.metrics.redis_up.get() == 1,
            }),
        }
    }
}
