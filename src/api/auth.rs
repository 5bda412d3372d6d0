//! Bearer tokens and the two scopes of the checkpoint API.
//!
//! Read scope: `server.read_tokens` and `server.admin_tokens`. Admin scope (promote, pin):
//! `server.admin_tokens` only. Reads need no token when no read token is configured and
//! either `server.allow_anonymous = true`, or the listener is loopback and no admin token is
//! configured either. Admin routes always need an admin token. A token that is presented
//! must be known, even where reads are open.

use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::config::ServerConfig;

/// The scope a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Scope {
    /// Listing, manifests, files.
    Read,
    /// Promote, pin, unpin.
    Admin,
}

/// The configured tokens, kept as SHA-256 digests and compared in constant time.
pub(super) struct Auth {
    read: Vec<[u8; 32]>,
    admin: Vec<[u8; 32]>,
    open_reads: bool,
}

impl Auth {
    /// The rules for `server`.
    pub(super) fn new(server: &ServerConfig) -> Self {
        let digests = |tokens: &[crate::config::Secret]| {
            tokens
                .iter()
                .map(|token| digest(token.expose()))
                .collect::<Vec<_>>()
        };
        let no_tokens = server.read_tokens.is_empty() && server.admin_tokens.is_empty();
        Self {
            read: digests(&server.read_tokens),
            admin: digests(&server.admin_tokens),
            open_reads: server.read_tokens.is_empty()
                && (server.allow_anonymous || (server.listen.ip().is_loopback() && no_tokens)),
        }
    }

    /// True when reads need no token.
    pub(super) fn reads_are_open(&self) -> bool {
        self.open_reads
    }

    /// Admits a request to `scope` or says why not: 401 for a missing, malformed or unknown
    /// token, 403 for a read token on an admin route.
    pub(super) fn check(&self, headers: &HeaderMap, scope: Scope) -> Result<(), ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            if scope == Scope::Read && self.open_reads {
                return Ok(());
            }
            return Err(unauthorized("a bearer token is required"));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(bearer)
            .ok_or_else(|| unauthorized("the Authorization header is not `Bearer <token>`"))?;
        let presented = digest(token);
        let admin = contains(&self.admin, &presented);
        let read = admin | contains(&self.read, &presented);
        match scope {
            _ if admin => Ok(()),
            Scope::Read if read => Ok(()),
            Scope::Admin if read => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this route needs a token from server.admin_tokens",
            )),
            _ => Err(unauthorized("unknown token")),
        }
    }
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, message)
        .with_header(header::WWW_AUTHENTICATE, "Bearer realm=\"rebeld\"")
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares against every digest without stopping early, each in constant time.
fn contains(known: &[[u8; 32]], presented: &[u8; 32]) -> bool {
    known.iter().fold(false, |found, candidate| {
        let difference = candidate
            .iter()
            .zip(presented)
            .fold(0_u8, |acc, (a, b)| acc | (a ^ b));
        found | (difference == 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn server(listen: &str, read: &[&str], admin: &[&str], anonymous: bool) -> ServerConfig {
        let secrets = |tokens: &[&str]| tokens.iter().map(|t| Secret::new(*t)).collect();
        ServerConfig {
            listen: listen.parse().expect("address"),
            allow_anonymous: anonymous,
            read_tokens: secrets(read),
            admin_tokens: secrets(admin),
            request_timeout: std::time::Duration::from_secs(1),
            max_concurrent_downloads: 1,
            max_long_poll: std::time::Duration::from_secs(1),
            public_url: format!("http://{listen}"),
        }
    }

    fn with(token: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().expect("header");
            headers.insert(header::AUTHORIZATION, value);
        }
        headers
    }

    fn status(auth: &Auth, token: Option<&str>, scope: Scope) -> u16 {
        match auth.check(&with(token), scope) {
            Ok(()) => 200,
            Err(error) => error.status.as_u16(),
        }
    }

    #[test]
    fn open_reads_follow_the_documented_rule() {
        let cases = [
            (server("127.0.0.1:1", &[], &[], false), true),
            (server("127.0.0.1:1", &[], &["a"], false), false),
            (server("127.0.0.1:1", &[], &["a"], true), true),
            (server("127.0.0.1:1", &["r"], &[], true), false),
            (server("0.0.0.0:1", &[], &[], true), true),
            (server("0.0.0.0:1", &[], &["a"], false), false),
        ];
        for (config, open) in cases {
            assert_eq!(Auth::new(&config).reads_are_open(), open, "{config:?}");
        }
    }

    #[test]
    fn scopes_answer_401_or_403() {
        let auth = Auth::new(&server("0.0.0.0:1", &["reader"], &["admin"], false));
        assert_eq!(status(&auth, None, Scope::Read), 401);
        assert_eq!(status(&auth, Some("nope"), Scope::Read), 401);
        assert_eq!(status(&auth, Some("reader"), Scope::Read), 200);
        assert_eq!(status(&auth, Some("admin"), Scope::Read), 200);
        assert_eq!(status(&auth, Some("reader"), Scope::Admin), 403);
        assert_eq!(status(&auth, Some("admin"), Scope::Admin), 200);
        assert_eq!(
            status(&auth, Some("admin "), Scope::Admin),
            200,
            "trailing space trimmed"
        );
        assert_eq!(status(&auth, Some("admi"), Scope::Admin), 401);
    }

    #[test]
    fn open_reads_still_refuse_unknown_tokens_and_admin_without_one() {
        let auth = Auth::new(&server("127.0.0.1:1", &[], &[], false));
        assert_eq!(status(&auth, None, Scope::Read), 200);
        assert_eq!(status(&auth, Some("guess"), Scope::Read), 401);
        assert_eq!(status(&auth, None, Scope::Admin), 401);
    }
}
