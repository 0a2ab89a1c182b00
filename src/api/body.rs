//! Reading the server's answers without trusting them: every body under a cap, an error body
//! turned into a short redacted message, and the clock the stall guard reads.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{LOCATION, RETRY_AFTER};

use crate::secret::Redactor;

use super::error::{ApiError, from_reqwest};

/// Largest error body we read to build a message; a server that sends megabytes of HTML does not
/// get them into our memory or logs.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// A body that is still arriving counts as progress for the stall guard only once per this many
/// bytes, so a server that drips a byte at a time is cut off like a silent one.
const PROGRESS_BYTES: u64 = 64 * 1024;

/// A clock of "last progress", shared between a request's body stream and its stall guard.
pub(super) struct Progress {
    origin: Instant,
    last_ms: AtomicU64,
    /// Set while the body waits for its turn on our own bandwidth cap (`upload.max_bytes_per_sec`).
    /// That wait is ours, not the server's: however long the cap makes it, it is not a stall.
    throttled: AtomicBool,
}

impl Progress {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Progress {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            throttled: AtomicBool::new(false),
        })
    }
    pub(super) fn touch(&self) {
        self.last_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::SeqCst);
    }
    pub(super) fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::SeqCst))
    }
    /// The stall clock restarts when the wait ends (`touch` before the flag drops, so the guard
    /// never sees "not throttled" with the clock from before the wait).
    pub(super) fn set_throttled(&self, on: bool) {
        if !on {
            self.touch();
        }
        self.throttled.store(on, Ordering::SeqCst);
    }
    pub(super) fn throttled(&self) -> bool {
        self.throttled.load(Ordering::SeqCst)
    }
    /// Whether no progress was made for `stall`, not counting time spent on our own cap.
    pub(super) fn stalled(&self, stall: Duration, now: Instant) -> bool {
        !self.throttled() && self.last() + stall <= now
    }
}

/// Counts a body's bytes against its cap, and lets a body that keeps arriving count as progress.
pub(super) struct BodyMeter<'a> {
    cap: u64,
    pub(super) total: u64,
    progress: &'a Progress,
    what: &'a str,
}

impl<'a> BodyMeter<'a> {
    pub(super) fn new(cap: u64, progress: &'a Progress, what: &'a str) -> Self {
        BodyMeter {
            cap,
            total: 0,
            progress,
            what,
        }
    }

    pub(super) fn add(&mut self, n: usize) -> Result<(), ApiError> {
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
pub(super) async fn read_capped(
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
pub(super) async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, ApiError> {
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
pub(super) async fn error_from_response(resp: reqwest::Response, r: &Redactor) -> ApiError {
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

pub(super) fn describe_body(body: &[u8], is_html: bool) -> String {
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

pub(super) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let s: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    if s.is_empty() {
        format!("({} bytes)", body.len())
    } else {
        format!("{s:?}")
    }
}
