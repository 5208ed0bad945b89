//! This worker's part of an API answer: its members of a room, its sockets disconnected, its
//! state. Every worker computes these for the others (see `peers`) and for the balancer.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use socketioxide::socket::Sid;

use crate::auth::user_room;
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
    /// This worker's answer: `{"members": [...]}`, `{"disconnected": n}` or `{"worker", ...}`.
    pub fn answer(&self, question: &Question) -> Value {
        let io = self.fleet.io();
        match question {
            Question::Room(room) => {
                let members: Vec<Value> = io
                    .local()
                    .within(room.clone())
                    .sockets()
                    .iter()
                    .map(|s| {
                        json!({
                            "sid": s.id.to_string(),
                            "user": Fleet::grant(s).user,
                            "worker": self.fleet.worker_id(),
                        })
                    })
                    .collect();
                json!({ "members": members })
            }
            Question::DisconnectUser(user) => {
                let sockets = io.local().within(user_room(user)).sockets();
                json!({ "disconnected": sockets.into_iter().filter(|s| s.clone().disconnect().is_ok()).count() })
            }
            Question::DisconnectSid(sid) => {
                let socket = sid.parse::<Sid>().ok().and_then(|sid| io.get_socket(sid));
                json!({ "disconnected": socket.into_iter().filter(|s| s.clone().disconnect().is_ok()).count() })
            }
            Question::Info => json!({
                "worker": self.fleet.worker_id(),
                "ready": matches!(self.readiness.check(), Status::Ready | Status::Degraded(_)),
                "connections": io.sockets().len(),
                "redis_up": self.metrics.redis_up.get() == 1,
            }),
        }
    }
}
