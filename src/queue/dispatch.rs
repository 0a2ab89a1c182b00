//! [`Queue`]: the one queue type callers see, on either backend. `queue.database` picks it: a file
//! path is the SQLite queue (one host; every call documented on its implementation, in the files
//! beside this one), a `postgres://` URL the PostgreSQL queue shared by several daemons
//! (`cluster.rs` over `pg.rs`).
//!
//! Each call is a `match` on the backend. What PostgreSQL does not do yet answers
//! [`QueueError::Unsupported`], naming what, never a panic; the configuration refuses what it can
//! up front (`[results] enabled` with PostgreSQL).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::cluster::Cluster;
use super::pg::PgQueue;
use super::roles::Role;
use super::{
    Counts, Enqueued, Fault, Forgot, Hooked, Job, Lite, NewJob, OpenMode, QueueError, State,
    Tombstone,
};

#[derive(Clone, Debug)]
pub struct Queue(Backend);

#[derive(Clone, Debug)]
enum Backend {
    Lite(Lite),
    Pg(Arc<Cluster>),
}

/// Calls both backends answer, with the same arguments.
macro_rules! both {
    ($( $name:ident ( $($a:ident : $t:ty),* ) -> $r:ty; )*) => {$(
        pub async fn $name(&self, $($a: $t),*) -> Result<$r, QueueError> {
            match &self.0 {
                Backend::Lite(q) => q.$name($($a),*).await,
                Backend::Pg(q) => q.$name($($a),*).await,
            }
        }
    )*};
}

/// Calls only the SQLite queue answers yet; PostgreSQL says so, naming `$what`.
macro_rules! sqlite_only {
    ($( $what:literal: $name:ident ( $($a:ident : $t:ty),* ) -> $r:ty; )*) => {$(
        pub async fn $name(&self, $($a: $t),*) -> Result<$r, QueueError> {
            match &self.0 {
                Backend::Lite(q) => q.$name($($a),*).await,
                Backend::Pg(_) => Err(QueueError::Unsupported($what)),
            }
        }
    )*};
}

impl Queue {
    /// The SQLite queue at `path`.
    pub async fn open(path: &Path, mode: OpenMode) -> Result<Queue, QueueError> {
        Ok(Queue(Backend::Lite(Lite::open(path, mode).await?)))
    }

    /// The PostgreSQL queue at `url`, joined as a daemon named `name` on `host` whose claims last
    /// `lease` unless renewed (see [`PgQueue::connect`]).
    pub async fn connect_pg(
        url: &str,
        name: &str,
        host: &str,
        lease: Duration,
    ) -> Result<Queue, QueueError> {
        let pg = PgQueue::connect(url, name, host, lease).await?;
        Ok(Queue(Backend::Pg(Arc::new(Cluster::new(pg)))))
    }

    /// The PostgreSQL queue at `url` for a command: it claims nothing and does not join as a
    /// daemon (see [`PgQueue::attach`]).
    pub async fn attach_pg(url: &str, lease: Duration) -> Result<Queue, QueueError> {
        let pg = PgQueue::attach(url, lease).await?;
        Ok(Queue(Backend::Pg(Arc::new(Cluster::new(pg)))))
    }

    /// The PostgreSQL queue's own calls (heartbeat, takeover, roles, the cluster's members);
    /// None on SQLite.
    pub fn cluster(&self) -> Option<&PgQueue> {
        match &self.0 {
            Backend::Lite(_) => None,
            Backend::Pg(q) => Some(q),
        }
    }

    /// Whether this daemon does `role`'s work now. Always on SQLite (one daemon per queue); on
    /// PostgreSQL while this daemon holds the role's lease ([`Queue::renew_roles`]).
    pub fn holds(&self, role: Role) -> bool {
        match &self.0 {
            Backend::Lite(_) => true,
            Backend::Pg(q) => q.holds(role),
        }
    }

    /// PostgreSQL: takes or renews the roles of `wanted` no other daemon holds; returns the ones
    /// gained (`true`) or lost (`false`). Nothing to do on SQLite.
    pub async fn renew_roles(&self, wanted: &[Role]) -> Result<Vec<(Role, bool)>, QueueError> {
        match &self.0 {
            Backend::Lite(_) => Ok(Vec::new()),
            Backend::Pg(q) => q.renew_roles(wanted).await,
        }
    }

    /// Waits until this daemon gains or lets go of a role (never, on SQLite).
    pub async fn role_changed(&self) {
        match &self.0 {
            Backend::Lite(_) => std::future::pending().await,
            Backend::Pg(q) => q.roles_changed().notified().await,
        }
    }

    /// PostgreSQL: leaves the cluster gracefully, handing this daemon's roles to the others at
    /// once (a dead daemon's go when their leases run out). Nothing to do on SQLite.
    pub async fn leave(&self) -> Result<(), QueueError> {
        match &self.0 {
            Backend::Lite(_) => Ok(()),
            Backend::Pg(q) => q.stop().await,
        }
    }

    /// Claims this daemon holds on the PostgreSQL queue now (0 on SQLite).
    pub fn claims_held(&self) -> usize {
        match &self.0 {
            Backend::Lite(_) => 0,
            Backend::Pg(q) => q.claims_held(),
        }
    }

    #[cfg(test)]
    pub(super) fn lite(&self) -> &Lite {
        match &self.0 {
            Backend::Lite(q) => q,
            Backend::Pg(_) => panic!("a SQLite queue was expected"),
        }
    }

    /// The SQLite database's path; empty for PostgreSQL (no file: nothing to lock, watch or
    /// flush on this host).
    pub fn path(&self) -> &Path {
        match &self.0 {
            Backend::Lite(q) => q.path(),
            Backend::Pg(_) => Path::new(""),
        }
    }

    /// See `Lite::wake_file`; empty for PostgreSQL, where a daemon on another host could not see
    /// it anyway (its idle workers look at the database instead).
    pub fn wake_file(&self) -> PathBuf {
        match &self.0 {
            Backend::Lite(q) => q.wake_file(),
            Backend::Pg(_) => PathBuf::new(),
        }
    }

    pub fn wake_daemon(&self) {
        if let Backend::Lite(q) = &self.0 {
            q.wake_daemon()
        }
    }

    #[doc(hidden)]
    pub fn inject_fault(&self, kind: Fault, n: u32) {
        if let Backend::Lite(q) = &self.0 {
            q.inject_fault(kind, n)
        }
    }

    pub async fn close(&self) {
        match &self.0 {
            Backend::Lite(q) => q.close().await,
            Backend::Pg(q) => q.close().await,
        }
    }

    /// Jobs, newest first, each handed to `each` as it is read.
    pub async fn list_each<E: From<QueueError>>(
        &self,
        state: Option<State>,
        limit: u32,
        each: impl FnMut(Job) -> Result<(), E>,
    ) -> Result<(), E> {
        match &self.0 {
            Backend::Lite(q) => q.list_each(state, limit, each).await,
            Backend::Pg(q) => q.list_each(state, limit, each).await,
        }
    }

    pub async fn forget_job(
        &self,
        id: i64,
        files: impl Fn(&Job, bool) -> Vec<PathBuf>,
        declaring_too: bool,
        now: i64,
    ) -> Result<Forgot, QueueError> {
        match &self.0 {
            Backend::Lite(q) => q.forget_job(id, files, declaring_too, now).await,
            Backend::Pg(q) => q.forget_job(id, files, declaring_too, now).await,
        }
    }

    /// Records the interaction id *before* the upload starts: from here on the job is never
    /// declared again ([`Transition::Declared`](super::Transition::Declared)). Returns once the
    /// record survives power loss. Idempotent for the same id and interaction id, so a caller may
    /// repeat it after a failed sync (a full disk) or a lost answer without tripping over its own
    /// earlier commit. The one implementation per backend is `mark_declared_from`.
    pub async fn mark_declared(
        &self,
        id: i64,
        interaction_id: &str,
        now: i64,
    ) -> Result<(), QueueError> {
        self.mark_declared_from(id, interaction_id, None, None, now)
            .await
    }

    /// [`Queue::mark_declared`], recording the call's id the declare carried
    /// (`externalIdentifier`) in the same statement.
    pub async fn mark_declared_as(
        &self,
        id: i64,
        interaction_id: &str,
        external_id: Option<&str>,
        now: i64,
    ) -> Result<(), QueueError> {
        self.mark_declared_from(id, interaction_id, external_id, None, now)
            .await
    }

    both! {
        enqueue(jobs: &[NewJob], now: i64) -> Vec<Enqueued>;
        claim(now: i64) -> Option<Job>;
        claim_except(now: i64, roots: &[String]) -> Option<Job>;
        mark_declared_from(
            id: i64,
            interaction_id: &str,
            external_id: Option<&str>,
            source: Option<&str>,
            now: i64
        ) -> ();
        mark_uploaded(id: i64, status: u16, follow_at: Option<i64>, now: i64) -> ();
        reschedule(
            job: &Job,
            error: Option<&str>,
            next_at: i64,
            count_attempt: bool,
            now: i64
        ) -> ();
        count_orphan(id: i64, detail: &str, now: i64) -> u32;
        fail(job: &Job, error: &str, now: i64) -> ();
        recover(now: i64) -> (u64, u64);
        retry(ids: Option<&[i64]>, now: i64) -> u64;
        mark_disposed(id: i64, what: &str, now: i64) -> ();
        next_due() -> Option<i64>;
        next_due_except(roots: &[String]) -> Option<i64>;
        get(id: i64) -> Option<Job>;
        list(state: Option<State>, limit: u32) -> Vec<Job>;
        counts() -> Counts;
        counts_by_root() -> Vec<(String, Counts)>;
        oldest_waiting() -> Option<i64>;
        last_errors(n: u32) -> Vec<(i64, String, String, i64)>;
        undisposed(states: &[State]) -> Vec<Job>;
        orphan_declares() -> u64;
        events(id: i64) -> Vec<(i64, String, Option<String>)>;
        uploaded_since(since: i64) -> (u64, u64);
        set_daemon_state(key: &str, value: Option<&str>, now: i64) -> ();
        daemon_state(key: &str) -> Option<(String, i64)>;
        known_fingerprints() -> Vec<i64>;
        hook_of(id: i64) -> Option<String>;
        make_durable() -> ();
        sync_wal() -> ();
        prepare_wal(bytes: u64) -> ();
        due_followups(now: i64, limit: u32) -> Vec<Job>;
        next_followup() -> Option<i64>;
        follow_later(
            id: i64,
            next_at: i64,
            service_status: Option<&str>,
            error: Option<&str>,
            now: i64
        ) -> ();
        result_written(job: &Job, kind: &str, now: i64) -> ();
        mark_processed(id: i64, now: i64) -> ();
        mark_processed_then(id: i64, delete_at: Option<i64>, now: i64) -> ();
        fail_following(
            id: i64,
            error: &str,
            service_status: Option<&str>,
            lost_file: bool,
            now: i64
        ) -> ();
        remote_delete_done(id: i64, outcome: Result<bool, &str>, now: i64) -> ();
        earlier_call_at_path(job: &Job) -> bool;
        prune(cutoff: i64, undisposed_too: bool) -> u64;
        enqueue_hooked(job: &NewJob, hook: &str, now: i64) -> Hooked;
        jobs_by_ids(ids: &[i64]) -> Vec<Job>;
        jobs_by_external_ids(ids: &[String]) -> Vec<Job>;
        undeclared_jobs() -> Vec<Job>;
        jobs_recorded_before(cutoff_ns: i64, after: i64, limit: u32) -> Vec<Job>;
        secure_delete() -> ();
        pending_forgets() -> Vec<Tombstone>;
        forget_local_done(ids: &[i64]) -> ();
        forget_remote(id: i64, error: Option<&str>) -> ();
        forget_finish(now: i64) -> u64;
        scrub_pending() -> bool;
        scrub(vacuum: bool, deadline: Duration) -> ();
    }

    sqlite_only! {
        "following a moved recording": follow_move(
            id: i64,
            old_path: &str,
            new_path: &str,
            new_root: &str,
            now: i64
        ) -> bool;
        "a simulated full disk": simulate_disk_full(full: bool) -> ();
    }
}
