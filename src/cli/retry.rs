//! `callferry retry (ID... | --failed)`: failed jobs back in the queue; a running daemon is woken.

use super::{EXIT_FAILURE, EXIT_OK, RetryArgs, out, tell};
use crate::app::AppError;
use crate::clock::now_ms;
use crate::config::Config;
use crate::queue::OpenMode;

pub(super) async fn retry(cfg: &Config, args: &RetryArgs) -> Result<i32, AppError> {
    let q = crate::app::command_queue(cfg, OpenMode::Existing).await?;
    let n = if args.failed {
        q.retry(None, now_ms()).await?
    } else {
        q.retry(Some(&args.ids), now_ms()).await?
    };
    out(
        &mut std::io::stdout().lock(),
        &format!("{n} job(s) back in the queue\n"),
    )?;
    if !args.failed && (n as usize) < args.ids.len() {
        tell(&format!(
            "callferry: {} of the given id(s) were not failed jobs and were left alone",
            args.ids.len() - n as usize
        ));
        return Ok(EXIT_FAILURE);
    }
    Ok(EXIT_OK)
}
