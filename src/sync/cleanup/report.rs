//! What a run reports: per-repository detail and the run's counts, outcome and message.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::CleanupRun;
use crate::cleanup::{KeepReason, PendingApproval};
use crate::crd::cleanup_policy::RunOutcome;
use crate::crd::reasons::Reason;
use crate::gitlab::ContainerRepository;
use crate::sync::{Action, Error, Mode};

/// One repository (or, for an upstream cache, the upstream) as a run saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepositoryReport {
    /// Repository id (the upstream id for a cache target).
    pub id: i64,
    pub project_id: i64,
    /// `my-org/app/api` (`upstream <id>` for a cache target).
    pub path: String,
    pub location: String,
    pub tags_evaluated: usize,
    /// What the rules and protections select, in deletion order (oldest first).
    pub selected: Vec<String>,
    /// Deleted, or in a dry run / plan that would be, in deletion order.
    pub deleted: Vec<String>,
    pub tags_kept: usize,
    /// Kept by a GitLab protection rule (ours or GitLab's 403) or because a Pod runs it.
    pub tags_protected: usize,
    /// Selected, but GitLab refused to delete them as protected (403); also counted in
    /// `tags_kept` and `tags_protected`.
    pub refused_as_protected: usize,
    /// Selected, but gone when deleted (404: someone else deleted it).
    pub already_deleted: usize,
    pub failures: usize,
    /// Kept tags by reason (only reasons that occurred).
    pub kept_by_reason: BTreeMap<KeepReason, usize>,
    /// Why this repository was skipped or got no deletions, when it was.
    pub skipped: Option<String>,
    /// Over `maxDeletionPercent` and not approved: nothing deleted here.
    pub pending_approval: Option<PendingApproval>,
    /// Over `maxDeletionPercent`, deleted (or, simulated, would be) as approved.
    pub approved_fingerprint: Option<String>,
}

impl RepositoryReport {
    pub(super) fn for_repository(repository: &ContainerRepository) -> Self {
        Self {
            id: repository.id,
            project_id: repository.project_id,
            path: repository.path.clone(),
            location: repository.location.clone(),
            ..Self::default()
        }
    }

    /// Selected but neither deleted, protected by GitLab's refusal, gone nor failed: held
    /// back by the deletion limit or by a missing safety input.
    pub fn withheld(&self) -> usize {
        self.selected.len().saturating_sub(
            self.deleted.len() + self.refused_as_protected + self.already_deleted + self.failures,
        )
    }
}

/// The result of one run: counts for `status.lastRun`, a message, and per-repository detail
/// for `apply`/`plan` output.
#[derive(Debug, Clone)]
pub struct CleanupReport {
    pub outcome: RunOutcome,
    /// `spec.dryRun` as requested.
    pub dry_run: bool,
    pub mode: Mode,
    /// Repositories (or upstreams) looked at.
    pub repositories: usize,
    pub tags_evaluated: usize,
    /// Deleted; in a dry run or plan, that would be deleted.
    pub tags_deleted: usize,
    pub tags_kept: usize,
    /// Kept because GitLab protects them (its rules or its 403) or a Pod runs them.
    pub tags_protected: usize,
    /// Selected but already gone when deleted (404).
    pub already_deleted: usize,
    /// Selected but not deleted: deletion limit reached, or safety input missing.
    pub withheld: usize,
    pub failures: usize,
    /// Up to 20 `repository_path:tag` (or cache entry `relative_path`) deleted or, in a dry
    /// run, that would be.
    pub deleted_sample: Vec<String>,
    /// Kept tags by reason (only reasons that occurred).
    pub kept_by_reason: BTreeMap<KeepReason, usize>,
    /// One or more sentences: what happened and, unless Succeeded, why not everything.
    pub message: String,
    /// Remarks worth an event: ambiguous regexes, unreadable protection rules, …
    pub notes: Vec<String>,
    pub repository_reports: Vec<RepositoryReport>,
    /// The error that stopped the run early, for the condition reason.
    pub error: Option<Error>,
    /// Whether `maxDeletionsPerRun` stopped the run with selected tags left.
    pub limit_reached: bool,
    /// Repositories over `maxDeletionPercent` whose deletions wait for approval.
    pub pending_approvals: Vec<PendingApproval>,
}

impl CleanupReport {
    pub(super) fn new(run: &CleanupRun) -> Self {
        Self {
            outcome: RunOutcome::Succeeded,
            dry_run: run.dry_run,
            mode: run.mode,
            repositories: 0,
            tags_evaluated: 0,
            tags_deleted: 0,
            tags_kept: 0,
            tags_protected: 0,
            already_deleted: 0,
            withheld: 0,
            failures: 0,
            deleted_sample: Vec::new(),
            kept_by_reason: BTreeMap::new(),
            message: String::new(),
            notes: Vec::new(),
            repository_reports: Vec::new(),
            error: None,
            limit_reached: false,
            pending_approvals: Vec::new(),
        }
    }

    /// True when nothing was deleted by request (dry run or plan): `tags_deleted` counts what
    /// would have been.
    pub fn simulated(&self) -> bool {
        self.dry_run || !self.mode.writes()
    }

    /// One action per repository with (would-be) deletions, for `apply`/`plan` output and
    /// events. A dry run's actions send nothing (`writes: false`); a plan's would.
    pub fn actions(&self) -> Vec<Action> {
        let would = self.simulated();
        self.repository_reports
            .iter()
            .filter(|repository| !repository.deleted.is_empty())
            .map(|repository| {
                let mut names = repository
                    .deleted
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                if repository.deleted.len() > 10 {
                    let _ = write!(names, ", … ({} more)", repository.deleted.len() - 10);
                }
                let verb = if would { "would delete" } else { "deleted" };
                let action = Action::new(
                    Reason::TagsDeleted.as_str(),
                    format!(
                        "{verb} {} of {}: {names}",
                        plural(repository.deleted.len(), "tag"),
                        repository.path
                    ),
                );
                if self.dry_run {
                    action.read_only()
                } else {
                    action
                }
            })
            .collect()
    }
}

pub(super) fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn withheld_counts_what_was_selected_but_not_handled() {
        let report = RepositoryReport {
            selected: (0..10).map(|index| format!("t{index}")).collect(),
            deleted: vec!["t0".into(), "t1".into()],
            refused_as_protected: 1,
            already_deleted: 1,
            failures: 1,
            ..RepositoryReport::default()
        };
        assert_eq!(report.withheld(), 5);
    }
}
