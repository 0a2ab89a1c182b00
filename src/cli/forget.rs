//! `callferry forget (ID... | --external-id ID... | --older-than AGE | --pending)`: the right to
//! erasure. The work is `crate::forget`; this is its words on the terminal and its exit code.

use std::path::Path;

use super::{EXIT_FAILURE, EXIT_OK, ForgetArgs, out, tell};
use crate::app::AppError;
use crate::config::Config;
use crate::forget::{Report, Selector};
use crate::queue::{DaemonLock, OpenMode};

pub(super) async fn forget(cfg: &Config, args: &ForgetArgs) -> Result<i32, AppError> {
    let sel = if !args.ids.is_empty() {
        Selector::Ids(args.ids.clone())
    } else if !args.external_id.is_empty() {
        Selector::ExternalIds(args.external_id.clone())
    } else if let Some(age) = args.older_than {
        Selector::OlderThan(age)
    } else {
        Selector::Pending
    };
    let db: &Path = &cfg.queue.database;
    let queue = crate::app::command_queue(cfg, OpenMode::Existing).await?;
    // Without a token the local traces still go; the remote deletes wait for a run that has one.
    let mut apis = crate::forget::Apis::default();
    match cfg.api.token.load() {
        Ok(token) => {
            let api = crate::api::ApiClient::new(cfg, token)?;
            apis.tenants = crate::app::tenant_clients(cfg, &api)?;
            apis.default = Some(api);
        }
        Err(e) => tell(&format!("callferry: {e}")),
    }
    let daemon_running = match queue.cluster() {
        // Any daemon of the cluster heard from within its lease may be declaring a job.
        Some(pg) => pg
            .members(cfg.queue.lease)
            .await?
            .iter()
            .any(|m| !m.stopped && m.heartbeat_age_s < cfg.queue.lease.as_secs_f64()),
        None => DaemonLock::is_held(db) == Some(true),
    };
    let declare_wait = (cfg.api.connect_timeout + cfg.api.stall_timeout * 2)
        .max(std::time::Duration::from_secs(10));
    let report =
        crate::forget::forget(cfg, &queue, &apis, &sel, daemon_running, declare_wait).await?;
    queue.close().await;
    say(&report)
}

fn say(r: &Report) -> Result<i32, AppError> {
    let mut stdout = std::io::stdout().lock();
    out(
        &mut stdout,
        &format!(
            "forgot {} call(s); {} interaction(s) deleted at ElevateAI ({} already gone there); \
             {} result file(s) and {} index line(s) removed; {} forget(s) complete\n",
            r.forgotten,
            r.remote_deleted,
            r.remote_gone,
            r.files_removed,
            r.index_lines_removed,
            r.finished
        ),
    )?;
    if !r.vacuumed && (r.forgotten > 0 || r.finished > 0) {
        out(
            &mut stdout,
            "the daemon is running: deleted rows are zeroed in place and the database's log is \
             truncated; it vacuums the database at its next start\n",
        )?;
    }
    let mut failed = false;
    for id in &r.unknown_ids {
        tell(&format!(
            "callferry: no job {id} (see `callferry list`; a forgotten call is not listed)"
        ));
        failed = true;
    }
    for e in &r.unmatched {
        tell(&format!("callferry: no call with external id {e:?}"));
        failed = true;
    }
    for id in &r.in_flight {
        tell(&format!(
            "callferry: job {id} is being declared by the daemon right now; run the same \
             forget again in a minute"
        ));
        failed = true;
    }
    for id in &r.maybe_orphaned {
        tell(&format!(
            "callferry: job {id} was being declared when the daemon stopped: ElevateAI may hold an \
             interaction for it whose id callferry never learnt; look for its call id in the \
             ElevateAI console"
        ));
    }
    if !r.pending.is_empty() {
        for why in &r.pending {
            tell(&format!("callferry: {why}"));
        }
        tell(&format!(
            "callferry: {} forget(s) not finished: the calls are gone from this host's database \
             and results, but not yet from ElevateAI. Fix the cause (the token: api.token or \
             api.token_file; the network) and run `callferry forget --pending`; the daemon \
             also tries again when it starts",
            r.pending.len()
        ));
        failed = true;
    }
    Ok(if failed { EXIT_FAILURE } else { EXIT_OK })
}
