//! One interaction's life: declared, uploaded once, processed, its results fetched.

use super::*;

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
