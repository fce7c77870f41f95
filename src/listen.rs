//! Where the server listens: the `--listen` values resolved and bound, before the server starts
//! ([`bind`]).
//!
//! Invariant: every address a value stands for is bound, or the start fails naming it
//! ([`BindError`]); the one exception is an IPv6 address from a host name or a bare port on a
//! host without IPv6 ([`is_unavailable_ipv6`]). Whether a bound address may be served without a
//! token is the server's question ([`crate::server::refuse_open_exposure`]).

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::config::{ListenAddr, DEFAULT_LISTEN, LOOPBACK};

/// Why the server cannot listen where it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A host name could not be resolved.
    #[error("cannot listen on {listen}: cannot resolve the name: {source}")]
    Resolve {
        /// The `--listen` value with the name.
        listen: ListenAddr,
        /// What the resolver said.
        source: io::Error,
    },
    /// A host name resolved to no address at all.
    #[error("cannot listen on {listen}: the name resolves to no address")]
    NoAddress {
        /// The `--listen` value with the name.
        listen: ListenAddr,
    },
    /// An address could not be bound: in use, not on this host, not permitted, …
    #[error("cannot listen on {addr}: {source}{}", in_use_hint(source))]
    Listen {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

/// The advice appended to a bind error when another program holds the address.
fn in_use_hint(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::AddrInUse {
        "; is another program (or another Locksmith) listening there? Choose another address with --listen"
    } else {
        ""
    }
}

/// Binds every address of `listen`, or of [`DEFAULT_LISTEN`] (`:8008`: 127.0.0.1 and `[::1]` on
/// port 8008) if `listen` is empty. A host name stands for every address it resolves to, a bare
/// port for the [`LOOPBACK`] addresses on that port; an address that two
/// values share is bound once.
///
/// Every address must be bound, or the start fails: if `127.0.0.1:8008` is taken by another
/// program, serving on `[::1]:8008` alone would let `ws://localhost:8008` reach that program. The
/// one exception is an IPv6 address that came from a host name or a bare port on a host without
/// IPv6 ([`is_unavailable_ipv6`]): it is skipped with a warning, as long as the value that named
/// it still gets at least one address. An address written out (`[::1]:8008`) is never skipped.
///
/// # Errors
/// The first name that cannot be resolved or address that cannot be bound, naming it.
pub async fn bind(listen: &[ListenAddr]) -> Result<Vec<TcpListener>, BindError> {
    let listen = if listen.is_empty() {
        std::slice::from_ref(&DEFAULT_LISTEN)
    } else {
        listen
    };
    let mut bound: Vec<SocketAddr> = Vec::new();
    let mut listeners = Vec::new();
    for value in listen {
        let (addrs, may_skip_ipv6) = resolve(value).await?;
        let mut skipped = None;
        let mut bound_here = 0usize;
        for addr in addrs {
            if bound.contains(&addr) {
                bound_here += 1;
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    bound.push(addr);
                    listeners.push(listener);
                    bound_here += 1;
                }
                Err(error) if may_skip_ipv6 && is_unavailable_ipv6(addr, &error) => {
                    tracing::warn!(%addr, %error, "IPv6 is not available on this host; not listening on {addr}");
                    skipped = Some(BindError::Listen {
                        addr,
                        source: error,
                    });
                }
                Err(error) => {
                    return Err(BindError::Listen {
                        addr,
                        source: error,
                    })
                }
            }
        }
        if let (0, Some(error)) = (bound_here, skipped) {
            return Err(error);
        }
    }
    Ok(listeners)
}

/// The socket addresses `value` stands for, and whether an IPv6 one among them may be skipped
/// where IPv6 is unavailable (for a name or a bare port, not for an address written out).
async fn resolve(value: &ListenAddr) -> Result<(Vec<SocketAddr>, bool), BindError> {
    match value {
        ListenAddr::Socket(addr) => Ok((vec![*addr], false)),
        ListenAddr::Port(port) => Ok((
            LOOPBACK
                .iter()
                .map(|ip| SocketAddr::new(*ip, *port))
                .collect(),
            true,
        )),
        ListenAddr::Host { name, port } => {
            let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), *port))
                .await
                .map_err(|source| BindError::Resolve {
                    listen: value.clone(),
                    source,
                })?
                .collect();
            // A resolver may list an address once per socket type.
            let mut seen = Vec::with_capacity(addrs.len());
            addrs.retain(|addr| {
                let first = !seen.contains(addr);
                seen.push(*addr);
                first
            });
            if addrs.is_empty() {
                return Err(BindError::NoAddress {
                    listen: value.clone(),
                });
            }
            Ok((addrs, true))
        }
    }
}

/// Does binding `addr` fail with `error` only because this host has no IPv6? True for an IPv6
/// address and `EADDRNOTAVAIL` (the address is not on this host: IPv6 disabled) or
/// `EAFNOSUPPORT` (no IPv6 in the kernel). Every other failure, above all `EADDRINUSE`, says
/// something the user must hear, so it stops the start.
pub fn is_unavailable_ipv6(addr: SocketAddr, error: &io::Error) -> bool {
    addr.is_ipv6()
        && (error.kind() == io::ErrorKind::AddrNotAvailable || is_family_unsupported(error))
}

/// Is `error` `EAFNOSUPPORT` (address family not supported)? std has no `ErrorKind` for it.
fn is_family_unsupported(error: &io::Error) -> bool {
    #[cfg(unix)]
    {
        error.raw_os_error() == Some(libc::EAFNOSUPPORT)
    }
    #[cfg(not(unix))]
    {
        let _ = error;
        false
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn ipv6() -> SocketAddr {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 8008))
    }

    fn ipv4() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8008))
    }

    #[test]
    fn ipv6_that_is_not_on_this_host_may_be_skipped() {
        let not_here = io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        let no_family = io::Error::from_raw_os_error(libc::EAFNOSUPPORT);
        assert!(is_unavailable_ipv6(ipv6(), &not_here));
        assert!(is_unavailable_ipv6(ipv6(), &no_family));
    }

    #[test]
    fn a_busy_address_is_never_skipped() {
        let in_use = io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert!(!is_unavailable_ipv6(ipv6(), &in_use));
        assert!(!is_unavailable_ipv6(ipv4(), &in_use));
    }

    #[test]
    fn ipv4_and_other_errors_are_never_skipped() {
        let not_here = io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        assert!(!is_unavailable_ipv6(ipv4(), &not_here));
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert!(!is_unavailable_ipv6(ipv6(), &denied));
        let other = io::Error::other("something else");
        assert!(!is_unavailable_ipv6(ipv6(), &other));
    }
}
