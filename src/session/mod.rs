//! The pieces of a session that know nothing of HTTP plumbing: the id and
//! its signed cookie, its data, the token sent upstream, the patch that
//! comes back, and the expiry and IP policy.

pub mod cookie;
pub mod data;
pub mod patch;
pub mod policy;
pub mod token;

/// Whole seconds since the Unix epoch: the unit of every time in a record
/// and in the token.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
