//! Owns the pipeline-wide "may workers talk to the API now?" state: paused because the token was
//! rejected (401), held back during an outage (connection refused) or after a 429, or open.
//!
//! Failures that are not a job's fault land here instead of on the job, so an hour-long outage does
//! not burn every job's attempts: workers wait at the gate, one probe at a time goes through, and
//! the first success opens it for everyone.
//!
//! An API that answers but fails everything (a 5xx storm: 503 from an overloaded service or a
//! broken proxy) is treated the same way, by a circuit breaker: [`BREAKER_THRESHOLD`] 5xx answers
//! in a row, with no success between them, open it. Until then a 5xx is the job's own failure.
//! Once open, the gate holds everyone back with capped backoff and lets one probe through at a
//! time ([`Gate::admit`]), so a storm costs a bounded number of requests and no attempts.

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
    /// The API answers, but with 5xx to everything (the circuit breaker is open).
    Failing(String),
    /// The process ran out of file descriptors (EMFILE/ENFILE); held back like an outage.
    Descriptors(String),
}

impl Pause {
    pub fn reason(&self) -> String {
        match self {
            Pause::Auth(m) => format!("API token rejected: {m}"),
            Pause::Outage(m) => format!("API unreachable: {m}"),
            Pause::Storage(m) => format!("queue database not writable: {m}"),
            Pause::Descriptors(m) => {
                format!("out of file descriptors (raise LimitNOFILE, or lower upload.workers): {m}")
            }
            Pause::Failing(m) => format!("API failing every request: {m}"),
        }
    }

    /// An outage of the API, waited out with capped backoff and single probes.
    fn is_outage(&self) -> bool {
        matches!(
            self,
            Pause::Outage(_) | Pause::Failing(_) | Pause::Descriptors(_)
        )
    }
}

/// Consecutive 5xx answers, with no success between them, that open the circuit breaker. High
/// enough that a flaky service failing a third of its requests practically never opens it
/// (0.3^10 ≈ 6·10⁻⁶ a request), low enough that a storm costs a handful of requests.
pub const BREAKER_THRESHOLD: u32 = 10;

/// What a 5xx answer did to the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// Below the threshold: the job's own failure, counted as an attempt.
    Closed,
    /// This answer opened the breaker: everyone holds back for this long (log it, once).
    Opened(Duration),
    /// Already open (a probe that failed, or a request sent before it opened): not the job's fault.
    Open,
}

impl Breaker {
    /// Says so when the breaker opens (once; it says nothing for every failure while it is open:
    /// the line that it closed again comes from whoever sees the first success). True if open:
    /// the failure is the service's, not the job's.
    pub fn report(self, error: &str) -> bool {
        match self {
            Breaker::Closed => false,
            Breaker::Opened(d) => {
                tracing::warn!(error, consecutive = BREAKER_THRESHOLD, retry_in = ?d,
                    "the API answers every request with a server error: treated as an outage. Uploads and result polls hold back and one request at a time probes it, with capped backoff; attempts are not counted meanwhile");
                true
            }
            Breaker::Open => {
                tracing::debug!(error, "API still failing; holding back");
                true
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GateState {
    pub pause: Option<Pause>,
    /// Workers wait until this instant (outage backoff, Retry-After).
    pub hold_until: Option<Instant>,
    pub outage_failures: u32,
    /// 5xx answers in a row, with no success between them.
    pub server_errors: u32,
    /// The probe let through while an outage's hold is over (half-open), by its number.
    pub probing: Option<u64>,
    probes: u64,
    /// Accounts whose token the API rejected (401/403), by account name (a source with a token
    /// of its own, or `default` for `[api]`'s), with the answer. Only those accounts' sources
    /// stop: the workers claim around them (`Queue::claim_except`).
    pub accounts_paused: std::collections::BTreeMap<String, String>,
}

impl GateState {
    /// The pause to show (`status`, `/healthz`, the unit's STATUS line): a rejected token first,
    /// as it needs an operator, then any pause of everyone.
    pub fn shown(&self) -> Option<Pause> {
        if self.accounts_paused.is_empty() {
            return self.pause.clone();
        }
        let only_default = self.accounts_paused.len() == 1
            && self
                .accounts_paused
                .contains_key(crate::config::DEFAULT_SOURCE);
        if only_default {
            return self
                .accounts_paused
                .values()
                .next()
                .cloned()
                .map(Pause::Auth);
        }
        let each: Vec<String> = self
            .accounts_paused
            .iter()
            .map(|(a, m)| format!("account {a:?}: {m}"))
            .collect();
        Some(Pause::Auth(each.join("; ")))
    }
}

/// What a caller at the gate should do now.
enum Turn {
    Go { probe: Option<u64> },
    Wait(Option<Instant>),
}

impl GateState {
    fn turn(&mut self, may_probe: bool, now: Instant) -> Turn {
        if matches!(self.pause, Some(Pause::Auth(_) | Pause::Storage(_))) {
            return Turn::Wait(None);
        }
        if let Some(h) = self.hold_until.filter(|h| *h > now) {
            return Turn::Wait(Some(h));
        }
        if !self.pause.as_ref().is_some_and(Pause::is_outage) {
            return Turn::Go { probe: None };
        }
        // Half-open: the hold is over but nothing has succeeded yet. One request finds out.
        if !may_probe || self.probing.is_some() {
            return Turn::Wait(None);
        }
        self.probes += 1;
        self.probing = Some(self.probes);
        Turn::Go {
            probe: self.probing,
        }
    }
}

/// Leave to talk to the API, from [`Gate::admit`]. Hold it for as long as the request that it
/// admitted: a probe that ends without telling the gate (its file vanished, the service refused
/// the file) hands the probe on when dropped.
#[must_use]
pub struct Admission<'a> {
    gate: &'a Gate,
    probe: Option<u64>,
}

impl Admission<'_> {
    /// Whether this is the single request that probes an outage: send one request, not a batch.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.probe {
            self.gate.tx.send_if_modified(|s| {
                if s.probing == Some(n) {
                    s.probing = None;
                    true
                } else {
                    false
                }
            });
        }
    }
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

    /// Whether a request that is not the probe may go out now.
    pub fn is_open(&self) -> bool {
        let mut st = self.state();
        matches!(st.turn(false, Instant::now()), Turn::Go { .. })
    }

    /// Waits until the gate is fully open (an outage's probe is left to [`Gate::admit`] callers).
    /// Returns false if `cancel` fired first.
    pub async fn wait_open(&self, cancel: &CancellationToken) -> bool {
        self.wait_turn(cancel, false).await.is_some()
    }

    /// Waits until a request to the API may go out: the gate is open, or an outage's hold is over
    /// and no other probe is out (this caller then is the probe). None if `cancel` fired first.
    pub async fn admit(&self, cancel: &CancellationToken) -> Option<Admission<'_>> {
        let probe = self.wait_turn(cancel, true).await?;
        Some(Admission { gate: self, probe })
    }

    async fn wait_turn(&self, cancel: &CancellationToken, may_probe: bool) -> Option<Option<u64>> {
        let mut rx = self.tx.subscribe();
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            rx.borrow_and_update();
            let mut turn = Turn::Wait(None);
            // Taking the probe notifies no one: the others are waiting for its outcome anyway.
            self.tx.send_if_modified(|s| {
                turn = s.turn(may_probe, Instant::now());
                false
            });
            let hold = match turn {
                Turn::Go { probe } => return Some(probe),
                Turn::Wait(hold) => hold,
            };
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = rx.changed() => {}
                _ = async {
                    match hold {
                        Some(h) => tokio::time::sleep_until(h.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    /// One account's token was rejected: its sources pause, the others go on. Returns true if
    /// this changed the state (log once).
    pub fn pause_account(&self, account: &str, message: String) -> bool {
        self.tx.send_if_modified(|s| {
            if s.accounts_paused.contains_key(account) {
                return false;
            }
            s.accounts_paused.insert(account.to_string(), message);
            true
        })
    }

    /// A request on `account` went through: its token is accepted. Returns the message of the
    /// pause this lifted, if any.
    pub fn account_ok(&self, account: &str) -> Option<String> {
        let mut lifted = None;
        self.tx.send_if_modified(|s| {
            lifted = s.accounts_paused.remove(account);
            lifted.is_some()
        });
        lifted
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
        self.hold_back(
            Pause::Outage(message),
            |p| matches!(p, Pause::Auth(_)),
            unit,
        )
    }

    /// Holds every worker back for the outage backoff under `pause`, unless a hold is already
    /// running; a pause for which `outranks` is true stays the one shown. Returns the delay if this
    /// call set it.
    fn hold_back(&self, pause: Pause, outranks: fn(&Pause) -> bool, unit: f64) -> Option<Duration> {
        let mut set = None;
        self.tx.send_if_modified(|s| {
            if s.hold_until.is_some_and(|h| h > Instant::now()) {
                return false;
            }
            s.outage_failures += 1;
            let d = self.outage_backoff.delay(s.outage_failures, unit);
            s.hold_until = Some(Instant::now() + d);
            s.probing = None;
            if !s.pause.as_ref().is_some_and(outranks) {
                s.pause = Some(pause);
            }
            set = Some(d);
            true
        });
        set
    }

    /// The API answered 5xx. Counts toward opening the breaker; once open, every 5xx (a failed
    /// probe) holds everyone back again, for a growing, capped delay.
    pub fn server_error(&self, message: String, unit: f64) -> Breaker {
        let mut out = Breaker::Closed;
        self.tx.send_if_modified(|s| {
            let now = Instant::now();
            if s.pause.as_ref().is_some_and(Pause::is_outage) {
                out = Breaker::Open;
                if s.hold_until.is_some_and(|h| h > now) {
                    // Sent before the hold began: it says nothing new.
                    return false;
                }
                s.outage_failures += 1;
                s.hold_until = Some(now + self.outage_backoff.delay(s.outage_failures, unit));
                s.probing = None;
                return true;
            }
            s.server_errors = s.server_errors.saturating_add(1);
            if s.server_errors < BREAKER_THRESHOLD {
                return false;
            }
            let d = self.outage_backoff.delay(1, unit);
            s.outage_failures = 1;
            s.hold_until = Some(now + d);
            s.probing = None;
            if !matches!(s.pause, Some(Pause::Auth(_))) {
                s.pause = Some(Pause::Failing(format!(
                    "{} answers in a row were 5xx, the last: {message}",
                    s.server_errors
                )));
            }
            out = Breaker::Opened(d);
            true
        });
        out
    }

    /// The process ran out of file descriptors (EMFILE/ENFILE): neither the API's fault nor the
    /// job's. Held back like an outage (a growing, capped delay; no attempt counted), under its own
    /// reason, until descriptors are free again. Returns the delay if this call set it.
    pub fn out_of_descriptors(&self, message: String, unit: f64) -> Option<Duration> {
        self.hold_back(
            Pause::Descriptors(message),
            |p| matches!(p, Pause::Auth(_) | Pause::Storage(_)),
            unit,
        )
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
            // Kept without notifying anyone: only an open breaker makes waiters care.
            s.server_errors = 0;
            // An answer from the API says nothing about the queue: a database that takes no
            // writes keeps every worker paused until a write goes through (`storage_ok`).
            let storage = matches!(s.pause, Some(Pause::Storage(_)));
            if (s.pause.is_none() || storage) && s.outage_failures == 0 {
                return false;
            }
            if !storage {
                cleared = s.pause.take();
            }
            s.outage_failures = 0;
            s.hold_until = None;
            s.probing = None;
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

    #[test]
    fn an_api_success_does_not_lift_a_pause_for_the_queue_database() {
        let g = gate();
        assert!(g.pause_storage("disk full".into()));
        // Another worker's request in flight gets its answer meanwhile.
        assert!(g.success().is_none(), "nothing lifted");
        assert!(
            matches!(g.state().shown(), Some(p) if p.reason().contains("disk full")),
            "still paused for the database"
        );
        assert!(g.storage_ok(), "a write that goes through lifts it");
        assert!(g.state().shown().is_none());
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
        assert!(g.admit(&cancel).await.is_some_and(|a| a.is_probe()));
        assert!(started.elapsed() >= Duration::from_millis(90));
    }

    #[tokio::test]
    async fn many_5xx_in_a_row_open_the_breaker_and_a_success_closes_it() {
        let g = gate();
        for _ in 1..BREAKER_THRESHOLD {
            assert_eq!(g.server_error("503".into(), 0.0), Breaker::Closed);
        }
        // A success between them starts the count again.
        assert!(g.success().is_none());
        for _ in 1..BREAKER_THRESHOLD {
            assert_eq!(g.server_error("503".into(), 0.0), Breaker::Closed);
        }
        assert!(matches!(
            g.server_error("503".into(), 0.0),
            Breaker::Opened(_)
        ));
        // Answers to requests sent before it opened do not lengthen the hold.
        assert_eq!(g.server_error("503".into(), 0.0), Breaker::Open);
        assert_eq!(g.state().outage_failures, 1);
        assert!(matches!(g.state().pause, Some(Pause::Failing(_))));
        assert!(g.state().hold_until.is_some());
        assert!(matches!(g.success(), Some(Pause::Failing(_))));
        assert!(g.state().pause.is_none() && g.state().hold_until.is_none());
        assert_eq!(g.server_error("503".into(), 0.0), Breaker::Closed);
    }

    #[tokio::test]
    async fn an_outage_lets_one_probe_through_at_a_time() {
        let g = std::sync::Arc::new(gate());
        let cancel = CancellationToken::new();
        g.outage("refused".into(), 0.0).unwrap();
        let probe = g.admit(&cancel).await.unwrap();
        assert!(probe.is_probe(), "after the hold: a probe");
        // Everyone else waits for the probe's outcome.
        let g2 = g.clone();
        let c2 = cancel.clone();
        let other = tokio::spawn(async move { g2.admit(&c2).await.map(|a| a.is_probe()) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !other.is_finished(),
            "a second caller got through beside the probe"
        );
        // The probe failed: held again, longer, and the probe is handed on after that.
        assert!(g.outage("refused".into(), 0.0).is_some());
        drop(probe);
        assert_eq!(g.state().outage_failures, 2);
        let next = tokio::time::timeout(Duration::from_secs(5), other)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next, Some(true), "the next caller is the next probe");
        // That probe ended without a verdict (dropped): the probe passes on at once.
        let again = tokio::time::timeout(Duration::from_secs(5), g.admit(&cancel))
            .await
            .unwrap()
            .unwrap();
        assert!(again.is_probe());
        // A success opens the gate for everyone, without probes.
        g.success();
        drop(again);
        let a = g.admit(&cancel).await.unwrap();
        let b = g.admit(&cancel).await.unwrap();
        assert!(!a.is_probe() && !b.is_probe());
    }

    #[tokio::test]
    async fn a_rejected_account_pauses_itself_only_and_is_shown() {
        let g = gate();
        assert!(g.pause_account("tenant-b", "HTTP 401: no".into()));
        assert!(!g.pause_account("tenant-b", "again".into()), "log once");
        // Not a pause of everyone: requests of the other accounts go out.
        assert!(g.is_open());
        assert_eq!(
            g.state().shown(),
            Some(Pause::Auth("account \"tenant-b\": HTTP 401: no".into()))
        );
        // The [api] account alone reads as before.
        let g2 = gate();
        g2.pause_account(crate::config::DEFAULT_SOURCE, "HTTP 401: x".into());
        assert_eq!(
            g2.state().shown().map(|p| p.reason()),
            Some("API token rejected: HTTP 401: x".into())
        );
        // A success elsewhere does not lift it; one on its own account does.
        assert!(g.success().is_none());
        assert!(g.account_ok("default").is_none());
        assert!(g.state().accounts_paused.contains_key("tenant-b"));
        assert_eq!(g.account_ok("tenant-b").as_deref(), Some("HTTP 401: no"));
        assert!(g.state().shown().is_none());
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
