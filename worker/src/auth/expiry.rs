//! Sockets whose credentials expire are disconnected then. One schedule per worker, kept to the
//! sockets that are still connected: a socket gone sooner costs nothing after the next sweep,
//! so reconnecting with a long-lived token cannot grow it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::Shutdown;

use crate::fleet::{Io, Socket};

/// How often due sockets are looked for.
const TICK: Duration = Duration::from_millis(250);
/// How often entries of sockets already gone are dropped.
const SWEEP_EVERY: u32 = 240; // ticks: one minute

/// (expiry in Unix seconds, namespace, socket id).
type Entry = (u64, String, String);

/// The schedule.
#[derive(Clone, Default)]
pub struct Expiry {
    due: Arc<Mutex<BTreeSet<Entry>>>,
}

impl Expiry {
    /// Disconnects `socket` at `exp` (Unix seconds). Called once it is in its namespace (its
    /// connect handler), so the sweep never drops an entry of a socket still arriving.
    pub fn add(&self, socket: &Socket, exp: u64) {
        self.due
            .lock()
            .unwrap()
            .insert((exp, socket.ns().to_owned(), socket.id.to_string()));
    }

    /// Runs the schedule until shutdown.
    pub async fn run(self, io: Io, mut shutdown: Shutdown) {
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.recv() => return,
            }
            let now = shared::unix_micros() / 1_000_000;
            let due: Vec<Entry> = {
                let mut set = self.due.lock().unwrap();
                let later = set.split_off(&(now.saturating_add(1), String::new(), String::new()));
                std::mem::replace(&mut *set, later).into_iter().collect()
            };
            for (_, ns, sid) in due {
                if let Some(socket) = find(&io, &ns, &sid) {
                    tracing::debug!(%sid, "credentials expired: disconnecting");
                    let _ = socket.disconnect();
                }
            }
            ticks += 1;
            if ticks.is_multiple_of(SWEEP_EVERY) {
                self.due
                    .lock()
                    .unwrap()
                    .retain(|(_, ns, sid)| find(&io, ns, sid).is_some());
            }
        }
    }
}

fn find(io: &Io, ns: &str, sid: &str) -> Option<Socket> {
    io.of(ns)?.get_socket(sid.parse().ok()?)
}
