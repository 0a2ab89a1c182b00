//! The fake's own tests, by what they exercise: one interaction's life (`flow`), the requests it
//! refuses (`refusals`), the faults it injects (`faults`), and the server around the routes
//! (`server`: going down and up, its port, streaming, pacing, the control routes, HTTPS). This
//! file keeps the client helpers they share.

use std::time::{Duration, Instant, UNIX_EPOCH};

use futures_util::{StreamExt, stream};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::state::rfc3339;
use super::*;

mod faults;
mod flow;
mod refusals;
mod server;

const TOKEN: &str = "fake-token";

async fn fake() -> FakeApi {
    fake_with(FakeOptions::default()).await
}

async fn fake_with(opts: FakeOptions) -> FakeApi {
    FakeApi::start(opts).await.expect("fake starts")
}

fn client() -> reqwest::Client {
    // A proxy from the environment must not sit between the test and 127.0.0.1.
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn declare_body(include_ai: bool) -> Value {
    json!({
        "type": "audio",
        "languageTag": "en-us",
        "vertical": "default",
        "audioTranscriptionMode": "highAccuracy",
        "includeAiResults": include_ai,
        "originalFilename": "call-1234.wav",
        "externalIdentifier": "pbx-1234",
    })
}

async fn declare_raw(
    c: &reqwest::Client,
    api: &FakeApi,
    body: &Value,
) -> reqwest::Result<reqwest::Response> {
    c.post(format!("{}/interactions", api.base_url()))
        .header("X-API-Token", TOKEN)
        .json(body)
        .send()
        .await
}

async fn declare(c: &reqwest::Client, api: &FakeApi, include_ai: bool) -> String {
    let r = declare_raw(c, api, &declare_body(include_ai))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    body["interactionIdentifier"].as_str().unwrap().to_owned()
}

fn audio(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn audio_form(name: &str, data: Vec<u8>) -> Form {
    Form::new().part(
        name.to_owned(),
        Part::bytes(data)
            .file_name(name.to_owned())
            .mime_str("audio/wav")
            .unwrap(),
    )
}

async fn upload(
    c: &reqwest::Client,
    api: &FakeApi,
    id: &str,
    form: Form,
) -> reqwest::Result<reqwest::Response> {
    c.post(format!("{}/interactions/{id}/upload", api.base_url()))
        .header("x-api-token", TOKEN)
        .multipart(form)
        .send()
        .await
}

async fn get(c: &reqwest::Client, api: &FakeApi, path: &str) -> reqwest::Result<reqwest::Response> {
    c.get(format!("{}{path}", api.base_url()))
        .header("X-Api-Token", TOKEN)
        .send()
        .await
}

async fn status_of(c: &reqwest::Client, api: &FakeApi, id: &str) -> Value {
    let r = get(c, api, &format!("/interactions/{id}/status"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn record(api: &FakeApi, id: &str) -> InteractionRecord {
    api.interactions()
        .into_iter()
        .find(|r| r.id == id)
        .expect("interaction recorded")
}

async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
