//! JWT verification (PROTOCOL.md §3): connection tokens and channel tokens.
//!
//! Accepted algorithms follow the configured keys, nothing else:
//! - HS256 with `session.jwt_hmac_secret`;
//! - RS256 when the public key (`session.jwt_public_key_pem` or `_file`) is RSA;
//! - ES256 when it is EC P-256.
//!
//! The token header's `alg` picks the key, and each key verifies only its own
//! algorithm, so an HS256 token "signed" with the RSA public key as an HMAC
//! secret (the classic algorithm confusion) is refused, as are `none`,
//! HS384/RS512/PS256/EdDSA and friends.
//!
//! Time claims are checked here against the caller's `now_secs` (not the
//! clock inside jsonwebtoken) so tests are deterministic: `exp` is optional (a
//! token without one never expires) and a token is expired once
//! `now_secs >= exp + leeway`; `nbf`, when present, must be at most
//! `now_secs + leeway`. Claim types are checked by hand so a bad token gets a
//! precise reason in the logs; clients only ever see 101 or 109.
//!
//! Decoding keys are built once in [`Verifier::from_config`]: a verification
//! is one header parse, one signature check and one JSON parse.

use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rt_proto::ErrorCode;
use rt_shared::config::SessionConfig;
use serde_json::{Map, Value};

/// Longest token accepted; anything longer is refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Base64 of the fixed DER prefix of every uncompressed EC P-256
/// SubjectPublicKeyInfo: SEQUENCE, id-ecPublicKey, prime256v1, BIT STRING,
/// 0x04. DER is canonical and the prefix is 27 bytes (36 base64 characters,
/// no partial group), so this text match is exact.
const P256_SPKI_PREFIX: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE";

/// What a verified connection token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user id; never empty (anonymity is "no token").
    pub sub: String,
    /// Expiry, seconds since the Unix epoch; `None`: never expires.
    pub exp: Option<u64>,
    /// Issued at, seconds since the Unix epoch (revocations compare with it).
    pub iat: Option<u64>,
    /// The `info` claim (a JSON object) re-encoded as a MessagePack map.
    pub info: Option<Bytes>,
    /// The `channels` claim: private channels the user may join.
    pub channels: Vec<String>,
}

impl Claims {
    /// `exp` as the protocol reports it: 0 for a token that never expires.
    pub fn expires_at(&self) -> u64 {
        self.exp.unwrap_or(0)
    }
}

/// What a verified channel token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelClaims {
    /// The user the grant is for; may be empty (an anonymous client's grant).
    /// The caller compares it with the connection's user.
    pub sub: String,
    /// The channel the grant is for; never empty.
    pub channel: String,
    /// Expiry, seconds since the Unix epoch; `None`: never expires.
    pub exp: Option<u64>,
}

/// Why a token was refused. The message is for logs, never for clients.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    /// Bad signature, an algorithm we do not accept (including a supported
    /// one with no key configured), malformed token, bad claims.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// No key is configured at all, so no token can be verified.
    #[error(
        "no token key is configured (session.jwt_hmac_secret, session.jwt_public_key_pem or session.jwt_public_key_file)"
    )]
    NotConfigured,
}

impl AuthError {
    /// The error code a client gets: 109 for an expired token, else 101.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Expired => ErrorCode::TOKEN_EXPIRED,
            Self::Invalid(_) | Self::NotConfigured => ErrorCode::UNAUTHORIZED,
        }
    }
}

/// Why the configured keys cannot be used; the message names the config key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "session.jwt_public_key_pem and session.jwt_public_key_file are both set: set only one"
    )]
    BothPublicKeys,
    #[error("session.jwt_public_key_file: cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{key}: not a usable PEM public key: {reason}")]
    BadPem { key: &'static str, reason: String },
    #[error(
        "{key}: unsupported key type ({kind}): use an RSA key (RS256) or an EC P-256 key (ES256)"
    )]
    Unsupported { key: &'static str, kind: String },
}

/// A decoding key with the validation that accepts exactly its algorithm.
struct Key {
    decoding: DecodingKey,
    validation: Validation,
}

impl Key {
    fn new(algorithm: Algorithm, decoding: DecodingKey) -> Self {
        let mut validation = Validation::new(algorithm);
        // Time claims are checked against the caller's clock, claim presence
        // and types by hand; there is no audience to match.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        Self {
            decoding,
            validation,
        }
    }
}

/// Verifies tokens against the configured keys. Build once, share freely
/// (it is immutable; wrap in an `Arc` to share across threads).
pub struct Verifier {
    hmac: Option<Key>,
    /// RS256 or ES256, following the configured public key's type.
    public: Option<(Algorithm, Key)>,
    leeway_secs: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("Verifier")
            .field("hs256", &self.hmac.is_some())
            .field("public", &self.public.as_ref().map(|(alg, _)| *alg))
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl Verifier {
    /// Builds the decoding keys from `session.jwt_*`. No key at all is fine
    /// (anonymous-only deployments): every token is then [`AuthError::NotConfigured`].
    pub fn from_config(config: &SessionConfig) -> Result<Verifier, KeyError> {
        let hmac = (!config.jwt_hmac_secret.is_empty()).then(|| {
            let secret = config.jwt_hmac_secret.expose().as_bytes();
            if secret.len() < 32 {
                tracing::warn!(
                    "session.jwt_hmac_secret is shorter than 32 bytes: HS256 tokens are easier to forge"
                );
            }
            Key::new(Algorithm::HS256, DecodingKey::from_secret(secret))
        });
        let inline = config.jwt_public_key_pem.trim();
        let file = config.jwt_public_key_file.trim();
        let public = match (inline.is_empty(), file.is_empty()) {
            (false, false) => return Err(KeyError::BothPublicKeys),
            (false, true) => Some(parse_public_key(inline, "session.jwt_public_key_pem")?),
            (true, false) => {
                let text = std::fs::read_to_string(file).map_err(|source| KeyError::Read {
                    path: file.to_string(),
                    source,
                })?;
                Some(parse_public_key(&text, "session.jwt_public_key_file")?)
            }
            (true, true) => None,
        };
        Ok(Verifier {
            hmac,
            public,
            leeway_secs: config.jwt_leeway_secs,
        })
    }

    /// Whether any key is configured.
    pub fn is_configured(&self) -> bool {
        self.hmac.is_some() || self.public.is_some()
    }

    /// The algorithms this verifier accepts.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        let mut algorithms = Vec::new();
        if self.hmac.is_some() {
            algorithms.push(Algorithm::HS256);
        }
        if let Some((algorithm, _)) = &self.public {
            algorithms.push(*algorithm);
        }
        algorithms
    }

    /// Verifies a connection token at time `now_secs` (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, AuthError> {
        let claims = self.decode(token)?;
        let times = self.check_times(&claims, now_secs)?;
        let sub = string_claim(&claims, "sub")?;
        if sub.is_empty() {
            return Err(invalid("claim sub is empty"));
        }
        let channels = match claims.get("channels") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(channel) => Ok(channel.clone()),
                    _ => Err(invalid("claim channels must be an array of strings")),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(invalid("claim channels must be an array of strings")),
        };
        let info = match claims.get("info") {
            None | Some(Value::Null) => None,
            Some(info @ Value::Object(_)) => {
                Some(Bytes::from(rmp_serde::to_vec_named(info).map_err(|e| {
                    AuthError::Invalid(format!("claim info: {e}"))
                })?))
            }
            Some(_) => return Err(invalid("claim info must be a JSON object")),
        };
        Ok(Claims {
            sub,
            exp: times.exp,
            iat: times.iat,
            info,
            channels,
        })
    }

    /// Verifies a channel token (`sub`, `channel`, optional `exp`) at `now_secs`.
    pub fn verify_channel(&self, token: &str, now_secs: u64) -> Result<ChannelClaims, AuthError> {
        let claims = self.decode(token)?;
        let times = self.check_times(&claims, now_secs)?;
        let sub = string_claim(&claims, "sub")?;
        let channel = string_claim(&claims, "channel")?;
        if channel.is_empty() {
            return Err(invalid("claim channel is empty"));
        }
        Ok(ChannelClaims {
            sub,
            channel,
            exp: times.exp,
        })
    }

    /// Checks the signature with the key the header's algorithm selects and
    /// returns the claims object.
    fn decode(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        if !self.is_configured() {
            return Err(AuthError::NotConfigured);
        }
        if token.is_empty() {
            return Err(invalid("empty token"));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(invalid("token too long"));
        }
        // `alg: none` and unknown names fail here: jsonwebtoken has no such algorithm.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("malformed header: {e}")))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hmac.as_ref(),
            alg => self
                .public
                .as_ref()
                .filter(|(configured, _)| *configured == alg)
                .map(|(_, key)| key),
        };
        let Some(key) = key else {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted (configured: {:?})",
                header.alg,
                self.algorithms()
            )));
        };
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &key.validation)
                .map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind;
                    AuthError::Invalid(match e.kind() {
                        ErrorKind::InvalidSignature => "bad signature".to_string(),
                        ErrorKind::InvalidAlgorithm => "algorithm mismatch".to_string(),
                        _ => format!("malformed token: {e}"),
                    })
                })?;
        Ok(data.claims)
    }

    fn check_times(&self, claims: &Map<String, Value>, now_secs: u64) -> Result<Times, AuthError> {
        let times = Times {
            exp: numeric_claim(claims, "exp")?,
            nbf: numeric_claim(claims, "nbf")?,
            iat: numeric_claim(claims, "iat")?,
        };
        if let Some(exp) = times.exp
            && now_secs >= exp.saturating_add(self.leeway_secs)
        {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = times.nbf
            && now_secs.saturating_add(self.leeway_secs) < nbf
        {
            return Err(invalid("token not valid yet (nbf)"));
        }
        Ok(times)
    }
}

struct Times {
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
}

fn invalid(reason: &str) -> AuthError {
    AuthError::Invalid(reason.to_string())
}

/// A required string claim.
fn string_claim(claims: &Map<String, Value>, name: &str) -> Result<String, AuthError> {
    match claims.get(name) {
        Some(Value::String(value)) => Ok(value.clone()),
        None => Err(AuthError::Invalid(format!("claim {name} is missing"))),
        Some(_) => Err(AuthError::Invalid(format!("claim {name} must be a string"))),
    }
}

/// An optional NumericDate claim: a non-negative number of seconds (RFC 7519
/// allows fractions; they are truncated). `null` is refused rather than read
/// as "absent", so an issuer bug cannot mint a token that never expires.
fn numeric_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, AuthError> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let bad = || AuthError::Invalid(format!("claim {name} must be a non-negative number"));
    let Value::Number(number) = value else {
        return Err(bad());
    };
    if let Some(secs) = number.as_u64() {
        return Ok(Some(secs));
    }
    match number.as_f64() {
        // `as` saturates: a huge float becomes u64::MAX (far future).
        Some(secs) if secs.is_finite() && secs >= 0.0 => Ok(Some(secs as u64)),
        _ => Err(bad()),
    }
}

/// Reads a PEM public key and picks its algorithm: RSA → RS256, EC P-256 → ES256.
fn parse_public_key(text: &str, config_key: &'static str) -> Result<(Algorithm, Key), KeyError> {
    let bad = |reason: &str| KeyError::BadPem {
        key: config_key,
        reason: reason.to_string(),
    };
    let text = text.trim();
    let label = text
        .strip_prefix("-----BEGIN ")
        .and_then(|rest| rest.split_once("-----"))
        .map(|(label, _)| label)
        .ok_or_else(|| bad("expected a -----BEGIN PUBLIC KEY----- block"))?;
    match label {
        "PUBLIC KEY" | "RSA PUBLIC KEY" => {}
        label if label.contains("PRIVATE KEY") => {
            return Err(bad(
                "this is a private key: configure the matching public key",
            ));
        }
        other => {
            return Err(KeyError::Unsupported {
                key: config_key,
                kind: format!("PEM block {other:?}"),
            });
        }
    }
    let bytes = text.as_bytes();
    if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        return Ok((Algorithm::RS256, Key::new(Algorithm::RS256, key)));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
        if !pem_body(text).starts_with(P256_SPKI_PREFIX) {
            return Err(KeyError::Unsupported {
                key: config_key,
                kind: "EC key on a curve other than P-256".into(),
            });
        }
        return Ok((Algorithm::ES256, Key::new(Algorithm::ES256, key)));
    }
    if DecodingKey::from_ed_pem(bytes).is_ok() {
        return Err(KeyError::Unsupported {
            key: config_key,
            kind: "Ed25519".into(),
        });
    }
    Err(bad("cannot parse the key"))
}

/// The base64 text of a PEM block, without the armor lines and whitespace.
fn pem_body(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with("-----"))
        .collect()
}
