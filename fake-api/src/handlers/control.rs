//! The unauthenticated `/_fake` control routes: what the fake recorded (interactions, deletes,
//! counters), and what the tests set (faults, latency, the token, the processing time, the upload
//! rate, a forced status).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use crate::{Counters, Endpoint, Fault, InteractionRecord, RandomFaults};

use super::*;

pub(super) async fn ctl_interactions(State(sh): State<Sh>) -> Json<Vec<InteractionRecord>> {
    Json(sh.interactions())
}

pub(super) async fn ctl_deleted(State(sh): State<Sh>) -> Json<Vec<String>> {
    Json(sh.lock().deleted.clone())
}

pub(super) async fn ctl_counters(State(sh): State<Sh>) -> Json<Counters> {
    Json(sh.counters())
}

pub(super) async fn ctl_random_faults(
    State(sh): State<Sh>,
    Json(f): Json<RandomFaults>,
) -> StatusCode {
    sh.set_random_faults(f);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
pub(super) struct PushFault {
    endpoint: Endpoint,
    fault: Fault,
}

pub(super) async fn ctl_push_fault(State(sh): State<Sh>, Json(p): Json<PushFault>) -> StatusCode {
    sh.push_fault(p.endpoint, p.fault);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
pub(super) struct Millis {
    ms: u64,
}

pub(super) async fn ctl_latency(State(sh): State<Sh>, Json(m): Json<Millis>) -> StatusCode {
    sh.lock().latency = Duration::from_millis(m.ms);
    StatusCode::NO_CONTENT
}

pub(super) async fn ctl_processing_time(State(sh): State<Sh>, Json(m): Json<Millis>) -> StatusCode {
    sh.lock().processing_time = Duration::from_millis(m.ms);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
pub(super) struct Token {
    token: String,
}

pub(super) async fn ctl_token(State(sh): State<Sh>, Json(t): Json<Token>) -> StatusCode {
    sh.lock().token = t.token;
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
pub(super) struct UploadRate {
    bytes_per_sec: Option<u64>,
}

pub(super) async fn ctl_upload_rate(State(sh): State<Sh>, Json(r): Json<UploadRate>) -> StatusCode {
    sh.lock().upload_rate = r.bytes_per_sec;
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
pub(super) struct ForceStatus {
    id: String,
    status: String,
    #[serde(default)]
    error_message: Option<String>,
}

pub(super) async fn ctl_force_status(
    State(sh): State<Sh>,
    Json(f): Json<ForceStatus>,
) -> StatusCode {
    sh.force_status(&f.id, &f.status, f.error_message.as_deref());
    StatusCode::NO_CONTENT
}
