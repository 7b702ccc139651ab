//! Condition and Event reasons (DESIGN §10: all reasons live here). Every reason the
//! operator writes or compares is a [`Reason`]; the strings are contracts (users alert and
//! script on them), so a variant's string is its name and never changes.

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident,)*) => {
        /// A condition or Event reason.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, for tests and documentation.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The reason as written in conditions and Events.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => stringify!($variant),)*
                }
            }

            /// The reason a condition or Event carries, if it is one of ours.
            pub fn parse(reason: &str) -> Option<Self> {
                match reason {
                    $(stringify!($variant) => Some(Reason::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    // In line.
    /// The object is in line with its spec.
    Synced,
    /// Every listed Upstream has a GitLab id.
    Resolved,
    /// GitLab reached the upstream.
    Reachable,
    /// `spec.suspend` is true.
    Suspended,

    // Waiting for the other kind.
    /// An Upstream waits for a registry listing it to get a GitLab id.
    WaitingForRegistry,
    /// A registry waits for the Upstreams it lists to get their GitLab ids.
    WaitingForUpstream,
    /// A listed Upstream object does not exist, or will not get an id.
    UpstreamNotFound,

    // Refused before GitLab is called.
    /// The spec cannot work as written.
    InvalidSpec,
    /// No GitLab connection configured for the object.
    ConnectionMissing,
    /// A referenced Secret or key is missing.
    SecretNotFound,
    /// The credentials Secret still holds `export`'s placeholder password.
    PlaceholderPassword,
    /// The object's namespace may not use the operator's own GitLab connection for its group
    /// or project (`run --access-policy`).
    NotPermitted,
    /// Another object, older, manages the same GitLab object.
    Conflict,
    /// `apply` found more than one GitLab upstream the manifest could be.
    AmbiguousUpstream,
    /// The access policy file is invalid.
    InvalidAccessPolicy,
    /// The access policy file cannot be read.
    AccessPolicyUnreadable,

    // GitLab's answers.
    Unauthorized,
    Forbidden,
    NotFound,
    LimitExceeded,
    RateLimited,
    GitLabUnavailable,
    /// The upstream answered GitLab's connection test with a server error.
    ServerError,
    /// The upstream answered GitLab's connection test otherwise.
    Unreachable,
    /// GitLab's connection test of the upstream timed out.
    Timeout,
    /// GitLab's connection test of the upstream failed.
    ConnectivityTestFailed,

    // Kubernetes.
    KubernetesError,
    /// A write lost to another writer (409/422): retried, not an error.
    WriteConflict,
    FinalizerError,

    // Actions (Events, plan lines).
    Created,
    Updated,
    Deleted,
    Adopted,
    Associated,
    Disassociated,
    Repositioned,
    /// GitLab kept a description the API cannot clear.
    DescriptionKept,
    CachePurged,
    TagsDeleted,

    // Cleanup runs.
    /// Waiting for the next slot of the schedule.
    Scheduled,
    RunSucceeded,
    RunPartial,
    RunFailed,
    /// A run would delete more than `limits.maxDeletionPercent`: waits for approval.
    NeedsApproval,
    CleanupCompleted,
    CleanupPartial,
    CleanupFailed,

    // Plans.
    /// A plan would create the object.
    NotCreated,
    /// A plan would change the object.
    OutOfSync,
}

impl From<Reason> for String {
    fn from(reason: Reason) -> Self {
        reason.as_str().to_string()
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The object's namespace may not use the operator's own GitLab connection (`NotPermitted`).
pub const NOT_PERMITTED: &str = Reason::NotPermitted.as_str();
/// Another object, older, manages the same GitLab object (`Conflict`).
pub const CONFLICT: &str = Reason::Conflict.as_str();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_reads_back_as_itself() {
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(*reason));
        }
        assert_eq!(Reason::parse("Nonsense"), None);
        assert_eq!(Reason::WaitingForRegistry.as_str(), "WaitingForRegistry");
        assert_eq!(Reason::GitLabUnavailable.as_str(), "GitLabUnavailable");
    }
}
