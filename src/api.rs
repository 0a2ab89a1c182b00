//! Owns the conversation with ElevateAI: the HTTP client, the declare / upload / status / results
//! calls, the stall guard, the shared bandwidth limit, and the classification of every failure into
//! what to do next ([`ErrorClass`]).
//!
//! It decides nothing about jobs: the worker maps an [`ApiError`]'s class onto a queue transition.
//! The token is read from a shared slot on every request (so a fixed token file takes effect without
//! a restart) and is marked sensitive on the wire; it is never part of an error.
//!
//! The server is not trusted either. Redirects are never followed (reqwest would carry the token to
//! whatever host a 3xx names); every body is read under a cap (small for JSON answers, a configured
//! one for results, which go to disk); and every text the server sends is stripped of the token and
//! of `base_url`'s credentials where it enters ([`error_from_response`]), and again at the edge of
//! every public call, before it can reach a log, the database or `status`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, LOCATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::ratelimit::RateLimiter;
use crate::secret::{Redactor, Secret};

const TOKEN_HEADER: &str = "X-API-Token";
/// Largest error body we read to build a message; a server that sends megabytes of HTML does not
/// get them into our memory or logs.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// Largest JSON answer (declare, status) we accept. Real ones are well under a kilobyte; a bigger
/// one is a broken or hostile server, and reading it whole would put it in our memory.
pub const MAX_JSON_BODY: u64 = 1024 * 1024;
/// A body that is still arriving counts as progress for the stall guard only once per this many
/// bytes, so a server that drips a byte at a time is cut off like a silent one.
const PROGRESS_BYTES: u64 = 64 * 1024;
const UPLOAD_CHUNK: usize = 256 * 1024;

/// What the caller should do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry this job later, with backoff; counts as an attempt.
    Transient,
    /// The service asks us to slow down; wait at least this long. Not the job's fault.
    RateLimited(Option<Duration>),
    /// The service refuses this file; retrying will not help. The job fails.
    Rejected,
    /// The token is wrong for every file: pause all work.
    Auth,
    /// The service cannot be reached at all (refused, DNS, connect timeout): an outage, not the
    /// job's fault.
    Unreachable,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("cannot reach the API: {0}")]
    Unreachable(String),
    #[error("connection failed mid-request: {0}")]
    Transport(String),
    #[error("no progress for {0:?} (api.stall_timeout); request aborted")]
    Stalled(Duration),
    #[error("unexpected answer from the API: {0}")]
    Protocol(String),
    #[error("cannot read the recording: {0}")]
    Local(String),
    /// A 3xx. Never followed: the token would go with it, and a 201 from the other end would not
    /// mean the audio reached ElevateAI.
    #[error(
        "HTTP {status}: the API redirected to {to}; callferry never follows redirects (the token \
         goes only to api.base_url's host). If the API has moved, set api.base_url to its new address"
    )]
    Redirected { status: u16, to: String },
}

impl ApiError {
    pub fn class(&self) -> ErrorClass {
        match self {
            ApiError::Status {
                status,
                retry_after,
                ..
            } => match *status {
                401 | 403 => ErrorClass::Auth,
                429 => ErrorClass::RateLimited(*retry_after),
                400 | 404 | 405 | 413 | 415 | 422 => ErrorClass::Rejected,
                _ => ErrorClass::Transient,
            },
            // Not this job's fault: every request would be redirected the same way, like an outage.
            ApiError::Unreachable(_) | ApiError::Redirected { .. } => ErrorClass::Unreachable,
            ApiError::Transport(_) | ApiError::Stalled(_) | ApiError::Protocol(_) => {
                ErrorClass::Transient
            }
            ApiError::Local(_) => ErrorClass::Transient,
        }
    }

    /// The `outcome` label of `callferry_uploads_total` for this failure.
    pub fn outcome(&self) -> &'static str {
        use crate::metrics::outcome;
        match (self, self.class()) {
            (ApiError::Local(_), _) => outcome::LOCAL,
            (_, ErrorClass::Transient) => outcome::RETRY,
            (_, ErrorClass::Rejected) => outcome::REJECTED,
            (_, ErrorClass::Auth) => outcome::UNAUTHORIZED,
            (_, ErrorClass::RateLimited(_)) => outcome::RATE_LIMITED,
            (_, ErrorClass::Unreachable) => outcome::UNREACHABLE,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } | ApiError::Redirected { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The same error with every credential `r` knows taken out of its text.
    pub fn redacted(self, r: &Redactor) -> ApiError {
        if r.is_empty() {
            return self;
        }
        match self {
            ApiError::Status {
                status,
                message,
                retry_after,
            } => ApiError::Status {
                status,
                message: r.redact(&message),
                retry_after,
            },
            ApiError::Unreachable(m) => ApiError::Unreachable(r.redact(&m)),
            ApiError::Transport(m) => ApiError::Transport(r.redact(&m)),
            ApiError::Protocol(m) => ApiError::Protocol(r.redact(&m)),
            ApiError::Local(m) => ApiError::Local(r.redact(&m)),
            ApiError::Redirected { status, to } => ApiError::Redirected {
                status,
                to: r.redact(&to),
            },
            e @ ApiError::Stalled(_) => e,
        }
    }
}

/// A failure to read the recording while streaming it: ours, not the network's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LocalRead(std::io::Error);

/// The file-read failure behind a failed request, if that is what failed it.
fn local_read(e: &reqwest::Error) -> Option<&LocalRead> {
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<LocalRead>() {
            return Some(r);
        }
        src = s.source();
    }
    None
}

fn from_reqwest(e: reqwest::Error) -> ApiError {
    // reqwest's Display includes the URL, which is fine (no secrets in our URLs); the source chain
    // carries the useful part ("connection refused", "dns error").
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    if e.is_connect() {
        if msg.contains("invalid peer certificate") {
            // rustls's words for a chain that does not lead to a trusted root: say what to do.
            msg = format!(
                "the server's TLS certificate is not trusted ({msg}). callferry trusts the system's \
                 CA store, SSL_CERT_FILE and api.ca_file; add the CA that signed it to one of them"
            );
        }
        ApiError::Unreachable(msg)
    } else {
        ApiError::Transport(msg)
    }
}

/// The declare request body, as the public API documents it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeclareRequest {
    #[serde(rename = "type")]
    pub kind: String,
    pub language_tag: String,
    pub vertical: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio_transcription_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub include_ai_results: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_identifier: Option<String>,
    /// Only with `[declare] send_metadata` (accounts with Explore; others answer 400).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadOutcome {
    /// 201: stored now.
    Stored,
    /// 409: the interaction already has its audio (an earlier attempt got through).
    AlreadyThere,
}

impl UploadOutcome {
    pub fn status(self) -> u16 {
        match self {
            UploadOutcome::Stored => 201,
            UploadOutcome::AlreadyThere => 409,
        }
    }
}

/// `GET /interactions/{id}/status`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InteractionStatus {
    #[serde(default)]
    pub identifier: Option<String>,
    pub status: String,
    #[serde(default)]
    pub error_message: Option<String>,
}

/// A clock of "last progress", shared between a request's body stream and its stall guard.
struct Progress {
    origin: Instant,
    last_ms: AtomicU64,
    /// Set while the body waits for its turn on our own bandwidth cap (`upload.max_bytes_per_sec`).
    /// That wait is ours, not the server's: however long the cap makes it, it is not a stall.
    throttled: AtomicBool,
}

impl Progress {
    fn new() -> Arc<Self> {
        Arc::new(Progress {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            throttled: AtomicBool::new(false),
        })
    }
    fn touch(&self) {
        self.last_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::SeqCst);
    }
    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::SeqCst))
    }
    /// The stall clock restarts when the wait ends (`touch` before the flag drops, so the guard
    /// never sees "not throttled" with the clock from before the wait).
    fn set_throttled(&self, on: bool) {
        if !on {
            self.touch();
        }
        self.throttled.store(on, Ordering::SeqCst);
    }
    fn throttled(&self) -> bool {
        self.throttled.load(Ordering::SeqCst)
    }
    /// Whether no progress was made for `stall`, not counting time spent on our own cap.
    fn stalled(&self, stall: Duration, now: Instant) -> bool {
        !self.throttled() && self.last() + stall <= now
    }
}

#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    token: Arc<RwLock<Secret>>,
    stall: Duration,
    limiter: Option<Arc<RateLimiter>>,
    /// Bytes of audio sent, for metrics and benchmarks.
    pub bytes_sent: Arc<AtomicU64>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    pub fn new(cfg: &Config, token: Secret) -> Result<ApiClient, ApiError> {
        let mut builder = reqwest::Client::builder();
        // Trust: the system's store (or SSL_CERT_FILE / SSL_CERT_DIR, as curl and git read them)
        // and the built-in roots, both by reqwest's features; plus api.ca_file. There is no switch
        // to trust less: an unknown certificate is an error (see `from_reqwest`).
        if let Some(f) = &cfg.api.ca_file {
            for cert in
                crate::config::load_ca_file(f).map_err(|e| ApiError::Protocol(e.to_string()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .user_agent(concat!("callferry/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(cfg.api.connect_timeout)
            // No `read_timeout`: reqwest's runs from the start of the request to the response's
            // headers, so it aborted every upload that took longer than `stall_timeout` however
            // steadily its bytes went out. The stall guard (`guarded`) covers silent servers.
            // Redirects are answers, not instructions (see `ApiError::Redirected`).
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ApiError::Protocol(format!("cannot build the HTTP client: {e}")))?;
        let limiter = match cfg.upload.max_bytes_per_sec {
            0 => None,
            n => Some(Arc::new(RateLimiter::new(n as f64))),
        };
        Ok(ApiClient {
            http,
            base: cfg.api.base_url.clone(),
            token: Arc::new(RwLock::new(token)),
            stall: cfg.api.stall_timeout,
            limiter,
            bytes_sent: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A client for another account (a source with a token of its own): the same connections,
    /// bandwidth cap and byte count, its own token.
    pub fn for_account(&self, token: Secret) -> ApiClient {
        ApiClient {
            token: Arc::new(RwLock::new(token)),
            ..self.clone()
        }
    }

    /// Replaces the token (after the operator fixed the token file).
    pub fn set_token(&self, token: Secret) {
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = token;
    }

    /// Everything that must not appear in what the server says back: the token in use now and any
    /// credentials in `base_url`.
    fn redactor(&self) -> Redactor {
        let token = self.token.read().unwrap_or_else(|p| p.into_inner()).clone();
        Redactor::new()
            .with_token(&token)
            .with_url_credentials(&self.base)
    }

    fn scrub<T>(&self, r: Result<T, ApiError>) -> Result<T, ApiError> {
        r.map_err(|e| e.redacted(&self.redactor()))
    }

    fn url(&self, tail: &str) -> Url {
        let mut u = self.base.clone();
        let path = format!("{}/{}", u.path().trim_end_matches('/'), tail);
        u.set_path(&path);
        u
    }

    fn auth_headers(&self) -> HeaderMap {
        let token = self.token.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut h = HeaderMap::new();
        // A token with bytes that cannot be a header value is sent as nothing, which the service
        // answers with 401: the operator then sees "token rejected", not a crash.
        if let Ok(mut v) = HeaderValue::from_str(token.expose()) {
            v.set_sensitive(true);
            h.insert(TOKEN_HEADER, v);
        }
        h
    }

    /// Runs a request future, aborting it when `progress` has not moved for `stall_timeout`.
    async fn guarded<T>(
        &self,
        progress: &Progress,
        fut: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        tokio::pin!(fut);
        loop {
            // While throttled, look again a full stall period from now: the wait may last longer.
            let since = if progress.throttled() {
                Instant::now()
            } else {
                progress.last()
            };
            tokio::select! {
                r = &mut fut => return r,
                _ = tokio::time::sleep_until((since + self.stall).into()) => {
                    if progress.stalled(self.stall, Instant::now()) {
                        return Err(ApiError::Stalled(self.stall));
                    }
                }
            }
        }
    }

    /// `POST /interactions`. Returns the interaction id.
    pub async fn declare(&self, req: &DeclareRequest) -> Result<String, ApiError> {
        let progress = Progress::new();
        progress.touch();
        let url = self.url("interactions");
        let r = self.guarded(&progress, async {
            let resp = self
                .http
                .post(url)
                .headers(self.auth_headers())
                .json(req)
                .send()
                .await
                .map_err(from_reqwest)?;
            let status = resp.status();
            if !status.is_success() {
                return Err(error_from_response(resp, &self.redactor()).await);
            }
            let body = read_capped(resp, MAX_JSON_BODY, &progress, "the declare").await?;
            let body = self.redactor().redact_bytes(&body);
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Declared {
                interaction_identifier: Option<String>,
            }
            let parsed: Declared = serde_json::from_slice(&body).map_err(|e| {
                ApiError::Protocol(format!(
                    "declare answered {status} with a body that is not the expected JSON ({e}): {}",
                    snippet(&body)
                ))
            })?;
            match parsed.interaction_identifier {
                // An id is stored, logged and put into URLs: one that quotes our token is no id.
                Some(id) if valid_id(&id) && !self.redactor().finds(&id) => {
                    if status != StatusCode::CREATED {
                        tracing::warn!(%status, "declare answered {status} instead of 201 Created; using the interaction id it returned");
                    }
                    Ok(id)
                }
                Some(id) => Err(ApiError::Protocol(format!(
                    "declare answered {status} with an unusable interaction id {:?}",
                    self.redactor()
                        .redact(&id)
                        .chars()
                        .take(80)
                        .collect::<String>()
                ))),
                None => Err(ApiError::Protocol(format!(
                    "declare answered {status} without an interactionIdentifier: {}",
                    snippet(&body)
                ))),
            }
        })
        .await;
        self.scrub(r)
    }

    /// `POST /interactions/{id}/upload`: streams exactly `size` bytes of `path` as the single
    /// multipart part, whose field name and filename are the file's base name. Memory use does not
    /// depend on the file's size.
    pub async fn upload(
        &self,
        id: &str,
        path: &Path,
        size: u64,
    ) -> Result<UploadOutcome, ApiError> {
        if path.file_name().is_none() {
            return Err(ApiError::Local(format!(
                "{} has no file name",
                path.display()
            )));
        }
        let name = crate::worker::wire_name(path);
        let file = std::fs::File::open(path)
            .map_err(|e| ApiError::Local(format!("{}: {e}", path.display())))?;
        self.upload_file(id, file, &name, path, size).await
    }

    /// As [`ApiClient::upload`], from a descriptor the caller opened (and checked) itself; `name`
    /// is what the service is told the file is called, `path` only names it in errors.
    pub async fn upload_file(
        &self,
        id: &str,
        file: std::fs::File,
        name: &str,
        path: &Path,
        size: u64,
    ) -> Result<UploadOutcome, ApiError> {
        let name = name.to_string();
        let progress = Progress::new();
        progress.touch();
        let prog = progress.clone();
        let limiter = self.limiter.clone();
        let sent = self.bytes_sent.clone();
        // Exactly the version that was found complete, even if the recorder has since appended to
        // it; a shorter file fails the request instead.
        let reader = crate::filestream::FileChunks::new(file, size, UPLOAD_CHUNK);
        let stream = reader.then(move |chunk| {
            let prog = prog.clone();
            let limiter = limiter.clone();
            let sent = sent.clone();
            async move {
                let chunk = chunk.map_err(LocalRead)?;
                if let Some(l) = &limiter {
                    prog.set_throttled(true);
                    l.acquire(chunk.len() as u64).await;
                    prog.set_throttled(false);
                }
                prog.touch();
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                Ok::<_, LocalRead>(chunk)
            }
        });
        let part =
            reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), size)
                .file_name(name.clone())
                .mime_str("application/octet-stream")
                .map_err(|e| ApiError::Protocol(e.to_string()))?;
        // Names as browsers send them: raw UTF-8 in quotes. reqwest's default percent-encodes a
        // non-ASCII field name into `name*=utf-8''...`, which leaves the plain `name` empty, so a
        // recording called "José.wav" was refused (400) as having no field name. The caller's
        // name has no quotes, backslashes or control characters (see `worker::wire_name`).
        let form = reqwest::multipart::Form::new()
            .percent_encode_noop()
            .part(name, part);
        let url = self.url(&format!("interactions/{id}/upload"));
        let r = self.guarded(&progress, async {
            let resp = self
                .http
                .post(url)
                .headers(self.auth_headers())
                .multipart(form)
                .send()
                .await
                .map_err(|e| {
                    // A failure to read the file surfaces as a body error: say it is local.
                    match local_read(&e) {
                        Some(r) => ApiError::Local(format!("{}: {r}", path.display())),
                        None => from_reqwest(e),
                    }
                })?;
            let status = resp.status();
            match status {
                StatusCode::CREATED => Ok(UploadOutcome::Stored),
                StatusCode::CONFLICT => Ok(UploadOutcome::AlreadyThere),
                s if s.is_success() => Err(ApiError::Protocol(format!(
                    "upload answered {s} instead of 201 Created; retrying to confirm (a 409 will prove it stored)"
                ))),
                // Only a 201 or 409 to this very request counts; a 3xx is an error here.
                _ => Err(error_from_response(resp, &self.redactor()).await),
            }
        })
        .await;
        self.scrub(r)
    }

    /// `GET /interactions/{id}/status`.
    pub async fn status(&self, id: &str) -> Result<InteractionStatus, ApiError> {
        let body = self.get_json(&format!("interactions/{id}/status")).await?;
        let st: InteractionStatus = serde_json::from_slice(&body).map_err(|e| {
            ApiError::Protocol(format!(
                "status answer is not the expected JSON ({e}): {}",
                snippet(&self.redactor().redact_bytes(&body))
            ))
            .redacted(&self.redactor())
        })?;
        // Every field is the server's text, and all of it is stored or logged.
        let r = self.redactor();
        Ok(InteractionStatus {
            identifier: st.identifier.map(|s| r.redact(&s)),
            status: r.redact(&st.status),
            error_message: st.error_message.map(|s| r.redact(&s)),
        })
    }

    /// A GET returning a JSON body of at most [`MAX_JSON_BODY`] bytes.
    pub async fn get_json(&self, tail: &str) -> Result<bytes::Bytes, ApiError> {
        let progress = Progress::new();
        progress.touch();
        let url = self.url(tail);
        let r = self
            .guarded(&progress, async {
                let resp = self.send_get(url).await?;
                let body = read_capped(resp, MAX_JSON_BODY, &progress, tail).await?;
                if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
                    return Err(ApiError::Protocol(format!(
                        "{tail} answered with a body that is not JSON: {}",
                        snippet(&self.redactor().redact_bytes(&body))
                    )));
                }
                Ok(bytes::Bytes::from(body))
            })
            .await;
        self.scrub(r)
    }

    /// A GET whose body is written to `out` as it arrives, up to `cap` bytes: memory does not grow
    /// with the answer. Returns the number of bytes written (flushed to the file, not synced). The
    /// caller checks what it got.
    pub async fn get_to_file(
        &self,
        tail: &str,
        out: &mut tokio::fs::File,
        cap: u64,
    ) -> Result<u64, ApiError> {
        use tokio::io::AsyncWriteExt;
        let progress = Progress::new();
        progress.touch();
        let url = self.url(tail);
        let r = self
            .guarded(&progress, async {
                let mut resp = self.send_get(url).await?;
                let mut meter = BodyMeter::new(cap, &progress, tail);
                while let Some(chunk) = resp.chunk().await.map_err(from_reqwest)? {
                    meter.add(chunk.len())?;
                    out.write_all(&chunk).await.map_err(|e| {
                        ApiError::Local(format!("cannot write the {tail} answer: {e}"))
                    })?;
                }
                // tokio's file writes in the background: an error shows here, not at drop.
                out.flush()
                    .await
                    .map_err(|e| ApiError::Local(format!("cannot write the {tail} answer: {e}")))?;
                Ok(meter.total)
            })
            .await;
        self.scrub(r)
    }

    async fn send_get(&self, url: Url) -> Result<reqwest::Response, ApiError> {
        let resp = self
            .http
            .get(url)
            .headers(self.auth_headers())
            .send()
            .await
            .map_err(from_reqwest)?;
        if !resp.status().is_success() {
            return Err(error_from_response(resp, &self.redactor()).await);
        }
        Ok(resp)
    }

    /// `DELETE /interactions/{id}`: the interaction and its results go at the service. `Ok(true)`:
    /// deleted now; `Ok(false)`: the service does not know it (404), which for a delete means
    /// done already (an earlier delete whose answer was lost, or the 45-day retention).
    pub async fn delete_interaction(&self, id: &str) -> Result<bool, ApiError> {
        if !valid_id(id) {
            return Err(ApiError::Protocol(format!(
                "refusing to delete an interaction with an unusable id {:?}",
                id.chars().take(80).collect::<String>()
            )));
        }
        let progress = Progress::new();
        progress.touch();
        let url = self.url(&format!("interactions/{id}"));
        let r = self
            .guarded(&progress, async {
                let resp = self
                    .http
                    .delete(url)
                    .headers(self.auth_headers())
                    .send()
                    .await
                    .map_err(from_reqwest)?;
                match resp.status() {
                    s if s.is_success() => Ok(true),
                    StatusCode::NOT_FOUND => Ok(false),
                    _ => Err(error_from_response(resp, &self.redactor()).await),
                }
            })
            .await;
        self.scrub(r)
    }

    /// A cheap authenticated call to learn whether the token is accepted now: the status of an
    /// interaction that cannot exist. 401/403 means no; any other answer means the token passed.
    pub async fn probe_auth(&self) -> Result<(), ApiError> {
        match self.status("00000000-0000-0000-0000-000000000000").await {
            Ok(_) => Ok(()),
            Err(e) if e.class() == ErrorClass::Auth => Err(e),
            // A redirect says nothing about the token: `check-config --online` must not report
            // "accepts the token" for a base_url that points somewhere else.
            Err(
                e @ (ApiError::Unreachable(_)
                | ApiError::Transport(_)
                | ApiError::Stalled(_)
                | ApiError::Redirected { .. }),
            ) => Err(e),
            Err(_) => Ok(()),
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Counts a body's bytes against its cap, and lets a body that keeps arriving count as progress.
struct BodyMeter<'a> {
    cap: u64,
    total: u64,
    progress: &'a Progress,
    what: &'a str,
}

impl<'a> BodyMeter<'a> {
    fn new(cap: u64, progress: &'a Progress, what: &'a str) -> Self {
        BodyMeter {
            cap,
            total: 0,
            progress,
            what,
        }
    }

    fn add(&mut self, n: usize) -> Result<(), ApiError> {
        let before = self.total;
        self.total += n as u64;
        if self.total > self.cap {
            // Counted against the job like any other lie: a server that does this once may not
            // do it again, and one that always does fails the job with this reason.
            return Err(ApiError::Protocol(format!(
                "the answer to {} is larger than the {} bytes allowed; not read further",
                self.what, self.cap
            )));
        }
        if self.total / PROGRESS_BYTES > before / PROGRESS_BYTES {
            self.progress.touch();
        }
        Ok(())
    }
}

/// Reads a whole body of at most `cap` bytes; a longer one is an error, not a truncation.
async fn read_capped(
    mut resp: reqwest::Response,
    cap: u64,
    progress: &Progress,
    what: &str,
) -> Result<Vec<u8>, ApiError> {
    let mut meter = BodyMeter::new(cap, progress, what);
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(from_reqwest)? {
        meter.add(chunk.len())?;
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The first [`MAX_ERROR_BODY`] bytes of an error body: enough to explain it, and the rest is
/// never read.
async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(from_reqwest)? {
        let room = MAX_ERROR_BODY.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    Ok(out)
}

/// Builds an error from a non-success answer: the service's own `message` if it sent JSON, the
/// title of an HTML error page (a proxy's), or the start of whatever else it sent. This is where
/// server text enters: it leaves with no credential `r` knows in it.
async fn error_from_response(resp: reqwest::Response, r: &Redactor) -> ApiError {
    let status = resp.status();
    if status.is_redirection() {
        // Only the target's origin is named: its path and query are the server's to fill.
        let to = match resp.headers().get(LOCATION).map(|v| v.to_str()) {
            None => "nowhere (no Location header)".to_string(),
            Some(Err(_)) => "an unreadable Location".to_string(),
            Some(Ok(l)) => match resp.url().join(l) {
                Ok(u) if u.host_str().is_some() => u.origin().ascii_serialization(),
                _ => "an unusable Location".to_string(),
            },
        };
        return ApiError::Redirected {
            status: status.as_u16(),
            to,
        }
        .redacted(r);
    }
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| crate::retry::parse_retry_after(v, SystemTime::now()));
    let is_html = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("html"));
    let body = match read_limited(resp).await {
        Ok(b) => r.redact_bytes(&b),
        Err(e) => return e.redacted(r),
    };
    let reason = status.canonical_reason().unwrap_or("");
    let detail = describe_body(&body, is_html);
    ApiError::Status {
        status: status.as_u16(),
        message: if detail.is_empty() {
            reason.to_string()
        } else {
            format!("{reason}: {detail}")
        },
        retry_after,
    }
    .redacted(r)
}

fn describe_body(body: &[u8], is_html: bool) -> String {
    if body.is_empty() {
        return String::new();
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        for key in ["message", "errorMessage", "error", "title", "detail"] {
            if let Some(s) = v.get(key).and_then(|m| m.as_str()) {
                return s.chars().take(300).collect();
            }
        }
        return snippet(body);
    }
    let text = String::from_utf8_lossy(body);
    if is_html || text.trim_start().starts_with('<') {
        let lower = text.to_ascii_lowercase();
        if let (Some(a), Some(b)) = (lower.find("<title>"), lower.find("</title>"))
            && b > a + 7
        {
            return format!("HTML error page \"{}\"", text[a + 7..b].trim());
        }
        return format!("HTML error page ({} bytes)", body.len());
    }
    snippet(body)
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let s: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    if s.is_empty() {
        format!("({} bytes)", body.len())
    } else {
        format!("{s:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let st = |s| ApiError::Status {
            status: s,
            message: String::new(),
            retry_after: None,
        };
        assert_eq!(st(401).class(), ErrorClass::Auth);
        assert_eq!(st(400).class(), ErrorClass::Rejected);
        assert_eq!(st(413).class(), ErrorClass::Rejected);
        assert_eq!(st(503).class(), ErrorClass::Transient);
        assert_eq!(st(429).class(), ErrorClass::RateLimited(None));
        assert_eq!(
            ApiError::Unreachable("refused".into()).class(),
            ErrorClass::Unreachable
        );
        assert_eq!(
            ApiError::Transport("reset".into()).class(),
            ErrorClass::Transient
        );
    }

    #[test]
    fn bodies_are_described_for_people() {
        assert_eq!(
            describe_body(br#"{"message":"File too large"}"#, false),
            "File too large"
        );
        assert_eq!(
            describe_body(
                b"<html><head><title>502 Bad Gateway</title></head></html>",
                true
            ),
            "HTML error page \"502 Bad Gateway\""
        );
        assert_eq!(describe_body(b"", false), "");
        assert!(describe_body(b"oops\x00\x01", false).contains("oops"));
    }

    #[test]
    fn time_spent_on_our_own_cap_is_not_a_stall() {
        let stall = Duration::from_secs(1);
        let p = Progress::new();
        p.touch();
        let later = Instant::now() + Duration::from_secs(10);
        assert!(p.stalled(stall, later));
        p.set_throttled(true);
        assert!(
            !p.stalled(stall, later),
            "waiting on the cap is not a stall"
        );
        p.set_throttled(false);
        assert!(
            !p.stalled(stall, Instant::now()),
            "the clock restarts after the wait"
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("4b1b2f5e-0000-4000-8000-000000000001"));
        assert!(!valid_id(""));
        assert!(!valid_id("../../etc/passwd"));
        assert!(!valid_id("a b"));
    }
}
