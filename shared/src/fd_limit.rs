//! The open-file limit: every client costs a fleet process descriptors, so each binary raises
//! its soft RLIMIT_NOFILE to the hard limit at start and says how many clients that allows.

use std::io;

/// Descriptors a process keeps for itself whatever its clients: stdio, listeners, epoll and
/// eventfds, Redis links, the handoff channel, log files. Subtracted before counting clients.
pub const RESERVED: u64 = 128;

/// Descriptors a worker holds per client: its socket (a polling client's upgrade briefly
/// holds two, which [`RESERVED`] absorbs).
pub const WORKER_FDS_PER_CLIENT: u64 = 1;

/// Descriptors the balancer holds per proxied or relayed connection: the client's socket and
/// its worker's. (A WebSocket handed off to its worker holds none.)
pub const BALANCER_FDS_PER_CONNECTION: u64 = 2;

/// RLIMIT_NOFILE before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The soft limit the process was started with.
    pub was: u64,
    /// The soft limit now in force.
    pub soft: u64,
    /// The hard limit (the ceiling of `soft`; only privileged processes may raise it).
    pub hard: u64,
}

impl Limits {
    /// How many connections the soft limit allows at `per_connection` descriptors each, after
    /// the [`RESERVED`] ones.
    ///
    /// # Panics
    /// If `per_connection` is 0.
    pub fn connections(&self, per_connection: u64) -> u64 {
        self.soft.saturating_sub(RESERVED) / per_connection
    }
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit (nothing changes when they are equal).
///
/// # Errors
/// The OS error of `getrlimit` or `setrlimit`; the limit is then unchanged.
// `rlim_t` is u64 on 64-bit Linux but not on every target: the casts are not always no-ops.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile() -> io::Result<Limits> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let was = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(Limits {
        was: was as u64,
        soft: lim.rlim_cur as u64,
        hard: lim.rlim_max as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_leave_the_reserve_and_round_down() {
        let l = |soft| Limits {
            was: 256,
            soft,
            hard: soft,
        };
        assert_eq!(l(1024).connections(WORKER_FDS_PER_CLIENT), 896);
        assert_eq!(l(1024).connections(BALANCER_FDS_PER_CONNECTION), 448);
        assert_eq!(l(1025).connections(2), 448);
        assert_eq!(l(100).connections(1), 0);
    }

    /// Raising is idempotent: a second call finds soft already at hard.
    #[test]
    fn raise_reaches_the_hard_limit() {
        let first = raise_nofile().unwrap();
        assert_eq!(first.soft, first.hard);
        assert!(first.was <= first.soft);
        let again = raise_nofile().unwrap();
        assert_eq!((again.was, again.soft), (first.soft, first.soft));
    }
}
