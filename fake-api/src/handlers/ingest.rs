//! Declaring an interaction and uploading its audio: the declare's body checked as the real
//! service checks it, the multipart upload streamed, metered, hashed and recorded part by part.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::server::AbortConnection;
use crate::state::State as FakeState;
use crate::{Endpoint, Fault, UploadRecord};

use super::*;

/// How much of an upload `ResetBeforeStore` reads before hanging up, so the
/// client is cut off mid-body rather than before sending anything.
pub(super) const RESET_READ_BYTES: u64 = 64 * 1024;

pub(super) fn parse_declare(body: &[u8]) -> Result<(Value, bool), String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or("request body must be a JSON object")?;
    match obj.get("type").and_then(Value::as_str) {
        Some("audio") => {}
        Some(other) => {
            return Err(format!(
                "unsupported interaction type '{other}'; this fake accepts only 'audio'"
            ));
        }
        None => return Err("type is required".into()),
    }
    for field in ["languageTag", "vertical"] {
        if obj
            .get(field)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(format!("{field} is required"));
        }
    }
    let include_ai = match obj.get("includeAiResults") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("includeAiResults must be a boolean".into()),
    };
    Ok((value, include_ai))
}

pub(super) async fn declare(State(sh): State<Sh>, headers: HeaderMap, body: Bytes) -> Response {
    let fault = match gate(&sh, &headers, Some(Endpoint::Declare)) {
        Ok(f) => sit_out_stall(f).await,
        Err(denied) => return denied.into_response(),
    };
    if let Some(r) = refusal(fault.as_ref(), StatusCode::CREATED, &headers) {
        return r;
    }
    let (value, include_ai) = match parse_declare(&body) {
        Ok(parsed) => parsed,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, message),
    };
    if value.get("metadata").is_some() && !sh.lock().explore {
        return json_error(
            StatusCode::BAD_REQUEST,
            "metadata is only accepted for accounts with the Explore feature",
        );
    }
    // Created even when a fault then garbles or drops the answer: the real
    // service would have done the work too, leaving an orphan behind.
    let account = headers
        .get("x-api-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let id = {
        let mut st = sh.lock();
        let id = st.declare(value, include_ai);
        if let Some(i) = st.interactions.get_mut(&id) {
            i.account = account;
        }
        id
    };
    answer(
        StatusCode::CREATED,
        Some(json!({ "interactionIdentifier": id })),
        fault.as_ref(),
    )
}

/// Request body stream that counts bytes and, if asked, paces itself to
/// `upload_rate`; TCP flow control then slows the client down.
pub(super) fn metered(
    sh: &Sh,
    body: Body,
) -> impl Stream<Item = Result<Bytes, axum::Error>> + Send + 'static {
    let sh = sh.clone();
    let rate = sh.lock().upload_rate.filter(|r| *r > 0);
    let start = Instant::now();
    let mut total = 0u64;
    body.into_data_stream().then(move |chunk| {
        let due = match &chunk {
            Ok(bytes) => {
                let n = bytes.len() as u64;
                total += n;
                sh.add_bytes(n);
                rate.map(|r| start + Duration::from_secs_f64(total as f64 / r as f64))
            }
            Err(_) => None,
        };
        async move {
            if let Some(due) = due {
                tokio::time::sleep_until(due.into()).await;
            }
            chunk
        }
    })
}

/// Reads a body nobody wants. Answering before the client has finished
/// sending would make it race our close against its writes, and it would see
/// a reset instead of our status code.
pub(super) async fn drain(sh: &Sh, body: Body) {
    metered(sh, body).for_each(|_| async {}).await;
}

pub(super) struct Part {
    field_name: String,
    filename: Option<String>,
    content_type: Option<String>,
    size: u64,
    sha256: String,
}

#[derive(Default)]
pub(super) struct Received {
    parts: Vec<Part>,
    malformed: Option<String>,
}

impl Received {
    fn record(&self, answered: u16, stored: bool) -> UploadRecord {
        match self.parts.first() {
            Some(p) => UploadRecord {
                field_name: p.field_name.clone(),
                filename: p.filename.clone(),
                content_type: p.content_type.clone(),
                size: p.size,
                sha256: p.sha256.clone(),
                answered,
                stored,
            },
            None => UploadRecord {
                field_name: String::new(),
                filename: None,
                content_type: None,
                size: 0,
                sha256: hex::encode(Sha256::digest(b"")),
                answered,
                stored,
            },
        }
    }

    fn validate(&self, max_upload_bytes: Option<u64>) -> Result<(), (StatusCode, String)> {
        let bad = |m: String| Err((StatusCode::BAD_REQUEST, m));
        if let Some(m) = &self.malformed {
            return bad(format!("malformed multipart body: {m}"));
        }
        let p = match self.parts.as_slice() {
            [] => return bad("the upload has no file part".into()),
            [p] => p,
            more => {
                return bad(format!(
                    "expected exactly one file part, got {}",
                    more.len()
                ));
            }
        };
        if p.field_name.is_empty() || p.filename.as_deref() != Some(p.field_name.as_str()) {
            return bad(format!(
                "the form field name ({:?}) must be the file name with its extension ({:?})",
                p.field_name, p.filename
            ));
        }
        if let Some(max) = max_upload_bytes.filter(|max| p.size > *max) {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("file is {} bytes, the limit is {max}", p.size),
            ));
        }
        Ok(())
    }
}

/// Streams the multipart body, hashing each part as it passes; nothing is
/// kept in memory. With `stop_after`, gives up once that many file bytes
/// were read.
pub(super) async fn receive(
    sh: &Sh,
    parts: Parts,
    body: Body,
    stop_after: Option<u64>,
) -> Received {
    let is_multipart = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.to_ascii_lowercase().starts_with("multipart/form-data") && ct.contains("boundary=")
        });
    if !is_multipart {
        drain(sh, body).await;
        return Received {
            malformed: Some("Content-Type must be multipart/form-data with a boundary".into()),
            ..Received::default()
        };
    }
    let req = Request::from_parts(parts, Body::from_stream(metered(sh, body)));
    let mut multipart = match Multipart::from_request(req, &()).await {
        Ok(m) => m,
        Err(rejection) => {
            return Received {
                malformed: Some(rejection.body_text()),
                ..Received::default()
            };
        }
    };
    let mut out = Received::default();
    let mut file_bytes = 0u64;
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                out.malformed = Some(e.body_text());
                break;
            }
        };
        let field_name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(str::to_owned);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut stop = false;
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    size += chunk.len() as u64;
                    file_bytes += chunk.len() as u64;
                    hasher.update(&chunk);
                    if stop_after.is_some_and(|limit| file_bytes >= limit) {
                        stop = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    out.malformed = Some(e.body_text());
                    stop = true;
                    break;
                }
            }
        }
        out.parts.push(Part {
            field_name,
            filename,
            content_type,
            size,
            sha256: hex::encode(hasher.finalize()),
        });
        if stop {
            break;
        }
    }
    out
}

pub(super) async fn upload(State(sh): State<Sh>, Path(id): Path<String>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let fault = match gate(&sh, &parts.headers, Some(Endpoint::Upload)) {
        Ok(f) => sit_out_stall(f).await,
        Err(denied) => {
            drain(&sh, body).await;
            return denied.into_response();
        }
    };
    let stop_after = matches!(fault, Some(Fault::ResetBeforeStore)).then_some(RESET_READ_BYTES);
    let parts_headers = parts.headers.clone();
    let received = receive(&sh, parts, body, stop_after).await;

    let mut guard = sh.lock();
    let st: &mut FakeState = &mut guard;
    let max_upload_bytes = st.max_upload_bytes;
    let refused = refusal(fault.as_ref(), StatusCode::CREATED, &parts_headers);
    let Some(interaction) = st.interactions.get_mut(&id) else {
        if let Some(r) = refused {
            return r;
        }
        st.counters.uploads_rejected += 1;
        return unknown_interaction(&id);
    };
    if let Some(r) = refused {
        let answered = if r.extensions().get::<AbortConnection>().is_some() {
            0
        } else {
            r.status().as_u16()
        };
        interaction.uploads.push(received.record(answered, false));
        return r;
    }
    if let Err((code, message)) = received.validate(max_upload_bytes) {
        interaction
            .uploads
            .push(received.record(code.as_u16(), false));
        st.counters.uploads_rejected += 1;
        return json_error(code, message);
    }
    if interaction.has_audio() {
        interaction
            .uploads
            .push(received.record(StatusCode::CONFLICT.as_u16(), false));
        st.counters.uploads_conflict += 1;
        return json_error(
            StatusCode::CONFLICT,
            format!("interaction {id} already has its audio"),
        );
    }
    interaction.store_audio();
    let answered = answered_code(StatusCode::CREATED, fault.as_ref());
    interaction.uploads.push(received.record(answered, true));
    st.counters.uploads_stored += 1;
    drop(guard);
    answer(StatusCode::CREATED, None, fault.as_ref())
}
