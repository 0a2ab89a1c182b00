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
//!
//! The parts: this file is the client and its requests; [`error`] is what a failure is and what to
//! do about it; [`body`] reads answers under their caps and keeps the stall guard's clock.

mod body;
mod error;
#[cfg(test)]
mod tests;

pub use error::{ApiError, ErrorClass};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::ratelimit::RateLimiter;
use crate::secret::{Redactor, Secret};

use body::{BodyMeter, Progress, error_from_response, read_capped, snippet};
use error::{LocalRead, from_reqwest, local_read};

const TOKEN_HEADER: &str = "X-API-Token";
/// Largest JSON answer (declare, status) we accept. Real ones are well under a kilobyte; a bigger
/// one is a broken or hostile server, and reading it whole would put it in our memory.
pub const MAX_JSON_BODY: u64 = 1024 * 1024;
const UPLOAD_CHUNK: usize = 256 * 1024;

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
        let name = wire_name(path);
        let file = std::fs::File::open(path)
            .map_err(|e| ApiError::Local(format!("{}: {e}", path.display())))?;
        self.upload_file(id, file, &name, path, size, None).await
    }

    /// As [`ApiClient::upload`], from a descriptor the caller opened (and checked) itself; `name`
    /// is what the service is told the file is called, `path` only names it in errors. With
    /// `version_mtime`, only that version of the file is sent ([`FileChunks::of_version`]).
    ///
    /// [`FileChunks::of_version`]: crate::filestream::FileChunks::of_version
    pub async fn upload_file(
        &self,
        id: &str,
        file: std::fs::File,
        name: &str,
        path: &Path,
        size: u64,
        version_mtime: Option<i64>,
    ) -> Result<UploadOutcome, ApiError> {
        let name = name.to_string();
        let progress = Progress::new();
        progress.touch();
        let prog = progress.clone();
        let limiter = self.limiter.clone();
        let sent = self.bytes_sent.clone();
        // Exactly the version that was found complete, even if the recorder has since appended to
        // it; a shorter file fails the request instead.
        let mut reader = crate::filestream::FileChunks::new(file, size, UPLOAD_CHUNK);
        if let Some(m) = version_mtime {
            reader = reader.of_version(m);
        }
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
        // name has no quotes, backslashes or control characters (see [`wire_name`]).
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

/// The file's name as the service is told it (form field name and filename): bytes that are not
/// UTF-8 as U+FFFD, and the characters that would break out of a quoted multipart header value
/// (quotes, backslashes, control characters) as `_`.
pub fn wire_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}
