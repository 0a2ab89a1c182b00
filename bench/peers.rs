//! The tools a user would use instead: the SDK-style Python loop, an aiohttp uploader and a curl
//! loop. The Python ones run in a venv this bench makes itself (requests and aiohttp from PyPI).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

const SDK_LOOP: &str = include_str!("peers/sdk_loop.py");
const AIOHTTP_LOOP: &str = include_str!("peers/aiohttp_loop.py");
const CURL_LOOP: &str = include_str!("peers/curl_loop.sh");

pub struct Peers {
    python: Option<PathBuf>,
    dir: PathBuf,
    pub curl: bool,
    /// Why the Python peers are missing, if they are.
    pub python_missing: Option<String>,
}

#[derive(Clone, Copy, Debug)]
pub enum Peer {
    SdkLoop,
    Aiohttp(usize),
    CurlLoop,
}

impl Peer {
    pub fn label(self) -> String {
        match self {
            Peer::SdkLoop => "(a) SDK-style loop, Python requests, 1 at a time".into(),
            Peer::Aiohttp(c) => format!("(b) asyncio/aiohttp, concurrency {c}"),
            Peer::CurlLoop => "(c) curl loop, 1 at a time".into(),
        }
    }
}

impl Peers {
    /// Writes the scripts and makes (or reuses) the venv in `venv`.
    pub fn prepare(dir: &Path, venv: &Path) -> Peers {
        let _ = std::fs::create_dir_all(dir);
        for (name, text) in [
            ("sdk_loop.py", SDK_LOOP),
            ("aiohttp_loop.py", AIOHTTP_LOOP),
            ("curl_loop.sh", CURL_LOOP),
        ] {
            let _ = std::fs::write(dir.join(name), text);
        }
        let (python, python_missing) = match make_venv(venv) {
            Ok(p) => (Some(p), None),
            Err(e) => {
                eprintln!("bench: Python peers skipped: {e:#}");
                (None, Some(format!("{e:#}")))
            }
        };
        Peers {
            python,
            dir: dir.to_path_buf(),
            curl: crate::harness::have("curl"),
            python_missing,
        }
    }

    pub fn available(&self, p: Peer) -> bool {
        match p {
            Peer::SdkLoop | Peer::Aiohttp(_) => self.python.is_some(),
            Peer::CurlLoop => self.curl,
        }
    }

    /// Runs one peer over every `.wav` in `files` against `base`; returns when it is done.
    pub fn run(&self, p: Peer, base: &str, token: &str, files: &Path) -> Result<()> {
        self.run_measured(p, base, token, files, None).map(|_| ())
    }

    /// As [`Peers::run`], trusting the CA `ca` for HTTPS, with the peer's CPU (its curls
    /// included).
    pub fn run_measured(
        &self,
        p: Peer,
        base: &str,
        token: &str,
        files: &Path,
        ca: Option<&Path>,
    ) -> Result<crate::harness::Measured> {
        let mut cmd = match p {
            Peer::SdkLoop | Peer::Aiohttp(_) => {
                let py = self.python.as_ref().context("no Python venv")?;
                let mut c = Command::new(py);
                match p {
                    Peer::SdkLoop => {
                        c.arg(self.dir.join("sdk_loop.py"));
                    }
                    _ => {
                        c.arg(self.dir.join("aiohttp_loop.py"));
                    }
                }
                c
            }
            Peer::CurlLoop => {
                let mut c = Command::new("bash");
                c.arg(self.dir.join("curl_loop.sh"));
                c
            }
        };
        cmd.arg(base).arg(token).arg(files);
        if let Peer::Aiohttp(n) = p {
            cmd.arg(n.to_string());
        }
        if let Some(ca) = ca {
            cmd.env("CA_FILE", ca);
        }
        cmd.env("NO_PROXY", "127.0.0.1");
        let out = crate::harness::run_measured(&mut cmd)
            .with_context(|| format!("cannot run peer {}", p.label()))?;
        if !out.ok {
            bail!("peer {} failed: {}", p.label(), out.stderr);
        }
        Ok(out)
    }

    /// CPU seconds of starting Python and importing what the aiohttp peer imports: taken off its
    /// figure, as a long-running uploader pays it once.
    pub fn python_start_cpu(&self) -> Result<f64> {
        let py = self.python.as_ref().context("no Python venv")?;
        let m = crate::harness::run_measured(
            Command::new(py).args(["-c", "import asyncio, os, ssl, sys, aiohttp"]),
        )?;
        Ok(m.secs())
    }
}

fn make_venv(venv: &Path) -> Result<PathBuf> {
    let py = venv.join("bin/python");
    let ok = |py: &Path| {
        Command::new(py)
            .args(["-c", "import requests, aiohttp"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if py.exists() && ok(&py) {
        return Ok(py);
    }
    eprintln!(
        "bench: making a Python venv with requests and aiohttp in {}",
        venv.display()
    );
    let st = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .status()
        .context("python3 not found")?;
    if !st.success() {
        bail!("python3 -m venv failed");
    }
    let st = Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "requests",
            "aiohttp",
        ])
        .status()?;
    if !st.success() || !ok(&py) {
        bail!("pip install requests aiohttp failed");
    }
    Ok(py)
}
