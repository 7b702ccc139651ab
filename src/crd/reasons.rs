//! Condition reasons (DESIGN §10: all reasons live here; the existing ones move here later).

/// The object's namespace may not use the operator's own GitLab connection for its group
/// or project (`run --access-policy`).
pub const NOT_PERMITTED: &str = "NotPermitted";
/// Another object, older, manages the same GitLab object.
pub const CONFLICT: &str = "Conflict";
