//! Owns the conversation with systemd (`Type=notify`): READY, STOPPING, STATUS lines and the
//! watchdog keep-alive. Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.
//!
//! When to feed the watchdog is decided in [`crate::health`]; this module only sends.

use std::time::Duration;

use sd_notify::NotifyState;

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState]) {
    if !enabled() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// "Still alive" for `WatchdogSec=`.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The unit's `WatchdogSec=` if it applies to this process (`WATCHDOG_USEC`, `WATCHDOG_PID`).
pub fn watchdog_timeout() -> Option<Duration> {
    if !enabled() {
        return None;
    }
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}
