//! PostgreSQL only: this daemon's upkeep of the shared queue, the heartbeat that renews its claims
//! and roles, and the reaper that takes over dead daemons' jobs.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::now_ms;
use crate::config::Config;
use crate::queue::{Queue, QueueError, Role};

/// A dead daemon's claim runs out at most one lease after its last heartbeat; failover is promised
/// within the lease plus 10 s, so the survivors must look well within 10 s whatever the lease (every
/// half lease was 15 s at the default lease: 42.9 s from a kill to the takeover, measured).
const REAP_AT_LEAST_EVERY: Duration = Duration::from_secs(5);

/// PostgreSQL only: keeps this daemon's claims alive and takes over dead daemons' jobs. The
/// heartbeat renews every claim this daemon holds every third of the lease, so one late round
/// trip does not lose them; the reaper, run by every daemon every half lease or 5 s if sooner
/// (one indexed `UPDATE`), puts back jobs whose lease ran out and wakes the workers for them. It
/// also wakes them when a job is due: another daemon may have queued or put it back, and no wake
/// file reaches across hosts.
///
/// The same beat takes or renews the roles this daemon wants ([`wanted_roles`]): the work one
/// daemon of the cluster does at a time, taken over like a job when its daemon dies.
pub(super) async fn cluster_upkeep(
    queue: Queue,
    wanted: Vec<Role>,
    (workers, follower): (Arc<Notify>, Arc<Notify>),
    cancel: CancellationToken,
) {
    let Some(pg) = queue.cluster() else { return };
    // Other daemons' new work wakes this one's workers at once (dropped with this task).
    let _listening = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(work_wakeups(
        queue.clone(),
        workers.clone(),
    )));
    let lease = queue_lease(pg);
    let mut beat = tokio::time::interval(lease / 3);
    let mut reap = tokio::time::interval((lease / 2).min(REAP_AT_LEAST_EVERY));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = beat.tick() => beat_and_renew(&queue, pg, &wanted).await,
            _ = reap.tick() => reap_and_wake(&queue, pg, (&workers, &follower)).await,
        };
        match r {
            Ok(()) if failing => {
                failing = false;
                info!("the shared queue answers again; claims renewed");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "cannot renew this daemon's claims in the shared queue; other daemons take its jobs over if this lasts longer than queue.lease");
            }
            Err(_) => {}
        }
    }
}

/// Wakes the workers whenever any daemon of the cluster commits new work (`LISTEN` on the
/// queue's work channel), so a burst queued by one daemon is shared by all at once rather than at
/// their reaper's next look. A lost connection is made again by the listener; whatever was said
/// meanwhile is caught by the reaper's look, and the workers are woken once anyway.
async fn work_wakeups(queue: Queue, workers: Arc<Notify>) {
    let Some(pg) = queue.cluster() else { return };
    let mut listener = match pg.work_listener().await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot listen for the cluster's new work; this daemon learns of it every few seconds instead");
            return;
        }
    };
    let mut said = false;
    loop {
        match listener.try_recv().await {
            Ok(Some(_)) => {
                said = false;
                workers.notify_waiters();
            }
            // The connection dropped: notifications may have been missed.
            Ok(None) => workers.notify_waiters(),
            Err(e) => {
                if !said {
                    said = true;
                    warn!(error = %e, "lost the cluster's new-work notifications; trying again");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The roles this daemon's configuration gives it work for: a daemon that does not follow
/// results must not hold the role that decides who does.
pub(super) fn wanted_roles(cfg: &Config) -> Vec<Role> {
    Role::ALL
        .into_iter()
        .filter(|r| match r {
            Role::Rescan => {
                !cfg.watch.rescan_interval.is_zero() || !cfg.watch.poll_interval.is_zero()
            }
            Role::Results => cfg.results.enabled,
            Role::Prune => !cfg.queue.keep_history.is_zero(),
        })
        .collect()
}

async fn beat_and_renew(
    queue: &Queue,
    pg: &crate::queue::pg::PgQueue,
    wanted: &[Role],
) -> Result<(), QueueError> {
    pg.heartbeat().await?;
    for (role, held) in queue.renew_roles(wanted).await? {
        if held {
            info!(
                role = role.name(),
                "this daemon now does {} for the cluster",
                role.work()
            );
        } else {
            info!(
                role = role.name(),
                "another daemon now does {} for the cluster",
                role.work()
            );
        }
    }
    Ok(())
}

pub(super) fn queue_lease(pg: &crate::queue::pg::PgQueue) -> Duration {
    pg.lease().max(crate::config::MIN_LEASE)
}

pub(super) async fn reap_and_wake(
    queue: &Queue,
    pg: &crate::queue::pg::PgQueue,
    (workers, follower): (&Notify, &Notify),
) -> Result<(), QueueError> {
    let n = pg.reap_expired(now_ms()).await?;
    if n > 0 {
        info!(
            jobs = n,
            "took over jobs whose daemon stopped renewing its claims; they resume on their interaction ids"
        );
    }
    if n > 0 || queue.next_due().await?.is_some_and(|d| d <= now_ms()) {
        workers.notify_waiters();
    }
    // Another daemon's upload is followed here: no wake-up reaches across hosts.
    if queue.holds(Role::Results) && queue.next_followup().await?.is_some_and(|d| d <= now_ms()) {
        follower.notify_waiters();
    }
    Ok(())
}
