//! Authentication: an admin API key and HMAC-SHA256 signed session tokens.
//!
//! Auth is on when an admin key (the variable `server.api_key_env` names)
//! or session-token keys (`server.token_keys_env`) are configured. With
//! token keys but no admin key, tokens work and admin routes are refused to
//! everyone (nobody holds the admin credential). When auth is on, every
//! route but the health checks and the OpenAPI document needs
//! `Authorization: Bearer <credential>`, where the
//! credential is either the admin key (reaches everything) or a session
//! token (reaches only its own session: `/v1/sessions/{that id}/…`, and the
//! OpenAI- and PraisonAI-compatible endpoints with that session id).
//!
//! A token is `tt1.<kid>.<base64url(session id)>.<expiry, unix seconds>.<hex HMAC-SHA256>`,
//! the MAC taken over everything before the last dot with the secret of key
//! `kid`. Keys come from `server.token_keys_env` as `kid:secret,kid2:secret2`:
//! the first signs, all verify, so a key is rotated by putting a new one
//! first and removing the old one once its tokens have expired. Signatures
//! are checked in constant time (`Mac::verify_slice`).
//!
//! ```
//! use std::time::Duration;
//! use troupe::server::auth::{issue_token, verify_token, TokenKeys};
//! let keys = TokenKeys::parse("k1:a-long-random-secret").unwrap();
//! let token = issue_token(&keys, "user_456", Duration::from_secs(3600)).unwrap();
//! assert_eq!(verify_token(&keys, &token).unwrap().session_id, "user_456");
//! ```

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::config::ServerConfig;
use crate::session::validate_session_id;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "tt1";

/// A problem with the configured keys (not with a presented token).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key list does not parse.
    #[error("session-token keys: {0}")]
    Invalid(String),
}

/// The session-token keys: `(kid, secret)` pairs, the first one signs.
#[derive(Clone)]
pub struct TokenKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("TokenKeys").field("kids", &kids).finish()
    }
}

impl TokenKeys {
    /// Parses `kid:secret[,kid:secret…]`. Key ids are letters, digits, `-`
    /// and `_`; secrets are not empty; a key id appears once.
    pub fn parse(spec: &str) -> Result<TokenKeys, KeyError> {
        let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kid, secret) = part.split_once(':').ok_or_else(|| {
                KeyError::Invalid(format!(
                    "'{}…' is not kid:secret",
                    part.chars().take(8).collect::<String>()
                ))
            })?;
            if kid.is_empty()
                || !kid
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(KeyError::Invalid(format!(
                    "key id '{kid}' must be letters, digits, '-' or '_'"
                )));
            }
            if secret.is_empty() {
                return Err(KeyError::Invalid(format!(
                    "key '{kid}' has an empty secret"
                )));
            }
            if keys.iter().any(|(k, _)| k == kid) {
                return Err(KeyError::Invalid(format!(
                    "key id '{kid}' appears more than once"
                )));
            }
            keys.push((kid.to_string(), secret.as_bytes().to_vec()));
        }
        if keys.is_empty() {
            return Err(KeyError::Invalid("no keys (expected kid:secret)".into()));
        }
        Ok(TokenKeys { keys })
    }

    /// The keys in the environment variable `var` (`None` when it is unset or empty).
    pub fn from_env(var: &str) -> Result<Option<TokenKeys>, KeyError> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => TokenKeys::parse(&v)
                .map(Some)
                .map_err(|KeyError::Invalid(m)| KeyError::Invalid(format!("${var}: {m}"))),
            _ => Ok(None),
        }
    }

    /// The id of the key that signs new tokens (the first).
    pub fn signing_kid(&self) -> &str {
        &self.keys[0].0
    }

    fn secret(&self, kid: &str) -> Option<&[u8]> {
        self.keys
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, s)| s.as_slice())
    }
}

/// What a valid token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    /// The session the token opens.
    pub session_id: String,
    /// The key that signed it.
    pub kid: String,
    /// Expiry, unix seconds.
    pub expires_at: i64,
}

/// Why a presented token was refused (each becomes a 401 saying which).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not in the token format.
    #[error("malformed session token: {0}")]
    Malformed(String),
    /// Signed with a key id the server does not know (removed by rotation?).
    #[error("session token signed with unknown key id '{0}'")]
    UnknownKey(String),
    /// The signature does not match: forged, altered, or another secret.
    #[error("session token signature is invalid (forged, altered or signed with another secret)")]
    BadSignature,
    /// Past its expiry.
    #[error("session token expired at {0} (unix seconds)")]
    Expired(i64),
}

fn mac(secret: &[u8], payload: &str) -> HmacSha256 {
    // HMAC takes keys of any length; this cannot fail.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    m.update(payload.as_bytes());
    m
}

/// A token for `session` valid for `ttl` from now, signed with the first key.
pub fn issue_token(keys: &TokenKeys, session: &str, ttl: Duration) -> Result<String, crate::Error> {
    let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
    issue_token_until(
        keys,
        session,
        chrono::Utc::now().timestamp().saturating_add(ttl),
    )
}

/// A token for `session` that expires at `expires_at` (unix seconds).
pub fn issue_token_until(
    keys: &TokenKeys,
    session: &str,
    expires_at: i64,
) -> Result<String, crate::Error> {
    validate_session_id(session)?;
    let (kid, secret) = &keys.keys[0];
    let payload = format!(
        "{PREFIX}.{kid}.{}.{expires_at}",
        b64url_encode(session.as_bytes())
    );
    let sig = hex::encode(mac(secret, &payload).finalize().into_bytes());
    Ok(format!("{payload}.{sig}"))
}

/// Checks a token: format, key id, signature (constant time), expiry.
pub fn verify_token(keys: &TokenKeys, token: &str) -> Result<TokenClaims, TokenError> {
    verify_token_at(keys, token, chrono::Utc::now().timestamp())
}

/// [`verify_token`] at a given time (unix seconds).
pub fn verify_token_at(keys: &TokenKeys, token: &str, now: i64) -> Result<TokenClaims, TokenError> {
    let (payload, sig_hex) = token.rsplit_once('.').ok_or_else(|| {
        TokenError::Malformed("expected tt1.<kid>.<session>.<expiry>.<signature>".into())
    })?;
    let parts: Vec<&str> = payload.split('.').collect();
    if parts.len() != 4 {
        return Err(TokenError::Malformed(format!(
            "expected 5 dot-separated parts, found {}",
            parts.len() + 1
        )));
    }
    if parts[0] != PREFIX {
        return Err(TokenError::Malformed(format!(
            "unknown token version '{}' (expected {PREFIX})",
            parts[0].chars().take(16).collect::<String>()
        )));
    }
    let kid = parts[1];
    let expires_at: i64 = parts[3]
        .parse()
        .map_err(|_| TokenError::Malformed("the expiry is not a number".into()))?;
    let sig = hex::decode(sig_hex)
        .map_err(|_| TokenError::Malformed("the signature is not hex".into()))?;
    let secret = keys
        .secret(kid)
        .ok_or_else(|| TokenError::UnknownKey(kid.chars().take(32).collect()))?;
    mac(secret, payload)
        .verify_slice(&sig)
        .map_err(|_| TokenError::BadSignature)?;
    // Signed by us from here on: the session part decodes to what we encoded.
    let session = b64url_decode(parts[2])
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| TokenError::Malformed("the session part is not base64url".into()))?;
    if expires_at <= now {
        return Err(TokenError::Expired(expires_at));
    }
    Ok(TokenClaims {
        session_id: session,
        kid: kid.to_string(),
        expires_at,
    })
}

/// Parses a lifetime: `45s`, `30m`, `1h`, `7d`, `2w` (a bare number is seconds).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a lifetime like 30m, 1h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "'{s}': unknown unit '{unit}' (use s, m, h, d or w)"
            ))
        }
    };
    if n == 0 {
        return Err(format!("'{s}': a lifetime must be more than zero"));
    }
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("'{s}' is too long"))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding.
fn b64url_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.as_bytes().chunks(4) {
        let mut n: u32 = 0;
        for (i, &c) in chunk.iter().enumerate() {
            let v = B64.iter().position(|&x| x == c)? as u32;
            n |= v << (18 - 6 * i);
        }
        let bytes = chunk.len() - 1;
        for i in 0..bytes {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// Equality of two secrets in time independent of where they differ (both
/// are hashed first, so their lengths do not show either).
fn secret_eq(a: &str, b: &str) -> bool {
    let (x, y) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// The server's credentials: an admin key and the token keys. Auth is on
/// when either is set; with token keys but no admin key, tokens work and
/// nobody is the admin.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    api_key: Option<String>,
    token_keys: Option<TokenKeys>,
}

impl Auth {
    /// No authentication: every caller is an admin. Only for loopback binds
    /// unless `server.allow_public_without_auth`.
    pub fn off() -> Auth {
        Auth::default()
    }

    /// Admin key `api_key` (surrounding whitespace removed; an empty key is
    /// no admin key), and session tokens signed with `token_keys` if given.
    pub fn new(api_key: impl Into<String>, token_keys: Option<TokenKeys>) -> Auth {
        Auth {
            api_key: clean_key(api_key.into()),
            token_keys,
        }
    }

    /// Reads the admin key and token keys from the variables `config` names.
    /// The key is trimmed (a secrets file often ends with a newline), as the
    /// presented credential is. Token keys without an admin key turn auth on
    /// with no admin credential (see [`has_admin_key`](Self::has_admin_key)).
    pub fn from_env(config: &ServerConfig) -> Result<Auth, KeyError> {
        let api_key = std::env::var(&config.api_key_env).ok().and_then(clean_key);
        let token_keys = TokenKeys::from_env(&config.token_keys_env)?;
        Ok(Auth {
            api_key,
            token_keys,
        })
    }

    /// Whether requests need credentials: an admin key or token keys are
    /// configured.
    pub fn is_on(&self) -> bool {
        self.api_key.is_some() || self.token_keys.is_some()
    }

    /// Whether an admin key is configured. Auth on without one (token keys
    /// only) means admin routes are refused to everyone.
    pub fn has_admin_key(&self) -> bool {
        self.api_key.is_some()
    }

    /// Whether session tokens are accepted.
    pub fn has_token_keys(&self) -> bool {
        self.token_keys.is_some()
    }

    /// Who is calling, from the `Authorization` header's value (if any).
    pub fn authenticate(&self, header: Option<&str>) -> Result<Caller, ApiError> {
        if !self.is_on() {
            return Ok(Caller::Admin);
        }
        let Some(header) = header else {
            return Err(ApiError::Unauthorized(
                "authentication required: send Authorization: Bearer <API key or session token>"
                    .into(),
            ));
        };
        let credential = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "the Authorization header must be 'Bearer <API key or session token>'".into(),
                )
            })?;
        if let Some(admin) = &self.api_key {
            if secret_eq(credential, admin) {
                return Ok(Caller::Admin);
            }
        }
        if !credential.starts_with("tt1.") {
            return Err(ApiError::Unauthorized(if self.api_key.is_some() {
                "the bearer credential is neither the API key nor a session token".into()
            } else {
                "the bearer credential is not a session token (no admin API key is configured: \
                 set server.api_key_env)"
                    .into()
            }));
        }
        let keys = self.token_keys.as_ref().ok_or_else(|| {
            ApiError::Unauthorized(
                "session tokens are not accepted: no token keys are configured (server.token_keys_env)"
                    .into(),
            )
        })?;
        verify_token(keys, credential)
            .map(|c| Caller::Session(c.session_id))
            .map_err(|e| ApiError::Unauthorized(e.to_string()))
    }
}

/// An admin key as configured: trimmed, and none if that leaves nothing.
fn clean_key(key: String) -> Option<String> {
    let k = key.trim();
    (!k.is_empty()).then(|| k.to_string())
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The admin key (or auth is off): everything.
    Admin,
    /// A session token: only this session.
    Session(String),
}

impl Caller {
    /// Ok if the caller may touch `session`; 403 naming both otherwise.
    pub fn check_session(&self, session: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Session(own) if own == session => Ok(()),
            Caller::Session(own) => Err(ApiError::Forbidden(format!(
                "this session token is for session '{own}', not '{session}'"
            ))),
        }
    }

    /// Ok for the admin; 403 for a session token.
    pub fn check_admin(&self, what: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Session(own) => Err(ApiError::Forbidden(format!(
                "{what} needs the admin API key; this session token only reaches session '{own}'"
            ))),
        }
    }

    /// The token's session, if this is a session token.
    pub fn session(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Session(s) => Some(s),
        }
    }
}

impl actix_web::FromRequest for Caller {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Caller, ApiError>>;

    fn from_request(req: &actix_web::HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        use actix_web::HttpMessage;
        std::future::ready(
            req.extensions()
                .get::<Caller>()
                .cloned()
                .ok_or_else(|| ApiError::Unauthorized("this route needs credentials".into())),
        )
    }
}

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, even with auth on (health checks, the OpenAPI document).
    Public,
    /// The admin key only.
    Admin,
    /// The admin key, or a token of the session in the path's `{id}`.
    OwnSession,
    /// The admin key or any valid token; the handler checks which sessions
    /// the request touches (e.g. `X-Session-Id`).
    Caller,
}

impl Access {
    /// Decides a request: the caller to hand to the handler, or the error.
    pub(crate) fn authorize(
        self,
        auth: &Auth,
        header: Option<&str>,
        path_session: Option<&str>,
    ) -> Result<Option<Caller>, ApiError> {
        if self == Access::Public {
            return Ok(None);
        }
        let caller = auth.authenticate(header)?;
        match self {
            Access::Public | Access::Caller => {}
            Access::Admin => caller.check_admin("this route")?,
            Access::OwnSession => {
                if let Some(id) = path_session {
                    caller.check_session(id)?;
                } else {
                    caller.check_admin("this route")?;
                }
            }
        }
        Ok(Some(caller))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips() {
        for s in ["", "a", "ab", "abc", "abcd", "user_456@x:y.z", "ÿþ\u{0}"] {
            let e = b64url_encode(s.as_bytes());
            assert!(!e.contains('='), "{e}");
            assert_eq!(b64url_decode(&e).unwrap(), s.as_bytes(), "{s:?} -> {e}");
        }
        assert_eq!(b64url_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64url_encode(b"fo"), "Zm8");
        assert!(b64url_decode("a").is_none());
        assert!(b64url_decode("a+b/").is_none());
    }

    #[test]
    fn tokens_verify_expire_and_rotate() {
        let old = TokenKeys::parse("k1:s1").unwrap();
        let t = issue_token_until(&old, "user.1", 1_000).unwrap();
        assert_eq!(verify_token_at(&old, &t, 999).unwrap().session_id, "user.1");
        assert_eq!(
            verify_token_at(&old, &t, 1_000),
            Err(TokenError::Expired(1_000))
        );
        let rotated = TokenKeys::parse("k2:s2, k1:s1").unwrap();
        assert_eq!(rotated.signing_kid(), "k2");
        assert!(verify_token_at(&rotated, &t, 10).is_ok());
        let removed = TokenKeys::parse("k2:s2").unwrap();
        assert_eq!(
            verify_token_at(&removed, &t, 10),
            Err(TokenError::UnknownKey("k1".into()))
        );
        let other_secret = TokenKeys::parse("k1:other").unwrap();
        assert_eq!(
            verify_token_at(&other_secret, &t, 10),
            Err(TokenError::BadSignature)
        );
        // Changing the session (or the expiry) breaks the signature.
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}.{}.{}",
            parts[0],
            parts[1],
            b64url_encode(b"admin"),
            parts[3],
            parts[4]
        );
        assert_eq!(
            verify_token_at(&old, &forged, 10),
            Err(TokenError::BadSignature)
        );
        assert!(matches!(
            verify_token_at(&old, "nonsense", 10),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn keys_and_ttls_parse_with_clear_errors() {
        assert!(TokenKeys::parse("").is_err());
        assert!(TokenKeys::parse("k1").is_err());
        assert!(TokenKeys::parse("k1:").is_err());
        assert!(TokenKeys::parse("k.1:x").is_err());
        assert!(TokenKeys::parse("k1:a,k1:b").is_err());
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("0s").is_err());
    }

    #[test]
    fn callers_reach_only_their_sessions() {
        let auth = Auth::new("adm", Some(TokenKeys::parse("k:s").unwrap()));
        assert_eq!(
            auth.authenticate(Some("Bearer adm")).unwrap(),
            Caller::Admin
        );
        assert!(matches!(
            auth.authenticate(None),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            auth.authenticate(Some("Bearer adn")),
            Err(ApiError::Unauthorized(_))
        ));
        let t = issue_token(
            &auth.token_keys.clone().unwrap(),
            "a",
            Duration::from_secs(60),
        )
        .unwrap();
        let c = auth.authenticate(Some(&format!("Bearer {t}"))).unwrap();
        assert_eq!(c, Caller::Session("a".into()));
        assert!(c.check_session("a").is_ok());
        assert!(matches!(c.check_session("b"), Err(ApiError::Forbidden(_))));
        assert_eq!(Auth::off().authenticate(None).unwrap(), Caller::Admin);
    }

    #[test]
    fn the_admin_key_is_trimmed_when_loaded() {
        // A key from a secrets file ends with a newline.
        let config = ServerConfig {
            api_key_env: "TROUPE_UNIT_TEST_TRIMMED_ADMIN_KEY".into(),
            token_keys_env: "TROUPE_UNIT_TEST_TRIMMED_TOKEN_KEYS_UNSET".into(),
            ..ServerConfig::default()
        };
        std::env::set_var(&config.api_key_env, "  the-key\n");
        let auth = Auth::from_env(&config).unwrap();
        assert!(auth.is_on() && auth.has_admin_key());
        assert_eq!(
            auth.authenticate(Some("Bearer the-key")).unwrap(),
            Caller::Admin
        );
        assert!(auth.authenticate(Some("Bearer the-kez")).is_err());
        let auth = Auth::new("the-key\r\n", None);
        assert_eq!(
            auth.authenticate(Some("Bearer the-key")).unwrap(),
            Caller::Admin
        );
        // A blank key is no key: never matched by an empty credential.
        let auth = Auth::new(" \n", Some(TokenKeys::parse("k:s").unwrap()));
        assert!(auth.is_on() && !auth.has_admin_key());
        assert!(auth.authenticate(Some("Bearer ")).is_err());
        assert!(auth.authenticate(Some("Bearer  ")).is_err());
        assert!(auth.authenticate(None).is_err());
    }

    #[test]
    fn token_keys_alone_turn_auth_on_without_an_admin() {
        let keys = TokenKeys::parse("k:s").unwrap();
        let auth = Auth {
            api_key: None,
            token_keys: Some(keys.clone()),
        };
        assert!(auth.is_on());
        assert!(matches!(
            auth.authenticate(None),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            auth.authenticate(Some("Bearer whatever")),
            Err(ApiError::Unauthorized(_))
        ));
        let t = issue_token(&keys, "a", Duration::from_secs(60)).unwrap();
        assert_eq!(
            auth.authenticate(Some(&format!("Bearer {t}"))).unwrap(),
            Caller::Session("a".into())
        );
        assert!(Access::Admin
            .authorize(&auth, Some(&format!("Bearer {t}")), None)
            .is_err());
    }
}
