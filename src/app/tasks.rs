//! The daemon's own background tasks beside the watcher and the workers: the pause's record for
//! `status` (another process), and the 401 re-check that lifts an account's pause once its token
//! is accepted again.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::now_ms;
use crate::gate::Gate;
use crate::queue::{PAUSE_KEY, Queue};
use crate::shared::Shared;

/// Keeps the pause state in the database, where `status` (another process) reads it: the pause
/// shown, and which accounts a rejected token paused (JSON: account → answer).
pub(super) async fn persist_pause(gate: Arc<Gate>, queue: Queue, cancel: CancellationToken) {
    let mut rx = gate.subscribe();
    let mut last: (Option<String>, Option<String>) = (None, None);
    loop {
        let now = {
            let st = rx.borrow_and_update();
            let accounts = (!st.accounts_paused.is_empty())
                .then(|| serde_json::to_string(&st.accounts_paused).unwrap_or_default());
            (st.shown().map(|p| p.reason()), accounts)
        };
        if now != last {
            let written = async {
                queue
                    .set_daemon_state(PAUSE_KEY, now.0.as_deref(), now_ms())
                    .await?;
                queue
                    .set_daemon_state(
                        crate::status::ACCOUNTS_PAUSED_KEY,
                        now.1.as_deref(),
                        now_ms(),
                    )
                    .await
            };
            if let Err(e) = written.await {
                warn!(error = %e, "cannot record the pause state for `status`");
            }
            last = now;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// While an account is paused by a 401: re-read its token (the operator may have fixed the file)
/// and try one cheap authenticated call every `api.pause_recheck`; resume that account on success.
pub(super) async fn auth_recheck(shared: Arc<Shared>, now: Arc<Notify>, cancel: CancellationToken) {
    let gate = &shared.gate;
    let mut rx = gate.subscribe();
    loop {
        let paused: Vec<String> = rx
            .borrow_and_update()
            .accounts_paused
            .keys()
            .cloned()
            .collect();
        if paused.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(shared.cfg.api.pause_recheck) => {}
            _ = now.notified() => {}
        }
        for account in paused {
            recheck_account(&shared, &account).await;
        }
    }
}

/// One paused account's re-check: its token read again, then one authenticated call.
pub(super) async fn recheck_account(shared: &Shared, account: &str) {
    let cfg = &shared.cfg;
    let (api, token) = match shared.tenants.get(account) {
        Some(api) => {
            let i = cfg.sources.iter().position(|s| s.name == account);
            let token = i.and_then(|i| cfg.sources[i].load_token(i));
            (api, token.unwrap_or_else(|| cfg.api.token.load()))
        }
        None => (&shared.api, cfg.api.token.load()),
    };
    match token {
        Ok(t) => api.set_token(t),
        Err(e) => {
            warn!(account, error = %e, "still paused: cannot read the token");
            return;
        }
    }
    match api.probe_auth().await {
        Ok(()) => {
            if gate_lift(shared, account) {
                info!(account, "the API accepts the token again; uploads resume");
            }
        }
        Err(e) => info!(account, error = %e, "still paused: the API rejects the token"),
    }
}

/// Lifts an account's pause and wakes whoever waits for its jobs. True if it was paused.
pub(super) fn gate_lift(shared: &Shared, account: &str) -> bool {
    shared.gate.success();
    if shared.gate.account_ok(account).is_none() {
        return false;
    }
    shared.wake.workers.notify_waiters();
    shared.wake.follower.notify_one();
    true
}
