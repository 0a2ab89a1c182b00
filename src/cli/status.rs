//! `callferry status [--json]`: the queue at a glance, from the database, daemon running or not.

use std::path::Path;

use super::{EXIT_OK, out};
use crate::app::AppError;
use crate::config::Config;
use crate::queue::OpenMode;
use crate::status;

pub(super) async fn status(cfg: &Config, db: &Path, json: bool) -> Result<i32, AppError> {
    let q = crate::app::command_queue(cfg, OpenMode::Existing).await?;
    let report = status::gather_for(&q, db, Some(cfg)).await?;
    let text = if json {
        serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"
    } else {
        status::render_text(&report, status::Style::for_stdout())
    };
    let mut stdout = std::io::stdout().lock();
    out(&mut stdout, &text)?;
    std::io::Write::flush(&mut stdout).map_err(AppError::Output)?;
    Ok(EXIT_OK)
}
