//! Where the server listens: `listen::bind` with addresses written out, host names and bare
//! ports, and its refusal to start without an address it was asked for. The default (`:8008`)
//! is the bare-port case on a fixed port, so the tests use bare ports on free ports instead.

use std::net::{Ipv6Addr, SocketAddr, TcpListener};
use std::time::Duration;

use locksmith::config::ListenAddr;
use locksmith::listen::{self, BindError};

/// Longest a bind may take (a name lookup of `localhost` included).
const PATIENCE: Duration = Duration::from_secs(10);

async fn bind(listen: &[ListenAddr]) -> Result<Vec<tokio::net::TcpListener>, BindError> {
    tokio::time::timeout(PATIENCE, listen::bind(listen))
        .await
        .expect("bind finished in time")
}

fn local_addrs(listeners: &[tokio::net::TcpListener]) -> Vec<SocketAddr> {
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address"))
        .collect()
}

/// Can this host bind `[::1]`? (Where it cannot, the IPv6 half of a test has nothing to check.)
fn ipv6_available() -> bool {
    TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// Binds a bare port that was free a moment ago, trying a few in case another process takes
/// one in between.
async fn bind_some_bare_port() -> (u16, Vec<tokio::net::TcpListener>) {
    let mut last = None;
    for _ in 0..10 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        match bind(&[ListenAddr::Port(port)]).await {
            Ok(listeners) => return (port, listeners),
            Err(error) => last = Some(error),
        }
    }
    panic!("no free bare port in 10 tries: {last:?}");
}

#[tokio::test]
async fn a_busy_ipv4_default_address_stops_the_start_naming_it() {
    // Story: 127.0.0.1:8008 was taken by another program; the server started on [::1]:8008
    // alone, with a warning, and `ws://localhost:8008` reached the other program.
    let other_program = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = other_program.local_addr().expect("local address");
    let error = bind(&[ListenAddr::Port(busy.port())])
        .await
        .expect_err("a busy default address must stop the start");
    match &error {
        BindError::Listen { addr, source } => {
            assert_eq!(*addr, busy);
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
        }
        other => panic!("unexpected error {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(&format!("cannot listen on {busy}")),
        "message: {message}"
    );
}

#[tokio::test]
async fn a_busy_ipv6_default_address_stops_the_start_too() {
    if !ipv6_available() {
        eprintln!("no IPv6 on this host: nothing to check");
        return;
    }
    let other_program = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).expect("bind");
    let busy = other_program.local_addr().expect("local address");
    let error = bind(&[ListenAddr::Port(busy.port())])
        .await
        .expect_err("a busy IPv6 default address is not 'IPv6 unavailable'");
    assert!(
        matches!(&error, BindError::Listen { addr, .. } if *addr == busy),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_bare_port_listens_on_both_loopback_addresses() {
    let (port, listeners) = bind_some_bare_port().await;
    let mut expected = vec![SocketAddr::from(([127, 0, 0, 1], port))];
    if ipv6_available() {
        expected.push(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
    }
    assert_eq!(local_addrs(&listeners), expected);
}

#[tokio::test]
async fn a_host_name_listens_on_every_address_it_resolves_to() {
    let listeners = bind(&[ListenAddr::Host {
        name: "localhost".into(),
        port: 0,
    }])
    .await
    .expect("localhost resolves and binds");
    let addrs = local_addrs(&listeners);
    assert!(!addrs.is_empty());
    assert!(
        addrs.iter().all(|addr| addr.ip().is_loopback()),
        "{addrs:?}"
    );
}

#[tokio::test]
async fn an_address_named_twice_is_bound_once() {
    let (port, listeners) = bind_some_bare_port().await;
    drop(listeners);
    let ipv4 = SocketAddr::from(([127, 0, 0, 1], port));
    let listeners = bind(&[ListenAddr::Socket(ipv4), ListenAddr::Port(port)])
        .await
        .expect("127.0.0.1 is bound once, not twice");
    let addrs = local_addrs(&listeners);
    assert_eq!(addrs.iter().filter(|a| **a == ipv4).count(), 1, "{addrs:?}");
}
