//! Kube-free reconcile engines: desired spec + resolved inputs + GitLab client -> outcome.
//!
//! An engine takes what the user declared (already resolved: Secrets read, referenced objects
//! looked up), what is known from the last status (remote ids), and a [`GitLabClient`]. It
//! makes GitLab match, sending only what differs, and returns what it did and the status to
//! write. The controller, `apply` and `plan` all drive these same engines; nothing here knows
//! about Kubernetes.

pub mod cleanup;
pub mod listing;
pub mod registry;
pub mod upstream;

use crate::crd::reasons::Reason;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::crd::conditions::ConditionUpdate;
use crate::gitlab;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a reconcile could not finish.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// GitLab refused or failed a request; carries GitLab's own message.
    #[error(transparent)]
    GitLab(#[from] gitlab::Error),
    /// The spec cannot work as written (checked before any GitLab call).
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
}

impl Error {
    /// The stable condition reason, also the metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::GitLab(error) => error.reason(),
            Self::InvalidSpec(_) => Reason::InvalidSpec.as_str(),
        }
    }

    /// GitLab's own text (or ours, for a spec problem), for condition messages.
    pub fn message(&self) -> String {
        match self {
            Self::GitLab(error) => error.message(),
            Self::InvalidSpec(message) => message.clone(),
        }
    }

    /// True when retrying later without any change may succeed (GitLab down, rate limited).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::GitLab(error) => error.is_transient(),
            Self::InvalidSpec(_) => false,
        }
    }

    /// How long GitLab asked us to wait, when it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::GitLab(error) => error.retry_after(),
            Self::InvalidSpec(_) => None,
        }
    }
}

/// Something an engine did in GitLab (or, in plan mode, would do); becomes an Event and a
/// line of `apply`/`plan` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// `Created`, `Adopted`, `Updated`, `Deleted`, `CachePurged`, `ConnectivityTestFailed`, …
    pub reason: &'static str,
    /// What and why, in words; never a secret value.
    pub message: String,
    /// Field by field, for updates and creations.
    pub changes: Vec<FieldChange>,
    /// Whether this sends a write to GitLab (false for adoption and failed tests).
    pub writes: bool,
}

impl Action {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            changes: Vec::new(),
            writes: true,
        }
    }

    pub fn with_changes(mut self, changes: Vec<FieldChange>) -> Self {
        self.changes = changes;
        self
    }

    pub fn read_only(mut self) -> Self {
        self.writes = false;
        self
    }
}

/// One field's change. Secret fields show `(sensitive)`, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    pub field: &'static str,
    pub from: Option<String>,
    pub to: Option<String>,
}

impl FieldChange {
    pub fn new(
        field: &'static str,
        from: Option<impl ToString>,
        to: Option<impl ToString>,
    ) -> Self {
        Self {
            field,
            from: from.map(|v| v.to_string()),
            to: to.map(|v| v.to_string()),
        }
    }

    /// A change whose values must not be shown.
    pub fn sensitive(field: &'static str) -> Self {
        Self {
            field,
            from: Some(SENSITIVE.to_string()),
            to: Some(SENSITIVE.to_string()),
        }
    }
}

/// Stand-in shown wherever a secret value would be.
pub const SENSITIVE: &str = "(sensitive)";

/// The condition a failed reconcile reports on `Synced`.
pub fn failure_condition(error: &Error) -> ConditionUpdate {
    ConditionUpdate::new(
        crate::crd::conditions::SYNCED,
        false,
        error.reason(),
        error.message(),
    )
}

/// Acts on a one-shot purge request once per new value: calls `purge` (unless planning),
/// records the value as handled and returns the action; `None` when there is nothing to do.
pub async fn purge_once<F>(
    requested: Option<&String>,
    last_handled: &mut Option<String>,
    mode: Mode,
    what: String,
    purge: impl FnOnce() -> F,
) -> Result<Option<Action>>
where
    F: std::future::Future<Output = crate::gitlab::Result<()>>,
{
    let Some(requested) = requested else {
        return Ok(None);
    };
    if last_handled.as_ref() == Some(requested) {
        return Ok(None);
    }
    if mode.writes() {
        purge().await?;
    }
    *last_handled = Some(requested.clone());
    Ok(Some(Action::new(
        Reason::CachePurged.as_str(),
        format!("purged the cache of {what} (request {requested})"),
    )))
}

/// Whether an engine may write to GitLab, or only read and report what it would change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Apply,
    Plan,
}

impl Mode {
    pub fn writes(self) -> bool {
        self == Self::Apply
    }
}

/// Locks a mutex of the shared caches; a panic elsewhere while it was held leaves data that
/// is still consistent (every update is one insert or remove), so the lock is taken anyway.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
