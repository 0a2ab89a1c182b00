//! Mutable state of the fake, shared by the HTTP handlers and the `FakeApi` handle.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::{
    Counters, Endpoint, FakeOptions, Fault, InteractionRecord, RandomFaults, UploadRecord,
};

pub(super) struct Shared {
    state: Mutex<State>,
    // Kept outside the mutex because it is bumped once per body chunk of
    // uploads that may be a gigabyte long.
    bytes_received: AtomicU64,
    /// Connections that carried `/v1` requests, and their TLS handshakes by kind: how a
    /// benchmark sees whether a client reuses its connections and TLS sessions.
    pub connections: AtomicU64,
    pub tls_full_handshakes: AtomicU64,
    pub tls_resumed_handshakes: AtomicU64,
}

pub(super) struct State {
    pub token: String,
    /// Tokens of other accounts the fake also accepts (a multi-tenant host's sources).
    pub other_tokens: Vec<String>,
    pub latency: Duration,
    pub upload_rate: Option<u64>,
    pub processing_time: Duration,
    pub max_upload_bytes: Option<u64>,
    /// The account has the Explore feature: declares may carry `metadata` (else 400, as the
    /// service answers).
    pub explore: bool,
    faults: HashMap<Endpoint, VecDeque<Fault>>,
    random: Option<(RandomFaults, StdRng)>,
    next_seq: u64,
    pub interactions: HashMap<String, Interaction>,
    /// Ids of interactions deleted through the API, in order.
    pub deleted: Vec<String>,
    pub counters: Counters,
}

pub(super) struct Interaction {
    seq: u64,
    pub id: String,
    pub declare_body: serde_json::Value,
    pub include_ai: bool,
    declared_at: SystemTime,
    /// Wall-clock time for the status document, monotonic time for the
    /// processing clock (so a wall-clock jump cannot un-process a call).
    uploaded_at: Option<(SystemTime, Instant)>,
    pub uploads: Vec<UploadRecord>,
    forced: Option<Forced>,
    /// The token its declare came with: the account it belongs to.
    pub account: String,
}

struct Forced {
    status: String,
    error_message: Option<String>,
    at: SystemTime,
}

/// What `GET /status` reports at one instant.
pub(super) struct StatusView {
    pub status: String,
    pub declared: SystemTime,
    pub uploaded: Option<SystemTime>,
    pub processed: Option<SystemTime>,
    pub error_message: Option<String>,
}

impl Interaction {
    pub fn has_audio(&self) -> bool {
        self.uploaded_at.is_some()
    }

    pub fn store_audio(&mut self) {
        self.uploaded_at = Some((SystemTime::now(), Instant::now()));
    }

    pub fn view(&self, processing_time: Duration) -> StatusView {
        let uploaded = self.uploaded_at.map(|(wall, _)| wall);
        if let Some(f) = &self.forced {
            return StatusView {
                status: f.status.clone(),
                declared: self.declared_at,
                uploaded,
                processed: (f.status == "processed").then_some(f.at),
                error_message: f.error_message.clone(),
            };
        }
        let (status, processed) = match self.uploaded_at {
            None => ("declared", None),
            Some((wall, mono)) => {
                let elapsed = mono.elapsed();
                if elapsed >= processing_time {
                    ("processed", Some(wall + processing_time))
                } else if elapsed < processing_time / 2 {
                    ("fileUploaded", None)
                } else {
                    ("processing", None)
                }
            }
        };
        StatusView {
            status: status.to_owned(),
            declared: self.declared_at,
            uploaded,
            processed,
            error_message: None,
        }
    }
}

impl Shared {
    pub fn new(opts: FakeOptions) -> Shared {
        Shared {
            state: Mutex::new(State {
                token: opts.token,
                other_tokens: Vec::new(),
                latency: opts.latency,
                upload_rate: None,
                processing_time: opts.processing_time,
                max_upload_bytes: opts.max_upload_bytes,
                explore: false,
                faults: HashMap::new(),
                random: None,
                next_seq: 0,
                interactions: HashMap::new(),
                deleted: Vec::new(),
                counters: Counters::default(),
            }),
            bytes_received: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            tls_full_handshakes: AtomicU64::new(0),
            tls_resumed_handshakes: AtomicU64::new(0),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not wedge every later request.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add_bytes(&self, n: u64) {
        self.bytes_received.fetch_add(n, Ordering::Relaxed);
    }

    pub fn counters(&self) -> Counters {
        let mut c = self.lock().counters.clone();
        c.bytes_received = self.bytes_received.load(Ordering::Relaxed);
        c.connections = self.connections.load(Ordering::Relaxed);
        c.tls_full_handshakes = self.tls_full_handshakes.load(Ordering::Relaxed);
        c.tls_resumed_handshakes = self.tls_resumed_handshakes.load(Ordering::Relaxed);
        c
    }

    pub fn interactions(&self) -> Vec<InteractionRecord> {
        let st = self.lock();
        let mut all: Vec<&Interaction> = st.interactions.values().collect();
        all.sort_by_key(|i| i.seq);
        all.into_iter()
            .map(|i| InteractionRecord {
                id: i.id.clone(),
                declare_body: i.declare_body.clone(),
                uploads: i.uploads.clone(),
                status: i.view(st.processing_time).status,
                declared_at_ms: unix_ms(i.declared_at),
                account: i.account.clone(),
                stored_at_ms: i.uploaded_at.map(|(wall, _)| unix_ms(wall)),
            })
            .collect()
    }

    pub fn push_fault(&self, endpoint: Endpoint, fault: Fault) {
        self.lock()
            .faults
            .entry(endpoint)
            .or_default()
            .push_back(fault);
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn set_random_faults(&self, f: RandomFaults) {
        let rng = StdRng::seed_from_u64(f.seed);
        self.lock().random = Some((f, rng));
    }

    /// Creates `n` interactions that already have their audio, without HTTP (benchmarks of the
    /// results follower need many).
    pub fn seed_uploaded(&self, n: usize) -> Vec<String> {
        let mut st = self.lock();
        (0..n)
            .map(|_| {
                let id = st.declare(serde_json::json!({"type": "audio", "seeded": true}), false);
                if let Some(i) = st.interactions.get_mut(&id) {
                    i.store_audio();
                }
                id
            })
            .collect()
    }

    pub fn force_status(&self, id: &str, status: &str, error_message: Option<&str>) {
        if let Some(i) = self.lock().interactions.get_mut(id) {
            i.forced = Some(Forced {
                status: status.to_owned(),
                error_message: error_message.map(str::to_owned),
                at: SystemTime::now(),
            });
        }
    }
}

impl State {
    pub fn token_ok(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| p == self.token || self.other_tokens.iter().any(|t| t == p))
    }

    /// The fault for the request being handled now: scripted ones first,
    /// then a draw from the seeded generator.
    pub fn take_fault(&mut self, endpoint: Endpoint) -> Option<Fault> {
        let fault = self
            .faults
            .get_mut(&endpoint)
            .and_then(VecDeque::pop_front)
            .or_else(|| self.random_fault(endpoint));
        if fault.is_some() {
            self.counters.faults_injected += 1;
        }
        fault
    }

    fn random_fault(&mut self, endpoint: Endpoint) -> Option<Fault> {
        if !matches!(endpoint, Endpoint::Declare | Endpoint::Upload) {
            return None;
        }
        let (cfg, rng) = self.random.as_mut()?;
        let r: f64 = rng.random();
        let mut edge = cfg.p_5xx;
        if r < edge {
            const CODES: [u16; 4] = [500, 502, 503, 504];
            return Some(Fault::Status(CODES[rng.random_range(0..CODES.len())]));
        }
        edge += cfg.p_429;
        if r < edge {
            // No Retry-After: a benchmark client honouring a whole second per
            // 429 would measure the header, not its own retry logic.
            return Some(Fault::TooManyRequests {
                retry_after_secs: None,
            });
        }
        edge += cfg.p_reset_before_store;
        if r < edge {
            return Some(Fault::ResetBeforeStore);
        }
        if endpoint == Endpoint::Upload && r < edge + cfg.p_reset_after_store {
            return Some(Fault::ResetAfterStore);
        }
        None
    }

    pub fn declare(&mut self, declare_body: serde_json::Value, include_ai: bool) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.interactions.insert(
            id.clone(),
            Interaction {
                seq,
                id: id.clone(),
                declare_body,
                include_ai,
                declared_at: SystemTime::now(),
                uploaded_at: None,
                uploads: Vec::new(),
                forced: None,
                account: String::new(),
            },
        );
        id
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// RFC 3339 / ISO 8601 UTC with microseconds, the precision ElevateAI uses.
pub(super) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        d.subsec_micros()
    )
}

/// Howard Hinnant's days-to-civil conversion; avoids pulling a date crate
/// into the build for one timestamp format.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
