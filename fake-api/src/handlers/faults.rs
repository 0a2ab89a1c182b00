//! How a fault shapes an answer: a refusal in place of the real work (a redirect, an error
//! status, a body meant to hurt the client), and the answer of an operation that did its work.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::Fault;
use crate::server::abort_response;

use super::*;

/// Size of the chunks the body faults send at full speed.
pub(super) const BODY_CHUNK: usize = 64 * 1024;

/// Faults that replace the real work with a failure, or with an answer meant to hurt the client.
/// `ok` is the operation's success status; `headers` are the request's (for what it presented).
pub(super) fn refusal(
    fault: Option<&Fault>,
    ok: StatusCode,
    headers: &HeaderMap,
) -> Option<Response> {
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
pub(super) fn huge_body(n: u64) -> Body {
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

pub(super) fn other_success(code: StatusCode) -> StatusCode {
    if code == StatusCode::CREATED {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    }
}

/// The status a successful operation is reported with once `fault` has had
/// its say; 0 when the connection is dropped instead.
pub(super) fn answered_code(code: StatusCode, fault: Option<&Fault>) -> u16 {
    match fault {
        Some(Fault::ResetAfterStore) => 0,
        Some(Fault::WrongSuccess) => other_success(code).as_u16(),
        _ => code.as_u16(),
    }
}

/// Answers an operation that did its work, letting a fault spoil the answer.
pub(super) fn answer(code: StatusCode, body: Option<Value>, fault: Option<&Fault>) -> Response {
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
