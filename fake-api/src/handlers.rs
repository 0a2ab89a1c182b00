//! The axum router: the faked `/v1` API and the unauthenticated `/_fake`
//! control routes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::results::{AI_RESULTS, PUNCTUATED, TRANSCRIPT};
use super::server::{AbortConnection, abort_response};
use super::state::{Interaction, Shared, State as FakeState, rfc3339};
use super::{Counters, Endpoint, Fault, InteractionRecord, RandomFaults, UploadRecord};

type Sh = Arc<Shared>;

/// How much of an upload `ResetBeforeStore` reads before hanging up, so the
/// client is cut off mid-body rather than before sending anything.
const RESET_READ_BYTES: u64 = 64 * 1024;

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

fn json_error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "message": message.into() }))).into_response()
}

fn unknown_interaction(id: &str) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        format!("interaction {id} was not found"),
    )
}

async fn unknown_route() -> Response {
    json_error(StatusCode::NOT_FOUND, "no such route")
}

async fn api_prelude(State(sh): State<Sh>, req: Request, next: Next) -> Response {
    let latency = {
        let mut st = sh.lock();
        st.counters.requests += 1;
        st.latency
    };
    super::timer::sleep_precisely(latency).await;
    next.run(req).await
}

/// A request without the right token.
struct Unauthorized(&'static str);

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        json_error(StatusCode::UNAUTHORIZED, self.0)
    }
}

/// Authenticates, counts, and picks the fault (if any) for this request.
fn gate(
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
async fn sit_out_stall(fault: Option<Fault>) -> Option<Fault> {
    match fault {
        Some(Fault::Stall(d)) => {
            tokio::time::sleep(d).await;
            None
        }
        other => other,
    }
}

/// Size of the chunks the body faults send at full speed.
const BODY_CHUNK: usize = 64 * 1024;

/// Faults that replace the real work with a failure, or with an answer meant to hurt the client.
/// `ok` is the operation's success status; `headers` are the request's (for what it presented).
fn refusal(fault: Option<&Fault>, ok: StatusCode, headers: &HeaderMap) -> Option<Response> {
    let resp = match fault? {
        Fault::Redirect { status, location } => {
            let code = StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND);
            let mut r = code.into_response();
            if let Ok(v) = HeaderValue::from_str(location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Fault::EchoToken(code) => {
            let presented = headers
                .get("x-api-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let code = StatusCode::from_u16(*code).unwrap_or(StatusCode::UNAUTHORIZED);
            let mut r = (
                code,
                Json(json!({
                    "message": format!("API token '{presented}' is not valid for this account"),
                    "detail": format!("<pre>X-API-Token: {presented}</pre>"),
                })),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("token={presented}")) {
                r.headers_mut().insert("x-rejected-token", v);
            }
            r
        }
        Fault::HugeBody(n) => (ok, huge_body(*n)).into_response(),
        Fault::EndlessBody => {
            let chunk = Bytes::from(vec![b'x'; BODY_CHUNK]);
            let head = futures_util::stream::once(async { Bytes::from_static(b"{\"pad\":\"") });
            let body = head.chain(futures_util::stream::repeat(chunk));
            (
                ok,
                Body::from_stream(body.map(Ok::<_, std::convert::Infallible>)),
            )
                .into_response()
        }
        Fault::SlowDrip(every) => {
            let every = *every;
            let drip = futures_util::stream::unfold((), move |()| async move {
                tokio::time::sleep(every).await;
                Some((
                    Ok::<_, std::convert::Infallible>(Bytes::from_static(b" ")),
                    (),
                ))
            });
            (ok, Body::from_stream(drip)).into_response()
        }
        Fault::GarbageBytes(code) => {
            let code = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let junk: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
            (code, junk).into_response()
        }
        Fault::Status(code) => json_error(
            StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            format!("injected {code}"),
        ),
        Fault::TooManyRequests { retry_after_secs } => {
            let mut r = json_error(StatusCode::TOO_MANY_REQUESTS, "injected 429");
            if let Some(secs) = retry_after_secs {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            r
        }
        Fault::HtmlError => (
            StatusCode::BAD_GATEWAY,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
             <center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n\
             </body>\r\n</html>\r\n",
        )
            .into_response(),
        Fault::ResetBeforeStore => abort_response(),
        _ => return None,
    };
    Some(resp)
}

/// `{"pad":"xx…x"}` of exactly `n` bytes (or `n` bytes of `x` when that is too short for it),
/// made chunk by chunk as it is sent.
fn huge_body(n: u64) -> Body {
    const HEAD: &[u8] = b"{\"pad\":\"";
    const TAIL: &[u8] = b"\"}";
    let framed = n >= (HEAD.len() + TAIL.len()) as u64;
    let pad = if framed {
        n - (HEAD.len() + TAIL.len()) as u64
    } else {
        n
    };
    let chunks = futures_util::stream::unfold(pad, |left| async move {
        if left == 0 {
            return None;
        }
        let take = left.min(BODY_CHUNK as u64);
        Some((Bytes::from(vec![b'x'; take as usize]), left - take))
    });
    let (head, tail) = if framed {
        (Bytes::from_static(HEAD), Bytes::from_static(TAIL))
    } else {
        (Bytes::new(), Bytes::new())
    };
    let body = futures_util::stream::once(async move { head })
        .chain(chunks)
        .chain(futures_util::stream::once(async move { tail }))
        .map(Ok::<_, std::convert::Infallible>);
    Body::from_stream(body)
}

fn other_success(code: StatusCode) -> StatusCode {
    if code == StatusCode::CREATED {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    }
}

/// The status a successful operation is reported with once `fault` has had
/// its say; 0 when the connection is dropped instead.
fn answered_code(code: StatusCode, fault: Option<&Fault>) -> u16 {
    match fault {
        Some(Fault::ResetAfterStore) => 0,
        Some(Fault::WrongSuccess) => other_success(code).as_u16(),
        _ => code.as_u16(),
    }
}

/// Answers an operation that did its work, letting a fault spoil the answer.
fn answer(code: StatusCode, body: Option<Value>, fault: Option<&Fault>) -> Response {
    let plain = |code: StatusCode| match body {
        Some(v) => (code, Json(v)).into_response(),
        None => code.into_response(),
    };
    match fault {
        Some(Fault::ResetAfterStore) => abort_response(),
        Some(Fault::GarbageJson) => (
            code,
            [(header::CONTENT_TYPE, "application/json")],
            "{\"interactionIdentifier\": <!-- upstream timeout -->",
        )
            .into_response(),
        Some(Fault::MissingId) => (code, Json(json!({}))).into_response(),
        Some(Fault::BadId(id)) => {
            (code, Json(json!({ "interactionIdentifier": id }))).into_response()
        }
        Some(Fault::WrongSuccess) => plain(other_success(code)),
        _ => plain(code),
    }
}

fn parse_declare(body: &[u8]) -> Result<(Value, bool), String> {
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

async fn declare(State(sh): State<Sh>, headers: HeaderMap, body: Bytes) -> Response {
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
fn metered(sh: &Sh, body: Body) -> impl Stream<Item = Result<Bytes, axum::Error>> + Send + 'static {
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
async fn drain(sh: &Sh, body: Body) {
    metered(sh, body).for_each(|_| async {}).await;
}

struct Part {
    field_name: String,
    filename: Option<String>,
    content_type: Option<String>,
    size: u64,
    sha256: String,
}

#[derive(Default)]
struct Received {
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
async fn receive(sh: &Sh, parts: Parts, body: Body, stop_after: Option<u64>) -> Received {
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

async fn upload(State(sh): State<Sh>, Path(id): Path<String>, req: Request) -> Response {
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

fn status_document(i: &Interaction, processing_time: Duration) -> Value {
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

async fn status(State(sh): State<Sh>, Path(id): Path<String>, headers: HeaderMap) -> Response {
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
enum Kind {
    Transcript,
    Punctuated,
    Ai,
}

async fn transcript(sh: State<Sh>, id: Path<String>, headers: HeaderMap) -> Response {
    results(sh, id, headers, Kind::Transcript).await
}

async fn punctuated(sh: State<Sh>, id: Path<String>, headers: HeaderMap) -> Response {
    results(sh, id, headers, Kind::Punctuated).await
}

async fn ai_results(sh: State<Sh>, id: Path<String>, headers: HeaderMap) -> Response {
    results(sh, id, headers, Kind::Ai).await
}

async fn results(
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
async fn remove(State(sh): State<Sh>, Path(id): Path<String>, headers: HeaderMap) -> Response {
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

async fn ctl_interactions(State(sh): State<Sh>) -> Json<Vec<InteractionRecord>> {
    Json(sh.interactions())
}

async fn ctl_deleted(State(sh): State<Sh>) -> Json<Vec<String>> {
    Json(sh.lock().deleted.clone())
}

async fn ctl_counters(State(sh): State<Sh>) -> Json<Counters> {
    Json(sh.counters())
}

async fn ctl_random_faults(State(sh): State<Sh>, Json(f): Json<RandomFaults>) -> StatusCode {
    sh.set_random_faults(f);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct PushFault {
    endpoint: Endpoint,
    fault: Fault,
}

async fn ctl_push_fault(State(sh): State<Sh>, Json(p): Json<PushFault>) -> StatusCode {
    sh.push_fault(p.endpoint, p.fault);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct Millis {
    ms: u64,
}

async fn ctl_latency(State(sh): State<Sh>, Json(m): Json<Millis>) -> StatusCode {
    sh.lock().latency = Duration::from_millis(m.ms);
    StatusCode::NO_CONTENT
}

async fn ctl_processing_time(State(sh): State<Sh>, Json(m): Json<Millis>) -> StatusCode {
    sh.lock().processing_time = Duration::from_millis(m.ms);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct Token {
    token: String,
}

async fn ctl_token(State(sh): State<Sh>, Json(t): Json<Token>) -> StatusCode {
    sh.lock().token = t.token;
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct UploadRate {
    bytes_per_sec: Option<u64>,
}

async fn ctl_upload_rate(State(sh): State<Sh>, Json(r): Json<UploadRate>) -> StatusCode {
    sh.lock().upload_rate = r.bytes_per_sec;
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct ForceStatus {
    id: String,
    status: String,
    #[serde(default)]
    error_message: Option<String>,
}

async fn ctl_force_status(State(sh): State<Sh>, Json(f): Json<ForceStatus>) -> StatusCode {
    sh.force_status(&f.id, &f.status, f.error_message.as_deref());
    StatusCode::NO_CONTENT
}
