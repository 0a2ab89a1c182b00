//! The `curl -F` baselines: one file declared at the fake, then uploaded by curl, timed by curl
//! itself (and, in the measured form, its CPU taken from the kernel).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{Fake, Measured, TOKEN, run_measured};

/// `curl -F` of one file to the fake: declare, then time the upload. Bytes per second.
pub async fn curl_upload(fake: &Fake, file: &Path) -> Result<f64> {
    let name = file
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let id = fake.declare(&name).await?;
    let url = format!("{}/interactions/{id}/upload", fake.base);
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}"])
        .args(["-H", &format!("X-API-Token: {TOKEN}")])
        .arg("-F")
        .arg(format!(
            "{name}=@{};type=application/octet-stream",
            file.display()
        ))
        .arg(&url)
        .output()
        .context("cannot run curl")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = text.split_whitespace();
    let code = it.next().unwrap_or("");
    let secs: f64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    if code != "201" || secs <= 0.0 {
        bail!(
            "curl upload answered {text:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(std::fs::metadata(file)?.len() as f64 / secs)
}

/// `curl -F` (with `--cacert` when the fake serves HTTPS) of one file: declare, then time the
/// upload. Bytes per second, and curl's run (its CPU).
pub async fn curl_upload_measured(fake: &Fake, file: &Path) -> Result<(f64, Measured)> {
    let name = file
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let id = fake.declare(&name).await?;
    let url = format!("{}/interactions/{id}/upload", fake.base);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}"])
        .args(["-H", &format!("X-API-Token: {TOKEN}")]);
    if let Some(ca) = &fake.ca {
        cmd.arg("--cacert").arg(ca);
    }
    cmd.arg("-F")
        .arg(format!(
            "{name}=@{};type=application/octet-stream",
            file.display()
        ))
        .arg(&url);
    let m = tokio::task::block_in_place(|| run_measured(&mut cmd)).context("cannot run curl")?;
    let mut it = m.stdout.split_whitespace();
    let code = it.next().unwrap_or("");
    let secs: f64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    if code != "201" || secs <= 0.0 {
        bail!("curl upload answered {:?}: {}", m.stdout, m.stderr);
    }
    Ok((std::fs::metadata(file)?.len() as f64 / secs, m))
}
