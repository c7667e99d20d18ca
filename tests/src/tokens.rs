//! JWTs for tests, signed with the cluster's HS256 secret unless said otherwise.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use crate::cluster::JWT_SECRET;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A connection token for `user` valid for an hour, with `iat` now.
pub fn token(user: &str) -> String {
    token_with(json!({"sub": user, "exp": now_secs() + 3600, "iat": now_secs()}))
}

/// A connection token for `user` expiring `secs` seconds from now.
pub fn expiring(user: &str, secs: u64) -> String {
    token_with(json!({"sub": user, "exp": now_secs() + secs, "iat": now_secs()}))
}

/// A channel token for `user` on `channel`, valid for an hour.
pub fn channel_token(user: &str, channel: &str) -> String {
    token_with(json!({"sub": user, "channel": channel, "exp": now_secs() + 3600}))
}

/// Any claims, HS256 with the cluster's secret.
pub fn token_with(claims: Value) -> String {
    sign(&claims, JWT_SECRET.as_bytes())
}

/// Any claims, HS256 with another secret.
pub fn sign(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing cannot fail")
}
