//! What the fake refuses as the real API does: a wrong or missing token, bad declares, malformed
//! or oversized uploads, unknown ids.

use super::*;

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
