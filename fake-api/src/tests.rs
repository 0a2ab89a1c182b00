use std::time::{Duration, Instant, UNIX_EPOCH};

use futures_util::{StreamExt, stream};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::state::rfc3339;
use super::*;

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

#[tokio::test]
async fn happy_path_declare_upload_status_results() {
    let api = fake().await;
    let c = client();
    let id = declare(&c, &api, true).await;
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);

    let st = status_of(&c, &api, &id).await;
    assert_eq!(st["identifier"], id.as_str());
    assert_eq!(st["status"], "declared");
    assert!(st["declared"].as_str().unwrap().ends_with('Z'));
    assert!(st["uploaded"].is_null() && st["processed"].is_null() && st["errorMessage"].is_null());
    let early = get(&c, &api, &format!("/interactions/{id}/transcript"))
        .await
        .unwrap();
    assert_eq!(early.status(), 404);

    let data = audio(300 * 1024 + 7);
    let r = upload(&c, &api, &id, audio_form("call-1234.wav", data.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.bytes().await.unwrap().is_empty());

    let st = status_of(&c, &api, &id).await;
    assert_eq!(st["status"], "processed");
    assert!(st["uploaded"].is_string() && st["processed"].is_string());
    assert!(st["downloaded"].is_null());

    let t: Value = get(&c, &api, &format!("/interactions/{id}/transcript"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for who in ["allParticipants", "participantOne", "participantTwo"] {
        let phrases = t[who]["phrases"].as_array().unwrap();
        let segments = t[who]["phraseSegments"].as_array().unwrap();
        assert!(!phrases.is_empty() && segments.len() >= phrases.len());
        for s in segments {
            assert!((s["phraseIndex"].as_u64().unwrap() as usize) < phrases.len());
            assert!(s["startTimeOffset"].as_u64() < s["endTimeOffset"].as_u64());
        }
    }
    assert_eq!(t["allParticipants"]["phrases"][0], "thank");
    assert!(t["redactionSegments"].is_array());

    let p: Value = get(
        &c,
        &api,
        &format!("/interactions/{id}/transcripts/punctuated"),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let sentences = p["sentenceSegments"].as_array().unwrap();
    assert!(sentences.len() >= 10);
    assert_eq!(sentences[0]["participant"], "participantOne");
    assert!(
        sentences[0]["phrase"]
            .as_str()
            .unwrap()
            .starts_with("Thank you for calling")
    );
    assert!(
        sentences
            .iter()
            .any(|s| s["participant"] == "participantTwo")
    );

    let ai: Value = get(&c, &api, &format!("/interactions/{id}/ai"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bundles = ai["allParticipants"]["enlightenBundles"]
        .as_array()
        .unwrap();
    assert_eq!(bundles[0]["name"], "Customer Satisfaction");
    assert!(bundles[0]["models"][0]["score"].is_f64());
    assert!(ai["participantTwo"]["voiceActivitySegments"].is_array());

    let rec = record(&api, &id);
    assert_eq!(rec.status, "processed");
    assert_eq!(rec.declare_body, declare_body(true));
    assert_eq!(rec.uploads.len(), 1);
    let u = &rec.uploads[0];
    assert_eq!(u.field_name, "call-1234.wav");
    assert_eq!(u.filename.as_deref(), Some("call-1234.wav"));
    assert_eq!(u.content_type.as_deref(), Some("audio/wav"));
    assert_eq!(u.size, data.len() as u64);
    assert_eq!(u.sha256, sha_hex(&data));
    assert_eq!((u.answered, u.stored), (201, true));

    let n = api.counters();
    assert_eq!(
        (
            n.declares,
            n.uploads_stored,
            n.status_polls,
            n.result_fetches
        ),
        (1, 1, 2, 4)
    );
    assert_eq!(n.requests, 8);
    assert!(n.bytes_received > data.len() as u64);

    let del = c
        .delete(format!("{}/interactions/{id}", api.base_url()))
        .header("X-API-Token", TOKEN)
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success());
    let gone = get(&c, &api, &format!("/interactions/{id}/status"))
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    assert!(api.interactions().is_empty());
    assert_eq!(
        api.deleted(),
        vec![id.clone()],
        "the fake records its deletions"
    );
    let again = c
        .delete(format!("{}/interactions/{id}", api.base_url()))
        .header("X-API-Token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404, "a deleted interaction is unknown");
    let anon = c
        .delete(format!("{}/interactions/{id}", api.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401, "DELETE checks the token");
    assert_eq!(
        api.counters().deletes,
        2,
        "authenticated deletes are counted"
    );
    assert_eq!(api.deleted().len(), 1);
    api.shutdown().await;
}

#[tokio::test]
async fn status_progresses_and_can_be_forced() {
    let api = fake_with(FakeOptions {
        processing_time: Duration::from_secs(3600),
        ..FakeOptions::default()
    })
    .await;
    let c = client();
    let id = declare(&c, &api, false).await;
    upload(&c, &api, &id, audio_form("a.wav", audio(10)))
        .await
        .unwrap();
    assert_eq!(status_of(&c, &api, &id).await["status"], "fileUploaded");
    let r = get(
        &c,
        &api,
        &format!("/interactions/{id}/transcripts/punctuated"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["message"].is_string());

    // The processing clock runs from the upload, so a shorter processing
    // time walks the interaction through the remaining states.
    api.set_processing_time(Duration::from_secs(1));
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = status_of(&c, &api, &id).await["status"]
            .as_str()
            .unwrap()
            .to_owned();
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        if s == "processed" {
            break;
        }
        assert!(Instant::now() < deadline, "never processed: {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let order = ["fileUploaded", "processing", "processed"];
    let first = order.iter().position(|s| *s == seen[0]).unwrap();
    assert_eq!(seen, order[first..], "status went {seen:?}");
    assert!(seen.contains(&"processing".to_owned()));
    let r = get(&c, &api, &format!("/interactions/{id}/transcript"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Not declared with includeAiResults.
    let r = get(&c, &api, &format!("/interactions/{id}/ai"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    api.force_status(&id, "processingFailed", Some("unsupported codec"));
    let st = status_of(&c, &api, &id).await;
    assert_eq!(st["status"], "processingFailed");
    assert_eq!(st["errorMessage"], "unsupported codec");
    assert_eq!(record(&api, &id).status, "processingFailed");
    let r = get(&c, &api, &format!("/interactions/{id}/transcript"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let other = declare(&c, &api, true).await;
    api.force_status(&other, "processed", None);
    let r = get(&c, &api, &format!("/interactions/{other}/ai"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn second_upload_conflicts() {
    let api = fake().await;
    let c = client();
    let id = declare(&c, &api, false).await;
    let first = audio(5000);
    let r = upload(&c, &api, &id, audio_form("x.wav", first.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = upload(&c, &api, &id, audio_form("x.wav", audio(6000)))
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.json::<Value>().await.unwrap()["message"].is_string());
    let rec = record(&api, &id);
    let answered: Vec<(u16, bool)> = rec.uploads.iter().map(|u| (u.answered, u.stored)).collect();
    assert_eq!(answered, [(201, true), (409, false)]);
    assert_eq!(rec.uploads[1].size, 6000);
    let n = api.counters();
    assert_eq!((n.uploads_stored, n.uploads_conflict), (1, 1));
}

#[tokio::test]
async fn wrong_or_missing_token_is_401() {
    let api = fake().await;
    let c = client();
    let url = format!("{}/interactions", api.base_url());
    let r = c
        .post(&url)
        .json(&declare_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["message"].is_string());
    let r = c
        .post(&url)
        .header("x-api-token", "nope")
        .json(&declare_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let id = declare(&c, &api, false).await;
    api.set_token("rotated");
    let r = upload(&c, &api, &id, audio_form("a.wav", audio(200_000)))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = get(&c, &api, &format!("/interactions/{id}/status"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("{}/interactions/{id}/status", api.base_url()))
        .header("X-API-TOKEN", "rotated")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(api.counters().unauthorized, 4);
    assert!(record(&api, &id).uploads.is_empty());
}

#[tokio::test]
async fn bad_declare_bodies_are_400() {
    let api = fake().await;
    let c = client();
    let url = format!("{}/interactions", api.base_url());
    let not_json = c
        .post(&url)
        .header("X-API-Token", TOKEN)
        .body("type=audio")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    let mut chat = declare_body(false);
    chat["type"] = json!("chat");
    let mut no_lang = declare_body(false);
    no_lang.as_object_mut().unwrap().remove("languageTag");
    let mut no_vertical = declare_body(false);
    no_vertical.as_object_mut().unwrap().remove("vertical");
    for body in [chat, no_lang, no_vertical, json!([1, 2])] {
        let r = declare_raw(&c, &api, &body).await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert!(r.json::<Value>().await.unwrap()["message"].is_string());
    }
    assert!(api.interactions().is_empty());
}

#[tokio::test]
async fn malformed_uploads_are_400_and_unknown_id_404() {
    let api = fake().await;
    let c = client();
    let id = declare(&c, &api, false).await;

    let wrong_name = Form::new().part("file", Part::bytes(audio(100)).file_name("call-9.wav"));
    let two_parts =
        audio_form("a.wav", audio(10)).part("b.wav", Part::bytes(audio(10)).file_name("b.wav"));
    for form in [wrong_name, two_parts, Form::new()] {
        let r = upload(&c, &api, &id, form).await.unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.json::<Value>().await.unwrap()["message"].is_string());
    }
    let raw = c
        .post(format!("{}/interactions/{id}/upload", api.base_url()))
        .header("X-API-Token", TOKEN)
        .header("content-type", "audio/wav")
        .body(audio(1000))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);

    let rec = record(&api, &id);
    assert_eq!(rec.status, "declared");
    let names: Vec<&str> = rec.uploads.iter().map(|u| u.field_name.as_str()).collect();
    assert_eq!(names, ["file", "a.wav", "", ""]);
    assert!(rec.uploads.iter().all(|u| u.answered == 400 && !u.stored));

    let unknown = uuid::Uuid::new_v4();
    let r = upload(
        &c,
        &api,
        &unknown.to_string(),
        audio_form("a.wav", audio(10)),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(api.counters().uploads_rejected, 5);

    let r = upload(&c, &api, &id, audio_form("a.wav", audio(10)))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn oversized_upload_is_413() {
    let api = fake_with(FakeOptions {
        max_upload_bytes: Some(100_000),
        ..FakeOptions::default()
    })
    .await;
    let c = client();
    let id = declare(&c, &api, false).await;
    let r = upload(&c, &api, &id, audio_form("big.wav", audio(100_001)))
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = upload(&c, &api, &id, audio_form("big.wav", audio(100_000)))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let answered: Vec<u16> = record(&api, &id)
        .uploads
        .iter()
        .map(|u| u.answered)
        .collect();
    assert_eq!(answered, [413, 201]);
}

#[tokio::test]
async fn status_faults_429_and_html_are_answered_in_fifo_order() {
    let api = fake().await;
    let c = client();
    api.push_fault(Endpoint::Declare, Fault::Status(503));
    api.push_fault(
        Endpoint::Declare,
        Fault::TooManyRequests {
            retry_after_secs: Some(7),
        },
    );
    api.push_fault(Endpoint::Declare, Fault::HtmlError);

    let r = declare_raw(&c, &api, &declare_body(false)).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"message": "injected 503"})
    );

    let r = declare_raw(&c, &api, &declare_body(false)).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");

    let r = declare_raw(&c, &api, &declare_body(false)).await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(r.text().await.unwrap().contains("<html>"));

    assert!(api.interactions().is_empty());
    let id = declare(&c, &api, false).await;

    api.push_fault(Endpoint::Upload, Fault::Status(500));
    let data = audio(70_000);
    let r = upload(&c, &api, &id, audio_form("a.wav", data.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let r = upload(&c, &api, &id, audio_form("a.wav", data.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let rec = record(&api, &id);
    assert_eq!(
        rec.uploads.iter().map(|u| u.answered).collect::<Vec<_>>(),
        [500, 201]
    );
    assert!(rec.uploads.iter().all(|u| u.sha256 == sha_hex(&data)));

    api.push_fault(Endpoint::Results, Fault::Status(500));
    let r = get(&c, &api, &format!("/interactions/{id}/transcript"))
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(api.counters().faults_injected, 5);
}

#[tokio::test]
async fn reset_before_store_drops_the_connection_and_stores_nothing() {
    let api = fake().await;
    let c = client();
    api.push_fault(Endpoint::Declare, Fault::ResetBeforeStore);
    let err = declare_raw(&c, &api, &declare_body(false))
        .await
        .unwrap_err();
    assert!(err.status().is_none(), "{err:?}");
    assert!(api.interactions().is_empty());

    let id = declare(&c, &api, false).await;
    api.push_fault(Endpoint::Upload, Fault::ResetBeforeStore);
    let data = audio(2 * 1024 * 1024);
    let err = upload(&c, &api, &id, audio_form("a.wav", data.clone()))
        .await
        .unwrap_err();
    assert!(err.status().is_none(), "{err:?}");
    let rec = record(&api, &id);
    assert_eq!(rec.status, "declared");
    assert_eq!((rec.uploads[0].answered, rec.uploads[0].stored), (0, false));
    assert!(rec.uploads[0].size < data.len() as u64);

    let r = upload(&c, &api, &id, audio_form("a.wav", data))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn reset_after_store_drops_the_connection_after_storing() {
    let api = fake().await;
    let c = client();
    let id = declare(&c, &api, false).await;
    api.push_fault(Endpoint::Upload, Fault::ResetAfterStore);
    let data = audio(1024 * 1024);
    let err = upload(&c, &api, &id, audio_form("a.wav", data.clone()))
        .await
        .unwrap_err();
    assert!(err.status().is_none(), "{err:?}");
    let rec = record(&api, &id);
    assert_eq!(rec.status, "processed");
    let u = &rec.uploads[0];
    assert_eq!((u.answered, u.stored, u.size), (0, true, data.len() as u64));
    assert_eq!(u.sha256, sha_hex(&data));

    // The retry a client makes after the reset finds the audio already there.
    let r = upload(&c, &api, &id, audio_form("a.wav", data))
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(api.counters().uploads_stored, 1);
}

#[tokio::test]
async fn stall_delays_then_answers_normally() {
    let api = fake().await;
    let c = client();
    let id = declare(&c, &api, false).await;
    api.push_fault(Endpoint::Status, Fault::Stall(Duration::from_millis(300)));
    let started = Instant::now();
    let st = status_of(&c, &api, &id).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(st["status"], "declared");
}

#[tokio::test]
async fn garbage_json_and_missing_id_are_successes_with_useless_bodies() {
    let api = fake().await;
    let c = client();
    api.push_fault(Endpoint::Declare, Fault::GarbageJson);
    let r = declare_raw(&c, &api, &declare_body(false)).await.unwrap();
    assert_eq!(r.status(), 201);
    let text = r.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

    api.push_fault(Endpoint::Declare, Fault::MissingId);
    let r = declare_raw(&c, &api, &declare_body(false)).await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({}));
    // Both were created server-side, as orphans the client cannot name.
    assert_eq!(api.interactions().len(), 2);

    let id = api.interactions()[0].id.clone();
    api.push_fault(Endpoint::Status, Fault::GarbageJson);
    let r = get(&c, &api, &format!("/interactions/{id}/status"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.json::<Value>().await.is_err());
}

#[tokio::test]
async fn wrong_success_answers_200_and_still_does_the_work() {
    let api = fake().await;
    let c = client();
    api.push_fault(Endpoint::Declare, Fault::WrongSuccess);
    let r = declare_raw(&c, &api, &declare_body(false)).await.unwrap();
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["interactionIdentifier"]
        .as_str()
        .unwrap()
        .to_owned();
    api.push_fault(Endpoint::Upload, Fault::WrongSuccess);
    let r = upload(&c, &api, &id, audio_form("a.wav", audio(1000)))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = record(&api, &id);
    assert_eq!(
        (rec.uploads[0].answered, rec.uploads[0].stored),
        (200, true)
    );
    assert_eq!(rec.status, "processed");
}

async fn declare_statuses(api: &FakeApi, n: usize) -> Vec<u16> {
    let c = client();
    let mut out = Vec::new();
    for _ in 0..n {
        match declare_raw(&c, api, &declare_body(false)).await {
            Ok(r) => out.push(r.status().as_u16()),
            Err(_) => out.push(0),
        }
    }
    out
}

#[tokio::test]
async fn random_faults_are_seeded_and_reproducible() {
    let faults = RandomFaults {
        seed: 42,
        p_5xx: 0.3,
        p_429: 0.2,
        p_reset_before_store: 0.1,
        p_reset_after_store: 0.5,
    };
    let a = fake().await;
    let b = fake().await;
    a.set_random_faults(faults.clone());
    b.set_random_faults(faults);
    let seq_a = declare_statuses(&a, 30).await;
    let seq_b = declare_statuses(&b, 30).await;
    assert_eq!(seq_a, seq_b);
    assert!(seq_a.contains(&201));
    assert!(seq_a.iter().any(|s| *s >= 500));
    assert!(seq_a.contains(&429));
    assert!(seq_a.contains(&0));
    let created = seq_a.iter().filter(|s| **s == 201).count();
    assert_eq!(a.interactions().len(), created);

    // Scripted faults win over random ones.
    a.set_random_faults(RandomFaults {
        seed: 1,
        p_5xx: 1.0,
        ..RandomFaults::default()
    });
    a.push_fault(Endpoint::Declare, Fault::Status(418));
    assert_eq!(declare_statuses(&a, 3).await[0], 418);
    a.set_random_faults(RandomFaults::default());
    assert_eq!(declare_statuses(&a, 3).await, [201, 201, 201]);

    // p_reset_after_store never hits declares.
    b.set_random_faults(RandomFaults {
        seed: 7,
        p_reset_after_store: 1.0,
        ..RandomFaults::default()
    });
    let c = client();
    let id = declare(&c, &b, false).await;
    assert!(
        upload(&c, &b, &id, audio_form("a.wav", audio(10)))
            .await
            .is_err()
    );
    assert!(record(&b, &id).uploads[0].stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_down_refuses_connections_and_come_up_keeps_state() {
    let api = fake().await;
    let c = client();
    let id = declare(&c, &api, false).await;
    upload(&c, &api, &id, audio_form("a.wav", audio(10)))
        .await
        .unwrap();

    // An in-flight request must die with the server, not finish later.
    api.push_fault(Endpoint::Status, Fault::Stall(Duration::from_secs(30)));
    let polls_before = api.counters().status_polls;
    let in_flight = tokio::spawn({
        let (c, api, id) = (c.clone(), api.clone(), id.clone());
        async move {
            let started = Instant::now();
            let r = get(&c, &api, &format!("/interactions/{id}/status")).await;
            (r.is_err(), started.elapsed())
        }
    });
    eventually("the stalled request to arrive", || {
        api.counters().status_polls > polls_before
    })
    .await;

    api.go_down().await;
    let (failed, took) = in_flight.await.unwrap();
    assert!(failed);
    assert!(took < Duration::from_secs(10));
    let err = get(&c, &api, &format!("/interactions/{id}/status"))
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    let raw = tokio::net::TcpStream::connect(api.addr())
        .await
        .unwrap_err();
    assert_eq!(raw.kind(), std::io::ErrorKind::ConnectionRefused);
    api.go_down().await;

    api.come_up().await.unwrap();
    api.come_up().await.unwrap();
    assert_eq!(status_of(&c, &api, &id).await["status"], "processed");
    assert_eq!(api.interactions().len(), 1);
    let second = declare(&c, &api, false).await;
    assert_eq!(api.interactions()[1].id, second);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_fake_keeps_its_port_and_a_second_fake_cannot_take_it() {
    let api = fake().await;
    let err = FakeApi::start_on(api.addr(), FakeOptions::default())
        .await
        .err()
        .expect("the port is taken");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);

    // Down, with no connection ever made (so no TIME_WAIT holds the port): refused, yet not free,
    // so no other test's server can take it before `come_up`. A socket without SO_REUSEADDR
    // (std's bind sets it, and Linux then lets a listener share a port whose other socket is not
    // listening).
    api.go_down().await;
    let raw = tokio::net::TcpStream::connect(api.addr())
        .await
        .unwrap_err();
    assert_eq!(raw.kind(), std::io::ErrorKind::ConnectionRefused);
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    let taken = other.bind(api.addr()).unwrap_err();
    assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
    drop(other);
    api.come_up().await.unwrap();
    assert!(tokio::net::TcpStream::connect(api.addr()).await.is_ok());
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_64_mib_upload() {
    const CHUNK: usize = 1024 * 1024;
    const CHUNKS: usize = 64;
    let api = fake().await;
    let c = client();
    let id = declare(&c, &api, false).await;
    let base = audio(CHUNK);
    let expected = std::sync::Arc::new(std::sync::Mutex::new(Sha256::new()));
    let hasher = expected.clone();
    let body = stream::iter(0..CHUNKS).map(move |i| {
        let mut chunk = base.clone();
        chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
        hasher.lock().unwrap().update(&chunk);
        Ok::<_, std::io::Error>(bytes::Bytes::from(chunk))
    });
    let part = Part::stream(reqwest::Body::wrap_stream(body)).file_name("long-call.wav");
    let form = Form::new().part("long-call.wav", part);
    let r = upload(&c, &api, &id, form).await.unwrap();
    assert_eq!(r.status(), 201);
    let digest = hex::encode(expected.lock().unwrap().clone().finalize());
    let u = &record(&api, &id).uploads[0];
    assert_eq!(u.size, (CHUNK * CHUNKS) as u64);
    assert_eq!(u.sha256, digest);
}

#[tokio::test]
async fn upload_rate_and_latency_slow_answers_down() {
    let api = fake().await;
    let c = client();
    api.set_latency(Duration::from_millis(200));
    let started = Instant::now();
    let id = declare(&c, &api, false).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    api.set_latency(Duration::ZERO);

    api.set_upload_rate(Some(1024 * 1024));
    let started = Instant::now();
    let r = upload(&c, &api, &id, audio_form("a.wav", audio(512 * 1024)))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn control_routes_drive_the_fake_from_outside() {
    let api = fake().await;
    let c = client();
    let ctl = format!("http://{}/_fake", api.addr());
    let post = |path: &str, body: Value| c.post(format!("{ctl}{path}")).json(&body).send();

    let r = post(
        "/fault",
        json!({"endpoint": "Declare", "fault": {"Status": 503}}),
    )
    .await
    .unwrap();
    assert!(r.status().is_success());
    assert_eq!(
        declare_raw(&c, &api, &declare_body(false))
            .await
            .unwrap()
            .status(),
        503
    );

    post("/faults", json!({"seed": 3, "p_5xx": 1.0}))
        .await
        .unwrap();
    assert!(
        declare_raw(&c, &api, &declare_body(false))
            .await
            .unwrap()
            .status()
            .is_server_error()
    );
    post("/faults", json!({"seed": 3})).await.unwrap();
    let id = declare(&c, &api, false).await;

    post("/latency", json!({"ms": 150})).await.unwrap();
    let started = Instant::now();
    status_of(&c, &api, &id).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    post("/latency", json!({"ms": 0})).await.unwrap();

    post(
        "/status",
        json!({"id": id, "status": "fileUploadFailed", "error_message": "boom"}),
    )
    .await
    .unwrap();
    assert_eq!(status_of(&c, &api, &id).await["errorMessage"], "boom");

    post("/token", json!({"token": "other"})).await.unwrap();
    let r = get(&c, &api, &format!("/interactions/{id}/status"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let counters: Counters = c
        .get(format!("{ctl}/counters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counters.requests, api.counters().requests);
    assert_eq!((counters.unauthorized, counters.faults_injected), (1, 2));
    let records: Vec<InteractionRecord> = c
        .get(format!("{ctl}/interactions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].status, "fileUploadFailed");
}

#[tokio::test]
async fn serve_forever_serves_until_dropped() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = tokio::spawn(serve_forever(addr, FakeOptions::default(), None));
    let c = client();
    let url = format!("http://{addr}/v1/interactions");
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        match c
            .post(&url)
            .header("X-API-Token", TOKEN)
            .json(&declare_body(false))
            .send()
            .await
        {
            Ok(r) => break r,
            Err(e) => assert!(Instant::now() < deadline, "never came up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(r.status(), 201);
    server.abort();
}

#[test]
fn timestamps_are_rfc3339_utc() {
    let t = UNIX_EPOCH + Duration::from_micros(1_655_500_986_137_087);
    assert_eq!(rfc3339(t), "2022-06-17T21:23:06.137087Z");
    let leap = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
    assert_eq!(rfc3339(leap), "2024-02-29T12:34:56.000000Z");
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
}

/// The HTTPS mode with a certificate made at start: trusted through its CA alone (no system
/// roots), refused without it, and its counters tell a reused connection from a new one and a
/// resumed TLS session from a full handshake.
#[tokio::test]
async fn https_with_a_generated_ca_counts_connections_and_resumed_sessions() {
    let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
    let (api, pki) = FakeApi::start_tls_generated(addr, FakeOptions::default())
        .await
        .unwrap();
    assert!(api.base_url().starts_with("https://127.0.0.1:"));
    assert!(!format!("{pki:?}").contains("PRIVATE"), "no key in Debug");
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let trusting = |pooled: bool| {
        let b = reqwest::Client::builder()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone());
        let b = if pooled {
            b
        } else {
            b.pool_max_idle_per_host(0)
        };
        b.build().unwrap()
    };
    let declare = |c: &reqwest::Client| {
        c.post(format!("{}/interactions", api.base_url()))
            .header("X-API-Token", TOKEN)
            .json(&declare_body(false))
            .send()
    };

    let untrusting = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    assert!(
        declare(&untrusting).await.is_err(),
        "an unknown CA is refused"
    );
    assert_eq!(api.counters().requests, 0);

    // One pooled client: three requests, one connection, one full handshake.
    let before = api.counters();
    let c = trusting(true);
    for _ in 0..3 {
        assert_eq!(declare(&c).await.unwrap().status(), 201);
    }
    let after = api.counters();
    assert_eq!(after.connections - before.connections, 1);
    assert_eq!(after.tls_full_handshakes - before.tls_full_handshakes, 1);
    assert_eq!(after.tls_resumed_handshakes, 0);

    // No pool: each request a new connection, the later ones resuming the first's session.
    let before = api.counters();
    let c = trusting(false);
    for _ in 0..3 {
        assert_eq!(declare(&c).await.unwrap().status(), 201);
    }
    let after = api.counters();
    assert_eq!(after.connections - before.connections, 3);
    assert_eq!(after.tls_full_handshakes - before.tls_full_handshakes, 1);
    assert_eq!(
        after.tls_resumed_handshakes - before.tls_resumed_handshakes,
        2
    );
    assert_eq!(api.counters().declares, 6);
}
