//! This process's name among the replicas sharing one PostgreSQL database: what it
//! writes as `claimed_by` on the rows it claims.
//!
//! Invariant: unique per process, also across hosts and restarts (host name, process
//! id and a random part), so a restarted process never takes its predecessor's claims
//! for its own.

use rand::{Rng, SeedableRng};

/// `host-pid-random`, made once when the store opens.
pub(in crate::store) fn new_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".to_owned());
    let random: u32 = rand::rngs::StdRng::from_os_rng().random();
    format!("{host}-{}-{random:08x}", std::process::id())
}
