//! `callferry list [--state S] [--limit N] [--json]`: jobs, newest first, streamed as they are read.

use super::{EXIT_OK, EXIT_USAGE, out, tell};
use crate::app::AppError;
use crate::clock::now_ms;
use crate::config::Config;
use crate::queue::{OpenMode, State};
use crate::status;

pub(super) async fn list(
    cfg: &Config,
    state: Option<&str>,
    limit: u32,
    json: bool,
) -> Result<i32, AppError> {
    let state = match state.map(str::parse::<State>) {
        Some(Ok(st)) => Some(st),
        Some(Err(e)) => {
            tell(&format!("callferry: --state: {e}"));
            return Ok(EXIT_USAGE);
        }
        None => None,
    };
    let q = crate::app::command_queue(cfg, OpenMode::Existing).await?;
    // Written as the rows come: a million jobs held all of them, then their JSON, in memory
    // (3.7 GB) before the first byte went out.
    let mut w = std::io::BufWriter::with_capacity(64 << 10, std::io::stdout().lock());
    let now = now_ms();
    if json {
        let mut list = status::JsonList::default();
        q.list_each(state, limit, |job| {
            out(&mut w, &list.row(&with_source(cfg, job)))
        })
        .await?;
        out(&mut w, &(list.end() + "\n"))?;
    } else {
        out(&mut w, &status::list_header())?;
        q.list_each(state, limit, |job| {
            out(&mut w, &status::list_text_row(&with_source(cfg, job), now))
        })
        .await?;
    }
    std::io::Write::flush(&mut w).map_err(AppError::Output)?;
    Ok(EXIT_OK)
}

/// A job not declared yet has no source recorded: it is its watched folder's.
fn with_source(cfg: &Config, mut job: crate::queue::Job) -> crate::queue::Job {
    if job.source.is_none() {
        // One source: no need to look at the folder (a million rows stream through here).
        let source = match cfg.sources.as_slice() {
            [only] => only,
            _ => cfg.source_of_root(&job.fs_root()),
        };
        job.source = Some(source.name.clone());
    }
    job
}
