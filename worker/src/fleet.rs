//! What an application gets from the fleet: the worker's identity, the Socket.IO handle, and
//! measured room broadcasts that reach every worker. Apps name the Socket.IO types through the
//! aliases here ([`Socket`], [`Ack`], [`Io`]), never the adapter, so the adapter can change
//! without touching them.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use socketioxide::extract::{AckSender, SocketRef};
use socketioxide::{BroadcastError, SocketIo};

use crate::adapter::RoomChannels;
use crate::auth::Grant;
use crate::limits::TooManyRooms;
use crate::metrics::WorkerMetrics;
use crate::{FleetAdapter, RedisLink};

/// A connected client's socket, as an app's handlers receive it (the `SocketRef` extractor of
/// this fleet's Socket.IO server). Apps write their handlers against this type.
///
/// ```
/// use worker::{Fleet, Socket};
///
/// let app = |socket: Socket, _fleet: &Fleet| {
///     socket.join("lobby");
///     socket.on("hello", async |s: Socket| {
///         let _ = s.emit("welcome", s.ns());
///     });
/// };
/// # let _: Box<dyn worker::App> = Box::new(app);
/// ```
pub type Socket = SocketRef<FleetAdapter>;

/// The acknowledgement extractor for an event handler: `ack.send(&value)` answers the client.
///
/// ```
/// use worker::socketioxide::extract::Data;
/// use worker::{Ack, Fleet, Socket};
///
/// let app = |socket: Socket, _: &Fleet| {
///     socket.on("add", async |Data((a, b)): Data<(i64, i64)>, ack: Ack| {
///         let _ = ack.send(&(a + b));
///     });
/// };
/// # let _: Box<dyn worker::App> = Box::new(app);
/// ```
pub type Ack = AckSender<FleetAdapter>;

/// This fleet's Socket.IO server handle, as [`Fleet::io`] gives it.
///
/// ```
/// use worker::{Fleet, Io, Socket};
///
/// async fn announce(io: &Io) {
///     let _ = io.emit("announcement", "maintenance at noon").await; // every socket of `/`
/// }
/// let app = |_: Socket, fleet: &Fleet| {
///     let io: Io = fleet.io().clone();
///     tokio::spawn(async move { announce(&io).await });
/// };
/// # let _: Box<dyn worker::App> = Box::new(app);
/// ```
pub type Io = SocketIo<FleetAdapter>;

/// Handle passed to the application for each connected socket. Cheap to clone.
///
/// ```
/// use worker::{Fleet, Socket};
///
/// // Every handler gets the same handle; clone it into async handlers.
/// let app = |socket: Socket, fleet: &Fleet| {
///     let fleet = fleet.clone();
///     socket.on("where", async move |s: Socket| {
///         let _ = s.emit("here", fleet.worker_id());
///     });
/// };
/// # let _: Box<dyn worker::App> = Box::new(app);
/// ```
#[derive(Clone)]
pub struct Fleet {
    worker_id: Arc<str>,
    io: Io,
    metrics: WorkerMetrics,
    link: RedisLink,
    rooms: RoomChannels,
    /// `socketio.limits.max_rooms_per_socket`; 0: no limit.
    max_rooms: usize,
}

/// Held across a join's count and the join itself: a socket's handlers run concurrently, and
/// two joins must not both take the last free place. In the socket's extensions while
/// `max_rooms_per_socket` is set.
#[derive(Clone, Default)]
pub(crate) struct RoomLock(Arc<Mutex<()>>);

impl Fleet {
    pub(crate) fn new(
        worker_id: &str,
        io: Io,
        metrics: WorkerMetrics,
        link: RedisLink,
        rooms: RoomChannels,
        limits: &shared::config::SocketLimits,
    ) -> Self {
        Fleet {
            worker_id: worker_id.into(),
            io,
            metrics,
            link,
            rooms,
            max_rooms: limits.max_rooms_per_socket as usize,
        }
    }

    /// Whether sockets get a [`RoomLock`].
    pub(crate) fn limits_rooms(&self) -> bool {
        self.max_rooms > 0
    }

    /// Put `socket` in `room` and return once broadcasts to the room from every worker reach
    /// it. `socket.join(room)` joins at once too, but this worker starts listening to a room's
    /// broadcasts from other workers when the room gets its first member here, which takes a
    /// Redis round trip: answer a client's join after this, and a message published right
    /// after the answer is not missed. (While Redis is away it returns at once; it never waits
    /// more than 2 s.)
    ///
    /// # Errors
    /// The socket is already in `socketio.limits.max_rooms_per_socket` rooms (its own room and
    /// its user's `user:` room not counted) and `room` is not one of them: nothing is joined,
    /// and the refusal is counted in `fleet_worker_limited_total{kind="rooms"}`.
    ///
    /// ```
    /// use worker::socketioxide::extract::Data;
    /// use worker::{Ack, Fleet, Socket};
    ///
    /// let app = |socket: Socket, fleet: &Fleet| {
    ///     let fleet = fleet.clone();
    ///     socket.on("join", async move |s: Socket, Data(room): Data<String>, ack: Ack| {
    ///         match fleet.join(&s, room).await {
    ///             Ok(()) => { let _ = ack.send("joined"); }
    ///             Err(too_many) => { let _ = ack.send(&too_many.to_string()); }
    ///         }
    ///     });
    /// };
    /// # let _: Box<dyn worker::App> = Box::new(app);
    /// ```
    pub async fn join(&self, socket: &Socket, room: impl Into<String>) -> Result<(), TooManyRooms> {
        self.join_now(socket, room.into())?;
        self.rooms.settled().await;
        Ok(())
    }

    /// Joins at once, within the room limit.
    fn join_now(&self, socket: &Socket, room: String) -> Result<(), TooManyRooms> {
        if self.max_rooms == 0 {
            socket.join(room);
            return Ok(());
        }
        let lock = socket.extensions.get::<RoomLock>().unwrap_or_default();
        let _held = lock
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rooms = socket.rooms();
        if !rooms.iter().any(|r| *r == room) && counted_rooms(socket, &rooms) >= self.max_rooms {
            self.metrics.limited_rooms.inc();
            return Err(TooManyRooms);
        }
        socket.join(room);
        Ok(())
    }

    /// Resolves once every room change of this worker so far is in effect in Redis (see
    /// [`Fleet::join`]).
    pub(crate) async fn settled(&self) {
        self.rooms.settled().await;
    }

    /// A connection to the fleet's Redis for the app's own state (history, counters, locks),
    /// shared with the fleet's pub/sub and cheap to clone; `None` while Redis is unreachable.
    /// The app's keys should not start with the fleet's `redis.prefix`.
    ///
    /// ```
    /// use worker::redis::AsyncCommands;
    /// use worker::{Fleet, Socket};
    ///
    /// let app = |socket: Socket, fleet: &Fleet| {
    ///     let fleet = fleet.clone();
    ///     socket.on("visit", async move |s: Socket| {
    ///         if let Some(mut redis) = fleet.redis() {
    ///             let n: i64 = redis.incr("myapp:visits", 1).await.unwrap_or(0);
    ///             let _ = s.emit("visits", &n);
    ///         }
    ///     });
    /// };
    /// # let _: Box<dyn worker::App> = Box::new(app);
    /// ```
    pub fn redis(&self) -> Option<crate::RedisConnection> {
        self.link.connection()
    }

    /// The room of every socket of `user` (authenticated with `auth:`), on every worker:
    /// `fleet.io().to(Fleet::user_room("alice")).emit(...)` reaches all of them.
    ///
    /// ```
    /// assert_eq!(worker::Fleet::user_room("alice"), "user:alice");
    /// ```
    pub fn user_room(user: &str) -> String {
        crate::auth::user_room(user)
    }

    /// This worker's id (`w0`, or `--id` when standalone).
    ///
    /// ```
    /// use worker::{Fleet, Socket};
    ///
    /// let app = |_: Socket, fleet: &Fleet| tracing::info!(worker = fleet.worker_id(), "connected");
    /// # let _: Box<dyn worker::App> = Box::new(app);
    /// ```
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The Socket.IO server, for anything the helpers below do not cover.
    ///
    /// ```
    /// use worker::{Fleet, Socket};
    ///
    /// // Across workers: who is in a room, and disconnecting them wherever they are.
    /// let app = |socket: Socket, fleet: &Fleet| {
    ///     let fleet = fleet.clone();
    ///     socket.on("clear", async move |s: Socket| {
    ///         let n = fleet.io().within("stage").fetch_sockets().await.map_or(0, |v| v.len());
    ///         let _ = fleet.io().within("stage").disconnect().await;
    ///         let _ = s.emit("cleared", &n);
    ///     });
    /// };
    /// # let _: Box<dyn worker::App> = Box::new(app);
    /// ```
    pub fn io(&self) -> &Io {
        &self.io
    }

    /// What `socket` may do, as its connection was admitted (`auth:`, `rooms:`).
    ///
    /// ```
    /// use worker::{Fleet, Socket};
    ///
    /// let app = |socket: Socket, _: &Fleet| {
    ///     let grant = Fleet::grant(&socket);
    ///     let name = grant.user.unwrap_or_else(|| "guest".into());
    ///     let _ = socket.emit("hello", &name);
    /// };
    /// # let _: Box<dyn worker::App> = Box::new(app);
    /// ```
    pub fn grant(socket: &Socket) -> Grant {
        socket
            .extensions
            .get::<Grant>()
            .unwrap_or_else(Grant::anonymous)
    }

    /// Count a client request refused by its permissions in
    /// `fleet_worker_forbidden_total{action}`.
    ///
    /// ```
    /// use worker::{Fleet, Socket};
    ///
    /// let app = |socket: Socket, fleet: &Fleet| {
    ///     if !Fleet::grant(&socket).may_join("vip") {
    ///         fleet.count_forbidden("join");
    ///     }
    /// };
    /// # let _: Box<dyn worker::App> = Box::new(app);
    /// ```
    pub fn count_forbidden(&self, action: &str) {
        self.metrics.forbidden.with_label_values(&[action]).inc();
    }

    /// Count one received event in `fleet_worker_events_total{event}`.
    ///
    /// ```
    /// use worker::{Fleet, Socket};
    ///
    /// let app = |socket: Socket, fleet: &Fleet| {
    ///     let fleet = fleet.clone();
    ///     socket.on("ping", async move || fleet.count_event("ping"));
    /// };
    /// # let _: Box<dyn worker::App> = Box::new(app);
    /// ```
    pub fn count_event(&self, event: &str) {
        self.metrics.event(event);
    }

    /// Emit `event` to every member of `room` on every worker, the sender included if it is a
    /// member, counted and timed in the broadcast metrics. While Redis is away, members on this
    /// worker still receive it. Returns how many local members could not take the message
    /// (full buffer or closed; also counted in `fleet_worker_deliveries_dropped_total`).
    ///
    /// # Errors
    /// The local emit failed (the payload could not be serialised).
    ///
    /// ```
    /// use worker::{Fleet, Socket};
    ///
    /// let app = |socket: Socket, fleet: &Fleet| {
    ///     let fleet = fleet.clone();
    ///     socket.on("shout", async move || {
    ///         let dropped = fleet.publish("lobby".into(), "shouted", "hey").await;
    ///         tracing::debug!(?dropped, "shouted");
    ///     });
    /// };
    /// # let _: Box<dyn worker::App> = Box::new(app);
    /// ```
    pub async fn publish<T: ?Sized + Serialize>(
        &self,
        room: String,
        event: &'static str,
        data: &T,
    ) -> Result<usize, BroadcastError> {
        let started = Instant::now();
        self.metrics.broadcasts.inc();
        let res = self.io.to(room).emit(event, data).await;
        self.metrics
            .broadcast_duration
            .observe(started.elapsed().as_secs_f64());
        match res {
            Ok(()) => Ok(0),
            // Members that could not take the message (a full buffer: a slow or vanished
            // client) do not make the publish fail for everyone else.
            Err(BroadcastError::Socket(errors)) => {
                self.metrics.deliveries_dropped.inc_by(errors.len() as u64);
                Ok(errors.len())
            }
            Err(e) => Err(e),
        }
    }
}

/// The rooms of `socket` that count against `max_rooms_per_socket`: not its own, nor its
/// user's, which the fleet joined for it.
fn counted_rooms(socket: &Socket, rooms: &[std::borrow::Cow<'static, str>]) -> usize {
    let own = socket.id.to_string();
    let user = Fleet::grant(socket)
        .user
        .map(|u| crate::auth::user_room(&u));
    rooms
        .iter()
        .filter(|r| **r != own && Some(r.as_ref()) != user.as_deref())
        .count()
}

/// Every socket of this worker, in every namespace: one client connected to two namespaces
/// shares its id, so each is counted once. (Ids, not strings: `/readyz` counts them every
/// probe.)
pub(crate) fn local_sids(io: &Io) -> std::collections::HashSet<socketioxide::socket::Sid> {
    io.nsps()
        .into_iter()
        .flat_map(|ns| ns.local().sockets())
        .map(|s| s.id)
        .collect()
}

/// An application: the namespaces it serves, and its event handlers on each new socket.
///
/// Any `Fn(Socket, &Fleet)` closure is an `App` serving the namespace `/`; [`Namespaces`]
/// gives each namespace a handler of its own.
///
/// ```
/// use worker::{App, Fleet, Socket};
///
/// struct Echo;
///
/// impl App for Echo {
///     fn on_connect(&self, socket: Socket, _fleet: &Fleet) {
///         socket.on("echo", async |socketioxide::extract::Data::<String>(text), ack: worker::Ack| {
///             let _ = ack.send(&text);
///         });
///     }
/// }
/// assert_eq!(Echo.namespaces(), ["/"]);
/// ```
pub trait App: Send + Sync + 'static {
    /// The namespaces served (`/chat`, `/admin`), each connected through the fleet's own
    /// authentication, then [`App::admit`], then [`App::on_connect`]. Default: `/` alone.
    fn namespaces(&self) -> Vec<String> {
        vec!["/".to_owned()]
    }

    /// The app's own connect check, after the fleet's authentication (the socket's
    /// [`Grant`](crate::auth::Grant) is set): `Err(message)` refuses the socket, which the
    /// client sees as `connect_error` with that message. Default: everyone admitted.
    ///
    /// ```
    /// use worker::{App, Fleet, Socket};
    ///
    /// struct MembersOnly;
    /// impl App for MembersOnly {
    ///     fn admit(&self, socket: &Socket, _: &Fleet) -> Result<(), String> {
    ///         match Fleet::grant(socket).claims["plan"].as_str() {
    ///             Some("member") => Ok(()),
    ///             _ => Err("members only".into()), // the client's connect_error message
    ///         }
    ///     }
    ///     fn on_connect(&self, _: Socket, _: &Fleet) {}
    /// }
    /// # let _ = MembersOnly;
    /// ```
    ///
    /// # Errors
    /// Why the socket may not connect to this namespace.
    fn admit(&self, socket: &Socket, fleet: &Fleet) -> Result<(), String> {
        let _ = (socket, fleet);
        Ok(())
    }

    /// Called once per connected socket (its namespace is `socket.ns()`), before any of its
    /// events are handled: register the handlers here.
    fn on_connect(&self, socket: Socket, fleet: &Fleet);

    /// A directory of pages the worker serves for paths nothing else answers (`/` is
    /// `index.html`); through the balancer, list them in `balancer.forward_paths`. Default none.
    ///
    /// ```
    /// use worker::{App, Fleet, Socket};
    ///
    /// struct WithPage;
    /// impl App for WithPage {
    ///     fn on_connect(&self, _: Socket, _: &Fleet) {}
    ///     fn static_dir(&self) -> Option<std::path::PathBuf> {
    ///         Some(concat!(env!("CARGO_MANIFEST_DIR"), "/static").into())
    ///     }
    /// }
    /// assert!(WithPage.static_dir().is_some());
    /// ```
    fn static_dir(&self) -> Option<std::path::PathBuf> {
        None
    }
}

impl<F> App for F
where
    F: Fn(Socket, &Fleet) + Send + Sync + 'static,
{
    fn on_connect(&self, socket: Socket, fleet: &Fleet) {
        self(socket, fleet)
    }
}

type Handler = Box<dyn Fn(Socket, &Fleet) + Send + Sync>;
type Admission = Box<dyn Fn(&Socket, &Fleet) -> Result<(), String> + Send + Sync>;

/// An app of several namespaces, each with its handler and, optionally, its own admission.
///
/// ```
/// use worker::{App, Fleet, Namespaces, Socket};
///
/// let app = Namespaces::new()
///     .on("/", |socket: Socket, _: &Fleet| { let _ = socket.join("lobby"); })
///     .on("/admin", |_socket: Socket, _: &Fleet| {})
///     .admit("/admin", |socket: &Socket, _: &Fleet| match Fleet::grant(socket).claims["admin"] {
///         serde_json::Value::Bool(true) => Ok(()),
///         _ => Err("admins only".into()),
///     });
/// assert_eq!(app.namespaces(), ["/", "/admin"]);
/// ```
#[derive(Default)]
pub struct Namespaces {
    handlers: Vec<(String, Handler, Option<Admission>)>,
    pages: Option<std::path::PathBuf>,
}

impl Namespaces {
    /// No namespace yet.
    ///
    /// ```
    /// use worker::App;
    /// assert!(worker::Namespaces::new().namespaces().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `path` with `handler` (replacing an earlier one for the same path, keeping its
    /// connect check).
    #[must_use]
    ///
    /// ```
    /// use worker::{App, Fleet, Namespaces, Socket};
    /// let app = Namespaces::new()
    ///     .on("/chat", |s: Socket, _: &Fleet| s.join("lobby"))
    ///     .on("/chat", |_: Socket, _: &Fleet| {}); // replaces the first
    /// assert_eq!(app.namespaces(), ["/chat"]);
    /// ```
    pub fn on(
        mut self,
        path: &str,
        handler: impl Fn(Socket, &Fleet) + Send + Sync + 'static,
    ) -> Self {
        // A check given before keeps guarding the namespace.
        let admission = self
            .handlers
            .iter()
            .position(|(p, ..)| p == path)
            .and_then(|i| self.handlers.remove(i).2);
        self.handlers
            .push((path.to_owned(), Box::new(handler), admission));
        self
    }

    /// Adds a connect check to the namespace `path` (served with [`Namespaces::on`]).
    ///
    /// # Panics
    /// `path` has no handler yet: a programming error, caught at start.
    #[must_use]
    ///
    /// ```
    /// use worker::{Fleet, Namespaces, Socket};
    /// let app = Namespaces::new()
    ///     .on("/admin", |_: Socket, _: &Fleet| {})
    ///     .admit("/admin", |s: &Socket, _: &Fleet| {
    ///         Fleet::grant(s).user.map(|_| ()).ok_or_else(|| "sign in first".to_owned())
    ///     });
    /// # let _ = app;
    /// ```
    pub fn admit(
        mut self,
        path: &str,
        check: impl Fn(&Socket, &Fleet) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        let entry = self
            .handlers
            .iter_mut()
            .find(|(p, ..)| p == path)
            .unwrap_or_else(|| panic!("Namespaces::admit({path:?}) before Namespaces::on"));
        entry.2 = Some(Box::new(check));
        self
    }

    /// Serves the files of `dir` as pages (see [`App::static_dir`]).
    #[must_use]
    ///
    /// ```
    /// use worker::App;
    /// let app = worker::Namespaces::new().on("/", |_, _| {}).pages("static");
    /// assert_eq!(app.static_dir(), Some("static".into()));
    /// ```
    pub fn pages(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.pages = Some(dir.into());
        self
    }

    fn find(&self, path: &str) -> Option<&(String, Handler, Option<Admission>)> {
        self.handlers.iter().find(|(p, ..)| p == path)
    }
}

impl App for Namespaces {
    fn namespaces(&self) -> Vec<String> {
        self.handlers.iter().map(|(p, ..)| p.clone()).collect()
    }

    fn admit(&self, socket: &Socket, fleet: &Fleet) -> Result<(), String> {
        match self.find(socket.ns()) {
            Some((_, _, Some(check))) => check(socket, fleet),
            _ => Ok(()),
        }
    }

    fn on_connect(&self, socket: Socket, fleet: &Fleet) {
        if let Some((_, handler, _)) = self.find(socket.ns()) {
            handler(socket, fleet);
        }
    }

    fn static_dir(&self) -> Option<std::path::PathBuf> {
        self.pages.clone()
    }
}

#[cfg(test)]
mod tests {
    /// The apps in this repository name only the aliases above: swapping the adapter must not
    /// touch them.
    #[test]
    fn apps_do_not_name_the_adapter() {
        for (file, text) in [
            ("src/app.rs", include_str!("app.rs")),
            ("examples/chat.rs", include_str!("../examples/chat.rs")),
        ] {
            assert!(!text.contains("FleetAdapter"), "{file} names the adapter");
        }
    }
}
