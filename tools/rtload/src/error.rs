//! One error type for the whole tool: a boxed error with a readable message.

pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The first part of an error's message (before any `:`): short enough to tally by.
pub fn short(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    text.split(':').next().unwrap_or(&text).trim().to_string()
}
