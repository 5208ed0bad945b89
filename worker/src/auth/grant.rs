//! What an authenticated client may do: its user, the rooms it may join and publish to, and
//! when its credentials expire. Room patterns are names, or a prefix ending in `*`
//! (`"chat:*"`); `"*"` alone is any room.

use serde::Deserialize;

/// Rooms named `user:<id>` hold every socket of one user; only the server puts sockets there.
pub const USER_ROOM_PREFIX: &str = "user:";

/// The room of `user`'s sockets.
pub fn user_room(user: &str) -> String {
    format!("{USER_ROOM_PREFIX}{user}")
}

/// A list of room patterns.
///
/// ```
/// let rooms: worker::Rooms = ["lobby", "chat:*"].into_iter().collect();
/// assert!(rooms.allows("chat:42") && !rooms.allows("admin"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Rooms(Vec<String>);

impl Rooms {
    /// Any room.
    ///
    /// ```
    /// assert!(worker::Rooms::any().allows("anything at all"));
    /// ```
    pub fn any() -> Self {
        Rooms(vec!["*".into()])
    }

    /// Whether `room` matches one of the patterns.
    ///
    /// ```
    /// let rooms: worker::Rooms = ["team:*"].into_iter().collect();
    /// assert!(rooms.allows("team:red") && !rooms.allows("team"));
    /// ```
    pub fn allows(&self, room: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => room.starts_with(prefix),
            None => p == room,
        })
    }
}

impl<S: Into<String>> FromIterator<S> for Rooms {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        Rooms(iter.into_iter().map(Into::into).collect())
    }
}

/// One socket's permissions, kept in its extensions.
///
/// ```
/// use worker::{Fleet, Socket};
///
/// // Read in a handler: who this is, and what the credentials allow.
/// let app = |socket: Socket, _: &Fleet| {
///     let grant = Fleet::grant(&socket);
///     if grant.may_join("staff") && grant.claims["role"] == "editor" {
///         socket.join("staff");
///     }
/// };
/// # let _: Box<dyn worker::App> = Box::new(app);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user id (`sub`); `None` without authentication.
    pub user: Option<String>,
    /// Rooms it may join.
    pub rooms: Rooms,
    /// Rooms it may publish to.
    pub publish: Rooms,
    /// When its credentials expire (Unix seconds); it is disconnected then.
    pub expires: Option<u64>,
    /// Everything the credentials said: the token's claims (`jwt`), the backend's answer
    /// (`proxy`), `null` without authentication. For an app's own rules (`claims["admin"]`).
    pub claims: serde_json::Value,
}

impl Grant {
    /// `auth.mode: none`: anyone, any room.
    ///
    /// ```
    /// let g = worker::Grant::anonymous();
    /// assert!(g.user.is_none() && g.may_join("lobby") && g.may_publish("lobby"));
    /// ```
    pub fn anonymous() -> Self {
        Grant {
            user: None,
            rooms: Rooms::any(),
            publish: Rooms::any(),
            expires: None,
            claims: serde_json::Value::Null,
        }
    }

    /// Whether it may join `room`. No client joins a `user:` room: the server puts each
    /// user's sockets in theirs, and another user's is not to be listened to.
    ///
    /// ```
    /// let g = worker::Grant::anonymous();
    /// assert!(g.may_join("lobby") && !g.may_join("user:bob"));
    /// ```
    pub fn may_join(&self, room: &str) -> bool {
        !room.starts_with(USER_ROOM_PREFIX) && self.rooms.allows(room)
    }

    /// Whether it may leave `room`: any but a `user:` room, which is how the server reaches
    /// (and disconnects) every socket of a user.
    ///
    /// ```
    /// let g = worker::Grant::anonymous();
    /// assert!(g.may_leave("lobby") && !g.may_leave("user:alice"));
    /// ```
    pub fn may_leave(&self, room: &str) -> bool {
        !room.starts_with(USER_ROOM_PREFIX)
    }

    /// Whether it may publish to `room`. A `user:` room is a user's private channel: only a
    /// pattern that names `user:` itself (`"user:*"`, `"user:bob"`) reaches one, never `"*"`.
    ///
    /// ```
    /// let support = worker::Grant {
    ///     publish: ["user:*"].into_iter().collect(),
    ///     ..worker::Grant::anonymous()
    /// };
    /// assert!(support.may_publish("user:bob") && !worker::Grant::anonymous().may_publish("user:bob"));
    /// ```
    pub fn may_publish(&self, room: &str) -> bool {
        if room.starts_with(USER_ROOM_PREFIX) {
            self.publish
                .0
                .iter()
                .filter(|p| p.starts_with(USER_ROOM_PREFIX))
                .any(|p| Rooms(vec![p.clone()]).allows(room))
        } else {
            self.publish.allows(room)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_and_prefixes() {
        let rooms: Rooms = ["lobby", "chat:*"].into_iter().collect();
        assert!(rooms.allows("lobby"));
        assert!(rooms.allows("chat:") && rooms.allows("chat:42"));
        assert!(!rooms.allows("lobby2") && !rooms.allows("chat") && !rooms.allows("Lobby"));
        assert!(Rooms::any().allows("anything"));
        assert!(!Rooms::default().allows("lobby"));
    }

    #[test]
    fn user_rooms_are_the_servers() {
        let g = Grant::anonymous();
        assert!(g.may_join("lobby") && g.may_leave("lobby") && g.may_publish("lobby"));
        assert!(!g.may_join("user:bob") && !g.may_join(&user_room("alice")));
        assert!(!g.may_leave("user:alice"));
        // "*" is not a user's private channel; only a user: pattern reaches one.
        assert!(!g.may_publish("user:bob"));
        let support = Grant {
            publish: ["user:*"].into_iter().collect(),
            ..Grant::anonymous()
        };
        assert!(support.may_publish("user:bob") && !support.may_publish("lobby"));
        let one = Grant {
            publish: ["user:bob", "u*"].into_iter().collect(),
            ..Grant::anonymous()
        };
        assert!(one.may_publish("user:bob") && !one.may_publish("user:eve"));
    }
}
