//! The fleet balancer: a pingora front proxy with stateless sticky sessions.
#![warn(missing_docs)]

pub mod sticky;
