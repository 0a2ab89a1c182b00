//! A fake of the ElevateAI REST API, for integration tests, the `callferry
//! demo` command and benchmarks. It is test infrastructure, not a product
//! component: nothing in the daemon's upload path depends on it. A crate of its own
//! (`callferry-fake`), so it cannot reach the daemon's internals: it knows the API only as the
//! service documents it.
//!
//! The fake owns:
//! - the audio-interaction part of ElevateAI's `/v1` API: declare, multipart
//!   upload, status, phrase-by-phrase and punctuated transcripts, CX AI
//!   results and delete, all behind the `X-API-Token` header;
//! - a record of every interaction and upload attempt (size and SHA-256 of
//!   the audio, computed while streaming: uploads are never held in memory)
//!   and request counters;
//! - fault injection: scripted faults per endpoint, seeded random faults,
//!   latency, upload throttling, forced statuses, connection resets and a
//!   whole-server outage (`go_down` / `come_up`);
//! - a hostile server, as faults: redirects to another host, huge, endless or dripping bodies,
//!   binary garbage, a 401 that quotes the token it was sent, a declare with an unusable id;
//! - sample recordings ([`wav_bytes`]) for the demo, tests and benchmarks;
//! - `/_fake/...` control routes (no auth) so a process other than the one
//!   that started the fake (a benchmark against `callferry fake-api`) can
//!   drive and inspect it.
//!
//! Behaviour choices where ElevateAI's docs are silent:
//! - Results asked for before the interaction is `processed` get `404`
//!   (the docs list only 200/401/404 for those endpoints).
//! - Status goes `declared` → `fileUploaded` (first half of
//!   `processing_time` after the upload) → `processing` → `processed`.
//! - Error bodies are `{"message": "..."}`.
//! - Only HTTP/1.1 is served, so that dropping a connection affects exactly
//!   one request.
//!
//! Control routes (JSON bodies, `Content-Type: application/json`):
//! `GET /_fake/interactions`, `GET /_fake/counters`, `GET /_fake/deleted`,
//! `POST /_fake/faults` ([`RandomFaults`]),
//! `POST /_fake/fault` (`{"endpoint":"Upload","fault":"ResetBeforeStore"}`,
//! `{"endpoint":"Declare","fault":{"Status":503}}`,
//! `{"endpoint":"Status","fault":{"Stall":{"secs":2,"nanos":0}}}`),
//! `POST /_fake/latency` (`{"ms":n}`), `POST /_fake/token` (`{"token":"..."}`),
//! `POST /_fake/processing_time` (`{"ms":n}`),
//! `POST /_fake/upload_rate` (`{"bytes_per_sec":n}` or `null`),
//! `POST /_fake/status` (`{"id":"...","status":"...","error_message":null}`).

mod handlers;
mod results;
mod server;
mod state;
#[cfg(test)]
mod tests;
mod timer;
mod wav;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use serde::{Deserialize, Serialize};

use state::Shared;
pub use wav::{wav_bytes, wav_header};

/// Start-up settings; all but `max_upload_bytes` can be changed later
/// through [`FakeApi`].
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// The only `X-API-Token` accepted.
    pub token: String,
    /// Time from a stored upload to status `processed`.
    pub processing_time: Duration,
    /// Delay added before every `/v1` answer.
    pub latency: Duration,
    /// Uploads whose file part is larger get `413`.
    pub max_upload_bytes: Option<u64>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            token: "fake-token".to_owned(),
            processing_time: Duration::ZERO,
            latency: Duration::ZERO,
            max_upload_bytes: None,
        }
    }
}

/// The API operation a fault is aimed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Endpoint {
    /// `POST /v1/interactions`
    Declare,
    /// `POST /v1/interactions/{id}/upload`
    Upload,
    /// `GET /v1/interactions/{id}/status`
    Status,
    /// `GET .../transcript`, `.../transcripts/punctuated` and `.../ai`
    Results,
    /// `DELETE /v1/interactions/{id}`
    Delete,
}

/// One misbehaviour, consumed by one request.
///
/// Faults that spoil only the answer (`ResetAfterStore`, `GarbageJson`,
/// `MissingId`, `WrongSuccess`) let the operation take effect first, as a
/// real server failing at that point would; if the operation itself fails
/// (unknown id, bad body) its normal error is answered and the fault is
/// still used up. On `Status` and `Results`, `ResetAfterStore` behaves like
/// `ResetBeforeStore`, `MissingId` answers `{}` and `WrongSuccess` answers
/// 201 instead of 200.
///
/// The hostile ones (`Redirect` to `BadId`) are a server that lies or attacks rather than one that
/// fails: the daemon must neither follow it, nor hold it whole, nor repeat what it says about the
/// token. Those that replace the answer (all but `BadId`) do no work; on an upload the audio is
/// read first and not stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Fault {
    /// This status with the JSON body `{"message": "injected <code>"}`.
    Status(u16),
    /// 429 with `Retry-After` when given.
    TooManyRequests { retry_after_secs: Option<u64> },
    /// Reads some of the request (up to 64 KiB of an upload), then drops the
    /// connection without answering; nothing is stored.
    ResetBeforeStore,
    /// Stores the audio (declare: creates the interaction), then drops the
    /// connection without answering.
    ResetAfterStore,
    /// Says nothing for this long, then handles the request normally.
    Stall(Duration),
    /// 502 with an HTML page, as a proxy in front of the API would send.
    HtmlError,
    /// The normal success status with a body that does not parse as JSON.
    GarbageJson,
    /// Declare: 201 with `{}` (the interaction is still created).
    MissingId,
    /// 200 instead of 201 (declare: with a valid id; upload: stores the audio).
    WrongSuccess,
    /// A redirect with this status (301, 302, 303, 307, 308) to `location`, e.g. another host.
    Redirect { status: u16, location: String },
    /// This status with a JSON message, a header and an HTML-ish tail that all quote the token the
    /// request presented, as a careless 401 page does.
    EchoToken(u16),
    /// The normal success status with a body of this many bytes, made as it is sent: the JSON
    /// object `{"pad":"xx…x"}` when there is room for it.
    HugeBody(u64),
    /// The normal success status with a body that never ends.
    EndlessBody,
    /// The normal success status, then one byte of a never-ending body every this long.
    SlowDrip(Duration),
    /// This status with a body of binary bytes: not UTF-8, control characters, NULs.
    GarbageBytes(u16),
    /// Declare: 201 with this `interactionIdentifier` (the interaction is created under its real
    /// id, which nobody learns: an orphan).
    BadId(String),
}

/// Seeded random faults for `Declare` and `Upload`, drawn when no scripted
/// fault is queued. Each request draws once: `p_5xx` gives one of
/// 500/502/503/504, `p_429` a 429 without `Retry-After`, then the resets
/// (`p_reset_after_store` applies to uploads only). The same seed and the
/// same request order give the same faults.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RandomFaults {
    pub seed: u64,
    pub p_5xx: f64,
    pub p_429: f64,
    pub p_reset_before_store: f64,
    pub p_reset_after_store: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InteractionRecord {
    pub id: String,
    /// The declare request body as received.
    pub declare_body: serde_json::Value,
    /// Every upload request that got past authentication, in arrival order.
    pub uploads: Vec<UploadRecord>,
    /// The status `GET /status` would report now.
    pub status: String,
    /// When the declare was handled (unix ms), for benchmarks' latency figures.
    #[serde(default)]
    pub declared_at_ms: u64,
    /// When the audio was stored (unix ms), if it was.
    #[serde(default)]
    pub stored_at_ms: Option<u64>,
    /// The token the declare came with (the account; test tokens only).
    #[serde(default)]
    pub account: String,
}

/// One upload request. Describes the first multipart part (empty name and
/// size 0 if there was none).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadRecord {
    pub field_name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    /// Bytes of the part that were read; for `ResetBeforeStore` only the
    /// part read before hanging up.
    pub size: u64,
    /// Hex SHA-256 of those bytes.
    pub sha256: String,
    /// Status answered, or 0 when the connection was dropped instead.
    pub answered: u16,
    /// Whether this request is the one that stored the interaction's audio.
    #[serde(default)]
    pub stored: bool,
}

/// Counts since start-up.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Every `/v1` request, whatever its outcome.
    pub requests: u64,
    /// Authenticated declare requests (including faulted and invalid ones).
    pub declares: u64,
    pub uploads_stored: u64,
    /// Uploads answered 409 because the audio was already there.
    pub uploads_conflict: u64,
    /// Uploads answered 400, 404 or 413 (injected faults are not counted).
    pub uploads_rejected: u64,
    /// Authenticated status requests.
    pub status_polls: u64,
    /// Authenticated transcript, punctuated-transcript and AI requests.
    pub result_fetches: u64,
    pub unauthorized: u64,
    /// Authenticated delete requests (found or not).
    #[serde(default)]
    pub deletes: u64,
    pub faults_injected: u64,
    /// Raw upload request body bytes read (multipart framing included).
    pub bytes_received: u64,
    /// Connections that carried at least one `/v1` request (those used only for the control
    /// routes are not counted).
    #[serde(default)]
    pub connections: u64,
    /// Of those, the ones whose TLS handshake was a full one (HTTPS only).
    #[serde(default)]
    pub tls_full_handshakes: u64,
    /// Of those, the ones whose TLS handshake resumed an earlier session (ticket or session id).
    #[serde(default)]
    pub tls_resumed_handshakes: u64,
}

/// Handle to a running fake. Clones share the same server; it stops when
/// the last clone is dropped or on [`FakeApi::shutdown`].
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    shared: Arc<Shared>,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// `None` while down.
    running: tokio::sync::Mutex<Option<server::Running>>,
    /// While down: the port, bound but not listening (see `server::hold`).
    held: std::sync::Mutex<Option<tokio::net::TcpSocket>>,
}

impl FakeApi {
    /// Starts on an ephemeral port of 127.0.0.1.
    pub async fn start(opts: FakeOptions) -> std::io::Result<FakeApi> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), opts).await
    }

    pub async fn start_on(addr: SocketAddr, opts: FakeOptions) -> std::io::Result<FakeApi> {
        Self::start_inner(addr, opts, None).await
    }

    /// Starts on an ephemeral port of 127.0.0.1, serving HTTPS with this certificate chain and
    /// private key (PEM): for tests of which certificates callferry trusts.
    pub async fn start_tls(
        opts: FakeOptions,
        cert_chain_pem: &[u8],
        key_pem: &[u8],
    ) -> std::io::Result<FakeApi> {
        Self::start_tls_on(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            opts,
            cert_chain_pem,
            key_pem,
        )
        .await
    }

    /// [`FakeApi::start_tls`] on a given address.
    pub async fn start_tls_on(
        addr: SocketAddr,
        opts: FakeOptions,
        cert_chain_pem: &[u8],
        key_pem: &[u8],
    ) -> std::io::Result<FakeApi> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        let certs = CertificateDer::pem_slice_iter(cert_chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(&e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad(&e))?;
        // As a real front end does, so a client that resumes sessions can show it: TLS 1.3
        // tickets (the session-id cache that rustls keeps by default serves TLS 1.2 and 1.3
        // clients that send no ticket extension).
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| bad(&e))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::start_inner(addr, opts, Some(acceptor)).await
    }

    /// Starts on `addr` serving HTTPS with a certificate made now ([`TestPki`]); the CA to trust
    /// is returned with the handle.
    pub async fn start_tls_generated(
        addr: SocketAddr,
        opts: FakeOptions,
    ) -> std::io::Result<(FakeApi, TestPki)> {
        let pki = TestPki::generate()?;
        let fake =
            Self::start_tls_on(addr, opts, pki.cert_pem.as_bytes(), pki.key_pem.as_bytes()).await?;
        Ok((fake, pki))
    }

    async fn start_inner(
        addr: SocketAddr,
        opts: FakeOptions,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<FakeApi> {
        if addr.port() != 0 {
            // The listener allows SO_REUSEPORT (see `server::hold`), which would let a second
            // fake on a fixed port share it silently; a plain bind first refuses that.
            drop(std::net::TcpListener::bind(addr)?);
        }
        let listener = server::bind(addr)?;
        // Port 0 resolved once, so `come_up` returns to the same port.
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(opts));
        let router = handlers::router(shared.clone());
        let running = server::spawn(listener, router.clone(), tls.clone(), shared.clone());
        tracing::debug!(%addr, "fake ElevateAI API listening");
        Ok(FakeApi {
            inner: Arc::new(Inner {
                addr,
                shared,
                router,
                tls,
                running: tokio::sync::Mutex::new(Some(running)),
                held: std::sync::Mutex::new(None),
            }),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://HOST:PORT/v1` (`https://` when serving TLS), without a trailing slash.
    pub fn base_url(&self) -> String {
        let scheme = if self.inner.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/v1", self.inner.addr)
    }

    pub fn set_token(&self, token: &str) {
        self.inner.shared.lock().token = token.to_owned();
    }

    /// Accepts these tokens too, as other accounts (replacing any set before): a 401 for one
    /// account's token is `set_other_tokens` without it.
    pub fn set_other_tokens(&self, tokens: &[&str]) {
        self.inner.shared.lock().other_tokens = tokens.iter().map(|t| t.to_string()).collect();
    }

    /// Delay added before every `/v1` answer (not the control routes).
    /// Gives the account the Explore feature (declares with `metadata` accepted) or takes it away
    /// (they are answered 400, the default, as for most accounts).
    pub fn set_explore(&self, on: bool) {
        self.inner.shared.lock().explore = on;
    }

    pub fn set_latency(&self, d: Duration) {
        self.inner.shared.lock().latency = d;
    }

    /// Caps how fast upload bodies are read; applies to uploads starting
    /// after the call.
    pub fn set_upload_rate(&self, bytes_per_sec: Option<u64>) {
        self.inner.shared.lock().upload_rate = bytes_per_sec;
    }

    /// Also re-times interactions already uploaded: their status is derived
    /// from the upload instant and the current processing time.
    pub fn set_processing_time(&self, d: Duration) {
        self.inner.shared.lock().processing_time = d;
    }

    pub fn push_fault(&self, endpoint: Endpoint, fault: Fault) {
        self.inner.shared.push_fault(endpoint, fault);
    }

    /// Drops every scripted fault not yet used.
    pub fn clear_faults(&self) {
        self.inner.shared.clear_faults();
    }

    /// Replaces the random-fault settings and reseeds the generator.
    pub fn set_random_faults(&self, f: RandomFaults) {
        self.inner.shared.set_random_faults(f);
    }

    /// Pins the reported status (e.g. `"processingFailed"`) regardless of
    /// timing; `"processed"` also makes the results available. Unknown ids
    /// are ignored.
    pub fn force_status(&self, id: &str, status: &str, error_message: Option<&str>) {
        self.inner.shared.force_status(id, status, error_message);
    }

    /// Creates `n` interactions that already have their audio (uploaded now), without HTTP, for
    /// benchmarks that need many followed jobs. Returns their ids.
    pub fn seed_uploaded(&self, n: usize) -> Vec<String> {
        self.inner.shared.seed_uploaded(n)
    }

    /// Stops listening and kills open connections; returns once the port
    /// refuses connections. A no-op when already down.
    pub async fn go_down(&self) {
        let mut running = self.inner.running.lock().await;
        if let Some(up) = running.take() {
            // Held before the listener closes, so the port is never free in between. A failure
            // only loses that protection.
            *self.inner.held.lock().unwrap() = server::hold(self.inner.addr).ok();
            up.stop().await;
        }
    }

    /// Listens again on the same port with all state kept. A no-op when up.
    pub async fn come_up(&self) -> std::io::Result<()> {
        let mut running = self.inner.running.lock().await;
        if running.is_none() {
            let listener = server::bind(self.inner.addr)?;
            *running = Some(server::spawn(
                listener,
                self.inner.router.clone(),
                self.inner.tls.clone(),
                self.inner.shared.clone(),
            ));
            self.inner.held.lock().unwrap().take();
        }
        Ok(())
    }

    /// Every interaction still known (deleted ones are gone), in declare order.
    pub fn interactions(&self) -> Vec<InteractionRecord> {
        self.inner.shared.interactions()
    }

    pub fn counters(&self) -> Counters {
        self.inner.shared.counters()
    }

    /// Ids of the interactions deleted through the API (`DELETE /interactions/{id}`), in order.
    pub fn deleted(&self) -> Vec<String> {
        self.inner.shared.lock().deleted.clone()
    }

    /// Stops the server and waits for its connections to close, even if
    /// other clones of this handle are still alive.
    pub async fn shutdown(self) {
        self.go_down().await;
    }
}

/// A CA and a server certificate signed by it for `127.0.0.1`, `::1` and `localhost`, made when
/// asked (ECDSA P-256, valid from now for a week): what the fake's HTTPS mode serves. A client
/// trusts `ca_pem` (callferry: `[api] ca_file`; curl: `--cacert`), as it would a private CA in
/// front of the real service. The CA is separate from the server certificate because webpki
/// refuses a CA certificate as the server's own, and a real deployment has a chain.
pub struct TestPki {
    pub ca_pem: String,
    pub cert_pem: String,
    /// The server certificate's private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}

impl TestPki {
    pub fn generate() -> std::io::Result<TestPki> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let bad =
            |e: rcgen::Error| std::io::Error::other(format!("making the fake's certificate: {e}"));
        let now = std::time::SystemTime::now();
        let validity = |p: &mut CertificateParams| {
            // An hour back, so a clock a little behind the fake's still accepts it.
            p.not_before = (now - Duration::from_secs(3600)).into();
            p.not_after = (now + Duration::from_secs(7 * 86_400)).into();
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(bad)?;
        ca.distinguished_name
            .push(DnType::CommonName, "callferry fake ElevateAI CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut ca);
        let ca =
            CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(bad)?).map_err(bad)?;
        let mut leaf = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "localhost".to_owned(),
        ])
        .map_err(bad)?;
        leaf.distinguished_name
            .push(DnType::CommonName, "callferry fake ElevateAI");
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.use_authority_key_identifier_extension = true;
        validity(&mut leaf);
        let key = KeyPair::generate().map_err(bad)?;
        let cert = leaf.signed_by(&key, &ca).map_err(bad)?;
        Ok(TestPki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Serves the fake on `addr` until the process ends, for the
/// `callferry fake-api` command. Returns only if binding fails. Prints
/// nothing; drive and inspect it through the `/_fake` control routes.
///
/// With `tls_ca_out`, serves HTTPS with a certificate made now and writes the CA that signed it
/// (PEM) to that path once listening, so a client can trust it (`[api] ca_file`, `curl --cacert`).
pub async fn serve_forever(
    addr: SocketAddr,
    opts: FakeOptions,
    tls_ca_out: Option<&std::path::Path>,
) -> std::io::Result<()> {
    let _api = match tls_ca_out {
        None => FakeApi::start_on(addr, opts).await?,
        Some(out) => {
            let (api, pki) = FakeApi::start_tls_generated(addr, opts).await?;
            // Written whole under another name, then renamed: whoever waits for the file never
            // reads half a certificate.
            let tmp = out.with_extension("pem.tmp");
            std::fs::write(&tmp, pki.ca_pem.as_bytes())?;
            std::fs::rename(&tmp, out)?;
            api
        }
    };
    std::future::pending::<()>().await;
    Ok(())
}
