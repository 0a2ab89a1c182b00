//! The queue in PostgreSQL, for several daemons on one shared spool (issue 15): the claims, leases
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

use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};

use super::machine::{Transition, sql_in};
use super::{Counts, Enqueued, Job, NewJob, QueueError, State, encode_path};

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const JOB_COLUMNS: &str = "id, path, root, size, mtime_ns, dev, ino, state, attempts, \
    next_attempt_at, interaction_id, upload_status, last_error, created_at, updated_at, \
    uploaded_at, follow_at, follow_attempts, service_status, results_written, orphans, \
    external_id, source, fence";

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
        Ok(PgQueue { me, ..q })
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
        for j in jobs {
            let id: Option<i64> = sqlx::query_scalar(
                "INSERT INTO jobs (path, root, size, mtime_ns, dev, ino, state, next_attempt_at, \
                 created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7, $7) \
                 ON CONFLICT (path, size, mtime_ns) DO NOTHING RETURNING id",
            )
            .bind(encode_path(&j.path).as_ref())
            .bind(encode_path(&j.root).as_ref())
            .bind(j.size as i64)
            .bind(j.mtime_ns)
            .bind(j.dev as i64)
            .bind(j.ino as i64)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            out.push(match id {
                Some(id) => {
                    sqlx::query(
                        "INSERT INTO job_events (job_id, at, event) VALUES ($1, $2, 'queued')",
                    )
                    .bind(id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    Enqueued::New {
                        id,
                        supersedes: None,
                    }
                }
                None => Enqueued::Known,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Takes the next due job ([`Transition::Claim`]) for this daemon, under a lease. Daemons
    /// claiming at the same instant skip each other's locked rows instead of waiting on them.
    pub async fn claim(&self, now: i64) -> Result<Option<Held>, QueueError> {
        self.claim_except(now, &[]).await
    }

    /// [`PgQueue::claim`], skipping jobs under the watched folders `roots` (as stored): those of
    /// an account whose token was rejected.
    pub async fn claim_except(
        &self,
        now: i64,
        roots: &[String],
    ) -> Result<Option<Held>, QueueError> {
        let sql = format!(
            "UPDATE jobs SET state = {to}, holder = $2, fence = fence + 1, updated_at = $1, \
             lease_until = now() + make_interval(secs => $3::double precision / 1000) \
             WHERE id = (SELECT id FROM jobs WHERE {due} AND next_attempt_at <= $1 \
                         AND NOT (root = ANY($4)) \
                         ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING {JOB_COLUMNS}",
            to = Transition::Claim.sql_target(),
            due = Transition::Claim.sql_guard(),
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(&self.me)
            .bind(self.lease_ms())
            .bind(roots)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(held_from_row).transpose()
    }

    /// Renews the lease on every job this daemon holds and records its heartbeat; returns how
    /// many jobs it holds. Call it well within the lease (a third of it).
    pub async fn heartbeat(&self) -> Result<u64, QueueError> {
        let mut tx = self.pool.begin().await?;
        let held = sqlx::query(
            "UPDATE jobs SET lease_until = now() + make_interval(secs => $2::double precision / 1000) \
             WHERE holder = $1 AND state IN ('declaring', 'uploading')",
        )
        .bind(&self.me)
        .bind(self.lease_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE daemons SET heartbeat_at = now() WHERE id = $1")
            .bind(&self.me)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(held)
    }

    /// Takes over the jobs whose holder's lease ran out (it died, was cut off, or is paused):
    /// they go back to wait and any daemon claims them ([`Transition::PutBack`]). The fence is
    /// raised here already, so the old holder's late commit is refused even before another
    /// daemon claims the job. A lost declare's possible orphan is counted, on the job and in the
    /// database's total, as a restart's recovery counts it; each job gets a `taken-over` event.
    pub async fn reap_expired(&self, now: i64) -> Result<u64, QueueError> {
        const WHY: &str = "taken over: its daemon stopped renewing its claim";
        let declaring = Transition::PutBack
            .target(State::Declaring)
            .map(State::as_str);
        let sql = format!(
            "WITH expired AS (SELECT id FROM jobs WHERE state IN ('declaring', 'uploading') \
                              AND lease_until < now() FOR UPDATE SKIP LOCKED) \
             UPDATE jobs SET state = {to}, holder = NULL, lease_until = NULL, updated_at = $1, \
                 fence = fence + 1, \
                 orphans = orphans + (CASE WHEN state = 'declaring' THEN 1 ELSE 0 END), \
                 last_error = $2 \
             FROM expired WHERE jobs.id = expired.id RETURNING jobs.id, jobs.state",
            to = Transition::PutBack.sql_target(),
        );
        let mut tx = self.pool.begin().await?;
        let reaped: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(now)
            .bind(WHY)
            .fetch_all(&mut *tx)
            .await?;
        if reaped.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let orphans = reaped
            .iter()
            .filter(|(_, s)| Some(s.as_str()) == declaring)
            .count() as i64;
        if orphans > 0 {
            sqlx::query("UPDATE counters SET n = n + $1 WHERE name = 'orphan_declares'")
                .bind(orphans)
                .execute(&mut *tx)
                .await?;
        }
        let ids: Vec<i64> = reaped.iter().map(|(id, _)| *id).collect();
        sqlx::query(
            "INSERT INTO job_events (job_id, at, event, detail) \
             SELECT id, $2, 'taken-over', $3 FROM unnest($1::bigint[]) AS id",
        )
        .bind(&ids)
        .bind(now)
        .bind(WHY)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(reaped.len() as u64)
    }

    /// Commits the interaction id before the upload starts ([`Transition::Declared`]), only
    /// under this daemon's claim.
    pub async fn mark_declared(
        &self,
        held: &Held,
        interaction_id: &str,
        external_id: Option<&str>,
        now: i64,
    ) -> Result<(), QueueError> {
        self.mark_declared_from(held, interaction_id, external_id, None, now)
            .await
    }

    /// [`PgQueue::mark_declared`], also recording the source the declare was made for.
    pub async fn mark_declared_from(
        &self,
        held: &Held,
        interaction_id: &str,
        external_id: Option<&str>,
        source: Option<&str>,
        now: i64,
    ) -> Result<(), QueueError> {
        let set = "interaction_id = $3, external_id = COALESCE($4, external_id), \
                   source = COALESCE($6, source), last_error = NULL, updated_at = $5";
        let event = Some(("declared", None));
        self.fenced(held, Transition::Declared, set, event, now, |q| {
            q.bind(interaction_id)
                .bind(external_id)
                .bind(now)
                .bind(source)
        })
        .await
    }

    /// The service has the audio, 201 or 409 ([`Transition::Uploaded`]): the claim ends.
    pub async fn mark_uploaded(
        &self,
        held: &Held,
        status: u16,
        now: i64,
    ) -> Result<(), QueueError> {
        self.mark_uploaded_follow(held, status, None, now).await
    }

    /// [`PgQueue::mark_uploaded`]; `follow_at`: when to first ask for the results, if followed.
    pub async fn mark_uploaded_follow(
        &self,
        held: &Held,
        status: u16,
        follow_at: Option<i64>,
        now: i64,
    ) -> Result<(), QueueError> {
        let set = "upload_status = $3, uploaded_at = $4, updated_at = $4, last_error = NULL, \
                   follow_at = $5, follow_attempts = 0, holder = NULL, lease_until = NULL";
        let event = Some(("uploaded", None));
        self.fenced(held, Transition::Uploaded, set, event, now, |q| {
            q.bind(i64::from(status)).bind(now).bind(follow_at)
        })
        .await
    }

    /// Back to wait until `at` ([`Transition::PutBack`]), one attempt counted: the claim ends.
    pub async fn reschedule(
        &self,
        held: &Held,
        at: i64,
        error: &str,
        now: i64,
    ) -> Result<(), QueueError> {
        self.put_back(held, Some(error), at, true, now).await
    }

    /// Back to wait until `at` ([`Transition::PutBack`]), counting an attempt only when the
    /// failure was the job's own; `error` (if any) becomes its last error and a `retry` event.
    pub async fn put_back(
        &self,
        held: &Held,
        error: Option<&str>,
        at: i64,
        count_attempt: bool,
        now: i64,
    ) -> Result<(), QueueError> {
        let set = "attempts = attempts + $3, next_attempt_at = $4, \
                   last_error = COALESCE($5, last_error), updated_at = $6, holder = NULL, \
                   lease_until = NULL";
        let event = error.map(|e| ("retry", Some(e)));
        self.fenced(held, Transition::PutBack, set, event, now, |q| {
            q.bind(i64::from(count_attempt))
                .bind(at)
                .bind(error)
                .bind(now)
        })
        .await
    }

    /// Needs an operator ([`Transition::Fail`]): the claim ends.
    pub async fn fail(&self, held: &Held, error: &str, now: i64) -> Result<(), QueueError> {
        let set = "last_error = $3, updated_at = $4, attempts = attempts + 1, holder = NULL, \
                   lease_until = NULL";
        let event = Some(("failed", Some(error)));
        self.fenced(held, Transition::Fail, set, event, now, |q| {
            q.bind(error).bind(now)
        })
        .await
    }

    /// A declare under this claim went out and its answer was lost: the service may hold an
    /// interaction that never gets audio. Counted on the job and in the total, as SQLite does;
    /// returns the job's count. Only under this claim, like every outcome.
    pub async fn count_orphan(
        &self,
        held: &Held,
        detail: &str,
        now: i64,
    ) -> Result<u32, QueueError> {
        let mut tx = self.pool.begin().await?;
        let n: Option<i64> = sqlx::query_scalar(
            "UPDATE jobs SET orphans = orphans + 1, updated_at = $3 \
             WHERE id = $1 AND fence = $2 AND state = 'declaring' RETURNING orphans",
        )
        .bind(held.job.id)
        .bind(held.fence)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(n) = n else {
            tx.rollback().await?;
            return Err(self.why_not(held, &[State::Declaring]).await);
        };
        sqlx::query("UPDATE counters SET n = n + 1 WHERE name = 'orphan_declares'")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO job_events (job_id, at, event, detail) VALUES ($1, $2, 'declare-lost', $3)",
        )
        .bind(held.job.id)
        .bind(now)
        .bind(detail)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(n.max(0) as u32)
    }

    /// Runs a transition guarded by the claim's fence, with its event (if any) in the same
    /// transaction; a guard that fails says whether the claim was lost or the state was wrong.
    async fn fenced<'q>(
        &self,
        held: &Held,
        t: Transition,
        set: &str,
        event: Option<(&str, Option<&str>)>,
        now: i64,
        bind: impl FnOnce(PgQuery<'q>) -> PgQuery<'q>,
    ) -> Result<(), QueueError> {
        // $1 and $2 are the job and the fence; `set` and `bind` go on from $3.
        let sql = format!(
            "UPDATE jobs SET state = {to}, {set} WHERE id = $1 AND fence = $2 AND {from}",
            to = t.sql_target(),
            from = t.sql_guard(),
        );
        let q = bind(
            sqlx::query(AssertSqlSafe(sql))
                .bind(held.job.id)
                .bind(held.fence),
        );
        let mut tx = self.pool.begin().await?;
        if q.execute(&mut *tx).await?.rows_affected() == 1 {
            if let Some((event, detail)) = event {
                sqlx::query(
                    "INSERT INTO job_events (job_id, at, event, detail) VALUES ($1, $2, $3, $4)",
                )
                .bind(held.job.id)
                .bind(now)
                .bind(event)
                .bind(detail)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            return Ok(());
        }
        tx.rollback().await?;
        // A commit whose answer was lost (the connection dropped after it went in) is tried
        // again by the caller: finding the row already where this transition takes it, under
        // the same fence, is success, not a lost race.
        let done = match t {
            Transition::Declared => Some(State::Uploading),
            Transition::Uploaded => Some(State::Uploaded),
            _ => None,
        };
        match self.why_not(held, &t.from_states()).await {
            QueueError::NotInState { found, .. } if found.is_some() && found == done => Ok(()),
            e => Err(e),
        }
    }

    /// Why a fenced statement changed nothing: another daemon's claim (the fence moved on), or
    /// the job is not in a state it leaves.
    async fn why_not(&self, held: &Held, expected: &[State]) -> QueueError {
        let row: Result<Option<(String, i64)>, _> =
            sqlx::query_as("SELECT state, fence FROM jobs WHERE id = $1")
                .bind(held.job.id)
                .fetch_optional(&self.pool)
                .await;
        match row {
            Err(e) => e.into(),
            Ok(Some((_, fence))) if fence != held.fence => {
                QueueError::LostClaim { job: held.job.id }
            }
            Ok(found) => QueueError::NotInState {
                job: held.job.id,
                expected: expected.to_vec(),
                found: found.and_then(|(s, _)| s.parse::<State>().ok()),
            },
        }
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

    pub async fn get(&self, id: i64) -> Result<Option<Job>, QueueError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(held_from_row).transpose()?.map(|h| h.job))
    }

    /// When the next job falls due, if any job waits at all.
    pub async fn next_due(&self) -> Result<Option<i64>, QueueError> {
        let sql = format!(
            "SELECT MIN(next_attempt_at) FROM jobs WHERE {}",
            Transition::Claim.sql_guard()
        );
        Ok(sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?)
    }

    /// Jobs, newest first, optionally of one user-facing state.
    pub async fn list(&self, state: Option<State>, limit: u32) -> Result<Vec<Job>, QueueError> {
        let filter = match state {
            Some(s) => format!("WHERE state IN {}", sql_in(&s.internal_states())),
            None => String::new(),
        };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs {filter} ORDER BY id DESC LIMIT $1"
        )))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| held_from_row(r).map(|h| h.job))
            .collect()
    }

    /// Jobs per user-facing state. Counted, not kept by triggers as in SQLite: a counter row that
    /// every transition updates would serialise the daemons on that row.
    pub async fn counts(&self) -> Result<Counts, QueueError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        let mut c = Counts::default();
        for (state, n) in rows {
            c.add(&state, n);
        }
        Ok(c)
    }

    /// Every daemon that has a heartbeat within `recent` (or holds a job), newest first: the
    /// cluster as `status` shows it.
    pub async fn members(&self, recent: Duration) -> Result<Vec<Member>, QueueError> {
        let rows: Vec<(String, String, String, i64, f64, bool, i64)> = sqlx::query_as(
            "SELECT d.id, d.name, d.host, d.pid, \
                    EXTRACT(EPOCH FROM now() - d.heartbeat_at)::float8, d.stopped_at IS NOT NULL, \
                    (SELECT COUNT(*) FROM jobs j WHERE j.holder = d.id \
                       AND j.state IN ('declaring', 'uploading')) \
             FROM daemons d \
             WHERE d.heartbeat_at > now() - make_interval(secs => $1::double precision / 1000) \
                OR EXISTS (SELECT 1 FROM jobs j WHERE j.holder = d.id) \
             ORDER BY d.started_at DESC",
        )
        .bind(recent.as_millis().min(i64::MAX as u128) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, name, host, pid, age, stopped, held)| Member {
                id,
                name,
                host,
                pid: pid as u32,
                heartbeat_age_s: age.max(0.0),
                stopped,
                held: held.max(0) as u64,
            })
            .collect())
    }

    /// The daemon that holds a job, if any (for `status`, and for tests).
    pub async fn holder(&self, id: i64) -> Result<Option<String>, QueueError> {
        Ok(sqlx::query_scalar("SELECT holder FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .flatten())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn held_from_row(r: &PgRow) -> Result<Held, QueueError> {
    Ok(Held {
        job: super::job_from_row(r)?,
        fence: r.try_get("fence")?,
    })
}
