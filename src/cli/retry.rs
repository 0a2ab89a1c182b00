//! `callferry retry (ID... | --failed)`: failed jobs back in the queue; a running daemon is woken.

use std::path::Path;

use super::{EXIT_FAILURE, EXIT_OK, RetryArgs, out, tell};
use crate::app::AppError;
use crate::clock::now_ms;
use crate::queue::{OpenMode, Queue};

pub(super) async fn retry(db: &Path, args: &RetryArgs) -> Result<i32, AppError> {
    let q = Queue::open(db, OpenMode::Existing).await?;
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
