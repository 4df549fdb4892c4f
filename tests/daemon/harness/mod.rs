//! Test harness shared by the daemon's integration tests: free ports, waiting for
//! eventual state, skipping a test whose tool is missing (never in CI), and the
//! external processes the daemon talks to (`smtp`).

pub mod daemon;
pub mod smtp;
pub mod vendors;

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before returning, so another process may take it in between;
/// callers that start a server on it retry with a fresh port when binding fails.
pub fn free_port() -> u16 {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0 always works");
    listener
        .local_addr()
        .expect("a bound listener has a local address")
        .port()
}

/// Polls `probe` every 50 ms until it returns `Some`, and returns that value.
///
/// Panics naming `what` when `timeout` passes first. The deadline is wall-clock time,
/// because what is awaited usually happens in another process.
pub async fn eventually<T, Fut>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until UTC midnight has passed when it is less than `margin` away, so a test
/// of something that resets at UTC midnight (a vendor's daily API budget) cannot have
/// the reset happen in the middle of it. Outside those minutes of the day it returns at
/// once; the test then runs the same on any date and at any hour.
pub async fn clear_of_utc_midnight(margin: Duration) {
    let now = chrono::Utc::now();
    let next = (now.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 1)
        .expect("00:00:01 exists on every date")
        .and_utc();
    let left = (next - now).to_std().unwrap_or_default();
    if left <= margin {
        tokio::time::sleep(left).await;
    }
}

// `skip`: the rule for a test whose tool is missing, one file shared with the unit
// tests.
#[path = "../../../src/test_skip.rs"]
mod skip_rule;
pub use skip_rule::skip;

/// The throwaway PostgreSQL cluster, one file shared with the store's unit tests.
#[path = "../../../src/store/postgres/test_cluster.rs"]
pub mod postgres;

/// A fresh database in the throwaway cluster, or `None` after skipping `test` where
/// PostgreSQL is not installed.
pub fn postgres_database(test: &str) -> Option<postgres::TestDatabase> {
    match postgres::cluster() {
        Ok(cluster) => Some(cluster.create_database()),
        Err(reason) => {
            skip(test, &reason);
            None
        }
    }
}
