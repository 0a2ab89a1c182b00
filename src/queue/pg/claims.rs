//! A job's life under a claim on the shared queue: the claim itself (`FOR UPDATE SKIP LOCKED`,
//! under a lease, raising the fence), the heartbeat that renews every lease this daemon holds,
//! the takeover of jobs whose lease ran out, and every outcome committed only under the claim's
//! fence (see the module above for why).

use sqlx::AssertSqlSafe;

use super::{Held, JOB_COLUMNS, PgQuery, PgQueue, held_from_row};
use crate::queue::machine::Transition;
use crate::queue::{QueueError, State};

impl PgQueue {
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
             RETURNING {JOB_COLUMNS}, hook",
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
        let Some(row) = row else { return Ok(None) };
        // The hook's call comes with the claim: what was attached before it is in the declare.
        let mut held = held_from_row(&row)?;
        held.job.hook = sqlx::Row::try_get(&row, "hook")?;
        Ok(Some(held))
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
        super::work_for_all(&mut tx).await?;
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
}
