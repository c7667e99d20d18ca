#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests")]
//! JWT verification from the outside: tokens made with jsonwebtoken's
//! `encode` and the fixture keys, checked by `rt_session::auth::Verifier`.

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rt_proto::ErrorCode;
use rt_session::auth::{AuthError, KeyError, Verifier};
use rt_shared::config::{Secret, SessionConfig};
use serde_json::{Value, json};

const NOW: u64 = 1_700_000_000;
const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn config() -> SessionConfig {
    SessionConfig {
        jwt_leeway_secs: 5,
        ..SessionConfig::default()
    }
}

fn hmac_verifier() -> Verifier {
    Verifier::from_config(&SessionConfig {
        jwt_hmac_secret: Secret::new(SECRET),
        ..config()
    })
    .expect("hmac config")
}

fn public_verifier(pem_fixture: &str) -> Verifier {
    Verifier::from_config(&SessionConfig {
        jwt_public_key_pem: fixture(pem_fixture),
        ..config()
    })
    .expect("public key config")
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

fn rs256(claims: &Value, private_fixture: &str) -> String {
    let key = EncodingKey::from_rsa_pem(fixture(private_fixture).as_bytes()).expect("rsa key");
    encode(&Header::new(Algorithm::RS256), claims, &key).expect("encode")
}

fn es256(claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(fixture("ec_private.pem").as_bytes()).expect("ec key");
    encode(&Header::new(Algorithm::ES256), claims, &key).expect("encode")
}

/// base64url without padding (RFC 7515), for hand-made tokens.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// A token with any header and payload text, HS256-signed with `SECRET`.
fn signed_raw(header: &str, payload: &str) -> String {
    let message = format!(
        "{}.{}",
        b64url(header.as_bytes()),
        b64url(payload.as_bytes())
    );
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::HS256,
    )
    .expect("sign");
    format!("{message}.{signature}")
}

fn assert_invalid(result: Result<impl std::fmt::Debug, AuthError>) -> String {
    match result {
        Err(error @ AuthError::Invalid(_)) => {
            assert_eq!(error.code(), ErrorCode::UNAUTHORIZED);
            error.to_string()
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn hs256_token_with_every_claim() {
    let verifier = hmac_verifier();
    assert!(verifier.is_configured());
    let token = hs256(&json!({
        "sub": "alice",
        "exp": NOW + 60,
        "iat": NOW - 1,
        "info": {"name": "Alice", "level": 3, "tags": ["a", "b"]},
        "channels": ["secret:room", "vip:lounge"],
        "extra": "ignored",
    }));
    let claims = verifier.verify(&token, NOW).expect("valid");
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.exp, Some(NOW + 60));
    assert_eq!(claims.expires_at(), NOW + 60);
    assert_eq!(claims.iat, Some(NOW - 1));
    assert_eq!(claims.channels, vec!["secret:room", "vip:lounge"]);
    // `info` is re-encoded as a MessagePack map.
    let info = claims.info.expect("info");
    assert_eq!(info[0] & 0xf0, 0x80, "a MessagePack fixmap: {info:?}");
    let decoded: Value = rmp_serde::from_slice(&info).expect("msgpack");
    assert_eq!(
        decoded,
        json!({"name": "Alice", "level": 3, "tags": ["a", "b"]})
    );
}

#[test]
fn rs256_and_es256_tokens() {
    let claims = json!({"sub": "bob", "exp": NOW + 60});
    let rsa = public_verifier("rsa_public.pem");
    assert_eq!(rsa.algorithms(), vec![Algorithm::RS256]);
    let verified = rsa
        .verify(&rs256(&claims, "rsa_private.pem"), NOW)
        .expect("rs256");
    assert_eq!(verified.sub, "bob");
    assert_eq!(verified.info, None);
    assert!(verified.channels.is_empty());

    let ec = public_verifier("ec_public.pem");
    assert_eq!(ec.algorithms(), vec![Algorithm::ES256]);
    assert_eq!(ec.verify(&es256(&claims), NOW).expect("es256").sub, "bob");

    // The public key from a file works the same.
    let from_file = Verifier::from_config(&SessionConfig {
        jwt_public_key_file: format!(
            "{}/tests/fixtures/ec_public.pem",
            env!("CARGO_MANIFEST_DIR")
        ),
        ..config()
    })
    .expect("file");
    assert!(from_file.verify(&es256(&claims), NOW).is_ok());
}

#[test]
fn hmac_and_public_key_together() {
    let verifier = Verifier::from_config(&SessionConfig {
        jwt_hmac_secret: Secret::new(SECRET),
        jwt_public_key_pem: fixture("rsa_public.pem"),
        ..config()
    })
    .expect("config");
    let claims = json!({"sub": "carol"});
    assert!(verifier.verify(&hs256(&claims), NOW).is_ok());
    assert!(
        verifier
            .verify(&rs256(&claims, "rsa_private.pem"), NOW)
            .is_ok()
    );
    assert_invalid(verifier.verify(&es256(&claims), NOW));
}

#[test]
fn expiry_honours_the_leeway() {
    let verifier = hmac_verifier(); // leeway 5 s
    let at = |exp: u64| verifier.verify(&hs256(&json!({"sub": "u", "exp": exp})), NOW);
    assert!(at(NOW + 1).is_ok());
    assert!(at(NOW).is_ok(), "within the leeway");
    assert!(at(NOW - 4).is_ok(), "within the leeway");
    let expired = at(NOW - 5).expect_err("expired");
    assert!(matches!(expired, AuthError::Expired), "{expired:?}");
    assert_eq!(expired.code(), ErrorCode::TOKEN_EXPIRED);
    assert!(matches!(at(0), Err(AuthError::Expired)));

    let strict = Verifier::from_config(&SessionConfig {
        jwt_hmac_secret: Secret::new(SECRET),
        jwt_leeway_secs: 0,
        ..config()
    })
    .expect("config");
    let token = hs256(&json!({"sub": "u", "exp": NOW}));
    assert!(matches!(
        strict.verify(&token, NOW),
        Err(AuthError::Expired)
    ));
    assert!(strict.verify(&token, NOW - 1).is_ok());
    // A fractional NumericDate is allowed (RFC 7519) and truncated.
    let fractional = hs256(&json!({"sub": "u", "exp": (NOW + 10) as f64 + 0.5}));
    assert_eq!(
        strict.verify(&fractional, NOW).expect("valid").exp,
        Some(NOW + 10)
    );
}

#[test]
fn tokens_without_exp_never_expire() {
    let verifier = hmac_verifier();
    let claims = verifier
        .verify(&hs256(&json!({"sub": "u"})), u64::MAX)
        .expect("valid");
    assert_eq!(claims.exp, None);
    assert_eq!(claims.expires_at(), 0);
}

#[test]
fn not_before_honours_the_leeway() {
    let verifier = hmac_verifier();
    assert!(
        verifier
            .verify(&hs256(&json!({"sub": "u", "nbf": NOW + 5})), NOW)
            .is_ok()
    );
    let reason = assert_invalid(verifier.verify(&hs256(&json!({"sub": "u", "nbf": NOW + 6})), NOW));
    assert!(reason.contains("nbf"), "{reason}");
}

#[test]
fn wrong_keys_are_refused() {
    let claims = json!({"sub": "mallory"});
    // Another HMAC secret.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"some-other-secret-some-other-secret"),
    )
    .unwrap();
    let reason = assert_invalid(hmac_verifier().verify(&forged, NOW));
    assert!(reason.contains("signature"), "{reason}");
    // Signed by an unrelated RSA key.
    let other = rs256(&claims, "rsa_other_private.pem");
    assert_invalid(public_verifier("rsa_public.pem").verify(&other, NOW));
    assert!(
        public_verifier("rsa_other_public.pem")
            .verify(&other, NOW)
            .is_ok()
    );
}

#[test]
fn alg_none_is_refused() {
    let payload = b64url(br#"{"sub":"admin"}"#);
    let verifier = hmac_verifier();
    for header in [
        r#"{"alg":"none"}"#,
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"None"}"#,
    ] {
        let token = format!("{}.{payload}.", b64url(header.as_bytes()));
        assert_invalid(verifier.verify(&token, NOW));
    }
    // The hand-crafted classic, verbatim.
    assert_invalid(verifier.verify(&format!("eyJhbGciOiJub25lIn0.{payload}."), NOW));
}

#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    // Algorithm confusion: an HS256 token whose HMAC key is the RSA public key PEM.
    let pem = fixture("rsa_public.pem");
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "admin"}),
        &EncodingKey::from_secret(pem.as_bytes()),
    )
    .unwrap();
    assert_invalid(public_verifier("rsa_public.pem").verify(&token, NOW));
    // Also when an HMAC secret is configured next to the RSA key.
    let both = Verifier::from_config(&SessionConfig {
        jwt_hmac_secret: Secret::new(SECRET),
        jwt_public_key_pem: pem,
        ..config()
    })
    .unwrap();
    assert_invalid(both.verify(&token, NOW));
}

#[test]
fn tampered_payload_is_refused() {
    let token = hs256(&json!({"sub": "alice", "exp": NOW + 60}));
    let mut parts: Vec<&str> = token.split('.').collect();
    let payload = b64url(br#"{"sub":"admin","exp":1800000000}"#);
    parts[1] = &payload;
    let reason = assert_invalid(hmac_verifier().verify(&parts.join("."), NOW));
    assert!(reason.contains("signature"), "{reason}");
    // Same for RS256.
    let token = rs256(&json!({"sub": "alice"}), "rsa_private.pem");
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[1] = &payload;
    assert_invalid(public_verifier("rsa_public.pem").verify(&parts.join("."), NOW));
}

#[test]
fn malformed_tokens_are_refused() {
    let verifier = hmac_verifier();
    let valid = hs256(&json!({"sub": "u"}));
    let header = valid.split('.').next().unwrap().to_string();
    let long = "a".repeat(rt_session::auth::MAX_TOKEN_LEN + 1);
    for token in [
        "",
        ".",
        "..",
        "abc",
        "a.b",
        "a.b.c",
        "!!!.###.$$$",
        "a.b.c.d",
        &format!("{}.e30.sig", b64url(b"not json")),
        &format!("{header}.!!!.sig"),
        &format!("{header}.e30"),
        &long,
    ] {
        assert_invalid(verifier.verify(token, NOW));
    }
    // Validly signed, but the payload is not a JSON object.
    let header_json = r#"{"alg":"HS256","typ":"JWT"}"#;
    assert_invalid(verifier.verify(&signed_raw(header_json, "not json"), NOW));
    assert_invalid(verifier.verify(&signed_raw(header_json, r#"["sub","u"]"#), NOW));
    assert_invalid(verifier.verify(&signed_raw(header_json, "42"), NOW));
    assert!(
        verifier
            .verify(&signed_raw(header_json, r#"{"sub":"u"}"#), NOW)
            .is_ok()
    );
}

#[test]
fn sub_is_required_and_a_non_empty_string() {
    let verifier = hmac_verifier();
    for claims in [
        json!({"exp": NOW + 60}),
        json!({"sub": ""}),
        json!({"sub": 42}),
        json!({"sub": null}),
    ] {
        let reason = assert_invalid(verifier.verify(&hs256(&claims), NOW));
        assert!(reason.contains("sub"), "{claims}: {reason}");
    }
    // jsonwebtoken's own claim pre-parse already chokes on a non-scalar `sub`
    // (a JSON error rather than our message): still refused.
    assert_invalid(verifier.verify(&hs256(&json!({"sub": ["alice"]})), NOW));
    assert_invalid(verifier.verify(&hs256(&json!({"sub": {"id": 1}})), NOW));
}

#[test]
fn claims_of_the_wrong_type_are_refused() {
    let verifier = hmac_verifier();
    for (claims, name) in [
        (json!({"sub": "u", "exp": "tomorrow"}), "exp"),
        (json!({"sub": "u", "exp": -1}), "exp"),
        (json!({"sub": "u", "exp": null}), "exp"),
        (json!({"sub": "u", "nbf": "now"}), "nbf"),
        (json!({"sub": "u", "iat": true}), "iat"),
        (json!({"sub": "u", "channels": "a,b"}), "channels"),
        (json!({"sub": "u", "channels": ["a", 1]}), "channels"),
        (json!({"sub": "u", "info": "text"}), "info"),
        (json!({"sub": "u", "info": [1, 2]}), "info"),
        (json!({"sub": "u", "info": 7}), "info"),
    ] {
        let reason = assert_invalid(verifier.verify(&hs256(&claims), NOW));
        assert!(reason.contains(name), "{claims}: {reason}");
    }
    // null `info` and `channels` read as absent.
    let claims = verifier
        .verify(
            &hs256(&json!({"sub": "u", "info": null, "channels": null})),
            NOW,
        )
        .expect("valid");
    assert_eq!((claims.info, claims.channels.len()), (None, 0));
}

#[test]
fn algorithms_without_a_key_are_refused() {
    let claims = json!({"sub": "u"});
    let hmac = hmac_verifier();
    let rsa = public_verifier("rsa_public.pem");
    let ec = public_verifier("ec_public.pem");
    assert_invalid(rsa.verify(&hs256(&claims), NOW));
    assert_invalid(hmac.verify(&rs256(&claims, "rsa_private.pem"), NOW));
    assert_invalid(rsa.verify(&es256(&claims), NOW));
    assert_invalid(ec.verify(&rs256(&claims, "rsa_private.pem"), NOW));
    // Algorithms never accepted, even with a matching key type.
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let token = encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let reason = assert_invalid(hmac.verify(&token, NOW));
        assert!(reason.contains("not accepted"), "{reason}");
    }
    let rsa_key = EncodingKey::from_rsa_pem(fixture("rsa_private.pem").as_bytes()).unwrap();
    for alg in [Algorithm::RS384, Algorithm::RS512, Algorithm::PS256] {
        let token = encode(&Header::new(alg), &claims, &rsa_key).unwrap();
        assert_invalid(rsa.verify(&token, NOW));
    }
    let eddsa = format!(
        "{}.{}.c2ln",
        b64url(br#"{"alg":"EdDSA"}"#),
        b64url(br#"{"sub":"u"}"#)
    );
    assert_invalid(ec.verify(&eddsa, NOW));
}

#[test]
fn no_keys_means_not_configured() {
    let verifier = Verifier::from_config(&config()).expect("empty config");
    assert!(!verifier.is_configured());
    let error = verifier
        .verify(&hs256(&json!({"sub": "u"})), NOW)
        .expect_err("no keys");
    assert!(matches!(error, AuthError::NotConfigured), "{error:?}");
    assert_eq!(error.code(), ErrorCode::UNAUTHORIZED);
    assert!(matches!(
        verifier.verify_channel("x.y.z", NOW),
        Err(AuthError::NotConfigured)
    ));
}

#[test]
fn channel_tokens() {
    let verifier = hmac_verifier();
    let claims = verifier
        .verify_channel(
            &hs256(&json!({"sub": "alice", "channel": "secret:room", "exp": NOW + 60})),
            NOW,
        )
        .expect("valid");
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.channel, "secret:room");
    assert_eq!(claims.exp, Some(NOW + 60));
    // No exp: never expires; an anonymous client's grant has sub "".
    let anonymous = verifier
        .verify_channel(&hs256(&json!({"sub": "", "channel": "c"})), NOW)
        .expect("valid");
    assert_eq!((anonymous.sub.as_str(), anonymous.exp), ("", None));

    for (claims, name) in [
        (json!({"sub": "alice"}), "channel"),
        (json!({"sub": "alice", "channel": ""}), "channel"),
        (json!({"sub": "alice", "channel": 5}), "channel"),
        (json!({"channel": "c"}), "sub"),
        (json!({"sub": "alice", "channel": "c", "exp": "x"}), "exp"),
    ] {
        let reason = assert_invalid(verifier.verify_channel(&hs256(&claims), NOW));
        assert!(reason.contains(name), "{claims}: {reason}");
    }
    let expired = hs256(&json!({"sub": "alice", "channel": "c", "exp": NOW - 10}));
    assert!(matches!(
        verifier.verify_channel(&expired, NOW),
        Err(AuthError::Expired)
    ));
    // Channel tokens are signed like connection tokens: RS256 too.
    let rs = rs256(&json!({"sub": "a", "channel": "c"}), "rsa_private.pem");
    assert!(
        public_verifier("rsa_public.pem")
            .verify_channel(&rs, NOW)
            .is_ok()
    );
}

fn key_error(config: SessionConfig) -> String {
    match Verifier::from_config(&config) {
        Err(error) => error.to_string(),
        Ok(verifier) => panic!("expected a KeyError, got {verifier:?}"),
    }
}

#[test]
fn bad_keys_are_reported_with_their_config_key() {
    let inline = |pem: String| SessionConfig {
        jwt_public_key_pem: pem,
        ..config()
    };
    let message = key_error(inline("not a pem".into()));
    assert!(message.contains("session.jwt_public_key_pem"), "{message}");
    let garbage = "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n";
    let message = key_error(inline(garbage.into()));
    assert!(message.contains("session.jwt_public_key_pem"), "{message}");
    let message = key_error(inline(fixture("rsa_private.pem")));
    assert!(message.contains("private key"), "{message}");
    let message = key_error(inline(fixture("ec_p384_public.pem")));
    assert!(message.contains("P-256"), "{message}");
    let message = key_error(inline(fixture("ed25519_public.pem")));
    assert!(message.contains("unsupported"), "{message}");
    let certificate = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let message = key_error(inline(certificate.into()));
    assert!(message.contains("unsupported"), "{message}");

    let missing = key_error(SessionConfig {
        jwt_public_key_file: "/nonexistent/key.pem".into(),
        ..config()
    });
    assert!(missing.contains("session.jwt_public_key_file"), "{missing}");
    assert!(missing.contains("/nonexistent/key.pem"), "{missing}");

    let both = key_error(SessionConfig {
        jwt_public_key_pem: fixture("rsa_public.pem"),
        jwt_public_key_file: "/some/file.pem".into(),
        ..config()
    });
    assert!(both.contains("both"), "{both}");
    assert!(matches!(
        Verifier::from_config(&inline("x".into())),
        Err(KeyError::BadPem { .. })
    ));
}

#[test]
fn debug_output_shows_no_key_material() {
    let verifier = hmac_verifier();
    let text = format!("{verifier:?}");
    assert!(!text.contains(SECRET), "{text}");
    assert!(text.contains("hs256: true"), "{text}");
}
