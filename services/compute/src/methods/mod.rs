//! The built-in methods.
//!
//! - `auth.hash_password` / `auth.verify_password`: argon2id (cost from config).
//! - `stats.summarize`: summary statistics of a list of numbers, streaming
//!   running figures as it goes.
//! - `geo.nearby`: the points within a radius of an origin, nearest first.

pub mod geo;
pub mod password;
pub mod stats;

use rt_shared::config::ComputeConfig;

use crate::registry::{Registry, RegistryError};

/// Registers every built-in method.
pub fn register_builtins(
    registry: &mut Registry,
    config: &ComputeConfig,
) -> Result<(), RegistryError> {
    let hasher = password::Hasher::new(config);
    let verifier = hasher.clone();
    registry.register("auth.hash_password", move |call: &mut crate::Call| {
        hasher.hash(call)
    })?;
    registry.register("auth.verify_password", move |call: &mut crate::Call| {
        verifier.verify(call)
    })?;
    let max_values = config.max_values;
    registry.register("stats.summarize", move |call: &mut crate::Call| {
        stats::summarize(call, max_values)
    })?;
    registry.register("geo.nearby", geo::nearby)?;
    Ok(())
}
