//! The per-address limits table under a flood from a million distinct addresses: how many it
//! tracks and what the process's memory does (docs/BENCHMARKS.md, "Per-address limits").
//!
//! `cargo run --release -p balancer --example limits_table`

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use balancer::limits::{AddressLimits, MAX_ADDRESSES};
use shared::config::LimitsConfig;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let limits = AddressLimits::new(&LimitsConfig {
        connections_per_ip: 20,
        handshakes_per_ip_per_sec: 5,
    })
    .expect("limits on");
    let before = rss_kib();
    // 10,000 addresses holding a connection each (what 20,000 descriptors allow at most).
    let held: Vec<_> = (0..10_000u32)
        .map(|n| {
            limits
                .connect(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)))
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    let mut peak_tracked = 0;
    let mut peak_rss = 0;
    for n in 0..1_000_000u128 {
        // IPv6 addresses, the larger key.
        let ip = IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | n));
        let _ = limits.handshake(ip);
        if n % 10_000 == 0 {
            peak_tracked = peak_tracked.max(limits.tracked());
            peak_rss = peak_rss.max(rss_kib());
        }
    }
    let elapsed = started.elapsed();
    println!(
        "| addresses flooding | table cap | tracked at most | RSS before | RSS at most | ns per check |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| 1,000,000 (+10,000 holding connections) | {MAX_ADDRESSES} | {peak_tracked} | {:.1} MiB | {:.1} MiB | {:.0} |",
        before as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        elapsed.as_nanos() as f64 / 1e6
    );
    drop(held);
}
