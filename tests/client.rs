//! The client library (`locksmith::client`) against the real server in-process: typed answers,
//! typed errors that mirror the wire codes, pipelining, and what a caller sees when the
//! connection ends.

mod fake;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use fake::{fake_server, next_request};
use locksmith::client::{Client, ClientError, Grant};
use locksmith::lock::LockMode::{Exclusive, Shared};
use locksmith::server::ServerSettings;
use serde_json::json;
use tokio::task::JoinHandle;
use wire::{connect_client, settings, start, BOUND};

/// A client waiting for `key`, held by another: (holder, waiter, the waiter's pending `lock`).
async fn queued_behind_a_holder(
    server: &wire::Server,
    key: &'static str,
) -> (Client, Arc<Client>, JoinHandle<Result<Grant, ClientError>>) {
    let holder = connect_client(&server.url()).await;
    let waiter = Arc::new(connect_client(&server.url()).await);
    holder.lock(&[key], Exclusive, None).await.expect("lock");
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.lock(&[key], Exclusive, None).await })
    };
    server.wait_queued(waiter.session_id(), key).await;
    (holder, waiter, waiting)
}

#[tokio::test]
async fn calls_pipelined_from_many_tasks_on_one_client_each_get_their_own_answer() {
    let server = start(settings()).await;
    let client = std::sync::Arc::new(connect_client(&server.url()).await);
    let mut tasks = Vec::new();
    for n in 0..200 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("k{n}");
            client
                .write(&[(key.as_str(), json!(n))], false)
                .await
                .expect("write");
            let values = client.read(&[key.as_str()], false).await.expect("read");
            assert_eq!(
                values[&key],
                json!(n),
                "the answer of this call, not another's"
            );
        }));
    }
    for task in tasks {
        tokio::time::timeout(BOUND, task)
            .await
            .expect("in time")
            .expect("task");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_grant_carries_a_fencing_token_per_key_that_increases() {
    let server = start(settings()).await;
    let client = connect_client(&server.url()).await;
    let first = client
        .lock(&["a", "b"], Exclusive, None)
        .await
        .expect("lock");
    client.unlock(&["a", "b"]).await.expect("unlock");
    let second = client.lock(&["a"], Shared, None).await.expect("lock");
    assert_eq!(first.tokens.len(), 2);
    assert!(second.tokens["a"] > first.tokens["a"]);
    server.stop().await;
}

#[tokio::test]
async fn errors_mirror_the_wire_codes_with_their_details() {
    let server = start(settings()).await;
    let a = connect_client(&server.url()).await;
    let b = connect_client(&server.url()).await;
    a.lock(&["k"], Exclusive, None).await.expect("lock");
    match b.lock(&["k"], Exclusive, Some(Duration::ZERO)).await {
        Err(ClientError::Timeout { key, .. }) => assert_eq!(key, "k"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    match b.unlock(&["k", "z"]).await {
        Err(ClientError::NotHeld { keys, .. }) => assert_eq!(keys, ["k", "z"]),
        other => panic!("expected not_held, got {other:?}"),
    }
    let unknown = b.request(json!({"command": "dance"})).await;
    assert_eq!(
        unknown.map_err(|e| e.code().to_owned()),
        Err("unknown_command".into())
    );
    server.stop().await;
}

#[tokio::test]
async fn a_deadlock_error_names_the_cycle_starting_with_the_refused_session() {
    let server = start(settings()).await;
    let a = std::sync::Arc::new(connect_client(&server.url()).await);
    let b = connect_client(&server.url()).await;
    a.lock(&["k1"], Exclusive, None).await.expect("a takes k1");
    b.lock(&["k2"], Exclusive, None).await.expect("b takes k2");
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { a.lock(&["k2"], Exclusive, None).await })
    };
    server.wait_queued(a.session_id(), "k2").await;
    match b.lock(&["k1"], Exclusive, None).await {
        Err(ClientError::Deadlock { cycle, .. }) => {
            let members: Vec<(&str, &str)> = cycle
                .iter()
                .map(|m| (m.session.as_str(), m.waiting_for_key.as_str()))
                .collect();
            assert_eq!(members, [(b.session_id(), "k1"), (a.session_id(), "k2")]);
        }
        other => panic!("expected a deadlock, got {other:?}"),
    }
    b.unlock(&["k2"]).await.expect("unlock");
    let granted = tokio::time::timeout(BOUND, waiting).await.expect("in time");
    assert!(granted.expect("task").is_ok());
    server.stop().await;
}

#[tokio::test]
async fn a_waiting_call_is_answered_shutting_down_when_the_server_stops_then_lost_resolves() {
    let server = start(settings()).await;
    let (_holder, waiter, waiting) = queued_behind_a_holder(&server, "k").await;
    server.stop().await;
    let answer = tokio::time::timeout(BOUND, waiting)
        .await
        .expect("in time")
        .expect("task");
    assert_eq!(answer.expect_err("not granted").code(), "shutting_down");
    let lost = tokio::time::timeout(BOUND, waiter.lost())
        .await
        .expect("lost resolves");
    assert_eq!(lost.code(), "connection_lost", "{lost}");
    assert!(waiter.is_lost());
    let after = waiter.ping().await.expect_err("no more calls");
    assert_eq!(after.code(), "connection_lost");
}

/// A server that answers `hello`, reads one more request and drops the connection without
/// answering it.
async fn server_that_drops_the_second_request() -> String {
    let (url, listener) = fake_server().await;
    tokio::spawn(async move {
        let mut ws = accept_and_answer_hello(listener).await;
        next_request(&mut ws).await;
        drop(ws);
    });
    url
}

/// Accepts one client and answers its `hello` as session `s-1`.
async fn accept_and_answer_hello(listener: tokio::net::TcpListener) -> fake::Ws {
    let mut ws = fake::accept(&listener).await;
    let hello = next_request(&mut ws).await;
    fake::answer(&mut ws, &hello, json!({"session": "s-1"})).await;
    ws
}

#[tokio::test]
async fn a_call_in_flight_when_the_connection_breaks_fails_with_connection_lost() {
    let url = server_that_drops_the_second_request().await;
    let client = connect_client(&url).await;
    assert_eq!(client.session_id(), "s-1");
    let answer = tokio::time::timeout(BOUND, client.lock(&["k"], Exclusive, None))
        .await
        .expect("answered in time");
    assert_eq!(answer.expect_err("never granted").code(), "connection_lost");
    let lost = tokio::time::timeout(BOUND, client.lost())
        .await
        .expect("lost resolves");
    assert_eq!(lost.code(), "connection_lost");
}

#[tokio::test]
async fn connecting_to_a_full_server_fails_with_server_busy() {
    let server = start(ServerSettings {
        max_connections: 1,
        ..settings()
    })
    .await;
    let first = connect_client(&server.url()).await;
    let refused = tokio::time::timeout(BOUND, Client::connect(&server.url()))
        .await
        .expect("answered in time");
    match refused {
        Err(error) => assert_eq!(error.code(), "server_busy", "{error}"),
        Ok(_) => panic!("a second connection was accepted over the limit"),
    }
    first.close().await;
    server.stop().await;
}

#[tokio::test]
async fn connecting_where_nothing_listens_fails_with_connect() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let error = tokio::time::timeout(BOUND, Client::connect(&format!("ws://{addr}/ws")))
        .await
        .expect("in time")
        .err()
        .expect("nothing listens there");
    assert_eq!(error.code(), "connect");
}

#[tokio::test]
async fn closing_a_client_releases_its_locks() {
    let server = start(settings()).await;
    let client = connect_client(&server.url()).await;
    client.lock(&["k"], Exclusive, None).await.expect("lock");
    client.close().await;
    server.wait_idle().await;
    server.stop().await;
}

#[tokio::test]
async fn a_server_that_stops_answering_pings_is_noticed_by_the_keepalive() {
    let (url, listener) = fake_server().await;
    let (silenced, silence) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let ws = accept_and_answer_hello(listener).await;
        // From now on nothing is read, so no ping is answered; the socket stays open until
        // the test ends.
        let _ = silence.await;
        drop(ws);
    });
    let client = tokio::time::timeout(
        BOUND,
        Client::builder(&url)
            .keepalive(Some(Duration::from_millis(50)))
            .connect(),
    )
    .await
    .expect("in time")
    .expect("connect");
    let lost = tokio::time::timeout(BOUND, client.lost())
        .await
        .expect("the silence is noticed");
    assert_eq!(lost.code(), "connection_lost");
    assert!(lost.to_string().contains("nothing heard"), "{lost}");
    drop(silenced);
}

#[tokio::test]
async fn a_named_client_is_shown_by_name_in_sessions_and_locks() {
    let server = start(settings()).await;
    let client = tokio::time::timeout(
        BOUND,
        Client::builder(&server.url()).name("billing").connect(),
    )
    .await
    .expect("in time")
    .expect("connect");
    assert_eq!(client.name(), Some("billing"));
    client
        .lock(&["invoice/7"], Exclusive, None)
        .await
        .expect("lock");
    let sessions = client.sessions().await.expect("sessions");
    let me = sessions
        .iter()
        .find(|s| s.session == client.session_id())
        .expect("listed");
    assert_eq!(me.name.as_deref(), Some("billing"));
    assert_eq!(me.held, 1);
    assert!(me.peer.starts_with("127.0.0.1:"), "{}", me.peer);
    let table = client.locks(Some("invoice/")).await.expect("locks");
    assert_eq!(table.locks.len(), 1);
    assert_eq!(table.locks[0].holders[0].name.as_deref(), Some("billing"));
    assert!(table.locks[0].holders[0].held_ms.is_some());
    let renamed = client.hello(Some("billing-2")).await.expect("hello");
    assert_eq!(renamed.name.as_deref(), Some("billing-2"));
    server.stop().await;
}

#[tokio::test]
async fn delete_and_keys_page_through_what_is_stored() {
    let server = start(settings()).await;
    let client = connect_client(&server.url()).await;
    let entries: Vec<(String, serde_json::Value)> =
        (0..5).map(|n| (format!("p/{n}"), json!(n))).collect();
    client.write(&entries, false).await.expect("write");
    let first = client.keys("p/", Some(2), None).await.expect("keys");
    assert_eq!(first.keys, ["p/0", "p/1"]);
    let second = client
        .keys("p/", Some(2), first.next.as_deref())
        .await
        .expect("keys");
    assert_eq!(second.keys, ["p/2", "p/3"]);
    let last = client
        .keys("p/", Some(2), second.next.as_deref())
        .await
        .expect("keys");
    assert_eq!(
        (last.keys.as_slice(), last.next),
        (&["p/4".to_owned()][..], None)
    );
    let deleted = client.delete(&["p/0", "p/9"], false).await.expect("delete");
    assert_eq!(deleted.deleted, 1);
    assert_eq!(deleted.tokens.len(), 2);
    assert_eq!(
        client.read(&["p/0"], false).await.expect("read")["p/0"],
        json!(null)
    );
    server.stop().await;
}

#[tokio::test]
async fn cancel_withdraws_this_clients_wait_which_fails_cancelled() {
    let server = start(settings()).await;
    let (_holder, waiter, waiting) = queued_behind_a_holder(&server, "k").await;
    assert!(
        waiter.cancel().await.expect("cancel"),
        "a wait was withdrawn"
    );
    let answer = tokio::time::timeout(BOUND, waiting).await.expect("in time");
    assert_eq!(
        answer.expect("task").expect_err("withdrawn").code(),
        "cancelled"
    );
    assert!(
        !waiter.cancel().await.expect("cancel"),
        "nothing left to withdraw"
    );
    waiter.ping().await.expect("the connection goes on");
    server.stop().await;
}

#[tokio::test]
async fn a_killed_client_sees_its_wait_answered_killed_and_its_connection_lost() {
    let server = start(ServerSettings {
        admin_token: Some("admin".parse().expect("token")),
        ..settings()
    })
    .await;
    let admin = tokio::time::timeout(
        BOUND,
        Client::builder(&server.url()).token("admin").connect(),
    )
    .await
    .expect("in time")
    .expect("connect");
    let (holder, victim, waiting) = queued_behind_a_holder(&server, "k").await;
    let forbidden = holder
        .kill(victim.session_id())
        .await
        .expect_err("not an admin");
    assert_eq!(forbidden.code(), "forbidden");
    admin.kill(victim.session_id()).await.expect("kill");
    let answer = tokio::time::timeout(BOUND, waiting).await.expect("in time");
    assert_eq!(answer.expect("task").expect_err("killed").code(), "killed");
    let lost = tokio::time::timeout(BOUND, victim.lost())
        .await
        .expect("closed");
    assert!(lost.to_string().contains("1008"), "{lost}");
    let missing = admin.kill(victim.session_id()).await.expect_err("gone");
    assert_eq!(missing.code(), "not_found");
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_token_is_unauthorized() {
    let server = start(ServerSettings {
        token: Some("right".parse().expect("token")),
        ..settings()
    })
    .await;
    for builder in [
        Client::builder(&server.url()),
        Client::builder(&server.url()).token("wrong"),
    ] {
        let refused = tokio::time::timeout(BOUND, builder.connect())
            .await
            .expect("in time");
        assert_eq!(
            refused.err().map(|e| e.code().to_owned()),
            Some("unauthorized".into())
        );
    }
    let admitted = tokio::time::timeout(
        BOUND,
        Client::builder(&server.url()).token("right").connect(),
    )
    .await
    .expect("in time");
    assert!(admitted.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn a_token_on_the_url_never_shows_in_a_connect_error() {
    let connecting = Client::builder("ws://127.0.0.1:1/ws?token=SUPERSECRET")
        .token("ALSOSECRET")
        .connect();
    let error = match tokio::time::timeout(BOUND, connecting)
        .await
        .expect("in time")
    {
        Err(error) => error,
        Ok(_) => panic!("nothing listens on port 1"),
    };
    assert_eq!(error.code(), "connect", "{error}");
    for shown in [error.to_string(), format!("{error:?}")] {
        assert!(!shown.contains("SUPERSECRET"), "{shown}");
        assert!(!shown.contains("ALSOSECRET"), "{shown}");
        assert!(shown.contains("token=<hidden>"), "{shown}");
    }
}
