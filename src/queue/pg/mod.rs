//! The queue in PostgreSQL, for several daemons on one shared spool: the claims, leases
//! and fencing tokens that let them share one table of jobs and take over each other's work.
//! Schema: `migrations/postgres/`. The states and the transitions' guards are the SQLite queue's
//! ([`Transition`]); what is added is who may make a transition:
//!
//! - **A claim** (`FOR UPDATE SKIP LOCKED`) makes this daemon the job's holder until
//!   `lease_until`, and raises the job's `fence`. [`Held`] carries the fence the claim got.
//! - **Every outcome** (the interaction id, the upload's answer, a retry, a failure) is committed
//!   only where the fence is still the one this claim got and the job is still in the state the
//!   claim left it in. Otherwise it is [`QueueError::LostClaim`] and the caller drops the job.
//!   That is what keeps "declared once, uploaded once" true when a daemon is paused past its
//!   lease, wakes up late and tries to commit after another daemon took the job over.
//! - **A heartbeat** renews every lease the daemon holds in one statement.
//! - **A takeover** ([`PgQueue::reap_expired`], run by every daemon) puts a job whose lease ran
//!   out back to wait, as a restart's recovery does for SQLite: `declaring` to `pending` with a
//!   possible orphan counted (its declare may have reached ElevateAI; the API has no idempotency
//!   key), `uploading` to `declared` (the upload is repeated on the same interaction; a `409`
//!   says it had got through).
//! - **Roles** (the rescan, the results follower, pruning) are leases of their own
//!   ([`PgQueue::take_role`]): one daemon at a time does each, and another takes it over the
//!   same way.
//!
//! Leases are measured on the database's clock, the one clock every host agrees on; due times
//! (`next_attempt_at`) stay unix ms from the caller's clock, as in SQLite, where a skew between
//! hosts only moves a retry by that skew.

use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};

use super::{Enqueued, Job, NewJob, QueueError, encode_path, fingerprint};

mod claims;
mod follow;
mod forget;
mod history;
mod hook;
mod read;

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const JOB_COLUMNS: &str = "id, path, root, size, mtime_ns, dev, ino, state, attempts, \
    next_attempt_at, interaction_id, upload_status, last_error, created_at, updated_at, \
    uploaded_at, follow_at, follow_attempts, service_status, results_written, orphans, \
    external_id, source, fence, holder";

/// A job this daemon claimed, and the fence its claim got: the proof it must show to commit.
#[derive(Debug, Clone)]
pub struct Held {
    pub job: Job,
    pub fence: i64,
}

/// One daemon of the cluster, as `status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Member {
    /// This run's id (`holder` in the jobs it holds).
    pub id: String,
    pub name: String,
    pub host: String,
    pub pid: u32,
    /// Seconds since its last heartbeat, on the database's clock.
    pub heartbeat_age_s: f64,
    /// It said goodbye (a graceful stop).
    pub stopped: bool,
    /// Jobs it holds now.
    pub held: u64,
    /// The roles it holds under a live lease (`rescan`, `results`, `prune`).
    pub roles: Vec<String>,
}

/// One daemon's handle on the shared queue.
pub struct PgQueue {
    pub(super) pool: PgPool,
    /// This run of this daemon (`daemons.id`): new at every start.
    me: String,
    pub(super) lease: Duration,
}

impl std::fmt::Debug for PgQueue {
    // The URL may carry a password: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgQueue")
            .field("me", &self.me)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl PgQueue {
    /// Connects, brings the schema up to date (PostgreSQL serialises concurrent migrations with
    /// an advisory lock, so three daemons starting at once migrate once) and registers this run
    /// as a daemon named `name` on `host`.
    pub async fn connect(
        url: &str,
        name: &str,
        host: &str,
        lease: Duration,
    ) -> Result<PgQueue, QueueError> {
        let q = PgQueue::attach(url, lease).await?;
        let me = format!("{name}/{}", uuid::Uuid::new_v4().simple());
        sqlx::query("INSERT INTO daemons (id, name, host, pid) VALUES ($1, $2, $3, $4)")
            .bind(&me)
            .bind(name)
            .bind(host)
            .bind(i64::from(std::process::id()))
            .execute(&q.pool)
            .await?;
        // What this host's earlier runs kept for `status` is stale now (theirs only: keys end
        // in their run's id).
        sqlx::query(
            "DELETE FROM daemon_state WHERE split_part(key, '@', 2) IN \
             (SELECT id FROM daemons WHERE name = $1 AND host = $2 AND id <> $3)",
        )
        .bind(name)
        .bind(host)
        .bind(&me)
        .execute(&q.pool)
        .await?;
        Ok(PgQueue { me, ..q })
    }

    /// Records the folders this daemon watches (as stored: the same encoding as jobs' paths) and
    /// returns the live members that watch others, by name and host with their folders. A
    /// recording is one job across daemons only when every host sees it at the same path, so a
    /// difference is worth a warning: a spool mounted at another path on one host, or daemons
    /// sharding the folders between them on purpose.
    pub async fn announce_roots(
        &self,
        roots: &[std::path::PathBuf],
    ) -> Result<Vec<(String, String, Vec<String>)>, QueueError> {
        let mut mine: Vec<String> = roots.iter().map(|r| encode_path(r).into_owned()).collect();
        mine.sort();
        let text = serde_json::to_string(&mine).unwrap_or_else(|_| "[]".into());
        sqlx::query("UPDATE daemons SET roots = $1 WHERE id = $2")
            .bind(&text)
            .bind(&self.me)
            .execute(&self.pool)
            .await?;
        let others: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT name, host, roots FROM daemons WHERE id <> $1 AND stopped_at IS NULL \
             AND heartbeat_at > now() - make_interval(secs => $2::double precision / 1000) \
             AND roots <> '[]' AND roots <> $3 ORDER BY started_at",
        )
        .bind(&self.me)
        .bind(self.lease_ms())
        .bind(&text)
        .fetch_all(&self.pool)
        .await?;
        Ok(others
            .into_iter()
            .map(|(name, host, roots)| {
                let roots: Vec<String> = serde_json::from_str(&roots).unwrap_or_default();
                (
                    name,
                    host,
                    roots
                        .iter()
                        .map(|r| crate::queue::display_path(r))
                        .collect(),
                )
            })
            .collect())
    }

    /// Connects and migrates without joining as a daemon: for the commands (`status`, `list`,
    /// `retry`, `enqueue`), which claim nothing and must not show up as a member.
    pub async fn attach(url: &str, lease: Duration) -> Result<PgQueue, QueueError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await?;
        MIGRATOR.run(&pool).await?;
        let me = format!("command/{}", uuid::Uuid::new_v4().simple());
        Ok(PgQueue { pool, me, lease })
    }

    /// This run's id, as `holder` columns name it.
    pub fn instance(&self) -> &str {
        &self.me
    }

    /// The name this daemon joined under (its host's, by default), without the run's id.
    pub fn name(&self) -> &str {
        self.me.split('/').next().unwrap_or(&self.me)
    }

    /// How long a claim stands unless renewed.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_ms(&self) -> i64 {
        self.lease.as_millis().min(i64::MAX as u128) as i64
    }

    /// Queues file versions. A version another daemon queued first (they all see the same
    /// shared folder) is [`Enqueued::Known`]: discovery is idempotent across daemons because the
    /// version's key is unique in the table, not because daemons agree among themselves.
    pub async fn enqueue(&self, jobs: &[NewJob], now: i64) -> Result<Vec<Enqueued>, QueueError> {
        let mut out = Vec::with_capacity(jobs.len());
        let mut tx = self.pool.begin().await?;
        share_history(&mut tx).await?;
        for j in jobs {
            out.push(match insert_version(&mut tx, j, now).await? {
                Some(id) => Enqueued::New {
                    id,
                    supersedes: None,
                },
                None => Enqueued::Known,
            });
        }
        if out.iter().any(|e| matches!(e, Enqueued::New { .. })) {
            work_for_all(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Listens for [`WORK_CHANNEL`]: every daemon's new work, as it is committed. Holds one of
    /// the pool's connections for as long as it lives.
    pub async fn work_listener(&self) -> Result<sqlx::postgres::PgListener, QueueError> {
        let mut l = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        l.listen(WORK_CHANNEL).await?;
        Ok(l)
    }

    /// Takes (or keeps) the role `name` for this daemon if no other daemon holds it under a live
    /// lease. Returns the role's fence while this daemon holds it, None while another does.
    pub async fn take_role(&self, name: &str) -> Result<Option<i64>, QueueError> {
        let fence: Option<i64> = sqlx::query_scalar(
            "INSERT INTO roles (name, holder, lease_until, fence) \
             VALUES ($1, $2, now() + make_interval(secs => $3::double precision / 1000), 1) \
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, \
                 lease_until = EXCLUDED.lease_until, \
                 fence = roles.fence + (CASE WHEN roles.holder = EXCLUDED.holder THEN 0 ELSE 1 END) \
             WHERE roles.holder = EXCLUDED.holder OR roles.lease_until < now() \
             RETURNING fence",
        )
        .bind(name)
        .bind(&self.me)
        .bind(self.lease_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(fence)
    }

    /// A graceful stop: this daemon's roles are released at once, so another daemon need not wait
    /// for the lease to run out. Its jobs are left to their leases (in-flight work finished or
    /// was put back by the worker before this).
    pub async fn stop(&self) -> Result<(), QueueError> {
        // Expired rather than deleted: the next holder's fence must still be a new one.
        sqlx::query("UPDATE roles SET lease_until = '-infinity' WHERE holder = $1")
            .bind(&self.me)
            .execute(&self.pool)
            .await?;
        sqlx::query("UPDATE daemons SET stopped_at = now() WHERE id = $1")
            .bind(&self.me)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Queues one file version in `tx` (which holds the history lock shared): its new job's id, or
/// None when the version is a job already or a pruned or forgotten one's fingerprint.
async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    j: &NewJob,
    now: i64,
) -> Result<Option<i64>, QueueError> {
    use std::os::unix::ffi::OsStrExt;
    // A pruned job's version is known by its fingerprint alone.
    let print = fingerprint::version(j.path.as_os_str().as_bytes(), j.size, j.mtime_ns);
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO jobs (path, root, size, mtime_ns, dev, ino, state, next_attempt_at, \
         created_at, updated_at) SELECT $1, $2, $3, $4, $5, $6, 'pending', $7, $7, $7 \
         WHERE NOT EXISTS (SELECT 1 FROM known_versions WHERE h = $8) \
         ON CONFLICT (path, size, mtime_ns) DO NOTHING RETURNING id",
    )
    .bind(encode_path(&j.path).as_ref())
    .bind(encode_path(&j.root).as_ref())
    .bind(j.size as i64)
    .bind(j.mtime_ns)
    .bind(j.dev as i64)
    .bind(j.ino as i64)
    .bind(now)
    .bind(print)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(id) = id {
        sqlx::query("INSERT INTO job_events (job_id, at, event) VALUES ($1, $2, 'queued')")
            .bind(id)
            .bind(now)
            .execute(&mut **tx)
            .await?;
    }
    Ok(id)
}

/// The channel on which a transaction that makes work due (a job queued, put back or retried)
/// tells every daemon of the cluster, at its commit: no wake file reaches across hosts, and
/// without it the other daemons learned of a burst only at their reaper's next look.
pub const WORK_CHANNEL: &str = "callferry_work";

/// Tells every listening daemon, when `tx` commits, that work is due.
pub(super) async fn work_for_all(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
) -> Result<(), QueueError> {
    // One notification per transaction, whatever it queued: PostgreSQL folds identical ones.
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(WORK_CHANNEL)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Takes the history lock shared for `tx`: queueing never interleaves with a prune batch or a
/// forget (see `history.rs`); enqueues share it among themselves.
async fn share_history(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> Result<(), QueueError> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(history::HISTORY_LOCK)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn held_from_row(r: &PgRow) -> Result<Held, QueueError> {
    let mut job = super::job_from_row(r)?;
    // `holder` is the run's id (`<name>/<uuid>`): people know the daemon by its name.
    job.held_by = r
        .try_get::<Option<String>, _>("holder")?
        .map(|h| h.split('/').next().unwrap_or(&h).to_string());
    Ok(Held {
        job,
        fence: r.try_get("fence")?,
    })
}
