//! Who may connect, and who is an administrator: the `--token` and `--admin-token` checks.
//!
//! A client presents a token as `Authorization: Bearer <token>` or as `?token=<token>` on the
//! URL. With `--token` set, every request except `/healthz` must present it (or the admin
//! token), or it is refused with 401 before any upgrade. A connection that presents the admin
//! token is an admin connection (it may `kill`). Tokens are compared in constant time
//! ([`subtle`]), so the time a refusal takes does not tell an attacker how much of a guess was
//! right (only a token's length can leak). A token is never logged: [`Secret`]'s `Debug` hides
//! it, and nothing logs request URLs, which may carry `?token=`.

use std::fmt;
use std::str::FromStr;

use axum::http::{header, HeaderMap, Uri};
use subtle::ConstantTimeEq;

/// A token: from the server's configuration, or the one a client presents. Its `Debug` and
/// `Display` never show it; [`Secret::reveal`] is the only way to its text.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret as given, without [`FromStr`]'s emptiness check: a client's token (a client
    /// sends what it was given and the server judges it), or a session's resume secret.
    pub(crate) fn client_token(text: String) -> Secret {
        Secret(text)
    }

    /// Does `presented` equal this secret? In constant time for tokens of equal length.
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }

    /// The secret's text. This is the one place a secret is revealed: the client calls it to
    /// build the `Authorization: Bearer` header it sends and the `resume` request of a
    /// resumable session, and nothing else should. Never format, print or log what it returns.
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err("a token must not be empty".into());
        }
        Ok(Secret(text.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<hidden>")
    }
}

/// The tokens the server checks.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    /// Needed by every request except `/healthz` (`None`: no token needed).
    pub token: Option<Secret>,
    /// Makes a connection an admin connection; also accepted where `token` is needed.
    pub admin_token: Option<Secret>,
}

/// What a request may do, once its token (if any) was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// It presented the admin token.
    pub admin: bool,
}

/// Why a request is refused with 401. The text never includes a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unauthorized {
    /// No token was presented.
    #[error("unauthorized: this server needs a token (Authorization: Bearer <token>, or ?token=)")]
    Missing,
    /// A token was presented but it is not the right one.
    #[error("unauthorized: wrong token")]
    Wrong,
}

impl Tokens {
    /// Checks the token a request presents (see the module documentation).
    ///
    /// # Errors
    /// [`Unauthorized`] when `--token` is set and the request presents neither it nor the admin
    /// token.
    pub fn check(&self, headers: &HeaderMap, uri: &Uri) -> Result<Access, Unauthorized> {
        let presented = presented_token(headers, uri);
        let presented = presented.as_deref();
        let admin = match (&self.admin_token, presented) {
            (Some(admin), Some(presented)) => admin.matches(presented),
            _ => false,
        };
        match (&self.token, presented) {
            (None, _) => Ok(Access { admin }),
            (Some(_), _) if admin => Ok(Access { admin }),
            (Some(token), Some(presented)) if token.matches(presented) => Ok(Access { admin }),
            (Some(_), Some(_)) => Err(Unauthorized::Wrong),
            (Some(_), None) => Err(Unauthorized::Missing),
        }
    }
}

/// The token a request presents: the `Authorization: Bearer` header, else `?token=`.
fn presented_token(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().split_once(' '))
        // The scheme is case-insensitive (RFC 9110, 11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    bearer.or_else(|| query_parameter(uri, "token"))
}

/// The (percent-decoded) value of parameter `name` in `uri`'s query, if present.
pub fn query_parameter(uri: &Uri, name: &str) -> Option<String> {
    let axum::extract::Query(pairs) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri).ok()?;
    pairs
        .into_iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn secret(text: &str) -> Option<Secret> {
        Some(Secret(text.to_owned()))
    }

    fn check(tokens: &Tokens, header: Option<&str>, uri: &str) -> Result<Access, Unauthorized> {
        let mut headers = HeaderMap::new();
        if let Some(value) = header {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(value).expect("header"),
            );
        }
        tokens.check(&headers, &uri.parse().expect("uri"))
    }

    #[test]
    fn with_a_token_set_a_request_needs_it_or_the_admin_token() {
        let tokens = Tokens {
            token: secret("s3cret"),
            admin_token: secret("r00t"),
        };
        let user = Ok(Access { admin: false });
        let admin = Ok(Access { admin: true });
        assert_eq!(check(&tokens, None, "/ws"), Err(Unauthorized::Missing));
        assert_eq!(
            check(&tokens, Some("Bearer nope"), "/ws"),
            Err(Unauthorized::Wrong)
        );
        assert_eq!(
            check(&tokens, None, "/ws?token=nope"),
            Err(Unauthorized::Wrong)
        );
        assert_eq!(check(&tokens, Some("Bearer s3cret"), "/ws"), user);
        assert_eq!(check(&tokens, Some("bearer s3cret"), "/ws"), user);
        assert_eq!(
            check(&tokens, Some("Basic s3cret"), "/ws"),
            Err(Unauthorized::Missing)
        );
        assert_eq!(check(&tokens, None, "/ws?name=x&token=s3cret"), user);
        assert_eq!(check(&tokens, Some("Bearer r00t"), "/ws"), admin);
        assert_eq!(check(&tokens, None, "/ws?token=r00t"), admin);
    }

    #[test]
    fn without_a_token_set_anyone_connects_and_only_the_admin_token_makes_an_admin() {
        let tokens = Tokens {
            token: None,
            admin_token: secret("r00t"),
        };
        assert_eq!(check(&tokens, None, "/ws"), Ok(Access { admin: false }));
        assert_eq!(
            check(&tokens, Some("Bearer x"), "/ws"),
            Ok(Access { admin: false })
        );
        assert_eq!(
            check(&tokens, Some("Bearer r00t"), "/ws"),
            Ok(Access { admin: true })
        );
        let open = Tokens::default();
        assert_eq!(
            check(&open, Some("Bearer r00t"), "/ws"),
            Ok(Access { admin: false })
        );
    }

    #[test]
    fn a_secret_never_shows_in_debug_or_display() {
        let tokens = Tokens {
            token: secret("s3cret"),
            admin_token: None,
        };
        assert!(!format!("{tokens:?}").contains("s3cret"));
        assert!(!format!("{}", Secret("s3cret".into())).contains("s3cret"));
    }
}
