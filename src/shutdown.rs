//! Signals, sd_notify and the shutdown deadline.
//!
//! SIGTERM and SIGINT cancel the root token; SIGHUP asks for a config reload. When
//! `$NOTIFY_SOCKET` is set (systemd `Type=notify`), the daemon reports `READY=1`,
//! `STATUS=…`, `RELOADING=1` and `STOPPING=1`, and pings the watchdog at half of
//! `$WATCHDOG_USEC`. Without systemd these calls do nothing.

use sd_notify::NotifyState;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Listens for SIGTERM/SIGINT (cancel `shutdown`) and SIGHUP (send on `reload`).
pub fn spawn_signal_handlers(shutdown: CancellationToken, reload: mpsc::Sender<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            warn!("could not install signal handlers");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM received, shutting down"); shutdown.cancel(); break; }
                _ = int.recv() => { info!("SIGINT received, shutting down"); shutdown.cancel(); break; }
                _ = hup.recv() => { info!("SIGHUP received, reloading the config"); let _ = reload.try_send(()); }
                _ = shutdown.cancelled() => break,
            }
        }
    });
}

/// Tells systemd something; a no-op outside systemd.
pub fn notify(state: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(error) = sd_notify::notify(false, state)
    {
        warn!(%error, "sd_notify failed");
    }
}

pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn notify_stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Pings the systemd watchdog at half its interval until `shutdown`.
pub fn spawn_watchdog(shutdown: CancellationToken) {
    // As libsystemd's sd_watchdog_enabled: WATCHDOG_USEC enables it; WATCHDOG_PID,
    // when set, must name this process.
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .is_none_or(|pid| pid == std::process::id());
    if usec == 0 || !for_us {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    info!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => notify(&[NotifyState::Watchdog]),
            }
        }
    });
}
