//! The server around the routes: going down and coming back, its port, streaming large uploads,
//! pacing, the control routes, serving until dropped, timestamps, and HTTPS with its own CA.

use super::*;

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
