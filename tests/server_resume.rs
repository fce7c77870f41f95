//! Resumable sessions over the wire (docs/semantics.md, S15): a session that asked for a grace
//! period outlives a dropped connection with its locks, and `resume` on a new connection gets it
//! back — or, once the grace has run out, finds it released.
//!
//! A dropped connection here is a socket dropped without a close frame (the server reads end of
//! stream without the closing handshake), which is what a network blip looks like to the server.

mod wire;

use std::time::Duration;

use locksmith::auth::Secret;
use locksmith::server::ServerSettings;
use serde_json::json;
use wire::{settings, start, wait_until, Client};

/// A grace longer than any test: a session dropped in these tests expires only when a test
/// says so with a short grace.
const LONG_GRACE_MS: u64 = 20_000;

#[tokio::test]
async fn a_dropped_resumable_session_keeps_its_locks_and_resume_gives_them_back_with_the_same_tokens(
) {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    let secret = holder.ask_grace(LONG_GRACE_MS).await;
    let granted = holder.lock(&["k1", "k2"], "write").await;
    let session = holder.session.clone();
    let mut rival = server.connect().await;
    rival
        .send(json!({"command": "lock", "keys": ["k1"], "id": "r"}))
        .await;
    server.wait_queued(&rival.session, "k1").await;

    drop(holder);
    server.wait_suspended(&session).await;
    // Suspended, the session still holds both keys and the rival still waits.
    let holders = wire::holders(&server.snapshot(), "k1");
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].0, session);
    assert!(wire::queued(&server.snapshot(), &rival.session, "k1"));

    let mut back = Client::connect(&server.url()).await;
    let resumed = back.resume(&session, &secret).await;
    assert_eq!(resumed["success"], json!(true), "{resumed}");
    assert_eq!(resumed["session"], json!(session));
    assert_eq!(
        resumed["tokens"], granted["tokens"],
        "same locks, same tokens"
    );
    assert_eq!(resumed["resume_secret"], json!(secret));
    assert_eq!(resumed["grace_ms"], json!(LONG_GRACE_MS));
    assert!(server.registry().suspended().is_empty());
    // The rival never got k1 in between; it gets it when the resumed session lets go.
    assert!(wire::queued(&server.snapshot(), &rival.session, "k1"));
    back.unlock(&["k1"]).await;
    let answer = rival.recv().await;
    assert_eq!(answer["success"], json!(true), "{answer}");
    assert_eq!(answer["id"], json!("r"));
    // The connection is the session now: its own `session` answer says so.
    let own = back.ok(json!({"command": "session"})).await;
    assert_eq!(own["session"], json!(session));
    assert_eq!(server.suspensions().counts().resumed, 1);
}

#[tokio::test]
async fn a_suspended_session_is_released_when_its_grace_runs_out_and_a_late_resume_is_expired() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    let secret = holder.ask_grace(300).await;
    holder.lock(&["k"], "write").await;
    let session = holder.session.clone();
    let mut rival = server.connect().await;
    rival
        .send(json!({"command": "lock", "keys": ["k"], "id": "r"}))
        .await;
    server.wait_queued(&rival.session, "k").await;

    drop(holder);
    server.wait_suspended(&session).await;
    // Granted only when the grace has run out: the answer is the release, not a timeout.
    let answer = rival.recv().await;
    assert_eq!(answer["success"], json!(true), "{answer}");
    assert!(!wire::mentions(&server.snapshot(), &session));
    assert_eq!(server.suspensions().counts().expired, 1);

    let mut late = Client::connect(&server.url()).await;
    let answer = late.resume(&session, &secret).await;
    assert_eq!(answer["code"], json!("session_expired"), "{answer}");
}

#[tokio::test]
async fn a_wrong_secret_is_forbidden_and_leaves_the_suspended_session_as_it_was() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    let secret = holder.ask_grace(LONG_GRACE_MS).await;
    holder.lock(&["k"], "write").await;
    let session = holder.session.clone();
    drop(holder);
    server.wait_suspended(&session).await;

    let mut intruder = Client::connect(&server.url()).await;
    let wrong = "0".repeat(secret.len());
    let answer = intruder.resume(&session, &wrong).await;
    assert_eq!(answer["code"], json!("forbidden"), "{answer}");
    let answer = intruder.resume(&session, "short").await;
    assert_eq!(answer["code"], json!("forbidden"), "{answer}");
    // The intruder's connection is still its own session, and the suspended one is untouched.
    let own = intruder.ok(json!({"command": "session"})).await;
    assert_ne!(own["session"], json!(session));
    assert!(server
        .registry()
        .suspended()
        .keys()
        .any(|id| id.to_string() == session));
    assert_eq!(wire::holders(&server.snapshot(), "k")[0].0, session);

    let mut owner = Client::connect(&server.url()).await;
    let answer = owner.resume(&session, &secret).await;
    assert_eq!(answer["success"], json!(true), "{answer}");
}

#[tokio::test]
async fn a_session_that_asked_for_no_grace_is_released_at_once_and_cannot_be_resumed() {
    let server = start(settings()).await;
    let mut plain = server.connect().await;
    let hello = plain.ok(json!({"command": "hello"})).await;
    assert_eq!(hello["grace_ms"], json!(0));
    assert!(hello.get("resume_secret").is_none());
    plain.lock(&["k"], "write").await;
    let session = plain.session.clone();

    // A connected session without grace: its id is known but it is not resumable.
    let mut other = Client::connect(&server.url()).await;
    let answer = other.resume(&session, &"0".repeat(32)).await;
    assert_eq!(answer["code"], json!("forbidden"), "{answer}");

    drop(plain);
    server
        .wait_for("the plain session's lock released", |s| {
            !wire::mentions(s, &session)
        })
        .await;
    let answer = other.resume(&session, &"0".repeat(32)).await;
    assert_eq!(answer["code"], json!("session_expired"), "{answer}");
    assert_eq!(server.suspensions().counts().suspended, 0);
}

#[tokio::test]
async fn grace_is_capped_by_max_session_grace_and_zero_makes_a_session_not_resumable_again() {
    let server = start(ServerSettings {
        max_session_grace: Duration::from_secs(5),
        ..settings()
    })
    .await;
    let mut client = server.connect().await;
    let first = client
        .ok(json!({"command": "hello", "grace_ms": 3_600_000}))
        .await;
    assert_eq!(first["grace_ms"], json!(5_000), "the server's cap");
    let secret = first["resume_secret"]
        .as_str()
        .expect("a secret")
        .to_owned();
    assert_eq!(secret.len(), 32, "128 bits in hex");
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    let again = client
        .ok(json!({"command": "hello", "grace_ms": 1000}))
        .await;
    assert_eq!(again["grace_ms"], json!(1000));
    assert_eq!(
        again["resume_secret"],
        json!(secret),
        "drawn once per session"
    );
    let plain_hello = client.ok(json!({"command": "hello"})).await;
    assert_eq!(
        plain_hello["grace_ms"],
        json!(1000),
        "unchanged without grace_ms"
    );
    let off = client.ok(json!({"command": "hello", "grace_ms": 0})).await;
    assert_eq!(off["grace_ms"], json!(0));
    assert!(off.get("resume_secret").is_none());

    client.lock(&["k"], "write").await;
    let session = client.session.clone();
    drop(client);
    server
        .wait_for("the no-longer-resumable session released", |s| {
            !wire::mentions(s, &session)
        })
        .await;
}

#[tokio::test]
async fn a_suspended_session_waits_for_nothing_its_lock_wait_is_withdrawn_and_counted() {
    let server = start(settings()).await;
    let mut blocker = server.connect().await;
    blocker.lock(&["k2"], "write").await;
    let mut holder = server.connect().await;
    let secret = holder.ask_grace(LONG_GRACE_MS).await;
    holder.lock(&["k1"], "write").await;
    holder
        .send(json!({"command": "lock", "keys": ["k2"], "id": "w"}))
        .await;
    server.wait_queued(&holder.session, "k2").await;
    let session = holder.session.clone();

    drop(holder);
    server.wait_suspended(&session).await;
    let snapshot = server.snapshot();
    assert!(!wire::queued(&snapshot, &session, "k2"), "withdrawn");
    assert!(
        snapshot.waits_for.is_empty(),
        "a suspended session adds no waits-for edge"
    );
    assert_eq!(wire::holders(&snapshot, "k1")[0].0, session, "still held");
    assert_eq!(server.suspensions().counts().withdrawn_waits, 1);

    // The withdrawn request is not carried out behind the client's back: after the blocker
    // lets go, k2 stays free.
    blocker.unlock(&["k2"]).await;
    let mut back = Client::connect(&server.url()).await;
    let resumed = back.resume(&session, &secret).await;
    assert_eq!(resumed["tokens"].as_object().map(|t| t.len()), Some(1));
    assert!(wire::holders(&server.snapshot(), "k2").is_empty());
}

#[tokio::test]
async fn resume_of_a_session_still_connected_takes_it_over_and_closes_the_old_socket_1008() {
    let server = start(settings()).await;
    let mut blocker = server.connect().await;
    blocker.lock(&["busy"], "write").await;
    let mut old = server.connect().await;
    let secret = old.ask_grace(LONG_GRACE_MS).await;
    let granted = old.lock(&["k"], "write").await;
    // The old connection waits: its request is answered `taken_over` (as requests queued
    // behind it would be, like a kill's).
    old.send(json!({"command": "lock", "keys": ["busy"], "id": 1}))
        .await;
    server.wait_queued(&old.session, "busy").await;
    let session = old.session.clone();

    let mut new = Client::connect(&server.url()).await;
    let resumed = new.resume(&session, &secret).await;
    assert_eq!(resumed["success"], json!(true), "{resumed}");
    assert_eq!(resumed["tokens"], granted["tokens"]);
    let answer = old.recv().await;
    assert_eq!(answer["id"], json!(1));
    assert_eq!(answer["code"], json!("taken_over"), "{answer}");
    let (code, reason) = old.close_frame().await;
    assert_eq!(code, 1008);
    assert_eq!(reason, "session resumed on another connection");
    assert!(!wire::queued(&server.snapshot(), &session, "busy"));
    // One live connection for the session: the new one serves it.
    new.unlock(&["k"]).await;
    assert!(wire::holders(&server.snapshot(), "k").is_empty());
}

#[tokio::test]
async fn a_clean_close_releases_even_a_resumable_session() {
    let server = start(settings()).await;
    let mut client = server.connect().await;
    let secret = client.ask_grace(LONG_GRACE_MS).await;
    client.lock(&["k"], "write").await;
    let session = client.session.clone();
    client.close().await;
    server
        .wait_for("the closed session released", |s| {
            !wire::mentions(s, &session)
        })
        .await;
    let mut late = Client::connect(&server.url()).await;
    let answer = late.resume(&session, &secret).await;
    assert_eq!(answer["code"], json!("session_expired"), "{answer}");
}

#[tokio::test]
async fn resume_on_a_connection_that_already_holds_a_lock_is_refused() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    let secret = holder.ask_grace(LONG_GRACE_MS).await;
    holder.lock(&["k1"], "write").await;
    let session = holder.session.clone();
    drop(holder);
    server.wait_suspended(&session).await;

    let mut busy = server.connect().await;
    busy.lock(&["k2"], "write").await;
    let answer = busy.resume(&session, &secret).await;
    assert_eq!(answer["code"], json!("bad_request"), "{answer}");
    let own = busy.ok(json!({"command": "session"})).await;
    assert_eq!(own["session"], json!(busy.session));
    assert!(server
        .registry()
        .suspended()
        .keys()
        .any(|id| id.to_string() == session));
}

#[tokio::test]
async fn locks_and_sessions_show_a_suspended_session_and_since_when() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    let secret = holder.ask_grace(LONG_GRACE_MS).await;
    holder.lock(&["k"], "write").await;
    let session = holder.session.clone();
    let mut observer = server.connect().await;
    let sessions = observer.ok(json!({"command": "sessions"})).await;
    let entry = |sessions: &serde_json::Value| {
        sessions["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .find(|s| s["session"] == json!(session))
            .cloned()
            .expect("listed")
    };
    assert_eq!(entry(&sessions)["state"], json!("connected"));
    assert!(entry(&sessions).get("suspended_ms").is_none());

    drop(holder);
    server.wait_suspended(&session).await;
    let sessions = observer.ok(json!({"command": "sessions"})).await;
    assert_eq!(entry(&sessions)["state"], json!("suspended"));
    assert!(entry(&sessions)["suspended_ms"].is_u64());
    assert_eq!(entry(&sessions)["held"], json!(1));
    let locks = observer.locks().await;
    let holder_entry = &locks["locks"][0]["holders"][0];
    assert_eq!(holder_entry["session"], json!(session));
    assert!(holder_entry["suspended_ms"].is_u64(), "{locks}");

    let mut back = Client::connect(&server.url()).await;
    back.resume(&session, &secret).await;
    let sessions = observer.ok(json!({"command": "sessions"})).await;
    assert_eq!(entry(&sessions)["state"], json!("connected"));
    let locks = observer.locks().await;
    assert!(locks["locks"][0]["holders"][0]
        .get("suspended_ms")
        .is_none());
}

#[tokio::test]
async fn kill_releases_a_suspended_session_at_once() {
    const ADMIN: &str = "r00t-token";
    let server = start(ServerSettings {
        admin_token: Some(ADMIN.parse::<Secret>().expect("a token")),
        ..settings()
    })
    .await;
    let mut holder = server.connect().await;
    let secret = holder.ask_grace(LONG_GRACE_MS).await;
    holder.lock(&["k"], "write").await;
    let session = holder.session.clone();
    drop(holder);
    server.wait_suspended(&session).await;

    let mut admin = server.connect_as("", Some(ADMIN)).await;
    admin
        .ok(json!({"command": "kill", "session": session}))
        .await;
    // Answered after the release.
    assert!(!wire::mentions(&server.snapshot(), &session));
    assert!(server.suspensions().is_empty());
    let answer = admin.resume(&session, &secret).await;
    assert_eq!(answer["code"], json!("session_expired"), "{answer}");
}

#[tokio::test]
async fn after_a_restart_every_resume_is_expired() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    let secret = holder.ask_grace(LONG_GRACE_MS).await;
    holder.lock(&["k"], "write").await;
    let session = holder.session.clone();
    drop(holder);
    server.wait_suspended(&session).await;
    server.stop().await;

    let restarted = start(settings()).await;
    let mut client = Client::connect(&restarted.url()).await;
    let answer = client.resume(&session, &secret).await;
    assert_eq!(answer["code"], json!("session_expired"), "{answer}");
}

#[tokio::test]
async fn shutdown_releases_the_suspended_sessions() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    holder.ask_grace(LONG_GRACE_MS).await;
    holder.lock(&["k"], "write").await;
    let session = holder.session.clone();
    drop(holder);
    server.wait_suspended(&session).await;
    let locks = server.locks().clone();
    let suspensions = server.suspensions().clone();
    server.stop().await;
    assert!(suspensions.is_empty());
    wait_until("the suspended session released", || {
        locks.snapshot().is_empty() && locks.session_count() == 0
    })
    .await;
}
