//! Test harness shared by the daemon's integration tests: free ports, waiting for
//! eventual state, and the external processes the daemon talks to (`smtp`).

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
