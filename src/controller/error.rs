//! Errors of a reconcile, each with the condition reason it reports and whether a retry
//! without a change can help.

use crate::crd::reasons::Reason;
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
    /// The credentials Secret holds the placeholder password `export` writes: sending it would
    /// replace the working password GitLab holds.
    #[error(
        "Secret {namespace}/{name} key {key:?} holds the placeholder password `export` wrote (GitLab never returns passwords): put the real password there"
    )]
    PlaceholderPassword {
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
    Kube(kube::Error),
    /// Another writer changed the object between our read and our write: a 409, or a 422 from
    /// the failed JSON-patch `test` of a finalizer patch. Not a failure: retried promptly,
    /// against the newer object the watch brings.
    #[error("conflict with another write, retrying: {0}")]
    WriteConflict(kube::Error),
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

/// A 409 from any write is a conflict.
impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        match &error {
            kube::Error::Api(status) if status.code == 409 => Self::WriteConflict(error),
            _ => Self::Kube(error),
        }
    }
}

/// How long a conflict waits before the retry: long enough for the watch to bring the newer
/// object into the store the retry reads.
pub const CONFLICT_RETRY: Duration = Duration::from_millis(500);

/// The error of a finalizer patch (adding or removing it). kube's finalizer helper sends a
/// JSON patch whose `test` checks the finalizer list it read; the apiserver answers a failed
/// `test` with 422 `Invalid` naming no field (INFERRED from the apiserver's patch handler: a
/// generic 422 with the patch library's message), so such a 422, like a 409, means the list
/// changed under us. A 422 naming fields is the patched object failing validation (a CRD
/// tightened under stored objects): an error, not a race.
pub fn finalizer_patch_error(error: kube::Error) -> Error {
    match &error {
        kube::Error::Api(status) if status.code == 409 => Error::WriteConflict(error),
        kube::Error::Api(status)
            if status.code == 422
                && status
                    .details
                    .as_ref()
                    .is_none_or(|details| details.causes.iter().all(|c| c.field.is_empty())) =>
        {
            Error::WriteConflict(error)
        }
        _ => Error::Finalizer(error.to_string()),
    }
}

/// The rules' refusals keep the variants the controller reported them as before `resolve`.
impl From<crate::resolve::Error> for Error {
    fn from(error: crate::resolve::Error) -> Self {
        match error {
            crate::resolve::Error::InvalidSpec(message) => Self::InvalidSpec(message),
            crate::resolve::Error::MissingReference(message) => {
                Self::Sync(sync::Error::InvalidSpec(message))
            }
            crate::resolve::Error::Engine(error) => Self::Sync(error),
        }
    }
}

impl Error {
    /// The condition reason and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ConnectionMissing => Reason::ConnectionMissing.as_str(),
            Self::SecretNotFound { .. } | Self::SecretKeyMissing { .. } => {
                Reason::SecretNotFound.as_str()
            }
            Self::PlaceholderPassword { .. } => crate::crd::upstream::REASON_PLACEHOLDER_PASSWORD,
            Self::InvalidSpec(_) => Reason::InvalidSpec.as_str(),
            Self::Sync(error) => error.reason(),
            Self::Kube(_) => Reason::KubernetesError.as_str(),
            Self::WriteConflict(_) => Reason::WriteConflict.as_str(),
            Self::Finalizer(_) => Reason::FinalizerError.as_str(),
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
            Self::Kube(_) | Self::WriteConflict(_) | Self::Finalizer(_) => true,
            Self::ConnectionMissing
            | Self::SecretNotFound { .. }
            | Self::SecretKeyMissing { .. }
            | Self::PlaceholderPassword { .. }
            | Self::InvalidSpec(_)
            | Self::NotPermitted(_)
            | Self::Conflict { .. } => false,
        }
    }

    /// A lost race with another writer, retried promptly and not counted as an error.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::WriteConflict(_))
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Sync(error) => error.retry_after(),
            _ => None,
        }
    }
}

/// How long to wait before the next attempt after `error`, the `attempt`-th failure in a row.
/// A conflict is retried after [`CONFLICT_RETRY`].
/// Transient errors back off exponentially from 5 s to 5 min (honouring GitLab's
/// `Retry-After`); permanent ones wait `permanent_delay`, since only a change can fix them and
/// changes trigger a reconcile by themselves.
pub fn retry_delay(error: &Error, attempt: u32, permanent_delay: Duration) -> Duration {
    if error.is_conflict() {
        return CONFLICT_RETRY;
    }
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

    fn api_error(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("refused", reason).with_code(code),
        ))
    }

    #[test]
    fn conflicts_are_retried_promptly_and_other_api_errors_back_off() {
        let conflict = Error::from(api_error(409, "Conflict"));
        assert!(conflict.is_conflict());
        assert_eq!(conflict.reason(), "WriteConflict");
        assert_eq!(
            retry_delay(&conflict, 9, Duration::from_secs(600)),
            CONFLICT_RETRY
        );
        let invalid_status = Error::from(api_error(422, "Invalid"));
        assert!(
            !invalid_status.is_conflict(),
            "a 422 outside a finalizer patch is an error"
        );
        assert_eq!(invalid_status.reason(), "KubernetesError");

        for code in [409, 422] {
            let lost_test = finalizer_patch_error(api_error(code, "Invalid"));
            assert!(lost_test.is_conflict(), "{code}");
        }
        let invalid_object: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "code": 422, "reason": "Invalid",
            "message": "VirtualRegistry.gitlabregistry.io \"cache\" is invalid: spec.group: Required value",
            "details": {"causes": [{"reason": "FieldValueRequired", "message": "Required value", "field": "spec.group"}]},
        }))
        .expect("a Status");
        let invalid_object = finalizer_patch_error(kube::Error::Api(Box::new(invalid_object)));
        assert!(
            !invalid_object.is_conflict(),
            "a 422 naming a field is the object failing validation"
        );
        let forbidden = finalizer_patch_error(api_error(403, "Forbidden"));
        assert!(!forbidden.is_conflict());
        assert_eq!(forbidden.reason(), "FinalizerError");
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
