//! Errors of a reconcile, each with the condition reason it reports and whether a retry
//! without a change can help.

use std::time::Duration;

use crate::sync;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither the operator's default connection nor `spec.gitlab` is set.
    #[error(
        "no GitLab connection: set --gitlab-url and GITLAB_TOKEN on the operator, or spec.gitlab on the object"
    )]
    ConnectionMissing,
    /// A referenced Secret does not exist in the object's namespace.
    #[error("Secret {namespace}/{name} not found")]
    SecretNotFound { namespace: String, name: String },
    /// A referenced Secret lacks the key, or its value is not UTF-8.
    #[error("Secret {namespace}/{name} has no usable key {key:?}")]
    SecretKeyMissing {
        namespace: String,
        name: String,
        key: String,
    },
    /// The spec cannot work as written (beyond what the CRD schema checks).
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// A GitLab reconcile failed; the status already says why.
    #[error(transparent)]
    Sync(#[from] sync::Error),
    /// The Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer helper failed (adding or removing the finalizer, or the cleanup).
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The access policy does not let the object's namespace use the operator's connection
    /// for its group or project.
    #[error(transparent)]
    NotPermitted(crate::tenancy::Denial),
    /// An older object manages the same GitLab object.
    #[error(
        "{owner} manages {object}: this object sends nothing to GitLab while it does (it takes over when {owner} is deleted or no longer claims it)"
    )]
    Conflict { owner: String, object: String },
}

impl Error {
    /// The condition reason and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ConnectionMissing => "ConnectionMissing",
            Self::SecretNotFound { .. } | Self::SecretKeyMissing { .. } => "SecretNotFound",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::Sync(error) => error.reason(),
            Self::Kube(_) => "KubernetesError",
            Self::Finalizer(_) => "FinalizerError",
            Self::NotPermitted(_) => crate::crd::reasons::NOT_PERMITTED,
            Self::Conflict { .. } => crate::crd::reasons::CONFLICT,
        }
    }

    /// The condition message: GitLab's own text for GitLab errors.
    pub fn message(&self) -> String {
        match self {
            Self::Sync(error) => error.message(),
            other => other.to_string(),
        }
    }

    /// Transient errors are retried with backoff; permanent ones wait for a change (a watch
    /// event) or the slow resync.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Sync(error) => error.is_transient(),
            Self::Kube(_) | Self::Finalizer(_) => true,
            Self::ConnectionMissing
            | Self::SecretNotFound { .. }
            | Self::SecretKeyMissing { .. }
            | Self::InvalidSpec(_)
            | Self::NotPermitted(_)
            | Self::Conflict { .. } => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Sync(error) => error.retry_after(),
            _ => None,
        }
    }
}

/// How long to wait before the next attempt after `error`, the `attempt`-th failure in a row.
/// Transient errors back off exponentially from 5 s to 5 min (honouring GitLab's
/// `Retry-After`); permanent ones wait `permanent_delay`, since only a change can fix them and
/// changes trigger a reconcile by themselves.
pub fn retry_delay(error: &Error, attempt: u32, permanent_delay: Duration) -> Duration {
    if !error.is_transient() {
        return permanent_delay;
    }
    let backoff = Duration::from_secs(5)
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(Duration::from_secs(300));
    match error.retry_after() {
        Some(asked) => asked.max(backoff.min(Duration::from_secs(5))),
        None => backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitlab;

    #[test]
    fn permanent_errors_wait_for_a_change() {
        let delay = retry_delay(&Error::ConnectionMissing, 3, Duration::from_secs(600));
        assert_eq!(delay, Duration::from_secs(600));
        let invalid = Error::Sync(sync::Error::GitLab(gitlab::Error::Validation {
            errors: Default::default(),
        }));
        assert!(!invalid.is_transient());
        assert_eq!(invalid.reason(), "InvalidSpec");
    }

    #[test]
    fn transient_errors_back_off_and_honour_retry_after() {
        let down = Error::Sync(sync::Error::GitLab(gitlab::Error::Server {
            status: 502,
            message: "bad gateway".into(),
        }));
        assert_eq!(down.reason(), "GitLabUnavailable");
        assert_eq!(
            retry_delay(&down, 0, Duration::from_secs(600)),
            Duration::from_secs(5)
        );
        assert_eq!(
            retry_delay(&down, 2, Duration::from_secs(600)),
            Duration::from_secs(20)
        );
        assert_eq!(
            retry_delay(&down, 30, Duration::from_secs(600)),
            Duration::from_secs(300)
        );
        let limited = Error::Sync(sync::Error::GitLab(gitlab::Error::RateLimited {
            retry_after: Some(Duration::from_secs(60)),
            message: "Retry later".into(),
        }));
        assert_eq!(limited.reason(), "RateLimited");
        assert_eq!(
            retry_delay(&limited, 0, Duration::from_secs(600)),
            Duration::from_secs(60)
        );
    }
}
