//! `callferry fake-api` as a child process: started on a free loopback port (over HTTPS with a CA
//! it makes, when asked), and driven and read over its `/_fake` control routes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use callferry_fake::{Counters, InteractionRecord};

use super::{TOKEN, free_port, poll, tail};

/// `callferry fake-api` as a child process, driven over `/_fake`.
pub struct Fake {
    child: Child,
    pub base: String,
    ctl: String,
    http: reqwest::Client,
    /// With HTTPS: the CA (PEM file) the fake made at start, for clients to trust.
    pub ca: Option<PathBuf>,
}

impl Fake {
    pub async fn start(exe: &Path, log: &Path) -> Result<Fake> {
        Self::start_with(exe, log, None).await
    }

    /// With `ca_out`, the fake serves HTTPS with a certificate it makes at start, and writes the
    /// CA that signed it there.
    pub async fn start_with(exe: &Path, log: &Path, ca_out: Option<&Path>) -> Result<Fake> {
        let port = free_port()?;
        let mut cmd = Command::new(exe);
        cmd.args(["fake-api", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--token", TOKEN, "--processing-time", "1h"]);
        if let Some(ca) = ca_out {
            let _ = std::fs::remove_file(ca);
            cmd.arg("--tls-ca-out").arg(ca);
        }
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log)?)
            .spawn()
            .with_context(|| format!("cannot start {} fake-api", exe.display()))?;
        let scheme = if ca_out.is_some() { "https" } else { "http" };
        let mut http = reqwest::Client::builder().no_proxy();
        if let Some(ca) = ca_out {
            let pem = poll(
                "the fake's CA file",
                Duration::from_secs(20),
                Duration::from_millis(20),
                || {
                    let exited = child.try_wait().ok().flatten();
                    async move {
                        if let Some(st) = exited {
                            bail!("the fake exited ({st}): {}", tail(log, 2000));
                        }
                        Ok(std::fs::read(ca).ok())
                    }
                },
            )
            .await?;
            http = http
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        let fake = Fake {
            child,
            base: format!("{scheme}://127.0.0.1:{port}/v1"),
            ctl: format!("{scheme}://127.0.0.1:{port}/_fake"),
            http: http.build()?,
            ca: ca_out.map(Path::to_path_buf),
        };
        poll(
            "the fake to listen",
            Duration::from_secs(20),
            Duration::from_millis(20),
            || async { Ok(fake.counters().await.ok()) },
        )
        .await?;
        Ok(fake)
    }

    pub async fn counters(&self) -> Result<Counters> {
        Ok(self
            .http
            .get(format!("{}/counters", self.ctl))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub async fn interactions(&self) -> Result<Vec<InteractionRecord>> {
        Ok(self
            .http
            .get(format!("{}/interactions", self.ctl))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub async fn set_latency(&self, ms: u64) -> Result<()> {
        self.http
            .post(format!("{}/latency", self.ctl))
            .json(&serde_json::json!({ "ms": ms }))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Declares one interaction (for the `curl -F` baselines).
    pub async fn declare(&self, name: &str) -> Result<String> {
        let v: serde_json::Value = self
            .http
            .post(format!("{}/interactions", self.base))
            .header("X-API-Token", TOKEN)
            .json(&serde_json::json!({"type": "audio", "languageTag": "en-us",
                "vertical": "default", "originalFilename": name}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        v["interactionIdentifier"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("declare gave no id"))
    }

    /// Waits until `n` uploads are stored in total.
    pub async fn wait_stored(&self, n: u64, deadline: Duration) -> Result<Counters> {
        poll(
            &format!("{n} uploads stored at the fake"),
            deadline,
            Duration::from_millis(20),
            || async {
                let c = self.counters().await?;
                Ok((c.uploads_stored >= n).then_some(c))
            },
        )
        .await
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
