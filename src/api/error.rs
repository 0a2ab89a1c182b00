//! What a failed request is ([`ApiError`]) and what the caller should do about it
//! ([`ErrorClass`]).
use std::time::Duration;

use crate::secret::Redactor;

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
pub(super) struct LocalRead(pub(super) std::io::Error);

/// The file-read failure behind a failed request, if that is what failed it.
pub(super) fn local_read(e: &reqwest::Error) -> Option<&LocalRead> {
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<LocalRead>() {
            return Some(r);
        }
        src = s.source();
    }
    None
}

pub(super) fn from_reqwest(e: reqwest::Error) -> ApiError {
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
