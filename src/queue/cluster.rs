//! The PostgreSQL queue as the daemon and the commands use it: [`PgQueue`]'s claims, fences and
//! leases behind the same calls as the SQLite queue, so the workers, the watcher and `status`
//! do not know which one they talk to ([`Queue`](super::Queue) picks).
//!
//! The one thing the SQLite calls lack is the fence a claim got: a worker names its job by id.
//! So this keeps the claims it handed out (job id to [`Held`]) until their claim ends (uploaded,
//! put back, failed) or is found lost; an outcome for a job not in that map is a claim this daemon
//! does not hold ([`QueueError::LostClaim`]), never a write without a fence.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use sqlx::{AssertSqlSafe, Row};

use super::machine::{NOT_UPLOADED, Transition, sql_in};
use super::pg::{Held, PgQueue};
use super::roles::{Role, Roles};
use super::{Counts, JOB_COLUMNS, Job, QueueError, State, display_path, job_from_row};

pub(crate) struct Cluster {
    pg: PgQueue,
    claims: Mutex<HashMap<i64, Held>>,
    roles: Roles,
}

impl std::ops::Deref for Cluster {
    type Target = PgQueue;
    fn deref(&self) -> &PgQueue {
        &self.pg
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.pg.fmt(f)
    }
}

impl Cluster {
    pub(crate) fn new(pg: PgQueue) -> Cluster {
        Cluster {
            roles: Roles::new(pg.lease()),
            pg,
            claims: Mutex::default(),
        }
    }

    /// Whether this daemon does `role`'s work now (see [`Roles`]).
    pub(crate) fn holds(&self, role: Role) -> bool {
        self.roles.holds(role, Instant::now())
    }

    pub(crate) fn roles_changed(&self) -> &tokio::sync::Notify {
        &self.roles.changed
    }

    /// Takes or renews each of `wanted` that no other daemon holds under a live lease; returns
    /// the roles this daemon gained (`true`) or lost to another (`false`) by it. Call it well
    /// within the lease, as the heartbeat.
    pub(crate) async fn renew_roles(
        &self,
        wanted: &[Role],
    ) -> Result<Vec<(Role, bool)>, QueueError> {
        let mut changes = Vec::new();
        for &role in wanted {
            // Counted from before the statement: the lease in the database runs from a moment
            // after this one, so this daemon never believes it holds a role longer than it does.
            let sent = Instant::now();
            let held = self.pg.take_role(role.name()).await?.is_some();
            if self.roles.renewed(role, sent, held) {
                changes.push((role, held));
            }
        }
        if !changes.is_empty() {
            self.roles.changed.notify_waiters();
        }
        Ok(changes)
    }

    /// A graceful stop: this daemon's roles go to the others at once (see [`PgQueue::stop`]).
    pub(crate) async fn stop(&self) -> Result<(), QueueError> {
        self.roles.release_all();
        self.pg.stop().await
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Held>> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self, id: i64) -> Result<Held, QueueError> {
        self.claims()
            .get(&id)
            .cloned()
            .ok_or(QueueError::LostClaim { job: id })
    }

    /// After an outcome under a claim: the claim is forgotten once it ended (`ends`) or turned
    /// out lost or wrong. A transient error keeps it: the worker writes the outcome again.
    fn settle<T>(&self, id: i64, r: Result<T, QueueError>, ends: bool) -> Result<T, QueueError> {
        match &r {
            Ok(_) if ends => {
                self.claims().remove(&id);
            }
            Err(e) if !e.is_transient() => {
                self.claims().remove(&id);
            }
            _ => {}
        }
        r
    }

    /// How many claims this daemon holds now (for tests and `status`).
    pub(crate) fn claims_held(&self) -> usize {
        self.claims().len()
    }

    pub async fn claim(&self, now: i64) -> Result<Option<Job>, QueueError> {
        self.claim_except(now, &[]).await
    }

    pub async fn claim_except(
        &self,
        now: i64,
        roots: &[String],
    ) -> Result<Option<Job>, QueueError> {
        // At most twice: a job handed back (below) is not due again for a second, so the second
        // try finds another one or none.
        for _ in 0..2 {
            let Some(held) = self.pg.claim_except(now, roots).await? else {
                return Ok(None);
            };
            let id = held.job.id;
            let fresh = {
                let mut claims = self.claims();
                let fresh = !claims.contains_key(&id);
                if fresh {
                    claims.insert(id, held.clone());
                }
                fresh
            };
            if !fresh {
                // One of this daemon's workers still works on an older claim of this job, which
                // was taken over (this daemon could not renew it in time) and came back to us. Its
                // outcomes are refused by the old fence, but workers name a job by id only, so the
                // two claims must not overlap here: the new one is handed back, and the job goes
                // to whichever daemon claims it after the old worker let go.
                let r = (self.pg)
                    .put_back(&held, None, now + 1000, false, now)
                    .await;
                if let Err(e) = r {
                    tracing::warn!(job = id, error = %e, "cannot hand back a job this daemon still works on; it is taken over after the lease");
                }
                continue;
            }
            return Ok(Some(held.job));
        }
        Ok(None)
    }

    pub async fn mark_declared_from(
        &self,
        id: i64,
        interaction_id: &str,
        external_id: Option<&str>,
        source: Option<&str>,
        now: i64,
    ) -> Result<(), QueueError> {
        let held = self.held(id)?;
        let r = (self.pg)
            .mark_declared_from(&held, interaction_id, external_id, source, now)
            .await;
        self.settle(id, r, false)
    }

    pub async fn mark_uploaded(
        &self,
        id: i64,
        status: u16,
        follow_at: Option<i64>,
        now: i64,
    ) -> Result<(), QueueError> {
        let held = self.held(id)?;
        let r = (self.pg)
            .mark_uploaded_follow(&held, status, follow_at, now)
            .await;
        self.settle(id, r, true)
    }

    pub async fn reschedule(
        &self,
        job: &Job,
        error: Option<&str>,
        next_at: i64,
        count_attempt: bool,
        now: i64,
    ) -> Result<(), QueueError> {
        let held = self.held(job.id)?;
        let r = (self.pg)
            .put_back(&held, error, next_at, count_attempt, now)
            .await;
        self.settle(job.id, r, true)
    }

    pub async fn count_orphan(&self, id: i64, detail: &str, now: i64) -> Result<u32, QueueError> {
        let held = self.held(id)?;
        let r = self.pg.count_orphan(&held, detail, now).await;
        self.settle(id, r, false)
    }

    pub async fn fail(&self, job: &Job, error: &str, now: i64) -> Result<(), QueueError> {
        let held = self.held(job.id)?;
        let r = self.pg.fail(&held, error, now).await;
        self.settle(job.id, r, true)
    }

    /// Nothing to do at start: this run has a new id, so the jobs a dead run of this daemon held
    /// are taken over like any dead daemon's, by whichever daemon's reaper sees their lease
    /// expire ([`PgQueue::reap_expired`]).
    pub async fn recover(&self, _now: i64) -> Result<(u64, u64), QueueError> {
        Ok((0, 0))
    }

    /// `callferry retry`, as in SQLite: no interaction id, declared again; the service has the
    /// audio, followed again; otherwise uploaded again on the same id.
    pub async fn retry(&self, ids: Option<&[i64]>, now: i64) -> Result<u64, QueueError> {
        let [(_, no_id), (_, has_audio), (_, on_same_id)] = *Transition::Retry.edges() else {
            unreachable!("Retry has three edges")
        };
        let sql = format!(
            "UPDATE jobs SET state = CASE WHEN interaction_id IS NULL THEN '{no_id}' \
             WHEN upload_status IS NOT NULL THEN '{has_audio}' ELSE '{on_same_id}' END, \
             follow_at = CASE WHEN interaction_id IS NOT NULL AND upload_status IS NOT NULL \
             THEN $1 ELSE NULL END, follow_attempts = 0, orphans = 0, attempts = 0, \
             next_attempt_at = $1, created_at = $1, updated_at = $1 WHERE {} \
             AND ($2::bigint[] IS NULL OR id = ANY($2)) RETURNING id",
            Transition::Retry.sql_guard()
        );
        let mut tx = self.pg.pool.begin().await?;
        let done: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(now)
            .bind(ids)
            .fetch_all(&mut *tx)
            .await?;
        if ids.is_some() && !done.is_empty() {
            sqlx::query(
                "INSERT INTO job_events (job_id, at, event) \
                 SELECT id, $2, 'retry-requested' FROM unnest($1::bigint[]) AS id",
            )
            .bind(&done)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if !done.is_empty() {
            super::pg::work_for_all(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(done.len() as u64)
    }

    pub async fn mark_disposed(&self, id: i64, what: &str, now: i64) -> Result<(), QueueError> {
        let mut tx = self.pg.pool.begin().await?;
        let n = sqlx::query("UPDATE jobs SET disposed = 1, updated_at = $2 WHERE id = $1")
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n != 1 {
            return Err(QueueError::NotInState {
                job: id,
                expected: super::machine::DONE.to_vec(),
                found: None,
            });
        }
        sqlx::query(
            "INSERT INTO job_events (job_id, at, event, detail) VALUES ($1, $2, 'after-upload', $3)",
        )
        .bind(id)
        .bind(now)
        .bind(what)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn next_due_except(&self, roots: &[String]) -> Result<Option<i64>, QueueError> {
        let sql = format!(
            "SELECT MIN(next_attempt_at) FROM jobs WHERE {} AND NOT (root = ANY($1))",
            Transition::Claim.sql_guard()
        );
        Ok(sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(roots)
            .fetch_one(&self.pg.pool)
            .await?)
    }

    pub async fn counts_by_root(&self) -> Result<Vec<(String, Counts)>, QueueError> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT root, state, COUNT(*) FROM jobs GROUP BY root, state")
                .fetch_all(&self.pg.pool)
                .await?;
        let mut out: Vec<(String, Counts)> = Vec::new();
        for (root, state, n) in rows {
            let at = match out.iter().position(|(x, _)| *x == root) {
                Some(i) => i,
                None => {
                    out.push((root, Counts::default()));
                    out.len() - 1
                }
            };
            out[at].1.add(&state, n);
        }
        Ok(out)
    }

    pub async fn oldest_waiting(&self) -> Result<Option<i64>, QueueError> {
        let sql = format!(
            "SELECT MIN(created_at) FROM jobs WHERE state IN {}",
            sql_in(&NOT_UPLOADED)
        );
        Ok(sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pg.pool)
            .await?)
    }

    pub async fn last_errors(&self, n: u32) -> Result<Vec<(i64, String, String, i64)>, QueueError> {
        let rows: Vec<(i64, String, Option<String>, i64)> = sqlx::query_as(
            "SELECT e.job_id, j.path, e.detail, e.at FROM job_events e JOIN jobs j ON j.id = e.job_id \
             WHERE e.event IN ('retry', 'failed') ORDER BY e.id DESC LIMIT $1",
        )
        .bind(i64::from(n))
        .fetch_all(&self.pg.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, path, detail, at)| (id, display_path(&path), detail.unwrap_or_default(), at))
            .collect())
    }

    pub async fn undisposed(&self, states: &[State]) -> Result<Vec<Job>, QueueError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN {} AND disposed = 0",
            sql_in(states)
        )))
        .fetch_all(&self.pg.pool)
        .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    pub async fn orphan_declares(&self) -> Result<u64, QueueError> {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT n FROM counters WHERE name = 'orphan_declares'")
                .fetch_optional(&self.pg.pool)
                .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    pub async fn events(&self, id: i64) -> Result<Vec<(i64, String, Option<String>)>, QueueError> {
        Ok(
            sqlx::query_as(
                "SELECT at, event, detail FROM job_events WHERE job_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&self.pg.pool)
            .await?,
        )
    }

    pub async fn uploaded_since(&self, since: i64) -> Result<(u64, u64), QueueError> {
        let (n, bytes): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(j.size), 0)::bigint FROM job_events e \
             JOIN jobs j ON j.id = e.job_id WHERE e.event = 'uploaded' AND e.at >= $1",
        )
        .bind(since)
        .fetch_one(&self.pg.pool)
        .await?;
        Ok((n.max(0) as u64, bytes.max(0) as u64))
    }

    /// A daemon's own state for `status` (a pause, the accounts paused, folders not answering),
    /// kept under the key and this run's id: each daemon of the cluster has its own, so one
    /// daemon's stop or recovery never clears another's pause.
    pub async fn set_daemon_state(
        &self,
        key: &str,
        value: Option<&str>,
        now: i64,
    ) -> Result<(), QueueError> {
        let key = format!("{key}@{}", self.pg.instance());
        match value {
            Some(v) => {
                sqlx::query(
                    "INSERT INTO daemon_state (key, value, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
                     updated_at = excluded.updated_at",
                )
                .bind(key)
                .bind(v)
                .bind(now)
                .execute(&self.pg.pool)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM daemon_state WHERE key = $1")
                    .bind(key)
                    .execute(&self.pg.pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// The newest value any live daemon of the cluster keeps under `key` (one that stopped, or
    /// has not been heard from within its lease, says nothing about now).
    pub async fn daemon_state(&self, key: &str) -> Result<Option<(String, i64)>, QueueError> {
        let row = sqlx::query(
            "SELECT s.value, s.updated_at FROM daemon_state s JOIN daemons d \
             ON s.key = $1 || '@' || d.id \
             WHERE d.stopped_at IS NULL \
               AND d.heartbeat_at > now() - make_interval(secs => $2::double precision / 1000) \
             ORDER BY s.updated_at DESC LIMIT 1",
        )
        .bind(key)
        .bind(self.pg.lease().as_millis().min(i64::MAX as u128) as i64)
        .fetch_optional(&self.pg.pool)
        .await?;
        Ok(match row {
            Some(r) => Some((r.try_get("value")?, r.try_get("updated_at")?)),
            None => None,
        })
    }

    /// A PostgreSQL commit is durable when it returns (`synchronous_commit`, the server's
    /// default): nothing more to flush.
    pub async fn make_durable(&self) -> Result<(), QueueError> {
        Ok(())
    }

    pub async fn sync_wal(&self) -> Result<(), QueueError> {
        Ok(())
    }

    pub async fn prepare_wal(&self, _bytes: u64) -> Result<(), QueueError> {
        Ok(())
    }
}
