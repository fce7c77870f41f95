//! Resumable sessions over the wire (docs/semantics.md, S15): a session that asked for a grace
//! period outlives a dropped connection with its locks, and `resume` on a new connection gets it
//! back — or, once the grace has run out, finds it released.
//!
//! A dropped connection here is a socket dropped without a close frame (the server reads end of
//! stream without the closing handshake), or, through the TCP proxy of `tests/proxy`, a
//! connection reset on both sides (a network blip) or a path that stops carrying bytes (a
//! half-dead socket).

mod proxy;
mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use locksmith::auth::Secret;
use locksmith::server::ServerSettings;
use proxy::Proxy;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wire::{settings, start, wait_until, Client, Server};

/// A session that asked for a long grace, locked one key in write mode, and whose socket was
/// then dropped: suspended, holding the key.
struct Suspended {
    session: String,
    secret: String,
    /// Its `lock` answer.
    granted: Value,
}

/// Makes a [`Suspended`] session on `server` holding `key`.
async fn suspended_holder(server: &Server, key: &str) -> Suspended {
    let mut holder = server.connect().await;
    let secret = holder.ask_grace(LONG_GRACE_MS).await;
    let granted = holder.lock(&[key], "write").await;
    let session = holder.session.clone();
    drop(holder);
    server.wait_suspended(&session).await;
    Suspended {
        session,
        secret,
        granted,
    }
}

/// A client whose `lock` of `key` (id `"r"`) waits in its queue.
async fn queued_rival(server: &Server, key: &str) -> Client {
    let mut rival = server.connect().await;
    rival
        .send(json!({"command": "lock", "keys": [key], "id": "r"}))
        .await;
    server.wait_queued(&rival.session, key).await;
    rival
}

/// Checks that a `resume` of `session` with `secret`, from a new connection, is answered
/// `session_expired`.
async fn assert_resume_expired(server: &Server, session: &str, secret: &str) {
    let mut late = Client::connect(&server.url()).await;
    let answer = late.resume(session, secret).await;
    assert_eq!(answer["code"], json!("session_expired"), "{answer}");
}

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
    let mut rival = queued_rival(&server, "k1").await;

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
    let granted = holder.lock(&["k"], "write").await;
    let session = holder.session.clone();
    let mut rival = queued_rival(&server, "k").await;

    drop(holder);
    server.wait_suspended(&session).await;
    // Granted only when the grace has run out: the answer is the release, not a timeout. The
    // next holder's fencing token is higher.
    let answer = rival.recv().await;
    assert_eq!(answer["success"], json!(true), "{answer}");
    assert!(answer["tokens"]["k"].as_u64() > granted["tokens"]["k"].as_u64());
    assert!(!wire::mentions(&server.snapshot(), &session));
    assert_eq!(server.suspensions().counts().expired, 1);

    assert_resume_expired(&server, &session, &secret).await;
}

#[tokio::test]
async fn a_wrong_secret_is_forbidden_and_leaves_the_suspended_session_as_it_was() {
    let server = start(settings()).await;
    let Suspended {
        session, secret, ..
    } = suspended_holder(&server, "k").await;

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
async fn two_resumes_of_one_session_at_once_leave_exactly_one_connection_serving_it() {
    let server = start(settings()).await;
    let Suspended {
        session,
        secret,
        granted,
        ..
    } = suspended_holder(&server, "k").await;

    let mut first = Client::connect(&server.url()).await;
    let mut second = Client::connect(&server.url()).await;
    let (a, b) = tokio::join!(
        first.resume(&session, &secret),
        second.resume(&session, &secret)
    );
    // Both succeed: whichever came second took the session over from the first.
    assert_eq!(a["tokens"], granted["tokens"], "{a}");
    assert_eq!(b["tokens"], granted["tokens"], "{b}");
    let mut serving = 0;
    for client in [&mut first, &mut second] {
        client.send(json!({"command": "ping", "id": "p"})).await;
        match client.recv_frame().await {
            Some(Ok(Message::Text(text))) => {
                let answer: Value = serde_json::from_str(text.as_str()).expect("JSON");
                assert_eq!(answer["success"], json!(true), "{answer}");
                serving += 1;
            }
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1008),
            other => panic!("expected an answer or a close frame, got {other:?}"),
        }
    }
    assert_eq!(serving, 1, "one live connection per session");
    assert_eq!(wire::holders(&server.snapshot(), "k")[0].0, session);
}

#[tokio::test]
async fn a_resumable_session_silenced_by_the_idle_timeout_is_suspended_not_released() {
    let server = start(ServerSettings {
        idle_timeout: Some(Duration::from_millis(300)),
        ..settings()
    })
    .await;
    let mut holder = server.connect().await;
    let secret = holder.ask_grace(LONG_GRACE_MS).await;
    let granted = holder.lock(&["k"], "write").await;
    let session = holder.session.clone();
    // The client stops reading (so it answers no ping): a half-open connection to the server,
    // which closes it at the idle timeout.
    server.wait_suspended(&session).await;
    assert_eq!(wire::holders(&server.snapshot(), "k")[0].0, session);
    let mut back = Client::connect(&server.url()).await;
    let resumed = back.resume(&session, &secret).await;
    assert_eq!(resumed["tokens"], granted["tokens"], "{resumed}");
    drop(holder);
}

#[tokio::test]
async fn at_most_max_connections_sessions_are_suspended_but_a_takeover_is_never_refused_by_the_limit(
) {
    let server = start(ServerSettings {
        max_connections: 2,
        ..settings()
    })
    .await;
    suspended_holder(&server, "k1").await;
    suspended_holder(&server, "k2").await;
    assert_eq!(server.suspensions().len(), 2);
    // The limit is reached: a third resumable session that drops is released at once.
    let mut over = server.connect().await;
    over.ask_grace(LONG_GRACE_MS).await;
    over.lock(&["k3"], "write").await;
    let over_session = over.session.clone();
    drop(over);
    server
        .wait_for("the session over the limit released", |s| {
            !wire::mentions(s, &over_session)
        })
        .await;
    assert_eq!(server.suspensions().counts().refused_over_limit, 1);

    // A takeover at the limit: the session only changes connections, so it goes through.
    let mut old = server.connect().await;
    let secret = old.ask_grace(LONG_GRACE_MS).await;
    let granted = old.lock(&["k4"], "write").await;
    let session = old.session.clone();
    let mut new = Client::connect(&server.url()).await;
    let resumed = new.resume(&session, &secret).await;
    assert_eq!(resumed["tokens"], granted["tokens"], "{resumed}");
    assert_eq!(wire::holders(&server.snapshot(), "k4")[0].0, session);
    assert_eq!(server.suspensions().len(), 2);
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
    assert_resume_expired(&server, &session, &secret).await;
}

#[tokio::test]
async fn resume_on_a_connection_that_already_holds_a_lock_is_refused() {
    let server = start(settings()).await;
    let Suspended {
        session, secret, ..
    } = suspended_holder(&server, "k1").await;

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
    let Suspended {
        session, secret, ..
    } = suspended_holder(&server, "k").await;

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
    let Suspended {
        session, secret, ..
    } = suspended_holder(&server, "k").await;
    server.stop().await;

    let restarted = start(settings()).await;
    assert_resume_expired(&restarted, &session, &secret).await;
}

#[tokio::test]
async fn shutdown_releases_the_suspended_sessions() {
    let server = start(settings()).await;
    suspended_holder(&server, "k").await;
    let locks = server.locks().clone();
    let suspensions = server.suspensions().clone();
    server.stop().await;
    assert!(suspensions.is_empty());
    wait_until("the suspended session released", || {
        locks.snapshot().is_empty() && locks.session_count() == 0
    })
    .await;
}

#[tokio::test]
async fn a_blip_that_resets_the_connection_suspends_the_session_and_resume_through_the_network_gets_it_back(
) {
    let server = start(settings()).await;
    let proxy = Proxy::start(server.addr).await;
    let mut holder = Client::connect(&proxy.url()).await;
    holder.learn_session().await;
    let secret = holder.ask_grace(LONG_GRACE_MS).await;
    let granted = holder.lock(&["k"], "write").await;
    let session = holder.session.clone();
    let mut rival = queued_rival(&server, "k").await;

    assert_eq!(proxy.cut(), 1);
    server.wait_suspended(&session).await;
    assert!(wire::queued(&server.snapshot(), &rival.session, "k"));
    let mut back = Client::connect(&proxy.url()).await;
    let resumed = back.resume(&session, &secret).await;
    assert_eq!(resumed["tokens"], granted["tokens"], "{resumed}");
    back.unlock(&["k"]).await;
    assert_eq!(rival.recv().await["id"], json!("r"));
}

#[tokio::test]
async fn resume_takes_over_a_half_dead_connection_without_waiting_for_it() {
    let server = start(settings()).await;
    let proxy = Proxy::start(server.addr).await;
    let mut old = Client::connect(&proxy.url()).await;
    old.learn_session().await;
    let secret = old.ask_grace(LONG_GRACE_MS).await;
    let granted = old.lock(&["k"], "write").await;
    let session = old.session.clone();

    // The path stops carrying bytes: neither side sees an error, the server still thinks the old
    // connection is alive (no idle timeout here), and the takeover's last words to it cannot be
    // delivered.
    proxy.stall();
    let mut new = Client::connect(&proxy.url()).await;
    let resumed = new.resume(&session, &secret).await;
    assert_eq!(resumed["success"], json!(true), "{resumed}");
    assert_eq!(resumed["tokens"], granted["tokens"]);
    new.unlock(&["k"]).await;
    assert!(wire::holders(&server.snapshot(), "k").is_empty());
    proxy.cut();
}

/// How many sessions [`a_thousand_sessions_suspended_and_resumed_at_once_lose_and_duplicate_no_lock`]
/// drops and resumes at once.
const MANY: usize = 1000;

/// An exclusion counter kept by the clients themselves, independent of the server: each client
/// adds one while it believes it holds a key's exclusive lock. Two at once is a duplicated lock.
#[derive(Clone, Default)]
struct Exclusion(Arc<HashMap<String, AtomicI32>>);

impl Exclusion {
    fn new(keys: &[String]) -> Self {
        Exclusion(Arc::new(
            keys.iter()
                .map(|k| (k.clone(), AtomicI32::new(0)))
                .collect(),
        ))
    }

    fn enter(&self, key: &str) {
        let before = self.0[key].fetch_add(1, Ordering::SeqCst);
        assert_eq!(before, 0, "two holders of {key} at once");
    }

    fn leave(&self, key: &str) {
        self.0[key].fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sessions_suspended_and_resumed_at_once_lose_and_duplicate_no_lock() {
    // Each of the MANY holders and rivals is a socket on each side in this process, and each
    // holder two more in the proxy.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-file limit");
    let server = start(settings()).await;
    let proxy = Proxy::start(server.addr).await;
    let keys: Vec<String> = (0..MANY).map(|i| format!("k{i}")).collect();
    let exclusion = Exclusion::new(&keys);

    // Every holder takes its key through the proxy, with a grace; every rival queues behind it
    // on a direct connection.
    let mut holders = Vec::with_capacity(MANY);
    for key in &keys {
        let mut holder = Client::connect(&proxy.url()).await;
        holder.learn_session().await;
        let secret = holder.ask_grace(LONG_GRACE_MS).await;
        let token = holder.lock(&[key], "write").await["tokens"][key].clone();
        exclusion.enter(key);
        holders.push((holder, secret, token));
    }
    let mut rivals = Vec::with_capacity(MANY);
    for key in &keys {
        let mut rival = Client::connect(&server.url()).await;
        rival
            .send(json!({"command": "lock", "keys": [key], "id": key}))
            .await;
        rivals.push(rival);
    }
    server
        .wait_for("every rival queued", |s| {
            s.keys.iter().filter(|k| k.queue.len() == 1).count() == MANY
        })
        .await;

    // The blip: every holder's connection is reset at once (the clients' own sockets go after
    // it, so they cannot close first).
    assert_eq!(proxy.cut(), MANY);
    let sessions: Vec<(String, String, Value)> = holders
        .into_iter()
        .map(|(holder, secret, token)| (holder.session.clone(), secret, token))
        .collect();
    let suspensions = server.suspensions().clone();
    wait_until("every holder suspended", || suspensions.len() == MANY).await;
    // Meanwhile each rival keeps waiting on its connection; the rival tasks start now, and any
    // that were granted during the blip would enter while the holder is still inside.
    let rival_tasks: Vec<_> = rivals
        .into_iter()
        .zip(keys.clone())
        .zip(sessions.iter().map(|(_, _, token)| token.clone()))
        .map(|((mut rival, key), holder_token)| {
            let exclusion = exclusion.clone();
            tokio::spawn(async move {
                let answer = rival.recv_within(Duration::from_secs(60)).await;
                assert_eq!(answer["success"], json!(true), "{answer}");
                exclusion.enter(&key);
                let token = answer["tokens"][&key].as_u64().expect("a token");
                assert!(token > holder_token.as_u64().expect("a token"), "fencing");
                exclusion.leave(&key);
                rival.unlock(&[&key]).await;
            })
        })
        .collect();

    // Every holder resumes at once through the proxy, finds its lock with its token, leaves the
    // critical section and unlocks.
    let holder_tasks: Vec<_> = sessions
        .into_iter()
        .zip(keys.clone())
        .map(|((session, secret, token), key)| {
            let url = proxy.url();
            let exclusion = exclusion.clone();
            tokio::spawn(async move {
                let mut back = Client::connect(&url).await;
                let resumed = back.resume(&session, &secret).await;
                assert_eq!(resumed["success"], json!(true), "{resumed}");
                assert_eq!(resumed["tokens"][&key], token, "the same lock");
                exclusion.leave(&key);
                back.unlock(&[&key]).await;
                // A goodbye, not another blip: the session ends here.
                back.close().await;
            })
        })
        .collect();
    for task in holder_tasks.into_iter().chain(rival_tasks) {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("in time")
            .expect("no assertion failed");
    }
    let counts = suspensions.counts();
    assert_eq!(
        (counts.suspended, counts.resumed, counts.expired),
        (MANY as u64, MANY as u64, 0)
    );
    server
        .wait_for("every key free", |s| s.keys.is_empty())
        .await;
}
