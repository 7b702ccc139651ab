//! Tag selection rules, durations and schedules for container tag cleanups: pure, no I/O.
//!
//! This module owns every decision about *what* a cleanup deletes, and nothing about *how*:
//! no HTTP, no Kubernetes, no async, no clock (callers pass `now`). The cleanup run engine and
//! the controller feed it data they fetched and act on the answer.
//!
//! - [`duration`]: GitLab's human durations (`14d`, `1month`, `2 days`) for `olderThan`,
//!   `notDownloadedFor` and `cadence`, parsed and rendered back.
//! - [`rules`]: a [`RuleSpec`] (GitLab's `name_regex_delete`, `name_regex_keep`, `keep_n`,
//!   `older_than`) compiled once into [`CompiledRules`].
//! - [`mod@select`]: [`select()`] runs GitLab's documented cleanup algorithm over the tags of one
//!   repository, then the operator's own protections (protected tags, images in use by Pods,
//!   digests shared with kept tags), then the operator's own rules (`keepNPerFamily`,
//!   `keepBranchTags`), and returns a [`Selection`] with one [`Verdict`] per tag
//!   and the reason for every tag kept.
//! - [`branches`]: GitLab's `CI_COMMIT_REF_SLUG` of a project's branches, for
//!   `safety.keepBranchTags`.
//! - [`budget`]: `limits.maxDeletionPercent`, the fingerprint of a plan to approve, and the
//!   approval annotation's value.
//! - [`schedule`]: 5-field cron in an IANA time zone; a missed slot runs once, not once per slot.
//! - [`in_use`]: image references as Pods show them, and an index answering "does a Pod run
//!   this tag or digest?".
//! - [`cache`]: which upstream cache entries have not been downloaded for a given time.
//!
//! Safety stance, everywhere: when two readings of the input are possible, choose the one
//! that deletes less, and say so (see [`CompiledRules::notes`]).

pub mod branches;
pub mod budget;
pub mod cache;
pub mod duration;
pub mod in_use;
pub mod rules;
pub mod schedule;
pub mod select;

pub use branches::{ProjectBranches, ref_slug};
pub use budget::{BudgetVerdict, PendingApproval, check_budget, fingerprint, parse_approvals};
pub use cache::{CacheEntryInfo, CacheSelection, select_expired};
pub use duration::{HumanDuration, format_duration, parse_duration};
pub use in_use::{ImageReference, InUseIndex, PodImage, RepositoryInUse};
pub use rules::{CapturePattern, CompiledRules, FamilyRule, FamilySpec, RuleSpec};
pub use schedule::{Due, Schedule};
pub use select::{
    KeepReason, ProtectedTags, Protections, Selection, SelectionCounts, TagInfo, Verdict, select,
};

/// Everything in this module that can go wrong: all of it is a user input problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A human duration (`olderThan`, `notDownloadedFor`, `cadence`) could not be read.
    #[error("{field}: invalid duration {input:?}: {message}")]
    InvalidDuration {
        field: &'static str,
        input: String,
        message: String,
    },
    /// A regular expression does not compile; `message` is the regex engine's own text.
    #[error("{field} is an invalid regexp {pattern:?}: {message}")]
    InvalidRegex {
        field: &'static str,
        pattern: String,
        message: String,
    },
    /// A required field is absent or blank.
    #[error("{field} is required: {message}")]
    MissingField {
        field: &'static str,
        message: &'static str,
    },
    /// A cron expression or time zone could not be read.
    #[error("{field} {input:?}: {message}")]
    InvalidSchedule {
        field: &'static str,
        input: String,
        message: String,
    },
    /// A pattern whose captured text the rule needs has not exactly one capture group.
    #[error("{field} {pattern:?} must have exactly one capture group, it has {groups}")]
    InvalidCaptureGroups {
        field: &'static str,
        pattern: String,
        groups: usize,
    },
    /// A number outside its allowed range.
    #[error("{field} {message}")]
    OutOfRange {
        field: &'static str,
        message: &'static str,
    },
    /// A container image reference (a Pod's `image` or `imageID`) could not be read.
    #[error("invalid image reference {input:?}: {message}")]
    InvalidImageReference { input: String, message: String },
}

impl Error {
    /// Stable CamelCase condition reason for status conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidDuration { .. }
            | Error::InvalidRegex { .. }
            | Error::MissingField { .. }
            | Error::InvalidSchedule { .. }
            | Error::InvalidCaptureGroups { .. }
            | Error::OutOfRange { .. }
            | Error::InvalidImageReference { .. } => "InvalidSpec",
        }
    }

    /// The spec field the error is about, when it is about one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::InvalidDuration { field, .. }
            | Error::InvalidRegex { field, .. }
            | Error::MissingField { field, .. }
            | Error::InvalidSchedule { field, .. }
            | Error::InvalidCaptureGroups { field, .. }
            | Error::OutOfRange { field, .. } => Some(field),
            Error::InvalidImageReference { .. } => None,
        }
    }

    /// The same error attributed to another spec field, e.g.
    /// `parse_duration(s).map_err(|e| e.in_field("cacheRules.notDownloadedFor"))`.
    pub fn in_field(self, field: &'static str) -> Self {
        match self {
            Error::InvalidDuration { input, message, .. } => Error::InvalidDuration {
                field,
                input,
                message,
            },
            Error::InvalidRegex {
                pattern, message, ..
            } => Error::InvalidRegex {
                field,
                pattern,
                message,
            },
            Error::MissingField { message, .. } => Error::MissingField { field, message },
            Error::InvalidSchedule { input, message, .. } => Error::InvalidSchedule {
                field,
                input,
                message,
            },
            Error::InvalidCaptureGroups {
                pattern, groups, ..
            } => Error::InvalidCaptureGroups {
                field,
                pattern,
                groups,
            },
            Error::OutOfRange { message, .. } => Error::OutOfRange { field, message },
            other @ Error::InvalidImageReference { .. } => other,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_an_invalid_spec_and_in_field_renames() {
        let error = parse_duration("soon").unwrap_err();
        assert_eq!(error.reason(), "InvalidSpec");
        let renamed = error.in_field("cacheRules.notDownloadedFor");
        assert!(
            renamed
                .to_string()
                .starts_with("cacheRules.notDownloadedFor: invalid duration \"soon\""),
            "{renamed}"
        );
        let image = ImageReference::parse("").unwrap_err();
        assert_eq!(image.reason(), "InvalidSpec");
    }
}
