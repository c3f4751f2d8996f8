//! Session tokens: issue, verify, expiry, forgery and key rotation.
//!
//! A session token is `HMAC-SHA256(secret, key id · session id · expiry)`,
//! checked in constant time. The daemon reads its keys from
//! `$TROUPE_TOKEN_KEYS` as `kid:secret[,kid:secret…]`: the first key signs,
//! every listed key verifies — so a key is rotated by putting a new one
//! first, and the old one is removed once its tokens have expired.
//! `troupe token issue --session ID --ttl 1h` prints one from the command line.
//!
//! ```text
//! cargo run --example tokens
//! ```

use std::time::Duration;

use troupe::server::auth::{issue_token, issue_token_until, verify_token, TokenKeys};

fn main() -> anyhow::Result<()> {
    let old = TokenKeys::parse("k1:first-secret")?;
    let token = issue_token(&old, "user_456", Duration::from_secs(3600))?;
    println!("token: {token}");
    let claims = verify_token(&old, &token).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "valid: session {} signed by key {} until {} (unix)",
        claims.session_id, claims.kid, claims.expires_at
    );

    // An altered token is refused: change the last character of the signature.
    let mut forged = token.clone();
    let last = forged.pop().unwrap_or('0');
    forged.push(if last == '0' { '1' } else { '0' });
    println!("forged:  {}", verify_token(&old, &forged).unwrap_err());

    // An expired one too.
    let expired = issue_token_until(&old, "user_456", 1_000_000_000)?;
    println!("expired: {}", verify_token(&old, &expired).unwrap_err());

    // Rotation: k2 now signs, k1 still verifies the tokens already out there.
    let rotated = TokenKeys::parse("k2:second-secret,k1:first-secret")?;
    let fresh = issue_token(&rotated, "user_456", Duration::from_secs(3600))?;
    println!(
        "during rotation: new token by {}, old token still valid: {}",
        verify_token(&rotated, &fresh)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .kid,
        verify_token(&rotated, &token).is_ok()
    );
    // Once k1 is removed, its tokens stop working.
    let after = TokenKeys::parse("k2:second-secret")?;
    println!(
        "after removing k1: {}",
        verify_token(&after, &token).unwrap_err()
    );
    Ok(())
}
