//! The axum router: the faked `/v1` API and the unauthenticated `/_fake`
//! control routes. This file holds the router and what every endpoint does
//! first (the token, the counters, the fault picked for the request); the
//! endpoints are grouped by what they serve: `ingest` (declare, upload),
//! `results` (status, result documents, delete), `faults` (how a fault shapes
//! an answer) and `control` (the `/_fake` routes).

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;

use super::state::Shared;
use super::{Endpoint, Fault};

mod control;
mod faults;
mod ingest;
mod results;

use control::{
    ctl_counters, ctl_deleted, ctl_force_status, ctl_interactions, ctl_latency,
    ctl_processing_time, ctl_push_fault, ctl_random_faults, ctl_token, ctl_upload_rate,
};
use faults::{answer, answered_code, refusal};
use ingest::{declare, upload};
use results::{ai_results, punctuated, remove, status, transcript};

pub(super) type Sh = Arc<Shared>;

pub(super) fn router(shared: Sh) -> Router {
    let v1 = Router::new()
        .route("/interactions", post(declare))
        .route("/interactions/{id}", delete(remove))
        .route("/interactions/{id}/upload", post(upload))
        .route("/interactions/{id}/status", get(status))
        .route("/interactions/{id}/transcript", get(transcript))
        .route("/interactions/{id}/transcripts/punctuated", get(punctuated))
        .route("/interactions/{id}/ai", get(ai_results))
        .fallback(unknown_route)
        .layer(middleware::from_fn_with_state(shared.clone(), api_prelude));
    let control = Router::new()
        .route("/interactions", get(ctl_interactions))
        .route("/counters", get(ctl_counters))
        .route("/deleted", get(ctl_deleted))
        .route("/faults", post(ctl_random_faults))
        .route("/fault", post(ctl_push_fault))
        .route("/latency", post(ctl_latency))
        .route("/token", post(ctl_token))
        .route("/processing_time", post(ctl_processing_time))
        .route("/upload_rate", post(ctl_upload_rate))
        .route("/status", post(ctl_force_status));
    Router::new()
        .nest("/v1", v1)
        .nest("/_fake", control)
        // Uploads are streamed and may be a gigabyte; the multipart extractor
        // would otherwise stop at axum's 2 MB default.
        .layer(DefaultBodyLimit::disable())
        .with_state(shared)
}

pub(super) fn json_error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "message": message.into() }))).into_response()
}

pub(super) fn unknown_interaction(id: &str) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        format!("interaction {id} was not found"),
    )
}

pub(super) async fn unknown_route() -> Response {
    json_error(StatusCode::NOT_FOUND, "no such route")
}

pub(super) async fn api_prelude(State(sh): State<Sh>, req: Request, next: Next) -> Response {
    let latency = {
        let mut st = sh.lock();
        st.counters.requests += 1;
        st.latency
    };
    super::timer::sleep_precisely(latency).await;
    next.run(req).await
}

/// A request without the right token.
pub(super) struct Unauthorized(&'static str);

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        json_error(StatusCode::UNAUTHORIZED, self.0)
    }
}

/// Authenticates, counts, and picks the fault (if any) for this request.
pub(super) fn gate(
    sh: &Shared,
    headers: &HeaderMap,
    endpoint: Option<Endpoint>,
) -> Result<Option<Fault>, Unauthorized> {
    let presented = headers.get("x-api-token").and_then(|v| v.to_str().ok());
    let mut st = sh.lock();
    if !st.token_ok(presented) {
        st.counters.unauthorized += 1;
        return Err(Unauthorized(match presented {
            None => "missing X-API-Token header",
            Some(_) => "invalid API token",
        }));
    }
    match endpoint {
        Some(Endpoint::Declare) => st.counters.declares += 1,
        Some(Endpoint::Status) => st.counters.status_polls += 1,
        Some(Endpoint::Results) => st.counters.result_fetches += 1,
        Some(Endpoint::Delete) => st.counters.deletes += 1,
        Some(Endpoint::Upload) | None => {}
    }
    Ok(endpoint.and_then(|ep| st.take_fault(ep)))
}

/// Serves a `Stall` and hands on every other fault.
pub(super) async fn sit_out_stall(fault: Option<Fault>) -> Option<Fault> {
    match fault {
        Some(Fault::Stall(d)) => {
            tokio::time::sleep(d).await;
            None
        }
        other => other,
    }
}
