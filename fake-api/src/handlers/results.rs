//! Following an interaction: its status (which moves on with the processing time), its result
//! documents (the canned ones in [`crate::results`]), and deleting it.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::results::{AI_RESULTS, PUNCTUATED, TRANSCRIPT};
use crate::server::abort_response;
use crate::state::{Interaction, rfc3339};
use crate::{Endpoint, Fault};

use super::*;

pub(super) fn status_document(i: &Interaction, processing_time: Duration) -> Value {
    let v = i.view(processing_time);
    json!({
        "identifier": i.id,
        "status": v.status,
        "declared": rfc3339(v.declared),
        "uploaded": v.uploaded.map(rfc3339),
        "downloaded": null,
        "processed": v.processed.map(rfc3339),
        "errorMessage": v.error_message,
    })
}

pub(super) async fn status(
    State(sh): State<Sh>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let fault = match gate(&sh, &headers, Some(Endpoint::Status)) {
        Ok(f) => sit_out_stall(f).await,
        Err(denied) => return denied.into_response(),
    };
    if let Some(r) = refusal(fault.as_ref(), StatusCode::OK, &headers) {
        return r;
    }
    let doc = {
        let st = sh.lock();
        st.interactions
            .get(&id)
            .map(|i| status_document(i, st.processing_time))
    };
    match doc {
        Some(doc) => answer(StatusCode::OK, Some(doc), fault.as_ref()),
        None => unknown_interaction(&id),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Transcript,
    Punctuated,
    Ai,
}

pub(super) async fn transcript(sh: State<Sh>, id: Path<String>, headers: HeaderMap) -> Response {
    results(sh, id, headers, Kind::Transcript).await
}

pub(super) async fn punctuated(sh: State<Sh>, id: Path<String>, headers: HeaderMap) -> Response {
    results(sh, id, headers, Kind::Punctuated).await
}

pub(super) async fn ai_results(sh: State<Sh>, id: Path<String>, headers: HeaderMap) -> Response {
    results(sh, id, headers, Kind::Ai).await
}

pub(super) async fn results(
    State(sh): State<Sh>,
    Path(id): Path<String>,
    headers: HeaderMap,
    kind: Kind,
) -> Response {
    let fault = match gate(&sh, &headers, Some(Endpoint::Results)) {
        Ok(f) => sit_out_stall(f).await,
        Err(denied) => return denied.into_response(),
    };
    if let Some(r) = refusal(fault.as_ref(), StatusCode::OK, &headers) {
        return r;
    }
    let unavailable = {
        let st = sh.lock();
        match st.interactions.get(&id) {
            None => Some(format!("interaction {id} was not found")),
            Some(i) => {
                let status = i.view(st.processing_time).status;
                if status != "processed" {
                    Some(format!(
                        "results for interaction {id} are not available yet (status: {status})"
                    ))
                } else if kind == Kind::Ai && !i.include_ai {
                    Some(format!(
                        "interaction {id} was declared without includeAiResults"
                    ))
                } else {
                    None
                }
            }
        }
    };
    if let Some(message) = unavailable {
        return json_error(StatusCode::NOT_FOUND, message);
    }
    let doc = match kind {
        Kind::Transcript => TRANSCRIPT.clone(),
        Kind::Punctuated => PUNCTUATED.clone(),
        Kind::Ai => AI_RESULTS.clone(),
    };
    answer(StatusCode::OK, Some(doc), fault.as_ref())
}

/// `DELETE /interactions/{id}`: the interaction and its results go; its id is kept in the
/// fake's record of deletions (`FakeApi::deleted`), so tests check erasure from the fake's side.
pub(super) async fn remove(
    State(sh): State<Sh>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let fault = match gate(&sh, &headers, Some(Endpoint::Delete)) {
        Ok(f) => sit_out_stall(f).await,
        Err(denied) => return denied.into_response(),
    };
    if let Some(r) = refusal(fault.as_ref(), StatusCode::NO_CONTENT, &headers) {
        return r;
    }
    let removed = {
        let mut st = sh.lock();
        let removed = st.interactions.remove(&id).is_some();
        if removed {
            st.deleted.push(id.clone());
        }
        removed
    };
    if !removed {
        return unknown_interaction(&id);
    }
    match fault {
        // Deleted, but the answer is lost: the client must take a later 404 as done.
        Some(Fault::ResetAfterStore) => abort_response(),
        _ => StatusCode::NO_CONTENT.into_response(),
    }
}
