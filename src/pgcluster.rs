//! A throwaway PostgreSQL server for the tests and the benchmarks of the PostgreSQL queue: `initdb`
//! and `pg_ctl` in a temporary folder, reached only through a Unix socket in that folder, removed
//! with it. It ships in the library so the integration tests, the unit tests and the bench share
//! one copy; the daemon never uses it.
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then the cluster belongs to `nobody`.
//! The server binaries are looked up where Debian puts them (`/usr/lib/postgresql/<major>/bin`),
//! then in `PATH`, or in `CALLFERRY_PG_BIN`. When none is there and we are root on Debian,
//! `postgresql` is installed from the distribution's packages, once per machine, so the README's
//! `cargo test` still does everything on a fresh machine. A test that needs PostgreSQL never skips:
//! when no server can be started, [`PgCluster::start`] says why and the test fails.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The unprivileged account a cluster runs as when we are root.
const NOBODY: u32 = 65534;
/// The socket's "port": only its file name (`.s.PGSQL.<port>`), the server listens on no TCP port.
const PORT: u16 = 5432;
/// The superuser `initdb` creates, trusted on the socket (nothing else can reach it).
const SUPERUSER: &str = "callferry";

/// Why a throwaway server could not be had. Cloneable, because the shared server's failure is
/// kept once and told to every test that asks for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PgClusterError {
    #[error("no PostgreSQL server binaries found: {HOW}")]
    NotInstalled,
    #[error("{0}\n(then: {HOW})")]
    InstallFailed(Box<PgClusterError>),
    /// A file-system step of the set-up (`what` says which) failed.
    #[error("cannot {what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("{tool} failed ({status}): {output}")]
    Tool {
        tool: String,
        status: String,
        output: String,
    },
    #[error("{source}\nserver log:\n{log}")]
    NotStarted {
        source: Box<PgClusterError>,
        log: String,
    },
    #[error("postgresql was installed, but initdb is still not found")]
    StillMissing,
}

const HOW: &str = "install PostgreSQL's server (Debian: `apt-get install postgresql`), or point \
                   CALLFERRY_PG_BIN at the folder holding initdb and pg_ctl";

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgClusterError {
    let what = what.into();
    move |e| PgClusterError::Setup {
        what,
        reason: e.to_string(),
    }
}

/// One running server. Dropping it stops the server (immediately: its data is thrown away).
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_nobody: bool,
    /// The server's options (`pg_ctl -o`), for [`PgCluster::resume`].
    opts: String,
    /// Its socket's "port" ([`PORT`], or a TCP port when it also listens on 127.0.0.1).
    port: u16,
    /// The TLS server's certificate and key, and the CA that signed it ([`PgCluster::start_tls`]):
    /// kept for the server's life, removed with it.
    _certs: Option<tempfile::TempDir>,
}

impl PgCluster {
    /// `initdb` and start a server tuned for tests: no fsync (its data dies with the test; crash
    /// safety under test is callferry's, not PostgreSQL's), many connections.
    pub fn start() -> Result<PgCluster, PgClusterError> {
        Self::start_with(&[
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
        ])
    }

    /// Like [`PgCluster::start`], with these `name=value` server settings instead of the test
    /// tuning (the bench measures with PostgreSQL's defaults: `start_with(&[])`).
    pub fn start_with(settings: &[&str]) -> Result<PgCluster, PgClusterError> {
        Self::start_on(PORT, settings, None)
    }

    /// A server that also listens on 127.0.0.1 over TLS (a certificate for `localhost` signed
    /// by a CA made for it), as a database on another host is reached; returns it and the CA's
    /// certificate, for `sslrootcert`. Unix-socket connections (`url`) still work unencrypted.
    pub fn start_tls() -> Result<(PgCluster, PathBuf), PgClusterError> {
        let certs = tempfile::Builder::new()
            .prefix("cfpgtls")
            .tempdir_in("/tmp")
            .map_err(setup("make a folder for the test server's certificates"))?;
        let as_nobody = unsafe { libc::geteuid() } == 0;
        make_certificates(certs.path(), as_nobody)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(setup("find a free port for the test server"))?
            .port();
        let d = certs.path().display();
        let settings = [
            "ssl=on".to_string(),
            format!("ssl_cert_file='{d}/server.pem'"),
            format!("ssl_key_file='{d}/server.key'"),
            "listen_addresses='127.0.0.1'".to_string(),
        ];
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        let ca = certs.path().join("ca.pem");
        let cluster = Self::start_on(port, &settings, Some(certs))?;
        Ok((cluster, ca))
    }

    /// A URL for database `db` over TCP to 127.0.0.1 with `sslmode` (and `sslrootcert`, if
    /// given): a server of [`PgCluster::start_tls`].
    pub fn tcp_url(&self, db: &str, sslmode: &str, root: Option<&Path>) -> String {
        let mut url = format!(
            "postgres://{SUPERUSER}@localhost:{}/{db}?sslmode={sslmode}",
            self.port
        );
        if let Some(r) = root {
            url.push_str(&format!("&sslrootcert={}", r.display()));
        }
        url
    }

    fn start_on(
        port: u16,
        settings: &[&str],
        certs: Option<tempfile::TempDir>,
    ) -> Result<PgCluster, PgClusterError> {
        let bin = server_binaries()?;
        let as_nobody = unsafe { libc::geteuid() } == 0;
        // Short: a Unix socket's path is limited to 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("cfpg")
            .tempdir_in("/tmp")
            .map_err(setup("make a folder for the PostgreSQL test server"))?;
        let mut cluster = PgCluster {
            dir,
            bin,
            as_nobody,
            opts: String::new(),
            port,
            _certs: certs,
        };
        if as_nobody {
            let rc = unsafe {
                let p = std::ffi::CString::new(cluster.dir.path().as_os_str().as_encoded_bytes())
                    .map_err(|e| setup("name the server's folder")(e.into()))?;
                libc::chown(p.as_ptr(), NOBODY, NOBODY)
            };
            if rc != 0 {
                return Err(setup(format!(
                    "hand {} to nobody for the PostgreSQL test server",
                    cluster.dir.path().display()
                ))(std::io::Error::last_os_error()));
            }
        }
        std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(setup("make the server's folder private"))?;
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                "--auth=trust".as_ref(),
                "--no-sync".as_ref(),
                "--no-instructions".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
            ],
        )?;
        let mut opts = format!(
            "-c listen_addresses='' -k {} -p {} -c max_connections=200",
            cluster.dir.path().display(),
            cluster.port
        );
        for s in settings {
            opts.push_str(" -c ");
            opts.push_str(s);
        }
        cluster.opts = opts;
        cluster.launch()?;
        Ok(cluster)
    }

    /// `pg_ctl start` on the cluster's data, waiting until it takes connections.
    fn launch(&self) -> Result<(), PgClusterError> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        let started = self.run(
            "pg_ctl",
            &[
                "start".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "120".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                self.opts.as_ref(),
            ],
        );
        started.map_err(|e| PgClusterError::NotStarted {
            source: Box::new(e),
            log: std::fs::read_to_string(&log).unwrap_or_default(),
        })
    }

    /// Stops the server as a crash or a cut network would look to its clients (`-m immediate`:
    /// every connection is dropped, nothing waits), keeping its data for [`PgCluster::resume`].
    pub fn pause(&self) -> Result<(), PgClusterError> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "stop".as_ref(),
                "-w".as_ref(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
            ],
        )
    }

    /// Starts the server again after [`PgCluster::pause`], on the same data and socket.
    pub fn resume(&self) -> Result<(), PgClusterError> {
        self.launch()
    }

    /// A connection URL for database `db` (`postgres` always exists; see [`PgCluster::create_db`]).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost/{db}?host={}&port={}",
            self.dir.path().display(),
            self.port
        )
    }

    /// A fresh, empty database, so several tests can share one server.
    pub fn create_db(&self, name: &str) -> Result<String, PgClusterError> {
        assert!(
            name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "database names here are identifiers"
        );
        let sock = self.dir.path().as_os_str().to_owned();
        let out = self.command(
            "createdb",
            &[
                "-h".as_ref(),
                sock.as_os_str(),
                "-p".as_ref(),
                self.port.to_string().as_ref(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                name.as_ref(),
            ],
        )?;
        check("createdb", &out)?;
        Ok(self.url(name))
    }

    /// One server for the whole test process, started on first use and stopped when the process
    /// exits (an `atexit` hook: a static is never dropped). Each test takes a database of its own
    /// ([`PgCluster::fresh_db`]), so they run in parallel on it.
    pub fn shared() -> Result<&'static PgCluster, PgClusterError> {
        static SHARED: OnceLock<Result<PgCluster, PgClusterError>> = OnceLock::new();
        extern "C" fn stop_shared() {
            if let Some(Ok(c)) = SHARED.get() {
                c.stop();
            }
        }
        SHARED
            .get_or_init(|| {
                let c = PgCluster::start()?;
                unsafe { libc::atexit(stop_shared) };
                Ok(c)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// A new database with a name no other caller in this process gets.
    pub fn fresh_db(&self) -> Result<String, PgClusterError> {
        static N: AtomicU32 = AtomicU32::new(0);
        self.create_db(&format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Stops the server at once (its data is thrown away) and removes its folder.
    pub fn stop(&self) {
        let data = self.data_dir();
        let _ = self.command(
            "pg_ctl",
            &[
                "stop".as_ref(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
            ],
        );
        let _ = std::fs::remove_dir_all(self.dir.path());
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<Output, PgClusterError> {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        if self.as_nobody {
            // std also drops root's supplementary groups when it sets a uid as root.
            cmd.uid(NOBODY).gid(NOBODY);
        }
        cmd.output()
            .map_err(setup(format!("run {}", self.bin.join(tool).display())))
    }

    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<(), PgClusterError> {
        check(tool, &self.command(tool, args)?)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A CA and a certificate for `localhost` / 127.0.0.1 it signed, with `openssl`, in `dir`; the
/// server's key readable by the server alone (`nobody` when we are root).
fn make_certificates(dir: &Path, as_nobody: bool) -> Result<(), PgClusterError> {
    let run = |args: &[&str]| -> Result<(), PgClusterError> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(setup("run openssl"))?;
        check("openssl", &out)
    };
    let ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
               keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n";
    std::fs::write(dir.join("server.ext"), ext)
        .map_err(setup("write the certificate's extensions"))?;
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=callferry test CA",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ])?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(setup("open the certificates' folder to the server"))?;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .map_err(setup("make the server's key private"))?;
    if as_nobody {
        for f in ["server.key", "server.pem"] {
            std::os::unix::fs::chown(dir.join(f), Some(NOBODY), Some(NOBODY))
                .map_err(setup("hand the server's key to nobody"))?;
        }
    }
    Ok(())
}

fn check(tool: &str, out: &Output) -> Result<(), PgClusterError> {
    if out.status.success() {
        return Ok(());
    }
    Err(PgClusterError::Tool {
        tool: tool.into(),
        status: out.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ),
    })
}

/// The folder holding `initdb`, `pg_ctl` and `postgres`.
fn server_binaries() -> Result<PathBuf, PgClusterError> {
    static INSTALL: Mutex<()> = Mutex::new(());
    if let Some(dir) = std::env::var_os("CALLFERRY_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = find_binaries() {
        return Ok(dir);
    }
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = find_binaries() {
        return Ok(dir);
    }
    install()?;
    find_binaries().ok_or(PgClusterError::StillMissing)
}

fn find_binaries() -> Option<PathBuf> {
    // Debian keeps the server tools off PATH, one folder per major version: take the newest.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p).find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    })
}

/// Debian's `postgresql`, when we may install it; otherwise what the operator must do. Several
/// test processes may get here at once: apt's own lock serialises them, and the loser finds the
/// binaries on its second look.
fn install() -> Result<(), PgClusterError> {
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/apt-get").exists() {
        return Err(PgClusterError::NotInstalled);
    }
    let apt = |args: &[&str]| -> Result<(), PgClusterError> {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(setup("run apt-get"))?;
        check("apt-get", &out)
    };
    apt(&["-o", "DPkg::Lock::Timeout=300", "update", "-qq"])?;
    apt(&[
        "-o",
        "DPkg::Lock::Timeout=300",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "postgresql",
    ])
    .map_err(|e| PgClusterError::InstallFailed(Box::new(e)))
}
