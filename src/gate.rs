//! Owns the pipeline-wide "may workers talk to the API now?" state: paused because the token was
//! rejected (401), held back during an outage (connection refused) or after a 429, or open.
//!
//! Failures that are not a job's fault land here instead of on the job, so an hour-long outage does
//! not burn every job's attempts: workers wait at the gate, one probe at a time goes through, and
//! the first success opens it for everyone.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::retry::Backoff;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pause {
    /// 401: nothing will work until the token is fixed.
    Auth(String),
    /// The API cannot be reached; retried with capped backoff.
    Outage(String),
    /// The local database cannot be written (disk full, ...).
    Storage(String),
}

impl Pause {
    pub fn reason(&self) -> String {
        match self {
            Pause::Auth(m) => format!("API token rejected: {m}"),
            Pause::Outage(m) => format!("API unreachable: {m}"),
            Pause::Storage(m) => format!("queue database not writable: {m}"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GateState {
    pub pause: Option<Pause>,
    /// Workers wait until this instant (outage backoff, Retry-After).
    pub hold_until: Option<Instant>,
    pub outage_failures: u32,
}

#[derive(Debug)]
pub struct Gate {
    tx: watch::Sender<GateState>,
    outage_backoff: Backoff,
}

impl Gate {
    pub fn new(outage_backoff: Backoff) -> Self {
        Gate {
            tx: watch::Sender::new(GateState::default()),
            outage_backoff,
        }
    }

    pub fn state(&self) -> GateState {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<GateState> {
        self.tx.subscribe()
    }

    /// Waits until work may go on. Returns false if `cancel` fired first.
    pub async fn wait_open(&self, cancel: &CancellationToken) -> bool {
        let mut rx = self.tx.subscribe();
        loop {
            if cancel.is_cancelled() {
                return false;
            }
            let st = rx.borrow_and_update().clone();
            let blocked_forever = matches!(st.pause, Some(Pause::Auth(_) | Pause::Storage(_)));
            let hold = st.hold_until.filter(|h| *h > Instant::now());
            if !blocked_forever && hold.is_none() {
                return true;
            }
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = rx.changed() => {}
                _ = async {
                    match hold {
                        Some(h) if !blocked_forever => tokio::time::sleep_until(h.into()).await,
                        _ => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    /// The token was rejected. Returns true if this changed the state (log once).
    pub fn pause_auth(&self, message: String) -> bool {
        self.tx.send_if_modified(|s| {
            if matches!(s.pause, Some(Pause::Auth(_))) {
                return false;
            }
            s.pause = Some(Pause::Auth(message));
            true
        })
    }

    pub fn pause_storage(&self, message: String) -> bool {
        self.tx.send_if_modified(|s| {
            if matches!(s.pause, Some(Pause::Storage(_) | Pause::Auth(_))) {
                return false;
            }
            s.pause = Some(Pause::Storage(message));
            true
        })
    }

    /// The API could not be reached. Holds every worker back for a growing, capped delay; failures
    /// reported while the gate is already held (other workers' requests of the same moment) do not
    /// grow it further. Returns the delay if this call set it.
    pub fn outage(&self, message: String, unit: f64) -> Option<Duration> {
        let mut set = None;
        self.tx.send_if_modified(|s| {
            if s.hold_until.is_some_and(|h| h > Instant::now()) {
                return false;
            }
            s.outage_failures += 1;
            let d = self.outage_backoff.delay(s.outage_failures, unit);
            s.hold_until = Some(Instant::now() + d);
            if !matches!(s.pause, Some(Pause::Auth(_))) {
                s.pause = Some(Pause::Outage(message));
            }
            set = Some(d);
            true
        });
        set
    }

    /// The service asked us to slow down: hold everyone for `d`.
    pub fn hold(&self, d: Duration) {
        self.tx.send_if_modified(|s| {
            let until = Instant::now() + d;
            if s.hold_until.is_some_and(|h| h >= until) {
                return false;
            }
            s.hold_until = Some(until);
            true
        });
    }

    /// A request went through: the API is reachable and the token accepted.
    /// Returns the pause that this cleared, if any.
    pub fn success(&self) -> Option<Pause> {
        let mut cleared = None;
        self.tx.send_if_modified(|s| {
            if s.pause.is_none() && s.outage_failures == 0 {
                return false;
            }
            cleared = s.pause.take();
            s.outage_failures = 0;
            s.hold_until = None;
            true
        });
        cleared
    }

    /// The database is writable again.
    pub fn storage_ok(&self) -> bool {
        self.tx.send_if_modified(|s| {
            if matches!(s.pause, Some(Pause::Storage(_))) {
                s.pause = None;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate::new(Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        })
    }

    #[tokio::test]
    async fn open_gate_lets_through() {
        let g = gate();
        assert!(g.wait_open(&CancellationToken::new()).await);
    }

    #[tokio::test]
    async fn auth_pause_blocks_until_success() {
        let g = std::sync::Arc::new(gate());
        assert!(g.pause_auth("401".into()));
        assert!(
            !g.pause_auth("401 again".into()),
            "second pause must not log again"
        );
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.wait_open(&CancellationToken::new()).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(matches!(g.success(), Some(Pause::Auth(_))));
        assert!(
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .unwrap()
                .unwrap()
        );
    }

    #[tokio::test]
    async fn outage_holds_and_does_not_compound_within_a_hold() {
        let g = gate();
        let d1 = g.outage("refused".into(), 1.0).unwrap();
        assert_eq!(d1, Duration::from_millis(100));
        assert!(g.outage("refused".into(), 1.0).is_none());
        assert_eq!(g.state().outage_failures, 1);
        let cancel = CancellationToken::new();
        let started = Instant::now();
        assert!(g.wait_open(&cancel).await);
        assert!(started.elapsed() >= Duration::from_millis(90));
    }

    #[tokio::test]
    async fn cancel_releases_a_waiter() {
        let g = gate();
        g.pause_auth("401".into());
        let c = CancellationToken::new();
        c.cancel();
        assert!(!g.wait_open(&c).await);
    }
}
