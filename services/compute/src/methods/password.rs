//! Password hashing with argon2id, the OWASP-recommended choice: memory-hard,
//! so it is exactly the kind of work that must never run on a gateway.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rmpv::Value;
use rt_proto::ErrorCode;
use rt_proto::internal::WireError;
use rt_shared::config::ComputeConfig;

use crate::registry::{Call, MethodResult, bad_request};

/// Longest password accepted, in bytes (longer input is a denial-of-service lever).
const MAX_PASSWORD_BYTES: usize = 1024;

#[derive(Clone)]
pub struct Hasher {
    params: Params,
    /// Hashes asking for more memory than this are refused on verify.
    max_memory_kib: u32,
}

impl Hasher {
    pub fn new(config: &ComputeConfig) -> Self {
        // The config was validated, so these parameters are within argon2's ranges.
        let params = Params::new(
            config.argon2_memory_kib,
            config.argon2_iterations,
            config.argon2_parallelism,
            None,
        )
        .unwrap_or_default();
        Self {
            max_memory_kib: params.m_cost().saturating_mul(4).max(65_536),
            params,
        }
    }

    /// `{password}` → `{hash}` (a PHC string with salt and parameters).
    pub fn hash(&self, call: &mut Call) -> MethodResult {
        let password = password(call)?;
        let hash = self.hash_str(password)?;
        Ok(Value::Map(vec![(Value::from("hash"), Value::from(hash))]))
    }

    /// `{password, hash}` → `{valid}`.
    pub fn verify(&self, call: &mut Call) -> MethodResult {
        let password = password(call)?;
        let hash = call.str_field("hash")?;
        let valid = self.verify_str(password, hash)?;
        Ok(Value::Map(vec![(Value::from("valid"), Value::from(valid))]))
    }

    pub fn hash_str(&self, password: &str) -> Result<String, WireError> {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| WireError::new(ErrorCode::INTERNAL, format!("hashing failed: {e}")))
    }

    pub fn verify_str(&self, password: &str, hash: &str) -> Result<bool, WireError> {
        let parsed =
            PasswordHash::new(hash).map_err(|_| bad_request("hash is not a PHC string"))?;
        let memory = parsed.params.get_decimal("m").unwrap_or(0);
        if memory > self.max_memory_kib {
            return Err(bad_request(
                "hash asks for more memory than this service allows",
            ));
        }
        Ok(Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    }
}

fn password(call: &Call) -> Result<&str, WireError> {
    let password = call.str_field("password")?;
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(bad_request(format!(
            "password longer than {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Hasher {
        Hasher::new(&ComputeConfig {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            ..ComputeConfig::default()
        })
    }

    #[test]
    fn hashes_verify_and_salt_differs() {
        let hasher = cheap();
        let a = hasher.hash_str("correct horse").expect("hash");
        let b = hasher.hash_str("correct horse").expect("hash");
        assert!(a.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{a}");
        assert_ne!(a, b, "a fresh salt per hash");
        assert_eq!(hasher.verify_str("correct horse", &a), Ok(true));
        assert_eq!(hasher.verify_str("battery staple", &a), Ok(false));
    }

    #[test]
    fn refuses_garbage_and_memory_bombs() {
        let hasher = cheap();
        assert_eq!(
            hasher.verify_str("x", "not a hash").map_err(|e| e.code),
            Err(ErrorCode::BAD_REQUEST)
        );
        let bomb = "$argon2id$v=19$m=4000000,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        assert_eq!(
            hasher.verify_str("x", bomb).map_err(|e| e.code),
            Err(ErrorCode::BAD_REQUEST)
        );
    }
}
