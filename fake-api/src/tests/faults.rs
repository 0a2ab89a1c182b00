//! The faults the fake injects on request: statuses, resets before and after storing, stalls,
//! useless success bodies, and seeded random faults.

use super::*;

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
