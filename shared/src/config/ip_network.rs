//! [`IpNetwork`]: an IP address or CIDR block (`10.0.0.0/8`, `::1`, `192.168.1.7`), parsed
//! once when the fleet file is read (`balancer.trusted_proxies`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// An IPv4 or IPv6 network: an address and a prefix length (32 or 128 for a bare address).
///
/// The address is kept as written (host bits included); [`IpNetwork::contains`] compares only
/// the first `prefix` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNetwork {
    addr: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    /// The network of `addr`'s first `prefix` bits.
    ///
    /// # Errors
    /// When `prefix` is longer than the address (32 for IPv4, 128 for IPv6).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        if prefix > max_prefix(addr) {
            return Err(format!(
                "{:?} has a bad prefix length",
                format!("{addr}/{prefix}")
            ));
        }
        Ok(IpNetwork { addr, prefix })
    }

    /// The address as written.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in this network. An IPv4 address is never in an IPv6 network nor the
    /// reverse (IPv4-mapped IPv6 addresses are not unwrapped).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix(
                u32::from(net).into(),
                u32::from(*ip).into(),
                self.prefix,
                32,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(u128::from(net), u128::from(*ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// Whether the first `prefix` of the low `width` bits of `a` and `b` agree.
fn same_prefix(a: u128, b: u128, prefix: u8, width: u32) -> bool {
    // Shifting by the whole width is an overflow in Rust, hence `checked_shr`: /0 matches all.
    let host_bits = width - u32::from(prefix);
    (a ^ b).checked_shr(host_bits).unwrap_or(0) == 0
}

impl FromStr for IpNetwork {
    type Err = String;

    /// `10.0.0.0/8`, `::1`, `192.168.1.7`. The messages quote the whole entry as written, as
    /// the fleet file's errors do.
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP or CIDR"))?;
        let max = max_prefix(addr);
        let prefix = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?} has a bad prefix length"))?,
        };
        Ok(IpNetwork { addr, prefix })
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for IpNetwork {
    /// From the same strings as [`FromStr`]. The error is raised after the string is read, so
    /// serde_yaml reports it at the enclosing list (`balancer.trusted_proxies`), not at the
    /// entry: see `error::from_serde`, which then points at the list's key line.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_slash_8() {
        let n = net("10.0.0.0/8");
        assert!(n.contains(&ip("10.0.0.0")));
        assert!(n.contains(&ip("10.255.255.255")));
        assert!(!n.contains(&ip("11.0.0.0")));
        assert!(!n.contains(&ip("9.255.255.255")));
        // Host bits as written do not matter.
        assert!(net("10.1.2.3/8").contains(&ip("10.200.0.1")));
    }

    #[test]
    fn v4_single_address_is_slash_32() {
        let n = net("192.168.1.7");
        assert_eq!(n.prefix(), 32);
        assert_eq!(n, net("192.168.1.7/32"));
        assert!(n.contains(&ip("192.168.1.7")));
        assert!(!n.contains(&ip("192.168.1.6")));
        assert!(!n.contains(&ip("192.168.1.8")));
    }

    #[test]
    fn slash_0_holds_its_whole_family() {
        let n = net("0.0.0.0/0");
        assert!(n.contains(&ip("0.0.0.0")));
        assert!(n.contains(&ip("255.255.255.255")));
        assert!(!n.contains(&ip("::")));
        let n = net("::/0");
        assert!(n.contains(&ip("ffff::1")));
        assert!(!n.contains(&ip("1.2.3.4")));
    }

    #[test]
    fn v6_slash_64_and_128() {
        let n = net("2001:db8:1:2::/64");
        assert!(n.contains(&ip("2001:db8:1:2::1")));
        assert!(n.contains(&ip("2001:db8:1:2:ffff:ffff:ffff:ffff")));
        assert!(!n.contains(&ip("2001:db8:1:3::")));
        let n = net("::1");
        assert_eq!(n.prefix(), 128);
        assert!(n.contains(&ip("::1")));
        assert!(!n.contains(&ip("::2")));
    }

    #[test]
    fn v4_and_v6_never_match() {
        assert!(!net("127.0.0.1").contains(&ip("::1")));
        assert!(!net("::1").contains(&ip("127.0.0.1")));
        // IPv4-mapped addresses are not unwrapped.
        assert!(!net("10.0.0.0/8").contains(&ip("::ffff:10.0.0.1")));
        assert!(!net("::ffff:0:0/96").contains(&ip("10.0.0.1")));
    }

    #[test]
    fn bad_entries_quote_the_entry() {
        let err = |s: &str| s.parse::<IpNetwork>().unwrap_err();
        assert_eq!(
            err("10.0.0.0/40"),
            r#""10.0.0.0/40" has a bad prefix length"#
        );
        assert_eq!(err("::/129"), r#""::/129" has a bad prefix length"#);
        assert_eq!(err("10.0.0.0/x"), r#""10.0.0.0/x" has a bad prefix length"#);
        assert_eq!(err("proxy.local"), r#""proxy.local" is not an IP or CIDR"#);
        assert!(IpNetwork::new(ip("10.0.0.0"), 33).is_err());
        assert_eq!(IpNetwork::new(ip("10.0.0.0"), 8), Ok(net("10.0.0.0/8")));
    }

    #[test]
    fn display_round_trips() {
        for s in ["10.0.0.0/8", "192.168.1.7/32", "::1/128", "2001:db8::/64"] {
            assert_eq!(net(s).to_string(), s);
        }
    }
}
